//! The vfio-user wire format: the 16-byte header, every command's payload parsed into a typed
//! [`Request`], and the encoding of replies.
//!
//! Everything here is pure (no I/O, no fds): [`parse_request`] takes a header, the payload bytes
//! and the number of file descriptors that came with the message, and either returns a typed
//! request or a [`WireError`] that carries the errno for the error reply. It never panics, on
//! any input; `fuzz/` exercises exactly that.
//!
//! Integers are host-endian on the wire (client and server share a machine); this crate only
//! builds for little-endian hosts, so they are decoded as little-endian.

use crate::WireError;

/// Size of the message header.
pub const HEADER_LEN: usize = 16;
/// Largest data transfer a REGION_READ/WRITE may carry (what we advertise in VERSION).
pub const MAX_DATA_XFER: u32 = 1 << 20;
/// Largest message accepted: the data limit plus room for any fixed payload. Longer messages are
/// drained and refused with `E2BIG`.
pub const MAX_MESSAGE: u32 = MAX_DATA_XFER + 4096;
/// Most file descriptors accepted with one message (what we advertise in VERSION).
pub const MAX_MSG_FDS: u32 = 16;
/// Most DMA mappings a client may hold (what we advertise in VERSION).
pub const MAX_DMA_MAPS: u32 = 65535;

/// Header flag bits (`flags` field).
pub mod flags {
    /// Message type mask (bits 0-3).
    pub const TYPE_MASK: u32 = 0xf;
    /// Type: command.
    pub const TYPE_COMMAND: u32 = 0;
    /// Type: reply.
    pub const TYPE_REPLY: u32 = 1;
    /// The sender wants no reply (posted).
    pub const NO_REPLY: u32 = 0x10;
    /// The reply is an error; `error` holds the errno.
    pub const ERROR: u32 = 0x20;
}

/// Command numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Command {
    /// Version and capability negotiation.
    Version = 1,
    /// Map client memory for device DMA.
    DmaMap = 2,
    /// Unmap client memory.
    DmaUnmap = 3,
    /// Device flags and region/IRQ counts.
    DeviceGetInfo = 4,
    /// One region's size and flags.
    DeviceGetRegionInfo = 5,
    /// ioeventfds for a region (not supported).
    DeviceGetRegionIoFds = 6,
    /// One IRQ index's count and flags.
    DeviceGetIrqInfo = 7,
    /// Set up eventfds / mask state for IRQs.
    DeviceSetIrqs = 8,
    /// Read a region.
    RegionRead = 9,
    /// Write a region.
    RegionWrite = 10,
    /// Server reads client memory (we never send it).
    DmaRead = 11,
    /// Server writes client memory (we never send it).
    DmaWrite = 12,
    /// Reset the device.
    DeviceReset = 13,
    /// Dirty page logging (removed from the spec; refused).
    DirtyPages = 14,
    /// Several posted writes in one message (not advertised; refused).
    RegionWriteMulti = 15,
}

impl Command {
    /// The command with this number, if it is one.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::Version,
            2 => Self::DmaMap,
            3 => Self::DmaUnmap,
            4 => Self::DeviceGetInfo,
            5 => Self::DeviceGetRegionInfo,
            6 => Self::DeviceGetRegionIoFds,
            7 => Self::DeviceGetIrqInfo,
            8 => Self::DeviceSetIrqs,
            9 => Self::RegionRead,
            10 => Self::RegionWrite,
            11 => Self::DmaRead,
            12 => Self::DmaWrite,
            13 => Self::DeviceReset,
            14 => Self::DirtyPages,
            15 => Self::RegionWriteMulti,
            _ => return None,
        })
    }

    /// Index into per-command counters (0 for unknown commands).
    pub fn stat_index(v: u16) -> usize {
        if (1..=15).contains(&v) {
            v as usize
        } else {
            0
        }
    }
}

/// The message header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Header {
    /// Message id; a reply echoes the command's.
    pub msg_id: u16,
    /// Command number (see [`Command`]).
    pub command: u16,
    /// Size of the whole message, header included.
    pub size: u32,
    /// Type and flag bits (see [`flags`]).
    pub flags: u32,
    /// errno of an error reply.
    pub error: u32,
}

