//! Message transport over a connected UNIX stream socket: whole messages in (with the file
//! descriptors that came with them, via `SCM_RIGHTS`), whole replies out.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;

use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

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
        let got = recv_exact(self.sock.as_fd(), &mut hbuf, &mut fds, &mut truncated)?;
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
                    let got = recv_exact(self.sock.as_fd(), chunk, &mut fds, &mut truncated)?;
                    if got < n {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                    left -= n;
                }
                msg.framing = Some(Framing::TooLong);
            }
            Some(len) => {
                let mut payload = vec![0u8; len];
                let got = recv_exact(self.sock.as_fd(), &mut payload, &mut fds, &mut truncated)?;
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
    fd: BorrowedFd<'_>,
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
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    truncated: &mut bool,
) -> std::io::Result<usize> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(FD_ROOM))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let got = loop {
        match rustix::net::recvmsg(fd, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
            Ok(got) => break got,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if got.flags.contains(ReturnFlags::CTRUNC) {
        *truncated = true;
    }
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = msg {
            fds.extend(received);
        }
    }
    Ok(got.bytes)
}

/// Sends all of `bytes` (no descriptors). `MSG_NOSIGNAL`: a vanished peer is an error, not a
/// SIGPIPE.
pub fn send_all(sock: &UnixStream, bytes: &[u8]) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < bytes.len() {
        let rest = bytes.get(done..).unwrap_or(&[]);
        match rustix::net::send(sock, rest, SendFlags::NOSIGNAL) {
            Ok(n) => done += n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Sends `bytes` with `fds` attached (`SCM_RIGHTS`), for clients and tests.
pub fn send_with_fds(
    sock: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    if fds.is_empty() {
        return send_all(sock, bytes);
    }
    if fds.len() > FD_ROOM {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(FD_ROOM))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(std::io::ErrorKind::InvalidInput.into());
    }
    let n = loop {
        match rustix::net::sendmsg(
            sock,
            &[IoSlice::new(bytes)],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(n) => break n,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    if n < bytes.len() {
        send_all(sock, bytes.get(n..).unwrap_or(&[]))?;
    }
    Ok(())
}
