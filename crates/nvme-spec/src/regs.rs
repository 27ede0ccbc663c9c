//! Controller registers in BAR0 (NVMe base specification 1.4, section 3.1): offsets and the
//! fields' bits, shifts and masks.

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
/// NVM Subsystem Reset.
pub const REG_NSSR: u64 = 0x20;
/// Admin Queue Attributes.
pub const REG_AQA: u64 = 0x24;
/// Admin Submission Queue Base Address (64-bit).
pub const REG_ASQ: u64 = 0x28;
/// Admin Completion Queue Base Address (64-bit).
pub const REG_ACQ: u64 = 0x30;
/// Controller Memory Buffer Location (NVMe 1.2+).
pub const REG_CMBLOC: u64 = 0x38;
/// Controller Memory Buffer Size.
pub const REG_CMBSZ: u64 = 0x3c;
/// Controller Memory Buffer Memory Space Control (64-bit, NVMe 1.4).
pub const REG_CMBMSC: u64 = 0x50;
/// Controller Memory Buffer Status (NVMe 1.4).
pub const REG_CMBSTS: u64 = 0x58;
/// First doorbell register (SQ 0 tail); the others follow at `4 << CAP.DSTRD` bytes.
pub const DOORBELL_BASE: u64 = 0x1000;

/// `CAP.MQES` is bits 15:0 (0-based maximum queue entries).
pub const CAP_MQES_MASK: u64 = 0xffff;
/// `CAP.CQR`: contiguous queues required.
pub const CAP_CQR: u64 = 1 << 16;
/// `CAP.AMS` shift (bits 18:17); 0 = round robin only.
pub const CAP_AMS_SHIFT: u32 = 17;
/// `CAP.TO` shift (bits 31:24), in 500 ms units.
pub const CAP_TO_SHIFT: u32 = 24;
/// `CAP.DSTRD` shift (bits 35:32): doorbell stride `4 << DSTRD` bytes.
pub const CAP_DSTRD_SHIFT: u32 = 32;
/// `CAP.CSS` shift (bits 44:37); bit 0 of the field = NVM command set.
pub const CAP_CSS_SHIFT: u32 = 37;
/// `CAP.CSS` NVM command set bit (value within the field).
pub const CAP_CSS_NVM: u64 = 1;
/// `CAP.MPSMIN` shift (bits 51:48): minimum page size `2 ^ (12 + MPSMIN)`.
pub const CAP_MPSMIN_SHIFT: u32 = 48;
/// `CAP.MPSMAX` shift (bits 55:52): maximum page size `2 ^ (12 + MPSMAX)`.
pub const CAP_MPSMAX_SHIFT: u32 = 52;
/// `CAP.CMBS` (bit 57): CMBMSC and CMBSTS exist and the CMB is addressed by `CMBMSC.CBA`.
pub const CAP_CMBS: u64 = 1 << 57;

/// `CMBLOC.BIR` mask (bits 2:0): the BAR holding the buffer.
pub const CMBLOC_BIR_MASK: u32 = 0b111;
/// `CMBLOC.CQMMS` (bit 3): a submission queue and its completion queue may be in different
/// memories (SQ in the CMB, CQ in host memory).
pub const CMBLOC_CQMMS: u32 = 1 << 3;
/// `CMBLOC.CQPDS` (bit 4): physically discontiguous queues in the CMB.
pub const CMBLOC_CQPDS: u32 = 1 << 4;
/// `CMBLOC.CDPMLS` (bit 5): one command's PRP list and data may be partly in the CMB and partly
/// in host memory.
pub const CMBLOC_CDPMLS: u32 = 1 << 5;
/// `CMBLOC.CDPCILS` (bit 6): a command in the CMB may point at data in host memory and back.
pub const CMBLOC_CDPCILS: u32 = 1 << 6;
/// `CMBLOC.CDMMMS` (bit 7): data and metadata in different memories.
pub const CMBLOC_CDMMMS: u32 = 1 << 7;
/// `CMBLOC.CQDA` (bit 8): queues in the CMB need only dword alignment.
pub const CMBLOC_CQDA: u32 = 1 << 8;
/// `CMBLOC.OFST` shift (bits 31:12), in `CMBSZ.SZU` units.
pub const CMBLOC_OFST_SHIFT: u32 = 12;

