//! A refused peer is logged (`tracing::warn`) with its address and the reason.

use std::io::Write;
use std::sync::{Arc, Mutex};

use devlend_fabric_tcp::TcpNtb;
use devlend_testkit::tcp::*;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_refusal_is_logged_with_the_peer_address_and_reason() {
    let log = Captured::default();
    let writer = log.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();
    let (k1, k2) = (deployment(), deployment());
    let ha = host();
    let hb = host();
    let a = TcpNtb::listen(localhost(), ha.asp.clone(), cfg(), creds(&k1, "a", "b")).unwrap();
    let b = TcpNtb::connect(
        a.local_addr().unwrap(),
        hb.asp.clone(),
        cfg(),
        creds(&k2, "b", "a"),
    )
    .unwrap();
    a.wait_refused(1, GUARD).unwrap();
    b.wait_refused(1, GUARD).unwrap();
    drop(b);
    drop(a);
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let refusals: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    println!("{}", refusals.join("\n"));
    assert!(
        refusals.iter().any(|l| l.contains("refused fabric peer")
            && l.contains("127.0.0.1")
            && l.contains("certificate")),
        "{text}"
    );
}
