//! Sharing one device among several hosts through SR-IOV virtual functions: `devlend node`
//! processes on the `shm` fabric, each VF lent to a different borrower at the same time.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use devlend_nvme_driver::suite::{self, Target};
use devlend_nvme_driver::Controller;
use devlend_pci::PciFunction;

mod common;

use common::{borrower_here, check_pattern_byte, scratch, NodeProcess};

/// TotalVFs of the model (`devlend add nvme --vfs` accepts 1 to this).
const TOTAL_VFS: u64 = 8;

fn add_vfs(lender: &NodeProcess, image: &Path, size: &str, vfs: &str, namespaces: &str) -> String {
    lender.ctl_ok(&[
        "add",
        "nvme",
        "--name",
        "nvme0",
        "--size",
        size,
        "--image",
        image.to_str().unwrap(),
        "--vfs",
        vfs,
        "--vf-namespaces",
        namespaces,
    ])
}

fn stderr_of(node: &NodeProcess, args: &[&str]) -> String {
    let out = node.ctl(args);
    assert!(!out.status.success(), "devlend {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Where a private namespace's byte 0 is in the image (the model's slicing).
fn private_slice(image_len: u64, vf: u64) -> u64 {
    (image_len / (TOTAL_VFS + 1)) / (1 << 20) * (1 << 20) * vf
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn vfs_are_lent_to_different_borrowers_at_once_and_bad_input_changes_nothing() {
    let dir = Scratch(scratch("sriov-lend"));
    let (fa, fb) = (dir.0.join("fabric-a"), dir.0.join("fabric-b"));
    let lender = NodeProcess::start(&dir.0, "lender", &[&fa, &fb], 5000);
    let alice = NodeProcess::start(&dir.0, "alice", &[&fa], 5000);
    let bob = NodeProcess::start(&dir.0, "bob", &[&fb], 5000);
    let image = dir.0.join("shared.img");
    let img = image.to_str().unwrap();
    // Bad input: refused with a clear error, nothing added.
    let bad: &[(&[&str], &str)] = &[
        (&["--vfs", "0"], "--vfs must be 1 to 8"),
        (&["--vfs", "9"], "--vfs must be 1 to 8"),
        (
            &["--vfs", "2", "--vf-namespaces", "mine"],
            "--vf-namespaces must be `shared` or `private`",
        ),
    ];
    for (extra, want) in bad {
        let mut args = vec![
            "add", "nvme", "--name", "nvme0", "--size", "64M", "--image", img,
        ];
        args.extend_from_slice(extra);
        let err = stderr_of(&lender, &args);
        assert!(err.contains(want), "{extra:?}: {err}");
    }
    let listed = lender.ctl_ok(&["list"]);
    assert!(
        !listed.contains("nvme0"),
        "nothing added after bad input: {listed}"
    );

    let added = add_vfs(&lender, &image, "64M", "2", "private");
    for name in ["nvme0 ", "nvme0-vf1", "nvme0-vf2"] {
        assert!(added.contains(name), "{name} in {added}");
    }
    alice.wait_peer_lists("nvme0-vf1");
    bob.wait_peer_lists("nvme0-vf2");
    // The PF is not lendable while its VFs are offered.
    let err = stderr_of(&alice, &["borrow", "nvme0"]);
    assert!(
        err.contains("physical function") && err.contains("nvme0-vf1, nvme0-vf2"),
        "{err}"
    );
    alice.ctl_ok(&["borrow", "nvme0-vf1"]);
    bob.ctl_ok(&["borrow", "nvme0-vf2"]);
    assert_eq!(lender.borrower_of("nvme0-vf1").as_deref(), Some("alice"));
    assert_eq!(lender.borrower_of("nvme0-vf2").as_deref(), Some("bob"));
    assert_eq!(lender.borrower_of("nvme0"), None);
    // A VF is lent to one borrower at a time, like a device.
    let err = stderr_of(&bob, &["borrow", "nvme0-vf1"]);
    assert!(err.contains("nvme0-vf1 is already lent to alice"), "{err}");
    let listing = lender.ctl_ok(&["list"]);
    assert!(
        listing.contains("lent to alice") && listing.contains("lent to bob"),
        "{listing}"
    );

    // Each writes its own bytes at different offsets, at the same time; each is found in its
    // own slice of the lender's image.
    let offsets = [(&alice, 1u64, 4096u64), (&bob, 2, 8192)];
    std::thread::scope(|s| {
        for (who, _, offset) in offsets {
            s.spawn(move || {
                let out = who.ctl_ok(&[
                    "check",
                    "--write",
                    if offset == 4096 {
                        "nvme0-vf1"
                    } else {
                        "nvme0-vf2"
                    },
                    "--bytes",
                    "256K",
                    "--offset",
                    &offset.to_string(),
                ]);
                assert!(out.contains("verified"), "{out}");
            });
        }
    });
    let len = std::fs::metadata(&image).unwrap().len();
    let file = std::fs::File::open(&image).unwrap();
    for (_, vf, offset) in offsets {
        let mut back = vec![0u8; 256 * 1024];
        file.read_exact_at(&mut back, private_slice(len, vf) + offset)
            .unwrap();
        let want: Vec<u8> = (0..back.len())
            .map(|i| check_pattern_byte(i, offset))
            .collect();
        assert!(
            back == want,
            "VF {vf}'s bytes are not in its slice of the image"
        );
    }
    let mut pf_slice = vec![0u8; 1 << 20];
    file.read_exact_at(&mut pf_slice, 0).unwrap();
    assert!(
        pf_slice.iter().all(|&b| b == 0),
        "the PF's slice is untouched"
    );
}

#[test]
fn driver_suite_runs_unchanged_on_a_borrowed_vf() {
    let dir = Scratch(scratch("sriov-suite"));
    let fabric = dir.0.join("fabric");
    let lender = NodeProcess::start(&dir.0, "lender", &[&fabric], 5000);
    let image = dir.0.join("lent.img");
    // Shared namespace: the VF's namespace is the whole image, so the suite's image checks hold.
    add_vfs(&lender, &image, "64M", "2", "shared");
    let node = borrower_here("suite-borrower", &[&fabric]);
    let f: Arc<dyn PciFunction> = node.borrow("nvme0-vf2").unwrap();
    // A driver sees an NVMe function: the lender filled in the IDs a VF reads as 0xFFFF.
    let id = f.config_read(0, devlend_pci::AccessSize::Dword).unwrap();
    assert_eq!(
        id,
        u32::from(devlend_nvme::PCI_VF_DEVICE_ID) << 16 | u32::from(devlend_nvme::PCI_VENDOR_ID)
    );
    let target = Target {
        make: Box::new(move || f.clone()),
        image: Some(image),
    };
    suite::run_all(&target).unwrap();
}

/// Reads in a loop on `ctrl` until `stop`, counting completed reads and errors.
fn reader(
    ctrl: Arc<Controller>,
    stop: Arc<AtomicBool>,
    ops: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 4096];
    let mut at = 0u64;
    while !stop.load(Ordering::Acquire) {
        match ctrl.read_at(at % (8 << 20), &mut buf) {
            Ok(()) => ops.fetch_add(1, Ordering::AcqRel),
            Err(_) => errors.fetch_add(1, Ordering::AcqRel),
        };
        at += 4096 * 7;
    }
}

#[test]
fn a_killed_vf_borrower_loses_only_its_vf_while_the_others_io_goes_on() {
    let dir = Scratch(scratch("sriov-kill"));
    let (fa, fb) = (dir.0.join("fabric-a"), dir.0.join("fabric-b"));
    let lender = NodeProcess::start(&dir.0, "lender", &[&fa, &fb], 1000);
    add_vfs(&lender, &dir.0.join("lent.img"), "32M", "2", "shared");
    let mut victim = NodeProcess::start(&dir.0, "victim", &[&fa], 1000);
    victim.ctl_ok(&["borrow", "nvme0-vf1"]);
    assert_eq!(lender.borrower_of("nvme0-vf1").as_deref(), Some("victim"));
    // The survivor is this process, on the other link, reading all the time.
    let node = borrower_here("survivor", &[&fb]);
    let f: Arc<dyn PciFunction> = node.borrow("nvme0-vf2").unwrap();
    let ctrl = Arc::new(Controller::new(f).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let (ops, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let t = {
        let (c, s, o, e) = (ctrl.clone(), stop.clone(), ops.clone(), errors.clone());
        std::thread::spawn(move || reader(c, s, o, e))
    };
    let wait_ops = |more: u64, why: &str| {
        let want = ops.load(Ordering::Acquire) + more;
        let deadline = Instant::now() + Duration::from_secs(60);
        while ops.load(Ordering::Acquire) < want {
            assert!(Instant::now() < deadline, "{why}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_ops(50, "the survivor's reads never started");
    victim.kill9();
    lender.wait_available(
        "nvme0-vf1",
        Duration::from_secs(30),
        "the killed borrower's VF was never taken back",
    );
    wait_ops(
        50,
        "the survivor's reads stopped after the other borrower died",
    );
    assert_eq!(lender.borrower_of("nvme0-vf2").as_deref(), Some("survivor"));
    // The VF was reset (FLR) and is offered again: a new borrower's driver initialises it.
    let again = NodeProcess::start(&dir.0, "again", &[&fa], 1000);
    again.ctl_ok(&["borrow", "nvme0-vf1"]);
    assert!(again
        .ctl_ok(&["check", "--write", "nvme0-vf1", "--bytes", "256K"])
        .contains("verified"));
    wait_ops(
        50,
        "the survivor's reads stopped while the VF was lent again",
    );
    stop.store(true, Ordering::Release);
    t.join().unwrap();
    assert_eq!(
        errors.load(Ordering::Acquire),
        0,
        "the survivor saw I/O errors"
    );
}

#[test]
fn a_killed_lender_is_a_surprise_removal_for_every_vf_borrower() {
    let dir = Scratch(scratch("sriov-surprise"));
    let (fa, fb) = (dir.0.join("fabric-a"), dir.0.join("fabric-b"));
    let mut lender = NodeProcess::start(&dir.0, "lender", &[&fa, &fb], 5000);
    add_vfs(&lender, &dir.0.join("lent.img"), "32M", "2", "private");
    let node = borrower_here("two-links", &[&fa, &fb]);
    let ctrls: Vec<Controller> = ["nvme0-vf1", "nvme0-vf2"]
        .iter()
        .map(|n| Controller::new(node.borrow(n).unwrap() as Arc<dyn PciFunction>).unwrap())
        .collect();
    for c in &ctrls {
        c.write_at(0, &[0x5a; 4096]).unwrap();
    }
    lender.kill9();
    let (tx, rx) = mpsc::channel();
    for c in ctrls {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            let failed = c.read_at(0, &mut buf).is_err() && c.write_at(0, &buf).is_err();
            let _ = tx.send(failed);
        });
    }
    for _ in 0..2 {
        let failed = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("a VF borrower's I/O hung after the lender died");
        assert!(failed, "I/O on a removed VF must fail");
    }
}
