//! Malformed, truncated, oversized and unexpected input: an error reply (or, for a posted
//! message, silence), never a panic, and the next well-formed message still works.

mod common;

use common::*;
use devlend_vfio_user::wire::{HEADER_LEN, MAX_MESSAGE};
use vmm_sys_util::eventfd::EventFd;

const EINVAL: i32 = libc::EINVAL;

/// The next well-formed request still works (stream in sync).
fn still_works(c: &mut Client) {
    let r = c.call(9, &region_rw(0, 7, 4, &[]), &[]);
    assert!(!r.is_error(), "follow-up failed: errno {}", r.errno());
    assert_eq!(&r.payload[16..20], &[0x34, 0x12, 0x78, 0x56]);
}

#[test]
fn framing_errors_keep_the_stream_in_sync() {
    let mut c = negotiated(MockFunction::new());
    // size < 16: only the header is consumed.
    let h = command_header(77, 4, 3);
    c.send_raw(&h.encode(), &[]);
    let r = c.recv();
    assert!(r.is_error());
    assert_eq!((r.header.msg_id, r.errno()), (77, EINVAL));
    still_works(&mut c);

    // Oversized: drained and refused with E2BIG.
    let size = MAX_MESSAGE + 100;
    let h = command_header(78, 10, size);
    let mut m = h.encode().to_vec();
    m.resize(size as usize, 0xab);
    c.send_raw(&m, &[]);
    let r = c.recv();
    assert_eq!((r.header.msg_id, r.errno()), (78, libc::E2BIG));
    still_works(&mut c);

    // Truncated payloads for every command that has one.
    for cmd in [1u16, 2, 3, 4, 5, 7, 8, 9, 10] {
        let r = c.call(cmd, &[1, 2], &[]);
        assert!(r.is_error(), "command {cmd} with 2 payload bytes");
        assert_eq!(r.errno(), EINVAL, "command {cmd}");
    }
    still_works(&mut c);

    // Unknown and unsupported commands.
    for cmd in [0u16, 6, 11, 12, 14, 15, 16, 999, u16::MAX] {
        let r = c.call(cmd, &[0u8; 32], &[]);
        assert!(r.is_error(), "command {cmd}");
        assert_eq!(r.errno(), libc::ENOTSUP, "command {cmd}");
    }
    still_works(&mut c);

    // A region write whose count disagrees with its data.
    let r = c.call(10, &region_rw(0, 0, 8, &[1, 2, 3, 4]), &[]);
    assert_eq!(r.errno(), EINVAL);
    // Zero and huge counts.
    let r = c.call(9, &region_rw(0, 0, 0, &[]), &[]);
    assert_eq!(r.errno(), EINVAL);
    let r = c.call(9, &region_rw(0, 7, u32::MAX, &[]), &[]);
    assert_eq!(r.errno(), EINVAL);
    // Bad VERSION JSON, and a major version we do not speak.
    let r = c.call(1, b"\0\0\0\0{not json", &[]);
    assert_eq!(r.errno(), EINVAL);
    let r = c.call(1, b"\x01\0\0\0{}\0", &[]);
    assert!(r.is_error());
    // A message typed as a reply is dropped without an answer.
    c.send(4, 1, &info_req(16, 0), &[]);
    still_works(&mut c);
    c.close();
}

