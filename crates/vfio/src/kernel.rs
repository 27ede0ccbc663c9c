//! [`KernelVfio`]: [`VfioHw`] on Linux VFIO (type1 IOMMU container, group, device).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_iommu_type1_dma_map, vfio_iommu_type1_dma_unmap, VFIO_BASE, VFIO_DEVICE_FLAGS_RESET,
    VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE, VFIO_IRQ_SET_ACTION_TRIGGER,
    VFIO_IRQ_SET_DATA_EVENTFD, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_PCI_MSIX_IRQ_INDEX, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_mut_ref, ioctl_with_ref};

use crate::hw::{BarMapping, RegionInfo, VfioHw};
use crate::VfioError;

// vfio-ioctls drops the result of these (or sets only whole ranges of vectors) (or cannot map read-only), so they are made
// here from vfio-bindings' structures.
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_SET_IRQS, VFIO_TYPE as u32, VFIO_BASE + 10);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_RESET, VFIO_TYPE as u32, VFIO_BASE + 11);

/// `struct vfio_irq_set` with room for exactly one eventfd in its trailing `data`.
#[repr(C)]
struct IrqSetOne {
    argsz: u32,
    flags: u32,
    index: u32,
    start: u32,
    count: u32,
    fd: i32,
}
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_MAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 13);
vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_UNMAP_DMA, VFIO_TYPE as u32, VFIO_BASE + 14);

/// A function opened through VFIO: its own type1 container (one IOMMU domain per lent
/// function, as SmartIO gives each borrower), its group, its device.
pub struct KernelVfio {
    // Drop order: the duplicate descriptor first (while it is open, the group cannot leave
    // its container: VFIO_GROUP_UNSET_CONTAINER fails with EBUSY), then the device, then the
    // container it is attached through.
    /// A duplicate of the device descriptor for positioned reads and writes that report errors.
    file: File,
    device: VfioDevice,
    container: Arc<VfioContainer>,
    regions: Vec<RegionInfo>,
    resettable: bool,
}

impl std::fmt::Debug for KernelVfio {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelVfio")
            .field("regions", &self.regions)
            .field("resettable", &self.resettable)
            .finish_non_exhaustive()
    }
}

fn open_err(what: &str) -> impl FnOnce(vfio_ioctls::VfioError) -> VfioError + '_ {
    move |e| VfioError::Open {
        what: what.to_string(),
        source: Box::new(e),
    }
}

impl KernelVfio {
    /// Opens the function whose sysfs directory is `sysfs_dev` (`/sys/bus/pci/devices/BDF`);
    /// it must be bound to `vfio-pci`, its IOMMU group viable.
    pub fn open(sysfs_dev: &Path) -> Result<Self, VfioError> {
        let container = Arc::new(
            VfioContainer::new(None)
                .map_err(open_err("opening the VFIO container /dev/vfio/vfio"))?,
        );
        let what = format!("opening {} through VFIO", sysfs_dev.display());
        let device =
            VfioDevice::new(sysfs_dev, container.clone(), false).map_err(open_err(&what))?;
        let file = File::from(
            device
                .as_fd_dup()
                .map_err(VfioError::io("duplicating the device descriptor"))?,
        );
        let regions = (0..=VFIO_PCI_CONFIG_REGION_INDEX)
            .map(|i| RegionInfo {
                size: device.get_region_size(i),
                flags: device.get_region_flags(i),
                sparse: device.get_region_caps(i).into_iter().find_map(|c| match c {
                    VfioRegionInfoCap::SparseMmap(s) => {
                        Some(s.areas.iter().map(|a| (a.offset, a.size)).collect())
                    }
                    _ => None,
                }),
            })
            .collect();
        let resettable = device_flags(&device) & VFIO_DEVICE_FLAGS_RESET != 0;
        Ok(Self {
            device,
            container,
            file,
            regions,
            resettable,
        })
    }

    fn region_at(&self, index: u32, offset: u64, len: usize) -> Result<u64, VfioError> {
        let r = self
            .regions
            .get(index as usize)
            .filter(|r| r.size > 0)
            .ok_or(VfioError::NoRegion(index))?;
        let inside = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= r.size);
        if !inside {
            return Err(VfioError::Io {
                op: "region access",
                source: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        Ok(self.device.get_region_offset(index) + offset)
    }
}

/// `VFIO_DEVICE_GET_INFO` flags, which vfio-ioctls keeps private: read again here.
fn device_flags(device: &VfioDevice) -> u32 {
    let mut info = vfio_bindings::bindings::vfio::vfio_device_info {
        argsz: std::mem::size_of::<vfio_bindings::bindings::vfio::vfio_device_info>() as u32,
        ..Default::default()
    };
    vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
    // SAFETY: the kernel writes at most `argsz` bytes into `info`, a live, exclusively borrowed
    // vfio_device_info; the fd is the device's.
    let rc = unsafe { ioctl_with_mut_ref(device, VFIO_DEVICE_GET_INFO(), &mut info) };
    if rc < 0 {
        0
    } else {
        info.flags
    }
}

trait AsFdDup {
    fn as_fd_dup(&self) -> std::io::Result<std::os::fd::OwnedFd>;
}

impl AsFdDup for VfioDevice {
    fn as_fd_dup(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        // SAFETY: the raw fd is the device's, open for as long as `self` (borrowed here).
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(self.as_raw_fd()) };
        fd.try_clone_to_owned()
    }
}

impl VfioHw for KernelVfio {
    fn region(&self, index: u32) -> Option<RegionInfo> {
        self.regions
            .get(index as usize)
            .filter(|r| r.size > 0)
            .cloned()
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), VfioError> {
        let at = self.region_at(index, offset, buf.len())?;
        self.file
            .read_exact_at(buf, at)
            .map_err(VfioError::io("VFIO region read"))
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), VfioError> {
        let at = self.region_at(index, offset, data.len())?;
        self.file
            .write_all_at(data, at)
            .map_err(VfioError::io("VFIO region write"))
    }

