//! The backend against a mock kernel: layout, config virtualisation, MSI-X routing and masks,
//! BAR access, DMA mapping bookkeeping, reset.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devlend_memory::{MemSpan, SharedMemory};
use devlend_pci::{AccessSize, BarIndex, BusAddr, InterruptSink, PciDevice};
use vfio_bindings::bindings::vfio::{VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE};
use vmm_sys_util::eventfd::EventFd;

use super::{VfioFunction, MAX_VECTORS};
use crate::hw::{BarMapping, RegionInfo, VfioHw};
use crate::VfioError;

const RW: u32 = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
const MSIX_CAP: usize = 0x50;
/// What the mock device declares: more than a function presents.
const DEVICE_VECTORS: u16 = 65;

#[derive(Default)]
struct Calls {
    msix: Vec<usize>,
    fds: Vec<EventFd>,
    /// `set_msix_vector` calls: vector and the descriptor number it was pointed at.
    vector_fds: Vec<(u32, i32)>,
    /// The descriptor numbers of the last `set_msix` call.
    own_raw: Vec<i32>,
    maps: Vec<(u64, u64, bool)>,
    unmaps: Vec<(u64, u64)>,
    resets: usize,
}

/// A function with a 16 KiB 64-bit BAR0 (registers; MSI-X table at 0x2000, PBA at 0x3000),
/// nothing else.
struct MockHw {
    config: Mutex<[u8; 256]>,
    bar0: Mutex<Vec<u8>>,
    calls: Mutex<Calls>,
    reset_fails: bool,
    /// When set, BAR0 may be mapped and this memfd stands for it in `region_fd` (another
    /// process's view of the BAR).
    export: Option<Arc<SharedMemory>>,
}

impl MockHw {
    fn new(reset_fails: bool) -> Arc<Self> {
        let mut c = [0u8; 256];
        c[0..4].copy_from_slice(&0x0010_1b36u32.to_le_bytes());
        c[0x06] = 0x10;
        c[0x10..0x14].copy_from_slice(&0x0000_0004u32.to_le_bytes()); // 64-bit memory BAR
        c[0x34] = MSIX_CAP as u8;
        c[MSIX_CAP] = 0x11;
        c[MSIX_CAP + 2..MSIX_CAP + 4].copy_from_slice(&(DEVICE_VECTORS - 1).to_le_bytes());
        c[MSIX_CAP + 4..MSIX_CAP + 8].copy_from_slice(&0x2000u32.to_le_bytes());
        c[MSIX_CAP + 8..MSIX_CAP + 12].copy_from_slice(&0x3000u32.to_le_bytes());
        Arc::new(Self {
            config: Mutex::new(c),
            bar0: Mutex::new(vec![0; 0x4000]),
            calls: Mutex::default(),
            reset_fails,
            export: None,
        })
    }

    fn calls(&self) -> std::sync::MutexGuard<'_, Calls> {
        self.calls.lock().unwrap()
    }
}

fn range(len: usize, offset: u64, n: usize) -> Result<std::ops::Range<usize>, VfioError> {
    let s = usize::try_from(offset).unwrap();
    if s + n > len {
        return Err(VfioError::NoRegion(99));
    }
    Ok(s..s + n)
}

