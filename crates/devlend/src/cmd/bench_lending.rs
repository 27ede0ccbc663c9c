//! `devlend bench lending`: the same driver and workload on a local function and on a function
//! borrowed over the fabric, interleaved in one run.
//!
//! Over `shm` every figure is compared with the local function. Over `tcp` every figure is
//! compared with what the same link does with no device in between: a raw TLS request/response
//! of the same sizes with the same number outstanding, or a raw TLS stream
//! ([`crate::cmd::baseline_tls`]), measured in the same run, interleaved with the device's
//! samples.
//!
//! The local baseline is the same NVMe model bound in-process; it runs in its own worker
//! thread exactly as it does when lent, so the ratio isolates the cost of lending: MMIO through
//! the window, DMA through the IOMMU into borrower memory, interrupts as doorbells.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use devlend_fabric_tcp::TlsCredentials;
use devlend_nvme_driver::{DriverConfig, InterruptCoalescing};

use devlend_bench::{median, Figure, Report, Target};
use devlend_nvme_driver::workload::{self, Limit, Pattern, Workload};
use devlend_nvme_driver::Controller;
use devlend_pci::PciFunction;

use crate::cmd::baseline_tls::{RawTlsClient, RawTlsServer};
use crate::cmd::bench_args::SampleArgs;
use crate::host::{self, NvmeOptions};
use crate::pair::Pair;

/// Options.
#[derive(clap::Args)]
#[command(mut_arg("reps", |a| a.help(
    "Samples per side (interleaved local, borrowed, local, ...); medians are reported"
)))]
pub struct Args {
    #[command(flatten)]
    pub(crate) run: SampleArgs,
    /// Reap completions by polling instead of waiting for MSI-X interrupts (both sides).
    #[arg(long)]
    polling: bool,
    /// Skip the row of a device borrowed over tcp (it needs root: two network namespaces).
    #[arg(long)]
    no_tcp: bool,
    /// At QD32 over tcp, ask the borrowed controllers for Interrupt Coalescing: an interrupt
    /// per this many completions (off by default; off again after the QD32 rows).
    #[arg(long, value_name = "COMPLETIONS")]
    tcp_qd32_coalescing: Option<u16>,
    /// On the 'SQ in CMB' device over tcp, use a 1 MiB CMB for the submission queues and 4
    /// KiB writes' data only, as before `DriverConfig::cmb_bulk` (by default the driver also
    /// pushes PRP lists and the data of writes of up to 128 KiB into a 4 MiB CMB).
    #[arg(long)]
    no_cmb_bulk: bool,
    /// With --tcp-qd32-coalescing: the longest an interrupt waits, in 100 µs units.
    #[arg(long, default_value_t = 1, value_name = "UNITS")]
    coalescing_time_100us: u8,
    /// Only these rows (comma-separated: randread-4k-qd1, randwrite-4k-qd1, randread-4k-qd32,
    /// randwrite-4k-qd32, seqread-128k-qd8, seqwrite-128k-qd8); default: all of them.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Scratch directory.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
}

