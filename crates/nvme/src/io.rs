//! The namespace (one, NSID 1) and the NVM command set: Read, Write, Flush, Write Zeroes,
//! Dataset Management and Compare against a raw image file.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use rustix::fs::FallocateFlags;

use crate::command::{BlockRange, NvmOp};
use crate::config::NvmeConfig;
use crate::error::NvmeError;
use crate::status::Status;
use crate::transfer::Transfer;

/// The namespace this controller exposes.
pub const NSID: u32 = 1;
/// NSID meaning "all namespaces".
pub const NSID_BROADCAST: u32 = 0xffff_ffff;
/// Most DSM ranges in one command.
const DSM_MAX_RANGES: u32 = 256;
/// Bytes per DSM range descriptor.
const DSM_RANGE_BYTES: usize = 16;
/// Largest zero-fill written at once when the file system cannot zero a range itself.
const ZERO_CHUNK: u64 = 1 << 20;

/// Running totals for the SMART / Health log.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct IoCounters {
    /// 512-byte units read.
    pub units_read: u128,
    /// 512-byte units written.
    pub units_written: u128,
    /// Read commands completed.
    pub read_commands: u128,
    /// Write commands completed.
    pub write_commands: u128,
    /// Commands that failed with a media or data integrity error.
    pub media_errors: u128,
}

impl IoCounters {
    /// Adds what one command (run off the core lock) counted.
    pub fn add(&mut self, other: &IoCounters) {
        self.units_read = self.units_read.saturating_add(other.units_read);
        self.units_written = self.units_written.saturating_add(other.units_written);
        self.read_commands = self.read_commands.saturating_add(other.read_commands);
        self.write_commands = self.write_commands.saturating_add(other.write_commands);
        self.media_errors = self.media_errors.saturating_add(other.media_errors);
    }
}

/// The one namespace: a raw image file of `blocks` logical blocks.
#[derive(Debug)]
pub(crate) struct Namespace {
    file: File,
    /// Byte offset of block 0 in the image (a private namespace's slice).
    base: u64,
    block_shift: u32,
    blocks: u64,
    read_only: bool,
}

impl Namespace {
    /// Opens (or creates) the image of `cfg`: all of it, or slice `index` of `slices` equal
    /// 1 MiB-aligned slices (a private namespace of a virtualized controller).
    pub fn open(cfg: &NvmeConfig, slice: Option<(u16, u16)>) -> Result<Namespace, NvmeError> {
        let path = &cfg.image;
        let err = |op, source| NvmeError::Image {
            path: path.clone(),
            op,
            source,
        };
        let exists = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .create(!exists && cfg.create_size.is_some() && !cfg.read_only)
            .truncate(false)
            .open(path)
            .map_err(|e| err("open", e))?;
        if !exists {
            if let Some(size) = cfg.create_size {
                file.set_len(size).map_err(|e| err("set length", e))?;
            }
        }
        let len = file.metadata().map_err(|e| err("stat", e))?.len();
        let block_shift = cfg.block_size.shift();
        let (base, usable) = match slice {
            Some((index, slices)) => {
                let part = (len / u64::from(slices.max(1))) & !((1u64 << 20) - 1);
                (part * u64::from(index), part)
            }
            None => (0, len),
        };
        let blocks = usable >> block_shift;
        if blocks == 0 {
            return Err(NvmeError::ImageTooSmall {
                path: path.clone(),
                len,
                block: cfg.block_size.bytes(),
            });
        }
        Ok(Namespace {
            file,
            base,
            block_shift,
            blocks,
            read_only: cfg.read_only,
        })
    }

    /// Number of logical blocks (`NSZE`).
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// log2 of the block size (`LBADS`).
    pub fn block_shift(&self) -> u32 {
        self.block_shift
    }

    /// Makes written data durable.
    pub fn flush(&self) -> Result<(), Status> {
        self.file.sync_data().map_err(|_| Status::INTERNAL_ERROR)
    }

