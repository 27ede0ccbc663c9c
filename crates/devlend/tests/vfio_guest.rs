//! A real device lent through VFIO, in a QEMU guest (TCG) with a virtual IOMMU: QEMU's own
//! emulated NVMe controller, which nobody in this project wrote.
//!
//! One boot does everything, driven by `/test.sh` inside the guest:
//! 1. the guest kernel's VFIO modules are loaded; a `devlend node` lender runs
//!    `devlend add vfio BDF --bind` on the controller (it moves from nvme to vfio-pci);
//! 2. a borrower on the `shm` fabric (this test binary, re-run in the guest as `borrower`)
//!    runs the user-space driver's whole acceptance suite on the borrowed device, then writes
//!    a known pattern and flushes it;
//! 3. a second borrower writes another pattern, flushes, and is killed with `kill -9`; the
//!    lender's lease expires, it resets the function through VFIO and offers it again; a third
//!    borrower reads the killed one's completed write back; `devlend remove` gives the
//!    controller back to nvme while the lender runs, and it is added again; lent to a fourth
//!    borrower, it goes back to nvme when the lender stops (which takes it back first);
//! 4. the benchmark row: the same driver and workload on the device used directly through
//!    VFIO by one process, then borrowed through devlend (4 KiB random reads, QD1 and QD32),
//!    in four rounds, the order alternating (direct first, then borrowed first), both pinned to
//!    the guest's second vCPU; the figures are printed, never asserted;
//! 5. the lender stops and the controller goes back to the guest's nvme driver.
//!
//! From the host, after the guest powers off: both patterns are in the disk image behind
//! QEMU's controller.
//!
//! The guest runs optimised binaries (see `guest_binaries`): from a debug test build, the test
//! first runs `cargo build --release -p devlend --test vfio_guest`.
//!
//! Needs root (QEMU provisioning); skips with a reason when not root and `CI` is unset.
//! Takes about 4 minutes in the guest here, plus the release build.

mod guest_lending;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devlend_nvme_driver::workload::{self, Limit, Pattern, Summary, Workload};
use devlend_nvme_driver::Controller;
use devlend_pci::PciFunction;

/// Where the suite borrower leaves its pattern, and the killed borrower its own.
const SUITE_OFFSET: u64 = 96 << 20;
const KILLED_OFFSET: u64 = 112 << 20;
const PATTERN_LEN: usize = 1 << 20;
const DISK_BYTES: u64 = 256 << 20;
const BENCH_SECS: u64 = 5;
/// Rounds of the benchmark row, alternately direct then borrowed and borrowed then direct (the
/// guest script's loop).
const BENCH_ROUNDS: usize = 4;

fn pattern(seed: u8) -> Vec<u8> {
    guest_lending::pattern(PATTERN_LEN, 1, seed)
}

fn main() {
    // The guest roles log as `devlend` does (DEVLEND_LOG, warnings by default) on stderr.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVLEND_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("borrower") => guest_borrower(&args[2..]),
        Some("bench-direct") => guest_bench_direct(&args[2..]),
        _ => host_test(),
    }
}

// ---------------------------------------------------------------------------------------------
// Inside the guest
// ---------------------------------------------------------------------------------------------

fn borrow(fabric: &Path, device: &str) -> (devlend_lending::Node, Arc<dyn PciFunction>) {
    let mut cfg = devlend_lending::NodeConfig::new("borrower");
    cfg.lease = Duration::from_secs(5);
    guest_lending::borrow_on_shm(fabric, device, cfg)
}

fn report(what: &str, qd: usize, s: &Summary) {
    println!(
        "VFIO-BENCH {what} qd{qd} iops={:.0} median_us={:.1} ops={}",
        s.iops, s.median_us, s.ops
    );
}

fn bench(what: &str, f: Arc<dyn PciFunction>) {
    let ctrl = Controller::new(f).expect("driver bring-up for the benchmark");
    for qd in [1usize, 32] {
        let w = Workload::new(
            Pattern::RandRead,
            qd,
            Limit::Duration(Duration::from_secs(BENCH_SECS)),
        );
        let s = workload::run(&ctrl, &w).expect("benchmark workload");
        report(what, qd, &s);
    }
    ctrl.shutdown().expect("shutdown after the benchmark");
}

