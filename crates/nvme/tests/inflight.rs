//! Several commands in flight when DMA is a message (no direct mapping): a DMA port double
//! that holds reads of data buffers until the test releases them shows that a second command's
//! data read is issued while the first is still waiting, that Delete I/O SQ and a controller
//! reset wait for commands in flight, and that every completion is posted once with the right
//! phase and counted in the SMART log.

mod common;

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::*;
use devlend_memory::BusAddr;
use devlend_nvme::command::admin_opcode;
use devlend_nvme::lid;
use devlend_nvme::regs::{CSTS_RDY, REG_CC};
use devlend_nvme::{Command, Status};
use devlend_pci::{DmaAccess, DmaError, DmaPort, DmaSpanResult, PciDevice};

#[derive(Default)]
struct Gate {
    closed: bool,
    /// Bus addresses of the data reads issued so far (blocked or not).
    issued: Vec<u64>,
}

/// Holds DMA reads of the data area (`DATA` and above) while closed.
struct GatedPort {
    inner: Arc<dyn DmaPort>,
    gate: Mutex<Gate>,
    cv: Condvar,
}

impl GatedPort {
    fn new(inner: Arc<dyn DmaPort>) -> Arc<GatedPort> {
        Arc::new(GatedPort {
            inner,
            gate: Mutex::new(Gate::default()),
            cv: Condvar::new(),
        })
    }

    fn close(&self) {
        self.gate.lock().unwrap().closed = true;
    }

    fn release(&self) {
        self.gate.lock().unwrap().closed = false;
        self.cv.notify_all();
    }

    /// Waits until `n` data reads have been issued (false after 10 s).
    fn wait_issued(&self, n: usize) -> bool {
        let g = self.gate.lock().unwrap();
        let (g, _) = self
            .cv
            .wait_timeout_while(g, Duration::from_secs(10), |g| g.issued.len() < n)
            .unwrap();
        g.issued.len() >= n
    }

    fn issued(&self) -> usize {
        self.gate.lock().unwrap().issued.len()
    }
}

impl DmaPort for GatedPort {
    fn dma_read(&self, addr: BusAddr, buf: &mut [u8]) -> Result<(), DmaError> {
        if addr.0 >= HOST_BASE + DATA {
            let mut g = self.gate.lock().unwrap();
            g.issued.push(addr.0);
            self.cv.notify_all();
            let (g, timeout) = self
                .cv
                .wait_timeout_while(g, Duration::from_secs(10), |g| g.closed)
                .unwrap();
            drop(g);
            if timeout.timed_out() {
                return Err(DmaError::Unmapped {
                    addr,
                    len: buf.len() as u64,
                });
            }
        }
        self.inner.dma_read(addr, buf)
    }

    fn dma_write(&self, addr: BusAddr, data: &[u8]) -> Result<(), DmaError> {
        self.inner.dma_write(addr, data)
    }

    fn dma_span(&self, addr: BusAddr, len: u64, access: DmaAccess) -> DmaSpanResult {
        self.inner.dma_span(addr, len, access)
    }
}

/// A device whose port has no direct mapping (DMA is a message) behind a gate, with I/O
/// queue pair 1 of `entries`.
fn setup(io_workers: u16, entries: u32) -> (Harness, Arc<GatedPort>) {
    let mut gate = None;
    let mut h = Harness::with_port(
        |c| c.io_workers = io_workers,
        false,
        |p| {
            let g = GatedPort::new(p);
            gate = Some(g.clone());
            g
        },
    );
    h.enable();
    h.create_io_pair(1, entries);
    (h, gate.unwrap())
}

/// Reads the next completion of `qid` if it is already posted.
fn posted(h: &mut Harness, qid: u16) -> Option<devlend_nvme::Completion> {
    h.reap(qid, Duration::ZERO)
}

