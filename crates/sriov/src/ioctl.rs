//! The PF's NVMe driver as the channel for admin commands: `NVME_IOCTL_ADMIN_CMD` on its
//! controller character device (`/dev/nvmeN`), which needs `CAP_SYS_ADMIN`.

use std::fs::File;
use std::path::{Path, PathBuf};

use vmm_sys_util::ioctl::ioctl_with_mut_ref;

use crate::admin::{AdminCmd, Status};
use crate::nvme::{AdminChannel, AdminError};

/// `struct nvme_passthru_cmd` (linux/nvme_ioctl.h), 72 bytes.
#[repr(C)]
#[derive(Default)]
struct PassthruCmd {
    opcode: u8,
    flags: u8,
    rsvd1: u16,
    nsid: u32,
    cdw2: u32,
    cdw3: u32,
    metadata: u64,
    addr: u64,
    metadata_len: u32,
    data_len: u32,
    cdw10: u32,
    cdw11: u32,
    cdw12: u32,
    cdw13: u32,
    cdw14: u32,
    cdw15: u32,
    timeout_ms: u32,
    result: u32,
}

const _: () = assert!(std::mem::size_of::<PassthruCmd>() == 72);

vmm_sys_util::ioctl_iowr_nr!(NVME_IOCTL_ADMIN_CMD, b'N' as u32, 0x41, PassthruCmd);

/// An NVMe controller's character device, opened for admin passthrough.
pub struct NvmeCharDev {
    file: File,
    path: PathBuf,
}

impl NvmeCharDev {
    /// Opens `path` (`/dev/nvmeN`).
    pub fn open(path: &Path) -> Result<Self, AdminError> {
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| AdminError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
        })
    }
}

impl AdminChannel for NvmeCharDev {
    fn admin(&self, cmd: &AdminCmd, data: &mut [u8]) -> Result<u32, AdminError> {
        let e = cmd.encode();
        let len = usize::try_from(e.data_len).unwrap_or(usize::MAX);
        let buf = data.get_mut(..len).ok_or(AdminError::Buffer {
            cmd: *cmd,
            need: len,
            have: 0,
        })?;
        let mut c = PassthruCmd {
            opcode: e.opcode,
            cdw10: e.cdw10,
            cdw11: e.cdw11,
            data_len: e.data_len,
            addr: if len > 0 { buf.as_mut_ptr() as u64 } else { 0 },
            ..Default::default()
        };
        // SAFETY: `c` is a live nvme_passthru_cmd the kernel reads and writes back (result);
        // `addr` is `buf`, exclusively borrowed for this call and `data_len` bytes long, which
        // is all the kernel writes there; the descriptor is an NVMe controller's.
        let rc = unsafe { ioctl_with_mut_ref(&self.file, NVME_IOCTL_ADMIN_CMD(), &mut c) };
        match rc {
            0 => Ok(c.result),
            r if r > 0 => Err(AdminError::Status {
                cmd: *cmd,
                status: Status(u16::try_from(r).unwrap_or(u16::MAX)),
            }),
            _ => Err(AdminError::Ioctl {
                cmd: *cmd,
                path: self.path.clone(),
                source: std::io::Error::last_os_error(),
            }),
        }
    }
}
