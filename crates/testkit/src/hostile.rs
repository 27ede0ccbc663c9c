//! Hostile peers of the lending protocol, written by hand: [`RawPeer`] speaks the management
//! protocol over any fabric without the lending layer's checks, [`absurd`] builds the
//! out-of-range device descriptions and grants of [`ABSURD`], and [`serve_absurd_lender`]
//! plays a lender that offers only those. Used in-process (`crates/lending/tests/
//! hostile_peer.rs`) and as a separate process against a real `devlend node`
//! (`crates/devlend/tests/hostile_lender.rs`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use devlend_fabric::{BusAddr, Ntb, SharedMemory};
use devlend_lending::channel::Channel;
use devlend_lending::protocol::{
    AreaGrant, BarDesc, BarGrant, DeviceDesc, Envelope, Grant, Request, Response,
};
use devlend_lending::MAILBOX_BASE;

/// How long a [`RawPeer`] waits for a send or an answer.
pub const GUARD: Duration = Duration::from_secs(20);

/// A peer that speaks the management protocol by hand.
pub struct RawPeer {
    /// Its end of the link.
    pub ntb: Arc<dyn Ntb>,
    /// Its mailbox channel.
    pub ch: Channel,
    next_id: u64,
}

impl RawPeer {
    /// Sets up the mailbox on `ntb` (link slot 0's address).
    pub fn new(ntb: Arc<dyn Ntb>) -> Self {
        let ch = Channel::new(ntb.clone(), MAILBOX_BASE).expect("the raw peer's mailbox");
        Self {
            ntb,
            ch,
            next_id: 1,
        }
    }

    /// Sends a request and waits for its answer.
    pub fn call(&mut self, body: Request) -> Response {
        let id = self.next_id;
        self.next_id += 1;
        self.ch
            .send(&Envelope::Request { id, body }.encode(), GUARD)
            .expect("sending to the node");
        let deadline = Instant::now() + GUARD;
        loop {
            assert!(Instant::now() < deadline, "no answer to request {id}");
            let _ = self.ch.wait(Duration::from_millis(20));
            for record in self.ch.drain().0 {
                if let Ok(Envelope::Response { id: got, body }) = Envelope::parse(&record) {
                    if got == id {
                        return body;
                    }
                }
            }
        }
    }

    /// Sends a request that must be refused; returns the refusal.
    pub fn refused(&mut self, body: Request) -> String {
        match self.call(body.clone()) {
            Response::Error { message } => message,
            other => panic!("{body:?} was answered with {other:?}"),
        }
    }
}

/// The kinds of absurd offers [`absurd`] makes (each also the device's name).
pub const ABSURD: [&str; 10] = [
    "doorbells-wrap",
    "too-many-vectors",
    "bar-index",
    "bar-size-zero",
    "bar-size-odd",
    "window-out-of-range",
    "window-too-small",
    "area-outside",
    "wake-word",
    "many-bars",
];

/// The description and grant of absurd device `name` (one of [`ABSURD`]) under `lease`.
pub fn absurd(name: &str, lease: u64) -> (DeviceDesc, Grant) {
    let mut desc = DeviceDesc {
        name: name.to_string(),
        kind: "nvme".into(),
        owner: "evil".into(),
        borrower: None,
        vectors: 4,
        bars: vec![BarDesc {
            index: 0,
            size: 0x4000,
            is_64bit: true,
            prefetchable: false,
        }],
        detail: String::new(),
        size_bytes: None,
    };
    let mut grant = Grant {
        lease,
        device: desc.clone(),
        bars: vec![BarGrant {
            index: 0,
            window: 1,
            size: 0x4000,
            areas: Vec::new(),
        }],
        doorbell_base: 0,
        lease_ms: 3000,
    };
    match name {
        "doorbells-wrap" => {
            grant.doorbell_base = 0xffff_fff0;
            grant.device.vectors = 0x20;
        }
        "too-many-vectors" => grant.device.vectors = u16::MAX,
        "bar-index" => grant.bars[0].index = 9,
        "bar-size-zero" => grant.bars[0].size = 0,
        "bar-size-odd" => grant.bars[0].size = 0x3000,
        "window-out-of-range" => grant.bars[0].window = usize::MAX,
        "window-too-small" => grant.bars[0].size = 1 << 62,
        "area-outside" => grant.bars[0].areas.push(AreaGrant {
            offset: u64::MAX - 0xfff,
            len: 0x2000,
            window: 2,
            wake_word: Some(0),
        }),
        "wake-word" => grant.bars[0].areas.push(AreaGrant {
            offset: 0x1000,
            len: 0x1000,
            window: 2,
            wake_word: Some(u64::MAX - 2),
        }),
        "many-bars" => {
            grant.bars = (0..40)
                .map(|i| BarGrant {
                    index: (i % 6) as u8,
                    window: 1,
                    size: 0x1000,
                    areas: Vec::new(),
                })
                .collect()
        }
        _ => {}
    }
    desc.vectors = grant.device.vectors;
    (desc, grant)
}

/// Plays a hostile lender on `peer` until `stop`: translates window 1 onto a small region,
/// answers every List with the [`ABSURD`] descriptions (one with a 1000-byte detail), every
/// Borrow with an absurd grant, and counts the grants given back in `returns` (calling
/// `on_return` with the count after each).
pub fn serve_absurd_lender(
    peer: RawPeer,
    stop: &AtomicBool,
    returns: &AtomicU64,
    mut on_return: impl FnMut(u64),
) {
    peer.ntb
        .address_space()
        .add_ram(
            BusAddr(0x10_0000),
            Arc::new(SharedMemory::new("bar", 0x4000).expect("the hostile lender's BAR")),
        )
        .expect("placing the hostile lender's BAR");
    peer.ntb
        .mw_set_trans(1, BusAddr(0x10_0000), 0x4000)
        .expect("translating window 1");
    let mut next_lease = 1;
    while !stop.load(Ordering::Relaxed) {
        let _ = peer.ch.wait(Duration::from_millis(20));
        for record in peer.ch.drain().0 {
            let Ok(Envelope::Request { id, body }) = Envelope::parse(&record) else {
                continue;
            };
            let answer = match body {
                Request::List => {
                    let mut devices: Vec<DeviceDesc> =
                        ABSURD.iter().map(|n| absurd(n, 0).0).collect();
                    if let Some(d) = devices.first_mut() {
                        d.detail = "y".repeat(1000);
                    }
                    Response::Devices { devices }
                }
                Request::Borrow { device, .. } => {
                    next_lease += 1;
                    Response::Granted {
                        grant: absurd(&device, next_lease).1,
                    }
                }
                Request::Return { .. } => {
                    let n = returns.fetch_add(1, Ordering::Relaxed) + 1;
                    on_return(n);
                    Response::Ok
                }
                Request::Hello { .. } => Response::Hello {
                    host: "evil".into(),
                },
                _ => Response::Error {
                    message: "no".into(),
                },
            };
            if id != 0 {
                let _ = peer
                    .ch
                    .send(&Envelope::Response { id, body: answer }.encode(), GUARD);
            }
        }
    }
}
