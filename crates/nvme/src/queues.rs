//! Submission and completion queue state as the controller keeps it.
//!
//! Head, tail and size are `u32` values below `entries` (at most 4096): every index update
//! wraps with [`wrap`], and doorbell values a driver writes are checked before use.

use std::sync::atomic::AtomicU32;
use std::sync::Arc;

use devlend_memory::{MemError, MemSpan, SharedMemory};

/// The doorbell registers (SQ tails, CQ heads; slot `2 * qid` and `2 * qid + 1`), kept in one
/// shared page so that a front-end may map it straight into a driver (the doorbell page of
/// BAR0 at `0x1000`): stores there then reach the controller without a trap.
#[derive(Debug)]
pub(crate) struct DoorbellArray {
    mem: Arc<SharedMemory>,
    slots: usize,
}

/// Offset in the doorbell page of the worker's sleep word (non-zero while it sleeps; a futex
/// word, so a writer in any process that maps the page can wake it).
pub(crate) const WAKE_WORD: u64 = DOORBELL_PAGE_BYTES as u64 - 4;

/// Size of the doorbell page.
pub(crate) const DOORBELL_PAGE_BYTES: usize = 4096;

impl DoorbellArray {
    /// A zeroed page with `slots` doorbells (at most 1024).
    pub fn new(slots: usize) -> Result<DoorbellArray, MemError> {
        let mem = Arc::new(SharedMemory::new("nvme-doorbells", DOORBELL_PAGE_BYTES)?);
        Ok(DoorbellArray {
            mem,
            slots: slots.min(DOORBELL_PAGE_BYTES / 4 - 1),
        })
    }

    /// Doorbell `slot`, if it exists.
    pub fn get(&self, slot: usize) -> Option<&AtomicU32> {
        if slot >= self.slots {
            return None;
        }
        self.mem.atomic_u32_at(slot as u64 * 4).ok()
    }

    /// Every doorbell.
    pub fn iter(&self) -> impl Iterator<Item = &AtomicU32> {
        (0..self.slots).filter_map(|s| self.get(s))
    }

    /// The worker's sleep word ([`WAKE_WORD`]).
    pub fn wake_word(&self) -> Option<&AtomicU32> {
        self.mem.atomic_u32_at(WAKE_WORD).ok()
    }

    /// The page itself.
    pub fn page(&self) -> MemSpan {
        MemSpan::whole(self.mem.clone())
    }
}

/// `(index + 1) % entries`.
pub fn wrap(index: u32, entries: u32) -> u32 {
    if index + 1 >= entries {
        0
    } else {
        index + 1
    }
}

/// A submission queue.
#[derive(Debug)]
pub(crate) struct SubmissionQueue {
    /// Base bus address (page aligned).
    pub base: u64,
    /// Entries (1-based).
    pub entries: u32,
    /// Next entry the controller fetches.
    pub head: u32,
    /// Last tail the driver published that the controller accepted.
    pub tail: u32,
    /// Completion queue this queue posts to.
    pub cqid: u16,
    /// Tail comes from the shadow doorbell buffer.
    pub shadow: bool,
    /// Direct mapping of the ring (cached translation, like an IOTLB entry).
    pub ring: Option<MemSpan>,
    /// Commands fetched from it that run on a pool thread and are not yet posted.
    pub in_flight: u32,
    /// Entries fetched by one DMA read that a burst cut short left unrun (see
    /// `Controller::process_burst`): the next pass runs them without fetching them again.
    /// They die with the queue (deleted, or the controller reset).
    pub kept: Option<Fetched>,
}

/// Submission queue entries fetched ahead by one DMA read: those at indices `first` to
/// `first + count - 1` (never across the end of the ring), `count` times 64 bytes.
#[derive(Debug)]
pub(crate) struct Fetched {
    pub first: u32,
    pub count: u32,
    pub bytes: Vec<u8>,
}

impl SubmissionQueue {
    /// A new, empty queue of `entries` at `base` posting to `cqid` (nothing fetched, nothing in
    /// flight): what Create I/O Submission Queue and CC.EN 0 -> 1 (the admin queue) make.
    pub fn new(base: u64, entries: u32, cqid: u16, ring: Option<MemSpan>) -> Self {
        Self {
            base,
            entries,
            head: 0,
            tail: 0,
            cqid,
            shadow: false,
            ring,
            in_flight: 0,
            kept: None,
        }
    }
}

