//! Test rig: real etcd members started on loopback ports in a temporary directory, killed and
//! removed on drop.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devlend_registry::{EtcdClient, RegistryAddr};

/// One etcd member.
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

/// An etcd cluster of one or more members, each a child process.
pub struct EtcdCluster {
    dir: PathBuf,
    ip: IpAddr,
    members: Vec<Member>,
    /// A command prefix (e.g. `ip netns exec NS`) to run members in.
    wrapper: Vec<String>,
}

fn free_port(ip: IpAddr) -> u16 {
    TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The etcd binary (Debian's `etcd-server`; scripts/deps.sh installs it).
pub fn etcd_binary() -> Option<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = PathBuf::from(dir).join("etcd");
        if p.exists() {
            return Some(p);
        }
    }
    None
}

/// Whether this run must not skip (CI) — then a missing etcd is a failure.
pub fn etcd_or_skip(test: &str) -> bool {
    if etcd_binary().is_some() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: etcd is not installed (bash scripts/deps.sh installs it) and CI is set"
    );
    eprintln!("{test}: SKIPPED: etcd is not installed (run `bash scripts/deps.sh`)");
    false
}

impl EtcdCluster {
    /// Starts `n` members on 127.0.0.1 and waits until each answers.
    pub fn start(n: usize) -> Self {
        Self::start_on(n, IpAddr::V4(Ipv4Addr::LOCALHOST), Vec::new())
    }

    /// Starts `n` members listening on `ip`, each run under `wrapper` (empty: directly).
    pub fn start_on(n: usize, ip: IpAddr, wrapper: Vec<String>) -> Self {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "devlend-etcd-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("etcd temp dir");
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(ip),
                peer_port: free_port(ip),
                child: None,
            })
            .collect();
        let mut c = Self {
            dir,
            ip,
            members,
            wrapper,
        };
        for i in 0..n {
            c.spawn(i);
        }
        for i in 0..n {
            c.wait_ready(i);
        }
        c
    }

    fn host(&self) -> String {
        match self.ip {
            IpAddr::V6(a) => format!("[{a}]"),
            IpAddr::V4(a) => a.to_string(),
        }
    }

    fn spawn(&mut self, i: usize) {
        let host = self.host();
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{host}:{}", m.name, m.peer_port))
            .collect();
        let m = &self.members[i];
        let data = self.dir.join(&m.name);
        let log = std::fs::File::create(self.dir.join(format!("{}.log", m.name))).expect("log");
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(etcd_binary().expect("etcd"));
                c
            }
            None => Command::new(etcd_binary().expect("etcd")),
        };
        cmd.arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("http://{host}:{}", m.client_port))
            .arg("--advertise-client-urls")
            .arg(format!("http://{host}:{}", m.client_port))
            .arg("--listen-peer-urls")
            .arg(format!("http://{host}:{}", m.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{host}:{}", m.peer_port))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        let child = cmd.spawn().expect("starting etcd");
        self.members[i].child = Some(child);
    }

    /// The address of member `i` alone.
    pub fn member_addr(&self, i: usize) -> RegistryAddr {
        RegistryAddr::parse(&format!(
            "etcd://{}:{}",
            self.host(),
            self.members[i].client_port
        ))
        .expect("address")
    }

    /// The whole cluster's address.
    pub fn addr(&self) -> RegistryAddr {
        let host = self.host();
        let list: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{host}:{}", m.client_port))
            .collect();
        RegistryAddr::parse(&format!("etcd://{}", list.join(","))).expect("address")
    }

    fn wait_ready(&self, i: usize) {
        let client = EtcdClient::new(self.member_addr(i), Duration::from_millis(500));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            // A member answers status only once it has joined; a write needs a leader.
            if client.ping().is_ok()
                && client
                    .put(b"/rig/ready", b"1", devlend_registry::LeaseId(0))
                    .is_ok()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {i} not ready in 30 s; log: {}",
                std::fs::read_to_string(self.dir.join(format!("m{i}.log"))).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills member `i` (SIGKILL) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts members on their data directories and waits until they answer (a quorum
    /// must come back together).
    pub fn restart(&mut self, members: &[usize]) {
        for &i in members {
            self.kill(i);
            self.spawn(i);
        }
        for &i in members {
            self.wait_ready(i);
        }
    }

    /// Kills every member.
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
