use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use devlend_memory::{MemSpan, SharedMemory};

use super::*;
use crate::command::nvm_opcode;

const BASE: u64 = 0x1000_0000;
const MEM: usize = 8 << 20;
const PAGE: u64 = 4096;

/// Host memory behind a port that reaches it by messages (or maps it, when `direct`), and
/// counts how it is read.
struct Port {
    mem: Arc<SharedMemory>,
    direct: bool,
    fail_many: bool,
    single_reads: AtomicUsize,
    /// Lengths of the reads of each `dma_read_many` call.
    batches: Mutex<Vec<Vec<usize>>>,
}

impl Port {
    fn new(direct: bool) -> Port {
        let mem = Arc::new(SharedMemory::new("readahead-test", MEM).unwrap());
        // Every byte tells where it is, so a misplaced copy shows.
        let pattern: Vec<u8> = (0..MEM).map(|i| (i % 251) as u8).collect();
        mem.write_at(0, &pattern).unwrap();
        Port {
            mem,
            direct,
            fail_many: false,
            single_reads: AtomicUsize::new(0),
            batches: Mutex::new(Vec::new()),
        }
    }

    fn offset(&self, addr: BusAddr, len: u64) -> Result<u64, DmaError> {
        let unmapped = || DmaError::Unmapped { addr, len };
        let off = addr.0.checked_sub(BASE).ok_or_else(unmapped)?;
        match off.checked_add(len) {
            Some(end) if end <= MEM as u64 => Ok(off),
            _ => Err(unmapped()),
        }
    }

    fn bytes(&self, host: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_at(host - BASE, &mut v).unwrap();
        v
    }

    fn batches(&self) -> Vec<Vec<usize>> {
        self.batches.lock().unwrap().clone()
    }
}

impl DmaPort for Port {
    fn dma_read(&self, addr: BusAddr, buf: &mut [u8]) -> Result<(), DmaError> {
        self.single_reads.fetch_add(1, Ordering::SeqCst);
        let off = self.offset(addr, buf.len() as u64)?;
        Ok(self.mem.read_at(off, buf)?)
    }

