//! The PRP walker: turns PRP Entry 1, PRP Entry 2 and the PRP lists they point to into the
//! bus-address segments of a data buffer (NVMe base spec 1.4, section 4.3).
//!
//! Rules enforced, each with the status a controller returns:
//! - PRP Entry 1 may carry an offset into its page, but it must be dword aligned;
//! - every later data entry (PRP Entry 2 used directly, or a list entry) starts a page;
//! - a PRP list pointer is qword aligned and may start mid-page; the last entry of a list page
//!   chains to the next list page when more entries are needed;
//! - a list page that can hold nothing but a chain pointer is rejected, so a walk always ends.
//!
//! Violations are [`PrpError::InvalidOffset`] (PRP Offset Invalid); a list that cannot be read
//! through the device's DMA port is [`PrpError::Dma`] (Data Transfer Error).

use devlend_memory::BusAddr;
use devlend_pci::{DmaError, DmaPort};

use crate::status::Status;

/// Where the walker reads PRP lists from: a [`DmaPort`] in the model, anything in a fuzzer.
pub trait PrpListReader {
    /// Reads `out.len()` little-endian 64-bit entries starting at `addr`.
    fn read_entries(&self, addr: BusAddr, out: &mut [u64]) -> Result<(), DmaError>;
}

impl<T: DmaPort + ?Sized> PrpListReader for T {
    fn read_entries(&self, addr: BusAddr, out: &mut [u64]) -> Result<(), DmaError> {
        let mut bytes = vec![0u8; out.len() * 8];
        self.dma_read(addr, &mut bytes)?;
        for (entry, chunk) in out.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *entry = u64::from_le_bytes(b);
        }
        Ok(())
    }
}

/// Why a PRP walk failed.
#[derive(Debug, thiserror::Error)]
pub enum PrpError {
    /// A PRP list could not be read.
    #[error("reading a PRP list failed: {0}")]
    Dma(#[from] DmaError),
    /// An entry has an offset where none is allowed, or is misaligned.
    #[error("PRP entry {entry:#x} has an invalid offset")]
    InvalidOffset {
        /// The offending entry.
        entry: u64,
    },
    /// The page size is not a power of two of at least 4 KiB.
    #[error("memory page size {0} is invalid")]
    BadPageSize(u64),
}

impl PrpError {
    /// The completion status for a command whose PRPs failed this way.
    pub fn status(&self) -> Status {
        match self {
            PrpError::Dma(_) => Status::DATA_TRANSFER_ERROR,
            PrpError::InvalidOffset { .. } => Status::INVALID_PRP_OFFSET,
            PrpError::BadPageSize(_) => Status::INVALID_FIELD,
        }
    }
}

/// One physically contiguous piece of a data buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Bus address of the first byte.
    pub addr: BusAddr,
    /// Length in bytes.
    pub len: u64,
}

/// How many list entries are read from memory at once.
const LIST_CHUNK: usize = 64;

fn push(out: &mut Vec<Segment>, addr: u64, len: u64) {
    if let Some(last) = out.last_mut() {
        if last.addr.0.checked_add(last.len) == Some(addr) {
            last.len += len;
            return;
        }
    }
    out.push(Segment {
        addr: BusAddr(addr),
        len,
    });
}

