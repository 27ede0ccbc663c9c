//! `devlend bench vm`: one guest workload (O_DIRECT 4 KiB and 128 KiB sequential writes and
//! reads with busybox `dd`, timed inside the guest; random 4 KiB reads and writes at QD1 and
//! QD32 with latency percentiles by `devlend io-load`, this binary bundled into the guest) on
//! each backend, same guest configuration (TCG, 1 vCPU, 512 MiB memfd RAM), same image, boots
//! interleaved (A B A B):
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
use devlend_testkit::guest::bundle::Bundle;
use devlend_testkit::guest::{self, GuestDisk, GuestSpec, VmAssets};
use devlend_vfio_user::{Server, Stats, StatsSnapshot};

use super::serve::{local_nvme, parse_size, NvmeArgs};

/// Arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object (docs/BENCH.md) instead of the table.
    #[arg(long)]
    pub(crate) json: bool,
    /// Guest boots per backend (interleaved A B A B); each boot runs every workload --rounds
    /// times.
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
    /// Skip the rows of a device borrowed over tcp (they need root: two network namespaces).
    #[arg(long)]
    no_tcp: bool,
    /// Skip the rows measured while a CPU-bound thread spins on one core (QEMU's NVMe and the
    /// devices borrowed over shm and tcp, all under the same load).
    #[arg(long)]
    no_load: bool,
    /// Skip the rows of our device bound locally (vfio-user-local and its -poll row).
    #[arg(long)]
    no_local: bool,
    /// Only these workloads (comma-separated: write-4k, read-4k, write-128k, read-128k,
    /// write-4k-x4, read-4k-x4, randread-4k-qd1, randwrite-4k-qd1, randread-4k-qd32,
    /// randwrite-4k-qd32); default: all of them.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Rounds of the workloads in each boot (figures are medians over boots and rounds).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Seconds of each `io-load` run in the guest (the random QD1 and QD32 workloads).
    #[arg(long, default_value_t = 2.0)]
    io_secs: f64,
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

/// A random 4 KiB workload run in the guest by `devlend io-load` (this binary, bundled), which
/// times every I/O: IOPS, median and p99 latency.
struct IoLoad {
    name: &'static str,
    pattern: &'static str,
    qd: u32,
}

const IO_LOADS: [IoLoad; 4] = [
    IoLoad {
        name: "randread-4k-qd1",
        pattern: "randread",
        qd: 1,
    },
    IoLoad {
        name: "randwrite-4k-qd1",
        pattern: "randwrite",
        qd: 1,
    },
    IoLoad {
        name: "randread-4k-qd32",
        pattern: "randread",
        qd: 32,
    },
    IoLoad {
        name: "randwrite-4k-qd32",
        pattern: "randwrite",
        qd: 32,
    },
];

/// The io-load runs touch the first 256 MiB, as the dd workloads do.
const IO_LOAD_RANGE: &str = "256M";

/// Where the bundled binary is in the guest.
const GUEST_DEVLEND: &str = "devlend/devlend";

/// What each boot runs.
pub struct Plan {
    /// Boots per row.
    pub boots: u32,
    /// Rounds of the workloads per boot.
    pub rounds: u32,
    /// Seconds of each io-load run.
    pub io_secs: f64,
    dd: Vec<&'static Workload>,
    io: Vec<&'static IoLoad>,
}

impl Plan {
    /// Every workload, or those named in `only`.
    fn new(boots: u32, rounds: u32, io_secs: f64, only: &[String]) -> anyhow::Result<Plan> {
        let known = || {
            WORKLOADS
                .iter()
                .map(|w| w.name)
                .chain(IO_LOADS.iter().map(|l| l.name))
        };
        if let Some(bad) = only.iter().find(|n| !known().any(|k| k == n.as_str())) {
            bail!(
                "no workload {bad:?} (known: {})",
                known().collect::<Vec<_>>().join(", ")
            );
        }
        if !(io_secs.is_finite() && io_secs > 0.0) {
            bail!("--io-secs {io_secs} is not a positive number of seconds");
        }
        let chosen = |name: &str| only.is_empty() || only.iter().any(|n| n == name);
        Ok(Plan {
            boots,
            rounds,
            io_secs,
            dd: WORKLOADS.iter().filter(|w| chosen(w.name)).collect(),
            io: IO_LOADS.iter().filter(|l| chosen(l.name)).collect(),
        })
    }
}

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
    median_us: Vec<f64>,
    p99_us: Vec<f64>,
    msgs_per_io: Vec<f64>,
    sync_msgs_per_io: Vec<f64>,
    irqs_per_io: Vec<f64>,
}

