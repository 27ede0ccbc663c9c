//! Lending over the in-process loopback fabric with the pci crate's test device: config
//! forwarding, BAR access, DMA isolation, MSI-X masking, exclusive ownership, leases, surprise
//! removal. (The same behaviours across real processes and `kill -9` are tested in
//! `crates/devlend/tests/`.)

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use devlend_fabric::{AddressSpace, BusAddr, LoopbackNtb, MemoryWindows, Ntb, SharedMemory};
use devlend_lending::{LendingError, Node, NodeConfig};
use devlend_pci::test_device::{self, dma_status, regs, TestDevice, MSIX_BAR, REGS_BAR};
use devlend_pci::{
    AccessSize, BarAccess, ConfigAccess, DmaAlloc, FunctionError, Interrupts, PciFunction,
};

struct Hosts {
    lender: Node,
    borrowers: Vec<Node>,
    links: Vec<(Arc<LoopbackNtb>, Arc<LoopbackNtb>)>,
}

/// A lender linked to `n` borrowers (one loopback link each), lending one test device "td0".
fn hosts(n: usize, lease: Duration) -> Hosts {
    let lender_asp = Arc::new(AddressSpace::new());
    let mut links = Vec::new();
    let mut borrowers = Vec::new();
    for i in 0..n {
        let (l, b) = common::link_from(lender_asp.clone());
        let mut cfg = NodeConfig::new(format!("borrower{i}"));
        cfg.lease = lease;
        borrowers.push(Node::start(cfg, vec![b.clone() as Arc<dyn Ntb>]).unwrap());
        links.push((l, b));
    }
    let mut cfg = NodeConfig::new("lender");
    cfg.lease = lease;
    let lender = Node::start(
        cfg,
        links
            .iter()
            .map(|(l, _)| l.clone() as Arc<dyn Ntb>)
            .collect(),
    )
    .unwrap();
    common::add_td0(&lender);
    Hosts {
        lender,
        borrowers,
        links,
    }
}

fn enable(f: &dyn PciFunction) {
    // Memory space + bus master, as a driver's probe does.
    f.config_write(0x04, AccessSize::Word, 0x0006).unwrap();
}

fn msix_cap(f: &dyn PciFunction) -> u16 {
    let mut ptr = f.config_read(0x34, AccessSize::Byte).unwrap() as u16;
    for _ in 0..48 {
        assert_ne!(ptr, 0, "no MSI-X capability");
        if f.config_read(ptr, AccessSize::Byte).unwrap() == 0x11 {
            return ptr;
        }
        ptr = f.config_read(ptr + 1, AccessSize::Byte).unwrap() as u16;
    }
    panic!("capability list loops");
}

fn enable_msix(f: &dyn PciFunction, unmask: &[u16]) {
    let cap = msix_cap(f);
    let ctrl = f.config_read(cap + 2, AccessSize::Word).unwrap();
    f.config_write(cap + 2, AccessSize::Word, (ctrl | 0x8000) & !0x4000)
        .unwrap();
    for v in unmask {
        f.bar_write_u32(MSIX_BAR, u64::from(*v) * 16 + 12, 0)
            .unwrap();
    }
}

