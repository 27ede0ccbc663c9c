//! What a function's regions and config space say about its layout: which BARs are memory
//! BARs of which kind, where the MSI-X table and PBA are, and which parts of each BAR may be
//! mmapped (the parts VFIO allows, minus the pages the MSI-X emulation must see).

use devlend_pci::config::{bar, cap, header, msix as msix_cap, status};
use devlend_pci::config::{BarRegion, MsixLayout};
use devlend_pci::{AccessSize, BarIndex, BarSpec};

use crate::hw::RegionInfo;
use crate::VfioError;
/// Page size used for mmap granularity.
pub const PAGE: u64 = 4096;

/// A memory BAR's kind from its register's low bits; `None` for an I/O BAR.
pub fn bar_kind(register: u32) -> Option<(bool, bool)> {
    if register & bar::IO != 0 {
        return None;
    }
    let is_64bit = register & 0b110 == bar::TYPE_64BIT;
    let prefetchable = register & bar::PREFETCHABLE != 0;
    Some((is_64bit, prefetchable))
}

/// The spec of BAR `bar` from its VFIO region and its register, or `None` when the slot holds
/// no memory BAR (empty, I/O, or the upper half of a 64-bit BAR, which the caller skips).
pub fn bar_spec(region: Option<&RegionInfo>, register: u32) -> Option<BarSpec> {
    let region = region.filter(|r| r.size > 0)?;
    let (is_64bit, prefetchable) = bar_kind(register)?;
    Some(BarSpec {
        size: region.size.max(bar::MIN_SIZE).checked_next_power_of_two()?,
        is_64bit,
        prefetchable,
    })
}

/// Finds capability `id` in the standard capability list through `read` (config reads).
/// Bounded: at most 48 capabilities, each inside the first 256 bytes.
pub fn find_capability(
    read: &dyn Fn(u16, AccessSize) -> Result<u32, VfioError>,
    id: u8,
) -> Result<Option<u16>, VfioError> {
    if read(header::STATUS, AccessSize::Word)? & u32::from(status::CAPABILITIES_LIST) == 0 {
        return Ok(None);
    }
    let first = (read(header::CAPABILITIES_POINTER, AccessSize::Byte)? & 0xfc) as u16;
    // One word read per capability: its ID and Next pointer.
    let visit = |at: u16| -> Result<cap::Step, VfioError> {
        let id_next = read(at, AccessSize::Word)?;
        Ok(cap::step(id_next as u8, || (id_next >> 8) as u8, id))
    };
    match cap::find(first, visit)? {
        cap::Search::Found(at) => Ok(Some(at)),
        cap::Search::Absent => Ok(None),
        cap::Search::Looping => Err(VfioError::Config("the capability list does not end".into())),
    }
}

/// The MSI-X layout declared by the capability at `cap`.
pub fn msix_layout(
    read: &dyn Fn(u16, AccessSize) -> Result<u32, VfioError>,
    cap: u16,
) -> Result<MsixLayout, VfioError> {
    let control = read(cap + msix_cap::CONTROL, AccessSize::Word)?;
    let table = read(cap + msix_cap::TABLE, AccessSize::Dword)?;
    let pba = read(cap + msix_cap::PBA, AccessSize::Dword)?;
    let region = |v: u32, what: &str| -> Result<BarRegion, VfioError> {
        let bir = v & msix_cap::BIR_MASK;
        let bar = BarIndex::new(bir as u8)
            .ok_or_else(|| VfioError::Config(format!("MSI-X {what} in BAR indicator {bir}")))?;
        Ok(BarRegion {
            bar,
            offset: v & !msix_cap::BIR_MASK,
        })
    };
    Ok(MsixLayout {
        vectors: (control as u16 & msix_cap::CONTROL_TABLE_SIZE) + 1,
        table: region(table, "table")?,
        pba: region(pba, "PBA")?,
    })
}

