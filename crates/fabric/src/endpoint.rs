//! The backend-independent half of a link side: register semantics over control pages, window
//! translation tables, the MMIO request ring and its service thread, link state.
//!
//! Both `loopback` and `shm` are an [`Endpoint`] plus a way to exchange control pages and
//! window announcements with the peer: loopback hands `Arc`s across, shm sends fds over a UNIX
//! socket.
//!
//! ## Threads and locks
//! - Caller threads run every trait method.
//! - One service thread per connection ([`Endpoint::attach`] spawns it, it exits when the
//!   connection goes down) consumes the MMIO request ring in this side's page and calls the
//!   local [`MmioHandler`]s in ring order.
//! - Lock order: `reads` → `producer`; `windows` → `link` → `current`. No lock is held
//!   while calling an [`MmioHandler`] or while sleeping, except `reads`/`producer` (held by a
//!   caller thread across its own ring wait, which is bounded by the completion timeout and
//!   ended by link-down).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use devlend_memory::{BusAddr, MemSpan};

use crate::page::{self, ControlPage};
use crate::registers;
use crate::sync::WaitEnd;
use crate::{
    AddressSpace, FabricError, LinkConfig, LinkState, MwAlign, Resolved, Result, WindowOffset,
};
use devlend_sync::lock;

/// `timeout` from now; `None` (no deadline) when that is beyond what `Instant` can hold.
fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

/// Ring entry kinds.
const KIND_WRITE: u32 = 1;
const KIND_READ: u32 = 2;
/// Completion statuses.
/// How long taking a link down waits for its ring service thread to finish the request it
/// is serving; a device handler that blocks longer leaves the thread to end on its own.
const SERVICE_QUIESCE: Duration = Duration::from_secs(5);

const CPL_OK: u32 = 0;
const CPL_NOT_TRANSLATED: u32 = 1;
const CPL_OUTSIDE: u32 = 2;
const CPL_BAD_REQUEST: u32 = 3;

/// One of this side's inbound translations.
#[derive(Clone)]
pub(crate) struct LocalWindow {
    /// Translated size.
    pub(crate) size: u64,
    /// What the range resolves to.
    pub(crate) target: Resolved,
}

/// What this side reaches behind one of its outbound apertures.
#[derive(Clone, Debug)]
pub(crate) enum PeerWindow {
    /// Peer RAM, mapped here: exactly the translated range.
    Ram(MemSpan),
    /// Peer MMIO of `size` bytes, reached over the ring.
    Mmio {
        /// Translated size.
        size: u64,
    },
}

impl PeerWindow {
    fn size(&self) -> u64 {
        match self {
            PeerWindow::Ram(span) => span.len(),
            PeerWindow::Mmio { size } => *size,
        }
    }
}

/// The peer's register counts, as it announced them (already bounded by the page maxima).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PeerCounts {
    pub(crate) mw_count: usize,
    pub(crate) spad_count: usize,
    pub(crate) msg_count: usize,
    pub(crate) db_valid: u64,
}

impl PeerCounts {
    /// Bounds untrusted counts by what a page can hold.
    pub(crate) fn bounded(mw_count: u64, spad_count: u64, msg_count: u64, db_count: u64) -> Self {
        let db_count = db_count.min(64);
        Self {
            mw_count: mw_count.min(page::MAX_WINDOWS as u64) as usize,
            spad_count: spad_count.min(page::MAX_SPADS as u64) as usize,
            msg_count: msg_count.min(page::MAX_MSGS as u64) as usize,
            db_valid: if db_count == 64 {
                u64::MAX
            } else {
                (1u64 << db_count) - 1
            },
        }
    }

    pub(crate) fn of(cfg: &LinkConfig) -> Self {
        Self::bounded(
            cfg.mw_count as u64,
            cfg.spad_count as u64,
            cfg.msg_count as u64,
            u64::from(cfg.db_count),
        )
    }
}

/// Tells the peer about this side's inbound translations (`None`: cleared).
pub(crate) trait Announce: Send + Sync {
    fn announce(&self, window: usize, what: Option<&LocalWindow>) -> Result<()>;
}

#[derive(Default)]
struct Producer {
    /// Next ring position to fill in the peer's ring.
    position: u32,
    /// The consumer's head as last read: positions before it are free. Re-read from the
    /// peer's page only when the ring looks full.
    head: u32,
}

/// Writes the header of the ring entry at `e`: what it asks (`kind`), of which window, how many
/// bytes at which offset.
fn store_request(
    page: &ControlPage,
    e: u64,
    kind: u32,
    window: usize,
    len: usize,
    offset: u64,
) -> Result<()> {
    let mem = page.mem();
    mem.store_u32(e + page::E_KIND, kind)?;
    mem.store_u32(e + page::E_WINDOW, window as u32)?;
    mem.store_u32(e + page::E_LEN, len as u32)?;
    mem.store_u64(e + page::E_OFFSET, offset)?;
    Ok(())
}

/// One connection of the page-based backends (shm, loopback): this side's control page, the
/// peer's, what the peer exported. (Not `devlend_fabric_tcp`'s `Connection`, a TLS connection.)
pub(crate) struct PagePair {
    local: Arc<ControlPage>,
    peer: Arc<ControlPage>,
    peer_counts: PeerCounts,
    down: AtomicBool,
    reads: Mutex<u32>,
    producer: Mutex<Producer>,
    announce: Box<dyn Announce>,
    /// The ring service thread, and the channel its end closes.
    service: Mutex<Option<Service>>,
}

/// A running ring service thread.
struct Service {
    thread: std::thread::JoinHandle<()>,
    /// Disconnected when the thread ends.
    done: std::sync::mpsc::Receiver<()>,
}

