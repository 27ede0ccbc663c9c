//! Two emulated hosts on this machine: a lender `devlend node` in a child process and a
//! borrower node in this process, joined by the `shm` fabric. Used by `demo` and the benches.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use devlend_lending::{BorrowedFunction, Node, NodeConfig};

use crate::cmd::ctl::{self, CtlRequest};
use crate::host::{self, FabricSpec};

/// A lender process and a borrower node.
pub struct Pair {
    /// Scratch directory holding the fabric rendezvous, the lender's state and the images.
    pub dir: PathBuf,
    /// The lender's state directory.
    pub lender_state: PathBuf,
    lender: Option<Child>,
    /// The borrower (this process).
    pub borrower: Node,
    keep_dir: bool,
}

impl Pair {
    /// Starts both hosts under a fresh scratch directory in `parent`, and waits for the link.
    pub fn start(parent: &Path, fabric: Option<FabricSpec>) -> anyhow::Result<Pair> {
        let dir = parent.join(format!("devlend-pair-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let fabric = fabric.unwrap_or_else(|| FabricSpec::Shm(dir.join("fabric")));
        let lender_state = dir.join("lender");
        let log = std::fs::File::create(dir.join("lender.log"))?;
        let exe = std::env::current_exe()?;
        let lender = Command::new(exe)
            .args(["node", "--name", "lender", "--lease-ms", "2000", "--fabric"])
            .arg(fabric.to_string())
            .arg("--state")
            .arg(&lender_state)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting the lender node")?;
        let ntbs = host::open_fabrics(std::slice::from_ref(&fabric), &host::TcpAuth::default())?;
        let mut pair = Pair {
            dir,
            lender_state,
            lender: Some(lender),
            borrower: Node::start(NodeConfig::new("borrower"), ntbs)?,
            keep_dir: false,
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
                &CtlRequest::Status,
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
        let req = CtlRequest::Add {
            kind: "nvme".into(),
            name: name.into(),
            image: image.to_path_buf(),
            size: Some(size),
            serial: Some(format!("DEVLEND-{name}")),
            model: Some("devlend lent NVMe".into()),
        };
        ctl::call(&self.lender_state, &req, Duration::from_secs(30))?;
        Ok(())
    }

    /// Borrows `name` from the lender.
    pub fn borrow(&self, name: &str) -> anyhow::Result<Arc<BorrowedFunction>> {
        Ok(self.borrower.borrow(name)?)
    }

    /// Keeps the scratch directory after drop (for inspection).
    pub fn keep(&mut self) {
        self.keep_dir = true;
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        if let Some(mut child) = self.lender.take() {
            let _ = ctl::call(
                &self.lender_state,
                &CtlRequest::Shutdown,
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
        if !self.keep_dir {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
