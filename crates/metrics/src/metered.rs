//! Wrappers that count what crosses the seams: each delegates every call unchanged and adds
//! relaxed atomic counts (and, for round trips, a clock read before and after).
//!
//! What they cannot see: stores a borrower makes straight into a directly mapped window or
//! doorbell page (`shm`'s zero-copy paths, [`devlend_fabric::PeerWindows::peer_mw_direct`],
//! [`devlend_pci::BarAccess::bar_mappings`]) are plain memory accesses with no call to count.
//! A device's own DMA is counted where it asks for the memory ([`DmaPort::dma_span`]).

use std::sync::Arc;
use std::time::Duration;

use devlend_fabric::{
    AddressSpace, BusAddr, Doorbells, Link, LinkState, MemSpan, MemoryWindows, Messages, MwAlign,
    Ntb, PeerWindows, Scratchpads, WindowOffset,
};
use devlend_pci::{
    AccessSize, BarAccess, BarIndex, BarSpec, ConfigAccess, DmaAccess, DmaAlloc, DmaBuffer,
    DmaError, DmaPort, DmaRemap, DmaSpanResult, FunctionError, InterruptSink, Interrupts,
    MemoryArea, PciDevice, PciFunction,
};
use vmm_sys_util::eventfd::EventFd;

use crate::{timed, DeviceMetrics, LinkMetrics};

/// The doorbell pages of a device: (BAR, first byte, length).
type Areas = Vec<(BarIndex, u64, u64)>;

fn in_areas(areas: &Areas, bar: BarIndex, offset: u64) -> bool {
    areas
        .iter()
        .any(|&(b, start, len)| b == bar && offset >= start && offset - start < len)
}

// ---------------------------------------------------------------------------------------------
// Lender side: the device, its DMA port and its interrupt sink
// ---------------------------------------------------------------------------------------------

/// A lent device with its accesses counted.
pub struct MeteredDevice {
    inner: Arc<dyn PciDevice>,
    m: Arc<DeviceMetrics>,
    areas: Areas,
}

impl MeteredDevice {
    /// Builds a device through `build`, handing it a counting DMA port and interrupt sink, and
    /// returns it wrapped so that its config and BAR accesses are counted too.
    pub fn build(
        dma: Arc<dyn DmaPort>,
        irq: Arc<dyn InterruptSink>,
        m: Arc<DeviceMetrics>,
        build: impl FnOnce(
            Arc<dyn DmaPort>,
            Arc<dyn InterruptSink>,
        ) -> Result<Arc<dyn PciDevice>, String>,
    ) -> Result<Arc<dyn PciDevice>, String> {
        let dma = Arc::new(MeteredDma {
            inner: dma,
            m: m.clone(),
        });
        let irq = Arc::new(MeteredSink {
            inner: irq,
            m: m.clone(),
        });
        let inner = build(dma, irq)?;
        Ok(Arc::new(Self::wrap(inner, m)))
    }

    /// Wraps a built device.
    pub fn wrap(inner: Arc<dyn PciDevice>, m: Arc<DeviceMetrics>) -> Self {
        let areas = BarIndex::ALL
            .iter()
            .flat_map(|&b| {
                inner
                    .bar_memory(b)
                    .into_iter()
                    .map(move |a| (b, a.offset, a.mem.len()))
            })
            .collect();
        Self { inner, m, areas }
    }
}

