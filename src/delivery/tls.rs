//! Outbound TLS: the two client configurations behind the TLS policies.
//!
//! `require` uses an ordinary verifying configuration (Mozilla's roots plus any configured CA
//! file): a certificate that does not verify for the MX host name fails the handshake and the
//! delivery is deferred. `opportunistic` must still encrypt when the certificate is self-signed
//! or names another host, as most MX certificates in the wild do; its configuration accepts any
//! certificate (the handshake signatures are still checked), and the verdict of the verifying
//! checker is computed after the handshake and recorded, never enforced.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::client::ClientError;
use crate::config::TlsPolicy;

/// What a delivery's TLS looked like, for logs and the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// "TLSv1.3 TLS13_AES_256_GCM_SHA384"
    pub version_cipher: String,
    /// Whether the certificate verified for the host name against the trust anchors.
    pub verified: bool,
}

/// Why the outbound TLS setup failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("{path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("{0}")]
    Rustls(#[from] rustls::Error),
}

/// Client-side TLS state shared by all connections.
#[derive(Clone)]
pub struct TlsClient {
    verifying: TlsConnector,
    any_cert: TlsConnector,
    verifier: Arc<WebPkiServerVerifier>,
}

impl TlsClient {
    /// Builds both configurations; `ca_file` adds trust anchors (PEM) to Mozilla's.
    pub fn new(ca_file: Option<&Path>) -> Result<TlsClient, TlsSetupError> {
        crate::tls::install_provider();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        if let Some(path) = ca_file {
            use rustls::pki_types::pem::PemObject;
            let bad = |reason: String| TlsSetupError::CaFile {
                path: path.display().to_string(),
                reason,
            };
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(e.to_string()))? {
                roots
                    .add(cert.map_err(|e| bad(e.to_string()))?)
                    .map_err(|e| bad(e.to_string()))?;
            }
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsSetupError::Rustls(rustls::Error::General(e.to_string())))?;
        let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
        let verifying = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let any_cert = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&versions)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate { provider }))
            .with_no_client_auth();
        Ok(TlsClient {
            verifying: TlsConnector::from(Arc::new(verifying)),
            any_cert: TlsConnector::from(Arc::new(any_cert)),
            verifier,
        })
    }

    /// Performs the handshake for `host` under `policy`.
    pub(super) async fn connect(
        &self,
        socket: TcpStream,
        host: &str,
        policy: TlsPolicy,
        timeout: Duration,
    ) -> Result<(TlsStream<TcpStream>, TlsInfo), ClientError> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| ClientError::Tls(format!("{host:?} is not a valid TLS server name")))?;
        let connector = match policy {
            TlsPolicy::Require => &self.verifying,
            _ => &self.any_cert,
        };
        let stream =
            match tokio::time::timeout(timeout, connector.connect(name.clone(), socket)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    return Err(ClientError::Tls(format!(
                        "handshake with {host} failed: {e}"
                    )))
                }
                Err(_) => return Err(ClientError::Tls(format!("handshake with {host} timed out"))),
            };
        let conn = stream.get_ref().1;
        let verified = policy == TlsPolicy::Require
            || match conn.peer_certificates() {
                Some([end, intermediates @ ..]) => self
                    .verifier
                    .verify_server_cert(end, intermediates, &name, &[], UnixTime::now())
                    .is_ok(),
                _ => false,
            };
        let version_cipher = crate::tls::describe(conn).unwrap_or_else(|| "TLS".into());
        Ok((
            stream,
            TlsInfo {
                version_cipher,
                verified,
            },
        ))
    }
}

/// Accepts any certificate chain but still checks that the server holds its key.
#[derive(Debug)]
struct AnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
