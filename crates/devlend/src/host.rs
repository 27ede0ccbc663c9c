//! What every host-level command shares: opening the fabric, building NVMe devices, running the
//! user-space driver on a function, serving a function over vfio-user.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use devlend_fabric::{AddressSpace, Ntb};
use devlend_lending::DeviceBuilder;
use devlend_pci::PciFunction;

/// Which fabric backend a link uses.
#[derive(Clone, Debug)]
pub enum FabricSpec {
    /// Shared memory: both hosts on this machine rendezvous in a directory.
    Shm(PathBuf),
    /// TCP, this host listens for `peer`.
    TcpListen {
        /// The peer host's name (its certificate must carry it).
        peer: String,
        /// Address to listen on.
        addr: SocketAddr,
    },
    /// TCP, this host connects to `peer`.
    TcpConnect {
        /// The peer host's name.
        peer: String,
        /// Address to connect to.
        addr: SocketAddr,
    },
}

const FABRIC_FORMS: &str = "shm:DIR, tcp-listen:PEER@ADDR:PORT or tcp-connect:PEER@ADDR:PORT";

impl FabricSpec {
    /// Parses `shm:DIR`, `tcp-listen:PEER@ADDR:PORT`, `tcp-connect:PEER@ADDR:PORT`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        anyhow::ensure!(
            !rest.is_empty(),
            "fabric {s:?} needs an argument: {FABRIC_FORMS}"
        );
        let tcp = |rest: &str| -> anyhow::Result<(String, SocketAddr)> {
            let (peer, addr) = rest.split_once('@').ok_or_else(|| {
                anyhow::anyhow!("fabric {s:?}: name the peer host, as in {FABRIC_FORMS}")
            })?;
            let addr = addr
                .parse()
                .with_context(|| format!("fabric {s:?}: {addr:?} is not ADDR:PORT"))?;
            anyhow::ensure!(!peer.is_empty(), "fabric {s:?}: empty peer name");
            Ok((peer.to_string(), addr))
        };
        Ok(match kind {
            "shm" => FabricSpec::Shm(PathBuf::from(rest)),
            "tcp-listen" => {
                let (peer, addr) = tcp(rest)?;
                FabricSpec::TcpListen { peer, addr }
            }
            "tcp-connect" => {
                let (peer, addr) = tcp(rest)?;
                FabricSpec::TcpConnect { peer, addr }
            }
            other => anyhow::bail!("unknown fabric {other:?}: use {FABRIC_FORMS}"),
        })
    }
}

impl fmt::Display for FabricSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FabricSpec::Shm(d) => write!(f, "shm:{}", d.display()),
            FabricSpec::TcpListen { peer, addr } => write!(f, "tcp-listen:{peer}@{addr}"),
            FabricSpec::TcpConnect { peer, addr } => write!(f, "tcp-connect:{peer}@{addr}"),
        }
    }
}

/// How a host's tcp links authenticate, and where their threads run.
#[derive(Clone, Debug, Default)]
pub struct TcpOptions {
    /// This host's name (its certificate's name).
    pub host: String,
    /// Directory from `devlend keygen` (CA certificate, this host's certificate and key).
    pub keys: Option<PathBuf>,
    /// Plain TCP without authentication (both sides must ask for it).
    pub insecure: bool,
    /// CPUs to pin each link's threads to (`--tcp-cpus`; none: the scheduler places them).
    pub cpus: devlend_fabric_tcp::ThreadCpus,
}

/// Parses `--tcp-cpus WRITER,READER`: the CPU of each tcp link's writer thread, and of its
/// reading and serving threads.
pub fn parse_tcp_cpus(s: &str) -> anyhow::Result<devlend_fabric_tcp::ThreadCpus> {
    let bad =
        || anyhow::anyhow!("--tcp-cpus wants WRITER,READER: two CPU numbers, e.g. 0,1 (got {s:?})");
    let (w, r) = s.split_once(',').ok_or_else(bad)?;
    let cpu = |v: &str| v.trim().parse::<usize>().map_err(|_| bad());
    Ok(devlend_fabric_tcp::ThreadCpus {
        writer: Some(cpu(w)?),
        reader: Some(cpu(r)?),
    })
}

