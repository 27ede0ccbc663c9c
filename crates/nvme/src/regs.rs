//! Controller registers in BAR0 (NVMe base spec 1.4, section 3.1): the values this model
//! reports and accepts, and the decoding it does. The specification's offsets and field layouts
//! are `devlend-nvme-spec`'s, re-exported here (`regs::REG_CC`, `regs::CC_EN`, ...).

pub use devlend_nvme_spec::regs::*;

/// Doorbell stride exponent this model reports (`CAP.DSTRD`): 4-byte doorbells.
pub const DSTRD: u32 = 0;
/// Bytes between consecutive doorbells.
pub const DOORBELL_STRIDE: u64 = 4 << DSTRD;
/// Size of BAR0: registers, then doorbells.
pub const BAR0_SIZE: u64 = 0x4000;

/// The version this model implements: 1.4.0.
pub const VERSION_1_4: u32 = 0x0001_0400;

/// The size unit this model reports: 1 (64 KiB).
pub const CMB_SZU: u32 = 1;
/// Bytes per `CMBSZ.SZU` unit (64 KiB): the CMB's size and `CMBMSC.CBA` are multiples of it.
pub const CMB_UNIT_BYTES: u64 = 4096 << (4 * CMB_SZU);

/// The bits of CMBMSC that exist (bits 11:2 are reserved and read as zero).
pub const CMBMSC_WRITABLE: u64 = CMBMSC_CBA_MASK | CMBMSC_CMSE | CMBMSC_CRE;

/// The bits of CC that exist in 1.4 (the rest are reserved and read as zero).
pub const CC_WRITABLE: u32 = 0x00ff_fff1;

/// The bits of AQA that exist.
pub const AQA_WRITABLE: u32 = 0x0fff_0fff;

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
