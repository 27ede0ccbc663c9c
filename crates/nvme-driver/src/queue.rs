//! Queue pairs: a submission queue, its completion queue, and the commands outstanding on it.
//!
//! A queue pair is owned by one thread at a time (the controller keeps each behind a mutex).
//! A command's data buffer and PRP list pages stay referenced by its slot until the controller
//! completes it, so memory the device may still write is never freed or reused early.

use std::sync::Arc;
use std::time::{Duration, Instant};

use devlend_pci::{BarIndex, DmaBuffer, PciFunction};

use crate::cmd::{Command, CompletionEntry, Status, CQE_BYTES, SQE_BYTES};
use crate::error::NvmeError;
use crate::prp::{self, PrpLayout};
use crate::regs::{self, Capabilities};

/// How the driver learns that commands completed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CompletionMode {
    /// Sleep on the completion queue's MSI-X vector ([`devlend_pci::Interrupts`]).
    #[default]
    Interrupt,
    /// Poll the completion queue's phase bit (interrupts disabled on I/O queues).
    Polling,
}

/// While sleeping on an interrupt, the driver wakes this often to check CSTS (a controller that
/// died or was removed never interrupts).
const INTERRUPT_SLICE: Duration = Duration::from_millis(50);
/// While polling, the driver reads CSTS this often.
const POLL_STATUS_INTERVAL: Duration = Duration::from_millis(20);
/// How long a polling waiter busy-waits after its last progress before it starts yielding its
/// CPU between probes (yielding early hands the CPU to other work for a whole time slice).
const POLL_SPIN_TIME: Duration = Duration::from_micros(50);

/// Deferred entries ([`QueuePair::submit_deferred`]) are handed over at once when their data
/// reaches this many bytes, as Linux's block layer flushes a plug that holds a request of
/// 128 KiB or more (`BLK_PLUG_FLUSH_SIZE`): a doorbell saved per 128 KiB is little, and a
/// device can start on a large transfer while the next is being placed.
pub(crate) const DEFER_FLUSH_BYTES: u64 = 128 << 10;
/// PRP list pages a queue keeps for reuse.
const PRP_PAGE_CACHE: usize = 64;

/// Part of a DMA buffer that a command transfers to or from.
#[derive(Clone, Debug)]
pub struct DmaSlice {
    buf: Arc<DmaBuffer>,
    offset: usize,
    len: usize,
}

impl DmaSlice {
    /// `len` bytes of `buf` from `offset`. The range must be non-empty, inside the buffer, and
    /// start on a dword boundary (a PRP requirement).
    pub fn new(buf: Arc<DmaBuffer>, offset: usize, len: usize) -> Result<Self, NvmeError> {
        let inside = offset.checked_add(len).is_some_and(|end| end <= buf.len());
        if len == 0 || !inside || !offset.is_multiple_of(4) {
            return Err(NvmeError::InvalidRequest(format!(
                "{len} bytes at offset {offset} of a {}-byte DMA buffer (non-empty, inside, \
                 dword-aligned)",
                buf.len()
            )));
        }
        Ok(Self { buf, offset, len })
    }

    /// The whole buffer.
    pub fn whole(buf: Arc<DmaBuffer>) -> Self {
        let len = buf.len();
        Self {
            buf,
            offset: 0,
            len,
        }
    }

    /// The buffer.
    pub fn buffer(&self) -> &Arc<DmaBuffer> {
        &self.buf
    }

    /// Offset in the buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }

    /// Length in bytes.
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len
    }
}

/// A command's completion, as the queue-depth API returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// The tag given at submission.
    pub tag: u64,
    /// The command's opcode.
    pub opcode: u8,
    /// Completion status.
    pub status: Status,
    /// Command-specific dword 0.
    pub dw0: u32,
}

/// The hardware a queue talks to: the function, BAR0 and the doorbell layout.
pub(crate) struct Hw {
    pub fun: Arc<dyn PciFunction>,
    pub bar: BarIndex,
    pub caps: Capabilities,
    pub mode: CompletionMode,
}

impl Hw {
    pub fn read32(&self, offset: u64) -> Result<u32, NvmeError> {
        Ok(self.fun.bar_read_u32(self.bar, offset)?)
    }

    pub fn write32(&self, offset: u64, value: u32) -> Result<(), NvmeError> {
        Ok(self.fun.bar_write_u32(self.bar, offset, value)?)
    }

    pub fn write64(&self, offset: u64, value: u64) -> Result<(), NvmeError> {
        Ok(self.fun.bar_write_u64(self.bar, offset, value)?)
    }

    /// Reads CSTS; all-ones means the device is gone, CFS that it failed.
    pub fn check_status(&self) -> Result<u32, NvmeError> {
        let csts = self.read32(regs::REG_CSTS)?;
        if csts == u32::MAX {
            return Err(NvmeError::DeviceRemoved(
                "CSTS reads all-ones (the device no longer answers)".into(),
            ));
        }
        if csts & regs::CSTS_CFS != 0 {
            return Err(NvmeError::ControllerFatal);
        }
        Ok(csts)
    }
}

#[derive(Default)]
struct Slot {
    busy: bool,
    tag: u64,
    opcode: u8,
    /// Held, never read: the controller may write this memory until the command completes.
    #[allow(dead_code)]
    data: Option<Arc<DmaBuffer>>,
    prp_pages: Vec<DmaBuffer>,
    /// The CMB buffers the command's data or PRP list were pushed into.
    cmb: CmbHeld,
}

/// A buffer in the CMB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CmbBuf {
    /// Offset in the CMB's BAR.
    pub bar_offset: u64,
    /// Bus address (in `CMBMSC.CBA .. + size`).
    pub bus_addr: u64,
}

/// Bytes of one small CMB data buffer (and of a PRP list page): a write of at most this many
/// bytes may go through one.
pub(crate) const CMB_DATA_BYTES: u64 = regs::HOST_PAGE_BYTES as u64;