impl Header {
    /// Decodes the 16 header bytes (any bytes decode; validation is separate).
    pub fn decode(b: &[u8; HEADER_LEN]) -> Self {
        let mut r = Reader::new(b);
        // The reader cannot run short on a 16-byte array; zeros are unreachable defaults.
        Self {
            msg_id: r.u16().unwrap_or(0),
            command: r.u16().unwrap_or(0),
            size: r.u32().unwrap_or(0),
            flags: r.u32().unwrap_or(0),
            error: r.u32().unwrap_or(0),
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    /// Whether this is a command (as opposed to a reply).
    pub fn is_command(&self) -> bool {
        self.flags & flags::TYPE_MASK == flags::TYPE_COMMAND
    }

    /// Whether the sender asked for no reply.
    pub fn no_reply(&self) -> bool {
        self.flags & flags::NO_REPLY != 0
    }

    /// Payload length the header claims, or `None` when `size` is smaller than a header.
    pub fn payload_len(&self) -> Option<usize> {
        (self.size as usize).checked_sub(HEADER_LEN)
    }
}

/// What the client proposed in VERSION (unknown keys ignored).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ClientCaps {
    /// `max_msg_fds`, if given.
    pub max_msg_fds: Option<u64>,
    /// `max_data_xfer_size`, if given.
    pub max_data_xfer_size: Option<u64>,
    /// `max_dma_maps`, if given.
    pub max_dma_maps: Option<u64>,
    /// `pgsizes`, if given.
    pub pgsizes: Option<u64>,
}

/// DMA_MAP payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMap {
    /// The device may read the memory.
    pub readable: bool,
    /// The device may write the memory.
    pub writable: bool,
    /// Offset of the mapping in the fd that came with the message.
    pub fd_offset: u64,
    /// IO virtual address (guest physical address) of the first byte.
    pub iova: u64,
    /// Length in bytes (non-zero; `iova + size` does not overflow).
    pub size: u64,
}

/// DMA_UNMAP payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaUnmap {
    /// `argsz` as sent (echoed in the reply).
    pub argsz: u32,
    /// `flags` as sent (echoed in the reply).
    pub flags: u32,
    /// First address.
    pub iova: u64,
    /// Length.
    pub size: u64,
    /// Unmap everything (`VFIO_DMA_UNMAP_FLAG_ALL`).
    pub all: bool,
}

/// DMA_MAP flag bits (`linux/vfio.h`, from `vfio-bindings`).
pub mod dma_flags {
    use vfio_bindings::bindings::vfio as v;
    /// The device may read.
    pub const READ: u32 = v::VFIO_DMA_MAP_FLAG_READ;
    /// The device may write.
    pub const WRITE: u32 = v::VFIO_DMA_MAP_FLAG_WRITE;
    /// DMA_UNMAP: also return a dirty bitmap (not supported).
    pub const UNMAP_GET_DIRTY_BITMAP: u32 = v::VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP;
    /// DMA_UNMAP: unmap everything (`VFIO_DMA_UNMAP_FLAG_ALL`).
    pub const UNMAP_ALL: u32 = v::VFIO_DMA_UNMAP_FLAG_ALL;
}

/// DEVICE_SET_IRQS flag bits (`linux/vfio.h`, from `vfio-bindings`).
pub mod irq_set_flags {
    use vfio_bindings::bindings::vfio as v;
    /// No data.
    pub const DATA_NONE: u32 = v::VFIO_IRQ_SET_DATA_NONE;
    /// Data is an array of bools.
    pub const DATA_BOOL: u32 = v::VFIO_IRQ_SET_DATA_BOOL;
    /// Data is eventfds (here: passed as fds with the message).
    pub const DATA_EVENTFD: u32 = v::VFIO_IRQ_SET_DATA_EVENTFD;
    /// Mask the vectors.
    pub const ACTION_MASK: u32 = v::VFIO_IRQ_SET_ACTION_MASK;
    /// Unmask the vectors.
    pub const ACTION_UNMASK: u32 = v::VFIO_IRQ_SET_ACTION_UNMASK;
    /// Trigger / route the vectors.
    pub const ACTION_TRIGGER: u32 = v::VFIO_IRQ_SET_ACTION_TRIGGER;
    /// All data-type bits.
    pub const DATA_MASK: u32 = v::VFIO_IRQ_SET_DATA_TYPE_MASK;
    /// All action bits.
    pub const ACTION_MASK_ALL: u32 = v::VFIO_IRQ_SET_ACTION_TYPE_MASK;
}

