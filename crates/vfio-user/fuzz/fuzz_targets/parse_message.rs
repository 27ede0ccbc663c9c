//! Fuzzes the vfio-user message parser: any byte string, split into a header and a payload
//! with any number of accompanying descriptors, must parse or be refused with an errno, never
//! panic; a parsed request must be consistent with the header it came from.
#![no_main]

use devlend_vfio_user::wire::{self, Header, Request, HEADER_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&nfds, rest)) = data.split_first() else {
        return;
    };
    let Some(head) = rest.get(..HEADER_LEN) else {
        return;
    };
    let Ok(head) = <[u8; HEADER_LEN]>::try_from(head) else {
        return;
    };
    let header = Header::decode(&head);
    assert_eq!(Header::decode(&header.encode()), header);
    let payload = rest.get(HEADER_LEN..).unwrap_or(&[]);
    match wire::parse_request(&header, payload, usize::from(nfds % 20)) {
        Ok(req) => {
            assert_eq!(req.command() as u16, header.command);
            match req {
                Request::RegionWrite { data, .. } => {
                    assert!(!data.is_empty() && data.len() <= wire::MAX_DATA_XFER as usize)
                }
                Request::DmaMap(m) => {
                    assert!(m.size > 0 && m.iova.checked_add(m.size - 1).is_some())
                }
                Request::Version { caps, .. } => {
                    let reply = wire::version_reply(&caps);
                    assert_eq!(reply.last(), Some(&0));
                }
                _ => {}
            }
            let _ = wire::reply(&header, payload);
        }
        Err(e) => {
            assert!(e.errno() > 0);
            let r = wire::error_reply(&header, e.errno());
            assert_eq!(r.len(), HEADER_LEN);
        }
    }
});