/// Which of a queue's CMB pools a data buffer came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CmbPool {
    Small,
    Bulk,
}

/// The CMB buffers a command holds until it completes.
#[derive(Clone, Copy, Debug, Default)]
struct CmbHeld {
    data: Option<(CmbPool, CmbBuf)>,
    list: Option<CmbBuf>,
}

/// A queue's buffers in the CMB beside its ring: free write data buffers, small and bulk, and
/// PRP list pages (see [`crate::DriverConfig::cmb_bulk`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct CmbPools {
    /// Write data buffers of [`CMB_DATA_BYTES`].
    pub small: Vec<CmbBuf>,
    /// Write data buffers of `bulk_bytes` each (bus-contiguous, page-aligned).
    pub bulk: Vec<CmbBuf>,
    /// Bytes of one bulk buffer.
    pub bulk_bytes: u64,
    /// PRP list pages of [`CMB_DATA_BYTES`].
    pub lists: Vec<CmbBuf>,
}

impl CmbPools {
    fn give_back(&mut self, held: CmbHeld) {
        match held.data {
            Some((CmbPool::Small, b)) => self.small.push(b),
            Some((CmbPool::Bulk, b)) => self.bulk.push(b),
            None => {}
        }
        if let Some(b) = held.list {
            self.lists.push(b);
        }
    }
}

/// Where a submission queue lives.
pub(crate) enum SqRing {
    /// Host memory the device fetches entries from.
    Host(DmaBuffer),
    /// The controller's memory buffer: entries are written through the BAR.
    Cmb {
        /// The CMB's BAR.
        bar: BarIndex,
        /// The queue's offset in that BAR.
        offset: u64,
        /// The queue's bus address (in `CMBMSC.CBA .. + size`).
        bus_addr: u64,
        /// Read back after writing an entry, before the doorbell: the doorbell is a direct
        /// store that could overtake the entry's posted write.
        flush: bool,
    },
}

/// Where to put a new queue pair's submission queue.
#[derive(Clone, Debug)]
pub(crate) enum SqPlacement {
    /// Host memory.
    Host,
    /// The CMB at this BAR offset and bus address.
    Cmb {
        /// The CMB's BAR.
        bar: BarIndex,
        /// Offset in the BAR.
        offset: u64,
        /// Bus address.
        bus_addr: u64,
        /// The queue's data buffers and PRP list pages in the CMB.
        pools: CmbPools,
    },
}

/// A submission queue and its completion queue (same id, same size).
pub(crate) struct QueuePair {
    qid: u16,
    entries: u32,
    sq: SqRing,
    cq: DmaBuffer,
    sq_tail: u32,
    /// The tail last written to the doorbell: entries up to `sq_tail` are placed, those past
    /// this one not yet handed over ([`Self::submit_deferred`], [`Self::ring`]).
    sq_published: u32,
    /// Data bytes of the entries placed since the doorbell was last written.
    unrung_bytes: u64,
    cq_head: u32,
    /// The head last written to the completion queue's doorbell. Entries consumed since are
    /// reported later, with the next submission's doorbell or before the driver waits (see
    /// [`Self::report_head`]).
    cq_reported: u32,
    phase: bool,
    sq_doorbell: u64,
    cq_doorbell: u64,
    vector: Option<u16>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    prp_cache: Vec<DmaBuffer>,
    broken: bool,
    /// Free CMB data buffers and list pages; empty without them.
    cmb: CmbPools,
    /// Writes whose data went through a CMB buffer.
    cmb_writes: u64,
    /// Commands whose PRP list went into a CMB list page.
    cmb_lists: u64,
    /// Staging for data and PRP lists pushed into the CMB (kept across commands).
    staging: Vec<u8>,
    /// Whether the queue has CMB list pages (all of them may be in use).
    cmb_has_lists: bool,
}

impl QueuePair {
    /// Allocates the rings for queue `qid` with `entries` slots (2 to 65536); `vector` is the
    /// MSI-X vector to sleep on, `None` to poll.
    pub fn new(hw: &Hw, qid: u16, entries: u32, vector: Option<u16>) -> Result<Self, NvmeError> {
        Self::placed(hw, qid, entries, vector, SqPlacement::Host)
    }

    /// Like [`Self::new`] with the submission queue where `placement` says.
    pub fn placed(
        hw: &Hw,
        qid: u16,
        entries: u32,
        vector: Option<u16>,
        placement: SqPlacement,
    ) -> Result<Self, NvmeError> {
        if !(2..=65536).contains(&entries) {
            return Err(NvmeError::InvalidRequest(format!(
                "a queue of {entries} entries (2 to 65536)"
            )));
        }
        let n = entries as usize;
        let mut cmb = CmbPools::default();
        let sq = match placement {
            SqPlacement::Host => {
                let sq = hw.fun.dma_alloc(n * SQE_BYTES)?;
                sq.fill(0)?;
                SqRing::Host(sq)
            }
            // Every entry is written before the doorbell that hands it over: no need to clear.
            SqPlacement::Cmb {
                bar,
                offset,
                bus_addr,
                pools,
            } => {
                cmb = pools;
                SqRing::Cmb {
                    bar,
                    offset,
                    bus_addr,
                    flush: !hw.fun.bar_mappings(hw.bar).is_empty(),
                }
            }
        };
        let cq = hw.fun.dma_alloc(n * CQE_BYTES)?;
        cq.fill(0)?;
        // One command slot fewer than entries: a full queue would look empty.
        let capacity = n - 1;
        let free = (0..capacity as u16).rev().collect();
        let slots = (0..capacity).map(|_| Slot::default()).collect();
        Ok(Self {
            qid,
            entries,
            sq,
            cq,
            sq_tail: 0,
            sq_published: 0,
            unrung_bytes: 0,
            cq_head: 0,
            cq_reported: 0,
            phase: true,
            sq_doorbell: hw.caps.sq_tail_doorbell(qid),
            cq_doorbell: hw.caps.cq_head_doorbell(qid),
            vector,
            slots,
            free,
            prp_cache: Vec::new(),
            broken: false,
            cmb_writes: 0,
            cmb_lists: 0,
            staging: Vec::new(),
            cmb_has_lists: !cmb.lists.is_empty(),
            cmb,
        })
    }

