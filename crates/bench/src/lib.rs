//! Benchmark figures and reports (see `docs/BENCH.md`): every figure carries the
//! baseline measured in the same run, the ratio, the target and whether it is met.
#![warn(missing_docs)]

use std::time::Duration;

/// A goal for `value / baseline`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// The ratio must be at least this (throughput: higher is better).
    AtLeast(f64),
    /// The ratio must be at most this (latency, cost: lower is better).
    AtMost(f64),
}

impl Target {
    fn text(&self) -> String {
        match self {
            Target::AtLeast(r) => format!(">= {r}"),
            Target::AtMost(r) => format!("<= {r}"),
        }
    }

    fn met_by(&self, ratio: f64) -> bool {
        match self {
            Target::AtLeast(r) => ratio >= *r,
            Target::AtMost(r) => ratio <= *r,
        }
    }
}

/// One measured figure, optionally beside its baseline.
#[derive(Clone, Debug)]
pub struct Figure {
    /// What was measured ("randread-4k-qd32").
    pub name: String,
    /// Unit ("IOPS", "GB/s", "us").
    pub unit: String,
    /// The measurement.
    pub value: f64,
    /// Baseline name and value, measured in the same run.
    pub baseline: Option<(String, f64)>,
    /// Goal for the ratio, when the issue sets one.
    pub target: Option<Target>,
}

impl Figure {
    /// A figure with no baseline.
    pub fn new(name: impl Into<String>, unit: impl Into<String>, value: f64) -> Self {
        Self {
            name: name.into(),
            unit: unit.into(),
            value,
            baseline: None,
            target: None,
        }
    }

    /// Adds the same-run baseline.
    pub fn against(mut self, baseline_name: impl Into<String>, baseline: f64) -> Self {
        self.baseline = Some((baseline_name.into(), baseline));
        self
    }

    /// Adds the target for the ratio.
    pub fn target(mut self, target: Target) -> Self {
        self.target = Some(target);
        self
    }

    /// `value / baseline`, when there is a non-zero baseline.
    pub fn ratio(&self) -> Option<f64> {
        self.baseline
            .as_ref()
            .filter(|(_, b)| *b != 0.0)
            .map(|(_, b)| self.value / b)
    }

    /// Whether the ratio meets the target (`None` without a target or ratio).
    pub fn meets(&self) -> Option<bool> {
        Some(self.target?.met_by(self.ratio()?))
    }

    fn to_json(&self) -> serde_json::Value {
        let mut o = serde_json::json!({"name": self.name, "unit": self.unit, "value": self.value});
        if let Some((bn, b)) = &self.baseline {
            o["baseline_name"] = bn.clone().into();
            o["baseline"] = (*b).into();
            if let Some(r) = self.ratio() {
                o["ratio"] = r.into();
            }
        }
        if let Some(t) = &self.target {
            o["target"] = t.text().into();
            if let Some(m) = self.meets() {
                o["meets"] = m.into();
            }
        }
        o
    }
}

/// A benchmark's result: a named list of figures.
#[derive(Clone, Debug)]
pub struct Report {
    /// Benchmark name ("fabric", "nvme", "lending", "vm").
    pub bench: String,
    /// The figures, in display order.
    pub figures: Vec<Figure>,
    /// Free-text notes printed under the table (where the time goes, caveats).
    pub notes: Vec<String>,
}

impl Report {
    /// An empty report.
    pub fn new(bench: impl Into<String>) -> Self {
        Self {
            bench: bench.into(),
            figures: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Adds a figure.
    pub fn push(&mut self, figure: Figure) {
        self.figures.push(figure);
    }

    /// The JSON object of `docs/BENCH.md`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut o = serde_json::json!({
            "bench": self.bench,
            "figures": self.figures.iter().map(Figure::to_json).collect::<Vec<_>>(),
        });
        if !self.notes.is_empty() {
            o["notes"] = self.notes.clone().into();
        }
        o
    }

    /// The human table.
    pub fn table(&self) -> String {
        let mut rows = vec![[
            "figure".to_string(),
            "value".into(),
            "baseline".into(),
            "ratio".into(),
            "target".into(),
        ]];
        for f in &self.figures {
            let baseline = match &f.baseline {
                Some((n, b)) => format!("{} {} ({n})", fmt_num(*b), f.unit),
                None => "-".into(),
            };
            let ratio = f
                .ratio()
                .map(|r| format!("{r:.3}"))
                .unwrap_or_else(|| "-".into());
            let target = match (f.target, f.meets()) {
                (Some(t), Some(true)) => format!("{} met", t.text()),
                (Some(t), Some(false)) => format!("{} MISSED", t.text()),
                (Some(t), None) => t.text(),
                (None, _) => "-".into(),
            };
            rows.push([
                f.name.clone(),
                format!("{} {}", fmt_num(f.value), f.unit),
                baseline,
                ratio,
                target,
            ]);
        }
        let mut widths = [0usize; 5];
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r.iter()) {
                *w = (*w).max(c.len());
            }
        }
        let mut out = format!("bench {}\n", self.bench);
        for (i, r) in rows.iter().enumerate() {
            let line: Vec<String> = r
                .iter()
                .zip(widths.iter())
                .map(|(c, w)| format!("{c:<w$}"))
                .collect();
            out.push_str(line.join("  ").trim_end());
            out.push('\n');
            if i == 0 {
                out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 8));
                out.push('\n');
            }
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        out
    }

    /// Prints the table, or the JSON object when `json` is set.
    pub fn emit(&self, json: bool) {
        if json {
            println!("{}", self.to_json());
        } else {
            print!("{}", self.table());
        }
    }
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100_000.0 {
        format!("{v:.0}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// Median of `samples` (sorted in place); 0 for none.
pub fn median(samples: &mut [f64]) -> f64 {
    percentile(samples, 50.0)
}

/// The `p`-th percentile (nearest rank) of `samples` (sorted in place); 0 for none.
pub fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// Microseconds in a duration, as f64.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratio_target_and_json() {
        let f = Figure::new("x", "IOPS", 90.0)
            .against("local", 100.0)
            .target(Target::AtLeast(0.9));
        assert_eq!(f.ratio(), Some(0.9));
        assert_eq!(f.meets(), Some(true));
        let j = f.to_json();
        assert_eq!(j["target"], ">= 0.9");
        assert_eq!(j["meets"], true);
        let g = Figure::new("lat", "us", 2.0)
            .against("raw", 1.0)
            .target(Target::AtMost(1.5));
        assert_eq!(g.meets(), Some(false));
        let plain = Figure::new("p", "us", 1.0).to_json();
        assert!(plain.get("baseline").is_none());
        let mut r = Report::new("t");
        r.push(f);
        r.push(g);
        assert!(r.table().contains("MISSED"));
        assert_eq!(r.to_json()["figures"].as_array().map(|a| a.len()), Some(2));
    }

    #[test]
    fn percentiles() {
        let mut v = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(median(&mut v), 3.0);
        assert_eq!(percentile(&mut v, 99.0), 5.0);
        assert_eq!(percentile(&mut [], 50.0), 0.0);
    }
}
