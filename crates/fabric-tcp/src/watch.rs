//! The reader thread's view of the socket: an epoll instance holding the socket as a one-shot
//! event, so that a caller reading the socket itself can take it out of the reader thread's
//! sight (and put it back) without waking that thread. A reply then wakes nobody but the caller
//! that waits for it.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// One socket watched by one epoll instance, one-shot.
pub(crate) struct Watch {
    epoll: OwnedFd,
    sock: RawFd,
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl Watch {
    /// Watches `sock` (which must outlive the watch), armed.
    pub(crate) fn new(sock: &impl AsRawFd) -> io::Result<Self> {
        // SAFETY: a plain system call without pointers.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let w = Self {
            epoll,
            sock: sock.as_raw_fd(),
        };
        w.ctl(libc::EPOLL_CTL_ADD, Self::ARMED)?;
        Ok(w)
    }

    const ARMED: u32 =
        (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLONESHOT) as u32;

    fn ctl(&self, op: libc::c_int, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: 0 };
        // SAFETY: `ev` is a valid epoll_event for the whole call; both descriptors are open.
        check(unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), op, self.sock, &mut ev) })?;
        Ok(())
    }

    /// Lets the next event (or one already pending) wake [`Watch::wait`], once.
    pub(crate) fn arm(&self) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, Self::ARMED)
    }

    /// Keeps events from waking [`Watch::wait`] until the next [`Watch::arm`].
    pub(crate) fn disarm(&self) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, libc::EPOLLONESHOT as u32)
    }

    /// Waits up to `timeout` for an armed event; `true` if one fired (which disarms the watch).
    pub(crate) fn wait(&self, timeout: Duration) -> io::Result<bool> {
        let ms = libc::c_int::try_from(timeout.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        loop {
            // SAFETY: `ev` is valid for one event for the whole call.
            let r = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), &mut ev, 1, ms) };
            if r >= 0 {
                return Ok(r > 0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_disarmed_watch_sleeps_through_data_and_wakes_once_rearmed() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let w = Watch::new(&b).unwrap();
        assert!(!w.wait(Duration::from_millis(1)).unwrap());
        w.disarm().unwrap();
        a.write_all(b"x").unwrap();
        assert!(!w.wait(Duration::from_millis(20)).unwrap());
        w.arm().unwrap();
        assert!(w.wait(Duration::from_secs(5)).unwrap());
        // One-shot: the same pending byte does not fire again until re-armed.
        assert!(!w.wait(Duration::from_millis(1)).unwrap());
        w.arm().unwrap();
        assert!(w.wait(Duration::from_secs(5)).unwrap());
    }
}