/// What a SET_IRQS carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IrqData {
    /// No data (`DATA_NONE`).
    None,
    /// One bool per vector (`DATA_BOOL`).
    Bool(Vec<bool>),
    /// Eventfds (`DATA_EVENTFD`): this many came with the message (0 = deassign).
    EventFds(usize),
}

/// What a SET_IRQS asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqAction {
    /// Mask the vectors.
    Mask,
    /// Unmask the vectors.
    Unmask,
    /// Route (with eventfds) or fire (without) the vectors.
    Trigger,
}

/// DEVICE_SET_IRQS payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetIrqs {
    /// IRQ index (0 INTx, 1 MSI, 2 MSI-X, 3 ERR, 4 REQ).
    pub index: u32,
    /// First vector.
    pub start: u32,
    /// Number of vectors.
    pub count: u32,
    /// Exactly one action.
    pub action: IrqAction,
    /// Exactly one data type.
    pub data: IrqData,
}

/// A parsed command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// VERSION.
    Version {
        /// Proposed major version.
        major: u16,
        /// Proposed minor version.
        minor: u16,
        /// Proposed capabilities.
        caps: ClientCaps,
    },
    /// DMA_MAP (one fd may come with it).
    DmaMap(DmaMap),
    /// DMA_UNMAP.
    DmaUnmap(DmaUnmap),
    /// DEVICE_GET_INFO.
    DeviceGetInfo {
        /// Room the client has for the reply.
        argsz: u32,
    },
    /// DEVICE_GET_REGION_INFO.
    GetRegionInfo {
        /// Room the client has for the reply.
        argsz: u32,
        /// Region index.
        index: u32,
    },
    /// DEVICE_GET_IRQ_INFO.
    GetIrqInfo {
        /// Room the client has for the reply.
        argsz: u32,
        /// IRQ index.
        index: u32,
    },
    /// DEVICE_SET_IRQS (eventfds may come with it).
    SetIrqs(SetIrqs),
    /// REGION_READ.
    RegionRead {
        /// Offset in the region.
        offset: u64,
        /// Region index.
        region: u32,
        /// Bytes to read (non-zero, at most [`MAX_DATA_XFER`]).
        count: u32,
    },
    /// REGION_WRITE.
    RegionWrite {
        /// Offset in the region.
        offset: u64,
        /// Region index.
        region: u32,
        /// The bytes (non-empty, at most [`MAX_DATA_XFER`]).
        data: Vec<u8>,
    },
    /// DEVICE_RESET.
    DeviceReset,
}

impl Request {
    /// The command this request is.
    pub fn command(&self) -> Command {
        match self {
            Request::Version { .. } => Command::Version,
            Request::DmaMap(_) => Command::DmaMap,
            Request::DmaUnmap(_) => Command::DmaUnmap,
            Request::DeviceGetInfo { .. } => Command::DeviceGetInfo,
            Request::GetRegionInfo { .. } => Command::DeviceGetRegionInfo,
            Request::GetIrqInfo { .. } => Command::DeviceGetIrqInfo,
            Request::SetIrqs(_) => Command::DeviceSetIrqs,
            Request::RegionRead { .. } => Command::RegionRead,
            Request::RegionWrite { .. } => Command::RegionWrite,
            Request::DeviceReset => Command::DeviceReset,
        }
    }
}

/// A little-endian cursor over a payload that fails instead of panicking.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let end = self.pos.checked_add(N)?;
        let bytes: [u8; N] = self.buf.get(self.pos..end)?.try_into().ok()?;
        self.pos = end;
        Some(bytes)
    }

    pub(crate) fn u16(&mut self) -> Option<u16> {
        self.take::<2>().map(u16::from_le_bytes)
    }

    pub(crate) fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Option<u64> {
        self.take::<8>().map(u64::from_le_bytes)
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        self.buf.get(self.pos..).unwrap_or(&[])
    }
}

