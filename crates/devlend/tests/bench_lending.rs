//! Smoke test of `devlend bench lending`: it runs, `--json` has the BENCH.md shape, every
//! figure has its same-run baseline, and (where network namespaces can be made: root) the tcp
//! rows stand beside their raw TLS baselines. The numbers themselves are never checked
//! (shared machines are noisy).

mod common;

use devlend_testkit::netns::NetnsPair;

#[test]
fn bench_lending_quick_json_has_every_row_beside_its_baseline() {
    let tcp = NetnsPair::create_or_skip("the tcp rows").is_some();
    let tmp = common::TempRoot::new("bench-lending");
    let mut args = vec!["bench", "lending", "--quick", "--json"];
    if !tcp {
        args.push("--no-tcp");
    }
    let json = common::bench_json(&tmp, &args);
    let figures = common::figures(&json);
    let find = |name: &str| common::figure(figures, name);
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
