//! Hosts for tcp fabric tests: an address space with RAM and a recording MMIO region, keys of a
//! two-host deployment, short-keepalive configurations. The fault-injection proxy is
//! [`crate::proxy`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devlend_fabric::{AddressSpace, BusAddr, MmioHandler, SharedMemory};
use devlend_fabric_tcp::{keys, Credentials, TcpConfig, TcpNtb, TlsCredentials};

/// Guard timeout for waits that should succeed.
pub const GUARD: Duration = Duration::from_secs(20);
pub const RAM_BASE: BusAddr = BusAddr(0x1_0000_0000);
pub const RAM_LEN: usize = 1 << 20;
pub const MMIO_BASE: BusAddr = BusAddr(0x2_0000_0000);
pub const MMIO_LEN: u64 = 0x1000;

/// An MMIO region that records every write in order and answers reads from a register file.
#[derive(Default)]
pub struct Recorder {
    pub writes: Mutex<Vec<(u64, Vec<u8>)>>,
    pub regs: Mutex<Vec<u8>>,
}

impl MmioHandler for Recorder {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let regs = self.regs.lock().unwrap();
        for (i, b) in data.iter_mut().enumerate() {
            *b = regs.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }
    fn mmio_write(&self, offset: u64, data: &[u8]) {
        self.writes.lock().unwrap().push((offset, data.to_vec()));
        let mut regs = self.regs.lock().unwrap();
        for (i, b) in data.iter().enumerate() {
            if let Some(r) = regs.get_mut(offset as usize + i) {
                *r = *b;
            }
        }
    }
}

/// A host's address space: RAM at RAM_BASE and a recording MMIO region at MMIO_BASE.
pub struct Host {
    pub asp: Arc<AddressSpace>,
    pub ram: Arc<SharedMemory>,
    pub mmio: Arc<Recorder>,
}

pub fn host() -> Host {
    let asp = Arc::new(AddressSpace::new());
    let ram = Arc::new(SharedMemory::new("test-ram", RAM_LEN).unwrap());
    asp.add_ram(RAM_BASE, ram.clone()).unwrap();
    let mmio = Arc::new(Recorder::default());
    *mmio.regs.lock().unwrap() = vec![0; MMIO_LEN as usize];
    asp.add_mmio(MMIO_BASE, MMIO_LEN, mmio.clone()).unwrap();
    Host { asp, ram, mmio }
}

/// Short keepalive so that link-down tests end quickly (the values are guards, not
/// assertions).
pub fn cfg() -> TcpConfig {
    TcpConfig {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_millis(1500),
        handshake_timeout: Duration::from_secs(3),
        reconnect_interval: Duration::from_millis(50),
        ..TcpConfig::default()
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A fresh directory under the temp dir.
pub fn temp_dir(what: &str) -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("devlend-tcp-{what}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A directory removed (with the CA private key in it) when dropped.
pub struct KeysDir(PathBuf);

impl std::ops::Deref for KeysDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for KeysDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for KeysDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Keys of a new deployment with hosts "a" and "b", removed when dropped.
pub fn deployment() -> KeysDir {
    let dir = temp_dir("keys");
    keys::generate(&dir, &["a", "b"]).unwrap();
    KeysDir(dir)
}

pub fn creds(dir: &std::path::Path, me: &str, peer: &str) -> Credentials {
    Credentials::Tls(Arc::new(TlsCredentials::load(dir, me, peer).unwrap()))
}

pub fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// The warnings `tracing` logged in this process since [`capture_warnings`].
#[derive(Clone, Default)]
pub struct Warnings(Arc<Mutex<Vec<u8>>>);

impl Warnings {
    /// Every line logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Warnings {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs this process's `tracing` subscriber (once per test binary: it is global) that
/// keeps warnings and worse, without colours, for the test to read.
pub fn capture_warnings() -> Warnings {
    let log = Warnings::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    log
}

/// Two hosts of two different deployments (neither trusts the other's CA) with `cfg`: `a`
/// listens on loopback, `b` connects to it, and each refuses the other. Returns `(a, b)` and
/// the hosts they run on (kept alive with them).
pub fn untrusting_pair(cfg: TcpConfig) -> ((TcpNtb, TcpNtb), (Host, Host)) {
    let (k1, k2) = (deployment(), deployment());
    let (ha, hb) = (host(), host());
    let a = TcpNtb::listen(localhost(), ha.asp.clone(), cfg, creds(&k1, "a", "b")).unwrap();
    let b = TcpNtb::connect(
        a.local_addr().unwrap(),
        hb.asp.clone(),
        cfg,
        creds(&k2, "b", "a"),
    )
    .unwrap();
    ((a, b), (ha, hb))
}
