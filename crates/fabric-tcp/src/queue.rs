//! The two bounded queues of a connection: frames waiting to be sent, and inbound requests
//! waiting for the service thread.

use devlend_sync::lock;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// How long a blocked producer sleeps before re-checking whether the queue closed (a guard
/// only: closing wakes every waiter).
const RECHECK: Duration = Duration::from_millis(500);

/// The queue was closed (the connection ended).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Closed;

struct OutState {
    buf: Vec<u8>,
    request_bytes: usize,
    closed: bool,
    kick: bool,
    /// Producers waiting for space, and whether the writer waits (a condition variable's
    /// notify is a system call even with no one to wake, so it is made only for a waiter).
    space_waiters: usize,
    writer_waiting: bool,
}

/// Encoded frames waiting for the writer thread, as one byte buffer (so that whatever is
/// queued goes out in one batch). Requests (this side's own traffic) are bounded: a producer
/// waits while more than `limit` bytes of requests are queued. Replies and control frames are
/// not held back: replies are bounded by the peer's outstanding-request credit, control frames
/// by the number of windows.
pub(crate) struct OutQueue {
    state: Mutex<OutState>,
    ready: Condvar,
    space: Condvar,
    limit: usize,
}

/// What the writer saw in [`OutQueue::wait`].
pub(crate) enum Take {
    /// Bytes to send, or a flush request.
    Data,
    /// Nothing was queued for the whole wait.
    Idle,
    /// The queue is closed and empty.
    Closed,
}

impl OutQueue {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(OutState {
                buf: Vec::new(),
                request_bytes: 0,
                closed: false,
                kick: false,
                space_waiters: 0,
                writer_waiting: false,
            }),
            ready: Condvar::new(),
            space: Condvar::new(),
            limit: limit.max(1),
        }
    }

    /// Appends a request, waiting while the queue is over its limit.
    pub(crate) fn push_request(&self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<(), Closed> {
        let mut st = lock(&self.state);
        while !st.closed && st.request_bytes >= self.limit {
            self.ready.notify_one();
            st.space_waiters += 1;
            st = devlend_sync::wait_timeout(&self.space, st, RECHECK).0;
            st.space_waiters -= 1;
        }
        if st.closed {
            return Err(Closed);
        }
        let before = st.buf.len();
        encode(&mut st.buf);
        st.request_bytes += st.buf.len() - before;
        Ok(())
    }

    /// Appends a reply or control frame without waiting.
    pub(crate) fn push_now(&self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<(), Closed> {
        let mut st = lock(&self.state);
        if st.closed {
            return Err(Closed);
        }
        encode(&mut st.buf);
        Ok(())
    }

    /// Asks the writer to flush (TLS records the reader's processing produced).
    pub(crate) fn kick(&self) {
        let mut st = lock(&self.state);
        st.kick = true;
        if st.writer_waiting {
            self.ready.notify_one();
        }
    }

    /// Waits up to `idle` until something is queued (or a flush was asked for).
    pub(crate) fn wait(&self, idle: Duration) -> Take {
        let mut st = lock(&self.state);
        st.writer_waiting = true;
        let (mut st, _) = devlend_sync::wait_timeout_while(&self.ready, st, idle, |s| {
            s.buf.is_empty() && !s.kick && !s.closed
        });
        st.writer_waiting = false;
        if st.closed {
            Take::Closed
        } else if st.buf.is_empty() && !st.kick {
            Take::Idle
        } else {
            Take::Data
        }
    }

    /// Swaps whatever is queued into `out` (which must be empty) without waiting; returns
    /// whether there was anything (or a flush request).
    pub(crate) fn take_now(&self, out: &mut Vec<u8>) -> Result<bool, Closed> {
        let mut st = lock(&self.state);
        if st.closed {
            return Err(Closed);
        }
        if st.buf.is_empty() && !st.kick {
            return Ok(false);
        }
        std::mem::swap(&mut st.buf, out);
        st.request_bytes = 0;
        st.kick = false;
        let waiters = st.space_waiters > 0;
        drop(st);
        if waiters {
            self.space.notify_all();
        }
        Ok(true)
    }

    /// Wakes the writer thread.
    pub(crate) fn notify_writer(&self) {
        if lock(&self.state).writer_waiting {
            self.ready.notify_one();
        }
    }

    /// Closes the queue: producers fail, the writer stops.
    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_all();
        self.space.notify_all();
    }
}