impl TcpOptions {
    /// The credentials of a link to `peer` (TLS from the keys directory, or insecure).
    pub fn credentials(&self, peer: &str) -> anyhow::Result<devlend_fabric_tcp::Credentials> {
        if self.insecure {
            return Ok(devlend_fabric_tcp::Credentials::Insecure);
        }
        let dir = self.keys.as_ref().ok_or_else(|| {
            anyhow::anyhow!("a tcp link needs --keys DIR (create it with `devlend keygen`), or --insecure-tcp on both hosts")
        })?;
        let creds =
            devlend_fabric_tcp::TlsCredentials::load(dir, &self.host, peer).with_context(|| {
                format!(
                    "loading TLS credentials for {} from {}",
                    self.host,
                    dir.display()
                )
            })?;
        Ok(devlend_fabric_tcp::Credentials::Tls(Arc::new(creds)))
    }
}

/// Opens this host's ends of its links, all onto one address space; each comes up when its
/// peer arrives.
pub fn open_fabrics(specs: &[FabricSpec], tcp: &TcpOptions) -> anyhow::Result<Vec<Arc<dyn Ntb>>> {
    let asp = Arc::new(AddressSpace::new());
    specs
        .iter()
        .map(|s| open_fabric(s, asp.clone(), tcp))
        .collect()
}

/// The tcp link configuration for these options: the spin budget is
/// [`devlend_fabric_tcp::TCP_SPIN`] unless the environment sets one.
pub fn tcp_config(tcp: &TcpOptions) -> devlend_fabric_tcp::TcpConfig {
    devlend_fabric_tcp::TcpConfig {
        link: link_config(devlend_fabric_tcp::TCP_SPIN),
        cpus: tcp.cpus,
        ..Default::default()
    }
}

/// Inbound memory windows of each link a node opens: one for the management channel, three
/// per NVMe device lent over the link (two BARs and the doorbell page), one per device
/// borrowed over it (its DMA pool). With 32, the link's 48 interrupt doorbell bits are the
/// limit, which `add nvme --queues` moves (README, "Known limits").
pub const LINK_WINDOWS: usize = 32;

/// A link's geometry, with the spin budget of its waits: `spin` unless the environment sets
/// one for tuning (`DEVLEND_FABRIC_SPIN_US`, docs/MEASUREMENTS.md).
fn link_config(spin: std::time::Duration) -> devlend_fabric::LinkConfig {
    devlend_fabric::LinkConfig {
        mw_count: LINK_WINDOWS,
        spin: std::env::var("DEVLEND_FABRIC_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(spin, std::time::Duration::from_micros),
        ..Default::default()
    }
}

/// Opens one end of a link onto `asp`; it comes up when the peer arrives.
pub fn open_fabric(
    spec: &FabricSpec,
    asp: Arc<AddressSpace>,
    tcp: &TcpOptions,
) -> anyhow::Result<Arc<dyn Ntb>> {
    Ok(match spec {
        FabricSpec::Shm(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            let cfg = link_config(devlend_fabric::LinkConfig::default().spin);
            devlend_fabric::shm::ShmNtb::open(dir, asp, cfg)
                .with_context(|| format!("opening the shm fabric in {}", dir.display()))?
        }
        FabricSpec::TcpListen { peer, addr } => Arc::new(
            devlend_fabric_tcp::TcpNtb::listen(*addr, asp, tcp_config(tcp), tcp.credentials(peer)?)
                .with_context(|| format!("listening on {addr}"))?,
        ),
        FabricSpec::TcpConnect { peer, addr } => Arc::new(
            devlend_fabric_tcp::TcpNtb::connect(
                *addr,
                asp,
                tcp_config(tcp),
                tcp.credentials(peer)?,
            )
            .with_context(|| format!("connecting to {addr}"))?,
        ),
    })
}

/// Takes an exclusive `flock` on `path` (created if needed) for as long as the file lives.
pub fn lock_exclusive(path: &Path) -> anyhow::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        .map_err(std::io::Error::from)?;
    Ok(f)
}

