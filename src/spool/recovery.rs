//! Rebuilding the spool index at start-up from the segment files.
//!
//! Every segment is scanned front to back. A record whose payload reads as zeros was destroyed;
//! one that opens is live (the last state record of a message wins). Anything else (a torn tail
//! from a crash mid-batch, a flipped bit, a missing key) is copied to `quarantine/` and reported:
//! never a panic and never a silent drop. A torn tail can only belong to a batch that was never
//! synced and so never acknowledged, but it is quarantined all the same, because the scan cannot
//! prove that. Quarantined copies are personal data like any message: they are deleted
//! `privacy.retention_days` after they were set aside ([`purge_quarantine`]).

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::bodyfile;
use super::envelope::StateSummary;
use super::faults::{FaultPoint, Faults};
use super::record::{self, Header, HeaderError, Kind, Part, HEADER_LEN};
use super::writer::remove_segment_files;
use super::{key_path, key_purpose, Entry, Finals, Index, Loc, QueueId, Segment, SpoolError};
use crate::crypto::Key;

/// What recovery found.
#[derive(Debug, Default)]
pub struct RecoveryReport {
    /// Live messages put back in the index.
    pub recovered: usize,
    /// Segment files scanned.
    pub segments: usize,
    /// Byte ranges that could not be read and were set aside.
    pub quarantined: Vec<Quarantined>,
    /// Segments left in place, unread, because they could not be read at all.
    pub unreadable: Vec<Unreadable>,
}

/// A segment recovery could not read; it stays on disk untouched.
#[derive(Debug)]
pub struct Unreadable {
    pub segment: u64,
    pub path: PathBuf,
    pub reason: String,
}

/// Attempts at reading a segment or its key before it is reported unreadable.
const READ_ATTEMPTS: u32 = 3;
const READ_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(100);

/// One range set aside by recovery.
#[derive(Debug)]
pub struct Quarantined {
    pub segment: u64,
    pub offset: u64,
    pub len: u64,
    pub reason: String,
    /// Where the copied bytes are.
    pub path: PathBuf,
    /// False when the copy could not be written: the segment is then kept as it is.
    pub saved: bool,
}

/// Scans every segment under `dir`. Returns the index, the report and the next segment number.
pub(super) fn recover(
    dir: &Path,
    master: &Key,
    faults: &Faults,
) -> Result<(Index, RecoveryReport, u64), SpoolError> {
    let numbers = segment_numbers(dir)?;
    let next = numbers.last().map_or(1, |n| n + 1);
    let mut index = Index::default();
    let mut report = RecoveryReport::default();
    let mut found = Found::default();
    // Segments that must stay even if nothing in them is live (a quarantine copy failed).
    let mut keep = HashSet::new();
    let mut reader = SegmentReader::default();
    for n in numbers {
        let stores = (&mut index, &mut found, &mut report);
        if read_segment(dir, n, master, faults, &mut reader, stores) {
            keep.insert(n);
        }
    }
    // The segment buffer (up to a segment's size) goes before the map is built.
    drop(reader);
    let spilled = std::mem::take(&mut found.spilled);
    index.messages = found.into_messages();
    index.spilled = spilled
        .into_iter()
        .filter(|id| index.messages.contains_key(id))
        .collect();
    finish_final(dir, &mut index, &mut keep);
    remove_empty(dir, &mut index, &keep);
    // Only a scan that read everything may call a body file an orphan.
    let complete = report.unreadable.is_empty() && report.quarantined.is_empty();
    sweep_bodies(dir, &index, complete)?;
    if let Err(e) = crate::crypto::sync_dir(dir) {
        tracing::warn!(error = %e, "spool recovery: cannot sync the spool directory");
    }
    report.recovered = index.messages.len();
    Ok((index, report, next))
}

