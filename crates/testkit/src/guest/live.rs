//! A guest that keeps running while the test works on it: a q35 machine with guest RAM in a
//! shareable memfd, a QMP socket, free PCIe root ports and no NVMe device, whose `/test.sh`
//! is a command loop on the serial console. The test sends shell commands and reads their
//! output and exit status ([`LiveGuest::run`]), hot-plugs devices through the QMP socket
//! meanwhile, and can see that the guest still answers after something went wrong under it.
//!
//! Protocol on the console: the host writes `ID COMMAND`; the guest runs `COMMAND` with
//! `sh -c` (stderr folded into stdout) and prints [`DONE_MARKER`]` ID STATUS`. Kernel
//! messages are kept off the console (`dmesg -n 1`), so command output is not interleaved.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use super::{cpio_newc, io, GuestError, VmAssets};

/// Printed by the guest once its command loop reads commands.
pub const READY_MARKER: &str = "DEVLEND-LIVE-READY";
/// Printed by the guest after each command: `DEVLEND-CMD-DONE ID STATUS`.
pub const DONE_MARKER: &str = "DEVLEND-CMD-DONE";

const SCRIPT: &str = r#"#!/bin/sh
stty -echo 2>/dev/null
dmesg -n 1
echo "DEVLEND-LIVE-READY"
while IFS= read -r line; do
    id=${line%% *}
    sh -c "${line#* }" 2>&1 </dev/null
    echo "DEVLEND-CMD-DONE $id $?"
done
"#;

/// How PCIe hot-plug reaches the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hotplug {
    /// QEMU's default on q35: ACPI hot-plug (the guest's acpiphp).
    Acpi,
    /// Native PCIe hot-plug (the guest's pciehp): `-global
    /// ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off`.
    Native,
    /// Native PCIe hot-plug in QEMU, but the guest has no hot-plug driver (`pcie_ports=compat`):
    /// it ignores every hot-plug event, so an unplug request is never answered. A device
    /// added to such a guest is brought in by hand ([`POWER_ON_AND_RESCAN`]).
    Ignored,
}

/// For a [`Hotplug::Ignored`] guest: powers on the slot of PCI bus `$BUS` (e.g. `0000:01`,
/// the bus of the guest address QEMU reported) through its root port's PCIe Slot Control
/// register, as pciehp would, and rescans, so a device QEMU hot-added there appears. Run
/// with the shell variable set first: `BUS=0000:01; ` followed by this.
pub const POWER_ON_AND_RESCAN: &str = r#"cfg=/sys/class/pci_bus/$BUS/device/config; rd() { od -An -tu1 -j $1 -N1 $cfg | tr -d ' '; }; off=$(rd 52); while [ "$off" != 0 ]; do [ "$(rd $off)" = 16 ] && break; off=$(rd $((off+1))); done; [ "$off" = 0 ] && { echo "no PCIe capability"; exit 1; }; sc=$((off+24)); v=$(( $(rd $((sc+1)))*256 + $(rd $sc) )); v=$(( (v & ~1792) | 256 )); printf "\\$(printf %o $((v & 255)))\\$(printf %o $((v >> 8)))" | dd of=$cfg bs=2 seek=$((sc/2)) count=1 conv=notrunc 2>/dev/null; echo 1 > /sys/bus/pci/rescan"#;

/// One live guest.
#[derive(Clone, Debug)]
pub struct LiveSpec {
    /// What to boot with.
    pub assets: VmAssets,
    /// Scratch directory (initrd, QMP socket).
    pub work_dir: PathBuf,
    /// Hot-plug flavour.
    pub hotplug: Hotplug,
    /// Free PCIe root ports `rp1`..`rpN` (chassis 1..N).
    pub root_ports: u32,
    /// Guest RAM in MiB.
    pub mem_mib: u32,
    /// How long the boot may take until the command loop answers.
    pub boot_timeout: Duration,
    /// Extra kernel command-line words.
    pub append: String,
    /// Start QEMU paused before its firmware (`-S`), with a second QMP socket for the test
    /// ([`LiveGuest::resume`]); [`LiveGuest::boot`] then returns at once.
    pub paused: bool,
}

impl LiveSpec {
    /// 512 MiB, two root ports, five minutes to boot (TCG on a busy machine).
    pub fn new(assets: VmAssets, work_dir: &Path, hotplug: Hotplug) -> Self {
        Self {
            assets,
            work_dir: work_dir.to_path_buf(),
            hotplug,
            root_ports: 2,
            mem_mib: 512,
            boot_timeout: Duration::from_secs(300),
            // Short nvme timeouts: a device that went away fails I/O within seconds.
            append: "nvme_core.io_timeout=5 nvme_core.admin_timeout=5".into(),
            paused: false,
        }
    }
}

