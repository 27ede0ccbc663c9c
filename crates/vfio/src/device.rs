//! [`VfioFunction`]: a real function as a [`PciDevice`].

use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard};

use devlend_memory::{BusAddr, MemSpan, SharedMemory};
use devlend_pci::config::{cap::ID_MSIX as CAP_ID_MSIX, header::BAR0, msix};
use devlend_pci::{
    AccessSize, BarIndex, BarSpec, DmaError, InterruptSink, MemoryArea, MsixTable, PciDevice,
};
use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
use vmm_sys_util::eventfd::EventFd;

use crate::dma::DmaMaps;
use crate::hw::{BarMapping, VfioHw};
use crate::irq::{DirectFds, MsixIrqs};
use crate::layout;
use crate::VfioError;

const CONFIG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
/// MSI-X Enable and Function Mask in the Message Control word's upper byte (bits 7 and 6).
const MSIX_ENABLE_BIT: u32 = (msix::CONTROL_ENABLE >> 8) as u32;
const MSIX_MASK_BIT: u32 = (msix::CONTROL_FUNCTION_MASK >> 8) as u32;
/// The most MSI-X vectors a function presents: a borrower gets each as a doorbell bit on its
/// link, and the lender has 48 of those for all the devices it lends over one link (real
/// NVMe SSDs have 65 to 130+). The Table Size field the driver reads is lowered to match;
/// the vectors beyond it are never enabled.
pub const MAX_VECTORS: u16 = 16;

struct Bar {
    spec: BarSpec,
    /// mmapped parts: (offset in the BAR, mapping).
    maps: Vec<(u64, BarMapping)>,
    /// The same parts as device memory another process can map (`PciDevice::bar_memory`):
    /// a borrower on `shm` reaches them with its own loads and stores.
    exported: Vec<MemoryArea>,
}

impl Bar {
    fn mapping(&self, offset: u64, len: usize) -> Option<(&BarMapping, u64)> {
        self.maps.iter().find_map(|(start, m)| {
            let at = offset.checked_sub(*start)?;
            (at.checked_add(len as u64)? <= m.len()).then_some((m, at))
        })
    }
}

/// A real PCIe function behind VFIO, as a [`PciDevice`] (see the crate documentation for how
/// each kind of traffic is carried).
///
/// Lock order: `irqs` before `dma`, and before the holder's eventfds inside the table's sink
/// (`DirectFds`). `dma` is never held while calling into the interrupt sink; `irqs` is, when a
/// mask or enable change delivers pending messages (the table calls the sink after releasing
/// its own lock): a sink must not call back into the function.
pub struct VfioFunction {
    hw: Arc<dyn VfioHw>,
    config_len: u64,
    bars: [Option<Bar>; 6],
    /// Config offset of the MSI-X capability, with the emulated table.
    msix: Option<(u16, Arc<MsixTable>)>,
    irqs: Mutex<Option<MsixIrqs>>,
    dma: Mutex<DmaMaps>,
    /// Dropped last, after the device's mappings and descriptors are gone (e.g. the sysfs
    /// binding that gives the function back to its driver).
    owner: Option<Box<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for VfioFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioFunction")
            .field("config_len", &self.config_len)
            .field(
                "msix",
                &self.msix.as_ref().map(|(cap, t)| (cap, t.vectors())),
            )
            .finish_non_exhaustive()
    }
}

