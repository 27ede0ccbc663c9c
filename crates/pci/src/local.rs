//! The local binding: a device model in this process, driven through [`PciFunction`].
//!
//! This is the baseline every lending measurement is compared with: config and BAR accesses
//! are plain calls into the model, DMA memory is a memfd-backed [`DmaPool`] that the device
//! reaches through an [`Iommu`] mapping exactly that pool (plus whatever [`DmaRemap`] adds),
//! and each MSI-X vector is an eventfd.
//!
//! Threads: none of its own. [`Interrupts::wait_interrupt`] blocks the caller in `poll(2)`.

use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use devlend_memory::{MemSpan, SharedMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::access_is_valid;
use crate::dma_pool::{DmaPool, DMA_PAGE_SIZE};
use crate::iommu::{DmaTarget, Iommu};
use crate::{
    AccessSize, BarAccess, BarIndex, BarSpec, BusAddr, ConfigAccess, DmaAlloc, DmaBuffer, DmaPort,
    DmaRemap, FunctionError, InterruptSink, Interrupts, PciDevice, PciFunction,
};

/// Bus address of the local DMA pool: above 4 GiB, so a driver that truncates DMA addresses
/// to 32 bits fails loudly. [`DmaRemap::dma_map`] ranges must not overlap the pool (a VMM's
/// guest RAM above 64 GiB would).
pub const LOCAL_DMA_BUS_BASE: BusAddr = BusAddr(0x10_0000_0000);

/// Why a [`LocalFunction`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BindError<E> {
    /// Setting up DMA memory or interrupts failed.
    #[error("setting up the local binding")]
    Setup(#[source] FunctionError),
    /// The device model's constructor failed.
    #[error("building the device model")]
    Device(#[source] E),
}

struct Vector {
    own: Arc<EventFd>,
    redirect: Option<Arc<EventFd>>,
    /// Set by `signal`, taken by `wait`: a waiter that polls sees it without a syscall.
    pending: Arc<std::sync::atomic::AtomicBool>,
    /// Waiters asleep on `own`: `signal` writes the eventfd only when there are some.
    sleepers: Arc<std::sync::atomic::AtomicU32>,
}

/// An [`InterruptSink`] that turns each vector into an eventfd write: the function's own
/// eventfd, or one the caller supplied (a VMM's irqfd).
pub struct EventFdInterrupts {
    vectors: RwLock<Vec<Vector>>,
    /// The device signals the own eventfds itself (a real device's hardware, see
    /// [`PciDevice::set_interrupt_fds`]): waiters read them instead of the pending flags.
    direct: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for EventFdInterrupts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventFdInterrupts")
            .field("vectors", &self.read().len())
            .finish()
    }
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> FunctionError {
    move |source| FunctionError::Io { op, source }
}

impl EventFdInterrupts {
    /// A sink with `vectors` eventfds (non-blocking).
    pub fn new(vectors: u16) -> Result<Self, FunctionError> {
        let sink = Self {
            vectors: RwLock::new(Vec::new()),
            direct: std::sync::atomic::AtomicBool::new(false),
        };
        sink.resize(vectors)?;
        Ok(sink)
    }

    fn read(&self) -> RwLockReadGuard<'_, Vec<Vector>> {
        // Whole-element updates only: never inconsistent after a panic.
        devlend_sync::read(&self.vectors)
    }

    /// Grows (or shrinks) to `vectors` eventfds; existing ones are kept.
    pub fn resize(&self, vectors: u16) -> Result<(), FunctionError> {
        let mut v = devlend_sync::write(&self.vectors);
        v.truncate(usize::from(vectors));
        while v.len() < usize::from(vectors) {
            let own = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
            v.push(Vector {
                own: Arc::new(own),
                redirect: None,
                pending: Arc::default(),
                sleepers: Arc::default(),
            });
        }
        Ok(())
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.read().len() as u16
    }

    fn no_such(&self, vector: u16) -> FunctionError {
        FunctionError::NoSuchVector {
            vector,
            count: self.vectors(),
        }
    }

    /// The function's own eventfd for `vector`. It is written only while a [`Self::wait`]er
    /// sleeps (a polling waiter takes the event from a flag); to receive every interrupt on an
    /// eventfd, [`Self::redirect`] the vector to it.
    pub fn eventfd(&self, vector: u16) -> Result<Arc<EventFd>, FunctionError> {
        self.read()
            .get(usize::from(vector))
            .map(|v| v.own.clone())
            .ok_or_else(|| self.no_such(vector))
    }

    /// Delivers `vector` to `fd` instead; `None` restores the function's own eventfd.
    pub fn redirect(&self, vector: u16, fd: Option<Arc<EventFd>>) -> Result<(), FunctionError> {
        let mut v = devlend_sync::write(&self.vectors);
        match v.get_mut(usize::from(vector)) {
            Some(slot) => {
                slot.redirect = fd;
                Ok(())
            }
            None => {
                let count = v.len() as u16;
                Err(FunctionError::NoSuchVector { vector, count })
            }
        }
    }

    /// Every vector's own eventfd, in vector order.
    fn own_fds(&self) -> Vec<Arc<EventFd>> {
        self.read().iter().map(|v| v.own.clone()).collect()
    }

    /// Whether the device writes the own eventfds itself.
    fn is_direct(&self) -> bool {
        self.direct.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until `vector` fires (consuming it) or `timeout` passes: polls for up to
    /// [`crate::INTERRUPT_SPIN`], then sleeps on the vector's eventfd.
    pub fn wait(&self, vector: u16, timeout: Duration) -> Result<bool, FunctionError> {
        use std::sync::atomic::Ordering::SeqCst;
        let direct = self.is_direct();
        let (fd, pending, sleepers) = {
            let v = self.read();
            let slot = v
                .get(usize::from(vector))
                .ok_or_else(|| self.no_such(vector))?;
            (
                slot.own.clone(),
                slot.pending.clone(),
                slot.sleepers.clone(),
            )
        };
        // A direct vector's event is the eventfd's count (the device wrote it); a flag set by
        // `signal` (the sink path, before a switch) counts too.
        let take = || -> bool {
            if direct {
                if let Ok(n) = fd.read() {
                    return n > 0 || pending.swap(false, SeqCst);
                }
            }
            pending.swap(false, SeqCst)
        };
        let spin = crate::INTERRUPT_SPIN.min(timeout);
        let ready = || direct || pending.load(SeqCst);
        if crate::spin_until(spin, || ready() && take()) {
            return Ok(true);
        }
        let deadline = Instant::now().checked_add(timeout);
        loop {
            // Announce the sleep, then re-check: a signal either sees a sleeper (and writes the
            // eventfd) or is seen here.
            sleepers.fetch_add(1, SeqCst);
            if pending.swap(false, SeqCst) {
                sleepers.fetch_sub(1, SeqCst);
                return Ok(true);
            }
            let remaining = match deadline {
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::from_secs(3600),
            };
            if remaining.is_zero() {
                sleepers.fetch_sub(1, SeqCst);
                return Ok(false);
            }
            // Round up so a short timeout still sleeps rather than spinning.
            let ms = remaining.as_micros().div_ceil(1000);
            let ms = libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX);
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is a valid, exclusively borrowed pollfd array of length 1, alive for
            // the call; the fd is kept open by `fd`.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            let err = (n < 0).then(std::io::Error::last_os_error);
            sleepers.fetch_sub(1, SeqCst);
            if let Some(err) = err {
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(io("poll")(err));
                }
            }
            // Drain the wake-up: for a direct vector it is the event; otherwise the event is
            // the pending flag.
            match fd.read() {
                Ok(n) if direct && n > 0 => {
                    pending.store(false, SeqCst);
                    return Ok(true);
                }
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(io("eventfd read")(e)),
            }
            if pending.swap(false, SeqCst) {
                return Ok(true);
            }
        }
    }
}