impl PciDevice for MeteredDevice {
    fn config_read(&self, offset: u16, size: AccessSize) -> u32 {
        self.m.config_reads.inc();
        self.inner.config_read(offset, size)
    }
    fn config_write(&self, offset: u16, size: AccessSize, value: u32) {
        self.m.config_writes.inc();
        self.inner.config_write(offset, size, value)
    }
    fn bar_spec(&self, bar: BarIndex) -> Option<BarSpec> {
        self.inner.bar_spec(bar)
    }
    fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]) {
        self.m.mmio_reads.inc();
        self.inner.bar_read(bar, offset, data)
    }
    fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) {
        self.m.mmio_writes.inc();
        if in_areas(&self.areas, bar, offset) {
            self.m.doorbells.inc();
        }
        self.inner.bar_write(bar, offset, data)
    }
    fn bar_write_nonblocking(&self, bar: BarIndex, offset: u64, data: &[u8]) -> bool {
        let done = self.inner.bar_write_nonblocking(bar, offset, data);
        if done {
            self.m.mmio_writes.inc();
        }
        done
    }
    fn run_nonblocking(&self) -> bool {
        self.inner.run_nonblocking()
    }
    fn set_idle_wait(&self, wait: Option<Arc<dyn devlend_pci::IdleWait>>) {
        self.inner.set_idle_wait(wait)
    }
    fn reset(&self) {
        self.m.resets.inc();
        self.inner.reset()
    }
    fn msix_vectors(&self) -> u16 {
        self.inner.msix_vectors()
    }
    fn bar_memory(&self, bar: BarIndex) -> Vec<MemoryArea> {
        self.inner.bar_memory(bar)
    }
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn capacity_bytes(&self) -> Option<u64> {
        self.inner.capacity_bytes()
    }
    fn set_interrupt_fds(&self, fds: Option<&[Arc<vmm_sys_util::eventfd::EventFd>]>) -> bool {
        // Vectors signalled this way bypass the interrupt counter.
        self.inner.set_interrupt_fds(fds)
    }
    // A real device's DMA bypasses the counting port: the binding must still reach its IOMMU.
    fn needs_direct_dma(&self) -> bool {
        self.inner.needs_direct_dma()
    }
    fn dma_map(&self, iova: BusAddr, mem: &MemSpan, writable: bool) -> Result<(), DmaError> {
        self.inner.dma_map(iova, mem, writable)
    }
    fn dma_unmap(&self, iova: BusAddr, len: u64) -> Result<(), DmaError> {
        self.inner.dma_unmap(iova, len)
    }
}

struct MeteredDma {
    inner: Arc<dyn DmaPort>,
    m: Arc<DeviceMetrics>,
}

impl MeteredDma {
    fn count<T>(
        &self,
        r: Result<T, DmaError>,
        bytes: u64,
        counter: &crate::Counter,
    ) -> Result<T, DmaError> {
        match &r {
            Ok(_) => counter.add(bytes),
            Err(_) => self.m.errors.inc(),
        }
        r
    }
}

impl DmaPort for MeteredDma {
    fn dma_read(&self, addr: BusAddr, buf: &mut [u8]) -> Result<(), DmaError> {
        let len = buf.len() as u64;
        let r = self.inner.dma_read(addr, buf);
        self.count(r, len, &self.m.dma_read_bytes)
    }
    fn dma_read_many(&self, reads: &mut [(BusAddr, &mut [u8])]) -> Result<(), DmaError> {
        let len: usize = reads.iter().map(|(_, b)| b.len()).sum();
        let r = self.inner.dma_read_many(reads);
        self.count(r, len as u64, &self.m.dma_read_bytes)
    }
    fn dma_write(&self, addr: BusAddr, data: &[u8]) -> Result<(), DmaError> {
        let r = self.inner.dma_write(addr, data);
        self.count(r, data.len() as u64, &self.m.dma_write_bytes)
    }
    fn dma_span(&self, addr: BusAddr, len: u64, access: DmaAccess) -> DmaSpanResult {
        let r = self.inner.dma_span(addr, len, access);
        // A span handed out is the access itself (the device copies from or into it next);
        // `None` falls back to dma_read/dma_write, which count themselves.
        let counter = match access {
            DmaAccess::Read => &self.m.dma_read_bytes,
            DmaAccess::Write => &self.m.dma_write_bytes,
        };
        let bytes = if matches!(r, Ok(Some(_))) { len } else { 0 };
        self.count(r, bytes, counter)
    }
}

