//! The fault matrix: faults during sustained verified writes, each repeated, with counts.
//!
//! - `kill -9` of the lender while this process writes through a borrowed device;
//! - `kill -9` of the borrower (a child process that writes and reports each acknowledged
//!   write on stdout) while it writes;
//! - SIGSTOP of the borrower past its lease, then SIGCONT;
//! - a cut tcp link (the veth between two network namespaces goes down) under a borrower
//!   writing over `tcp` (needs root; skipped with a reason otherwise, unless `CI` is set).
//!
//! Each repetition counts acknowledged writes missing from the lender's image afterwards
//! (must be 0), hangs (I/O that neither completes nor fails within a minute; must be 0) and,
//! for borrower faults, whether the lender took the device back because the lease expired
//! (its log says so before any link-down; must be every run) and the time until the device is
//! back in the lender's pool (reported against the lease + 250 ms bound, not asserted). Repetitions:
//! `DEVLEND_FAULT_REPS` (default 3; the reliability run uses 20). The table is printed.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use devlend_fabric::{AddressSpace, LinkConfig, Ntb, ShmNtb};
use devlend_lending::{Node, NodeConfig};
use devlend_nvme_driver::Controller;
use devlend_pci::PciFunction;

mod common;

use common::{scratch, NodeProcess};
use devlend_testkit::netns::NetnsPair;

const BLOCK: usize = 4096;
const SLOTS: u64 = 2048;
const LEASE_MS: u64 = 1000;
/// The lender ends a lease at most `LEASE_MS` after the last heartbeat it got (and the
/// fault comes after that heartbeat), noticed within its 20 ms expiry tick; this allows
/// 250 ms more for the reset and for `status` polls (each a new CLI process). Reported, not
/// asserted: what the test asserts is that the take-back came from the lease's expiry, not
/// from a link timeout.
const BOUND_MS: u64 = LEASE_MS + 250;
const HANG: Duration = Duration::from_secs(60);
const CHILD_ENV: &str = "DEVLEND_FAULT_CHILD_FABRIC";

fn block(i: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|j| (i as u8).wrapping_mul(29) ^ (j as u8) ^ ((i >> 8) as u8) ^ 0xa5)
        .collect()
}

