//! Controller registers in BAR0 (NVMe base spec 1.4, section 3.1): offsets, field layouts and
//! the values this model reports.

/// Controller Capabilities (64-bit).
pub const REG_CAP: u64 = 0x00;
/// Version.
pub const REG_VS: u64 = 0x08;
/// Interrupt Mask Set.
pub const REG_INTMS: u64 = 0x0c;
/// Interrupt Mask Clear.
pub const REG_INTMC: u64 = 0x10;
/// Controller Configuration.
pub const REG_CC: u64 = 0x14;
/// Controller Status.
pub const REG_CSTS: u64 = 0x1c;
/// NVM Subsystem Reset (not supported: reads zero, writes ignored).
pub const REG_NSSR: u64 = 0x20;
/// Admin Queue Attributes.
pub const REG_AQA: u64 = 0x24;
/// Admin Submission Queue Base Address (64-bit).
pub const REG_ASQ: u64 = 0x28;
/// Admin Completion Queue Base Address (64-bit).
pub const REG_ACQ: u64 = 0x30;
/// Controller Memory Buffer Location (reads zero unless `CMBMSC.CRE` is set).
pub const REG_CMBLOC: u64 = 0x38;
/// Controller Memory Buffer Size (reads zero unless `CMBMSC.CRE` is set).
pub const REG_CMBSZ: u64 = 0x3c;
/// Controller Memory Buffer Memory Space Control (64-bit, NVMe 1.4).
pub const REG_CMBMSC: u64 = 0x50;
/// Controller Memory Buffer Status (NVMe 1.4).
pub const REG_CMBSTS: u64 = 0x58;
/// First doorbell register (SQ 0 tail).
pub const DOORBELL_BASE: u64 = 0x1000;
/// Doorbell stride exponent this model reports (`CAP.DSTRD`): 4-byte doorbells.
pub const DSTRD: u32 = 0;
/// Bytes between consecutive doorbells.
pub const DOORBELL_STRIDE: u64 = 4 << DSTRD;
/// Size of BAR0: registers, then doorbells.
pub const BAR0_SIZE: u64 = 0x4000;

/// The version this model implements: 1.4.0.
pub const VERSION_1_4: u32 = 0x0001_0400;

/// `CAP.MQES` is bits 15:0 (0-based maximum queue entries).
pub const CAP_MQES_MASK: u64 = 0xffff;
/// `CAP.CQR`: contiguous queues required.
pub const CAP_CQR: u64 = 1 << 16;
/// `CAP.AMS` shift (bits 18:17); 0 = round robin only.
pub const CAP_AMS_SHIFT: u32 = 17;
/// `CAP.TO` shift (bits 31:24), in 500 ms units.
pub const CAP_TO_SHIFT: u32 = 24;
/// `CAP.DSTRD` shift (bits 35:32).
pub const CAP_DSTRD_SHIFT: u32 = 32;
/// `CAP.CSS` shift (bits 44:37); bit 0 of the field = NVM command set.
pub const CAP_CSS_SHIFT: u32 = 37;
/// `CAP.CSS` NVM command set bit (value within the field).
pub const CAP_CSS_NVM: u64 = 1;
/// `CAP.MPSMIN` shift (bits 51:48).
pub const CAP_MPSMIN_SHIFT: u32 = 48;
/// `CAP.MPSMAX` shift (bits 55:52).
pub const CAP_MPSMAX_SHIFT: u32 = 52;

/// `CAP.CMBS` (bit 57): CMBMSC and CMBSTS exist and the CMB is addressed by `CMBMSC.CBA`.
pub const CAP_CMBS: u64 = 1 << 57;

