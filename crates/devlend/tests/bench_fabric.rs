//! Smoke test of `devlend bench fabric --quick --json`: the JSON follows BENCH.md and every
//! figure carries its same-run baseline. Never checks the numbers.

mod common;

#[test]
fn bench_fabric_quick_json_has_figures_with_baselines() {
    let tmp = common::TempRoot::new("bench-fabric");
    let v = common::bench_json(&tmp, &["bench", "fabric", "--quick", "--json"]);
    let figures = common::figures(&v);
    let names: Vec<&str> = figures.iter().filter_map(|f| f["name"].as_str()).collect();
    for want in [
        "window-write-4k",
        "window-read-64k",
        "window-write-1m",
        "doorbell-rtt-futex",
        "doorbell-rtt-busy-poll",
        "mmio-posted-writes",
        "mmio-read-latency",
    ] {
        assert!(
            names.iter().any(|n| n.starts_with(want)),
            "no {want} in {names:?}"
        );
    }
    for f in figures {
        assert!(f["unit"].is_string() && f["value"].is_number(), "{f}");
        assert!(
            f["baseline_name"].is_string(),
            "figure without a baseline: {f}"
        );
        assert!(f["baseline"].is_number() && f["ratio"].is_number(), "{f}");
        if f.get("target").is_some() {
            assert!(f["target"].is_string() && f["meets"].is_boolean(), "{f}");
        }
    }
    assert!(figures.iter().filter(|f| f.get("target").is_some()).count() >= 8);
    tmp.assert_empty();
}
