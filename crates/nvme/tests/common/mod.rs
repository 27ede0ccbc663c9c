//! A small driver-side harness: host memory in a SharedMemory behind a mock DMA port, admin
//! and I/O queues built there, commands submitted through BAR writes, completions read back.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use devlend_memory::{BusAddr, MemSpan, SharedMemory};
use devlend_nvme::command::{admin_opcode, nvm_opcode};
use devlend_nvme::regs::*;
use devlend_nvme::{Command, Completion, NvmeConfig, NvmeDevice, Status};
use devlend_pci::{
    AccessSize, BarIndex, DmaAccess, DmaError, DmaPort, DmaSpanResult, InterruptSink, PciDevice,
};

/// Bus address of the first byte of host memory.
pub const HOST_BASE: u64 = 0x1_0000_0000;
/// Host memory size.
pub const HOST_LEN: usize = 8 << 20;
pub const ADMIN_SQ: u64 = 0x0000;
pub const ADMIN_CQ: u64 = 0x1000;
pub const DATA: u64 = 0x10_0000;
pub const PAGE: u64 = 4096;

/// DMA straight into a SharedMemory window at HOST_BASE.
pub struct MemPort {
    pub mem: Arc<SharedMemory>,
    /// Hand out direct spans (zero copy) or force the bounce path.
    pub direct: bool,
}

impl MemPort {
    fn offset(&self, addr: BusAddr, len: u64) -> Result<u64, DmaError> {
        let off = addr
            .0
            .checked_sub(HOST_BASE)
            .ok_or(DmaError::Unmapped { addr, len })?;
        match off.checked_add(len) {
            Some(end) if end <= self.mem.len() as u64 => Ok(off),
            _ => Err(DmaError::Unmapped { addr, len }),
        }
    }
}

impl DmaPort for MemPort {
    fn dma_read(&self, addr: BusAddr, buf: &mut [u8]) -> Result<(), DmaError> {
        let off = self.offset(addr, buf.len() as u64)?;
        Ok(self.mem.read_at(off, buf)?)
    }
    fn dma_write(&self, addr: BusAddr, data: &[u8]) -> Result<(), DmaError> {
        let off = self.offset(addr, data.len() as u64)?;
        Ok(self.mem.write_at(off, data)?)
    }
    fn dma_span(&self, addr: BusAddr, len: u64, _access: DmaAccess) -> DmaSpanResult {
        let off = self.offset(addr, len)?;
        if !self.direct {
            return Ok(None);
        }
        Ok(Some(MemSpan::new(self.mem.clone(), off, len)?))
    }
}

/// A clock of events, shared by every test of a binary: a test's test doubles stamp what they
/// see with it to tell the order across threads.
pub static EVENTS: AtomicU64 = AtomicU64::new(0);

/// The next stamp of [`EVENTS`].
pub fn stamp() -> u64 {
    EVENTS.fetch_add(1, Ordering::SeqCst)
}

/// Counts interrupts per vector, and stamps each ([`stamp`]).
#[derive(Default)]
pub struct Irqs {
    pub counts: Mutex<Vec<u64>>,
    pub cv: Condvar,
    /// (vector, stamp) of every signal, in order.
    pub signals: Mutex<Vec<(u16, u64)>>,
}

impl InterruptSink for Irqs {
    fn signal(&self, vector: u16) {
        self.signals.lock().unwrap().push((vector, stamp()));
        let mut c = self.counts.lock().unwrap();
        let v = usize::from(vector);
        if c.len() <= v {
            c.resize(v + 1, 0);
        }
        c[v] += 1;
        self.cv.notify_all();
    }
}

