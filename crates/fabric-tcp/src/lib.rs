//! The `tcp` backend of the devlend NTB fabric: two hosts on different machines.
//!
//! [`TcpNtb`] implements [`devlend_fabric::Ntb`] with the semantics and ordering of the `shm`
//! backend, but every window access is a framed message on one TCP connection:
//!
//! - **posted writes** ([`devlend_fabric::PeerWindows::peer_mw_write`]) are queued and return
//!   at once; a writer thread sends whatever is queued in one batch. The queue is bounded
//!   ([`TcpConfig::send_queue_bytes`]): a producer waits when it is full (back-pressure).
//! - **non-posted reads** are a round trip. Because every frame travels on one ordered stream
//!   and the receiver applies them in order, a read never passes earlier posted writes.
//! - doorbells, scratchpads, message registers, translations and keepalives share the stream.
//!
//! Inbound window accesses land in the owner's [`devlend_fabric::AddressSpace`]: RAM is copied into its
//! [`devlend_fabric::SharedMemory`], MMIO goes to the region's
//! [`devlend_fabric::MmioHandler`], in arrival order, on the connection's service thread.
//! [`devlend_fabric::PeerWindows::peer_mw_direct`] is always `Ok(None)`.
//!
//! **Security**: by default the connection is TLS 1.3 with mutual certificate authentication
//! ([`Credentials::Tls`]; keys from [`keys::generate`]). A peer with the wrong credentials is
//! refused with a TLS alert, and the refusal is logged (`tracing::warn`). Plain TCP
//! ([`Credentials::Insecure`]) must be chosen by both sides; a mismatch is refused.
//!
//! **Liveness**: each side sends a keepalive when idle for [`TcpConfig::keepalive_interval`];
//! a connection silent for [`TcpConfig::keepalive_timeout`] (or whose sends stall that long)
//! is link-down. Every wait then ends with [`devlend_fabric::FabricError::LinkDown`]. The
//! background thread reconnects (connector) or accepts again (listener), and the link comes up
//! again with a higher [`devlend_fabric::Link::link_generation`].
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use devlend_fabric::{AddressSpace, Link, LinkState, PeerWindows, WindowOffset};
//! use devlend_fabric_tcp::{keys, Credentials, TcpConfig, TcpNtb, TlsCredentials};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Once per deployment (then copy ca.pem, lender.{pem,key} to the lender host, and
//! // ca.pem, borrower.{pem,key} to the borrower host).
//! let dir = std::path::Path::new("/etc/devlend/keys");
//! keys::generate(dir, &["lender", "borrower"])?;
//!
//! // On the borrower host:
//! let creds = Credentials::Tls(Arc::new(TlsCredentials::load(dir, "borrower", "lender")?));
//! let asp = Arc::new(AddressSpace::new());
//! let ntb = TcpNtb::connect("10.0.0.1:7400".parse()?, asp, TcpConfig::default(), creds)?;
//! ntb.wait_link(LinkState::Up, Duration::from_secs(10))?;
//! ntb.peer_mw_write(0, WindowOffset(0), b"hello")?;
//! # Ok(())
//! # }
//! ```
//!
//! # Threads
//!
//! Each [`TcpNtb`] owns a *supervisor* thread that connects or accepts and does the handshake,
//! then reads the connection whenever no caller does (parsing frames, applying the peer's RAM
//! and register requests itself when nothing is queued ahead of them, completing this side's
//! reads). Per connection it starts a *writer* thread and a *service* thread:
//!
//! - the writer sends keepalives and whatever callers could not send themselves (a caller
//!   that finds the socket free sends its own frames, and a posted write straight from its
//!   buffer; the reader and service threads never block on the socket and leave the rest to
//!   the writer);
//! - the service thread applies the peer's MMIO accesses (and everything queued behind them)
//!   in order, so that a device model that blocks cannot stall the reading of the socket.
//!
//! A caller waiting for a reply reads the socket itself when no other caller does: it takes
//! the socket out of the reader thread's one-shot epoll watch for the time, so the reply wakes
//! nobody else. Every reader polls the socket adaptively: for the fabric's spin budget
//! ([`LinkConfig::spin`], yielding the CPU between polls: `devlend_sync::Spin::yielding`)
//! before it sleeps, because a wake-up of an idle vCPU costs far more
//! than the round trip itself. Dropping the [`TcpNtb`] stops and joins every thread.
//!
//! [`TcpConfig::cpus`] pins the writer thread, and the supervisor and service threads, to
//! CPUs of the caller's choice ([`cpu`] explains when that matters: few CPUs, bulk TLS).
//!
//! A limit: an MMIO handler that waits for a fabric read of its own while the peer has more
//! than [`TcpConfig::service_queue_bytes`] of requests queued behind it stalls the reading
//! until the keepalive timeout ends the link.
//!
//! # Lock order
//!
//! `windows` (the registers') → the current connection (the link's slot) → send queue, and
//! receive buffers (`rx`) → send lock → send queue / TLS state. Every other lock (link state,
//! doorbells, messages, scratchpads, pending reads, leaders, the inbound queue) is a leaf:
//! nothing else is taken while it is held.
#![warn(missing_docs)]

