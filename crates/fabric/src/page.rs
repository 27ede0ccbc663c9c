//! The control page: one side's registers in shared memory.
//!
//! Each side of a link creates a fresh control page for every connection and gives it to the
//! peer (by fd over the shm control socket, or by `Arc` in loopback). A page holds what *its
//! owner* consumes or waits on: the owner's doorbell bits, its scratchpads, its inbound message
//! registers, the MMIO request ring the peer produces into, and the completion slot where the
//! peer's service thread answers the owner's non-posted reads. Every futex a side sleeps on
//! lives in its own page (except the ring-space word, see [`SPACE_WAIT`]).
//!
//! The peer writes this memory at will: every value read from it is untrusted.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64};

use devlend_memory::SharedMemory;
use rustix::fs::{MemfdFlags, SealFlags};

use crate::sync::WaitWord;
use crate::{FabricError, Result};

/// Most windows a page's protocol can name (a u32 field, but keep it small).
pub(crate) const MAX_WINDOWS: usize = 64;
/// Most scratchpads a page holds.
pub(crate) const MAX_SPADS: usize = 64;
/// Most message registers a page holds (status is a u64, we use 32 bits of it).
pub(crate) const MAX_MSGS: usize = 32;

const MAGIC: u64 = 0;
const MAGIC_VALUE: u32 = 0x4e54_4231; // "NTB1"
pub(crate) const DB_BITS: u64 = 0x40;
pub(crate) const DB_WAIT: u64 = 0x48;
pub(crate) const MSG_STS: u64 = 0x80;
pub(crate) const MSG_WAIT: u64 = 0x88;
const MSGS: u64 = 0xc0;
const SPADS: u64 = 0x140;
/// Completion slot of the owner's outstanding non-posted read.
pub(crate) const CPL_TAG: u64 = 0x300;
pub(crate) const CPL_STATUS: u64 = 0x304;
pub(crate) const CPL_WAIT: u64 = 0x308;
pub(crate) const CPL_DATA: u64 = 0x340;
/// The ring consumer (the owner) sleeps here when the ring is empty.
pub(crate) const RING_WAIT: u64 = 0x400;
/// Consumer's position: entries before it are free for the producer.
pub(crate) const RING_HEAD: u64 = 0x480;
/// The producer (the peer) sleeps here when the ring is full; the owner notifies it.
pub(crate) const SPACE_WAIT: u64 = 0x488;
/// First ring entry.
pub(crate) const RING_BASE: u64 = 0x1000;
/// Entries in the ring (a power of two).
pub(crate) const RING_ENTRIES: u32 = 256;
/// Bytes per entry.
pub(crate) const ENTRY_SIZE: u64 = 128;
/// Payload bytes per entry.
pub(crate) const ENTRY_DATA_MAX: usize = 64;
/// Entry field offsets.
pub(crate) const E_SEQ: u64 = 0;
pub(crate) const E_KIND: u64 = 4;
pub(crate) const E_WINDOW: u64 = 8;
pub(crate) const E_LEN: u64 = 12;
pub(crate) const E_OFFSET: u64 = 16;
pub(crate) const E_TAG: u64 = 24;
pub(crate) const E_DATA: u64 = 64;
/// Size of a control page.
pub(crate) const PAGE_SIZE: usize = (RING_BASE + RING_ENTRIES as u64 * ENTRY_SIZE) as usize;

const SEALS: SealFlags = SealFlags::SHRINK
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);

fn failed(op: &str) -> impl FnOnce(rustix::io::Errno) -> FabricError + '_ {
    move |e| FabricError::io(op, e.into())
}

/// One side's registers (see the module docs).
#[derive(Debug)]
pub(crate) struct ControlPage {
    mem: SharedMemory,
}