impl Irqs {
    pub fn count(&self, vector: u16) -> u64 {
        self.counts
            .lock()
            .unwrap()
            .get(usize::from(vector))
            .copied()
            .unwrap_or(0)
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

/// A temporary image path, removed on drop.
pub struct TempImage(pub PathBuf);

impl TempImage {
    pub fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("devlend-nvme-test-{}-{n}.img", std::process::id()));
        let _ = std::fs::remove_file(&p);
        TempImage(p)
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub struct QueueState {
    pub sq_base: u64,
    pub cq_base: u64,
    pub entries: u32,
    pub cq_entries: u32,
    pub sq_tail: u32,
    pub cq_head: u32,
    pub phase: bool,
}

pub struct Harness {
    pub dev: Arc<NvmeDevice>,
    pub mem: Arc<SharedMemory>,
    pub irqs: Arc<Irqs>,
    pub image: TempImage,
    pub cfg: NvmeConfig,
    pub queues: Vec<Option<QueueState>>,
    pub next_cid: u16,
}

pub fn bar0() -> BarIndex {
    BarIndex::new(0).unwrap()
}

pub const IMAGE_BYTES: u64 = 4 << 20;

impl Harness {
    /// A device with default config (image created, 4 MiB), PCI enabled, controller not.
    pub fn new() -> Harness {
        Harness::with(|_| {}, true)
    }

    pub fn with(tweak: impl FnOnce(&mut NvmeConfig), direct: bool) -> Harness {
        Harness::with_port(tweak, direct, |p| p)
    }

    /// Like [`Harness::with`], with the DMA port wrapped by `wrap` (a test double in front).
    pub fn with_port(
        tweak: impl FnOnce(&mut NvmeConfig),
        direct: bool,
        wrap: impl FnOnce(Arc<dyn DmaPort>) -> Arc<dyn DmaPort>,
    ) -> Harness {
        let image = TempImage::new();
        let mut cfg = NvmeConfig::new(&image.0);
        cfg.create_size = Some(IMAGE_BYTES);
        cfg.max_io_queue_pairs = 4;
        tweak(&mut cfg);
        let mem = Arc::new(SharedMemory::new("nvme-test", HOST_LEN).unwrap());
        let irqs = Arc::new(Irqs::default());
        let port = wrap(Arc::new(MemPort {
            mem: mem.clone(),
            direct,
        }));
        let dev = NvmeDevice::new(cfg.clone(), port, irqs.clone()).unwrap();
        let h = Harness {
            dev,
            mem,
            irqs,
            image,
            cfg,
            queues: (0..8).map(|_| None).collect(),
            next_cid: 1,
        };
        h.pci_enable();
        h
    }

    /// Memory Space + Bus Master, MSI-X enabled with every vector unmasked.
    pub fn pci_enable(&self) {
        self.dev.config_write(0x04, AccessSize::Word, 0x6);
        let mut cap = self.dev.config_read(0x34, AccessSize::Byte) as u16;
        while cap != 0 {
            let id = self.dev.config_read(cap, AccessSize::Byte);
            if id == 0x11 {
                self.dev.config_write(cap + 2, AccessSize::Word, 1 << 15);
                break;
            }
            cap = self.dev.config_read(cap + 1, AccessSize::Byte) as u16;
        }
        let bar4 = BarIndex::new(4).unwrap();
        for v in 0..self.dev.msix_vectors() {
            self.dev
                .bar_write(bar4, u64::from(v) * 16 + 12, &0u32.to_le_bytes());
        }
    }

    pub fn read32(&self, off: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(bar0(), off, &mut b);
        u32::from_le_bytes(b)
    }
    pub fn read64(&self, off: u64) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(bar0(), off, &mut b);
        u64::from_le_bytes(b)
    }
    pub fn write32(&self, off: u64, v: u32) {
        self.dev.bar_write(bar0(), off, &v.to_le_bytes());
    }
    pub fn write64(&self, off: u64, v: u64) {
        self.dev.bar_write(bar0(), off, &v.to_le_bytes());
    }

    pub fn wait_csts(&self, mask: u32, want: u32) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.read32(REG_CSTS) & mask == want {
                return true;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        false
    }

    pub const CC_READY: u32 = CC_EN | (6 << CC_IOSQES_SHIFT) | (4 << CC_IOCQES_SHIFT);

    /// Programs a 64-entry admin SQ and 16-entry... CQ and enables the controller.
    pub fn enable(&mut self) {
        self.enable_with(64, 64);
    }

    pub fn enable_with(&mut self, sq_entries: u32, cq_entries: u32) {
        self.mem.fill(0, HOST_LEN, 0).unwrap();
        self.write32(REG_AQA, ((cq_entries - 1) << 16) | (sq_entries - 1));
        self.write64(REG_ASQ, HOST_BASE + ADMIN_SQ);
        self.write64(REG_ACQ, HOST_BASE + ADMIN_CQ);
        self.write32(REG_CC, Self::CC_READY);
        assert!(self.wait_csts(CSTS_RDY, CSTS_RDY), "controller not ready");
        self.queues.iter_mut().for_each(|q| *q = None);
        self.queues[0] = Some(QueueState {
            sq_base: ADMIN_SQ,
            cq_base: ADMIN_CQ,
            entries: sq_entries,
            cq_entries,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
        });
    }

    pub fn cid(&mut self) -> u16 {
        self.next_cid = self.next_cid.wrapping_add(1).max(1);
        self.next_cid
    }

    /// Writes `cmd` at the SQ tail (without ringing).
    pub fn push(&mut self, qid: u16, mut cmd: Command) -> u16 {
        let cid = self.cid();
        cmd.cid = cid;
        let q = self.queues[usize::from(qid)].as_mut().unwrap();
        let at = q.sq_base + u64::from(q.sq_tail) * 64;
        self.mem.write_at(at, &cmd.to_bytes()).unwrap();
        q.sq_tail = (q.sq_tail + 1) % q.entries;
        cid
    }

    pub fn ring_sq(&self, qid: u16) {
        let q = self.queues[usize::from(qid)].as_ref().unwrap();
        self.write32(DOORBELL_BASE + 8 * u64::from(qid), q.sq_tail);
    }

    /// Next completion of queue `qid`, if one arrives within `timeout`.
    pub fn reap(&mut self, qid: u16, timeout: Duration) -> Option<Completion> {
        let deadline = Instant::now() + timeout;
        loop {
            let q = self.queues[usize::from(qid)].as_mut().unwrap();
            let at = q.cq_base + u64::from(q.cq_head) * 16;
            let dw3 = self.mem.load_u32(at + 12).unwrap();
            if (dw3 & (1 << 16) != 0) == q.phase {
                let mut b = [0u8; 16];
                self.mem.read_at(at, &mut b).unwrap();
                let (c, _) = Completion::from_bytes(&b);
                q.cq_head = (q.cq_head + 1) % q.cq_entries;
                if q.cq_head == 0 {
                    q.phase = !q.phase;
                }
                let head = q.cq_head;
                self.write32(DOORBELL_BASE + 8 * u64::from(qid) + 4, head);
                return Some(c);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::yield_now();
        }
    }

    pub fn submit(&mut self, qid: u16, cmd: Command) -> Completion {
        let cid = self.push(qid, cmd);
        self.ring_sq(qid);
        let c = self
            .reap(qid, Duration::from_secs(5))
            .expect("no completion");
        assert_eq!(c.cid, cid, "completion for another command");
        assert_eq!(c.sqid, qid);
        c
    }

    pub fn admin(&mut self, cmd: Command) -> Completion {
        self.submit(0, cmd)
    }

    pub fn status(&mut self, qid: u16, cmd: Command) -> Status {
        self.submit(qid, cmd).status
    }

    /// Creates I/O queue pair `qid` (SQ and CQ of `entries`) at fixed host addresses.
    pub fn create_io_pair(&mut self, qid: u16, entries: u32) {
        let cq_base = 0x4_0000 + u64::from(qid) * 0x2_0000;
        let sq_base = cq_base + 0x1_0000;
        // A fresh completion queue starts zeroed (no stale phase tags), as a driver makes it.
        self.mem.fill(cq_base, entries as usize * 16, 0).unwrap();
        let s = self.status(0, create_cq(qid, entries, cq_base, qid));
        assert_eq!(s, Status::SUCCESS, "create cq");
        let s = self.status(0, create_sq(qid, entries, sq_base, qid));
        assert_eq!(s, Status::SUCCESS, "create sq");
        self.queues[usize::from(qid)] = Some(QueueState {
            sq_base,
            cq_base,
            entries,
            cq_entries: entries,
            sq_tail: 0,
            cq_head: 0,
            phase: true,
        });
    }

    pub fn read_mem(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_at(off, &mut v).unwrap();
        v
    }

    pub fn image_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.image.0).unwrap()
    }

