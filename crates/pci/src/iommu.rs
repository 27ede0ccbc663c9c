//! An IOMMU-like translation from a device's bus addresses onto the memory it was granted.
//!
//! Each mapping covers `[iova, iova + len)` and resolves either to a [`MemSpan`] (memory this
//! process has mapped: loads and stores go straight to it) or to a [`RemoteMemory`] (memory
//! reached by messages, e.g. across a message-based fabric). A DMA is checked over its whole
//! range before a single byte moves: an access that reaches unmapped space or writes a
//! read-only mapping fails and touches nothing. Accesses may span adjacent mappings; they are
//! split at the boundaries.
//!
//! Locking: one reader-writer lock. DMA holds it shared for the whole access, so once
//! [`Iommu::unmap`] returns no DMA through the removed mapping is still in flight (spans handed
//! out earlier by [`DmaPort::dma_span`] stay valid memory but are the caller's responsibility).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use devlend_memory::{BusAddr, ByteRange, MemSpan};

use crate::{DmaAccess, DmaError, DmaPort, DmaRemap, DmaSpanResult, FunctionError};

/// Memory a device may reach that is not mapped into this process: every access is a
/// (fallible) transfer, e.g. a request across a message-based NTB fabric.
pub trait RemoteMemory: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;
    /// Whether the memory is empty (never usable as a mapping).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Copies `buf.len()` bytes at `offset` into `buf`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError>;
    /// Several reads, all issued before the first answer is awaited where the memory allows
    /// it (see [`DmaPort::dma_read_many`]). The default reads one after the other.
    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), DmaError> {
        for (offset, buf) in reads.iter_mut() {
            self.read(*offset, buf)?;
        }
        Ok(())
    }
    /// Copies `data` to `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError>;
}

/// What a mapping resolves to.
#[derive(Clone)]
pub enum DmaTarget {
    /// Memory mapped into this process.
    Direct(MemSpan),
    /// Memory reached by transfers.
    Remote(Arc<dyn RemoteMemory>),
}

impl std::fmt::Debug for DmaTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Direct(span) => write!(f, "Direct({:#x} bytes)", span.len()),
            Self::Remote(mem) => write!(f, "Remote({:#x} bytes)", mem.len()),
        }
    }
}

impl DmaTarget {
    /// Size in bytes.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        match self {
            Self::Direct(span) => span.len(),
            Self::Remote(mem) => mem.len(),
        }
    }
}

/// Why a map or unmap was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IommuError {
    /// The range is empty or runs past the top of the address space.
    #[error("range of {len:#x} bytes at {iova} is empty or overflows")]
    BadRange {
        /// Start.
        iova: BusAddr,
        /// Length.
        len: u64,
    },
    /// The mapping would overlap an existing one.
    #[error("mapping {new} overlaps existing mapping {existing}")]
    Overlap {
        /// The mapping asked for.
        new: ByteRange,
        /// The mapping in the way.
        existing: ByteRange,
    },
    /// An unmap would cut an existing mapping in two.
    #[error("unmapping {range} would split mapping {mapping}")]
    PartialUnmap {
        /// The range asked to unmap.
        range: ByteRange,
        /// The mapping it cuts.
        mapping: ByteRange,
    },
}

#[derive(Clone, Debug)]
struct Mapping {
    range: ByteRange,
    target: DmaTarget,
    writable: bool,
}

/// A mapping as listed by [`Iommu::mappings`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MappingInfo {
    /// Bus addresses covered.
    pub range: ByteRange,
    /// Whether the device may write.
    pub writable: bool,
    /// Whether it is directly mapped memory (as opposed to [`RemoteMemory`]).
    pub direct: bool,
}

/// The translation table of one device.
#[derive(Debug, Default)]
pub struct Iommu {
    maps: RwLock<BTreeMap<u64, Mapping>>,
}

impl Iommu {
    /// An empty table: every DMA fails until something is mapped.
    pub fn new() -> Self {
        Self::default()
    }