    /// Byte offset and length of a block range, after the range check.
    fn extent(&self, slba: u64, blocks: u64) -> Result<(u64, u64), Status> {
        let end = slba.checked_add(blocks).ok_or(Status::LBA_OUT_OF_RANGE)?;
        if end > self.blocks {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        Ok((
            self.base + (slba << self.block_shift),
            blocks << self.block_shift,
        ))
    }

    /// Runs one NVM command for namespace `nsid`.
    pub fn execute(
        &self,
        t: &mut Transfer<'_>,
        op: &NvmOp,
        nsid: u32,
        max_transfer: u64,
        write_cache: bool,
        counters: &mut IoCounters,
    ) -> Status {
        let result = match op {
            NvmOp::Flush => {
                if nsid != NSID && nsid != NSID_BROADCAST {
                    Err(Status::INVALID_NAMESPACE)
                } else {
                    self.flush()
                }
            }
            _ if nsid != NSID => Err(Status::INVALID_NAMESPACE),
            NvmOp::Read(r) => self.read(t, r, max_transfer, counters),
            NvmOp::Write(r) => self.write(t, r, max_transfer, write_cache, counters),
            NvmOp::Compare(r) => self.compare(t, r, max_transfer, counters),
            NvmOp::WriteZeroes { range, deallocate } => {
                self.write_zeroes(range, *deallocate, write_cache)
            }
            NvmOp::DatasetManagement {
                ranges,
                deallocate,
                data,
            } => self.dataset_management(t, *ranges, *deallocate, *data),
        };
        match result {
            Ok(()) => Status::SUCCESS,
            Err(s) => {
                if s.code_type() == crate::status::SCT_MEDIA {
                    counters.media_errors += 1;
                }
                s
            }
        }
    }

    fn transfer_extent(&self, r: &BlockRange, max_transfer: u64) -> Result<(u64, u64), Status> {
        let (off, len) = self.extent(r.slba, u64::from(r.blocks))?;
        if len > max_transfer {
            return Err(Status::INVALID_FIELD);
        }
        Ok((off, len))
    }

    fn read(
        &self,
        t: &mut Transfer<'_>,
        r: &BlockRange,
        max_transfer: u64,
        counters: &mut IoCounters,
    ) -> Result<(), Status> {
        let (off, len) = self.transfer_extent(r, max_transfer)?;
        t.file_to_host(r.data, len, &self.file, off)?;
        counters.read_commands += 1;
        counters.units_read += u128::from(len >> 9);
        Ok(())
    }

    fn write(
        &self,
        t: &mut Transfer<'_>,
        r: &BlockRange,
        max_transfer: u64,
        write_cache: bool,
        counters: &mut IoCounters,
    ) -> Result<(), Status> {
        let (off, len) = self.transfer_extent(r, max_transfer)?;
        if self.read_only {
            return Err(Status::NAMESPACE_WRITE_PROTECTED);
        }
        t.host_to_file(r.data, len, &self.file, off)?;
        if r.fua || !write_cache {
            self.flush()?;
        }
        counters.write_commands += 1;
        counters.units_written += u128::from(len >> 9);
        Ok(())
    }

    fn compare(
        &self,
        t: &mut Transfer<'_>,
        r: &BlockRange,
        max_transfer: u64,
        counters: &mut IoCounters,
    ) -> Result<(), Status> {
        let (off, len) = self.transfer_extent(r, max_transfer)?;
        let n = usize::try_from(len).map_err(|_| Status::INVALID_FIELD)?;
        let mut host = vec![0u8; n];
        t.copy_from_host(r.data, &mut host)?;
        let mut media = vec![0u8; n];
        self.file
            .read_exact_at(&mut media, off)
            .map_err(|_| Status::INTERNAL_ERROR)?;
        counters.read_commands += 1;
        counters.units_read += u128::from(len >> 9);
        if host != media {
            return Err(Status::COMPARE_FAILURE);
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        r: &BlockRange,
        deallocate: bool,
        write_cache: bool,
    ) -> Result<(), Status> {
        let (off, len) = self.extent(r.slba, u64::from(r.blocks))?;
        if self.read_only {
            return Err(Status::NAMESPACE_WRITE_PROTECTED);
        }
        let mode = if deallocate {
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        };
        self.zero(off, len, mode)?;
        if r.fua || !write_cache {
            self.flush()?;
        }
        Ok(())
    }

    fn dataset_management(
        &self,
        t: &mut Transfer<'_>,
        ranges: u32,
        deallocate: bool,
        data: crate::command::DataPointer,
    ) -> Result<(), Status> {
        if ranges > DSM_MAX_RANGES {
            return Err(Status::INVALID_FIELD);
        }
        let mut buf = vec![0u8; ranges as usize * DSM_RANGE_BYTES];
        t.copy_from_host(data, &mut buf)?;
        let mut extents = Vec::with_capacity(ranges as usize);
        for desc in buf.chunks_exact(DSM_RANGE_BYTES) {
            let mut len = [0u8; 4];
            let mut slba = [0u8; 8];
            len.copy_from_slice(desc.get(4..8).unwrap_or(&[0; 4]));
            slba.copy_from_slice(desc.get(8..16).unwrap_or(&[0; 8]));
            let blocks = u64::from(u32::from_le_bytes(len));
            if blocks == 0 {
                continue;
            }
            extents.push(self.extent(u64::from_le_bytes(slba), blocks)?);
        }
        if !deallocate {
            // Only hints (integral read/write): nothing to do.
            return Ok(());
        }
        if self.read_only {
            return Err(Status::NAMESPACE_WRITE_PROTECTED);
        }
        for (off, len) in extents {
            self.zero(
                off,
                len,
                FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            )?;
        }
        Ok(())
    }

    /// Zeroes `[off, off + len)` with `fallocate(mode)`, or by writing zeroes when the file
    /// system does not support it. Deallocated blocks read back as zeroes (`DLFEAT` = 1).
    fn zero(&self, off: u64, len: u64, mode: FallocateFlags) -> Result<(), Status> {
        if i64::try_from(off).is_err() || i64::try_from(len).is_err() {
            return Err(Status::LBA_OUT_OF_RANGE);
        }
        if rustix::fs::fallocate(&self.file, mode, off, len).is_ok() {
            return Ok(());
        }
        let zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK);
            let chunk = zeroes.get(..n as usize).ok_or(Status::INTERNAL_ERROR)?;
            self.file
                .write_all_at(chunk, off + done)
                .map_err(|_| Status::INTERNAL_ERROR)?;
            done += n;
        }
        Ok(())
    }
}
