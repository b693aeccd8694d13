//! Sealing data at rest: keys, key files and AEAD.
//!
//! Everything Postern writes about a message is sealed with XChaCha20-Poly1305. Its 192-bit
//! nonce is drawn at random for every seal, so no counter has to survive a crash to stay
//! unique. Short-lived keys (one per spool segment) are random and stored *wrapped* by the
//! master key: deleting such a key file makes whatever its data left on disk unreadable
//! (crypto-shredding), which matters where the filesystem or sled keeps old bytes around.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use chacha20poly1305::aead::{Aead, AeadInPlace, KeyInit, Payload};
use chacha20poly1305::{Tag, XChaCha20Poly1305, XNonce};

/// Length of a nonce prepended to every sealed value.
pub const NONCE_LEN: usize = 24;
/// Length of the authentication tag appended to every sealed value.
pub const TAG_LEN: usize = 16;
/// Bytes a seal adds to its plaintext.
pub const OVERHEAD: usize = NONCE_LEN + TAG_LEN;

/// Why a key or a sealed value could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// Tag mismatch: wrong key, or the bytes were altered or destroyed.
    #[error("sealed data failed authentication")]
    Open,
    /// The system random source failed.
    #[error("no randomness available: {0}")]
    Random(String),
    /// A key file exists but is not a key.
    #[error("{path}: not a key file ({reason})")]
    BadKeyFile { path: String, reason: &'static str },
    /// A key file others can read: refuse rather than keep using an exposed key.
    #[error("{path}: mode {mode:o} lets others read it; chmod 600 it")]
    Exposed { path: String, mode: u32 },
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

/// Fills `buf` from the operating system's random source.
pub fn random_bytes(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::getrandom(buf).map_err(|e| CryptoError::Random(e.to_string()))
}

/// A 256-bit symmetric key.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A fresh random key.
    pub fn generate() -> Result<Key, CryptoError> {
        let mut k = [0u8; 32];
        random_bytes(&mut k)?;
        Ok(Key(k))
    }

    /// Key bytes, for deriving other keys (HMAC); never logged.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// HMAC-SHA256 of `data` under this key: a keyed, one-way name for it.
    pub fn mac(&self, data: &[u8]) -> [u8; 32] {
        use hmac::{Hmac, Mac};
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(data);
        mac.finalize().into_bytes().into()
    }

    /// A key for another purpose, derived from this one (HMAC-SHA256 of `label`): it cannot be
    /// computed once this key is destroyed, and it reveals nothing about this key.
    pub fn derive(&self, label: &str) -> Key {
        Key(self.mac(label.as_bytes()))
    }

    /// Seals `plaintext`, binding `aad` (context that must match on open). Output: nonce || ciphertext || tag.
    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut out = Vec::with_capacity(plaintext.len() + OVERHEAD);
        self.seal_into(aad, &[plaintext], &mut out)?;
        Ok(out)
    }

    /// Like [`Key::seal`] of the concatenation of `plaintext`, appending to `out`.
    pub fn seal_into(
        &self,
        aad: &[u8],
        plaintext: &[&[u8]],
        out: &mut Vec<u8>,
    ) -> Result<(), CryptoError> {
        // Nonces from the thread's CSPRNG (ChaCha, seeded and reseeded from the OS): a 192-bit
        // random nonce needs no counter, and this saves a getrandom syscall per record.
        let mut nonce = [0u8; NONCE_LEN];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut nonce);
        let cipher = XChaCha20Poly1305::new((&self.0).into());
        // Encrypted where it lands in `out`: no second buffer the size of the plaintext.
        let start = out.len();
        out.reserve(plaintext.iter().map(|p| p.len()).sum::<usize>() + OVERHEAD);
        out.extend_from_slice(&nonce);
        for part in plaintext {
            out.extend_from_slice(part);
        }
        let sealed = cipher.encrypt_in_place_detached(
            XNonce::from_slice(&nonce),
            aad,
            &mut out[start + NONCE_LEN..],
        );
        match sealed {
            Ok(tag) => {
                out.extend_from_slice(&tag);
                Ok(())
            }
            Err(_) => {
                out.truncate(start);
                Err(CryptoError::Open)
            }
        }
    }

    /// Opens a value made by [`Key::seal`] with the same `aad`.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < OVERHEAD {
            return Err(CryptoError::Open);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        XChaCha20Poly1305::new((&self.0).into())
            .decrypt(XNonce::from_slice(nonce), Payload { msg: body, aad })
            .map_err(|_| CryptoError::Open)
    }

    /// [`Key::open`] in place: `sealed` becomes the plaintext, with no second buffer.
    pub fn open_in_place(&self, aad: &[u8], mut sealed: Vec<u8>) -> Result<Vec<u8>, CryptoError> {
        if sealed.len() < OVERHEAD {
            return Err(CryptoError::Open);
        }
        let end = sealed.len() - TAG_LEN;
        let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
        let (text, tag) = rest.split_at_mut(end - NONCE_LEN);
        XChaCha20Poly1305::new((&self.0).into())
            .decrypt_in_place_detached(XNonce::from_slice(nonce), aad, text, Tag::from_slice(tag))
            .map_err(|_| CryptoError::Open)?;
        sealed.copy_within(NONCE_LEN..end, 0);
        sealed.truncate(end - NONCE_LEN);
        Ok(sealed)
    }

    /// Writes `key` sealed under `self` to a new file (mode 0600, fsync'd). `purpose` is bound
    /// as AAD so that a key file cannot be swapped in for another purpose.
    pub fn write_wrapped(&self, path: &Path, purpose: &str, key: &Key) -> Result<(), CryptoError> {
        let sealed = self.seal(purpose.as_bytes(), &key.0)?;
        write_new_private(path, &sealed)
    }

    /// Reads a key written by [`Key::write_wrapped`].
    pub fn read_wrapped(&self, path: &Path, purpose: &str) -> Result<Key, CryptoError> {
        let sealed = std::fs::read(path).map_err(|source| io_err(path, source))?;
        let plain = self.open(purpose.as_bytes(), &sealed)?;
        let bytes: [u8; 32] = plain.try_into().map_err(|_| CryptoError::BadKeyFile {
            path: path.display().to_string(),
            reason: "wrong length",
        })?;
        Ok(Key(bytes))
    }
}

