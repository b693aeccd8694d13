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
//! A delivery whose destination has too many others waiting for its connections already is
//! turned away without an attempt ([`RcptOutcome::is_busy`]): its message goes back to the
//! index, holding no place among `max_active_messages`, and the destination wakes it once it
//! has room. One slow destination with a big backlog thus never holds up mail for the others.
//!
//! Time comes from a [`Clock`]: [`Queue::run`] follows it in production, and tests move a
//! [`crate::clock::ManualClock`] and call [`Queue::run_due`].

mod due;
pub(crate) mod inflight;
mod ops;
mod schedule;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use due::Due;
use inflight::{Journal, Suspects};
pub use ops::{ListEntry, MessageView, OpError, QueueCounts, QueueState, RcptView, Selector};
pub use schedule::{Failure, Hold, HoldReason, RcptSchedule, Schedule};

use crate::bounce;
use crate::clock::Clock;
use crate::config::Config;
use crate::delivery::client::Needs;
use crate::delivery::{Content, Deliverer, Job, RcptOutcome, Wake};
use crate::ledger::{Ledger, Outcome, Update};
use crate::memory::{BodyMemory, Holding};
use crate::spool::{
    Body, Envelope, Liveness, QueueData, QueueId, Spool, SpoolError, StoredEnvelope, NOT_DUE,
};

/// A retry after a local error (the spool could not be read or updated).
const LOCAL_RETRY: i64 = 60;

/// When a message turned away by a busy destination is tried again at the latest. The
/// destination wakes it as soon as it has room; this is only for a wake that never comes
/// (the room went to another message), as each try costs a read of its envelope.
const PARK_FALLBACK: i64 = 60;

/// The scheduler over the spool.
pub struct Queue {
    spool: Spool,
    deliverer: Arc<Deliverer>,
    ledger: Arc<Ledger>,
    clock: Arc<dyn Clock>,
    config: Arc<Config>,
    due: Mutex<Due>,
    wake: Notify,
    /// Messages being worked on (`max_active_messages`). Sessions are limited separately, by
    /// the deliverer, and only while one talks to a server.
    active: Arc<Semaphore>,
    /// Message bytes in memory (`limits.max_body_memory`): a message is read only once its
    /// record's size fits (a spilled body is read from its file a chunk at a time).
    memory: Arc<BodyMemory>,
    tasks: TaskTracker,
    /// Cancelled at shutdown: attempts in flight are abandoned (the mail stays in the spool).
    abandon: CancellationToken,
    /// Attempts in flight, for the next start to tell after a crash (see [`inflight`]).
    journal: Mutex<Journal>,
    /// Messages in flight at the last crash: retried one at a time.
    suspects: Suspects,
}

impl Queue {
    /// A queue over every live message of `spool`, each due when its state says; attempts are
    /// journaled in `journal` (from [`inflight::recover`]).
    pub(crate) fn new(
        spool: Spool,
        deliverer: Arc<Deliverer>,
        ledger: Arc<Ledger>,
        clock: Arc<dyn Clock>,
        config: Arc<Config>,
        journal: Journal,
    ) -> Arc<Queue> {
        let queue = Arc::new(Queue {
            journal: Mutex::new(journal),
            suspects: Suspects::new(),
            active: Arc::new(Semaphore::new(config.delivery.max_active_messages.max(1))),
            memory: Arc::new(BodyMemory::new(config.limits.max_body_memory)),
            abandon: CancellationToken::new(),
            spool,
            deliverer,
            ledger,
            clock,
            config,
            due: Mutex::new(Due::default()),
            wake: Notify::new(),
            tasks: TaskTracker::new(),
        });
        queue.schedule_recovered();
        queue
    }

    /// Puts every message of the spool in the due index, at the due time stored with it: no
    /// record is read, except the state of a held message (for its hold).
    fn schedule_recovered(&self) {
        let (due, held): (Vec<_>, Vec<_>) = self
            .spool
            .dues()
            .into_iter()
            .partition(|&(_, due)| due != NOT_DUE);
        self.lock().load(due);
        for (id, _) in held {
            let hold = self.spool.state(id).ok().and_then(|state| {
                Schedule::decode(&state.queue_data, state.final_rcpts.len()).hold
            });
            match hold {
                Some(hold) => drop(self.lock().hold(id, hold)),
                // Not held after all, or unreadable: the attempt reads it again, and keeps a
                // hold it finds.
                None => self.schedule(id, 0),
            }
        }
        self.wake.notify_one();
    }