struct MeteredSink {
    inner: Arc<dyn InterruptSink>,
    m: Arc<DeviceMetrics>,
}

impl InterruptSink for MeteredSink {
    fn signal(&self, vector: u16) {
        self.m.interrupts.inc();
        self.inner.signal(vector)
    }
}

// ---------------------------------------------------------------------------------------------
// Borrower side: the function a driver uses
// ---------------------------------------------------------------------------------------------

/// A borrowed function with its accesses counted and its round trips timed.
pub struct MeteredFunction {
    inner: Arc<dyn PciFunction>,
    m: Arc<DeviceMetrics>,
    areas: Areas,
}

impl MeteredFunction {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn PciFunction>, m: Arc<DeviceMetrics>) -> Self {
        let areas = BarIndex::ALL
            .iter()
            .flat_map(|&b| {
                inner
                    .bar_mappings(b)
                    .into_iter()
                    .map(move |a| (b, a.offset, a.mem.len()))
            })
            .collect();
        Self { inner, m, areas }
    }

    fn count<T>(&self, r: Result<T, FunctionError>) -> Result<T, FunctionError> {
        if r.is_err() {
            self.m.errors.inc();
        }
        r
    }
}

impl ConfigAccess for MeteredFunction {
    fn config_read(&self, offset: u16, size: AccessSize) -> Result<u32, FunctionError> {
        self.m.config_reads.inc();
        let r = timed(&self.m.round_trip, || self.inner.config_read(offset, size));
        self.count(r)
    }
    fn config_write(&self, offset: u16, size: AccessSize, value: u32) -> Result<(), FunctionError> {
        self.m.config_writes.inc();
        let r = self.inner.config_write(offset, size, value);
        self.count(r)
    }
}

impl BarAccess for MeteredFunction {
    fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), FunctionError> {
        self.m.mmio_reads.inc();
        let r = timed(&self.m.round_trip, || {
            self.inner.bar_read(bar, offset, data)
        });
        self.count(r)
    }
    fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) -> Result<(), FunctionError> {
        self.m.mmio_writes.inc();
        if in_areas(&self.areas, bar, offset) {
            self.m.doorbells.inc();
        }
        let r = self.inner.bar_write(bar, offset, data);
        self.count(r)
    }
    fn bar_mappings(&self, bar: BarIndex) -> Vec<MemoryArea> {
        self.inner.bar_mappings(bar)
    }
}

impl DmaAlloc for MeteredFunction {
    fn dma_alloc(&self, len: usize) -> Result<DmaBuffer, FunctionError> {
        let r = self.inner.dma_alloc(len);
        self.count(r)
    }
}

impl DmaRemap for MeteredFunction {
    fn dma_map(&self, iova: BusAddr, mem: MemSpan, writable: bool) -> Result<(), FunctionError> {
        let r = self.inner.dma_map(iova, mem, writable);
        self.count(r)
    }
    fn dma_unmap(&self, iova: BusAddr, len: u64) -> Result<(), FunctionError> {
        let r = self.inner.dma_unmap(iova, len);
        self.count(r)
    }
}

impl Interrupts for MeteredFunction {
    fn interrupt_vectors(&self) -> u16 {
        self.inner.interrupt_vectors()
    }
    fn wait_interrupt(&self, vector: u16, timeout: Duration) -> Result<bool, FunctionError> {
        let r = self.inner.wait_interrupt(vector, timeout);
        if matches!(r, Ok(true)) {
            self.m.interrupts.inc();
        }
        self.count(r)
    }
    fn set_interrupt_eventfd(
        &self,
        vector: u16,
        fd: Option<Arc<EventFd>>,
    ) -> Result<(), FunctionError> {
        let r = self.inner.set_interrupt_eventfd(vector, fd);
        self.count(r)
    }
}

