//! The management protocol: every request the verbs send to their node and every reply it
//! gives, as typed structs both sides share (the CLI and the daemon are one binary, so a field
//! renamed on one side is renamed on the other, and a missing one fails to compile).
//!
//! One JSON object per line each way over the node's UNIX socket. A request is
//! `{"v":1,"verb":"list",...}`; a reply is `{"v":1,"ok":true,"result":{...}}` or
//! `{"v":1,"ok":false,"error":{"code":"not_found","message":"..."}}`. [`VERSION`] changes
//! whenever a message changes shape; a node refuses a request of another version (and a
//! client a reply of another version) with [`ErrorCode::VersionMismatch`], never a guess.
//!
//! A crate of its own (the `devlend` binary's only one) so that its fuzz target
//! (`crates/proto/fuzz`) can reach [`parse_request`], the parser of every line a node reads
//! from its management socket.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use devlend_lending::LeaseStatus;
pub use devlend_metrics::Snapshot as MetricsSnapshot;

/// One link as `status` describes it beyond the lending layer's view.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkDetail {
    /// The fabric spec.
    pub spec: String,
    /// The peer's address (tcp) or rendezvous directory (shm).
    pub address: String,
    /// The name the peer's certificate must carry (tcp with TLS), or why there is none.
    pub tls_identity: String,
}

/// A device's config space as `lspci` decodes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PciSnapshot {
    /// Device name.
    pub name: String,
    /// "local" (owned, not lent), "lent", or "borrowed".
    pub role: String,
    /// Owning host.
    pub owner: String,
    /// Holder, if lent.
    pub borrower: Option<String>,
    /// BAR sizes by slot.
    pub bar_sizes: [Option<u64>; 6],
    /// Config space (256 bytes, or 4096 when it has extended capabilities).
    pub config: Vec<u8>,
}

/// Version of the management protocol this build speaks.
pub const VERSION: u32 = 1;

/// Longest request line a node reads (bytes, newline included); longer is refused.
pub const MAX_LINE: usize = 64 * 1024;

/// Stable error codes (`--json` prints them; README, "Machine output", lists them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The command line is wrong (unknown flag, bad value).
    Usage,
    /// An argument is well-formed but not acceptable (bad size, unknown kind, bad name).
    Invalid,
    /// The request line is not a request (not JSON, unknown verb, wrong fields).
    BadRequest,
    /// Client and node speak different protocol versions.
    VersionMismatch,
    /// The request line is longer than [`MAX_LINE`].
    LineTooLong,
    /// The node serves as many connections as it allows; try again.
    Busy,
    /// The connection sent no complete request in time.
    IdleTimeout,
    /// No node answers on the socket (not running, wrong `--state`).
    Unreachable,
    /// The node or the awaited condition did not answer in time.
    Timeout,
    /// The node's reply was not a reply.
    BadReply,
    /// No device by that name.
    NotFound,
    /// A device by that name exists already.
    AlreadyExists,
    /// The device is lent, being lent, or otherwise in use.
    InUse,
    /// This host has not borrowed that device (or lends it to no one).
    NotHeld,
    /// The link to the peer is down or the peer did not answer.
    LinkDown,
    /// The peer refused.
    Refused,
    /// Anything else that failed.
    Failed,
}

/// An error with its stable code: what a node answers, and what the verbs report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Stable code.
    pub code: ErrorCode,
    /// For a person.
    pub message: String,
}

