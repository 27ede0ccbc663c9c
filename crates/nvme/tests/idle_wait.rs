//! The worker's idle wait through a link (`PciDevice::set_idle_wait`): while it has nothing
//! to do, the worker waits in the wait it was given, and a doorbell that this wait applies on
//! the worker's own thread (as a fabric read by its waiter does) ends it and is served; with
//! none, or once taken back, the worker sleeps on its word as before. The worker rechecks only
//! once a second at most, so the stand-in checks that each doorbell it applies ends the wait at
//! once (a lost wake-up would only make the test slow).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use devlend_nvme::command::nvm_opcode;
use devlend_nvme::regs::DOORBELL_BASE;
use devlend_nvme::Status;
use devlend_pci::{IdleWait, MemoryArea, PciDevice};

type Frame = Box<dyn FnOnce() + Send>;

/// What reaches the stand-in link: a frame to apply, or an interruption from this process.
enum Msg {
    Frame(Frame),
    Interrupt,
}

/// A link stand-in: frames sent to it are applied by the thread waiting in it, as a fabric's
/// waiter applies what it reads from its socket.
struct FakeLink {
    frames: Mutex<Receiver<Msg>>,
    interrupts: Mutex<Sender<Msg>>,
    /// Waits begun.
    waits: AtomicU64,
    /// A thread is in the wait.
    inside: AtomicBool,
    /// Per frame applied: the name of the thread that applied it, and whether the wait was
    /// over right after.
    applied: Mutex<Vec<(String, bool)>>,
}

impl IdleWait for FakeLink {
    fn idle_wait(
        &self,
        deadline: Instant,
        woken: &mut dyn FnMut() -> bool,
        park: &mut dyn FnMut(Duration),
    ) -> bool {
        self.waits.fetch_add(1, Ordering::SeqCst);
        let frames = self.frames.lock().unwrap();
        self.inside.store(true, Ordering::SeqCst);
        let _out = Leave(&self.inside);
        loop {
            if woken() {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            match frames.recv_timeout(left) {
                Ok(Msg::Interrupt) => {}
                Ok(Msg::Frame(f)) => {
                    f();
                    let me = std::thread::current().name().unwrap_or("").to_string();
                    let over = woken();
                    self.applied.lock().unwrap().push((me, over));
                    if over {
                        return true;
                    }
                }
                Err(RecvTimeoutError::Timeout) => return true,
                Err(RecvTimeoutError::Disconnected) => {
                    park(left);
                    return true;
                }
            }
        }
    }

    fn interrupt(&self) {
        let _ = self.interrupts.lock().unwrap().send(Msg::Interrupt);
    }
}

/// Clears the flag when the wait ends, however it ends.
struct Leave<'a>(&'a AtomicBool);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

fn doorbells(h: &Harness) -> MemoryArea {
    h.dev
        .bar_memory(bar0())
        .into_iter()
        .find(|a| a.offset <= DOORBELL_BASE && DOORBELL_BASE < a.offset + a.mem.len())
        .expect("the doorbells are memory the device polls")
}

/// What a lender's window handler does with a doorbell store: the store, then run to
/// completion or a wake-up.
fn doorbell_frame(h: &Harness, qid: u16) -> Frame {
    let area = doorbells(h);
    let dev = h.dev.clone();
    let tail = h.queues[usize::from(qid)].as_ref().unwrap().sq_tail;
    let at = DOORBELL_BASE + 8 * u64::from(qid) - area.offset;
    Box::new(move || {
        area.write(at, &tail.to_le_bytes()).unwrap();
        if !dev.run_nonblocking() {
            area.wake().unwrap();
        }
    })
}

fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::yield_now();
    }
}

fn rig() -> (Harness, Arc<FakeLink>, Sender<Msg>) {
    let mut h = Harness::with(
        |c| {
            c.idle_recheck = Duration::from_secs(1);
            c.poll_spin = Duration::ZERO;
            c.poll_spin_max = Duration::ZERO;
        },
        false,
    );
    h.enable();
    h.create_io_pair(1, 16);
    let (tx, rx) = channel();
    let link = Arc::new(FakeLink {
        frames: Mutex::new(rx),
        interrupts: Mutex::new(tx.clone()),
        waits: AtomicU64::new(0),
        inside: AtomicBool::new(false),
        applied: Mutex::new(Vec::new()),
    });
    (h, link, tx)
}

#[test]
fn a_doorbell_read_by_the_idle_worker_wakes_it_and_is_served() {
    let (mut h, link, tx) = rig();
    // Given while the worker sleeps on its word: it is woken to wait the new way.
    h.dev.set_idle_wait(Some(link.clone()));
    for i in 0..6u64 {
        // Each round starts with the worker in the link's wait (the previous round's CQ head
        // doorbell woke it; it went back); only that wait can apply the doorbell.
        until("the worker never waited in the link", || {
            link.inside.load(Ordering::SeqCst)
        });
        let buf = 0x20_0000 + i * PAGE;
        let data = vec![i as u8 ^ 0x5a; PAGE as usize];
        h.mem.write_at(buf, &data).unwrap();
        let cid = h.push(1, rw(nvm_opcode::WRITE, i * 8, 8, HOST_BASE + buf, 0));
        tx.send(Msg::Frame(doorbell_frame(&h, 1))).unwrap();
        let c = h
            .reap(1, Duration::from_secs(60))
            .expect("the doorbell applied in the idle wait was lost");
        assert_eq!((c.cid, c.status), (cid, Status::SUCCESS));
        let image = h.image_bytes();
        let at = (i * PAGE) as usize;
        assert!(image[at..at + PAGE as usize] == data[..], "write {i}");
    }
    // Every doorbell was applied by the worker itself, and ended its wait at once.
    let applied = link.applied.lock().unwrap().clone();
    assert_eq!(applied.len(), 6);
    assert!(
        applied.iter().all(|(n, over)| n == "nvme-worker" && *over),
        "{applied:?}"
    );
}

#[test]
fn taken_back_the_worker_sleeps_on_its_word_again() {
    let (mut h, link, tx) = rig();
    h.dev.set_idle_wait(Some(link.clone()));
    until("the worker never waited in the link", || {
        link.inside.load(Ordering::SeqCst)
    });
    // Taken back, the wait in progress ends at once (it is interrupted, not left to its
    // recheck), and none begins again.
    h.dev.set_idle_wait(None);
    until("the wait taken back went on", || {
        !link.inside.load(Ordering::SeqCst)
    });
    let waits = link.waits.load(Ordering::SeqCst);
    // A doorbell stored the ordinary way (store and wake) is served; the link sees nothing.
    let c = h.submit(1, rw(nvm_opcode::READ, 0, 8, HOST_BASE + 0x20_0000, 0));
    assert_eq!(c.status, Status::SUCCESS);
    let sleeps = h.dev.stats().sleeps;
    until("the worker never slept", || h.dev.stats().sleeps > sleeps);
    assert_eq!(link.waits.load(Ordering::SeqCst), waits);
    assert!(link.applied.lock().unwrap().is_empty());
    drop(tx);
}
