//! `devlend node --registry`: hosts on loopback joined through a real etcd started by the
//! test; borrowing by name with links made on demand (TLS with `devlend keygen` keys), the
//! refusals, and the failures (etcd away and back, a member of three killed, a lender killed,
//! a borrower killed).

mod common;
#[path = "../../registry/tests/common/mod.rs"]
mod etcd_rig;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{exe, scratch_dir, status, wait_for, NodeProcess, ScratchDir};
use etcd_rig::EtcdCluster;
use serde_json::Value;

/// Registry lease TTL of the nodes (seconds) and lending lease (ms).
const TTL_S: u64 = 2;
const LEASE_MS: u64 = 1000;

fn keygen(dir: &Path, names: &[&str]) {
    common::keygen(&dir.join("keys"), &[], names);
}

fn cluster_node(dir: &Path, name: &str, etcd: &EtcdCluster) -> NodeProcess {
    let registry = etcd.addr().to_string();
    let keys = dir.join("keys");
    let ttl = TTL_S.to_string();
    NodeProcess::start_with(
        Command::new(exe()),
        dir,
        name,
        &[],
        LEASE_MS,
        &[
            "--registry",
            &registry,
            "--cluster-addr",
            "127.0.0.1",
            "--keys",
            keys.to_str().unwrap(),
            "--registry-ttl",
            &ttl,
        ],
    )
}

fn list(node: &NodeProcess) -> Vec<Value> {
    let v: Value = serde_json::from_str(&node.ctl_ok(&["list", "--json"])).unwrap();
    let mut all: Vec<Value> = v["local"].as_array().unwrap().clone();
    all.extend(v["peer"].as_array().unwrap().iter().cloned());
    all
}

fn find(node: &NodeProcess, device: &str) -> Option<Value> {
    list(node).into_iter().find(|d| d["name"] == device)
}

