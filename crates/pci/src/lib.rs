//! The PCIe function model.
//!
//! Two seams meet here:
//!
//! - **Driver side** ([`PciFunction`] = [`ConfigAccess`] + [`BarAccess`] + [`DmaAlloc`] +
//!   [`Interrupts`]): what a driver is written against. A local binding implements it by calling
//!   a device model in-process; a borrowed function implements it across the NTB. A driver never
//!   knows which it has.
//! - **Device side** ([`PciDevice`], with [`DmaPort`] and [`InterruptSink`] handed to the model
//!   when it is built): what a device model implements and what it may use. A model never knows
//!   whether it is lent: its DMA goes through an IOMMU-like [`DmaPort`] and its MSI-X messages
//!   to an [`InterruptSink`], both owned by whoever binds it.
//!
//! The building blocks for both sides:
//!
//! - [`config`]: [`ConfigSpace`], a type 0 config space whose behaviour falls out of per-byte
//!   writable and write-1-to-clear masks; writes return [`ConfigEffect`]s for the device.
//! - [`msix`]: [`MsixTable`], the MSI-X table and PBA with per-vector and function masking.
//! - [`iommu`]: [`Iommu`], the [`DmaPort`] that confines a device to the memory it was granted
//!   (direct [`MemSpan`]s or [`RemoteMemory`] reached by messages).
//! - [`dma_pool`]: [`DmaPool`], page-granular DMA buffers in one shared-memory region.
//! - [`sriov`]: [`PresentedVf`], a virtual function presented as a function of its own (the
//!   SR-IOV capability itself is part of [`ConfigSpace`]).
//! - [`local`]: [`LocalFunction`], the in-process binding (the performance baseline).
//! - `test_device` (feature `test-device`, for the tests of the crates above only): a small device
//!   with a DMA engine and MSI-X, and a register-less stand-in for real hardware.
//!
//! A `cargo fuzz` target in `fuzz/` drives the test device with arbitrary accesses.
#![warn(missing_docs)]

pub mod config;
mod dma;
pub mod dma_pool;
mod error;
pub mod iommu;
pub mod local;
pub mod lspci;
pub mod msix;
pub mod sriov;
#[cfg(any(test, feature = "test-device"))]
pub mod test_device;

pub use config::{ConfigEffect, ConfigSpace, ConfigSpaceBuilder, SriovCap, SriovState};
pub use devlend_memory::{BusAddr, ByteRange, MemSpan, SharedMemory};
pub use dma::DmaBuffer;
pub use dma_pool::{DmaPool, DMA_PAGE_SIZE};
pub use error::{DmaError, FunctionError};
pub use iommu::{DmaTarget, Iommu, IommuError, RemoteMemory};
pub use local::{EventFdInterrupts, LocalFunction, LOCAL_DMA_BUS_BASE};
pub use msix::MsixTable;
pub use sriov::{PresentedVf, SriovError};

use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

/// Size of a config-space access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessSize {
    /// 1 byte.
    Byte = 1,
    /// 2 bytes.
    Word = 2,
    /// 4 bytes.
    Dword = 4,
}

impl AccessSize {
    /// From a byte count (1, 2 or 4).
    pub fn from_len(len: usize) -> Option<Self> {
        match len {
            1 => Some(Self::Byte),
            2 => Some(Self::Word),
            4 => Some(Self::Dword),
            _ => None,
        }
    }

    /// Byte count.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(self) -> usize {
        self as usize
    }
}

/// A BAR number, 0 to 5.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BarIndex(u8);

impl BarIndex {
    /// All six BAR slots.
    pub const ALL: [BarIndex; 6] = [
        BarIndex(0),
        BarIndex(1),
        BarIndex(2),
        BarIndex(3),
        BarIndex(4),
        BarIndex(5),
    ];

    /// `Some` for 0 to 5.
    pub fn new(index: u8) -> Option<Self> {
        (index < 6).then_some(Self(index))
    }

