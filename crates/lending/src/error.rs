//! The lending layer's error type.

/// What lending calls fail with; messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum LendingError {
    /// The device is lent to someone else.
    #[error("device {device} is already lent to {holder}; ask {holder} to return it (devlend return {device})")]
    AlreadyLent {
        /// Device.
        device: String,
        /// Current borrower.
        holder: String,
    },
    /// No device by that name.
    #[error("no device named {0}; see `devlend list`")]
    NoSuchDevice(String),
    /// A device by that name exists already.
    #[error("a device named {0} exists already (a node keeps the devices it lends across restarts; `devlend remove {0}` takes it out); pick another --name")]
    DuplicateName(String),
    /// The device is lent and cannot be removed or changed now.
    #[error("device {0} is lent; it must be returned first")]
    Busy(String),
    /// The device's last lease just ended and it is being reset (its windows cleared, its
    /// DMA unmapped, the function reset); it is offered again when that is done.
    #[error("device {0} is being reset after its last lease ended; try again in a moment")]
    Resetting(String),
    /// The device is an SR-IOV physical function whose virtual functions are offered.
    #[error("device {device} is the physical function of {vfs}; it is not lendable while its virtual functions are offered: borrow one of them")]
    PhysicalFunction {
        /// The physical function.
        device: String,
        /// Its virtual functions, comma-separated.
        vfs: String,
    },
    /// The device is a virtual function of an SR-IOV physical function this host manages: it
    /// comes and goes with its physical function.
    #[error("device {vf} is a virtual function of {pf}; remove {pf} (it goes with all its virtual functions)")]
    VirtualFunction {
        /// The virtual function.
        vf: String,
        /// Its physical function.
        pf: String,
    },
    /// This host holds no lease on that device.
    #[error("this host has not borrowed {0}")]
    NotBorrowed(String),
    /// This host lends no such device to anyone right now.
    #[error("{0} is not lent to anyone")]
    NotLent(String),
    /// All inbound windows are in use.
    #[error(
        "no free NTB memory window on this host: every device lent over a link takes one of the link's windows per BAR and per doorbell page, and every borrowed device one for its DMA pool (one window is the management channel's). Return a device that uses this link, or use another link"
    )]
    NoFreeWindow,
    /// Not enough doorbell bits for the device's interrupt vectors.
    #[error(
        "not enough free doorbell bits for {vectors} interrupt vectors: a link has {total} interrupt doorbell bits, one per MSI-X vector of every device lent over it, and {free} are free. Return a device borrowed over this link, borrow over another link, or lend devices with fewer vectors (an NVMe device added with `devlend add nvme --queues N` has N+1)"
    )]
    NoDoorbellBits {
        /// The device's vectors.
        vectors: u16,
        /// Interrupt doorbell bits of a link.
        total: u32,
        /// Of them free now.
        free: u32,
    },
    /// The peer refused, with its reason.
    #[error("the peer refused: {0}")]
    Refused(String),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// No answer in time.
    #[error("the peer did not answer in time")]
    Timeout,
    /// The link is down.
    #[error("the NTB link is down (is the peer's `devlend node` running? A link comes up a moment after both nodes start: `devlend wait --peer NAME` waits for it)")]
    LinkDown,
    /// The device model could not be built.
    #[error("device: {0}")]
    Device(String),
    /// Fabric failure.
    #[error("fabric: {0}")]
    Fabric(#[source] devlend_fabric::FabricError),
    /// Channel failure.
    #[error("management channel: {0}")]
    Channel(#[source] crate::channel::ChannelError),
    /// Memory failure.
    #[error(transparent)]
    Memory(#[from] devlend_memory::MemError),
    /// OS failure.
    #[error("{op}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl From<devlend_fabric::FabricError> for LendingError {
    fn from(e: devlend_fabric::FabricError) -> Self {
        match e {
            devlend_fabric::FabricError::LinkDown => LendingError::LinkDown,
            devlend_fabric::FabricError::Timeout => LendingError::Timeout,
            other => LendingError::Fabric(other),
        }
    }
}

impl From<crate::channel::ChannelError> for LendingError {
    fn from(e: crate::channel::ChannelError) -> Self {
        match e {
            crate::channel::ChannelError::Fabric(f) => f.into(),
            crate::channel::ChannelError::Timeout => LendingError::Timeout,
            other => LendingError::Channel(other),
        }
    }
}
