//! Helpers shared by the integration tests: `devlend node` processes driven through the CLI.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `devlend status --json` on this node.
pub fn status(node: &NodeProcess) -> serde_json::Value {
    node.ctl_json(&["status"])
}

/// The names of the devices this node holds as a borrower (`status`'s `borrowed`).
pub fn borrowed_names(node: &NodeProcess) -> Vec<String> {
    status(node)["borrowed"]
        .as_array()
        .expect("status lists borrowed devices")
        .iter()
        .filter_map(|d| d["name"].as_str().map(str::to_string))
        .collect()
}

/// Polls `cond` until it holds, at most `secs` (a bound on liveness, not a measurement);
/// returns how long it took.
pub fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what}: not within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// QEMU, the guest kernel and initramfs for the VM tests, or `None` (printed) where this
/// machine cannot provision them outside CI.
pub fn vm_assets() -> Option<devlend_testkit::guest::VmAssets> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    devlend_testkit::guest::provision_for_tests(&repo).expect("provisioning VM assets")
}

/// The binary under test.
pub fn exe() -> &'static str {
    env!("CARGO_BIN_EXE_devlend")
}

/// Runs `cmd`, which must succeed (the failure names `what` and carries stderr); returns its
/// output.
pub fn output_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `devlend keygen [EXTRA…] --dir KEYS NAMES…`, which must succeed; returns its output.
pub fn keygen(keys: &Path, extra: &[&str], names: &[&str]) -> Output {
    let mut cmd = Command::new(exe());
    cmd.arg("keygen")
        .args(extra)
        .arg("--dir")
        .arg(keys)
        .args(names);
    output_ok(&mut cmd, "devlend keygen")
}

/// `devlend ARGS…` (a `bench … --json` command) run in `tmp`, which must succeed and print
/// one JSON object naming `args[1]` as its bench; returns that object.
pub fn bench_json(tmp: &TempRoot, args: &[&str]) -> serde_json::Value {
    let out = output_ok(tmp.command(exe()).args(args), &format!("devlend {args:?}"));
    let stdout = String::from_utf8(out.stdout).expect("utf-8 output");
    let json: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(json["bench"], args[1], "{json}");
    json
}

/// A fresh scratch directory.
pub fn scratch(tag: &str) -> PathBuf {
    scratch_dir(tag).keep()
}

/// The `figures` array of a bench's JSON.
pub fn figures(json: &serde_json::Value) -> &[serde_json::Value] {
    json["figures"].as_array().expect("figures array")
}

/// The figure named `name`; panics, naming the figures there are, when there is none.
pub fn figure<'a>(figures: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    figures
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| {
            let names: Vec<&str> = figures.iter().filter_map(|f| f["name"].as_str()).collect();
            panic!("missing figure {name:?} in {names:?}")
        })
}

pub use devlend_testkit::scratch::ScratchDir;

/// A fresh scratch directory `devlend-test-TAG-PID` ([`scratch`]), created, removed with what
/// is in it when dropped (passed or failed), after the directories dead test processes left
/// are swept.
pub fn scratch_dir(tag: &str) -> ScratchDir {
    ScratchDir::fresh("devlend-test", tag).unwrap()
}

/// A `devlend node` process, killed on drop.
pub struct NodeProcess {
    child: Child,
    /// Its state directory.
    pub state: PathBuf,
}

impl NodeProcess {
    /// Starts a node on shm links in `fabric_dirs`.
    pub fn start(dir: &Path, name: &str, fabric_dirs: &[&Path], lease_ms: u64) -> NodeProcess {
        let fabrics: Vec<String> = fabric_dirs
            .iter()
            .map(|f| format!("shm:{}", f.display()))
            .collect();
        Self::start_with(Command::new(exe()), dir, name, &fabrics, lease_ms, &[])
    }

    /// Starts a node from `cmd` (e.g. `ip netns exec NS devlend`) with these links and extra flags.
    pub fn start_with(
        mut cmd: Command,
        dir: &Path,
        name: &str,
        fabrics: &[String],
        lease_ms: u64,
        extra: &[&str],
    ) -> NodeProcess {
        let state = dir.join(name);
        cmd.args([
            "node",
            "--name",
            name,
            "--lease-ms",
            &lease_ms.to_string(),
            "--state",
        ])
        .arg(&state);
        for f in fabrics {
            cmd.arg("--fabric").arg(f);
        }
        cmd.args(extra);
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let node = NodeProcess { child, state };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !node.ctl(&["status"]).status.success() {
            assert!(Instant::now() < deadline, "node {name} did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        node
    }

    /// The node's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs a management verb against this node.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(exe())
            .args(args)
            .arg("--state")
            .arg(&self.state)
            .output()
            .unwrap()
    }

    /// Runs a verb that must succeed; returns its stdout.
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "devlend {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `devlend add nvme --name NAME --size SIZE --image IMAGE`, which must succeed.
    pub fn add_nvme(&self, name: &str, image: &Path, size: &str) -> String {
        let image = image.to_str().expect("a UTF-8 image path");
        self.ctl_ok(&[
            "add", "nvme", "--name", name, "--size", size, "--image", image,
        ])
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Who holds `device` according to this (lending) node.
    pub fn borrower_of(&self, device: &str) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.ctl_ok(&["list", "--json"])).unwrap();
        let d = v["local"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == device)
            .cloned()
            .unwrap();
        d["borrower"].as_str().map(str::to_string)
    }