impl VfioHw for MockHw {
    fn region(&self, index: u32) -> Option<RegionInfo> {
        let size = match index {
            0 => 0x4000,
            7 => 256,
            _ => return None,
        };
        let mmap = if index == 0 && self.export.is_some() {
            vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_MMAP
        } else {
            0
        };
        Some(RegionInfo {
            size,
            flags: RW | mmap,
            sparse: None,
        })
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), VfioError> {
        match index {
            0 => {
                let b = self.bar0.lock().unwrap();
                buf.copy_from_slice(&b[range(b.len(), offset, buf.len())?]);
            }
            7 => {
                let c = self.config.lock().unwrap();
                buf.copy_from_slice(&c[range(256, offset, buf.len())?]);
            }
            i => return Err(VfioError::NoRegion(i)),
        }
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioError> {
        match index {
            0 => {
                let mut b = self.bar0.lock().unwrap();
                let r = range(b.len(), offset, data.len())?;
                b[r].copy_from_slice(data);
            }
            7 => {
                let mut c = self.config.lock().unwrap();
                c[range(256, offset, data.len())?].copy_from_slice(data);
            }
            i => return Err(VfioError::NoRegion(i)),
        }
        Ok(())
    }

    fn region_mmap(&self, _: u32, _: u64, _: u64) -> Result<Option<BarMapping>, VfioError> {
        Ok(None)
    }

    fn region_fd(
        &self,
        index: u32,
        offset: u64,
        len: u64,
    ) -> Result<Option<(std::os::fd::OwnedFd, u64)>, VfioError> {
        let Some(mem) = self.export.as_ref().filter(|_| index == 0) else {
            return Ok(None);
        };
        range(mem.len(), offset, len as usize)?;
        Ok(Some((mem.fd().try_clone_to_owned().unwrap(), offset)))
    }

    fn msix_count(&self) -> u32 {
        u32::from(DEVICE_VECTORS)
    }

    fn set_msix(&self, fds: &[&EventFd]) -> Result<(), VfioError> {
        let mut c = self.calls();
        c.msix.push(fds.len());
        c.fds = fds.iter().map(|f| f.try_clone().unwrap()).collect();
        c.own_raw = fds
            .iter()
            .map(|f| std::os::fd::AsRawFd::as_raw_fd(*f))
            .collect();
        Ok(())
    }

    fn set_msix_vector(&self, vector: u32, fd: &EventFd) -> Result<(), VfioError> {
        use std::os::fd::AsRawFd;
        let mut c = self.calls();
        assert!(
            !c.msix.is_empty() && c.msix.last() != Some(&0),
            "a vector is retargeted only while MSI-X is enabled"
        );
        c.vector_fds.push((vector, fd.as_raw_fd()));
        Ok(())
    }

    unsafe fn dma_map(&self, iova: u64, len: u64, _: *mut u8, w: bool) -> Result<(), VfioError> {
        self.calls().maps.push((iova, len, w));
        Ok(())
    }

    fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), VfioError> {
        self.calls().unmaps.push((iova, len));
        Ok(())
    }

    fn reset(&self) -> Result<(), VfioError> {
        self.calls().resets += 1;
        if self.reset_fails {
            return Err(VfioError::Reset("mock: no reset method".into()));
        }
        Ok(())
    }
}

struct ChannelSink(Mutex<mpsc::Sender<u16>>);

impl InterruptSink for ChannelSink {
    fn signal(&self, vector: u16) {
        let _ = self.0.lock().unwrap().send(vector);
    }
}

fn function(reset_fails: bool) -> (Arc<MockHw>, VfioFunction, mpsc::Receiver<u16>) {
    let hw = MockHw::new(reset_fails);
    let (tx, rx) = mpsc::channel();
    let f = VfioFunction::new(hw.clone(), Arc::new(ChannelSink(Mutex::new(tx)))).unwrap();
    (hw, f, rx)
}

const BAR0: BarIndex = BarIndex::ALL[0];

fn entry_write(f: &VfioFunction, vector: u64, control: u32) {
    let e = 0x2000 + vector * 16;
    f.bar_write(BAR0, e, &0xfee0_0000u32.to_le_bytes());
    f.bar_write(BAR0, e + 8, &(vector as u32).to_le_bytes());
    f.bar_write(BAR0, e + 12, &control.to_le_bytes());
}

#[test]
fn layout_from_config_and_regions() {
    let (_hw, f, _rx) = function(false);
    let spec = f.bar_spec(BAR0).unwrap();
    assert_eq!(
        (spec.size, spec.is_64bit, spec.prefetchable),
        (0x4000, true, false)
    );
    assert!(f.bar_spec(BarIndex::ALL[1]).is_none(), "upper half of BAR0");
    assert_eq!(f.msix_vectors(), MAX_VECTORS, "65 vectors presented as 16");
    assert_eq!(
        f.config_read(MSIX_CAP as u16 + 2, AccessSize::Word) & 0x7ff,
        u32::from(MAX_VECTORS - 1),
        "Table Size as the driver reads it"
    );
    assert_eq!(
        f.config_read(MSIX_CAP as u16, AccessSize::Dword),
        (u32::from(MAX_VECTORS - 1) << 16) | 0x11
    );
    assert_eq!(f.kind(), "vfio");
    assert!(f.needs_direct_dma());
    assert_eq!(f.config_read(0, AccessSize::Dword), 0x0010_1b36);
    assert_eq!(
        f.config_read(0x100, AccessSize::Dword),
        0xffff_ffff,
        "beyond the region"
    );
}