/// `borrower DIR DEVICE suite|hold|readback|bench`
fn guest_borrower(args: &[String]) {
    let [dir, device, role] = args else {
        panic!("usage: borrower DIR DEVICE ROLE");
    };
    let (node, f) = borrow(Path::new(dir), device);
    println!("VFIO-BORROWED {device} ({role}): {}", f.describe());
    match role.as_str() {
        "suite" => {
            let f2 = f.clone();
            let target = devlend_nvme_driver::suite::Target {
                make: Box::new(move || f2.clone()),
                image: None,
            };
            for (name, case) in devlend_nvme_driver::suite::CASES {
                let t = Instant::now();
                case(&target).unwrap_or_else(|e| panic!("suite case {name}: {e}"));
                println!("VFIO-CASE-OK {name} {:.1}s", t.elapsed().as_secs_f64());
            }
            let c = Controller::new(f.clone()).expect("bring-up");
            c.write_at(SUITE_OFFSET, &pattern(0xa5)).expect("write");
            c.flush().expect("flush");
            c.shutdown().expect("shutdown");
            println!("VFIO-SUITE-OK");
        }
        "hold" => {
            let c = Controller::new(f.clone()).expect("bring-up");
            c.write_at(KILLED_OFFSET, &pattern(0x3c)).expect("write");
            c.flush().expect("flush");
            println!("VFIO-WROTE");
            // Held until this process is killed (the test's kill -9).
            loop {
                std::thread::park();
            }
        }
        "readback" => {
            let c = Controller::new(f.clone()).expect("bring-up");
            let mut back = vec![0u8; PATTERN_LEN];
            c.read_at(KILLED_OFFSET, &mut back).expect("read");
            assert!(
                back == pattern(0x3c),
                "the killed borrower's completed write did not read back"
            );
            c.shutdown().expect("shutdown");
            println!("VFIO-READBACK-OK");
        }
        "bench" => bench("borrowed", f.clone()),
        other => panic!("unknown role {other}"),
    }
    drop(f);
    node.give_back(device).expect("returning the device");
}

/// `bench-direct BDF`: the device through VFIO in this process (the baseline).
fn guest_bench_direct(args: &[String]) {
    let [bdf] = args else {
        panic!("usage: bench-direct BDF");
    };
    let bdf: devlend_vfio::Bdf = bdf.parse().expect("a PCI address");
    let sysfs = devlend_vfio::PciSysfs::default();
    let binding = sysfs.bind_vfio(bdf, true).expect("binding to vfio-pci");
    let dir = sysfs.device_dir(bdf).expect("device dir");
    let f = devlend_pci::LocalFunction::new(64 << 20, |_dma, irq| {
        let hw = devlend_vfio::KernelVfio::open(&dir)?;
        devlend_vfio::VfioFunction::new(Arc::new(hw), irq)
            .map(|d| Arc::new(d.with_owner(Box::new(binding))) as Arc<dyn devlend_pci::PciDevice>)
    })
    .expect("opening the device through VFIO");
    println!("VFIO-DIRECT {bdf}: {}", f.describe());
    bench("direct", Arc::new(f));
}

// ---------------------------------------------------------------------------------------------
// On the host
// ---------------------------------------------------------------------------------------------

const SCRIPT: &str = r#"#!/bin/sh
export PATH=/devlend:$PATH
export DEVLEND_LOG=info
fail() { echo "VFIO-FAIL $*"; cat /tmp/lender.log 2>/dev/null | sed 's/^/lender: /'; exit 1; }
for m in $(cat /lib/vfio/order); do insmod /lib/vfio/$m.ko || fail "insmod $m"; done
BDF=
for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/class)" = 0x010802 ] && BDF=$(basename $d)
done
[ -n "$BDF" ] || fail "no NVMe controller"
echo "VFIO-BDF $BDF driver=$(basename $(readlink /sys/bus/pci/devices/$BDF/driver))"
lender() {
    DEVLEND_LOG=info devlend node --name lender --state /tmp/l --fabric shm:/tmp/f --lease-ms 5000 2>>/tmp/lender.log &
    LENDER=$!
    i=0
    until devlend status --state /tmp/l >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -gt 600 ] && fail "lender did not start"; sleep 0.1
    done
    devlend add vfio $BDF --bind --name nvme0 --state /tmp/l || fail "devlend add vfio"
}
# A borrower that writes its pattern, flushes and holds the device (pid in HOLDER), once it
# has written.
holder() {
    vfio-guest borrower /tmp/f nvme0 hold >"$1" 2>&1 &
    HOLDER=$!
    i=0
    until grep -q VFIO-WROTE "$1"; do
        i=$((i + 1)); [ $i -gt 3000 ] && { cat "$1"; fail "the holder never wrote"; }; sleep 0.1
    done
}
lender
echo "VFIO-DRIVER-LENT $(basename $(readlink /sys/bus/pci/devices/$BDF/driver))"
devlend list --state /tmp/l | sed 's/^/VFIO-LIST /'
vfio-guest borrower /tmp/f nvme0 suite || fail "suite borrower"
holder /tmp/hold.log
kill -9 $HOLDER
echo "VFIO-KILLED"
i=0
until grep -q "is back from borrower (lease" /tmp/lender.log; do
    i=$((i + 1)); [ $i -gt 3000 ] && fail "the lease never expired"; sleep 0.1
