//! `devlend bench vm`, short: one boot per row, one round, a dd workload and two `io-load`
//! workloads (random 4 KiB at QD1 and QD32, run by this build's `devlend` bundled into the
//! guest). Every row reports its figures and every non-baseline row its same-run baseline:
//! idle rows beside `qemu-nvme`, `-loaded` rows beside `qemu-nvme-loaded`. The numbers
//! themselves are never checked (shared machines are noisy).
//!
//! Needs the VM assets (root to provision them the first time; skipped with a printed reason
//! otherwise, except under `CI`); the tcp rows are asked for as root only (network namespaces).

mod common;

use std::path::Path;

use devlend_testkit::guest;

#[test]
fn bench_vm_reports_dd_and_io_load_rows_beside_their_baselines() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let Some(_assets) = guest::provision_for_tests(&repo).expect("provisioning VM assets") else {
        return;
    };
    let root = rustix::process::geteuid().is_root();
    let tmp = common::TempRoot::new("bench-vm");
    let mut cmd = tmp.command(env!("CARGO_BIN_EXE_devlend"));
    cmd.args([
        "bench",
        "vm",
        "--json",
        "--boots",
        "1",
        "--rounds",
        "1",
        "--io-secs",
        "0.5",
        "--no-local",
        "--poll-row-us",
        "0",
        "--only",
        "write-4k,randread-4k-qd1,randwrite-4k-qd32",
    ]);
    if !root {
        cmd.arg("--no-tcp");
    }
    let out = cmd.output().expect("running devlend");
    assert!(
        out.status.success(),
        "devlend bench vm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(json["bench"], "vm");
    let figures = json["figures"].as_array().expect("figures array");
    let find = |name: &str| {
        figures
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("no figure {name:?} in {json}"))
    };

    // (row, its baseline row; None: it is a baseline)
    let mut rows = vec![
        ("qemu-nvme", None),
        ("vfio-user-borrowed-shm", Some("qemu-nvme")),
        ("qemu-nvme-loaded", None),
        ("vfio-user-borrowed-shm-loaded", Some("qemu-nvme-loaded")),
    ];
    if root {
        rows.push(("vfio-user-borrowed-tcp", Some("qemu-nvme")));
        rows.push(("vfio-user-borrowed-tcp-loaded", Some("qemu-nvme-loaded")));
    }
    let mut names = vec![("write-4k-qd1", "MB/s"), ("write-4k-qd1", "IOPS")];
    for load in ["randread-4k-qd1", "randwrite-4k-qd32"] {
        for figure in ["IOPS", "median latency", "p99 latency"] {
            names.push((load, figure));
        }
    }
    for (row, baseline) in &rows {
        for (workload, figure) in &names {
            let f = find(&format!("{workload} {row} {figure}"));
            assert!(f["value"].is_number(), "{f}");
            match baseline {
                None => assert!(f.get("baseline").is_none(), "a baseline row: {f}"),
                Some(b) => {
                    assert_eq!(f["baseline_name"], *b, "{f}");
                    assert!(f["baseline"].is_number(), "{f}");
                }
            }
        }
    }
    // Rows not asked for are not there, nor workloads not chosen.
    for f in figures {
        let name = f["name"].as_str().unwrap_or_default();
        assert!(!name.contains("vfio-user-local"), "{name}");
        assert!(!name.starts_with("read-4k"), "{name}");
        assert!(!name.starts_with("randread-4k-qd32"), "{name}");
    }
    tmp.assert_empty();
}