/// `CMBLOC.BIR` mask (bits 2:0): the BAR holding the buffer.
pub const CMBLOC_BIR_MASK: u32 = 0b111;
/// `CMBLOC.CQMMS` (bit 3): a submission queue and its completion queue may be in different
/// memories (SQ in the CMB, CQ in host memory).
pub const CMBLOC_CQMMS: u32 = 1 << 3;
/// `CMBLOC.CQPDS` (bit 4): physically discontiguous queues in the CMB (not supported).
pub const CMBLOC_CQPDS: u32 = 1 << 4;
/// `CMBLOC.CDPMLS` (bit 5): one command's PRP list and data may be partly in the CMB and partly
/// in host memory.
pub const CMBLOC_CDPMLS: u32 = 1 << 5;
/// `CMBLOC.CDPCILS` (bit 6): a command in the CMB may point at data in host memory and back.
pub const CMBLOC_CDPCILS: u32 = 1 << 6;
/// `CMBLOC.CDMMMS` (bit 7): data and metadata in different memories (no metadata here).
pub const CMBLOC_CDMMMS: u32 = 1 << 7;
/// `CMBLOC.CQDA` (bit 8): queues in the CMB need only dword alignment (not supported: they are
/// page-aligned like any queue).
pub const CMBLOC_CQDA: u32 = 1 << 8;
/// `CMBLOC.OFST` shift (bits 31:12), in `CMBSZ.SZU` units.
pub const CMBLOC_OFST_SHIFT: u32 = 12;

/// `CMBSZ.SQS` (bit 0): submission queues in the CMB.
pub const CMBSZ_SQS: u32 = 1;
/// `CMBSZ.CQS` (bit 1): completion queues in the CMB (not supported).
pub const CMBSZ_CQS: u32 = 1 << 1;
/// `CMBSZ.LISTS` (bit 2): PRP lists in the CMB.
pub const CMBSZ_LISTS: u32 = 1 << 2;
/// `CMBSZ.RDS` (bit 3): read data (controller to host) in the CMB.
pub const CMBSZ_RDS: u32 = 1 << 3;
/// `CMBSZ.WDS` (bit 4): write data (host to controller) in the CMB.
pub const CMBSZ_WDS: u32 = 1 << 4;
/// `CMBSZ.SZU` shift (bits 11:8): size unit, `4 KiB * 16 ^ SZU`.
pub const CMBSZ_SZU_SHIFT: u32 = 8;
/// `CMBSZ.SZ` shift (bits 31:12): size in `SZU` units.
pub const CMBSZ_SZ_SHIFT: u32 = 12;
/// The size unit this model reports: 1 (64 KiB).
pub const CMB_SZU: u32 = 1;
/// Bytes per `CMBSZ.SZU` unit (64 KiB): the CMB's size and `CMBMSC.CBA` are multiples of it.
pub const CMB_UNIT_BYTES: u64 = 4096 << (4 * CMB_SZU);

/// `CMBMSC.CRE` (bit 0): Capabilities Registers Enabled (CMBLOC and CMBSZ read non-zero).
pub const CMBMSC_CRE: u64 = 1;
/// `CMBMSC.CMSE` (bit 1): Controller Memory Space Enable (addresses in `CBA .. CBA + size`
/// refer to the CMB).
pub const CMBMSC_CMSE: u64 = 1 << 1;
/// `CMBMSC.CBA` (bits 63:12): Controller Base Address.
pub const CMBMSC_CBA_MASK: u64 = !0xfff;
/// The bits of CMBMSC that exist (bits 11:2 are reserved and read as zero).
pub const CMBMSC_WRITABLE: u64 = CMBMSC_CBA_MASK | CMBMSC_CMSE | CMBMSC_CRE;
/// `CMBSTS.CBAI` (bit 0): Controller Base Address Invalid (the last CMSE enable was refused).
pub const CMBSTS_CBAI: u32 = 1;

