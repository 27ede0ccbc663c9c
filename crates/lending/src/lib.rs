//! Device lending over the NTB fabric.
//!
//! A [`Node`] is one host's lending runtime on one NTB link. It can *lend* the devices it owns
//! ([`Node::add_device`]) and *borrow* the peer's ([`Node::borrow`]), which yields a
//! [`BorrowedFunction`]: a [`devlend_pci::PciFunction`] like a local one, so an unmodified
//! driver drives it.
//!
//! What crosses the fabric, and how (the lending code stays off every data path):
//!
//! | what | path |
//! |---|---|
//! | config reads/writes (`pci_ops`) | management request to the lender, applied to the device; BAR registers are virtualised per borrower |
//! | BAR MMIO | the lender's inbound window onto the BAR; the fabric delivers posted writes / non-posted reads to the device model |
//! | device DMA | the lender's IOMMU maps device bus addresses onto the borrower's inbound window onto the borrower's memory (direct mapping on `shm`: zero copy) |
//! | MSI-X | the device's MSI-X table (on the lender, masks honoured there) signals a doorbell bit on the borrower |
//! | management | a mailbox ring in each host's window 0, announced in message register 0 ([`channel`]) |
//!
//! Ownership: one borrower per device; leases kept alive by heartbeats; an expired or returned
//! lease resets the device and offers it again. A lender that disappears is a surprise removal
//! on the borrower: every call on the function fails with `Removed`.
//!
//! Threads: each link runs one management thread (drains the mailbox, serves the peer's
//! requests, routes responses to waiting callers, sends heartbeats and notices); each node
//! runs one expiry thread that ends leases whose heartbeats stopped, whatever its links wait
//! for. A borrowed function whose interrupt vectors are routed to eventfds
//! (`set_interrupt_eventfd`, as a vfio-user front-end does) runs one forwarder thread
//! (`devlend-irq-NAME`), and each reclaim notice runs the node's reclaim hook on a thread of
//! its own. Lock order: a link's table of requests waiting for responses (`pending`) and the
//! lender/borrower tables are never held across a fabric wait.
#![warn(missing_docs)]

pub mod borrower;
pub mod channel;
mod error;
pub mod lender;
pub mod protocol;

pub use borrower::{BorrowedFunction, LostDevice};
pub use error::LendingError;
pub use lender::{DeviceBuilder, LeaseStatus};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};

use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devlend_fabric::{AddressSpace, BusAddr, LinkState, Ntb};

use channel::Channel;
use protocol::{DeviceDesc, Envelope, Event, Request, Response};

/// Where link *i*'s management mailbox sits in the host's bus address space.
pub const MAILBOX_BASE: BusAddr = BusAddr(0x7f00_0000_0000);
const MAILBOX_STRIDE: u64 = 1 << 24;
/// How long a status report waits for a peer's name.
const STATUS_HELLO_WAIT: Duration = Duration::from_millis(200);

/// Decides whether a borrow request arriving on a link may be granted, beyond the lender's own
/// one-borrower rule: called with the link's id, the device and the borrower's name; an `Err`
/// is sent to the borrower as the refusal. (A cluster node checks the registry's owner record.)
pub type AdmitFn = Arc<dyn Fn(LinkId, &str, &str) -> Result<(), String> + Send + Sync>;

/// Identifies one link of a node (stable while it is attached).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LinkId(pub usize);

/// Tunables of a node.
#[derive(Clone)]
pub struct NodeConfig {
    /// This host's name.
    pub name: String,
    /// Lease timeout granted to (lender) or asked for by (borrower) this node.
    pub lease: Duration,
    /// How long a management request may take before it fails.
    pub request_timeout: Duration,
    /// DMA memory a borrower sets aside (and exposes to the lender) per borrowed function.
    pub dma_pool_bytes: usize,
    /// An extra admission check on borrow requests (none: the lender's own rules only).
    pub admit: Option<AdmitFn>,
}

impl std::fmt::Debug for NodeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeConfig")
            .field("name", &self.name)
            .field("lease", &self.lease)
            .field("request_timeout", &self.request_timeout)
            .field("dma_pool_bytes", &self.dma_pool_bytes)
            .field("admit", &self.admit.is_some())
            .finish()
    }
}

