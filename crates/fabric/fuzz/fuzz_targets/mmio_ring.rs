//! A hostile peer writing arbitrary entries (and sequence numbers) into this side's MMIO
//! request ring: the service thread must never panic, wedge, or misanswer a later valid read.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    devlend_fabric::fuzzing::ring_entries(data);
});
