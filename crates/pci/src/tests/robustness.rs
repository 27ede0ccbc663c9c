//! Randomised (deterministic, seeded) hammering of everything a driver or device controls:
//! nothing may panic, and the invariants the masks promise must hold throughout.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{cap, header, msix as msix_cap, status, ConfigSpace};
use crate::iommu::{DmaTarget, Iommu};
use crate::local::LocalFunction;
use crate::test_device::{self, TestDevice};
use crate::{
    AccessSize, BarAccess, BarIndex, BusAddr, ConfigAccess, DmaAlloc, DmaError, DmaPort,
    FunctionError, InterruptSink, Interrupts, MemSpan, MsixTable, SharedMemory,
};

/// xorshift64*: small, deterministic, good enough to spread offsets and values.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn size(&mut self) -> AccessSize {
        [AccessSize::Byte, AccessSize::Word, AccessSize::Dword][self.below(3) as usize]
    }
    fn len(&mut self) -> usize {
        [0, 1, 2, 3, 4, 5, 8, 16][self.below(8) as usize]
    }
}

fn invariant_registers(c: &ConfigSpace) -> Vec<u32> {
    let mut v = vec![
        c.read(header::VENDOR_ID, AccessSize::Dword),
        c.read(header::REVISION_ID, AccessSize::Dword),
        c.read(header::HEADER_TYPE, AccessSize::Byte),
        c.read(header::SUBSYSTEM_VENDOR_ID, AccessSize::Dword),
        c.read(header::CAPABILITIES_POINTER, AccessSize::Byte),
        c.read(header::INTERRUPT_PIN, AccessSize::Byte),
    ];
    let mut at = c.read(header::CAPABILITIES_POINTER, AccessSize::Byte) as u16;
    while at != 0 {
        v.push(c.read(at, AccessSize::Word));
        at = c.read(at + 1, AccessSize::Byte) as u16;
    }
    for bar in BarIndex::ALL {
        v.push(c.read(header::bar(bar), AccessSize::Dword) & 0xf);
    }
    v
}

#[test]
fn config_space_survives_random_accesses() {
    let mut rng = Rng(0x5eed_0001);
    let mut c = test_device::config_space().unwrap();
    let fixed = invariant_registers(&c);
    let (msix_at, _) = c.msix().unwrap();
    for _ in 0..200_000 {
        let offset = rng.below(0x1100) as u16;
        let size = rng.size();
        if rng.below(2) == 0 {
            c.write(offset, size, rng.next() as u32);
        } else {
            c.read(offset, size);
        }
        if rng.below(5000) == 0 {
            c.reset();
        }
    }
    assert_eq!(invariant_registers(&c), fixed);
    assert_ne!(c.status() & status::CAPABILITIES_LIST, 0);
    let ctl = c.read(msix_at + msix_cap::CONTROL, AccessSize::Word) as u16;
    assert_eq!(ctl & msix_cap::CONTROL_TABLE_SIZE, test_device::VECTORS - 1);
    assert!(c.capability_offset(cap::ID_PCI_EXPRESS).is_some());
}

#[derive(Default)]
struct Count(Mutex<Vec<u16>>);
impl InterruptSink for Count {
    fn signal(&self, vector: u16) {
        self.0.lock().unwrap().push(vector);
    }
}

#[test]
fn msix_table_survives_random_accesses() {
    let mut rng = Rng(0x5eed_0002);
    let sink = Arc::new(Count::default());
    let layout = test_device::msix_layout();
    let t = MsixTable::new(layout, sink.clone());
    for _ in 0..100_000 {
        let bar = BarIndex::ALL[rng.below(6) as usize];
        let offset = rng.below(0x1000);
        let mut data = vec![0u8; rng.len()];
        for b in &mut data {
            *b = rng.next() as u8;
        }
        match rng.below(5) {
            0 => {
                t.bar_read(bar, offset, &mut data);
            }
            1 => {
                t.bar_write(bar, offset, &data);
            }
            2 => {
                t.trigger(rng.below(6) as u16);
            }
            3 => t.set_control(rng.below(2) == 0, rng.below(3) == 0),
            _ => {
                // Masking through the table, as a driver or vfio-user server would.
                let v = rng.below(u64::from(layout.vectors));
                t.table_write(v * 16 + 12, &(rng.below(2) as u32).to_le_bytes());
            }
        }
        let (enabled, fmask) = t.control();
        for v in 0..layout.vectors {
            let deliverable = enabled && !fmask && t.is_masked(v) == Some(false);
            assert!(
                !(deliverable && t.is_pending(v)),
                "vector {v} pending but unmasked"
            );
        }
    }
    assert!(sink.0.lock().unwrap().iter().all(|&v| v < layout.vectors));
}

#[test]
fn iommu_failed_writes_touch_nothing_under_random_maps() {
    let mut rng = Rng(0x5eed_0003);
    let mem = Arc::new(SharedMemory::new("robust", 0x10000).unwrap());
    let io = Iommu::new();
    let snapshot = |m: &SharedMemory| {
        let mut v = vec![0u8; m.len()];
        m.read_at(0, &mut v).unwrap();
        v
    };
    for _ in 0..20_000 {
        let page = rng.below(16) * 0x1000;
        match rng.below(4) {
            0 => {
                let len = (1 + rng.below(3)) * 0x1000;
                if let Ok(span) = MemSpan::new(mem.clone(), rng.below(12) * 0x1000, len) {
                    let _ = io.map(BusAddr(page), DmaTarget::Direct(span), rng.below(2) == 0);
                }
            }
            1 => {
                let _ = io.unmap(BusAddr(page), (1 + rng.below(4)) * 0x1000);
            }
            _ => {
                let addr = BusAddr(rng.below(0x12000));
                let data = vec![rng.next() as u8; 1 + rng.below(0x2000) as usize];
                let before = snapshot(&mem);
                match io.dma_write(addr, &data) {
                    Ok(()) => {
                        let mut back = vec![0u8; data.len()];
                        // What could be written is mapped, hence readable.
                        io.dma_read(addr, &mut back).unwrap();
                    }
                    Err(DmaError::Unmapped { .. } | DmaError::Permission { .. }) => {
                        assert_eq!(snapshot(&mem), before, "failed write at {addr}");
                    }
                    Err(e) => panic!("unexpected {e}"),
                }
            }
        }
    }
}