    fn region_mmap(
        &self,
        index: u32,
        offset: u64,
        len: u64,
    ) -> Result<Option<BarMapping>, VfioError> {
        let len_usize = usize::try_from(len).map_err(|_| VfioError::NoRegion(index))?;
        let at = self.region_at(index, offset, len_usize)?;
        BarMapping::map(self.file.as_fd(), at, len).map(Some)
    }

    fn region_fd(
        &self,
        index: u32,
        offset: u64,
        len: u64,
    ) -> Result<Option<(std::os::fd::OwnedFd, u64)>, VfioError> {
        let len_usize = usize::try_from(len).map_err(|_| VfioError::NoRegion(index))?;
        let at = self.region_at(index, offset, len_usize)?;
        let fd = self
            .file
            .as_fd()
            .try_clone_to_owned()
            .map_err(VfioError::io("duplicating the device descriptor"))?;
        Ok(Some((fd, at)))
    }

    fn msix_count(&self) -> u32 {
        self.device
            .get_irq_info(VFIO_PCI_MSIX_IRQ_INDEX)
            .map_or(0, |i| i.count)
    }

    fn set_msix(&self, fds: &[&EventFd]) -> Result<(), VfioError> {
        let r = if fds.is_empty() {
            self.device.disable_msix()
        } else {
            self.device.enable_msix(fds.to_vec())
        };
        r.map_err(|e| VfioError::Open {
            what: "VFIO_DEVICE_SET_IRQS (MSI-X)".into(),
            source: Box::new(e),
        })
    }

    fn set_msix_vector(&self, vector: u32, fd: &EventFd) -> Result<(), VfioError> {
        let set = IrqSetOne {
            argsz: std::mem::size_of::<IrqSetOne>() as u32,
            flags: VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
            index: VFIO_PCI_MSIX_IRQ_INDEX,
            start: vector,
            count: 1,
            fd: fd.as_raw_fd(),
        };
        // SAFETY: the kernel reads `argsz` bytes of `set`, a live vfio_irq_set header followed
        // by exactly `count` (1) descriptors; `fd` stays open for the call (borrowed).
        let rc = unsafe { ioctl_with_ref(&self.device, VFIO_DEVICE_SET_IRQS(), &set) };
        if rc < 0 {
            return Err(VfioError::io("VFIO_DEVICE_SET_IRQS (one MSI-X vector)")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    unsafe fn dma_map(
        &self,
        iova: u64,
        len: u64,
        vaddr: *mut u8,
        writable: bool,
    ) -> Result<(), VfioError> {
        let map = vfio_iommu_type1_dma_map {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_map>() as u32,
            flags: VFIO_DMA_MAP_FLAG_READ | if writable { VFIO_DMA_MAP_FLAG_WRITE } else { 0 },
            vaddr: vaddr as u64,
            iova,
            size: len,
        };
        // SAFETY: the kernel only reads `map`; the caller guarantees the memory it names stays
        // mapped until unmapped and is accessed only in ways the device's writes cannot break.
        let rc = unsafe { ioctl_with_ref(&*self.container, VFIO_IOMMU_MAP_DMA(), &map) };
        if rc < 0 {
            return Err(VfioError::io("VFIO_IOMMU_MAP_DMA")(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), VfioError> {
        let mut unmap = vfio_iommu_type1_dma_unmap {
            argsz: std::mem::size_of::<vfio_iommu_type1_dma_unmap>() as u32,
            iova,
            size: len,
            ..Default::default()
        };
        // SAFETY: the kernel reads and updates (`size`) the live, exclusively borrowed `unmap`.
        let rc =
            unsafe { ioctl_with_mut_ref(&*self.container, VFIO_IOMMU_UNMAP_DMA(), &mut unmap) };
        if rc < 0 {
            return Err(VfioError::io("VFIO_IOMMU_UNMAP_DMA")(
                std::io::Error::last_os_error(),
            ));
        }
        if unmap.size != len {
            return Err(VfioError::BadDma {
                iova,
                len,
                why: "the kernel unmapped a different length",
            });
        }
        Ok(())
    }

    fn reset(&self) -> Result<(), VfioError> {
        if !self.resettable {
            return Err(VfioError::Reset(
                "VFIO reports no reset method (no FLR, PM or bus reset) for this function".into(),
            ));
        }
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is the device's.
        let rc = unsafe { ioctl(&self.device, VFIO_DEVICE_RESET()) };
        if rc < 0 {
            return Err(VfioError::Reset(format!(
                "VFIO_DEVICE_RESET: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}
