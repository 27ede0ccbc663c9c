//! A thread-free harness for fuzzing the controller core: arbitrary submission queue entries,
//! doorbell values and host memory (PRP lists, DSM ranges) processed synchronously.
//!
//! Not part of the model's API (hidden from the docs); used by `crates/nvme/fuzz`.

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use devlend_memory::{BusAddr, MemSpan, SharedMemory};
use devlend_pci::{DmaAccess, DmaError, DmaPort, DmaSpanResult};

use crate::config::NvmeConfig;
use crate::controller::{AdminQueueRegs, Controller};
use crate::error::NvmeError;
use crate::queues::DoorbellArray;
use crate::regs::{ControllerConfig, CC_EN, CC_IOCQES_SHIFT, CC_IOSQES_SHIFT};

/// Bus address of the harness's host memory.
pub const HOST_BASE: u64 = 0x10_0000;
/// Size of the harness's host memory.
pub const HOST_LEN: usize = 256 * 1024;
const ADMIN_SQ: u64 = 0;
const ADMIN_CQ: u64 = 0x1000;
const IO_SQ: u64 = 0x2000;
const IO_CQ: u64 = 0x3000;
const ENTRIES: u32 = 16;

struct Port {
    mem: Arc<SharedMemory>,
}

impl Port {
    fn offset(&self, addr: BusAddr, len: u64) -> Result<u64, DmaError> {
        let unmapped = DmaError::Unmapped { addr, len };
        let off = addr
            .0
            .checked_sub(HOST_BASE)
            .ok_or(DmaError::Unmapped { addr, len })?;
        match off.checked_add(len) {
            Some(end) if end <= HOST_LEN as u64 => Ok(off),
            _ => Err(unmapped),
        }
    }
}

impl DmaPort for Port {
    fn dma_read(&self, addr: BusAddr, buf: &mut [u8]) -> Result<(), DmaError> {
        let off = self.offset(addr, buf.len() as u64)?;
        Ok(self.mem.read_at(off, buf)?)
    }
    fn dma_write(&self, addr: BusAddr, data: &[u8]) -> Result<(), DmaError> {
        let off = self.offset(addr, data.len() as u64)?;
        Ok(self.mem.write_at(off, data)?)
    }
    fn dma_span(&self, addr: BusAddr, len: u64, _access: DmaAccess) -> DmaSpanResult {
        let off = self.offset(addr, len)?;
        // Alternate between the zero-copy and bounce paths by address bit 12.
        if addr.0 & 0x1000 != 0 {
            return Ok(None);
        }
        Ok(Some(MemSpan::new(self.mem.clone(), off, len)?))
    }
}

/// A controller, enabled, with one I/O queue pair, over 256 KiB of host memory.
pub struct FuzzController {
    core: Controller,
    mem: Arc<SharedMemory>,
    doorbells: Arc<DoorbellArray>,
    tails: [u32; 2],
}

impl FuzzController {
    /// Builds the controller on a (small) image at `image`, created if missing.
    pub fn new(image: &Path) -> Result<FuzzController, NvmeError> {
        let mut cfg = NvmeConfig::new(image);
        cfg.create_size = Some(64 * 1024);
        cfg.max_io_queue_pairs = 2;
        cfg.mdts = 3;
        let mem = Arc::new(
            SharedMemory::new("nvme-fuzz", HOST_LEN)
                .map_err(|_| NvmeError::InvalidConfig("fuzz memory"))?,
        );
        let doorbells = Arc::new(
            DoorbellArray::new(6).map_err(|_| NvmeError::InvalidConfig("fuzz doorbells"))?,
        );
        // A 64 KiB CMB mapped right after host memory: fuzzed queue and PRP addresses meet
        // its decoder (inside, outside, straddling) too.
        let cmb = Arc::new(crate::cmb::Cmb::new(crate::cmb::CMB_MIN_BYTES)?);
        let cba =
            (HOST_BASE + HOST_LEN as u64) | crate::regs::CMBMSC_CMSE | crate::regs::CMBMSC_CRE;
        cmb.write_reg32(crate::regs::REG_CMBMSC, cba as u32);
        let port = crate::cmb::CmbPort {
            cmb: cmb.clone(),
            port: Arc::new(Port { mem: mem.clone() }),
        };
        let mut core = Controller::new(
            &cfg,
            Arc::new(port),
            doorbells.clone(),
            Arc::new(AtomicU32::new(0)),
            0,
            // A primary controller, so that Virtualization Management and the
            // virtualization Identify pages are fuzzed too.
            crate::virt::Role::Primary(Arc::new(crate::virt::Virtualization::new(
                crate::virt::SriovConfig {
                    total_vfs: 4,
                    namespaces: crate::virt::VfNamespaces::Shared,
                },
                2,
                2,
            ))),
        )?;
        core.cmb = Some(cmb);
        Ok(FuzzController {
            core,
            mem,
            doorbells,
            tails: [0; 2],
        })
    }

