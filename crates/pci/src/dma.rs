//! DMA buffers handed to drivers.

use devlend_memory::{BusAddr, MemError, MemSpan};

/// A block of DMA-able memory: the driver reads and writes it through this handle and gives
/// the device its bus address. Returned to its pool when dropped.
pub struct DmaBuffer {
    span: MemSpan,
    bus_addr: BusAddr,
    release: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl std::fmt::Debug for DmaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DmaBuffer({} + {:#x})", self.bus_addr, self.span.len())
    }
}

impl DmaBuffer {
    /// A buffer over `span`, seen by the device at `bus_addr`; `release` runs on drop.
    pub fn new(
        span: MemSpan,
        bus_addr: BusAddr,
        release: Option<Box<dyn FnOnce() + Send + Sync>>,
    ) -> Self {
        Self {
            span,
            bus_addr,
            release,
        }
    }

    /// Bus address of the first byte, as the device sees it.
    pub fn bus_addr(&self) -> BusAddr {
        self.bus_addr
    }

    /// Length in bytes.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.span.len() as usize
    }

    /// The memory itself.
    pub fn span(&self) -> &MemSpan {
        &self.span
    }

    /// Copies out.
    pub fn read_at(&self, offset: usize, buf: &mut [u8]) -> Result<(), MemError> {
        self.span.read_at(offset as u64, buf)
    }

    /// Copies in.
    pub fn write_at(&self, offset: usize, data: &[u8]) -> Result<(), MemError> {
        self.span.write_at(offset as u64, data)
    }

    /// Atomic 32-bit load (acquire), e.g. a completion entry's phase bit.
    pub fn load_u32(&self, offset: usize) -> Result<u32, MemError> {
        self.span.load_u32(offset as u64)
    }

    /// Atomic 32-bit store (release).
    pub fn store_u32(&self, offset: usize, value: u32) -> Result<(), MemError> {
        self.span.store_u32(offset as u64, value)
    }

    /// Atomic 64-bit store (release), e.g. a PRP list entry.
    pub fn store_u64(&self, offset: usize, value: u64) -> Result<(), MemError> {
        self.span.store_u64(offset as u64, value)
    }

    /// Fills with `byte`.
    pub fn fill(&self, byte: u8) -> Result<(), MemError> {
        self.span.fill(0, self.len(), byte)
    }
}

impl Drop for DmaBuffer {
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            release();
        }
    }
}
