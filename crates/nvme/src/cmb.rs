//! The Controller Memory Buffer (NVMe base spec 1.4, sections 3.1.11-3.1.14 and 8.2): device
//! memory in its own BAR that a driver may fill with submission queues, PRP lists and data,
//! so that the controller reads them from itself instead of fetching them across the link.
//!
//! - Registers: `CAP.CMBS` is set, so the 1.4 scheme applies. `CMBLOC` and `CMBSZ` read zero
//!   until the driver sets `CMBMSC.CRE`. Setting `CMBMSC.CMSE` with a valid `CMBMSC.CBA` makes
//!   the addresses `CBA .. CBA + size` refer to the buffer; an invalid base (not a multiple of
//!   the size unit, or a range that wraps) sets `CMBSTS.CBAI` and leaves the buffer unmapped.
//!   Controller resets (CC.EN 1 -> 0) keep CMBMSC; a function level reset clears it.
//! - Addressing: `CmbPort` sits in front of the device's bus-master port. An access wholly
//!   inside the enabled buffer is served from the buffer, one wholly outside goes to the port,
//!   and one that is partly inside fails as an unmapped DMA (the command then ends with Data
//!   Transfer Error and nothing is transferred).
//! - The host reaches the buffer through the BAR (`Cmb::bar_read`, `Cmb::bar_write`):
//!   plain memory, byte-granular, no side effects.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use devlend_memory::{BusAddr, MemSpan, SharedMemory};
use devlend_pci::{DmaAccess, DmaError, DmaPort, DmaSpanResult};
use devlend_sync::lock;

use crate::error::NvmeError;
use crate::regs::{
    CMBLOC_BIR_MASK, CMBLOC_CDPCILS, CMBLOC_CDPMLS, CMBLOC_CQMMS, CMBMSC_CBA_MASK, CMBMSC_CMSE,
    CMBMSC_CRE, CMBMSC_WRITABLE, CMBSTS_CBAI, CMBSZ_LISTS, CMBSZ_RDS, CMBSZ_SQS, CMBSZ_SZU_SHIFT,
    CMBSZ_SZ_SHIFT, CMBSZ_WDS, CMB_SZU, CMB_UNIT_BYTES,
};

/// The BAR holding the CMB (64-bit, prefetchable, at offset 0), as QEMU's NVMe places it.
pub const CMB_BAR: u8 = 2;
/// Smallest CMB: one size unit (64 KiB).
pub const CMB_MIN_BYTES: u64 = CMB_UNIT_BYTES;
/// Largest CMB this model offers (1 GiB).
pub const CMB_MAX_BYTES: u64 = 1 << 30;

/// Checks a CMB size: a power of two from [`CMB_MIN_BYTES`] to [`CMB_MAX_BYTES`] (the BAR is
/// exactly the buffer, and BAR sizes are powers of two).
pub fn check_size(bytes: u64) -> Result<(), NvmeError> {
    if !bytes.is_power_of_two() || !(CMB_MIN_BYTES..=CMB_MAX_BYTES).contains(&bytes) {
        return Err(NvmeError::InvalidConfig(
            "the CMB size must be a power of two from 64 KiB to 1 GiB",
        ));
    }
    Ok(())
}

/// Register state (under the buffer's lock).
#[derive(Debug, Default)]
struct CmbRegs {
    msc: u64,
    sts: u32,
}

/// The buffer, its registers and its address decoder.
pub(crate) struct Cmb {
    mem: MemSpan,
    len: u64,
    regs: Mutex<CmbRegs>,
    /// `CBA | 1` while the buffer is mapped at CBA (CRE, CMSE and a valid base), else 0: one
    /// atomic load per DMA on the command path.
    decode: AtomicU64,
}

impl std::fmt::Debug for Cmb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmb").field("len", &self.len).finish()
    }
}

/// Where a DMA access lands.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// Through the bus-master port.
    Host,
    /// At this offset of the buffer.
    Buffer(u64),
}

impl Cmb {
    /// A zeroed buffer of `len` bytes (checked with [`check_size`]).
    pub(crate) fn new(len: u64) -> Result<Cmb, NvmeError> {
        check_size(len)?;
        let bytes = usize::try_from(len).map_err(|_| NvmeError::InvalidConfig("CMB size"))?;
        let mem = SharedMemory::new("devlend-nvme-cmb", bytes)
            .map_err(|_| NvmeError::InvalidConfig("cannot allocate the CMB"))?;
        Ok(Cmb {
            mem: MemSpan::whole(Arc::new(mem)),
            len,
            regs: Mutex::new(CmbRegs::default()),
            decode: AtomicU64::new(0),
        })
    }

