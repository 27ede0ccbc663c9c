//! `devlend bench vm`: one guest workload (O_DIRECT 4 KiB and 128 KiB sequential writes and
//! reads with busybox `dd`, timed inside the guest) on each backend, same guest configuration
//! (TCG, 1 vCPU, 512 MiB memfd RAM), same image, boots interleaved (A B A B):
//!
//! 1. `qemu-nvme`: QEMU's built-in NVMe controller (the baseline);
//! 2. `vfio-user-local`: our NVMe model bound locally, served by our vfio-user server.
//!
//! A further row is one more [`Backend::VfioUser`] with another function (e.g. a borrowed one).
//! For vfio-user rows the server's message counters are read at the guest's markers, so the
//! report says how many socket messages (and, from the guest's `/proc/interrupts`, how many
//! interrupts) each I/O costs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use devlend_bench::{median, Figure, Report, Target};
use devlend_pci::PciFunction;
use devlend_testkit::guest::{self, GuestDisk, GuestSpec, VmAssets};
use devlend_vfio_user::{Server, Stats, StatsSnapshot};

use super::serve::{local_nvme, parse_size, NvmeArgs};

/// Arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object (docs/BENCH.md) instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Guest boots per backend (interleaved A B A B); each boot runs every workload 3 times.
    #[arg(long, default_value_t = 2)]
    boots: u32,
    /// Image size (bytes; K, M, G suffixes). The workloads use the first 256 MiB.
    #[arg(long, default_value = "320M", value_parser = parse_size)]
    size: u64,
    /// An extra row: our local device with its NVMe worker polling doorbells this long after
    /// each command before sleeping (µs; 0: no extra row). Polling catches the next shadow
    /// doorbell with no socket message and no wake-up, at the price of CPU taken from the vCPU.
    #[arg(long, default_value_t = 300)]
    poll_row_us: u64,
    /// Skip the row of a device borrowed over tcp (it needs root: two network namespaces).
    #[arg(long)]
    no_tcp: bool,
    /// Skip the rows measured while a CPU-bound thread spins on one core (QEMU's NVMe and the
    /// device borrowed over shm, both under the same load).
    #[arg(long)]
    no_load: bool,
    /// Scratch directory (image, sockets); default: a fresh directory under the system temp.
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// `vm.env` from `scripts/vm-setup.sh`; default: run the script (cached after the first run).
    #[arg(long)]
    vm_env: Option<PathBuf>,
}

/// A workload: `dd` with O_DIRECT, sequential; `parallel` processes at once on disjoint ranges
/// (each at queue depth 1, so the device sees up to `parallel` commands outstanding).
struct Workload {
    name: &'static str,
    write: bool,
    block: u64,
    count: u64,
    parallel: u64,
}

impl Workload {
    /// I/Os over every process.
    fn ios(&self) -> u64 {
        self.count.saturating_mul(self.parallel)
    }
}

const WORKLOADS: [Workload; 6] = [
    Workload {
        name: "write-4k",
        write: true,
        block: 4096,
        count: 16384,
        parallel: 1,
    },
    Workload {
        name: "read-4k",
        write: false,
        block: 4096,
        count: 16384,
        parallel: 1,
    },
    Workload {
        name: "write-128k",
        write: true,
        block: 128 << 10,
        count: 2048,
        parallel: 1,
    },
    Workload {
        name: "read-128k",
        write: false,
        block: 128 << 10,
        count: 2048,
        parallel: 1,
    },
    Workload {
        name: "write-4k-x4",
        write: true,
        block: 4096,
        count: 4096,
        parallel: 4,
    },
    Workload {
        name: "read-4k-x4",
        write: false,
        block: 4096,
        count: 4096,
        parallel: 4,
    },
];

const ROUNDS_PER_BOOT: u32 = 3;

/// How a row's guest reaches its NVMe device.
pub enum Backend {
    /// QEMU's `-device nvme` on the image.
    QemuNvme,
    /// A vfio-user server (in this process) for this function.
    VfioUser(Arc<dyn PciFunction>),
}

