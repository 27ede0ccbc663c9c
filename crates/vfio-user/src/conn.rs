//! Message transport over a connected UNIX stream socket: whole messages in (with the file
//! descriptors that came with them, via `SCM_RIGHTS`), whole replies out.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::wire::{Header, HEADER_LEN, MAX_MESSAGE};

/// Room for this many descriptors per receive call; more are dropped by the kernel (`MSG_CTRUNC`),
/// and the message is refused.
const FD_ROOM: usize = 32;

/// One message as it came off the socket.
#[derive(Debug)]
pub struct RawMessage {
    /// The header.
    pub header: Header,
    /// The payload (`header.size - 16` bytes), empty when the message was refused unread.
    pub payload: Vec<u8>,
    /// Descriptors that arrived with the message (closed when dropped).
    pub fds: Vec<OwnedFd>,
    /// The kernel dropped descriptors for lack of room.
    pub fds_truncated: bool,
    /// What is wrong with the framing, if anything (the payload was drained, not kept).
    pub framing: Option<Framing>,
}

/// A framing problem that still leaves the stream in sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// `size` < 16: only the header was consumed.
    TooShort,
    /// `size` > [`MAX_MESSAGE`]: the payload was read and discarded.
    TooLong,
}

/// Reads whole messages from a socket.
pub struct MessageReader<'a> {
    sock: &'a UnixStream,
}

impl<'a> MessageReader<'a> {
    /// A reader over `sock`.
    pub fn new(sock: &'a UnixStream) -> Self {
        Self { sock }
    }

    /// The next message, or `Ok(None)` at a clean end of stream (between messages).
    /// A stream that ends inside a message is an `UnexpectedEof` error.
    pub fn read_message(&mut self) -> std::io::Result<Option<RawMessage>> {
        let mut fds = Vec::new();
        let mut truncated = false;
        let mut hbuf = [0u8; HEADER_LEN];
        let got = recv_exact(self.sock.as_raw_fd(), &mut hbuf, &mut fds, &mut truncated)?;
        if got == 0 {
            return Ok(None);
        }
        if got < HEADER_LEN {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let header = Header::decode(&hbuf);
        let mut msg = RawMessage {
            header,
            payload: Vec::new(),
            fds: Vec::new(),
            fds_truncated: false,
            framing: None,
        };
        match header.payload_len() {
            None => msg.framing = Some(Framing::TooShort),
            Some(len) if header.size > MAX_MESSAGE => {
                // Drain it in bounded chunks so that the next message starts where it should.
                let mut left = len;
                let mut scratch = vec![0u8; 64 * 1024];
                while left > 0 {
                    let n = left.min(scratch.len());
                    let chunk = scratch.get_mut(..n).unwrap_or(&mut []);
                    let got = recv_exact(self.sock.as_raw_fd(), chunk, &mut fds, &mut truncated)?;
                    if got < n {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    left -= n;
                }
                msg.framing = Some(Framing::TooLong);
            }
            Some(len) => {
                let mut payload = vec![0u8; len];
                let got = recv_exact(
                    self.sock.as_raw_fd(),
                    &mut payload,
                    &mut fds,
                    &mut truncated,
                )?;
                if got < len {
                    return Err(std::io::ErrorKind::UnexpectedEof.into());
                }
                msg.payload = payload;
            }
        }
        msg.fds = fds;
        msg.fds_truncated = truncated;
        Ok(Some(msg))
    }
}

/// Receives exactly `buf.len()` bytes unless the stream ends first; returns how many arrived.
/// Descriptors that come along are appended to `fds`.
fn recv_exact(
    fd: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    truncated: &mut bool,
) -> std::io::Result<usize> {
    let mut done = 0usize;
    while done < buf.len() {
        let rest = buf.get_mut(done..).unwrap_or(&mut []);
        let n = recv_with_fds(fd, rest, fds, truncated)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

fn recv_with_fds(
    fd: RawFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    truncated: &mut bool,
) -> std::io::Result<usize> {
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; (FD_ROOM * 4 + 64) / 8];
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is plain data; every pointer field is set below or left null.
        let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
        mh.msg_iov = &mut iov;
        mh.msg_iovlen = 1;
        mh.msg_control = control.as_mut_ptr().cast();
        mh.msg_controllen = std::mem::size_of_val(&control) as _;
        // SAFETY: `mh` points at `iov` (describing `buf`, valid for writes of its length) and at
        // `control`, both alive for the call; the kernel writes only within those lengths.
        let n = unsafe { libc::recvmsg(fd, &mut mh, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if mh.msg_flags & libc::MSG_CTRUNC != 0 {
            *truncated = true;
        }
        // SAFETY: `mh` was filled by recvmsg; CMSG_FIRSTHDR/NXTHDR walk only within
        // `msg_control`/`msg_controllen`, which the kernel set to the bytes it wrote.
        let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&mh) };
        while !cmsg.is_null() {
            // SAFETY: `cmsg` is non-null and inside the control buffer (see above).
            let c = unsafe { &*cmsg };
            if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN(0) is a pure size computation.
                let header_len = unsafe { libc::CMSG_LEN(0) } as usize;
                let data_len = (c.cmsg_len as usize).saturating_sub(header_len);
                let count = data_len / std::mem::size_of::<RawFd>();
                // SAFETY: CMSG_DATA points at `data_len` bytes of descriptors inside the
                // control buffer; they may be unaligned, hence read_unaligned.
                let data = unsafe { libc::CMSG_DATA(cmsg) }.cast::<RawFd>();
                for i in 0..count {
                    // SAFETY: `i < count`, so the read stays within this cmsg's data.
                    let raw = unsafe { data.add(i).read_unaligned() };
                    if raw >= 0 {
                        // SAFETY: SCM_RIGHTS installed `raw` as a new descriptor in this
                        // process; nothing else owns it.
                        fds.push(unsafe { OwnedFd::from_raw_fd(raw) });
                    }
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR.
            cmsg = unsafe { libc::CMSG_NXTHDR(&mh, cmsg) };
        }
        return Ok(n as usize);
    }
}

/// Sends all of `bytes` (no descriptors). `MSG_NOSIGNAL`: a vanished peer is an error, not a
/// SIGPIPE.
pub fn send_all(sock: &UnixStream, bytes: &[u8]) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < bytes.len() {
        let rest = bytes.get(done..).unwrap_or(&[]);
        // SAFETY: `rest` is a valid readable buffer of `rest.len()` bytes for the call.
        let n = unsafe {
            libc::send(
                sock.as_raw_fd(),
                rest.as_ptr().cast(),
                rest.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// Sends `bytes` with `fds` attached (`SCM_RIGHTS`), for clients and tests.
pub fn send_with_fds(sock: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    if fds.is_empty() {
        return send_all(sock, bytes);
    }
    if fds.len() > FD_ROOM {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    let mut control = [0u64; (FD_ROOM * 4 + 64) / 8];
    let fd_bytes = std::mem::size_of_val(fds);
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; the pointer fields are set below.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is a pure size computation.
    mh.msg_controllen = unsafe { libc::CMSG_SPACE(fd_bytes as u32) } as _;
    // SAFETY: the control buffer holds at least CMSG_SPACE(fd_bytes) bytes (FD_ROOM bound), so
    // the first header and its data fit.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&mh);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fd_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), fd_bytes);
    }
    // SAFETY: `mh` describes `bytes` (only read by the kernel) and the control buffer.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &mh, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    if n < bytes.len() {
        send_all(sock, bytes.get(n..).unwrap_or(&[]))?;
    }
    Ok(())
}
