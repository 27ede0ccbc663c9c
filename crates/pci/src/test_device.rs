//! A small, deterministic PCIe device for tests of the layers above (bindings, lending).
//!
//! - BAR0 (64-bit, 4 KiB): registers — a read-only magic, a 64-bit scratch register, and a
//!   DMA engine (source and destination bus addresses, length, go, status). Writing 1 to
//!   [`regs::DMA_GO`] copies synchronously through the device's [`DmaPort`], records the
//!   outcome in [`regs::DMA_STATUS`] and fires MSI-X vector 0. Writing a vector number to
//!   [`regs::IRQ_FIRE`] fires that vector.
//! - BAR2 (32-bit, 4 KiB): the MSI-X table (4 vectors) at 0 and the PBA at 0x800.
//! - Capabilities: PCI Express (FLR capable), MSI-X, Power Management.
//!
//! Like hardware, the device decodes BAR accesses only with Memory Space Enable set and in D0,
//! and issues DMA and MSI-X messages only with Bus Master Enable set (a DMA started without it
//! fails with [`dma_status::BUS_MASTER_DISABLED`] and no interrupt). Registers take 4- and
//! 8-byte naturally aligned accesses; others read all-ones and are dropped.
//!
//! Lock order: the device state, then the MSI-X table's own lock.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::{
    BarRegion, ConfigEffect, ConfigError, ConfigSpace, ConfigSpaceBuilder, Identity, MsixLayout,
    PciExpressCap, PowerState,
};
use crate::msix::MsixTable;
use crate::{AccessSize, BarIndex, BarSpec, BusAddr, DmaError, DmaPort, InterruptSink, PciDevice};

/// Vendor ID of the test device (not a registered ID; tests only).
pub const VENDOR_ID: u16 = 0x0de1;
/// Device ID of the test device.
pub const DEVICE_ID: u16 = 0x7e57;
/// Class code: "device does not fit any defined class".
pub const CLASS_CODE: u32 = 0xff_00_00;
/// The register BAR.
pub const REGS_BAR: BarIndex = BarIndex::ALL[0];
/// The MSI-X BAR.
pub const MSIX_BAR: BarIndex = BarIndex::ALL[2];
/// Size of each BAR.
pub const BAR_SIZE: u64 = 0x1000;
/// Number of MSI-X vectors.
pub const VECTORS: u16 = 4;
/// Offset of the MSI-X table in [`MSIX_BAR`].
pub const MSIX_TABLE_OFFSET: u32 = 0x0;
/// Offset of the MSI-X PBA in [`MSIX_BAR`].
pub const MSIX_PBA_OFFSET: u32 = 0x800;
/// Longest DMA the engine accepts.
pub const MAX_DMA_LEN: u32 = 1 << 20;
/// Value of [`regs::MAGIC`].
pub const MAGIC: u32 = 0xde71_7e57;

/// Register offsets in [`REGS_BAR`].
pub mod regs {
    /// Magic (32 bits, RO): [`super::MAGIC`].
    pub const MAGIC: u64 = 0x00;
    /// Scratch (64 bits, RW).
    pub const SCRATCH: u64 = 0x08;
    /// DMA source bus address (64 bits, RW).
    pub const DMA_SRC: u64 = 0x10;
    /// DMA destination bus address (64 bits, RW).
    pub const DMA_DST: u64 = 0x18;
    /// DMA length in bytes (32 bits, RW).
    pub const DMA_LEN: u64 = 0x20;
    /// Write 1 to start the DMA (32 bits, reads 0).
    pub const DMA_GO: u64 = 0x24;
    /// Outcome of the last DMA, a [`super::dma_status`] value (32 bits, RO).
    pub const DMA_STATUS: u64 = 0x28;
    /// Write a vector number to fire it (32 bits, reads 0).
    pub const IRQ_FIRE: u64 = 0x2c;
    /// Bytes of register file; the rest of the BAR reads zero.
    pub const LEN: u64 = 0x30;
}

