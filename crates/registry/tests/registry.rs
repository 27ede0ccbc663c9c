//! The registry against a real etcd (started by each test on loopback ports).

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::EtcdCluster;
use devlend_registry::{
    Claim, DeviceRecord, LeaseKeeper, NodeRecord, Reach, Registry, RegistryAddr, RegistryError,
    WatchEvent,
};

fn node(name: &str) -> NodeRecord {
    NodeRecord {
        name: name.into(),
        reach: Reach::Tcp {
            addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        },
    }
}

fn device(name: &str, lender: &str) -> DeviceRecord {
    DeviceRecord {
        name: name.into(),
        kind: "nvme".into(),
        vendor: 0x1b36,
        device: 0x0010,
        vfs: 0,
        state: "available".into(),
        lender: lender.into(),
        detail: "test".into(),
        size_bytes: None,
    }
}

/// A one-member etcd cluster and a registry client of it, or `None` when the test is skipped
/// (no etcd outside CI).
fn registry() -> Option<(EtcdCluster, Registry)> {
    if !common::etcd_or_skip("registry") {
        return None;
    }
    let c = EtcdCluster::start(1);
    let r = Registry::connect(&c.addr()).expect("connect");
    Some((c, r))
}

#[test]
fn a_live_node_name_and_a_device_name_cannot_be_registered_twice() {
    let Some((_etcd, r)) = registry() else { return };
    let a = r.grant(Duration::from_secs(5)).unwrap();
    let b = r.grant(Duration::from_secs(5)).unwrap();
    r.register_node(&node("alpha"), a).unwrap();
    // The same lease again is a retry, not a conflict.
    r.register_node(&node("alpha"), a).unwrap();
    let e = r.register_node(&node("alpha"), b).unwrap_err();
    assert!(matches!(e, RegistryError::NodeNameTaken { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("already registered by a live node (tcp 10.0.0.1)"),
        "{e}"
    );

    r.register_device(&device("nvme0", "alpha"), a).unwrap();
    r.register_node(&node("beta"), b).unwrap();
    let e = r.register_device(&device("nvme0", "beta"), b).unwrap_err();
    assert!(
        e.to_string()
            .contains("already exists in the cluster (lent by alpha)"),
        "{e}"
    );
    // Refused means unchanged.
    assert_eq!(r.device("nvme0").unwrap().record.lender, "alpha");
    assert_eq!(r.devices().unwrap().len(), 1);

    // Once alpha's lease is gone, the names are free.
    r.etcd().revoke(a).unwrap();
    assert!(r.node("alpha").unwrap().is_none());
    r.register_device(&device("nvme0", "beta"), b).unwrap();
    let c2 = r.grant(Duration::from_secs(5)).unwrap();
    r.register_node(&node("alpha"), c2).unwrap();
    let names: Vec<String> = r.nodes().unwrap().into_iter().map(|n| n.name).collect();
    assert_eq!(names, ["alpha", "beta"]);
}

#[test]
fn racing_claims_have_exactly_one_winner_and_every_loser_is_told_who_won() {
    let Some((_etcd, r)) = registry() else { return };
    let r = Arc::new(r);
    let lender = r.grant(Duration::from_secs(10)).unwrap();
    r.register_device(&device("gpu0", "lender"), lender)
        .unwrap();
    const RACERS: usize = 12;
    let barrier = Arc::new(Barrier::new(RACERS));
    let threads: Vec<_> = (0..RACERS)
        .map(|i| {
            let r = r.clone();
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let lease = r.grant(Duration::from_secs(10)).unwrap();
                barrier.wait();
                (
                    format!("b{i}"),
                    r.claim("gpu0", &format!("b{i}"), lease).unwrap(),
                )
            })
        })
        .collect();
    let results: Vec<(String, Claim)> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let winners: Vec<&String> = results
        .iter()
        .filter(|(_, c)| *c == Claim::Won)
        .map(|(n, _)| n)
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let winner = winners[0].clone();
    for (name, claim) in &results {
        if name != &winner {
            assert_eq!(claim, &Claim::Held { by: winner.clone() }, "{name}");
        }
    }
    assert_eq!(r.owner("gpu0").unwrap(), Some(winner.clone()));
    assert_eq!(r.device("gpu0").unwrap().borrower, Some(winner.clone()));
    // Releasing by a loser changes nothing; by the winner frees it.
    r.release("gpu0", "nobody").unwrap();
    assert_eq!(r.owner("gpu0").unwrap(), Some(winner.clone()));
    r.release("gpu0", &winner).unwrap();
    assert_eq!(r.owner("gpu0").unwrap(), None);
    // A device that is not registered cannot be claimed.
    let e = r.claim("nothing", "b0", lender).unwrap_err();
    assert!(matches!(e, RegistryError::NoSuchDevice(_)), "{e}");
}

