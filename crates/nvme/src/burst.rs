//! Adaptive interrupt moderation: holding a completion's interrupt while the host goes on
//! submitting ([`crate::NvmeConfig::burst_hold`]).
//!
//! Why: a host with many commands outstanding whose threads submit one command at a time (a
//! guest's 32 threads each with one O_DIRECT read, on one vCPU) looks to a fast device like
//! a host at QD1: every command is completed before the next arrives, and every completion
//! gets its interrupt. Each interrupt costs such a guest tens of microseconds of its vCPU, and
//! its IOPS follow how many completions each one carries (docs/MEASUREMENTS.md, "What the idle
//! QD32 guest row lacks"). A fixed aggregation time would cost a QD1 host its whole length on
//! every command. What tells the two apart is what holding does: a host at QD1 sends nothing
//! while it waits for its interrupt, a host with more to submit goes on submitting. So, as a
//! network card's adaptive moderation does with packet rates, the device learns it:
//!
//! - while the rule is on for a queue, a completion's interrupt waits as long as commands keep
//!   arriving (each within the *gap*: twice the recent spacing of arrivals), and never longer
//!   than the configured maximum after the oldest entry was posted;
//! - a hold during which a command arrived *paid*; after [`MISSES_OFF`] holds in a row that did
//!   not, the rule goes off for the queue (a QD1 host pays that once, a few gaps in all);
//! - while off, one hold in [`PROBE_EVERY`] interrupts is tried, and turns the rule back on if
//!   it pays.
//!
//! Each completion queue counts the commands of the submission queues that post to it: a
//! thread waiting on one queue is not kept waiting by another thread's submissions on
//! another. Only where the interrupt hold applies (the device reads the
//! completion queue and its head from memory it maps), and never when the host set Interrupt
//! Coalescing itself: then its settings alone apply.

use std::time::{Duration, Instant};

/// Holds in a row that saw no command arrive before the rule goes off for a queue.
pub(crate) const MISSES_OFF: u8 = 4;
/// While the rule is off for a queue, one of this many of its interrupts is held as a probe.
pub(crate) const PROBE_EVERY: u32 = 256;
/// The shortest gap waited for the next command.
const MIN_GAP: Duration = Duration::from_micros(2);

/// Arrivals of the commands whose completions go to one queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Arrivals {
    /// Commands fetched so far.
    count: u64,
    last: Option<Instant>,
    /// Moving average of the spacing of arrivals closer than the longest hold.
    spacing: Duration,
}

impl Arrivals {
    /// How long after the last arrival a holding queue waits for the next, holding at most
    /// `max`.
    fn gap(&self, max: Duration) -> Duration {
        self.spacing
            .saturating_mul(2)
            .clamp(MIN_GAP, max.max(MIN_GAP))
    }
}

/// One completion queue's rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct QueueBurst {
    arrivals: Arrivals,
    on: bool,
    misses: u8,
    /// Interrupts sent while off, towards the next probe.
    since_off: u32,
    /// While holding: the arrival count when the hold began.
    holding_from: Option<u64>,
}

impl QueueBurst {
    /// A command that posts to this queue was fetched at `now`; `max` is the longest hold
    /// (zero: the rule is off, and nothing is counted).
    pub(crate) fn arrived(&mut self, now: Instant, max: Duration) {
        if max.is_zero() {
            return;
        }
        let a = &mut self.arrivals;
        a.count = a.count.wrapping_add(1);
        if let Some(g) = a.last.map(|t| now.saturating_duration_since(t)) {
            if g < max {
                // Seven parts the old average, one part the new gap.
                a.spacing = (a.spacing.saturating_mul(7).saturating_add(g)) / 8;
            }
        }
        a.last = Some(now);
    }

    /// When a hold of entries whose oldest was posted at `since` ends, if no command arrives
    /// first: one gap after the last arrival, and never more than `max` after `since`.
    pub(crate) fn hold_until(&self, since: Instant, max: Duration) -> Instant {
        let cap = since.checked_add(max).unwrap_or(since);
        let a = &self.arrivals;
        let next = a
            .last
            .and_then(|t| t.checked_add(a.gap(max)))
            .unwrap_or(since);
        cap.min(next)
    }

