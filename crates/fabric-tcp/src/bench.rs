//! The tcp rows of `devlend bench fabric`, measured over a veth link between two network
//! namespaces, each beside a raw-TCP baseline between the same namespaces in the same run
//! (interleaved A B A B, medians of the repetitions).
//!
//! - window write bandwidth (posted writes, TLS) vs a raw TCP stream;
//! - non-posted read latency (8 bytes, TLS) vs a raw TCP ping-pong of 8 bytes.
//!
//! Both ends of the raw ping-pong wait the way the fabric does: they poll the socket for the
//! fabric's spin budget ([`devlend_fabric::LinkConfig::spin`]) before they sleep in `poll`.
//! With plain blocking reads the baseline swings between ~4 µs and ~65 µs from run to run on
//! these 2-vCPU machines, depending on whether the two threads share a vCPU (waking an idle
//! vCPU is what costs); like must be compared with like.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devlend_bench::{Figure, Target};
use devlend_fabric::{
    AddressSpace, BusAddr, Link, LinkState, MemoryWindows, PeerWindows, SharedMemory, WindowOffset,
};

use crate::netns::{NetnsError, NetnsPair};
use crate::{keys, Credentials, TcpConfig, TcpNtb, TlsCredentials};

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
const PORT_NTB: u16 = 7511;
const PORT_RAW: u16 = 7512;

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

/// The tcp figures (TLS); `quick` shortens every run.
pub fn figures(quick: bool) -> Result<Vec<Figure>, BenchError> {
    figures_with(quick, true)
}

/// The tcp figures over TLS (`secure`) or plain TCP ([`Credentials::Insecure`], to see what
/// TLS costs).
pub fn figures_with(quick: bool, secure: bool) -> Result<Vec<Figure>, BenchError> {
    let ns = Arc::new(NetnsPair::create()?);
    let dir = std::env::temp_dir().join(format!("devlend-bench-tcp-{}", std::process::id()));
    keys::generate(&dir, &["lender", "borrower"]).map_err(setup)?;
    let creds = |me: &str, peer: &str| -> Result<Credentials, BenchError> {
        Ok(Credentials::Tls(Arc::new(
            TlsCredentials::load(&dir, me, peer).map_err(setup)?,
        )))
    };
    let (lender_creds, borrower_creds) = if secure {
        (creds("lender", "borrower")?, creds("borrower", "lender")?)
    } else {
        (Credentials::Insecure, Credentials::Insecure)
    };
    let suffix = if secure { "" } else { "-insecure" };
    let _ = std::fs::remove_dir_all(&dir);
    let server_ip = ns.addr(0);
    let cfg = TcpConfig::default();

    // Side 0: the lender node (RAM behind window 0) and the raw-TCP baseline server.
    let lender = in_ns(&ns, 0, move || {
        let asp = Arc::new(AddressSpace::new());
        let ram = Arc::new(SharedMemory::new("bench-ram", WINDOW as usize).map_err(setup)?);
        asp.add_ram(BusAddr(RAM_BASE), ram)?;
        let n = TcpNtb::listen(
            SocketAddr::new(server_ip.into(), PORT_NTB),
            asp,
            cfg,
            lender_creds,
        )
        .map_err(setup)?;
        n.mw_set_trans(0, BusAddr(RAM_BASE), WINDOW)?;
        let raw = TcpListener::bind(SocketAddr::new(server_ip.into(), PORT_RAW))?;
        Ok((n, raw))
    })?;
    let (lender, raw_listener) = lender;
    let spin = cfg.link.spin;
    let raw_server = std::thread::spawn(move || raw_server(raw_listener, spin));

    let reps = if quick { 3 } else { 5 };
    let total: usize = if quick { 64 << 20 } else { 256 << 20 };
    let pings = if quick { 2000 } else { 10_000 };
    let result = in_ns(&ns, 1, move || {
        let asp = Arc::new(AddressSpace::new());
        let b = TcpNtb::connect(
            SocketAddr::new(server_ip.into(), PORT_NTB),
            asp,
            cfg,
            borrower_creds,
        )
        .map_err(setup)?;
        b.wait_link(LinkState::Up, Duration::from_secs(10))?;
        let mut raw = TcpStream::connect(SocketAddr::new(server_ip.into(), PORT_RAW))?;
        raw.set_nodelay(true)?;
        let chunk = vec![0xa5u8; CHUNK];
        let (mut bw, mut bw_raw, mut lat, mut lat_raw) = (vec![], vec![], vec![], vec![]);
        for _ in 0..reps {
            bw.push(window_bandwidth(&b, &chunk, total)?);
            bw_raw.push(raw_bandwidth(&mut raw, &chunk, total)?);
            lat.push(read_latency(&b, pings)?);
            lat_raw.push(raw_latency(&mut raw, pings, spin)?);
        }
        raw.write_all(b"q")?;
        Ok(vec![
            Figure::new(format!("tcp-window-write-1MiB{suffix}"), "GB/s", median(bw))
                .against("raw-tcp-stream", median(bw_raw))
                .target(Target::AtLeast(0.8)),
            Figure::new(format!("tcp-read-latency-8B{suffix}"), "us", median(lat))
                .against("raw-tcp-pingpong-8B", median(lat_raw))
                .target(Target::AtMost(1.5)),
        ])
    });
    drop(lender);
    let _ = raw_server.join();
    result
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
fn recv_adaptive(s: &TcpStream, buf: &mut [u8], spin: Duration) -> std::io::Result<usize> {
    let start = Instant::now();
    loop {
        if let Some(n) = crate::session::recv_nonblocking(s, buf)? {
            return Ok(n);
        }
        if start.elapsed() >= spin {
            let mut fd = libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `fd` is a valid pollfd for the whole call.
            unsafe { libc::poll(&mut fd, 1, 1000) };
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
