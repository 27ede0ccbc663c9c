//! Which bus addresses are mapped in the device's IOMMU, onto which memory.

use std::collections::BTreeMap;

use devlend_memory::MemSpan;

use crate::layout::PAGE;
use crate::VfioError;

/// The device's IOMMU mappings as made through `VFIO_IOMMU_MAP_DMA`: each keeps the memory it
/// maps alive (the kernel has pinned it) until it is unmapped.
#[derive(Debug, Default)]
pub struct DmaMaps {
    maps: BTreeMap<u64, (u64, MemSpan)>,
}

impl DmaMaps {
    /// Checks that `[iova, iova + len)` may be mapped: non-empty, page-aligned (the IOMMU's
    /// granule), not wrapping, and overlapping no existing mapping.
    pub fn check_new(&self, iova: u64, len: u64) -> Result<(), VfioError> {
        let bad = |why| VfioError::BadDma { iova, len, why };
        if len == 0 {
            return Err(bad("empty"));
        }
        if iova % PAGE != 0 || len % PAGE != 0 {
            return Err(bad("not page-aligned (the IOMMU maps whole 4 KiB pages)"));
        }
        let end = iova.checked_add(len).ok_or_else(|| bad("wraps"))?;
        // The mapping starting last before `end` is the only one that can overlap.
        if let Some((&s, (l, _))) = self.maps.range(..end).next_back() {
            if s.saturating_add(*l) > iova {
                return Err(bad("overlaps an existing mapping"));
            }
        }
        Ok(())
    }

    /// Records a mapping made after [`DmaMaps::check_new`].
    pub fn insert(&mut self, iova: u64, len: u64, mem: MemSpan) {
        self.maps.insert(iova, (len, mem));
    }

    /// Removes and returns the mappings that start inside `[iova, iova + len)`.
    pub fn take_range(&mut self, iova: u64, len: u64) -> Vec<(u64, u64, MemSpan)> {
        let end = iova.saturating_add(len);
        let keys: Vec<u64> = self.maps.range(iova..end).map(|(k, _)| *k).collect();
        keys.into_iter()
            .filter_map(|k| self.maps.remove(&k).map(|(l, m)| (k, l, m)))
            .collect()
    }

    /// Removes and returns every mapping.
    pub fn take_all(&mut self) -> Vec<(u64, u64, MemSpan)> {
        std::mem::take(&mut self.maps)
            .into_iter()
            .map(|(k, (l, m))| (k, l, m))
            .collect()
    }

    /// (bus address, length) of every mapping, in address order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.maps.iter().map(|(k, (l, _))| (*k, *l)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use devlend_memory::SharedMemory;
    use std::sync::Arc;

    fn span() -> MemSpan {
        MemSpan::whole(Arc::new(SharedMemory::new("t", 4096).unwrap()))
    }

    #[test]
    fn bookkeeping_refuses_overlaps_and_misalignment() {
        let mut m = DmaMaps::default();
        m.check_new(0x10_0000, 0x4000).unwrap();
        m.insert(0x10_0000, 0x4000, span());
        // Table: (iova, len, accepted)
        let cases = [
            (0x10_0000, 0x1000, false), // same start
            (0x10_3000, 0x1000, false), // last page
            (0x0f_f000, 0x2000, false), // straddles the start
            (0x0f_f000, 0x1000, true),  // just below
            (0x10_4000, 0x1000, true),  // just above
            (0x20_0800, 0x1000, false), // unaligned address
            (0x20_0000, 0x0800, false), // unaligned length
            (0x20_0000, 0, false),      // empty
            (u64::MAX - 0xfff, 0x2000, false),
        ];
        for (iova, len, ok) in cases {
            assert_eq!(m.check_new(iova, len).is_ok(), ok, "{iova:#x} + {len:#x}");
        }
        m.insert(0x10_4000, 0x1000, span());
        m.insert(0x40_0000, 0x1000, span());
        assert_eq!(
            m.ranges(),
            vec![
                (0x10_0000, 0x4000),
                (0x10_4000, 0x1000),
                (0x40_0000, 0x1000)
            ]
        );
        let taken: Vec<(u64, u64)> = m
            .take_range(0x10_0000, 0x8000)
            .into_iter()
            .map(|(a, l, _)| (a, l))
            .collect();
        assert_eq!(taken, vec![(0x10_0000, 0x4000), (0x10_4000, 0x1000)]);
        assert_eq!(m.ranges(), vec![(0x40_0000, 0x1000)]);
        assert_eq!(m.take_all().len(), 1);
        assert!(m.ranges().is_empty());
        m.check_new(0x10_0000, 0x4000).unwrap();
    }
}
