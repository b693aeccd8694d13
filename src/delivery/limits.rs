//! Per-destination traffic shaping: concurrent connections, messages per minute, and the
//! "dead destination" feedback (Postfix's name): after repeated failed connections a destination
//! is marked down for a while, and its messages are deferred together instead of each one
//! spending a connect or greeting timeout on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

#[derive(Default)]
pub(super) struct Limits {
    slots: Mutex<HashMap<String, Arc<Semaphore>>>,
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

impl Limits {
    /// Waits for one of `max` connection slots of `key`.
    pub(super) async fn slot(&self, key: &str, max: usize) -> Option<OwnedSemaphorePermit> {
        let sem = {
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .entry(key.to_string())
                .or_insert_with(|| Arc::new(Semaphore::new(max)))
                .clone()
        };
        sem.acquire_owned().await.ok()
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
    /// when this marks the destination down.
    pub(super) fn connect_failed(&self, key: &str, policy: DownPolicy) -> bool {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let h = health.entry(key.to_string()).or_default();
        h.failures += 1;
        let already = h.down_until.is_some_and(|t| Instant::now() < t);
        if policy.after > 0 && h.failures >= policy.after && !already {
            h.down_until = Some(Instant::now() + policy.period);
            return true;
        }
        false
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

    #[tokio::test]
    async fn slots_bound_concurrency() {
        let limits = Limits::default();
        let a = limits.slot("d", 2).await;
        let b = limits.slot("d", 2).await;
        assert!(a.is_some() && b.is_some());
        let third = tokio::time::timeout(Duration::from_millis(50), limits.slot("d", 2)).await;
        assert!(third.is_err(), "a third slot waits");
        drop(a);
        assert!(limits.slot("d", 2).await.is_some());
    }
}
