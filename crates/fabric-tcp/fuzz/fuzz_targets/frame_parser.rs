//! Feeds arbitrary bytes to the frame parser the way the reader loop does: parse frames from
//! the front until an error or an incomplete frame. It must never panic, and every frame it
//! accepts must re-encode to exactly the bytes it was parsed from.
#![no_main]

use devlend_fabric_tcp::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((f, used))) = frame::parse(rest) {
        let mut again = Vec::new();
        f.encode(&mut again);
        assert_eq!(Some(again.as_slice()), rest.get(..used));
        rest = rest.get(used..).unwrap_or_default();
    }
});
