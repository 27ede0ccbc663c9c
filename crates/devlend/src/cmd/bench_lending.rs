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
    /// Print JSON (docs/BENCH.md) instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Reap completions by polling instead of waiting for MSI-X interrupts (both sides).
    #[arg(long)]
    polling: bool,
    /// Skip the row of a device borrowed over tcp (it needs root: two network namespaces).
    #[arg(long)]
    no_tcp: bool,
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
    let pair = Pair::start(&a.dir)?;
    pair.lender_add_nvme("bench0", &pair.dir.join("lent.img"), size)?;
    let borrowed: Arc<dyn PciFunction> = pair.borrow("bench0")?;
    let local = host::local_nvme(NvmeOptions {
        image: pair.dir.join("local.img"),
        size: Some(size),
        serial: None,
        model: None,
        queues: None,
        cmb: None,
    })?;
    let mut notes = Vec::new();
    let cfg = devlend_nvme_driver::DriverConfig {
        completion: if a.polling {
            devlend_nvme_driver::CompletionMode::Polling
        } else {
            devlend_nvme_driver::CompletionMode::Interrupt
        },
        ..Default::default()
    };
    // The tcp pair last: it moves this thread into a network namespace.
    let tcp = if a.no_tcp {
        None
    } else {
        match Pair::start_tcp(&a.dir) {
            Ok(p) => {
                p.lender_add_nvme("bench1", &p.dir.join("lent.img"), size)?;
                let f: Arc<dyn PciFunction> = p.borrow("bench1")?;
                Some((p, Controller::with_config(f, cfg.clone())?))
            }
            Err(e) => {
                notes.push(format!("tcp row not measured: {e:#}"));
                None
            }
        }
    };
    let local = Controller::with_config(local, cfg.clone())?;
    let borrowed = Controller::with_config(borrowed, cfg)?;
    let mut report = Report::new("lending");
    for (name, pattern, qd) in [
        ("randread-4k-qd1", Pattern::RandRead, 1),
        ("randwrite-4k-qd1", Pattern::RandWrite, 1),
        ("randread-4k-qd32", Pattern::RandRead, 32),
        ("randwrite-4k-qd32", Pattern::RandWrite, 32),
    ] {
        let w = Workload::new(pattern, qd, Limit::Duration(Duration::from_secs_f64(secs)));
        let (mut l, mut b, mut t) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..reps {
            l.push(sample(&local, &w)?);
            b.push(sample(&borrowed, &w)?);
            if let Some((_, c)) = &tcp {
                t.push(sample(c, &w)?);
            }
            eprint!(".");
        }
        let pick =
            |v: &[Sample], f: fn(&Sample) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
        let (l_iops, l_med, l_p99) = (
            pick(&l, |s| s.iops),
            pick(&l, |s| s.median_us),
            pick(&l, |s| s.p99_us),
        );
        let iops = Figure::new(
            format!("{name} IOPS, borrowed over shm"),
            "IOPS",
            pick(&b, |s| s.iops),
        )
        .against("local", l_iops);
        let lat = Figure::new(
            format!("{name} median latency, borrowed over shm"),
            "us",
            pick(&b, |s| s.median_us),
        )
        .against("local", l_med);
        let p99 = Figure::new(
            format!("{name} p99 latency, borrowed over shm"),
            "us",
            pick(&b, |s| s.p99_us),
        )
        .against("local", l_p99);
        if qd == 1 {
            report.push(lat.target(Target::AtMost(1.25)));
            report.push(iops);
        } else {
            report.push(iops.target(Target::AtLeast(0.9)));
            report.push(lat);
        }
        report.push(p99);
        if !t.is_empty() {
            report.push(
                Figure::new(
                    format!("{name} IOPS, borrowed over tcp"),
                    "IOPS",
                    pick(&t, |s| s.iops),
                )
                .against("local", l_iops),
            );
            report.push(
                Figure::new(
                    format!("{name} median latency, borrowed over tcp"),
                    "us",
                    pick(&t, |s| s.median_us),
                )
                .against("local", l_med),
            );
        }
    }
    eprintln!();
    local.shutdown()?;
    borrowed.shutdown()?;
    pair.borrower.give_back("bench0")?;
    if let Some((p, c)) = tcp {
        c.shutdown()?;
        p.borrower.give_back("bench1")?;
        drop(p);
    }
    report.notes.push(format!(
        "same driver and workload ({} completions); {reps} interleaved sample(s) of {secs} s per side, medians; local = the same NVMe model bound in-process with its own worker thread; tcp = TLS 1.3 over a veth link between two network namespaces",
        if a.polling { "polled" } else { "interrupt-driven" }
    ));
    report.notes.extend(notes);
    report.emit(a.json);
    Ok(())
}