/// The numbers of every segment and key file under `dir`, ascending. A key whose segment never
/// got created (a crash between the two) is harmless, but its number is not to be reused.
fn segment_numbers(dir: &Path) -> Result<Vec<u64>, SpoolError> {
    let mut numbers = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        let n = name
            .strip_suffix(".seg")
            .or_else(|| name.strip_suffix(".key"))
            .and_then(|s| s.parse::<u64>().ok());
        numbers.extend(n);
    }
    numbers.sort_unstable();
    numbers.dedup();
    Ok(numbers)
}

/// Reads segment `n` into the index (its messages, and its state records into `states`).
/// Returns true when the segment must be kept whatever it holds: a quarantine copy failed.
fn read_segment(
    dir: &Path,
    n: u64,
    master: &Key,
    faults: &Faults,
    reader: &mut SegmentReader,
    (index, found, report): (&mut Index, &mut Found, &mut RecoveryReport),
) -> bool {
    let seg_path = super::segment_path(dir, n);
    if !seg_path.exists() {
        remove_segment_files(dir, n);
        return false;
    }
    report.segments += 1;
    let Some((data, key)) = open_segment(dir, n, master, faults, reader, report) else {
        return false;
    };
    let file = match OpenOptions::new().read(true).write(true).open(&seg_path) {
        Ok(f) => Arc::new(f),
        Err(e) => {
            let reason = format!("cannot open for writing: {e}");
            unreadable(n, &seg_path, &reason, report);
            return false;
        }
    };
    let quarantined = report.quarantined.len();
    scan(dir, n, data, &key, found, report);
    index.segments.insert(n, Segment { file, key, live: 0 });
    report.quarantined[quarantined..].iter().any(|q| !q.saved)
}

/// What the scan of the segments found, before it goes into the index.
#[derive(Default)]
struct Found {
    /// Live message records, in the order read.
    messages: Vec<(QueueId, Entry)>,
    /// State records, in the order read (so the last of a message's is its newest).
    states: Vec<(QueueId, RecoveredState)>,
    /// Messages whose body is in a body file.
    spilled: Vec<QueueId>,
}

impl Found {
    /// The index's map of messages, each with its newest state record (when the recipient
    /// counts agree). Lists rather than maps until here, and the map built at once from the
    /// sorted list (full B-tree nodes): a million messages cost their entries, not tables
    /// with room to spare.
    fn into_messages(self) -> BTreeMap<QueueId, Entry> {
        let Found {
            mut messages,
            mut states,
            ..
        } = self;
        messages.sort_unstable_by_key(|(id, _)| *id);
        // Stable: of one message's state records, the newest stays last.
        states.sort_by_key(|(id, _)| *id);
        let mut states = states.into_iter().peekable();
        for (id, entry) in messages.iter_mut() {
            let mut newest = None;
            while let Some((next, state)) = states.next_if(|(next, _)| next <= id) {
                if next == *id {
                    newest = Some(state);
                }
            }
            if let Some(state) = newest.filter(|s| s.finals.len() == entry.finals.len()) {
                entry.state = Some(state.loc);
                entry.finals = state.finals;
                entry.due = state.due;
            }
        }
        drop(states);
        messages.into_iter().collect()
    }
}

/// What recovery keeps of a state record: where it is, and what the index holds of it (the
/// queue's data stays on disk).
struct RecoveredState {
    loc: Loc,
    finals: Finals,
    due: i64,
}

