//! What the guest tests that lend a real device through VFIO share (`vfio_guest`,
//! `vfio_guest_sriov`): a borrower on the guest's `shm` fabric, and the skip-or-fail rule.

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