pub mod cpu;
pub mod frame;
pub mod keys;
mod ntb;
mod queue;
mod record;
mod session;
mod tls;
mod watch;

pub use ntb::{TcpNtb, TcpStats};
#[cfg(feature = "fuzzing")]
pub use record::fuzz as fuzz_records;
pub use tls::{Credentials, TlsCredentials, TlsError, ALPN};

use std::net::SocketAddr;
use std::time::Duration;

use devlend_fabric::LinkConfig;

/// The spin budget of a tcp link's waits ([`LinkConfig::spin`] in [`TcpConfig::default`]):
/// twice the shared-memory default. A wait that outlasts its spin sleeps in `poll(2)` and is
/// woken through the network stack, a costlier wake-up than the futex of `shm`; and the gap it
/// spans is the peer's turnaround, which over tcp includes its own socket work. Measured at
/// 30 µs, a lent device's worker went to sleep between most bursts of the QD32 write row
/// with the SQ and data in the CMB, once the borrower sent one message per burst instead of
/// two (docs/MEASUREMENTS.md, "The CQ head doorbell leaves with the next submission").
pub const TCP_SPIN: Duration = Duration::from_micros(60);

/// The TCP congestion control a link asks for on its socket by default
/// ([`TcpConfig::congestion`]): one that does not pace. A link is a bus: its bytes come in
/// bursts (a 128 KiB DMA, then nothing while the device works), and each burst is waited for.
/// Measured on a host whose default is BBR, which paces every connection at a rate learned
/// from its recent deliveries: after the link had carried a stream (a 128 KiB write row with
/// its data pushed into a CMB), a device's 128 KiB read replies were paced over tens of
/// microseconds each, and the next row ran at half its speed (442-487 against 1042 MB/s, the
/// socket's pacing rate down from 229 to 22-64 Gbit/s); with `cubic` both rows kept their
/// speed (docs/MEASUREMENTS.md, "An unpaced congestion control").
pub const CONGESTION: &str = "cubic";

/// Parameters of a tcp link side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpConfig {
    /// Window, doorbell and register geometry, and the read completion timeout.
    pub link: LinkConfig,
    /// Send a keepalive after this long without sending anything.
    pub keepalive_interval: Duration,
    /// A connection from which nothing arrived for this long (or whose sends made no progress
    /// for this long) is link-down. Must exceed `keepalive_interval`.
    pub keepalive_timeout: Duration,
    /// Limit on connecting plus the TLS handshake plus the hello exchange.
    pub handshake_timeout: Duration,
    /// Pause between connection attempts of a connector (after a link that came up, or the
    /// first failed attempt); each further refused or failed attempt in a row doubles it, up to
    /// `reconnect_max`.
    pub reconnect_interval: Duration,
    /// The longest pause between a connector's attempts (back-off ceiling).
    pub reconnect_max: Duration,
    /// Bytes of this side's requests (posted writes, reads) that may wait for the writer thread
    /// before producers are held back.
    pub send_queue_bytes: usize,
    /// Bytes of the peer's requests that may wait for the service thread before this side
    /// stops reading the socket.
    pub service_queue_bytes: usize,
    /// CPUs to pin the link's threads to (none by default: the scheduler places them).
    pub cpus: ThreadCpus,
    /// The TCP congestion control to ask for on each connection ([`CONGESTION`] by
    /// default); `None` keeps the system's. When the kernel refuses it the connection goes on
    /// with the system's, and says so in the log.
    pub congestion: Option<&'static str>,
}

