//! Run to completion (`PciDevice::run_nonblocking`): the thread that stores a doorbell while
//! the worker sleeps runs the pass itself when the pass waits for nothing (the submission
//! queue in the CMB, every read of the commands in memory the device maps), leaving the
//! worker asleep; otherwise it does nothing and the worker is woken as before. Host memory
//! here is reached by messages (the port maps none of it), as over tcp.

mod common;

use std::time::{Duration, Instant};

use common::*;
use devlend_nvme::command::nvm_opcode;
use devlend_nvme::regs::{CMBMSC_CMSE, CMBMSC_CRE, DOORBELL_BASE, REG_CMBMSC};
use devlend_nvme::{Command, Status};
use devlend_pci::{BarIndex, MemoryArea, PciDevice};

const CMB_BYTES: u64 = 1 << 20;
/// Right after host memory: nothing the host port maps.
const CBA: u64 = HOST_BASE + HOST_LEN as u64;
const ENTRIES: u32 = 16;
const CQ_BASE: u64 = 0x4_0000;
/// Where I/O SQ 1 sits in the CMB.
const SQ_OFF: u64 = 0x1_0000;

fn bar(i: u8) -> BarIndex {
    BarIndex::new(i).unwrap()
}

struct Rig {
    h: Harness,
    doorbells: MemoryArea,
    tail: u32,
    cq_head: u32,
}

/// A device with a CMB holding I/O SQ 1 (its CQ in host memory), host memory reached by
/// messages, and a worker that sleeps up to a second between checks.
fn rig() -> Rig {
    let mut h = Harness::with(
        |c| {
            c.cmb_bytes = Some(CMB_BYTES);
            c.idle_recheck = Duration::from_secs(1);
        },
        false,
    );
    h.write32(REG_CMBMSC + 4, (CBA >> 32) as u32);
    h.write32(REG_CMBMSC, CBA as u32 | (CMBMSC_CMSE | CMBMSC_CRE) as u32);
    h.enable();
    assert_eq!(
        h.status(0, create_cq(1, ENTRIES, CQ_BASE, 1)),
        Status::SUCCESS
    );
    let mut sq = create_sq(1, ENTRIES, 0, 1);
    sq.prp1 = CBA + SQ_OFF;
    assert_eq!(h.status(0, sq), Status::SUCCESS);
    let doorbells = h
        .dev
        .bar_memory(bar(0))
        .into_iter()
        .find(|a| a.offset <= DOORBELL_BASE && DOORBELL_BASE < a.offset + a.mem.len())
        .expect("the doorbells are memory the device polls");
    Rig {
        h,
        doorbells,
        tail: 0,
        cq_head: 0,
    }
}

impl Rig {
    /// Puts `c` in the SQ and stores the new tail in the doorbell, without waking anyone.
    fn store(&mut self, mut c: Command) -> u16 {
        c.cid = 0x100 + self.tail as u16;
        self.h
            .dev
            .bar_write(bar(2), SQ_OFF + u64::from(self.tail) * 64, &c.to_bytes());
        self.tail = (self.tail + 1) % ENTRIES;
        let at = DOORBELL_BASE + 8 - self.doorbells.offset;
        self.doorbells.write(at, &self.tail.to_le_bytes()).unwrap();
        c.cid
    }

    /// Waits until the worker has gone to sleep after everything so far.
    fn until_asleep(&self, after: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.h.dev.stats().sleeps <= after {
            assert!(Instant::now() < deadline, "the worker never slept");
            std::thread::yield_now();
        }
    }

    /// The next completion, waiting for it.
    fn reap(&mut self) -> (u16, Status) {
        let at = CQ_BASE + u64::from(self.cq_head) * 16;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.h.mem.load_u32(at + 12).unwrap() & (1 << 16) == 0 {
            assert!(Instant::now() < deadline, "no completion");
            std::thread::yield_now();
        }
        let mut b = [0u8; 16];
        self.h.mem.read_at(at, &mut b).unwrap();
        let (done, _) = devlend_nvme::Completion::from_bytes(&b);
        self.cq_head += 1;
        self.h.write32(DOORBELL_BASE + 12, self.cq_head);
        (done.cid, done.status)
    }
}

