//! Entry points for the `cargo fuzz` targets in `crates/fabric/fuzz` (and for the randomized
//! tests below): they feed untrusted bytes to the code that parses peer input, exactly as the
//! backends do. Not a stable API.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devlend_memory::SharedMemory;

use crate::endpoint::{Announce, Endpoint, LocalWindow, PagePair, PeerCounts};
use crate::page::{self, ControlPage};
use crate::{AddressSpace, BusAddr, LinkConfig, MmioHandler, Result};

/// Parses `bytes` as a shm control-socket message that arrived with `fds` descriptors
/// (memfds of `fd_len` bytes), and maps what it announces, as the socket reader does.
pub fn control_message(bytes: &[u8], fds: u8, fd_len: u16) {
    let fds: Vec<OwnedFd> = (0..fds % 3)
        .filter_map(|_| SharedMemory::new("fuzz", usize::from(fd_len.max(1))).ok())
        .filter_map(|m| m.fd().try_clone_to_owned().ok())
        .collect();
    let _ = crate::shm::parse_untrusted_control(bytes, fds);
}

struct Device;

impl MmioHandler for Device {
    fn mmio_read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn mmio_write(&self, _offset: u64, _data: &[u8]) {}
}

struct Silent;

impl Announce for Silent {
    fn announce(&self, _: usize, _: Option<&LocalWindow>) -> Result<()> {
        Ok(())
    }
}

/// The tag of the well-formed read that ends every [`ring_entries`] run.
const FINAL_TAG: u32 = 0xfeed_f00d;

/// Size of one raw ring entry taken from the fuzz input.
pub const RING_INPUT_ENTRY: usize = 64;

