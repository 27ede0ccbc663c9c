//! Who reads the socket, and how it passes between readers.
//!
//! Two kinds of thread read a connection's socket:
//!
//! - the **reader thread**, for the peer's requests (and replies nobody else picks up). It
//!   sleeps in [`Watch::wait`] on a one-shot epoll watch of the socket, *without* holding the
//!   receive buffers, so that a caller can take the socket over at any time without waiting
//!   for this thread to be scheduled;
//! - a **caller** waiting for the reply to its own request (a read, say). It reads the socket
//!   itself, so that the reply wakes the caller directly, not through the reader thread (one
//!   wake-up instead of two on the latency path).
//! - a **device's thread waiting for work** ([`Lead::Yielding`]: a lent NVMe controller's
//!   worker while it is idle). It reads the socket too, so that the doorbell that ends its
//!   wait reaches it with no thread in between; it gives the socket up to another such thread
//!   that comes to wait (the device that was busy last is the likeliest to get the next
//!   doorbell) and to a caller waiting for a reply (it nudges it to leave and takes the lock:
//!   one wake-up, after which it reads its own replies, where a hand-over costs one wake-up
//!   per reply). Once it gave the socket up, it parks for the rest of its wait and reads the
//!   socket again only when no one does: it does not take it back from another.
//!
//! The receive buffers are behind one lock ([`Handoff`]'s `rx`), so only one thread reads the
//! socket at a time: whoever holds it "has the socket". The hand-off protocol, with its three
//! pieces of state:
//!
//! - `leaders` counts the callers that want the socket. The reader thread, while it holds the
//!   socket and reads on (adaptive polling), gives it up as soon as this is non-zero
//!   ([`Handoff::wanted`]).
//! - `leading` is set while a caller has the socket: another caller then waits for its reply
//!   on its channel ([`Handoff::led`]) rather than queueing for the lock; the caller that has
//!   the socket hands every reply it reads to its caller.
//! - `armed` (under the lock) tells whether the reader thread's watch may be armed. A caller
//!   taking the socket disarms the watch (so that its reply does not wake the reader thread
//!   too); the **last** caller to leave (`leaders` back to 0) re-arms it. The reader thread,
//!   after its turn, re-arms the watch itself unless a caller waits for the socket; then that
//!   caller (or the last one after it) re-arms it.
//!
//! The invariants (checked by the model test below): one reader of the socket at a time; while
//! a caller has the socket, the watch is disarmed; and no lost wake-up — when nobody has the
//! socket and no caller wants it, the watch is armed, so data arriving later wakes the reader
//! thread. A caller waiting on its channel therefore always gets its reply: from the caller
//! that has the socket, or from the reader thread once that caller left. (In the session every
//! wait also has a timeout, the keepalive interval, so a lost wake-up would cost latency rather
//! than a hang; the model waits without timeouts, so there it is a deadlock, and detected.)

use std::cell::Cell;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use devlend_fabric::FabricError;
use rustix::event::{poll, PollFd, PollFlags, Timespec};

use super::recv::Pumped;
use super::{Connection, EndError, Reply, RxState};
use crate::ntb::Inner;
use crate::watch::Watch;
use devlend_sync::{lock, Pause, Spin};

/// The reader thread's wake-up on the socket, as the hand-off drives it.
pub(super) trait Arm {
    /// Lets the next event (or one already pending) wake the reader thread, once.
    fn arm(&self) -> io::Result<()>;
    /// Keeps events from waking the reader thread until the next [`Arm::arm`].
    fn disarm(&self) -> io::Result<()>;
}

impl Arm for Watch {
    fn arm(&self) -> io::Result<()> {
        Watch::arm(self)
    }

    fn disarm(&self) -> io::Result<()> {
        Watch::disarm(self)
    }
}

thread_local! {
    /// The [`Handoff`] whose socket this thread is reading (its address; 0: none), so that a
    /// wait on the same socket from inside that reading (which would wait for itself) fails
    /// instead of deadlocking.
    static READING: Cell<usize> = const { Cell::new(0) };
}

