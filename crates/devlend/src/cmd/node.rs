//! `devlend node`: one host's daemon.
//!
//! It owns the host's NTB endpoint and lending runtime, and serves the management verbs on a
//! UNIX socket in its state directory. Borrowed devices live here: the verbs `check` (run the
//! user-space driver on one) and `borrow --vfio-user` (serve one to a VMM) use them in-process.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use devlend_lending::{Node, NodeConfig};
use devlend_sync::lock;
use serde::Deserialize;

use super::ctl::{DEFAULT_STATE, SOCKET_NAME};
use super::observe::Observe;
use crate::host;
use crate::proto::{self, ErrorBody, ErrorCode, Reply, Request};
use crate::vm;

/// `devlend node` flags; each may also come from `--config FILE` (TOML, same keys).
#[derive(clap::Args)]
pub struct Args {
    /// This host's name (default: the machine's hostname).
    #[arg(long)]
    name: Option<String>,
    /// An NTB link: `shm:DIR` (both hosts on this machine rendezvous in DIR), or
    /// `tcp-listen:PEER@ADDR:PORT` / `tcp-connect:PEER@ADDR:PORT` (hosts on different machines,
    /// TLS with the keys from `devlend keygen`). Repeat for a host with several links.
    #[arg(long)]
    fabric: Vec<String>,
    /// State directory (management socket, lock).
    #[arg(long, env = "DEVLEND_STATE")]
    state: Option<PathBuf>,
    /// Directory with this host's TLS key pair and the deployment CA (`devlend keygen`).
    #[arg(long)]
    keys: Option<PathBuf>,
    /// Plain, unauthenticated TCP (only when both hosts ask for it; for isolated test rigs).
    #[arg(long)]
    insecure_tcp: bool,
    /// Pin each tcp link's threads: the writer thread (which sends bulk data) on CPU WRITER,
    /// the threads that read the socket and serve the peer on CPU READER (off by default).
    #[arg(long, value_name = "WRITER,READER")]
    tcp_cpus: Option<String>,
    /// Lease timeout in milliseconds (at least 100): a silent borrower loses its devices after
    /// this long.
    #[arg(long)]
    lease_ms: Option<u64>,
    /// Borrow this device from a peer as soon as the link is up (retrying until it is offered).
    #[arg(long)]
    borrow: Option<String>,
    /// With --borrow: serve the borrowed device to a VMM on this vfio-user socket.
    #[arg(long, requires = "borrow")]
    vfio_user: Option<PathBuf>,
    /// Join a cluster: register this node and its devices on etcd
    /// (`etcd://HOST:PORT[,HOST:PORT...]`), borrow any device of the cluster by name, links
    /// made on demand. Needs --cluster-addr (or --cluster-shm) and --keys (or --insecure-tcp).
    #[arg(long, value_name = "etcd://HOST:PORT[,HOST:PORT...]")]
    registry: Option<String>,
    /// With --registry: the IP address other hosts reach this one at (links listen there).
    #[arg(long, value_name = "IP")]
    cluster_addr: Option<std::net::IpAddr>,
    /// With --registry, hosts on one machine: make links through the shm fabric under DIR.
    #[arg(long, value_name = "DIR", conflicts_with = "cluster_addr")]
    cluster_shm: Option<PathBuf>,
    /// With --registry: the etcd lease TTL in whole seconds; a dead node's records vanish
    /// this long after it stopped (default 3).
    #[arg(long, value_name = "SECONDS")]
    registry_ttl: Option<u64>,
    /// A TOML file with any of: name, fabric, state, keys, lease_ms, tcp_cpus, registry,
    /// cluster_addr, cluster_shm, registry_ttl, metrics.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Serve Prometheus metrics (text format) on http://ADDR:PORT/metrics (e.g. 127.0.0.1:9464).
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<std::net::SocketAddr>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    fabric: Option<Vec<String>>,
    state: Option<PathBuf>,
    keys: Option<PathBuf>,
    lease_ms: Option<u64>,
    tcp_cpus: Option<String>,
    registry: Option<String>,
    cluster_addr: Option<std::net::IpAddr>,
    cluster_shm: Option<PathBuf>,
    registry_ttl: Option<u64>,
    metrics: Option<std::net::SocketAddr>,
}

/// The resolved settings of a node.
pub struct Settings {
    /// Host name.
    pub name: String,
    /// Links.
    pub fabrics: Vec<host::FabricSpec>,
    /// TCP authentication and thread placement.
    pub tcp: host::TcpOptions,
    /// State directory.
    pub state: PathBuf,
    /// Lease length.
    pub lease: Duration,
    /// Start-up borrow: device and optional vfio-user socket.
    pub borrow: Option<(String, Option<PathBuf>)>,
    /// Cluster membership (`--registry`).
    pub cluster: Option<crate::cluster::ClusterOptions>,
    /// Where to serve metrics.
    pub metrics: Option<std::net::SocketAddr>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "host".into())
}

