//! Lending over the `tcp` fabric between two network namespaces joined by a veth pair, each
//! host a `devlend node` process, mutually authenticated with keys from `devlend keygen`:
//! ownership, data in the lender's image, lease expiry after `kill -9` of a borrower, and a
//! surprise removal after `kill -9` of the lender.

mod common;

use std::os::unix::fs::FileExt;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use common::{check_pattern_byte, exe, scratch, NodeProcess};
use devlend_testkit::netns::NetnsPair;

#[test]
fn lending_over_tcp_between_namespaces() {
    let Some(ns) = NetnsPair::create_or_skip("the tcp lending test") else {
        return;
    };
    let dir = scratch("tcp");
    let keys = dir.join("keys");
    common::keygen(&keys, &[], &["lender", "alice", "bob"]);
    let keys_arg = keys.to_str().unwrap();
    let lender_ip = ns.addr(0);
    let node = |side: usize, name: &str, fabrics: &[String]| {
        NodeProcess::start_with(
            ns.command(side, exe()),
            &dir,
            name,
            fabrics,
            1500,
            &["--keys", keys_arg],
        )
    };
    let mut lender = node(
        0,
        "lender",
        &[
            format!("tcp-listen:alice@{lender_ip}:7701"),
            format!("tcp-listen:bob@{lender_ip}:7702"),
        ],
    );
    let image = dir.join("lent.img");
    lender.add_nvme("nvme0", &image, "16M");
    let alice = node(
        1,
        "alice",
        &[format!("tcp-connect:lender@{lender_ip}:7701")],
    );
    let mut bob = node(1, "bob", &[format!("tcp-connect:lender@{lender_ip}:7702")]);
    alice.wait_peer_lists("nvme0");
    bob.wait_peer_lists("nvme0");

    // One borrower at a time; the refusal names the holder.
    alice.ctl_ok(&["borrow", "nvme0"]);
    let refused = bob.ctl(&["borrow", "nvme0"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("alice"));

    // The user-space driver on the borrowed device, across the network; bytes in the image.
    let offset = 1u64 << 20;
    let len = 256 * 1024;
    let report = alice.ctl_ok(&[
        "check", "--write", "nvme0", "--bytes", "256K", "--offset", "1M",
    ]);
    assert!(report.contains("verified"), "{report}");
    let mut back = vec![0u8; len];
    std::fs::File::open(&image)
        .unwrap()
        .read_exact_at(&mut back, offset)
        .unwrap();
    assert!(
        back.iter()
            .enumerate()
            .all(|(i, b)| *b == check_pattern_byte(i, offset)),
        "the image lacks the written bytes"
    );

    // A device with a Controller Memory Buffer: the driver's submission queues go into it
    // through the BAR window (posted writes over tcp), and the PRP lists and the data of writes
    // of up to 128 KiB too; the data checks pass. `--cmb` on a device without one is refused
    // and says how to get one.
    let cmb_image = dir.join("lent-cmb.img");
    lender.ctl_ok(&[
        "add",
        "nvme",
        "--name",
        "nvme1",
        "--size",
        "16M",
        "--image",
        cmb_image.to_str().unwrap(),
        "--cmb",
        "1M",
    ]);
    alice.wait_peer_lists("nvme1");
    alice.ctl_ok(&["borrow", "nvme1"]);
    let report = alice.ctl_ok(&[
        "check", "--write", "--cmb", "nvme1", "--bytes", "512K", "--offset", "2M",
    ]);
    assert!(report.contains("verified"), "{report}");
    assert!(
        report.contains("submission queues in the device's CMB"),
        "{report}"
    );
    // One 96 KiB write: its data and its PRP list (23 entries) are pushed into the CMB, and so
    // is the list of the read that verifies it.
    let report = alice.ctl_ok(&[
        "check", "--write", "--cmb", "nvme1", "--bytes", "96K", "--offset", "4M",
    ]);
    assert!(
        report.contains("verified") && report.contains("; 1 writes' data and 2 PRP lists pushed"),
        "{report}"
    );
    let no_cmb = alice.ctl(&["check", "--cmb", "nvme0", "--bytes", "4K"]);
    assert!(!no_cmb.status.success());
    assert!(
        String::from_utf8_lossy(&no_cmb.stderr).contains("--cmb SIZE"),
        "{}",
        String::from_utf8_lossy(&no_cmb.stderr)
    );
    alice.ctl_ok(&["return", "nvme1"]);

    // Hand over, then kill -9 the new holder: its lease expires and the device is offered again.
    alice.ctl_ok(&["return", "nvme0"]);
    bob.ctl_ok(&["borrow", "nvme0"]);
    bob.kill9();
    lender.wait_available(
        "nvme0",
        Duration::from_secs(60),
        "the killed borrower's lease never expired",
    );
    alice.ctl_ok(&["borrow", "nvme0"]);

    // kill -9 of the lender: the borrower's I/O fails with an error, nothing hangs.
    lender.kill9();
    let (tx, rx) = mpsc::channel();
    let state = alice.state.clone();
    std::thread::spawn(move || {
        let out = Command::new(exe())
            .args(["check", "--write", "nvme0", "--bytes", "64K", "--state"])
            .arg(&state)
            .output();
        let _ = tx.send(out.map(|o| o.status.success()).unwrap_or(false));
    });
    let ok = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("I/O hung after the lender died");
    assert!(!ok, "I/O on a device whose lender died must fail");
    drop(ns);
    let _ = std::fs::remove_dir_all(&dir);
}
