//! The lender: exports device functions across the NTB.
//!
//! For each device it owns, the lender keeps the device's BARs in its own bus address space
//! (MMIO regions whose handler is the device), an IOMMU as the device's DMA port, and an
//! interrupt sink it can route. Lending a device:
//!
//! 1. translates one inbound window per BAR onto the BAR (borrower MMIO then reaches the device
//!    through the fabric, no lender code on the path);
//! 2. on the borrower's `MapDma`, maps device bus addresses in the IOMMU onto the borrower's
//!    window (a direct mapping of borrower RAM on `shm`): the device's DMA lands in borrower
//!    memory, and nothing else is reachable;
//! 3. routes the device's MSI-X messages (after its own table's masks) to doorbell bits on the
//!    borrower;
//! 4. answers config requests, with BAR registers virtualised per borrower: sizing is answered
//!    from the device's BAR masks, placement is the borrower's business, the device's real BARs
//!    never move.
//!
//! A lease ends by return or expiry: windows cleared, IOMMU emptied, interrupts cut, device
//! reset (FLR), offered again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};

use devlend_fabric::{AddressSpace, BusAddr, FabricError, MmioHandler, Ntb, WindowOffset};
use devlend_pci::{
    AccessSize, BarIndex, BarSpec, DmaPort, IdleWait, InterruptSink, MemoryArea, PciDevice,
};
use devlend_pci::{DmaError, DmaTarget, Iommu, RemoteMemory};

use crate::protocol::{AreaGrant, BarDesc, BarGrant, DeviceDesc, Grant, Request, Response};
use crate::{Inner, LendingError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Builds a device model given its DMA port and interrupt sink.
pub type DeviceBuilder = Box<
    dyn FnOnce(Arc<dyn DmaPort>, Arc<dyn InterruptSink>) -> Result<Arc<dyn PciDevice>, String>
        + Send,
>;

/// Where lent devices' BARs live in the lender's bus address space.
const BAR_FLOOR: BusAddr = BusAddr(0x6000_0000_0000);
/// Most DMA mappings one lease may hold (each costs lender memory).
const MAX_DMA_MAPS: usize = 4096;
/// How long a `MapDma` waits for the borrower's window translation to arrive (translations
/// and management records travel on different paths).
const DMA_WINDOW_WAIT: Duration = Duration::from_secs(5);
/// Doorbell bits available for interrupt vectors.
const IRQ_DOORBELL_BITS: u32 = 48;

/// The doorbell bits interrupts may use (the low [`IRQ_DOORBELL_BITS`]).
fn irq_doorbell_mask() -> u64 {
    (1u64 << IRQ_DOORBELL_BITS) - 1
}

/// Where a lent device's vectors go: a doorbell ring on the borrower.
type InterruptRoute = Arc<dyn Fn(u16) + Send + Sync>;

/// Routes a device's interrupts to whoever holds it (nobody: dropped, as on an unbound device).
#[derive(Default)]
struct RoutedSink {
    target: RwLock<Option<InterruptRoute>>,
}

impl InterruptSink for RoutedSink {
    fn signal(&self, vector: u16) {
        let target = devlend_sync::read(&self.target);
        if let Some(t) = target.as_ref() {
            t(vector);
        }
    }
}

impl RoutedSink {
    fn route(&self, target: Option<InterruptRoute>) {
        *devlend_sync::write(&self.target) = target;
    }
}

/// The fabric's view of one BAR: transactions arriving through a window go to the device.
struct BarHandler {
    device: Arc<dyn PciDevice>,
    bar: BarIndex,
    /// The BAR's doorbell-style memory ([`PciDevice::bar_memory`]).
    areas: Vec<MemoryArea>,
}

impl MmioHandler for BarHandler {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        self.device.bar_read(self.bar, offset, data);
    }

    fn mmio_write(&self, offset: u64, data: &[u8]) {
        self.device.bar_write(self.bar, offset, data);
    }

    /// A write wholly inside doorbell-style memory is a store and a wake-up (what a borrower
    /// with a direct mapping does itself): the fabric's reader thread applies it at once. If
    /// the device sleeps, that thread first offers to do the work itself (run to
    /// completion, [`PciDevice::run_nonblocking`]), and wakes the device only if it cannot.
    fn mmio_write_nonblocking(&self, offset: u64, data: &[u8]) -> bool {
        for a in &self.areas {
            let Some(at) = offset.checked_sub(a.offset) else {
                continue;
            };
            if at.saturating_add(data.len() as u64) <= a.mem.len() {
                if a.write(at, data).is_err() {
                    return false;
                }
                if a.is_registers() || !self.device.run_nonblocking() {
                    let _ = a.wake();
                }
                return true;
            }
        }
        // Device memory the device applies without blocking (a CMB's entries and data).
        self.device.bar_write_nonblocking(self.bar, offset, data)
    }
}

/// A lent device's idle wait on the borrower's link (`devlend_fabric::Doorbells::wait_reading`): the
/// device's thread reads the link while it waits for a doorbell. Weak: the link's window
/// handlers hold the device.
struct LinkIdleWait(Weak<dyn Ntb>);

impl IdleWait for LinkIdleWait {
    fn idle_wait(
        &self,
        deadline: Instant,
        woken: &mut dyn FnMut() -> bool,
        park: &mut dyn FnMut(Duration),
    ) -> bool {
        self.0
            .upgrade()
            .is_some_and(|ntb| ntb.wait_reading(deadline, woken, park).unwrap_or(false))
    }

    fn interrupt(&self) {
        if let Some(ntb) = self.0.upgrade() {
            ntb.interrupt_wait_reading();
        }
    }
}