/// How to build an NVMe device.
#[derive(Clone, Debug)]
pub struct NvmeOptions {
    /// Backing raw image.
    pub image: PathBuf,
    /// Create it with this size if missing.
    pub size: Option<u64>,
    /// Serial.
    pub serial: Option<String>,
    /// Model.
    pub model: Option<String>,
    /// I/O queue pairs ([`MAX_QUEUES`] at most; default 16).
    pub queues: Option<u16>,
    /// A Controller Memory Buffer of this many bytes (none by default).
    pub cmb: Option<u64>,
}

/// Most I/O queue pairs `add nvme --queues` allows: the vectors (one more) must fit in the
/// 48 interrupt doorbell bits of a link.
pub const MAX_QUEUES: u16 = 47;

impl NvmeOptions {
    /// One line for listings.
    pub fn detail(&self) -> anyhow::Result<String> {
        let size = match std::fs::metadata(&self.image) {
            Ok(m) => m.len(),
            Err(_) => self.size.ok_or_else(|| {
                anyhow::anyhow!(
                    "{} does not exist; give --size to create it",
                    self.image.display()
                )
            })?,
        };
        let cmb = match self.cmb {
            Some(b) if b >= 1 << 20 => format!(", CMB {} MiB", b >> 20),
            Some(b) => format!(", CMB {} KiB", b >> 10),
            None => String::new(),
        };
        Ok(format!(
            "{} ({} MiB{cmb})",
            self.image.display(),
            size >> 20
        ))
    }

    /// The device model's configuration.
    pub(crate) fn config(&self) -> devlend_nvme::NvmeConfig {
        let mut cfg = devlend_nvme::NvmeConfig::new(&self.image);
        cfg.create_size = self.size;
        if let Some(s) = &self.serial {
            cfg.serial = s.clone();
        }
        if let Some(m) = &self.model {
            cfg.model = m.clone();
        }
        if let Some(q) = self.queues {
            cfg.max_io_queue_pairs = q;
        }
        cfg.cmb_bytes = self.cmb;
        cfg
    }
}

/// The serial number of an NVMe device added without `--serial`: `DL` and 16 hex digits of
/// an FNV-1a hash of the node's and the device's names, so that two devices (of one node or
/// of two) differ and a guest given both accepts both, and a device keeps its serial across
/// restarts. At most 20 characters, as NVMe allows.
pub fn default_serial(node: &str, device: &str) -> String {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let hash = node
        .bytes()
        .chain([0u8])
        .chain(device.bytes())
        .fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    format!("DL{hash:016X}")
}

/// The block size of the NVMe model's namespace: an image's size is a multiple of it.
pub const IMAGE_BLOCK_BYTES: u64 = 512;

/// An image held by one device: an exclusive `flock` on it, so no second device (in this node
/// process or another) opens it while this one lives. Dropped on a failed add, the image it
/// created is removed again.
pub struct ImageLock {
    file: std::fs::File,
    /// The image, when this lock created it (removed if the add fails).
    created: Option<PathBuf>,
}

