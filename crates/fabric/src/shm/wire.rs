//! Control-socket messages, parsed into typed values at the edge.
//!
//! Every message is 40 bytes, little-endian:
//! `tag u32 | a u32 | b u32 | c u32 | d u32 | e u32 | x u64 | y u64`.

use std::os::fd::OwnedFd;

use crate::{FabricError, Result};

/// Protocol version carried in `Hello`.
pub(super) const VERSION: u32 = 1;
pub(super) const LEN: usize = 40;

const HELLO: u32 = 1;
const TRANS_RAM: u32 = 2;
const TRANS_MMIO: u32 = 3;
const CLEAR: u32 = 4;
const TRANS_DEVICE: u32 = 5;
const INTERRUPT_FD: u32 = 6;

/// Doorbell bits a link may have (an interrupt descriptor names one of them).
const DOORBELL_BITS: u32 = 64;

/// Largest window size a peer may announce (a sanity bound; RAM windows are also checked
/// against the size of the descriptor they come with).
const MAX_WINDOW_BYTES: u64 = 1 << 40;

/// One control message.
#[derive(Debug)]
pub(super) enum Wire {
    /// First message on a connection, with the sender's control page.
    Hello {
        mw_count: u32,
        spad_count: u32,
        msg_count: u32,
        db_count: u32,
        page: OwnedFd,
    },
    /// The sender translated `window` onto `size` bytes of its RAM: `fd` from `fd_offset`.
    TransRam {
        window: u32,
        size: u64,
        fd: OwnedFd,
        fd_offset: u64,
    },
    /// The sender translated `window` onto `size` bytes of a real device's registers that it
    /// maps: `fd` (a VFIO device) from `fd_offset` (inside one of its BAR regions).
    TransDevice {
        window: u32,
        size: u64,
        fd: OwnedFd,
        fd_offset: u64,
    },
    /// The sender will signal `fd` (an eventfd) instead of ringing the receiver's doorbell bit
    /// `bit`: a device's MSI-X message carried straight to the receiver.
    /// `cookie` is opaque here (the lending layer's lease).
    InterruptFd { bit: u32, cookie: u64, fd: OwnedFd },
    /// The sender translated `window` onto `size` bytes of MMIO.
    TransMmio { window: u32, size: u64 },
    /// The sender cleared `window`.
    Clear { window: u32 },
}

