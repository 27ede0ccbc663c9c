//! Controller registers in BAR0 (NVMe base specification 1.4, section 3.1): the driver's
//! choices (page size, CC and AQA values), CAP decoding, and the few PCI-level values the
//! driver chooses (its config space offsets are `devlend-pci`'s). The specification's offsets
//! and field layouts are `devlend-nvme-spec`'s, re-exported here (`regs::REG_CC`, ...).

use std::time::Duration;

pub use devlend_nvme_spec::regs::*;

/// The host memory page size the driver uses: 4 KiB (CC.MPS = 0).
pub const HOST_PAGE_BYTES: usize = 4096;

/// The decoded fields of CAP that the driver uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Maximum queue entries supported, as a count (MQES + 1).
    pub max_queue_entries: u32,
    /// Doorbell stride in bytes (4 << DSTRD).
    pub doorbell_stride: u64,
    /// Worst-case time to become ready or not ready.
    pub ready_timeout: Duration,
    /// Minimum memory page size in bytes (2^(12 + MPSMIN)).
    pub min_page_bytes: u64,
    /// Maximum memory page size in bytes (2^(12 + MPSMAX)).
    pub max_page_bytes: u64,
    /// The NVM command set is supported (CSS bit 0).
    pub nvm_command_set: bool,
    /// `CAP.CMBS`: a Controller Memory Buffer addressed through CMBMSC (NVMe 1.4).
    pub cmb_space: bool,
}

impl Capabilities {
    /// Decodes CAP.
    pub fn decode(cap: u64) -> Self {
        let mqes = (cap & CAP_MQES_MASK) as u32;
        let to_units = (cap >> CAP_TO_SHIFT) & 0xff;
        let dstrd = ((cap >> CAP_DSTRD_SHIFT) & 0xf) as u32;
        let css = (cap >> CAP_CSS_SHIFT) & 0xff;
        let mpsmin = ((cap >> CAP_MPSMIN_SHIFT) & 0xf) as u32;
        let mpsmax = ((cap >> CAP_MPSMAX_SHIFT) & 0xf) as u32;
        Self {
            max_queue_entries: mqes + 1,
            doorbell_stride: 4u64 << dstrd,
            // TO is in 500 ms units; a zero would make every wait fail at once, so the driver
            // grants at least one unit.
            ready_timeout: Duration::from_millis(500 * to_units.max(1)),
            min_page_bytes: 1u64 << (12 + mpsmin),
            max_page_bytes: 1u64 << (12 + mpsmax),
            nvm_command_set: css & CAP_CSS_NVM == CAP_CSS_NVM,
            cmb_space: cap & CAP_CMBS != 0,
        }
    }

    /// BAR0 offset of submission queue `qid`'s tail doorbell.
    pub fn sq_tail_doorbell(&self, qid: u16) -> u64 {
        DOORBELL_BASE + (2 * u64::from(qid)) * self.doorbell_stride
    }

    /// BAR0 offset of completion queue `qid`'s head doorbell.
    pub fn cq_head_doorbell(&self, qid: u16) -> u64 {
        DOORBELL_BASE + (2 * u64::from(qid) + 1) * self.doorbell_stride
    }
}

/// CC for an NVM command set controller with 4 KiB pages and the standard entry sizes,
/// without EN.
pub fn cc_config() -> u32 {
    (SQES_LOG2 << CC_IOSQES_SHIFT)
        | (CQES_LOG2 << CC_IOCQES_SHIFT)
        | (0 << CC_MPS_SHIFT)
        | (0 << CC_CSS_SHIFT)
        | (0 << CC_AMS_SHIFT)
}

/// AQA for admin queues of `sq_entries` and `cq_entries` (counts, at least 2).
pub fn aqa(sq_entries: u32, cq_entries: u32) -> u32 {
    ((cq_entries.saturating_sub(1) & AQA_ASQS_MASK) << AQA_ACQS_SHIFT)
        | (sq_entries.saturating_sub(1) & AQA_ASQS_MASK)
}

/// PCI-level values the driver chooses or checks that are not config space registers (every
/// config space offset and bit the driver uses is `devlend-pci`'s: `devlend_pci::config` and
/// `devlend_pci::msix`, the single place they are declared, as is the capability walk,
/// `devlend_pci::config::cap::find`).
pub mod pci {
    /// Class code of an NVM Express controller: mass storage, non-volatile memory, NVMe (an NVMe
    /// spec value, not a register; the driver does not depend on the device model).
    pub const CLASS_NVME: u32 = 0x01_08_02;
    /// The message address the driver programs (the x86 interrupt window; a local binding
    /// does not interpret it, a lending layer redirects it). A driver's choice, not a register.
    pub const MSIX_MESSAGE_ADDRESS: u64 = 0xfee0_0000;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields_decode() {
        // MQES=1023, TO=20 (10 s), DSTRD=1, CSS=NVM, MPSMIN=0, MPSMAX=4.
        let cap: u64 = 1023 | (20 << 24) | (1 << 32) | (1 << 37) | (4 << 52);
        let c = Capabilities::decode(cap);
        assert_eq!(c.max_queue_entries, 1024);
        assert_eq!(c.ready_timeout, Duration::from_secs(10));
        assert_eq!(c.doorbell_stride, 8);
        assert_eq!(c.min_page_bytes, 4096);
        assert_eq!(c.max_page_bytes, 65536);
        assert!(c.nvm_command_set);
        assert_eq!(c.sq_tail_doorbell(0), 0x1000);
        assert_eq!(c.cq_head_doorbell(0), 0x1008);
        assert_eq!(c.sq_tail_doorbell(2), 0x1020);
        assert_eq!(c.cq_head_doorbell(2), 0x1028);
        let zero_to = Capabilities::decode(0);
        assert_eq!(zero_to.ready_timeout, Duration::from_millis(500));
        assert_eq!(zero_to.doorbell_stride, 4);
    }

    #[test]
    fn cc_and_aqa_encode() {
        assert_eq!(cc_config(), 0x0046_0000);
        assert_eq!(aqa(32, 32), 0x001f_001f);
        assert_eq!(aqa(4096, 2), 0x0001_0fff);
    }
}
