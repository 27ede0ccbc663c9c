//! `devlend add vfio BDF`: a real PCI function lent through the kernel's VFIO.

use std::sync::Arc;

use anyhow::Context;
use devlend_lending::DeviceBuilder;
use devlend_vfio::sysfs::VFIO_PCI;
use devlend_vfio::{Bdf, KernelVfio, PciSysfs, VfioFunction};

/// Why a real device is refused over a fabric that cannot let it reach borrower memory.
pub const TCP_REFUSAL: &str = "a real device's DMA cannot be intercepted by software, so it can \
     be lent only over a fabric on which it reaches borrower memory directly (shm, or a hardware \
     NTB), not over tcp";

/// The default name of the function at `bdf` ("pci-0000-00-03.0").
pub fn default_name(bdf: &str) -> anyhow::Result<String> {
    let bdf: Bdf = bdf.parse()?;
    Ok(format!("pci-{}", bdf.to_string().replace(':', "-")))
}

/// Checks the function at `bdf` and returns its listing line and a builder that binds it to
/// vfio-pci (when `bind`), opens it through VFIO and resets it. Every check that can be made
/// without changing anything is made here; the builder undoes what it did if a later step
/// fails (the function goes back to its driver).
pub fn builder(bdf: &str, bind: bool) -> anyhow::Result<(String, DeviceBuilder)> {
    let sysfs = PciSysfs::default();
    let bdf: Bdf = bdf.parse()?;
    let id = sysfs.identity(bdf)?;
    let driver = sysfs.driver(bdf)?;
    if let (Some(d), false) = (&driver, bind) {
        anyhow::ensure!(
            d == VFIO_PCI,
            devlend_vfio::sysfs::SysfsError::BoundElsewhere {
                bdf,
                driver: d.clone()
            }
        );
    }
    let group = sysfs.check_group(bdf)?;
    let from = match driver.as_deref() {
        Some(VFIO_PCI) | None => String::new(),
        Some(d) => format!(", from {d}"),
    };
    let detail = format!("{bdf} {id}, IOMMU group {group}{from}");
    let build: DeviceBuilder = Box::new(move |_dma, irq| {
        let open = || -> anyhow::Result<VfioFunction> {
            let binding = sysfs.bind_vfio(bdf, bind)?;
            let dir = sysfs.device_dir(bdf)?;
            let hw = KernelVfio::open(&dir)?;
            let f = VfioFunction::new(Arc::new(hw), irq)?.with_owner(Box::new(binding));
            f.try_reset()
                .with_context(|| format!("{bdf} failed its reset"))?;
            Ok(f)
        };
        open()
            .map(|f| Arc::new(f) as Arc<dyn devlend_pci::PciDevice>)
            .map_err(|e| format!("{e:#}"))
    });
    Ok((detail, build))
}