#[test]
fn msix_control_is_virtual_and_routes_vectors_through_vfio() {
    let (hw, f, rx) = function(false);
    let ctl = MSIX_CAP as u16 + 2;
    assert_eq!(f.config_read(ctl, AccessSize::Word) & 0xc000, 0);
    assert!(hw.calls().msix.is_empty());
    // Enable with the function masked, as a driver does while it programs the table.
    f.config_write(ctl, AccessSize::Word, 0xc000);
    assert_eq!(
        hw.calls().msix,
        vec![MAX_VECTORS as usize],
        "every vector gets an eventfd"
    );
    assert_eq!(f.routed_vectors(), MAX_VECTORS as usize);
    assert_eq!(f.config_read(ctl, AccessSize::Word) & 0xc000, 0xc000);
    assert_eq!(
        hw.config.lock().unwrap()[MSIX_CAP + 3] & 0xc0,
        0,
        "the kernel's MSI-X bits are left alone"
    );
    entry_write(&f, 1, 0);
    entry_write(&f, 2, 1); // masked
    f.config_write(ctl + 1, AccessSize::Byte, 0x80); // function mask off, byte access
    assert_eq!(f.config_read(ctl, AccessSize::Word) & 0xc000, 0x8000);

    // Vector 2 is masked: its message waits in the PBA.
    hw.calls().fds[2].write(1).unwrap();
    let pba = |f: &VfioFunction| {
        let mut b = [0u8; 8];
        f.bar_read(BAR0, 0x3000, &mut b);
        u64::from_le_bytes(b)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pba(&f) & 0b100 == 0 {
        assert!(
            Instant::now() < deadline,
            "the masked vector never became pending"
        );
        std::thread::yield_now();
    }
    assert!(
        rx.try_recv().is_err(),
        "a masked vector must not be delivered"
    );
    // Vector 1 is live.
    hw.calls().fds[1].write(1).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(1));
    // Unmasking vector 2 sends its pending message.
    f.bar_write(BAR0, 0x2000 + 2 * 16 + 12, &0u32.to_le_bytes());
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(2));
    assert_eq!(pba(&f), 0);
    // The table lives here, not in the device's BAR.
    assert!(hw.bar0.lock().unwrap()[0x2000..0x3008]
        .iter()
        .all(|b| *b == 0));

    // Disable: VFIO's MSI-X is turned off, the thread stops.
    f.config_write(ctl, AccessSize::Word, 0);
    assert_eq!(hw.calls().msix, vec![MAX_VECTORS as usize, 0]);
    assert_eq!(f.routed_vectors(), 0);
}

#[test]
fn bar_and_config_accesses_reach_the_regions() {
    let (hw, f, _rx) = function(false);
    f.bar_write(BAR0, 0x14, &0x0046_0001u32.to_le_bytes());
    assert_eq!(
        &hw.bar0.lock().unwrap()[0x14..0x18],
        &0x0046_0001u32.to_le_bytes()
    );
    hw.bar0.lock().unwrap()[0x1c] = 1;
    let mut b = [0u8; 4];
    f.bar_read(BAR0, 0x1c, &mut b);
    assert_eq!(u32::from_le_bytes(b), 1);
    // Outside the BAR: all-ones, nothing written.
    let mut b = [0u8; 4];
    f.bar_read(BAR0, 0x4000, &mut b);
    assert_eq!(b, [0xff; 4]);
    f.bar_write(BarIndex::ALL[2], 0, &[1, 2, 3, 4]);
    // Command register writes go to the kernel's config region.
    f.config_write(0x04, AccessSize::Word, 0x0006);
    assert_eq!(hw.config.lock().unwrap()[4], 6);
}

#[test]
fn dma_grants_become_iommu_mappings_and_are_unmapped() {
    let (hw, f, _rx) = function(false);
    let mem = MemSpan::whole(Arc::new(SharedMemory::new("t", 0x4000).unwrap()));
    f.dma_map(BusAddr(0x4000_0000_0000), &mem, true).unwrap();
    let ro = mem.subspan(0, 0x1000).unwrap();
    f.dma_map(BusAddr(0x4000_1000_0000), &ro, false).unwrap();
    assert!(
        f.dma_map(BusAddr(0x4000_0000_2000), &ro, true).is_err(),
        "overlap"
    );
    let odd = mem.subspan(0, 0x800).unwrap();
    assert!(
        f.dma_map(BusAddr(0x5000_0000_0000), &odd, true).is_err(),
        "partial page"
    );
    assert_eq!(
        hw.calls().maps,
        vec![
            (0x4000_0000_0000, 0x4000, true),
            (0x4000_1000_0000, 0x1000, false)
        ]
    );
    f.dma_unmap(BusAddr(0x4000_0000_0000), 0x4000).unwrap();
    assert_eq!(hw.calls().unmaps, vec![(0x4000_0000_0000, 0x4000)]);
    assert_eq!(f.dma_ranges(), vec![(0x4000_1000_0000, 0x1000)]);
    drop(f);
    assert_eq!(
        hw.calls().unmaps,
        vec![(0x4000_0000_0000, 0x4000), (0x4000_1000_0000, 0x1000)],
        "what is left is unmapped when the function goes"
    );
}

