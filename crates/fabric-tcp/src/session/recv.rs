//! Receiving: what a thread that has the socket (see [`super::handoff`]) does with it. It reads
//! what the socket holds, opens the TLS records, cuts the plaintext into frames (an incomplete
//! frame waits for the rest) and dispatches each: the peer's requests are applied at once when
//! that keeps their order, else queued for the service thread; replies go to the callers
//! waiting for them.

use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::Connection;
use super::{nonblocking, take_credit, Channel, EndError, Flush, Inbound, PeerResources, Reply};
use crate::frame::{self, Frame, FrameError, Hello};
use crate::ntb::Inner;
use devlend_sync::lock;

/// The receive buffers.
pub(super) struct RxState {
    /// Plaintext not yet parsed (at most one incomplete frame after a pump).
    pub(super) rx: Vec<u8>,
    /// Bytes from the socket (a partial TLS record waits here for the rest).
    pub(super) net: NetBuf,
    /// The peer's hello arrived.
    pub(super) hello: bool,
    /// What came with the end of the handshake (plaintext, then the start of the records
    /// that follow), for the first [`Connection::pump`].
    pub(super) early: Option<(Vec<u8>, Vec<u8>)>,
}

/// What one [`Connection::pump`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pumped {
    /// The socket held nothing.
    Nothing,
    /// Bytes arrived and every complete frame was handled.
    Data,
    /// The peer closed the connection.
    Eof,
}

/// The receive buffer of the socket: ciphertext of a partial record is kept at its start.
pub(crate) struct NetBuf {
    pub(super) buf: Vec<u8>,
    pub(super) len: usize,
}

pub(super) struct Received {
    eof: bool,
    kick: bool,
}

/// Receives `buf.len()` bytes at most without blocking; `None` when there was nothing.
pub(crate) fn recv_nonblocking(
    stream: &TcpStream,
    buf: &mut [u8],
) -> std::io::Result<Option<usize>> {
    // SAFETY: `buf` is a valid writable buffer of `buf.len()` bytes for the whole call, and
    // the descriptor belongs to `stream`.
    nonblocking(|| unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    })
}

impl Channel {
    /// Reads what the socket holds (without blocking) and hands the plaintext to `sink`, in
    /// pieces; `net` keeps a partial record between calls. Returns `None` when there was
    /// nothing.
    pub(super) fn recv(
        &self,
        stream: &TcpStream,
        net: &mut NetBuf,
        early: &mut Option<(Vec<u8>, Vec<u8>)>,
        mut sink: impl FnMut(&[u8]) -> Result<(), EndError>,
    ) -> Result<Option<Received>, EndError> {
        if let Some((plain, cipher)) = early.take() {
            sink(&plain)?;
            let dst = net.buf.get_mut(..cipher.len()).ok_or(EndError::Protocol(
                "more than a buffer of data with the handshake".into(),
            ))?;
            dst.copy_from_slice(&cipher);
            net.len = cipher.len();
            return self.open(net, sink).map(Some);
        }
        if !self.is_tls() {
            let Some(n) = recv_nonblocking(stream, &mut net.buf)? else {
                return Ok(None);
            };
            sink(net.buf.get(..n).unwrap_or_default())?;
            return Ok(Some(Received {
                eof: n == 0,
                kick: false,
            }));
        }
        let free = net.buf.get_mut(net.len..).unwrap_or_default();
        let Some(n) = recv_nonblocking(stream, free)? else {
            return Ok(None);
        };
        if n == 0 {
            return Ok(Some(Received {
                eof: true,
                kick: false,
            }));
        }
        net.len += n;
        self.open(net, sink).map(Some)
    }

    /// Opens the whole records in `net` (into `sink`) and keeps the partial one.
    fn open(
        &self,
        net: &mut NetBuf,
        sink: impl FnMut(&[u8]) -> Result<(), EndError>,
    ) -> Result<Received, EndError> {
        let Some(tls) = &self.tls else {
            return Ok(Received {
                eof: false,
                kick: false,
            });
        };
        let filled = net.buf.get_mut(..net.len).unwrap_or_default();
        let opened = lock(&tls.opener).open(filled, sink)?;
        net.buf.copy_within(opened.consumed..net.len, 0);
        net.len -= opened.consumed;
        Ok(Received {
            eof: opened.closed,
            kick: opened.answer,
        })
    }
}

