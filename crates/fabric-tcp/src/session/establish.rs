//! Establishing connections: the supervisor thread connects (with back-off) or accepts, runs
//! the TLS handshake (or the explicit insecure preamble exchange), and runs one connection at
//! a time: its reader loop on the supervisor thread, its writer and service threads beside it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags};

use super::send::writer_loop;
use super::{Channel, Connection, EndError, Flush, Tls};
use crate::ntb::Inner;
use crate::tls;
use crate::Credentials;

/// First bytes of an insecure connection, both ways.
const PLAIN_PREAMBLE: &[u8; 16] = b"DEVLEND-PLAIN/1\n";
/// First byte of a TLS record carrying a handshake message.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    Client,
    Server,
}

/// TLS handshake (or the insecure preamble exchange). `Err` is the reason for a refusal.
pub(super) fn establish(
    creds: &Credentials,
    stream: &TcpStream,
    role: Role,
) -> Result<Channel, String> {
    match creds {
        Credentials::Insecure => {
            (&*stream)
                .write_all(PLAIN_PREAMBLE)
                .map_err(|e| format!("sending the insecure preamble: {e}"))?;
            let mut got = [0u8; PLAIN_PREAMBLE.len()];
            let mut have = 0;
            while have < got.len() {
                let dst = got.get_mut(have..).unwrap_or_default();
                match (&*stream).read(dst) {
                    Ok(0) => return Err("the peer closed during the insecure preamble".into()),
                    Ok(n) => have += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(format!("reading the insecure preamble: {e}")),
                }
                if got.first() == Some(&TLS_HANDSHAKE_RECORD) {
                    return Err("the peer requires TLS but this side is configured insecure".into());
                }
            }
            if &got != PLAIN_PREAMBLE {
                return Err("the peer did not send the devlend insecure preamble".into());
            }
            Ok(Channel::plain())
        }
        Credentials::Tls(t) => {
            let e = tls::handshake(t, stream, role == Role::Client)?;
            Ok(Channel {
                tls: Some(Tls {
                    sealer: Mutex::new(e.sealer),
                    opener: Mutex::new(e.opener),
                }),
                early: Some((e.plaintext, e.ciphertext)),
            })
        }
    }
}

/// How the supervisor finds its peer.
pub(crate) enum Mode {
    Listen(TcpListener),
    Connect(SocketAddr),
}

/// The supervisor thread: connects or accepts, runs one connection at a time, and repeats
/// until the [`Inner`] is stopped.
pub(crate) fn supervise(inner: Arc<Inner>, mode: Mode) {
    crate::cpu::place(inner.cfg.cpus.reader, "supervisor");
    match mode {
        Mode::Listen(listener) => {
            while let Some((stream, addr)) = accept(&inner, &listener) {
                connection(&inner, stream, addr, Role::Server);
            }
        }
        Mode::Connect(addr) => {
            while !inner.stopped() {
                match TcpStream::connect_timeout(&addr, inner.cfg.handshake_timeout) {
                    Ok(stream) => connection(&inner, stream, addr, Role::Client),
                    Err(e) => tracing::debug!(peer = %addr, error = %e, "fabric connect failed"),
                }
                let pause = backoff(
                    inner.cfg.reconnect_interval,
                    inner.cfg.reconnect_max,
                    inner.refusal_streak(),
                );
                if inner.pause(pause) {
                    break;
                }
            }
        }
    }
}

/// The pause before a connector's next attempt after `streak` refused attempts in a row:
/// `base`, doubled for each refusal after the first, at most `max`.
pub(crate) fn backoff(base: Duration, max: Duration, streak: u64) -> Duration {
    let doublings = u32::try_from(streak.saturating_sub(1))
        .unwrap_or(u32::MAX)
        .min(20);
    base.checked_mul(1u32 << doublings)
        .unwrap_or(max)
        .min(max.max(base))
}

/// Whether the `streak`-th refusal in a row is logged as a warning: the 1st, 2nd, 4th, 8th, ...
/// (the others at debug level), so a peer that keeps being refused costs a handful of lines
/// rather than a few a second.
pub(crate) fn refusal_is_warned(streak: u64) -> bool {
    streak.is_power_of_two()
}