/// The rows named in `only` (all of them when it is empty); an unknown name is an error.
fn chosen_rows(only: &[String]) -> anyhow::Result<Vec<&'static Row>> {
    if let Some(bad) = only
        .iter()
        .find(|n| !ROWS.iter().any(|r| r.name == n.as_str()))
    {
        anyhow::bail!(
            "no row {bad:?} (known: {})",
            ROWS.iter().map(|r| r.name).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(ROWS
        .iter()
        .filter(|r| only.is_empty() || only.iter().any(|n| n == r.name))
        .collect())
}

struct Sample {
    iops: f64,
    median_us: f64,
    p99_us: f64,
    mib_per_s: f64,
}

fn sample(c: &Controller, w: &Workload) -> anyhow::Result<Sample> {
    let s = workload::run(c, w)?;
    Ok(Sample {
        iops: s.iops,
        median_us: s.median_us,
        p99_us: s.p99_us,
        mib_per_s: s.mib_per_s,
    })
}

/// Port of the raw TLS baseline server (the fabric listens on 7790).
const RAW_PORT: u16 = 7791;

/// The tcp side: the borrowed controller and the raw TLS baseline on the same link.
struct TcpSide {
    pair: Pair,
    ctrl: Controller,
    /// A second device, with a Controller Memory Buffer holding the I/O submission queues
    /// and, unless `--no-cmb-bulk`, the PRP lists and write data of up to 128 KiB.
    cmb: Controller,
    raw: RawTlsClient,
    server: RawTlsServer,
}

impl TcpSide {
    /// Starts the pair (this thread moves into the borrower's network namespace), borrows a
    /// device, and connects the raw baseline between the same namespaces with the same keys.
    fn start(
        dir: &std::path::Path,
        size: u64,
        cfg: DriverConfig,
        bulk: bool,
    ) -> anyhow::Result<Self> {
        let pair = Pair::start_tcp(dir)?;
        pair.lender_add_nvme("bench1", &pair.dir.join("lent.img"), size)?;
        let f: Arc<dyn PciFunction> = pair.borrow("bench1")?;
        pair.lender_add_nvme_cmb(
            "bench2",
            &pair.dir.join("lent-cmb.img"),
            size,
            cmb_bytes(bulk),
        )?;
        let g: Arc<dyn PciFunction> = pair.borrow("bench2")?;
        let ctrl = Controller::with_config(f, cfg.clone())?;
        let cmb = Controller::with_config(
            g,
            DriverConfig {
                cmb_submission_queues: true,
                cmb_bulk: bulk,
                ..cfg
            },
        )?;
        let ns = pair.netns().context("a tcp pair without namespaces")?;
        let keys = pair.dir.join("keys");
        let server_creds = Arc::new(TlsCredentials::load(&keys, "lender", "borrower")?);
        let client_creds = TlsCredentials::load(&keys, "borrower", "lender")?;
        let addr = SocketAddr::new(ns.addr(0).into(), RAW_PORT);
        // The listening socket is made in the lender's namespace and stays there.
        let listener = std::thread::scope(|sc| {
            sc.spawn(|| -> anyhow::Result<TcpListener> {
                ns.enter(0)?;
                Ok(TcpListener::bind(addr)?)
            })
            .join()
        })
        .map_err(|_| anyhow::anyhow!("the baseline's listener thread panicked"))??;
        let spin = devlend_fabric_tcp::TcpConfig::default().link.spin;
        let server = RawTlsServer::start(listener, server_creds, spin)?;
        let raw = RawTlsClient::connect(TcpStream::connect(addr)?, &client_creds, spin)?;
        Ok(Self {
            pair,
            ctrl,
            cmb,
            raw,
            server,
        })
    }

    /// The raw baseline of `row`, one sample.
    fn baseline(&mut self, row: &Row, secs: f64, stream_bytes: usize) -> anyhow::Result<Sample> {
        let (req, reply) = match row.pattern {
            Pattern::RandRead => (RAW_REQUEST, row.block),
            Pattern::RandWrite => (row.block, RAW_WRITE_REPLY),
        };
        if row.sequential {
            // Streams of `stream_bytes` one after another for as long as a device sample
            // lasts: one stream alone takes only tens of milliseconds and swung 1.6-5.4 GB/s
            // from sample to sample.
            let begin = std::time::Instant::now();
            let mut streams = 0u32;
            while streams == 0 || begin.elapsed().as_secs_f64() < secs {
                match row.pattern {
                    Pattern::RandRead => self.raw.stream_from_server(stream_bytes, row.block)?,
                    Pattern::RandWrite => self.raw.stream_to_server(stream_bytes, row.block)?,
                };
                streams += 1;
            }
            let bps = f64::from(streams) * stream_bytes as f64 / begin.elapsed().as_secs_f64();
            let mib_per_s = bps / (1024.0 * 1024.0);
            return Ok(Sample {
                iops: bps / row.block as f64,
                median_us: 0.0,
                p99_us: 0.0,
                mib_per_s,
            });
        }
        let s = self.raw.rpc_pipeline(req, reply, row.qd, secs)?;
        anyhow::ensure!(s.ops > 0, "the raw baseline completed nothing");
        Ok(Sample {
            iops: s.per_sec,
            median_us: s.median_us,
            p99_us: s.p99_us,
            mib_per_s: s.per_sec * row.block as f64 / (1024.0 * 1024.0),
        })
    }

    fn stop(self) -> anyhow::Result<()> {
        self.ctrl.shutdown()?;
        self.cmb.shutdown()?;
        self.pair.borrower.give_back("bench1")?;
        self.pair.borrower.give_back("bench2")?;
        self.raw.quit()?;
        self.server.join()?;
        drop(self.pair);
        Ok(())
    }
}

/// The Controller Memory Buffer of the second tcp device.
const CMB_BYTES: u64 = 1 << 20;
/// The same without `--no-cmb-bulk`: room for both I/O submission queues with their 4 KiB write
/// buffers, list pages and eight 128 KiB write buffers each (2.3 MiB).
const CMB_BYTES_BULK: u64 = 4 << 20;

/// The second tcp device's CMB size, with or without `DriverConfig::cmb_bulk`.
fn cmb_bytes(bulk: bool) -> u64 {
    if bulk {
        CMB_BYTES_BULK
    } else {
        CMB_BYTES
    }
}

/// The request of the raw read baseline: what a driver must at least send for a read.
const RAW_REQUEST: usize = 64;
/// The answer of the raw write baseline: what a device must at least send back for a write.
const RAW_WRITE_REPLY: usize = 16;

/// One workload of the benchmark.
struct Row {
    name: &'static str,
    pattern: Pattern,
    qd: usize,
    block: usize,
    sequential: bool,
}

const ROWS: [Row; 6] = [
    Row {
        name: "randread-4k-qd1",
        pattern: Pattern::RandRead,
        qd: 1,
        block: 4096,
        sequential: false,
    },
    Row {
        name: "randwrite-4k-qd1",
        pattern: Pattern::RandWrite,
        qd: 1,
        block: 4096,
        sequential: false,
    },
    Row {
        name: "randread-4k-qd32",
        pattern: Pattern::RandRead,
        qd: 32,
        block: 4096,
        sequential: false,
    },
    Row {
        name: "randwrite-4k-qd32",
        pattern: Pattern::RandWrite,
        qd: 32,
        block: 4096,
        sequential: false,
    },
    Row {
        name: "seqread-128k-qd8",
        pattern: Pattern::RandRead,
        qd: 8,
        block: 128 << 10,
        sequential: true,
    },
    Row {
        name: "seqwrite-128k-qd8",
        pattern: Pattern::RandWrite,
        qd: 8,
        block: 128 << 10,
        sequential: true,
    },
];

/// Runs the benchmark.
pub fn run(a: Args) -> anyhow::Result<()> {
    let rows = chosen_rows(&a.only)?;
    let (secs, reps) = a.run.plan();
    // Bytes of one raw stream; a sample streams again and again for as long as a device
    // sample lasts.
    let stream_bytes: usize = if a.run.quick { 16 << 20 } else { 64 << 20 };
    let size = 256u64 << 20;
    let pair = Pair::start(&a.dir)?;
    pair.lender_add_nvme("bench0", &pair.dir.join("lent.img"), size)?;
    let borrowed: Arc<dyn PciFunction> = pair.borrow("bench0")?;
    let local = host::local_nvme(NvmeOptions {
        image: pair.dir.join("local.img"),
        size: Some(size),
        serial: None,
        model: None,
        queues: None,
        cmb: None,
    })?;
    let mut notes = Vec::new();
    let cfg = DriverConfig {
        completion: if a.polling {
            devlend_nvme_driver::CompletionMode::Polling
        } else {
            devlend_nvme_driver::CompletionMode::Interrupt
        },
        ..Default::default()
    };
    // The tcp pair last: it moves this thread into a network namespace.
    let mut tcp = if a.no_tcp {
        None
    } else {
        match TcpSide::start(&a.dir, size, cfg.clone(), !a.no_cmb_bulk) {
            Ok(t) => Some(t),
            Err(e) => {
                notes.push(format!("tcp rows not measured: {e:#}"));
                None
            }
        }
    };
    let local = Controller::with_config(local, cfg.clone())?;
    let borrowed = Controller::with_config(borrowed, cfg)?;
    let mut report = Report::new("lending");
    for row in rows {
        let name = row.name;
        let w = if row.sequential {
            Workload::sequential(
                row.pattern,
                row.block,
                row.qd,
                Limit::Duration(Duration::from_secs_f64(secs)),
            )
        } else {
            Workload::new(
                row.pattern,
                row.qd,
                Limit::Duration(Duration::from_secs_f64(secs)),
            )
        };
        let coalescing = a
            .tcp_qd32_coalescing
            .filter(|_| row.qd == 32)
            .map(|threshold| InterruptCoalescing {
                threshold,
                time_100us: a.coalescing_time_100us,
            });
        if let (Some(side), Some(c)) = (tcp.as_ref(), coalescing) {
            side.ctrl.set_interrupt_coalescing(Some(c))?;
            side.cmb.set_interrupt_coalescing(Some(c))?;
        }
        let (mut l, mut b, mut t, mut r) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut c = Vec::new();
        for _ in 0..reps {
            // Interleaved: local, shm, raw tcp, tcp.
            l.push(sample(&local, &w)?);
            b.push(sample(&borrowed, &w)?);
            if let Some(side) = tcp.as_mut() {
                r.push(side.baseline(row, secs, stream_bytes)?);
                t.push(sample(&side.ctrl, &w)?);
                c.push(sample(&side.cmb, &w)?);
            }
            eprint!(".");
        }
        if let (Some(side), Some(_)) = (tcp.as_ref(), coalescing) {
            side.ctrl.set_interrupt_coalescing(None)?;
            side.cmb.set_interrupt_coalescing(None)?;
        }
        let pick =
            |v: &[Sample], f: fn(&Sample) -> f64| median(&mut v.iter().map(f).collect::<Vec<_>>());
        let shm = |what: &str, unit: &str, f: fn(&Sample) -> f64| {
            Figure::new(
                format!("{name} {what}, borrowed over shm"),
                unit,
                pick(&b, f),
            )
            .against("local", pick(&l, f))
        };
        if row.sequential {
            report.push(shm("bandwidth", "MiB/s", |s| s.mib_per_s));
        } else if row.qd == 1 {
            report.push(shm("median latency", "us", |s| s.median_us).target(Target::AtMost(1.25)));
            report.push(shm("IOPS", "IOPS", |s| s.iops).target(Target::AtLeast(0.9)));
            report.push(shm("p99 latency", "us", |s| s.p99_us).target(Target::AtMost(1.5)));
        } else {
            report.push(shm("IOPS", "IOPS", |s| s.iops).target(Target::AtLeast(0.9)));
            report.push(shm("median latency", "us", |s| s.median_us));
            report.push(shm("p99 latency", "us", |s| s.p99_us));
        }
        if t.is_empty() {
            continue;
        }
        let raw_name = if row.sequential {
            match row.pattern {
                Pattern::RandRead => "raw TLS stream, server to client".to_string(),
                Pattern::RandWrite => "raw TLS stream, client to server".to_string(),
            }
        } else {
            let (req, reply) = match row.pattern {
                Pattern::RandRead => (RAW_REQUEST, row.block),
                Pattern::RandWrite => (row.block, RAW_WRITE_REPLY),
            };
            format!(
                "raw TLS {req} B request, {reply} B answer, {} outstanding",
                row.qd
            )
        };
        // The device with its submission queues in host memory (the default), then the one
        // with them in its Controller Memory Buffer.
        for (side, v) in [("tcp", &t), ("tcp, SQ in CMB", &c)] {
            let tcp_fig = |what: &str, unit: &str, f: fn(&Sample) -> f64| {
                Figure::new(
                    format!("{name} {what}, borrowed over {side}"),
                    unit,
                    pick(v, f),
                )
                .against(raw_name.clone(), pick(&r, f))
            };
            if row.sequential {
                report.push(
                    tcp_fig("bandwidth", "MiB/s", |s| s.mib_per_s).target(Target::AtLeast(0.7)),
                );
            } else if row.qd == 1 {
                report.push(
                    tcp_fig("median latency", "us", |s| s.median_us).target(Target::AtMost(3.0)),
                );
                report.push(tcp_fig("p99 latency", "us", |s| s.p99_us));
                report.push(tcp_fig("IOPS", "IOPS", |s| s.iops));
            } else {
                report.push(tcp_fig("IOPS", "IOPS", |s| s.iops).target(Target::AtLeast(0.5)));
                report.push(tcp_fig("median latency", "us", |s| s.median_us));
            }
        }
    }
    eprintln!();
    local.shutdown()?;
    borrowed.shutdown()?;
    pair.borrower.give_back("bench0")?;
    let had_tcp = tcp.is_some();
    if let Some(side) = tcp {
        side.stop()?;
    }
    report.notes.push(format!(
        "same driver and workload ({} completions); {reps} interleaved sample(s) of {secs} s per side, medians; local = the same NVMe model bound in-process with its own worker thread",
        if a.polling { "polled" } else { "interrupt-driven" }
    ));
    if had_tcp {
        report.notes.push(format!(
            "tcp = TLS 1.3 over a veth link between two network namespaces; 'SQ in CMB' = a second lent device with a {} KiB Controller Memory Buffer holding the driver's I/O submission queues{} (pushed as posted writes, never fetched across the link); each tcp row's baseline is plain TLS 1.3 (rustls, the fabric's keys and cipher suite) between the same namespaces in the same run, interleaved with the device samples, threads left to the scheduler: a {RAW_REQUEST} B request answered with 4 KiB for reads, 4 KiB answered with {RAW_WRITE_REPLY} B for writes, with the same number outstanding; streams of 128 KiB writes ({} MiB each, one after another for as long as a device sample) for the sequential rows",
            cmb_bytes(!a.no_cmb_bulk) >> 10,
            if a.no_cmb_bulk {
                " and the data of writes of up to 4 KiB (--no-cmb-bulk)"
            } else {
                ", PRP lists and the data of writes of up to 128 KiB"
            },
            stream_bytes >> 20
        ));
    }
    if let (true, Some(n)) = (had_tcp, a.tcp_qd32_coalescing) {
        report.notes.push(format!(
            "QD32 tcp rows with Interrupt Coalescing asked for by the driver: an interrupt per {n} completions or after {} µs",
            100 * u32::from(a.coalescing_time_100us)
        ));
    }
    report.notes.extend(notes);
    report.emit(a.run.json);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_selects_rows_and_refuses_unknown_ones() {
        let names = |v: Vec<&Row>| v.iter().map(|r| r.name).collect::<Vec<_>>();
        assert_eq!(
            chosen_rows(&[]).map(names).ok(),
            Some(ROWS.iter().map(|r| r.name).collect())
        );
        let only = [
            "seqwrite-128k-qd8".to_string(),
            "randread-4k-qd1".to_string(),
        ];
        // In the benchmark's own order, whatever the order asked.
        assert_eq!(
            chosen_rows(&only).map(names).ok(),
            Some(vec!["randread-4k-qd1", "seqwrite-128k-qd8"])
        );
        let err = chosen_rows(&["seqread-4k".to_string()])
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(
                |e| e.contains("no row \"seqread-4k\"") && e.contains("seqread-128k-qd8")
            ),
            "{err:?}"
        );
    }
}