/// Runs `read` marked as reading the socket of the hand-off at `at`.
fn reading<T>(at: usize, read: impl FnOnce() -> T) -> T {
    let before = READING.with(|r| r.replace(at));
    let out = read();
    READING.with(|r| r.set(before));
    out
}

/// The receive state `S`, with what the hand-off keeps under the same lock.
struct Held<S> {
    state: S,
    /// The watch may be armed (a caller taking over the socket disarms it first).
    armed: bool,
}

/// The socket's receive state and the reader thread's watch `W`, handed between the reader
/// thread and callers (see the module's documentation).
pub(super) struct Handoff<S, W> {
    rx: Mutex<Held<S>>,
    watch: W,
    /// Callers that want to read; the reader thread leaves the socket to them meanwhile, and
    /// the last one re-arms the watch.
    leaders: AtomicUsize,
    /// A caller is reading: other callers wait for their reply instead of taking over.
    leading: AtomicBool,
    /// The caller reading gives the socket up to any other caller that wants it (it waits
    /// for work of its own, not for a reply: [`Handoff::lead_yielding`]).
    yielding: AtomicBool,
}

impl<S, W: Arm> Handoff<S, W> {
    /// `watch` must be armed.
    pub(super) fn new(state: S, watch: W) -> Self {
        Self {
            rx: Mutex::new(Held { state, armed: true }),
            watch,
            leaders: AtomicUsize::new(0),
            leading: AtomicBool::new(false),
            yielding: AtomicBool::new(false),
        }
    }

    /// The reader thread's watch (it waits on it).
    pub(super) fn watch(&self) -> &W {
        &self.watch
    }

    /// Whether a caller has the socket (and hands other callers their replies).
    pub(super) fn led(&self) -> bool {
        self.leading.load(Ordering::Acquire)
    }

    /// Whether a caller wants the socket: the reader thread should give it up.
    pub(super) fn wanted(&self) -> bool {
        self.leaders.load(Ordering::Acquire) != 0
    }

    /// Whether the caller that has the socket gives it up to others: a caller that comes to
    /// wait the same way takes the socket over, and any caller that comes for the socket
    /// nudges it (a caller waiting for a reply otherwise waits for it to be handed over).
    pub(super) fn led_yielding(&self) -> bool {
        self.leading.load(Ordering::SeqCst) && self.yielding.load(Ordering::SeqCst)
    }

    /// For a caller that leads yielding: another caller wants the socket, give it up.
    pub(super) fn wanted_by_another(&self) -> bool {
        self.leaders.load(Ordering::SeqCst) > 1
    }

    /// Runs `read` with the receive state: the reader thread's first read (what came with
    /// the handshake), before its watch fired.
    pub(super) fn first<T>(&self, read: impl FnOnce(&mut S) -> T) -> T {
        let mut st = lock(&self.rx);
        reading(self.address(), || read(&mut st.state))
    }

    fn address(&self) -> usize {
        std::ptr::from_ref(self) as usize
    }

    /// A caller takes the socket and runs `read` with it, disarming the reader thread's watch
    /// meanwhile; the last caller out re-arms it. `Ok(None)` when another caller had taken
    /// the socket first (wait for it to hand the reply over). An error when the watch could
    /// not be re-armed (the reader thread would not wake: the connection is unusable).
    ///
    /// If the caller that has the socket leads yielding ([`Handoff::lead_yielding`]),
    /// `nudge` is called once this caller counts as wanting the socket: it must make that
    /// caller look at [`Handoff::wanted_by_another`] soon (it may sleep on the socket).
    pub(super) fn lead<T>(
        &self,
        nudge: impl FnOnce(),
        read: impl FnOnce(&mut S) -> T,
    ) -> io::Result<Option<T>> {
        self.lead_with(false, nudge, read)
    }

    /// As [`Handoff::lead`], for a caller that waits for work of its own rather than for a
    /// reply: while it has the socket, `read` gives it up as soon as
    /// [`Handoff::wanted_by_another`] holds (a caller that comes for the socket nudges it).
    /// It takes the socket from a caller that leads yielding too: the latest to wait is the
    /// likeliest to get work next (the device that was just busy).
    pub(super) fn lead_yielding<T>(
        &self,
        nudge: impl FnOnce(),
        read: impl FnOnce(&mut S) -> T,
    ) -> io::Result<Option<T>> {
        self.lead_with(true, nudge, read)
    }

