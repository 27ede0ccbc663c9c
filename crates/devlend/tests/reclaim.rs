//! Forced take-back (`devlend reclaim NAME --grace D`) with our user-space driver: the borrower
//! keeps doing I/O through the grace period, then loses the device (a surprise removal: errors,
//! no hang); every write it saw acknowledged is in the image; the lender has reset the device
//! and offers it again, and a borrower that gives it back within the grace is not revoked.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use devlend_nvme_driver::Controller;
use devlend_pci::PciFunction;

mod common;

use common::{borrower_here, NodeProcess, ShmLender};

const BLOCK: usize = 4096;

fn block(i: u64) -> Vec<u8> {
    (0..BLOCK)
        .map(|j| (i as u8).wrapping_mul(31) ^ (j as u8) ^ 0x3c)
        .collect()
}

fn reclaim(lender: &NodeProcess, grace: &str) -> serde_json::Value {
    let out = lender.ctl_ok(&["reclaim", "nvme0", "--grace", grace, "--json"]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn reclaim_gives_a_grace_then_removes_and_offers_the_device_again() {
    let rig = ShmLender::start("reclaim", 5000, "16M");
    let node = Arc::new(borrower_here("driver-host", &[&rig.fabric]));
    let f: Arc<dyn PciFunction> = node.borrow("nvme0").unwrap();
    let ctrl = Controller::new(f).unwrap();
    // Sustained writes, each recorded once acknowledged, until the device goes.
    let acked = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel();
    let writer = {
        let acked = acked.clone();
        std::thread::spawn(move || {
            let mut i = 0u64;
            loop {
                let at = (i % 4000) * BLOCK as u64;
                if let Err(e) = ctrl.write_at(at, &block(i)) {
                    let _ = tx.send(e.to_string());
                    return;
                }
                acked.store(i + 1, Ordering::SeqCst);
                i += 1;
            }
        })
    };
    while acked.load(Ordering::SeqCst) < 10 {
        std::thread::yield_now();
    }
    let before = acked.load(Ordering::SeqCst);
    let v = reclaim(&rig.lender, "1s");
    let during = acked.load(Ordering::SeqCst) - before;
    assert_eq!(
        v["returned"], false,
        "our driver does not give it back: {v}"
    );
    assert!(v["elapsed_ms"].as_u64().unwrap() >= 1000, "{v}");
    assert!(
        during > 0,
        "no write was acknowledged during the grace period"
    );
    // The writer ends with an error, not a hang.
    let err = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("I/O hung after the take-back");
    assert!(err.contains("removed") || err.contains("Removed"), "{err}");
    writer.join().unwrap();
    // Every acknowledged write is in the image (the last 4000 blocks written win). Write `n`,
    // the one that failed, may have reached the image before the device was cut off (its
    // completion could not be delivered): its slot is the one of write `n - 4000`, which
    // holds one or the other.
    let n = acked.load(Ordering::SeqCst);
    let file = std::fs::File::open(&rig.image).unwrap();
    for i in n.saturating_sub(4000)..n {
        let mut back = vec![0u8; BLOCK];
        file.read_exact_at(&mut back, (i % 4000) * BLOCK as u64)
            .unwrap();
        let unacknowledged = i + 4000 == n && back == block(n);
        assert!(
            back == block(i) || unacknowledged,
            "acknowledged write {i} of {n} is missing"
        );
    }
    // Reset and offered again at once: free on the lender, and borrowable here.
    assert_eq!(rig.lender.borrower_of("nvme0"), None);
    let f: Arc<dyn PciFunction> = node.borrow("nvme0").unwrap();
    let ctrl = Controller::new(f).unwrap();
    let mut back = vec![0u8; BLOCK];
    let last = n - 1;
    ctrl.read_at((last % 4000) * BLOCK as u64, &mut back)
        .unwrap();
    assert!(back == block(last));
    drop(ctrl);

    // A borrower that gives the device back when told is not revoked.
    let weak = Arc::downgrade(&node);
    node.set_reclaim_hook(Some(Arc::new(move |name: &str, _grace| {
        if let Some(node) = weak.upgrade() {
            let _ = node.give_back(name);
        }
    })));
    let v = reclaim(&rig.lender, "20s");
    assert_eq!(v["returned"], true, "{v}");
    assert!(v["elapsed_ms"].as_u64().unwrap() < 20_000, "{v}");
    assert_eq!(rig.lender.borrower_of("nvme0"), None);
    // Nothing to reclaim now: an error that says so.
    let out = rig.lender.ctl(&["reclaim", "nvme0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not lent"));
    node.set_reclaim_hook(None);
    drop(node);
    let _ = std::fs::remove_dir_all(&rig.dir);
}
