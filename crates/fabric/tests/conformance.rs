//! The NTB conformance suite (`devlend_testkit::conformance`) on the `loopback` and `shm`
//! backends; `crates/fabric-tcp/tests/conformance.rs` runs it on `tcp`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use devlend_fabric::{loopback_pair, Link, LinkConfig, LinkState, ShmNtb};
use devlend_testkit::conformance::Pair;
use devlend_testkit::tcp::Host;

mod loopback {
    use super::*;

    fn make(cfg: LinkConfig, ha: &Host, hb: &Host) -> Pair {
        let (a, b) = loopback_pair(cfg, ha.asp.clone(), hb.asp.clone()).unwrap();
        Pair {
            a,
            b,
            keep: Box::new(()),
        }
    }

    devlend_testkit::ntb_conformance!(make);
}

mod shm {
    use super::*;

    /// Removes the rendezvous directory after both sides are gone.
    struct Dir(std::path::PathBuf);

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    /// Both sides in this process, rendezvousing in a fresh directory.
    fn make(cfg: LinkConfig, ha: &Host, hb: &Host) -> Pair {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "devlend-shm-conformance-{}-{n}",
            std::process::id()
        ));
        let a = ShmNtb::open(&dir, ha.asp.clone(), cfg).unwrap();
        let b = ShmNtb::open(&dir, hb.asp.clone(), cfg).unwrap();
        for side in [&a, &b] {
            side.wait_link(LinkState::Up, Duration::from_secs(20))
                .unwrap();
        }
        Pair {
            a,
            b,
            keep: Box::new(Dir(dir)),
        }
    }

    devlend_testkit::ntb_conformance!(make);
}