/// Messages final but not yet punched when the previous run stopped: finishes the job. A punch
/// that fails now is tried again at the next start (the state record still says final), so its
/// segment is kept.
fn finish_final(dir: &Path, index: &mut Index, keep: &mut HashSet<u64>) {
    let dead: Vec<QueueId> = index
        .messages
        .iter()
        .filter(|(_, e)| e.finals.all_final())
        .map(|(id, _)| *id)
        .collect();
    for id in dead {
        let Some(e) = index.messages.remove(&id) else {
            continue;
        };
        // A body file may go only once its record's punch is on disk.
        let spilled = index.spilled.contains(&id);
        let mut punched = true;
        for loc in std::iter::once(e.message).chain(e.state) {
            let Ok(seg) = index.segment_of(loc) else {
                continue;
            };
            let offset = loc.offset + HEADER_LEN as u64;
            let done =
                super::writer::punch_hole(&seg.file, offset, loc.len as u64).and_then(|()| {
                    if spilled {
                        seg.file.sync_data()
                    } else {
                        Ok(())
                    }
                });
            if let Err(err) = done {
                tracing::warn!(segment = loc.segment, error = %err, "spool recovery: cannot punch a final record; will retry at next start");
                keep.insert(u64::from(loc.segment));
                punched = false;
            }
        }
        if index.spilled.remove(&id) && punched {
            bodyfile::remove(&bodyfile::path(dir, id));
        }
    }
}

/// Body files against the records that commit them. A live spilled message whose file is
/// missing is reported (its delivery attempts fail, and it bounces in the end rather than
/// vanish). A file that no live record commits is an orphan: an upload that never finished,
/// or a message destroyed just before a crash. Orphans are removed only after a `complete`
/// scan; otherwise they stay for the next start.
fn sweep_bodies(dir: &Path, index: &Index, complete: bool) -> Result<(), SpoolError> {
    let mut orphans = 0usize;
    let mut present = HashSet::new();
    for entry in std::fs::read_dir(dir.join(bodyfile::DIR))? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(id) = bodyfile::id_of(&name.to_string_lossy()) else {
            continue;
        };
        if index.spilled.contains(&id) {
            present.insert(id);
        } else if complete {
            bodyfile::remove(&entry.path());
            orphans += 1;
        }
    }
    if orphans > 0 {
        tracing::info!(
            orphans,
            "spool recovery: removed body files of messages never committed or already destroyed"
        );
    }
    for id in index.spilled.difference(&present) {
        tracing::error!(queue_id = %id, path = %bodyfile::path(dir, *id).display(), "spool recovery: the body file of a queued message is missing; its delivery will fail and it will bounce. Restore the file from a backup if there is one");
    }
    Ok(())
}

/// Counts what each segment still holds, and removes those that hold nothing (unless kept).
fn remove_empty(dir: &Path, index: &mut Index, keep: &HashSet<u64>) {
    let live: Vec<u64> = index
        .messages
        .values()
        .flat_map(|e| std::iter::once(e.message.segment).chain(e.state.map(|s| s.segment)))
        .map(u64::from)
        .collect();
    for n in live {
        if let Some(seg) = index.segments.get_mut(&n) {
            seg.live += 1;
        }
    }
    let empty: Vec<u64> = index
        .segments
        .iter()
        .filter(|(n, s)| s.live == 0 && !keep.contains(n))
        .map(|(n, _)| *n)
        .collect();
    for n in empty {
        index.segments.remove(&n);
        remove_segment_files(dir, n);
    }
}

/// Reads a segment and its key, retrying errors that may pass. None when it cannot be read:
/// then it is left as it is and reported, unless it holds nothing but zeros (all destroyed).
fn open_segment<'r>(
    dir: &Path,
    n: u64,
    master: &Key,
    faults: &Faults,
    reader: &'r mut SegmentReader,
    report: &mut RecoveryReport,
) -> Option<(&'r [u8], Arc<Key>)> {
    let seg_path = super::segment_path(dir, n);
    let data = match retry(|| reader.read(&seg_path).map_err(|e| e.to_string())) {
        Ok(()) => &reader.buf[..],
        Err(e) => {
            unreadable(n, &seg_path, &format!("cannot read: {e}"), report);
            return None;
        }
    };
    let key_file = key_path(dir, n);
    let key = retry(|| {
        faults
            .check(FaultPoint::ReadKey)
            .map_err(|e| e.to_string())?;
        master
            .read_wrapped(&key_file, &key_purpose(n))
            .map_err(|e| e.to_string())
    });
    match key {
        Ok(k) => Some((data, Arc::new(k))),
        Err(_) if data.iter().all(|b| *b == 0) => {
            // Nothing but destroyed records: there is nothing to lose.
            remove_segment_files(dir, n);
            None
        }
        Err(e) => {
            unreadable(
                n,
                &seg_path,
                &format!("its key {} is unusable: {e}", key_file.display()),
                report,
            );
            None
        }
    }
}

