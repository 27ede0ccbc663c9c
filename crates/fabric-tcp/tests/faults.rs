//! Faults between two nodes on the loopback address, through the fault-injection proxy, and
//! bad bytes from a peer: each is link-down (or a refusal), never a hang or a panic.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use devlend_fabric::{FabricError, Link, LinkState, MemoryWindows, PeerWindows, WindowOffset};
use devlend_fabric_tcp::frame::{Frame, Hello, VERSION};
use devlend_fabric_tcp::{Credentials, TcpNtb};
use devlend_testkit::proxy::Proxy;
use devlend_testkit::tcp::*;

struct Through {
    a: TcpNtb,
    b: TcpNtb,
    proxy: Proxy,
    _ha: Host,
    _hb: Host,
}

/// `a` listens, `b` connects through a proxy.
fn through_proxy() -> Through {
    let keys = deployment();
    let ha = host();
    let hb = host();
    let a = TcpNtb::listen(localhost(), ha.asp.clone(), cfg(), creds(&keys, "a", "b")).unwrap();
    a.mw_set_trans(0, RAM_BASE, RAM_LEN as u64).unwrap();
    let proxy = Proxy::start(localhost(), a.local_addr().unwrap());
    let b = TcpNtb::connect(proxy.addr, hb.asp.clone(), cfg(), creds(&keys, "b", "a")).unwrap();
    a.wait_link(LinkState::Up, GUARD).unwrap();
    b.wait_link(LinkState::Up, GUARD).unwrap();
    Through {
        a,
        b,
        proxy,
        _ha: ha,
        _hb: hb,
    }
}

fn round_trip(n: &TcpNtb) -> Result<(), FabricError> {
    n.peer_mw_write(0, WindowOffset(0), b"ping")?;
    let mut v = [0u8; 4];
    n.peer_mw_read(0, WindowOffset(0), &mut v)?;
    assert_eq!(&v, b"ping");
    Ok(())
}

fn both_down_then_up_again(t: &Through, gen_a: u64, gen_b: u64) {
    t.a.wait_link(LinkState::Down, GUARD).unwrap();
    t.b.wait_link(LinkState::Down, GUARD).unwrap();
    t.b.wait_link(LinkState::Up, GUARD).unwrap();
    t.a.wait_link(LinkState::Up, GUARD).unwrap();
    assert!(t.a.link_generation() >= gen_a + 2);
    assert!(t.b.link_generation() >= gen_b + 2);
    round_trip(&t.b).unwrap();
}

#[test]
fn added_delay_only_slows_the_link() {
    let t = through_proxy();
    t.proxy.delay(Duration::from_millis(20));
    for _ in 0..5 {
        round_trip(&t.b).unwrap();
    }
    assert_eq!(t.b.stats().links_up, 1);
}

#[test]
fn a_stalled_connection_expires_by_keepalive_and_a_read_ends() {
    let t = through_proxy();
    let (ga, gb) = (t.a.link_generation(), t.b.link_generation());
    t.proxy.stall(true);
    // A read issued into the stall ends with LinkDown (keepalive), not a hang.
    let mut v = [0u8; 4];
    assert!(matches!(
        t.b.peer_mw_read(0, WindowOffset(0), &mut v),
        Err(FabricError::LinkDown)
    ));
    t.a.wait_link(LinkState::Down, GUARD).unwrap();
    t.proxy.stall(false);
    both_down_then_up_again(&t, ga, gb);
}

#[test]
fn a_dropped_connection_is_link_down_and_reconnects() {
    let t = through_proxy();
    let (ga, gb) = (t.a.link_generation(), t.b.link_generation());
    t.proxy.drop_all();
    both_down_then_up_again(&t, ga, gb);
}

#[test]
fn a_reset_connection_is_link_down_and_reconnects() {
    let t = through_proxy();
    let (ga, gb) = (t.a.link_generation(), t.b.link_generation());
    t.proxy.reset_all();
    both_down_then_up_again(&t, ga, gb);
}

/// An insecure listener (so that the test can write raw frames) and a raw client.
fn raw_peer() -> (TcpNtb, TcpStream, Host) {
    let ha = host();
    let a = TcpNtb::listen(localhost(), ha.asp.clone(), cfg(), Credentials::Insecure).unwrap();
    a.mw_set_trans(0, RAM_BASE, RAM_LEN as u64).unwrap();
    let mut s = TcpStream::connect(a.local_addr().unwrap()).unwrap();
    s.set_read_timeout(Some(GUARD)).unwrap();
    s.write_all(b"DEVLEND-PLAIN/1\n").unwrap();
    let mut pre = [0u8; 16];
    s.read_exact(&mut pre).unwrap();
    (a, s, ha)
}

fn hello() -> Vec<u8> {
    let mut b = Vec::new();
    Frame::Hello(Hello {
        version: VERSION,
        spad_count: 4,
        msg_count: 4,
        db_valid_mask: 0xf,
        window_sizes: vec![0],
    })
    .encode(&mut b);
    b
}

/// Reads until the node closes the connection.
fn closed_by_node(mut s: TcpStream) {
    let mut sink = Vec::new();
    let _ = s.read_to_end(&mut sink);
}

