//! The borrower: a peer's device as a local [`PciFunction`].
//!
//! - config accesses are requests to the lender (the `pci_ops` of a virtual bus);
//! - BAR accesses go through the lender's inbound windows (posted writes, non-posted reads);
//! - DMA memory is this host's RAM, exposed through one of its inbound windows and mapped by
//!   the lender's IOMMU at the same bus addresses the driver sees;
//! - interrupts are doorbell bits: waiting for vector *v* waits for bit `base + v`; except a
//!   real device's on a fabric that carries descriptors (`lender::direct_interrupts`), whose
//!   vectors are eventfds the lender hands over with the lease and the device's hardware
//!   signals itself: waiting for vector *v* waits on its eventfd.
//!
//! When the link drops or the lender revokes the lease, the function is *removed*: every call
//! fails with [`FunctionError::Removed`], waits end at once, nothing hangs.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devlend_fabric::{BusAddr, FabricError, LinkState, SharedMemory, WindowOffset};
use devlend_pci::dma_pool::DmaPool;
use devlend_pci::{
    AccessSize, BarAccess, BarIndex, ConfigAccess, DmaAlloc, DmaBuffer, DmaRemap, FunctionError,
    Interrupts, MemSpan, MemoryArea, PciFunction,
};
use rustix::event::{PollFd, PollFlags, Timespec};
use vmm_sys_util::eventfd::EventFd;

use crate::protocol::{BarGrant, DeviceDesc, Grant, Request, Response};
use crate::{unexpected, Inner, LendingError};

/// Device-visible address (IOVA) of a borrowed function's DMA pool.
const POOL_IOVA: BusAddr = BusAddr(0x4000_0000_0000);
/// Where a borrower places the memory it exposes through windows, in its own address space.
const EXPOSE_FLOOR: BusAddr = BusAddr(0x5000_0000_0000);

/// One DMA mapping this borrower set up: its memory region, window and range.
/// One memory object of this host (a memfd: the DMA pool, a VMM's guest RAM) exposed to the
/// lender through one inbound window, as SmartIO exposes one DMA window per borrower: the
/// lender's IOMMU then maps device addresses to offsets inside it.
struct Exposure {
    window: usize,
    region_base: BusAddr,
    maps: usize,
}

/// One device mapping: `[iova, iova + len)` onto an exposure.
struct DmaMapping {
    iova: u64,
    len: u64,
    key: (u64, u64),
}

#[derive(Default)]
struct DmaState {
    exposures: HashMap<(u64, u64), Exposure>,
    maps: Vec<DmaMapping>,
}

/// Identity (device, inode) and size of the file behind `mem`.
fn memory_identity(mem: &SharedMemory) -> Result<((u64, u64), u64), LendingError> {
    let info = devlend_memory::file_info(mem.fd())?;
    Ok((info.id, info.size))
}

/// A BAR memory area reached by direct stores (on fabrics that map windows).
struct DirectArea {
    bar: u8,
    area: MemoryArea,
}

/// A device borrowed from the peer.
pub struct BorrowedFunction {
    node: Weak<Inner>,
    grant: Grant,
    bars: [Option<BarGrant>; 6],
    /// Emptied when the function is removed: a real device's registers are mapped through
    /// its VFIO descriptor, which must not outlive the lease (the lender's unbind of the
    /// device waits for every descriptor to close).
    areas: std::sync::RwLock<Vec<DirectArea>>,
    pool: DmaPool,
    dma: Mutex<DmaState>,
    removed: AtomicBool,
    reason: Mutex<String>,
    redirect: Mutex<Redirect>,
    /// Per vector, the eventfd the device's hardware signals itself (a real device lent over
    /// a fabric that carries descriptors, see `lender::direct_interrupts`); empty when the
    /// vectors ring doorbells.
    irq_fds: Arc<[EventFd]>,
}

#[derive(Default)]
struct Redirect {
    fds: HashMap<u16, Arc<EventFd>>,
    thread: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl std::fmt::Debug for BorrowedFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BorrowedFunction({})", self.grant.device.name)
    }
}

fn removed_error(f: &BorrowedFunction) -> FunctionError {
    FunctionError::Removed(f.reason.lock().map(|r| r.clone()).unwrap_or_default())
}

impl BorrowedFunction {
    /// The device description from the grant.
    pub fn device(&self) -> &DeviceDesc {
        &self.grant.device
    }

    /// The lease.
    pub fn lease(&self) -> u64 {
        self.grant.lease
    }

