//! Credentials and the TLS 1.3 configuration built from them (rustls, `aws-lc-rs` provider).
//!
//! Both ends authenticate: the listener presents its certificate and requires one from the
//! connector; both must chain to the deployment's CA, and each must name the host the other
//! side expects (the connector checks the server name during the handshake, the listener
//! checks the client's name right after it). Only TLS 1.3 and the ALPN protocol
//! [`ALPN`] are accepted.
//!
//! [`handshake`] drives rustls's unbuffered connection through the handshake on a socket and
//! hands the established traffic secrets to the record layer ([`crate::record`]).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::keys::{self, KeyError};
use crate::record::{self, Kernel, Opener, Sealer, MAX_RECORD};

/// ALPN protocol name of the devlend fabric.
pub const ALPN: &[u8] = b"devlend-ntb/1";

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The key files could not be read.
    #[error(transparent)]
    Keys(#[from] KeyError),
    /// rustls refused the configuration (bad key, unusable certificate).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// The expected peer name is not a valid DNS name.
    #[error("peer name {0:?} is not a valid host name")]
    BadPeerName(String),
}

/// How a node proves who it is and checks its peer.
#[derive(Clone)]
pub enum Credentials {
    /// Mutually authenticated TLS 1.3 (the default and the only secure choice).
    Tls(Arc<TlsCredentials>),
    /// No authentication, no integrity: plain TCP. Both sides must choose it; a side with
    /// TLS credentials refuses an insecure peer and vice versa.
    Insecure,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::Tls(t) => write!(f, "Tls(peer {:?})", t.peer_name),
            Credentials::Insecure => f.write_str("Insecure"),
        }
    }
}

/// One host's key material plus the name of the peer it expects.
pub struct TlsCredentials {
    peer_name: String,
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
}

/// The `aws-lc-rs` provider, preferring AES-128-GCM (the fastest suite with AES instructions; all
/// TLS 1.3 suites stay available).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::aws_lc_rs::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn pem_err(path: &Path, e: impl std::fmt::Display) -> KeyError {
    KeyError::Pem {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

impl TlsCredentials {
    /// Loads `ca.pem`, `<host>.pem` and `<host>.key` from `dir` (as written by
    /// [`keys::generate`]); the peer must present a certificate for `peer`.
    pub fn load(dir: &Path, host: &str, peer: &str) -> Result<Self, TlsError> {
        keys::check_host_name(host)?;
        keys::check_host_name(peer)?;
        let ca_file = keys::ca_path(dir);
        let cert_file = keys::cert_path(dir, host);
        let key_file = keys::key_path(dir, host);
        let ca: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca_file)
            .map_err(|e| pem_err(&ca_file, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem_err(&ca_file, e))?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_file)
            .map_err(|e| pem_err(&cert_file, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| pem_err(&cert_file, e))?;
        let key = PrivateKeyDer::from_pem_file(&key_file).map_err(|e| pem_err(&key_file, e))?;
        Self::new(ca, chain, key, peer)
    }

    /// Builds credentials from DER values: trusted CA certificates, this host's certificate
    /// chain and key, and the expected peer name.
    pub fn new(
        ca: Vec<CertificateDer<'static>>,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        peer: &str,
    ) -> Result<Self, TlsError> {
        ServerName::try_from(peer.to_string())
            .map_err(|_| TlsError::BadPeerName(peer.to_string()))?;
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c)?;
        }
        let roots = Arc::new(roots);
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), provider()).build()?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![ALPN.to_vec()];
        // No session tickets: every connection does a full mutual handshake.
        server.send_tls13_tickets = 0;
        // The record layer takes the traffic secrets over after the handshake.
        server.enable_secret_extraction = true;
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        client.resumption = rustls::client::Resumption::disabled();
        client.enable_secret_extraction = true;
        Ok(Self {
            peer_name: peer.to_string(),
            client: Arc::new(client),
            server: Arc::new(server),
        })
    }

    /// The host name the peer must present.
    pub fn peer_name(&self) -> &str {
        &self.peer_name
    }

    /// A rustls client connection with the fabric's TLS configuration (TLS 1.3, mutual
    /// authentication, AES-128-GCM first, the fabric's ALPN) to a peer named
    /// [`TlsCredentials::peer_name`]: for baselines that compare the fabric with plain TLS
    /// over the same link.
    pub fn rustls_client(&self) -> Result<rustls::ClientConnection, TlsError> {
        let name = ServerName::try_from(self.peer_name.clone())
            .map_err(|_| TlsError::BadPeerName(self.peer_name.clone()))?;
        Ok(rustls::ClientConnection::new(self.client.clone(), name)?)
    }

    /// The server side of [`TlsCredentials::rustls_client`].
    pub fn rustls_server(&self) -> Result<rustls::ServerConnection, TlsError> {
        Ok(rustls::ServerConnection::new(self.server.clone())?)
    }

    fn client_conn(&self) -> Result<rustls::client::UnbufferedClientConnection, rustls::Error> {
        let name = ServerName::try_from(self.peer_name.clone())
            .map_err(|_| rustls::Error::General("bad peer name".into()))?;
        rustls::client::UnbufferedClientConnection::new(self.client.clone(), name)
    }

    fn server_conn(&self) -> Result<rustls::server::UnbufferedServerConnection, rustls::Error> {
        rustls::server::UnbufferedServerConnection::new(self.server.clone())
    }

    /// After a server-side handshake: checks that the client's certificate names the expected
    /// peer (the chain was already verified against the CA).
    pub(crate) fn check_client_name(
        &self,
        certs: Option<&[CertificateDer<'_>]>,
    ) -> Result<(), String> {
        let first = certs
            .and_then(|c| c.first())
            .ok_or_else(|| "client presented no certificate".to_string())?;
        let cert = webpki::EndEntityCert::try_from(first).map_err(|e| e.to_string())?;
        let name = ServerName::try_from(self.peer_name.as_str()).map_err(|e| e.to_string())?;
        cert.verify_is_valid_for_subject_name(&name)
            .map_err(|_| format!("client certificate is not for {:?}", self.peer_name))
    }
}

