use super::*;
use crate::config::{cap, command, header, msix as msix_cap, pcie};
use crate::msix::{ENTRY_LEN, ENTRY_VECTOR_CONTROL};
use crate::test_device::{self, dma_status, regs, TestDevice, MSIX_BAR, REGS_BAR};
use crate::AccessSize::*;

const NO_WAIT: Duration = Duration::ZERO;
const WAIT: Duration = Duration::from_secs(5);

fn function() -> LocalFunction {
    LocalFunction::new(64 * DMA_PAGE_SIZE, TestDevice::build).unwrap()
}

fn msix_cap_offset(f: &LocalFunction) -> u16 {
    let mut at = f.config_read(header::CAPABILITIES_POINTER, Byte).unwrap() as u16;
    while at != 0 {
        if f.config_read(at, Byte).unwrap() as u8 == cap::ID_MSIX {
            return at;
        }
        at = f.config_read(at + 1, Byte).unwrap() as u16;
    }
    panic!("no MSI-X capability");
}

/// Memory + bus master on, MSI-X enabled, every vector unmasked.
fn enabled() -> LocalFunction {
    let f = function();
    f.config_write(
        header::COMMAND,
        Word,
        u32::from(command::MEMORY_SPACE | command::BUS_MASTER),
    )
    .unwrap();
    let at = msix_cap_offset(&f);
    f.config_write(
        at + msix_cap::CONTROL,
        Word,
        u32::from(msix_cap::CONTROL_ENABLE),
    )
    .unwrap();
    for v in 0..test_device::VECTORS {
        set_vector_mask(&f, v, false);
    }
    f
}

fn set_vector_mask(f: &LocalFunction, vector: u16, masked: bool) {
    let off = u64::from(test_device::MSIX_TABLE_OFFSET)
        + u64::from(vector) * ENTRY_LEN
        + ENTRY_VECTOR_CONTROL;
    f.bar_write_u32(MSIX_BAR, off, u32::from(masked)).unwrap();
}

fn start_dma(f: &LocalFunction, src: BusAddr, dst: BusAddr, len: u32) -> u32 {
    f.bar_write_u64(REGS_BAR, regs::DMA_SRC, src.raw()).unwrap();
    f.bar_write_u64(REGS_BAR, regs::DMA_DST, dst.raw()).unwrap();
    f.bar_write_u32(REGS_BAR, regs::DMA_LEN, len).unwrap();
    f.bar_write_u32(REGS_BAR, regs::DMA_GO, 1).unwrap();
    f.bar_read_u32(REGS_BAR, regs::DMA_STATUS).unwrap()
}

#[test]
fn config_space_is_forwarded() {
    let f = function();
    assert_eq!(f.describe(), "local test-device");
    assert_eq!(f.interrupt_vectors(), 4);
    assert_eq!(
        f.config_read(header::VENDOR_ID, Dword).unwrap(),
        u32::from(test_device::DEVICE_ID) << 16 | u32::from(test_device::VENDOR_ID)
    );
    assert_eq!(
        f.config_read(header::CLASS_CODE - 1, Dword).unwrap() >> 8,
        test_device::CLASS_CODE
    );
    // BAR sizing through the function: 64-bit BAR0, 32-bit BAR2, nothing else.
    let sizes: Vec<(u8, u32)> = (0..6u8)
        .map(|i| {
            let off = header::BAR0 + 4 * u16::from(i);
            f.config_write(off, Dword, 0xffff_ffff).unwrap();
            (i, f.config_read(off, Dword).unwrap())
        })
        .collect();
    assert_eq!(
        sizes,
        vec![
            (0, 0xffff_f004),
            (1, 0xffff_ffff),
            (2, 0xffff_f000),
            (3, 0),
            (4, 0),
            (5, 0)
        ]
    );
    assert_eq!(msix_cap_offset(&f), 0x7c);
}