impl ControlPage {
    /// A fresh, zeroed page in a sealed memfd (its size can never change, so a peer mapping it
    /// cannot be made to fault).
    pub(crate) fn create() -> Result<Self> {
        let fd = rustix::fs::memfd_create(
            "devlend-ntb-control",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(failed("memfd_create"))?;
        rustix::fs::ftruncate(&fd, PAGE_SIZE as u64).map_err(failed("ftruncate"))?;
        rustix::fs::fcntl_add_seals(&fd, SEALS).map_err(failed("fcntl(F_ADD_SEALS)"))?;
        let page = Self {
            mem: SharedMemory::map(fd, 0, PAGE_SIZE)?,
        };
        page.mem.store_u32(MAGIC, MAGIC_VALUE)?;
        Ok(page)
    }

    /// Maps a page the peer sent, after checking that it is sealed at the right size and
    /// carries the magic number.
    pub(crate) fn from_peer(fd: OwnedFd) -> Result<Self> {
        let sealed = rustix::fs::fcntl_get_seals(&fd).is_ok_and(|seals| seals.contains(SEALS));
        if !sealed {
            return Err(FabricError::Protocol(
                "peer control page is not a sealed memfd".into(),
            ));
        }
        let size = fd_size(&fd)?;
        if size != PAGE_SIZE as u64 {
            return Err(FabricError::Protocol(format!(
                "peer control page has {size} bytes, expected {PAGE_SIZE}"
            )));
        }
        let page = Self {
            mem: SharedMemory::map(fd, 0, PAGE_SIZE)?,
        };
        if page.mem.load_u32(MAGIC)? != MAGIC_VALUE {
            return Err(FabricError::Protocol(
                "peer control page has a bad magic".into(),
            ));
        }
        Ok(page)
    }

    /// The page's memfd (to send to the peer).
    pub(crate) fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.mem.fd()
    }

    pub(crate) fn mem(&self) -> &SharedMemory {
        &self.mem
    }

    pub(crate) fn u32_at(&self, offset: u64) -> Result<&AtomicU32> {
        Ok(self.mem.atomic_u32_at(offset)?)
    }

    pub(crate) fn u64_at(&self, offset: u64) -> Result<&AtomicU64> {
        Ok(self.mem.atomic_u64_at(offset)?)
    }

    /// The wait word at `offset` (sequence) and `offset + 4` (sleepers).
    pub(crate) fn wait_word(&self, offset: u64) -> Result<WaitWord<'_>> {
        Ok(WaitWord::new(
            self.u32_at(offset)?,
            self.u32_at(offset + 4)?,
        ))
    }

    pub(crate) fn spad_offset(index: usize) -> u64 {
        SPADS + 4 * index as u64
    }

    pub(crate) fn msg_offset(index: usize) -> u64 {
        MSGS + 4 * index as u64
    }

    /// Offset of ring entry `position` (modulo the ring size).
    pub(crate) fn entry_offset(position: u32) -> u64 {
        RING_BASE + u64::from(position % RING_ENTRIES) * ENTRY_SIZE
    }
}

/// Size of the file behind `fd`.
pub(crate) fn fd_size(fd: &OwnedFd) -> Result<u64> {
    Ok(devlend_memory::file_info(fd.as_fd())?.size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_fits_and_pages_round_trip() {
        assert!(SPADS + 4 * MAX_SPADS as u64 <= CPL_TAG);
        assert!(MSGS + 4 * MAX_MSGS as u64 <= SPADS);
        assert!(CPL_DATA + ENTRY_DATA_MAX as u64 <= RING_WAIT);
        assert!(E_DATA + ENTRY_DATA_MAX as u64 <= ENTRY_SIZE);
        assert!(RING_ENTRIES.is_power_of_two());
        let a = ControlPage::create().unwrap();
        let fd = a.fd().try_clone_to_owned().unwrap();
        let b = ControlPage::from_peer(fd).unwrap();
        a.u64_at(DB_BITS)
            .unwrap()
            .store(5, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(
            b.u64_at(DB_BITS)
                .unwrap()
                .load(std::sync::atomic::Ordering::SeqCst),
            5
        );
        assert_eq!(
            ControlPage::entry_offset(RING_ENTRIES + 1),
            RING_BASE + ENTRY_SIZE
        );
    }

    #[test]
    fn unsealed_or_foreign_pages_are_refused() {
        let plain = SharedMemory::new("x", PAGE_SIZE).unwrap();
        let fd = plain.fd().try_clone_to_owned().unwrap();
        assert!(matches!(
            ControlPage::from_peer(fd),
            Err(FabricError::Protocol(_))
        ));
    }
}
