//! `devlend bench cluster`: borrowing by name in a cluster of 2, 8 and 16 hosts on this
//! machine (one etcd member and `devlend node --registry` processes on loopback, TLS links),
//! and how long a dead lender's devices stay in the inventory.
//!
//! A borrow by name is timed at the client of the management socket: registry lookup, the
//! claim transaction, the link request and its answer, a new TCP + TLS link, attaching it, and
//! the lending lease over it. Its same-run baseline is a borrow over a tcp link configured in
//! advance between two nodes (the two-host setup without a registry). Each borrow is returned
//! before the next, which closes the borrower's link, so every timed borrow makes a new one.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use devlend_bench::{percentile, Figure, Report, Target};
use devlend_registry::{EtcdClient, LeaseId, Registry, RegistryAddr};

use super::ctl::call;
use crate::proto::{AddRequest, BorrowRequest, ReturnRequest, StatusRequest};

/// Options.
#[derive(clap::Args)]
pub struct Args {
    /// Borrows per host at each cluster size.
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// A short run (for smoke tests): 2 rounds, sizes 2 and 4.
    #[arg(long)]
    quick: bool,
    /// Print JSON (BENCH.md) instead of a table.
    #[arg(long)]
    json: bool,
    /// Registry lease TTL of the nodes, whole seconds.
    #[arg(long, default_value_t = 2)]
    ttl: u64,
    /// Scratch directory.
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: PathBuf,
}

