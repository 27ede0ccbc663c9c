//! Errors of the vfio-user front-end.

use devlend_pci::FunctionError;

/// Why a message was refused. Each becomes an error reply carrying [`WireError::errno`]; the
/// stream stays in sync because the whole message was consumed before parsing.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// `argsz` is smaller than the structure it must cover.
    #[error("argsz {argsz} is smaller than the {need} bytes required")]
    BadArgsz {
        /// As sent.
        argsz: u32,
        /// Required.
        need: u32,
    },
    /// A count is zero, too large, or overflows.
    #[error("count {count} is out of range")]
    BadCount {
        /// As sent.
        count: u32,
    },
    /// Unknown or contradictory flag bits.
    #[error("flags {flags:#x} are invalid for this command")]
    BadFlags {
        /// As sent.
        flags: u32,
    },
    /// An address range that is empty, overflows, or is inconsistent with its flags.
    #[error("range {iova:#x} + {size:#x} is invalid")]
    BadRange {
        /// Start.
        iova: u64,
        /// Length.
        size: u64,
    },
    /// The VERSION capabilities are not the JSON we expect.
    #[error("VERSION capabilities: {0}")]
    BadVersionJson(String),
    /// A REGION_WRITE's `count` does not match its data.
    #[error("count {count} does not match the {got} data bytes sent")]
    LengthMismatch {
        /// As sent.
        count: u32,
        /// Data bytes present.
        got: usize,
    },
    /// The header's `size` is smaller than a header.
    #[error("message size {size} is smaller than the 16-byte header")]
    MessageTooShort {
        /// As sent.
        size: u32,
    },
    /// The header's `size` exceeds what we accept.
    #[error("message size {size} exceeds the {max}-byte limit")]
    MessageTooLong {
        /// As sent.
        size: u32,
        /// Our limit.
        max: u32,
    },
    /// A message whose type is not "command" (we send no commands, so expect no replies).
    #[error("message with flags {flags:#x} is not a command")]
    NotACommand {
        /// As sent.
        flags: u32,
    },
    /// The payload is shorter than the command's fixed part.
    #[error("command {command}: payload of {got} bytes, {need} required")]
    Truncated {
        /// Command number.
        command: u16,
        /// Bytes required.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// File descriptors came with a message that takes none (or a different number).
    #[error("command {command}: {count} unexpected file descriptors (closed)")]
    UnexpectedFds {
        /// Command number.
        command: u16,
        /// How many arrived.
        count: usize,
    },
    /// More descriptors than a message may carry (the kernel dropped some).
    #[error("too many file descriptors with one message")]
    TooManyFds,
    /// No such command.
    #[error("unknown command {command}")]
    UnknownCommand {
        /// As sent.
        command: u16,
    },
    /// A command we deliberately do not implement.
    #[error("{what} is not supported")]
    Unsupported {
        /// What.
        what: &'static str,
    },
}

impl WireError {
    /// The errno for the error reply.
    pub fn errno(&self) -> i32 {
        match self {
            WireError::MessageTooLong { .. } => libc::E2BIG,
            WireError::UnknownCommand { .. } | WireError::Unsupported { .. } => libc::ENOTSUP,
            _ => libc::EINVAL,
        }
    }
}

/// Why a well-formed request could not be carried out (also becomes an error reply).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The message was malformed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// No such region or IRQ index, or an access outside a region.
    #[error("{0}")]
    OutOfRange(String),
    /// A DMA_MAP overlapping an existing mapping.
    #[error("DMA map {iova:#x} + {size:#x} overlaps an existing mapping")]
    Overlap {
        /// Start.
        iova: u64,
        /// Length.
        size: u64,
    },
    /// Too many DMA mappings.
    #[error("too many DMA mappings")]
    TooManyMaps,
    /// A file descriptor that is not what the command needs.
    #[error("{0}")]
    BadFd(String),
    /// The device has no such capability (FLR, MSI-X).
    #[error("{0}")]
    NotSupported(String),
    /// The function refused.
    #[error(transparent)]
    Function(#[from] FunctionError),
    /// The OS refused (mmap, eventfd).
    #[error("{op}: {source}")]
    Os {
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl RequestError {
    /// The errno for the error reply.
    pub fn errno(&self) -> i32 {
        match self {
            RequestError::Wire(w) => w.errno(),
            RequestError::OutOfRange(_) => libc::EINVAL,
            RequestError::Overlap { .. } => libc::EEXIST,
            RequestError::TooManyMaps => libc::ENOSPC,
            RequestError::BadFd(_) => libc::EBADF,
            RequestError::NotSupported(_) => libc::ENOTSUP,
            RequestError::Function(f) => match f {
                FunctionError::BadConfigAccess { .. }
                | FunctionError::BadBarAccess { .. }
                | FunctionError::NoSuchBar(_)
                | FunctionError::NoSuchVector { .. } => libc::EINVAL,
                FunctionError::OutOfDmaMemory { .. } => libc::ENOMEM,
                FunctionError::Removed(_) => libc::ENODEV,
                _ => libc::EIO,
            },
            RequestError::Os { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Errors of the server itself (not of one request).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Binding or accepting on the socket failed.
    #[error("{op} {path}: {source}")]
    Socket {
        /// What was attempted.
        op: &'static str,
        /// The socket path.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Probing the function's config space failed.
    #[error("probing the function: {0}")]
    Probe(#[from] FunctionError),
    /// Something is listening on the socket path already (another server, a node's
    /// management socket): it is left alone.
    #[error("{path} is a live socket (something accepts connections on it): choose another path, or stop what serves it")]
    SocketInUse {
        /// The socket path.
        path: String,
    },
    /// The path exists and is not a socket: it is left alone.
    #[error("{path} exists and is not a socket")]
    NotASocket {
        /// The path.
        path: String,
    },
}
