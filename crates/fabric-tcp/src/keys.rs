//! Key material for a deployment: a small private CA and one certificate per host.
//!
//! [`generate`] writes, into one directory (created `0700`):
//!
//! - `ca.pem`: the deployment's CA certificate (copy it to every host);
//! - `ca.key`: the CA's private key (keep it on the admin machine; only needed to add hosts);
//! - `<host>.pem` and `<host>.key`: each host's certificate (subject alternative name = the host
//!   name, usable for TLS server and client authentication) and private key.
//!
//! Every file is written `0600`. A host needs `ca.pem`, `<host>.pem` and `<host>.key`; see
//! [`crate::TlsCredentials::load`].

use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// Why key material could not be generated or loaded.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Host names become file names and certificate names: letters, digits, `-` and `.` only.
    #[error(
        "invalid host name {0:?}: use letters, digits, '-' and '.' (not starting with '.' or '-')"
    )]
    BadHostName(String),
    /// No host names were given.
    #[error("at least one host name is needed")]
    NoHosts,
    /// A file or directory operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A PEM file could not be parsed.
    #[error("{path}: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// The files [`generate`] wrote.
#[derive(Clone, Debug)]
pub struct GeneratedKeys {
    /// The CA certificate.
    pub ca_cert: PathBuf,
    /// The CA private key.
    pub ca_key: PathBuf,
    /// Per host, in the order given: (host name, certificate, private key).
    pub hosts: Vec<(String, PathBuf, PathBuf)>,
}

/// Checks that `name` is usable as a host name here.
pub fn check_host_name(name: &str) -> Result<(), KeyError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(KeyError::BadHostName(name.to_string()))
    }
}

/// Path of a host's certificate in `dir`.
pub fn cert_path(dir: &Path, host: &str) -> PathBuf {
    dir.join(format!("{host}.pem"))
}

/// Path of a host's private key in `dir`.
pub fn key_path(dir: &Path, host: &str) -> PathBuf {
    dir.join(format!("{host}.key"))
}

/// Path of the CA certificate in `dir`.
pub fn ca_path(dir: &Path) -> PathBuf {
    dir.join("ca.pem")
}

fn write_private(path: &Path, contents: &str) -> Result<(), KeyError> {
    let io = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    // `mode` only applies to new files: tighten an existing one too.
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io)?;
    f.write_all(contents.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Generates a new private CA and a certificate for each of `host_names` into `dir`.
///
/// Existing files of the same names are replaced: a new CA means a new deployment, and hosts
/// holding certificates of the old one are refused by the new ones.
pub fn generate(dir: &Path, host_names: &[&str]) -> Result<GeneratedKeys, KeyError> {
    if host_names.is_empty() {
        return Err(KeyError::NoHosts);
    }
    for h in host_names {
        check_host_name(h)?;
    }
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| KeyError::Io {
            path: dir.to_path_buf(),
            source,
        })?;

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "devlend fabric CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::from_params(&ca_params, &ca_key);

    let out = GeneratedKeys {
        ca_cert: ca_path(dir),
        ca_key: dir.join("ca.key"),
        hosts: Vec::new(),
    };
    write_private(&out.ca_cert, &ca_cert.pem())?;
    write_private(&out.ca_key, &ca_key.serialize_pem())?;
    let mut out = out;
    for host in host_names {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, *host);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &issuer)?;
        let (c, k) = (cert_path(dir, host), key_path(dir, host));
        write_private(&c, &cert.pem())?;
        write_private(&k, &key.serialize_pem())?;
        out.hosts.push((host.to_string(), c, k));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_private_files_for_each_host() {
        let dir = std::env::temp_dir().join(format!("devlend-keys-unit-{}", std::process::id()));
        let keys = generate(&dir, &["lender", "borrower.example"]).unwrap();
        assert_eq!(keys.hosts.len(), 2);
        let mut files = vec![keys.ca_cert.clone(), keys.ca_key.clone()];
        for (_, c, k) in &keys.hosts {
            files.push(c.clone());
            files.push(k.clone());
        }
        for f in files {
            let mode = std::fs::metadata(&f).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", f.display());
        }
        assert!(std::fs::read_to_string(&keys.ca_cert)
            .unwrap()
            .contains("BEGIN CERTIFICATE"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_host_names_are_refused() {
        let dir = std::env::temp_dir().join("devlend-keys-never-created");
        for bad in ["", "../x", "a/b", "-x", ".x", "a b"] {
            assert!(matches!(
                generate(&dir, &[bad]),
                Err(KeyError::BadHostName(_))
            ));
        }
        assert!(matches!(generate(&dir, &[]), Err(KeyError::NoHosts)));
        assert!(!dir.exists());
    }
}
