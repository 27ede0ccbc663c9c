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
            // Asked once per queue and pass: it decides both the wait and the announcement.
            let hold = enabled && self.hold_applies(qid);
            if hold && self.held_for_host(qid, now) {
                continue;
            }
            let coalescing = self.coalescing(qid, vector);
            let due = interrupt_due(pending, since, coalescing, now);
            if !due && enabled {
                continue;
            }
            // Adaptive moderation, where the host left coalescing off (see `crate::burst`).
            let max = self.burst_hold;
            if hold && coalescing.is_none() {
                let burst = since.zip(self.cqs.get_mut(qid).and_then(Option::as_mut));
                if burst.is_some_and(|(t, cq)| cq.burst.holds(max, t, now)) {
                    continue;
                }
            }
            if let Some(cq) = self.cqs.get_mut(qid).and_then(Option::as_mut) {
                cq.pending = 0;
                cq.pending_since = None;
                cq.announced = hold.then_some(cq.tail);
                if enabled {
                    cq.burst.signalled();
                }
            }
            if enabled && !self.fired.contains(&vector) {
                self.fired.push(vector);
            }
        }
    }

    /// Whether I/O completion queue `qid`'s new entries wait for their interrupt because the
    /// host is still reading what the previous one announced ([`NvmeConfig::interrupt_hold`]):
    /// its head has not reached the tail of then. Once the head reaches it, the entries the
    /// host has not read are signalled; entries it read already need no interrupt, and are
    /// dropped from `pending`. The caller asks only where [`Controller::hold_applies`]: the
    /// head is read from memory this device maps (the doorbell register, or a shadow doorbell
    /// in mapped memory) and the ring is mapped too.
    ///
    /// [`NvmeConfig::interrupt_hold`]: crate::NvmeConfig::interrupt_hold
    fn held_for_host(&mut self, qid: usize, now: Instant) -> bool {
        let Some((announced, since)) = self
            .cqs
            .get(qid)
            .and_then(Option::as_ref)
            .and_then(|q| Some((q.announced?, q.pending_since)))
        else {
            return false;
        };
        self.refresh_cq_head(qid);
        let Some(cq) = self.cqs.get_mut(qid).and_then(Option::as_mut) else {
            return false;
        };
        let entries = cq.entries.max(1);
        // Entries posted since the interrupt, and how far past its tail the head is (a head
        // short of it comes out larger than any count of new entries: the ring never holds
        // more than `entries - 1`).
        let posted = (cq.tail + entries - announced) % entries;
        let read = (cq.head + entries - announced) % entries;
        if read <= posted {
            cq.announced = None;
            if cq.head == cq.tail {
                // The host read every entry: nothing is left to announce.
                cq.pending = 0;
                cq.pending_since = None;
                return true;
            }
            return false;
        }
        since.is_some_and(|t| now.saturating_duration_since(t) < self.interrupt_hold)
    }

    /// Whether I/O completion queue `qid`'s interrupts may wait for the host to read what the
    /// previous one announced: a hold is configured, and the device reads the queue's ring
    /// and head from memory it maps (no message to learn the head).
    pub(crate) fn hold_applies(&self, qid: usize) -> bool {
        let shadow_mapped = self.dbbuf.as_ref().is_some_and(|d| d.shadow_span.is_some());
        qid != 0
            && !self.interrupt_hold.is_zero()
            && self
                .cqs
                .get(qid)
                .and_then(Option::as_ref)
                .is_some_and(|q| q.ring.is_some() && (!q.shadow || shadow_mapped))
    }

    /// When the earliest interrupt held back falls due: by coalescing, or while the host
    /// reads what the previous interrupt announced.
    pub(crate) fn interrupt_deadline(&self) -> Option<Instant> {
        self.cqs
            .iter()
            .enumerate()
            .filter_map(|(qid, q)| {
                let q = q.as_ref()?;
                let since = q.pending_since?;
                let held =
                    (q.announced.is_some() && q.pending > 0).then(|| since + self.interrupt_hold);
                let coalesced = self.coalescing(qid, q.vector).map(|(_, time)| since + time);
                let burst = q
                    .burst
                    .holding()
                    .then(|| q.burst.hold_until(since, self.burst_hold));
                held.into_iter().chain(coalesced).chain(burst).min()
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
    use devlend_pci::DmaAccess;
    use std::sync::atomic::Ordering;

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
        // Coalescing alone (the hold has its own test).
        c.interrupt_hold = Duration::ZERO;
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

    /// The fuzzing controller with the ring of its I/O completion queue in memory the device
    /// maps, as over `shm` (the head doorbell is mapped too), the interrupt hold at 100 µs,
    /// and the admin queue's interrupt taken. The image is at the path returned.
    fn mapped_queue(name: &str) -> (FuzzController, std::path::PathBuf) {
        let path =
            std::env::temp_dir().join(format!("devlend-nvme-{name}-{}.img", std::process::id()));
        let mut f = FuzzController::new(&path).unwrap();
        f.run(&[], &[]);
        f.consume();
        let c = f.core();
        fired(c);
        c.interrupt_hold = Duration::from_micros(100);
        // The harness maps every other page: give the queue a ring in a mapped one (its
        // entries go there; these tests read none of them).
        assert!(!c.hold_applies(1), "a ring reached by messages");
        let mapped = c.ring(
            crate::fuzzing::HOST_BASE + 0x4000,
            16 * 16,
            DmaAccess::Write,
        );
        assert!(mapped.is_some());
        c.cqs[1].as_mut().unwrap().ring = mapped;
        assert!(c.hold_applies(1));
        (f, path)
    }

    /// The host's head doorbell moved by hand and the clock passed in.
    #[test]
    fn held_while_the_host_reads_what_the_last_interrupt_announced() {
        let (mut f, path) = mapped_queue("interrupt-hold");
        let c = f.core();
        let us = Duration::from_micros;
        assert!(!c.hold_applies(0), "never the admin queue");
        let base = c.cqs[1].as_ref().unwrap().tail;
        let head = |c: &mut Controller, at: u32| {
            c.doorbells.get(3).unwrap().store(at, Ordering::SeqCst);
        };
        // Nothing announced yet: signalled at once.
        c.post(1, completion(0));
        c.raise_interrupts_at(since(c));
        assert_eq!(fired(c), vec![1]);
        // A second completion while the host has not read the first: held, until the hold's
        // time at the latest.
        c.post(1, completion(1));
        let t1 = since(c);
        c.raise_interrupts_at(t1 + us(99));
        assert!(fired(c).is_empty());
        assert_eq!(c.interrupt_deadline(), Some(t1 + us(100)));
        // The host read the first only: the second is signalled as soon as that shows.
        head(c, base + 1);
        c.raise_interrupts_at(t1 + us(1));
        assert_eq!(fired(c), vec![1]);
        // A third, held; the host then reads the second and the third: nothing to signal.
        c.post(1, completion(2));
        c.raise_interrupts_at(since(c));
        assert!(fired(c).is_empty());
        head(c, base + 3);
        c.raise_interrupts_at(since(c));
        assert!(fired(c).is_empty(), "the host read it already");
        assert_eq!(c.cqs[1].as_ref().unwrap().pending, 0);
        assert_eq!(c.interrupt_deadline(), None);
        // A completion after the host read everything is signalled at once; the next one,
        // unread, waits the hold's time and no longer.
        c.post(1, completion(3));
        c.raise_interrupts_at(since(c));
        assert_eq!(fired(c), vec![1]);
        c.post(1, completion(4));
        let t4 = since(c);
        c.raise_interrupts_at(t4 + us(99));
        assert!(fired(c).is_empty());
        c.raise_interrupts_at(t4 + us(100));
        assert_eq!(fired(c), vec![1], "the hold's time passed");
        // No hold configured: every pass's completions are signalled.
        c.interrupt_hold = Duration::ZERO;
        c.post(1, completion(5));
        c.raise_interrupts_at(since(c));
        assert_eq!(fired(c), vec![1]);
        c.post(1, completion(6));
        c.raise_interrupts_at(since(c));
        assert_eq!(fired(c), vec![1]);
        let _ = std::fs::remove_file(&path);
    }

    /// Adaptive moderation (`crate::burst`) on a queue the device maps, the host reading
    /// every entry at once: off until its probe; the probe is held while commands arrive and
    /// signalled one gap after the last; the rule is then on; Interrupt Coalescing set by the
    /// host replaces it.
    #[test]
    fn held_while_commands_arrive_once_holding_pays() {
        let (mut f, path) = mapped_queue("burst-hold");
        let c = f.core();
        let us = Duration::from_micros;
        c.burst_hold = us(200);
        let arrived = |c: &mut Controller, t: Instant| {
            c.cqs[1].as_mut().unwrap().burst.arrived(t, us(200));
        };
        let read_all = |c: &mut Controller| {
            let tail = c.cqs[1].as_ref().unwrap().tail;
            c.doorbells.get(3).unwrap().store(tail, Ordering::SeqCst);
        };
        // Off: every completion signalled at once, up to the probe.
        for cid in 0..crate::burst::PROBE_EVERY {
            arrived(c, Instant::now());
            c.post(1, completion(cid as u16));
            c.raise_interrupts_at(since(c));
            assert_eq!(fired(c), vec![1], "completion {cid}");
            read_all(c);
        }
        // The probe: held while a command arrives within the gap.
        c.post(1, completion(0));
        let t0 = since(c);
        arrived(c, t0);
        c.raise_interrupts_at(t0);
        assert!(fired(c).is_empty(), "the probe holds");
        let first = c.interrupt_deadline().unwrap();
        assert!(first <= t0 + us(200));
        arrived(c, t0 + us(1));
        let then = c.interrupt_deadline().unwrap();
        assert!(then > first, "an arrival moves the end of the hold");
        c.raise_interrupts_at(then - Duration::from_nanos(1));
        assert!(fired(c).is_empty());
        c.raise_interrupts_at(then);
        assert_eq!(fired(c), vec![1], "one gap after the last arrival");
        read_all(c);
        // On: the next completion is held at once.
        c.post(1, completion(1));
        let t1 = since(c);
        arrived(c, t1);
        c.raise_interrupts_at(t1);
        assert!(fired(c).is_empty(), "the rule is on");
        c.raise_interrupts_at(c.interrupt_deadline().unwrap());
        assert_eq!(fired(c), vec![1], "no command came within the gap");
        read_all(c);
        // The host's own Interrupt Coalescing (one entry, 100 µs) replaces the rule.
        c.features.interrupt_coalescing = 1 << 8;
        c.post(1, completion(2));
        c.raise_interrupts_at(since(c));
        assert_eq!(fired(c), vec![1]);
        let _ = std::fs::remove_file(&path);
    }
}
