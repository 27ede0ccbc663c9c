//! One connection: establishing it (TLS or the explicit insecure preamble), the reader loop, the
//! writer thread, the service thread, and the supervisor that reconnects.

use std::collections::{HashMap, VecDeque};
use std::io::{IoSlice, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use devlend_fabric::FabricError;
use rustix::event::{poll, PollFd, PollFlags, Timespec};

use crate::frame::{self, Frame, FrameError, Hello, Status};
use crate::ntb::Inner;
use crate::queue::{InQueue, OutQueue, Take};
use crate::watch::Watch;

use crate::record::{Opener, RecordError, Sealer, WireBuf, MAX_PLAINTEXT, MAX_RECORD};
use crate::tls;
use crate::Credentials;

/// Most requests needing a reply (reads, scratchpad reads, message writes) that one side may
/// have outstanding; a peer exceeding it breaks the protocol.
pub(crate) const MAX_OUTSTANDING: usize = 256;

/// First bytes of an insecure connection, both ways.
const PLAIN_PREAMBLE: &[u8; 16] = b"DEVLEND-PLAIN/1\n";
/// First byte of a TLS record carrying a handshake message.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `m`'s guard if no one holds it.
fn try_lock<T>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

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
pub(crate) struct PeerInfo {
    pub(crate) spad_count: usize,
    pub(crate) msg_count: usize,
    pub(crate) db_valid_mask: u64,
    pub(crate) window_sizes: Vec<u64>,
}

/// A completion of one of this side's requests.
pub(crate) struct Reply {
    pub(crate) status: Status,
    pub(crate) data: Vec<u8>,
}

struct Pending {
    next_tag: u32,
    waiters: HashMap<u32, SyncSender<Reply>>,
    open: bool,
    /// Callers waiting for a free tag (`credit` is notified only then: a notify is a system
    /// call even with no one to wake).
    starved: usize,
}

/// The state of one connection, shared by its threads and by callers.
pub(crate) struct Session {
    pub(crate) out: OutQueue,
    pub(crate) inq: InQueue<Inbound>,
    pub(crate) peer: Mutex<PeerInfo>,
    up: AtomicBool,
    closed: AtomicBool,
    pending: Mutex<Pending>,
    credit: Condvar,
    /// Peer requests received but not yet answered.
    inflight: AtomicUsize,
    sock: TcpStream,
    chan: Channel,
    /// Held by whoever moves queued frames to the socket; keeps TLS records in order.
    send: Mutex<SendState>,
    /// TLS: records sealed in order, waiting for the holder of `send` (a bulk writer seals
    /// while the writer thread sends: two cores share the work).
    sealed: Mutex<Sealed>,
    sealed_space: Condvar,
    /// Held by whoever reads the socket: the reader thread, or a caller waiting for its reply
    /// (so that the reply wakes the caller directly, not through the reader thread).
    rx: Mutex<RxState>,
    /// The reader thread's wait for the socket; a caller reading the socket disarms it, so
    /// that the reply wakes nobody else.
    watch: Watch,
    /// Callers that want to read; the reader thread leaves the socket to them meanwhile, and
    /// the last one re-arms [`Session::watch`].
    leaders: AtomicUsize,
    /// A caller is reading: other callers wait for their reply instead of taking over.
    leading: AtomicBool,
    /// How long a reader keeps polling the socket before it sleeps (adaptive polling: a
    /// reply or the peer's next request usually comes within it, and a wake-up costs more).
    spin: Duration,
    /// When bytes last arrived (for the keepalive timeout).
    last_rx: Mutex<Instant>,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
}

/// The receive buffers.
struct RxState {
    /// Plaintext not yet parsed (at most one incomplete frame after a pump).
    rx: Vec<u8>,
    /// Bytes from the socket (a partial TLS record waits here for the rest).
    net: NetBuf,
    /// The peer's hello arrived.
    hello: bool,
    /// [`Session::watch`] may be armed (a caller taking over the socket disarms it first).
    armed: bool,
    /// What came with the end of the handshake (plaintext, then the start of the records
    /// that follow), for the first [`Session::pump`].
    early: Option<(Vec<u8>, Vec<u8>)>,
}

/// What one [`Session::pump`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pumped {
    /// The socket held nothing.
    Nothing,
    /// Bytes arrived and every complete frame was handled.
    Data,
    /// The peer closed the connection.
    Eof,
}

/// Waits until `sock` is readable (or has an error or hang-up); `false` after `timeout`.
fn wait_readable(sock: &TcpStream, timeout: Duration) -> Result<bool, EndError> {
    let timeout = Timespec::try_from(timeout.max(Duration::from_millis(1))).ok();
    loop {
        let mut fds = [PollFd::new(sock, PollFlags::IN)];
        match poll(&mut fds, timeout.as_ref()) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(EndError::Io(e.into())),
        }
    }
}

/// Buffers of the sender that holds [`Session::send`].
#[derive(Default)]
struct SendState {
    /// Plaintext frames taken from the queue.
    batch: Vec<u8>,
    /// Wire bytes (TLS records or plain frames) not yet written to the socket, oldest first.
    wire: WireBuf,
}

/// Sealed records waiting for the socket, oldest first, and spare buffers.
#[derive(Default)]
struct Sealed {
    bufs: VecDeque<WireBuf>,
    bytes: usize,
    free: Vec<WireBuf>,
    space_waiting: bool,
}