impl VfioFunction {
    /// Reads the function's layout through `hw` (config space, BAR regions, MSI-X) and maps
    /// what may be mapped. MSI-X messages go to `sink` once the driver enables them.
    pub fn new(hw: Arc<dyn VfioHw>, sink: Arc<dyn InterruptSink>) -> Result<Self, VfioError> {
        let config = hw
            .region(CONFIG)
            .filter(|r| r.size >= 64 && r.readable())
            .ok_or(VfioError::NoRegion(CONFIG))?;
        let read = |offset: u16, size: AccessSize| -> Result<u32, VfioError> {
            let mut b = [0u8; 4];
            let buf = b.get_mut(..size.len()).ok_or(VfioError::NoRegion(CONFIG))?;
            hw.region_read(CONFIG, u64::from(offset), buf)?;
            Ok(u32::from_le_bytes(b))
        };
        let id = read(0, AccessSize::Dword)?;
        if id & 0xffff == 0xffff {
            return Err(VfioError::Config(format!(
                "vendor ID reads {:#06x}: the function does not answer",
                id & 0xffff
            )));
        }
        let msix = match layout::find_capability(&read, CAP_ID_MSIX)? {
            Some(cap) => {
                let mut l = layout::msix_layout(&read, cap)?;
                l.vectors = l.vectors.min(MAX_VECTORS);
                Some((cap, l))
            }
            None => None,
        };
        let mut bars: [Option<Bar>; 6] = Default::default();
        let mut skip = false;
        for bar in BarIndex::ALL {
            if std::mem::take(&mut skip) {
                continue;
            }
            let i = bar.get();
            let register = read(BAR0 + 4 * u16::from(i), AccessSize::Dword)?;
            let region = hw.region(u32::from(i));
            let Some(spec) = layout::bar_spec(region.as_ref(), register) else {
                continue;
            };
            skip = spec.is_64bit;
            let mut maps = Vec::new();
            let mut exported = Vec::new();
            if let Some(region) = &region {
                for (off, len) in layout::mappable_areas(region, bar, msix.as_ref().map(|m| &m.1)) {
                    match hw.region_mmap(u32::from(i), off, len) {
                        Ok(Some(m)) => maps.push((off, m)),
                        Ok(None) => {}
                        Err(e) => tracing::warn!("BAR{i} at {off:#x}: not mapped ({e}); trapped"),
                    }
                    match export(&*hw, u32::from(i), off, len) {
                        Ok(Some(a)) => exported.push(a),
                        Ok(None) => {}
                        Err(e) => tracing::warn!("BAR{i} at {off:#x}: not exported ({e})"),
                    }
                }
            }
            if let Some(slot) = bars.get_mut(usize::from(i)) {
                *slot = Some(Bar {
                    spec,
                    maps,
                    exported,
                });
            }
        }
        let holder = Arc::new(DirectFds::new(sink));
        let msix = msix.map(|(cap, l)| (cap, Arc::new(MsixTable::new(l, holder.clone()))));
        let irqs = msix
            .as_ref()
            .map(|(_, t)| MsixIrqs::new(t.clone(), holder.clone()));
        Ok(Self {
            hw,
            config_len: config.size.min(4096),
            bars,
            msix,
            irqs: Mutex::new(irqs),
            dma: Mutex::new(DmaMaps::default()),
            owner: None,
        })
    }

    /// Keeps `owner` until this function is dropped, and drops it after everything else
    /// (e.g. a binding that restores the function's driver).
    pub fn with_owner(mut self, owner: Box<dyn Any + Send + Sync>) -> Self {
        self.owner = Some(owner);
        self
    }

    fn irqs(&self) -> MutexGuard<'_, Option<MsixIrqs>> {
        // Whole-value updates only: consistent after a panic.
        devlend_sync::lock(&self.irqs)
    }

    fn dma(&self) -> MutexGuard<'_, DmaMaps> {
        devlend_sync::lock(&self.dma)
    }

    /// Resets the function through VFIO (MSI-X off first, the emulated table back to its
    /// power-on state after); an error when the kernel cannot reset it.
    pub fn try_reset(&self) -> Result<(), VfioError> {
        let mut irqs = self.irqs();
        if let Some(i) = irqs.as_mut() {
            i.stop(&*self.hw);
        }
        let r = self.hw.reset();
        if let Some(i) = irqs.as_mut() {
            i.reset();
        }
        r
    }

    /// Bus addresses mapped in the device's IOMMU (address, length).
    pub fn dma_ranges(&self) -> Vec<(u64, u64)> {
        self.dma().ranges()
    }

    /// MSI-X vectors currently routed through VFIO eventfds (0 while MSI-X is disabled).
    pub fn routed_vectors(&self) -> usize {
        self.irqs().as_ref().map_or(0, MsixIrqs::routed)
    }

    /// The vectors VFIO currently signals on the holder's eventfds
    /// ([`PciDevice::set_interrupt_fds`]) rather than this side's.
    pub fn direct_vectors(&self) -> Vec<u16> {
        self.irqs().as_ref().map_or_else(Vec::new, MsixIrqs::direct)
    }

    fn bar(&self, bar: BarIndex) -> Option<&Bar> {
        self.bars.get(usize::from(bar.get()))?.as_ref()
    }

    fn inside(&self, bar: BarIndex, offset: u64, len: usize) -> bool {
        self.bar(bar).is_some_and(|b| {
            len > 0
                && offset
                    .checked_add(len as u64)
                    .is_some_and(|e| e <= b.spec.size)
        })
    }

    /// Where the upper byte of MSI-X Message Control sits inside an access, as a bit shift.
    fn msix_control_shift(&self, offset: u16, size: AccessSize) -> Option<(u32, &Arc<MsixTable>)> {
        let (cap, table) = self.msix.as_ref()?;
        let hi = cap.checked_add(msix::CONTROL + 1)?;
        let at = hi.checked_sub(offset)?;
        (usize::from(at) < size.len()).then_some((u32::from(at) * 8, table))
    }

    /// Message Control as this function presents it: the kernel's word with Table Size lowered
    /// to the vectors presented and Enable / Function Mask from the emulated table.
    fn msix_control(&self, hw_control: u16, table: &MsixTable) -> u16 {
        let (enable, mask) = table.control();
        let size = table.vectors().saturating_sub(1) & msix::CONTROL_TABLE_SIZE;
        let ours = msix::CONTROL_ENABLE | msix::CONTROL_FUNCTION_MASK | msix::CONTROL_TABLE_SIZE;
        (hw_control & !ours)
            | size
            | if enable { msix::CONTROL_ENABLE } else { 0 }
            | if mask { msix::CONTROL_FUNCTION_MASK } else { 0 }
    }
}

