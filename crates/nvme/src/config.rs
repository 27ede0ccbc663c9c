//! What an NVMe device model is built from.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::NvmeError;

/// Logical block size of the one namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockSize {
    /// 512-byte blocks.
    B512,
    /// 4096-byte blocks.
    B4096,
}

impl BlockSize {
    /// log2 of the size (`LBADS`).
    pub fn shift(self) -> u32 {
        match self {
            BlockSize::B512 => 9,
            BlockSize::B4096 => 12,
        }
    }

    /// Size in bytes.
    pub fn bytes(self) -> u32 {
        1 << self.shift()
    }
}

/// Default [`NvmeConfig::io_workers`]: 1, every command on the worker thread. Four pool
/// threads overlap the commands' round trips over `tcp`, but on the loaded 2-core host where
/// this was measured (`devlend bench lending`, docs/MEASUREMENTS.md) they cost more CPU per
/// I/O than the overlap saved: QD32 writes over tcp were 16-32% slower than with one worker.
/// Raise it on a host with cores to spare and a link whose round trips dominate.
pub const DEFAULT_IO_WORKERS: u16 = 1;

/// Default [`NvmeConfig::poll_spin`]: 30 µs.
pub const DEFAULT_POLL_SPIN: Duration = Duration::from_micros(30);

/// Default [`NvmeConfig::poll_spin_max`]: 200 µs, a few times what a sleep and a wake-up cost
/// on the machines this was measured on. A QEMU guest under TCG often rings the next doorbell
/// later than 30 µs after a completion: with a fixed 30 µs the worker had gone to sleep before
/// 0.2 to 0.8 of the commands at QD1, and each of those doorbells came as a socket message and
/// a wake-up (docs/MEASUREMENTS.md, "The worker's poll budget follows the gaps").
pub const DEFAULT_POLL_SPIN_MAX: Duration = Duration::from_micros(200);

/// Default [`NvmeConfig::interrupt_hold`]: 100 µs.
pub const DEFAULT_INTERRUPT_HOLD: Duration = Duration::from_micros(100);

/// Default [`NvmeConfig::burst_hold`]: 200 µs, the aggregation time that served a one-vCPU
/// TCG guest at QD32 best (docs/MEASUREMENTS.md, "What the idle QD32 guest row lacks").
pub const DEFAULT_BURST_HOLD: Duration = Duration::from_micros(200);

/// Configuration of an NVMe controller model with one namespace backed by a raw image file.
#[derive(Clone, Debug)]
pub struct NvmeConfig {
    /// The raw image file.
    pub image: PathBuf,
    /// Create the image with this many bytes when it does not exist (`None`: it must exist).
    pub create_size: Option<u64>,
    /// Serial number (at most 20 ASCII characters; longer is cut).
    pub serial: String,
    /// Model number (at most 40 ASCII characters).
    pub model: String,
    /// Firmware revision (at most 8 ASCII characters).
    pub firmware_rev: String,
    /// Most I/O submission/completion queue pairs a driver may create (1 to 64).
    pub max_io_queue_pairs: u16,
    /// Most entries per queue (2 to 4096; `CAP.MQES` + 1).
    pub max_queue_entries: u32,
    /// Maximum Data Transfer Size as a power of two of 4 KiB pages (1 to 10; 5 = 128 KiB).
    pub mdts: u8,
    /// Logical block size.
    pub block_size: BlockSize,
    /// How long the worker polls the doorbells after its last command before sleeping, at
    /// least: the budget grows towards [`NvmeConfig::poll_spin_max`] while the next command
    /// keeps coming within that (see [`devlend_sync::SpinBudget`]).
    pub poll_spin: Duration,
    /// The most the worker's poll budget grows to: idle gaps longer than this are waited out
    /// asleep, and one of them puts the budget back to [`NvmeConfig::poll_spin`]. Equal to
    /// `poll_spin` for a fixed budget.
    pub poll_spin_max: Duration,
    /// The longest an idle worker sleeps before looking at the doorbells anyway. Doorbell
    /// writes through BAR0 wake it at once, and so does a futex wake on the sleep word of
    /// [`crate::NvmeDevice::doorbell_page`]; lower this (e.g. to 50 µs) only for a front-end
    /// that maps the page into a driver and cannot wake the worker.
    pub idle_recheck: Duration,
    /// `CAP.TO`: the longest the controller takes to become ready, in 500 ms units.
    pub ready_timeout_500ms: u8,
    /// Open the image read-only (writes fail with an error status).
    pub read_only: bool,
    /// SR-IOV: the physical function gets the SR-IOV capability and a primary controller
    /// whose secondaries are the VFs ([`crate::NvmeDevice::new_virtual_function`]).
    pub sriov: Option<crate::virt::SriovConfig>,
    /// A Controller Memory Buffer of this many bytes in BAR 2 (a power of two from 64 KiB to
    /// 1 GiB; `None`: no CMB, `CAP.CMBS` clear). Not offered together with SR-IOV.
    pub cmb_bytes: Option<u64>,
    /// Threads that run NVM Read and Write commands when the device's DMA is a message (its
    /// submission queue has no direct mapping, e.g. borrowed over `tcp`), so that this many
    /// commands' data transfers overlap (1 to 16; 1: every command runs on the worker thread,
    /// one at a time). Over a direct mapping (`shm`, local) commands always run on the worker.
    pub io_workers: u16,
    /// The longest a completion waits for its interrupt while the host is still reading the
    /// entries the previous interrupt of its queue announced (its head doorbell has not yet
    /// reached them): the host's handler reads on until it finds no new entry, so it usually
    /// takes the new one too, and then no interrupt is sent for it. Applies to I/O completion
    /// queues whose ring and head the device reads from memory it maps (local, `shm`, a
    /// vfio-user guest), not over `tcp`. Zero: every pass's completions are signalled at once.
    pub interrupt_hold: Duration,
    /// The longest a completion waits for its interrupt while the host goes on submitting
    /// commands, where the device has learned that holding pays (adaptive interrupt
    /// moderation, see the `burst` module): the host's next commands arrive within twice their
    /// recent spacing, and one interrupt then carries many completions. A host that waits for
    /// its interrupts (QD1) turns it off after four such waits. Applies where
    /// [`NvmeConfig::interrupt_hold`] does, and not when the host set Interrupt Coalescing.
    /// Zero: off.
    pub burst_hold: Duration,
}