/// Most bytes of sealed records a bulk writer may have waiting for the socket.
const SEALED_LIMIT: usize = 1 << 20;
/// A caller with a bulk write that waits for space is woken when the sealed queue is down to
/// this (so that it seals several groups per wake-up).
const SEALED_RESUME: usize = SEALED_LIMIT / 2;
/// Bytes of posted writes a bulk writer seals per buffer.
const SEAL_GROUP: usize = 1 << 18;
/// Posted writes up to this size are sent by the calling thread when the socket is free
/// (latency); larger ones are left to the writer thread while the caller seals the next part.
const INLINE_WRITE: usize = 64 * 1024;
/// Spare sealed-record buffers kept.
const FREE_BUFS: usize = 8;

/// How a thread moves queued frames to the socket (see [`Session::flush`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flush {
    /// The writer thread: waits for the send lock, blocks on the socket.
    Writer,
    /// A caller: sends itself unless someone else is sending (then the writer thread is
    /// woken); may block on the socket (back-pressure).
    Caller,
    /// The reader and service threads: never block, on the lock or on the socket; what
    /// cannot go out now is left to the writer thread.
    NonBlocking,
}

/// A spinning reader yields the CPU every this many polls of the socket (on two cores, a pure
/// spin would starve the thread it waits for).
const SPIN_YIELD_EVERY: u32 = 1;

/// Most bytes of posted writes gathered into one system call.
const SEND_BATCH: usize = 1 << 20;

