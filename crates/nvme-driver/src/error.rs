//! Errors of the driver.

use std::time::Duration;

use devlend_pci::FunctionError;

use crate::cmd::Status;

/// Everything the driver can fail with.
#[derive(Debug, thiserror::Error)]
pub enum NvmeError {
    /// The function's BAR0 is not a memory BAR.
    #[error("BAR0 is not a memory BAR (raw value {raw:#x})")]
    Bar0NotMemory {
        /// The BAR register as read.
        raw: u32,
    },
    /// The controller failed a command.
    #[error("{what} failed: {status}")]
    Command {
        /// Which command ("identify controller", "read", ...).
        what: &'static str,
        /// The status the controller returned.
        status: Status,
    },
    /// A completion named a command that is not outstanding.
    #[error("completion on queue {qid} names command {cid}, which is not outstanding")]
    CompletionForUnknownCommand {
        /// Queue id.
        qid: u16,
        /// Command identifier the controller reported.
        cid: u16,
    },
    /// The controller set CSTS.CFS (controller fatal status).
    #[error("the controller reports a fatal error (CSTS.CFS); it needs a reset")]
    ControllerFatal,
    /// The function is gone: a register read of all-ones, or the transport said so.
    #[error("the device was removed: {0}")]
    DeviceRemoved(String),
    /// A function-level access failed (config, BAR, DMA allocation, interrupts).
    #[error("PCI function: {0}")]
    Function(#[source] FunctionError),
    /// The controller's identify data is unusable.
    #[error("identify data: {0}")]
    InvalidIdentify(String),
    /// A request the driver cannot express (bad length, too many blocks, ...).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// DMA memory access failed.
    #[error("DMA memory: {0}")]
    Memory(#[from] devlend_memory::MemError),
    /// The function has no MSI-X capability.
    #[error("the function has no MSI-X capability")]
    NoMsix,
    /// The function is not an NVMe controller (class code 01/08/02).
    #[error("class code {class:#08x} is not an NVMe controller (0x010802)")]
    NotNvme {
        /// Base class, subclass and programming interface.
        class: u32,
    },
    /// A block request reaches past the namespace.
    #[error("{len} bytes at {offset:#x} reach past the namespace ({capacity:#x} bytes)")]
    OutOfRange {
        /// Byte offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Namespace size in bytes.
        capacity: u64,
    },
    /// A queue failed earlier (a timeout, a bad completion) and is unusable until a reset.
    #[error("I/O queue {qid} is unusable after an earlier failure; reset the controller")]
    QueueBroken {
        /// Queue id.
        qid: u16,
    },
    /// The queue has as many commands outstanding as it can hold.
    #[error("queue {qid} is full ({capacity} commands outstanding)")]
    QueueFull {
        /// Queue id.
        qid: u16,
        /// Outstanding commands it holds.
        capacity: usize,
    },
    /// No I/O queue with this index.
    #[error("no I/O queue {index} (the controller has {count})")]
    NoSuchQueue {
        /// Index asked for.
        index: usize,
        /// I/O queues created.
        count: usize,
    },
    /// The controller was shut down; create a new one.
    #[error("the controller was shut down")]
    ShutDown,
    /// A bounded wait expired.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long the driver waited.
        after: Duration,
    },
    /// The controller lacks something the driver needs.
    #[error("unsupported controller: {0}")]
    Unsupported(String),
}

impl From<FunctionError> for NvmeError {
    fn from(e: FunctionError) -> Self {
        match e {
            FunctionError::Removed(why) => NvmeError::DeviceRemoved(why),
            other => NvmeError::Function(other),
        }
    }
}

impl NvmeError {
    /// The controller's status, when this is a failed command.
    pub fn status(&self) -> Option<Status> {
        match self {
            NvmeError::Command { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether the device is gone (surprise removal).
    pub fn is_removed(&self) -> bool {
        matches!(self, NvmeError::DeviceRemoved(_))
    }
}