impl NodeConfig {
    /// Defaults for a host called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            lease: Duration::from_secs(3),
            request_timeout: Duration::from_secs(5),
            dma_pool_bytes: 64 << 20,
            admit: None,
        }
    }
}

/// Hands out one link's inbound windows (window 0 is the mailbox).
pub(crate) struct WindowPool {
    used: Mutex<Vec<bool>>,
}

impl WindowPool {
    fn new(count: usize) -> Self {
        let mut used = vec![false; count];
        if let Some(first) = used.first_mut() {
            *first = true;
        }
        Self {
            used: Mutex::new(used),
        }
    }

    pub(crate) fn take(&self) -> Result<usize, LendingError> {
        let mut used = devlend_sync::lock(&self.used);
        let free = used
            .iter()
            .position(|u| !u)
            .ok_or(LendingError::NoFreeWindow)?;
        if let Some(slot) = used.get_mut(free) {
            *slot = true;
        }
        Ok(free)
    }

    pub(crate) fn give(&self, window: usize) {
        let mut used = devlend_sync::lock(&self.used);
        if window != channel::MAILBOX_WINDOW {
            if let Some(slot) = used.get_mut(window) {
                *slot = false;
            }
        }
    }
}

/// Called on a borrower when a lender announces a forced take-back: (device, grace).
pub type ReclaimHook = Arc<dyn Fn(&str, Duration) + Send + Sync>;

/// What all of a host's links share: its name, address space and the devices it lends.
pub(crate) struct HostCore {
    pub(crate) cfg: NodeConfig,
    pub(crate) lender: lender::Lender,
    reclaim_hook: Mutex<Option<ReclaimHook>>,
}

/// How a forced take-back ([`Node::reclaim`]) ended.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Reclaimed {
    /// The device.
    pub device: String,
    /// Who held it.
    pub borrower: String,
    /// Whether the borrower gave it back within the grace period (else: revoked).
    pub returned: bool,
    /// From the announcement to the device being free again, in milliseconds.
    pub elapsed_ms: u64,
}

/// One NTB link of a host (one peer): its channel, windows, doorbells and borrowed devices.
pub(crate) struct Inner {
    id: LinkId,
    pub(crate) host: Arc<HostCore>,
    pub(crate) cfg: NodeConfig,
    pub(crate) ntb: Arc<dyn Ntb>,
    channel: Channel,
    pending: Mutex<HashMap<u64, mpsc::Sender<Response>>>,
    next_id: AtomicU64,
    pub(crate) windows: WindowPool,
    pub(crate) doorbells_used: Mutex<u64>,
    pub(crate) borrower: borrower::Borrower,
    peer_name: Mutex<Option<String>>,
    /// Notices for this link's peer, sent by this link's management thread.
    events: Mutex<Vec<Event>>,
    stop: AtomicBool,
}

