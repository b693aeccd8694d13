//! Pseudonym keys by generation. The key that names people in log lines and in the ledger's
//! index is replaced every `privacy.pseudonym_rotation`, and an old key is destroyed as soon as
//! the last day it named has been purged: from then on its pseudonyms (in old logs, say) name
//! nobody, even for someone holding the whole data directory and the master key.
//!
//! # Generations are bound to days
//! A generation takes effect at the start of a UTC day, never during one, and everything about
//! the mail of day D (its records' index tags and stored pseudonyms, its sender entries) is made
//! with the generation of D. So whatever comes later about a record (an outcome days after, an
//! export, an erasure) finds the right pseudonym from the record's day alone, without trying
//! every key, and the writer never has to guess which key a stored record was indexed under.
//! For that the mapping of a day to its generation must never change once mail of that day may
//! exist: a rotation makes the next generation start *tomorrow*, never today.
//!
//! # When a generation goes
//! A generation covers the days from its start to the day before the next one starts (the
//! oldest also covers every earlier day). Once the purge has removed the last of those days, no
//! record, index entry or bounce run made with it remains, so its key file is destroyed: that
//! is `retention_days` after the next generation started, an overlap during which export and
//! erase still find the older records.
//!
//! The suppression list does not use these keys (see [`crate::suppress`]): an opt-out must be
//! honoured for longer than any generation lives.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use super::day_of;
use crate::crypto::{io_err, sync_dir, CryptoError, Key, Pseudonymizer};

/// The pseudonym keys of `<data_dir>/ledger/pseudonyms/`, one file per generation, named by
/// the day it takes effect (`20261101.key`) and wrapped by the master key.
pub(crate) struct Generations {
    dir: PathBuf,
    master: Key,
    lowercase_local: bool,
    /// Start day (`YYYYMMDD`) to pseudonymiser, oldest first. Never empty: [`Generations::open`]
    /// makes one, and [`Generations::destroy_before`] never destroys the newest.
    held: RwLock<BTreeMap<String, Pseudonymizer>>,
}

impl Generations {
    /// Opens `dir` and loads every generation. With none yet, the first starts on `now`'s day,
    /// with `first` as its key (one kept from before generations existed) or a new one.
    pub fn open(
        dir: PathBuf,
        master: Key,
        lowercase_local: bool,
        first: Option<&Key>,
        now: i64,
    ) -> Result<Generations, CryptoError> {
        std::fs::create_dir_all(&dir).map_err(|source| io_err(&dir, source))?;
        let generations = Generations {
            dir,
            master,
            lowercase_local,
            held: RwLock::new(BTreeMap::new()),
        };
        generations.load()?;
        let mut held = generations.write();
        if held.is_empty() {
            let key = match first {
                Some(k) => k.clone(),
                None => Key::generate()?,
            };
            generations.add(&mut held, &day_of(now), &key)?;
        }
        drop(held);
        Ok(generations)
    }

