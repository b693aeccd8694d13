//! The ledger's writer thread: record writes off the SMTP and delivery paths, in batches.
//!
//! Sessions and the queue send events and go on. The writer collects them for up to
//! [`COALESCE`], folds every event about one record into one value (a message accepted and
//! delivered within the window is written once, already final), seals and applies the batch.
//! sled then makes it durable with its own periodic flush. A crash can lose the last second or
//! so of metadata, never mail: the spool is the truth for delivery.

use std::collections::HashMap;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use super::{record_key, sender_key, Outcome, Record, Tables, Update};
use crate::crypto::Pseudonym;
use crate::spool::QueueId;

/// How long the writer lets events gather before writing them. It sleeps through this rather
/// than waking for every event: at thousands of messages a second, a wake-up per event costs
/// more CPU than the writing itself.
const COALESCE: Duration = Duration::from_millis(100);

pub(super) enum Event {
    /// A message's records, one per recipient with its pseudonym (none for a strict domain),
    /// and its sender's pseudonym for the sender index.
    Accepted {
        day: String,
        id: QueueId,
        sender: Option<Pseudonym>,
        records: Vec<(Option<Pseudonym>, Record)>,
    },
    Outcome(OutcomeEvent),
    /// Answered once everything before it is applied.
    Sync(mpsc::Sender<()>),
}

/// The outcome of an attempt for recipient `index` of message `id`.
pub(super) struct OutcomeEvent {
    pub day: String,
    pub id: QueueId,
    pub index: u32,
    /// The recipient's pseudonym; none for a strict domain.
    pub subject: Option<Pseudonym>,
    pub outcome: Outcome,
    pub update: Update,
    pub now: i64,
}

pub(super) fn run(tables: Arc<Tables>, rx: mpsc::Receiver<Event>) {
    while let Ok(first) = rx.recv() {
        // A sync (an export, an erasure, shutdown) is waited for: no gathering then.
        if !matches!(first, Event::Sync(_)) {
            std::thread::sleep(COALESCE);
        }
        let mut events = vec![first];
        let mut disconnected = false;
        loop {
            match rx.try_recv() {
                Ok(e) => events.push(e),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    disconnected = true;
                    break;
                }
            }
        }
        if let Err(e) = apply(&tables, events) {
            tracing::error!(error = %e, "ledger: batch not written");
        }
        if disconnected {
            return;
        }
    }
}

fn apply(tables: &Tables, events: Vec<Event>) -> Result<(), super::LedgerError> {
    let mut pending = Pending::default();
    let mut syncs = Vec::new();
    for event in events {
        match event {
            Event::Accepted {
                day,
                id,
                sender,
                records,
            } => pending.accepted(tables, &day, id, sender, records)?,
            Event::Outcome(event) => pending.outcome(tables, event)?,
            Event::Sync(tx) => syncs.push(tx),
        }
    }
    let mut batch = sled::Batch::default();
    for (rkey, (day, record)) in &pending.records {
        let key = tables.epochs.key(day)?;
        batch.insert(rkey.as_slice(), tables.seal(&key.seal, rkey, record)?);
    }
    tables.records.apply_batch(batch)?;
    tables.subjects.apply_batch(pending.index)?;
    for s in syncs {
        let _ = s.send(());
    }
    Ok(())
}

/// What one batch writes: every record it touches, folded to its latest state, and sender
/// index entries.
#[derive(Default)]
struct Pending {
    /// Record key -> (day, record).
    records: HashMap<Vec<u8>, (String, Record)>,
    index: sled::Batch,
}

impl Pending {
    /// A new message: its records, under keys that name recipients by their tag of the day,
    /// and its sender's index entry, which lists those keys.
    fn accepted(
        &mut self,
        tables: &Tables,
        day: &str,
        id: QueueId,
        sender: Option<Pseudonym>,
        records: Vec<(Option<Pseudonym>, Record)>,
    ) -> Result<(), super::LedgerError> {
        let key = tables.epochs.key(day)?;
        let mut covered = Vec::new();
        for (subject, record) in records {
            let rkey = record_key(day, &key.tag(subject.as_ref()), id, record.rcpt_index);
            covered.extend_from_slice(&rkey);
            self.records.insert(rkey, (day.to_string(), record));
        }
        if let Some(sender) = sender {
            self.index
                .insert(sender_key(day, &key.tag(Some(&sender)), id), covered);
        }
        Ok(())
    }

    /// An attempt's outcome, folded into the record in this batch or the stored one.
    fn outcome(&mut self, tables: &Tables, e: OutcomeEvent) -> Result<(), super::LedgerError> {
        // No key: the day was purged meanwhile, and its record with it.
        let Some(key) = tables.epochs.existing(&e.day) else {
            return Ok(());
        };
        let rkey = record_key(&e.day, &key.tag(e.subject.as_ref()), e.id, e.index);
        if !self.records.contains_key(&rkey) {
            // Not in this batch: the stored record, unless erased meanwhile.
            let Some(sealed) = tables.records.get(&rkey)? else {
                return Ok(());
            };
            let record = tables.unseal(&key.seal, &rkey, &sealed)?;
            self.records.insert(rkey.clone(), (e.day.clone(), record));
        }
        if let Some((_, record)) = self.records.get_mut(&rkey) {
            let strict = tables.is_strict(&record.sending_domain);
            apply_update(record, e.outcome, &e.update, e.now, strict);
        }
        Ok(())
    }
}

fn apply_update(record: &mut Record, outcome: Outcome, update: &Update, now: i64, strict: bool) {
    record.outcome = outcome;
    if matches!(
        outcome,
        Outcome::Delivered | Outcome::Deferred | Outcome::Bounced
    ) {
        record.attempts += 1;
    }
    if outcome.is_final() {
        record.final_at = Some(now);
    }
    record.last_code = update.code.clone().or(record.last_code.take());
    // Remote replies often quote the address: none for strict domains.
    record.last_text = if strict {
        None
    } else {
        update.text.clone().or(record.last_text.take())
    };
    record.remote_host = update.remote_host.clone().or(record.remote_host.take());
    record.remote_ip = update.remote_ip.clone().or(record.remote_ip.take());
    record.tls = update.tls.clone().or(record.tls.take());
    record.tls_verified = update.tls_verified.or(record.tls_verified);
}