impl ErrorBody {
    /// An error with `code`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The code of an error: the first [`ErrorBody`] or lending error in its chain,
    /// [`ErrorCode::Failed`] otherwise.
    pub fn code_of(e: &anyhow::Error) -> ErrorCode {
        use devlend_lending::LendingError as L;
        for cause in e.chain() {
            if let Some(b) = cause.downcast_ref::<ErrorBody>() {
                return b.code;
            }
            if let Some(l) = cause.downcast_ref::<L>() {
                return match l {
                    L::NoSuchDevice(_) => ErrorCode::NotFound,
                    L::DuplicateName(_) => ErrorCode::AlreadyExists,
                    L::AlreadyLent { .. }
                    | L::Busy(_)
                    | L::PhysicalFunction { .. }
                    | L::VirtualFunction { .. } => ErrorCode::InUse,
                    L::NotBorrowed(_) | L::NotLent(_) => ErrorCode::NotHeld,
                    L::LinkDown | L::Timeout => ErrorCode::LinkDown,
                    L::Refused(_) => ErrorCode::Refused,
                    _ => ErrorCode::Failed,
                };
            }
        }
        ErrorCode::Failed
    }

    /// The error as a body: its own code (see [`ErrorBody::code_of`]), its whole chain as
    /// the message.
    pub fn from_anyhow(e: &anyhow::Error) -> Self {
        Self::new(Self::code_of(e), format!("{e:#}"))
    }
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ErrorBody {}

/// What `--json` prints on stderr for a failed verb.
#[derive(Debug, Serialize, Deserialize)]
pub struct ErrorReport {
    /// The error.
    pub error: ErrorBody,
}

/// A request line: the version, then the request.
#[derive(Debug, Serialize, Deserialize)]
pub struct RequestLine {
    /// Protocol version ([`VERSION`]).
    pub v: u32,
    /// The request.
    #[serde(flatten)]
    pub req: Request,
}

/// Just the version of a line (read first, so another version is refused as such).
#[derive(Debug, Deserialize)]
pub struct VersionOnly {
    /// The version, if the line has one.
    pub v: Option<u64>,
}

/// A reply line.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReplyLine<T> {
    /// Protocol version ([`VERSION`]).
    pub v: u32,
    /// Whether the request succeeded.
    pub ok: bool,
    /// The verb's reply, when it succeeded.
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    pub result: Option<T>,
    /// What went wrong, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

fn none<T>() -> Option<T> {
    None
}

/// A request to a node. The same shape is kept in `devices.json` (the `add` requests a node
/// replays when it restarts), so fields are only ever added with defaults.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case")]
pub enum Request {
    /// Add a device this host lends.
    Add(AddRequest),
    /// Lend a real PCI function through VFIO.
    AddVfio(AddVfioRequest),
    /// Devices here and on the peer.
    List(Empty),
    /// Borrow the peer's device.
    Borrow(BorrowRequest),
    /// Give a borrowed device back.
    Return(ReturnRequest),
    /// Forced take-back of a device this host lends.
    Reclaim(ReclaimRequest),
    /// Stop lending a device: it leaves this host (and `devices.json`); its image stays.
    Remove(RemoveRequest),
    /// Node status.
    Status(Empty),
    /// Run the user-space NVMe driver on a borrowed device.
    Check(CheckRequest),
    /// Config-space snapshots of the devices this host sees.
    Lspci(LspciRequest),
    /// Every counter now (for `devlend top`).
    Metrics(Empty),
    /// Stop the daemon.
    Shutdown(Empty),
}

/// A request with no fields.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// A request and the reply it gets: `ctl::call` returns `Self::Reply`.
pub trait Verb: Into<Request> {
    /// What the node answers.
    type Reply: serde::de::DeserializeOwned + Serialize;
}

macro_rules! verb {
    ($req:ty, $variant:ident, $reply:ty) => {
        impl From<$req> for Request {
            fn from(r: $req) -> Request {
                Request::$variant(r)
            }
        }
        impl Verb for $req {
            type Reply = $reply;
        }
    };
}

/// `list` (no fields).
#[derive(Clone, Debug, Default)]
pub struct ListRequest;
/// `status` (no fields).
#[derive(Clone, Debug, Default)]
pub struct StatusRequest;
/// `metrics` (no fields).
#[derive(Clone, Debug, Default)]
pub struct MetricsRequest;
/// `shutdown` (no fields).
#[derive(Clone, Debug, Default)]
pub struct ShutdownRequest;

macro_rules! empty_verb {
    ($req:ty, $variant:ident, $reply:ty) => {
        impl From<$req> for Request {
            fn from(_: $req) -> Request {
                Request::$variant(Empty {})
            }
        }
        impl Verb for $req {
            type Reply = $reply;
        }
    };
}

verb!(AddRequest, Add, AddReply);
verb!(AddVfioRequest, AddVfio, AddReply);
verb!(BorrowRequest, Borrow, BorrowReply);
verb!(ReturnRequest, Return, ReturnReply);
verb!(ReclaimRequest, Reclaim, ReclaimReply);
verb!(RemoveRequest, Remove, RemoveReply);
verb!(CheckRequest, Check, CheckReply);
verb!(LspciRequest, Lspci, LspciReply);
empty_verb!(ListRequest, List, ListReply);
empty_verb!(StatusRequest, Status, StatusReply);
empty_verb!(MetricsRequest, Metrics, MetricsSnapshot);
empty_verb!(ShutdownRequest, Shutdown, Empty);

impl Request {
    /// The verb's name (`add`, `list`, ...).
    pub fn verb(&self) -> &'static str {
        match self {
            Request::Add(_) => "add",
            Request::AddVfio(_) => "add_vfio",
            Request::List(_) => "list",
            Request::Borrow(_) => "borrow",
            Request::Return(_) => "return",
            Request::Reclaim(_) => "reclaim",
            Request::Remove(_) => "remove",
            Request::Status(_) => "status",
            Request::Check(_) => "check",
            Request::Lspci(_) => "lspci",
            Request::Metrics(_) => "metrics",
            Request::Shutdown(_) => "shutdown",
        }
    }
}

