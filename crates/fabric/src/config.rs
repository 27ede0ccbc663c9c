//! Link parameters shared by every backend.

use std::time::Duration;

use crate::page;
use crate::{FabricError, MwAlign, Result};

/// Sizes and limits of one side of a link (both sides normally use the same values), and how
/// its service threads wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    /// Number of inbound memory windows (1 to 64).
    pub mw_count: usize,
    /// Largest size one window can translate.
    pub mw_size_max: u64,
    /// Alignment of a translated bus address (power of two).
    pub mw_addr_align: u64,
    /// Alignment of a translated size (power of two).
    pub mw_size_align: u64,
    /// Number of doorbell bits (1 to 64); [`crate::Doorbells::db_valid_mask`] has this many low bits.
    pub db_count: u32,
    /// Number of scratchpads (up to 64).
    pub spad_count: usize,
    /// Number of message registers (up to 32).
    pub msg_count: usize,
    /// How long a waiter (MMIO ring consumer, read completion, `db_wait`, `msg_wait`) polls
    /// shared memory before it sleeps on a futex. Zero: always sleep at once (best when many
    /// service threads share few cores); tens of microseconds: lowest latency.
    pub spin: Duration,
    /// How long a non-posted read waits for its completion before failing with
    /// [`FabricError::Timeout`] (the PCIe completion timeout), when the link stays up.
    pub completion_timeout: Duration,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            mw_count: 8,
            mw_size_max: 1 << 30,
            mw_addr_align: 4096,
            mw_size_align: 4096,
            db_count: 64,
            spad_count: 16,
            msg_count: 8,
            spin: Duration::from_micros(30),
            completion_timeout: Duration::from_secs(10),
        }
    }
}

impl LinkConfig {
    /// Checks the limits above.
    pub fn validate(&self) -> Result<()> {
        let bad = |why: &'static str| Err(FabricError::InvalidConfig(why));
        if self.mw_count == 0 || self.mw_count > page::MAX_WINDOWS {
            return bad("mw_count must be 1 to 64");
        }
        if !self.mw_addr_align.is_power_of_two() || !self.mw_size_align.is_power_of_two() {
            return bad("window alignments must be powers of two");
        }
        if self.mw_size_max < self.mw_size_align {
            return bad("mw_size_max must hold at least one size_align unit");
        }
        if self.db_count == 0 || self.db_count > 64 {
            return bad("db_count must be 1 to 64");
        }
        if self.spad_count > page::MAX_SPADS {
            return bad("spad_count must be at most 64");
        }
        if self.msg_count > page::MAX_MSGS {
            return bad("msg_count must be at most 32");
        }
        Ok(())
    }

    /// The doorbell bits that exist.
    pub fn db_valid_mask(&self) -> u64 {
        if self.db_count >= 64 {
            u64::MAX
        } else {
            (1u64 << self.db_count) - 1
        }
    }

    /// The window limits as `ntb_mw_get_align` reports them.
    pub fn mw_align(&self) -> MwAlign {
        MwAlign {
            addr_align: self.mw_addr_align,
            size_align: self.mw_size_align,
            size_max: self.mw_size_max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_checked() {
        assert!(LinkConfig::default().validate().is_ok());
        type Breaker = fn(&mut LinkConfig);
        let table: &[(Breaker, &str)] = &[
            (|c| c.mw_count = 0, "mw_count"),
            (|c| c.mw_count = 65, "mw_count"),
            (|c| c.mw_addr_align = 3, "align"),
            (|c| c.mw_size_align = 0, "align"),
            (|c| c.mw_size_max = 1, "size_max"),
            (|c| c.db_count = 0, "db_count"),
            (|c| c.db_count = 65, "db_count"),
            (|c| c.spad_count = 65, "spad"),
            (|c| c.msg_count = 33, "msg"),
        ];
        for (break_it, what) in table {
            let mut c = LinkConfig::default();
            break_it(&mut c);
            assert!(
                matches!(c.validate(), Err(FabricError::InvalidConfig(_))),
                "{what}"
            );
        }
        let mut c = LinkConfig::default();
        assert_eq!(c.db_valid_mask(), u64::MAX);
        c.db_count = 4;
        assert_eq!(c.db_valid_mask(), 0xf);
    }
}