/// `CC.EN`.
pub const CC_EN: u32 = 1;
/// `CC.CSS` shift (bits 6:4).
pub const CC_CSS_SHIFT: u32 = 4;
/// `CC.CSS` value for the NVM command set.
pub const CC_CSS_NVM: u32 = 0;
/// `CC.MPS` shift (bits 10:7).
pub const CC_MPS_SHIFT: u32 = 7;
/// `CC.AMS` shift (bits 13:11).
pub const CC_AMS_SHIFT: u32 = 11;
/// `CC.SHN` shift (bits 15:14).
pub const CC_SHN_SHIFT: u32 = 14;
/// `CC.IOSQES` shift (bits 19:16).
pub const CC_IOSQES_SHIFT: u32 = 16;
/// `CC.IOCQES` shift (bits 23:20).
pub const CC_IOCQES_SHIFT: u32 = 20;
/// The bits of CC that exist in 1.4 (the rest are reserved and read as zero).
pub const CC_WRITABLE: u32 = 0x00ff_fff1;

/// `CSTS.RDY`.
pub const CSTS_RDY: u32 = 1;
/// `CSTS.CFS`: controller fatal status.
pub const CSTS_CFS: u32 = 1 << 1;
/// `CSTS.SHST` shift (bits 3:2).
pub const CSTS_SHST_SHIFT: u32 = 2;
/// `CSTS.SHST` mask.
pub const CSTS_SHST_MASK: u32 = 0b11 << CSTS_SHST_SHIFT;
/// `CSTS.SHST` = shutdown processing occurring.
pub const CSTS_SHST_OCCURRING: u32 = 0b01 << CSTS_SHST_SHIFT;
/// `CSTS.SHST` = shutdown processing complete.
pub const CSTS_SHST_COMPLETE: u32 = 0b10 << CSTS_SHST_SHIFT;

/// `AQA.ASQS` mask (bits 11:0, 0-based).
pub const AQA_ASQS_MASK: u32 = 0xfff;
/// `AQA.ACQS` shift (bits 27:16, 0-based).
pub const AQA_ACQS_SHIFT: u32 = 16;
/// The bits of AQA that exist.
pub const AQA_WRITABLE: u32 = 0x0fff_0fff;
/// ASQ/ACQ bits 11:0 are reserved (the queues are 4 KiB aligned).
pub const QUEUE_BASE_MASK: u64 = !0xfff;

/// Required submission queue entry size (log2 of 64).
pub const SQES_LOG2: u32 = 6;
/// Required completion queue entry size (log2 of 16).
pub const CQES_LOG2: u32 = 4;
/// Submission queue entry size in bytes.
pub const SQE_BYTES: u64 = 1 << SQES_LOG2;
/// Completion queue entry size in bytes.
pub const CQE_BYTES: u64 = 1 << CQES_LOG2;

/// Smallest memory page size this model accepts (`CAP.MPSMIN` = 0: 4 KiB).
pub const MPSMIN: u32 = 0;
/// Largest memory page size this model accepts (`CAP.MPSMAX` = 4: 64 KiB).
pub const MPSMAX: u32 = 4;

/// What a decoded CC value asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControllerConfig {
    /// Raw register.
    pub raw: u32,
}

impl ControllerConfig {
    /// `CC.EN`.
    pub fn enabled(self) -> bool {
        self.raw & CC_EN != 0
    }
    /// `CC.CSS`.
    pub fn css(self) -> u32 {
        (self.raw >> CC_CSS_SHIFT) & 0b111
    }
    /// `CC.MPS`.
    pub fn mps(self) -> u32 {
        (self.raw >> CC_MPS_SHIFT) & 0xf
    }
    /// `CC.AMS`.
    pub fn ams(self) -> u32 {
        (self.raw >> CC_AMS_SHIFT) & 0b111
    }
    /// `CC.SHN` (0 = none, 1 = normal, 2 = abrupt).
    pub fn shn(self) -> u32 {
        (self.raw >> CC_SHN_SHIFT) & 0b11
    }
    /// `CC.IOSQES`.
    pub fn iosqes(self) -> u32 {
        (self.raw >> CC_IOSQES_SHIFT) & 0xf
    }
    /// `CC.IOCQES`.
    pub fn iocqes(self) -> u32 {
        (self.raw >> CC_IOCQES_SHIFT) & 0xf
    }
    /// Memory page size in bytes that `CC.MPS` selects (`2 ^ (12 + MPS)`).
    pub fn page_size(self) -> u64 {
        1u64 << (12 + self.mps())
    }
}

