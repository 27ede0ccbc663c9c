//! Controller bring-up, the admin queue, I/O queues, the block API and shutdown.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use devlend_pci::config::{bar, cap, command, header, msix, status};
use devlend_pci::msix as table;
use devlend_pci::{AccessSize, BarIndex, DmaBuffer, PciFunction};

use crate::cmb::{self, CmbInfo, CmbSpace};
use crate::cmd::{admin, nvm, Command};
use crate::error::NvmeError;
use crate::identify::{self, ControllerIdentity, NamespaceIdentity, IDENTIFY_BYTES};
use crate::queue::{
    CmbBuf, CmbPools, Completion, CompletionMode, DmaSlice, Hw, QueuePair, SqPlacement,
    CMB_DATA_BYTES,
};
use crate::regs::{self, pci, Capabilities};

/// How to bring the controller up.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// I/O queue pairs to ask for (the controller and the MSI-X vectors may grant fewer).
    pub io_queues: u16,
    /// Entries per I/O queue (capped by CAP.MQES); a queue holds one command fewer.
    pub queue_entries: u32,
    /// Interrupts or polling for completions.
    pub completion: CompletionMode,
    /// Largest transfer per command in bytes; capped by the controller's MDTS.
    pub max_transfer_bytes: u64,
    /// How long an I/O command may take.
    pub io_timeout: Duration,
    /// How long an admin command may take.
    pub admin_timeout: Duration,
    /// How long shutdown processing may take (CSTS.SHST).
    pub shutdown_timeout: Duration,
    /// Place the I/O submission queues in the controller's memory buffer when it offers one
    /// for them (`CAP.CMBS`, `CMBSZ.SQS`); host memory otherwise, and for any queue that does
    /// not fit. [`Controller::cmb_queue_count`] tells how many went there. When the CMB also
    /// takes write data (`CMBSZ.WDS`) and has room, writes of up to 4 KiB on those queues push
    /// their data into it too ([`IoQueue::cmb_writes`]).
    pub cmb_submission_queues: bool,
    /// With [`Self::cmb_submission_queues`], also push PRP lists (`CMBSZ.LISTS`) and the data
    /// of writes of up to [`CMB_BULK_BYTES`] (`CMBSZ.WDS`) into the CMB, as room allows:
    /// [`CMB_BULK_BUFFERS`] bulk write buffers and [`CMB_LIST_PAGES`] list pages per queue.
    /// The device then reads none of a command's descriptors or write data across the link,
    /// which pays where each of its reads of host memory is a round trip (a device borrowed
    /// over `tcp`); where the device reaches host memory directly (`shm`, a local device) it
    /// only adds a copy. Off by default.
    pub cmb_bulk: bool,
    /// Ask the controller to coalesce I/O completion interrupts (Set Features, Interrupt
    /// Coalescing) at initialization; `None` (the default) leaves it off. Change it later with
    /// [`Controller::set_interrupt_coalescing`].
    pub interrupt_coalescing: Option<InterruptCoalescing>,
}

/// Interrupt Coalescing (NVMe Set Features 0x08): an I/O completion queue's interrupt waits
/// until `threshold` completions are pending on its vector or `time_100us` (in 100 µs units)
/// has passed since the first of them. The admin queue is never coalesced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InterruptCoalescing {
    /// Completions per interrupt (1 to 256).
    pub threshold: u16,
    /// The longest an interrupt waits, in 100 µs units (0: no delay).
    pub time_100us: u8,
}

impl InterruptCoalescing {
    /// CDW11 of Set Features: Aggregation Time in bits 15:8, the 0's based Aggregation
    /// Threshold in bits 7:0.
    pub fn cdw11(self) -> u32 {
        let threshold = u32::from(self.threshold.clamp(1, 256) - 1);
        (u32::from(self.time_100us) << 8) | threshold
    }
}

impl Default for DriverConfig {
    fn default() -> Self {
        Self {
            io_queues: 2,
            queue_entries: 256,
            completion: CompletionMode::Interrupt,
            max_transfer_bytes: 1 << 20,
            io_timeout: Duration::from_secs(30),
            admin_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(10),
            cmb_submission_queues: false,
            cmb_bulk: false,
            interrupt_coalescing: None,
        }
    }
}

/// Write data buffers (4 KiB each) per I/O queue in the CMB, when it has room for them.
const CMB_DATA_BUFFERS: usize = 16;
/// Bytes of one bulk write data buffer in the CMB ([`DriverConfig::cmb_bulk`]); capped by the
/// largest transfer.
pub const CMB_BULK_BYTES: u64 = 128 << 10;
/// Bulk write data buffers per I/O queue in the CMB ([`DriverConfig::cmb_bulk`]), as room
/// allows: eight 128 KiB writes in flight per queue.
pub const CMB_BULK_BUFFERS: usize = 8;
/// PRP list pages per I/O queue in the CMB ([`DriverConfig::cmb_bulk`]), as room allows.
pub const CMB_LIST_PAGES: usize = 16;
/// Entries in the admin queues.
const ADMIN_QUEUE_ENTRIES: u32 = 32;
/// Bytes the block API stages per window (several commands of at most MDTS each).
const BLOCK_WINDOW_BYTES: usize = 8 << 20;

/// One I/O request for the queue-depth API.
#[derive(Clone, Debug)]
pub enum IoRequest {
    /// Read `blocks` logical blocks from `lba` into `data` (`blocks * lba_bytes` long).
    Read {
        /// First logical block.
        lba: u64,
        /// Number of blocks (1 to 65536).
        blocks: u32,
        /// Destination.
        data: DmaSlice,
    },
    /// Write `blocks` logical blocks at `lba` from `data`.
    Write {
        /// First logical block.
        lba: u64,
        /// Number of blocks (1 to 65536).
        blocks: u32,
        /// Source.
        data: DmaSlice,
    },
    /// Flush the volatile write cache of the namespace.
    Flush,
}