done
echo "VFIO-EXPIRED $(grep 'is back from borrower (lease' /tmp/lender.log | head -1)"
vfio-guest borrower /tmp/f nvme0 readback || fail "readback borrower"
# Removed while the node runs: the function goes back to its driver at once, and can be
# added again.
devlend remove nvme0 --state /tmp/l || fail "devlend remove"
echo "VFIO-DRIVER-REMOVED $(basename $(readlink /sys/bus/pci/devices/$BDF/driver))"
devlend add vfio $BDF --bind --name nvme0 --state /tmp/l || fail "devlend add vfio after remove"
echo "VFIO-DRIVER-READDED $(basename $(readlink /sys/bus/pci/devices/$BDF/driver))"
# The lender stops while the function is lent: it takes it back and gives it to nvme.
holder /tmp/hold2.log
echo "VFIO-STOPPING-LENT"
kill $LENDER
i=0
# (Running until it exits; a zombie not yet reaped has exited.)
while [ -e /proc/$LENDER ] && ! grep -q ') Z' /proc/$LENDER/stat 2>/dev/null; do
    i=$((i + 1)); [ $i -gt 600 ] && fail "the lender did not stop with its device lent"; sleep 0.1
done
echo "VFIO-DRIVER-STOPPED-LENT $(basename $(readlink /sys/bus/pci/devices/$BDF/driver))"
kill -9 $HOLDER 2>/dev/null
wait $LENDER
echo "VFIO-DRIVER-AFTER $(basename $(readlink /sys/bus/pci/devices/$BDF/driver))"
# Both sides' benchmark processes on vCPU 1: under TCG a thread that moves to the other vCPU
# meets a cold software TLB there, and the borrowed side has more threads (its node's, the
# lender's) to push it over (docs/MEASUREMENTS.md, "Lending a real device (VFIO) in a
# guest": runs 40 to 49).
direct() { taskset -c 1 vfio-guest bench-direct $BDF || fail "direct benchmark"; }
borrowed() {
    lender
    taskset -c 1 vfio-guest borrower /tmp/f nvme0 bench || fail "borrowed benchmark"
    kill $LENDER
    wait $LENDER
}
# Order balanced (direct first, then borrowed first, ...) so that a drift of the host's speed
# within a round does not favour the side that always runs first.
for order in db bd db bd; do
    if [ $order = db ]; then direct; borrowed; else borrowed; direct; fi
done
grep -i "reset failed" /tmp/lender.log && fail "a VFIO reset failed"
sed 's/^/lender: /' /tmp/lender.log | tail -20
sync
echo VFIO-ALL-DONE
"#;

/// The two binaries the guest runs (`devlend`, and this test for the borrower and benchmark
/// roles), built with optimisations: the benchmark row measures what lending costs, not what
/// an unoptimised build costs (a debug build's borrower made the row 3 to 4 times worse under
/// TCG). When this test is itself optimised, itself and its `devlend`; otherwise
/// `cargo build --release -p devlend --test vfio_guest`, whose `devlend` is the same build the
/// README's first command (`cargo run --release`) makes, so CI compiles it once either way.
fn guest_binaries(repo: &Path) -> (PathBuf, PathBuf) {
    if !cfg!(debug_assertions) {
        println!("VFIO-BUILD release (this test)");
        return (
            PathBuf::from(env!("CARGO_BIN_EXE_devlend")),
            std::env::current_exe().unwrap(),
        );
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let t = Instant::now();
    let out = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "devlend",
            "--test",
            "vfio_guest",
        ])
        .arg("--message-format=json-render-diagnostics")
        .current_dir(repo)
        .stderr(Stdio::inherit())
        .output()
        .expect("running cargo build --release");
    assert!(
        out.status.success(),
        "cargo build --release -p devlend --test vfio_guest failed"
    );
    let (mut devlend, mut test) = (None, None);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(exe) = msg.get("executable").and_then(|e| e.as_str()) else {
            continue;
        };
        let target = &msg["target"];
        let kinds = target["kind"].as_array().cloned().unwrap_or_default();
        let is = |k: &str| kinds.iter().any(|v| v == k);
        match target["name"].as_str() {
            Some("devlend") if is("bin") => devlend = Some(PathBuf::from(exe)),
            Some("vfio_guest") if is("test") => test = Some(PathBuf::from(exe)),
            _ => {}
        }
    }
    println!(
        "VFIO-BUILD release (cargo build --release: {:.0} s)",
        t.elapsed().as_secs_f64()
    );
    (
        devlend.expect("cargo reported the release devlend binary"),
        test.expect("cargo reported the release vfio_guest binary"),
    )
}

