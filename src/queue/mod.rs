//! The queue: which message to try when, and what follows from each attempt.
//!
//! Messages wait in a due-time index (in memory, rebuilt from the spool at start). When one is
//! due, its pending recipients are grouped by domain and each group is handed to the
//! [`Deliverer`] as one transaction. Delivered and permanently failed recipients become final;
//! the others are rescheduled on `delivery.retry_schedule` until `max_queue_lifetime`, when they
//! expire (4.4.7). Permanent failures and expiries send one DSN to the sender. The state change
//! goes to the spool in the same pass, and the spool destroys the body when the last recipient
//! is final (design invariant 2).
//!
//! Time comes from a [`Clock`]: [`Queue::run`] follows it in production, and tests move a
//! [`crate::clock::ManualClock`] and call [`Queue::run_due`].

mod schedule;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use schedule::{RcptSchedule, Schedule};

use crate::bounce;
use crate::clock::Clock;
use crate::config::Config;
use crate::delivery::client::Needs;
use crate::delivery::{Deliverer, Job, RcptOutcome, Status};
use crate::ledger::{Ledger, Outcome, Update};
use crate::spool::{Envelope, Liveness, QueueId, Spool, SpoolError, StoredMessage};

/// A retry after a local error (the spool could not be read or updated).
const LOCAL_RETRY: i64 = 60;

#[derive(Default)]
struct Due {
    /// (due time, id), earliest first.
    order: BTreeSet<(i64, QueueId)>,
    /// Each id's entry in `order`, so rescheduling replaces rather than duplicates.
    at: HashMap<QueueId, i64>,
    /// Being processed now; not to be dispatched twice.
    running: HashSet<QueueId>,
}

/// The scheduler over the spool.
pub struct Queue {
    spool: Spool,
    deliverer: Arc<Deliverer>,
    ledger: Arc<Ledger>,
    clock: Arc<dyn Clock>,
    config: Arc<Config>,
    due: Mutex<Due>,
    wake: Notify,
    slots: Arc<Semaphore>,
    tasks: TaskTracker,
}

impl Queue {
    /// A queue over every live message of `spool`, each due when its state says.
    pub fn new(
        spool: Spool,
        deliverer: Arc<Deliverer>,
        ledger: Arc<Ledger>,
        clock: Arc<dyn Clock>,
        config: Arc<Config>,
    ) -> Arc<Queue> {
        let queue = Arc::new(Queue {
            slots: Arc::new(Semaphore::new(config.delivery.max_in_flight)),
            spool,
            deliverer,
            ledger,
            clock,
            config,
            due: Mutex::new(Due::default()),
            wake: Notify::new(),
            tasks: TaskTracker::new(),
        });
        for id in queue.spool.live() {
            let when = queue
                .spool
                .state(id)
                .and_then(|s| {
                    Schedule::decode(&s.queue_data, s.final_rcpts.len()).next_due(&s.final_rcpts)
                })
                .unwrap_or(0);
            queue.schedule(id, when);
        }
        queue
    }

    /// A message just accepted: due at once.
    pub fn submitted(&self, id: QueueId) {
        self.schedule(id, 0);
    }

