//! Shared-memory backend: two OS processes on one machine, rendezvousing through a directory.
//!
//! ## Rendezvous
//! The directory holds `lock` and `sock`. Whoever holds `flock(lock, LOCK_EX)` listens on the
//! UNIX socket `sock` (unlinking a stale one left by a crashed run first); the other side
//! connects to it. A killed process loses its lock with its descriptors, so a stale directory
//! never wedges the next run, and when the listener dies the survivor takes the lock over and
//! listens itself. One peer is served at a time; later connections wait in the backlog.
//!
//! ## The control socket
//! `SOCK_SEQPACKET` carries a `Hello` with each side's fresh control page (a sealed memfd, see
//! `page`), then window announcements: a RAM translation carries the RAM region's memfd so the
//! peer maps exactly the translated range (zero copy); an MMIO translation only its size.
//! End of stream is link down, immediately: the kernel closes a `kill -9`'d process's socket,
//! and every waiter on this side (doorbells, messages, read completions, `wait_link`) returns
//! [`FabricError::LinkDown`]. The background thread then rendezvouses again, and the next peer
//! brings the link up with `link_generation` advanced and this side's translations re-announced.
//!
//! ## Trust
//! Everything read from the socket and the peer's page is validated. What cannot be enforced:
//! the peer could shrink the memfd of a RAM region it exported (our RAM regions are not
//! sealed by `devlend-memory`), which would fault our accesses through that window; a peer that
//! keeps a RAM mapping after `mw_clear_trans` still reaches that memory, as mappings cannot be
//! revoked. MMIO windows are enforced on the owning side for every access. A device window's
//! descriptor is checked to be a VFIO device whose region holds the range before it is mapped;
//! beyond the mapping, that descriptor gives its holder VFIO's other calls on the device
//! (config, reset, interrupts) too, which an NTB window would not; and a lender that turns off
//! the device's memory decoding makes the borrower's next access fault (VFIO's mapping raises
//! SIGBUS), where a hardware NTB would complete it with all-ones.
//!
//! ## Threads
//! `ShmNtb::open` starts one rendezvous thread, owned by the returned `ShmNtb` and joined when it
//! drops; it runs the socket reader of the current connection. Each connection also has the
//! ring service thread of the shared `endpoint` core.

mod socket;
mod vfio;
mod wire;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devlend_memory::{MemSpan, SharedMemory};
use rustix::fs::FlockOperation;
use vmm_sys_util::eventfd::EventFd;

use crate::endpoint::{
    delegate_ntb, Announce, Endpoint, LocalWindow, PagePair, PeerCounts, PeerWindow,
};
use crate::page::{self, ControlPage};
use crate::{AddressSpace, FabricError, LinkConfig, Resolved, Result};
use devlend_sync::lock;

/// How often blocked background calls look at the shutdown flag, and how long a connector
/// waits before retrying a rendezvous.
const POLL: Duration = Duration::from_millis(50);
const RETRY: Duration = Duration::from_millis(10);
/// How long a control message may wait for room in the socket before the connection is
/// considered wedged.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends window announcements over the connection.
struct SocketAnnounce(Arc<OwnedFd>);

impl Announce for SocketAnnounce {
    fn announce(&self, window: usize, what: Option<&LocalWindow>) -> Result<()> {
        let w = u32::try_from(window).map_err(|_| FabricError::Protocol("window index".into()))?;
        let sock = self.0.as_fd();
        match what {
            None => socket::send(sock, &wire::clear(w), None),
            Some(LocalWindow {
                size,
                target: Resolved::Mmio(..),
            }) => socket::send(sock, &wire::trans_mmio(w, *size), None),
            Some(LocalWindow {
                size,
                target: Resolved::Ram(span),
            }) => {
                let (mem, offset) = span.memory();
                let fd_offset = mem
                    .fd_offset()
                    .checked_add(offset)
                    .ok_or_else(|| FabricError::Protocol("RAM window offset overflows".into()))?;
                let msg = if mem.is_device() {
                    wire::trans_device(w, *size, fd_offset)
                } else {
                    wire::trans_ram(w, *size, fd_offset)
                };
                socket::send(sock, &msg, Some(mem.fd()))
            }
        }
    }
}

