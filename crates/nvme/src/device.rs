//! [`NvmeDevice`]: the controller core behind a PCIe function (config space, BAR0 registers
//! and doorbells, MSI-X in BAR4) with its own worker thread.
//!
//! # Threads and locks
//! - The caller's thread (a local binding, a lender, a vfio-user server) runs config and BAR
//!   accesses. A doorbell write stores the value in the doorbell page and, only when the
//!   worker sleeps, wakes it with a futex wake on the page's sleep word: no lock, and a
//!   syscall only on the idle-to-busy edge. A front-end that maps the page
//!   ([`PciDevice::bar_memory`]) does the same from its own process.
//! - The worker thread (`nvme-worker`) owns command processing. It polls the doorbells
//!   (the page, or the shadow doorbell buffer) after its last command, yielding between
//!   passes, for a budget learned from its recent idle gaps ([`devlend_sync::SpinBudget`]:
//!   from [`NvmeConfig::poll_spin`] up to [`NvmeConfig::poll_spin_max`], one and a half
//!   times a gap that ended within the maximum, back to the base after an idle period in
//!   which it polled past the base with less than half a CPU: other threads
//!   wanted its CPU), then sets the sleep word to 1, publishes event
//!   indexes, re-checks, and waits on the word while it is 1 (at most
//!   [`NvmeConfig::idle_recheck`]). The sleep-word store and the doorbell store are both
//!   `SeqCst`, so a doorbell written while it goes to sleep is either seen by the re-check or
//!   wakes it: a waker sets the word back to 0 before its futex wake, so a wake that comes
//!   between the re-check and the wait makes the wait return at once (the kernel compares the
//!   word) instead of being lost until `idle_recheck`.
//! - With [`NvmeConfig::io_workers`] above 1, that many pool threads (`nvme-io`) run the NVM
//!   Read and Write commands the worker hands them when DMA is a message (see
//!   [`crate::inflight`]); each takes `core` only to post its completion, signals the vectors
//!   after releasing it, and wakes a sleeping worker when it left something for it (a
//!   coalesced interrupt's deadline, a freed completion slot, a Delete I/O SQ that waited).
//!   A CC write and a function level reset first drain the commands in flight.
//! - Lock order: `core` before `regs`. `config` is never held while taking another lock.
//!   The worker takes only `core`, once per pass, and signals the MSI-X vectors of that pass
//!   after releasing it (an interrupt sink may block or cross the fabric).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use devlend_memory::{BusAddr, MemSpan, SleepWord};
use devlend_pci::config::{sriov, BarRegion, Identity, MsixLayout, PciExpressCap, SriovCap};
use devlend_pci::{
    AccessSize, BarIndex, BarSpec, ConfigEffect, ConfigSpace, ConfigSpaceBuilder, DmaAccess,
    DmaError, DmaPort, DmaSpanResult, IdleWait, InterruptSink, MemoryArea, MsixTable, PciDevice,
};

use crate::cmb::{Cmb, CmbPort, CMB_BAR};
use crate::config::NvmeConfig;
use crate::controller::{AdminQueueRegs, Controller};
use crate::error::NvmeError;
use crate::inflight::{Dispatch, Scratch};
use crate::queues::{DoorbellArray, WAKE_WORD};
use crate::regs::{
    capabilities, ControllerConfig, Doorbell, AQA_WRITABLE, BAR0_SIZE, CAP_CMBS, CC_WRITABLE,
    DOORBELL_BASE, QUEUE_BASE_MASK, REG_ACQ, REG_AQA, REG_ASQ, REG_CAP, REG_CC, REG_CSTS,
    REG_INTMC, REG_INTMS, REG_VS, VERSION_1_4,
};
use crate::virt::{Role, Virtualization};
use devlend_sync::{lock, posted, SpinBudget};

/// This thread's CPU time so far.
fn thread_cpu_time() -> Duration {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(t.tv_sec).unwrap_or(0),
        u32::try_from(t.tv_nsec).unwrap_or(0),
    )
}

/// Whether the worker, polling since `(wall, cpu)`, had less than half a CPU: other threads
/// wanted its CPU (another poller, the thread it waits for), so polling longer does not pay.
/// Short turns of other threads, such as a VMM's loop injecting the interrupt the worker just
/// sent, leave it more than half. A yield to a thread that yields straight back is cheap, so
/// the length of one yield would not show two pollers taking turns; their CPU time does.
fn shared_cpu((wall, cpu): (Instant, Duration)) -> bool {
    let wall = wall.elapsed();
    let cpu = thread_cpu_time().saturating_sub(cpu);
    wall >= Duration::from_micros(10) && cpu * 2 < wall
}

