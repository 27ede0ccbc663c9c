//! The raw baselines of the tcp rows of `devlend bench lending`: plain request/response over
//! one TLS 1.3 connection (rustls, with the fabric's own TLS configuration and keys) on the
//! same link as the fabric, with no device, no NTB and no NVMe in between.
//!
//! - [`RawTlsClient::rpc_pipeline`]: a request of `req` bytes answered with `reply` bytes (64
//!   answered with 4 KiB is what a 4 KiB read must move at least; 4 KiB answered with 16 is a
//!   4 KiB write), with `depth` requests outstanding;
//! - [`RawTlsClient::stream_to_server`] / [`RawTlsClient::stream_from_server`]: bulk bytes.
//!
//! Both ends wait the way the fabric does: they poll the socket for the fabric's spin budget
//! ([`devlend_fabric::LinkConfig::spin`]) before they sleep in `poll`
//! ([`crate::cmd::bench_fabric_tcp`] explains why like must be compared with like). Threads are
//! left to the scheduler, as the fabric's are in `bench lending`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devlend_fabric_tcp::TlsCredentials;

use crate::cmd::bench_fabric_tcp::recv_adaptive;

/// Request header: operation, `a`, `b` (little-endian u64 each).
const HEADER: usize = 24;
const OP_QUIT: u64 = 0;
/// A request of `a` bytes in all (header included), answered with `b` bytes.
const OP_RPC: u64 = 1;
/// `a` bytes follow the header; answered with one byte once all arrived.
const OP_SINK: u64 = 2;
/// The server sends `a` bytes, in writes of `b` bytes.
const OP_SOURCE: u64 = 3;
/// Largest write of the stream operations.
const MAX_CHUNK: usize = 1 << 20;

/// Bytes received from the socket and not yet given to `rustls`: the socket is read in large
/// pieces (rustls alone reads at most a few KiB per call), adaptively (spin, then sleep until
/// readable).
struct InBuf {
    buf: Vec<u8>,
    at: usize,
    len: usize,
}

/// [`InBuf`] refilled from `sock` as `rustls` reads it.
struct Adaptive<'a> {
    sock: &'a TcpStream,
    spin: Duration,
    inb: &'a mut InBuf,
}

impl Read for Adaptive<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.inb.at >= self.inb.len {
            self.inb.at = 0;
            self.inb.len = recv_adaptive(self.sock, &mut self.inb.buf, self.spin)?;
        }
        let have = self
            .inb
            .buf
            .get(self.inb.at..self.inb.len)
            .unwrap_or_default();
        let n = have.len().min(out.len());
        if let (Some(o), Some(h)) = (out.get_mut(..n), have.get(..n)) {
            o.copy_from_slice(h);
        }
        self.inb.at += n;
        Ok(n)
    }
}

/// One end of a TLS connection, blocking, with adaptive reads.
struct Conn<C> {
    tls: C,
    sock: TcpStream,
    spin: Duration,
    inb: InBuf,
}

