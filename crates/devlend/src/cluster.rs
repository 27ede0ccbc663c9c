//! A node in a cluster: registration on etcd, borrowing by name, links made on demand.
//!
//! With `devlend node --registry etcd://...` a node registers itself and every device it lends
//! (crates/registry). Borrowing a device by name:
//!
//! 1. looks its record up (which host lends it);
//! 2. claims it in one etcd transaction tied to this node's lease (the loser is told who won);
//! 3. asks the lender for a link (a `links/LENDER/ME` key); the lender's link manager, which
//!    watches those keys, listens for exactly this peer (TLS with the deployment's keys, the
//!    peer's certificate name checked) and answers with its port (`ports/LENDER/ME`);
//! 4. connects, attaches the link to the lending runtime and borrows over it. The lender grants
//!    only if the registry names this peer as the holder ([`Admission`]), on top of its own
//!    one-borrower rule.
//!
//! Links no longer needed (nothing borrowed over them) are closed by both sides: the borrower
//! drops its request, the lender's manager sees it go. A borrower that dies loses its lease:
//! its claims and link requests vanish, the lender closes the link and reclaims the device when
//! the lending lease (heartbeats) runs out. A lender that dies loses its records: its devices
//! leave the inventory, and its borrowers see the link go down (surprise removal), release
//! their claims and close the link.
//!
//! Threads: one link manager (lender side: answers link requests; borrower side: releases
//! claims of removed devices and closes unneeded links), the lease keeper, and the callers of
//! [`Cluster::borrow`]. Lock order: `outbound` slot locks are taken before `state`; `state` is
//! never held across an etcd request or a fabric wait.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use devlend_fabric::{AddressSpace, LinkState, Ntb};
use devlend_lending::{BorrowedFunction, LinkId, Node, NodeConfig};
use devlend_registry::{
    Claim, DeviceRecord, LeaseKeeper, LeaseView, NodeRecord, Reach, Registry, RegistryAddr,
    RegistryError,
};

use crate::host::{self, FabricSpec, TcpOptions};
use devlend_sync::lock;

/// How long a borrower waits for a lender to answer a link request and the link to come up.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the link manager re-reads the registry when no watch event woke it (and so
/// retries a claim release etcd did not take; `return` says so).
pub(crate) const RECONCILE_EVERY: Duration = Duration::from_millis(500);

/// How this node takes part in a cluster.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// The etcd cluster.
    pub registry: RegistryAddr,
    /// How other hosts reach this one.
    pub reach: Reach,
    /// The node's etcd lease TTL (its records vanish this long after it dies).
    pub ttl: Duration,
    /// The registry root prefix (one etcd may hold several clusters).
    pub root: String,
}

/// What the lending runtime asks before granting a borrow: the registry must name the
/// requesting peer as the holder, and the peer must be who its link authenticated.
struct Admission {
    registry: Arc<Registry>,
    peers: Mutex<HashMap<LinkId, String>>,
}

impl Admission {
    fn admit(&self, link: LinkId, device: &str, borrower: &str) -> Result<(), String> {
        let peer = lock(&self.peers).get(&link).cloned();
        match peer {
            Some(p) if p == borrower => {}
            Some(p) => return Err(format!("this link is authenticated as {p}, not {borrower}")),
            None => return Err("borrow requests come over links made through the registry".into()),
        }
        match self.registry.owner(device) {
            Ok(Some(o)) if o == borrower => Ok(()),
            Ok(Some(o)) => Err(format!("device {device} is already lent to {o}")),
            Ok(None) => Err(format!(
                "{borrower} holds no claim on {device} in the registry (borrow it by name)"
            )),
            Err(e) => Err(format!("cannot confirm the claim on {device}: {e}")),
        }
    }
}

/// A link this node (as borrower) opened to a lender.
struct OutLink {
    id: LinkId,
    _ntb: Arc<dyn Ntb>,
}

