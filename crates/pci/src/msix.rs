//! MSI-X table and pending bit array (PBA) emulation.
//!
//! The table and PBA live in BARs at the offsets of an [`MsixLayout`]; the device routes BAR
//! accesses here with [`MsixTable::bar_read`] / [`MsixTable::bar_write`]. Enable and Function
//! Mask come from the config space (feed [`ConfigEffect::MsixControl`] into
//! [`MsixTable::set_control`]). A vector fires into the [`InterruptSink`] only when MSI-X is
//! enabled, the function is not masked and the vector is not masked; otherwise its pending bit
//! latches, and the message is sent when the mask that held it is cleared.
//!
//! QEMU's vfio-user client emulates the table itself and never forwards table writes, so a
//! vfio-user server unmasks vectors by writing Vector Control here through the BAR: the table
//! behaves the same whoever writes it.
//!
//! The table does not see the Command register: a device must not call
//! [`MsixTable::trigger`] while Bus Master Enable is clear (an MSI-X message is a DMA write).
//!
//! Locking: one internal mutex guards the table; the sink is called after it is released, so a
//! sink may take its own locks (or cross the fabric) without holding up table accesses.
//!
//! [`ConfigEffect::MsixControl`]: crate::config::ConfigEffect::MsixControl

use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::MsixLayout;
use crate::{BarIndex, InterruptSink};

/// Bytes per table entry.
pub const ENTRY_LEN: u64 = 16;
/// Entry offset of Message Address (low 32 bits; bits 1:0 read as zero).
pub const ENTRY_ADDR_LO: u64 = 0x0;
/// Entry offset of Message Upper Address.
pub const ENTRY_ADDR_HI: u64 = 0x4;
/// Entry offset of Message Data.
pub const ENTRY_DATA: u64 = 0x8;
/// Entry offset of Vector Control.
pub const ENTRY_VECTOR_CONTROL: u64 = 0xc;
/// Vector Control: Mask Bit.
pub const VECTOR_CONTROL_MASK: u32 = 1 << 0;
/// Message Address bits 1:0 are reserved (DWORD-aligned address).
pub const ADDR_LO_WRITABLE: u32 = !0x3;

/// One vector's message as software programmed it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsixMessage {
    /// Message Address.
    pub address: u64,
    /// Message Data.
    pub data: u32,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

impl Entry {
    const RESET: Entry = Entry {
        addr_lo: 0,
        addr_hi: 0,
        data: 0,
        control: VECTOR_CONTROL_MASK,
    };

    fn masked(&self) -> bool {
        self.control & VECTOR_CONTROL_MASK != 0
    }
}

#[derive(Debug)]
struct State {
    entries: Vec<Entry>,
    pending: Vec<u64>,
    enabled: bool,
    function_mask: bool,
}

impl State {
    fn new(vectors: u16) -> Self {
        Self {
            entries: vec![Entry::RESET; usize::from(vectors)],
            pending: vec![0; usize::from(vectors).div_ceil(64)],
            enabled: false,
            function_mask: false,
        }
    }

    fn pending(&self, vector: u16) -> bool {
        let (word, bit) = (usize::from(vector / 64), vector % 64);
        self.pending.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }

    fn set_pending(&mut self, vector: u16, on: bool) {
        let (word, bit) = (usize::from(vector / 64), vector % 64);
        if let Some(w) = self.pending.get_mut(word) {
            if on {
                *w |= 1 << bit;
            } else {
                *w &= !(1 << bit);
            }
        }
    }

    fn can_deliver(&self, vector: u16) -> bool {
        self.enabled
            && !self.function_mask
            && self
                .entries
                .get(usize::from(vector))
                .is_some_and(|e| !e.masked())
    }

    /// Clears and returns the pending vectors that may now be delivered.
    fn take_deliverable(&mut self) -> Vec<u16> {
        let n = self.entries.len() as u16;
        let ready: Vec<u16> = (0..n)
            .filter(|&v| self.pending(v) && self.can_deliver(v))
            .collect();
        for &v in &ready {
            self.set_pending(v, false);
        }
        ready
    }
}