#[test]
fn bad_config_accesses_are_errors() {
    let f = function();
    for (off, size) in [
        (0x1000, Byte),
        (0xffe, Dword),
        (0x1, Word),
        (0x2, Dword),
        (u16::MAX, Byte),
    ] {
        assert!(
            matches!(f.config_read(off, size), Err(FunctionError::BadConfigAccess { offset, .. }) if offset == off),
            "{off:#x}"
        );
        assert!(matches!(
            f.config_write(off, size, 0),
            Err(FunctionError::BadConfigAccess { .. })
        ));
    }
    assert_eq!(f.config_read(0xfff, Byte).unwrap(), 0);
}

#[test]
fn bar_registers_and_memory_space_enable() {
    let f = function();
    // Memory decoding off: reads all-ones, writes dropped.
    assert_eq!(f.bar_read_u32(REGS_BAR, regs::MAGIC).unwrap(), 0xffff_ffff);
    f.bar_write_u64(REGS_BAR, regs::SCRATCH, 5).unwrap();
    f.config_write(header::COMMAND, Word, u32::from(command::MEMORY_SPACE))
        .unwrap();
    assert_eq!(
        f.bar_read_u32(REGS_BAR, regs::MAGIC).unwrap(),
        test_device::MAGIC
    );
    assert_eq!(f.bar_read_u64(REGS_BAR, regs::SCRATCH).unwrap(), 0);
    f.bar_write_u64(REGS_BAR, regs::SCRATCH, 0x1122_3344_5566_7788)
        .unwrap();
    f.bar_write_u32(REGS_BAR, regs::SCRATCH + 4, 0xaabb_ccdd)
        .unwrap();
    assert_eq!(
        f.bar_read_u64(REGS_BAR, regs::SCRATCH).unwrap(),
        0xaabb_ccdd_5566_7788
    );
    // The magic is read-only; unused register space reads zero.
    f.bar_write_u32(REGS_BAR, regs::MAGIC, 0).unwrap();
    assert_eq!(
        f.bar_read_u32(REGS_BAR, regs::MAGIC).unwrap(),
        test_device::MAGIC
    );
    assert_eq!(f.bar_read_u32(REGS_BAR, 0xffc).unwrap(), 0);
    // Odd sizes the device does not decode read all-ones.
    let mut b = [0u8; 2];
    f.bar_read(REGS_BAR, 0, &mut b).unwrap();
    assert_eq!(b, [0xff, 0xff]);
}

#[test]
fn bad_bar_accesses_are_errors() {
    let f = function();
    let mut four = [0u8; 4];
    for bar in [1u8, 3, 4, 5] {
        let idx = BarIndex::new(bar).unwrap();
        assert!(
            matches!(f.bar_read(idx, 0, &mut four), Err(FunctionError::NoSuchBar(b)) if b == bar)
        );
        assert!(matches!(
            f.bar_write(idx, 0, &four),
            Err(FunctionError::NoSuchBar(_))
        ));
    }
    let cases: &[(u64, usize)] = &[
        (0x1000, 4),
        (0xffc, 8),
        (0x2, 4),
        (0x4, 8),
        (0, 0),
        (u64::MAX - 1, 4),
    ];
    for &(offset, len) in cases {
        let mut data = vec![0u8; len];
        assert!(
            matches!(
                f.bar_read(REGS_BAR, offset, &mut data),
                Err(FunctionError::BadBarAccess { bar: 0, .. })
            ),
            "{offset:#x}+{len}"
        );
        assert!(matches!(
            f.bar_write(REGS_BAR, offset, &data),
            Err(FunctionError::BadBarAccess { .. })
        ));
    }
}

#[test]
fn dma_copies_and_interrupts() {
    let f = enabled();
    let src = f.dma_alloc(8192).unwrap();
    let dst = f.dma_alloc(8192).unwrap();
    assert!(src.bus_addr() >= LOCAL_DMA_BUS_BASE);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    src.write_at(0, &pattern).unwrap();
    assert_eq!(
        start_dma(&f, src.bus_addr(), dst.bus_addr(), 8192),
        dma_status::OK
    );
    let mut got = vec![0u8; 8192];
    dst.read_at(0, &mut got).unwrap();
    assert_eq!(got, pattern);
    assert!(f.wait_interrupt(0, WAIT).unwrap());
    assert!(
        !f.wait_interrupt(0, NO_WAIT).unwrap(),
        "the event was consumed"
    );
    assert!(!f.wait_interrupt(1, Duration::from_millis(1)).unwrap());
}