#[test]
fn second_data_read_is_issued_before_the_first_completes() {
    let (mut h, gate) = setup(4, 32);
    let a = pattern(4096, 1);
    let b = pattern(4096, 2);
    h.mem.write_at(DATA, &a).unwrap();
    h.mem.write_at(DATA + 0x1000, &b).unwrap();
    gate.close();
    let ca = h.push(1, write(0, 8, DATA));
    let cb = h.push(1, write(8, 8, DATA + 0x1000));
    h.ring_sq(1);
    assert!(
        gate.wait_issued(2),
        "both data reads issued while the first is held (issued: {})",
        gate.issued()
    );
    assert!(posted(&mut h, 1).is_none(), "nothing completes while held");
    gate.release();
    let mut cids = Vec::new();
    for _ in 0..2 {
        let c = h.reap(1, Duration::from_secs(5)).expect("completion");
        assert_eq!(c.status, Status::SUCCESS);
        assert_eq!(c.sqid, 1);
        cids.push(c.cid);
    }
    // The vector was signalled for them (the last to post, or the worker's pass, sends it).
    let irqs = h.irqs.counts.lock().unwrap();
    let (irqs, _) = h
        .irqs
        .cv
        .wait_timeout_while(irqs, Duration::from_secs(5), |c| {
            c.get(1).copied().unwrap_or(0) == 0
        })
        .unwrap();
    assert!(irqs.get(1).copied().unwrap_or(0) >= 1, "no interrupt");
    drop(irqs);
    cids.sort_unstable();
    let mut want = vec![ca, cb];
    want.sort_unstable();
    assert_eq!(cids, want);
    let img = h.image_bytes();
    assert_eq!(&img[..4096], &a[..]);
    assert_eq!(&img[4096..8192], &b[..]);
}

#[test]
fn one_io_worker_runs_commands_one_at_a_time_on_the_worker() {
    let (mut h, gate) = setup(1, 32);
    h.mem.write_at(DATA, &pattern(8192, 5)).unwrap();
    gate.close();
    h.push(1, write(0, 8, DATA));
    h.push(1, write(8, 8, DATA + 0x1000));
    h.ring_sq(1);
    assert!(gate.wait_issued(1));
    // The worker is inside the first command's read: a register read still answers, and the
    // second read is issued only after the release.
    assert_eq!(gate.issued(), 1);
    gate.release();
    for _ in 0..2 {
        assert!(h
            .reap(1, Duration::from_secs(5))
            .unwrap()
            .status
            .is_success());
    }
    assert_eq!(gate.issued(), 2);
}

#[test]
fn delete_sq_waits_for_commands_in_flight() {
    let (mut h, gate) = setup(4, 32);
    h.mem.write_at(DATA, &pattern(8192, 7)).unwrap();
    gate.close();
    h.push(1, write(0, 8, DATA));
    h.push(1, write(8, 8, DATA + 0x1000));
    h.ring_sq(1);
    assert!(gate.wait_issued(2));
    let del = Command {
        opcode: admin_opcode::DELETE_IO_SQ,
        cdw: [1, 0, 0, 0, 0, 0],
        ..Command::default()
    };
    let cid = h.push(0, del);
    h.ring_sq(0);
    assert!(
        h.reap(0, Duration::from_millis(50)).is_none(),
        "Delete I/O SQ completed with commands in flight"
    );
    gate.release();
    let c = h.reap(0, Duration::from_secs(5)).expect("delete completes");
    assert_eq!((c.cid, c.status), (cid, Status::SUCCESS));
    // Its completion came after both commands had posted theirs.
    for _ in 0..2 {
        let io = posted(&mut h, 1).expect("posted before the deletion");
        assert!(io.status.is_success());
    }
    assert!(posted(&mut h, 1).is_none(), "each completion once");
}

