//! The reader thread's view of the socket: an epoll instance holding the socket as a one-shot
//! event, so that a caller reading the socket itself can take it out of the reader thread's
//! sight (and put it back) without waking that thread. A reply then wakes nobody but the caller
//! that waits for it.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::Duration;

use rustix::buffer::spare_capacity;
use rustix::event::epoll::{self, CreateFlags, EventData, EventFlags};
use rustix::event::Timespec;

/// One socket watched by one epoll instance, one-shot.
pub(crate) struct Watch {
    epoll: OwnedFd,
    sock: RawFd,
}

impl Watch {
    /// Watches `sock` (which must outlive the watch), armed.
    pub(crate) fn new(sock: &impl AsRawFd) -> io::Result<Self> {
        let w = Self {
            epoll: epoll::create(CreateFlags::CLOEXEC)?,
            sock: sock.as_raw_fd(),
        };
        epoll::add(&w.epoll, w.sock(), EventData::new_u64(0), Self::ARMED)?;
        Ok(w)
    }

    const ARMED: EventFlags = EventFlags::IN
        .union(EventFlags::RDHUP)
        .union(EventFlags::ERR)
        .union(EventFlags::ONESHOT);

    /// The watched socket. The one `unsafe` here: the socket is held by the session that owns
    /// this watch (`Watch::new`'s contract), which `session.rs` keeps as a raw descriptor.
    fn sock(&self) -> BorrowedFd<'_> {
        // SAFETY: `new`'s caller keeps the socket open for as long as the watch lives, so the
        // descriptor is open for the borrow (which cannot outlive `self`).
        unsafe { BorrowedFd::borrow_raw(self.sock) }
    }

    /// Lets the next event (or one already pending) wake [`Watch::wait`], once.
    pub(crate) fn arm(&self) -> io::Result<()> {
        epoll::modify(&self.epoll, self.sock(), EventData::new_u64(0), Self::ARMED)?;
        Ok(())
    }

    /// Keeps events from waking [`Watch::wait`] until the next [`Watch::arm`].
    pub(crate) fn disarm(&self) -> io::Result<()> {
        epoll::modify(
            &self.epoll,
            self.sock(),
            EventData::new_u64(0),
            EventFlags::ONESHOT,
        )?;
        Ok(())
    }

    /// Waits up to `timeout` for an armed event; `true` if one fired (which disarms the watch).
    pub(crate) fn wait(&self, timeout: Duration) -> io::Result<bool> {
        // At least a millisecond, as epoll_wait's millisecond timeout had it.
        let timeout = timeout.max(Duration::from_millis(1));
        let wait = Timespec {
            tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(timeout.subsec_nanos()),
        };
        let mut events = Vec::with_capacity(1);
        loop {
            match epoll::wait(&self.epoll, spare_capacity(&mut events), Some(&wait)) {
                Ok(n) => return Ok(n > 0),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
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
