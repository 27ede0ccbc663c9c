//! [`SpinBudget`]: how long a thread that has run out of work polls before it sleeps, learned
//! from how long its idle periods were.
//!
//! Polling pays when the next piece of work comes sooner than a sleep and a wake-up cost (tens
//! of microseconds on the machines devlend was measured on); it wastes a core when the work
//! comes later. So the budget follows the gaps the thread saw: an idle period that ended within
//! [`SpinBudget::max`] raises the budget at once to cover a gap like it with some slack
//! (one and a half times the gap), and the budget then falls back towards the base by an
//! eighth of the difference at every gap that needs less. An idle period longer than the
//! maximum (the work stopped, not paused) puts the budget back to its base at once, so an idle
//! device does not go on polling for its busy period's gaps. So does an idle period in which
//! the poller found its CPU wanted by other threads ([`SpinBudget::contended`]: a yield that
//! let another thread run): there the gap is the time the thread being waited for spent
//! waiting for a CPU, and a longer poll would only lengthen it. The budget never leaves
//! `[base, max]`.
//!
//! The rule is pure arithmetic on the gaps it is given (no clock inside), so it is tested
//! without timing.

use std::time::Duration;

/// A caught gap raises the budget to `gap * SLACK_NUM / SLACK_DEN`.
const SLACK_NUM: u32 = 3;
const SLACK_DEN: u32 = 2;
/// A budget above what the gaps need falls by `1 / DECAY` of the excess per gap.
const DECAY: u32 = 8;

/// An adaptive poll budget between `base` and `max` (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SpinBudget {
    base: Duration,
    max: Duration,
    budget: Duration,
}

impl SpinBudget {
    /// A budget that starts at `base` and may grow to `max` (taken as `base` if smaller).
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            budget: base,
        }
    }

    /// How long to poll now.
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// What the budget starts at and returns to.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The most the budget can grow to.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// An idle period in which other threads wanted the poller's CPU ended: back to the base.
    pub fn contended(&mut self) {
        self.budget = self.base;
    }

    /// An idle period ended: the next work came `gap` after the last.
    pub fn record(&mut self, gap: Duration) {
        if gap > self.max {
            self.budget = self.base;
            return;
        }
        let wanted = gap
            .checked_mul(SLACK_NUM)
            .map_or(self.max, |d| d / SLACK_DEN)
            .clamp(self.base, self.max);
        self.budget = if wanted >= self.budget {
            wanted
        } else {
            self.budget - (self.budget - wanted) / DECAY
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn starts_at_the_base_and_short_gaps_keep_it_there() {
        let mut s = SpinBudget::new(30 * US, 200 * US);
        assert_eq!(s.budget(), 30 * US);
        assert_eq!(s.base(), 30 * US);
        for _ in 0..100 {
            s.record(2 * US);
        }
        assert_eq!(s.budget(), 30 * US);
    }

    #[test]
    fn a_caught_gap_raises_the_budget_at_once_with_slack() {
        let mut s = SpinBudget::new(30 * US, 200 * US);
        s.record(60 * US);
        assert_eq!(s.budget(), 90 * US);
        // Never beyond the maximum.
        s.record(190 * US);
        assert_eq!(s.budget(), 200 * US);
    }

    #[test]
    fn a_gap_beyond_the_maximum_puts_it_back_to_the_base() {
        let mut s = SpinBudget::new(30 * US, 200 * US);
        s.record(100 * US);
        assert_eq!(s.budget(), 150 * US);
        s.record(201 * US);
        assert_eq!(s.budget(), 30 * US);
    }

    #[test]
    fn shorter_gaps_let_it_fall_by_an_eighth_of_the_excess() {
        let mut s = SpinBudget::new(30 * US, 200 * US);
        s.record(120 * US); // 180
        assert_eq!(s.budget(), 180 * US);
        s.record(20 * US); // wants 30: 180 - 150/8
        assert_eq!(s.budget(), 180 * US - 150 * US / 8);
        let mut last = s.budget();
        for _ in 0..200 {
            s.record(20 * US);
            assert!(s.budget() <= last);
            last = s.budget();
        }
        assert!(s.budget() < 31 * US, "{:?}", s.budget());
        assert!(s.budget() >= 30 * US);
    }

    #[test]
    fn contention_puts_it_back_to_the_base() {
        let mut s = SpinBudget::new(30 * US, 200 * US);
        s.record(100 * US);
        assert_eq!(s.budget(), 150 * US);
        s.contended();
        assert_eq!(s.budget(), 30 * US);
    }

    #[test]
    fn a_maximum_below_the_base_is_the_base() {
        let mut s = SpinBudget::new(30 * US, 10 * US);
        assert_eq!(s.max(), 30 * US);
        s.record(25 * US);
        assert_eq!(s.budget(), 30 * US);
        s.record(31 * US);
        assert_eq!(s.budget(), 30 * US);
    }

    #[test]
    fn zero_base_and_maximum_never_poll() {
        let mut s = SpinBudget::new(Duration::ZERO, Duration::ZERO);
        s.record(Duration::ZERO);
        assert_eq!(s.budget(), Duration::ZERO);
        s.record(5 * US);
        assert_eq!(s.budget(), Duration::ZERO);
    }
}