/// `write_all` over several buffers (one `writev` per round).
fn write_all_vectored(sock: &TcpStream, mut parts: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        match (&*sock).write_vectored(parts) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

/// Writes what the socket takes without blocking; returns the bytes written.
fn send_nonblocking(sock: &TcpStream, data: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `data` is a valid buffer of `data.len()` bytes for the whole call, and the
    // descriptor belongs to `sock`.
    let sent = nonblocking(|| unsafe {
        libc::send(
            sock.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })?;
    Ok(sent.unwrap_or(0))
}

/// Receives `buf.len()` bytes at most without blocking; `None` when there was nothing.
pub(crate) fn recv_nonblocking(
    stream: &TcpStream,
    buf: &mut [u8],
) -> std::io::Result<Option<usize>> {
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes for the whole call, and
    // the descriptor belongs to `stream`.
    nonblocking(|| unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    })
}

impl Session {
    fn new(sock: TcpStream, mut chan: Channel, cfg: &crate::TcpConfig) -> std::io::Result<Self> {
        let early = chan.early.take();
        let (send_limit, service_limit) = (cfg.send_queue_bytes, cfg.service_queue_bytes);
        let watch = Watch::new(&sock)?;
        Ok(Self {
            out: OutQueue::new(send_limit),
            inq: InQueue::new(service_limit),
            peer: Mutex::new(PeerInfo::default()),
            up: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            pending: Mutex::new(Pending {
                next_tag: 0,
                waiters: HashMap::new(),
                open: true,
                starved: 0,
            }),
            credit: Condvar::new(),
            inflight: AtomicUsize::new(0),
            sock,
            chan,
            send: Mutex::new(SendState::default()),
            sealed: Mutex::new(Sealed::default()),
            sealed_space: Condvar::new(),
            rx: Mutex::new(RxState {
                rx: Vec::with_capacity(4 * frame::MAX_PAYLOAD),
                net: NetBuf {
                    buf: vec![0u8; 256 * 1024 + MAX_RECORD],
                    len: 0,
                },
                hello: false,
                armed: true,
                early,
            }),
            watch,
            leaders: AtomicUsize::new(0),
            leading: AtomicBool::new(false),
            spin: cfg.link.spin,
            last_rx: Mutex::new(Instant::now()),
            keepalive_interval: cfg.keepalive_interval,
            keepalive_timeout: cfg.keepalive_timeout,
        })
    }

    fn silent_too_long(&self) -> bool {
        lock(&self.last_rx).elapsed() > self.keepalive_timeout
    }

    /// Reads what the socket holds and handles every complete frame: the peer's requests
    /// (applied here when that keeps the order, else queued for the service thread), replies
    /// to this side's requests (handed to their callers).
    fn pump(&self, inner: &Inner, st: &mut RxState) -> Result<Pumped, EndError> {
        let RxState {
            rx,
            net,
            hello,
            early,
            ..
        } = st;
        let mut batch = Vec::new();
        let mut batch_bytes = 0usize;
        // Frames are handled straight from what was received (a record opened in place);
        // only an incomplete frame at the end is kept in `rx` for the rest. A write whose
        // header ended the last piece takes its data straight from this one.
        let sink = |mut bytes: &[u8]| -> Result<(), EndError> {
            if let Some((f, used)) = frame::split_write(rx, bytes) {
                rx.clear();
                self.frame(inner, f, hello, &mut batch, &mut batch_bytes)?;
                bytes = bytes.get(used..).unwrap_or_default();
            }
            if rx.is_empty() {
                let used = self.frames(inner, bytes, hello, &mut batch, &mut batch_bytes)?;
                rx.extend_from_slice(bytes.get(used..).unwrap_or_default());
            } else {
                rx.extend_from_slice(bytes);
                let used = self.frames(inner, rx, hello, &mut batch, &mut batch_bytes)?;
                rx.drain(..used);
            }
            Ok(())
        };
        let got = match self.chan.recv(&self.sock, net, early, sink) {
            Ok(Some(got)) => got,
            Ok(None) => return Ok(Pumped::Nothing),
            Err(e) if self.closed.load(Ordering::Acquire) => {
                tracing::debug!(error = %e, "read after close");
                return Err(EndError::Closed);
            }
            Err(e) => return Err(e),
        };
        *lock(&self.last_rx) = Instant::now();
        if got.kick {
            self.out.kick();
        }
        // Replies to requests applied here go out now, or are left to the writer thread.
        self.flush(Flush::NonBlocking)?;
        if !batch.is_empty() {
            self.inq
                .push_batch(batch, batch_bytes)
                .map_err(|_| EndError::Closed)?;
        }
        if got.eof {
            if self.closed.load(Ordering::Acquire) {
                return Err(EndError::Closed);
            }
            if !*hello {
                return Err(EndError::Protocol(
                    "the peer closed the connection before its hello".into(),
                ));
            }
            if !rx.is_empty() {
                return Err(FrameError::Truncated { have: rx.len() }.into());
            }
            return Ok(Pumped::Eof);
        }
        Ok(Pumped::Data)
    }

    /// Handles the complete frames at the start of `bytes`: the peer's requests (applied here
    /// when that keeps the order, else added to `batch` for the service thread), replies to
    /// this side's requests. Returns the bytes used.
    fn frames(
        &self,
        inner: &Inner,
        bytes: &[u8],
        hello: &mut bool,
        batch: &mut Vec<Inbound>,
        batch_bytes: &mut usize,
    ) -> Result<usize, EndError> {
        let mut used = 0usize;
        while let Some((f, n)) = frame::parse(bytes.get(used..).unwrap_or_default())? {
            used += n;
            self.frame(inner, f, hello, batch, batch_bytes)?;
        }
        Ok(used)
    }

    /// Handles one frame from the peer (see [`Session::frames`]).
    fn frame(
        &self,
        inner: &Inner,
        f: Frame<'_>,
        hello: &mut bool,
        batch: &mut Vec<Inbound>,
        batch_bytes: &mut usize,
    ) -> Result<(), EndError> {
        if !*hello {
            let Frame::Hello(h) = f else {
                return Err(EndError::Protocol("the first frame is not a hello".into()));
            };
            accept_hello(self, h)?;
            *hello = true;
            inner.link_up();
            return Ok(());
        }
        if batch.is_empty() && self.inq.idle() && inner.apply_inline(self, &f)? {
            return Ok(());
        }
        handle(self, f, batch, batch_bytes)
    }

    /// Waits for the reply on `reply`, reading the socket itself when no one else is.
    fn await_reply(
        &self,
        inner: &Inner,
        reply: &Receiver<Reply>,
        deadline: Instant,
    ) -> Result<Reply, FabricError> {
        loop {
            match reply.try_recv() {
                Ok(r) => return Ok(r),
                Err(TryRecvError::Disconnected) => return Err(FabricError::LinkDown),
                Err(TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FabricError::Timeout);
            }
            if self.leading.load(Ordering::Acquire) {
                // Another caller reads the socket and hands our reply over.
                match reply.recv_timeout((deadline - now).min(self.keepalive_interval)) {
                    Ok(r) => return Ok(r),
                    Err(RecvTimeoutError::Disconnected) => return Err(FabricError::LinkDown),
                    Err(RecvTimeoutError::Timeout) => continue,
                }
            }
            self.leaders.fetch_add(1, Ordering::AcqRel);
            let mut st = lock(&self.rx);
            let result = if self.leading.swap(true, Ordering::AcqRel) {
                // Lost the race to another caller: wait for it instead.
                None
            } else {
                if st.armed {
                    // A failure only costs the reader thread a spurious wake-up.
                    let _ = self.watch.disarm();
                    st.armed = false;
                }
                let r = self.lead(inner, &mut st, reply, deadline);
                self.leading.store(false, Ordering::Release);
                Some(r)
            };
            if self.leaders.fetch_sub(1, Ordering::AcqRel) == 1 && !st.armed {
                // The last caller out hands the socket back to the reader thread.
                if let Err(e) = self.watch.arm() {
                    tracing::warn!(error = %e, "fabric link down: cannot watch the socket");
                    drop(st);
                    inner.link_down(self);
                    return Err(FabricError::LinkDown);
                }
                st.armed = true;
            }
            drop(st);
            if let Some(r) = result {
                return r;
            }
        }
    }

    fn lead(
        &self,
        inner: &Inner,
        st: &mut RxState,
        reply: &Receiver<Reply>,
        deadline: Instant,
    ) -> Result<Reply, FabricError> {
        let end = |e: EndError| {
            if !matches!(e, EndError::Closed) {
                tracing::warn!(reason = %e, "fabric link down");
            }
            inner.link_down(self);
            FabricError::LinkDown
        };
        let spin_start = Instant::now();
        let mut polls = 0u32;
        loop {
            match reply.try_recv() {
                Ok(r) => return Ok(r),
                Err(TryRecvError::Disconnected) => return Err(FabricError::LinkDown),
                Err(TryRecvError::Empty) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FabricError::Timeout);
            }
            // Poll for the spin budget, then sleep until the socket is readable.
            let readable = if now.duration_since(spin_start) < self.spin {
                polls = polls.wrapping_add(1);
                if polls.is_multiple_of(SPIN_YIELD_EVERY) {
                    std::thread::yield_now();
                }
                true
            } else {
                let wait = (deadline - now).min(self.keepalive_interval);
                wait_readable(&self.sock, wait).map_err(end)?
            };
            if readable {
                match self.pump(inner, st) {
                    Ok(Pumped::Nothing | Pumped::Data) => {}
                    Ok(Pumped::Eof) => {
                        tracing::info!("fabric peer closed the link");
                        return Err(end(EndError::Closed));
                    }
                    Err(e) => return Err(end(e)),
                }
            } else if self.silent_too_long() {
                return Err(end(EndError::Silent));
            }
        }
    }

    /// The reader thread: reads the socket whenever no caller does. It waits for data without
    /// holding the receive buffers, so a caller can take over at any time without waiting
    /// for this thread to be scheduled; a caller that does disarms the thread's watch, so
    /// that the caller's reply does not wake it.
    fn read_loop(&self, inner: &Inner) -> Result<(), EndError> {
        // What came with the end of the handshake, before any wake-up.
        if self.pump(inner, &mut lock(&self.rx))? == Pumped::Eof {
            return Ok(());
        }
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(EndError::Closed);
            }
            if !self.watch.wait(self.keepalive_interval)? {
                if self.silent_too_long() {
                    return Err(EndError::Silent);
                }
                continue;
            }
            let mut st = lock(&self.rx);
            // The event disarmed the watch; `armed` stays set (a caller disarming again is
            // harmless).
            if self.read_while_busy(inner, &mut st)? == Pumped::Eof {
                return Ok(());
            }
            if self.leaders.load(Ordering::Acquire) == 0 {
                self.watch.arm()?;
                st.armed = true;
            }
            // Else a caller waits for the socket and re-arms the watch when it is done.
        }
    }

    /// Reads the socket until it has been quiet for the spin budget, or until a caller wants
    /// it (adaptive polling: the peer's next request usually follows within the budget).
    fn read_while_busy(&self, inner: &Inner, st: &mut RxState) -> Result<Pumped, EndError> {
        let mut last = Instant::now();
        let mut polls = 0u32;
        while self.leaders.load(Ordering::Acquire) == 0 {
            match self.pump(inner, st)? {
                Pumped::Eof => return Ok(Pumped::Eof),
                Pumped::Data => last = Instant::now(),
                Pumped::Nothing if last.elapsed() >= self.spin => break,
                Pumped::Nothing => {
                    polls = polls.wrapping_add(1);
                    if polls.is_multiple_of(SPIN_YIELD_EVERY) {
                        std::thread::yield_now();
                    }
                }
            }
        }
        Ok(Pumped::Nothing)
    }

    /// A posted write of `data` (any length) at `offset` of the peer's `window`. Plain TCP: sent
    /// by this thread straight from `data` when no one else is sending (after what is queued,
    /// so the order holds), else queued for whoever is. TLS: see
    /// [`Session::write_posted_sealed`].
    pub(crate) fn write_posted(
        &self,
        window: u16,
        offset: u64,
        data: &[u8],
    ) -> Result<(), FabricError> {
        if self.chan.is_tls() {
            return self.write_posted_sealed(window, offset, data).map_err(|e| {
                tracing::debug!(error = %e, "fabric send failed");
                FabricError::LinkDown
            });
        }
        let down = |_| FabricError::LinkDown;
        let Some(mut st) = try_lock(&self.send) else {
            let mut at = offset;
            for piece in data.chunks(frame::MAX_DATA) {
                self.out
                    .push_request(|b| {
                        Frame::Write {
                            window,
                            offset: at,
                            data: piece,
                        }
                        .encode(b)
                    })
                    .map_err(down)?;
                at += piece.len() as u64;
            }
            self.out.notify_writer();
            return Ok(());
        };
        let SendState { batch, wire } = &mut *st;
        let io = |e: std::io::Error| {
            tracing::debug!(error = %e, "fabric send failed");
            FabricError::LinkDown
        };
        // What was queued before goes first.
        batch.clear();
        if self.out.take_now(batch).map_err(down)? {
            wire.extend_from_slice(batch);
        }
        // Frames go out in batches of up to SEND_BATCH bytes per system call: the kernel pushes
        // each write at once (TCP_NODELAY), so small writes would mean small segments.
        let pieces: Vec<&[u8]> = data.chunks(frame::MAX_DATA).collect();
        let mut at = offset;
        for group in pieces.chunks(SEND_BATCH / frame::MAX_DATA) {
            let mut headers = Vec::with_capacity(group.len());
            for piece in group {
                headers.push(frame::write_header(window, at, piece.len()));
                at += piece.len() as u64;
            }
            let mut parts = Vec::with_capacity(1 + 2 * group.len());
            parts.push(IoSlice::new(wire));
            for (h, piece) in headers.iter().zip(group) {
                parts.push(IoSlice::new(h));
                parts.push(IoSlice::new(piece));
            }
            write_all_vectored(&self.sock, &mut parts).map_err(io)?;
            wire.clear();
        }
        if !wire.is_empty() {
            (&self.sock).write_all(wire).map_err(io)?;
            wire.clear();
        }
        Ok(())
    }

    /// Moves queued frames to the socket, as `how` allows. Frames that stay queued are sent
    /// by the writer thread, which this wakes.
    pub(crate) fn flush(&self, how: Flush) -> Result<(), EndError> {
        if self.chan.is_tls() {
            return self.flush_sealed(how);
        }
        let mut st = match how {
            Flush::Writer => lock(&self.send),
            Flush::Caller | Flush::NonBlocking => match try_lock(&self.send) {
                Some(g) => g,
                None => {
                    self.out.notify_writer();
                    return Ok(());
                }
            },
        };
        let SendState { batch, wire } = &mut *st;
        loop {
            batch.clear();
            if self.out.take_now(batch).map_err(|_| EndError::Closed)? {
                wire.extend_from_slice(batch);
            }
            if wire.is_empty() {
                return Ok(());
            }
            if !self.write_wire(wire, how)? {
                return Ok(());
            }
        }
    }

    /// Writes `wire` to the socket: all of it (blocking), or for [`Flush::NonBlocking`] what
    /// the socket takes now, keeping the rest and asking the writer thread to send it.
    /// Returns whether everything went out.
    fn write_wire(&self, wire: &mut WireBuf, how: Flush) -> Result<bool, EndError> {
        if how == Flush::NonBlocking {
            let n = send_nonblocking(&self.sock, wire)?;
            wire.consume(n);
            if !wire.is_empty() {
                self.out.kick();
                return Ok(false);
            }
        } else {
            (&self.sock).write_all(wire)?;
            wire.clear();
        }
        Ok(true)
    }

    /// TLS posted write: each frame one record, sealed in groups into the sealed queue (in
    /// order after what was queued before); small writes are then sent by this thread when
    /// the socket is free, bulk ones by the writer thread while this one seals on.
    fn write_posted_sealed(&self, window: u16, offset: u64, data: &[u8]) -> Result<(), EndError> {
        let piece_len = MAX_PLAINTEXT - frame::WRITE_HEADER_LEN;
        let pieces: Vec<&[u8]> = data.chunks(piece_len).collect();
        let mut at = offset;
        for group in pieces.chunks(SEAL_GROUP / piece_len) {
            self.wait_sealed_space()?;
            let mut frames = Vec::with_capacity(group.len());
            for piece in group {
                frames.push((frame::write_header(window, at, piece.len()), *piece));
                at += piece.len() as u64;
            }
            self.seal_queued(&frames, true)?;
            if data.len() > INLINE_WRITE {
                self.out.kick();
            } else {
                self.flush_sealed(Flush::Caller)?;
            }
        }
        Ok(())
    }

    /// Waits while the sealed queue is over its limit.
    fn wait_sealed_space(&self) -> Result<(), EndError> {
        let mut q = lock(&self.sealed);
        while q.bytes >= SEALED_LIMIT {
            if self.closed.load(Ordering::Acquire) {
                return Err(EndError::Closed);
            }
            q.space_waiting = true;
            self.out.kick();
            q = self
                .sealed_space
                .wait_timeout(q, self.keepalive_interval)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Seals what the send queue holds, then `frames` (header and data each), into one buffer
    /// of the sealed queue; the sealer's lock keeps the queue in sealing order. Without `wait`
    /// nothing is sealed while another thread seals: the writer thread is asked to seal what
    /// is queued later. Returns whether anything was sealed.
    fn seal_queued(
        &self,
        frames: &[([u8; frame::WRITE_HEADER_LEN], &[u8])],
        wait: bool,
    ) -> Result<bool, EndError> {
        let tls = self.chan.tls.as_ref().ok_or(EndError::Closed)?;
        let Some(mut sealer) = (if wait {
            Some(lock(&tls.sealer))
        } else {
            try_lock(&tls.sealer)
        }) else {
            self.out.kick();
            return Ok(false);
        };
        let mut batch = Vec::new();
        let took = self
            .out
            .take_now(&mut batch)
            .map_err(|_| EndError::Closed)?;
        if !took && frames.is_empty() {
            return Ok(false);
        }
        let mut buf = lock(&self.sealed).free.pop().unwrap_or_default();
        buf.clear();
        sealer.seal_writes(&batch, frames, &mut buf)?;
        let mut q = lock(&self.sealed);
        if buf.is_empty() {
            q.free.push(buf);
        } else {
            q.bytes += buf.len();
            q.bufs.push_back(buf);
        }
        Ok(true)
    }

    /// The oldest buffer of sealed records, if any (a bulk-writing caller waiting for space is
    /// woken when enough has gone).
    fn pop_sealed(&self) -> Option<WireBuf> {
        let mut q = lock(&self.sealed);
        let buf = q.bufs.pop_front()?;
        q.bytes -= buf.len();
        let wake = q.space_waiting && q.bytes <= SEALED_RESUME;
        if wake {
            q.space_waiting = false;
        }
        drop(q);
        if wake {
            // After the lock is dropped: the woken caller would otherwise block on it at once.
            self.sealed_space.notify_all();
        }
        Some(buf)
    }

    /// TLS flush: writes the sealed queue as `how` allows, sealing what the send queue holds
    /// once the sealed queue is empty. The reader and service threads never wait for a thread
    /// that is sealing: the writer thread seals their frames after it.
    fn flush_sealed(&self, how: Flush) -> Result<(), EndError> {
        let wait = how != Flush::NonBlocking;
        let mut st = match how {
            Flush::Writer => lock(&self.send),
            Flush::Caller | Flush::NonBlocking => {
                self.seal_queued(&[], wait)?;
                match try_lock(&self.send) {
                    Some(g) => g,
                    None => {
                        // The holder may have finished just before: the writer makes sure.
                        self.out.kick();
                        return Ok(());
                    }
                }
            }
        };
        loop {
            if st.wire.is_empty() {
                match self.pop_sealed() {
                    Some(buf) => {
                        let old = std::mem::replace(&mut st.wire, buf);
                        let mut q = lock(&self.sealed);
                        if q.free.len() < FREE_BUFS {
                            q.free.push(old);
                        }
                    }
                    None if self.seal_queued(&[], wait)? => continue,
                    None => return Ok(()),
                }
            }
            if !self.write_wire(&mut st.wire, how)? {
                return Ok(());
            }
        }
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
        {
            let mut p = lock(&self.pending);
            p.open = false;
            // Dropping the senders wakes every waiting caller with "disconnected".
            p.waiters.clear();
        }
        self.credit.notify_all();
        self.sealed_space.notify_all();
        // Wakes the reader thread (the watch reports the hang-up) and any caller reading.
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        Some(self.up.load(Ordering::Acquire))
    }

    /// Sends a request that needs a reply and waits for it (at most `timeout`).
    pub(crate) fn call(
        &self,
        inner: &Inner,
        timeout: Duration,
        encode: impl FnOnce(u32, &mut Vec<u8>),
    ) -> Result<Reply, FabricError> {
        let (tx, rx) = sync_channel(1);
        let tag = {
            let mut p = lock(&self.pending);
            while p.open && p.waiters.len() >= MAX_OUTSTANDING {
                p.starved += 1;
                p = self
                    .credit
                    .wait_timeout(p, timeout)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                p.starved -= 1;
            }
            if !p.open {
                return Err(FabricError::LinkDown);
            }
            let mut tag = p.next_tag;
            while p.waiters.contains_key(&tag) {
                tag = tag.wrapping_add(1);
            }
            p.next_tag = tag.wrapping_add(1);
            p.waiters.insert(tag, tx);
            tag
        };
        let forget = || self.release_tag(tag);
        if self.out.push_request(|b| encode(tag, b)).is_err() || self.flush(Flush::Caller).is_err()
        {
            forget();
            return Err(FabricError::LinkDown);
        }
        match self.await_reply(inner, &rx, Instant::now() + timeout) {
            Err(FabricError::Timeout) => {
                forget();
                Err(FabricError::Timeout)
            }
            other => other,
        }
    }

    /// Frees `tag`, returning its waiter.
    fn release_tag(&self, tag: u32) -> Option<SyncSender<Reply>> {
        let mut p = lock(&self.pending);
        let waiter = p.waiters.remove(&tag);
        if p.starved > 0 {
            self.credit.notify_one();
        }
        waiter
    }

    fn complete(&self, tag: u32, reply: Reply) {
        match self.release_tag(tag) {
            Some(tx) => {
                let _ = tx.try_send(reply);
            }
            // A reply to a request that timed out here: nobody waits for it any more.
            None => tracing::debug!(tag, "reply to a forgotten request"),
        }
    }

    /// Queues the reply to one of the peer's requests.
    pub(crate) fn reply(&self, tag: u32, status: Status, data: &[u8]) {
        let _ = self
            .out
            .push_now(|b| Frame::Reply { tag, status, data }.encode(b));
        self.inflight.fetch_sub(1, Ordering::AcqRel);
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

struct Received {
    eof: bool,
    kick: bool,
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

    /// Reads what the socket holds (without blocking) and hands the plaintext to `sink`, in
    /// pieces; `net` keeps a partial record between calls. Returns `None` when there was
    /// nothing.
    fn recv(
        &self,
        stream: &TcpStream,
        net: &mut NetBuf,
        early: &mut Option<(Vec<u8>, Vec<u8>)>,
        mut sink: impl FnMut(&[u8]) -> Result<(), EndError>,
    ) -> Result<Option<Received>, EndError> {
        if let Some((plain, cipher)) = early.take() {
            sink(&plain)?;
            let dst = net.buf.get_mut(..cipher.len()).ok_or(EndError::Protocol(
                "more than a buffer of data with the handshake".into(),
            ))?;
            dst.copy_from_slice(&cipher);
            net.len = cipher.len();
            return self.open(net, sink).map(Some);
        }
        if !self.is_tls() {
            let Some(n) = recv_nonblocking(stream, &mut net.buf)? else {
                return Ok(None);
            };
            sink(net.buf.get(..n).unwrap_or_default())?;
            return Ok(Some(Received {
                eof: n == 0,
                kick: false,
            }));
        }
        let free = net.buf.get_mut(net.len..).unwrap_or_default();
        let Some(n) = recv_nonblocking(stream, free)? else {
            return Ok(None);
        };
        if n == 0 {
            return Ok(Some(Received {
                eof: true,
                kick: false,
            }));
        }
        net.len += n;
        self.open(net, sink).map(Some)
    }

    /// Opens the whole records in `net` (into `sink`) and keeps the partial one.
    fn open(
        &self,
        net: &mut NetBuf,
        sink: impl FnMut(&[u8]) -> Result<(), EndError>,
    ) -> Result<Received, EndError> {
        let Some(tls) = &self.tls else {
            return Ok(Received {
                eof: false,
                kick: false,
            });
        };
        let filled = net.buf.get_mut(..net.len).unwrap_or_default();
        let opened = lock(&tls.opener).open(filled, sink)?;
        net.buf.copy_within(opened.consumed..net.len, 0);
        net.len -= opened.consumed;
        Ok(Received {
            eof: opened.closed,
            kick: opened.answer,
        })
    }
}

/// The receive buffer of the socket: ciphertext of a partial record is kept at its start.
pub(crate) struct NetBuf {
    buf: Vec<u8>,
    len: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Client,
    Server,
}

/// TLS handshake (or the insecure preamble exchange). `Err` is the reason for a refusal.
fn establish(creds: &Credentials, stream: &TcpStream, role: Role) -> Result<Channel, String> {
    match creds {
        Credentials::Insecure => {
            (&*stream)
                .write_all(PLAIN_PREAMBLE)
                .map_err(|e| format!("sending the insecure preamble: {e}"))?;
            let mut got = [0u8; PLAIN_PREAMBLE.len()];
            let mut have = 0;
            while have < got.len() {
                let dst = got.get_mut(have..).unwrap_or_default();
                match (&*stream).read(dst) {
                    Ok(0) => return Err("the peer closed during the insecure preamble".into()),
                    Ok(n) => have += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("reading the insecure preamble: {e}")),
                }
                if got.first() == Some(&TLS_HANDSHAKE_RECORD) {
                    return Err("the peer requires TLS but this side is configured insecure".into());
                }
            }
            if &got != PLAIN_PREAMBLE {
                return Err("the peer did not send the devlend insecure preamble".into());
            }
            Ok(Channel::plain())
        }
        Credentials::Tls(t) => {
            let e = tls::handshake(t, stream, role == Role::Client)?;
            Ok(Channel {
                tls: Some(Tls {
                    sealer: Mutex::new(e.sealer),
                    opener: Mutex::new(e.opener),
                }),
                early: Some((e.plaintext, e.ciphertext)),
            })
        }
    }
}

/// How the supervisor finds its peer.
pub(crate) enum Mode {
    Listen(TcpListener),
    Connect(SocketAddr),
}

/// The supervisor thread: connects or accepts, runs one connection at a time, and repeats
/// until the [`Inner`] is stopped.
pub(crate) fn supervise(inner: Arc<Inner>, mode: Mode) {
    crate::cpu::place(inner.cfg.cpus.reader, "supervisor");
    match mode {
        Mode::Listen(listener) => {
            while let Some((stream, addr)) = accept(&inner, &listener) {
                connection(&inner, stream, addr, Role::Server);
            }
        }
        Mode::Connect(addr) => {
            while !inner.stopped() {
                match TcpStream::connect_timeout(&addr, inner.cfg.handshake_timeout) {
                    Ok(stream) => connection(&inner, stream, addr, Role::Client),
                    Err(e) => tracing::debug!(peer = %addr, error = %e, "fabric connect failed"),
                }
                let pause = backoff(
                    inner.cfg.reconnect_interval,
                    inner.cfg.reconnect_max,
                    inner.refusal_streak(),
                );
                if inner.pause(pause) {
                    break;
                }
            }
        }
    }
}

/// The pause before a connector's next attempt after `streak` refused attempts in a row:
/// `base`, doubled for each refusal after the first, at most `max`.
pub(crate) fn backoff(base: Duration, max: Duration, streak: u64) -> Duration {
    let doublings = u32::try_from(streak.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(20);
    base.checked_mul(1u32 << doublings)
        .unwrap_or(max)
        .min(max.max(base))
}

/// Whether the `streak`-th refusal in a row is logged as a warning: the 1st, 2nd, 4th, 8th, ...
/// (the others at debug level), so a peer that keeps being refused costs a handful of lines
/// rather than a few a second.
pub(crate) fn refusal_is_warned(streak: u64) -> bool {
    streak.is_power_of_two()
}

/// Logs a refusal: a warning when [`refusal_is_warned`], debug otherwise.
fn log_refusal(peer: SocketAddr, streak: u64, what: &str, reason: &dyn std::fmt::Display) {
    if refusal_is_warned(streak) {
        tracing::warn!(
            peer = %peer,
            %reason,
            refusals_in_a_row = streak,
            "{what} (retried with back-off; next warned at {} refusals in a row)",
            streak.saturating_mul(2)
        );
    } else {
        tracing::debug!(peer = %peer, %reason, refusals_in_a_row = streak, "{what}");
    }
}

/// Waits for a connection or for the stop event.
fn accept(inner: &Inner, listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    loop {
        if inner.stopped() {
            return None;
        }
        // SAFETY: `inner.wake` owns this descriptor and outlives the borrow (vmm-sys-util's
        // EventFd offers no `AsFd`).
        let wake = unsafe { std::os::fd::BorrowedFd::borrow_raw(inner.wake.as_raw_fd()) };
        let mut fds = [
            PollFd::new(listener, PollFlags::IN),
            PollFd::from_borrowed_fd(wake, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "poll on the fabric listener failed");
                return None;
            }
        }
        if inner.stopped() {
            return None;
        }
        match listener.accept() {
            Ok(pair) => return Some(pair),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!(error = %e, "accept on the fabric listener failed"),
        }
    }
}

fn connection(inner: &Arc<Inner>, stream: TcpStream, peer: SocketAddr, role: Role) {
    let setup = || -> std::io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(inner.cfg.handshake_timeout))?;
        stream.set_write_timeout(Some(inner.cfg.handshake_timeout))
    };
    if let Err(e) = setup() {
        tracing::warn!(peer = %peer, error = %e, "fabric socket setup failed");
        return;
    }
    let chan = match establish(&inner.creds, &stream, role) {
        Ok(c) => c,
        Err(reason) => {
            let streak = inner.count_refusal();
            log_refusal(peer, streak, "refused fabric peer", &reason);
            return;
        }
    };
    run_session(inner, stream, chan, peer);
}

