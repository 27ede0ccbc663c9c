//! The fabric over tcp between two network namespaces joined by a veth pair: a host process
//! (`devlend-tcp-host`) in one namespace, this test's node in the other. Needs root; without
//! it the tests are skipped with a reason, except under CI (env `CI` set), where that fails.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use devlend_fabric::{
    Doorbells, FabricError, Link, LinkState, Messages, PeerWindows, Scratchpads, WindowOffset,
};
use devlend_fabric_tcp::TcpNtb;
use devlend_testkit::netns::NetnsPair;
use devlend_testkit::process::KillOnDrop;
use devlend_testkit::proxy::Proxy;
use devlend_testkit::tcp::*;

const PORT: u16 = 7411;

/// A host process; killed with SIGKILL when dropped.
type HostProcess = KillOnDrop;

fn spawn_host(
    ns: &NetnsPair,
    side: usize,
    mode: &str,
    addr: SocketAddr,
    keys: &std::path::Path,
) -> HostProcess {
    let (me, peer) = if side == 0 { ("a", "b") } else { ("b", "a") };
    let mut child = ns
        .command(side, env!("CARGO_BIN_EXE_devlend-tcp-host"))
        .args([mode, &addr.to_string(), "--keys"])
        .arg(keys)
        .args(["--me", me, "--peer", peer])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ready"), "host said {line:?}");
    KillOnDrop(child)
}

fn addr(ns: &NetnsPair, side: usize) -> SocketAddr {
    SocketAddr::new(ns.addr(side).into(), PORT)
}

/// Host process listening in namespace 0; this thread's node connects from namespace 1.
fn setup() -> Option<(NetnsPair, KeysDir, HostProcess, TcpNtb, Host)> {
    let ns = NetnsPair::create_or_skip("the network-namespace test")?;
    let keys = deployment();
    let child = spawn_host(&ns, 0, "listen", addr(&ns, 0), &keys);
    ns.enter(1).unwrap();
    let h = host();
    let b = TcpNtb::connect(addr(&ns, 0), h.asp.clone(), cfg(), creds(&keys, "b", "a")).unwrap();
    b.wait_link(LinkState::Up, GUARD).unwrap();
    Some((ns, keys, child, b, h))
}

#[test]
fn fabric_checks_between_namespaces() {
    let Some((_ns, _keys, _child, b, _h)) = setup() else {
        return;
    };
    // RAM window.
    let data: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
    b.peer_mw_write(0, WindowOffset(4096), &data).unwrap();
    let mut back = vec![0u8; data.len()];
    b.peer_mw_read(0, WindowOffset(4096), &mut back).unwrap();
    assert_eq!(back, data);
    // Ordering: 10k posted writes, then one read sees them all.
    for i in 0..10_000u64 {
        b.peer_mw_write(0, WindowOffset(i * 8), &i.to_le_bytes())
            .unwrap();
    }
    let mut all = vec![0u8; 80_000];
    b.peer_mw_read(0, WindowOffset(0), &mut all).unwrap();
    for (i, c) in all.chunks(8).enumerate() {
        assert_eq!(u64::from_le_bytes(c.try_into().unwrap()), i as u64);
    }
    // MMIO window.
    b.peer_mw_write(1, WindowOffset(0x40), &0x1234_5678u32.to_le_bytes())
        .unwrap();
    let mut v = [0u8; 4];
    b.peer_mw_read(1, WindowOffset(0x40), &mut v).unwrap();
    assert_eq!(u32::from_le_bytes(v), 0x1234_5678);
    // Isolation.
    assert!(matches!(
        b.peer_mw_write(1, WindowOffset(0x1000), &[0]),
        Err(FabricError::OutsideWindow { .. })
    ));
    assert!(matches!(
        b.peer_mw_read(2, WindowOffset(0), &mut v),
        Err(FabricError::WindowNotTranslated(2))
    ));
    // Doorbells: the host echoes them.
    b.peer_db_set(0b110).unwrap();
    assert_eq!(b.db_wait(0b110, GUARD).unwrap(), 0b110);
    // Scratchpads.
    b.peer_spad_write(1, 99).unwrap();
    assert_eq!(b.peer_spad_read(1).unwrap(), 99);
    // Messages: the host answers value + 1.
    b.peer_msg_write(0, 41).unwrap();
    assert_eq!(b.msg_wait(1, GUARD).unwrap(), 1);
    assert_eq!(b.msg_read(0).unwrap(), 42);
}

