//! The suppression list: addresses Postern must not send to, keyed by pseudonym only.
//!
//! Entries come from unsubscribes, complaints, an operator, or `privacy.bounce_threshold`
//! consecutive hard bounces. They are honoured at RCPT (`550 5.7.1`) and for mail already
//! queued (the recipient is dropped with the outcome `suppressed`). An erasure request leaves
//! them in place: forgetting an opt-out would mail the person again.
//!
//! Addresses are normalised before they are pseudonymised ([`crate::proto::address::normalise`]),
//! so `"bob"@example.org`, `bob@example.org` and `bob@EXAMPLE.org` are one entry, and so are a
//! Unicode domain and its A-label form.
//!
//! A run of hard bounces is delivery metadata of the day it started: it is stored under that
//! day's tag of the address and sealed under that day's ledger key, and purged with that day,
//! `privacy.retention_days` after the run started.
//!
//! # A key of its own, never rotated
//! The list's pseudonyms are HMACs under a key of its own (`ledger/suppress-id.key`), not the
//! rotating pseudonym keys of the ledger and the logs ([`crate::ledger::pseudonym`]). A
//! withdrawn consent must be honoured for years, and an entry cannot be re-keyed at a rotation:
//! it holds no address to compute a new pseudonym from, only the old one. Under a rotating key
//! every opt-out would be lost when its generation was destroyed. The cost is that whoever holds
//! the master key and the data directory can test a guessed address against the list; that is
//! inherent in a list that must recognise the address when it comes back. Runs of bounces use
//! the same names, so a run is not broken by a rotation (they go with their day anyway).
//! Installations from before rotation keep their old pseudonym key here, so their entries
//! still match.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::crypto::{Key, Pseudonym, Pseudonymizer};
use crate::ledger::day_of;
use crate::ledger::epoch::{DayKey, Epochs};

/// Why an address is suppressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reason {
    Unsubscribe,
    Complaint,
    HardBounce,
    Manual,
}

impl Reason {
    pub fn parse(s: &str) -> Option<Reason> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "unsubscribe" => Some(Reason::Unsubscribe),
            "complaint" => Some(Reason::Complaint),
            "hard-bounce" | "bounce" => Some(Reason::HardBounce),
            "manual" => Some(Reason::Manual),
            _ => None,
        }
    }
}

/// One entry, as listed and exported (no address: only its pseudonym).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub pseudonym: String,
    pub reason: Reason,
    pub added_at: i64,
    pub expires_at: Option<i64>,
}

/// A run of consecutive hard bounces to one address, as exported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BounceRun {
    pub count: u32,
    /// When the run's first bounce happened (Unix time).
    pub since: i64,
}

