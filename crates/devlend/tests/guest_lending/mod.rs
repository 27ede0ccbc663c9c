//! What the guest tests that lend a real device through VFIO share (`vfio_guest`,
//! `vfio_guest_sriov`): a borrower on the guest's `shm` fabric, the skip-or-fail rule, and the
//! host side's rig (QEMU with a virtual IOMMU, a bundle of binaries, a disk image) and checks.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devlend_pci::PciFunction;

/// Starts a borrower node with `cfg` on the shm fabric at `fabric`, waits for the link, and
/// borrows `device`, retrying while it is not offered yet (it may still be on its way back
/// from a dead borrower).
pub fn borrow_on_shm(
    fabric: &Path,
    device: &str,
    cfg: devlend_lending::NodeConfig,
) -> (devlend_lending::Node, Arc<dyn PciFunction>) {
    let asp = Arc::new(devlend_fabric::AddressSpace::new());
    let ntb = devlend_fabric::shm::ShmNtb::open(fabric, asp, Default::default())
        .expect("opening the shm fabric");
    let node = devlend_lending::Node::start(cfg, vec![ntb as Arc<dyn devlend_fabric::Ntb>])
        .expect("starting the borrower node");
    node.wait_link_up(Duration::from_secs(120))
        .expect("the link to the lender comes up");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match node.borrow(device) {
            Ok(f) => return (node, f as Arc<dyn PciFunction>),
            Err(e) if Instant::now() < deadline => {
                eprintln!("borrow {device}: {e} (retrying)");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => panic!("borrowing {device}: {e}"),
        }
    }
}

/// `len` bytes of a test pattern: byte `byte` (0 to 3) of a multiplicative hash of each
/// position, XORed with `seed`.
pub fn pattern(len: usize, byte: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[byte] ^ seed)
        .collect()
}

/// A guest test that cannot run: a failure when `CI` is set, a printed skip otherwise.
pub fn skip_or_fail(test: &str, why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test} cannot run: {why}");
    }
    println!("SKIPPED {test}: {why}");
}

