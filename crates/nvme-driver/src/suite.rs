//! The driver's acceptance suite, runnable against any function that presents an NVMe
//! controller: the local binding in this crate's tests, a borrowed function in the lending
//! tests. Same cases, same assertions; the function's implementation is invisible to them.
//!
//! Each case brings up its own controller(s) from [`Target::make`] and writes the data it later
//! reads back, so it needs no particular image contents; cases are meant to run one after
//! another on one device (they may also run in parallel on separate devices).
//!
//! ```no_run
//! # fn borrow() -> std::sync::Arc<dyn devlend_pci::PciFunction> { unimplemented!() }
//! use devlend_nvme_driver::suite::{self, Target};
//! let fun = borrow(); // a local or a borrowed function presenting the NVMe model
//! let target = Target {
//!     make: Box::new(move || fun.clone()),
//!     image: None, // or Some(path) when this process can read the backing image
//! };
//! suite::run_all(&target).expect("the driver works on this function");
//! // Or one case at a time (one #[test] each): for (name, case) in suite::CASES { .. }
//! ```

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use devlend_pci::{
    AccessSize, BarAccess, BarIndex, BusAddr, ConfigAccess, DmaAlloc, DmaBuffer, DmaRemap,
    FunctionError, Interrupts, MemSpan, PciFunction,
};
use vmm_sys_util::eventfd::EventFd;

use crate::controller::{Controller, DriverConfig, IoRequest};
use crate::error::NvmeError;
use crate::queue::{CompletionMode, DmaSlice};
use crate::workload::{self, Limit, Pattern, Workload};

/// What the suite runs against.
pub struct Target {
    /// Returns the function to drive (a fresh one, or the same one again; each call's result
    /// is used by one controller at a time).
    pub make: Box<dyn Fn() -> Arc<dyn PciFunction> + Send + Sync>,
    /// The image file behind the namespace, when this process can read it: the flush case
    /// then checks that flushed bytes are in the file.
    pub image: Option<PathBuf>,
}

/// Why a case failed.
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    /// The driver returned an error.
    #[error("{case}: {step}: {source}")]
    Driver {
        /// Case name.
        case: &'static str,
        /// What the case was doing.
        step: String,
        /// The driver's error.
        #[source]
        source: NvmeError,
    },
    /// Something came back other than expected.
    #[error("{case}: {detail}")]
    Check {
        /// Case name.
        case: &'static str,
        /// What differed.
        detail: String,
    },
}

/// A suite case.
pub type Case = fn(&Target) -> Result<(), SuiteError>;

/// Every case, by name, in the order [`run_all`] runs them.
pub const CASES: &[(&str, Case)] = &[
    ("init_identify", init_identify),
    ("write_read_sizes", write_read_sizes),
    ("prp_list_chain", prp_list_chain),
    ("mdts_split", mdts_split),
    ("flush_persists", flush_persists),
    ("queues_in_parallel", queues_in_parallel),
    ("interrupt_mode", interrupt_mode),
    ("polling_mode", polling_mode),
    ("out_of_range", out_of_range),
    ("reinit_after_reset", reinit_after_reset),
    ("shutdown", shutdown),
    ("workload_runs", workload_runs),
    ("removal_errors", removal_errors),
    ("removal_all_ones", removal_all_ones),
    ("cmb_submission_queues", cmb_submission_queues),
];

/// Runs every case in order; stops at the first failure.
pub fn run_all(target: &Target) -> Result<(), SuiteError> {
    for (name, case) in CASES {
        tracing::info!(case = name, "nvme driver suite");
        case(target)?;
    }
    Ok(())
}

struct Ctx {
    case: &'static str,
}

impl Ctx {
    fn step<T>(&self, step: impl Into<String>, r: Result<T, NvmeError>) -> Result<T, SuiteError> {
        r.map_err(|source| SuiteError::Driver {
            case: self.case,
            step: step.into(),
            source,
        })
    }

    fn check(&self, ok: bool, detail: impl FnOnce() -> String) -> Result<(), SuiteError> {
        if ok {
            Ok(())
        } else {
            Err(SuiteError::Check {
                case: self.case,
                detail: detail(),
            })
        }
    }

    fn bring_up(&self, t: &Target, config: DriverConfig) -> Result<Controller, SuiteError> {
        self.step("bring-up", Controller::with_config((t.make)(), config))
    }

