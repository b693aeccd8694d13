//! The writer's inbox: a queue of requests that wakes the writer only when a pass is due.
//!
//! A store must start a pass at once: a client waits for its `250` until the record is synced.
//! A state update need not: the queue waits for its answer, but nobody else does, and a few
//! milliseconds later it rides along with the next store's pass, whose sync covers it for free.
//! Waking the writer thread costs a `futex` call on the sender's side and a context switch on
//! the writer's; under load, updates (one per delivered message) would otherwise wake it about
//! as often as stores. So an update wakes the writer only when it sleeps with nothing due; it
//! then waits at most [`UPDATE_DELAY`] for a store to share the pass with.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::writer::Request;

/// How long an update may wait for a store's pass before it gets a pass of its own. The window
/// in which a crash makes a delivered recipient get its message again grows by this much (see
/// [`super::writer`] on punches); it is well under the time a remote server takes to answer.
pub(super) const UPDATE_DELAY: Duration = Duration::from_millis(2);

/// Caps on one batch, so one pass never holds an unbounded amount of memory.
const MAX_BATCH: usize = 4096;
const MAX_BATCH_BYTES: usize = 64 << 20;

/// Requests from sessions and the queue to the writer thread.
pub(super) struct Inbox {
    queue: Mutex<Queue>,
    /// Signalled only when the writer waits on it ([`Queue::waiting`]): a signal nobody waits
    /// for still costs a system call.
    ready: Condvar,
}

#[derive(Default)]
struct Queue {
    requests: VecDeque<Request>,
    /// Requests in `requests` that want a pass at once (all but updates).
    urgent: usize,
    /// When the oldest update still queued arrived.
    oldest_update: Option<Instant>,
    /// The writer sleeps on `ready` (and so must be signalled).
    waiting: bool,
    /// Every handle to the spool is gone: the writer finishes what is queued, then stops.
    closed: bool,
}

/// A new inbox's two sides, as `mpsc::channel` makes them: the spool's handles send, the
/// writer thread receives.
pub(super) fn channel() -> (Sender, Receiver) {
    let inbox = Arc::new(Inbox::new());
    (Sender(inbox.clone()), Receiver(inbox))
}

/// The sending side, shared by every handle to the spool. Dropped with the last one, it closes
/// the inbox: the writer finishes what is queued, then stops.
pub(super) struct Sender(Arc<Inbox>);

