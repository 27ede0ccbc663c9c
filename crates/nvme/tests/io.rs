//! NVM command set behaviour against the image file: data integrity, PRP lists, DMA
//! isolation, MDTS and range checks, Flush, Write Zeroes, Dataset Management, Compare, and
//! shadow doorbells.

mod common;

use std::time::Duration;

use common::*;
use devlend_nvme::command::{admin_opcode, nvm_opcode};
use devlend_nvme::{Command, Status};

fn setup(direct: bool) -> Harness {
    let mut h = Harness::with(|_| {}, direct);
    h.enable();
    h.create_io_pair(1, 64);
    h
}

fn write_then_read_back(direct: bool) {
    let mut h = setup(direct);
    let data = pattern(8192, 3);
    h.mem.write_at(DATA, &data).unwrap();
    assert_eq!(h.status(1, write(10, 16, DATA)), Status::SUCCESS);
    // The file holds it.
    let img = h.image_bytes();
    assert_eq!(&img[10 * 512..10 * 512 + 8192], &data[..]);
    // Read it back elsewhere.
    assert_eq!(h.status(1, read(10, 16, DATA + 0x10_0000)), Status::SUCCESS);
    assert_eq!(h.read_mem(DATA + 0x10_0000, 8192), data);
    // A read of data written through std::fs.
    let other = pattern(4096, 99);
    let mut img = h.image_bytes();
    img[512 * 100..512 * 108].copy_from_slice(&other);
    std::fs::write(&h.image.0, &img).unwrap();
    assert_eq!(h.status(1, read(100, 8, DATA + 0x20_0000)), Status::SUCCESS);
    assert_eq!(h.read_mem(DATA + 0x20_0000, 4096), other);
}

#[test]
fn write_read_zero_copy() {
    write_then_read_back(true);
}

#[test]
fn write_read_bounce_buffer() {
    write_then_read_back(false);
}

#[test]
fn prp1_with_offset_and_prp2_direct() {
    let mut h = setup(true);
    // 4 KiB starting 512 bytes into a page: PRP1 covers 3.5 KiB, PRP2 the rest.
    let data = pattern(4096, 7);
    let first = DATA + 0x200;
    let second = DATA + 0x5_0000;
    h.mem.write_at(first, &data[..3584]).unwrap();
    h.mem.write_at(second, &data[3584..]).unwrap();
    let c = rw(
        nvm_opcode::WRITE,
        0,
        8,
        HOST_BASE + first,
        HOST_BASE + second,
    );
    assert_eq!(h.status(1, c), Status::SUCCESS);
    assert_eq!(&h.image_bytes()[..4096], &data[..]);
    // PRP2 with an offset is rejected.
    let c = rw(
        nvm_opcode::READ,
        0,
        8,
        HOST_BASE + first,
        HOST_BASE + second + 8,
    );
    assert_eq!(h.status(1, c), Status::INVALID_PRP_OFFSET);
}

#[test]
fn prp_list_crossing_pages() {
    let mut h = setup(true);
    // 128 KiB = 32 pages: PRP1 + 31 list entries. Start the list 16 bytes before the end of
    // its page: one entry, then a chain pointer to a second list page.
    let len = 128 * 1024;
    let data = pattern(len, 11);
    let pages: Vec<u64> = (0..32).map(|i| DATA + 0x20_0000 + i * 0x2000).collect(); // scattered
    for (i, p) in pages.iter().enumerate() {
        h.mem.write_at(*p, &data[i * 4096..(i + 1) * 4096]).unwrap();
    }
    let list1 = DATA + 0x1000 - 16;
    let list2 = DATA + 0x3000;
    h.mem.store_u64(list1, HOST_BASE + pages[1]).unwrap();
    h.mem.store_u64(list1 + 8, HOST_BASE + list2).unwrap();
    for (i, p) in pages[2..].iter().enumerate() {
        h.mem
            .store_u64(list2 + 8 * i as u64, HOST_BASE + p)
            .unwrap();
    }
    let c = rw(
        nvm_opcode::WRITE,
        64,
        256,
        HOST_BASE + pages[0],
        HOST_BASE + list1,
    );
    assert_eq!(h.status(1, c), Status::SUCCESS);
    assert_eq!(&h.image_bytes()[64 * 512..64 * 512 + len], &data[..]);
    // Read back through the same lists into zeroed pages.
    for p in &pages {
        h.mem.fill(*p, 4096, 0).unwrap();
    }
    let c = rw(
        nvm_opcode::READ,
        64,
        256,
        HOST_BASE + pages[0],
        HOST_BASE + list1,
    );
    assert_eq!(h.status(1, c), Status::SUCCESS);
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(
            h.read_mem(*p, 4096),
            &data[i * 4096..(i + 1) * 4096],
            "page {i}"
        );
    }
}

