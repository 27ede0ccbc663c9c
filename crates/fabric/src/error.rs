//! The fabric's error type.

use devlend_memory::BusAddr;

/// Everything a fabric call can fail with. Bad input is always an error, never a panic.
#[derive(Debug, thiserror::Error)]
pub enum FabricError {
    /// The access ran past the window's translated size.
    #[error("access of {len} bytes at offset {offset:#x} is outside window {window} ({size:#x} bytes translated)")]
    OutsideWindow {
        /// Window index.
        window: usize,
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: u64,
        /// Translated size.
        size: u64,
    },
    /// A bus address range is not wholly inside one region of the local address space.
    #[error("bus range {addr} + {len:#x} is not inside one region of this host's address space")]
    NoRegion {
        /// Start of the range.
        addr: BusAddr,
        /// Length of the range.
        len: u64,
    },
    /// A new region overlaps an existing one.
    #[error("region {addr} + {len:#x} overlaps an existing region")]
    RegionOverlap {
        /// Start of the new region.
        addr: BusAddr,
        /// Length of the new region.
        len: u64,
    },
    /// An index (window, scratchpad, message register) does not exist.
    #[error("{what} {index} does not exist (there are {count})")]
    NoSuchIndex {
        /// "memory window", "scratchpad", "message register".
        what: &'static str,
        /// The index asked for.
        index: usize,
        /// How many exist.
        count: usize,
    },
    /// Doorbell bits outside [`crate::Doorbells::db_valid_mask`].
    #[error("doorbell bits {bits:#x} are outside the valid mask {valid:#x}")]
    InvalidDoorbell {
        /// The bits asked for.
        bits: u64,
        /// The valid mask.
        valid: u64,
    },
    /// The peer has not consumed the previous message in that register.
    #[error("message register {0} of the peer still holds an unread message")]
    MessageBusy(usize),
    /// A translation that breaks the window's alignment or size limits.
    #[error("translation of window {window} to {addr} + {size:#x} violates its limits: {why}")]
    BadTranslation {
        /// Window index.
        window: usize,
        /// Requested bus address.
        addr: BusAddr,
        /// Requested size.
        size: u64,
        /// Which limit.
        why: &'static str,
    },
    /// The access size is not supported (for example a zero-length access).
    #[error("bad access size {0}")]
    BadAccessSize(usize),
    /// A wait for an empty set of bits (it could never end).
    #[error("waiting for no bits at all")]
    EmptyWait,
    /// A [`crate::LinkConfig`] outside the supported limits.
    #[error("invalid link configuration: {0}")]
    InvalidConfig(&'static str),
    /// The window has no translation.
    #[error("memory window {0} is not translated")]
    WindowNotTranslated(usize),
    /// The link is down (peer gone, not yet connected, or disconnected).
    #[error("the NTB link is down")]
    LinkDown,
    /// A wait ran out.
    #[error("timed out")]
    Timeout,
    /// The peer broke the backend's protocol.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// Shared memory could not be created or accessed.
    #[error(transparent)]
    Memory(#[from] devlend_memory::MemError),
    /// The OS refused (sockets, files, eventfds).
    #[error("{op}: {source}")]
    Io {
        /// What was attempted.
        op: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl FabricError {
    /// Wraps an I/O error with what was being attempted.
    pub fn io(op: impl Into<String>, source: std::io::Error) -> Self {
        FabricError::Io {
            op: op.into(),
            source,
        }
    }
}
