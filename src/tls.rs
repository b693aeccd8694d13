//! The inbound TLS configuration: certificate loading and first-start self-signed generation.
//!
//! Only TLS 1.2 and 1.3 are offered (rustls has nothing older), with the aws-lc-rs provider.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the server certificate could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Exactly one of the two files exists: almost certainly a mistake, so do not guess.
    #[error("{missing} is missing while {present} exists; provide both or neither")]
    HalfPair { missing: String, present: String },
    #[error("{path}: {reason}")]
    Pem { path: String, reason: String },
    /// The private key is readable by group or others.
    #[error("{path}: mode {mode:o} lets others read the private key; chmod 600 it")]
    Exposed { path: String, mode: u32 },
    #[error("generating a self-signed certificate: {0}")]
    Generate(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// rustls refused the pair (key does not match certificate, unsupported key type).
    #[error("certificate and key rejected: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Installs aws-lc-rs as the process-wide rustls provider. Safe to call more than once.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// What a first start generated, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertSource {
    Loaded,
    Generated,
}

/// Loads the server certificate and key, generating a self-signed pair for `hostname` when
/// neither file exists.
pub fn server_config(
    cert: &Path,
    key: &Path,
    hostname: &str,
) -> Result<(Arc<rustls::ServerConfig>, CertSource), TlsError> {
    install_provider();
    let source = match (cert.exists(), key.exists()) {
        (false, false) => {
            generate_self_signed(cert, key, hostname)?;
            CertSource::Generated
        }
        (true, false) => return Err(half(key, cert)),
        (false, true) => return Err(half(cert, key)),
        (true, true) => CertSource::Loaded,
    };
    let mode = std::fs::metadata(key)
        .map_err(|e| io(key, e))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(TlsError::Exposed {
            path: key.display().to_string(),
            mode: mode & 0o777,
        });
    }
    let pem = |path: &Path, e: rustls::pki_types::pem::Error| TlsError::Pem {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem(cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem(cert, e))?;
    if chain.is_empty() {
        return Err(TlsError::Pem {
            path: cert.display().to_string(),
            reason: "no certificate in file".into(),
        });
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| pem(key, e))?;
    let config = rustls::ServerConfig::builder_with_protocol_versions(&[
        &rustls::version::TLS13,
        &rustls::version::TLS12,
    ])
    .with_no_client_auth()
    .with_single_cert(chain, private)?;
    Ok((Arc::new(config), source))
}

fn generate_self_signed(cert: &Path, key: &Path, hostname: &str) -> Result<(), TlsError> {
    let names = vec![hostname.to_string(), "localhost".to_string()];
    let generated =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    for path in [cert, key] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        }
    }
    crate::crypto::write_new_private(key, generated.signing_key.serialize_pem().as_bytes())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    std::fs::write(cert, generated.cert.pem()).map_err(|e| io(cert, e))?;
    Ok(())
}

fn half(missing: &Path, present: &Path) -> TlsError {
    TlsError::HalfPair {
        missing: missing.display().to_string(),
        present: present.display().to_string(),
    }
}

fn io(path: &Path, source: std::io::Error) -> TlsError {
    TlsError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// "TLSv1.3 TLS13_AES_256_GCM_SHA384" for a finished handshake, as recorded in `Received:`.
pub fn describe(conn: &rustls::CommonState) -> Option<String> {
    let version = match conn.protocol_version()? {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3",
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2",
        _ => "TLS",
    };
    let suite = conn.negotiated_cipher_suite()?;
    Some(format!("{version} {:?}", suite.suite()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_once_then_loads_and_refuses_exposed_keys() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("certs/server.crt");
        let key = dir.path().join("certs/server.key");
        let (_, source) = server_config(&cert, &key, "mx.example.test").unwrap();
        assert_eq!(source, CertSource::Generated);
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let (_, source) = server_config(&cert, &key, "mx.example.test").unwrap();
        assert_eq!(source, CertSource::Loaded);

        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(matches!(
            server_config(&cert, &key, "x.test"),
            Err(TlsError::Exposed { .. })
        ));
        std::fs::remove_file(&key).unwrap();
        assert!(matches!(
            server_config(&cert, &key, "x.test"),
            Err(TlsError::HalfPair { .. })
        ));
    }
}