#[test]
fn region_accesses_out_of_range_are_refused() {
    let mut c = negotiated(MockFunction::new());
    for (region, offset, count) in [
        (7u32, 4095u64, 2u32),
        (7, 4096, 1),
        (0, BAR0_SIZE - 4, 8),
        (0, u64::MAX, 4),
        (0, u64::MAX - 1, 4),
        (1, 0, 4), // upper half of the 64-bit BAR
        (2, 0, 4), // empty BAR slot
        (6, 0, 4), // ROM
        (8, 0, 4), // VGA
        (9, 0, 4), // no such region
        (u32::MAX, 0, 4),
    ] {
        let r = c.call(9, &region_rw(offset, region, count, &[]), &[]);
        assert_eq!(
            r.errno(),
            EINVAL,
            "read region {region} at {offset:#x}+{count}"
        );
        let data = vec![0u8; count as usize];
        let r = c.call(10, &region_rw(offset, region, count, &data), &[]);
        assert_eq!(
            r.errno(),
            EINVAL,
            "write region {region} at {offset:#x}+{count}"
        );
    }
    // A posted write out of range: no reply at all, and the stream is still in sync.
    c.send(10, 0x10, &region_rw(BAR0_SIZE, 0, 4, &[0; 4]), &[]);
    still_works(&mut c);
    // Region and IRQ info for indexes that do not exist.
    assert_eq!(c.call(5, &info_req(32, 9), &[]).errno(), EINVAL);
    assert_eq!(
        c.call(5, &info_req(16, 0), &[]).errno(),
        EINVAL,
        "argsz too small"
    );
    assert_eq!(c.call(7, &info_req(16, 5), &[]).errno(), EINVAL);
    // SET_IRQS beyond the vectors the device has, or on an index with none.
    let ev = EventFd::new(0).unwrap();
    assert_eq!(
        c.call(
            8,
            &set_irqs((1 << 2) | (1 << 5), 2, VECTORS as u32, 1),
            &[raw(&ev)]
        )
        .errno(),
        EINVAL
    );
    assert_eq!(
        c.call(8, &set_irqs(1 | (1 << 5), 1, 0, 1), &[]).errno(),
        EINVAL
    );
    assert_eq!(
        c.call(8, &set_irqs(1 | (1 << 5), 2, u32::MAX, 2), &[])
            .errno(),
        EINVAL
    );
    still_works(&mut c);
    c.close();
}

#[test]
fn overlapping_and_bad_dma_maps_are_refused() {
    let f = MockFunction::new();
    let mut c = negotiated(f.clone());
    let ram = memfd(0x10_0000);
    let ok = c.call(2, &dma_map(3, 0, 0x10_0000, 0x1_0000), &[raw(&ram)]);
    assert!(!ok.is_error());
    for (iova, size) in [
        (0x10_0000, 0x1_0000),
        (0x10_8000, 0x1_0000),
        (0xf_f000, 0x2000),
        (0xf_0000, 0x10_0000),
        (0x10_ffff, 1),
    ] {
        let r = c.call(2, &dma_map(3, 0, iova, size), &[raw(&ram)]);
        assert_eq!(r.errno(), libc::EEXIST, "map {iova:#x}+{size:#x}");
    }
    // Adjacent is fine.
    assert!(!c
        .call(2, &dma_map(3, 0, 0x11_0000, 0x1000), &[raw(&ram)])
        .is_error());
    // Zero size, wrapping range, unknown flags, two fds, unmappable offset.
    assert_eq!(
        c.call(2, &dma_map(3, 0, 0x20_0000, 0), &[raw(&ram)])
            .errno(),
        EINVAL
    );
    assert_eq!(
        c.call(2, &dma_map(3, 0, u64::MAX - 10, 0x1000), &[raw(&ram)])
            .errno(),
        EINVAL
    );
    assert_eq!(
        c.call(2, &dma_map(0x80, 0, 0x20_0000, 0x1000), &[raw(&ram)])
            .errno(),
        EINVAL
    );
    assert_eq!(
        c.call(
            2,
            &dma_map(3, 0, 0x20_0000, 0x1000),
            &[raw(&ram), raw(&ram)]
        )
        .errno(),
        EINVAL
    );
    assert!(c
        .call(2, &dma_map(3, 0x123, 0x20_0000, 0x1000), &[raw(&ram)])
        .is_error());
    // An unmap that would split a mapping; a dirty-bitmap unmap; unmap-all with a range.
    assert_eq!(
        c.call(3, &dma_unmap(0, 0x10_0000, 0x1000), &[]).errno(),
        EINVAL
    );
    assert_eq!(
        c.call(3, &dma_unmap(1, 0x10_0000, 0x1_0000), &[]).errno(),
        libc::ENOTSUP
    );
    assert_eq!(
        c.call(3, &dma_unmap(2, 0x10_0000, 0x1_0000), &[]).errno(),
        EINVAL
    );
    assert_eq!(f.state.lock().unwrap().maps.len(), 2);
    still_works(&mut c);
    c.close();
}

