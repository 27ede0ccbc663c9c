//! A line from a node's management socket, as the node reads it (anyone who can open the
//! socket writes it): parsed to a request or to an error with a code, never a panic. What
//! parses re-encodes (as the verbs encode it) to a line that parses to the same request, and
//! the node's answer to a refused line is a reply line a client reads back as that error.
#![no_main]

use devlend_proto::{parse_reply, parse_request, reply_line, request_line, Empty};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    match parse_request(data) {
        Ok(req) => {
            let line = request_line(req.clone()).expect("a parsed request must re-encode");
            let again = parse_request(&line).expect("a re-encoded request must parse");
            assert_eq!(
                serde_json::to_value(&again).ok(),
                serde_json::to_value(&req).ok()
            );
        }
        Err(e) => {
            let back = parse_reply::<Empty>(&reply_line(Err(e.clone())));
            assert_eq!(back, Err(e));
        }
    }
});
