//! Shared-memory mappings (memfd, `MAP_SHARED`) with bounds-checked, copy-based access.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use rustix::thread::futex::Flags as FutexFlags;

/// Errors of shared-memory creation and access.
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// An access reached outside the mapping.
    #[error("access of {len} bytes at offset {offset:#x} is outside a mapping of {size:#x} bytes")]
    OutOfBounds {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Size of the mapping.
        size: u64,
    },
    /// An atomic access was not naturally aligned.
    #[error("atomic access at offset {offset:#x} is not {align}-byte aligned")]
    Misaligned {
        /// Offset of the access.
        offset: u64,
        /// Required alignment.
        align: u64,
    },
    /// A mapping must have a non-zero size.
    #[error("a mapping of zero bytes is not allowed")]
    ZeroSize,
    /// The operating system refused (memfd_create, ftruncate, mmap, pread, pwrite).
    #[error("{op} failed: {source}")]
    Os {
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Memory from elsewhere (a peer, a VMM) whose file could be truncated under our mapping.
    #[error(
        "the shared memory fd is not sealed against shrinking (F_SEAL_SHRINK): whoever holds it \
         could truncate it and crash this process on its next access; share a sealed memfd \
         (QEMU: -object memory-backend-memfd,share=on, which seals by default)"
    )]
    NotSealed,
    /// Memory from elsewhere whose file is shorter than the range to be mapped.
    #[error("the shared memory fd holds {size:#x} bytes, but {needed:#x} are to be mapped")]
    FileTooSmall {
        /// Size of the file.
        size: u64,
        /// End of the range to map (`fd_offset + len`).
        needed: u64,
    },
    /// A file transfer stopped before the requested length.
    #[error("{op} transferred {done} of {len} bytes")]
    ShortTransfer {
        /// pread or pwrite.
        op: &'static str,
        /// Bytes moved before the file ended.
        done: usize,
        /// Bytes requested.
        len: usize,
    },
}

fn os(op: &'static str) -> MemError {
    MemError::Os {
        op,
        source: std::io::Error::last_os_error(),
    }
}

fn errno(op: &'static str) -> impl FnOnce(rustix::io::Errno) -> MemError {
    move |e| MemError::Os {
        op,
        source: e.into(),
    }
}

/// Identity and size of the file behind a descriptor (from `fstat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileInfo {
    /// Device and inode: the same for every descriptor of one memory object.
    pub id: (u64, u64),
    /// Size in bytes.
    pub size: u64,
}

/// `fstat` of `fd`: identity and size.
pub fn file_info(fd: BorrowedFd<'_>) -> Result<FileInfo, MemError> {
    let st = rustix::fs::fstat(fd).map_err(errno("fstat"))?;
    Ok(FileInfo {
        id: (st.st_dev, st.st_ino),
        size: u64::try_from(st.st_size).unwrap_or(0),
    })
}

/// Checks that `fd` may be mapped over `[fd_offset, fd_offset + len)` without another holder
/// being able to make an access fault: the file is sealed against shrinking (so nobody can
/// truncate it later) and already holds the whole range. Every fd received from another
/// process goes through this before it is mapped ([`SharedMemory::map`] calls it).
pub fn check_mappable(fd: BorrowedFd<'_>, fd_offset: u64, len: u64) -> Result<(), MemError> {
    let seals = rustix::fs::fcntl_get_seals(fd).map_err(|_| MemError::NotSealed)?;
    if !seals.contains(rustix::fs::SealFlags::SHRINK) {
        return Err(MemError::NotSealed);
    }
    let needed = fd_offset.checked_add(len).ok_or(MemError::OutOfBounds {
        offset: fd_offset,
        len,
        size: u64::MAX,
    })?;
    let size = file_info(fd)?.size;
    if size < needed {
        return Err(MemError::FileTooSmall { size, needed });
    }
    Ok(())
}

