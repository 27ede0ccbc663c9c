//! The tcp rows of `devlend bench fabric`, measured over a veth link between two network
//! namespaces, each beside a raw-TCP baseline between the same namespaces in the same run
//! (interleaved A B A B, medians of the repetitions).
//!
//! - window write bandwidth (posted writes, TLS) vs a raw TCP stream;
//! - non-posted read latency (8 bytes, TLS) vs a raw TCP ping-pong of 8 bytes.
//!
//! Where the process may use two CPUs, both the fabric and the raw baseline run with one
//! placement rule: the sending side's socket writer on the first CPU, every other thread on
//! the second (see [`devlend_fabric_tcp::cpu`] for why). The bandwidth and latency left to the scheduler are
//! reported as well (`-unpinned`, beside raw TCP left to the scheduler), without a target.
//!
//! Both ends of the raw ping-pong wait the way the fabric does: they poll the socket for the
//! fabric's spin budget ([`devlend_fabric::LinkConfig::spin`]) before they sleep in `poll`.
//! With plain blocking reads the baseline swings between ~4 µs and ~65 µs from run to run on
//! these 2-vCPU machines, depending on whether the two threads share a vCPU (waking an idle
//! vCPU is what costs); like must be compared with like.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devlend_bench::{Figure, Target};
use devlend_fabric::{
    AddressSpace, BusAddr, Link, LinkState, MemoryWindows, PeerWindows, SharedMemory, WindowOffset,
};

use anyhow::Context;
use devlend_fabric_tcp::{cpu, keys, Credentials, TcpConfig, TcpNtb, ThreadCpus, TlsCredentials};
use devlend_testkit::netns::{NetnsError, NetnsPair};