impl Args {
    fn resolve(self) -> anyhow::Result<Settings> {
        let file: FileConfig = match &self.config {
            Some(p) => toml::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("parsing {}", p.display()))?,
            None => FileConfig::default(),
        };
        let keys = self.keys.or(file.keys);
        let mut fabrics = if self.fabric.is_empty() {
            file.fabric.unwrap_or_default()
        } else {
            self.fabric
        };
        let cluster = match self.registry.or(file.registry) {
            None => None,
            Some(r) => {
                anyhow::ensure!(
                    fabrics.is_empty(),
                    "--registry makes links on demand: give no --fabric"
                );
                let registry = devlend_registry::RegistryAddr::parse(&r)?;
                let reach = match (
                    self.cluster_addr.or(file.cluster_addr),
                    self.cluster_shm.or(file.cluster_shm),
                ) {
                    (Some(addr), None) => devlend_registry::Reach::Tcp { addr },
                    (None, Some(dir)) => devlend_registry::Reach::Shm { dir },
                    _ => anyhow::bail!(
                        "--registry needs --cluster-addr IP (how other hosts reach this one) or --cluster-shm DIR (hosts on one machine)"
                    ),
                };
                let ttl = self.registry_ttl.or(file.registry_ttl).unwrap_or(3);
                anyhow::ensure!(
                    (1..=3600).contains(&ttl),
                    "--registry-ttl is whole seconds, 1 to 3600"
                );
                Some(crate::cluster::ClusterOptions {
                    registry,
                    reach,
                    ttl: Duration::from_secs(ttl),
                    root: devlend_registry::DEFAULT_ROOT.into(),
                })
            }
        };
        if fabrics.is_empty() && cluster.is_none() {
            fabrics.push("shm:/tmp/devlend-fabric".into());
        }
        let name = self.name.or(file.name).unwrap_or_else(hostname);
        devlend_fabric_tcp::keys::check_host_name(&name).map_err(|_| {
            anyhow::anyhow!(
                "node name {name:?} is not valid: use letters, digits, '-' and '.' (no spaces), not starting with '-' or '.' (it names the host's TLS certificate)"
            )
        })?;
        let lease_ms = self.lease_ms.or(file.lease_ms).unwrap_or(3000);
        anyhow::ensure!(
            lease_ms >= MIN_LEASE_MS,
            "--lease-ms {lease_ms} is too short: a lease is at least {MIN_LEASE_MS} ms (borrowers renew it every quarter of it)"
        );
        let cpus = match self.tcp_cpus.or(file.tcp_cpus) {
            Some(s) => host::parse_tcp_cpus(&s)?,
            None => Default::default(),
        };
        Ok(Settings {
            tcp: host::TcpOptions {
                host: name.clone(),
                keys,
                insecure: self.insecure_tcp,
                cpus,
            },
            name,
            fabrics: fabrics
                .iter()
                .map(|f| host::FabricSpec::parse(f))
                .collect::<anyhow::Result<_>>()?,
            state: self
                .state
                .or(file.state)
                .unwrap_or_else(|| DEFAULT_STATE.into()),
            lease: Duration::from_millis(lease_ms),
            borrow: self.borrow.map(|b| (b, self.vfio_user)),
            cluster,
            metrics: self.metrics.or(file.metrics),
        })
    }
}

/// The shortest lease a node grants (`--lease-ms`).
const MIN_LEASE_MS: u64 = 100;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Release);
}

/// A borrowed device in a VM: where, and what it is (reported after its lease ended too).
#[derive(Clone)]
struct InVm {
    att: vm::Attachment,
    desc: devlend_lending::protocol::DeviceDesc,
}

/// Per-daemon state shared by connection threads.
struct Daemon {
    node: Arc<Node>,
    cluster: Option<crate::cluster::Cluster>,
    servers: Mutex<HashMap<String, host::VfioServer>>,
    /// Borrowed devices hot-added to running VMs, by device name.
    vms: Mutex<HashMap<String, InVm>>,
    /// Devices being taken out of their VMs right now (by `return`, a lender's take-back or
    /// the shutdown): a second take-back of one of them is refused, not run twice.
    leaving: Mutex<HashSet<String>>,
    /// The image each NVMe device (or SR-IOV physical function) this node lends holds.
    images: Mutex<HashMap<String, host::ImageLock>>,
    /// Borrowed devices a `check` is running on now.
    checking: Mutex<HashSet<String>>,
    /// The state directory (default home of vfio-user sockets for VMs).
    state: PathBuf,
    /// Counters, the metrics page, lspci snapshots.
    observe: Arc<Observe>,
    insecure_tcp: bool,
}

/// At shutdown, how long the borrower of a device this node still lends has to give it back
/// before it is revoked.
const SHUTDOWN_RECLAIM_GRACE: Duration = Duration::from_secs(2);

/// At shutdown, how long a device whose lease just ended may take to reset before the node
/// goes without removing it.
const SHUTDOWN_RESET_WAIT: Duration = Duration::from_secs(10);