/// A link this node (as lender) serves for one borrower.
struct InLink {
    id: LinkId,
    _ntb: Arc<dyn Ntb>,
    /// The lease the answer was written under (written again after a re-registration).
    answered: Option<devlend_registry::LeaseId>,
    /// The answer (a tcp port; 0 for shm).
    port: u16,
    /// Since when the borrower's request is missing (the link closes after a grace period:
    /// a borrower registering again after an etcd outage re-asks under its new lease).
    missing_since: Option<Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Claimed, the borrow is under way.
    Pending,
    /// Borrowed.
    Active,
}

#[derive(Default)]
struct State {
    /// Devices this node lends (registered again after a lease loss).
    lending: BTreeMap<String, DeviceRecord>,
    /// Devices this node claimed: lender and progress.
    held: BTreeMap<String, (String, Hold)>,
    /// Links served to borrowers.
    inbound: BTreeMap<String, InLink>,
    /// How the last borrow of each device spent its time (for `bench cluster`).
    timing: BTreeMap<String, crate::proto::BorrowTiming>,
    /// Devices given back whose claim could not be released yet (etcd away).
    unreleased: std::collections::BTreeSet<String>,
}

struct Shared {
    name: String,
    opts: ClusterOptions,
    tcp: TcpOptions,
    registry: Arc<Registry>,
    asp: Arc<AddressSpace>,
    node: Arc<Node>,
    admission: Arc<Admission>,
    state: Mutex<State>,
    /// One slot per lender: its lock serialises link set-up to that lender.
    outbound: Mutex<BTreeMap<String, Arc<Mutex<Option<OutLink>>>>>,
    /// The lease keeper's lease (set once it has started).
    lease: OnceLock<LeaseView>,
    stop: AtomicBool,
}

/// This node's part in the cluster.
pub struct Cluster {
    shared: Arc<Shared>,
    keeper: Option<LeaseKeeper>,
    manager: Option<JoinHandle<()>>,
}

fn nvme_record(name: &str, lender: &str, detail: &str, size_bytes: Option<u64>) -> DeviceRecord {
    DeviceRecord {
        name: name.to_string(),
        kind: "nvme".into(),
        vendor: devlend_nvme::PCI_VENDOR_ID,
        device: devlend_nvme::PCI_DEVICE_ID,
        vfs: 0,
        state: "available".into(),
        lender: lender.to_string(),
        detail: detail.to_string(),
        size_bytes,
    }
}