#[test]
fn config_is_forwarded_and_bars_are_virtual() {
    let h = hosts(1, Duration::from_secs(5));
    let f = h.borrowers[0].borrow("td0").unwrap();
    let id = f.config_read(0, AccessSize::Dword).unwrap();
    assert_eq!(
        id,
        u32::from(test_device::DEVICE_ID) << 16 | u32::from(test_device::VENDOR_ID)
    );
    // BAR sizing answered from the device's masks; placement is the borrower's own.
    f.config_write(0x10, AccessSize::Dword, 0xffff_ffff)
        .unwrap();
    f.config_write(0x14, AccessSize::Dword, 0xffff_ffff)
        .unwrap();
    let lo = f.config_read(0x10, AccessSize::Dword).unwrap();
    assert_eq!(lo & !0xf, !(test_device::BAR_SIZE as u32 - 1));
    assert_eq!(lo & 0x6, 0x4, "64-bit memory BAR");
    assert_eq!(f.config_read(0x14, AccessSize::Dword).unwrap(), 0xffff_ffff);
    f.config_write(0x10, AccessSize::Dword, 0xfeb0_0000)
        .unwrap();
    assert_eq!(
        f.config_read(0x10, AccessSize::Dword).unwrap() & !0xf,
        0xfeb0_0000
    );
    // Bad accesses are errors, not panics.
    assert!(matches!(
        f.config_read(0x1001, AccessSize::Byte),
        Err(FunctionError::BadConfigAccess { .. })
    ));
    assert!(matches!(
        f.config_read(0x11, AccessSize::Dword),
        Err(FunctionError::BadConfigAccess { .. })
    ));
    // Command register reaches the device.
    enable(&*f);
    assert_eq!(f.config_read(0x04, AccessSize::Word).unwrap() & 0x6, 0x6);
}

#[test]
fn bar_access_goes_through_the_window() {
    let h = hosts(1, Duration::from_secs(5));
    let f = h.borrowers[0].borrow("td0").unwrap();
    enable(&*f);
    assert_eq!(
        f.bar_read_u32(REGS_BAR, regs::MAGIC).unwrap(),
        test_device::MAGIC
    );
    f.bar_write_u64(REGS_BAR, regs::SCRATCH, 0x1234_5678_9abc_def0)
        .unwrap();
    assert_eq!(
        f.bar_read_u64(REGS_BAR, regs::SCRATCH).unwrap(),
        0x1234_5678_9abc_def0
    );
    assert!(matches!(
        f.bar_read_u32(REGS_BAR, test_device::BAR_SIZE - 2),
        Err(FunctionError::BadBarAccess { .. })
    ));
    let bar5 = devlend_pci::BarIndex::new(5).unwrap();
    assert!(matches!(
        f.bar_read_u32(bar5, 0),
        Err(FunctionError::NoSuchBar(5))
    ));
}

#[test]
fn device_dma_reaches_granted_memory_and_nothing_else() {
    let h = hosts(1, Duration::from_secs(5));
    let f = h.borrowers[0].borrow("td0").unwrap();
    enable(&*f);
    let src = f.dma_alloc(4096).unwrap();
    let dst = f.dma_alloc(4096).unwrap();
    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    src.write_at(0, &data).unwrap();
    let dma = |s: u64, d: u64, len: u32| {
        f.bar_write_u64(REGS_BAR, regs::DMA_SRC, s).unwrap();
        f.bar_write_u64(REGS_BAR, regs::DMA_DST, d).unwrap();
        f.bar_write_u32(REGS_BAR, regs::DMA_LEN, len).unwrap();
        f.bar_write_u32(REGS_BAR, regs::DMA_GO, 1).unwrap();
        f.bar_read_u32(REGS_BAR, regs::DMA_STATUS).unwrap()
    };
    assert_eq!(
        dma(src.bus_addr().0, dst.bus_addr().0, 4096),
        dma_status::OK
    );
    let mut back = vec![0u8; 4096];
    dst.read_at(0, &mut back).unwrap();
    assert_eq!(back, data, "the device's DMA landed in borrower memory");

    // Borrower memory that was never granted: the device cannot reach it.
    let secret = Arc::new(SharedMemory::new("secret", 8192).unwrap());
    secret.fill(0, 8192, 0xAA).unwrap();
    let ntb = h.borrowers[0].ntb(0).unwrap();
    let asp = ntb.address_space();
    asp.add_ram(BusAddr(0x9000_0000), secret.clone()).unwrap();
    assert_eq!(
        dma(src.bus_addr().0, 0x9000_0000, 4096),
        dma_status::UNMAPPED
    );
    // A copy that starts inside the grant and runs past its end writes nothing at all.
    let pool_end = dst.bus_addr().0 + 64 * 1024 * 1024; // beyond the 64 MiB pool
    assert_eq!(
        dma(src.bus_addr().0, pool_end - 2048, 4096),
        dma_status::UNMAPPED
    );
    let mut s = vec![0u8; 8192];
    secret.read_at(0, &mut s).unwrap();
    assert!(
        s.iter().all(|b| *b == 0xAA),
        "no byte outside the grant changed"
    );
}