/// Values of [`regs::DMA_STATUS`].
pub mod dma_status {
    /// No DMA since reset.
    pub const IDLE: u32 = 0;
    /// The copy completed.
    pub const OK: u32 = 1;
    /// Source or destination not mapped.
    pub const UNMAPPED: u32 = 2;
    /// Destination mapped read-only.
    pub const PERMISSION: u32 = 3;
    /// Bus Master Enable is clear.
    pub const BUS_MASTER_DISABLED: u32 = 4;
    /// Length above [`super::MAX_DMA_LEN`].
    pub const TOO_LONG: u32 = 5;
    /// The path to memory failed.
    pub const PATH_ERROR: u32 = 6;
}

/// Register-file bytes a BAR write may change.
fn writable(offset: u64) -> bool {
    (regs::SCRATCH..regs::DMA_GO).contains(&offset)
}

/// The layout of the device's config space.
pub fn config_space() -> Result<ConfigSpace, ConfigError> {
    let mut b = ConfigSpaceBuilder::new(Identity {
        vendor_id: VENDOR_ID,
        device_id: DEVICE_ID,
        class_code: CLASS_CODE,
        revision_id: 1,
        subsystem_vendor_id: VENDOR_ID,
        subsystem_id: DEVICE_ID,
    });
    b.bar(
        REGS_BAR,
        BarSpec {
            size: BAR_SIZE,
            is_64bit: true,
            prefetchable: false,
        },
    )?;
    b.bar(
        MSIX_BAR,
        BarSpec {
            size: BAR_SIZE,
            is_64bit: false,
            prefetchable: false,
        },
    )?;
    b.pci_express(PciExpressCap { flr_capable: true })?;
    b.msix(msix_layout())?;
    b.power_management()?;
    b.build()
}

/// Where the MSI-X table and PBA live.
pub fn msix_layout() -> MsixLayout {
    MsixLayout {
        vectors: VECTORS,
        table: BarRegion {
            bar: MSIX_BAR,
            offset: MSIX_TABLE_OFFSET,
        },
        pba: BarRegion {
            bar: MSIX_BAR,
            offset: MSIX_PBA_OFFSET,
        },
    }
}

#[derive(Debug)]
struct State {
    config: ConfigSpace,
    regs: [u8; regs::LEN as usize],
}

impl State {
    fn reg_u64(&self, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        for (i, byte) in b.iter_mut().enumerate() {
            *byte = self.regs.get(offset as usize + i).copied().unwrap_or(0);
        }
        u64::from_le_bytes(b)
    }

    fn set_reg_u32(&mut self, offset: u64, value: u32) {
        for (i, byte) in value.to_le_bytes().into_iter().enumerate() {
            if let Some(r) = self.regs.get_mut(offset as usize + i) {
                *r = byte;
            }
        }
    }

    fn decodes_memory(&self) -> bool {
        self.config.memory_enabled() && self.config.power_state() == PowerState::D0
    }
}

/// The test device. Build it with [`TestDevice::new`] (or [`TestDevice::build`] as the
/// closure of [`crate::local::LocalFunction::new`]).
pub struct TestDevice {
    state: Mutex<State>,
    msix: MsixTable,
    dma: Arc<dyn DmaPort>,
}

impl std::fmt::Debug for TestDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDevice").finish_non_exhaustive()
    }
}

impl TestDevice {
    /// A device at power-on whose DMA goes through `dma` and whose MSI-X messages go to `irq`.
    pub fn new(dma: Arc<dyn DmaPort>, irq: Arc<dyn InterruptSink>) -> Result<Self, ConfigError> {
        let mut state = State {
            config: config_space()?,
            regs: [0u8; regs::LEN as usize],
        };
        state.set_reg_u32(regs::MAGIC, MAGIC);
        Ok(Self {
            state: Mutex::new(state),
            msix: MsixTable::new(msix_layout(), irq),
            dma,
        })
    }

    /// [`TestDevice::new`] as a `PciDevice` trait object.
    pub fn build(
        dma: Arc<dyn DmaPort>,
        irq: Arc<dyn InterruptSink>,
    ) -> Result<Arc<dyn PciDevice>, ConfigError> {
        Ok(Arc::new(Self::new(dma, irq)?))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // State is plain data updated in place; a panic elsewhere cannot leave it torn.
        devlend_sync::lock(&self.state)
    }

