//! [`TcpNtb`]: the local registers, the trait implementations, and how the peer's requests are
//! applied to the local address space.

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devlend_fabric::{
    registers, AddressSpace, BusAddr, Doorbells, FabricError, Link, LinkState, MemSpan,
    MemoryWindows, Messages, MwAlign, Ntb, PeerWindows, Resolved, Result, Scratchpads,
    WindowOffset,
};
use vmm_sys_util::eventfd::EventFd;

use crate::frame::{self, Frame, Hello, Status};
use crate::session::{self, Connection, Flush, Inbound, Lead, Mode, Reply};
use crate::{Credentials, TcpConfig, TcpError};
use devlend_sync::{lock, posted};

/// Largest single MMIO access handed to an [`devlend_fabric::MmioHandler`]; longer accesses
/// are split into consecutive pieces of this size.
const MMIO_CHUNK: usize = 64;

/// Waits on `cv` until `hit` finds bits in the state behind `state` (returning them), the
/// session goes down, or `timeout` passes: the shape of every register wait (doorbells,
/// message status).
fn wait_on<T>(
    state: &Mutex<T>,
    cv: &Condvar,
    session: &Connection,
    timeout: Duration,
    mut hit: impl FnMut(&T) -> u64,
) -> Result<u64> {
    // A timeout too large to add to now means no deadline (never an overflow panic).
    let deadline = Instant::now().checked_add(timeout);
    let mut guard = lock(state);
    loop {
        let bits = hit(&guard);
        if bits != 0 {
            return Ok(bits);
        }
        if !session.is_up() {
            return Err(FabricError::LinkDown);
        }
        let left = match deadline {
            Some(d) => d.saturating_duration_since(Instant::now()),
            None => Duration::from_secs(3600),
        };
        if left.is_zero() {
            return Err(FabricError::Timeout);
        }
        guard = devlend_sync::wait_timeout(cv, guard, left).0;
    }
}

#[derive(Clone, Copy, Debug)]
struct Translation {
    addr: BusAddr,
    size: u64,
}

struct DbRegs {
    bits: u64,
    mask: u64,
}

struct MsgRegs {
    values: Vec<u32>,
    sts: u64,
}

/// Whether the link is up, and how many times it changed.
struct LinkInner {
    up: bool,
    generation: u64,
}

/// Counters of a [`TcpNtb`], for status output and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpStats {
    /// Connections that reached link-up.
    pub links_up: u64,
    /// Connections that ended before link-up: refused credentials, an insecure/secure
    /// mismatch, a protocol mismatch, a handshake timeout.
    pub refused: u64,
}

/// This side's registers, which the peer's requests write and the user's handle reads: the
/// windows' translations, doorbells, scratchpads and message registers, with the condition
/// variables their waiters sleep on.
struct Registers {
    windows: Mutex<Vec<Option<Translation>>>,
    db: Mutex<DbRegs>,
    db_cv: Condvar,
    spads: Mutex<Vec<u32>>,
    msgs: Mutex<MsgRegs>,
    msg_cv: Condvar,
}

impl Registers {
    fn new(link: &devlend_fabric::LinkConfig) -> Self {
        Self {
            windows: Mutex::new(vec![None; link.mw_count]),
            db: Mutex::new(DbRegs { bits: 0, mask: 0 }),
            db_cv: Condvar::new(),
            spads: Mutex::new(vec![0; link.spad_count]),
            msgs: Mutex::new(MsgRegs {
                values: vec![0; link.msg_count],
                sts: 0,
            }),
            msg_cv: Condvar::new(),
        }
    }

    /// Wakes every register waiter, so that it sees the connection it waits on gone. Waiters
    /// check the connection under these locks: taking them orders the wake-up after the check.
    fn wake_waiters(&self) {
        drop(lock(&self.db));
        self.db_cv.notify_all();
        drop(lock(&self.msgs));
        self.msg_cv.notify_all();
    }
}

/// The link: the current connection (up, or still in its hello) and the link state the user's
/// waits watch.
struct LinkSlot {
    /// The current connection.
    current: Mutex<Option<Arc<Connection>>>,
    state: Mutex<LinkInner>,
    /// Notified when `state` changes and when a connection is refused (see
    /// [`TcpNtb::wait_refused`]).
    changed: Condvar,
}

/// The user's handle asking the connection threads to end: a flag, a condition variable for
/// the supervisor's pauses, and an eventfd that ends a listener's poll.
struct Stop {
    requested: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
    wake: EventFd,
}

impl Stop {
    fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// Sets the flag and wakes the supervisor wherever it waits.
    fn request(&self) {
        self.requested.store(true, Ordering::Release);
        drop(lock(&self.lock));
        self.cv.notify_all();
        let _ = self.wake.write(1);
    }
}

/// The counters behind [`TcpStats`], and the refusal streak.
#[derive(Default)]
struct Counters {
    links_up: AtomicU64,
    refused: AtomicU64,
    /// Connections refused or failed before link-up since the last link-up (the back-off
    /// and the log's rate both follow it).
    streak: AtomicU64,
}