/// State shared by the handle and its rendezvous thread.
struct Shared {
    ep: Arc<Endpoint>,
    dir: PathBuf,
    shutdown: AtomicBool,
    /// The current connection, so that dropping the handle can cut it.
    conn: Mutex<Option<Arc<OwnedFd>>>,
    /// Eventfds the current peer gave for our doorbell bits, with their cookies, until taken.
    interrupt_fds: Mutex<HashMap<u32, (u64, EventFd)>>,
}

/// One side of a shared-memory link (see the module docs).
pub struct ShmNtb {
    ep: Arc<Endpoint>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

delegate_ntb!(ShmNtb, "shm", {
    fn carries_interrupt_fds(&self) -> bool {
        true
    }

    fn give_interrupt_fd(&self, bit: u32, cookie: u64, fd: &EventFd) -> Result<bool> {
        let conn = lock(&self.shared.conn)
            .clone()
            .ok_or(FabricError::LinkDown)?;
        // SAFETY: the descriptor is `fd`'s, open for the whole call (borrowed).
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd.as_raw_fd()) };
        socket::send(conn.as_fd(), &wire::interrupt_fd(bit, cookie), Some(fd))?;
        Ok(true)
    }

    fn take_interrupt_fd(&self, bit: u32, cookie: u64) -> Option<EventFd> {
        let mut fds = lock(&self.shared.interrupt_fds);
        if fds.get(&bit).is_some_and(|(c, _)| *c == cookie) {
            fds.remove(&bit).map(|(_, fd)| fd)
        } else {
            None
        }
    }
});

