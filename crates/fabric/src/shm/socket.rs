//! The control socket: `AF_UNIX` `SOCK_SEQPACKET` (message boundaries kept, EOF when the peer
//! process dies), carrying descriptors with `SCM_RIGHTS`.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::Duration;

use crate::{FabricError, Result};

/// Largest message we send or accept.
pub(super) const MAX_MSG: usize = 64;
/// Most descriptors accepted with one message (we send at most one).
const MAX_FDS: usize = 4;

fn last(op: &str) -> FabricError {
    FabricError::io(op, std::io::Error::last_os_error())
}

fn sockaddr(path: &Path) -> Result<(libc::sockaddr_un, libc::socklen_t)> {
    use std::os::unix::ffi::OsStrExt;
    // SAFETY: an all-zero sockaddr_un is a valid (empty) address.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(FabricError::io(
            format!("socket path {}", path.display()),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "path too long for a UNIX socket",
            ),
        ));
    }
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    Ok((addr, len as libc::socklen_t))
}

/// Checks that `path` fits in a socket address.
pub(super) fn check_path(path: &Path) -> Result<()> {
    sockaddr(path).map(|_| ())
}

fn seqpacket() -> Result<OwnedFd> {
    // SAFETY: plain socket(2) call without pointers.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(last("socket"));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Binds and listens at `path` (which must not exist).
pub(super) fn listen(path: &Path) -> Result<OwnedFd> {
    let (addr, len) = sockaddr(path)?;
    let fd = seqpacket()?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes; `fd` is a valid socket.
    if unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    } != 0
    {
        return Err(last("bind"));
    }
    // SAFETY: valid socket, no pointers.
    if unsafe { libc::listen(fd.as_raw_fd(), 4) } != 0 {
        return Err(last("listen"));
    }
    Ok(fd)
}

/// Connects to the listener at `path`.
pub(super) fn connect(path: &Path) -> Result<OwnedFd> {
    let (addr, len) = sockaddr(path)?;
    let fd = seqpacket()?;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes; `fd` is a valid socket.
    if unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    } != 0
    {
        return Err(last("connect"));
    }
    Ok(fd)
}

/// Accepts one connection.
pub(super) fn accept(listener: &OwnedFd) -> Result<OwnedFd> {
    // SAFETY: valid listening socket; null address pointers are allowed.
    let raw = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if raw < 0 {
        return Err(last("accept"));
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Bounds how long a send may block (a peer that stops reading cannot wedge us).
pub(super) fn set_send_timeout(sock: &OwnedFd, timeout: Duration) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: valid socket; `tv` is a live timeval of the declared size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(last("setsockopt(SO_SNDTIMEO)"));
    }
    Ok(())
}

/// Waits up to `timeout` for `fd` to be readable (or hung up); `Ok(false)` on timeout.
pub(super) fn wait_readable(fd: RawFd, timeout: Duration) -> Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is one live pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(FabricError::io("poll", e));
    }
    Ok(n > 0)
}

/// A control buffer big enough for `MAX_FDS` descriptors, suitably aligned for `cmsghdr`.
#[repr(C, align(8))]
struct CmsgBuf([u8; 64]);

/// Sends one message with at most one descriptor.
pub(super) fn send(sock: BorrowedFd<'_>, data: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let mut cbuf = CmsgBuf([0; 64]);
    // SAFETY: an all-zero msghdr is valid (no name, no control).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(fd) = fd {
        let raw: RawFd = fd.as_raw_fd();
        // SAFETY: CMSG_SPACE is a pure size computation.
        let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
        msg.msg_control = cbuf.0.as_mut_ptr().cast();
        msg.msg_controllen = space.min(cbuf.0.len()) as _;
        // SAFETY: `msg` has a control buffer of at least one header plus one int (64 bytes,
        // 8-aligned), so CMSG_FIRSTHDR is non-null and the header and data fit inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null() {
                return Err(FabricError::Protocol("no room for SCM_RIGHTS".into()));
            }
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), raw);
        }
    }
    loop {
        // SAFETY: `msg` points to live iovec/control buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(FabricError::io("sendmsg", e));
        }
    }
}

/// Receives one message into `buf`: `Ok(None)` at end of stream (the peer closed or died).
pub(super) fn recv(
    sock: BorrowedFd<'_>,
    buf: &mut [u8; MAX_MSG],
) -> Result<Option<(usize, Vec<OwnedFd>)>> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut cbuf = CmsgBuf([0; 64]);
    // SAFETY: an all-zero msghdr is valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.0.as_mut_ptr().cast();
    msg.msg_controllen = cbuf.0.len() as _;
    let n = loop {
        // SAFETY: `msg` points to live, writable buffers of the declared sizes.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::ECONNRESET) => return Ok(None),
            _ => return Err(FabricError::io("recvmsg", e)),
        }
    };
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `msg.msg_control` with `msg_controllen` bytes of well-formed
    // cmsg headers; CMSG_FIRSTHDR/NXTHDR stay within that length; each SCM_RIGHTS payload
    // holds `(cmsg_len - CMSG_LEN(0)) / 4` descriptors that are now ours.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let payload =
                    ((*cmsg).cmsg_len as usize).saturating_sub(libc::CMSG_LEN(0) as usize);
                let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..payload / std::mem::size_of::<RawFd>() {
                    let raw = std::ptr::read_unaligned(data.add(i));
                    fds.push(OwnedFd::from_raw_fd(raw));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 || fds.len() > MAX_FDS {
        return Err(FabricError::Protocol("oversized control message".into()));
    }
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    Ok(Some((n, fds)))
}