struct LinkRuntime {
    inner: Arc<Inner>,
    mailbox: BusAddr,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl LinkRuntime {
    /// Stops the management thread and waits for it.
    fn stop(&self) {
        self.inner.stop.store(true, Ordering::Release);
        let thread = devlend_sync::lock(&self.thread).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

/// The host's address space: given at start, or the first link's.
enum HostSpace {
    Own(Arc<AddressSpace>),
    Link(Arc<dyn Ntb>),
}

impl std::ops::Deref for HostSpace {
    type Target = AddressSpace;
    fn deref(&self) -> &AddressSpace {
        match self {
            HostSpace::Own(a) => a,
            HostSpace::Link(n) => n.address_space(),
        }
    }
}

/// One host's lending runtime: the devices it lends, and one runtime per NTB link.
///
/// Links may be attached and detached while the node runs ([`Node::attach`],
/// [`Node::detach`]): `links` is locked only to copy or change the list, never across a
/// fabric wait.
pub struct Node {
    host: Arc<HostCore>,
    asp: HostSpace,
    links: Mutex<Vec<Arc<LinkRuntime>>>,
    next_slot: AtomicUsize,
    expiry: Option<Expiry>,
}

/// How often the host's expiry thread looks for leases whose heartbeats stopped.
const EXPIRY_TICK: Duration = Duration::from_millis(20);

/// The host's lease-expiry thread (see [`expiry_loop`]) and its stop signal.
struct Expiry {
    stop: Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: JoinHandle<()>,
}

/// One link in a status report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LinkStatus {
    /// Fabric backend.
    pub fabric: String,
    /// "up" or "down".
    pub link: String,
    /// The peer's name, once known.
    pub peer: Option<String>,
}

/// What `status` reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NodeStatus {
    /// This host.
    pub name: String,
    /// Its links.
    pub links: Vec<LinkStatus>,
    /// Devices this host owns.
    pub lending: Vec<DeviceDesc>,
    /// Devices this host holds from its peers.
    pub borrowed: Vec<DeviceDesc>,
    /// Leases this host granted (lender side).
    pub leases: Vec<LeaseStatus>,
}

impl Node {
    /// Starts a node on one or more NTB links, which must share one address space (this host's):
    /// sets up each link's mailbox and management thread.
    pub fn start(cfg: NodeConfig, ntbs: Vec<Arc<dyn Ntb>>) -> Result<Node, LendingError> {
        let first = ntbs
            .first()
            .ok_or_else(|| LendingError::Protocol("a node needs at least one link".into()))?;
        let node = Self::start_in(cfg, HostSpace::Link(first.clone()));
        for ntb in ntbs {
            node.attach(ntb)?;
        }
        Ok(node)
    }

    /// Starts a node with no link yet on the host's address space `asp`; links come with
    /// [`Node::attach`].
    pub fn start_on(cfg: NodeConfig, asp: Arc<AddressSpace>) -> Node {
        Self::start_in(cfg, HostSpace::Own(asp))
    }

    fn start_in(cfg: NodeConfig, asp: HostSpace) -> Node {
        let host = Arc::new(HostCore {
            cfg,
            lender: lender::Lender::new(),
            reclaim_hook: Mutex::new(None),
        });
        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let expiry = {
            let (host, stop) = (Arc::downgrade(&host), stop.clone());
            std::thread::Builder::new()
                .name(format!("devlend-expiry-{}", host_name(&host)))
                .spawn(move || expiry_loop(host, stop))
        };
        let expiry = match expiry {
            Ok(thread) => Some(Expiry { stop, thread }),
            Err(e) => {
                // The links' management threads still expire leases, only not independently
                // of their own link's waits.
                tracing::error!("cannot start the lease expiry thread: {e}");
                None
            }
        };
        Node {
            host,
            asp,
            links: Mutex::new(Vec::new()),
            next_slot: AtomicUsize::new(0),
            expiry,
        }
    }

    fn links(&self) -> Vec<Arc<LinkRuntime>> {
        devlend_sync::lock(&self.links).clone()
    }

    fn link(&self, id: LinkId) -> Option<Arc<LinkRuntime>> {
        self.links().into_iter().find(|l| l.inner.id == id)
    }

    /// Attaches a link (which must be on this host's address space): sets up its mailbox and
    /// management thread. Returns its id.
    pub fn attach(&self, ntb: Arc<dyn Ntb>) -> Result<LinkId, LendingError> {
        if !std::ptr::eq(ntb.address_space(), &*self.asp) {
            return Err(LendingError::Protocol(
                "all links of a node must share its address space".into(),
            ));
        }
        let cfg = self.host.cfg.clone();
        let host = self.host.clone();
        let i = self.next_slot.fetch_add(1, Ordering::Relaxed);
        let offset = u64::try_from(i)
            .ok()
            .and_then(|i| i.checked_mul(MAILBOX_STRIDE))
            .and_then(|o| MAILBOX_BASE.0.checked_add(o))
            .ok_or_else(|| LendingError::Protocol("no room for another link's mailbox".into()))?;
        let base = BusAddr(offset);
        {
            let channel = Channel::new(ntb.clone(), base)?;
            let inner = Arc::new(Inner {
                id: LinkId(i),
                host: host.clone(),
                windows: WindowPool::new(ntb.mw_count()),
                doorbells_used: Mutex::new(0),
                borrower: borrower::Borrower::new(),
                cfg: cfg.clone(),
                ntb,
                channel,
                pending: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                peer_name: Mutex::new(None),
                events: Mutex::new(Vec::new()),
                stop: AtomicBool::new(false),
            });
            let weak = Arc::downgrade(&inner);
            let ntb = inner.ntb.clone();
            let thread = std::thread::Builder::new()
                .name(format!("devlend-mgmt-{}-{i}", cfg.name))
                .spawn(move || management_loop(weak, ntb))
                .map_err(|e| {
                    self.asp.remove(base);
                    LendingError::Io {
                        op: "spawn management thread",
                        source: e,
                    }
                })?;
            devlend_sync::lock(&self.links).push(Arc::new(LinkRuntime {
                inner,
                mailbox: base,
                thread: Mutex::new(Some(thread)),
            }));
        }
        Ok(LinkId(i))
    }

