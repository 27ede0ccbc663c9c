//! Submission and completion queue entries, and the typed commands parsed from them.
//!
//! [`Command::parse`] never fails: every 64-byte pattern is a well-formed entry. Whether it is
//! a command this controller runs is decided by [`AdminOp::parse`] and [`NvmOp::parse`], which
//! return the status a controller completes a rejected command with.

use crate::status::Status;

/// Admin and NVM command set opcodes, `devlend-nvme-spec`'s under this crate's names.
pub use devlend_nvme_spec::opcode::{admin as admin_opcode, nvm as nvm_opcode};

/// A 64-byte submission queue entry, fields as laid out in the common command format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    /// Opcode (CDW0 bits 7:0).
    pub opcode: u8,
    /// Fused operation (CDW0 bits 9:8).
    pub fuse: u8,
    /// PRP or SGL for Data Transfer (CDW0 bits 15:14).
    pub psdt: u8,
    /// Command Identifier (CDW0 bits 31:16).
    pub cid: u16,
    /// Namespace Identifier.
    pub nsid: u32,
    /// CDW2.
    pub cdw2: u32,
    /// CDW3.
    pub cdw3: u32,
    /// Metadata Pointer.
    pub mptr: u64,
    /// PRP Entry 1.
    pub prp1: u64,
    /// PRP Entry 2.
    pub prp2: u64,
    /// CDW10 to CDW15.
    pub cdw: [u32; 6],
}

fn le_u32(bytes: &[u8; 64], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(src) = bytes.get(at..at + 4) {
        b.copy_from_slice(src);
    }
    u32::from_le_bytes(b)
}

fn le_u64(bytes: &[u8; 64], at: usize) -> u64 {
    u64::from(le_u32(bytes, at)) | (u64::from(le_u32(bytes, at + 4)) << 32)
}

impl Command {
    /// Size of a submission queue entry.
    pub const BYTES: usize = 64;

    /// Splits an entry into its fields.
    pub fn parse(bytes: &[u8; 64]) -> Command {
        let cdw0 = le_u32(bytes, 0);
        Command {
            opcode: (cdw0 & 0xff) as u8,
            fuse: ((cdw0 >> 8) & 0x3) as u8,
            psdt: ((cdw0 >> 14) & 0x3) as u8,
            cid: (cdw0 >> 16) as u16,
            nsid: le_u32(bytes, 4),
            cdw2: le_u32(bytes, 8),
            cdw3: le_u32(bytes, 12),
            mptr: le_u64(bytes, 16),
            prp1: le_u64(bytes, 24),
            prp2: le_u64(bytes, 32),
            cdw: [
                le_u32(bytes, 40),
                le_u32(bytes, 44),
                le_u32(bytes, 48),
                le_u32(bytes, 52),
                le_u32(bytes, 56),
                le_u32(bytes, 60),
            ],
        }
    }

    /// The 64 bytes of this entry (for drivers and tests).
    pub fn to_bytes(&self) -> [u8; 64] {
        let mut out = [0u8; 64];
        let cdw0 = u32::from(self.opcode)
            | (u32::from(self.fuse & 0x3) << 8)
            | (u32::from(self.psdt & 0x3) << 14)
            | (u32::from(self.cid) << 16);
        let mut put = |at: usize, v: &[u8]| {
            if let Some(dst) = out.get_mut(at..at + v.len()) {
                dst.copy_from_slice(v);
            }
        };
        put(0, &cdw0.to_le_bytes());
        put(4, &self.nsid.to_le_bytes());
        put(8, &self.cdw2.to_le_bytes());
        put(12, &self.cdw3.to_le_bytes());
        put(16, &self.mptr.to_le_bytes());
        put(24, &self.prp1.to_le_bytes());
        put(32, &self.prp2.to_le_bytes());
        for (i, dw) in self.cdw.iter().enumerate() {
            put(40 + 4 * i, &dw.to_le_bytes());
        }
        out
    }

    /// CDW10.
    pub fn cdw10(&self) -> u32 {
        self.cdw[0]
    }
    /// CDW11.
    pub fn cdw11(&self) -> u32 {
        self.cdw[1]
    }
    /// CDW12.
    pub fn cdw12(&self) -> u32 {
        self.cdw[2]
    }
    /// CDW13.
    pub fn cdw13(&self) -> u32 {
        self.cdw[3]
    }
    /// CDW14.
    pub fn cdw14(&self) -> u32 {
        self.cdw[4]
    }

