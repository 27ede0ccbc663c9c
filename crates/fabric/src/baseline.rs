//! Raw OS primitives for benchmark baselines: what a doorbell costs without the fabric.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::{FabricError, Result};

/// A bare eventfd, for a raw cross-process ping-pong to compare doorbells against.
#[derive(Debug)]
pub struct RawEventFd(OwnedFd);

impl RawEventFd {
    /// A new eventfd that a child process inherits across `exec` (no `CLOEXEC`); pass
    /// [`RawEventFd::raw`] to the child on its command line.
    pub fn new_inheritable() -> Result<Self> {
        // SAFETY: plain eventfd(2) call, no pointers.
        let raw = unsafe { libc::eventfd(0, 0) };
        if raw < 0 {
            return Err(FabricError::io("eventfd", std::io::Error::last_os_error()));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(raw) }))
    }

    /// Takes ownership of an eventfd inherited from the parent.
    ///
    /// # Safety
    /// `fd` must be an open descriptor that nothing else in this process owns or closes.
    pub unsafe fn from_inherited(fd: RawFd) -> Result<Self> {
        // SAFETY: F_GETFD only inspects the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(FabricError::io(
                format!("inherited fd {fd}"),
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: the caller guarantees exclusive ownership of the open descriptor `fd`.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// The descriptor number.
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Adds one to the counter (wakes a reader).
    pub fn signal(&self) -> Result<()> {
        let one = 1u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live buffer to a valid eventfd.
        let n = unsafe { libc::write(self.raw(), one.as_ptr().cast(), 8) };
        if n != 8 {
            return Err(FabricError::io(
                "eventfd write",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Blocks until the counter is non-zero and takes it.
    pub fn wait(&self) -> Result<u64> {
        let mut buf = [0u8; 8];
        loop {
            // SAFETY: reads at most 8 bytes into a live buffer from a valid eventfd.
            let n = unsafe { libc::read(self.raw(), buf.as_mut_ptr().cast(), 8) };
            if n == 8 {
                return Ok(u64::from_ne_bytes(buf));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(FabricError::io("eventfd read", e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_then_wait() {
        let e = RawEventFd::new_inheritable().unwrap();
        e.signal().unwrap();
        e.signal().unwrap();
        assert_eq!(e.wait().unwrap(), 2);
        // SAFETY: -1 is never open; the call must fail without taking anything.
        assert!(unsafe { RawEventFd::from_inherited(-1) }.is_err());
    }
}