    fn lead_with<T>(
        &self,
        yielding: bool,
        nudge: impl FnOnce(),
        read: impl FnOnce(&mut S) -> T,
    ) -> io::Result<Option<T>> {
        if READING.with(Cell::get) == self.address() {
            // This thread reads the socket already, further up its stack (it applies what it
            // read, and that waits on the link): the wait would be for itself.
            return Err(io::Error::other(
                "a wait on the link from the thread that reads its socket",
            ));
        }
        // Sequentially consistent with `yielding` below: either this caller sees the leader
        // yielding and nudges it, or that leader sees this caller in `leaders` when it checks
        // `wanted_by_another`, which it does before it first waits.
        self.leaders.fetch_add(1, Ordering::SeqCst);
        if self.led_yielding() {
            // (A caller waiting for a reply gets here only if the socket was free when it
            // looked, and a yielding caller took it since.)
            nudge();
        }
        let mut st = lock(&self.rx);
        let result = if self.leading.swap(true, Ordering::AcqRel) {
            // Lost the race to another caller: wait for it instead.
            None
        } else {
            if st.armed {
                // A failure only costs the reader thread a spurious wake-up.
                let _ = self.watch.disarm();
                st.armed = false;
            }
            self.yielding.store(yielding, Ordering::SeqCst);
            let r = reading(self.address(), || read(&mut st.state));
            self.yielding.store(false, Ordering::SeqCst);
            self.leading.store(false, Ordering::Release);
            Some(r)
        };
        if self.leaders.fetch_sub(1, Ordering::AcqRel) == 1 && !st.armed {
            // The last caller out hands the socket back to the reader thread.
            self.watch.arm()?;
            st.armed = true;
        }
        drop(st);
        Ok(result)
    }

    /// The reader thread's turn once its watch fired: `read` runs with the socket (giving it
    /// up when [`Handoff::wanted`]) and returns whether to go on (`false`: the connection
    /// ended). Then the watch is re-armed, unless a caller waits for the socket: that caller
    /// re-arms it when it is done.
    pub(super) fn reader_turn<E: From<io::Error>>(
        &self,
        read: impl FnOnce(&mut S) -> Result<bool, E>,
    ) -> Result<bool, E> {
        let mut st = lock(&self.rx);
        // The event disarmed the watch; `armed` stays set (a caller disarming again is
        // harmless).
        if !reading(self.address(), || read(&mut st.state))? {
            return Ok(false);
        }
        if !self.wanted() {
            self.watch.arm()?;
            st.armed = true;
        }
        // Else a caller waits for the socket and re-arms the watch when it is done.
        Ok(true)
    }
}

/// How a caller waiting in [`Connection::await_until`] holds the socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Lead {
    /// Until its answer comes: it waits for something the link brings (a reply, the peer's
    /// doorbell), and other callers wait for it to hand theirs over.
    Answer,
    /// Until its answer comes or another caller that waits this way comes for the socket: it
    /// waits for work of its own (a device's thread while idle), and the latest device to go
    /// idle, the likeliest to get the next doorbell, has the socket.
    Yielding,
}

/// Where a waiter of [`Connection::await_until`] stands between its turns at the socket.
///
/// A caller that leads yielding (an idle device's thread) holds the socket only while no one
/// else on the link needs it: a caller waiting for a reply takes it over (and then reads its
/// own replies, and the next ones, with no hand-over and no wake-up each), as does a device
/// that goes idle later (the likelier to get the next doorbell). A yielding caller that was
/// made to give the socket up parks once, and then does not take the socket back from another
/// while it waits: it reads the socket again only when no one does. (Two devices on one link
/// otherwise passed the socket back and forth, and the idle one read and handed over every
/// reply of the busy one: docs/MEASUREMENTS.md, "An idle device's thread leaves the socket
/// to the busy".)
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Turns {
    /// Gave the socket up to another caller: park once before going for it again.
    gave_way: bool,
    /// Gave it up at least once in this wait: another thread on the link is busy.
    displaced: bool,
}

