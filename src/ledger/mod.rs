//! The privacy ledger: delivery metadata, sealed, kept for `privacy.retention_days`, then gone.
//!
//! # Storage
//! sled holds four trees. `records` maps `day ‖ recipient tag ‖ queue id ‖ rcpt index` to a
//! record sealed (XChaCha20-Poly1305) under the key of the day the message arrived; keys
//! starting with the day make retention a range delete. `subjects` maps `day ‖ sender tag ‖
//! queue id` to the record keys of that message, so export and erase cost what one subject has,
//! not a scan. `suppress` and `bounces` hold the suppression list (see [`crate::suppress`]).
//!
//! A tag is an HMAC of the subject's pseudonym under an index key derived from the day's key
//! ([`epoch::DayKey::tag`]), never the pseudonym itself: export and erase compute it for each
//! day still held, and once a day's key is destroyed nothing can.
//!
//! The pseudonym key itself rotates (`privacy.pseudonym_rotation`): each day's mail is named
//! with the generation in force that day, and a generation's key is destroyed once its last day
//! is purged (see [`pseudonym`]).
//!
//! sled is unmaintained and keeps deleted keys and values on disk until it compacts; so nothing
//! in it is readable without a key held outside it, no key of sled's contains an address or a
//! pseudonym, and purging a day destroys that day's key file: a value copied out before the
//! purge stays sealed forever, and its key names nobody. sled is hidden behind this module so
//! that it can be replaced.
//!
//! # Strict privacy
//! Mail from a `privacy.strict_domains` domain gets records with no recipient, no sender, no
//! pseudonym and no remote reply text (which often quotes the address); counts remain.

pub(crate) mod epoch;
pub(crate) mod pseudonym;
mod writer;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{mpsc, Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::config::{LocalPart, LogAddresses, PrivacyConfig};
use crate::crypto::{sync_dir, CryptoError, Key, Pseudonymizer};
use crate::spool::{Envelope, QueueId};
use crate::suppress::{BounceRun, SuppressError, Suppressions};
use epoch::{DayKey, Epochs};
use pseudonym::Generations;

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
    #[error("{0}")]
    Suppress(#[from] SuppressError),
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
    /// Runs of hard bounces that started before the retention period.
    pub bounce_runs: usize,
    /// Pseudonym generations destroyed (by start day): none of their days is held any more.
    pub pseudonym_keys: Vec<String>,
}

/// Everything held about one subject: what `privacy export` hands over.
#[derive(Debug, Default, Serialize)]
pub struct SubjectData {
    /// Ledger records naming the subject as recipient or as sender.
    pub records: Vec<Record>,
    /// The subject's suppression entry, expired or not.
    pub suppression: Option<crate::suppress::Entry>,
    /// The subject's current run of hard bounces.
    pub bounce_run: Option<BounceRun>,
}

/// A subject's index entries in one day still held.
struct DayHits {
    key: Arc<DayKey>,
    /// The subject's tag that day.
    tag: [u8; 32],
    /// Record keys: as recipient, then those the sender entries list.
    records: Vec<Vec<u8>>,
    /// Sender index entries.
    index: Vec<Vec<u8>>,
}

/// The ledger, shared by sessions, the queue and the admin socket.
pub struct Ledger {
    db: sled::Db,
    tables: Arc<Tables>,
    /// Record writes go to the writer thread, which batches them (see [`writer`]).
    writer: Option<mpsc::Sender<writer::Event>>,
    /// Joined on drop, so that sled's file lock is released when the ledger is.
    thread: Option<std::thread::JoinHandle<()>>,
    /// Pseudonym keys by generation: the one of a record's day names its subjects.
    generations: Generations,
    /// The generation of the day of the last retention pass, for log lines (which have no day
    /// of their own); it moves to a new generation within a pass of that one's first day.
    current: RwLock<Pseudonymizer>,
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

/// `day (8 ASCII digits) ‖ recipient tag (32) ‖ queue id (16) ‖ recipient index (2)`.
/// The day first makes retention a range delete; the recipient's tag for that day
/// ([`DayKey::tag`]) next makes a subject's records a prefix scan per day, with no separate
/// index entry to write for every recipient. Strict-domain records carry an all-zero tag.
fn record_key(day: &str, tag: &[u8; 32], id: QueueId, index: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(RECORD_KEY_LEN);
    k.extend_from_slice(day.as_bytes());
    k.extend_from_slice(tag);
    k.extend_from_slice(&id.0);
    k.extend_from_slice(&(index.min(u16::MAX as u32) as u16).to_be_bytes());
    k
}

/// `day (8) ‖ sender tag (32) ‖ queue id (16)`: the sender's index entry for one message, in
/// `subjects`. The day first makes purging it a range delete, as for records.
fn sender_key(day: &str, tag: &[u8; 32], id: QueueId) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + 32 + 16);
    k.extend_from_slice(day.as_bytes());
    k.extend_from_slice(tag);
    k.extend_from_slice(&id.0);
    k
}