/// Add a device this host lends.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddRequest {
    /// Kind ("nvme").
    pub kind: String,
    /// Name.
    pub name: String,
    /// Backing image.
    pub image: PathBuf,
    /// Create the image with this size if missing.
    pub size: Option<u64>,
    /// Serial number.
    pub serial: Option<String>,
    /// Model string.
    pub model: Option<String>,
    /// I/O queue pairs (MSI-X vectors: one more).
    #[serde(default)]
    pub queues: Option<u16>,
    /// Lend this many SR-IOV virtual functions (each its own device) instead of the device.
    #[serde(default)]
    pub vfs: Option<u16>,
    /// With `vfs`: `shared` (one namespace for all) or `private` (one per VF).
    #[serde(default)]
    pub vf_namespaces: Option<String>,
    /// A Controller Memory Buffer of this many bytes in BAR 2 (a power of two, 64 KiB to
    /// 1 GiB); none when absent.
    #[serde(default)]
    pub cmb: Option<u64>,
}

/// Lend a real PCI function through VFIO.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddVfioRequest {
    /// Name.
    pub name: String,
    /// PCI address (DDDD:BB:DD.F).
    pub bdf: String,
    /// Move it to vfio-pci from the driver it has (given back when removed).
    pub bind: bool,
}

/// Borrow a device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BorrowRequest {
    /// Device name.
    pub name: String,
    /// Also serve it to a VMM on this vfio-user socket.
    pub vfio_user: Option<PathBuf>,
    /// Hot-add it to the running VM whose QMP socket this is.
    #[serde(default)]
    pub vm: Option<PathBuf>,
    /// The VM's hot-pluggable port to use (default: the first free one).
    #[serde(default)]
    pub port: Option<String>,
    /// The QEMU device id (default: `devlend-NAME`).
    #[serde(default)]
    pub id: Option<String>,
}

/// Give a borrowed device back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReturnRequest {
    /// Device name.
    pub name: String,
    /// For a device in a VM: how long the guest has to release it (milliseconds).
    #[serde(default)]
    pub grace_ms: Option<u64>,
}

/// Forced take-back of a device this host lends.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReclaimRequest {
    /// Device name.
    pub name: String,
    /// Grace for the borrower, milliseconds.
    pub grace_ms: u64,
}

