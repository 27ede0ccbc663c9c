//! End to end through the pci crate's LocalFunction: config space, BARs, IOMMU-translated DMA
//! (zero-copy spans) and eventfd interrupts, using only the PciFunction driver interface.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, TempImage};
use devlend_nvme::command::{admin_opcode, nvm_opcode};
use devlend_nvme::regs::*;
use devlend_nvme::{Command, Completion, NvmeConfig, NvmeDevice, Status};
use devlend_pci::{
    AccessSize, BarAccess, BarIndex, ConfigAccess, DmaAlloc, DmaBuffer, Interrupts, LocalFunction,
    PciDevice,
};

struct Queue {
    sq: DmaBuffer,
    cq: DmaBuffer,
    entries: u32,
    tail: u32,
    head: u32,
    phase: bool,
    qid: u16,
}

struct Driver {
    f: LocalFunction,
    next_cid: u16,
}

fn bar0() -> BarIndex {
    BarIndex::new(0).unwrap()
}

impl Driver {
    fn submit(&mut self, q: &mut Queue, mut c: Command, vector: u16) -> Completion {
        self.next_cid += 1;
        c.cid = self.next_cid;
        q.sq.write_at(q.tail as usize * 64, &c.to_bytes()).unwrap();
        q.tail = (q.tail + 1) % q.entries;
        self.f
            .bar_write_u32(bar0(), DOORBELL_BASE + 8 * u64::from(q.qid), q.tail)
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let dw3 = q.cq.load_u32(q.head as usize * 16 + 12).unwrap();
            if (dw3 & (1 << 16) != 0) == q.phase {
                let mut b = [0u8; 16];
                q.cq.read_at(q.head as usize * 16, &mut b).unwrap();
                let (e, _) = Completion::from_bytes(&b);
                q.head = (q.head + 1) % q.entries;
                if q.head == 0 {
                    q.phase = !q.phase;
                }
                self.f
                    .bar_write_u32(bar0(), DOORBELL_BASE + 8 * u64::from(q.qid) + 4, q.head)
                    .unwrap();
                assert_eq!(e.cid, c.cid);
                return e;
            }
            assert!(Instant::now() < deadline, "no completion");
            // Interrupt-driven wait, as a driver would.
            let _ = self.f.wait_interrupt(vector, Duration::from_millis(10));
        }
    }
}

fn queue(f: &LocalFunction, qid: u16, entries: u32) -> Queue {
    Queue {
        sq: f.dma_alloc(entries as usize * 64).unwrap(),
        cq: f.dma_alloc(entries as usize * 16).unwrap(),
        entries,
        tail: 0,
        head: 0,
        phase: true,
        qid,
    }
}