/// Why the benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The namespaces could not be made (the benchmark needs root).
    #[error("the tcp fabric benchmark runs between network namespaces: {0}")]
    Netns(#[from] NetnsError),
    /// Setting up a node failed.
    #[error("setup: {0}")]
    Setup(String),
    /// A fabric call failed during the measurement.
    #[error("fabric: {0}")]
    Fabric(#[from] devlend_fabric::FabricError),
    /// A raw-TCP baseline failed.
    #[error("raw tcp baseline: {0}")]
    Io(#[from] std::io::Error),
}

const RAM_BASE: u64 = 0x1_0000_0000;
const WINDOW: u64 = 16 << 20;
const CHUNK: usize = 1 << 20;
/// First port: each pair uses two (fabric, raw).
const PORT_BASE: u16 = 7511;

fn setup(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(e.to_string())
}

/// Runs `f` on a new thread inside namespace `side` and returns its result.
fn in_ns<T: Send + 'static>(
    ns: &Arc<NetnsPair>,
    side: usize,
    f: impl FnOnce() -> Result<T, BenchError> + Send + 'static,
) -> Result<T, BenchError> {
    let ns = ns.clone();
    std::thread::spawn(move || {
        ns.enter(side)?;
        f()
    })
    .join()
    .map_err(|_| setup("a benchmark thread panicked"))?
}

fn median(mut v: Vec<f64>) -> f64 {
    devlend_bench::median(&mut v)
}

/// The tcp figures (TLS); `quick` shortens every run. Needs root (it creates network
/// namespaces).
pub fn figures(quick: bool) -> anyhow::Result<Vec<Figure>> {
    figures_with(quick, true)
        .context("tcp fabric benchmark (run as root: it creates network namespaces)")
}

/// Where the threads of a measurement run: the thread that writes the sending side's socket
/// on CPU `send`, every other thread on CPU `rest`. Over TLS the socket writer is the fabric's
/// writer thread, and the caller (which seals) goes to `rest` with both readers; over plain
/// TCP the caller writes the socket itself; for raw TCP the sender is the socket writer. The
/// same rule places the fabric and its raw-TCP baseline.
#[derive(Clone, Copy, Debug)]
struct Placement {
    send: usize,
    rest: usize,
}

impl Placement {
    /// The first two CPUs this process may use, if it may use two.
    fn pick() -> Option<Self> {
        let cpus = cpu::allowed().ok()?;
        match cpus.as_slice() {
            [send, rest, ..] => Some(Self {
                send: *send,
                rest: *rest,
            }),
            _ => None,
        }
    }
}

/// One fabric connection and one raw-TCP connection between the namespaces, both placed by
/// `placement` (or left to the scheduler).
struct Pair {
    placement: Option<Placement>,
    lender: TcpNtb,
    borrower: Option<TcpNtb>,
    raw: Option<TcpStream>,
    raw_server: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Pair {
    /// Side 0: the lender node (RAM behind window 0) and the raw-TCP server.
    fn listen(
        ns: &Arc<NetnsPair>,
        port: u16,
        placement: Option<Placement>,
        creds: Credentials,
    ) -> Result<(Self, TcpListener), BenchError> {
        let server_ip = ns.addr(0);
        let mut cfg = TcpConfig::default();
        if let Some(p) = placement {
            cfg.cpus = ThreadCpus {
                writer: Some(p.rest),
                reader: Some(p.rest),
            };
        }
        let (lender, raw) = in_ns(ns, 0, move || {
            let asp = Arc::new(AddressSpace::new());
            let ram = Arc::new(SharedMemory::new("bench-ram", WINDOW as usize).map_err(setup)?);
            asp.add_ram(BusAddr(RAM_BASE), ram)?;
            let n = TcpNtb::listen(SocketAddr::new(server_ip.into(), port), asp, cfg, creds)
                .map_err(setup)?;
            n.mw_set_trans(0, BusAddr(RAM_BASE), WINDOW)?;
            let raw = TcpListener::bind(SocketAddr::new(server_ip.into(), port + 1))?;
            Ok((n, raw))
        })?;
        let pair = Self {
            placement,
            lender,
            borrower: None,
            raw: None,
            raw_server: None,
        };
        Ok((pair, raw))
    }

    /// Side 1 (called on a thread inside namespace 1): connects both.
    fn connect(&mut self, ns: &NetnsPair, port: u16, creds: Credentials) -> Result<(), BenchError> {
        let server = ns.addr(0);
        let mut cfg = TcpConfig::default();
        if let Some(p) = self.placement {
            cfg.cpus = ThreadCpus {
                writer: Some(p.send),
                reader: Some(p.rest),
            };
        }
        let b = TcpNtb::connect(
            SocketAddr::new(server.into(), port),
            Arc::new(AddressSpace::new()),
            cfg,
            creds,
        )
        .map_err(setup)?;
        b.wait_link(LinkState::Up, Duration::from_secs(10))?;
        let raw = TcpStream::connect(SocketAddr::new(server.into(), port + 1))?;
        raw.set_nodelay(true)?;
        self.borrower = Some(b);
        self.raw = Some(raw);
        Ok(())
    }
}

/// Pins the calling thread to the CPU `pick` chooses of `placement`, or to every CPU in `all`
/// when there is no placement.
fn pin_caller(
    placement: Option<Placement>,
    all: &[usize],
    pick: impl Fn(Placement) -> usize,
) -> std::io::Result<()> {
    match placement {
        Some(p) => cpu::pin(&[pick(p)]),
        None => cpu::pin(all),
    }
}

/// The tcp figures over TLS (`secure`) or plain TCP ([`Credentials::Insecure`], to see what
/// TLS costs).
///
/// The figures with targets are measured with one thread placement (module docs) when the
/// process may use two CPUs: on a two-CPU machine the scheduler otherwise often wakes the
/// sealing caller on the CPU of the socket writer (see [`devlend_fabric_tcp::cpu`]). The same figures left
/// to the scheduler are reported too, as `-unpinned`, beside raw TCP left to the scheduler.
fn figures_with(quick: bool, secure: bool) -> Result<Vec<Figure>, BenchError> {
    let ns = Arc::new(NetnsPair::create()?);
    let dir = std::env::temp_dir().join(format!("devlend-bench-tcp-{}", std::process::id()));
    keys::generate(&dir, &["lender", "borrower"]).map_err(setup)?;
    let creds = |me: &str, peer: &str| -> Result<Credentials, BenchError> {
        if !secure {
            return Ok(Credentials::Insecure);
        }
        Ok(Credentials::Tls(Arc::new(
            TlsCredentials::load(&dir, me, peer).map_err(setup)?,
        )))
    };
    let suffix = if secure { "" } else { "-insecure" };
    let placement = Placement::pick();
    let spin = TcpConfig::default().link.spin;

    // The measured pair (placed when possible), and an unplaced one for comparison.
    let mut pairs = Vec::new();
    let mut plans = vec![placement];
    if placement.is_some() {
        plans.push(None);
    }
    for (i, plan) in plans.into_iter().enumerate() {
        let port = PORT_BASE + 2 * i as u16;
        let (mut pair, raw) = Pair::listen(&ns, port, plan, creds("lender", "borrower")?)?;
        pair.raw_server = Some(std::thread::spawn(move || {
            if let Some(p) = plan {
                cpu::pin(&[p.rest])?;
            }
            raw_server(raw, spin)
        }));
        pairs.push((pair, port, creds("borrower", "lender")?));
    }
    let _ = std::fs::remove_dir_all(&dir);

    let reps = if quick { 3 } else { 5 };
    let total: usize = if quick { 64 << 20 } else { 256 << 20 };
    let pings = if quick { 2000 } else { 10_000 };
    let ns1 = ns.clone();
    let result = std::thread::spawn(move || -> Result<_, BenchError> {
        ns1.enter(1)?;
        let all = cpu::allowed()?;
        for (pair, port, creds) in pairs.iter_mut() {
            pair.connect(&ns1, *port, creds.clone())?;
        }
        let chunk = vec![0xa5u8; CHUNK];
        let mut runs = vec![Runs::default(); pairs.len()];
        for _ in 0..reps {
            for ((pair, _, _), r) in pairs.iter_mut().zip(runs.iter_mut()) {
                let plan = pair.placement;
                let (Some(b), Some(raw)) = (&pair.borrower, &mut pair.raw) else {
                    return Err(setup("a pair did not connect"));
                };
                // Over TLS the caller seals and the writer thread sends: the caller goes with
                // the receiver's threads. Over plain TCP the caller sends bulk writes itself.
                pin_caller(plan, &all, |p| if secure { p.rest } else { p.send })?;
                r.bw.push(window_bandwidth(b, &chunk, total)?);
                // The raw sender is its own socket writer; the requester of both ping-pongs
                // stays there too, its peers (the lender's reader, the raw server) on `rest`.
                pin_caller(plan, &all, |p| p.send)?;
                r.bw_raw.push(raw_bandwidth(raw, &chunk, total)?);
                r.lat.push(read_latency(b, pings)?);
                r.lat_raw.push(raw_latency(raw, pings, spin)?);
            }
        }
        for (pair, _, _) in pairs.iter_mut() {
            if let Some(raw) = &mut pair.raw {
                raw.write_all(b"q")?;
            }
        }
        cpu::pin(&all)?;
        let mut figs = Vec::new();
        let mut runs = runs.into_iter();
        if let Some(r) = runs.next() {
            figs.push(
                Figure::new(
                    format!("tcp-window-write-1MiB{suffix}"),
                    "GB/s",
                    median(r.bw),
                )
                .against("raw-tcp-stream", median(r.bw_raw))
                .target(Target::AtLeast(0.8)),
            );
            figs.push(
                Figure::new(format!("tcp-read-latency-8B{suffix}"), "us", median(r.lat))
                    .against("raw-tcp-pingpong-8B", median(r.lat_raw))
                    .target(Target::AtMost(1.5)),
            );
        }
        if let Some(r) = runs.next() {
            figs.push(
                Figure::new(
                    format!("tcp-window-write-1MiB-unpinned{suffix}"),
                    "GB/s",
                    median(r.bw),
                )
                .against("raw-tcp-stream-unpinned", median(r.bw_raw)),
            );
            figs.push(
                Figure::new(
                    format!("tcp-read-latency-8B-unpinned{suffix}"),
                    "us",
                    median(r.lat),
                )
                .against("raw-tcp-pingpong-8B-unpinned", median(r.lat_raw)),
            );
        }
        Ok((figs, pairs))
    })
    .join()
    .map_err(|_| setup("a benchmark thread panicked"))?;
    let (figs, pairs) = result?;
    for (mut pair, _, _) in pairs {
        drop(pair.borrower.take());
        drop(pair.raw.take());
        drop(pair.lender);
        if let Some(h) = pair.raw_server.take() {
            let _ = h.join();
        }
    }
    Ok(figs)
}

/// The samples of one pair.
#[derive(Clone, Default)]
struct Runs {
    bw: Vec<f64>,
    bw_raw: Vec<f64>,
    lat: Vec<f64>,
    lat_raw: Vec<f64>,
}

fn window_bandwidth(b: &TcpNtb, chunk: &[u8], total: usize) -> Result<f64, BenchError> {
    let start = Instant::now();
    let mut off = 0u64;
    let mut sent = 0usize;
    while sent < total {
        b.peer_mw_write(0, WindowOffset(off), chunk)?;
        sent += chunk.len();
        off = (off + chunk.len() as u64) % WINDOW;
    }
    // The read cannot pass the writes: when it returns, every byte has landed.
    b.peer_mw_read(0, WindowOffset(0), &mut [0u8; 8])?;
    Ok(total as f64 / start.elapsed().as_secs_f64() / 1e9)
}

fn read_latency(b: &TcpNtb, n: usize) -> Result<f64, BenchError> {
    let mut samples = Vec::with_capacity(n);
    let mut buf = [0u8; 8];
    for i in 0..n {
        let t = Instant::now();
        b.peer_mw_read(0, WindowOffset((i as u64 * 64) % WINDOW), &mut buf)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(samples))
}

/// Reads what `s` holds into `buf`, polling for up to `spin` before sleeping until readable
/// (the fabric's adaptive wait). `Ok(0)` at end of stream.
/// What the socket holds, without blocking: `None` when it holds nothing yet.
fn recv_nonblocking(s: &TcpStream, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    loop {
        match rustix::net::recv(s, &mut *buf, rustix::net::RecvFlags::DONTWAIT) {
            Ok((n, _)) => return Ok(Some(n)),
            Err(rustix::io::Errno::INTR) => continue,
            Err(rustix::io::Errno::AGAIN) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

pub(crate) fn recv_adaptive(
    s: &TcpStream,
    buf: &mut [u8],
    spin: Duration,
) -> std::io::Result<usize> {
    let start = Instant::now();
    loop {
        if let Some(n) = recv_nonblocking(s, buf)? {
            return Ok(n);
        }
        if start.elapsed() >= spin {
            let second = rustix::event::Timespec {
                tv_sec: 1,
                tv_nsec: 0,
            };
            let _ = rustix::event::poll(
                &mut [rustix::event::PollFd::new(s, rustix::event::PollFlags::IN)],
                Some(&second),
            );
        }
    }
}

/// Fills `buf` with [`recv_adaptive`].
fn read_exact_adaptive(s: &TcpStream, buf: &mut [u8], spin: Duration) -> std::io::Result<()> {
    let mut have = 0;
    while have < buf.len() {
        match recv_adaptive(s, buf.get_mut(have..).unwrap_or_default(), spin)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => have += n,
        }
    }
    Ok(())
}

/// Raw protocol: b's' + u64 length, then the bytes, answered by one byte; b'p' + 8 bytes,
/// answered by the same 8 bytes; b'q' ends.
fn raw_server(listener: TcpListener, spin: Duration) -> std::io::Result<()> {
    let (mut s, _) = listener.accept()?;
    s.set_nodelay(true)?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut op = [0u8; 1];
        if recv_adaptive(&s, &mut op, spin)? == 0 {
            return Ok(());
        }
        match op {
            [b's'] => {
                let mut len = [0u8; 8];
                s.read_exact(&mut len)?;
                let mut left = u64::from_le_bytes(len) as usize;
                while left > 0 {
                    let want = left.min(buf.len());
                    let n = s.read(buf.get_mut(..want).unwrap_or_default())?;
                    if n == 0 {
                        return Ok(());
                    }
                    left -= n;
                }
                s.write_all(&[1])?;
            }
            [b'p'] => {
                let mut v = [0u8; 8];
                read_exact_adaptive(&s, &mut v, spin)?;
                s.write_all(&v)?;
            }
            _ => return Ok(()),
        }
    }
}

fn raw_bandwidth(s: &mut TcpStream, chunk: &[u8], total: usize) -> Result<f64, BenchError> {
    let start = Instant::now();
    s.write_all(b"s")?;
    s.write_all(&(total as u64).to_le_bytes())?;
    let mut sent = 0;
    while sent < total {
        s.write_all(chunk)?;
        sent += chunk.len();
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack)?;
    Ok(total as f64 / start.elapsed().as_secs_f64() / 1e9)
}

fn raw_latency(s: &mut TcpStream, n: usize, spin: Duration) -> Result<f64, BenchError> {
    let mut samples = Vec::with_capacity(n);
    let mut v = [0u8; 9];
    v[0] = b'p';
    let mut back = [0u8; 8];
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&v)?;
        read_exact_adaptive(s, &mut back, spin)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median(samples))
}