const RECORD_KEY_LEN: usize = 8 + 32 + 16 + 2;

impl Ledger {
    /// Opens (creating) `<data_dir>/ledger`. Only one process may hold it: the daemon. `now`
    /// dates the first pseudonym generation, and picks the one log lines use. At most `cache`
    /// bytes of its pages stay in memory (`limits.ledger_cache`).
    pub fn open(
        data_dir: &Path,
        master: &Key,
        config: &PrivacyConfig,
        cache: u64,
        now: i64,
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
            .cache_capacity(cache)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let keys = NameKeys::open(&dir, master, config, now)?;
        let epochs = Arc::new(Epochs::open(dir.join("keys"), master.clone())?);
        let suppress = Suppressions::new(
            db.open_tree("suppress")?,
            db.open_tree("bounces")?,
            keys.suppress_seal,
            keys.suppress_ids,
            epochs.clone(),
            config.bounce_threshold,
        );
        let tables = Arc::new(Tables {
            records: db.open_tree("records")?,
            subjects: db.open_tree("subjects")?,
            epochs,
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
            current: RwLock::new(keys.generations.for_day(&day_of(now))),
            generations: keys.generations,
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
                let current = self.current.read().unwrap_or_else(|p| p.into_inner());
                format!(
                    "{}@{}",
                    current.of(address).short(),
                    crate::proto::address::normalise_domain(domain)
                )
            }
        }
    }

    /// `privacy.retention_days`: how long anything about a person is kept.
    pub fn retention_days(&self) -> u32 {
        self.config.retention_days
    }