#[test]
fn dma_outside_granted_memory_is_a_transfer_error_and_writes_nothing() {
    let mut h = setup(true);
    let before = h.image_bytes();
    // Read into a buffer whose second page lies beyond host memory: nothing is written to
    // the first page either.
    let last = HOST_LEN as u64 - 4096;
    h.mem.fill(last, 4096, 0x5a).unwrap();
    let c = rw(
        nvm_opcode::READ,
        0,
        16,
        HOST_BASE + last,
        HOST_BASE + HOST_LEN as u64,
    );
    assert_eq!(h.status(1, c), Status::DATA_TRANSFER_ERROR);
    assert_eq!(h.read_mem(last, 4096), vec![0x5a; 4096]);
    // PRP list entry pointing below the window.
    h.mem.store_u64(DATA, 0x1000).unwrap();
    h.mem
        .store_u64(DATA + 8, HOST_BASE + DATA + 0x1000)
        .unwrap();
    let c = rw(
        nvm_opcode::READ,
        0,
        24,
        HOST_BASE + DATA + 0x2000,
        HOST_BASE + DATA,
    );
    assert_eq!(h.status(1, c), Status::DATA_TRANSFER_ERROR);
    // PRP list itself unreadable.
    let c = rw(nvm_opcode::WRITE, 0, 24, HOST_BASE + DATA, 0x10_0000);
    assert_eq!(h.status(1, c), Status::DATA_TRANSFER_ERROR);
    // A write from unmapped memory changes no block.
    let c = rw(nvm_opcode::WRITE, 0, 8, 0x2000, 0);
    assert_eq!(h.status(1, c), Status::DATA_TRANSFER_ERROR);
    assert_eq!(h.image_bytes(), before);
}