/// One row of the comparison.
pub struct Row {
    /// Name in the report ("qemu-nvme", "vfio-user-local").
    pub name: String,
    /// The device.
    pub backend: Backend,
    /// Goal for this row's ratio to its baseline (the issue's target for a borrowed device:
    /// at least as fast as QEMU's own NVMe).
    pub target: Option<Target>,
    /// The row this one is compared with (its own index: it is a baseline).
    pub baseline: usize,
    /// Boots of this row run while a CPU-bound thread spins on one core (see [`CpuLoad`]).
    pub load: bool,
}

/// Samples of one workload on one row.
#[derive(Default)]
struct Samples {
    mbps: Vec<f64>,
    iops: Vec<f64>,
    msgs_per_io: Vec<f64>,
    sync_msgs_per_io: Vec<f64>,
    irqs_per_io: Vec<f64>,
}

fn guest_script() -> String {
    let mut s = String::from(
        r#"#!/bin/sh
i=0
while [ ! -e /sys/block/nvme0n1 ]; do
    i=$((i + 1)); [ $i -gt 300 ] && { echo "BENCH-FAIL no nvme0n1"; exit 1; }
    sleep 0.1
done
cs() { awk '{ split($1, a, "."); print a[1] * 100 + a[2] }' /proc/uptime; }
irqs() { grep nvme0q /proc/interrupts | awk '{ s += $2 } END { print s + 0 }'; }
run() { # run NAME ROUND dd-arguments...
    name=$1; round=$2; shift 2
    echo "BENCH-BEGIN $name $round"
    i0=$(irqs); t0=$(cs)
    dd "$@" 2>/dev/null || { echo "BENCH-FAIL $name"; exit 1; }
    t1=$(cs); i1=$(irqs)
    echo "BENCH-END $name $round cs=$((t1 - t0)) irqs=$((i1 - i0))"
}
par() { # par NAME ROUND PROCESSES COUNT BLOCK WRITE: each process its own range, all at once
    name=$1; round=$2; n=$3; count=$4; bs=$5; w=$6
    echo "BENCH-BEGIN $name $round"
    i0=$(irqs); t0=$(cs); pids=""; k=0
    while [ $k -lt $n ]; do
        if [ $w = 1 ]; then
            dd if=/dev/zero of=/dev/nvme0n1 bs=$bs count=$count seek=$((k * count)) oflag=direct 2>/dev/null &
        else
            dd if=/dev/nvme0n1 of=/dev/null bs=$bs count=$count skip=$((k * count)) iflag=direct 2>/dev/null &
        fi
        pids="$pids $!"; k=$((k + 1))
    done
    for p in $pids; do wait $p || { echo "BENCH-FAIL $name"; exit 1; }; done
    t1=$(cs); i1=$(irqs)
    echo "BENCH-END $name $round cs=$((t1 - t0)) irqs=$((i1 - i0))"
}
"#,
    );
    for round in 0..ROUNDS_PER_BOOT {
        for w in &WORKLOADS {
            if w.parallel > 1 {
                s.push_str(&format!(
                    "par {} {round} {} {} {} {}\n",
                    w.name,
                    w.parallel,
                    w.count,
                    w.block,
                    u8::from(w.write)
                ));
                continue;
            }
            let dd = if w.write {
                format!(
                    "if=/dev/zero of=/dev/nvme0n1 bs={} count={} oflag=direct",
                    w.block, w.count
                )
            } else {
                format!(
                    "if=/dev/nvme0n1 of=/dev/null bs={} count={} iflag=direct",
                    w.block, w.count
                )
            };
            s.push_str(&format!("run {} {round} {dd}\n", w.name));
        }
    }
    s.push_str("echo BENCH-DONE\n");
    s
}

/// Removes a directory tree when dropped.
struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes a file when dropped.
struct RemoveFileOnDrop(PathBuf);