    /// A physical function with SR-IOV (`total` VFs, `namespaces`), PCI enabled.
    pub fn sriov(total: u16, namespaces: devlend_nvme::VfNamespaces) -> Harness {
        Harness::with(
            |c| {
                c.sriov = Some(devlend_nvme::SriovConfig {
                    total_vfs: total,
                    namespaces,
                })
            },
            true,
        )
    }

    /// Offset of the PF's SR-IOV capability (the first extended capability).
    pub const SRIOV: u16 = 0x100;

    /// Sets NumVFs = `n`, then VF Enable and VF MSE, through the PF's SR-IOV capability.
    pub fn enable_vfs(&self, n: u16) {
        self.dev
            .config_write(Self::SRIOV + 0x10, AccessSize::Word, u32::from(n));
        self.dev
            .config_write(Self::SRIOV + 0x08, AccessSize::Word, 0b1001);
    }

    /// VF `vf`'s secondary controller as a harness of its own: its own host memory (its own
    /// DMA domain) and interrupt sink; PCI enabled.
    pub fn virtual_function(&self, vf: u16) -> Harness {
        let mem = Arc::new(SharedMemory::new("nvme-test-vf", HOST_LEN).unwrap());
        let irqs = Arc::new(Irqs::default());
        let port = Arc::new(MemPort {
            mem: mem.clone(),
            direct: true,
        });
        let dev = self
            .dev
            .new_virtual_function(vf, port, irqs.clone())
            .unwrap();
        // The image is the PF's; this path is never created, so dropping it removes nothing.
        let image = TempImage(self.image.0.with_extension(format!("vf{vf}-unused")));
        let h = Harness {
            dev,
            mem,
            irqs,
            image,
            cfg: self.cfg.clone(),
            queues: (0..8).map(|_| None).collect(),
            next_cid: 1,
        };
        h.pci_enable();
        h
    }

