//! `devlend bench sharing`: one NVMe device shared by 1, 2, 4 and 8 borrower hosts at once,
//! each on its own SR-IOV virtual function, against the same device model used locally by one
//! driver in the same run.
//!
//! The lender is a `devlend node` process with eight shm links; it adds one device with eight
//! VFs on a shared namespace (every VF sees the whole image, as the local baseline does).
//! Each borrower is a process of its own (`devlend __sharing-bench-borrower`) on its own link:
//! it borrows its VF, starts the unmodified user-space driver on it and then runs 4 KiB random
//! reads at QD32 whenever this process asks, printing what it measured. For each N, the N
//! borrowers are asked to start at the same instant; a local sample (the model bound in this
//! process, one driver) is taken just before, so that drift hits both. Every VF controller has
//! its own worker thread in the lender, as the local function has in this process.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use devlend_bench::{median, Figure, Report, Target};
use devlend_lending::{Node, NodeConfig};
use devlend_nvme_driver::workload::{self, Limit, Pattern, Workload};
use devlend_nvme_driver::Controller;
use devlend_pci::PciFunction;

use super::bench_args::SampleArgs;
use super::ctl::call;
use crate::host::{self, FabricSpec, NvmeOptions};
use crate::proto::{AddRequest, StatusRequest};

/// Borrower counts measured, in order.
const SIZES: [usize; 4] = [1, 2, 4, 8];
/// Queue depth of every sampler.
const QD: usize = 32;
/// Image size of the lent device and of the local baseline.
const IMAGE_BYTES: u64 = 256 << 20;
/// How long before the shared start instant the borrowers are told it.
const START_LEAD: Duration = Duration::from_millis(100);
const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// Options.
#[derive(clap::Args)]
#[command(mut_arg("reps", |a| a.help(
    "Samples per borrower count (interleaved with the local ones); medians are reported"
)))]
#[command(mut_arg("quick", |a| a.help("A short run (for smoke tests): one sample of 0.2 s per side")))]
pub struct Args {
    #[command(flatten)]
    pub(crate) run: SampleArgs,
    /// Scratch directory.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
}

/// Arguments of the hidden borrower process.
#[derive(clap::Args)]
pub struct BorrowerArgs {
    /// This host's name.
    #[arg(long)]
    name: String,
    /// Its one link to the lender.
    #[arg(long)]
    fabric: String,
    /// The VF to borrow.
    #[arg(long)]
    device: String,
}

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One borrower process and the pipes it is driven through.
struct Borrower {
    name: String,
    to: ChildStdin,
    from: BufReader<ChildStdout>,
    proc: Proc,
}

impl Borrower {
    fn line(&mut self) -> anyhow::Result<String> {
        let mut l = String::new();
        let n = self.from.read_line(&mut l)?;
        anyhow::ensure!(n > 0, "borrower {} exited", self.name);
        Ok(l.trim_end().to_string())
    }
}

