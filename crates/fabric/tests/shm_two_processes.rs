//! Two OS processes linked by the `shm` backend. The test binary re-executes itself as the
//! peer: with `DEVLEND_FABRIC_CHILD` set, the `child_role` test runs the peer's command loop.
//!
//! The peer ("lender") exposes 64 KiB of RAM behind window 0 and a recording device behind
//! window 1, and obeys commands the parent writes into its message register 0.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devlend_fabric::{
    AddressSpace, BusAddr, Doorbells, FabricError, Link, LinkConfig, LinkState, MemoryWindows,
    Messages, MmioHandler, Ntb, PeerWindows, Scratchpads, SharedMemory, ShmNtb, WindowOffset,
};
use devlend_testkit::process::KillOnDrop;
use devlend_testkit::scratch::ScratchDir;

const LONG: Duration = Duration::from_secs(30);
const CHILD_ENV: &str = "DEVLEND_FABRIC_CHILD";
const DIR_ENV: &str = "DEVLEND_FABRIC_DIR";

const PEER_RAM: BusAddr = BusAddr(0x10_0000);
const PEER_MMIO: BusAddr = BusAddr(0x20_0000);
const MY_RAM: BusAddr = BusAddr(0x40_0000);
const RAM_BYTES: usize = 0x1_0000;

// Commands: low byte = op, the rest = argument.
const WRITE_PEER: u32 = 1;
const CHECK_OWN: u32 = 2;
const RING: u32 = 3;
const WAIT_DB: u32 = 4;
const SPADS: u32 = 5;
const CLEAR_WINDOW: u32 = 6;
const CHECK_PEER: u32 = 7;

/// The peer's device: offset 0 counts ordered writes to 0x10, offset 8 counts order errors,
/// a read of 0x20 never completes (a hung device), 0x100.. is plain storage.
#[derive(Default)]
struct Device {
    count: AtomicU64,
    errors: AtomicU64,
    mem: Mutex<Vec<u8>>,
}