fn guest_script(plan: &Plan) -> String {
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
load() { # load NAME ROUND io-load-arguments...: devlend io-load times each I/O itself
    name=$1; round=$2; shift 2
    echo "BENCH-BEGIN $name $round"
    i0=$(irqs)
    out=$(/@DEVLEND@ io-load --device /dev/nvme0n1 "$@") || { echo "BENCH-FAIL $name"; exit 1; }
    i1=$(irqs)
    echo "BENCH-IO $name $round irqs=$((i1 - i0)) $out"
}
"#,
    )
    .replace("@DEVLEND@", GUEST_DEVLEND);
    for round in 0..plan.rounds {
        for l in &plan.io {
            s.push_str(&format!(
                "load {} {round} --pattern {} --qd {} --block 4096 --range {IO_LOAD_RANGE} --secs {} --seed {}\n",
                l.name,
                l.pattern,
                l.qd,
                plan.io_secs,
                0x5eed + u64::from(round),
            ));
        }
        for w in &plan.dd {
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

/// The host's load averages, as `/proc/loadavg` gives them (for the report's notes).
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

/// The medians of one workload's samples on one row.
#[derive(Default)]
struct Medians {
    mbps: f64,
    iops: f64,
    median_us: f64,
    p99_us: f64,
    msgs: f64,
    sync: f64,
    irqs: f64,
}

impl Medians {
    fn of(s: &Samples) -> Medians {
        let med = |v: &Vec<f64>| median(&mut v.clone());
        Medians {
            mbps: med(&s.mbps),
            iops: med(&s.iops),
            median_us: med(&s.median_us),
            p99_us: med(&s.p99_us),
            msgs: med(&s.msgs_per_io),
            sync: med(&s.sync_msgs_per_io),
            irqs: med(&s.irqs_per_io),
        }
    }
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
    let plan = Plan::new(args.boots, args.rounds, args.io_secs, &args.only)?;
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
    let mut rows = vec![row("qemu-nvme".into(), Backend::QemuNvme)];
    if !args.no_local {
        rows.push(row(
            "vfio-user-local".into(),
            Backend::VfioUser(local(None)?),
        ));
    }
    if args.poll_row_us > 0 && !args.no_local {
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
    let mut loaded_base = None;
    if !args.no_load {
        // The same two devices again, each boot under the same CPU-bound load: QEMU's NVMe is
        // the baseline of the borrowed row (the issue's target: at least 0.9x under load).
        let base = rows.len();
        loaded_base = Some(base);
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
                rows.push(row(
                    "vfio-user-borrowed-tcp".into(),
                    Backend::VfioUser(f.clone()),
                ));
                if let Some(base) = loaded_base {
                    rows.push(Row {
                        baseline: base,
                        load: true,
                        ..row("vfio-user-borrowed-tcp-loaded".into(), Backend::VfioUser(f))
                    });
                }
                Some(p)
            }
            Err(e) => {
                notes.push(format!("tcp row not measured: {e:#}"));
                None
            }
        }
    };
    let mut report = measure(&assets, &dir, &image, rows, &plan)?;
    report.notes.extend(notes);
    pair.borrower.give_back("vm0")?;
    if let Some(p) = tcp {
        p.borrower.give_back("vm1")?;
    }
    report.emit(args.json);
    Ok(())
}

/// Boots each row `plan.boots` times, interleaved, and builds the report (first row = baseline).
pub fn measure(
    assets: &VmAssets,
    dir: &Path,
    image: &Path,
    rows: Vec<Row>,
    plan: &Plan,
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

    let script = guest_script(plan);
    // io-load runs in the guest: this binary (the release build when the bench is run as the
    // README says) with its shared libraries, as one more initramfs layer.
    let mut layers = Vec::new();
    if !plan.io.is_empty() {
        let me = std::env::current_exe().context("finding this binary")?;
        let mut bundle = Bundle::new();
        bundle
            .binary(&me, GUEST_DEVLEND, dir)
            .context("bundling devlend for the guest")?;
        layers.push(bundle.cpio());
    }
    let boots = plan.boots;
    let load_before = load_average();
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
            let mut spec = GuestSpec::new(assets.clone(), disk.clone(), script.as_str(), dir);
            spec.layers = layers.clone();
            // dd's rounds took up to 10 minutes on a loaded host; io-load's are bounded by time.
            spec.timeout = Duration::from_secs(600).saturating_add(Duration::from_secs_f64(
                f64::from(plan.rounds) * plan.io.len() as f64 * (plan.io_secs + 30.0),
            ));
            run_boot(&spec, stats.as_ref(), per_row)
                .with_context(|| format!("{} (boot {})", row.name, boot + 1))?;
            drop(load);
        }
    }

    let mut report = Report::new("vm");
    let mut time_notes = Vec::new();
    // (key, label, run by io-load)
    let workloads: Vec<(&'static str, String, bool)> = plan
        .dd
        .iter()
        .map(|w| (w.name, format!("{}-qd{}", w.name, w.parallel), false))
        .chain(plan.io.iter().map(|l| (l.name, l.name.to_string(), true)))
        .collect();
    for (key, label, io) in &workloads {
        for (i, row) in rows.iter().enumerate() {
            let baseline_name = rows
                .get(row.baseline)
                .map(|r| r.name.clone())
                .unwrap_or_default();
            let base = results
                .get(row.baseline)
                .and_then(|b| b.get(key))
                .map(Medians::of)
                .unwrap_or_default();
            let Some(s) = results.get(i).and_then(|r| r.get(key)) else {
                continue;
            };
            let m = Medians::of(s);
            let unit_name = format!("{label} {}", row.name);
            // (name, unit, value, baseline, the row's throughput target applies)
            let mut figures = Vec::new();
            if !io {
                figures.push((format!("{unit_name} MB/s"), "MB/s", m.mbps, base.mbps, true));
            }
            figures.push((format!("{unit_name} IOPS"), "IOPS", m.iops, base.iops, true));
            if *io {
                figures.push((
                    format!("{unit_name} median latency"),
                    "us",
                    m.median_us,
                    base.median_us,
                    false,
                ));
                figures.push((
                    format!("{unit_name} p99 latency"),
                    "us",
                    m.p99_us,
                    base.p99_us,
                    false,
                ));
            }
            for (name, unit, value, baseline, throughput) in figures {
                let mut f = Figure::new(name, unit, value);
                if i != row.baseline {
                    f = f.against(baseline_name.clone(), baseline);
                    if let (Some(t), true) = (row.target, throughput) {
                        f = f.target(t);
                    }
                }
                report.push(f);
            }
            if i != row.baseline && !s.msgs_per_io.is_empty() {
                time_notes.push(format!(
                    "{} {key}: {:.2}x {baseline_name} IOPS; per I/O {:.2} socket messages ({:.2} waited on by the vCPU), {:.2} interrupts (eventfd -> QEMU main loop -> MSI-X), 0 data copies (DMA into the guest's memfd)",
                    row.name,
                    if base.iops > 0.0 { m.iops / base.iops } else { 0.0 },
                    m.msgs,
                    m.sync,
                    m.irqs,
                ));
            }
            if !s.msgs_per_io.is_empty() {
                report.push(Figure::new(
                    format!("{unit_name} socket messages per I/O"),
                    "msgs/IO",
                    m.msgs,
                ));
            }
            if !s.sync_msgs_per_io.is_empty() {
                report.push(Figure::new(
                    format!("{unit_name} of which waited on (not posted)"),
                    "msgs/IO",
                    m.sync,
                ));
            }
            if !s.irqs_per_io.is_empty() {
                report.push(Figure::new(
                    format!("{unit_name} guest interrupts per I/O"),
                    "irqs/IO",
                    m.irqs,
                ));
            }
        }
    }
    report.notes.push(format!(
        "guest: TCG, 1 vCPU, 512 MiB memfd RAM; {} boots per row interleaved, {} rounds per boot, medians over them",
        boots, plan.rounds
    ));
    if !plan.dd.is_empty() {
        report.notes.push(
            "dd rows: busybox dd O_DIRECT sequential, qd1 = one dd, qd4 = four dd processes at once on disjoint ranges; time from the guest's /proc/uptime (10 ms ticks)".into(),
        );
    }
    if !plan.io.is_empty() {
        report.notes.push(format!(
            "rand*-qd1/qd32 rows: `devlend io-load` in the guest (this binary, bundled), O_DIRECT 4 KiB at random offsets in the first {IO_LOAD_RANGE}, QD n = n threads each with one synchronous I/O outstanding, {} s per run; each I/O timed on the guest's monotonic clock; median and p99 latency are the medians over runs of each run's own percentile",
            plan.io_secs
        ));
    }
    if rows.iter().any(|r| r.load) {
        report.notes.push(
            "-loaded rows: a thread of this process spins on the last CPU (pinned) for the whole boot, the same for QEMU's NVMe and the borrowed device; their ratio is to qemu-nvme-loaded".into(),
        );
    }
    report.notes.extend(time_notes);
    if rows.iter().any(|r| r.name.starts_with("vfio-user-local")) {
        report.notes.push(
        "vfio-user-local uses the NVMe model's default doorbell polling (30 us after each command, then it sleeps and the next doorbell is a posted socket message that wakes it); the -poll row keeps polling the shadow doorbells longer, so at queue depth 1 the next command is seen with no message and no wake-up, at the cost of CPU taken from the guest's vCPU on these 2 shared cores".into(),
    );
    }
    report.notes.push(format!(
        "host load average (1, 5, 15 min) at the start: {load_before}; at the end: {}",
        load_average()
    ));
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

/// One workload run as the guest reported it, with the server's (all, non-posted) message
/// counts over it.
struct Measured {
    name: String,
    result: RunResult,
    irqs: f64,
    msgs: Option<(u64, u64)>,
}

/// What the guest measured.
enum RunResult {
    /// A dd workload: guest time in centiseconds.
    Dd { cs: f64 },
    /// An io-load run: its own figures.
    IoLoad {
        ios: f64,
        iops: f64,
        median_us: f64,
        p99_us: f64,
    },
}

/// The io-load figures of a `BENCH-IO` line's JSON.
fn io_load_result(json: &str) -> Option<RunResult> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let f = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
    Some(RunResult::IoLoad {
        ios: f("ios")?,
        iops: f("iops")?,
        median_us: f("median_us")?,
        p99_us: f("p99_us")?,
    })
}