/// Hands every complete frame of `rx` followed by `bytes` to `handle`, in order, and keeps an
/// incomplete frame at the end in `rx`. Frames are handled straight from `bytes` (a record
/// opened in place); only an incomplete frame at the end is copied to `rx` for the rest. A
/// write whose header ended the last piece takes its data straight from this one.
fn reassemble(
    rx: &mut Vec<u8>,
    mut bytes: &[u8],
    mut handle: impl FnMut(Frame<'_>) -> Result<(), EndError>,
) -> Result<(), EndError> {
    if let Some((f, used)) = frame::split_write(rx, bytes) {
        rx.clear();
        handle(f)?;
        bytes = bytes.get(used..).unwrap_or_default();
    }
    if rx.is_empty() {
        let used = frames(bytes, &mut handle)?;
        rx.extend_from_slice(bytes.get(used..).unwrap_or_default());
    } else {
        rx.extend_from_slice(bytes);
        let used = frames(rx, &mut handle)?;
        rx.drain(..used);
    }
    Ok(())
}

/// Hands the complete frames at the start of `bytes` to `handle`; returns the bytes used.
fn frames(
    bytes: &[u8],
    handle: &mut impl FnMut(Frame<'_>) -> Result<(), EndError>,
) -> Result<usize, EndError> {
    let mut used = 0usize;
    while let Some((f, n)) = frame::parse(bytes.get(used..).unwrap_or_default())? {
        used += n;
        handle(f)?;
    }
    Ok(used)
}

impl Connection {
    /// Reads what the socket holds and handles every complete frame: the peer's requests
    /// (applied here when that keeps the order, else queued for the service thread), replies
    /// to this side's requests (handed to their callers).
    pub(super) fn pump(&self, inner: &Inner, st: &mut RxState) -> Result<Pumped, EndError> {
        let RxState {
            rx,
            net,
            hello,
            early,
        } = st;
        let mut batch = Vec::new();
        let mut batch_bytes = 0usize;
        let sink = |bytes: &[u8]| -> Result<(), EndError> {
            reassemble(rx, bytes, |f| {
                self.frame(inner, f, hello, &mut batch, &mut batch_bytes)
            })
        };
        let got = match self.chan.recv(&self.sock, net, early, sink) {
            Ok(Some(got)) => got,
            Ok(None) => return Ok(Pumped::Nothing),
            Err(e) if self.closed.load(Ordering::Acquire) => {
                tracing::debug!(error = %e, "read after close");
                return Err(EndError::Closed);
            }
            Err(e) => return Err(e),
        };
        *lock(&self.last_rx) = Instant::now();
        if got.kick {
            self.out.kick();
        }
        // Replies to requests applied here go out now, or are left to the writer thread.
        self.flush(Flush::NonBlocking)?;
        if !batch.is_empty() {
            self.inq
                .push_batch(batch, batch_bytes)
                .map_err(|_| EndError::Closed)?;
        }
        if got.eof {
            if self.closed.load(Ordering::Acquire) {
                return Err(EndError::Closed);
            }
            if !*hello {
                return Err(EndError::Protocol(
                    "the peer closed the connection before its hello".into(),
                ));
            }
            if !rx.is_empty() {
                return Err(FrameError::Truncated { have: rx.len() }.into());
            }
            return Ok(Pumped::Eof);
        }
        Ok(Pumped::Data)
    }

    /// Handles one frame from the peer: the first must be its hello; a request is applied
    /// here when nothing is queued before it (the order holds), else added to `batch` for
    /// the service thread (see [`handle`]).
    fn frame(
        &self,
        inner: &Inner,
        f: Frame<'_>,
        hello: &mut bool,
        batch: &mut Vec<Inbound>,
        batch_bytes: &mut usize,
    ) -> Result<(), EndError> {
        if !*hello {
            let Frame::Hello(h) = f else {
                return Err(EndError::Protocol("the first frame is not a hello".into()));
            };
            accept_hello(self, h)?;
            *hello = true;
            inner.link_up();
            return Ok(());
        }
        if batch.is_empty() && self.inq.idle() && inner.apply_inline(self, &f)? {
            return Ok(());
        }
        handle(self, f, batch, batch_bytes)
    }
}

fn accept_hello(session: &Connection, h: Hello) -> Result<(), EndError> {
    if h.version != frame::VERSION {
        return Err(EndError::Protocol(format!(
            "peer speaks protocol version {}, this side {}",
            h.version,
            frame::VERSION
        )));
    }
    *lock(&session.peer) = PeerResources {
        spad_count: usize::from(h.spad_count),
        msg_count: usize::from(h.msg_count),
        db_valid_mask: h.db_valid_mask,
        window_sizes: h.window_sizes,
    };
    session.mark_up();
    Ok(())
}

/// Dispatches one frame after the hello that was not applied at once: a reply to its caller,
/// a translation to the peer's state, a request (owned) to `batch` for the service thread,
/// counting those that need a reply against the peer's credit.
fn handle(
    session: &Connection,
    f: Frame<'_>,
    batch: &mut Vec<Inbound>,
    batch_bytes: &mut usize,
) -> Result<(), EndError> {
    match f {
        Frame::Hello(_) => return Err(EndError::Protocol("a second hello".into())),
        Frame::Ping => {}
        Frame::Trans { window, size } => {
            let mut peer = lock(&session.peer);
            let slot = peer
                .window_sizes
                .get_mut(usize::from(window))
                .ok_or_else(|| EndError::Protocol(format!("translation of window {window}")))?;
            *slot = size;
        }
        Frame::Write {
            window,
            offset,
            data,
        } => {
            *batch_bytes += data.len();
            batch.push(Inbound::Write {
                window,
                offset,
                data: data.to_vec(),
            });
        }
        Frame::Read {
            tag,
            window,
            offset,
            len,
        } => {
            take_credit(session)?;
            *batch_bytes += 32;
            batch.push(Inbound::Read {
                tag,
                window,
                offset,
                len,
            });
        }
        Frame::DbSet { bits } => batch.push(Inbound::DbSet(bits)),
        Frame::SpadWrite { index, value } => batch.push(Inbound::SpadWrite { index, value }),
        Frame::SpadRead { tag, index } => {
            take_credit(session)?;
            batch.push(Inbound::SpadRead { tag, index });
        }
        Frame::MsgWrite { tag, index, value } => {
            take_credit(session)?;
            batch.push(Inbound::MsgWrite { tag, index, value });
        }
        Frame::Reply { tag, status, data } => session.tags.complete(
            tag,
            Reply {
                status,
                data: data.to_vec(),
            },
        ),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::mpsc::sync_channel;
    use std::time::Duration;

    use super::*;
    use crate::frame::Status;
    use crate::session::pending::MAX_OUTSTANDING;
    use crate::session::testing::plain_session;

    /// Whether handling `frame` ends the connection as a protocol error.
    fn protocol_error(session: &Connection, frame: Frame<'_>) -> bool {
        matches!(
            handle(session, frame, &mut Vec::new(), &mut 0),
            Err(EndError::Protocol(_))
        )
    }

    fn encode(frames: &[Frame<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            f.encode(&mut out);
        }
        out
    }

    /// A stream of every kind of frame after the hello, with writes long enough that a cut
    /// falls in their header or their data.
    fn stream() -> Vec<u8> {
        let data: Vec<u8> = (0..200u8).collect();
        encode(&[
            Frame::Ping,
            Frame::Write {
                window: 1,
                offset: 7,
                data: &data,
            },
            Frame::Read {
                tag: 3,
                window: 0,
                offset: 64,
                len: 8,
            },
            Frame::Write {
                window: 0,
                offset: 0,
                data: b"x",
            },
            Frame::DbSet { bits: 5 },
            Frame::Reply {
                tag: 9,
                status: Status::Ok,
                data: &data[..20],
            },
            Frame::Write {
                window: 2,
                offset: u64::MAX - 300,
                data: &data[..150],
            },
            Frame::SpadWrite { index: 1, value: 2 },
        ])
    }

    /// Feeds `bytes` to [`reassemble`] in the given pieces; returns what was handled,
    /// re-encoded, and what was left in the buffer.
    fn feed(bytes: &[u8], cuts: &[usize]) -> (Vec<u8>, Vec<u8>) {
        let mut rx = Vec::new();
        let mut handled = Vec::new();
        let mut at = 0;
        for &cut in cuts.iter().chain([bytes.len()].iter()) {
            reassemble(&mut rx, &bytes[at..cut], |f| {
                f.encode(&mut handled);
                Ok(())
            })
            .unwrap();
            at = cut;
        }
        (handled, rx)
    }

    #[test]
    fn frames_come_out_whole_and_in_order_wherever_the_stream_is_cut() {
        let bytes = stream();
        assert_eq!(feed(&bytes, &[]), (bytes.clone(), vec![]));
        for cut in 0..=bytes.len() {
            assert_eq!(
                feed(&bytes, &[cut]),
                (bytes.clone(), vec![]),
                "cut at {cut}"
            );
        }
        for a in (0..=bytes.len()).step_by(7) {
            for b in (a..=bytes.len()).step_by(5) {
                assert_eq!(
                    feed(&bytes, &[a, b]),
                    (bytes.clone(), vec![]),
                    "cuts {a} {b}"
                );
            }
        }
        // Byte by byte.
        let every: Vec<usize> = (1..bytes.len()).collect();
        assert_eq!(feed(&bytes, &every), (bytes.clone(), vec![]));
    }

    #[test]
    fn an_incomplete_frame_waits_in_the_buffer_and_a_bad_one_is_an_error() {
        let bytes = stream();
        let (handled, left) = feed(&bytes[..bytes.len() - 3], &[]);
        assert_eq!(left.len(), bytes.len() - 3 - handled.len());
        assert!(!left.is_empty());
        let mut rx = Vec::new();
        let err = reassemble(&mut rx, &[0xee; 32], |_| Ok(())).unwrap_err();
        assert!(matches!(err, EndError::Frame(_)), "{err}");
        // The handler's error stops the stream.
        let mut calls = 0;
        let err = reassemble(&mut Vec::new(), &bytes, |_| {
            calls += 1;
            Err(EndError::Protocol("stop".into()))
        })
        .unwrap_err();
        assert!(matches!(err, EndError::Protocol(_)));
        assert_eq!(calls, 1);
    }

    fn dispatch(session: &Connection, frames: &[Frame<'_>]) -> (Vec<Inbound>, usize) {
        let (mut batch, mut bytes) = (Vec::new(), 0);
        for f in frames {
            handle(session, f.clone(), &mut batch, &mut bytes).unwrap();
        }
        (batch, bytes)
    }

    #[test]
    fn requests_are_owned_for_the_service_thread_and_counted_against_credit() {
        let (session, _peer) = plain_session();
        let (batch, bytes) = dispatch(
            &session,
            &[
                Frame::Ping,
                Frame::Write {
                    window: 1,
                    offset: 8,
                    data: b"abcd",
                },
                Frame::Read {
                    tag: 4,
                    window: 0,
                    offset: 16,
                    len: 8,
                },
                Frame::DbSet { bits: 3 },
                Frame::SpadWrite { index: 2, value: 9 },
                Frame::SpadRead { tag: 5, index: 2 },
                Frame::MsgWrite {
                    tag: 6,
                    index: 1,
                    value: 7,
                },
            ],
        );
        assert_eq!(
            batch,
            [
                Inbound::Write {
                    window: 1,
                    offset: 8,
                    data: b"abcd".to_vec()
                },
                Inbound::Read {
                    tag: 4,
                    window: 0,
                    offset: 16,
                    len: 8
                },
                Inbound::DbSet(3),
                Inbound::SpadWrite { index: 2, value: 9 },
                Inbound::SpadRead { tag: 5, index: 2 },
                Inbound::MsgWrite {
                    tag: 6,
                    index: 1,
                    value: 7
                },
            ]
        );
        // The service queue's share: data bytes of writes, 32 per read.
        assert_eq!(bytes, 4 + 32);
        // Three requests need a reply: the peer has MAX_OUTSTANDING - 3 left.
        for _ in 0..MAX_OUTSTANDING - 3 {
            take_credit(&session).unwrap();
        }
        assert!(protocol_error(
            &session,
            Frame::SpadRead { tag: 1, index: 0 }
        ));
    }

    #[test]
    fn a_reply_goes_to_the_caller_waiting_for_its_tag() {
        let (session, _peer) = plain_session();
        let (tx1, rx1) = sync_channel(1);
        let (tx2, rx2) = sync_channel(1);
        let t1 = session.tags.acquire(tx1, Duration::from_secs(60)).unwrap();
        let t2 = session.tags.acquire(tx2, Duration::from_secs(60)).unwrap();
        let (batch, _) = dispatch(
            &session,
            &[Frame::Reply {
                tag: t2,
                status: Status::NoRegion,
                data: b"",
            }],
        );
        assert!(batch.is_empty());
        let got = rx2.try_recv().unwrap();
        assert_eq!((got.status, got.data.len()), (Status::NoRegion, 0));
        assert!(rx1.try_recv().is_err());
        dispatch(
            &session,
            &[Frame::Reply {
                tag: t1,
                status: Status::Ok,
                data: b"12345678",
            }],
        );
        assert_eq!(rx1.try_recv().unwrap().data, b"12345678");
        // A second reply for the same tag finds nobody and is dropped.
        dispatch(
            &session,
            &[Frame::Reply {
                tag: t1,
                status: Status::Ok,
                data: b"",
            }],
        );
    }

    #[test]
    fn a_second_hello_or_an_unknown_window_breaks_the_protocol() {
        let (session, _peer) = plain_session();
        let hello = Hello {
            version: frame::VERSION,
            spad_count: 4,
            msg_count: 2,
            db_valid_mask: 0xff,
            window_sizes: vec![4096, 8192],
        };
        accept_hello(&session, hello.clone()).unwrap();
        assert!(session.is_up());
        assert_eq!(lock(&session.peer).window_sizes, [4096, 8192]);
        dispatch(
            &session,
            &[Frame::Trans {
                window: 1,
                size: 65536,
            }],
        );
        assert_eq!(lock(&session.peer).window_sizes, [4096, 65536]);
        assert!(protocol_error(
            &session,
            Frame::Trans { window: 2, size: 1 }
        ));
        assert!(protocol_error(&session, Frame::Hello(hello)));
    }

    #[test]
    fn a_hello_of_another_version_is_refused() {
        let (session, _peer) = plain_session();
        let hello = Hello {
            version: frame::VERSION + 1,
            spad_count: 0,
            msg_count: 0,
            db_valid_mask: 0,
            window_sizes: vec![],
        };
        assert!(matches!(
            accept_hello(&session, hello),
            Err(EndError::Protocol(_))
        ));
        assert!(!session.is_up());
    }

    /// Waits until `sock` has bytes or an end to read.
    fn readable(sock: &TcpStream) -> bool {
        let mut fds = [rustix::event::PollFd::new(
            sock,
            rustix::event::PollFlags::IN,
        )];
        rustix::event::poll(&mut fds, None).unwrap() == 1
    }

    #[test]
    fn a_plain_channel_hands_over_what_the_socket_holds_and_reports_the_end() {
        let (session, mut peer) = plain_session();
        let mut net = NetBuf {
            buf: vec![0; 64],
            len: 0,
        };
        let mut got = Vec::new();
        let mut sink = |b: &[u8]| {
            got.extend_from_slice(b);
            Ok(())
        };
        let mut recv = || {
            session
                .chan
                .recv(&session.sock, &mut net, &mut None, &mut sink)
                .unwrap()
        };
        assert!(recv().is_none());
        peer.write_all(b"hello").unwrap();
        // Blocks until the bytes are there; then they are handed over whole.
        assert!(readable(&session.sock));
        assert!(!recv().unwrap().eof);
        drop(peer);
        assert!(readable(&session.sock));
        assert!(recv().unwrap().eof);
        assert_eq!(got, b"hello");
    }
}
