//! Completion interrupts (with Interrupt Coalescing) and asynchronous events.

use std::time::{Duration, Instant};

use crate::command::Completion;
use crate::controller::Controller;
use crate::status::Status;

impl Controller {
    /// Interrupt Coalescing for an I/O completion queue on `vector`: the aggregation
    /// threshold (entries) and time, or `None` when interrupts are not delayed.
    pub(crate) fn coalescing(&self, qid: usize, vector: u16) -> Option<(u32, Duration)> {
        let f = &self.features;
        let time_100us = (f.interrupt_coalescing >> 8) & 0xff;
        let disabled = f
            .vector_coalescing_disabled
            .get(usize::from(vector))
            .copied()
            .unwrap_or(true);
        if qid == 0 || time_100us == 0 || disabled {
            return None;
        }
        let threshold = (f.interrupt_coalescing & 0xff) + 1;
        Some((
            threshold,
            Duration::from_micros(100 * u64::from(time_100us)),
        ))
    }

    /// Signals the completion queues with new entries, unless Interrupt Coalescing lets the
    /// interrupt wait (fewer entries than the threshold, and younger than the time limit).
    pub(crate) fn raise_interrupts(&mut self) {
        let now = Instant::now();
        for qid in 0..self.cqs.len() {
            let Some((pending, since, vector, enabled)) = self
                .cqs
                .get(qid)
                .and_then(Option::as_ref)
                .map(|q| (q.pending, q.pending_since, q.vector, q.interrupts))
            else {
                continue;
            };
            if pending == 0 {
                continue;
            }
            let due = match self.coalescing(qid, vector) {
                None => true,
                Some((threshold, time)) => {
                    pending >= threshold
                        || since.is_none_or(|t| now.saturating_duration_since(t) >= time)
                }
            };
            if !due && enabled {
                continue;
            }
            if let Some(cq) = self.cqs.get_mut(qid).and_then(Option::as_mut) {
                cq.pending = 0;
                cq.pending_since = None;
            }
            if enabled && !self.fired.contains(&vector) {
                self.fired.push(vector);
            }
        }
    }

    /// When the earliest interrupt held back by coalescing falls due.
    pub(crate) fn interrupt_deadline(&self) -> Option<Instant> {
        self.cqs
            .iter()
            .enumerate()
            .filter_map(|(qid, q)| {
                let q = q.as_ref()?;
                let (_, time) = self.coalescing(qid, q.vector)?;
                q.pending_since.map(|t| t + time)
            })
            .min()
    }

    /// Whether vectors wait to be signalled.
    pub(crate) fn has_interrupts(&self) -> bool {
        !self.fired.is_empty()
    }

    /// Moves the vectors that must fire into `out` (emptied first). The caller signals them
    /// after releasing the core lock, so an interrupt sink never runs under it.
    pub(crate) fn take_interrupts(&mut self, out: &mut Vec<u16>) {
        out.clear();
        std::mem::swap(&mut self.fired, out);
    }

    // -----------------------------------------------------------------------------------
    // Asynchronous events
    // -----------------------------------------------------------------------------------

    /// Queues an asynchronous event unless its type is masked (reported, not yet acknowledged).
    pub(crate) fn raise_event(&mut self, event_type: u32, info: u32, log_page: u32) {
        if self.masked_event_types & (1 << event_type) != 0 {
            return;
        }
        let dw0 = (event_type & 0x7) | ((info & 0xff) << 8) | ((log_page & 0xff) << 16);
        if !self.events.contains(&dw0) {
            self.events.push_back(dw0);
        }
    }

    /// Completes outstanding Asynchronous Event Requests with queued events.
    pub(crate) fn deliver_events(&mut self) -> bool {
        let mut worked = false;
        while !self.aers.is_empty() && !self.events.is_empty() {
            if self
                .cqs
                .first()
                .and_then(Option::as_ref)
                .is_none_or(|c| c.is_full())
            {
                self.refresh_cq_head(0);
                if self
                    .cqs
                    .first()
                    .and_then(Option::as_ref)
                    .is_none_or(|c| c.is_full())
                {
                    break;
                }
            }
            let (Some(cid), Some(dw0)) = (self.aers.pop(), self.events.pop_front()) else {
                break;
            };
            self.masked_event_types |= 1 << (dw0 & 0x7);
            let sqhd = self
                .sqs
                .first()
                .and_then(Option::as_ref)
                .map_or(0, |q| q.head) as u16;
            self.post(
                0,
                Completion {
                    dw0,
                    dw1: 0,
                    sqhd,
                    sqid: 0,
                    cid,
                    status: Status::SUCCESS,
                },
            );
            worked = true;
        }
        worked
    }
}
