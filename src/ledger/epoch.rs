//! Per-day keys for ledger records. Destroying a day's key file is what makes that day's
//! records unreadable for good, whatever sled (or the filesystem) keeps of the deleted bytes,
//! and what unlinks its index entries from the people they are about (see [`DayKey::tag`]).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::crypto::{sync_dir, CryptoError, Key, Pseudonym};

/// A day's keys: one seals its records; one, derived from it, names its subjects in sled's
/// keys. Both go when the day's key file is destroyed.
pub struct DayKey {
    pub seal: Key,
    index: Key,
}

impl DayKey {
    fn new(seal: Key) -> DayKey {
        DayKey {
            index: seal.derive("postern ledger index"),
            seal,
        }
    }

    /// How the day's index entries name a subject: an HMAC of its pseudonym under the day's
    /// index key. A pseudonym is the same every day; a tag is not, and once the day's key is
    /// destroyed nobody (holding the pseudonym key or not) can tell whose tag it was, even if
    /// sled still has the bytes. `None` (a strict domain's record) is all zeros, which no
    /// pseudonym tags to.
    pub fn tag(&self, subject: Option<&Pseudonym>) -> [u8; 32] {
        subject.map_or([0; 32], |p| self.index.mac(&p.0))
    }
}

/// The key files of `<data_dir>/ledger/keys/`, one per day (`2026-11-29.key`).
pub struct Epochs {
    dir: PathBuf,
    master: Key,
    cache: Mutex<HashMap<String, Arc<DayKey>>>,
}

impl Epochs {
    pub fn open(dir: PathBuf, master: Key) -> std::io::Result<Epochs> {
        std::fs::create_dir_all(&dir)?;
        Ok(Epochs {
            dir,
            master,
            cache: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, day: &str) -> PathBuf {
        self.dir.join(format!("{day}.key"))
    }

    fn purpose(day: &str) -> String {
        format!("postern ledger epoch {day}")
    }

    /// The key of `day`, created (and fsync'd) on first use.
    pub fn key(&self, day: &str) -> Result<Arc<DayKey>, CryptoError> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = cache.get(day) {
            return Ok(k.clone());
        }
        let path = self.path(day);
        let key = if path.exists() {
            self.master.read_wrapped(&path, &Self::purpose(day))?
        } else {
            let key = Key::generate()?;
            self.master
                .write_wrapped(&path, &Self::purpose(day), &key)?;
            key
        };
        let key = Arc::new(DayKey::new(key));
        cache.insert(day.to_string(), key.clone());
        Ok(key)
    }

    /// The key of `day` if it still exists; never creates one.
    pub fn existing(&self, day: &str) -> Option<Arc<DayKey>> {
        if let Some(k) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(day)
        {
            return Some(k.clone());
        }
        let path = self.path(day);
        if !path.exists() {
            return None;
        }
        let key = Arc::new(DayKey::new(
            self.master.read_wrapped(&path, &Self::purpose(day)).ok()?,
        ));
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(day.to_string(), key.clone());
        Some(key)
    }

    /// Days with a key file, oldest first.
    pub fn days(&self) -> Vec<String> {
        let mut days: Vec<String> = std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()?
                    .strip_suffix(".key")
                    .map(str::to_string)
            })
            .collect();
        days.sort();
        days
    }

    /// Destroys the key of `day` (file and cached copy).
    pub fn destroy(&self, day: &str) -> std::io::Result<()> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(day);
        match std::fs::remove_file(self.path(day)) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}