#[test]
fn driver_over_local_function() {
    let image = TempImage::new();
    let mut cfg = NvmeConfig::new(&image.0);
    cfg.create_size = Some(8 << 20);
    cfg.max_io_queue_pairs = 2;
    let f = LocalFunction::new(4 << 20, |dma, irq| {
        NvmeDevice::new(cfg, dma, irq).map(|d| d as Arc<dyn PciDevice>)
    })
    .unwrap();
    // PCI: memory + bus master, MSI-X on with vectors unmasked.
    f.config_write(0x04, AccessSize::Word, 0x6).unwrap();
    let mut cap = f.config_read(0x34, AccessSize::Byte).unwrap() as u16;
    while cap != 0 && f.config_read(cap, AccessSize::Byte).unwrap() != 0x11 {
        cap = f.config_read(cap + 1, AccessSize::Byte).unwrap() as u16;
    }
    assert_ne!(cap, 0, "MSI-X capability");
    let table = f.config_read(cap + 4, AccessSize::Dword).unwrap();
    assert_eq!(table & 7, 4, "MSI-X table in BAR4");
    f.config_write(cap + 2, AccessSize::Word, 1 << 15).unwrap();
    let bar4 = BarIndex::new(4).unwrap();
    for v in 0..f.interrupt_vectors() {
        f.bar_write_u32(bar4, u64::from(v) * 16 + 12, 0).unwrap();
    }
    assert_eq!(f.interrupt_vectors(), 3);

    let mut d = Driver { f, next_cid: 0 };
    let mut admin = queue(&d.f, 0, 32);
    d.f.bar_write_u32(bar0(), REG_AQA, (31 << 16) | 31).unwrap();
    d.f.bar_write_u64(bar0(), REG_ASQ, admin.sq.bus_addr().0)
        .unwrap();
    d.f.bar_write_u64(bar0(), REG_ACQ, admin.cq.bus_addr().0)
        .unwrap();
    let cap_reg = d.f.bar_read_u64(bar0(), REG_CAP).unwrap();
    d.f.bar_write_u32(
        bar0(),
        REG_CC,
        CC_EN | (6 << CC_IOSQES_SHIFT) | (4 << CC_IOCQES_SHIFT),
    )
    .unwrap();
    let timeout = Duration::from_millis(500 * ((cap_reg >> 24) & 0xff));
    let start = Instant::now();
    while d.f.bar_read_u32(bar0(), REG_CSTS).unwrap() & CSTS_RDY == 0 {
        assert!(start.elapsed() < timeout, "CAP.TO expired");
        std::thread::sleep(Duration::from_micros(50));
    }

    let buf = d.f.dma_alloc(64 << 10).unwrap();
    let identify = Command {
        opcode: admin_opcode::IDENTIFY,
        prp1: buf.bus_addr().0,
        cdw: [1, 0, 0, 0, 0, 0],
        ..Command::default()
    };
    assert_eq!(d.submit(&mut admin, identify, 0).status, Status::SUCCESS);
    let mut sn = [0u8; 20];
    buf.read_at(4, &mut sn).unwrap();
    assert_eq!(&sn[..11], b"DEVLEND0001");

    let mut io = queue(&d.f, 1, 64);
    let create_cq = Command {
        opcode: admin_opcode::CREATE_IO_CQ,
        prp1: io.cq.bus_addr().0,
        cdw: [(63 << 16) | 1, (1 << 16) | 0b11, 0, 0, 0, 0],
        ..Command::default()
    };
    let create_sq = Command {
        opcode: admin_opcode::CREATE_IO_SQ,
        prp1: io.sq.bus_addr().0,
        cdw: [(63 << 16) | 1, (1 << 16) | 1, 0, 0, 0, 0],
        ..Command::default()
    };
    assert_eq!(d.submit(&mut admin, create_cq, 0).status, Status::SUCCESS);
    assert_eq!(d.submit(&mut admin, create_sq, 0).status, Status::SUCCESS);

    // 64 KiB write and read back through a PRP list.
    let data = pattern(64 << 10, 77);
    buf.write_at(0, &data).unwrap();
    let list = d.f.dma_alloc(4096).unwrap();
    for i in 1..16u64 {
        list.store_u64(8 * (i as usize - 1), buf.bus_addr().0 + i * 4096)
            .unwrap();
    }
    let rw = |opcode, slba: u64| Command {
        opcode,
        nsid: 1,
        prp1: buf.bus_addr().0,
        prp2: list.bus_addr().0,
        cdw: [slba as u32, 0, 127, 0, 0, 0],
        ..Command::default()
    };
    assert_eq!(
        d.submit(&mut io, rw(nvm_opcode::WRITE, 2048), 1).status,
        Status::SUCCESS
    );
    let img = std::fs::read(&image.0).unwrap();
    assert_eq!(&img[2048 * 512..2048 * 512 + (64 << 10)], &data[..]);
    buf.fill(0).unwrap();
    assert_eq!(
        d.submit(&mut io, rw(nvm_opcode::READ, 2048), 1).status,
        Status::SUCCESS
    );
    let mut back = vec![0u8; 64 << 10];
    buf.read_at(0, &mut back).unwrap();
    assert_eq!(back, data);

    // A bus address outside the DMA pool: the IOMMU refuses, the command fails cleanly.
    let bad = Command {
        prp1: 0x1000,
        prp2: 0,
        cdw: [0, 0, 0, 0, 0, 0],
        ..rw(nvm_opcode::READ, 0)
    };
    assert_eq!(
        d.submit(&mut io, bad, 1).status,
        Status::DATA_TRANSFER_ERROR
    );

    // Orderly shutdown.
    d.f.bar_write_u32(
        bar0(),
        REG_CC,
        CC_EN | (6 << CC_IOSQES_SHIFT) | (4 << CC_IOCQES_SHIFT) | (1 << CC_SHN_SHIFT),
    )
    .unwrap();
    let start = Instant::now();
    while d.f.bar_read_u32(bar0(), REG_CSTS).unwrap() & CSTS_SHST_MASK != CSTS_SHST_COMPLETE {
        assert!(start.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_micros(50));
    }
}