#[test]
fn dma_outside_granted_memory_fails_and_writes_nothing() {
    let f = enabled();
    let src = f.dma_alloc(4096).unwrap();
    let dst = f.dma_alloc(4096).unwrap();
    src.fill(0xaa).unwrap();
    let end = LOCAL_DMA_BUS_BASE
        .checked_add(f.pool().len_bytes() as u64)
        .unwrap();
    // (src, dst, len, status)
    let cases = [
        (src.bus_addr(), BusAddr(0x1000), 16, dma_status::UNMAPPED),
        (BusAddr(0), dst.bus_addr(), 16, dma_status::UNMAPPED),
        (
            src.bus_addr(),
            BusAddr(end.raw() - 8),
            16,
            dma_status::UNMAPPED,
        ),
        (
            src.bus_addr(),
            dst.bus_addr(),
            test_device::MAX_DMA_LEN + 1,
            dma_status::TOO_LONG,
        ),
    ];
    for (s, d, len, want) in cases {
        assert_eq!(start_dma(&f, s, d, len), want, "{s} -> {d}");
        assert!(
            f.wait_interrupt(0, WAIT).unwrap(),
            "completion fires even on error"
        );
    }
    let mut tail = [0u8; 8];
    f.pool()
        .memory()
        .read_at(f.pool().len_bytes() as u64 - 8, &mut tail)
        .unwrap();
    assert_eq!(tail, [0; 8], "a straddling write touched nothing");
    let mut d = [0u8; 16];
    dst.read_at(0, &mut d).unwrap();
    assert_eq!(d, [0; 16]);
}

#[test]
fn bus_master_disable_stops_dma_and_interrupts() {
    let f = enabled();
    let src = f.dma_alloc(4096).unwrap();
    let dst = f.dma_alloc(4096).unwrap();
    src.fill(1).unwrap();
    f.config_write(header::COMMAND, Word, u32::from(command::MEMORY_SPACE))
        .unwrap();
    assert_eq!(
        start_dma(&f, src.bus_addr(), dst.bus_addr(), 64),
        dma_status::BUS_MASTER_DISABLED
    );
    assert!(!f.wait_interrupt(0, NO_WAIT).unwrap());
    f.bar_write_u32(REGS_BAR, regs::IRQ_FIRE, 2).unwrap();
    assert!(!f.wait_interrupt(2, NO_WAIT).unwrap());
    let mut d = [0u8; 64];
    dst.read_at(0, &mut d).unwrap();
    assert_eq!(d, [0; 64]);
}

#[test]
fn remapped_caller_memory() {
    let f = enabled();
    let guest = Arc::new(SharedMemory::new("guest", 0x4000).unwrap());
    guest.write_at(0x10, b"hello").unwrap();
    let iova = BusAddr(0x8000_0000);
    f.dma_map(iova, MemSpan::whole(guest.clone()), false)
        .unwrap();
    assert!(matches!(
        f.dma_map(LOCAL_DMA_BUS_BASE, MemSpan::whole(guest.clone()), true),
        Err(FunctionError::DmaMap(_))
    ));
    let dst = f.dma_alloc(4096).unwrap();
    assert_eq!(
        start_dma(&f, BusAddr(iova.raw() + 0x10), dst.bus_addr(), 5),
        dma_status::OK
    );
    let mut b = [0u8; 5];
    dst.read_at(0, &mut b).unwrap();
    assert_eq!(&b, b"hello");
    assert_eq!(
        start_dma(&f, dst.bus_addr(), iova, 5),
        dma_status::PERMISSION
    );
    f.dma_unmap(iova, 0x4000).unwrap();
    assert_eq!(start_dma(&f, iova, dst.bus_addr(), 5), dma_status::UNMAPPED);
}

