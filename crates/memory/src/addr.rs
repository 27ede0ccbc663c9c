//! Addresses and ranges that cannot overflow once constructed.

use std::fmt;

/// An address on a host's PCIe bus (the host physical / IO-virtual address space).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BusAddr(pub u64);

impl BusAddr {
    /// The raw address.
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// `self + offset`, or `None` on overflow.
    pub fn checked_add(self, offset: u64) -> Option<BusAddr> {
        self.0.checked_add(offset).map(BusAddr)
    }

    /// `self - base`, or `None` when `self` lies below `base`.
    pub fn offset_from(self, base: BusAddr) -> Option<u64> {
        self.0.checked_sub(base.0)
    }

    /// Whether the address is a multiple of `align` (which must be a power of two; zero and
    /// non-powers of two are never aligned).
    pub fn is_aligned(self, align: u64) -> bool {
        align.is_power_of_two() && self.0 & (align - 1) == 0
    }
}

impl fmt::Display for BusAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Why a [`ByteRange`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// A range must hold at least one byte.
    #[error("a range of zero bytes at {start:#x} is not allowed")]
    Empty {
        /// Where the empty range was asked to start.
        start: u64,
    },
    /// `start + len` does not fit in 64 bits.
    #[error("range {start:#x} + {len:#x} overflows the 64-bit address space")]
    Overflow {
        /// Start of the rejected range.
        start: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// A non-empty range of bytes `[start, start + len)` whose end is known not to overflow.
///
/// The last byte is `start + len - 1 <= u64::MAX`, so `end_inclusive` never wraps; `end()` is
/// `None` only for a range that reaches the very top of the address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ByteRange {
    start: u64,
    len: u64,
}

impl ByteRange {
    /// A range of `len` bytes from `start`; rejects `len == 0` and ranges past `u64::MAX`.
    pub fn new(start: u64, len: u64) -> Result<Self, RangeError> {
        if len == 0 {
            return Err(RangeError::Empty { start });
        }
        if start.checked_add(len - 1).is_none() {
            return Err(RangeError::Overflow { start, len });
        }
        Ok(Self { start, len })
    }

    /// First byte.
    pub const fn start(&self) -> u64 {
        self.start
    }

    /// Number of bytes (never zero).
    #[allow(clippy::len_without_is_empty)]
    pub const fn len(&self) -> u64 {
        self.len
    }

    /// Last byte (inclusive); cannot overflow by construction.
    pub const fn end_inclusive(&self) -> u64 {
        self.start + (self.len - 1)
    }

    /// One past the last byte, or `None` when the range ends at `u64::MAX`.
    pub fn end(&self) -> Option<u64> {
        self.start.checked_add(self.len)
    }

    /// Whether `[addr, addr + len)` lies wholly inside this range (`len == 0` is never inside).
    pub fn contains_range(&self, addr: u64, len: u64) -> bool {
        match ByteRange::new(addr, len) {
            Ok(other) => other.start >= self.start && other.end_inclusive() <= self.end_inclusive(),
            Err(_) => false,
        }
    }

    /// Whether the two ranges share at least one byte.
    pub fn overlaps(&self, other: &ByteRange) -> bool {
        self.start <= other.end_inclusive() && other.start <= self.end_inclusive()
    }

    /// Offset of `[addr, addr + len)` from this range's start, when it lies wholly inside.
    pub fn offset_of(&self, addr: u64, len: u64) -> Option<u64> {
        self.contains_range(addr, len).then(|| addr - self.start)
    }
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}..={:#x}]", self.start, self.end_inclusive())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_empty_and_overflow() {
        assert_eq!(ByteRange::new(5, 0), Err(RangeError::Empty { start: 5 }));
        assert!(matches!(
            ByteRange::new(u64::MAX, 2),
            Err(RangeError::Overflow { .. })
        ));
        let top = ByteRange::new(u64::MAX, 1).unwrap();
        assert_eq!(top.end(), None);
        assert_eq!(top.end_inclusive(), u64::MAX);
    }

    #[test]
    fn containment_and_overlap() {
        let r = ByteRange::new(0x1000, 0x1000).unwrap();
        assert!(r.contains_range(0x1000, 0x1000));
        assert!(r.contains_range(0x1ff8, 8));
        assert!(!r.contains_range(0x1ff8, 9));
        assert!(!r.contains_range(0xfff, 2));
        assert!(!r.contains_range(0x1000, 0));
        assert!(!r.contains_range(u64::MAX, 2));
        assert_eq!(r.offset_of(0x1800, 4), Some(0x800));
        assert!(r.overlaps(&ByteRange::new(0x1fff, 1).unwrap()));
        assert!(!r.overlaps(&ByteRange::new(0x2000, 1).unwrap()));
    }

    #[test]
    fn bus_addr_arithmetic() {
        assert_eq!(BusAddr(u64::MAX).checked_add(1), None);
        assert_eq!(BusAddr(0x10).offset_from(BusAddr(0x20)), None);
        assert_eq!(BusAddr(0x30).offset_from(BusAddr(0x20)), Some(0x10));
        assert!(BusAddr(0x2000).is_aligned(0x1000));
        assert!(!BusAddr(0x2000).is_aligned(0));
        assert!(!BusAddr(0x2000).is_aligned(3));
    }
}