/// A region of memory backed by a file descriptor (normally a memfd) and mapped `MAP_SHARED`,
/// so that another process mapping the same descriptor sees the same bytes.
///
/// Access is by offset, bounds-checked, atomic or volatile (other processes write the same
/// bytes at any time), and never hands out references to plain bytes of the mapping.
#[derive(Debug)]
pub struct SharedMemory {
    fd: OwnedFd,
    fd_offset: u64,
    ptr: NonNull<u8>,
    len: usize,
    /// A device's registers (a BAR mapped through VFIO), not RAM: see
    /// [`SharedMemory::map_device`].
    device: bool,
}

// SAFETY: `SharedMemory` owns its mapping (unmapped only in `Drop`) and its fd; nothing in it
// is tied to the creating thread, so it may move to another thread.
unsafe impl Send for SharedMemory {}
// SAFETY: no access this process makes to the mapped bytes through `&SharedMemory` is a plain
// one, and none creates a Rust reference to plain bytes: copies and fills are atomic loads and
// stores at their ends and volatile aligned accesses in their middle (`crate::copy`), register
// accesses hand out `&AtomicU32`/`&AtomicU64`, and `ptr_at` is for the kernel (pread, pwrite,
// futex) only. Memory that other threads and processes write at any time is treated as such,
// as vm-memory treats guest memory, so sharing it between threads is sound.
unsafe impl Sync for SharedMemory {}