/// Reads whole segments into one buffer, reused from one segment to the next: a fresh 64 MiB
/// buffer per segment would cost a page fault (and a zeroed page) per 4 KiB read.
#[derive(Default)]
struct SegmentReader {
    buf: Vec<u8>,
}

impl SegmentReader {
    fn read(&mut self, path: &Path) -> std::io::Result<()> {
        use std::io::Read;
        self.buf.clear();
        File::open(path)?.read_to_end(&mut self.buf)?;
        Ok(())
    }
}

/// Runs `f` up to [`READ_ATTEMPTS`] times while it fails.
fn retry<T>(mut f: impl FnMut() -> Result<T, String>) -> Result<T, String> {
    let mut attempt = 1;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if attempt >= READ_ATTEMPTS => return Err(e),
            Err(e) => {
                tracing::warn!(attempt, error = %e, "spool recovery: read failed; retrying");
                std::thread::sleep(READ_RETRY_DELAY * attempt);
                attempt += 1;
            }
        }
    }
}

/// Reports a segment left in place because it cannot be read, and what the operator can do.
fn unreadable(n: u64, path: &Path, reason: &str, report: &mut RecoveryReport) {
    tracing::error!(
        segment = n,
        path = %path.display(),
        reason,
        "spool recovery: segment left in place unread; its messages wait. Check the disk and \
         the file's permissions, and that server.master_key is the key this spool was written \
         with, then restart Postern: the segment is read again at every start"
    );
    report.unreadable.push(Unreadable {
        segment: n,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    });
}

/// Scans one segment's bytes.
fn scan(
    dir: &Path,
    n: u64,
    data: &[u8],
    key: &Key,
    found: &mut Found,
    report: &mut RecoveryReport,
) {
    let mut pos = 0usize;
    while pos < data.len() {
        // Nothing but zeros from here: the unused end of a segment zeroed ahead of use
        // ([`super::spare`]), or what a crash past the last sync can leave. No record.
        if data[pos] == 0 && data[pos..].iter().all(|b| *b == 0) {
            return;
        }
        let header = match Header::decode(&data[pos..]) {
            Ok(h) if pos + HEADER_LEN + h.len as usize <= data.len() => h,
            Ok(_) | Err(HeaderError::Short) => {
                quarantine(
                    dir,
                    n,
                    pos,
                    &data[pos..],
                    "truncated record at end of segment",
                    report,
                );
                return;
            }
            Err(HeaderError::Corrupt) => {
                // Resynchronise on the next position where a valid header starts.
                let next = (pos + 1..data.len())
                    .find(|&p| data[p..].starts_with(b"PSTR") && Header::decode(&data[p..]).is_ok())
                    .unwrap_or(data.len());
                quarantine(
                    dir,
                    n,
                    pos,
                    &data[pos..next],
                    "corrupt record header",
                    report,
                );
                pos = next;
                continue;
            }
        };
        let end = pos + HEADER_LEN + header.len as usize;
        let record = &data[pos..end];
        let loc = Loc {
            segment: n as u32,
            offset: pos as u64,
            len: header.len,
        };
        if let Err(reason) = take_record(key, header, loc, record, found) {
            quarantine(dir, n, pos, record, reason, report);
        }
        pos = end;
    }
}