    /// Writes a pattern at `offset`, reads it back and compares.
    fn round_trip(
        &self,
        c: &Controller,
        offset: u64,
        len: usize,
        seed: u8,
    ) -> Result<(), SuiteError> {
        let data = pattern(len, seed);
        self.step(
            format!("write {len} bytes at {offset:#x}"),
            c.write_at(offset, &data),
        )?;
        let mut back = vec![0u8; len];
        self.step(
            format!("read {len} bytes at {offset:#x}"),
            c.read_at(offset, &mut back),
        )?;
        self.same(&data, &back, offset)
    }

    fn same(&self, want: &[u8], got: &[u8], offset: u64) -> Result<(), SuiteError> {
        let first = want.iter().zip(got.iter()).position(|(a, b)| a != b);
        self.check(first.is_none() && want.len() == got.len(), || {
            format!(
                "data at {offset:#x} (+{:?}) of {} bytes differs from what was written",
                first,
                want.len()
            )
        })
    }
}

/// A byte pattern that differs per position and per seed (and is never all zeroes).
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(31)
                .wrapping_add(u32::from(seed) * 7 + (i >> 12) as u32) as u8
                | 1
        })
        .collect()
}

fn config(queues: u16, mode: CompletionMode) -> DriverConfig {
    DriverConfig {
        io_queues: queues,
        completion: mode,
        io_timeout: Duration::from_secs(20),
        ..DriverConfig::default()
    }
}

/// Bring-up and Identify: a namespace with sane geometry, queues created, MDTS honoured.
pub fn init_identify(t: &Target) -> Result<(), SuiteError> {
    let x = Ctx {
        case: "init_identify",
    };
    let c = x.bring_up(t, DriverConfig::default())?;
    let lba = c.lba_bytes();
    x.check(
        (512..=65536).contains(&lba) && lba.is_power_of_two(),
        || format!("LBA size {lba}"),
    )?;
    x.check(c.namespace().blocks > 0, || "empty namespace".into())?;
    x.check(c.nsid() >= 1, || format!("namespace id {}", c.nsid()))?;
    x.check(c.io_queue_count() >= 1, || "no I/O queue".into())?;
    let mt = c.max_transfer_bytes();
    x.check(mt >= u64::from(lba) && mt % u64::from(lba) == 0, || {
        format!("max transfer {mt} with {lba}-byte blocks")
    })?;
    if let Some(mdts) = c
        .identity()
        .max_transfer_bytes(c.capabilities().min_page_bytes)
    {
        x.check(mt <= mdts, || {
            format!("max transfer {mt} exceeds MDTS {mdts}")
        })?;
    }
    x.check(c.version() >= 0x0001_0000, || {
        format!("VS {:#x}", c.version())
    })?;
    x.step("shutdown", c.shutdown())
}

/// Writes and reads back at various sizes and offsets: one block, one page, two pages
/// (PRP2 as data), many pages (a PRP list), unaligned ends (read-modify-write).
pub fn write_read_sizes(t: &Target) -> Result<(), SuiteError> {
    let x = Ctx {
        case: "write_read_sizes",
    };
    let c = x.bring_up(t, DriverConfig::default())?;
    let lba = u64::from(c.lba_bytes());
    let cases: &[(u64, usize)] = &[
        (0, lba as usize),
        (lba, 4096),
        (8 * lba, 8192),
        (64 * lba, 12288),
        (128 * lba, 64 * 1024),
        (1024 * lba, 256 * 1024 + lba as usize),
    ];
    for (i, &(offset, len)) in cases.iter().enumerate() {
        x.round_trip(&c, offset, len, i as u8)?;
    }
    // Unaligned start and end: the neighbouring bytes must survive.
    let base = 4096 * lba;
    let around = pattern(4 * lba as usize, 99);
    x.step("write surroundings", c.write_at(base, &around))?;
    let inner = pattern(lba as usize + 100, 5);
    x.step("unaligned write", c.write_at(base + 10, &inner))?;
    let mut want = around.clone();
    if let Some(dst) = want.get_mut(10..10 + inner.len()) {
        dst.copy_from_slice(&inner);
    }
    let mut back = vec![0u8; want.len()];
    x.step("read surroundings", c.read_at(base, &mut back))?;
    x.same(&want, &back, base)?;
    let mut small = vec![0u8; 7];
    x.step("unaligned read", c.read_at(base + 12, &mut small))?;
    x.same(want.get(12..19).unwrap_or(&[]), &small, base + 12)?;
    // The last block of the namespace.
    let last = c.capacity_bytes() - lba;
    x.round_trip(&c, last, lba as usize, 42)?;
    x.step("shutdown", c.shutdown())
}

