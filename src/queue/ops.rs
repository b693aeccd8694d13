//! What an operator does to queued mail (`postern queue ...`, through the admin socket): look
//! at it, flush it, hold and release it, delete it, return it to the sender.
//!
//! Every action goes through the due-time index first, so that it cannot race a delivery
//! attempt: a hold takes effect even on a message being tried (that attempt's own reschedule is
//! ignored), and delete or bounce are refused while an attempt runs, since its outcome would
//! follow them into the spool.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::due::Busy;
use super::schedule::{Hold, HoldReason, Schedule};
use super::{domain_of, update_of, Queue};
use crate::bounce;
use crate::delivery::RcptOutcome;
use crate::ledger::{Outcome, Update};
use crate::spool::{QueueData, QueueId, SpoolError, StoredEnvelope, StoredMessage, NOT_DUE};

/// Where a queued message stands, as the queue tools show it (Postfix's queue names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QueueState {
    /// Never tried yet.
    Queued,
    /// Being delivered now.
    Active,
    /// Tried and waiting for its next retry.
    Deferred,
    /// On hold: not tried until released.
    Held,
}

/// Which messages a flush is for.
#[derive(Debug, Clone)]
pub enum Selector {
    All,
    One(QueueId),
    /// Messages with a pending recipient at this domain.
    Domain(String),
}

/// Why an operator action was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("no such message in the queue")]
    NotFound,
    #[error("a delivery attempt for this message is in progress; try again in a moment")]
    Running,
    #[error("the message is not on hold")]
    NotHeld,
    #[error("the notice to the sender could not be stored (is the disk full?); the message stays queued")]
    NoticeNotStored,
    #[error(transparent)]
    Spool(SpoolError),
}

impl From<SpoolError> for OpError {
    fn from(e: SpoolError) -> OpError {
        match e {
            SpoolError::NotFound => OpError::NotFound,
            other => OpError::Spool(other),
        }
    }
}

/// One line of `postern queue list` and `mailq`: never an address or the body.
#[derive(Debug, Clone, Serialize)]
pub struct ListEntry {
    pub id: String,
    pub state: QueueState,
    pub age_seconds: i64,
    pub size: usize,
    pub pending_recipients: usize,
    /// Destination domains of the pending recipients, sorted.
    pub domains: Vec<String>,
}

/// `postern queue show`: the envelope and each recipient's attempts, in log form (pseudonyms
/// unless `log_addresses` says otherwise), never the body or a remote reply text.
#[derive(Debug, Clone, Serialize)]
pub struct MessageView {
    pub id: String,
    pub state: QueueState,
    pub hold: Option<Hold>,
    pub received_at: i64,
    pub age_seconds: i64,
    pub size: usize,
    pub sender: String,
    pub sending_domain: String,
    pub authenticated: bool,
    pub recipients: Vec<RcptView>,
}

/// One recipient in [`MessageView`].
#[derive(Debug, Clone, Serialize)]
pub struct RcptView {
    pub rcpt: String,
    pub domain: String,
    /// Delivered, bounced, expired, suppressed or cancelled: no longer queued.
    pub done: bool,
    pub attempts: u32,
    /// Unix time of the next attempt (none once done).
    pub next_attempt: Option<i64>,
    /// Status of the last temporary failure, and the host that gave it.
    pub last_status: Option<String>,
    pub last_remote: Option<String>,
}

/// How many messages are in each state, from the index (no spool reads): for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueCounts {
    /// Waiting for their next attempt (queued or deferred).
    pub waiting: usize,
    pub active: usize,
    pub held: usize,
}

impl Queue {
    pub fn counts(&self) -> QueueCounts {
        let due = self.lock();
        QueueCounts {
            waiting: due.waiting(),
            active: due.running_count(),
            held: due.held_count(),
        }
    }

    /// The state of a live message; None if it is not in the spool.
    pub fn state_of(&self, id: QueueId) -> Option<QueueState> {
        // Unreadable state (an I/O error) leaves the message out of the listing for now.
        let stored = self.spool.state(id).ok()?;
        {
            let due = self.lock();
            if due.hold_of(id).is_some() {
                return Some(QueueState::Held);
            }
            if due.is_running(id) {
                return Some(QueueState::Active);
            }
        }
        let sched = Schedule::decode(&stored.queue_data, stored.final_rcpts.len());
        let tried = sched.rcpts.iter().any(|r| r.attempts > 0);
        Some(if tried {
            QueueState::Deferred
        } else {
            QueueState::Queued
        })
    }