/// A stable, keyed, one-way name for an address: HMAC-SHA256 over the normalised address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Pseudonym(pub [u8; 32]);

impl Pseudonym {
    /// The first 12 hex digits: plenty to tell subjects apart in a log.
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }
}

impl std::fmt::Display for Pseudonym {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Computes pseudonyms. Stable (suppression, export and erase find a subject again) but not
/// reversible without its key, which is kept apart from the data it names.
#[derive(Clone)]
pub struct Pseudonymizer {
    key: Key,
    lowercase_local: bool,
}

impl Pseudonymizer {
    pub fn new(key: &Key, lowercase_local: bool) -> Pseudonymizer {
        Pseudonymizer {
            key: key.clone(),
            lowercase_local,
        }
    }

    /// The address as the subject's identity ([`crate::proto::address::normalise`]): one
    /// mailbox, however spelled, gives one pseudonym.
    pub fn normalise(&self, address: &str) -> String {
        crate::proto::address::normalise(address, self.lowercase_local)
    }

    pub fn of(&self, address: &str) -> Pseudonym {
        Pseudonym(self.key.mac(self.normalise(address).as_bytes()))
    }
}

/// Loads the master key, or creates it (mode 0600) when the file does not exist yet.
/// The file holds 64 hex digits, so an operator can back it up or move it as text.
pub fn load_or_create_master_key(path: &Path) -> Result<Key, CryptoError> {
    match File::open(path) {
        Ok(mut file) => {
            let mode = file
                .metadata()
                .map_err(|source| io_err(path, source))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(CryptoError::Exposed {
                    path: path.display().to_string(),
                    mode: mode & 0o777,
                });
            }
            let mut text = String::new();
            file.read_to_string(&mut text)
                .map_err(|source| io_err(path, source))?;
            let bad = |reason| CryptoError::BadKeyFile {
                path: path.display().to_string(),
                reason,
            };
            let bytes = hex::decode(text.trim()).map_err(|_| bad("not hex"))?;
            let bytes: [u8; 32] = bytes.try_into().map_err(|_| bad("not 32 bytes"))?;
            Ok(Key(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|source| io_err(dir, source))?;
            }
            let key = Key::generate()?;
            write_new_private(path, format!("{}\n", hex::encode(key.0)).as_bytes())?;
            Ok(key)
        }
        Err(source) => Err(io_err(path, source)),
    }
}

