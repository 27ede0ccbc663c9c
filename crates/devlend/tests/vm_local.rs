//! A QEMU guest's own nvme driver on our NVMe model, served locally over vfio-user
//! (`devlend serve nvme`): the driver binds, the namespace has the image's size, O_DIRECT
//! write/read-back matches, mke2fs + mount + write + remount + read matches, and afterwards the
//! image on the host holds the bytes the guest wrote.
//!
//! Needs root (to provision QEMU with `scripts/vm-setup.sh` the first time); skipped with a
//! printed reason otherwise, except under `CI`, where it fails instead.
//! The borrowed case is the same run with another server command (see `vm_borrowed.rs`).

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use devlend_nvme::{NvmeConfig, NvmeDevice};
use devlend_pci::{
    AccessSize, BarAccess, BarIndex, BusAddr, ConfigAccess, DmaAlloc, DmaBuffer, DmaRemap,
    FunctionError, Interrupts, LocalFunction, MemSpan, PciDevice, PciFunction,
};
use devlend_testkit::guest::{self, acceptance};
use devlend_vfio_user::Server;
use vmm_sys_util::eventfd::EventFd;

#[test]
fn guest_nvme_driver_on_local_model_over_vfio_user() {
    let Some(assets) = common::vm_assets() else {
        return;
    };
    let dir = common::scratch_dir("vm-local");
    let image = dir.join("disk.img");
    let socket = dir.join("nvme.sock");
    let disk_bytes = acceptance::MIN_DISK_BYTES;

    let mut server = Command::new(env!("CARGO_BIN_EXE_devlend"));
    server
        .args(["serve", "nvme", "--image"])
        .arg(&image)
        .args(["--size", &disk_bytes.to_string(), "--serial", "vm-local"])
        .arg("--vfio-user")
        .arg(&socket);
    let out = guest::run_acceptance(assets, server, &socket, &image, disk_bytes, &dir);
    acceptance::print_findings(&out);
    println!("guest run took {:?}", out.elapsed);
}

/// A function whose far side disappears on demand, as a borrowed function does when its lender
/// dies: every access then fails with `Removed` and no interrupt arrives any more.
struct Severable {
    inner: Arc<dyn PciFunction>,
    gone: AtomicBool,
}

impl Severable {
    fn check(&self) -> Result<(), FunctionError> {
        if self.gone.load(Ordering::SeqCst) {
            Err(FunctionError::Removed("lender died (test)".into()))
        } else {
            Ok(())
        }
    }

    fn sever(&self) {
        self.gone.store(true, Ordering::SeqCst);
        for v in 0..self.inner.interrupt_vectors() {
            let _ = self.inner.set_interrupt_eventfd(v, None);
        }
    }
}

impl ConfigAccess for Severable {
    fn config_read(&self, offset: u16, size: AccessSize) -> Result<u32, FunctionError> {
        self.check()?;
        self.inner.config_read(offset, size)
    }
    fn config_write(&self, offset: u16, size: AccessSize, value: u32) -> Result<(), FunctionError> {
        self.check()?;
        self.inner.config_write(offset, size, value)
    }
}

impl BarAccess for Severable {
    fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), FunctionError> {
        self.check()?;
        self.inner.bar_read(bar, offset, data)
    }
    fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) -> Result<(), FunctionError> {
        self.check()?;
        self.inner.bar_write(bar, offset, data)
    }
}

impl DmaAlloc for Severable {
    fn dma_alloc(&self, len: usize) -> Result<DmaBuffer, FunctionError> {
        self.check()?;
        self.inner.dma_alloc(len)
    }
}

impl DmaRemap for Severable {
    fn dma_map(&self, iova: BusAddr, mem: MemSpan, writable: bool) -> Result<(), FunctionError> {
        self.check()?;
        self.inner.dma_map(iova, mem, writable)
    }
    fn dma_unmap(&self, iova: BusAddr, len: u64) -> Result<(), FunctionError> {
        self.inner.dma_unmap(iova, len)
    }
}

impl Interrupts for Severable {
    fn interrupt_vectors(&self) -> u16 {
        self.inner.interrupt_vectors()
    }
    fn wait_interrupt(&self, vector: u16, timeout: Duration) -> Result<bool, FunctionError> {
        self.check()?;
        self.inner.wait_interrupt(vector, timeout)
    }
    fn set_interrupt_eventfd(
        &self,
        vector: u16,
        fd: Option<Arc<EventFd>>,
    ) -> Result<(), FunctionError> {
        if fd.is_some() {
            self.check()?;
        }
        self.inner.set_interrupt_eventfd(vector, fd)
    }
}

impl PciFunction for Severable {
    fn describe(&self) -> String {
        format!("severable {}", self.inner.describe())
    }
}

/// The device disappears under a running guest (as a borrowed device does when its lender
/// dies): the server keeps answering, with errors, so QEMU reads all-ones, the guest's driver
/// declares the controller dead and its I/O fails; nothing hangs and the guest powers off.
#[test]
fn guest_survives_a_device_that_disappears() {
    let Some(assets) = common::vm_assets() else {
        return;
    };
    let dir = common::scratch_dir("vm-gone");
    let image = dir.join("disk.img");
    let socket = dir.join("nvme.sock");
    let mut config = NvmeConfig::new(&image);
    config.create_size = Some(64 << 20);
    let local = LocalFunction::new(4096, |dma, irq| {
        NvmeDevice::new(config, dma, irq).map(|d| d as Arc<dyn PciDevice>)
    })
    .expect("NVMe model");
    let function = Arc::new(Severable {
        inner: Arc::new(local),
        gone: AtomicBool::new(false),
    });
    let server = Server::new(function.clone()).expect("probe");
    let listener = Server::bind(&socket).expect("bind");
    let path = socket.clone();
    std::thread::spawn(move || server.serve_listener(&listener, &path, |_, _| {}));

    let out = guest::vanish::run(assets, &socket, &dir, || function.sever());
    for l in out
        .console
        .iter()
        .filter(|l| l.contains("IO-AFTER") || l.contains("nvme"))
    {
        println!("guest: {l}");
    }
    println!(
        "guest saw the dead device and powered off after {:?}",
        out.elapsed
    );
}