    /// Messages waiting (not counting those being processed).
    pub fn len(&self) -> usize {
        self.lock().at.len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The deliverer (for its pool statistics).
    pub fn deliverer(&self) -> &Deliverer {
        &self.deliverer
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Due> {
        self.due.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn schedule(&self, id: QueueId, when: i64) {
        let mut due = self.lock();
        if let Some(old) = due.at.insert(id, when) {
            due.order.remove(&(old, id));
        }
        due.order.insert((when, id));
        drop(due);
        self.wake.notify_one();
    }

    /// Takes every message due at `now` that is not already running.
    fn take_due(&self, now: i64) -> Vec<QueueId> {
        let mut due = self.lock();
        let mut ids = Vec::new();
        while let Some(&(when, id)) = due.order.first() {
            if when > now {
                break;
            }
            due.order.pop_first();
            due.at.remove(&id);
            if due.running.insert(id) {
                ids.push(id);
            }
        }
        ids
    }

    fn next_due(&self) -> Option<i64> {
        self.lock().order.first().map(|(t, _)| *t)
    }

    /// Starts every message due now, each as its own task.
    fn dispatch(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let now = self.clock.now();
        self.take_due(now)
            .into_iter()
            .map(|id| {
                let queue = self.clone();
                self.tasks.spawn(async move {
                    let _slot = queue.slots.clone().acquire_owned().await;
                    queue.process(id).await;
                    queue.lock().running.remove(&id);
                })
            })
            .collect()
    }

    /// Processes every message due at the clock's current time, including bounces they cause,
    /// and returns when all are done. For tests and tools driving a manual clock.
    pub async fn run_due(self: &Arc<Self>) -> usize {
        let mut total = 0;
        loop {
            let handles = self.dispatch();
            if handles.is_empty() {
                return total;
            }
            total += handles.len();
            for h in handles {
                let _ = h.await;
            }
        }
    }

    /// Runs until `shutdown`, then waits (up to `drain`) for deliveries in progress.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, drain: Duration) {
        loop {
            self.dispatch();
            let now = self.clock.now();
            // Sleep to the next due time, but wake now and then: the clock may jump.
            let wait = self.next_due().map_or(60, |t| (t - now).clamp(0, 60)) as u64;
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(wait.max(1))) => {}
            }
        }
        self.tasks.close();
        if tokio::time::timeout(drain, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "shutdown: deliveries still running after the drain period; they will be retried"
            );
        }
        self.deliverer.close_idle().await;
    }

    /// One attempt at one message.
    async fn process(self: &Arc<Self>, id: QueueId) {
        let msg = match self.spool.read(id).await {
            Ok(m) => m,
            Err(SpoolError::NotFound) => return,
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "cannot read message; will retry");
                self.schedule(id, self.clock.now() + LOCAL_RETRY);
                return;
            }
        };
        let now = self.clock.now();
        let n = msg.envelope.recipients.len();
        let mut sched = Schedule::decode(&msg.state.queue_data, n);
        let lifetime = self.config.delivery.max_queue_lifetime.as_secs() as i64;
        let expires_at = msg.envelope.received_at.saturating_add(lifetime);

        let due: Vec<usize> = (0..n)
            .filter(|&i| !msg.state.final_rcpts[i] && sched.rcpts[i].next_attempt <= now)
            .collect();
        // Suppressed since the message was accepted: dropped, no delivery, no notice.
        let (suppressed, pending): (Vec<usize>, Vec<usize>) = due.into_iter().partition(|&i| {
            matches!(
                self.ledger.suppress.check(&msg.envelope.recipients[i], now),
                Ok(Some(_))
            )
        });
        let mut finals: Vec<usize> = Vec::new();
        for &i in &suppressed {
            finals.push(i);
            let rcpt = self
                .ledger
                .log_rcpt(&msg.envelope.recipients[i], &msg.envelope.sending_domain);
            tracing::info!(queue_id = %id, rcpt = %rcpt, "suppressed: recipient dropped");
            self.record(&msg, i, Outcome::Suppressed, &Update::default(), now);
        }
        let mut outcomes: Vec<RcptOutcome> = Vec::new();
        if now >= expires_at {
            outcomes.extend(pending.iter().map(|&i| expired(i, &sched.rcpts[i])));
        } else {
            outcomes.extend(self.attempt(&msg, &pending).await);
        }

        let mut failed = Vec::new();
        for o in &outcomes {
            let rcpt = &msg.envelope.recipients[o.index];
            self.log_outcome(&msg, o);
            let outcome = match o.status {
                Status::Delivered => Outcome::Delivered,
                Status::Temporary => Outcome::Deferred,
                Status::Permanent if o.code == "4.4.7" => Outcome::Expired,
                Status::Permanent => Outcome::Bounced,
            };
            self.record(&msg, o.index, outcome, &update_of(o), now);
            match o.status {
                Status::Delivered => {
                    finals.push(o.index);
                    let _ = self.ledger.suppress.delivered(rcpt);
                }
                Status::Permanent => {
                    finals.push(o.index);
                    failed.push(o);
                    // A remote 5xx about the mailbox is a hard bounce; enough in a row suppress it.
                    if o.diagnostic.starts_with("smtp; 5") && o.code.starts_with("5.1.") {
                        if let Ok(true) = self.ledger.suppress.hard_bounce(rcpt, now) {
                            let who = self.ledger.log_rcpt(rcpt, &msg.envelope.sending_domain);
                            tracing::info!(rcpt = %who, "suppressed after repeated hard bounces");
                        }
                    }
                }
                Status::Temporary => sched.deferred(
                    o.index,
                    now,
                    &self.config.delivery.retry_schedule,
                    expires_at,
                    schedule::Failure {
                        status: &o.code,
                        diagnostic: &o.diagnostic,
                        remote: o.remote.as_deref(),
                    },
                ),
            }
        }

        // Notices are stored before the original's state changes: a crash in between sends a
        // notice twice, never not at all.
        if !failed.is_empty() {
            self.notify_sender(&msg, bounce::Kind::Failure, &failed, now)
                .await;
        }
        let still_pending: Vec<&RcptOutcome> = outcomes
            .iter()
            .filter(|o| o.status == Status::Temporary)
            .collect();
        if let Some(after) = self.config.delivery.delay_warning {
            if !sched.warned
                && !still_pending.is_empty()
                && now - msg.envelope.received_at >= after.as_secs() as i64
            {
                self.notify_sender(&msg, bounce::Kind::Delay, &still_pending, now)
                    .await;
                sched.warned = true;
            }
        }

        match self.spool.update(id, &finals, Some(sched.encode())).await {
            Ok(Liveness::Destroyed) => {
                tracing::debug!(queue_id = %id, "all recipients final; message destroyed")
            }
            Ok(Liveness::Live) => {
                let mut final_rcpts = msg.state.final_rcpts.clone();
                for &i in &finals {
                    final_rcpts[i] = true;
                }
                if let Some(when) = sched.next_due(&final_rcpts) {
                    self.schedule(id, when);
                }
            }
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "cannot record delivery state; will retry");
                self.schedule(id, now + LOCAL_RETRY);
            }
        }
    }

    /// Delivers to `pending` recipients, one transaction per domain (or one via smarthost).
    async fn attempt(&self, msg: &StoredMessage, pending: &[usize]) -> Vec<RcptOutcome> {
        let smarthost = !self.config.delivery.smarthost.to_vec().is_empty();
        let mut groups: Vec<(String, Vec<(usize, &str)>)> = Vec::new();
        for &i in pending {
            let rcpt = msg.envelope.recipients[i].as_str();
            let domain = if smarthost {
                String::new()
            } else {
                domain_of(rcpt)
            };
            match groups.iter_mut().find(|(d, _)| *d == domain) {
                Some((_, list)) => list.push((i, rcpt)),
                None => groups.push((domain, vec![(i, rcpt)])),
            }
        }
        let needs = Needs {
            eight_bit: msg.envelope.eight_bit,
            smtputf8: msg.envelope.smtputf8,
        };
        let jobs = groups.iter().map(|(domain, rcpts)| {
            self.deliverer.deliver(Job {
                domain,
                from: &msg.envelope.mail_from,
                rcpts: rcpts.clone(),
                body: &msg.body,
                needs,
            })
        });
        futures::future::join_all(jobs)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Stores and queues a DSN to the sender; none for the null sender (no bounce loops).
    async fn notify_sender(
        self: &Arc<Self>,
        msg: &StoredMessage,
        kind: bounce::Kind,
        outcomes: &[&RcptOutcome],
        now: i64,
    ) {
        if msg.envelope.mail_from.is_empty() {
            tracing::info!(queue_id = %msg.id, "not notifying: the message had the null sender");
            return;
        }
        let entries: Vec<bounce::Entry<'_>> = outcomes
            .iter()
            .map(|o| bounce::Entry {
                rcpt: &msg.envelope.recipients[o.index],
                status: &o.code,
                diagnostic: &o.diagnostic,
                remote: o.remote.as_deref(),
            })
            .collect();
        let date = chrono::DateTime::from_timestamp(now, 0).unwrap_or_else(chrono::Utc::now);
        let seed = rand::random::<u64>();
        let host = &self.config.server.hostname;
        let body = bounce::build(&bounce::Notice {
            kind,
            hostname: host,
            queue_id: &msg.id.to_string(),
            envelope: &msg.envelope,
            original: &msg.body,
            entries: &entries,
            now: date,
            boundary_seed: seed,
        });
        let envelope = Envelope {
            mail_from: String::new(),
            recipients: vec![msg.envelope.mail_from.clone()],
            received_at: now,
            client_ip: std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
            helo: host.clone(),
            auth_user: None,
            eight_bit: true,
            smtputf8: !msg.envelope.mail_from.is_ascii(),
            sending_domain: self.config.server.hostname.clone(),
        };
        let stored = match QueueId::generate() {
            Ok(dsn_id) => self
                .spool
                .store(dsn_id, &envelope, &[&body])
                .await
                .map(|()| dsn_id),
            Err(e) => Err(e.into()),
        };
        match stored {
            Ok(dsn_id) => {
                tracing::info!(queue_id = %msg.id, dsn = %dsn_id, kind = ?kind, rcpts = entries.len(), "notice queued for the sender");
                self.schedule(dsn_id, now);
            }
            Err(e) => {
                tracing::error!(queue_id = %msg.id, error = %e, "cannot store delivery notice")
            }
        }
    }
}