/// Runs the daemon until SIGINT/SIGTERM or a `shutdown` request.
pub fn run(args: Args) -> anyhow::Result<()> {
    let s = args.resolve()?;
    std::fs::create_dir_all(&s.state).with_context(|| format!("creating {}", s.state.display()))?;
    let _lock = host::lock_exclusive(&s.state.join("node.lock")).with_context(|| {
        format!(
            "another devlend node is running with state directory {}",
            s.state.display()
        )
    })?;
    let sock_path = s.state.join(SOCKET_NAME);
    let _ = std::fs::remove_file(&sock_path);
    let listener = UnixListener::bind(&sock_path)
        .with_context(|| format!("binding {}", sock_path.display()))?;
    listener.set_nonblocking(true)?;
    let mut cfg = NodeConfig::new(&s.name);
    cfg.lease = s.lease;
    let (node, cluster, observe) = match &s.cluster {
        Some(c) => {
            let (cluster, node) =
                crate::cluster::Cluster::start(&s.name, c.clone(), s.tcp.clone(), cfg)?;
            (node, Some(cluster), Observe::new(&[], Vec::new()).0)
        }
        None => {
            let ntbs = host::open_fabrics(&s.fabrics, &s.tcp)?;
            let (observe, ntbs) = Observe::new(&s.fabrics, ntbs);
            (Arc::new(Node::start(cfg, ntbs)?), None, observe)
        }
    };
    // SAFETY: installing an async-signal-safe handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let links: Vec<String> = match &s.cluster {
        Some(c) => vec![format!("on demand through the registry {}", c.registry)],
        None => s.fabrics.iter().map(|f| f.to_string()).collect(),
    };
    eprintln!(
        "devlend node {}: links {}, management socket {}",
        s.name,
        links.join(", "),
        sock_path.display()
    );
    let daemon = Arc::new(Daemon {
        node,
        cluster,
        servers: Mutex::new(HashMap::new()),
        vms: Mutex::new(HashMap::new()),
        leaving: Mutex::new(HashSet::new()),
        checking: Mutex::new(HashSet::new()),
        images: Mutex::new(HashMap::new()),
        state: s.state.clone(),
        observe: Arc::new(observe),
        insecure_tcp: s.tcp.insecure,
    });
    // A lender's forced take-back of a device in a VM takes the path of `return`: the guest is
    // asked to release it. Weak: the node (which keeps the hook) lives inside the daemon.
    let weak = Arc::downgrade(&daemon);
    daemon
        .node
        .set_reclaim_hook(Some(Arc::new(move |name: &str, grace: Duration| {
            if let Some(d) = weak.upgrade() {
                on_reclaim(&d, name, grace);
            }
        })));
    if let Some(addr) = s.metrics {
        let d = daemon.clone();
        let bound = super::observe::serve_metrics(addr, move || d.observe.render(&d.node))?;
        eprintln!("devlend node {}: metrics on http://{bound}/metrics", s.name);
    }
    for name in super::persist::take_held(&s.state)? {
        tracing::warn!(
            "before this node restarted it held {name}; it no longer holds it (its lease ended with the old process)"
        );
        eprintln!(
            "devlend node {}: held {name} before the restart; no longer holds it",
            s.name
        );
    }
    for req in super::persist::devices(&s.state)? {
        let req = with_defaults(&daemon, req);
        if let Request::Add(add) = &req {
            let name = &add.name;
            match handle(&daemon, req.clone()) {
                Ok(_) => eprintln!(
                    "devlend node {}: lending {name} again (from {})",
                    s.name,
                    super::persist::DEVICES
                ),
                Err(e) => eprintln!(
                    "devlend node {}: could not lend {name} again: {e:#}",
                    s.name
                ),
            }
        }
    }
    if let Some((name, socket)) = s.borrow.clone() {
        let d = daemon.clone();
        std::thread::spawn(move || startup_borrow(&d, &name, socket));
    }
    let limits = Limits::from_env();
    let active = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    while !STOP.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => {
                if active.load(Ordering::Acquire) >= limits.max_connections {
                    // Refused at once, in this thread: a short line into an empty socket
                    // buffer does not block.
                    let _ = stream.set_nonblocking(true);
                    let _ = (&stream).write_all(&proto::reply_line(Err(ErrorBody::new(
                        ErrorCode::Busy,
                        format!(
                            "the node serves {} management connections already; try again",
                            limits.max_connections
                        ),
                    ))));
                    continue;
                }
                active.fetch_add(1, Ordering::AcqRel);
                let guard = ActiveGuard(active.clone());
                let d = daemon.clone();
                let spawned = std::thread::Builder::new()
                    .name("devlend-mgmt".into())
                    .spawn(move || serve_connection(&d, stream, limits, guard));
                if let Err(e) = spawned {
                    tracing::warn!("cannot serve a management connection: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Idle: wait for a connection or a signal.
                host::wait_for_connection(&listener);
            }
            Err(e) => return Err(e).context("accepting a management connection"),
        }
    }
    eprintln!("devlend node {}: shutting down", s.name);
    let mut held: Vec<String> = daemon
        .node
        .status()
        .borrowed
        .iter()
        .map(|d| d.name.clone())
        .collect();
    // Also devices still in a VM whose lease ended (their lender died): they leave the VM.
    for name in lock(&daemon.vms).keys() {
        if !held.contains(name) {
            held.push(name.clone());
        }
    }
    for name in held {
        // Devices in VMs leave them the same way as on `return`: unplug request, grace, then
        // surprise removal.
        match take_back(&daemon, &name, vm::DEFAULT_GRACE, Why::Return) {
            Ok(TakenBack {
                removal: Some(how), ..
            }) => eprintln!(
                "devlend node: {name} left its VM: {}",
                how.describe(vm::DEFAULT_GRACE)
            ),
            Ok(_) => {}
            Err(e) => eprintln!("devlend node: returning {name}: {e:#}"),
        }
    }
    // Devices go away with the node (a real function back to its driver). One still lent is
    // taken back first: its borrower is told and has a short grace, then loses it (else the
    // removal is refused and a real function would stay with vfio-pci after the node).
    for dev in daemon.node.local_devices() {
        if dev.borrower.is_some() {
            if let Err(e) = daemon.node.reclaim(&dev.name, SHUTDOWN_RECLAIM_GRACE) {
                eprintln!("devlend node: taking {} back: {e}", dev.name);
            }
        }
    }
    for dev in daemon.node.local_devices() {
        // A device whose lease just ended is reset before it can go.
        let deadline = std::time::Instant::now() + SHUTDOWN_RESET_WAIT;
        loop {
            match daemon.node.remove_device(&dev.name) {
                Err(devlend_lending::LendingError::Resetting(_))
                    if std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                // A VF goes with its PF; another error leaves the device to the process's end.
                _ => break,
            }
        }
    }
    let _ = std::fs::remove_file(&sock_path);
    Ok(())
}