/// An established connection: its two record-layer directions, plus what arrived after the
/// handshake in the same reads (application plaintext rustls already opened, and the start
/// of the records that follow).
pub(crate) struct Established {
    pub(crate) sealer: Sealer,
    pub(crate) opener: Opener,
    pub(crate) plaintext: Vec<u8>,
    pub(crate) ciphertext: Vec<u8>,
}

/// Bytes received during the handshake; rustls reads them in place.
struct Incoming {
    buf: Vec<u8>,
    len: usize,
}

/// Bytes to send during the handshake, and application data that came with its end.
struct Outgoing {
    buf: Vec<u8>,
    len: usize,
    plaintext: Vec<u8>,
}

/// What one step of the handshake asks for.
enum Step {
    Continue,
    Read,
    /// rustls may send application data; the handshake may still be waiting for the
    /// client's last flight (a server can send before it has read the client's Finished).
    Writable,
}

fn io_err(e: std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            "TLS handshake timed out".to_string()
        }
        _ => format!("TLS handshake failed: {e}"),
    }
}

impl Outgoing {
    /// Handles one state of the connection; returns what to do next and the bytes of
    /// `incoming` rustls is done with.
    fn step<D>(
        &mut self,
        status: Result<ConnectionState<'_, '_, D>, rustls::Error>,
        stream: &TcpStream,
    ) -> Result<(Step, usize), String> {
        let mut discard = 0;
        let step = match status.map_err(|e| format!("TLS handshake failed: {e}"))? {
            ConnectionState::EncodeTlsData(mut s) => loop {
                match s.encode(self.buf.get_mut(self.len..).unwrap_or_default()) {
                    Ok(n) => {
                        self.len += n;
                        break Step::Continue;
                    }
                    Err(EncodeError::InsufficientSize(e)) => {
                        self.buf.resize(self.len + e.required_size, 0);
                    }
                    Err(e) => return Err(format!("TLS handshake failed: {e}")),
                }
            },
            ConnectionState::TransmitTlsData(s) => {
                (&*stream)
                    .write_all(self.buf.get(..self.len).unwrap_or_default())
                    .map_err(io_err)?;
                self.len = 0;
                s.done();
                Step::Continue
            }
            ConnectionState::BlockedHandshake => Step::Read,
            ConnectionState::WriteTraffic(_) => Step::Writable,
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(rec) = r.next_record() {
                    let rec = rec.map_err(|e| format!("TLS handshake failed: {e}"))?;
                    discard += rec.discard;
                    self.plaintext.extend_from_slice(rec.payload);
                }
                Step::Continue
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => {
                return Err("the peer closed during the TLS handshake".into())
            }
            _ => return Err("unexpected TLS state during the handshake".into()),
        };
        Ok((step, discard))
    }
}

impl Incoming {
    fn discard(&mut self, n: usize) {
        let n = n.min(self.len);
        self.buf.copy_within(n..self.len, 0);
        self.len -= n;
    }

