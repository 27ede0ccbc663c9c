//! Smoke test of `devlend bench cmb` (shm only, no root needed): it runs, both drivers did I/O,
//! and `--json` has the BENCH.md shape. The numbers themselves are never checked.

mod common;

#[test]
fn bench_cmb_quick_json_has_the_bench_md_shape() {
    let tmp = common::TempRoot::new("bench-cmb");
    let json = common::bench_json(
        &tmp,
        &[
            "bench",
            "cmb",
            "--quick",
            "--json",
            "--no-tcp",
            "--seconds",
            "0.05",
        ],
    );
    let figures = common::figures(&json);
    for pattern in ["randread", "randwrite"] {
        for what in ["median latency", "p99 latency", "IOPS"] {
            let name = format!("{pattern}-4k-qd1 {what}, SQ in the CMB, borrowed over shm");
            common::figure(figures, &name);
        }
    }
    for f in figures {
        assert!(f["value"].is_number(), "{f}");
        assert_eq!(f["baseline_name"], "SQ in host memory", "{f}");
        assert!(f["baseline"].is_number(), "{f}");
        if f["unit"] == "IOPS" {
            // Both placements completed commands.
            assert!(f["value"].as_f64().unwrap() > 0.0, "{f}");
            assert!(f["baseline"].as_f64().unwrap() > 0.0, "{f}");
        }
    }
    tmp.assert_empty();
}