    /// Whether the function is gone.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    fn node(&self) -> Result<Arc<Inner>, FunctionError> {
        if self.is_removed() {
            return Err(removed_error(self));
        }
        self.node
            .upgrade()
            .ok_or_else(|| FunctionError::Removed("the node shut down".into()))
    }

    /// Marks the function removed (surprise removal or revocation) and wakes its waiters.
    pub(crate) fn mark_removed(&self, why: &str) {
        if !self.removed.swap(true, Ordering::AcqRel) {
            *devlend_sync::lock(&self.reason) = why.to_string();
            if why == "returned" || why == "dropped" {
                tracing::info!("{} {why}", self.grant.device.name);
            } else {
                tracing::warn!("{} removed: {why}", self.grant.device.name);
            }
        }
        devlend_sync::write(&self.areas).clear();
        let mut r = devlend_sync::lock(&self.redirect);
        if let Some((stop, t)) = r.thread.take() {
            stop.store(true, Ordering::Release);
            let _ = t.join();
        }
    }

    fn fabric_error(&self, e: FabricError) -> FunctionError {
        match e {
            FabricError::LinkDown => {
                self.mark_removed("the link to the lender went down");
                removed_error(self)
            }
            // The lender clears a lease's windows before its revocation notice reaches us: a
            // BAR window no longer translated is the device taken away, a surprise removal.
            FabricError::WindowNotTranslated(_) => {
                self.mark_removed("the lender withdrew the device's memory window");
                removed_error(self)
            }
            other => FunctionError::Transport(other.to_string()),
        }
    }

    fn bar(&self, bar: BarIndex, offset: u64, len: usize) -> Result<&BarGrant, FunctionError> {
        let g = self
            .bars
            .get(bar.get() as usize)
            .and_then(|b| b.as_ref())
            .ok_or(FunctionError::NoSuchBar(bar.get()))?;
        let bad = FunctionError::BadBarAccess {
            bar: bar.get(),
            offset,
            len,
        };
        match offset.checked_add(len as u64) {
            Some(end) if len > 0 && end <= g.size => Ok(g),
            _ => Err(bad),
        }
    }

    /// Runs `access` on the directly mapped area holding `[offset, offset + len)` of BAR `bar`,
    /// with the offset inside it; `None` when no such area is mapped. The access runs under the
    /// areas' read lock, so a removal (which clears them) never overlaps it, and it takes no
    /// reference count: a doorbell store on this path costs the store and the lock, as the
    /// driver's hot path wants.
    fn on_direct_area<R>(
        &self,
        bar: BarIndex,
        offset: u64,
        len: usize,
        access: impl FnOnce(&MemoryArea, u64) -> R,
    ) -> Option<R> {
        let areas = devlend_sync::read(&self.areas);
        let (area, at) = areas.iter().find_map(|d| {
            let at = offset.checked_sub(d.area.offset)?;
            (d.bar == bar.get() && at.checked_add(len as u64)? <= d.area.mem.len())
                .then_some((&d.area, at))
        })?;
        Some(access(area, at))
    }

    fn config_check(offset: u16, size: AccessSize) -> Result<(), FunctionError> {
        if offset >= 4096 || !offset.is_multiple_of(size.len() as u16) {
            return Err(FunctionError::BadConfigAccess {
                offset,
                size: size.len(),
            });
        }
        Ok(())
    }

    fn call(&self, req: Request) -> Result<Response, FunctionError> {
        let node = self.node()?;
        match node.call(req) {
            Ok(Response::Error { message }) if message.contains("is not held") => {
                self.mark_removed("the lender no longer holds our lease");
                Err(removed_error(self))
            }
            Ok(r) => Ok(r),
            Err(LendingError::LinkDown) => {
                self.mark_removed("the link to the lender went down");
                Err(removed_error(self))
            }
            Err(e) => Err(FunctionError::Transport(e.to_string())),
        }
    }

    fn vector_bit(&self, vector: u16) -> Result<u64, FunctionError> {
        let count = self.grant.device.vectors;
        if vector >= count {
            return Err(FunctionError::NoSuchVector { vector, count });
        }
        // The grant's range was checked when it arrived (`borrow`); checked again here so no
        // peer value reaches a shift unchecked.
        self.grant
            .doorbell_base
            .checked_add(u32::from(vector))
            .and_then(|bit| 1u64.checked_shl(bit))
            .ok_or(FunctionError::NoSuchVector { vector, count })
    }

    /// The window exposing the memory object behind `shared`, exposing it first if needed.
    fn expose(
        &self,
        node: &Inner,
        st: &mut DmaState,
        shared: &Arc<SharedMemory>,
    ) -> Result<((u64, u64), usize), LendingError> {
        let (key, size) = memory_identity(shared)?;
        if let Some(e) = st.exposures.get(&key) {
            return Ok((key, e.window));
        }
        // Map the whole object once (the caller may hold only part of it).
        let whole = if shared.fd_offset() == 0 && shared.len() as u64 == size {
            shared.clone()
        } else {
            let fd = shared
                .fd()
                .try_clone_to_owned()
                .map_err(|e| LendingError::Io {
                    op: "dup of DMA memory",
                    source: e,
                })?;
            Arc::new(SharedMemory::map(fd, 0, size as usize)?)
        };
        let asp = node.ntb.address_space();
        let region_base = asp
            .free_base(EXPOSE_FLOOR, size, 1 << 21)
            .ok_or(LendingError::NoFreeWindow)?;
        asp.add_ram(region_base, whole)?;
        let window = match node.windows.take() {
            Ok(w) => w,
            Err(e) => {
                asp.remove(region_base);
                return Err(e);
            }
        };
        if let Err(e) = node.ntb.mw_set_trans(window, region_base, size) {
            node.windows.give(window);
            asp.remove(region_base);
            return Err(e.into());
        }
        st.exposures.insert(
            key,
            Exposure {
                window,
                region_base,
                maps: 0,
            },
        );
        Ok((key, window))
    }

    fn release_exposure(node: &Inner, e: &Exposure) {
        let _ = node.ntb.mw_clear_trans(e.window);
        node.windows.give(e.window);
        node.ntb.address_space().remove(e.region_base);
    }

    /// Makes `mem` (this host's memory) reachable by the device at `iova`.
    fn map_memory(
        &self,
        node: &Inner,
        iova: BusAddr,
        mem: &MemSpan,
        writable: bool,
    ) -> Result<(), LendingError> {
        let (shared, span_offset) = mem.memory();
        let mut st = devlend_sync::lock(&self.dma);
        let end = iova
            .0
            .checked_add(mem.len())
            .ok_or_else(|| LendingError::Refused("IOVA range overflows".into()))?;
        if st
            .maps
            .iter()
            .any(|m| m.iova < end && iova.0 < m.iova.saturating_add(m.len))
        {
            return Err(LendingError::Refused(format!(
                "DMA range {iova} + {:#x} overlaps an existing mapping",
                mem.len()
            )));
        }
        let (key, window) = self.expose(node, &mut st, shared)?;
        let req = Request::MapDma {
            lease: self.grant.lease,
            iova: iova.0,
            len: mem.len(),
            window,
            offset: shared.fd_offset() + span_offset,
            writable,
        };
        let result = match node.call(req) {
            Ok(Response::Ok) => Ok(()),
            Ok(other) => Err(unexpected(other)),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => {
                if let Some(e) = st.exposures.get_mut(&key) {
                    e.maps += 1;
                }
                st.maps.push(DmaMapping {
                    iova: iova.0,
                    len: mem.len(),
                    key,
                });
                Ok(())
            }
            Err(err) => {
                if st.exposures.get(&key).is_some_and(|e| e.maps == 0) {
                    if let Some(e) = st.exposures.remove(&key) {
                        Self::release_exposure(node, &e);
                    }
                }
                Err(err)
            }
        }
    }

    fn release_all(&self, node: &Inner) {
        let st = std::mem::take(&mut *devlend_sync::lock(&self.dma));
        for e in st.exposures.values() {
            Self::release_exposure(node, e);
        }
    }
}

