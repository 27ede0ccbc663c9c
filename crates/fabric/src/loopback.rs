//! In-process loopback: two [`Ntb`](crate::Ntb) sides in one process, for tests of the layers
//! above. The sides use the same control pages, ring and service threads as `shm`; only the
//! exchange of pages and window announcements is a direct call instead of a socket.

use std::sync::{Arc, Mutex, OnceLock, Weak};

use crate::endpoint::{
    delegate_ntb, Announce, Endpoint, LocalWindow, PagePair, PeerCounts, PeerWindow,
};
use crate::page::ControlPage;
use crate::{AddressSpace, LinkConfig, Resolved, Result};

/// The peer's endpoint and its side of the connection.
type PeerSlot = Arc<OnceLock<(Weak<Endpoint>, Weak<PagePair>)>>;

/// Announces translations straight into the peer's endpoint.
struct DirectAnnounce(PeerSlot);

impl Announce for DirectAnnounce {
    fn announce(&self, window: usize, what: Option<&LocalWindow>) -> Result<()> {
        let Some((ep, pair)) = self
            .0
            .get()
            .and_then(|(e, s)| Some((e.upgrade()?, s.upgrade()?)))
        else {
            return Ok(());
        };
        let exported = what.map(|w| match &w.target {
            Resolved::Ram(span) => PeerWindow::Ram(span.clone()),
            Resolved::Mmio(..) => PeerWindow::Mmio { size: w.size },
        });
        ep.set_peer_window(&pair, window, exported)
    }
}

/// What both sides of a pair share: their endpoints and the current connection.
struct Pair {
    ends: [Arc<Endpoint>; 2],
    pairs: Mutex<Option<[Arc<PagePair>; 2]>>,
}

impl Pair {
    fn up(&self) -> Result<()> {
        let mut pairs = devlend_sync::lock(&self.pairs);
        if pairs.is_some() {
            return Ok(());
        }
        let [a, b] = &self.ends;
        let pages = [
            Arc::new(ControlPage::create()?),
            Arc::new(ControlPage::create()?),
        ];
        let slots: [PeerSlot; 2] = [Arc::new(OnceLock::new()), Arc::new(OnceLock::new())];
        let [pa, pb] = pages;
        let sa = Arc::new(PagePair::new(
            pa.clone(),
            pb.clone(),
            PeerCounts::of(b.config()),
            Box::new(DirectAnnounce(slots[0].clone())),
        ));
        let sb = Arc::new(PagePair::new(
            pb,
            pa,
            PeerCounts::of(a.config()),
            Box::new(DirectAnnounce(slots[1].clone())),
        ));
        let _ = slots[0].set((Arc::downgrade(b), Arc::downgrade(&sb)));
        let _ = slots[1].set((Arc::downgrade(a), Arc::downgrade(&sa)));
        // Both sides must be installed before either announces its windows.
        a.install(&sa);
        b.install(&sb);
        let started = a
            .announce_all(&sa)
            .and_then(|()| b.announce_all(&sb))
            .and_then(|()| a.start_service(sa.clone()))
            .and_then(|()| b.start_service(sb.clone()));
        if let Err(e) = started {
            a.detach(&sa);
            b.detach(&sb);
            return Err(e);
        }
        *pairs = Some([sa, sb]);
        Ok(())
    }

    fn down(&self) {
        let taken = devlend_sync::lock(&self.pairs).take();
        if let Some([sa, sb]) = taken {
            let [a, b] = &self.ends;
            a.detach(&sa);
            b.detach(&sb);
        }
    }
}

/// One side of an in-process link. Dropping either side takes the link down.
pub struct LoopbackNtb {
    ep: Arc<Endpoint>,
    pair: Arc<Pair>,
}

impl LoopbackNtb {
    /// Takes the link down on both sides, as a dead or disconnected peer would: waiters return
    /// [`FabricError::LinkDown`](crate::FabricError::LinkDown), the peers' translations are
    /// forgotten.
    pub fn link_down(&self) {
        self.pair.down();
    }

