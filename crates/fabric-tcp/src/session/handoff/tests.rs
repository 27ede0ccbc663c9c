//! Tests of the hand-off: its steps one by one, then a model check of the whole protocol with
//! many threads.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::{Arm, Handoff, Lead, Turns};

/// A watch that records what was done to it, and can be told to fail arming.
#[derive(Default)]
struct Log {
    calls: Mutex<Vec<&'static str>>,
    fail_arm: std::sync::atomic::AtomicBool,
}

impl Log {
    fn take(&self) -> Vec<&'static str> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl Arm for Log {
    fn arm(&self) -> std::io::Result<()> {
        self.calls.lock().unwrap().push("arm");
        if self.fail_arm.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("cannot arm"));
        }
        Ok(())
    }

    fn disarm(&self) -> std::io::Result<()> {
        self.calls.lock().unwrap().push("disarm");
        Ok(())
    }
}

fn armed<S, W: Arm>(h: &Handoff<S, W>) -> bool {
    h.rx.lock().unwrap().armed
}

/// A wait on the socket from inside its own reading (a frame being applied that waits on the
/// link) fails at once, in each of the three ways of reading, instead of waiting for itself;
/// the state is as before, and another hand-off can still be led from there.
#[test]
fn a_wait_from_the_thread_that_reads_the_socket_fails_instead_of_deadlocking() {
    let h = Handoff::new(0u32, Log::default());
    let other = Handoff::new(0u32, Log::default());
    let nested = |_: &mut u32| {
        let err = h.lead(|| {}, |_| ()).unwrap_err();
        assert!(err.to_string().contains("reads its socket"), "{err}");
        // Another link's socket is not this one.
        assert!(other.lead(|| {}, |_| ()).unwrap().is_some());
    };
    h.first(nested);
    h.lead(|| {}, nested).unwrap().unwrap();
    h.reader_turn(|n| {
        nested(n);
        Ok::<_, std::io::Error>(true)
    })
    .unwrap();
    // Outside any reading, leading works again.
    assert!(h.lead(|| {}, |_| ()).unwrap().is_some());
    assert!(!h.led());
    assert_eq!(h.leaders.load(Ordering::Acquire), 0);
}

#[test]
fn a_caller_disarms_the_watch_while_it_reads_and_the_last_one_out_rearms_it() {
    let h = Handoff::new(0u32, Log::default());
    assert!(!h.led() && !h.wanted());
    let got = h
        .lead(
            || {},
            |n| {
                // While a caller reads: it is the leader, it wants the socket, the watch is off.
                assert!(h.led() && h.wanted());
                assert_eq!(h.watch().take(), ["disarm"]);
                *n += 1;
                *n
            },
        )
        .unwrap();
    assert_eq!(got, Some(1));
    assert_eq!(h.watch().take(), ["arm"]);
    assert!(armed(&h) && !h.led() && !h.wanted());
}

#[test]
fn a_caller_that_is_not_the_last_out_leaves_the_watch_to_the_next() {
    let h = Handoff::new((), Log::default());
    // Another caller wants the socket (it waits for the lock).
    h.leaders.fetch_add(1, Ordering::AcqRel);
    h.lead(|| {}, |_| ()).unwrap();
    assert_eq!(h.watch().take(), ["disarm"]);
    assert!(!armed(&h));
    h.leaders.fetch_sub(1, Ordering::AcqRel);
    // That caller, last out, re-arms; it does not disarm again.
    h.lead(|| {}, |_| ()).unwrap();
    assert_eq!(h.watch().take(), ["arm"]);
    assert!(armed(&h));
}

#[test]
fn a_caller_that_lost_the_race_reads_nothing_and_still_rearms_when_last() {
    let h = Handoff::new((), Log::default());
    h.lead(|| {}, |_| ()).unwrap();
    h.watch().take();
    // Another caller has the socket (as if it took it between our check and our lock).
    h.leading.store(true, Ordering::Release);
    let mut ran = false;
    assert!(h.lead(|| {}, |_| ran = true).unwrap().is_none());
    assert!(!ran);
    // The watch was armed: nothing to do.
    assert!(h.watch().take().is_empty());
}

