//! What a node measures: per-device and per-link counters and round-trip latency histograms.
//!
//! Counting is on the hot path (every MMIO access, every DMA), so a [`Counter`] is one relaxed
//! atomic add and a [`Histogram`] three; nothing locks. A [`Registry`] owns the sets of
//! counters by name and renders them in the Prometheus text format ([`Registry::render`]) or
//! as a [`Snapshot`] for `devlend top`.
//!
//! The counters are filled by wrappers around the seams every access crosses ([`metered`]):
//! a lent device's [`devlend_pci::PciDevice`] with its DMA port and interrupt sink (lender
//! side), a borrowed [`devlend_pci::PciFunction`] (borrower side), and each link's
//! [`devlend_fabric::Ntb`].
#![warn(missing_docs)]

pub mod metered;
mod prometheus;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use metered::{MeteredDevice, MeteredFunction, MeteredNtb};

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    #[inline]
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Upper bounds of the latency buckets, in nanoseconds (the last bucket is `+Inf`).
pub const LATENCY_BOUNDS_NS: [u64; 16] = [
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000,
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    100_000_000,
    1_000_000_000,
    10_000_000_000,
];

/// A latency histogram with fixed buckets ([`LATENCY_BOUNDS_NS`]).
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per-bucket counts (not cumulative); the last one is above every bound.
    buckets: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    #[inline]
    pub fn record(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS.partition_point(|&b| b < ns);
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Cumulative counts per bound (as Prometheus wants them), then the total.
    pub fn cumulative(&self) -> (Vec<u64>, u64) {
        let mut acc = 0u64;
        let mut out = Vec::with_capacity(self.buckets.len());
        for b in &self.buckets {
            acc = acc.saturating_add(b.load(Ordering::Relaxed));
            out.push(acc);
        }
        (out, acc)
    }

    /// Sum of all observations.
    pub fn sum(&self) -> Duration {
        Duration::from_nanos(self.sum_ns.load(Ordering::Relaxed))
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

/// Counters of one device, lent (counted on the lender, at the device) or borrowed (counted on
/// the borrower, at the function its driver uses).
#[derive(Debug, Default)]
pub struct DeviceMetrics {
    /// Config-space reads.
    pub config_reads: Counter,
    /// Config-space writes.
    pub config_writes: Counter,
    /// BAR reads.
    pub mmio_reads: Counter,
    /// BAR writes.
    pub mmio_writes: Counter,
    /// Doorbell writes (BAR writes into the device's doorbell page that went through the BAR;
    /// stores straight into a mapped doorbell page are not seen).
    pub doorbells: Counter,
    /// Bytes the device read from memory (DMA towards the device).
    pub dma_read_bytes: Counter,
    /// Bytes the device wrote to memory (DMA from the device).
    pub dma_write_bytes: Counter,
    /// MSI-X interrupts (signalled by the device on the lender, received by the driver on the
    /// borrower).
    pub interrupts: Counter,
    /// Failed accesses (DMA refused by the IOMMU, calls on a removed function).
    pub errors: Counter,
    /// Function-level resets.
    pub resets: Counter,
    /// Round trips: config reads and BAR reads (borrower side).
    pub round_trip: Histogram,
}

/// Counters of one NTB link.
#[derive(Debug, Default)]
pub struct LinkMetrics {
    /// Posted writes through the peer's windows.
    pub window_writes: Counter,
    /// Bytes written through the peer's windows.
    pub window_write_bytes: Counter,
    /// Non-posted reads through the peer's windows.
    pub window_reads: Counter,
    /// Bytes read through the peer's windows.
    pub window_read_bytes: Counter,
    /// Doorbell bits rung on the peer.
    pub doorbells_sent: Counter,
    /// Doorbell bits received (cleared here).
    pub doorbells_received: Counter,
    /// Message-register writes to the peer.
    pub messages_sent: Counter,
    /// Fabric calls that failed.
    pub errors: Counter,
    /// Round trips of non-posted window reads.
    pub read_round_trip: Histogram,
}

/// Which side of a lease a device's counters describe.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// A device this host owns and lends.
    Lent,
    /// A device this host holds from a peer.
    Borrowed,
}

impl Role {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Lent => "lent",
            Role::Borrowed => "borrowed",
        }
    }
}

/// What a link's labels say, plus the values read from the link itself at scrape time.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct LinkInfo {
    /// Position of the link on this node.
    pub index: usize,
    /// Fabric backend ("shm", "tcp").
    pub fabric: String,
    /// The peer's name, once known.
    pub peer: String,
    /// Whether the link is up now.
    pub up: bool,
    /// Times the link came up again after it had been up.
    pub reconnects: u64,
}

/// Node-wide values read at scrape time.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct NodeInfo {
    /// Lease renewals (heartbeats) this node granted as a lender.
    pub lease_renewals: u64,
}

