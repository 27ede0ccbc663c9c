//! What the NVMe base specification 1.4 defines, declared once for the controller model
//! (`devlend-nvme`) and our driver (`devlend-nvme-driver`), which must not depend on each other:
//! the controller registers' offsets in BAR0 and their field layouts ([`regs`]).
//!
//! Only the specification's values live here, never a model's or a driver's choices (what a
//! controller reports in CAP, which page size a driver picks): those stay in their crates.

#![no_std]
#![warn(missing_docs)]

pub mod regs;