fn run_session(inner: &Arc<Inner>, stream: TcpStream, chan: Channel, peer: SocketAddr) {
    let timeouts = || -> std::io::Result<TcpStream> {
        stream.set_read_timeout(Some(inner.cfg.keepalive_timeout))?;
        stream.set_write_timeout(Some(inner.cfg.keepalive_timeout))?;
        stream.try_clone()
    };
    let clone = match timeouts() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "fabric socket setup failed");
            return;
        }
    };
    let session = match Session::new(clone, chan, &inner.cfg) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "fabric session setup failed");
            return;
        }
    };
    inner.publish(&session);
    let writer = {
        let (inner, session) = (inner.clone(), session.clone());
        std::thread::Builder::new()
            .name("fabric-tcp-writer".into())
            .spawn(move || {
                crate::cpu::place(inner.cfg.cpus.writer, "writer");
                writer_loop(&inner, &session)
            })
    };
    let service = {
        let (inner, session) = (inner.clone(), session.clone());
        std::thread::Builder::new()
            .name("fabric-tcp-service".into())
            .spawn(move || {
                crate::cpu::place(inner.cfg.cpus.reader, "service");
                while let Some((items, _)) = session.inq.pop_all() {
                    for item in items {
                        inner.apply(&session, item);
                    }
                    session.inq.done();
                    if let Err(e) = session.flush(Flush::NonBlocking) {
                        tracing::debug!(error = %e, "fabric send failed");
                        inner.link_down(&session);
                    }
                }
            })
    };
    let result = match (&writer, &service) {
        (Ok(_), Ok(_)) => session.read_loop(inner),
        _ => Err(EndError::Protocol(
            "could not start the connection threads".into(),
        )),
    };
    let was_up = session.is_up();
    inner.link_down(&session);
    match result {
        // Closed by this side (the node is stopping): not the peer's failure.
        Err(EndError::Closed) => tracing::debug!(peer = %peer, "fabric link closed"),
        Err(e) if !was_up => {
            let streak = inner.count_refusal();
            log_refusal(
                peer,
                streak,
                "fabric peer refused or failed before link-up",
                &e,
            );
        }
        Err(e) => tracing::warn!(peer = %peer, reason = %e, "fabric link down"),
        Ok(()) => tracing::info!(peer = %peer, "fabric peer closed the link"),
    }
    if let Ok(w) = writer {
        let _ = w.join();
    }
    if let Ok(s) = service {
        let _ = s.join();
    }
}

