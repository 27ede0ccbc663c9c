//! MSI-X: the kernel signals an eventfd per vector; a thread turns each into a message through
//! the emulated table, which honours masks.
//!
//! Direct delivery: whoever holds the function may give one eventfd per vector
//! ([`DirectFds`], e.g. a borrower's, passed over the fabric). While a vector may be delivered
//! (MSI-X enabled, function and vector unmasked) VFIO signals that eventfd itself, with no
//! thread here in between, as a hardware NTB carries a device's MSI-X write straight to the
//! borrower's interrupt controller. While it may not, the vector points back at this side's
//! own eventfd, so a message latches the pending bit in the table as before; a message the
//! table lets through (a pending one at unmask, or one racing a retarget) is signalled on the
//! holder's eventfd by the table's sink ([`DirectFds`] is that sink). [`MsixIrqs::resync`]
//! retargets after every change of masks, enable or holder.
//!
//! Threads: one per function while MSI-X is enabled (`devlend-vfio-irq`), owned by
//! [`MsixIrqs`]: started when the driver sets MSI-X Enable, stopped (and joined) when it clears
//! it, at reset, or when the function is dropped. It holds the table and the eventfds only,
//! never the function.

use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;

use devlend_pci::{InterruptSink, MsixTable};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::poll::PollContext;

use crate::hw::VfioHw;
use crate::VfioError;

/// The poll token of the stop eventfd (vectors are 0..2048).
const STOP: u32 = u32::MAX;

/// The holder's eventfds, one per vector, and the table's sink: a message the table lets
/// through is signalled on the vector's eventfd when the holder gave one, else passed to
/// `inner`.
pub(crate) struct DirectFds {
    fds: RwLock<Option<Vec<Arc<EventFd>>>>,
    inner: Arc<dyn InterruptSink>,
}

impl DirectFds {
    pub(crate) fn new(inner: Arc<dyn InterruptSink>) -> Self {
        Self {
            fds: RwLock::new(None),
            inner,
        }
    }

    fn set(&self, fds: Option<Vec<Arc<EventFd>>>) {
        *devlend_sync::write(&self.fds) = fds;
    }

    fn get(&self, vector: usize) -> Option<Arc<EventFd>> {
        devlend_sync::read(&self.fds).as_ref()?.get(vector).cloned()
    }
}

impl InterruptSink for DirectFds {
    fn signal(&self, vector: u16) {
        match self.get(usize::from(vector)) {
            Some(fd) => {
                if let Err(e) = fd.write(1) {
                    tracing::warn!("signalling vector {vector}'s eventfd: {e}");
                }
            }
            None => self.inner.signal(vector),
        }
    }
}

struct Running {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    /// This side's eventfds, one per routed vector (shared with the thread).
    own: Arc<Vec<EventFd>>,
    /// Which vectors VFIO signals on the holder's eventfd instead of `own`.
    direct: Vec<bool>,
}

/// MSI-X delivery for one function: the emulated table, and the eventfds VFIO signals.
pub(crate) struct MsixIrqs {
    table: Arc<MsixTable>,
    holder: Arc<DirectFds>,
    running: Option<Running>,
}

impl MsixIrqs {
    /// `holder` must be the sink `table` delivers to.
    pub(crate) fn new(table: Arc<MsixTable>, holder: Arc<DirectFds>) -> Self {
        Self {
            table,
            holder,
            running: None,
        }
    }

    /// Vectors currently routed through VFIO (0 when MSI-X is off).
    pub(crate) fn routed(&self) -> usize {
        self.running.as_ref().map_or(0, |r| r.own.len())
    }

    /// Vectors VFIO currently signals on the holder's eventfds.
    pub(crate) fn direct(&self) -> Vec<u16> {
        self.running.as_ref().map_or_else(Vec::new, |r| {
            (0u16..)
                .zip(&r.direct)
                .filter_map(|(v, d)| d.then_some(v))
                .collect()
        })
    }

    /// The holder's eventfds (`None`: every vector back to this side's own). Vectors are
    /// retargeted at once.
    pub(crate) fn set_holder_fds(&mut self, hw: &dyn VfioHw, fds: Option<Vec<Arc<EventFd>>>) {
        self.holder.set(fds);
        self.resync(hw);
    }

    /// Points each routed vector at the holder's eventfd when it may be delivered and the
    /// holder gave one, at this side's own otherwise. A vector VFIO refuses to retarget keeps
    /// its eventfd (logged): messages then take the longer path, or the holder's eventfd
    /// keeps receiving them until MSI-X is disabled.
    pub(crate) fn resync(&mut self, hw: &dyn VfioHw) {
        let Some(r) = self.running.as_mut() else {
            return;
        };
        let (enabled, function_mask) = self.table.control();
        for (i, (own, direct)) in r.own.iter().zip(r.direct.iter_mut()).enumerate() {
            let Ok(v) = u16::try_from(i) else {
                break;
            };
            let deliverable = enabled && !function_mask && self.table.is_masked(v) == Some(false);
            let target = self.holder.get(i).filter(|_| deliverable);
            if target.is_some() == *direct {
                continue;
            }
            let fd = target.as_deref().unwrap_or(own);
            match hw.set_msix_vector(u32::from(v), fd) {
                Ok(()) => *direct = target.is_some(),
                Err(e) => tracing::warn!("retargeting MSI-X vector {v}: {e}"),
            }
        }
    }