    pub fn qid(&self) -> u16 {
        self.qid
    }

    pub fn sq_bus_addr(&self) -> u64 {
        match &self.sq {
            SqRing::Host(b) => b.bus_addr().raw(),
            SqRing::Cmb { bus_addr, .. } => *bus_addr,
        }
    }

    /// Writes whose data went through a CMB buffer (pushed into the device, not fetched).
    pub fn cmb_writes(&self) -> u64 {
        self.cmb_writes
    }

    /// Commands whose PRP list went into a CMB list page (pushed, not fetched).
    pub fn cmb_lists(&self) -> u64 {
        self.cmb_lists
    }

    /// Bytes of one bulk write data buffer in the CMB; 0 when the queue has none (the size is
    /// set only when a bulk buffer was placed).
    pub fn cmb_bulk_bytes(&self) -> u64 {
        self.cmb.bulk_bytes
    }

    /// The CMB's BAR, when the submission queue is in the CMB.
    fn cmb_bar(&self) -> Option<BarIndex> {
        match &self.sq {
            SqRing::Cmb { bar, .. } => Some(*bar),
            SqRing::Host(_) => None,
        }
    }

    /// Whether the queue has PRP list pages in the CMB.
    pub fn cmb_has_lists(&self) -> bool {
        self.cmb_has_lists
    }

    /// Whether the submission queue is in the controller's memory buffer.
    pub fn sq_in_cmb(&self) -> bool {
        matches!(self.sq, SqRing::Cmb { .. })
    }

    pub fn cq_bus_addr(&self) -> u64 {
        self.cq.bus_addr().raw()
    }

    /// Commands that may be outstanding at once.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Places `cmd` (with PRPs for `data`) in the submission queue and rings the doorbell.
    pub fn submit(
        &mut self,
        hw: &Hw,
        cmd: Command,
        data: Option<&DmaSlice>,
        tag: u64,
    ) -> Result<(), NvmeError> {
        self.submit_inner(hw, cmd, data, tag, true)
    }

    /// Places `cmd` like [`Self::submit`] without ringing the doorbell: the next
    /// [`Self::ring`] (or [`Self::reap`], which rings first) hands over every entry placed
    /// since, with one doorbell write, as Linux's blk-mq does for a batch of requests. The
    /// device then also fetches them together.
    pub fn submit_deferred(
        &mut self,
        hw: &Hw,
        cmd: Command,
        data: Option<&DmaSlice>,
        tag: u64,
    ) -> Result<(), NvmeError> {
        self.submit_inner(hw, cmd, data, tag, false)
    }

    /// Writes the submission queue's tail doorbell if entries were placed since it was last
    /// written. A failed write leaves the queue broken (the device may or may not have seen
    /// the entries).
    pub fn ring(&mut self, hw: &Hw) -> Result<(), NvmeError> {
        if self.sq_published == self.sq_tail {
            return Ok(());
        }
        if self.broken {
            return Err(NvmeError::QueueBroken { qid: self.qid });
        }
        // A batch of its own, as a submission's stores: a fabric with a fixed cost per message
        // sends the doorbell (with whatever the caller's batch holds) when it ends, on this
        // thread, rather than as a lone posted write.
        let written = {
            let _posted = devlend_sync::posted::Batch::begin();
            self.report_head(hw)
                .and_then(|()| hw.write32(self.sq_doorbell, self.sq_tail))
        };
        if let Err(e) = written {
            self.broken = true;
            return Err(e);
        }
        self.sq_published = self.sq_tail;
        self.unrung_bytes = 0;
        Ok(())
    }

    fn submit_inner(
        &mut self,
        hw: &Hw,
        mut cmd: Command,
        data: Option<&DmaSlice>,
        tag: u64,
        ring: bool,
    ) -> Result<(), NvmeError> {
        if self.broken {
            return Err(NvmeError::QueueBroken { qid: self.qid });
        }
        let Some(cid) = self.free.pop() else {
            return Err(NvmeError::QueueFull {
                qid: self.qid,
                capacity: self.capacity(),
            });
        };
        // The command's stores (its data and entry when they go into the CMB, then the
        // doorbell) are one batch of posted writes: a fabric with a fixed cost per message
        // sends them together (see `devlend_sync::posted`).
        let placed = {
            let _posted = devlend_sync::posted::Batch::begin();
            self.place(hw, &mut cmd, cid, data).and_then(|placed| {
                if ring {
                    // On a failed write the entry may or may not have been seen: the queue
                    // is broken.
                    self.ring(hw)?;
                }
                Ok(placed)
            })
        };
        match placed {
            Ok((prp_pages, cmb)) => {
                if cmb.data.is_some() {
                    self.cmb_writes += 1;
                }
                if cmb.list.is_some() {
                    self.cmb_lists += 1;
                }
                if let Some(slot) = self.slots.get_mut(usize::from(cid)) {
                    *slot = Slot {
                        busy: true,
                        tag,
                        opcode: cmd.opcode,
                        data: data.map(|d| d.buf.clone()),
                        prp_pages,
                        cmb,
                    };
                }
                if !ring {
                    let len = data.map_or(0, |d| d.len() as u64);
                    self.unrung_bytes = self.unrung_bytes.saturating_add(len);
                    if self.unrung_bytes >= DEFER_FLUSH_BYTES {
                        self.ring(hw)?;
                    }
                }
                Ok(())
            }
            Err(e) => {
                self.free.push(cid);
                Err(e)
            }
        }
    }

