//! Boots a throw-away QEMU guest (TCG) that runs one shell script and powers off: the harness
//! behind the VM tests and `devlend bench vm`.
//!
//! The assets come from `scripts/vm-setup.sh` (QEMU 11 from trixie-backports, a Debian cloud
//! kernel, a busybox initramfs whose `/init` runs `/test.sh`). [`boot`] appends the script as a
//! second cpio archive, starts QEMU with guest RAM in a shareable memfd (vfio-user needs it),
//! streams the serial console line by line to a callback, and kills the guest at a hard timeout.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod bundle;
pub mod live;

/// Printed by the guest's `/init` with the script's exit status.
pub const EXIT_MARKER: &str = "DEVLEND-TEST-EXIT ";

/// Errors of provisioning and booting.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// `scripts/vm-setup.sh` failed.
    #[error("vm-setup.sh failed ({status}): {stderr}")]
    Setup {
        /// Exit status.
        status: String,
        /// Its last lines of stderr.
        stderr: String,
    },
    /// The env file lacks a key.
    #[error("{file}: missing {key}")]
    MissingKey {
        /// The env file.
        file: String,
        /// The key.
        key: &'static str,
    },
    /// File or process I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was attempted.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuestError {
    let what = what.into();
    move |source| GuestError::Io { what, source }
}

/// QEMU, kernel and initramfs, as provisioned.
#[derive(Clone, Debug)]
pub struct VmAssets {
    /// The QEMU wrapper (runs the unpacked binary with its own loader).
    pub qemu: PathBuf,
    /// The kernel image.
    pub kernel: PathBuf,
    /// The base initramfs (uncompressed newc cpio).
    pub initramfs: PathBuf,
}

impl VmAssets {
    /// Runs `REPO/scripts/vm-setup.sh` (fast when everything is cached) and reads what it
    /// printed. The cache is `$DEVLEND_CACHE` or `REPO/.cache`.
    pub fn provision(repo: &Path) -> Result<Self, GuestError> {
        let script = repo.join("scripts/vm-setup.sh");
        let out = Command::new("bash")
            .arg(&script)
            .stdin(Stdio::null())
            .output()
            .map_err(io(format!("running {}", script.display())))?;
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = err.lines().rev().take(15).collect();
            return Err(GuestError::Setup {
                status: out.status.to_string(),
                stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            });
        }
        Self::parse(
            &String::from_utf8_lossy(&out.stdout),
            &script.display().to_string(),
        )
    }

    /// Reads a `vm.env` file written by `vm-setup.sh`.
    pub fn from_env_file(path: &Path) -> Result<Self, GuestError> {
        let text =
            std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))?;
        Self::parse(&text, &path.display().to_string())
    }

    fn parse(text: &str, file: &str) -> Result<Self, GuestError> {
        let get = |key: &'static str| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| PathBuf::from(v.trim()))
                .ok_or(GuestError::MissingKey {
                    file: file.to_string(),
                    key,
                })
        };
        Ok(Self {
            qemu: get("DEVLEND_QEMU")?,
            kernel: get("DEVLEND_KERNEL")?,
            initramfs: get("DEVLEND_INITRAMFS")?,
        })
    }
}

/// The disk the guest sees as its NVMe controller.
#[derive(Clone, Debug)]
pub enum GuestDisk {
    /// A vfio-user server listening on this socket (`vfio-user-pci`).
    VfioUser {
        /// The server's socket.
        socket: PathBuf,
    },
    /// QEMU's built-in NVMe controller on a raw image (the baseline).
    QemuNvme {
        /// The image file.
        image: PathBuf,
    },
}

/// One guest run.
#[derive(Clone, Debug)]
pub struct GuestSpec {
    /// What to boot with.
    pub assets: VmAssets,
    /// The NVMe device.
    pub disk: GuestDisk,
    /// Further NVMe devices, after `disk` on the command line (none by default).
    pub more_disks: Vec<GuestDisk>,
    /// Contents of `/test.sh` (a busybox `sh` script).
    pub script: String,
    /// Hard limit for the whole run; the guest is killed after it.
    pub timeout: Duration,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Where to put the per-run initramfs (a scratch directory).
    pub work_dir: PathBuf,
    /// Extra kernel command-line words (e.g. `loglevel=7` for debugging).
    pub append: String,
    /// Further initramfs layers (newc cpio archives, e.g. a [`bundle::Bundle`]'s) after the
    /// script's (none by default).
    pub layers: Vec<Vec<u8>>,
}

