//! The server: one client at a time, each message handled in order on the serving thread.
//!
//! Threads: `serve` runs on the caller's thread and owns the listening socket, the connection
//! and the per-client [`Session`]. The function's own threads (a device model's worker) may
//! write interrupt eventfds at any time; the server never waits for them. No locks are held
//! across messages; the only shared state is the [`Stats`] counters (atomics).

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use devlend_memory::{BusAddr, MemSpan, SharedMemory};
use devlend_pci::config::{cap, msix as msix_cap};
use devlend_pci::msix as table;
use devlend_pci::{AccessSize, BarIndex, FunctionError, PciFunction};
use vmm_sys_util::eventfd::EventFd;

use crate::conn::{send_all, Framing, MessageReader, RawMessage};
use crate::layout::{probe, DeviceLayout};
use crate::msi::MsiCap;
use crate::wire::{
    self, parse_request, Command, DmaMap, DmaUnmap, IrqAction, IrqData, Request, SetIrqs, Writer,
    MAX_DMA_MAPS, MAX_MESSAGE,
};
use crate::{RequestError, ServerError, WireError};

/// Region indexes (`linux/vfio.h` `VFIO_PCI_*_REGION_INDEX`, from `vfio-bindings`).
pub mod region {
    use vfio_bindings::bindings::vfio as v;
    /// BAR0; BARn is n.
    pub const BAR0: u32 = v::VFIO_PCI_BAR0_REGION_INDEX;
    /// Expansion ROM (not served).
    pub const ROM: u32 = v::VFIO_PCI_ROM_REGION_INDEX;
    /// Config space.
    pub const CONFIG: u32 = v::VFIO_PCI_CONFIG_REGION_INDEX;
    /// VGA (not served).
    pub const VGA: u32 = v::VFIO_PCI_VGA_REGION_INDEX;
    /// Regions reported.
    pub const COUNT: u32 = v::VFIO_PCI_NUM_REGIONS;
}

/// IRQ indexes (`VFIO_PCI_*_IRQ_INDEX`, from `vfio-bindings`).
pub mod irq {
    use vfio_bindings::bindings::vfio as v;
    /// Legacy INTx.
    pub const INTX: u32 = v::VFIO_PCI_INTX_IRQ_INDEX;
    /// MSI.
    pub const MSI: u32 = v::VFIO_PCI_MSI_IRQ_INDEX;
    /// MSI-X.
    pub const MSIX: u32 = v::VFIO_PCI_MSIX_IRQ_INDEX;
    /// Error notification.
    pub const ERR: u32 = v::VFIO_PCI_ERR_IRQ_INDEX;
    /// Device request.
    pub const REQ: u32 = v::VFIO_PCI_REQ_IRQ_INDEX;
    /// IRQ indexes reported.
    pub const COUNT: u32 = v::VFIO_PCI_NUM_IRQS;
}

use vfio_bindings::bindings::vfio::{
    VFIO_DEVICE_FLAGS_PCI as DEVICE_FLAG_PCI, VFIO_DEVICE_FLAGS_RESET as DEVICE_FLAG_RESET,
    VFIO_IRQ_INFO_EVENTFD as IRQ_INFO_EVENTFD, VFIO_REGION_INFO_FLAG_READ as REGION_FLAG_READ,
    VFIO_REGION_INFO_FLAG_WRITE as REGION_FLAG_WRITE,
};
const MSIX_VECTOR_MASKED: u32 = table::VECTOR_CONTROL_MASK;

/// Message counters, readable while the server runs (e.g. to count messages per guest I/O).
#[derive(Debug, Default)]
pub struct Stats {
    by_command: [AtomicU64; 16],
    posted: AtomicU64,
    errors: AtomicU64,
    clients: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    /// Messages per command number (index 0: unknown commands).
    pub by_command: [u64; 16],
    /// Messages that asked for no reply (posted writes).
    pub posted: u64,
    /// Error replies sent (and posted messages that failed).
    pub errors: u64,
    /// Clients served so far (connections accepted).
    pub clients: u64,
}