const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// A child process, killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Everything the run started; stopped and removed on drop.
struct Rig {
    dir: PathBuf,
    nodes: Vec<(String, PathBuf, Proc)>,
    extra: Vec<Proc>,
    etcd: Option<Proc>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.nodes.clear();
        self.extra.clear();
        self.etcd = None;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn etcd_binary() -> anyhow::Result<PathBuf> {
    ["/usr/bin/etcd", "/usr/local/bin/etcd"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| {
            anyhow::anyhow!("etcd is not installed: `bash scripts/deps.sh` (Debian's etcd-server)")
        })
}

impl Rig {
    fn start_etcd(&mut self) -> anyhow::Result<RegistryAddr> {
        let client = free_port()?;
        let peer = free_port()?;
        let log = std::fs::File::create(self.dir.join("etcd.log"))?;
        let child = Command::new(etcd_binary()?)
            .arg("--name=bench")
            .arg(format!("--data-dir={}", self.dir.join("etcd").display()))
            .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
            ))
            .arg(format!("--initial-cluster=bench=http://127.0.0.1:{peer}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting etcd")?;
        self.etcd = Some(Proc(child));
        let addr = RegistryAddr::parse(&format!("etcd://127.0.0.1:{client}"))?;
        let c = EtcdClient::new(addr.clone(), Duration::from_millis(500));
        let deadline = Instant::now() + Duration::from_secs(30);
        while c.ping().is_err() || c.put(b"/bench/ready", b"1", LeaseId(0)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "etcd did not start in 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(addr)
    }

    fn spawn_node(&self, name: &str, flags: &[String]) -> anyhow::Result<(PathBuf, Proc)> {
        let state = self.dir.join(name);
        let log = std::fs::File::create(self.dir.join(format!("{name}.log")))?;
        let child = Command::new(std::env::current_exe()?)
            .args(["node", "--name", name, "--lease-ms", "1000", "--state"])
            .arg(&state)
            .arg("--keys")
            .arg(self.dir.join("keys"))
            .args(flags)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        let proc = Proc(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while call(&state, StatusRequest, CTL_TIMEOUT).is_err() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "node {name} did not come up (log: {})",
                self.dir.join(format!("{name}.log")).display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok((state, proc))
    }

    fn add(&self, state: &Path, device: &str) -> anyhow::Result<()> {
        call(
            state,
            AddRequest {
                kind: "nvme".into(),
                name: device.into(),
                image: self.dir.join(format!("{device}.img")),
                size: Some(4 << 20),
                serial: None,
                model: None,
                queues: None,
                vfs: None,
                vf_namespaces: None,
                cmb: None,
            },
            CTL_TIMEOUT,
        )?;
        Ok(())
    }
}

fn borrow_req(name: &str) -> BorrowRequest {
    BorrowRequest {
        name: name.into(),
        vfio_user: None,
        vm: None,
        port: None,
        id: None,
    }
}

fn return_req(name: &str) -> ReturnRequest {
    ReturnRequest {
        name: name.into(),
        grace_ms: None,
    }
}

/// The phases of a borrow by name, in microseconds, as the node measured them.
const PHASES: [&str; 4] = ["lookup", "claim", "link", "lease"];

/// Times one borrow, then returns the device; also the node's phase times, if any.
fn timed_borrow(state: &Path, device: &str) -> anyhow::Result<(f64, Option<[f64; 4]>)> {
    let t = Instant::now();
    let v = call(state, borrow_req(device), CTL_TIMEOUT)
        .with_context(|| format!("borrowing {device}"))?;
    let us = devlend_bench::micros(t.elapsed());
    call(state, return_req(device), CTL_TIMEOUT)?;
    let phases = v
        .timing
        .map(|t| [t.lookup_us, t.claim_us, t.link_us, t.lease_us].map(|us| us as f64));
    Ok((us, phases))
}

fn ms(us: f64) -> f64 {
    us / 1000.0
}

/// Runs the benchmark.
pub fn run(a: Args) -> anyhow::Result<()> {
    let dir = a
        .dir
        .join(format!("devlend-bench-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let mut rig = Rig {
        dir: dir.clone(),
        nodes: Vec::new(),
        extra: Vec::new(),
        etcd: None,
    };
    let sizes: &[usize] = if a.quick { &[2, 4] } else { &[2, 8, 16] };
    let rounds = if a.quick { 2 } else { a.rounds.max(1) };
    let largest = sizes.iter().copied().max().unwrap_or(2);
    let mut names: Vec<String> = (0..largest).map(|i| format!("h{i}")).collect();
    names.push("base-l".into());
    names.push("base-b".into());
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    devlend_fabric_tcp::keys::generate(&dir.join("keys"), &refs)?;

    // The baseline: a tcp link configured in advance between two nodes, no registry.
    eprintln!("bench cluster: baseline (a link configured in advance)");
    let port = free_port()?;
    let (lstate, l) = rig.spawn_node(
        "base-l",
        &[format!("--fabric=tcp-listen:base-b@127.0.0.1:{port}")],
    )?;
    let (bstate, b) = rig.spawn_node(
        "base-b",
        &[format!("--fabric=tcp-connect:base-l@127.0.0.1:{port}")],
    )?;
    rig.extra.push(l);
    rig.extra.push(b);
    rig.add(&lstate, "base0")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while call(&bstate, borrow_req("base0"), CTL_TIMEOUT).is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the baseline link did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    call(&bstate, return_req("base0"), CTL_TIMEOUT)?;
    let mut base = Vec::new();
    for _ in 0..rounds * 4 {
        base.push(timed_borrow(&bstate, "base0")?.0);
    }
    rig.extra.clear();
    let base_p50 = percentile(&mut base, 50.0);
    let base_p99 = percentile(&mut base, 99.0);

    let registry = rig.start_etcd()?;
    let reg_flag = format!("--registry={registry}");
    let ttl_flag = format!("--registry-ttl={}", a.ttl);
    let mut report = Report::new("cluster");
    for &n in sizes {
        while rig.nodes.len() < n {
            let i = rig.nodes.len();
            let name = format!("h{i}");
            let (state, p) = rig.spawn_node(
                &name,
                &[
                    reg_flag.clone(),
                    "--cluster-addr=127.0.0.1".into(),
                    ttl_flag.clone(),
                ],
            )?;
            rig.add(&state, &format!("d{i}"))?;
            rig.nodes.push((name, state, p));
        }
        eprintln!("bench cluster: {n} hosts, {rounds} borrows by name per host");
        let mut samples = Vec::new();
        let mut phases: [Vec<f64>; 4] = Default::default();
        for _ in 0..rounds {
            for i in 0..n {
                let device = format!("d{}", (i + 1) % n);
                let (us, ph) = timed_borrow(&rig.nodes[i].1, &device)?;
                samples.push(us);
                for (all, v) in phases.iter_mut().zip(ph.into_iter().flatten()) {
                    all.push(v);
                }
            }
        }
        let p50 = percentile(&mut samples, 50.0);
        let p99 = percentile(&mut samples, 99.0);
        report.push(
            Figure::new(format!("borrow-by-name-p50-{n}-hosts"), "ms", ms(p50))
                .against("link configured in advance, p50", ms(base_p50)),
        );
        report.push(
            Figure::new(format!("borrow-by-name-p99-{n}-hosts"), "ms", ms(p99))
                .against("link configured in advance, p99", ms(base_p99)),
        );
        if n == largest {
            for (name, all) in PHASES.iter().zip(phases.iter_mut()) {
                report.push(Figure::new(
                    format!("phase-{name}-p50-{n}-hosts"),
                    "ms",
                    ms(percentile(all, 50.0)),
                ));
                report.push(Figure::new(
                    format!("phase-{name}-p99-{n}-hosts"),
                    "ms",
                    ms(percentile(all, 99.0)),
                ));
            }
        }
    }

    // A lender's death: how long until its device leaves the inventory (3 lenders, median).
    let reg = Registry::connect(&registry)?;
    let mut gone = Vec::new();
    for _ in 0..3 {
        let Some((name, _, mut p)) = rig.nodes.pop() else {
            break;
        };
        let device = format!("d{}", &name[1..]);
        anyhow::ensure!(
            reg.devices()?.iter().any(|d| d.record.name == device),
            "{device} is not in the inventory before its lender dies"
        );
        let t = Instant::now();
        let _ = p.0.kill();
        let _ = p.0.wait();
        while reg.devices()?.iter().any(|d| d.record.name == device) {
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(a.ttl + 30),
                "{device} stayed in the inventory"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        gone.push(t.elapsed().as_secs_f64());
    }
    let gone_p50 = percentile(&mut gone, 50.0);
    report.push(
        Figure::new("lender-death-to-inventory-exit", "s", gone_p50)
            .against("lease TTL", a.ttl as f64)
            .target(Target::AtMost(1.5)),
    );
    report.notes.push(format!(
        "hosts are processes on this machine joined over loopback tcp with TLS; one etcd member; {rounds} borrows per host at each size, each returned before the next (every borrow makes a new link)"
    ));
    drop(rig);
    report.emit(a.json);
    Ok(())
}
