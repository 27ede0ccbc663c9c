//! `devlend bench fabric`: the emulated NTB measured against the machine's own limits.
//!
//! This process (the "borrower") spawns a peer process (`devlend __fabric-bench-peer`, the
//! "lender") that exports 2 MiB of RAM behind window 0 and a register file behind window 1 on
//! two shm links: one whose waiters always sleep (`spin = 0`) and one that polls first
//! (adaptive, `--poll-spin-us`). Each figure is the median of several repetitions, taken
//! interleaved with its baseline (A B A B) so that machine drift hits both:
//! - window write/read bandwidth (`peer_mw_write`/`peer_mw_read` on RAM) vs `memcpy` of the
//!   same sizes over a same-sized local buffer;
//! - doorbell round trip between the processes vs a raw eventfd ping-pong between the same two
//!   processes;
//! - posted MMIO writes per second and non-posted MMIO read latency through a window vs the
//!   same handler called in-process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::baseline::RawEventFd;
use anyhow::{bail, Context};
use devlend_bench::{median, Figure, Report, Target};
use devlend_fabric::{
    AddressSpace, BusAddr, Doorbells, FabricError, Link, LinkConfig, LinkState, MemoryWindows,
    MmioHandler, PeerWindows, SharedMemory, ShmNtb, WindowOffset,
};

const RAM_BASE: BusAddr = BusAddr(0x1000_0000);
const RAM_BYTES: usize = 2 << 20;
const MMIO_BASE: BusAddr = BusAddr(0x2000_0000);
const MMIO_BYTES: u64 = 0x1000;
const REGS: usize = (MMIO_BYTES / 8) as usize;
const LINK_TIMEOUT: Duration = Duration::from_secs(30);
const WAIT: Duration = Duration::from_secs(10);

/// Arguments.
#[derive(clap::Args)]
pub struct Args {
    /// Print one JSON object (docs/BENCH.md) instead of the table.
    #[arg(long)]
    pub json: bool,
    /// A short run (a few seconds, rougher numbers), for smoke tests.
    #[arg(long)]
    pub quick: bool,
    /// Spin budget of the adaptive (busy-poll) link, in microseconds.
    #[arg(long, default_value_t = 50)]
    pub poll_spin_us: u64,
    /// Skip the tcp rows (they need root: two network namespaces joined by a veth pair).
    #[arg(long)]
    pub no_tcp: bool,
}

/// Arguments of the hidden peer process.
#[derive(clap::Args)]
pub struct PeerArgs {
    /// Rendezvous directory (links in `sleep/` and `poll/` below it).
    #[arg(long)]
    pub dir: PathBuf,
    /// Spin budget of the adaptive link, in microseconds.
    #[arg(long)]
    pub poll_spin_us: u64,
    /// Inherited eventfd the borrower signals.
    #[arg(long)]
    pub ping_fd: i32,
    /// Inherited eventfd the peer answers on.
    #[arg(long)]
    pub pong_fd: i32,
}

/// A device with 512 64-bit registers, the same in both processes.
struct RegisterFile([AtomicU64; REGS]);