    /// Brings the link up again (a new connection with fresh registers; local translations
    /// are re-announced). Does nothing while it is up.
    pub fn link_up(&self) -> Result<()> {
        self.pair.up()
    }
}

impl Drop for LoopbackNtb {
    fn drop(&mut self) {
        self.pair.down();
    }
}

delegate_ntb!(LoopbackNtb, "loopback");

/// Two connected sides: `a` owns address space `asp_a`, `b` owns `asp_b`. The link is up when
/// this returns.
pub fn loopback_pair(
    cfg: LinkConfig,
    asp_a: Arc<AddressSpace>,
    asp_b: Arc<AddressSpace>,
) -> Result<(Arc<LoopbackNtb>, Arc<LoopbackNtb>)> {
    let a = Arc::new(Endpoint::new(cfg, asp_a)?);
    let b = Arc::new(Endpoint::new(cfg, asp_b)?);
    let pair = Arc::new(Pair {
        ends: [a.clone(), b.clone()],
        pairs: Mutex::new(None),
    });
    pair.up()?;
    Ok((
        Arc::new(LoopbackNtb {
            ep: a,
            pair: pair.clone(),
        }),
        Arc::new(LoopbackNtb { ep: b, pair }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        BusAddr, Doorbells, FabricError, Link, LinkState, MemoryWindows, Messages, MmioHandler,
        PeerWindows, SharedMemory, WindowOffset,
    };
    use std::time::Duration;

    const LONG: Duration = Duration::from_secs(20);

    /// Records every access; reads return the number of writes seen so far.
    #[derive(Default)]
    struct Recorder {
        log: Mutex<Vec<(u64, Vec<u8>)>>,
    }

    impl MmioHandler for Recorder {
        fn mmio_read(&self, _offset: u64, data: &mut [u8]) {
            let n = self.log.lock().unwrap().len() as u64;
            for (d, s) in data.iter_mut().zip(n.to_le_bytes().iter().cycle()) {
                *d = *s;
            }
        }
        fn mmio_write(&self, offset: u64, data: &[u8]) {
            self.log.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    fn setup() -> (
        Arc<LoopbackNtb>,
        Arc<LoopbackNtb>,
        Arc<SharedMemory>,
        Arc<Recorder>,
    ) {
        let asp_a = Arc::new(AddressSpace::new());
        let asp_b = Arc::new(AddressSpace::new());
        let ram = Arc::new(SharedMemory::new("b-ram", 0x4000).unwrap());
        asp_b.add_ram(BusAddr(0x10_0000), ram.clone()).unwrap();
        let rec = Arc::new(Recorder::default());
        asp_b
            .add_mmio(BusAddr(0x20_0000), 0x2000, rec.clone())
            .unwrap();
        let (a, b) = loopback_pair(LinkConfig::default(), asp_a, asp_b).unwrap();
        (a, b, ram, rec)
    }

    #[test]
    fn ram_window_direct_and_copy() {
        let (a, b, ram, _) = setup();
        assert!(matches!(
            a.peer_mw_size(0),
            Err(FabricError::WindowNotTranslated(0))
        ));
        b.mw_set_trans(0, BusAddr(0x10_1000), 0x2000).unwrap();
        assert_eq!(a.peer_mw_size(0).unwrap(), 0x2000);
        a.peer_mw_write(0, WindowOffset(8), b"hello").unwrap();
        let mut got = [0u8; 5];
        ram.read_at(0x1008, &mut got).unwrap();
        assert_eq!(&got, b"hello");
        let span = a.peer_mw_direct(0).unwrap().unwrap();
        assert_eq!(span.len(), 0x2000);
        span.store_u64(0x100, 42).unwrap();
        assert_eq!(ram.load_u64(0x1100).unwrap(), 42);
        let mut buf = [0u8; 8];
        a.peer_mw_read(0, WindowOffset(0x100), &mut buf).unwrap();
        assert_eq!(u64::from_le_bytes(buf), 42);
        b.mw_clear_trans(0).unwrap();
        assert!(matches!(
            a.peer_mw_read(0, WindowOffset(0), &mut buf),
            Err(FabricError::WindowNotTranslated(0))
        ));
    }

    #[test]
    fn mmio_writes_arrive_in_order_before_a_read() {
        let (a, b, _, rec) = setup();
        b.mw_set_trans(1, BusAddr(0x20_0000), 0x2000).unwrap();
        assert_eq!(a.peer_mw_direct(1).unwrap().map(|s| s.len()), None);
        for i in 0..2000u32 {
            a.peer_mw_write(1, WindowOffset(u64::from(i % 512) * 4), &i.to_le_bytes())
                .unwrap();
        }
        let long: Vec<u8> = (0..150u8).collect();
        a.peer_mw_write(1, WindowOffset(0x1000), &long).unwrap();
        let mut buf = [0u8; 8];
        a.peer_mw_read(1, WindowOffset(0), &mut buf).unwrap();
        assert_eq!(u64::from_le_bytes(buf), 2003);
        let log = rec.log.lock().unwrap();
        for (i, (off, data)) in log.iter().take(2000).enumerate() {
            assert_eq!(*off, (i as u64 % 512) * 4);
            assert_eq!(data.as_slice(), (i as u32).to_le_bytes());
        }
        let tail: Vec<u8> = log[2000..].iter().flat_map(|(_, d)| d.clone()).collect();
        assert_eq!(tail, long);
        assert_eq!(log[2001].0, 0x1040);
    }

    #[test]
    fn concurrent_producers_keep_per_thread_order() {
        let (a, b, _, rec) = setup();
        b.mw_set_trans(1, BusAddr(0x20_0000), 0x2000).unwrap();
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let a = a.clone();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 8];
                    for i in 0..500u32 {
                        a.peer_mw_write(1, WindowOffset(t * 8), &i.to_le_bytes())
                            .unwrap();
                        if i % 100 == 0 {
                            a.peer_mw_read(1, WindowOffset(0x100), &mut buf).unwrap();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let mut buf = [0u8; 8];
        a.peer_mw_read(1, WindowOffset(0), &mut buf).unwrap();
        let log = rec.log.lock().unwrap();
        assert_eq!(log.len(), 2000);
        for t in 0..4u64 {
            let seen: Vec<u32> = log
                .iter()
                .filter(|(off, _)| *off == t * 8)
                .map(|(_, d)| u32::from_le_bytes([d[0], d[1], d[2], d[3]]))
                .collect();
            assert_eq!(seen, (0..500).collect::<Vec<u32>>(), "thread {t}");
        }
    }

    #[test]
    fn link_down_wakes_waiters_and_link_up_reannounces() {
        let (a, b, _, _) = setup();
        let g0 = a.link_generation();
        b.mw_set_trans(0, BusAddr(0x10_0000), 0x1000).unwrap();
        let b2 = b.clone();
        let db = std::thread::spawn(move || b2.db_wait(1, LONG));
        let b3 = b.clone();
        let msg = std::thread::spawn(move || b3.msg_wait(1, LONG));
        a.link_down();
        assert!(matches!(db.join().unwrap(), Err(FabricError::LinkDown)));
        assert!(matches!(msg.join().unwrap(), Err(FabricError::LinkDown)));
        assert_eq!(a.link_state(), LinkState::Down);
        assert!(matches!(a.peer_db_set(1), Err(FabricError::LinkDown)));
        assert!(matches!(a.peer_mw_size(0), Err(FabricError::LinkDown)));
        assert!(matches!(
            b.wait_link(LinkState::Up, Duration::from_millis(1)),
            Err(FabricError::Timeout)
        ));
        b.link_up().unwrap();
        a.wait_link(LinkState::Up, LONG).unwrap();
        assert_eq!(a.link_generation(), g0 + 2);
        assert_eq!(a.peer_mw_size(0).unwrap(), 0x1000);
    }
}