    /// The driver wrote MSI-X Enable / Function Mask: routes the vectors through VFIO when
    /// MSI-X turns on, stops when it turns off; the table applies the masks either way.
    pub(crate) fn set_control(
        &mut self,
        hw: &dyn VfioHw,
        enable: bool,
        function_mask: bool,
    ) -> Result<(), VfioError> {
        if enable && self.running.is_none() {
            self.start(hw)?;
        } else if !enable && self.running.is_some() {
            self.stop(hw);
        }
        self.table.set_control(enable, function_mask);
        self.resync(hw);
        Ok(())
    }

    fn start(&mut self, hw: &dyn VfioHw) -> Result<(), VfioError> {
        let n = usize::from(self.table.vectors()).min(hw.msix_count() as usize);
        if n == 0 {
            return Err(VfioError::Config("VFIO offers no MSI-X vectors".into()));
        }
        let fds: Vec<EventFd> = (0..n)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<_, _>>()
            .map_err(VfioError::io("eventfd"))?;
        let stop = EventFd::new(EFD_NONBLOCK).map_err(VfioError::io("eventfd"))?;
        let poll: PollContext<u32> = PollContext::new().map_err(io_from_sys("epoll"))?;
        poll.add(&stop, STOP).map_err(io_from_sys("epoll add"))?;
        for (i, fd) in fds.iter().enumerate() {
            poll.add(fd, i as u32).map_err(io_from_sys("epoll add"))?;
        }
        let refs: Vec<&EventFd> = fds.iter().collect();
        hw.set_msix(&refs)?;
        let own = Arc::new(fds);
        let table = self.table.clone();
        let thread_fds = own.clone();
        let thread = std::thread::Builder::new()
            .name("devlend-vfio-irq".into())
            .spawn(move || deliver(poll, &thread_fds, table))
            .map_err(VfioError::io("spawning the interrupt thread"));
        let thread = match thread {
            Ok(t) => t,
            Err(e) => {
                let _ = hw.set_msix(&[]);
                return Err(e);
            }
        };
        self.running = Some(Running {
            stop,
            thread: Some(thread),
            direct: vec![false; own.len()],
            own,
        });
        Ok(())
    }

    /// Turns MSI-X off in the device and stops the thread.
    pub(crate) fn stop(&mut self, hw: &dyn VfioHw) {
        let Some(mut r) = self.running.take() else {
            return;
        };
        if let Err(e) = hw.set_msix(&[]) {
            tracing::warn!("disabling MSI-X: {e}");
        }
        halt(&mut r);
    }

    /// Back to power-on: MSI-X off (without telling the kernel: a reset did), table reset. The
    /// holder's eventfds stay: they are used again when the driver enables MSI-X.
    pub(crate) fn reset(&mut self) {
        if let Some(mut r) = self.running.take() {
            halt(&mut r);
        }
        self.table.reset();
    }
}

impl Drop for MsixIrqs {
    fn drop(&mut self) {
        if let Some(mut r) = self.running.take() {
            halt(&mut r);
        }
    }
}

fn halt(r: &mut Running) {
    if let Err(e) = r.stop.write(1) {
        tracing::warn!("stopping the interrupt thread: {e}");
        return; // it cannot be woken: leave it rather than hang here
    }
    if let Some(t) = r.thread.take() {
        let _ = t.join();
    }
}

fn io_from_sys(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> VfioError {
    move |e| VfioError::Io {
        op,
        source: std::io::Error::from_raw_os_error(e.errno()),
    }
}

/// The interrupt thread: each fired eventfd is one message through the table.
fn deliver(poll: PollContext<u32>, fds: &[EventFd], table: Arc<MsixTable>) {
    loop {
        let events = match poll.wait() {
            Ok(ev) => ev,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => {
                tracing::warn!("interrupt thread: epoll: {e}");
                return;
            }
        };
        for ev in events.iter_readable() {
            let token = ev.token();
            if token == STOP {
                return;
            }
            let Some(fd) = fds.get(token as usize) else {
                continue;
            };
            match fd.read() {
                Ok(_) => {
                    // One message per wake-up: an eventfd counts, the device coalesces.
                    table.trigger(token as u16);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::warn!("interrupt thread: eventfd: {e}"),
            }
        }
    }
}
