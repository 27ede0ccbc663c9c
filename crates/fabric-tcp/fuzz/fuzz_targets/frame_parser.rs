//! Feeds arbitrary bytes to the frame parser the way the reader loop does: parse frames from
//! the front until an error or an incomplete frame. It must never panic, and every frame it
//! accepts must re-encode to exactly the bytes it was parsed from. A write frame taken split
//! after its header (`split_write`) must be the frame the whole parses to.
#![no_main]

use devlend_fabric_tcp::frame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let cut = frame::WRITE_HEADER_LEN.min(data.len());
    if let Some((f, n)) = frame::split_write(&data[..cut], &data[cut..]) {
        assert_eq!(frame::parse(data), Ok(Some((f, cut + n))));
    }
    let mut rest = data;
    while let Ok(Some((f, used))) = frame::parse(rest) {
        let mut again = Vec::new();
        f.encode(&mut again);
        assert_eq!(Some(again.as_slice()), rest.get(..used));
        rest = rest.get(used..).unwrap_or_default();
    }
});