    /// A message just accepted: due at once.
    pub fn submitted(&self, id: QueueId) {
        self.schedule(id, 0);
    }

    /// Messages waiting (not counting those being processed).
    pub fn len(&self) -> usize {
        self.lock().waiting()
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
        self.lock().schedule(id, when);
        self.wake.notify_one();
    }

    fn next_due(&self) -> Option<i64> {
        self.lock().next_due()
    }

    fn journal(&self) -> std::sync::MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After a crash, before the queue runs: a message in flight at [`inflight::HOLD_AT`]
    /// crashes in a row is held (in the spool, like an operator's hold), one in flight at the
    /// last crash only is a suspect, tried alone. `crashes` is from [`inflight::recover`].
    pub(crate) async fn after_crash(&self, crashes: &HashMap<QueueId, u32>) {
        for (&id, &n) in crashes {
            if !self.spool.contains(id) {
                continue;
            }
            if n < inflight::HOLD_AT {
                self.suspects.add(id);
                continue;
            }
            match self.hold(id, HoldReason::CrashLoop).await {
                Ok(()) => tracing::warn!(
                    queue_id = %id,
                    crashes = n,
                    "message held: its delivery was in progress at {n} crashes in a row; \
                     see `postern queue show {id}`, and `postern queue release {id}` to try it again"
                ),
                Err(e) => tracing::error!(
                    queue_id = %id,
                    crashes = n,
                    error = %e,
                    "message in flight at {n} crashes in a row: held for this run, but the hold \
                     could not be stored"
                ),
            }
        }
    }

    /// A clean stop: the next start is not to take it for a crash.
    pub(crate) fn stopped_cleanly(&self) {
        self.journal().remove();
    }

    /// Starts messages due now, each as its own task, but no more than there are free slots
    /// among `max_active_messages`: the rest stay in the due index, holding no memory beyond
    /// their index entry, until an attempt ends and frees a slot (which wakes the dispatcher).
    /// Those that can run at once are journaled together (one write, with the ends not yet
    /// written) before they run.
    fn dispatch(self: &Arc<Self>) -> Vec<tokio::task::JoinHandle<()>> {
        let now = self.clock.now();
        let ids = self.lock().take_due(now, self.active.available_permits());
        let starts: Vec<(QueueId, Option<OwnedSemaphorePermit>)> =
            ids.into_iter().map(|id| (id, self.free_slot(id))).collect();
        let ready = starts.iter().filter(|(_, slot)| slot.is_some());
        self.journal().started(ready.map(|(id, _)| *id));
        starts
            .into_iter()
            .map(|(id, slot)| self.spawn_attempt(id, slot))
            .collect()
    }

    /// A slot among `max_active_messages` if one is free now, and the message is no suspect.
    fn free_slot(&self, id: QueueId) -> Option<OwnedSemaphorePermit> {
        if self.suspects.contains(id) {
            return None;
        }
        self.active.clone().try_acquire_owned().ok()
    }

    /// One attempt as its own task; without a `slot`, it waits for its turn first.
    fn spawn_attempt(
        self: &Arc<Self>,
        id: QueueId,
        slot: Option<OwnedSemaphorePermit>,
    ) -> tokio::task::JoinHandle<()> {
        let queue = self.clone();
        self.tasks.spawn(async move {
            let mut running = Running {
                queue: &queue,
                id,
                decided: false,
                _slot: None,
                _turn: None,
            };
            match slot {
                Some(slot) => running._slot = Some(slot),
                None => {
                    running._turn = queue.suspects.turn(id).await;
                    running._slot = queue.active.clone().acquire_owned().await.ok();
                    queue.journal().started([id]);
                }
            }
            queue.process(id).await;
            running.decided = true;
        })
    }

    /// Processes every message due at the clock's current time, including bounces they cause,
    /// and returns when all are done. For tests and tools driving a manual clock.
    pub async fn run_due(self: &Arc<Self>) -> usize {
        let mut total = 0;
        loop {
            let handles = self.dispatch();
            if handles.is_empty() {
                self.journal().flush();
                return total;
            }
            total += handles.len();
            for h in handles {
                let _ = h.await;
            }
        }
    }