    /// Whether the interrupt of entries first posted at `since` waits at `now`, holding at
    /// most `max`. When it does not after a hold, the hold is scored.
    pub(crate) fn holds(&mut self, max: Duration, since: Instant, now: Instant) -> bool {
        if max.is_zero() {
            return false;
        }
        let count = self.arrivals.count;
        let from = match self.holding_from {
            Some(from) => from,
            None if self.on || self.since_off >= PROBE_EVERY => {
                self.since_off = 0;
                self.holding_from = Some(count);
                count
            }
            None => return false,
        };
        if now < self.hold_until(since, max) {
            return true;
        }
        self.holding_from = None;
        if count != from {
            self.on = true;
            self.misses = 0;
        } else {
            self.misses = self.misses.saturating_add(1);
            if !self.on || self.misses >= MISSES_OFF {
                self.on = false;
                self.misses = 0;
            }
        }
        false
    }

    /// An interrupt was sent for this queue.
    pub(crate) fn signalled(&mut self) {
        if !self.on {
            self.since_off = self.since_off.saturating_add(1);
        }
    }

    /// Whether a hold is under way (its end is an interrupt deadline).
    pub(crate) fn holding(&self) -> bool {
        self.holding_from.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    const MAX: Duration = Duration::from_micros(200);

    /// Off at first; the probe of the 256th interrupt pays (a command arrives during it), the
    /// rule is then on; a host that stops submitting turns it off after four dry holds.
    #[test]
    fn probes_turn_it_on_and_dry_holds_turn_it_off() {
        let t0 = Instant::now();
        let mut q = QueueBurst::default();
        // Arrivals 10 µs apart: the gap settles towards 20 µs.
        let mut t = t0;
        for _ in 0..64 {
            t += us(10);
            q.arrived(t, MAX);
        }
        let gap = q.arrivals.gap(MAX);
        assert!(gap > us(18) && gap <= us(20), "{gap:?}");
        // Off: no hold until the probe.
        for _ in 0..PROBE_EVERY {
            assert!(!q.holds(MAX, t, t));
            q.signalled();
        }
        // The probe holds; a command arrives within the gap; it keeps holding until the gap
        // after that arrival has passed.
        assert!(q.holds(MAX, t, t + us(1)));
        q.arrived(t + us(5), MAX);
        assert!(q.holds(MAX, t, t + us(20)));
        let end = t + us(5) + q.arrivals.gap(MAX);
        assert!(!q.holds(MAX, t, end));
        assert!(q.on, "a hold that saw a command arrive turns the rule on");
        // Never longer than the maximum after the oldest entry, whatever keeps arriving.
        let s = t + us(100);
        let mut now = s;
        while now < s + MAX {
            q.arrived(now, MAX);
            assert!(q.holds(MAX, s, now));
            now += us(5);
        }
        q.arrived(now, MAX);
        assert!(!q.holds(MAX, s, s + MAX));
        // A host that waits for its interrupts: four dry holds, each the gap long, then off.
        let mut s = now + us(1000);
        for i in 0..MISSES_OFF {
            q.arrived(s, MAX);
            assert!(q.holds(MAX, s, s), "hold {i}");
            let end = s + q.arrivals.gap(MAX);
            assert!(!q.holds(MAX, s, end));
            q.signalled();
            s += us(1000);
        }
        assert!(!q.on);
        q.arrived(s, MAX);
        assert!(!q.holds(MAX, s, s), "off: no hold until the next probe");
    }

    /// A failed probe leaves the rule off and waits for the next one.
    #[test]
    fn a_dry_probe_leaves_it_off() {
        let t0 = Instant::now();
        let mut q = QueueBurst::default();
        q.arrived(t0, MAX);
        for _ in 0..PROBE_EVERY {
            q.signalled();
        }
        assert!(q.holds(MAX, t0, t0));
        assert!(q.holding());
        let end = t0 + q.arrivals.gap(MAX);
        assert!(!q.holds(MAX, t0, end));
        assert!(!q.on && !q.holding());
        assert!(
            !q.holds(MAX, t0, t0 + us(300)),
            "the next probe is 256 interrupts away"
        );
    }

    /// A zero maximum is the rule switched off: nothing is counted or held.
    #[test]
    fn zero_is_off() {
        let t0 = Instant::now();
        let mut q = QueueBurst {
            on: true,
            ..QueueBurst::default()
        };
        q.arrived(t0, Duration::ZERO);
        assert!(!q.holds(Duration::ZERO, t0, t0));
        assert_eq!(q.arrivals.count, 0);
    }
}
