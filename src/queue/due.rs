//! The due-time index: which message is due when, and which are being processed.
//!
//! A message is either waiting (in `order`, at one due time) or running (taken by
//! [`Due::take_due`], not in `order`). A reschedule that arrives while it runs is parked with
//! the running entry and applied by [`Due::finish`], so no interleaving of scheduling, taking and
//! finishing can drop a message from the index or run it twice at once.

use std::collections::{BTreeSet, HashMap};

use crate::spool::QueueId;

#[derive(Default)]
pub(super) struct Due {
    /// Waiting messages: (due time, id), earliest first.
    order: BTreeSet<(i64, QueueId)>,
    /// Each waiting id's entry in `order`, so rescheduling replaces rather than duplicates.
    at: HashMap<QueueId, i64>,
    /// Running messages, with the due time asked for while they ran (earliest wins).
    running: HashMap<QueueId, Option<i64>>,
}

impl Due {
    /// Makes `id` due at `when` (or, while it runs, once it has finished).
    pub(super) fn schedule(&mut self, id: QueueId, when: i64) {
        if let Some(parked) = self.running.get_mut(&id) {
            *parked = Some(parked.map_or(when, |t| t.min(when)));
            return;
        }
        if let Some(old) = self.at.insert(id, when) {
            self.order.remove(&(old, id));
        }
        self.order.insert((when, id));
    }

    /// Takes every waiting message due at `now`; each is running until [`Due::finish`].
    pub(super) fn take_due(&mut self, now: i64) -> Vec<QueueId> {
        let mut ids = Vec::new();
        while let Some(&(when, id)) = self.order.first() {
            if when > now {
                break;
            }
            self.order.pop_first();
            self.at.remove(&id);
            self.running.insert(id, None);
            ids.push(id);
        }
        ids
    }

    /// `id` is no longer running: it waits again if it was rescheduled meanwhile, or at
    /// `fallback` (an attempt that ended without deciding, e.g. abandoned).
    pub(super) fn finish(&mut self, id: QueueId, fallback: Option<i64>) {
        if let Some(parked) = self.running.remove(&id) {
            if let Some(when) = parked.or(fallback) {
                self.schedule(id, when);
            }
        }
    }

    /// Messages waiting (not counting those running).
    pub(super) fn waiting(&self) -> usize {
        self.at.len()
    }

    /// Whether `id` is in the index, waiting or running.
    #[cfg(test)]
    pub(super) fn holds(&self, id: QueueId) -> bool {
        self.at.contains_key(&id) || self.running.contains_key(&id)
    }

    pub(super) fn next_due(&self) -> Option<i64> {
        self.order.first().map(|(t, _)| *t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn id() -> QueueId {
        QueueId::generate().expect("id")
    }

    #[test]
    fn a_reschedule_while_running_survives_a_take() {
        let mut due = Due::default();
        let a = id();
        due.schedule(a, 10);
        assert_eq!(due.take_due(10), vec![a]);
        // The attempt reschedules before it is marked finished; a dispatch pass runs between.
        due.schedule(a, 11);
        assert!(due.take_due(100).is_empty(), "not run twice at once");
        assert!(due.holds(a));
        due.finish(a, None);
        assert_eq!(due.next_due(), Some(11));
        assert_eq!(due.take_due(100), vec![a]);
        due.finish(a, None);
        assert!(
            !due.holds(a),
            "finished without a reschedule: gone (delivered)"
        );
        due.schedule(a, 5);
        due.take_due(5);
        due.finish(a, Some(65));
        assert_eq!(due.next_due(), Some(65), "abandoned: back at the fallback");
    }

    /// Many threads take, reschedule and finish the same messages at once, in every order the
    /// scheduler happens to produce; afterwards every message is still indexed, exactly once.
    #[test]
    fn concurrent_completions_lose_nothing() {
        let due = Arc::new(Mutex::new(Due::default()));
        let ids: Vec<QueueId> = (0..200).map(|_| id()).collect();
        for &i in &ids {
            due.lock().unwrap().schedule(i, 0);
        }
        let workers: Vec<_> = (0..8)
            .map(|w| {
                let due = due.clone();
                std::thread::spawn(move || {
                    for round in 0..2_000i64 {
                        let taken = due.lock().unwrap().take_due(round);
                        for (n, id) in taken.into_iter().enumerate() {
                            // Completion: reschedule, let other threads in, then finish.
                            due.lock().unwrap().schedule(id, round + (n as i64 + w) % 3);
                            std::thread::yield_now();
                            due.lock().unwrap().finish(id, None);
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let due = due.lock().unwrap();
        assert!(due.running.is_empty());
        assert_eq!(due.waiting(), ids.len());
        assert_eq!(due.order.len(), ids.len(), "one entry each");
        assert!(ids.iter().all(|&i| due.holds(i)));
    }
}
