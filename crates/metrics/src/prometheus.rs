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

type DeviceField = fn(&DeviceMetrics) -> u64;
type LinkField = fn(&LinkMetrics) -> u64;

const DEVICE_COUNTERS: &[(&str, &str, DeviceField)] = &[
    ("config_reads_total", "Config-space reads.", |m| {
        m.config_reads.get()
    }),
    ("config_writes_total", "Config-space writes.", |m| {
        m.config_writes.get()
    }),
    ("mmio_reads_total", "BAR (MMIO) reads.", |m| {
        m.mmio_reads.get()
    }),
    ("mmio_writes_total", "BAR (MMIO) writes.", |m| {
        m.mmio_writes.get()
    }),
    (
        "doorbells_total",
        "Doorbell writes that went through the BAR (not stores into a mapped doorbell page).",
        |m| m.doorbells.get(),
    ),
    (
        "dma_read_bytes_total",
        "Bytes the device read from memory by DMA.",
        |m| m.dma_read_bytes.get(),
    ),
    (
        "dma_write_bytes_total",
        "Bytes the device wrote to memory by DMA.",
        |m| m.dma_write_bytes.get(),
    ),
    ("interrupts_total", "MSI-X interrupts.", |m| {
        m.interrupts.get()
    }),
    (
        "errors_total",
        "Failed accesses (DMA refused, calls on a removed function).",
        |m| m.errors.get(),
    ),
    ("resets_total", "Function-level resets.", |m| m.resets.get()),
];

const LINK_COUNTERS: &[(&str, &str, LinkField)] = &[
    (
        "window_writes_total",
        "Posted writes through the peer's memory windows.",
        |m| m.window_writes.get(),
    ),
    (
        "window_write_bytes_total",
        "Bytes written through the peer's memory windows.",
        |m| m.window_write_bytes.get(),
    ),
    (
        "window_reads_total",
        "Non-posted reads through the peer's memory windows.",
        |m| m.window_reads.get(),
    ),
    (
        "window_read_bytes_total",
        "Bytes read through the peer's memory windows.",
        |m| m.window_read_bytes.get(),
    ),
    (
        "doorbells_sent_total",
        "Doorbell bits rung on the peer.",
        |m| m.doorbells_sent.get(),
    ),
    (
        "doorbells_received_total",
        "Doorbell bits received from the peer.",
        |m| m.doorbells_received.get(),
    ),
    (
        "messages_sent_total",
        "Message-register writes to the peer.",
        |m| m.messages_sent.get(),
    ),
    ("errors_total", "Fabric calls that failed.", |m| {
        m.errors.get()
    }),
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
    for (suffix, help, field) in DEVICE_COUNTERS {
        let name = format!("devlend_device_{suffix}");
        header(&mut out, &name, "counter", help);
        for ((_, m), l) in devices.iter().zip(&device_labels) {
            let _ = writeln!(out, "{name}{{{l}}} {}", field(m));
        }
    }
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
    for (suffix, help, field) in LINK_COUNTERS {
        let name = format!("devlend_link_{suffix}");
        header(&mut out, &name, "counter", help);
        for (l, _, m) in &link_rows {
            let _ = writeln!(out, "{name}{{{l}}} {}", field(m));
        }
    }
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