impl GuestSpec {
    /// 512 MiB, one vCPU, a two-minute limit.
    pub fn new(
        assets: VmAssets,
        disk: GuestDisk,
        script: impl Into<String>,
        work_dir: &Path,
    ) -> Self {
        Self {
            assets,
            disk,
            more_disks: Vec::new(),
            script: script.into(),
            timeout: Duration::from_secs(120),
            mem_mib: 512,
            cpus: 1,
            work_dir: work_dir.to_path_buf(),
            append: String::new(),
            layers: Vec::new(),
        }
    }
}

/// What a run produced.
#[derive(Clone, Debug)]
pub struct GuestOutput {
    /// Serial console lines.
    pub console: Vec<String>,
    /// QEMU's own stderr.
    pub qemu_stderr: String,
    /// The script's exit status, when the guest printed it.
    pub exit_code: Option<i32>,
    /// The run hit the timeout and the guest was killed.
    pub timed_out: bool,
    /// Wall time of the run.
    pub elapsed: Duration,
}

impl GuestOutput {
    /// Whether the script ran to completion with status 0.
    pub fn passed(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }

    /// Console lines starting with `prefix` (the prefix stripped).
    pub fn lines_with<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.console
            .iter()
            .filter_map(move |l| l.trim_end_matches('\r').strip_prefix(prefix))
    }

    /// The whole console, for failure messages.
    pub fn transcript(&self) -> String {
        format!(
            "{}\n--- qemu stderr ---\n{}",
            self.console.join("\n"),
            self.qemu_stderr
        )
    }
}

/// Boots the guest, waits for it to power off (or the timeout), and returns its console.
pub fn boot(spec: &GuestSpec) -> Result<GuestOutput, GuestError> {
    boot_with(spec, |_| {})
}

/// As [`boot`], calling `on_line` with each console line as it arrives (e.g. to take server
/// counters when the guest prints a marker).
pub fn boot_with(
    spec: &GuestSpec,
    mut on_line: impl FnMut(&str),
) -> Result<GuestOutput, GuestError> {
    std::fs::create_dir_all(&spec.work_dir).map_err(io("creating the work dir"))?;
    let initrd = spec.work_dir.join("initrd.cpio");
    let mut image = std::fs::read(&spec.assets.initramfs)
        .map_err(io(format!("reading {}", spec.assets.initramfs.display())))?;
    image.extend_from_slice(&cpio_newc(&[("test.sh", 0o100755, spec.script.as_bytes())]));
    for layer in &spec.layers {
        image.extend_from_slice(layer);
    }
    std::fs::write(&initrd, &image).map_err(io("writing the initrd"))?;

    let mut cmd = Command::new(&spec.assets.qemu);
    cmd.args(["-accel", "tcg", "-nographic", "-no-reboot", "-nic", "none"])
        .args(["-m", &format!("{}", spec.mem_mib)])
        .args(["-smp", &format!("{}", spec.cpus)])
        .args([
            "-object",
            &format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                spec.mem_mib
            ),
        ])
        .args(["-machine", "memory-backend=mem"])
        .arg("-kernel")
        .arg(&spec.assets.kernel)
        .arg("-initrd")
        .arg(&initrd)
        .arg("-append")
        // `no_timer_check`: under TCG on a loaded host the kernel's check that the IO-APIC
        // delivers timer interrupts can time out, and it then panics at boot ("IO-APIC + timer
        // doesn't work!", seen in CI with 6 processes on 2 cores); the timer itself works.
        .arg(format!(
            "console=ttyS0 quiet panic=-1 no_timer_check {}",
            spec.append
        ));
    for (i, disk) in std::iter::once(&spec.disk)
        .chain(&spec.more_disks)
        .enumerate()
    {
        disk_args(&mut cmd, disk, i);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(io(format!("starting {}", spec.assets.qemu.display())))?;
    let result = collect(&mut child, spec.timeout, start, &mut on_line);
    // Whatever happened, the guest does not outlive the run.
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Adds the QEMU arguments of the `index`th NVMe device.
fn disk_args(cmd: &mut Command, disk: &GuestDisk, index: usize) {
    match disk {
        GuestDisk::VfioUser { socket } => {
            let dev = serde_json::json!({
                "driver": "vfio-user-pci",
                "socket": {"path": socket.display().to_string(), "type": "unix"},
            });
            cmd.args(["-device", &dev.to_string()]);
        }
        GuestDisk::QemuNvme { image } => {
            // The first keeps the names it always had (serial `qemu-nvme`).
            let id = match index {
                0 => String::new(),
                i => i.to_string(),
            };
            cmd.arg("-drive")
                .arg(format!(
                    "file={},if=none,id=nvm{id},format=raw",
                    image.display()
                ))
                .arg("-device")
                .arg(format!("nvme,drive=nvm{id},serial=qemu-nvme{id}"));
        }
    }
}

fn collect(
    child: &mut Child,
    timeout: Duration,
    start: Instant,
    on_line: &mut impl FnMut(&str),
) -> Result<GuestOutput, GuestError> {
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        if let Some(out) = stdout {
            for line in BufReader::new(out).split(b'\n') {
                let Ok(line) = line else { break };
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    break;
                }
            }
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let mut console = Vec::new();
    let mut timed_out = false;
    loop {
        let left = timeout.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => {
                on_line(line.trim_end_matches('\r'));
                console.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                timed_out = true;
                let _ = child.kill();
                break;
            }
        }
    }
    let _ = child.wait();
    let _ = reader.join();
    let qemu_stderr = err_reader.join().unwrap_or_default();
    let exit_code = console.iter().rev().find_map(|l| {
        let t = l.trim_end_matches('\r');
        let pos = t.find(EXIT_MARKER)?;
        t.get(pos + EXIT_MARKER.len()..)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    });
    Ok(GuestOutput {
        console,
        qemu_stderr,
        exit_code,
        timed_out,
        elapsed: start.elapsed(),
    })
}

