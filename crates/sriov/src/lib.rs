//! SR-IOV on a real device: enabling a physical function's virtual functions so each can be
//! bound to `vfio-pci` and lent to its own borrower.
//!
//! For NVMe ([`nvme`]), a VF is a *secondary controller* that starts offline with no queues
//! or interrupts; the primary controller (the PF, left on Linux's `nvme` driver) gives it
//! resources and sets it online with Virtualization Management commands ([`admin`]), sent
//! through the kernel's admin passthrough ioctl on `/dev/nvmeN`.
#![warn(missing_docs)]

pub mod admin;
mod ioctl;
pub mod nvme;

pub use ioctl::NvmeCharDev;
pub use nvme::{bring_online, Plan, SriovError, SysfsPf, VfReport};
