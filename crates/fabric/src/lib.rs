//! The emulated NTB fabric, with the semantics of Linux `include/linux/ntb.h`.
//!
//! An NTB link joins two hosts. Each host has a physical address space ([`AddressSpace`]) of
//! RAM regions and MMIO regions. The link offers, per side:
//!
//! - **inbound memory windows** ([`MemoryWindows`]): the owner translates window *i* onto a range
//!   of its own bus addresses (`mw_set_trans`); the peer reaches that range through its
//!   **outbound aperture** ([`PeerWindows`]). Accesses through an untranslated window or past a
//!   window's translated size are errors, never stray accesses: windows are the isolation
//!   boundary. RAM behind a window is reached by loads/stores; MMIO by posted writes and
//!   non-posted reads delivered to the region's [`MmioHandler`] on the owning host, in order.
//! - **doorbells** ([`Doorbells`]): a bit vector the peer sets; unmasked set bits wake waiters.
//! - **scratchpads** ([`Scratchpads`]) and **message registers** ([`Messages`]).
//! - **link state** ([`Link`]): up/down, with a dead peer seen as down within a bounded time.
//!
//! A direct mapping of a peer window ([`PeerWindows::peer_mw_direct`]) is a fast path that a
//! backend *may* offer (shared memory does, TCP does not); callers never require it.
//!
//! ## Backends
//! - [`ShmNtb`] (`shm`): two processes on one machine rendezvous through a directory; RAM
//!   windows are shared mappings of the RAM's memfd (zero copy), MMIO requests travel on a
//!   shared ring to a service thread on the owning side, doorbells and completions wake through
//!   futexes in shared control pages. Socket end-of-stream is link down.
//! - [`loopback_pair`] (`loopback`): both sides in one process, same control pages and ring,
//!   with [`LoopbackNtb::link_down`] / [`LoopbackNtb::link_up`] to exercise reconnection.
//!
//! Both share one implementation of the register semantics (`endpoint`, over `page`). Every
//! waiter (doorbells, messages, read completions, the ring consumer) polls for at most
//! [`LinkConfig::spin`] and then sleeps on a futex, so producers pay a wake-up system call only
//! when the other side sleeps.
//!
//! ## Connections and generations
//! Registers (doorbells, scratchpads, messages) start from zero on every new connection, and
//! what the peer exported is forgotten at link down; this side's translations are re-announced
//! to each new peer. [`Link::link_generation`] advances on every up and every down, so a layer
//! above can tell a reconnected peer from the one it set state up with: redo handshakes (write
//! scratchpads, exchange messages) after each link-up. A span returned by
//! [`PeerWindows::peer_mw_direct`] keeps its mapping alive for as long as it is held, also
//! after the peer cleared the translation or the link went down: fetch it again when the
//! generation changes, and prefer it for bulk RAM access (the copy calls take one uncontended
//! read lock each; the span costs only the bounds check).
#![warn(missing_docs)]

mod address_space;
mod config;
mod endpoint;
mod error;
/// Fuzzing entry points (the `fuzzing` feature, enabled by `fuzz/` only).
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod loopback;
mod page;
pub mod registers;
pub mod shm;
mod sync;

pub use address_space::{AddressSpace, MmioHandler, Region, RegionKind, Resolved};
pub use config::LinkConfig;
pub use devlend_memory::{BusAddr, ByteRange, MemSpan, SharedMemory};
pub use error::FabricError;
pub use loopback::{loopback_pair, LoopbackNtb};
pub use shm::ShmNtb;

use std::time::{Duration, Instant};

/// Result type of fabric calls.
pub type Result<T> = std::result::Result<T, FabricError>;

/// An offset inside a memory window (relative to the window's translated base).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WindowOffset(pub u64);

/// Alignment and size limits of an inbound memory window (`ntb_mw_get_align`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MwAlign {
    /// Required alignment of the translated bus address (a power of two).
    pub addr_align: u64,
    /// Required alignment of the translated size (a power of two).
    pub size_align: u64,
    /// Largest size the window can translate.
    pub size_max: u64,
}

/// State of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// Both sides are connected; windows, doorbells and registers work.
    Up,
    /// The peer is gone or not yet there; peer operations fail with [`FabricError::LinkDown`].
    Down,
}

/// Link state and events (`ntb_link_is_up`, the `link_event` callback).
pub trait Link {
    /// Current state.
    fn link_state(&self) -> LinkState;
    /// Blocks until the link is in `want` or `timeout` passes ([`FabricError::Timeout`]).
    fn wait_link(&self, want: LinkState, timeout: Duration) -> Result<()>;
    /// A counter that increases on every up or down transition, so a caller can tell whether
    /// the peer it set state up with is still the same connection.
    fn link_generation(&self) -> u64;
    /// Declares the peer gone now, not at the fabric's own liveness timeout: the link goes
    /// down (every wait on it ends with [`FabricError::LinkDown`]) and comes up again when the
    /// peer answers anew. `reason` is logged. For fabrics whose waits on a silent peer end on
    /// their own (`shm`: memory copies) this does nothing, which is the default.
    fn drop_peer(&self, reason: &str) {
        let _ = reason;
    }
}

