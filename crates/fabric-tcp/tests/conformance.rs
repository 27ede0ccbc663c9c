//! The NTB conformance suite (`devlend_testkit::conformance`) on the `tcp` backend (TLS, over
//! the loopback address); `crates/fabric/tests/conformance.rs` runs it on `loopback` and `shm`.

use std::sync::Arc;

use devlend_fabric::{Link, LinkConfig, LinkState};
use devlend_fabric_tcp::{TcpConfig, TcpNtb};
use devlend_testkit::conformance::Pair;
use devlend_testkit::tcp::{cfg, creds, deployment, localhost, Host, GUARD};

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
        // The keys directory is removed when the pair (and so `keys`) is dropped.
        keep: Box::new(keys),
    }
}

devlend_testkit::ntb_conformance!(make);
