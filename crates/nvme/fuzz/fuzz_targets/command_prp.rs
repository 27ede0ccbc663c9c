//! Arbitrary submission queue entries and PRP lists: the command parsers must classify every
//! entry, and the PRP walker must either fail with a status or return segments that exactly
//! cover the transfer, with every entry after the first starting a page.
#![no_main]

use devlend_memory::BusAddr;
use devlend_nvme::prp::{self, PrpListReader, Segment};
use devlend_nvme::{AdminOp, Command, NvmOp};
use devlend_pci::DmaError;
use libfuzzer_sys::fuzz_target;

/// Host memory holding PRP lists: the fuzz input after the entry, at bus address `BASE`.
struct Lists<'a> {
    bytes: &'a [u8],
}

const BASE: u64 = 0x10_0000;

impl PrpListReader for Lists<'_> {
    fn read_entries(&self, addr: BusAddr, out: &mut [u64]) -> Result<(), DmaError> {
        let len = out.len() as u64 * 8;
        let unmapped = DmaError::Unmapped { addr, len };
        let start = addr
            .0
            .checked_sub(BASE)
            .ok_or(DmaError::Unmapped { addr, len })?;
        let end = start
            .checked_add(len)
            .ok_or(DmaError::Unmapped { addr, len })?;
        let src = self
            .bytes
            .get(start as usize..end as usize)
            .ok_or(unmapped)?;
        for (e, c) in out.iter_mut().zip(src.chunks_exact(8)) {
            *e = u64::from_le_bytes(c.try_into().unwrap_or([0; 8]));
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 66 {
        return;
    }
    let (head, rest) = data.split_at(64);
    let entry: [u8; 64] = head.try_into().unwrap_or([0; 64]);
    let (knobs, lists) = rest.split_at(2);

    let cmd = Command::parse(&entry);
    assert_eq!(Command::parse(&cmd.to_bytes()), cmd);
    let _ = AdminOp::parse(&cmd);
    let _ = NvmOp::parse(&cmd);

    // Page size 4 KiB to 64 KiB; transfer up to 2 MiB (an MDTS bound), from the command's NLB.
    let page_size = 4096u64 << (knobs[0] % 5);
    let len = (u64::from(cmd.cdw[2] & 0xffff) + 1) * 512 % (2 << 20) + u64::from(knobs[1]);
    // Aim the PRPs at the list memory half of the time so lists are actually walked.
    let (prp1, prp2) = if knobs[1] & 1 == 0 {
        (cmd.prp1, cmd.prp2)
    } else {
        (
            cmd.prp1 & 0xfff_fffc,
            BASE + (cmd.prp2 % (lists.len() as u64 + 8)),
        )
    };
    let mut segs: Vec<Segment> = Vec::new();
    let reader = Lists { bytes: lists };
    match prp::walk(&reader, prp1, prp2, len, page_size, &mut segs) {
        Ok(()) => {
            let total: u64 = segs.iter().map(|s| s.len).sum();
            assert_eq!(total, len, "segments cover the transfer");
            for s in segs.iter().skip(1) {
                assert_eq!(s.addr.0 % page_size, 0, "later segments start a page");
            }
            if let Some(first) = segs.first() {
                assert_eq!(first.addr.0, prp1);
            }
        }
        Err(e) => {
            let _ = e.status();
        }
    }
});
