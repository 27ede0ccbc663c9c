//! Test rigs of devlend, kept out of the library crates: nothing here is compiled into a
//! library. Library crates list this crate under `[dev-dependencies]` only; the one regular
//! dependent is the `devlend` binary, whose `bench` commands run on these rigs (network
//! namespaces for the tcp rows, QEMU guests for `bench vm`).
//!
//! - [`netns`]: two network namespaces joined by a veth pair (runs `ip`, calls `setns`; root).
//! - [`guest`]: boots a throw-away QEMU guest that runs one script (VM tests, `bench vm`), or
//!   one that keeps running and takes commands ([`guest::live`], the hot-plug tests), and
//!   runs vfio-user servers as child processes.
//! - [`conformance`]: one NTB conformance suite, run against every backend.
//! - [`hostile`]: a hand-written peer of the lending protocol and the absurd offers it makes.
//! - [`tcp`], [`proxy`]: hosts for tcp fabric tests and a TCP proxy that injects faults.
//! - [`process`]: a child process killed when the test lets go of it.
//! - [`scratch`]: a test's own temporary directory, removed when the test lets go of it.
//! - the `devlend-tcp-host` binary: one side of a tcp link, run in a namespace by
//!   `tests/tcp_netns.rs`.
//!
//! Fuzzing entry points stay in the crates whose internals they reach, behind each crate's
//! `fuzzing` feature (enabled only by its `fuzz/` package).

pub mod conformance;
pub mod guest;
pub mod hostile;
pub mod netns;
pub mod process;
pub mod proxy;
pub mod scratch;
pub mod tcp;
