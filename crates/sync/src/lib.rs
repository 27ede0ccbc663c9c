//! Locks and waits, written once for every devlend crate.
//!
//! * [`lock`], [`read`], [`write`](fn@write), [`wait`], [`wait_timeout`], [`wait_timeout_while`],
//!   [`try_lock`]: the standard library's locks without lock poisoning. Every structure devlend
//!   guards is consistent between statements (no guard is held across a step that can leave
//!   it half-updated and then panic), so a panic in one thread must not take every other
//!   user of the lock (a device, a link, a node) down with it.
//! * [`Spin`] and [`spin_until`]: the adaptive wait in front of a sleep. Poll, and every
//!   [`YIELD_EVERY`] polls (every poll for [`Spin::yielding`]) yield the CPU: on a machine with fewer cores than runnable threads
//!   the thread being waited for may be queued behind the waiter, and a pure spin would burn
//!   exactly the time it needs (measured: round trips of ~3x the spin budget instead of ~1 us
//!   on a loaded 2-core VM).
//! * [`posted`]: a thread's batch of posted writes, which a fabric may send together.
//! * [`SpinBudget`]: a poll budget learned from the idle gaps a thread saw.
#![warn(missing_docs)]

mod adaptive;
pub mod posted;

pub use adaptive::SpinBudget;

use std::sync::{
    Condvar, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError,
    WaitTimeoutResult,
};
use std::time::{Duration, Instant};

/// Locks `m`, ignoring poison.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Locks `m` if nobody holds it (`None` if somebody does), ignoring poison.
pub fn try_lock<T: ?Sized>(m: &Mutex<T>) -> Option<MutexGuard<'_, T>> {
    match m.try_lock() {
        Ok(g) => Some(g),
        Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(TryLockError::WouldBlock) => None,
    }
}

/// Read-locks `l`, ignoring poison.
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|e| e.into_inner())
}

/// Write-locks `l`, ignoring poison.
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|e| e.into_inner())
}

/// [`Condvar::wait`], ignoring poison.
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(|e| e.into_inner())
}

/// [`Condvar::wait_timeout`], ignoring poison.
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
    cv.wait_timeout(guard, timeout)
        .unwrap_or_else(|e| e.into_inner())
}

/// [`Condvar::wait_timeout_while`], ignoring poison.
pub fn wait_timeout_while<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
    condition: impl FnMut(&mut T) -> bool,
) -> (MutexGuard<'a, T>, WaitTimeoutResult) {
    cv.wait_timeout_while(guard, timeout, condition)
        .unwrap_or_else(|e| e.into_inner())
}

/// A spinning waiter yields the CPU every this many polls.
pub const YIELD_EVERY: u32 = 16;

/// What one [`Spin::pause`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pause {
    /// A spin-loop hint; poll again.
    Spun,
    /// Yielded the CPU; budget is left.
    Yielded,
    /// Yielded the CPU and found the budget spent: stop spinning (and go to sleep).
    Spent,
}

/// The cadence of a spin-then-yield wait with a time budget: the one every waiter uses.
#[derive(Debug)]
pub struct Spin {
    start: Instant,
    budget: Duration,
    polls: u32,
    /// Yield at every this many pauses (never 0).
    yield_every: u32,
}

impl Spin {
    /// A spin of at most `budget`, starting now.
    pub fn new(budget: Duration) -> Self {
        Self {
            start: Instant::now(),
            budget,
            polls: 0,
            yield_every: YIELD_EVERY,
        }
    }

    /// A spin of at most `budget`, starting now, that yields the CPU at every pause: for a
    /// waiter whose poll is itself a system call (a read of a socket, `devlend-fabric-tcp`'s
    /// readers), which already costs more than the spin-loop hints it would replace; on two
    /// cores, every poll without a yield delays the thread being waited for.
    pub fn yielding(budget: Duration) -> Self {
        Self {
            yield_every: 1,
            ..Self::new(budget)
        }
    }

    /// Call between two polls: a spin-loop hint, or every [`YIELD_EVERY`]th call (every call
    /// for [`Spin::yielding`]) a yield, after which the budget is checked.
    pub fn pause(&mut self) -> Pause {
        self.polls = self.polls.wrapping_add(1);
        if !self.polls.is_multiple_of(self.yield_every) {
            std::hint::spin_loop();
            return Pause::Spun;
        }
        std::thread::yield_now();
        if self.start.elapsed() >= self.budget {
            Pause::Spent
        } else {
            Pause::Yielded
        }
    }
}

/// Polls `ready` for at most `budget` with the [`Spin`] cadence. Returns whether `ready` turned
/// true.
pub fn spin_until(budget: Duration, mut ready: impl FnMut() -> bool) -> bool {
    if ready() {
        return true;
    }
    let mut spin = Spin::new(budget);
    loop {
        if ready() {
            return true;
        }
        if spin.pause() == Pause::Spent {
            return ready();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_poisoned_lock_still_locks() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*try_lock(&m).unwrap(), 2);
        let l = RwLock::new(5);
        *write(&l) += 1;
        assert_eq!(*read(&l), 6);
    }

    #[test]
    fn try_lock_is_none_while_held() {
        let m = Mutex::new(());
        let _g = lock(&m);
        assert!(try_lock(&m).is_none());
    }

    #[test]
    fn the_spin_yields_every_sixteenth_pause_and_ends_once_spent() {
        let mut spin = Spin::new(Duration::ZERO);
        for _ in 1..YIELD_EVERY {
            assert_eq!(spin.pause(), Pause::Spun);
        }
        assert_eq!(spin.pause(), Pause::Spent);
        let mut spin = Spin::new(Duration::from_secs(3600));
        for _ in 1..YIELD_EVERY {
            assert_eq!(spin.pause(), Pause::Spun);
        }
        assert_eq!(spin.pause(), Pause::Yielded);
    }

    #[test]
    fn a_yielding_spin_yields_at_every_pause_and_ends_once_spent() {
        let mut spin = Spin::yielding(Duration::from_secs(3600));
        for _ in 0..3 {
            assert_eq!(spin.pause(), Pause::Yielded);
        }
        let mut spin = Spin::yielding(Duration::ZERO);
        assert_eq!(spin.pause(), Pause::Spent);
    }

    #[test]
    fn spin_until_sees_a_flag_set_by_another_thread_and_gives_up_without_one() {
        assert!(!spin_until(Duration::ZERO, || false));
        let polls = AtomicU32::new(0);
        assert!(spin_until(Duration::ZERO, || polls
            .fetch_add(1, Ordering::SeqCst)
            == 1));
        let flag = Arc::new(AtomicBool::new(false));
        let f = flag.clone();
        let t = std::thread::spawn(move || f.store(true, Ordering::SeqCst));
        t.join().unwrap();
        assert!(spin_until(Duration::from_secs(3600), || flag.load(Ordering::SeqCst)));
    }
}