#[test]
fn a_lone_read_from_a_cmb_queue_runs_on_the_storing_thread() {
    let mut r = rig();
    // Blocks to read back, written by the worker (its data is in host memory).
    let data = pattern(4096, 3);
    r.h.mem.write_at(0x20_0000, &data).unwrap();
    r.store(rw(nvm_opcode::WRITE, 0, 8, HOST_BASE + 0x20_0000, 0));
    r.doorbells.wake().unwrap();
    assert_eq!(r.reap().1, Status::SUCCESS);
    // Each try: wait for the worker to sleep, store a read's doorbell, offer to run it. A
    // try can find the worker awake (its one-second check came just then): it is then
    // woken, as any doorbell would, and the next try goes on.
    let mut inline = 0;
    for i in 0..8u64 {
        // The counters once the worker sleeps: taken before, they could miss the end of the
        // worker's last pass (it counts a pass after it signalled the pass's completions,
        // which the previous try may have reaped already).
        r.until_asleep(r.h.dev.stats().sleeps);
        let before = r.h.dev.stats();
        let buf = 0x30_0000 + i * 0x1000;
        let cid = r.store(rw(nvm_opcode::READ, 0, 8, HOST_BASE + buf, 0));
        let ran = r.h.dev.run_nonblocking();
        let after = r.h.dev.stats();
        if ran {
            inline += 1;
            // Done on this thread before the call returned, the worker left asleep.
            assert_ne!(
                r.h.mem
                    .load_u32(CQ_BASE + u64::from(r.cq_head) * 16 + 12)
                    .unwrap()
                    & (1 << 16),
                0
            );
            assert_eq!(after.inline_passes, before.inline_passes + 1);
            assert_eq!(after.wakeups, before.wakeups, "the worker stayed asleep");
            assert_eq!(after.busy_passes, before.busy_passes);
        } else {
            r.doorbells.wake().unwrap();
        }
        assert_eq!(r.reap(), (cid, Status::SUCCESS));
        assert_eq!(r.h.read_mem(buf, 4096), data);
    }
    assert!(inline > 0, "no read ran on the storing thread");
}

#[test]
fn commands_that_would_wait_are_left_to_the_worker() {
    let mut r = rig();
    // A write whose data is in host memory: its data read would be a message.
    r.h.mem.write_at(0x20_0000, &pattern(4096, 9)).unwrap();
    let before = r.h.dev.stats();
    r.until_asleep(before.sleeps);
    let cid = r.store(rw(nvm_opcode::WRITE, 16, 8, HOST_BASE + 0x20_0000, 0));
    assert!(!r.h.dev.run_nonblocking());
    r.doorbells.wake().unwrap();
    assert_eq!(r.reap(), (cid, Status::SUCCESS));
    assert_eq!(
        &r.h.image_bytes()[16 * 512..24 * 512],
        &pattern(4096, 9)[..]
    );

    // A read of four pages with its PRP list in host memory: reading the list would wait.
    let mut list = Vec::new();
    for p in 1..4u64 {
        list.extend_from_slice(&(HOST_BASE + 0x40_0000 + p * PAGE).to_le_bytes());
    }
    r.h.mem.write_at(0x3f_0000, &list).unwrap();
    let before = r.h.dev.stats();
    r.until_asleep(before.sleeps);
    let cid = r.store(rw(
        nvm_opcode::READ,
        0,
        32,
        HOST_BASE + 0x40_0000,
        HOST_BASE + 0x3f_0000,
    ));
    assert!(!r.h.dev.run_nonblocking());
    r.doorbells.wake().unwrap();
    assert_eq!(r.reap(), (cid, Status::SUCCESS));
    assert_eq!(r.h.dev.stats().inline_passes, 0);

    // An admin command (its queue is in host memory) is the worker's too.
    let before = r.h.dev.stats();
    r.until_asleep(before.sleeps);
    r.h.push(0, identify(1, 0, HOST_BASE + 0x50_0000));
    let tail = r.h.queues[0].as_ref().unwrap().sq_tail;
    let at = DOORBELL_BASE - r.doorbells.offset;
    r.doorbells.write(at, &tail.to_le_bytes()).unwrap();
    assert!(!r.h.dev.run_nonblocking());
    r.doorbells.wake().unwrap();
    assert!(r.h.reap(0, Duration::from_secs(10)).is_some());
    assert_eq!(r.h.dev.stats().inline_passes, 0);
}
