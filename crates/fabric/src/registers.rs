//! The NTB register semantics and argument checks, written once for every backend.
//!
//! `loopback`, `shm` and `tcp` keep their registers in different places (a shared control page,
//! a mutex), but every call checks its arguments here and computes what a wait may return
//! here, so a misuse gets the same error on every backend:
//!
//! | misuse | error |
//! |---|---|
//! | doorbell bits outside the valid mask (own; for `peer_db_set`, own ∩ peer's) | [`FabricError::InvalidDoorbell`] |
//! | `db_wait(0)`, `msg_wait(0)` | [`FabricError::EmptyWait`] |
//! | message-status bits past `msg_count` | [`FabricError::NoSuchIndex`] (the lowest such bit) |
//! | a window, scratchpad or message register past its count | [`FabricError::NoSuchIndex`] |
//! | an empty access | [`FabricError::BadAccessSize`]`(0)` |
//! | an access past the translated size | [`FabricError::OutsideWindow`] with the access's own window, offset, length and the size it was checked against |
//! | a translation that breaks the window's limits | [`FabricError::BadTranslation`] |
//! | a translation whose announcement to the current connection failed | [`FabricError::LinkDown`] (the translation stays in force and reaches the peer with the next connection's hello) |
//!
//! `crates/testkit/src/conformance.rs` checks every row on every backend.

use devlend_memory::BusAddr;

use crate::{FabricError, LinkConfig, Result};

/// The bits of `count` registers (all 64 from 64 on).
pub fn mask_of(count: usize) -> u64 {
    if count >= 64 {
        u64::MAX
    } else {
        (1u64 << count) - 1
    }
}

/// `index` names one of `count` registers of kind `what`.
pub fn check_index(what: &'static str, index: usize, count: usize) -> Result<()> {
    if index >= count {
        return Err(FabricError::NoSuchIndex { what, index, count });
    }
    Ok(())
}

/// Memory window `window` is one of `count`.
pub fn check_window(window: usize, count: usize) -> Result<()> {
    check_index("memory window", window, count)
}

/// `bits` are all inside `valid` (`db_clear`, `db_set_mask`, `db_clear_mask`).
pub fn check_doorbells(bits: u64, valid: u64) -> Result<()> {
    if bits & !valid != 0 {
        return Err(FabricError::InvalidDoorbell { bits, valid });
    }
    Ok(())
}

/// A `db_wait` for `bits`: at least one bit, all inside `valid`.
pub fn check_db_wait(bits: u64, valid: u64) -> Result<()> {
    if bits == 0 {
        return Err(FabricError::EmptyWait);
    }
    check_doorbells(bits, valid)
}

/// A `peer_db_set` of `bits`: inside both this side's and the peer's valid masks.
pub fn check_peer_doorbells(bits: u64, own_valid: u64, peer_valid: u64) -> Result<()> {
    check_doorbells(bits, own_valid & peer_valid)
}

/// The doorbells a `db_wait` for `wanted` returns: latched, wanted and not masked.
pub fn deliverable(latched: u64, mask: u64, wanted: u64) -> u64 {
    latched & wanted & !mask
}

/// Message-status `bits` name existing message registers (`msg_clear_sts`).
pub fn check_messages(bits: u64, count: usize) -> Result<()> {
    let extra = bits & !mask_of(count);
    if extra != 0 {
        return Err(FabricError::NoSuchIndex {
            what: "message register",
            index: extra.trailing_zeros() as usize,
            count,
        });
    }
    Ok(())
}

/// A `msg_wait` for `bits`: at least one bit, all naming existing registers.
pub fn check_msg_wait(bits: u64, count: usize) -> Result<()> {
    if bits == 0 {
        return Err(FabricError::EmptyWait);
    }
    check_messages(bits, count)
}

/// An access of `len` bytes at `offset` into `window`, translated `size` bytes by the peer.
pub fn check_access(window: usize, offset: u64, len: usize, size: u64) -> Result<()> {
    if len == 0 {
        return Err(FabricError::BadAccessSize(0));
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(outside_window(window, offset, len, size)),
    }
}

/// The error of an access past a window's translated size, with the access's own fields
/// (also when it is the peer that found the access outside).
pub fn outside_window(window: usize, offset: u64, len: usize, size: u64) -> FabricError {
    FabricError::OutsideWindow {
        window,
        offset,
        len: len as u64,
        size,
    }
}

