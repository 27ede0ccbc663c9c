//! The narrow seam between the backend and the kernel: [`VfioHw`].

use std::os::fd::{BorrowedFd, OwnedFd};

use vmm_sys_util::eventfd::EventFd;

use crate::VfioError;

/// One VFIO region as `VFIO_DEVICE_GET_REGION_INFO` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Size in bytes (0: the region does not exist).
    pub size: u64,
    /// `VFIO_REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// The parts that may be mmapped (offset, length), from the sparse-mmap capability; `None`
    /// when the region has no such capability (then all of it may, if `flags` say so).
    pub sparse: Option<Vec<(u64, u64)>>,
}

impl RegionInfo {
    /// Whether the region may be read.
    pub fn readable(&self) -> bool {
        self.flags & vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_READ != 0
    }

    /// Whether the region may be written.
    pub fn writable(&self) -> bool {
        self.flags & vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_WRITE != 0
    }

    /// Whether parts of it may be mmapped.
    pub fn mappable(&self) -> bool {
        self.flags & vfio_bindings::bindings::vfio::VFIO_REGION_INFO_FLAG_MMAP != 0
    }
}

/// What the backend needs from the kernel, and nothing more: regions, MSI-X eventfds, DMA
/// mappings in the container's IOMMU, reset. [`crate::KernelVfio`] is the real one.
pub trait VfioHw: Send + Sync {
    /// Region `index` (`VFIO_PCI_BAR0_REGION_INDEX` ..= `VFIO_PCI_CONFIG_REGION_INDEX`).
    fn region(&self, index: u32) -> Option<RegionInfo>;
    /// Reads `buf.len()` bytes at `offset` inside region `index`.
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), VfioError>;
    /// Writes `data` at `offset` inside region `index`.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioError>;
    /// Maps `[offset, offset + len)` of region `index` (page-aligned, inside a mappable area);
    /// `Ok(None)` when this implementation never maps.
    fn region_mmap(
        &self,
        index: u32,
        offset: u64,
        len: u64,
    ) -> Result<Option<BarMapping>, VfioError>;
    /// A descriptor through which another process can map `[offset, offset + len)` of region
    /// `index` itself (a duplicate of the device descriptor), with the file offset of that
    /// range; `Ok(None)` when this implementation has none (then the BAR is reached only
    /// through this process).
    fn region_fd(
        &self,
        index: u32,
        offset: u64,
        len: u64,
    ) -> Result<Option<(OwnedFd, u64)>, VfioError> {
        let _ = (index, offset, len);
        Ok(None)
    }
    /// How many MSI-X vectors VFIO can signal.
    fn msix_count(&self) -> u32;
    /// Routes MSI-X vector `i` to `fds[i]` (enabling MSI-X in the device); an empty slice
    /// disables MSI-X.
    fn set_msix(&self, fds: &[&EventFd]) -> Result<(), VfioError>;
    /// Points vector `vector` alone at `fd` while MSI-X is enabled (`VFIO_DEVICE_SET_IRQS`
    /// with `start = vector, count = 1`); the other vectors keep their eventfds.
    fn set_msix_vector(&self, vector: u32, fd: &EventFd) -> Result<(), VfioError>;
    /// Maps `[iova, iova + len)` of the device's IOVA space onto the process memory at `vaddr`.
    ///
    /// # Safety
    /// `[vaddr, vaddr + len)` must stay mapped in this process until [`VfioHw::dma_unmap`]
    /// removes the mapping, and must only ever be accessed with volatile or atomic operations
    /// (the device writes it at any time).
    unsafe fn dma_map(
        &self,
        iova: u64,
        len: u64,
        vaddr: *mut u8,
        writable: bool,
    ) -> Result<(), VfioError>;
    /// Removes the mapping made at exactly `[iova, iova + len)`.
    fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), VfioError>;
    /// Resets the function (`VFIO_DEVICE_RESET`).
    fn reset(&self) -> Result<(), VfioError>;
}

/// An mmap of part of a BAR region: device memory, accessed only with volatile operations.
#[derive(Debug)]
pub struct BarMapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is device memory shared with the hardware; every access is a volatile
// load or store of plain bytes, which is sound from any thread.
unsafe impl Send for BarMapping {}
// SAFETY: as above; no Rust references into the mapping are ever created.
unsafe impl Sync for BarMapping {}

impl BarMapping {
    /// Maps `len` bytes of `fd` at file offset `offset` (shared, read-write).
    pub fn map(fd: BorrowedFd<'_>, offset: u64, len: u64) -> Result<Self, VfioError> {
        let len = usize::try_from(len).map_err(|_| VfioError::Io {
            op: "mmap BAR",
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        let off = libc::off_t::try_from(offset).map_err(|_| VfioError::Io {
            op: "mmap BAR",
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        // SAFETY: a fresh shared mapping chosen by the kernel; it aliases no Rust object. The
        // fd is valid for the call (borrowed).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                off,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(VfioError::io("mmap BAR")(std::io::Error::last_os_error()));
        }
        Ok(Self {
            ptr: ptr.cast(),
            len,
        })
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    /// Whether the mapping is empty (never: mappings have at least one page).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn at(&self, offset: u64, len: usize) -> Option<*mut u8> {
        let off = usize::try_from(offset).ok()?;
        (off.checked_add(len)? <= self.len).then(|| self.ptr.wrapping_add(off))
    }

    /// Reads `buf.len()` bytes at `offset`: one access of that width when it is 1, 2, 4 or 8
    /// bytes and aligned (a register read), bytes otherwise. `false` when out of bounds.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> bool {
        let Some(p) = self.at(offset, buf.len()) else {
            return false;
        };
        let aligned = offset % (buf.len().max(1) as u64) == 0;
        // SAFETY: `p .. p + buf.len()` is inside the live mapping (checked by `at`); aligned
        // for the width used; volatile, as the device owns this memory.
        unsafe {
            match (buf.len(), aligned) {
                (4, true) => buf.copy_from_slice(&p.cast::<u32>().read_volatile().to_ne_bytes()),
                (8, true) => buf.copy_from_slice(&p.cast::<u64>().read_volatile().to_ne_bytes()),
                (2, true) => buf.copy_from_slice(&p.cast::<u16>().read_volatile().to_ne_bytes()),
                _ => {
                    for (i, b) in buf.iter_mut().enumerate() {
                        *b = p.add(i).read_volatile();
                    }
                }
            }
        }
        true
    }

    /// Writes `data` at `offset`, as [`BarMapping::read`] reads. `false` when out of bounds.
    pub fn write(&self, offset: u64, data: &[u8]) -> bool {
        let Some(p) = self.at(offset, data.len()) else {
            return false;
        };
        let aligned = offset % (data.len().max(1) as u64) == 0;
        // SAFETY: as in `read`.
        unsafe {
            match (data.len(), aligned) {
                (4, true) => {
                    let v = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
                    p.cast::<u32>().write_volatile(v)
                }
                (8, true) => {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(data);
                    p.cast::<u64>().write_volatile(u64::from_ne_bytes(b))
                }
                (2, true) => p
                    .cast::<u16>()
                    .write_volatile(u16::from_ne_bytes([data[0], data[1]])),
                _ => {
                    for (i, b) in data.iter().enumerate() {
                        p.add(i).write_volatile(*b);
                    }
                }
            }
        }
        true
    }
}

impl Drop for BarMapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `map`, unmapped once here; no
        // references into it exist.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}