impl<C, S> Conn<C>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<S>>,
    S: rustls::SideData,
{
    fn new(mut tls: C, mut sock: TcpStream, spin: Duration) -> std::io::Result<Self> {
        sock.set_nodelay(true)?;
        // Whole messages are queued before they are flushed: no limit on what may wait.
        tls.set_buffer_limit(None);
        while tls.is_handshaking() {
            tls.complete_io(&mut sock)?;
        }
        let inb = InBuf {
            buf: vec![0u8; 256 << 10],
            at: 0,
            len: 0,
        };
        Ok(Self {
            tls,
            sock,
            spin,
            inb,
        })
    }

    /// Queues `data` (sealed into records; sent by the next [`Conn::flush`]).
    fn queue(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.tls.writer().write_all(data)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        while self.tls.wants_write() {
            self.tls.write_tls(&mut self.sock)?;
        }
        Ok(())
    }

    fn send(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.queue(data)?;
        self.flush()
    }

    /// Fills `buf`.
    fn recv_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        let mut have = 0;
        while have < buf.len() {
            match self
                .tls
                .reader()
                .read(buf.get_mut(have..).unwrap_or_default())
            {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => have += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let mut r = Adaptive {
                        sock: &self.sock,
                        spin: self.spin,
                        inb: &mut self.inb,
                    };
                    if self.tls.read_tls(&mut r)? == 0 {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    self.tls
                        .process_new_packets()
                        .map_err(std::io::Error::other)?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn header(op: u64, a: u64, b: u64) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    for (i, v) in [op, a, b].into_iter().enumerate() {
        if let Some(d) = h.get_mut(i * 8..i * 8 + 8) {
            d.copy_from_slice(&v.to_le_bytes());
        }
    }
    h
}

fn parse(h: &[u8; HEADER]) -> (u64, u64, u64) {
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(h.get(i * 8..i * 8 + 8).unwrap_or(&[0u8; 8]));
        u64::from_le_bytes(w)
    };
    (word(0), word(1), word(2))
}

/// The server end: answers requests until told to quit or the connection ends.
pub struct RawTlsServer {
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl RawTlsServer {
    /// Serves one connection accepted on `listener` (created in the server's network
    /// namespace) with `creds` (this side's, expecting the client's name).
    pub fn start(
        listener: TcpListener,
        creds: Arc<TlsCredentials>,
        spin: Duration,
    ) -> std::io::Result<Self> {
        let thread = std::thread::Builder::new()
            .name("raw-tls-server".into())
            .spawn(move || -> std::io::Result<()> {
                let (sock, _) = listener.accept()?;
                let tls = creds.rustls_server().map_err(std::io::Error::other)?;
                serve(Conn::new(tls, sock, spin)?)
            })?;
        Ok(Self {
            thread: Some(thread),
        })
    }

    /// Waits for the server to end (after [`RawTlsClient::quit`]).
    pub fn join(mut self) -> anyhow::Result<()> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => Ok(r?),
            Some(Err(_)) => anyhow::bail!("the raw TLS server panicked"),
            None => Ok(()),
        }
    }
}

fn serve(mut c: Conn<rustls::ServerConnection>) -> std::io::Result<()> {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let mut h = [0u8; HEADER];
        match c.recv_exact(&mut h) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            r => r?,
        }
        let (op, a, b) = parse(&h);
        let (a, b) = (a as usize, b as usize);
        match op {
            OP_RPC if (HEADER..=MAX_CHUNK).contains(&a) && b <= MAX_CHUNK => {
                c.recv_exact(buf.get_mut(..a - HEADER).unwrap_or_default())?;
                c.send(buf.get(..b).unwrap_or_default())?;
            }
            OP_SINK => {
                let mut left = a;
                while left > 0 {
                    let n = left.min(MAX_CHUNK);
                    c.recv_exact(buf.get_mut(..n).unwrap_or_default())?;
                    left -= n;
                }
                c.send(&[1])?;
            }
            OP_SOURCE if (1..=MAX_CHUNK).contains(&b) => {
                let mut left = a;
                while left > 0 {
                    let n = left.min(b);
                    c.send(buf.get(..n).unwrap_or_default())?;
                    left -= n;
                }
            }
            _ => return Ok(()),
        }
    }
}

/// Latencies of a run, in microseconds, and its rate.
#[derive(Clone, Debug)]
pub struct RpcStats {
    /// Median latency.
    pub median_us: f64,
    /// 99th percentile latency.
    pub p99_us: f64,
    /// Completed requests per second.
    pub per_sec: f64,
    /// Completed requests.
    pub ops: usize,
}

/// The client end.
pub struct RawTlsClient {
    c: Conn<rustls::ClientConnection>,
}

impl RawTlsClient {
    /// Connects `sock` (already connected to the server) with `creds` (this side's).
    pub fn connect(
        sock: TcpStream,
        creds: &TlsCredentials,
        spin: Duration,
    ) -> anyhow::Result<Self> {
        let tls = creds.rustls_client()?;
        Ok(Self {
            c: Conn::new(tls, sock, spin)?,
        })
    }

    fn request(req: usize, reply: usize) -> anyhow::Result<Vec<u8>> {
        anyhow::ensure!(
            (HEADER..=MAX_CHUNK).contains(&req) && reply <= MAX_CHUNK,
            "request of {req} bytes answered with {reply}: out of range"
        );
        let mut r = vec![0x5au8; req];
        if let Some(h) = r.get_mut(..HEADER) {
            h.copy_from_slice(&header(OP_RPC, req as u64, reply as u64));
        }
        Ok(r)
    }