#[test]
fn reset_turns_msix_off_and_reports_failure() {
    let (hw, f, _rx) = function(false);
    f.config_write(MSIX_CAP as u16 + 2, AccessSize::Word, 0x8000);
    f.try_reset().unwrap();
    assert_eq!(hw.calls().resets, 1);
    assert_eq!(hw.calls().msix, vec![MAX_VECTORS as usize, 0]);
    assert_eq!(
        f.config_read(MSIX_CAP as u16 + 2, AccessSize::Word) & 0xc000,
        0
    );
    let (hw, f, _rx) = function(true);
    let e = f.try_reset().unwrap_err().to_string();
    assert!(e.contains("cannot be reset"), "{e}");
    assert_eq!(hw.calls().resets, 1);
}

#[test]
fn mappable_bar_parts_are_exported_as_registers_without_the_msix_pages() {
    // Without a descriptor for other processes, nothing is exported.
    let (_hw, f, _rx) = function(false);
    assert!(f.bar_memory(BAR0).is_empty());

    let bar = Arc::new(SharedMemory::new("bar0", 0x4000).unwrap());
    let mut hw = MockHw::new(false);
    Arc::get_mut(&mut hw).unwrap().export = Some(bar.clone());
    let (tx, _rx) = mpsc::channel();
    let f = VfioFunction::new(hw.clone(), Arc::new(ChannelSink(Mutex::new(tx)))).unwrap();
    let areas = f.bar_memory(BAR0);
    // The registers and doorbells (0..0x2000); the MSI-X table (0x2000) and PBA (0x3000)
    // pages stay with the emulated table.
    let spans: Vec<(u64, u64)> = areas.iter().map(|a| (a.offset, a.mem.len())).collect();
    assert_eq!(spans, vec![(0, 0x2000)]);
    assert!(areas
        .iter()
        .all(|a| a.is_registers() && a.mem.memory().0.is_device()));
    // A store through the area is a store into the BAR (here: the memfd standing for it).
    areas[0]
        .write_and_wake(0x1008, &7u32.to_le_bytes())
        .unwrap();
    assert_eq!(bar.load_u32(0x1008).unwrap(), 7);
}

fn holder_fds() -> Vec<Arc<EventFd>> {
    (0..MAX_VECTORS)
        .map(|_| Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap()))
        .collect()
}

fn raw(fd: &EventFd) -> i32 {
    std::os::fd::AsRawFd::as_raw_fd(fd)
}

/// Waits until `fd` is signalled (bounded), returning its count.
fn signalled(fd: &EventFd) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match fd.read() {
            Ok(n) => return n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(Instant::now() < deadline, "the eventfd was never signalled");
                std::thread::yield_now();
            }
            Err(e) => panic!("{e}"),
        }
    }
}

fn pba(f: &VfioFunction) -> u64 {
    let mut b = [0u8; 8];
    f.bar_read(BAR0, 0x3000, &mut b);
    u64::from_le_bytes(b)
}

fn wait_pending(f: &VfioFunction, vector: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pba(f) & (1 << vector) == 0 {
        assert!(Instant::now() < deadline, "vector {vector} never pending");
        std::thread::yield_now();
    }
}