    /// Reads every key file. One that does not open is an error, not skipped: without it the
    /// records of its days could neither be exported nor erased.
    fn load(&self) -> Result<(), CryptoError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| io_err(&self.dir, source))?;
        let mut held = self.write();
        for entry in entries {
            let entry = entry.map_err(|source| io_err(&self.dir, source))?;
            let name = entry.file_name();
            let Some(start) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".key"))
                .filter(|d| start_time(d).is_some())
            else {
                continue;
            };
            let key = self.master.read_wrapped(&entry.path(), &purpose(start))?;
            held.insert(
                start.to_string(),
                Pseudonymizer::new(&key, self.lowercase_local),
            );
        }
        Ok(())
    }

    /// Writes a generation's key file (fsync'd) and holds it.
    fn add(
        &self,
        held: &mut BTreeMap<String, Pseudonymizer>,
        start: &str,
        key: &Key,
    ) -> Result<(), CryptoError> {
        self.master
            .write_wrapped(&self.path(start), &purpose(start), key)?;
        held.insert(
            start.to_string(),
            Pseudonymizer::new(key, self.lowercase_local),
        );
        Ok(())
    }

    /// The pseudonymiser of `day` (`YYYYMMDD`): the newest generation started on or before it,
    /// or the oldest for a day before every start.
    pub fn for_day(&self, day: &str) -> Pseudonymizer {
        let held = self.read();
        held.range::<str, _>((Bound::Unbounded, Bound::Included(day)))
            .next_back()
            .or_else(|| held.iter().next())
            .map(|(_, p)| p.clone())
            .unwrap_or_else(|| unreachable!("a generation is always held"))
    }

    /// Start days of the generations held, oldest first.
    pub fn starts(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Makes the next generation, starting tomorrow, once the newest has been in force for
    /// `period` at `now`; returns its start day. A generation that has not started yet has
    /// served nothing, so at most one ever waits to start, even with the clock set back.
    pub fn rotate(&self, now: i64, period: Duration) -> Result<Option<String>, CryptoError> {
        // Under the write lock: two retention passes at once (the hourly one and an operator's
        // `privacy purge`) must not both make a generation.
        let mut held = self.write();
        let Some(newest) = held.keys().next_back().cloned() else {
            return Ok(None);
        };
        let since = start_time(&newest).unwrap_or(i64::MIN);
        let period = i64::try_from(period.as_secs()).unwrap_or(i64::MAX);
        if since.saturating_add(period) > now {
            return Ok(None);
        }
        let start = day_of(now + 86_400);
        self.add(&mut held, &start, &Key::generate()?)?;
        Ok(Some(start))
    }

    /// Destroys each generation whose days all come before `cutoff`, the oldest day the
    /// ledger still holds (so: whose successor starts on or before it); returns their start
    /// days. Call only once the days before `cutoff` are purged.
    pub fn destroy_before(&self, cutoff: &str) -> Result<Vec<String>, CryptoError> {
        let mut held = self.write();
        let starts: Vec<String> = held.keys().cloned().collect();
        let mut gone = Vec::new();
        for pair in starts.windows(2) {
            if pair[1].as_str() > cutoff {
                break;
            }
            held.remove(&pair[0]);
            let path = self.path(&pair[0]);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(io_err(&path, source)),
            }
            gone.push(pair[0].clone());
        }
        if !gone.is_empty() {
            sync_dir(&self.dir).map_err(|source| io_err(&self.dir, source))?;
        }
        Ok(gone)
    }

    fn path(&self, start: &str) -> PathBuf {
        self.dir.join(format!("{start}.key"))
    }

    fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, Pseudonymizer>> {
        self.held.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<String, Pseudonymizer>> {
        self.held.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Bound into the wrapping, so that a key file cannot be passed off as another generation's.
fn purpose(start: &str) -> String {
    format!("postern pseudonym key from {start}")
}

/// Midnight UTC of `day` (`YYYYMMDD`), or none if it is not such a day.
fn start_time(day: &str) -> Option<i64> {
    if day.len() != 8 {
        return None;
    }
    let date = chrono::NaiveDate::parse_from_str(day, "%Y%m%d").ok()?;
    Some(date.and_hms_opt(0, 0, 0)?.and_utc().timestamp())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// 2026-11-01 03:00 UTC.
    const T0: i64 = 1_793_491_200 + 3 * 3600;
    const DAY: i64 = 86_400;
    const WEEK: Duration = Duration::from_secs(7 * 86_400);

    fn open(dir: &Path, master: &Key, now: i64) -> Generations {
        Generations::open(dir.to_path_buf(), master.clone(), true, None, now).unwrap()
    }

    /// The schedule: nothing before the period is up; then one generation, from tomorrow,
    /// and no second one while it waits; days map to the generation in force on them.
    #[test]
    fn rotation_starts_tomorrow_once_the_period_is_up() {
        let dir = tempfile::tempdir().unwrap();
        let master = Key::generate().unwrap();
        let g = open(dir.path(), &master, T0);
        assert_eq!(g.starts(), vec![day_of(T0)]);
        // The first generation counts from midnight of its day.
        assert_eq!(g.rotate(T0 + 7 * DAY - 3 * 3600 - 1, WEEK).unwrap(), None);
        let start = g.rotate(T0 + 7 * DAY - 3 * 3600, WEEK).unwrap();
        assert_eq!(start, Some(day_of(T0 + 8 * DAY)));
        assert_eq!(
            g.rotate(T0 + 7 * DAY + 3600, WEEK).unwrap(),
            None,
            "one waiting generation at most"
        );
        assert_eq!(
            g.rotate(T0 + 7 * DAY + 3600, Duration::ZERO).unwrap(),
            None,
            "however short the period"
        );
        let (old, new) = (g.for_day(&day_of(T0)), g.for_day(&day_of(T0 + 8 * DAY)));
        assert_ne!(old.of("bob@dest.test"), new.of("bob@dest.test"));
        for (day, want) in [(-30, &old), (7, &old), (8, &new), (400, &new)] {
            let got = g.for_day(&day_of(T0 + day * DAY));
            assert_eq!(got.of("bob@dest.test"), want.of("bob@dest.test"), "{day}");
        }
        // Reopened: the same keys, the same mapping.
        let again = open(dir.path(), &master, T0 + 9 * DAY);
        assert_eq!(again.starts(), g.starts());
        assert_eq!(
            again.for_day(&day_of(T0)).of("bob@dest.test"),
            old.of("bob@dest.test")
        );
    }

    /// A generation goes when its successor's start is the oldest day held, not a day before.
    #[test]
    fn a_generation_is_destroyed_when_its_last_day_is_purged() {
        let dir = tempfile::tempdir().unwrap();
        let master = Key::generate().unwrap();
        let g = open(dir.path(), &master, T0);
        let first = day_of(T0);
        let second = g.rotate(T0 + 8 * DAY, WEEK).unwrap().unwrap();
        let file = dir.path().join(format!("{first}.key"));
        assert!(file.exists());
        assert!(g.destroy_before(&day_of(T0 + 8 * DAY)).unwrap().is_empty());
        assert!(file.exists(), "its last day is still held");
        assert_eq!(g.destroy_before(&second).unwrap(), vec![first]);
        assert!(!file.exists());
        assert_eq!(g.starts(), vec![second.clone()]);
        assert!(
            g.destroy_before("99991231").unwrap().is_empty(),
            "never the newest"
        );
        assert_eq!(open(dir.path(), &master, T0).starts(), vec![second]);
    }

    #[test]
    fn a_key_file_of_another_generation_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let master = Key::generate().unwrap();
        let _ = open(dir.path(), &master, T0);
        std::fs::rename(
            dir.path().join(format!("{}.key", day_of(T0))),
            dir.path().join("20200101.key"),
        )
        .unwrap();
        assert!(matches!(
            Generations::open(dir.path().to_path_buf(), master, true, None, T0),
            Err(CryptoError::Open)
        ));
    }
}