/// A newc cpio archive of regular files `(name, mode, contents)`, with its trailer.
pub fn cpio_newc(files: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut entry = |ino: u32, name: &str, mode: u32, data: &[u8]| {
        let namesize = name.len() + 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            namesize as u32,
            0,
        ];
        let _ = write!(out, "070701");
        for f in fields {
            let _ = write!(out, "{f:08x}");
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() % 4 != 0 {
            out.push(0);
        }
    };
    for (i, (name, mode, data)) in files.iter().enumerate() {
        entry(i as u32 + 1, name, *mode, data);
    }
    entry(0, "TRAILER!!!", 0, &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_layout() {
        let a = cpio_newc(&[("test.sh", 0o100755, b"#!/bin/sh\n")]);
        assert!(a.starts_with(b"070701"));
        assert_eq!(a.len() % 4, 0);
        assert!(a.windows(10).any(|w| w == b"TRAILER!!!"));
        assert!(a.windows(10).any(|w| w == b"#!/bin/sh\n"));
    }

    #[test]
    fn env_file_parses() {
        let a = VmAssets::parse(
            "DEVLEND_QEMU=/q\nDEVLEND_KERNEL=/k\nDEVLEND_INITRAMFS=/i\n",
            "t",
        )
        .unwrap();
        assert_eq!(a.kernel, PathBuf::from("/k"));
        assert!(VmAssets::parse("DEVLEND_QEMU=/q\n", "t").is_err());
    }
}

/// What a vfio-user server process prints on stderr (followed by the socket path) once it
/// accepts connections: `devlend serve` and `devlend node` (for `borrow --vfio-user`) print
/// it in their logs; any server command run by [`ServerProcess::spawn`] must.
pub const SERVER_READY: &str = "vfio-user server listening on ";

/// What a vfio-user server process prints on stderr after a client left and the device was
/// reset (followed by its message counters).
pub const CLIENT_LEFT: &str = "client left";

/// A vfio-user server running as a child process (`devlend serve ...`, `devlend borrow ...`),
/// killed when dropped. Its stderr is collected.
pub struct ServerProcess {
    child: Child,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ServerProcess {
    /// Starts `cmd` and waits (at most `timeout`) until it prints [`SERVER_READY`].
    pub fn spawn(mut cmd: Command, timeout: Duration) -> Result<Self, GuestError> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(format!("starting {cmd:?}")))?;
        let stderr = child.stderr.take();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let log2 = log.clone();
        let reader = std::thread::spawn(move || {
            let Some(err) = stderr else { return };
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                if let Ok(mut l) = log2.lock() {
                    l.push(line.clone());
                }
                let _ = tx.send(line);
            }
        });
        let mut me = Self {
            child,
            log,
            lines: rx,
            reader: Some(reader),
        };
        match me.wait_for(SERVER_READY, timeout) {
            Some(_) => Ok(me),
            None => {
                let log = me.stop();
                Err(GuestError::Io {
                    what: format!("server did not get ready: {}", log.join("\n")),
                    source: std::io::ErrorKind::TimedOut.into(),
                })
            }
        }
    }

    /// Waits (at most `timeout`) for a stderr line containing `needle` that this method has not
    /// yet seen; returns it, or `None` at the timeout or when the process's stderr ends.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return Some(line),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Its stderr so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills it and returns its whole stderr.
    pub fn stop(&mut self) -> Vec<String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.log()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Provisioning for a test: `Ok(Some(assets))` when ready, `Ok(None)` (with the reason
/// printed) when this machine cannot run guests — not root, or a host tool cannot be
/// installed — and never `Ok(None)` when the `CI` environment variable is set.
pub fn provision_for_tests(repo: &Path) -> Result<Option<VmAssets>, GuestError> {
    match VmAssets::provision(repo) {
        Ok(a) => Ok(Some(a)),
        Err(GuestError::Setup { status, stderr })
            if std::env::var_os("CI").is_none()
                && (status.contains("exit status: 2") || status.contains("exit status: 3")) =>
        {
            eprintln!("SKIPPED: this machine cannot provision VM guests ({status}): {stderr}");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// A device that disappears under a running guest (a borrowed device whose lender dies): the
/// guest does I/O, prints [`vanish::MARKER`] for the host to take the device away, then reads
/// until its I/O fails. The guest must see errors and power off; nothing may hang.
pub mod vanish {
    use std::path::Path;
    use std::time::Duration;

    use super::{GuestDisk, GuestOutput, GuestSpec, VmAssets};

    /// The console line on which the host takes the device away.
    pub const MARKER: &str = "TAKE-THE-DEVICE-AWAY-NOW";

    const SCRIPT: &str = r#"#!/bin/sh
while [ ! -e /sys/block/nvme0n1 ]; do sleep 0.1; done
dd if=/dev/zero of=/dev/nvme0n1 bs=4096 count=16 oflag=direct 2>/dev/null && echo "IO-BEFORE-OK"
echo "TAKE-THE-DEVICE-AWAY-NOW"
# Keep reading until the device is gone (bounded): the host takes it away on the line above.
i=0
while dd if=/dev/nvme0n1 of=/dev/null bs=4096 count=16 iflag=direct 2>/dev/null; do
    i=$((i + 1))
    [ $i -gt 20000 ] && { echo "IO-AFTER never failed"; exit 1; }
done
echo "IO-AFTER-FAILED after $i more reads"
dmesg | grep -i nvme | tail -4
"#;

    /// The guest for a vfio-user device on `socket`, with short nvme timeouts.
    pub fn spec(assets: VmAssets, socket: &Path, work_dir: &Path) -> GuestSpec {
        let disk = GuestDisk::VfioUser {
            socket: socket.to_path_buf(),
        };
        let mut spec = GuestSpec::new(assets, disk, SCRIPT, work_dir);
        spec.timeout = Duration::from_secs(110);
        spec.append = "nvme_core.io_timeout=5 nvme_core.admin_timeout=5".into();
        spec
    }

    /// Boots the guest of [`spec`], calls `take_away` when it prints [`MARKER`], and
    /// [`check`]s what it saw; returns its output.
    pub fn run(
        assets: VmAssets,
        socket: &Path,
        work_dir: &Path,
        mut take_away: impl FnMut(),
    ) -> GuestOutput {
        let out = super::boot_with(&spec(assets, socket, work_dir), |line| {
            if line.contains(MARKER) {
                take_away();
            }
        })
        .expect("boot");
        check(&out);
        out
    }

    /// Panics with the transcript unless the guest did I/O, saw it fail after the device went
    /// away, and finished in time.
    pub fn check(out: &GuestOutput) {
        let transcript = out.transcript();
        assert!(
            !out.timed_out,
            "guest hung after the device went away\n{transcript}"
        );
        assert!(
            out.lines_with("IO-BEFORE-OK").next().is_some(),
            "no I/O before the device went away\n{transcript}"
        );
        assert!(
            out.console.iter().any(|l| l.contains("IO-AFTER-FAILED")),
            "I/O after the device went away must fail\n{transcript}"
        );
    }
}

/// The guest workload shared by the VM tests: what the guest must show for an NVMe device to
/// count as working, and what the host checks afterwards in the backing image.
pub mod acceptance {
    /// Where in the disk the guest writes [`pattern`] with O_DIRECT (past the file system).
    pub const PATTERN_OFFSET: u64 = 48 << 20;
    /// Length of the pattern.
    pub const PATTERN_LEN: usize = 64 << 10;
    /// Size of the file system mke2fs creates at the start of the disk, in KiB.
    pub const FS_KIB: u64 = 32 << 10;
    /// Disk size the acceptance script expects at least.
    pub const MIN_DISK_BYTES: u64 = 64 << 20;
    /// Printed by the guest when every check passed.
    pub const PASS_MARKER: &str = "DEVLEND-VM-PASS";

    /// Prints the lines of an acceptance run's console that say what the guest found (its
    /// driver and model, the CMB messages, the O_DIRECT and file-system checks), for the log.
    pub fn print_findings(out: &super::GuestOutput) {
        for line in out
            .console
            .iter()
            .filter(|l| l.starts_with("NVME-") || l.starts_with("ODIRECT-") || l.starts_with("FS-"))
        {
            println!("guest: {line}");
        }
    }

    /// The bytes written at [`PATTERN_OFFSET`] (what `yes devlend-vm-pattern | head -c` makes).
    pub fn pattern() -> Vec<u8> {
        b"devlend-vm-pattern\n"
            .iter()
            .copied()
            .cycle()
            .take(PATTERN_LEN)
            .collect()
    }

    /// The start of a guest script: `fail` (print the failure marker and exit 1), and a wait
    /// of at most 30 s for the nvme driver's disk.
    const WAIT_FOR_DISK: &str = r#"fail() { echo "DEVLEND-VM-FAIL: $*"; exit 1; }
i=0
while [ ! -e /sys/block/nvme0n1 ]; do
    i=$((i + 1)); [ $i -gt 300 ] && fail "no /sys/block/nvme0n1 after 30 s"
    sleep 0.1
done
"#;

    /// Printed by the second guest when the first guest's files survived.
    pub const REUSE_MARKER: &str = "DEVLEND-VM-REUSE-PASS";

    /// The `/test.sh` of a second guest on the same server after [`script`]'s guest left: the
    /// device was reset and is served again, and the file system written before is intact.
    pub fn reuse_script(disk_bytes: u64) -> String {
        let sectors = disk_bytes / 512;
        format!(
            r#"#!/bin/sh
{wait_for_disk}[ "$(cat /sys/block/nvme0n1/size)" = "{sectors}" ] || fail "size after reconnect"
mount -t ext2 /dev/nvme0n1 /mnt || fail "mount after reconnect"
cmp /bin/busybox /mnt/busybox.copy || fail "busybox copy differs after reconnect"
[ "$(cat /mnt/dir/small)" = hello-devlend ] || fail "small file differs after reconnect"
umount /mnt || fail "umount"
echo "{marker}"
"#,
            marker = REUSE_MARKER,
            wait_for_disk = WAIT_FOR_DISK,
        )
    }

    /// The `/test.sh` for a disk of `disk_bytes`: driver binds, namespace size, O_DIRECT
    /// write/read-back, mke2fs + mount + write + remount + read back. It also prints the
    /// kernel's nvme and CMB messages (`NVME-DMESG`).
    pub fn script(disk_bytes: u64) -> String {
        let sectors = disk_bytes / 512;
        let seek_blocks = PATTERN_OFFSET / 4096;
        let count = PATTERN_LEN / 4096;
        format!(
            r#"#!/bin/sh
{wait_for_disk}echo "NVME-BOUND driver=$(basename $(readlink /sys/block/nvme0n1/device/device/driver 2>/dev/null || readlink /sys/class/nvme/nvme0/device/driver))"
echo "NVME-MODEL $(cat /sys/class/nvme/nvme0/model 2>/dev/null)"
dmesg 2>/dev/null | grep -i -e cmb -e nvme | sed 's/^/NVME-DMESG /'
sectors=$(cat /sys/block/nvme0n1/size)
echo "NVME-SECTORS $sectors"
[ "$sectors" = "{sectors}" ] || fail "namespace has $sectors sectors, expected {sectors}"
yes devlend-vm-pattern | head -c {len} > /tmp/pattern
dd if=/tmp/pattern of=/dev/nvme0n1 bs=4096 seek={seek_blocks} count={count} oflag=direct 2>/dev/null || fail "O_DIRECT write"
dd if=/dev/nvme0n1 of=/tmp/back bs=4096 skip={seek_blocks} count={count} iflag=direct 2>/dev/null || fail "O_DIRECT read"
cmp /tmp/pattern /tmp/back || fail "O_DIRECT read-back differs"
echo "ODIRECT-OK {len} bytes at {offset}"
mke2fs /dev/nvme0n1 {fs_kib} >/tmp/mkfs.log 2>&1 || {{ cat /tmp/mkfs.log; fail "mke2fs"; }}
mount -t ext2 /dev/nvme0n1 /mnt || fail "mount"
cp /bin/busybox /mnt/busybox.copy || fail "copy"
yes devlend-file | head -c 300000 > /mnt/pattern.txt || fail "write file"
mkdir -p /mnt/dir && echo hello-devlend > /mnt/dir/small || fail "small file"
sync
umount /mnt || fail "umount"
mount -t ext2 /dev/nvme0n1 /mnt || fail "remount"
cmp /bin/busybox /mnt/busybox.copy || fail "busybox copy differs after remount"
yes devlend-file | head -c 300000 | cmp - /mnt/pattern.txt || fail "pattern file differs"
[ "$(cat /mnt/dir/small)" = hello-devlend ] || fail "small file differs"
echo "FS-OK $(ls /mnt | tr '\n' ' ')"
umount /mnt || fail "final umount"
grep nvme /proc/interrupts | head -3
echo "{pass}"
"#,
            len = PATTERN_LEN,
            offset = PATTERN_OFFSET,
            fs_kib = FS_KIB,
            pass = PASS_MARKER,
            wait_for_disk = WAIT_FOR_DISK,
        )
    }
}

/// The VM acceptance run shared by `tests/vm_*.rs`: a vfio-user server from `server` serving
/// the NVMe device backed by `image` (of `disk_bytes`), a guest running
/// [`acceptance::script`], a second guest on the same server running
/// [`acceptance::reuse_script`], and the host-side check of the image afterwards.
///
/// Returns the guest's output; panics (it is test support) with the full transcript when a
/// check fails.
pub fn run_acceptance(
    assets: VmAssets,
    server: Command,
    socket: &Path,
    image: &Path,
    disk_bytes: u64,
    work_dir: &Path,
) -> GuestOutput {
    let mut srv = match ServerProcess::spawn(server, Duration::from_secs(30)) {
        Ok(s) => s,
        Err(e) => panic!("vfio-user server: {e}"),
    };
    let mut spec = GuestSpec::new(
        assets,
        GuestDisk::VfioUser {
            socket: socket.to_path_buf(),
        },
        acceptance::script(disk_bytes),
        work_dir,
    );
    spec.timeout = Duration::from_secs(110);
    let out = match boot(&spec) {
        Ok(o) => o,
        Err(e) => panic!("booting the guest: {e}"),
    };
    // QEMU is gone, so the server sees the client leave, resets the device and (if it prints
    // [`CLIENT_LEFT`], as `devlend serve` does) reports its counters.
    let left = srv.wait_for(CLIENT_LEFT, Duration::from_secs(5));
    // A second guest on the same server: served again after the reset, data intact.
    let reuse = if out.passed() {
        spec.script = acceptance::reuse_script(disk_bytes);
        boot(&spec).ok()
    } else {
        None
    };
    let alive = srv.is_running();
    let server_log = srv.stop();
    if let Some(l) = &left {
        println!("server: {l}");
    }
    let context = || {
        format!(
            "{}\n--- server stderr ---\n{}",
            out.transcript(),
            server_log.join("\n")
        )
    };
    assert!(
        !out.timed_out,
        "guest timed out after {:?}\n{}",
        out.elapsed,
        context()
    );
    assert!(alive, "the server died during the run\n{}", context());
    assert!(
        out.passed() && out.lines_with(acceptance::PASS_MARKER).next().is_some(),
        "guest checks failed (exit {:?})\n{}",
        out.exit_code,
        context()
    );
    let reused = reuse
        .as_ref()
        .is_some_and(|r| r.passed() && r.lines_with(acceptance::REUSE_MARKER).next().is_some());
    assert!(
        reused,
        "a second guest on the same server failed\n{}\n--- second guest ---\n{}",
        context(),
        reuse.map(|r| r.transcript()).unwrap_or_default()
    );
    let mut f = std::fs::File::open(image).unwrap_or_else(|e| panic!("opening the image: {e}"));
    let mut got = vec![0u8; acceptance::PATTERN_LEN];
    let read = std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(acceptance::PATTERN_OFFSET))
        .and_then(|_| f.read_exact(&mut got));
    assert!(read.is_ok(), "reading the image: {read:?}");
    assert!(
        got == acceptance::pattern(),
        "the image does not hold the guest's O_DIRECT pattern at {:#x}\n{}",
        acceptance::PATTERN_OFFSET,
        context()
    );
    out
}
