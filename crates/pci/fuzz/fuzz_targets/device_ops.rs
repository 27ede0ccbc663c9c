//! Drives the test device (config space, MSI-X table, registers, DMA through an IOMMU) with
//! arbitrary config and BAR accesses: nothing a driver writes may panic, and DMA never reaches
//! outside the one mapped page.
//!
//! Run: `cd crates/pci/fuzz && cargo +nightly fuzz run device_ops -- -max_total_time=60`.
#![no_main]

use std::sync::{Arc, OnceLock};

use devlend_pci::iommu::{DmaTarget, Iommu};
use devlend_pci::test_device::TestDevice;
use devlend_pci::{AccessSize, BarIndex, BusAddr, InterruptSink, MemSpan, PciDevice, SharedMemory};
use libfuzzer_sys::fuzz_target;

struct Null;
impl InterruptSink for Null {
    fn signal(&self, _vector: u16) {}
}

/// One page mapped at bus address 0x1000, with guard memory around it that must stay zero.
fn memory() -> &'static (Arc<SharedMemory>, Arc<Iommu>) {
    static MEM: OnceLock<(Arc<SharedMemory>, Arc<Iommu>)> = OnceLock::new();
    MEM.get_or_init(|| {
        let mem = Arc::new(SharedMemory::new("fuzz", 0x3000).expect("memfd"));
        let iommu = Arc::new(Iommu::new());
        let span = MemSpan::new(mem.clone(), 0x1000, 0x1000).expect("span");
        iommu
            .map(BusAddr(0x1000), DmaTarget::Direct(span), true)
            .expect("map");
        (mem, iommu)
    })
}

fn u64_from(bytes: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    for (d, s) in b.iter_mut().zip(bytes) {
        *d = *s;
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let (mem, iommu) = memory();
    let Ok(dev) = TestDevice::new(iommu.clone(), Arc::new(Null)) else {
        return;
    };
    // Each op: kind, then an offset, then a value; short tails are padded with zeros.
    for op in data.chunks(12) {
        let kind = op.first().copied().unwrap_or(0);
        let offset = u64_from(op.get(1..4).unwrap_or(&[]));
        let value = u64_from(op.get(4..12).unwrap_or(&[]));
        let size = match kind >> 6 {
            0 => AccessSize::Byte,
            1 => AccessSize::Word,
            _ => AccessSize::Dword,
        };
        let bar = BarIndex::ALL[usize::from(kind >> 3 & 7) % 6];
        let len = [1usize, 2, 3, 4, 8, 16, 0, 5][usize::from(kind >> 3 & 7)];
        match kind & 7 {
            0 => {
                dev.config_read(offset as u16, size);
            }
            1 | 2 => dev.config_write(offset as u16, size, value as u32),
            3 => {
                let mut buf = vec![0u8; len];
                dev.bar_read(bar, offset & 0x1fff, &mut buf);
            }
            4..=6 => {
                let bytes = value.to_le_bytes();
                let mut buf = bytes.to_vec();
                buf.resize(len, 0);
                dev.bar_write(bar, offset & 0x1fff, &buf);
            }
            _ => dev.reset(),
        }
    }
    let mut guard = [0u8; 0x1000];
    for at in [0u64, 0x2000] {
        mem.read_at(at, &mut guard).expect("read");
        assert!(guard.iter().all(|&b| b == 0), "DMA escaped its mapping");
    }
});