    /// Size in bytes (also the BAR's size).
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// CMBLOC as it reads with CRE set: BAR 2, offset 0; SQ and CQ may be in different
    /// memories, and a command's PRP lists and data may be anywhere (buffer or host).
    pub(crate) fn location(&self) -> u32 {
        (u32::from(CMB_BAR) & CMBLOC_BIR_MASK) | CMBLOC_CQMMS | CMBLOC_CDPMLS | CMBLOC_CDPCILS
    }

    /// CMBSZ as it reads with CRE set: submission queues, PRP lists, read and write data;
    /// completion queues stay in host memory (a driver polls them).
    pub(crate) fn size_register(&self) -> u32 {
        let units = (self.len / CMB_UNIT_BYTES) as u32;
        CMBSZ_SQS
            | CMBSZ_LISTS
            | CMBSZ_RDS
            | CMBSZ_WDS
            | (CMB_SZU << CMBSZ_SZU_SHIFT)
            | (units << CMBSZ_SZ_SHIFT)
    }

    /// Reads the dword of a CMB register (`REG_CMBLOC`, `REG_CMBSZ`, CMBMSC's two halves,
    /// `REG_CMBSTS`); `None` for any other offset.
    pub(crate) fn read_reg32(&self, offset: u64) -> Option<u32> {
        use crate::regs::{REG_CMBLOC, REG_CMBMSC, REG_CMBSTS, REG_CMBSZ};
        let regs = lock(&self.regs);
        let cre = regs.msc & CMBMSC_CRE != 0;
        Some(match offset {
            REG_CMBLOC if cre => self.location(),
            REG_CMBLOC => 0,
            REG_CMBSZ if cre => self.size_register(),
            REG_CMBSZ => 0,
            REG_CMBMSC => regs.msc as u32,
            o if o == REG_CMBMSC + 4 => (regs.msc >> 32) as u32,
            REG_CMBSTS => regs.sts,
            _ => return None,
        })
    }

    /// Writes the dword of a CMB register; returns whether `offset` is one (CMBLOC, CMBSZ and
    /// CMBSTS are read-only). Either half of CMBMSC re-evaluates the enable with the whole
    /// register, so a driver may write it as two dwords in any order (Linux writes the high
    /// half first).
    pub(crate) fn write_reg32(&self, offset: u64, v: u32) -> bool {
        use crate::regs::{REG_CMBLOC, REG_CMBMSC, REG_CMBSTS, REG_CMBSZ};
        let mut regs = lock(&self.regs);
        let msc = match offset {
            REG_CMBMSC => (regs.msc & !0xffff_ffff) | u64::from(v),
            o if o == REG_CMBMSC + 4 => (regs.msc & 0xffff_ffff) | (u64::from(v) << 32),
            REG_CMBLOC | REG_CMBSZ | REG_CMBSTS => return true,
            _ => return false,
        };
        regs.msc = msc & CMBMSC_WRITABLE;
        let enable = regs.msc & CMBMSC_CRE != 0 && regs.msc & CMBMSC_CMSE != 0;
        let cba = regs.msc & CMBMSC_CBA_MASK;
        if !enable {
            regs.sts &= !CMBSTS_CBAI;
            self.decode.store(0, Ordering::Release);
        } else if self.base_is_valid(cba) {
            regs.sts &= !CMBSTS_CBAI;
            if self.decode.swap(cba | 1, Ordering::AcqRel) != cba | 1 {
                tracing::info!("nvme: CMB mapped at {cba:#x} ({} bytes)", self.len);
            }
        } else {
            tracing::warn!(
                cba,
                "nvme: CMBMSC.CMSE with an invalid base, CMBSTS.CBAI set"
            );
            regs.sts |= CMBSTS_CBAI;
            self.decode.store(0, Ordering::Release);
        }
        true
    }

    /// A base is valid when it is a multiple of the size unit and the buffer's range from it
    /// does not wrap.
    fn base_is_valid(&self, cba: u64) -> bool {
        cba.is_multiple_of(CMB_UNIT_BYTES) && cba.checked_add(self.len).is_some()
    }

    /// Function level reset: CMBMSC and CMBSTS to zero, the buffer unmapped (its contents
    /// stay, as a memory's do).
    pub(crate) fn reset(&self) {
        *lock(&self.regs) = CmbRegs::default();
        self.decode.store(0, Ordering::Release);
    }

    /// The bus address range the buffer answers now, if mapped.
    pub(crate) fn mapped_at(&self) -> Option<u64> {
        let d = self.decode.load(Ordering::Acquire);
        (d & 1 != 0).then_some(d & !1)
    }

