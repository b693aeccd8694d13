//! The due-time index: which message is due when, and which are being processed.
//!
//! A message is either waiting (in `order`, at one due time) or running (taken by
//! [`Due::take_due`], not in `order`). A reschedule that arrives while it runs is parked with
//! the running entry and applied by [`Due::finish`], so no interleaving of scheduling, taking and
//! finishing can drop a message from the index or run it twice at once.
//!
//! A held message is in neither: [`Due::schedule`] ignores it until [`Due::release`], so a
//! hold placed while the message runs also outlasts that attempt's own reschedule.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::schedule::Hold;
use crate::spool::QueueId;

#[derive(Default)]
pub(super) struct Due {
    /// Waiting messages: (due time, id), earliest first.
    order: BTreeSet<(i64, QueueId)>,
    /// Each waiting id's entry in `order`, so rescheduling replaces rather than duplicates.
    /// A B-tree, as the spool's index: a queue of a million messages costs no table doubling.
    at: BTreeMap<QueueId, i64>,
    /// Running messages, with the due time asked for while they ran (earliest wins).
    running: HashMap<QueueId, Option<i64>>,
    /// Held messages: never scheduled until released.
    held: HashMap<QueueId, Hold>,
    /// Flushed by an operator: every pending recipient is tried at the next attempt, whatever
    /// its own retry time.
    forced: HashSet<QueueId>,
}

/// Why an operator action cannot have a message now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Busy {
    /// A delivery attempt is in progress.
    Running,
}

impl Due {
    /// Makes every one of `dues` due at its time, as [`Due::schedule`] one by one would, but
    /// built at once: full B-tree nodes, for a queue of a million messages after a restart.
    pub(super) fn load(&mut self, dues: Vec<(QueueId, i64)>) {
        if !self.order.is_empty() || !self.running.is_empty() || !self.held.is_empty() {
            for (id, when) in dues {
                self.schedule(id, when);
            }
            return;
        }
        self.order = dues.iter().map(|&(id, when)| (when, id)).collect();
        self.at = dues.into_iter().collect();
    }

    /// Makes `id` due at `when` (or, while it runs, once it has finished).
    pub(super) fn schedule(&mut self, id: QueueId, when: i64) {
        if self.held.contains_key(&id) {
            return;
        }
        if let Some(parked) = self.running.get_mut(&id) {
            *parked = Some(parked.map_or(when, |t| t.min(when)));
            return;
        }
        if let Some(old) = self.at.insert(id, when) {
            self.order.remove(&(old, id));
        }
        self.order.insert((when, id));
    }

    /// Makes `id` due at `now` if it waits for later, or once it has finished if it runs; a
    /// message in neither state (held, or gone) is left alone. For a message parked by a busy
    /// destination, which wakes it once it has room.
    pub(super) fn wake(&mut self, id: QueueId, now: i64) {
        let waiting_later = self.at.get(&id).is_some_and(|&when| when > now);
        if waiting_later || self.running.contains_key(&id) {
            self.schedule(id, now);
        }
    }

