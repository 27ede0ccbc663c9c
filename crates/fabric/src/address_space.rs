//! A host's physical address space as the NTB sees it: RAM regions and MMIO regions.

use std::sync::{Arc, RwLock};

use devlend_memory::{BusAddr, ByteRange, MemSpan, SharedMemory};

use crate::{FabricError, Result};

/// Receives the transactions that reach an MMIO region through a window: posted writes and
/// non-posted reads, in the order the peer issued them. Offsets are relative to the region.
///
/// A device answers a bad access the way PCIe does (reads return all-ones, writes are
/// dropped), so these calls cannot fail.
pub trait MmioHandler: Send + Sync {
    /// A non-posted read; fill `data` (1 to 64 bytes; 8 or fewer in practice).
    fn mmio_read(&self, offset: u64, data: &mut [u8]);
    /// A posted write.
    fn mmio_write(&self, offset: u64, data: &[u8]);
    /// A posted write offered by a thread that must not block (a fabric's socket reader, so
    /// that a doorbell reaches the device without a hop through another thread): applies it
    /// and returns `true` only when that cannot block (a store into doorbell-style memory and
    /// a wake-up); returns `false`, having done nothing, when it must go to
    /// [`MmioHandler::mmio_write`] instead. The default takes nothing.
    fn mmio_write_nonblocking(&self, offset: u64, data: &[u8]) -> bool {
        let _ = (offset, data);
        false
    }
}

/// What a region holds.
#[derive(Clone)]
pub enum RegionKind {
    /// RAM, backed by shareable memory.
    Ram(Arc<SharedMemory>),
    /// Device registers.
    Mmio(Arc<dyn MmioHandler>),
}

impl std::fmt::Debug for RegionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegionKind::Ram(m) => write!(f, "Ram({} bytes)", m.len()),
            RegionKind::Mmio(_) => f.write_str("Mmio"),
        }
    }
}

/// One region of the address space.
#[derive(Clone, Debug)]
pub struct Region {
    /// Bus addresses covered.
    pub range: ByteRange,
    /// What is there.
    pub kind: RegionKind,
}

/// What a translated bus range resolves to.
#[derive(Clone)]
pub enum Resolved {
    /// RAM: the exact span.
    Ram(MemSpan),
    /// MMIO: the handler and the offset of the range's start inside the region.
    Mmio(Arc<dyn MmioHandler>, u64),
}

/// A host's physical address space. Regions never overlap; they can be added and removed
/// while the link runs (a lender adds BARs as it exports devices).
#[derive(Default)]
pub struct AddressSpace {
    regions: RwLock<Vec<Region>>,
}

impl AddressSpace {
    /// An empty address space.
    pub fn new() -> Self {
        Self::default()
    }

    fn insert(&self, range: ByteRange, kind: RegionKind) -> Result<()> {
        let mut regions = devlend_sync::write(&self.regions);
        if regions.iter().any(|r| r.range.overlaps(&range)) {
            return Err(FabricError::RegionOverlap {
                addr: BusAddr(range.start()),
                len: range.len(),
            });
        }
        regions.push(Region { range, kind });
        Ok(())
    }

    /// Adds RAM at `base`, as large as `mem`.
    pub fn add_ram(&self, base: BusAddr, mem: Arc<SharedMemory>) -> Result<()> {
        let range =
            ByteRange::new(base.0, mem.len() as u64).map_err(|_| FabricError::NoRegion {
                addr: base,
                len: mem.len() as u64,
            })?;
        self.insert(range, RegionKind::Ram(mem))
    }

    /// Adds an MMIO region of `len` bytes at `base`.
    pub fn add_mmio(&self, base: BusAddr, len: u64, handler: Arc<dyn MmioHandler>) -> Result<()> {
        let range =
            ByteRange::new(base.0, len).map_err(|_| FabricError::NoRegion { addr: base, len })?;
        self.insert(range, RegionKind::Mmio(handler))
    }