/// Everything the run started; stopped and removed on drop (borrowers before the lender).
struct Rig {
    dir: PathBuf,
    borrowers: Vec<Borrower>,
    lender: Option<Proc>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Closing a borrower's stdin makes it return its VF and exit.
        for b in self.borrowers.drain(..) {
            let Borrower { to, mut proc, .. } = b;
            drop(to);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = proc.0.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.lender = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn log_tail(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

impl Rig {
    fn start(parent: &Path, borrowers: usize) -> anyhow::Result<Rig> {
        let dir = parent.join(format!("devlend-bench-sharing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut rig = Rig {
            dir,
            borrowers: Vec::new(),
            lender: None,
        };
        let exe = std::env::current_exe()?;
        let scratch = rig.dir.clone();
        let fabric = |i: usize| FabricSpec::Shm(scratch.join(format!("fabric-{i}")));
        let state = rig.dir.join("lender");
        let mut cmd = Command::new(&exe);
        cmd.args(["node", "--name", "lender", "--lease-ms", "5000", "--state"])
            .arg(&state);
        for i in 1..=borrowers {
            cmd.arg("--fabric").arg(fabric(i).to_string());
        }
        let log = rig.dir.join("lender.log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .context("starting the lender node")?;
        rig.lender = Some(Proc(child));
        let deadline = Instant::now() + Duration::from_secs(30);
        while call(&state, StatusRequest, CTL_TIMEOUT).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the lender did not start in 30 s: {}",
                log_tail(&log)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        call(
            &state,
            AddRequest {
                kind: "nvme".into(),
                name: "nvme0".into(),
                image: rig.dir.join("lent.img"),
                size: Some(IMAGE_BYTES),
                serial: None,
                model: None,
                queues: None,
                vfs: Some(u16::try_from(borrowers)?),
                vf_namespaces: Some("shared".into()),
                cmb: None,
            },
            CTL_TIMEOUT,
        )
        .context("adding the device with its VFs")?;
        for i in 1..=borrowers {
            let name = format!("borrower{i}");
            let log = rig.dir.join(format!("{name}.log"));
            let mut child = Command::new(&exe)
                .args(["__sharing-bench-borrower", "--name", &name, "--fabric"])
                .arg(fabric(i).to_string())
                .args(["--device", &format!("nvme0-vf{i}")])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(std::fs::File::create(&log)?)
                .spawn()
                .with_context(|| format!("starting {name}"))?;
            let (Some(to), Some(from)) = (child.stdin.take(), child.stdout.take()) else {
                anyhow::bail!("{name} has no pipes");
            };
            rig.borrowers.push(Borrower {
                name,
                to,
                from: BufReader::new(from),
                proc: Proc(child),
            });
        }
        // Started all at once; now each says it holds its VF with a driver on it.
        for b in &mut rig.borrowers {
            let l = b
                .line()
                .with_context(|| log_tail(&scratch.join(format!("{}.log", b.name))))?;
            anyhow::ensure!(l == "ready", "{} said {l:?}", b.name);
        }
        Ok(rig)
    }

    /// The first `n` borrowers each run one sample of `secs`, all starting at one instant.
    fn sample(&mut self, n: usize, secs: f64) -> anyhow::Result<Vec<f64>> {
        let start = SystemTime::now() + START_LEAD;
        let at = start.duration_since(UNIX_EPOCH)?.as_nanos();
        let group = self
            .borrowers
            .get_mut(..n)
            .context("fewer borrowers than asked for")?;
        for (i, b) in group.iter_mut().enumerate() {
            writeln!(b.to, "run {at} {secs} {}", 0x5eed + i as u64)?;
            b.to.flush()?;
        }
        let mut iops = Vec::with_capacity(n);
        for b in group.iter_mut() {
            let l = b.line()?;
            let v: f64 = l
                .strip_prefix("iops ")
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{} said {l:?}", b.name))?;
            iops.push(v);
        }
        Ok(iops)
    }
}

/// Runs the benchmark.
pub fn run(a: Args) -> anyhow::Result<()> {
    let (secs, reps) = a.run.plan();
    let most = SIZES.iter().copied().max().unwrap_or(1);
    let mut rig = Rig::start(&a.dir, most)?;
    let local = host::local_nvme(NvmeOptions {
        image: rig.dir.join("local.img"),
        size: Some(IMAGE_BYTES),
        serial: None,
        model: None,
        queues: None,
        cmb: None,
    })?;
    let local = Controller::new(local)?;
    let w = Workload::new(
        Pattern::RandRead,
        QD,
        Limit::Duration(Duration::from_secs_f64(secs)),
    );
    // [size][rep] -> local IOPS; per-borrower IOPS.
    let mut locals: Vec<Vec<f64>> = vec![Vec::new(); SIZES.len()];
    let mut shared: Vec<Vec<Vec<f64>>> = vec![Vec::new(); SIZES.len()];
    for _ in 0..reps {
        for (k, &n) in SIZES.iter().enumerate() {
            let l = workload::run(&local, &w)?;
            if let Some(v) = locals.get_mut(k) {
                v.push(l.iops);
            }
            let s = rig.sample(n, secs)?;
            if let Some(v) = shared.get_mut(k) {
                v.push(s);
            }
            eprint!(".");
        }
    }
    eprintln!();
    local.shutdown()?;
    let mut report = Report::new("sharing");
    for ((&n, l), s) in SIZES.iter().zip(&mut locals).zip(&shared) {
        let l_iops = median(l);
        let per: Vec<f64> = (0..n)
            .map(|i| {
                median(
                    &mut s
                        .iter()
                        .filter_map(|r| r.get(i).copied())
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        for (i, v) in per.iter().enumerate() {
            report.push(Figure::new(
                format!(
                    "randread-4k-qd32 IOPS, borrower {} of {n} (VF {})",
                    i + 1,
                    i + 1
                ),
                "IOPS",
                *v,
            ));
        }
        let aggregate = median(&mut s.iter().map(|r| r.iter().sum()).collect::<Vec<f64>>());
        report.push(
            Figure::new(
                format!("randread-4k-qd32 IOPS, aggregate of {n} borrower(s)"),
                "IOPS",
                aggregate,
            )
            .against("local single function", l_iops)
            .target(Target::AtLeast(0.9)),
        );
        if n > 1 {
            let mean = per.iter().sum::<f64>() / n as f64;
            let slowest = per.iter().copied().fold(f64::INFINITY, f64::min);
            report.push(
                Figure::new(
                    format!("randread-4k-qd32 IOPS, slowest of {n} borrowers"),
                    "IOPS",
                    slowest,
                )
                .against(format!("mean of {n}"), mean)
                .target(Target::AtLeast(0.8)),
            );
        }
    }
    report.notes.push(format!(
        "4 KiB random reads at QD{QD}; each borrower a process of its own on its own shm link and its own VF of one device (shared namespace); {reps} sample(s) of {secs} s per side, interleaved with the local ones (local, 1, local, 2, local, 4, local, 8, ...), medians; local = the same NVMe model bound in this process, one driver; the aggregate is the sum of the borrowers' IOPS over one start instant; fairness (slowest vs mean) is not shown for a single borrower"
    ));
    report.notes.push(format!(
        "each VF controller has its own worker thread in the lender, and each borrower process its own driver: {} CPU(s) here are shared by all of them",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    ));
    drop(rig);
    report.emit(a.run.json);
    Ok(())
}

/// The hidden borrower process: borrows its VF, says `ready`, then for each `run AT SECS SEED`
/// line waits for the instant AT (ns since the epoch), runs 4 KiB random reads at QD32 for SECS
/// and answers `iops X`. End of input returns the VF and exits.
pub fn run_borrower(a: BorrowerArgs) -> anyhow::Result<()> {
    let spec = FabricSpec::parse(&a.fabric)?;
    let ntbs = host::open_fabrics(&[spec], &host::TcpOptions::default())?;
    let node = Node::start(NodeConfig::new(&a.name), ntbs)?;
    node.wait_link_up(Duration::from_secs(30))
        .context("the link did not come up")?;
    // The lender may still be offering the VFs when the link comes up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node.peer_devices()?.iter().any(|d| d.name == a.device) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} was not offered in 30 s",
            a.device
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let f: Arc<dyn PciFunction> = node
        .borrow(&a.device)
        .with_context(|| format!("borrowing {}", a.device))?;
    let drv = Controller::new(f).context("driver initialisation on the VF")?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let mut words = line.split_whitespace();
        let (Some("run"), Some(at), Some(secs), Some(seed), None) = (
            words.next(),
            words.next(),
            words.next(),
            words.next(),
            words.next(),
        ) else {
            anyhow::bail!("unexpected request {line:?}");
        };
        let at = UNIX_EPOCH + Duration::from_nanos(at.parse()?);
        let secs: f64 = secs.parse()?;
        if let Ok(wait) = at.duration_since(SystemTime::now()) {
            std::thread::sleep(wait);
        }
        let mut w = Workload::new(
            Pattern::RandRead,
            QD,
            Limit::Duration(Duration::from_secs_f64(secs)),
        );
        w.seed = seed.parse()?;
        let s = workload::run(&drv, &w)?;
        writeln!(out, "iops {}", s.iops)?;
        out.flush()?;
    }
    drv.shutdown()?;
    drop(drv);
    node.give_back(&a.device)?;
    Ok(())
}