    /// Writes `cmd` (with PRPs or CMB data for `data`) at the tail and advances it; ringing
    /// the doorbell is the caller's.
    fn place(
        &mut self,
        hw: &Hw,
        cmd: &mut Command,
        cid: u16,
        data: Option<&DmaSlice>,
    ) -> Result<(Vec<DmaBuffer>, CmbHeld), NvmeError> {
        let mut pages = Vec::new();
        let mut held = CmbHeld::default();
        if let Some(d) = data {
            held.data = self.push_write_data(hw, cmd, d)?;
            let start = match held.data {
                Some((_, buf)) => Some(buf.bus_addr),
                None => d.buf.bus_addr().raw().checked_add(d.offset as u64),
            };
            match self.prps(hw, start, d.len, &mut pages, &mut held) {
                Ok((prp1, prp2)) => {
                    cmd.prp1 = prp1;
                    cmd.prp2 = prp2;
                }
                Err(e) => {
                    self.recycle(pages);
                    self.cmb.give_back(held);
                    return Err(e);
                }
            }
        }
        cmd.cid = cid;
        let at = self.sq_tail as usize * SQE_BYTES;
        let written = match &self.sq {
            SqRing::Host(b) => b.write_at(at, &cmd.to_bytes()).map_err(NvmeError::from),
            SqRing::Cmb {
                bar, offset, flush, ..
            } => {
                let bar_at = offset + at as u64;
                let mut w = hw.fun.bar_write(*bar, bar_at, &cmd.to_bytes());
                if *flush && w.is_ok() {
                    // A read does not pass the posted writes before it: once it answers, the
                    // entry is in the buffer.
                    let mut b = [0u8; 4];
                    w = hw.fun.bar_read(*bar, bar_at, &mut b);
                }
                w.map_err(NvmeError::from)
            }
        };
        if let Err(e) = written {
            self.recycle(pages);
            self.cmb.give_back(held);
            return Err(e);
        }
        self.sq_tail = (self.sq_tail + 1) % self.entries;
        Ok((pages, held))
    }

    /// A write on a queue with CMB data buffers, of at most [`CMB_DATA_BYTES`] (or of at most
    /// a bulk buffer): its data are copied into a free buffer through the BAR (posted writes,
    /// ahead of the command), so the device reads them from itself. `None` (host PRPs) for
    /// anything else, and when no buffer is free.
    fn push_write_data(
        &mut self,
        hw: &Hw,
        cmd: &Command,
        d: &DmaSlice,
    ) -> Result<Option<(CmbPool, CmbBuf)>, NvmeError> {
        let Some(bar) = self.cmb_bar() else {
            return Ok(None);
        };
        if cmd.opcode != crate::cmd::nvm::WRITE {
            return Ok(None);
        }
        let len = d.len as u64;
        let taken = if len <= CMB_DATA_BYTES {
            self.cmb.small.pop().map(|b| (CmbPool::Small, b))
        } else {
            None
        };
        let taken = taken.or_else(|| {
            (len <= self.cmb.bulk_bytes)
                .then(|| self.cmb.bulk.pop().map(|b| (CmbPool::Bulk, b)))
                .flatten()
        });
        let Some((pool, buf)) = taken else {
            return Ok(None);
        };
        self.staging.resize(d.len, 0);
        let bytes = self.staging.as_mut_slice();
        let pushed = d
            .buf
            .read_at(d.offset, bytes)
            .map_err(NvmeError::from)
            .and_then(|()| Ok(hw.fun.bar_write(bar, buf.bar_offset, bytes)?));
        match pushed {
            Ok(()) => Ok(Some((pool, buf))),
            Err(e) => {
                self.cmb.give_back(CmbHeld {
                    data: Some((pool, buf)),
                    list: None,
                });
                Err(e)
            }
        }
    }

    /// PRP1 and PRP2 for `len` bytes at bus address `start`, building list pages when more
    /// than two are needed: one list page in the CMB (into `held`) when the queue has one
    /// free and the list fits it, else host pages (into `pages`).
    fn prps(
        &mut self,
        hw: &Hw,
        start: Option<u64>,
        len: usize,
        pages: &mut Vec<DmaBuffer>,
        held: &mut CmbHeld,
    ) -> Result<(u64, u64), NvmeError> {
        let page = regs::HOST_PAGE_BYTES as u64;
        let layout = start.and_then(|s| prp::layout(s, len as u64, page));
        match layout {
            None => Err(NvmeError::InvalidRequest(format!(
                "{len} bytes at bus address {start:?} cannot be described by PRPs"
            ))),
            Some(PrpLayout::One { prp1 }) => Ok((prp1, 0)),
            Some(PrpLayout::Two { prp1, prp2 }) => Ok((prp1, prp2)),
            Some(PrpLayout::List {
                prp1,
                pages: entries,
            }) => {
                let per_page = regs::HOST_PAGE_BYTES / 8;
                if let Some(list) = self.push_list(hw, &entries, per_page)? {
                    held.list = Some(list);
                    return Ok((prp1, list.bus_addr));
                }
                let chunks = prp::list_pages(&entries, per_page);
                for _ in 0..chunks.len() {
                    let p = match self.prp_cache.pop() {
                        Some(p) => p,
                        None => hw.fun.dma_alloc(regs::HOST_PAGE_BYTES)?,
                    };
                    pages.push(p);
                }
                let mut bytes = Vec::with_capacity(regs::HOST_PAGE_BYTES);
                for (i, (chunk, list)) in chunks.iter().zip(pages.iter()).enumerate() {
                    let next = pages.get(i + 1).map(|p| p.bus_addr().raw());
                    prp::encode_list(chunk, next, &mut bytes);
                    list.write_at(0, &bytes)?;
                }
                let first = pages.first().map(|p| p.bus_addr().raw()).unwrap_or(0);
                Ok((prp1, first))
            }
        }
    }

