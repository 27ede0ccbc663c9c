//! Cross-process waiting on shared memory: futexes with adaptive polling.
//!
//! A [`WaitWord`] is a pair of 32-bit words in a shared page: a sequence number the waiter
//! sleeps on and a count of sleepers. A waiter first polls its condition for a bounded spin
//! budget (yielding the CPU every few polls), then announces itself in `sleepers` and sleeps on the futex; a notifier pays the
//! `futex_wake` system call only when someone sleeps. The futexes are not `FUTEX_PRIVATE`, so
//! they work between processes that map the same memfd.
//!
//! Both words may be written by the peer process: their values are only ever used as hints
//! ("somebody may sleep", "something may have changed"), so a lying peer causes at most
//! spurious wake-ups or missed wake-ups of *its own* waiters.

use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use devlend_sync::{Pause, Spin};

/// Why a wait ended without its condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WaitEnd {
    /// The stop condition became true (link down, shutdown).
    Stopped,
    /// The deadline passed.
    Timeout,
}

/// Sleeps while `*word == expected`, at most `timeout` (forever for `None`).
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    devlend_memory::futex_wait(word, expected, timeout);
}

/// Wakes every sleeper on `word`.
fn futex_wake_all(word: &AtomicU32) {
    devlend_memory::futex_wake(word, u32::MAX);
}

/// A sequence word and a sleeper count in shared memory (see the module docs).
#[derive(Clone, Copy)]
pub(crate) struct WaitWord<'a> {
    seq: &'a AtomicU32,
    sleepers: &'a AtomicU32,
}

impl<'a> WaitWord<'a> {
    pub(crate) fn new(seq: &'a AtomicU32, sleepers: &'a AtomicU32) -> Self {
        Self { seq, sleepers }
    }

    /// Call after making a condition true: wakes sleepers, if any (a fence and a load when
    /// nobody sleeps).
    pub(crate) fn notify(&self) {
        fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) != 0 {
            self.seq.fetch_add(1, Ordering::SeqCst);
            futex_wake_all(self.seq);
        }
    }

    /// Wakes every sleeper unconditionally (after setting a stop flag).
    pub(crate) fn wake_all(&self) {
        self.seq.fetch_add(1, Ordering::SeqCst);
        futex_wake_all(self.seq);
    }

    /// Waits until `ready` yields a value, `stopped` turns true, or `deadline` passes. Polls
    /// for at most `spin` first, then sleeps. `stopped` must be set (SeqCst) *before*
    /// [`WaitWord::wake_all`] by whoever stops the wait.
    pub(crate) fn wait<T>(
        &self,
        spin: Duration,
        deadline: Option<Instant>,
        mut ready: impl FnMut() -> Option<T>,
        stopped: impl Fn() -> bool,
    ) -> Result<T, WaitEnd> {
        if let Some(v) = ready() {
            return Ok(v);
        }
        if stopped() {
            return Err(WaitEnd::Stopped);
        }
        if !spin.is_zero() {
            // The shared spin-then-yield cadence (see `devlend_sync`); `stopped` is looked at
            // after every yield.
            let mut cadence = Spin::new(spin);
            loop {
                if let Some(v) = ready() {
                    return Ok(v);
                }
                let pause = cadence.pause();
                if pause == Pause::Spun {
                    continue;
                }
                if stopped() {
                    return Err(WaitEnd::Stopped);
                }
                if pause == Pause::Spent {
                    break;
                }
            }
        }
        loop {
            let seen = self.seq.load(Ordering::SeqCst);
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            let outcome = if let Some(v) = ready() {
                Some(Ok(v))
            } else if stopped() {
                Some(Err(WaitEnd::Stopped))
            } else {
                let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                if left == Some(Duration::ZERO) {
                    Some(Err(WaitEnd::Timeout))
                } else {
                    futex_wait(self.seq, seen, left);
                    None
                }
            };
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
            if let Some(outcome) = outcome {
                return outcome;
            }
            if let Some(v) = ready() {
                return Ok(v);
            }
            if stopped() {
                return Err(WaitEnd::Stopped);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(WaitEnd::Timeout);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    struct Words {
        seq: AtomicU32,
        sleepers: AtomicU32,
        flag: AtomicU32,
        stop: AtomicBool,
    }

    fn words() -> Arc<Words> {
        Arc::new(Words {
            seq: AtomicU32::new(0),
            sleepers: AtomicU32::new(0),
            flag: AtomicU32::new(0),
            stop: AtomicBool::new(false),
        })
    }

    #[test]
    fn notify_wakes_a_sleeper_with_and_without_spin() {
        for spin in [Duration::ZERO, Duration::from_micros(20)] {
            let w = words();
            let w2 = w.clone();
            let t = std::thread::spawn(move || {
                let ww = WaitWord::new(&w2.seq, &w2.sleepers);
                ww.wait(
                    spin,
                    Some(Instant::now() + Duration::from_secs(20)),
                    || (w2.flag.load(Ordering::SeqCst) != 0).then_some(7),
                    || w2.stop.load(Ordering::SeqCst),
                )
            });
            w.flag.store(1, Ordering::SeqCst);
            WaitWord::new(&w.seq, &w.sleepers).notify();
            assert_eq!(t.join().unwrap(), Ok(7));
        }
    }

    #[test]
    fn stop_and_timeout_end_a_wait() {
        let w = words();
        let w2 = w.clone();
        let t = std::thread::spawn(move || {
            let ww = WaitWord::new(&w2.seq, &w2.sleepers);
            ww.wait(
                Duration::ZERO,
                None,
                || None::<()>,
                || w2.stop.load(Ordering::SeqCst),
            )
        });
        w.stop.store(true, Ordering::SeqCst);
        WaitWord::new(&w.seq, &w.sleepers).wake_all();
        assert_eq!(t.join().unwrap(), Err(WaitEnd::Stopped));
        let ww = WaitWord::new(&w.seq, &w.sleepers);
        let r = ww.wait(
            Duration::from_micros(5),
            Some(Instant::now() + Duration::from_millis(1)),
            || None::<()>,
            || false,
        );
        assert_eq!(r, Err(WaitEnd::Timeout));
        assert_eq!(w.sleepers.load(Ordering::SeqCst), 0);
    }
}