/// Plays a peer that writes arbitrary entries into this side's MMIO request ring (one per
/// 64 bytes of `data`: kind, window, length, offset, tag, sequence and payload all taken from
/// the input), plus an arbitrary ring head; then checks that the service thread still answers
/// a well-formed read. Panics only if the ring service wedged or misanswered.
pub fn ring_entries(data: &[u8]) {
    let asp = Arc::new(AddressSpace::new());
    let ram = SharedMemory::new("fuzz-ram", 0x2000).map(Arc::new);
    let (Ok(ram), Ok(ep)) = (ram, Endpoint::new(LinkConfig::default(), asp.clone())) else {
        return;
    };
    let ep = Arc::new(ep);
    let setup = asp
        .add_mmio(BusAddr(0x10000), 0x1000, Arc::new(Device))
        .and_then(|()| asp.add_ram(BusAddr(0x20000), ram))
        .and_then(|()| ep.mw_set_trans(0, BusAddr(0x10000), 0x1000))
        .and_then(|()| ep.mw_set_trans(1, BusAddr(0x20000), 0x2000));
    let (Ok(()), Ok(local), Ok(peer)) = (setup, ControlPage::create(), ControlPage::create())
    else {
        return;
    };
    let pair = Arc::new(PagePair::new(
        Arc::new(local),
        Arc::new(peer),
        PeerCounts::of(&LinkConfig::default()),
        Box::new(Silent),
    ));
    if ep.attach(pair.clone()).is_err() {
        return;
    }
    let mut position = 0u32;
    for chunk in data.chunks(RING_INPUT_ENTRY) {
        let mut raw = [0u8; RING_INPUT_ENTRY];
        for (d, s) in raw.iter_mut().zip(chunk) {
            *d = *s;
        }
        let word = |at: usize| {
            let mut b = [0u8; 4];
            for (d, s) in b.iter_mut().zip(raw.iter().skip(at)) {
                *d = *s;
            }
            u32::from_le_bytes(b)
        };
        // Mostly small kinds/windows/lengths so that valid paths are reached too.
        let kind = word(0) % 5;
        let window = if word(4) & 0x8000_0000 != 0 {
            word(4)
        } else {
            word(4) % 4
        };
        let len = if word(8) & 0x8000_0000 != 0 {
            word(8)
        } else {
            word(8) % 80
        };
        let offset = u64::from(word(12)) | (u64::from(word(16) & 0x8000_0001) << 32);
        // Never the final read's tag: its completion must be that read's, not an earlier one.
        let tag = match word(20) {
            FINAL_TAG => FINAL_TAG ^ 1,
            t => t,
        };
        let well_sequenced = word(24) % 8 != 0;
        let e = ControlPage::entry_offset(position);
        let m = pair_local(&pair);
        let _ = m.store_u32(e + page::E_KIND, kind);
        let _ = m.store_u32(e + page::E_WINDOW, window);
        let _ = m.store_u32(e + page::E_LEN, len);
        let _ = m.store_u64(e + page::E_OFFSET, offset);
        let _ = m.store_u32(e + page::E_TAG, tag);
        let _ = m.write_at(e + page::E_DATA, raw.get(28..).unwrap_or_default());
        if well_sequenced {
            let _ = m.store_u32(e + page::E_SEQ, position.wrapping_add(1));
            position = position.wrapping_add(1);
        } else {
            // A bogus sequence number: never consumed; the next entry overwrites the slot.
            let bogus = match word(28) {
                s if s == position.wrapping_add(1) => s.wrapping_add(1),
                s => s,
            };
            let _ = m.store_u32(e + page::E_SEQ, bogus);
        }
        if let Ok(w) = pair.local_page().wait_word(page::RING_WAIT) {
            w.notify();
        }
        // Keep the ring from overflowing: wait for the consumer every half ring.
        if position & (page::RING_ENTRIES / 2 - 1) == 0 {
            wait_head(&pair, position);
        }
    }
    // A well-formed read must still be answered.
    let tag = FINAL_TAG;
    let e = ControlPage::entry_offset(position);
    let m = pair_local(&pair);
    let _ = m.store_u32(e + page::E_KIND, 2);
    let _ = m.store_u32(e + page::E_WINDOW, 0);
    let _ = m.store_u32(e + page::E_LEN, 4);
    let _ = m.store_u64(e + page::E_OFFSET, 0);
    let _ = m.store_u32(e + page::E_TAG, tag);
    let _ = m.store_u32(e + page::E_SEQ, position.wrapping_add(1));
    if let Ok(w) = pair.local_page().wait_word(page::RING_WAIT) {
        w.notify();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let peer = pair.peer_page();
    while peer.mem().load_u32(page::CPL_TAG).ok() != Some(tag) {
        assert!(
            Instant::now() < deadline,
            "the ring service stopped answering"
        );
        std::thread::yield_now();
    }
    let mut got = [0u8; 4];
    let _ = peer.mem().read_at(page::CPL_DATA, &mut got);
    assert_eq!(got, [0x5a; 4], "a well-formed read was misanswered");
    ep.detach(&pair);
}

fn pair_local(pair: &PagePair) -> &SharedMemory {
    pair.local_page().mem()
}

fn wait_head(pair: &PagePair, position: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pair.local_page().mem().load_u32(page::RING_HEAD).ok() != Some(position) {
        assert!(Instant::now() < deadline, "the ring service wedged");
        std::thread::yield_now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift64*), so these runs are reproducible.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn random_control_messages_never_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..3000 {
            let len = (rng.next() % 48) as usize;
            let mut msg = rng.bytes(len);
            // Steer the tag field into the valid range half the time.
            if let Some(b) = msg.get_mut(0).filter(|_| i % 2 == 0) {
                // 0..=7: every kind (1 Hello ..= 6 InterruptFd) and an unknown tag either side.
                *b = (rng.next() % 8) as u8;
                if let Some(rest) = msg.get_mut(1..4) {
                    rest.fill(0);
                }
            }
            control_message(&msg, rng.next() as u8, rng.next() as u16);
        }
    }

    #[test]
    fn random_ring_entries_never_wedge_the_service() {
        let mut rng = Rng(0x1234_5678_9abc_def1);
        for _ in 0..40 {
            let n = (rng.next() % 600) as usize;
            ring_entries(&rng.bytes(n * RING_INPUT_ENTRY));
        }
    }

    #[test]
    fn an_entry_with_the_final_reads_tag_is_not_taken_for_its_answer() {
        // Found by the fuzzer: a read outside the window under the final read's tag answered
        // first, and the check took its (empty) data for the final read's.
        let mut entry = [0u8; RING_INPUT_ENTRY];
        for (at, v) in [(0, 2), (8, 16), (12, 0x222c_7e37), (20, FINAL_TAG), (24, 1)] {
            entry[at..at + 4].copy_from_slice(&u32::to_le_bytes(v));
        }
        ring_entries(&entry);
    }
}