#[test]
fn masked_vectors_latch_and_fire_on_unmask() {
    let f = enabled();
    set_vector_mask(&f, 3, true);
    f.bar_write_u32(REGS_BAR, regs::IRQ_FIRE, 3).unwrap();
    assert!(!f.wait_interrupt(3, NO_WAIT).unwrap());
    let pba = u64::from(test_device::MSIX_PBA_OFFSET);
    assert_eq!(f.bar_read_u64(MSIX_BAR, pba).unwrap(), 1 << 3);
    set_vector_mask(&f, 3, false);
    assert!(f.wait_interrupt(3, WAIT).unwrap());
    assert_eq!(f.bar_read_u64(MSIX_BAR, pba).unwrap(), 0);

    // Function mask through config space.
    let at = msix_cap_offset(&f);
    let ctl = u32::from(msix_cap::CONTROL_ENABLE | msix_cap::CONTROL_FUNCTION_MASK);
    f.config_write(at + msix_cap::CONTROL, Word, ctl).unwrap();
    f.bar_write_u32(REGS_BAR, regs::IRQ_FIRE, 1).unwrap();
    assert!(!f.wait_interrupt(1, NO_WAIT).unwrap());
    f.config_write(
        at + msix_cap::CONTROL,
        Word,
        u32::from(msix_cap::CONTROL_ENABLE),
    )
    .unwrap();
    assert!(f.wait_interrupt(1, WAIT).unwrap());
}

#[test]
fn interrupts_redirect_to_a_callers_eventfd() {
    let f = enabled();
    let irqfd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    f.set_interrupt_eventfd(2, Some(irqfd.clone())).unwrap();
    f.bar_write_u32(REGS_BAR, regs::IRQ_FIRE, 2).unwrap();
    assert_eq!(irqfd.read().unwrap(), 1);
    assert!(!f.wait_interrupt(2, NO_WAIT).unwrap());
    f.set_interrupt_eventfd(2, None).unwrap();
    f.bar_write_u32(REGS_BAR, regs::IRQ_FIRE, 2).unwrap();
    assert!(f.wait_interrupt(2, WAIT).unwrap());
    assert!(irqfd.read().is_err(), "nothing more went to the irqfd");
    for v in [4u16, u16::MAX] {
        assert!(matches!(
            f.set_interrupt_eventfd(v, None),
            Err(FunctionError::NoSuchVector { vector, count: 4 }) if vector == v
        ));
        assert!(matches!(
            f.wait_interrupt(v, NO_WAIT),
            Err(FunctionError::NoSuchVector { .. })
        ));
    }
}

#[test]
fn wait_interrupt_wakes_from_another_thread() {
    let f = Arc::new(enabled());
    let g = f.clone();
    let t = std::thread::spawn(move || g.wait_interrupt(0, WAIT).unwrap());
    // Fire only once the waiter has announced its sleep (its sleeper count), so the wake-up
    // from another thread is what is tested, not a pending bit found at once.
    let sleepers = f.interrupts.read()[0].sleepers.clone();
    let deadline = std::time::Instant::now() + WAIT;
    while sleepers.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the waiter never slept"
        );
        std::thread::yield_now();
    }
    f.bar_write_u32(REGS_BAR, regs::IRQ_FIRE, 0).unwrap();
    assert!(t.join().unwrap());
}