/// The MSI-X table and PBA of one function.
pub struct MsixTable {
    layout: MsixLayout,
    state: Mutex<State>,
    sink: Arc<dyn InterruptSink>,
}

impl std::fmt::Debug for MsixTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsixTable")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

impl MsixTable {
    /// A table for `layout` at its power-on state (disabled, all vectors masked), delivering
    /// to `sink`.
    pub fn new(layout: MsixLayout, sink: Arc<dyn InterruptSink>) -> Self {
        Self {
            state: Mutex::new(State::new(layout.vectors)),
            layout,
            sink,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the plain-data state inconsistent.
        devlend_sync::lock(&self.state)
    }

    fn deliver(&self, vectors: &[u16]) {
        for &v in vectors {
            self.sink.signal(v);
        }
    }

    /// Where the table and PBA live.
    pub fn layout(&self) -> MsixLayout {
        self.layout
    }

    /// Number of vectors.
    pub fn vectors(&self) -> u16 {
        self.layout.vectors
    }

    /// Vector `vector` fires: delivered now if enabled and unmasked, else its pending bit is
    /// set. Returns whether it was delivered. Vectors beyond the table are ignored.
    pub fn trigger(&self, vector: u16) -> bool {
        let deliver = {
            let mut s = self.lock();
            if usize::from(vector) >= s.entries.len() {
                return false;
            }
            let deliver = s.can_deliver(vector);
            if !deliver {
                s.set_pending(vector, true);
            }
            deliver
        };
        if deliver {
            self.sink.signal(vector);
        }
        deliver
    }

    /// New MSI-X Enable and Function Mask from the config space; sends pending messages the
    /// change unmasked.
    pub fn set_control(&self, enable: bool, function_mask: bool) {
        let ready = {
            let mut s = self.lock();
            s.enabled = enable;
            s.function_mask = function_mask;
            s.take_deliverable()
        };
        self.deliver(&ready);
    }

    /// MSI-X Enable and Function Mask as last set.
    pub fn control(&self) -> (bool, bool) {
        let s = self.lock();
        (s.enabled, s.function_mask)
    }

    /// Whether `vector`'s Mask Bit is set (`None` beyond the table).
    pub fn is_masked(&self, vector: u16) -> Option<bool> {
        self.lock()
            .entries
            .get(usize::from(vector))
            .map(Entry::masked)
    }

    /// Whether `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        self.lock().pending(vector)
    }

    /// The message programmed for `vector`.
    pub fn message(&self, vector: u16) -> Option<MsixMessage> {
        self.lock()
            .entries
            .get(usize::from(vector))
            .map(|e| MsixMessage {
                address: u64::from(e.addr_hi) << 32 | u64::from(e.addr_lo),
                data: e.data,
            })
    }

    /// Back to power-on: disabled, not function-masked, every vector masked, nothing pending.
    pub fn reset(&self) {
        *self.lock() = State::new(self.layout.vectors);
    }

    /// Whether `[offset, offset + len)` of BAR `bar` touches the table or PBA.
    pub fn claims(&self, bar: BarIndex, offset: u64, len: u64) -> bool {
        let hit = |region: crate::config::BarRegion, size: u64| {
            let start = u64::from(region.offset);
            region.bar == bar && offset < start + size && start < offset.saturating_add(len)
        };
        hit(self.layout.table, self.layout.table_len())
            || hit(self.layout.pba, self.layout.pba_len())
    }