/// A borrower's window as DMA target memory, for fabrics without direct mappings (tcp).
struct PeerWindowMemory {
    ntb: Arc<dyn Ntb>,
    window: usize,
    /// Where this memory starts inside the window.
    base: u64,
    len: u64,
}

impl PeerWindowMemory {
    fn at(&self, offset: u64) -> Result<WindowOffset, DmaError> {
        self.base
            .checked_add(offset)
            .map(WindowOffset)
            .ok_or_else(|| DmaError::Path("window offset overflows".into()))
    }
}

impl RemoteMemory for PeerWindowMemory {
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        self.ntb
            .peer_mw_read(self.window, self.at(offset)?, buf)
            .map_err(|e| DmaError::Path(e.to_string()))
    }

    fn read_many(&self, reads: &mut [(u64, &mut [u8])]) -> Result<(), DmaError> {
        let mut at = Vec::with_capacity(reads.len());
        for (offset, buf) in reads.iter_mut() {
            at.push((self.at(*offset)?, &mut **buf));
        }
        self.ntb
            .peer_mw_read_many(self.window, &mut at)
            .map_err(|e| DmaError::Path(e.to_string()))
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), DmaError> {
        self.ntb
            .peer_mw_write(self.window, self.at(offset)?, data)
            .map_err(|e| DmaError::Path(e.to_string()))
    }

    fn len(&self) -> u64 {
        self.len
    }
}

/// BAR registers as one borrower sees them: sizing from the device's masks, placement its own.
#[derive(Clone, Debug, Default)]
pub struct VirtualBars {
    value: [u32; 6],
    mask: [u32; 6],
    flags: [u32; 6],
}

/// Config-space offset of BAR0.
const BAR0_OFFSET: u16 = devlend_pci::config::header::BAR0;

impl VirtualBars {
    /// Registers for a device with these BARs (from [`PciDevice::bar_spec`]).
    pub fn new(specs: &[(BarIndex, BarSpec)]) -> Self {
        let mut v = VirtualBars::default();
        for (bar, spec) in specs {
            let i = bar.get() as usize;
            let size_mask = !(spec.size.max(16) - 1);
            let flags = (if spec.is_64bit { 0b100 } else { 0 })
                | (if spec.prefetchable { 0b1000 } else { 0 });
            if let (Some(m), Some(f)) = (v.mask.get_mut(i), v.flags.get_mut(i)) {
                *m = (size_mask as u32) & !0xf;
                *f = flags;
            }
            if spec.is_64bit {
                if let Some(m) = v.mask.get_mut(i + 1) {
                    *m = (size_mask >> 32) as u32;
                }
            }
        }
        v
    }

    /// Whether `offset` falls in the BAR registers.
    pub fn covers(offset: u16) -> bool {
        (BAR0_OFFSET..BAR0_OFFSET + 24).contains(&offset)
    }

    fn dword(&self, index: usize) -> u32 {
        match (
            self.value.get(index),
            self.mask.get(index),
            self.flags.get(index),
        ) {
            (Some(v), Some(m), Some(f)) => (v & m) | f,
            _ => 0,
        }
    }

    /// A config read inside the BAR registers.
    pub fn read(&self, offset: u16, size: AccessSize) -> u32 {
        let index = usize::from((offset - BAR0_OFFSET) / 4);
        let shift = u32::from(offset % 4) * 8;
        let d = self.dword(index) >> shift;
        match size {
            AccessSize::Byte => d & 0xff,
            AccessSize::Word => d & 0xffff,
            AccessSize::Dword => d,
        }
    }

    /// A config write inside the BAR registers.
    pub fn write(&mut self, offset: u16, size: AccessSize, value: u32) {
        let index = usize::from((offset - BAR0_OFFSET) / 4);
        let shift = u32::from(offset % 4) * 8;
        let width_mask: u32 = match size {
            AccessSize::Byte => 0xff,
            AccessSize::Word => 0xffff,
            AccessSize::Dword => 0xffff_ffff,
        };
        let mask = width_mask.checked_shl(shift).unwrap_or(0);
        if let Some(v) = self.value.get_mut(index) {
            *v = (*v & !mask) | (value.checked_shl(shift).unwrap_or(0) & mask);
        }
    }
}

/// A lease this host granted, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseStatus {
    /// The lent device.
    pub device: String,
    /// Lease id.
    pub lease: u64,
    /// The borrower holding it.
    pub holder: String,
    /// Milliseconds until it expires unless renewed.
    pub expires_in_ms: u64,
}

struct Lease {
    id: u64,
    link: Weak<Inner>,
    borrower: String,
    lease: Duration,
    deadline: Instant,
    windows: Vec<BarGrant>,
    doorbell_base: u32,
    vbars: VirtualBars,
    dma: Vec<(u64, u64)>,
}

/// A memory area of a BAR as placed in the lender's address space.
struct PlacedArea {
    bar: BarIndex,
    area: MemoryArea,
    /// Bus address of the area's first byte.
    addr: BusAddr,
    /// Base of the RAM region that holds it (removed with the device).
    region: BusAddr,
}