/// Parses one command message. `nfds` is how many file descriptors arrived with it; a command
/// that takes none (or fewer than arrived) is refused with [`WireError::UnexpectedFds`], and the
/// caller closes them.
pub fn parse_request(header: &Header, payload: &[u8], nfds: usize) -> Result<Request, WireError> {
    if !header.is_command() {
        return Err(WireError::NotACommand {
            flags: header.flags,
        });
    }
    let cmd = Command::from_u16(header.command).ok_or(WireError::UnknownCommand {
        command: header.command,
    })?;
    let short = |need: usize| WireError::Truncated {
        command: header.command,
        need,
        got: payload.len(),
    };
    let no_fds = |req: Request| {
        if nfds == 0 {
            Ok(req)
        } else {
            Err(WireError::UnexpectedFds {
                command: header.command,
                count: nfds,
            })
        }
    };
    let mut r = Reader::new(payload);
    match cmd {
        Command::Version => {
            let (major, minor) = (r.u16().ok_or(short(4))?, r.u16().ok_or(short(4))?);
            let caps = parse_caps(r.rest())?;
            no_fds(Request::Version { major, minor, caps })
        }
        Command::DmaMap => {
            let argsz = r.u32().ok_or(short(32))?;
            let flags = r.u32().ok_or(short(32))?;
            let fd_offset = r.u64().ok_or(short(32))?;
            let iova = r.u64().ok_or(short(32))?;
            let size = r.u64().ok_or(short(32))?;
            if argsz < 32 {
                return Err(WireError::BadArgsz { argsz, need: 32 });
            }
            if flags & !(dma_flags::READ | dma_flags::WRITE) != 0 {
                return Err(WireError::BadFlags { flags });
            }
            check_range(iova, size)?;
            if nfds > 1 {
                return Err(WireError::UnexpectedFds {
                    command: header.command,
                    count: nfds,
                });
            }
            Ok(Request::DmaMap(DmaMap {
                readable: flags & dma_flags::READ != 0,
                writable: flags & dma_flags::WRITE != 0,
                fd_offset,
                iova,
                size,
            }))
        }
        Command::DmaUnmap => {
            let argsz = r.u32().ok_or(short(24))?;
            let flags = r.u32().ok_or(short(24))?;
            let iova = r.u64().ok_or(short(24))?;
            let size = r.u64().ok_or(short(24))?;
            if argsz < 24 {
                return Err(WireError::BadArgsz { argsz, need: 24 });
            }
            if flags & dma_flags::UNMAP_GET_DIRTY_BITMAP != 0 {
                return Err(WireError::Unsupported {
                    what: "DMA_UNMAP with a dirty bitmap",
                });
            }
            if flags & !dma_flags::UNMAP_ALL != 0 {
                return Err(WireError::BadFlags { flags });
            }
            let all = flags & dma_flags::UNMAP_ALL != 0;
            if all {
                if iova != 0 || size != 0 {
                    return Err(WireError::BadRange { iova, size });
                }
            } else {
                check_range(iova, size)?;
            }
            no_fds(Request::DmaUnmap(DmaUnmap {
                argsz,
                flags,
                iova,
                size,
                all,
            }))
        }
        Command::DeviceGetInfo => {
            let argsz = r.u32().ok_or(short(4))?;
            if argsz < 16 {
                return Err(WireError::BadArgsz { argsz, need: 16 });
            }
            no_fds(Request::DeviceGetInfo { argsz })
        }
        Command::DeviceGetRegionInfo => {
            let argsz = r.u32().ok_or(short(12))?;
            let _flags = r.u32().ok_or(short(12))?;
            let index = r.u32().ok_or(short(12))?;
            if argsz < 32 {
                return Err(WireError::BadArgsz { argsz, need: 32 });
            }
            no_fds(Request::GetRegionInfo { argsz, index })
        }
        Command::DeviceGetIrqInfo => {
            let argsz = r.u32().ok_or(short(12))?;
            let _flags = r.u32().ok_or(short(12))?;
            let index = r.u32().ok_or(short(12))?;
            if argsz < 16 {
                return Err(WireError::BadArgsz { argsz, need: 16 });
            }
            no_fds(Request::GetIrqInfo { argsz, index })
        }
        Command::DeviceSetIrqs => {
            parse_set_irqs(header.command, &mut r, nfds).map(Request::SetIrqs)
        }
        Command::RegionRead => {
            let offset = r.u64().ok_or(short(16))?;
            let region = r.u32().ok_or(short(16))?;
            let count = r.u32().ok_or(short(16))?;
            if count == 0 || count > MAX_DATA_XFER {
                return Err(WireError::BadCount { count });
            }
            no_fds(Request::RegionRead {
                offset,
                region,
                count,
            })
        }
        Command::RegionWrite => {
            let offset = r.u64().ok_or(short(16))?;
            let region = r.u32().ok_or(short(16))?;
            let count = r.u32().ok_or(short(16))?;
            if count == 0 || count > MAX_DATA_XFER {
                return Err(WireError::BadCount { count });
            }
            let data = r.rest();
            if data.len() != count as usize {
                return Err(WireError::LengthMismatch {
                    count,
                    got: data.len(),
                });
            }
            no_fds(Request::RegionWrite {
                offset,
                region,
                data: data.to_vec(),
            })
        }
        Command::DeviceReset => no_fds(Request::DeviceReset),
        Command::DeviceGetRegionIoFds
        | Command::DmaRead
        | Command::DmaWrite
        | Command::DirtyPages
        | Command::RegionWriteMulti => Err(WireError::Unsupported {
            what: command_name(header.command),
        }),
    }
}