impl PagePair {
    pub(crate) fn new(
        local: Arc<ControlPage>,
        peer: Arc<ControlPage>,
        peer_counts: PeerCounts,
        announce: Box<dyn Announce>,
    ) -> Self {
        Self {
            local,
            peer,
            peer_counts,
            down: AtomicBool::new(false),
            reads: Mutex::new(0),
            producer: Mutex::new(Producer::default()),
            announce,
            service: Mutex::new(None),
        }
    }

    /// Waits (up to [`SERVICE_QUIESCE`]) for the ring service thread of this pair to end
    /// after [`PagePair::stop_waiters`], so that no request of this connection is served
    /// after the link went down. Not from the service thread itself.
    fn join_service(&self) {
        let Some(s) = lock(&self.service).take() else {
            return;
        };
        if s.thread.thread().id() == std::thread::current().id() {
            return;
        }
        match s.done.recv_timeout(SERVICE_QUIESCE) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    "ntb ring service still busy {SERVICE_QUIESCE:?} after the link went down; left to end on its own"
                );
            }
            Ok(()) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = s.thread.join();
            }
        }
    }

    /// This side's page of the connection.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn local_page(&self) -> &ControlPage {
        &self.local
    }

    /// The peer's page of the connection.
    #[cfg(any(test, feature = "fuzzing"))]
    pub(crate) fn peer_page(&self) -> &ControlPage {
        &self.peer
    }

    /// Whether this connection has ended.
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    fn stop_waiters(&self) {
        self.down.store(true, Ordering::SeqCst);
        for off in [
            page::DB_WAIT,
            page::MSG_WAIT,
            page::CPL_WAIT,
            page::RING_WAIT,
        ] {
            if let Ok(w) = self.local.wait_word(off) {
                w.wake_all();
            }
        }
        if let Ok(w) = self.peer.wait_word(page::SPACE_WAIT) {
            w.wake_all();
        }
    }

    fn ended(&self, e: WaitEnd) -> FabricError {
        match e {
            WaitEnd::Stopped => FabricError::LinkDown,
            WaitEnd::Timeout => FabricError::Timeout,
        }
    }

    /// Claims the next slot of the peer's ring (waiting for space) and fills it.
    fn push(
        &self,
        producer: &mut Producer,
        spin: Duration,
        deadline: Option<Instant>,
        fill: impl FnOnce(&ControlPage, u64) -> Result<()>,
    ) -> Result<()> {
        let position = producer.position;
        if position.wrapping_sub(producer.head) >= page::RING_ENTRIES {
            let head = self.peer.u32_at(page::RING_HEAD)?;
            producer.head = self
                .peer
                .wait_word(page::SPACE_WAIT)?
                .wait(
                    spin,
                    deadline,
                    || {
                        let h = head.load(Ordering::Acquire);
                        (position.wrapping_sub(h) < page::RING_ENTRIES).then_some(h)
                    },
                    || self.is_down(),
                )
                .map_err(|e| self.ended(e))?;
        }
        let entry = ControlPage::entry_offset(position);
        fill(&self.peer, entry)?;
        self.peer
            .u32_at(entry + page::E_SEQ)?
            .store(position.wrapping_add(1), Ordering::Release);
        producer.position = position.wrapping_add(1);
        self.peer.wait_word(page::RING_WAIT)?.notify();
        Ok(())
    }

    fn mmio_write(&self, cfg: &LinkConfig, window: usize, offset: u64, data: &[u8]) -> Result<()> {
        let deadline = deadline_after(cfg.completion_timeout);
        let mut producer = lock(&self.producer);
        let mut at = offset;
        for chunk in data.chunks(page::ENTRY_DATA_MAX) {
            self.push(&mut producer, cfg.spin, deadline, |p, e| {
                store_request(p, e, KIND_WRITE, window, chunk.len(), at)?;
                p.mem().write_at(e + page::E_DATA, chunk)?;
                Ok(())
            })?;
            at += chunk.len() as u64;
        }
        Ok(())
    }

    fn mmio_read(
        &self,
        cfg: &LinkConfig,
        window: usize,
        size: u64,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let mut tag_state = lock(&self.reads);
        let mut at = offset;
        for chunk in buf.chunks_mut(page::ENTRY_DATA_MAX) {
            let deadline = deadline_after(cfg.completion_timeout);
            *tag_state = tag_state.wrapping_add(1).max(1);
            let tag = *tag_state;
            {
                let mut producer = lock(&self.producer);
                self.push(&mut producer, cfg.spin, deadline, |p, e| {
                    store_request(p, e, KIND_READ, window, chunk.len(), at)?;
                    p.mem().store_u32(e + page::E_TAG, tag)?;
                    Ok(())
                })?;
            }
            let cpl_tag = self.local.u32_at(page::CPL_TAG)?;
            self.local
                .wait_word(page::CPL_WAIT)?
                .wait(
                    cfg.spin,
                    deadline,
                    || (cpl_tag.load(Ordering::Acquire) == tag).then_some(()),
                    || self.is_down(),
                )
                .map_err(|e| self.ended(e))?;
            match self.local.mem().load_u32(page::CPL_STATUS)? {
                CPL_OK => self.local.mem().read_at(page::CPL_DATA, chunk)?,
                CPL_NOT_TRANSLATED => return Err(FabricError::WindowNotTranslated(window)),
                CPL_OUTSIDE => {
                    return Err(registers::outside_window(window, at, chunk.len(), size))
                }
                other => {
                    return Err(FabricError::Protocol(format!(
                        "peer answered a read with status {other}"
                    )))
                }
            }
            at += chunk.len() as u64;
        }
        Ok(())
    }
}

/// The live connection as the hot paths see it.
struct Live {
    pair: Arc<PagePair>,
    /// The peer's announced translations, indexed by its window number.
    windows: Vec<Option<PeerWindow>>,
}

