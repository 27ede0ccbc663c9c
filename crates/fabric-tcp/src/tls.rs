//! Credentials and the TLS 1.3 configuration built from them (rustls, `ring` provider).
//!
//! Both ends authenticate: the listener presents its certificate and requires one from the
//! connector; both must chain to the deployment's CA, and each must name the host the other
//! side expects (the connector checks the server name during the handshake, the listener
//! checks the client's name right after it). Only TLS 1.3 and the ALPN protocol
//! [`ALPN`] are accepted.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::keys::{self, KeyError};

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

/// The `ring` provider, preferring AES-128-GCM (the fastest suite with AES instructions; all
/// TLS 1.3 suites stay available).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
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
        let mut client = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        client.alpn_protocols = vec![ALPN.to_vec()];
        client.resumption = rustls::client::Resumption::disabled();
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

    pub(crate) fn client_conn(&self) -> Result<rustls::ClientConnection, rustls::Error> {
        let name = ServerName::try_from(self.peer_name.clone())
            .map_err(|_| rustls::Error::General("bad peer name".into()))?;
        rustls::ClientConnection::new(self.client.clone(), name)
    }

    pub(crate) fn server_conn(&self) -> Result<rustls::ServerConnection, rustls::Error> {
        rustls::ServerConnection::new(self.server.clone())
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