    /// Detaches a link: what was borrowed over it is removed (surprise removal for its users),
    /// its management thread stops and its mailbox goes. Devices lent over it are reclaimed
    /// when their leases expire (no more heartbeats come).
    pub fn detach(&self, id: LinkId) -> Result<(), LendingError> {
        let link = {
            let mut links = devlend_sync::lock(&self.links);
            let pos = links
                .iter()
                .position(|l| l.inner.id == id)
                .ok_or_else(|| LendingError::Protocol(format!("no link {}", id.0)))?;
            links.remove(pos)
        };
        link.inner
            .borrower
            .remove_all("the link to the lender was closed");
        link.stop();
        self.asp.remove(link.mailbox);
        Ok(())
    }

    /// The ids of the attached links.
    pub fn link_ids(&self) -> Vec<LinkId> {
        self.links().iter().map(|l| l.inner.id).collect()
    }

    /// Devices borrowed over link `id`.
    pub fn borrowed_on(&self, id: LinkId) -> Vec<DeviceDesc> {
        self.link(id)
            .map(|l| l.inner.borrower.list())
            .unwrap_or_default()
    }

    /// Borrows device `name` over link `id` (no listing of other links first).
    pub fn borrow_via(
        &self,
        id: LinkId,
        name: &str,
    ) -> Result<Arc<BorrowedFunction>, LendingError> {
        let link = self
            .link(id)
            .ok_or_else(|| LendingError::Protocol(format!("no link {}", id.0)))?;
        borrower::borrow(&link.inner, name)
    }

    /// The host's address space (every link's).
    pub fn address_space(&self) -> &AddressSpace {
        &self.asp
    }

    /// This host's name.
    pub fn name(&self) -> &str {
        &self.host.cfg.name
    }

    /// The fabric endpoint of the `index`th attached link.
    pub fn ntb(&self, index: usize) -> Option<Arc<dyn Ntb>> {
        self.links().get(index).map(|l| l.inner.ntb.clone())
    }

    /// Waits until every link is up.
    pub fn wait_link_up(&self, timeout: Duration) -> Result<(), LendingError> {
        let deadline = Instant::now() + timeout;
        for l in &self.links() {
            let left = deadline.saturating_duration_since(Instant::now());
            l.inner
                .ntb
                .wait_link(LinkState::Up, left)
                .map_err(LendingError::from)?;
        }
        Ok(())
    }

    /// Adds a device this host lends. `build` receives the device's DMA port (an IOMMU the
    /// lender programs per borrower) and interrupt sink (routed to the current borrower).
    pub fn add_device(
        &self,
        name: &str,
        detail: &str,
        build: DeviceBuilder,
    ) -> Result<DeviceDesc, LendingError> {
        self.host
            .lender
            .add(&self.asp, &self.host.cfg.name, name, detail, build)
    }