/// Stop lending a device this host owns. Refused while it (or, for an SR-IOV physical
/// function, one of its virtual functions) is lent; a physical function goes with its virtual
/// functions, and a virtual function only with its physical function.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoveRequest {
    /// Device name.
    pub name: String,
}

/// Run the user-space NVMe driver on a borrowed device: read, or (with `write`) write,
/// flush, read back and verify.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckRequest {
    /// Device name.
    pub name: String,
    /// Bytes to read (or write and verify).
    pub bytes: u64,
    /// Byte offset on the device.
    pub offset: u64,
    /// Overwrite the range with a test pattern (destroys its data); without it, only read.
    #[serde(default)]
    pub write: bool,
    /// Place the driver's I/O submission queues in the device's Controller Memory Buffer
    /// (fails when the device has none).
    #[serde(default)]
    pub cmb: bool,
}

/// Config-space snapshots of the devices this host sees (all, or one).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LspciRequest {
    /// Only this device.
    pub name: Option<String>,
}

/// Where a device stands, as seen from the host that reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Offered and free.
    Available,
    /// Lent to a borrower (`borrower` says who).
    Lent,
    /// Held by this host.
    Borrowed,
    /// An SR-IOV physical function: not lendable itself while its VFs are offered.
    ManagingVfs,
    /// Hot-added to a VM here, but its lease ended (the lender died or revoked it): the
    /// guest sees a failed device until `devlend return` takes it out of the VM.
    LeaseEnded,
    /// Held by this host until it was taken away without being given back (its lender died,
    /// the link went down, the lender revoked it); `reason` says which. `return` forgets it.
    Lost,
}

/// A device in a listing or status.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    /// Name, unique on its host (in a cluster: in the cluster).
    pub name: String,
    /// Kind (`nvme`, `nvme-pf`, `vfio`).
    pub kind: String,
    /// The host that lends it.
    pub owner: String,
    /// Who holds it, if anyone.
    pub borrower: Option<String>,
    /// Where it stands.
    pub state: DeviceState,
    /// Storage capacity in bytes (NVMe namespaces), when known.
    pub size_bytes: Option<u64>,
    /// MSI-X vectors, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vectors: Option<u16>,
    /// PCI vendor ID (cluster listings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vendor: Option<u16>,
    /// PCI device ID (cluster listings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<u16>,
    /// SR-IOV virtual functions it offers (cluster listings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfs: Option<u16>,
    /// One line for people (backing image, size).
    pub detail: String,
    /// Borrowed here and served to a VMM on this vfio-user socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfio_user: Option<PathBuf>,
    /// Borrowed here and hot-added to this VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmAttachment>,
    /// Why a `lost` device went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Device {
    /// A device from the lending layer's description; `held`: this host holds it.
    pub fn from_desc(d: &devlend_lending::protocol::DeviceDesc, held: bool) -> Self {
        let state = if held {
            DeviceState::Borrowed
        } else if d.borrower.is_some() {
            DeviceState::Lent
        } else if d.kind == "nvme-pf" {
            DeviceState::ManagingVfs
        } else {
            DeviceState::Available
        };
        Device {
            name: d.name.clone(),
            kind: d.kind.clone(),
            owner: d.owner.clone(),
            borrower: d.borrower.clone(),
            state,
            size_bytes: d.size_bytes,
            vectors: Some(d.vectors),
            vendor: None,
            device: None,
            vfs: None,
            detail: d.detail.clone(),
            vfio_user: None,
            vm: None,
            reason: None,
        }
    }

    /// A device this host lost (see [`DeviceState::Lost`]).
    pub fn lost(l: &devlend_lending::LostDevice) -> Self {
        Device {
            state: DeviceState::Lost,
            reason: Some(l.reason.clone()),
            ..Self::from_desc(&l.device, true)
        }
    }
}