/// PCI Vendor ID this model reports.
pub const PCI_VENDOR_ID: u16 = 0x1dec;
/// PCI Device ID this model reports.
pub const PCI_DEVICE_ID: u16 = 0x0001;
/// Class code: mass storage, non-volatile memory controller, NVM Express.
pub const PCI_CLASS_NVME: u32 = 0x01_08_02;
/// BAR holding the controller registers and doorbells (64-bit, [`BAR0_SIZE`] bytes).
pub const REGISTER_BAR: u8 = 0;
/// BAR holding the MSI-X table (offset 0) and PBA (offset [`MSIX_PBA_OFFSET`]).
pub const MSIX_BAR: u8 = 4;
/// Size of the MSI-X BAR.
pub const MSIX_BAR_SIZE: u64 = 0x2000;
/// Offset of the PBA in the MSI-X BAR (its own page, apart from the table).
pub const MSIX_PBA_OFFSET: u32 = 0x1000;
/// PCI Device ID of this model's virtual functions (the PF's SR-IOV VF Device ID).
pub const PCI_VF_DEVICE_ID: u16 = 0x0002;

/// Registers that are plain storage (CSTS and the doorbells live in atomics).
#[derive(Debug, Default)]
struct Registers {
    cc: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    intms: u32,
}

/// DMA through the parent port, refused while Bus Master Enable is clear.
struct BusMasterGate {
    port: Arc<dyn DmaPort>,
    enabled: AtomicBool,
}

impl DmaPort for BusMasterGate {
    fn dma_read(&self, addr: BusAddr, buf: &mut [u8]) -> Result<(), DmaError> {
        if !self.enabled.load(Ordering::Acquire) {
            return Err(DmaError::BusMasterDisabled);
        }
        self.port.dma_read(addr, buf)
    }

    fn dma_read_many(&self, reads: &mut [(BusAddr, &mut [u8])]) -> Result<(), DmaError> {
        if !self.enabled.load(Ordering::Acquire) {
            return Err(DmaError::BusMasterDisabled);
        }
        self.port.dma_read_many(reads)
    }

    fn dma_write(&self, addr: BusAddr, data: &[u8]) -> Result<(), DmaError> {
        if !self.enabled.load(Ordering::Acquire) {
            return Err(DmaError::BusMasterDisabled);
        }
        self.port.dma_write(addr, data)
    }

    fn dma_span(&self, addr: BusAddr, len: u64, access: DmaAccess) -> DmaSpanResult {
        if !self.enabled.load(Ordering::Acquire) {
            return Err(DmaError::BusMasterDisabled);
        }
        self.port.dma_span(addr, len, access)
    }
}

/// Completion interrupts go through the MSI-X table (enables, masks, pending bits).
struct MsixTrigger(Arc<MsixTable>);

impl InterruptSink for MsixTrigger {
    fn signal(&self, vector: u16) {
        self.0.trigger(vector);
    }
}

/// Counters of the doorbell/wake-up path, for benchmarks and tuning.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NvmeStats {
    /// Doorbell registers written through BAR0.
    pub doorbell_writes: u64,
    /// Doorbell writes that found the worker asleep and woke it (one syscall each).
    pub wakeups: u64,
    /// Times the worker went to sleep.
    pub sleeps: u64,
    /// Worker passes that processed at least one command.
    pub busy_passes: u64,
    /// Passes run by the thread that stored a doorbell while the worker slept
    /// ([`PciDevice::run_nonblocking`]), instead of waking the worker.
    pub inline_passes: u64,
}

#[derive(Default)]
struct Counters {
    doorbell_writes: AtomicU64,
    wakeups: AtomicU64,
    sleeps: AtomicU64,
    busy_passes: AtomicU64,
    inline_passes: AtomicU64,
}

struct Inner {
    counters: Counters,
    config: Mutex<ConfigSpace>,
    irq: Arc<dyn InterruptSink>,
    msix: Arc<MsixTable>,
    gate: Arc<BusMasterGate>,
    memory_enabled: AtomicBool,
    cap: u64,
    regs: Mutex<Registers>,
    csts: Arc<AtomicU32>,
    doorbells: Arc<DoorbellArray>,
    core: Mutex<Controller>,
    stop: AtomicBool,
    worker: OnceLock<Thread>,
    /// The worker's poll budget as it starts (`poll_spin` up to `poll_spin_max`).
    spin: SpinBudget,
    idle_recheck: Duration,
    vectors: u16,
    role: Role,
    /// The Controller Memory Buffer in BAR 2, if configured.
    cmb: Option<Arc<Cmb>>,
    /// The hand-off to the pool threads (`None` with one I/O worker).
    dispatch: Option<Arc<Dispatch>>,
    /// How the worker waits when idle, if not on its sleep word alone
    /// ([`PciDevice::set_idle_wait`]).
    idle_wait: Mutex<Option<Arc<dyn IdleWait>>>,
}

