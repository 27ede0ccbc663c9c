//! The daemon's observability: counters for every lent and borrowed device and every link
//! (`devlend-metrics`), the Prometheus endpoint (`devlend node --metrics ADDR:PORT`), and the
//! config-space snapshots `devlend lspci` decodes.
//!
//! The endpoint is a minimal HTTP/1.1 server on its own thread: one request per connection,
//! `GET /metrics` (or `/`) answered with the text format, anything else 404. It is meant for
//! loopback or a management network; it serves read-only counters.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use devlend_fabric::{LinkState, Ntb};
use devlend_lending::Node;
use devlend_metrics::{LinkInfo, MeteredFunction, MeteredNtb, NodeInfo, Registry, Role};
use devlend_pci::{AccessSize, BarIndex, PciDevice, PciFunction};

use crate::host::FabricSpec;
pub use crate::proto::{LinkDetail, PciSnapshot};

/// Counters and the handles `lspci` reads.
pub struct Observe {
    /// Every counter of this node.
    pub registry: Arc<Registry>,
    /// Devices this host owns, unwrapped (reading them for `lspci` counts nothing).
    local: Mutex<HashMap<String, Arc<dyn PciDevice>>>,
    /// The links as configured (for `status`: peer address, TLS identity).
    specs: Vec<FabricSpec>,
}

impl Observe {
    /// Wraps each link in a counting endpoint.
    pub fn new(specs: &[FabricSpec], ntbs: Vec<Arc<dyn Ntb>>) -> (Self, Vec<Arc<dyn Ntb>>) {
        let registry = Registry::new();
        let ntbs = ntbs
            .into_iter()
            .enumerate()
            .map(|(i, n)| Arc::new(MeteredNtb::new(n, registry.link(i))) as Arc<dyn Ntb>)
            .collect();
        (
            Self {
                registry,
                local: Mutex::new(HashMap::new()),
                specs: specs.to_vec(),
            },
            ntbs,
        )
    }

    /// Wraps a device builder so the device's accesses, DMA and interrupts are counted, and
    /// remembers the device for `lspci`.
    pub fn meter_builder(
        self: &Arc<Self>,
        name: &str,
        build: devlend_lending::DeviceBuilder,
    ) -> devlend_lending::DeviceBuilder {
        let m = self.registry.device(name, Role::Lent);
        let me = self.clone();
        let name = name.to_string();
        Box::new(move |dma, irq| {
            let mut built = None;
            let dev = devlend_metrics::MeteredDevice::build(dma, irq, m, |dma, irq| {
                let d = build(dma, irq)?;
                built = Some(d.clone());
                Ok(d)
            })?;
            if let Some(d) = built {
                devlend_sync::lock(&me.local).insert(name, d);
            }
            Ok(dev)
        })
    }

    /// Forgets a device this node lent and no longer has: its counters and the reference kept
    /// for `lspci` (the last one once the lender dropped it, so the device goes now).
    pub fn forget_lent(&self, name: &str) {
        devlend_sync::lock(&self.local).remove(name);
        self.registry.forget_device(name, Role::Lent);
    }

    /// Lists a device just borrowed (its counters start at zero, before any use).
    pub fn note_borrowed(&self, name: &str) {
        let _ = self.registry.device(name, Role::Borrowed);
    }

    /// A borrowed function with its accesses counted.
    pub fn meter_borrowed(&self, name: &str, f: Arc<dyn PciFunction>) -> Arc<dyn PciFunction> {
        Arc::new(MeteredFunction::new(
            f,
            self.registry.device(name, Role::Borrowed),
        ))
    }

