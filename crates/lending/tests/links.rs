//! Links attached and detached while nodes run (as a cluster node makes them on demand), and
//! the admission hook a lender consults before granting.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use devlend_fabric::{loopback_pair, AddressSpace, LinkConfig, Ntb};
use devlend_lending::{LendingError, LinkId, Node, NodeConfig};

#[test]
fn links_come_and_go_and_the_admission_hook_decides_borrows() {
    let lender_asp = Arc::new(AddressSpace::new());
    let mut cfg = NodeConfig::new("lender");
    cfg.lease = Duration::from_millis(500);
    // Only "good" may borrow, whatever link it comes over; the refusal names the reason.
    cfg.admit = Some(Arc::new(|_link: LinkId, device: &str, borrower: &str| {
        if borrower == "good" {
            Ok(())
        } else {
            Err(format!("{borrower} holds no claim on {device}"))
        }
    }));
    let lender = Node::start_on(cfg, lender_asp.clone());
    assert!(lender.link_ids().is_empty());
    common::add_td0(&lender);

    let mut borrowers = Vec::new();
    let mut asps = Vec::new();
    for name in ["bad", "good"] {
        let asp = Arc::new(AddressSpace::new());
        let (l, b) = loopback_pair(LinkConfig::default(), lender_asp.clone(), asp.clone()).unwrap();
        let node = Node::start_on(NodeConfig::new(name), asp.clone());
        // A link on another address space than the node's is refused.
        let e = node.attach(l.clone() as Arc<dyn Ntb>).unwrap_err();
        assert!(e.to_string().contains("share its address space"), "{e}");
        lender.attach(l as Arc<dyn Ntb>).unwrap();
        node.attach(b as Arc<dyn Ntb>).unwrap();
        node.wait_link_up(Duration::from_secs(5)).unwrap();
        borrowers.push(node);
        asps.push(asp);
    }
    assert_eq!(lender.link_ids().len(), 2);

    let bad = &borrowers[0];
    let link = bad.link_ids()[0];
    match bad.borrow_via(link, "td0") {
        Err(LendingError::Refused(m)) => assert_eq!(m, "bad holds no claim on td0"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    let good = &borrowers[1];
    let glink = good.link_ids()[0];
    let f = good.borrow_via(glink, "td0").unwrap();
    assert_eq!(good.borrowed_on(glink).len(), 1);

    // Detaching the borrower's link is a surprise removal for the function's user.
    good.detach(glink).unwrap();
    assert!(f.is_removed());
    assert!(good.link_ids().is_empty());
    assert!(good.borrowed("td0").is_none());
    assert!(good.detach(glink).is_err(), "a link detaches once");

    // The lender reclaims it when the heartbeats stop; a new link to the same host works.
    let deadline = Instant::now() + Duration::from_secs(10);
    while lender.local_devices()[0].borrower.is_some() {
        assert!(Instant::now() < deadline, "the lease did not expire");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (l, b) = loopback_pair(LinkConfig::default(), lender_asp.clone(), asps[1].clone()).unwrap();
    lender.attach(l as Arc<dyn Ntb>).unwrap();
    let again = good.attach(b as Arc<dyn Ntb>).unwrap();
    assert_ne!(again, glink, "link ids are not reused");
    good.wait_link_up(Duration::from_secs(5)).unwrap();
    let f = good.borrow_via(again, "td0").unwrap();
    assert!(!f.is_removed());
}