#[test]
fn a_failure_to_rearm_is_reported_and_tried_again_by_the_next_caller() {
    let h = Handoff::new((), Log::default());
    h.watch().fail_arm.store(true, Ordering::Relaxed);
    assert!(h.lead(|| {}, |_| ()).is_err());
    assert!(!armed(&h));
    h.watch().fail_arm.store(false, Ordering::Relaxed);
    h.lead(|| {}, |_| ()).unwrap();
    assert_eq!(h.watch().take(), ["disarm", "arm", "arm"]);
    assert!(armed(&h));
}

#[test]
fn the_reader_thread_rearms_after_its_turn_unless_a_caller_waits() {
    let h = Handoff::new(0u32, Log::default());
    assert!(h
        .reader_turn(|n| {
            *n += 1;
            Ok::<_, std::io::Error>(true)
        })
        .unwrap());
    assert_eq!(h.watch().take(), ["arm"]);
    // A caller waits for the socket: the reader thread leaves the watch to it.
    h.leaders.fetch_add(1, Ordering::AcqRel);
    assert!(h.reader_turn(|_| Ok::<_, std::io::Error>(true)).unwrap());
    assert!(h.watch().take().is_empty());
    h.leaders.fetch_sub(1, Ordering::AcqRel);
    // The end of the connection: nothing re-armed; an error passes through.
    assert!(!h.reader_turn(|_| Ok::<_, std::io::Error>(false)).unwrap());
    assert!(h
        .reader_turn(|_| Err::<bool, _>(std::io::Error::other("x")))
        .is_err());
    assert!(h.watch().take().is_empty());
    assert_eq!(h.first(|n| *n), 1);
}

/// A caller that comes for the socket nudges the caller that has it only if that one leads
/// yielding (it may be asleep on the socket, waiting for work of its own), whichever way it
/// leads itself; a caller leading until its answer is waited for, not nudged.
#[test]
fn a_caller_nudges_only_a_leader_that_yields() {
    let h = Handoff::new((), Log::default());
    let mut nudged = 0;
    // Another caller has the socket, until its answer: this one lost the race, no nudge.
    h.leading.store(true, Ordering::SeqCst);
    assert!(h.lead(|| nudged += 1, |_| ()).unwrap().is_none());
    assert_eq!(nudged, 0);
    // The same, yielding: nudged.
    h.yielding.store(true, Ordering::SeqCst);
    assert!(h.led_yielding());
    assert!(h.lead(|| nudged += 1, |_| ()).unwrap().is_none());
    assert_eq!(nudged, 1);
    // So is it by a caller that yields itself (the latest to wait takes the socket).
    assert!(h.lead_yielding(|| nudged += 1, |_| ()).unwrap().is_none());
    assert_eq!(nudged, 2);
    h.leading.store(false, Ordering::SeqCst);
    h.yielding.store(false, Ordering::SeqCst);
    // Leading yielding is seen while it lasts, and only then.
    let inside = h
        .lead_yielding(|| {}, |_| (h.led_yielding(), h.wanted_by_another()))
        .unwrap();
    assert_eq!(inside, Some((true, false)));
    assert!(!h.led_yielding() && !h.led());
}

/// A thread that leads yielding (asleep on the socket, as an idle device's thread is) gives
/// the socket up to a caller that wants it: the caller's nudge wakes it, it leaves, and the
/// caller reads the socket itself instead of waiting for its reply to be handed over.
#[test]
fn a_caller_waiting_for_a_reply_takes_the_socket_from_an_idle_device_only() {
    // (how, led, led_yielding) -> parks?
    let mut t = Turns::default();
    assert!(
        t.park(Lead::Answer, true, false),
        "another reply's caller hands it over"
    );
    assert!(
        !t.park(Lead::Answer, true, true),
        "an idle device's thread is made to leave"
    );
    assert!(!t.park(Lead::Answer, false, false), "a free socket is read");
}

#[test]
fn an_idle_device_that_gave_the_socket_up_does_not_take_it_back_while_it_waits() {
    let mut t = Turns::default();
    // A device that goes idle takes the socket from one idle longer.
    assert!(!t.park(Lead::Yielding, true, true));
    assert!(t.park(Lead::Yielding, true, false));
    // Made to give it up: it parks once, even on a free socket...
    t.gave_way();
    assert!(t.park(Lead::Yielding, false, false));
    // ...then waits behind whoever has the socket, an idle device too...
    assert!(t.park(Lead::Yielding, true, true));
    assert!(t.park(Lead::Yielding, true, false));
    // ...and reads it only when no one does.
    assert!(!t.park(Lead::Yielding, false, false));
}