/// A translation of `window` to `addr` + `size` within the limits of `cfg` (the address
/// space may still refuse it).
pub fn check_translation(cfg: &LinkConfig, window: usize, addr: BusAddr, size: u64) -> Result<()> {
    check_window(window, cfg.mw_count)?;
    let bad = |why| FabricError::BadTranslation {
        window,
        addr,
        size,
        why,
    };
    if size == 0 {
        return Err(bad("the size is zero"));
    }
    if !addr.is_aligned(cfg.mw_addr_align) {
        return Err(bad("the address is not aligned to addr_align"));
    }
    if size & (cfg.mw_size_align - 1) != 0 {
        return Err(bad("the size is not a multiple of size_align"));
    }
    if size > cfg.mw_size_max {
        return Err(bad("the size exceeds size_max"));
    }
    Ok(())
}

/// What `mw_set_trans`/`mw_clear_trans` return when announcing the change to the current
/// connection failed: that connection is broken, so the link is down for the caller; the
/// translation stays in force and the next connection's hello carries it.
pub fn announced<E>(r: std::result::Result<(), E>) -> Result<()> {
    r.map_err(|_| FabricError::LinkDown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(mask_of(0), 0);
        assert_eq!(mask_of(3), 0b111);
        assert_eq!(mask_of(64), u64::MAX);
        assert_eq!(mask_of(100), u64::MAX);
    }

    #[test]
    fn empty_waits_are_empty_wait_before_any_other_check() {
        assert!(matches!(check_db_wait(0, 0), Err(FabricError::EmptyWait)));
        assert!(matches!(check_msg_wait(0, 0), Err(FabricError::EmptyWait)));
        assert!(matches!(
            check_db_wait(0b100, 0b11),
            Err(FabricError::InvalidDoorbell {
                bits: 0b100,
                valid: 0b11
            })
        ));
        assert!(matches!(
            check_msg_wait(0b1000, 3),
            Err(FabricError::NoSuchIndex {
                index: 3,
                count: 3,
                ..
            })
        ));
    }

    #[test]
    fn peer_doorbells_are_checked_against_both_masks() {
        check_peer_doorbells(0b1, 0b11, 0b01).unwrap();
        assert!(matches!(
            check_peer_doorbells(0b10, 0b11, 0b01),
            Err(FabricError::InvalidDoorbell {
                bits: 0b10,
                valid: 0b01
            })
        ));
    }

    #[test]
    fn deliverable_doorbells_exclude_masked_and_unwanted_bits() {
        assert_eq!(deliverable(0b111, 0b010, 0b011), 0b001);
        assert_eq!(deliverable(0b100, 0, 0b011), 0);
    }

    #[test]
    fn accesses_outside_a_window_name_the_access() {
        check_access(1, 0xff8, 8, 0x1000).unwrap();
        assert!(matches!(
            check_access(1, 0xffc, 8, 0x1000),
            Err(FabricError::OutsideWindow {
                window: 1,
                offset: 0xffc,
                len: 8,
                size: 0x1000
            })
        ));
        assert!(matches!(
            check_access(1, u64::MAX, 1, 0x1000),
            Err(FabricError::OutsideWindow {
                offset: u64::MAX,
                ..
            })
        ));
        assert!(matches!(
            check_access(1, 0, 0, 0x1000),
            Err(FabricError::BadAccessSize(0))
        ));
    }

    #[test]
    fn translations_within_limits() {
        let cfg = LinkConfig::default();
        check_translation(&cfg, 0, BusAddr(0x10_0000), 0x1000).unwrap();
        for (addr, size) in [(0x10_0800, 0x1000), (0x10_0000, 0x800), (0x10_0000, 0)] {
            assert!(matches!(
                check_translation(&cfg, 0, BusAddr(addr), size),
                Err(FabricError::BadTranslation { .. })
            ));
        }
        assert!(matches!(
            check_translation(&cfg, cfg.mw_count, BusAddr(0x10_0000), 0x1000),
            Err(FabricError::NoSuchIndex { .. })
        ));
    }

    #[test]
    fn a_failed_announcement_is_link_down() {
        assert!(announced::<()>(Ok(())).is_ok());
        assert!(matches!(announced(Err(())), Err(FabricError::LinkDown)));
    }
}