    fn dma_read_many(&self, reads: &mut [(BusAddr, &mut [u8])]) -> Result<(), DmaError> {
        self.batches
            .lock()
            .unwrap()
            .push(reads.iter().map(|(_, b)| b.len()).collect());
        if self.fail_many {
            return Err(DmaError::Path("link down".into()));
        }
        for (addr, buf) in reads.iter_mut() {
            let off = self.offset(*addr, buf.len() as u64)?;
            self.mem.read_at(off, buf)?;
        }
        Ok(())
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

const GEOMETRY: Geometry = Geometry {
    page_size: PAGE,
    max_transfer: 1 << 20,
    block_shift: 9,
};

fn io(opcode: u8, bytes: u64, prp1: u64, prp2: u64) -> Command {
    Command {
        opcode,
        nsid: 1,
        prp1,
        prp2,
        cdw: [0, 0, (bytes >> 9) as u32 - 1, 0, 0, 0],
        ..Command::default()
    }
}

fn write(bytes: u64, prp1: u64, prp2: u64) -> Command {
    io(nvm_opcode::WRITE, bytes, prp1, prp2)
}

/// Writes `entries` as a PRP list at host address `at`.
fn prp_list(port: &Port, at: u64, entries: &[u64]) {
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    port.mem.write_at(at - BASE, &bytes).unwrap();
}

#[test]
fn a_bursts_writes_are_read_in_one_batch_after_their_prp_lists() {
    let port = Port::new(false);
    // A: one page. B: two pages apart (PRP2 is the second page). C: four pages through a
    // PRP list at a mid-page offset, with the data starting mid-page too.
    let (a, b1, b2) = (BASE + 0x10_0000, BASE + 0x20_0000, BASE + 0x30_0000);
    let c = [
        BASE + 0x40_0200,
        BASE + 0x50_0000,
        BASE + 0x60_0000,
        BASE + 0x70_0000,
    ];
    let list = BASE + 0x8_0040;
    prp_list(&port, list, &c[1..]);
    let c_len = 3 * PAGE + (PAGE - 0x200);
    let cmds = [
        write(PAGE, a, 0),
        io(nvm_opcode::READ, PAGE, BASE, 0),
        write(2 * PAGE, b1, b2),
        io(nvm_opcode::FLUSH, 512, 0, 0),
        write(c_len - c_len % 512, c[0], list),
    ];
    let mut out = Ahead::new();
    read_ahead(&port, &cmds, GEOMETRY, &mut out);

    // Two batches, nothing read alone: the list (three entries), then every data segment.
    let c_bytes = c_len - c_len % 512;
    let c_last = c_bytes - (PAGE - 0x200) - 2 * PAGE;
    assert_eq!(
        port.batches(),
        [
            vec![24],
            vec![4096, 4096, 4096, 3584, 4096, 4096, c_last as usize]
        ]
    );
    assert_eq!(port.single_reads.load(Ordering::SeqCst), 0);

    // What was read ahead is served without the port, byte for byte; other reads go to it.
    let ra = ReadAhead {
        port: &port,
        ahead: &out,
    };
    let mut got = vec![0u8; 4096];
    ra.dma_read(BusAddr(c[2]), &mut got).unwrap();
    assert_eq!(got, port.bytes(c[2], 4096));
    let mut part = vec![0u8; 100];
    ra.dma_read(BusAddr(b2 + 7), &mut part).unwrap();
    assert_eq!(part, port.bytes(b2 + 7, 100));
    assert_eq!(port.single_reads.load(Ordering::SeqCst), 0);
    // Past the end of a piece read ahead, or elsewhere: the port.
    ra.dma_read(BusAddr(a + 4000), &mut part).unwrap();
    assert_eq!(part, port.bytes(a + 4000, 100));
    assert_eq!(port.single_reads.load(Ordering::SeqCst), 1);
}

#[test]
fn a_bursts_reads_have_their_prp_lists_read_in_one_batch_and_no_data() {
    let port = Port::new(false);
    // Three 16 KiB reads through PRP lists (three entries each), one single-page read (no
    // list) and one 16 KiB write through a list: one batch of the four lists, then the
    // write's data alone.
    let lists = [
        BASE + 0x8_0000,
        BASE + 0x9_0000,
        BASE + 0xa_0000,
        BASE + 0xb_0000,
    ];
    let data = |i: u64| BASE + 0x10_0000 * (i + 1);
    for (i, list) in lists.iter().enumerate() {
        let d = data(i as u64);
        prp_list(&port, *list, &[d + PAGE, d + 2 * PAGE, d + 3 * PAGE]);
    }
    let cmds = [
        io(nvm_opcode::READ, 4 * PAGE, data(0), lists[0]),
        io(nvm_opcode::READ, PAGE, data(5), 0),
        io(nvm_opcode::READ, 4 * PAGE, data(1), lists[1]),
        write(4 * PAGE, data(3), lists[3]),
        io(nvm_opcode::READ, 4 * PAGE, data(2), lists[2]),
    ];
    let mut out = Ahead::new();
    read_ahead(&port, &cmds, GEOMETRY, &mut out);
    assert_eq!(port.batches(), [vec![24; 4], vec![4 * PAGE as usize]]);
    // Each Read's PRP list is served without the port, and so is its walk.
    let ra = ReadAhead {
        port: &port,
        ahead: &out,
    };
    for (i, list) in lists.iter().take(3).enumerate() {
        let mut segs = Vec::new();
        prp::walk(&ra, data(i as u64), *list, 4 * PAGE, PAGE, &mut segs).unwrap();
        let covered: u64 = segs.iter().map(|s| s.len).sum();
        assert_eq!(covered, 4 * PAGE);
    }
    assert_eq!(port.single_reads.load(Ordering::SeqCst), 0);
}

#[test]
fn nothing_is_read_ahead_from_memory_the_port_maps() {
    let port = Port::new(true);
    let mut out = Ahead::new();
    read_ahead(&port, &[write(PAGE, BASE, 0)], GEOMETRY, &mut out);
    assert!(out.is_empty());
    assert!(port.batches().is_empty());
}

#[test]
fn a_failed_batch_leaves_the_commands_to_read_on_their_own() {
    let mut port = Port::new(false);
    port.fail_many = true;
    let mut out = vec![(BusAddr(BASE), vec![1u8; 8])];
    read_ahead(&port, &[write(PAGE, BASE + PAGE, 0)], GEOMETRY, &mut out);
    // Emptied first (nothing stale), and nothing added.
    assert!(out.is_empty());
    assert_eq!(port.batches(), [vec![4096]]);
    let ra = ReadAhead {
        port: &port,
        ahead: &out,
    };
    let mut got = vec![0u8; 4096];
    ra.dma_read(BusAddr(BASE + PAGE), &mut got).unwrap();
    assert_eq!(got, port.bytes(BASE + PAGE, 4096));
}

#[test]
fn writes_with_bad_prps_or_lengths_are_left_to_fail_on_their_own() {
    let port = Port::new(false);
    let good = write(PAGE, BASE + 0x10_0000, 0);
    // PRP2 of a two-page write with an offset (PRP Offset Invalid when it runs).
    let bad_prp2 = write(2 * PAGE, BASE + 0x20_0000, BASE + 0x30_0010);
    // A PRP1 that is not dword aligned.
    let bad_prp1 = write(PAGE, BASE + 0x40_0002, 0);
    // Longer than MDTS.
    let too_long = write(2 << 20, BASE, 0);
    // Outside host memory: the port refuses it, so it is not read ahead.
    let unmapped = write(PAGE, BASE + MEM as u64, 0);
    let mut out = Ahead::new();
    read_ahead(
        &port,
        &[bad_prp2, bad_prp1, good, too_long, unmapped],
        GEOMETRY,
        &mut out,
    );
    assert_eq!(port.batches(), [vec![4096]]);
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].0, BusAddr(BASE + 0x10_0000));
}

