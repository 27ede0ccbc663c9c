//! The server in front of a real binding: `LocalFunction` + the pci crate's `TestDevice`,
//! driven by a raw client as QEMU would. Device DMA lands in the client's memfd (no copy) and
//! MSI-X vector 0 reaches the client's eventfd.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;

use common::*;
use devlend_pci::test_device::{self, dma_status, regs, TestDevice};
use devlend_pci::LocalFunction;
use vmm_sys_util::eventfd::EventFd;

fn bar0_write(c: &mut Client, offset: u64, data: &[u8]) {
    // Posted, as QEMU sends memory-BAR writes.
    c.send(
        10,
        0x10,
        &region_rw(offset, 0, data.len() as u32, data),
        &[],
    );
}

fn bar0_read_u32(c: &mut Client, offset: u64) -> u32 {
    let r = c.call(9, &region_rw(offset, 0, 4, &[]), &[]);
    assert!(!r.is_error(), "errno {}", r.errno());
    u32::from_le_bytes(r.payload[16..20].try_into().unwrap())
}

#[test]
fn test_device_dma_and_msix_through_the_server() {
    let function = Arc::new(
        LocalFunction::new(4096, |dma, irq| {
            TestDevice::build(dma, irq).map_err(|e| format!("{e:?}"))
        })
        .expect("binding"),
    );
    let server = devlend_vfio_user::Server::new(function).expect("probe");
    let layout = server.layout().clone();
    assert_eq!(layout.bars[0].map(|b| b.size), Some(test_device::BAR_SIZE));
    assert_eq!(layout.bars[2].map(|b| b.size), Some(test_device::BAR_SIZE));
    assert_eq!(layout.bars[1], None);
    assert!(layout.flr_devctl.is_some());
    assert_eq!(layout.msix.map(|m| m.vectors), Some(test_device::VECTORS));
    let mut c = Session::serve(server);
    c.version();

    // Guest RAM: 2 MiB memfd, mapped at IOVA 1 GiB from fd offset 1 MiB.
    let mut ram = memfd(2 << 20);
    ram.seek(SeekFrom::Start(1 << 20)).unwrap();
    ram.write_all(b"from guest ram").unwrap();
    let r = c.call(2, &dma_map(3, 1 << 20, 1 << 30, 1 << 20), &[raw(&ram)]);
    assert!(!r.is_error(), "DMA_MAP errno {}", r.errno());

    // Memory space + bus master, as the guest's driver would set them.
    let r = c.call(10, &region_rw(0x04, 7, 2, &[0x06, 0x00]), &[]);
    assert!(!r.is_error());
    assert_eq!(bar0_read_u32(&mut c, regs::MAGIC), test_device::MAGIC);

    // MSI-X enable (Message Control bit 15) through config space, then vector 0's eventfd.
    let cap = layout.msix.unwrap().cap_offset as u64;
    let r = c.call(9, &region_rw(cap + 2, 7, 2, &[]), &[]);
    let ctrl = u16::from_le_bytes(r.payload[16..18].try_into().unwrap()) | 0x8000;
    let r = c.call(10, &region_rw(cap + 2, 7, 2, &ctrl.to_le_bytes()), &[]);
    assert!(!r.is_error());
    let ev = EventFd::new(0).unwrap();
    let r = c.call(8, &set_irqs((1 << 2) | (1 << 5), 2, 0, 1), &[raw(&ev)]);
    assert!(!r.is_error(), "SET_IRQS errno {}", r.errno());

    // The device copies 14 bytes from IOVA 1 GiB to IOVA 1 GiB + 4 KiB: both in the memfd.
    bar0_write(&mut c, regs::DMA_SRC, &(1u64 << 30).to_le_bytes());
    bar0_write(&mut c, regs::DMA_DST, &((1u64 << 30) + 4096).to_le_bytes());
    bar0_write(&mut c, regs::DMA_LEN, &14u32.to_le_bytes());
    bar0_write(&mut c, regs::DMA_GO, &1u32.to_le_bytes());
    assert_eq!(bar0_read_u32(&mut c, regs::DMA_STATUS), dma_status::OK);
    assert_eq!(
        ev.read().unwrap(),
        1,
        "MSI-X vector 0 reached the client's eventfd"
    );
    let mut back = [0u8; 14];
    ram.seek(SeekFrom::Start((1 << 20) + 4096)).unwrap();
    ram.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"from guest ram");

    // After the unmap the device can no longer reach the memory.
    let r = c.call(3, &dma_unmap(0, 1 << 30, 1 << 20), &[]);
    assert!(!r.is_error());
    bar0_write(&mut c, regs::DMA_GO, &1u32.to_le_bytes());
    assert_eq!(
        bar0_read_u32(&mut c, regs::DMA_STATUS),
        dma_status::UNMAPPED
    );

    // Reset through the protocol: FLR clears the command register.
    let r = c.call(13, &[], &[]);
    assert!(!r.is_error());
    let r = c.call(9, &region_rw(0x04, 7, 2, &[]), &[]);
    assert_eq!(&r.payload[16..18], &[0, 0]);
    c.close();
}