/// An NVMe controller with one namespace backed by a raw image file, as a PCIe function.
pub struct NvmeDevice {
    inner: Arc<Inner>,
    join: Mutex<Option<JoinHandle<()>>>,
    /// The pool threads (see [`crate::inflight`]).
    pool: Mutex<Vec<JoinHandle<()>>>,
    /// What it was built from (a primary builds its secondaries from it).
    cfg: NvmeConfig,
}

impl std::fmt::Debug for NvmeDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeDevice")
            .field("vectors", &self.inner.vectors)
            .finish_non_exhaustive()
    }
}

const IDENTITY: Identity = Identity {
    vendor_id: PCI_VENDOR_ID,
    device_id: PCI_DEVICE_ID,
    class_code: PCI_CLASS_NVME,
    revision_id: 0,
    subsystem_vendor_id: PCI_VENDOR_ID,
    subsystem_id: PCI_DEVICE_ID,
};

fn bar_specs() -> [Option<BarSpec>; 6] {
    let bar = |size| {
        Some(BarSpec {
            size,
            is_64bit: true,
            prefetchable: false,
        })
    };
    let mut bars = [None; 6];
    bars[usize::from(REGISTER_BAR)] = bar(BAR0_SIZE);
    bars[usize::from(MSIX_BAR)] = bar(MSIX_BAR_SIZE);
    bars
}

/// The config space of a physical function (with SR-IOV when `total_vfs` is given) or, for
/// `virtual_function`, of a VF (IDs 0xFFFF, BARs in the PF's capability, no PM).
fn config_space(
    vectors: u16,
    total_vfs: Option<u16>,
    virtual_function: bool,
    cmb_bytes: Option<u64>,
) -> Result<ConfigSpace, NvmeError> {
    let mut b = if virtual_function {
        ConfigSpaceBuilder::new_virtual_function(IDENTITY)
    } else {
        ConfigSpaceBuilder::new(IDENTITY)
    };
    let bar = |i| BarIndex::new(i).ok_or(NvmeError::InvalidConfig("BAR index"));
    b.bar(
        bar(REGISTER_BAR)?,
        BarSpec {
            size: BAR0_SIZE,
            is_64bit: true,
            prefetchable: false,
        },
    )?;
    b.bar(
        bar(MSIX_BAR)?,
        BarSpec {
            size: MSIX_BAR_SIZE,
            is_64bit: true,
            prefetchable: false,
        },
    )?;
    if let Some(size) = cmb_bytes {
        // 64-bit prefetchable, as QEMU's NVMe places its CMB: plain memory, no side effects.
        b.bar(
            bar(CMB_BAR)?,
            BarSpec {
                size,
                is_64bit: true,
                prefetchable: true,
            },
        )?;
    }
    if !virtual_function {
        b.power_management()?;
    }
    b.pci_express(PciExpressCap { flr_capable: true })?;
    b.msix(msix_layout(vectors)?)?;
    if let Some(total_vfs) = total_vfs {
        b.sriov(SriovCap {
            total_vfs,
            initial_vfs: total_vfs,
            vf_device_id: PCI_VF_DEVICE_ID,
            supported_page_sizes: sriov::PAGE_4K,
            vf_bars: bar_specs(),
        })?;
    }
    Ok(b.build()?)
}

fn msix_layout(vectors: u16) -> Result<MsixLayout, NvmeError> {
    let bar = BarIndex::new(MSIX_BAR).ok_or(NvmeError::InvalidConfig("BAR index"))?;
    Ok(MsixLayout {
        vectors,
        table: BarRegion { bar, offset: 0 },
        pba: BarRegion {
            bar,
            offset: MSIX_PBA_OFFSET,
        },
    })
}

impl NvmeDevice {
    /// Builds the controller (opening or creating the image) and starts its worker thread.
    /// DMA goes through `dma`; MSI-X messages, after the function's own table, to `irq`.
    pub fn new(
        cfg: NvmeConfig,
        dma: Arc<dyn DmaPort>,
        irq: Arc<dyn InterruptSink>,
    ) -> Result<Arc<NvmeDevice>, NvmeError> {
        cfg.validate()?;
        let role = match cfg.sriov {
            Some(s) => {
                let per_function = cfg.max_io_queue_pairs + 1;
                Role::Primary(Arc::new(Virtualization::new(s, per_function, per_function)))
            }
            None => Role::Plain,
        };
        Self::build(cfg, role, dma, irq)
    }

