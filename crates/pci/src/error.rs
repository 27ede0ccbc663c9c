//! Errors of the PCI layer.

use devlend_memory::BusAddr;

/// What a driver-side call on a [`crate::PciFunction`] can fail with.
#[derive(Debug, thiserror::Error)]
pub enum FunctionError {
    /// A config access at a bad offset, size or alignment.
    #[error("config access of {size} bytes at {offset:#x} is invalid")]
    BadConfigAccess {
        /// Offset asked for.
        offset: u16,
        /// Size asked for.
        size: usize,
    },
    /// A BAR access outside the BAR or of an unsupported size.
    #[error("BAR{bar} access of {len} bytes at {offset:#x} is invalid")]
    BadBarAccess {
        /// BAR number.
        bar: u8,
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: usize,
    },
    /// No such BAR.
    #[error("BAR{0} is not implemented by this function")]
    NoSuchBar(u8),
    /// No such MSI-X vector.
    #[error("MSI-X vector {vector} does not exist (the function has {count})")]
    NoSuchVector {
        /// Vector asked for.
        vector: u16,
        /// Vectors the function has.
        count: u16,
    },
    /// DMA memory exhausted.
    #[error("out of DMA memory: {requested} bytes requested, {available} available")]
    OutOfDmaMemory {
        /// Bytes asked for.
        requested: usize,
        /// Largest free block.
        available: usize,
    },
    /// An IOMMU map or unmap was refused (overlap, split, bad range).
    #[error("DMA mapping: {0}")]
    DmaMap(#[from] crate::iommu::IommuError),
    /// The function is gone (surprise removal: the lender died or took it back).
    #[error("the function was removed: {0}")]
    Removed(String),
    /// The transport below (the fabric) failed.
    #[error("transport: {0}")]
    Transport(String),
    /// Memory access failed.
    #[error(transparent)]
    Memory(#[from] devlend_memory::MemError),
    /// The OS refused.
    #[error("{op}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What a device's DMA can fail with (the device turns it into its own error status).
#[derive(Debug, thiserror::Error)]
pub enum DmaError {
    /// No mapping covers the address: the device tried to reach memory it was not granted.
    #[error("DMA of {len} bytes at {addr} is not mapped")]
    Unmapped {
        /// Bus address.
        addr: BusAddr,
        /// Length.
        len: u64,
    },
    /// The mapping exists but forbids this direction.
    #[error("DMA {access} at {addr} is not permitted by its mapping")]
    Permission {
        /// Bus address.
        addr: BusAddr,
        /// "read" or "write".
        access: &'static str,
    },
    /// Bus mastering is disabled in the Command register.
    #[error("bus mastering is disabled")]
    BusMasterDisabled,
    /// The path to the memory failed (the link went down).
    #[error("DMA path failed: {0}")]
    Path(String),
    /// Memory access failed.
    #[error(transparent)]
    Memory(#[from] devlend_memory::MemError),
}
