//! One connection. Its state ([`Connection`]) is shared by four kinds of thread: the supervisor's
//! reader thread, the writer thread, the service thread, and the callers of
//! [`crate::TcpNtb`]. The work is split by job:
//!
//! - [`establish`]: connecting or accepting, the TLS handshake (or the explicit insecure
//!   preamble), starting a connection's threads, the supervisor that reconnects with back-off.
//! - [`handoff`]: who reads the socket — the reader thread, or a caller waiting for its reply
//!   — and how the socket passes between them without a lost wake-up.
//! - [`recv`]: what a reader does with the socket: open records, cut the bytes into frames,
//!   dispatch each frame (the peer's requests to the service thread or applied at once,
//!   replies to their waiting callers).
//! - [`send`]: moving queued frames to the socket: the send lock, the sealing of TLS records
//!   (a bulk writer seals while the writer thread sends), the writer thread.
//! - [`pending`]: this side's requests waiting for replies (tags, and the callers waiting for a
//!   free one) and the credit of the peer's requests.

mod establish;
mod handoff;
mod pending;
mod recv;
mod send;

use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::frame::{self, FrameError, Status};
use crate::queue::{InQueue, OutQueue};
use crate::record::{Opener, RecordError, Sealer, MAX_RECORD};
use crate::watch::Watch;
use devlend_sync::lock;
use rustix::event::{eventfd, EventfdFlags};

pub(crate) use establish::{supervise, Mode};
use handoff::Handoff;
pub(crate) use handoff::Lead;
pub(crate) use pending::take_credit;
use pending::{Inflight, Tags};
use recv::{NetBuf, RxState};
pub(crate) use send::Flush;
use send::{Sealed, SendState};

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EndError {
    /// Nothing arrived for the keepalive timeout.
    #[error("the peer stopped answering (keepalive timeout)")]
    Silent,
    /// A socket error.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// TLS failed (bad record, alert from the peer).
    #[error("TLS: {0}")]
    Tls(#[from] RecordError),
    /// Bad bytes from the peer.
    #[error("bad frame: {0}")]
    Frame(#[from] FrameError),
    /// Valid frames in an invalid order or with invalid values.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// This side closed the connection.
    #[error("closed by this side")]
    Closed,
}

/// A request of the peer, owned, for the service thread.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Inbound {
    Write {
        window: u16,
        offset: u64,
        data: Vec<u8>,
    },
    Read {
        tag: u32,
        window: u16,
        offset: u64,
        len: u32,
    },
    DbSet(u64),
    SpadWrite {
        index: u16,
        value: u32,
    },
    SpadRead {
        tag: u32,
        index: u16,
    },
    MsgWrite {
        tag: u32,
        index: u16,
        value: u32,
    },
}

/// What the peer announced in its hello, kept up to date by its translation frames.
#[derive(Clone, Debug, Default)]
pub(crate) struct PeerResources {
    pub(crate) spad_count: usize,
    pub(crate) msg_count: usize,
    pub(crate) db_valid_mask: u64,
    pub(crate) window_sizes: Vec<u64>,
}

/// A completion of one of this side's requests.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: Status,
    pub(crate) data: Vec<u8>,
}

/// The state of one connection, shared by its threads and by callers.
pub(crate) struct Connection {
    pub(crate) out: OutQueue,
    pub(crate) inq: InQueue<Inbound>,
    pub(crate) peer: Mutex<PeerResources>,
    up: AtomicBool,
    closed: AtomicBool,
    /// This side's requests waiting for their replies.
    tags: Tags,
    /// Peer requests received but not yet answered.
    inflight: Inflight,
    sock: TcpStream,
    chan: Channel,
    /// Held by whoever moves queued frames to the socket; keeps TLS records in order.
    send: Mutex<SendState>,
    /// TLS: records sealed in order, waiting for the holder of `send` (a bulk writer seals
    /// while the writer thread sends: two cores share the work).
    sealed: Mutex<Sealed>,
    sealed_space: Condvar,
    /// The receive buffers, held by whoever reads the socket: the reader thread, or a caller
    /// waiting for its reply (so that the reply wakes the caller directly, not through the
    /// reader thread); with the reader thread's watch of the socket (see [`handoff`]).
    rx: Handoff<RxState, Watch>,
    /// How long a reader keeps polling the socket before it sleeps (adaptive polling: a
    /// reply or the peer's next request usually comes within it, and a wake-up costs more).
    spin: Duration,
    /// Signalled to make a caller that reads the socket check what it waits for now, when
    /// that comes from this process rather than from the socket
    /// ([`Connection::interrupt_reading`]).
    lead_wake: OwnedFd,
    /// When bytes last arrived (for the keepalive timeout).
    last_rx: Mutex<Instant>,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
}