impl MmioHandler for Device {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        match offset {
            0 => copy_u64(data, self.count.load(Ordering::SeqCst)),
            8 => copy_u64(data, self.errors.load(Ordering::SeqCst)),
            0x20 => loop {
                std::thread::park();
            },
            o if o >= 0x100 => {
                let mem = devlend_sync::lock(&self.mem);
                let start = (o - 0x100) as usize;
                match mem.get(start..start + data.len()) {
                    Some(src) => data.copy_from_slice(src),
                    None => data.fill(0xff),
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn mmio_write(&self, offset: u64, data: &[u8]) {
        if offset == 0x10 {
            let mut b = [0u8; 4];
            b.copy_from_slice(data.get(..4).unwrap_or(&[0xff; 4]));
            let seen = self.count.fetch_add(1, Ordering::SeqCst);
            if u64::from(u32::from_le_bytes(b)) != seen {
                self.errors.fetch_add(1, Ordering::SeqCst);
            }
        } else if offset >= 0x100 {
            let mut mem = devlend_sync::lock(&self.mem);
            let start = (offset - 0x100) as usize;
            if let Some(dst) = mem.get_mut(start..start + data.len()) {
                dst.copy_from_slice(data);
            }
        }
    }
}

fn copy_u64(data: &mut [u8], v: u64) {
    for (d, s) in data.iter_mut().zip(v.to_le_bytes()) {
        *d = s;
    }
}

fn cfg() -> LinkConfig {
    LinkConfig {
        spin: Duration::from_micros(5),
        ..LinkConfig::default()
    }
}

/// The peer process's main loop.
#[test]
fn child_role() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let dir = PathBuf::from(std::env::var_os(DIR_ENV).expect("dir"));
    let asp = Arc::new(AddressSpace::new());
    let ram = Arc::new(SharedMemory::new("peer-ram", RAM_BYTES).unwrap());
    asp.add_ram(PEER_RAM, ram.clone()).unwrap();
    let dev = Arc::new(Device {
        mem: Mutex::new(vec![0; 0xf00]),
        ..Device::default()
    });
    asp.add_mmio(PEER_MMIO, 0x1000, dev).unwrap();
    let ntb = ShmNtb::open(&dir, asp, cfg()).unwrap();
    ntb.mw_set_trans(0, PEER_RAM, RAM_BYTES as u64).unwrap();
    ntb.mw_set_trans(1, PEER_MMIO, 0x1000).unwrap();
    println!("child-opened");
    ntb.wait_link(LinkState::Up, LONG).unwrap();
    loop {
        match ntb.msg_wait(1, Duration::from_secs(60)) {
            Ok(_) => {}
            Err(FabricError::Timeout) => continue,
            Err(_) => std::process::exit(0),
        }
        let cmd = ntb.msg_read(0).unwrap();
        ntb.msg_clear_sts(1).unwrap();
        let (op, arg) = (cmd & 0xff, cmd >> 8);
        let reply = match op {
            WRITE_PEER => {
                wait_peer_window(&ntb, 0);
                ntb.peer_mw_write(0, WindowOffset(0), &[0xa5; 4096])
                    .unwrap();
                let span = ntb.peer_mw_direct(0).unwrap().unwrap();
                span.write_at(4096, &[0x5a; 4096]).unwrap();
                1
            }
            CHECK_OWN => {
                let mut buf = vec![0u8; 8192];
                ram.read_at(0, &mut buf).unwrap();
                u32::from(buf.iter().all(|b| u32::from(*b) == arg))
            }
            RING => {
                ntb.peer_db_set(1 << arg).unwrap();
                1
            }
            WAIT_DB => {
                let got = ntb.db_wait(1 << arg, LONG).unwrap();
                ntb.db_clear(got).unwrap();
                1
            }
            SPADS => {
                ntb.spad_write(2, 0xfeed).unwrap();
                ntb.peer_spad_write(3, 0xbeef).unwrap();
                ntb.spad_read(4).unwrap()
            }
            CLEAR_WINDOW => {
                ntb.mw_clear_trans(arg as usize).unwrap();
                1
            }
            CHECK_PEER => {
                wait_peer_window(&ntb, 0);
                let mut buf = vec![0u8; 8192];
                ntb.peer_mw_read(0, WindowOffset(0), &mut buf).unwrap();
                u32::from(buf.iter().all(|b| u32::from(*b) == arg))
            }
            _ => 0xdead,
        };
        if ntb.peer_msg_write(0, reply).is_err() {
            std::process::exit(0);
        }
    }
}

/// The peer process: killed (SIGKILL) and reaped when dropped.
struct Peer(KillOnDrop);

impl Peer {
    fn spawn(dir: &Path) -> Peer {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "child_role", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, "1")
            .env(DIR_ENV, dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the child has opened its side (so tests can reason about who listens).
        let out = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("child-opened") => break,
                Some(_) => continue,
                None => panic!("peer exited before opening the link"),
            }
        }
        std::thread::spawn(move || for _ in lines {});
        Peer(KillOnDrop(child))
    }

    fn kill(&mut self) {
        self.0.kill9();
    }
}

/// A unique rendezvous directory, removed on drop (declare it first so that it drops after
/// the peers and links using it).
fn tmpdir(name: &str) -> ScratchDir {
    ScratchDir::new("devlend-fabric-it", name)
}

/// Polls until the peer's announcement of `window` has arrived (failure guard: 30 s).
fn wait_peer_window(ntb: &ShmNtb, window: usize) {
    let deadline = Instant::now() + LONG;
    while ntb.peer_mw_size(window).is_err() {
        assert!(Instant::now() < deadline, "window {window} never announced");
        std::thread::yield_now();
    }
}

/// Sends a command to the peer and returns its reply.
fn call(ntb: &ShmNtb, op: u32, arg: u32) -> u32 {
    ntb.peer_msg_write(0, op | (arg << 8)).unwrap();
    assert_eq!(ntb.msg_wait(1, LONG).unwrap(), 1);
    let reply = ntb.msg_read(0).unwrap();
    ntb.msg_clear_sts(1).unwrap();
    reply
}

