//! A hostile lender process against a real borrower node: a hand-written peer of the lending
//! protocol (`devlend_testkit::hostile`, run as a child process of this test) offers, over
//! `shm`, only absurd devices (a doorbell range that wraps, 65535 vectors, BAR index 9, BARs of
//! size 0 or not a power of two, windows the link does not have or too small, areas outside
//! their BAR, a wake word past its area, 40 BARs). A `devlend node` borrows from it and from an
//! honest lender on another link: every absurd offer is refused and given back, the node stays
//! up, and the honest device keeps doing verified I/O between the attacks.
//! (In-process, over the loopback fabric: `crates/lending/tests/hostile_peer.rs`.)

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use devlend_fabric::{AddressSpace, LinkConfig, Ntb, ShmNtb};
use devlend_testkit::hostile::{serve_absurd_lender, RawPeer, ABSURD};

mod common;

use common::{borrowed_names, scratch, NodeProcess};

const CHILD_ENV: &str = "DEVLEND_HOSTILE_LENDER_FABRIC";
const GUARD: Duration = Duration::from_secs(60);

fn verified(node: &NodeProcess) {
    let out = node.ctl_ok(&["check", "--write", "nvme0", "--bytes", "256K"]);
    assert!(out.contains("verified"), "{out}");
}

#[test]
fn a_hostile_lender_process_is_refused_and_the_honest_device_keeps_working() {
    let dir = scratch("hostile-lender");
    let (honest_fabric, evil_fabric) = (dir.join("fabric-honest"), dir.join("fabric-evil"));
    let lender = NodeProcess::start(&dir, "lender", &[&honest_fabric], 3000);
    lender.add_nvme("nvme0", &dir.join("lent.img"), "16M");

    // The hostile lender: this test binary again, in a process of its own. It prints one
    // `RETURNED n` line per grant given back.
    let mut evil = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "hostile_lender_child",
            "--include-ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, &evil_fabric)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, returned) = mpsc::channel();
    {
        let out = evil.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Some(n) = line.strip_prefix("RETURNED ").and_then(|n| n.parse().ok()) {
                    let _ = tx.send(n);
                }
            }
        });
    }

    let borrower = NodeProcess::start(&dir, "borrower", &[&honest_fabric, &evil_fabric], 3000);
    borrower.wait_peer_lists("nvme0");
    borrower.wait_peer_lists("many-bars");
    borrower.ctl_ok(&["borrow", "nvme0"]);
    verified(&borrower);

    let mut returns: u64 = 0;
    for name in ABSURD {
        let out = borrower.ctl(&["borrow", name]);
        assert!(
            !out.status.success(),
            "{name}: an absurd grant was accepted: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        println!(
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr).trim_end()
        );
        // The hostile lender was told: the grant came back.
        let n: u64 = returned
            .recv_timeout(GUARD)
            .unwrap_or_else(|_| panic!("{name}: the grant was never given back"));
        returns += 1;
        assert_eq!(n, returns, "{name}");
        verified(&borrower);
    }

    // The node is whole: both links up, the honest device still borrowed and verified, no
    // absurd device held.
    let v: serde_json::Value =
        serde_json::from_str(&borrower.ctl_ok(&["status", "--json"])).unwrap();
    let links = v["links"].as_array().unwrap();
    assert_eq!(links.len(), 2, "{v}");
    assert!(links.iter().all(|l| l["link"] == "up"), "{v}");
    assert_eq!(borrowed_names(&borrower), ["nvme0"], "{v}");
    assert!(borrower.ctl_ok(&["list"]).contains("many-bars"));
    verified(&borrower);

    let _ = evil.kill();
    let _ = evil.wait();
    drop(borrower);
    drop(lender);
    let _ = std::fs::remove_dir_all(&dir);
}

/// The hostile lender (run by the test above, with its fabric in the environment; ignored on
/// its own).
#[test]
#[ignore = "a child process of a_hostile_lender_process_is_refused_and_the_honest_device_keeps_working"]
fn hostile_lender_child() {
    let fabric = std::env::var_os(CHILD_ENV).expect("run by the hostile lender test");
    let ntb: Arc<dyn Ntb> = ShmNtb::open(
        Path::new(&fabric),
        Arc::new(AddressSpace::new()),
        LinkConfig::default(),
    )
    .unwrap();
    let peer = RawPeer::new(ntb);
    let stop = Arc::new(AtomicBool::new(false));
    // Never outlive the test (it kills this process, unless it failed first).
    {
        let (stop, parent) = (stop.clone(), std::os::unix::process::parent_id());
        std::thread::spawn(move || {
            while std::os::unix::process::parent_id() == parent {
                std::thread::sleep(Duration::from_millis(100));
            }
            stop.store(true, Ordering::Relaxed);
        });
    }
    let returns = AtomicU64::new(0);
    serve_absurd_lender(peer, &stop, &returns, |n| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "RETURNED {n}").and_then(|()| out.flush());
    });
}