    fn read_maps(&self) -> RwLockReadGuard<'_, BTreeMap<u64, Mapping>> {
        // The map is only changed by whole-value inserts and removes: never inconsistent.
        devlend_sync::read(&self.maps)
    }

    fn write_maps(&self) -> RwLockWriteGuard<'_, BTreeMap<u64, Mapping>> {
        devlend_sync::write(&self.maps)
    }

    /// Makes `target` reachable at `[iova, iova + target.len())`, read-only unless `writable`.
    pub fn map(&self, iova: BusAddr, target: DmaTarget, writable: bool) -> Result<(), IommuError> {
        let len = target.len();
        let range =
            ByteRange::new(iova.raw(), len).map_err(|_| IommuError::BadRange { iova, len })?;
        let mut maps = self.write_maps();
        // Mappings are disjoint and sorted: if the last one starting at or before our last
        // byte ends before our first, so do all before it.
        if let Some((_, m)) = maps.range(..=range.end_inclusive()).next_back() {
            if m.range.overlaps(&range) {
                return Err(IommuError::Overlap {
                    new: range,
                    existing: m.range,
                });
            }
        }
        maps.insert(
            range.start(),
            Mapping {
                range,
                target,
                writable,
            },
        );
        Ok(())
    }

    /// Removes every mapping inside `[iova, iova + len)` and returns how many bytes they
    /// covered. A mapping only partly inside is an error, and then nothing is removed.
    pub fn unmap(&self, iova: BusAddr, len: u64) -> Result<u64, IommuError> {
        let range =
            ByteRange::new(iova.raw(), len).map_err(|_| IommuError::BadRange { iova, len })?;
        let mut maps = self.write_maps();
        let mut doomed = Vec::new();
        for (&start, m) in maps.range(..=range.end_inclusive()).rev() {
            if !m.range.overlaps(&range) {
                break;
            }
            if !range.contains_range(m.range.start(), m.range.len()) {
                return Err(IommuError::PartialUnmap {
                    range,
                    mapping: m.range,
                });
            }
            doomed.push(start);
        }
        let mut removed = 0u64;
        for start in doomed {
            if let Some(m) = maps.remove(&start) {
                removed = removed.saturating_add(m.range.len());
            }
        }
        Ok(removed)
    }

    /// Removes every mapping.
    pub fn clear(&self) {
        self.write_maps().clear();
    }

    /// The current mappings, lowest address first.
    pub fn mappings(&self) -> Vec<MappingInfo> {
        self.read_maps()
            .values()
            .map(|m| MappingInfo {
                range: m.range,
                writable: m.writable,
                direct: matches!(m.target, DmaTarget::Direct(_)),
            })
            .collect()
    }
}

/// Walks `[addr, addr + len)` mapping by mapping, calling `f(mapping, offset in mapping,
/// offset in the access, chunk length)`; fails on the first gap or forbidden write.
fn walk<'m>(
    maps: &'m BTreeMap<u64, Mapping>,
    addr: BusAddr,
    len: u64,
    access: DmaAccess,
    mut f: impl FnMut(&'m Mapping, u64, usize, usize) -> Result<(), DmaError>,
) -> Result<(), DmaError> {
    let unmapped = DmaError::Unmapped { addr, len };
    if ByteRange::new(addr.raw(), len).is_err() {
        return Err(unmapped);
    }
    let mut done = 0u64;
    while done < len {
        // `addr + len - 1` does not overflow (checked above), so neither does this.
        let cur = addr.raw() + done;
        let Some((_, m)) = maps.range(..=cur).next_back() else {
            return Err(unmapped);
        };
        let Some(offset) = m.range.offset_of(cur, 1) else {
            return Err(unmapped);
        };
        if access == DmaAccess::Write && !m.writable {
            return Err(DmaError::Permission {
                addr: BusAddr(cur),
                access: "write",
            });
        }
        let chunk = (m.range.len() - offset).min(len - done);
        f(m, offset, done as usize, chunk as usize)?;
        done += chunk;
    }
    Ok(())
}

/// Reads gathered for one remote memory: (offset in it, buffer).
type RemoteReads<'m, 'b> = (&'m Arc<dyn RemoteMemory>, Vec<(u64, &'b mut [u8])>);