/// CPUs for a link side's own threads (see [`cpu`]). A CPU the process may not run on is
/// refused by [`TcpConfig::validate`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadCpus {
    /// The writer thread, which moves sealed records to the socket.
    pub writer: Option<usize>,
    /// The supervisor thread (which reads the socket) and the service thread.
    pub reader: Option<usize>,
}

impl Default for TcpConfig {
    fn default() -> Self {
        Self {
            link: LinkConfig {
                spin: TCP_SPIN,
                ..LinkConfig::default()
            },
            keepalive_interval: Duration::from_millis(500),
            keepalive_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(5),
            reconnect_interval: Duration::from_millis(200),
            reconnect_max: Duration::from_secs(10),
            send_queue_bytes: 1 << 20,
            service_queue_bytes: 8 << 20,
            cpus: ThreadCpus::default(),
            congestion: Some(CONGESTION),
        }
    }
}

impl TcpConfig {
    /// Checks the limits.
    pub fn validate(&self) -> Result<(), TcpError> {
        self.link.validate().map_err(TcpError::Link)?;
        if self.keepalive_interval.is_zero() || self.keepalive_timeout <= self.keepalive_interval {
            return Err(TcpError::Config(
                "keepalive_timeout must exceed a non-zero keepalive_interval",
            ));
        }
        if self.handshake_timeout.is_zero() {
            return Err(TcpError::Config("handshake_timeout must not be zero"));
        }
        // TCP_CA_NAME_MAX is 16 with the terminating NUL.
        if self
            .congestion
            .is_some_and(|c| c.is_empty() || c.len() > 15 || !c.is_ascii())
        {
            return Err(TcpError::Config(
                "a congestion control name is 1 to 15 ASCII characters",
            ));
        }
        if self.link.mw_count > frame::MAX_WINDOWS {
            return Err(TcpError::Config("at most 64 memory windows"));
        }
        let pinned: Vec<usize> = [self.cpus.writer, self.cpus.reader]
            .into_iter()
            .flatten()
            .collect();
        if !pinned.is_empty() {
            let allowed = cpu::allowed().map_err(|e| TcpError::Os("reading the CPU set", e))?;
            if let Some(&cpu) = pinned.iter().find(|c| !allowed.contains(c)) {
                return Err(TcpError::Cpu { cpu, allowed });
            }
        }
        Ok(())
    }
}

/// Why a [`TcpNtb`] could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TcpError {
    /// The link geometry is invalid.
    #[error("link configuration: {0}")]
    Link(#[source] devlend_fabric::FabricError),
    /// A tcp parameter is invalid.
    #[error("tcp configuration: {0}")]
    Config(&'static str),
    /// A thread was to be pinned to a CPU this process may not run on.
    #[error("CPU {cpu} is not one this process may run on ({allowed:?})")]
    Cpu {
        /// The CPU asked for.
        cpu: usize,
        /// The CPUs the process may run on.
        allowed: Vec<usize>,
    },
    /// The listening socket could not be opened.
    #[error("listen on {addr}: {source}")]
    Listen {
        /// Address asked for.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A thread or an event descriptor could not be created.
    #[error("{0}: {1}")]
    Os(&'static str, #[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_configuration_is_valid() {
        TcpConfig::default().validate().unwrap();
    }

    #[test]
    fn bad_limits_are_refused() {
        let mut c = TcpConfig::default();
        c.keepalive_timeout = c.keepalive_interval;
        assert!(matches!(c.validate(), Err(TcpError::Config(_))));
        let mut c = TcpConfig::default();
        c.link.mw_count = frame::MAX_WINDOWS + 1;
        assert!(c.validate().is_err());
    }

    #[test]
    fn threads_are_pinned_only_to_cpus_the_process_may_use() {
        let allowed = cpu::allowed().unwrap();
        let mut c = TcpConfig::default();
        c.cpus.writer = allowed.first().copied();
        c.cpus.reader = allowed.last().copied();
        c.validate().unwrap();
        let outside = (0..=allowed.len())
            .find(|cpu| !allowed.contains(cpu))
            .unwrap();
        c.cpus.reader = Some(outside);
        match c.validate() {
            Err(TcpError::Cpu { cpu, allowed: a }) => {
                assert_eq!(cpu, outside);
                assert_eq!(a, allowed);
            }
            other => panic!("accepted CPU {outside}: {other:?}"),
        }
    }
}