    fn links(&self, node: &Node) -> Vec<LinkInfo> {
        let status = node.status();
        status
            .links
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let generation = node.ntb(i).map(|n| n.link_generation()).unwrap_or(0);
                let up = node.ntb(i).is_some_and(|n| n.link_state() == LinkState::Up);
                // The generation counts every up and down transition from down at 0.
                let ups = generation.div_ceil(2);
                LinkInfo {
                    index: i,
                    fabric: l.fabric.clone(),
                    peer: l.peer.clone().unwrap_or_default(),
                    up,
                    reconnects: ups.saturating_sub(1),
                }
            })
            .collect()
    }

    /// The Prometheus page.
    pub fn render(&self, node: &Node) -> String {
        let info = NodeInfo {
            lease_renewals: node.lease_renewals(),
        };
        self.registry.render(node.name(), &self.links(node), &info)
    }

    /// Every counter, for `devlend top`.
    pub fn snapshot(&self, node: &Node) -> devlend_metrics::Snapshot {
        let info = NodeInfo {
            lease_renewals: node.lease_renewals(),
        };
        self.registry
            .snapshot(node.name(), &self.links(node), &info)
    }

    /// What `status` adds about each link.
    pub fn link_details(&self, insecure: bool) -> Vec<LinkDetail> {
        self.specs
            .iter()
            .map(|s| {
                let (address, tls_identity) = match s {
                    FabricSpec::Shm(dir) => (dir.display().to_string(), "none (shm)".to_string()),
                    FabricSpec::TcpListen { peer, addr }
                    | FabricSpec::TcpConnect { peer, addr } => (
                        addr.to_string(),
                        if insecure {
                            "none (--insecure-tcp)".to_string()
                        } else {
                            format!("CN={peer}")
                        },
                    ),
                };
                LinkDetail {
                    spec: s.to_string(),
                    address,
                    tls_identity,
                }
            })
            .collect()
    }

    /// Config-space snapshots of every device this host sees (or only `name`).
    pub fn lspci(&self, node: &Node, only: Option<&str>) -> anyhow::Result<Vec<PciSnapshot>> {
        let mut out = Vec::new();
        let local: Vec<(String, Arc<dyn PciDevice>)> = devlend_sync::lock(&self.local)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for d in node.local_devices() {
            if only.is_some_and(|n| n != d.name) {
                continue;
            }
            let Some((_, dev)) = local.iter().find(|(n, _)| *n == d.name) else {
                continue;
            };
            let config = read_config(|off| Ok(dev.config_read(off, AccessSize::Dword)))?;
            out.push(PciSnapshot {
                name: d.name.clone(),
                role: if d.borrower.is_some() {
                    "lent"
                } else {
                    "local"
                }
                .into(),
                owner: d.owner.clone(),
                borrower: d.borrower.clone(),
                bar_sizes: bar_sizes(|b| dev.bar_spec(b).map(|s| s.size)),
                config,
            });
        }
        for d in node.status().borrowed {
            if only.is_some_and(|n| n != d.name) {
                continue;
            }
            let Some(f) = node.borrowed(&d.name) else {
                continue;
            };
            let config = read_config(|off| {
                devlend_pci::ConfigAccess::config_read(f.as_ref(), off, AccessSize::Dword)
                    .map_err(anyhow::Error::from)
            })
            .with_context(|| format!("reading {}'s config space from its lender", d.name))?;
            let mut sizes = [None; 6];
            for b in &d.bars {
                if let Some(s) = sizes.get_mut(usize::from(b.index)) {
                    *s = Some(b.size);
                }
            }
            out.push(PciSnapshot {
                name: d.name.clone(),
                role: "borrowed".into(),
                owner: d.owner.clone(),
                borrower: d.borrower.clone(),
                bar_sizes: sizes,
                config,
            });
        }
        if let Some(n) = only {
            anyhow::ensure!(
                !out.is_empty(),
                "no device {n:?} here: neither lent by this host nor borrowed (see `devlend list`)"
            );
        }
        Ok(out)
    }
}

fn bar_sizes(spec: impl Fn(BarIndex) -> Option<u64>) -> [Option<u64>; 6] {
    let mut out = [None; 6];
    for (slot, b) in out.iter_mut().zip(BarIndex::ALL) {
        *slot = spec(b);
    }
    out
}

/// Reads the 256-byte space, and the extended space when a capability starts at 0x100.
fn read_config(read: impl Fn(u16) -> anyhow::Result<u32>) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(4096);
    for off in (0..0x100u16).step_by(4) {
        bytes.extend_from_slice(&read(off)?.to_le_bytes());
    }
    let first = read(0x100)?;
    if first != 0 && first != u32::MAX {
        for off in (0x100..0x1000u16).step_by(4) {
            bytes.extend_from_slice(&read(off)?.to_le_bytes());
        }
    }
    Ok(bytes)
}

/// Serves the metrics page on `addr` until the process ends.
pub fn serve_metrics(
    addr: SocketAddr,
    page: impl Fn() -> String + Send + Sync + 'static,
) -> anyhow::Result<SocketAddr> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("binding the metrics endpoint {addr}"))?;
    let bound = listener.local_addr()?;
    let page = Arc::new(page);
    std::thread::Builder::new()
        .name("devlend-metrics".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let page = page.clone();
                let _ = std::thread::Builder::new()
                    .name("devlend-metrics-conn".into())
                    .spawn(move || {
                        if let Err(e) = answer(stream, page.as_ref()) {
                            tracing::debug!("metrics request: {e}");
                        }
                    });
            }
        })?;
    Ok(bound)
}

fn answer(stream: TcpStream, page: &dyn Fn() -> String) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.by_ref().take(8192).read_line(&mut request)?;
    // Drain the headers (bounded) up to the blank line.
    let mut line = String::new();
    for _ in 0..100 {
        line.clear();
        if reader.by_ref().take(8192).read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
    }
    let mut parts = request.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("");
    let (status, kind, body) = if method == "GET" && (path == "/metrics" || path == "/") {
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", page())
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "only GET /metrics is served here\n".to_string(),
        )
    };
    let mut out = stream;
    write!(
        out,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    out.flush()
}