    /// Rejects what no command of this controller supports: fused operations and SGLs
    /// (`SGLS` is 0, so PSDT must select PRPs).
    fn check_common(&self) -> Result<(), Status> {
        if self.fuse != 0 || self.psdt != 0 {
            return Err(Status::INVALID_FIELD);
        }
        Ok(())
    }
}

/// A completion queue entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Command specific dword 0.
    pub dw0: u32,
    /// Command specific dword 1.
    pub dw1: u32,
    /// SQ Head Pointer.
    pub sqhd: u16,
    /// SQ Identifier.
    pub sqid: u16,
    /// Command Identifier.
    pub cid: u16,
    /// Status.
    pub status: Status,
}

impl Completion {
    /// Size of a completion queue entry.
    pub const BYTES: usize = 16;

    /// The entry as the controller posts it, with phase tag `phase`.
    pub fn to_bytes(&self, phase: bool) -> [u8; 16] {
        let mut out = [0u8; 16];
        let dw2 = u32::from(self.sqhd) | (u32::from(self.sqid) << 16);
        let dw3 =
            u32::from(self.cid) | (u32::from(phase) << 16) | (u32::from(self.status.raw()) << 17);
        out[0..4].copy_from_slice(&self.dw0.to_le_bytes());
        out[4..8].copy_from_slice(&self.dw1.to_le_bytes());
        out[8..12].copy_from_slice(&dw2.to_le_bytes());
        out[12..16].copy_from_slice(&dw3.to_le_bytes());
        out
    }

    /// Decodes an entry; returns it with its phase tag.
    pub fn from_bytes(bytes: &[u8; 16]) -> (Completion, bool) {
        let dw = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[4 * i..4 * i + 4]);
            u32::from_le_bytes(b)
        };
        let dw2 = dw(2);
        let dw3 = dw(3);
        (
            Completion {
                dw0: dw(0),
                dw1: dw(1),
                sqhd: (dw2 & 0xffff) as u16,
                sqid: (dw2 >> 16) as u16,
                cid: (dw3 & 0xffff) as u16,
                status: Status::from_raw((dw3 >> 17) as u16),
            },
            dw3 & (1 << 16) != 0,
        )
    }
}

/// Where a command's data lives: PRP entries 1 and 2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataPointer {
    /// PRP Entry 1.
    pub prp1: u64,
    /// PRP Entry 2.
    pub prp2: u64,
}

impl From<&Command> for DataPointer {
    fn from(c: &Command) -> Self {
        DataPointer {
            prp1: c.prp1,
            prp2: c.prp2,
        }
    }
}

/// A typed admin command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminOp {
    /// Delete I/O Submission Queue.
    DeleteIoSq {
        /// Queue to delete.
        qid: u16,
    },
    /// Create I/O Submission Queue.
    CreateIoSq {
        /// New queue id.
        qid: u16,
        /// Entries (1-based, from the 0-based QSIZE + 1).
        entries: u32,
        /// Physically contiguous.
        contiguous: bool,
        /// Completion queue it posts to.
        cqid: u16,
        /// Base address (PRP Entry 1).
        base: u64,
    },
    /// Get Log Page.
    GetLogPage {
        /// Log Page Identifier.
        lid: u8,
        /// Retain Asynchronous Event.
        rae: bool,
        /// Bytes requested (NUMD + 1 dwords).
        len_bytes: u64,
        /// Log Page Offset in bytes.
        offset: u64,
        /// Namespace.
        nsid: u32,
        /// Data buffer.
        data: DataPointer,
    },
    /// Delete I/O Completion Queue.
    DeleteIoCq {
        /// Queue to delete.
        qid: u16,
    },
    /// Create I/O Completion Queue.
    CreateIoCq {
        /// New queue id.
        qid: u16,
        /// Entries (1-based).
        entries: u32,
        /// Physically contiguous.
        contiguous: bool,
        /// Interrupts enabled.
        interrupts: bool,
        /// MSI-X vector.
        vector: u16,
        /// Base address (PRP Entry 1).
        base: u64,
    },
    /// Identify.
    Identify {
        /// Controller or Namespace Structure.
        cns: u8,
        /// Controller Identifier (CDW10 bits 31:16; where a list starts).
        cntid: u16,
        /// Namespace.
        nsid: u32,
        /// Data buffer (4 KiB).
        data: DataPointer,
    },
    /// Abort.
    Abort {
        /// Submission queue of the command to abort.
        sqid: u16,
        /// Its command identifier.
        cid: u16,
    },
    /// Set Features.
    SetFeatures {
        /// Feature Identifier.
        fid: u8,
        /// Save across resets.
        save: bool,
        /// Namespace.
        nsid: u32,
        /// CDW11 (the value for most features).
        value: u32,
    },
    /// Get Features.
    GetFeatures {
        /// Feature Identifier.
        fid: u8,
        /// Select: 0 current, 1 default, 2 saved, 3 supported capabilities.
        select: u8,
        /// Namespace.
        nsid: u32,
        /// CDW11 (an argument for some features, e.g. the vector for 0x09).
        arg: u32,
    },
    /// Asynchronous Event Request.
    AsyncEventRequest,
    /// Doorbell Buffer Config.
    DoorbellBufferConfig {
        /// Shadow doorbell page (PRP Entry 1).
        shadow: u64,
        /// Event index page (PRP Entry 2).
        event_index: u64,
    },
    /// Virtualization Management.
    VirtualizationManagement {
        /// Action (CDW10 bits 3:0), see [`crate::virt::action`].
        action: u8,
        /// Resource type (CDW10 bits 10:8): 0 VQ, 1 VI.
        resource: u8,
        /// Controller the action is for (CDW10 bits 31:16).
        cntlid: u16,
        /// Number of resources (CDW11 bits 15:0).
        count: u16,
    },
}

