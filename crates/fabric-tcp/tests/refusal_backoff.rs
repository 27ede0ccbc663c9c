//! A peer that keeps being refused is retried with back-off, and the refusals are warned
//! about a handful of times (at the 1st, 2nd, 4th, 8th, ... in a row), not once per attempt.

use std::time::Duration;

use devlend_fabric_tcp::TcpConfig;
use devlend_testkit::tcp::*;

/// Warnings for `n` refusals in a row: one per power of two up to `n`.
fn warned(n: u64) -> usize {
    (0..64).filter(|k| 1u64 << k <= n).count()
}

#[test]
fn an_untrusted_peer_is_retried_with_back_off_and_few_warnings() {
    let log = capture_warnings();
    // Two deployments: neither side trusts the other's CA. Short pauses so that many
    // attempts happen; the assertions count attempts and lines, never time.
    let quick = TcpConfig {
        reconnect_interval: Duration::from_millis(1),
        reconnect_max: Duration::from_millis(8),
        ..cfg()
    };
    let ((a, b), _hosts) = untrusting_pair(quick);
    const ATTEMPTS: u64 = 40;
    b.wait_refused(ATTEMPTS, Duration::from_secs(120)).unwrap();
    let refused_b = b.stats().refused;
    drop(b);
    let refused_a = a.stats().refused;
    drop(a);
    let text = log.text();
    let warnings = text.lines().filter(|l| l.contains("WARN")).count();
    println!("{text}");
    assert!(refused_a >= 1, "the listener refused nothing");
    // Each side warns once per power of two of its refusals in a row; the counts were read
    // while attempts went on, so allow for twice as many.
    let ceiling = 2 * warned(refused_a.max(refused_b) * 2);
    assert!(
        (2..=ceiling).contains(&warnings),
        "{warnings} warnings for {refused_b} connector and {refused_a} listener refusals (at most {ceiling}): {text}"
    );
    assert!(
        (warnings as u64) * 3 < refused_a + refused_b,
        "{warnings} warnings for {} refusals: not far fewer than one per attempt",
        refused_a + refused_b
    );
    assert!(
        text.contains("retried with back-off"),
        "the warning says the peer is retried with back-off: {text}"
    );
}
