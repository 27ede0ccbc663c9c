//! Linux's own nvme driver, in a QEMU guest on the *borrower* host, driving an NVMe controller
//! that lives on the *lender* host: the borrower (`devlend node --borrow nvme0 --vfio-user`)
//! serves the borrowed function over vfio-user; guest RAM handed over by QEMU is exposed
//! through the fabric so the lender's device DMAs straight into it; MSI-X reaches the guest.
//! The same acceptance run as the local case; afterwards the *lender's* image holds the bytes
//! the guest wrote. The same run again with the two hosts in their own network namespaces,
//! joined by the `tcp` fabric (TLS). Further tests kill the lender under a running guest and
//! reclaim the device from it.
//!
//! Needs root (to provision QEMU with `scripts/vm-setup.sh` the first time, and for the
//! namespaces); skipped with a printed reason otherwise, except under `CI`, where it fails
//! instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{exe, scratch, NodeProcess};
use devlend_testkit::guest::{self, acceptance};
use devlend_testkit::netns::NetnsPair;

fn borrower_server(dir: &Path, fabric: &Path, socket: &Path) -> Command {
    borrower_server_on(
        Command::new(exe()),
        &format!("shm:{}", fabric.display()),
        &[],
        dir,
        socket,
    )
}

/// `cmd` (the binary, or the binary inside a network namespace) as the borrower node on
/// `fabric`, with `extra` node options, serving the borrowed `nvme0` on `socket`.
fn borrower_server_on(
    mut cmd: Command,
    fabric: &str,
    extra: &[&str],
    dir: &Path,
    socket: &Path,
) -> Command {
    cmd.args(["node", "--name", "borrower", "--lease-ms", "5000"])
        .args(["--fabric", fabric])
        .args(extra)
        .arg("--state")
        .arg(dir.join("borrower"))
        .args(["--borrow", "nvme0", "--vfio-user"])
        .arg(socket);
    cmd
}

/// A scratch directory, a lender node process lending `nvme0` on an image of `size` bytes,
/// and the paths of the fabric, the image and the vfio-user socket the borrower will serve.
struct Lent {
    dir: PathBuf,
    fabric: PathBuf,
    image: PathBuf,
    socket: PathBuf,
    lender: NodeProcess,
}

impl Lent {
    /// The borrower node serving the borrowed `nvme0` on the socket ([`borrower_server`]),
    /// once its socket is up.
    fn serve_borrowed(&self) -> guest::ServerProcess {
        guest::ServerProcess::spawn(
            borrower_server(&self.dir, &self.fabric, &self.socket),
            Duration::from_secs(60),
        )
        .expect("the borrower serves the borrowed device")
    }
}

fn lend_nvme(tag: &str, size: u64) -> Lent {
    lend_nvme_with(tag, size, &[])
}

