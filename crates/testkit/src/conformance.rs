//! One NTB conformance suite for every backend: the behaviour and the errors of the `ntb.h`
//! traits, written once and run against `loopback` and `shm` (`crates/fabric/tests/
//! conformance.rs`) and `tcp` (`crates/fabric-tcp/tests/conformance.rs`).
//!
//! A backend provides a [`MakePair`]: two sides with the given [`LinkConfig`] owning the two
//! given hosts, link up. [`ntb_conformance!`](crate::ntb_conformance) then writes one `#[test]`
//! per check. Side `a` translates window 0 onto its RAM and window 1 onto its MMIO region;
//! side `b` accesses them. The errors are those of [`devlend_fabric::registers`], field by
//! field, so a backend that drifts fails here.

use std::any::Any;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devlend_fabric::{BusAddr, FabricError, LinkConfig, LinkState, Ntb, WindowOffset};

use crate::tcp::{host, Host, GUARD, MMIO_BASE, MMIO_LEN, RAM_BASE, RAM_LEN};

/// Two linked sides and whatever must outlive them (a rendezvous directory, a thread).
pub struct Pair {
    /// The side that owns the translated windows.
    pub a: Arc<dyn Ntb>,
    /// The side that accesses them.
    pub b: Arc<dyn Ntb>,
    /// Dropped after both sides.
    pub keep: Box<dyn Any>,
}

/// Makes a linked pair: `a` owns host `ha`'s address space, `b` host `hb`'s; both use `cfg`.
/// Returns when both sides see the link up.
pub type MakePair = fn(cfg: LinkConfig, ha: &Host, hb: &Host) -> Pair;

/// The link of every check: fewer doorbells than 64, so that invalid doorbell bits exist.
pub fn link_config() -> LinkConfig {
    LinkConfig {
        db_count: 16,
        ..LinkConfig::default()
    }
}

/// A pair with window 0 of `a` on its RAM and window 1 on its MMIO, both seen by `b`.
pub struct Setup {
    /// The pair.
    pub pair: Pair,
    /// `a`'s host.
    pub ha: Host,
    /// `b`'s host.
    pub hb: Host,
}