/// A user-space NVMe driver bound to one controller, written only against [`PciFunction`].
///
/// Methods take `&self` and may be called from several threads: each I/O queue pair is behind
/// its own mutex, and the block API picks a free queue. Lock order: an I/O queue, then the
/// admin queue (only shutdown takes the admin queue while others may hold I/O queues, and it
/// never takes an I/O queue).
pub struct Controller {
    hw: Hw,
    config: DriverConfig,
    admin: Mutex<QueuePair>,
    io: Vec<Mutex<QueuePair>>,
    identity: ControllerIdentity,
    namespace: NamespaceIdentity,
    nsid: u32,
    max_transfer: u64,
    version: u32,
    next_queue: AtomicUsize,
    shut_down: AtomicBool,
    /// The controller memory buffer, when the I/O submission queues may use it.
    cmb: Option<CmbInfo>,
    /// I/O submission queues placed in it.
    cmb_queues: usize,
    /// Of those, queues with write data buffers in it.
    cmb_write_queues: usize,
}

/// Exclusive use of one I/O queue pair for the queue-depth API (submit up to
/// [`IoQueue::capacity`] commands, then reap).
pub struct IoQueue<'a> {
    ctrl: &'a Controller,
    q: MutexGuard<'a, QueuePair>,
}

impl Controller {
    /// Brings the controller up with the default configuration.
    pub fn new(fun: Arc<dyn PciFunction>) -> Result<Self, NvmeError> {
        Self::with_config(fun, DriverConfig::default())
    }

    /// Brings the controller up: enables the function, resets the controller, sets up the admin
    /// queue and MSI-X, identifies controller and namespace, and creates the I/O queues.
    pub fn with_config(fun: Arc<dyn PciFunction>, config: DriverConfig) -> Result<Self, NvmeError> {
        let bar = enable_function(fun.as_ref())?;
        let cap = fun.bar_read_u64(bar, regs::REG_CAP)?;
        if cap == u64::MAX {
            return Err(NvmeError::DeviceRemoved("CAP reads all-ones".into()));
        }
        let caps = Capabilities::decode(cap);
        if !caps.nvm_command_set {
            return Err(NvmeError::Unsupported(
                "CAP.CSS does not offer the NVM command set".into(),
            ));
        }
        if caps.min_page_bytes > regs::HOST_PAGE_BYTES as u64 {
            return Err(NvmeError::Unsupported(format!(
                "CAP.MPSMIN asks for pages of at least {} bytes; the driver uses 4 KiB",
                caps.min_page_bytes
            )));
        }
        let hw = Hw {
            fun,
            bar,
            caps,
            mode: config.completion,
        };
        let version = hw.read32(regs::REG_VS)?;
        disable(&hw)?;
        let cmb = if config.cmb_submission_queues {
            cmb::enable(&hw)?
        } else {
            cmb::disable(&hw)?;
            None
        };

        let vectors = setup_msix(&hw, &config)?;
        let admin_entries = ADMIN_QUEUE_ENTRIES.min(caps.max_queue_entries);
        let admin_vector = (config.completion == CompletionMode::Interrupt).then_some(0);
        let admin = QueuePair::new(&hw, 0, admin_entries, admin_vector)?;
        hw.write32(regs::REG_AQA, regs::aqa(admin_entries, admin_entries))?;
        hw.write64(regs::REG_ASQ, admin.sq_bus_addr())?;
        hw.write64(regs::REG_ACQ, admin.cq_bus_addr())?;
        hw.write32(regs::REG_CC, regs::cc_config())?;
        hw.write32(regs::REG_CC, regs::cc_config() | regs::CC_EN)?;
        wait_csts(&hw, "CSTS.RDY = 1 after enable", caps.ready_timeout, |c| {
            c & regs::CSTS_RDY != 0
        })?;

        let mut ctrl = Self {
            hw,
            config,
            admin: Mutex::new(admin),
            io: Vec::new(),
            identity: ControllerIdentity::parse(&[]),
            namespace: NamespaceIdentity {
                blocks: 0,
                lba_bytes: 512,
                metadata_bytes: 0,
            },
            nsid: 0,
            max_transfer: 0,
            version,
            next_queue: AtomicUsize::new(0),
            shut_down: AtomicBool::new(false),
            cmb,
            cmb_queues: 0,
            cmb_write_queues: 0,
        };
        match ctrl.finish_init(vectors) {
            Ok(()) => Ok(ctrl),
            Err(e) => {
                // Leave the controller disabled; nothing else to undo.
                ctrl.shut_down.store(true, Ordering::Release);
                let _ = ctrl.hw.write32(regs::REG_CC, 0);
                Err(e)
            }
        }
    }

