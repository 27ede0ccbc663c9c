//! What the server learns from the function's config space once, before serving: BAR sizes
//! (by the standard all-ones sizing dance), the config space size, the MSI-X table location and
//! whether FLR is available.

use devlend_pci::config::cap::{ID_MSIX as CAP_ID_MSIX, ID_PCI_EXPRESS as CAP_ID_PCIE};
use devlend_pci::config::CONFIG_SPACE_SIZE;
use devlend_pci::config::{bar, cap, command, header, msix as msix_cap, pcie, status};
use devlend_pci::msix::ENTRY_LEN;
use devlend_pci::{AccessSize, BarIndex, FunctionError, PciFunction};

/// One memory BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// Size in bytes.
    pub size: u64,
    /// 64-bit (also occupies the next slot).
    pub is_64bit: bool,
}

/// The MSI-X table's location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixInfo {
    /// Config offset of the capability.
    pub cap_offset: u16,
    /// Number of vectors (table size).
    pub vectors: u16,
    /// BAR holding the table.
    pub table_bar: BarIndex,
    /// Offset of the table in that BAR.
    pub table_offset: u64,
}

impl MsixInfo {
    /// BAR offset of a vector's entry.
    pub fn entry(&self, vector: u16) -> u64 {
        self.table_offset + u64::from(vector) * ENTRY_LEN
    }
}

/// The device as probed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceLayout {
    /// Memory BARs by slot (`None` for empty slots, I/O BARs and the upper half of 64-bit BARs).
    pub bars: [Option<BarInfo>; 6],
    /// 256 (conventional) or 4096 (PCIe).
    pub config_size: u32,
    /// MSI-X, when the function has it.
    pub msix: Option<MsixInfo>,
    /// Config offset of the PCIe Device Control register, when the function can do FLR.
    pub flr_devctl: Option<u16>,
    /// Interrupt Pin register is non-zero.
    pub has_intx_pin: bool,
}

fn rd(f: &dyn PciFunction, off: u16, size: AccessSize) -> Result<u32, FunctionError> {
    f.config_read(off, size)
}

/// Walks the capability list: `(id, offset)` pairs, bounded against loops.
fn capabilities(f: &dyn PciFunction) -> Result<Vec<(u8, u16)>, FunctionError> {
    let mut caps = Vec::new();
    let sts = rd(f, header::STATUS, AccessSize::Word)?;
    if sts & u32::from(status::CAPABILITIES_LIST) == 0 {
        return Ok(caps);
    }
    let first = (rd(f, header::CAPABILITIES_POINTER, AccessSize::Byte)? & 0xfc) as u16;
    // The walk never finds: it visits every capability (at most cap::MAX_WALK).
    cap::find(first, |at| {
        let id = rd(f, at + cap::ID, AccessSize::Byte)? as u8;
        caps.push((id, at));
        Ok::<_, FunctionError>(cap::Step::Next(
            rd(f, at + cap::NEXT, AccessSize::Byte)? as u8
        ))
    })?;
    Ok(caps)
}

/// Sizes the BARs (memory decoding off meanwhile, original values restored) and finds the
/// capabilities the server needs.
pub fn probe(f: &dyn PciFunction) -> Result<DeviceLayout, FunctionError> {
    let cmd = rd(f, header::COMMAND, AccessSize::Word)?;
    let decoding = u32::from(command::IO_SPACE | command::MEMORY_SPACE);
    f.config_write(header::COMMAND, AccessSize::Word, cmd & !decoding)?;
    let mut bars = [None; 6];
    let mut slot = 0usize;
    while slot < 6 {
        let off = header::BAR0 + 4 * slot as u16;
        let orig = rd(f, off, AccessSize::Dword)?;
        if orig & bar::IO == bar::IO {
            slot += 1; // I/O BAR: not served.
            continue;
        }
        let is_64bit = orig & 0b110 == bar::TYPE_64BIT && slot < 5;
        f.config_write(off, AccessSize::Dword, 0xffff_ffff)?;
        let lo = rd(f, off, AccessSize::Dword)?;
        f.config_write(off, AccessSize::Dword, orig)?;
        let mut mask = u64::from(lo & !bar::FLAGS_MASK);
        if is_64bit {
            let orig_hi = rd(f, off + 4, AccessSize::Dword)?;
            f.config_write(off + 4, AccessSize::Dword, 0xffff_ffff)?;
            let hi = rd(f, off + 4, AccessSize::Dword)?;
            f.config_write(off + 4, AccessSize::Dword, orig_hi)?;
            mask |= u64::from(hi) << 32;
        } else if mask != 0 {
            mask |= 0xffff_ffff_0000_0000;
        }
        if mask != 0 {
            let size = (!mask).wrapping_add(1);
            if let Some(b) = bars.get_mut(slot) {
                *b = Some(BarInfo { size, is_64bit });
            }
        }
        slot += if is_64bit { 2 } else { 1 };
    }
    f.config_write(header::COMMAND, AccessSize::Word, cmd)?;

    let caps = capabilities(f)?;
    let mut config_size = 256;
    let mut flr_devctl = None;
    let mut msix = None;
    for (id, off) in caps {
        match id {
            CAP_ID_PCIE => {
                config_size = CONFIG_SPACE_SIZE as u32;
                let devcap = rd(f, off + pcie::DEVICE_CAPABILITIES, AccessSize::Dword)?;
                if devcap & pcie::DEVCAP_FLR != 0 {
                    flr_devctl = Some(off + pcie::DEVICE_CONTROL);
                }
            }
            CAP_ID_MSIX => {
                let ctrl = rd(f, off + msix_cap::CONTROL, AccessSize::Word)?;
                let table = rd(f, off + msix_cap::TABLE, AccessSize::Dword)?;
                if let Some(table_bar) = BarIndex::new((table & msix_cap::BIR_MASK) as u8) {
                    msix = Some(MsixInfo {
                        cap_offset: off,
                        vectors: (ctrl as u16 & msix_cap::CONTROL_TABLE_SIZE) + 1,
                        table_bar,
                        table_offset: u64::from(table & !msix_cap::BIR_MASK),
                    });
                }
            }
            _ => {}
        }
    }
    let has_intx_pin = rd(f, header::INTERRUPT_PIN, AccessSize::Byte)? != 0;
    Ok(DeviceLayout {
        bars,
        config_size,
        msix,
        flr_devctl,
        has_intx_pin,
    })
}