    /// The secondary controller of VF `vf` (1 to NumVFs) of this primary, as a PCIe function
    /// of its own: its own config space (a VF's: IDs read 0xFFFF), BARs, MSI-X table, worker
    /// thread and namespace (shared or private, as configured), with DMA through `dma` (its own
    /// IOMMU domain) and MSI-X messages to `irq`. The VF must be enabled (VF Enable set and
    /// `vf <= NumVFs` in the PF's SR-IOV capability). Present it to a driver with
    /// [`devlend_pci::PresentedVf`] ([`PCI_VENDOR_ID`], [`PCI_VF_DEVICE_ID`]).
    pub fn new_virtual_function(
        &self,
        vf: u16,
        dma: Arc<dyn DmaPort>,
        irq: Arc<dyn InterruptSink>,
    ) -> Result<Arc<NvmeDevice>, NvmeError> {
        let Role::Primary(virt) = &self.inner.role else {
            return Err(NvmeError::InvalidConfig(
                "not a physical function with SR-IOV",
            ));
        };
        if !virt.vf_enabled(vf) {
            return Err(NvmeError::VfNotEnabled(vf));
        }
        let mut cfg = self.cfg.clone();
        cfg.create_size = None;
        let role = Role::Secondary {
            virt: virt.clone(),
            vf,
        };
        Self::build(cfg, role, dma, irq)
    }

    /// Whether VF `vf`'s secondary controller is online (false without SR-IOV).
    pub fn secondary_online(&self, vf: u16) -> bool {
        match &self.inner.role {
            Role::Primary(virt) => virt.is_online(vf),
            _ => false,
        }
    }

    fn build(
        cfg: NvmeConfig,
        role: Role,
        dma: Arc<dyn DmaPort>,
        irq: Arc<dyn InterruptSink>,
    ) -> Result<Arc<NvmeDevice>, NvmeError> {
        let vectors = cfg.msix_vectors();
        let (total_vfs, is_vf) = match &role {
            Role::Plain => (None, false),
            Role::Primary(v) => (Some(v.total_vfs()), false),
            Role::Secondary { .. } => (None, true),
        };
        // Only a plain function has a CMB (validate refuses it with SR-IOV).
        let cmb = match (cfg.cmb_bytes, &role) {
            (Some(bytes), Role::Plain) => Some(Arc::new(Cmb::new(bytes)?)),
            _ => None,
        };
        let config = config_space(vectors, total_vfs, is_vf, cmb.as_ref().map(|c| c.len()))?;
        let msix = Arc::new(MsixTable::new(msix_layout(vectors)?, irq));
        let gate = Arc::new(BusMasterGate {
            port: dma,
            enabled: AtomicBool::new(false),
        });
        let doorbells = Arc::new(
            DoorbellArray::new(2 * (usize::from(cfg.max_io_queue_pairs) + 1))
                .map_err(|_| NvmeError::InvalidConfig("cannot allocate the doorbell page"))?,
        );
        let csts = Arc::new(AtomicU32::new(0));
        // The controller's DMA: its own buffer first, then the bus (see crate::cmb).
        let port: Arc<dyn DmaPort> = match &cmb {
            Some(c) => Arc::new(CmbPort {
                cmb: c.clone(),
                port: gate.clone(),
            }),
            None => gate.clone(),
        };
        let mut core = Controller::new(
            &cfg,
            port,
            doorbells.clone(),
            csts.clone(),
            PCI_VENDOR_ID,
            role.clone(),
        )?;
        core.cmb = cmb.clone();
        let dispatch = (cfg.io_workers > 1).then(|| Arc::new(Dispatch::new()));
        core.dispatch = dispatch.clone();
        let cap = capabilities(cfg.max_queue_entries, cfg.ready_timeout_500ms)
            | if cmb.is_some() { CAP_CMBS } else { 0 };
        let inner = Arc::new(Inner {
            counters: Counters::default(),
            config: Mutex::new(config),
            irq: Arc::new(MsixTrigger(msix.clone())),
            msix,
            gate,
            memory_enabled: AtomicBool::new(false),
            cap,
            regs: Mutex::new(Registers::default()),
            csts,
            doorbells,
            core: Mutex::new(core),
            stop: AtomicBool::new(false),
            worker: OnceLock::new(),
            spin: SpinBudget::new(cfg.poll_spin, cfg.poll_spin_max),
            idle_recheck: cfg.idle_recheck,
            vectors,
            role,
            cmb,
            dispatch,
            idle_wait: Mutex::new(None),
        });
        let worker_inner = inner.clone();
        let join = std::thread::Builder::new()
            .name("nvme-worker".into())
            .spawn(move || worker_inner.run())
            .map_err(NvmeError::Thread)?;
        let _ = inner.worker.set(join.thread().clone());
        let io_workers = if inner.dispatch.is_some() {
            cfg.io_workers
        } else {
            0
        };
        let dev = Arc::new(NvmeDevice {
            inner,
            join: Mutex::new(Some(join)),
            pool: Mutex::new(Vec::new()),
            cfg,
        });
        for _ in 0..io_workers {
            let pool_inner = dev.inner.clone();
            match std::thread::Builder::new()
                .name("nvme-io".into())
                .spawn(move || pool_inner.run_io())
            {
                Ok(j) => lock(&dev.pool).push(j),
                Err(e) => {
                    dev.shutdown();
                    return Err(NvmeError::Thread(e));
                }
            }
        }
        Ok(dev)
    }

