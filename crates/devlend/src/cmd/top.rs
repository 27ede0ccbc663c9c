//! `devlend top`: a live view of this node's links and devices and their rates, redrawn every
//! interval from the daemon's counters (the same ones `--metrics` serves).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use devlend_metrics::{DeviceSnapshot, LinkSnapshot, Snapshot};

use super::ctl::{call, Target};

/// `devlend top`
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    target: Target,
    /// Seconds between refreshes.
    #[arg(long, default_value = "1")]
    interval: f64,
    /// Stop after this many refreshes (default: until Ctrl-C).
    #[arg(long)]
    iterations: Option<u64>,
}

/// Runs `top`.
pub fn run(a: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.interval.is_finite() && a.interval >= 0.05,
        "--interval must be at least 0.05 seconds"
    );
    let interval = Duration::from_secs_f64(a.interval);
    let tty = std::io::stdout().is_terminal();
    let mut prev: Option<(Instant, Snapshot)> = None;
    let mut n = 0u64;
    loop {
        let snap: Snapshot = call(
            &a.target.state,
            crate::proto::MetricsRequest,
            Duration::from_secs(10),
        )?;
        let now = Instant::now();
        let mut out = std::io::stdout().lock();
        if a.target.json {
            writeln!(out, "{}", serde_json::to_string(&snap)?)?;
        } else {
            if tty {
                // Home and clear: redraw in place.
                write!(out, "\x1b[H\x1b[2J")?;
            }
            let elapsed = prev.as_ref().map(|(t, _)| now.duration_since(*t));
            write!(
                out,
                "{}",
                screen(&snap, prev.as_ref().map(|(_, s)| s), elapsed, interval)
            )?;
        }
        out.flush()?;
        drop(out);
        prev = Some((now, snap));
        n += 1;
        if a.iterations.is_some_and(|max| n >= max) {
            return Ok(());
        }
        std::thread::sleep(interval);
    }
}

/// `1.5 MB/s`-style rates (decimal units).
fn rate(bytes_per_s: f64, unit: &str) -> String {
    let (v, prefix) = match bytes_per_s {
        x if x >= 1e9 => (x / 1e9, "G"),
        x if x >= 1e6 => (x / 1e6, "M"),
        x if x >= 1e3 => (x / 1e3, "k"),
        x => (x, ""),
    };
    format!("{v:.1} {prefix}{unit}")
}

/// One frame: per-second rates from the previous snapshot (totals on the first frame).
pub fn screen(
    now: &Snapshot,
    prev: Option<&Snapshot>,
    elapsed: Option<Duration>,
    interval: Duration,
) -> String {
    let secs = elapsed.map(|e| e.as_secs_f64()).filter(|s| *s > 0.0);
    let per_s = |cur: u64, old: Option<u64>| -> f64 {
        match (secs, old) {
            (Some(s), Some(o)) => cur.saturating_sub(o) as f64 / s,
            _ => 0.0,
        }
    };
    let mut out = format!(
        "devlend top - node {} - every {:.1} s (Ctrl-C quits){}\n\n",
        now.node,
        interval.as_secs_f64(),
        if secs.is_none() {
            " - rates from the next refresh"
        } else {
            ""
        }
    );
    out.push_str(&format!(
        "{:<5} {:<6} {:<12} {:<5} {:>6} {:>14} {:>14} {:>10} {:>10} {:>6}\n",
        "LINK",
        "FABRIC",
        "PEER",
        "STATE",
        "RECONN",
        "WINDOW-WR",
        "WINDOW-RD",
        "DB-SENT/s",
        "DB-RECV/s",
        "ERRORS"
    ));
    for l in &now.links {
        let old = prev.and_then(|p| p.links.iter().find(|o| o.info.index == l.info.index));
        // A counter's rate since the previous sample.
        let since = |f: fn(&LinkSnapshot) -> u64| per_s(f(l), old.map(f));
        out.push_str(&format!(
            "{:<5} {:<6} {:<12} {:<5} {:>6} {:>14} {:>14} {:>10.0} {:>10.0} {:>6}\n",
            l.info.index,
            l.info.fabric,
            if l.info.peer.is_empty() {
                "?"
            } else {
                &l.info.peer
            },
            if l.info.up { "up" } else { "down" },
            l.info.reconnects,
            rate(since(|s| s.window_write_bytes), "B/s"),
            rate(since(|s| s.window_read_bytes), "B/s"),
            since(|s| s.doorbells_sent),
            since(|s| s.doorbells_received),
            l.errors,
        ));
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<12} {:<8} {:>7} {:>9} {:>9} {:>12} {:>12} {:>7} {:>6} {:>9}\n",
        "DEVICE",
        "ROLE",
        "CFG/s",
        "MMIO-RD/s",
        "MMIO-WR/s",
        "DMA-RD",
        "DMA-WR",
        "IRQ/s",
        "ERRORS",
        "RTT-AVG"
    ));
    for d in &now.devices {
        let old = prev.and_then(|p| {
            p.devices
                .iter()
                .find(|o| o.name == d.name && o.role == d.role)
        });
        let rtt = match old {
            Some(o) if d.round_trips > o.round_trips => {
                let ns = d.round_trip_ns_sum.saturating_sub(o.round_trip_ns_sum) as f64
                    / (d.round_trips - o.round_trips) as f64;
                format!("{:.1} us", ns / 1e3)
            }
            _ => "-".to_string(),
        };
        // A counter's rate since the previous sample.
        let since = |f: fn(&DeviceSnapshot) -> u64| per_s(f(d), old.map(f));
        out.push_str(&format!(
            "{:<12} {:<8} {:>7.0} {:>9.0} {:>9.0} {:>12} {:>12} {:>7.0} {:>6} {:>9}\n",
            d.name,
            d.role.as_str(),
            since(|s| s.config_reads + s.config_writes),
            since(|s| s.mmio_reads),
            since(|s| s.mmio_writes),
            rate(since(|s| s.dma_read_bytes), "B/s"),
            rate(since(|s| s.dma_write_bytes), "B/s"),
            since(|s| s.interrupts),
            d.errors,
            rtt,
        ));
    }
    if now.devices.is_empty() {
        out.push_str("(no devices lent or borrowed yet)\n");
    }
    out.push_str(&format!(
        "\nlease renewals granted: {}\n",
        now.lease_renewals
    ));
    out
}

impl Args {
    /// Whether `--json` was given.
    pub fn json(&self) -> bool {
        self.target.json
    }
}