impl Sender {
    pub(super) fn send(&self, request: Request) -> Result<(), Closed> {
        self.0.send(request)
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// The writer thread's side. Dropped when the writer ends (a panic included), it abandons the
/// inbox: every request still queued or sent later fails instead of waiting for an answer.
pub(super) struct Receiver(Arc<Inbox>);

impl Receiver {
    pub(super) fn next(&self, backlog: Option<Duration>) -> Next {
        self.0.next(backlog)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// The inbox takes no more requests: the spool is closing, or its writer stopped.
#[derive(Debug)]
pub(super) struct Closed;

/// What the writer's wait ended with.
pub(super) enum Next {
    /// Requests for a pass (empty when the wait for `backlog` ran out with none).
    Batch(Vec<Request>),
    /// The inbox is closed and empty.
    Closed,
}

impl Inbox {
    fn new() -> Inbox {
        Inbox {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding the lock leaves the queue consistent (every change is one push
        // or one drain), so a poisoned lock is taken as it is.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a request; wakes the writer if it must act on it now, or if it sleeps without a
    /// deadline and an update arrives (it then sleeps until the update is due). Err when the
    /// inbox is closed: the request is dropped, and its sender hears no answer will come.
    fn send(&self, request: Request) -> Result<(), Closed> {
        let mut queue = self.queue();
        if queue.closed {
            return Err(Closed);
        }
        let urgent = !matches!(request, Request::Update { .. });
        let wake = if urgent {
            queue.urgent += 1;
            true
        } else {
            // Only the first update of a quiet spell sets a deadline the writer must know of.
            queue.oldest_update.is_none() && {
                queue.oldest_update = Some(Instant::now());
                true
            }
        };
        queue.requests.push_back(request);
        if wake && queue.waiting {
            queue.waiting = false;
            self.ready.notify_one();
        }
        Ok(())
    }

    /// Stops taking requests; the writer finishes those queued.
    fn close(&self) {
        let mut queue = self.queue();
        queue.closed = true;
        queue.waiting = false;
        self.ready.notify_one();
    }

    /// Closes the inbox and drops what is queued, so that every sender waiting for an answer
    /// hears that none will come: called when the writer stops, even by a panic.
    fn abandon(&self) {
        let dropped = {
            let mut queue = self.queue();
            queue.closed = true;
            queue.urgent = 0;
            queue.oldest_update = None;
            std::mem::take(&mut queue.requests)
        };
        drop(dropped);
    }

    /// Waits until a pass is due and takes its requests: at once if a request is urgent or the
    /// batch is full, once the oldest update has waited [`UPDATE_DELAY`], or after `backlog`
    /// (work the writer owes itself, such as punches to sync) with whatever is queued.
    fn next(&self, backlog: Option<Duration>) -> Next {
        let started = Instant::now();
        let mut queue = self.queue();
        loop {
            let now = Instant::now();
            let update_due = queue.oldest_update.map(|t| t + UPDATE_DELAY);
            let backlog_due = backlog.map(|d| started + d);
            let due = queue.urgent > 0
                || queue.closed
                || queue.requests.len() >= MAX_BATCH
                || update_due.is_some_and(|t| t <= now)
                || backlog_due.is_some_and(|t| t <= now);
            if due {
                if queue.closed && queue.requests.is_empty() {
                    return Next::Closed;
                }
                return Next::Batch(queue.take());
            }
            let deadline = [update_due, backlog_due].into_iter().flatten().min();
            queue.waiting = true;
            queue = match deadline {
                None => self.ready.wait(queue).unwrap_or_else(|p| p.into_inner()),
                Some(t) => {
                    let wait = t.saturating_duration_since(now);
                    let (q, _) = self
                        .ready
                        .wait_timeout(queue, wait)
                        .unwrap_or_else(|p| p.into_inner());
                    q
                }
            };
            queue.waiting = false;
        }
    }
}

impl Queue {
    /// Takes up to a batch's worth of requests, oldest first.
    fn take(&mut self) -> Vec<Request> {
        let mut batch = Vec::with_capacity(self.requests.len().min(MAX_BATCH));
        let mut bytes = 0;
        while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
            let Some(request) = self.requests.pop_front() else {
                break;
            };
            bytes += request.encoded_size();
            if !matches!(request, Request::Update { .. }) {
                self.urgent = self.urgent.saturating_sub(1);
            }
            batch.push(request);
        }
        let updates_left = self
            .requests
            .iter()
            .any(|r| matches!(r, Request::Update { .. }));
        // What a full batch left waits no longer: it is due at the next look.
        self.oldest_update = updates_left.then(|| {
            let now = Instant::now();
            now.checked_sub(UPDATE_DELAY).unwrap_or(now)
        });
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::QueueId;
    use tokio::sync::oneshot;

    fn update() -> (
        Request,
        oneshot::Receiver<Result<super::super::Liveness, super::super::SpoolError>>,
    ) {
        let (reply, rx) = oneshot::channel();
        let request = Request::Update {
            id: QueueId::generate().expect("a queue id"),
            final_rcpts: vec![0],
            queue: None,
            reply,
        };
        (request, rx)
    }

    fn destroy() -> (
        Request,
        oneshot::Receiver<Result<(), super::super::SpoolError>>,
    ) {
        let (reply, rx) = oneshot::channel();
        let request = Request::Destroy {
            id: QueueId::generate().expect("a queue id"),
            reply,
        };
        (request, rx)
    }

    fn batch(next: Next) -> Vec<Request> {
        match next {
            Next::Batch(b) => b,
            Next::Closed => panic!("the inbox closed"),
        }
    }

    #[test]
    fn an_update_alone_waits_for_its_delay_then_gets_a_pass() {
        let inbox = Inbox::new();
        let sent = Instant::now();
        assert!(inbox.send(update().0).is_ok());
        let taken = batch(inbox.next(None));
        assert!(
            sent.elapsed() >= UPDATE_DELAY,
            "taken after {:?}",
            sent.elapsed()
        );
        assert_eq!(taken.len(), 1);
        assert!(matches!(taken[0], Request::Update { .. }));
    }

    #[test]
    fn a_request_that_cannot_wait_takes_the_updates_before_it_along() {
        let inbox = Inbox::new();
        assert!(inbox.send(update().0).is_ok());
        assert!(inbox.send(update().0).is_ok());
        assert!(inbox.send(destroy().0).is_ok());
        let taken = batch(inbox.next(None));
        assert_eq!(taken.len(), 3, "one pass for all three");
        assert!(matches!(taken[2], Request::Destroy { .. }), "oldest first");
        // Nothing is left, nor anything urgent: the next wait lasts until its deadline.
        let started = Instant::now();
        assert!(batch(inbox.next(Some(Duration::from_millis(10)))).is_empty());
        assert!(started.elapsed() >= Duration::from_millis(10));
    }

    /// A writer thread waiting (with no deadline) for its next batch, and the inbox; the thread
    /// returns the batch's length. It has had 20 ms to go to sleep.
    fn sleeping_writer() -> (std::sync::Arc<Inbox>, std::thread::JoinHandle<usize>) {
        let inbox = std::sync::Arc::new(Inbox::new());
        let writer = {
            let inbox = inbox.clone();
            std::thread::spawn(move || batch(inbox.next(None)).len())
        };
        std::thread::sleep(Duration::from_millis(20));
        (inbox, writer)
    }

    #[test]
    fn a_store_arriving_while_the_writer_sleeps_wakes_it() {
        let (inbox, writer) = sleeping_writer();
        // Only the destroy's signal can end a wait without a deadline.
        assert!(inbox.send(destroy().0).is_ok());
        assert_eq!(writer.join().ok(), Some(1));
    }

    #[test]
    fn an_update_arriving_while_the_writer_sleeps_sets_its_deadline() {
        let (inbox, writer) = sleeping_writer();
        assert!(inbox.send(update().0).is_ok());
        // Without the signal the writer would sleep on, and the join below would hang.
        assert_eq!(writer.join().ok(), Some(1));
    }

    #[test]
    fn a_pass_takes_at_most_max_batch_requests_and_the_rest_is_due_at_once() {
        let inbox = Inbox::new();
        for _ in 0..=MAX_BATCH {
            assert!(inbox.send(update().0).is_ok());
        }
        assert_eq!(batch(inbox.next(None)).len(), MAX_BATCH);
        assert_eq!(batch(inbox.next(None)).len(), 1, "the one left over");
    }

    #[test]
    fn a_pass_stops_taking_stores_once_past_max_batch_bytes() {
        let store = || {
            let (reply, _) = oneshot::channel();
            Request::Store {
                id: QueueId::generate().expect("a queue id"),
                envelope: Vec::new(),
                head: Vec::new(),
                body: vec![0; MAX_BATCH_BYTES / 2 + 1],
                rcpts: 1,
                spill: None,
                reply,
            }
        };
        let inbox = Inbox::new();
        for _ in 0..3 {
            assert!(inbox.send(store()).is_ok());
        }
        // The second store takes the batch past the cap: the third waits for the next pass.
        assert_eq!(batch(inbox.next(None)).len(), 2);
        assert_eq!(batch(inbox.next(None)).len(), 1);
    }

    #[test]
    fn the_backlog_deadline_ends_an_empty_wait() {
        let inbox = Inbox::new();
        // A destroy taken leaves nothing urgent behind.
        assert!(inbox.send(destroy().0).is_ok());
        assert_eq!(batch(inbox.next(None)).len(), 1);
        let started = Instant::now();
        assert!(batch(inbox.next(Some(Duration::from_millis(10)))).is_empty());
        assert!(started.elapsed() >= Duration::from_millis(10));
    }

    #[test]
    fn a_closed_inbox_hands_over_what_is_queued_then_ends() {
        let inbox = Inbox::new();
        assert!(inbox.send(update().0).is_ok());
        inbox.close();
        assert!(inbox.send(destroy().0).is_err(), "refused once closed");
        assert_eq!(batch(inbox.next(None)).len(), 1, "the update is not lost");
        assert!(matches!(inbox.next(None), Next::Closed));
    }

    #[test]
    fn an_abandoned_inbox_fails_what_waits_for_an_answer() {
        let (inbox, writer) = channel();
        let (request, mut answer) = update();
        assert!(inbox.send(request).is_ok());
        drop(writer);
        assert!(
            matches!(answer.try_recv(), Err(oneshot::error::TryRecvError::Closed)),
            "the sender hears that no answer will come"
        );
        assert!(inbox.send(destroy().0).is_err());
    }
}