/// Creates `path` (failing if it exists) with mode 0600, writes `data` and fsyncs file and directory.
pub fn write_new_private(path: &Path, data: &[u8]) -> Result<(), CryptoError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| io_err(path, source))?;
    file.write_all(data)
        .map_err(|source| io_err(path, source))?;
    file.sync_all().map_err(|source| io_err(path, source))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(|source| io_err(dir, source))?;
    }
    Ok(())
}

/// Makes a directory's entries (created or removed files) durable.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)?.sync_all()
}

/// An I/O error with the path it happened at.
pub(crate) fn io_err(path: &Path, source: std::io::Error) -> CryptoError {
    CryptoError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let k = Key::generate().unwrap();
        let sealed = k.seal(b"ctx", b"hello").unwrap();
        assert_eq!(sealed.len(), 5 + OVERHEAD);
        assert_eq!(k.open(b"ctx", &sealed).unwrap(), b"hello");
        assert!(matches!(k.open(b"other", &sealed), Err(CryptoError::Open)));
        let mut bad = sealed.clone();
        bad[30] ^= 1;
        assert!(matches!(k.open(b"ctx", &bad), Err(CryptoError::Open)));
        let other = Key::generate().unwrap();
        assert!(matches!(
            other.open(b"ctx", &sealed),
            Err(CryptoError::Open)
        ));
        assert!(matches!(k.open(b"ctx", &[0u8; 10]), Err(CryptoError::Open)));
        // In place: the same answers.
        assert_eq!(k.open_in_place(b"ctx", sealed.clone()).unwrap(), b"hello");
        assert!(k.open_in_place(b"other", sealed.clone()).is_err());
        assert!(k.open_in_place(b"ctx", bad).is_err());
        assert!(k.open_in_place(b"ctx", vec![0u8; 10]).is_err());
        let empty = k.seal(b"", b"").unwrap();
        assert_eq!(k.open_in_place(b"", empty).unwrap(), b"");
    }

    #[test]
    fn master_key_is_created_private_and_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/master.key");
        let k1 = load_or_create_master_key(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let k2 = load_or_create_master_key(&path).unwrap();
        assert_eq!(k1.as_bytes(), k2.as_bytes());

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            load_or_create_master_key(&path),
            Err(CryptoError::Exposed { mode: 0o644, .. })
        ));
    }

    #[test]
    fn pseudonyms_are_stable_normalised_and_keyed() {
        let k1 = Key::generate().unwrap();
        let p = Pseudonymizer::new(&k1, true);
        assert_eq!(p.of("Bob@Example.ORG"), p.of("bob@example.org"));
        assert_ne!(p.of("bob@example.org"), p.of("bob2@example.org"));
        let preserve = Pseudonymizer::new(&k1, false);
        assert_ne!(
            preserve.of("Bob@example.org"),
            preserve.of("bob@example.org")
        );
        assert_eq!(
            preserve.of("Bob@EXAMPLE.org"),
            preserve.of("Bob@example.org")
        );
        assert_eq!(p.of("\"bob\"@example.org"), p.of("bob@example.org"));
        assert_eq!(
            p.of("bob@bücher.example"),
            p.of("bob@xn--bcher-kva.example")
        );
        let other = Pseudonymizer::new(&Key::generate().unwrap(), true);
        assert_ne!(other.of("bob@example.org"), p.of("bob@example.org"));
        assert_eq!(p.of("a@b.test").short().len(), 12);
    }

    #[test]
    fn wrapped_keys_round_trip_and_bind_purpose() {
        let dir = tempfile::tempdir().unwrap();
        let master = Key::generate().unwrap();
        let inner = Key::generate().unwrap();
        let path = dir.path().join("k");
        master.write_wrapped(&path, "segment 1", &inner).unwrap();
        assert_eq!(
            master.read_wrapped(&path, "segment 1").unwrap().as_bytes(),
            inner.as_bytes()
        );
        assert!(master.read_wrapped(&path, "segment 2").is_err());
        assert!(
            master.write_wrapped(&path, "segment 1", &inner).is_err(),
            "never overwrites"
        );
    }
}