    fn finish_init(&mut self, vectors: u16) -> Result<(), NvmeError> {
        let page = Arc::new(self.hw.fun.dma_alloc(IDENTIFY_BYTES)?);
        let mut bytes = vec![0u8; IDENTIFY_BYTES];

        self.identify(&page, admin::CNS_CONTROLLER, 0, "identify controller")?;
        page.read_at(0, &mut bytes)?;
        self.identity = ControllerIdentity::parse(&bytes);

        page.fill(0)?;
        let nsid = match self.identify(&page, admin::CNS_ACTIVE_NAMESPACES, 0, "identify ns list") {
            Ok(()) => {
                page.read_at(0, &mut bytes)?;
                identify::active_namespaces(&bytes).first().copied()
            }
            // Controllers before NVMe 1.1 lack the list: namespace 1 is the first.
            Err(NvmeError::Command { .. }) => (self.identity.namespace_count >= 1).then_some(1),
            Err(e) => return Err(e),
        };
        let nsid = nsid.ok_or_else(|| NvmeError::InvalidIdentify("no active namespace".into()))?;
        self.nsid = nsid;

        page.fill(0)?;
        self.identify(&page, admin::CNS_NAMESPACE, nsid, "identify namespace")?;
        page.read_at(0, &mut bytes)?;
        let ns = NamespaceIdentity::parse(&bytes).ok_or_else(|| {
            NvmeError::InvalidIdentify(format!("namespace {nsid} has no usable LBA format"))
        })?;
        if ns.metadata_bytes != 0 {
            return Err(NvmeError::Unsupported(format!(
                "namespace {nsid} uses {} metadata bytes per block",
                ns.metadata_bytes
            )));
        }
        if ns.blocks == 0 {
            return Err(NvmeError::InvalidIdentify(format!(
                "namespace {nsid} is empty"
            )));
        }
        self.namespace = ns;

        let lba = u64::from(self.namespace.lba_bytes);
        let mdts = self
            .identity
            .max_transfer_bytes(self.hw.caps.min_page_bytes)
            .unwrap_or(u64::MAX);
        // A command moves at most 65536 blocks (NLB is 16 bits).
        let limit = self.config.max_transfer_bytes.min(mdts).min(lba * 65536);
        self.max_transfer = limit - limit % lba;
        if self.max_transfer == 0 {
            return Err(NvmeError::Unsupported(format!(
                "transfers are limited to {limit} bytes, below one {lba}-byte block"
            )));
        }

        // Number of Queues: 0's based counts in both halves.
        let want = self.config.io_queues.max(1);
        let cdw11 = (u32::from(want - 1) << 16) | u32::from(want - 1);
        let dw0 = self.admin_command(
            "set features (number of queues)",
            Command::new(admin::SET_FEATURES, 0)
                .with_cdw(10, admin::FEATURE_NUMBER_OF_QUEUES)
                .with_cdw(11, cdw11),
            None,
        )?;
        if let Some(c) = self.config.interrupt_coalescing {
            self.set_interrupt_coalescing(Some(c))?;
        }
        let granted_sq = (dw0 & 0xffff) + 1;
        let granted_cq = (dw0 >> 16) + 1;
        let mut count = u32::from(want).min(granted_sq).min(granted_cq);
        if self.config.completion == CompletionMode::Interrupt && vectors > 1 {
            // One vector per I/O completion queue, vector 0 for admin.
            count = count.min(u32::from(vectors) - 1);
        }
        let entries = self
            .config
            .queue_entries
            .clamp(2, 65536)
            .min(self.hw.caps.max_queue_entries);
        let mut space = self.cmb.map(CmbSpace::new);
        // Every submission queue first; then write data buffers for each, as space allows.
        let mut placements: Vec<SqPlacement> = (1..=count)
            .map(|_| {
                let sq_bytes = u64::from(entries) * crate::cmd::SQE_BYTES as u64;
                match space.as_mut().and_then(|s| {
                    let at = s.take(sq_bytes)?;
                    Some((s.info, at))
                }) {
                    Some((info, at)) => SqPlacement::Cmb {
                        bar: info.bar,
                        offset: info.bar_offset + at,
                        bus_addr: info.bus_addr + at,
                        pools: CmbPools::default(),
                    },
                    None => SqPlacement::Host,
                }
            })
            .collect();
        if let Some(s) = space.as_mut() {
            self.place_cmb_buffers(s, &mut placements, entries);
        }
        for (qid, placement) in (1..=count as u16).zip(placements) {
            let q = self.create_io_queue(qid, entries, vectors, placement)?;
            if q.sq_in_cmb() {
                self.cmb_queues += 1;
            }
            self.io.push(Mutex::new(q));
        }
        Ok(())
    }

    /// Gives each submission queue in the CMB its buffers there, as room allows: the small
    /// write data buffers first (every queue), then, with [`DriverConfig::cmb_bulk`], list
    /// pages and bulk buffers, one per queue in turn, so that queues share what is left.
    fn place_cmb_buffers(
        &mut self,
        space: &mut CmbSpace,
        placements: &mut [SqPlacement],
        entries: u32,
    ) {
        let page = CMB_DATA_BYTES;
        let slots = entries.saturating_sub(1) as usize;
        let buf = |space: &CmbSpace, at: u64| CmbBuf {
            bar_offset: space.info.bar_offset + at,
            bus_addr: space.info.bus_addr + at,
        };
        let small = CMB_DATA_BUFFERS.min(slots);
        for p in placements.iter_mut() {
            let SqPlacement::Cmb { pools, .. } = p else {
                continue;
            };
            if !space.info.write_data || small == 0 {
                break;
            }
            if let Some(at) = space.take(small as u64 * page) {
                pools.small = (0..small as u64)
                    .map(|i| buf(space, at + i * page))
                    .collect();
                self.cmb_write_queues += 1;
            }
        }
        if !self.config.cmb_bulk {
            return;
        }
        let bulk_bytes = CMB_BULK_BYTES.min(self.max_transfer).next_multiple_of(page);
        let rounds = CMB_LIST_PAGES.max(CMB_BULK_BUFFERS).min(slots);
        for round in 0..rounds {
            for p in placements.iter_mut() {
                let SqPlacement::Cmb { pools, .. } = p else {
                    continue;
                };
                if space.info.lists && round < CMB_LIST_PAGES {
                    if let Some(at) = space.take(page) {
                        pools.lists.push(buf(space, at));
                    }
                }
                if space.info.write_data && round < CMB_BULK_BUFFERS && bulk_bytes > page {
                    if let Some(at) = space.take(bulk_bytes) {
                        pools.bulk_bytes = bulk_bytes;
                        pools.bulk.push(buf(space, at));
                    }
                }
            }
        }
    }

