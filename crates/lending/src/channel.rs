//! A message channel over the fabric, the way Linux's `ntb_transport` builds one: each host
//! exposes a *mailbox* (RAM) through inbound window [`MAILBOX_WINDOW`]; the peer writes records
//! into it with posted writes and then announces them in message register [`MGMT_MESSAGE`].
//! (Not a doorbell bit: doorbells carry the lent devices' MSI-X vectors, and their waiters
//! should be woken by interrupts only.)
//!
//! Mailbox layout (written only by the peer):
//!
//! | offset | field |
//! |---|---|
//! | 0x00 | `session`: the peer's session nonce for the current link-up |
//! | 0x08 | `ack`: `(my session as u32) << 32 \| records of mine the peer consumed` |
//! | 0x1000 + i * 4096 | slot *i*: `commit: u64`, `len: u32`, pad, payload |
//!
//! A record's payload is written first and its commit word (`(session as u32) << 32 \| seq`)
//! last; posted writes from one source arrive in order, so a matching commit word means the
//! payload is complete. Aligned 8-byte writes are assumed to land whole, as a PCIe TLP's
//! aligned qword does. Records from an earlier session never match, so a restarted peer cannot
//! be confused by stale slots. Every value read from the mailbox is untrusted.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use devlend_fabric::{BusAddr, FabricError, LinkState, Ntb, SharedMemory, WindowOffset};

/// Inbound window that holds each host's mailbox.
pub const MAILBOX_WINDOW: usize = 0;
/// Message register that announces new records.
pub const MGMT_MESSAGE: usize = 0;

const HEADER_BYTES: u64 = 0x1000;
const SLOT_BYTES: u64 = 0x1000;
const SLOTS: u64 = 63;
const SLOT_HEADER: u64 = 16;
/// Size of a mailbox.
pub const MAILBOX_BYTES: u64 = HEADER_BYTES + SLOTS * SLOT_BYTES;
/// Most records [`Channel::drain`] takes per call.
pub const DRAIN_MAX: usize = SLOTS as usize;
/// Largest payload of one record.
pub const MAX_PAYLOAD: usize = (SLOT_BYTES - SLOT_HEADER) as usize;

const OFF_SESSION: u64 = 0;
const OFF_ACK: u64 = 8;

/// Errors of the channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The fabric failed (link down, window missing).
    #[error("fabric: {0}")]
    Fabric(#[from] FabricError),
    /// A payload larger than a slot.
    #[error("message of {0} bytes exceeds the channel's {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    /// The peer did not make room (or did not set up its mailbox) in time.
    #[error("timed out waiting for the peer's mailbox")]
    Timeout,
    /// Local memory could not be set up.
    #[error("mailbox memory: {0}")]
    Memory(#[from] devlend_memory::MemError),
}

struct Tx {
    generation: u64,
    session: u64,
    sent: u64,
}

struct Rx {
    session: u64,
    next: u64,
}

/// One host's end of the channel.
pub struct Channel {
    ntb: Arc<dyn Ntb>,
    mailbox: Arc<SharedMemory>,
    /// Whether a sender is at work; the next one waits for its turn with its own deadline
    /// (never longer), so a send held by a peer that stopped answering holds no other caller
    /// past its time limit.
    sending: Mutex<bool>,
    turn: Condvar,
    tx: Mutex<Tx>,
    rx: Mutex<Rx>,
}

/// A sender's turn on the channel (see [`Channel::take_turn`]); ends on drop.
struct Turn<'a>(&'a Channel);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        *devlend_sync::lock(&self.0.sending) = false;
        self.0.turn.notify_one();
    }
}

fn nonce() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_ok()
    {
        let n = u64::from_le_bytes(b);
        if n as u32 != 0 {
            return n;
        }
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    (t ^ (u64::from(std::process::id()) << 32)) | 1
}

