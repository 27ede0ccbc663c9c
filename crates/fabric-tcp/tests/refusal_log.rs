//! A refused peer is logged (`tracing::warn`) with its address and the reason.

use devlend_testkit::tcp::*;

#[test]
fn a_refusal_is_logged_with_the_peer_address_and_reason() {
    let log = capture_warnings();
    let ((a, b), _hosts) = untrusting_pair(cfg());
    a.wait_refused(1, GUARD).unwrap();
    b.wait_refused(1, GUARD).unwrap();
    drop(b);
    drop(a);
    let text = log.text();
    let refusals: Vec<&str> = text.lines().filter(|l| l.contains("WARN")).collect();
    println!("{}", refusals.join("\n"));
    assert!(
        refusals.iter().any(|l| l.contains("refused fabric peer")
            && l.contains("127.0.0.1")
            && l.contains("certificate")),
        "{text}"
    );
}
