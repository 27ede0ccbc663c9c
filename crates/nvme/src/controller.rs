//! The controller core: state, the enable / disable / shutdown transitions, command fetch and
//! completion posting. Admin commands are in [`crate::admin`], NVM commands in [`crate::io`],
//! doorbells (MMIO and shadow) in [`crate::doorbells`], interrupts and asynchronous events in
//! [`crate::interrupts`].
//!
//! The core is plain data behind one mutex ([`crate::device`] owns it): the worker thread
//! holds the lock while it processes a batch of commands, the register path holds it to apply
//! a CC transition. Doorbell values live outside the lock in atomics, so a doorbell write never
//! waits for a batch.

use std::collections::VecDeque;
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use devlend_memory::{BusAddr, MemSpan};
use devlend_pci::{DmaAccess, DmaPort};

use crate::command::{admin_opcode, Command, Completion, NvmOp};
use crate::config::NvmeConfig;
use crate::identify::{ControllerInfo, NamespaceInfo};
use crate::inflight::{Dispatch, IoDone, IoJob};
use crate::io::{IoCounters, Namespace};
use crate::queues::{wrap, CompletionQueue, DoorbellArray, Fetched, SubmissionQueue};
use crate::readahead::{self, ReadAhead};
use crate::regs::{
    ControllerConfig, AQA_ACQS_SHIFT, AQA_ASQS_MASK, CC_CSS_NVM, CQE_BYTES, CSTS_CFS, CSTS_RDY,
    CSTS_SHST_COMPLETE, CSTS_SHST_MASK, MPSMAX, MPSMIN, SQE_BYTES,
};
use crate::status::Status;
use crate::transfer::Transfer;
use crate::virt::{Role, VfNamespaces};

/// Commands taken from one submission queue before moving to the next (round robin).
const SQ_BURST: u32 = 32;
/// When completions are messages (the completion queue has no direct mapping, as over
/// `tcp`), a burst ends once its Reads have written this much data to host memory: the pass
/// then ends, and the completions so far and their MSI-X message leave with the data instead
/// of waiting for the rest of the burst (a device posts each completion as its command is
/// done). The entries already fetched stay with the queue for the next pass. This limit holds
/// for a submission queue in device memory (the CMB), whose entries cost nothing to fetch.
const PASS_PUSH_MAPPED: u64 = 64 << 10;
/// [`PASS_PUSH_MAPPED`] for a submission queue whose entries are fetched by messages: every
/// burst costs a fetch round trip, so a burst of 4 KiB reads runs whole (32 of them, 128 KiB;
/// cut at 64 KiB, twice as many fetches measured 15-21% fewer QD32 reads over tcp) and larger
/// reads still end the pass early.
const PASS_PUSH_FETCHED: u64 = SQ_BURST as u64 * 4096;

/// Whether entries `(index of the first, how many)` include entry `index`.
fn holds((first, count): (u32, u32), index: u32) -> bool {
    index >= first && index - first < count
}

/// Error log entries kept.
pub(crate) const ERROR_LOG_ENTRIES: usize = crate::identify::ELPE as usize + 1;

/// Asynchronous event types (completion dword 0 bits 2:0).
pub(crate) mod event {
    /// Error status.
    pub const TYPE_ERROR: u32 = 0;
    /// SMART / Health status.
    pub const TYPE_SMART: u32 = 1;
    /// Error: write to an invalid doorbell register.
    pub const INFO_INVALID_DOORBELL_REGISTER: u32 = 0x00;
    /// Error: invalid doorbell write value.
    pub const INFO_INVALID_DOORBELL_VALUE: u32 = 0x01;
    /// Log page of error events.
    pub const LOG_ERROR: u32 = 0x01;
}

/// Fixed limits from the configuration.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// I/O queue pairs.
    pub max_io_queues: u16,
    /// Entries per queue (1-based).
    pub max_queue_entries: u32,
    /// Largest data transfer in bytes.
    pub max_transfer: u64,
    /// MSI-X vectors.
    pub vectors: u16,
}

/// Feature values (reset to defaults on every controller reset).
#[derive(Clone, Debug)]
pub(crate) struct Features {
    /// Arbitration (FID 0x01).
    pub arbitration: u32,
    /// Power Management (FID 0x02).
    pub power_management: u32,
    /// Temperature thresholds of the composite sensor: over, under (Kelvin).
    pub temperature_over: u16,
    /// Under temperature threshold.
    pub temperature_under: u16,
    /// Error Recovery (FID 0x05).
    pub error_recovery: u32,
    /// Volatile Write Cache enable (FID 0x06).
    pub write_cache: bool,
    /// Interrupt Coalescing (FID 0x08).
    pub interrupt_coalescing: u32,
    /// Coalescing Disable per vector (FID 0x09).
    pub vector_coalescing_disabled: Vec<bool>,
    /// Write Atomicity Normal (FID 0x0a).
    pub write_atomicity: u32,
    /// Asynchronous Event Configuration (FID 0x0b).
    pub async_event_config: u32,
}