/// `CMBSZ.SQS` (bit 0): submission queues in the CMB.
pub const CMBSZ_SQS: u32 = 1;
/// `CMBSZ.CQS` (bit 1): completion queues in the CMB.
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

/// `CMBMSC.CRE` (bit 0): Capabilities Registers Enabled (CMBLOC and CMBSZ read non-zero).
pub const CMBMSC_CRE: u64 = 1;
/// `CMBMSC.CMSE` (bit 1): Controller Memory Space Enable (addresses in `CBA .. CBA + size`
/// refer to the CMB).
pub const CMBMSC_CMSE: u64 = 1 << 1;
/// `CMBMSC.CBA` (bits 63:12): Controller Base Address.
pub const CMBMSC_CBA_MASK: u64 = !0xfff;
/// `CMBSTS.CBAI` (bit 0): Controller Base Address Invalid (the last CMSE enable was refused).
pub const CMBSTS_CBAI: u32 = 1;

/// `CC.EN`: enable.
pub const CC_EN: u32 = 1;
/// `CC.CSS` shift (bits 6:4): I/O command set selected.
pub const CC_CSS_SHIFT: u32 = 4;
/// `CC.CSS` value for the NVM command set.
pub const CC_CSS_NVM: u32 = 0;
/// `CC.MPS` shift (bits 10:7): memory page size `2 ^ (12 + MPS)`.
pub const CC_MPS_SHIFT: u32 = 7;
/// `CC.AMS` shift (bits 13:11): arbitration; 0 = round robin.
pub const CC_AMS_SHIFT: u32 = 11;
/// `CC.SHN` shift (bits 15:14): shutdown notification.
pub const CC_SHN_SHIFT: u32 = 14;
/// `CC.SHN` mask (in place).
pub const CC_SHN_MASK: u32 = 0b11 << CC_SHN_SHIFT;
/// `CC.SHN` value for a normal shutdown (in place).
pub const CC_SHN_NORMAL: u32 = 0b01 << CC_SHN_SHIFT;
/// `CC.IOSQES` shift (bits 19:16): I/O submission queue entry size, log2.
pub const CC_IOSQES_SHIFT: u32 = 16;
/// `CC.IOCQES` shift (bits 23:20): I/O completion queue entry size, log2.
pub const CC_IOCQES_SHIFT: u32 = 20;

/// `CSTS.RDY`: ready.
pub const CSTS_RDY: u32 = 1;
/// `CSTS.CFS`: controller fatal status.
pub const CSTS_CFS: u32 = 1 << 1;
/// `CSTS.SHST` shift (bits 3:2): shutdown status.
pub const CSTS_SHST_SHIFT: u32 = 2;
/// `CSTS.SHST` mask (in place).
pub const CSTS_SHST_MASK: u32 = 0b11 << CSTS_SHST_SHIFT;
/// `CSTS.SHST` = shutdown processing occurring (in place).
pub const CSTS_SHST_OCCURRING: u32 = 0b01 << CSTS_SHST_SHIFT;
/// `CSTS.SHST` = shutdown processing complete (in place).
pub const CSTS_SHST_COMPLETE: u32 = 0b10 << CSTS_SHST_SHIFT;

/// `AQA.ASQS` mask (bits 11:0, 0-based).
pub const AQA_ASQS_MASK: u32 = 0xfff;
/// `AQA.ACQS` shift (bits 27:16, 0-based).
pub const AQA_ACQS_SHIFT: u32 = 16;
/// ASQ/ACQ bits 11:0 are reserved (the admin queues are 4 KiB aligned).
pub const QUEUE_BASE_MASK: u64 = !0xfff;