struct LinkInner {
    generation: u64,
    pair: Option<Arc<PagePair>>,
    /// This side's current page: the pair's, or the last one (registers stay readable
    /// while the link is down; a new connection starts from a fresh page).
    page: Arc<ControlPage>,
}

/// One side of a link, independent of how the peer is reached.
pub(crate) struct Endpoint {
    cfg: LinkConfig,
    asp: Arc<AddressSpace>,
    db_mask: AtomicU64,
    windows: Mutex<Vec<Option<LocalWindow>>>,
    link: Mutex<LinkInner>,
    /// The current connection and what the peer exported over it: a copy of `link.pair`
    /// (written only under `link`) plus the peer's window table, behind one lock so that a
    /// RAM window access costs one uncontended read lock.
    current: RwLock<Option<Live>>,
    link_changed: Condvar,
    msg_write: Mutex<()>,
}

impl Endpoint {
    pub(crate) fn new(cfg: LinkConfig, asp: Arc<AddressSpace>) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            asp,
            db_mask: AtomicU64::new(0),
            windows: Mutex::new(vec![None; cfg.mw_count]),
            link: Mutex::new(LinkInner {
                generation: 0,
                pair: None,
                page: Arc::new(ControlPage::create()?),
            }),
            current: RwLock::new(None),
            link_changed: Condvar::new(),
            msg_write: Mutex::new(()),
        })
    }

    pub(crate) fn config(&self) -> &LinkConfig {
        &self.cfg
    }

    pub(crate) fn asp(&self) -> &AddressSpace {
        &self.asp
    }

    /// The current connection, or [`FabricError::LinkDown`].
    pub(crate) fn pair(&self) -> Result<Arc<PagePair>> {
        let s = devlend_sync::read(&self.current)
            .as_ref()
            .map(|live| live.pair.clone())
            .ok_or(FabricError::LinkDown)?;
        if s.is_down() {
            return Err(FabricError::LinkDown);
        }
        Ok(s)
    }

    fn page(&self) -> Arc<ControlPage> {
        lock(&self.link).page.clone()
    }

    /// Brings the link up on `pair`: installs it, re-announces every local translation to
    /// the new peer, and starts the ring service thread.
    pub(crate) fn attach(self: &Arc<Self>, pair: Arc<PagePair>) -> Result<()> {
        self.install(&pair);
        self.announce_all(&pair)?;
        self.start_service(pair)
    }

    /// Makes `pair` the current connection (link up, generation advanced).
    pub(crate) fn install(&self, pair: &Arc<PagePair>) {
        let replaced = {
            let mut link = lock(&self.link);
            let replaced = link.pair.take();
            if let Some(old) = &replaced {
                old.stop_waiters();
                link.generation += 1;
            }
            link.page = pair.local.clone();
            link.pair = Some(pair.clone());
            *devlend_sync::write(&self.current) = Some(Live {
                pair: pair.clone(),
                windows: vec![None; pair.peer_counts.mw_count],
            });
            link.generation += 1;
            replaced
        };
        self.link_changed.notify_all();
        if let Some(old) = replaced {
            old.join_service();
        }
    }

    /// Tells the peer of `pair` about every local translation.
    pub(crate) fn announce_all(&self, pair: &PagePair) -> Result<()> {
        let windows = lock(&self.windows);
        for (i, w) in windows.iter().enumerate() {
            if let Some(w) = w {
                pair.announce.announce(i, Some(w))?;
            }
        }
        Ok(())
    }

    /// Starts the ring service thread of `pair`; it ends when the pair goes down.
    pub(crate) fn start_service(self: &Arc<Self>, pair: Arc<PagePair>) -> Result<()> {
        let ep = self.clone();
        let (ended, done) = std::sync::mpsc::channel();
        let served = pair.clone();
        let thread = std::thread::Builder::new()
            .name("ntb-mmio-service".into())
            .spawn(move || {
                let _ended = ended;
                ep.serve_ring(&served);
            })
            .map_err(|e| FabricError::io("spawn ring service thread", e))?;
        *lock(&pair.service) = Some(Service { thread, done });
        Ok(())
    }

    /// Installs (or clears) what the peer of `pair` exported behind its window `window`;
    /// ignored when `pair` is no longer the current connection.
    pub(crate) fn set_peer_window(
        &self,
        pair: &Arc<PagePair>,
        window: usize,
        what: Option<PeerWindow>,
    ) -> Result<()> {
        let mut current = devlend_sync::write(&self.current);
        let Some(live) = current
            .as_mut()
            .filter(|live| Arc::ptr_eq(&live.pair, pair))
        else {
            return Ok(());
        };
        let count = live.windows.len();
        let slot = live
            .windows
            .get_mut(window)
            .ok_or(FabricError::NoSuchIndex {
                what: "memory window",
                index: window,
                count,
            })?;
        *slot = what;
        Ok(())
    }

    /// A copy of what the peer exported behind `window`.
    fn peer_window(&self, window: usize) -> Result<PeerWindow> {
        self.with_window(window, |_, w| Ok(w.clone()))
    }

    /// Takes the link down if `pair` is still the current one: every waiter on it returns
    /// [`FabricError::LinkDown`], and what the peer exported is forgotten. Returns once the
    /// pair's ring service thread has ended (see [`PagePair::join_service`]).
    pub(crate) fn detach(&self, pair: &Arc<PagePair>) {
        pair.stop_waiters();
        let mut link = lock(&self.link);
        if link.pair.as_ref().is_some_and(|s| Arc::ptr_eq(s, pair)) {
            link.pair = None;
            *devlend_sync::write(&self.current) = None;
            link.generation += 1;
            drop(link);
            self.link_changed.notify_all();
        } else {
            drop(link);
        }
        pair.join_service();
    }

    /// The ring service loop of one connection.
    fn serve_ring(&self, pair: &PagePair) {
        if let Err(e) = self.serve_ring_inner(pair) {
            if !pair.is_down() {
                tracing::warn!("ntb ring service stopped: {e}");
            }
        }
    }

    fn serve_ring_inner(&self, pair: &PagePair) -> Result<()> {
        let local = &pair.local;
        let ring_wait = local.wait_word(page::RING_WAIT)?;
        let space_wait = local.wait_word(page::SPACE_WAIT)?;
        let head_word = local.u32_at(page::RING_HEAD)?;
        let mut head: u32 = 0;
        let mut data = [0u8; page::ENTRY_DATA_MAX];
        loop {
            let entry = ControlPage::entry_offset(head);
            let seq = local.u32_at(entry + page::E_SEQ)?;
            let want = head.wrapping_add(1);
            let ready = ring_wait.wait(
                self.cfg.spin,
                None,
                || (seq.load(Ordering::Acquire) == want).then_some(()),
                || pair.is_down(),
            );
            if ready.is_err() {
                return Ok(());
            }
            // Drain everything that is ready, then tell a waiting producer about the space.
            let mut done = 0u32;
            loop {
                let entry = ControlPage::entry_offset(head);
                if local.mem().load_u32(entry + page::E_SEQ)? != head.wrapping_add(1) {
                    break;
                }
                let mem = local.mem();
                let kind = mem.load_u32(entry + page::E_KIND)?;
                let window = mem.load_u32(entry + page::E_WINDOW)? as usize;
                let len = mem.load_u32(entry + page::E_LEN)? as usize;
                let offset = mem.load_u64(entry + page::E_OFFSET)?;
                let tag = mem.load_u32(entry + page::E_TAG)?;
                let mut payload = data.get_mut(..len).filter(|_| len > 0);
                // The payload is copied out before the slot counts as consumed.
                if let (KIND_WRITE, Some(buf)) = (kind, payload.as_deref_mut()) {
                    mem.read_at(entry + page::E_DATA, buf)?;
                }
                head = head.wrapping_add(1);
                match (kind, payload) {
                    (KIND_WRITE, Some(buf)) => {
                        // A posted write to a bad place is dropped, as on PCIe.
                        let _ = self.local_access(window, offset, Access::Write(buf));
                    }
                    (KIND_READ, payload) => {
                        let code = match payload {
                            Some(buf) => {
                                match self.local_access(window, offset, Access::Read(&mut *buf)) {
                                    Ok(()) => {
                                        pair.peer.mem().write_at(page::CPL_DATA, buf)?;
                                        CPL_OK
                                    }
                                    Err(code) => code,
                                }
                            }
                            None => CPL_BAD_REQUEST,
                        };
                        let peer = &pair.peer;
                        peer.mem().store_u32(page::CPL_STATUS, code)?;
                        peer.u32_at(page::CPL_TAG)?.store(tag, Ordering::Release);
                        peer.wait_word(page::CPL_WAIT)?.notify();
                    }
                    _ => tracing::debug!(
                        "ntb ring: dropped a malformed request (kind {kind}, len {len})"
                    ),
                }
                done += 1;
                // Hand slots back in batches: the producer re-reads the head only when full.
                if done & 31 == 0 {
                    head_word.store(head, Ordering::Release);
                    space_wait.notify();
                }
            }
            head_word.store(head, Ordering::Release);
            space_wait.notify();
        }
    }

    /// Performs a peer's access to local window `window` (validated against the local,
    /// authoritative translation table).
    fn local_access(
        &self,
        window: usize,
        offset: u64,
        access: Access<'_>,
    ) -> std::result::Result<(), u32> {
        let translation = lock(&self.windows).get(window).cloned().flatten();
        let Some(w) = translation else {
            return Err(CPL_NOT_TRANSLATED);
        };
        let len = access.len() as u64;
        match offset.checked_add(len) {
            Some(end) if end <= w.size => {}
            _ => return Err(CPL_OUTSIDE),
        }
        match (w.target, access) {
            (Resolved::Mmio(h, base), Access::Write(d)) => h.mmio_write(base + offset, d),
            (Resolved::Mmio(h, base), Access::Read(b)) => h.mmio_read(base + offset, b),
            (Resolved::Ram(span), Access::Write(d)) => {
                span.write_at(offset, d).map_err(|_| CPL_OUTSIDE)?
            }
            (Resolved::Ram(span), Access::Read(b)) => {
                span.read_at(offset, b).map_err(|_| CPL_OUTSIDE)?
            }
        }
        Ok(())
    }

    // ---- Link ----

    pub(crate) fn link_state(&self) -> LinkState {
        match self.pair() {
            Ok(_) => LinkState::Up,
            Err(_) => LinkState::Down,
        }
    }

    pub(crate) fn wait_link(&self, want: LinkState, timeout: Duration) -> Result<()> {
        let deadline = deadline_after(timeout);
        let mut link = lock(&self.link);
        loop {
            let up = link.pair.as_ref().is_some_and(|s| !s.is_down());
            if (want == LinkState::Up) == up {
                return Ok(());
            }
            // Without a representable deadline, wake up once a day to re-check.
            let left = deadline.map_or(Duration::from_secs(86_400), |d| {
                d.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                return Err(FabricError::Timeout);
            }
            link = devlend_sync::wait_timeout(&self.link_changed, link, left).0;
        }
    }

    /// Counts every up and every down. A pair that has ended but is not yet detached counts
    /// as down already: its waiters are stopped, and [`Self::link_state`] and
    /// [`Self::wait_link`] report the link down from that moment, so the generation must too.
    pub(crate) fn link_generation(&self) -> u64 {
        let link = lock(&self.link);
        let ended = link.pair.as_ref().is_some_and(|s| s.is_down());
        link.generation + u64::from(ended)
    }

    // ---- MemoryWindows ----

    pub(crate) fn mw_get_align(&self, window: usize) -> Result<MwAlign> {
        self.check_window(window)?;
        Ok(self.cfg.mw_align())
    }

    fn check_window(&self, window: usize) -> Result<()> {
        registers::check_window(window, self.cfg.mw_count)
    }

    pub(crate) fn mw_set_trans(&self, window: usize, addr: BusAddr, size: u64) -> Result<()> {
        registers::check_translation(&self.cfg, window, addr, size)?;
        let target = self.asp.resolve(addr, size)?;
        let translation = LocalWindow { size, target };
        let mut windows = lock(&self.windows);
        let slot = windows.get_mut(window).ok_or(FabricError::NoSuchIndex {
            what: "memory window",
            index: window,
            count: self.cfg.mw_count,
        })?;
        *slot = Some(translation.clone());
        if let Ok(s) = self.pair() {
            registers::announced(s.announce.announce(window, Some(&translation)))?;
        }
        Ok(())
    }

    pub(crate) fn mw_clear_trans(&self, window: usize) -> Result<()> {
        self.check_window(window)?;
        let mut windows = lock(&self.windows);
        if let Some(slot) = windows.get_mut(window) {
            *slot = None;
        }
        if let Ok(s) = self.pair() {
            registers::announced(s.announce.announce(window, None))?;
        }
        Ok(())
    }

    // ---- PeerWindows ----

    pub(crate) fn peer_mw_count(&self) -> usize {
        self.pair().map_or(0, |s| s.peer_counts.mw_count)
    }

    pub(crate) fn peer_mw_size(&self, window: usize) -> Result<u64> {
        Ok(self.peer_window(window)?.size())
    }

    /// Runs `f` on the live pair and peer window `window`, under the `current` read lock.
    fn with_window<R>(
        &self,
        window: usize,
        f: impl FnOnce(&Arc<PagePair>, &PeerWindow) -> Result<R>,
    ) -> Result<R> {
        let current = devlend_sync::read(&self.current);
        let live = current
            .as_ref()
            .filter(|live| !live.pair.is_down())
            .ok_or(FabricError::LinkDown)?;
        match live.windows.get(window) {
            None => Err(FabricError::NoSuchIndex {
                what: "memory window",
                index: window,
                count: live.windows.len(),
            }),
            Some(None) => Err(FabricError::WindowNotTranslated(window)),
            Some(Some(w)) => f(&live.pair, w),
        }
    }

    /// Runs `f` on the peer window after checking the access `[offset, offset + len)`
    /// against it, under one read lock and without clones, so that a RAM copy costs little
    /// more than the copy.
    fn with_peer_window<R>(
        &self,
        window: usize,
        offset: WindowOffset,
        len: usize,
        f: impl FnOnce(&Arc<PagePair>, &PeerWindow) -> Result<R>,
    ) -> Result<R> {
        if len == 0 {
            return Err(FabricError::BadAccessSize(0));
        }
        self.with_window(window, |s, w| {
            registers::check_access(window, offset.0, len, w.size())?;
            f(s, w)
        })
    }

    pub(crate) fn peer_mw_write(
        &self,
        window: usize,
        offset: WindowOffset,
        data: &[u8],
    ) -> Result<()> {
        let s = self.with_peer_window(window, offset, data.len(), |s, w| match w {
            PeerWindow::Ram(span) => {
                span.write_at(offset.0, data)?;
                Ok(None)
            }
            PeerWindow::Mmio { .. } => Ok(Some(s.clone())),
        })?;
        match s {
            None => Ok(()),
            Some(s) => s.mmio_write(&self.cfg, window, offset.0, data),
        }
    }

    pub(crate) fn peer_mw_read(
        &self,
        window: usize,
        offset: WindowOffset,
        buf: &mut [u8],
    ) -> Result<()> {
        let len = buf.len();
        let s = self.with_peer_window(window, offset, len, |s, w| match w {
            PeerWindow::Ram(span) => {
                span.read_at(offset.0, buf)?;
                Ok(None)
            }
            PeerWindow::Mmio { size } => Ok(Some((s.clone(), *size))),
        })?;
        match s {
            None => Ok(()),
            Some((s, size)) => s.mmio_read(&self.cfg, window, size, offset.0, buf),
        }
    }

    pub(crate) fn peer_mw_direct(&self, window: usize) -> Result<Option<MemSpan>> {
        Ok(match self.peer_window(window)? {
            PeerWindow::Ram(span) => Some(span),
            PeerWindow::Mmio { .. } => None,
        })
    }

    // ---- Doorbells ----

    pub(crate) fn db_valid_mask(&self) -> u64 {
        self.cfg.db_valid_mask()
    }

    pub(crate) fn db_read(&self) -> u64 {
        self.page()
            .u64_at(page::DB_BITS)
            .map_or(0, |w| w.load(Ordering::Acquire))
            & self.db_valid_mask()
    }

    pub(crate) fn db_clear(&self, bits: u64) -> Result<()> {
        registers::check_doorbells(bits, self.db_valid_mask())?;
        self.page()
            .u64_at(page::DB_BITS)?
            .fetch_and(!bits, Ordering::AcqRel);
        Ok(())
    }

    pub(crate) fn db_read_mask(&self) -> u64 {
        self.db_mask.load(Ordering::Acquire)
    }

    pub(crate) fn db_set_mask(&self, bits: u64) -> Result<()> {
        registers::check_doorbells(bits, self.db_valid_mask())?;
        self.db_mask.fetch_or(bits, Ordering::AcqRel);
        Ok(())
    }

    pub(crate) fn db_clear_mask(&self, bits: u64) -> Result<()> {
        registers::check_doorbells(bits, self.db_valid_mask())?;
        self.db_mask.fetch_and(!bits, Ordering::AcqRel);
        // Latched bits may now be deliverable.
        self.page().wait_word(page::DB_WAIT)?.wake_all();
        Ok(())
    }

    pub(crate) fn db_wait(&self, bits: u64, timeout: Duration) -> Result<u64> {
        registers::check_db_wait(bits, self.db_valid_mask())?;
        let s = self.pair()?;
        let db = s.local.u64_at(page::DB_BITS)?;
        s.local
            .wait_word(page::DB_WAIT)?
            .wait(
                self.cfg.spin,
                deadline_after(timeout),
                || {
                    let hit = registers::deliverable(
                        db.load(Ordering::Acquire),
                        self.db_read_mask(),
                        bits,
                    );
                    (hit != 0).then_some(hit)
                },
                || s.is_down(),
            )
            .map_err(|e| s.ended(e))
    }

    pub(crate) fn peer_db_set(&self, bits: u64) -> Result<()> {
        let s = self.pair()?;
        registers::check_peer_doorbells(bits, self.db_valid_mask(), s.peer_counts.db_valid)?;
        s.peer
            .u64_at(page::DB_BITS)?
            .fetch_or(bits, Ordering::AcqRel);
        s.peer.wait_word(page::DB_WAIT)?.notify();
        Ok(())
    }

    // ---- Scratchpads ----

    fn spad_index(index: usize, count: usize) -> Result<u64> {
        registers::check_index("scratchpad", index, count)?;
        Ok(ControlPage::spad_offset(index))
    }

    pub(crate) fn spad_read(&self, index: usize) -> Result<u32> {
        let off = Self::spad_index(index, self.cfg.spad_count)?;
        Ok(self.page().mem().load_u32(off)?)
    }

    pub(crate) fn spad_write(&self, index: usize, value: u32) -> Result<()> {
        let off = Self::spad_index(index, self.cfg.spad_count)?;
        Ok(self.page().mem().store_u32(off, value)?)
    }

    pub(crate) fn peer_spad_read(&self, index: usize) -> Result<u32> {
        let s = self.pair()?;
        let off = Self::spad_index(index, s.peer_counts.spad_count)?;
        Ok(s.peer.mem().load_u32(off)?)
    }

    pub(crate) fn peer_spad_write(&self, index: usize, value: u32) -> Result<()> {
        let s = self.pair()?;
        let off = Self::spad_index(index, s.peer_counts.spad_count)?;
        Ok(s.peer.mem().store_u32(off, value)?)
    }

    // ---- Messages ----

    pub(crate) fn msg_read_sts(&self) -> u64 {
        self.page()
            .u64_at(page::MSG_STS)
            .map_or(0, |w| w.load(Ordering::Acquire))
            & registers::mask_of(self.cfg.msg_count)
    }

    pub(crate) fn msg_read(&self, index: usize) -> Result<u32> {
        registers::check_index("message register", index, self.cfg.msg_count)?;
        Ok(self.page().mem().load_u32(ControlPage::msg_offset(index))?)
    }

    pub(crate) fn msg_clear_sts(&self, bits: u64) -> Result<()> {
        registers::check_messages(bits, self.cfg.msg_count)?;
        self.page()
            .u64_at(page::MSG_STS)?
            .fetch_and(!bits, Ordering::AcqRel);
        Ok(())
    }

    pub(crate) fn peer_msg_write(&self, index: usize, value: u32) -> Result<()> {
        let s = self.pair()?;
        registers::check_index("message register", index, s.peer_counts.msg_count)?;
        let bit = 1u64 << index;
        let _serialize = lock(&self.msg_write);
        let sts = s.peer.u64_at(page::MSG_STS)?;
        if sts.load(Ordering::Acquire) & bit != 0 {
            return Err(FabricError::MessageBusy(index));
        }
        s.peer
            .mem()
            .store_u32(ControlPage::msg_offset(index), value)?;
        sts.fetch_or(bit, Ordering::AcqRel);
        s.peer.wait_word(page::MSG_WAIT)?.notify();
        Ok(())
    }

    pub(crate) fn msg_wait(&self, bits: u64, timeout: Duration) -> Result<u64> {
        registers::check_msg_wait(bits, self.cfg.msg_count)?;
        let s = self.pair()?;
        let sts = s.local.u64_at(page::MSG_STS)?;
        s.local
            .wait_word(page::MSG_WAIT)?
            .wait(
                self.cfg.spin,
                deadline_after(timeout),
                || {
                    let hit = sts.load(Ordering::Acquire) & bits;
                    (hit != 0).then_some(hit)
                },
                || s.is_down(),
            )
            .map_err(|e| s.ended(e))
    }
}