impl Features {
    pub(crate) fn defaults(vectors: u16) -> Features {
        Features {
            arbitration: 0,
            power_management: 0,
            temperature_over: crate::identify::WCTEMP_KELVIN,
            temperature_under: 0,
            error_recovery: 0,
            write_cache: true,
            interrupt_coalescing: 0,
            vector_coalescing_disabled: vec![false; usize::from(vectors)],
            write_atomicity: 0,
            async_event_config: 0,
        }
    }
}

/// The shadow doorbell and event index pages of Doorbell Buffer Config.
#[derive(Debug)]
pub(crate) struct DoorbellBuffer {
    /// Shadow doorbell page.
    pub shadow: u64,
    /// Event index page.
    pub event_index: u64,
    /// Direct mapping of the shadow page.
    pub shadow_span: Option<MemSpan>,
    /// Direct mapping of the event index page.
    pub event_span: Option<MemSpan>,
}

/// The error information log.
#[derive(Debug, Default)]
pub(crate) struct ErrorLog {
    /// Errors ever recorded.
    pub count: u64,
    /// Newest first, at most [`ERROR_LOG_ENTRIES`].
    pub entries: VecDeque<[u8; 64]>,
}

impl ErrorLog {
    fn record(&mut self, sqid: u16, cid: u16, status: Status, nsid: u32) {
        self.count += 1;
        let mut e = [0u8; 64];
        e[0..8].copy_from_slice(&self.count.to_le_bytes());
        e[8..10].copy_from_slice(&sqid.to_le_bytes());
        e[10..12].copy_from_slice(&cid.to_le_bytes());
        e[12..14].copy_from_slice(&(status.raw() << 1).to_le_bytes());
        e[14..16].copy_from_slice(&0xffffu16.to_le_bytes());
        e[24..28].copy_from_slice(&nsid.to_le_bytes());
        self.entries.push_front(e);
        self.entries.truncate(ERROR_LOG_ENTRIES);
    }
}

/// Where a queue was placed relative to the CMB ([`Controller::queue_placement`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum QueuePlacement {
    /// Wholly in host memory, or a submission queue wholly in the CMB.
    Ok,
    /// A completion queue touching the CMB (`CMBSZ.CQS` is clear).
    CompletionInCmb,
    /// Partly in the CMB and partly outside it.
    Straddles,
}

/// What the register path hands the core when CC.EN goes to 1.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdminQueueRegs {
    /// CC.
    pub cc: ControllerConfig,
    /// AQA.
    pub aqa: u32,
    /// ASQ.
    pub asq: u64,
    /// ACQ.
    pub acq: u64,
}

/// The controller core.
pub(crate) struct Controller {
    pub(crate) dma: Arc<dyn DmaPort>,
    /// Vectors to signal once the core lock is released (see [`Controller::take_interrupts`]).
    pub(crate) fired: Vec<u16>,
    pub(crate) doorbells: Arc<DoorbellArray>,
    csts: Arc<AtomicU32>,
    pub(crate) ns: Arc<Namespace>,
    /// The pool that runs NVM Read and Write commands off the core lock (see
    /// [`crate::inflight`]); `None`: every command runs on the worker.
    pub(crate) dispatch: Option<Arc<Dispatch>>,
    pub(crate) limits: Limits,
    /// The limits of the configuration (a secondary's `limits` shrink to its resources).
    full_limits: Limits,
    /// Plain, primary or secondary controller.
    pub(crate) role: Role,
    pub(crate) info: ControllerInfo,
    pub(crate) ns_info: NamespaceInfo,
    pub(crate) started: Instant,
    /// CSTS.RDY as the core sees it.
    pub(crate) ready: bool,
    /// A shutdown was requested: no more commands until a reset.
    pub(crate) shut_down: bool,
    /// CSTS.CFS: the controller cannot go on until reset.
    pub(crate) fatal: bool,
    pub(crate) page_size: u64,
    pub(crate) cc: ControllerConfig,
    pub(crate) sqs: Vec<Option<SubmissionQueue>>,
    pub(crate) cqs: Vec<Option<CompletionQueue>>,
    pub(crate) features: Features,
    /// Number of Queues as granted by Set Features (1-based SQs, CQs); `None` before.
    pub(crate) queues_granted: Option<(u16, u16)>,
    /// An I/O queue was created since the last reset (Number of Queues is then fixed).
    pub(crate) io_queue_created: bool,
    /// CIDs of outstanding Asynchronous Event Requests.
    pub(crate) aers: Vec<u16>,
    /// Events waiting for an Asynchronous Event Request.
    pub(crate) events: VecDeque<u32>,
    /// Event types reported and not yet acknowledged by reading their log page.
    pub(crate) masked_event_types: u8,
    pub(crate) dbbuf: Option<DoorbellBuffer>,
    pub(crate) counters: IoCounters,
    pub(crate) errors: ErrorLog,
    /// The Controller Memory Buffer, for the queue placement checks (its addressing is in
    /// the DMA port).
    pub(crate) cmb: Option<Arc<crate::cmb::Cmb>>,
    segs: Vec<crate::prp::Segment>,
    bounce: Vec<u8>,
    /// Submission queue entries read ahead in one DMA read (see `process_sq`).
    sqe_ahead: Vec<u8>,
    /// Host memory the current burst's Writes need, read ahead ([`crate::readahead`]).
    data_ahead: readahead::Ahead,
    /// [`NvmeConfig::interrupt_hold`].
    pub(crate) interrupt_hold: std::time::Duration,
    /// [`NvmeConfig::burst_hold`].
    pub(crate) burst_hold: std::time::Duration,
}

