//! What the NVMe base specification 1.4 defines, declared once for the controller model
//! (`devlend-nvme`), our driver (`devlend-nvme-driver`) and `devlend-sriov`, none of which may
//! depend on another: the controller registers' offsets in BAR0 and their field layouts
//! ([`regs`]), and command opcodes ([`opcode`]).
//!
//! Only the specification's values live here, never a model's or a driver's choices (what a
//! controller reports in CAP, which page size a driver picks): those stay in their crates.

#![no_std]
#![warn(missing_docs)]

pub mod opcode;
pub mod regs;