    /// Runs until `shutdown`, then abandons attempts in flight and waits (up to `grace`) for
    /// the work that records state to finish. The caller then marks the stop clean
    /// ([`Queue::stopped_cleanly`]).
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken, grace: Duration) {
        loop {
            self.dispatch();
            let now = self.clock.now();
            // Sleep to the next due time, but wake now and then: the clock may jump. Ends of
            // attempts waiting to be journaled are written within a second.
            let wait = match self.journal().has_pending() {
                true => 1,
                false => self.next_due().map_or(60, |t| (t - now).clamp(0, 60)) as u64,
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(wait.max(1))) => {}
            }
        }
        self.abandon.cancel();
        self.tasks.close();
        let deadline = tokio::time::Instant::now() + grace;
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                "shutdown: queue work still running after the grace period; it will be retried"
            );
        }
        // Polite QUITs to idle connections, but not past the grace period.
        let _ = tokio::time::timeout_at(deadline, self.deliverer.close_idle()).await;
    }

    /// One attempt at one message: who is due, the attempt, what follows from each outcome,
    /// the notices, and the new state in the spool. Only the envelope is read here: each
    /// delivery reads the body when its destination's turn comes ([`Stored`]).
    async fn process(self: &Arc<Self>, id: QueueId) {
        let msg = match self.spool.read_envelope(id).await {
            Ok(m) => m,
            Err(SpoolError::NotFound) => return,
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "cannot read message; will retry");
                self.schedule(id, self.clock.now() + LOCAL_RETRY);
                return;
            }
        };
        let now = self.clock.now();
        let mut sched = Schedule::decode(&msg.state.queue_data, msg.envelope.recipients.len());
        // Held in the spool but not in the index (its state could not be read at start): the
        // stored hold wins.
        if let Some(hold) = sched.hold {
            let mut due = self.lock();
            if due.hold_of(id).is_none() {
                due.hold(id, hold);
                return;
            }
        }
        let forced = self.lock().take_forced(id);
        let lifetime = self.config.delivery.max_queue_lifetime.as_secs() as i64;
        let expires_at = msg.envelope.received_at.saturating_add(lifetime);

        let (suppressed, pending) = self.due_recipients(&msg, &sched, now, forced);
        let mut finals = self.drop_suppressed(&msg, &suppressed, now);
        let outcomes: Vec<RcptOutcome> = if now >= expires_at {
            let expiry = |&i: &usize| RcptOutcome {
                index: i,
                ..expired(&sched.rcpts[i])
            };
            pending.iter().map(expiry).collect()
        } else {
            // At shutdown the attempt is dropped where it stands: nothing is recorded, the
            // message stays as it was in the spool and is retried after the restart.
            tokio::select! {
                o = self.attempt(&msg, &pending) => o,
                _ = self.abandon.cancelled() => {
                    self.schedule(id, now + LOCAL_RETRY);
                    return;
                }
            }
        };
        // Recipients whose destination was busy were not tried: nothing to record of them.
        let (busy, outcomes): (Vec<_>, Vec<_>) =
            outcomes.into_iter().partition(RcptOutcome::is_busy);
        // What follows dates from the end of the attempt: a slow failure must not make the
        // next retry come early.
        let now = self.clock.now();
        if outcomes.is_empty() && finals.is_empty() && !busy.is_empty() {
            // Only parked: its state has not changed. The destination wakes it.
            self.schedule(id, now + PARK_FALLBACK);
            return;
        }
        let failed = self.apply(&msg, &outcomes, &mut sched, &mut finals, expires_at, now);
        // Boxed, as is the commit: their futures would otherwise make that of every attempt
        // bigger, and thousands may wait at once for their destination.
        Box::pin(self.send_notices(&msg, &outcomes, &failed, &mut sched, &mut finals, now)).await;
        // A hold placed while the attempt ran is kept (the index already has it).
        sched.hold = self.lock().hold_of(id);
        let parked: Vec<usize> = busy.iter().map(|o| o.index).collect();
        Box::pin(self.commit(&msg, &finals, &parked, &sched, now)).await;
    }

    /// A destination that turned `id` away has room: it is due now (see [`PARK_FALLBACK`]).
    fn wake_parked(&self, id: QueueId) {
        self.lock().wake(id, self.clock.now());
        self.wake.notify_one();
    }

    /// Reads a message's body once its record's bytes fit under `limits.max_body_memory` (all
    /// of it, for a message bigger than that), holding them until the body goes. None when the
    /// message is gone or cannot be read.
    async fn load_body(&self, id: QueueId) -> Option<Holding<Body>> {
        let held = self.memory.hold(self.spool.size(id)?).await;
        match self.spool.read_body(id).await {
            Ok(body) => Some(held.keeping(body)),
            Err(e) => {
                tracing::error!(queue_id = %id, error = %e, "cannot read message body; will retry");
                None
            }
        }
    }

    /// Pending recipients due now (all of them after a flush), split into those suppressed
    /// since the message was accepted and those to try.
    fn due_recipients(
        &self,
        msg: &StoredEnvelope,
        sched: &Schedule,
        now: i64,
        forced: bool,
    ) -> (Vec<usize>, Vec<usize>) {
        (0..msg.envelope.recipients.len())
            .filter(|&i| !msg.state.final_rcpts[i])
            .filter(|&i| forced || sched.rcpts[i].next_attempt <= now)
            .partition(|&i| {
                matches!(
                    self.ledger.suppress.check(&msg.envelope.recipients[i], now),
                    Ok(Some(_))
                )
            })
    }

    /// Suppressed recipients are dropped: no delivery, no notice. Returns them, now final.
    fn drop_suppressed(&self, msg: &StoredEnvelope, suppressed: &[usize], now: i64) -> Vec<usize> {
        for &i in suppressed {
            let rcpt = self
                .ledger
                .log_rcpt(&msg.envelope.recipients[i], &msg.envelope.sending_domain);
            tracing::info!(queue_id = %msg.id, rcpt = %rcpt, "suppressed: recipient dropped");
            self.record(msg, i, Outcome::Suppressed, &Update::default(), now);
        }
        suppressed.to_vec()
    }

    /// Logs and records each outcome; delivered and failed recipients join `finals`, deferred
    /// ones get their next retry. Returns the failures, for the sender's notice.
    fn apply<'o>(
        &self,
        msg: &StoredEnvelope,
        outcomes: &'o [RcptOutcome],
        sched: &mut Schedule,
        finals: &mut Vec<usize>,
        expires_at: i64,
        now: i64,
    ) -> Vec<&'o RcptOutcome> {
        let mut failed = Vec::new();
        for o in outcomes {
            let rcpt = &msg.envelope.recipients[o.index];
            self.log_outcome(msg, o);
            count_outcome(msg, o, now);
            self.record(msg, o.index, ledger_outcome(o), &update_of(o), now);
            if o.is_delivered() {
                finals.push(o.index);
                let _ = self.ledger.suppress.delivered(rcpt);
            } else if o.is_permanent() {
                finals.push(o.index);
                failed.push(o);
                // A remote 5xx about the mailbox is a hard bounce; enough in a row suppress it.
                if o.is_hard_bounce() {
                    if let Ok(true) = self.ledger.suppress.hard_bounce(rcpt, now) {
                        let who = self.ledger.log_rcpt(rcpt, &msg.envelope.sending_domain);
                        tracing::info!(rcpt = %who, "suppressed after repeated hard bounces");
                    }
                }
            } else {
                let failure = schedule::Failure {
                    status: &o.status.to_string(),
                    diagnostic: &o.diagnostic(),
                    remote: o.remote.as_deref(),
                };
                let retry = &self.config.delivery.retry_schedule;
                sched.deferred(o.index, now, retry, expires_at, failure);
            }
        }
        failed
    }

    /// The failure notice, and the delay warning once `delay_warning` has passed. Notices are
    /// stored before the original's state changes: a crash in between sends a notice twice,
    /// never not at all. A failure notice that cannot be stored (the disk is full) keeps its
    /// recipients pending, to be tried again after [`LOCAL_RETRY`]: never final without one.
    async fn send_notices(
        self: &Arc<Self>,
        msg: &StoredEnvelope,
        outcomes: &[RcptOutcome],
        failed: &[&RcptOutcome],
        sched: &mut Schedule,
        finals: &mut Vec<usize>,
        now: i64,
    ) {
        if !failed.is_empty()
            && !self
                .notify_sender(msg, bounce::Kind::Failure, failed, now)
                .await
        {
            for o in failed {
                finals.retain(|&i| i != o.index);
                if let Some(r) = sched.rcpts.get_mut(o.index) {
                    r.next_attempt = now + LOCAL_RETRY;
                }
            }
        }
        let still_pending: Vec<&RcptOutcome> =
            outcomes.iter().filter(|o| o.is_transient()).collect();
        let Some(after) = self.config.delivery.delay_warning else {
            return;
        };
        if !sched.warned
            && !still_pending.is_empty()
            && now - msg.envelope.received_at >= after.as_secs() as i64
        {
            sched.warned = self
                .notify_sender(msg, bounce::Kind::Delay, &still_pending, now)
                .await;
        }
    }

    /// Writes the new state; the spool destroys the body once every recipient is final. The
    /// `parked` recipients (their destination was busy) are due when it wakes them, or after
    /// [`PARK_FALLBACK`].
    async fn commit(
        &self,
        msg: &StoredEnvelope,
        finals: &[usize],
        parked: &[usize],
        sched: &Schedule,
        now: i64,
    ) {
        let id = msg.id;
        let mut final_rcpts = msg.state.final_rcpts.clone();
        for &i in finals {
            if let Some(done) = final_rcpts.get_mut(i) {
                *done = true;
            }
        }
        let next = next_due(sched, &final_rcpts, parked, now);
        let data = QueueData {
            data: sched.encode(),
            due: match sched.hold {
                Some(_) => NOT_DUE,
                None => next.unwrap_or(0),
            },
        };
        match self.spool.update(id, finals, Some(data)).await {
            Ok(Liveness::Destroyed) => {
                tracing::debug!(queue_id = %id, "all recipients final; message destroyed")
            }
            Ok(Liveness::Live) => {
                if let Some(when) = next {
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
    /// A destination with too many deliveries waiting already turns its recipients away
    /// ([`RcptOutcome::busy`]), and wakes the message once it has room.
    async fn attempt(
        self: &Arc<Self>,
        msg: &StoredEnvelope,
        pending: &[usize],
    ) -> Vec<RcptOutcome> {
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
        let content = Stored {
            queue: self,
            id: msg.id,
        };
        let (queue, id) = (Arc::downgrade(self), msg.id);
        let park = move || -> Wake {
            let queue = queue.clone();
            Box::new(move || {
                if let Some(queue) = queue.upgrade() {
                    queue.wake_parked(id);
                }
            })
        };
        let jobs = groups.iter().map(|(domain, rcpts)| {
            self.deliverer.deliver(Job {
                domain,
                from: &msg.envelope.mail_from,
                rcpts: rcpts.clone(),
                content: &content,
                needs,
                park: Some(&park),
            })
        });
        futures::future::join_all(jobs)
            .await
            .into_iter()
            .flatten()
            .collect()
    }

    /// Stores and queues a DSN to the sender; none for the null sender (no bounce loops).
    /// False when the notice was due but could not be stored.
    async fn notify_sender(
        self: &Arc<Self>,
        msg: &StoredEnvelope,
        kind: bounce::Kind,
        outcomes: &[&RcptOutcome],
        now: i64,
    ) -> bool {
        if msg.envelope.mail_from.is_empty() {
            tracing::info!(queue_id = %msg.id, "not notifying: the message had the null sender");
            return true;
        }
        // The notice's text fields, owned here and borrowed by the entries.
        let texts: Vec<(String, String)> = outcomes
            .iter()
            .map(|o| (o.status.to_string(), o.diagnostic()))
            .collect();
        let entries: Vec<bounce::Entry<'_>> = outcomes
            .iter()
            .zip(&texts)
            .map(|(o, (status, diagnostic))| bounce::Entry {
                rcpt: &msg.envelope.recipients[o.index],
                status,
                diagnostic,
                remote: o.remote.as_deref(),
            })
            .collect();
        // The notice quotes the message's header section, so its body is read again.
        let original = match self.spool.read_body(msg.id).await {
            Ok(body) => body,
            Err(e) => {
                tracing::error!(queue_id = %msg.id, error = %e, "cannot read message for its delivery notice; will retry");
                return false;
            }
        };
        let date = chrono::DateTime::from_timestamp(now, 0).unwrap_or_else(chrono::Utc::now);
        let seed = rand::random::<u64>();
        let host = &self.config.server.hostname;
        let body = bounce::build(&bounce::Notice {
            kind,
            hostname: host,
            queue_id: &msg.id.to_string(),
            envelope: &msg.envelope,
            original: original.start(),
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
                true
            }
            Err(e) => {
                tracing::error!(queue_id = %msg.id, error = %e, "cannot store delivery notice; will retry");
                false
            }
        }
    }
}

/// A message's body for its deliveries: read (under `limits.max_body_memory`) by each one
/// once it has its destination's turn, and let go when its transaction ends.
struct Stored<'q> {
    queue: &'q Queue,
    id: QueueId,
}

impl Content for Stored<'_> {
    fn load(&self) -> BoxFuture<'_, Option<Holding<Body>>> {
        Box::pin(self.queue.load_body(self.id))
    }
}