impl Controller {
    /// A controller in its reset state (CC.EN = 0).
    pub(crate) fn new(
        cfg: &NvmeConfig,
        dma: Arc<dyn DmaPort>,
        doorbells: Arc<DoorbellArray>,
        csts: Arc<AtomicU32>,
        vendor_id: u16,
        role: Role,
    ) -> Result<Controller, crate::error::NvmeError> {
        let cntlid = role.cntlid();
        let (slice, ns_serial) = match &role {
            Role::Primary(v) | Role::Secondary { virt: v, .. }
                if v.namespaces() == VfNamespaces::Private =>
            {
                (
                    Some((cntlid, v.total_vfs() + 1)),
                    format!("{}/ns{cntlid}", cfg.serial),
                )
            }
            _ => (None, cfg.serial.clone()),
        };
        let ns = Namespace::open(cfg, slice)?;
        let limits = Limits {
            max_io_queues: cfg.max_io_queue_pairs,
            max_queue_entries: cfg.max_queue_entries,
            max_transfer: cfg.max_transfer_bytes(),
            vectors: cfg.msix_vectors(),
        };
        let (eui64, nguid, uuid) = crate::identify::namespace_ids(&ns_serial);
        let ns_info = NamespaceInfo {
            blocks: ns.blocks(),
            block_shift: ns.block_shift(),
            eui64,
            nguid,
            uuid,
            write_protected: cfg.read_only,
        };
        let info = ControllerInfo {
            vendor_id,
            subsystem_vendor_id: vendor_id,
            serial: cfg.serial.clone(),
            model: cfg.model.clone(),
            firmware_rev: cfg.firmware_rev.clone(),
            mdts: cfg.mdts,
            capacity_bytes: u128::from(ns.blocks()) << ns.block_shift(),
            max_commands: u16::try_from(cfg.max_queue_entries).unwrap_or(u16::MAX),
            cntlid,
            virtualization_management: matches!(role, Role::Primary(_)),
        };
        let queue_slots = usize::from(limits.max_io_queues) + 1;
        Ok(Controller {
            dma,
            fired: Vec::new(),
            doorbells,
            csts,
            ns: Arc::new(ns),
            dispatch: None,
            limits,
            full_limits: limits,
            role,
            info,
            ns_info,
            started: Instant::now(),
            ready: false,
            shut_down: false,
            fatal: false,
            page_size: 4096,
            cc: ControllerConfig { raw: 0 },
            sqs: (0..queue_slots).map(|_| None).collect(),
            cqs: (0..queue_slots).map(|_| None).collect(),
            features: Features::defaults(limits.vectors),
            queues_granted: None,
            io_queue_created: false,
            aers: Vec::new(),
            events: VecDeque::new(),
            masked_event_types: 0,
            dbbuf: None,
            counters: IoCounters::default(),
            errors: ErrorLog::default(),
            cmb: None,
            segs: Vec::new(),
            bounce: Vec::new(),
            sqe_ahead: Vec::new(),
            data_ahead: Vec::new(),
            interrupt_hold: cfg.interrupt_hold,
            burst_hold: cfg.burst_hold,
        })
    }