#[test]
fn kill_9_of_the_listener_host_is_link_down_and_its_restart_links_up() {
    let Some((ns, keys, mut child, b, _h)) = setup() else {
        return;
    };
    let gen = b.link_generation();
    child.kill9();
    b.wait_link(LinkState::Down, GUARD).unwrap();
    let _child = spawn_host(&ns, 0, "listen", addr(&ns, 0), &keys);
    b.wait_link(LinkState::Up, GUARD).unwrap();
    assert!(b.link_generation() >= gen + 2);
    b.peer_db_set(1).unwrap();
    assert_eq!(b.db_wait(1, GUARD).unwrap(), 1);
}

#[test]
fn kill_9_of_the_connector_host_is_link_down() {
    let Some(ns) = NetnsPair::create_or_skip("the network-namespace test") else {
        return;
    };
    let keys = deployment();
    ns.enter(1).unwrap();
    let h = host();
    let a = TcpNtb::listen(addr(&ns, 1), h.asp.clone(), cfg(), creds(&keys, "b", "a")).unwrap();
    let mut child = spawn_host(&ns, 0, "connect", addr(&ns, 1), &keys);
    a.wait_link(LinkState::Up, GUARD).unwrap();
    child.kill9();
    a.wait_link(LinkState::Down, GUARD).unwrap();
    let _child = spawn_host(&ns, 0, "connect", addr(&ns, 1), &keys);
    a.wait_link(LinkState::Up, GUARD).unwrap();
}

#[test]
fn a_cut_link_is_link_down_and_a_restored_one_links_up() {
    let Some((ns, _keys, _child, b, _h)) = setup() else {
        return;
    };
    let gen = b.link_generation();
    ns.set_link(false).unwrap();
    let mut v = [0u8; 4];
    assert!(matches!(
        b.peer_mw_read(0, WindowOffset(0), &mut v),
        Err(FabricError::LinkDown)
    ));
    b.wait_link(LinkState::Down, GUARD).unwrap();
    ns.set_link(true).unwrap();
    b.wait_link(LinkState::Up, GUARD).unwrap();
    assert!(b.link_generation() >= gen + 2);
    b.peer_mw_read(0, WindowOffset(0), &mut v).unwrap();
}

#[test]
fn proxy_faults_between_namespaces_are_link_down_never_a_hang() {
    let Some(ns) = NetnsPair::create_or_skip("the network-namespace test") else {
        return;
    };
    let keys = deployment();
    let _child = spawn_host(&ns, 0, "listen", addr(&ns, 0), &keys);
    ns.enter(1).unwrap();
    let proxy = Proxy::start(localhost(), addr(&ns, 0));
    let h = host();
    let b = TcpNtb::connect(proxy.addr, h.asp.clone(), cfg(), creds(&keys, "b", "a")).unwrap();
    b.wait_link(LinkState::Up, GUARD).unwrap();
    let mut v = [0u8; 4];

    proxy.delay(Duration::from_millis(10));
    b.peer_mw_read(0, WindowOffset(0), &mut v).unwrap();
    proxy.delay(Duration::ZERO);

    proxy.stall(true);
    assert!(matches!(
        b.peer_mw_read(0, WindowOffset(0), &mut v),
        Err(FabricError::LinkDown)
    ));
    proxy.stall(false);
    b.wait_link(LinkState::Up, GUARD).unwrap();

    for fault in [Proxy::drop_all as fn(&Proxy), Proxy::reset_all] {
        let gen = b.link_generation();
        fault(&proxy);
        // Either the read sees the fault or it completed just before it.
        let _ = b.peer_mw_read(0, WindowOffset(0), &mut v);
        while b.link_generation() < gen + 2 {
            b.wait_link(LinkState::Down, GUARD).unwrap();
            b.wait_link(LinkState::Up, GUARD).unwrap();
        }
        b.peer_mw_read(0, WindowOffset(0), &mut v).unwrap();
    }
}
