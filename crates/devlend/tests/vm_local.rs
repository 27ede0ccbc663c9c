//! A QEMU guest's own nvme driver on our NVMe model, served locally over vfio-user
//! (`devlend serve nvme`): the driver binds, the namespace has the image's size, O_DIRECT
//! write/read-back matches, mke2fs + mount + write + remount + read matches, and afterwards the
//! image on the host holds the bytes the guest wrote.
//!
//! Needs root (to provision QEMU with `scripts/vm-setup.sh` the first time); skipped with a
//! printed reason otherwise, except under `CI`, where it fails instead.
//! The borrowed case is the same run with another server command (see `vm_borrowed.rs`).

use std::path::{Path, PathBuf};
use std::process::Command;

use devlend_vfio_user::guest::{self, acceptance};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn guest_nvme_driver_on_local_model_over_vfio_user() {
    let Some(assets) = guest::provision_for_tests(&repo_root()).expect("provisioning VM assets")
    else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("devlend-vm-local-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("work dir");
    let image = dir.join("disk.img");
    let socket = dir.join("nvme.sock");
    let disk_bytes = acceptance::MIN_DISK_BYTES;

    let mut server = Command::new(env!("CARGO_BIN_EXE_devlend"));
    server
        .args(["serve", "nvme", "--image"])
        .arg(&image)
        .args(["--size", &disk_bytes.to_string(), "--serial", "vm-local"])
        .arg("--vfio-user")
        .arg(&socket);
    let out = guest::run_acceptance(assets, server, &socket, &image, disk_bytes, &dir);
    for line in out
        .console
        .iter()
        .filter(|l| l.starts_with("NVME-") || l.starts_with("ODIRECT-") || l.starts_with("FS-"))
    {
        println!("guest: {line}");
    }
    println!("guest run took {:?}", out.elapsed);
    let _ = std::fs::remove_dir_all(&dir);
}