    /// Requests of `req` bytes (at least 24) answered with `reply` bytes, `depth` of them
    /// outstanding, for `secs`: a new request goes out as each answer arrives.
    pub fn rpc_pipeline(
        &mut self,
        req: usize,
        reply: usize,
        depth: usize,
        secs: f64,
    ) -> anyhow::Result<RpcStats> {
        let r = Self::request(req, reply)?;
        let mut back = vec![0u8; reply];
        let mut sent = std::collections::VecDeque::with_capacity(depth);
        let mut lat = Vec::new();
        let run = Duration::from_secs_f64(secs);
        let begin = Instant::now();
        for _ in 0..depth.max(1) {
            sent.push_back(Instant::now());
            self.c.send(&r)?;
        }
        while let Some(t) = sent.pop_front() {
            self.c.recv_exact(&mut back)?;
            let now = Instant::now();
            lat.push(devlend_bench::micros(now.duration_since(t)));
            if begin.elapsed() < run {
                sent.push_back(now);
                self.c.send(&r)?;
            }
        }
        let elapsed = begin.elapsed().as_secs_f64();
        let per_sec = lat.len() as f64 / elapsed;
        Ok(RpcStats {
            median_us: devlend_bench::median(&mut lat),
            p99_us: devlend_bench::percentile(&mut lat, 99.0),
            per_sec,
            ops: lat.len(),
        })
    }

    /// Sends `total` bytes in writes of `chunk`; returns bytes per second (until the server
    /// acknowledged the last byte).
    pub fn stream_to_server(&mut self, total: usize, chunk: usize) -> anyhow::Result<f64> {
        anyhow::ensure!((1..=MAX_CHUNK).contains(&chunk), "chunk of {chunk} bytes");
        let data = vec![0xa5u8; chunk];
        let begin = Instant::now();
        self.c.send(&header(OP_SINK, total as u64, 0))?;
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk);
            self.c.send(data.get(..n).unwrap_or_default())?;
            left -= n;
        }
        let mut ack = [0u8; 1];
        self.c.recv_exact(&mut ack)?;
        Ok(total as f64 / begin.elapsed().as_secs_f64())
    }

    /// Receives `total` bytes the server sends in writes of `chunk`; returns bytes per second.
    pub fn stream_from_server(&mut self, total: usize, chunk: usize) -> anyhow::Result<f64> {
        anyhow::ensure!((1..=MAX_CHUNK).contains(&chunk), "chunk of {chunk} bytes");
        let mut buf = vec![0u8; chunk];
        let begin = Instant::now();
        self.c
            .send(&header(OP_SOURCE, total as u64, chunk as u64))?;
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk);
            self.c.recv_exact(buf.get_mut(..n).unwrap_or_default())?;
            left -= n;
        }
        Ok(total as f64 / begin.elapsed().as_secs_f64())
    }

    /// Ends the server.
    pub fn quit(mut self) -> anyhow::Result<()> {
        self.c.send(&header(OP_QUIT, 0, 0))?;
        self.c.tls.send_close_notify();
        self.c.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_answered_with_the_sizes_asked() {
        let dir = std::env::temp_dir().join(format!("devlend-raw-tls-{}", std::process::id()));
        devlend_fabric_tcp::keys::generate(&dir, &["lender", "borrower"]).unwrap();
        let server = Arc::new(TlsCredentials::load(&dir, "lender", "borrower").unwrap());
        let client = TlsCredentials::load(&dir, "borrower", "lender").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let spin = Duration::from_micros(10);
        let srv = RawTlsServer::start(l, server, spin).unwrap();
        let mut c =
            RawTlsClient::connect(TcpStream::connect(addr).unwrap(), &client, spin).unwrap();
        // A run of no time completes what it started: one request, or `depth`.
        let s = c.rpc_pipeline(64, 4096, 1, 0.0).unwrap();
        assert_eq!(s.ops, 1);
        let s = c.rpc_pipeline(4096, 16, 4, 0.0).unwrap();
        assert_eq!(s.ops, 4);
        // Answers of the sizes asked: a wrong size would leave the stream out of step.
        let s = c.rpc_pipeline(64, 4096, 32, 0.0).unwrap();
        assert_eq!(s.ops, 32);
        assert!(c.stream_to_server(3 << 20, 128 << 10).unwrap() > 0.0);
        assert!(c.stream_from_server((1 << 20) + 5, 128 << 10).unwrap() > 0.0);
        assert!(RawTlsClient::request(8, 16).is_err());
        c.quit().unwrap();
        srv.join().unwrap();
    }
}
