//! When completions are messages (the completion queue has no direct mapping, as over tcp),
//! a burst of Reads ends its pass once it has moved enough data (128 KiB when the entries are
//! fetched by messages, 64 KiB from a CMB), so that the completions so far and their MSI-X
//! message leave with the data rather than after the whole burst; the entries the burst
//! fetched stay with the queue, and the next pass runs them without fetching them again. A
//! burst of 32 reads of 4 KiB still runs whole (a shorter burst would fetch more often).

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use devlend_memory::BusAddr;
use devlend_nvme::Status;
use devlend_pci::{DmaAccess, DmaError, DmaPort, DmaSpanResult};

/// Records, stamped ([`stamp`]), the device's reads of I/O queue 1's submission ring (the
/// entries of each) and its writes of read data into `INTO`.
struct Log {
    inner: Arc<dyn DmaPort>,
    /// Bus address of I/O queue 1's submission ring (`u64::MAX` until the queue exists).
    ring: AtomicU64,
    fetches: Mutex<Vec<usize>>,
    /// (offset from `INTO`, stamp) of each write of read data.
    data: Mutex<Vec<(u64, u64)>>,
}

/// Where the reads put their data: block `i` at `INTO + 4096 * i`.
const INTO: u64 = DATA + 0x20_0000;

impl Log {
    fn note_read(&self, addr: BusAddr, len: usize) {
        let ring = self.ring.load(Ordering::SeqCst);
        if (ring..ring.saturating_add(64 * 64)).contains(&addr.0) {
            self.fetches.lock().unwrap().push(len / 64);
        }
    }
}

impl DmaPort for Log {
    fn dma_read(&self, addr: BusAddr, buf: &mut [u8]) -> Result<(), DmaError> {
        self.note_read(addr, buf.len());
        self.inner.dma_read(addr, buf)
    }

    fn dma_read_many(&self, reads: &mut [(BusAddr, &mut [u8])]) -> Result<(), DmaError> {
        for (addr, buf) in reads.iter() {
            self.note_read(*addr, buf.len());
        }
        self.inner.dma_read_many(reads)
    }

    fn dma_write(&self, addr: BusAddr, data: &[u8]) -> Result<(), DmaError> {
        let r = self.inner.dma_write(addr, data);
        if let Some(off) = addr.0.checked_sub(HOST_BASE + INTO) {
            if off < 0x10_0000 {
                self.data.lock().unwrap().push((off, stamp()));
            }
        }
        r
    }

    fn dma_span(&self, addr: BusAddr, len: u64, access: DmaAccess) -> DmaSpanResult {
        self.inner.dma_span(addr, len, access)
    }
}

/// A device whose DMA is messages (no direct mapping, as over tcp), its I/O pair 1 for the
/// reads and 2 for writing the data they read, and the log of its DMA.
fn setup() -> (Harness, Arc<Log>) {
    let mut log = None;
    let mut h = Harness::with_port(
        |c| c.io_workers = 1,
        false,
        |p| {
            let l = Arc::new(Log {
                inner: p,
                ring: AtomicU64::new(u64::MAX),
                fetches: Mutex::new(Vec::new()),
                data: Mutex::new(Vec::new()),
            });
            log = Some(l.clone());
            l
        },
    );
    h.enable();
    h.create_io_pair(1, 64);
    h.create_io_pair(2, 64);
    let log = log.expect("the port was wrapped");
    let ring = h.queues[1].as_ref().expect("queue 1").sq_base;
    log.ring.store(HOST_BASE + ring, Ordering::SeqCst);
    (h, log)
}

/// Writes `n` blocks of `bytes` (4 or 8 KiB, each its own pattern) through queue 2, one at a
/// time; then reads them back into `INTO` with one doorbell on queue 1, checks every byte,
/// and waits for queue 1's first MSI-X message after the doorbell. Returns the stamp of that
/// message.
fn write_then_read_in_one_burst(h: &mut Harness, log: &Log, n: u64, bytes: u64) -> u64 {
    let blocks = (bytes / 512) as u32;
    for i in 0..n {
        let buf = DATA + bytes * i;
        h.mem
            .write_at(buf, &pattern(bytes as usize, i as u8))
            .unwrap();
        let lba = u64::from(blocks) * i;
        assert_eq!(h.status(2, write(lba, blocks, buf)), Status::SUCCESS);
    }
    h.mem.fill(INTO, (n * bytes) as usize, 0).unwrap();
    log.fetches.lock().unwrap().clear();
    let rung = stamp();
    for i in 0..n {
        h.push(1, read(u64::from(blocks) * i, blocks, INTO + bytes * i));
    }
    h.ring_sq(1);
    for _ in 0..n {
        let c = h.reap(1, Duration::from_secs(10)).expect("no completion");
        assert_eq!(c.status, Status::SUCCESS);
    }
    for i in 0..n {
        assert_eq!(
            h.read_mem(INTO + bytes * i, bytes as usize),
            pattern(bytes as usize, i as u8),
            "block {i} read back"
        );
    }
    // The message follows its pass's completions; it may come after the reap saw them.
    let first = |h: &Harness| {
        h.irqs
            .signals
            .lock()
            .unwrap()
            .iter()
            .find(|&&(v, at)| v == 1 && at > rung)
            .map(|&(_, at)| at)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(at) = first(h) {
            return at;
        }
        assert!(std::time::Instant::now() < deadline, "no interrupt came");
        std::thread::yield_now();
    }
}

/// When the data of read `i` (of `bytes` each) was written: (first write, last write).
fn written(log: &Log, i: u64, bytes: u64) -> (u64, u64) {
    let data = log.data.lock().unwrap();
    let at: Vec<u64> = data
        .iter()
        .filter(|&&(off, _)| off / bytes == i)
        .map(|&(_, at)| at)
        .collect();
    match (at.iter().min(), at.iter().max()) {
        (Some(&a), Some(&b)) => (a, b),
        _ => panic!("read {i} wrote no data"),
    }
}

#[test]
fn over_messages_the_first_128_kib_of_a_burst_of_reads_is_signalled_before_the_rest_moves() {
    let (mut h, log) = setup();
    // 24 reads of 8 KiB: 192 KiB; the pass ends after the 16th (128 KiB).
    let msi = write_then_read_in_one_burst(&mut h, &log, 24, 8192);
    assert!(
        written(&log, 15, 8192).1 < msi,
        "the 16th read's data goes before the message"
    );
    assert!(
        msi < written(&log, 16, 8192).0,
        "the message announcing the first 16 reads leaves before the 17th moves its data"
    );
    assert_eq!(
        *log.fetches.lock().unwrap(),
        vec![24],
        "the 24 entries fetched in one read, the second pass running the kept ones"
    );
}

#[test]
fn a_burst_of_32_reads_of_4_kib_runs_whole() {
    let (mut h, log) = setup();
    let msi = write_then_read_in_one_burst(&mut h, &log, 32, 4096);
    assert!(
        written(&log, 31, 4096).1 < msi,
        "one message, after the burst's last data"
    );
    assert_eq!(*log.fetches.lock().unwrap(), vec![32]);
}