fn run_boot(
    spec: &GuestSpec,
    stats: Option<&Arc<Stats>>,
    per_row: &mut BTreeMap<&'static str, Samples>,
) -> anyhow::Result<()> {
    let begin: Mutex<Option<StatsSnapshot>> = Mutex::new(None);
    let collected: Mutex<Vec<Measured>> = Mutex::new(Vec::new());
    let out = guest::boot_with(spec, |line| {
        let mut words = line.split_whitespace();
        let tag = words.next();
        match tag {
            Some("BENCH-BEGIN") => {
                if let Ok(mut b) = begin.lock() {
                    *b = stats.map(|s| s.snapshot());
                }
            }
            Some("BENCH-END") | Some("BENCH-IO") => {
                let name = words.next().unwrap_or_default().to_string();
                let _round = words.next();
                let mut cs = None;
                let mut irqs = None;
                let mut json = None;
                for word in words {
                    match word.split_once('=') {
                        Some(("cs", v)) => cs = v.parse::<f64>().ok(),
                        Some(("irqs", v)) => irqs = v.parse::<f64>().ok(),
                        _ if word.starts_with('{') => json = Some(word),
                        _ => {}
                    }
                }
                let result = if tag == Some("BENCH-IO") {
                    json.and_then(io_load_result)
                } else {
                    cs.map(|cs| RunResult::Dd { cs })
                };
                let msgs = stats.and_then(|s| {
                    let start = begin.lock().ok()?.take()?;
                    let now = s.snapshot();
                    let total = now.total().saturating_sub(start.total());
                    let posted = now.posted.saturating_sub(start.posted);
                    Some((total, total.saturating_sub(posted)))
                });
                if let (Some(result), Some(irqs), Ok(mut c)) = (result, irqs, collected.lock()) {
                    c.push(Measured {
                        name,
                        result,
                        irqs,
                        msgs,
                    });
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
    for m in collected {
        let (key, ios) = match &m.result {
            RunResult::Dd { cs } => {
                let Some(w) = WORKLOADS.iter().find(|w| w.name == m.name) else {
                    continue;
                };
                let secs = (cs / 100.0).max(0.01);
                let ios = w.ios() as f64;
                let s = per_row.entry(w.name).or_default();
                s.mbps.push(w.block as f64 * ios / secs / 1e6);
                s.iops.push(ios / secs);
                (w.name, ios)
            }
            RunResult::IoLoad {
                ios,
                iops,
                median_us,
                p99_us,
            } => {
                let Some(l) = IO_LOADS.iter().find(|l| l.name == m.name) else {
                    continue;
                };
                let s = per_row.entry(l.name).or_default();
                s.iops.push(*iops);
                s.median_us.push(*median_us);
                s.p99_us.push(*p99_us);
                (l.name, ios.max(1.0))
            }
        };
        let s = per_row.entry(key).or_default();
        s.irqs_per_io.push(m.irqs / ios);
        if let Some((total, sync)) = m.msgs {
            s.msgs_per_io.push(total as f64 / ios);
            s.sync_msgs_per_io.push(sync as f64 / ios);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_selects_workloads_and_refuses_unknown_ones() {
        let all = Plan::new(1, 1, 1.0, &[]).expect("the default plan");
        assert_eq!(
            (all.dd.len(), all.io.len()),
            (WORKLOADS.len(), IO_LOADS.len())
        );
        let some = Plan::new(1, 2, 0.5, &["randread-4k-qd32".into(), "write-4k".into()])
            .expect("a plan of two");
        assert_eq!(
            some.dd.iter().map(|w| w.name).collect::<Vec<_>>(),
            ["write-4k"]
        );
        assert_eq!(
            some.io.iter().map(|l| l.name).collect::<Vec<_>>(),
            ["randread-4k-qd32"]
        );
        assert!(Plan::new(1, 1, 1.0, &["randread-4k-qd64".into()]).is_err());
        assert!(Plan::new(1, 1, 0.0, &[]).is_err());
        assert!(Plan::new(1, 1, f64::NAN, &[]).is_err());
    }

    #[test]
    fn the_guest_script_runs_the_chosen_workloads_every_round() {
        let plan =
            Plan::new(1, 2, 0.5, &["randwrite-4k-qd32".into(), "read-4k".into()]).expect("a plan");
        let script = guest_script(&plan);
        assert!(script.contains("out=$(/devlend/devlend io-load --device /dev/nvme0n1"));
        for round in 0..2 {
            assert!(
                script.contains(&format!(
                    "load randwrite-4k-qd32 {round} --pattern randwrite --qd 32 --block 4096 --range 256M --secs 0.5"
                )),
                "{script}"
            );
            assert!(script.contains(&format!("run read-4k {round} if=/dev/nvme0n1")));
        }
        assert!(!script.contains("randread-4k-qd1 "), "{script}");
        assert!(!script.contains("run write-4k "), "{script}");
        assert!(script.ends_with("echo BENCH-DONE\n"));
    }

    #[test]
    fn an_io_load_line_gives_its_figures_and_a_broken_one_none() {
        let Some(RunResult::IoLoad {
            ios,
            iops,
            median_us,
            p99_us,
        }) = io_load_result(
            r#"{"block_bytes":4096,"iops":3965.2,"ios":1000,"max_us":82669.2,"median_us":51.4,"p99_us":1096.3,"pattern":"randwrite","qd":1,"secs":0.25}"#,
        )
        else {
            panic!("an io-load line parses");
        };
        assert_eq!(
            (ios, iops, median_us, p99_us),
            (1000.0, 3965.2, 51.4, 1096.3)
        );
        assert!(io_load_result(r#"{"ios":1000}"#).is_none());
        assert!(io_load_result("{\"ios\":10").is_none());
    }
}