/// State shared by the user's handle and the connection threads.
pub(crate) struct Inner {
    pub(crate) cfg: TcpConfig,
    pub(crate) creds: Credentials,
    asp: Arc<AddressSpace>,
    regs: Registers,
    link: LinkSlot,
    stop: Stop,
    counters: Counters,
    /// The congestion control of the last connection's socket.
    congestion: Mutex<Option<String>>,
}

impl Inner {
    /// Asks for the configured congestion control on a new connection's socket (see
    /// [`crate::CONGESTION`]; `TCP_CONGESTION` fails when the kernel lacks it, or when it is
    /// not in `net.ipv4.tcp_allowed_congestion_control` and the process lacks
    /// `CAP_NET_ADMIN`, and the socket then keeps the system's) and records what the socket
    /// uses.
    pub(crate) fn note_congestion(&self, sock: &std::net::TcpStream, peer: SocketAddr) {
        use rustix::net::sockopt;
        if let Some(name) = self.cfg.congestion {
            if let Err(e) = sockopt::set_tcp_congestion(sock, name) {
                tracing::info!(
                    peer = %peer,
                    congestion = name,
                    error = %e,
                    "the fabric socket keeps the system's congestion control"
                );
            }
        }
        *lock(&self.congestion) = sockopt::tcp_congestion(sock).ok();
    }

    pub(crate) fn stopped(&self) -> bool {
        self.stop.requested()
    }

    /// The eventfd that the stop request writes (a listener polls it beside its socket).
    pub(crate) fn stop_event(&self) -> &EventFd {
        &self.stop.wake
    }

    /// Sleeps `d` or until stopped; returns whether stopped.
    pub(crate) fn pause(&self, d: Duration) -> bool {
        let g = lock(&self.stop.lock);
        let _g = devlend_sync::wait_timeout_while(&self.stop.cv, g, d, |_| !self.stopped());
        self.stopped()
    }

    /// Counts a connection that ended before link-up; returns how many did in a row.
    pub(crate) fn count_refusal(&self) -> u64 {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        let streak = self
            .counters
            .streak
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        drop(lock(&self.link.state));
        self.link.changed.notify_all();
        streak
    }

    /// Connections that ended before link-up since the last link-up.
    pub(crate) fn refusal_streak(&self) -> u64 {
        self.counters.streak.load(Ordering::Relaxed)
    }

    /// Makes `s` the current connection and queues the hello, which carries the current
    /// translations (so that translations and hello cannot cross).
    pub(crate) fn publish(&self, s: &Arc<Connection>) {
        let windows = lock(&self.regs.windows);
        let hello = Hello {
            version: frame::VERSION,
            spad_count: self.cfg.link.spad_count as u16,
            msg_count: self.cfg.link.msg_count as u16,
            db_valid_mask: self.cfg.link.db_valid_mask(),
            window_sizes: windows.iter().map(|w| w.map_or(0, |t| t.size)).collect(),
        };
        let _ = s.out.push_now(|b| Frame::Hello(hello).encode(b));
        *lock(&self.link.current) = Some(s.clone());
        drop(windows);
        // A stop requested before the line above found no connection to close (this one was
        // still in its handshake): close it now, or its reader would wait on a peer that
        // waits the same way, and both endpoints' drops would wait for ever.
        if self.stopped() {
            self.link_down(s);
        }
    }

    pub(crate) fn link_up(&self) {
        let mut l = lock(&self.link.state);
        l.up = true;
        l.generation += 1;
        drop(l);
        self.counters.links_up.fetch_add(1, Ordering::Relaxed);
        self.counters.streak.store(0, Ordering::Relaxed);
        self.link.changed.notify_all();
    }

    /// Ends connection `s` (idempotent): the link goes down if it was up, and every waiter
    /// wakes up to see it.
    pub(crate) fn link_down(&self, s: &Connection) {
        let Some(was_up) = s.close() else {
            return;
        };
        {
            let mut current = lock(&self.link.current);
            if current.as_deref().is_some_and(|cur| std::ptr::eq(cur, s)) {
                *current = None;
            }
        }
        if was_up {
            let mut l = lock(&self.link.state);
            l.up = false;
            l.generation += 1;
        }
        self.link.changed.notify_all();
        self.regs.wake_waiters();
    }

    fn stop(&self) {
        self.stop.request();
        let current = lock(&self.link.current).clone();
        if let Some(s) = current {
            self.link_down(&s);
        }
    }

    /// The connection, when the link is up.
    fn session(&self) -> Result<Arc<Connection>> {
        match lock(&self.link.current).clone() {
            Some(s) if s.is_up() => Ok(s),
            _ => Err(FabricError::LinkDown),
        }
    }

    // ---- the peer's requests, on the service thread ----