impl Drop for RemoveFileOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    let assets = match &args.vm_env {
        Some(p) => VmAssets::from_env_file(p)?,
        None => {
            let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
            VmAssets::provision(&repo).context("provisioning QEMU, kernel and initramfs")?
        }
    };
    // A directory of our own is removed when the run ends, whatever happened (its image is
    // as large as --size); a --work-dir given is left, without the image.
    let (dir, _scratch) = match &args.work_dir {
        Some(d) => (d.clone(), None),
        None => {
            let d = std::env::temp_dir().join(format!("devlend-bench-vm-{}", std::process::id()));
            (d.clone(), Some(RemoveDirOnDrop(d)))
        }
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _image_gone = RemoveFileOnDrop(dir.join("bench.img"));
    let image = dir.join("bench.img");
    let _ = std::fs::remove_file(&image);

    let local = |poll_spin_us: Option<u64>| {
        local_nvme(&NvmeArgs {
            image: image.clone(),
            size: Some(args.size),
            serial: Some("bench-local".into()),
            model: None,
            poll_spin_us,
            vfio_user: dir.join("unused"),
        })
    };
    let row = |name: String, backend: Backend| Row {
        name,
        backend,
        target: None,
        baseline: 0,
        load: false,
    };
    let mut rows = vec![
        row("qemu-nvme".into(), Backend::QemuNvme),
        row("vfio-user-local".into(), Backend::VfioUser(local(None)?)),
    ];
    if args.poll_row_us > 0 {
        rows.push(row(
            format!("vfio-user-local-poll{}us", args.poll_row_us),
            Backend::VfioUser(local(Some(args.poll_row_us))?),
        ));
    }
    // The borrowed row: the same image, owned by a lender host (a `devlend node` process),
    // borrowed over the shm fabric by this process and served to QEMU over vfio-user.
    let pair = crate::pair::Pair::start(&dir)?;
    pair.lender_add_nvme("vm0", &image, args.size)?;
    let borrowed: Arc<dyn PciFunction> = pair.borrow("vm0")?;
    rows.push(Row {
        target: Some(Target::AtLeast(1.0)),
        ..row(
            "vfio-user-borrowed-shm".into(),
            Backend::VfioUser(borrowed.clone()),
        )
    });
    if !args.no_load {
        // The same two devices again, each boot under the same CPU-bound load: QEMU's NVMe is
        // the baseline of the borrowed row (the issue's target: at least 0.9x under load).
        let base = rows.len();
        rows.push(Row {
            baseline: base,
            load: true,
            ..row("qemu-nvme-loaded".into(), Backend::QemuNvme)
        });
        rows.push(Row {
            target: Some(Target::AtLeast(0.9)),
            baseline: base,
            load: true,
            ..row(
                "vfio-user-borrowed-shm-loaded".into(),
                Backend::VfioUser(borrowed),
            )
        });
    }
    // The tcp pair last: it moves this thread (and the guests it starts) into a network
    // namespace. Its image is its own (the lender in the namespace owns and locks it).
    let mut notes = Vec::new();
    let tcp = if args.no_tcp {
        None
    } else {
        match crate::pair::Pair::start_tcp(&dir) {
            Ok(p) => {
                let img = p.dir.join("tcp.img");
                p.lender_add_nvme("vm1", &img, args.size)?;
                let f: Arc<dyn PciFunction> = p.borrow("vm1")?;
                rows.push(row("vfio-user-borrowed-tcp".into(), Backend::VfioUser(f)));
                Some(p)
            }
            Err(e) => {
                notes.push(format!("tcp row not measured: {e:#}"));
                None
            }
        }
    };
    let mut report = measure(&assets, &dir, &image, rows, args.boots)?;
    report.notes.extend(notes);
    pair.borrower.give_back("vm0")?;
    if let Some(p) = tcp {
        p.borrower.give_back("vm1")?;
    }
    report.emit(args.json);
    Ok(())
}

