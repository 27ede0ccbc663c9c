//! Smoke test of `devlend bench nvme`: it runs, and `--json` has the BENCH.md shape. The
//! numbers themselves are never checked (shared machines are noisy).

mod common;

#[test]
fn bench_nvme_quick_json_has_the_bench_md_shape() {
    let tmp = common::TempRoot::new("bench-nvme");
    let json = common::bench_json(
        &tmp,
        &["bench", "nvme", "--quick", "--json", "--seconds", "0.05"],
    );
    let figures = common::figures(&json);
    for pattern in ["randread", "randwrite"] {
        for qd in [1, 32] {
            for suffix in ["", "-median", "-p99"] {
                common::figure(figures, &format!("{pattern}-4k-qd{qd}{suffix}"));
            }
        }
    }
    for f in figures {
        assert!(f["value"].is_number(), "{f}");
        assert!(f["unit"].is_string(), "{f}");
        assert!(
            f["baseline"].is_number(),
            "every figure has its same-run baseline: {f}"
        );
        assert!(f["baseline_name"].is_string(), "{f}");
        assert!(f["ratio"].is_number() || f["baseline"] == 0.0, "{f}");
    }
    tmp.assert_empty();
}