/// `--borrow`: waits for the link and the device, borrows it, serves it if asked. Retries
/// until it works or the daemon stops; each failure is logged once per reason.
fn startup_borrow(d: &Daemon, name: &str, socket: Option<PathBuf>) {
    let mut last = String::new();
    while !STOP.load(Ordering::Acquire) {
        let attempt = || -> anyhow::Result<()> {
            d.node.wait_link_up(Duration::from_secs(1))?;
            let req = Request::Borrow(proto::BorrowRequest {
                name: name.to_string(),
                vfio_user: socket.clone(),
                vm: None,
                port: None,
                id: None,
            });
            handle(d, req)?;
            Ok(())
        };
        match attempt() {
            Ok(()) => {
                eprintln!("devlend node: borrowed {name}");
                return;
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if msg != last {
                    eprintln!("devlend node: borrowing {name} at start-up: {msg} (retrying)");
                    last = msg;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// How the management socket protects itself from its clients.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Connections served at once; one more is answered `busy` and closed.
    max_connections: usize,
    /// How long a connection may take to send its request line.
    idle: Duration,
}

impl Limits {
    /// Defaults (64 connections, 10 s), or `DEVLEND_MGMT_MAX_CONNECTIONS` and
    /// `DEVLEND_MGMT_IDLE_MS`.
    fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        Limits {
            max_connections: var("DEVLEND_MGMT_MAX_CONNECTIONS")
                .and_then(|n| usize::try_from(n).ok())
                .filter(|n| *n > 0)
                .unwrap_or(64),
            idle: Duration::from_millis(var("DEVLEND_MGMT_IDLE_MS").unwrap_or(10_000).max(1)),
        }
    }
}

/// Counts a connection as served until dropped.
struct ActiveGuard(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Reads one request line: at most [`proto::MAX_LINE`] bytes, all of it within
/// `limits.idle`. `Ok(None)`: the client closed without sending anything.
fn read_request(stream: &UnixStream, limits: Limits) -> Result<Option<Vec<u8>>, ErrorBody> {
    use std::io::Read;
    let deadline = std::time::Instant::now() + limits.idle;
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let idle = || {
            ErrorBody::new(
                ErrorCode::IdleTimeout,
                format!(
                    "no complete request within {} ms; closing",
                    limits.idle.as_millis()
                ),
            )
        };
        if left.is_zero() {
            return Err(idle());
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| ErrorBody::new(ErrorCode::Failed, e.to_string()))?;
        let n = match (&*stream).read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(idle())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ErrorBody::new(ErrorCode::Failed, e.to_string())),
        };
        let got = chunk.get(..n).unwrap_or_default();
        if n == 0 {
            // The client closed: what it sent is the request (or nothing).
            return Ok((!line.is_empty()).then_some(line));
        }
        if let Some(end) = got.iter().position(|b| *b == b'\n') {
            line.extend_from_slice(got.get(..end).unwrap_or_default());
        } else {
            line.extend_from_slice(got);
        }
        if line.len() >= proto::MAX_LINE {
            return Err(ErrorBody::new(
                ErrorCode::LineTooLong,
                format!(
                    "a request line is at most {} bytes; closing",
                    proto::MAX_LINE - 1
                ),
            ));
        }
        if got.contains(&b'\n') {
            return Ok(Some(line));
        }
    }
}

/// Serves one connection: one request, one reply. Whatever the client sends, it gets a
/// reply line (a JSON error for anything that is not a request) or, if it sent nothing and
/// closed, none.
///
/// The connection stops counting against the limit (`guard`) before the reply is written, so
/// a client that got its reply never finds its own connection still counted.
fn serve_connection(d: &Daemon, stream: UnixStream, limits: Limits, guard: ActiveGuard) {
    let answer = match read_request(&stream, limits) {
        Ok(None) => return,
        Ok(Some(line)) => proto::parse_request(&line).and_then(|req| {
            let req = with_defaults(d, req);
            handle(d, req.clone())
                .and_then(|v| {
                    super::persist::record(&d.state, &req)?;
                    Ok(v)
                })
                .map_err(|e| ErrorBody::from_anyhow(&e))
        }),
        Err(e) => Err(e),
    };
    let line = proto::reply_line(answer);
    drop(guard);
    let _ = stream.set_write_timeout(Some(limits.idle));
    let _ = (&stream).write_all(&line);
}

/// Fills in what a request leaves to the node, so that what is recorded in `devices.json`
/// (and replayed after a restart) is what was built: an NVMe device's serial number.
fn with_defaults(d: &Daemon, req: Request) -> Request {
    match req {
        Request::Add(mut add) if add.serial.is_none() => {
            add.serial = Some(host::default_serial(d.node.name(), &add.name));
            Request::Add(add)
        }
        other => other,
    }
}

fn device_of(d: &devlend_lending::protocol::DeviceDesc, held: bool) -> proto::Device {
    proto::Device::from_desc(d, held)
}

fn handle(d: &Daemon, req: Request) -> anyhow::Result<Reply> {
    Ok(match req {
        Request::Add(proto::AddRequest {
            kind,
            name,
            image,
            size,
            serial,
            model,
            queues,
            vfs,
            vf_namespaces,
            cmb,
        }) => {
            if kind != "nvme" {
                return Err(ErrorBody::new(
                    ErrorCode::Invalid,
                    format!("unknown device kind {kind:?}: only `nvme` is supported"),
                )
                .into());
            }
            let opts = host::NvmeOptions {
                image,
                size,
                serial,
                model,
                queues,
                cmb,
            };
            if vfs.is_some() && cmb.is_some() {
                return Err(ErrorBody::new(
                    ErrorCode::Invalid,
                    "--cmb and --vfs do not go together: the model offers a Controller Memory \
                     Buffer only on a device without SR-IOV",
                )
                .into());
            }
            if d.node.local_devices().iter().any(|x| x.name == name) {
                return Err(devlend_lending::LendingError::DuplicateName(name).into());
            }
            // Checked, created if missing and locked: a failure below drops the lock, which
            // removes an image it created.
            let mut image_lock = host::ImageLock::take(&opts)?;
            let detail = opts.detail()?;
            let devices = if let Some(vfs) = vfs {
                let ns = host::parse_vf_namespaces(vf_namespaces.as_deref().unwrap_or("shared"))?;
                let (pf, offers) = host::nvme_sriov(&opts, &name, vfs, ns)?;
                let pf_detail = format!(
                    "SR-IOV physical function ({vfs} of {} VFs enabled): {detail}",
                    host::SRIOV_TOTAL_VFS
                );
                let descs = d.node.add_sriov_device(&name, &pf_detail, pf, offers)?;
                descs.iter().map(|x| device_of(x, false)).collect()
            } else {
                anyhow::ensure!(vf_namespaces.is_none(), "--vf-namespaces needs --vfs N");
                if let Some(c) = &d.cluster {
                    c.check_device_name(&name)?;
                }
                let desc = d.node.add_device(
                    &name,
                    &detail,
                    d.observe.meter_builder(&name, host::nvme_builder(opts)),
                )?;
                if let Some(c) = &d.cluster {
                    // A name that exists elsewhere in the cluster is refused; nothing stays.
                    if let Err(e) = c.register_device(&name, &detail, desc.size_bytes) {
                        let _ = d.node.remove_device(&name);
                        return Err(e);
                    }
                }
                vec![device_of(&desc, false)]
            };
            image_lock.keep();
            lock(&d.images).insert(name, image_lock);
            Reply::Add(proto::AddReply { devices })
        }
        Request::AddVfio(proto::AddVfioRequest { name, bdf, bind }) => {
            anyhow::ensure!(
                d.cluster.is_none(),
                "cannot lend {bdf} through the registry: cluster links are made on demand over tcp, and {}",
                crate::vfio::TCP_REFUSAL
            );
            let tcp = (0..)
                .map_while(|i| d.node.ntb(i))
                .any(|n| n.backend() == "tcp");
            anyhow::ensure!(
                !tcp,
                "cannot lend {bdf} from this node: it has a tcp link, and {}",
                crate::vfio::TCP_REFUSAL
            );
            let (detail, build) = crate::vfio::builder(&bdf, bind)?;
            let desc = d.node.add_device(&name, &detail, build)?;
            Reply::Add(proto::AddReply {
                devices: vec![device_of(&desc, false)],
            })
        }
        Request::List(_) => match &d.cluster {
            Some(c) => Reply::List(c.list()?),
            None => {
                let local = d
                    .node
                    .local_devices()
                    .iter()
                    .map(|x| device_of(x, false))
                    .collect();
                let held: Vec<String> = d
                    .node
                    .status()
                    .borrowed
                    .iter()
                    .map(|b| b.name.clone())
                    .collect();
                let (peer, peer_error) = match d.node.peer_devices() {
                    Ok(peer) => (
                        peer.iter()
                            .map(|x| device_of(x, held.contains(&x.name)))
                            .collect(),
                        None,
                    ),
                    Err(e) => (Vec::new(), Some(e.to_string())),
                };
                Reply::List(proto::ListReply {
                    local,
                    peer,
                    peer_error,
                    registry: None,
                })
            }
        },
        Request::Borrow(proto::BorrowRequest {
            name,
            vfio_user,
            vm: Some(qmp),
            port,
            id,
        }) => Reply::Borrow(borrow_into_vm(
            d,
            &name,
            vfio_user,
            &qmp,
            port.as_deref(),
            id,
        )?),
        Request::Borrow(proto::BorrowRequest {
            name,
            vfio_user,
            vm: None,
            ..
        }) => {
            if let Some(sock) = &vfio_user {
                // Refused before the lease is asked for (bind checks again).
                host::refuse_live_socket(sock)?;
            }
            let f = borrow_fn(d, &name)?;
            // From here on the lease is ours: any failure gives it back.
            let server = match &vfio_user {
                Some(sock) => {
                    match host::VfioServer::start(d.observe.meter_borrowed(&name, f.clone()), sock)
                    {
                        Ok(server) => Some(server),
                        Err(e) => {
                            if let Err(back) = give_back_fn(d, &name, false) {
                                eprintln!(
                                    "devlend node: returning {name} after a failed borrow: {back:#}"
                                );
                            }
                            return Err(e.context(format!("{name} not borrowed (given back)")));
                        }
                    }
                }
                None => None,
            };
            d.observe.note_borrowed(&name);
            let out = proto::BorrowReply {
                name: name.clone(),
                owner: f.device().owner.clone(),
                lease: f.lease(),
                vfio_user: vfio_user.clone(),
                vm: None,
                timing: d.cluster.as_ref().and_then(|c| c.borrow_timing(&name)),
            };
            if let (Some(server), Some(sock)) = (server, &vfio_user) {
                eprintln!(
                    "devlend node: {name}: vfio-user server listening on {}",
                    sock.display()
                );
                lock(&d.servers).insert(name, server);
            }
            Reply::Borrow(out)
        }
        Request::Return(proto::ReturnRequest { name, grace_ms }) => {
            let grace = grace_ms.map_or(vm::DEFAULT_GRACE, Duration::from_millis);
            let TakenBack {
                removal,
                lease_had_ended,
                lost,
                claim_release_pending,
            } = take_back(d, &name, grace, Why::Return)?;
            Reply::Return(proto::ReturnReply {
                name,
                removal,
                removal_text: removal.map(|how| how.describe(grace)),
                lease_had_ended,
                lost,
                claim_release_pending,
            })
        }
        Request::Reclaim(proto::ReclaimRequest { name, grace_ms }) => {
            let r = d.node.reclaim(&name, Duration::from_millis(grace_ms))?;
            Reply::Reclaim(proto::ReclaimReply {
                device: r.device,
                borrower: r.borrower,
                returned: r.returned,
                elapsed_ms: r.elapsed_ms,
            })
        }
        Request::Remove(proto::RemoveRequest { name }) => {
            let removed = match d.node.remove_device(&name) {
                Ok(r) => r,
                Err(devlend_lending::LendingError::Busy(dev)) => {
                    let to = d
                        .node
                        .local_devices()
                        .into_iter()
                        .find(|x| x.name == dev)
                        .and_then(|x| x.borrower)
                        .map(|b| format!(" to {b}"))
                        .unwrap_or_default();
                    return Err(ErrorBody::new(
                        ErrorCode::InUse,
                        format!(
                            "device {dev} is lent{to}: take it back first (`devlend reclaim \
                             {dev}` here, or `devlend return {dev}` on the borrower)"
                        ),
                    )
                    .into());
                }
                Err(e) => return Err(e.into()),
            };
            for n in &removed {
                // The last references: the device (its worker, its image) goes now.
                d.observe.forget_lent(n);
                lock(&d.images).remove(n);
            }
            if let Some(c) = &d.cluster {
                for n in &removed {
                    if let Err(e) = c.unregister_device(n) {
                        tracing::warn!(
                            "{n} left this node but not yet the registry ({e:#}); its record \
                             goes with this node's registry lease"
                        );
                    }
                }
            }
            tracing::info!("removed {}", removed.join(", "));
            Reply::Remove(proto::RemoveReply { removed })
        }
        Request::Status(_) => {
            let st = d.node.status();
            let vms = lock(&d.vms);
            let servers = lock(&d.servers);
            let mut borrowed: Vec<proto::Device> = st
                .borrowed
                .iter()
                .map(|b| {
                    let mut dev = device_of(b, true);
                    dev.vm = vms.get(&b.name).map(|v| v.att.clone());
                    dev.vfio_user = servers.get(&b.name).map(|s| s.socket().to_path_buf());
                    dev
                })
                .collect();
            // Still in a VM, but no longer held: the lender died or revoked it.
            for (name, v) in vms.iter() {
                if !st.borrowed.iter().any(|b| &b.name == name) {
                    let mut dev = device_of(&v.desc, true);
                    dev.state = proto::DeviceState::LeaseEnded;
                    dev.borrower = None;
                    dev.vm = Some(v.att.clone());
                    dev.vfio_user = servers.get(name).map(|s| s.socket().to_path_buf());
                    borrowed.push(dev);
                }
            }
            Reply::Status(Box::new(proto::StatusReply {
                name: st.name,
                links: st
                    .links
                    .into_iter()
                    .map(|l| proto::LinkStatus {
                        fabric: l.fabric,
                        link: l.link,
                        peer: l.peer,
                    })
                    .collect(),
                lending: st.lending.iter().map(|x| device_of(x, false)).collect(),
                borrowed,
                // Those still in a VM are listed above, as lease_ended.
                lost: d
                    .node
                    .lost()
                    .iter()
                    .filter(|l| !vms.contains_key(&l.device.name))
                    .map(|l| {
                        let mut dev = proto::Device::lost(l);
                        dev.vfio_user = servers
                            .get(&l.device.name)
                            .map(|s| s.socket().to_path_buf());
                        dev
                    })
                    .collect(),
                leases: st.leases,
                link_details: d.observe.link_details(d.insecure_tcp),
                cluster: d.cluster.as_ref().map(|c| c.status()),
            }))
        }
        Request::Check(proto::CheckRequest {
            name,
            bytes,
            offset,
            write,
            cmb,
        }) => {
            let f = d.node.borrowed(&name).ok_or_else(|| {
                ErrorBody::new(
                    ErrorCode::NotHeld,
                    format!("{name} is not borrowed here; run `devlend borrow {name}` first"),
                )
            })?;
            // The driver resets the controller: never under a VMM, never under another check.
            let _checking = CheckGuard::enter(d, &name)?;
            let checked = host::check_device(
                d.observe.meter_borrowed(&name, f),
                offset,
                bytes,
                write,
                cmb,
            )?;
            Reply::Check(proto::CheckReply {
                name,
                bytes,
                wrote: write,
                offset,
                serial: checked.serial,
                summary: checked.summary,
            })
        }
        Request::Lspci(proto::LspciRequest { name }) => Reply::Lspci(proto::LspciReply {
            devices: d.observe.lspci(&d.node, name.as_deref())?,
        }),
        Request::Metrics(_) => Reply::Metrics(Box::new(d.observe.snapshot(&d.node))),
        Request::Shutdown(_) => {
            STOP.store(true, Ordering::Release);
            Reply::Empty(proto::Empty {})
        }
    })
}

/// A `check` running on a device: while it lives, the device is not checked again or served.
struct CheckGuard<'a> {
    d: &'a Daemon,
    name: String,
}