#[test]
fn function_level_reset_restores_power_on_state() {
    let f = enabled();
    f.bar_write_u64(REGS_BAR, regs::SCRATCH, 42).unwrap();
    let devctl = 0x40 + pcie::DEVICE_CONTROL;
    f.config_write(devctl, Word, u32::from(pcie::DEVCTL_INITIATE_FLR))
        .unwrap();
    assert_eq!(f.config_read(header::COMMAND, Word).unwrap(), 0);
    assert_eq!(
        f.config_read(devctl, Word).unwrap(),
        u32::from(pcie::DEVCTL_DEFAULT)
    );
    let at = msix_cap_offset(&f);
    assert_eq!(f.config_read(at + msix_cap::CONTROL, Word).unwrap(), 3);
    f.config_write(header::COMMAND, Word, u32::from(command::MEMORY_SPACE))
        .unwrap();
    assert_eq!(f.bar_read_u64(REGS_BAR, regs::SCRATCH).unwrap(), 0);
    assert_eq!(
        f.bar_read_u32(REGS_BAR, regs::DMA_STATUS).unwrap(),
        dma_status::IDLE
    );
    // Vectors are masked again.
    let ctl = u64::from(test_device::MSIX_TABLE_OFFSET) + ENTRY_VECTOR_CONTROL;
    assert_eq!(f.bar_read_u32(MSIX_BAR, ctl).unwrap(), 1);
}

#[test]
fn d3hot_stops_bar_decoding() {
    let f = enabled();
    let pm = 0x88 + crate::config::pm::PMCSR;
    assert_eq!(
        f.config_read(0x88, Byte).unwrap() as u8,
        cap::ID_POWER_MANAGEMENT
    );
    f.config_write(pm, Word, 3).unwrap();
    assert_eq!(f.bar_read_u32(REGS_BAR, regs::MAGIC).unwrap(), 0xffff_ffff);
    f.config_write(pm, Word, 0).unwrap();
    assert_eq!(
        f.bar_read_u32(REGS_BAR, regs::MAGIC).unwrap(),
        test_device::MAGIC
    );
}

#[test]
fn dma_memory_exhaustion() {
    let f = LocalFunction::new(2 * DMA_PAGE_SIZE, TestDevice::build).unwrap();
    let _a = f.dma_alloc(DMA_PAGE_SIZE).unwrap();
    assert!(matches!(
        f.dma_alloc(2 * DMA_PAGE_SIZE),
        Err(FunctionError::OutOfDmaMemory {
            available: 4096,
            ..
        })
    ));
    let r: Result<LocalFunction, BindError<&str>> = LocalFunction::new(4096, |_, _| Err("nope"));
    assert!(matches!(r, Err(BindError::Device("nope"))));
}

#[test]
fn a_device_that_signals_eventfds_is_waited_for_directly_until_a_vector_is_redirected() {
    let dev = Arc::new(test_device::DirectStandIn::default());
    let d = dev.clone();
    let f = LocalFunction::new(DMA_PAGE_SIZE, move |_, _| {
        Ok::<_, FunctionError>(d as Arc<dyn PciDevice>)
    })
    .unwrap();
    assert_eq!(dev.fds.lock().unwrap().as_ref().map(Vec::len), Some(2));
    assert!(!f.wait_interrupt(1, NO_WAIT).unwrap());
    // The device writes the eventfd itself: no InterruptSink::signal in between.
    dev.fire(1);
    assert!(f.wait_interrupt(1, NO_WAIT).unwrap());
    assert!(!f.wait_interrupt(1, NO_WAIT).unwrap(), "consumed");
    assert!(
        !f.wait_interrupt(0, NO_WAIT).unwrap(),
        "only vector 1 fired"
    );
    // Fired while the waiter sleeps.
    let f = Arc::new(f);
    let g = f.clone();
    let t = std::thread::spawn(move || g.wait_interrupt(0, WAIT).unwrap());
    dev.fire(0);
    assert!(t.join().unwrap());
    // A caller's eventfd for one vector: the device goes back to the sink path.
    let irqfd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    f.set_interrupt_eventfd(0, Some(irqfd.clone())).unwrap();
    assert!(dev.fds.lock().unwrap().is_none(), "direct fds taken back");
    f.interrupts().signal(0);
    assert_eq!(irqfd.read().unwrap(), 1);
    f.interrupts().signal(1);
    assert!(f.wait_interrupt(1, NO_WAIT).unwrap());
}
