//! Two emulated hosts on this machine: a lender `devlend node` in a child process and a
//! borrower node in this process, joined by the `shm` fabric. Used by `demo` and the benches.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use devlend_lending::{BorrowedFunction, Node, NodeConfig};

use crate::cmd::ctl;
use crate::host::{self, FabricSpec};
use crate::proto;

/// A lender process and a borrower node.
pub struct Pair {
    /// Network namespaces of a tcp pair (lender in side 0, this process's link in side 1).
    netns: Option<devlend_testkit::netns::NetnsPair>,
    /// Scratch directory holding the fabric rendezvous, the lender's state and the images.
    pub dir: PathBuf,
    /// The lender's state directory.
    pub lender_state: PathBuf,
    lender: Option<Child>,
    /// The borrower (this process).
    pub borrower: Node,
    /// More borrower hosts in this process, each with its own address space and its own shm
    /// link to the lender (`Pair::start_with_borrowers`).
    pub more_borrowers: Vec<Node>,
    /// Last, so that the directory goes after the borrower nodes have stopped (a shm link
    /// whose peer left listens again at its rendezvous until its node stops).
    scratch: ScratchDir,
}

/// Removes the scratch directory when dropped, unless kept.
struct ScratchDir {
    path: PathBuf,
    keep: bool,
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

impl Pair {
    /// Starts both hosts on the `shm` fabric under a fresh scratch directory in `parent`, and
    /// waits for the link.
    pub fn start(parent: &Path) -> anyhow::Result<Pair> {
        Self::start_with_borrowers(parent, 0)
    }

    /// Like [`Pair::start`], with `more` further borrower hosts in this process
    /// (`borrower2`, `borrower3`, ...), each on its own shm link to the lender.
    pub fn start_with_borrowers(parent: &Path, more: usize) -> anyhow::Result<Pair> {
        let dir = Self::scratch(parent, "shm")?;
        let fabric = FabricSpec::Shm(dir.join("fabric"));
        let extra: Vec<FabricSpec> = (2..more + 2)
            .map(|i| FabricSpec::Shm(dir.join(format!("fabric-{i}"))))
            .collect();
        let mut lender_fabrics = vec![fabric.clone()];
        lender_fabrics.extend(extra.iter().cloned());
        let exe = std::env::current_exe()?;
        let mut pair = Self::launch(
            dir,
            Command::new(exe),
            &lender_fabrics,
            fabric,
            &[],
            host::TcpOptions::default(),
            None,
        )?;
        for (i, spec) in (2..).zip(&extra) {
            // Its own address space: a host of its own that happens to share this process.
            let ntbs =
                host::open_fabrics(std::slice::from_ref(spec), &host::TcpOptions::default())?;
            let node = Node::start(NodeConfig::new(format!("borrower{i}")), ntbs)?;
            node.wait_link_up(Duration::from_secs(20))
                .with_context(|| format!("the NTB link of borrower{i} did not come up"))?;
            pair.more_borrowers.push(node);
        }
        Ok(pair)
    }

    /// Starts both hosts on the `tcp` fabric: the lender in a network namespace, this process's
    /// link in another, joined by a veth pair, TLS with freshly generated keys. Needs root.
    pub fn start_tcp(parent: &Path) -> anyhow::Result<Pair> {
        let ns = devlend_testkit::netns::NetnsPair::create()
            .context("creating network namespaces (needs root)")?;
        let dir = Self::scratch(parent, "tcp")?;
        let keys = dir.join("keys");
        devlend_fabric_tcp::keys::generate(&keys, &["lender", "borrower"])?;
        let addr = std::net::SocketAddr::new(ns.addr(0).into(), 7790);
        let lender_fabric = FabricSpec::TcpListen {
            peer: "borrower".into(),
            addr,
        };
        let ours = FabricSpec::TcpConnect {
            peer: "lender".into(),
            addr,
        };
        let exe = std::env::current_exe()?;
        let cmd = ns.command(0, &exe.to_string_lossy());
        // This thread (and the fabric threads it starts) live in namespace 1 from here on.
        ns.enter(1)
            .context("entering the borrower's network namespace")?;
        let keys_arg = keys.to_string_lossy().into_owned();
        let auth = host::TcpOptions {
            host: "borrower".into(),
            keys: Some(keys),
            insecure: false,
            cpus: Default::default(),
        };
        Self::launch(
            dir,
            cmd,
            std::slice::from_ref(&lender_fabric),
            ours,
            &["--keys", &keys_arg],
            auth,
            Some(ns),
        )
    }

    /// The network namespaces of a tcp pair (lender in side 0, this process's link in side 1).
    pub fn netns(&self) -> Option<&devlend_testkit::netns::NetnsPair> {
        self.netns.as_ref()
    }

