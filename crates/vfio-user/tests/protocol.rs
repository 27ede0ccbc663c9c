//! The server against a mock function: the start-up sequence QEMU sends, DMA landing in the
//! client's memory, MSI-X routing, reset, and cleanup when the client leaves.

mod common;

use std::io::{Read, Seek, SeekFrom};
use std::os::unix::net::UnixStream;

use common::*;
use devlend_vfio_user::Server;
use vmm_sys_util::eventfd::EventFd;

const EVENTFD_TRIGGER: u32 = (1 << 2) | (1 << 5);

#[test]
fn startup_sequence_and_regions() {
    let f = MockFunction::new();
    let mut c = start(f.clone());
    let v = c.version();
    assert!(!v.is_error());
    assert_eq!(&v.payload[..4], &[0, 0, 0, 0]);
    assert_eq!(v.payload.last(), Some(&0), "JSON is NUL-terminated");

    let info = c.call(
        4,
        &16u32
            .to_le_bytes()
            .iter()
            .chain(&[0u8; 12])
            .copied()
            .collect::<Vec<_>>(),
        &[],
    );
    assert!(!info.is_error());
    assert_eq!(info.u32_at(4), 3, "PCI | RESET");
    assert_eq!(info.u32_at(8), 9);
    assert_eq!(info.u32_at(12), 5);

    let bar0 = c.call(5, &info_req(32, 0), &[]);
    assert_eq!(bar0.u32_at(4), 3, "read | write, no mmap");
    assert_eq!(bar0.u64_at(16), BAR0_SIZE);
    let bar1 = c.call(5, &info_req(32, 1), &[]);
    assert_eq!(
        (bar1.u32_at(4), bar1.u64_at(16)),
        (0, 0),
        "upper half of a 64-bit BAR"
    );
    let cfg = c.call(5, &info_req(32, 7), &[]);
    assert_eq!(cfg.u64_at(16), 4096);

    let msix = c.call(7, &info_req(16, 2), &[]);
    assert_eq!(msix.u32_at(12), VECTORS as u32);
    let err = c.call(7, &info_req(16, 3), &[]);
    assert_eq!(err.u32_at(12), 0);

    // The whole config space in one read, as QEMU does at realize.
    let all = c.call(9, &region_rw(0, 7, 4096, &[]), &[]);
    assert!(!all.is_error());
    assert_eq!(all.payload.len(), 16 + 4096);
    assert_eq!(&all.payload[16..20], &[0x34, 0x12, 0x78, 0x56]);
    assert_eq!(all.payload[16 + 0x40], 0x11);

    // A posted BAR write gets no reply; the read after it sees it.
    c.send(10, 0x10, &region_rw(0x1000, 0, 4, &[1, 2, 3, 4]), &[]);
    let rd = c.call(9, &region_rw(0x1000, 0, 4, &[]), &[]);
    assert_eq!(&rd.payload[16..], &[1, 2, 3, 4]);
    // A non-posted write gets a reply without data.
    let wr = c.call(10, &region_rw(0x1004, 0, 4, &[5, 6, 7, 8]), &[]);
    assert!(!wr.is_error());
    assert_eq!(wr.payload.len(), 16);

    // Odd-sized config write through to the function.
    let wr = c.call(10, &region_rw(0x04, 7, 2, &[0x06, 0x00]), &[]);
    assert!(!wr.is_error());
    assert_eq!(f.state.lock().unwrap().config[4], 0x06);

    let reset = c.call(13, &[], &[]);
    assert!(!reset.is_error());
    assert_eq!(f.state.lock().unwrap().flrs, 1);
    c.close();
}

#[test]
fn dma_lands_in_client_memory_and_is_unmapped() {
    let f = MockFunction::new();
    let mut c = negotiated(f.clone());
    let ram = memfd(0x20_0000);
    let r = c.call(
        2,
        &dma_map(3, 0x10_0000, 0x8000_0000, 0x10_0000),
        &[raw(&ram)],
    );
    assert!(!r.is_error(), "errno {}", r.errno());
    // An fd-less map (ROM) is accepted and recorded.
    let r = c.call(2, &dma_map(1, 0, 0xc_0000, 0x2_0000), &[]);
    assert!(!r.is_error());
    {
        let s = f.state.lock().unwrap();
        assert_eq!(s.maps.len(), 1);
        let (iova, span, writable) = &s.maps[0];
        assert_eq!(
            (*iova, span.len(), *writable),
            (0x8000_0000, 0x10_0000, true)
        );
        span.write_at(0x10, b"device wrote this").unwrap();
    }
    let mut buf = [0u8; 17];
    let mut file = &ram;
    file.seek(SeekFrom::Start(0x10_0010)).unwrap();
    file.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"device wrote this", "zero-copy: the same pages");

    let r = c.call(3, &dma_unmap(0, 0x8000_0000, 0x10_0000), &[]);
    assert!(!r.is_error());
    assert_eq!(r.payload.len(), 24, "the unmap is echoed");
    assert_eq!(
        f.state.lock().unwrap().unmaps,
        vec![(0x8000_0000, 0x10_0000)]
    );
    // Unmap-all removes the rest.
    let r = c.call(3, &dma_unmap(2, 0, 0), &[]);
    assert!(!r.is_error());
    c.close();
}

