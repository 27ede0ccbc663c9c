//! Lending across real processes on the `shm` fabric: `devlend node` daemons as hosts, driven
//! through the CLI, with `kill -9` of either side.

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use devlend_nvme_driver::suite::{self, Target};
use devlend_nvme_driver::Controller;
use devlend_pci::PciFunction;

mod common;

use common::{borrower_here, exe, scratch, NodeProcess, ShmLender};

#[test]
fn driver_suite_runs_unchanged_on_a_borrowed_device() {
    let ShmLender {
        dir,
        fabric,
        image,
        lender,
    } = ShmLender::start("suite", 5000, "64M");
    let node = borrower_here("test-borrower", &[&fabric]);
    let f: Arc<dyn PciFunction> = node.borrow("nvme0").unwrap();
    // The doorbell page is memory the device polls: on shm the borrower reaches it directly.
    let areas = f.bar_mappings(devlend_pci::BarIndex::ALL[0]);
    assert_eq!(areas.len(), 1, "one directly mapped doorbell area in BAR0");
    assert_eq!(areas[0].offset, 0x1000);
    let target = Target {
        make: Box::new(move || f.clone()),
        image: Some(image),
    };
    suite::run_all(&target).unwrap();

    // A second device with a Controller Memory Buffer: the driver puts its submission queues
    // there (the case checks every one is), reaching BAR 2 through the NTB window.
    let cmb_image = dir.join("lent-cmb.img");
    let image_arg = cmb_image.to_str().unwrap();
    lender.ctl_ok(&[
        "add", "nvme", "--name", "nvme1", "--size", "64M", "--image", image_arg, "--cmb", "1M",
    ]);
    let f: Arc<dyn PciFunction> = node.borrow("nvme1").unwrap();
    let bar2 = devlend_pci::BarIndex::new(2).unwrap();
    assert!(
        f.bar_mappings(bar2).is_empty(),
        "the CMB is reached by posted writes"
    );
    let probe = f.clone();
    let target = Target {
        make: Box::new(move || f.clone()),
        image: Some(cmb_image),
    };
    suite::cmb_submission_queues(&target).unwrap();
    let c = Controller::with_config(
        probe,
        devlend_nvme_driver::DriverConfig {
            cmb_submission_queues: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.cmb_queue_count(), c.io_queue_count());
    assert_eq!(c.cmb().map(|i| i.bytes), Some(1 << 20));
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_borrower_loses_the_device_when_its_lease_expires() {
    let rig = ShmLender::start("lease", 1000, "16M");
    let mut borrower = rig.borrower(1000);
    let ShmLender {
        dir,
        fabric,
        lender,
        ..
    } = rig;
    borrower.ctl_ok(&["borrow", "nvme0"]);
    assert_eq!(lender.borrower_of("nvme0").as_deref(), Some("borrower"));
    borrower.kill9();
    lender.wait_available(
        "nvme0",
        Duration::from_secs(30),
        "the lease of a killed borrower never expired",
    );
    // Reset and offered again: a new borrower host gets it and the driver works on it.
    let again = NodeProcess::start(&dir, "borrower2", &[&fabric], 1000);
    again.ctl_ok(&["borrow", "nvme0"]);
    assert!(again
        .ctl_ok(&["check", "--write", "nvme0", "--bytes", "256K"])
        .contains("verified"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_killed_lender_is_a_surprise_removal_and_completed_writes_survive() {
    let ShmLender {
        dir,
        fabric,
        image,
        mut lender,
    } = ShmLender::start("surprise", 5000, "32M");
    let node = borrower_here("test-borrower", &[&fabric]);
    let f: Arc<dyn PciFunction> = node.borrow("nvme0").unwrap();
    let ctrl = Controller::new(f).unwrap();
    let chunk = 64 * 1024;
    let written: Vec<Vec<u8>> = (0..32u8)
        .map(|i| vec![i.wrapping_mul(37) ^ 0x5a; chunk])
        .collect();
    for (i, data) in written.iter().enumerate() {
        ctrl.write_at((i * chunk) as u64, data).unwrap(); // completed: must not be lost
    }
    lender.kill9();
    // New and outstanding I/O fail with errors; nothing hangs.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        let read = ctrl.read_at(0, &mut buf);
        let write = ctrl.write_at(0, &buf);
        let _ = tx.send((read.is_err(), write.is_err()));
    });
    let (read_failed, write_failed) = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("I/O hung after the lender died");
    assert!(
        read_failed && write_failed,
        "I/O on a removed device must fail"
    );
    // Every write the driver saw completed is in the lender's image.
    let file = std::fs::File::open(&image).unwrap();
    for (i, data) in written.iter().enumerate() {
        let mut back = vec![0u8; chunk];
        file.read_exact_at(&mut back, (i * chunk) as u64).unwrap();
        assert!(
            back == *data,
            "completed write {i} is missing from the image"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_borrower_is_refused_with_the_holders_name() {
    let dir = scratch("owner");
    let (fa, fb) = (dir.join("fabric-a"), dir.join("fabric-b"));
    let lender = NodeProcess::start(&dir, "lender", &[&fa, &fb], 5000);
    lender.add_nvme("nvme0", &dir.join("lent.img"), "16M");
    let alice = NodeProcess::start(&dir, "alice", &[&fa], 5000);
    let bob = NodeProcess::start(&dir, "bob", &[&fb], 5000);
    assert!(bob.ctl_ok(&["list"]).contains("nvme0"));
    alice.ctl_ok(&["borrow", "nvme0"]);
    let refused = bob.ctl(&["borrow", "nvme0"]);
    assert!(!refused.status.success());
    let msg = String::from_utf8_lossy(&refused.stderr);
    assert!(msg.contains("alice"), "the refusal names the holder: {msg}");
    assert!(bob.ctl_ok(&["list"]).contains("lent to alice"));
    alice.ctl_ok(&["return", "nvme0"]);
    bob.ctl_ok(&["borrow", "nvme0"]);
    let status: serde_json::Value =
        serde_json::from_str(&bob.ctl_ok(&["status", "--json"])).unwrap();
    assert_eq!(status["borrowed"][0]["name"], "nvme0");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_verbs_say_what_to_do() {
    let dir = scratch("verbs");
    let out = Command::new(exe())
        .args(["list", "--state"])
        .arg(dir.join("nobody"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("devlend node"));
    let fabric = dir.join("fabric");
    let lender = NodeProcess::start(&dir, "lender", &[&fabric], 5000);
    let out = lender.ctl(&["add", "nvme", "--image", "/nonexistent/dir/x.img"]);
    assert!(!out.status.success());
    let out = lender.ctl(&["add", "floppy", "--image", "/tmp/x.img"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("only `nvme`"));
    let out = lender.ctl(&["borrow", "nvme9"]);
    assert!(!out.status.success());
    let out = lender.ctl(&["return", "nvme9"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not borrowed"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn demo_runs_with_no_arguments() {
    let out = Command::new(exe()).arg("demo").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("read-back matches"));
    assert!(text.contains("holds the 4 MiB written"));
    // The sharing step: two borrower hosts, one VF each of one device, private namespaces.
    assert!(
        text.contains("link up between 'borrower2' and 'lender'"),
        "{text}"
    );
    for (who, vf, slice) in [
        ("borrower", 1, "slice 1 of 9"),
        ("borrower2", 2, "slice 2 of 9"),
    ] {
        assert!(
            text.contains(&format!("lender offers nvme1-vf{vf}: VF {vf} of nvme1"))
                && text.contains(slice),
            "{text}"
        );
        assert!(
            text.contains(&format!("{who} borrowed nvme1-vf{vf} ")),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "after both wrote there, {who} reads back its own bytes"
            )),
            "{text}"
        );
        assert!(
            text.contains(&format!("holds {who}'s bytes at byte "))
                && text.contains(&format!("(VF {vf}'s private slice)")),
            "{text}"
        );
    }
    assert!(text.contains("nvme1-vf2 is available"), "{text}");
    assert!(text.contains("demo complete"));
}