impl StatsSnapshot {
    /// Messages of one command.
    pub fn count(&self, command: Command) -> u64 {
        self.by_command.get(command as usize).copied().unwrap_or(0)
    }

    /// All messages.
    pub fn total(&self) -> u64 {
        self.by_command.iter().sum()
    }

    /// One line for logs: the non-zero counters by name.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (i, n) in self.by_command.iter().enumerate() {
            if *n > 0 {
                parts.push(format!("{}={n}", wire::command_name(i as u16)));
            }
        }
        format!(
            "messages={} posted={} errors={} [{}]",
            self.total(),
            self.posted,
            self.errors,
            parts.join(" ")
        )
    }
}

impl Stats {
    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        let mut s = StatsSnapshot::default();
        for (d, a) in s.by_command.iter_mut().zip(self.by_command.iter()) {
            *d = a.load(Ordering::Relaxed);
        }
        s.posted = self.posted.load(Ordering::Relaxed);
        s.errors = self.errors.load(Ordering::Relaxed);
        s.clients = self.clients.load(Ordering::Relaxed);
        s
    }
}

/// A vfio-user server for one PCIe function.
pub struct Server {
    function: Arc<dyn PciFunction>,
    layout: DeviceLayout,
    stats: Arc<Stats>,
    /// Present MSI-X as one MSI vector (see `msi.rs`: what makes hot-unplug from QEMU safe).
    msi_only: bool,
}

/// How one client's connection ended.
#[derive(Debug)]
pub enum Disconnect {
    /// The client closed the socket between messages.
    Closed,
    /// The socket failed or ended inside a message.
    Failed(std::io::Error),
}

impl Server {
    /// A server for `function`; probes its config space (BAR sizes, MSI-X, FLR) once.
    pub fn new(function: Arc<dyn PciFunction>) -> Result<Self, ServerError> {
        let layout = probe(function.as_ref())?;
        Ok(Self {
            function,
            layout,
            stats: Arc::new(Stats::default()),
            msi_only: false,
        })
    }

    /// Presents the function's MSI-X as a single MSI vector to clients: QEMU 11.1 aborts when
    /// it finalizes a hot-unplugged `vfio-user-pci` device that has MSI-X, and a device that
    /// shows MSI does not take that path. Use it for devices hot-added to running VMs. No
    /// effect on a function without MSI-X.
    pub fn msi_only(mut self) -> Self {
        self.msi_only = self.layout.msix.is_some();
        self
    }

    /// What the probe found.
    pub fn layout(&self) -> &DeviceLayout {
        &self.layout
    }

    /// The message counters.
    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Listens on `socket_path` (replacing a stale socket file) and serves clients one after
    /// another, forever.
    pub fn serve(&self, socket_path: &Path) -> Result<(), ServerError> {
        let listener = Self::bind(socket_path)?;
        self.serve_listener(&listener, socket_path, |end, stats| {
            tracing::info!("client gone ({end:?}); {}", stats.summary());
        })
    }

