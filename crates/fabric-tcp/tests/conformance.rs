//! The NTB conformance suite (`devlend_testkit::conformance`) on the `tcp` backend (TLS, over
//! the loopback address); `crates/fabric/tests/conformance.rs` runs it on `loopback` and `shm`.

use std::sync::Arc;

use devlend_fabric::{Link, LinkConfig, LinkState};
use devlend_fabric_tcp::{TcpConfig, TcpNtb};
use devlend_testkit::conformance::Pair;
use devlend_testkit::tcp::{cfg, creds, deployment, localhost, Host, GUARD};

/// Removes the keys after both sides are gone.
struct Keys(std::path::PathBuf);

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn make(link: LinkConfig, ha: &Host, hb: &Host) -> Pair {
    let keys = deployment();
    let c = TcpConfig { link, ..cfg() };
    let a = TcpNtb::listen(localhost(), ha.asp.clone(), c, creds(&keys, "a", "b")).unwrap();
    let addr = a.local_addr().unwrap();
    let b = TcpNtb::connect(addr, hb.asp.clone(), c, creds(&keys, "b", "a")).unwrap();
    a.wait_link(LinkState::Up, GUARD).unwrap();
    b.wait_link(LinkState::Up, GUARD).unwrap();
    Pair {
        a: Arc::new(a),
        b: Arc::new(b),
        keep: Box::new(Keys(keys)),
    }
}

devlend_testkit::ntb_conformance!(make);
