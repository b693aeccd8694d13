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

use super::{Outcome, Record, Tables, Update};

/// How long the writer lets events gather before writing them. It sleeps through this rather
/// than waking for every event: at thousands of messages a second, a wake-up per event costs
/// more CPU than the writing itself.
const COALESCE: Duration = Duration::from_millis(100);

pub(super) enum Event {
    Accepted {
        day: String,
        records: Vec<(Vec<u8>, Record)>,
        /// Sender index entries: key, and the record keys it covers.
        index: Vec<(Vec<u8>, Vec<u8>)>,
    },
    Outcome {
        day: String,
        rkey: Vec<u8>,
        outcome: Outcome,
        update: Update,
        now: i64,
    },
    /// Answered once everything before it is applied.
    Sync(mpsc::Sender<()>),
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
    // rkey -> (day, record), in first-seen order so that the batch is deterministic.
    let mut pending: HashMap<Vec<u8>, (String, Record)> = HashMap::new();
    let mut index = sled::Batch::default();
    let mut syncs = Vec::new();
    for event in events {
        match event {
            Event::Accepted {
                day,
                records,
                index: keys,
            } => {
                for (rkey, record) in records {
                    pending.insert(rkey, (day.clone(), record));
                }
                for (k, v) in keys {
                    index.insert(k, v);
                }
            }
            Event::Outcome {
                day,
                rkey,
                outcome,
                update,
                now,
            } => {
                if !pending.contains_key(&rkey) {
                    // Not in this batch: the stored record, unless purged or erased meanwhile.
                    let Some(key) = tables.epochs.existing(&day) else {
                        continue;
                    };
                    let Some(sealed) = tables.records.get(&rkey)? else {
                        continue;
                    };
                    let record = tables.unseal(&key, &rkey, &sealed)?;
                    pending.insert(rkey.clone(), (day.clone(), record));
                }
                if let Some((_, record)) = pending.get_mut(&rkey) {
                    let strict = tables.is_strict(&record.sending_domain);
                    apply_update(record, outcome, &update, now, strict);
                }
            }
            Event::Sync(tx) => syncs.push(tx),
        }
    }
    let mut batch = sled::Batch::default();
    for (rkey, (day, record)) in &pending {
        let key = tables.epochs.key(day)?;
        batch.insert(rkey.as_slice(), tables.seal(&key, rkey, record)?);
    }
    tables.records.apply_batch(batch)?;
    tables.subjects.apply_batch(index)?;
    for s in syncs {
        let _ = s.send(());
    }
    Ok(())
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