    /// Messages in the queue, oldest first, optionally only those with a pending recipient at
    /// `domain` or in `state`. Reads each message (envelopes are sealed with the body): fine
    /// for an operator's command, not for a hot path.
    pub async fn list(&self, domain: Option<&str>, state: Option<QueueState>) -> Vec<ListEntry> {
        let now = self.clock.now();
        let mut entries = Vec::new();
        for id in self.spool.live() {
            let Some(st) = self
                .state_of(id)
                .filter(|s| state.is_none_or(|want| want == *s))
            else {
                continue;
            };
            let Ok((msg, body)) = self.spool.read(id).await.map(StoredMessage::split) else {
                continue;
            };
            let domains = pending_domains(&msg);
            if domain.is_some_and(|d| !domains.iter().any(|x| x.eq_ignore_ascii_case(d))) {
                continue;
            }
            entries.push(ListEntry {
                id: id.to_string(),
                state: st,
                age_seconds: (now - msg.envelope.received_at).max(0),
                size: body.len() as usize,
                pending_recipients: pending(&msg).len(),
                domains,
            });
        }
        entries.sort_by_key(|e| std::cmp::Reverse(e.age_seconds));
        entries
    }

    /// What `postern queue show` prints.
    pub async fn show(&self, id: QueueId) -> Result<MessageView, OpError> {
        let (msg, body) = self.spool.read(id).await?.split();
        let state = self.state_of(id).ok_or(OpError::NotFound)?;
        let env = &msg.envelope;
        let sched = Schedule::decode(&msg.state.queue_data, env.recipients.len());
        let log = |a: &str| match a {
            "" => "<>".to_string(),
            a => self.ledger.log_rcpt(a, &env.sending_domain),
        };
        let recipients = env.recipients.iter().enumerate().map(|(i, r)| {
            let done = msg.state.final_rcpts[i];
            let s = &sched.rcpts[i];
            RcptView {
                rcpt: log(r),
                domain: domain_of(r),
                done,
                attempts: s.attempts,
                next_attempt: (!done).then_some(s.next_attempt),
                last_status: Some(s.last_status.clone()).filter(|x| !x.is_empty()),
                last_remote: s.last_remote.clone(),
            }
        });
        Ok(MessageView {
            id: id.to_string(),
            state,
            hold: self.lock().hold_of(id),
            received_at: env.received_at,
            age_seconds: (self.clock.now() - env.received_at).max(0),
            size: body.len() as usize,
            sender: log(&env.mail_from),
            sending_domain: env.sending_domain.clone(),
            authenticated: env.auth_user.is_some(),
            recipients: recipients.collect(),
        })
    }

    /// Makes the selected messages due now, every pending recipient included; held messages
    /// stay held. Returns how many were flushed.
    pub async fn flush(&self, which: &Selector) -> usize {
        let now = self.clock.now();
        let ids = match which {
            Selector::One(id) => vec![*id],
            Selector::All | Selector::Domain(_) => self.spool.live(),
        };
        let mut flushed = 0;
        for id in ids {
            if !self.spool.contains(id) {
                continue;
            }
            if let Selector::Domain(d) = which {
                let Ok(msg) = self.spool.read_envelope(id).await else {
                    continue;
                };
                if !pending_domains(&msg)
                    .iter()
                    .any(|x| x.eq_ignore_ascii_case(d))
                {
                    continue;
                }
            }
            if self.lock().flush(id, now) {
                flushed += 1;
            }
        }
        self.wake.notify_one();
        flushed
    }

    /// Puts a message on hold, in memory at once and in the spool (so it survives a restart).
    pub async fn hold(&self, id: QueueId, reason: HoldReason) -> Result<(), OpError> {
        if !self.spool.contains(id) {
            return Err(OpError::NotFound);
        }
        let hold = Hold {
            reason,
            since: self.clock.now(),
        };
        self.lock().hold(id, hold);
        if let Err(e) = self.store_hold(id, Some(hold)).await {
            if matches!(e, OpError::NotFound) {
                // The attempt that was running finished it: nothing left to hold.
                self.lock().release(id);
            }
            return Err(e);
        }
        tracing::info!(queue_id = %id, reason = ?reason, "message held");
        Ok(())
    }

