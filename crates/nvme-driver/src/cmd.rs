//! Submission and completion queue entries (NVMe base specification 1.4, section 4.6).

use std::fmt;

pub use devlend_nvme_spec::opcode::nvm;

/// Bytes in a submission queue entry.
pub const SQE_BYTES: usize = 1 << devlend_nvme_spec::regs::SQES_LOG2;
/// Bytes in a completion queue entry.
pub const CQE_BYTES: usize = 1 << devlend_nvme_spec::regs::CQES_LOG2;

/// Admin command opcodes (`devlend-nvme-spec`'s) and the admin commands' field values the
/// driver uses.
pub mod admin {
    pub use devlend_nvme_spec::opcode::admin::*;

    /// Identify CNS: namespace data structure.
    pub const CNS_NAMESPACE: u32 = 0x00;
    /// Identify CNS: controller data structure.
    pub const CNS_CONTROLLER: u32 = 0x01;
    /// Identify CNS: active namespace ID list.
    pub const CNS_ACTIVE_NAMESPACES: u32 = 0x02;

    /// Feature: Number of Queues.
    pub const FEATURE_NUMBER_OF_QUEUES: u32 = 0x07;
    /// Feature: Interrupt Coalescing.
    pub const FEATURE_INTERRUPT_COALESCING: u32 = 0x08;

    /// Create queue CDW11: physically contiguous.
    pub const QUEUE_PHYS_CONTIGUOUS: u32 = 1 << 0;
    /// Create I/O CQ CDW11: interrupts enabled.
    pub const CQ_INTERRUPTS_ENABLED: u32 = 1 << 1;
}

/// A submission queue entry, before it is placed in a queue (the queue fills in the CID).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Command {
    /// Opcode (CDW0 bits 7:0).
    pub opcode: u8,
    /// Command identifier (CDW0 bits 31:16).
    pub cid: u16,
    /// Namespace identifier.
    pub nsid: u32,
    /// PRP entry 1.
    pub prp1: u64,
    /// PRP entry 2 (or a PRP list pointer).
    pub prp2: u64,
    /// Command dwords 10 to 15.
    pub cdw: [u32; 6],
}

impl Command {
    /// A command with `opcode` for namespace `nsid` and everything else zero.
    pub fn new(opcode: u8, nsid: u32) -> Self {
        Self {
            opcode,
            nsid,
            ..Self::default()
        }
    }

    /// Sets command dword `10 + i` (i from 0 to 5); others are ignored.
    pub fn with_cdw(mut self, dword: usize, value: u32) -> Self {
        if let Some(slot) = dword.checked_sub(10).and_then(|i| self.cdw.get_mut(i)) {
            *slot = value;
        }
        self
    }

    /// The 64 bytes as the controller reads them (PSDT = 0: PRPs; FUSE = 0).
    pub fn to_bytes(&self) -> [u8; SQE_BYTES] {
        let mut b = [0u8; SQE_BYTES];
        let cdw0 = u32::from(self.opcode) | (u32::from(self.cid) << 16);
        put(&mut b, 0, &cdw0.to_le_bytes());
        put(&mut b, 4, &self.nsid.to_le_bytes());
        put(&mut b, 24, &self.prp1.to_le_bytes());
        put(&mut b, 32, &self.prp2.to_le_bytes());
        for (i, d) in self.cdw.iter().enumerate() {
            put(&mut b, 40 + 4 * i, &d.to_le_bytes());
        }
        b
    }
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

/// A completion queue entry as read from memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompletionEntry {
    /// Command-specific dword 0.
    pub dw0: u32,
    /// Submission queue head pointer.
    pub sq_head: u16,
    /// Submission queue identifier.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Phase tag.
    pub phase: bool,
    /// Status (without the phase tag).
    pub status: Status,
}

impl CompletionEntry {
    /// Decodes the four dwords of an entry.
    pub fn decode(dw: [u32; 4]) -> Self {
        let [dw0, _dw1, dw2, dw3] = dw;
        Self {
            dw0,
            sq_head: (dw2 & 0xffff) as u16,
            sq_id: (dw2 >> 16) as u16,
            cid: (dw3 & 0xffff) as u16,
            phase: (dw3 >> 16) & 1 == 1,
            status: Status::from_field((dw3 >> 17) as u16),
        }
    }

    /// Whether dword 3 of an entry carries phase tag `phase`.
    pub fn dw3_has_phase(dw3: u32, phase: bool) -> bool {
        ((dw3 >> 16) & 1 == 1) == phase
    }
}

/// Status code types.
pub mod sct {
    /// Generic command status.
    pub const GENERIC: u8 = 0;
    /// Command specific status.
    pub const COMMAND_SPECIFIC: u8 = 1;
    /// Media and data integrity errors.
    pub const MEDIA: u8 = 2;
    /// Path related status.
    pub const PATH: u8 = 3;
}

/// Generic status codes the driver names.
pub mod sc {
    /// Successful completion.
    pub const SUCCESS: u8 = 0x00;
    /// Invalid command opcode.
    pub const INVALID_OPCODE: u8 = 0x01;
    /// Invalid field in command.
    pub const INVALID_FIELD: u8 = 0x02;
    /// Data transfer error.
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    /// Internal error.
    pub const INTERNAL_ERROR: u8 = 0x06;
    /// Invalid namespace or format.
    pub const INVALID_NAMESPACE: u8 = 0x0b;
    /// LBA out of range.
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    /// Capacity exceeded.
    pub const CAPACITY_EXCEEDED: u8 = 0x81;
}