impl SharedMemory {
    /// Creates a new zero-filled memfd of `len` bytes and maps it. The memfd is sealed
    /// against shrinking and growing at once, so no process it is shared with (a peer, a
    /// device's lender) can truncate it under anybody's mapping.
    pub fn new(name: &str, len: usize) -> Result<Self, MemError> {
        use rustix::fs::{MemfdFlags, SealFlags};
        if len == 0 {
            return Err(MemError::ZeroSize);
        }
        let fd = rustix::fs::memfd_create(
            name.replace('\0', "_"),
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )
        .map_err(errno("memfd_create"))?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(errno("ftruncate"))?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW)
            .map_err(errno("fcntl(F_ADD_SEALS)"))?;
        Self::map(fd, 0, len)
    }

    /// Maps `len` bytes of a device's registers: `fd` is a VFIO device descriptor and
    /// `[fd_offset, fd_offset + len)` (page-aligned) a part of one of its BAR regions that VFIO
    /// lets be mapped. The result is accessed like RAM (register-sized accesses are single
    /// loads and stores, see `copy`), but it is not RAM: no futex, and it is announced to a peer
    /// as device memory ([`SharedMemory::is_device`]).
    ///
    /// No seal check ([`check_mappable`]): a device region cannot be truncated. The caller
    /// vouches that `fd` is a VFIO device (the shm fabric asks the kernel for the region before
    /// mapping what a peer sent); the kernel refuses ranges outside a mappable area.
    pub fn map_device(fd: OwnedFd, fd_offset: u64, len: usize) -> Result<Self, MemError> {
        let mut m = Self::map_unchecked(fd, fd_offset, len)?;
        m.device = true;
        Ok(m)
    }

    /// Whether this is a device's registers ([`SharedMemory::map_device`]) rather than RAM.
    pub fn is_device(&self) -> bool {
        self.device
    }

    /// Maps `len` bytes of `fd` from `fd_offset` (page-aligned), shared and writable.
    ///
    /// The fd may come from another process, so it must pass [`check_mappable`]: sealed
    /// against shrinking, and holding the whole range. Otherwise it is refused
    /// ([`MemError::NotSealed`], [`MemError::FileTooSmall`]): an access past the end of a
    /// truncated file would kill this process with SIGBUS.
    pub fn map(fd: OwnedFd, fd_offset: u64, len: usize) -> Result<Self, MemError> {
        if len == 0 {
            return Err(MemError::ZeroSize);
        }
        use std::os::fd::AsFd;
        check_mappable(fd.as_fd(), fd_offset, len as u64)?;
        Self::map_unchecked(fd, fd_offset, len)
    }

    /// `mmap` of `fd` without the checks of [`SharedMemory::map`] (callers made their own).
    fn map_unchecked(fd: OwnedFd, fd_offset: u64, len: usize) -> Result<Self, MemError> {
        if len == 0 {
            return Err(MemError::ZeroSize);
        }
        let off = libc::off_t::try_from(fd_offset).map_err(|_| MemError::OutOfBounds {
            offset: fd_offset,
            len: len as u64,
            size: i64::MAX as u64,
        })?;
        // SAFETY: a fresh mapping chosen by the kernel (NULL hint); `fd` is valid for the call.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(os("mmap"));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(MemError::ZeroSize)?;
        Ok(Self {
            fd,
            fd_offset,
            ptr,
            len,
            device: false,
        })
    }

    /// The backing descriptor, e.g. to pass to another process with `SCM_RIGHTS`.
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Offset of this mapping within its descriptor.
    pub fn fd_offset(&self) -> u64 {
        self.fd_offset
    }

    /// Size of the mapping in bytes.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, MemError> {
        let end = offset.checked_add(len as u64);
        match end {
            Some(end) if end <= self.len as u64 => Ok(offset as usize),
            _ => Err(MemError::OutOfBounds {
                offset,
                len: len as u64,
                size: self.len as u64,
            }),
        }
    }

    fn check_aligned(&self, offset: u64, size: usize) -> Result<usize, MemError> {
        let off = self.check(offset, size)?;
        if off % size != 0 {
            return Err(MemError::Misaligned {
                offset,
                align: size as u64,
            });
        }
        Ok(off)
    }

    /// Raw pointer to `offset`, after checking that `len` bytes from there are inside.
    ///
    /// For handing a destination or source to the kernel (`pread`, `pwrite`, `recv`) or to an
    /// atomic; never turn it into a Rust reference to bytes other parties may write.
    pub fn ptr_at(&self, offset: u64, len: usize) -> Result<*mut u8, MemError> {
        let off = self.check(offset, len)?;
        // SAFETY: `off + len <= self.len`, so the result stays inside the mapping.
        Ok(unsafe { self.ptr.as_ptr().add(off) })
    }

    /// Copies `buf.len()` bytes from the mapping at `offset` into `buf`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let src = self.ptr_at(offset, buf.len())?;
        // SAFETY: `src..src+len` is inside the mapping (checked), which lives as long as
        // `self`; this process touches mapped bytes only atomically (module docs of `copy`).
        unsafe { crate::copy::copy_from_shared(buf, src) };
        Ok(())
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), MemError> {
        let dst = self.ptr_at(offset, data.len())?;
        // SAFETY: `dst..dst+len` is inside the mapping (checked); see `read_at`.
        unsafe { crate::copy::copy_to_shared(dst, data) };
        Ok(())
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: u64, len: usize, byte: u8) -> Result<(), MemError> {
        let dst = self.ptr_at(offset, len)?;
        // SAFETY: `dst..dst+len` is inside the mapping (checked); see `read_at`.
        unsafe { crate::copy::fill_shared(dst, len, byte) };
        Ok(())
    }

    fn atomic_u32(&self, offset: u64) -> Result<&AtomicU32, MemError> {
        let off = self.check_aligned(offset, 4)?;
        // SAFETY: in bounds and 4-byte aligned (the mapping is page-aligned); the atomic type
        // is the only way we touch these bytes as a u32, and atomics tolerate concurrent access
        // from other threads and processes.
        Ok(unsafe { AtomicU32::from_ptr(self.ptr.as_ptr().add(off).cast::<u32>()) })
    }

    fn atomic_u64(&self, offset: u64) -> Result<&AtomicU64, MemError> {
        let off = self.check_aligned(offset, 8)?;
        // SAFETY: in bounds and 8-byte aligned; see `atomic_u32`.
        Ok(unsafe { AtomicU64::from_ptr(self.ptr.as_ptr().add(off).cast::<u64>()) })
    }

    /// Atomic 32-bit load (acquire) at a 4-byte-aligned offset.
    pub fn load_u32(&self, offset: u64) -> Result<u32, MemError> {
        Ok(self.atomic_u32(offset)?.load(Ordering::Acquire))
    }

    /// Atomic 32-bit store (release) at a 4-byte-aligned offset.
    pub fn store_u32(&self, offset: u64, value: u32) -> Result<(), MemError> {
        self.atomic_u32(offset)?.store(value, Ordering::Release);
        Ok(())
    }

    /// Atomic 64-bit load (acquire) at an 8-byte-aligned offset.
    pub fn load_u64(&self, offset: u64) -> Result<u64, MemError> {
        Ok(self.atomic_u64(offset)?.load(Ordering::Acquire))
    }

    /// Atomic 64-bit store (release) at an 8-byte-aligned offset.
    pub fn store_u64(&self, offset: u64, value: u64) -> Result<(), MemError> {
        self.atomic_u64(offset)?.store(value, Ordering::Release);
        Ok(())
    }

    /// The 32-bit atomic at a 4-byte-aligned offset, for read-modify-write and futex words.
    pub fn atomic_u32_at(&self, offset: u64) -> Result<&AtomicU32, MemError> {
        self.atomic_u32(offset)
    }

    /// The 64-bit atomic at an 8-byte-aligned offset, for read-modify-write.
    pub fn atomic_u64_at(&self, offset: u64) -> Result<&AtomicU64, MemError> {
        self.atomic_u64(offset)
    }

    /// Sleeps while the 32-bit word at `offset` (4-byte aligned) holds `expected`, for at most
    /// `timeout` (`None`: no limit); see [`futex_wait`].
    pub fn futex_wait(
        &self,
        offset: u64,
        expected: u32,
        timeout: Option<std::time::Duration>,
    ) -> Result<(), MemError> {
        futex_wait(self.atomic_u32(offset)?, expected, timeout);
        Ok(())
    }

    /// Wakes up to `count` waiters sleeping on the 32-bit word at `offset` (in any process).
    pub fn futex_wake(&self, offset: u64, count: u32) -> Result<(), MemError> {
        futex_wake(self.atomic_u32(offset)?, count);
        Ok(())
    }

    /// Reads `len` bytes of `file` at `file_offset` straight into the mapping at `offset`
    /// (one copy, by the kernel). A file that ends early is an error.
    pub fn read_from_file(
        &self,
        offset: u64,
        len: usize,
        file: &File,
        file_offset: u64,
    ) -> Result<(), MemError> {
        self.file_transfer(FileOp::Pread, offset, len, file, file_offset)
    }

    /// Writes `len` bytes from the mapping at `offset` to `file` at `file_offset`.
    pub fn write_to_file(
        &self,
        offset: u64,
        len: usize,
        file: &File,
        file_offset: u64,
    ) -> Result<(), MemError> {
        self.file_transfer(FileOp::Pwrite, offset, len, file, file_offset)
    }

    /// `pread`s into, or `pwrite`s from, `len` bytes of the mapping at `offset`, resuming
    /// after short transfers and EINTR.
    fn file_transfer(
        &self,
        op: FileOp,
        offset: u64,
        len: usize,
        file: &File,
        file_offset: u64,
    ) -> Result<(), MemError> {
        let mem = self.ptr_at(offset, len)?;
        let mut done = 0usize;
        while done < len {
            // SAFETY: `mem + done .. mem + len` is inside the mapping (checked above); the
            // kernel reads from (pwrite) or writes to (pread) at most `len - done` bytes there.
            let n = unsafe {
                let at = mem.add(done).cast();
                let pos = (file_offset + done as u64) as libc::off_t;
                match op {
                    FileOp::Pread => libc::pread(file.as_raw_fd(), at, len - done, pos),
                    FileOp::Pwrite => libc::pwrite(file.as_raw_fd(), at, len - done, pos),
                }
            };
            let name = match op {
                FileOp::Pread => "pread",
                FileOp::Pwrite => "pwrite",
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(MemError::Os {
                    op: name,
                    source: err,
                });
            }
            if n == 0 {
                return Err(MemError::ShortTransfer {
                    op: name,
                    done,
                    len,
                });
            }
            done += n as usize;
        }
        Ok(())
    }
}