/// A message being processed; dropping it marks the message finished in the index, also when
/// the attempt is abandoned half way (shutdown): then it comes back after [`LOCAL_RETRY`].
struct Running<'a> {
    queue: &'a Queue,
    id: QueueId,
    /// `process` ran to its end and scheduled (or destroyed) the message itself.
    decided: bool,
    /// Its slot among `max_active_messages`, and a suspect's turn: given up after the end is
    /// journaled (fields drop after `drop`), so the next suspect's start is written with it.
    _slot: Option<OwnedSemaphorePermit>,
    _turn: Option<inflight::Turn>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.queue.journal().ended(self.id, self._turn.is_some());
        let fallback = (!self.decided).then(|| self.queue.clock.now() + LOCAL_RETRY);
        self.queue.lock().finish(self.id, fallback);
        // The slot goes back before the dispatcher is woken, so that it finds it free.
        drop(self._slot.take());
        // A reschedule parked while it ran is now due, and a slot is free: look again.
        self.queue.wake.notify_one();
    }
}

/// When a message is next due: its earliest pending recipient's retry, but no later than
/// [`PARK_FALLBACK`] from `now` for recipients `parked` by a busy destination (due already
/// by their own retry times, they wait for the destination's wake instead).
fn next_due(sched: &Schedule, final_rcpts: &[bool], parked: &[usize], now: i64) -> Option<i64> {
    if parked.is_empty() {
        return sched.next_due(final_rcpts);
    }
    let mut others = final_rcpts.to_vec();
    for &i in parked {
        if let Some(skip) = others.get_mut(i) {
            *skip = true;
        }
    }
    let fallback = now + PARK_FALLBACK;
    Some(
        sched
            .next_due(&others)
            .map_or(fallback, |t| t.min(fallback)),
    )
}