impl<'a> CheckGuard<'a> {
    /// Refuses (`in_use`) a device served over vfio-user, in a VM, or being checked already:
    /// the driver's controller reset would pull it from under whoever uses it.
    fn enter(d: &'a Daemon, name: &str) -> Result<Self, ErrorBody> {
        let in_use = |why: String| {
            ErrorBody::new(
                ErrorCode::InUse,
                format!(
                    "{name} {why}; check would reset the controller under it (and --write overwrite its data): `devlend return {name}` and borrow it again without --vfio-user/--vm to check it"
                ),
            )
        };
        if let Some(v) = lock(&d.vms).get(name) {
            return Err(in_use(format!("is in the VM at {}", v.att.qmp.display())));
        }
        if let Some(server) = lock(&d.servers).get(name) {
            return Err(in_use(format!(
                "is served over vfio-user at {} (a VMM may be using it)",
                server.socket().display()
            )));
        }
        let mut checking = lock(&d.checking);
        if !checking.insert(name.to_string()) {
            return Err(ErrorBody::new(
                ErrorCode::InUse,
                format!("another check is running on {name}; wait for it"),
            ));
        }
        Ok(CheckGuard {
            d,
            name: name.to_string(),
        })
    }
}

impl Drop for CheckGuard<'_> {
    fn drop(&mut self) {
        lock(&self.d.checking).remove(&self.name);
    }
}

