//! A benchmark workload runner: random reads or writes of one block size at a queue depth on
//! one I/O queue, with per-command latency. The local and the lending benchmarks both call
//! [`run`], so a borrowed controller is measured exactly like a local one.

use std::time::{Duration, Instant};

use crate::controller::{Controller, IoRequest};
use crate::error::NvmeError;
use crate::queue::DmaSlice;

/// Access pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random block-aligned reads.
    RandRead,
    /// Uniformly random block-aligned writes.
    RandWrite,
}

impl Pattern {
    /// "randread" or "randwrite".
    pub fn name(self) -> &'static str {
        match self {
            Pattern::RandRead => "randread",
            Pattern::RandWrite => "randwrite",
        }
    }
}

/// When a run stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// After this many completed commands.
    Ops(u64),
    /// After this much time (commands in flight then are completed and counted).
    Duration(Duration),
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Workload {
    /// Access pattern.
    pub pattern: Pattern,
    /// Bytes per command (a multiple of the LBA size, at most MDTS).
    pub block_bytes: usize,
    /// Commands kept outstanding (capped by the queue).
    pub queue_depth: usize,
    /// When to stop.
    pub limit: Limit,
    /// Byte range `(offset, len)` of the namespace to touch; `None` for all of it.
    pub region: Option<(u64, u64)>,
    /// I/O queue index to run on.
    pub queue: usize,
    /// Seed of the offset sequence (same seed, same offsets).
    pub seed: u64,
    /// Consecutive blocks from the start of the region (wrapping at its end) instead of
    /// random ones.
    pub sequential: bool,
}

impl Workload {
    /// 4 KiB random reads or writes at `queue_depth` for `limit`, over the whole namespace.
    pub fn new(pattern: Pattern, queue_depth: usize, limit: Limit) -> Self {
        Self {
            pattern,
            block_bytes: 4096,
            queue_depth,
            limit,
            region: None,
            queue: 0,
            seed: 0x5eed_d1ce,
            sequential: false,
        }
    }

    /// `block_bytes` sequential reads or writes at `queue_depth` for `limit`, from the start
    /// of the namespace.
    pub fn sequential(
        pattern: Pattern,
        block_bytes: usize,
        queue_depth: usize,
        limit: Limit,
    ) -> Self {
        Self {
            block_bytes,
            sequential: true,
            ..Self::new(pattern, queue_depth, limit)
        }
    }
}

/// What a run measured: a summary of its per-command latencies (a result, not a set of
/// running counters; those are `devlend-metrics`').
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// Commands completed.
    pub ops: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Wall time from first submission to last completion.
    pub elapsed: Duration,
    /// Commands per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_per_s: f64,
    /// Mean latency, submission to reaped completion, in microseconds.
    pub mean_us: f64,
    /// Median latency in microseconds.
    pub median_us: f64,
    /// 99th percentile latency in microseconds.
    pub p99_us: f64,
    /// Largest latency in microseconds.
    pub max_us: f64,
}

impl Summary {
    /// Summarises per-command latencies (microseconds) over `elapsed`.
    pub fn from_latencies(mut lat_us: Vec<f64>, bytes_per_op: u64, elapsed: Duration) -> Self {
        let ops = lat_us.len() as u64;
        let secs = elapsed.as_secs_f64();
        let per_sec = |x: f64| if secs > 0.0 { x / secs } else { 0.0 };
        let mean_us = if lat_us.is_empty() {
            0.0
        } else {
            lat_us.iter().sum::<f64>() / lat_us.len() as f64
        };
        let median_us = devlend_bench::median(&mut lat_us);
        let p99_us = devlend_bench::percentile(&mut lat_us, 99.0);
        let max_us = lat_us.last().copied().unwrap_or(0.0);
        Self {
            ops,
            bytes: ops * bytes_per_op,
            elapsed,
            iops: per_sec(ops as f64),
            mib_per_s: per_sec((ops * bytes_per_op) as f64 / (1024.0 * 1024.0)),
            mean_us,
            median_us,
            p99_us,
            max_us,
        }
    }
}

/// A deterministic xorshift64* sequence of block-aligned byte offsets inside a region, the
/// same for the device and for a file baseline given the same seed.
#[derive(Clone, Debug)]
pub struct Offsets {
    state: u64,
    start: u64,
    slots: u64,
    block: u64,
}

impl Offsets {
    /// Offsets of `block` bytes inside `[start, start + len)`; `None` when no block fits.
    pub fn new(seed: u64, start: u64, len: u64, block: u64) -> Option<Self> {
        let slots = len.checked_div(block).filter(|&s| s > 0)?;
        Some(Self {
            // xorshift must not start at zero.
            state: seed | 1,
            start,
            slots,
            block,
        })
    }
}

impl Iterator for Offsets {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        Some(self.start + (r % self.slots) * self.block)
    }
}