impl ImageLock {
    /// Checks `opts` and takes the image: an existing image must have the size `--size` asks
    /// for (if any); a missing one is created with it. Refuses (`invalid`) a size that is not
    /// a positive multiple of [`IMAGE_BLOCK_BYTES`], and (`in_use`) an image another device
    /// holds.
    pub fn take(opts: &NvmeOptions) -> anyhow::Result<ImageLock> {
        use crate::proto::{ErrorBody, ErrorCode};
        let path = &opts.image;
        if let Some(b) = opts.cmb {
            if devlend_nvme::cmb::check_size(b).is_err() {
                return Err(ErrorBody::new(
                    ErrorCode::Invalid,
                    format!(
                        "--cmb {b}: a Controller Memory Buffer is a power of two from 64K to 1G \
                         (e.g. --cmb 1M)"
                    ),
                )
                .into());
            }
        }
        if let Some(q) = opts.queues.filter(|q| !(1..=MAX_QUEUES).contains(q)) {
            return Err(ErrorBody::new(
                ErrorCode::Invalid,
                format!("--queues {q}: an NVMe device has 1 to {MAX_QUEUES} I/O queue pairs"),
            )
            .into());
        }
        if let Some(size) = opts.size {
            if size == 0 || size % IMAGE_BLOCK_BYTES != 0 {
                return Err(ErrorBody::new(
                    ErrorCode::Invalid,
                    format!(
                        "--size {size} is not a positive multiple of the {IMAGE_BLOCK_BYTES}-byte block size (e.g. 64M)"
                    ),
                )
                .into());
            }
        }
        let (file, created) = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(f) => {
                let len = f
                    .metadata()
                    .with_context(|| format!("reading the size of {}", path.display()))?
                    .len();
                if let Some(size) = opts.size.filter(|s| *s != len) {
                    return Err(ErrorBody::new(
                        ErrorCode::Invalid,
                        format!(
                            "{} exists with {len} bytes, not the {size} --size asks for (devlend never resizes an image): leave out --size to use it as it is, or resize the file yourself",
                            path.display()
                        ),
                    )
                    .into());
                }
                (f, None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let size = opts.size.ok_or_else(|| {
                    ErrorBody::new(
                        ErrorCode::Invalid,
                        format!(
                            "{} does not exist; give --size to create it",
                            path.display()
                        ),
                    )
                })?;
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .with_context(|| format!("creating {}", path.display()))?;
                if let Err(e) = f.set_len(size) {
                    let _ = std::fs::remove_file(path);
                    return Err(e).with_context(|| format!("sizing {}", path.display()));
                }
                (f, Some(path.clone()))
            }
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        let lock = ImageLock { file, created };
        match rustix::fs::flock(&lock.file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            Ok(()) => Ok(lock),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(ErrorBody::new(
                ErrorCode::InUse,
                format!(
                    "{} is in use: another device (of this node or another devlend process) has it; one image backs one device at a time",
                    path.display()
                ),
            )
            .into()),
            Err(e) => Err(anyhow::Error::from(std::io::Error::from(e)))
                .with_context(|| format!("locking {}", path.display())),
        }
    }

    /// The add succeeded: the image stays whatever happens to the lock.
    pub fn keep(&mut self) {
        self.created = None;
    }
}

impl Drop for ImageLock {
    fn drop(&mut self) {
        if let Some(path) = self.created.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A builder the lender (or a local binding) calls with the device's DMA port and interrupt sink.
pub fn nvme_builder(opts: NvmeOptions) -> DeviceBuilder {
    Box::new(move |dma, irq| {
        let dev =
            devlend_nvme::NvmeDevice::new(opts.config(), dma, irq).map_err(|e| e.to_string())?;
        Ok(dev as Arc<dyn devlend_pci::PciDevice>)
    })
}

/// TotalVFs of the NVMe model's physical function when it is added with `--vfs`.
pub const SRIOV_TOTAL_VFS: u16 = 8;

/// An SR-IOV physical function the lender manages: its function bound in-process and our
/// driver on its primary controller (which enabled the VFs and brought their secondary
/// controllers online). Kept alive by the lender while the VFs are offered.
pub struct ManagedPf {
    _driver: devlend_nvme_driver::Controller,
    _device: Arc<devlend_nvme::NvmeDevice>,
}

/// One virtual function to offer: its name, listing detail and builder.
pub type VfOffer = (String, String, DeviceBuilder);

/// Parses `--vf-namespaces`.
pub fn parse_vf_namespaces(s: &str) -> anyhow::Result<devlend_nvme::VfNamespaces> {
    match s {
        "shared" => Ok(devlend_nvme::VfNamespaces::Shared),
        "private" => Ok(devlend_nvme::VfNamespaces::Private),
        other => anyhow::bail!("--vf-namespaces must be `shared` or `private`, not {other:?}"),
    }
}

/// Offset of the function's SR-IOV extended capability, walking the extended list.
fn sriov_capability(f: &dyn PciFunction) -> anyhow::Result<u16> {
    use devlend_pci::config::sriov;
    let mut at = devlend_pci::config::EXTENDED_CONFIG_START;
    for _ in 0..64 {
        let header = f.config_read(at, devlend_pci::AccessSize::Dword)?;
        if header & 0xffff == u32::from(sriov::EXT_CAP_ID) {
            return Ok(at);
        }
        let next = (header >> 20) as u16;
        anyhow::ensure!(next >= at + 4, "the function has no SR-IOV capability");
        at = next;
    }
    anyhow::bail!("the function has no SR-IOV capability")
}

/// Builds an NVMe physical function with SR-IOV on the lender and makes `vfs` of its virtual
/// functions ready to lend: NumVFs and VF Enable / VF MSE written in its SR-IOV capability,
/// then, through our driver on the primary controller, each secondary controller given the
/// most queue and interrupt resources a secondary may have and brought online. Each VF is
/// offered as `NAME-vfK`: its own function (config space, BARs, MSI-X, FLR) with its own IOMMU
/// domain and worker, presented with the model's vendor and VF device IDs.
pub fn nvme_sriov(
    opts: &NvmeOptions,
    name: &str,
    vfs: u16,
    namespaces: devlend_nvme::VfNamespaces,
) -> anyhow::Result<(Arc<ManagedPf>, Vec<VfOffer>)> {
    use devlend_pci::config::sriov;
    anyhow::ensure!(
        (1..=SRIOV_TOTAL_VFS).contains(&vfs),
        "--vfs must be 1 to {SRIOV_TOTAL_VFS} (the device's TotalVFs), not {vfs}"
    );
    let mut cfg = opts.config();
    cfg.sriov = Some(devlend_nvme::SriovConfig {
        total_vfs: SRIOV_TOTAL_VFS,
        namespaces,
    });
    let per_secondary = cfg.max_io_queue_pairs + 1;
    let slot: Arc<Mutex<Option<Arc<devlend_nvme::NvmeDevice>>>> = Arc::new(Mutex::new(None));
    let keep = slot.clone();
    let f = devlend_pci::local::LocalFunction::new(16 << 20, move |dma, irq| {
        let d = devlend_nvme::NvmeDevice::new(cfg, dma, irq)?;
        *devlend_sync::lock(&keep) = Some(d.clone());
        Ok::<_, devlend_nvme::NvmeError>(d as Arc<dyn devlend_pci::PciDevice>)
    })?;
    let device = devlend_sync::lock(&slot)
        .take()
        .ok_or_else(|| anyhow::anyhow!("the physical function was not built"))?;
    let f: Arc<dyn PciFunction> = Arc::new(f);
    let at = sriov_capability(f.as_ref())?;
    let word = devlend_pci::AccessSize::Word;
    f.config_write(at + sriov::NUM_VFS, word, u32::from(vfs))?;
    f.config_write(
        at + sriov::CONTROL,
        word,
        u32::from(sriov::CTRL_VF_ENABLE | sriov::CTRL_VF_MSE),
    )?;
    let num = f.config_read(at + sriov::NUM_VFS, word)?;
    anyhow::ensure!(num == u32::from(vfs), "the device kept NumVFs at {num}");
    let driver = devlend_nvme_driver::Controller::new(f.clone())
        .context("initialising the primary controller")?;
    for vf in 1..=vfs {
        for resource in [0u8, 1] {
            driver
                .virtualization_management(0x8, resource, vf, per_secondary)
                .with_context(|| format!("assigning resources to VF {vf}"))?;
        }
        driver
            .virtualization_management(0x9, 0, vf, 0)
            .with_context(|| format!("bringing VF {vf}'s controller online"))?;
    }
    let image = opts.detail()?;
    let sharing = match namespaces {
        devlend_nvme::VfNamespaces::Shared => "shared namespace".to_string(),
        devlend_nvme::VfNamespaces::Private => {
            format!("private namespace, slice K of {}", SRIOV_TOTAL_VFS + 1)
        }
    };
    let mut offers = Vec::new();
    for vf in 1..=vfs {
        let pf = device.clone();
        let build: DeviceBuilder = Box::new(move |dma, irq| {
            let d = pf
                .new_virtual_function(vf, dma, irq)
                .map_err(|e| e.to_string())?;
            let presented = devlend_pci::PresentedVf::new(
                d,
                devlend_nvme::PCI_VENDOR_ID,
                devlend_nvme::PCI_VF_DEVICE_ID,
            )
            .map_err(|e| e.to_string())?;
            Ok(presented as Arc<dyn devlend_pci::PciDevice>)
        });
        offers.push((
            format!("{name}-vf{vf}"),
            format!(
                "VF {vf} of {name}: {image}, {}",
                sharing.replace('K', &vf.to_string())
            ),
            build,
        ));
    }
    Ok((
        Arc::new(ManagedPf {
            _driver: driver,
            _device: device,
        }),
        offers,
    ))
}

/// A local NVMe function (the baseline): the model bound in-process.
pub fn local_nvme(opts: NvmeOptions) -> anyhow::Result<Arc<dyn PciFunction>> {
    let f = devlend_pci::local::LocalFunction::new(64 << 20, |dma, irq| {
        devlend_nvme::NvmeDevice::new(opts.config(), dma, irq)
            .map(|d| d as Arc<dyn devlend_pci::PciDevice>)
    })?;
    Ok(Arc::new(f))
}

/// Runs the unmodified user-space driver on `f`. Read-only unless `write`: then it writes a
/// pattern over `bytes` at `offset` (destroying what was there), flushes, reads back and
/// verifies.
pub fn check_device(
    f: Arc<dyn PciFunction>,
    offset: u64,
    bytes: u64,
    write: bool,
    cmb: bool,
) -> anyhow::Result<Checked> {
    let what = f.describe();
    let config = devlend_nvme_driver::DriverConfig {
        cmb_submission_queues: cmb,
        cmb_bulk: cmb,
        ..Default::default()
    };
    let drv = devlend_nvme_driver::Controller::with_config(f, config)
        .context("initialising the NVMe driver")?;
    let what = if cmb {
        let (n, of) = (drv.cmb_queue_count(), drv.io_queue_count());
        if n == 0 {
            return Err(crate::proto::ErrorBody::new(
                crate::proto::ErrorCode::Invalid,
                format!(
                    "{what} offers no Controller Memory Buffer for submission queues; \
                     its lender adds one with `devlend add nvme --cmb SIZE`"
                ),
            )
            .into());
        }
        format!("{what} (submission queues in the device's CMB: {n} of {of})")
    } else {
        what
    };
    let serial = drv.identity().serial.clone();
    let len = usize::try_from(bytes)?;
    let geometry = format!(
        "{} blocks of {} bytes",
        drv.capacity_bytes() / u64::from(drv.lba_bytes()),
        drv.lba_bytes()
    );
    if !write {
        let mut back = vec![0u8; len];
        drv.read_at(offset, &mut back).context("reading")?;
        drv.shutdown().context("shutting the controller down")?;
        return Ok(Checked {
            summary: format!(
                "{what}: read {bytes} bytes at offset {offset}, nothing written ({geometry}, serial {serial}; --write overwrites them with a test pattern and verifies it)"
            ),
            serial,
        });
    }
    let pattern: Vec<u8> = (0..len)
        .map(|i| (i as u64).wrapping_mul(2654435761).wrapping_add(offset) as u8 ^ (i >> 12) as u8)
        .collect();
    drv.write_at(offset, &pattern).context("writing")?;
    drv.flush().context("flushing")?;
    let mut back = vec![0u8; len];
    drv.read_at(offset, &mut back).context("reading back")?;
    anyhow::ensure!(back == pattern, "read-back differs from what was written");
    let pushed = if cmb {
        let (writes, lists) = drv.cmb_pushed();
        format!("; {writes} writes' data and {lists} PRP lists pushed into the CMB")
    } else {
        String::new()
    };
    drv.shutdown().context("shutting the controller down")?;
    Ok(Checked {
        summary: format!(
            "{what}: wrote {bytes} bytes at offset {offset}, flushed, read back and verified ({geometry}, serial {serial}{pushed})"
        ),
        serial,
    })
}

/// What [`check_device`] found.
pub struct Checked {
    /// One line for people.
    pub summary: String,
    /// The controller's serial number (Identify Controller).
    pub serial: String,
}

/// Waits up to 200 ms for a connection on the non-blocking `listener`: the pause of an idle
/// accept loop between two looks at its stop flag.
pub fn wait_for_connection(listener: &impl std::os::fd::AsFd) {
    let wait = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 200_000_000,
    };
    let mut fds = [rustix::event::PollFd::new(
        listener,
        rustix::event::PollFlags::IN,
    )];
    let _ = rustix::event::poll(&mut fds, Some(&wait));
}

/// Refuses (`in_use`) a path something accepts connections on: a vfio-user socket must not
/// take it over.
pub fn refuse_live_socket(path: &Path) -> anyhow::Result<()> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        let e = devlend_vfio_user::ServerError::SocketInUse {
            path: path.display().to_string(),
        };
        return Err(
            crate::proto::ErrorBody::new(crate::proto::ErrorCode::InUse, e.to_string()).into(),
        );
    }
    Ok(())
}

