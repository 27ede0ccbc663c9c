//! A real PCIe function as a [`PciDevice`], through Linux VFIO.
//!
//! The lender binds a function to `vfio-pci` and lends it like any device model: the lending
//! layer above the [`PciDevice`] seam does not change. What the backend does with each kind of
//! traffic:
//!
//! | traffic | path |
//! |---|---|
//! | config reads/writes | VFIO's config region (`pread`/`pwrite`), so VFIO's own virtualisation of BARs and MSI-X stays in force; MSI-X Enable and Function Mask are kept here (the kernel owns the real ones through `VFIO_DEVICE_SET_IRQS`) |
//! | BAR MMIO | the BAR's VFIO region, `mmap`ed where the region allows it (volatile loads and stores), `pread`/`pwrite` elsewhere |
//! | MSI-X | the table and PBA are emulated here ([`MsixTable`]); each vector is an eventfd given to `VFIO_DEVICE_SET_IRQS`, and a thread turns a fired eventfd into a message through the table, which honours the vector's and the function's masks; or, while deliverable, the holder's own eventfd ([`PciDevice::set_interrupt_fds`]), which VFIO signals with no thread here |
//! | DMA | the device reaches memory through the hardware IOMMU only: each grant the binding makes ([`PciDevice::dma_map`]) becomes `VFIO_IOMMU_MAP_DMA` of that memory at the bus address the borrower's driver uses; unmapped when the grant or the lease ends |
//! | reset | `VFIO_DEVICE_RESET` (FLR or what the kernel has for the function) |
//!
//! The kernel is reached through one narrow trait, [`VfioHw`]: [`KernelVfio`] implements it
//! with rust-vmm's `vfio-ioctls` (and `vfio-bindings` for the calls whose result that crate
//! drops), tests implement it with a mock. [`sysfs`] finds and binds functions.
//!
//! [`PciDevice`]: devlend_pci::PciDevice
//! [`PciDevice::dma_map`]: devlend_pci::PciDevice::dma_map
//! [`PciDevice::set_interrupt_fds`]: devlend_pci::PciDevice::set_interrupt_fds
//! [`MsixTable`]: devlend_pci::MsixTable
#![warn(missing_docs)]

mod device;
mod dma;
mod hw;
mod irq;
mod kernel;
pub mod layout;
pub mod sysfs;

pub use device::VfioFunction;
pub use dma::DmaMaps;
pub use hw::{BarMapping, RegionInfo, VfioHw};
pub use kernel::KernelVfio;
pub use sysfs::{Bdf, PciSysfs};

/// What went wrong with a VFIO function.
#[derive(Debug, thiserror::Error)]
pub enum VfioError {
    /// A VFIO object could not be opened or set up.
    #[error("{what}: {source}")]
    Open {
        /// What was being opened.
        what: String,
        /// The kernel's (or vfio-ioctls') answer.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A system call on the device or container failed.
    #[error("{op}: {source}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A DMA mapping request is malformed or collides with another.
    #[error("DMA mapping {iova:#x} + {len:#x}: {why}")]
    BadDma {
        /// Bus address.
        iova: u64,
        /// Length.
        len: u64,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The function has no region with this index (or it is empty).
    #[error("VFIO region {0} does not exist")]
    NoRegion(u32),
    /// The function cannot be reset through VFIO.
    #[error("the function cannot be reset: {0}")]
    Reset(String),
    /// The function's config space is not what a PCI function's is.
    #[error("config space: {0}")]
    Config(String),
    /// Sysfs lookup or binding failed.
    #[error(transparent)]
    Sysfs(#[from] sysfs::SysfsError),
}

impl VfioError {
    fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| Self::Io { op, source }
    }
}