/// Every counter of a node, by device and link.
#[derive(Debug, Default)]
pub struct Registry {
    devices: Mutex<BTreeMap<(String, Role), Arc<DeviceMetrics>>>,
    links: Mutex<BTreeMap<usize, Arc<LinkMetrics>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The counters of device `name` in `role` (made on first use; kept across leases, as
    /// Prometheus counters must not go back).
    pub fn device(&self, name: &str, role: Role) -> Arc<DeviceMetrics> {
        devlend_sync::lock(&self.devices)
            .entry((name.to_string(), role))
            .or_default()
            .clone()
    }

    /// Drops the counters of device `name` in `role` (a device removed from the node: its
    /// series leave the page; one added again under the name starts from zero, which
    /// Prometheus reads as a counter reset).
    pub fn forget_device(&self, name: &str, role: Role) {
        devlend_sync::lock(&self.devices).remove(&(name.to_string(), role));
    }

    /// The counters of link `index`.
    pub fn link(&self, index: usize) -> Arc<LinkMetrics> {
        devlend_sync::lock(&self.links)
            .entry(index)
            .or_default()
            .clone()
    }

    fn devices(&self) -> Vec<((String, Role), Arc<DeviceMetrics>)> {
        devlend_sync::lock(&self.devices)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn link_metrics(&self, index: usize) -> Option<Arc<LinkMetrics>> {
        devlend_sync::lock(&self.links).get(&index).cloned()
    }

    /// Every counter now, with the links' and node's live values.
    pub fn snapshot(&self, node: &str, links: &[LinkInfo], info: &NodeInfo) -> Snapshot {
        let devices = self
            .devices()
            .into_iter()
            .map(|((name, role), m)| DeviceSnapshot {
                name,
                role,
                config_reads: m.config_reads.get(),
                config_writes: m.config_writes.get(),
                mmio_reads: m.mmio_reads.get(),
                mmio_writes: m.mmio_writes.get(),
                doorbells: m.doorbells.get(),
                dma_read_bytes: m.dma_read_bytes.get(),
                dma_write_bytes: m.dma_write_bytes.get(),
                interrupts: m.interrupts.get(),
                errors: m.errors.get(),
                resets: m.resets.get(),
                round_trips: m.round_trip.count(),
                round_trip_ns_sum: u64::try_from(m.round_trip.sum().as_nanos()).unwrap_or(u64::MAX),
            })
            .collect();
        let links = links
            .iter()
            .map(|l| {
                let m = self.link_metrics(l.index).unwrap_or_default();
                LinkSnapshot {
                    info: l.clone(),
                    window_writes: m.window_writes.get(),
                    window_write_bytes: m.window_write_bytes.get(),
                    window_reads: m.window_reads.get(),
                    window_read_bytes: m.window_read_bytes.get(),
                    doorbells_sent: m.doorbells_sent.get(),
                    doorbells_received: m.doorbells_received.get(),
                    messages_sent: m.messages_sent.get(),
                    errors: m.errors.get(),
                }
            })
            .collect();
        Snapshot {
            node: node.to_string(),
            lease_renewals: info.lease_renewals,
            devices,
            links,
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every counter.
    pub fn render(&self, node: &str, links: &[LinkInfo], info: &NodeInfo) -> String {
        prometheus::render(self, node, links, info)
    }
}

/// One device's counters at one moment (for `devlend top`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct DeviceSnapshot {
    pub name: String,
    pub role: Role,
    pub config_reads: u64,
    pub config_writes: u64,
    pub mmio_reads: u64,
    pub mmio_writes: u64,
    pub doorbells: u64,
    pub dma_read_bytes: u64,
    pub dma_write_bytes: u64,
    pub interrupts: u64,
    pub errors: u64,
    pub resets: u64,
    pub round_trips: u64,
    pub round_trip_ns_sum: u64,
}

/// One link's counters at one moment.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct LinkSnapshot {
    #[serde(flatten)]
    pub info: LinkInfo,
    pub window_writes: u64,
    pub window_write_bytes: u64,
    pub window_reads: u64,
    pub window_read_bytes: u64,
    pub doorbells_sent: u64,
    pub doorbells_received: u64,
    pub messages_sent: u64,
    pub errors: u64,
}

/// Every counter of a node at one moment.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// The node.
    pub node: String,
    /// Lease renewals granted.
    pub lease_renewals: u64,
    /// Devices.
    pub devices: Vec<DeviceSnapshot>,
    /// Links.
    pub links: Vec<LinkSnapshot>,
}

/// Times `f` into `h`.
#[inline]
pub fn timed<T>(h: &Histogram, f: impl FnOnce() -> T) -> T {
    let start = std::time::Instant::now();
    let out = f();
    h.record(start.elapsed());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_bounded() {
        let h = Histogram::default();
        h.record(Duration::from_nanos(500));
        h.record(Duration::from_micros(3));
        h.record(Duration::from_micros(3));
        h.record(Duration::from_secs(100));
        let (cum, total) = h.cumulative();
        assert_eq!(total, 4);
        assert_eq!(h.count(), 4);
        assert_eq!(cum.first(), Some(&1), "500 ns is in the 1 us bucket");
        assert_eq!(cum.get(2), Some(&3), "3 us is in the 5 us bucket");
        assert_eq!(cum.get(LATENCY_BOUNDS_NS.len() - 1), Some(&3));
        assert_eq!(cum.last(), Some(&4), "100 s is only in +Inf");
        assert!(cum.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn registry_keeps_one_set_per_device_and_role() {
        let r = Registry::new();
        r.device("nvme0", Role::Lent).mmio_reads.add(3);
        r.device("nvme0", Role::Lent).mmio_reads.inc();
        r.device("nvme0", Role::Borrowed).mmio_reads.inc();
        let s = r.snapshot("n", &[], &NodeInfo::default());
        let lent = s.devices.iter().find(|d| d.role == Role::Lent).unwrap();
        assert_eq!(lent.mmio_reads, 4);
        assert_eq!(s.devices.len(), 2);
        let json = serde_json::to_string(&s).unwrap();
        let back: Snapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back.devices.len(), 2);
    }
}
