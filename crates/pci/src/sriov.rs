//! Presenting a virtual function to a driver as a function of its own.
//!
//! A VF's own config space is deliberately incomplete (PCIe 9.3.4): its Vendor and Device ID
//! read 0xFFFF, its BAR registers read zero (the BARs are programmed in the PF's SR-IOV
//! capability) and its Command register's Memory Space Enable is hardwired 0 (the PF's VF MSE
//! decodes the BARs of every VF). No driver binds to that. Whoever hands a VF to a driver as a
//! function of its own (Linux's vfio-pci for an assigned VF; the lender here) fills those in:
//! [`PresentedVf`] overlays them on the VF, with BAR sizing derived from the VF's BAR masks like
//! any [`ConfigSpace`], and passes every other access to the VF.

use std::sync::{Arc, Mutex};

use crate::config::{cap, command, header, pcie, Identity};
use crate::{
    AccessSize, BarIndex, BarSpec, ConfigSpace, ConfigSpaceBuilder, MemoryArea, PciDevice,
};
use devlend_sync::lock;

/// Errors of presenting a VF.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SriovError {
    /// The device handed over is not a virtual function (its Vendor ID does not read 0xFFFF).
    #[error("the device is not a virtual function (vendor ID reads {0:#06x})")]
    NotAVirtualFunction(u16),
    /// The VF's BARs do not make a valid header.
    #[error("the VF's BARs are invalid: {0}")]
    Bars(#[from] crate::config::ConfigError),
}

/// A VF presented as a standalone function: the presenter's Vendor/Device ID, BAR registers
/// virtualised from the VF's BAR sizes, an emulated Memory Space Enable; everything else is
/// the VF's own (Bus Master, MSI-X, PCI Express capability with FLR, ...).
pub struct PresentedVf {
    vf: Arc<dyn PciDevice>,
    /// Header overlay: identification registers, BARs and the Command register's MSE.
    overlay: Mutex<ConfigSpace>,
    /// Offset of the VF's Device Control register (for Initiate FLR), if it has PCIe.
    device_control: Option<u16>,
}

impl std::fmt::Debug for PresentedVf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresentedVf")
            .field("kind", &self.vf.kind())
            .finish_non_exhaustive()
    }
}

impl PresentedVf {
    /// Presents `vf` with `vendor_id` (the PF's) and `device_id` (the PF's VF Device ID).
    pub fn new(
        vf: Arc<dyn PciDevice>,
        vendor_id: u16,
        device_id: u16,
    ) -> Result<Arc<Self>, SriovError> {
        let vendor = vf.config_read(header::VENDOR_ID, AccessSize::Word) as u16;
        if vendor != 0xffff {
            return Err(SriovError::NotAVirtualFunction(vendor));
        }
        let class = vf.config_read(header::REVISION_ID, AccessSize::Dword);
        let subsystem = vf.config_read(header::SUBSYSTEM_VENDOR_ID, AccessSize::Dword);
        let mut b = ConfigSpaceBuilder::new(Identity {
            vendor_id,
            device_id,
            class_code: class >> 8,
            revision_id: class as u8,
            subsystem_vendor_id: subsystem as u16,
            subsystem_id: (subsystem >> 16) as u16,
        });
        for bar in BarIndex::ALL {
            if let Some(spec) = vf.bar_spec(bar) {
                b.bar(bar, spec)?;
            }
        }
        let overlay = b.build()?;
        let device_control = capability(vf.as_ref(), crate::config::cap::ID_PCI_EXPRESS)
            .map(|at| at + pcie::DEVICE_CONTROL);
        Ok(Arc::new(Self {
            vf,
            overlay: Mutex::new(overlay),
            device_control,
        }))
    }

    /// The VF behind the presentation.
    pub fn virtual_function(&self) -> &Arc<dyn PciDevice> {
        &self.vf
    }