    fn ring(&mut self, q: usize, bytes: &[u8; 64]) {
        let (base, tail) = match q {
            0 => (ADMIN_SQ, &mut self.tails[0]),
            _ => (IO_SQ, &mut self.tails[1]),
        };
        let _ = self.mem.write_at(base + u64::from(*tail) * 64, bytes);
        *tail = (*tail + 1) % ENTRIES;
        if let Some(d) = self.doorbells.get(2 * q) {
            d.store(*tail, Ordering::SeqCst);
        }
    }

    /// The controller core (unit tests drive it directly).
    #[cfg(test)]
    pub(crate) fn core(&mut self) -> &mut Controller {
        &mut self.core
    }

    /// Consumes every posted completion (moves the CQ head doorbells to the tails).
    #[cfg(test)]
    pub(crate) fn consume(&mut self) {
        self.consume_all();
        for q in 0..2 {
            self.core.refresh_cq_head(q);
        }
    }

    fn consume_all(&mut self) {
        for q in 0..2usize {
            let tail = self
                .core
                .cqs
                .get(q)
                .and_then(Option::as_ref)
                .map_or(0, |c| c.tail);
            if let Some(d) = self.doorbells.get(2 * q + 1) {
                d.store(tail, Ordering::SeqCst);
            }
        }
    }

    /// Resets and enables the controller, creates I/O queue pair 1, loads `memory` into host
    /// memory after the queues, then runs each 65-byte chunk of `script`: a selector byte
    /// (bit 0: admin or I/O queue; bit 1: skip consuming completions; bits 2-7 with bit 1 set:
    /// a raw doorbell value instead) and a 64-byte entry.
    pub fn run(&mut self, memory: &[u8], script: &[u8]) {
        let _ = self.mem.fill(0, HOST_LEN, 0);
        let room = HOST_LEN - 0x4000;
        let _ = self
            .mem
            .write_at(0x4000, memory.get(..room).unwrap_or(memory));
        self.tails = [0; 2];
        self.core.disable();
        self.core.enable(AdminQueueRegs {
            cc: ControllerConfig {
                raw: CC_EN | (6 << CC_IOSQES_SHIFT) | (4 << CC_IOCQES_SHIFT),
            },
            aqa: ((ENTRIES - 1) << 16) | (ENTRIES - 1),
            asq: HOST_BASE + ADMIN_SQ,
            acq: HOST_BASE + ADMIN_CQ,
        });
        let create = |opcode: u8, base: u64, cdw11: u32| {
            let c = crate::Command {
                opcode,
                prp1: HOST_BASE + base,
                cdw: [((ENTRIES - 1) << 16) | 1, cdw11, 0, 0, 0, 0],
                ..crate::Command::default()
            };
            c.to_bytes()
        };
        self.ring(0, &create(0x05, IO_CQ, (1 << 16) | 0b11));
        self.ring(0, &create(0x01, IO_SQ, (1 << 16) | 1));
        self.core.poll();
        self.consume_all();
        for chunk in script.chunks_exact(65) {
            let Some((&sel, entry)) = chunk.split_first() else {
                break;
            };
            let Ok(entry) = <[u8; 64]>::try_from(entry) else {
                break;
            };
            let q = usize::from(sel & 1);
            if sel & 2 != 0 && sel >> 2 != 0 {
                // A raw doorbell write (possibly invalid, possibly to a missing queue).
                let slot = usize::from(sel >> 2) % 6;
                if let Some(d) = self.doorbells.get(slot) {
                    d.store(u32::from(entry[0]), Ordering::SeqCst);
                }
            } else {
                self.ring(q, &entry);
            }
            self.core.poll();
            let mut fired = Vec::new();
            self.core.take_interrupts(&mut fired);
            if sel & 2 == 0 {
                self.consume_all();
            }
            if self.core.has_work() {
                self.core.poll();
            }
            self.core.prepare_sleep();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::nvm_opcode;

    #[test]
    fn scripted_commands_run() {
        let path =
            std::env::temp_dir().join(format!("devlend-nvme-fuzz-{}.img", std::process::id()));
        let mut f = FuzzController::new(&path).unwrap();
        let mut script = Vec::new();
        let write = crate::Command {
            opcode: nvm_opcode::WRITE,
            nsid: 1,
            prp1: HOST_BASE + 0x4000,
            cdw: [0, 0, 7, 0, 0, 0],
            ..crate::Command::default()
        };
        script.push(1u8);
        script.extend_from_slice(&write.to_bytes());
        script.push(0u8);
        script.extend_from_slice(&[0xffu8; 64]);
        script.push(0b1010_0110);
        script.extend_from_slice(&[200u8; 64]);
        f.run(&[0xab; 4096], &script);
        let img = std::fs::read(&path).unwrap();
        assert_eq!(&img[..4096], &[0xab; 4096][..]);
        assert_eq!(f.core.errors.count, 1, "the 0xff admin entry failed");
        let _ = std::fs::remove_file(&path);
    }
}
