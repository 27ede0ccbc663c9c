//! Sending: moving queued frames to the socket. Whoever holds the send lock writes; callers
//! write themselves when the lock is free (latency), and what they cannot send is left to the
//! writer thread. With TLS, records are sealed in order into a sealed queue by whoever has
//! frames (a bulk writer seals while the writer thread sends: two cores share the work), and
//! sent by the holder of the send lock.

use std::collections::VecDeque;
use std::io::{IoSlice, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use devlend_fabric::FabricError;

use super::{nonblocking, Connection, EndError};
use crate::frame::{self, Frame};
use crate::ntb::Inner;
use crate::queue::Take;
use crate::record::{WireBuf, MAX_PLAINTEXT};
use devlend_sync::{lock, try_lock};

/// Buffers of the sender that holds [`Connection::send`].
#[derive(Default)]
pub(super) struct SendState {
    /// Plaintext frames taken from the queue.
    batch: Vec<u8>,
    /// Wire bytes (TLS records or plain frames) not yet written to the socket, oldest first.
    wire: WireBuf,
}

/// Sealed records waiting for the socket, oldest first, and spare buffers.
#[derive(Default)]
pub(super) struct Sealed {
    bufs: VecDeque<WireBuf>,
    bytes: usize,
    free: Vec<WireBuf>,
    space_waiting: bool,
}

/// Most bytes of sealed records a bulk writer may have waiting for the socket.
const SEALED_LIMIT: usize = 1 << 20;
/// A caller with a bulk write that waits for space is woken when the sealed queue is down to
/// this (so that it seals several groups per wake-up).
const SEALED_RESUME: usize = SEALED_LIMIT / 2;
/// Bytes of posted writes a bulk writer seals per buffer.
const SEAL_GROUP: usize = 1 << 18;
/// Posted writes up to this size are sent by the calling thread when the socket is free
/// (latency); larger ones are left to the writer thread while the caller seals the next part.
const INLINE_WRITE: usize = 64 * 1024;
/// Spare sealed-record buffers kept.
const FREE_BUFS: usize = 8;

/// How a thread moves queued frames to the socket (see [`Connection::flush`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flush {
    /// The writer thread: waits for the send lock, blocks on the socket.
    Writer,
    /// A caller: sends itself unless someone else is sending (then the writer thread is
    /// woken); may block on the socket (back-pressure).
    Caller,
    /// The reader and service threads: never block, on the lock or on the socket; what
    /// cannot go out now is left to the writer thread.
    NonBlocking,
}

/// Most bytes of posted writes gathered into one system call.
const SEND_BATCH: usize = 1 << 20;