impl AdminOp {
    /// Decodes an admin command, or returns the status it is rejected with.
    pub fn parse(c: &Command) -> Result<AdminOp, Status> {
        use admin_opcode::*;
        c.check_common()?;
        let low16 = |v: u32| (v & 0xffff) as u16;
        let high16 = |v: u32| (v >> 16) as u16;
        Ok(match c.opcode {
            DELETE_IO_SQ => AdminOp::DeleteIoSq {
                qid: low16(c.cdw10()),
            },
            CREATE_IO_SQ => AdminOp::CreateIoSq {
                qid: low16(c.cdw10()),
                entries: u32::from(high16(c.cdw10())) + 1,
                contiguous: c.cdw11() & 1 != 0,
                cqid: high16(c.cdw11()),
                base: c.prp1,
            },
            GET_LOG_PAGE => {
                let numdl = u64::from(high16(c.cdw10()));
                let numdu = u64::from(low16(c.cdw11()));
                let offset = u64::from(c.cdw12()) | (u64::from(c.cdw13()) << 32);
                AdminOp::GetLogPage {
                    lid: (c.cdw10() & 0xff) as u8,
                    rae: c.cdw10() & (1 << 15) != 0,
                    len_bytes: (((numdu << 16) | numdl) + 1) * 4,
                    offset,
                    nsid: c.nsid,
                    data: c.into(),
                }
            }
            DELETE_IO_CQ => AdminOp::DeleteIoCq {
                qid: low16(c.cdw10()),
            },
            CREATE_IO_CQ => AdminOp::CreateIoCq {
                qid: low16(c.cdw10()),
                entries: u32::from(high16(c.cdw10())) + 1,
                contiguous: c.cdw11() & 1 != 0,
                interrupts: c.cdw11() & 2 != 0,
                vector: high16(c.cdw11()),
                base: c.prp1,
            },
            IDENTIFY => AdminOp::Identify {
                cns: (c.cdw10() & 0xff) as u8,
                cntid: high16(c.cdw10()),
                nsid: c.nsid,
                data: c.into(),
            },
            ABORT => AdminOp::Abort {
                sqid: low16(c.cdw10()),
                cid: high16(c.cdw10()),
            },
            SET_FEATURES => AdminOp::SetFeatures {
                fid: (c.cdw10() & 0xff) as u8,
                save: c.cdw10() & (1 << 31) != 0,
                nsid: c.nsid,
                value: c.cdw11(),
            },
            GET_FEATURES => AdminOp::GetFeatures {
                fid: (c.cdw10() & 0xff) as u8,
                select: ((c.cdw10() >> 8) & 0x7) as u8,
                nsid: c.nsid,
                arg: c.cdw11(),
            },
            ASYNC_EVENT_REQUEST => AdminOp::AsyncEventRequest,
            DOORBELL_BUFFER_CONFIG => AdminOp::DoorbellBufferConfig {
                shadow: c.prp1,
                event_index: c.prp2,
            },
            VIRTUALIZATION_MANAGEMENT => AdminOp::VirtualizationManagement {
                action: (c.cdw10() & 0xf) as u8,
                resource: ((c.cdw10() >> 8) & 0x7) as u8,
                cntlid: high16(c.cdw10()),
                count: low16(c.cdw11()),
            },
            _ => return Err(Status::INVALID_OPCODE),
        })
    }
}