/// This side's inbound memory windows, which the peer accesses (`ntb_mw_*`).
pub trait MemoryWindows {
    /// Number of inbound windows.
    fn mw_count(&self) -> usize;
    /// Alignment and size limits of window `window`.
    fn mw_get_align(&self, window: usize) -> Result<MwAlign>;
    /// Points window `window` at `size` bytes of this host's bus addresses from `addr`. The range
    /// must respect [`MwAlign`] and lie inside one region of the local [`AddressSpace`].
    fn mw_set_trans(&self, window: usize, addr: BusAddr, size: u64) -> Result<()>;
    /// Removes the translation; later peer accesses through the window fail.
    fn mw_clear_trans(&self, window: usize) -> Result<()>;
}

/// The peer's windows as reached through this side's outbound apertures (`ntb_peer_mw_*`).
pub trait PeerWindows {
    /// Number of outbound apertures (the peer's inbound windows).
    fn peer_mw_count(&self) -> usize;
    /// Bytes the peer currently translates behind window `window`
    /// ([`FabricError::WindowNotTranslated`] when none).
    fn peer_mw_size(&self, window: usize) -> Result<u64>;
    /// Posted write of `data` at `offset` in the peer's window. Posted writes from this side
    /// arrive in order; the call may return before the write lands.
    fn peer_mw_write(&self, window: usize, offset: WindowOffset, data: &[u8]) -> Result<()>;
    /// Non-posted read at `offset`; it does not pass this side's earlier posted writes to the
    /// same window.
    fn peer_mw_read(&self, window: usize, offset: WindowOffset, buf: &mut [u8]) -> Result<()>;
    /// Several non-posted reads of window `window`, as a device with several read requests
    /// outstanding issues them: on a fabric where a read is a round trip (`tcp`) they are all
    /// sent before the first reply is awaited, so they cost about one round trip, not one
    /// each. Each read is ordered as [`PeerWindows::peer_mw_read`] is; what one read finds
    /// does not depend on the others. Fails (with the first error) if any fails. The default
    /// reads one after the other.
    fn peer_mw_read_many(
        &self,
        window: usize,
        reads: &mut [(WindowOffset, &mut [u8])],
    ) -> Result<()> {
        for (offset, buf) in reads.iter_mut() {
            self.peer_mw_read(window, *offset, buf)?;
        }
        Ok(())
    }
    /// A direct load/store mapping of the window when it targets peer RAM and the backend can
    /// map it (shared memory): `Ok(None)` means "use read/write". The span covers exactly the
    /// translated size.
    fn peer_mw_direct(&self, window: usize) -> Result<Option<MemSpan>>;
}

/// The doorbell register (`ntb_db_*`, `ntb_peer_db_set`).
pub trait Doorbells {
    /// Bits that exist.
    fn db_valid_mask(&self) -> u64;
    /// Currently set bits (masked or not).
    fn db_read(&self) -> u64;
    /// Clears `bits`.
    fn db_clear(&self, bits: u64) -> Result<()>;
    /// Currently masked bits.
    fn db_read_mask(&self) -> u64;
    /// Masks `bits`: they still latch but wake no one.
    fn db_set_mask(&self, bits: u64) -> Result<()>;
    /// Unmasks `bits`; a latched bit then wakes waiters.
    fn db_clear_mask(&self, bits: u64) -> Result<()>;
    /// Waits until any of `bits` is set and unmasked, returning those bits (not cleared), or
    /// [`FabricError::Timeout`]. Fails with [`FabricError::LinkDown`] when the link goes down.
    fn db_wait(&self, bits: u64, timeout: Duration) -> Result<u64>;
    /// Sets `bits` in the peer's doorbell register.
    fn peer_db_set(&self, bits: u64) -> Result<()>;
    /// Whether [`Doorbells::db_wait`] polls the link itself for a while before it sleeps, on
    /// the waiter's thread (`tcp`: the waiter reads the socket), so that a waiter needs no
    /// spin of its own in front of it. `false` by default: a waiter that wants the doorbell
    /// soon polls [`Doorbells::db_read`] first.
    fn db_wait_polls(&self) -> bool {
        false
    }
    /// Waits on the calling thread until `woken()` holds or `deadline` passes, reading the
    /// link itself meanwhile as [`Doorbells::db_wait`] does (`tcp`: while no other thread
    /// reads the socket, this one does), so that a write arriving for this thread's device
    /// wakes it directly rather than through the fabric's reader thread. While another
    /// thread reads the link, `park(d)` sleeps at most `d` the caller's own way (that
    /// thread's reading wakes it). Returns `Ok(true)` once it has waited; `Ok(false)`, having
    /// waited for nothing, on a fabric whose link no thread reads (the default): the caller
    /// then sleeps its own way. [`FabricError::LinkDown`] when the link goes down.
    fn wait_reading(
        &self,
        deadline: Instant,
        woken: &mut dyn FnMut() -> bool,
        park: &mut dyn FnMut(Duration),
    ) -> Result<bool> {
        let _ = (deadline, woken, park);
        Ok(false)
    }
    /// Makes a [`Doorbells::wait_reading`] in progress that reads the link check its `woken`
    /// now rather than at the link's next data: for a wake-up that comes from this process
    /// (another thread of the waiter's device), not over the link. A waiter parked meanwhile
    /// is woken its own way. Nothing by default.
    fn interrupt_wait_reading(&self) {}
}

