//! A test host for the tcp fabric: one side of a link, with 1 MiB of RAM behind window 0 and
//! a 4 KiB register file (MMIO) behind window 1, that echoes the peer's doorbells and answers
//! each message with the value plus one. Used by the network-namespace tests and benchmarks.
//!
//! ```text
//! devlend-tcp-host listen|connect ADDR (--keys DIR --me NAME --peer NAME | --insecure)
//! ```
//! Prints `ready ADDR` once listening or connecting, then runs until killed.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devlend_fabric::{
    AddressSpace, BusAddr, Doorbells, FabricError, Link, LinkState, MemoryWindows, Messages,
    MmioHandler, SharedMemory,
};
use devlend_fabric_tcp::{Credentials, TcpConfig, TcpNtb, TlsCredentials};

/// Bus address of the host's RAM.
const RAM_BASE: u64 = 0x1_0000_0000;
/// Bus address of the register file.
const MMIO_BASE: u64 = 0x2_0000_0000;

struct Registers(Mutex<Vec<u8>>);

impl MmioHandler for Registers {
    fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        let regs = devlend_sync::lock(&self.0);
        for (i, b) in data.iter_mut().enumerate() {
            *b = regs.get(offset as usize + i).copied().unwrap_or(0xff);
        }
    }
    fn mmio_write(&self, offset: u64, data: &[u8]) {
        let mut regs = devlend_sync::lock(&self.0);
        for (i, b) in data.iter().enumerate() {
            if let Some(r) = regs.get_mut(offset as usize + i) {
                *r = *b;
            }
        }
    }
}

fn usage() -> ! {
    eprintln!("usage: devlend-tcp-host listen|connect ADDR (--keys DIR --me NAME --peer NAME | --insecure)");
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(mode), Some(addr)) = (args.first(), args.get(1)) else {
        usage()
    };
    let Ok(addr) = addr.parse::<SocketAddr>() else {
        usage()
    };
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let creds = if args.iter().any(|a| a == "--insecure") {
        Credentials::Insecure
    } else {
        let (Some(dir), Some(me), Some(peer)) = (opt("--keys"), opt("--me"), opt("--peer")) else {
            usage()
        };
        match TlsCredentials::load(dir.as_ref(), &me, &peer) {
            Ok(t) => Credentials::Tls(Arc::new(t)),
            Err(e) => {
                eprintln!("devlend-tcp-host: {e}");
                std::process::exit(1)
            }
        }
    };
    if let Err(e) = run(mode, addr, creds) {
        eprintln!("devlend-tcp-host: {e}");
        std::process::exit(1)
    }
}

fn run(mode: &str, addr: SocketAddr, creds: Credentials) -> Result<(), Box<dyn std::error::Error>> {
    let asp = Arc::new(AddressSpace::new());
    let ram = Arc::new(SharedMemory::new("host-ram", 1 << 20)?);
    asp.add_ram(BusAddr(RAM_BASE), ram)?;
    asp.add_mmio(
        BusAddr(MMIO_BASE),
        0x1000,
        Arc::new(Registers(Mutex::new(vec![0; 0x1000]))),
    )?;
    let cfg = TcpConfig {
        keepalive_interval: Duration::from_millis(100),
        keepalive_timeout: Duration::from_millis(1500),
        reconnect_interval: Duration::from_millis(50),
        ..TcpConfig::default()
    };
    let ntb = Arc::new(match mode {
        "listen" => TcpNtb::listen(addr, asp, cfg, creds)?,
        "connect" => TcpNtb::connect(addr, asp, cfg, creds)?,
        _ => usage(),
    });
    ntb.mw_set_trans(0, BusAddr(RAM_BASE), 1 << 20)?;
    ntb.mw_set_trans(1, BusAddr(MMIO_BASE), 0x1000)?;
    println!("ready {}", ntb.local_addr().unwrap_or(addr));
    let msgs = ntb.clone();
    std::thread::spawn(move || serve_messages(&msgs));
    serve_doorbells(&ntb);
    Ok(())
}

fn serve_doorbells(ntb: &TcpNtb) {
    let all = ntb.db_valid_mask();
    loop {
        match ntb.db_wait(all, Duration::from_secs(1)) {
            Ok(bits) => {
                let _ = ntb.db_clear(bits);
                let _ = devlend_fabric::Doorbells::peer_db_set(ntb, bits);
            }
            Err(FabricError::Timeout) => {}
            Err(_) => {
                let _ = ntb.wait_link(LinkState::Up, Duration::from_secs(1));
            }
        }
    }
}

fn serve_messages(ntb: &TcpNtb) {
    let all = if ntb.msg_count() >= 64 {
        u64::MAX
    } else {
        (1u64 << ntb.msg_count()) - 1
    };
    loop {
        match ntb.msg_wait(all, Duration::from_secs(1)) {
            Ok(bits) => {
                for i in 0..ntb.msg_count() {
                    if bits & (1 << i) != 0 {
                        let v = ntb.msg_read(i).unwrap_or(0);
                        let _ = ntb.msg_clear_sts(1 << i);
                        let _ = ntb.peer_msg_write(i, v.wrapping_add(1));
                    }
                }
            }
            Err(FabricError::Timeout) => {}
            Err(_) => {
                let _ = ntb.wait_link(LinkState::Up, Duration::from_secs(1));
            }
        }
    }
}