fn parse_set_irqs(command: u16, r: &mut Reader<'_>, nfds: usize) -> Result<SetIrqs, WireError> {
    let short = |got: usize| WireError::Truncated {
        command,
        need: 20,
        got,
    };
    let got = r.rest().len();
    let argsz = r.u32().ok_or(short(got))?;
    let flags = r.u32().ok_or(short(got))?;
    let index = r.u32().ok_or(short(got))?;
    let start = r.u32().ok_or(short(got))?;
    let count = r.u32().ok_or(short(got))?;
    if argsz < 20 {
        return Err(WireError::BadArgsz { argsz, need: 20 });
    }
    use irq_set_flags as f;
    if flags & !(f::DATA_MASK | f::ACTION_MASK_ALL) != 0 {
        return Err(WireError::BadFlags { flags });
    }
    let action = match flags & f::ACTION_MASK_ALL {
        f::ACTION_MASK => IrqAction::Mask,
        f::ACTION_UNMASK => IrqAction::Unmask,
        f::ACTION_TRIGGER => IrqAction::Trigger,
        _ => return Err(WireError::BadFlags { flags }),
    };
    if start.checked_add(count).is_none() {
        return Err(WireError::BadCount { count });
    }
    let fds_refused = || WireError::UnexpectedFds {
        command,
        count: nfds,
    };
    let data = match flags & f::DATA_MASK {
        f::DATA_NONE => {
            if nfds != 0 {
                return Err(fds_refused());
            }
            IrqData::None
        }
        f::DATA_BOOL => {
            if nfds != 0 {
                return Err(fds_refused());
            }
            let bytes = r.rest();
            let bools = bytes.get(..count as usize).ok_or(WireError::Truncated {
                command,
                need: 20 + count as usize,
                got: 20 + bytes.len(),
            })?;
            IrqData::Bool(bools.iter().map(|b| *b != 0).collect())
        }
        f::DATA_EVENTFD => {
            if action != IrqAction::Trigger || (nfds != 0 && nfds != count as usize) {
                return Err(fds_refused());
            }
            IrqData::EventFds(nfds)
        }
        _ => return Err(WireError::BadFlags { flags }),
    };
    Ok(SetIrqs {
        index,
        start,
        count,
        action,
        data,
    })
}

fn check_range(iova: u64, size: u64) -> Result<(), WireError> {
    if size == 0 || iova.checked_add(size - 1).is_none() {
        return Err(WireError::BadRange { iova, size });
    }
    Ok(())
}

fn parse_caps(bytes: &[u8]) -> Result<ClientCaps, WireError> {
    // The JSON is NUL-terminated; tolerate its absence and anything after the NUL.
    let json = match bytes.iter().position(|b| *b == 0) {
        Some(nul) => bytes.get(..nul).unwrap_or(&[]),
        None => bytes,
    };
    if json.iter().all(u8::is_ascii_whitespace) {
        return Ok(ClientCaps::default());
    }
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| WireError::BadVersionJson(e.to_string()))?;
    let caps = match v.get("capabilities") {
        None => return Ok(ClientCaps::default()),
        Some(c) if c.is_object() => c,
        Some(_) => {
            return Err(WireError::BadVersionJson(
                "\"capabilities\" is not an object".into(),
            ))
        }
    };
    let num = |k: &str| -> Result<Option<u64>, WireError> {
        match caps.get(k) {
            None => Ok(None),
            Some(x) => x.as_u64().map(Some).ok_or_else(|| {
                WireError::BadVersionJson(format!("{k} is not an unsigned integer"))
            }),
        }
    };
    Ok(ClientCaps {
        max_msg_fds: num("max_msg_fds")?,
        max_data_xfer_size: num("max_data_xfer_size")?,
        max_dma_maps: num("max_dma_maps")?,
        pgsizes: num("pgsizes")?,
    })
}

