//! A user-space NVMe driver written only against [`devlend_pci::PciFunction`].
//!
//! It knows nothing about lending: the same code drives a function bound in-process and one
//! borrowed across the NTB fabric.
//!
//! - [`Controller`]: bring-up per the NVMe base specification (CAP.TO-bounded waits, admin
//!   queue, MSI-X, Identify, Number of Queues, I/O queue pairs), a block API
//!   ([`Controller::read_at`], [`Controller::write_at`], [`Controller::flush`]) with PRP lists
//!   and MDTS splitting, a queue-depth API ([`Controller::io_queue`] → [`IoQueue`]), and
//!   shutdown. With [`DriverConfig::cmb_submission_queues`] the I/O submission queues go into
//!   the controller's memory buffer ([`cmb`]).
//! - [`workload`]: the benchmark runner (random reads or writes at a queue depth → IOPS and
//!   latency percentiles), shared by `devlend bench nvme` and the lending benchmark.
//! - [`suite`]: the acceptance suite, run against any function that presents an NVMe
//!   controller (local or borrowed).
//!
//! Every wait is bounded (CAP.TO for enable/disable, configured timeouts for commands and
//! shutdown) and ends early with an error when the controller reports a fatal status or the
//! function is removed.
//!
//! ```no_run
//! # fn demo(fun: std::sync::Arc<dyn devlend_pci::PciFunction>) -> Result<(), devlend_nvme_driver::NvmeError> {
//! use devlend_nvme_driver::Controller;
//! let ctrl = Controller::new(fun)?;
//! ctrl.write_at(4096, b"hello")?;
//! ctrl.flush()?;
//! let mut back = [0u8; 5];
//! ctrl.read_at(4096, &mut back)?;
//! # Ok(()) }
//! ```
#![warn(missing_docs)]

pub mod cmb;
pub mod cmd;
mod controller;
mod error;
pub mod identify;
pub mod prp;
mod queue;
pub mod regs;
pub mod suite;
pub mod workload;

pub use cmb::CmbInfo;
pub use cmd::Status;
pub use controller::{
    Controller, DriverConfig, InterruptCoalescing, IoQueue, IoRequest, CMB_BULK_BUFFERS,
    CMB_BULK_BYTES, CMB_LIST_PAGES,
};
pub use error::NvmeError;
pub use queue::{Completion, CompletionMode, DmaSlice};