/// Waits until the peer's window `window` is translated onto at least `len` bytes, or fails:
/// at once when the link is down (never stalling a management thread), with
/// [`ChannelError::Timeout`] at `deadline`. Translations and management records travel on
/// different paths, so a record can arrive before the translation it relies on.
pub(crate) fn wait_peer_window(
    ntb: &dyn Ntb,
    window: usize,
    len: u64,
    deadline: Instant,
) -> Result<(), ChannelError> {
    loop {
        if ntb.link_state() == LinkState::Down {
            return Err(ChannelError::Fabric(FabricError::LinkDown));
        }
        match ntb.peer_mw_size(window) {
            Ok(size) if size >= len => return Ok(()),
            Ok(_) | Err(FabricError::WindowNotTranslated(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if Instant::now() >= deadline {
            return Err(ChannelError::Timeout);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn commit_word(session: u64, seq: u64) -> u64 {
    (u64::from(session as u32) << 32) | u64::from(seq as u32)
}

impl Channel {
    /// Creates this host's mailbox at `base` in its address space and translates
    /// [`MAILBOX_WINDOW`] onto it.
    pub fn new(ntb: Arc<dyn Ntb>, base: BusAddr) -> Result<Self, ChannelError> {
        let mailbox = Arc::new(SharedMemory::new(
            "devlend-mailbox",
            MAILBOX_BYTES as usize,
        )?);
        ntb.address_space().add_ram(base, mailbox.clone())?;
        ntb.mw_set_trans(MAILBOX_WINDOW, base, MAILBOX_BYTES)?;
        Ok(Self {
            ntb,
            mailbox,
            sending: Mutex::new(false),
            turn: Condvar::new(),
            tx: Mutex::new(Tx {
                generation: u64::MAX,
                session: 0,
                sent: 0,
            }),
            rx: Mutex::new(Rx {
                session: 0,
                next: 1,
            }),
        })
    }

    /// Starts a new sending session after (re)link-up: waits for the peer's mailbox window and
    /// announces our nonce.
    fn start_session(&self, tx: &mut Tx, deadline: Instant) -> Result<(), ChannelError> {
        // Read before waiting: if the link flaps meanwhile, the next send sees a newer
        // generation and starts over.
        let generation = self.ntb.link_generation();
        wait_peer_window(&*self.ntb, MAILBOX_WINDOW, MAILBOX_BYTES, deadline)?;
        let session = nonce();
        self.ntb.peer_mw_write(
            MAILBOX_WINDOW,
            WindowOffset(OFF_SESSION),
            &session.to_le_bytes(),
        )?;
        *tx = Tx {
            generation,
            session,
            sent: 0,
        };
        Ok(())
    }

    fn acked(&self, session: u64) -> u64 {
        match self.mailbox.load_u64(OFF_ACK) {
            Ok(ack) if ack >> 32 == u64::from(session as u32) => ack & 0xffff_ffff,
            _ => 0,
        }
    }

    /// Waits until no other sender is at work, at most until `deadline`.
    fn take_turn(&self, deadline: Instant) -> Result<Turn<'_>, ChannelError> {
        let mut busy = devlend_sync::lock(&self.sending);
        while *busy {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ChannelError::Timeout);
            }
            busy = devlend_sync::wait_timeout(&self.turn, busy, left).0;
        }
        *busy = true;
        Ok(Turn(self))
    }

    /// Sends one record, waiting up to `timeout` for another sender to finish, for the peer's
    /// mailbox and for room.
    pub fn send(&self, payload: &[u8], timeout: Duration) -> Result<(), ChannelError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(ChannelError::TooLarge(payload.len()));
        }
        let deadline = Instant::now() + timeout;
        let _turn = self.take_turn(deadline)?;
        let mut tx = devlend_sync::lock(&self.tx);
        if tx.generation != self.ntb.link_generation() || tx.session == 0 {
            self.start_session(&mut tx, deadline)?;
        }
        let seq = tx.sent + 1;
        // Flow control: slot (seq - 1) % SLOTS is free once the peer consumed seq - SLOTS.
        while seq.saturating_sub(self.acked(tx.session)) > SLOTS {
            if self.ntb.link_generation() != tx.generation {
                return Err(ChannelError::Fabric(FabricError::LinkDown));
            }
            if Instant::now() >= deadline {
                return Err(ChannelError::Timeout);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let slot = HEADER_BYTES + ((seq - 1) % SLOTS) * SLOT_BYTES;
        let mut body = Vec::with_capacity(8 + payload.len());
        body.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        body.extend_from_slice(&[0u8; 4]);
        body.extend_from_slice(payload);
        self.ntb
            .peer_mw_write(MAILBOX_WINDOW, WindowOffset(slot + 8), &body)?;
        self.ntb.peer_mw_write(
            MAILBOX_WINDOW,
            WindowOffset(slot),
            &commit_word(tx.session, seq).to_le_bytes(),
        )?;
        tx.sent = seq;
        // A busy register means the peer has not taken the previous announcement yet: it
        // clears the status before draining, so it will see this record too.
        match self.ntb.peer_msg_write(MGMT_MESSAGE, seq as u32) {
            Ok(()) | Err(FabricError::MessageBusy(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits up to `timeout` for an announcement; clears it before the caller drains records,
    /// so no wake-up is lost. Returns whether one came.
    pub fn wait(&self, timeout: Duration) -> Result<bool, ChannelError> {
        let bit = 1u64 << MGMT_MESSAGE;
        match self.ntb.msg_wait(bit, timeout) {
            Ok(_) => {
                self.ntb.msg_clear_sts(bit)?;
                Ok(true)
            }
            Err(FabricError::Timeout) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes the complete records the peer has committed, in order, and acknowledges them: at
    /// most [`DRAIN_MAX`] per call (one mailbox's worth), so a peer that keeps committing
    /// records cannot hold the caller. The flag says whether the batch was cut short (more
    /// records may be waiting: drain again before sleeping).
    pub fn drain(&self) -> (Vec<Vec<u8>>, bool) {
        let mut rx = devlend_sync::lock(&self.rx);
        let mut out = Vec::new();
        let Ok(session) = self.mailbox.load_u64(OFF_SESSION) else {
            return (out, false);
        };
        if session != rx.session {
            *rx = Rx { session, next: 1 };
        }
        if session == 0 {
            return (out, false);
        }
        let first = rx.next;
        let mut looked = 0;
        let mut cut_short = true;
        while looked < DRAIN_MAX {
            looked += 1;
            let slot = HEADER_BYTES + (rx.next.wrapping_sub(1) % SLOTS) * SLOT_BYTES;
            match self.mailbox.load_u64(slot) {
                Ok(c) if c == commit_word(session, rx.next) => {}
                _ => {
                    cut_short = false;
                    break;
                }
            }
            let len = match self.mailbox.load_u32(slot + 8) {
                Ok(len) if (len as usize) <= MAX_PAYLOAD => len as usize,
                _ => {
                    // A corrupt record: skip it rather than stall the channel forever.
                    tracing::warn!(seq = rx.next, "dropping a malformed mailbox record");
                    rx.next = rx.next.wrapping_add(1);
                    continue;
                }
            };
            let mut payload = vec![0u8; len];
            if self
                .mailbox
                .read_at(slot + SLOT_HEADER, &mut payload)
                .is_err()
            {
                cut_short = false;
                break;
            }
            out.push(payload);
            rx.next = rx.next.wrapping_add(1);
        }
        if rx.next != first {
            let ack = commit_word(session, rx.next.wrapping_sub(1));
            // Best effort: a lost ack only delays the peer's flow control until the next one.
            let _ =
                self.ntb
                    .peer_mw_write(MAILBOX_WINDOW, WindowOffset(OFF_ACK), &ack.to_le_bytes());
        }
        (out, cut_short)
    }
}
