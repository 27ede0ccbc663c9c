//! The one thing the shm fabric asks VFIO: which region of a device descriptor a peer's device
//! window lies in (`VFIO_DEVICE_GET_INFO`, `VFIO_DEVICE_GET_REGION_INFO`).

use std::os::fd::OwnedFd;

use vfio_bindings::bindings::vfio::{
    vfio_device_info, vfio_region_info, VFIO_BASE, VFIO_REGION_INFO_FLAG_MMAP, VFIO_TYPE,
};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;

vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 7);
vmm_sys_util::ioctl_io_nr!(VFIO_DEVICE_GET_REGION_INFO, VFIO_TYPE as u32, VFIO_BASE + 8);

/// Most regions looked at (a PCI function has 9, plus device-specific ones).
const MAX_REGIONS: u32 = 64;

/// A region of a VFIO device that holds a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Region {
    pub(super) index: u32,
    pub(super) mappable: bool,
}

/// The region of VFIO device `fd` whose file range holds `[start, end)`; an error naming why
/// when `fd` is no VFIO device or no region holds the range.
pub(super) fn region_holding(fd: &OwnedFd, start: u64, end: u64) -> Result<Region, String> {
    let mut info = vfio_device_info {
        argsz: std::mem::size_of::<vfio_device_info>() as u32,
        ..Default::default()
    };
    // SAFETY: the kernel writes at most `argsz` bytes into `info`, a live, exclusively borrowed
    // vfio_device_info; on a descriptor that is not a VFIO device the call fails (ENOTTY).
    let rc = unsafe { ioctl_with_mut_ref(fd, VFIO_DEVICE_GET_INFO(), &mut info) };
    if rc < 0 {
        return Err(format!(
            "the descriptor is not a VFIO device ({})",
            std::io::Error::last_os_error()
        ));
    }
    for index in 0..info.num_regions.min(MAX_REGIONS) {
        let mut r = vfio_region_info {
            argsz: std::mem::size_of::<vfio_region_info>() as u32,
            index,
            ..Default::default()
        };
        // SAFETY: as above, with a live, exclusively borrowed vfio_region_info.
        let rc = unsafe { ioctl_with_mut_ref(fd, VFIO_DEVICE_GET_REGION_INFO(), &mut r) };
        if rc < 0 || r.size == 0 {
            continue;
        }
        let holds = start >= r.offset && r.offset.checked_add(r.size).is_some_and(|e| end <= e);
        if holds {
            return Ok(Region {
                index,
                mappable: r.flags & VFIO_REGION_INFO_FLAG_MMAP != 0,
            });
        }
    }
    Err(format!(
        "no region of the VFIO device holds {start:#x}..{end:#x}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_that_is_not_a_vfio_device_is_refused() {
        let m = devlend_memory::SharedMemory::new("not-vfio", 4096).unwrap();
        let fd = m.fd().try_clone_to_owned().unwrap();
        let err = region_holding(&fd, 0, 4096).unwrap_err();
        assert!(err.contains("not a VFIO device"), "{err}");
    }
}
