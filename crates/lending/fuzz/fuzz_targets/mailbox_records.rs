//! The management channel's mailbox as a hostile peer may fill it: any session word, commit
//! words, lengths and payloads, written in any order. Draining must not panic, must take at
//! most one mailbox of records per call, each within the payload limit.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use devlend_fabric::{
    loopback_pair, AddressSpace, BusAddr, LinkConfig, Ntb, PeerWindows, WindowOffset,
};
use devlend_lending::channel::{Channel, DRAIN_MAX, MAILBOX_BYTES, MAILBOX_WINDOW, MAX_PAYLOAD};

struct Rig {
    peer: Arc<dyn Ntb>,
    channel: Channel,
}

fn rig() -> &'static Mutex<Rig> {
    static RIG: OnceLock<Mutex<Rig>> = OnceLock::new();
    RIG.get_or_init(|| {
        let (a, b) = loopback_pair(
            LinkConfig::default(),
            Arc::new(AddressSpace::new()),
            Arc::new(AddressSpace::new()),
        )
        .expect("loopback pair");
        let channel = Channel::new(a as Arc<dyn Ntb>, BusAddr(0x7f00_0000_0000)).expect("channel");
        Mutex::new(Rig {
            peer: b as Arc<dyn Ntb>,
            channel,
        })
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let rig = rig().lock().unwrap_or_else(|e| e.into_inner());
    // Each write: offset (u32, wrapped into the mailbox), length (u8), bytes.
    let mut rest = data;
    while rest.len() >= 5 {
        let offset =
            u64::from(u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]])) % MAILBOX_BYTES;
        let len = usize::from(rest[4]).min(rest.len() - 5);
        let bytes = &rest[5..5 + len];
        let len = bytes.len().min((MAILBOX_BYTES - offset) as usize);
        let _ = rig
            .peer
            .peer_mw_write(MAILBOX_WINDOW, WindowOffset(offset), &bytes[..len]);
        rest = &rest[5 + bytes.len()..];
    }
    for _ in 0..2 {
        let (records, _more) = rig.channel.drain();
        assert!(records.len() <= DRAIN_MAX);
        for r in &records {
            assert!(r.len() <= MAX_PAYLOAD);
            let _ = devlend_lending::protocol::Envelope::parse(r);
        }
    }
});