    fn resolve(
        &self,
        window: u16,
        offset: u64,
        len: usize,
    ) -> std::result::Result<Resolved, Status> {
        let t = lock(&self.regs.windows)
            .get(usize::from(window))
            .copied()
            .ok_or(Status::NoSuchIndex)?
            .ok_or(Status::NotTranslated)?;
        match offset.checked_add(len as u64) {
            Some(end) if len > 0 && end <= t.size => {}
            _ => return Err(Status::OutsideWindow),
        }
        let addr = t.addr.checked_add(offset).ok_or(Status::OutsideWindow)?;
        self.asp
            .resolve(addr, len as u64)
            .map_err(|_| Status::NoRegion)
    }

    fn write_window(
        &self,
        window: u16,
        offset: u64,
        data: &[u8],
    ) -> std::result::Result<(), Status> {
        match self.resolve(window, offset, data.len())? {
            Resolved::Ram(span) => span.write_at(0, data).map_err(|_| Status::NoRegion),
            Resolved::Mmio(h, base) => {
                let mut at = base;
                for piece in data.chunks(MMIO_CHUNK) {
                    h.mmio_write(at, piece);
                    at += piece.len() as u64;
                }
                Ok(())
            }
        }
    }

    fn read_window(
        &self,
        window: u16,
        offset: u64,
        buf: &mut [u8],
    ) -> std::result::Result<(), Status> {
        match self.resolve(window, offset, buf.len())? {
            Resolved::Ram(span) => span.read_at(0, buf).map_err(|_| Status::NoRegion),
            Resolved::Mmio(h, base) => {
                let mut at = base;
                for piece in buf.chunks_mut(MMIO_CHUNK) {
                    h.mmio_read(at, piece);
                    at += piece.len() as u64;
                }
                Ok(())
            }
        }
    }