enum Access<'a> {
    Write(&'a [u8]),
    Read(&'a mut [u8]),
}

impl Access<'_> {
    fn len(&self) -> usize {
        match self {
            Access::Write(d) => d.len(),
            Access::Read(b) => b.len(),
        }
    }
}

/// Implements every `ntb.h` trait of `$ty` by delegating to its `ep: Arc<Endpoint>` field.
macro_rules! delegate_ntb {
    ($ty:ty, $name:literal $(, { $($extra:tt)* })?) => {
        impl $crate::Link for $ty {
            fn link_state(&self) -> $crate::LinkState {
                self.ep.link_state()
            }
            fn wait_link(
                &self,
                want: $crate::LinkState,
                timeout: std::time::Duration,
            ) -> $crate::Result<()> {
                self.ep.wait_link(want, timeout)
            }
            fn link_generation(&self) -> u64 {
                self.ep.link_generation()
            }
        }
        impl $crate::MemoryWindows for $ty {
            fn mw_count(&self) -> usize {
                self.ep.config().mw_count
            }
            fn mw_get_align(&self, window: usize) -> $crate::Result<$crate::MwAlign> {
                self.ep.mw_get_align(window)
            }
            fn mw_set_trans(
                &self,
                window: usize,
                addr: $crate::BusAddr,
                size: u64,
            ) -> $crate::Result<()> {
                self.ep.mw_set_trans(window, addr, size)
            }
            fn mw_clear_trans(&self, window: usize) -> $crate::Result<()> {
                self.ep.mw_clear_trans(window)
            }
        }
        impl $crate::PeerWindows for $ty {
            fn peer_mw_count(&self) -> usize {
                self.ep.peer_mw_count()
            }
            fn peer_mw_size(&self, window: usize) -> $crate::Result<u64> {
                self.ep.peer_mw_size(window)
            }
            fn peer_mw_write(
                &self,
                window: usize,
                offset: $crate::WindowOffset,
                data: &[u8],
            ) -> $crate::Result<()> {
                self.ep.peer_mw_write(window, offset, data)
            }
            fn peer_mw_read(
                &self,
                window: usize,
                offset: $crate::WindowOffset,
                buf: &mut [u8],
            ) -> $crate::Result<()> {
                self.ep.peer_mw_read(window, offset, buf)
            }
            fn peer_mw_direct(&self, window: usize) -> $crate::Result<Option<$crate::MemSpan>> {
                self.ep.peer_mw_direct(window)
            }
        }
        impl $crate::Doorbells for $ty {
            fn db_valid_mask(&self) -> u64 {
                self.ep.db_valid_mask()
            }
            fn db_read(&self) -> u64 {
                self.ep.db_read()
            }
            fn db_clear(&self, bits: u64) -> $crate::Result<()> {
                self.ep.db_clear(bits)
            }
            fn db_read_mask(&self) -> u64 {
                self.ep.db_read_mask()
            }
            fn db_set_mask(&self, bits: u64) -> $crate::Result<()> {
                self.ep.db_set_mask(bits)
            }
            fn db_clear_mask(&self, bits: u64) -> $crate::Result<()> {
                self.ep.db_clear_mask(bits)
            }
            fn db_wait(&self, bits: u64, timeout: std::time::Duration) -> $crate::Result<u64> {
                self.ep.db_wait(bits, timeout)
            }
            fn peer_db_set(&self, bits: u64) -> $crate::Result<()> {
                self.ep.peer_db_set(bits)
            }
        }
        impl $crate::Scratchpads for $ty {
            fn spad_count(&self) -> usize {
                self.ep.config().spad_count
            }
            fn spad_read(&self, index: usize) -> $crate::Result<u32> {
                self.ep.spad_read(index)
            }
            fn spad_write(&self, index: usize, value: u32) -> $crate::Result<()> {
                self.ep.spad_write(index, value)
            }
            fn peer_spad_read(&self, index: usize) -> $crate::Result<u32> {
                self.ep.peer_spad_read(index)
            }
            fn peer_spad_write(&self, index: usize, value: u32) -> $crate::Result<()> {
                self.ep.peer_spad_write(index, value)
            }
        }
        impl $crate::Messages for $ty {
            fn msg_count(&self) -> usize {
                self.ep.config().msg_count
            }
            fn msg_read_sts(&self) -> u64 {
                self.ep.msg_read_sts()
            }
            fn msg_read(&self, index: usize) -> $crate::Result<u32> {
                self.ep.msg_read(index)
            }
            fn msg_clear_sts(&self, bits: u64) -> $crate::Result<()> {
                self.ep.msg_clear_sts(bits)
            }
            fn peer_msg_write(&self, index: usize, value: u32) -> $crate::Result<()> {
                self.ep.peer_msg_write(index, value)
            }
            fn msg_wait(&self, bits: u64, timeout: std::time::Duration) -> $crate::Result<u64> {
                self.ep.msg_wait(bits, timeout)
            }
        }
        impl $crate::Ntb for $ty {
            fn address_space(&self) -> &$crate::AddressSpace {
                self.ep.asp()
            }
            fn backend(&self) -> &'static str {
                $name
            }
            $($($extra)*)?
        }
    };
}
pub(crate) use delegate_ntb;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MmioHandler;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);

    impl MmioHandler for Recorder {
        fn mmio_read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn mmio_write(&self, offset: u64, data: &[u8]) {
            lock(&self.0).push((offset, data.to_vec()));
        }
    }

    struct Silent;
    impl Announce for Silent {
        fn announce(&self, _: usize, _: Option<&LocalWindow>) -> Result<()> {
            Ok(())
        }
    }

    /// An endpoint with a recording device behind window 0, attached to a pair whose peer
    /// page the test writes as a (misbehaving) peer would.
    fn fake_peer(cfg: LinkConfig) -> (Arc<Endpoint>, Arc<PagePair>, Arc<Recorder>) {
        let asp = Arc::new(AddressSpace::new());
        let rec = Arc::new(Recorder::default());
        asp.add_mmio(BusAddr(0x10000), 0x1000, rec.clone()).unwrap();
        let ep = Arc::new(Endpoint::new(cfg, asp).unwrap());
        ep.mw_set_trans(0, BusAddr(0x10000), 0x1000).unwrap();
        let pair = silent_pair(&cfg);
        ep.attach(pair.clone()).unwrap();
        (ep, pair, rec)
    }

    /// A pair of fresh pages for a peer configured as `cfg`, announcing nothing.
    fn silent_pair(cfg: &LinkConfig) -> Arc<PagePair> {
        Arc::new(PagePair::new(
            Arc::new(ControlPage::create().unwrap()),
            Arc::new(ControlPage::create().unwrap()),
            PeerCounts::of(cfg),
            Box::new(Silent),
        ))
    }

    /// Produces one raw entry into the endpoint's ring, as the peer process would.
    #[allow(clippy::too_many_arguments)]
    fn produce(s: &PagePair, pos: u32, kind: u32, window: u32, len: u32, offset: u64, tag: u32) {
        let m = s.local.mem();
        let e = ControlPage::entry_offset(pos);
        m.store_u32(e + page::E_KIND, kind).unwrap();
        m.store_u32(e + page::E_WINDOW, window).unwrap();
        m.store_u32(e + page::E_LEN, len).unwrap();
        m.store_u64(e + page::E_OFFSET, offset).unwrap();
        m.store_u32(e + page::E_TAG, tag).unwrap();
        m.write_at(e + page::E_DATA, &[1, 2, 3, 4]).unwrap();
        m.store_u32(e + page::E_SEQ, pos.wrapping_add(1)).unwrap();
        s.local.wait_word(page::RING_WAIT).unwrap().notify();
    }

    /// Waits (failure guard: 20 s) for the completion `tag` in the fake peer's page.
    fn completion(s: &PagePair, tag: u32) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(20);
        while s.peer.mem().load_u32(page::CPL_TAG).unwrap() != tag {
            assert!(Instant::now() < deadline, "no completion {tag}");
            std::thread::yield_now();
        }
        s.peer.mem().load_u32(page::CPL_STATUS).unwrap()
    }

    #[test]
    fn malformed_ring_entries_are_dropped_or_refused_never_fatal() {
        let (ep, s, rec) = fake_peer(LinkConfig::default());
        let table: &[(u32, u32, u32, u64)] = &[
            (KIND_WRITE, 0, 0, 0),
            (KIND_WRITE, 0, 65, 0),
            (KIND_WRITE, 0, u32::MAX, 0),
            (99, 0, 4, 0),
            (KIND_WRITE, 7, 4, 0),
            (KIND_WRITE, u32::MAX, 4, 0),
            (KIND_WRITE, 0, 4, u64::MAX - 1),
            (KIND_WRITE, 0, 4, 0xffe),
        ];
        let mut pos = 0u32;
        for &(kind, window, len, offset) in table {
            produce(&s, pos, kind, window, len, offset, 0);
            pos += 1;
        }
        for (tag, window, len, offset, want) in [
            (5, 0, 100, 0, CPL_BAD_REQUEST),
            (6, 0, 0, 0, CPL_BAD_REQUEST),
            (7, 9, 4, 0, CPL_NOT_TRANSLATED),
            (8, 0, 4, 0xffe, CPL_OUTSIDE),
            (9, 0, 8, u64::MAX, CPL_OUTSIDE),
        ] {
            produce(&s, pos, KIND_READ, window, len, offset, tag);
            pos += 1;
            assert_eq!(completion(&s, tag), want, "tag {tag}");
        }
        produce(&s, pos, KIND_WRITE, 0, 4, 4, 0);
        produce(&s, pos + 1, KIND_READ, 0, 8, 0x10, 10);
        assert_eq!(completion(&s, 10), CPL_OK);
        let mut got = [0u8; 8];
        s.peer.mem().read_at(page::CPL_DATA, &mut got).unwrap();
        assert_eq!(got, [0x10; 8]);
        assert_eq!(lock(&rec.0).as_slice(), &[(4, vec![1, 2, 3, 4])]);
        // A stale sequence number in the next slot is not taken as a new entry.
        let next = ControlPage::entry_offset(pos + 2);
        s.local.mem().store_u32(next + page::E_SEQ, 12345).unwrap();
        s.local.wait_word(page::RING_WAIT).unwrap().notify();
        produce(&s, pos + 2, KIND_READ, 0, 4, 0, 11);
        assert_eq!(completion(&s, 11), CPL_OK);
        ep.detach(&s);
    }

    #[test]
    fn taking_the_link_down_ends_its_ring_service() {
        // Nothing of a connection may be served after the link went down: when `detach` or a
        // replacing `install` returns, the old pair's service thread has ended (and dropped
        // its reference to the pair).
        let (ep, s, _) = fake_peer(LinkConfig::default());
        for _ in 0..20 {
            ep.detach(&s);
            assert_eq!(Arc::strong_count(&s), 1, "the service thread still runs");
            assert!(lock(&s.service).is_none());
            let next = silent_pair(&LinkConfig::default());
            ep.attach(next.clone()).unwrap();
            let again = silent_pair(&LinkConfig::default());
            // Replaced without a detach: the same.
            ep.attach(again.clone()).unwrap();
            assert_eq!(
                Arc::strong_count(&next),
                1,
                "the replaced pair's service still runs"
            );
            ep.detach(&again);
            assert_eq!(Arc::strong_count(&again), 1);
            ep.attach(s.clone()).unwrap();
        }
        ep.detach(&s);
    }

    #[test]
    fn a_peer_that_never_consumes_times_out_posted_writes_and_reads() {
        let cfg = LinkConfig {
            completion_timeout: Duration::from_millis(20),
            spin: Duration::ZERO,
            ..LinkConfig::default()
        };
        let (ep, s, _) = fake_peer(cfg);
        ep.set_peer_window(&s, 0, Some(PeerWindow::Mmio { size: 0x1000 }))
            .unwrap();
        // The peer's ring head is garbage: the ring fills, then writes time out.
        s.peer
            .mem()
            .store_u32(page::RING_HEAD, 0x8000_0000)
            .unwrap();
        let mut result = Ok(());
        for _ in 0..=page::RING_ENTRIES {
            result = ep.peer_mw_write(0, WindowOffset(0), &[1; 4]);
            if result.is_err() {
                break;
            }
        }
        assert!(matches!(result, Err(FabricError::Timeout)), "{result:?}");
        assert!(matches!(
            ep.peer_mw_read(0, WindowOffset(0), &mut [0; 4]),
            Err(FabricError::Timeout)
        ));
        ep.detach(&s);
        assert!(matches!(
            ep.peer_mw_write(0, WindowOffset(0), &[1; 4]),
            Err(FabricError::LinkDown)
        ));
    }
}