impl Setup {
    /// Makes the pair and waits (guard [`GUARD`]) until `b` sees both windows.
    pub fn new(make: MakePair) -> Self {
        let (ha, hb) = (host(), host());
        let pair = make(link_config(), &ha, &hb);
        pair.a
            .mw_set_trans(0, RAM_BASE, RAM_LEN as u64)
            .expect("translating window 0");
        pair.a
            .mw_set_trans(1, MMIO_BASE, MMIO_LEN)
            .expect("translating window 1");
        let deadline = Instant::now() + GUARD;
        while pair.b.peer_mw_size(0).ok() != Some(RAM_LEN as u64)
            || pair.b.peer_mw_size(1).ok() != Some(MMIO_LEN)
        {
            assert!(
                Instant::now() < deadline,
                "the windows were never announced"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        Self { pair, ha, hb }
    }
}

fn is_no_such(r: &Result<impl std::fmt::Debug, FabricError>, w: &str, i: usize, c: usize) {
    assert!(
        matches!(r, Err(FabricError::NoSuchIndex { what, index, count })
            if *what == w && *index == i && *count == c),
        "want NoSuchIndex {w} {i} of {c}: {r:?}"
    );
}

/// RAM window writes land in the owner's RAM and read back; MMIO reaches the handler in order.
pub fn windows_carry_data(make: MakePair) {
    let s = Setup::new(make);
    let (a, b) = (&s.pair.a, &s.pair.b);
    assert_eq!(b.peer_mw_count(), a.mw_count());
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    b.peer_mw_write(0, WindowOffset(100), &data).unwrap();
    let mut back = vec![0u8; data.len()];
    b.peer_mw_read(0, WindowOffset(100), &mut back).unwrap();
    assert_eq!(back, data);
    let mut direct = vec![0u8; data.len()];
    s.ha.ram.read_at(100, &mut direct).unwrap();
    assert_eq!(direct, data);
    for i in 0..50u32 {
        b.peer_mw_write(1, WindowOffset(0x10), &i.to_le_bytes())
            .unwrap();
    }
    let mut v = [0u8; 4];
    // A non-posted read does not pass the posted writes before it.
    b.peer_mw_read(1, WindowOffset(0x10), &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), 49);
    let writes = s.ha.mmio.writes.lock().unwrap();
    let seen: Vec<u32> = writes
        .iter()
        .map(|(_, d)| u32::from_le_bytes([d[0], d[1], d[2], d[3]]))
        .collect();
    assert_eq!(seen, (0..50).collect::<Vec<u32>>());
}

/// Translations that break a window's limits, or name no region or no window, are refused.
pub fn translations_are_checked(make: MakePair) {
    let s = Setup::new(make);
    let b = &s.pair.b;
    let cfg = link_config();
    let ram = RAM_BASE;
    let bad = |r: devlend_fabric::Result<()>| {
        assert!(
            matches!(r, Err(FabricError::BadTranslation { .. })),
            "{r:?}"
        )
    };
    bad(b.mw_set_trans(0, BusAddr(ram.0 + 0x800), 0x1000));
    bad(b.mw_set_trans(0, ram, 0x800));
    bad(b.mw_set_trans(0, ram, 0));
    bad(b.mw_set_trans(0, ram, cfg.mw_size_max * 2));
    assert!(matches!(
        b.mw_set_trans(0, ram, RAM_LEN as u64 + 0x1000),
        Err(FabricError::NoRegion { .. })
    ));
    assert!(matches!(
        b.mw_set_trans(0, BusAddr(!0xfff), 0x1000),
        Err(FabricError::NoRegion { .. })
    ));
    let n = cfg.mw_count;
    is_no_such(&b.mw_set_trans(n, ram, 0x1000), "memory window", n, n);
    is_no_such(&b.mw_clear_trans(99), "memory window", 99, n);
    is_no_such(&b.mw_get_align(n), "memory window", n, n);
    assert_eq!(b.mw_get_align(0).unwrap(), cfg.mw_align());
}

/// Accesses outside a window name the access; empty accesses, untranslated windows and
/// missing registers get the same error on every backend.
pub fn accesses_are_checked(make: MakePair) {
    let s = Setup::new(make);
    let b = &s.pair.b;
    let cfg = link_config();
    let mut buf = [0u8; 8];
    for (w, size) in [(0usize, RAM_LEN as u64), (1, MMIO_LEN)] {
        let end = size - 4;
        let r = b.peer_mw_write(w, WindowOffset(end), &[0; 8]);
        assert!(
            matches!(r, Err(FabricError::OutsideWindow { window, offset, len: 8, size: sz })
                if window == w && offset == end && sz == size),
            "{r:?}"
        );
        let r = b.peer_mw_read(w, WindowOffset(u64::MAX), &mut buf);
        assert!(
            matches!(r, Err(FabricError::OutsideWindow { window, offset: u64::MAX, len: 8, size: sz })
                if window == w && sz == size),
            "{r:?}"
        );
        assert!(matches!(
            b.peer_mw_write(w, WindowOffset(0), &[]),
            Err(FabricError::BadAccessSize(0))
        ));
        assert!(matches!(
            b.peer_mw_read(w, WindowOffset(0), &mut []),
            Err(FabricError::BadAccessSize(0))
        ));
    }
    assert!(matches!(
        b.peer_mw_write(2, WindowOffset(0), &[1]),
        Err(FabricError::WindowNotTranslated(2))
    ));
    assert!(matches!(
        b.peer_mw_size(2),
        Err(FabricError::WindowNotTranslated(2))
    ));
    let n = cfg.mw_count;
    is_no_such(&b.peer_mw_size(n), "memory window", n, n);
    is_no_such(&b.peer_mw_direct(100), "memory window", 100, n);
    let (sp, mc) = (cfg.spad_count, cfg.msg_count);
    is_no_such(&b.spad_read(sp), "scratchpad", sp, sp);
    is_no_such(&b.spad_write(sp, 1), "scratchpad", sp, sp);
    is_no_such(&b.peer_spad_read(sp), "scratchpad", sp, sp);
    is_no_such(&b.peer_spad_write(sp, 1), "scratchpad", sp, sp);
    is_no_such(&b.msg_read(mc), "message register", mc, mc);
    is_no_such(&b.peer_msg_write(mc, 1), "message register", mc, mc);
    is_no_such(&b.msg_clear_sts(1 << mc), "message register", mc, mc);
}

/// Doorbells: the valid mask, masking latches without delivering, waits, and every misuse.
pub fn doorbells(make: MakePair) {
    let s = Setup::new(make);
    let (a, b) = (&s.pair.a, &s.pair.b);
    let valid = link_config().db_valid_mask();
    assert_eq!(b.db_valid_mask(), valid);
    let outside = 1u64 << 20;
    let invalid = |r: devlend_fabric::Result<()>| {
        assert!(
            matches!(r, Err(FabricError::InvalidDoorbell { bits, valid: v })
                if bits == outside && v == valid),
            "{r:?}"
        )
    };
    invalid(b.db_clear(outside));
    invalid(b.db_set_mask(outside));
    invalid(b.db_clear_mask(outside));
    invalid(a.peer_db_set(outside));
    invalid(b.db_wait(outside, GUARD).map(drop));
    assert!(matches!(b.db_wait(0, GUARD), Err(FabricError::EmptyWait)));

    assert_eq!(b.db_read(), 0);
    b.db_set_mask(0b10).unwrap();
    assert_eq!(b.db_read_mask(), 0b10);
    a.peer_db_set(0b10).unwrap();
    let deadline = Instant::now() + GUARD;
    while b.db_read() != 0b10 {
        assert!(Instant::now() < deadline, "the doorbell never latched");
        std::thread::sleep(Duration::from_millis(1));
    }
    // Latched but masked: not delivered.
    assert!(matches!(
        b.db_wait(0b10, Duration::from_millis(1)),
        Err(FabricError::Timeout)
    ));
    b.db_clear_mask(0b10).unwrap();
    assert_eq!(b.db_wait(0b11, GUARD).unwrap(), 0b10);
    b.db_clear(0b10).unwrap();
    assert_eq!(b.db_read(), 0);

    let b2 = s.pair.b.clone();
    let waiter = std::thread::spawn(move || b2.db_wait(1 << 15, GUARD));
    a.peer_db_set(1 << 15).unwrap();
    assert_eq!(waiter.join().unwrap().unwrap(), 1 << 15);
    b.db_clear(1 << 15).unwrap();
    // A timeout too large for a deadline means no deadline, never a panic.
    a.peer_db_set(1).unwrap();
    assert_eq!(b.db_wait(1, Duration::MAX).unwrap(), 1);
    b.wait_link(LinkState::Up, Duration::MAX).unwrap();
}

/// Scratchpads read and write on both sides.
pub fn scratchpads(make: MakePair) {
    let s = Setup::new(make);
    let (a, b) = (&s.pair.a, &s.pair.b);
    assert_eq!(a.spad_count(), link_config().spad_count);
    a.spad_write(3, 7).unwrap();
    assert_eq!(a.spad_read(3).unwrap(), 7);
    assert_eq!(b.peer_spad_read(3).unwrap(), 7);
    b.peer_spad_write(4, 9).unwrap();
    // The posted scratchpad write is ordered before this non-posted read.
    assert_eq!(b.peer_spad_read(4).unwrap(), 9);
    assert_eq!(a.spad_read(4).unwrap(), 9);
}

/// Messages latch a status bit; a busy register refuses the next message; waits and misuse.
pub fn messages(make: MakePair) {
    let s = Setup::new(make);
    let (a, b) = (&s.pair.a, &s.pair.b);
    let count = link_config().msg_count;
    assert!(matches!(b.msg_wait(0, GUARD), Err(FabricError::EmptyWait)));
    is_no_such(
        &b.msg_wait(1 << count, GUARD),
        "message register",
        count,
        count,
    );
    assert_eq!(b.msg_read_sts(), 0);
    a.peer_msg_write(2, 0xabc).unwrap();
    assert!(matches!(
        a.peer_msg_write(2, 1),
        Err(FabricError::MessageBusy(2))
    ));
    assert_eq!(b.msg_wait(0b100, GUARD).unwrap(), 0b100);
    assert_eq!(b.msg_read_sts(), 0b100);
    assert_eq!(b.msg_read(2).unwrap(), 0xabc);
    b.msg_clear_sts(0b100).unwrap();
    assert_eq!(b.msg_read_sts(), 0);
    a.peer_msg_write(2, 0xdef).unwrap();
    assert_eq!(b.msg_wait(0b100, GUARD).unwrap(), 0b100);
    assert_eq!(b.msg_read(2).unwrap(), 0xdef);
}

/// Writes one `#[test]` per check of this module for the backend made by `$make` (a
/// [`MakePair`]).
#[macro_export]
macro_rules! ntb_conformance {
    ($make:expr) => {
        #[test]
        fn windows_carry_data() {
            $crate::conformance::windows_carry_data($make)
        }
        #[test]
        fn translations_are_checked() {
            $crate::conformance::translations_are_checked($make)
        }
        #[test]
        fn accesses_are_checked() {
            $crate::conformance::accesses_are_checked($make)
        }
        #[test]
        fn doorbells() {
            $crate::conformance::doorbells($make)
        }
        #[test]
        fn scratchpads() {
            $crate::conformance::scratchpads($make)
        }
        #[test]
        fn messages() {
            $crate::conformance::messages($make)
        }
    };
}