    /// Where `[addr, addr + len)` lands; an access that wraps or is partly in the buffer fails.
    fn route(&self, addr: BusAddr, len: u64) -> Result<Route, DmaError> {
        let Some(base) = self.mapped_at() else {
            return Ok(Route::Host);
        };
        let unmapped = DmaError::Unmapped { addr, len };
        let end = addr
            .0
            .checked_add(len)
            .ok_or(DmaError::Unmapped { addr, len })?;
        let cmb_end = base + self.len; // checked when the base was accepted
        if end <= base || addr.0 >= cmb_end {
            return Ok(Route::Host);
        }
        if addr.0 >= base && end <= cmb_end {
            return Ok(Route::Buffer(addr.0 - base));
        }
        Err(unmapped)
    }

    /// Whether `[addr, addr + len)` touches the mapped buffer at all.
    pub(crate) fn overlaps(&self, addr: u64, len: u64) -> bool {
        !matches!(self.route(BusAddr(addr), len), Ok(Route::Host))
    }

    /// The host's read of the BAR: plain memory; outside the buffer reads all-ones.
    pub(crate) fn bar_read(&self, offset: u64, data: &mut [u8]) {
        let inside = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.len);
        if !inside || self.mem.read_at(offset, data).is_err() {
            data.fill(0xff);
        }
    }

    /// The host's write to the BAR: plain memory; outside the buffer is dropped.
    pub(crate) fn bar_write(&self, offset: u64, data: &[u8]) {
        let inside = offset
            .checked_add(data.len() as u64)
            .is_some_and(|end| end <= self.len);
        if inside {
            let _ = self.mem.write_at(offset, data);
        }
    }
}

/// The device's bus-master port with the CMB decoded in front of it (see the module docs).
pub(crate) struct CmbPort {
    pub(crate) cmb: Arc<Cmb>,
    pub(crate) port: Arc<dyn DmaPort>,
}

impl DmaPort for CmbPort {
    fn dma_read(&self, addr: BusAddr, buf: &mut [u8]) -> Result<(), DmaError> {
        match self.cmb.route(addr, buf.len() as u64)? {
            Route::Host => self.port.dma_read(addr, buf),
            Route::Buffer(at) => self
                .cmb
                .mem
                .read_at(at, buf)
                .map_err(|_| DmaError::Unmapped {
                    addr,
                    len: buf.len() as u64,
                }),
        }
    }

    fn dma_read_many(&self, reads: &mut [(BusAddr, &mut [u8])]) -> Result<(), DmaError> {
        // Reads of the buffer are local; the others go to the host together.
        let mut host = Vec::with_capacity(reads.len());
        for (addr, buf) in reads.iter_mut() {
            match self.cmb.route(*addr, buf.len() as u64)? {
                Route::Host => host.push((*addr, &mut **buf)),
                Route::Buffer(_) => self.dma_read(*addr, buf)?,
            }
        }
        self.port.dma_read_many(&mut host)
    }

    fn dma_write(&self, addr: BusAddr, data: &[u8]) -> Result<(), DmaError> {
        match self.cmb.route(addr, data.len() as u64)? {
            Route::Host => self.port.dma_write(addr, data),
            Route::Buffer(at) => self
                .cmb
                .mem
                .write_at(at, data)
                .map_err(|_| DmaError::Unmapped {
                    addr,
                    len: data.len() as u64,
                }),
        }
    }