fn path_bug() -> DmaError {
    DmaError::Path("internal: DMA chunk outside its buffer".into())
}

impl DmaPort for Iommu {
    fn dma_read(&self, addr: BusAddr, buf: &mut [u8]) -> Result<(), DmaError> {
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len() as u64;
        let maps = self.read_maps();
        walk(&maps, addr, len, DmaAccess::Read, |_, _, _, _| Ok(()))?;
        walk(&maps, addr, len, DmaAccess::Read, |m, offset, at, n| {
            let dst = buf.get_mut(at..at + n).ok_or_else(path_bug)?;
            match &m.target {
                DmaTarget::Direct(span) => Ok(span.read_at(offset, dst)?),
                DmaTarget::Remote(mem) => mem.read(offset, dst),
            }
        })
    }

    fn dma_read_many(&self, reads: &mut [(BusAddr, &mut [u8])]) -> Result<(), DmaError> {
        let maps = self.read_maps();
        for (addr, buf) in reads.iter() {
            if !buf.is_empty() {
                walk(
                    &maps,
                    *addr,
                    buf.len() as u64,
                    DmaAccess::Read,
                    |_, _, _, _| Ok(()),
                )?;
            }
        }
        // Every read is allowed: pieces in mapped memory are copied now, the others are
        // gathered by the memory they reach and read there together.
        let mut remote: Vec<RemoteReads<'_, '_>> = Vec::new();
        for (addr, buf) in reads.iter_mut() {
            let len = buf.len() as u64;
            let mut rest: &mut [u8] = buf;
            walk(&maps, *addr, len, DmaAccess::Read, |m, offset, _, n| {
                let (piece, tail) = std::mem::take(&mut rest)
                    .split_at_mut_checked(n)
                    .ok_or_else(path_bug)?;
                rest = tail;
                match &m.target {
                    DmaTarget::Direct(span) => Ok(span.read_at(offset, piece)?),
                    DmaTarget::Remote(mem) => {
                        match remote.iter_mut().find(|(r, _)| Arc::ptr_eq(r, mem)) {
                            Some((_, list)) => list.push((offset, piece)),
                            None => remote.push((mem, vec![(offset, piece)])),
                        }
                        Ok(())
                    }
                }
            })?;
        }
        for (mem, list) in remote.iter_mut() {
            mem.read_many(list)?;
        }
        Ok(())
    }

    fn dma_write(&self, addr: BusAddr, data: &[u8]) -> Result<(), DmaError> {
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len() as u64;
        let maps = self.read_maps();
        walk(&maps, addr, len, DmaAccess::Write, |_, _, _, _| Ok(()))?;
        walk(&maps, addr, len, DmaAccess::Write, |m, offset, at, n| {
            let src = data.get(at..at + n).ok_or_else(path_bug)?;
            match &m.target {
                DmaTarget::Direct(span) => Ok(span.write_at(offset, src)?),
                DmaTarget::Remote(mem) => mem.write(offset, src),
            }
        })
    }

    fn dma_span(&self, addr: BusAddr, len: u64, access: DmaAccess) -> DmaSpanResult {
        if len == 0 {
            return Ok(None);
        }
        let maps = self.read_maps();
        let mut pieces = 0usize;
        let mut found = None;
        walk(&maps, addr, len, access, |m, offset, _, _| {
            pieces += 1;
            found = Some((m, offset));
            Ok(())
        })?;
        match found {
            Some((m, offset)) if pieces == 1 => match &m.target {
                DmaTarget::Direct(span) => Ok(Some(span.subspan(offset, len)?)),
                DmaTarget::Remote(_) => Ok(None),
            },
            _ => Ok(None),
        }
    }
}

impl DmaRemap for Iommu {
    fn dma_map(&self, iova: BusAddr, mem: MemSpan, writable: bool) -> Result<(), FunctionError> {
        Ok(self.map(iova, DmaTarget::Direct(mem), writable)?)
    }

    fn dma_unmap(&self, iova: BusAddr, len: u64) -> Result<(), FunctionError> {
        self.unmap(iova, len)?;
        Ok(())
    }
}

#[cfg(test)]
#[path = "tests/iommu.rs"]
mod tests;