#[test]
fn io_error_statuses() {
    let mut h = setup(true);
    let blocks = IMAGE_BYTES / 512;
    let mut wrong_ns = read(0, 1, DATA);
    wrong_ns.nsid = 2;
    let mut ns0 = read(0, 1, DATA);
    ns0.nsid = 0;
    let mut sgl = read(0, 1, DATA);
    sgl.psdt = 2;
    let mut flush_bad_ns = cmd(nvm_opcode::FLUSH);
    flush_bad_ns.nsid = 7;
    let mut wz_oob = cmd(nvm_opcode::WRITE_ZEROES);
    wz_oob.nsid = 1;
    wz_oob.cdw = [(blocks - 1) as u32, 0, 1, 0, 0, 0];
    let cases: Vec<(&str, Command, Status)> = vec![
        (
            "unknown opcode",
            Command {
                nsid: 1,
                ..cmd(0x7e)
            },
            Status::INVALID_OPCODE,
        ),
        (
            "admin opcode on I/O queue",
            Command {
                nsid: 1,
                ..cmd(admin_opcode::IDENTIFY)
            },
            Status::INVALID_OPCODE,
        ),
        ("namespace 2", wrong_ns, Status::INVALID_NAMESPACE),
        ("namespace 0", ns0, Status::INVALID_NAMESPACE),
        ("SGL", sgl, Status::INVALID_FIELD),
        (
            "read past the end",
            read(blocks - 1, 2, DATA),
            Status::LBA_OUT_OF_RANGE,
        ),
        (
            "read at the last block",
            read(blocks - 1, 1, DATA),
            Status::SUCCESS,
        ),
        (
            "SLBA overflow",
            read(u64::MAX, 1, DATA),
            Status::LBA_OUT_OF_RANGE,
        ),
        ("above MDTS", read(0, 257, DATA), Status::INVALID_FIELD),
        (
            "at MDTS",
            rw(
                nvm_opcode::READ,
                0,
                256,
                HOST_BASE + DATA,
                HOST_BASE + DATA + 0x10_0000,
            ),
            Status::SUCCESS,
        ),
        (
            "misaligned PRP1",
            rw(nvm_opcode::READ, 0, 1, HOST_BASE + DATA + 1, 0),
            Status::INVALID_PRP_OFFSET,
        ),
        (
            "flush bad namespace",
            flush_bad_ns,
            Status::INVALID_NAMESPACE,
        ),
        (
            "write zeroes past the end",
            wz_oob,
            Status::LBA_OUT_OF_RANGE,
        ),
    ];
    // The "at MDTS" case needs a PRP list at DATA + 0x10_0000 of 31 valid entries.
    for i in 0..31u64 {
        h.mem
            .store_u64(
                DATA + 0x10_0000 + 8 * i,
                HOST_BASE + DATA + 0x20_0000 + i * 4096,
            )
            .unwrap();
    }
    for (name, c, want) in cases {
        let got = h.status(1, c);
        assert_eq!(got, want, "{name}: got {got}, want {want}");
    }
}

#[test]
fn flush_write_zeroes_dsm_compare() {
    let mut h = setup(true);
    let data = pattern(8192, 5);
    h.mem.write_at(DATA, &data).unwrap();
    assert!(h.status(1, write(0, 16, DATA)).is_success());
    // Flush, with NSID 1 and broadcast.
    let mut flush = cmd(nvm_opcode::FLUSH);
    flush.nsid = 1;
    assert!(h.status(1, flush).is_success());
    flush.nsid = 0xffff_ffff;
    assert!(h.status(1, flush).is_success());

    // Compare equal, then different.
    let mut cmp = rw(
        nvm_opcode::COMPARE,
        0,
        16,
        HOST_BASE + DATA,
        HOST_BASE + DATA + 0x1000,
    );
    assert_eq!(h.status(1, cmp), Status::SUCCESS);
    h.mem.write_at(DATA + 100, &[0xff]).unwrap();
    cmp.cid = 0;
    assert_eq!(h.status(1, cmp), Status::COMPARE_FAILURE);

    // Write Zeroes blocks 2..4.
    let mut wz = cmd(nvm_opcode::WRITE_ZEROES);
    wz.nsid = 1;
    wz.cdw = [2, 0, 1, 0, 0, 0];
    assert!(h.status(1, wz).is_success());
    let img = h.image_bytes();
    assert_eq!(&img[1024..2048], &[0u8; 1024][..]);
    assert_eq!(&img[..1024], &data[..1024]);
    assert_eq!(&img[2048..8192], &data[2048..8192]);

    // DSM deallocate blocks 8..12 and 14 (two ranges, one empty range ignored).
    let mut ranges = Vec::new();
    for (len, slba) in [(4u32, 8u64), (0, 1000), (1, 14)] {
        ranges.extend_from_slice(&0u32.to_le_bytes());
        ranges.extend_from_slice(&len.to_le_bytes());
        ranges.extend_from_slice(&slba.to_le_bytes());
    }
    h.mem.write_at(DATA + 0x8000, &ranges).unwrap();
    let mut dsm = cmd(nvm_opcode::DATASET_MANAGEMENT);
    dsm.nsid = 1;
    dsm.prp1 = HOST_BASE + DATA + 0x8000;
    dsm.cdw = [2, 1 << 2, 0, 0, 0, 0];
    assert!(h.status(1, dsm).is_success());
    let img = h.image_bytes();
    assert_eq!(&img[8 * 512..12 * 512], &[0u8; 2048][..]);
    assert_eq!(&img[14 * 512..15 * 512], &[0u8; 512][..]);
    assert_eq!(&img[12 * 512..14 * 512], &data[12 * 512..14 * 512]);
    assert_eq!(img.len() as u64, IMAGE_BYTES, "deallocate keeps the size");
    // A range beyond the namespace fails the command.
    let mut bad = Vec::new();
    bad.extend_from_slice(&0u32.to_le_bytes());
    bad.extend_from_slice(&8u32.to_le_bytes());
    bad.extend_from_slice(&(IMAGE_BYTES / 512 - 4).to_le_bytes());
    h.mem.write_at(DATA + 0x8000, &bad).unwrap();
    dsm.cdw = [0, 1 << 2, 0, 0, 0, 0];
    dsm.cid = 0;
    assert_eq!(h.status(1, dsm), Status::LBA_OUT_OF_RANGE);
}