/// The parts of BAR `bar` (offset, length) to mmap: the areas VFIO allows, page-aligned
/// inwards, minus every page holding the MSI-X table or PBA (those accesses must reach the
/// emulated table). Sorted, non-overlapping, each at least a page.
pub fn mappable_areas(
    region: &RegionInfo,
    bar: BarIndex,
    msix: Option<&MsixLayout>,
) -> Vec<(u64, u64)> {
    if !region.mappable() || region.size == 0 {
        return Vec::new();
    }
    let allowed = match &region.sparse {
        Some(areas) => areas.clone(),
        None => vec![(0, region.size)],
    };
    // Pages that must stay trapped.
    let mut holes: Vec<(u64, u64)> = Vec::new();
    if let Some(m) = msix {
        for (r, len) in [(m.table, m.table_len()), (m.pba, m.pba_len())] {
            if r.bar == bar && len > 0 {
                let start = u64::from(r.offset) / PAGE * PAGE;
                let end = (u64::from(r.offset) + len).div_ceil(PAGE) * PAGE;
                holes.push((start, end));
            }
        }
    }
    let mut out = Vec::new();
    for (off, len) in allowed {
        let Some(end) = off.checked_add(len) else {
            continue;
        };
        let end = end.min(region.size);
        let mut pieces = vec![(off.div_ceil(PAGE) * PAGE, end / PAGE * PAGE)];
        for (hs, he) in &holes {
            pieces = pieces
                .into_iter()
                .flat_map(|(s, e)| {
                    if *he <= s || *hs >= e {
                        vec![(s, e)]
                    } else {
                        vec![(s, (*hs).max(s)), ((*he).min(e), e)]
                    }
                })
                .collect();
        }
        out.extend(
            pieces
                .into_iter()
                .filter(|(s, e)| e > s)
                .map(|(s, e)| (s, e - s)),
        );
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use devlend_pci::config::cap::ID_MSIX as CAP_ID_MSIX;
    use vfio_bindings::bindings::vfio::{
        VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
    };

    const RWM: u32 =
        VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE | VFIO_REGION_INFO_FLAG_MMAP;

    fn bar(i: u8) -> BarIndex {
        BarIndex::new(i).unwrap()
    }

    fn msix(table: (u8, u32), pba: (u8, u32), vectors: u16) -> MsixLayout {
        MsixLayout {
            vectors,
            table: BarRegion {
                bar: bar(table.0),
                offset: table.1,
            },
            pba: BarRegion {
                bar: bar(pba.0),
                offset: pba.1,
            },
        }
    }

    #[test]
    fn bar_kinds_from_register_bits() {
        assert_eq!(bar_kind(0xfebf_0004), Some((true, false)));
        assert_eq!(bar_kind(0xfebf_000c), Some((true, true)));
        assert_eq!(bar_kind(0xfebf_0000), Some((false, false)));
        assert_eq!(bar_kind(0xc001), None);
        let r = RegionInfo {
            size: 0x4000,
            flags: RWM,
            sparse: None,
        };
        assert_eq!(
            bar_spec(Some(&r), 4),
            Some(BarSpec {
                size: 0x4000,
                is_64bit: true,
                prefetchable: false
            })
        );
        assert_eq!(bar_spec(None, 4), None);
        let empty = RegionInfo { size: 0, ..r };
        assert_eq!(bar_spec(Some(&empty), 4), None);
    }

    #[test]
    fn whole_bar_minus_the_msix_pages() {
        // QEMU's nvme: registers, then the MSI-X table at 0x2000 and the PBA at 0x3000 of a
        // 16 KiB BAR0.
        let r = RegionInfo {
            size: 0x4000,
            flags: RWM,
            sparse: None,
        };
        let m = msix((0, 0x2000), (0, 0x3000), 65);
        assert_eq!(
            mappable_areas(&r, bar(0), Some(&m)),
            vec![(0, 0x2000)],
            "table (65 x 16 bytes) and PBA pages stay trapped"
        );
        // The same layout in another BAR does not punch holes here.
        assert_eq!(mappable_areas(&r, bar(2), Some(&m)), vec![(0, 0x4000)]);
        // A table in the middle splits the area.
        let m = msix((0, 0x1000), (0, 0x1800), 8);
        assert_eq!(
            mappable_areas(&r, bar(0), Some(&m)),
            vec![(0, 0x1000), (0x2000, 0x2000)]
        );
    }

    #[test]
    fn sparse_areas_are_honoured_and_page_aligned() {
        let r = RegionInfo {
            size: 0x10000,
            flags: RWM,
            sparse: Some(vec![(0x800, 0x2800), (0x8000, 0x8000), (u64::MAX, 2)]),
        };
        assert_eq!(
            mappable_areas(&r, bar(0), None),
            vec![(0x1000, 0x2000), (0x8000, 0x8000)],
            "unaligned edges shrink inwards; an overflowing area is dropped"
        );
        let no_mmap = RegionInfo {
            flags: RWM & !VFIO_REGION_INFO_FLAG_MMAP,
            ..r
        };
        assert!(mappable_areas(&no_mmap, bar(0), None).is_empty());
    }

    #[test]
    fn capability_walk_and_msix_layout() {
        // A config space with PM at 0x40 -> MSI-X at 0x50 (table BAR0+0x2000, PBA BAR0+0x3000,
        // 65 vectors) -> end.
        let mut cfg = [0u8; 256];
        cfg[0x06] = 0x10;
        cfg[0x34] = 0x40;
        cfg[0x40] = 0x01;
        cfg[0x41] = 0x50;
        cfg[0x50] = CAP_ID_MSIX;
        cfg[0x52..0x54].copy_from_slice(&64u16.to_le_bytes());
        cfg[0x54..0x58].copy_from_slice(&0x2000u32.to_le_bytes());
        cfg[0x58..0x5c].copy_from_slice(&0x3000u32.to_le_bytes());
        let read = |off: u16, size: AccessSize| -> Result<u32, VfioError> {
            let o = usize::from(off);
            let mut b = [0u8; 4];
            b[..size.len()].copy_from_slice(&cfg[o..o + size.len()]);
            Ok(u32::from_le_bytes(b))
        };
        assert_eq!(find_capability(&read, CAP_ID_MSIX).unwrap(), Some(0x50));
        assert_eq!(find_capability(&read, 0x10).unwrap(), None);
        let m = msix_layout(&read, 0x50).unwrap();
        assert_eq!(m, msix((0, 0x2000), (0, 0x3000), 65));
        // A loop in the list is an error, not a hang.
        cfg[0x51] = 0x40;
        let read = |off: u16, size: AccessSize| -> Result<u32, VfioError> {
            let o = usize::from(off);
            let mut b = [0u8; 4];
            b[..size.len()].copy_from_slice(&cfg[o..o + size.len()]);
            Ok(u32::from_le_bytes(b))
        };
        assert!(find_capability(&read, 0x10).is_err());
        // No capability list at all.
        cfg[0x06] = 0;
        let read = |off: u16, size: AccessSize| -> Result<u32, VfioError> {
            let o = usize::from(off);
            let mut b = [0u8; 4];
            b[..size.len()].copy_from_slice(&cfg[o..o + size.len()]);
            Ok(u32::from_le_bytes(b))
        };
        assert_eq!(find_capability(&read, CAP_ID_MSIX).unwrap(), None);
    }
}