/// A completion status (the 15-bit status field, without the phase tag).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Status {
    /// Status code type.
    pub sct: u8,
    /// Status code.
    pub sc: u8,
    /// Command retry delay index.
    pub crd: u8,
    /// More information in the error log.
    pub more: bool,
    /// Do not retry.
    pub dnr: bool,
}

impl Status {
    /// Success.
    pub const SUCCESS: Status = Status {
        sct: 0,
        sc: 0,
        crd: 0,
        more: false,
        dnr: false,
    };

    /// Decodes the status field (CQE dword 3 bits 31:17, shifted down to bit 0).
    pub fn from_field(field: u16) -> Self {
        Self {
            sc: (field & 0xff) as u8,
            sct: ((field >> 8) & 0x7) as u8,
            crd: ((field >> 11) & 0x3) as u8,
            more: (field >> 13) & 1 == 1,
            dnr: (field >> 14) & 1 == 1,
        }
    }

    /// Whether the command succeeded.
    pub fn is_success(&self) -> bool {
        self.sct == sct::GENERIC && self.sc == sc::SUCCESS
    }

    /// Whether this is the generic "LBA Out of Range" status.
    pub fn is_lba_out_of_range(&self) -> bool {
        self.sct == sct::GENERIC && self.sc == sc::LBA_OUT_OF_RANGE
    }

    fn name(&self) -> Option<&'static str> {
        Some(match (self.sct, self.sc) {
            (sct::GENERIC, sc::SUCCESS) => "Successful Completion",
            (sct::GENERIC, sc::INVALID_OPCODE) => "Invalid Command Opcode",
            (sct::GENERIC, sc::INVALID_FIELD) => "Invalid Field in Command",
            (sct::GENERIC, sc::DATA_TRANSFER_ERROR) => "Data Transfer Error",
            (sct::GENERIC, sc::INTERNAL_ERROR) => "Internal Error",
            (sct::GENERIC, sc::INVALID_NAMESPACE) => "Invalid Namespace or Format",
            (sct::GENERIC, sc::LBA_OUT_OF_RANGE) => "LBA Out of Range",
            (sct::GENERIC, sc::CAPACITY_EXCEEDED) => "Capacity Exceeded",
            (sct::COMMAND_SPECIFIC, 0x00) => "Completion Queue Invalid",
            (sct::COMMAND_SPECIFIC, 0x01) => "Invalid Queue Identifier",
            (sct::COMMAND_SPECIFIC, 0x02) => "Invalid Queue Size",
            (sct::COMMAND_SPECIFIC, 0x08) => "Invalid Interrupt Vector",
            (sct::MEDIA, 0x81) => "Unrecovered Read Error",
            _ => return None,
        })
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n} (SCT {:#x}, SC {:#04x})", self.sct, self.sc)?,
            None => write!(f, "status SCT {:#x}, SC {:#04x}", self.sct, self.sc)?,
        }
        if self.dnr {
            write!(f, ", do not retry")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_layout() {
        let mut c = Command::new(nvm::READ, 1)
            .with_cdw(10, 0x1122_3344)
            .with_cdw(12, 7);
        c.cid = 0xabcd;
        c.prp1 = 0x1000;
        c.prp2 = 0x2000_0000_0000;
        let b = c.to_bytes();
        assert_eq!(&b[0..4], &[0x02, 0, 0xcd, 0xab]);
        assert_eq!(&b[4..8], &[1, 0, 0, 0]);
        assert_eq!(u64::from_le_bytes(b[24..32].try_into().unwrap()), 0x1000);
        assert_eq!(
            u64::from_le_bytes(b[32..40].try_into().unwrap()),
            0x2000_0000_0000
        );
        assert_eq!(&b[40..44], &0x1122_3344u32.to_le_bytes());
        assert_eq!(&b[48..52], &7u32.to_le_bytes());
        // Out-of-range dword indexes are ignored, not a panic.
        assert_eq!(
            Command::new(0, 0).with_cdw(9, 1).with_cdw(16, 1).cdw,
            [0; 6]
        );
    }

    #[test]
    fn completion_decode() {
        // LBA out of range, DNR, phase 1, CID 5, SQ 3 head 9.
        let status_field: u32 = 0x80 | (1 << 14);
        let dw3 = 5 | (1 << 16) | (status_field << 17);
        let e = CompletionEntry::decode([0xdead, 0, 9 | (3 << 16), dw3]);
        assert_eq!(e.dw0, 0xdead);
        assert_eq!(e.sq_head, 9);
        assert_eq!(e.sq_id, 3);
        assert_eq!(e.cid, 5);
        assert!(e.phase);
        assert!(e.status.is_lba_out_of_range());
        assert!(e.status.dnr);
        assert!(!e.status.is_success());
        assert!(CompletionEntry::dw3_has_phase(dw3, true));
        assert!(!CompletionEntry::dw3_has_phase(dw3, false));
        assert!(e.status.to_string().contains("LBA Out of Range"));
        let ok = CompletionEntry::decode([0, 0, 0, 1 << 16]);
        assert!(ok.status.is_success());
        let odd = Status::from_field(0x7 << 8 | 0xff);
        assert!(odd.to_string().contains("SCT 0x7"));
    }
}
