//! Requests waiting for replies, both ways. This side's requests ([`Tags`]): each gets a tag
//! that its reply carries back, and at most [`MAX_OUTSTANDING`] are outstanding (callers
//! beyond wait for a free tag). The peer's requests ([`Inflight`]): the peer may have at most
//! [`MAX_OUTSTANDING`] unanswered, else it breaks the protocol.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use devlend_fabric::FabricError;

use super::{Connection, EndError, Flush, Reply};
use crate::frame::{Frame, Status};
use crate::ntb::Inner;
use devlend_sync::lock;

/// Most requests needing a reply (reads, scratchpad reads, message writes) that one side may
/// have outstanding; a peer exceeding it breaks the protocol.
pub(crate) const MAX_OUTSTANDING: usize = 256;

struct Table {
    next_tag: u32,
    waiters: HashMap<u32, SyncSender<Reply>>,
    open: bool,
    /// Callers waiting for a free tag (`credit` is notified only then: a notify is a system
    /// call even with no one to wake).
    starved: usize,
}

/// This side's requests waiting for their replies, by tag.
pub(super) struct Tags {
    table: Mutex<Table>,
    credit: Condvar,
}

impl Tags {
    pub(super) fn new() -> Self {
        Self {
            table: Mutex::new(Table {
                next_tag: 0,
                waiters: HashMap::new(),
                open: true,
                starved: 0,
            }),
            credit: Condvar::new(),
        }
    }

    /// A free tag for a request whose reply goes to `tx`; waits while [`MAX_OUTSTANDING`]
    /// requests are outstanding (`timeout` a wait, again until one is free).
    /// [`FabricError::LinkDown`] once closed.
    pub(super) fn acquire(
        &self,
        tx: SyncSender<Reply>,
        timeout: Duration,
    ) -> Result<u32, FabricError> {
        let mut p = lock(&self.table);
        while p.open && p.waiters.len() >= MAX_OUTSTANDING {
            p.starved += 1;
            p = self
                .credit
                .wait_timeout(p, timeout)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            p.starved -= 1;
        }
        if !p.open {
            return Err(FabricError::LinkDown);
        }
        let mut tag = p.next_tag;
        while p.waiters.contains_key(&tag) {
            tag = tag.wrapping_add(1);
        }
        p.next_tag = tag.wrapping_add(1);
        p.waiters.insert(tag, tx);
        Ok(tag)
    }

    /// Frees `tag`, returning its waiter.
    pub(super) fn release(&self, tag: u32) -> Option<SyncSender<Reply>> {
        let mut p = lock(&self.table);
        let waiter = p.waiters.remove(&tag);
        if p.starved > 0 {
            self.credit.notify_one();
        }
        waiter
    }

    /// Hands `reply` to the caller waiting for `tag`, if any.
    pub(super) fn complete(&self, tag: u32, reply: Reply) {
        match self.release(tag) {
            Some(tx) => {
                let _ = tx.try_send(reply);
            }
            // A reply to a request that timed out here: nobody waits for it any more.
            None => tracing::debug!(tag, "reply to a forgotten request"),
        }
    }

    /// Refuses new tags; dropping the senders wakes every waiting caller with
    /// "disconnected", and callers waiting for a tag get [`FabricError::LinkDown`].
    pub(super) fn close(&self) {
        {
            let mut p = lock(&self.table);
            p.open = false;
            p.waiters.clear();
        }
        self.credit.notify_all();
    }
}

/// The peer's requests received but not yet answered.
pub(super) struct Inflight(AtomicUsize);

impl Inflight {
    pub(super) fn new() -> Self {
        Self(AtomicUsize::new(0))
    }

    /// Counts one more request of the peer; an error if it has too many outstanding.
    fn take(&self) -> Result<(), EndError> {
        if self.0.fetch_add(1, Ordering::AcqRel) >= MAX_OUTSTANDING {
            return Err(EndError::Protocol(format!(
                "more than {MAX_OUTSTANDING} outstanding requests"
            )));
        }
        Ok(())
    }