#[test]
fn read_ahead_stops_at_its_limit() {
    let port = Port::new(false);
    // 32 KiB pages: each 32 KiB write is one segment; five of them pass the 128 KiB limit.
    const P: u64 = 32 << 10;
    let g = Geometry {
        page_size: P,
        max_transfer: 1 << 20,
        block_shift: 9,
    };
    let cmds: Vec<_> = (0..5).map(|i| write(P, BASE + i * 2 * P, 0)).collect();
    let mut out = Ahead::new();
    read_ahead(&port, &cmds, g, &mut out);
    let total: usize = out.iter().map(|(_, b)| b.len()).sum();
    assert_eq!(total as u64, READ_AHEAD_MAX);
    assert_eq!(port.batches(), [vec![P as usize; 4]]);
}

#[test]
fn only_commands_that_read_mapped_memory_count_as_local() {
    let mapped = Port::new(true);
    let messages = Port::new(false);
    let list = BASE + 0x8_0000;
    prp_list(&messages, list, &[BASE + 0x5_0000, BASE + 0x6_0000]);
    prp_list(&mapped, list, &[BASE + 0x5_0000, BASE + 0x6_0000]);
    let read_one = io(nvm_opcode::READ, PAGE, BASE, 0);
    let read_listed = io(nvm_opcode::READ, 3 * PAGE, BASE + 0x4_0000, list);
    let write_one = write(PAGE, BASE, 0);
    let mut dsm = io(nvm_opcode::DATASET_MANAGEMENT, PAGE, BASE, 0);
    dsm.cdw = [0, 0, 0, 0, 0, 0];
    let flush = io(nvm_opcode::FLUSH, 512, 0, 0);
    let mut bad = write(PAGE, BASE, 0);
    bad.opcode = 0x7f;
    let too_long = write(2 << 20, BASE, 0);
    let misaligned = write(PAGE, BASE + 2, 0);
    let local = |p: &Port, c: &Command| reads_only_mapped(p, c, GEOMETRY);
    // Reads write host memory (posted) and read nothing, unless they have a PRP list.
    assert!(local(&messages, &read_one));
    assert!(!local(&messages, &read_listed));
    assert!(local(&mapped, &read_listed));
    // Writes, and Dataset Management's ranges, read their buffer.
    assert!(!local(&messages, &write_one));
    assert!(local(&mapped, &write_one));
    assert!(!local(&messages, &dsm));
    assert!(local(&mapped, &dsm));
    // Commands that fail before any transfer, or move no data, read nothing.
    for c in [&flush, &bad, &too_long, &misaligned] {
        assert!(local(&messages, c), "{:#x}", c.opcode);
    }
    // Nothing was sent as a message to find out.
    assert_eq!(messages.single_reads.load(Ordering::SeqCst), 0);
    assert!(messages.batches().is_empty());
}