#[test]
fn reset_drains_commands_in_flight() {
    let (mut h, gate) = setup(4, 32);
    let data = pattern(8192, 9);
    h.mem.write_at(DATA, &data).unwrap();
    gate.close();
    h.push(1, write(0, 8, DATA));
    h.push(1, write(8, 8, DATA + 0x1000));
    h.ring_sq(1);
    assert!(gate.wait_issued(2));
    let dev = h.dev.clone();
    let disable = std::thread::spawn(move || {
        dev.bar_write(bar0(), REG_CC, &0u32.to_le_bytes());
    });
    // CC.EN = 0 waits: the controller is still ready while commands are in flight.
    let until = Instant::now() + Duration::from_millis(50);
    while Instant::now() < until {
        assert_ne!(h.read32(devlend_nvme::regs::REG_CSTS) & CSTS_RDY, 0);
        std::thread::yield_now();
    }
    gate.release();
    disable.join().unwrap();
    assert!(h.wait_csts(CSTS_RDY, 0));
    // Both completions were posted before the queues went away, and the data is in the image.
    for _ in 0..2 {
        assert!(posted(&mut h, 1).expect("posted").status.is_success());
    }
    assert_eq!(&h.image_bytes()[..8192], &data[..]);
    // The controller comes back and runs commands again.
    h.enable();
    h.create_io_pair(1, 32);
    assert!(h.status(1, read(0, 8, DATA + 0x4000)).is_success());
    assert_eq!(h.read_mem(DATA + 0x4000, 4096), &data[..4096]);
}

#[test]
fn every_completion_posted_once_with_its_phase_and_counted() {
    // An 8-entry CQ wraps its phase tag many times; up to 7 commands outstanding.
    let (mut h, _gate) = setup(4, 8);
    let total = 60u16;
    let mut outstanding = std::collections::HashSet::new();
    let mut seen = std::collections::HashSet::new();
    let mut sent = 0u16;
    let mut bad_cid = None;
    while seen.len() < usize::from(total) {
        while sent < total && outstanding.len() < 7 {
            let slot = u64::from(sent % 16);
            let cmd = if sent == 34 {
                // A buffer outside host memory: Data Transfer Error, logged.
                let mut c = write(0, 8, DATA);
                c.prp1 = HOST_BASE + HOST_LEN as u64 + 0x10_0000;
                c
            } else if sent.is_multiple_of(2) {
                write(slot * 8, 8, DATA + slot * 0x1000)
            } else {
                read(slot * 8, 8, DATA + 0x10_0000 + slot * 0x1000)
            };
            let cid = h.push(1, cmd);
            if sent == 34 {
                bad_cid = Some(cid);
            }
            outstanding.insert(cid);
            sent += 1;
        }
        h.ring_sq(1);
        let c = h.reap(1, Duration::from_secs(5)).expect("completion");
        assert!(outstanding.remove(&c.cid), "unexpected cid {}", c.cid);
        assert!(seen.insert(c.cid), "cid {} completed twice", c.cid);
        if Some(c.cid) == bad_cid {
            assert_eq!(c.status, Status::DATA_TRANSFER_ERROR);
        } else {
            assert_eq!(c.status, Status::SUCCESS, "cid {}", c.cid);
        }
    }
    assert!(posted(&mut h, 1).is_none(), "no extra completion");
    assert!(h
        .admin(log_page(lid::SMART_HEALTH, 128))
        .status
        .is_success());
    let s = h.read_mem(DATA, 512);
    let reads = u128::from_le_bytes(s[64..80].try_into().unwrap());
    let writes = u128::from_le_bytes(s[80..96].try_into().unwrap());
    assert_eq!((reads, writes), (30, 29), "the failed write is not counted");
    assert!(h
        .admin(log_page(lid::ERROR_INFORMATION, 16))
        .status
        .is_success());
    let e = h.read_mem(DATA, 64);
    assert_eq!(u16::from_le_bytes([e[8], e[9]]), 1, "sqid");
    assert_eq!(Some(u16::from_le_bytes([e[10], e[11]])), bad_cid, "cid");
}