fn writer_loop(inner: &Inner, session: &Session) {
    loop {
        match session.out.wait(inner.cfg.keepalive_interval) {
            Take::Closed => break,
            Take::Idle => {
                if session.out.push_now(|b| Frame::Ping.encode(b)).is_err() {
                    break;
                }
            }
            Take::Data => {}
        }
        match session.flush(Flush::Writer) {
            Ok(()) => {}
            Err(EndError::Closed) => break,
            Err(e) => {
                tracing::debug!(error = %e, "fabric send failed");
                inner.link_down(session);
                break;
            }
        }
    }
}

fn accept_hello(session: &Session, h: Hello) -> Result<(), EndError> {
    if h.version != frame::VERSION {
        return Err(EndError::Protocol(format!(
            "peer speaks protocol version {}, this side {}",
            h.version,
            frame::VERSION
        )));
    }
    *lock(&session.peer) = PeerInfo {
        spad_count: usize::from(h.spad_count),
        msg_count: usize::from(h.msg_count),
        db_valid_mask: h.db_valid_mask,
        window_sizes: h.window_sizes,
    };
    session.mark_up();
    Ok(())
}

pub(crate) fn take_credit(session: &Session) -> Result<(), EndError> {
    if session.inflight.fetch_add(1, Ordering::AcqRel) >= MAX_OUTSTANDING {
        return Err(EndError::Protocol(format!(
            "more than {MAX_OUTSTANDING} outstanding requests"
        )));
    }
    Ok(())
}