    /// Applies a request of the peer on the reader thread, when that keeps the order (the
    /// caller checked that nothing is queued for the service thread) and cannot block (RAM
    /// and registers; MMIO handlers run on the service thread). Returns whether it did.
    pub(crate) fn apply_inline(
        &self,
        s: &Connection,
        f: &Frame<'_>,
    ) -> std::result::Result<bool, session::EndError> {
        match *f {
            Frame::Write {
                window,
                offset,
                data,
            } => match self.resolve(window, offset, data.len()) {
                Ok(Resolved::Ram(span)) => {
                    if span.write_at(0, data).is_err() {
                        tracing::debug!(window, offset, "dropped a posted write from the peer");
                    }
                    Ok(true)
                }
                // Doorbell-style device memory takes the write here, without a hop through
                // the service thread (run to completion); other MMIO goes there.
                Ok(Resolved::Mmio(h, base)) => Ok(h.mmio_write_nonblocking(base, data)),
                Err(status) => {
                    tracing::debug!(
                        window,
                        offset,
                        len = data.len(),
                        ?status,
                        "dropped a posted write from the peer"
                    );
                    Ok(true)
                }
            },
            Frame::Read {
                tag,
                window,
                offset,
                len,
            } => match self.resolve(window, offset, len as usize) {
                Ok(Resolved::Ram(span)) => {
                    session::take_credit(s)?;
                    let mut buf = vec![0u8; len as usize];
                    match span.read_at(0, &mut buf) {
                        Ok(()) => s.reply(tag, Status::Ok, &buf),
                        Err(_) => s.reply(tag, Status::NoRegion, &[]),
                    }
                    Ok(true)
                }
                Ok(Resolved::Mmio(..)) => Ok(false),
                Err(status) => {
                    session::take_credit(s)?;
                    s.reply(tag, status, &[]);
                    Ok(true)
                }
            },
            Frame::DbSet { bits } => {
                self.apply(s, Inbound::DbSet(bits));
                Ok(true)
            }
            Frame::SpadWrite { index, value } => {
                self.apply(s, Inbound::SpadWrite { index, value });
                Ok(true)
            }
            Frame::SpadRead { tag, index } => {
                session::take_credit(s)?;
                self.apply(s, Inbound::SpadRead { tag, index });
                Ok(true)
            }
            Frame::MsgWrite { tag, index, value } => {
                session::take_credit(s)?;
                self.apply(s, Inbound::MsgWrite { tag, index, value });
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    pub(crate) fn apply(&self, s: &Connection, item: Inbound) {
        match item {
            Inbound::Write {
                window,
                offset,
                data,
            } => {
                if let Err(status) = self.write_window(window, offset, &data) {
                    tracing::debug!(
                        window,
                        offset,
                        len = data.len(),
                        ?status,
                        "dropped a posted write from the peer"
                    );
                }
            }
            Inbound::Read {
                tag,
                window,
                offset,
                len,
            } => {
                let mut buf = vec![0u8; len as usize];
                match self.read_window(window, offset, &mut buf) {
                    Ok(()) => s.reply(tag, Status::Ok, &buf),
                    Err(status) => s.reply(tag, status, &[]),
                }
            }
            Inbound::DbSet(bits) => {
                let mut db = lock(&self.regs.db);
                db.bits |= bits & self.cfg.link.db_valid_mask();
                drop(db);
                self.regs.db_cv.notify_all();
            }
            Inbound::SpadWrite { index, value } => {
                if let Some(v) = lock(&self.regs.spads).get_mut(usize::from(index)) {
                    *v = value;
                }
            }
            Inbound::SpadRead { tag, index } => {
                let value = lock(&self.regs.spads).get(usize::from(index)).copied();
                match value {
                    Some(v) => s.reply(tag, Status::Ok, &v.to_le_bytes()),
                    None => s.reply(tag, Status::NoSuchIndex, &[]),
                }
            }
            Inbound::MsgWrite { tag, index, value } => {
                let status = {
                    let mut m = lock(&self.regs.msgs);
                    let bit = 1u64 << (index % 64);
                    let sts = m.sts;
                    match m.values.get_mut(usize::from(index)) {
                        None => Status::NoSuchIndex,
                        Some(_) if sts & bit != 0 => Status::MessageBusy,
                        Some(v) => {
                            *v = value;
                            m.sts |= bit;
                            Status::Ok
                        }
                    }
                };
                if status == Status::Ok {
                    self.regs.msg_cv.notify_all();
                }
                s.reply(tag, status, &[]);
            }
        }
    }
}

/// One side of an NTB link over TCP. See the [crate documentation](crate).
pub struct TcpNtb {
    inner: Arc<Inner>,
    local_addr: Option<SocketAddr>,
    supervisor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for TcpNtb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpNtb")
            .field("local_addr", &self.local_addr)
            .field("link", &self.link_state())
            .finish_non_exhaustive()
    }
}

impl Inner {
    /// A link's state before its supervisor thread runs: no connection, link down.
    fn new(
        asp: Arc<AddressSpace>,
        cfg: TcpConfig,
        creds: Credentials,
    ) -> std::result::Result<Self, TcpError> {
        let link = cfg.link;
        Ok(Inner {
            cfg,
            creds,
            asp,
            regs: Registers::new(&link),
            link: LinkSlot {
                current: Mutex::new(None),
                state: Mutex::new(LinkInner {
                    up: false,
                    generation: 0,
                }),
                changed: Condvar::new(),
            },
            stop: Stop {
                requested: AtomicBool::new(false),
                lock: Mutex::new(()),
                cv: Condvar::new(),
                wake: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                    .map_err(|e| TcpError::Os("eventfd", e))?,
            },
            counters: Counters::default(),
            congestion: Mutex::new(None),
        })
    }
}

impl TcpNtb {
    fn start(
        asp: Arc<AddressSpace>,
        cfg: TcpConfig,
        creds: Credentials,
        mode: Mode,
        local_addr: Option<SocketAddr>,
    ) -> std::result::Result<Self, TcpError> {
        cfg.validate()?;
        let inner = Arc::new(Inner::new(asp, cfg, creds)?);
        let thread_inner = inner.clone();
        let supervisor = std::thread::Builder::new()
            .name("fabric-tcp".into())
            .spawn(move || session::supervise(thread_inner, mode))
            .map_err(|e| TcpError::Os("spawning the fabric thread", e))?;
        Ok(Self {
            inner,
            local_addr,
            supervisor: Some(supervisor),
        })
    }

    /// Listens on `addr` (port 0 picks a free port: see [`TcpNtb::local_addr`]) and serves one
    /// peer connection at a time, accepting again whenever the link goes down. Returns at once;
    /// the link comes up in the background ([`Link::wait_link`]).
    pub fn listen(
        addr: SocketAddr,
        asp: Arc<AddressSpace>,
        cfg: TcpConfig,
        creds: Credentials,
    ) -> std::result::Result<Self, TcpError> {
        let listener =
            TcpListener::bind(addr).map_err(|source| TcpError::Listen { addr, source })?;
        let setup = || -> std::io::Result<SocketAddr> {
            listener.set_nonblocking(true)?;
            listener.local_addr()
        };
        let local = setup().map_err(|source| TcpError::Listen { addr, source })?;
        Self::start(asp, cfg, creds, Mode::Listen(listener), Some(local))
    }

    /// Connects to a listening peer at `addr`, retrying every
    /// [`TcpConfig::reconnect_interval`] and reconnecting whenever the link goes down. Returns
    /// at once; the link comes up in the background ([`Link::wait_link`]).
    pub fn connect(
        addr: SocketAddr,
        asp: Arc<AddressSpace>,
        cfg: TcpConfig,
        creds: Credentials,
    ) -> std::result::Result<Self, TcpError> {
        Self::start(asp, cfg, creds, Mode::Connect(addr), None)
    }

    /// The listening address (for a listener).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.local_addr
    }

    /// Counters since creation.
    pub fn stats(&self) -> TcpStats {
        TcpStats {
            links_up: self.inner.counters.links_up.load(Ordering::Relaxed),
            refused: self.inner.counters.refused.load(Ordering::Relaxed),
        }
    }

    /// The TCP congestion control of the last connection's socket (`None` before the first
    /// connection): [`TcpConfig::congestion`] when the kernel granted it.
    pub fn congestion(&self) -> Option<String> {
        lock(&self.inner.congestion).clone()
    }

    /// Waits until at least `count` connections were refused (see [`TcpStats::refused`]).
    pub fn wait_refused(&self, count: u64, timeout: Duration) -> Result<()> {
        let refused = &self.inner.counters.refused;
        let l = lock(&self.inner.link.state);
        let _l = devlend_sync::wait_timeout_while(&self.inner.link.changed, l, timeout, |_| {
            refused.load(Ordering::Relaxed) < count
        });
        if refused.load(Ordering::Relaxed) >= count {
            Ok(())
        } else {
            Err(FabricError::Timeout)
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &TcpConfig {
        &self.inner.cfg
    }

    fn check_window(&self, window: usize) -> Result<()> {
        registers::check_window(window, self.inner.cfg.link.mw_count)
    }

    /// The connection and the peer's translated size of `window`, checked for an access of
    /// `len` bytes at `offset`.
    fn checked_peer(&self, window: usize, offset: u64, len: usize) -> Result<Arc<Connection>> {
        if len == 0 {
            return Err(FabricError::BadAccessSize(0));
        }
        let s = self.inner.session()?;
        registers::check_access(window, offset, len, peer_size(&s, window)?)?;
        Ok(s)
    }

    fn check_db(&self, bits: u64) -> Result<()> {
        registers::check_doorbells(bits, self.db_valid_mask())
    }
}

fn peer_size(s: &Connection, window: usize) -> Result<u64> {
    let peer = lock(&s.peer);
    let size = *peer
        .window_sizes
        .get(window)
        .ok_or(FabricError::NoSuchIndex {
            what: "memory window",
            index: window,
            count: peer.window_sizes.len(),
        })?;
    if size == 0 {
        return Err(FabricError::WindowNotTranslated(window));
    }
    Ok(size)
}

/// Most read requests [`PeerWindows::peer_mw_read_many`] has outstanding at once: enough to
/// cover a device's burst (32 commands' data), and far below the tags a side may have
/// outstanding, so that callers taking tags one by one cannot starve each other.
const READS_AT_ONCE: usize = 32;

/// Maps a failed reply of the peer to the error the caller sees. `access` is the window access
/// the request made (window, offset, length, the size it was checked against here), for
/// [`Status::OutsideWindow`]; requests that access no window pass `None`.
fn reply_error(
    status: Status,
    what: &'static str,
    index: usize,
    count: usize,
    access: Option<(u64, usize, u64)>,
) -> FabricError {
    match status {
        Status::Ok => FabricError::Protocol("unexpected reply".into()),
        Status::NotTranslated | Status::NoRegion => FabricError::WindowNotTranslated(index),
        Status::OutsideWindow => match access {
            Some((offset, len, size)) => registers::outside_window(index, offset, len, size),
            None => FabricError::Protocol(format!("{what} {index}: answered 'outside window'")),
        },
        Status::NoSuchIndex => FabricError::NoSuchIndex { what, index, count },
        Status::MessageBusy => FabricError::MessageBusy(index),
        Status::BadAccess => FabricError::BadAccessSize(0),
    }
}

impl Drop for TcpNtb {
    fn drop(&mut self) {
        self.inner.stop();
        if let Some(t) = self.supervisor.take() {
            let _ = t.join();
        }
    }
}

impl Link for TcpNtb {
    fn link_state(&self) -> LinkState {
        if lock(&self.inner.link.state).up {
            LinkState::Up
        } else {
            LinkState::Down
        }
    }

    fn wait_link(&self, want: LinkState, timeout: Duration) -> Result<()> {
        let l = lock(&self.inner.link.state);
        let (l, _) = devlend_sync::wait_timeout_while(&self.inner.link.changed, l, timeout, |l| {
            l.up != (want == LinkState::Up)
        });
        if l.up == (want == LinkState::Up) {
            Ok(())
        } else {
            Err(FabricError::Timeout)
        }
    }

    fn link_generation(&self) -> u64 {
        lock(&self.inner.link.state).generation
    }

    /// Closes the connection at once (the peer's waits end too once it notices); the
    /// background thread reconnects or accepts again as after any link-down.
    fn drop_peer(&self, reason: &str) {
        let current = lock(&self.inner.link.current).clone();
        if let Some(s) = current {
            tracing::warn!(reason, "fabric link down: dropping the peer");
            self.inner.link_down(&s);
        }
    }
}

impl MemoryWindows for TcpNtb {
    fn mw_count(&self) -> usize {
        self.inner.cfg.link.mw_count
    }

    fn mw_get_align(&self, window: usize) -> Result<MwAlign> {
        self.check_window(window)?;
        Ok(self.inner.cfg.link.mw_align())
    }

    fn mw_set_trans(&self, window: usize, addr: BusAddr, size: u64) -> Result<()> {
        self.check_window(window)?;
        registers::check_translation(&self.inner.cfg.link, window, addr, size)?;
        self.inner.asp.resolve(addr, size)?;
        let mut windows = lock(&self.inner.regs.windows);
        if let Some(slot) = windows.get_mut(window) {
            *slot = Some(Translation { addr, size });
        }
        announce(&self.inner, window, size)
    }

    fn mw_clear_trans(&self, window: usize) -> Result<()> {
        self.check_window(window)?;
        let mut windows = lock(&self.inner.regs.windows);
        if let Some(slot) = windows.get_mut(window) {
            *slot = None;
        }
        announce(&self.inner, window, 0)
    }
}

/// Tells the current connection (up or still in its hello) about a translation change.
/// Called with the `windows` lock held, so that it cannot cross the hello. A connection that
/// is closing takes no more frames: that is [`registers::announced`]'s link-down.
fn announce(inner: &Inner, window: usize, size: u64) -> Result<()> {
    if let Some(s) = lock(&inner.link.current).as_ref() {
        registers::announced(s.out.push_now(|b| {
            Frame::Trans {
                window: window as u16,
                size,
            }
            .encode(b)
        }))?;
        s.out.kick();
    }
    Ok(())
}

impl PeerWindows for TcpNtb {
    fn peer_mw_count(&self) -> usize {
        self.inner
            .session()
            .map_or(0, |s| lock(&s.peer).window_sizes.len())
    }

    fn peer_mw_size(&self, window: usize) -> Result<u64> {
        peer_size(&*self.inner.session()?, window)
    }

    fn peer_mw_write(&self, window: usize, offset: WindowOffset, data: &[u8]) -> Result<()> {
        let s = self.checked_peer(window, offset.0, data.len())?;
        if data.len() <= HELD_WRITE_MAX && defer_flush(&s) {
            // Inside a posted-write batch: queued behind what is queued, sent with the rest
            // of the batch when it ends (or sooner, by whoever flushes first).
            return s.queue_posted(window as u16, offset.0, data);
        }
        s.write_posted(window as u16, offset.0, data)
    }

    fn peer_mw_read(&self, window: usize, offset: WindowOffset, buf: &mut [u8]) -> Result<()> {
        self.peer_mw_read_many(window, &mut [(offset, buf)])
    }

    /// Every read goes out (in pieces of at most [`frame::MAX_DATA`], `READS_AT_ONCE` pieces
    /// at a time) before the first reply is awaited, so that a batch costs about one round
    /// trip.
    fn peer_mw_read_many(
        &self,
        window: usize,
        reads: &mut [(WindowOffset, &mut [u8])],
    ) -> Result<()> {
        // (which read, where in its buffer, window offset, length) of each request.
        let mut pieces = Vec::new();
        let mut session = None;
        for (i, (offset, buf)) in reads.iter().enumerate() {
            session = Some(self.checked_peer(window, offset.0, buf.len())?);
            let mut at = 0usize;
            while at < buf.len() {
                let len = (buf.len() - at).min(frame::MAX_DATA);
                pieces.push((i, at, offset.0 + at as u64, len));
                at += len;
            }
        }
        let Some(s) = session else {
            return Ok(());
        };
        let timeout = self.inner.cfg.link.completion_timeout;
        for group in pieces.chunks(READS_AT_ONCE) {
            let replies = s.call_many(&self.inner, timeout, group.len(), |k, tag, b| {
                if let Some(&(_, _, offset, len)) = group.get(k) {
                    Frame::Read {
                        tag,
                        window: window as u16,
                        offset,
                        len: len as u32,
                    }
                    .encode(b)
                }
            })?;
            for (&(i, at, offset, len), Reply { status, data }) in group.iter().zip(replies) {
                if status != Status::Ok {
                    let size = peer_size(&s, window).unwrap_or(0);
                    let access = Some((offset, len, size));
                    return Err(reply_error(status, "memory window", window, 0, access));
                }
                let piece = reads
                    .get_mut(i)
                    .and_then(|(_, buf)| buf.get_mut(at..at + len))
                    .ok_or_else(|| FabricError::Protocol("read piece out of place".into()))?;
                if data.len() != piece.len() {
                    return Err(FabricError::Protocol(format!(
                        "read of {} bytes answered with {}",
                        piece.len(),
                        data.len()
                    )));
                }
                piece.copy_from_slice(&data);
            }
        }
        Ok(())
    }

    fn peer_mw_direct(&self, window: usize) -> Result<Option<MemSpan>> {
        peer_size(&*self.inner.session()?, window)?;
        Ok(None)
    }
}

impl Doorbells for TcpNtb {
    fn db_valid_mask(&self) -> u64 {
        self.inner.cfg.link.db_valid_mask()
    }

    fn db_read(&self) -> u64 {
        lock(&self.inner.regs.db).bits
    }

    fn db_clear(&self, bits: u64) -> Result<()> {
        self.check_db(bits)?;
        lock(&self.inner.regs.db).bits &= !bits;
        Ok(())
    }

    fn db_read_mask(&self) -> u64 {
        lock(&self.inner.regs.db).mask
    }

    fn db_set_mask(&self, bits: u64) -> Result<()> {
        self.check_db(bits)?;
        lock(&self.inner.regs.db).mask |= bits;
        Ok(())
    }

    fn db_clear_mask(&self, bits: u64) -> Result<()> {
        self.check_db(bits)?;
        lock(&self.inner.regs.db).mask &= !bits;
        self.inner.regs.db_cv.notify_all();
        Ok(())
    }

    /// The waiter reads the socket itself while no other caller does (as a caller waiting
    /// for a read's reply does), so that the doorbell wakes it directly: the reader thread
    /// is not a hop between the peer's doorbell and its waiter.
    fn db_wait(&self, bits: u64, timeout: Duration) -> Result<u64> {
        registers::check_db_wait(bits, self.db_valid_mask())?;
        let s = self.inner.session()?;
        let regs = &self.inner.regs;
        let rung = || {
            let db = lock(&regs.db);
            registers::deliverable(db.bits, db.mask, bits)
        };
        // A timeout too large to add to now waits an hour at a time.
        let deadline = Instant::now() + timeout.min(Duration::from_secs(3600));
        s.await_until(
            &self.inner,
            Lead::Answer,
            deadline,
            || match rung() {
                0 if s.is_up() => None,
                0 => Some(Err(FabricError::LinkDown)),
                b => Some(Ok(b)),
            },
            |wait| match wait_on(&regs.db, &regs.db_cv, &s, wait, |db| {
                registers::deliverable(db.bits, db.mask, bits)
            }) {
                Err(FabricError::Timeout) => None,
                r => Some(r),
            },
        )
    }

    fn db_wait_polls(&self) -> bool {
        true
    }

    fn wait_reading(
        &self,
        deadline: Instant,
        woken: &mut dyn FnMut() -> bool,
        park: &mut dyn FnMut(Duration),
    ) -> Result<bool> {
        let s = self.inner.session()?;
        // `woken` is called from both closures below, one at a time.
        let woken = std::cell::RefCell::new(woken);
        let done = || (*woken.borrow_mut())();
        match s.await_until(
            &self.inner,
            Lead::Yielding,
            deadline,
            || {
                if done() {
                    Some(Ok(()))
                } else if s.is_up() {
                    None
                } else {
                    Some(Err(FabricError::LinkDown))
                }
            },
            |wait| {
                park(wait);
                done().then_some(Ok(()))
            },
        ) {
            Ok(()) | Err(FabricError::Timeout) => Ok(true),
            Err(e) => Err(e),
        }
    }

    fn interrupt_wait_reading(&self) {
        if let Ok(s) = self.inner.session() {
            s.interrupt_reading();
        }
    }

    fn peer_db_set(&self, bits: u64) -> Result<()> {
        let s = self.inner.session()?;
        let peer_valid = lock(&s.peer).db_valid_mask;
        registers::check_peer_doorbells(bits, self.db_valid_mask(), peer_valid)?;
        s.out
            .push_request(|b| Frame::DbSet { bits }.encode(b))
            .map_err(|_| FabricError::LinkDown)?;
        // A doorbell is a posted write too (an MSI-X message after the completion it
        // announces): inside a batch it leaves with the batch.
        if defer_flush(&s) {
            return Ok(());
        }
        s.flush(Flush::Caller).map_err(|_| FabricError::LinkDown)
    }
}

/// Posted writes up to this size are held back inside a batch ([`posted`]); larger ones are
/// sent at once (they fill records and segments by themselves).
const HELD_WRITE_MAX: usize = 16 * 1024;

/// Inside a posted-write batch, registers a flush of `s` for the batch's end (once per
/// connection and batch) and returns `true`; outside one returns `false`: the caller flushes.
fn defer_flush(s: &Arc<Connection>) -> bool {
    let c = Arc::clone(s);
    posted::defer(Arc::as_ptr(s) as usize, move || {
        // A send that fails takes the link down on the writer thread as well; a posted
        // write has no one to report to.
        if let Err(e) = c.flush(Flush::Caller) {
            tracing::debug!(error = %e, "fabric send of a posted-write batch failed");
        }
    })
}

impl Scratchpads for TcpNtb {
    fn spad_count(&self) -> usize {
        self.inner.cfg.link.spad_count
    }

    fn spad_read(&self, index: usize) -> Result<u32> {
        lock(&self.inner.regs.spads)
            .get(index)
            .copied()
            .ok_or(FabricError::NoSuchIndex {
                what: "scratchpad",
                index,
                count: self.spad_count(),
            })
    }

    fn spad_write(&self, index: usize, value: u32) -> Result<()> {
        let count = self.spad_count();
        let mut spads = lock(&self.inner.regs.spads);
        let v = spads.get_mut(index).ok_or(FabricError::NoSuchIndex {
            what: "scratchpad",
            index,
            count,
        })?;
        *v = value;
        Ok(())
    }

    fn peer_spad_read(&self, index: usize) -> Result<u32> {
        let s = self.inner.session()?;
        let count = lock(&s.peer).spad_count;
        registers::check_index("scratchpad", index, count)?;
        let Reply { status, data } = s.call(
            &self.inner,
            self.inner.cfg.link.completion_timeout,
            |tag, b| {
                Frame::SpadRead {
                    tag,
                    index: index as u16,
                }
                .encode(b)
            },
        )?;
        if status != Status::Ok {
            return Err(reply_error(status, "scratchpad", index, count, None));
        }
        let bytes: [u8; 4] = data
            .as_slice()
            .try_into()
            .map_err(|_| FabricError::Protocol("scratchpad reply is not 4 bytes".into()))?;
        Ok(u32::from_le_bytes(bytes))
    }

    fn peer_spad_write(&self, index: usize, value: u32) -> Result<()> {
        let s = self.inner.session()?;
        let count = lock(&s.peer).spad_count;
        registers::check_index("scratchpad", index, count)?;
        s.out
            .push_request(|b| {
                Frame::SpadWrite {
                    index: index as u16,
                    value,
                }
                .encode(b)
            })
            .map_err(|_| FabricError::LinkDown)?;
        s.flush(Flush::Caller).map_err(|_| FabricError::LinkDown)
    }
}

impl Messages for TcpNtb {
    fn msg_count(&self) -> usize {
        self.inner.cfg.link.msg_count
    }

    fn msg_read_sts(&self) -> u64 {
        lock(&self.inner.regs.msgs).sts
    }

    fn msg_read(&self, index: usize) -> Result<u32> {
        lock(&self.inner.regs.msgs)
            .values
            .get(index)
            .copied()
            .ok_or(FabricError::NoSuchIndex {
                what: "message register",
                index,
                count: self.msg_count(),
            })
    }

    fn msg_clear_sts(&self, bits: u64) -> Result<()> {
        registers::check_messages(bits, self.msg_count())?;
        lock(&self.inner.regs.msgs).sts &= !bits;
        Ok(())
    }

    fn peer_msg_write(&self, index: usize, value: u32) -> Result<()> {
        let s = self.inner.session()?;
        let count = lock(&s.peer).msg_count;
        registers::check_index("message register", index, count)?;
        let Reply { status, .. } = s.call(
            &self.inner,
            self.inner.cfg.link.completion_timeout,
            |tag, b| {
                Frame::MsgWrite {
                    tag,
                    index: index as u16,
                    value,
                }
                .encode(b)
            },
        )?;
        match status {
            Status::Ok => Ok(()),
            other => Err(reply_error(other, "message register", index, count, None)),
        }
    }

    fn msg_wait(&self, bits: u64, timeout: Duration) -> Result<u64> {
        registers::check_msg_wait(bits, self.msg_count())?;
        let s = self.inner.session()?;
        let regs = &self.inner.regs;
        wait_on(&regs.msgs, &regs.msg_cv, &s, timeout, |m| m.sts & bits)
    }
}

impl Ntb for TcpNtb {
    fn address_space(&self) -> &AddressSpace {
        &self.inner.asp
    }

    fn backend(&self) -> &'static str {
        "tcp"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node stopping while its link's connection is still in its handshake: `stop` finds
    /// no connection to close, and the connection is published after it. It must be closed
    /// then, or its reader waits on the peer (which waits the same way) and both nodes' drops
    /// wait for ever (two `devlend node`s SIGTERMed right after they started hung so).
    #[test]
    fn a_connection_published_after_stop_is_closed_at_once() {
        let inner = Inner::new(
            Arc::new(AddressSpace::new()),
            TcpConfig::default(),
            Credentials::Insecure,
        )
        .expect("a link's state");
        inner.stop();
        let (session, _peer) = crate::session::testing::plain_session();
        let session = Arc::new(session);
        inner.publish(&session);
        assert_eq!(session.close(), None, "publish left the connection open");
        assert!(lock(&inner.link.current).is_none());

        // Before a stop, publishing keeps the connection.
        let inner = Inner::new(
            Arc::new(AddressSpace::new()),
            TcpConfig::default(),
            Credentials::Insecure,
        )
        .expect("a link's state");
        let (session, _peer) = crate::session::testing::plain_session();
        let session = Arc::new(session);
        inner.publish(&session);
        assert!(lock(&inner.link.current).is_some());
        assert_eq!(session.close(), Some(false), "open until closed");
    }
}