impl ConfigAccess for BorrowedFunction {
    fn config_read(&self, offset: u16, size: AccessSize) -> Result<u32, FunctionError> {
        Self::config_check(offset, size)?;
        let req = Request::ConfigRead {
            lease: self.grant.lease,
            offset,
            size: size.len() as u8,
        };
        match self.call(req)? {
            Response::Value { value } => Ok(value),
            other => Err(FunctionError::Transport(unexpected(other).to_string())),
        }
    }

    fn config_write(&self, offset: u16, size: AccessSize, value: u32) -> Result<(), FunctionError> {
        Self::config_check(offset, size)?;
        let req = Request::ConfigWrite {
            lease: self.grant.lease,
            offset,
            size: size.len() as u8,
            value,
        };
        match self.call(req)? {
            Response::Ok => Ok(()),
            other => Err(FunctionError::Transport(unexpected(other).to_string())),
        }
    }
}

impl BarAccess for BorrowedFunction {
    fn bar_mappings(&self, bar: BarIndex) -> Vec<MemoryArea> {
        devlend_sync::read(&self.areas)
            .iter()
            .filter(|d| d.bar == bar.get())
            .map(|d| d.area.clone())
            .collect()
    }

    fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), FunctionError> {
        if self.is_removed() {
            return Err(removed_error(self));
        }
        let g = self.bar(bar, offset, data.len())?;
        // A real device's registers mapped through the window: a load the device answers.
        let direct = self.on_direct_area(bar, offset, data.len(), |area, at| {
            area.is_registers().then(|| area.mem.read_at(at, data))
        });
        if let Some(Some(read)) = direct {
            return read.map_err(FunctionError::from);
        }
        self.node()?
            .ntb
            .peer_mw_read(g.window, WindowOffset(offset), data)
            .map_err(|e| self.fabric_error(e))
    }

    fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) -> Result<(), FunctionError> {
        if self.is_removed() {
            return Err(removed_error(self));
        }
        let g = self.bar(bar, offset, data.len())?;
        // Doorbell-style memory: a direct store through the window, and a wake-up only when
        // the device sleeps; a real device's registers: a store the device sees. No message,
        // no lender thread.
        if let Some(written) = self.on_direct_area(bar, offset, data.len(), |area, at| {
            area.write_and_wake(at, data)
        }) {
            return written.map_err(FunctionError::from);
        }
        self.node()?
            .ntb
            .peer_mw_write(g.window, WindowOffset(offset), data)
            .map_err(|e| self.fabric_error(e))
    }
}