fn handle(
    session: &Session,
    f: Frame<'_>,
    batch: &mut Vec<Inbound>,
    batch_bytes: &mut usize,
) -> Result<(), EndError> {
    match f {
        Frame::Hello(_) => return Err(EndError::Protocol("a second hello".into())),
        Frame::Ping => {}
        Frame::Trans { window, size } => {
            let mut peer = lock(&session.peer);
            let slot = peer
                .window_sizes
                .get_mut(usize::from(window))
                .ok_or_else(|| EndError::Protocol(format!("translation of window {window}")))?;
            *slot = size;
        }
        Frame::Write {
            window,
            offset,
            data,
        } => {
            *batch_bytes += data.len();
            batch.push(Inbound::Write {
                window,
                offset,
                data: data.to_vec(),
            });
        }
        Frame::Read {
            tag,
            window,
            offset,
            len,
        } => {
            take_credit(session)?;
            *batch_bytes += 32;
            batch.push(Inbound::Read {
                tag,
                window,
                offset,
                len,
            });
        }
        Frame::DbSet { bits } => batch.push(Inbound::DbSet(bits)),
        Frame::SpadWrite { index, value } => batch.push(Inbound::SpadWrite { index, value }),
        Frame::SpadRead { tag, index } => {
            take_credit(session)?;
            batch.push(Inbound::SpadRead { tag, index });
        }
        Frame::MsgWrite { tag, index, value } => {
            take_credit(session)?;
            batch.push(Inbound::MsgWrite { tag, index, value });
        }
        Frame::Reply { tag, status, data } => session.complete(
            tag,
            Reply {
                status,
                data: data.to_vec(),
            },
        ),
    }
    Ok(())
}

#[cfg(test)]
mod backoff_tests {
    use super::{backoff, refusal_is_warned};
    use std::time::Duration;

    #[test]
    fn the_pause_doubles_per_refusal_up_to_the_ceiling() {
        let (base, max) = (Duration::from_millis(200), Duration::from_secs(10));
        let pauses: Vec<u128> = (0..10).map(|n| backoff(base, max, n).as_millis()).collect();
        assert_eq!(
            pauses,
            [200, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        assert_eq!(backoff(base, max, u64::MAX), max);
        // A ceiling below the base never shortens the base.
        assert_eq!(backoff(base, Duration::ZERO, 5), base);
    }

    #[test]
    fn refusals_are_warned_at_powers_of_two() {
        let warned: Vec<u64> = (1..=100).filter(|n| refusal_is_warned(*n)).collect();
        assert_eq!(warned, [1, 2, 4, 8, 16, 32, 64]);
        assert!(!refusal_is_warned(0));
    }
}