/// This side with 64 KiB of RAM translated behind window 0, linked to a fresh peer.
fn linked(name: &str) -> (ScratchDir, Arc<ShmNtb>, Arc<SharedMemory>, Peer) {
    let dir = tmpdir(name);
    let asp = Arc::new(AddressSpace::new());
    let ram = Arc::new(SharedMemory::new("my-ram", RAM_BYTES).unwrap());
    asp.add_ram(MY_RAM, ram.clone()).unwrap();
    let ntb = ShmNtb::open(&dir, asp, cfg()).unwrap();
    ntb.mw_set_trans(0, MY_RAM, RAM_BYTES as u64).unwrap();
    let peer = Peer::spawn(&dir);
    ntb.wait_link(LinkState::Up, LONG).unwrap();
    wait_peer_window(&ntb, 0);
    wait_peer_window(&ntb, 1);
    (dir, ntb, ram, peer)
}

#[test]
fn ram_windows_both_ways_direct_and_copy() {
    let (_dir, ntb, ram, _peer) = linked("ram");
    assert_eq!(ntb.backend(), "shm");
    assert_eq!(ntb.peer_mw_size(0).unwrap(), RAM_BYTES as u64);
    // Into the peer: copy and direct stores, checked by the peer on its own RAM.
    ntb.peer_mw_write(0, WindowOffset(0), &[0x11; 4096])
        .unwrap();
    let span = ntb.peer_mw_direct(0).unwrap().unwrap();
    assert_eq!(span.len(), RAM_BYTES as u64);
    span.fill(4096, 4096, 0x11).unwrap();
    assert_eq!(call(&ntb, CHECK_OWN, 0x11), 1);
    let mut back = vec![0u8; 8192];
    ntb.peer_mw_read(0, WindowOffset(0), &mut back).unwrap();
    assert!(back.iter().all(|b| *b == 0x11));
    // From the peer into us.
    assert_eq!(call(&ntb, WRITE_PEER, 0), 1);
    let mut mine = vec![0u8; 8192];
    ram.read_at(0, &mut mine).unwrap();
    assert!(mine[..4096].iter().all(|b| *b == 0xa5));
    assert!(mine[4096..].iter().all(|b| *b == 0x5a));
    ram.fill(0, 8192, 0x3c).unwrap();
    assert_eq!(call(&ntb, CHECK_PEER, 0x3c), 1);
}

#[test]
fn doorbells_set_clear_mask_wait_timeout() {
    let (_dir, ntb, _, _peer) = linked("db");
    ntb.db_set_mask(1 << 5).unwrap();
    assert_eq!(ntb.db_read_mask(), 1 << 5);
    assert_eq!(call(&ntb, RING, 5), 1);
    assert_eq!(ntb.db_read() & (1 << 5), 1 << 5);
    assert!(matches!(
        ntb.db_wait(1 << 5, Duration::from_millis(5)),
        Err(FabricError::Timeout)
    ));
    ntb.db_clear_mask(1 << 5).unwrap();
    assert_eq!(ntb.db_wait(1 << 5 | 1, LONG).unwrap(), 1 << 5);
    ntb.db_clear(1 << 5).unwrap();
    assert_eq!(ntb.db_read(), 0);
    // This side rings the peer while it waits.
    ntb.peer_msg_write(0, WAIT_DB | (63 << 8)).unwrap();
    ntb.peer_db_set(1 << 63).unwrap();
    assert_eq!(ntb.msg_wait(1, LONG).unwrap(), 1);
    assert_eq!(ntb.msg_read(0).unwrap(), 1);
    ntb.msg_clear_sts(1).unwrap();
    assert!(matches!(
        ntb.db_wait(1, Duration::from_millis(1)),
        Err(FabricError::Timeout)
    ));
}

#[test]
fn scratchpads_and_messages() {
    let (_dir, ntb, _, _peer) = linked("spad");
    ntb.peer_spad_write(4, 0x1234).unwrap();
    assert_eq!(call(&ntb, SPADS, 0), 0x1234);
    assert_eq!(ntb.peer_spad_read(2).unwrap(), 0xfeed);
    assert_eq!(ntb.spad_read(3).unwrap(), 0xbeef);
    ntb.spad_write(7, 77).unwrap();
    assert_eq!(ntb.spad_read(7).unwrap(), 77);
    // The peer never reads register 1: the second write finds it busy.
    ntb.peer_msg_write(1, 5).unwrap();
    assert!(matches!(
        ntb.peer_msg_write(1, 6),
        Err(FabricError::MessageBusy(1))
    ));
    assert_eq!(ntb.msg_read_sts(), 0);
}

