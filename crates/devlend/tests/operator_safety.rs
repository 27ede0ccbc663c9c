//! What an operator meets (issue #15, items 2 to 9): verbs that must not destroy data, take
//! what belongs to someone else, or accept what cannot work. Each test fails on the code
//! before the fix.

use std::path::{Path, PathBuf};

mod common;

use common::{fill_image, scratch, NodeProcess};

/// A lender and a borrower node on one shm link, in a fresh scratch directory.
struct Pair {
    dir: PathBuf,
    lender: NodeProcess,
    borrower: NodeProcess,
}

impl Pair {
    fn new(tag: &str) -> Pair {
        let dir = scratch(tag);
        let fabric = dir.join("fabric");
        let lender = NodeProcess::start(&dir, "lender", &[&fabric], 5000);
        let borrower = NodeProcess::start(&dir, "borrower", &[&fabric], 5000);
        Pair {
            dir,
            lender,
            borrower,
        }
    }

    /// Adds `name` on the lender, backed by an existing image, and waits until the borrower
    /// sees it.
    fn lend(&self, name: &str, image: &Path, extra: &[&str]) {
        let mut args = vec![
            "add",
            "nvme",
            "--name",
            name,
            "--image",
            image.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.lender.ctl_ok(&args);
        self.borrower.wait_peer_lists(name);
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn check_reads_only_unless_told_to_write_and_refuses_a_device_served_over_vfio_user() {
    let p = Pair::new("opsafe-check");
    let image = p.dir.join("guest.img");
    let before = fill_image(&image, 16 << 20, 7);
    p.lend("nvme0", &image, &[]);
    p.borrower.ctl_ok(&["borrow", "nvme0"]);

    // The default check reads (1 MiB at offset 0, where partition tables live) and writes
    // nothing.
    let out = p.borrower.ctl_json(&["check", "nvme0"]);
    assert_eq!(out["wrote"], false, "{out}");
    assert!(
        out["summary"].as_str().unwrap().contains("nothing written"),
        "{out}"
    );
    assert!(
        std::fs::read(&image).unwrap() == before,
        "a check without --write changed the device's bytes"
    );
    // Only --write writes (so the comparison above can see a write).
    let out = p.borrower.ctl_ok(&[
        "check", "nvme0", "--write", "--bytes", "64K", "--offset", "1M",
    ]);
    assert!(out.contains("verified"), "{out}");
    let after = std::fs::read(&image).unwrap();
    assert!(after[1 << 20..(1 << 20) + (64 << 10)] != before[1 << 20..(1 << 20) + (64 << 10)]);
    assert!(
        after[..1 << 20] == before[..1 << 20],
        "--write wrote outside its range"
    );
    p.borrower.ctl_ok(&["return", "nvme0"]);

    // Served over vfio-user (a guest may be using it): refused, with or without --write.
    let sock = p.dir.join("nvme0.sock");
    p.borrower
        .ctl_ok(&["borrow", "nvme0", "--vfio-user", sock.to_str().unwrap()]);
    let served = std::fs::read(&image).unwrap();
    for args in [&["check", "nvme0"][..], &["check", "nvme0", "--write"][..]] {
        let (code, msg) = p.borrower.ctl_err(args);
        assert_eq!(code, "in_use", "{msg}");
        assert!(msg.contains("vfio-user"), "{msg}");
    }
    assert!(std::fs::read(&image).unwrap() == served);
}

/// Whether something accepts connections on `path`.
fn live(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

#[test]
fn borrow_over_vfio_user_refuses_a_live_socket_and_replaces_only_a_stale_one() {
    let p = Pair::new("opsafe-sock");
    for (name, seed) in [("nvme0", 1u8), ("nvme1", 2)] {
        let image = p.dir.join(format!("{name}.img"));
        fill_image(&image, 4 << 20, seed);
        p.lend(name, &image, &[]);
    }
    // The lender's own management socket: refused, the lender still answers.
    let mgmt = p.lender.state.join("node.sock");
    let (code, msg) =
        p.borrower
            .ctl_err(&["borrow", "nvme0", "--vfio-user", mgmt.to_str().unwrap()]);
    assert_eq!(code, "in_use", "{msg}");
    assert!(msg.contains("live socket"), "{msg}");
    assert!(live(&mgmt), "the lender's management socket was cut");
    p.lender.ctl_ok(&["status"]);
    // A second borrow onto the first one's socket: refused, the first keeps its socket.
    let sock = p.dir.join("guest.sock");
    p.borrower
        .ctl_ok(&["borrow", "nvme0", "--vfio-user", sock.to_str().unwrap()]);
    let (code, msg) =
        p.borrower
            .ctl_err(&["borrow", "nvme1", "--vfio-user", sock.to_str().unwrap()]);
    assert_eq!(code, "in_use", "{msg}");
    assert!(live(&sock), "the first borrow's socket was removed");
    let status = p.borrower.ctl_json(&["status"]);
    assert_eq!(status["borrowed"][0]["vfio_user"], sock.to_str().unwrap());
    // A stale socket file (its server gone) is replaced.
    let stale = p.dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists() && !live(&stale));
    p.borrower
        .ctl_ok(&["borrow", "nvme1", "--vfio-user", stale.to_str().unwrap()]);
    assert!(live(&stale));
}

#[test]
fn a_borrow_that_fails_after_the_lease_was_granted_gives_the_device_back() {
    let p = Pair::new("opsafe-rollback");
    let image = p.dir.join("disk.img");
    fill_image(&image, 4 << 20, 3);
    p.lend("nvme0", &image, &[]);
    // The lease is granted, then the socket cannot be bound (no such directory).
    let bad = p.dir.join("no-such-dir").join("nvme0.sock");
    let (_, msg) = p
        .borrower
        .ctl_err(&["borrow", "nvme0", "--vfio-user", bad.to_str().unwrap()]);
    assert!(msg.contains("given back"), "{msg}");
    assert_eq!(p.lender.borrower_of("nvme0"), None, "the lease was kept");
    let status = p.borrower.ctl_json(&["status"]);
    assert_eq!(status["borrowed"], serde_json::json!([]), "{status}");
    // And it can be borrowed again at once.
    p.borrower.ctl_ok(&["borrow", "nvme0"]);
}

/// The serial number `check` reads from a borrowed device's controller.
fn serial_of(node: &NodeProcess, name: &str) -> String {
    let out = node.ctl_json(&["check", name, "--bytes", "4K"]);
    out["serial"].as_str().unwrap().to_string()
}

#[test]
fn every_added_nvme_device_has_its_own_serial_kept_across_a_restart() {
    let mut p = Pair::new("opsafe-serial");
    for (name, seed) in [("nvme0", 1u8), ("nvme1", 2)] {
        let image = p.dir.join(format!("{name}.img"));
        fill_image(&image, 4 << 20, seed);
        p.lend(name, &image, &[]);
        p.borrower.ctl_ok(&["borrow", name]);
    }
    let s0 = serial_of(&p.borrower, "nvme0");
    let s1 = serial_of(&p.borrower, "nvme1");
    assert_ne!(
        s0, s1,
        "two devices share a serial: a guest given both rejects one"
    );
    assert!(!s0.is_empty() && !s1.is_empty());
    // --serial still wins.
    let image = p.dir.join("named.img");
    fill_image(&image, 4 << 20, 3);
    p.lender.ctl_ok(&[
        "add",
        "nvme",
        "--name",
        "named",
        "--serial",
        "MYSERIAL42",
        "--image",
        image.to_str().unwrap(),
    ]);
    // The lender restarts on its state directory: nvme0 comes back with the same serial.
    p.lender.kill9();
    let fabric = p.dir.join("fabric");
    p.lender = NodeProcess::start(&p.dir, "lender", &[&fabric], 5000);
    p.borrower.wait_peer_lists("named");
    // The borrower saw the link drop: what it held is gone; borrow again.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !p.borrower.ctl(&["borrow", "nvme0"]).status.success() {
        assert!(
            std::time::Instant::now() < deadline,
            "nvme0 never borrowable again"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        serial_of(&p.borrower, "nvme0"),
        s0,
        "the serial changed on restart"
    );
    p.borrower.ctl_ok(&["borrow", "named"]);
    assert_eq!(serial_of(&p.borrower, "named"), "MYSERIAL42");
}

#[test]
fn an_image_backs_one_device_at_a_time_in_one_node_or_two() {
    let p = Pair::new("opsafe-lock");
    let image = p.dir.join("shared.img");
    fill_image(&image, 4 << 20, 5);
    p.lend("nvme0", &image, &[]);
    // Under a second name on the same node, also spelled differently.
    let other_spelling = p.dir.join(".").join("shared.img");
    for path in [&image, &other_spelling] {
        let (code, msg) = p.lender.ctl_err(&[
            "add",
            "nvme",
            "--name",
            "again",
            "--image",
            path.to_str().unwrap(),
        ]);
        assert_eq!(code, "in_use", "{msg}");
        assert!(msg.contains("in use"), "{msg}");
    }
    // From another node process.
    let other = NodeProcess::start(&p.dir, "other", &[&p.dir.join("fabric2")], 5000);
    let (code, msg) = other.ctl_err(&["add", "nvme", "--image", image.to_str().unwrap()]);
    assert_eq!(code, "in_use", "{msg}");
    let list = other.ctl_json(&["list"]);
    assert_eq!(list["local"], serde_json::json!([]), "{list}");
}

/// Runs `cmd` to its exit (at most 30 s, then it is killed and the test fails).
fn run_to_exit(mut cmd: std::process::Command) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} kept running: it accepted what it should refuse");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn add_keygen_and_node_refuse_what_cannot_work() {
    let dir = scratch("opsafe-refuse");
    let fabric = dir.join("fabric");
    let lender = NodeProcess::start(&dir, "lender", &[&fabric], 5000);
    // Sizes that are no whole number of blocks: refused, nothing created.
    let fresh = dir.join("fresh.img");
    for size in ["0", "1000", "4097"] {
        let (code, msg) = lender.ctl_err(&[
            "add",
            "nvme",
            "--size",
            size,
            "--image",
            fresh.to_str().unwrap(),
        ]);
        assert_eq!(code, "invalid", "--size {size}: {msg}");
        assert!(msg.contains("block size"), "{msg}");
        assert!(
            !fresh.exists(),
            "--size {size}: a failed add left the image behind"
        );
    }
    // A failed add removes the image it created.
    let (_, msg) = lender.ctl_err(&[
        "add",
        "nvme",
        "--size",
        "1M",
        "--vfs",
        "99",
        "--image",
        fresh.to_str().unwrap(),
    ]);
    assert!(msg.contains("--vfs"), "{msg}");
    assert!(!fresh.exists(), "a failed add left the image it created");
    // An existing image of another size than --size asks for: refused, left as it is.
    let small = dir.join("small.img");
    fill_image(&small, 4 << 20, 9);
    let (code, msg) = lender.ctl_err(&[
        "add",
        "nvme",
        "--size",
        "1G",
        "--image",
        small.to_str().unwrap(),
    ]);
    assert_eq!(code, "invalid", "{msg}");
    assert!(msg.contains("4194304 bytes"), "{msg}");
    assert_eq!(std::fs::metadata(&small).unwrap().len(), 4 << 20);
    // The same size, or none, is fine.
    lender.ctl_ok(&[
        "add",
        "nvme",
        "--size",
        "4M",
        "--image",
        small.to_str().unwrap(),
    ]);

    // keygen: an existing CA is kept unless --force; a name given twice is refused.
    let keys = dir.join("keys");
    let keygen = |args: &[&str]| {
        std::process::Command::new(common::exe())
            .args(["keygen", "--json", "--dir"])
            .arg(&keys)
            .args(args)
            .output()
            .unwrap()
    };
    assert!(keygen(&["alpha", "beta"]).status.success());
    let ca = std::fs::read(keys.join("ca.pem")).unwrap();
    let out = keygen(&["alpha", "beta"]);
    assert!(!out.status.success());
    let (code, msg) = common::json_error(&out.stderr);
    assert_eq!(code, "already_exists", "{msg}");
    assert!(msg.contains("--force"), "{msg}");
    assert_eq!(
        std::fs::read(keys.join("ca.pem")).unwrap(),
        ca,
        "the CA was replaced"
    );
    assert!(keygen(&["alpha", "beta", "--force"]).status.success());
    assert_ne!(std::fs::read(keys.join("ca.pem")).unwrap(), ca);
    let _ = std::fs::remove_dir_all(&keys);
    let out = keygen(&["alpha", "alpha"]);
    let (code, msg) = common::json_error(&out.stderr);
    assert_eq!(code, "invalid", "{msg}");
    assert!(!keys.join("ca.pem").exists());

    // node: a zero lease and a name with a space are refused at start.
    for (args, says) in [
        (["--name", "ok", "--lease-ms", "0"], "--lease-ms"),
        (["--name", "my host", "--lease-ms", "3000"], "my host"),
    ] {
        let mut cmd = std::process::Command::new(common::exe());
        cmd.arg("node")
            .args(args)
            .arg("--state")
            .arg(dir.join("refused-node"))
            .arg("--fabric")
            .arg(format!("shm:{}", dir.join("fabric-refused").display()));
        let out = run_to_exit(cmd);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
    }
    drop(lender);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_third_default_nvme_device_on_one_link_is_refused_naming_the_limit_and_fewer_queues_fit() {
    let p = Pair::new("opsafe-queues");
    for name in ["d0", "d1", "d2"] {
        let image = p.dir.join(format!("{name}.img"));
        fill_image(&image, 1 << 20, 4);
        p.lend(name, &image, &[]);
    }
    p.borrower.ctl_ok(&["borrow", "d0"]);
    p.borrower.ctl_ok(&["borrow", "d1"]);
    let out = p.borrower.ctl(&["borrow", "d2"]);
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("48 interrupt doorbell bits"), "{msg}");
    assert!(msg.contains("--queues"), "{msg}");
    assert_eq!(p.lender.borrower_of("d2"), None);
    // Devices with 4 queues (5 vectors each) fit beside the two (34 of 48 bits), and work.
    for name in ["q0", "q1"] {
        let image = p.dir.join(format!("{name}.img"));
        fill_image(&image, 1 << 20, 5);
        p.lend(name, &image, &["--queues", "4"]);
        p.borrower.ctl_ok(&["borrow", name]);
    }
    let out = p
        .borrower
        .ctl_ok(&["check", "q1", "--write", "--bytes", "64K"]);
    assert!(out.contains("verified"), "{out}");
    let (code, msg) = p.lender.ctl_err(&[
        "add",
        "nvme",
        "--name",
        "bad",
        "--queues",
        "48",
        "--image",
        p.dir.join("d0.img").to_str().unwrap(),
    ]);
    assert_eq!(code, "invalid", "{msg}");
    // A Controller Memory Buffer of a size the model cannot offer, or beside SR-IOV: refused
    // with what would do, and nothing added or created.
    let fresh = p.dir.join("cmb.img");
    for (extra, says) in [
        (&["--cmb", "100K"][..], "power of two from 64K to 1G"),
        (&["--cmb", "2G"][..], "power of two from 64K to 1G"),
        (&["--cmb", "32K"][..], "--cmb 1M"),
        (&["--cmb", "1M", "--vfs", "2"][..], "--cmb and --vfs"),
    ] {
        let mut args = vec![
            "add",
            "nvme",
            "--name",
            "cmb",
            "--size",
            "1M",
            "--image",
            fresh.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (code, msg) = p.lender.ctl_err(&args);
        assert_eq!(code, "invalid", "{extra:?}: {msg}");
        assert!(msg.contains(says), "{extra:?}: {msg}");
        assert!(!fresh.exists(), "{extra:?} created the image");
    }
    let listed = p.lender.ctl_ok(&["list"]);
    assert!(!listed.contains("cmb"), "{listed}");
}

#[test]
fn status_shows_a_device_whose_lender_died_as_lost_with_the_reason() {
    let mut p = Pair::new("opsafe-lost");
    let image = p.dir.join("disk.img");
    fill_image(&image, 4 << 20, 6);
    p.lend("nvme0", &image, &[]);
    p.borrower.ctl_ok(&["borrow", "nvme0"]);
    let status = p.borrower.ctl_json(&["status"]);
    assert_eq!(status["borrowed"][0]["state"], "borrowed", "{status}");
    assert_eq!(status["lost"], serde_json::json!([]), "{status}");
    p.lender.kill9();
    // The borrower notices the link going down; the device moves from borrowed to lost.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let status = loop {
        let s = p.borrower.ctl_json(&["status"]);
        if s["borrowed"] == serde_json::json!([]) {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dead lender's device stays borrowed: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let lost = &status["lost"][0];
    assert_eq!(lost["name"], "nvme0", "{status}");
    assert_eq!(lost["state"], "lost", "{status}");
    assert_eq!(lost["owner"], "lender", "{status}");
    assert!(
        lost["reason"].as_str().unwrap().contains("lender"),
        "{status}"
    );
    let text = p.borrower.ctl_ok(&["status"]);
    assert!(text.contains("lost") && text.contains("nvme0"), "{text}");
    // `return` forgets it.
    let out = p.borrower.ctl_ok(&["return", "nvme0"]);
    assert!(out.contains("lost"), "{out}");
    let status = p.borrower.ctl_json(&["status"]);
    assert_eq!(status["lost"], serde_json::json!([]), "{status}");
}

/// Names `node`'s `list` shows (its own under `local`, its peer's under `peer`).
fn listed(node: &NodeProcess, side: &str) -> Vec<String> {
    let v = node.ctl_json(&["list"]);
    v[side]
        .as_array()
        .unwrap_or_else(|| panic!("no {side} in {v}"))
        .iter()
        .map(|d| d["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn remove_stops_lending_a_device_for_good_keeps_its_image_and_refuses_what_is_in_use() {
    let mut p = Pair::new("opsafe-remove");
    let image = p.dir.join("nvme0.img");
    let bytes = fill_image(&image, 4 << 20, 9);
    p.lend("nvme0", &image, &[]);
    let pf_image = p.dir.join("pf0.img");
    fill_image(&pf_image, 16 << 20, 10);
    p.lend("pf0", &pf_image, &["--vfs", "2"]);

    // Lent: refused, naming the borrower and how to take it back; still lent.
    p.borrower.ctl_ok(&["borrow", "nvme0"]);
    let (code, msg) = p.lender.ctl_err(&["remove", "nvme0"]);
    assert_eq!(code, "in_use", "{msg}");
    assert!(msg.contains("lent to borrower"), "{msg}");
    assert!(msg.contains("devlend reclaim nvme0"), "{msg}");
    assert_eq!(p.lender.borrower_of("nvme0").as_deref(), Some("borrower"));
    // A virtual function goes only with its physical function; a physical function not
    // while one of its virtual functions is lent.
    let (code, msg) = p.lender.ctl_err(&["remove", "pf0-vf1"]);
    assert_eq!(code, "in_use", "{msg}");
    assert!(msg.contains("virtual function of pf0"), "{msg}");
    p.borrower.ctl_ok(&["borrow", "pf0-vf2"]);
    let (code, msg) = p.lender.ctl_err(&["remove", "pf0"]);
    assert_eq!(code, "in_use", "{msg}");
    assert!(msg.contains("pf0-vf2 is lent to borrower"), "{msg}");
    assert!(listed(&p.lender, "local").contains(&"pf0-vf1".to_string()));

    // Returned: removed. The peer no longer sees it, the image keeps its bytes and is free
    // for another device, and the state no longer has it.
    p.borrower.ctl_ok(&["return", "nvme0"]);
    p.borrower.ctl_ok(&["return", "pf0-vf2"]);
    let v = p.lender.ctl_json(&["remove", "nvme0"]);
    assert_eq!(v["removed"], serde_json::json!(["nvme0"]), "{v}");
    assert!(!listed(&p.lender, "local").contains(&"nvme0".to_string()));
    assert!(!listed(&p.borrower, "peer").contains(&"nvme0".to_string()));
    assert_eq!(std::fs::read(&image).unwrap(), bytes, "the image changed");
    let saved = std::fs::read_to_string(p.dir.join("lender").join("devices.json")).unwrap();
    assert!(!saved.contains("\"nvme0\""), "{saved}");
    let (code, msg) = p.lender.ctl_err(&["remove", "nvme0"]);
    assert_eq!(code, "not_found", "{msg}");
    p.lend("again", &image, &[]);

    // A physical function goes with its virtual functions.
    let v = p.lender.ctl_json(&["remove", "pf0"]);
    assert_eq!(
        v["removed"],
        serde_json::json!(["pf0", "pf0-vf1", "pf0-vf2"]),
        "{v}"
    );
    assert_eq!(listed(&p.lender, "local"), ["again"]);

    // For good: a restarted lender offers only what is left.
    p.lender.kill9();
    let fabric = p.dir.join("fabric");
    p.lender = NodeProcess::start(&p.dir, "lender", &[&fabric], 5000);
    assert_eq!(listed(&p.lender, "local"), ["again"]);
}