    /// Adds an SR-IOV physical function this host manages, with its virtual functions: each
    /// VF in `vfs` (name, detail, builder) becomes a device of its own that any peer may
    /// borrow, independently of the others; the PF, listed as `pf` with `pf_detail`, is not
    /// lendable while they are offered. `keep` (the PF's function and driver) lives as long
    /// as the PF is registered. Nothing is added when any VF fails.
    pub fn add_sriov_device(
        &self,
        pf: &str,
        pf_detail: &str,
        keep: Arc<dyn std::any::Any + Send + Sync>,
        vfs: Vec<(String, String, DeviceBuilder)>,
    ) -> Result<Vec<DeviceDesc>, LendingError> {
        let ntb = self.ntb(0).ok_or(LendingError::LinkDown)?;
        let asp = ntb.address_space();
        let owner = &self.host.cfg.name;
        let mut added: Vec<DeviceDesc> = Vec::new();
        let undo = |added: &[DeviceDesc]| {
            for d in added {
                let _ = self.host.lender.remove(asp, &d.name);
            }
        };
        for (name, detail, build) in vfs {
            match self.host.lender.add(asp, owner, &name, &detail, build) {
                Ok(d) => added.push(d),
                Err(e) => {
                    undo(&added);
                    return Err(e);
                }
            }
        }
        let desc = DeviceDesc {
            name: pf.to_string(),
            kind: "nvme-pf".to_string(),
            owner: owner.clone(),
            borrower: None,
            vectors: 0,
            bars: Vec::new(),
            detail: pf_detail.to_string(),
            size_bytes: None,
        };
        let names = added.iter().map(|d| d.name.clone()).collect();
        if let Err(e) = self
            .host
            .lender
            .add_physical_function(desc.clone(), names, keep)
        {
            undo(&added);
            return Err(e);
        }
        added.insert(0, desc);
        Ok(added)
    }

    /// Removes a device this host owns (it must not be lent); a managed SR-IOV physical
    /// function goes with its virtual functions (none may be lent), and a virtual function is
    /// refused on its own. Returns the names removed.
    pub fn remove_device(&self, name: &str) -> Result<Vec<String>, LendingError> {
        self.host.lender.remove(&self.asp, name)
    }

    /// Devices this host owns.
    pub fn local_devices(&self) -> Vec<DeviceDesc> {
        self.host.lender.list(&self.host.cfg.name)
    }