/// `write_all` over several buffers (one `writev` per round).
fn write_all_vectored(sock: &TcpStream, mut parts: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        match (&*sock).write_vectored(parts) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut parts, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes what the socket takes without blocking; returns the bytes written.
fn send_nonblocking(sock: &TcpStream, data: &[u8]) -> std::io::Result<usize> {
    // SAFETY: `data` is a valid buffer of `data.len()` bytes for the whole call, and the
    // descriptor belongs to `sock`.
    let sent = nonblocking(|| unsafe {
        libc::send(
            sock.as_raw_fd(),
            data.as_ptr().cast(),
            data.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    })?;
    Ok(sent.unwrap_or(0))
}

impl Connection {
    /// A posted write of `data` (any length) at `offset` of the peer's `window`. Plain TCP: sent
    /// by this thread straight from `data` when no one else is sending (after what is queued,
    /// so the order holds), else queued for whoever is. TLS: see
    /// [`Connection::write_posted_sealed`].
    pub(crate) fn write_posted(
        &self,
        window: u16,
        offset: u64,
        data: &[u8],
    ) -> Result<(), FabricError> {
        if self.chan.is_tls() {
            return self.write_posted_sealed(window, offset, data).map_err(|e| {
                tracing::debug!(error = %e, "fabric send failed");
                FabricError::LinkDown
            });
        }
        let down = |_| FabricError::LinkDown;
        let Some(mut st) = try_lock(&self.send) else {
            self.queue_posted(window, offset, data)?;
            self.out.notify_writer();
            return Ok(());
        };
        let SendState { batch, wire } = &mut *st;
        let io = |e: std::io::Error| {
            tracing::debug!(error = %e, "fabric send failed");
            FabricError::LinkDown
        };
        // What was queued before goes first.
        batch.clear();
        if self.out.take_now(batch).map_err(down)? {
            wire.extend_from_slice(batch);
        }
        // Frames go out in batches of up to SEND_BATCH bytes per system call: the kernel pushes
        // each write at once (TCP_NODELAY), so small writes would mean small segments.
        let pieces: Vec<&[u8]> = data.chunks(frame::MAX_DATA).collect();
        let mut at = offset;
        for group in pieces.chunks(SEND_BATCH / frame::MAX_DATA) {
            let mut headers = Vec::with_capacity(group.len());
            for piece in group {
                headers.push(frame::write_header(window, at, piece.len()));
                at += piece.len() as u64;
            }
            let mut parts = Vec::with_capacity(1 + 2 * group.len());
            parts.push(IoSlice::new(wire));
            for (h, piece) in headers.iter().zip(group) {
                parts.push(IoSlice::new(h));
                parts.push(IoSlice::new(piece));
            }
            write_all_vectored(&self.sock, &mut parts).map_err(io)?;
            wire.clear();
        }
        if !wire.is_empty() {
            (&self.sock).write_all(wire).map_err(io)?;
            wire.clear();
        }
        Ok(())
    }

    /// Queues a posted write of `data` at `offset` of the peer's `window` behind what is
    /// queued, without sending it: the caller flushes later (the end of a posted-write
    /// batch). Sealed (TLS) or sent with the other queued frames, so small writes share
    /// records and system calls.
    pub(crate) fn queue_posted(
        &self,
        window: u16,
        offset: u64,
        data: &[u8],
    ) -> Result<(), FabricError> {
        let mut at = offset;
        for piece in data.chunks(frame::MAX_DATA) {
            self.out
                .push_request(|b| {
                    Frame::Write {
                        window,
                        offset: at,
                        data: piece,
                    }
                    .encode(b)
                })
                .map_err(|_| FabricError::LinkDown)?;
            at += piece.len() as u64;
        }
        Ok(())
    }

    /// Moves queued frames to the socket, as `how` allows. Frames that stay queued are sent
    /// by the writer thread, which this wakes.
    pub(crate) fn flush(&self, how: Flush) -> Result<(), EndError> {
        if self.chan.is_tls() {
            return self.flush_sealed(how);
        }
        let mut st = match how {
            Flush::Writer => lock(&self.send),
            Flush::Caller | Flush::NonBlocking => match try_lock(&self.send) {
                Some(g) => g,
                None => {
                    self.out.notify_writer();
                    return Ok(());
                }
            },
        };
        let SendState { batch, wire } = &mut *st;
        loop {
            batch.clear();
            if self.out.take_now(batch).map_err(|_| EndError::Closed)? {
                wire.extend_from_slice(batch);
            }
            if wire.is_empty() {
                return Ok(());
            }
            if !self.write_wire(wire, how)? {
                return Ok(());
            }
        }
    }

    /// Writes `wire` to the socket: all of it (blocking), or for [`Flush::NonBlocking`] what
    /// the socket takes now, keeping the rest and asking the writer thread to send it.
    /// Returns whether everything went out.
    fn write_wire(&self, wire: &mut WireBuf, how: Flush) -> Result<bool, EndError> {
        if how == Flush::NonBlocking {
            let n = send_nonblocking(&self.sock, wire)?;
            wire.consume(n);
            if !wire.is_empty() {
                self.out.kick();
                return Ok(false);
            }
        } else {
            (&self.sock).write_all(wire)?;
            wire.clear();
        }
        Ok(true)
    }

    /// TLS posted write: each frame one record, sealed in groups into the sealed queue (in
    /// order after what was queued before); small writes are then sent by this thread when
    /// the socket is free, bulk ones by the writer thread while this one seals on.
    fn write_posted_sealed(&self, window: u16, offset: u64, data: &[u8]) -> Result<(), EndError> {
        let piece_len = MAX_PLAINTEXT - frame::WRITE_HEADER_LEN;
        let pieces: Vec<&[u8]> = data.chunks(piece_len).collect();
        let mut at = offset;
        for group in pieces.chunks(SEAL_GROUP / piece_len) {
            self.wait_sealed_space()?;
            let mut frames = Vec::with_capacity(group.len());
            for piece in group {
                frames.push((frame::write_header(window, at, piece.len()), *piece));
                at += piece.len() as u64;
            }
            self.seal_queued(&frames, true)?;
            if data.len() > INLINE_WRITE {
                self.out.kick();
            } else {
                self.flush_sealed(Flush::Caller)?;
            }
        }
        Ok(())
    }

    /// Waits while the sealed queue is over its limit.
    fn wait_sealed_space(&self) -> Result<(), EndError> {
        let mut q = lock(&self.sealed);
        while q.bytes >= SEALED_LIMIT {
            if self.closed.load(Ordering::Acquire) {
                return Err(EndError::Closed);
            }
            q.space_waiting = true;
            self.out.kick();
            q = self
                .sealed_space
                .wait_timeout(q, self.keepalive_interval)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Seals what the send queue holds, then `frames` (header and data each), into one buffer
    /// of the sealed queue; the sealer's lock keeps the queue in sealing order. Without `wait`
    /// nothing is sealed while another thread seals: the writer thread is asked to seal what
    /// is queued later. Returns whether anything was sealed.
    fn seal_queued(
        &self,
        frames: &[([u8; frame::WRITE_HEADER_LEN], &[u8])],
        wait: bool,
    ) -> Result<bool, EndError> {
        let tls = self.chan.tls.as_ref().ok_or(EndError::Closed)?;
        let Some(mut sealer) = (if wait {
            Some(lock(&tls.sealer))
        } else {
            try_lock(&tls.sealer)
        }) else {
            self.out.kick();
            return Ok(false);
        };
        let mut batch = Vec::new();
        let took = self
            .out
            .take_now(&mut batch)
            .map_err(|_| EndError::Closed)?;
        if !took && frames.is_empty() {
            return Ok(false);
        }
        let mut buf = lock(&self.sealed).free.pop().unwrap_or_default();
        buf.clear();
        sealer.seal_writes(&batch, frames, &mut buf)?;
        let mut q = lock(&self.sealed);
        if buf.is_empty() {
            q.free.push(buf);
        } else {
            q.bytes += buf.len();
            q.bufs.push_back(buf);
        }
        Ok(true)
    }

    /// The oldest buffer of sealed records, if any (a bulk-writing caller waiting for space is
    /// woken when enough has gone).
    fn pop_sealed(&self) -> Option<WireBuf> {
        let mut q = lock(&self.sealed);
        let buf = q.bufs.pop_front()?;
        q.bytes -= buf.len();
        let wake = q.space_waiting && q.bytes <= SEALED_RESUME;
        if wake {
            q.space_waiting = false;
        }
        drop(q);
        if wake {
            // After the lock is dropped: the woken caller would otherwise block on it at once.
            self.sealed_space.notify_all();
        }
        Some(buf)
    }

    /// TLS flush: writes the sealed queue as `how` allows, sealing what the send queue holds
    /// once the sealed queue is empty. The reader and service threads never wait for a thread
    /// that is sealing: the writer thread seals their frames after it.
    fn flush_sealed(&self, how: Flush) -> Result<(), EndError> {
        let wait = how != Flush::NonBlocking;
        let mut st = match how {
            Flush::Writer => lock(&self.send),
            Flush::Caller | Flush::NonBlocking => {
                self.seal_queued(&[], wait)?;
                match try_lock(&self.send) {
                    Some(g) => g,
                    None => {
                        // The holder may have finished just before: the writer makes sure.
                        self.out.kick();
                        return Ok(());
                    }
                }
            }
        };
        loop {
            if st.wire.is_empty() {
                match self.pop_sealed() {
                    Some(buf) => {
                        let old = std::mem::replace(&mut st.wire, buf);
                        let mut q = lock(&self.sealed);
                        if q.free.len() < FREE_BUFS {
                            q.free.push(old);
                        }
                    }
                    None if self.seal_queued(&[], wait)? => continue,
                    None => return Ok(()),
                }
            }
            if !self.write_wire(&mut st.wire, how)? {
                return Ok(());
            }
        }
    }
}

/// The writer thread: sends what is queued, and a keepalive when idle.
pub(super) fn writer_loop(inner: &Inner, session: &Connection) {
    loop {
        match session.out.wait(inner.cfg.keepalive_interval) {
            Take::Closed => break,
            Take::Idle => {
                if session.out.push_now(|b| Frame::Ping.encode(b)).is_err() {
                    break;
                }
            }
            Take::Data => {}
        }
        match session.flush(Flush::Writer) {
            Ok(()) => {}
            Err(EndError::Closed) => break,
            Err(e) => {
                tracing::debug!(error = %e, "fabric send failed");
                inner.link_down(session);
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::Arc;

    use super::*;
    use crate::session::testing::{plain_session, tls_sessions};

    /// Reads `n` bytes from `sock`.
    fn read_exact(mut sock: &TcpStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        sock.read_exact(&mut got).unwrap();
        got
    }

    fn parse_all(mut bytes: &[u8]) -> Vec<Frame<'_>> {
        let mut frames = Vec::new();
        while let Some((f, n)) = frame::parse(bytes).unwrap() {
            frames.push(f);
            bytes = &bytes[n..];
        }
        assert!(bytes.is_empty());
        frames
    }

    /// The write frames of a posted write of `data` at `offset` of window 3.
    fn writes(offset: u64, data: &[u8], piece: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = offset;
        for p in data.chunks(piece) {
            Frame::Write {
                window: 3,
                offset: at,
                data: p,
            }
            .encode(&mut out);
            at += p.len() as u64;
        }
        out
    }

    #[test]
    fn a_caller_sends_what_is_queued() {
        let (session, peer) = plain_session();
        session.out.push_now(|b| Frame::Ping.encode(b)).unwrap();
        session
            .out
            .push_request(|b| Frame::SpadRead { tag: 4, index: 1 }.encode(b))
            .unwrap();
        session.flush(Flush::Caller).unwrap();
        let mut want = Vec::new();
        Frame::Ping.encode(&mut want);
        Frame::SpadRead { tag: 4, index: 1 }.encode(&mut want);
        assert_eq!(read_exact(&peer, want.len()), want);
    }

    #[test]
    fn a_plain_posted_write_goes_out_in_frames_after_what_was_queued() {
        let (session, peer) = plain_session();
        let data: Vec<u8> = (0..3 * frame::MAX_DATA + 17).map(|i| i as u8).collect();
        let mut want = Vec::new();
        Frame::DbSet { bits: 1 }.encode(&mut want);
        want.extend(writes(1000, &data, frame::MAX_DATA));
        let reader = std::thread::spawn(move || read_exact(&peer, want.len()) == want);
        session
            .out
            .push_now(|b| Frame::DbSet { bits: 1 }.encode(b))
            .unwrap();
        session.write_posted(3, 1000, &data).unwrap();
        assert!(reader.join().unwrap());
    }

    /// What a posted-write batch relies on: queued posted writes stay in the sender until a
    /// flush, then leave in order after what was queued before them, in one write.
    #[test]
    fn queued_posted_writes_wait_for_a_flush_and_keep_their_order() {
        let (session, peer) = plain_session();
        session
            .out
            .push_now(|b| Frame::DbSet { bits: 1 }.encode(b))
            .unwrap();
        session.queue_posted(3, 0, &[7u8; 64]).unwrap();
        session.queue_posted(3, 64, &[8u8; 16]).unwrap();
        peer.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        assert_eq!(
            (&peer).read(&mut byte).unwrap_err().kind(),
            std::io::ErrorKind::WouldBlock,
            "nothing was sent before the flush"
        );
        peer.set_nonblocking(false).unwrap();
        session.flush(Flush::Caller).unwrap();
        let mut want = Vec::new();
        Frame::DbSet { bits: 1 }.encode(&mut want);
        want.extend(writes(0, &[7u8; 64], frame::MAX_DATA));
        want.extend(writes(64, &[8u8; 16], frame::MAX_DATA));
        assert_eq!(read_exact(&peer, want.len()), want);
    }

    #[test]
    fn a_nonblocking_flush_leaves_what_the_socket_does_not_take_to_the_writer() {
        let (session, peer) = plain_session();
        // Fill the socket's buffers (the peer reads nothing yet).
        let filler = vec![0x5a; 64 * 1024];
        let mut sent = 0;
        loop {
            let n = send_nonblocking(&session.sock, &filler).unwrap();
            if n == 0 {
                break;
            }
            sent += n;
        }
        session
            .out
            .push_now(|b| Frame::DbSet { bits: 2 }.encode(b))
            .unwrap();
        // Returns at once; the frame waits in the sender's buffer, and the writer is asked.
        session.flush(Flush::NonBlocking).unwrap();
        assert!(!lock(&session.send).wire.is_empty());
        assert!(matches!(
            session.out.wait(std::time::Duration::ZERO),
            Take::Data
        ));
        let mut want = Vec::new();
        Frame::DbSet { bits: 2 }.encode(&mut want);
        let reader = std::thread::spawn(move || {
            let got = read_exact(&peer, sent + want.len());
            got[..sent].iter().all(|b| *b == 0x5a) && got[sent..] == want
        });
        session.flush(Flush::Writer).unwrap();
        assert!(lock(&session.send).wire.is_empty());
        assert!(reader.join().unwrap());
    }

    /// What `session` receives until `n` bytes of frames came, re-encoded.
    fn receive(session: &Connection, n: usize) -> Vec<u8> {
        let mut plain = Vec::new();
        while plain.len() < n {
            let mut fds = [rustix::event::PollFd::new(
                &session.sock,
                rustix::event::PollFlags::IN,
            )];
            rustix::event::poll(&mut fds, None).unwrap();
            session.rx.first(|st| {
                let sink = |b: &[u8]| {
                    plain.extend_from_slice(b);
                    Ok(())
                };
                session
                    .chan
                    .recv(&session.sock, &mut st.net, &mut st.early, sink)
                    .unwrap();
            });
        }
        plain
    }

    #[test]
    fn tls_posted_writes_are_sealed_in_order_small_and_bulk() {
        let (a, b) = tls_sessions();
        let (a, b) = (Arc::new(a), Arc::new(b));
        let piece = MAX_PLAINTEXT - frame::WRITE_HEADER_LEN;
        let small: Vec<u8> = (0..100u8).collect();
        // Larger than INLINE_WRITE and than one sealing group, within the sealed limit.
        let bulk: Vec<u8> = (0..SEAL_GROUP + 3 * piece + 5).map(|i| i as u8).collect();
        assert!(bulk.len() > INLINE_WRITE && bulk.len() < SEALED_LIMIT);
        let mut want = Vec::new();
        Frame::Ping.encode(&mut want);
        want.extend(writes(0, &small, piece));
        want.extend(writes(1 << 20, &bulk, piece));
        let n = want.len();
        let receiver = {
            let b = b.clone();
            std::thread::spawn(move || receive(&b, n))
        };
        a.out.push_now(|b| Frame::Ping.encode(b)).unwrap();
        // Small: sealed and sent by this thread.
        a.write_posted(3, 0, &small).unwrap();
        // Bulk: sealed here, left to the writer thread (here: a writer flush).
        a.write_posted(3, 1 << 20, &bulk).unwrap();
        assert!(lock(&a.sealed).bytes > 0);
        a.flush(Flush::Writer).unwrap();
        assert_eq!(lock(&a.sealed).bytes, 0);
        let got = receiver.join().unwrap();
        assert_eq!(parse_all(&got), parse_all(&want));
    }
}