#[test]
fn four_k_blocks() {
    let mut h = Harness::with(|c| c.block_size = devlend_nvme::BlockSize::B4096, true);
    h.enable();
    h.create_io_pair(1, 16);
    assert!(h.admin(identify(0, 1, DATA)).status.is_success());
    let ns = h.read_mem(DATA, 4096);
    assert_eq!(ns[130], 12);
    assert_eq!(
        u64::from_le_bytes(ns[0..8].try_into().unwrap()),
        IMAGE_BYTES / 4096
    );
    let data = pattern(4096, 1);
    h.mem.write_at(DATA, &data).unwrap();
    assert!(h.status(1, write(3, 1, DATA)).is_success());
    assert_eq!(&h.image_bytes()[3 * 4096..4 * 4096], &data[..]);
}

#[test]
fn existing_image_is_used_and_missing_image_without_size_fails() {
    let img = TempImage::new();
    std::fs::write(&img.0, pattern(1 << 20, 42)).unwrap();
    let mut cfg = devlend_nvme::NvmeConfig::new(&img.0);
    cfg.create_size = Some(123); // ignored: the file exists
    let mem = std::sync::Arc::new(devlend_memory::SharedMemory::new("t", 4096).unwrap());
    let port = std::sync::Arc::new(MemPort { mem, direct: true });
    let irqs = std::sync::Arc::new(Irqs::default());
    let dev = devlend_nvme::NvmeDevice::new(cfg, port.clone(), irqs.clone()).unwrap();
    drop(dev);
    assert_eq!(std::fs::metadata(&img.0).unwrap().len(), 1 << 20);
    let missing = TempImage::new();
    let cfg = devlend_nvme::NvmeConfig::new(&missing.0);
    assert!(devlend_nvme::NvmeDevice::new(cfg, port, irqs).is_err());
}

#[test]
fn many_queues_in_parallel() {
    let mut h = Harness::new();
    h.enable();
    for q in 1..=4 {
        h.create_io_pair(q, 32);
    }
    // 16 writes per queue to distinct blocks, rung together, then verified.
    for q in 1..=4u16 {
        for i in 0..16u64 {
            let lba = u64::from(q) * 1000 + i * 8;
            let buf = DATA + (u64::from(q) * 16 + i) * 4096;
            h.mem
                .write_at(buf, &pattern(4096, (q as u8) ^ (i as u8)))
                .unwrap();
            h.push(q, write(lba, 8, buf));
        }
    }
    for q in 1..=4 {
        h.ring_sq(q);
    }
    for q in 1..=4 {
        for _ in 0..16 {
            let c = h.reap(q, Duration::from_secs(5)).expect("completion");
            assert!(c.status.is_success());
        }
    }
    let img = h.image_bytes();
    for q in 1..=4u16 {
        for i in 0..16u64 {
            let lba = (u64::from(q) * 1000 + i * 8) as usize;
            assert_eq!(
                &img[lba * 512..lba * 512 + 4096],
                &pattern(4096, (q as u8) ^ (i as u8))[..]
            );
        }
    }
}

