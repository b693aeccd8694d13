//! Crash-loop protection: a message whose delivery was in progress at two crashes in a row is
//! put on hold ([`HoldReason::CrashLoop`](super::HoldReason)) instead of being tried again at
//! once, so that one message cannot crash-loop the daemon (a panic that aborts, a stack
//! overflow, the OOM killer).
//!
//! **The journal.** `<data_dir>/inflight` starts with a header `#<generation>` (random, one per
//! run) and then gets a line `+<id>` when an attempt starts and `-<id>` when it ends. A clean stop
//! removes it; so finding one at start means the last run crashed, and the ids with a `+` and no
//! `-` were being delivered at that moment. It grows by appending and is rewritten compactly (the
//! header and the ids in flight now) past [`COMPACT_AT`].
//!
//! **Why no fsync.** The journal only has to outlive the *process*: once `write(2)` returns,
//! the bytes are in the kernel's page cache, which a panic, an abort, the OOM killer or
//! `kill -9` leave alone; the next start reads them back. Only the machine going down loses them,
//! and a power cut is not a crash loop (then the journal is missing or stale: at worst one crash
//! is not counted, or an old one counted once). This keeps the cost on the hot path to one
//! `write(2)` per dispatch pass for every attempt it starts. An attempt's `-` line waits in
//! memory for that next write, or about a second when nothing starts ([`STALE`]): one that ended
//! just before a crash may then be counted as in flight at it, which can make it a suspect
//! (tried alone) but never hold it, since a suspect's own `-` is written at once.
//!
//! **The counts.** `<data_dir>/inflight.crashes` holds, per id, how many crashes in a row it was
//! in flight at: at start, the ids in flight at this crash get one more and all others are
//! dropped (that is "in a row"); a clean stop drops them all. It is written once per start,
//! durably (temporary file, fsync, rename), with the generation of the journal it counted, so a
//! crash during start never counts the same journal twice. (So a crash-loop message that an
//! operator releases and that is in flight at the very next crash is held again at once.)
//!
//! **Suspects.** At [`HOLD_AT`] a message is held. A message at one crash is a *suspect*: it is
//! retried at once, but alone among suspects (for up to [`SUSPECT_TURN`] each), so that when one
//! of them crashes the daemon again the others are not in flight with it and are not held for its
//! sake. An attempt counts as in flight only once it has its slot among `max_active_messages`,
//! not while it waits for one, for the same reason.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, Semaphore};

use crate::spool::QueueId;

/// The journal's file name in the data directory.
pub(crate) const JOURNAL: &str = "inflight";
/// The crash counts' file name in the data directory.
pub(crate) const COUNTS: &str = "inflight.crashes";
/// The journal is rewritten compactly when an append would take it past this size.
const COMPACT_AT: u64 = 1 << 20;
/// In flight at this many crashes in a row: held.
pub(crate) const HOLD_AT: u32 = 2;
/// How long a suspect has the suspects' turn to itself, at most: a crash within this time of its
/// start finds no other suspect started after it. Longer attempts let the next one begin, so
/// that a few slow destinations do not stall the others' retries.
pub(crate) const SUSPECT_TURN: Duration = Duration::from_secs(5);
/// `-` lines are written at the latest this long after the attempt ended (when the dispatcher
/// next runs, at least once a second while any wait).
const STALE: Duration = Duration::from_millis(500);
/// After a failed journal write, the next try waits this long.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// What a journal's bytes say: its generation and the ids started and not ended. Lines that do
/// not parse (a write cut short by a full disk) are skipped.
pub(crate) fn parse_journal(bytes: &[u8]) -> (Option<u64>, HashSet<QueueId>) {
    let mut generation = None;
    let mut live = HashSet::new();
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let Ok(line) = std::str::from_utf8(line) else {
            continue;
        };
        if let Some(g) = line.strip_prefix('#').filter(|_| n == 0) {
            generation = u64::from_str_radix(g, 16).ok();
        } else if let Some(id) = line.strip_prefix('+').and_then(|s| s.parse().ok()) {
            live.insert(id);
        } else if let Some(id) = line.strip_prefix('-').and_then(|s| s.parse().ok()) {
            live.remove(&id);
        }
    }
    (generation, live)
}