    /// Whether the presented Memory Space Enable is set.
    pub fn memory_enabled(&self) -> bool {
        lock(&self.overlay).memory_enabled()
    }

    fn overlaid(offset: u16) -> bool {
        // Vendor and Device ID, and the six BAR registers.
        offset < header::COMMAND || (header::BAR0..header::BAR0 + 24).contains(&offset)
    }
}

/// Walks `dev`'s capability list through config reads ([`cap::find_by_bytes`]).
fn capability(dev: &dyn PciDevice, id: u8) -> Option<u16> {
    cap::find_by_bytes(|off| dev.config_read(off, AccessSize::Byte) as u8, id)
}

impl PciDevice for PresentedVf {
    fn config_read(&self, offset: u16, size: AccessSize) -> u32 {
        if !crate::config::access_is_valid(offset, size) {
            return self.vf.config_read(offset, size);
        }
        let len = size.len() as u16;
        // Byte by byte, so an access that spans an overlaid and a passed-through register
        // (a dword at Command/Status) gets each part from its owner.
        (0..len).fold(0u32, |acc, i| {
            let at = offset + i;
            let byte = if Self::overlaid(at) {
                lock(&self.overlay).read(at, AccessSize::Byte)
            } else if at == header::COMMAND {
                let vf = self.vf.config_read(at, AccessSize::Byte);
                let mse = lock(&self.overlay).read(at, AccessSize::Byte)
                    & u32::from(command::MEMORY_SPACE);
                (vf & !u32::from(command::MEMORY_SPACE)) | mse
            } else {
                self.vf.config_read(at, AccessSize::Byte)
            };
            acc | ((byte & 0xff) << (8 * u32::from(i)))
        })
    }

    fn config_write(&self, offset: u16, size: AccessSize, value: u32) {
        if !crate::config::access_is_valid(offset, size) {
            return;
        }
        if Self::overlaid(offset) {
            lock(&self.overlay).write(offset, size, value);
            return;
        }
        if offset <= header::COMMAND && header::COMMAND < offset + size.len() as u16 {
            // The overlay keeps Memory Space Enable; the VF gets the rest (Bus Master).
            lock(&self.overlay).write(offset, size, value);
        }
        let flr = self.device_control.is_some_and(|dc| {
            (offset..offset + size.len() as u16).contains(&(dc + 1))
                && (value >> (8 * u32::from(dc + 1 - offset)))
                    & u32::from(pcie::DEVCTL_INITIATE_FLR >> 8)
                    != 0
        });
        self.vf.config_write(offset, size, value);
        if flr {
            // A Function Level Reset of the VF clears what the presentation emulates too.
            lock(&self.overlay).reset();
        }
    }

    fn bar_spec(&self, bar: BarIndex) -> Option<BarSpec> {
        self.vf.bar_spec(bar)
    }

    fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]) {
        if !self.memory_enabled() {
            data.fill(0xff);
            return;
        }
        self.vf.bar_read(bar, offset, data);
    }

    fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) {
        if !self.memory_enabled() {
            return;
        }
        self.vf.bar_write(bar, offset, data);
    }

    fn run_nonblocking(&self) -> bool {
        self.vf.run_nonblocking()
    }

    fn set_idle_wait(&self, wait: Option<Arc<dyn crate::IdleWait>>) {
        self.vf.set_idle_wait(wait);
    }

    fn reset(&self) {
        self.vf.reset();
        lock(&self.overlay).reset();
    }

    fn msix_vectors(&self) -> u16 {
        self.vf.msix_vectors()
    }

    fn bar_memory(&self, bar: BarIndex) -> Vec<MemoryArea> {
        self.vf.bar_memory(bar)
    }

    fn kind(&self) -> &'static str {
        self.vf.kind()
    }

    fn capacity_bytes(&self) -> Option<u64> {
        self.vf.capacity_bytes()
    }
}

#[cfg(test)]
#[path = "tests/sriov.rs"]
mod tests;