/// Scratchpad registers (`ntb_spad_*`, `ntb_peer_spad_*`).
pub trait Scratchpads {
    /// Number of scratchpads on each side.
    fn spad_count(&self) -> usize;
    /// Reads a local scratchpad.
    fn spad_read(&self, index: usize) -> Result<u32>;
    /// Writes a local scratchpad.
    fn spad_write(&self, index: usize, value: u32) -> Result<()>;
    /// Reads one of the peer's scratchpads.
    fn peer_spad_read(&self, index: usize) -> Result<u32>;
    /// Writes one of the peer's scratchpads.
    fn peer_spad_write(&self, index: usize, value: u32) -> Result<()>;
}

/// Message registers (`ntb_msg_*`, `ntb_peer_msg_write`): a written message latches a status
/// bit on the receiver until it is cleared.
pub trait Messages {
    /// Number of inbound (and outbound) message registers.
    fn msg_count(&self) -> usize;
    /// Status bits: bit *i* set means inbound register *i* holds an unread message.
    fn msg_read_sts(&self) -> u64;
    /// Reads inbound register `index` (does not clear its status bit).
    fn msg_read(&self, index: usize) -> Result<u32>;
    /// Clears status bits, freeing those registers for the peer's next message.
    fn msg_clear_sts(&self, bits: u64) -> Result<()>;
    /// Writes `value` into the peer's inbound register `index`; [`FabricError::MessageBusy`]
    /// while the peer has not cleared the previous one.
    fn peer_msg_write(&self, index: usize, value: u32) -> Result<()>;
    /// Waits until any status bit in `bits` is set, returning the set ones.
    fn msg_wait(&self, bits: u64, timeout: Duration) -> Result<u64>;
}

/// One side of an NTB link: everything `ntb.h` offers, composed of narrow traits.
pub trait Ntb:
    Link + MemoryWindows + PeerWindows + Doorbells + Scratchpads + Messages + Send + Sync
{
    /// This host's address space, which inbound windows translate onto.
    fn address_space(&self) -> &AddressSpace;
    /// Name of the backend ("loopback", "shm", "tcp"), for status output.
    fn backend(&self) -> &'static str;
    /// Whether the fabric can hand the peer interrupt descriptors
    /// ([`Ntb::give_interrupt_fd`]); `false` by default.
    fn carries_interrupt_fds(&self) -> bool {
        false
    }
    /// Hands the peer `fd`, an eventfd that this side (or a device it owns) will signal instead
    /// of ringing the peer's doorbell bit `bit`: on hardware, a device's MSI-X write that the
    /// NTB carries straight to the peer's interrupt controller, with no CPU of this side
    /// involved. `cookie` is opaque to the fabric (the lending layer's lease): the peer takes
    /// the descriptor with the same cookie only. `Ok(false)` when the fabric cannot carry
    /// descriptors (the default): the peer then sees doorbells only.
    fn give_interrupt_fd(
        &self,
        bit: u32,
        cookie: u64,
        fd: &vmm_sys_util::eventfd::EventFd,
    ) -> Result<bool> {
        let _ = (bit, cookie, fd);
        Ok(false)
    }
    /// Takes the eventfd the peer gave (on the current link) for this side's doorbell bit
    /// `bit` with `cookie`; each is taken once, and a newer one for the same bit replaces an
    /// older one. `None` until it arrives, and always on fabrics that cannot carry descriptors.
    fn take_interrupt_fd(&self, bit: u32, cookie: u64) -> Option<vmm_sys_util::eventfd::EventFd> {
        let _ = (bit, cookie);
        None
    }
}