/// Takes one whole record (header and payload) into what the scan found: a live message or
/// state record, or nothing for a destroyed one (its payload reads as zeros). Err is why the
/// record is to be set aside.
fn take_record(
    key: &Key,
    header: Header,
    loc: Loc,
    record: &[u8],
    found: &mut Found,
) -> Result<(), &'static str> {
    let (raw, payload) = super::split_record(record);
    if payload.iter().all(|b| *b == 0) {
        return Ok(());
    }
    let plain =
        open_for_recovery(key, header.kind, raw, payload).ok_or("record fails authentication")?;
    match header.kind {
        Kind::Message | Kind::Whole | Kind::Spilled => {
            let recipients =
                recipient_count(header.kind, &plain).ok_or("message record does not decode")?;
            if header.kind == Kind::Spilled {
                found.spilled.push(header.id);
            }
            let entry = Entry {
                message: loc,
                state: None,
                finals: Finals::new(recipients),
                due: 0,
            };
            found.messages.push((header.id, entry));
        }
        Kind::State => {
            let state: StateSummary =
                serde_json::from_slice(&plain).map_err(|_| "state record does not decode")?;
            let state = RecoveredState {
                loc,
                finals: Finals::from(&state.final_rcpts[..]),
                due: state.due,
            };
            found.states.push((header.id, state));
        }
    }
    Ok(())
}

/// Opens what recovery needs of a record: a message's envelope (never its body, where the two
/// are sealed apart), or a state record.
fn open_for_recovery(
    key: &Key,
    kind: Kind,
    raw: &[u8; HEADER_LEN],
    payload: &[u8],
) -> Option<Vec<u8>> {
    match kind {
        Kind::Message | Kind::Spilled => record::open_part(key, raw, payload, Part::Envelope).ok(),
        Kind::Whole | Kind::State => key.open(Header::aad(raw), payload).ok(),
    }
}

/// The number of recipients in what [`open_for_recovery`] opened of a message record.
fn recipient_count(kind: Kind, plain: &[u8]) -> Option<usize> {
    let envelope = match kind {
        Kind::Whole => super::envelope::whole_envelope(plain)?,
        _ => plain,
    };
    super::envelope::recipient_count(envelope)
}

/// Copies bytes aside (with the segment key, so that they can be examined) and reports them.
fn quarantine(
    dir: &Path,
    n: u64,
    offset: usize,
    bytes: &[u8],
    reason: &str,
    report: &mut RecoveryReport,
) {
    if bytes.iter().all(|b| *b == 0) {
        // Zeros carry no message: a filesystem can leave them after a crash past the last sync.
        tracing::warn!(
            segment = n,
            offset,
            len = bytes.len(),
            "spool recovery: skipping zero-filled tail"
        );
        return;
    }
    let qdir = dir.join("quarantine");
    let path = qdir.join(format!("{n:08}-{offset}.rec"));
    let saved = File::create(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::copy(key_path(dir, n), qdir.join(format!("{n:08}.key"))))
        .and_then(|_| crate::crypto::sync_dir(&qdir));
    if let Err(e) = &saved {
        tracing::error!(segment = n, offset, error = %e, "spool recovery: cannot write quarantine copy; the segment is kept as it is");
    }
    tracing::error!(
        segment = n,
        offset,
        len = bytes.len(),
        reason,
        path = %path.display(),
        "spool recovery: record quarantined"
    );
    report.quarantined.push(Quarantined {
        segment: n,
        offset: offset as u64,
        len: bytes.len() as u64,
        reason: reason.to_string(),
        path,
        saved: saved.is_ok(),
    });
}

/// Deletes the files of `quarantine/` (record copies and their key copies) last written before
/// `cutoff` (Unix time); returns how many. A key copy is rewritten with every record of its
/// segment set aside, so it never goes before the records it opens.
pub(super) fn purge_quarantine(qdir: &Path, cutoff: i64) -> std::io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(qdir)? {
        let entry = entry?;
        let written = entry
            .metadata()?
            .modified()?
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        if written < cutoff {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    if removed > 0 {
        crate::crypto::sync_dir(qdir)?;
    }
    Ok(removed)
}