#[test]
fn msix_masks_and_pending_bits_are_honoured() {
    let h = hosts(1, Duration::from_secs(5));
    let f = h.borrowers[0].borrow("td0").unwrap();
    enable(&*f);
    enable_msix(&*f, &[]);
    assert_eq!(f.interrupt_vectors(), test_device::VECTORS);
    // Vector 1 is masked (power-on state): firing it only sets its pending bit.
    f.bar_write_u32(REGS_BAR, regs::IRQ_FIRE, 1).unwrap();
    assert!(!f.wait_interrupt(1, Duration::from_millis(50)).unwrap());
    let pba = f
        .bar_read_u64(MSIX_BAR, u64::from(test_device::MSIX_PBA_OFFSET))
        .unwrap();
    assert_eq!(pba & 0b10, 0b10, "pending bit set while masked");
    // Unmasking delivers it.
    f.bar_write_u32(MSIX_BAR, 16 + 12, 0).unwrap();
    assert!(f.wait_interrupt(1, Duration::from_secs(5)).unwrap());
    let pba = f
        .bar_read_u64(MSIX_BAR, u64::from(test_device::MSIX_PBA_OFFSET))
        .unwrap();
    assert_eq!(pba & 0b10, 0);
    // Unmasked vector 2 fires straight through.
    f.bar_write_u32(MSIX_BAR, 2 * 16 + 12, 0).unwrap();
    f.bar_write_u32(REGS_BAR, regs::IRQ_FIRE, 2).unwrap();
    assert!(f.wait_interrupt(2, Duration::from_secs(5)).unwrap());
    // Function mask holds everything back.
    let cap = msix_cap(&*f);
    let ctrl = f.config_read(cap + 2, AccessSize::Word).unwrap();
    f.config_write(cap + 2, AccessSize::Word, ctrl | 0x4000)
        .unwrap();
    f.bar_write_u32(REGS_BAR, regs::IRQ_FIRE, 2).unwrap();
    assert!(!f.wait_interrupt(2, Duration::from_millis(50)).unwrap());
    f.config_write(cap + 2, AccessSize::Word, ctrl & !0x4000)
        .unwrap();
    assert!(f.wait_interrupt(2, Duration::from_secs(5)).unwrap());
    assert!(matches!(
        f.wait_interrupt(9, Duration::ZERO),
        Err(FunctionError::NoSuchVector { .. })
    ));
}

#[test]
fn one_borrower_at_a_time_and_return_resets() {
    let h = hosts(2, Duration::from_secs(5));
    let f = h.borrowers[0].borrow("td0").unwrap();
    enable(&*f);
    f.bar_write_u64(REGS_BAR, regs::SCRATCH, 77).unwrap();
    let err = h.borrowers[1].borrow("td0").unwrap_err();
    assert!(
        err.to_string().contains("borrower0"),
        "refusal names the holder: {err}"
    );
    let listed = h.borrowers[1].peer_devices().unwrap();
    assert_eq!(listed[0].borrower.as_deref(), Some("borrower0"));
    h.borrowers[0].give_back("td0").unwrap();
    assert!(matches!(
        f.bar_read_u64(REGS_BAR, regs::SCRATCH),
        Err(FunctionError::Removed(_))
    ));
    // The second borrower gets it, reset (scratch and command register back to power-on).
    let g = h.borrowers[1].borrow("td0").unwrap();
    assert_eq!(g.config_read(0x04, AccessSize::Word).unwrap() & 0x6, 0);
    enable(&*g);
    assert_eq!(g.bar_read_u64(REGS_BAR, regs::SCRATCH).unwrap(), 0);
    assert_eq!(
        h.lender.local_devices()[0].borrower.as_deref(),
        Some("borrower1")
    );
}

