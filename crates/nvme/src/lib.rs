//! An NVMe controller device model (NVMe base specification 1.4, the subset Linux's `nvme`
//! driver uses plus what a careful driver expects), backed by a raw image file, behind a PCIe
//! function.
//!
//! - [`NvmeDevice`] implements [`devlend_pci::PciDevice`]: type 0 config space (class
//!   01:08:02, PCI Express with FLR, MSI-X, PM), BAR0 = registers + doorbells (64-bit, 16 KiB,
//!   DSTRD 0), BAR4 = MSI-X table (offset 0) and PBA (offset 0x1000), and with
//!   [`NvmeConfig::cmb_bytes`] BAR2 = a Controller Memory Buffer ([`cmb`]).
//! - Commands run on the device's own worker thread, woken by doorbell writes, with bounded
//!   adaptive polling; shadow doorbells (Doorbell Buffer Config) keep most doorbell writes off
//!   a trapped path.
//! - The untrusted-input parsers are pure and fuzzed: [`Command::parse`], [`AdminOp::parse`],
//!   [`NvmOp::parse`] and the PRP walker [`prp::walk`].
//!
//! Module map: [`regs`] (register layout), [`command`] (entries and typed commands),
//! [`status`] (status codes), [`prp`] (PRP walker), `queues`, `controller` (transitions,
//! fetch, completion), `doorbells` (MMIO and shadow doorbells), `interrupts` (MSI-X,
//! coalescing, asynchronous events), `admin`, `io` (the namespace), [`identify`], `transfer`
//! (data movement), `inflight` (NVM commands run off the worker when DMA is a message), `readahead` (a
//! burst's write data read in one batch when DMA is a message),
//! `device` (PCI function, worker and pool threads).
#![warn(missing_docs)]

mod admin;
mod burst;
pub mod cmb;
pub mod command;
mod config;
mod controller;
mod device;
mod doorbells;
mod error;
#[doc(hidden)]
#[cfg(any(test, feature = "fuzzing"))]
pub mod fuzzing;
pub mod identify;
mod inflight;
mod interrupts;
mod io;
pub mod prp;
mod queues;
mod readahead;
pub mod regs;
pub mod status;
mod transfer;
pub mod virt;

pub use admin::{fid, lid};
pub use cmb::CMB_BAR;
pub use command::{AdminOp, Command, Completion, NvmOp};
pub use config::{
    BlockSize, NvmeConfig, DEFAULT_IO_WORKERS, DEFAULT_POLL_SPIN, DEFAULT_POLL_SPIN_MAX,
};
pub use device::{
    NvmeDevice, NvmeStats, MSIX_BAR, MSIX_BAR_SIZE, MSIX_PBA_OFFSET, PCI_CLASS_NVME, PCI_DEVICE_ID,
    PCI_VENDOR_ID, PCI_VF_DEVICE_ID, REGISTER_BAR,
};
pub use error::NvmeError;
pub use io::{NSID, NSID_BROADCAST};
pub use status::Status;
pub use virt::{SriovConfig, VfNamespaces};