    /// Lifts a hold and makes the message due now. The spool is written first: a release that
    /// cannot be stored leaves the message held.
    pub async fn release(&self, id: QueueId) -> Result<(), OpError> {
        if self.lock().hold_of(id).is_none() {
            return Err(match self.spool.contains(id) {
                true => OpError::NotHeld,
                false => OpError::NotFound,
            });
        }
        self.store_hold(id, None).await?;
        let now = self.clock.now();
        let mut due = self.lock();
        due.release(id);
        due.flush(id, now);
        drop(due);
        self.wake.notify_one();
        tracing::info!(queue_id = %id, "message released");
        Ok(())
    }

    /// Removes a message: every pending recipient is recorded as cancelled and the body is
    /// destroyed. Returns how many recipients were pending.
    pub async fn delete(&self, id: QueueId) -> Result<usize, OpError> {
        self.claimed(id, |msg, now| async move {
            let pending = pending(&msg);
            for &i in &pending {
                self.record(&msg, i, Outcome::Cancelled, &Update::default(), now);
            }
            self.spool.update(id, &pending, None).await?;
            tracing::info!(queue_id = %id, rcpts = pending.len(), "message deleted by the operator");
            Ok(pending.len())
        })
        .await
    }

    /// Returns a message to its sender: one failure notice (5.0.0) for every pending recipient,
    /// then the body is destroyed. Returns how many recipients were pending.
    pub async fn bounce(self: &Arc<Self>, id: QueueId) -> Result<usize, OpError> {
        self.claimed(id, |msg, now| async move {
            let outcomes: Vec<RcptOutcome> = pending(&msg)
                .into_iter()
                .map(|index| RcptOutcome {
                    index,
                    ..RcptOutcome::returned()
                })
                .collect();
            let failed: Vec<&RcptOutcome> = outcomes.iter().collect();
            if !self
                .notify_sender(&msg, bounce::Kind::Failure, &failed, now)
                .await
            {
                return Err(OpError::NoticeNotStored);
            }
            for o in &outcomes {
                self.log_outcome(&msg, o);
                self.record(&msg, o.index, Outcome::Bounced, &update_of(o), now);
            }
            let finals: Vec<usize> = outcomes.iter().map(|o| o.index).collect();
            self.spool.update(id, &finals, None).await?;
            Ok(finals.len())
        })
        .await
    }

    /// Runs `action` on a message taken out of the scheduler's hands; if it fails, the message
    /// goes back as it was (held, or due now).
    async fn claimed<F, Fut>(&self, id: QueueId, action: F) -> Result<usize, OpError>
    where
        F: FnOnce(StoredEnvelope, i64) -> Fut,
        Fut: std::future::Future<Output = Result<usize, OpError>>,
    {
        if !self.spool.contains(id) {
            return Err(OpError::NotFound);
        }
        let held = self
            .lock()
            .claim(id)
            .map_err(|Busy::Running| OpError::Running)?;
        let result = match self.spool.read_envelope(id).await {
            Ok(msg) => action(msg, self.clock.now()).await,
            Err(e) => Err(e.into()),
        };
        let mut due = self.lock();
        match (&result, held) {
            (Ok(_), _) => due.finish(id, None),
            (Err(_), Some(hold)) => {
                due.finish(id, None);
                due.hold(id, hold);
            }
            (Err(_), None) => due.finish(id, Some(self.clock.now())),
        }
        result
    }

    /// Writes `hold` into the message's stored retry state.
    async fn store_hold(&self, id: QueueId, hold: Option<Hold>) -> Result<(), OpError> {
        let stored = self.spool.state(id)?;
        let mut sched = Schedule::decode(&stored.queue_data, stored.final_rcpts.len());
        sched.hold = hold;
        // A released message is flushed, i.e. due now.
        let due = match hold {
            Some(_) => NOT_DUE,
            None => self.clock.now(),
        };
        let data = sched.encode();
        self.spool
            .update(id, &[], Some(QueueData { data, due }))
            .await?;
        Ok(())
    }
}

/// Indices of the recipients not yet final.
fn pending(msg: &StoredEnvelope) -> Vec<usize> {
    (0..msg.envelope.recipients.len())
        .filter(|&i| !msg.state.final_rcpts[i])
        .collect()
}

/// Destination domains of the pending recipients, sorted, each once.
fn pending_domains(msg: &StoredEnvelope) -> Vec<String> {
    let mut domains: Vec<String> = pending(msg)
        .into_iter()
        .map(|i| domain_of(&msg.envelope.recipients[i]))
        .collect();
    domains.sort();
    domains.dedup();
    domains
}
