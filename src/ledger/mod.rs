//! The privacy ledger: delivery metadata, sealed, kept for `privacy.retention_days`, then gone.
//!
//! # Storage
//! sled holds three trees. `records` maps `YYYYMMDD/<queue id>/<rcpt index>` to a record sealed
//! (XChaCha20-Poly1305) under the key of the day the message arrived; keys starting with the day
//! make retention a range delete. `subjects` maps a pseudonym followed by a record key to
//! nothing, so export and erase cost what one subject has, not a scan. `suppress` and
//! `bounces` hold the suppression list (see [`crate::suppress`]).
//!
//! sled is unmaintained and keeps deleted values on disk until it compacts; so nothing in it is
//! readable without a key held outside it, no key of sled's contains an address, and purging a
//! day destroys that day's key file: a value copied out before the purge stays sealed forever.
//! sled is hidden behind this module so that it can be replaced.
//!
//! # Strict privacy
//! Mail from a `privacy.strict_domains` domain gets records with no recipient, no sender, no
//! pseudonym and no remote reply text (which often quotes the address); counts remain.

mod epoch;
mod writer;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{mpsc, Arc};

use serde::{Deserialize, Serialize};

use crate::config::{LocalPart, LogAddresses, PrivacyConfig};
use crate::crypto::{CryptoError, Key, Pseudonymizer};
use crate::spool::{Envelope, QueueId};
use crate::suppress::Suppressions;
use epoch::Epochs;

/// What can go wrong in the ledger.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger store: {0}")]
    Store(#[from] sled::Error),
    #[error("ledger key: {0}")]
    Crypto(#[from] CryptoError),
    #[error("ledger I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("ledger record does not decode")]
    Corrupt,
    #[error("ledger writer thread has stopped")]
    WriterGone,
}

/// Where a recipient stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Queued,
    Delivered,
    Deferred,
    Bounced,
    Expired,
    Suppressed,
    /// Removed from the queue by an erasure request or an operator.
    Cancelled,
}

impl Outcome {
    pub fn is_final(self) -> bool {
        !matches!(self, Outcome::Queued | Outcome::Deferred)
    }
}

/// One recipient of one message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub queue_id: String,
    pub rcpt_index: u32,
    pub received_at: i64,
    pub final_at: Option<i64>,
    pub sending_domain: String,
    pub recipient_pseudonym: Option<String>,
    pub recipient: Option<String>,
    pub sender: Option<String>,
    pub size: u64,
    pub outcome: Outcome,
    pub attempts: u32,
    pub last_code: Option<String>,
    pub last_text: Option<String>,
    pub remote_host: Option<String>,
    pub remote_ip: Option<String>,
    /// "TLSv1.3 TLS13_AES_256_GCM_SHA384"
    pub tls: Option<String>,
    pub tls_verified: Option<bool>,
    pub dkim_domain: Option<String>,
    pub dkim_selectors: Vec<String>,
    pub client_ip: String,
    pub auth_user: Option<String>,
}

/// An attempt's result, as the queue reports it.
#[derive(Debug, Clone, Default)]
pub struct Update {
    pub code: Option<String>,
    pub text: Option<String>,
    pub remote_host: Option<String>,
    pub remote_ip: Option<String>,
    pub tls: Option<String>,
    pub tls_verified: Option<bool>,
}

/// DKIM facts recorded at acceptance.
#[derive(Debug, Clone, Default)]
pub struct Signing {
    pub domain: Option<String>,
    pub selectors: Vec<String>,
}

/// What a purge removed.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct Purged {
    pub records: usize,
    pub days: Vec<String>,
}

/// The ledger, shared by sessions, the queue and the admin socket.
pub struct Ledger {
    db: sled::Db,
    tables: Arc<Tables>,
    /// Record writes go to the writer thread, which batches them (see [`writer`]).
    writer: Option<mpsc::Sender<writer::Event>>,
    /// Joined on drop, so that sled's file lock is released when the ledger is.
    thread: Option<std::thread::JoinHandle<()>>,
    pseudonyms: Pseudonymizer,
    config: PrivacyConfig,
    /// The suppression list, in the same sled database.
    pub suppress: Suppressions,
}

