//! Moving a command's data between host memory (through the [`DmaPort`]) and the model:
//! small buffers (identify data, log pages, DSM ranges) and file-backed block data.
//!
//! Block data goes straight between the image file and host memory when the port hands out
//! a direct mapping ([`DmaPort::dma_span`]): one `pread`/`pwrite` per contiguous segment, no
//! copy in the model. Otherwise it goes through a bounce buffer. Every segment is checked
//! against the port before any byte moves, so a buffer that is partly outside the granted
//! memory fails with Data Transfer Error and transfers nothing.

use std::fs::File;
use std::os::unix::fs::FileExt;

use devlend_memory::MemSpan;
use devlend_pci::{DmaAccess, DmaPort};

use crate::command::DataPointer;
use crate::prp::{self, Segment};
use crate::status::Status;

/// What a transfer needs besides the data: the port, the page size and scratch space.
pub(crate) struct Transfer<'a> {
    /// The device's bus-master port.
    pub dma: &'a dyn DmaPort,
    /// `CC.MPS` page size.
    pub page_size: u64,
    /// Scratch segment list (kept to avoid an allocation per command).
    pub segs: &'a mut Vec<Segment>,
    /// Scratch bounce buffer.
    pub bounce: &'a mut Vec<u8>,
}

impl Transfer<'_> {
    /// Walks the PRPs of a `len`-byte buffer into `self.segs`.
    pub fn map(&mut self, dp: DataPointer, len: u64) -> Result<(), Status> {
        self.segs.clear();
        prp::walk(self.dma, dp.prp1, dp.prp2, len, self.page_size, self.segs)
            .map_err(|e| e.status())
    }

    /// Copies `data` to the host buffer at `dp`.
    pub fn copy_to_host(&mut self, dp: DataPointer, data: &[u8]) -> Result<(), Status> {
        self.map(dp, data.len() as u64)?;
        self.check(DmaAccess::Write)?;
        let mut at = 0usize;
        for seg in self.segs.iter() {
            let end = at + seg.len as usize;
            let chunk = data.get(at..end).ok_or(Status::INTERNAL_ERROR)?;
            self.dma
                .dma_write(seg.addr, chunk)
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            at = end;
        }
        Ok(())
    }

    /// Fills `buf` from the host buffer at `dp`.
    pub fn copy_from_host(&mut self, dp: DataPointer, buf: &mut [u8]) -> Result<(), Status> {
        self.map(dp, buf.len() as u64)?;
        let mut at = 0usize;
        for seg in self.segs.iter() {
            let end = at + seg.len as usize;
            let chunk = buf.get_mut(at..end).ok_or(Status::INTERNAL_ERROR)?;
            self.dma
                .dma_read(seg.addr, chunk)
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
            at = end;
        }
        Ok(())
    }

    /// Checks every mapped segment against the port (direct-mapped or not).
    fn check(&self, access: DmaAccess) -> Result<(), Status> {
        for seg in self.segs.iter() {
            self.dma
                .dma_span(seg.addr, seg.len, access)
                .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
        }
        Ok(())
    }

    /// Resolves the mapped segments to direct spans where the port offers them.
    fn spans(&self, access: DmaAccess) -> Result<Vec<Option<MemSpan>>, Status> {
        self.segs
            .iter()
            .map(|seg| {
                self.dma
                    .dma_span(seg.addr, seg.len, access)
                    .map_err(|_| Status::DATA_TRANSFER_ERROR)
            })
            .collect()
    }

    /// Reads `len` bytes of `file` at `file_offset` into the host buffer at `dp`.
    pub fn file_to_host(
        &mut self,
        dp: DataPointer,
        len: u64,
        file: &File,
        file_offset: u64,
    ) -> Result<(), Status> {
        self.map(dp, len)?;
        let spans = self.spans(DmaAccess::Write)?;
        let mut off = file_offset;
        for (seg, span) in self.segs.iter().zip(spans) {
            let n = usize::try_from(seg.len).map_err(|_| Status::INTERNAL_ERROR)?;
            match span {
                Some(span) => span
                    .read_from_file(0, n, file, off)
                    .map_err(|_| Status::INTERNAL_ERROR)?,
                None => {
                    self.bounce.resize(n, 0);
                    file.read_exact_at(self.bounce, off)
                        .map_err(|_| Status::INTERNAL_ERROR)?;
                    self.dma
                        .dma_write(seg.addr, self.bounce)
                        .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
                }
            }
            off += seg.len;
        }
        Ok(())
    }

    /// Writes `len` bytes from the host buffer at `dp` to `file` at `file_offset`.
    pub fn host_to_file(
        &mut self,
        dp: DataPointer,
        len: u64,
        file: &File,
        file_offset: u64,
    ) -> Result<(), Status> {
        self.map(dp, len)?;
        let spans = self.spans(DmaAccess::Read)?;
        let mut off = file_offset;
        for (seg, span) in self.segs.iter().zip(spans) {
            let n = usize::try_from(seg.len).map_err(|_| Status::INTERNAL_ERROR)?;
            match span {
                Some(span) => span
                    .write_to_file(0, n, file, off)
                    .map_err(|_| Status::INTERNAL_ERROR)?,
                None => {
                    self.bounce.resize(n, 0);
                    self.dma
                        .dma_read(seg.addr, self.bounce)
                        .map_err(|_| Status::DATA_TRANSFER_ERROR)?;
                    file.write_all_at(self.bounce, off)
                        .map_err(|_| Status::INTERNAL_ERROR)?;
                }
            }
            off += seg.len;
        }
        Ok(())
    }
}
