//! The management channel's mailbox as a hostile peer may fill it. The input is a session
//! word, then records, each: a flag byte (bit 0: commit word right for the next sequence
//! number, else taken from the input; bit 1: skip ahead one sequence number), a length field
//! (u32, any value), a slot index and payload bytes; and raw writes anywhere. Draining must not
//! panic, must take at most one mailbox of records per call, each within the payload limit.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use devlend_fabric::{
    loopback_pair, AddressSpace, BusAddr, LinkConfig, Ntb, PeerWindows, WindowOffset,
};
use devlend_lending::channel::{Channel, DRAIN_MAX, MAILBOX_BYTES, MAILBOX_WINDOW, MAX_PAYLOAD};

const SLOT_BYTES: u64 = 0x1000;
const SLOTS: u64 = 63;

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

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    let (head, tail) = rest.split_at_checked(n)?;
    *rest = tail;
    Some(head)
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let rig = rig().lock().unwrap_or_else(|e| e.into_inner());
    let write = |offset: u64, bytes: &[u8]| {
        let offset = offset % MAILBOX_BYTES;
        let len = bytes.len().min((MAILBOX_BYTES - offset) as usize);
        let _ = rig
            .peer
            .peer_mw_write(MAILBOX_WINDOW, WindowOffset(offset), &bytes[..len]);
    };
    let mut rest = data;
    let Some(session) = take(&mut rest, 8) else {
        return;
    };
    let mut s = [0u8; 8];
    s.copy_from_slice(session);
    let session = u64::from_le_bytes(s);
    write(0, &session.to_le_bytes());
    let mut seq: u64 = 1;
    while let Some(head) = take(&mut rest, 6) {
        let (flags, len_field, slot_pick) =
            (head[0], [head[1], head[2], head[3], head[4]], head[5]);
        if flags & 2 != 0 {
            seq += 1;
        }
        let slot = if flags & 4 != 0 {
            u64::from(slot_pick) % SLOTS
        } else {
            (seq - 1) % SLOTS
        };
        let at = 0x1000 + slot * SLOT_BYTES;
        let n = usize::from(slot_pick).min(rest.len());
        let payload = take(&mut rest, n).unwrap_or(&[]);
        write(at + 16, payload);
        write(at + 8, &len_field);
        let commit = if flags & 1 != 0 {
            ((session & 0xffff_ffff) << 32) | (seq & 0xffff_ffff)
        } else {
            u64::from_le_bytes([
                flags,
                len_field[0],
                len_field[1],
                len_field[2],
                len_field[3],
                slot_pick,
                0,
                0,
            ])
        };
        write(at, &commit.to_le_bytes());
        seq += 1;
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