/// Logs a refusal: a warning when [`refusal_is_warned`], debug otherwise.
fn log_refusal(peer: SocketAddr, streak: u64, what: &str, reason: &dyn std::fmt::Display) {
    if refusal_is_warned(streak) {
        tracing::warn!(
            peer = %peer,
            %reason,
            refusals_in_a_row = streak,
            "{what} (retried with back-off; next warned at {} refusals in a row)",
            streak.saturating_mul(2)
        );
    } else {
        tracing::debug!(peer = %peer, %reason, refusals_in_a_row = streak, "{what}");
    }
}

/// Waits for a connection or for the stop event.
fn accept(inner: &Inner, listener: &TcpListener) -> Option<(TcpStream, SocketAddr)> {
    loop {
        if inner.stopped() {
            return None;
        }
        // SAFETY: `inner`'s stop event owns this descriptor and outlives the borrow
        // (vmm-sys-util's EventFd offers no `AsFd`).
        let wake = unsafe { std::os::fd::BorrowedFd::borrow_raw(inner.stop_event().as_raw_fd()) };
        let mut fds = [
            PollFd::new(listener, PollFlags::IN),
            PollFd::from_borrowed_fd(wake, PollFlags::IN),
        ];
        match poll(&mut fds, None) {
            Ok(_) => {}
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => {
                tracing::error!(error = %e, "poll on the fabric listener failed");
                return None;
            }
        }
        if inner.stopped() {
            return None;
        }
        match listener.accept() {
            Ok(pair) => return Some(pair),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!(error = %e, "accept on the fabric listener failed"),
        }
    }
}

fn connection(inner: &Arc<Inner>, stream: TcpStream, peer: SocketAddr, role: Role) {
    let setup = || -> std::io::Result<()> {
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(inner.cfg.handshake_timeout))?;
        stream.set_write_timeout(Some(inner.cfg.handshake_timeout))
    };
    if let Err(e) = setup() {
        tracing::warn!(peer = %peer, error = %e, "fabric socket setup failed");
        return;
    }
    inner.note_congestion(&stream, peer);
    let chan = match establish(&inner.creds, &stream, role) {
        Ok(c) => c,
        Err(reason) => {
            let streak = inner.count_refusal();
            log_refusal(peer, streak, "refused fabric peer", &reason);
            return;
        }
    };
    run_session(inner, stream, chan, peer);
}

fn run_session(inner: &Arc<Inner>, stream: TcpStream, chan: Channel, peer: SocketAddr) {
    let timeouts = || -> std::io::Result<TcpStream> {
        stream.set_read_timeout(Some(inner.cfg.keepalive_timeout))?;
        stream.set_write_timeout(Some(inner.cfg.keepalive_timeout))?;
        stream.try_clone()
    };
    let clone = match timeouts() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "fabric socket setup failed");
            return;
        }
    };
    let session = match Connection::new(clone, chan, &inner.cfg) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::warn!(peer = %peer, error = %e, "fabric session setup failed");
            return;
        }
    };
    inner.publish(&session);
    let writer = connection_thread(
        inner,
        &session,
        "writer",
        inner.cfg.cpus.writer,
        writer_loop,
    );
    let service = connection_thread(
        inner,
        &session,
        "service",
        inner.cfg.cpus.reader,
        |inner, session| {
            while let Some((items, _)) = session.inq.pop_all() {
                for item in items {
                    inner.apply(session, item);
                }
                session.inq.done();
                if let Err(e) = session.flush(Flush::NonBlocking) {
                    tracing::debug!(error = %e, "fabric send failed");
                    inner.link_down(session);
                }
            }
        },
    );
    let result = match (&writer, &service) {
        (Ok(_), Ok(_)) => session.read_loop(inner),
        _ => Err(EndError::Protocol(
            "could not start the connection threads".into(),
        )),
    };
    let was_up = session.is_up();
    inner.link_down(&session);
    match result {
        // Closed by this side (the node is stopping): not the peer's failure.
        Err(EndError::Closed) => tracing::debug!(peer = %peer, "fabric link closed"),
        Err(e) if !was_up => {
            let streak = inner.count_refusal();
            log_refusal(
                peer,
                streak,
                "fabric peer refused or failed before link-up",
                &e,
            );
        }
        Err(e) => tracing::warn!(peer = %peer, reason = %e, "fabric link down"),
        Ok(()) => tracing::info!(peer = %peer, "fabric peer closed the link"),
    }
    if let Ok(w) = writer {
        let _ = w.join();
    }
    if let Ok(s) = service {
        let _ = s.join();
    }
}

