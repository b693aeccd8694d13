//! Per-destination traffic shaping: concurrent connections and messages per minute.

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