impl Connection {
    fn new(sock: TcpStream, mut chan: Channel, cfg: &crate::TcpConfig) -> std::io::Result<Self> {
        let early = chan.early.take();
        let (send_limit, service_limit) = (cfg.send_queue_bytes, cfg.service_queue_bytes);
        let watch = Watch::new(&sock)?;
        let lead_wake = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Self {
            out: OutQueue::new(send_limit),
            inq: InQueue::new(service_limit),
            peer: Mutex::new(PeerResources::default()),
            up: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            tags: Tags::new(),
            inflight: Inflight::new(),
            sock,
            chan,
            send: Mutex::new(SendState::default()),
            sealed: Mutex::new(Sealed::default()),
            sealed_space: Condvar::new(),
            rx: Handoff::new(
                RxState {
                    rx: Vec::with_capacity(4 * frame::MAX_PAYLOAD),
                    net: NetBuf {
                        buf: vec![0u8; 256 * 1024 + MAX_RECORD],
                        len: 0,
                    },
                    hello: false,
                    early,
                },
                watch,
            ),
            spin: cfg.link.spin,
            lead_wake,
            last_rx: Mutex::new(Instant::now()),
            keepalive_interval: cfg.keepalive_interval,
            keepalive_timeout: cfg.keepalive_timeout,
        })
    }

    /// Makes the caller reading the socket, if one does, check what it waits for at once
    /// instead of at the next data: for a wait whose end comes from this process (a device
    /// woken by one of its own threads) rather than over the link. A stale signal costs the
    /// next reader one extra check.
    pub(crate) fn interrupt_reading(&self) {
        // A full counter (EAGAIN) still wakes the reader.
        let _ = rustix::io::write(&self.lead_wake, &1u64.to_ne_bytes());
    }

    fn silent_too_long(&self) -> bool {
        lock(&self.last_rx).elapsed() > self.keepalive_timeout
    }

    /// Whether callers may use the connection.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire) && !self.closed.load(Ordering::Acquire)
    }

    pub(crate) fn mark_up(&self) {
        self.up.store(true, Ordering::Release);
    }

    /// Ends the connection; returns whether this call did it (and whether it had been up).
    pub(crate) fn close(&self) -> Option<bool> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return None;
        }
        self.out.close();
        self.inq.close();
        // Wakes every waiting caller with "disconnected", and those waiting for a tag.
        self.tags.close();
        self.sealed_space.notify_all();
        // Wakes the reader thread (the watch reports the hang-up) and any caller reading.
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        Some(self.up.load(Ordering::Acquire))
    }
}

/// The byte channel of a connection: the TLS record layer's two directions, or nothing for
/// plain TCP.
pub(crate) struct Channel {
    tls: Option<Tls>,
    /// What arrived with the end of the handshake: plaintext, then the start of the records
    /// that follow (moved to the receive state when the session starts).
    early: Option<(Vec<u8>, Vec<u8>)>,
}

struct Tls {
    sealer: Mutex<Sealer>,
    opener: Mutex<Opener>,
}

impl Channel {
    fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    fn plain() -> Self {
        Self {
            tls: None,
            early: None,
        }
    }
}

/// Runs a non-blocking socket call (`MSG_DONTWAIT`) until it is not interrupted: `None` when
/// it would have blocked.
fn nonblocking(mut call: impl FnMut() -> libc::ssize_t) -> std::io::Result<Option<usize>> {
    loop {
        let n = call();
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => return Ok(None),
            _ => return Err(e),
        }
    }
}

/// Helpers of the modules' tests: a plain session over a loopback connection.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::{TcpListener, TcpStream};

    use super::{Channel, Connection};

    /// A plain-TCP session on one end of a loopback connection, and the other end (the
    /// "peer", a bare socket).
    pub(crate) fn plain_session() -> (Connection, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (sock, _) = l.accept().unwrap();
        let cfg = crate::TcpConfig::default();
        (Connection::new(sock, Channel::plain(), &cfg).unwrap(), peer)
    }

    /// Two sessions joined by TLS over loopback: (client, server).
    pub(super) fn tls_sessions() -> (Connection, Connection) {
        let dir = std::env::temp_dir().join(format!(
            "devlend-session-tls-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        crate::keys::generate(&dir, &["lender", "borrower"]).unwrap();
        let load = |me, peer| {
            crate::Credentials::Tls(std::sync::Arc::new(
                crate::TlsCredentials::load(&dir, me, peer).unwrap(),
            ))
        };
        let (server, client) = (load("lender", "borrower"), load("borrower", "lender"));
        std::fs::remove_dir_all(&dir).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let chan = super::establish::establish(&server, &s, super::establish::Role::Server);
            (s, chan.unwrap())
        });
        let c = TcpStream::connect(addr).unwrap();
        let chan = super::establish::establish(&client, &c, super::establish::Role::Client);
        let (s, schan) = t.join().unwrap();
        let cfg = crate::TcpConfig::default();
        (
            Connection::new(c, chan.unwrap(), &cfg).unwrap(),
            Connection::new(s, schan, &cfg).unwrap(),
        )
    }
}
