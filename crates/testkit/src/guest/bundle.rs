//! Guests that run this project's own binaries: an initramfs layer holding executables with
//! the shared libraries `ldd` says they need, and a QEMU command line of the test's own
//! making (e.g. with a virtual IOMMU and SR-IOV devices) run to power-off like [`super::boot`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{collect, cpio_newc, io, GuestError, GuestOutput};

/// Files for an initramfs layer: `(path, mode, contents)`.
#[derive(Debug, Default)]
pub struct Bundle {
    files: Vec<(String, u32, Vec<u8>)>,
}

impl Bundle {
    /// An empty layer with the directories binaries and libraries go into.
    pub fn new() -> Self {
        let mut b = Self::default();
        for d in [
            "devlend",
            "lib",
            "lib64",
            "lib/x86_64-linux-gnu",
            "usr",
            "usr/lib",
            "usr/lib/x86_64-linux-gnu",
        ] {
            b.files.push((d.to_string(), 0o040755, Vec::new()));
        }
        b
    }

    /// Adds a file.
    pub fn file(&mut self, path: &str, mode: u32, contents: Vec<u8>) -> &mut Self {
        self.files.push((path.to_string(), mode, contents));
        self
    }

    /// Adds the executable `src` at `dst` (stripped into `work` when `strip` exists) and every
    /// shared library it links (`ldd`), at the paths it links them from.
    pub fn binary(&mut self, src: &Path, dst: &str, work: &Path) -> Result<&mut Self, GuestError> {
        let stripped = work.join(dst.replace('/', "_"));
        let ok = Command::new("strip")
            .arg("-o")
            .arg(&stripped)
            .arg(src)
            .status()
            .is_ok_and(|s| s.success());
        let from = if ok { &stripped } else { src };
        let bytes = std::fs::read(from).map_err(io(format!("reading {}", from.display())))?;
        self.files.push((dst.to_string(), 0o100755, bytes));
        let out = Command::new("ldd")
            .arg(src)
            .output()
            .map_err(io("running ldd"))?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(lib) = line
                .split_whitespace()
                .find(|w| w.starts_with('/'))
                .map(PathBuf::from)
            else {
                continue;
            };
            let name = lib.to_string_lossy().trim_start_matches('/').to_string();
            if self.files.iter().any(|f| f.0 == name) {
                continue;
            }
            let real = std::fs::canonicalize(&lib).map_err(io(format!("{}", lib.display())))?;
            let bytes = std::fs::read(&real).map_err(io(format!("reading {}", real.display())))?;
            self.files.push((name, 0o100755, bytes));
        }
        Ok(self)
    }

    /// The layer as a newc cpio archive.
    pub fn cpio(&self) -> Vec<u8> {
        let refs: Vec<(&str, u32, &[u8])> = self
            .files
            .iter()
            .map(|(n, m, b)| (n.as_str(), *m, b.as_slice()))
            .collect();
        cpio_newc(&refs)
    }
}

/// Runs `qemu` (a full command line; its stdio is taken here) until the guest powers off or
/// `timeout` passes (then it is killed), collecting the console as [`super::boot`] does.
pub fn run(mut qemu: Command, timeout: Duration) -> Result<GuestOutput, GuestError> {
    qemu.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = qemu.spawn().map_err(io("starting QEMU"))?;
    let result = collect(&mut child, timeout, start, &mut |l| println!("guest: {l}"));
    let _ = child.kill();
    let _ = child.wait();
    result
}