    /// One request of the peer was answered.
    fn answered(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Counts a request of the peer that needs a reply (see [`Inflight`]).
pub(crate) fn take_credit(session: &Connection) -> Result<(), EndError> {
    session.inflight.take()
}

impl Connection {
    /// Sends a request that needs a reply and waits for it (at most `timeout`).
    pub(crate) fn call(
        &self,
        inner: &Inner,
        timeout: Duration,
        encode: impl FnOnce(u32, &mut Vec<u8>),
    ) -> Result<Reply, FabricError> {
        let (tx, rx) = sync_channel(1);
        let tag = self.tags.acquire(tx, timeout)?;
        let forget = || self.tags.release(tag);
        if self.out.push_request(|b| encode(tag, b)).is_err() || self.flush(Flush::Caller).is_err()
        {
            forget();
            return Err(FabricError::LinkDown);
        }
        match self.await_reply(inner, &rx, Instant::now() + timeout) {
            Err(FabricError::Timeout) => {
                forget();
                Err(FabricError::Timeout)
            }
            other => other,
        }
    }

    /// Sends `count` requests that need replies, all of them before awaiting the first (one
    /// flush: they leave together), and waits for every reply (at most `timeout` after they
    /// were sent). `encode(i, tag, buf)` encodes request `i`. The replies come back in
    /// request order. The caller keeps `count` well below [`MAX_OUTSTANDING`]: tags are
    /// taken one by one, so callers each holding some while waiting for more could wait
    /// on each other.
    pub(crate) fn call_many(
        &self,
        inner: &Inner,
        timeout: Duration,
        count: usize,
        mut encode: impl FnMut(usize, u32, &mut Vec<u8>),
    ) -> Result<Vec<Reply>, FabricError> {
        let mut waiting = Vec::with_capacity(count);
        let forget = |waiting: &[(u32, Receiver<Reply>)]| {
            for (tag, _) in waiting {
                self.tags.release(*tag);
            }
        };
        for i in 0..count {
            let (tx, rx) = sync_channel(1);
            let tag = match self.tags.acquire(tx, timeout) {
                Ok(tag) => tag,
                Err(e) => {
                    forget(&waiting);
                    return Err(e);
                }
            };
            waiting.push((tag, rx));
            if self.out.push_request(|b| encode(i, tag, b)).is_err() {
                forget(&waiting);
                return Err(FabricError::LinkDown);
            }
        }
        if self.flush(Flush::Caller).is_err() {
            forget(&waiting);
            return Err(FabricError::LinkDown);
        }
        let deadline = Instant::now() + timeout;
        let mut replies = Vec::with_capacity(count);
        for (i, (_, rx)) in waiting.iter().enumerate() {
            match self.await_reply(inner, rx, deadline) {
                Ok(r) => replies.push(r),
                Err(e) => {
                    // Those still unanswered are forgotten (a late reply is dropped).
                    forget(waiting.get(i..).unwrap_or_default());
                    return Err(e);
                }
            }
        }
        Ok(replies)
    }

    /// Queues the reply to one of the peer's requests.
    pub(crate) fn reply(&self, tag: u32, status: Status, data: &[u8]) {
        let _ = self
            .out
            .push_now(|b| Frame::Reply { tag, status, data }.encode(b));
        self.inflight.answered();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};
    use std::sync::Arc;

    use super::*;

    fn reply(byte: u8) -> Reply {
        Reply {
            status: Status::Ok,
            data: vec![byte],
        }
    }

    fn acquire(tags: &Tags) -> (u32, Receiver<Reply>) {
        let (tx, rx) = sync_channel(1);
        (tags.acquire(tx, Duration::from_secs(60)).unwrap(), rx)
    }

    fn next_tag(tags: &Tags) -> u32 {
        lock(&tags.table).next_tag
    }

    #[test]
    fn tags_count_up_and_a_reply_reaches_its_own_caller() {
        let tags = Tags::new();
        let (a, ra) = acquire(&tags);
        let (b, rb) = acquire(&tags);
        assert_eq!((a, b), (0, 1));
        tags.complete(b, reply(2));
        assert!(matches!(ra.try_recv(), Err(TryRecvError::Empty)));
        assert_eq!(rb.try_recv().unwrap().data, [2]);
        // The tag is free again, its sender gone.
        assert!(tags.release(b).is_none());
        tags.complete(a, reply(1));
        assert_eq!(ra.try_recv().unwrap().data, [1]);
        // A reply for a tag nobody waits for (timed out, or never used) is dropped.
        tags.complete(a, reply(9));
        tags.complete(77, reply(9));
        assert!(lock(&tags.table).waiters.is_empty());
    }

    #[test]
    fn tags_wrap_around_and_skip_those_still_in_use() {
        let tags = Tags::new();
        let (zero, _r0) = acquire(&tags);
        let (one, _r1) = acquire(&tags);
        assert_eq!((zero, one), (0, 1));
        lock(&tags.table).next_tag = u32::MAX;
        let (last, _rl) = acquire(&tags);
        assert_eq!(last, u32::MAX);
        // 0 and 1 are still outstanding: the next free tag after the wrap is 2.
        let (two, _r2) = acquire(&tags);
        assert_eq!(two, 2);
        assert_eq!(next_tag(&tags), 3);
        // A released tag is used again when the counter comes round to it.
        tags.release(zero);
        lock(&tags.table).next_tag = u32::MAX;
        // u32::MAX is in use: skipped, then 0 is free.
        let (again, _ra) = acquire(&tags);
        assert_eq!(again, 0);
    }

    #[test]
    fn a_caller_beyond_the_limit_waits_for_a_released_tag() {
        let tags = Arc::new(Tags::new());
        let held: Vec<_> = (0..MAX_OUTSTANDING).map(|_| acquire(&tags)).collect();
        let waiter = {
            let tags = tags.clone();
            std::thread::spawn(move || acquire(&tags).0)
        };
        // The extra caller is starved: observe it, then free one tag.
        while lock(&tags.table).starved == 0 {
            std::thread::yield_now();
        }
        assert_eq!(lock(&tags.table).waiters.len(), MAX_OUTSTANDING);
        let freed = held.get(7).unwrap().0;
        tags.release(freed);
        let got = waiter.join().unwrap();
        // The count is what is limited; the counter goes on past the released tag.
        assert_eq!(got, MAX_OUTSTANDING as u32);
        assert!(!lock(&tags.table).waiters.contains_key(&freed));
        assert_eq!(lock(&tags.table).starved, 0);
        assert_eq!(lock(&tags.table).waiters.len(), MAX_OUTSTANDING);
    }

    #[test]
    fn closing_wakes_the_waiting_callers_and_those_starved_of_tags() {
        let tags = Arc::new(Tags::new());
        let held: Vec<_> = (0..MAX_OUTSTANDING).map(|_| acquire(&tags)).collect();
        let starved = {
            let tags = tags.clone();
            std::thread::spawn(move || {
                let (tx, _rx) = sync_channel(1);
                tags.acquire(tx, Duration::from_secs(60))
            })
        };
        while lock(&tags.table).starved == 0 {
            std::thread::yield_now();
        }
        tags.close();
        assert!(matches!(
            starved.join().unwrap(),
            Err(FabricError::LinkDown)
        ));
        for (_, rx) in &held {
            assert!(matches!(rx.try_recv(), Err(TryRecvError::Disconnected)));
        }
        // No new tag once closed.
        let (tx, _rx) = sync_channel(1);
        assert!(matches!(
            tags.acquire(tx, Duration::from_secs(60)),
            Err(FabricError::LinkDown)
        ));
    }

    #[test]
    fn the_peer_may_have_max_outstanding_requests_unanswered_and_no_more() {
        let inflight = Inflight::new();
        for _ in 0..MAX_OUTSTANDING {
            inflight.take().unwrap();
        }
        assert!(matches!(inflight.take(), Err(EndError::Protocol(_))));
        // The refused one counted too: two answers make room for one more.
        inflight.answered();
        assert!(matches!(inflight.take(), Err(EndError::Protocol(_))));
        inflight.answered();
        inflight.answered();
        inflight.take().unwrap();
    }

    #[test]
    fn a_reply_to_the_peer_is_queued_and_returns_its_credit() {
        let (session, _peer) = super::super::testing::plain_session();
        for _ in 0..MAX_OUTSTANDING {
            take_credit(&session).unwrap();
        }
        session.reply(5, Status::Ok, b"abc");
        take_credit(&session).unwrap();
        assert!(take_credit(&session).is_err());
        let mut queued = Vec::new();
        assert!(session.out.take_now(&mut queued).unwrap());
        let (f, n) = crate::frame::parse(&queued).unwrap().unwrap();
        assert_eq!(n, queued.len());
        assert_eq!(
            f,
            Frame::Reply {
                tag: 5,
                status: Status::Ok,
                data: b"abc"
            }
        );
    }
}