/// Whether this process runs as root (the guest tests provision QEMU and boot it).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// The guest kernel's VFIO modules as an initramfs layer (`scripts/vfio-guest.sh`, cached in
/// `DEVLEND_CACHE` or the repository's `.cache`).
pub fn vfio_modules(repo: &Path) -> std::path::PathBuf {
    let cache = std::env::var("DEVLEND_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| repo.join(".cache"));
    let out = std::process::Command::new("bash")
        .arg(repo.join("scripts/vfio-guest.sh"))
        .arg(&cache)
        .output()
        .expect("running scripts/vfio-guest.sh");
    assert!(
        out.status.success(),
        "vfio-guest.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::path::PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("VFIO_MODULES="))
            .expect("vfio-guest.sh prints VFIO_MODULES="),
    )
}

/// QEMU for a guest with a virtual IOMMU (q35, intel-iommu, TCG, 2 vCPUs, 1.5 GiB, no
/// network) booting the provisioned kernel on the base initramfs, the VFIO `modules` layer and
/// `bundle` (written to `work/initrd.cpio`); the caller adds its devices.
pub fn iommu_guest(
    assets: &devlend_testkit::guest::VmAssets,
    modules: &Path,
    bundle: &devlend_testkit::guest::bundle::Bundle,
    work: &Path,
) -> std::process::Command {
    let mut initrd = std::fs::read(&assets.initramfs).expect("reading the base initramfs");
    initrd.extend(std::fs::read(modules).expect("reading the VFIO modules layer"));
    initrd.extend(bundle.cpio());
    let initrd_path = work.join("initrd.cpio");
    std::fs::write(&initrd_path, &initrd).expect("writing the initramfs");
    let mut qemu = std::process::Command::new(&assets.qemu);
    qemu.args(["-accel", "tcg", "-M", "q35,kernel-irqchip=split"])
        .args(["-device", "intel-iommu,intremap=on,aw-bits=48"])
        .args(["-m", "1536", "-smp", "2", "-nographic", "-no-reboot"])
        .args(["-nic", "none"])
        .arg("-kernel")
        .arg(&assets.kernel)
        .arg("-initrd")
        .arg(&initrd_path)
        .args([
            "-append",
            "console=ttyS0 intel_iommu=on quiet panic=-1 no_timer_check",
        ]);
    qemu
}

/// The host side of a VFIO guest test: provisioned QEMU, the VFIO modules layer and a fresh
/// work directory.
pub struct HostRig {
    /// The repository root.
    pub repo: std::path::PathBuf,
    /// QEMU, the kernel and the base initramfs.
    pub assets: devlend_testkit::guest::VmAssets,
    /// The VFIO modules layer.
    pub modules: std::path::PathBuf,
    /// A fresh directory for the bundle, the initramfs and the disk image.
    pub work: std::path::PathBuf,
}

impl HostRig {
    /// The rig for `test`, or `None` when it is skipped (not root: see [`skip_or_fail`]; a
    /// machine that cannot provision guests: see `provision_for_tests`).
    pub fn new(test: &str) -> Option<HostRig> {
        if !is_root() {
            skip_or_fail(
                test,
                "needs root (QEMU provisioning, as the other guest tests)",
            );
            return None;
        }
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let assets =
            devlend_testkit::guest::provision_for_tests(&repo).expect("provisioning QEMU")?;
        let modules = vfio_modules(&repo);
        let work = std::env::temp_dir().join(format!("devlend-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("making the work directory");
        Some(HostRig {
            repo,
            assets,
            modules,
            work,
        })
    }

    /// A bundle of `binaries` (each a path and its name in the guest) with `script` as
    /// `/test.sh`, and an empty raw disk image of `disk_bytes` in the work directory.
    pub fn bundle(
        &self,
        binaries: &[(&Path, &str)],
        script: &str,
        disk_bytes: u64,
    ) -> (devlend_testkit::guest::bundle::Bundle, std::path::PathBuf) {
        let mut bundle = devlend_testkit::guest::bundle::Bundle::new();
        for (src, dst) in binaries {
            bundle
                .binary(src, dst, &self.work)
                .unwrap_or_else(|e| panic!("bundling {}: {e}", src.display()));
        }
        bundle.file("test.sh", 0o100755, script.as_bytes().to_vec());
        let disk = self.work.join("disk.img");
        std::fs::File::create(&disk)
            .and_then(|f| f.set_len(disk_bytes))
            .expect("making the disk image");
        (bundle, disk)
    }

    /// QEMU for this rig's guest ([`iommu_guest`]) with `bundle`; the caller adds its devices.
    pub fn qemu(&self, bundle: &devlend_testkit::guest::bundle::Bundle) -> std::process::Command {
        iommu_guest(&self.assets, &self.modules, bundle, &self.work)
    }

    /// Removes the work directory (a failed test leaves it, to be looked at).
    pub fn remove(self) {
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

/// Fails, with the guest's transcript, unless the guest finished in time, printed every one of
/// `markers` and never `fail`.
pub fn assert_markers(run: &devlend_testkit::guest::GuestOutput, markers: &[&str], fail: &str) {
    let has = |m: &str| run.console.iter().any(|l| l.contains(m));
    assert!(
        !run.timed_out,
        "the guest did not finish in time:\n{}",
        run.transcript()
    );
    assert!(!has(fail), "{}", run.transcript());
    for marker in markers {
        assert!(
            has(marker),
            "missing {marker:?} in the guest's run:\n{}",
            run.transcript()
        );
    }
}

/// Fails unless each write `(offset, bytes, who)` is in the disk image at `disk`.
pub fn assert_on_disk(disk: &Path, writes: &[(u64, Vec<u8>, &str)]) {
    let image = std::fs::read(disk).expect("reading the disk image");
    for (offset, bytes, who) in writes {
        let at = usize::try_from(*offset).expect("an offset within the image");
        assert!(
            image.get(at..at + bytes.len()) == Some(bytes.as_slice()),
            "{who}'s flushed write is not in the disk image"
        );
    }
}