#[test]
fn unsealed_or_short_guest_ram_is_refused() {
    let f = MockFunction::new();
    let mut c = negotiated(f.clone());
    // A VMM's fd that anyone holding it could truncate under our mapping: refused.
    let loose = unsealed_memfd(0x10_0000);
    assert_eq!(
        c.call(2, &dma_map(3, 0, 0x10_0000, 0x1_0000), &[raw(&loose)])
            .errno(),
        libc::EBADF
    );
    // A sealed fd shorter than the range it is to back: refused.
    let small = memfd(0x1_0000);
    assert_eq!(
        c.call(2, &dma_map(3, 0x1000, 0x10_0000, 0x1_0000), &[raw(&small)])
            .errno(),
        libc::EBADF
    );
    assert!(f.state.lock().unwrap().maps.is_empty());
    // A sealed one that covers the range is mapped, and can no longer be truncated.
    assert!(!c
        .call(2, &dma_map(3, 0, 0x10_0000, 0x1_0000), &[raw(&small)])
        .is_error());
    assert!(small.set_len(0).is_err());
    assert_eq!(f.state.lock().unwrap().maps.len(), 1);
    still_works(&mut c);
    c.close();
}

#[test]
fn unexpected_fds_are_closed_and_refused() {
    let mut c = negotiated(MockFunction::new());
    still_works(&mut c);
    let before = open_fds();
    let ev = EventFd::new(0).unwrap();
    let ev2 = EventFd::new(0).unwrap();
    let after_create = open_fds();
    assert_eq!(after_create, before + 2);
    for (cmd, payload) in [
        (4u16, info_req(16, 0)),
        (5, info_req(32, 0)),
        (9, region_rw(0, 7, 4, &[])),
        (10, region_rw(0, 0, 4, &[0; 4])),
        (13, vec![]),
        (3, dma_unmap(0, 0x1000, 0x1000)),
        (8, set_irqs(1 | (1 << 5), 2, 0, 1)),
        (8, set_irqs((1 << 2) | (1 << 3), 2, 0, 1)),
    ] {
        let r = c.call(cmd, &payload, &[raw(&ev), raw(&ev2)]);
        assert!(r.is_error(), "command {cmd} with fds");
        assert_eq!(r.errno(), EINVAL, "command {cmd}");
    }
    // Eventfds for more vectors than the count, and a non-eventfd descriptor.
    let r = c.call(
        8,
        &set_irqs((1 << 2) | (1 << 5), 2, 0, 1),
        &[raw(&ev), raw(&ev2)],
    );
    assert_eq!(r.errno(), EINVAL);
    let ram = memfd(0x1000);
    let r = c.call(8, &set_irqs((1 << 2) | (1 << 5), 2, 0, 1), &[raw(&ram)]);
    assert_eq!(r.errno(), libc::EBADF);
    // Every received duplicate was closed by the server: only ours (and the memfd) remain.
    still_works(&mut c);
    assert_eq!(open_fds(), after_create + 1);
    c.close();
}

#[test]
fn garbage_never_panics() {
    // A deterministic pseudo-random mix of well-framed garbage: the server must answer each
    // command (or stay silent for posted ones) and keep serving.
    let mut c = start(MockFunction::new());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..2000 {
        let cmd = (next() % 17) as u16;
        let len = (next() % 48) as usize;
        let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        let id = c.send(cmd, 0, &payload, &[]);
        let r = c.recv();
        assert_eq!(r.header.msg_id, id);
    }
    still_works(&mut c);
    let _ = HEADER_LEN;
    c.close();
}
