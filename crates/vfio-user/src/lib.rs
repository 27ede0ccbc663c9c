//! A vfio-user server that serves any [`devlend_pci::PciFunction`] (a local device model or a
//! borrowed function) to a VMM such as QEMU's `vfio-user-pci` client.
//!
//! - [`wire`]: the message format, parsed into typed values at the edge ([`wire::parse_request`]
//!   never panics; `fuzz/` checks that).
//! - [`conn`]: whole messages (with their `SCM_RIGHTS` descriptors) off a UNIX stream socket.
//! - [`Server`]: one client at a time. Guest RAM arrives as memfds with `DMA_MAP`; they are
//!   mapped here and handed to the function with [`devlend_pci::DmaRemap::dma_map`], so device
//!   DMA lands in guest RAM with no copy. MSI-X vectors are routed straight to the client's
//!   eventfds with [`devlend_pci::Interrupts::set_interrupt_eventfd`]. A client that leaves
//!   (cleanly or not) gets the device reset, its routes removed and its DMA unmapped.
//!
//! Doorbells are trapped: every BAR write is a `REGION_WRITE` message, which QEMU posts (no
//! reply, the vCPU does not wait) as long as no region is mmap-able.
#![warn(missing_docs)]
#![cfg(target_endian = "little")]

pub mod conn;
mod error;
mod layout;
mod msi;
mod server;
pub mod wire;

pub use error::{RequestError, ServerError, WireError};
pub use layout::{BarInfo, DeviceLayout, MsixInfo};
pub use server::{irq, region, Disconnect, Server, Stats, StatsSnapshot};