    fn link_devices(inner: &Inner) -> Result<Vec<DeviceDesc>, LendingError> {
        match inner.call(Request::List)? {
            Response::Devices { devices } => {
                if let Some(d) = devices.first() {
                    *devlend_sync::lock(&inner.peer_name) = Some(d.owner.clone());
                }
                Ok(devices)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Devices the peers offer (asks each linked peer; fails only when none answers).
    pub fn peer_devices(&self) -> Result<Vec<DeviceDesc>, LendingError> {
        let mut all = Vec::new();
        let mut last_err = None;
        for l in &self.links() {
            match Self::link_devices(&l.inner) {
                Ok(d) => all.extend(d),
                Err(e) => last_err = Some(e),
            }
        }
        match last_err {
            Some(e) if all.is_empty() => Err(e),
            _ => Ok(all),
        }
    }

    /// Borrows device `name` from whichever peer offers it.
    pub fn borrow(&self, name: &str) -> Result<Arc<BorrowedFunction>, LendingError> {
        let mut last_err = None;
        for l in &self.links() {
            match Self::link_devices(&l.inner) {
                Ok(devices) if devices.iter().any(|d| d.name == name) => {
                    return borrower::borrow(&l.inner, name);
                }
                Ok(_) => {}
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| LendingError::NoSuchDevice(name.to_string())))
    }

    /// The borrowed function `name`, if this host holds it.
    pub fn borrowed(&self, name: &str) -> Option<Arc<BorrowedFunction>> {
        self.links().iter().find_map(|l| l.inner.borrower.get(name))
    }

    /// Devices this host held until they were taken from it (lender gone, link down,
    /// revoked) rather than given back, with why; each until [`Node::forget_lost`] or a new
    /// borrow of the same name.
    pub fn lost(&self) -> Vec<LostDevice> {
        self.links()
            .iter()
            .flat_map(|l| l.inner.borrower.lost())
            .collect()
    }

    /// Forgets a lost device (the user has seen it go); returns it if it was lost.
    pub fn forget_lost(&self, name: &str) -> Option<LostDevice> {
        self.links()
            .iter()
            .find_map(|l| l.inner.borrower.forget_lost(name))
    }

    /// Gives back the borrowed device `name`.
    pub fn give_back(&self, name: &str) -> Result<(), LendingError> {
        let link = self
            .links()
            .into_iter()
            .find(|l| l.inner.borrower.get(name).is_some())
            .ok_or_else(|| LendingError::NotBorrowed(name.to_string()))?;
        borrower::give_back(&link.inner, name)
    }

    /// Forced take-back of a device this host lends: the borrower is told and has `grace`
    /// to finish outstanding I/O and give it back; if it has not, the lease is revoked (its
    /// windows cleared and DMA unmapped, so it sees a surprise removal), the device is reset
    /// and offered again. Blocks for at most `grace` (plus the reset).
    pub fn reclaim(&self, name: &str, grace: Duration) -> Result<Reclaimed, LendingError> {
        let lender = &self.host.lender;
        let (lease, link, borrower) = lender
            .lease_of(name)
            .ok_or_else(|| LendingError::NotLent(name.to_string()))?;
        let start = Instant::now();
        let reason = format!("{} reclaims {name}", self.host.cfg.name);
        tracing::warn!("reclaiming {name} from {borrower} (grace {grace:?})");
        if let Some(link) = link.upgrade() {
            let notice = Envelope::Event {
                body: Event::Reclaiming {
                    lease,
                    grace_ms: u64::try_from(grace.as_millis()).unwrap_or(u64::MAX),
                    reason: reason.clone(),
                },
            };
            if let Err(e) = link.post(notice) {
                tracing::warn!("could not tell {borrower} of the take-back: {e}");
            }
        }
        let deadline = start.checked_add(grace).unwrap_or(start);
        while lender.is_held(lease) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let returned = match lender.end_lease(lease, &reason) {
            Ok(()) => {
                if let Some(link) = link.upgrade() {
                    devlend_sync::lock(&link.events).push(Event::Revoked { lease, reason });
                }
                false
            }
            // Given back meanwhile (or it expired): nothing left to revoke.
            Err(_) => true,
        };
        Ok(Reclaimed {
            device: name.to_string(),
            borrower,
            returned,
            elapsed_ms: u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
        })
    }

    /// Sets what a borrower does when a lender announces a forced take-back of a device it
    /// holds (e.g. ask a VM to release it); called on its own thread. Without one, the
    /// borrower's driver keeps the device for the grace period and then sees it removed.
    pub fn set_reclaim_hook(&self, hook: Option<ReclaimHook>) {
        *devlend_sync::lock(&self.host.reclaim_hook) = hook;
    }

    /// Lease renewals (heartbeats) this node granted as a lender, since it started.
    pub fn lease_renewals(&self) -> u64 {
        self.host.lender.renewals.load(Ordering::Relaxed)
    }

    /// A status snapshot.
    pub fn status(&self) -> NodeStatus {
        let mut links = Vec::new();
        let mut borrowed = Vec::new();
        for l in &self.links() {
            let inner = &l.inner;
            let up = inner.ntb.link_state() == LinkState::Up;
            if up && inner.peer_name().is_none() {
                // Briefly: a frozen peer must not make a status report wait out the request
                // timeout.
                let hello = Request::Hello {
                    host: self.host.cfg.name.clone(),
                };
                if let Ok(Response::Hello { host }) = inner.call_within(hello, STATUS_HELLO_WAIT) {
                    *devlend_sync::lock(&inner.peer_name) = Some(host);
                }
            }
            links.push(LinkStatus {
                fabric: inner.ntb.backend().to_string(),
                link: if up { "up" } else { "down" }.to_string(),
                peer: inner.peer_name(),
            });
            borrowed.extend(inner.borrower.list());
        }
        NodeStatus {
            name: self.host.cfg.name.clone(),
            links,
            lending: self.local_devices(),
            borrowed,
            leases: self.host.lender.leases(),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(e) = self.expiry.take() {
            let (stopped, cv) = &*e.stop;
            *devlend_sync::lock(stopped) = true;
            cv.notify_all();
            let _ = e.thread.join();
        }
        for l in self.links() {
            l.inner.borrower.remove_all("this host shut down");
            l.stop();
        }
    }
}

fn host_name(host: &Weak<HostCore>) -> String {
    host.upgrade()
        .map(|h| h.cfg.name.clone())
        .unwrap_or_default()
}

/// Ends every expired lease of the host and queues the revocation notice on its link.
fn expire_leases(host: &HostCore) {
    for (lease, reason, link) in host.lender.expire() {
        tracing::warn!("lease {lease} revoked: {reason}");
        if let Some(link) = link.upgrade() {
            devlend_sync::lock(&link.events).push(Event::Revoked { lease, reason });
        }
    }
}

/// The host's lease-expiry thread: every [`EXPIRY_TICK`], ends the leases whose heartbeats
/// stopped. It waits on nothing a peer controls, so a link whose management thread is held
/// (a send to a peer that stopped answering waits for room until the link is declared down)
/// cannot delay the take-back of its devices.
fn expiry_loop(host: Weak<HostCore>, stop: Arc<(Mutex<bool>, std::sync::Condvar)>) {
    let (stopped, cv) = &*stop;
    let mut guard = devlend_sync::lock(stopped);
    loop {
        if *guard {
            return;
        }
        guard = devlend_sync::wait_timeout(cv, guard, EXPIRY_TICK).0;
        if *guard {
            return;
        }
        drop(guard);
        let Some(h) = host.upgrade() else { return };
        expire_leases(&h);
        drop(h);
        guard = devlend_sync::lock(stopped);
    }
}

pub(crate) fn unexpected(r: Response) -> LendingError {
    match r {
        Response::Error { message } => LendingError::Refused(message),
        other => LendingError::Protocol(format!("unexpected response {other:?}")),
    }
}

impl Inner {
    pub(crate) fn peer_name(&self) -> Option<String> {
        devlend_sync::lock(&self.peer_name).clone()
    }

    /// The admission hook's refusal of a borrow request, if any.
    fn refused(&self, device: &str, borrower: &str) -> Option<String> {
        let admit = self.host.cfg.admit.as_ref()?;
        admit(self.id, device, borrower).err()
    }

    /// Sends a request and waits for its response.
    pub(crate) fn call(&self, body: Request) -> Result<Response, LendingError> {
        self.call_within(body, self.cfg.request_timeout)
    }

    /// [`Inner::call`] with its own time limit for sending and for the answer.
    pub(crate) fn call_within(
        &self,
        body: Request,
        timeout: Duration,
    ) -> Result<Response, LendingError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel();
        devlend_sync::lock(&self.pending).insert(id, tx);
        let sent = self
            .channel
            .send(&Envelope::Request { id, body }.encode(), timeout);
        let result = match sent {
            Ok(()) => match rx.recv_timeout(timeout) {
                Ok(r) => Ok(r),
                Err(_) if self.ntb.link_state() == LinkState::Down => Err(LendingError::LinkDown),
                Err(_) => Err(LendingError::Timeout),
            },
            Err(e) => Err(e.into()),
        };
        devlend_sync::lock(&self.pending).remove(&id);
        result
    }

    /// Sends without waiting for an answer (heartbeats, events).
    pub(crate) fn post(&self, env: Envelope) -> Result<(), LendingError> {
        Ok(self.channel.send(&env.encode(), self.cfg.request_timeout)?)
    }

    fn handle(self: &Arc<Self>, env: Envelope) {
        match env {
            Envelope::Request { id, body } => {
                let response = match body {
                    Request::Hello { host } => {
                        *devlend_sync::lock(&self.peer_name) = Some(host);
                        Response::Hello {
                            host: self.cfg.name.clone(),
                        }
                    }
                    Request::List => Response::Devices {
                        devices: self.host.lender.list(&self.cfg.name),
                    },
                    borrow @ Request::Borrow { .. } => {
                        let refusal = match &borrow {
                            Request::Borrow {
                                device, borrower, ..
                            } => self.refused(device, borrower),
                            _ => None,
                        };
                        match refusal {
                            Some(message) => Response::Error { message },
                            None => self.host.lender.handle(self, borrow),
                        }
                    }
                    other => self.host.lender.handle(self, other),
                };
                if let Err(e) = self.post(Envelope::Response { id, body: response }) {
                    tracing::warn!("could not answer request {id}: {e}");
                }
            }
            Envelope::Response { id, body } => {
                if let Some(tx) = devlend_sync::lock(&self.pending).remove(&id) {
                    let _ = tx.send(body);
                }
            }
            Envelope::Event {
                body: Event::Revoked { lease, reason },
            } => {
                self.borrower.revoked(lease, &reason);
            }
            Envelope::Event {
                body:
                    Event::Reclaiming {
                        lease,
                        grace_ms,
                        reason,
                    },
            } => {
                let Some(name) = self.borrower.name_of(lease) else {
                    return;
                };
                let grace = Duration::from_millis(grace_ms);
                tracing::warn!("{reason}: {name} goes in {grace:?}");
                let hook = devlend_sync::lock(&self.host.reclaim_hook).clone();
                if let Some(hook) = hook {
                    let spawned = std::thread::Builder::new()
                        .name(format!("devlend-reclaim-{name}"))
                        .spawn(move || hook(&name, grace));
                    if let Err(e) = spawned {
                        tracing::warn!("reclaim hook not run: {e}");
                    }
                }
            }
        }
    }
}

/// The management thread: drains the mailbox, answers, heartbeats, expires leases, and turns
/// a link change into a surprise removal of everything borrowed.
fn management_loop(weak: Weak<Inner>, ntb: Arc<dyn Ntb>) {
    let mut generation = ntb.link_generation();
    let mut last_beat = Instant::now();
    let mut more_records = false;
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.stop.load(Ordering::Acquire) {
            return;
        }
        let now_generation = ntb.link_generation();
        if now_generation != generation {
            generation = now_generation;
            inner
                .borrower
                .remove_all("the link to the lender went down");
            *devlend_sync::lock(&inner.peer_name) = None;
        }
        if ntb.link_state() == LinkState::Down {
            drop(inner);
            let _ = ntb.wait_link(LinkState::Up, Duration::from_millis(50));
        } else {
            let beat = inner.cfg.lease / 4;
            let wait = beat.min(Duration::from_millis(50));
            // Sleep only when the last batch took everything: a batch is bounded, so a peer
            // that floods the mailbox cannot keep this thread from its other duties.
            if !more_records {
                let _ = inner.channel.wait(wait);
            }
            let (records, more) = inner.channel.drain();
            more_records = more;
            for record in records {
                match Envelope::parse(&record) {
                    Ok(env) => inner.handle(env),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
            if last_beat.elapsed() >= beat {
                last_beat = Instant::now();
                for lease in inner.borrower.leases() {
                    let hb = Envelope::Request {
                        id: 0,
                        body: Request::Heartbeat { lease },
                    };
                    if let Err(e) = inner.post(hb) {
                        tracing::debug!("heartbeat for lease {lease} not sent: {e}");
                    }
                }
            }
        }
        let Some(inner) = weak.upgrade() else { return };
        // The host's expiry thread does this on its own; here too, in case it could not start.
        expire_leases(&inner.host);
        // Each link tells its own peer: a peer that does not make room in its mailbox holds
        // its own link's thread, never another's.
        let events = std::mem::take(&mut *devlend_sync::lock(&inner.events));
        for body in events {
            if let Err(e) = inner.post(Envelope::Event { body }) {
                tracing::debug!("event not delivered: {e}");
            }
        }
    }
}

/// [`channel::wait_peer_window`] for the lending layer: a translation that never comes is
/// the peer breaking the protocol.
pub(crate) fn wait_peer_window(
    ntb: &dyn Ntb,
    window: usize,
    len: u64,
    timeout: Duration,
) -> Result<(), LendingError> {
    let deadline = Instant::now()
        .checked_add(timeout)
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
    channel::wait_peer_window(ntb, window, len, deadline).map_err(|e| match e {
        channel::ChannelError::Timeout => LendingError::Protocol(format!(
            "the peer's window {window} was not translated in time"
        )),
        other => other.into(),
    })
}

/// The doorbell bits a grant's vectors use.
pub(crate) fn lender_doorbell_mask(grant: &protocol::Grant) -> u64 {
    let n = u32::from(grant.device.vectors);
    let ones = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    ones.checked_shl(grant.doorbell_base).unwrap_or(0)
}
