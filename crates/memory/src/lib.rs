//! Bus addresses, checked byte ranges and shared-memory mappings.
//!
//! Every devlend layer speaks in these types: the fabric translates windows onto [`BusAddr`]
//! ranges, the PCI layer's IOMMU maps device bus addresses onto [`MemSpan`]s, and RAM that must be
//! reachable from another process lives in a [`SharedMemory`] (a memfd, mapped `MAP_SHARED`).
//!
//! Memory that another process or a device model may write at any moment is never exposed as a
//! Rust reference (`&[u8]`): every access copies through raw pointers or uses atomics.
#![warn(missing_docs)]

mod addr;
mod copy;
mod shared;

pub use addr::{BusAddr, ByteRange, RangeError};
pub use shared::{
    check_mappable, file_info, futex_wait, futex_wake, FileInfo, MemError, MemSpan, SharedMemory,
    SleepWord, Slept,
};