impl PciFunction for MeteredFunction {
    fn describe(&self) -> String {
        self.inner.describe()
    }
}

// ---------------------------------------------------------------------------------------------
// A link
// ---------------------------------------------------------------------------------------------

/// An NTB endpoint with its window traffic, doorbells and messages counted.
pub struct MeteredNtb {
    inner: Arc<dyn Ntb>,
    m: Arc<LinkMetrics>,
}

impl MeteredNtb {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Ntb>, m: Arc<LinkMetrics>) -> Self {
        Self { inner, m }
    }

    fn count<T>(&self, r: devlend_fabric::Result<T>) -> devlend_fabric::Result<T> {
        if r.is_err() {
            self.m.errors.inc();
        }
        r
    }
}

impl Link for MeteredNtb {
    fn link_state(&self) -> LinkState {
        self.inner.link_state()
    }
    fn wait_link(&self, want: LinkState, timeout: Duration) -> devlend_fabric::Result<()> {
        self.inner.wait_link(want, timeout)
    }
    fn link_generation(&self) -> u64 {
        self.inner.link_generation()
    }
    fn drop_peer(&self, reason: &str) {
        self.inner.drop_peer(reason);
    }
}

impl MemoryWindows for MeteredNtb {
    fn mw_count(&self) -> usize {
        self.inner.mw_count()
    }
    fn mw_get_align(&self, window: usize) -> devlend_fabric::Result<MwAlign> {
        self.inner.mw_get_align(window)
    }
    fn mw_set_trans(&self, window: usize, addr: BusAddr, size: u64) -> devlend_fabric::Result<()> {
        let r = self.inner.mw_set_trans(window, addr, size);
        self.count(r)
    }
    fn mw_clear_trans(&self, window: usize) -> devlend_fabric::Result<()> {
        let r = self.inner.mw_clear_trans(window);
        self.count(r)
    }
}

impl PeerWindows for MeteredNtb {
    fn peer_mw_count(&self) -> usize {
        self.inner.peer_mw_count()
    }
    fn peer_mw_size(&self, window: usize) -> devlend_fabric::Result<u64> {
        self.inner.peer_mw_size(window)
    }
    fn peer_mw_write(
        &self,
        window: usize,
        offset: WindowOffset,
        data: &[u8],
    ) -> devlend_fabric::Result<()> {
        self.m.window_writes.inc();
        self.m.window_write_bytes.add(data.len() as u64);
        let r = self.inner.peer_mw_write(window, offset, data);
        self.count(r)
    }
    fn peer_mw_read(
        &self,
        window: usize,
        offset: WindowOffset,
        buf: &mut [u8],
    ) -> devlend_fabric::Result<()> {
        self.m.window_reads.inc();
        self.m.window_read_bytes.add(buf.len() as u64);
        let r = timed(&self.m.read_round_trip, || {
            self.inner.peer_mw_read(window, offset, buf)
        });
        self.count(r)
    }
    fn peer_mw_read_many(
        &self,
        window: usize,
        reads: &mut [(WindowOffset, &mut [u8])],
    ) -> devlend_fabric::Result<()> {
        // Each read counts as one; the batch is one round trip on the clock.
        self.m.window_reads.add(reads.len() as u64);
        let bytes: usize = reads.iter().map(|(_, b)| b.len()).sum();
        self.m.window_read_bytes.add(bytes as u64);
        let r = timed(&self.m.read_round_trip, || {
            self.inner.peer_mw_read_many(window, reads)
        });
        self.count(r)
    }
    fn peer_mw_direct(&self, window: usize) -> devlend_fabric::Result<Option<MemSpan>> {
        self.inner.peer_mw_direct(window)
    }
}

