//! Reading a burst's write data ahead, all at once.
//!
//! Over a fabric where a DMA read is a message (memory the port maps nowhere: the same test as
//! the burst fetch of submission queue entries), a Write moves its data with a read round trip,
//! and the worker runs commands one after another: 32 writes cost 32 round trips. A real
//! device keeps many read requests outstanding instead. So before the worker runs a burst, it
//! reads the data of every Write in it (and first the PRP lists that data needs) with
//! [`DmaPort::dma_read_many`], which on `tcp` sends every request before it awaits the first
//! answer: about two round trips for the whole burst.
//!
//! The commands then run as before, through a [`ReadAhead`] port that serves reads from what
//! was read ahead and passes everything else on. Reading early is what a device may do: the
//! host may not change a command's buffer (nor its PRP list) once it has rung the doorbell,
//! until the command completes. The port checks and translates every read ahead as it would the
//! command's own (the reads go through it), and a read ahead that fails is simply not used: the
//! command then reads (and fails) on its own, with its own status.

use devlend_memory::BusAddr;
use devlend_pci::{DmaAccess, DmaError, DmaPort, DmaSpanResult};

use crate::command::{Command, NvmOp};
use crate::prp::{self, Segment};

/// Most bytes of data read ahead for one burst, as a device bounds the reads it has
/// outstanding: 32 writes of 4 KiB. The data of a burst is all read before its first command
/// runs, so a larger budget makes large writes wait for each other: measured with 128 KiB
/// writes at QD8 over tcp, a 4 MiB budget lost a third of the bandwidth of reading each
/// command's data on its own, and 128 KiB lost nothing (docs/MEASUREMENTS.md, issue #13).
pub(crate) const READ_AHEAD_MAX: u64 = 128 << 10;

/// Host memory read ahead: bus address and bytes.
pub(crate) type Ahead = Vec<(BusAddr, Vec<u8>)>;

/// The device's port with host memory read ahead in front of it: a read that lies inside what
/// was read ahead is served from it; anything else (and every write) goes to the port.
pub(crate) struct ReadAhead<'a> {
    pub port: &'a dyn DmaPort,
    pub ahead: &'a [(BusAddr, Vec<u8>)],
}

impl ReadAhead<'_> {
    fn find(&self, addr: BusAddr, len: usize) -> Option<&[u8]> {
        self.ahead.iter().find_map(|(at, bytes)| {
            let start = usize::try_from(addr.0.checked_sub(at.0)?).ok()?;
            bytes.get(start..start.checked_add(len)?)
        })
    }
}

impl DmaPort for ReadAhead<'_> {
    fn dma_read(&self, addr: BusAddr, buf: &mut [u8]) -> Result<(), DmaError> {
        match self.find(addr, buf.len()) {
            Some(bytes) => {
                buf.copy_from_slice(bytes);
                Ok(())
            }
            None => self.port.dma_read(addr, buf),
        }
    }

    fn dma_write(&self, addr: BusAddr, data: &[u8]) -> Result<(), DmaError> {
        self.port.dma_write(addr, data)
    }

    fn dma_span(&self, addr: BusAddr, len: u64, access: DmaAccess) -> DmaSpanResult {
        self.port.dma_span(addr, len, access)
    }
}

/// What [`read_ahead`] needs to know of the controller.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    /// `CC.MPS` page size.
    pub page_size: u64,
    /// MDTS in bytes.
    pub max_transfer: u64,
    /// log2 of the namespace's block size.
    pub block_shift: u32,
}

/// Whether `[addr, addr + len)` is memory the port reaches by messages (no direct mapping)
/// that it lets the device read.
fn by_message(port: &dyn DmaPort, addr: BusAddr, len: u64) -> bool {
    matches!(port.dma_span(addr, len, DmaAccess::Read), Ok(None))
}