fn put(buf: &mut [u8; LEN], at: usize, bytes: &[u8]) {
    if let Some(dst) = buf.get_mut(at..at + bytes.len()) {
        dst.copy_from_slice(bytes);
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(src) = buf.get(at..at + 4) {
        b.copy_from_slice(src);
    }
    u32::from_le_bytes(b)
}

fn u64_at(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    if let Some(src) = buf.get(at..at + 8) {
        b.copy_from_slice(src);
    }
    u64::from_le_bytes(b)
}

/// Encodes the fixed part of a message (descriptors travel beside it).
pub(super) fn encode(tag_fields: [u32; 6], x: u64, y: u64) -> [u8; LEN] {
    let mut buf = [0u8; LEN];
    for (i, v) in tag_fields.iter().enumerate() {
        put(&mut buf, 4 * i, &v.to_le_bytes());
    }
    put(&mut buf, 24, &x.to_le_bytes());
    put(&mut buf, 32, &y.to_le_bytes());
    buf
}

pub(super) fn hello(mw_count: u32, spad_count: u32, msg_count: u32, db_count: u32) -> [u8; LEN] {
    encode(
        [HELLO, VERSION, mw_count, spad_count, msg_count, db_count],
        0,
        0,
    )
}

pub(super) fn trans_ram(window: u32, size: u64, fd_offset: u64) -> [u8; LEN] {
    encode([TRANS_RAM, window, 0, 0, 0, 0], size, fd_offset)
}

pub(super) fn trans_device(window: u32, size: u64, fd_offset: u64) -> [u8; LEN] {
    encode([TRANS_DEVICE, window, 0, 0, 0, 0], size, fd_offset)
}

pub(super) fn interrupt_fd(bit: u32, cookie: u64) -> [u8; LEN] {
    encode([INTERRUPT_FD, bit, 0, 0, 0, 0], cookie, 0)
}

pub(super) fn trans_mmio(window: u32, size: u64) -> [u8; LEN] {
    encode([TRANS_MMIO, window, 0, 0, 0, 0], size, 0)
}

pub(super) fn clear(window: u32) -> [u8; LEN] {
    encode([CLEAR, window, 0, 0, 0, 0], 0, 0)
}

fn bad(why: impl Into<String>) -> FabricError {
    FabricError::Protocol(why.into())
}

/// Parses a received message and its descriptors.
pub(super) fn decode(buf: &[u8], mut fds: Vec<OwnedFd>) -> Result<Wire> {
    if buf.len() != LEN {
        return Err(bad(format!("control message of {} bytes", buf.len())));
    }
    let tag = u32_at(buf, 0);
    let a = u32_at(buf, 4);
    let x = u64_at(buf, 24);
    let want_fds = usize::from(matches!(
        tag,
        HELLO | TRANS_RAM | TRANS_DEVICE | INTERRUPT_FD
    ));
    if fds.len() != want_fds {
        return Err(bad(format!(
            "message {tag} came with {} descriptors",
            fds.len()
        )));
    }
    let size_ok = |size: u64| size > 0 && size <= MAX_WINDOW_BYTES;
    match (tag, fds.pop()) {
        (HELLO, Some(page)) => {
            if a != VERSION {
                return Err(bad(format!(
                    "peer speaks protocol version {a}, we speak {VERSION}"
                )));
            }
            Ok(Wire::Hello {
                mw_count: u32_at(buf, 8),
                spad_count: u32_at(buf, 12),
                msg_count: u32_at(buf, 16),
                db_count: u32_at(buf, 20),
                page,
            })
        }
        (TRANS_RAM, Some(fd)) if size_ok(x) => Ok(Wire::TransRam {
            window: a,
            size: x,
            fd,
            fd_offset: u64_at(buf, 32),
        }),
        (TRANS_DEVICE, Some(fd)) if size_ok(x) => Ok(Wire::TransDevice {
            window: a,
            size: x,
            fd,
            fd_offset: u64_at(buf, 32),
        }),
        (INTERRUPT_FD, Some(fd)) if a < DOORBELL_BITS => Ok(Wire::InterruptFd {
            bit: a,
            cookie: x,
            fd,
        }),
        (TRANS_MMIO, None) if size_ok(x) => Ok(Wire::TransMmio { window: a, size: x }),
        (CLEAR, None) => Ok(Wire::Clear { window: a }),
        _ => Err(bad(format!(
            "malformed control message (tag {tag}, size {x:#x})"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn some_fd() -> OwnedFd {
        let m = devlend_memory::SharedMemory::new("w", 4096).unwrap();
        m.fd().try_clone_to_owned().unwrap()
    }

    #[test]
    fn round_trips_and_rejects_malformed() {
        match decode(&trans_ram(3, 0x2000, 0x1000), vec![some_fd()]).unwrap() {
            Wire::TransRam {
                window,
                size,
                fd_offset,
                ..
            } => {
                assert_eq!((window, size, fd_offset), (3, 0x2000, 0x1000))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            decode(&trans_device(4, 0x1000, 1 << 40), vec![some_fd()]).unwrap(),
            Wire::TransDevice {
                window: 4,
                size: 0x1000,
                fd_offset: 0x100_0000_0000,
                ..
            }
        ));
        assert!(matches!(
            decode(&interrupt_fd(63, u64::MAX), vec![some_fd()]).unwrap(),
            Wire::InterruptFd {
                bit: 63,
                cookie: u64::MAX,
                ..
            }
        ));
        assert!(matches!(
            decode(&clear(2), vec![]).unwrap(),
            Wire::Clear { window: 2 }
        ));
        assert!(matches!(
            decode(&trans_mmio(1, 64), vec![]).unwrap(),
            Wire::TransMmio { .. }
        ));
        assert!(matches!(
            decode(&hello(8, 16, 8, 64), vec![some_fd()]).unwrap(),
            Wire::Hello { mw_count: 8, .. }
        ));
        let table: Vec<(Vec<u8>, usize)> = vec![
            (trans_ram(3, 0x2000, 0).to_vec(), 0),
            (trans_ram(3, 0, 0).to_vec(), 1),
            (trans_device(3, 0x1000, 0).to_vec(), 0),
            (trans_device(3, 0, 0).to_vec(), 1),
            (trans_mmio(1, u64::MAX).to_vec(), 0),
            (interrupt_fd(3, 0).to_vec(), 0),
            (interrupt_fd(3, 0).to_vec(), 2),
            (interrupt_fd(64, 0).to_vec(), 1),
            (interrupt_fd(u32::MAX, 0).to_vec(), 1),
            (clear(1).to_vec(), 1),
            (hello(1, 1, 1, 1).to_vec(), 0),
            (encode([HELLO, 99, 0, 0, 0, 0], 0, 0).to_vec(), 1),
            (encode([77, 0, 0, 0, 0, 0], 0, 0).to_vec(), 0),
            (vec![1, 2, 3], 0),
        ];
        for (msg, nfds) in table {
            let fds = (0..nfds).map(|_| some_fd()).collect();
            assert!(
                matches!(decode(&msg, fds), Err(FabricError::Protocol(_))),
                "{msg:?}"
            );
        }
    }
}
