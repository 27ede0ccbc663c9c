//! The Prometheus text exposition format (version 0.0.4): `# HELP`, `# TYPE`, then one
//! `name{labels} value` line per series; histograms as cumulative `_bucket`s, `_sum`, `_count`.

use std::fmt::Write as _;

use crate::{
    DeviceMetrics, Histogram, LinkInfo, LinkMetrics, NodeInfo, Registry, LATENCY_BOUNDS_NS,
};

/// A label value with `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
        .collect();
    inner.join(",")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn histogram(out: &mut String, name: &str, l: &str, h: &Histogram) {
    let (cum, total) = h.cumulative();
    for (bound, n) in LATENCY_BOUNDS_NS.iter().zip(&cum) {
        let le = *bound as f64 / 1e9;
        let _ = writeln!(out, "{name}_bucket{{{l},le=\"{le:e}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{l},le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "{name}_sum{{{l}}} {}", h.sum().as_secs_f64());
    let _ = writeln!(out, "{name}_count{{{l}}} {}", h.count());
}

/// One counter series of a metrics type: name suffix, help text, the value.
type Field<M> = (&'static str, &'static str, fn(&M) -> u64);

/// Every counter of `table` for each `(labels, metrics)` row: a header, then one line a row.
fn counters<M>(out: &mut String, prefix: &str, table: &[Field<M>], rows: &[(&str, &M)]) {
    for (suffix, help, field) in table {
        let name = format!("{prefix}_{suffix}");
        header(out, &name, "counter", help);
        for (l, m) in rows {
            let _ = writeln!(out, "{name}{{{l}}} {}", field(m));
        }
    }
}

/// A counter series named after its field: `total!(config_reads, "help")` is the series
/// `…_config_reads_total` with the value of `m.config_reads`.
macro_rules! total {
    ($field:ident, $help:literal) => {
        (concat!(stringify!($field), "_total"), $help, |m| {
            m.$field.get()
        })
    };
}

const DEVICE_COUNTERS: &[Field<DeviceMetrics>] = &[
    total!(config_reads, "Config-space reads."),
    total!(config_writes, "Config-space writes."),
    total!(mmio_reads, "BAR (MMIO) reads."),
    total!(mmio_writes, "BAR (MMIO) writes."),
    total!(
        doorbells,
        "Doorbell writes that went through the BAR (not stores into a mapped doorbell page)."
    ),
    total!(dma_read_bytes, "Bytes the device read from memory by DMA."),
    total!(dma_write_bytes, "Bytes the device wrote to memory by DMA."),
    total!(interrupts, "MSI-X interrupts."),
    total!(
        errors,
        "Failed accesses (DMA refused, calls on a removed function)."
    ),
    total!(resets, "Function-level resets."),
];

const LINK_COUNTERS: &[Field<LinkMetrics>] = &[
    total!(
        window_writes,
        "Posted writes through the peer's memory windows."
    ),
    total!(
        window_write_bytes,
        "Bytes written through the peer's memory windows."
    ),
    total!(
        window_reads,
        "Non-posted reads through the peer's memory windows."
    ),
    total!(
        window_read_bytes,
        "Bytes read through the peer's memory windows."
    ),
    total!(doorbells_sent, "Doorbell bits rung on the peer."),
    total!(doorbells_received, "Doorbell bits received from the peer."),
    total!(messages_sent, "Message-register writes to the peer."),
    total!(errors, "Fabric calls that failed."),
];

pub(crate) fn render(r: &Registry, node: &str, links: &[LinkInfo], info: &NodeInfo) -> String {
    let mut out = String::new();
    let devices = r.devices();
    let device_labels: Vec<String> = devices
        .iter()
        .map(|((name, role), _)| {
            labels(&[("node", node), ("device", name), ("role", role.as_str())])
        })
        .collect();
    let device_rows: Vec<(&str, &DeviceMetrics)> = device_labels
        .iter()
        .map(String::as_str)
        .zip(devices.iter().map(|(_, m)| &**m))
        .collect();
    counters(&mut out, "devlend_device", DEVICE_COUNTERS, &device_rows);
    let name = "devlend_device_round_trip_seconds";
    header(
        &mut out,
        name,
        "histogram",
        "Round trips of config and BAR reads, as the borrower's driver waits for them.",
    );
    for ((_, m), l) in devices.iter().zip(&device_labels) {
        histogram(&mut out, name, l, &m.round_trip);
    }

    let link_rows: Vec<(String, &LinkInfo, std::sync::Arc<LinkMetrics>)> = links
        .iter()
        .map(|li| {
            let index = li.index.to_string();
            let l = labels(&[
                ("node", node),
                ("link", &index),
                ("fabric", &li.fabric),
                ("peer", &li.peer),
            ]);
            (l, li, r.link(li.index))
        })
        .collect();
    header(
        &mut out,
        "devlend_link_up",
        "gauge",
        "1 when the link is up.",
    );
    for (l, li, _) in &link_rows {
        let _ = writeln!(out, "devlend_link_up{{{l}}} {}", u8::from(li.up));
    }
    header(
        &mut out,
        "devlend_link_reconnects_total",
        "counter",
        "Times the link came up again after it had been up.",
    );
    for (l, li, _) in &link_rows {
        let _ = writeln!(
            out,
            "devlend_link_reconnects_total{{{l}}} {}",
            li.reconnects
        );
    }
    let link_counter_rows: Vec<(&str, &LinkMetrics)> = link_rows
        .iter()
        .map(|(l, _, m)| (l.as_str(), &**m))
        .collect();
    counters(&mut out, "devlend_link", LINK_COUNTERS, &link_counter_rows);
    let name = "devlend_link_read_round_trip_seconds";
    header(
        &mut out,
        name,
        "histogram",
        "Round trips of non-posted reads through the peer's windows.",
    );
    for (l, _, m) in &link_rows {
        histogram(&mut out, name, l, &m.read_round_trip);
    }
    header(
        &mut out,
        "devlend_lease_renewals_total",
        "counter",
        "Lease renewals (borrower heartbeats) this node granted as a lender.",
    );
    let _ = writeln!(
        out,
        "devlend_lease_renewals_total{{{}}} {}",
        labels(&[("node", node)]),
        info.lease_renewals
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;
    use std::time::Duration;

    #[test]
    fn page_has_every_series_with_escaped_labels() {
        let r = Registry::new();
        let d = r.device("nv\"me", Role::Borrowed);
        d.mmio_reads.add(7);
        d.round_trip.record(Duration::from_micros(3));
        r.link(0).window_write_bytes.add(4096);
        let links = [LinkInfo {
            index: 0,
            fabric: "shm".into(),
            peer: "lender".into(),
            up: true,
            reconnects: 2,
        }];
        let page = r.render("b", &links, &NodeInfo { lease_renewals: 5 });
        assert!(page.contains(
            "devlend_device_mmio_reads_total{node=\"b\",device=\"nv\\\"me\",role=\"borrowed\"} 7\n"
        ));
        assert!(page.contains("devlend_device_round_trip_seconds_bucket{node=\"b\",device=\"nv\\\"me\",role=\"borrowed\",le=\"5e-6\"} 1\n"), "{page}");
        assert!(page.contains(
            "devlend_link_window_write_bytes_total{node=\"b\",link=\"0\",fabric=\"shm\",peer=\"lender\"} 4096\n"
        ));
        assert!(page.contains("devlend_link_reconnects_total{node=\"b\",link=\"0\",fabric=\"shm\",peer=\"lender\"} 2\n"));
        assert!(page.contains("devlend_lease_renewals_total{node=\"b\"} 5\n"));
        for line in page.lines() {
            assert!(
                line.starts_with('#') || line.starts_with("devlend_"),
                "{line}"
            );
        }
    }
}
