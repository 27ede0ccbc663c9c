//! `devlend add vfio` on this machine: bad input gets a clear error and changes nothing, and a
//! node with a tcp link refuses real devices with the reason. (Lending a real device through
//! VFIO is tested inside a QEMU guest: `vfio_guest.rs`.) No root needed: every case is refused
//! before anything is written to sysfs.

mod common;

use common::{scratch, NodeProcess};

fn err_of(node: &NodeProcess, args: &[&str]) -> String {
    let out = node.ctl(args);
    assert!(!out.status.success(), "devlend {args:?} should have failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Functions of this machine: (address, driver, has an IOMMU group).
fn functions() -> Vec<(String, Option<String>, bool)> {
    let Ok(dir) = std::fs::read_dir("/sys/bus/pci/devices") else {
        return Vec::new();
    };
    dir.flatten()
        .map(|e| {
            let p = e.path();
            let link = |f: &str| {
                std::fs::read_link(p.join(f))
                    .ok()
                    .and_then(|l| l.file_name().map(|n| n.to_string_lossy().into_owned()))
            };
            (
                e.file_name().to_string_lossy().into_owned(),
                link("driver"),
                link("iommu_group").is_some(),
            )
        })
        .collect()
}

#[test]
fn add_vfio_refuses_bad_input_and_changes_nothing() {
    let dir = scratch("vfio-cli");
    let fabric = dir.join("fabric");
    let node = NodeProcess::start(&dir, "lender", &[&fabric], 5000);

    let e = err_of(&node, &["add", "vfio", "0000:00:1f.9"]);
    assert!(e.contains("not a PCI address"), "{e}");
    let e = err_of(&node, &["add", "vfio"]);
    assert!(e.contains("needs the function's PCI address"), "{e}");
    let e = err_of(&node, &["add", "vfio", "00:03.0", "--image", "/tmp/x.img"]);
    assert!(e.contains("for `devlend add nvme`"), "{e}");
    // An address nothing answers at (domain ffff does not exist on any machine we run on).
    let e = err_of(&node, &["add", "vfio", "ffff:ff:1f.7", "--bind"]);
    assert!(e.contains("no PCI function ffff:ff:1f.7"), "{e}");

    let before = functions();
    // A function bound to a driver, without --bind: refused, named with its driver.
    if let Some((bdf, Some(drv), _)) = before.iter().find(|f| f.1.is_some()) {
        let e = err_of(&node, &["add", "vfio", bdf]);
        assert!(
            e.contains(&format!("bound to {drv}")) && e.contains("--bind"),
            "{e}"
        );
    } else {
        println!("no PCI function with a driver here: the bound-elsewhere case is not exercised");
    }
    // A function without an IOMMU group, even with --bind: refused before it is unbound.
    if let Some((bdf, _, _)) = before.iter().find(|f| !f.2) {
        let e = err_of(&node, &["add", "vfio", bdf, "--bind"]);
        assert!(e.contains("no IOMMU group"), "{e}");
    } else {
        println!("every PCI function here has an IOMMU group: the no-group case is not exercised");
    }
    assert_eq!(functions(), before, "no function changed driver");
    let list: serde_json::Value = serde_json::from_str(&node.ctl_ok(&["list", "--json"])).unwrap();
    assert_eq!(list["local"], serde_json::json!([]), "nothing was added");
    drop(node);

    // A node with a tcp link refuses real devices, and says why.
    let node = NodeProcess::start_with(
        std::process::Command::new(common::exe()),
        &dir,
        "tcp-lender",
        &["tcp-listen:b@127.0.0.1:0".to_string()],
        5000,
        &["--insecure-tcp"],
    );
    let e = err_of(&node, &["add", "vfio", "0000:00:00.0"]);
    assert!(
        e.contains("tcp link") && e.contains("DMA cannot be intercepted") && e.contains("shm"),
        "{e}"
    );
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