#[test]
fn msix_eventfds_route_unmask_and_deassign() {
    let f = MockFunction::new();
    let mut c = negotiated(f.clone());
    // QEMU's first step without NORESIZE: vector 0, no fd (deassign).
    let r = c.call(8, &set_irqs(EVENTFD_TRIGGER, 2, 0, 1), &[]);
    assert!(!r.is_error());
    let evs: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    let r = c.call(
        8,
        &set_irqs(EVENTFD_TRIGGER, 2, 1, 2),
        &[raw(&evs[0]), raw(&evs[1])],
    );
    assert!(!r.is_error(), "errno {}", r.errno());
    assert!(f.vector_masked(0));
    assert!(!f.vector_masked(1) && !f.vector_masked(2));
    {
        let s = f.state.lock().unwrap();
        assert!(s.routes[0].is_none() && s.routes[1].is_some() && s.routes[2].is_some());
        // The function fires vector 2: the client's eventfd sees it.
        s.routes[2].as_ref().unwrap().write(1).unwrap();
    }
    assert_eq!(evs[1].read().unwrap(), 1);
    // Deassign vector 1.
    let r = c.call(8, &set_irqs(EVENTFD_TRIGGER, 2, 1, 1), &[]);
    assert!(!r.is_error());
    assert!(f.vector_masked(1));
    assert!(f.state.lock().unwrap().routes[1].is_none());
    // Disable all: DATA_NONE | TRIGGER, count 0.
    let r = c.call(8, &set_irqs(1 | (1 << 5), 2, 0, 0), &[]);
    assert!(!r.is_error());
    assert!(f.state.lock().unwrap().routes.iter().all(|r| r.is_none()));
    assert!(f.vector_masked(2));
    c.close();
}

#[test]
fn a_client_that_leaves_gets_the_device_cleaned_up_and_the_next_is_served() {
    let f = MockFunction::new();
    let dir = std::env::temp_dir().join(format!("vfio-user-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = RemoveDir(dir.clone());
    let path = dir.join("sock");
    let server = Server::new(f.clone()).unwrap();
    let stats = server.stats();
    let p = path.clone();
    std::thread::spawn(move || server.serve(&p));
    let connect = || loop {
        // The listener may not be bound yet: retry until it is (bounded).
        match UnixStream::connect(&path) {
            Ok(s) => break s,
            Err(_) => std::thread::yield_now(),
        }
    };
    for round in 0..2u64 {
        let mut c = Client::new(connect());
        c.version();
        let ram = memfd(0x1_0000);
        let r = c.call(2, &dma_map(3, 0, 0x1000_0000, 0x1_0000), &[raw(&ram)]);
        assert!(!r.is_error());
        let ev = EventFd::new(0).unwrap();
        let r = c.call(8, &set_irqs(EVENTFD_TRIGGER, 2, 0, 1), &[raw(&ev)]);
        assert!(!r.is_error());
        assert!(!f.vector_masked(0));
        // Leave abruptly, a posted write still in flight.
        c.send(10, 0x10, &region_rw(0x100, 0, 4, &[9, 9, 9, 9]), &[]);
        drop(c);
        // The next client's first reply proves the previous teardown ran (same thread, in
        // order), so check the state after it.
        let mut probe = Client::new(connect());
        probe.version();
        {
            let s = f.state.lock().unwrap();
            assert!(s.maps.is_empty(), "round {round}: DMA unmapped");
            assert!(
                s.routes.iter().all(|r| r.is_none()),
                "round {round}: routes removed"
            );
            // Every client so far was reset when it left (this round's and the previous probe).
            assert_eq!(
                s.flrs as u64,
                2 * round + 1,
                "round {round}: function reset"
            );
        }
        assert!(f.vector_masked(0));
        drop(probe);
    }
    assert!(stats.snapshot().clients >= 3);
}

/// Removes a test's directory (and the socket in it) when the test ends, passed or failed.
struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
