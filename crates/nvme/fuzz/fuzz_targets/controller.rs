//! The controller core without threads: arbitrary host memory (PRP lists, DSM ranges, data)
//! and a script of submission queue entries and doorbell values, processed synchronously.
//! Nothing may panic, and every DMA stays inside the harness's host memory (its port refuses
//! anything else).
#![no_main]

use std::cell::RefCell;

use devlend_nvme::fuzzing::FuzzController;
use libfuzzer_sys::fuzz_target;

thread_local! {
    static CTRL: RefCell<Option<FuzzController>> = const { RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // First two bytes: how much of the rest is host memory (in 64-byte units).
    let mem_len = (usize::from(u16::from_le_bytes([data[0], data[1]])) * 64).min(data.len() - 2);
    let (memory, script) = data[2..].split_at(mem_len);
    CTRL.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            let path =
                std::env::temp_dir().join(format!("devlend-nvme-fuzz-{}.img", std::process::id()));
            *c = FuzzController::new(&path).ok();
            // The controller holds the image open: unlinked now, it goes when the process
            // does (libFuzzer ends with `exit`, which runs no destructor of this thread).
            let _ = std::fs::remove_file(&path);
        }
        if let Some(ctrl) = c.as_mut() {
            ctrl.run(memory, script);
        }
    });
});