/// A device attached to a running VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmAttachment {
    /// The VM's QMP socket.
    pub qmp: PathBuf,
    /// The device's QEMU id.
    pub device_id: String,
    /// The port it sits on.
    pub port: String,
    /// Where the guest sees it (`0000:01:00.0`), when QEMU reported it.
    pub guest_address: Option<String>,
    /// The vfio-user socket QEMU reaches the device through.
    pub vfio_user: PathBuf,
}

/// `add`: the devices added (one, or an SR-IOV PF and its VFs).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddReply {
    /// The devices.
    pub devices: Vec<Device>,
}

/// `list`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ListReply {
    /// Devices this host lends.
    pub local: Vec<Device>,
    /// Devices its peers lend.
    pub peer: Vec<Device>,
    /// Why the peers' devices are missing, if they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_error: Option<String>,
    /// The registry, in a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry: Option<String>,
}

/// How a cluster borrow spent its time (microseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BorrowTiming {
    /// Registry lookup.
    pub lookup_us: u64,
    /// Claim transaction.
    pub claim_us: u64,
    /// Link set-up (0 when one existed).
    pub link_us: u64,
    /// The lending lease.
    pub lease_us: u64,
}

/// `borrow`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BorrowReply {
    /// Device.
    pub name: String,
    /// Its lender.
    pub owner: String,
    /// Lease id.
    pub lease: u64,
    /// The vfio-user socket it is served on, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfio_user: Option<PathBuf>,
    /// The VM it was hot-added to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmAttachment>,
    /// In a cluster: where the time went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timing: Option<BorrowTiming>,
}

/// How a device left a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Removal {
    /// The guest released it.
    Orderly,
    /// The guest did not release it in time: cut off under it.
    Surprise,
    /// The VM no longer had it.
    AlreadyGone,
}

impl Removal {
    /// One line for people.
    pub fn describe(self, grace: std::time::Duration) -> String {
        match self {
            Removal::Orderly => "the guest released it (orderly hot-unplug)".into(),
            Removal::Surprise => format!(
                "the guest did not release it within {grace:?}: surprise removal (the guest's driver sees the device fail)"
            ),
            Removal::AlreadyGone => "the VM no longer had it".into(),
        }
    }
}

/// `return`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReturnReply {
    /// Device.
    pub name: String,
    /// How it left its VM, if it was in one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal: Option<Removal>,
    /// The same, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removal_text: Option<String>,
    /// The device had lost its lease before (its lender died or revoked it while it sat in a
    /// VM): it left the VM, and there was nothing to give back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lease_had_ended: bool,
    /// The device was lost (not held any more): why. The return only forgot it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
    /// In a cluster: the device was given back, but the registry has not taken the release of
    /// this host's claim yet (why: etcd unreachable, say). The node retries until it does;
    /// until then the registry still shows the device lent to this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim_release_pending: Option<String>,
}

/// `reclaim`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReclaimReply {
    /// The device.
    pub device: String,
    /// Who held it.
    pub borrower: String,
    /// Whether the borrower gave it back within the grace period (else: revoked).
    pub returned: bool,
    /// From the announcement to the device being free again, milliseconds.
    pub elapsed_ms: u64,
}

/// `remove`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RemoveReply {
    /// The devices that left the host: the one named, then (for a physical function) its
    /// virtual functions.
    pub removed: Vec<String>,
}

/// One link in `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinkStatus {
    /// Fabric backend.
    pub fabric: String,
    /// `up` or `down`.
    pub link: String,
    /// The peer's name, once known.
    pub peer: Option<String>,
}

/// Cluster facts in `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The registry.
    pub registry: String,
    /// Whether this node holds a registry lease now.
    pub registered: bool,
    /// How many times it registered.
    pub registrations: Option<u64>,
    /// Lenders this node has links to.
    pub links_to_lenders: Vec<String>,
    /// Borrowers served over links of their own.
    pub links_to_borrowers: Vec<String>,
}

