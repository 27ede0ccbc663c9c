//! Several NVM commands in flight at once.
//!
//! Over a fabric where a DMA is a message (the port gives no direct mapping: the same test as
//! the burst fetch of submission queue entries, a ring without a direct mapping) each DMA read
//! of host memory is a round trip. Run one command at a time and a write waits for its data
//! before the next one's read can start. With [`crate::NvmeConfig::io_workers`] above 1 the
//! worker hands NVM Read and Write commands to that many threads, which walk the PRPs, move
//! the data and do the file I/O without the core lock, then take the lock to post the
//! completion (completion posting, CQ tail and phase, and interrupts stay serialized under it).
//!
//! Bookkeeping, all under the core lock: each submission queue counts its commands in flight
//! (Delete I/O SQ waits for them), each completion queue reserves one slot per command in
//! flight that will post to it (the worker fetches only while a slot is free beyond the
//! reserved ones), and [`Dispatch`] counts them all so that a controller reset, shutdown or
//! function level reset can drain them before it tears the queues down.
//!
//! Lock order: `core`, then [`Dispatch`]'s `in_flight`; its `queue` is taken alone or under
//! `core`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use devlend_pci::DmaPort;
use devlend_sync::{lock, wait};

use crate::command::NvmOp;
use crate::io::{IoCounters, Namespace};
use crate::prp::Segment;
use crate::status::Status;
use crate::transfer::Transfer;

/// A Read or Write taken off a submission queue, with everything needed to run it unlocked.
pub(crate) struct IoJob {
    /// Submission queue it came from.
    pub sqid: u16,
    /// Completion queue it posts to.
    pub cqid: u16,
    /// Command identifier.
    pub cid: u16,
    /// Namespace identifier of the command.
    pub nsid: u32,
    /// The parsed command.
    pub op: NvmOp,
    /// The namespace (its file is shared; `pread`/`pwrite` need no lock).
    pub ns: Arc<Namespace>,
    /// The device's bus-master port.
    pub dma: Arc<dyn DmaPort>,
    /// `CC.MPS` page size when it was fetched.
    pub page_size: u64,
    /// MDTS in bytes.
    pub max_transfer: u64,
    /// Volatile Write Cache enabled when it was fetched.
    pub write_cache: bool,
}

/// A finished [`IoJob`]: what the core posts and adds to its counters.
pub(crate) struct IoDone {
    /// Submission queue it came from.
    pub sqid: u16,
    /// Completion queue it posts to.
    pub cqid: u16,
    /// Command identifier.
    pub cid: u16,
    /// Namespace identifier (for the error log).
    pub nsid: u32,
    /// Completion status.
    pub status: Status,
    /// What the command adds to the SMART counters.
    pub counters: IoCounters,
}

/// A pool thread's scratch space (kept across commands to avoid allocations).
#[derive(Default)]
pub(crate) struct Scratch {
    segs: Vec<Segment>,
    bounce: Vec<u8>,
}

impl IoJob {
    /// Runs the command: PRP walk, DMA and file I/O. No lock is held.
    pub fn run(self, scratch: &mut Scratch) -> IoDone {
        let mut counters = IoCounters::default();
        let mut t = Transfer {
            dma: &*self.dma,
            page_size: self.page_size,
            segs: &mut scratch.segs,
            bounce: &mut scratch.bounce,
        };
        let status = self.ns.execute(
            &mut t,
            &self.op,
            self.nsid,
            self.max_transfer,
            self.write_cache,
            &mut counters,
        );
        IoDone {
            sqid: self.sqid,
            cqid: self.cqid,
            cid: self.cid,
            nsid: self.nsid,
            status,
            counters,
        }
    }
}

struct JobQueue {
    jobs: VecDeque<IoJob>,
    stopped: bool,
}

/// The hand-off between the worker and the pool threads, and the count of commands in flight.
pub(crate) struct Dispatch {
    queue: Mutex<JobQueue>,
    job_ready: Condvar,
    /// Commands handed off and not yet posted.
    in_flight: Mutex<u32>,
    idle: Condvar,
    /// Threads waiting to tear the queues down: while non-zero the worker fetches nothing.
    draining: AtomicU32,
}

impl Dispatch {
    pub fn new() -> Dispatch {
        Dispatch {
            queue: Mutex::new(JobQueue {
                jobs: VecDeque::new(),
                stopped: false,
            }),
            job_ready: Condvar::new(),
            in_flight: Mutex::new(0),
            idle: Condvar::new(),
            draining: AtomicU32::new(0),
        }
    }

    /// Hands `job` to a pool thread (the caller holds the core lock and has counted it on its
    /// queues).
    pub fn submit(&self, job: IoJob) {
        {
            let mut n = lock(&self.in_flight);
            *n = n.saturating_add(1);
        }
        lock(&self.queue).jobs.push_back(job);
        self.job_ready.notify_one();
    }

    /// The next job, waiting for one; `None` once stopped and empty.
    pub fn next(&self) -> Option<IoJob> {
        let mut q = lock(&self.queue);
        loop {
            if let Some(job) = q.jobs.pop_front() {
                return Some(job);
            }
            if q.stopped {
                return None;
            }
            q = wait(&self.job_ready, q);
        }
    }

    /// A job's completion was posted (the caller holds the core lock).
    pub fn finished(&self) {
        let mut n = lock(&self.in_flight);
        *n = n.saturating_sub(1);
        if *n == 0 {
            self.idle.notify_all();
        }
    }

    /// Commands handed off and not yet posted.
    pub fn in_flight(&self) -> u32 {
        *lock(&self.in_flight)
    }

    /// Waits until nothing is in flight (the caller must not hold the core lock: the pool
    /// threads take it to post).
    pub fn wait_idle(&self) {
        let mut n = lock(&self.in_flight);
        while *n > 0 {
            n = wait(&self.idle, n);
        }
    }

    /// Stops the worker from fetching until [`Dispatch::end_drain`].
    pub fn begin_drain(&self) {
        self.draining.fetch_add(1, Ordering::SeqCst);
    }

    /// Ends a [`Dispatch::begin_drain`].
    pub fn end_drain(&self) {
        let _ = self
            .draining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(1))
            });
    }

    /// Whether a reset waits for the commands in flight.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst) != 0
    }

    /// Lets the pool threads finish what is queued and exit.
    pub fn stop(&self) {
        lock(&self.queue).stopped = true;
        self.job_ready.notify_all();
    }
}