/// `borrow NAME --vm QMP`: checks the VM first (nothing is borrowed when it cannot take the
/// device), then borrows, serves over vfio-user and hot-adds; any failure after the borrow
/// stops serving and returns the lease.
/// Borrows `name`: by name through the registry in a cluster, from a linked peer otherwise.
fn borrow_fn(d: &Daemon, name: &str) -> anyhow::Result<Arc<devlend_lending::BorrowedFunction>> {
    Ok(match &d.cluster {
        Some(c) => c.borrow(name)?,
        None => d.node.borrow(name)?,
    })
}

/// Gives `name` back (and, in a cluster, releases the claim and closes an unneeded link).
/// `lease_ended`: the lease is over already (the lender revoked it or is gone), so only the
/// claim is released. Returns why the claim's release is still pending, if it is.
fn give_back_fn(d: &Daemon, name: &str, lease_ended: bool) -> anyhow::Result<Option<String>> {
    if !lease_ended {
        d.node.give_back(name)?;
    }
    match &d.cluster {
        Some(c) => c.returned(name),
        None => Ok(None),
    }
}

fn borrow_into_vm(
    d: &Daemon,
    name: &str,
    socket: Option<PathBuf>,
    qmp_path: &std::path::Path,
    port: Option<&str>,
    id: Option<String>,
) -> anyhow::Result<proto::BorrowReply> {
    let id = match id {
        Some(id) => id,
        None => vm::device_id(name)?,
    };
    anyhow::ensure!(
        !lock(&d.vms).contains_key(name),
        "{name} is already in a VM"
    );
    let (qmp, port) = vm::preflight(qmp_path, port, &id)?;
    let socket = match socket {
        Some(s) => s,
        None => {
            // Absolute: QEMU resolves the path from its own working directory.
            let dir = std::path::absolute(d.state.join("vfio-user"))?;
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.join(format!("{name}.sock"))
        }
    };
    let f = borrow_fn(d, name)?;
    let desc = f.device().clone();
    let owner = desc.owner.clone();
    let lease = f.lease();
    let attached = host::VfioServer::start_hotpluggable(f, &socket).and_then(|server| {
        let att = vm::attach(qmp, qmp_path, &id, &port, &socket)
            .with_context(|| format!("hot-adding {name} to the VM at {}", qmp_path.display()))?;
        Ok((server, att))
    });
    let (server, att) = match attached {
        Ok(x) => x,
        Err(e) => {
            if let Err(back) = give_back_fn(d, name, false) {
                eprintln!("devlend node: returning {name} after a failed hot-add: {back}");
            }
            return Err(e);
        }
    };
    lock(&d.servers).insert(name.to_string(), server);
    let out = proto::BorrowReply {
        name: name.to_string(),
        owner,
        lease,
        vfio_user: Some(socket),
        vm: Some(att.clone()),
        timing: None,
    };
    lock(&d.vms).insert(name.to_string(), InVm { att, desc });
    Ok(out)
}

