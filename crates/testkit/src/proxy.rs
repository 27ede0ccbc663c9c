//! A TCP proxy that injects faults between two fabric hosts: added delay, a stall (stops
//! forwarding, keeps the connection open), a dropped connection (FIN), a reset (RST).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often the proxy's threads look at their control state (the proxy's own polling, not
/// test synchronisation).
const TICK: Duration = Duration::from_millis(20);

const KILL_FIN: u8 = 0;
const KILL_RST: u8 = 1;

#[derive(Default)]
struct Ctl {
    stall: AtomicBool,
    delay_us: AtomicU64,
    stop: AtomicBool,
    /// Connections opened before this epoch are to be killed with `kill`.
    epoch: AtomicU64,
    kill: AtomicU8,
}

/// The proxy; stops when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    ctl: Arc<Ctl>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Listens on `listen` (port 0: any) and forwards every connection to `upstream`.
    pub fn start(listen: SocketAddr, upstream: SocketAddr) -> Proxy {
        let l = TcpListener::bind(listen).unwrap();
        l.set_nonblocking(true).unwrap();
        let addr = l.local_addr().unwrap();
        let ctl = Arc::new(Ctl::default());
        let c = ctl.clone();
        let thread = std::thread::spawn(move || {
            while !c.stop.load(Ordering::Acquire) {
                let (down, _) = match l.accept() {
                    Ok(p) => p,
                    Err(_) => {
                        std::thread::sleep(TICK);
                        continue;
                    }
                };
                let Ok(up) = TcpStream::connect_timeout(&upstream, Duration::from_secs(2)) else {
                    continue;
                };
                down.set_nonblocking(false).unwrap();
                for s in [&down, &up] {
                    s.set_read_timeout(Some(TICK)).unwrap();
                    s.set_nodelay(true).unwrap();
                }
                let epoch = c.epoch.load(Ordering::Acquire);
                pump(
                    c.clone(),
                    epoch,
                    down.try_clone().unwrap(),
                    up.try_clone().unwrap(),
                );
                pump(c.clone(), epoch, up, down);
            }
        });
        Proxy {
            addr,
            ctl,
            thread: Some(thread),
        }
    }

    /// Stops (or resumes) forwarding on every connection, without closing any.
    pub fn stall(&self, on: bool) {
        self.ctl.stall.store(on, Ordering::Release);
    }

    /// Delays every forwarded chunk.
    pub fn delay(&self, d: Duration) {
        self.ctl
            .delay_us
            .store(d.as_micros() as u64, Ordering::Release);
    }

    /// Closes every current connection with a FIN.
    pub fn drop_all(&self) {
        self.ctl.kill.store(KILL_FIN, Ordering::Release);
        self.ctl.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// Resets every current connection (RST).
    pub fn reset_all(&self) {
        self.ctl.kill.store(KILL_RST, Ordering::Release);
        self.ctl.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

fn set_linger_zero(s: &TcpStream) {
    let _ = rustix::net::sockopt::set_socket_linger(s, Some(std::time::Duration::ZERO));
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pump(ctl: Arc<Ctl>, epoch: u64, mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if ctl.stop.load(Ordering::Acquire) {
                break;
            }
            if ctl.epoch.load(Ordering::Acquire) != epoch {
                if ctl.kill.load(Ordering::Acquire) == KILL_RST {
                    // Closing with linger 0 sends RST; both pumps of the connection do it.
                    set_linger_zero(&from);
                    set_linger_zero(&to);
                    return;
                }
                break;
            }
            if ctl.stall.load(Ordering::Acquire) {
                std::thread::sleep(TICK);
                continue;
            }
            let n = match from.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(_) => break,
            };
            // Data read just as the stall began is held back too.
            while ctl.stall.load(Ordering::Acquire)
                && !ctl.stop.load(Ordering::Acquire)
                && ctl.epoch.load(Ordering::Acquire) == epoch
            {
                std::thread::sleep(TICK);
            }
            let d = ctl.delay_us.load(Ordering::Acquire);
            if d > 0 {
                std::thread::sleep(Duration::from_micros(d));
            }
            if to.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