    fn scratch(parent: &Path, tag: &str) -> anyhow::Result<PathBuf> {
        let dir = parent.join(format!("devlend-pair-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    fn launch(
        dir: PathBuf,
        mut lender_cmd: Command,
        lender_fabrics: &[FabricSpec],
        ours: FabricSpec,
        lender_extra: &[&str],
        auth: host::TcpOptions,
        netns: Option<devlend_testkit::netns::NetnsPair>,
    ) -> anyhow::Result<Pair> {
        let lender_state = dir.join("lender");
        let log = std::fs::File::create(dir.join("lender.log"))?;
        lender_cmd.args(["node", "--name", "lender", "--lease-ms", "2000"]);
        for f in lender_fabrics {
            lender_cmd.arg("--fabric").arg(f.to_string());
        }
        let lender = lender_cmd
            .arg("--state")
            .arg(&lender_state)
            .args(lender_extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the lender node")?;
        let ntbs = host::open_fabrics(std::slice::from_ref(&ours), &auth)?;
        let mut pair = Pair {
            netns,
            scratch: ScratchDir {
                path: dir.clone(),
                keep: false,
            },
            dir,
            lender_state,
            lender: Some(lender),
            borrower: Node::start(NodeConfig::new("borrower"), ntbs)?,
            more_borrowers: Vec::new(),
        };
        pair.wait_lender()?;
        pair.borrower
            .wait_link_up(Duration::from_secs(20))
            .context("the NTB link did not come up")?;
        Ok(pair)
    }

    fn wait_lender(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if ctl::call(
                &self.lender_state,
                proto::StatusRequest,
                Duration::from_secs(5),
            )
            .is_ok()
            {
                return Ok(());
            }
            if let Some(Ok(Some(status))) = self.lender.as_mut().map(|c| c.try_wait()) {
                let log = std::fs::read_to_string(self.dir.join("lender.log")).unwrap_or_default();
                anyhow::bail!("the lender node exited ({status}): {log}");
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the lender node did not start in 20 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Asks the lender to add an NVMe device backed by `image` (created with `size`).
    pub fn lender_add_nvme(&self, name: &str, image: &Path, size: u64) -> anyhow::Result<()> {
        ctl::call(
            &self.lender_state,
            nvme_request(name, image, size),
            Duration::from_secs(30),
        )?;
        Ok(())
    }

    /// Like [`Pair::lender_add_nvme`] with a Controller Memory Buffer of `cmb` bytes
    /// (`devlend add nvme --cmb SIZE`).
    pub fn lender_add_nvme_cmb(
        &self,
        name: &str,
        image: &Path,
        size: u64,
        cmb: u64,
    ) -> anyhow::Result<()> {
        let req = proto::AddRequest {
            cmb: Some(cmb),
            ..nvme_request(name, image, size)
        };
        ctl::call(&self.lender_state, req, Duration::from_secs(30))?;
        Ok(())
    }

    /// Asks the lender to add an NVMe physical function backed by `image` with `vfs` virtual
    /// functions offered as `NAME-vf1` ... (`devlend add nvme --vfs N --vf-namespaces NS`).
    pub fn lender_add_nvme_vfs(
        &self,
        name: &str,
        image: &Path,
        size: u64,
        vfs: u16,
        namespaces: &str,
    ) -> anyhow::Result<proto::AddReply> {
        let req = proto::AddRequest {
            vfs: Some(vfs),
            vf_namespaces: Some(namespaces.into()),
            ..nvme_request(name, image, size)
        };
        ctl::call(&self.lender_state, req, Duration::from_secs(30))
    }

    /// Borrows `name` from the lender.
    pub fn borrow(&self, name: &str) -> anyhow::Result<Arc<BorrowedFunction>> {
        Ok(self.borrower.borrow(name)?)
    }

    /// Keeps the scratch directory after drop (for inspection).
    pub fn keep(&mut self) {
        self.scratch.keep = true;
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let Some(mut child) = self.lender.take() {
            let _ = ctl::call(
                &self.lender_state,
                proto::ShutdownRequest,
                Duration::from_secs(2),
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // The scratch directory goes with the last field, after the borrower nodes.
        drop(self.netns.take());
    }
}

/// The demo's `add nvme` request: a whole function, its serial and model named after it.
pub(crate) fn nvme_request(name: &str, image: &Path, size: u64) -> proto::AddRequest {
    proto::AddRequest {
        kind: "nvme".into(),
        name: name.into(),
        image: image.to_path_buf(),
        size: Some(size),
        serial: Some(format!("DEVLEND-{name}")),
        model: Some("devlend lent NVMe".into()),
        queues: None,
        vfs: None,
        vf_namespaces: None,
        cmb: None,
    }
}