/// The crash counts as stored.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Counts {
    /// The generation of the journal these counts include.
    pub journal: Option<u64>,
    /// Per id, the crashes in a row it was in flight at.
    pub crashes: HashMap<QueueId, u32>,
}

impl Counts {
    /// The counts after a start that found `journal` (None: the last run stopped cleanly).
    pub(crate) fn after(&self, journal: Option<&[u8]>) -> Counts {
        let Some(bytes) = journal else {
            return Counts::default();
        };
        let (generation, in_flight) = parse_journal(bytes);
        if generation.is_some() && generation == self.journal {
            // Counted already, by a start that did not get as far as a fresh journal.
            return self.clone();
        }
        let crashes = in_flight
            .into_iter()
            .map(|id| (id, self.crashes.get(&id).map_or(1, |n| n.saturating_add(1))))
            .collect();
        Counts {
            journal: generation,
            crashes,
        }
    }

    /// Reads the file's text; anything unreadable counts as no crash.
    fn parse(text: &str) -> Counts {
        let mut counts = Counts::default();
        for line in text.lines() {
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (Some("journal"), Some(g)) => counts.journal = u64::from_str_radix(g, 16).ok(),
                (Some(id), Some(n)) => {
                    if let (Ok(id), Ok(n)) = (id.parse(), n.parse()) {
                        counts.crashes.insert(id, n);
                    }
                }
                _ => {}
            }
        }
        counts
    }

    fn render(&self) -> String {
        let mut text = String::new();
        if let Some(g) = self.journal {
            text.push_str(&format!("journal {g:016x}\n"));
        }
        for (id, n) in &self.crashes {
            text.push_str(&format!("{id} {n}\n"));
        }
        text
    }
}

