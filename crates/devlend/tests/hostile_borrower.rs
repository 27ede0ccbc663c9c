//! A borrower that attacks the lender through the memory they share: it truncates every memfd
//! the lender maps or hands out (its mailbox, its DMA pool, the NVMe doorbell area it was
//! given), as `truncate -s 0 /proc/PID/fd/N` would. The lender (a `devlend node` process) must
//! stay up, and its other borrower on another link must keep doing verified I/O.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use devlend_fabric::{AddressSpace, LinkConfig, Ntb, ShmNtb};
use devlend_lending::{Node, NodeConfig};
use devlend_nvme_driver::Controller;
use devlend_pci::{ConfigAccess, PciFunction};

mod common;

use common::{scratch, NodeProcess};

fn add_nvme(lender: &NodeProcess, dir: &Path, name: &str) {
    lender.add_nvme(name, &dir.join(format!("{name}.img")), "16M");
}

/// This process's descriptors whose memfd name starts with `name`.
fn memfds_named(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let path = entry.path();
        if let Ok(target) = std::fs::read_link(&path) {
            if target
                .to_string_lossy()
                .starts_with(&format!("/memfd:{name}"))
            {
                found.push(path.to_string_lossy().into_owned());
            }
        }
    }
    found
}

/// Tries `truncate -s 0` on every memfd called `name`; returns how many were found and how
/// many truncations the kernel allowed.
fn truncate_all(name: &str) -> (usize, usize) {
    let fds = memfds_named(name);
    let mut allowed = 0;
    for fd in &fds {
        let Ok(f) = std::fs::OpenOptions::new().write(true).open(fd) else {
            continue;
        };
        if f.set_len(0).is_ok() {
            allowed += 1;
        }
    }
    (fds.len(), allowed)
}

#[test]
fn truncating_shared_memfds_cannot_crash_the_lender() {
    let dir = scratch("truncate");
    let (fa, fb) = (dir.join("fabric-a"), dir.join("fabric-b"));
    let lender = NodeProcess::start(&dir, "lender", &[&fa, &fb], 3000);
    add_nvme(&lender, &dir, "nvme0");
    add_nvme(&lender, &dir, "nvme1");
    let honest = NodeProcess::start(&dir, "honest", &[&fb], 3000);
    honest.ctl_ok(&["borrow", "nvme1"]);
    assert!(honest
        .ctl_ok(&["check", "--write", "nvme1", "--bytes", "256K"])
        .contains("verified"));

    // This process is the hostile borrower on the other link.
    let ntb = ShmNtb::open(&fa, Arc::new(AddressSpace::new()), LinkConfig::default()).unwrap();
    let node = Node::start(NodeConfig::new("hostile"), vec![ntb as Arc<dyn Ntb>]).unwrap();
    node.wait_link_up(Duration::from_secs(30)).unwrap();
    let f: Arc<dyn PciFunction> = node.borrow("nvme0").unwrap();
    let ctrl = Controller::new(f).unwrap();
    ctrl.write_at(0, &[0x5a; 4096]).unwrap();

    // The memory the lender maps: our mailbox, our DMA pool, and the lender's doorbell area
    // that we were given. Each must exist here, and none may be truncated.
    for name in ["devlend-mailbox", "devlend-dma", "nvme-doorbells"] {
        let (found, allowed) = truncate_all(name);
        assert!(found > 0, "no memfd called {name} in the borrower");
        assert_eq!(
            allowed, 0,
            "{allowed} of {found} {name} memfds could be truncated"
        );
    }

    // Make the lender touch each of them: I/O rings the doorbells and has the device read
    // and write our DMA pool; the config read's answer is written into our mailbox.
    let mut back = [0u8; 4096];
    ctrl.write_at(4096, &[0xa5; 4096]).unwrap();
    ctrl.read_at(0, &mut back).unwrap();
    assert_eq!(back, [0x5a; 4096]);
    let f = node.borrowed("nvme0").unwrap();
    assert_eq!(
        f.config_read(0, devlend_pci::AccessSize::Word).unwrap(),
        u32::from(devlend_nvme::PCI_VENDOR_ID),
        "vendor id through the lender"
    );

    // The lender is up and its other borrower still does verified I/O.
    assert!(lender.ctl_ok(&["list"]).contains("nvme1"));
    assert!(honest
        .ctl_ok(&["check", "--write", "nvme1", "--bytes", "256K"])
        .contains("verified"));
    drop(ctrl);
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
