//! Completion interrupts (with Interrupt Coalescing) and asynchronous events.

use std::time::{Duration, Instant};

use crate::command::Completion;
use crate::controller::Controller;
use crate::status::Status;

/// Whether `pending` completions first posted at `since` must be signalled at `now` under
/// `coalescing` (threshold in entries, aggregation time): at the threshold, or once the time
/// has passed since the first of them.
fn interrupt_due(
    pending: u32,
    since: Option<Instant>,
    coalescing: Option<(u32, Duration)>,
    now: Instant,
) -> bool {
    match coalescing {
        None => pending > 0,
        Some((threshold, time)) => {
            pending >= threshold || since.is_none_or(|t| now.saturating_duration_since(t) >= time)
        }
    }
}

impl Controller {
    /// Interrupt Coalescing for an I/O completion queue on `vector`: the aggregation
    /// threshold (entries, THR + 1) and time (TIME in 100 µs units), or `None` when
    /// interrupts are not delayed: the admin queue and vector 0 are never coalesced, nor a
    /// vector with Coalescing Disable set, and an Aggregation Time of 0 means no delay.
    pub(crate) fn coalescing(&self, qid: usize, vector: u16) -> Option<(u32, Duration)> {
        let f = &self.features;
        let time_100us = (f.interrupt_coalescing >> 8) & 0xff;
        let disabled = f
            .vector_coalescing_disabled
            .get(usize::from(vector))
            .copied()
            .unwrap_or(true);
        if qid == 0 || vector == 0 || time_100us == 0 || disabled {
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
        self.raise_interrupts_at(Instant::now());
    }

    /// [`Controller::raise_interrupts`] as of `now` (tests pass their own clock).
    pub(crate) fn raise_interrupts_at(&mut self, now: Instant) {
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
            let due = interrupt_due(pending, since, self.coalescing(qid, vector), now);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::FuzzController;

    fn completion(cid: u16) -> Completion {
        Completion {
            dw0: 0,
            dw1: 0,
            sqhd: 0,
            sqid: 1,
            cid,
            status: Status::SUCCESS,
        }
    }

    fn since(c: &Controller) -> Instant {
        c.cqs[1].as_ref().unwrap().pending_since.unwrap()
    }

    fn fired(c: &mut Controller) -> Vec<u16> {
        let mut v = Vec::new();
        c.take_interrupts(&mut v);
        v
    }

    #[test]
    fn due_at_threshold_or_time() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let c = Some((4, ms(1)));
        assert!(!interrupt_due(3, Some(t), c, t));
        assert!(interrupt_due(4, Some(t), c, t));
        assert!(!interrupt_due(
            1,
            Some(t),
            c,
            t + Duration::from_micros(999)
        ));
        assert!(interrupt_due(1, Some(t), c, t + ms(1)));
        assert!(interrupt_due(1, None, None, t));
        assert!(!interrupt_due(0, None, None, t));
    }

    /// The I/O completion queue of the fuzzing controller (vector 1, interrupts enabled),
    /// with completions posted by hand and the clock passed in: no sleeping.
    #[test]
    fn held_until_threshold_or_time_per_vector() {
        let path = std::env::temp_dir().join(format!(
            "devlend-nvme-coalescing-{}.img",
            std::process::id()
        ));
        let mut f = FuzzController::new(&path).unwrap();
        f.run(&[], &[]);
        let c = f.core();
        assert_eq!(c.cqs[1].as_ref().map(|q| q.vector), Some(1));
        fired(c); // the admin queue's, from creating the queues
                  // THR = 3 (four entries), TIME = 2 (200 µs).
        c.features.interrupt_coalescing = (2 << 8) | 3;
        assert_eq!(c.coalescing(1, 1), Some((4, Duration::from_micros(200))));
        assert_eq!(c.coalescing(0, 0), None, "admin queue");
        assert_eq!(c.coalescing(1, 0), None, "vector 0");
        for cid in 0..3 {
            c.post(1, completion(cid));
        }
        let t0 = since(c);
        c.raise_interrupts_at(t0 + Duration::from_micros(199));
        assert!(fired(c).is_empty(), "three of four, before the time");
        assert_eq!(
            c.interrupt_deadline(),
            Some(t0 + Duration::from_micros(200))
        );
        c.raise_interrupts_at(t0 + Duration::from_micros(200));
        assert_eq!(fired(c), vec![1], "the aggregation time passed");
        assert_eq!(c.interrupt_deadline(), None);
        // Four reach the threshold at once.
        f.consume();
        let c = f.core();
        for cid in 3..7 {
            c.post(1, completion(cid));
        }
        let t1 = since(c);
        c.raise_interrupts_at(t1);
        assert_eq!(fired(c), vec![1], "threshold reached");
        // Coalescing Disable on vector 1: every completion signals.
        c.features.vector_coalescing_disabled[1] = true;
        c.post(1, completion(8));
        c.raise_interrupts_at(since(c));
        assert_eq!(fired(c), vec![1]);
        // Aggregation Time 0: no delay.
        c.features.vector_coalescing_disabled[1] = false;
        c.features.interrupt_coalescing = 3;
        c.post(1, completion(9));
        c.raise_interrupts_at(since(c));
        assert_eq!(fired(c), vec![1]);
        let _ = std::fs::remove_file(&path);
    }
}
