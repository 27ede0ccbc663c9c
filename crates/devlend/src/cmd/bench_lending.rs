//! `devlend bench lending`: the same driver and workload on a local function and on a function
//! borrowed over the fabric, interleaved in one run.
//!
//! The local baseline is the same NVMe model bound in-process; it runs in its own worker
//! thread exactly as it does when lent, so the ratio isolates the cost of lending: MMIO through
//! the window, DMA through the IOMMU into borrower memory, interrupts as doorbells.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use devlend_bench::{median, Figure, Report, Target};
use devlend_nvme_driver::workload::{self, Limit, Pattern, Workload};
use devlend_nvme_driver::Controller;
use devlend_pci::PciFunction;

use crate::host::{self, NvmeOptions};
use crate::pair::Pair;

/// Options.
#[derive(clap::Args)]
pub struct Args {
    /// Seconds per sample.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Samples per side (interleaved local, borrowed, local, ...); medians are reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// A short run (for smoke tests).
    #[arg(long)]
    quick: bool,
    /// Print JSON (BENCH.md) instead of a table.
    #[arg(long)]
    json: bool,
    /// Scratch directory.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
}

struct Sample {
    iops: f64,
    median_us: f64,
    p99_us: f64,
}

fn sample(c: &Controller, w: &Workload) -> anyhow::Result<Sample> {
    let s = workload::run(c, w)?;
    Ok(Sample {
        iops: s.iops,
        median_us: s.median_us,
        p99_us: s.p99_us,
    })
}

/// Runs the benchmark.
pub fn run(a: Args) -> anyhow::Result<()> {
    let (secs, reps) = if a.quick {
        (0.2, 1)
    } else {
        (a.seconds.max(0.1), a.reps.max(1))
    };
    let size = 256u64 << 20;
    let pair = Pair::start(&a.dir, None)?;
    pair.lender_add_nvme("bench0", &pair.dir.join("lent.img"), size)?;
    let borrowed: Arc<dyn PciFunction> = pair.borrow("bench0")?;
    let local = host::local_nvme(NvmeOptions {
        image: pair.dir.join("local.img"),
        size: Some(size),
        serial: None,
        model: None,
    })?;
    let local = Controller::new(local)?;
    let borrowed = Controller::new(borrowed)?;
    let mut report = Report::new("lending");
    for (name, pattern, qd) in [
        ("randread-4k-qd1", Pattern::RandRead, 1),
        ("randwrite-4k-qd1", Pattern::RandWrite, 1),
        ("randread-4k-qd32", Pattern::RandRead, 32),
        ("randwrite-4k-qd32", Pattern::RandWrite, 32),
    ] {
        let w = Workload::new(pattern, qd, Limit::Duration(Duration::from_secs_f64(secs)));
        let (mut l, mut b) = (Vec::new(), Vec::new());
        for _ in 0..reps {
            l.push(sample(&local, &w)?);
            b.push(sample(&borrowed, &w)?);
            eprint!(".");
        }
        let pick =
            |v: &[Sample], f: fn(&Sample) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
        let iops = Figure::new(
            format!("{name} IOPS, borrowed over shm"),
            "IOPS",
            pick(&b, |s| s.iops),
        )
        .against("local", pick(&l, |s| s.iops));
        let lat = Figure::new(
            format!("{name} median latency, borrowed over shm"),
            "us",
            pick(&b, |s| s.median_us),
        )
        .against("local", pick(&l, |s| s.median_us));
        let p99 = Figure::new(
            format!("{name} p99 latency, borrowed over shm"),
            "us",
            pick(&b, |s| s.p99_us),
        )
        .against("local", pick(&l, |s| s.p99_us));
        if qd == 1 {
            report.push(lat.target(Target::AtMost(1.25)));
            report.push(iops);
        } else {
            report.push(iops.target(Target::AtLeast(0.9)));
            report.push(lat);
        }
        report.push(p99);
    }
    eprintln!();
    local.shutdown()?;
    borrowed.shutdown()?;
    report.notes.push(format!(
        "same driver and workload; {reps} interleaved sample(s) of {secs} s per side, medians; local = the same NVMe model bound in-process with its own worker thread"
    ));
    report.emit(a.json);
    Ok(())
}