impl Doorbells for MeteredNtb {
    fn db_valid_mask(&self) -> u64 {
        self.inner.db_valid_mask()
    }
    fn db_wait_polls(&self) -> bool {
        self.inner.db_wait_polls()
    }
    fn wait_reading(
        &self,
        deadline: std::time::Instant,
        woken: &mut dyn FnMut() -> bool,
        park: &mut dyn FnMut(std::time::Duration),
    ) -> devlend_fabric::Result<bool> {
        self.inner.wait_reading(deadline, woken, park)
    }
    fn interrupt_wait_reading(&self) {
        self.inner.interrupt_wait_reading()
    }
    fn db_read(&self) -> u64 {
        self.inner.db_read()
    }
    fn db_clear(&self, bits: u64) -> devlend_fabric::Result<()> {
        let pending = self.inner.db_read() & bits;
        let r = self.inner.db_clear(bits);
        if r.is_ok() {
            self.m
                .doorbells_received
                .add(u64::from(pending.count_ones()));
        }
        self.count(r)
    }
    fn db_read_mask(&self) -> u64 {
        self.inner.db_read_mask()
    }
    fn db_set_mask(&self, bits: u64) -> devlend_fabric::Result<()> {
        self.inner.db_set_mask(bits)
    }
    fn db_clear_mask(&self, bits: u64) -> devlend_fabric::Result<()> {
        self.inner.db_clear_mask(bits)
    }
    fn db_wait(&self, bits: u64, timeout: Duration) -> devlend_fabric::Result<u64> {
        self.inner.db_wait(bits, timeout)
    }
    fn peer_db_set(&self, bits: u64) -> devlend_fabric::Result<()> {
        self.m.doorbells_sent.add(u64::from(bits.count_ones()));
        let r = self.inner.peer_db_set(bits);
        self.count(r)
    }
}

impl Scratchpads for MeteredNtb {
    fn spad_count(&self) -> usize {
        self.inner.spad_count()
    }
    fn spad_read(&self, index: usize) -> devlend_fabric::Result<u32> {
        self.inner.spad_read(index)
    }
    fn spad_write(&self, index: usize, value: u32) -> devlend_fabric::Result<()> {
        self.inner.spad_write(index, value)
    }
    fn peer_spad_read(&self, index: usize) -> devlend_fabric::Result<u32> {
        self.inner.peer_spad_read(index)
    }
    fn peer_spad_write(&self, index: usize, value: u32) -> devlend_fabric::Result<()> {
        self.inner.peer_spad_write(index, value)
    }
}

impl Messages for MeteredNtb {
    fn msg_count(&self) -> usize {
        self.inner.msg_count()
    }
    fn msg_read_sts(&self) -> u64 {
        self.inner.msg_read_sts()
    }
    fn msg_read(&self, index: usize) -> devlend_fabric::Result<u32> {
        self.inner.msg_read(index)
    }
    fn msg_clear_sts(&self, bits: u64) -> devlend_fabric::Result<()> {
        self.inner.msg_clear_sts(bits)
    }
    fn peer_msg_write(&self, index: usize, value: u32) -> devlend_fabric::Result<()> {
        self.m.messages_sent.inc();
        let r = self.inner.peer_msg_write(index, value);
        self.count(r)
    }
    fn msg_wait(&self, bits: u64, timeout: Duration) -> devlend_fabric::Result<u64> {
        self.inner.msg_wait(bits, timeout)
    }
}