    /// The pseudonymiser log lines use now: the generation of the last retention pass's day.
    /// Records use the generation of their own day ([`Ledger::pseudonyms_of_day`]).
    pub fn pseudonyms(&self) -> Pseudonymizer {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The pseudonymiser of the mail of `day` (`YYYYMMDD`).
    pub fn pseudonyms_of_day(&self, day: &str) -> Pseudonymizer {
        self.generations.for_day(day)
    }

    /// Start days of the pseudonym generations held, oldest first.
    pub fn pseudonym_generations(&self) -> Vec<String> {
        self.generations.starts()
    }

    /// Starts the next pseudonym generation (from tomorrow) once the newest has served
    /// `privacy.pseudonym_rotation` at `now`, and moves log lines to the generation of `now`'s
    /// day. Returns the new generation's start day. Runs with each retention pass.
    pub fn rotate(&self, now: i64) -> Result<Option<String>, LedgerError> {
        let started = self
            .generations
            .rotate(now, self.config.pseudonym_rotation)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) =
            self.generations.for_day(&day_of(now));
        Ok(started)
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
        let names = self.generations.for_day(&day);
        let qid = id.to_string();
        let sender = (!strict && !env.mail_from.is_empty()).then(|| names.of(&env.mail_from));
        let mut records = Vec::with_capacity(env.recipients.len());
        for (i, rcpt) in env.recipients.iter().enumerate() {
            let pseudonym = (!strict).then(|| names.of(rcpt));
            let record = Record {
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
            };
            records.push((pseudonym, record));
        }
        // The writer derives the keys: the day's key may have to be created, which is file
        // I/O that the session should not wait for.
        self.send(writer::Event::Accepted {
            day,
            id,
            sender,
            records,
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
        // The generation of the message's day, as when it was accepted: the record's key.
        let subject = match env.recipients.get(index) {
            Some(r) if !self.is_strict(&env.sending_domain) => {
                Some(self.generations.for_day(&day).of(r))
            }
            _ => None,
        };
        self.send(writer::Event::Outcome(writer::OutcomeEvent {
            day,
            id,
            index: index as u32,
            subject,
            outcome,
            update: update.clone(),
            now,
        }))
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

    /// Everything held about `address`: its records as recipient or as sender, decrypted, its
    /// suppression entry and its run of hard bounces. As a sender's export, records name their
    /// recipients only by pseudonym: they are other people's data.
    pub fn export(&self, address: &str) -> Result<SubjectData, LedgerError> {
        self.sync()?;
        let mut records = Vec::new();
        for hits in self.subject_records(address)? {
            for rkey in &hits.records {
                let Some(sealed) = self.tables.records.get(rkey)? else {
                    continue;
                };
                let mut record = self.tables.unseal(&hits.key.seal, rkey, &sealed)?;
                if rkey[8..40] != hits.tag {
                    record.recipient = None;
                }
                records.push(record);
            }
        }
        Ok(SubjectData {
            records,
            suppression: self.suppress.entry(address)?,
            bounce_run: self.suppress.bounce_run(address)?,
        })
    }

    /// Removes every record about `address` and its run of hard bounces; returns how many
    /// records. Its suppression entry stays: forgetting an opt-out would mail the person again.
    pub fn erase(&self, address: &str) -> Result<usize, LedgerError> {
        self.sync()?;
        let mut n = 0;
        for hits in self.subject_records(address)? {
            for rkey in &hits.records {
                if self.tables.records.remove(rkey)?.is_some() {
                    n += 1;
                }
            }
            for k in &hits.index {
                self.tables.subjects.remove(k)?;
            }
        }
        self.suppress.forget_bounces(address)?;
        self.db.flush()?;
        Ok(n)
    }

    /// A subject's index entries, day by day: its records as recipient (a prefix scan of
    /// `records` under its tag of the day), and as sender (its entries in `subjects`). Costs
    /// what the subject has, plus two seeks per retained day. Each day's tag is of the
    /// subject's pseudonym in that day's generation, so records from before a rotation are
    /// found as long as their day is held.
    fn subject_records(&self, address: &str) -> Result<Vec<DayHits>, LedgerError> {
        let mut out = Vec::new();
        for day in self.tables.epochs.days() {
            let Some(key) = self.tables.epochs.existing(&day) else {
                continue;
            };
            let tag = key.tag(Some(&self.generations.for_day(&day).of(address)));
            let mut prefix = day.into_bytes();
            prefix.extend_from_slice(&tag);
            let mut hits = DayHits {
                key,
                tag,
                records: Vec::new(),
                index: Vec::new(),
            };
            for item in self.tables.records.scan_prefix(&prefix) {
                hits.records.push(item?.0.to_vec());
            }
            for item in self.tables.subjects.scan_prefix(&prefix) {
                let (k, v) = item?;
                hits.index.push(k.to_vec());
                hits.records
                    .extend(v.chunks_exact(RECORD_KEY_LEN).map(<[u8]>::to_vec));
            }
            hits.records.sort();
            hits.records.dedup();
            out.push(hits);
        }
        Ok(out)
    }

    /// Deletes records, index entries and runs of hard bounces of days older than the
    /// retention period, then destroys those days' keys, and the pseudonym generations that
    /// named only those days. Runs at start (catching up after downtime) and then periodically
    /// (see [`crate::daemon::retention_pass`]).
    pub fn purge(&self, now: i64) -> Result<Purged, LedgerError> {
        self.sync()?;
        let cutoff = day_of(now - self.config.retention_days as i64 * 86_400);
        let mut purged = Purged {
            records: remove_before(&self.tables.records, &cutoff)?,
            ..Purged::default()
        };
        remove_before(&self.tables.subjects, &cutoff)?;
        purged.bounce_runs = self.suppress.purge_bounces(&cutoff)?;
        self.db.flush()?;
        for day in self.tables.epochs.days() {
            if day.as_str() < cutoff.as_str() {
                self.tables.epochs.destroy(&day)?;
                purged.days.push(day);
            }
        }
        // Last: only once every day before the cutoff is gone may the keys that named them go.
        purged.pseudonym_keys = self.generations.destroy_before(&cutoff)?;
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
            "pseudonyms": "HMAC-SHA256 of the normalised address, key kept apart from the ledger, a new key every pseudonym_rotation_days, an old one destroyed when the last day it named is purged",
            "pseudonym_rotation_days": self.config.pseudonym_rotation.as_secs() / 86_400,
            "pseudonym_generations": self.generations.starts(),
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
        let Some((_, rkey)) = self.record_key_of(id, received_at, index, rcpt) else {
            return Ok(None);
        };
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
        let (key, rkey) = self
            .record_key_of(id, received_at, index, rcpt)
            .ok_or(LedgerError::Crypto(CryptoError::Open))?;
        self.tables.unseal(&key.seal, &rkey, sealed)
    }

    /// The day's key and the record key of recipient `index` (`rcpt`) of message `id`; none
    /// once the day is purged.
    fn record_key_of(
        &self,
        id: QueueId,
        received_at: i64,
        index: u32,
        rcpt: &str,
    ) -> Option<(Arc<DayKey>, Vec<u8>)> {
        let day = day_of(received_at);
        let key = self.tables.epochs.existing(&day)?;
        let subject = self.generations.for_day(&day).of(rcpt);
        let rkey = record_key(&day, &key.tag(Some(&subject)), id, index);
        Some((key, rkey))
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
                out.push(self.tables.unseal(&key.seal, &k, &v)?);
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

/// Removes every entry of `tree` whose key starts with a day before `cutoff`; returns how many.
fn remove_before(tree: &sled::Tree, cutoff: &str) -> Result<usize, LedgerError> {
    let mut batch = sled::Batch::default();
    let mut n = 0;
    for item in tree.range(..cutoff.as_bytes()) {
        batch.remove(item?.0);
        n += 1;
    }
    tree.apply_batch(batch)?;
    Ok(n)
}

/// The keys that name people: pseudonym generations, and the suppression list's own keys.
struct NameKeys {
    generations: Generations,
    /// Names suppression entries and runs of bounces; never rotated (see [`crate::suppress`]).
    suppress_ids: Pseudonymizer,
    /// Seals suppression entries.
    suppress_seal: Key,
}

impl NameKeys {
    /// Loads the keys of `dir` (the ledger's directory), making any that are missing.
    ///
    /// Before generations, one key (`pseudonym.key`) named people everywhere, the suppression
    /// list included. It carries on as the suppression list's key, since entries cannot be
    /// re-keyed (they hold no address to compute a new name from), and as the first generation,
    /// so that the records it indexed are still found; then its own file goes. Each step is
    /// skipped when already done, so a crash half-way is finished at the next start.
    fn open(
        dir: &Path,
        master: &Key,
        config: &PrivacyConfig,
        now: i64,
    ) -> Result<NameKeys, LedgerError> {
        let lowercase = config.local_part == LocalPart::Lowercase;
        let legacy_path = dir.join("pseudonym.key");
        let legacy = if legacy_path.exists() {
            Some(master.read_wrapped(&legacy_path, "postern pseudonym key")?)
        } else {
            None
        };
        let ids = load_or_make(
            master,
            &dir.join("suppress-id.key"),
            "postern suppression identity key",
            legacy.as_ref(),
        )?;
        let generations = Generations::open(
            dir.join("pseudonyms"),
            master.clone(),
            lowercase,
            legacy.as_ref(),
            now,
        )?;
        if legacy.is_some() {
            let named = |path: &Path| {
                let path = path.display().to_string();
                move |source| CryptoError::Io { path, source }
            };
            std::fs::remove_file(&legacy_path).map_err(named(&legacy_path))?;
            sync_dir(dir).map_err(named(dir))?;
        }
        Ok(NameKeys {
            generations,
            suppress_ids: Pseudonymizer::new(&ids, lowercase),
            suppress_seal: load_or_make(
                master,
                &dir.join("suppress.key"),
                "postern suppression key",
                None,
            )?,
        })
    }
}

/// The key wrapped in `path`, or (when there is no such file yet) `seed` or a new key, written there.
fn load_or_make(
    master: &Key,
    path: &Path,
    purpose: &str,
    seed: Option<&Key>,
) -> Result<Key, LedgerError> {
    if path.exists() {
        return Ok(master.read_wrapped(path, purpose)?);
    }
    let key = match seed {
        Some(k) => k.clone(),
        None => Key::generate()?,
    };
    master.write_wrapped(path, purpose, &key)?;
    Ok(key)
}

/// The sled trees and keys, shared by the [`Ledger`] handle and its writer thread.
pub(crate) struct Tables {
    records: sled::Tree,
    subjects: sled::Tree,
    epochs: Arc<Epochs>,
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
