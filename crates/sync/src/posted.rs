//! Posted-write batches: a thread's posted writes held back and sent together.
//!
//! A PCIe posted write needs no answer, and nothing may pass it, so a fabric may hold several
//! back and send them as one message, as a host bridge combines writes, as long as they leave
//! in order and before anything that must not overtake them (a read, which is a round trip,
//! flushes what is held first). A device model's worker opens a [`Batch`] around one pass (the
//! data and completions of the commands it ran and their MSI-X messages); a driver around the
//! stores of one submission (the command and the doorbell). A fabric whose every message has
//! a fixed cost (a system call and a TLS record on `tcp`) asks [`held`] before it sends a
//! small posted write, queues it instead, and registers its flush with [`defer`]: the flush
//! runs when the outermost batch of the thread ends. Fabrics on which a store is a store
//! (`shm`) ignore batches.
//!
//! Only the thread that opened a batch is affected, and only until the batch ends: a batch is
//! a guard ([`Batch`], not `Send`), so it cannot outlive the pass that opened it.

use std::cell::{Cell, RefCell};
use std::marker::PhantomData;

/// A flush registered for the end of the batch, with its key.
type Deferred = (usize, Box<dyn FnOnce()>);

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    static DEFERRED: RefCell<Vec<Deferred>> = const { RefCell::new(Vec::new()) };
}

/// An open batch of this thread's posted writes; the deferred flushes run when the outermost
/// one is dropped.
#[must_use = "the batch ends when this guard is dropped"]
pub struct Batch {
    /// Not `Send`: the batch belongs to the thread that opened it.
    _thread: PhantomData<*const ()>,
}

impl Batch {
    /// Opens a batch (batches nest; the outermost one's end flushes).
    pub fn begin() -> Batch {
        DEPTH.with(|d| d.set(d.get().saturating_add(1)));
        Batch {
            _thread: PhantomData,
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        let depth = DEPTH.with(|d| {
            let v = d.get().saturating_sub(1);
            d.set(v);
            v
        });
        if depth == 0 {
            run_deferred();
        }
    }
}

/// Whether this thread is inside a batch (a fabric may then hold a small posted write back).
pub fn held() -> bool {
    DEPTH.with(|d| d.get() > 0)
}

/// Registers `flush` to run when this thread's outermost batch ends, once per `key` (the
/// first registration for a key wins; a fabric passes the address of its connection). Outside
/// a batch nothing is registered and `false` is returned: the caller must flush now.
pub fn defer(key: usize, flush: impl FnOnce() + 'static) -> bool {
    if !held() {
        return false;
    }
    DEFERRED.with(|q| {
        let mut q = q.borrow_mut();
        if !q.iter().any(|(k, _)| *k == key) {
            q.push((key, Box::new(flush)));
        }
    });
    true
}

/// Runs and forgets the deferred flushes, in the order they were registered. A flush that
/// itself defers (it cannot: no batch is open now) would flush at once.
fn run_deferred() {
    let flushes = DEFERRED.with(|q| std::mem::take(&mut *q.borrow_mut()));
    for (_, flush) in flushes {
        flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn flushes_run_once_per_key_when_the_outermost_batch_ends() {
        let log = Rc::new(RefCell::new(Vec::new()));
        assert!(!held());
        assert!(!defer(1, || panic!("outside a batch nothing is deferred")));
        {
            let _outer = Batch::begin();
            assert!(held());
            {
                let _inner = Batch::begin();
                let l = log.clone();
                assert!(defer(7, move || l.borrow_mut().push(7)));
                let l = log.clone();
                assert!(defer(3, move || l.borrow_mut().push(3)));
                let l = log.clone();
                assert!(defer(7, move || l.borrow_mut().push(70)));
            }
            assert!(held(), "an inner batch's end flushes nothing");
            assert!(log.borrow().is_empty());
        }
        assert!(!held());
        assert_eq!(*log.borrow(), vec![7, 3], "in order, once per key");
    }

    #[test]
    fn a_batch_is_the_opening_thread_s_alone() {
        let _b = Batch::begin();
        let other = std::thread::spawn(held).join().unwrap();
        assert!(!other);
        assert!(held());
    }
}
