//! Smoke test of `devlend bench lending`: it runs, `--json` has the BENCH.md shape, every
//! figure has its same-run baseline, and (where network namespaces can be made: root) the tcp
//! rows stand beside their raw TLS baselines. The numbers themselves are never checked
//! (shared machines are noisy).

mod common;

use devlend_testkit::netns::NetnsPair;

/// Whether this test may make network namespaces (CI must: it fails there otherwise).
fn can_use_namespaces() -> bool {
    match NetnsPair::create() {
        Ok(_) => true,
        Err(e) if std::env::var_os("CI").is_some() => {
            panic!("CI needs network namespaces (run as root): {e}")
        }
        Err(e) => {
            eprintln!("not checking the tcp rows: {e}");
            false
        }
    }
}

#[test]
fn bench_lending_quick_json_has_every_row_beside_its_baseline() {
    let tcp = can_use_namespaces();
    let tmp = common::TempRoot::new("bench-lending");
    let mut cmd = tmp.command(env!("CARGO_BIN_EXE_devlend"));
    cmd.args(["bench", "lending", "--quick", "--json"]);
    if !tcp {
        cmd.arg("--no-tcp");
    }
    let out = cmd.output().expect("running devlend");
    assert!(
        out.status.success(),
        "devlend bench lending failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(json["bench"], "lending");
    let figures = json["figures"].as_array().expect("figures array");
    let find = |name: &str| {
        figures
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("missing figure {name} in {json}"))
    };
    for row in ["randread-4k-qd1", "randwrite-4k-qd1"] {
        for what in ["median latency", "IOPS", "p99 latency"] {
            let f = find(&format!("{row} {what}, borrowed over shm"));
            assert_eq!(f["baseline_name"], "local", "{f}");
            assert!(f["target"].is_string(), "{f}");
        }
    }
    for row in ["randread-4k-qd32", "randwrite-4k-qd32"] {
        for what in ["IOPS", "median latency", "p99 latency"] {
            find(&format!("{row} {what}, borrowed over shm"));
        }
    }
    for row in ["seqread-128k-qd8", "seqwrite-128k-qd8"] {
        find(&format!("{row} bandwidth, borrowed over shm"));
    }
    if tcp {
        let raw = |f: &serde_json::Value, what: &str| {
            let b = f["baseline_name"].as_str().unwrap_or_default();
            assert!(b.starts_with("raw TLS") && b.contains(what), "{f}");
        };
        for (row, what) in [
            (
                "randread-4k-qd1",
                "64 B request, 4096 B answer, 1 outstanding",
            ),
            (
                "randwrite-4k-qd1",
                "4096 B request, 16 B answer, 1 outstanding",
            ),
        ] {
            for m in ["median latency", "p99 latency", "IOPS"] {
                for side in ["tcp", "tcp, SQ in CMB"] {
                    raw(find(&format!("{row} {m}, borrowed over {side}")), what);
                }
            }
        }
        for (row, what) in [
            (
                "randread-4k-qd32",
                "64 B request, 4096 B answer, 32 outstanding",
            ),
            (
                "randwrite-4k-qd32",
                "4096 B request, 16 B answer, 32 outstanding",
            ),
        ] {
            for side in ["tcp", "tcp, SQ in CMB"] {
                raw(find(&format!("{row} IOPS, borrowed over {side}")), what);
            }
        }
        for side in ["tcp", "tcp, SQ in CMB"] {
            raw(
                find(&format!("seqread-128k-qd8 bandwidth, borrowed over {side}")),
                "stream, server to client",
            );
            raw(
                find(&format!(
                    "seqwrite-128k-qd8 bandwidth, borrowed over {side}"
                )),
                "stream, client to server",
            );
        }
    }
    for f in figures {
        assert!(f["value"].is_number(), "{f}");
        assert!(
            f["baseline"].is_number(),
            "every figure has its same-run baseline: {f}"
        );
    }
    tmp.assert_empty();
}