#[test]
fn mmio_posted_writes_stay_ordered_and_reads_do_not_pass_them() {
    let (_dir, ntb, _, _peer) = linked("mmio");
    assert!(ntb.peer_mw_direct(1).unwrap().is_none());
    const N: u32 = 10_000;
    for i in 0..N {
        ntb.peer_mw_write(1, WindowOffset(0x10), &i.to_le_bytes())
            .unwrap();
    }
    let mut buf = [0u8; 8];
    ntb.peer_mw_read(1, WindowOffset(0), &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf), u64::from(N));
    ntb.peer_mw_read(1, WindowOffset(8), &mut buf).unwrap();
    assert_eq!(u64::from_le_bytes(buf), 0, "writes arrived out of order");
    // Longer than one ring entry: split in order, both ways.
    let long: Vec<u8> = (0..200u32).map(|i| (i * 7) as u8).collect();
    ntb.peer_mw_write(1, WindowOffset(0x100), &long).unwrap();
    let mut back = vec![0u8; 200];
    ntb.peer_mw_read(1, WindowOffset(0x100), &mut back).unwrap();
    assert_eq!(back, long);
}

#[test]
fn isolation_errors_across_processes() {
    let (_dir, ntb, _, _peer) = linked("iso");
    let mut b8 = [0u8; 8];
    let outside = |r: Result<(), FabricError>| {
        assert!(matches!(r, Err(FabricError::OutsideWindow { .. })), "{r:?}")
    };
    outside(ntb.peer_mw_write(0, WindowOffset(RAM_BYTES as u64 - 4), &[0; 8]));
    outside(ntb.peer_mw_read(0, WindowOffset(u64::MAX - 2), &mut b8));
    outside(ntb.peer_mw_write(1, WindowOffset(0x1000), &[0]));
    outside(ntb.peer_mw_read(1, WindowOffset(0xffc), &mut b8));
    assert!(matches!(
        ntb.peer_mw_write(0, WindowOffset(0), &[]),
        Err(FabricError::BadAccessSize(0))
    ));
    assert!(matches!(
        ntb.peer_mw_read(1, WindowOffset(0), &mut []),
        Err(FabricError::BadAccessSize(0))
    ));
    assert!(matches!(
        ntb.peer_mw_read(2, WindowOffset(0), &mut b8),
        Err(FabricError::WindowNotTranslated(2))
    ));
    assert!(matches!(
        ntb.peer_mw_size(3),
        Err(FabricError::WindowNotTranslated(3))
    ));
    assert!(matches!(
        ntb.peer_mw_size(8),
        Err(FabricError::NoSuchIndex { .. })
    ));
    assert!(matches!(
        ntb.peer_mw_direct(9),
        Err(FabricError::NoSuchIndex { .. })
    ));
    assert!(matches!(
        ntb.peer_spad_read(16),
        Err(FabricError::NoSuchIndex { .. })
    ));
    assert!(matches!(
        ntb.peer_msg_write(8, 0),
        Err(FabricError::NoSuchIndex { .. })
    ));
    assert!(matches!(ntb.peer_db_set(0), Ok(())));
    assert!(matches!(ntb.db_clear_mask(0), Ok(())));
    assert!(matches!(
        ntb.mw_set_trans(0, BusAddr(MY_RAM.0 + 1), 4096),
        Err(FabricError::BadTranslation { .. })
    ));
    assert!(matches!(
        ntb.mw_set_trans(0, MY_RAM, 100),
        Err(FabricError::BadTranslation { .. })
    ));
    assert!(matches!(
        ntb.mw_set_trans(1, BusAddr(0x9000_0000), 4096),
        Err(FabricError::NoRegion { .. })
    ));
    assert!(matches!(
        ntb.mw_set_trans(0, MY_RAM, 2 * RAM_BYTES as u64),
        Err(FabricError::NoRegion { .. })
    ));
    // The peer clears its windows: the MMIO one is refused by the owner at once, the RAM one
    // as soon as the announcement arrives.
    assert_eq!(call(&ntb, CLEAR_WINDOW, 1), 1);
    assert!(matches!(
        ntb.peer_mw_read(1, WindowOffset(0), &mut b8),
        Err(FabricError::WindowNotTranslated(1))
    ));
    assert_eq!(call(&ntb, CLEAR_WINDOW, 0), 1);
    let deadline = Instant::now() + LONG;
    while ntb.peer_mw_size(0).is_ok() {
        assert!(Instant::now() < deadline);
        std::thread::yield_now();
    }
    assert!(matches!(
        ntb.peer_mw_write(0, WindowOffset(0), &[1]),
        Err(FabricError::WindowNotTranslated(0))
    ));
    assert!(matches!(
        ntb.peer_mw_direct(0),
        Err(FabricError::WindowNotTranslated(0))
    ));
}