fn expired(index: usize, r: &RcptSchedule) -> RcptOutcome {
    let diagnostic = if r.last_diagnostic.is_empty() {
        "x-postern; delivery time expired".to_string()
    } else {
        r.last_diagnostic.clone()
    };
    RcptOutcome {
        index,
        status: Status::Permanent,
        code: "4.4.7".into(),
        diagnostic,
        remote: r.last_remote.clone(),
        remote_ip: None,
        tls: None,
    }
}

/// The domain part, lower case (address literals kept as written).
pub fn domain_of(addr: &str) -> String {
    addr.rsplit_once('@')
        .map_or(String::new(), |(_, d)| d.to_lowercase())
}

impl Queue {
    /// Writes an outcome to the ledger; a ledger failure is logged, never fatal to delivery.
    fn record(
        &self,
        msg: &StoredMessage,
        index: usize,
        outcome: Outcome,
        update: &Update,
        now: i64,
    ) {
        if let Err(e) = self
            .ledger
            .outcome(msg.id, &msg.envelope, index, outcome, update, now)
        {
            tracing::error!(queue_id = %msg.id, error = %e, "ledger write failed");
        }
    }

    fn log_outcome(&self, msg: &StoredMessage, o: &RcptOutcome) {
        let rcpt = self.ledger.log_rcpt(
            &msg.envelope.recipients[o.index],
            &msg.envelope.sending_domain,
        );
        log_outcome(msg.id, &rcpt, o);
    }
}