/// `status`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReply {
    /// This host.
    pub name: String,
    /// Its links.
    pub links: Vec<LinkStatus>,
    /// Devices it lends.
    pub lending: Vec<Device>,
    /// Devices it holds.
    pub borrowed: Vec<Device>,
    /// Devices it held until they were taken away (state `lost`, with the reason).
    #[serde(default)]
    pub lost: Vec<Device>,
    /// Leases it granted.
    pub leases: Vec<LeaseStatus>,
    /// Each configured link's address and TLS identity.
    pub link_details: Vec<LinkDetail>,
    /// In a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// `check`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CheckReply {
    /// Device.
    pub name: String,
    /// Bytes read (with `wrote`: written, read back and verified).
    pub bytes: u64,
    /// Whether the range was overwritten with a test pattern (`--write`).
    #[serde(default)]
    pub wrote: bool,
    /// At this byte offset.
    pub offset: u64,
    /// The controller's serial number, as the driver read it (Identify Controller).
    #[serde(default)]
    pub serial: String,
    /// One line for people.
    pub summary: String,
}

/// `lspci`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LspciReply {
    /// Each device's snapshot.
    pub devices: Vec<PciSnapshot>,
}

/// Any reply (what the daemon's dispatch returns; each client reads its verb's own type).
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Reply {
    /// `add`, `add_vfio`.
    Add(AddReply),
    /// `list`.
    List(ListReply),
    /// `borrow`.
    Borrow(BorrowReply),
    /// `return`.
    Return(ReturnReply),
    /// `reclaim`.
    Reclaim(ReclaimReply),
    /// `remove`.
    Remove(RemoveReply),
    /// `status`.
    Status(Box<StatusReply>),
    /// `check`.
    Check(CheckReply),
    /// `lspci`.
    Lspci(LspciReply),
    /// `metrics`.
    Metrics(Box<MetricsSnapshot>),
    /// `shutdown`.
    Empty(Empty),
}

/// Reads one request line: the version first, then the request. Errors carry their code.
pub fn parse_request(line: &[u8]) -> Result<Request, ErrorBody> {
    let version: VersionOnly = serde_json::from_slice(line)
        .map_err(|e| ErrorBody::new(ErrorCode::BadRequest, format!("not a request: {e}")))?;
    match version.v {
        Some(v) if v == u64::from(VERSION) => {}
        Some(v) => {
            return Err(ErrorBody::new(
                ErrorCode::VersionMismatch,
                format!(
                    "this node speaks management protocol version {VERSION}, the client version {v}: use the same devlend build for the node and its verbs"
                ),
            ))
        }
        None => {
            return Err(ErrorBody::new(
                ErrorCode::VersionMismatch,
                format!(
                    "the request names no protocol version (\"v\"); this node speaks version {VERSION}: use the same devlend build for the node and its verbs"
                ),
            ))
        }
    }
    serde_json::from_slice::<RequestLine>(line)
        .map(|l| l.req)
        .map_err(|e| ErrorBody::new(ErrorCode::BadRequest, format!("bad request: {e}")))
}

/// Reads one reply line for a request of type `V`.
pub fn parse_reply<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<T, ErrorBody> {
    let bad = |what: String| {
        ErrorBody::new(
            ErrorCode::BadReply,
            format!(
                "the node answered something unreadable ({what}): {:?}",
                String::from_utf8_lossy(line)
            ),
        )
    };
    let version: VersionOnly = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
    if version.v != Some(u64::from(VERSION)) {
        return Err(ErrorBody::new(
            ErrorCode::VersionMismatch,
            match version.v {
                Some(v) => format!(
                    "the node speaks management protocol version {v}, this devlend version {VERSION}: restart the node with this build"
                ),
                None => format!(
                    "the node speaks an older management protocol (no version), this devlend version {VERSION}: restart the node with this build"
                ),
            },
        ));
    }
    let reply: ReplyLine<T> = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
    match (reply.ok, reply.result, reply.error) {
        (true, Some(r), _) => Ok(r),
        (false, _, Some(e)) => Err(e),
        _ => Err(bad("neither a result nor an error".into())),
    }
}

