//! DKIM signing (RFC 6376, RFC 8463 for Ed25519) with mail-auth.
//!
//! Each sending domain has one or more selectors; all of a domain's selectors sign together
//! (an RSA and an Ed25519 signature side by side, so receivers that know only RSA still verify).
//! The signing domain is the domain of the RFC 5322 `From:` (the one DMARC aligns on), or the
//! envelope sender's when configured and the message has no usable `From:`. A key marked
//! `subdomains = true` also signs for every subdomain, with `d=` the parent (relaxed alignment).
//!
//! A message is signed once, at the end of DATA, before it is spooled: the signature is a
//! header prepended to the stored message, never a rewrite of the body.

mod keygen;
mod records;

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mail_auth::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::dkim::{Canonicalization, DkimSigner, DkimSigningStream};
use mail_auth::headers::HeaderWriter;
use mail_auth::signer::{NeedHeaders, Ready};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::PrivateKeyDer;

pub use keygen::{generate, public_key_record, txt_chunks, Algorithm, GeneratedKey};
pub use records::dns_records;

use crate::config::{Config, DkimKeyConfig};

/// Headers signed when present (and, being listed, protected against being added later).
/// `From` is listed twice: oversigned, so a second From cannot be prepended.
pub const SIGNED_HEADERS: &[&str] = &[
    "From",
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Id",
];

/// Why keys could not be loaded or a message not signed.
#[derive(Debug, thiserror::Error)]
pub enum DkimError {
    #[error("{path}: {reason}")]
    Key { path: PathBuf, reason: String },
    /// The key file is readable by group or others.
    #[error("{path}: mode {mode:o} lets others read the private key; chmod 600 it")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("dkim.key[{index}]: {reason}")]
    Config { index: usize, reason: String },
    #[error("signing failed: {0}")]
    Sign(String),
    #[error("{0}")]
    Io(String),
}

enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Ready>),
    Ed25519(DkimSigner<Ed25519Key, Ready>),
}

struct Selector {
    selector: String,
    signer: Signer,
    /// Signs for subdomains too.
    subdomains: bool,
}

/// The outcome of signing one message.
#[derive(Debug, Clone, Default)]
pub struct Signed {
    /// `DKIM-Signature:` header fields to prepend (CRLF-terminated), one per selector.
    pub headers: String,
    /// The `d=` domain, when signed.
    pub domain: Option<String>,
    /// Selectors that signed.
    pub selectors: Vec<String>,
}

/// Every configured key, by domain. Cheap to share: signing takes `&self`.
#[derive(Default)]
pub struct Keys {
    by_domain: HashMap<String, Vec<Selector>>,
    /// Refuse mail from a domain without a key instead of sending it unsigned.
    pub require: bool,
    fallback_to_envelope: bool,
    /// Some key is RSA: a signature then costs about 215 µs, too long for a reactor thread.
    any_rsa: bool,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("domains", &self.by_domain.len())
            .finish()
    }
}

impl Keys {
    /// Loads `[[dkim.key]]`. Any bad key file is an error naming it.
    pub fn load(config: &Config) -> Result<Keys, DkimError> {
        let mut by_domain: HashMap<String, Vec<Selector>> = HashMap::new();
        for (index, k) in config.dkim.keys.iter().enumerate() {
            let path = config.path(&k.private_key);
            let selector =
                load_selector(k, &path, config.dkim.expire_after).map_err(|e| match e {
                    DkimError::Config { reason, .. } => DkimError::Config { index, reason },
                    other => other,
                })?;
            by_domain
                .entry(k.domain.to_ascii_lowercase())
                .or_default()
                .push(selector);
        }
        let any_rsa = by_domain
            .values()
            .flatten()
            .any(|s| matches!(s.signer, Signer::Rsa(_)));
        Ok(Keys {
            by_domain,
            require: config.dkim.require,
            fallback_to_envelope: config.dkim.fallback_to_envelope,
            any_rsa,
        })
    }

    /// True when no key is configured.
    pub fn is_empty(&self) -> bool {
        self.by_domain.is_empty()
    }

    /// True when every key is Ed25519: signing a small message (about 12 µs for 4 KiB) then
    /// costs less than handing it to a blocking thread and back. An RSA-2048 signature (about
    /// 215 µs) would hold up every session on the same reactor thread.
    pub fn signs_quickly(&self) -> bool {
        !self.any_rsa
    }

    /// The `d=` domain and the keys that sign a message with this From: and envelope sender;
    /// None when it is not to be signed.
    fn signing_keys(
        &self,
        from_header: Option<&str>,
        envelope_from: &str,
    ) -> Option<(&str, Vec<&Selector>)> {
        let author = self.author_domain(from_header, envelope_from)?;
        self.keys_for(&author)
    }