/// [`lend_nvme`] with more `devlend add nvme` options.
fn lend_nvme_with(tag: &str, size: u64, extra: &[&str]) -> Lent {
    let dir = scratch(tag);
    let fabric = dir.join("fabric");
    let image = dir.join("lent.img");
    // The model's info messages (a CMB being mapped) in the lender's log, warnings otherwise.
    let mut cmd = Command::new(exe());
    cmd.env("DEVLEND_LOG", "warn,devlend_nvme=info");
    let fabric_arg = format!("shm:{}", fabric.display());
    let lender = NodeProcess::start_with(cmd, &dir, "lender", &[fabric_arg], 5000, &[]);
    let size = size.to_string();
    let mut args = vec![
        "add",
        "nvme",
        "--name",
        "nvme0",
        "--size",
        &size,
        "--image",
        image.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    lender.ctl_ok(&args);
    Lent {
        socket: dir.join("nvme.sock"),
        dir,
        fabric,
        image,
        lender,
    }
}

/// After an acceptance run: what the guest found, for the log; the borrower is gone (stopped
/// after the guest), so its lease ends and the lender offers the device again; then the
/// lender stops and the scratch directory goes.
fn finish(lender: NodeProcess, out: &guest::GuestOutput, dir: &Path) {
    acceptance::print_findings(out);
    lender.wait_available(
        "nvme0",
        Duration::from_secs(60),
        "the device never came back to the lender",
    );
    println!("guest run took {:?}", out.elapsed);
    drop(lender);
    let _ = std::fs::remove_dir_all(dir);
}

/// The device has a 2 MiB Controller Memory Buffer (Linux skips one whose size or BAR is not
/// aligned to its memremap granule, 2 MiB on x86-64): the guest's nvme driver enables it
/// (CMBMSC.CRE, then CMSE at its BAR 2 address), fails to register it for peer-to-peer DMA
/// (Debian's kernels lack `CONFIG_PCI_P2PDMA`; it logs "failed to register the CMB") and
/// keeps its queues in guest RAM; the same checks pass.
#[test]
fn guest_nvme_driver_on_borrowed_device_over_vfio_user() {
    let Some(assets) = common::vm_assets() else {
        return;
    };
    let disk_bytes = acceptance::MIN_DISK_BYTES;
    let Lent {
        dir,
        fabric,
        image,
        socket,
        lender,
    } = lend_nvme_with("vm-borrowed", disk_bytes, &["--cmb", "2M"]);
    let server = borrower_server(&dir, &fabric, &socket);
    let out = guest::run_acceptance(assets, server, &socket, &image, disk_bytes, &dir);
    // The guest's driver found the CMB and told the device where its BAR is: the model mapped
    // it (CMBMSC.CRE and CMSE with the guest's BAR 2 address, which is 1 MiB aligned).
    let log = std::fs::read_to_string(dir.join("lender.log")).unwrap_or_default();
    assert!(
        log.contains("CMB mapped at"),
        "the guest's driver never enabled the CMB\n--- lender log ---\n{log}\n{}",
        out.transcript()
    );
    finish(lender, &out, &dir);
}

/// Issue #13 item 3: the same acceptance run on a device borrowed over `tcp`. The lender and
/// the borrower are `devlend node` processes in two network namespaces joined by a veth pair,
/// mutually authenticated with keys from `devlend keygen`; QEMU runs outside them and reaches
/// the borrower's vfio-user socket by its path. The guest keeps its queues in its RAM, so every
/// command fetch and every byte of data is a message on the link; afterwards the lender's image
/// holds the guest's O_DIRECT pattern, and a second guest finds the file system it wrote.
#[test]
fn guest_nvme_driver_on_device_borrowed_over_tcp() {
    let Some(assets) = common::vm_assets() else {
        return;
    };
    let Some(ns) = NetnsPair::create_or_skip("the guest-over-tcp test") else {
        return;
    };
    let disk_bytes = acceptance::MIN_DISK_BYTES;
    let dir = scratch("vm-borrowed-tcp");
    let keys = dir.join("keys");
    common::keygen(&keys, &[], &["lender", "borrower"]);
    let keys_arg = keys.to_str().unwrap();
    let lender_ip = ns.addr(0);
    let lender = NodeProcess::start_with(
        ns.command(0, exe()),
        &dir,
        "lender",
        &[format!("tcp-listen:borrower@{lender_ip}:7711")],
        5000,
        &["--keys", keys_arg],
    );
    let image = dir.join("lent.img");
    lender.add_nvme("nvme0", &image, &disk_bytes.to_string());
    let socket = dir.join("nvme.sock");
    let server = borrower_server_on(
        ns.command(1, exe()),
        &format!("tcp-connect:lender@{lender_ip}:7711"),
        &["--keys", keys_arg],
        &dir,
        &socket,
    );
    let out = guest::run_acceptance(assets, server, &socket, &image, disk_bytes, &dir);
    finish(lender, &out, &dir);
    drop(ns);
}

#[test]
fn guest_survives_a_lender_that_dies() {
    let Some(assets) = common::vm_assets() else {
        return;
    };
    let mut lent = lend_nvme("vm-lender-dies", 64 << 20);
    let _server = lent.serve_borrowed();
    guest::vanish::run(assets, &lent.socket, &lent.dir, || lent.lender.kill9());
    let _ = std::fs::remove_dir_all(&lent.dir);
}

#[test]
fn guest_sees_a_reclaimed_device_fail_and_qemu_survives() {
    let Some(assets) = common::vm_assets() else {
        return;
    };
    let lent = lend_nvme("vm-reclaim", 64 << 20);
    let _server = lent.serve_borrowed();
    let (tx, rx) = std::sync::mpsc::channel();
    let state = lent.lender.state.clone();
    // `devlend reclaim` on the lender while the guest reads: after the grace the guest's
    // device fails (I/O errors, the controller looks dead), and QEMU keeps running.
    let out = guest::vanish::run(assets, &lent.socket, &lent.dir, || {
        let (state, tx) = (state.clone(), tx.clone());
        std::thread::spawn(move || {
            let out = Command::new(exe())
                .args(["reclaim", "nvme0", "--grace", "1s", "--json", "--state"])
                .arg(&state)
                .output();
            let _ = tx.send(out);
        });
    });
    for line in out
        .console
        .iter()
        .filter(|l| l.contains("IO-") || l.contains("nvme"))
    {
        println!("guest: {line}");
    }
    let reclaimed = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("reclaim never finished")
        .expect("devlend reclaim ran");
    assert!(
        reclaimed.status.success(),
        "{}",
        String::from_utf8_lossy(&reclaimed.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&reclaimed.stdout).unwrap();
    assert_eq!(v["returned"], false, "{v}");
    // Reset and offered again.
    assert_eq!(lent.lender.borrower_of("nvme0"), None);
    drop(lent.lender);
    let _ = std::fs::remove_dir_all(&lent.dir);
}