    /// Writes CC.EN with admin queues programmed like [`Self::enable`] and waits for CFS.
    pub fn enable_expecting_cfs(&mut self) -> bool {
        self.mem.fill(0, HOST_LEN, 0).unwrap();
        self.write32(REG_AQA, (63 << 16) | 63);
        self.write64(REG_ASQ, HOST_BASE + ADMIN_SQ);
        self.write64(REG_ACQ, HOST_BASE + ADMIN_CQ);
        self.write32(REG_CC, Self::CC_READY);
        self.wait_csts(CSTS_CFS, CSTS_CFS) && self.read32(REG_CSTS) & CSTS_RDY == 0
    }
}

/// Virtualization Management: `action` for controller `cntlid`, resource type `rt`, `nr`
/// resources.
pub fn virt_mgmt(action: u8, rt: u8, cntlid: u16, nr: u16) -> Command {
    Command {
        opcode: admin_opcode::VIRTUALIZATION_MANAGEMENT,
        cdw: [
            u32::from(action) | (u32::from(rt) << 8) | (u32::from(cntlid) << 16),
            u32::from(nr),
            0,
            0,
            0,
            0,
        ],
        ..Command::default()
    }
}

pub fn cmd(opcode: u8) -> Command {
    Command {
        opcode,
        ..Command::default()
    }
}

/// A Create I/O Completion or Submission Queue command: queue `qid` of `entries` entries,
/// physically contiguous at `base` of host memory, CDW11 `cdw11`.
fn create_queue(opcode: u8, qid: u16, entries: u32, base: u64, cdw11: u32) -> Command {
    Command {
        opcode,
        prp1: HOST_BASE + base,
        cdw: [((entries - 1) << 16) | u32::from(qid), cdw11, 0, 0, 0, 0],
        ..Command::default()
    }
}

/// Create I/O CQ `qid` with interrupts enabled on `vector`.
pub fn create_cq(qid: u16, entries: u32, base: u64, vector: u16) -> Command {
    let cdw11 = (u32::from(vector) << 16) | 0b11;
    create_queue(admin_opcode::CREATE_IO_CQ, qid, entries, base, cdw11)
}

/// Create I/O SQ `qid` completing on CQ `cqid`.
pub fn create_sq(qid: u16, entries: u32, base: u64, cqid: u16) -> Command {
    let cdw11 = (u32::from(cqid) << 16) | 1;
    create_queue(admin_opcode::CREATE_IO_SQ, qid, entries, base, cdw11)
}

pub fn identify(cns: u8, nsid: u32, buf: u64) -> Command {
    Command {
        opcode: admin_opcode::IDENTIFY,
        nsid,
        prp1: HOST_BASE + buf,
        cdw: [u32::from(cns), 0, 0, 0, 0, 0],
        ..Command::default()
    }
}

/// Get Log Page `lid` of `numd` dwords (all namespaces) into host offset `DATA`.
pub fn log_page(lid: u8, numd: u32) -> Command {
    Command {
        opcode: admin_opcode::GET_LOG_PAGE,
        nsid: 0xffff_ffff,
        prp1: HOST_BASE + DATA,
        cdw: [((numd - 1) << 16) | u32::from(lid), 0, 0, 0, 0, 0],
        ..Command::default()
    }
}

/// Read/Write/Compare of `blocks` at `slba` with PRP1/PRP2 given as host offsets (PRP2
/// absolute when `prp2_abs`).
pub fn rw(opcode: u8, slba: u64, blocks: u32, prp1: u64, prp2: u64) -> Command {
    Command {
        opcode,
        nsid: 1,
        prp1,
        prp2,
        cdw: [slba as u32, (slba >> 32) as u32, blocks - 1, 0, 0, 0],
        ..Command::default()
    }
}

/// PRP2 for a buffer of at most two pages at host offset `buf` (0 when one page suffices).
pub fn prp2_for(buf: u64, len: u64) -> u64 {
    let first = PAGE - (buf % PAGE);
    if len <= first {
        0
    } else {
        HOST_BASE + (buf - buf % PAGE) + PAGE
    }
}

/// A Read of 512-byte blocks into a buffer of at most two pages.
pub fn read(slba: u64, blocks: u32, buf: u64) -> Command {
    let p2 = prp2_for(buf, u64::from(blocks) * 512);
    rw(nvm_opcode::READ, slba, blocks, HOST_BASE + buf, p2)
}

/// A Write of 512-byte blocks from a buffer of at most two pages.
pub fn write(slba: u64, blocks: u32, buf: u64) -> Command {
    let p2 = prp2_for(buf, u64::from(blocks) * 512);
    rw(nvm_opcode::WRITE, slba, blocks, HOST_BASE + buf, p2)
}

pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}