/// At start, before the queue runs: reads what the last run left, stores the new crash counts
/// and starts this run's journal. Never fails: without its files the daemon still runs, only
/// unprotected against crash loops (and says so).
pub(crate) fn recover(data_dir: &Path) -> (Journal, HashMap<QueueId, u32>) {
    let journal_path = data_dir.join(JOURNAL);
    let counts_path = data_dir.join(COUNTS);
    let old = match std::fs::read_to_string(&counts_path) {
        Ok(text) => Counts::parse(&text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Counts::default(),
        Err(e) => {
            tracing::warn!(path = %counts_path.display(), error = %e, "cannot read crash counts; starting from none");
            Counts::default()
        }
    };
    let new = match std::fs::read(&journal_path) {
        Ok(bytes) => old.after(Some(&bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => old.after(None),
        Err(e) => {
            tracing::warn!(path = %journal_path.display(), error = %e, "cannot read the in-flight journal; crash counts unchanged");
            old.clone()
        }
    };
    if new != old {
        if let Err(e) = store_counts(&counts_path, &new) {
            tracing::warn!(path = %counts_path.display(), error = %e, "cannot store crash counts");
        }
    }
    if !new.crashes.is_empty() {
        tracing::warn!(
            in_flight = new.crashes.len(),
            "the last run did not stop cleanly; the messages it was delivering are retried one at a time"
        );
    }
    (Journal::start(journal_path, rand::random()), new.crashes)
}

/// Replaces the counts durably (none: the file goes).
fn store_counts(path: &Path, counts: &Counts) -> std::io::Result<()> {
    if counts.crashes.is_empty() {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    } else {
        replace_file(path, counts.render().as_bytes())?.sync_all()?;
    }
    match path.parent() {
        Some(dir) => crate::crypto::sync_dir(dir),
        None => Ok(()),
    }
}

/// Writes `bytes` to `<path>.tmp` and renames it over `path` (no fsync: see the module doc);
/// returns the file, open at its end.
fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<File> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(file)
}

/// This run's journal of attempts in flight.
pub(crate) struct Journal {
    path: PathBuf,
    generation: u64,
    /// None after a failed write (the file is then removed) or at a clean stop.
    file: Option<File>,
    /// Bytes in the file.
    size: u64,
    /// Started and not ended: what a compacted journal holds.
    live: HashSet<QueueId>,
    /// Lines not yet written, and since when.
    pending: Vec<u8>,
    pending_since: Option<Instant>,
    /// When a write last failed; cleared by the next one that works.
    failed_at: Option<Instant>,
    /// Removed at a clean stop: nothing more is written.
    closed: bool,
}

impl Journal {
    /// A fresh journal at `path` (replacing what is there).
    pub(crate) fn start(path: PathBuf, generation: u64) -> Journal {
        let mut journal = Journal {
            path,
            generation,
            file: None,
            size: 0,
            live: HashSet::new(),
            pending: Vec::new(),
            pending_since: None,
            failed_at: None,
            closed: false,
        };
        journal.rewrite();
        journal
    }

    /// Attempts starting now: written at once (one write for all of them and the ends not yet
    /// written), before they run. With none, only ends older than [`STALE`] are written.
    pub(crate) fn started(&mut self, ids: impl IntoIterator<Item = QueueId>) {
        let mut any = false;
        for id in ids {
            if self.live.insert(id) {
                push_line(&mut self.pending, b'+', id);
                any = true;
            }
        }
        if any || self.pending_since.is_some_and(|t| t.elapsed() >= STALE) {
            self.flush();
        }
    }

    /// An attempt ended: written with the next write, or at once for a `suspect` (one in flight
    /// at the last crash: counted at the next one, it would be held).
    pub(crate) fn ended(&mut self, id: QueueId, suspect: bool) {
        if self.live.remove(&id) {
            push_line(&mut self.pending, b'-', id);
            self.pending_since.get_or_insert_with(Instant::now);
            if suspect {
                self.flush();
            }
        }
    }

    /// Whether ends wait to be written (the dispatcher is then to run again within a second).
    pub(crate) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Writes what is pending, if anything: appended, or the whole journal rewritten when it
    /// has grown too big or the last write failed.
    pub(crate) fn flush(&mut self) {
        if self.pending.is_empty() || self.closed {
            return;
        }
        let len = self.pending.len() as u64;
        match self.file.as_mut() {
            Some(file) if self.size + len <= COMPACT_AT => match file.write_all(&self.pending) {
                Ok(()) => self.size += len,
                Err(e) => self.failed(e),
            },
            _ => self.rewrite(),
        }
        self.pending.clear();
        self.pending_since = None;
    }

    /// The header and every id in flight, replacing the file.
    fn rewrite(&mut self) {
        if self.failed_at.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
            return;
        }
        let mut text = format!("#{:016x}\n", self.generation).into_bytes();
        for &id in &self.live {
            push_line(&mut text, b'+', id);
        }
        match replace_file(&self.path, &text) {
            Ok(file) => {
                self.file = Some(file);
                self.size = text.len() as u64;
                if self.failed_at.take().is_some() {
                    tracing::info!(path = %self.path.display(), "in-flight journal written again; crash-loop protection is back");
                }
            }
            Err(e) => self.failed(e),
        }
    }

    /// A journal that missed lines would blame the wrong messages at a crash: none is better
    /// (a crash then counts as a clean stop).
    fn failed(&mut self, e: std::io::Error) {
        self.file = None;
        let _ = std::fs::remove_file(&self.path);
        if self.failed_at.is_none() {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot write the in-flight journal; no crash-loop protection until it can");
        }
        self.failed_at = Some(Instant::now());
    }

    /// A clean stop: no journal at the next start means no crash.
    pub(crate) fn remove(&mut self) {
        self.closed = true;
        self.file = None;
        if let Err(e) = std::fs::remove_file(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the in-flight journal; the next start will take this stop for a crash");
            }
        }
    }
}

fn push_line(out: &mut Vec<u8>, sign: u8, id: QueueId) {
    out.push(sign);
    out.extend_from_slice(id.to_string().as_bytes());
    out.push(b'\n');
}

/// Messages in flight at the last crash and not tried since: each gets its turn alone.
pub(crate) struct Suspects {
    ids: Mutex<HashSet<QueueId>>,
    /// One turn at a time.
    turn: Arc<Semaphore>,
}

/// Held for a suspect's attempt; dropping it (or [`SUSPECT_TURN`] passing) ends the turn.
pub(crate) type Turn = oneshot::Sender<()>;