    fn create_io_queue(
        &self,
        qid: u16,
        entries: u32,
        vectors: u16,
        placement: SqPlacement,
    ) -> Result<QueuePair, NvmeError> {
        let interrupt = self.config.completion == CompletionMode::Interrupt;
        let vector = if vectors > qid { qid } else { 0 };
        let q = QueuePair::placed(
            &self.hw,
            qid,
            entries,
            interrupt.then_some(vector),
            placement,
        )?;
        let cdw10 = ((entries - 1) << 16) | u32::from(qid);
        let mut cq_flags = admin::QUEUE_PHYS_CONTIGUOUS;
        if interrupt {
            cq_flags |= admin::CQ_INTERRUPTS_ENABLED | (u32::from(vector) << 16);
        }
        let mut create_cq = Command::new(admin::CREATE_IO_CQ, 0)
            .with_cdw(10, cdw10)
            .with_cdw(11, cq_flags);
        create_cq.prp1 = q.cq_bus_addr();
        self.admin_command("create I/O completion queue", create_cq, None)?;
        let mut create_sq = Command::new(admin::CREATE_IO_SQ, 0)
            .with_cdw(10, cdw10)
            .with_cdw(11, (u32::from(qid) << 16) | admin::QUEUE_PHYS_CONTIGUOUS);
        create_sq.prp1 = q.sq_bus_addr();
        self.admin_command("create I/O submission queue", create_sq, None)?;
        Ok(q)
    }

    fn identify(
        &self,
        page: &Arc<DmaBuffer>,
        cns: u32,
        nsid: u32,
        what: &'static str,
    ) -> Result<(), NvmeError> {
        let data = DmaSlice::new(page.clone(), 0, IDENTIFY_BYTES)?;
        self.admin_command(
            what,
            Command::new(admin::IDENTIFY, nsid).with_cdw(10, cns),
            Some(&data),
        )
        .map(|_| ())
    }

    /// Runs one admin command and returns its dword 0.
    fn admin_command(
        &self,
        what: &'static str,
        cmd: Command,
        data: Option<&DmaSlice>,
    ) -> Result<u32, NvmeError> {
        let mut q = self
            .admin
            .lock()
            .map_err(|_| NvmeError::QueueBroken { qid: 0 })?;
        q.submit(&self.hw, cmd, data, 0)?;
        let mut out = Vec::with_capacity(1);
        q.reap(&self.hw, &mut out, 1, self.config.admin_timeout)?;
        let c = out.pop().ok_or(NvmeError::Timeout {
            what: "admin completion",
            after: self.config.admin_timeout,
        })?;
        if c.status.is_success() {
            Ok(c.dw0)
        } else {
            Err(NvmeError::Command {
                what,
                status: c.status,
            })
        }
    }

    /// Virtualization Management on a primary controller: `action` (0x1 primary flexible
    /// allocation, 0x7 secondary offline, 0x8 secondary assign, 0x9 secondary online) for
    /// controller `cntlid`, resource type `resource` (0 queues, 1 interrupts), `count`
    /// resources. Returns the resources allocated (completion dword 0).
    pub fn virtualization_management(
        &self,
        action: u8,
        resource: u8,
        cntlid: u16,
        count: u16,
    ) -> Result<u32, NvmeError> {
        let cdw10 =
            u32::from(action & 0xf) | (u32::from(resource & 0x7) << 8) | (u32::from(cntlid) << 16);
        self.admin_command(
            "virtualization management",
            Command::new(admin::VIRTUALIZATION_MANAGEMENT, 0)
                .with_cdw(10, cdw10)
                .with_cdw(11, u32::from(count)),
            None,
        )
    }

    /// The function this driver runs on.
    pub fn function(&self) -> &Arc<dyn PciFunction> {
        &self.hw.fun
    }

    /// Identify Controller data.
    pub fn identity(&self) -> &ControllerIdentity {
        &self.identity
    }

    /// Identify Namespace data of the namespace the block API uses.
    pub fn namespace(&self) -> &NamespaceIdentity {
        &self.namespace
    }

    /// The namespace ID the block API uses.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    /// The controller's VS register (major.minor.tertiary).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Decoded CAP.
    pub fn capabilities(&self) -> Capabilities {
        self.hw.caps
    }

    /// The configuration the controller was brought up with.
    pub fn config(&self) -> &DriverConfig {
        &self.config
    }

    /// Logical block size in bytes.
    pub fn lba_bytes(&self) -> u32 {
        self.namespace.lba_bytes
    }