    /// The MSI-X table (for tests that inspect masks and pending bits).
    pub fn msix(&self) -> &MsixTable {
        &self.msix
    }

    fn reset_locked(&self, state: &mut State) {
        state.config.reset();
        state.regs = [0; regs::LEN as usize];
        state.set_reg_u32(regs::MAGIC, MAGIC);
        self.msix.reset();
    }

    fn run_dma(&self, state: &mut State) {
        if !state.config.bus_master_enabled() {
            state.set_reg_u32(regs::DMA_STATUS, dma_status::BUS_MASTER_DISABLED);
            return;
        }
        let src = BusAddr(state.reg_u64(regs::DMA_SRC));
        let dst = BusAddr(state.reg_u64(regs::DMA_DST));
        let len = state.reg_u64(regs::DMA_LEN) as u32;
        let status = if len > MAX_DMA_LEN {
            dma_status::TOO_LONG
        } else {
            let mut buf = vec![0u8; len as usize];
            let result = self
                .dma
                .dma_read(src, &mut buf)
                .and_then(|()| self.dma.dma_write(dst, &buf));
            match result {
                Ok(()) => dma_status::OK,
                Err(DmaError::Unmapped { .. }) => dma_status::UNMAPPED,
                Err(DmaError::Permission { .. }) => dma_status::PERMISSION,
                Err(DmaError::BusMasterDisabled) => dma_status::BUS_MASTER_DISABLED,
                Err(DmaError::Path(_) | DmaError::Memory(_)) => dma_status::PATH_ERROR,
            }
        };
        state.set_reg_u32(regs::DMA_STATUS, status);
        self.msix.trigger(0);
    }

    fn fire(&self, state: &State, vector: u32) {
        if state.config.bus_master_enabled() {
            if let Ok(v) = u16::try_from(vector) {
                self.msix.trigger(v);
            }
        }
    }
}

/// A 4- or 8-byte naturally aligned access inside a BAR.
fn register_access(offset: u64, len: usize) -> bool {
    (len == 4 || len == 8)
        && offset.is_multiple_of(len as u64)
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= BAR_SIZE)
}

impl PciDevice for TestDevice {
    fn config_read(&self, offset: u16, size: AccessSize) -> u32 {
        self.lock().config.read(offset, size)
    }

    fn config_write(&self, offset: u16, size: AccessSize, value: u32) {
        let mut state = self.lock();
        for effect in state.config.write(offset, size, value) {
            match effect {
                ConfigEffect::MsixControl {
                    enable,
                    function_mask,
                } => self.msix.set_control(enable, function_mask),
                ConfigEffect::FunctionLevelReset => self.reset_locked(&mut state),
                ConfigEffect::CommandChanged { .. }
                | ConfigEffect::BarChanged(_)
                | ConfigEffect::PowerState(_)
                | ConfigEffect::VfEnable { .. }
                | ConfigEffect::VfMemorySpace(_) => {}
            }
        }
    }

    fn bar_spec(&self, bar: BarIndex) -> Option<BarSpec> {
        self.lock().config.bar_spec(bar)
    }

    fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let state = self.lock();
        if !state.decodes_memory() {
            return;
        }
        if bar == MSIX_BAR {
            if !self.msix.bar_read(bar, offset, data) && register_access(offset, data.len()) {
                data.fill(0);
            }
            return;
        }
        if bar != REGS_BAR || !register_access(offset, data.len()) {
            return;
        }
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = state.regs.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) {
        let mut state = self.lock();
        if !state.decodes_memory() {
            return;
        }
        if bar == MSIX_BAR {
            self.msix.bar_write(bar, offset, data);
            return;
        }
        if bar != REGS_BAR || !register_access(offset, data.len()) {
            return;
        }
        let mut go = None;
        let mut fire = None;
        for (i, &byte) in data.iter().enumerate() {
            let at = offset + i as u64;
            if writable(at) {
                if let Some(r) = state.regs.get_mut(at as usize) {
                    *r = byte;
                }
            }
            // Action registers: the 32-bit value written there.
            let lane =
                |reg: u64| (at >= reg && at < reg + 4).then(|| u32::from(byte) << (8 * (at - reg)));
            if let Some(bits) = lane(regs::DMA_GO) {
                go = Some(go.unwrap_or(0) | bits);
            }
            if let Some(bits) = lane(regs::IRQ_FIRE) {
                fire = Some(fire.unwrap_or(0) | bits);
            }
        }
        if go.is_some_and(|v| v & 1 != 0) {
            self.run_dma(&mut state);
        }
        if let Some(vector) = fire {
            self.fire(&state, vector);
        }
    }

    fn reset(&self) {
        let mut state = self.lock();
        self.reset_locked(&mut state);
    }

    fn msix_vectors(&self) -> u16 {
        VECTORS
    }

    fn kind(&self) -> &'static str {
        "test-device"
    }
}

/// A device without registers that a binding takes for real hardware: it claims direct DMA
/// ([`PciDevice::needs_direct_dma`]), records the mappings the binding tells it of, and keeps
/// the eventfds of [`PciDevice::set_interrupt_fds`], which [`DirectStandIn::fire`] signals as
/// a device's interrupt hardware would. Config reads return all-ones; it has no BARs, and it
/// takes every [`PciDevice::bar_write_nonblocking`] (counting them), as stores into mapped
/// device memory.
#[derive(Debug, Default)]
pub struct DirectStandIn {
    /// `(iova, len, writable)` of every mapping in force.
    pub maps: Mutex<Vec<(BusAddr, u64, bool)>>,
    /// Writes taken by [`PciDevice::bar_write_nonblocking`].
    pub nonblocking_writes: std::sync::atomic::AtomicU32,
    /// The eventfds it signals, while it has them.
    pub fds: Mutex<Option<Vec<Arc<vmm_sys_util::eventfd::EventFd>>>>,
}

impl DirectStandIn {
    /// The hardware raises `vector` on its eventfd (panics without one: a test's mistake).
    pub fn fire(&self, vector: usize) {
        let fds = devlend_sync::lock(&self.fds);
        let fd = fds
            .as_ref()
            .and_then(|f| f.get(vector))
            .expect("an eventfd");
        fd.write(1).expect("eventfd write");
    }
}

impl PciDevice for DirectStandIn {
    fn config_read(&self, _: u16, _: AccessSize) -> u32 {
        u32::MAX
    }
    fn config_write(&self, _: u16, _: AccessSize, _: u32) {}
    fn bar_spec(&self, _: BarIndex) -> Option<BarSpec> {
        None
    }
    fn bar_read(&self, _: BarIndex, _: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&self, _: BarIndex, _: u64, _: &[u8]) {}
    fn bar_write_nonblocking(&self, _: BarIndex, _: u64, _: &[u8]) -> bool {
        self.nonblocking_writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }
    fn reset(&self) {}
    fn msix_vectors(&self) -> u16 {
        2
    }
    fn kind(&self) -> &'static str {
        "direct-stand-in"
    }
    fn needs_direct_dma(&self) -> bool {
        true
    }
    fn set_interrupt_fds(&self, fds: Option<&[Arc<vmm_sys_util::eventfd::EventFd>]>) -> bool {
        *devlend_sync::lock(&self.fds) = fds.map(<[_]>::to_vec);
        true
    }
    fn dma_map(&self, iova: BusAddr, mem: &crate::MemSpan, writable: bool) -> Result<(), DmaError> {
        devlend_sync::lock(&self.maps).push((iova, mem.len(), writable));
        Ok(())
    }
    fn dma_unmap(&self, iova: BusAddr, len: u64) -> Result<(), DmaError> {
        devlend_sync::lock(&self.maps).retain(|m| m.0 .0 < iova.0 || m.0 .0 - iova.0 >= len);
        Ok(())
    }
}
