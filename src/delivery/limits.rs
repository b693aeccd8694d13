//! Per-destination traffic shaping: concurrent connections, messages per minute, and the
//! "dead destination" feedback (Postfix's name): after repeated failed connections a destination
//! is marked down for a while, and its messages are deferred together instead of each one
//! spending a connect or greeting timeout on it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// Called once a destination that turned a job away has room again: it makes the job's
/// message due (see `Limits::slot`).
pub type Wake = Box<dyn FnOnce() + Send>;

#[derive(Default)]
pub(super) struct Limits {
    slots: Mutex<HashMap<String, Arc<Gate>>>,
    /// When the next message to each rate-limited destination may start.
    next_start: Mutex<HashMap<String, Instant>>,
    /// Connection health of destinations that failed lately.
    health: Mutex<HashMap<String, Health>>,
}

/// Consecutive failed connections, and until when the destination counts as down.
#[derive(Default)]
struct Health {
    failures: u32,
    down_until: Option<Instant>,
}

/// When a destination is marked down.
#[derive(Debug, Clone, Copy)]
pub(super) struct DownPolicy {
    /// Consecutive failed connections that mark it down (0: never).
    pub after: u32,
    pub period: Duration,
}

/// One destination's connection slots, and the jobs queued for them.
///
/// At most `max_waiting` jobs wait for a slot; the others are turned away ([`Turn::Busy`]) and
/// their [`Wake`]s parked here, oldest first. A waiting job holds one of the queue's
/// `max_active_messages` places, so without this bound a stuck destination with a big backlog
/// would take every place and hold up mail for every other destination. Each slot given back
/// (and each waiting job that gives up) wakes the oldest parked job: it comes back to wait in
/// the room that made.
struct Gate {
    slots: Arc<Semaphore>,
    queue: Mutex<GateQueue>,
}

#[derive(Default)]
struct GateQueue {
    /// Jobs waiting for a slot now.
    waiting: usize,
    parked: VecDeque<Wake>,
}

impl Gate {
    fn queue(&self) -> MutexGuard<'_, GateQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Room for one more waiting job: the oldest parked one is woken.
    fn room(&self) {
        let next = self.queue().parked.pop_front();
        if let Some(wake) = next {
            wake();
        }
    }
}

/// What a job gets from [`Limits::slot`].
pub(super) enum Turn {
    /// A connection slot, held until dropped.
    Go(Slot),
    /// Too many jobs wait already: the job's wake is parked.
    Busy,
    /// Shutting down.
    Closed,
}

/// A connection slot of a destination; giving it back wakes a parked job.
pub(super) struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    gate: Arc<Gate>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.gate.room();
    }
}

/// Counts a job among its destination's waiting ones while it waits; one that gives up
/// (its attempt timed out, or was abandoned) leaves room for a parked one.
struct Waiting<'g> {
    gate: &'g Gate,
    served: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.gate.queue().waiting -= 1;
        if !self.served {
            self.gate.room();
        }
    }
}

