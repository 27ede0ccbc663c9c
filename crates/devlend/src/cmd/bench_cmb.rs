//! `devlend bench cmb`: what placing the driver's submission queues in the device's Controller
//! Memory Buffer changes for a borrowed device, against the same device type with its queues
//! in host memory, interleaved in one run on one link.
//!
//! Two identical devices (each with a CMB) are lent over one link and borrowed by this
//! process: one driver keeps its submission queue and data in borrower memory (the device
//! fetches each command, and a write's data, across the link: non-posted reads), the other
//! puts the queue and small writes' data in the CMB (they cross as posted writes through the
//! BAR window). Samples alternate between the two.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use devlend_bench::{median, Figure, Report};
use devlend_nvme_driver::workload::{self, Limit, Pattern, Workload};
use devlend_nvme_driver::{Controller, DriverConfig};
use devlend_pci::PciFunction;

use crate::cmd::bench_args::SampleArgs;
use crate::cmd::ctl;
use crate::pair::Pair;
use crate::proto;

/// Options.
#[derive(clap::Args)]
#[command(mut_arg("reps", |a| a.help(
    "Samples per placement (interleaved host, CMB, host, ...); medians are reported"
)))]
pub struct Args {
    #[command(flatten)]
    pub(crate) run: SampleArgs,
    /// Reap completions by polling instead of waiting for MSI-X interrupts.
    #[arg(long)]
    polling: bool,
    /// Skip the tcp rows (they need root: two network namespaces).
    #[arg(long)]
    no_tcp: bool,
    /// Skip the shm rows.
    #[arg(long)]
    no_shm: bool,
    /// Scratch directory.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
}

/// Size of each device's CMB.
const CMB_BYTES: u64 = 1 << 20;
/// Size of each device's image.
const IMAGE_BYTES: u64 = 256 << 20;

struct Sample {
    iops: f64,
    median_us: f64,
    p99_us: f64,
}

/// The two drivers of one fabric: queues in host memory, queues in the CMB.
struct Side {
    fabric: &'static str,
    pair: Pair,
    host: Controller,
    cmb: Controller,
}

fn add(pair: &Pair, name: &str) -> anyhow::Result<()> {
    let image = pair.dir.join(format!("{name}.img"));
    let req = proto::AddRequest {
        cmb: Some(CMB_BYTES),
        ..crate::pair::nvme_request(name, &image, IMAGE_BYTES)
    };
    ctl::call(&pair.lender_state, req, Duration::from_secs(30))?;
    Ok(())
}

fn side(fabric: &'static str, pair: Pair, base: &DriverConfig) -> anyhow::Result<Side> {
    add(&pair, "hostq")?;
    add(&pair, "cmbq")?;
    let f: Arc<dyn PciFunction> = pair.borrower.borrow("hostq")?;
    let host = Controller::with_config(f, base.clone())?;
    let f: Arc<dyn PciFunction> = pair.borrower.borrow("cmbq")?;
    let cmb = Controller::with_config(
        f,
        DriverConfig {
            cmb_submission_queues: true,
            ..base.clone()
        },
    )?;
    anyhow::ensure!(
        cmb.cmb_queue_count() == cmb.io_queue_count(),
        "the driver placed {} of {} submission queues in the CMB",
        cmb.cmb_queue_count(),
        cmb.io_queue_count()
    );
    Ok(Side {
        fabric,
        pair,
        host,
        cmb,
    })
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
    let (secs, reps) = a.run.plan();
    let base = DriverConfig {
        io_queues: 1,
        completion: if a.polling {
            devlend_nvme_driver::CompletionMode::Polling
        } else {
            devlend_nvme_driver::CompletionMode::Interrupt
        },
        ..Default::default()
    };
    let mut sides = Vec::new();
    let mut notes = Vec::new();
    if !a.no_shm {
        sides.push(side("shm", Pair::start(&a.dir)?, &base)?);
    }
    // The tcp pair last: it moves this thread into a network namespace.
    if !a.no_tcp {
        match Pair::start_tcp(&a.dir) {
            Ok(p) => sides.push(side("tcp", p, &base)?),
            Err(e) => notes.push(format!("tcp rows not measured: {e:#}")),
        }
    }
    let mut report = Report::new("cmb");
    for (name, pattern) in [
        ("randread-4k-qd1", Pattern::RandRead),
        ("randwrite-4k-qd1", Pattern::RandWrite),
    ] {
        let mut w = Workload::new(pattern, 1, Limit::Duration(Duration::from_secs_f64(secs)));
        // The first 64 MiB: the same offsets on both devices.
        w.region = Some((0, 64 << 20));
        for s in &sides {
            let (mut h, mut c) = (Vec::new(), Vec::new());
            for _ in 0..reps {
                h.push(sample(&s.host, &w)?);
                c.push(sample(&s.cmb, &w)?);
                eprint!(".");
            }
            let pick = |v: &[Sample], f: fn(&Sample) -> f64| {
                median(&mut v.iter().map(f).collect::<Vec<_>>())
            };
            let baseline = "SQ in host memory";
            for (what, unit, f) in [
                (
                    "median latency",
                    "us",
                    (|s: &Sample| s.median_us) as fn(&Sample) -> f64,
                ),
                ("p99 latency", "us", |s: &Sample| s.p99_us),
                ("IOPS", "IOPS", |s: &Sample| s.iops),
            ] {
                report.push(
                    Figure::new(
                        format!("{name} {what}, SQ in the CMB, borrowed over {}", s.fabric),
                        unit,
                        pick(&c, f),
                    )
                    .against(baseline, pick(&h, f)),
                );
            }
        }
    }
    eprintln!();
    for s in sides {
        s.host.shutdown()?;
        s.cmb.shutdown()?;
        s.pair.borrower.give_back("hostq")?;
        s.pair.borrower.give_back("cmbq")?;
        drop(s.pair);
    }
    report.notes.push(format!(
        "two identical devices (NVMe model, {} KiB CMB each) on one link, one I/O queue each, {} completions; {reps} interleaved sample(s) of {secs} s per placement, medians; tcp = TLS 1.3 over a veth link between two network namespaces",
        CMB_BYTES >> 10,
        if a.polling { "polled" } else { "interrupt-driven" }
    ));
    report.notes.push(
        "SQ in host memory: the device fetches each 64-byte command, and a write's data, from borrower memory (non-posted reads across the link). SQ in the CMB: the driver writes the command, and a write's data of up to 4 KiB, into the device's BAR (posted writes); on shm the driver reads the entry back before its doorbell, a direct store, so the doorbell cannot overtake it".into(),
    );
    report.notes.extend(notes);
    report.emit(a.run.json);
    Ok(())
}
