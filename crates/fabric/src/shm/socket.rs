//! The control socket: `AF_UNIX` `SOCK_SEQPACKET` (message boundaries kept, EOF when the peer
//! process dies), carrying descriptors with `SCM_RIGHTS`. Every call goes through `rustix`.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags, Timespec};
use rustix::io::Errno;
use rustix::net::sockopt::Timeout;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};

use crate::{FabricError, Result};

/// Largest message we send or accept.
pub(super) const MAX_MSG: usize = 64;
/// Most descriptors accepted with one message (we send at most one).
const MAX_FDS: usize = 4;

fn failed(op: &str) -> impl FnOnce(Errno) -> FabricError + '_ {
    move |e| FabricError::io(op, e.into())
}

fn sockaddr(path: &Path) -> Result<SocketAddrUnix> {
    SocketAddrUnix::new(path).map_err(|e| {
        FabricError::io(
            format!("socket path {}", path.display()),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("not a UNIX socket path: {e}"),
            ),
        )
    })
}

/// Checks that `path` fits in a socket address.
pub(super) fn check_path(path: &Path) -> Result<()> {
    sockaddr(path).map(|_| ())
}

fn seqpacket() -> Result<OwnedFd> {
    rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(failed("socket"))
}

/// Binds and listens at `path` (which must not exist).
pub(super) fn listen(path: &Path) -> Result<OwnedFd> {
    let addr = sockaddr(path)?;
    let fd = seqpacket()?;
    rustix::net::bind(&fd, &addr).map_err(failed("bind"))?;
    rustix::net::listen(&fd, 4).map_err(failed("listen"))?;
    Ok(fd)
}

/// Connects to the listener at `path`.
pub(super) fn connect(path: &Path) -> Result<OwnedFd> {
    let addr = sockaddr(path)?;
    let fd = seqpacket()?;
    rustix::net::connect(&fd, &addr).map_err(failed("connect"))?;
    Ok(fd)
}

/// Accepts one connection.
pub(super) fn accept(listener: &OwnedFd) -> Result<OwnedFd> {
    rustix::net::accept_with(listener, SocketFlags::CLOEXEC).map_err(failed("accept"))
}

/// Bounds how long a send may block (a peer that stops reading cannot wedge us).
pub(super) fn set_send_timeout(sock: &OwnedFd, timeout: Duration) -> Result<()> {
    rustix::net::sockopt::set_socket_timeout(sock, Timeout::Send, Some(timeout))
        .map_err(failed("setsockopt(SO_SNDTIMEO)"))
}

/// Waits up to `timeout` for `fd` to be readable (or hung up); `Ok(false)` on timeout.
pub(super) fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> Result<bool> {
    let mut pfd = [PollFd::from_borrowed_fd(fd, PollFlags::IN)];
    let wait = Timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    match rustix::event::poll(&mut pfd, Some(&wait)) {
        Ok(n) => Ok(n > 0),
        Err(Errno::INTR) => Ok(false),
        Err(e) => Err(FabricError::io("poll", e.into())),
    }
}

/// Sends one message with at most one descriptor.
pub(super) fn send(sock: BorrowedFd<'_>, data: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<()> {
    let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(FabricError::Protocol("no room for SCM_RIGHTS".into()));
    }
    let iov = [IoSlice::new(data)];
    loop {
        match rustix::net::sendmsg(sock, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(_) => return Ok(()),
            Err(Errno::INTR) => continue,
            Err(e) => return Err(FabricError::io("sendmsg", e.into())),
        }
    }
}

/// Receives one message into `buf`: `Ok(None)` at end of stream (the peer closed or died).
pub(super) fn recv(
    sock: BorrowedFd<'_>,
    buf: &mut [u8; MAX_MSG],
) -> Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let got = loop {
        match rustix::net::recvmsg(sock, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(got) => break got,
            Err(Errno::INTR) => continue,
            Err(Errno::CONNRESET) => return Ok(None),
            Err(e) => return Err(FabricError::io("recvmsg", e.into())),
        }
    };
    let mut fds = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    if got
        .flags
        .intersects(ReturnFlags::TRUNC | ReturnFlags::CTRUNC)
        || fds.len() > MAX_FDS
    {
        return Err(FabricError::Protocol("oversized control message".into()));
    }
    if got.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((got.bytes, fds)))
}
