//! The controller's memory buffer (CMB) as the driver uses it: I/O submission queues placed in
//! device memory (SmartIO/libnvm's "remote queue": the submission queue near the device, the
//! completion queue near the driver). Commands then reach the device as posted writes through
//! the BAR, and the device reads them from itself instead of fetching them across the link;
//! completions and read data still arrive as the device's posted writes into host memory.
//!
//! Only the NVMe 1.4 scheme (`CAP.CMBS`: the driver tells the controller where the buffer is
//! with `CMBMSC.CBA`) is used; an older controller's CMB is left alone.

use devlend_pci::config::{bar as bar_bits, header};
use devlend_pci::{AccessSize, BarIndex};

use crate::error::NvmeError;
use crate::queue::Hw;
use crate::regs::{
    self, CMBLOC_CDPCILS, CMBLOC_CDPMLS, CMBLOC_CQMMS, CMBMSC_CMSE, CMBMSC_CRE, CMBSTS_CBAI,
    CMBSZ_LISTS, CMBSZ_SQS, CMBSZ_WDS,
};

/// The bus address the driver gives the CMB when its BAR has none assigned (the bindings here
/// leave BARs unassigned): far above the DMA pools of the local binding (64 GiB) and of a
/// borrower (64 TiB), and aligned to any CMB size unit a controller may report.
pub const UNASSIGNED_CMB_BUS_ADDR: u64 = 0x7000_0000_0000;

/// An enabled CMB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CmbInfo {
    /// The BAR holding it.
    pub bar: BarIndex,
    /// Its offset in that BAR.
    pub bar_offset: u64,
    /// Its size in bytes.
    pub bytes: u64,
    /// The bus address the controller decodes it at (`CMBMSC.CBA`).
    pub bus_addr: u64,
    /// `CMBSZ.WDS`: write data may be in it.
    pub write_data: bool,
    /// `CMBSZ.LISTS` and `CMBLOC.CDPMLS`: PRP lists may be in it, pointing at host memory.
    pub lists: bool,
}

/// A CMB's size unit in bytes (`4 KiB * 16 ^ SZU`); `None` for a reserved value.
fn size_unit(szu: u32) -> Option<u64> {
    (szu <= 6).then(|| 4096u64 << (4 * szu))
}

/// Reads the address a memory BAR is assigned (0 when unassigned).
fn bar_address(hw: &Hw, bar: BarIndex) -> Result<u64, NvmeError> {
    let reg = header::BAR0 + 4 * u16::from(bar.get());
    let lo = hw.fun.config_read(reg, AccessSize::Dword)?;
    let is_64 = lo & 0b110 == bar_bits::TYPE_64BIT;
    let hi = if is_64 && bar.get() < 5 {
        hw.fun.config_read(reg + 4, AccessSize::Dword)?
    } else {
        0
    };
    Ok((u64::from(hi) << 32) | u64::from(lo & !bar_bits::FLAGS_MASK))
}

/// Turns the CMB off (CMBMSC = 0) when the controller has the 1.4 scheme.
pub(crate) fn disable(hw: &Hw) -> Result<(), NvmeError> {
    if hw.caps.cmb_space {
        hw.write32(regs::REG_CMBMSC + 4, 0)?;
        hw.write32(regs::REG_CMBMSC, 0)?;
    }
    Ok(())
}