#[test]
fn expired_leases_free_devices_and_remove_lenders_and_watches_see_it() {
    let Some((_etcd, r)) = registry() else { return };
    let lender = r.grant(Duration::from_secs(30)).unwrap();
    r.register_node(&node("lender"), lender).unwrap();
    r.register_device(&device("nvme1", "lender"), lender)
        .unwrap();
    // A borrower with a 1 s lease it never refreshes: it "dies".
    let dying = r.grant(Duration::from_secs(1)).unwrap();
    assert_eq!(r.claim("nvme1", "ghost", dying).unwrap(), Claim::Won);
    let other = r.grant(Duration::from_secs(30)).unwrap();
    assert_eq!(
        r.claim("nvme1", "live", other).unwrap(),
        Claim::Held { by: "ghost".into() }
    );
    let watch = r.watch_all().unwrap();
    // etcd expires a lease within about its TTL plus its check interval.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut freed = false;
    while !freed && Instant::now() < deadline {
        if let Ok(Some(batch)) = watch.next(Duration::from_millis(200)) {
            freed = batch.events.iter().any(|e| {
                matches!(e, WatchEvent::Delete { key, prev: Some(p) }
                    if key.ends_with(b"/owners/nvme1") && p.value.windows(5).any(|w| w == b"ghost"))
            });
        }
    }
    assert!(freed, "the dead borrower's claim did not expire in 10 s");
    assert_eq!(r.claim("nvme1", "live", other).unwrap(), Claim::Won);

    // The lender dies (its lease revoked, as expiry does): its device leaves the inventory,
    // and the holder's claim does not keep it there.
    r.etcd().revoke(lender).unwrap();
    let mut gone = false;
    while !gone {
        let batch = watch
            .next(Duration::from_secs(5))
            .unwrap()
            .expect("a delete event");
        gone = batch.events.iter().any(
            |e| matches!(e, WatchEvent::Delete { key, .. } if key.ends_with(b"/devices/nvme1")),
        );
    }
    assert!(r.devices().unwrap().is_empty());
    assert!(matches!(
        r.device("nvme1"),
        Err(RegistryError::NoSuchDevice(_))
    ));
}

#[test]
fn unreachable_and_malformed_registry_addresses_are_clear_errors() {
    // Nothing listens on this port: bind one and close it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = RegistryAddr::parse(&format!("etcd://127.0.0.1:{port}")).unwrap();
    let e = Registry::connect(&addr).err().expect("unreachable");
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!("etcd unreachable at etcd://127.0.0.1:{port}")),
        "{msg}"
    );
    assert!(msg.contains("Connection refused"), "{msg}");
    let e = RegistryAddr::parse("127.0.0.1:2379").unwrap_err();
    assert!(e.to_string().contains("must start with etcd://"), "{e}");
    // A host name that does not resolve.
    let addr = RegistryAddr::parse("etcd://no-such-host.invalid:2379").unwrap();
    let msg = Registry::connect(&addr)
        .err()
        .expect("unresolvable")
        .to_string();
    assert!(msg.contains("cannot resolve"), "{msg}");
}

#[test]
fn a_keeper_registers_again_after_etcd_comes_back_and_one_member_of_three_may_die() {
    if !common::etcd_or_skip("registry") {
        return;
    }
    let mut c = EtcdCluster::start(3);
    let r = Arc::new(
        Registry::connect_with(&c.addr(), "/devlend", Duration::from_millis(500)).unwrap(),
    );
    let keeper = LeaseKeeper::start(
        r.clone(),
        Duration::from_secs(2),
        Box::new(|reg, lease| {
            reg.register_node(&node("keeper"), lease)?;
            reg.register_device(&device("kept0", "keeper"), lease)
        }),
    )
    .unwrap();
    assert_eq!(keeper.generation(), 1);
    // One member of three dies: reads, writes and the lease go on through the others.
    c.kill(0);
    let lease = r.grant(Duration::from_secs(5)).unwrap();
    assert_eq!(r.claim("kept0", "b", lease).unwrap(), Claim::Won);
    std::thread::sleep(Duration::from_secs(3)); // longer than the TTL: the keeper must refresh
    assert!(
        r.node("keeper").unwrap().is_some(),
        "the lease was not kept alive with a member down"
    );
    assert_eq!(keeper.generation(), 1);

    // All of etcd goes away: the keeper notices it cannot refresh for a whole TTL.
    c.kill_all();
    assert!(
        keeper.wait_lost(Duration::from_secs(10)),
        "the keeper did not notice"
    );
    assert!(
        keeper
            .last_error()
            .is_some_and(|e| e.contains("etcd unreachable")),
        "{:?}",
        keeper.last_error()
    );
    // etcd comes back (same data): the old lease expires there, the keeper registers anew.
    c.restart(&[1, 2]);
    assert!(
        keeper.wait_generation(1, Duration::from_secs(30)),
        "no re-registration: {:?}",
        keeper.last_error()
    );
    assert!(r.node("keeper").unwrap().is_some());
    assert_eq!(r.device("kept0").unwrap().record.lender, "keeper");
    keeper.stop(&r);
    assert!(
        r.node("keeper").unwrap().is_none(),
        "stop revokes the lease"
    );
}