#[test]
fn holder_fds_take_deliverable_vectors_and_masks_take_them_back() {
    let (hw, f, rx) = function(false);
    let ctl = MSIX_CAP as u16 + 2;
    let fds = holder_fds();
    f.config_write(ctl, AccessSize::Word, 0xc000); // enabled, function masked
    assert!(f.set_interrupt_fds(Some(&fds)));
    assert!(hw.calls().vector_fds.is_empty(), "function masked");
    entry_write(&f, 1, 0);
    entry_write(&f, 2, 1); // masked
    assert!(hw.calls().vector_fds.is_empty(), "function still masked");
    f.config_write(ctl + 1, AccessSize::Byte, 0x80); // function mask off
    assert_eq!(hw.calls().vector_fds, vec![(1, raw(&fds[1]))]);
    assert_eq!(f.direct_vectors(), vec![1]);
    let own = hw.calls().own_raw.clone();

    // Vector 2 is masked: VFIO still signals this side, the message waits in the PBA.
    hw.calls().fds[2].write(1).unwrap();
    wait_pending(&f, 2);
    assert!(fds[2].read().is_err(), "a masked vector reached the holder");
    // Unmasking it retargets it and signals the pending message on the holder's eventfd.
    f.bar_write(BAR0, 0x2000 + 2 * 16 + 12, &0u32.to_le_bytes());
    assert_eq!(signalled(&fds[2]), 1);
    assert_eq!(pba(&f), 0);
    assert_eq!(hw.calls().vector_fds.last(), Some(&(2, raw(&fds[2]))));
    assert_eq!(f.direct_vectors(), vec![1, 2]);

    // Masking vector 1 points it back here: a message latches its pending bit.
    f.bar_write(BAR0, 0x2000 + 16 + 12, &1u32.to_le_bytes());
    assert_eq!(hw.calls().vector_fds.last(), Some(&(1, own[1])));
    hw.calls().fds[1].write(1).unwrap();
    wait_pending(&f, 1);
    assert!(fds[1].read().is_err());

    // The function mask takes every vector back; clearing it returns the unmasked ones.
    f.config_write(ctl + 1, AccessSize::Byte, 0xc0);
    assert_eq!(hw.calls().vector_fds.last(), Some(&(2, own[2])));
    assert!(f.direct_vectors().is_empty());
    f.config_write(ctl + 1, AccessSize::Byte, 0x80);
    assert_eq!(f.direct_vectors(), vec![2]);
    assert_eq!(pba(&f), 0b10, "vector 1 is still masked and pending");

    // Taking the holder's eventfds away: back here, messages to the sink again.
    assert!(f.set_interrupt_fds(None));
    assert_eq!(hw.calls().vector_fds.last(), Some(&(2, own[2])));
    assert!(f.direct_vectors().is_empty());
    hw.calls().fds[2].write(1).unwrap();
    assert_eq!(rx.recv_timeout(Duration::from_secs(10)), Ok(2));
    assert!(rx.try_recv().is_err());

    // Disable: nothing is retargeted while MSI-X is off (the mock checks it).
    f.config_write(ctl, AccessSize::Word, 0);
    assert!(f.set_interrupt_fds(Some(&fds)));
    assert!(f.direct_vectors().is_empty());
    assert_eq!(hw.calls().msix, vec![MAX_VECTORS as usize, 0]);
}

#[test]
fn the_lease_ending_returns_every_vector_before_the_reset() {
    let (hw, f, _rx) = function(false);
    let ctl = MSIX_CAP as u16 + 2;
    let fds = holder_fds();
    assert!(f.set_interrupt_fds(Some(&fds)));
    f.config_write(ctl, AccessSize::Word, 0xc000);
    for v in 0..3 {
        entry_write(&f, v, 0);
    }
    f.config_write(ctl, AccessSize::Word, 0x8000);
    assert_eq!(
        f.direct_vectors(),
        vec![0, 1, 2],
        "holder's fds before enable"
    );
    // A reset during the lease (the borrower's driver) keeps the holder: MSI-X is off, and
    // the vectors go to the holder again once re-enabled and unmasked.
    f.try_reset().unwrap();
    assert!(f.direct_vectors().is_empty());
    f.config_write(ctl, AccessSize::Word, 0x8000);
    assert!(
        f.direct_vectors().is_empty(),
        "the reset masked every vector"
    );
    entry_write(&f, 0, 0);
    assert_eq!(f.direct_vectors(), vec![0]);
    assert_eq!(hw.calls().vector_fds.last(), Some(&(0, raw(&fds[0]))));
    // The lease ends (given back, or the borrower killed): every vector back here first.
    let own = hw.calls().own_raw.clone();
    assert!(f.set_interrupt_fds(None));
    assert_eq!(hw.calls().vector_fds.last(), Some(&(0, own[0])));
    assert!(f.direct_vectors().is_empty());
    f.try_reset().unwrap();
    assert_eq!(hw.calls().resets, 2);
    // Lent again: MSI-X and masks from scratch, no stale holder.
    f.config_write(ctl, AccessSize::Word, 0x8000);
    entry_write(&f, 0, 0);
    assert!(f.direct_vectors().is_empty());
    drop(fds);
}