impl Suspects {
    pub(crate) fn new() -> Suspects {
        Suspects {
            ids: Mutex::default(),
            turn: Arc::new(Semaphore::new(1)),
        }
    }

    fn ids(&self) -> std::sync::MutexGuard<'_, HashSet<QueueId>> {
        self.ids.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn add(&self, id: QueueId) {
        self.ids().insert(id);
    }

    pub(crate) fn contains(&self, id: QueueId) -> bool {
        let ids = self.ids();
        !ids.is_empty() && ids.contains(&id)
    }

    /// Waits for `id`'s turn if it is a suspect (it is not one afterwards); None at once if not.
    pub(crate) async fn turn(&self, id: QueueId) -> Option<Turn> {
        if !self.ids().remove(&id) {
            return None;
        }
        let permit = self.turn.clone().acquire_owned().await.ok()?;
        let (turn, ended) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = tokio::time::sleep(SUSPECT_TURN) => {}
                _ = ended => {}
            }
        });
        Some(turn)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> QueueId {
        QueueId::generate().expect("id")
    }

    /// A journal as a run leaves it: header, then these lines.
    fn journal(generation: u64, lines: &[(u8, QueueId)]) -> Vec<u8> {
        let mut bytes = format!("#{generation:016x}\n").into_bytes();
        for &(sign, id) in lines {
            push_line(&mut bytes, sign, id);
        }
        bytes
    }

    #[test]
    fn the_journal_says_what_was_started_and_not_ended() {
        let (a, b, c) = (id(), id(), id());
        let mut bytes = journal(7, &[(b'+', a), (b'+', b), (b'-', a), (b'+', c)]);
        // A write cut short, and junk: skipped.
        bytes.extend_from_slice(format!("-{}", &c.to_string()[..10]).as_bytes());
        bytes.extend_from_slice(b"\n+zz\n\xff\xfe\n#1\n");
        let (generation, live) = parse_journal(&bytes);
        assert_eq!(generation, Some(7));
        assert_eq!(live, HashSet::from([b, c]));
        assert_eq!(parse_journal(b""), (None, HashSet::new()));
    }

    #[test]
    fn in_flight_at_two_crashes_in_a_row_reaches_the_hold() {
        let (a, b) = (id(), id());
        let first = Counts::default().after(Some(&journal(1, &[(b'+', a), (b'+', b)])));
        assert_eq!(first.crashes, HashMap::from([(a, 1), (b, 1)]));
        // b finished in the second run; a was in flight again.
        let second = first.after(Some(&journal(2, &[(b'+', b), (b'+', a), (b'-', b)])));
        assert_eq!(second.crashes, HashMap::from([(a, HOLD_AT)]));
        assert_eq!(second.journal, Some(2));
    }

    #[test]
    fn not_in_flight_at_the_next_crash_resets_the_count() {
        let (a, b) = (id(), id());
        let first = Counts::default().after(Some(&journal(1, &[(b'+', a)])));
        let second = first.after(Some(&journal(2, &[(b'+', a), (b'-', a), (b'+', b)])));
        assert_eq!(second.crashes, HashMap::from([(b, 1)]), "a is forgotten");
        let third = second.after(Some(&journal(3, &[(b'+', a)])));
        assert_eq!(
            third.crashes,
            HashMap::from([(a, 1)]),
            "a starts again at one"
        );
    }

    #[test]
    fn a_clean_stop_forgets_every_count_and_a_journal_is_counted_once() {
        let a = id();
        let first = Counts::default().after(Some(&journal(1, &[(b'+', a)])));
        assert_eq!(first.after(None), Counts::default(), "clean stop: nothing");
        // A crash during start, before the fresh journal: the same journal again.
        assert_eq!(first.after(Some(&journal(1, &[(b'+', a)]))), first);
        let text = first.render();
        assert_eq!(Counts::parse(&text), first);
        assert_eq!(Counts::parse("junk\n12 x\n"), Counts::default());
    }

    /// The files as the daemon uses them: runs that crash (the journal is dropped, not removed)
    /// and a run that stops cleanly.
    #[test]
    fn crash_sequences_through_the_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (id(), id());
        let (mut j, crashes) = recover(dir.path());
        assert!(crashes.is_empty(), "first start");
        j.started([a, b]);
        j.ended(b, false);
        j.flush();
        drop(j); // crash 1: a in flight
        let (mut j, crashes) = recover(dir.path());
        assert_eq!(crashes, HashMap::from([(a, 1)]));
        assert!(dir.path().join(COUNTS).exists());
        j.started([a]);
        drop(j); // crash 2: a in flight again
        let (mut j, crashes) = recover(dir.path());
        assert_eq!(crashes, HashMap::from([(a, 2)]));
        j.started([b]);
        drop(j); // crash 3: only b
        let (mut j, crashes) = recover(dir.path());
        assert_eq!(crashes, HashMap::from([(b, 1)]));
        j.started([a]);
        j.remove(); // a clean stop, with a still in flight (abandoned)
        assert!(!dir.path().join(JOURNAL).exists());
        let (_j, crashes) = recover(dir.path());
        assert!(crashes.is_empty());
        assert!(!dir.path().join(COUNTS).exists());
    }

    #[test]
    fn the_journal_is_compacted_and_keeps_what_is_in_flight() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(JOURNAL);
        let mut j = Journal::start(path.clone(), 9);
        let kept = id();
        j.started([kept]);
        for _ in 0..40_000 {
            let x = id();
            j.started([x]);
            j.ended(x, false);
        }
        j.flush();
        let bytes = std::fs::read(&path).expect("journal");
        assert!(bytes.len() as u64 <= COMPACT_AT, "{} bytes", bytes.len());
        assert!(bytes.len() > 100_000, "appended to since the rewrite");
        assert_eq!(parse_journal(&bytes), (Some(9), HashSet::from([kept])));
    }

    #[test]
    fn ends_wait_for_the_next_write_but_a_suspects_end_does_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(JOURNAL);
        let on_disk = || parse_journal(&std::fs::read(&path).expect("journal")).1;
        let mut j = Journal::start(path.clone(), 1);
        let (a, b, c) = (id(), id(), id());
        j.started([a, b]);
        assert_eq!(on_disk(), HashSet::from([a, b]), "written before they run");
        j.ended(a, false);
        j.started([]);
        assert_eq!(on_disk(), HashSet::from([a, b]), "a's end waits");
        assert!(j.has_pending());
        j.started([c]);
        assert_eq!(
            on_disk(),
            HashSet::from([b, c]),
            "written with the next start"
        );
        j.ended(b, false);
        std::thread::sleep(STALE + Duration::from_millis(50));
        j.started([]);
        assert_eq!(on_disk(), HashSet::from([c]), "written once stale");
        assert!(!j.has_pending());
        j.ended(c, true);
        assert_eq!(
            on_disk(),
            HashSet::new(),
            "a suspect's end is written at once"
        );
    }

    #[test]
    fn a_journal_that_cannot_be_written_is_no_journal() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("gone");
        let (mut j, crashes) = recover(&missing);
        assert!(crashes.is_empty());
        j.started([id()]);
        assert!(j.failed_at.is_some());
        assert!(!missing.join(JOURNAL).exists());
    }

    #[tokio::test]
    async fn suspects_take_turns_and_others_do_not_wait() {
        let suspects = Suspects::new();
        let (a, b, c) = (id(), id(), id());
        suspects.add(a);
        suspects.add(b);
        assert!(suspects.contains(a) && !suspects.contains(c));
        let short = Duration::from_millis(200);
        assert!(suspects.turn(c).await.is_none(), "not a suspect");
        let turn_a = suspects.turn(a).await.expect("a's turn");
        assert!(!suspects.contains(a), "tried: no longer a suspect");
        let waiting = tokio::time::timeout(short, suspects.turn(b)).await;
        assert!(waiting.is_err(), "b waits while a has its turn");
        suspects.add(b);
        drop(turn_a);
        let turn_b = tokio::time::timeout(short, suspects.turn(b)).await;
        assert!(matches!(turn_b, Ok(Some(_))), "b's turn once a ended");
    }
}