/// Enables the CMB for submission queues: `CMBMSC.CRE`, then (if `CMBSZ.SQS` and the buffer
/// may hold a queue whose completions and data are in host memory) `CMBMSC.CMSE` at the BAR's
/// address, or [`UNASSIGNED_CMB_BUS_ADDR`] when the BAR has none. `None`, with the CMB off,
/// when the controller has no usable CMB or refuses the base (`CMBSTS.CBAI`).
pub(crate) fn enable(hw: &Hw) -> Result<Option<CmbInfo>, NvmeError> {
    if !hw.caps.cmb_space {
        return Ok(None);
    }
    hw.write32(regs::REG_CMBMSC + 4, 0)?;
    hw.write32(regs::REG_CMBMSC, CMBMSC_CRE as u32)?;
    let sz = hw.read32(regs::REG_CMBSZ)?;
    let loc = hw.read32(regs::REG_CMBLOC)?;
    let usable = sz != u32::MAX
        && sz & CMBSZ_SQS != 0
        && loc & CMBLOC_CQMMS != 0
        && loc & CMBLOC_CDPCILS != 0;
    let unit = size_unit((sz >> 8) & 0xf);
    let layout = unit.and_then(|unit| {
        let bytes = u64::from(sz >> 12).checked_mul(unit)?;
        let bar_offset = u64::from(loc >> 12).checked_mul(unit)?;
        let bar = BarIndex::new((loc & 0b111) as u8)?;
        Some((bar, bar_offset, bytes, unit))
    });
    let Some((bar, bar_offset, bytes, unit)) = layout.filter(|l| usable && l.2 > 0) else {
        disable(hw)?;
        return Ok(None);
    };
    let assigned = bar_address(hw, bar)?;
    let base = if assigned == 0 {
        UNASSIGNED_CMB_BUS_ADDR
    } else {
        assigned
    };
    let Some(bus_addr) = base
        .checked_add(bar_offset)
        .filter(|a| a.is_multiple_of(unit) && a.checked_add(bytes).is_some())
    else {
        disable(hw)?;
        return Ok(None);
    };
    let msc = bus_addr | CMBMSC_CMSE | CMBMSC_CRE;
    // The high half first: the low half carries CMSE, so the enable sees the whole base.
    hw.write32(regs::REG_CMBMSC + 4, (msc >> 32) as u32)?;
    hw.write32(regs::REG_CMBMSC, msc as u32)?;
    if hw.read32(regs::REG_CMBSTS)? & CMBSTS_CBAI != 0 {
        tracing::warn!(
            bus_addr,
            "the controller refused the CMB's base (CMBSTS.CBAI)"
        );
        disable(hw)?;
        return Ok(None);
    }
    Ok(Some(CmbInfo {
        bar,
        bar_offset,
        bytes,
        bus_addr,
        write_data: sz & CMBSZ_WDS != 0,
        lists: sz & CMBSZ_LISTS != 0 && loc & CMBLOC_CDPMLS != 0,
    }))
}

/// Hands out page-aligned pieces of the CMB, front to back.
#[derive(Debug)]
pub(crate) struct CmbSpace {
    pub info: CmbInfo,
    next: u64,
}

impl CmbSpace {
    pub fn new(info: CmbInfo) -> Self {
        CmbSpace { info, next: 0 }
    }

    /// `len` bytes (rounded up to 4 KiB), as (offset in the CMB) or `None` when full.
    pub fn take(&mut self, len: u64) -> Option<u64> {
        let len = len.checked_next_multiple_of(regs::HOST_PAGE_BYTES as u64)?;
        let at = self.next;
        let end = at.checked_add(len).filter(|e| *e <= self.info.bytes)?;
        self.next = end;
        Some(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_space() {
        assert_eq!(size_unit(0), Some(4096));
        assert_eq!(size_unit(1), Some(64 << 10));
        assert_eq!(size_unit(6), Some(64 << 30));
        assert_eq!(size_unit(7), None);
        let mut s = CmbSpace::new(CmbInfo {
            bar: BarIndex::new(2).unwrap(),
            bar_offset: 0,
            bytes: 64 << 10,
            bus_addr: UNASSIGNED_CMB_BUS_ADDR,
            write_data: true,
            lists: true,
        });
        assert_eq!(s.take(100), Some(0));
        assert_eq!(s.take(16 << 10), Some(4096));
        assert_eq!(s.take(44 << 10), Some(20 << 10));
        assert_eq!(s.take(1), None);
    }
}