    fn set_csts(&self, set: u32, clear: u32) {
        let _ = self
            .csts
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                Some((v & !clear) | set)
            });
    }

    pub(crate) fn doorbell(&self, slot: usize) -> u32 {
        self.doorbells
            .get(slot)
            .map_or(0, |d| d.load(Ordering::Acquire))
    }

    pub(crate) fn reset_doorbell(&self, slot: usize) {
        if let Some(d) = self.doorbells.get(slot) {
            d.store(0, Ordering::Release);
        }
    }

    // -----------------------------------------------------------------------------------
    // Transitions
    // -----------------------------------------------------------------------------------

    /// CC.EN 0 -> 1: validates the configuration and the admin queue registers; on a bad
    /// value sets CSTS.CFS and stays not ready.
    pub(crate) fn enable(&mut self, regs: AdminQueueRegs) {
        self.reset_state();
        if let Role::Secondary { virt, vf } = &self.role {
            // A secondary runs on the resources assigned to it, and only while online.
            let entry = virt.secondary(*vf).unwrap_or_default();
            if !entry.online || !virt.vf_enabled(*vf) {
                tracing::warn!(
                    vf,
                    "nvme: CC.EN on an offline secondary controller, CSTS.CFS set"
                );
                self.fatal = true;
                self.set_csts(CSTS_CFS, CSTS_RDY);
                return;
            }
            self.limits.max_io_queues = self
                .full_limits
                .max_io_queues
                .min(entry.nvq.saturating_sub(1));
            self.limits.vectors = self.full_limits.vectors.min(entry.nvi);
            self.features = Features::defaults(self.limits.vectors);
        }
        let cc = regs.cc;
        let asqs = (regs.aqa & AQA_ASQS_MASK) + 1;
        let acqs = ((regs.aqa >> AQA_ACQS_SHIFT) & AQA_ASQS_MASK) + 1;
        let valid = cc.css() == CC_CSS_NVM
            && (MPSMIN..=MPSMAX).contains(&cc.mps())
            && cc.ams() == 0
            && asqs >= 2
            && acqs >= 2
            && regs.asq != 0
            && regs.acq != 0
            && regs.asq.is_multiple_of(cc.page_size())
            && regs.acq.is_multiple_of(cc.page_size())
            && self.queue_placement(regs.asq, u64::from(asqs) * SQE_BYTES, true)
                == QueuePlacement::Ok
            && self.queue_placement(regs.acq, u64::from(acqs) * CQE_BYTES, false)
                == QueuePlacement::Ok;
        self.set_csts(0, CSTS_SHST_MASK);
        if !valid {
            tracing::warn!(
                cc = cc.raw,
                aqa = regs.aqa,
                "nvme: invalid enable, CSTS.CFS set"
            );
            self.fatal = true;
            self.set_csts(CSTS_CFS, CSTS_RDY);
            return;
        }
        self.cc = cc;
        self.page_size = cc.page_size();
        let asq_ring = self.ring(regs.asq, u64::from(asqs) * SQE_BYTES, DmaAccess::Read);
        let acq_ring = self.ring(regs.acq, u64::from(acqs) * CQE_BYTES, DmaAccess::Write);
        if let Some(slot) = self.sqs.get_mut(0) {
            *slot = Some(SubmissionQueue::new(regs.asq, asqs, 0, asq_ring));
        }
        if let Some(slot) = self.cqs.get_mut(0) {
            *slot = Some(CompletionQueue {
                sq_count: 1,
                ..CompletionQueue::new(regs.acq, acqs, true, 0, acq_ring)
            });
        }
        self.ready = true;
        self.set_csts(CSTS_RDY, CSTS_CFS);
    }

    /// CC.EN 1 -> 0 (or a function reset): every queue deleted, features and events back to
    /// their defaults, CSTS.RDY and CSTS.CFS cleared.
    pub(crate) fn disable(&mut self) {
        self.reset_state();
        self.set_csts(0, CSTS_RDY | CSTS_CFS);
    }

    /// Full reset including CSTS.SHST (function level reset).
    pub(crate) fn power_on_reset(&mut self) {
        self.reset_state();
        self.csts.store(0, Ordering::Release);
    }

    fn reset_state(&mut self) {
        self.ready = false;
        self.shut_down = false;
        self.fatal = false;
        self.sqs.iter_mut().for_each(|q| *q = None);
        self.cqs.iter_mut().for_each(|q| *q = None);
        for d in self.doorbells.iter() {
            d.store(0, Ordering::Release);
        }
        self.features = Features::defaults(self.limits.vectors);
        self.queues_granted = None;
        self.io_queue_created = false;
        self.aers.clear();
        self.events.clear();
        self.masked_event_types = 0;
        self.dbbuf = None;
    }

    /// CC.SHN set: flush the image, stop processing, report shutdown complete.
    pub(crate) fn shutdown(&mut self) {
        if self.ns.flush().is_err() {
            tracing::warn!("nvme: flushing the image at shutdown failed");
        }
        self.shut_down = true;
        self.set_csts(CSTS_SHST_COMPLETE, CSTS_SHST_MASK);
    }

    /// Stops everything after an error that cannot be reported in a completion.
    pub(crate) fn fail(&mut self, why: &str) {
        tracing::warn!("nvme: controller fatal status: {why}");
        self.fatal = true;
        self.set_csts(CSTS_CFS, 0);
    }

    /// Whether a queue of `len` bytes at `base` may live where it is: wholly in host memory,
    /// or (a submission queue only: `CMBSZ.CQS` is clear) wholly in the mapped CMB.
    pub(crate) fn queue_placement(&self, base: u64, len: u64, submission: bool) -> QueuePlacement {
        let Some(cmb) = &self.cmb else {
            return QueuePlacement::Ok;
        };
        if !cmb.overlaps(base, len) {
            return QueuePlacement::Ok;
        }
        if !submission {
            return QueuePlacement::CompletionInCmb;
        }
        let inside = cmb.mapped_at().is_some_and(|cba| {
            base.checked_sub(cba)
                .and_then(|off| off.checked_add(len))
                .is_some_and(|end| end <= cmb.len())
        });
        if inside {
            QueuePlacement::Ok
        } else {
            QueuePlacement::Straddles
        }
    }

    /// The direct mapping of a queue ring, if the port offers one.
    pub(crate) fn ring(&self, base: u64, len: u64, access: DmaAccess) -> Option<MemSpan> {
        self.dma.dma_span(BusAddr(base), len, access).ok().flatten()
    }

    // -----------------------------------------------------------------------------------
    // Processing
    // -----------------------------------------------------------------------------------

    /// One pass over every submission queue; returns whether anything was done.
    pub(crate) fn poll(&mut self) -> bool {
        if !self.ready || self.fatal || self.shut_down {
            return false;
        }
        if self.dispatch.as_ref().is_some_and(|d| d.draining()) {
            // A reset waits for the commands in flight: fetch nothing more.
            return false;
        }
        if let Role::Secondary { virt, vf } = &self.role {
            if !virt.is_online(*vf) {
                // Taken offline (or its VF disabled) while enabled: it stops, as after a
                // fatal error, until the host resets it.
                self.ready = false;
                self.fail("secondary controller taken offline");
                self.set_csts(0, CSTS_RDY);
                return false;
            }
        }
        let mut worked = self.deliver_events();
        for qid in 0..self.sqs.len() {
            worked |= self.process_sq(qid);
            if self.fatal {
                break;
            }
        }
        self.raise_interrupts();
        worked
    }

    /// Whether a pass now would wait for nothing: no admin command waiting, shadow doorbells
    /// (if any) in mapped memory, and every waiting I/O command (up to a burst per queue) in a
    /// queue whose ring is mapped, its PRP lists and the data it reads mapped too (see
    /// [`readahead::reads_only_mapped`]). A pass writes any memory freely: posted writes do
    /// not wait.
    pub(crate) fn pending_is_local(&mut self) -> bool {
        if !self.ready || self.fatal || self.shut_down {
            return false;
        }
        if self
            .dbbuf
            .as_ref()
            .is_some_and(|d| d.shadow_span.is_none() || d.event_span.is_none())
        {
            return false;
        }
        let geometry = readahead::Geometry {
            page_size: self.page_size,
            max_transfer: self.limits.max_transfer,
            block_shift: self.ns.block_shift(),
        };
        let mut entry = [0u8; Command::BYTES];
        for qid in 0..self.sqs.len() {
            if self.refresh_sq_tail(qid).is_none() {
                continue;
            }
            let Some(sq) = self.sqs.get(qid).and_then(Option::as_ref) else {
                continue;
            };
            if sq.head == sq.tail {
                continue;
            }
            let Some(ring) = sq.ring.as_ref().filter(|_| qid != 0) else {
                return false;
            };
            let mut at = sq.head;
            for _ in 0..SQ_BURST {
                if at == sq.tail {
                    break;
                }
                if ring.read_at(u64::from(at) * SQE_BYTES, &mut entry).is_err()
                    || !readahead::reads_only_mapped(&*self.dma, &Command::parse(&entry), geometry)
                {
                    return false;
                }
                at = wrap(at, sq.entries);
            }
        }
        true
    }

    fn process_sq(&mut self, qid: usize) -> bool {
        let worked = self.process_burst(qid);
        // What was read ahead is the burst's alone.
        self.data_ahead.clear();
        worked
    }

    /// Before a burst of I/O queue `qid` runs: reads ahead the data its Writes need (see
    /// [`crate::readahead`]) when host memory is reached by messages (the queues have no
    /// direct mapping) and the worker runs the commands itself. `have` tells which entries
    /// `sqes` holds already, `(index of the first, how many)` (kept from a burst cut short):
    /// when they include the head they are used, else the entries are fetched from host
    /// memory into `sqes`. Returns the entries `sqes` then holds.
    fn read_ahead_burst(
        &mut self,
        qid: usize,
        sqes: &mut Vec<u8>,
        have: (u32, u32),
    ) -> Option<(u32, u32)> {
        if qid == 0 || self.dispatch.is_some() {
            return None;
        }
        let sq = self.sqs.get(qid)?.as_ref()?;
        let cq_direct = self
            .cqs
            .get(usize::from(sq.cqid))?
            .as_ref()
            .is_some_and(|q| q.ring.is_some());
        if sq.head == sq.tail || (sq.ring.is_some() && cq_direct) {
            return None;
        }
        let until = if sq.tail > sq.head {
            sq.tail
        } else {
            sq.entries
        };
        let n = (until - sq.head).min(SQ_BURST);
        let first = u64::from(sq.head) * SQE_BYTES;
        let mut fetched = None;
        let mut cmds = Vec::with_capacity(n as usize);
        match &sq.ring {
            Some(ring) => {
                let mut entry = [0u8; Command::BYTES];
                for i in 0..u64::from(n) {
                    if ring.read_at(first + i * SQE_BYTES, &mut entry).is_ok() {
                        cmds.push(Command::parse(&entry));
                    }
                }
            }
            None => {
                // The entries kept from a burst cut short when they include the head, else
                // the burst's entries fetched now.
                let skip = if holds(have, sq.head) {
                    fetched = Some(have);
                    (sq.head - have.0) as usize * Command::BYTES
                } else {
                    sqes.resize(n as usize * Command::BYTES, 0);
                    let at = sq.base.checked_add(first)?;
                    self.dma.dma_read(BusAddr(at), sqes).ok()?;
                    fetched = Some((sq.head, n));
                    0
                };
                let held = sqes.get(skip..).unwrap_or_default();
                for bytes in held.chunks_exact(Command::BYTES).take(n as usize) {
                    let mut entry = [0u8; Command::BYTES];
                    entry.copy_from_slice(bytes);
                    cmds.push(Command::parse(&entry));
                }
            }
        }
        let geometry = readahead::Geometry {
            page_size: self.page_size,
            max_transfer: self.limits.max_transfer,
            block_shift: self.ns.block_shift(),
        };
        readahead::read_ahead(&*self.dma, &cmds, geometry, &mut self.data_ahead);
        fetched
    }

    fn process_burst(&mut self, qid: usize) -> bool {
        if self.refresh_sq_tail(qid).is_none() {
            return false;
        }
        let mut done = 0;
        // Bytes the burst's Reads wrote to host memory (see `PASS_PUSH_MAPPED`).
        let mut pushed = 0u64;
        // Entries fetched ahead by one DMA read: (index of the first, how many, their bytes);
        // first those a burst cut short left with the queue.
        let mut ahead = std::mem::take(&mut self.sqe_ahead);
        let mut have = (0, 0);
        if let Some(kept) = self
            .sqs
            .get_mut(qid)
            .and_then(Option::as_mut)
            .and_then(|q| q.kept.take())
        {
            have = (kept.first, kept.count);
            ahead = kept.bytes;
        }
        let (mut ahead_first, mut ahead_count) =
            self.read_ahead_burst(qid, &mut ahead, have).unwrap_or(have);
        // Fixed for the burst: its queues, the pool and what was read ahead do not change.
        let push_limit = self.push_limit(qid);
        while done < SQ_BURST {
            let Some(sq) = self.sqs.get(qid).and_then(Option::as_ref) else {
                break;
            };
            if sq.head == sq.tail {
                break;
            }
            let (head, tail, entries, base, cqid) =
                (sq.head, sq.tail, sq.entries, sq.base, sq.cqid);
            let cqi = usize::from(cqid);
            if self
                .cqs
                .get(cqi)
                .and_then(Option::as_ref)
                .is_none_or(|c| !c.has_room())
            {
                self.refresh_cq_head(cqi);
                if self
                    .cqs
                    .get(cqi)
                    .and_then(Option::as_ref)
                    .is_none_or(|c| !c.has_room())
                {
                    break;
                }
            }
            let mut entry = [0u8; Command::BYTES];
            let offset = u64::from(head) * SQE_BYTES;
            let ring = self
                .sqs
                .get(qid)
                .and_then(Option::as_ref)
                .and_then(|q| q.ring.as_ref());
            let fetched = match ring {
                Some(ring) => ring.read_at(offset, &mut entry).is_ok(),
                None => {
                    // Without a direct mapping every fetch is a DMA read, and over a fabric a
                    // read is a round trip: an I/O queue's entries up to the tail (not past the
                    // end of the ring, nor the burst) come in one read, as a device fetches
                    // several commands in one read request. The host may not change entries
                    // between head and tail, so reading them early is safe.
                    let cached = holds((ahead_first, ahead_count), head);
                    if !cached && qid != 0 {
                        let until = if tail > head { tail } else { entries };
                        let n = (until - head).min(SQ_BURST - done).max(1);
                        ahead.resize(n as usize * Command::BYTES, 0);
                        if base
                            .checked_add(offset)
                            .is_some_and(|a| self.dma.dma_read(BusAddr(a), &mut ahead).is_ok())
                        {
                            ahead_first = head;
                            ahead_count = n;
                        } else {
                            ahead_count = 0;
                        }
                    }
                    let at = (head.wrapping_sub(ahead_first) as usize) * Command::BYTES;
                    match ahead.get(at..at + Command::BYTES) {
                        Some(bytes) if ahead_count > 0 && head >= ahead_first => {
                            entry.copy_from_slice(bytes);
                            true
                        }
                        _ => base
                            .checked_add(offset)
                            .is_some_and(|a| self.dma.dma_read(BusAddr(a), &mut entry).is_ok()),
                    }
                }
            };
            if !fetched {
                self.sqe_ahead = ahead;
                self.fail("submission queue entry fetch failed");
                return true;
            }
            let cmd = Command::parse(&entry);
            if qid == 0 && self.must_wait_for_in_flight(&cmd) {
                // Left at the head: fetched again on a later pass, once the queue's commands
                // in flight have posted.
                break;
            }
            let new_head = wrap(head, entries);
            if let Some(sq) = self.sqs.get_mut(qid).and_then(Option::as_mut) {
                sq.head = new_head;
            }
            // Arrivals count only where the interrupt hold, and so the rule, can apply (never
            // the admin queue, nor a queue reached by messages): no clock read otherwise.
            if !self.burst_hold.is_zero() && self.hold_applies(cqi) {
                if let Some(cq) = self.cqs.get_mut(cqi).and_then(Option::as_mut) {
                    cq.burst.arrived(std::time::Instant::now(), self.burst_hold);
                }
            }
            let qid16 = qid as u16;
            if qid != 0 && self.hand_off(qid16, cqid, &cmd, new_head != tail) {
                done += 1;
                continue;
            }
            let outcome = if qid == 0 {
                self.admin(&cmd)
            } else {
                Some((self.io(&cmd), 0))
            };
            if let Some((status, dw0)) = outcome {
                if !status.is_success() {
                    self.errors.record(qid16, cmd.cid, status, cmd.nsid);
                } else if push_limit.is_some() {
                    if let Ok(NvmOp::Read(r)) = NvmOp::parse(&cmd) {
                        let bytes = u64::from(r.blocks) << self.ns.block_shift();
                        pushed = pushed.saturating_add(bytes);
                    }
                }
                let sqhd = self
                    .sqs
                    .get(qid)
                    .and_then(Option::as_ref)
                    .map_or(new_head, |q| q.head) as u16;
                self.post(
                    cqi,
                    Completion {
                        dw0,
                        dw1: 0,
                        sqhd,
                        sqid: qid16,
                        cid: cmd.cid,
                        status,
                    },
                );
            }
            if self.fatal {
                self.sqe_ahead = ahead;
                return true;
            }
            done += 1;
            if new_head != tail && push_limit.is_some_and(|l| pushed >= l) {
                if holds((ahead_first, ahead_count), new_head) {
                    if let Some(sq) = self.sqs.get_mut(qid).and_then(Option::as_mut) {
                        sq.kept = Some(Fetched {
                            first: ahead_first,
                            count: ahead_count,
                            bytes: std::mem::take(&mut ahead),
                        });
                    }
                }
                break;
            }
        }
        self.sqe_ahead = ahead;
        done > 0
    }

    /// After how many bytes of read data a burst of I/O queue `qid` ends (see
    /// [`PASS_PUSH_MAPPED`]); `None`: it runs whole. It may end early when its completion
    /// queue is reached by messages, the worker runs the commands itself, and nothing was read
    /// ahead for the burst's Writes (it would be read again).
    fn push_limit(&self, qid: usize) -> Option<u64> {
        if qid == 0 || self.dispatch.is_some() || !self.data_ahead.is_empty() {
            return None;
        }
        let sq = self.sqs.get(qid).and_then(Option::as_ref)?;
        let cq_messages = self
            .cqs
            .get(usize::from(sq.cqid))
            .and_then(Option::as_ref)
            .is_some_and(|q| q.ring.is_none());
        if !cq_messages {
            return None;
        }
        Some(if sq.ring.is_some() {
            PASS_PUSH_MAPPED
        } else {
            PASS_PUSH_FETCHED
        })
    }

    /// A Delete I/O Submission Queue of a queue with commands in flight waits until they have
    /// posted (a queue is deleted only once its commands are complete).
    fn must_wait_for_in_flight(&self, cmd: &Command) -> bool {
        if cmd.opcode != admin_opcode::DELETE_IO_SQ {
            return false;
        }
        let qid = usize::from((cmd.cdw[0] & 0xffff) as u16);
        qid != 0
            && self
                .sqs
                .get(qid)
                .and_then(Option::as_ref)
                .is_some_and(|q| q.in_flight > 0)
    }

    /// Hands an NVM Read or Write to the pool (see [`crate::inflight`]) when its submission or
    /// completion queue has no direct mapping (DMA is a message: the test of the burst fetch)
    /// and another command is in flight or waiting behind it; a lone command runs on the
    /// worker, without a thread hop. Returns whether it was handed off.
    fn hand_off(&mut self, sqid: u16, cqid: u16, cmd: &Command, more_waiting: bool) -> bool {
        let Some(dispatch) = self.dispatch.clone() else {
            return false;
        };
        let Ok(op @ (NvmOp::Read(_) | NvmOp::Write(_))) = NvmOp::parse(cmd) else {
            return false;
        };
        // The completion queue is always in host memory; the submission queue may be in the
        // CMB (then its ring is direct even when host memory is reached by messages).
        let direct = self
            .sqs
            .get(usize::from(sqid))
            .and_then(Option::as_ref)
            .is_none_or(|q| q.ring.is_some())
            && self
                .cqs
                .get(usize::from(cqid))
                .and_then(Option::as_ref)
                .is_none_or(|q| q.ring.is_some());
        if direct || (!more_waiting && dispatch.in_flight() == 0) {
            return false;
        }
        let (Some(sq), Some(cq)) = (
            self.sqs.get_mut(usize::from(sqid)).and_then(Option::as_mut),
            self.cqs.get_mut(usize::from(cqid)).and_then(Option::as_mut),
        ) else {
            return false;
        };
        sq.in_flight = sq.in_flight.saturating_add(1);
        cq.reserved = cq.reserved.saturating_add(1);
        dispatch.submit(IoJob {
            sqid,
            cqid,
            cid: cmd.cid,
            nsid: cmd.nsid,
            op,
            ns: self.ns.clone(),
            dma: self.dma.clone(),
            page_size: self.page_size,
            max_transfer: self.limits.max_transfer,
            write_cache: self.features.write_cache,
        });
        true
    }

    /// Posts the completion of a command that ran on a pool thread, records its error and
    /// counters, and signals the vector once no other command for the queue is in flight. Queues are not torn down while commands are in
    /// flight (Delete I/O SQ and the resets wait), so both are still there.
    pub(crate) fn complete_io(&mut self, done: IoDone) {
        let mut sqhd = None;
        if let Some(sq) = self
            .sqs
            .get_mut(usize::from(done.sqid))
            .and_then(Option::as_mut)
        {
            sq.in_flight = sq.in_flight.saturating_sub(1);
            sqhd = Some(sq.head as u16);
        }
        let mut last_for_cq = true;
        if let Some(cq) = self
            .cqs
            .get_mut(usize::from(done.cqid))
            .and_then(Option::as_mut)
        {
            cq.reserved = cq.reserved.saturating_sub(1);
            last_for_cq = cq.reserved == 0;
        }
        self.counters.add(&done.counters);
        if !done.status.is_success() {
            self.errors
                .record(done.sqid, done.cid, done.status, done.nsid);
        }
        if let (Some(sqhd), false) = (sqhd, self.fatal) {
            self.post(
                usize::from(done.cqid),
                Completion {
                    dw0: 0,
                    dw1: 0,
                    sqhd,
                    sqid: done.sqid,
                    cid: done.cid,
                    status: done.status,
                },
            );
            // One message for the completions of a burst, as the worker sends one per pass:
            // while more commands for this queue are in flight, the last of them to post (or
            // the worker's next pass) signals the vector.
            if last_for_cq {
                self.raise_interrupts();
            }
        }
        if let Some(d) = &self.dispatch {
            d.finished();
        }
    }

    fn io(&mut self, cmd: &Command) -> Status {
        let op = match NvmOp::parse(cmd) {
            Ok(op) => op,
            Err(s) => return s,
        };
        let port = ReadAhead {
            port: &*self.dma,
            ahead: &self.data_ahead,
        };
        let mut t = Transfer {
            dma: &port,
            page_size: self.page_size,
            segs: &mut self.segs,
            bounce: &mut self.bounce,
        };
        self.ns.execute(
            &mut t,
            &op,
            cmd.nsid,
            self.limits.max_transfer,
            self.features.write_cache,
            &mut self.counters,
        )
    }

    /// A transfer context for admin data.
    pub(crate) fn transfer(&mut self) -> Transfer<'_> {
        Transfer {
            dma: &*self.dma,
            page_size: self.page_size,
            segs: &mut self.segs,
            bounce: &mut self.bounce,
        }
    }

    /// Posts `c` to completion queue `cqid` (which has room: callers check).
    pub(crate) fn post(&mut self, cqid: usize, c: Completion) {
        let Some(cq) = self.cqs.get_mut(cqid).and_then(Option::as_mut) else {
            return;
        };
        if cq.is_full() {
            return;
        }
        let bytes = c.to_bytes(cq.phase);
        let mut dw3 = [0u8; 4];
        dw3.copy_from_slice(&bytes[12..16]);
        let dw3 = u32::from_le_bytes(dw3);
        let offset = u64::from(cq.tail) * CQE_BYTES;
        let ok = match &cq.ring {
            Some(ring) => {
                ring.write_at(offset, &bytes[..12]).is_ok()
                    && ring.store_u32(offset + 12, dw3).is_ok()
            }
            None => match cq.base.checked_add(offset) {
                Some(addr) => match addr.checked_add(12) {
                    Some(last) => {
                        let first = self.dma.dma_write(BusAddr(addr), &bytes[..12]).is_ok();
                        fence(Ordering::Release);
                        first
                            && self
                                .dma
                                .dma_write(BusAddr(last), &dw3.to_le_bytes())
                                .is_ok()
                    }
                    None => false,
                },
                None => false,
            },
        };
        if !ok {
            self.fail("posting a completion failed");
            return;
        }
        cq.tail = wrap(cq.tail, cq.entries);
        if cq.tail == 0 {
            cq.phase = !cq.phase;
        }
        cq.pending += 1;
        if cq.pending_since.is_none() {
            cq.pending_since = Some(Instant::now());
        }
    }
}