/// Reads ahead, into `out` (emptied first), what the Reads and Writes among `cmds` read from
/// host memory the port reaches by messages: first the PRP lists of both, in one batch, then
/// the data of the Writes, in another. At most [`READ_AHEAD_MAX`] bytes of data. (A Read's
/// PRP list is the one round trip a Read makes before its data goes out as posted writes.)
pub(crate) fn read_ahead(port: &dyn DmaPort, cmds: &[Command], g: Geometry, out: &mut Ahead) {
    out.clear();
    if g.page_size < 4096 || !g.page_size.is_power_of_two() {
        return;
    }
    let page_mask = g.page_size - 1;
    // The transfers worth reading ahead for: their data pointer, length, and whether the
    // command reads its data from host memory (a Write) or only its PRP list (a Read).
    let transfers: Vec<_> = cmds
        .iter()
        .filter_map(|c| {
            let (r, write) = match NvmOp::parse(c) {
                Ok(NvmOp::Write(r)) => (r, true),
                Ok(NvmOp::Read(r)) => (r, false),
                _ => return None,
            };
            let len = u64::from(r.blocks).checked_shl(g.block_shift)?;
            (len > 0 && len <= g.max_transfer).then_some((r.data, len, write))
        })
        .collect();
    if transfers.is_empty() {
        return;
    }

    // The first page of each PRP list (what the walker reads first), of Reads and Writes.
    let mut lists = Vec::new();
    for (dp, len, _) in &transfers {
        let first = (*len).min(g.page_size - (dp.prp1 & page_mask));
        let Some(rest) = len.checked_sub(first) else {
            continue;
        };
        if rest <= g.page_size || dp.prp2 & 0x7 != 0 {
            continue;
        }
        let slots = (g.page_size - (dp.prp2 & page_mask)) / 8;
        let bytes = rest.div_ceil(g.page_size).min(slots) * 8;
        if by_message(port, BusAddr(dp.prp2), bytes) {
            lists.push((BusAddr(dp.prp2), vec![0u8; bytes as usize]));
        }
    }
    if !lists.is_empty() && read_all(port, &mut lists).is_ok() {
        out.append(&mut lists);
    }

    // The data, its PRPs walked through what was read so far.
    let mut data = Vec::new();
    let mut total = 0u64;
    let mut segs: Vec<Segment> = Vec::new();
    for (dp, len, _) in transfers.iter().filter(|t| t.2) {
        segs.clear();
        let walker = ReadAhead { port, ahead: out };
        if prp::walk(&walker, dp.prp1, dp.prp2, *len, g.page_size, &mut segs).is_err() {
            continue;
        }
        for seg in &segs {
            if total.saturating_add(seg.len) > READ_AHEAD_MAX {
                break;
            }
            if by_message(port, seg.addr, seg.len) {
                total += seg.len;
                data.push((seg.addr, vec![0u8; seg.len as usize]));
            }
        }
    }
    if !data.is_empty() && read_all(port, &mut data).is_ok() {
        out.append(&mut data);
    }
}

/// The device's port limited to memory it maps: a read of anything else fails at once (with
/// [`DmaError::Path`]) instead of going out as a message.
struct MappedOnly<'a>(&'a dyn DmaPort);

impl DmaPort for MappedOnly<'_> {
    fn dma_read(&self, addr: BusAddr, buf: &mut [u8]) -> Result<(), DmaError> {
        match self.0.dma_span(addr, buf.len() as u64, DmaAccess::Read)? {
            Some(span) => Ok(span.read_at(0, buf)?),
            None => Err(DmaError::Path("memory reached by messages".into())),
        }
    }

    fn dma_write(&self, addr: BusAddr, data: &[u8]) -> Result<(), DmaError> {
        self.0.dma_write(addr, data)
    }

    fn dma_span(&self, addr: BusAddr, len: u64, access: DmaAccess) -> DmaSpanResult {
        self.0.dma_span(addr, len, access)
    }
}

/// Whether running `cmd` reads only memory the port maps (its PRP lists, and the data of a
/// command that reads host memory), so that it waits for no message. A command that fails
/// before it reads anything (a bad opcode or field, bad PRPs) counts as reading nothing; a
/// PRP list or data the port cannot map at all counts as not mapped (the worker, which may
/// wait, then runs it and fails it).
pub(crate) fn reads_only_mapped(port: &dyn DmaPort, cmd: &Command, g: Geometry) -> bool {
    let blocks = |r: &crate::command::BlockRange| {
        u64::from(r.blocks)
            .checked_shl(g.block_shift)
            .filter(|l| *l <= g.max_transfer)
    };
    let (data, len, reads_data) = match NvmOp::parse(cmd) {
        Err(_) | Ok(NvmOp::Flush) | Ok(NvmOp::WriteZeroes { .. }) => return true,
        Ok(NvmOp::DatasetManagement { ranges, data, .. }) => (data, u64::from(ranges) * 16, true),
        Ok(NvmOp::Read(r)) => match blocks(&r) {
            Some(len) => (r.data, len, false),
            // Too long: fails with Invalid Field before any transfer.
            None => return true,
        },
        Ok(NvmOp::Write(r) | NvmOp::Compare(r)) => match blocks(&r) {
            Some(len) => (r.data, len, true),
            None => return true,
        },
    };
    let mut segs = Vec::new();
    match prp::walk(
        &MappedOnly(port),
        data.prp1,
        data.prp2,
        len,
        g.page_size,
        &mut segs,
    ) {
        Ok(()) => {}
        Err(prp::PrpError::Dma(_)) => return false,
        Err(_) => return true,
    }
    !reads_data
        || segs
            .iter()
            .all(|s| matches!(port.dma_span(s.addr, s.len, DmaAccess::Read), Ok(Some(_))))
}

/// One [`DmaPort::dma_read_many`] over all of `reads`.
fn read_all(port: &dyn DmaPort, reads: &mut Ahead) -> Result<(), DmaError> {
    let mut batch: Vec<(BusAddr, &mut [u8])> = reads
        .iter_mut()
        .map(|(addr, bytes)| (*addr, bytes.as_mut_slice()))
        .collect();
    port.dma_read_many(&mut batch)
}

#[cfg(test)]
#[path = "tests/readahead.rs"]
mod tests;