fn host_test() {
    let start = Instant::now();
    let Some(rig) = guest_lending::HostRig::new("vfio_guest") else {
        return;
    };
    let (devlend_bin, me) = guest_binaries(&rig.repo);
    let (bundle, disk) = rig.bundle(
        &[
            (&devlend_bin, "devlend/devlend"),
            (&me, "devlend/vfio-guest"),
        ],
        SCRIPT,
        DISK_BYTES,
    );
    let mut qemu = rig.qemu(&bundle);
    qemu.arg("-drive")
        .arg(format!("file={},if=none,id=d0,format=raw", disk.display()))
        .args(["-device", "nvme,drive=d0,serial=vfio-guest"]);
    let run = devlend_testkit::guest::bundle::run(qemu, Duration::from_secs(1200))
        .expect("running the guest");
    let console = &run.console;
    let transcript = || run.transcript();
    guest_lending::assert_markers(
        &run,
        &[
            "VFIO-DRIVER-LENT vfio-pci",
            "VFIO-SUITE-OK",
            "VFIO-KILLED",
            "VFIO-EXPIRED",
            "VFIO-READBACK-OK",
            "VFIO-DRIVER-REMOVED nvme",
            "VFIO-DRIVER-READDED vfio-pci",
            "VFIO-DRIVER-STOPPED-LENT nvme",
            "VFIO-DRIVER-AFTER nvme",
            "VFIO-ALL-DONE",
            "DEVLEND-TEST-EXIT 0",
        ],
        "VFIO-FAIL",
    );
    let cases = console
        .iter()
        .filter(|l| l.contains("VFIO-CASE-OK"))
        .count();
    assert_eq!(
        cases,
        devlend_nvme_driver::suite::CASES.len(),
        "every suite case ran"
    );
    let list = console
        .iter()
        .find(|l| l.contains("VFIO-LIST nvme0"))
        .unwrap_or_else(|| panic!("devlend list shows nvme0:\n{}", transcript()));
    assert!(
        list.contains("[1b36:0010] class 010802"),
        "the listing shows the real vendor, device and class: {list}"
    );

    // The bytes the borrowers wrote are in the image behind QEMU's controller.
    guest_lending::assert_on_disk(
        &disk,
        &[
            (SUITE_OFFSET, pattern(0xa5), "the suite borrower"),
            (KILLED_OFFSET, pattern(0x3c), "the killed borrower"),
        ],
    );

    // The benchmark row.
    // The mean over the rounds (order alternating: direct first, then borrowed first), and
    // each round's own ratio, its two sides measured next to each other.
    let figure = |what: &str, qd: usize, key: &str| -> Vec<f64> {
        let prefix = format!("VFIO-BENCH {what} qd{qd} ");
        let values: Vec<f64> = console
            .iter()
            .filter_map(|l| l.split_once(&prefix).map(|(_, r)| r.to_string()))
            .filter_map(|r| {
                r.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
            })
            .filter_map(|v| v.parse().ok())
            .collect();
        assert!(
            values.len() == BENCH_ROUNDS,
            "{BENCH_ROUNDS} rounds of {what} qd{qd} {key}, got {values:?}:\n{}",
            transcript()
        );
        println!("  {what} qd{qd} {key} per round: {values:?}");
        values
    };
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let per_round = |b: &[f64], d: &[f64]| -> String {
        let r: Vec<String> = b
            .iter()
            .zip(d)
            .map(|(b, d)| format!("{:.2}", b / d))
            .collect();
        r.join(", ")
    };
    let (d32, b32) = (figure("direct", 32, "iops"), figure("borrowed", 32, "iops"));
    let (d1, b1) = (
        figure("direct", 1, "median_us"),
        figure("borrowed", 1, "median_us"),
    );
    println!(
        "vfio bench (QEMU nvme in a TCG guest, release build, 4 KiB random read, {BENCH_SECS} s \
         each, mean of {BENCH_ROUNDS} rounds, order alternating):"
    );
    let (r32, r1) = (mean(&b32) / mean(&d32), mean(&b1) / mean(&d1));
    println!(
        "  QD32: borrowed {:.0} IOPS vs direct {:.0} IOPS: ratio {r32:.2} (target >= 0.9: {}; \
         rounds {})",
        mean(&b32),
        mean(&d32),
        r32 >= 0.9,
        per_round(&b32, &d32)
    );
    println!(
        "  QD1 median: borrowed {:.1} us vs direct {:.1} us: ratio {r1:.2} (target <= 1.25: {}; \
         rounds {})",
        mean(&b1),
        mean(&d1),
        r1 <= 1.25,
        per_round(&b1, &d1)
    );
    rig.remove();
    println!(
        "vfio_guest passed in {:.0} s",
        start.elapsed().as_secs_f64()
    );
}