/// A readable name for a command number (for logs and errors).
pub fn command_name(command: u16) -> &'static str {
    match Command::from_u16(command) {
        Some(Command::Version) => "VERSION",
        Some(Command::DmaMap) => "DMA_MAP",
        Some(Command::DmaUnmap) => "DMA_UNMAP",
        Some(Command::DeviceGetInfo) => "DEVICE_GET_INFO",
        Some(Command::DeviceGetRegionInfo) => "DEVICE_GET_REGION_INFO",
        Some(Command::DeviceGetRegionIoFds) => "DEVICE_GET_REGION_IO_FDS",
        Some(Command::DeviceGetIrqInfo) => "DEVICE_GET_IRQ_INFO",
        Some(Command::DeviceSetIrqs) => "DEVICE_SET_IRQS",
        Some(Command::RegionRead) => "REGION_READ",
        Some(Command::RegionWrite) => "REGION_WRITE",
        Some(Command::DmaRead) => "DMA_READ",
        Some(Command::DmaWrite) => "DMA_WRITE",
        Some(Command::DeviceReset) => "DEVICE_RESET",
        Some(Command::DirtyPages) => "DIRTY_PAGES",
        Some(Command::RegionWriteMulti) => "REGION_WRITE_MULTI",
        None => "unknown",
    }
}

// ---------------------------------------------------------------------------------------------
// Replies
// ---------------------------------------------------------------------------------------------

/// A little-endian payload builder.
#[derive(Default)]
pub struct Writer(Vec<u8>);

impl Writer {
    /// An empty payload.
    pub fn new() -> Self {
        Self(Vec::new())
    }
    /// Appends a u16.
    pub fn u16(mut self, v: u16) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u32.
    pub fn u32(mut self, v: u32) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(mut self, v: u64) -> Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends raw bytes.
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.0.extend_from_slice(b);
        self
    }
    /// The payload.
    pub fn finish(self) -> Vec<u8> {
        self.0
    }
}

/// A complete reply message (header + payload) to `request`.
pub fn reply(request: &Header, payload: &[u8]) -> Vec<u8> {
    let size = HEADER_LEN + payload.len();
    let h = Header {
        msg_id: request.msg_id,
        command: request.command,
        size: u32::try_from(size).unwrap_or(u32::MAX),
        flags: flags::TYPE_REPLY,
        error: 0,
    };
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(payload);
    out
}

/// A complete error reply (bare header with the error bit and `errno`).
pub fn error_reply(request: &Header, errno: i32) -> Vec<u8> {
    let h = Header {
        msg_id: request.msg_id,
        command: request.command,
        size: HEADER_LEN as u32,
        flags: flags::TYPE_REPLY | flags::ERROR,
        error: errno.unsigned_abs(),
    };
    h.encode().to_vec()
}