    /// Takes waiting messages due at `now`, earliest first, at most `limit` of them; each is
    /// running until [`Due::finish`].
    pub(super) fn take_due(&mut self, now: i64, limit: usize) -> Vec<QueueId> {
        let mut ids = Vec::new();
        while let Some(&(when, id)) = self.order.first() {
            if when > now || ids.len() >= limit {
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

    /// Takes `id` out of the scheduler's hands for an operator action (delete, bounce): it is
    /// running until [`Due::finish`]. Refused while an attempt is in progress. Returns the hold
    /// it had, for putting it back if the action fails.
    pub(super) fn claim(&mut self, id: QueueId) -> Result<Option<Hold>, Busy> {
        if self.running.contains_key(&id) {
            return Err(Busy::Running);
        }
        if let Some(old) = self.at.remove(&id) {
            self.order.remove(&(old, id));
        }
        self.forced.remove(&id);
        self.running.insert(id, None);
        Ok(self.held.remove(&id))
    }

    /// Puts `id` on hold: out of the waiting order, and any reschedule ignored until released.
    /// Returns whether an attempt is running now (it finishes, then stays put).
    pub(super) fn hold(&mut self, id: QueueId, hold: Hold) -> bool {
        if let Some(old) = self.at.remove(&id) {
            self.order.remove(&(old, id));
        }
        self.forced.remove(&id);
        self.held.insert(id, hold);
        match self.running.get_mut(&id) {
            Some(parked) => {
                *parked = None;
                true
            }
            None => false,
        }
    }

    /// Lifts a hold; the caller schedules the message. None if it was not held.
    pub(super) fn release(&mut self, id: QueueId) -> Option<Hold> {
        self.held.remove(&id)
    }

    pub(super) fn hold_of(&self, id: QueueId) -> Option<Hold> {
        self.held.get(&id).copied()
    }

    /// Makes `id` due at `now` with every pending recipient tried; false if it is held.
    pub(super) fn flush(&mut self, id: QueueId, now: i64) -> bool {
        if self.held.contains_key(&id) {
            return false;
        }
        self.forced.insert(id);
        self.schedule(id, now);
        true
    }

    /// Whether the attempt starting now was asked for by a flush (consumes the mark).
    pub(super) fn take_forced(&mut self, id: QueueId) -> bool {
        self.forced.remove(&id)
    }

    pub(super) fn is_running(&self, id: QueueId) -> bool {
        self.running.contains_key(&id)
    }

    pub(super) fn running_count(&self) -> usize {
        self.running.len()
    }

    pub(super) fn held_count(&self) -> usize {
        self.held.len()
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
        assert_eq!(due.take_due(10, usize::MAX), vec![a]);
        // The attempt reschedules before it is marked finished; a dispatch pass runs between.
        due.schedule(a, 11);
        assert!(
            due.take_due(100, usize::MAX).is_empty(),
            "not run twice at once"
        );
        assert!(due.holds(a));
        due.finish(a, None);
        assert_eq!(due.next_due(), Some(11));
        assert_eq!(due.take_due(100, usize::MAX), vec![a]);
        due.finish(a, None);
        assert!(
            !due.holds(a),
            "finished without a reschedule: gone (delivered)"
        );
        due.schedule(a, 5);
        due.take_due(5, usize::MAX);
        due.finish(a, Some(65));
        assert_eq!(due.next_due(), Some(65), "abandoned: back at the fallback");
    }

    /// The dispatcher takes no more than it has slots for; the rest wait in the index, earliest
    /// first, and come out as slots free up.
    #[test]
    fn take_due_takes_at_most_the_limit_earliest_first() {
        let mut due = Due::default();
        let (a, b, c, later) = (id(), id(), id(), id());
        due.schedule(c, 3);
        due.schedule(a, 1);
        due.schedule(b, 2);
        due.schedule(later, 50);
        assert_eq!(due.take_due(10, 2), vec![a, b]);
        assert_eq!(due.waiting(), 2, "c and the later one still wait");
        assert!(due.take_due(10, 0).is_empty());
        assert_eq!(due.take_due(10, 5), vec![c], "the later one is not due");
        assert_eq!(due.next_due(), Some(50));
    }

    /// A bulk load is the same as scheduling one by one, also over what is already there.
    #[test]
    fn load_is_schedule_in_bulk() {
        let ids: Vec<QueueId> = (0..50).map(|_| id()).collect();
        let dues: Vec<(QueueId, i64)> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, (i as i64 * 7) % 13))
            .collect();
        let (mut loaded, mut scheduled) = (Due::default(), Due::default());
        loaded.load(dues.clone());
        for &(id, when) in &dues {
            scheduled.schedule(id, when);
        }
        assert_eq!(loaded.order, scheduled.order);
        assert_eq!(loaded.at, scheduled.at);
        // Over a non-empty index: a reschedule replaces, never duplicates.
        loaded.load(vec![(ids[0], 99)]);
        assert_eq!(loaded.waiting(), 50);
        assert_eq!(loaded.at[&ids[0]], 99);
        assert_eq!(loaded.take_due(12, usize::MAX).len(), 49);
    }

    fn operator() -> Hold {
        Hold {
            reason: super::super::schedule::HoldReason::Operator,
            since: 0,
        }
    }

    #[test]
    fn a_hold_outlasts_the_running_attempt_and_a_release_restores_it() {
        let mut due = Due::default();
        let (a, b) = (id(), id());
        due.schedule(a, 10);
        due.schedule(b, 20);
        assert_eq!(due.take_due(10, usize::MAX), vec![a]);
        assert!(due.hold(a, operator()), "held while running");
        due.schedule(a, 11);
        due.finish(a, Some(70));
        assert!(!due.holds(a), "the attempt's own reschedule is ignored");
        assert!(!due.hold(b, operator()), "b was waiting");
        assert_eq!(due.next_due(), None, "nothing waits");
        assert!(!due.flush(b, 0), "a held message cannot be flushed");
        assert_eq!(due.release(b), Some(operator()));
        assert!(due.flush(b, 30));
        assert_eq!(due.take_due(30, usize::MAX), vec![b]);
        assert!(
            due.take_forced(b) && !due.take_forced(b),
            "the mark is used once"
        );
    }

    #[test]
    fn a_claim_is_refused_while_running_and_keeps_the_dispatcher_off() {
        let mut due = Due::default();
        let a = id();
        due.schedule(a, 0);
        assert_eq!(due.claim(a), Ok(None));
        assert!(
            due.take_due(100, usize::MAX).is_empty(),
            "claimed: not dispatched"
        );
        assert_eq!(due.claim(a), Err(Busy::Running));
        due.finish(a, None);
        assert!(!due.holds(a), "deleted: gone from the index");
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
                        let taken = due.lock().unwrap().take_due(round, usize::MAX);
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