    /// The doorbell page: BAR0 offsets `0x1000..0x2000` (SQ y tail at `8 * y`, CQ y head at
    /// `8 * y + 4`). A front-end may map it into the driver (a vfio-user sparse mmap area)
    /// so doorbell stores do not trap; the worker then sees them by polling only (see
    /// [`NvmeConfig::idle_recheck`]). Writes through [`PciDevice::bar_write`] land here too.
    pub fn doorbell_page(&self) -> MemSpan {
        self.inner.doorbells.page()
    }

    /// Counters of the doorbell and wake-up path since the device was built.
    pub fn stats(&self) -> NvmeStats {
        let c = &self.inner.counters;
        NvmeStats {
            doorbell_writes: c.doorbell_writes.load(Ordering::Relaxed),
            wakeups: c.wakeups.load(Ordering::Relaxed),
            sleeps: c.sleeps.load(Ordering::Relaxed),
            busy_passes: c.busy_passes.load(Ordering::Relaxed),
            inline_passes: c.inline_passes.load(Ordering::Relaxed),
        }
    }

    /// Stops the worker thread and waits for it. Later doorbells are ignored. Idempotent;
    /// also done on drop.
    pub fn shutdown(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.inner.wake();
        if let Some(j) = lock(&self.join).take() {
            if j.join().is_err() {
                tracing::warn!("nvme: the worker thread panicked");
            }
        }
        // The pool finishes what the worker handed it (posting the completions), then exits.
        if let Some(d) = &self.inner.dispatch {
            d.stop();
        }
        for j in std::mem::take(&mut *lock(&self.pool)) {
            if j.join().is_err() {
                tracing::warn!("nvme: an I/O pool thread panicked");
            }
        }
    }
}

impl Drop for NvmeDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Inner {
    fn run(&self) {
        let mut last_work = Instant::now();
        // How long to poll before sleeping, learned from the idle gaps (`SpinBudget`), and
        // when the current idle period began.
        let mut budget = self.spin;
        let mut idle_from: Option<Instant> = None;
        // Once an idle period's poll goes past the base budget: when, in wall and CPU time.
        let mut probe: Option<(Instant, Duration)> = None;
        // Whether other threads took this one's CPU while it polled in this idle period.
        let mut contended = false;
        let mut vectors = Vec::new();
        while !self.stop.load(Ordering::Acquire) {
            let worked = {
                // One pass is one batch of posted writes (data, completions, then the MSI-X
                // messages announcing them): a fabric with a fixed cost per message sends them
                // together when the pass ends (see `devlend_sync::posted`).
                let _posted = posted::Batch::begin();
                let worked = {
                    let mut core = lock(&self.core);
                    let worked = core.poll();
                    core.take_interrupts(&mut vectors);
                    worked
                };
                for &v in &vectors {
                    self.irq.signal(v);
                }
                worked
            };
            if worked {
                self.counters.busy_passes.fetch_add(1, Ordering::Relaxed);
                last_work = Instant::now();
                if let Some(from) = idle_from.take() {
                    if let Some(p) = probe.take() {
                        contended |= shared_cpu(p);
                    }
                    if std::mem::take(&mut contended) {
                        budget.contended();
                    } else {
                        budget.record(last_work.saturating_duration_since(from));
                    }
                }
                continue;
            }
            if idle_from.is_none() {
                idle_from = Some(last_work);
            }
            // A worker that reads a link while idle goes to it at once: the link's wait polls
            // the socket first, and a doorbell read there reaches this thread directly (if it
            // polled its word here instead, the fabric's reader thread would take the socket
            // meanwhile and the doorbell would come through that thread).
            let reader = lock(&self.idle_wait).clone();
            let idle = last_work.elapsed();
            if reader.is_none() && idle < budget.budget() {
                // Past the base budget, see whether the poll has its CPU to itself.
                if idle >= budget.base() && probe.is_none() {
                    probe = Some((Instant::now(), thread_cpu_time()));
                }
                // Yield rather than spin hard: on an oversubscribed host the thread that will
                // ring the next doorbell may be waiting for this very core.
                std::thread::yield_now();
                continue;
            }
            if let Some(p) = probe.take() {
                contended |= shared_cpu(p);
            }
            let word = self.sleep_word();
            if let Some(w) = word {
                w.announce();
            }
            self.counters.sleeps.fetch_add(1, Ordering::Relaxed);
            let (pending, deadline) = {
                let mut core = lock(&self.core);
                core.prepare_sleep();
                (
                    core.has_work() || core.has_interrupts(),
                    core.interrupt_deadline(),
                )
            };
            if !pending && !self.stop.load(Ordering::SeqCst) {
                // Sleep until woken, or until a coalesced interrupt falls due.
                let timeout = deadline
                    .map_or(self.idle_recheck, |d| {
                        d.saturating_duration_since(Instant::now())
                    })
                    .min(self.idle_recheck);
                if let Some(w) = word {
                    // On a link a thread must read, the worker reads it itself while idle:
                    // the doorbell that ends the wait then wakes no other thread first.
                    let read = reader.is_some_and(|r| {
                        r.idle_wait(
                            Instant::now()
                                .checked_add(timeout)
                                .unwrap_or_else(Instant::now),
                            &mut || !w.is_announced() || self.stop.load(Ordering::Acquire),
                            &mut |d| {
                                w.sleep(Some(d));
                            },
                        )
                    });
                    if !read {
                        w.sleep(Some(timeout));
                    }
                }
            }
            if let Some(w) = word {
                w.end();
            }
            last_work = Instant::now();
        }
    }

