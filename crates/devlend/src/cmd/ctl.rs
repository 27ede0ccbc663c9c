//! The management socket: the daemon's side (requests, dispatch) and the verbs' side (client).
//!
//! One JSON object per line each way over a UNIX stream socket in the node's state directory.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// File name of the management socket inside a state directory.
pub const SOCKET_NAME: &str = "node.sock";

/// Default state directory (override with `--state` or `DEVLEND_STATE`).
pub const DEFAULT_STATE: &str = "/tmp/devlend";

/// Options every management verb takes.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// The local node's state directory (where its socket lives).
    #[arg(long, env = "DEVLEND_STATE", default_value = DEFAULT_STATE)]
    pub state: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A request to the daemon.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "verb", rename_all = "snake_case")]
pub enum CtlRequest {
    /// Add a device this host lends.
    Add {
        /// Kind ("nvme").
        kind: String,
        /// Name.
        name: String,
        /// Backing image.
        image: PathBuf,
        /// Create the image with this size if missing.
        size: Option<u64>,
        /// Serial number.
        serial: Option<String>,
        /// Model string.
        model: Option<String>,
        /// Lend this many SR-IOV virtual functions (each its own device) instead of the
        /// device itself.
        #[serde(default)]
        vfs: Option<u16>,
        /// With `vfs`: `shared` (one namespace for all) or `private` (one per VF).
        #[serde(default)]
        vf_namespaces: Option<String>,
    },
    /// Lend a real PCI function through VFIO.
    AddVfio {
        /// Name.
        name: String,
        /// PCI address (DDDD:BB:DD.F).
        bdf: String,
        /// Move it to vfio-pci from the driver it has (given back when removed).
        bind: bool,
    },
    /// Devices here and on the peer.
    List,
    /// Borrow the peer's device.
    Borrow {
        /// Device name.
        name: String,
        /// Also serve it to a VMM on this vfio-user socket.
        vfio_user: Option<PathBuf>,
        /// Hot-add it to the running VM whose QMP socket this is.
        #[serde(default)]
        vm: Option<PathBuf>,
        /// The VM's hot-pluggable port to use (default: the first free one).
        #[serde(default)]
        port: Option<String>,
        /// The QEMU device id (default: `devlend-NAME`).
        #[serde(default)]
        id: Option<String>,
    },
    /// Give a borrowed device back.
    Return {
        /// Device name.
        name: String,
        /// For a device in a VM: how long the guest has to release it (milliseconds).
        #[serde(default)]
        grace_ms: Option<u64>,
    },
    /// Forced take-back of a device this host lends.
    Reclaim {
        /// Device name.
        name: String,
        /// Grace for the borrower, milliseconds.
        grace_ms: u64,
    },
    /// Node status.
    Status,
    /// Run the user-space NVMe driver on a borrowed device: write, read back, flush.
    Check {
        /// Device name.
        name: String,
        /// Bytes to write and verify.
        bytes: u64,
        /// Byte offset on the device.
        offset: u64,
    },
    /// Config-space snapshots of the devices this host sees (all, or one).
    Lspci {
        /// Only this device.
        name: Option<String>,
    },
    /// Every counter now (for `devlend top`).
    Metrics,
    /// Stop the daemon.
    Shutdown,
}

/// The daemon's answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct CtlResponse {
    /// Whether the request succeeded.
    pub ok: bool,
    /// Result data.
    #[serde(default)]
    pub result: serde_json::Value,
    /// What went wrong, for a person.
    #[serde(default)]
    pub error: Option<String>,
}

/// Sends one request to the node at `state` and returns its result (or its error).
pub fn call(
    state: &Path,
    req: &CtlRequest,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let what = serde_json::to_value(req)
        .ok()
        .and_then(|v| v["verb"].as_str().map(str::to_string))
        .unwrap_or_else(|| "working".into());
    let _progress = super::progress::Progress::start(what);
    let path = state.join(SOCKET_NAME);
    let mut stream = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot reach the devlend node at {} (start one with `devlend node --state {}`)",
            path.display(),
            state.display()
        )
    })?;
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader
        .read_line(&mut answer)
        .context("reading the node's answer")?;
    let resp: CtlResponse = serde_json::from_str(&answer)
        .with_context(|| format!("the node answered something unreadable: {answer:?}"))?;
    if resp.ok {
        Ok(resp.result)
    } else {
        anyhow::bail!(
            "{}",
            resp.error
                .unwrap_or_else(|| "the node refused without a reason".into())
        )
    }
}