/// Starts one of a connection's threads, `fabric-tcp-ROLE`, placed on `cpu` (see
/// [`crate::TcpConfig::cpus`]), running `body`.
fn connection_thread(
    inner: &Arc<Inner>,
    session: &Arc<Connection>,
    role: &'static str,
    cpu: Option<usize>,
    body: fn(&Inner, &Connection),
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let (inner, session) = (inner.clone(), session.clone());
    std::thread::Builder::new()
        .name(format!("fabric-tcp-{role}"))
        .spawn(move || {
            crate::cpu::place(cpu, role);
            body(&inner, &session)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `establish` on both ends of a loopback connection: (this side, the peer's bytes
    /// written first by `peer`).
    fn insecure_against(peer: impl FnOnce(&TcpStream) + Send + 'static) -> Result<Channel, String> {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let s = TcpStream::connect(addr).unwrap();
            peer(&s);
            // Keep the connection open until this side is done.
            let _ = (&s).read_exact(&mut [0u8; PLAIN_PREAMBLE.len()]);
        });
        let (s, _) = l.accept().unwrap();
        let r = establish(&Credentials::Insecure, &s, Role::Server);
        drop(s);
        t.join().unwrap();
        r
    }

    #[test]
    fn insecure_sides_exchange_the_preamble() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let s = TcpStream::connect(addr).unwrap();
            establish(&Credentials::Insecure, &s, Role::Client).map(|c| c.is_tls())
        });
        let (s, _) = l.accept().unwrap();
        let chan = establish(&Credentials::Insecure, &s, Role::Server).unwrap();
        assert!(!chan.is_tls() && chan.early.is_none());
        assert_eq!(t.join().unwrap(), Ok(false));
    }

    #[test]
    fn an_insecure_side_refuses_tls_and_strangers() {
        let tls = insecure_against(|s| {
            let _ = (&*s).write_all(&[TLS_HANDSHAKE_RECORD, 3, 1, 0, 5]);
        });
        assert!(tls.err().unwrap().contains("requires TLS"));
        let stranger = insecure_against(|s| {
            let _ = (&*s).write_all(b"GET / HTTP/1.1\r\n\r\n");
        });
        assert!(stranger.err().unwrap().contains("did not send"));
        let closed = insecure_against(|s| {
            let _ = (&*s).write_all(b"DEVLEND");
            let _ = s.shutdown(std::net::Shutdown::Write);
        });
        assert!(closed.err().unwrap().contains("closed"));
    }

    #[test]
    fn the_pause_doubles_per_refusal_up_to_the_ceiling() {
        let (base, max) = (Duration::from_millis(200), Duration::from_secs(10));
        let pauses: Vec<u128> = (0..10).map(|n| backoff(base, max, n).as_millis()).collect();
        assert_eq!(
            pauses,
            [200, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        assert_eq!(backoff(base, max, u64::MAX), max);
        // A ceiling below the base never shortens the base.
        assert_eq!(backoff(base, Duration::ZERO, 5), base);
    }

    #[test]
    fn refusals_are_warned_at_powers_of_two() {
        let warned: Vec<u64> = (1..=100).filter(|n| refusal_is_warned(*n)).collect();
        assert_eq!(warned, [1, 2, 4, 8, 16, 32, 64]);
        assert!(!refusal_is_warned(0));
    }
}