/// `YYYYMMDD` of a Unix time, UTC.
pub fn day_of(t: i64) -> String {
    chrono::DateTime::from_timestamp(t, 0)
        .unwrap_or_default()
        .format("%Y%m%d")
        .to_string()
}

/// `day (8 ASCII digits) ‖ recipient pseudonym (32) ‖ queue id (16) ‖ recipient index (2)`.
/// The day first makes retention a range delete; the pseudonym next makes a subject's records
/// a prefix scan per day, with no separate index entry to write for every recipient.
/// Strict-domain records carry an all-zero pseudonym, which no address hashes to.
fn record_key(day: &str, rcpt: &[u8; 32], id: QueueId, index: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(RECORD_KEY_LEN);
    k.extend_from_slice(day.as_bytes());
    k.extend_from_slice(rcpt);
    k.extend_from_slice(&id.0);
    k.extend_from_slice(&(index.min(u16::MAX as u32) as u16).to_be_bytes());
    k
}

const RECORD_KEY_LEN: usize = 8 + 32 + 16 + 2;
const NO_PSEUDONYM: [u8; 32] = [0; 32];

impl Ledger {
    /// Opens (creating) `<data_dir>/ledger`. Only one process may hold it: the daemon.
    pub fn open(
        data_dir: &Path,
        master: &Key,
        config: &PrivacyConfig,
    ) -> Result<Ledger, LedgerError> {
        let dir = data_dir.join("ledger");
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)?;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        }
        // Batched durability: sled flushes every second on its own thread, never per record.
        let db = sled::Config::new()
            .path(dir.join("db"))
            .flush_every_ms(Some(1000))
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let pseudonym_key =
            load_or_make(master, &dir.join("pseudonym.key"), "postern pseudonym key")?;
        let suppress_key =
            load_or_make(master, &dir.join("suppress.key"), "postern suppression key")?;
        let pseudonyms =
            Pseudonymizer::new(&pseudonym_key, config.local_part == LocalPart::Lowercase);
        let suppress = Suppressions::new(
            db.open_tree("suppress")?,
            db.open_tree("bounces")?,
            suppress_key,
            pseudonyms.clone(),
            config.bounce_threshold,
        );
        let tables = Arc::new(Tables {
            records: db.open_tree("records")?,
            subjects: db.open_tree("subjects")?,
            epochs: Epochs::open(dir.join("keys"), master.clone())?,
            strict_domains: config.strict_domains.clone(),
        });
        let (tx, rx) = mpsc::channel();
        let t = tables.clone();
        let thread = std::thread::Builder::new()
            .name("ledger-writer".into())
            .spawn(move || writer::run(t, rx))?;
        Ok(Ledger {
            thread: Some(thread),
            tables,
            writer: Some(tx),
            db,
            pseudonyms,
            config: config.clone(),
            suppress,
        })
    }

    /// True when mail from `domain` must leave no recipient data behind.
    pub fn is_strict(&self, domain: &str) -> bool {
        self.tables.is_strict(domain)
    }

    /// How a recipient appears in a log line.
    pub fn log_rcpt(&self, address: &str, sending_domain: &str) -> String {
        if self.is_strict(sending_domain) {
            return "-".into();
        }
        match self.config.log_addresses {
            LogAddresses::Clear => address.to_string(),
            LogAddresses::None => "-".into(),
            LogAddresses::Pseudonym => {
                let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
                format!(
                    "{}@{}",
                    self.pseudonyms.of(address).short(),
                    domain.to_lowercase()
                )
            }
        }
    }

    /// The pseudonymiser (for suppression checks and logs).
    pub fn pseudonyms(&self) -> &Pseudonymizer {
        &self.pseudonyms
    }

    /// Records a newly accepted message: one `queued` record per recipient. Returns at once;
    /// the writer thread stores it with the next batch.
    pub fn accepted(
        &self,
        id: QueueId,
        env: &Envelope,
        size: u64,
        signing: &Signing,
    ) -> Result<(), LedgerError> {
        let strict = self.is_strict(&env.sending_domain);
        let day = day_of(env.received_at);
        let qid = id.to_string();
        let sender =
            (!strict && !env.mail_from.is_empty()).then(|| self.pseudonyms.of(&env.mail_from));
        let mut records = Vec::with_capacity(env.recipients.len());
        let mut sender_value = Vec::new();
        for (i, rcpt) in env.recipients.iter().enumerate() {
            let pseudonym = (!strict).then(|| self.pseudonyms.of(rcpt));
            let rkey = record_key(&day, &pseudonym.map_or(NO_PSEUDONYM, |p| p.0), id, i as u32);
            sender_value.extend_from_slice(&rkey);
            records.push((
                rkey,
                Record {
                    queue_id: qid.clone(),
                    rcpt_index: i as u32,
                    received_at: env.received_at,
                    final_at: None,
                    sending_domain: env.sending_domain.clone(),
                    recipient_pseudonym: pseudonym.map(|p| p.to_string()),
                    recipient: (!strict).then(|| rcpt.clone()),
                    sender: sender.map(|_| env.mail_from.clone()),
                    size,
                    outcome: Outcome::Queued,
                    attempts: 0,
                    last_code: None,
                    last_text: None,
                    remote_host: None,
                    remote_ip: None,
                    tls: None,
                    tls_verified: None,
                    dkim_domain: signing.domain.clone(),
                    dkim_selectors: signing.selectors.clone(),
                    client_ip: env.client_ip.to_string(),
                    auth_user: env.auth_user.clone(),
                },
            ));
        }
        // One index entry per message for its sender: the record keys it may ask about.
        let index = sender
            .map(|s| (sender_key(&s.0, &day, id), sender_value))
            .into_iter()
            .collect();
        self.send(writer::Event::Accepted {
            day,
            records,
            index,
        })
    }

    /// Records the outcome of an attempt for recipient `index` of message `id`. Returns at once.
    pub fn outcome(
        &self,
        id: QueueId,
        env: &Envelope,
        index: usize,
        outcome: Outcome,
        update: &Update,
        now: i64,
    ) -> Result<(), LedgerError> {
        let day = day_of(env.received_at);
        let rcpt = match env.recipients.get(index) {
            Some(r) if !self.is_strict(&env.sending_domain) => self.pseudonyms.of(r).0,
            _ => NO_PSEUDONYM,
        };
        let rkey = record_key(&day, &rcpt, id, index as u32);
        self.send(writer::Event::Outcome {
            day,
            rkey,
            outcome,
            update: update.clone(),
            now,
        })
    }

    fn send(&self, event: writer::Event) -> Result<(), LedgerError> {
        let writer = self.writer.as_ref().ok_or(LedgerError::WriterGone)?;
        writer.send(event).map_err(|_| LedgerError::WriterGone)
    }

    /// Waits until every event sent so far is in sled (before reads that must see them).
    pub fn sync(&self) -> Result<(), LedgerError> {
        let (tx, rx) = mpsc::channel();
        self.send(writer::Event::Sync(tx))?;
        rx.recv().map_err(|_| LedgerError::WriterGone)
    }

    /// Every record about `address`, as recipient or as sender, decrypted. As a sender's
    /// export, records name their recipients only by pseudonym: they are other people's data.
    pub fn export(&self, address: &str) -> Result<Vec<Record>, LedgerError> {
        self.sync()?;
        let me = self.pseudonyms.of(address);
        let mut out = Vec::new();
        for rkey in self.subject_records(&me.0)? {
            let day = String::from_utf8_lossy(&rkey[..8]).into_owned();
            let (Some(key), Some(sealed)) = (
                self.tables.epochs.existing(&day),
                self.tables.records.get(&rkey)?,
            ) else {
                continue;
            };
            let mut record: Record = self.tables.unseal(&key, &rkey, &sealed)?;
            if rkey[8..40] != me.0 {
                record.recipient = None;
            }
            out.push(record);
        }
        Ok(out)
    }

    /// Removes every record about `address`; returns how many.
    pub fn erase(&self, address: &str) -> Result<usize, LedgerError> {
        self.sync()?;
        let me = self.pseudonyms.of(address);
        let mut n = 0;
        for rkey in self.subject_records(&me.0)? {
            if self.tables.records.remove(&rkey)?.is_some() {
                n += 1;
            }
        }
        for item in self.tables.subjects.scan_prefix(me.0) {
            let (k, _) = item?;
            self.tables.subjects.remove(k)?;
        }
        self.db.flush()?;
        Ok(n)
    }

    /// Record keys about a subject: as recipient (a prefix scan per day held), then as sender
    /// (its index entries). Costs what the subject has, plus one seek per retained day.
    fn subject_records(&self, pseudonym: &[u8; 32]) -> Result<Vec<Vec<u8>>, LedgerError> {
        let mut keys = Vec::new();
        for day in self.tables.epochs.days() {
            let mut prefix = day.into_bytes();
            prefix.extend_from_slice(pseudonym);
            for item in self.tables.records.scan_prefix(&prefix) {
                keys.push(item?.0.to_vec());
            }
        }
        for item in self.tables.subjects.scan_prefix(pseudonym) {
            let (_, v) = item?;
            keys.extend(
                v.chunks(RECORD_KEY_LEN)
                    .filter(|c| c.len() == RECORD_KEY_LEN)
                    .map(<[u8]>::to_vec),
            );
        }
        keys.sort();
        keys.dedup();
        Ok(keys)
    }

    /// Deletes records of days older than the retention period and destroys their keys.
    /// Runs at start (catching up after downtime) and then periodically.
    pub fn purge(&self, now: i64) -> Result<Purged, LedgerError> {
        self.sync()?;
        let cutoff = day_of(now - self.config.retention_days as i64 * 86_400);
        let mut purged = Purged::default();
        let mut batch = sled::Batch::default();
        for item in self.tables.records.range(..cutoff.as_bytes()) {
            let (k, _) = item?;
            batch.remove(k);
            purged.records += 1;
        }
        self.tables.records.apply_batch(batch)?;
        // Index entries of purged records point nowhere; drop them too.
        let mut stale = sled::Batch::default();
        for item in self.tables.subjects.iter() {
            let (k, _) = item?;
            if k.len() >= 40 && k[32..40] < *cutoff.as_bytes() {
                stale.remove(k);
            }
        }
        self.tables.subjects.apply_batch(stale)?;
        for day in self.tables.epochs.days() {
            if day.as_str() < cutoff.as_str() {
                self.tables.epochs.destroy(&day)?;
                purged.days.push(day);
            }
        }
        self.db.flush()?;
        Ok(purged)
    }

    /// Settings in force and what is stored, for a record of processing activities.
    pub fn report(&self) -> Result<serde_json::Value, LedgerError> {
        self.sync()?;
        let mut per_day: BTreeMap<String, usize> = BTreeMap::new();
        for item in self.tables.records.iter() {
            let (k, _) = item?;
            *per_day
                .entry(String::from_utf8_lossy(&k[..8]).into_owned())
                .or_default() += 1;
        }
        Ok(serde_json::json!({
            "retention_days": self.config.retention_days,
            "log_addresses": format!("{:?}", self.config.log_addresses).to_lowercase(),
            "strict_domains": self.config.strict_domains,
            "pseudonyms": "HMAC-SHA256 of the normalised address, key kept apart from the ledger",
            "encryption": "XChaCha20-Poly1305, one random key per day, wrapped by the master key",
            "bodies": "never stored in the ledger; destroyed from the spool when the last recipient is final",
            "records": per_day.values().sum::<usize>(),
            "records_per_day": per_day,
            "oldest_record_day": per_day.keys().next(),
            "key_epochs_held": self.tables.epochs.days(),
            "suppression_entries": self.suppress.len(),
        }))
    }

    /// The raw sealed bytes of the record of recipient `index` (`rcpt`) of message `id`
    /// (for tests of crypto-shredding). Strict-domain records are not found by address.
    pub fn raw(
        &self,
        id: QueueId,
        received_at: i64,
        index: u32,
        rcpt: &str,
    ) -> Result<Option<Vec<u8>>, LedgerError> {
        self.sync()?;
        let rkey = record_key(&day_of(received_at), &self.pseudonyms.of(rcpt).0, id, index);
        Ok(self.tables.records.get(rkey)?.map(|v| v.to_vec()))
    }

    /// Opens raw sealed bytes as [`Ledger::raw`] returned them, if the day's key still exists.
    pub fn open_raw(
        &self,
        id: QueueId,
        received_at: i64,
        index: u32,
        rcpt: &str,
        sealed: &[u8],
    ) -> Result<Record, LedgerError> {
        let day = day_of(received_at);
        let key = self
            .tables
            .epochs
            .existing(&day)
            .ok_or(LedgerError::Crypto(CryptoError::Open))?;
        self.tables.unseal(
            &key,
            &record_key(&day, &self.pseudonyms.of(rcpt).0, id, index),
            sealed,
        )
    }

    /// A record by id (for tests and the admin API).
    pub fn get(
        &self,
        id: QueueId,
        received_at: i64,
        index: u32,
        rcpt: &str,
    ) -> Result<Option<Record>, LedgerError> {
        match self.raw(id, received_at, index, rcpt)? {
            Some(sealed) => self
                .open_raw(id, received_at, index, rcpt, &sealed)
                .map(Some),
            None => Ok(None),
        }
    }

    /// Every record of message `id` (strict ones included), by scanning its day: for operators
    /// and tests, not for the hot path.
    pub fn message_records(
        &self,
        id: QueueId,
        received_at: i64,
    ) -> Result<Vec<Record>, LedgerError> {
        self.sync()?;
        let day = day_of(received_at);
        let Some(key) = self.tables.epochs.existing(&day) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for item in self.tables.records.scan_prefix(day.as_bytes()) {
            let (k, v) = item?;
            if k.len() == RECORD_KEY_LEN && k[40..56] == id.0 {
                out.push(self.tables.unseal(&key, &k, &v)?);
            }
        }
        Ok(out)
    }

    /// Makes recent writes durable now (shutdown).
    pub fn flush(&self) -> Result<(), LedgerError> {
        self.db.flush()?;
        Ok(())
    }
}