    /// Waits until `device` is no longer lent (returned, or its lease expired), at most
    /// `timeout`; panics with `why` otherwise.
    pub fn wait_available(&self, device: &str, timeout: Duration, why: &str) {
        let deadline = Instant::now() + timeout;
        while self.borrower_of(device).is_some() {
            assert!(Instant::now() < deadline, "{why}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the peer's devices are listed (the link is up and answering).
    pub fn wait_peer_lists(&self, device: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.ctl(&["list"]);
            if out.status.success() && String::from_utf8_lossy(&out.stdout).contains(device) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the peer's {device} never showed up"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// This test process as a borrower host `name` on the shm fabrics `fabrics`, its links up.
pub fn borrower_here(name: &str, fabrics: &[&Path]) -> devlend_lending::Node {
    let asp = std::sync::Arc::new(devlend_fabric::AddressSpace::new());
    let ntbs = fabrics
        .iter()
        .map(|f| {
            devlend_fabric::ShmNtb::open(f, asp.clone(), devlend_fabric::LinkConfig::default())
                .unwrap() as std::sync::Arc<dyn devlend_fabric::Ntb>
        })
        .collect();
    let node = devlend_lending::Node::start(devlend_lending::NodeConfig::new(name), ntbs).unwrap();
    node.wait_link_up(Duration::from_secs(30)).unwrap();
    node
}

/// A scratch directory with a `devlend node` lender on its shm fabric, lending `nvme0`.
pub struct ShmLender {
    /// The scratch directory.
    pub dir: PathBuf,
    /// The shm fabric (`DIR/fabric`).
    pub fabric: PathBuf,
    /// `nvme0`'s image (`DIR/lent.img`).
    pub image: PathBuf,
    /// The lender node.
    pub lender: NodeProcess,
}

impl ShmLender {
    /// A fresh scratch directory `tag` and a lender with lease `lease_ms` on its fabric,
    /// lending `nvme0` of `size` (`devlend add nvme --size`).
    pub fn start(tag: &str, lease_ms: u64, size: &str) -> ShmLender {
        let dir = scratch(tag);
        let fabric = dir.join("fabric");
        let image = dir.join("lent.img");
        let lender = NodeProcess::start(&dir, "lender", &[&fabric], lease_ms);
        lender.add_nvme("nvme0", &image, size);
        ShmLender {
            dir,
            fabric,
            image,
            lender,
        }
    }

    /// A borrower `devlend node` process on the same fabric.
    pub fn borrower(&self, lease_ms: u64) -> NodeProcess {
        NodeProcess::start(&self.dir, "borrower", &[&self.fabric], lease_ms)
    }
}

/// The bytes `devlend check --offset OFF` writes at position `i` of its buffer.
pub fn check_pattern_byte(i: usize, offset: u64) -> u8 {
    ((i as u64).wrapping_mul(2654435761).wrapping_add(offset) as u8) ^ ((i >> 12) as u8)
}

impl NodeProcess {
    /// Runs a verb with `--json` that must succeed; returns its parsed stdout.
    pub fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ctl_ok(&a);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("devlend {args:?}: {e}: {out}"))
    }

    /// Runs a verb with `--json` that must fail; returns its JSON error's code and message.
    pub fn ctl_err(&self, args: &[&str]) -> (String, String) {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ctl(&a);
        assert!(
            !out.status.success(),
            "devlend {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        json_error(&out.stderr)
    }
}

/// The code and message of a `--json` error on stderr.
pub fn json_error(stderr: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON error on stderr: {text}"));
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    (
        v["error"]["code"].as_str().unwrap_or("").to_string(),
        v["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

/// Fills `path` with `len` bytes of a pattern derived from `seed`; returns them.
pub fn fill_image(path: &Path, len: usize, seed: u8) -> Vec<u8> {
    let data: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// A fresh temporary root for child processes (`TMPDIR`): whatever they leave there is found
/// by [`TempRoot::assert_empty`], and the root itself is removed on drop.
pub struct TempRoot {
    /// The directory.
    pub path: PathBuf,
}

impl TempRoot {
    /// A new, empty root.
    pub fn new(tag: &str) -> TempRoot {
        let path = scratch(&format!("tmproot-{tag}"));
        TempRoot { path }
    }

    /// `cmd` with `TMPDIR` pointing here.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.env("TMPDIR", &self.path);
        c
    }

    /// Panics, naming them, if files or directories are left in the root.
    pub fn assert_empty(&self) {
        let left: Vec<String> = std::fs::read_dir(&self.path)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(left.is_empty(), "left behind in the temp root: {left:?}");
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
