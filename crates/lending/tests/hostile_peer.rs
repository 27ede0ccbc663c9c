//! Hostile peers against a real node, over the in-process loopback fabric: a peer that speaks
//! the management protocol by hand ([`RawPeer`]) as a borrower (out-of-range values, replayed
//! leases, DMA maps without a lease, a mailbox flood) and as a lender (absurd device
//! descriptions and grants). Each time the node stays up, gives the bad peer errors, and its
//! honest peer on another link keeps doing I/O. (The same over processes and shared memory,
//! with truncated memfds: `crates/devlend/tests/hostile_borrower.rs`.)

mod common;
use common::{link_from, test_device};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devlend_fabric::{AddressSpace, LoopbackNtb, Ntb, WindowOffset};
use devlend_lending::channel::MAILBOX_WINDOW;
use devlend_lending::protocol::{Envelope, Request, Response};
use devlend_lending::{LendingError, Node, NodeConfig};
use devlend_pci::test_device::{dma_status, regs, REGS_BAR};
use devlend_pci::{AccessSize, PciFunction};

use devlend_testkit::hostile::{serve_absurd_lender, RawPeer, ABSURD, GUARD};

fn link() -> (Arc<LoopbackNtb>, Arc<LoopbackNtb>, Arc<AddressSpace>) {
    let asp = Arc::new(AddressSpace::new());
    let (a, b) = link_from(asp.clone());
    (a, b, asp)
}