#[test]
fn garbage_before_the_hello_is_refused() {
    let (a, mut s, _h) = raw_peer();
    s.write_all(&[0xee; 64]).unwrap();
    closed_by_node(s);
    a.wait_refused(1, GUARD).unwrap();
    assert_eq!(a.stats().links_up, 0);
}

#[test]
fn unknown_oversized_and_truncated_frames_end_the_link() {
    let bad: [&[u8]; 3] = [
        &[200, 0, 0, 0, 0, 0, 0, 0],
        &[4, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f],
        &[4, 0, 0, 0, 100, 0, 0, 0, 1, 2, 3],
    ];
    for (i, frame) in bad.iter().enumerate() {
        let (a, mut s, _h) = raw_peer();
        s.write_all(&hello()).unwrap();
        a.wait_link(LinkState::Up, GUARD).unwrap();
        s.write_all(frame).unwrap();
        if i == 2 {
            // Truncated: the connection ends inside the frame.
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }
        a.wait_link(LinkState::Down, GUARD).unwrap();
        closed_by_node(s);
    }
}

#[test]
fn a_second_hello_or_a_reply_flood_ends_the_link() {
    // The link starts down: each case first sees it up, so that down is the peer's doing.
    let (a, mut s, _h) = raw_peer();
    s.write_all(&hello()).unwrap();
    a.wait_link(LinkState::Up, GUARD).unwrap();
    s.write_all(&hello()).unwrap();
    a.wait_link(LinkState::Down, GUARD).unwrap();
    closed_by_node(s);

    // More outstanding reads than the protocol allows, without reading the replies.
    let (a, mut s, _h) = raw_peer();
    s.write_all(&hello()).unwrap();
    a.wait_link(LinkState::Up, GUARD).unwrap();
    let mut reads = Vec::new();
    for tag in 0..100_000u32 {
        Frame::Read {
            tag,
            window: 0,
            offset: 0,
            len: 4,
        }
        .encode(&mut reads);
    }
    let _ = s.write_all(&reads);
    a.wait_link(LinkState::Down, GUARD).unwrap();
}

/// Reads frames from the raw peer's socket until `want` read requests came, answering
/// nothing; returns them as (tag, offset, length).
fn read_requests(s: &mut TcpStream, buf: &mut Vec<u8>, want: usize) -> Vec<(u32, u64, u32)> {
    let mut reads = Vec::new();
    let mut chunk = [0u8; 4096];
    while reads.len() < want {
        while let Some((frame, used)) = devlend_fabric_tcp::frame::parse(buf).unwrap() {
            if let Frame::Read {
                tag, offset, len, ..
            } = frame
            {
                reads.push((tag, offset, len));
            }
            buf.drain(..used);
        }
        if reads.len() >= want {
            break;
        }
        // A read timeout (GUARD) here fails the test: the requests did not all come.
        let n = s
            .read(&mut chunk)
            .expect("the read requests did not all arrive");
        assert!(n > 0, "the node closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
    reads
}

/// Several reads in one call all leave before the first reply is awaited: the peer here sees
/// every request (a 100 KiB read in two pieces among them) before it answers any, then answers
/// them out of order, and each buffer gets its own bytes.
#[test]
fn reads_in_one_call_are_all_outstanding_at_once() {
    let (a, mut s, _h) = raw_peer();
    let mut hello = Vec::new();
    Frame::Hello(Hello {
        version: VERSION,
        spad_count: 4,
        msg_count: 4,
        db_valid_mask: 0xf,
        window_sizes: vec![1 << 20],
    })
    .encode(&mut hello);
    s.write_all(&hello).unwrap();
    a.wait_link(LinkState::Up, GUARD).unwrap();
    let sizes = [16usize, 4096, 100 * 1024, 8];
    let caller = std::thread::spawn(move || {
        let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|n| vec![0u8; *n]).collect();
        let mut reads: Vec<(WindowOffset, &mut [u8])> = bufs
            .iter_mut()
            .enumerate()
            .map(|(i, b)| (WindowOffset(i as u64 * 0x4_0000), b.as_mut_slice()))
            .collect();
        let r = a.peer_mw_read_many(0, &mut reads);
        (r, bufs, a)
    });
    let mut pending = Vec::new();
    let reads = read_requests(&mut s, &mut pending, 5);
    // Answer in reverse order; every byte tells its window offset.
    let mut out = Vec::new();
    for &(tag, offset, len) in reads.iter().rev() {
        let data: Vec<u8> = (0..u64::from(len))
            .map(|i| (offset + i) as u8 ^ 0x5a)
            .collect();
        Frame::Reply {
            tag,
            status: devlend_fabric_tcp::frame::Status::Ok,
            data: &data,
        }
        .encode(&mut out);
    }
    s.write_all(&out).unwrap();
    let (r, bufs, _a) = caller.join().unwrap();
    r.unwrap();
    for (i, b) in bufs.iter().enumerate() {
        let base = i as u64 * 0x4_0000;
        let want: Vec<u8> = (0..b.len() as u64)
            .map(|k| (base + k) as u8 ^ 0x5a)
            .collect();
        assert_eq!(b, &want, "read {i}");
    }
}
