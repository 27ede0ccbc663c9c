//! MSI-X: the kernel signals an eventfd per vector; a thread turns each into a message through
//! the emulated table, which honours masks.
//!
//! Threads: one per function while MSI-X is enabled (`devlend-vfio-irq`), owned by
//! [`MsixIrqs`]: started when the driver sets MSI-X Enable, stopped (and joined) when it clears
//! it, at reset, or when the function is dropped. It holds the table and the eventfds only,
//! never the function.

use std::sync::Arc;
use std::thread::JoinHandle;

use devlend_pci::MsixTable;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::poll::PollContext;

use crate::hw::VfioHw;
use crate::VfioError;

/// The poll token of the stop eventfd (vectors are 0..2048).
const STOP: u32 = u32::MAX;

struct Running {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
    vectors: usize,
}

/// MSI-X delivery for one function: the emulated table, and the eventfds VFIO signals.
pub(crate) struct MsixIrqs {
    table: Arc<MsixTable>,
    running: Option<Running>,
}

impl MsixIrqs {
    pub(crate) fn new(table: Arc<MsixTable>) -> Self {
        Self {
            table,
            running: None,
        }
    }

    /// Vectors currently routed through VFIO (0 when MSI-X is off).
    pub(crate) fn routed(&self) -> usize {
        self.running.as_ref().map_or(0, |r| r.vectors)
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
        let table = self.table.clone();
        let thread = std::thread::Builder::new()
            .name("devlend-vfio-irq".into())
            .spawn(move || deliver(poll, fds, table))
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
            vectors: n,
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

    /// Back to power-on: MSI-X off (without telling the kernel: a reset did), table reset.
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
fn deliver(poll: PollContext<u32>, fds: Vec<EventFd>, table: Arc<MsixTable>) {
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