#[derive(Clone, Copy)]
enum FileOp {
    Pread,
    Pwrite,
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe exactly the mapping made in `map`, which nothing else
        // unmaps; no references into it can outlive `self` (none are ever handed out).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// Sleeps while `word` holds `expected`, for at most `timeout` (`None`: no limit). When the
/// word lives in shared memory this works across processes (a non-private futex). Returns when
/// woken, when the value differs, on timeout or on a signal: callers re-check their condition.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<std::time::Duration>) {
    let ts = timeout.map(|t| rustix::thread::futex::Timespec {
        tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    // Not FUTEX_PRIVATE: the word may be shared with another process. Every error (EAGAIN,
    // EINTR, ETIMEDOUT) means "re-check".
    let _ = rustix::thread::futex::wait(word, FutexFlags::empty(), expected, ts.as_ref());
}

/// Wakes up to `count` waiters sleeping on `word` (in any process, for shared memory).
pub fn futex_wake(word: &AtomicU32, count: u32) {
    let _ = rustix::thread::futex::wake(word, FutexFlags::empty(), count.min(i32::MAX as u32));
}

/// The sleep protocol of one sleeper on a 32-bit word that wakers in any process can reach
/// (a device model's worker and the writers of its doorbells): the word is 1 while the
/// sleeper sleeps or is about to, 0 otherwise.
///
/// The sleeper [`announce`](SleepWord::announce)s, re-checks its condition, then
/// [`sleep`](SleepWord::sleep)s and [`end`](SleepWord::end)s. A waker makes the condition
/// true, then calls [`wake`](SleepWord::wake), which sets the word back to 0 *before* its
/// futex wake: a wake that comes after the sleeper's re-check but before its futex wait makes
/// that wait return at once, because the kernel compares the word with 1. (Leaving the word at
/// 1 would lose such a wake, and the sleeper would sleep until its timeout.) Announce and
/// wake are `SeqCst`, so either the re-check sees the condition or the waker sees the 1.
///
/// A peer that writes the word can only cause spurious wake-ups or a sleep until the timeout.
#[derive(Clone, Copy)]
pub struct SleepWord<'a>(&'a AtomicU32);

/// How [`SleepWord::sleep`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slept {
    /// A waker cleared the word (before or during the wait).
    Woken,
    /// The word was still 1: the timeout passed (or a signal or a spurious wake-up came).
    TimedOut,
}

