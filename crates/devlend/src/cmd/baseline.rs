//! Raw OS primitives for the benchmarks' baselines: what a doorbell costs without the fabric.

use std::os::fd::{AsRawFd, FromRawFd, RawFd};

use vmm_sys_util::eventfd::EventFd;

/// A bare eventfd, for a raw cross-process ping-pong to compare doorbells against.
#[derive(Debug)]
pub struct RawEventFd(EventFd);

impl RawEventFd {
    /// A new eventfd that a child process inherits across `exec` (no `CLOEXEC`); pass
    /// [`RawEventFd::raw`] to the child on its command line.
    pub fn new_inheritable() -> std::io::Result<Self> {
        EventFd::new(0).map(Self)
    }

    /// Takes ownership of an eventfd inherited from the parent.
    ///
    /// # Safety
    /// `fd` must be an open descriptor that nothing else in this process owns or closes.
    pub unsafe fn from_inherited(fd: RawFd) -> std::io::Result<Self> {
        // SAFETY: F_GETFD only inspects the descriptor table (no safe call takes a bare number).
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("inherited fd {fd}: {e}"),
            ));
        }
        // SAFETY: the caller guarantees exclusive ownership of the open descriptor `fd`.
        Ok(Self(unsafe { EventFd::from_raw_fd(fd) }))
    }

    /// The descriptor number.
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    /// Adds one to the counter (wakes a reader).
    pub fn signal(&self) -> std::io::Result<()> {
        self.0.write(1)
    }

    /// Blocks until the counter is non-zero and takes it.
    pub fn wait(&self) -> std::io::Result<u64> {
        loop {
            match self.0.read() {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => return r,
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