/// The VERSION reply payload: 0.0 and the capabilities we grant (a subset of the proposal).
pub fn version_reply(caps: &ClientCaps) -> Vec<u8> {
    let fds = caps.max_msg_fds.unwrap_or(8).min(MAX_MSG_FDS as u64);
    let xfer = caps
        .max_data_xfer_size
        .unwrap_or(MAX_DATA_XFER as u64)
        .min(MAX_DATA_XFER as u64);
    let maps = caps
        .max_dma_maps
        .unwrap_or(MAX_DMA_MAPS as u64)
        .min(MAX_DMA_MAPS as u64);
    let json = serde_json::json!({
        "capabilities": {
            "max_msg_fds": fds,
            "max_data_xfer_size": xfer,
            "max_dma_maps": maps,
            "pgsizes": 4096,
        }
    });
    let mut text = json.to_string().into_bytes();
    text.push(0);
    Writer::new().u16(0).u16(0).bytes(&text).finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr(command: u16, payload: &[u8]) -> Header {
        Header {
            msg_id: 7,
            command,
            size: (HEADER_LEN + payload.len()) as u32,
            flags: 0,
            error: 0,
        }
    }

    #[test]
    fn header_round_trip() {
        let h = Header {
            msg_id: 0x1234,
            command: 9,
            size: 48,
            flags: flags::NO_REPLY,
            error: 5,
        };
        assert_eq!(Header::decode(&h.encode()), h);
        assert!(h.no_reply());
        assert!(h.is_command());
    }

    #[test]
    fn region_write_needs_exact_data() {
        let p = Writer::new()
            .u64(0x1000)
            .u32(0)
            .u32(4)
            .bytes(&[1, 2, 3])
            .finish();
        assert!(matches!(
            parse_request(&hdr(10, &p), &p, 0),
            Err(WireError::LengthMismatch { .. })
        ));
        let p = Writer::new()
            .u64(0x1000)
            .u32(0)
            .u32(4)
            .bytes(&[1, 2, 3, 4])
            .finish();
        assert_eq!(
            parse_request(&hdr(10, &p), &p, 0).ok(),
            Some(Request::RegionWrite {
                offset: 0x1000,
                region: 0,
                data: vec![1, 2, 3, 4]
            })
        );
        assert!(matches!(
            parse_request(&hdr(10, &p), &p, 1),
            Err(WireError::UnexpectedFds { .. })
        ));
    }

    #[test]
    fn version_is_parsed_and_answered_with_a_subset() {
        let mut p = Writer::new().u16(0).u16(0).finish();
        p.extend_from_slice(
            br#"{"capabilities":{"max_msg_fds":16,"max_data_xfer_size":1048576,"pgsizes":4096,"max_dma_maps":65535,"write_multiple":true,"migration":{"pgsize":4096}}}"#,
        );
        p.push(0);
        let Ok(Request::Version { caps, .. }) = parse_request(&hdr(1, &p), &p, 0) else {
            panic!("version did not parse");
        };
        assert_eq!(caps.max_msg_fds, Some(16));
        let r = version_reply(&caps);
        assert_eq!(&r[..4], &[0, 0, 0, 0]);
        assert_eq!(r.last(), Some(&0));
        let text = std::str::from_utf8(&r[4..r.len() - 1]).unwrap();
        assert!(!text.contains("write_multiple"));
        assert!(!text.contains("migration"));
        let bad = Writer::new().u16(0).u16(0).bytes(b"{nope").finish();
        assert!(matches!(
            parse_request(&hdr(1, &bad), &bad, 0),
            Err(WireError::BadVersionJson(_))
        ));
    }

    #[test]
    fn set_irqs_shapes() {
        let p = Writer::new()
            .u32(20)
            .u32(irq_set_flags::DATA_EVENTFD | irq_set_flags::ACTION_TRIGGER)
            .u32(2)
            .u32(0)
            .u32(3)
            .finish();
        let h = hdr(8, &p);
        assert!(matches!(
            parse_request(&h, &p, 3),
            Ok(Request::SetIrqs(SetIrqs {
                data: IrqData::EventFds(3),
                ..
            }))
        ));
        assert!(matches!(
            parse_request(&h, &p, 2),
            Err(WireError::UnexpectedFds { .. })
        ));
        let p = Writer::new()
            .u32(20)
            .u32(
                irq_set_flags::DATA_NONE
                    | irq_set_flags::ACTION_MASK
                    | irq_set_flags::ACTION_TRIGGER,
            )
            .u32(2)
            .u32(0)
            .u32(1)
            .finish();
        assert!(matches!(
            parse_request(&hdr(8, &p), &p, 0),
            Err(WireError::BadFlags { .. })
        ));
    }

    #[test]
    fn dma_ranges_are_checked() {
        let p = Writer::new()
            .u32(32)
            .u32(3)
            .u64(0)
            .u64(u64::MAX)
            .u64(2)
            .finish();
        assert!(matches!(
            parse_request(&hdr(2, &p), &p, 1),
            Err(WireError::BadRange { .. })
        ));
        let p = Writer::new().u32(24).u32(2).u64(0).u64(0).finish();
        assert!(matches!(
            parse_request(&hdr(3, &p), &p, 0),
            Ok(Request::DmaUnmap(DmaUnmap { all: true, .. }))
        ));
    }

    #[test]
    fn unknown_and_reply_typed_messages_are_refused() {
        assert!(matches!(
            parse_request(&hdr(99, &[]), &[], 0),
            Err(WireError::UnknownCommand { command: 99 })
        ));
        let mut h = hdr(13, &[]);
        h.flags = flags::TYPE_REPLY;
        assert!(matches!(
            parse_request(&h, &[], 0),
            Err(WireError::NotACommand { .. })
        ));
    }
}