    fn read(&mut self, stream: &TcpStream) -> Result<(), String> {
        if self.len == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let dst = self.buf.get_mut(self.len..).unwrap_or_default();
        match (&*stream).read(dst) {
            Ok(0) => Err("the peer closed during the TLS handshake".into()),
            Ok(n) => {
                self.len += n;
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(io_err(e)),
        }
    }
}

/// Drives one unbuffered connection (`$conn`) through the handshake on `$stream`; on failure
/// sends the alert rustls queued (best effort). Evaluates to
/// `Result<(Incoming, Outgoing), String>`.
macro_rules! drive {
    ($conn:expr, $stream:expr) => {{
        let mut inc = Incoming {
            buf: vec![0u8; 2 * MAX_RECORD],
            len: 0,
        };
        let mut out = Outgoing {
            buf: vec![0u8; MAX_RECORD],
            len: 0,
            plaintext: Vec::new(),
        };
        let result = loop {
            let UnbufferedStatus { discard, state } =
                $conn.process_tls_records(inc.buf.get_mut(..inc.len).unwrap_or_default());
            let (step, more) = match out.step(state, $stream) {
                Ok(s) => s,
                Err(e) => {
                    inc.discard(discard);
                    break Err(e);
                }
            };
            inc.discard(discard + more);
            let read = match step {
                Step::Continue => false,
                Step::Read => true,
                Step::Writable if $conn.is_handshaking() => true,
                Step::Writable => break Ok(()),
            };
            if read {
                if let Err(e) = inc.read($stream) {
                    break Err(e);
                }
            }
        };
        if result.is_err() {
            // The alert of a failed handshake is queued in the connection: the next call hands
            // it over before it looks at the input again (a second call would process the bad
            // input again); rustls reports the error again instead of asking for transmission,
            // so the encoded alert is sent here.
            let UnbufferedStatus { state, .. } =
                $conn.process_tls_records(inc.buf.get_mut(..inc.len).unwrap_or_default());
            if matches!(state, Ok(ConnectionState::EncodeTlsData(_)))
                && out.step(state, $stream).is_ok()
                && out.len > 0
            {
                let _ = (&*$stream).write_all(out.buf.get(..out.len).unwrap_or_default());
            }
        }
        result.map(|()| (inc, out))
    }};
}

/// Runs the TLS handshake as client or server on `stream` (blocking, bounded by the
/// stream's timeouts), checks the peer, and hands the traffic secrets to the record layer.
/// `Err` is the reason for a refusal.
pub(crate) fn handshake(
    creds: &TlsCredentials,
    stream: &TcpStream,
    client: bool,
) -> Result<Established, String> {
    let ((inc, out), secrets, kernel) = if client {
        let mut conn = creds.client_conn().map_err(|e| e.to_string())?;
        let b = drive!(conn, stream)?;
        check_alpn(conn.alpn_protocol())?;
        let (secrets, k) = conn
            .dangerous_into_kernel_connection()
            .map_err(|e| format!("TLS secrets: {e}"))?;
        (b, secrets, Kernel::Client(k))
    } else {
        let mut conn = creds.server_conn().map_err(|e| e.to_string())?;
        let b = drive!(conn, stream)?;
        check_alpn(conn.alpn_protocol())?;
        let named = creds.check_client_name(conn.peer_certificates());
        let (secrets, k) = conn
            .dangerous_into_kernel_connection()
            .map_err(|e| format!("TLS secrets: {e}"))?;
        if let Err(reason) = named {
            // Tell the client why, as TLS would have during the handshake.
            if let Ok((mut sealer, _)) = record::split(Kernel::Server(k), secrets.tx, secrets.rx) {
                let mut wire = record::WireBuf::default();
                if sealer.alert(record::BAD_CERTIFICATE, &mut wire).is_ok() {
                    let _ = (&*stream).write_all(&wire);
                }
            }
            return Err(reason);
        }
        (b, secrets, Kernel::Server(k))
    };
    let (sealer, opener) =
        record::split(kernel, secrets.tx, secrets.rx).map_err(|e| e.to_string())?;
    let mut ciphertext = inc.buf;
    ciphertext.truncate(inc.len);
    Ok(Established {
        sealer,
        opener,
        plaintext: out.plaintext,
        ciphertext,
    })
}

fn check_alpn(got: Option<&[u8]>) -> Result<(), String> {
    if got == Some(ALPN) {
        Ok(())
    } else {
        Err("the peer does not speak the devlend fabric protocol (ALPN)".into())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::TcpListener;

    /// Both ends of a real handshake over loopback: ((client sealer, client opener),
    /// (server sealer, server opener)).
    pub(crate) fn established_pair() -> ((Sealer, Opener), (Sealer, Opener)) {
        let dir = std::env::temp_dir().join(format!(
            "devlend-tls-pair-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        keys::generate(&dir, &["lender", "borrower"]).unwrap();
        let server = Arc::new(TlsCredentials::load(&dir, "lender", "borrower").unwrap());
        let client = TlsCredentials::load(&dir, "borrower", "lender").unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            handshake(&server, &s, false).unwrap()
        });
        let c = TcpStream::connect(addr).unwrap();
        let ce = handshake(&client, &c, true).unwrap();
        let se = t.join().unwrap();
        assert!(ce.plaintext.is_empty() && ce.ciphertext.is_empty());
        ((ce.sealer, ce.opener), (se.sealer, se.opener))
    }
}