impl Ntb for MeteredNtb {
    fn address_space(&self) -> &AddressSpace {
        self.inner.address_space()
    }
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    fn carries_interrupt_fds(&self) -> bool {
        self.inner.carries_interrupt_fds()
    }
    fn give_interrupt_fd(
        &self,
        bit: u32,
        cookie: u64,
        fd: &vmm_sys_util::eventfd::EventFd,
    ) -> devlend_fabric::Result<bool> {
        let r = self.inner.give_interrupt_fd(bit, cookie, fd);
        self.count(r)
    }
    fn take_interrupt_fd(&self, bit: u32, cookie: u64) -> Option<vmm_sys_util::eventfd::EventFd> {
        self.inner.take_interrupt_fd(bit, cookie)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devlend_fabric::{AddressSpace, LinkConfig};
    use devlend_pci::local::LocalFunction;
    use devlend_pci::test_device::{DirectStandIn, TestDevice};

    /// One side of a loopback link whose peer (kept, so the link stays up) translates no
    /// window, metered.
    fn metered_loopback() -> (MeteredNtb, Arc<LinkMetrics>, Arc<dyn Ntb>) {
        let (a, _b) = devlend_fabric::loopback_pair(
            LinkConfig::default(),
            Arc::new(AddressSpace::new()),
            Arc::new(AddressSpace::new()),
        )
        .unwrap();
        let m = Arc::new(LinkMetrics::default());
        (MeteredNtb::new(a, m.clone()), m, _b)
    }

    #[test]
    fn a_metered_link_counts_window_traffic_doorbells_and_read_round_trips() {
        let (a, m, _peer) = metered_loopback();
        let a: Arc<dyn Ntb> = Arc::new(a);
        let _ = a.peer_mw_write(0, WindowOffset(0), &[0u8; 64]);
        assert_eq!(m.window_write_bytes.get(), 64);
        assert_eq!(m.window_writes.get(), 1);
        a.peer_db_set(0b101).unwrap();
        assert_eq!(m.doorbells_sent.get(), 2);
        let mut buf = [0u8; 8];
        let _ = a.peer_mw_read(0, WindowOffset(0), &mut buf);
        assert_eq!(m.window_reads.get(), 1);
        assert_eq!(m.read_round_trip.count(), 1);
        // The window was never translated by the peer: the calls failed, and were counted so.
        assert_eq!(m.errors.get(), 2);
        a.peer_msg_write(0, 7).unwrap();
        assert_eq!(m.messages_sent.get(), 1);
    }

    /// Several reads through the metered link stay one call to the link (one round trip on
    /// the clock), each counted as a read.
    #[test]
    fn a_metered_link_passes_a_batch_of_reads_as_one() {
        let (a, m, _peer) = metered_loopback();
        let (mut x, mut y, mut z) = ([0u8; 8], [0u8; 16], [0u8; 4]);
        let mut reads = [
            (WindowOffset(0), &mut x[..]),
            (WindowOffset(64), &mut y[..]),
            (WindowOffset(128), &mut z[..]),
        ];
        // The window is not translated: the batch fails as a whole, once.
        assert!(a.peer_mw_read_many(0, &mut reads).is_err());
        assert_eq!(m.window_reads.get(), 3);
        assert_eq!(m.window_read_bytes.get(), 28);
        assert_eq!(m.read_round_trip.count(), 1);
        assert_eq!(m.errors.get(), 1);
    }

    /// A port that records the batches of reads it is given.
    #[derive(Default)]
    struct BatchPort(std::sync::Mutex<Vec<usize>>);

    impl DmaPort for BatchPort {
        fn dma_read(&self, _: BusAddr, _: &mut [u8]) -> Result<(), DmaError> {
            self.0.lock().unwrap().push(1);
            Ok(())
        }
        fn dma_read_many(&self, reads: &mut [(BusAddr, &mut [u8])]) -> Result<(), DmaError> {
            self.0.lock().unwrap().push(reads.len());
            Ok(())
        }
        fn dma_write(&self, _: BusAddr, _: &[u8]) -> Result<(), DmaError> {
            Ok(())
        }
        fn dma_span(&self, _: BusAddr, _: u64, _: DmaAccess) -> DmaSpanResult {
            Ok(None)
        }
    }

    #[test]
    fn a_metered_port_passes_a_batch_of_reads_as_one() {
        let inner = Arc::new(BatchPort::default());
        let m = Arc::new(DeviceMetrics::default());
        let port = MeteredDma {
            inner: inner.clone(),
            m: m.clone(),
        };
        let (mut x, mut y) = ([0u8; 8], [0u8; 24]);
        let mut reads = [(BusAddr(0), &mut x[..]), (BusAddr(64), &mut y[..])];
        port.dma_read_many(&mut reads).unwrap();
        assert_eq!(*inner.0.lock().unwrap(), [2]);
        assert_eq!(m.dma_read_bytes.get(), 32);
    }

    #[test]
    fn device_and_function_wrappers_count_both_sides_of_each_access() {
        let dev_m = Arc::new(DeviceMetrics::default());
        let fn_m = Arc::new(DeviceMetrics::default());
        let dm = dev_m.clone();
        let local = LocalFunction::new(1 << 20, move |dma, irq| {
            MeteredDevice::build(dma, irq, dm, |dma, irq| {
                TestDevice::new(dma, irq)
                    .map(|d| Arc::new(d) as Arc<dyn PciDevice>)
                    .map_err(|e| e.to_string())
            })
        })
        .unwrap();
        let f = MeteredFunction::new(Arc::new(local), fn_m.clone());
        let vendor = f.config_read(0, AccessSize::Word).unwrap();
        assert_ne!(vendor, 0xffff);
        f.config_write(4, AccessSize::Word, 0x6).unwrap();
        let mut b = [0u8; 4];
        f.bar_read(BarIndex::ALL[0], 0, &mut b).unwrap();
        f.bar_write(BarIndex::ALL[0], 0, &b).unwrap();
        for m in [&dev_m, &fn_m] {
            assert_eq!(m.config_reads.get(), 1);
            assert_eq!(m.config_writes.get(), 1);
            assert_eq!(m.mmio_reads.get(), 1);
            assert_eq!(m.mmio_writes.get(), 1);
        }
        assert_eq!(fn_m.round_trip.count(), 2, "config read + BAR read");
        assert!(f.config_read(1, AccessSize::Dword).is_err());
        assert_eq!(fn_m.errors.get(), 1);
    }

    /// A metered device passes a nonblocking BAR write to the device (a lender's socket reader
    /// applies CMB writes through it) and counts it as an MMIO write.
    #[test]
    fn a_metered_device_passes_nonblocking_writes_to_the_device() {
        let dev = Arc::new(DirectStandIn::default());
        let d = dev.clone();
        let m = Arc::new(DeviceMetrics::default());
        let mm = m.clone();
        let local = LocalFunction::new(1 << 20, move |dma, irq| {
            MeteredDevice::build(dma, irq, mm, |_, _| Ok(d as Arc<dyn PciDevice>))
        })
        .unwrap();
        assert!(local
            .device()
            .bar_write_nonblocking(BarIndex::ALL[2], 0, b"cmb!"));
        assert_eq!(
            dev.nonblocking_writes
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        assert_eq!(m.mmio_writes.get(), 1);
    }

    #[test]
    fn a_metered_device_passes_direct_dma_mappings_to_the_device() {
        let dev = Arc::new(DirectStandIn::default());
        let d = dev.clone();
        let m = Arc::new(DeviceMetrics::default());
        let local = LocalFunction::new(1 << 20, move |dma, irq| {
            MeteredDevice::build(dma, irq, m, |_, _| Ok(d as Arc<dyn PciDevice>))
        })
        .unwrap();
        assert!(local.device().needs_direct_dma());
        // The binding maps its DMA pool into the device through the wrapper.
        let maps = dev.maps.lock().unwrap().clone();
        assert_eq!(
            maps.len(),
            1,
            "the binding's DMA pool reached the device: {maps:?}"
        );
        let (iova, len, _) = maps[0];
        local.device().dma_unmap(iova, len).unwrap();
        assert!(
            dev.maps.lock().unwrap().is_empty(),
            "the unmap reached it too"
        );
    }
}