/// One command whose PRP list spans more than one list page (over 2 MiB with 4 KiB pages),
/// when MDTS allows; otherwise the largest single command MDTS allows. Also a transfer whose
/// first PRP entry has an offset into its page.
pub fn prp_list_chain(t: &Target) -> Result<(), SuiteError> {
    let x = Ctx {
        case: "prp_list_chain",
    };
    let cfg = DriverConfig {
        max_transfer_bytes: 4 << 20,
        ..config(1, CompletionMode::Interrupt)
    };
    let c = x.bring_up(t, cfg)?;
    let lba = c.lba_bytes() as usize;
    let len = (c.max_transfer_bytes() as usize).min(c.capacity_bytes() as usize / 2);
    let len = len - len % lba;
    let data = pattern(len, 77);
    // Through the queue-depth API: exactly one command, from a buffer offset by one block so
    // PRP1 starts inside a page whenever the LBA size is below 4 KiB.
    let head = if lba < 4096 { lba } else { 0 };
    let buf = x.step("alloc", c.alloc_dma(head + len))?;
    x.step("fill", buf.write_at(head, &data).map_err(NvmeError::from))?;
    let slice = x.step("slice", DmaSlice::new(buf.clone(), head, len))?;
    let blocks = (len / lba) as u32;
    let lba0 = 2048u64;
    {
        let mut q = x.step("queue", c.io_queue(0))?;
        x.step(
            "one large write",
            q.run_batch(vec![IoRequest::Write {
                lba: lba0,
                blocks,
                data: slice.clone(),
            }]),
        )?;
        x.step("clear", buf.fill(0).map_err(NvmeError::from))?;
        x.step(
            "one large read",
            q.run_batch(vec![IoRequest::Read {
                lba: lba0,
                blocks,
                data: slice,
            }]),
        )?;
    }
    let mut back = vec![0u8; len];
    x.step(
        "copy out",
        buf.read_at(head, &mut back).map_err(NvmeError::from),
    )?;
    x.same(&data, &back, lba0 * lba as u64)?;
    x.step("shutdown", c.shutdown())
}

/// A transfer larger than the per-command limit is split into several commands.
pub fn mdts_split(t: &Target) -> Result<(), SuiteError> {
    let x = Ctx { case: "mdts_split" };
    let cfg = DriverConfig {
        max_transfer_bytes: 8192,
        ..config(1, CompletionMode::Interrupt)
    };
    let c = x.bring_up(t, cfg)?;
    let lba = u64::from(c.lba_bytes());
    x.check(c.max_transfer_bytes() <= 8192.max(lba), || {
        format!(
            "max transfer {} despite a limit of 8192",
            c.max_transfer_bytes()
        )
    })?;
    x.round_trip(&c, 300 * lba, 200 * 1024 + 3 * lba as usize, 11)?;
    // A single command over the limit is refused by the driver, not sent.
    let buf = x.step("alloc", c.alloc_dma(64 * 1024))?;
    let mut q = x.step("queue", c.io_queue(0))?;
    let too_big = q.submit(
        IoRequest::Read {
            lba: 0,
            blocks: (64 * 1024 / lba) as u32,
            data: DmaSlice::whole(buf),
        },
        0,
    );
    x.check(matches!(too_big, Err(NvmeError::InvalidRequest(_))), || {
        format!("a command over the limit gave {too_big:?}")
    })?;
    drop(q);
    x.step("shutdown", c.shutdown())
}

/// Flush succeeds, and flushed bytes are in the image file when it is visible.
pub fn flush_persists(t: &Target) -> Result<(), SuiteError> {
    let x = Ctx {
        case: "flush_persists",
    };
    let c = x.bring_up(t, DriverConfig::default())?;
    let lba = u64::from(c.lba_bytes());
    let offset = 777 * lba;
    let data = pattern(3 * 4096, 123);
    x.step("write", c.write_at(offset, &data))?;
    x.step("flush", c.flush())?;
    if let Some(path) = &t.image {
        let file = std::fs::read(path).map_err(|e| SuiteError::Check {
            case: x.case,
            detail: format!("reading the image {}: {e}", path.display()),
        })?;
        let got = file
            .get(offset as usize..offset as usize + data.len())
            .unwrap_or(&[]);
        x.same(&data, got, offset)?;
    }
    x.step("shutdown", c.shutdown())
}