/// The expiry of a recipient, reporting its last temporary failure.
fn expired(r: &RcptSchedule) -> RcptOutcome {
    let last = Some(r.last_diagnostic.clone()).filter(|d| !d.is_empty());
    RcptOutcome {
        remote: r.last_remote.clone(),
        ..RcptOutcome::expired(last)
    }
}

/// How the ledger files an outcome.
fn ledger_outcome(o: &RcptOutcome) -> Outcome {
    if o.is_delivered() {
        Outcome::Delivered
    } else if o.is_expired() {
        Outcome::Expired
    } else if o.is_permanent() {
        Outcome::Bounced
    } else {
        Outcome::Deferred
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
        msg: &StoredEnvelope,
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

    fn log_outcome(&self, msg: &StoredEnvelope, o: &RcptOutcome) {
        let rcpt = self.ledger.log_rcpt(
            &msg.envelope.recipients[o.index],
            &msg.envelope.sending_domain,
        );
        log_outcome(msg.id, &rcpt, o);
    }
}

/// The outcome in the metrics: by result and destination domain, never by address.
/// Nothing is prepared (no domain copied, no label looked up) when metrics are off.
fn count_outcome(msg: &StoredEnvelope, o: &RcptOutcome, now: i64) {
    use crate::metrics::Delivery;
    if !crate::metrics::enabled() {
        return;
    }
    let result = if o.is_delivered() {
        Delivery::Delivered
    } else if o.is_transient() {
        Delivery::Deferred
    } else {
        Delivery::Bounced
    };
    let age = Duration::from_secs((now - msg.envelope.received_at).max(0) as u64);
    let domain = domain_of(&msg.envelope.recipients[o.index]);
    crate::metrics::delivery(result, &domain, o.tls.is_some(), age);
}

fn update_of(o: &RcptOutcome) -> Update {
    Update {
        code: Some(o.status.to_string()),
        text: Some(o.diagnostic()),
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
    // The status code only: the reply text may quote the address.
    let status = o.status;
    if o.is_delivered() {
        tracing::info!(queue_id = %id, rcpt, remote, tls, verified, %status, "delivered")
    } else if o.is_transient() {
        tracing::info!(queue_id = %id, rcpt, remote, %status, "deferred")
    } else {
        tracing::info!(queue_id = %id, rcpt, remote, %status, "bounced")
    }
}