impl DmaAlloc for BorrowedFunction {
    fn dma_alloc(&self, len: usize) -> Result<DmaBuffer, FunctionError> {
        if self.is_removed() {
            return Err(removed_error(self));
        }
        self.pool.alloc(len)
    }
}

impl DmaRemap for BorrowedFunction {
    fn dma_map(&self, iova: BusAddr, mem: MemSpan, writable: bool) -> Result<(), FunctionError> {
        let node = self.node()?;
        self.map_memory(&node, iova, &mem, writable)
            .map_err(|e| match e {
                LendingError::LinkDown => {
                    self.mark_removed("the link to the lender went down");
                    removed_error(self)
                }
                other => FunctionError::Transport(other.to_string()),
            })
    }

    fn dma_unmap(&self, iova: BusAddr, len: u64) -> Result<(), FunctionError> {
        let node = self.node()?;
        let end = iova.0.saturating_add(len);
        let mut st = devlend_sync::lock(&self.dma);
        let (gone, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut st.maps)
            .into_iter()
            .partition(|m| m.iova >= iova.0 && m.iova < end);
        st.maps = keep;
        for m in gone {
            let req = Request::UnmapDma {
                lease: self.grant.lease,
                iova: m.iova,
                len: m.len,
            };
            if let Err(e) = node.call(req) {
                tracing::debug!("unmapping DMA at the lender: {e}");
            }
            let release = match st.exposures.get_mut(&m.key) {
                Some(e) => {
                    e.maps = e.maps.saturating_sub(1);
                    e.maps == 0
                }
                None => false,
            };
            if release {
                if let Some(e) = st.exposures.remove(&m.key) {
                    Self::release_exposure(&node, &e);
                }
            }
        }
        Ok(())
    }
}

impl Interrupts for BorrowedFunction {
    fn interrupt_vectors(&self) -> u16 {
        self.grant.device.vectors
    }

    fn wait_interrupt(&self, vector: u16, timeout: Duration) -> Result<bool, FunctionError> {
        let bit = self.vector_bit(vector)?;
        if let Some(fd) = self.irq_fds.get(usize::from(vector)) {
            return self.wait_eventfd(fd, timeout);
        }
        let node = self.node()?;
        // Poll the doorbell first, with the same budget a local binding polls its vector,
        // unless the fabric's own wait polls the link (then it reads the doorbell's message
        // on this thread, and a spin here would only watch another thread do it).
        let spin = if node.ntb.db_wait_polls() {
            Duration::ZERO
        } else {
            devlend_pci::INTERRUPT_SPIN.min(timeout)
        };
        if devlend_pci::spin_until(spin, || node.ntb.db_read() & bit != 0 || self.is_removed()) {
            if self.is_removed() {
                return Err(removed_error(self));
            }
            node.ntb.db_clear(bit).map_err(|e| self.fabric_error(e))?;
            return Ok(true);
        }
        match node.ntb.db_wait(bit, timeout) {
            Ok(_) => {
                node.ntb.db_clear(bit).map_err(|e| self.fabric_error(e))?;
                if self.is_removed() {
                    return Err(removed_error(self));
                }
                Ok(true)
            }
            Err(FabricError::Timeout) => {
                if self.is_removed() {
                    return Err(removed_error(self));
                }
                Ok(false)
            }
            Err(e) => Err(self.fabric_error(e)),
        }
    }