impl<'a> SleepWord<'a> {
    /// The protocol on `word`.
    pub fn new(word: &'a AtomicU32) -> Self {
        Self(word)
    }

    /// The sleeper: about to sleep (then re-check the condition before [`SleepWord::sleep`]).
    pub fn announce(&self) {
        self.0.store(1, Ordering::SeqCst);
    }

    /// The sleeper: sleeps while the word is 1, at most `timeout`.
    pub fn sleep(&self, timeout: Option<std::time::Duration>) -> Slept {
        futex_wait(self.0, 1, timeout);
        if self.0.load(Ordering::SeqCst) == 0 {
            Slept::Woken
        } else {
            Slept::TimedOut
        }
    }

    /// The sleeper: awake again (after [`SleepWord::sleep`], or instead of it when the
    /// re-check found work).
    pub fn end(&self) {
        self.0.store(0, Ordering::SeqCst);
    }

    /// Whether the sleeper announced a sleep that no waker has ended yet (it sleeps, or is
    /// about to).
    pub fn is_announced(&self) -> bool {
        self.0.load(Ordering::SeqCst) != 0
    }

    /// A waker, after making the condition true: wakes the sleeper if it sleeps or is about
    /// to. Returns whether it did (a futex wake was made). The busy case (no sleeper) is one
    /// load and writes nothing.
    pub fn wake(&self) -> bool {
        fence(Ordering::SeqCst);
        if self.0.load(Ordering::SeqCst) != 0 && self.0.swap(0, Ordering::SeqCst) != 0 {
            futex_wake(self.0, 1);
            true
        } else {
            false
        }
    }
}