/// A vfio-user server serving one function on a socket, in its own thread, one client at a
/// time, until dropped.
pub struct VfioServer {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    socket: PathBuf,
}

impl VfioServer {
    /// Starts serving `f` on `socket` (a stale socket file is replaced; a live one, or any
    /// other file, is refused).
    pub fn start(f: Arc<dyn PciFunction>, socket: &Path) -> anyhow::Result<Self> {
        Self::start_server(devlend_vfio_user::Server::new(f)?, socket)
    }

    /// As [`VfioServer::start`], for a device hot-added to a running VM: its MSI-X is shown as
    /// one MSI vector, because QEMU 11.1 aborts when it finalizes a hot-unplugged
    /// `vfio-user-pci` device with MSI-X (`devlend_vfio_user::Server::msi_only`).
    pub fn start_hotpluggable(f: Arc<dyn PciFunction>, socket: &Path) -> anyhow::Result<Self> {
        Self::start_server(devlend_vfio_user::Server::new(f)?.msi_only(), socket)
    }

    fn start_server(server: devlend_vfio_user::Server, socket: &Path) -> anyhow::Result<Self> {
        use std::sync::atomic::Ordering;
        let listener = match devlend_vfio_user::Server::bind(socket) {
            Ok(l) => l,
            Err(e @ devlend_vfio_user::ServerError::SocketInUse { .. }) => {
                return Err(crate::proto::ErrorBody::new(
                    crate::proto::ErrorCode::InUse,
                    e.to_string(),
                )
                .into())
            }
            Err(e) => {
                return Err(anyhow::Error::from(e)
                    .context(format!("binding the vfio-user socket {}", socket.display())))
            }
        };
        listener.set_nonblocking(true)?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("devlend-vfio-user".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if stream.set_nonblocking(false).is_ok() {
                                let end = server.serve_connection(&stream);
                                tracing::info!("vfio-user client gone: {end:?}");
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            wait_for_connection(&listener);
                        }
                        Err(e) => {
                            tracing::warn!("vfio-user accept failed: {e}");
                            return;
                        }
                    }
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
            socket: socket.to_path_buf(),
        })
    }
}