impl Limits {
    /// A connection slot of `key`, which has `max` of them. With none free, the job waits,
    /// unless `max_waiting` jobs wait already and it can be woken later (`park` gives its
    /// wake): then it is turned away, and woken once the destination has room.
    pub(super) async fn slot(
        &self,
        key: &str,
        max: usize,
        max_waiting: usize,
        park: Option<&(dyn Fn() -> Wake + Sync)>,
    ) -> Turn {
        let gate = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .entry(key.to_string())
                .or_insert_with(|| {
                    Arc::new(Gate {
                        slots: Arc::new(Semaphore::new(max)),
                        queue: Mutex::default(),
                    })
                })
                .clone()
        };
        let slot = |permit| {
            Turn::Go(Slot {
                permit: Some(permit),
                gate: gate.clone(),
            })
        };
        {
            let mut queue = gate.queue();
            if let Ok(permit) = gate.slots.clone().try_acquire_owned() {
                return slot(permit);
            }
            match park {
                Some(park) if queue.waiting >= max_waiting => {
                    queue.parked.push_back(park());
                    return Turn::Busy;
                }
                _ => queue.waiting += 1,
            }
        }
        let mut waiting = Waiting {
            gate: &gate,
            served: false,
        };
        let permit = gate.slots.clone().acquire_owned().await;
        waiting.served = true;
        drop(waiting);
        match permit {
            Ok(permit) => slot(permit),
            Err(_) => Turn::Closed,
        }
    }

    /// True while `key` is marked down.
    pub(super) fn is_down(&self, key: &str) -> bool {
        let health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health
            .get(key)
            .and_then(|h| h.down_until)
            .is_some_and(|t| Instant::now() < t)
    }

    /// A connection to `key` could not be made (refused, timed out, no greeting). Returns true
    /// when this marks the destination down: then every job parked for it is woken, to be
    /// deferred with the others rather than wait for room that would not come.
    pub(super) fn connect_failed(&self, key: &str, policy: DownPolicy) -> bool {
        let marked = {
            let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
            let h = health.entry(key.to_string()).or_default();
            h.failures += 1;
            let already = h.down_until.is_some_and(|t| Instant::now() < t);
            let marked = policy.after > 0 && h.failures >= policy.after && !already;
            if marked {
                h.down_until = Some(Instant::now() + policy.period);
            }
            marked
        };
        if marked {
            self.wake_all(key);
        }
        marked
    }

    /// Wakes every job parked for `key`.
    fn wake_all(&self, key: &str) {
        let gate = {
            let slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots.get(key).cloned()
        };
        let parked = gate.map(|g| std::mem::take(&mut g.queue().parked));
        for wake in parked.into_iter().flatten() {
            wake();
        }
    }

    /// A connection to `key` worked: it is healthy again.
    pub(super) fn connected(&self, key: &str) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.remove(key);
    }

    /// Waits until a message to `key` may start under `per_minute` (evenly spaced, no burst).
    pub(super) async fn pace(&self, key: &str, per_minute: Option<u32>) {
        let Some(rate) = per_minute.filter(|r| *r > 0) else {
            return;
        };
        let interval = Duration::from_secs(60) / rate;
        let start = {
            let mut next = self.next_start.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let slot = next.get(key).copied().filter(|t| *t > now).unwrap_or(now);
            next.insert(key.to_string(), slot + interval);
            slot
        };
        tokio::time::sleep_until(start).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn pacing_spaces_messages_evenly() {
        let limits = Limits::default();
        let t0 = Instant::now();
        for _ in 0..4 {
            limits.pace("d", Some(30)).await;
        }
        // 30 a minute: one every 2 s, the first at once.
        assert_eq!(t0.elapsed(), Duration::from_secs(6));
        let t1 = Instant::now();
        limits.pace("other", Some(30)).await;
        limits.pace("unlimited", None).await;
        assert_eq!(t1.elapsed(), Duration::ZERO, "keys are independent");
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_connect_failures_mark_a_destination_down_for_a_while() {
        let limits = Limits::default();
        let policy = DownPolicy {
            after: 3,
            period: Duration::from_secs(60),
        };
        assert!(!limits.connect_failed("d", policy));
        assert!(!limits.connect_failed("d", policy));
        assert!(!limits.is_down("d"));
        assert!(limits.connect_failed("d", policy), "third failure in a row");
        assert!(limits.is_down("d") && !limits.is_down("other"));
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(!limits.is_down("d"), "tried again after the period");
        limits.connected("d");
        assert!(
            !limits.connect_failed("d", policy),
            "a success resets the count"
        );
    }

    async fn go(limits: &Limits) -> Slot {
        match limits.slot("d", 2, 1, None).await {
            Turn::Go(slot) => slot,
            _ => panic!("no slot"),
        }
    }

    #[tokio::test]
    async fn slots_bound_concurrency() {
        let limits = Limits::default();
        let a = go(&limits).await;
        let _b = go(&limits).await;
        let third = tokio::time::timeout(Duration::from_millis(50), go(&limits)).await;
        assert!(third.is_err(), "a third slot waits");
        drop(a);
        let _c = go(&limits).await;
    }

    /// Past `max_waiting` waiting jobs, a job that can be woken is turned away, and woken, the
    /// oldest first, as slots come back or waiting jobs give up.
    #[tokio::test]
    async fn jobs_past_the_waiting_bound_are_parked_and_woken_in_turn() {
        let limits = Arc::new(Limits::default());
        let woken = Arc::new(Mutex::new(Vec::new()));
        let parker = |n: u32| {
            let woken = woken.clone();
            move || -> Wake {
                let woken = woken.clone();
                Box::new(move || woken.lock().unwrap().push(n))
            }
        };
        let a = go(&limits).await;
        let b = go(&limits).await;
        // One may wait (max_waiting = 1).
        let waiter = {
            let limits = limits.clone();
            tokio::spawn(async move { limits.slot("d", 2, 1, None).await })
        };
        while limits.slots.lock().unwrap()["d"].queue().waiting == 0 {
            tokio::task::yield_now().await;
        }
        for n in [1, 2] {
            let turn = limits.slot("d", 2, 1, Some(&parker(n))).await;
            assert!(matches!(turn, Turn::Busy), "job {n} turned away");
        }
        assert!(woken.lock().unwrap().is_empty());
        drop(a);
        let taken = waiter.await.unwrap();
        assert!(
            matches!(taken, Turn::Go(_)),
            "the waiting job took the slot"
        );
        assert_eq!(*woken.lock().unwrap(), [1], "the oldest parked job woken");
        // A job that gives up waiting makes room too.
        let gives_up = tokio::time::timeout(
            Duration::from_millis(20),
            limits.slot("d", 2, 1, Some(&parker(3))),
        )
        .await;
        assert!(gives_up.is_err(), "waited: there was room");
        assert_eq!(*woken.lock().unwrap(), [1, 2]);
        drop(b);
        assert_eq!(
            *woken.lock().unwrap(),
            [1, 2],
            "nothing more parked to wake"
        );
    }

    /// A destination marked down wakes every job parked for it at once: they are deferred
    /// with the others, instead of each waiting for room that a dead destination never makes.
    #[tokio::test]
    async fn marking_a_destination_down_wakes_every_parked_job() {
        let limits = Limits::default();
        let woken = Arc::new(Mutex::new(0));
        let park = || -> Wake {
            let woken = woken.clone();
            Box::new(move || *woken.lock().unwrap() += 1)
        };
        let _only = match limits.slot("d", 1, 0, Some(&park)).await {
            Turn::Go(slot) => slot,
            _ => panic!("the free slot"),
        };
        for _ in 0..3 {
            assert!(matches!(
                limits.slot("d", 1, 0, Some(&park)).await,
                Turn::Busy
            ));
        }
        let policy = DownPolicy {
            after: 2,
            period: Duration::from_secs(60),
        };
        assert!(!limits.connect_failed("d", policy));
        assert_eq!(*woken.lock().unwrap(), 0, "not down yet");
        assert!(limits.connect_failed("d", policy));
        assert_eq!(*woken.lock().unwrap(), 3);
    }
}