/// Boots each row `boots` times, interleaved, and builds the report (first row = baseline).
pub fn measure(
    assets: &VmAssets,
    dir: &Path,
    image: &Path,
    rows: Vec<Row>,
    boots: u32,
) -> anyhow::Result<Report> {
    // Start a server thread per vfio-user row; each serves one guest after another.
    let mut disks = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        match &row.backend {
            Backend::QemuNvme => disks.push((
                GuestDisk::QemuNvme {
                    image: image.to_path_buf(),
                },
                None,
            )),
            Backend::VfioUser(function) => {
                let socket = dir.join(format!("row{i}.sock"));
                let server = Server::new(function.clone()).context("probing the function")?;
                let stats = server.stats();
                let listener = Server::bind(&socket)?;
                let path = socket.clone();
                std::thread::spawn(move || {
                    let _ = server.serve_listener(&listener, &path, |_, _| {});
                });
                disks.push((GuestDisk::VfioUser { socket }, Some(stats)));
            }
        }
    }

    let script = guest_script();
    let mut results: Vec<BTreeMap<&'static str, Samples>> =
        rows.iter().map(|_| BTreeMap::new()).collect();
    for boot in 0..boots {
        for (i, row) in rows.iter().enumerate() {
            let Some((disk, stats)) = disks.get(i) else {
                continue;
            };
            eprintln!("bench vm: boot {}/{boots}: {}", boot + 1, row.name);
            let per_row = results.get_mut(i).context("row index")?;
            let load = if row.load {
                Some(CpuLoad::start()?)
            } else {
                None
            };
            run_boot(assets, dir, disk.clone(), stats.as_ref(), &script, per_row)
                .with_context(|| format!("{} (boot {})", row.name, boot + 1))?;
            drop(load);
        }
    }

    let mut report = Report::new("vm");
    let mut time_notes = Vec::new();
    for w in &WORKLOADS {
        for (i, row) in rows.iter().enumerate() {
            let baseline_name = rows
                .get(row.baseline)
                .map(|r| r.name.clone())
                .unwrap_or_default();
            let (bm, bi) = results
                .get(row.baseline)
                .and_then(|b| b.get(w.name))
                .map(|s| (median(&mut s.mbps.clone()), median(&mut s.iops.clone())))
                .unwrap_or((0.0, 0.0));
            let Some(s) = results.get_mut(i).and_then(|r| r.get_mut(w.name)) else {
                continue;
            };
            let (mbps, iops) = (median(&mut s.mbps), median(&mut s.iops));
            let unit_name = format!("{}-qd{} {}", w.name, w.parallel, row.name);
            if i == row.baseline {
                report.push(Figure::new(format!("{unit_name} MB/s"), "MB/s", mbps));
                report.push(Figure::new(format!("{unit_name} IOPS"), "IOPS", iops));
            } else {
                let mut by_rate = Figure::new(format!("{unit_name} MB/s"), "MB/s", mbps)
                    .against(baseline_name.clone(), bm);
                let mut by_ops = Figure::new(format!("{unit_name} IOPS"), "IOPS", iops)
                    .against(baseline_name.clone(), bi);
                if let Some(t) = row.target {
                    by_rate = by_rate.target(t);
                    by_ops = by_ops.target(t);
                }
                report.push(by_rate);
                report.push(by_ops);
            }
            let msgs = median(&mut s.msgs_per_io);
            let sync = median(&mut s.sync_msgs_per_io);
            let irqs = median(&mut s.irqs_per_io);
            if i != row.baseline && !s.msgs_per_io.is_empty() {
                time_notes.push(format!(
                    "{} {}: {:.2}x {baseline_name} IOPS; per I/O {msgs:.2} socket messages ({sync:.2} waited on by the vCPU), {irqs:.2} interrupts (eventfd -> QEMU main loop -> MSI-X), 0 data copies (DMA into the guest's memfd)",
                    row.name,
                    w.name,
                    if bi > 0.0 { iops / bi } else { 0.0 },
                ));
            }
            if !s.msgs_per_io.is_empty() {
                report.push(Figure::new(
                    format!("{unit_name} socket messages per I/O"),
                    "msgs/IO",
                    msgs,
                ));
            }
            if !s.sync_msgs_per_io.is_empty() {
                report.push(Figure::new(
                    format!("{unit_name} of which waited on (not posted)"),
                    "msgs/IO",
                    sync,
                ));
            }
            if !s.irqs_per_io.is_empty() {
                report.push(Figure::new(
                    format!("{unit_name} guest interrupts per I/O"),
                    "irqs/IO",
                    irqs,
                ));
            }
        }
    }
    report.notes.push(format!(
        "guest: TCG, 1 vCPU, 512 MiB memfd RAM; busybox dd O_DIRECT sequential, qd1 = one dd, qd4 = four dd processes at once on disjoint ranges; {} boots per row interleaved, {} rounds per boot, medians; time from the guest's /proc/uptime (10 ms ticks)",
        boots, ROUNDS_PER_BOOT
    ));
    if rows.iter().any(|r| r.load) {
        report.notes.push(
            "-loaded rows: a thread of this process spins on the last CPU (pinned) for the whole boot, the same for QEMU's NVMe and the borrowed device; their ratio is to qemu-nvme-loaded".into(),
        );
    }
    report.notes.extend(time_notes);
    report.notes.push(
        "vfio-user-local uses the NVMe model's default doorbell polling (30 us after each command, then it sleeps and the next doorbell is a posted socket message that wakes it); the -poll row keeps polling the shadow doorbells longer, so at queue depth 1 the next command is seen with no message and no wake-up, at the cost of CPU taken from the guest's vCPU on these 2 shared cores".into(),
    );
    report.notes.push(
        "vfio-user: guest RAM is DMA-mapped from QEMU's memfd (no copies); each MMIO access is one socket message (doorbell writes are posted: the vCPU does not wait), each completion one eventfd write that QEMU's main loop turns into an MSI-X message under TCG".into(),
    );
    Ok(report)
}

