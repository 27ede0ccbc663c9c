//! `devlend bench nvme`: the NVMe model, bound in-process and driven by the user-space driver,
//! against the backing file's own `pread`/`pwrite` rate at the same block size, access pattern
//! and queue depth, measured in the same run (interleaved, medians of repetitions).

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use devlend_bench::{Figure, Report};
use devlend_nvme::{NvmeConfig, NvmeDevice};
use devlend_nvme_driver::workload::{self, Limit, Pattern, Summary, Workload};
use devlend_nvme_driver::{CompletionMode, Controller, DriverConfig};
use devlend_pci::{LocalFunction, PciDevice, PciFunction};

/// Arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Image file backing the namespace (created when missing; its contents are overwritten
    /// by the write tests). Default: a temporary file, removed afterwards.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Size of a created image, in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Seconds per measurement (each figure is the median of --reps of them).
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Repetitions per figure (device and file alternate: A B A B ...).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Poll completion queues instead of sleeping on MSI-X interrupts.
    #[arg(long)]
    polling: bool,
    /// A short run (64 MiB image, 0.2 s, one repetition) to check that everything works.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object (docs/BENCH.md) instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
}

const BLOCK_BYTES: usize = 4096;
/// DMA memory of the local binding: queues and QD32 buffers of 4 KiB.
const DMA_BYTES: usize = 8 << 20;
const QUEUE_DEPTHS: [usize; 2] = [1, 32];
const PATTERNS: [Pattern; 2] = [Pattern::RandRead, Pattern::RandWrite];

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    let (size_mib, seconds, reps) = if args.quick {
        (args.size_mib.min(64), args.seconds.min(0.2), 1)
    } else {
        (args.size_mib, args.seconds, args.reps.max(1))
    };
    let duration = Duration::from_secs_f64(seconds.max(0.01));
    let (image, temporary) = match &args.image {
        Some(p) => (p.clone(), false),
        None => (
            std::env::temp_dir().join(format!("devlend-bench-nvme-{}.img", std::process::id())),
            true,
        ),
    };
    let result = bench(&image, size_mib << 20, duration, reps, args.polling);
    if temporary {
        let _ = std::fs::remove_file(&image);
    }
    let report = result?;
    report.emit(args.json);
    Ok(())
}

fn bench(
    image: &Path,
    size: u64,
    duration: Duration,
    reps: usize,
    polling: bool,
) -> anyhow::Result<Report> {
    let len = prepare_image(image, size)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .with_context(|| format!("opening {}", image.display()))?;
    let fun = local_nvme(image)?;
    let config = DriverConfig {
        io_queues: 1,
        queue_entries: 64,
        completion: if polling {
            CompletionMode::Polling
        } else {
            CompletionMode::Interrupt
        },
        ..DriverConfig::default()
    };
    let ctrl = Controller::with_config(fun, config).context("bringing up the NVMe controller")?;
    // The same region for both: the image, whole blocks.
    let region = (0, len.min(ctrl.capacity_bytes()));
    let mut report = Report::new("nvme");
    for pattern in PATTERNS {
        for qd in QUEUE_DEPTHS {
            let name = format!("{}-4k-qd{qd}", pattern.name());
            let mut device = Vec::new();
            let mut baseline = Vec::new();
            for rep in 0..reps {
                eprintln!("bench nvme: {name} repetition {}/{reps}", rep + 1);
                let w = Workload {
                    pattern,
                    block_bytes: BLOCK_BYTES,
                    queue_depth: qd,
                    limit: Limit::Duration(duration),
                    region: Some(region),
                    queue: 0,
                    seed: 0x1234 + rep as u64,
                    sequential: false,
                };
                device.push(
                    workload::run(&ctrl, &w).with_context(|| format!("{name} on the device"))?,
                );
                baseline.push(
                    super::io_load::run(&file, &w)
                        .with_context(|| format!("{name} on the file"))?,
                );
            }
            let base_name = match pattern {
                Pattern::RandRead => "file pread",
                Pattern::RandWrite => "file pwrite",
            };
            let med = |v: &[Summary], f: fn(&Summary) -> f64| {
                let mut x: Vec<f64> = v.iter().map(f).collect();
                devlend_bench::median(&mut x)
            };
            report.push(
                Figure::new(name.clone(), "IOPS", med(&device, |s| s.iops))
                    .against(base_name, med(&baseline, |s| s.iops)),
            );
            report.push(
                Figure::new(
                    format!("{name}-median"),
                    "us",
                    med(&device, |s| s.median_us),
                )
                .against(base_name, med(&baseline, |s| s.median_us)),
            );
            report.push(
                Figure::new(format!("{name}-p99"), "us", med(&device, |s| s.p99_us))
                    .against(base_name, med(&baseline, |s| s.p99_us)),
            );
        }
    }
    ctrl.shutdown().context("shutting the controller down")?;
    report.notes.push(format!(
        "device: NVMe model on a {} MiB image, bound in-process (LocalFunction), driven by the \
         user-space driver on one I/O queue ({} completions); baseline: pread/pwrite on the same \
         file with the same offsets, QD n = n threads of synchronous calls",
        len >> 20,
        if polling {
            "polled"
        } else {
            "interrupt-driven"
        }
    ));
    report.notes.push(format!(
        "each figure is the median of {reps} runs of {:.1} s, device and file alternating",
        duration.as_secs_f64()
    ));
    Ok(report)
}

/// Creates the image when missing (filled, so that neither side reads holes) and returns its
/// length.
fn prepare_image(image: &Path, size: u64) -> anyhow::Result<u64> {
    if let Ok(meta) = std::fs::metadata(image) {
        anyhow::ensure!(
            meta.len() >= BLOCK_BYTES as u64,
            "{} is smaller than one block",
            image.display()
        );
        return Ok(meta.len());
    }
    eprintln!(
        "bench nvme: creating a {} MiB image at {}",
        size >> 20,
        image.display()
    );
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(image)
        .with_context(|| format!("creating {}", image.display()))?;
    let chunk: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let mut at = 0u64;
    while at < size {
        let n = (size - at).min(chunk.len() as u64) as usize;
        f.write_all_at(chunk.get(..n).unwrap_or(&chunk), at)?;
        at += n as u64;
    }
    f.sync_all()?;
    Ok(size)
}

/// The NVMe model on `image`, bound in-process.
fn local_nvme(image: &Path) -> anyhow::Result<Arc<dyn PciFunction>> {
    let config = NvmeConfig::new(image);
    let f = LocalFunction::new(DMA_BYTES, move |dma, irq| {
        NvmeDevice::new(config, dma, irq).map(|d| d as Arc<dyn PciDevice>)
    })
    .context("binding the NVMe model in-process")?;
    Ok(Arc::new(f))
}