/// Builds the CAP register for a controller with `max_queue_entries` (1-based, >= 2) and a
/// ready timeout of `timeout_500ms` units.
pub fn capabilities(max_queue_entries: u32, timeout_500ms: u8) -> u64 {
    let mqes = u64::from(max_queue_entries.saturating_sub(1)) & CAP_MQES_MASK;
    mqes | CAP_CQR
        | (u64::from(timeout_500ms) << CAP_TO_SHIFT)
        | (u64::from(DSTRD) << CAP_DSTRD_SHIFT)
        | (CAP_CSS_NVM << CAP_CSS_SHIFT)
        | (u64::from(MPSMIN) << CAP_MPSMIN_SHIFT)
        | (u64::from(MPSMAX) << CAP_MPSMAX_SHIFT)
}

/// Which doorbell an offset in BAR0 addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Doorbell {
    /// Submission queue `qid` tail.
    SqTail(u16),
    /// Completion queue `qid` head.
    CqHead(u16),
}

impl Doorbell {
    /// Decodes a BAR0 offset at or above [`DOORBELL_BASE`]; `None` for a misaligned offset,
    /// one below the doorbells or a queue id beyond 16 bits.
    pub fn from_offset(offset: u64) -> Option<Doorbell> {
        let rel = offset.checked_sub(DOORBELL_BASE)?;
        if rel % DOORBELL_STRIDE != 0 {
            return None;
        }
        let index = rel / DOORBELL_STRIDE;
        let qid = u16::try_from(index / 2).ok()?;
        Some(if index.is_multiple_of(2) {
            Doorbell::SqTail(qid)
        } else {
            Doorbell::CqHead(qid)
        })
    }

    /// Index in a flat doorbell array (`2 * qid` for SQ tails, `2 * qid + 1` for CQ heads),
    /// which is also the slot number in a shadow doorbell / event index buffer.
    pub fn slot(self) -> usize {
        match self {
            Doorbell::SqTail(q) => 2 * usize::from(q),
            Doorbell::CqHead(q) => 2 * usize::from(q) + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields() {
        let cap = capabilities(1024, 20);
        assert_eq!(cap & CAP_MQES_MASK, 1023);
        assert_ne!(cap & CAP_CQR, 0);
        assert_eq!((cap >> CAP_TO_SHIFT) & 0xff, 20);
        assert_eq!((cap >> CAP_DSTRD_SHIFT) & 0xf, 0);
        assert_eq!((cap >> CAP_CSS_SHIFT) & 0xff, 1);
        assert_eq!((cap >> CAP_MPSMIN_SHIFT) & 0xf, 0);
        assert_eq!((cap >> CAP_MPSMAX_SHIFT) & 0xf, 4);
    }

    #[test]
    fn doorbell_offsets() {
        assert_eq!(Doorbell::from_offset(0x1000), Some(Doorbell::SqTail(0)));
        assert_eq!(Doorbell::from_offset(0x1004), Some(Doorbell::CqHead(0)));
        assert_eq!(Doorbell::from_offset(0x1008), Some(Doorbell::SqTail(1)));
        assert_eq!(Doorbell::from_offset(0x100c), Some(Doorbell::CqHead(1)));
        assert_eq!(Doorbell::from_offset(0x1002), None);
        assert_eq!(Doorbell::from_offset(0xffc), None);
        assert_eq!(Doorbell::CqHead(3).slot(), 7);
    }

    #[test]
    fn cc_decode() {
        let cc = ControllerConfig {
            raw: CC_EN | (6 << CC_IOSQES_SHIFT) | (4 << CC_IOCQES_SHIFT) | (1 << CC_SHN_SHIFT),
        };
        assert!(cc.enabled());
        assert_eq!(cc.iosqes(), 6);
        assert_eq!(cc.iocqes(), 4);
        assert_eq!(cc.shn(), 1);
        assert_eq!(cc.page_size(), 4096);
    }
}