#[test]
fn local_function_survives_random_driver_accesses() {
    let mut rng = Rng(0x5eed_0004);
    let f = LocalFunction::new(16 * 4096, TestDevice::build).unwrap();
    let bufs: Vec<_> = (0..4).map(|_| f.dma_alloc(4096).unwrap()).collect();
    for _ in 0..50_000 {
        let r = match rng.below(6) {
            0 => f
                .config_read(rng.below(0x1010) as u16, rng.size())
                .map(|_| ()),
            1 => {
                // Keep memory/bus master on most of the time so BAR paths are exercised.
                let off = rng.below(0x1010) as u16;
                let v = if off == header::COMMAND {
                    0x6 | rng.next() as u32
                } else {
                    rng.next() as u32
                };
                f.config_write(off, rng.size(), v)
            }
            2 => {
                let mut d = vec![0u8; rng.len()];
                let bar = BarIndex::ALL[rng.below(6) as usize];
                f.bar_read(bar, rng.below(0x1010), &mut d)
            }
            3 => {
                let d: Vec<u8> = (0..rng.len()).map(|_| rng.next() as u8).collect();
                let bar = BarIndex::ALL[rng.below(3) as usize];
                f.bar_write(bar, rng.below(0x1010), &d)
            }
            4 => {
                // Program the DMA engine with addresses in and around the pool.
                let near = |rng: &mut Rng| {
                    let b = &bufs[rng.below(4) as usize];
                    b.bus_addr()
                        .raw()
                        .wrapping_add(rng.below(0x30000))
                        .wrapping_sub(0x10000)
                };
                let (s, d) = (near(&mut rng), near(&mut rng));
                f.bar_write_u64(test_device::REGS_BAR, test_device::regs::DMA_SRC, s)
                    .and_then(|()| {
                        f.bar_write_u64(test_device::REGS_BAR, test_device::regs::DMA_DST, d)
                    })
                    .and_then(|()| {
                        f.bar_write_u32(
                            test_device::REGS_BAR,
                            test_device::regs::DMA_LEN,
                            rng.below(0x3000) as u32,
                        )
                    })
                    .and_then(|()| {
                        f.bar_write_u32(test_device::REGS_BAR, test_device::regs::DMA_GO, 1)
                    })
            }
            _ => f
                .wait_interrupt(rng.below(5) as u16, Duration::ZERO)
                .map(|_| ()),
        };
        match r {
            Ok(())
            | Err(FunctionError::BadConfigAccess { .. })
            | Err(FunctionError::BadBarAccess { .. })
            | Err(FunctionError::NoSuchBar(_))
            | Err(FunctionError::NoSuchVector { .. }) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
}

/// A page of doorbell-style memory at `offset` of its BAR, with the device's sleep word at
/// its end, and the memory behind it.
fn doorbell_area(
    offset: u64,
) -> (
    std::sync::Arc<devlend_memory::SharedMemory>,
    crate::MemoryArea,
) {
    let mem = std::sync::Arc::new(devlend_memory::SharedMemory::new("area", 4096).unwrap());
    let area = crate::MemoryArea {
        offset,
        mem: devlend_memory::MemSpan::whole(mem.clone()),
        wake_word: Some(0xffc),
    };
    (mem, area)
}

/// A doorbell-style store into a memory area lands whole at any alignment (it used to be an
/// atomic store only when 4-byte aligned, and an error otherwise).
#[test]
fn memory_area_stores_land_at_any_alignment() {
    let (mem, area) = doorbell_area(0x1000);
    area.write_and_wake(0x8, &0x1234_5678u32.to_le_bytes())
        .unwrap();
    assert_eq!(mem.load_u32(0x8).unwrap(), 0x1234_5678);
    area.write_and_wake(0x12, &[1, 2, 3, 4]).unwrap();
    let mut back = [0u8; 4];
    mem.read_at(0x12, &mut back).unwrap();
    assert_eq!(back, [1, 2, 3, 4]);
    assert!(area.write_and_wake(4093, &[0; 4]).is_err());
}

/// A store into a memory area whose device has announced that it sleeps clears the sleep word
/// before the futex wake (`devlend_memory::SleepWord`): a device between its re-check and its
/// futex wait then does not sleep. A store while the device is awake leaves the word alone.
#[test]
fn memory_area_store_clears_an_announced_sleep() {
    let (mem, area) = doorbell_area(0);
    let device = devlend_memory::SleepWord::new(mem.atomic_u32_at(0xffc).unwrap());
    device.announce();
    area.write_and_wake(0x8, &1u32.to_le_bytes()).unwrap();
    assert_eq!(
        mem.load_u32(0xffc).unwrap(),
        0,
        "the sleep word was cleared"
    );
    assert_eq!(
        device.sleep(Some(std::time::Duration::from_secs(2))),
        devlend_memory::Slept::Woken
    );
    device.end();
    area.write_and_wake(0x8, &2u32.to_le_bytes()).unwrap();
    assert_eq!(mem.load_u32(0xffc).unwrap(), 0);
    assert_eq!(mem.load_u32(0x8).unwrap(), 2);
}