    /// Namespace size in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.namespace.capacity_bytes()
    }

    /// Sets Interrupt Coalescing (`None`: off, an interrupt per completion pass). Applies to
    /// every I/O completion queue's vector; the controller never coalesces the admin queue.
    pub fn set_interrupt_coalescing(
        &self,
        c: Option<InterruptCoalescing>,
    ) -> Result<(), NvmeError> {
        let cdw11 = c.map_or(0, InterruptCoalescing::cdw11);
        self.admin_command(
            "set features (interrupt coalescing)",
            Command::new(admin::SET_FEATURES, 0)
                .with_cdw(10, admin::FEATURE_INTERRUPT_COALESCING)
                .with_cdw(11, cdw11),
            None,
        )
        .map(|_| ())
    }

    /// Largest transfer of one command (MDTS and the configured limit).
    pub fn max_transfer_bytes(&self) -> u64 {
        self.max_transfer
    }

    /// I/O queue pairs created.
    pub fn io_queue_count(&self) -> usize {
        self.io.len()
    }

    /// The controller memory buffer the driver enabled for its submission queues (with
    /// [`DriverConfig::cmb_submission_queues`] on a controller that offers one).
    pub fn cmb(&self) -> Option<CmbInfo> {
        self.cmb
    }

    /// I/O submission queues in the controller memory buffer.
    pub fn cmb_queue_count(&self) -> usize {
        self.cmb_queues
    }

    /// I/O queues whose writes of up to 4 KiB push their data into the controller memory
    /// buffer ([`IoQueue::cmb_writes`]).
    pub fn cmb_write_queue_count(&self) -> usize {
        self.cmb_write_queues
    }

    /// Over every I/O queue: writes whose data, and commands whose PRP list, were pushed into
    /// the controller memory buffer ([`IoQueue::cmb_writes`], [`IoQueue::cmb_lists`]).
    pub fn cmb_pushed(&self) -> (u64, u64) {
        self.io.iter().fold((0, 0), |(w, l), m| {
            let q = devlend_sync::lock(m);
            (
                w.saturating_add(q.cmb_writes()),
                l.saturating_add(q.cmb_lists()),
            )
        })
    }

    /// Allocates DMA memory for the queue-depth API.
    pub fn alloc_dma(&self, len: usize) -> Result<Arc<DmaBuffer>, NvmeError> {
        Ok(Arc::new(self.hw.fun.dma_alloc(len)?))
    }

    fn check_live(&self) -> Result<(), NvmeError> {
        if self.shut_down.load(Ordering::Acquire) {
            Err(NvmeError::ShutDown)
        } else {
            Ok(())
        }
    }

    /// Exclusive use of I/O queue `index` (0-based; queue id `index + 1`), waiting for another
    /// thread to release it.
    pub fn io_queue(&self, index: usize) -> Result<IoQueue<'_>, NvmeError> {
        self.check_live()?;
        let m = self.io.get(index).ok_or(NvmeError::NoSuchQueue {
            index,
            count: self.io.len(),
        })?;
        let q = m.lock().map_err(|_| NvmeError::QueueBroken {
            qid: index as u16 + 1,
        })?;
        Ok(IoQueue { ctrl: self, q })
    }

    /// Some I/O queue: a free one when there is one, else the next in turn.
    fn any_io_queue(&self) -> Result<IoQueue<'_>, NvmeError> {
        self.check_live()?;
        let n = self.io.len();
        if n == 0 {
            return Err(NvmeError::NoSuchQueue { index: 0, count: 0 });
        }
        let start = self.next_queue.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            let index = (start + i) % n;
            if let Some(m) = self.io.get(index) {
                match m.try_lock() {
                    Ok(q) => return Ok(IoQueue { ctrl: self, q }),
                    Err(TryLockError::WouldBlock) => {}
                    Err(TryLockError::Poisoned(_)) => {
                        return Err(NvmeError::QueueBroken {
                            qid: index as u16 + 1,
                        })
                    }
                }
            }
        }
        self.io_queue(start)
    }

    /// Reads `buf.len()` bytes at byte `offset` of the namespace. Any offset and length inside
    /// the namespace work; whole blocks are transferred and the requested bytes copied out.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), NvmeError> {
        self.block_io(offset, buf.len(), BlockBuf::Read(buf))
    }

    /// Writes `data` at byte `offset` of the namespace. Partial blocks at either end are
    /// read, merged and written back (not atomic against a concurrent writer of those blocks).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), NvmeError> {
        self.block_io(offset, data.len(), BlockBuf::Write(data))
    }

    /// Flushes the namespace's volatile write cache to non-volatile media.
    pub fn flush(&self) -> Result<(), NvmeError> {
        let mut q = self.any_io_queue()?;
        q.run_batch(vec![IoRequest::Flush])
    }

    fn block_io(&self, offset: u64, len: usize, mut user: BlockBuf<'_>) -> Result<(), NvmeError> {
        let capacity = self.capacity_bytes();
        let len64 = len as u64;
        if offset.checked_add(len64).is_none_or(|end| end > capacity) {
            return Err(NvmeError::OutOfRange {
                offset,
                len: len64,
                capacity,
            });
        }
        if len == 0 {
            return Ok(());
        }
        let lba = u64::from(self.namespace.lba_bytes);
        let first_block = offset / lba;
        let end_block = (offset + len64).div_ceil(lba);
        // Windows of whole commands of at most max_transfer each.
        let per_cmd_blocks = self.max_transfer / lba;
        let window_cmds = (BLOCK_WINDOW_BYTES as u64 / self.max_transfer).max(1);
        let window_blocks = per_cmd_blocks * window_cmds;
        let mut q = self.any_io_queue()?;
        let staging_len = (window_blocks.min(end_block - first_block) * lba) as usize;
        let staging = self.alloc_dma(staging_len)?;
        let mut block = first_block;
        while block < end_block {
            let blocks = window_blocks.min(end_block - block);
            let win_start = block * lba;
            let win_len = (blocks * lba) as usize;
            // The part of the user's buffer inside this window.
            let copy_start = offset.max(win_start);
            let copy_end = (offset + len64).min(win_start + win_len as u64);
            let in_window = (copy_start - win_start) as usize;
            let in_user = (copy_start - offset) as usize;
            let copy_len = (copy_end - copy_start) as usize;
            match &mut user {
                BlockBuf::Read(buf) => {
                    q.transfer(&staging, block, blocks, per_cmd_blocks, false)?;
                    let dst = buf
                        .get_mut(in_user..in_user + copy_len)
                        .ok_or_else(|| internal("read window outside the caller's buffer"))?;
                    staging.read_at(in_window, dst)?;
                }
                BlockBuf::Write(data) => {
                    // A window whose first or last block is partly written: read those first.
                    if !in_window.is_multiple_of(lba as usize) {
                        q.transfer(&staging, block, 1, per_cmd_blocks, false)?;
                    }
                    let tail = in_window + copy_len;
                    if !tail.is_multiple_of(lba as usize) {
                        let last = blocks - 1;
                        let at = (last * lba) as usize;
                        let slice = DmaSlice::new(staging.clone(), at, lba as usize)?;
                        q.run_batch(vec![IoRequest::Read {
                            lba: block + last,
                            blocks: 1,
                            data: slice,
                        }])?;
                    }
                    let src = data
                        .get(in_user..in_user + copy_len)
                        .ok_or_else(|| internal("write window outside the caller's buffer"))?;
                    staging.write_at(in_window, src)?;
                    q.transfer(&staging, block, blocks, per_cmd_blocks, true)?;
                }
            }
            block += blocks;
        }
        Ok(())
    }

    /// Normal shutdown: deletes the I/O queues, sets CC.SHN and waits for CSTS.SHST complete.
    /// Later I/O fails with [`NvmeError::ShutDown`]. Dropping the controller does this too.
    pub fn shutdown(&self) -> Result<(), NvmeError> {
        if self.shut_down.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let csts = self.hw.check_status();
        if let Err(NvmeError::DeviceRemoved(why)) = csts {
            return Err(NvmeError::DeviceRemoved(why));
        }
        if csts.is_ok() {
            for qid in (1..=self.io.len() as u16).rev() {
                let del = |op, what| {
                    self.admin_command(what, Command::new(op, 0).with_cdw(10, u32::from(qid)), None)
                };
                if let Err(e) = del(admin::DELETE_IO_SQ, "delete I/O submission queue")
                    .and_then(|_| del(admin::DELETE_IO_CQ, "delete I/O completion queue"))
                {
                    tracing::warn!(qid, error = %e, "deleting an I/O queue at shutdown failed");
                    break;
                }
            }
        }
        let cc = self.hw.read32(regs::REG_CC)?;
        self.hw.write32(
            regs::REG_CC,
            (cc & !regs::CC_SHN_MASK) | regs::CC_SHN_NORMAL,
        )?;
        wait_csts_raw(
            &self.hw,
            "CSTS.SHST = shutdown complete",
            self.config.shutdown_timeout,
            |c| c & regs::CSTS_SHST_MASK == regs::CSTS_SHST_COMPLETE,
        )
    }

    /// Resets the controller and brings it up again with the same configuration: outstanding
    /// commands are abandoned (the controller stops before their memory is released).
    pub fn reset(&mut self) -> Result<(), NvmeError> {
        // The old state must not shut the new controller down when it is dropped.
        self.shut_down.store(true, Ordering::Release);
        let fresh = Controller::with_config(self.hw.fun.clone(), self.config.clone())?;
        *self = fresh;
        Ok(())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "NVMe shutdown failed");
        }
    }
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("function", &self.hw.fun.describe())
            .field("model", &self.identity.model)
            .field("nsid", &self.nsid)
            .field("lba_bytes", &self.namespace.lba_bytes)
            .field("blocks", &self.namespace.blocks)
            .field("io_queues", &self.io.len())
            .finish()
    }
}