/// Who takes a device back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// This host: `return`, or the daemon's shutdown.
    Return,
    /// The lender, by a forced take-back: a device the guest did not release in time is cut
    /// off here and left to the lender to revoke, so the lender reports it as revoked.
    Reclaim,
}

/// How a take-back went.
#[derive(Clone, Debug)]
struct TakenBack {
    /// How it left its VM (`None`: it was in none).
    removal: Option<vm::Removal>,
    /// The lease had ended before (the lender revoked it or is gone): nothing was given back.
    lease_had_ended: bool,
    /// It was lost (taken from this host, not in a VM): why. The take-back only forgot it.
    lost: Option<String>,
    /// Given back, but the registry did not take the claim's release yet: why.
    claim_release_pending: Option<String>,
}

/// Marks a device as leaving its VM for as long as it lives.
struct Leaving<'a> {
    d: &'a Daemon,
    name: String,
}

impl<'a> Leaving<'a> {
    fn start(d: &'a Daemon, name: &str) -> anyhow::Result<Self> {
        let fresh = lock(&d.leaving).insert(name.to_string());
        anyhow::ensure!(fresh, "{name} is being taken back already");
        Ok(Self {
            d,
            name: name.to_string(),
        })
    }
}

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        lock(&self.d.leaving).remove(&self.name);
    }
}