#[test]
fn a_yielding_leader_gives_the_socket_to_a_caller_that_wants_it() {
    let h = Arc::new(Handoff::new(0u32, Log::default()));
    // The leader's "socket": asleep until nudged (a nudge is the only thing that wakes it).
    let nudge = Arc::new((Mutex::new(false), Condvar::new()));
    let leader = {
        let (h, nudge) = (h.clone(), nudge.clone());
        std::thread::spawn(move || {
            h.lead_yielding(
                || {},
                |n| {
                    let (flag, cv) = &*nudge;
                    let mut woken = flag.lock().unwrap();
                    loop {
                        if h.wanted_by_another() {
                            *n += 1;
                            return "gave way";
                        }
                        // Every wait ends on a nudge; a missed one would hang here (the test
                        // harness's timeout then reports it), not pass.
                        while !*woken {
                            woken = cv.wait(woken).unwrap();
                        }
                        *woken = false;
                    }
                },
            )
        })
    };
    while !h.led_yielding() {
        std::thread::yield_now();
    }
    let (flag, cv) = &*nudge;
    let got = h
        .lead(
            || {
                *flag.lock().unwrap() = true;
                cv.notify_all();
            },
            |n| {
                // The leader left before this caller got the socket.
                assert_eq!(*n, 1);
                assert!(h.led() && !h.led_yielding());
                "read by the caller"
            },
        )
        .unwrap();
    assert_eq!(got, Some("read by the caller"));
    assert_eq!(leader.join().unwrap().unwrap(), Some("gave way"));
    // The last one out re-armed the reader thread's watch.
    assert!(armed(&h) && !h.led() && !h.wanted());
    assert_eq!(h.watch().take(), ["disarm", "arm"]);
}

// The model check. The socket, the reader thread's one-shot watch and the reply channels are
// modelled under one lock, so that "every thread waits for something that cannot happen" is an
// exact observation (no timeout decides it). The threads run the real [`Handoff`]; around it,
// the callers and the reader thread do what `Connection::await_reply`, `Connection::lead` and
// `Connection::read_loop` do, with every wait made endless: a lost wake-up becomes a deadlock,
// which the model detects and reports.

/// What a thread of the model waits for.
#[derive(Clone, Copy, Debug)]
enum Wait {
    /// A caller on its reply channel.
    Reply(usize),
    /// A caller that has the socket: its reply, or bytes on the socket.
    Socket(usize),
    /// The reader thread on its watch.
    Watch,
    /// The peer for a request to answer.
    Request,
    /// The peer for its `n`-th message of its own (not a reply) to be read; an idle waiter
    /// parked until its work (that message) was read by whoever has the socket.
    Read(usize),
    /// An idle waiter that has the socket (yielding): bytes on the socket, a nudge, or its
    /// work (the `n`-th message of the peer's own) read.
    Idle(usize),
}

struct World {
    /// Requests sent, not yet answered by the peer (by caller).
    requests: VecDeque<usize>,
    /// Replies on the socket, not yet read (by caller; `None` for a message of the peer's
    /// own, which only the reader thread is there for when no caller waits).
    socket: VecDeque<Option<usize>>,
    /// Messages of the peer's own read.
    pings: usize,
    /// A caller nudged the idle waiter that has the socket (cleared when it looks).
    nudged: bool,
    /// Replies read and handed to their caller's channel.
    delivered: Vec<bool>,
    /// The watch (one-shot): armed.
    armed: bool,
    /// What each thread waits for; `None` while it runs.
    waits: Vec<Option<Wait>>,
    /// Threads still running (the callers end on their own).
    alive: Vec<bool>,
    /// Every caller is done: the reader thread and the peer stop.
    done: bool,
    /// A deadlock was seen: what each thread waited for.
    lost: Option<String>,
}

impl World {
    fn ready(&self, w: Wait) -> bool {
        match w {
            Wait::Reply(i) => self.delivered[i],
            Wait::Socket(i) => self.delivered[i] || !self.socket.is_empty(),
            Wait::Watch => self.done || (self.armed && !self.socket.is_empty()),
            Wait::Request => self.done || !self.requests.is_empty(),
            Wait::Read(n) => self.pings >= n,
            Wait::Idle(n) => self.pings >= n || self.nudged || !self.socket.is_empty(),
        }
    }

