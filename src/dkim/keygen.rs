//! Key generation and the DNS TXT record that publishes a key.
//!
//! Keys are generated with aws-lc-rs (not mail-auth's `generate` feature, which pulls in the
//! `rsa` crate and its timing advisory, RUSTSEC-2023-0071) and written as PKCS #8 PEM, mode 0600.

use std::path::Path;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;

use super::DkimError;

/// A DKIM signing algorithm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// rsa-sha256, 2048-bit keys.
    Rsa,
    /// ed25519-sha256 (RFC 8463).
    Ed25519,
}

impl Algorithm {
    /// Accepts the config and CLI spellings.
    pub fn parse(s: &str) -> Option<Algorithm> {
        match s.to_ascii_lowercase().as_str() {
            "rsa" | "rsa-sha256" => Some(Algorithm::Rsa),
            "ed25519" | "ed25519-sha256" => Some(Algorithm::Ed25519),
            _ => None,
        }
    }

    /// The `k=` tag value.
    pub fn key_type(self) -> &'static str {
        match self {
            Algorithm::Rsa => "rsa",
            Algorithm::Ed25519 => "ed25519",
        }
    }

    /// The `algorithm =` value in config.toml.
    pub fn config_name(self) -> &'static str {
        match self {
            Algorithm::Rsa => "rsa-sha256",
            Algorithm::Ed25519 => "ed25519",
        }
    }
}

/// A freshly generated key.
pub struct GeneratedKey {
    /// PKCS #8 private key, PEM.
    pub private_pem: String,
    /// The `p=` value: base64 SubjectPublicKeyInfo (RSA) or raw 32-byte key (Ed25519).
    pub public_b64: String,
    pub algorithm: Algorithm,
}

/// Generates a key and writes it to `path` (which must not exist), mode 0600.
pub fn generate(algorithm: Algorithm, path: &Path) -> Result<GeneratedKey, DkimError> {
    let fail = |e: &dyn std::fmt::Display| DkimError::Sign(format!("key generation failed: {e}"));
    let (pkcs8, public): (Vec<u8>, Vec<u8>) = match algorithm {
        Algorithm::Rsa => {
            let kp = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .map_err(|e| fail(&e))?;
            let der =
                AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&kp).map_err(|e| fail(&e))?;
            let spki = AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(kp.public_key())
                .map_err(|e| fail(&e))?;
            (der.as_ref().to_vec(), spki.as_ref().to_vec())
        }
        Algorithm::Ed25519 => {
            let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|e| fail(&e))?;
            let kp = Ed25519KeyPair::from_pkcs8(doc.as_ref()).map_err(|e| fail(&e))?;
            (doc.as_ref().to_vec(), kp.public_key().as_ref().to_vec())
        }
    };
    let private_pem = pem_encode("PRIVATE KEY", &pkcs8);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| DkimError::Io(format!("{}: {e}", dir.display())))?;
    }
    crate::crypto::write_new_private(path, private_pem.as_bytes())
        .map_err(|e| DkimError::Io(e.to_string()))?;
    Ok(GeneratedKey {
        private_pem,
        public_b64: base64::engine::general_purpose::STANDARD.encode(public),
        algorithm,
    })
}

/// The TXT record value publishing a key: `v=DKIM1; k=...; p=...`.
pub fn public_key_record(algorithm: Algorithm, public_b64: &str) -> String {
    format!("v=DKIM1; k={}; p={public_b64}", algorithm.key_type())
}

/// Splits a TXT value into quoted strings of at most 255 bytes (RFC 1035 character-strings),
/// as zone files and DNS control panels want them.
pub fn txt_chunks(value: &str) -> String {
    value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The public key (`p=` value) of a PEM private key file's contents.
pub fn public_of_pem(pem: &str, algorithm: Algorithm) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    let key = PrivateKeyDer::from_pem_slice(pem.as_bytes()).ok()?;
    let der = key.secret_der();
    let public = match algorithm {
        Algorithm::Rsa => {
            let kp = aws_lc_rs::rsa::KeyPair::from_pkcs8(der)
                .or_else(|_| aws_lc_rs::rsa::KeyPair::from_der(der))
                .ok()?;
            AsDer::<aws_lc_rs::encoding::PublicKeyX509Der>::as_der(kp.public_key())
                .ok()?
                .as_ref()
                .to_vec()
        }
        Algorithm::Ed25519 => Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .ok()?
            .public_key()
            .as_ref()
            .to_vec(),
    };
    Some(base64::engine::general_purpose::STANDARD.encode(public))
}

pub(super) fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_pem() {
        let dir = tempfile::tempdir().unwrap();
        for alg in [Algorithm::Ed25519, Algorithm::Rsa] {
            let path = dir.path().join(format!("{alg:?}.pem"));
            let k = generate(alg, &path).unwrap();
            let pem = std::fs::read_to_string(&path).unwrap();
            assert_eq!(pem, k.private_pem);
            assert_eq!(
                public_of_pem(&pem, alg).as_deref(),
                Some(k.public_b64.as_str())
            );
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
            assert!(generate(alg, &path).is_err(), "never overwrites a key");
        }
    }

    #[test]
    fn txt_is_split_in_255_byte_strings() {
        let value = "x".repeat(600);
        let chunks = txt_chunks(&value);
        let parts: Vec<&str> = chunks.split(' ').collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].len(), 257);
        assert_eq!(parts[2].len(), 92);
    }
}