fn update_of(o: &RcptOutcome) -> Update {
    Update {
        code: Some(o.code.clone()),
        text: Some(o.diagnostic.clone()),
        remote_host: o.remote.clone(),
        remote_ip: o.remote_ip.map(|a| a.to_string()),
        tls: o.tls.as_ref().map(|t| t.version_cipher.clone()),
        tls_verified: o.tls.as_ref().map(|t| t.verified),
    }
}

/// `rcpt` is already in its log form (pseudonym, clear or "-", per `privacy.log_addresses`).
fn log_outcome(id: QueueId, rcpt: &str, o: &RcptOutcome) {
    let tls = o
        .tls
        .as_ref()
        .map(|t| t.version_cipher.as_str())
        .unwrap_or("none");
    let verified = o.tls.as_ref().is_some_and(|t| t.verified);
    let remote = o.remote.as_deref().unwrap_or("-");
    match o.status {
        Status::Delivered => {
            tracing::info!(queue_id = %id, rcpt, remote, tls, verified, status = %o.code, "delivered")
        }
        Status::Temporary => {
            tracing::info!(queue_id = %id, rcpt, remote, status = %o.code, "deferred")
        }
        Status::Permanent => {
            tracing::info!(queue_id = %id, rcpt, remote, status = %o.code, "bounced")
        }
    }
}