/// Several threads, each on its own queue (block API and queue-depth API), at once.
pub fn queues_in_parallel(t: &Target) -> Result<(), SuiteError> {
    let x = Ctx {
        case: "queues_in_parallel",
    };
    let c = x.bring_up(t, config(4, CompletionMode::Interrupt))?;
    let lba = u64::from(c.lba_bytes());
    let threads = 4usize;
    let results: Vec<Result<(), SuiteError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let c = &c;
                s.spawn(move || {
                    let x = Ctx {
                        case: "queues_in_parallel",
                    };
                    let base = (10_000 + i as u64 * 1000) * lba;
                    for round in 0..8u64 {
                        let offset = base + round * 16 * lba;
                        x.round_trip(
                            c,
                            offset,
                            4096 + (round as usize) * 512,
                            (i * 8) as u8 + round as u8,
                        )?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(SuiteError::Check {
                        case: "queues_in_parallel",
                        detail: "a worker thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    for r in results {
        r?;
    }
    // And the queue-depth API on every queue from its own thread.
    let n = c.io_queue_count();
    let stats: Vec<Result<workload::Summary, NvmeError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|q| {
                let c = &c;
                s.spawn(move || {
                    let mut w = Workload::new(Pattern::RandRead, 8, Limit::Ops(200));
                    w.queue = q;
                    workload::run(c, &w)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(NvmeError::InvalidRequest("worker panicked".into())))
            })
            .collect()
    });
    for s in stats {
        let s = x.step("parallel workload", s)?;
        x.check(s.ops == 200, || format!("{} ops instead of 200", s.ops))?;
    }
    x.step("shutdown", c.shutdown())
}

fn mode_case(t: &Target, case: &'static str, mode: CompletionMode) -> Result<(), SuiteError> {
    let x = Ctx { case };
    let c = x.bring_up(t, config(2, mode))?;
    let lba = u64::from(c.lba_bytes());
    x.check(c.config().completion == mode, || "mode not kept".into())?;
    for i in 0..16u64 {
        x.round_trip(&c, (20_000 + 8 * i) * lba, 4096, i as u8)?;
    }
    let mut w = Workload::new(Pattern::RandWrite, 16, Limit::Ops(300));
    w.region = Some((40_000 * lba, 512 * 4096));
    let s = x.step("workload at QD16", workload::run(&c, &w))?;
    x.check(s.ops == 300, || format!("{} ops", s.ops))?;
    x.step("shutdown", c.shutdown())
}

/// Completions by MSI-X interrupt.
pub fn interrupt_mode(t: &Target) -> Result<(), SuiteError> {
    mode_case(t, "interrupt_mode", CompletionMode::Interrupt)
}

/// Completions by polling the phase bit.
pub fn polling_mode(t: &Target) -> Result<(), SuiteError> {
    mode_case(t, "polling_mode", CompletionMode::Polling)
}

/// Requests past the namespace: the block API refuses them; the controller answers raw
/// commands with LBA Out of Range; the controller keeps working afterwards.
pub fn out_of_range(t: &Target) -> Result<(), SuiteError> {
    let x = Ctx {
        case: "out_of_range",
    };
    let c = x.bring_up(t, DriverConfig::default())?;
    let lba = u64::from(c.lba_bytes());
    let cap = c.capacity_bytes();
    let mut buf = vec![0u8; 512];
    let r = c.read_at(cap, &mut buf);
    x.check(matches!(r, Err(NvmeError::OutOfRange { .. })), || {
        format!("read at the end gave {r:?}")
    })?;
    let r = c.write_at(cap - 100, &[1u8; 200]);
    x.check(matches!(r, Err(NvmeError::OutOfRange { .. })), || {
        format!("write across the end gave {r:?}")
    })?;
    let r = c.read_at(u64::MAX - 10, &mut buf);
    x.check(matches!(r, Err(NvmeError::OutOfRange { .. })), || {
        format!("read at u64::MAX gave {r:?}")
    })?;
    let blocks = c.namespace().blocks;
    let dma = x.step("alloc", c.alloc_dma(2 * lba as usize))?;
    for (start, n) in [(blocks, 1u32), (blocks - 1, 2), (u64::MAX - 1, 1)] {
        let data = x.step(
            "slice",
            DmaSlice::new(dma.clone(), 0, n as usize * lba as usize),
        )?;
        let mut q = x.step("queue", c.io_queue(0))?;
        let r = q.run_batch(vec![IoRequest::Read {
            lba: start,
            blocks: n,
            data,
        }]);
        x.check(
            r.as_ref()
                .err()
                .and_then(NvmeError::status)
                .is_some_and(|s| s.is_lba_out_of_range()),
            || format!("raw read of {n} blocks at LBA {start} gave {r:?}"),
        )?;
    }
    x.round_trip(&c, 0, 4096, 3)?;
    x.step("shutdown", c.shutdown())
}

/// Data written before a controller reset, and before a shutdown and a fresh bring-up, reads
/// back after it.
pub fn reinit_after_reset(t: &Target) -> Result<(), SuiteError> {
    let x = Ctx {
        case: "reinit_after_reset",
    };
    let fun = (t.make)();
    let mut c = x.step("bring-up", Controller::new(fun.clone()))?;
    let lba = u64::from(c.lba_bytes());
    let offset = 5000 * lba;
    let data = pattern(8192, 200);
    x.step("write", c.write_at(offset, &data))?;
    x.step("flush", c.flush())?;
    // Leave commands outstanding (submitted, never reaped) across the reset: the reset must
    // neither hang nor let them corrupt the data read afterwards.
    {
        let junk = x.step("alloc", c.alloc_dma(4096))?;
        let mut q = x.step("queue", c.io_queue(0))?;
        for i in 0..8u64 {
            let data = DmaSlice::whole(junk.clone());
            let req = IoRequest::Read {
                lba: (offset + 65536) / lba + i * (4096 / lba),
                blocks: (4096 / lba) as u32,
                data,
            };
            x.step("submit without reaping", q.submit(req, i))?;
        }
    }
    x.step("reset", c.reset())?;
    let mut back = vec![0u8; data.len()];
    x.step("read after reset", c.read_at(offset, &mut back))?;
    x.same(&data, &back, offset)?;
    x.step("shutdown", c.shutdown())?;
    drop(c);
    let c = x.step("bring-up after shutdown", Controller::new(fun))?;
    let mut back = vec![0u8; data.len()];
    x.step("read after re-init", c.read_at(offset, &mut back))?;
    x.same(&data, &back, offset)?;
    x.round_trip(&c, offset + 8192, 4096, 201)?;
    x.step("shutdown", c.shutdown())
}

/// After shutdown, I/O is refused with a typed error instead of reaching the controller.
pub fn shutdown(t: &Target) -> Result<(), SuiteError> {
    let x = Ctx { case: "shutdown" };
    let c = x.bring_up(t, DriverConfig::default())?;
    x.round_trip(&c, 0, 4096, 9)?;
    x.step("shutdown", c.shutdown())?;
    x.step("second shutdown", c.shutdown())?;
    let mut b = [0u8; 16];
    let r = c.read_at(0, &mut b);
    x.check(matches!(r, Err(NvmeError::ShutDown)), || {
        format!("read after shutdown gave {r:?}")
    })?;
    Ok(())
}

/// The benchmark runner: random reads and writes at QD1 and QD8 complete every command.
pub fn workload_runs(t: &Target) -> Result<(), SuiteError> {
    let x = Ctx {
        case: "workload_runs",
    };
    let c = x.bring_up(t, DriverConfig::default())?;
    for pattern in [Pattern::RandWrite, Pattern::RandRead] {
        for qd in [1usize, 8] {
            let mut w = Workload::new(pattern, qd, Limit::Ops(256));
            w.region = Some((0, 1 << 20));
            let s = x.step(format!("{} qd{qd}", pattern.name()), workload::run(&c, &w))?;
            x.check(s.ops == 256 && s.bytes == 256 * 4096, || {
                format!(
                    "{} qd{qd}: {} ops, {} bytes",
                    pattern.name(),
                    s.ops,
                    s.bytes
                )
            })?;
            x.check(s.median_us <= s.p99_us && s.p99_us <= s.max_us, || {
                format!("latency percentiles out of order: {s:?}")
            })?;
        }
    }
    let mut w = Workload::new(
        Pattern::RandRead,
        4,
        Limit::Duration(Duration::from_millis(50)),
    );
    w.region = Some((0, 1 << 20));
    let s = x.step("timed run", workload::run(&c, &w))?;
    x.check(s.ops > 0, || "a timed run completed nothing".into())?;
    x.step("shutdown", c.shutdown())
}

/// How [`Vanishing`] behaves once pulled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VanishMode {
    /// Every call fails with [`FunctionError::Removed`] (what a lending layer reports).
    Removed,
    /// Reads return all-ones and writes are dropped; interrupts never fire (what a bus does
    /// when a device falls off it).
    AllOnes,
}

/// A function that works until [`Vanishing::pull`], then behaves as a removed device.
struct Vanishing {
    inner: Arc<dyn PciFunction>,
    pulled: std::sync::atomic::AtomicBool,
    mode: VanishMode,
}

impl Vanishing {
    fn pull(&self) {
        self.pulled.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn gone(&self) -> bool {
        self.pulled.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn removed(&self) -> FunctionError {
        FunctionError::Removed("test: device pulled".into())
    }
}

impl ConfigAccess for Vanishing {
    fn config_read(&self, offset: u16, size: AccessSize) -> Result<u32, FunctionError> {
        match (self.gone(), self.mode) {
            (false, _) => self.inner.config_read(offset, size),
            (true, VanishMode::Removed) => Err(self.removed()),
            (true, VanishMode::AllOnes) => Ok(u32::MAX),
        }
    }

    fn config_write(&self, offset: u16, size: AccessSize, value: u32) -> Result<(), FunctionError> {
        match (self.gone(), self.mode) {
            (false, _) => self.inner.config_write(offset, size, value),
            (true, VanishMode::Removed) => Err(self.removed()),
            (true, VanishMode::AllOnes) => Ok(()),
        }
    }
}

impl BarAccess for Vanishing {
    fn bar_read(&self, bar: BarIndex, offset: u64, data: &mut [u8]) -> Result<(), FunctionError> {
        match (self.gone(), self.mode) {
            (false, _) => self.inner.bar_read(bar, offset, data),
            (true, VanishMode::Removed) => Err(self.removed()),
            (true, VanishMode::AllOnes) => {
                data.fill(0xff);
                Ok(())
            }
        }
    }

    fn bar_write(&self, bar: BarIndex, offset: u64, data: &[u8]) -> Result<(), FunctionError> {
        match (self.gone(), self.mode) {
            (false, _) => self.inner.bar_write(bar, offset, data),
            (true, VanishMode::Removed) => Err(self.removed()),
            (true, VanishMode::AllOnes) => Ok(()),
        }
    }
}

impl DmaAlloc for Vanishing {
    fn dma_alloc(&self, len: usize) -> Result<DmaBuffer, FunctionError> {
        self.inner.dma_alloc(len)
    }
}

impl DmaRemap for Vanishing {
    fn dma_map(&self, iova: BusAddr, mem: MemSpan, writable: bool) -> Result<(), FunctionError> {
        self.inner.dma_map(iova, mem, writable)
    }

    fn dma_unmap(&self, iova: BusAddr, len: u64) -> Result<(), FunctionError> {
        self.inner.dma_unmap(iova, len)
    }
}

impl Interrupts for Vanishing {
    fn interrupt_vectors(&self) -> u16 {
        self.inner.interrupt_vectors()
    }

    fn wait_interrupt(&self, vector: u16, timeout: Duration) -> Result<bool, FunctionError> {
        match (self.gone(), self.mode) {
            (false, _) => self.inner.wait_interrupt(vector, timeout),
            (true, VanishMode::Removed) => Err(self.removed()),
            // A dead device never interrupts: the waiter's own deadline must end the wait.
            (true, VanishMode::AllOnes) => {
                std::thread::sleep(timeout);
                Ok(false)
            }
        }
    }

    fn set_interrupt_eventfd(
        &self,
        vector: u16,
        fd: Option<Arc<EventFd>>,
    ) -> Result<(), FunctionError> {
        self.inner.set_interrupt_eventfd(vector, fd)
    }
}

impl PciFunction for Vanishing {
    fn describe(&self) -> String {
        format!("vanishing {}", self.inner.describe())
    }
}

fn removal_case(t: &Target, case: &'static str, mode: VanishMode) -> Result<(), SuiteError> {
    let x = Ctx { case };
    let inner = (t.make)();
    for completion in [CompletionMode::Interrupt, CompletionMode::Polling] {
        let fun = Arc::new(Vanishing {
            inner: inner.clone(),
            pulled: false.into(),
            mode,
        });
        let c = x.step(
            "bring-up",
            Controller::with_config(fun.clone(), config(1, completion)),
        )?;
        x.round_trip(&c, 0, 4096, 1)?;
        fun.pull();
        let mut b = vec![0u8; 4096];
        let r = c.read_at(0, &mut b);
        x.check(matches!(r, Err(NvmeError::DeviceRemoved(_))), || {
            format!("{completion:?}: read after removal gave {r:?}")
        })?;
        let r = c.write_at(0, &b);
        x.check(r.is_err(), || {
            format!("{completion:?}: write after removal gave {r:?}")
        })?;
        let r = c.shutdown();
        x.check(matches!(r, Err(NvmeError::DeviceRemoved(_))), || {
            format!("{completion:?}: shutdown after removal gave {r:?}")
        })?;
        drop(c);
        let r = Controller::new(fun);
        x.check(matches!(r, Err(NvmeError::DeviceRemoved(_))), || {
            format!("{completion:?}: bring-up after removal gave {:?}", r.err())
        })?;
    }
    // The real function is unharmed: a fresh controller works.
    let c = x.step("bring-up on the real function", Controller::new(inner))?;
    x.round_trip(&c, 8192, 4096, 2)?;
    x.step("shutdown", c.shutdown())
}

/// A function that starts failing with `Removed` ends I/O, shutdown and bring-up with
/// [`NvmeError::DeviceRemoved`] instead of hanging.
pub fn removal_errors(t: &Target) -> Result<(), SuiteError> {
    removal_case(t, "removal_errors", VanishMode::Removed)
}

/// A device whose registers read all-ones (it fell off the bus) is detected as removed by the
/// bounded waits (CSTS all-ones), in interrupt and in polling mode.
pub fn removal_all_ones(t: &Target) -> Result<(), SuiteError> {
    removal_case(t, "removal_all_ones", VanishMode::AllOnes)
}

/// I/O submission queues in the controller memory buffer (SmartIO/libnvm's "remote queue":
/// the submission queue near the device, the completion queue near the driver). When the
/// controller offers a CMB for submission queues (`CMBSZ.SQS` once `CMBMSC.CRE` is set),
/// every I/O submission queue must be placed there; without one the driver keeps them in host
/// memory. Either way: writes and reads of one block to a multi-page PRP list on every queue,
/// in interrupt and polling mode, and again with [`DriverConfig::cmb_bulk`] (a 64 KiB write
/// pushes its data, and every command with a PRP list its list, into the CMB when the queue
/// has buffers there), the block API, and afterwards a bring-up without the option turns the
/// CMB off again.
pub fn cmb_submission_queues(t: &Target) -> Result<(), SuiteError> {
    let x = Ctx {
        case: "cmb_submission_queues",
    };
    let bar0 = BarIndex::new(0).ok_or_else(|| SuiteError::Check {
        case: x.case,
        detail: "BAR index 0".into(),
    })?;
    let mut offered = false;
    for (round, (mode, bulk)) in [
        (CompletionMode::Interrupt, false),
        (CompletionMode::Polling, false),
        (CompletionMode::Interrupt, true),
    ]
    .into_iter()
    .enumerate()
    {
        let cfg = DriverConfig {
            cmb_submission_queues: true,
            cmb_bulk: bulk,
            ..config(2, mode)
        };
        let c = x.bring_up(t, cfg)?;
        let cmbsz = if c.capabilities().cmb_space {
            x.step(
                "read CMBSZ",
                c.function()
                    .bar_read_u32(bar0, crate::regs::REG_CMBSZ)
                    .map_err(NvmeError::from),
            )?
        } else {
            0
        };
        offered = cmbsz & crate::regs::CMBSZ_SQS != 0;
        let (n, of) = (c.cmb_queue_count(), c.io_queue_count());
        x.check(of >= 1, || "no I/O queue".into())?;
        if offered {
            x.check(c.cmb().is_some() && n == of, || {
                format!(
                    "the controller offers a CMB for submission queues, yet {n} of {of} are \
                     there ({:?})",
                    c.cmb()
                )
            })?;
        } else {
            x.check(c.cmb().is_none() && n == 0, || {
                format!("no CMB offered, yet {n} queues placed in {:?}", c.cmb())
            })?;
        }
        let lba = c.lba_bytes() as usize;
        // The second half of the namespace, apart from the other cases' ranges.
        let base_block = c.capacity_bytes() / 2 / lba as u64;
        for q in 0..of {
            for (i, len) in [lba, 64 * 1024].into_iter().enumerate() {
                let seed = (round * 16 + q * 4 + i) as u8;
                let data = pattern(len, seed);
                let buf = x.step("alloc", c.alloc_dma(len))?;
                x.step("fill", buf.write_at(0, &data).map_err(NvmeError::from))?;
                let slice = x.step("slice", DmaSlice::new(buf.clone(), 0, len))?;
                let lba0 = base_block + (q * 1000 + i * 200) as u64;
                let blocks = (len / lba) as u32;
                let mut io = x.step("queue", c.io_queue(q))?;
                let pushed_before = io.cmb_writes();
                let lists_before = io.cmb_lists();
                let (bulk_bytes, lists) = (io.cmb_bulk_bytes(), io.cmb_has_lists());
                if offered && bulk {
                    x.check(bulk_bytes >= 64 * 1024 && lists, || {
                        format!(
                            "queue {q} has no bulk buffers ({bulk_bytes} bytes) or list pages \
                             ({lists}) in the CMB ({:?})",
                            c.cmb()
                        )
                    })?;
                } else {
                    x.check(bulk_bytes == 0 && !lists, || {
                        format!("queue {q} has bulk CMB buffers without cmb_bulk")
                    })?;
                }
                x.step(
                    format!("write {len} bytes on queue {q}"),
                    io.run_batch(vec![IoRequest::Write {
                        lba: lba0,
                        blocks,
                        data: slice.clone(),
                    }]),
                )?;
                // With write data buffers in the CMB, a write of up to 4 KiB pushes its data
                // there, and with bulk buffers one of up to a bulk buffer's size; a larger one
                // goes by PRPs to host memory.
                let pushed = io.cmb_writes() - pushed_before;
                let expect = u64::from(
                    c.cmb_write_queue_count() == of && len <= 4096 || len as u64 <= bulk_bytes,
                );
                x.check(pushed == expect, || {
                    format!(
                        "{len}-byte write on queue {q}: {pushed} pushed into the CMB, not {expect}"
                    )
                })?;
                x.step("clear", buf.fill(0).map_err(NvmeError::from))?;
                x.step(
                    format!("read {len} bytes on queue {q}"),
                    io.run_batch(vec![IoRequest::Read {
                        lba: lba0,
                        blocks,
                        data: slice,
                    }]),
                )?;
                // A PRP list (the write's and the read's of 64 KiB) goes into the CMB when the
                // queue has list pages there.
                let listed = io.cmb_lists() - lists_before;
                let expect = if lists && len > 2 * 4096 { 2 } else { 0 };
                x.check(listed == expect, || {
                    format!(
                        "{len}-byte write and read on queue {q}: {listed} PRP lists pushed into \
                         the CMB, not {expect}"
                    )
                })?;
                drop(io);
                let mut back = vec![0u8; len];
                x.step(
                    "copy out",
                    buf.read_at(0, &mut back).map_err(NvmeError::from),
                )?;
                x.same(&data, &back, lba0 * lba as u64)?;
            }
        }
        // More commands than one pass of the queue holds: the tail wraps inside the buffer.
        let entries = u64::from(c.config().queue_entries);
        let mut w = Workload::new(Pattern::RandWrite, 4, Limit::Ops(entries * 2));
        w.queue = of - 1;
        w.region = Some(((base_block + 4000) * lba as u64, 1 << 20));
        x.step("workload past a queue wrap", workload::run(&c, &w))?;
        let at = (base_block + 8000) * lba as u64;
        x.round_trip(&c, at, 300 * 1024 + lba, 90 + round as u8)?;
        x.step("shutdown", c.shutdown())?;
    }
    // Without the option the queues are in host memory and the CMB is off again.
    let c = x.bring_up(t, config(1, CompletionMode::Interrupt))?;
    x.check(c.cmb().is_none() && c.cmb_queue_count() == 0, || {
        "a bring-up without cmb_submission_queues used the CMB".into()
    })?;
    if offered {
        let msc = x.step(
            "read CMBMSC",
            c.function()
                .bar_read_u64(bar0, crate::regs::REG_CMBMSC)
                .map_err(NvmeError::from),
        )?;
        x.check(msc == 0, || format!("CMBMSC is {msc:#x}, not 0"))?;
    }
    x.round_trip(&c, c.capacity_bytes() / 2, 8192, 99)?;
    x.step("shutdown", c.shutdown())
}
