//! Smoke test of `devlend bench sharing`: it runs, `--json` has the BENCH.md shape with a
//! figure per borrower at every borrower count, and every borrower did I/O. The numbers
//! themselves and whether the targets are met are never checked (shared machines are noisy).

mod common;

#[test]
fn bench_sharing_quick_json_has_every_borrower_doing_io() {
    let tmp = common::TempRoot::new("bench-sharing");
    let json = common::bench_json(&tmp, &["bench", "sharing", "--quick", "--json"]);
    let figures = common::figures(&json);
    let find = |name: &str| common::figure(figures, name);
    for n in [1, 2, 4, 8] {
        for i in 1..=n {
            let f = find(&format!(
                "randread-4k-qd32 IOPS, borrower {i} of {n} (VF {i})"
            ));
            assert_eq!(f["unit"], "IOPS", "{f}");
            let v = f["value"].as_f64().expect("a number");
            assert!(v > 0.0, "borrower {i} of {n} did no I/O: {f}");
        }
        let agg = find(&format!(
            "randread-4k-qd32 IOPS, aggregate of {n} borrower(s)"
        ));
        assert_eq!(agg["baseline_name"], "local single function", "{agg}");
        assert!(agg["baseline"].as_f64().is_some_and(|b| b > 0.0), "{agg}");
        assert!(agg["ratio"].is_number(), "{agg}");
        assert_eq!(agg["target"], ">= 0.9", "{agg}");
        assert!(agg["meets"].is_boolean(), "{agg}");
        let fairness = figures
            .iter()
            .find(|f| f["name"] == format!("randread-4k-qd32 IOPS, slowest of {n} borrowers"));
        if n == 1 {
            assert!(fairness.is_none(), "no fairness figure for one borrower");
        } else {
            let f = fairness.expect("a fairness figure");
            assert_eq!(f["baseline_name"], format!("mean of {n}"), "{f}");
            assert_eq!(f["target"], ">= 0.8", "{f}");
            assert!(f["meets"].is_boolean(), "{f}");
        }
    }
    assert_eq!(figures.len(), 15 + 4 + 3, "{figures:?}");
    tmp.assert_empty();
}