/// A typed NVM command set (I/O) command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NvmOp {
    /// Flush the volatile write cache.
    Flush,
    /// Read logical blocks.
    Read(BlockRange),
    /// Write logical blocks.
    Write(BlockRange),
    /// Compare host data with logical blocks.
    Compare(BlockRange),
    /// Write zeroes to logical blocks.
    WriteZeroes {
        /// Blocks.
        range: BlockRange,
        /// Deallocate (DEAC) requested.
        deallocate: bool,
    },
    /// Dataset Management.
    DatasetManagement {
        /// Number of 16-byte range descriptors (1 to 256).
        ranges: u32,
        /// Attribute - Deallocate.
        deallocate: bool,
        /// Where the range descriptors are.
        data: DataPointer,
    },
}

/// The blocks and buffer of a Read, Write, Compare or Write Zeroes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    /// Starting LBA.
    pub slba: u64,
    /// Number of blocks (1-based, from the 0-based NLB + 1).
    pub blocks: u32,
    /// Force Unit Access.
    pub fua: bool,
    /// Data buffer.
    pub data: DataPointer,
}

impl NvmOp {
    /// Decodes an I/O command, or returns the status it is rejected with.
    pub fn parse(c: &Command) -> Result<NvmOp, Status> {
        use nvm_opcode::*;
        c.check_common()?;
        let range = || BlockRange {
            slba: u64::from(c.cdw10()) | (u64::from(c.cdw11()) << 32),
            blocks: (c.cdw12() & 0xffff) + 1,
            fua: c.cdw12() & (1 << 30) != 0,
            data: c.into(),
        };
        // Protection information (PRINFO, bits 29:26) needs a formatted PI type: ours has none,
        // so only PRACT = 0 with no checks is meaningful; other values are ignored as the spec
        // allows for a namespace without protection information.
        Ok(match c.opcode {
            FLUSH => NvmOp::Flush,
            READ => NvmOp::Read(range()),
            WRITE => NvmOp::Write(range()),
            COMPARE => NvmOp::Compare(range()),
            WRITE_ZEROES => NvmOp::WriteZeroes {
                range: range(),
                deallocate: c.cdw12() & (1 << 25) != 0,
            },
            DATASET_MANAGEMENT => NvmOp::DatasetManagement {
                ranges: (c.cdw10() & 0xff) + 1,
                deallocate: c.cdw11() & (1 << 2) != 0,
                data: c.into(),
            },
            _ => return Err(Status::INVALID_OPCODE),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_roundtrip() {
        let c = Command {
            opcode: 0x02,
            fuse: 0,
            psdt: 0,
            cid: 0xbeef,
            nsid: 1,
            cdw2: 2,
            cdw3: 3,
            mptr: 0x1122_3344_5566_7788,
            prp1: 0x1000,
            prp2: 0x2000,
            cdw: [10, 11, 12, 13, 14, 15],
        };
        assert_eq!(Command::parse(&c.to_bytes()), c);
    }

    #[test]
    fn completion_roundtrip() {
        let e = Completion {
            dw0: 7,
            dw1: 0,
            sqhd: 5,
            sqid: 3,
            cid: 0x1234,
            status: Status::LBA_OUT_OF_RANGE,
        };
        assert_eq!(Completion::from_bytes(&e.to_bytes(true)), (e, true));
        assert_eq!(Completion::from_bytes(&e.to_bytes(false)), (e, false));
    }

    #[test]
    fn rejects_sgl_fused_and_unknown() {
        let mut c = Command {
            opcode: nvm_opcode::READ,
            ..Command::default()
        };
        assert!(NvmOp::parse(&c).is_ok());
        c.psdt = 1;
        assert_eq!(NvmOp::parse(&c), Err(Status::INVALID_FIELD));
        c.psdt = 0;
        c.fuse = 1;
        assert_eq!(NvmOp::parse(&c), Err(Status::INVALID_FIELD));
        c.fuse = 0;
        c.opcode = 0x7f;
        assert_eq!(NvmOp::parse(&c), Err(Status::INVALID_OPCODE));
        assert_eq!(AdminOp::parse(&c), Err(Status::INVALID_OPCODE));
    }

    #[test]
    fn log_page_length() {
        let c = Command {
            opcode: admin_opcode::GET_LOG_PAGE,
            cdw: [(127 << 16) | 0x02, 0, 8, 0, 0, 0],
            ..Command::default()
        };
        match AdminOp::parse(&c) {
            Ok(AdminOp::GetLogPage {
                lid,
                len_bytes,
                offset,
                ..
            }) => {
                assert_eq!(lid, 2);
                assert_eq!(len_bytes, 512);
                assert_eq!(offset, 8);
            }
            other => panic!("{other:?}"),
        }
    }
}