impl RegisterFile {
    fn new() -> Self {
        Self(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl MmioHandler for RegisterFile {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        match self.0.get((offset / 8) as usize) {
            Some(r) => {
                let v = r.load(Ordering::Acquire).to_le_bytes();
                for (d, s) in data.iter_mut().zip(v.iter().cycle()) {
                    *d = *s;
                }
            }
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&self, offset: u64, data: &[u8]) {
        if let Some(r) = self.0.get((offset / 8) as usize) {
            let mut v = [0u8; 8];
            for (d, s) in v.iter_mut().zip(data) {
                *d = *s;
            }
            r.store(u64::from_le_bytes(v), Ordering::Release);
        }
    }
}

fn link_config(spin: Duration) -> LinkConfig {
    LinkConfig {
        spin,
        ..LinkConfig::default()
    }
}

fn open_links(
    dir: &Path,
    asp: &Arc<AddressSpace>,
    poll_spin: Duration,
) -> anyhow::Result<[Arc<ShmNtb>; 2]> {
    Ok([
        ShmNtb::open(&dir.join("sleep"), asp.clone(), link_config(Duration::ZERO))?,
        ShmNtb::open(&dir.join("poll"), asp.clone(), link_config(poll_spin))?,
    ])
}

/// Runs the peer side.
pub fn run_peer(args: PeerArgs) -> anyhow::Result<()> {
    // SAFETY: the borrower created these eventfds for us and passed their numbers; nothing
    // else in this process knows or closes them.
    let ping = unsafe { RawEventFd::from_inherited(args.ping_fd) }?;
    // SAFETY: as above.
    let pong = unsafe { RawEventFd::from_inherited(args.pong_fd) }?;
    let asp = Arc::new(AddressSpace::new());
    asp.add_ram(
        RAM_BASE,
        Arc::new(SharedMemory::new("bench-ram", RAM_BYTES)?),
    )?;
    asp.add_mmio(MMIO_BASE, MMIO_BYTES, Arc::new(RegisterFile::new()))?;
    let links = open_links(&args.dir, &asp, Duration::from_micros(args.poll_spin_us))?;
    for l in &links {
        l.mw_set_trans(0, RAM_BASE, RAM_BYTES as u64)?;
        l.mw_set_trans(1, MMIO_BASE, MMIO_BYTES)?;
    }
    std::thread::spawn(
        move || {
            while ping.wait().is_ok() && pong.signal().is_ok() {}
        },
    );
    let responders: Vec<_> = links
        .iter()
        .map(|l| {
            let l = l.clone();
            std::thread::spawn(move || -> anyhow::Result<()> {
                l.wait_link(LinkState::Up, LINK_TIMEOUT)?;
                loop {
                    match l.db_wait(1, WAIT) {
                        Ok(_) => {
                            l.db_clear(1)?;
                            l.peer_db_set(1)?;
                        }
                        Err(FabricError::Timeout) => continue,
                        Err(FabricError::LinkDown) => return Ok(()),
                        Err(e) => return Err(e.into()),
                    }
                }
            })
        })
        .collect();
    for r in responders {
        match r.join() {
            Ok(result) => result?,
            Err(_) => bail!("a doorbell responder panicked"),
        }
    }
    Ok(())
}

struct PeerProcess(Child);

impl Drop for PeerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Seconds taken by `f`.
fn timed(mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed().as_secs_f64())
}

struct Plan {
    reps: usize,
    copy_bytes: usize,
    rtts: usize,
    mmio_writes: usize,
    mmio_reads: usize,
}

/// Progress goes to stderr, never into the table or the JSON.
fn progress(what: &str) {
    eprintln!("bench fabric: {what}");
}

/// Runs the subcommand.
pub fn run(args: Args) -> anyhow::Result<()> {
    let plan = if args.quick {
        Plan {
            reps: 3,
            copy_bytes: 4 << 20,
            rtts: 300,
            mmio_writes: 5_000,
            mmio_reads: 500,
        }
    } else {
        Plan {
            reps: 9,
            copy_bytes: 768 << 20,
            rtts: 10_000,
            mmio_writes: 1_000_000,
            mmio_reads: 40_000,
        }
    };
    let dir = std::env::temp_dir().join(format!("devlend-bench-fabric-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let result = measure(&args, &plan, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result?.emit(args.json);
    Ok(())
}

fn measure(args: &Args, plan: &Plan, dir: &Path) -> anyhow::Result<Report> {
    let poll_spin = Duration::from_micros(args.poll_spin_us);
    let ping = RawEventFd::new_inheritable()?;
    let pong = RawEventFd::new_inheritable()?;
    let asp = Arc::new(AddressSpace::new());
    let links = open_links(dir, &asp, poll_spin)?;
    let exe = std::env::current_exe().context("locating the devlend binary")?;
    let child = Command::new(exe)
        .arg("__fabric-bench-peer")
        .arg("--dir")
        .arg(dir)
        .arg("--poll-spin-us")
        .arg(args.poll_spin_us.to_string())
        .arg("--ping-fd")
        .arg(ping.raw().to_string())
        .arg("--pong-fd")
        .arg(pong.raw().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("spawning the peer process")?;
    let _peer = PeerProcess(child);
    progress("waiting for the peer process to link up");
    for l in &links {
        l.wait_link(LinkState::Up, LINK_TIMEOUT)?;
        let deadline = Instant::now() + LINK_TIMEOUT;
        while l.peer_mw_size(0).is_err() || l.peer_mw_size(1).is_err() {
            if Instant::now() > deadline {
                bail!("the peer never translated its windows");
            }
            std::thread::yield_now();
        }
    }
    let [sleep, poll] = &links;
    let mut report = Report::new("fabric");

    progress("window bandwidth vs memcpy");
    let cases = [
        (4usize << 10, Access::Calls),
        (64 << 10, Access::Calls),
        (1 << 20, Access::Calls),
        (4 << 10, Access::Direct),
    ];
    for (size, access) in cases {
        let (w, r) = bandwidth(sleep, size, plan, access)?;
        let label = match access {
            Access::Calls => size_label(size),
            Access::Direct => format!("{}-direct", size_label(size)),
        };
        report.push(
            Figure::new(format!("window-write-{label}"), "GB/s", w.0)
                .against("memcpy", w.1)
                .target(Target::AtLeast(0.9)),
        );
        report.push(
            Figure::new(format!("window-read-{label}"), "GB/s", r.0)
                .against("memcpy", r.1)
                .target(Target::AtLeast(0.9)),
        );
    }

    progress("doorbell round trips vs eventfd ping-pong");
    let (raw, db_sleep, db_poll) = doorbells(sleep, poll, &ping, &pong, plan)?;
    report.push(
        Figure::new("doorbell-rtt-futex (spin 0)", "us", db_sleep)
            .against("eventfd-pingpong", raw)
            .target(Target::AtMost(1.5)),
    );
    report.push(
        Figure::new(
            format!("doorbell-rtt-busy-poll (spin {}us)", args.poll_spin_us),
            "us",
            db_poll,
        )
        .against("eventfd-pingpong", raw),
    );

    progress("MMIO through a window vs the handler in-process");
    for (name, link) in [
        (format!("spin {}us", args.poll_spin_us), poll),
        ("spin 0".to_string(), sleep),
    ] {
        let (wps, local_wps) = mmio_writes(link, plan)?;
        report.push(
            Figure::new(
                format!("mmio-posted-writes ({name})"),
                "Mwrites/s",
                wps / 1e6,
            )
            .against("in-process-handler", local_wps / 1e6),
        );
        let (lat, local_lat) = mmio_reads(link, plan)?;
        report.push(
            Figure::new(format!("mmio-read-latency ({name})"), "us", lat)
                .against("in-process-handler", local_lat),
        );
    }
    report.notes.push(format!(
        "medians of {} interleaved repetitions; window figures use peer_mw_write/peer_mw_read, \
         -direct ones copy through the span of peer_mw_direct (the shm zero-copy mapping)",
        plan.reps
    ));
    report.notes.push(
        "spin 0: waiters sleep on a futex at once (the doorbell target applies here); busy-poll: \
         waiters poll shared memory, yielding the CPU every few polls, up to the spin budget \
         first: fastest on an idle machine, slower than sleeping when the cores are oversubscribed"
            .into(),
    );
    for l in links {
        drop(l);
    }
    if !args.no_tcp {
        progress("tcp backend over a veth link between two network namespaces");
        match super::bench_fabric_tcp::figures(args.quick) {
            Ok(figures) => report.figures.extend(figures),
            Err(e) => report.notes.push(format!("tcp rows not measured: {e:#}")),
        }
    }
    Ok(report)
}

fn size_label(size: usize) -> String {
    if size >= 1 << 20 {
        format!("{}m", size >> 20)
    } else {
        format!("{}k", size >> 10)
    }
}

type Pair = (f64, f64);

/// (window GB/s, memcpy GB/s) for writes and for reads of `size`-byte transfers.
/// How the window is accessed.
#[derive(Clone, Copy, PartialEq)]
enum Access {
    /// `peer_mw_write` / `peer_mw_read` (the trait's copy calls, every backend).
    Calls,
    /// Loads/stores on the span `peer_mw_direct` returns (shm's zero-copy mapping).
    Direct,
}

fn bandwidth(
    link: &ShmNtb,
    size: usize,
    plan: &Plan,
    access: Access,
) -> anyhow::Result<(Pair, Pair)> {
    let span = link
        .peer_mw_direct(0)?
        .context("the shm backend should map RAM windows directly")?;
    let write = |off: u64, data: &[u8]| -> anyhow::Result<()> {
        match access {
            Access::Calls => link.peer_mw_write(0, WindowOffset(off), data)?,
            Access::Direct => span.write_at(off, data)?,
        }
        Ok(())
    };
    let read = |off: u64, buf: &mut [u8]| -> anyhow::Result<()> {
        match access {
            Access::Calls => link.peer_mw_read(0, WindowOffset(off), buf)?,
            Access::Direct => span.read_at(off, buf)?,
        }
        Ok(())
    };
    let iters = (plan.copy_bytes / size).max(1);
    let slots = RAM_BYTES / size;
    let src = vec![0x5au8; size];
    let mut buf = vec![0u8; size];
    let mut local = vec![0u8; RAM_BYTES];
    let gbs = |secs: f64| (iters * size) as f64 / secs / 1e9;
    let (mut ww, mut wm, mut rw, mut rm) = (vec![], vec![], vec![], vec![]);
    // One untimed pass of each to fault pages in.
    for rep in 0..=plan.reps {
        let win_w = timed(|| {
            for i in 0..iters {
                let off = ((i % slots) * size) as u64;
                write(off, &src)?;
            }
            Ok(())
        })?;
        let mem_w = timed(|| {
            for i in 0..iters {
                let off = (i % slots) * size;
                if let Some(dst) = local.get_mut(off..off + size) {
                    dst.copy_from_slice(std::hint::black_box(&src));
                }
            }
            std::hint::black_box(&local);
            Ok(())
        })?;
        let win_r = timed(|| {
            for i in 0..iters {
                let off = ((i % slots) * size) as u64;
                read(off, &mut buf)?;
                std::hint::black_box(&buf);
            }
            Ok(())
        })?;
        let mem_r = timed(|| {
            for i in 0..iters {
                let off = (i % slots) * size;
                if let Some(s) = local.get(off..off + size) {
                    buf.copy_from_slice(std::hint::black_box(s));
                }
                std::hint::black_box(&buf);
            }
            Ok(())
        })?;
        if rep > 0 {
            ww.push(gbs(win_w));
            wm.push(gbs(mem_w));
            rw.push(gbs(win_r));
            rm.push(gbs(mem_r));
        }
    }
    Ok((
        (median(&mut ww), median(&mut wm)),
        (median(&mut rw), median(&mut rm)),
    ))
}

/// Mean round trip in microseconds: raw eventfd, doorbell on the sleeping link, doorbell on
/// the polling link.
fn doorbells(
    sleep: &ShmNtb,
    poll: &ShmNtb,
    ping: &RawEventFd,
    pong: &RawEventFd,
    plan: &Plan,
) -> anyhow::Result<(f64, f64, f64)> {
    let n = plan.rtts;
    let us = |secs: f64| secs * 1e6 / n as f64;
    let db_rtt = |l: &ShmNtb| {
        timed(|| {
            for _ in 0..n {
                l.peer_db_set(1)?;
                l.db_wait(1, WAIT)?;
                l.db_clear(1)?;
            }
            Ok(())
        })
    };
    let (mut raw, mut s, mut p) = (vec![], vec![], vec![]);
    for rep in 0..=plan.reps {
        let r = timed(|| {
            for _ in 0..n {
                ping.signal()?;
                pong.wait()?;
            }
            Ok(())
        })?;
        let a = db_rtt(sleep)?;
        let b = db_rtt(poll)?;
        if rep > 0 {
            raw.push(us(r));
            s.push(us(a));
            p.push(us(b));
        }
    }
    Ok((median(&mut raw), median(&mut s), median(&mut p)))
}

/// Posted 8-byte MMIO writes per second through the window (flushed by a read), and the same
/// handler called in-process.
fn mmio_writes(link: &ShmNtb, plan: &Plan) -> anyhow::Result<Pair> {
    let n = plan.mmio_writes;
    let local: Arc<dyn MmioHandler> = Arc::new(RegisterFile::new());
    let (mut remote, mut inproc) = (vec![], vec![]);
    for rep in 0..=plan.reps {
        let t = timed(|| {
            for i in 0..n {
                let off = ((i % REGS) * 8) as u64;
                link.peer_mw_write(1, WindowOffset(off), &(i as u64).to_le_bytes())?;
            }
            let mut flush = [0u8; 8];
            link.peer_mw_read(1, WindowOffset(0), &mut flush)?;
            Ok(())
        })?;
        let l = timed(|| {
            for i in 0..n {
                let off = ((i % REGS) * 8) as u64;
                std::hint::black_box(&local).mmio_write(off, &(i as u64).to_le_bytes());
            }
            Ok(())
        })?;
        if rep > 0 {
            remote.push(n as f64 / t);
            inproc.push(n as f64 / l);
        }
    }
    Ok((median(&mut remote), median(&mut inproc)))
}

/// Mean latency in microseconds of an 8-byte non-posted read through the window, and of the
/// same handler called in-process.
fn mmio_reads(link: &ShmNtb, plan: &Plan) -> anyhow::Result<Pair> {
    let n = plan.mmio_reads;
    let local: Arc<dyn MmioHandler> = Arc::new(RegisterFile::new());
    let mut buf = [0u8; 8];
    let (mut remote, mut inproc) = (vec![], vec![]);
    for rep in 0..=plan.reps {
        let t = timed(|| {
            for i in 0..n {
                link.peer_mw_read(1, WindowOffset(((i % REGS) * 8) as u64), &mut buf)?;
            }
            Ok(())
        })?;
        let l = timed(|| {
            for i in 0..n {
                std::hint::black_box(&local).mmio_read(((i % REGS) * 8) as u64, &mut buf);
                std::hint::black_box(&buf);
            }
            Ok(())
        })?;
        if rep > 0 {
            remote.push(t * 1e6 / n as f64);
            inproc.push(l * 1e6 / n as f64);
        }
    }
    Ok((median(&mut remote), median(&mut inproc)))
}