impl InterruptSink for EventFdInterrupts {
    fn signal(&self, vector: u16) {
        let vectors = self.read();
        let Some(slot) = vectors.get(usize::from(vector)) else {
            tracing::warn!(vector, "interrupt for a vector without an eventfd dropped");
            return;
        };
        let fd = match &slot.redirect {
            Some(fd) => fd,
            None => {
                use std::sync::atomic::Ordering::SeqCst;
                slot.pending.store(true, SeqCst);
                if slot.sleepers.load(SeqCst) == 0 {
                    return; // a polling waiter takes it without a syscall
                }
                &slot.own
            }
        };
        // A full counter (EAGAIN) means the event is already pending: nothing is lost.
        if let Err(e) = fd.write(1) {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                tracing::warn!(vector, error = %e, "eventfd write failed");
            }
        }
    }
}

/// A device model bound in-process.
pub struct LocalFunction {
    /// Memory-backed BAR areas (doorbell pages, a real device's mapped registers): written by
    /// direct stores, as a borrower does. Declared (so dropped) before the device: a real
    /// device's areas hold its VFIO descriptor, which must be closed before the device gives
    /// the function back to its driver.
    areas: Vec<(BarIndex, crate::MemoryArea)>,
    device: Arc<dyn PciDevice>,
    pool: DmaPool,
    iommu: Arc<Iommu>,
    interrupts: Arc<EventFdInterrupts>,
    bars: [Option<BarSpec>; 6],
}