    /// A pool thread: runs the commands the worker hands it and posts their completions.
    fn run_io(&self) {
        let Some(dispatch) = &self.dispatch else {
            return;
        };
        let mut scratch = Scratch::default();
        let mut vectors = Vec::new();
        while let Some(job) = dispatch.next() {
            let _posted = posted::Batch::begin();
            let done = job.run(&mut scratch);
            let wake_worker = {
                let mut core = lock(&self.core);
                core.complete_io(done);
                core.take_interrupts(&mut vectors);
                // What only the worker does next: a coalesced interrupt falls due, a
                // completion slot it waited for is free, a Delete I/O SQ may go on.
                core.interrupt_deadline().is_some() || core.has_work()
            };
            for &v in &vectors {
                self.irq.signal(v);
            }
            if wake_worker {
                self.wake();
            }
        }
    }

    /// Locks the core with no command in flight, for a transition that tears the queues
    /// down (CC.EN 1 -> 0, CC.SHN, a function level reset): the worker stops fetching while
    /// this waits for the pool to post what it holds.
    fn quiesced_core(&self) -> std::sync::MutexGuard<'_, Controller> {
        let Some(dispatch) = &self.dispatch else {
            return lock(&self.core);
        };
        dispatch.begin_drain();
        loop {
            dispatch.wait_idle();
            let core = lock(&self.core);
            // Hand-offs happen under the core lock, and the worker makes none while draining.
            if dispatch.in_flight() == 0 {
                dispatch.end_drain();
                return core;
            }
        }
    }

    /// The sleep word lives in the doorbell page so that a front-end that stores doorbells
    /// straight into the page (a lender's NTB window, a vfio-user mapping) can wake the
    /// worker with a futex wake from any process ([`SleepWord`]).
    fn sleep_word(&self) -> Option<SleepWord<'_>> {
        self.doorbells.wake_word().map(SleepWord::new)
    }

    /// After a doorbell store: a futex wake only when the worker sleeps (the common, busy
    /// case costs one atomic load). The word goes back to 0 before the wake, so a worker that
    /// has re-checked but not yet called its futex wait does not sleep (see the module docs).
    /// A worker that reads a link while idle ([`PciDevice::set_idle_wait`]) is told too: it
    /// sees the word only between reads.
    fn wake(&self) {
        if self.sleep_word().is_some_and(|w| w.wake()) {
            self.counters.wakeups.fetch_add(1, Ordering::Relaxed);
            if let Some(r) = lock(&self.idle_wait).as_ref() {
                r.interrupt();
            }
        }
    }

    fn read_reg32(&self, offset: u64) -> u32 {
        if let Some(v) = self.cmb.as_ref().and_then(|c| c.read_reg32(offset)) {
            return v;
        }
        let regs = lock(&self.regs);
        match offset {
            REG_CAP => self.cap as u32,
            o if o == REG_CAP + 4 => (self.cap >> 32) as u32,
            REG_VS => VERSION_1_4,
            REG_INTMS | REG_INTMC => regs.intms,
            REG_CC => regs.cc,
            REG_CSTS => self.csts.load(Ordering::Acquire),
            REG_AQA => regs.aqa,
            REG_ASQ => regs.asq as u32,
            o if o == REG_ASQ + 4 => (regs.asq >> 32) as u32,
            REG_ACQ => regs.acq as u32,
            o if o == REG_ACQ + 4 => (regs.acq >> 32) as u32,
            _ => 0,
        }
    }

    fn write_reg32(&self, offset: u64, v: u32) {
        if offset == REG_CC {
            self.write_cc(v);
            return;
        }
        if self.cmb.as_ref().is_some_and(|c| c.write_reg32(offset, v)) {
            return;
        }
        let mut regs = lock(&self.regs);
        match offset {
            REG_INTMS => regs.intms |= v,
            REG_INTMC => regs.intms &= !v,
            REG_AQA => regs.aqa = v & AQA_WRITABLE,
            REG_ASQ => regs.asq = (regs.asq & !0xffff_ffff) | u64::from(v) & QUEUE_BASE_MASK,
            o if o == REG_ASQ + 4 => regs.asq = (regs.asq & 0xffff_ffff) | (u64::from(v) << 32),
            REG_ACQ => regs.acq = (regs.acq & !0xffff_ffff) | u64::from(v) & QUEUE_BASE_MASK,
            o if o == REG_ACQ + 4 => regs.acq = (regs.acq & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {} // read-only or reserved (CAP, VS, CSTS, NSSR unsupported)
        }
    }

    fn write_cc(&self, v: u32) {
        let mut core = self.quiesced_core();
        let mut regs = lock(&self.regs);
        let old = ControllerConfig { raw: regs.cc };
        let new = ControllerConfig {
            raw: v & CC_WRITABLE,
        };
        regs.cc = new.raw;
        let aq = AdminQueueRegs {
            cc: new,
            aqa: regs.aqa,
            asq: regs.asq,
            acq: regs.acq,
        };
        drop(regs);
        match (old.enabled(), new.enabled()) {
            (false, true) => core.enable(aq),
            (true, false) => core.disable(),
            _ => {}
        }
        if new.shn() != 0 && old.shn() == 0 {
            core.shutdown();
        }
        drop(core);
        self.wake();
    }

    fn doorbell_write(&self, offset: u64, v: u32) {
        let Some(db) = Doorbell::from_offset(offset) else {
            return;
        };
        if let Some(slot) = self.doorbells.get(db.slot()) {
            self.counters
                .doorbell_writes
                .fetch_add(1, Ordering::Relaxed);
            slot.store(v & 0xffff, Ordering::SeqCst);
            self.wake();
        }
    }

    fn bar0_read(&self, offset: u64, data: &mut [u8]) {
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > BAR0_SIZE) {
            data.fill(0xff);
            return;
        }
        let mut cached: Option<(u64, [u8; 4])> = None;
        for (i, byte) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let dword = at & !3;
            let bytes = match cached {
                Some((d, b)) if d == dword => b,
                _ => {
                    let b = if dword >= DOORBELL_BASE {
                        [0; 4]
                    } else {
                        self.read_reg32(dword).to_le_bytes()
                    };
                    cached = Some((dword, b));
                    b
                }
            };
            *byte = bytes.get((at & 3) as usize).copied().unwrap_or(0xff);
        }
    }

    fn bar0_write(&self, offset: u64, data: &[u8]) {
        let len = data.len() as u64;
        if offset.checked_add(len).is_none_or(|end| end > BAR0_SIZE) {
            return;
        }
        if (len == 4 || len == 8) && offset.is_multiple_of(4) {
            for (i, chunk) in data.chunks_exact(4).enumerate() {
                let mut b = [0u8; 4];
                b.copy_from_slice(chunk);
                let v = u32::from_le_bytes(b);
                let at = offset + 4 * i as u64;
                if at >= DOORBELL_BASE {
                    self.doorbell_write(at, v);
                } else {
                    self.write_reg32(at, v);
                }
            }
            return;
        }
        // A narrow register write: read-modify-write of the dword it falls in. Doorbells take
        // only whole-dword writes.
        let dword = offset & !3;
        if dword >= DOORBELL_BASE || (offset & 3) + len > 4 {
            return;
        }
        let mut b = self.read_reg32(dword).to_le_bytes();
        for (i, v) in data.iter().enumerate() {
            if let Some(dst) = b.get_mut((offset & 3) as usize + i) {
                *dst = *v;
            }
        }
        self.write_reg32(dword, u32::from_le_bytes(b));
    }

    fn reset(&self) {
        {
            let mut core = self.quiesced_core();
            core.power_on_reset();
            *lock(&self.regs) = Registers::default();
        }
        lock(&self.config).reset();
        self.msix.reset();
        if let Some(cmb) = &self.cmb {
            cmb.reset();
        }
        self.gate.enabled.store(false, Ordering::Release);
        self.memory_enabled.store(false, Ordering::Release);
        if let Role::Primary(virt) = &self.role {
            // The PF's reset clears VF Enable: its VFs disappear.
            virt.pf_reset();
        }
    }

    /// BAR accesses are decoded: Memory Space Enable, or for a VF the PF's VF MSE with the
    /// VF enabled.
    fn decodes(&self) -> bool {
        match &self.role {
            Role::Secondary { virt, vf } => virt.vf_decodes(*vf),
            _ => self.memory_enabled.load(Ordering::Acquire),
        }
    }
}