/// Part `[offset, offset + len)` of BAR region `index` as device memory another process can
/// map (`None` when `hw` gives no descriptor for it).
fn export(
    hw: &dyn VfioHw,
    index: u32,
    offset: u64,
    len: u64,
) -> Result<Option<MemoryArea>, VfioError> {
    let Some((fd, fd_offset)) = hw.region_fd(index, offset, len)? else {
        return Ok(None);
    };
    let n = usize::try_from(len).map_err(|_| VfioError::NoRegion(index))?;
    let mem = SharedMemory::map_device(fd, fd_offset, n).map_err(|e| VfioError::Io {
        op: "mmap BAR for export",
        source: std::io::Error::other(e),
    })?;
    Ok(Some(MemoryArea {
        offset,
        mem: MemSpan::whole(Arc::new(mem)),
        wake_word: None,
    }))
}

fn all_ones(size: AccessSize) -> u32 {
    match size {
        AccessSize::Byte => 0xff,
        AccessSize::Word => 0xffff,
        AccessSize::Dword => 0xffff_ffff,
    }
}

impl PciDevice for VfioFunction {
    fn config_read(&self, offset: u16, size: AccessSize) -> u32 {
        if u64::from(offset) + size.len() as u64 > self.config_len {
            return all_ones(size);
        }
        let mut b = [0u8; 4];
        let Some(buf) = b.get_mut(..size.len()) else {
            return all_ones(size);
        };
        if self.hw.region_read(CONFIG, u64::from(offset), buf).is_err() {
            return all_ones(size);
        }
        let v = u32::from_le_bytes(b);
        // Message Control is presented (see `msix_control`); the kernel owns the real one.
        // Capabilities are dword-aligned, so an aligned access touching Message Control lies
        // inside the capability's first dword.
        if let Some((cap, table)) = &self.msix {
            let touches = offset < cap.saturating_add(4)
                && offset.saturating_add(size.len() as u16) > cap.saturating_add(2);
            if touches {
                let mut d = [0u8; 4];
                if self
                    .hw
                    .region_read(CONFIG, u64::from(*cap), &mut d)
                    .is_err()
                {
                    return all_ones(size);
                }
                let dword = u32::from_le_bytes(d);
                let control = self.msix_control((dword >> 16) as u16, table);
                let dword = (dword & 0xffff) | (u32::from(control) << 16);
                let shift = u32::from(offset.saturating_sub(*cap)) * 8;
                return dword.checked_shr(shift).unwrap_or(0) & all_ones(size);
            }
        }
        v
    }

    fn config_write(&self, offset: u16, size: AccessSize, value: u32) {
        if u64::from(offset) + size.len() as u64 > self.config_len {
            return;
        }
        if let Some((shift, _)) = self.msix_control_shift(offset, size) {
            // The rest of the capability's first dword is read-only: nothing to forward.
            let byte = (value >> shift) & 0xff;
            let enable = byte & MSIX_ENABLE_BIT != 0;
            let mask = byte & MSIX_MASK_BIT != 0;
            if let Some(irqs) = self.irqs().as_mut() {
                if let Err(e) = irqs.set_control(&*self.hw, enable, mask) {
                    tracing::warn!("MSI-X control {enable}/{mask}: {e}");
                }
            }
            return;
        }
        let b = value.to_le_bytes();
        let Some(data) = b.get(..size.len()) else {
            return;
        };
        if let Err(e) = self.hw.region_write(CONFIG, u64::from(offset), data) {
            tracing::debug!("config write at {offset:#x} dropped: {e}");
        }
    }