impl VfioServer {
    /// The socket it serves on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for VfioServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        let _ = std::fs::remove_file(&self.socket);
        // A connected client keeps the thread until it disconnects; the function is removed
        // by then, so its accesses fail and QEMU sees the device go away.
        if let Some(t) = self.thread.take() {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_serials_differ_per_node_and_device_and_fit_nvme() {
        let a = default_serial("lender", "nvme0");
        assert_eq!(a, default_serial("lender", "nvme0"));
        assert_ne!(a, default_serial("lender", "nvme1"));
        assert_ne!(a, default_serial("other", "nvme0"));
        assert_ne!(default_serial("ab", "c"), default_serial("a", "bc"));
        assert!(a.len() <= 20 && a.is_ascii(), "{a}");
    }

    #[test]
    fn tcp_cpus_are_two_cpu_numbers() {
        let c = parse_tcp_cpus("0,1").unwrap();
        assert_eq!((c.writer, c.reader), (Some(0), Some(1)));
        assert_eq!(parse_tcp_cpus(" 3 , 3").unwrap().writer, Some(3));
        for bad in ["", "0", "0,", ",1", "a,b", "-1,0", "0;1"] {
            let e = parse_tcp_cpus(bad).unwrap_err().to_string();
            assert!(e.contains("WRITER,READER"), "{bad:?}: {e}");
        }
    }
}