impl Cluster {
    /// Connects to the registry, starts the lending runtime (no links yet) with the registry's
    /// admission check, registers this node, and starts the link manager.
    pub fn start(
        name: &str,
        opts: ClusterOptions,
        tcp: TcpOptions,
        mut cfg: NodeConfig,
    ) -> anyhow::Result<(Self, Arc<Node>)> {
        devlend_registry::check_name("node", name)?;
        let registry = Arc::new(
            Registry::connect_with(
                &opts.registry,
                &opts.root,
                devlend_registry::REQUEST_TIMEOUT,
            )
            .with_context(|| format!("connecting to the registry {}", opts.registry))?,
        );
        let admission = Arc::new(Admission {
            registry: registry.clone(),
            peers: Mutex::new(HashMap::new()),
        });
        let a = admission.clone();
        cfg.admit = Some(Arc::new(move |link, device, borrower| {
            a.admit(link, device, borrower)
        }));
        let asp = Arc::new(AddressSpace::new());
        let node = Arc::new(Node::start_on(cfg, asp.clone()));
        let shared = Arc::new(Shared {
            name: name.to_string(),
            opts: opts.clone(),
            tcp,
            registry: registry.clone(),
            asp,
            node: node.clone(),
            admission,
            state: Mutex::new(State::default()),
            outbound: Mutex::new(BTreeMap::new()),
            lease: OnceLock::new(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let keeper = LeaseKeeper::start(
            registry,
            opts.ttl,
            Box::new(move |reg, lease| s.register_all(reg, lease)),
        )?;
        let _ = shared.lease.set(keeper.view());
        let s = shared.clone();
        let manager = std::thread::Builder::new()
            .name("devlend-cluster".into())
            .spawn(move || s.manage())?;
        Ok((
            Self {
                shared,
                keeper: Some(keeper),
                manager: Some(manager),
            },
            node,
        ))
    }

    fn lease(&self) -> anyhow::Result<devlend_registry::LeaseId> {
        let keeper = self
            .keeper
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the node is shutting down"))?;
        keeper.lease().ok_or_else(|| {
            anyhow::anyhow!(
                "not registered: etcd at {} has been unreachable ({}); lending in place goes on, new borrows need the registry",
                self.shared.opts.registry,
                keeper.last_error().unwrap_or_else(|| "no answer".into())
            )
        })
    }

    /// Checks a device name before the device is built.
    pub fn check_device_name(&self, name: &str) -> anyhow::Result<()> {
        Ok(devlend_registry::check_name("device", name)?)
    }

    /// Registers a device this node added (refused, and to be removed by the caller, when
    /// its name exists in the cluster).
    pub fn register_device(
        &self,
        name: &str,
        detail: &str,
        size_bytes: Option<u64>,
    ) -> anyhow::Result<()> {
        let lease = self.lease()?;
        let rec = nvme_record(name, &self.shared.name, detail, size_bytes);
        self.shared.registry.register_device(&rec, lease)?;
        lock(&self.shared.state)
            .lending
            .insert(name.to_string(), rec);
        Ok(())
    }

    /// Takes a device this node no longer lends out of the registry (and out of what it
    /// registers again after a new lease).
    pub fn unregister_device(&self, name: &str) -> anyhow::Result<()> {
        let known = lock(&self.shared.state).lending.remove(name).is_some();
        if known {
            self.shared
                .registry
                .unregister_device(name, &self.shared.name)?;
        }
        Ok(())
    }

    /// Every device of the cluster, in the shape of the local listing: this node's under
    /// `local`, the others' under `peer` (owner = lender), each with its borrower.
    pub fn list(&self) -> anyhow::Result<crate::proto::ListReply> {
        use crate::proto::{Device, DeviceState};
        let devices = self.shared.registry.devices()?;
        let (local, peer): (Vec<_>, Vec<_>) = devices
            .into_iter()
            .map(|d| {
                let held = d.borrower.as_deref() == Some(self.shared.name.as_str());
                let state = match (&d.borrower, d.record.state.as_str()) {
                    (Some(_), _) if held => DeviceState::Borrowed,
                    (Some(_), _) => DeviceState::Lent,
                    (None, _) if d.record.vfs > 0 => DeviceState::ManagingVfs,
                    (None, _) => DeviceState::Available,
                };
                Device {
                    name: d.record.name,
                    kind: d.record.kind,
                    owner: d.record.lender,
                    borrower: d.borrower,
                    state,
                    size_bytes: d.record.size_bytes,
                    vectors: None,
                    vendor: Some(d.record.vendor),
                    device: Some(d.record.device),
                    vfs: Some(d.record.vfs),
                    detail: d.record.detail,
                    vfio_user: None,
                    vm: None,
                    reason: None,
                }
            })
            .partition(|d| d.owner == self.shared.name);
        Ok(crate::proto::ListReply {
            local,
            peer,
            peer_error: None,
            registry: Some(self.shared.opts.registry.to_string()),
        })
    }

    /// Borrows a device of the cluster by name.
    pub fn borrow(&self, device: &str) -> anyhow::Result<Arc<BorrowedFunction>> {
        let lease = self.lease()?;
        let s = &self.shared;
        let t0 = Instant::now();
        let view = s.registry.device(device)?;
        let t_lookup = t0.elapsed();
        let lender = view.record.lender.clone();
        anyhow::ensure!(lender != s.name, "{device} is lent by this host");
        {
            let st = lock(&s.state);
            if let Some((_, hold)) = st.held.get(device) {
                anyhow::bail!(
                    "{device} is {} by this host",
                    if *hold == Hold::Active {
                        "already borrowed"
                    } else {
                        "being borrowed"
                    }
                );
            }
        }
        let t1 = Instant::now();
        let claim = s.registry.claim(device, &s.name, lease)?;
        let t_claim = t1.elapsed();
        match claim {
            Claim::Won => {}
            Claim::Held { by } if by.is_empty() => {
                anyhow::bail!("device {device} was being released; try again")
            }
            Claim::Held { by } => anyhow::bail!("device {device} is already lent to {by}"),
        }
        {
            let mut st = lock(&s.state);
            st.unreleased.remove(device);
            st.held
                .insert(device.to_string(), (lender.clone(), Hold::Pending));
        }
        let t2 = Instant::now();
        let mut t_link = Duration::ZERO;
        let result = s.link_to(&lender, lease).and_then(|link| {
            t_link = t2.elapsed();
            Ok(s.node.borrow_via(link, device)?)
        });
        match result {
            Ok(f) => {
                let mut st = lock(&s.state);
                if let Some(h) = st.held.get_mut(device) {
                    h.1 = Hold::Active;
                }
                st.timing.insert(
                    device.to_string(),
                    crate::proto::BorrowTiming {
                        lookup_us: micros(t_lookup),
                        claim_us: micros(t_claim),
                        link_us: micros(t_link),
                        lease_us: micros(t2.elapsed().saturating_sub(t_link)),
                    },
                );
                Ok(f)
            }
            Err(e) => {
                lock(&s.state).held.remove(device);
                if let Err(r) = s.registry.release(device, &s.name) {
                    tracing::warn!("releasing the claim on {device}: {r}");
                }
                s.close_unneeded();
                Err(e.context(format!("borrowing {device} from {lender}")))
            }
        }
    }

    /// How the last borrow of `device` by this node spent its time: registry lookup, claim
    /// transaction, link (request, answer, connect, attach; 0 when one existed), lending lease.
    pub fn borrow_timing(&self, device: &str) -> Option<crate::proto::BorrowTiming> {
        lock(&self.shared.state).timing.get(device).copied()
    }

    /// After `give_back`: releases the claim (later, if etcd is away: the device is given
    /// back either way) and closes the link if nothing else uses it. Returns why the release
    /// is still pending, if it is (the manager retries it until etcd takes it).
    pub fn returned(&self, device: &str) -> anyhow::Result<Option<String>> {
        let s = &self.shared;
        lock(&s.state).held.remove(device);
        let pending = s.release_or_retry(device);
        s.close_unneeded();
        Ok(pending)
    }

    /// Cluster facts for `status`.
    pub fn status(&self) -> crate::proto::ClusterStatus {
        let st = lock(&self.shared.state);
        let lenders: Vec<String> = lock(&self.shared.outbound)
            .iter()
            .filter(|(_, slot)| slot.try_lock().map(|g| g.is_some()).unwrap_or(true))
            .map(|(l, _)| l.clone())
            .collect();
        crate::proto::ClusterStatus {
            registry: self.shared.opts.registry.to_string(),
            registered: self.keeper.as_ref().and_then(|k| k.lease()).is_some(),
            registrations: self.keeper.as_ref().map(|k| k.generation()),
            links_to_lenders: lenders,
            links_to_borrowers: st.inbound.keys().cloned().collect(),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.manager.take() {
            let _ = t.join();
        }
        if let Some(k) = self.keeper.take() {
            // Leaving on purpose: the records go at once rather than after the TTL.
            k.stop(&self.shared.registry);
        }
    }
}

impl Shared {
    /// Registers this node and everything it lends and holds under `lease` (at start and
    /// after a lease loss).
    fn register_all(
        &self,
        reg: &Registry,
        lease: devlend_registry::LeaseId,
    ) -> Result<(), RegistryError> {
        reg.register_node(
            &NodeRecord {
                name: self.name.clone(),
                reach: self.opts.reach.clone(),
            },
            lease,
        )?;
        let (lending, held): (Vec<DeviceRecord>, Vec<(String, String)>) = {
            let st = lock(&self.state);
            (
                st.lending.values().cloned().collect(),
                st.held
                    .iter()
                    .map(|(d, (l, _))| (d.clone(), l.clone()))
                    .collect(),
            )
        };
        for rec in lending {
            if let Err(e) = reg.register_device(&rec, lease) {
                tracing::error!("registering {} again: {e}", rec.name);
            }
        }
        for (device, lender) in held {
            match reg.claim(&device, &self.name, lease) {
                Ok(Claim::Won) => {}
                Ok(Claim::Held { by }) => {
                    tracing::error!("{device}: the registry now names {by} as its holder")
                }
                Err(e) => tracing::warn!("claiming {device} again: {e}"),
            }
            if let Err(e) = reg.request_link(&lender, &self.name, lease) {
                tracing::warn!("asking {lender} for the link again: {e}");
            }
        }
        Ok(())
    }

    /// The link to `lender`, made if there is none: ask, wait for the answer, connect.
    fn link_to(&self, lender: &str, lease: devlend_registry::LeaseId) -> anyhow::Result<LinkId> {
        let slot = lock(&self.outbound)
            .entry(lender.to_string())
            .or_default()
            .clone();
        let mut link = lock(&slot);
        if let Some(l) = link.as_ref() {
            if self.node.link_ids().contains(&l.id) {
                return Ok(l.id);
            }
        }
        let rec = self
            .registry
            .node(lender)?
            .ok_or_else(|| anyhow::anyhow!("lender {lender} is not registered (it is down)"))?;
        self.registry.request_link(lender, &self.name, lease)?;
        // The answer may be a listener the lender is just closing (it closes a link whose
        // request was gone for a while): if the link does not come up, read the answer again
        // and follow a new port.
        let deadline = Instant::now() + LINK_TIMEOUT;
        let mut port = self.wait_answer(lender)?;
        let open = |port: u16| -> anyhow::Result<(Arc<dyn Ntb>, FabricSpec)> {
            let spec = match &rec.reach {
                Reach::Tcp { addr } => FabricSpec::TcpConnect {
                    peer: lender.to_string(),
                    addr: SocketAddr::new(*addr, port),
                },
                Reach::Shm { dir } => FabricSpec::Shm(shm_dir(dir, lender, &self.name)),
            };
            let ntb = host::open_fabric(&spec, self.asp.clone(), &self.tcp)
                .with_context(|| format!("opening a link to {lender} ({spec})"))?;
            Ok((ntb, spec))
        };
        let (mut ntb, mut spec) = open(port)?;
        while ntb
            .wait_link(LinkState::Up, Duration::from_millis(500))
            .is_err()
        {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the link to {lender} ({spec}) did not come up in {LINK_TIMEOUT:?}"
            );
            if let Some(now) = self.registry.link_port(lender, &self.name)? {
                if now != port {
                    tracing::info!("{lender} answers on port {now} now, not {port}");
                    port = now;
                    (ntb, spec) = open(port)?;
                }
            }
        }
        let id = self.node.attach(ntb.clone())?;
        *link = Some(OutLink { id, _ntb: ntb });
        Ok(id)
    }

    /// Waits for the lender's answer to our link request (its port).
    fn wait_answer(&self, lender: &str) -> anyhow::Result<u16> {
        let deadline = Instant::now() + LINK_TIMEOUT;
        let mut wait = Duration::from_millis(2);
        loop {
            if let Some(port) = self.registry.link_port(lender, &self.name)? {
                return Ok(port);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "lender {lender} did not answer the link request in {LINK_TIMEOUT:?}"
            );
            std::thread::sleep(wait);
            wait = (wait * 2).min(Duration::from_millis(50));
        }
    }

    /// Closes the links to lenders nothing is borrowed from (borrower side).
    fn close_unneeded(&self) {
        let needed: Vec<String> = lock(&self.state)
            .held
            .values()
            .map(|(l, _)| l.clone())
            .collect();
        let slots: Vec<(String, Arc<Mutex<Option<OutLink>>>)> = lock(&self.outbound)
            .iter()
            .map(|(l, s)| (l.clone(), s.clone()))
            .collect();
        for (lender, slot) in slots {
            if needed.contains(&lender) {
                continue;
            }
            // A slot being set up is busy: it is needed.
            let Ok(mut link) = slot.try_lock() else {
                continue;
            };
            // Re-check under the slot lock: a borrow may have started meanwhile.
            if lock(&self.state).held.values().any(|(l, _)| *l == lender) {
                continue;
            }
            if let Some(l) = link.take() {
                let _ = self.node.detach(l.id);
                tracing::info!("closed the link to {lender}: nothing borrowed over it");
            }
            if let Err(e) = self.registry.drop_link_request(&lender, &self.name) {
                tracing::warn!("dropping the link request to {lender}: {e}");
            }
        }
    }

    /// Borrower side: claims of devices that were removed (lender gone, link down) are
    /// released.
    fn release_removed(&self) {
        let active: Vec<String> = lock(&self.state)
            .held
            .iter()
            .filter(|(_, (_, h))| *h == Hold::Active)
            .map(|(d, _)| d.clone())
            .collect();
        for device in active {
            let removed = match self.node.borrowed(&device) {
                None => true,
                Some(f) => f.is_removed(),
            };
            if removed {
                tracing::warn!("{device} was removed; releasing its claim");
                let _ = self.node.give_back(&device);
                lock(&self.state).held.remove(&device);
                // A release etcd does not take now (a leader change, a timeout) is retried
                // with the others: the claim would otherwise stay as long as this node's lease.
                let _ = self.release_or_retry(&device);
            }
        }
    }

    /// Borrower side: releases the claims that could not be released at return.
    fn release_backlog(&self) {
        let backlog: Vec<String> = {
            let st = lock(&self.state);
            st.unreleased
                .iter()
                .filter(|d| !st.held.contains_key(*d))
                .cloned()
                .collect()
        };
        for device in backlog {
            if self.registry.release(&device, &self.name).is_ok() {
                lock(&self.state).unreleased.remove(&device);
            }
        }
    }

    /// Borrower side: claims that vanished (after an etcd outage, registered again before the
    /// lender registered its devices) are made again.
    fn renew_claims(&self, lease: devlend_registry::LeaseId) {
        let active: Vec<(String, String)> = lock(&self.state)
            .held
            .iter()
            .filter(|(_, (_, h))| *h == Hold::Active)
            .map(|(d, (l, _))| (d.clone(), l.clone()))
            .collect();
        for (device, lender) in active {
            if let Ok(None) = self.registry.owner(&device) {
                match self.registry.claim(&device, &self.name, lease) {
                    // Returned since the list above was taken (`returned` forgets the device,
                    // then releases its claim, which may have found nothing yet): the claim
                    // just made is a stale one, and nobody else would ever release it.
                    Ok(Claim::Won) if !self.holds_active(&device) => {
                        self.release_or_retry(&device);
                    }
                    Ok(Claim::Won) => {
                        let _ = self.registry.request_link(&lender, &self.name, lease);
                        tracing::info!("claimed {device} again");
                    }
                    Ok(Claim::Held { by }) => {
                        tracing::error!("{device}: the registry now names {by} as its holder")
                    }
                    Err(e) => tracing::debug!("claiming {device} again: {e}"),
                }
            }
        }
    }

    /// Releases this node's claim on `device`, a device it no longer holds; if etcd does not
    /// take it now, the manager retries ([`Shared::release_backlog`]). Returns why the release
    /// is still pending, if it is.
    fn release_or_retry(&self, device: &str) -> Option<String> {
        let e = self.registry.release(device, &self.name).err()?;
        tracing::warn!("{device} given back; its claim is released when etcd answers: {e}");
        lock(&self.state).unreleased.insert(device.to_string());
        Some(format!("{e:#}"))
    }

    /// Whether this node holds `device` with an active lease.
    fn holds_active(&self, device: &str) -> bool {
        lock(&self.state)
            .held
            .get(device)
            .is_some_and(|(_, h)| *h == Hold::Active)
    }

    /// Lender side: one link per borrower that asks, none for those that stopped asking.
    fn serve_links(&self, lease: Option<devlend_registry::LeaseId>) -> anyhow::Result<()> {
        let wanted = self.registry.link_requests(&self.name)?;
        let grace = self.opts.ttl + Duration::from_secs(1);
        let stale: Vec<(String, LinkId)> = {
            let mut st = lock(&self.state);
            let mut stale = Vec::new();
            for (b, l) in st.inbound.iter_mut() {
                if wanted.contains(b) {
                    l.missing_since = None;
                    continue;
                }
                let since = *l.missing_since.get_or_insert_with(Instant::now);
                // Nothing is lent over a link whose borrower stopped asking long ago: its
                // heartbeats stopped too, so the lending lease expired.
                if since.elapsed() >= grace {
                    stale.push((b.clone(), l.id));
                }
            }
            stale
        };
        for (borrower, id) in stale {
            let _ = self.node.detach(id);
            lock(&self.admission.peers).remove(&id);
            lock(&self.state).inbound.remove(&borrower);
            tracing::info!("closed the link to borrower {borrower}: it no longer asks");
            if let Err(e) = self.registry.withdraw_link(&self.name, &borrower) {
                tracing::warn!("withdrawing the link answer to {borrower}: {e}");
            }
        }
        let Some(lease) = lease else { return Ok(()) };
        for borrower in wanted {
            let existing = lock(&self.state)
                .inbound
                .get(&borrower)
                .map(|l| (l.answered, l.port));
            let port = match existing {
                Some((answered, _)) if answered == Some(lease) => continue,
                Some((_, port)) => port,
                None => match self.open_inbound(&borrower) {
                    Ok(p) => p,
                    Err(e) => {
                        tracing::warn!("cannot serve a link to {borrower}: {e:#}");
                        continue;
                    }
                },
            };
            self.registry
                .answer_link(&self.name, &borrower, port, lease)?;
            if let Some(l) = lock(&self.state).inbound.get_mut(&borrower) {
                l.answered = Some(lease);
            }
        }
        Ok(())
    }

    /// Listens for one borrower (its certificate name checked) and attaches the link.
    fn open_inbound(&self, borrower: &str) -> anyhow::Result<u16> {
        devlend_registry::check_name("node", borrower)?;
        let (ntb, port): (Arc<dyn Ntb>, u16) = match &self.opts.reach {
            Reach::Tcp { addr } => {
                let cfg = host::tcp_config(&self.tcp);
                let t = devlend_fabric_tcp::TcpNtb::listen(
                    SocketAddr::new(*addr, 0),
                    self.asp.clone(),
                    cfg,
                    self.tcp.credentials(borrower)?,
                )?;
                let port = t
                    .local_addr()
                    .map(|a| a.port())
                    .ok_or_else(|| anyhow::anyhow!("the listener has no address"))?;
                (Arc::new(t), port)
            }
            Reach::Shm { dir } => {
                let spec = FabricSpec::Shm(shm_dir(dir, &self.name, borrower));
                (host::open_fabric(&spec, self.asp.clone(), &self.tcp)?, 0)
            }
        };
        let id = self.node.attach(ntb.clone())?;
        lock(&self.admission.peers).insert(id, borrower.to_string());
        lock(&self.state).inbound.insert(
            borrower.to_string(),
            InLink {
                id,
                _ntb: ntb,
                answered: None,
                port,
                missing_since: None,
            },
        );
        Ok(port)
    }

    /// The link manager: follows link requests (watch, and a re-read every
    /// [`RECONCILE_EVERY`]), releases removed devices, closes unneeded links.
    fn manage(self: Arc<Self>) {
        let mut watch = None;
        let mut last_error = String::new();
        while !self.stop.load(Ordering::Acquire) {
            if watch.is_none() {
                watch = self.registry.watch_link_requests(&self.name).ok();
            }
            let lease = self.current_lease();
            if let Err(e) = self.serve_links(lease) {
                let msg = format!("{e:#}");
                if msg != last_error {
                    tracing::warn!("link manager: {msg}");
                    last_error = msg;
                }
            }
            self.release_removed();
            self.release_backlog();
            if let Some(lease) = lease {
                self.renew_claims(lease);
            }
            self.close_unneeded();
            match &watch {
                Some(w) => {
                    if w.next(RECONCILE_EVERY).is_err() {
                        watch = None;
                    }
                }
                None => std::thread::sleep(RECONCILE_EVERY),
            }
        }
        // Leaving: close every link.
        for id in self.node.link_ids() {
            let _ = self.node.detach(id);
        }
    }

    fn current_lease(&self) -> Option<devlend_registry::LeaseId> {
        self.lease.get().and_then(|v| v.lease())
    }
}

/// The rendezvous directory of the shm link between `lender` and `borrower`.
fn shm_dir(root: &std::path::Path, lender: &str, borrower: &str) -> PathBuf {
    root.join(format!("{lender}--{borrower}"))
}
