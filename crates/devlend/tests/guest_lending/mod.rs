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