fn reps() -> usize {
    std::env::var("DEVLEND_FAULT_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
}

fn lender(dir: &Path, fabric: &Path) -> NodeProcess {
    let lender = NodeProcess::start(dir, "lender", &[fabric], LEASE_MS);
    lender.add_nvme("nvme0", &dir.join("lent.img"), "16M");
    lender
}

fn borrow_here(fabric: &Path, name: &str) -> (Node, Controller) {
    let asp = Arc::new(AddressSpace::new());
    let spec = fabric.to_string_lossy();
    let ntb: Arc<dyn Ntb> = match spec.strip_prefix("tcp:") {
        Some(addr) => Arc::new(
            devlend_fabric_tcp::TcpNtb::connect(
                addr.parse().unwrap(),
                asp,
                devlend_fabric_tcp::TcpConfig::default(),
                devlend_fabric_tcp::Credentials::Insecure,
            )
            .unwrap(),
        ),
        None => ShmNtb::open(fabric, asp, LinkConfig::default()).unwrap(),
    };
    let mut cfg = NodeConfig::new(name);
    cfg.lease = Duration::from_millis(LEASE_MS);
    let node = Node::start(cfg, vec![ntb]).unwrap();
    node.wait_link_up(Duration::from_secs(30)).unwrap();
    let f: Arc<dyn PciFunction> = node.borrow("nvme0").unwrap();
    (node, Controller::new(f).unwrap())
}

/// Acknowledged writes (`acked` of them, block i at slot i % SLOTS) missing from the image.
fn lost(image: &Path, acked: u64) -> usize {
    let file = std::fs::File::open(image).unwrap();
    (acked.saturating_sub(SLOTS)..acked)
        .filter(|i| {
            let mut back = vec![0u8; BLOCK];
            file.read_exact_at(&mut back, (i % SLOTS) * BLOCK as u64)
                .is_err()
                || back != block(*i)
        })
        .count()
}

#[derive(Default)]
struct Row {
    runs: usize,
    acked: u64,
    lost: usize,
    hangs: usize,
    /// Runs whose device the lender took back because the lease expired, before any
    /// link-down (borrower faults only).
    by_expiry: usize,
    reclaim_ms: Vec<u64>,
}

impl Row {
    fn line(&self, name: &str) -> String {
        let mut t = self.reclaim_ms.clone();
        t.sort_unstable();
        let (median, max) = match (t.get(t.len() / 2), t.last()) {
            (Some(m), Some(x)) => (format!("{m} ms"), format!("{x} ms")),
            _ => ("-".into(), "-".into()),
        };
        let (by_expiry, within) = if t.is_empty() {
            ("-".to_string(), "-".to_string())
        } else {
            let within = t.iter().filter(|ms| **ms <= BOUND_MS).count();
            (self.by_expiry.to_string(), within.to_string())
        };
        format!(
            "| {name} | {} | {} | {} | {} | {by_expiry} | {within} | {median} | {max} |",
            self.runs, self.acked, self.lost, self.hangs
        )
    }
}

/// Whether the lender's log shows nvme0 taken back from `child` because its lease expired,
/// before any keepalive timeout of the link (a take-back that waited for the fabric's own
/// liveness check would come after it).
fn ended_by_expiry(log: &Path) -> bool {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let Some(expired) = log.find("revoked: lease of child expired") else {
        return false;
    };
    log.find("keepalive timeout")
        .is_none_or(|timeout| expired < timeout)
}

/// kill -9 of the lender while this process writes.
fn lender_killed(rep: usize) -> Row {
    let dir = scratch(&format!("faults-lender-{rep}"));
    let fabric = dir.join("fabric");
    let mut lender = lender(&dir, &fabric);
    let (node, ctrl) = borrow_here(&fabric, "writer");
    let acked = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    {
        let acked = acked.clone();
        std::thread::spawn(move || {
            let mut i = 0;
            loop {
                if ctrl
                    .write_at((i % SLOTS) * BLOCK as u64, &block(i))
                    .is_err()
                {
                    let _ = tx.send(());
                    return;
                }
                i += 1;
                acked.store(i, Ordering::SeqCst);
            }
        });
    }
    let target = 20 + (rep as u64 * 7) % 30;
    while acked.load(Ordering::SeqCst) < target {
        std::thread::yield_now();
    }
    lender.kill9();
    let hung = rx.recv_timeout(HANG).is_err();
    let n = acked.load(Ordering::SeqCst);
    let row = Row {
        runs: 1,
        acked: n,
        lost: lost(&dir.join("lent.img"), n),
        hangs: usize::from(hung),
        by_expiry: 0,
        reclaim_ms: Vec::new(),
    };
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    row
}

/// Waits until the lender's own view (`status`, which asks the peer nothing: `list` would
/// wait for a frozen peer's answer) shows nvme0 free.
fn wait_in_pool(lender: &NodeProcess, since: Instant) {
    loop {
        let v: serde_json::Value =
            serde_json::from_str(&lender.ctl_ok(&["status", "--json"])).unwrap();
        let lent = v["lending"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["name"] == "nvme0" && !d["borrower"].is_null());
        if !lent {
            return;
        }
        assert!(
            since.elapsed() < HANG,
            "the device never came back to the pool"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child process (this test binary) that borrows and writes, one `ACK i` line per
/// acknowledged write.
fn spawn_writer(
    mut cmd: Command,
    fabric: &Path,
) -> (std::process::Child, Arc<AtomicU64>, mpsc::Receiver<()>) {
    let mut child = cmd
        .args([
            "--exact",
            "fault_matrix_writer_child",
            "--include-ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, fabric)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    {
        let acked = acked.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("ACK ").and_then(|n| n.parse().ok()) {
                    acked.store(n, Ordering::SeqCst);
                }
            }
            // Stdout closed: the writer exited (killed, or its I/O failed).
            let _ = tx.send(());
        });
    }
    (child, acked, rx)
}

/// kill -9 (or SIGSTOP past the lease, then SIGCONT) of a borrower that writes.
fn borrower_fault(rep: usize, stop_instead: bool) -> Row {
    let dir = scratch(&format!("faults-borrower-{rep}-{stop_instead}"));
    let fabric = dir.join("fabric");
    let lender = lender(&dir, &fabric);
    let (child, acked, ended) =
        spawn_writer(Command::new(std::env::current_exe().unwrap()), &fabric);
    wait_acked(&acked, 20 + (rep as u64 * 7) % 30, "the writer child");
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let sig = if stop_instead {
        libc::SIGSTOP
    } else {
        libc::SIGKILL
    };
    // SAFETY: `pid` is our own child, not yet reaped.
    let sent = unsafe { libc::kill(pid, sig) };
    assert_eq!(sent, 0);
    let start = Instant::now();
    wait_in_pool(&lender, start);
    let reclaim_ms = start.elapsed().as_millis() as u64;
    let mut hangs = 0;
    if stop_instead {
        // SAFETY: as above.
        let sent = unsafe { libc::kill(pid, libc::SIGCONT) };
        assert_eq!(sent, 0);
        // Woken past its lease, the writer's next I/O fails and it exits: no hang.
        if ended.recv_timeout(HANG).is_err() {
            hangs += 1;
        }
    } else {
        let _ = ended.recv_timeout(HANG);
    }
    child_run(child, &acked, lender, dir, hangs, reclaim_ms)
}

/// A cut tcp link (the veth between two network namespaces goes down) under a borrower
/// child that writes over `tcp`; the link is restored afterwards.
fn tcp_cut(ns: &NetnsPair, rep: usize) -> Row {
    let dir = scratch(&format!("faults-tcp-{rep}"));
    let port = 7800 + rep as u16;
    let lender_ip = ns.addr(0);
    let lender = NodeProcess::start_with(
        ns.command(0, common::exe()),
        &dir,
        "lender",
        &[format!("tcp-listen:writer@{lender_ip}:{port}")],
        LEASE_MS,
        &["--insecure-tcp"],
    );
    lender.add_nvme("nvme0", &dir.join("lent.img"), "16M");
    let fabric = std::path::PathBuf::from(format!("tcp:{lender_ip}:{port}"));
    let exe = std::env::current_exe().unwrap();
    let (child, acked, ended) = spawn_writer(ns.command(1, exe.to_str().unwrap()), &fabric);
    wait_acked(&acked, 10 + (rep as u64 * 3) % 10, "the tcp writer child");
    // The lender learns its peer's name now, so that its `status` asks the cut peer nothing.
    lender.ctl_ok(&["status"]);
    ns.set_link(false).unwrap();
    let start = Instant::now();
    wait_in_pool(&lender, start);
    let reclaim_ms = start.elapsed().as_millis() as u64;
    // The writer's I/O fails once its side sees the link down (keepalive): no hang.
    let hangs = usize::from(ended.recv_timeout(HANG).is_err());
    let row = child_run(child, &acked, lender, dir, hangs, reclaim_ms);
    ns.set_link(true).unwrap();
    row
}

/// Waits until the writer child has had `target` writes acknowledged (bounded by `HANG`).
fn wait_acked(acked: &AtomicU64, target: u64, who: &str) {
    let deadline = Instant::now() + HANG;
    while acked.load(Ordering::SeqCst) < target {
        assert!(Instant::now() < deadline, "{who} never wrote");
        std::thread::yield_now();
    }
}

/// Ends a run with a writer child: kills and reaps the child, stops the lender, and reads the
/// row from the lender's image and log in `dir` (then removed).
fn child_run(
    mut child: Child,
    acked: &AtomicU64,
    lender: NodeProcess,
    dir: PathBuf,
    hangs: usize,
    reclaim_ms: u64,
) -> Row {
    let _ = child.kill();
    let _ = child.wait();
    let n = acked.load(Ordering::SeqCst);
    let row = Row {
        runs: 1,
        acked: n,
        lost: lost(&dir.join("lent.img"), n),
        hangs,
        by_expiry: usize::from(ended_by_expiry(&dir.join("lender.log"))),
        reclaim_ms: vec![reclaim_ms],
    };
    drop(lender);
    let _ = std::fs::remove_dir_all(&dir);
    row
}

fn add(total: &Mutex<Row>, r: Row) {
    let mut t = total.lock().unwrap();
    t.runs += r.runs;
    t.acked += r.acked;
    t.lost += r.lost;
    t.hangs += r.hangs;
    t.by_expiry += r.by_expiry;
    t.reclaim_ms.extend(r.reclaim_ms);
}

#[test]
fn fault_matrix_loses_no_acknowledged_write_and_hangs_nothing() {
    let reps = reps();
    let rows = [
        ("kill -9 lender", Mutex::new(Row::default())),
        ("kill -9 borrower", Mutex::new(Row::default())),
        (
            "SIGSTOP borrower past the lease",
            Mutex::new(Row::default()),
        ),
        ("cut tcp link", Mutex::new(Row::default())),
    ];
    let ns = NetnsPair::create_or_skip("the cut-tcp-link row");
    for rep in 0..reps {
        add(&rows[0].1, lender_killed(rep));
        add(&rows[1].1, borrower_fault(rep, false));
        add(&rows[2].1, borrower_fault(rep, true));
        if let Some(ns) = &ns {
            add(&rows[3].1, tcp_cut(ns, rep));
        }
    }
    let mut table = String::from(
        "| fault | runs | acknowledged writes | lost | hangs | taken back by lease expiry | back within lease + 250 ms | back in pool (median) | (max) |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for (name, row) in &rows {
        table.push_str(&row.lock().unwrap().line(name));
        table.push('\n');
    }
    println!("lease {LEASE_MS} ms, bound {BOUND_MS} ms\n{table}");
    let _ = std::io::stdout().flush();
    for (name, row) in &rows {
        let row = row.lock().unwrap();
        if row.runs == 0 && ns.is_none() {
            continue;
        }
        assert_eq!(row.runs, reps);
        assert_eq!(row.lost, 0, "{name}: acknowledged writes lost\n{table}");
        assert_eq!(row.hangs, 0, "{name}: hangs\n{table}");
        assert!(row.acked > 0, "{name}: nothing was written\n{table}");
        // Every borrower fault: the device came back because its lease expired, before the
        // lender saw any link-down (over tcp that comes only after the 3 s keepalive timeout).
        if !row.reclaim_ms.is_empty() {
            assert_eq!(
                row.by_expiry, row.runs,
                "{name}: a take-back waited for something other than the lease\n{table}"
            );
        }
    }
}

/// The writer child of the borrower faults (run by the test above, with its fabric in the
/// environment; ignored on its own).
#[test]
#[ignore = "a child process of fault_matrix_loses_no_acknowledged_write_and_hangs_nothing"]
fn fault_matrix_writer_child() {
    let fabric = std::env::var_os(CHILD_ENV).expect("run by the fault matrix");
    let (node, ctrl) = borrow_here(Path::new(&fabric), "child");
    let mut out = std::io::stdout().lock();
    let mut i = 0;
    while ctrl.write_at((i % SLOTS) * BLOCK as u64, &block(i)).is_ok() {
        i += 1;
        if writeln!(out, "ACK {i}").and_then(|()| out.flush()).is_err() {
            break;
        }
    }
    drop(node);
}
