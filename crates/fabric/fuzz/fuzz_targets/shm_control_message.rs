//! A shm control-socket message from a hostile peer: arbitrary bytes with 0-2 descriptors
//! attached. Parsing (and mapping what it announces) must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (head, msg) = data.split_at(data.len().min(3));
    let mut h = [0u8; 3];
    h[..head.len()].copy_from_slice(head);
    devlend_fabric::fuzzing::control_message(msg, h[0], u16::from_le_bytes([h[1], h[2]]));
});