impl std::fmt::Debug for LocalFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalFunction")
            .field("device", &self.device.kind())
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

impl LocalFunction {
    /// Creates `dma_bytes` (rounded up to pages) of DMA memory at [`LOCAL_DMA_BUS_BASE`], an
    /// IOMMU mapping exactly that, and per-vector eventfds, then builds the device model with
    /// its DMA port and interrupt sink.
    pub fn new<E>(
        dma_bytes: usize,
        build: impl FnOnce(Arc<dyn DmaPort>, Arc<dyn InterruptSink>) -> Result<Arc<dyn PciDevice>, E>,
    ) -> Result<Self, BindError<E>> {
        let setup = |e: FunctionError| BindError::Setup(e);
        let len = dma_bytes
            .max(1)
            .checked_next_multiple_of(DMA_PAGE_SIZE)
            .ok_or(BindError::Setup(FunctionError::OutOfDmaMemory {
                requested: dma_bytes,
                available: 0,
            }))?;
        let mem = SharedMemory::new("devlend-local-dma", len).map_err(|e| setup(e.into()))?;
        let pool = DmaPool::new(Arc::new(mem), LOCAL_DMA_BUS_BASE);
        let iommu = Arc::new(Iommu::new());
        if let Some(span) = pool.span() {
            iommu
                .map(pool.bus_base(), DmaTarget::Direct(span), true)
                .map_err(|e| setup(e.into()))?;
        }
        let interrupts = Arc::new(EventFdInterrupts::new(0).map_err(setup)?);
        let device = build(iommu.clone(), interrupts.clone()).map_err(BindError::Device)?;
        // A device whose DMA bypasses the port (real hardware) is told the pool's mapping too.
        if let Some(span) = pool.span() {
            device
                .dma_map(pool.bus_base(), &span, true)
                .map_err(|e| setup(FunctionError::Transport(e.to_string())))?;
        }
        interrupts.resize(device.msix_vectors()).map_err(setup)?;
        // A real device signals the vectors' eventfds itself, as it does a borrower's: no
        // thread of this process between its interrupt and the waiter.
        if device.set_interrupt_fds(Some(&interrupts.own_fds())) {
            interrupts
                .direct
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        let bars = BarIndex::ALL.map(|b| device.bar_spec(b));
        let areas = BarIndex::ALL
            .iter()
            .flat_map(|b| device.bar_memory(*b).into_iter().map(move |a| (*b, a)))
            .collect();
        Ok(Self {
            device,
            pool,
            iommu,
            interrupts,
            bars,
            areas,
        })
    }

    /// The device model (for tests).
    pub fn device(&self) -> &Arc<dyn PciDevice> {
        &self.device
    }

    /// The DMA pool [`DmaAlloc`] allocates from.
    pub fn pool(&self) -> &DmaPool {
        &self.pool
    }

    /// The device's IOMMU.
    pub fn iommu(&self) -> &Arc<Iommu> {
        &self.iommu
    }

    /// The per-vector eventfds.
    pub fn interrupts(&self) -> &Arc<EventFdInterrupts> {
        &self.interrupts
    }

    fn check_bar(&self, bar: BarIndex, offset: u64, len: usize) -> Result<(), FunctionError> {
        let spec = self
            .bars
            .get(usize::from(bar.get()))
            .copied()
            .flatten()
            .ok_or(FunctionError::NoSuchBar(bar.get()))?;
        let bad = FunctionError::BadBarAccess {
            bar: bar.get(),
            offset,
            len,
        };
        let inside = len > 0
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= spec.size);
        let register_sized = matches!(len, 1 | 2 | 4 | 8);
        if !inside || (register_sized && !offset.is_multiple_of(len as u64)) {
            return Err(bad);
        }
        Ok(())
    }
}