    /// Binds the listening socket. A stale socket file (nothing accepts on it) is replaced; a
    /// live socket ([`ServerError::SocketInUse`]) and any other kind of file
    /// ([`ServerError::NotASocket`]) are refused and left alone.
    pub fn bind(socket_path: &Path) -> Result<UnixListener, ServerError> {
        if let Ok(meta) = std::fs::symlink_metadata(socket_path) {
            if !meta.file_type().is_socket() {
                return Err(ServerError::NotASocket {
                    path: socket_path.display().to_string(),
                });
            }
            match UnixStream::connect(socket_path) {
                Ok(_) => {
                    return Err(ServerError::SocketInUse {
                        path: socket_path.display().to_string(),
                    })
                }
                // Nobody listens: a socket file left by a server that is gone.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    std::fs::remove_file(socket_path)
                        .map_err(|e| sock_err("remove stale", socket_path, e))?;
                }
                Err(e) => return Err(sock_err("probe", socket_path, e)),
            }
        }
        UnixListener::bind(socket_path).map_err(|e| sock_err("bind", socket_path, e))
    }

    /// Serves clients from `listener` one after another, forever; `on_disconnect` sees how each
    /// client left and the counters after it.
    pub fn serve_listener(
        &self,
        listener: &UnixListener,
        socket_path: &Path,
        mut on_disconnect: impl FnMut(&Disconnect, &StatsSnapshot),
    ) -> Result<(), ServerError> {
        tracing::info!(
            "serving {} on {}",
            self.function.describe(),
            socket_path.display()
        );
        loop {
            let (stream, _) = listener
                .accept()
                .map_err(|e| sock_err("accept", socket_path, e))?;
            let end = self.serve_connection(&stream);
            on_disconnect(&end, &self.stats.snapshot());
        }
    }

    /// Serves one connected client until it disconnects, then puts the device back in order:
    /// reset, interrupt routes removed, its DMA unmapped.
    pub fn serve_connection(&self, stream: &UnixStream) -> Disconnect {
        self.stats.clients.fetch_add(1, Ordering::Relaxed);
        let mut session = Session::new(self);
        let mut reader = MessageReader::new(stream);
        let end = loop {
            match reader.read_message() {
                Ok(Some(msg)) => {
                    if let Some(reply) = session.handle(msg) {
                        if let Err(e) = send_all(stream, &reply) {
                            break Disconnect::Failed(e);
                        }
                    }
                }
                Ok(None) => break Disconnect::Closed,
                Err(e) => break Disconnect::Failed(e),
            }
        };
        session.teardown();
        end
    }
}

struct Mapping {
    size: u64,
    /// Handed to the function (`dma_map`); fd-less maps (e.g. ROM) are only recorded.
    backed: bool,
}

/// Per-client state.
struct Session<'a> {
    server: &'a Server,
    maps: BTreeMap<u64, Mapping>,
    msix_fds: Vec<Option<Arc<EventFd>>>,
    intx_fd: Option<OwnedFd>,
    /// In MSI-only mode: the MSI capability the client sees instead of MSI-X.
    msi: Option<MsiCap>,
}

impl<'a> Session<'a> {
    fn new(server: &'a Server) -> Self {
        let vectors = server.layout.msix.map(|m| m.vectors).unwrap_or(0);
        let msi = match server.layout.msix {
            Some(m) if server.msi_only => {
                let next = server
                    .function
                    .config_read(m.cap_offset + cap::NEXT, AccessSize::Byte)
                    .unwrap_or(0);
                Some(MsiCap::new(m.cap_offset, next as u8))
            }
            _ => None,
        };
        Self {
            server,
            maps: BTreeMap::new(),
            msix_fds: (0..vectors).map(|_| None).collect(),
            intx_fd: None,
            msi,
        }
    }

    fn function(&self) -> &dyn PciFunction {
        self.server.function.as_ref()
    }