    fn set_interrupt_eventfd(
        &self,
        vector: u16,
        fd: Option<Arc<EventFd>>,
    ) -> Result<(), FunctionError> {
        self.vector_bit(vector)?;
        let node = self.node()?;
        let mut r = devlend_sync::lock(&self.redirect);
        match fd {
            Some(fd) => r.fds.insert(vector, fd),
            None => r.fds.remove(&vector),
        };
        // Restart the forwarder with the new routing table.
        if let Some((stop, t)) = r.thread.take() {
            stop.store(true, Ordering::Release);
            let _ = t.join();
        }
        if r.fds.is_empty() {
            return Ok(());
        }
        if !self.irq_fds.is_empty() {
            let routes: Vec<(usize, Arc<EventFd>)> = r
                .fds
                .iter()
                .map(|(v, fd)| (usize::from(*v), fd.clone()))
                .collect();
            r.thread = Some(self.spawn_forwarder(&routes)?);
            return Ok(());
        }
        let routes: Vec<(u64, Arc<EventFd>)> = r
            .fds
            .iter()
            .filter_map(|(v, fd)| self.vector_bit(*v).ok().map(|b| (b, fd.clone())))
            .collect();
        let mask = routes.iter().fold(0u64, |m, (b, _)| m | b);
        let stop = Arc::new(AtomicBool::new(false));
        let ntb = node.ntb.clone();
        let stop2 = stop.clone();
        let t = std::thread::Builder::new()
            .name(format!("devlend-irq-{}", self.grant.device.name))
            .spawn(move || {
                // Forwards doorbell bits to the caller's eventfds until stopped or link-down.
                while !stop2.load(Ordering::Acquire) {
                    match ntb.db_wait(mask, Duration::from_millis(50)) {
                        Ok(bits) => {
                            let _ = ntb.db_clear(bits & mask);
                            for (b, fd) in &routes {
                                if bits & b != 0 {
                                    let _ = fd.write(1);
                                }
                            }
                        }
                        Err(FabricError::Timeout) => {}
                        Err(_) => return,
                    }
                }
            })
            .map_err(|e| FunctionError::Io {
                op: "spawn interrupt forwarder",
                source: e,
            })?;
        r.thread = Some((stop, t));
        Ok(())
    }
}

impl BorrowedFunction {
    /// Waits for vector eventfd `fd`: polled (a non-blocking read) with the budget a local
    /// binding polls its vector, then `poll(2)` in slices that look at removal and the link.
    fn wait_eventfd(&self, fd: &EventFd, timeout: Duration) -> Result<bool, FunctionError> {
        let mut fired = false;
        let spin = devlend_pci::INTERRUPT_SPIN.min(timeout);
        devlend_pci::spin_until(spin, || {
            fired = fired || fd.read().is_ok();
            fired || self.is_removed()
        });
        if fired && !self.is_removed() {
            return Ok(true);
        }
        // Sleeping: from here on the node is needed (its link state).
        let node = self.node()?;
        let deadline = Instant::now().checked_add(timeout);
        while !fired {
            if self.is_removed() {
                return Err(removed_error(self));
            }
            if node.ntb.link_state() == LinkState::Down {
                return Err(self.fabric_error(FabricError::LinkDown));
            }
            let left = deadline.map_or(EVENTFD_SLICE, |d| {
                d.saturating_duration_since(Instant::now())
            });
            if left.is_zero() {
                return Ok(false);
            }
            if readable(fd, left.min(EVENTFD_SLICE)).map_err(|source| FunctionError::Io {
                op: "poll an interrupt eventfd",
                source,
            })? {
                fired = fd.read().is_ok();
            }
        }
        if self.is_removed() {
            return Err(removed_error(self));
        }
        Ok(true)
    }