/// One reply line (newline included).
pub fn reply_line(r: Result<Reply, ErrorBody>) -> Vec<u8> {
    let line = match r {
        Ok(result) => ReplyLine {
            v: VERSION,
            ok: true,
            result: Some(result),
            error: None,
        },
        Err(e) => ReplyLine {
            v: VERSION,
            ok: false,
            result: None,
            error: Some(e),
        },
    };
    let mut out = serde_json::to_vec(&line).unwrap_or_else(|e| {
        // A reply that cannot be encoded is the node's failure, said as such.
        serde_json::to_vec(&ReplyLine::<Empty> {
            v: VERSION,
            ok: false,
            result: None,
            error: Some(ErrorBody::new(
                ErrorCode::Failed,
                format!("encoding the reply: {e}"),
            )),
        })
        .unwrap_or_default()
    });
    out.push(b'\n');
    out
}

/// One request line (newline included).
pub fn request_line(req: Request) -> Result<Vec<u8>, ErrorBody> {
    let mut out = serde_json::to_vec(&RequestLine { v: VERSION, req })
        .map_err(|e| ErrorBody::new(ErrorCode::Failed, format!("encoding the request: {e}")))?;
    out.push(b'\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [ErrorCode; 17] = [
        ErrorCode::Usage,
        ErrorCode::Invalid,
        ErrorCode::BadRequest,
        ErrorCode::VersionMismatch,
        ErrorCode::LineTooLong,
        ErrorCode::Busy,
        ErrorCode::IdleTimeout,
        ErrorCode::Unreachable,
        ErrorCode::Timeout,
        ErrorCode::BadReply,
        ErrorCode::NotFound,
        ErrorCode::AlreadyExists,
        ErrorCode::InUse,
        ErrorCode::NotHeld,
        ErrorCode::LinkDown,
        ErrorCode::Refused,
        ErrorCode::Failed,
    ];

    #[test]
    fn every_error_code_is_documented_in_the_readme() {
        let readme = include_str!("../../../README.md");
        for code in ALL {
            let name = serde_json::to_value(code).unwrap();
            let name = name.as_str().unwrap();
            assert!(
                readme.contains(&format!("`{name}`")),
                "README.md does not document the error code {name}"
            );
        }
    }

    #[test]
    fn requests_and_replies_round_trip_with_their_version() {
        let line = request_line(Request::from(ListRequest)).unwrap();
        assert_eq!(line, b"{\"v\":1,\"verb\":\"list\"}\n");
        assert!(matches!(parse_request(&line), Ok(Request::List(_))));
        let reply = reply_line(Ok(Reply::Empty(Empty {})));
        assert_eq!(parse_reply::<Empty>(&reply), Ok(Empty {}));
        let err = reply_line(Err(ErrorBody::new(ErrorCode::NotFound, "no nvme9")));
        assert_eq!(
            parse_reply::<Empty>(&err),
            Err(ErrorBody::new(ErrorCode::NotFound, "no nvme9"))
        );
        let old = b"{\"verb\":\"list\"}";
        assert_eq!(
            parse_request(old).unwrap_err().code,
            ErrorCode::VersionMismatch
        );
        assert_eq!(
            parse_reply::<Empty>(b"{\"v\":7,\"ok\":true,\"result\":{}}")
                .unwrap_err()
                .code,
            ErrorCode::VersionMismatch
        );
    }

    #[test]
    fn a_persisted_add_request_keeps_its_shape() {
        // devices.json written before the protocol was versioned still reads.
        let saved = br#"{"verb":"add","kind":"nvme","name":"nvme0","image":"/tmp/d.img","size":4096,"serial":null,"model":null}"#;
        let req: Request = serde_json::from_slice(saved).unwrap();
        assert!(matches!(req, Request::Add(a) if a.name == "nvme0" && a.size == Some(4096)));
    }
}