    /// Handles one message; returns the reply to send, if any.
    fn handle(&mut self, msg: RawMessage) -> Option<Vec<u8>> {
        let stats = &self.server.stats;
        let h = msg.header;
        if let Some(c) = stats.by_command.get(Command::stat_index(h.command)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        let posted = h.no_reply();
        if posted {
            stats.posted.fetch_add(1, Ordering::Relaxed);
        }
        tracing::trace!(
            "{} id {} size {} flags {:#x} fds {}",
            wire::command_name(h.command),
            h.msg_id,
            h.size,
            h.flags,
            msg.fds.len()
        );
        let result = self.dispatch(msg);
        match result {
            Ok(payload) if !posted => Some(wire::reply(&h, &payload)),
            Ok(_) => None,
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    "{} (id {}) refused: {e}",
                    wire::command_name(h.command),
                    h.msg_id
                );
                if posted || !h.is_command() {
                    None
                } else {
                    Some(wire::error_reply(&h, e.errno()))
                }
            }
        }
    }

    fn dispatch(&mut self, msg: RawMessage) -> Result<Vec<u8>, RequestError> {
        let h = msg.header;
        match msg.framing {
            Some(Framing::TooShort) => {
                return Err(WireError::MessageTooShort { size: h.size }.into())
            }
            Some(Framing::TooLong) => {
                return Err(WireError::MessageTooLong {
                    size: h.size,
                    max: MAX_MESSAGE,
                }
                .into())
            }
            None => {}
        }
        if msg.fds_truncated {
            return Err(WireError::TooManyFds.into());
        }
        let req = parse_request(&h, &msg.payload, msg.fds.len())?;
        let mut fds = msg.fds;
        match req {
            Request::Version { major, caps, .. } => {
                if major != 0 {
                    return Err(RequestError::NotSupported(format!(
                        "protocol major version {major}"
                    )));
                }
                Ok(wire::version_reply(&caps))
            }
            Request::DmaMap(m) => {
                self.dma_map(&m, fds.pop())?;
                Ok(Vec::new())
            }
            Request::DmaUnmap(u) => {
                self.dma_unmap(&u)?;
                Ok(Writer::new()
                    .u32(u.argsz.min(24))
                    .u32(u.flags)
                    .u64(u.iova)
                    .u64(u.size)
                    .finish())
            }
            Request::DeviceGetInfo { .. } => {
                let mut flags = DEVICE_FLAG_PCI;
                if self.server.layout.flr_devctl.is_some() {
                    flags |= DEVICE_FLAG_RESET;
                }
                Ok(Writer::new()
                    .u32(16)
                    .u32(flags)
                    .u32(region::COUNT)
                    .u32(irq::COUNT)
                    .finish())
            }
            Request::GetRegionInfo { index, .. } => {
                let (flags, size) = self.region(index)?;
                Ok(Writer::new()
                    .u32(32)
                    .u32(flags)
                    .u32(index)
                    .u32(0)
                    .u64(size)
                    .u64(0)
                    .finish())
            }
            Request::GetIrqInfo { index, .. } => {
                let count = self.irq_count(index)?;
                Ok(Writer::new()
                    .u32(16)
                    .u32(IRQ_INFO_EVENTFD)
                    .u32(index)
                    .u32(count)
                    .finish())
            }
            Request::SetIrqs(s) => {
                self.set_irqs(&s, fds)?;
                Ok(Vec::new())
            }
            Request::RegionRead {
                offset,
                region,
                count,
            } => {
                let data = self.region_read(region, offset, count)?;
                Ok(Writer::new()
                    .u64(offset)
                    .u32(region)
                    .u32(count)
                    .bytes(&data)
                    .finish())
            }
            Request::RegionWrite {
                offset,
                region,
                data,
            } => {
                self.region_write(region, offset, &data)?;
                Ok(Writer::new()
                    .u64(offset)
                    .u32(region)
                    .u32(data.len() as u32)
                    .finish())
            }
            Request::DeviceReset => {
                self.reset()?;
                Ok(Vec::new())
            }
        }
    }

    // --- regions ------------------------------------------------------------------------

    /// Flags and size of a region.
    fn region(&self, index: u32) -> Result<(u32, u64), RequestError> {
        match index {
            0..=5 => Ok(self
                .server
                .layout
                .bars
                .get(index as usize)
                .copied()
                .flatten()
                .map(|b| (REGION_FLAG_READ | REGION_FLAG_WRITE, b.size))
                .unwrap_or((0, 0))),
            region::CONFIG => Ok((
                REGION_FLAG_READ | REGION_FLAG_WRITE,
                u64::from(self.server.layout.config_size),
            )),
            region::ROM | region::VGA => Ok((0, 0)),
            _ => Err(RequestError::OutOfRange(format!("no region {index}"))),
        }
    }

    /// Checks `[offset, offset + count)` against a readable/writable region; returns its size.
    fn check_access(&self, region: u32, offset: u64, count: u64) -> Result<u64, RequestError> {
        let (flags, size) = self.region(region)?;
        let inside = offset.checked_add(count).is_some_and(|end| end <= size);
        if flags == 0 || !inside {
            return Err(RequestError::OutOfRange(format!(
                "access of {count} bytes at {offset:#x} outside region {region} ({size:#x} bytes)"
            )));
        }
        Ok(size)
    }

    fn region_read(&self, region: u32, offset: u64, count: u32) -> Result<Vec<u8>, RequestError> {
        self.check_access(region, offset, u64::from(count))?;
        let mut data = vec![0u8; count as usize];
        if region == region::CONFIG {
            for_config_pieces(offset, &mut data, |off, size, piece| {
                let v = self.function().config_read(off, size)?;
                piece.copy_from_slice(v.to_le_bytes().get(..piece.len()).unwrap_or(&[]));
                Ok(())
            })?;
            if let Some(msi) = &self.msi {
                for (i, b) in data.iter_mut().enumerate() {
                    if let Some(v) = msi.byte(offset + i as u64) {
                        *b = v;
                    }
                }
            }
        } else {
            let bar = bar_index(region)?;
            self.function().bar_read(bar, offset, &mut data)?;
        }
        Ok(data)
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), RequestError> {
        tracing::trace!("write region {region} {offset:#x} {data:02x?}");
        self.check_access(region, offset, data.len() as u64)?;
        if region == region::CONFIG {
            let mut copy = data.to_vec();
            let msi = &mut self.msi;
            let function = self.server.function.as_ref();
            for_config_pieces(offset, &mut copy, |off, size, piece| {
                // Pieces are naturally aligned and the capability is dword aligned: a piece
                // lies wholly inside it or wholly outside.
                if let Some(msi) = msi.as_mut().filter(|m| m.covers(u64::from(off))) {
                    for (i, b) in piece.iter().enumerate() {
                        msi.write_byte(u64::from(off) + i as u64, *b);
                    }
                    return Ok(());
                }
                let mut v = [0u8; 4];
                if let Some(dst) = v.get_mut(..piece.len()) {
                    dst.copy_from_slice(piece);
                }
                function.config_write(off, size, u32::from_le_bytes(v))?;
                Ok(())
            })
        } else {
            let bar = bar_index(region)?;
            Ok(self.function().bar_write(bar, offset, data)?)
        }
    }

    // --- DMA ----------------------------------------------------------------------------

    fn dma_map(&mut self, m: &DmaMap, fd: Option<OwnedFd>) -> Result<(), RequestError> {
        let new_end = m.iova + (m.size - 1); // cannot overflow: checked by the parser
                                             // The nearest mapping at or below `new_end` is the only one that can overlap.
        if let Some((&start, map)) = self.maps.range(..=new_end).next_back() {
            if start + (map.size - 1) >= m.iova {
                return Err(RequestError::Overlap {
                    iova: m.iova,
                    size: m.size,
                });
            }
        }
        if self.maps.len() >= MAX_DMA_MAPS as usize {
            return Err(RequestError::TooManyMaps);
        }
        let backed = match fd {
            Some(fd) => {
                let len = usize::try_from(m.size)
                    .map_err(|_| RequestError::OutOfRange(format!("map of {:#x} bytes", m.size)))?;
                // The fd is the VMM's: `map` refuses one that is not sealed against shrinking
                // or is shorter than the range (a truncation would SIGBUS this process).
                let mem = SharedMemory::map(fd, m.fd_offset, len).map_err(|e| {
                    let e = RequestError::BadFd(format!(
                        "cannot map guest RAM (DMA_MAP fd at {:#x}, {:#x} bytes): {e}",
                        m.fd_offset, m.size
                    ));
                    tracing::warn!("{e}");
                    e
                })?;
                let span = MemSpan::whole(Arc::new(mem));
                self.function().dma_map(BusAddr(m.iova), span, m.writable)?;
                true
            }
            // Memory QEMU cannot share (ROM, fd-less RAM): record it so that unmaps and
            // overlaps stay consistent, but the device cannot reach it.
            None => {
                tracing::debug!(
                    "DMA_MAP {:#x}+{:#x} without fd: recorded, not reachable by the device",
                    m.iova,
                    m.size
                );
                false
            }
        };
        self.maps.insert(
            m.iova,
            Mapping {
                size: m.size,
                backed,
            },
        );
        Ok(())
    }

    fn dma_unmap(&mut self, u: &DmaUnmap) -> Result<(), RequestError> {
        if u.all {
            self.unmap_all();
            return Ok(());
        }
        let end = u.iova + (u.size - 1);
        // Refuse an unmap that would split a mapping (as VFIO type1 does).
        let partial = self.maps.range(..=end).rev().any(|(&start, map)| {
            let map_end = start + (map.size - 1);
            map_end >= u.iova && (start < u.iova || map_end > end)
        });
        if partial {
            return Err(RequestError::OutOfRange(format!(
                "unmap {:#x}+{:#x} would split a mapping",
                u.iova, u.size
            )));
        }
        let victims: Vec<u64> = self.maps.range(u.iova..=end).map(|(k, _)| *k).collect();
        for start in victims {
            if let Some(map) = self.maps.remove(&start) {
                if map.backed {
                    self.function().dma_unmap(BusAddr(start), map.size)?;
                }
            }
        }
        Ok(())
    }

    fn unmap_all(&mut self) {
        let maps = std::mem::take(&mut self.maps);
        for (start, map) in maps {
            if map.backed {
                if let Err(e) = self.function().dma_unmap(BusAddr(start), map.size) {
                    log_undo_failure(&format!("unmapping {start:#x}+{:#x}", map.size), &e.into());
                }
            }
        }
    }

    // --- interrupts ---------------------------------------------------------------------

    fn irq_count(&self, index: u32) -> Result<u32, RequestError> {
        match index {
            irq::INTX => Ok(u32::from(self.server.layout.has_intx_pin)),
            irq::MSIX if self.msi.is_some() => Ok(0),
            irq::MSIX => Ok(u32::from(self.msix_fds.len() as u16)),
            irq::MSI => Ok(u32::from(self.msi.is_some())),
            irq::ERR | irq::REQ => Ok(0),
            _ => Err(RequestError::OutOfRange(format!("no IRQ index {index}"))),
        }
    }

    fn set_irqs(&mut self, s: &SetIrqs, fds: Vec<OwnedFd>) -> Result<(), RequestError> {
        let count = self.irq_count(s.index)?;
        let disable_all = s.count == 0 && s.action == IrqAction::Trigger && s.data == IrqData::None;
        if disable_all {
            if s.index == irq::MSIX || s.index == irq::MSI {
                for v in 0..self.msix_fds.len() as u16 {
                    self.route_vector(v, None)?;
                }
            } else if s.index == irq::INTX {
                self.intx_fd = None;
            }
            return Ok(());
        }
        if s.start.checked_add(s.count).is_none_or(|end| end > count) {
            return Err(RequestError::OutOfRange(format!(
                "IRQ index {} vectors {}+{} (the device has {count})",
                s.index, s.start, s.count
            )));
        }
        if s.index == irq::INTX {
            // INTx is never raised (MSI-X only), but a client may set it up: keep the fd.
            if let Some(fd) = fds.into_iter().next() {
                self.intx_fd = Some(fd);
            }
            return Ok(());
        }
        // Only MSI-X, or MSI standing in for MSI-X vector 0, is left: the other indexes have
        // no vectors and failed the range check.
        if s.index == irq::MSI {
            self.enable_function_msix()?;
        }
        let vectors = s.start..s.start + s.count;
        match (&s.action, &s.data) {
            (IrqAction::Trigger, IrqData::EventFds(0)) => {
                for v in vectors {
                    self.route_vector(v as u16, None)?;
                }
            }
            (IrqAction::Trigger, IrqData::EventFds(_)) => {
                // Validate every fd before routing any vector.
                let mut evs = Vec::with_capacity(fds.len());
                for fd in fds {
                    evs.push(Arc::new(eventfd_from(fd)?));
                }
                for (v, ev) in vectors.zip(evs) {
                    self.route_vector(v as u16, Some(ev))?;
                }
            }
            (IrqAction::Trigger, IrqData::None) => {
                for v in vectors {
                    self.fire(v as u16);
                }
            }
            (IrqAction::Trigger, IrqData::Bool(b)) => {
                for (v, on) in vectors.zip(b.iter()) {
                    if *on {
                        self.fire(v as u16);
                    }
                }
            }
            (IrqAction::Mask | IrqAction::Unmask, data) => {
                let masked = s.action == IrqAction::Mask;
                let all = vec![true; s.count as usize];
                let which = match data {
                    IrqData::Bool(b) => b,
                    _ => &all,
                };
                for (v, on) in vectors.zip(which.iter()) {
                    if *on {
                        self.set_vector_masked(v as u16, masked)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// MSI-only mode: the client never sees MSI-X, so the server enables it in the function
    /// (Enable set, Function Mask clear) before routing vector 0 to the client's MSI eventfd.
    fn enable_function_msix(&self) -> Result<(), RequestError> {
        let Some(msix) = self.server.layout.msix else {
            return Err(RequestError::NotSupported(
                "the function has no MSI-X".into(),
            ));
        };
        let f = self.function();
        let at = msix.cap_offset + msix_cap::CONTROL;
        let ctrl = f.config_read(at, AccessSize::Word)?;
        let enable = u32::from(msix_cap::CONTROL_ENABLE);
        let function_mask = u32::from(msix_cap::CONTROL_FUNCTION_MASK);
        f.config_write(at, AccessSize::Word, (ctrl | enable) & !function_mask)?;
        Ok(())
    }

    fn fire(&self, vector: u16) {
        if let Some(Some(ev)) = self.msix_fds.get(vector as usize) {
            if let Err(e) = ev.write(1) {
                tracing::warn!("firing MSI-X vector {vector}: {e}");
            }
        }
    }

    /// Routes a vector to `fd` (unmasking it in the function's table, since the client emulates
    /// the table itself and never forwards its writes) or takes the route away (masking it).
    fn route_vector(&mut self, vector: u16, fd: Option<Arc<EventFd>>) -> Result<(), RequestError> {
        let had = self
            .msix_fds
            .get(vector as usize)
            .is_some_and(|f| f.is_some());
        if fd.is_none() && !had {
            return Ok(());
        }
        let routed = fd.is_some();
        self.function().set_interrupt_eventfd(vector, fd.clone())?;
        if let Some(slot) = self.msix_fds.get_mut(vector as usize) {
            *slot = fd;
        }
        if routed {
            self.program_vector(vector)?;
        }
        self.set_vector_masked(vector, !routed)
    }

    /// Gives the function's table entry a plausible message (the function only forwards it to
    /// the routed eventfd; the client delivers the real message it emulates).
    fn program_vector(&self, vector: u16) -> Result<(), RequestError> {
        let Some(msix) = self.server.layout.msix else {
            return Err(RequestError::NotSupported(
                "the function has no MSI-X".into(),
            ));
        };
        let at = msix.entry(vector);
        let f = self.function();
        f.bar_write_u32(msix.table_bar, at + table::ENTRY_ADDR_LO, 0xfee0_0000)?;
        f.bar_write_u32(msix.table_bar, at + table::ENTRY_ADDR_HI, 0)?;
        f.bar_write_u32(msix.table_bar, at + table::ENTRY_DATA, u32::from(vector))?;
        Ok(())
    }

    fn set_vector_masked(&self, vector: u16, masked: bool) -> Result<(), RequestError> {
        let Some(msix) = self.server.layout.msix else {
            return Err(RequestError::NotSupported(
                "the function has no MSI-X".into(),
            ));
        };
        let at = msix.entry(vector) + table::ENTRY_VECTOR_CONTROL;
        let f = self.function();
        let ctrl = f.bar_read_u32(msix.table_bar, at)?;
        let new = if masked {
            ctrl | MSIX_VECTOR_MASKED
        } else {
            ctrl & !MSIX_VECTOR_MASKED
        };
        f.bar_write_u32(msix.table_bar, at, new)?;
        Ok(())
    }

    // --- reset and teardown -------------------------------------------------------------

    fn reset(&self) -> Result<(), RequestError> {
        let Some(devctl) = self.server.layout.flr_devctl else {
            return Err(RequestError::NotSupported(
                "the function does not support FLR".into(),
            ));
        };
        let f = self.function();
        let v = f.config_read(devctl, AccessSize::Word)?;
        let flr = u32::from(devlend_pci::config::pcie::DEVCTL_INITIATE_FLR);
        f.config_write(devctl, AccessSize::Word, v | flr)?;
        Ok(())
    }

    /// After a client: stop the device (FLR), take its interrupt routes away, drop its DMA.
    /// A function that is gone meanwhile (given back to its lender, or its lender died) took
    /// all of that with it: its refusals are logged at debug level, not as warnings.
    fn teardown(&mut self) {
        if self.server.layout.flr_devctl.is_some() {
            if let Err(e) = self.reset() {
                log_undo_failure("resetting the function after the client left", &e);
            }
        }
        for v in 0..self.msix_fds.len() as u16 {
            if let Err(e) = self.route_vector(v, None) {
                log_undo_failure(&format!("unrouting vector {v}"), &e);
            }
        }
        self.intx_fd = None;
        self.unmap_all();
    }
}

/// Logs a failure to undo what a client set up (a DMA mapping, an interrupt route, the
/// device's state): at debug level when the function is gone (given back to its lender, or
/// its lender died), which took all of that with it; as a warning otherwise.
fn log_undo_failure(what: &str, e: &RequestError) {
    if matches!(e, RequestError::Function(FunctionError::Removed(_))) {
        tracing::debug!("{what}: {e}");
    } else {
        tracing::warn!("{what}: {e}");
    }
}

fn sock_err(op: &'static str, path: &Path, source: std::io::Error) -> ServerError {
    ServerError::Socket {
        op,
        path: path.display().to_string(),
        source,
    }
}

fn bar_index(region: u32) -> Result<BarIndex, RequestError> {
    u8::try_from(region)
        .ok()
        .and_then(BarIndex::new)
        .ok_or_else(|| RequestError::OutOfRange(format!("region {region} is not a BAR")))
}

/// Splits a config access into naturally aligned 4/2/1-byte pieces.
fn for_config_pieces(
    offset: u64,
    data: &mut [u8],
    mut each: impl FnMut(u16, AccessSize, &mut [u8]) -> Result<(), RequestError>,
) -> Result<(), RequestError> {
    let mut done = 0usize;
    while done < data.len() {
        let at = offset + done as u64;
        let left = data.len() - done;
        let size = if at & 3 == 0 && left >= 4 {
            AccessSize::Dword
        } else if at & 1 == 0 && left >= 2 {
            AccessSize::Word
        } else {
            AccessSize::Byte
        };
        let off = u16::try_from(at)
            .map_err(|_| RequestError::OutOfRange(format!("config offset {at:#x}")))?;
        let piece = data
            .get_mut(done..done + size.len())
            .ok_or_else(|| RequestError::OutOfRange("config piece".into()))?;
        each(off, size, piece)?;
        done += size.len();
    }
    Ok(())
}

/// An eventfd from a received descriptor, refusing anything else.
fn eventfd_from(fd: OwnedFd) -> Result<EventFd, RequestError> {
    let link =
        std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|source| {
            RequestError::Os {
                op: "readlink",
                source,
            }
        })?;
    if link.to_string_lossy() != "anon_inode:[eventfd]" {
        return Err(RequestError::BadFd(format!(
            "SET_IRQS descriptor is {}, not an eventfd",
            link.display()
        )));
    }
    let raw = fd.into_raw_fd();
    // SAFETY: `raw` is an eventfd we own (ownership moved out of `fd` just above).
    Ok(unsafe { <EventFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_pieces_are_aligned() {
        let mut seen = Vec::new();
        let mut buf = [0u8; 7];
        for_config_pieces(1, &mut buf, |off, size, _| {
            seen.push((off, size.len()));
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, vec![(1, 1), (2, 2), (4, 4)]);
    }

    #[test]
    fn bind_refuses_a_live_socket_and_other_files_and_replaces_a_stale_one() {
        let dir = std::env::temp_dir().join(format!("vfio-user-bind-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("s.sock");
        let live = Server::bind(&sock).unwrap();
        assert!(matches!(
            Server::bind(&sock),
            Err(ServerError::SocketInUse { .. })
        ));
        assert!(
            UnixStream::connect(&sock).is_ok(),
            "the live socket is gone"
        );
        drop(live);
        let again = Server::bind(&sock).unwrap();
        drop(again);
        let file = dir.join("f");
        std::fs::write(&file, b"x").unwrap();
        assert!(matches!(
            Server::bind(&file),
            Err(ServerError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