enum BlockBuf<'a> {
    Read(&'a mut [u8]),
    Write(&'a [u8]),
}

fn internal(what: &str) -> NvmeError {
    NvmeError::InvalidRequest(format!("internal: {what}"))
}

impl IoQueue<'_> {
    /// Queue identifier.
    pub fn qid(&self) -> u16 {
        self.q.qid()
    }

    /// Commands that may be outstanding at once.
    pub fn capacity(&self) -> usize {
        self.q.capacity()
    }

    /// Commands outstanding now.
    pub fn in_flight(&self) -> usize {
        self.q.in_flight()
    }

    /// Writes on this queue whose data were pushed into the controller memory buffer (at most
    /// 4 KiB each with [`DriverConfig::cmb_submission_queues`] when the CMB has room, and up
    /// to [`CMB_BULK_BYTES`] with [`DriverConfig::cmb_bulk`]).
    pub fn cmb_writes(&self) -> u64 {
        self.q.cmb_writes()
    }

    /// Commands on this queue whose PRP list was pushed into the controller memory buffer
    /// ([`DriverConfig::cmb_bulk`]).
    pub fn cmb_lists(&self) -> u64 {
        self.q.cmb_lists()
    }

    /// Bytes of one of this queue's bulk write data buffers in the controller memory buffer
    /// ([`DriverConfig::cmb_bulk`]); 0 when it has none.
    pub fn cmb_bulk_bytes(&self) -> u64 {
        self.q.cmb_bulk_bytes()
    }

    /// Whether this queue has PRP list pages in the controller memory buffer
    /// ([`DriverConfig::cmb_bulk`]).
    pub fn cmb_has_lists(&self) -> bool {
        self.q.cmb_has_lists()
    }

    /// Whether an earlier failure left the queue unusable (reset the controller).
    pub fn is_broken(&self) -> bool {
        self.q.is_broken()
    }

    /// Submits one request; its completion carries `tag`. The LBA range is not checked here
    /// (the controller answers out-of-range requests with a status).
    pub fn submit(&mut self, req: IoRequest, tag: u64) -> Result<(), NvmeError> {
        self.submit_with(req, tag, true)
    }

    /// Queues `req` like [`Self::submit`] without ringing the submission queue's doorbell:
    /// [`Self::ring`] (or the next [`Self::reap`], which rings first) hands over every request
    /// queued since with one doorbell write, and the device fetches them together. Over a
    /// fabric that is one posted write and one fetch for the batch instead of one per request.
    pub fn submit_deferred(&mut self, req: IoRequest, tag: u64) -> Result<(), NvmeError> {
        self.submit_with(req, tag, false)
    }

    /// Rings the submission queue's doorbell for the requests queued with
    /// [`Self::submit_deferred`] (nothing when there are none).
    pub fn ring(&mut self) -> Result<(), NvmeError> {
        self.q.ring(&self.ctrl.hw)
    }

    fn submit_with(&mut self, req: IoRequest, tag: u64, ring: bool) -> Result<(), NvmeError> {
        self.ctrl.check_live()?;
        let ctrl = self.ctrl;
        let lba_bytes = u64::from(ctrl.namespace.lba_bytes);
        let (opcode, lba, blocks, data) = match &req {
            IoRequest::Read { lba, blocks, data } => (nvm::READ, *lba, *blocks, Some(data)),
            IoRequest::Write { lba, blocks, data } => (nvm::WRITE, *lba, *blocks, Some(data)),
            IoRequest::Flush => (nvm::FLUSH, 0, 0, None),
        };
        let mut cmd = Command::new(opcode, ctrl.nsid);
        if let Some(data) = data {
            if !(1..=65536).contains(&blocks) {
                return Err(NvmeError::InvalidRequest(format!(
                    "{blocks} blocks in one command (1 to 65536)"
                )));
            }
            let bytes = u64::from(blocks) * lba_bytes;
            if data.len() as u64 != bytes {
                return Err(NvmeError::InvalidRequest(format!(
                    "{blocks} blocks of {lba_bytes} bytes need {bytes} bytes of data, not {}",
                    data.len()
                )));
            }
            if bytes > ctrl.max_transfer {
                return Err(NvmeError::InvalidRequest(format!(
                    "{bytes} bytes exceed the largest transfer of {} bytes (MDTS)",
                    ctrl.max_transfer
                )));
            }
            cmd = cmd
                .with_cdw(10, lba as u32)
                .with_cdw(11, (lba >> 32) as u32)
                .with_cdw(12, blocks - 1);
        }
        if ring {
            self.q.submit(&ctrl.hw, cmd, data, tag)
        } else {
            self.q.submit_deferred(&ctrl.hw, cmd, data, tag)
        }
    }

    /// Collects completions into `out` until at least `min` arrived (or none is outstanding),
    /// waiting at most `timeout`; returns how many were added. Statuses are in each
    /// [`Completion`]; a timeout or a dead controller is an error.
    pub fn reap(
        &mut self,
        out: &mut Vec<Completion>,
        min: usize,
        timeout: Duration,
    ) -> Result<usize, NvmeError> {
        self.q.reap(&self.ctrl.hw, out, min, timeout)
    }

    /// Runs `reqs` with as many outstanding as the queue holds; the first failed status is
    /// returned after all have completed.
    pub fn run_batch(&mut self, reqs: Vec<IoRequest>) -> Result<(), NvmeError> {
        let timeout = self.ctrl.config.io_timeout;
        let total = reqs.len();
        let mut pending = reqs.into_iter();
        let mut done = Vec::new();
        let mut completed = 0usize;
        let mut failure = None;
        let mut submitted = 0usize;
        while completed < total {
            // The requests that fit go with one doorbell write (one message on a fabric).
            while submitted < total && self.in_flight() < self.capacity() {
                let Some(req) = pending.next() else { break };
                self.submit_deferred(req, submitted as u64)?;
                submitted += 1;
            }
            self.ring()?;
            done.clear();
            completed += self.reap(&mut done, 1, timeout)?;
            for c in &done {
                if !c.status.is_success() && failure.is_none() {
                    failure = Some(NvmeError::Command {
                        what: opcode_name(c.opcode),
                        status: c.status,
                    });
                }
            }
            if done.is_empty() && self.in_flight() == 0 && submitted >= total {
                break;
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// Moves `blocks` blocks from `lba` between the device and the start of `staging`, in
    /// commands of at most `per_cmd` blocks.
    fn transfer(
        &mut self,
        staging: &Arc<DmaBuffer>,
        lba: u64,
        blocks: u64,
        per_cmd: u64,
        write: bool,
    ) -> Result<(), NvmeError> {
        let lba_bytes = u64::from(self.ctrl.namespace.lba_bytes);
        let mut reqs = Vec::new();
        let mut done = 0u64;
        while done < blocks {
            let n = per_cmd.min(blocks - done);
            let data = DmaSlice::new(
                staging.clone(),
                (done * lba_bytes) as usize,
                (n * lba_bytes) as usize,
            )?;
            let (lba, blocks) = (lba + done, n as u32);
            reqs.push(if write {
                IoRequest::Write { lba, blocks, data }
            } else {
                IoRequest::Read { lba, blocks, data }
            });
            done += n;
        }
        self.run_batch(reqs)
    }
}

/// A name for an I/O opcode, for errors.
fn opcode_name(opcode: u8) -> &'static str {
    match opcode {
        nvm::READ => "read",
        nvm::WRITE => "write",
        nvm::FLUSH => "flush",
        _ => "I/O command",
    }
}

/// Enables memory space and bus mastering, checks the class code and BAR0, and returns BAR0.
fn enable_function(fun: &dyn PciFunction) -> Result<BarIndex, NvmeError> {
    let class_rev = fun.config_read(header::REVISION_ID, AccessSize::Dword)?;
    if class_rev == u32::MAX {
        return Err(NvmeError::DeviceRemoved(
            "config space reads all-ones".into(),
        ));
    }
    let class = class_rev >> 8;
    if class != pci::CLASS_NVME {
        return Err(NvmeError::NotNvme { class });
    }
    let bar0 = fun.config_read(header::BAR0, AccessSize::Dword)?;
    if bar0 & bar::IO != 0 {
        return Err(NvmeError::Bar0NotMemory { raw: bar0 });
    }
    let old = fun.config_read(header::COMMAND, AccessSize::Word)? as u16;
    let enabled = old | command::MEMORY_SPACE | command::BUS_MASTER | command::INTX_DISABLE;
    fun.config_write(header::COMMAND, AccessSize::Word, u32::from(enabled))?;
    BarIndex::new(0).ok_or_else(|| internal("BAR index 0"))
}

/// Clears CC.EN and waits for CSTS.RDY = 0 (CAP.TO).
fn disable(hw: &Hw) -> Result<(), NvmeError> {
    let cc = hw.read32(regs::REG_CC)?;
    if cc == u32::MAX {
        return Err(NvmeError::DeviceRemoved("CC reads all-ones".into()));
    }
    hw.write32(regs::REG_CC, cc & !(regs::CC_EN | regs::CC_SHN_MASK))?;
    wait_csts_raw(
        hw,
        "CSTS.RDY = 0 after disable",
        hw.caps.ready_timeout,
        |c| c & regs::CSTS_RDY == 0,
    )
}

/// Waits until `done(CSTS)`, failing on a fatal controller, removal or `timeout`.
fn wait_csts(
    hw: &Hw,
    what: &'static str,
    timeout: Duration,
    done: impl Fn(u32) -> bool,
) -> Result<(), NvmeError> {
    wait_until(hw, what, timeout, |hw| Ok(done(hw.check_status()?)))
}

/// Like [`wait_csts`] but tolerates CSTS.CFS (a disable or shutdown clears or outlives it).
fn wait_csts_raw(
    hw: &Hw,
    what: &'static str,
    timeout: Duration,
    done: impl Fn(u32) -> bool,
) -> Result<(), NvmeError> {
    wait_until(hw, what, timeout, |hw| {
        let csts = hw.read32(regs::REG_CSTS)?;
        if csts == u32::MAX {
            return Err(NvmeError::DeviceRemoved("CSTS reads all-ones".into()));
        }
        Ok(done(csts))
    })
}

fn wait_until(
    hw: &Hw,
    what: &'static str,
    timeout: Duration,
    mut probe: impl FnMut(&Hw) -> Result<bool, NvmeError>,
) -> Result<(), NvmeError> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_micros(10);
    loop {
        if probe(hw)? {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(NvmeError::Timeout {
                what,
                after: timeout,
            });
        }
        // Register polling during bring-up: back off to 1 ms between reads.
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(1));
    }
}