    /// A BAR read: answered and `true` when it touches the table or PBA (a bad access reads
    /// all-ones), `false` when it is none of ours.
    pub fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]) -> bool {
        if !self.claims(bar, offset, data.len() as u64) {
            return false;
        }
        match self.region_at(bar, offset) {
            Some(Region::Table(at)) => self.table_read(at, data),
            Some(Region::Pba(at)) => self.pba_read(at, data),
            None => data.fill(0xff),
        }
        true
    }

    /// A BAR write: applied and `true` when it touches the table or PBA (bad accesses and PBA
    /// writes are dropped), `false` when it is none of ours.
    pub fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) -> bool {
        if !self.claims(bar, offset, data.len() as u64) {
            return false;
        }
        if let Some(Region::Table(at)) = self.region_at(bar, offset) {
            self.table_write(at, data);
        }
        true
    }

    /// Which region the byte at `offset` of BAR `bar` is in, and its offset there.
    fn region_at(&self, bar: BarIndex, offset: u64) -> Option<Region> {
        let inside = |region: crate::config::BarRegion, size: u64| {
            let start = u64::from(region.offset);
            (region.bar == bar && offset >= start && offset - start < size).then(|| offset - start)
        };
        inside(self.layout.table, self.layout.table_len())
            .map(Region::Table)
            .or_else(|| inside(self.layout.pba, self.layout.pba_len()).map(Region::Pba))
    }

    /// Reads the table at `offset` from its start: 4 or 8 bytes, naturally aligned, inside the
    /// table; anything else reads all-ones.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some(len) = access_len(offset, data, self.layout.table_len()) else {
            return;
        };
        let s = self.lock();
        for (i, chunk) in data.chunks_exact_mut(4).enumerate().take(len / 4) {
            let at = offset + 4 * i as u64;
            let Some(entry) = s.entries.get((at / ENTRY_LEN) as usize) else {
                return;
            };
            let value = match at % ENTRY_LEN {
                ENTRY_ADDR_LO => entry.addr_lo,
                ENTRY_ADDR_HI => entry.addr_hi,
                ENTRY_DATA => entry.data,
                _ => entry.control,
            };
            chunk.copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Writes the table at `offset` from its start: 4 or 8 bytes, naturally aligned, inside
    /// the table; anything else is dropped. Clearing a Mask Bit sends that vector's pending
    /// message.
    pub fn table_write(&self, offset: u64, data: &[u8]) {
        let Some(len) = access_len(offset, data, self.layout.table_len()) else {
            return;
        };
        let ready = {
            let mut s = self.lock();
            for (i, chunk) in data.chunks_exact(4).enumerate().take(len / 4) {
                let at = offset + 4 * i as u64;
                let mut word = [0u8; 4];
                word.copy_from_slice(chunk);
                let value = u32::from_le_bytes(word);
                let Some(entry) = s.entries.get_mut((at / ENTRY_LEN) as usize) else {
                    return;
                };
                match at % ENTRY_LEN {
                    ENTRY_ADDR_LO => entry.addr_lo = value & ADDR_LO_WRITABLE,
                    ENTRY_ADDR_HI => entry.addr_hi = value,
                    ENTRY_DATA => entry.data = value,
                    _ => entry.control = value & VECTOR_CONTROL_MASK,
                }
            }
            s.take_deliverable()
        };
        self.deliver(&ready);
    }

    /// Reads the PBA at `offset` from its start (4 or 8 bytes, naturally aligned; anything
    /// else reads all-ones).
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some(len) = access_len(offset, data, self.layout.pba_len()) else {
            return;
        };
        let s = self.lock();
        let Some(word) = s.pending.get((offset / 8) as usize).copied() else {
            return;
        };
        let bytes = word.to_le_bytes();
        let start = (offset % 8) as usize;
        if let (Some(dst), Some(src)) = (data.get_mut(..len), bytes.get(start..start + len)) {
            dst.copy_from_slice(src);
        }
    }
}

/// Offset inside the table or the PBA.
enum Region {
    Table(u64),
    Pba(u64),
}

/// The length of a valid 4- or 8-byte, naturally aligned access inside a region of
/// `region_len` bytes.
fn access_len(offset: u64, data: &[u8], region_len: u64) -> Option<usize> {
    let len = data.len();
    let ok = (len == 4 || len == 8)
        && offset.is_multiple_of(len as u64)
        && offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= region_len);
    ok.then_some(len)
}

#[cfg(test)]
#[path = "tests/msix.rs"]
mod tests;