#[test]
fn kill_9_is_link_down_for_every_waiter_then_a_new_peer_links_up() {
    let (dir, ntb, _, mut peer) = linked("kill");
    let gen = ntb.link_generation();
    let waiters: Vec<std::thread::JoinHandle<Result<(), FabricError>>> = vec![
        {
            let n = ntb.clone();
            std::thread::spawn(move || n.db_wait(1, LONG).map(|_| ()))
        },
        {
            let n = ntb.clone();
            std::thread::spawn(move || n.msg_wait(1 << 3, LONG).map(|_| ()))
        },
        {
            // A read the hung device never completes.
            let n = ntb.clone();
            std::thread::spawn(move || n.peer_mw_read(1, WindowOffset(0x20), &mut [0u8; 4]))
        },
    ];
    peer.kill();
    ntb.wait_link(LinkState::Down, LONG).unwrap();
    for w in waiters {
        assert!(matches!(w.join().unwrap(), Err(FabricError::LinkDown)));
    }
    assert!(matches!(ntb.peer_db_set(1), Err(FabricError::LinkDown)));
    assert!(matches!(ntb.peer_mw_size(0), Err(FabricError::LinkDown)));
    assert!(ntb.link_generation() > gen);
    // A new peer process rendezvouses in the same directory.
    let _peer2 = Peer::spawn(&dir);
    ntb.wait_link(LinkState::Up, LONG).unwrap();
    assert_eq!(ntb.link_generation(), gen + 2);
    wait_peer_window(&ntb, 0);
    assert_eq!(call(&ntb, RING, 9), 1);
    assert_eq!(ntb.db_wait(1 << 9, LONG).unwrap(), 1 << 9);
    // Our own window was re-announced to the new peer.
    ntb.peer_mw_write(0, WindowOffset(0), &[0x77; 8192])
        .unwrap();
    assert_eq!(call(&ntb, CHECK_OWN, 0x77), 1);
    assert_eq!(call(&ntb, WRITE_PEER, 0), 1);
}

#[test]
fn stale_directory_from_a_killed_listener_does_not_wedge_the_next_run() {
    let dir = tmpdir("stale");
    let mut first = Peer::spawn(&dir);
    // Wait until the first peer holds the lock and listens: then kill it.
    let deadline = Instant::now() + LONG;
    while !dir.join("sock").exists() {
        assert!(Instant::now() < deadline, "first peer never listened");
        std::thread::yield_now();
    }
    first.kill();
    assert!(dir.join("sock").exists() && dir.join("lock").exists());
    let ntb = ShmNtb::open(&dir, Arc::new(AddressSpace::new()), cfg()).unwrap();
    let _second = Peer::spawn(&dir);
    ntb.wait_link(LinkState::Up, LONG).unwrap();
    wait_peer_window(&ntb, 0);
    assert_eq!(call(&ntb, RING, 1), 1);
    assert_eq!(ntb.db_wait(2, LONG).unwrap(), 2);
}