struct InState<T> {
    items: VecDeque<T>,
    bytes: usize,
    closed: bool,
    /// The service thread is applying a batch it took.
    busy: bool,
    /// The reader waits for space, the service thread for items (notified only then).
    space_waiting: bool,
    ready_waiting: bool,
}

/// Inbound requests for the service thread, bounded in bytes: the reader waits (and so stops
/// reading the socket, which pushes back on the peer through TCP) while it is full.
pub(crate) struct InQueue<T> {
    state: Mutex<InState<T>>,
    ready: Condvar,
    space: Condvar,
    limit: usize,
}

impl<T> InQueue<T> {
    pub(crate) fn new(limit: usize) -> Self {
        Self {
            state: Mutex::new(InState {
                items: VecDeque::new(),
                bytes: 0,
                closed: false,
                busy: false,
                space_waiting: false,
                ready_waiting: false,
            }),
            ready: Condvar::new(),
            space: Condvar::new(),
            limit: limit.max(1),
        }
    }

    /// Appends a batch of `bytes` total size, waiting while the queue is over its limit.
    pub(crate) fn push_batch(&self, batch: Vec<T>, bytes: usize) -> Result<(), Closed> {
        let mut st = lock(&self.state);
        while !st.closed && st.bytes >= self.limit {
            st.space_waiting = true;
            st = devlend_sync::wait_timeout(&self.space, st, RECHECK).0;
            st.space_waiting = false;
        }
        if st.closed {
            return Err(Closed);
        }
        st.items.extend(batch);
        st.bytes += bytes;
        let waiting = st.ready_waiting;
        drop(st);
        if waiting {
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Takes everything queued, waiting for something; `None` once closed and drained.
    pub(crate) fn pop_all(&self) -> Option<(Vec<T>, usize)> {
        let mut st = lock(&self.state);
        while st.items.is_empty() && !st.closed {
            st.ready_waiting = true;
            st = devlend_sync::wait(&self.ready, st);
            st.ready_waiting = false;
        }
        if st.items.is_empty() {
            return None;
        }
        let items: Vec<T> = st.items.drain(..).collect();
        let bytes = std::mem::take(&mut st.bytes);
        st.busy = true;
        let waiting = st.space_waiting;
        drop(st);
        if waiting {
            self.space.notify_all();
        }
        Some((items, bytes))
    }

    /// The service thread finished the batch it took.
    pub(crate) fn done(&self) {
        lock(&self.state).busy = false;
    }

    /// Nothing is queued and the service thread is not applying anything: the reader may
    /// apply a request itself without breaking the order.
    pub(crate) fn idle(&self) -> bool {
        let st = lock(&self.state);
        st.items.is_empty() && !st.busy
    }

    /// Closes the queue: what is queued is still handed out, new batches are refused.
    pub(crate) fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_all();
        self.space.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn requests_block_at_the_limit_until_the_writer_takes() {
        let q = Arc::new(OutQueue::new(10));
        q.push_request(|b| b.extend_from_slice(&[1; 12])).unwrap();
        let q2 = q.clone();
        let producer = std::thread::spawn(move || {
            let r = q2.push_request(|b| b.push(2));
            q2.notify_writer();
            r
        });
        let mut out = Vec::new();
        assert!(matches!(q.wait(RECHECK), Take::Data));
        assert_eq!(q.take_now(&mut out), Ok(true));
        assert_eq!(out.len(), 12);
        producer.join().unwrap().unwrap();
        out.clear();
        assert!(matches!(q.wait(RECHECK), Take::Data));
        assert_eq!(q.take_now(&mut out), Ok(true));
        assert_eq!(out, [2]);
        out.clear();
        assert_eq!(q.take_now(&mut out), Ok(false));
        q.push_now(|b| b.push(3)).unwrap();
        q.close();
        assert_eq!(q.push_request(|b| b.push(4)), Err(Closed));
        assert!(matches!(q.wait(RECHECK), Take::Closed));
        assert_eq!(q.take_now(&mut out), Err(Closed));
    }

    #[test]
    fn inbound_queue_drains_after_close() {
        let q: InQueue<u8> = InQueue::new(4);
        q.push_batch(vec![1, 2], 8).unwrap();
        q.close();
        assert_eq!(q.push_batch(vec![3], 1), Err(Closed));
        assert!(!q.idle());
        assert_eq!(q.pop_all(), Some((vec![1, 2], 8)));
        assert!(!q.idle());
        q.done();
        assert!(q.idle());
        assert_eq!(q.pop_all(), None);
    }
}