impl ConfigAccess for LocalFunction {
    fn config_read(&self, offset: u16, size: AccessSize) -> Result<u32, FunctionError> {
        if !access_is_valid(offset, size) {
            return Err(FunctionError::BadConfigAccess {
                offset,
                size: size.len(),
            });
        }
        Ok(self.device.config_read(offset, size))
    }

    fn config_write(&self, offset: u16, size: AccessSize, value: u32) -> Result<(), FunctionError> {
        if !access_is_valid(offset, size) {
            return Err(FunctionError::BadConfigAccess {
                offset,
                size: size.len(),
            });
        }
        self.device.config_write(offset, size, value);
        Ok(())
    }
}

impl BarAccess for LocalFunction {
    fn bar_mappings(&self, bar: BarIndex) -> Vec<crate::MemoryArea> {
        self.areas
            .iter()
            .filter(|(b, _)| *b == bar)
            .map(|(_, a)| a.clone())
            .collect()
    }

    /// Any non-empty access inside the BAR; 1-, 2-, 4- and 8-byte accesses must be naturally
    /// aligned.
    fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), FunctionError> {
        self.check_bar(bar, offset, data.len())?;
        self.device.bar_read(bar, offset, data);
        Ok(())
    }

    fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) -> Result<(), FunctionError> {
        self.check_bar(bar, offset, data.len())?;
        // Doorbell-style memory the device polls: a direct store and a wake-up only when the
        // device sleeps, exactly as a borrowed function reaches it through its window.
        for (b, area) in &self.areas {
            if *b == bar && offset >= area.offset {
                let at = offset - area.offset;
                if at.saturating_add(data.len() as u64) <= area.mem.len() {
                    return area.write_and_wake(at, data).map_err(FunctionError::from);
                }
            }
        }
        self.device.bar_write(bar, offset, data);
        Ok(())
    }
}

impl DmaAlloc for LocalFunction {
    fn dma_alloc(&self, len: usize) -> Result<DmaBuffer, FunctionError> {
        self.pool.alloc(len)
    }
}

impl DmaRemap for LocalFunction {
    fn dma_map(&self, iova: BusAddr, mem: MemSpan, writable: bool) -> Result<(), FunctionError> {
        self.iommu.dma_map(iova, mem.clone(), writable)?;
        if let Err(e) = self.device.dma_map(iova, &mem, writable) {
            let _ = self.iommu.dma_unmap(iova, mem.len());
            return Err(FunctionError::Transport(e.to_string()));
        }
        Ok(())
    }

    fn dma_unmap(&self, iova: BusAddr, len: u64) -> Result<(), FunctionError> {
        let device = self.device.dma_unmap(iova, len);
        self.iommu.dma_unmap(iova, len)?;
        device.map_err(|e| FunctionError::Transport(e.to_string()))
    }
}

impl Interrupts for LocalFunction {
    fn interrupt_vectors(&self) -> u16 {
        self.interrupts.vectors()
    }

    /// Waits on the vector's own eventfd: while redirected with
    /// [`Interrupts::set_interrupt_eventfd`] it never fires here (returns `Ok(false)` after
    /// `timeout`).
    fn wait_interrupt(&self, vector: u16, timeout: Duration) -> Result<bool, FunctionError> {
        self.interrupts.wait(vector, timeout)
    }

    /// A device that signals its eventfds directly goes back to the sink path first (a
    /// redirected vector is written by [`EventFdInterrupts`]).
    fn set_interrupt_eventfd(
        &self,
        vector: u16,
        fd: Option<Arc<EventFd>>,
    ) -> Result<(), FunctionError> {
        if self.interrupts.is_direct() {
            self.device.set_interrupt_fds(None);
            self.interrupts
                .direct
                .store(false, std::sync::atomic::Ordering::SeqCst);
        }
        self.interrupts.redirect(vector, fd)
    }
}

impl PciFunction for LocalFunction {
    fn describe(&self) -> String {
        format!("local {}", self.device.kind())
    }
}

#[cfg(test)]
#[path = "tests/local.rs"]
mod tests;