impl ShmNtb {
    /// Opens this host's side of the link rendezvousing in `dir` (created if missing). Returns
    /// at once with the link down; a background thread connects, and reconnects to each new
    /// peer after a peer goes away.
    pub fn open(dir: &Path, asp: Arc<AddressSpace>, cfg: LinkConfig) -> Result<Arc<ShmNtb>> {
        socket::check_path(&dir.join("sock"))?;
        std::fs::create_dir_all(dir)
            .map_err(|e| FabricError::io(format!("create {}", dir.display()), e))?;
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(dir.join("lock"))
            .map_err(|e| FabricError::io(format!("open {}/lock", dir.display()), e))?;
        let ep = Arc::new(Endpoint::new(cfg, asp)?);
        let shared = Arc::new(Shared {
            ep: ep.clone(),
            dir: dir.to_path_buf(),
            shutdown: AtomicBool::new(false),
            conn: Mutex::new(None),
            interrupt_fds: Mutex::new(HashMap::new()),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("ntb-shm-rendezvous".into())
            .spawn(move || rendezvous(&s, lock_file))
            .map_err(|e| FabricError::io("spawn rendezvous thread", e))?;
        Ok(Arc::new(ShmNtb {
            ep,
            shared,
            thread: Some(thread),
        }))
    }

    /// The rendezvous directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }
}

impl Drop for ShmNtb {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        if let Some(conn) = lock(&self.shared.conn).as_ref() {
            // shutdown(2) wakes our reader and tells the peer.
            let _ = rustix::net::shutdown(conn, rustix::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The rendezvous loop: become listener or connector, run a connection, repeat.
fn rendezvous(shared: &Shared, lock_file: File) {
    let sock_path = shared.dir.join("sock");
    let mut listener: Option<OwnedFd> = None;
    while !shared.shutdown.load(Ordering::SeqCst) {
        if listener.is_none()
            && rustix::fs::flock(&lock_file, FlockOperation::NonBlockingLockExclusive).is_ok()
        {
            let _ = std::fs::remove_file(&sock_path);
            match socket::listen(&sock_path) {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    tracing::warn!("ntb shm: cannot listen at {}: {e}", sock_path.display());
                    std::thread::sleep(POLL);
                    continue;
                }
            }
        }
        let conn = match &listener {
            Some(l) => match socket::wait_readable(l.as_fd(), POLL) {
                Ok(true) => socket::accept(l).ok(),
                Ok(false) => None,
                Err(e) => {
                    tracing::warn!("ntb shm: {e}");
                    std::thread::sleep(POLL);
                    None
                }
            },
            None => match socket::connect(&sock_path) {
                Ok(c) => Some(c),
                Err(_) => {
                    std::thread::sleep(RETRY);
                    None
                }
            },
        };
        if let Some(conn) = conn {
            match run_connection(shared, conn) {
                Ok(()) => {}
                Err(_) if shared.shutdown.load(Ordering::SeqCst) => {}
                Err(Failure::BeforeHello(e)) => {
                    tracing::debug!("ntb shm: peer went away before its hello: {e}");
                }
                Err(Failure::Other(e)) => tracing::warn!("ntb shm: connection ended: {e}"),
            }
        }
    }
    if listener.is_some() {
        let _ = std::fs::remove_file(&sock_path);
    }
}

/// Receives one message, looking at the shutdown flag while waiting; `None` at end of stream
/// or shutdown, an error after `limit` without a message.
fn recv_wire(
    shared: &Shared,
    conn: &OwnedFd,
    limit: Option<Duration>,
) -> Result<Option<wire::Wire>> {
    let start = std::time::Instant::now();
    loop {
        if shared.shutdown.load(Ordering::SeqCst) {
            return Ok(None);
        }
        if socket::wait_readable(conn.as_fd(), POLL)? {
            let mut buf = [0u8; socket::MAX_MSG];
            return match socket::recv(conn.as_fd(), &mut buf)? {
                None => Ok(None),
                Some((n, fds)) => wire::decode(buf.get(..n).unwrap_or(&[]), fds).map(Some),
            };
        }
        if limit.is_some_and(|l| start.elapsed() >= l) {
            return Err(FabricError::Timeout);
        }
    }
}

/// Maps `size` bytes of the peer's RAM memfd from `fd_offset`.
fn map_peer_ram(fd: OwnedFd, fd_offset: u64, size: u64) -> Result<MemSpan> {
    let bad = |why: &str| FabricError::Protocol(format!("RAM window announcement: {why}"));
    let end = fd_offset
        .checked_add(size)
        .ok_or_else(|| bad("range overflows"))?;
    if page::fd_size(&fd)? < end {
        return Err(bad("range is larger than the memory it names"));
    }
    let page_off = fd_offset & !4095;
    let delta = fd_offset - page_off;
    let len = usize::try_from(delta + size).map_err(|_| bad("too large"))?;
    let mem = Arc::new(SharedMemory::map(fd, page_off, len)?);
    Ok(MemSpan::new(mem, delta, size)?)
}

/// Maps `size` bytes of a real device's registers that the peer maps itself: `fd` must be a
/// VFIO device descriptor and `[fd_offset, fd_offset + size)` (page-aligned) inside one of its
/// regions that VFIO allows to be mapped (`VFIO_DEVICE_GET_REGION_INFO`); anything else (a
/// plain file the peer could truncate under our mapping) is refused. The kernel itself refuses
/// a range outside the region's mappable areas.
fn map_peer_device(fd: OwnedFd, fd_offset: u64, size: u64) -> Result<MemSpan> {
    let bad = |why: String| FabricError::Protocol(format!("device window announcement: {why}"));
    let end = fd_offset
        .checked_add(size)
        .ok_or_else(|| bad("range overflows".into()))?;
    if !fd_offset.is_multiple_of(4096) || !size.is_multiple_of(4096) {
        return Err(bad(format!(
            "{size:#x} bytes at {fd_offset:#x} are not whole pages"
        )));
    }
    let region = vfio::region_holding(&fd, fd_offset, end).map_err(bad)?;
    if !region.mappable {
        return Err(bad(format!(
            "VFIO region {} does not allow mapping",
            region.index
        )));
    }
    let len = usize::try_from(size).map_err(|_| bad("too large".into()))?;
    let mem = Arc::new(SharedMemory::map_device(fd, fd_offset, len)?);
    Ok(MemSpan::whole(mem))
}

/// An interrupt descriptor from the peer: it must be an eventfd (reads of anything else could
/// block or mean something else), and is made non-blocking.
fn peer_eventfd(fd: OwnedFd) -> Result<EventFd> {
    let bad = |why: String| FabricError::Protocol(format!("interrupt descriptor: {why}"));
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| bad(format!("cannot identify it ({e})")))?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(bad(format!("{} is not an eventfd", link.display())));
    }
    let flags = rustix::fs::fcntl_getfl(&fd).map_err(|e| bad(e.to_string()))?;
    rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK)
        .map_err(|e| bad(e.to_string()))?;
    // SAFETY: `fd` is an open eventfd we own (checked above); its ownership moves into the
    // EventFd, which closes it once.
    Ok(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
}

/// Parses a control message as the reader does and acts on what it announces (maps a RAM
/// window, maps a Hello's control page), for `crate::fuzzing`.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn parse_untrusted_control(bytes: &[u8], fds: Vec<OwnedFd>) -> Result<()> {
    match wire::decode(bytes, fds)? {
        wire::Wire::TransRam {
            size,
            fd,
            fd_offset,
            ..
        } => map_peer_ram(fd, fd_offset, size).map(|_| ()),
        wire::Wire::TransDevice {
            size,
            fd,
            fd_offset,
            ..
        } => map_peer_device(fd, fd_offset, size).map(|_| ()),
        wire::Wire::Hello { page, .. } => ControlPage::from_peer(page).map(|_| ()),
        wire::Wire::InterruptFd { fd, .. } => peer_eventfd(fd).map(|_| ()),
        wire::Wire::TransMmio { .. } | wire::Wire::Clear { .. } => Ok(()),
    }
}

fn run_connection(shared: &Shared, conn: OwnedFd) -> std::result::Result<(), Failure> {
    let ep = &shared.ep;
    let cfg = *ep.config();
    let local = Arc::new(ControlPage::create()?);
    let hello = wire::hello(
        cfg.mw_count as u32,
        cfg.spad_count as u32,
        cfg.msg_count as u32,
        cfg.db_count,
    );
    let first = socket::set_send_timeout(&conn, SEND_TIMEOUT)
        .and_then(|()| socket::send(conn.as_fd(), &hello, Some(local.fd())))
        .and_then(|()| recv_wire(shared, &conn, Some(HELLO_TIMEOUT)))
        .map_err(Failure::before_hello)?;
    let Some(first) = first else {
        return Ok(());
    };
    let wire::Wire::Hello {
        mw_count,
        spad_count,
        msg_count,
        db_count,
        page,
    } = first
    else {
        return Err(FabricError::Protocol("expected Hello first".into()).into());
    };
    let peer = Arc::new(ControlPage::from_peer(page)?);
    let info = PeerCounts::bounded(
        u64::from(mw_count),
        u64::from(spad_count),
        u64::from(msg_count),
        u64::from(db_count),
    );
    let conn = Arc::new(conn);
    let pair = Arc::new(PagePair::new(
        local,
        peer,
        info,
        Box::new(SocketAnnounce(conn.clone())),
    ));
    *lock(&shared.conn) = Some(conn.clone());
    if shared.shutdown.load(Ordering::SeqCst) {
        return Ok(());
    }
    let result = ep
        .attach(pair.clone())
        .and_then(|()| serve_control(shared, &conn, &pair));
    ep.detach(&pair);
    *lock(&shared.conn) = None;
    lock(&shared.interrupt_fds).clear();
    Ok(result?)
}

/// Why a connection ended with an error.
#[derive(Debug)]
enum Failure {
    /// The socket failed before the peer's hello arrived: a listener that closed with our
    /// connection still in its backlog (the peer shutting down while we rendezvoused again),
    /// not a link that went down. The rendezvous simply goes on.
    BeforeHello(FabricError),
    /// Anything else: a link that was up, or a peer that broke the protocol.
    Other(FabricError),
}

impl Failure {
    /// Classifies an error of the hello exchange: the socket's own errors are `BeforeHello`.
    fn before_hello(e: FabricError) -> Failure {
        match e {
            FabricError::Io { .. } => Failure::BeforeHello(e),
            e => Failure::Other(e),
        }
    }
}

impl From<FabricError> for Failure {
    fn from(e: FabricError) -> Failure {
        Failure::Other(e)
    }
}

/// Reads window announcements until the connection ends.
fn serve_control(shared: &Shared, conn: &OwnedFd, pair: &Arc<PagePair>) -> Result<()> {
    while let Some(msg) = recv_wire(shared, conn, None)? {
        let (window, what) = match msg {
            wire::Wire::TransRam {
                window,
                size,
                fd,
                fd_offset,
            } => (
                window,
                Some(PeerWindow::Ram(map_peer_ram(fd, fd_offset, size)?)),
            ),
            wire::Wire::TransDevice {
                window,
                size,
                fd,
                fd_offset,
            } => (
                window,
                Some(PeerWindow::Ram(map_peer_device(fd, fd_offset, size)?)),
            ),
            wire::Wire::TransMmio { window, size } => (window, Some(PeerWindow::Mmio { size })),
            wire::Wire::Clear { window } => (window, None),
            wire::Wire::InterruptFd { bit, cookie, fd } => {
                let fd = peer_eventfd(fd)?;
                lock(&shared.interrupt_fds).insert(bit, (cookie, fd));
                continue;
            }
            wire::Wire::Hello { .. } => {
                return Err(FabricError::Protocol("second Hello".into()));
            }
        };
        shared.ep.set_peer_window(pair, window as usize, what)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BusAddr, Doorbells, Link, LinkState, MemoryWindows, PeerWindows, WindowOffset};

    const LONG: Duration = Duration::from_secs(20);

    /// A test's rendezvous directory, removed when the test ends (also when it fails).
    fn tmpdir(name: &str) -> devlend_testkit::scratch::ScratchDir {
        devlend_testkit::scratch::ScratchDir::new("devlend-shm-unit", name)
    }

    #[test]
    fn two_handles_in_one_process_link_up_and_reconnect() {
        let dir = tmpdir("pair");
        let asp_b = Arc::new(AddressSpace::new());
        let ram = Arc::new(SharedMemory::new("ram", 0x3000).unwrap());
        asp_b.add_ram(BusAddr(0x1800), ram.clone()).unwrap();
        let cfg = LinkConfig {
            mw_addr_align: 0x800,
            mw_size_align: 0x800,
            ..LinkConfig::default()
        };
        let a = ShmNtb::open(&dir, Arc::new(AddressSpace::new()), cfg).unwrap();
        let b = ShmNtb::open(&dir, asp_b, cfg).unwrap();
        a.wait_link(LinkState::Up, LONG).unwrap();
        b.wait_link(LinkState::Up, LONG).unwrap();
        // An unaligned-in-page RAM window: mapped from the page below, exact span.
        b.mw_set_trans(0, BusAddr(0x2000), 0x1800).unwrap();
        while a.peer_mw_size(0).is_err() {
            std::thread::yield_now();
        }
        a.peer_mw_write(0, WindowOffset(0), b"xy").unwrap();
        let mut got = [0u8; 2];
        ram.read_at(0x800, &mut got).unwrap();
        assert_eq!(&got, b"xy");
        assert_eq!(a.peer_mw_direct(0).unwrap().unwrap().len(), 0x1800);
        a.peer_db_set(4).unwrap();
        assert_eq!(b.db_wait(4, LONG).unwrap(), 4);
        let gen = a.link_generation();
        drop(b);
        a.wait_link(LinkState::Down, LONG).unwrap();
        assert!(matches!(a.db_wait(1, LONG), Err(FabricError::LinkDown)));
        let b = ShmNtb::open(&dir, Arc::new(AddressSpace::new()), cfg).unwrap();
        b.wait_link(LinkState::Up, LONG).unwrap();
        a.wait_link(LinkState::Up, LONG).unwrap();
        assert_eq!(a.link_generation(), gen + 2);
        assert!(matches!(
            a.peer_mw_size(0),
            Err(FabricError::WindowNotTranslated(0))
        ));
        drop(a);
        drop(b);
    }

    #[test]
    fn peer_ram_that_could_be_truncated_is_refused() {
        // A peer that announces a RAM window on an unsealed memfd could truncate it later and
        // crash us on the next access: refused when announced.
        let plain = rustix::fs::memfd_create("plain", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&plain, 0x2000).unwrap();
        let msg = wire::trans_ram(1, 0x1000, 0);
        let err = parse_untrusted_control(&msg, vec![plain]).unwrap_err();
        assert!(err.to_string().contains("F_SEAL_SHRINK"), "{err}");
        // A sealed one shorter than the window it claims to back: refused too.
        let small = SharedMemory::new("small", 0x1000).unwrap();
        let fd = small.fd().try_clone_to_owned().unwrap();
        let msg = wire::trans_ram(1, 0x1000, 0x1000);
        assert!(parse_untrusted_control(&msg, vec![fd]).is_err());
        // Our own memory is sealed: mapped.
        let fd = small.fd().try_clone_to_owned().unwrap();
        parse_untrusted_control(&wire::trans_ram(1, 0x1000, 0), vec![fd]).unwrap();
    }

    #[test]
    fn a_device_window_on_anything_but_a_vfio_device_is_refused() {
        // A memfd announced as a device's registers would be mapped without the seal check:
        // refused, as is a range that is not whole pages.
        let mem = SharedMemory::new("fake-device", 0x2000).unwrap();
        let fd = mem.fd().try_clone_to_owned().unwrap();
        let err = parse_untrusted_control(&wire::trans_device(1, 0x1000, 0), vec![fd]).unwrap_err();
        assert!(err.to_string().contains("not a VFIO device"), "{err}");
        let fd = mem.fd().try_clone_to_owned().unwrap();
        let err = parse_untrusted_control(&wire::trans_device(1, 0x800, 0), vec![fd]).unwrap_err();
        assert!(err.to_string().contains("whole pages"), "{err}");
    }

    #[test]
    fn an_interrupt_descriptor_reaches_the_peer_and_anything_but_an_eventfd_is_refused() {
        let dir = tmpdir("irqfd");
        let cfg = LinkConfig::default();
        let a = ShmNtb::open(&dir, Arc::new(AddressSpace::new()), cfg).unwrap();
        let b = ShmNtb::open(&dir, Arc::new(AddressSpace::new()), cfg).unwrap();
        a.wait_link(LinkState::Up, LONG).unwrap();
        b.wait_link(LinkState::Up, LONG).unwrap();
        let ours = EventFd::new(0).unwrap();
        assert!(crate::Ntb::carries_interrupt_fds(&*a));
        let old = EventFd::new(0).unwrap();
        assert!(crate::Ntb::give_interrupt_fd(&*a, 5, 1, &old).unwrap());
        assert!(crate::Ntb::give_interrupt_fd(&*a, 5, 2, &ours).unwrap());
        let deadline = std::time::Instant::now() + LONG;
        // Until the second descriptor arrives, the first may be there under its own cookie
        // (the two messages are read one after the other): taken with cookie 1, it must be
        // the first eventfd, never the second.
        let mut first = None;
        let theirs = loop {
            if let Some(fd) = crate::Ntb::take_interrupt_fd(&*b, 5, 2) {
                break fd;
            }
            if let Some(fd) = crate::Ntb::take_interrupt_fd(&*b, 5, 1) {
                first = Some(fd);
            }
            assert!(std::time::Instant::now() < deadline, "never arrived");
            std::thread::yield_now();
        };
        assert!(
            crate::Ntb::take_interrupt_fd(&*b, 5, 1).is_none(),
            "the later descriptor replaced the earlier one"
        );
        assert!(
            crate::Ntb::take_interrupt_fd(&*b, 5, 2).is_none(),
            "taken once"
        );
        if let Some(first) = first {
            old.write(1).unwrap();
            assert_eq!(first.read().unwrap(), 1, "another cookie's descriptor");
        }
        // Non-blocking on the receiving side; the sender's signal is what it reads.
        assert!(theirs.read().is_err());
        ours.write(3).unwrap();
        assert_eq!(theirs.read().unwrap(), 3);
        drop(a);
        drop(b);

        let mem = SharedMemory::new("not-an-eventfd", 0x1000).unwrap();
        let fd = mem.fd().try_clone_to_owned().unwrap();
        let err = parse_untrusted_control(&wire::interrupt_fd(1, 7), vec![fd]).unwrap_err();
        assert!(err.to_string().contains("not an eventfd"), "{err}");
        let fd = EventFd::new(0).unwrap();
        let owned = fd.try_clone().unwrap();
        // SAFETY: `owned` is a fresh duplicate whose descriptor moves into the OwnedFd.
        let owned = unsafe { OwnedFd::from_raw_fd(owned.into_raw_fd()) };
        parse_untrusted_control(&wire::interrupt_fd(1, 7), vec![owned]).unwrap();
    }

    #[test]
    fn socket_path_too_long_is_an_error() {
        let long = std::env::temp_dir().join("x".repeat(200));
        assert!(matches!(
            ShmNtb::open(&long, Arc::new(AddressSpace::new()), LinkConfig::default()),
            Err(FabricError::Io { .. })
        ));
    }

    /// The state of a rendezvous thread, without the thread.
    fn shared(dir: &Path) -> Shared {
        Shared {
            ep: Arc::new(
                Endpoint::new(LinkConfig::default(), Arc::new(AddressSpace::new())).unwrap(),
            ),
            dir: dir.to_path_buf(),
            shutdown: AtomicBool::new(false),
            conn: Mutex::new(None),
            interrupt_fds: Mutex::new(HashMap::new()),
        }
    }

    /// Two connected control sockets.
    fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
        rustix::net::socketpair(
            rustix::net::AddressFamily::UNIX,
            rustix::net::SocketType::SEQPACKET,
            rustix::net::SocketFlags::CLOEXEC,
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_listener_gone_before_its_hello_is_not_a_link_that_ended() {
        // A peer shutting down closes its listener: a connection made just before (still in
        // the backlog) is reset. That is the rendezvous going on, not an error to report.
        let dir = tmpdir("backlog");
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let listener = socket::listen(&path).unwrap();
        let conn = socket::connect(&path).unwrap();
        drop(listener);
        let shared = shared(&dir);
        let got = run_connection(&shared, conn);
        assert!(
            matches!(got, Err(Failure::BeforeHello(FabricError::Io { .. }))),
            "{got:?}"
        );
        // A peer that closes at once: the same.
        let (conn, peer) = seqpacket_pair();
        drop(peer);
        assert!(matches!(
            run_connection(&shared, conn),
            Err(Failure::BeforeHello(FabricError::Io { .. }))
        ));
        // A peer that answers with anything but a hello broke the protocol: reported.
        let (conn, peer) = seqpacket_pair();
        socket::send(peer.as_fd(), &wire::trans_mmio(0, 0x1000), None).unwrap();
        assert!(matches!(
            run_connection(&shared, conn),
            Err(Failure::Other(FabricError::Protocol(_)))
        ));
        drop(peer);
    }
}
