//! Presenting an MSI-X function to the client as a single-vector MSI function.
//!
//! Why: QEMU 11.1's `vfio-user-pci` aborts when a device *with MSI-X* is finalized after a
//! hot-unplug (its PBA region is removed from a BAR region that was already torn down:
//! `memory_region_del_subregion: Assertion 'subregion->container == mr' failed`). A device
//! that shows MSI instead never takes that path, so it can be hot-unplugged from a running
//! guest. The guest's driver then uses one vector (Linux's nvme driver shares it between the
//! admin and I/O queues).
//!
//! How: the 12 bytes of the function's MSI-X capability read as a 32-bit MSI capability without
//! per-vector masking (`id 0x05`, the same next pointer, one vector); the client's writes to it
//! stay here. When the client gives the MSI vector an eventfd, the server enables MSI-X in the
//! function itself and routes its vector 0 there.

use devlend_pci::config::cap;

/// Length of the window (an MSI-X capability's size; a 32-bit MSI capability needs 10 bytes).
pub const CAP_BYTES: u16 = devlend_pci::config::msix::LEN;

/// Bits the client may change, per byte of the window: MSI Enable; Message Address (dword
/// aligned); Message Data.
const WRITABLE: [u8; CAP_BYTES as usize] =
    [0, 0, 0x01, 0, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0];

/// The virtual MSI capability that replaces the function's MSI-X capability.
#[derive(Clone, Debug)]
pub struct MsiCap {
    offset: u16,
    bytes: [u8; CAP_BYTES as usize],
}

impl MsiCap {
    /// A capability at `offset` (where the MSI-X one is) linking to `next`.
    pub fn new(offset: u16, next: u8) -> Self {
        let mut bytes = [0u8; CAP_BYTES as usize];
        bytes[usize::from(cap::ID)] = cap::ID_MSI;
        bytes[usize::from(cap::NEXT)] = next;
        Self { offset, bytes }
    }

    /// The byte at config offset `off`, when it lies in the window.
    pub fn byte(&self, off: u64) -> Option<u8> {
        let i = off.checked_sub(u64::from(self.offset))?;
        self.bytes.get(usize::try_from(i).ok()?).copied()
    }

    /// Whether config offset `off` lies in the window.
    pub fn covers(&self, off: u64) -> bool {
        self.byte(off).is_some()
    }

    /// Applies the client's write of `value` at config offset `off` (writable bits only).
    pub fn write_byte(&mut self, off: u64, value: u8) {
        let Some(i) = off
            .checked_sub(u64::from(self.offset))
            .and_then(|i| usize::try_from(i).ok())
        else {
            return;
        };
        if let (Some(b), Some(m)) = (self.bytes.get_mut(i), WRITABLE.get(i)) {
            *b = (*b & !m) | (value & m);
        }
    }

    /// Whether the client set MSI Enable.
    #[cfg(test)]
    pub fn enabled(&self) -> bool {
        self.bytes[2] & 1 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_as_single_vector_msi_and_keeps_writes_in_their_bits() {
        let mut c = MsiCap::new(0x70, 0x80);
        assert_eq!(c.byte(0x70), Some(0x05));
        assert_eq!(c.byte(0x71), Some(0x80));
        // Message Control: one vector, 32-bit, no masking, disabled.
        assert_eq!(c.byte(0x72), Some(0));
        assert_eq!(c.byte(0x73), Some(0));
        assert_eq!(c.byte(0x6f), None);
        assert_eq!(c.byte(0x7c), None);
        for (i, v) in [0xffu8, 0xff, 0xff, 0xff].iter().enumerate() {
            c.write_byte(0x72 + i as u64, *v);
        }
        // Only Enable sticks; the id, next pointer and the capability's shape do not change.
        assert_eq!((c.byte(0x72), c.byte(0x73)), (Some(1), Some(0)));
        assert!(c.enabled());
        c.write_byte(0x70, 0x11);
        c.write_byte(0x71, 0);
        assert_eq!((c.byte(0x70), c.byte(0x71)), (Some(0x05), Some(0x80)));
        for (i, v) in [0x0fu8, 0x10, 0xe0, 0xfe, 0x41, 0x00].iter().enumerate() {
            c.write_byte(0x74 + i as u64, *v);
        }
        assert_eq!(c.byte(0x74), Some(0x0c));
        assert_eq!(c.byte(0x77), Some(0xfe));
        assert_eq!(c.byte(0x78), Some(0x41));
        c.write_byte(0x7a, 0xff);
        assert_eq!(c.byte(0x7a), Some(0));
    }
}