    /// Removes the region that starts at `base`; returns whether one was there.
    pub fn remove(&self, base: BusAddr) -> bool {
        let mut regions = devlend_sync::write(&self.regions);
        let before = regions.len();
        regions.retain(|r| r.range.start() != base.0);
        regions.len() != before
    }

    /// The region holding all of `[addr, addr + len)`, if one does.
    pub fn find(&self, addr: BusAddr, len: u64) -> Option<Region> {
        let regions = devlend_sync::read(&self.regions);
        regions
            .iter()
            .find(|r| r.range.contains_range(addr.0, len))
            .cloned()
    }

    /// Resolves `[addr, addr + len)`, which must lie inside one region.
    pub fn resolve(&self, addr: BusAddr, len: u64) -> Result<Resolved> {
        let region = self
            .find(addr, len)
            .ok_or(FabricError::NoRegion { addr, len })?;
        let offset = addr.0 - region.range.start();
        Ok(match region.kind {
            RegionKind::Ram(mem) => Resolved::Ram(MemSpan::new(mem, offset, len)?),
            RegionKind::Mmio(h) => Resolved::Mmio(h, offset),
        })
    }

    /// A lowest free, `align`-aligned base of `len` bytes at or above `floor`, for callers that
    /// place regions (a borrower's DMA memory, a lender's BARs).
    pub fn free_base(&self, floor: BusAddr, len: u64, align: u64) -> Option<BusAddr> {
        let align = align.max(1).next_power_of_two();
        let regions = devlend_sync::read(&self.regions);
        let mut sorted: Vec<ByteRange> = regions.iter().map(|r| r.range).collect();
        sorted.sort_by_key(|r| r.start());
        let mut candidate = floor.0.checked_add(align - 1)? & !(align - 1);
        for r in sorted {
            let want = ByteRange::new(candidate, len).ok()?;
            if want.overlaps(&r) {
                candidate =
                    r.end_inclusive().checked_add(1)?.checked_add(align - 1)? & !(align - 1);
            }
        }
        ByteRange::new(candidate, len)
            .ok()
            .map(|r| BusAddr(r.start()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nop;
    impl MmioHandler for Nop {
        fn mmio_read(&self, _: u64, data: &mut [u8]) {
            data.fill(0xff)
        }
        fn mmio_write(&self, _: u64, _: &[u8]) {}
    }

    #[test]
    fn regions_do_not_overlap_and_resolve() {
        let asp = AddressSpace::new();
        let ram = Arc::new(SharedMemory::new("ram", 0x2000).unwrap());
        asp.add_ram(BusAddr(0x10000), ram).unwrap();
        assert!(matches!(
            asp.add_mmio(BusAddr(0x11000), 0x1000, Arc::new(Nop)),
            Err(FabricError::RegionOverlap { .. })
        ));
        asp.add_mmio(BusAddr(0x12000), 0x1000, Arc::new(Nop))
            .unwrap();
        assert!(matches!(
            asp.resolve(BusAddr(0x11ff0), 0x20),
            Err(FabricError::NoRegion { .. })
        ));
        match asp.resolve(BusAddr(0x11000), 0x1000).unwrap() {
            Resolved::Ram(span) => assert_eq!(span.len(), 0x1000),
            Resolved::Mmio(..) => panic!("expected RAM"),
        }
        assert!(matches!(
            asp.resolve(BusAddr(0x12010), 4).unwrap(),
            Resolved::Mmio(_, 0x10)
        ));
        assert_eq!(
            asp.free_base(BusAddr(0x10000), 0x1000, 0x1000),
            Some(BusAddr(0x13000))
        );
        assert!(asp.remove(BusAddr(0x12000)));
        assert_eq!(
            asp.free_base(BusAddr(0x10000), 0x1000, 0x1000),
            Some(BusAddr(0x12000))
        );
        assert_eq!(asp.free_base(BusAddr(u64::MAX - 10), 0x1000, 0x1000), None);
    }
}