#[test]
fn a_silent_borrower_loses_the_device_when_its_lease_expires() {
    let h = hosts(2, Duration::from_millis(300));
    let f = h.borrowers[0].borrow("td0").unwrap();
    // The borrower host goes silent: no heartbeats, no return (as after kill -9).
    let Hosts {
        lender,
        borrowers,
        links,
    } = h;
    links[0].1.link_down();
    let deadline = Instant::now() + Duration::from_secs(30);
    while lender.local_devices()[0].borrower.is_some() {
        assert!(Instant::now() < deadline, "lease never expired");
        std::thread::sleep(Duration::from_millis(10));
    }
    // Offered again: the other borrower gets it.
    let g = borrowers[1].borrow("td0").unwrap();
    enable(&*g);
    assert_eq!(
        g.bar_read_u32(REGS_BAR, regs::MAGIC).unwrap(),
        test_device::MAGIC
    );
    drop((f, links));
}

#[test]
fn a_vanished_lender_is_a_surprise_removal() {
    let h = hosts(1, Duration::from_secs(5));
    let f = h.borrowers[0].borrow("td0").unwrap();
    enable(&*f);
    enable_msix(&*f, &[0]);
    let waiter = {
        let f = f.clone();
        std::thread::spawn(move || f.wait_interrupt(0, Duration::from_secs(60)))
    };
    h.links[0].0.link_down();
    let r = waiter.join().unwrap();
    assert!(
        matches!(r, Err(FunctionError::Removed(_))),
        "waiter ended with {r:?}"
    );
    assert!(matches!(
        f.bar_read_u32(REGS_BAR, regs::MAGIC),
        Err(FunctionError::Removed(_))
    ));
    assert!(matches!(
        f.config_read(0, AccessSize::Dword),
        Err(FunctionError::Removed(_))
    ));
    assert!(matches!(f.dma_alloc(4096), Err(FunctionError::Removed(_))));
    let e = h.borrowers[0].borrow("td0").unwrap_err();
    assert!(
        matches!(e, LendingError::LinkDown | LendingError::Timeout),
        "{e}"
    );
}

/// A test device whose reset waits until the test lets it go: a function whose FLR is slow
/// (or a model whose worker waits on a DMA read from a peer that stopped answering).
struct SlowReset {
    inner: Arc<dyn devlend_pci::PciDevice>,
    entered: std::sync::mpsc::SyncSender<()>,
    gate: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl devlend_pci::PciDevice for SlowReset {
    fn config_read(&self, offset: u16, size: AccessSize) -> u32 {
        self.inner.config_read(offset, size)
    }
    fn config_write(&self, offset: u16, size: AccessSize, value: u32) {
        self.inner.config_write(offset, size, value)
    }
    fn bar_spec(&self, bar: devlend_pci::BarIndex) -> Option<devlend_pci::BarSpec> {
        self.inner.bar_spec(bar)
    }
    fn bar_read(&self, bar: devlend_pci::BarIndex, offset: u64, data: &mut [u8]) {
        self.inner.bar_read(bar, offset, data)
    }
    fn bar_write(&self, bar: devlend_pci::BarIndex, offset: u64, data: &[u8]) {
        self.inner.bar_write(bar, offset, data)
    }
    fn reset(&self) {
        // Resets before the first lease (none here) and at every lease's end wait for the
        // test: it sends one message per reset it lets through.
        let _ = self.entered.try_send(());
        if let Ok(gate) = self.gate.lock() {
            let _ = gate.recv();
        }
        self.inner.reset()
    }
    fn msix_vectors(&self) -> u16 {
        self.inner.msix_vectors()
    }
    fn kind(&self) -> &'static str {
        "slow-reset"
    }
}