    /// Forwards the device's eventfds of the vectors in `routes` to the caller's eventfds
    /// until stopped.
    fn spawn_forwarder(
        &self,
        routes: &[(usize, Arc<EventFd>)],
    ) -> Result<(Arc<AtomicBool>, JoinHandle<()>), FunctionError> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let fds = self.irq_fds.clone();
        let routes = routes.to_vec();
        let t = std::thread::Builder::new()
            .name(format!("devlend-irq-{}", self.grant.device.name))
            .spawn(move || {
                let watched: Vec<(&EventFd, &EventFd)> = routes
                    .iter()
                    .filter_map(|(v, to)| Some((fds.get(*v)?, &**to)))
                    .collect();
                while !stop2.load(Ordering::Acquire) {
                    let mut polled: Vec<PollFd<'_>> = watched
                        .iter()
                        .map(|(from, _)| PollFd::from_borrowed_fd(borrow_fd(from), PollFlags::IN))
                        .collect();
                    let slice = Timespec::try_from(EVENTFD_SLICE).unwrap_or(Timespec {
                        tv_sec: 0,
                        tv_nsec: 50_000_000,
                    });
                    match rustix::event::poll(&mut polled, Some(&slice)) {
                        Ok(_) | Err(rustix::io::Errno::INTR) => {}
                        Err(e) => {
                            tracing::warn!("interrupt forwarder: poll: {e}");
                            return;
                        }
                    }
                    drop(polled);
                    for (from, to) in &watched {
                        if from.read().is_ok() {
                            let _ = to.write(1);
                        }
                    }
                }
            })
            .map_err(|e| FunctionError::Io {
                op: "spawn interrupt forwarder",
                source: e,
            })?;
        Ok((stop, t))
    }
}

/// How long one blocking wait on an interrupt eventfd lasts before removal and the link are
/// looked at again.
const EVENTFD_SLICE: Duration = Duration::from_millis(50);