    /// Every thread alive waits for something that is not there: nothing can change that.
    fn stuck(&self) -> bool {
        self.waits
            .iter()
            .zip(&self.alive)
            .all(|(w, alive)| !alive || w.is_some_and(|w| !self.ready(w)))
    }
}

struct Model {
    world: Mutex<World>,
    changed: Condvar,
    /// Threads reading the socket now.
    readers: AtomicUsize,
    /// Socket reads done by callers and by the reader thread.
    reads: [AtomicUsize; 2],
    /// Times an idle waiter gave the socket up to another.
    gave_way: AtomicUsize,
}

impl Arm for Model {
    fn arm(&self) -> std::io::Result<()> {
        self.world().armed = true;
        self.changed.notify_all();
        Ok(())
    }

    fn disarm(&self) -> std::io::Result<()> {
        self.world().armed = false;
        Ok(())
    }
}

type Rx = Handoff<(), Arc<Model>>;

impl Arm for Arc<Model> {
    fn arm(&self) -> std::io::Result<()> {
        (**self).arm()
    }

    fn disarm(&self) -> std::io::Result<()> {
        (**self).disarm()
    }
}

impl Model {
    fn world(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `Connection::interrupt_reading` does: wakes the caller that has the socket.
    fn nudge(&self) {
        self.world().nudged = true;
        self.changed.notify_all();
    }

    /// Thread `me` waits until `w` is ready; `None` once a deadlock was seen.
    fn wait(&self, me: usize, w: Wait) -> Option<MutexGuard<'_, World>> {
        let mut world = self.world();
        world.waits[me] = Some(w);
        loop {
            if world.lost.is_some() {
                return None;
            }
            if world.ready(w) {
                world.waits[me] = None;
                return Some(world);
            }
            if world.stuck() {
                world.lost = Some(format!("{:?}", world.waits));
                self.changed.notify_all();
                return None;
            }
            world = self.changed.wait(world).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Reads the socket (the thread must have it): hands every reply to its caller. `who` 0
    /// for a caller, 1 for the reader thread. Returns whether there was anything.
    fn read(&self, who: usize, rng: &mut Rng) -> bool {
        assert_eq!(
            self.readers.fetch_add(1, Ordering::AcqRel),
            0,
            "two threads read the socket at once"
        );
        self.reads[who].fetch_add(1, Ordering::Relaxed);
        rng.maybe_yield();
        let any = {
            let mut world = self.world();
            if who == 0 {
                assert!(!world.armed, "the watch is armed while a caller reads");
            }
            let any = !world.socket.is_empty();
            while let Some(item) = world.socket.pop_front() {
                match item {
                    Some(i) => world.delivered[i] = true,
                    None => world.pings += 1,
                }
            }
            any
        };
        self.changed.notify_all();
        rng.maybe_yield();
        self.readers.fetch_sub(1, Ordering::AcqRel);
        any
    }
}

/// A small deterministic generator (xorshift), for where threads yield.
struct Rng(u64);

impl Rng {
    fn maybe_yield(&mut self) {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        if self.0 & 3 == 0 {
            std::thread::yield_now();
        }
    }
}

/// One caller making `calls` requests, as `Connection::call` does (`None` on a deadlock).
fn caller(m: &Model, h: &Rx, me: usize, calls: usize, rng: &mut Rng) -> Option<()> {
    for _ in 0..calls {
        {
            let mut world = m.world();
            world.delivered[me] = false;
            world.requests.push_back(me);
        }
        m.changed.notify_all();
        rng.maybe_yield();
        // Connection::await_reply.
        loop {
            if m.world().delivered[me] {
                break;
            }
            rng.maybe_yield();
            if Turns::default().park(Lead::Answer, h.led(), h.led_yielding()) {
                // Another caller has the socket and hands our reply over (one that leads
                // yielding is made to give it up).
                drop(m.wait(me, Wait::Reply(me))?);
                continue;
            }
            // Connection::lead: read until our reply came, sleeping on the socket meanwhile.
            let got = h
                .lead(
                    || m.nudge(),
                    |_| loop {
                        if m.world().delivered[me] {
                            return Some(());
                        }
                        drop(m.wait(me, Wait::Socket(me))?);
                        m.read(0, rng);
                    },
                )
                .expect("the model's watch does not fail");
            match got {
                Some(Some(())) => break,
                Some(None) => return None,
                None => {}
            }
        }
    }
    Some(())
}

/// An idle device's thread waiting for its work, `n` messages of the peer's own one after the
/// other, as `Connection::await_until` with `Lead::Yielding` does (`None` on a deadlock): it
/// reads the socket itself while no caller waiting for a reply does, gives it up when another
/// wants it, and otherwise parks until whoever reads the socket reads its work.
fn idler(m: &Model, h: &Rx, me: usize, n: usize, rng: &mut Rng) -> Option<()> {
    for k in 1..=n {
        let mut turns = Turns::default();
        loop {
            if m.world().pings >= k {
                break;
            }
            rng.maybe_yield();
            if turns.park(Lead::Yielding, h.led(), h.led_yielding()) {
                drop(m.wait(me, Wait::Read(k))?);
                continue;
            }
            let got = h
                .lead_yielding(
                    || m.nudge(),
                    |_| loop {
                        if h.wanted_by_another() {
                            return Some(false);
                        }
                        if m.world().pings >= k {
                            return Some(true);
                        }
                        m.wait(me, Wait::Idle(k))?.nudged = false;
                        m.read(0, rng);
                    },
                )
                .expect("the model's watch does not fail");
            match got {
                Some(Some(true)) => break,
                Some(Some(false)) => {
                    m.gave_way.fetch_add(1, Ordering::Relaxed);
                    turns.gave_way();
                }
                Some(None) => return None,
                None => {}
            }
        }
    }
    Some(())
}

/// The reader thread, as `Connection::read_loop` and `Connection::read_while_busy` (`None` on a
/// deadlock).
fn reader(m: &Model, h: &Rx, me: usize, rng: &mut Rng) -> Option<()> {
    loop {
        {
            let mut world = m.wait(me, Wait::Watch)?;
            if world.done {
                return Some(());
            }
            // The event fires once.
            world.armed = false;
        }
        h.reader_turn(|_| {
            while !h.wanted() {
                if !m.read(1, rng) {
                    break;
                }
            }
            Ok::<_, std::io::Error>(true)
        })
        .expect("the model's watch does not fail");
        rng.maybe_yield();
    }
}

/// The peer: answers requests in order, one at a time.
fn peer(m: &Model, me: usize, rng: &mut Rng) -> Option<()> {
    loop {
        let i = {
            let mut world = m.wait(me, Wait::Request)?;
            if world.done {
                return Some(());
            }
            world.requests.pop_front()?
        };
        rng.maybe_yield();
        m.world().socket.push_back(Some(i));
        m.changed.notify_all();
    }
}

/// The peer's messages of its own (its requests, in the session): `n`, each sent once the
/// one before was read.
fn pinger(m: &Model, me: usize, n: usize, rng: &mut Rng) -> Option<()> {
    for k in 1..=n {
        rng.maybe_yield();
        m.world().socket.push_back(None);
        m.changed.notify_all();
        drop(m.wait(me, Wait::Read(k))?);
    }
    Some(())
}

fn model(callers: usize, threads: usize) -> Arc<Model> {
    Arc::new(Model {
        world: Mutex::new(World {
            requests: VecDeque::new(),
            socket: VecDeque::new(),
            pings: 0,
            nudged: false,
            delivered: vec![false; callers],
            armed: true,
            waits: vec![None; threads],
            alive: vec![true; threads],
            done: false,
            lost: None,
        }),
        changed: Condvar::new(),
        readers: AtomicUsize::new(0),
        reads: [AtomicUsize::new(0), AtomicUsize::new(0)],
        gave_way: AtomicUsize::new(0),
    })
}

/// Runs `callers` callers of `calls` requests each, the reader thread, the peer answering
/// them, the peer sending `calls` messages of its own and `idlers` idle waiters waiting for
/// those; returns the deadlock seen, if any, and how many socket reads callers (and idle
/// waiters) and the reader thread did.
fn run(callers: usize, idlers: usize, calls: usize, seed: u64) -> (Option<String>, [usize; 3]) {
    let threads = callers + 3 + idlers;
    let m = model(callers, threads);
    let h = Arc::new(Handoff::new((), m.clone()));
    let finished = Arc::new(AtomicUsize::new(0));
    let handles: Vec<_> = (0..threads)
        .map(|me| {
            let (m, h, finished) = (m.clone(), h.clone(), finished.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(seed.wrapping_mul(31).wrapping_add(me as u64) | 1);
                if me < callers || me >= callers + 2 {
                    if me < callers {
                        caller(&m, &h, me, calls, &mut rng);
                    } else if me == callers + 2 {
                        pinger(&m, me, calls, &mut rng);
                    } else {
                        idler(&m, &h, me, calls, &mut rng);
                    }
                    let mut world = m.world();
                    world.alive[me] = false;
                    if finished.fetch_add(1, Ordering::AcqRel) == callers + idlers {
                        world.done = true;
                    } else if world.lost.is_none() && world.stuck() {
                        world.lost = Some(format!("{:?}", world.waits));
                    }
                    drop(world);
                    m.changed.notify_all();
                } else if me == callers {
                    reader(&m, &h, me, &mut rng);
                } else {
                    peer(&m, me, &mut rng);
                }
            })
        })
        .collect();
    for t in handles {
        t.join().unwrap();
    }
    let lost = m.world().lost.take();
    (
        lost,
        [
            m.reads[0].load(Ordering::Relaxed),
            m.reads[1].load(Ordering::Relaxed),
            m.gave_way.load(Ordering::Relaxed),
        ],
    )
}

#[test]
fn model_one_reader_at_a_time_and_no_lost_wake_up() {
    let mut reads = [0, 0];
    for seed in 0..150 {
        for callers in 1..=3 {
            let (lost, r) = run(callers, 0, 40, seed);
            assert_eq!(lost, None, "lost wake-up: {callers} callers, seed {seed}");
            reads[0] += r[0];
            reads[1] += r[1];
        }
    }
    // Both ways of reading the socket were exercised: callers that read for themselves, and
    // the reader thread (for callers whose leader left before their reply came).
    assert!(reads[0] > 0 && reads[1] > 0, "reads {reads:?}");
}

/// The same with idle waiters reading the socket too (yielding it to each other and to callers
/// that come for it): still one reader at a time, and every reply and every message read.
#[test]
fn model_with_idle_waiters_no_lost_wake_up() {
    let mut reads = [0, 0, 0];
    for seed in 0..100 {
        for (callers, idlers) in [(0, 1), (1, 1), (2, 1), (1, 2), (2, 2)] {
            let (lost, r) = run(callers, idlers, 30, seed);
            assert_eq!(
                lost, None,
                "lost wake-up: {callers} callers, {idlers} idle waiters, seed {seed}"
            );
            reads[0] += r[0];
            reads[1] += r[1];
            reads[2] += r[2];
        }
    }
    // Callers and idle waiters read, the reader thread read, and idle waiters gave way.
    assert!(reads.iter().all(|&n| n > 0), "reads {reads:?}");
}

/// The model's detector flags a lost wake-up when there is one: with a watch that the last
/// caller out fails to re-arm, a caller that waited on its channel while another had the
/// socket is left with its reply on the socket and nobody to read it.
#[test]
fn model_detects_a_watch_left_disarmed() {
    struct Broken(Arc<Model>);
    impl Arm for Broken {
        fn arm(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn disarm(&self) -> std::io::Result<()> {
            self.0.disarm()
        }
    }
    for broken in [false, true] {
        // Callers 0 and 1, the reader thread 2.
        let m = model(2, 3);
        let read_own_reply = |_: &mut ()| assert!(m.read(0, &mut Rng(1)));
        m.world().socket.push_back(Some(0));
        // Caller 1 waits on its channel (caller 0 has the socket); the reader thread sleeps.
        m.world().waits[1] = Some(Wait::Reply(1));
        m.world().waits[2] = Some(Wait::Watch);
        // Caller 0 reads its reply and leaves; then caller 1's reply arrives.
        if broken {
            Handoff::new((), Broken(m.clone())).lead(|| {}, read_own_reply)
        } else {
            Handoff::new((), m.clone()).lead(|| {}, read_own_reply)
        }
        .unwrap()
        .unwrap();
        let mut world = m.world();
        world.alive[0] = false;
        world.socket.push_back(Some(1));
        assert_eq!(world.stuck(), broken, "broken {broken}");
    }
}