/// A CPU-bound thread pinned to the machine's last allowed CPU, spinning until dropped: the
/// "busy core" of the loaded rows.
struct CpuLoad {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CpuLoad {
    fn start() -> anyhow::Result<CpuLoad> {
        let cpu = devlend_fabric_tcp::cpu::allowed()?
            .last()
            .copied()
            .context("no CPU allowed")?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("cpu-load".into())
            .spawn(move || {
                if let Err(e) = devlend_fabric_tcp::cpu::pin(&[cpu]) {
                    tracing::warn!("cpu load: pinning to CPU {cpu}: {e}");
                }
                let mut x = 1u64;
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    for _ in 0..10_000 {
                        x = std::hint::black_box(
                            x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1),
                        );
                    }
                }
            })
            .context("starting the CPU load")?;
        Ok(CpuLoad {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for CpuLoad {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One workload run as the guest reported it: name, centiseconds, interrupts, and the server's
/// (all, non-posted) message counts over it.
type Measured = (String, f64, f64, Option<(u64, u64)>);

fn run_boot(
    assets: &VmAssets,
    dir: &Path,
    disk: GuestDisk,
    stats: Option<&Arc<Stats>>,
    script: &str,
    per_row: &mut BTreeMap<&'static str, Samples>,
) -> anyhow::Result<()> {
    let mut spec = GuestSpec::new(assets.clone(), disk, script, dir);
    spec.timeout = Duration::from_secs(600);
    let begin: Mutex<Option<StatsSnapshot>> = Mutex::new(None);
    let collected: Mutex<Vec<Measured>> = Mutex::new(Vec::new());
    let out = guest::boot_with(&spec, |line| {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("BENCH-BEGIN") => {
                if let Ok(mut b) = begin.lock() {
                    *b = stats.map(|s| s.snapshot());
                }
            }
            Some("BENCH-END") => {
                let name = words.next().unwrap_or_default().to_string();
                let _round = words.next();
                let mut cs = None;
                let mut irqs = None;
                for kv in words {
                    match kv.split_once('=') {
                        Some(("cs", v)) => cs = v.parse::<f64>().ok(),
                        Some(("irqs", v)) => irqs = v.parse::<f64>().ok(),
                        _ => {}
                    }
                }
                let msgs = stats.and_then(|s| {
                    let start = begin.lock().ok()?.take()?;
                    let now = s.snapshot();
                    let total = now.total().saturating_sub(start.total());
                    let posted = now.posted.saturating_sub(start.posted);
                    Some((total, total.saturating_sub(posted)))
                });
                if let (Some(cs), Some(irqs), Ok(mut c)) = (cs, irqs, collected.lock()) {
                    c.push((name, cs, irqs, msgs));
                }
            }
            _ => {}
        }
    })?;
    if !out.passed() || out.lines_with("BENCH-DONE").next().is_none() {
        bail!(
            "the guest workload failed (exit {:?}, timed out: {})\n{}",
            out.exit_code,
            out.timed_out,
            out.transcript()
        );
    }
    let collected = collected.into_inner().unwrap_or_default();
    for (name, cs, irqs, msgs) in collected {
        let Some(w) = WORKLOADS.iter().find(|w| w.name == name) else {
            continue;
        };
        let secs = (cs / 100.0).max(0.01);
        let s = per_row.entry(w.name).or_default();
        let ios = w.ios() as f64;
        s.mbps.push(w.block as f64 * ios / secs / 1e6);
        s.iops.push(ios / secs);
        s.irqs_per_io.push(irqs / ios);
        if let Some((total, sync)) = msgs {
            s.msgs_per_io.push(total as f64 / ios);
            s.sync_msgs_per_io.push(sync as f64 / ios);
        }
    }
    Ok(())
}