/// Walks the PRPs of a `len_bytes` transfer with memory page size `page_size`, appending the
/// segments (adjacent ones merged) to `out`. The caller bounds `len_bytes` (by MDTS), which
/// bounds the work done here.
pub fn walk<R: PrpListReader + ?Sized>(
    reader: &R,
    prp1: u64,
    prp2: u64,
    len_bytes: u64,
    page_size: u64,
    out: &mut Vec<Segment>,
) -> Result<(), PrpError> {
    if page_size < 4096 || !page_size.is_power_of_two() {
        return Err(PrpError::BadPageSize(page_size));
    }
    if len_bytes == 0 {
        return Ok(());
    }
    let page_mask = page_size - 1;
    if prp1 & 0x3 != 0 {
        return Err(PrpError::InvalidOffset { entry: prp1 });
    }
    let first = len_bytes.min(page_size - (prp1 & page_mask));
    push(out, prp1, first);
    let mut remaining = len_bytes - first;
    if remaining == 0 {
        return Ok(());
    }
    if remaining <= page_size {
        if prp2 & page_mask != 0 {
            return Err(PrpError::InvalidOffset { entry: prp2 });
        }
        push(out, prp2, remaining);
        return Ok(());
    }

    // PRP Entry 2 is a list pointer.
    let mut list = prp2;
    let mut chunk = [0u64; LIST_CHUNK];
    loop {
        if list & 0x7 != 0 {
            return Err(PrpError::InvalidOffset { entry: list });
        }
        let slots = (page_size - (list & page_mask)) / 8;
        let pages_needed = remaining.div_ceil(page_size);
        let chained = pages_needed > slots;
        if chained && slots < 2 {
            // Only room for a chain pointer: no progress would be made.
            return Err(PrpError::InvalidOffset { entry: list });
        }
        // Data entries in this list page; when chained, the last slot is the next pointer.
        let data_entries = if chained { slots - 1 } else { pages_needed };
        let to_read = if chained { slots } else { pages_needed };
        let mut read = 0u64;
        let mut next = None;
        while read < to_read {
            let n = (to_read - read).min(LIST_CHUNK as u64);
            let buf = chunk.get_mut(..n as usize).unwrap_or_default();
            let at = list
                .checked_add(read * 8)
                .ok_or(PrpError::InvalidOffset { entry: list })?;
            reader.read_entries(BusAddr(at), buf)?;
            for (i, &entry) in buf.iter().enumerate() {
                let index = read + i as u64;
                if index < data_entries {
                    if entry & page_mask != 0 {
                        return Err(PrpError::InvalidOffset { entry });
                    }
                    let len = remaining.min(page_size);
                    push(out, entry, len);
                    remaining -= len;
                } else {
                    next = Some(entry);
                }
            }
            read += n;
        }
        match next {
            Some(ptr) if remaining > 0 => list = ptr,
            _ => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A sparse fake memory of PRP list entries.
    #[derive(Default)]
    struct Lists(HashMap<u64, u64>);

    impl PrpListReader for Lists {
        fn read_entries(&self, addr: BusAddr, out: &mut [u64]) -> Result<(), DmaError> {
            for (i, e) in out.iter_mut().enumerate() {
                *e = *self
                    .0
                    .get(&(addr.0 + 8 * i as u64))
                    .ok_or(DmaError::Unmapped { addr, len: 8 })?;
            }
            Ok(())
        }
    }

    const PS: u64 = 4096;

    fn run(l: &Lists, prp1: u64, prp2: u64, len: u64) -> Result<Vec<Segment>, PrpError> {
        let mut v = Vec::new();
        walk(l, prp1, prp2, len, PS, &mut v).map(|()| v)
    }

    fn seg(addr: u64, len: u64) -> Segment {
        Segment {
            addr: BusAddr(addr),
            len,
        }
    }

    #[test]
    fn single_page_with_offset() {
        let l = Lists::default();
        assert_eq!(run(&l, 0x1200, 0, 512).unwrap(), vec![seg(0x1200, 512)]);
        assert_eq!(run(&l, 0x1000, 0, 0).unwrap(), vec![]);
    }

    #[test]
    fn two_pages_uses_prp2_directly() {
        let l = Lists::default();
        assert_eq!(
            run(&l, 0x1800, 0x9000, 4096).unwrap(),
            vec![seg(0x1800, 2048), seg(0x9000, 2048)]
        );
        // Contiguous pages merge.
        assert_eq!(
            run(&l, 0x1000, 0x2000, 8192).unwrap(),
            vec![seg(0x1000, 8192)]
        );
        assert!(matches!(
            run(&l, 0x1000, 0x2010, 8192),
            Err(PrpError::InvalidOffset { entry: 0x2010 })
        ));
    }

    #[test]
    fn misaligned_prp1() {
        let l = Lists::default();
        assert_eq!(
            run(&l, 0x1001, 0, 16).unwrap_err().status(),
            Status::INVALID_PRP_OFFSET
        );
    }

    #[test]
    fn list_in_one_page() {
        let mut l = Lists::default();
        for i in 0..3u64 {
            l.0.insert(0x8000 + 8 * i, 0x10_000 + 0x2000 * i);
        }
        assert_eq!(
            run(&l, 0x1000, 0x8000, 4 * PS).unwrap(),
            vec![
                seg(0x1000, PS),
                seg(0x10_000, PS),
                seg(0x12_000, PS),
                seg(0x14_000, PS)
            ]
        );
    }

    #[test]
    fn list_chains_across_pages() {
        // The list starts 16 bytes before the end of its page: one data entry, then a chain.
        let mut l = Lists::default();
        l.0.insert(0x8ff0, 0x20_000);
        l.0.insert(0x8ff8, 0xa000);
        l.0.insert(0xa000, 0x40_000);
        l.0.insert(0xa008, 0x50_000);
        let segs = run(&l, 0x1000, 0x8ff0, 4 * PS - 100).unwrap();
        assert_eq!(
            segs,
            vec![
                seg(0x1000, PS),
                seg(0x20_000, PS),
                seg(0x40_000, PS),
                seg(0x50_000, PS - 100)
            ]
        );
    }

    #[test]
    fn list_with_only_a_chain_slot_is_rejected() {
        let mut l = Lists::default();
        l.0.insert(0x8ff8, 0x8ff8);
        assert!(matches!(
            run(&l, 0x1000, 0x8ff8, 3 * PS),
            Err(PrpError::InvalidOffset { .. })
        ));
    }

    #[test]
    fn unreadable_list_is_a_transfer_error() {
        let l = Lists::default();
        assert_eq!(
            run(&l, 0x1000, 0x8000, 3 * PS).unwrap_err().status(),
            Status::DATA_TRANSFER_ERROR
        );
    }

    #[test]
    fn list_entry_with_offset() {
        let mut l = Lists::default();
        l.0.insert(0x8000, 0x20_000);
        l.0.insert(0x8008, 0x30_200);
        assert_eq!(
            run(&l, 0x1000, 0x8000, 3 * PS).unwrap_err().status(),
            Status::INVALID_PRP_OFFSET
        );
    }
}