    /// A PRP list of one page pushed into a free CMB list page through the BAR (a posted
    /// write, ahead of the command); `None` when the queue has none free or the list needs
    /// more than a page.
    fn push_list(
        &mut self,
        hw: &Hw,
        entries: &[u64],
        per_page: usize,
    ) -> Result<Option<CmbBuf>, NvmeError> {
        let Some(bar) = self.cmb_bar() else {
            return Ok(None);
        };
        if entries.len() > per_page {
            return Ok(None);
        }
        let Some(list) = self.cmb.lists.pop() else {
            return Ok(None);
        };
        prp::encode_list(entries, None, &mut self.staging);
        match hw.fun.bar_write(bar, list.bar_offset, &self.staging) {
            Ok(()) => Ok(Some(list)),
            Err(e) => {
                self.cmb.lists.push(list);
                Err(e.into())
            }
        }
    }

    fn recycle(&mut self, pages: Vec<DmaBuffer>) {
        for p in pages {
            if self.prp_cache.len() < PRP_PAGE_CACHE {
                self.prp_cache.push(p);
            }
        }
    }

    /// Consumes every posted completion entry; returns how many completions it added to `out`.
    fn drain(&mut self, hw: &Hw, out: &mut Vec<Completion>) -> Result<usize, NvmeError> {
        let mut consumed = 0usize;
        let mut added = 0usize;
        let mut unknown = None;
        loop {
            let at = self.cq_head as usize * CQE_BYTES;
            // The acquire load of dword 3 (phase tag) orders the reads of the other dwords.
            let dw3 = self.cq.load_u32(at + 12)?;
            if !CompletionEntry::dw3_has_phase(dw3, self.phase) {
                break;
            }
            let dw0 = self.cq.load_u32(at)?;
            let dw2 = self.cq.load_u32(at + 8)?;
            let entry = CompletionEntry::decode([dw0, 0, dw2, dw3]);
            self.cq_head += 1;
            if self.cq_head == self.entries {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            consumed += 1;
            let slot = self
                .slots
                .get_mut(usize::from(entry.cid))
                .filter(|s| s.busy);
            match slot {
                Some(slot) if entry.sq_id == self.qid => {
                    let taken = std::mem::take(slot);
                    self.free.push(entry.cid);
                    out.push(Completion {
                        tag: taken.tag,
                        opcode: taken.opcode,
                        status: entry.status,
                        dw0: entry.dw0,
                    });
                    added += 1;
                    self.recycle(taken.prp_pages);
                    self.cmb.give_back(taken.cmb);
                }
                _ => {
                    unknown.get_or_insert(entry.cid);
                }
            }
        }
        // The head is reported at once only when half the ring is consumed unreported;
        // otherwise it leaves with the next doorbell the driver writes anyway.
        if consumed > 0 && self.unreported() >= self.entries / 2 {
            self.report_head(hw)?;
        }
        if let Some(cid) = unknown {
            self.broken = true;
            return Err(NvmeError::CompletionForUnknownCommand { qid: self.qid, cid });
        }
        Ok(added)
    }

    /// Completion entries consumed since the head was last written to the doorbell.
    fn unreported(&self) -> u32 {
        (self.cq_head + self.entries - self.cq_reported) % self.entries
    }

    /// Writes the completion queue's head doorbell if entries were consumed since it was last
    /// written.
    ///
    /// A consumed entry frees its slot only for the device's next post, and the device needs
    /// to know of it only when the queue would otherwise look full to it. So the head is not
    /// written as soon as entries are consumed: it goes with the next submission's tail
    /// doorbell ([`Self::ring`], in the same batch of posted writes: one message on a fabric
    /// where each costs a system call, where it would be two), or before the driver waits for
    /// more completions ([`Self::reap`]), or at once when half the ring is consumed
    /// unreported. Whenever the driver waits, the device has been told of every slot it
    /// freed, so a device that finds the queue full is never waited for in vain.
    fn report_head(&mut self, hw: &Hw) -> Result<(), NvmeError> {
        if self.cq_reported == self.cq_head {
            return Ok(());
        }
        hw.write32(self.cq_doorbell, self.cq_head)?;
        self.cq_reported = self.cq_head;
        Ok(())
    }

    /// Collects completions into `out` until at least `min` arrived (or nothing is
    /// outstanding), waiting at most `timeout`. A timeout leaves the queue broken: the commands
    /// still outstanding keep their buffers until the controller is reset.
    pub fn reap(
        &mut self,
        hw: &Hw,
        out: &mut Vec<Completion>,
        min: usize,
        timeout: Duration,
    ) -> Result<usize, NvmeError> {
        let result = self.reap_inner(hw, out, min, timeout);
        if result.is_err() {
            self.broken = true;
        }
        result
    }

    fn reap_inner(
        &mut self,
        hw: &Hw,
        out: &mut Vec<Completion>,
        min: usize,
        timeout: Duration,
    ) -> Result<usize, NvmeError> {
        // Entries placed without a doorbell are handed over before waiting for them.
        self.ring(hw)?;
        let start = Instant::now();
        let deadline = start + timeout;
        let mut got = self.drain(hw, out)?;
        let mut last_progress = start;
        let mut last_check = start;
        while got < min && self.in_flight() > 0 {
            // Before waiting, the device learns of every slot consumed so far.
            self.report_head(hw)?;
            let now = Instant::now();
            if now >= deadline {
                hw.check_status()?;
                return Err(NvmeError::Timeout {
                    what: "command completion",
                    after: timeout,
                });
            }
            match (hw.mode, self.vector) {
                (CompletionMode::Interrupt, Some(vector)) => {
                    let slice = (deadline - now).min(INTERRUPT_SLICE);
                    if !hw.fun.wait_interrupt(vector, slice)? {
                        hw.check_status()?;
                    }
                }
                _ => {
                    if now.duration_since(last_progress) < POLL_SPIN_TIME {
                        std::hint::spin_loop();
                    } else {
                        std::thread::yield_now();
                    }
                    if now.duration_since(last_check) >= POLL_STATUS_INTERVAL {
                        last_check = now;
                        hw.check_status()?;
                    }
                }
            }
            let n = self.drain(hw, out)?;
            if n > 0 {
                last_progress = Instant::now();
            }
            got += n;
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    //! Queue mechanics against a scripted function: the tests play the controller by writing
    //! completion entries into the CQ memory themselves.

    use std::sync::atomic::{AtomicU32, AtomicU64};
    use std::sync::Mutex;

    use devlend_pci::{
        AccessSize, BarAccess, BusAddr, ConfigAccess, DmaAlloc, DmaRemap, FunctionError,
        Interrupts, MemSpan, SharedMemory,
    };
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::cmd::nvm;

    const BUS_BASE: u64 = 0x10_0000_0000;

    struct Scripted {
        mem: Arc<SharedMemory>,
        next: AtomicU64,
        csts: AtomicU32,
        writes: Mutex<Vec<(u64, u32)>>,
    }

    impl Scripted {
        fn new() -> Arc<Self> {
            Arc::new(Self {
                mem: Arc::new(SharedMemory::new("scripted", 4 << 20).unwrap()),
                next: AtomicU64::new(0),
                csts: AtomicU32::new(regs::CSTS_RDY),
                writes: Mutex::new(Vec::new()),
            })
        }

        fn last_write(&self, offset: u64) -> Option<u32> {
            let w = self.writes.lock().unwrap();
            w.iter().rev().find(|(o, _)| *o == offset).map(|(_, v)| *v)
        }
    }

    impl ConfigAccess for Scripted {
        fn config_read(&self, _: u16, _: AccessSize) -> Result<u32, FunctionError> {
            Ok(0)
        }
        fn config_write(&self, _: u16, _: AccessSize, _: u32) -> Result<(), FunctionError> {
            Ok(())
        }
    }

    impl BarAccess for Scripted {
        fn bar_read(&self, _: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), FunctionError> {
            let v = if offset == regs::REG_CSTS {
                self.csts.load(std::sync::atomic::Ordering::SeqCst)
            } else {
                0
            };
            for (d, s) in data.iter_mut().zip(v.to_le_bytes()) {
                *d = s;
            }
            Ok(())
        }
        fn bar_write(&self, _: BarIndex, offset: u64, data: &[u8]) -> Result<(), FunctionError> {
            let mut b = [0u8; 4];
            b.copy_from_slice(&data[..4]);
            self.writes
                .lock()
                .unwrap()
                .push((offset, u32::from_le_bytes(b)));
            Ok(())
        }
    }

    impl DmaAlloc for Scripted {
        fn dma_alloc(&self, len: usize) -> Result<DmaBuffer, FunctionError> {
            let len = len.next_multiple_of(4096) as u64;
            let off = self
                .next
                .fetch_add(len, std::sync::atomic::Ordering::SeqCst);
            let span = MemSpan::new(self.mem.clone(), off, len)?;
            Ok(DmaBuffer::new(span, BusAddr(BUS_BASE + off), None))
        }
    }

    impl DmaRemap for Scripted {
        fn dma_map(&self, _: BusAddr, _: MemSpan, _: bool) -> Result<(), FunctionError> {
            Ok(())
        }
        fn dma_unmap(&self, _: BusAddr, _: u64) -> Result<(), FunctionError> {
            Ok(())
        }
    }

    impl Interrupts for Scripted {
        fn interrupt_vectors(&self) -> u16 {
            1
        }
        fn wait_interrupt(&self, _: u16, timeout: Duration) -> Result<bool, FunctionError> {
            std::thread::sleep(timeout.min(Duration::from_millis(1)));
            Ok(false)
        }
        fn set_interrupt_eventfd(
            &self,
            _: u16,
            _: Option<Arc<EventFd>>,
        ) -> Result<(), FunctionError> {
            Ok(())
        }
    }

    impl PciFunction for Scripted {
        fn describe(&self) -> String {
            "scripted".into()
        }
    }

    fn hw(f: &Arc<Scripted>, mode: CompletionMode) -> Hw {
        Hw {
            fun: f.clone(),
            bar: BarIndex::new(0).unwrap(),
            caps: Capabilities::decode(0),
            mode,
        }
    }

    /// Plays the controller: posts a completion for `cid` at CQ slot `slot`.
    fn post(q: &QueuePair, slot: u32, cid: u16, phase: bool, status_field: u16) {
        let at = slot as usize * CQE_BYTES;
        q.cq.store_u32(at, 0xabc).unwrap();
        q.cq.store_u32(at + 8, u32::from(q.qid) << 16).unwrap();
        let dw3 = u32::from(cid) | (u32::from(phase) << 16) | (u32::from(status_field) << 17);
        q.cq.store_u32(at + 12, dw3).unwrap();
    }

    fn sqe(q: &QueuePair, slot: usize) -> [u8; SQE_BYTES] {
        let mut b = [0u8; SQE_BYTES];
        match &q.sq {
            SqRing::Host(sq) => sq.read_at(slot * SQE_BYTES, &mut b).unwrap(),
            SqRing::Cmb { .. } => panic!("these tests keep the queue in host memory"),
        }
        b
    }

    #[test]
    fn submit_complete_and_wrap_the_phase() {
        let f = Scripted::new();
        let hw = hw(&f, CompletionMode::Polling);
        let mut q = QueuePair::new(&hw, 1, 2, None).unwrap();
        assert_eq!(q.capacity(), 1);
        let mut out = Vec::new();
        for round in 0..5u32 {
            q.submit(
                &hw,
                Command::new(nvm::FLUSH, 1),
                None,
                100 + u64::from(round),
            )
            .unwrap();
            let full = q.submit(&hw, Command::new(nvm::FLUSH, 1), None, 0);
            assert!(matches!(full, Err(NvmeError::QueueFull { .. })));
            // Tail doorbell of SQ 1 with the stride of 4 bytes.
            assert_eq!(f.last_write(0x1008), Some((round + 1) % 2));
            let cid = u16::from_le_bytes(sqe(&q, (round % 2) as usize)[2..4].try_into().unwrap());
            // Phase is 1 on the first pass through the ring, 0 on the second, ...
            post(&q, round % 2, cid, (round / 2) % 2 == 0, 0);
            out.clear();
            let n = q.reap(&hw, &mut out, 1, Duration::from_secs(5)).unwrap();
            assert_eq!(n, 1);
            assert_eq!(out[0].tag, 100 + u64::from(round));
            assert_eq!(out[0].dw0, 0xabc);
            assert!(out[0].status.is_success());
            // Head doorbell of CQ 1.
            assert_eq!(f.last_write(0x100c), Some((round + 1) % 2));
            assert_eq!(q.in_flight(), 0);
        }
    }

    #[test]
    fn deferred_entries_go_with_one_doorbell_write() {
        let f = Scripted::new();
        let hw = hw(&f, CompletionMode::Polling);
        let mut q = QueuePair::new(&hw, 1, 8, None).unwrap();
        let tail_writes = |f: &Scripted| {
            f.writes
                .lock()
                .unwrap()
                .iter()
                .filter(|(o, _)| *o == 0x1008)
                .count()
        };
        for tag in 0..3 {
            q.submit_deferred(&hw, Command::new(nvm::FLUSH, 1), None, tag)
                .unwrap();
        }
        // Placed, not handed over: no doorbell yet.
        assert_eq!(tail_writes(&f), 0);
        assert_eq!(q.in_flight(), 3);
        q.ring(&hw).unwrap();
        assert_eq!((tail_writes(&f), f.last_write(0x1008)), (1, Some(3)));
        // Nothing new: no second write.
        q.ring(&hw).unwrap();
        assert_eq!(tail_writes(&f), 1);

        // A reap hands over what was deferred before it waits.
        q.submit_deferred(&hw, Command::new(nvm::FLUSH, 1), None, 3)
            .unwrap();
        for (slot, cid) in (0..4u32).zip([0u16, 1, 2, 3]) {
            let got = u16::from_le_bytes(sqe(&q, slot as usize)[2..4].try_into().unwrap());
            assert_eq!(got, cid);
            post(&q, slot, got, true, 0);
        }
        let mut out = Vec::new();
        assert_eq!(q.reap(&hw, &mut out, 4, Duration::from_secs(5)).unwrap(), 4);
        assert_eq!((tail_writes(&f), f.last_write(0x1008)), (2, Some(4)));

        // Deferred data of 128 KiB or more goes at once (as Linux flushes such a plug).
        let small = DmaSlice::whole(Arc::new(f.dma_alloc(64 << 10).unwrap()));
        q.submit_deferred(&hw, Command::new(nvm::READ, 1), Some(&small), 4)
            .unwrap();
        assert_eq!(tail_writes(&f), 2);
        q.submit_deferred(&hw, Command::new(nvm::READ, 1), Some(&small), 5)
            .unwrap();
        assert_eq!((tail_writes(&f), f.last_write(0x1008)), (3, Some(6)));
    }

    #[test]
    fn the_cq_head_goes_with_the_next_doorbell_or_before_a_wait() {
        let f = Scripted::new();
        let hw = hw(&f, CompletionMode::Polling);
        let mut q = QueuePair::new(&hw, 1, 8, None).unwrap();
        // (SQ 1 tail, CQ 1 head) doorbell writes, in order.
        let doorbells = |f: &Scripted| -> Vec<(u64, u32)> {
            let w = f.writes.lock().unwrap();
            w.iter()
                .filter(|(o, _)| *o == 0x1008 || *o == 0x100c)
                .copied()
                .collect()
        };
        let mut out = Vec::new();
        q.submit(&hw, Command::new(nvm::FLUSH, 1), None, 0).unwrap();
        q.submit(&hw, Command::new(nvm::FLUSH, 1), None, 1).unwrap();
        post(&q, 0, 0, true, 0);
        assert_eq!(q.reap(&hw, &mut out, 1, Duration::from_secs(5)).unwrap(), 1);
        // Consumed, not yet reported: the reap that got what it wanted did not wait.
        assert_eq!(doorbells(&f), [(0x1008, 1), (0x1008, 2)]);

        // The next submission reports it, just before its own doorbell.
        q.submit(&hw, Command::new(nvm::FLUSH, 1), None, 2).unwrap();
        assert_eq!(
            doorbells(&f),
            [(0x1008, 1), (0x1008, 2), (0x100c, 1), (0x1008, 3)]
        );

        // A reap that must wait reports what it consumed first.
        post(&q, 1, 1, true, 0);
        out.clear();
        let r = q.reap(&hw, &mut out, 2, Duration::from_millis(50));
        assert!(matches!(r, Err(NvmeError::Timeout { .. })), "{r:?}");
        assert_eq!(out.len(), 1);
        assert_eq!(doorbells(&f).last(), Some(&(0x100c, 2)));
    }

    #[test]
    fn half_a_ring_consumed_is_reported_at_once() {
        let f = Scripted::new();
        let hw = hw(&f, CompletionMode::Polling);
        let mut q = QueuePair::new(&hw, 1, 8, None).unwrap();
        let head_writes = |f: &Scripted| -> Vec<u32> {
            let w = f.writes.lock().unwrap();
            w.iter()
                .filter(|(o, _)| *o == 0x100c)
                .map(|(_, v)| *v)
                .collect()
        };
        let mut out = Vec::new();
        // `n` commands handed over with one doorbell, completed, and reaped at once.
        let mut round = |q: &mut QueuePair, first: usize, n: usize| {
            for _ in 0..n {
                q.submit_deferred(&hw, Command::new(nvm::FLUSH, 1), None, 0)
                    .unwrap();
            }
            q.ring(&hw).unwrap();
            for slot in first..first + n {
                let cid = u16::from_le_bytes(sqe(q, slot)[2..4].try_into().unwrap());
                post(q, slot as u32, cid, true, 0);
            }
            out.clear();
            assert_eq!(q.reap(&hw, &mut out, n, Duration::from_secs(5)).unwrap(), n);
        };
        // 3 of 8 entries consumed: held for the next doorbell.
        round(&mut q, 0, 3);
        assert!(head_writes(&f).is_empty());
        // The next round's doorbell reports them; its 4 make half the ring: reported at once.
        round(&mut q, 3, 4);
        assert_eq!(head_writes(&f), [3, 7]);
    }

    #[test]
    fn a_completion_for_an_unknown_command_breaks_the_queue() {
        let f = Scripted::new();
        let hw = hw(&f, CompletionMode::Polling);
        let mut q = QueuePair::new(&hw, 1, 8, None).unwrap();
        q.submit(&hw, Command::new(nvm::FLUSH, 1), None, 1).unwrap();
        post(&q, 0, 999, true, 0);
        let r = q.reap(&hw, &mut Vec::new(), 1, Duration::from_secs(5));
        assert!(matches!(
            r,
            Err(NvmeError::CompletionForUnknownCommand { cid: 999, .. })
        ));
        assert!(q.is_broken());
        let again = q.submit(&hw, Command::new(nvm::FLUSH, 1), None, 2);
        assert!(matches!(again, Err(NvmeError::QueueBroken { qid: 1 })));
    }

    #[test]
    fn waits_end_with_timeout_removal_or_fatal_status() {
        for mode in [CompletionMode::Polling, CompletionMode::Interrupt] {
            let f = Scripted::new();
            let hw = hw(&f, mode);
            let vector = (mode == CompletionMode::Interrupt).then_some(0);
            let mut q = QueuePair::new(&hw, 1, 8, vector).unwrap();
            q.submit(&hw, Command::new(nvm::FLUSH, 1), None, 1).unwrap();
            let r = q.reap(&hw, &mut Vec::new(), 1, Duration::from_millis(30));
            assert!(
                matches!(r, Err(NvmeError::Timeout { .. })),
                "{mode:?}: {r:?}"
            );

            let mut q = QueuePair::new(&hw, 2, 8, vector).unwrap();
            q.submit(&hw, Command::new(nvm::FLUSH, 1), None, 1).unwrap();
            f.csts.store(
                regs::CSTS_RDY | regs::CSTS_CFS,
                std::sync::atomic::Ordering::SeqCst,
            );
            let r = q.reap(&hw, &mut Vec::new(), 1, Duration::from_secs(30));
            assert!(
                matches!(r, Err(NvmeError::ControllerFatal)),
                "{mode:?}: {r:?}"
            );

            let mut q = QueuePair::new(&hw, 3, 8, vector).unwrap();
            q.submit(&hw, Command::new(nvm::FLUSH, 1), None, 1).unwrap();
            f.csts.store(u32::MAX, std::sync::atomic::Ordering::SeqCst);
            let r = q.reap(&hw, &mut Vec::new(), 1, Duration::from_secs(30));
            assert!(
                matches!(r, Err(NvmeError::DeviceRemoved(_))),
                "{mode:?}: {r:?}"
            );
        }
    }

    #[test]
    fn prp_lists_are_written_and_chained() {
        let f = Scripted::new();
        let hw = hw(&f, CompletionMode::Polling);
        let mut q = QueuePair::new(&hw, 1, 8, None).unwrap();
        // 600 pages from an offset of 512 bytes: PRP1 + 600 list entries over two list pages.
        let buf = Arc::new(f.dma_alloc(601 * 4096).unwrap());
        let base = buf.bus_addr().raw();
        let data = DmaSlice::new(buf, 512, 600 * 4096).unwrap();
        q.submit(&hw, Command::new(nvm::READ, 1), Some(&data), 7)
            .unwrap();
        let e = sqe(&q, 0);
        let prp1 = u64::from_le_bytes(e[24..32].try_into().unwrap());
        let prp2 = u64::from_le_bytes(e[32..40].try_into().unwrap());
        assert_eq!(prp1, base + 512);
        let read_list = |bus: u64| {
            let mut b = vec![0u8; 4096];
            f.mem.read_at(bus - BUS_BASE, &mut b).unwrap();
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
                .collect::<Vec<u64>>()
        };
        let first = read_list(prp2);
        let want: Vec<u64> = (1..=600).map(|i| base + i * 4096).collect();
        assert_eq!(&first[..511], &want[..511]);
        let second = read_list(first[511]);
        assert_eq!(&second[..89], &want[511..]);
        // Completing the command returns its list page to the cache for the next one.
        post(&q, 0, 0, true, 0);
        q.reap(&hw, &mut Vec::new(), 1, Duration::from_secs(5))
            .unwrap();
        assert_eq!(q.prp_cache.len(), 2);
        // A slice that is not dword-aligned is refused before anything is queued.
        let buf = Arc::new(f.dma_alloc(4096).unwrap());
        assert!(DmaSlice::new(buf.clone(), 2, 8).is_err());
        assert!(DmaSlice::new(buf.clone(), 0, 4097).is_err());
        assert!(DmaSlice::new(buf, 0, 0).is_err());
    }

    #[test]
    fn error_statuses_reach_the_caller() {
        let f = Scripted::new();
        let hw = hw(&f, CompletionMode::Polling);
        let mut q = QueuePair::new(&hw, 1, 8, None).unwrap();
        q.submit(&hw, Command::new(nvm::READ, 1), None, 5).unwrap();
        post(&q, 0, 0, true, 0x80 | (1 << 14));
        let mut out = Vec::new();
        q.reap(&hw, &mut out, 1, Duration::from_secs(5)).unwrap();
        assert!(out[0].status.is_lba_out_of_range());
        assert!(out[0].status.dnr);
        assert_eq!(out[0].opcode, nvm::READ);
    }
}