/// Why the list could not be read or changed.
#[derive(Debug, thiserror::Error)]
pub enum SuppressError {
    #[error("suppression store: {0}")]
    Store(#[from] sled::Error),
    #[error("suppression entry does not decode")]
    Corrupt,
    #[error("bounce counter key: {0}")]
    Key(#[from] crate::crypto::CryptoError),
}

/// The list, in the ledger's sled database.
pub struct Suppressions {
    entries: sled::Tree,
    bounces: sled::Tree,
    /// Entry and bounce-counter counts, so the common case (nobody suppressed, no bounce run)
    /// costs an atomic load instead of an HMAC and a sled lookup per recipient.
    entry_count: AtomicUsize,
    bounce_count: AtomicUsize,
    key: Key,
    /// Names addresses under the list's own key, which never rotates (see the module's docs).
    ids: Pseudonymizer,
    /// The ledger's day keys, which seal bounce runs.
    epochs: Arc<Epochs>,
    threshold: u32,
}

impl Suppressions {
    pub(crate) fn new(
        entries: sled::Tree,
        bounces: sled::Tree,
        key: Key,
        ids: Pseudonymizer,
        epochs: Arc<Epochs>,
        threshold: u32,
    ) -> Suppressions {
        Suppressions {
            entry_count: AtomicUsize::new(entries.len()),
            bounce_count: AtomicUsize::new(bounces.len()),
            entries,
            bounces,
            key,
            ids,
            epochs,
            threshold,
        }
    }

    /// Adds (or replaces) an entry for `address`.
    pub fn add(
        &self,
        address: &str,
        reason: Reason,
        now: i64,
        expires_at: Option<i64>,
    ) -> Result<Entry, SuppressError> {
        let p = self.ids.of(address);
        let entry = Entry {
            pseudonym: p.to_string(),
            reason,
            added_at: now,
            expires_at,
        };
        self.put(&p.0, &entry)?;
        Ok(entry)
    }

    /// Adds an entry by pseudonym (restoring an export, which has no addresses).
    pub fn add_entry(&self, entry: &Entry) -> Result<(), SuppressError> {
        let bytes = hex::decode(&entry.pseudonym).map_err(|_| SuppressError::Corrupt)?;
        let p: [u8; 32] = bytes.try_into().map_err(|_| SuppressError::Corrupt)?;
        self.put(&p, entry)
    }

    fn put(&self, p: &[u8; 32], entry: &Entry) -> Result<(), SuppressError> {
        let plain = serde_json::to_vec(entry).map_err(|_| SuppressError::Corrupt)?;
        let sealed = self
            .key
            .seal(p, &plain)
            .map_err(|_| SuppressError::Corrupt)?;
        if self.entries.insert(p, sealed)?.is_none() {
            self.entry_count.fetch_add(1, Ordering::SeqCst);
        }
        self.entries.flush()?;
        Ok(())
    }

    /// Removes the entry for `address`; true if there was one.
    pub fn remove(&self, address: &str) -> Result<bool, SuppressError> {
        self.forget_bounces(address)?;
        let p = self.ids.of(address);
        let removed = self.entries.remove(p.0)?.is_some();
        if removed {
            self.entry_count.fetch_sub(1, Ordering::SeqCst);
        }
        self.entries.flush()?;
        Ok(removed)
    }

    /// The entry in force for `address` at `now`, if any.
    pub fn check(&self, address: &str, now: i64) -> Result<Option<Entry>, SuppressError> {
        if self.entry_count.load(Ordering::SeqCst) == 0 {
            return Ok(None);
        }
        let entry = self.entry(address)?;
        Ok(entry.filter(|e| e.expires_at.is_none_or(|t| t > now)))
    }

    /// The entry for `address`, in force or expired (for an export).
    pub fn entry(&self, address: &str) -> Result<Option<Entry>, SuppressError> {
        let p = self.ids.of(address);
        let Some(sealed) = self.entries.get(p.0)? else {
            return Ok(None);
        };
        self.open(&p.0, &sealed).map(Some)
    }

    /// Every entry (pseudonyms only).
    pub fn list(&self) -> Result<Vec<Entry>, SuppressError> {
        let mut out = Vec::new();
        for item in self.entries.iter() {
            let (k, v) = item?;
            let p: [u8; 32] = k.as_ref().try_into().map_err(|_| SuppressError::Corrupt)?;
            out.push(self.open(&p, &v)?);
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.entry_count.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Counts a hard bounce; at the threshold the address is suppressed. Returns true then.
    pub fn hard_bounce(&self, address: &str, now: i64) -> Result<bool, SuppressError> {
        let p = self.ids.of(address);
        let StoredRun {
            stored_key,
            day_key,
            run,
        } = match self.find_run(&p)? {
            Some(found) => found,
            None => {
                // A new run lives under the key of the day it starts.
                let day = day_of(now);
                let day_key = self.epochs.key(&day)?;
                StoredRun {
                    stored_key: run_key(&day, &day_key, &p),
                    day_key,
                    run: BounceRun {
                        count: 0,
                        since: now,
                    },
                }
            }
        };
        let run = BounceRun {
            count: run.count + 1,
            ..run
        };
        let sealed = day_key.seal.seal(&stored_key, &run_bytes(&run))?;
        if self.bounces.insert(stored_key, sealed)?.is_none() {
            self.bounce_count.fetch_add(1, Ordering::SeqCst);
        }
        if run.count >= self.threshold {
            self.add(address, Reason::HardBounce, now, None)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// A delivery succeeded: the run of bounces is broken.
    pub fn delivered(&self, address: &str) -> Result<(), SuppressError> {
        if self.bounce_count.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        self.forget_bounces(address)
    }

    /// Removes the run of bounces of `address` (a delivery, an erasure).
    pub fn forget_bounces(&self, address: &str) -> Result<(), SuppressError> {
        if let Some(found) = self.find_run(&self.ids.of(address))? {
            if self.bounces.remove(found.stored_key)?.is_some() {
                self.bounce_count.fetch_sub(1, Ordering::SeqCst);
            }
        }
        Ok(())
    }

    /// The current run of bounces of `address` (for an export).
    pub fn bounce_run(&self, address: &str) -> Result<Option<BounceRun>, SuppressError> {
        Ok(self.find_run(&self.ids.of(address))?.map(|found| found.run))
    }

    /// Removes runs that started on a day before `cutoff` (`YYYYMMDD`); returns how many.
    /// Called by the ledger's purge before it destroys those days' keys.
    pub fn purge_bounces(&self, cutoff: &str) -> Result<usize, SuppressError> {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in self.bounces.range(..cutoff.as_bytes()) {
            batch.remove(item?.0);
            n += 1;
        }
        self.bounces.apply_batch(batch)?;
        self.bounce_count.fetch_sub(n, Ordering::SeqCst);
        Ok(n)
    }

    /// The run of `p`: looked up under each day still held, since only the key of the day it
    /// started names it.
    fn find_run(&self, p: &Pseudonym) -> Result<Option<StoredRun>, SuppressError> {
        for day in self.epochs.days() {
            let Some(day_key) = self.epochs.existing(&day) else {
                continue;
            };
            let stored_key = run_key(&day, &day_key, p);
            let Some(sealed) = self.bounces.get(&stored_key)? else {
                continue;
            };
            let plain = day_key.seal.open(&stored_key, &sealed)?;
            let run = run_from_bytes(&plain).ok_or(SuppressError::Corrupt)?;
            return Ok(Some(StoredRun {
                stored_key,
                day_key,
                run,
            }));
        }
        Ok(None)
    }

    fn open(&self, p: &[u8; 32], sealed: &[u8]) -> Result<Entry, SuppressError> {
        let plain = self
            .key
            .open(p, sealed)
            .map_err(|_| SuppressError::Corrupt)?;
        serde_json::from_slice(&plain).map_err(|_| SuppressError::Corrupt)
    }
}

/// A run of bounces as found: where it is stored and the key of the day it started.
struct StoredRun {
    stored_key: Vec<u8>,
    day_key: Arc<DayKey>,
    run: BounceRun,
}

/// Where a run of bounces that started on `day` is stored: `day (8) ‖ the subject's tag that
/// day` ([`DayKey::tag`]), as the ledger's records are. The day first makes the purge a range
/// delete; the tag, not the pseudonym, means that what sled keeps of a purged run names nobody.
fn run_key(day: &str, day_key: &DayKey, p: &Pseudonym) -> Vec<u8> {
    let mut k = day.as_bytes().to_vec();
    k.extend_from_slice(&day_key.tag(Some(p)));
    k
}

fn run_bytes(run: &BounceRun) -> Vec<u8> {
    let mut out = run.count.to_be_bytes().to_vec();
    out.extend_from_slice(&run.since.to_be_bytes());
    out
}

fn run_from_bytes(b: &[u8]) -> Option<BounceRun> {
    let (count, since) = b.split_at_checked(4)?;
    Some(BounceRun {
        count: u32::from_be_bytes(count.try_into().ok()?),
        since: i64::from_be_bytes(since.try_into().ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PrivacyConfig;
    use crate::ledger::Ledger;

    const T0: i64 = 1_793_491_200;

    fn open(dir: &std::path::Path, key: &Key) -> Ledger {
        Ledger::open(dir, key, &PrivacyConfig::default(), 16 << 20, T0).unwrap()
    }

    #[test]
    fn reasons_parse_as_the_cli_writes_them() {
        assert_eq!(Reason::parse("unsubscribe"), Some(Reason::Unsubscribe));
        assert_eq!(Reason::parse("Complaint"), Some(Reason::Complaint));
        assert_eq!(Reason::parse("hard_bounce"), Some(Reason::HardBounce));
        assert_eq!(Reason::parse("bounce"), Some(Reason::HardBounce));
        assert_eq!(Reason::parse("manual"), Some(Reason::Manual));
        assert_eq!(Reason::parse("spam"), None);
    }

    /// The counts that spare the common case a lookup must follow adds and removes, and be
    /// right again after a restart (they are rebuilt from the trees).
    #[test]
    fn counts_follow_the_entries_across_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let key = Key::generate().unwrap();
        {
            let l = open(dir.path(), &key);
            assert!(l.suppress.is_empty());
            assert_eq!(l.suppress.len(), 0);
            l.suppress
                .add("a@dest.test", Reason::Manual, T0, None)
                .unwrap();
            l.suppress
                .add("a@dest.test", Reason::Complaint, T0, None)
                .unwrap();
            assert_eq!(l.suppress.len(), 1, "replaced, not added twice");
            assert!(!l.suppress.is_empty());
            l.suppress
                .add("b@dest.test", Reason::Manual, T0, None)
                .unwrap();
            assert!(!l.suppress.remove("nobody@dest.test").unwrap());
            assert_eq!(l.suppress.len(), 2);
        }
        let l = open(dir.path(), &key);
        assert_eq!(l.suppress.len(), 2);
        let e = l.suppress.check("a@dest.test", T0).unwrap().unwrap();
        assert_eq!(e.reason, Reason::Complaint);
        assert!(l.suppress.remove("a@dest.test").unwrap());
        assert_eq!(l.suppress.len(), 1);
        assert!(l.suppress.remove("b@dest.test").unwrap());
        assert!(l.suppress.is_empty());
        assert!(l.suppress.check("b@dest.test", T0).unwrap().is_none());
    }

    /// A list exported (pseudonyms only) and imported elsewhere suppresses the same addresses.
    #[test]
    fn an_exported_entry_restores_by_pseudonym() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path(), &Key::generate().unwrap());
        let e = l
            .suppress
            .add("a@dest.test", Reason::Unsubscribe, T0, Some(T0 + 60))
            .unwrap();
        assert!(l.suppress.remove("a@dest.test").unwrap());
        l.suppress.add_entry(&e).unwrap();
        assert_eq!(l.suppress.check("a@dest.test", T0).unwrap(), Some(e));
        assert!(l.suppress.check("a@dest.test", T0 + 60).unwrap().is_none());
        let bad = Entry {
            pseudonym: "not hex".into(),
            reason: Reason::Manual,
            added_at: T0,
            expires_at: None,
        };
        assert!(matches!(
            l.suppress.add_entry(&bad),
            Err(SuppressError::Corrupt)
        ));
    }

    /// Removing an address also forgets its run of bounces: it starts again from zero.
    #[test]
    fn a_removed_address_starts_its_bounce_count_again() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(dir.path(), &Key::generate().unwrap());
        for _ in 0..2 {
            assert!(!l.suppress.hard_bounce("x@dest.test", T0).unwrap());
        }
        assert!(!l.suppress.remove("x@dest.test").unwrap(), "no entry yet");
        for _ in 0..2 {
            assert!(!l.suppress.hard_bounce("x@dest.test", T0).unwrap());
        }
        assert!(l.suppress.hard_bounce("x@dest.test", T0).unwrap());
        assert!(
            l.suppress.hard_bounce("x@dest.test", T0).unwrap(),
            "past the threshold it stays suppressed"
        );
        // A delivery to someone else leaves x's count alone.
        l.suppress.delivered("y@dest.test").unwrap();
        assert!(l.suppress.remove("x@dest.test").unwrap());
        assert!(!l.suppress.hard_bounce("x@dest.test", T0).unwrap());
    }
}
