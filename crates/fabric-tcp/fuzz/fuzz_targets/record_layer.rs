//! Feeds arbitrary bytes to the TLS record layer that takes over after the handshake: raw
//! network bytes to the opener, or inner records sealed with a known key and then opened (so
//! that the parsing behind authentication is reached too). It must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| devlend_fabric_tcp::fuzz_records(data));