/// What a command printed, and its exit status.
#[derive(Clone, Debug)]
pub struct CmdOutput {
    /// Its output lines (stdout and stderr).
    pub lines: Vec<String>,
    /// Its exit status.
    pub status: i32,
}

impl CmdOutput {
    /// Whether it exited 0.
    pub fn ok(&self) -> bool {
        self.status == 0
    }

    /// The output as one string.
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

/// A running guest, killed when dropped.
pub struct LiveGuest {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
    console: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    qmp: PathBuf,
    control: Option<PathBuf>,
    boot_timeout: Duration,
    next_id: u64,
    name: String,
}

impl LiveGuest {
    /// Boots the guest and waits until its command loop answers; with [`LiveSpec::paused`],
    /// starts QEMU paused and returns at once (then [`LiveGuest::resume`]).
    pub fn boot(spec: &LiveSpec, name: &str) -> Result<Self, GuestError> {
        std::fs::create_dir_all(&spec.work_dir).map_err(io("creating the work dir"))?;
        let initrd = spec.work_dir.join(format!("{name}-initrd.cpio"));
        let mut image = std::fs::read(&spec.assets.initramfs)
            .map_err(io(format!("reading {}", spec.assets.initramfs.display())))?;
        image.extend_from_slice(&cpio_newc(&[("test.sh", 0o100755, SCRIPT.as_bytes())]));
        std::fs::write(&initrd, &image).map_err(io("writing the initrd"))?;
        let qmp = spec.work_dir.join(format!("{name}.qmp"));
        let _ = std::fs::remove_file(&qmp);
        // `no_timer_check`: see [`super::boot_with`] (the IO-APIC timer check panics under TCG on
        // a loaded host).
        let mut append = format!(
            "console=ttyS0 quiet panic=-1 no_timer_check {}",
            spec.append
        );
        let mut cmd = Command::new(&spec.assets.qemu);
        cmd.args(["-accel", "tcg", "-display", "none", "-monitor", "none"])
            .args(["-serial", "stdio", "-no-reboot", "-nic", "none"])
            .args(["-m", &spec.mem_mib.to_string()])
            .args(["-machine", "q35,memory-backend=mem"])
            .args([
                "-object",
                &format!(
                    "memory-backend-memfd,id=mem,size={}M,share=on",
                    spec.mem_mib
                ),
            ])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()))
            .arg("-kernel")
            .arg(&spec.assets.kernel)
            .arg("-initrd")
            .arg(&initrd);
        match spec.hotplug {
            Hotplug::Acpi => {}
            Hotplug::Native => {
                cmd.args([
                    "-global",
                    "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
                ]);
            }
            Hotplug::Ignored => {
                cmd.args([
                    "-global",
                    "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
                ]);
                append.push_str(" pcie_ports=compat");
            }
        }
        cmd.arg("-append").arg(append);
        let control = spec
            .paused
            .then(|| spec.work_dir.join(format!("{name}-control.qmp")));
        if let Some(c) = &control {
            let _ = std::fs::remove_file(c);
            cmd.arg("-S")
                .arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", c.display()));
        }
        for i in 1..=spec.root_ports {
            cmd.args([
                "-device",
                &format!("pcie-root-port,id=rp{i},chassis={i},bus=pcie.0"),
            ]);
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io(format!("starting {}", spec.assets.qemu.display())))?;
        let stdin = child.stdin.take().ok_or_else(|| GuestError::Io {
            what: "QEMU's stdin".into(),
            source: std::io::ErrorKind::BrokenPipe.into(),
        })?;
        let console = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        if let Some(out) = child.stdout.take() {
            let console = console.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).split(b'\n') {
                    let Ok(line) = line else { break };
                    let line = String::from_utf8_lossy(&line)
                        .trim_end_matches('\r')
                        .to_string();
                    if let Ok(mut c) = console.lock() {
                        c.push(line.clone());
                    }
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        if let Some(mut err) = child.stderr.take() {
            let stderr = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let (Ok(mut s), Some(chunk)) = (stderr.lock(), buf.get(..n)) {
                        s.push_str(&String::from_utf8_lossy(chunk));
                    }
                }
            });
        }
        let me = Self {
            child,
            stdin,
            lines: rx,
            console,
            stderr,
            qmp,
            control,
            boot_timeout: spec.boot_timeout,
            next_id: 1,
            name: name.to_string(),
        };
        if me.control.is_some() {
            return Ok(me);
        }
        me.wait_ready()?;
        Ok(me)
    }

    /// Lets a guest started with [`LiveSpec::paused`] run (QMP `cont` on its second socket)
    /// and waits until its command loop answers.
    pub fn resume(&mut self) -> Result<(), GuestError> {
        self.control("cont")?;
        self.wait_ready()
    }

    /// Runs QMP command `execute` (no arguments) on the second socket of a guest started with
    /// [`LiveSpec::paused`] (the first is for the code under test), and returns its `return`.
    pub fn control(&self, execute: &str) -> Result<serde_json::Value, GuestError> {
        let fail = |what: String| GuestError::Io {
            what,
            source: std::io::ErrorKind::Other.into(),
        };
        let Some(control) = &self.control else {
            return Err(fail(format!("guest {} was not started paused", self.name)));
        };
        let deadline = Instant::now() + self.boot_timeout;
        let mut stream = loop {
            match std::os::unix::net::UnixStream::connect(control) {
                Ok(s) => break s,
                // QEMU makes the socket early in its start-up.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => return Err(io(format!("connecting to {}", control.display()))(e)),
            }
        };
        let _ = stream.set_read_timeout(Some(self.boot_timeout));
        let request = serde_json::json!({ "execute": execute });
        stream
            .write_all(format!("{{\"execute\":\"qmp_capabilities\"}}\n{request}\n").as_bytes())
            .map_err(io(format!("sending {execute}")))?;
        // The greeting, then one answer per command; events may come in between.
        let mut answers = Vec::new();
        for line in BufReader::new(stream).lines() {
            let line = line.map_err(io("reading QMP"))?;
            let v: serde_json::Value = serde_json::from_str(&line)
                .map_err(|_| fail(format!("QEMU sent {line:?} on {}", control.display())))?;
            if v.get("error").is_some() {
                return Err(fail(format!("QEMU refused {execute}: {line}")));
            }
            if let Some(r) = v.get("return") {
                answers.push(r.clone());
                if answers.len() == 2 {
                    break;
                }
            }
        }
        answers.pop().filter(|_| answers.len() == 1).ok_or_else(|| {
            fail(format!(
                "QEMU closed {} before answering {execute}",
                control.display()
            ))
        })
    }

    fn wait_ready(&self) -> Result<(), GuestError> {
        let (me, name) = (self, &self.name);
        let deadline = Instant::now() + me.boot_timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match me.lines.recv_timeout(left) {
                Ok(l) if l.contains(READY_MARKER) => break,
                Ok(_) => {}
                Err(_) => {
                    return Err(GuestError::Io {
                        what: format!(
                            "guest {name} did not come up within {:?}\n{}",
                            me.boot_timeout,
                            me.transcript()
                        ),
                        source: std::io::ErrorKind::TimedOut.into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Runs `command` in the guest and waits at most `timeout` for it to finish.
    pub fn run(&mut self, command: &str, timeout: Duration) -> Result<CmdOutput, GuestError> {
        let id = self.next_id;
        self.next_id += 1;
        if command.contains('\n') {
            return Err(GuestError::Io {
                what: "a guest command is one line".into(),
                source: std::io::ErrorKind::InvalidInput.into(),
            });
        }
        writeln!(self.stdin, "{id} {command}")
            .and_then(|()| self.stdin.flush())
            .map_err(io(format!("sending a command to guest {}", self.name)))?;
        let done = format!("{DONE_MARKER} {id} ");
        let deadline = Instant::now() + timeout;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => match l.find(&done) {
                    Some(pos) => {
                        let status = l
                            .get(pos + done.len()..)
                            .and_then(|s| s.trim().parse().ok())
                            .unwrap_or(-1);
                        // Output written without a final newline shares the marker's line.
                        if let Some(head) = l.get(..pos).filter(|h| !h.is_empty()) {
                            lines.push(head.to_string());
                        }
                        return Ok(CmdOutput { lines, status });
                    }
                    None => lines.push(l),
                },
                Err(_) => {
                    return Err(GuestError::Io {
                        what: format!(
                            "guest {}: `{command}` did not finish within {timeout:?} (output so far: {lines:?})\n{}",
                            self.name,
                            self.transcript()
                        ),
                        source: std::io::ErrorKind::TimedOut.into(),
                    })
                }
            }
        }
    }

    /// The QMP socket.
    pub fn qmp(&self) -> &Path {
        &self.qmp
    }

    /// QEMU's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether QEMU is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The console so far and QEMU's stderr, for failure messages.
    pub fn transcript(&self) -> String {
        let console = self
            .console
            .lock()
            .map(|c| c.join("\n"))
            .unwrap_or_default();
        let stderr = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        format!(
            "--- guest {} console ---\n{console}\n--- qemu stderr ---\n{stderr}",
            self.name
        )
    }

    /// QEMU's stderr so far.
    pub fn qemu_stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for LiveGuest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.qmp);
        if let Some(c) = &self.control {
            let _ = std::fs::remove_file(c);
        }
    }
}