    /// The keys that sign for `author`: its own, else an ancestor's marked `subdomains`.
    /// Returns the `d=` domain with them.
    fn keys_for(&self, author: &str) -> Option<(&str, Vec<&Selector>)> {
        if let Some((d, sels)) = self.by_domain.get_key_value(author) {
            return Some((d.as_str(), sels.iter().collect()));
        }
        let mut rest = author;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some((d, sels)) = self.by_domain.get_key_value(parent) {
                let inherited: Vec<&Selector> = sels.iter().filter(|s| s.subdomains).collect();
                if !inherited.is_empty() {
                    return Some((d.as_str(), inherited));
                }
            }
            rest = parent;
        }
        None
    }

    /// The domain a message is signed for: `From:`, else (when configured) the envelope sender.
    pub fn author_domain(&self, from_header: Option<&str>, envelope_from: &str) -> Option<String> {
        from_header.map(str::to_string).or_else(|| {
            self.fallback_to_envelope
                .then(|| {
                    envelope_from
                        .rsplit_once('@')
                        .map(|(_, d)| d.to_ascii_lowercase())
                })
                .flatten()
        })
    }

    /// Signs the message made of `parts` (read as concatenated). CPU-bound (an RSA-2048
    /// signature is about 0.3 ms): call from a blocking thread, not the reactor.
    /// `from_header` is the `From:` domain ([`from_domain`]), which the caller has already
    /// parsed for its own use.
    pub fn sign(
        &self,
        parts: &[&[u8]],
        from_header: Option<&str>,
        envelope_from: &str,
    ) -> Result<Signed, DkimError> {
        let Some((domain, selectors)) = self.signing_keys(from_header, envelope_from) else {
            return Ok(Signed::default());
        };
        let mut out = Signed {
            domain: Some(domain.to_string()),
            ..Signed::default()
        };
        for s in selectors {
            let signature = match &s.signer {
                Signer::Rsa(signer) => signer.sign_chained(parts.iter().copied()),
                Signer::Ed25519(signer) => signer.sign_chained(parts.iter().copied()),
            }
            .map_err(|e| DkimError::Sign(e.to_string()))?;
            out.headers.push_str(&signature.to_header());
            out.selectors.push(s.selector.clone());
        }
        Ok(out)
    }
}

impl Keys {
    /// [`Keys::sign`] of a message too big to hold in memory: `read` calls `feed` with the
    /// message's chunks in order (a body file read back), and every selector's signer hashes
    /// them as they pass. Only the header section is buffered.
    pub fn sign_streamed(
        &self,
        from_header: Option<&str>,
        envelope_from: &str,
        read: impl FnOnce(&mut dyn FnMut(&[u8])) -> std::io::Result<()>,
    ) -> Result<Signed, DkimError> {
        let Some((domain, selectors)) = self.signing_keys(from_header, envelope_from) else {
            return Ok(Signed::default());
        };
        let mut streams: Vec<Stream<'_>> = selectors
            .iter()
            .map(|s| match &s.signer {
                Signer::Rsa(signer) => Stream::Rsa(signer.sign_streaming()),
                Signer::Ed25519(signer) => Stream::Ed25519(signer.sign_streaming()),
            })
            .collect();
        read(&mut |chunk| {
            for stream in streams.iter_mut() {
                stream.write(chunk);
            }
        })
        .map_err(|e| DkimError::Sign(format!("reading the message: {e}")))?;
        let mut out = Signed {
            domain: Some(domain.to_string()),
            ..Signed::default()
        };
        for (s, stream) in selectors.iter().zip(streams) {
            let signature = stream
                .finish()
                .map_err(|e| DkimError::Sign(e.to_string()))?;
            out.headers.push_str(&signature.to_header());
            out.selectors.push(s.selector.clone());
        }
        Ok(out)
    }
}

/// One selector's streaming signer.
enum Stream<'a> {
    Rsa(DkimSigningStream<'a, RsaKey<Sha256>>),
    Ed25519(DkimSigningStream<'a, Ed25519Key>),
}

impl Stream<'_> {
    fn write(&mut self, chunk: &[u8]) {
        match self {
            Stream::Rsa(s) => s.write(chunk),
            Stream::Ed25519(s) => s.write(chunk),
        }
    }

    fn finish(self) -> mail_auth::Result<mail_auth::dkim::Signature> {
        match self {
            Stream::Rsa(s) => s.finish(),
            Stream::Ed25519(s) => s.finish(),
        }
    }
}