/// A completion queue.
#[derive(Debug)]
pub(crate) struct CompletionQueue {
    /// Base bus address (page aligned).
    pub base: u64,
    /// Entries (1-based).
    pub entries: u32,
    /// Next entry the controller posts to.
    pub tail: u32,
    /// Last head the driver published.
    pub head: u32,
    /// Phase tag of entries posted in the current pass.
    pub phase: bool,
    /// Interrupts enabled.
    pub interrupts: bool,
    /// MSI-X vector.
    pub vector: u16,
    /// Head comes from the shadow doorbell buffer.
    pub shadow: bool,
    /// Entries posted since the last interrupt.
    pub pending: u32,
    /// When the oldest of them was posted.
    pub pending_since: Option<std::time::Instant>,
    /// The tail when this queue's last interrupt was sent, until the host's head reaches it
    /// (see [`crate::NvmeConfig::interrupt_hold`]).
    pub announced: Option<u32>,
    /// Submission queues posting here.
    pub sq_count: u32,
    /// Direct mapping of the ring.
    pub ring: Option<MemSpan>,
    /// Slots promised to commands in flight (see [`crate::inflight`]).
    pub reserved: u32,
    /// Whether its interrupts wait while the host goes on submitting (see [`crate::burst`]).
    pub burst: crate::burst::QueueBurst,
}

impl CompletionQueue {
    /// A new, empty queue of `entries` at `base` (phase 1, nothing posted, no submission
    /// queue yet): what Create I/O Completion Queue and CC.EN 0 -> 1 (the admin queue) make.
    pub fn new(
        base: u64,
        entries: u32,
        interrupts: bool,
        vector: u16,
        ring: Option<MemSpan>,
    ) -> Self {
        Self {
            base,
            entries,
            tail: 0,
            head: 0,
            phase: true,
            interrupts,
            vector,
            shadow: false,
            pending: 0,
            pending_since: None,
            announced: None,
            sq_count: 0,
            ring,
            reserved: 0,
            burst: crate::burst::QueueBurst::default(),
        }
    }

    /// No free slot: posting would overwrite an entry the driver has not consumed.
    pub fn is_full(&self) -> bool {
        wrap(self.tail, self.entries) == self.head
    }

    /// Whether a command may be fetched for this queue: a slot is free beyond those reserved
    /// for commands in flight.
    pub fn has_room(&self) -> bool {
        let posted = (self.tail + self.entries - self.head) % self.entries;
        let free = self.entries.saturating_sub(1).saturating_sub(posted);
        free > self.reserved
    }

    /// Whether `head` is a valid new head: it may only move over posted entries.
    pub fn head_is_valid(&self, head: u32) -> bool {
        if head >= self.entries {
            return false;
        }
        let posted = (self.tail + self.entries - self.head) % self.entries;
        let advance = (head + self.entries - self.head) % self.entries;
        advance <= posted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cq(entries: u32, head: u32, tail: u32) -> CompletionQueue {
        CompletionQueue {
            tail,
            head,
            ..CompletionQueue::new(0, entries, true, 0, None)
        }
    }

    #[test]
    fn full_and_head_checks() {
        assert!(!cq(4, 0, 0).is_full());
        assert!(cq(4, 0, 3).is_full());
        assert!(cq(4, 2, 1).is_full());
        let q = cq(4, 3, 1); // posted: 3, 0
        assert!(q.head_is_valid(3));
        assert!(q.head_is_valid(0));
        assert!(q.head_is_valid(1));
        assert!(!q.head_is_valid(2));
        assert!(!q.head_is_valid(4));
        assert_eq!(wrap(3, 4), 0);
        assert_eq!(wrap(1, 4), 2);
    }

    #[test]
    fn room_counts_reserved_slots() {
        let mut q = cq(4, 0, 1); // one posted, two free
        assert!(q.has_room());
        q.reserved = 1;
        assert!(q.has_room());
        q.reserved = 2;
        assert!(!q.has_room(), "both free slots promised");
        assert!(!q.is_full());
        assert!(!cq(4, 0, 3).has_room());
    }
}