impl Turns {
    /// Whether a waiter of kind `how` parks now (another caller brings its answer) rather than
    /// goes for the socket, given whether a caller has the socket (`led`) and whether that
    /// caller leads yielding.
    pub(super) fn park(&mut self, how: Lead, led: bool, led_yielding: bool) -> bool {
        let take_over = led_yielding && !(how == Lead::Yielding && self.displaced);
        let park = self.gave_way || (led && !take_over);
        self.gave_way = false;
        park
    }

    /// The waiter gave the socket up to another that wanted it.
    pub(super) fn gave_way(&mut self) {
        self.gave_way = true;
        self.displaced = true;
    }
}

/// Waits until `sock` is readable (or has an error or hang-up), or until `wake` is signalled
/// (then cleared); whether the socket is readable, `false` after `timeout`.
fn wait_readable(
    sock: &std::net::TcpStream,
    wake: &OwnedFd,
    timeout: Duration,
) -> Result<bool, EndError> {
    let timeout = Timespec::try_from(timeout.max(Duration::from_millis(1))).ok();
    loop {
        let mut fds = [
            PollFd::new(sock, PollFlags::IN),
            PollFd::new(wake, PollFlags::IN),
        ];
        match poll(&mut fds, timeout.as_ref()) {
            Ok(_) => {
                let [sock, wake_fd] = &fds;
                if !wake_fd.revents().is_empty() {
                    // Cleared, so that it wakes no later wait; the count does not matter.
                    let _ = rustix::io::read(wake, &mut [0u8; 8]);
                }
                return Ok(!sock.revents().is_empty());
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(EndError::Io(e.into())),
        }
    }
}

impl Connection {
    /// Waits for the reply on `reply`, reading the socket itself when no one else is.
    pub(super) fn await_reply(
        &self,
        inner: &Inner,
        reply: &Receiver<Reply>,
        deadline: Instant,
    ) -> Result<Reply, FabricError> {
        self.await_until(
            inner,
            Lead::Answer,
            deadline,
            || match reply.try_recv() {
                Ok(r) => Some(Ok(r)),
                Err(TryRecvError::Disconnected) => Some(Err(FabricError::LinkDown)),
                Err(TryRecvError::Empty) => None,
            },
            |wait| match reply.recv_timeout(wait) {
                Ok(r) => Some(Ok(r)),
                Err(RecvTimeoutError::Disconnected) => Some(Err(FabricError::LinkDown)),
                Err(RecvTimeoutError::Timeout) => None,
            },
        )
    }

    /// Waits until `check` has an answer (`Some`), or until `deadline`
    /// ([`FabricError::Timeout`]). While no other caller reads the socket, this thread reads
    /// it itself, so that what it waits for wakes it directly rather than through the reader
    /// thread; while another caller does, it waits in `park` (for at most the time given,
    /// then `check` again), and that caller's reading brings the answer. A caller that leads
    /// [`Lead::Yielding`] gives the socket up to another that comes to wait the same way (and
    /// parks once before it tries again).
    pub(crate) fn await_until<T>(
        &self,
        inner: &Inner,
        how: Lead,
        deadline: Instant,
        mut check: impl FnMut() -> Option<Result<T, FabricError>>,
        mut park: impl FnMut(Duration) -> Option<Result<T, FabricError>>,
    ) -> Result<T, FabricError> {
        let mut turns = Turns::default();
        loop {
            if let Some(r) = check() {
                return r;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FabricError::Timeout);
            }
            if turns.park(how, self.rx.led(), self.rx.led_yielding()) {
                // Another caller reads the socket and brings our answer.
                match park((deadline - now).min(self.keepalive_interval)) {
                    Some(r) => return r,
                    None => continue,
                }
            }
            let read = |st: &mut RxState| self.lead(inner, st, how, &mut check, deadline);
            let led = match how {
                Lead::Answer => self.rx.lead(|| self.interrupt_reading(), read),
                Lead::Yielding => self.rx.lead_yielding(|| self.interrupt_reading(), read),
            };
            match led {
                Ok(Some(Some(r))) => return r,
                Ok(Some(None)) => turns.gave_way(),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "fabric link down: cannot watch the socket");
                    inner.link_down(self);
                    return Err(FabricError::LinkDown);
                }
            }
        }
    }

    /// A caller with the socket: reads it until `check` has its answer; `None` when it leads
    /// [`Lead::Yielding`] and another caller wants the socket.
    fn lead<T>(
        &self,
        inner: &Inner,
        st: &mut RxState,
        how: Lead,
        check: &mut impl FnMut() -> Option<Result<T, FabricError>>,
        deadline: Instant,
    ) -> Option<Result<T, FabricError>> {
        let end = |e: EndError| {
            if !matches!(e, EndError::Closed) {
                tracing::warn!(reason = %e, "fabric link down");
            }
            inner.link_down(self);
            FabricError::LinkDown
        };
        // Poll the socket for the spin budget, yielding the CPU between polls (a poll is a
        // system call; on two cores a pure spin would starve the thread it waits for), then
        // sleep until the socket is readable.
        let mut spin = Spin::yielding(self.spin);
        let mut spinning = !self.spin.is_zero();
        loop {
            if how == Lead::Yielding && self.rx.wanted_by_another() {
                return None;
            }
            if let Some(r) = check() {
                return Some(r);
            }
            let now = Instant::now();
            if now >= deadline {
                return Some(Err(FabricError::Timeout));
            }
            let readable = if spinning {
                spinning = spin.pause() != Pause::Spent;
                true
            } else {
                let wait = (deadline - now).min(self.keepalive_interval);
                match wait_readable(&self.sock, &self.lead_wake, wait) {
                    Ok(r) => r,
                    Err(e) => return Some(Err(end(e))),
                }
            };
            if readable {
                match self.pump(inner, st) {
                    // Data restarts the spin: what is waited for usually follows soon.
                    Ok(Pumped::Data) => {
                        spin = Spin::yielding(self.spin);
                        spinning = !self.spin.is_zero();
                    }
                    Ok(Pumped::Nothing) => {}
                    Ok(Pumped::Eof) => {
                        tracing::info!("fabric peer closed the link");
                        return Some(Err(end(EndError::Closed)));
                    }
                    Err(e) => return Some(Err(end(e))),
                }
            } else if self.silent_too_long() {
                return Some(Err(end(EndError::Silent)));
            }
        }
    }

    /// The reader thread: reads the socket whenever no caller does (see the module's
    /// documentation).
    pub(super) fn read_loop(&self, inner: &Inner) -> Result<(), EndError> {
        // What came with the end of the handshake, before any wake-up.
        if self.rx.first(|st| self.pump(inner, st))? == Pumped::Eof {
            return Ok(());
        }
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(EndError::Closed);
            }
            if !self.rx.watch().wait(self.keepalive_interval)? {
                if self.silent_too_long() {
                    return Err(EndError::Silent);
                }
                continue;
            }
            if !self.rx.reader_turn(|st| {
                Ok::<_, EndError>(self.read_while_busy(inner, st)? != Pumped::Eof)
            })? {
                return Ok(());
            }
        }
    }

    /// Reads the socket until it has been quiet for the spin budget, or until a caller wants
    /// it (adaptive polling: the peer's next request usually follows within the budget).
    fn read_while_busy(&self, inner: &Inner, st: &mut RxState) -> Result<Pumped, EndError> {
        // The budget runs from the last data; between polls the CPU is yielded (as in `lead`).
        let mut spin = Spin::yielding(self.spin);
        while !self.rx.wanted() {
            match self.pump(inner, st)? {
                Pumped::Eof => return Ok(Pumped::Eof),
                Pumped::Data => spin = Spin::yielding(self.spin),
                Pumped::Nothing => {
                    if spin.pause() == Pause::Spent {
                        break;
                    }
                }
            }
        }
        Ok(Pumped::Nothing)
    }
}

#[cfg(test)]
mod tests;