    fn dma_span(&self, addr: BusAddr, len: u64, access: DmaAccess) -> DmaSpanResult {
        match self.cmb.route(addr, len)? {
            Route::Host => self.port.dma_span(addr, len, access),
            Route::Buffer(at) => self
                .cmb
                .mem
                .subspan(at, len)
                .map(Some)
                .map_err(|_| DmaError::Unmapped { addr, len }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::regs::{REG_CMBLOC, REG_CMBMSC, REG_CMBSTS, REG_CMBSZ};

    struct NoHost;
    impl DmaPort for NoHost {
        fn dma_read(&self, addr: BusAddr, buf: &mut [u8]) -> Result<(), DmaError> {
            buf.fill(0xee);
            let _ = addr;
            Ok(())
        }
        fn dma_write(&self, addr: BusAddr, data: &[u8]) -> Result<(), DmaError> {
            Err(DmaError::Unmapped {
                addr,
                len: data.len() as u64,
            })
        }
        fn dma_span(&self, _: BusAddr, _: u64, _: DmaAccess) -> DmaSpanResult {
            Ok(None)
        }
    }

    fn enable(c: &Cmb, cba: u64) {
        c.write_reg32(REG_CMBMSC + 4, (cba >> 32) as u32);
        c.write_reg32(REG_CMBMSC, (cba as u32) | 0b11);
    }

    #[test]
    fn sizes() {
        assert!(check_size(64 << 10).is_ok());
        assert!(check_size(1 << 30).is_ok());
        assert!(check_size(32 << 10).is_err());
        assert!(check_size(3 << 20).is_err());
        assert!(check_size(2 << 30).is_err());
    }

    #[test]
    fn registers_read_zero_until_cre() {
        let c = Cmb::new(1 << 20).unwrap();
        assert_eq!(c.read_reg32(REG_CMBLOC), Some(0));
        assert_eq!(c.read_reg32(REG_CMBSZ), Some(0));
        c.write_reg32(REG_CMBMSC, CMBMSC_CRE as u32);
        assert_eq!(c.read_reg32(REG_CMBLOC).unwrap() & CMBLOC_BIR_MASK, 2);
        let sz = c.read_reg32(REG_CMBSZ).unwrap();
        assert_eq!(sz >> CMBSZ_SZ_SHIFT, 16); // 16 units of 64 KiB
        assert_eq!((sz >> CMBSZ_SZU_SHIFT) & 0xf, 1);
        assert_eq!(c.mapped_at(), None);
    }

    #[test]
    fn routes_inside_outside_and_straddling() {
        let c = Arc::new(Cmb::new(64 << 10).unwrap());
        let p = CmbPort {
            cmb: c.clone(),
            port: Arc::new(NoHost),
        };
        enable(&c, 0x4_0000_0000);
        assert_eq!(c.read_reg32(REG_CMBSTS), Some(0));
        p.dma_write(BusAddr(0x4_0000_1000), b"abcd").unwrap();
        let mut b = [0u8; 4];
        c.bar_read(0x1000, &mut b);
        assert_eq!(&b, b"abcd");
        // Straddling the end or the start fails, and writes nothing.
        assert!(p.dma_write(BusAddr(0x4_0000_fffe), b"xyzw").is_err());
        assert!(p.dma_read(BusAddr(0x3_ffff_fffe), &mut b).is_err());
        c.bar_read(0xfffc, &mut b);
        assert_eq!(b, [0; 4]);
        // Outside goes to the host port.
        p.dma_read(BusAddr(0x4_0001_0000), &mut b).unwrap();
        assert_eq!(b, [0xee; 4]);
        assert!(p
            .dma_span(BusAddr(0x4_0000_0000), 4096, DmaAccess::Read)
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_batch_of_reads_is_split_between_the_buffer_and_the_host() {
        let c = Arc::new(Cmb::new(64 << 10).unwrap());
        let p = CmbPort {
            cmb: c.clone(),
            port: Arc::new(NoHost),
        };
        enable(&c, 0x4_0000_0000);
        c.bar_write(0x2000, b"cmb!");
        let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
        let mut reads = [
            (BusAddr(0x4_0001_0000), &mut a[..]),
            (BusAddr(0x4_0000_2000), &mut b[..]),
        ];
        p.dma_read_many(&mut reads).unwrap();
        assert_eq!((a, &b), ([0xee; 4], b"cmb!"));
        // A read straddling the buffer's end fails the batch.
        let (mut a, mut b) = ([0u8; 4], [0u8; 4]);
        let mut reads = [
            (BusAddr(0x4_0000_2000), &mut a[..]),
            (BusAddr(0x4_0000_fffe), &mut b[..]),
        ];
        assert!(p.dma_read_many(&mut reads).is_err());
    }

    #[test]
    fn unaligned_or_wrapping_base_sets_cbai() {
        let c = Cmb::new(64 << 10).unwrap();
        enable(&c, 0x4_0000_1000);
        assert_eq!(c.read_reg32(REG_CMBSTS), Some(CMBSTS_CBAI));
        assert_eq!(c.mapped_at(), None);
        enable(&c, 0xffff_ffff_fffe_0000);
        assert_eq!(c.mapped_at(), Some(0xffff_ffff_fffe_0000));
        enable(&c, 0xffff_ffff_ffff_0000);
        assert_eq!(c.read_reg32(REG_CMBSTS), Some(CMBSTS_CBAI));
        let c = Cmb::new(1 << 20).unwrap();
        enable(&c, 0xffff_ffff_fff1_0000);
        assert_eq!(c.read_reg32(REG_CMBSTS), Some(CMBSTS_CBAI));
        enable(&c, 0x1_0000_0000);
        assert_eq!(c.read_reg32(REG_CMBSTS), Some(0));
        assert_eq!(c.mapped_at(), Some(0x1_0000_0000));
        c.reset();
        assert_eq!(c.read_reg32(REG_CMBMSC), Some(0));
        assert_eq!(c.mapped_at(), None);
    }
}