    fn bar_spec(&self, bar: BarIndex) -> Option<BarSpec> {
        self.bar(bar).map(|b| b.spec)
    }

    fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]) {
        if !self.inside(bar, offset, data.len()) {
            data.fill(0xff);
            return;
        }
        if let Some((_, table)) = &self.msix {
            if table.bar_read(bar, offset, data) {
                return;
            }
        }
        if let Some((m, at)) = self.bar(bar).and_then(|b| b.mapping(offset, data.len())) {
            if m.read(at, data) {
                return;
            }
        }
        if self
            .hw
            .region_read(u32::from(bar.get()), offset, data)
            .is_err()
        {
            data.fill(0xff);
        }
    }

    fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) {
        if !self.inside(bar, offset, data.len()) {
            return;
        }
        if let Some((_, table)) = &self.msix {
            if table.claims(bar, offset, data.len() as u64) {
                // Under the lock, so that the retarget follows the mask it reflects.
                let mut irqs = self.irqs();
                table.bar_write(bar, offset, data);
                if let Some(i) = irqs.as_mut() {
                    i.resync(&*self.hw);
                }
                return;
            }
        }
        if let Some((m, at)) = self.bar(bar).and_then(|b| b.mapping(offset, data.len())) {
            if m.write(at, data) {
                return;
            }
        }
        if let Err(e) = self.hw.region_write(u32::from(bar.get()), offset, data) {
            tracing::debug!("BAR{} write at {offset:#x} dropped: {e}", bar.get());
        }
    }

    fn reset(&self) {
        if let Err(e) = self.try_reset() {
            tracing::error!("VFIO reset failed: {e}");
        }
    }

    fn msix_vectors(&self) -> u16 {
        self.msix.as_ref().map_or(0, |(_, t)| t.vectors())
    }

    fn bar_memory(&self, bar: BarIndex) -> Vec<MemoryArea> {
        self.bar(bar)
            .map(|b| b.exported.clone())
            .unwrap_or_default()
    }

    fn kind(&self) -> &'static str {
        "vfio"
    }

    fn needs_direct_dma(&self) -> bool {
        true
    }

    fn set_interrupt_fds(&self, fds: Option<&[Arc<EventFd>]>) -> bool {
        match self.irqs().as_mut() {
            Some(i) => {
                i.set_holder_fds(&*self.hw, fds.map(<[_]>::to_vec));
                true
            }
            None => false,
        }
    }

    fn dma_map(&self, iova: BusAddr, mem: &MemSpan, writable: bool) -> Result<(), DmaError> {
        let mut dma = self.dma();
        let len = mem.len();
        dma.check_new(iova.0, len)
            .map_err(|e| DmaError::Path(e.to_string()))?;
        let (shared, offset) = mem.memory();
        let n = usize::try_from(len).map_err(|_| DmaError::Path("mapping too large".into()))?;
        let ptr = shared.ptr_at(offset, n)?;
        // SAFETY: `ptr .. ptr + len` is inside `shared`, which `dma` keeps alive (the span
        // holds it) until the mapping is removed; shared memory is only ever accessed with
        // volatile/atomic copies (devlend_memory's contract), so the device writing it is sound.
        unsafe { self.hw.dma_map(iova.0, len, ptr, writable) }
            .map_err(|e| DmaError::Path(e.to_string()))?;
        dma.insert(iova.0, len, mem.clone());
        Ok(())
    }

    fn dma_unmap(&self, iova: BusAddr, len: u64) -> Result<(), DmaError> {
        let taken = self.dma().take_range(iova.0, len);
        let mut first = None;
        for (a, l, _mem) in taken {
            if let Err(e) = self.hw.dma_unmap(a, l) {
                first.get_or_insert(DmaError::Path(e.to_string()));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for VfioFunction {
    fn drop(&mut self) {
        if let Some(i) = self.irqs().as_mut() {
            i.stop(&*self.hw);
        }
        for (a, l, _mem) in self.dma().take_all() {
            if let Err(e) = self.hw.dma_unmap(a, l) {
                tracing::warn!("unmapping DMA at {a:#x}: {e}");
            }
        }
        // The BAR mappings hold the device open: unmapped before the device is closed, so
        // that its group can leave its container.
        self.bars = Default::default();
        // Fields drop in order after this: the device, then the owner.
    }
}

#[cfg(test)]
#[path = "tests/device.rs"]
mod tests;