fn load_selector(
    k: &DkimKeyConfig,
    path: &Path,
    expire: Option<Duration>,
) -> Result<Selector, DkimError> {
    let key_err = |reason: String| DkimError::Key {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| key_err(e.to_string()))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(DkimError::Exposed {
            path: path.to_path_buf(),
            mode: mode & 0o777,
        });
    }
    let pem = std::fs::read_to_string(path).map_err(|e| key_err(e.to_string()))?;
    let der = PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| key_err(format!("not a PEM private key: {e}")))?;
    let algorithm = Algorithm::parse(&k.algorithm).ok_or_else(|| DkimError::Config {
        index: 0,
        reason: format!(
            "algorithm {:?} is not \"ed25519\" or \"rsa-sha256\"",
            k.algorithm
        ),
    })?;
    let domain = k.domain.to_ascii_lowercase();
    let signer = match algorithm {
        Algorithm::Rsa => {
            let key = RsaKey::<Sha256>::from_key_der(der)
                .map_err(|e| key_err(format!("not an RSA private key: {e}")))?;
            Signer::Rsa(configure(
                DkimSigner::from_key(key)
                    .domain(domain)
                    .selector(&k.selector),
                expire,
            ))
        }
        Algorithm::Ed25519 => {
            let PrivateKeyDer::Pkcs8(pkcs8) = der else {
                return Err(key_err(
                    "an Ed25519 key must be PKCS #8 (\"BEGIN PRIVATE KEY\")".into(),
                ));
            };
            let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(pkcs8.secret_pkcs8_der())
                .map_err(|e| key_err(format!("not an Ed25519 private key: {e}")))?;
            Signer::Ed25519(configure(
                DkimSigner::from_key(key)
                    .domain(domain)
                    .selector(&k.selector),
                expire,
            ))
        }
    };
    Ok(Selector {
        selector: k.selector.clone(),
        signer,
        subdomains: k.subdomains,
    })
}

fn configure<T: mail_auth::crypto::SigningKey>(
    signer: DkimSigner<T, NeedHeaders>,
    expire: Option<Duration>,
) -> DkimSigner<T, Ready> {
    let signer = signer
        .headers(SIGNED_HEADERS.iter().copied())
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed);
    match expire {
        Some(d) => signer.expiration(d),
        None => signer,
    }
}

/// The domain of the first address in the `From:` header of `head` (a header section), in
/// A-label form, lower case. mail-parser reads the header as RFC 5322 has it, so that a display
/// name holding `<`, `@` or a comma (`"a <b@c.example>, x" <x@y.example>`) is not mistaken for
/// the address: the domain decides which key signs the message.
pub fn from_domain(head: &[u8]) -> Option<String> {
    let message = mail_parser::MessageParser::default().parse_headers(head)?;
    let from = message.from()?;
    // A group or a display name alone has no address; take the first mailbox that has one.
    let address = from.mailboxes().find_map(|mailbox| mailbox.address())?;
    let (_, domain) = address.rsplit_once('@')?;
    let domain = crate::proto::address::normalise_domain(domain);
    (!domain.is_empty() && !domain.contains(char::is_whitespace)).then_some(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Keys loaded from `[[dkim.key]]` entries made for `algorithms` (one domain each).
    fn keys_of(algorithms: &[Algorithm]) -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::from("[server]\nhostname = \"mx.example.test\"\ndata_dir = \"data\"\n[[listener]]\naddr = \"127.0.0.1:0\"\nmode = \"relay\"\n");
        for (i, alg) in algorithms.iter().enumerate() {
            let path = dir.path().join(format!("k{i}.pem"));
            generate(*alg, &path).unwrap();
            text.push_str(&format!(
                "[[dkim.key]]\ndomain = \"d{i}.test\"\nselector = \"s\"\nalgorithm = \"{}\"\nprivate_key = \"{}\"\n",
                alg.config_name(),
                path.display()
            ));
        }
        let config = Config::parse(&text, "test", dir.path()).unwrap();
        Keys::load(&config).unwrap()
    }

    #[test]
    fn only_ed25519_keys_sign_quickly() {
        assert!(keys_of(&[Algorithm::Ed25519, Algorithm::Ed25519]).signs_quickly());
        assert!(!keys_of(&[Algorithm::Ed25519, Algorithm::Rsa]).signs_quickly());
    }

    #[test]
    fn from_domains() {
        assert_eq!(
            from_domain(b"From: Bob <bob@Example.TEST>\r\nTo: x\r\n"),
            Some("example.test".into())
        );
        assert_eq!(
            from_domain(b"Subject: a\r\nfrom:  alice@sub.example.test\r\n"),
            Some("sub.example.test".into())
        );
        assert_eq!(
            from_domain(b"From: \"Long, Name\"\r\n <x@folded.test>\r\n"),
            Some("folded.test".into())
        );
        assert_eq!(
            from_domain(b"From: \"a <b@c.example>, x\" <x@y.example>\r\n"),
            Some("y.example".into()),
            "a display name with <, @ and a comma is not the address"
        );
        assert_eq!(
            from_domain(b"From: a@c.example (comment <b@d.example>)\r\n"),
            Some("c.example".into())
        );
        assert_eq!(
            from_domain("From: <bob@Bücher.example>\r\n".as_bytes()),
            Some("xn--bcher-kva.example".into())
        );
        assert_eq!(from_domain(b"To: a@b.test\r\n"), None);
        assert_eq!(from_domain(b"From: nobody\r\n"), None);
    }
}
