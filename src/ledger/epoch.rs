//! Per-day keys for ledger records. Destroying a day's key file is what makes that day's
//! records unreadable for good, whatever sled (or the filesystem) keeps of the deleted bytes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::crypto::{sync_dir, CryptoError, Key};

/// The key files of `<data_dir>/ledger/keys/`, one per day (`2026-11-29.key`).
pub struct Epochs {
    dir: PathBuf,
    master: Key,
    cache: Mutex<HashMap<String, Arc<Key>>>,
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
    pub fn key(&self, day: &str) -> Result<Arc<Key>, CryptoError> {
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
        let key = Arc::new(key);
        cache.insert(day.to_string(), key.clone());
        Ok(key)
    }

    /// The key of `day` if it still exists; never creates one.
    pub fn existing(&self, day: &str) -> Option<Arc<Key>> {
        if let Some(k) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(day)
        {
            return Some(k.clone());
        }
        let path = self.path(day);
        path.exists()
            .then(|| self.master.read_wrapped(&path, &Self::purpose(day)).ok())
            .flatten()
            .map(Arc::new)
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