/// Runs `w` on `ctrl` and measures it. Any failed command ends the run with its error.
pub fn run(ctrl: &Controller, w: &Workload) -> Result<Summary, NvmeError> {
    let lba = u64::from(ctrl.lba_bytes());
    let block = w.block_bytes as u64;
    if block == 0 || !block.is_multiple_of(lba) || block > ctrl.max_transfer_bytes() {
        return Err(NvmeError::InvalidRequest(format!(
            "block size {block} must be a non-zero multiple of {lba} and at most {}",
            ctrl.max_transfer_bytes()
        )));
    }
    let capacity = ctrl.capacity_bytes();
    let (start, len) = w.region.unwrap_or((0, capacity));
    if start % lba != 0 || start.checked_add(len).is_none_or(|end| end > capacity) {
        return Err(NvmeError::OutOfRange {
            offset: start,
            len,
            capacity,
        });
    }
    let mut offsets = Offsets::new(w.seed, start, len, block).ok_or_else(|| {
        NvmeError::InvalidRequest(format!("region of {len} bytes holds no {block}-byte block"))
    })?;
    let mut q = ctrl.io_queue(w.queue)?;
    let depth = w.queue_depth.clamp(1, q.capacity());
    let write = w.pattern == Pattern::RandWrite;
    let blocks = (block / lba) as u32;

    // One buffer per outstanding command, written once with a recognisable pattern.
    let mut buffers = Vec::with_capacity(depth);
    for i in 0..depth {
        let buf = ctrl.alloc_dma(w.block_bytes)?;
        if write {
            let fill: Vec<u8> = (0..w.block_bytes).map(|j| (i + j) as u8).collect();
            buf.write_at(0, &fill)?;
        }
        buffers.push(DmaSlice::whole(buf));
    }
    let mut free: Vec<usize> = (0..depth).rev().collect();
    let mut started = vec![Instant::now(); depth];
    let mut latencies: Vec<f64> = Vec::new();
    let mut done = Vec::with_capacity(depth);
    let timeout = ctrl.config().io_timeout;

    let begin = Instant::now();
    let mut submitted = 0u64;
    let mut completed = 0u64;
    loop {
        let more = match w.limit {
            Limit::Ops(n) => submitted < n,
            Limit::Duration(d) => begin.elapsed() < d,
        };
        // Commands under 128 KiB that fit go with one doorbell write: one posted write (one
        // message on a fabric, with their entries and data when they go into the CMB) and one
        // fetch by the device for the lot, as Linux's blk-mq plugs a batch. Larger ones ring
        // each as it is placed: with one doorbell for eight 128 KiB writes over tcp the
        // sequential write row lost about half its bandwidth in most runs
        // (docs/MEASUREMENTS.md, issue #13).
        let plug = (w.block_bytes as u64) < crate::queue::DEFER_FLUSH_BYTES;
        let posted = plug.then(devlend_sync::posted::Batch::begin);
        while more && !free.is_empty() {
            if let Limit::Ops(n) = w.limit {
                if submitted >= n {
                    break;
                }
            }
            let Some(slot) = free.pop() else { break };
            let data = buffers
                .get(slot)
                .cloned()
                .ok_or_else(|| NvmeError::InvalidRequest("workload slot".into()))?;
            let at = if w.sequential {
                // Slot `submitted` of the region, wrapping (the region holds at least one).
                start + (submitted % (len / block)) * block
            } else {
                offsets.next().unwrap_or(start)
            };
            let lba_at = at / lba;
            let req = if write {
                IoRequest::Write {
                    lba: lba_at,
                    blocks,
                    data,
                }
            } else {
                IoRequest::Read {
                    lba: lba_at,
                    blocks,
                    data,
                }
            };
            if let Some(t) = started.get_mut(slot) {
                *t = Instant::now();
            }
            if plug {
                q.submit_deferred(req, slot as u64)?;
            } else {
                q.submit(req, slot as u64)?;
            }
            submitted += 1;
        }
        q.ring()?;
        drop(posted);
        if q.in_flight() == 0 {
            break;
        }
        done.clear();
        q.reap(&mut done, 1, timeout)?;
        let now = Instant::now();
        for c in &done {
            if !c.status.is_success() {
                return Err(NvmeError::Command {
                    what: if write {
                        "workload write"
                    } else {
                        "workload read"
                    },
                    status: c.status,
                });
            }
            let slot = c.tag as usize;
            if let Some(t) = started.get(slot) {
                latencies.push(devlend_bench::micros(now.duration_since(*t)));
            }
            free.push(slot);
            completed += 1;
        }
    }
    let elapsed = begin.elapsed();
    debug_assert_eq!(completed, latencies.len() as u64);
    Ok(Summary::from_latencies(latencies, block, elapsed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_aligned_inside_and_repeatable() {
        let a: Vec<u64> = Offsets::new(7, 8192, 40960, 4096)
            .unwrap()
            .take(200)
            .collect();
        let b: Vec<u64> = Offsets::new(7, 8192, 40960, 4096)
            .unwrap()
            .take(200)
            .collect();
        assert_eq!(a, b);
        assert!(a
            .iter()
            .all(|&o| o >= 8192 && o + 4096 <= 8192 + 40960 && o % 4096 == 0));
        // All ten slots get used.
        let mut seen: Vec<u64> = a.clone();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 10);
        assert!(Offsets::new(1, 0, 100, 4096).is_none());
        assert!(Offsets::new(1, 0, 100, 0).is_none());
    }

    #[test]
    fn stats_summarise() {
        let s = Summary::from_latencies(vec![3.0, 1.0, 2.0, 4.0], 4096, Duration::from_secs(2));
        assert_eq!(s.ops, 4);
        assert_eq!(s.iops, 2.0);
        assert_eq!(s.median_us, 2.0);
        assert_eq!(s.p99_us, 4.0);
        assert_eq!(s.max_us, 4.0);
        assert_eq!(s.mean_us, 2.5);
        let empty = Summary::from_latencies(Vec::new(), 4096, Duration::ZERO);
        assert_eq!(empty.iops, 0.0);
    }
}