/// A bounds-checked view of part of a [`SharedMemory`]: what an IOMMU lookup or a direct
/// window mapping resolves to. Offsets are relative to the span's start.
#[derive(Clone, Debug)]
pub struct MemSpan {
    mem: Arc<SharedMemory>,
    offset: u64,
    len: u64,
}

impl MemSpan {
    /// `len` bytes of `mem` from `offset`; fails when that reaches outside `mem`.
    pub fn new(mem: Arc<SharedMemory>, offset: u64, len: u64) -> Result<Self, MemError> {
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= mem.len() as u64 => Ok(Self { mem, offset, len }),
            _ => Err(MemError::OutOfBounds {
                offset,
                len,
                size: mem.len() as u64,
            }),
        }
    }

    /// The whole of `mem`.
    pub fn whole(mem: Arc<SharedMemory>) -> Self {
        let len = mem.len() as u64;
        Self {
            mem,
            offset: 0,
            len,
        }
    }

    /// Length in bytes.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> u64 {
        self.len
    }

    /// The underlying mapping and this span's offset in it.
    pub fn memory(&self) -> (&Arc<SharedMemory>, u64) {
        (&self.mem, self.offset)
    }

    /// A sub-span `[offset, offset + len)` of this span.
    pub fn subspan(&self, offset: u64, len: u64) -> Result<MemSpan, MemError> {
        self.inner(offset, len)?;
        MemSpan::new(self.mem.clone(), self.offset + offset, len)
    }

    fn inner(&self, offset: u64, len: u64) -> Result<u64, MemError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.offset + offset),
            _ => Err(MemError::OutOfBounds {
                offset,
                len,
                size: self.len,
            }),
        }
    }

    /// Copies out of the span.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), MemError> {
        let at = self.inner(offset, buf.len() as u64)?;
        self.mem.read_at(at, buf)
    }

    /// Copies into the span.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), MemError> {
        let at = self.inner(offset, data.len() as u64)?;
        self.mem.write_at(at, data)
    }

    /// Fills part of the span with `byte`.
    pub fn fill(&self, offset: u64, len: usize, byte: u8) -> Result<(), MemError> {
        let at = self.inner(offset, len as u64)?;
        self.mem.fill(at, len, byte)
    }

    /// Atomic 32-bit load at a span offset.
    pub fn load_u32(&self, offset: u64) -> Result<u32, MemError> {
        let at = self.inner(offset, 4)?;
        self.mem.load_u32(at)
    }

    /// Atomic 32-bit store at a span offset.
    pub fn store_u32(&self, offset: u64, value: u32) -> Result<(), MemError> {
        let at = self.inner(offset, 4)?;
        self.mem.store_u32(at, value)
    }

    /// Atomic 64-bit load at a span offset.
    pub fn load_u64(&self, offset: u64) -> Result<u64, MemError> {
        let at = self.inner(offset, 8)?;
        self.mem.load_u64(at)
    }

    /// Atomic 64-bit store at a span offset.
    pub fn store_u64(&self, offset: u64, value: u64) -> Result<(), MemError> {
        let at = self.inner(offset, 8)?;
        self.mem.store_u64(at, value)
    }

    /// The 32-bit atomic at a span offset (4-byte aligned).
    pub fn atomic_u32_at(&self, offset: u64) -> Result<&AtomicU32, MemError> {
        let at = self.inner(offset, 4)?;
        self.mem.atomic_u32_at(at)
    }

    /// [`SharedMemory::futex_wait`] at a span offset.
    pub fn futex_wait(
        &self,
        offset: u64,
        expected: u32,
        timeout: Option<std::time::Duration>,
    ) -> Result<(), MemError> {
        let at = self.inner(offset, 4)?;
        self.mem.futex_wait(at, expected, timeout)
    }

    /// [`SharedMemory::futex_wake`] at a span offset.
    pub fn futex_wake(&self, offset: u64, count: u32) -> Result<(), MemError> {
        let at = self.inner(offset, 4)?;
        self.mem.futex_wake(at, count)
    }

    /// `pread` from `file` straight into the span.
    pub fn read_from_file(
        &self,
        offset: u64,
        len: usize,
        file: &File,
        file_offset: u64,
    ) -> Result<(), MemError> {
        let at = self.inner(offset, len as u64)?;
        self.mem.read_from_file(at, len, file, file_offset)
    }

    /// `pwrite` from the span straight to `file`.
    pub fn write_to_file(
        &self,
        offset: u64,
        len: usize,
        file: &File,
        file_offset: u64,
    ) -> Result<(), MemError> {
        let at = self.inner(offset, len as u64)?;
        self.mem.write_to_file(at, len, file, file_offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn bounds_are_checked() {
        let m = SharedMemory::new("t", 4096).unwrap();
        m.write_at(4092, &[1, 2, 3, 4]).unwrap();
        assert!(matches!(
            m.write_at(4093, &[1, 2, 3, 4]),
            Err(MemError::OutOfBounds { .. })
        ));
        assert!(matches!(
            m.read_at(u64::MAX, &mut [0u8; 2]),
            Err(MemError::OutOfBounds { .. })
        ));
        assert!(matches!(m.load_u32(2), Err(MemError::Misaligned { .. })));
        assert!(matches!(SharedMemory::new("z", 0), Err(MemError::ZeroSize)));
        let mut b = [0u8; 4];
        m.read_at(4092, &mut b).unwrap();
        assert_eq!(b, [1, 2, 3, 4]);
    }

    #[test]
    fn two_mappings_of_one_fd_share_bytes() {
        let a = SharedMemory::new("t", 8192).unwrap();
        let fd = a.fd().try_clone_to_owned().unwrap();
        let b = SharedMemory::map(fd, 4096, 4096).unwrap();
        a.store_u64(4096 + 8, 0xdead_beef).unwrap();
        assert_eq!(b.load_u64(8).unwrap(), 0xdead_beef);
    }

    #[test]
    fn spans_and_files() {
        let m = Arc::new(SharedMemory::new("t", 8192).unwrap());
        let s = MemSpan::new(m.clone(), 4096, 4096).unwrap();
        assert!(MemSpan::new(m.clone(), 4096, 4097).is_err());
        assert!(s.subspan(4000, 97).is_err());
        let mut f = tempfile_in_tmp();
        f.write_all(&[7u8; 512]).unwrap();
        s.read_from_file(10, 512, &f, 0).unwrap();
        let mut b = [0u8; 2];
        m.read_at(4096 + 520, &mut b).unwrap();
        assert_eq!(b, [7, 7]);
        assert!(matches!(
            s.read_from_file(0, 1024, &f, 0),
            Err(MemError::ShortTransfer { .. })
        ));
        s.write_to_file(10, 4, &f, 1000).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 1004);
    }

    #[test]
    fn futex_wakes_across_mappings() {
        let a = Arc::new(SharedMemory::new("t", 4096).unwrap());
        let b = SharedMemory::map(a.fd().try_clone_to_owned().unwrap(), 0, 4096).unwrap();
        a.store_u32(64, 1).unwrap();
        let waiter = {
            let a = a.clone();
            std::thread::spawn(move || {
                while a.load_u32(64).unwrap() == 1 {
                    a.futex_wait(64, 1, Some(std::time::Duration::from_secs(5)))
                        .unwrap();
                }
            })
        };
        b.store_u32(64, 0).unwrap();
        b.futex_wake(64, 1).unwrap();
        waiter.join().unwrap();
        // A value that differs returns at once; misaligned words are errors.
        a.futex_wait(64, 7, None).unwrap();
        assert!(a.futex_wake(66, 1).is_err());
    }

    /// The interleaving that lost wake-ups before the waker cleared the word: the sleeper has
    /// announced and re-checked (nothing to do), the waker makes the condition true and wakes
    /// (nobody is in the futex yet), and only then does the sleeper call its futex wait. The
    /// wait must not sleep. Deterministic: with a waker that left the word at 1 the sleep
    /// below would end only by its timeout and report `TimedOut`, every time.
    #[test]
    fn a_wake_before_the_futex_wait_is_not_lost() {
        let mem = Arc::new(SharedMemory::new("t", 4096).unwrap());
        let other = SharedMemory::map(mem.fd().try_clone_to_owned().unwrap(), 0, 4096).unwrap();
        let sleeper = SleepWord::new(mem.atomic_u32(0xffc).unwrap());
        let waker = SleepWord::new(other.atomic_u32(0xffc).unwrap());
        sleeper.announce();
        // (The sleeper's re-check of its condition found nothing here.)
        other.store_u32(0, 1).unwrap(); // the condition, in the other mapping
        assert!(waker.wake(), "the waker saw the announced sleeper");
        assert_eq!(mem.load_u32(0xffc).unwrap(), 0, "the wake cleared the word");
        assert_eq!(
            sleeper.sleep(Some(std::time::Duration::from_secs(2))),
            Slept::Woken
        );
        sleeper.end();
        // No sleeper: a wake writes nothing and makes no system call.
        assert!(!waker.wake());
        assert_eq!(mem.load_u32(0xffc).unwrap(), 0);
        // A sleeper in another thread is woken by a waker in another mapping.
        sleeper.announce();
        let t = {
            let mem = mem.clone();
            std::thread::spawn(move || {
                let s = SleepWord::new(mem.atomic_u32(0xffc).unwrap());
                // Spurious wake-ups (a signal) report TimedOut; sleep until cleared.
                while s.sleep(Some(std::time::Duration::from_secs(60))) != Slept::Woken {}
                s.end();
            })
        };
        // The thread may be in its futex wait or not there yet; either way the wake reaches
        // it (a futex wake, or the cleared word) and its sleep reports Woken.
        assert!(waker.wake(), "the announced sleeper is seen");
        t.join().unwrap();
    }

    /// A memfd as another process might hand one over: unsealed.
    fn unsealed_memfd(len: u64) -> OwnedFd {
        let fd = rustix::fs::memfd_create("plain", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, len).unwrap();
        fd
    }

    #[test]
    fn own_memfds_cannot_be_truncated_or_grown() {
        let m = SharedMemory::new("t", 8192).unwrap();
        let fd = m.fd().try_clone_to_owned().unwrap();
        assert!(rustix::fs::ftruncate(&fd, 0).is_err(), "shrinking refused");
        assert!(
            rustix::fs::ftruncate(&fd, 1 << 20).is_err(),
            "growing refused"
        );
        assert_eq!(file_info(m.fd()).unwrap().size, 8192);
        // Still mappable elsewhere, whole.
        SharedMemory::map(fd, 0, 8192).unwrap();
    }

    #[test]
    fn unsealed_or_short_fds_are_refused() {
        assert!(matches!(
            SharedMemory::map(unsealed_memfd(8192), 0, 4096),
            Err(MemError::NotSealed)
        ));
        let m = SharedMemory::new("t", 8192).unwrap();
        let fd = || m.fd().try_clone_to_owned().unwrap();
        assert!(matches!(
            SharedMemory::map(fd(), 4096, 8192),
            Err(MemError::FileTooSmall {
                size: 8192,
                needed: 12288
            })
        ));
        assert!(matches!(
            SharedMemory::map(fd(), u64::MAX - 4095, 8192),
            Err(MemError::OutOfBounds { .. })
        ));
        let msg = MemError::NotSealed.to_string();
        assert!(msg.contains("memory-backend-memfd"), "{msg}");
    }

    fn tempfile_in_tmp() -> File {
        let path = std::env::temp_dir().join(format!("devlend-mem-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        f
    }
}