/// Finds MSI-X, programs and unmasks the vectors the driver will use, and enables it.
/// Returns the number of vectors in use.
fn setup_msix(hw: &Hw, config: &DriverConfig) -> Result<u16, NvmeError> {
    let fun = hw.fun.as_ref();
    let cap = find_capability(fun, cap::ID_MSIX)?.ok_or(NvmeError::NoMsix)?;
    let control = fun.config_read(cap + msix::CONTROL, AccessSize::Word)? as u16;
    let table_size = (control & msix::CONTROL_TABLE_SIZE) + 1;
    let table = fun.config_read(cap + msix::TABLE, AccessSize::Dword)?;
    let bir = BarIndex::new((table & msix::BIR_MASK) as u8).ok_or(NvmeError::NoMsix)?;
    let table_offset = u64::from(table & !msix::BIR_MASK);
    let available = table_size.min(fun.interrupt_vectors()).max(1);
    let wanted = match config.completion {
        CompletionMode::Interrupt => config.io_queues.saturating_add(1),
        CompletionMode::Polling => 1,
    };
    let used = wanted.min(available);
    // Enable with the function masked while the entries are programmed.
    let masked =
        (control | msix::CONTROL_ENABLE | msix::CONTROL_FUNCTION_MASK) & !msix::CONTROL_TABLE_SIZE;
    fun.config_write(cap + msix::CONTROL, AccessSize::Word, u32::from(masked))?;
    for v in 0..table_size {
        let entry = table_offset + u64::from(v) * table::ENTRY_LEN;
        if v < used {
            let addr = pci::MSIX_MESSAGE_ADDRESS;
            fun.bar_write_u32(bir, entry + table::ENTRY_ADDR_LO, addr as u32)?;
            fun.bar_write_u32(bir, entry + table::ENTRY_ADDR_HI, (addr >> 32) as u32)?;
            fun.bar_write_u32(bir, entry + table::ENTRY_DATA, u32::from(v))?;
            fun.bar_write_u32(bir, entry + table::ENTRY_VECTOR_CONTROL, 0)?;
        } else {
            fun.bar_write_u32(
                bir,
                entry + table::ENTRY_VECTOR_CONTROL,
                table::VECTOR_CONTROL_MASK,
            )?;
        }
    }
    fun.config_write(
        cap + msix::CONTROL,
        AccessSize::Word,
        u32::from(masked & !msix::CONTROL_FUNCTION_MASK),
    )?;
    Ok(used)
}

/// Walks the capability list from 0x34 for capability `id`; a malformed list ends the walk.
fn find_capability(fun: &dyn PciFunction, id: u8) -> Result<Option<u16>, NvmeError> {
    let sts = fun.config_read(header::STATUS, AccessSize::Word)? as u16;
    if sts & status::CAPABILITIES_LIST == 0 {
        return Ok(None);
    }
    let first = (fun.config_read(header::CAPABILITIES_POINTER, AccessSize::Byte)? as u16) & 0xfc;
    // One word read per capability: its ID and Next pointer.
    let visit = |at: u16| -> Result<cap::Step, NvmeError> {
        let id_next = fun.config_read(at, AccessSize::Word)?;
        Ok(cap::step(id_next as u8, || (id_next >> 8) as u8, id))
    };
    // A list that loops is treated as one without MSI-X.
    Ok(match cap::find(first, visit)? {
        cap::Search::Found(at) => Some(at),
        cap::Search::Absent | cap::Search::Looping => None,
    })
}