struct Exported {
    name: String,
    detail: String,
    /// Declared before `device`, so dropped before it: a real function's areas map its BARs
    /// through its VFIO file, and the function's own drop gives it back to its driver, which
    /// waits until nothing holds that file open (dropped after it, the rebind waits for ever).
    areas: Vec<PlacedArea>,
    device: Arc<dyn PciDevice>,
    iommu: Arc<Iommu>,
    sink: Arc<RoutedSink>,
    bars: Vec<(BarIndex, BarSpec, BusAddr)>,
    /// The device's capacity, asked once when it is added: describing a device (`list`,
    /// `status`, a grant) must not wait for the device, which may be held by a DMA transfer
    /// to a peer that stopped answering, while the lender's table is locked (that would hold
    /// the lease expiry too).
    size_bytes: Option<u64>,
    lease: Option<Lease>,
    /// A lease has ended and the device is being reset outside the table's lock: not lendable
    /// or removable until that is done.
    resetting: bool,
    /// Serializes what reaches the device itself on behalf of a lease (config accesses that
    /// are not virtual, the reset when the lease ends), without the table's lock: a slow
    /// device (a real function's FLR, a model whose worker waits on a DMA read from a peer
    /// that stopped answering) then holds only its own accesses, never other devices' leases
    /// and heartbeats. Lock order: this, then the table.
    access: Arc<Mutex<()>>,
}

impl Exported {
    fn desc(&self, owner: &str) -> DeviceDesc {
        DeviceDesc {
            name: self.name.clone(),
            kind: self.device.kind().to_string(),
            owner: owner.to_string(),
            borrower: self.lease.as_ref().map(|l| l.borrower.clone()),
            vectors: self.device.msix_vectors(),
            bars: self
                .bars
                .iter()
                .map(|(b, s, _)| BarDesc {
                    index: b.get(),
                    size: s.size,
                    is_64bit: s.is_64bit,
                    prefetchable: s.prefetchable,
                })
                .collect(),
            detail: self.detail.clone(),
            size_bytes: self.size_bytes,
        }
    }
}

/// An SR-IOV physical function the lender manages: not lendable itself while its virtual
/// functions (lendable devices of their own) are offered.
struct ManagedPf {
    desc: DeviceDesc,
    vfs: Vec<String>,
    /// Whatever keeps the PF running (its driver, its function); dropped with the PF.
    _keep: Arc<dyn std::any::Any + Send + Sync>,
}

#[derive(Default)]
struct State {
    devices: BTreeMap<String, Exported>,
    pfs: BTreeMap<String, ManagedPf>,
    next_lease: u64,
}

/// The lending half of a node.
pub(crate) struct Lender {
    state: Mutex<State>,
    /// Heartbeats that renewed a lease (for metrics).
    pub(crate) renewals: std::sync::atomic::AtomicU64,
}