impl NvmeConfig {
    /// Defaults for an image at `image`: 16 I/O queue pairs of up to 1024 entries, 128 KiB
    /// MDTS, 512-byte blocks, 30 to 200 µs of polling, [`DEFAULT_IO_WORKERS`] I/O threads.
    pub fn new(image: impl Into<PathBuf>) -> Self {
        NvmeConfig {
            image: image.into(),
            create_size: None,
            serial: "DEVLEND0001".into(),
            model: "devlend NVMe model".into(),
            firmware_rev: "0.1".into(),
            max_io_queue_pairs: 16,
            max_queue_entries: 1024,
            mdts: 5,
            block_size: BlockSize::B512,
            poll_spin: DEFAULT_POLL_SPIN,
            poll_spin_max: DEFAULT_POLL_SPIN_MAX,
            idle_recheck: Duration::from_millis(100),
            ready_timeout_500ms: 20,
            read_only: false,
            sriov: None,
            cmb_bytes: None,
            io_workers: DEFAULT_IO_WORKERS,
            interrupt_hold: DEFAULT_INTERRUPT_HOLD,
            burst_hold: DEFAULT_BURST_HOLD,
        }
    }

    /// Checks the limits.
    pub fn validate(&self) -> Result<(), NvmeError> {
        if !(1..=64).contains(&self.max_io_queue_pairs) {
            return Err(NvmeError::InvalidConfig(
                "max_io_queue_pairs must be 1 to 64",
            ));
        }
        if !(2..=4096).contains(&self.max_queue_entries) {
            return Err(NvmeError::InvalidConfig(
                "max_queue_entries must be 2 to 4096",
            ));
        }
        if !(1..=10).contains(&self.mdts) {
            return Err(NvmeError::InvalidConfig("mdts must be 1 to 10"));
        }
        if self.idle_recheck < Duration::from_micros(10)
            || self.idle_recheck > Duration::from_secs(1)
        {
            return Err(NvmeError::InvalidConfig(
                "idle_recheck must be 10 µs to 1 s",
            ));
        }
        if self.poll_spin > Duration::from_millis(10) {
            return Err(NvmeError::InvalidConfig("poll_spin must be at most 10 ms"));
        }
        if self.poll_spin_max > Duration::from_millis(10) {
            return Err(NvmeError::InvalidConfig(
                "poll_spin_max must be at most 10 ms",
            ));
        }
        if self.burst_hold > Duration::from_millis(10) {
            return Err(NvmeError::InvalidConfig("burst_hold must be at most 10 ms"));
        }
        if self.interrupt_hold > Duration::from_millis(10) {
            return Err(NvmeError::InvalidConfig(
                "interrupt_hold must be at most 10 ms",
            ));
        }
        if !(1..=16).contains(&self.io_workers) {
            return Err(NvmeError::InvalidConfig("io_workers must be 1 to 16"));
        }
        if let Some(s) = &self.sriov {
            if s.total_vfs == 0 || s.total_vfs > crate::virt::MAX_SECONDARIES {
                return Err(NvmeError::InvalidConfig("total_vfs must be 1 to 127"));
            }
        }
        if let Some(bytes) = self.cmb_bytes {
            crate::cmb::check_size(bytes)?;
            if self.sriov.is_some() {
                return Err(NvmeError::InvalidConfig(
                    "a CMB is not offered on a function with SR-IOV",
                ));
            }
        }
        Ok(())
    }

    /// MSI-X vectors the function has: one per I/O completion queue plus the admin queue.
    pub fn msix_vectors(&self) -> u16 {
        self.max_io_queue_pairs + 1
    }

    /// Largest transfer in bytes (MDTS).
    pub fn max_transfer_bytes(&self) -> u64 {
        4096u64 << self.mdts
    }
}