/// One DMA copy by the device through the borrowed function, checked.
fn io_works(f: &dyn PciFunction, seed: u8) {
    f.config_write(0x04, AccessSize::Word, 0x0006).unwrap();
    let src = f.dma_alloc(4096).unwrap();
    let dst = f.dma_alloc(4096).unwrap();
    let data: Vec<u8> = (0..4096u32).map(|i| (i as u8) ^ seed).collect();
    src.write_at(0, &data).unwrap();
    f.bar_write_u64(REGS_BAR, regs::DMA_SRC, src.bus_addr().0)
        .unwrap();
    f.bar_write_u64(REGS_BAR, regs::DMA_DST, dst.bus_addr().0)
        .unwrap();
    f.bar_write_u32(REGS_BAR, regs::DMA_LEN, 4096).unwrap();
    f.bar_write_u32(REGS_BAR, regs::DMA_GO, 1).unwrap();
    assert_eq!(
        f.bar_read_u32(REGS_BAR, regs::DMA_STATUS).unwrap(),
        dma_status::OK
    );
    let mut back = vec![0u8; 4096];
    dst.read_at(0, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn a_hostile_borrower_gets_errors_and_the_honest_one_keeps_working() {
    // Two links into one lender host (one address space): a hostile and an honest borrower.
    let lender_asp = Arc::new(AddressSpace::new());
    let (l0, hostile_end) = link_from(lender_asp.clone());
    let (l1, honest_end) = link_from(lender_asp);
    let mut cfg = NodeConfig::new("lender");
    cfg.lease = Duration::from_millis(1000);
    let lender = Node::start(cfg, vec![l0 as Arc<dyn Ntb>, l1 as Arc<dyn Ntb>]).unwrap();
    lender.add_device("td0", "", test_device()).unwrap();
    lender.add_device("td1", "", test_device()).unwrap();
    let honest = Node::start(NodeConfig::new("honest"), vec![honest_end as Arc<dyn Ntb>]).unwrap();
    let f1 = honest.borrow("td1").unwrap();
    io_works(&*f1, 1);

    let mut bad = RawPeer::new(hostile_end as Arc<dyn Ntb>);
    // A DMA map without a lease, naming a window that will never be translated: refused for
    // the lease at once (it used to wait 5 s for the window first, holding the link's thread,
    // and then answer that the window was never translated).
    let t = Instant::now();
    let msg = bad.refused(Request::MapDma {
        lease: 12345,
        iova: 0,
        len: 4096,
        window: 5,
        offset: 0,
        writable: true,
    });
    assert!(msg.contains("not held"), "{msg}");
    println!("DMA map without a lease refused after {:?}", t.elapsed());

    // An absurd lease length is clamped; the device already lent is refused, naming its holder.
    let grant = match bad.call(Request::Borrow {
        device: "td0".into(),
        borrower: "x".repeat(3000),
        lease_ms: u64::MAX,
    }) {
        Response::Granted { grant } => grant,
        other => panic!("{other:?}"),
    };
    assert!(grant.lease_ms <= 600_000);
    let msg = bad.refused(Request::Borrow {
        device: "td1".into(),
        borrower: "x".into(),
        lease_ms: 1000,
    });
    assert!(msg.contains("honest"), "{msg}");
    let lease = grant.lease;

    // Out-of-range values: errors, never a panic or a wrapped range.
    for (offset, size) in [(0xffff, 4), (4094, 4), (0, 3), (1, 2), (0, 0), (0, 255)] {
        bad.refused(Request::ConfigRead {
            lease,
            offset,
            size,
        });
        bad.refused(Request::ConfigWrite {
            lease,
            offset,
            size,
            value: u32::MAX,
        });
    }
    for (iova, len, window, offset) in [
        (0, 2, 1, u64::MAX),
        (u64::MAX - 1, 16, 1, 0),
        (0, 0, 1, 0),
        (0, 4096, 1000, 0),
        (0, 4096, usize::MAX, 0),
        (0, u64::MAX, 1, 0),
    ] {
        bad.refused(Request::MapDma {
            lease,
            iova,
            len,
            window,
            offset,
            writable: true,
        });
    }
    let _ = bad.call(Request::UnmapDma {
        lease,
        iova: u64::MAX,
        len: u64::MAX,
    });
    // Replays of a returned lease are refused.
    assert_eq!(bad.call(Request::Return { lease }), Response::Ok);
    for req in [
        Request::Heartbeat { lease },
        Request::ConfigRead {
            lease,
            offset: 0,
            size: 4,
        },
        Request::Return { lease },
        Request::MapDma {
            lease,
            iova: 0,
            len: 4096,
            window: 1,
            offset: 0,
            writable: true,
        },
    ] {
        let msg = bad.refused(req);
        assert!(msg.contains("not held"), "{msg}");
    }
    io_works(&*f1, 2);

    // Borrow td0 again, stop heart-beating and flood the lender's mailbox: records committed
    // far ahead of what it consumed, garbage and well-formed, as fast as this thread can.
    let lease = match bad.call(Request::Borrow {
        device: "td0".into(),
        borrower: "bad".into(),
        lease_ms: 200,
    }) {
        Response::Granted { grant } => grant.lease,
        other => panic!("{other:?}"),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let flood = {
        let (ntb, stop, written) = (bad.ntb.clone(), stop.clone(), written.clone());
        std::thread::spawn(move || {
            let session: u64 = 0x5eed_0001_0000_0001;
            let _ = ntb.peer_mw_write(MAILBOX_WINDOW, WindowOffset(0), &session.to_le_bytes());
            let hb = Envelope::Request {
                id: 7,
                body: Request::Heartbeat { lease: 999 },
            }
            .encode();
            let mut seq: u64 = 1;
            while !stop.load(Ordering::Relaxed) {
                let slot = 0x1000 + ((seq - 1) % 63) * 0x1000;
                let payload: &[u8] = if seq.is_multiple_of(3) {
                    &[0xff; 64]
                } else {
                    &hb
                };
                let mut body = (payload.len() as u32).to_le_bytes().to_vec();
                body.extend_from_slice(&[0; 4]);
                body.extend_from_slice(payload);
                let commit = ((session & 0xffff_ffff) << 32) | (seq & 0xffff_ffff);
                if ntb
                    .peer_mw_write(MAILBOX_WINDOW, WindowOffset(slot + 8), &body)
                    .and_then(|()| {
                        ntb.peer_mw_write(MAILBOX_WINDOW, WindowOffset(slot), &commit.to_le_bytes())
                    })
                    .is_err()
                {
                    return;
                }
                let _ = ntb.peer_msg_write(0, seq as u32);
                seq += 1;
                written.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Meanwhile the lender expires the silent lease (td0 lent, then free again) and the
    // honest borrower keeps doing I/O.
    let deadline = Instant::now() + GUARD;
    let holder = |name: &str| {
        lender
            .local_devices()
            .into_iter()
            .find(|d| d.name == name)
            .and_then(|d| d.borrower)
    };
    assert_eq!(holder("td0").as_deref(), Some("bad"));
    let mut rounds = 0u8;
    while holder("td0").is_some() {
        assert!(
            Instant::now() < deadline,
            "the flooding peer's lease never expired"
        );
        io_works(&*f1, rounds);
        rounds = rounds.wrapping_add(1);
    }
    let _ = lease;
    for i in 0..3 {
        io_works(&*f1, 100 + i);
    }
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    assert!(
        written.load(Ordering::Relaxed) > 63,
        "the flood overran the mailbox"
    );
    // The honest link still gets fresh grants: give back and borrow again.
    honest.give_back("td1").unwrap();
    let f1 = honest.borrow("td1").unwrap();
    io_works(&*f1, 7);
    drop(f1);
    drop(honest);
    drop(lender);
}

/// A device description and grant with one absurd value each, by device name.
#[test]
fn a_hostile_lender_gets_its_grants_refused_and_given_back() {
    let (evil_end, borrower_end, _) = link();
    let mut cfg = NodeConfig::new("victim");
    cfg.request_timeout = Duration::from_millis(1500);
    let node = Node::start(cfg, vec![borrower_end as Arc<dyn Ntb>]).unwrap();
    // The hostile lender: translates window 1 onto a small region, answers every List with
    // absurd descriptions and every Borrow with an absurd grant, and counts returns.
    let evil = RawPeer::new(evil_end as Arc<dyn Ntb>);
    let stop = Arc::new(AtomicBool::new(false));
    let returns = Arc::new(AtomicU64::new(0));
    let server = {
        let (stop, returns) = (stop.clone(), returns.clone());
        std::thread::spawn(move || serve_absurd_lender(evil, &stop, &returns, |_| {}))
    };
    node.wait_link_up(GUARD).unwrap();
    assert_eq!(node.peer_devices().unwrap().len(), ABSURD.len());
    for (i, name) in ABSURD.iter().enumerate() {
        match node.borrow(name) {
            // Refused by the range checks (a protocol error), or by the fabric (a window the
            // link does not have).
            Err(e @ (LendingError::Protocol(_) | LendingError::Fabric(_))) => {
                println!("{name}: {e}");
            }
            Err(other) => panic!("{name}: expected a refusal, got {other}"),
            Ok(_) => panic!("{name}: an absurd grant was accepted"),
        }
        // The lender was told: the grant is given back.
        assert_eq!(returns.load(Ordering::Relaxed), i as u64 + 1, "{name}");
        assert!(node.borrowed(name).is_none());
    }
    // The node is still whole: it answers status and lists the peer's devices.
    assert_eq!(node.status().links[0].link, "up");
    assert_eq!(node.peer_devices().unwrap().len(), ABSURD.len());
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();
}