impl PciDevice for NvmeDevice {
    fn config_read(&self, offset: u16, size: AccessSize) -> u32 {
        lock(&self.inner.config).read(offset, size)
    }

    fn config_write(&self, offset: u16, size: AccessSize, value: u32) {
        let effects = lock(&self.inner.config).write(offset, size, value);
        for effect in effects {
            match effect {
                ConfigEffect::CommandChanged {
                    memory, bus_master, ..
                } => {
                    self.inner.memory_enabled.store(memory, Ordering::Release);
                    self.inner.gate.enabled.store(bus_master, Ordering::Release);
                    self.inner.wake();
                }
                ConfigEffect::MsixControl {
                    enable,
                    function_mask,
                } => self.inner.msix.set_control(enable, function_mask),
                ConfigEffect::FunctionLevelReset => self.inner.reset(),
                ConfigEffect::VfEnable { enabled, num_vfs } => {
                    if let Role::Primary(virt) = &self.inner.role {
                        virt.set_vf_enable(enabled, num_vfs);
                    }
                }
                ConfigEffect::VfMemorySpace(on) => {
                    if let Role::Primary(virt) = &self.inner.role {
                        virt.set_vf_memory(on);
                    }
                }
                ConfigEffect::BarChanged(_) | ConfigEffect::PowerState(_) => {}
            }
        }
    }