impl Lender {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State {
                next_lease: 1,
                ..State::default()
            }),
            renewals: Default::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        devlend_sync::lock(&self.state)
    }

    pub(crate) fn add(
        &self,
        asp: &AddressSpace,
        owner: &str,
        name: &str,
        detail: &str,
        build: DeviceBuilder,
    ) -> Result<DeviceDesc, LendingError> {
        if name.is_empty()
            || name.len() > 64
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(LendingError::Device(format!(
                "invalid device name {name:?}: use 1-64 letters, digits, '-', '_' or '.'"
            )));
        }
        {
            let st = self.state();
            if st.devices.contains_key(name) || st.pfs.contains_key(name) {
                return Err(LendingError::DuplicateName(name.to_string()));
            }
        }
        let iommu = Arc::new(Iommu::new());
        let sink = Arc::new(RoutedSink::default());
        let device = build(iommu.clone(), sink.clone()).map_err(LendingError::Device)?;
        let mut bars = Vec::new();
        for bar in BarIndex::ALL {
            let Some(spec) = device.bar_spec(bar) else {
                continue;
            };
            let align = spec.size.max(4096);
            let base = asp
                .free_base(BAR_FLOOR, align, align)
                .ok_or(LendingError::NoFreeWindow)?;
            asp.add_mmio(
                base,
                spec.size,
                Arc::new(BarHandler {
                    device: device.clone(),
                    bar,
                    areas: device.bar_memory(bar),
                }),
            )?;
            bars.push((bar, spec, base));
        }
        let mut areas = Vec::new();
        for (bar, _, _) in &bars {
            for area in device.bar_memory(*bar) {
                let (mem, offset) = area.mem.memory();
                let len = mem.len() as u64;
                let region = asp
                    .free_base(BAR_FLOOR, len, 4096)
                    .ok_or(LendingError::NoFreeWindow)?;
                asp.add_ram(region, mem.clone())?;
                areas.push(PlacedArea {
                    bar: *bar,
                    addr: BusAddr(region.0 + offset),
                    region,
                    area,
                });
            }
        }
        let exported = Exported {
            name: name.to_string(),
            detail: detail.to_string(),
            size_bytes: device.capacity_bytes(),
            device,
            iommu,
            sink,
            bars,
            areas,
            lease: None,
            resetting: false,
            access: Arc::default(),
        };
        let desc = exported.desc(owner);
        self.state().devices.insert(name.to_string(), exported);
        Ok(desc)
    }

    /// Registers `name` as a managed physical function whose VFs `vfs` were added with
    /// [`Self::add`]; `desc` is how it is listed, `keep` what keeps it running.
    pub(crate) fn add_physical_function(
        &self,
        desc: DeviceDesc,
        vfs: Vec<String>,
        keep: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<(), LendingError> {
        let mut st = self.state();
        if st.devices.contains_key(&desc.name) || st.pfs.contains_key(&desc.name) {
            return Err(LendingError::DuplicateName(desc.name));
        }
        st.pfs.insert(
            desc.name.clone(),
            ManagedPf {
                desc,
                vfs,
                _keep: keep,
            },
        );
        Ok(())
    }

    /// Removes device `name` (with its virtual functions, for a managed physical function) and
    /// returns the names removed. Refused for a device that is lent or resetting, for a
    /// physical function one of whose virtual functions is, and for a virtual function alone.
    /// Checked and removed under one hold of the state, so a borrow cannot land in between;
    /// the devices themselves are dropped after it (a real function's goes back to its driver).
    pub(crate) fn remove(
        &self,
        asp: &AddressSpace,
        name: &str,
    ) -> Result<Vec<String>, LendingError> {
        let mut st = self.state();
        if let Some(pf) = st
            .pfs
            .iter()
            .find(|(_, pf)| pf.vfs.iter().any(|v| v == name))
            .map(|(pf, _)| pf.clone())
        {
            return Err(LendingError::VirtualFunction {
                vf: name.to_string(),
                pf,
            });
        }
        let vfs = st.pfs.get(name).map(|pf| pf.vfs.clone());
        let exported = vfs.clone().unwrap_or_else(|| vec![name.to_string()]);
        for n in &exported {
            match st.devices.get(n) {
                // A managed PF is not exported itself; a VF always is.
                None if vfs.is_none() => return Err(LendingError::NoSuchDevice(n.clone())),
                Some(d) if d.lease.is_some() => return Err(LendingError::Busy(n.clone())),
                Some(d) if d.resetting => return Err(LendingError::Resetting(n.clone())),
                _ => {}
            }
        }
        let mut gone = Vec::new();
        for n in &exported {
            if let Some(dev) = st.devices.remove(n) {
                for (_, _, base) in &dev.bars {
                    asp.remove(*base);
                }
                for a in &dev.areas {
                    asp.remove(a.region);
                }
                // Dropped below, areas before the device (see `Exported`).
                gone.push(dev);
            }
        }
        let pf = st.pfs.remove(name);
        drop(st);
        drop(gone);
        drop(pf);
        let mut removed = vec![name.to_string()];
        removed.extend(vfs.unwrap_or_default());
        Ok(removed)
    }

    pub(crate) fn leases(&self) -> Vec<LeaseStatus> {
        let now = Instant::now();
        self.state()
            .devices
            .values()
            .filter_map(|d| {
                d.lease.as_ref().map(|l| LeaseStatus {
                    device: d.name.clone(),
                    lease: l.id,
                    holder: l.borrower.clone(),
                    expires_in_ms: u64::try_from(
                        l.deadline.saturating_duration_since(now).as_millis(),
                    )
                    .unwrap_or(u64::MAX),
                })
            })
            .collect()
    }

    pub(crate) fn list(&self, owner: &str) -> Vec<DeviceDesc> {
        let st = self.state();
        let mut out: Vec<DeviceDesc> = st.pfs.values().map(|pf| pf.desc.clone()).collect();
        out.extend(st.devices.values().map(|d| d.desc(owner)));
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub(crate) fn handle(&self, node: &Arc<Inner>, req: Request) -> Response {
        let result = match req {
            Request::Borrow {
                device,
                borrower,
                lease_ms,
            } => self
                .borrow(node, &device, &borrower, lease_ms)
                .map(|grant| Response::Granted { grant }),
            Request::Return { lease } => self.end_lease(lease, "returned").map(|_| Response::Ok),
            Request::Heartbeat { lease } => self.with_lease(lease, |_, l| {
                l.deadline = Instant::now() + l.lease;
                self.renewals
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(Response::Ok)
            }),
            Request::ConfigRead {
                lease,
                offset,
                size,
            } => self.config_access(lease, offset, size, None),
            Request::ConfigWrite {
                lease,
                offset,
                size,
                value,
            } => self.config_access(lease, offset, size, Some(value)),
            Request::MapDma {
                lease,
                iova,
                len,
                window,
                offset,
                writable,
            } => self
                .map_dma(node, lease, iova, len, (window, offset), writable)
                .map(|_| Response::Ok),
            Request::UnmapDma { lease, iova, len } => self.with_lease(lease, |d, l| {
                d.device
                    .dma_unmap(BusAddr(iova), len)
                    .map_err(|e| LendingError::Refused(e.to_string()))?;
                d.iommu
                    .unmap(BusAddr(iova), len)
                    .map_err(|e| LendingError::Refused(e.to_string()))?;
                l.dma
                    .retain(|(a, _)| !(*a >= iova && *a < iova.saturating_add(len)));
                Ok(Response::Ok)
            }),
            Request::Hello { .. } | Request::List => {
                Err(LendingError::Protocol("handled by the node".into()))
            }
        };
        result.unwrap_or_else(|e| Response::Error {
            message: e.to_string(),
        })
    }

    /// A borrower's config read (`write` `None`) or write: the BAR registers are the lease's
    /// virtual ones, everything else goes to the device under its own access lock.
    fn config_access(
        &self,
        lease: u64,
        offset: u16,
        size: u8,
        write: Option<u32>,
    ) -> Result<Response, LendingError> {
        let size = config_size(offset, size)?;
        if VirtualBars::covers(offset) {
            return self.with_lease(lease, |_, l| {
                Ok(match write {
                    Some(value) => {
                        l.vbars.write(offset, size, value);
                        Response::Ok
                    }
                    None => Response::Value {
                        value: l.vbars.read(offset, size),
                    },
                })
            });
        }
        self.on_device(lease, |d| match write {
            Some(value) => {
                d.config_write(offset, size, value);
                Response::Ok
            }
            None => Response::Value {
                value: d.config_read(offset, size),
            },
        })
    }

    /// Runs `f` on the device `lease` is held on, holding the device's own access lock but
    /// not the table's (see [`Exported::access`]); the lease is checked again once that lock is
    /// held, so an access never reaches a device whose lease ended meanwhile.
    fn on_device(
        &self,
        lease: u64,
        f: impl FnOnce(&dyn PciDevice) -> Response,
    ) -> Result<Response, LendingError> {
        let not_held =
            || LendingError::Refused(format!("lease {lease} is not held (expired or returned)"));
        let (device, access) = {
            let st = self.state();
            let d = st
                .devices
                .values()
                .find(|d| d.lease.as_ref().is_some_and(|l| l.id == lease))
                .ok_or_else(not_held)?;
            (d.device.clone(), d.access.clone())
        };
        let _serial = devlend_sync::lock(&access);
        if !self.is_held(lease) {
            return Err(not_held());
        }
        Ok(f(&*device))
    }

    fn with_lease(
        &self,
        lease: u64,
        f: impl FnOnce(&Exported, &mut Lease) -> Result<Response, LendingError>,
    ) -> Result<Response, LendingError> {
        let mut st = self.state();
        for dev in st.devices.values_mut() {
            if let Some(mut l) = dev.lease.take() {
                if l.id == lease {
                    let r = f(dev, &mut l);
                    dev.lease = Some(l);
                    return r;
                }
                dev.lease = Some(l);
            }
        }
        Err(LendingError::Refused(format!(
            "lease {lease} is not held (expired or returned)"
        )))
    }

    fn borrow(
        &self,
        node: &Arc<Inner>,
        name: &str,
        borrower: &str,
        lease_ms: u64,
    ) -> Result<Grant, LendingError> {
        let mut guard = self.state();
        let st = &mut *guard;
        if let Some(pf) = st.pfs.get(name) {
            return Err(LendingError::PhysicalFunction {
                device: name.to_string(),
                vfs: pf.vfs.join(", "),
            });
        }
        let dev = st
            .devices
            .get_mut(name)
            .ok_or_else(|| LendingError::NoSuchDevice(name.to_string()))?;
        if let Some(l) = &dev.lease {
            return Err(LendingError::AlreadyLent {
                device: name.to_string(),
                holder: l.borrower.clone(),
            });
        }
        if dev.resetting {
            return Err(LendingError::Resetting(name.to_string()));
        }
        if dev.device.needs_direct_dma() && node.ntb.backend() == "tcp" {
            return Err(LendingError::Refused(direct_dma_refusal(name, "tcp")));
        }
        let vectors = dev.device.msix_vectors();
        let mut doorbells_used = devlend_sync::lock(&node.doorbells_used);
        let doorbell_base = (0..IRQ_DOORBELL_BITS.saturating_sub(u32::from(vectors)) + 1)
            .find(|b| {
                let bits = doorbell_bits(*b, vectors);
                *doorbells_used & bits == 0
            })
            .filter(|b| b + u32::from(vectors) <= IRQ_DOORBELL_BITS)
            .ok_or(LendingError::NoDoorbellBits {
                vectors,
                total: IRQ_DOORBELL_BITS,
                free: IRQ_DOORBELL_BITS
                    .saturating_sub((*doorbells_used & irq_doorbell_mask()).count_ones()),
            })?;
        let lease_id = st.next_lease;
        let mut windows = Vec::new();
        let mut setup = || -> Result<(), LendingError> {
            for (bar, spec, base) in &dev.bars {
                let window = node.windows.take()?;
                windows.push(BarGrant {
                    index: bar.get(),
                    window,
                    size: spec.size,
                    areas: Vec::new(),
                });
                node.ntb.mw_set_trans(window, *base, spec.size)?;
                for a in dev.areas.iter().filter(|a| a.bar == *bar) {
                    let window = node.windows.take()?;
                    let len = a.area.mem.len();
                    let grant = AreaGrant {
                        offset: a.area.offset,
                        len,
                        window,
                        wake_word: a.area.wake_word,
                    };
                    if let Some(g) = windows.last_mut() {
                        g.areas.push(grant);
                    }
                    node.ntb.mw_set_trans(window, a.addr, len)?;
                }
            }
            give_interrupt_fds(&*node.ntb, &*dev.device, doorbell_base, lease_id)
        };
        if let Err(e) = setup() {
            for w in all_windows(&windows) {
                let _ = node.ntb.mw_clear_trans(w);
                node.windows.give(w);
            }
            return Err(e);
        }
        *doorbells_used |= doorbell_bits(doorbell_base, vectors);
        drop(doorbells_used);
        // On a link a thread must read (tcp), the device's thread reads it while idle.
        if node.ntb.db_wait_polls() {
            dev.device
                .set_idle_wait(Some(Arc::new(LinkIdleWait(Arc::downgrade(&node.ntb)))));
        }
        let ntb = node.ntb.clone();
        dev.sink.route(Some(Arc::new(move |v: u16| {
            if v < vectors {
                // A lost interrupt on a dead link is what hardware does too.
                let _ = ntb.peer_db_set(1u64 << (doorbell_base + u32::from(v)));
            }
        })));
        let lease_len = Duration::from_millis(lease_ms.clamp(200, 600_000));
        let specs: Vec<(BarIndex, BarSpec)> = dev.bars.iter().map(|(b, s, _)| (*b, *s)).collect();
        let id = lease_id;
        st.next_lease += 1;
        dev.lease = Some(Lease {
            id,
            link: Arc::downgrade(node),
            borrower: borrower.to_string(),
            lease: lease_len,
            deadline: Instant::now() + lease_len,
            windows: windows.clone(),
            doorbell_base,
            vbars: VirtualBars::new(&specs),
            dma: Vec::new(),
        });
        tracing::info!("lent {name} to {borrower} (lease {id})");
        Ok(Grant {
            lease: id,
            device: dev.desc(&node.cfg.name),
            bars: windows,
            doorbell_base,
            lease_ms: lease_len.as_millis() as u64,
        })
    }

    /// Maps device addresses `[iova, iova + len)` onto `[offset, offset + len)` of the
    /// borrower's window `window`: a direct span where the fabric maps windows (zero copy),
    /// transfers through the window otherwise.
    fn map_dma(
        &self,
        node: &Inner,
        lease: u64,
        iova: u64,
        len: u64,
        (window, offset): (usize, u64),
        writable: bool,
    ) -> Result<(), LendingError> {
        let end = offset.checked_add(len).filter(|_| len > 0).ok_or_else(|| {
            LendingError::Refused(format!("bad DMA range {offset:#x} + {len:#x}"))
        })?;
        if iova.checked_add(len).is_none() {
            return Err(LendingError::Refused(format!(
                "bad DMA range {iova:#x} + {len:#x}"
            )));
        }
        // The lease (and the room for another mapping) first: a peer without one must get its
        // refusal at once, not hold this link's management thread while a window is awaited.
        self.with_lease(lease, |_, l| {
            if l.dma.len() >= MAX_DMA_MAPS {
                return Err(LendingError::Refused(format!(
                    "a lease holds at most {MAX_DMA_MAPS} DMA mappings"
                )));
            }
            Ok(Response::Ok)
        })?;
        crate::wait_peer_window(&*node.ntb, window, end, DMA_WINDOW_WAIT)?;
        let size = node.ntb.peer_mw_size(window)?;
        if end > size {
            return Err(LendingError::Refused(format!(
                "DMA mapping of {len:#x} bytes at {offset:#x} does not fit window {window} ({size:#x} bytes)"
            )));
        }
        let direct = match node.ntb.peer_mw_direct(window)? {
            Some(span) => Some(span.subspan(offset, len)?),
            None => None,
        };
        let target = match &direct {
            Some(span) => DmaTarget::Direct(span.clone()),
            None => DmaTarget::Remote(Arc::new(PeerWindowMemory {
                ntb: node.ntb.clone(),
                window,
                base: offset,
                len,
            })),
        };
        self.with_lease(lease, |d, l| {
            if let Some(span) = &direct {
                d.device
                    .dma_map(BusAddr(iova), span, writable)
                    .map_err(|e| LendingError::Refused(e.to_string()))?;
            } else if d.device.needs_direct_dma() {
                return Err(LendingError::Refused(direct_dma_refusal(
                    &d.name,
                    node.ntb.backend(),
                )));
            }
            if let Err(e) = d.iommu.map(BusAddr(iova), target, writable) {
                let _ = d.device.dma_unmap(BusAddr(iova), len);
                return Err(LendingError::Refused(e.to_string()));
            }
            l.dma.push((iova, len));
            Ok(Response::Ok)
        })
        .map(|_| ())
    }

    /// The lease on device `name`: (lease, its link, the borrower's name).
    pub(crate) fn lease_of(&self, name: &str) -> Option<(u64, Weak<Inner>, String)> {
        let st = self.state();
        let l = st.devices.get(name)?.lease.as_ref()?;
        Some((l.id, l.link.clone(), l.borrower.clone()))
    }

    /// Whether `lease` is still held.
    pub(crate) fn is_held(&self, lease: u64) -> bool {
        self.state()
            .devices
            .values()
            .any(|d| d.lease.as_ref().is_some_and(|l| l.id == lease))
    }

    /// Ends a lease: windows cleared (the borrower's accesses fail), IOMMU emptied (the
    /// device's DMA fails), interrupts cut, device reset, offered again.
    ///
    /// The lease leaves the table at once (under its lock) and the device is marked resetting;
    /// the slow part (windows, IOMMU, the reset itself) runs under the device's own access lock
    /// only, so other devices' leases, heartbeats and config accesses go on meanwhile.
    pub(crate) fn end_lease(&self, lease: u64, why: &str) -> Result<(), LendingError> {
        let (name, l, device, iommu, sink, access) = {
            let mut st = self.state();
            let dev = st
                .devices
                .values_mut()
                .find(|d| d.lease.as_ref().is_some_and(|l| l.id == lease))
                .ok_or_else(|| LendingError::Refused(format!("lease {lease} is not held")))?;
            let Some(l) = dev.lease.take() else {
                return Ok(());
            };
            dev.resetting = true;
            (
                dev.name.clone(),
                l,
                dev.device.clone(),
                dev.iommu.clone(),
                dev.sink.clone(),
                dev.access.clone(),
            )
        };
        let serial = devlend_sync::lock(&access);
        sink.route(None);
        device.set_idle_wait(None);
        // Every vector back to this side's own eventfds before the reset, so that the next
        // holder never receives this one's interrupts (a no-op for a device without them).
        device.set_interrupt_fds(None);
        let link = l.link.upgrade();
        for w in all_windows(&l.windows) {
            if let Some(link) = &link {
                if let Err(e) = link.ntb.mw_clear_trans(w) {
                    tracing::warn!("clearing window {w}: {e}");
                }
                link.windows.give(w);
            }
        }
        for (iova, len) in &l.dma {
            if let Err(e) = device.dma_unmap(BusAddr(*iova), *len) {
                tracing::warn!("unmapping DMA at {iova:#x} from {name}: {e}");
            }
            let _ = iommu.unmap(BusAddr(*iova), *len);
        }
        device.reset();
        if let Some(link) = &link {
            *devlend_sync::lock(&link.doorbells_used) &=
                !doorbell_bits(l.doorbell_base, device.msix_vectors());
        }
        if let Some(d) = self.state().devices.get_mut(&name) {
            d.resetting = false;
        }
        drop(serial);
        tracing::info!(
            "{name} is back from {} ({why}); reset and available",
            l.borrower
        );
        Ok(())
    }

    /// Ends every lease whose heartbeats stopped; returns (lease, reason, its link) for each
    /// lease this call ended.
    pub(crate) fn expire(&self) -> Vec<(u64, String, Weak<Inner>)> {
        let now = Instant::now();
        let expired: Vec<(u64, String, Weak<Inner>)> = self
            .state()
            .devices
            .values()
            .filter_map(|d| d.lease.as_ref())
            .filter(|l| l.deadline <= now)
            .map(|l| {
                let why = format!(
                    "lease of {} expired (no heartbeat for {:?})",
                    l.borrower, l.lease
                );
                (l.id, why, l.link.clone())
            })
            .collect();
        // Another thread may have ended one meanwhile (expiry runs on the host's thread and
        // on each link's): report only the leases this call ended.
        expired
            .into_iter()
            .filter(|(id, why, link)| {
                if !self.is_held(*id) {
                    return false;
                }
                // A borrower silent for a whole lease is gone: its link is dropped first, so
                // that a device transfer waiting on it (a DMA read over tcp, a posted write
                // held by back-pressure) fails now and the reset below need not wait for the
                // fabric's own liveness timeout (3 s over tcp).
                if let Some(link) = link.upgrade() {
                    link.ntb.drop_peer(why);
                }
                self.end_lease(*id, why).is_ok()
            })
            .collect()
    }
}

/// Every window a grant uses (BARs and their memory areas).
fn all_windows(grants: &[BarGrant]) -> Vec<usize> {
    grants
        .iter()
        .flat_map(|g| std::iter::once(g.window).chain(g.areas.iter().map(|a| a.window)))
        .collect()
}

/// Why a real device (its DMA bypasses any software path) is not lent over `fabric`.
fn direct_dma_refusal(device: &str, fabric: &str) -> String {
    format!(
        "{device} is a real device: its DMA cannot be intercepted, so it can be lent only over a \
         fabric on which it reaches borrower memory directly (shm, a hardware NTB), not over {fabric}"
    )
}

/// Whether a lent device's vectors reach the borrower as eventfds its hardware signals (no
/// lender thread in between, as a hardware NTB carries an MSI-X write straight to the
/// borrower's interrupt controller): a real device's (kind `vfio`) with vectors, on a fabric
/// that carries descriptors. The borrower applies the same rule to know it must wait for them.
pub(crate) fn direct_interrupts(kind: &str, vectors: u16, ntb: &dyn Ntb) -> bool {
    kind == "vfio" && vectors > 0 && ntb.carries_interrupt_fds()
}

/// Hands the borrower one eventfd per vector of `device` (doorbell bit `base + v`, tagged with
/// the lease) and has the device signal them (see [`direct_interrupts`]); nothing for other
/// devices, which ring doorbells through their interrupt sink.
fn give_interrupt_fds(
    ntb: &dyn Ntb,
    device: &dyn PciDevice,
    base: u32,
    lease: u64,
) -> Result<(), LendingError> {
    let vectors = device.msix_vectors();
    if !direct_interrupts(device.kind(), vectors, ntb) {
        return Ok(());
    }
    let mut fds = Vec::with_capacity(usize::from(vectors));
    for v in 0..u32::from(vectors) {
        let fd = EventFd::new(EFD_NONBLOCK).map_err(|source| LendingError::Io {
            op: "eventfd for an interrupt vector",
            source,
        })?;
        let bit = base
            .checked_add(v)
            .ok_or_else(|| LendingError::Device("doorbell bit overflows".into()))?;
        if !ntb.give_interrupt_fd(bit, lease, &fd)? {
            return Err(LendingError::Device(
                "the fabric cannot carry interrupt descriptors".into(),
            ));
        }
        fds.push(Arc::new(fd));
    }
    if !device.set_interrupt_fds(Some(&fds)) {
        return Err(LendingError::Device(
            "the device cannot signal its vectors on descriptors".into(),
        ));
    }
    Ok(())
}

fn doorbell_bits(base: u32, vectors: u16) -> u64 {
    let n = u32::from(vectors);
    if n == 0 {
        return 0;
    }
    let ones = if n >= 64 { u64::MAX } else { (1u64 << n) - 1 };
    ones.checked_shl(base).unwrap_or(0)
}

fn config_size(offset: u16, size: u8) -> Result<AccessSize, LendingError> {
    let s = AccessSize::from_len(usize::from(size))
        .ok_or_else(|| LendingError::Refused(format!("bad config access size {size}")))?;
    if offset >= 4096 || !offset.is_multiple_of(u16::from(size)) {
        return Err(LendingError::Refused(format!(
            "bad config access at {offset:#x}"
        )));
    }
    Ok(s)
}

impl From<FabricError> for Response {
    fn from(e: FabricError) -> Self {
        Response::Error {
            message: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test device, presented as a real device that signals its vectors on eventfds
    /// (recording what the lender asks of it, in order).
    struct EventfdDevice {
        inner: Arc<dyn PciDevice>,
        calls: Arc<Mutex<Vec<&'static str>>>,
        fds: Arc<Mutex<Vec<Arc<EventFd>>>>,
    }

    impl PciDevice for EventfdDevice {
        fn config_read(&self, offset: u16, size: AccessSize) -> u32 {
            self.inner.config_read(offset, size)
        }
        fn config_write(&self, offset: u16, size: AccessSize, value: u32) {
            self.inner.config_write(offset, size, value)
        }
        fn bar_spec(&self, bar: BarIndex) -> Option<BarSpec> {
            self.inner.bar_spec(bar)
        }
        fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]) {
            self.inner.bar_read(bar, offset, data)
        }
        fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) {
            self.inner.bar_write(bar, offset, data)
        }
        fn reset(&self) {
            self.calls.lock().unwrap().push("reset");
            self.inner.reset()
        }
        fn msix_vectors(&self) -> u16 {
            self.inner.msix_vectors()
        }
        fn kind(&self) -> &'static str {
            "vfio"
        }
        fn set_interrupt_fds(&self, fds: Option<&[Arc<EventFd>]>) -> bool {
            self.calls
                .lock()
                .unwrap()
                .push(if fds.is_some() { "fds" } else { "none" });
            *self.fds.lock().unwrap() = fds.map(<[_]>::to_vec).unwrap_or_default();
            true
        }
    }

    #[test]
    fn a_real_devices_vectors_reach_a_shm_borrower_as_eventfds_and_come_back_first() {
        use devlend_fabric::{Link, LinkConfig, LinkState, ShmNtb};
        use devlend_pci::Interrupts;
        let dir = std::env::temp_dir().join(format!("devlend-irqfd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let lender_asp = Arc::new(AddressSpace::new());
        let l = ShmNtb::open(&dir, lender_asp, LinkConfig::default()).unwrap();
        let b = ShmNtb::open(&dir, Arc::new(AddressSpace::new()), LinkConfig::default()).unwrap();
        let long = Duration::from_secs(20);
        l.wait_link(LinkState::Up, long).unwrap();
        b.wait_link(LinkState::Up, long).unwrap();
        let lender =
            crate::Node::start(crate::NodeConfig::new("lender"), vec![l as Arc<dyn Ntb>]).unwrap();
        let borrower =
            crate::Node::start(crate::NodeConfig::new("borrower"), vec![b as Arc<dyn Ntb>])
                .unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let fds = Arc::new(Mutex::new(Vec::new()));
        let (c, f) = (calls.clone(), fds.clone());
        lender
            .add_device(
                "rd0",
                "test device as a real one",
                Box::new(move |dma, irq| {
                    let inner = devlend_pci::test_device::TestDevice::build(dma, irq)
                        .map_err(|e| e.to_string())?;
                    Ok(Arc::new(EventfdDevice {
                        inner,
                        calls: c,
                        fds: f,
                    }) as Arc<dyn PciDevice>)
                }),
            )
            .unwrap();
        let dev = borrower.borrow("rd0").unwrap();
        assert_eq!(*calls.lock().unwrap(), vec!["fds"]);
        let given = fds.lock().unwrap().clone();
        assert_eq!(given.len(), usize::from(dev.interrupt_vectors()));
        // The device's hardware signals vector 1: the borrower's wait sees it, vector 0 not.
        given[1].write(1).unwrap();
        assert!(dev.wait_interrupt(1, long).unwrap());
        assert!(!dev.wait_interrupt(0, Duration::from_millis(1)).unwrap());
        drop(dev);
        borrower.give_back("rd0").unwrap();
        let deadline = Instant::now() + long;
        while !calls.lock().unwrap().contains(&"reset") {
            assert!(Instant::now() < deadline, "the lease never ended");
            std::thread::yield_now();
        }
        assert_eq!(
            calls.lock().unwrap()[..3],
            ["fds", "none", "reset"],
            "every vector back to the lender before the reset"
        );
        drop(borrower);
        drop(lender);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn bar(i: u8) -> BarIndex {
        BarIndex::new(i).unwrap()
    }

    #[test]
    fn virtual_bars_answer_sizing_from_masks() {
        let specs = [
            (
                bar(0),
                BarSpec {
                    size: 0x4000,
                    is_64bit: true,
                    prefetchable: false,
                },
            ),
            (
                bar(2),
                BarSpec {
                    size: 0x1000,
                    is_64bit: false,
                    prefetchable: true,
                },
            ),
        ];
        let mut v = VirtualBars::new(&specs);
        // Sizing: write all-ones, read back.
        v.write(0x10, AccessSize::Dword, 0xffff_ffff);
        v.write(0x14, AccessSize::Dword, 0xffff_ffff);
        assert_eq!(v.read(0x10, AccessSize::Dword), 0xffff_c004);
        assert_eq!(v.read(0x14, AccessSize::Dword), 0xffff_ffff);
        v.write(0x18, AccessSize::Dword, 0xffff_ffff);
        assert_eq!(v.read(0x18, AccessSize::Dword), 0xffff_f008);
        // Unimplemented slots read zero.
        v.write(0x1c, AccessSize::Dword, 0xffff_ffff);
        assert_eq!(v.read(0x1c, AccessSize::Dword), 0);
        // Placement is the borrower's own, down to byte writes.
        v.write(0x10, AccessSize::Dword, 0xfebf_0000);
        v.write(0x14, AccessSize::Dword, 0x1);
        assert_eq!(v.read(0x10, AccessSize::Dword), 0xfebf_0004);
        v.write(0x11, AccessSize::Byte, 0x80);
        assert_eq!(v.read(0x10, AccessSize::Dword), 0xfebf_8004 & 0xffff_c004);
        assert_eq!(v.read(0x12, AccessSize::Word), 0xfebf);
        assert!(
            VirtualBars::covers(0x24) && !VirtualBars::covers(0x28) && !VirtualBars::covers(0x0c)
        );
    }

    #[test]
    fn doorbell_bit_ranges() {
        assert_eq!(doorbell_bits(0, 3), 0b111);
        assert_eq!(doorbell_bits(4, 2), 0b11_0000);
        assert_eq!(doorbell_bits(0, 0), 0);
        assert_eq!(doorbell_bits(0, 64), u64::MAX);
        assert_eq!(doorbell_bits(70, 1), 0);
    }

    #[test]
    fn config_sizes_are_checked() {
        assert!(config_size(0x10, 4).is_ok());
        assert!(config_size(0x11, 4).is_err());
        assert!(config_size(0x11, 3).is_err());
        assert!(config_size(4096, 1).is_err());
    }
}