/// Submission queue entry size the NVM command set requires (log2 of 64 bytes).
pub const SQES_LOG2: u32 = 6;
/// Completion queue entry size the NVM command set requires (log2 of 16 bytes).
pub const CQES_LOG2: u32 = 4;
/// Submission queue entry size in bytes.
pub const SQE_BYTES: u64 = 1 << SQES_LOG2;
/// Completion queue entry size in bytes.
pub const CQE_BYTES: u64 = 1 << CQES_LOG2;

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields of one register never overlap, and every in-place value lies in its field.
    #[test]
    fn fields_do_not_overlap() {
        let cap = [
            CAP_MQES_MASK,
            CAP_CQR,
            0b11 << CAP_AMS_SHIFT,
            0xff << CAP_TO_SHIFT,
        ];
        let cap_hi = [
            0xf << CAP_DSTRD_SHIFT,
            0xff << CAP_CSS_SHIFT,
            0xf << CAP_MPSMIN_SHIFT,
            0xf << CAP_MPSMAX_SHIFT,
            CAP_CMBS,
        ];
        assert_disjoint(cap.iter().chain(cap_hi.iter()).copied());
        let cc = [
            CC_EN,
            0b111 << CC_CSS_SHIFT,
            0xf << CC_MPS_SHIFT,
            0b111 << CC_AMS_SHIFT,
            CC_SHN_MASK,
            0xf << CC_IOSQES_SHIFT,
            0xf << CC_IOCQES_SHIFT,
        ];
        assert_disjoint(cc.iter().map(|&f| u64::from(f)));
        assert_disjoint(
            [CSTS_RDY, CSTS_CFS, CSTS_SHST_MASK]
                .map(u64::from)
                .into_iter(),
        );
        assert_disjoint(
            [AQA_ASQS_MASK, 0xfff << AQA_ACQS_SHIFT]
                .map(u64::from)
                .into_iter(),
        );
        let loc = [
            CMBLOC_BIR_MASK,
            CMBLOC_CQMMS,
            CMBLOC_CQPDS,
            CMBLOC_CDPMLS,
            CMBLOC_CDPCILS,
            CMBLOC_CDMMMS,
            CMBLOC_CQDA,
            0xf_ffff << CMBLOC_OFST_SHIFT,
        ];
        assert_disjoint(loc.iter().map(|&f| u64::from(f)));
        let sz = [
            CMBSZ_SQS,
            CMBSZ_CQS,
            CMBSZ_LISTS,
            CMBSZ_RDS,
            CMBSZ_WDS,
            0xf << CMBSZ_SZU_SHIFT,
            0xf_ffff << CMBSZ_SZ_SHIFT,
        ];
        assert_disjoint(sz.iter().map(|&f| u64::from(f)));
        assert_disjoint([CMBMSC_CRE, CMBMSC_CMSE, CMBMSC_CBA_MASK].into_iter());
        assert_eq!(CC_SHN_NORMAL & !CC_SHN_MASK, 0);
        assert_eq!(
            (CSTS_SHST_OCCURRING | CSTS_SHST_COMPLETE) & !CSTS_SHST_MASK,
            0
        );
    }

    #[test]
    fn doorbells_follow_the_registers() {
        let registers = [
            REG_CAP, REG_VS, REG_INTMS, REG_INTMC, REG_CC, REG_CSTS, REG_NSSR, REG_AQA, REG_ASQ,
            REG_ACQ, REG_CMBLOC, REG_CMBSZ, REG_CMBMSC, REG_CMBSTS,
        ];
        let last = registers.into_iter().max();
        assert!(last < Some(DOORBELL_BASE));
        assert_eq!(SQE_BYTES, 64);
        assert_eq!(CQE_BYTES, 16);
    }

    fn assert_disjoint(fields: impl Iterator<Item = u64>) {
        let mut seen = 0u64;
        for f in fields {
            assert_ne!(f, 0);
            assert_eq!(seen & f, 0, "field {f:#x} overlaps {seen:#x}");
            seen |= f;
        }
    }
}
