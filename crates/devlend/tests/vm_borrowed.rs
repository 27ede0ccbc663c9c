//! Linux's own nvme driver, in a QEMU guest on the *borrower* host, driving an NVMe controller
//! that lives on the *lender* host: the borrower (`devlend node --borrow nvme0 --vfio-user`)
//! serves the borrowed function over vfio-user; guest RAM handed over by QEMU is exposed
//! through the fabric so the lender's device DMAs straight into it; MSI-X reaches the guest.
//! The same acceptance run as the local case; afterwards the *lender's* image holds the bytes
//! the guest wrote. A second test kills the lender under a running guest.
//!
//! Needs root (to provision QEMU with `scripts/vm-setup.sh` the first time); skipped with a
//! printed reason otherwise, except under `CI`, where it fails instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{exe, scratch, NodeProcess};
use devlend_vfio_user::guest::{self, acceptance};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn borrower_server(dir: &Path, fabric: &Path, socket: &Path) -> Command {
    let mut server = Command::new(exe());
    server
        .args([
            "node",
            "--name",
            "borrower",
            "--lease-ms",
            "5000",
            "--fabric",
        ])
        .arg(format!("shm:{}", fabric.display()))
        .arg("--state")
        .arg(dir.join("borrower"))
        .args(["--borrow", "nvme0", "--vfio-user"])
        .arg(socket);
    server
}

#[test]
fn guest_nvme_driver_on_borrowed_device_over_vfio_user() {
    let Some(assets) = guest::provision_for_tests(&repo_root()).expect("provisioning VM assets")
    else {
        return;
    };
    let dir = scratch("vm-borrowed");
    let fabric = dir.join("fabric");
    let image = dir.join("lent.img");
    let socket = dir.join("nvme.sock");
    let disk_bytes = acceptance::MIN_DISK_BYTES;
    let lender = NodeProcess::start(&dir, "lender", &[&fabric], 5000);
    let size = disk_bytes.to_string();
    lender.ctl_ok(&[
        "add",
        "nvme",
        "--name",
        "nvme0",
        "--size",
        &size,
        "--image",
        image.to_str().unwrap(),
    ]);
    let server = borrower_server(&dir, &fabric, &socket);
    let out = guest::run_acceptance(assets, server, &socket, &image, disk_bytes, &dir);
    for line in out
        .console
        .iter()
        .filter(|l| l.starts_with("NVME-") || l.starts_with("ODIRECT-") || l.starts_with("FS-"))
    {
        println!("guest: {line}");
    }
    // The borrower is gone (stopped after the guest): its lease ends and the device is offered again.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while lender.borrower_of("nvme0").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the device never came back to the lender"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    println!("guest run took {:?}", out.elapsed);
    drop(lender);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn guest_survives_a_lender_that_dies() {
    let Some(assets) = guest::provision_for_tests(&repo_root()).expect("provisioning VM assets")
    else {
        return;
    };
    let dir = scratch("vm-lender-dies");
    let fabric = dir.join("fabric");
    let image = dir.join("lent.img");
    let socket = dir.join("nvme.sock");
    let mut lender = NodeProcess::start(&dir, "lender", &[&fabric], 5000);
    lender.ctl_ok(&[
        "add",
        "nvme",
        "--name",
        "nvme0",
        "--size",
        "64M",
        "--image",
        image.to_str().unwrap(),
    ]);
    let _server = guest::ServerProcess::spawn(
        borrower_server(&dir, &fabric, &socket),
        Duration::from_secs(60),
    )
    .expect("the borrower serves the borrowed device");
    let spec = guest::vanish::spec(assets, &socket, &dir);
    let out = guest::boot_with(&spec, |line| {
        if line.contains(guest::vanish::MARKER) {
            lender.kill9();
        }
    })
    .expect("boot");
    guest::vanish::check(&out);
    let _ = std::fs::remove_dir_all(&dir);
}