fn borrow_fd(fd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the descriptor is `fd`'s, open for as long as the borrow of `fd`.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

/// Whether `fd` becomes readable within `timeout` (`poll(2)`).
fn readable(fd: &EventFd, timeout: Duration) -> std::io::Result<bool> {
    let mut polled = [PollFd::from_borrowed_fd(borrow_fd(fd), PollFlags::IN)];
    let t =
        Timespec::try_from(timeout).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    match rustix::event::poll(&mut polled, Some(&t)) {
        Ok(n) => Ok(n > 0),
        Err(rustix::io::Errno::INTR) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Takes the eventfd the lender gave for each of `grant`'s vectors (doorbell bit `base + v`,
/// tagged with the lease), waiting up to `timeout` for them to arrive: the grant and the
/// descriptors travel on different paths.
fn take_interrupt_fds(
    ntb: &dyn devlend_fabric::Ntb,
    grant: &Grant,
    timeout: Duration,
) -> Result<Vec<EventFd>, LendingError> {
    let deadline = Instant::now().checked_add(timeout);
    let mut fds = Vec::with_capacity(usize::from(grant.device.vectors));
    for v in 0..u32::from(grant.device.vectors) {
        let bit = grant
            .doorbell_base
            .checked_add(v)
            .ok_or_else(|| LendingError::Protocol("doorbell bit overflows".into()))?;
        loop {
            if let Some(fd) = ntb.take_interrupt_fd(bit, grant.lease) {
                fds.push(fd);
                break;
            }
            if ntb.link_state() == LinkState::Down {
                return Err(LendingError::LinkDown);
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(LendingError::Protocol(format!(
                    "the lender's eventfd for vector {v} did not arrive in time"
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    Ok(fds)
}

impl PciFunction for BorrowedFunction {
    fn describe(&self) -> String {
        format!(
            "borrowed {} from {}",
            self.grant.device.name, self.grant.device.owner
        )
    }
}

impl Drop for BorrowedFunction {
    fn drop(&mut self) {
        self.mark_removed("dropped");
        if let Some(node) = self.node.upgrade() {
            self.release_all(&node);
        }
    }
}

/// The borrowing half of a node.
pub(crate) struct Borrower {
    held: Mutex<HashMap<String, Arc<BorrowedFunction>>>,
    /// Devices taken from this host without it giving them back (lender gone, link down,
    /// revoked), with why; until forgotten or borrowed again.
    lost: Mutex<HashMap<String, LostDevice>>,
}

/// A device this host held until it was taken away (not given back).
#[derive(Clone, Debug)]
pub struct LostDevice {
    /// The device as it was granted.
    pub device: DeviceDesc,
    /// Why it went.
    pub reason: String,
}

impl Borrower {
    pub(crate) fn new() -> Self {
        Self {
            held: Mutex::new(HashMap::new()),
            lost: Mutex::new(HashMap::new()),
        }
    }

    fn note_lost(&self, f: &BorrowedFunction, why: &str) {
        devlend_sync::lock(&self.lost).insert(
            f.grant.device.name.clone(),
            LostDevice {
                device: f.grant.device.clone(),
                reason: why.to_string(),
            },
        );
    }

    /// Devices lost (see [`LostDevice`]).
    pub(crate) fn lost(&self) -> Vec<LostDevice> {
        devlend_sync::lock(&self.lost).values().cloned().collect()
    }

    /// Forgets a lost device; returns it if it was lost.
    pub(crate) fn forget_lost(&self, name: &str) -> Option<LostDevice> {
        devlend_sync::lock(&self.lost).remove(name)
    }

    pub(crate) fn get(&self, name: &str) -> Option<Arc<BorrowedFunction>> {
        devlend_sync::lock(&self.held).get(name).cloned()
    }

    pub(crate) fn list(&self) -> Vec<DeviceDesc> {
        devlend_sync::lock(&self.held)
            .values()
            .map(|f| f.grant.device.clone())
            .collect()
    }

    pub(crate) fn leases(&self) -> Vec<u64> {
        devlend_sync::lock(&self.held)
            .values()
            .map(|f| f.grant.lease)
            .collect()
    }

    /// Surprise removal of everything held.
    pub(crate) fn remove_all(&self, why: &str) {
        let held: Vec<_> = devlend_sync::lock(&self.held).drain().collect();
        for (_, f) in held {
            f.mark_removed(why);
            self.note_lost(&f, why);
        }
    }

    /// The device held under `lease`.
    pub(crate) fn name_of(&self, lease: u64) -> Option<String> {
        devlend_sync::lock(&self.held)
            .iter()
            .find(|(_, f)| f.grant.lease == lease)
            .map(|(n, _)| n.clone())
    }

    pub(crate) fn revoked(&self, lease: u64, why: &str) {
        let mut held = devlend_sync::lock(&self.held);
        let name = held
            .iter()
            .find(|(_, f)| f.grant.lease == lease)
            .map(|(n, _)| n.clone());
        if let Some(f) = name.and_then(|n| held.remove(&n)) {
            let why = format!("the lender revoked it: {why}");
            f.mark_removed(&why);
            self.note_lost(&f, &why);
        }
    }
}

pub(crate) fn borrow(node: &Arc<Inner>, name: &str) -> Result<Arc<BorrowedFunction>, LendingError> {
    if let Some(f) = node.borrower.get(name) {
        if !f.is_removed() {
            return Ok(f);
        }
    }
    let req = Request::Borrow {
        device: name.to_string(),
        borrower: node.cfg.name.clone(),
        lease_ms: node.cfg.lease.as_millis() as u64,
    };
    let grant = match node.call(req)? {
        Response::Granted { grant } => grant,
        other => return Err(unexpected(other)),
    };
    let give_back = |node: &Inner| {
        let _ = node.call(Request::Return { lease: grant.lease });
    };
    if let Err(e) = check_grant(&grant) {
        give_back(node);
        return Err(e);
    }
    let mut bars: [Option<BarGrant>; 6] = Default::default();
    for b in &grant.bars {
        match bars.get_mut(usize::from(b.index)) {
            Some(slot) => *slot = Some(b.clone()),
            None => {
                give_back(node);
                return Err(LendingError::Protocol(format!(
                    "grant names BAR{}",
                    b.index
                )));
            }
        }
    }

    let setup = || -> Result<BorrowedFunction, LendingError> {
        let mut areas = Vec::new();
        for b in &grant.bars {
            crate::wait_peer_window(&*node.ntb, b.window, b.size, node.cfg.request_timeout)?;
            for a in &b.areas {
                crate::wait_peer_window(&*node.ntb, a.window, a.len, node.cfg.request_timeout)?;
                if let Some(mem) = node.ntb.peer_mw_direct(a.window)? {
                    let fits = a.wake_word.is_none_or(|w| w.saturating_add(4) <= mem.len());
                    if fits {
                        let area = MemoryArea {
                            offset: a.offset,
                            mem,
                            wake_word: a.wake_word,
                        };
                        areas.push(DirectArea { bar: b.index, area });
                    }
                }
            }
        }
        let irq_fds = if crate::lender::direct_interrupts(
            &grant.device.kind,
            grant.device.vectors,
            &*node.ntb,
        ) {
            take_interrupt_fds(&*node.ntb, &grant, node.cfg.request_timeout)?
        } else {
            Vec::new()
        };
        let bytes = node.cfg.dma_pool_bytes;
        let mem = Arc::new(SharedMemory::new("devlend-dma", bytes)?);
        let base = POOL_IOVA;
        let f = BorrowedFunction {
            node: Arc::downgrade(node),
            bars,
            areas: std::sync::RwLock::new(areas),
            pool: DmaPool::new(mem.clone(), base),
            dma: Mutex::new(DmaState::default()),
            removed: AtomicBool::new(false),
            reason: Mutex::new(String::new()),
            redirect: Mutex::new(Redirect::default()),
            irq_fds: irq_fds.into(),
            grant: grant.clone(),
        };
        f.map_memory(node, base, &MemSpan::whole(mem), true)?;
        Ok(f)
    };
    let f = match setup() {
        Ok(f) => Arc::new(f),
        Err(e) => {
            give_back(node);
            return Err(e);
        }
    };
    // Interrupt bits left over from an earlier holder must not fire into the new driver.
    let _ = node.ntb.db_clear(crate::lender_doorbell_mask(&f.grant));
    node.borrower.forget_lost(name);
    devlend_sync::lock(&node.borrower.held).insert(name.to_string(), f.clone());
    tracing::info!(
        "borrowed {name} (lease {}, {} BAR area(s) reached by direct loads and stores, {} \
         vector(s) signalled by the device on eventfds)",
        f.grant.lease,
        devlend_sync::read(&f.areas).len(),
        f.irq_fds.len()
    );
    Ok(f)
}

/// Range checks of a grant's values before any of them is used: the lender is a peer, and a
/// hostile one must get an error, not a wrapped shift or a huge allocation.
pub(crate) fn check_grant(grant: &Grant) -> Result<(), LendingError> {
    grant
        .validate()
        .map_err(|why| LendingError::Protocol(format!("grant refused: {why}")))
}

pub(crate) fn give_back(node: &Arc<Inner>, name: &str) -> Result<(), LendingError> {
    let f = devlend_sync::lock(&node.borrower.held)
        .remove(name)
        .ok_or_else(|| LendingError::NotBorrowed(name.to_string()))?;
    f.mark_removed("returned");
    f.release_all(node);
    match node.call(Request::Return {
        lease: f.grant.lease,
    })? {
        Response::Ok => Ok(()),
        other => Err(unexpected(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::AreaGrant;

    fn grant(doorbell_base: u32, vectors: u16) -> Grant {
        Grant {
            lease: 1,
            device: DeviceDesc {
                name: "d".into(),
                kind: "nvme".into(),
                owner: "l".into(),
                borrower: None,
                vectors,
                bars: Vec::new(),
                detail: String::new(),
                size_bytes: None,
            },
            bars: vec![BarGrant {
                index: 0,
                window: 1,
                size: 0x4000,
                areas: vec![AreaGrant {
                    offset: 0x1000,
                    len: 0x1000,
                    window: 2,
                    wake_word: Some(0xffc),
                }],
            }],
            doorbell_base,
            lease_ms: 3000,
        }
    }

    #[test]
    fn grants_with_values_out_of_range_are_refused() {
        check_grant(&grant(0, 17)).unwrap();
        check_grant(&grant(46, 17)).unwrap();
        // The sum must not wrap: 0xfffffff0 + 0x20 is 0x10 in 32 bits.
        for (base, vectors) in [(0xffff_fff0, 0x20), (47, 17), (0, 64), (u32::MAX, 1)] {
            assert!(
                matches!(
                    check_grant(&grant(base, vectors)),
                    Err(LendingError::Protocol(_))
                ),
                "doorbell_base {base:#x} vectors {vectors}"
            );
        }
        let mut g = grant(0, 1);
        g.bars[0].index = 6;
        assert!(check_grant(&g).is_err());
        let mut g = grant(0, 1);
        g.bars[0].size = 0x3000;
        assert!(check_grant(&g).is_err());
        let mut g = grant(0, 1);
        g.bars[0].areas[0].offset = u64::MAX - 0xfff;
        assert!(check_grant(&g).is_err());
        let mut g = grant(0, 1);
        g.bars[0].areas[0].wake_word = Some(u64::MAX - 1);
        assert!(check_grant(&g).is_err());
    }
}