/// Doorbell Buffer Config: the driver updates shadow doorbells in memory and rings the MMIO
/// doorbell only when the event index says the controller may be asleep.
///
/// `config_first`: the command comes before the queues are created; otherwise after, as
/// Linux sends it, and after some I/O through the MMIO doorbells.
fn shadow_doorbells(config_first: bool) {
    let mut h = Harness::new();
    h.enable();
    let shadow = 0xf_0000u64;
    let events = 0xf_1000u64;
    let dbbc = Command {
        opcode: admin_opcode::DOORBELL_BUFFER_CONFIG,
        prp1: HOST_BASE + shadow,
        prp2: HOST_BASE + events,
        ..Command::default()
    };
    if config_first {
        assert!(h.admin(dbbc).status.is_success());
        h.create_io_pair(1, 32);
    } else {
        h.create_io_pair(1, 32);
        for _ in 0..5 {
            assert!(h.status(1, read(0, 1, DATA)).is_success());
        }
        assert!(h.admin(dbbc).status.is_success());
        // The controller seeded the shadow slots with the values it had.
        assert_eq!(h.mem.load_u32(shadow + 8).unwrap(), 5);
        assert_eq!(h.mem.load_u32(shadow + 12).unwrap(), 5);
        // The admin queue stays on MMIO doorbells.
        assert!(h.admin(identify(1, 0, DATA)).status.is_success());
    }
    let need_event = |event: u16, new: u16, old: u16| {
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    };
    let mut mmio_rings = 0;
    let mut old_tail = h.queues[1].as_ref().unwrap().sq_tail as u16;
    let mut old_head = h.queues[1].as_ref().unwrap().cq_head as u16;
    for i in 0..200u64 {
        h.mem.write_at(DATA, &pattern(512, i as u8)).unwrap();
        h.push(1, write(i, 1, DATA));
        let tail = h.queues[1].as_ref().unwrap().sq_tail as u16;
        h.mem.store_u32(shadow + 8, u32::from(tail)).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let ev = h.mem.load_u32(events + 8).unwrap() as u16;
        if need_event(ev, tail, old_tail) {
            h.ring_sq(1);
            mmio_rings += 1;
        }
        old_tail = tail;
        // Reap without the MMIO CQ doorbell: update the shadow head instead.
        let q = h.queues[1].as_mut().unwrap();
        let at = q.cq_base + u64::from(q.cq_head) * 16;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let dw3 = h.mem.load_u32(at + 12).unwrap();
            if (dw3 & (1 << 16) != 0) == q.phase {
                assert_eq!((dw3 >> 17) & 0x7ff, 0, "write {i} failed");
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "write {i} not completed"
            );
            std::thread::yield_now();
        }
        q.cq_head = (q.cq_head + 1) % q.cq_entries;
        if q.cq_head == 0 {
            q.phase = !q.phase;
        }
        let head = q.cq_head as u16;
        h.mem.store_u32(shadow + 12, u32::from(head)).unwrap();
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let ev = h.mem.load_u32(events + 12).unwrap() as u16;
        if need_event(ev, head, old_head) {
            h.write32(0x1000 + 12, u32::from(head));
        }
        old_head = head;
        if i % 50 == 0 {
            // Let the worker go to sleep: it publishes the tail it has consumed as the event
            // index, so the next shadow update rings the MMIO doorbell and wakes it.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while h.mem.load_u32(events + 8).unwrap() as u16 != tail {
                assert!(
                    std::time::Instant::now() < deadline,
                    "SQ event index not published"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    let img = h.image_bytes();
    for i in 0..200usize {
        assert_eq!(
            &img[i * 512..(i + 1) * 512],
            &pattern(512, i as u8)[..],
            "block {i}"
        );
    }
    // How many submissions needed an MMIO ring depends on how often the worker slept.
    assert!((4..=200).contains(&mmio_rings), "MMIO rings: {mmio_rings}");
    let stats = h.dev.stats();
    assert!(stats.doorbell_writes >= mmio_rings);
    assert!(stats.sleeps >= 4 && stats.wakeups >= 1, "{stats:?}");
}

#[test]
fn shadow_doorbells_configured_before_queues() {
    shadow_doorbells(true);
}

#[test]
fn shadow_doorbells_configured_after_queues_like_linux() {
    shadow_doorbells(false);
}

#[test]
fn read_only_image_rejects_writes() {
    let img = TempImage::new();
    std::fs::write(&img.0, pattern(1 << 20, 9)).unwrap();
    let path = img.0.clone();
    let mut h = Harness::with(
        move |c| {
            c.image = path;
            c.read_only = true;
        },
        true,
    );
    h.enable();
    h.create_io_pair(1, 16);
    assert!(h.admin(identify(0, 1, DATA)).status.is_success());
    assert_eq!(h.read_mem(DATA + 99, 1), [1], "NSATTR write protected");
    assert_eq!(
        h.status(1, write(0, 1, DATA)),
        Status::NAMESPACE_WRITE_PROTECTED
    );
    assert!(h.status(1, read(0, 8, DATA)).is_success());
    assert_eq!(h.read_mem(DATA, 4096), pattern(1 << 20, 9)[..4096]);
    drop(img);
}

/// Rough per-command cost of the model: QD1 4 KiB reads, polled completions. Run with
/// `cargo test --release -p devlend-nvme --test io -- --ignored --nocapture`.
#[test]
#[ignore]
fn qd1_latency_smoke() {
    let mut h = setup(true);
    let blocks = IMAGE_BYTES / 4096;
    let mut lat = Vec::new();
    let mut x = 12345u64;
    for _ in 0..20000 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let lba = (x >> 33) % blocks * 8;
        let t = std::time::Instant::now();
        let c = h.submit(1, read(lba, 8, DATA));
        lat.push(t.elapsed());
        assert!(c.status.is_success());
    }
    lat.sort();
    println!("{:?}", h.dev.stats());
    println!(
        "QD1 4K read: median {:?}, p99 {:?}",
        lat[lat.len() / 2],
        lat[lat.len() * 99 / 100]
    );
}

/// A front-end that maps the doorbell page into the driver: stores there reach the worker by
/// polling, without any BAR write.
#[test]
fn mapped_doorbell_page() {
    let mut h = Harness::with(|c| c.idle_recheck = Duration::from_micros(100), true);
    h.enable();
    h.create_io_pair(1, 16);
    let page = h.dev.doorbell_page();
    assert_eq!(page.len(), 4096);
    for i in 0..50u64 {
        h.mem.write_at(DATA, &pattern(512, i as u8)).unwrap();
        let cid = h.push(1, write(i, 1, DATA));
        let tail = h.queues[1].as_ref().unwrap().sq_tail;
        page.store_u32(8, tail).unwrap(); // SQ 1 tail
        if i % 10 == 0 {
            // Let the worker fall asleep: the bounded idle sleep finds the store.
            std::thread::sleep(Duration::from_millis(2));
        }
        let c = h
            .reap(1, Duration::from_secs(5))
            .expect("completion via mapped doorbell");
        assert_eq!((c.cid, c.status), (cid, Status::SUCCESS));
    }
    let img = h.image_bytes();
    for i in 0..50usize {
        assert_eq!(&img[i * 512..(i + 1) * 512], &pattern(512, i as u8)[..]);
    }
    // BAR writes land in the same page.
    let tail = h.queues[1].as_ref().unwrap().sq_tail;
    page.store_u32(8, 0).unwrap();
    h.write32(0x1000 + 8, tail);
    assert_eq!(page.load_u32(8).unwrap(), tail);
}