    fn bar_spec(&self, bar: BarIndex) -> Option<BarSpec> {
        lock(&self.inner.config).bar_spec(bar)
    }

    fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]) {
        if !self.inner.decodes() {
            data.fill(0xff);
            return;
        }
        match bar.get() {
            REGISTER_BAR => self.inner.bar0_read(offset, data),
            CMB_BAR if self.inner.cmb.is_some() => {
                if let Some(cmb) = &self.inner.cmb {
                    cmb.bar_read(offset, data);
                }
            }
            _ => {
                if !self.inner.msix.bar_read(bar, offset, data) {
                    data.fill(0xff);
                }
            }
        }
    }

    fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) {
        if !self.inner.decodes() {
            return;
        }
        match bar.get() {
            REGISTER_BAR => self.inner.bar0_write(offset, data),
            CMB_BAR if self.inner.cmb.is_some() => {
                if let Some(cmb) = &self.inner.cmb {
                    cmb.bar_write(offset, data);
                }
            }
            _ => {
                let _ = self.inner.msix.bar_write(bar, offset, data);
            }
        }
    }

    /// A write into the CMB is a store into its memory (no lock); other writes are not.
    fn bar_write_nonblocking(&self, bar: BarIndex, offset: u64, data: &[u8]) -> bool {
        match (&self.inner.cmb, bar.get()) {
            (Some(cmb), CMB_BAR) => {
                if self.inner.decodes() {
                    cmb.bar_write(offset, data);
                }
                true
            }
            _ => false,
        }
    }

    /// One worker pass on the calling thread, while the worker sleeps and only when the pass
    /// waits for nothing (`Controller::pending_is_local`): every waiting command in a queue
    /// whose ring is device memory (a submission queue in the CMB), reading only memory this
    /// process maps; posted writes (data, completions, MSI-X) never wait. Afterwards the
    /// worker is left asleep unless work or a coalesced interrupt remains for it.
    fn run_nonblocking(&self) -> bool {
        let inner = &*self.inner;
        if !inner.sleep_word().is_some_and(|w| w.is_announced()) {
            // Awake: it takes the doorbell itself, and the caller goes on.
            return false;
        }
        let Some(mut core) = devlend_sync::try_lock(&inner.core) else {
            return false;
        };
        if !core.pending_is_local() {
            return false;
        }
        let mut vectors = Vec::new();
        let _posted = posted::Batch::begin();
        core.poll();
        core.take_interrupts(&mut vectors);
        let rest = core.has_work() || core.has_interrupts() || core.interrupt_deadline().is_some();
        drop(core);
        inner.counters.inline_passes.fetch_add(1, Ordering::Relaxed);
        for &v in &vectors {
            inner.irq.signal(v);
        }
        !rest
    }

    /// The worker is woken, so that it waits the new way from now on (it may sleep on its
    /// word, or in the wait taken back, until its next recheck otherwise).
    fn set_idle_wait(&self, wait: Option<Arc<dyn IdleWait>>) {
        let old = std::mem::replace(&mut *lock(&self.inner.idle_wait), wait);
        self.inner.wake();
        if let Some(old) = old {
            // The wake above told the new one only.
            old.interrupt();
        }
    }

    fn reset(&self) {
        self.inner.reset();
    }

    fn bar_memory(&self, bar: BarIndex) -> Vec<MemoryArea> {
        if bar.get() != REGISTER_BAR {
            return Vec::new();
        }
        vec![MemoryArea {
            offset: DOORBELL_BASE,
            mem: self.doorbell_page(),
            wake_word: Some(WAKE_WORD),
        }]
    }

    fn msix_vectors(&self) -> u16 {
        self.inner.vectors
    }

    fn kind(&self) -> &'static str {
        "nvme"
    }

    fn capacity_bytes(&self) -> Option<u64> {
        let core = lock(&self.inner.core);
        1u64.checked_shl(core.ns.block_shift())
            .and_then(|block| core.ns.blocks().checked_mul(block))
    }
}
