//! A management message from a peer: parsed at the edge (an error, never a panic); what
//! parses re-encodes to itself, and a grant's validation never panics either.
#![no_main]

use devlend_lending::protocol::{Envelope, Response};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(env) = Envelope::parse(data) else {
        return;
    };
    let again = Envelope::parse(&env.encode()).expect("what parsed must re-encode");
    assert_eq!(again, env);
    if let Envelope::Response {
        body: Response::Granted { grant },
        ..
    } = &env
    {
        let _ = grant.validate();
    }
});
