//! A burst of Writes when DMA is a message (no direct mapping) and the worker runs the
//! commands itself: their data is read in one batch of reads (after one batch for their PRP
//! lists), not one read per command, and every byte still lands where its command says; a
//! Write whose buffer the port refuses still fails alone, with its own status.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use devlend_memory::BusAddr;
use devlend_nvme::command::nvm_opcode;
use devlend_nvme::Status;
use devlend_pci::{DmaAccess, DmaError, DmaPort, DmaSpanResult};

/// Counts how the device reads host memory at `DATA` and above (data and PRP lists): read by
/// read, or in batches (the number of reads in each).
struct CountingPort {
    inner: Arc<dyn DmaPort>,
    single: AtomicUsize,
    batches: Mutex<Vec<usize>>,
}

fn is_data(addr: BusAddr) -> bool {
    addr.0 >= HOST_BASE + DATA
}

impl DmaPort for CountingPort {
    fn dma_read(&self, addr: BusAddr, buf: &mut [u8]) -> Result<(), DmaError> {
        if is_data(addr) {
            self.single.fetch_add(1, Ordering::SeqCst);
        }
        self.inner.dma_read(addr, buf)
    }

    fn dma_read_many(&self, reads: &mut [(BusAddr, &mut [u8])]) -> Result<(), DmaError> {
        let data = reads.iter().filter(|(a, _)| is_data(*a)).count();
        self.batches.lock().unwrap().push(data);
        self.inner.dma_read_many(reads)
    }

    fn dma_write(&self, addr: BusAddr, data: &[u8]) -> Result<(), DmaError> {
        self.inner.dma_write(addr, data)
    }

    fn dma_span(&self, addr: BusAddr, len: u64, access: DmaAccess) -> DmaSpanResult {
        self.inner.dma_span(addr, len, access)
    }
}

#[test]
fn a_burst_of_writes_reads_its_data_in_one_batch() {
    let mut counting = None;
    let mut h = Harness::with_port(
        |c| c.io_workers = 1,
        false,
        |p| {
            let c = Arc::new(CountingPort {
                inner: p,
                single: AtomicUsize::new(0),
                batches: Mutex::new(Vec::new()),
            });
            counting = Some(c.clone());
            c
        },
    );
    let port = counting.unwrap();
    h.enable();
    h.create_io_pair(1, 64);

    // Six one-page writes, one of four pages through a PRP list, one from memory the port
    // refuses, and a read among them.
    let mut expect = Vec::new();
    for i in 0..6u64 {
        let data = pattern(4096, i as u8);
        let buf = DATA + 0x1_0000 * i;
        h.mem.write_at(buf, &data).unwrap();
        h.push(1, write(8 * i, 8, buf));
        expect.push((8 * i, data));
    }
    let long = pattern(4 * 4096, 99);
    let pages = [
        DATA + 0x10_0000,
        DATA + 0x12_0000,
        DATA + 0x14_0000,
        DATA + 0x16_0000,
    ];
    let list = DATA + 0x18_0000;
    for (k, p) in pages.iter().enumerate() {
        h.mem.write_at(*p, &long[k * 4096..(k + 1) * 4096]).unwrap();
    }
    for (k, p) in pages[1..].iter().enumerate() {
        h.mem.store_u64(list + 8 * k as u64, HOST_BASE + p).unwrap();
    }
    h.push(
        1,
        rw(
            nvm_opcode::WRITE,
            100,
            32,
            HOST_BASE + pages[0],
            HOST_BASE + list,
        ),
    );
    expect.push((100, long));
    let refused = h.push(1, rw(nvm_opcode::WRITE, 200, 8, 0x2000, 0));
    h.push(1, read(0, 8, DATA + 0x20_0000));
    let before = h.image_bytes();
    h.ring_sq(1);

    let mut failed = Vec::new();
    for _ in 0..9 {
        let c = h.reap(1, Duration::from_secs(10)).expect("no completion");
        if c.status != Status::SUCCESS {
            failed.push((c.cid, c.status));
        }
    }
    assert_eq!(failed, [(refused, Status::DATA_TRANSFER_ERROR)]);
    let image = h.image_bytes();
    for (slba, data) in &expect {
        let at = *slba as usize * 512;
        assert_eq!(
            &image[at..at + data.len()],
            &data[..],
            "write at LBA {slba}"
        );
    }
    assert_eq!(&image[200 * 512..208 * 512], &before[200 * 512..208 * 512]);
    // The list in one batch, then every page of data in another: no data read alone.
    assert_eq!(*port.batches.lock().unwrap(), [1, 10]);
    assert_eq!(port.single.load(Ordering::SeqCst), 0);
}