    /// The raw number.
    pub fn get(self) -> u8 {
        self.0
    }
}

/// Size and type of a memory BAR, as its writable mask in config space declares it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// Size in bytes, a power of two of at least 16.
    pub size: u64,
    /// A 64-bit BAR (occupies this slot and the next).
    pub is_64bit: bool,
    /// Prefetchable.
    pub prefetchable: bool,
}

// ---------------------------------------------------------------------------------------------
// Driver side
// ---------------------------------------------------------------------------------------------

/// Config-space access (the `pci_ops` read/write pair).
pub trait ConfigAccess {
    /// Reads 1, 2 or 4 bytes at `offset` (naturally aligned, below 4096).
    fn config_read(&self, offset: u16, size: AccessSize) -> Result<u32, FunctionError>;
    /// Writes 1, 2 or 4 bytes at `offset`.
    fn config_write(&self, offset: u16, size: AccessSize, value: u32) -> Result<(), FunctionError>;
}

/// Memory-mapped BAR access.
pub trait BarAccess {
    /// Reads `data.len()` bytes (1, 2, 4 or 8 for registers) at `offset` in BAR `bar`.
    fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), FunctionError>;
    /// Writes `data` at `offset` in BAR `bar`.
    fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) -> Result<(), FunctionError>;

    /// 32-bit register read.
    fn bar_read_u32(&self, bar: BarIndex, offset: u64) -> Result<u32, FunctionError> {
        let mut b = [0u8; 4];
        self.bar_read(bar, offset, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    /// 32-bit register write.
    fn bar_write_u32(&self, bar: BarIndex, offset: u64, value: u32) -> Result<(), FunctionError> {
        self.bar_write(bar, offset, &value.to_le_bytes())
    }
    /// 64-bit register read.
    fn bar_read_u64(&self, bar: BarIndex, offset: u64) -> Result<u64, FunctionError> {
        let mut b = [0u8; 8];
        self.bar_read(bar, offset, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    /// 64-bit register write.
    fn bar_write_u64(&self, bar: BarIndex, offset: u64, value: u64) -> Result<(), FunctionError> {
        self.bar_write(bar, offset, &value.to_le_bytes())
    }
    /// The parts of BAR `bar` that are memory-backed and may be mapped directly (doorbell pages
    /// the device polls): stores go to [`MemoryArea::mem`], followed by
    /// [`MemoryArea::write_and_wake`]'s wake-up. None by default; `bar_write` is always correct.
    fn bar_mappings(&self, bar: BarIndex) -> Vec<MemoryArea> {
        let _ = bar;
        Vec::new()
    }
}

/// DMA-able memory for the driver: buffers whose bus addresses the device can reach.
pub trait DmaAlloc {
    /// Allocates `len` bytes (rounded up to 4 KiB pages, page-aligned, zeroed).
    fn dma_alloc(&self, len: usize) -> Result<DmaBuffer, FunctionError>;
}

/// Memory the caller already owns (a VMM's guest RAM, handed over by vfio-user `DMA_MAP`),
/// made reachable by the device at `iova`, as an IOMMU map would.
pub trait DmaRemap {
    /// Makes `mem` reachable by the device at bus addresses `[iova, iova + mem.len())`.
    /// Overlapping an existing mapping is an error.
    fn dma_map(&self, iova: BusAddr, mem: MemSpan, writable: bool) -> Result<(), FunctionError>;
    /// Removes mappings inside `[iova, iova + len)`.
    fn dma_unmap(&self, iova: BusAddr, len: u64) -> Result<(), FunctionError>;
}

/// MSI-X interrupts as the driver sees them: one event per vector.
pub trait Interrupts {
    /// Number of MSI-X vectors the function has.
    fn interrupt_vectors(&self) -> u16;
    /// Waits until `vector` fires (`Ok(true)`, consuming the event) or `timeout` passes
    /// (`Ok(false)`). A function that is gone fails with [`FunctionError::Removed`].
    fn wait_interrupt(&self, vector: u16, timeout: Duration) -> Result<bool, FunctionError>;
    /// Delivers `vector` to `fd` instead (a VMM's irqfd); `None` restores internal delivery.
    fn set_interrupt_eventfd(
        &self,
        vector: u16,
        fd: Option<Arc<EventFd>>,
    ) -> Result<(), FunctionError>;
}

/// How long a function binding polls for an interrupt before it sleeps (both the local binding
/// and a borrowed function use it, so lending measurements compare like with like). Completions
/// of a busy device arrive well within it; an idle waiter sleeps after it.
pub const INTERRUPT_SPIN: Duration = Duration::from_micros(200);

/// Polls `ready` for at most `budget` with the spin-then-yield cadence every devlend waiter
/// shares (`devlend_sync::Spin`). Returns whether `ready` turned true.
pub use devlend_sync::spin_until;

/// A PCIe function as a driver uses it.
pub trait PciFunction:
    ConfigAccess + BarAccess + DmaAlloc + DmaRemap + Interrupts + Send + Sync
{
    /// A short description for logs ("local nvme", "borrowed nvme0 from lender-a").
    fn describe(&self) -> String;
}

// ---------------------------------------------------------------------------------------------
// Device side
// ---------------------------------------------------------------------------------------------

/// Direction of a DMA access, checked against mapping permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaAccess {
    /// The device reads memory.
    Read,
    /// The device writes memory.
    Write,
}

/// What [`DmaPort::dma_span`] answers: the directly mapped span, `None` (go through
/// `dma_read`/`dma_write`), or why the access is refused.
pub type DmaSpanResult = Result<Option<MemSpan>, DmaError>;

/// A device's bus-master port: every DMA goes through it and is translated (IOMMU-like) onto
/// exactly the memory the binding granted. Anything else is an error, and touches nothing.
pub trait DmaPort: Send + Sync {
    /// Reads `buf.len()` bytes at bus address `addr`.
    fn dma_read(&self, addr: BusAddr, buf: &mut [u8]) -> Result<(), DmaError>;
    /// Several reads, as a device with several read requests outstanding issues them: where
    /// a read is a message (memory across a fabric) they all go out before the first answer
    /// is awaited. Each is checked and translated as [`DmaPort::dma_read`]; fails (with the
    /// first error) if any fails, and then what was read into the buffers is unspecified.
    /// The default reads one after the other.
    fn dma_read_many(&self, reads: &mut [(BusAddr, &mut [u8])]) -> Result<(), DmaError> {
        for (addr, buf) in reads.iter_mut() {
            self.dma_read(*addr, buf)?;
        }
        Ok(())
    }
    /// Writes `data` at bus address `addr`.
    fn dma_write(&self, addr: BusAddr, data: &[u8]) -> Result<(), DmaError>;
    /// Zero-copy fast path: the memory behind `[addr, addr + len)` when it is one directly
    /// mapped span (`Ok(None)` when it must go through `dma_read`/`dma_write`). Permissions and
    /// bounds are checked as for a read or write.
    fn dma_span(&self, addr: BusAddr, len: u64, access: DmaAccess) -> DmaSpanResult;
}

/// Where a device's MSI-X messages go, after the device's own MSI-X table has applied enables
/// and masks.
pub trait InterruptSink: Send + Sync {
    /// Vector `vector` fired.
    fn signal(&self, vector: u16);
}

/// Part of a BAR that may be reached by plain loads and stores, so that whoever binds the
/// device (a local binding, a lender exporting it through an NTB window, a vfio-user server
/// mapping it into a guest) may take this fast path; going through [`PciDevice::bar_write`] is
/// always correct too. Two kinds:
///
/// - memory a device model polls (doorbell-style registers, as SPDK's vfio-user NVMe target
///   keeps them): after a store the writer wakes the device if it sleeps: when the 32-bit word
///   at `wake_word` (an offset in `mem`) is non-zero, set it to zero and `futex_wake` it (the
///   device sleeps while the word is 1, so a wake that came before its futex wait is not
///   lost);
/// - a real device's registers (`wake_word` `None`, `mem` [`SharedMemory::is_device`]): a BAR
///   mapped through VFIO, where the device itself sees every load and store.
#[derive(Clone, Debug)]
pub struct MemoryArea {
    /// Offset of the area in its BAR (page-aligned).
    pub offset: u64,
    /// The memory (its length is the area's length; page-granular).
    pub mem: MemSpan,
    /// Offset in `mem` of the device's sleep word; `None` for a real device's registers.
    pub wake_word: Option<u64>,
}

impl MemoryArea {
    /// Stores `data` at `offset` inside the area and wakes the device if it sleeps.
    pub fn write_and_wake(&self, offset: u64, data: &[u8]) -> Result<(), devlend_memory::MemError> {
        self.write(offset, data)?;
        self.wake()
    }

    /// Stores `data` at `offset` inside the area, without waking the device (the caller
    /// then runs the device's work itself, [`PciDevice::run_nonblocking`], or calls
    /// [`MemoryArea::wake`]).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), devlend_memory::MemError> {
        // Every store into shared memory is atomic, and an aligned register-sized store is a
        // single one, so a 32-bit doorbell lands whole (devlend_memory's copies).
        self.mem.write_at(offset, data)
    }

    /// Wakes the device after a [`MemoryArea::write`] if it sleeps or is about to (the sleep
    /// protocol of `devlend_memory::SleepWord`: the word is cleared before the wake, so a wake
    /// between the device's re-check and its futex wait is not lost). Registers need nothing:
    /// the device saw the store.
    pub fn wake(&self) -> Result<(), devlend_memory::MemError> {
        if let Some(wake_word) = self.wake_word {
            devlend_memory::SleepWord::new(self.mem.atomic_u32_at(wake_word)?).wake();
        }
        Ok(())
    }

    /// Whether this is a real device's registers (loads reach the device too), not memory a
    /// model polls.
    pub fn is_registers(&self) -> bool {
        self.wake_word.is_none()
    }
}

/// A device thread's wait for work on a lender whose fabric a thread reads (`tcp`): the wait
/// reads the link itself, so what the borrower sends wakes the device's thread with no other
/// thread in between (see `devlend_fabric::Doorbells::wait_reading`).
pub trait IdleWait: Send + Sync {
    /// Waits until `woken()` holds or `deadline` passes, parking in `park(d)` (at most `d`)
    /// while another thread reads the link. `false`, having waited for nothing, when it
    /// cannot (the link is down or reads itself): the caller sleeps its own way.
    fn idle_wait(
        &self,
        deadline: std::time::Instant,
        woken: &mut dyn FnMut() -> bool,
        park: &mut dyn FnMut(std::time::Duration),
    ) -> bool;
    /// A wake-up of the device's thread from this process (not over the link): a wait in
    /// progress that reads the link checks its `woken` now.
    fn interrupt(&self);
}

/// A PCIe function as the bus sees it: what a device model implements.
///
/// Accesses a driver controls cannot fail or panic here: like hardware, a bad read returns
/// all-ones and a bad write is dropped.
pub trait PciDevice: Send + Sync {
    /// Config read (offset below 4096, size 1/2/4).
    fn config_read(&self, offset: u16, size: AccessSize) -> u32;
    /// Config write.
    fn config_write(&self, offset: u16, size: AccessSize, value: u32);
    /// The BAR in slot `bar`, if that slot starts one.
    fn bar_spec(&self, bar: BarIndex) -> Option<BarSpec>;
    /// A read of `data.len()` bytes at `offset` in BAR `bar`.
    fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]);
    /// A write at `offset` in BAR `bar`.
    fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]);
    /// [`PciDevice::bar_write`] when that write cannot block: a plain store into device
    /// memory that takes no lock the device holds while it waits (a Controller Memory
    /// Buffer's data). Applies it and returns `true`; returns `false`, having done nothing,
    /// for every other write. A lender's socket reader applies such writes itself instead of
    /// handing them to another thread. The default takes nothing.
    fn bar_write_nonblocking(&self, bar: BarIndex, offset: u64, data: &[u8]) -> bool {
        let _ = (bar, offset, data);
        false
    }
    /// After a store into one of its [`MemoryArea`]s that the device polls (a doorbell,
    /// [`MemoryArea::write`]) found it asleep: runs the work the store asked for on the
    /// calling thread, when the device can do all of it without waiting (no read that is a
    /// round trip across a fabric, no lock another thread holds), and returns `true`. Returns
    /// `false`, having done nothing, otherwise, and when the device is awake anyway (it takes
    /// the store itself): the caller then wakes it ([`MemoryArea::wake`]). Run to
    /// completion: a lender's socket reader does a lone command's work itself instead of
    /// waking the device's thread for it. The default does nothing.
    fn run_nonblocking(&self) -> bool {
        false
    }
    /// How the device's thread waits while it has nothing to do, from now on (`None`: its
    /// own way, the default). A lender on a fabric that a thread must read (`tcp`) gives one
    /// that reads the link while it waits ([`IdleWait`]), so that the borrower's doorbell
    /// wakes the device's thread directly. A device without a thread of its own ignores it.
    fn set_idle_wait(&self, wait: Option<Arc<dyn IdleWait>>) {
        let _ = wait;
    }
    /// Function-level reset: config space and device state to power-on values.
    fn reset(&self);
    /// Number of MSI-X vectors.
    fn msix_vectors(&self) -> u16;
    /// The parts of BAR `bar` that are memory the device polls (see [`MemoryArea`]); none by
    /// default.
    fn bar_memory(&self, bar: BarIndex) -> Vec<MemoryArea> {
        let _ = bar;
        Vec::new()
    }
    /// Short name for logs ("nvme").
    fn kind(&self) -> &'static str;
    /// Storage capacity in bytes, for a device that has one (an NVMe namespace); `None`
    /// otherwise (the default).
    fn capacity_bytes(&self) -> Option<u64> {
        None
    }
    /// Whether the device's DMA bypasses its [`DmaPort`] (a real device behind a hardware
    /// IOMMU): then it can reach only memory mapped directly into this process (a [`MemSpan`]),
    /// never memory reached by messages, and whoever binds it must tell it each mapping with
    /// [`PciDevice::dma_map`]. A model's DMA goes through its port: `false`.
    fn needs_direct_dma(&self) -> bool {
        false
    }
    /// Lets MSI-X vector `v` reach whoever holds the device as a signal on `fds[v]`, with no
    /// thread of this process in between, while the vector may be delivered (MSI-X enabled, the
    /// function and the vector unmasked); a masked vector's message still latches its pending
    /// bit here and is signalled on `fds[v]` when unmasked. `None` takes every vector back to
    /// the [`InterruptSink`]. Returns whether the device did it: only a real device whose
    /// hardware signals eventfds can (the default: `false`, messages go to the sink).
    fn set_interrupt_fds(&self, fds: Option<&[Arc<EventFd>]>) -> bool {
        let _ = fds;
        false
    }
    /// The binding granted bus addresses `[iova, iova + mem.len())` onto `mem` (also mapped in
    /// the device's [`DmaPort`]). Only a device that [`PciDevice::needs_direct_dma`] acts on it
    /// (programming its hardware IOMMU); a model does nothing.
    fn dma_map(&self, iova: BusAddr, mem: &MemSpan, writable: bool) -> Result<(), DmaError> {
        let _ = (iova, mem, writable);
        Ok(())
    }
    /// The binding removed the grants that start inside `[iova, iova + len)`.
    fn dma_unmap(&self, iova: BusAddr, len: u64) -> Result<(), DmaError> {
        let _ = (iova, len);
        Ok(())
    }
}

#[cfg(test)]
#[path = "tests/robustness.rs"]
mod robustness;

#[cfg(test)]
#[path = "tests/support.rs"]
mod test_support;