fn err(out: &std::process::Output) -> String {
    assert!(!out.status.success(), "expected a failure");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn add(node: &NodeProcess, dir: &Path, name: &str) -> std::process::Output {
    let img = dir.join(format!(
        "{name}-{}.img",
        node.state.file_name().unwrap().to_string_lossy()
    ));
    node.ctl(&[
        "add",
        "nvme",
        "--image",
        img.to_str().unwrap(),
        "--size",
        "8M",
        "--name",
        name,
    ])
}

/// [`add`], which must succeed.
fn add_ok(node: &NodeProcess, dir: &Path, name: &str) {
    let out = add(node, dir, name);
    assert!(
        out.status.success(),
        "add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn etcd_ready(test: &str) -> bool {
    etcd_rig::etcd_or_skip(test)
}

/// An etcd cluster of `members` and a scratch directory `tag`, or `None` when `test` is
/// skipped (no etcd, outside CI).
fn etcd_and_dir(test: &str, members: usize, tag: &str) -> Option<(EtcdCluster, ScratchDir)> {
    if !etcd_ready(test) {
        return None;
    }
    Some((EtcdCluster::start(members), scratch_dir(tag)))
}

#[test]
fn borrow_by_name_across_hosts_with_links_made_on_demand() {
    let Some((etcd, dir)) = etcd_and_dir("cluster", 1, "cluster-borrow") else {
        return;
    };
    keygen(&dir, &["alpha", "beta", "gamma"]);
    let alpha = cluster_node(&dir, "alpha", &etcd);
    let beta = cluster_node(&dir, "beta", &etcd);
    let gamma = cluster_node(&dir, "gamma", &etcd);

    add_ok(&alpha, &dir, "disk0");
    // The same name elsewhere is refused at registration, and leaves nothing behind.
    let e = err(&add(&beta, &dir, "disk0"));
    assert!(
        e.contains("device name \"disk0\" already exists in the cluster (lent by alpha)"),
        "{e}"
    );
    let s = status(&beta);
    assert!(s["lending"].as_array().unwrap().is_empty(), "{s}");
    // A node name a live node holds is refused.
    let out = Command::new(exe())
        .args(["node", "--name", "alpha", "--state"])
        .arg(dir.join("alpha2"))
        .args([
            "--registry",
            &etcd.addr().to_string(),
            "--cluster-addr",
            "127.0.0.1",
        ])
        .arg("--keys")
        .arg(dir.join("keys"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let e = err(&out);
    assert!(
        e.contains("node name \"alpha\" is already registered by a live node (tcp 127.0.0.1)"),
        "{e}"
    );
    // Malformed and unreachable registries.
    let delta = |registry_args: &[&str]| {
        let out = Command::new(exe())
            .args(["node", "--name", "delta", "--registry"])
            .args(registry_args)
            .arg("--state")
            .arg(dir.join("delta"))
            .output()
            .unwrap();
        err(&out)
    };
    let e = delta(&["http://127.0.0.1:1"]);
    assert!(e.contains("must start with etcd://"), "{e}");
    let e = delta(&["etcd://127.0.0.1:1", "--cluster-addr", "127.0.0.1"]);
    assert!(e.contains("etcd unreachable at etcd://127.0.0.1:1"), "{e}");

    // Every host sees the cluster's device, its lender, no borrower.
    let d = find(&gamma, "disk0").expect("gamma lists disk0");
    assert_eq!(
        (d["owner"].as_str(), d["borrower"].as_str()),
        (Some("alpha"), None),
        "{d}"
    );
    assert_eq!(d["vendor"], devlend_nvme::PCI_VENDOR_ID, "{d}");
    // No link exists before a borrow.
    assert!(status(&beta)["links"].as_array().unwrap().is_empty());

    // beta and gamma race for it: one wins, the other is told who.
    let (rb, rg) = std::thread::scope(|s| {
        let b = s.spawn(|| beta.ctl(&["borrow", "disk0"]));
        let g = s.spawn(|| gamma.ctl(&["borrow", "disk0"]));
        (b.join().unwrap(), g.join().unwrap())
    });
    let (winner, loser, lost) = match (rb.status.success(), rg.status.success()) {
        (true, false) => (&beta, &gamma, rg),
        (false, true) => (&gamma, &beta, rb),
        other => panic!(
            "exactly one borrow must win, got {other:?}: {} / {}",
            String::from_utf8_lossy(&rb.stderr),
            String::from_utf8_lossy(&rg.stderr)
        ),
    };
    let winner_name = winner
        .state
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let e = err(&lost);
    assert!(
        e.contains(&format!("device disk0 is already lent to {winner_name}")),
        "{e}"
    );
    assert_eq!(
        find(&alpha, "disk0").unwrap()["borrower"].as_str(),
        Some(winner_name.as_str())
    );
    // The device works across the link made on demand.
    let out = winner.ctl_ok(&["check", "--write", "disk0", "--bytes", "64K"]);
    assert!(out.contains("verified"), "{out}");
    let s = status(winner);
    assert_eq!(
        s["cluster"]["links_to_lenders"],
        serde_json::json!(["alpha"]),
        "{s}"
    );
    assert_eq!(
        status(&alpha)["cluster"]["links_to_borrowers"],
        serde_json::json!([winner_name])
    );

    // Returned: free again, and the link is closed on both sides.
    winner.ctl_ok(&["return", "disk0"]);
    assert!(find(loser, "disk0").unwrap()["borrower"].is_null());
    assert!(status(winner)["links"].as_array().unwrap().is_empty());
    wait_for("alpha closes the unneeded link", 10, || {
        status(&alpha)["cluster"]["links_to_borrowers"]
            .as_array()
            .unwrap()
            .is_empty()
    });
    // The lender reset it and offers it again: the loser gets it now.
    wait_for("the loser borrows after the return", 15, || {
        loser.ctl(&["borrow", "disk0"]).status.success()
    });
    let out = loser.ctl_ok(&["check", "--write", "disk0", "--bytes", "64K"]);
    assert!(out.contains("verified"), "{out}");

    // Removed by its lender (once returned): it leaves the cluster's inventory, and its name
    // is free for another host.
    loser.ctl_ok(&["return", "disk0"]);
    wait_for("alpha offers disk0 again", 15, || {
        alpha.ctl(&["remove", "disk0"]).status.success()
    });
    assert!(find(&gamma, "disk0").is_none(), "{:?}", list(&gamma));
    assert!(find(&beta, "disk0").is_none(), "{:?}", list(&beta));
    add_ok(&beta, &dir, "disk0");
    assert_eq!(
        find(&gamma, "disk0").unwrap()["owner"].as_str(),
        Some("beta")
    );
    drop((alpha, beta, gamma));
}

#[test]
fn cluster_failures_etcd_away_and_back_lender_killed_borrower_killed() {
    let Some((mut etcd, dir)) = etcd_and_dir("cluster", 3, "cluster-failures") else {
        return;
    };
    keygen(&dir, &["lender", "user", "other"]);
    let mut lender = cluster_node(&dir, "lender", &etcd);
    let mut user = cluster_node(&dir, "user", &etcd);
    let other = cluster_node(&dir, "other", &etcd);
    for n in ["d1", "d2"] {
        add_ok(&lender, &dir, n);
    }
    user.ctl_ok(&["borrow", "d1"]);

    // One etcd member of three killed: borrowing and listing go on.
    etcd.kill(0);
    other.ctl_ok(&["borrow", "d2"]);
    other.ctl_ok(&["return", "d2"]);
    assert_eq!(
        find(&other, "d1").unwrap()["borrower"].as_str(),
        Some("user")
    );
    other.ctl_ok(&["borrow", "d2"]);

    // etcd unreachable: lending in place goes on, new borrows fail clearly, and a return
    // gives the device back but says that the registry has not taken the claim's release.
    etcd.kill_all();
    let v = other.ctl_json(&["return", "d2"]);
    let pending = v["claim_release_pending"].as_str().unwrap_or_default();
    assert!(pending.contains("etcd"), "{v}");
    assert!(other.ctl_json(&["status"])["borrowed"]
        .as_array()
        .is_some_and(|b| b.iter().all(|d| d["name"] != "d2")));
    user.ctl_ok(&["check", "--write", "d1", "--bytes", "64K"]);
    let e = err(&other.ctl(&["borrow", "d2"]));
    assert!(e.contains("etcd unreachable"), "{e}");
    // Every node must have noticed before etcd returns: etcd restores leases on restart, so a
    // node whose keep-alive had not yet failed for a whole TTL keeps its first lease (correct,
    // but then it never registers again and the check below would wait for nothing).
    wait_for("every node notices it lost its registration", 30, || {
        [&lender, &user, &other]
            .iter()
            .all(|n| status(n)["cluster"]["registered"] == Value::Bool(false))
    });
    let e = err(&other.ctl(&["borrow", "d2"]));
    assert!(
        e.contains("not registered: etcd at etcd://") || e.contains("etcd unreachable"),
        "{e}"
    );
    user.ctl_ok(&["check", "--write", "d1", "--bytes", "64K"]);
    // etcd back: every node registers again, devices and claims included.
    etcd.restart(&[0, 1, 2]);
    let reregistered = || {
        [&lender, &user, &other]
            .iter()
            .all(|n| status(n)["cluster"]["registrations"].as_u64() >= Some(2))
    };
    let start = std::time::Instant::now();
    while !reregistered() {
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let views: Vec<String> = [&lender, &user, &other]
                .iter()
                .map(|n| status(n)["cluster"].to_string())
                .collect();
            panic!("re-registration: not within 60 s: {}", views.join("; "));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    eprintln!(
        "etcd back: every node registered again after {:?}",
        start.elapsed()
    );
    // The claim on d2 that the return could not release goes too (the node retries it).
    wait_for("the inventory is back, d2 free", 10, || {
        find(&other, "d1").is_some_and(|d| d["borrower"].as_str() == Some("user"))
            && find(&other, "d2").is_some_and(|d| d["borrower"].is_null())
    });
    other.ctl_ok(&["borrow", "d2"]);
    user.ctl_ok(&["check", "--write", "d1", "--bytes", "64K"]);

    // The borrower of d1 killed: its claim goes with its lease, the lender reclaims d1 when
    // the heartbeats stop, and another host gets it.
    user.kill9();
    let t = wait_for("d1 freed in the registry", 15, || {
        find(&other, "d1").is_some_and(|d| d["borrower"].is_null())
    });
    eprintln!("borrower killed: d1 free in the registry after {t:?}");
    wait_for("d1 borrowed by another host", 15, || {
        other.ctl(&["borrow", "d1"]).status.success()
    });
    other.ctl_ok(&["check", "--write", "d1", "--bytes", "64K"]);

    // The lender killed: its devices leave the inventory within the TTL, the borrower sees a
    // surprise removal (I/O fails, nothing hangs) and drops its claims and link.
    assert!(find(&other, "d1").is_some());
    lender.kill9();
    let t = wait_for("the dead lender's devices leave the inventory", 15, || {
        list(&other).is_empty()
    });
    // Nobody deletes a dead lender's records: they leave with its etcd lease. How soon is
    // etcd's TTL (measured by `devlend bench cluster`), not asserted here: no test depends on
    // how fast a loaded machine is.
    eprintln!("lender killed: devices gone from the inventory after {t:?} (TTL {TTL_S} s)");
    let e = err(&other.ctl(&["check", "--write", "d1", "--bytes", "4K"]));
    assert!(!e.is_empty());
    wait_for("the borrower drops what the dead lender lent", 15, || {
        let s = status(&other);
        s["borrowed"].as_array().unwrap().is_empty()
            && s["cluster"]["links_to_lenders"]
                .as_array()
                .unwrap()
                .is_empty()
    });
    drop(other);
}

#[test]
fn bench_cluster_quick_reports_every_figure_beside_its_baseline() {
    if !etcd_ready("bench cluster") {
        return;
    }
    let dir = scratch_dir("cluster-bench");
    let out = common::output_ok(
        Command::new(exe())
            .args(["bench", "cluster", "--quick", "--json", "--dir"])
            .arg(&*dir),
        "devlend bench cluster",
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let figures = v["figures"].as_array().unwrap();
    let names: Vec<&str> = figures
        .iter()
        .map(|f| f["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "borrow-by-name-p50-2-hosts",
            "borrow-by-name-p99-2-hosts",
            "borrow-by-name-p50-4-hosts",
            "borrow-by-name-p99-4-hosts",
            "phase-lookup-p50-4-hosts",
            "phase-lookup-p99-4-hosts",
            "phase-claim-p50-4-hosts",
            "phase-claim-p99-4-hosts",
            "phase-link-p50-4-hosts",
            "phase-link-p99-4-hosts",
            "phase-lease-p50-4-hosts",
            "phase-lease-p99-4-hosts",
            "lender-death-to-inventory-exit"
        ]
    );
    for f in figures
        .iter()
        .filter(|f| !f["name"].as_str().unwrap().starts_with("phase-"))
    {
        assert!(f["value"].as_f64().unwrap() > 0.0, "{f}");
        assert!(f["baseline"].as_f64().unwrap() > 0.0, "{f}");
    }
    // The bench removes what it started: its scratch directory is gone.
    let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn hosts_on_one_machine_link_through_shm_on_demand() {
    let Some((etcd, dir)) = etcd_and_dir("cluster shm", 1, "cluster-shm") else {
        return;
    };
    let registry = etcd.addr().to_string();
    let shm = dir.join("fabric");
    let start = |name: &str| {
        NodeProcess::start_with(
            Command::new(exe()),
            &dir,
            name,
            &[],
            LEASE_MS,
            &[
                "--registry",
                &registry,
                "--cluster-shm",
                shm.to_str().unwrap(),
                "--registry-ttl",
                "2",
            ],
        )
    };
    let lender = start("left");
    let borrower = start("right");
    add_ok(&lender, &dir, "shm0");
    borrower.ctl_ok(&["borrow", "shm0"]);
    let s = status(&borrower);
    assert_eq!(s["links"][0]["fabric"], "shm", "{s}");
    let out = borrower.ctl_ok(&["check", "--write", "shm0", "--bytes", "256K"]);
    assert!(out.contains("verified"), "{out}");
    borrower.ctl_ok(&["return", "shm0"]);
    assert!(status(&borrower)["links"].as_array().unwrap().is_empty());
}