#[test]
fn a_slow_reset_holds_only_its_own_device() {
    let h = hosts(2, Duration::from_secs(5));
    let (entered_tx, entered) = std::sync::mpsc::sync_channel(4);
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let slot = std::sync::Mutex::new(Some((entered_tx, gate)));
    h.lender
        .add_device(
            "slow",
            "test device with a slow reset",
            Box::new(move |dma, irq| {
                let inner = TestDevice::build(dma, irq).map_err(|e| e.to_string())?;
                let (entered, gate) = slot
                    .lock()
                    .map_err(|e| e.to_string())?
                    .take()
                    .ok_or("built twice")?;
                Ok(Arc::new(SlowReset {
                    inner,
                    entered,
                    gate: std::sync::Mutex::new(gate),
                }) as Arc<dyn devlend_pci::PciDevice>)
            }),
        )
        .unwrap();
    let other = h.borrowers[1].borrow("td0").unwrap();
    enable(&*other);
    let slow = h.borrowers[0].borrow("slow").unwrap();
    enable(&*slow);

    std::thread::scope(|scope| {
        // Returning `slow` enters its reset and stays there until released.
        let returner = scope.spawn(|| h.borrowers[0].give_back("slow"));
        entered
            .recv_timeout(Duration::from_secs(60))
            .expect("the return reaches the device's reset");

        // Meanwhile the other device's borrower is served: config and BAR accesses answer
        // (before, the lender's whole table was locked for the reset).
        let (done_tx, done) = std::sync::mpsc::channel();
        let other = &other;
        scope.spawn(move || {
            let r = other.config_read(0x00, AccessSize::Dword);
            let m = other.bar_read_u32(REGS_BAR, regs::MAGIC);
            let _ = done_tx.send((r.map_err(|e| e.to_string()), m.map_err(|e| e.to_string())));
        });
        let Ok((id, magic)) = done.recv_timeout(Duration::from_secs(60)) else {
            release.send(()).unwrap();
            panic!("another device's accesses were not answered while one device was being reset");
        };
        // The device being reset is not offered yet, and says so.
        let refused = h.borrowers[1].borrow("slow").map(|_| ());
        release.send(()).unwrap();
        assert!(id.is_ok(), "{id:?}");
        assert_eq!(magic, Ok(test_device::MAGIC));
        let err = refused.unwrap_err();
        assert!(err.to_string().contains("being reset"), "{err}");
        returner.join().unwrap().unwrap();
    });
    // Reset done: offered again.
    let again = h.borrowers[1].borrow("slow").unwrap();
    assert_eq!(again.config_read(0x04, AccessSize::Word).unwrap() & 0x6, 0);
    drop((again, other, slow));
}

#[test]
fn a_window_cleared_before_the_revocation_notice_is_a_removal() {
    let h = hosts(1, Duration::from_secs(5));
    let f = h.borrowers[0].borrow("td0").unwrap();
    enable(&*f);
    // The lender ends a lease by clearing its windows first and telling the borrower after:
    // an access in between finds the window gone, and that is the device taken away, not
    // a transport fault the driver might retry.
    let lender_end = &h.links[0].0;
    for w in 0..lender_end.mw_count() {
        let _ = lender_end.mw_clear_trans(w);
    }
    let r = f.bar_read_u32(REGS_BAR, regs::MAGIC);
    assert!(matches!(r, Err(FunctionError::Removed(_))), "{r:?}");
    // And it stays removed: later accesses fail the same way without touching the fabric.
    let r = f.bar_write_u64(REGS_BAR, regs::SCRATCH, 1);
    assert!(matches!(r, Err(FunctionError::Removed(_))), "{r:?}");
}