/// Gives a borrowed device back. A device in a VM leaves it first: unplug request, at most
/// `grace` for the guest to release it, then (if it did not) surprise removal. The same path
/// serves `return`, the daemon's shutdown and a lender's forced take-back ([`on_reclaim`]).
fn take_back(d: &Daemon, name: &str, grace: Duration, why: Why) -> anyhow::Result<TakenBack> {
    let _leaving = Leaving::start(d, name)?;
    let att = lock(&d.vms).get(name).map(|v| v.att.clone());
    let removal = match &att {
        Some(att) => Some(vm::detach(att, grace).with_context(|| {
            format!("asking the VM at {} to release {name}", att.qmp.display())
        })?),
        None => None,
    };
    lock(&d.vms).remove(name);
    // Stop serving first: after a surprise removal QEMU may still send requests, which the
    // removed function answers with errors.
    lock(&d.servers).remove(name);
    // A device whose lender died or revoked it while it sat in a VM: it has left the VM now,
    // and there is no lease left to give back.
    let lease_had_ended = att.is_some() && d.node.borrowed(name).is_none();
    if why == Why::Reclaim && removal == Some(vm::Removal::Surprise) {
        // Not given back: the lender revokes it when its grace ends.
        return Ok(TakenBack {
            removal,
            lease_had_ended,
            lost: None,
            claim_release_pending: None,
        });
    }
    // Taken from this host already (lender gone, revoked): nothing to give back; the take-back
    // forgets it.
    let forgotten = if d.node.borrowed(name).is_none() {
        d.node.forget_lost(name).map(|l| l.reason)
    } else {
        None
    };
    let claim_release_pending = if lease_had_ended || forgotten.is_none() {
        give_back_fn(d, name, lease_had_ended)?
    } else {
        None
    };
    Ok(TakenBack {
        removal,
        lease_had_ended,
        lost: forgotten.filter(|_| !lease_had_ended),
        claim_release_pending,
    })
}

/// The lender announced a forced take-back of `name` with `grace`: a device in a VM is asked
/// out of it as on `return`, leaving a margin of the grace for the lease to travel back.
/// (Other borrowed devices keep their users until the lender revokes them.)
fn on_reclaim(d: &Daemon, name: &str, grace: Duration) {
    let in_vm = lock(&d.vms).contains_key(name);
    if !in_vm {
        return;
    }
    let margin = (grace / 10).clamp(Duration::from_millis(100), Duration::from_secs(1));
    let guest_grace = grace.saturating_sub(margin);
    eprintln!(
        "devlend node: the lender takes {name} back within {grace:?}: asking its VM to release it"
    );
    match take_back(d, name, guest_grace, Why::Reclaim) {
        Ok(TakenBack {
            removal: Some(how), ..
        }) => eprintln!(
            "devlend node: {name} taken back by its lender; it left its VM: {}",
            how.describe(guest_grace)
        ),
        Ok(_) => eprintln!("devlend node: {name} taken back by its lender"),
        Err(e) => eprintln!("devlend node: {name} taken back by its lender: {e:#}"),
    }
}