impl Drop for Ledger {
    fn drop(&mut self) {
        // Closing the channel ends the writer after it has written what it holds.
        self.writer.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `sender pseudonym (32) ‖ day (8) ‖ queue id (16)`; the day at 32..40 lets purging find it.
fn sender_key(pseudonym: &[u8; 32], day: &str, id: QueueId) -> Vec<u8> {
    let mut k = pseudonym.to_vec();
    k.extend_from_slice(day.as_bytes());
    k.extend_from_slice(&id.0);
    k
}

fn load_or_make(master: &Key, path: &Path, purpose: &str) -> Result<Key, LedgerError> {
    if path.exists() {
        return Ok(master.read_wrapped(path, purpose)?);
    }
    let key = Key::generate()?;
    master.write_wrapped(path, purpose, &key)?;
    Ok(key)
}

/// The sled trees and keys, shared by the [`Ledger`] handle and its writer thread.
pub(crate) struct Tables {
    records: sled::Tree,
    subjects: sled::Tree,
    epochs: Epochs,
    strict_domains: Vec<String>,
}

impl Tables {
    fn is_strict(&self, domain: &str) -> bool {
        self.strict_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }

    // postcard rather than JSON: a third of the size, and sled's copy-on-write nodes make every
    // insert cost in proportion to the bytes stored.
    fn seal(&self, key: &Key, rkey: &[u8], record: &Record) -> Result<Vec<u8>, LedgerError> {
        let plain = postcard::to_stdvec(record).map_err(|_| LedgerError::Corrupt)?;
        Ok(key.seal(rkey, &plain)?)
    }

    fn unseal(&self, key: &Key, rkey: &[u8], sealed: &[u8]) -> Result<Record, LedgerError> {
        let plain = key.open(rkey, sealed)?;
        postcard::from_bytes(&plain).map_err(|_| LedgerError::Corrupt)
    }
}

#[cfg(test)]
mod tests;
