//! The spool's single writer thread: group commit, state updates and destruction.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::faults::FaultPoint;
use super::inbox::{Next, Receiver};
use super::record::{self, Kind, HEADER_LEN};
use super::spare::{self, Spares};
use super::{
    bodyfile::{self, Spill},
    key_path, key_purpose, segment_path, Entry, Finals, Index, Liveness, Loc, MessageState,
    QueueData, QueueId, Segment, Shared, SpoolError,
};
use crate::crypto::{sync_dir, Key};

/// Work for the writer. Each carries the channel its answer goes back on.
pub(super) enum Request {
    Store {
        id: QueueId,
        /// The envelope as encoded for sealing; the body is `head` then `body`.
        envelope: Vec<u8>,
        head: Vec<u8>,
        body: Vec<u8>,
        rcpts: usize,
        /// The body file of a [`Kind::Spilled`] message (synced already); `head` and `body` are
        /// then that record's body part. Kept once the record is synced, removed otherwise.
        spill: Option<Spill>,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    Update {
        id: QueueId,
        final_rcpts: Vec<usize>,
        queue: Option<QueueData>,
        reply: oneshot::Sender<Result<Liveness, SpoolError>>,
    },
    Destroy {
        id: QueueId,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
}

impl Request {
    /// About what the request adds to a pass's buffer (a state record is small).
    pub(super) fn encoded_size(&self) -> usize {
        const RECORD: usize = HEADER_LEN + 4 + 2 * crate::crypto::OVERHEAD;
        match self {
            Request::Store {
                envelope,
                head,
                body,
                ..
            } => RECORD + envelope.len() + head.len() + body.len(),
            Request::Update { .. } => RECORD + 256,
            Request::Destroy { .. } => 0,
        }
    }
}

/// How often the writer retries state records and punches the disk refused, when idle.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How old the free-space figure may get before a pass with new mail reads it again
/// (`statvfs`), while more than [`FREE_MARGIN`] is free above the reserve; in between, what
/// the writer appends is taken off it. Closer to the reserve every such pass reads it (another
/// process may be filling the disk), and a refusal always looks again first.
const FREE_REFRESH: Duration = Duration::from_millis(50);
const FREE_MARGIN: u64 = 256 << 20;
/// How long punches may wait, when no other work comes, for the sync that makes them durable.
const PUNCH_SYNC_DELAY: Duration = Duration::from_millis(5);

/// The segment being appended to.
struct Active {
    number: u64,
    file: Arc<File>,
    key: Arc<Key>,
    /// Bytes in the segment: the offset of the next record.
    len: u64,
}

impl Active {
    /// Where the record that starts at `start` in `buf` (this pass's appends) will sit.
    fn loc_of(&self, buf: &[u8], start: usize) -> Loc {
        Loc {
            // Segment numbers fit in 32 bits: one is made per start and per 64 MiB written.
            segment: self.number as u32,
            offset: self.len + start as u64,
            len: (buf.len() - start - HEADER_LEN) as u32,
        }
    }
}

pub(super) struct Writer {
    shared: Arc<Shared>,
    master: Key,
    segment_size: u64,
    /// None after a write or sync failure retired the last one, until a new one can be made.
    active: Option<Active>,
    /// The number the next segment gets. Only ever grows: a failed creation may leave files
    /// behind, and a number is never tried twice.
    next_number: u64,
    /// Destroyed records whose punch (or its sync) failed; retried every pass.
    unpunched: Vec<Loc>,
    /// Records punched but not yet synced: the next pass's sync makes them durable (see
    /// [`Writer::punch`]).
    punched: Vec<(Loc, Arc<File>)>,
    /// When the oldest of `punched` was made.
    punched_at: Option<std::time::Instant>,
    /// When the free space was last read from the filesystem.
    free_read: std::time::Instant,
    /// Makes the next segment's zeros ahead of use ([`super::spare`]); None when its thread
    /// could not start (segments then start empty, as they always may).
    spares: Option<Spares>,
}

/// A record appended in this pass, waiting for the sync to succeed.
enum Pending {
    Store {
        id: QueueId,
        loc: Loc,
        rcpts: usize,
        spill: Option<Spill>,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    Update {
        id: QueueId,
        /// Where the new state record went; None when nothing was written, because the update
        /// made every recipient final (the message is destroyed instead) or because the disk
        /// refused it (the state is kept in memory and retried).
        loc: Option<Loc>,
        state: MessageState,
        reply: oneshot::Sender<Result<Liveness, SpoolError>>,
    },
    Destroy {
        id: QueueId,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
}

impl Writer {
    pub(super) fn start(
        shared: Arc<Shared>,
        master: Key,
        first: u64,
        segment_size: u64,
    ) -> Result<Writer, SpoolError> {
        let mut writer = Writer {
            master,
            segment_size,
            active: None,
            next_number: first,
            unpunched: Vec::new(),
            punched: Vec::new(),
            punched_at: None,
            free_read: std::time::Instant::now(),
            spares: Spares::start(&shared.dir, segment_size)
                .map_err(|e| tracing::warn!(error = %e, "spool: cannot start the spare segment thread; segments start empty"))
                .ok(),
            shared,
        };
        // A full disk at start is no reason not to start: queued mail can still be delivered,
        // and every pass tries again to make a segment for new mail.
        if let Err(e) = writer.rotate() {
            tracing::error!(error = %e, "spool: cannot create a segment; new mail is refused until one can be made");
        }
        Ok(writer)
    }

    pub(super) fn run(mut self, inbox: Receiver) {
        loop {
            let backlog = self.has_backlog().then_some(if self.punched.is_empty() {
                RETRY_INTERVAL
            } else {
                PUNCH_SYNC_DELAY
            });
            match inbox.next(backlog) {
                Next::Batch(batch) => self.pass(batch),
                Next::Closed => break,
            }
        }
        // Last chance for state the disk refused before: written now or lost to a restart
        // (where the older state on disk means a recipient may be tried once more).
        if self.has_backlog() {
            self.pass(Vec::new());
        }
        self.sync_punches(None, true);
        spare::remove(&self.shared.dir);
    }

    fn has_backlog(&self) -> bool {
        !self.unpunched.is_empty()
            || !self.punched.is_empty()
            || !self.shared.index().unsynced.is_empty()
    }

    /// One group commit: append, sync once, answer, then punch what became dead.
    fn pass(&mut self, batch: Vec<Request>) {
        let wants_space = batch.iter().any(|r| matches!(r, Request::Store { .. }));
        if wants_space && (self.free_read.elapsed() >= FREE_REFRESH || self.near_reserve()) {
            self.read_free();
        }
        if let Err(e) = self.ensure_active() {
            tracing::error!(error = %e, "spool: cannot start a new segment; refusing new mail until it can");
        }
        self.ask_spare();
        let (buf, pending) = self.encode(batch);
        let synced = self.active.as_ref().map(|a| a.number as u32);
        let written = match (&self.active, buf.is_empty()) {
            (_, true) => Ok(()),
            (None, false) => Err(std::io::Error::other("no spool segment to write to")),
            (Some(_), false) => self.append_and_sync(&buf),
        };
        if let Err(e) = &written {
            tracing::error!(error = %e, "spool: write or sync failed; new mail in this batch refused, state changes kept in memory and retried");
        }
        // The punches of earlier passes: this pass's sync covered those in its segment; the
        // others are synced once the oldest has waited PUNCH_SYNC_DELAY.
        let covered = synced.filter(|_| written.is_ok() && !buf.is_empty());
        let due = self
            .punched_at
            .is_some_and(|t| t.elapsed() >= PUNCH_SYNC_DELAY);
        self.sync_punches(covered, due);
        let destroys = pending.iter().any(|p| matches!(p, Pending::Destroy { .. }));
        let (dead, finished) = self.publish(pending, written.as_ref().err());
        self.punch_and_answer(dead, finished, destroys);
    }

    /// Appends every record of the batch to one buffer: stores, state records, and state
    /// records still owed from passes whose write failed.
    fn encode(&mut self, batch: Vec<Request>) -> (Vec<u8>, Vec<Pending>) {
        // Sized up front: growing it by doubling would copy the batch over and over.
        let mut buf = Vec::with_capacity(batch.iter().map(Request::encoded_size).sum());
        let mut pending = Vec::with_capacity(batch.len());
        // States written in this pass, so two updates of one message in a batch compose.
        let mut updated: HashMap<QueueId, MessageState> = HashMap::new();
        // Bytes this batch takes of the free space.
        let mut taken = 0u64;
        for request in batch {
            match request {
                Request::Store {
                    id,
                    envelope,
                    head,
                    body,
                    rcpts,
                    spill,
                    reply,
                } => {
                    // The free-space reserve, counting what this batch already takes.
                    let size = (envelope.len() + head.len() + body.len()) as u64;
                    if !self.fits(taken, size) {
                        let _ = reply.send(Err(storage_full()));
                        continue;
                    }
                    taken += size;
                    let kind = match spill {
                        Some(_) => Kind::Spilled,
                        None => Kind::Message,
                    };
                    match self.append_message(&mut buf, kind, id, &envelope, &[&head, &body]) {
                        Ok(loc) => pending.push(Pending::Store {
                            id,
                            loc,
                            rcpts,
                            spill,
                            reply,
                        }),
                        Err(e) => drop(reply.send(Err(e))),
                    }
                }
                Request::Update {
                    id,
                    final_rcpts,
                    queue,
                    reply,
                } => {
                    let Some(state) = self.next_state(&updated, id, &final_rcpts, queue) else {
                        let _ = reply.send(Err(SpoolError::NotFound));
                        continue;
                    };
                    updated.insert(id, state.clone());
                    let loc = if state.all_final() {
                        None
                    } else {
                        self.append_state(&mut buf, id, &state)
                    };
                    pending.push(Pending::Update {
                        id,
                        loc,
                        state,
                        reply,
                    });
                }
                Request::Destroy { id, reply } => pending.push(Pending::Destroy { id, reply }),
            }
        }
        self.encode_owed(&mut buf, &updated, &mut pending);
        (buf, pending)
    }

    /// Whether `size` more bytes, after the `taken` this batch already takes, leave the
    /// free-space reserve intact. A refusal on a figure read a while ago reads it again.
    fn fits(&mut self, taken: u64, size: u64) -> bool {
        if self.fits_cached(taken, size) {
            return true;
        }
        self.read_free();
        self.fits_cached(taken, size)
    }

    fn fits_cached(&self, taken: u64, size: u64) -> bool {
        let free = self.shared.free.load(std::sync::atomic::Ordering::Relaxed);
        self.shared.fits(free.saturating_sub(taken), size)
    }

    fn near_reserve(&self) -> bool {
        !self.shared.has_room(FREE_MARGIN)
    }

    fn read_free(&mut self) {
        self.shared.refresh_free();
        self.free_read = std::time::Instant::now();
    }

    /// State records owed from earlier passes (the disk refused them), for messages this batch
    /// did not update anyway.
    fn encode_owed(
        &mut self,
        buf: &mut Vec<u8>,
        updated: &HashMap<QueueId, MessageState>,
        pending: &mut Vec<Pending>,
    ) {
        let owed: Vec<(QueueId, MessageState)> = {
            let index = self.shared.index();
            index
                .unsynced
                .iter()
                .filter(|(id, _)| !updated.contains_key(id))
                .map(|(id, state)| (*id, state.clone()))
                .collect()
        };
        for (id, state) in owed {
            if let Some(loc) = self.append_state(buf, id, &state) {
                let (reply, _) = oneshot::channel();
                pending.push(Pending::Update {
                    id,
                    loc: Some(loc),
                    state,
                    reply,
                });
            }
        }
    }

    /// The state a message will have after this update: the newest one (this batch's, else
    /// the index's) with `final_rcpts` set and the queue's data replaced. None when the message
    /// is not live.
    fn next_state(
        &self,
        updated: &HashMap<QueueId, MessageState>,
        id: QueueId,
        final_rcpts: &[usize],
        queue: Option<QueueData>,
    ) -> Option<MessageState> {
        let mut state = match updated.get(&id) {
            Some(s) => s.clone(),
            None => self.current_state(id, queue.is_none())?,
        };
        for &i in final_rcpts {
            if let Some(flag) = state.final_rcpts.get_mut(i) {
                *flag = true;
            }
        }
        if let Some(queue) = queue {
            state.queue_data = queue.data;
            state.due = queue.due;
        }
        Some(state)
    }

    /// A live message's state as the index has it; with `with_data`, with the queue's data read
    /// back from its state record too. Should that read fail, the data is left empty: the queue
    /// then starts its retry state afresh (a recipient may be tried early, never forgotten).
    fn current_state(&self, id: QueueId, with_data: bool) -> Option<MessageState> {
        if with_data {
            match super::read_current_state(&self.shared, id) {
                Err(SpoolError::NotFound) => return None,
                Ok(state) => return Some(state),
                Err(e) => {
                    tracing::error!(queue_id = %id, error = %e, "spool: cannot read a state record; the retry state starts afresh")
                }
            }
        }
        let index = self.shared.index();
        index.known_state(id).ok().map(|(state, _)| state)
    }

    /// Seals a state record into `buf`; None when there is no segment to put it in (it is
    /// then kept in memory and retried).
    fn append_state(&self, buf: &mut Vec<u8>, id: QueueId, state: &MessageState) -> Option<Loc> {
        let plain = serde_json::to_vec(state).ok()?;
        self.append_record(buf, Kind::State, id, &plain).ok()
    }

    fn append_message(
        &self,
        buf: &mut Vec<u8>,
        kind: Kind,
        id: QueueId,
        envelope: &[u8],
        body: &[&[u8]],
    ) -> Result<Loc, SpoolError> {
        let active = self.active.as_ref().ok_or_else(no_segment)?;
        let start = buf.len();
        record::append_message(buf, kind, id, &active.key, envelope, body)?;
        Ok(active.loc_of(buf, start))
    }

    fn append_record(
        &self,
        buf: &mut Vec<u8>,
        kind: Kind,
        id: QueueId,
        plain: &[u8],
    ) -> Result<Loc, SpoolError> {
        let active = self.active.as_ref().ok_or_else(no_segment)?;
        let start = buf.len();
        if let Err(e) = record::append(buf, kind, id, &active.key, plain) {
            buf.truncate(start);
            return Err(e.into());
        }
        Ok(active.loc_of(buf, start))
    }

    /// Applies the pass to the index. With `failed` set nothing of this pass reached the disk:
    /// stores are refused, while updates are applied in memory all the same (the queue must
    /// never deliver a final recipient again) and their records are owed. Returns the records
    /// that are now dead and the answers that wait for them to be punched.
    fn publish(
        &mut self,
        pending: Vec<Pending>,
        failed: Option<&std::io::Error>,
    ) -> (Vec<Loc>, Vec<Finished>) {
        let mut dead: Vec<Loc> = Vec::new();
        let mut finished = Vec::new();
        let mut index = self.shared.index();
        for p in pending {
            match p {
                Pending::Store {
                    id,
                    loc,
                    rcpts,
                    spill,
                    reply,
                } => {
                    if let Some(e) = failed {
                        let _ = reply.send(Err(SpoolError::Io(clone_io(e))));
                        continue;
                    }
                    if let Some(spill) = spill {
                        spill.commit();
                        index.spilled.insert(id);
                    }
                    index.add_live(loc.segment);
                    index.messages.insert(
                        id,
                        Entry {
                            message: loc,
                            state: None,
                            finals: Finals::new(rcpts),
                            due: 0,
                        },
                    );
                    let _ = reply.send(Ok(()));
                }
                Pending::Update {
                    id,
                    loc,
                    state,
                    reply,
                } => {
                    let loc = if failed.is_some() { None } else { loc };
                    let liveness = index.apply(id, loc, state, &mut dead);
                    finished.push(Finished::Update(reply, liveness));
                }
                Pending::Destroy { id, reply } => {
                    let found = index.remove(id);
                    let result = if found.is_empty() {
                        Err(SpoolError::NotFound)
                    } else {
                        Ok(())
                    };
                    dead.extend(found);
                    finished.push(Finished::Destroy(reply, result));
                }
            }
        }
        (dead, finished)
    }

    /// Punches the dead records (and those whose punch failed before), then answers. A punch
    /// that fails does not fail an update: the index already says the recipients are final, and
    /// the punch is retried. An operator's destroy does hear of it, since the bytes are not yet
    /// gone.
    fn punch_and_answer(&mut self, mut dead: Vec<Loc>, finished: Vec<Finished>, destroys: bool) {
        dead.append(&mut self.unpunched);
        // Each failed punch is logged where it fails.
        self.unpunched = self.punch(&dead);
        // An operator's destroy (an erasure) is answered once the bytes are gone for good.
        if destroys {
            self.sync_punches(None, true);
        }
        let punch_error = !self.unpunched.is_empty();
        for f in finished {
            match f {
                Finished::Update(reply, liveness) => drop(reply.send(Ok(liveness))),
                Finished::Destroy(reply, r) => {
                    let r = match r {
                        Ok(()) if punch_error => Err(SpoolError::Io(std::io::Error::other(
                            "destroyed records not yet punched out; retrying",
                        ))),
                        r => r,
                    };
                    let _ = reply.send(r);
                }
            }
        }
    }

    /// Asks for the next segment's spare once the active one is half full, if the disk has room
    /// for it and a segment more above the reserve (a spare must never be what fills the disk).
    fn ask_spare(&mut self) {
        let half_full = self
            .active
            .as_ref()
            .is_some_and(|a| a.len >= self.segment_size / 2);
        if half_full && self.shared.has_room(2 * self.segment_size) {
            if let Some(spares) = &mut self.spares {
                spares.ask();
            }
        }
    }

    /// Makes sure there is a segment with room to append to.
    fn ensure_active(&mut self) -> Result<(), SpoolError> {
        match &self.active {
            Some(a) if a.len < self.segment_size => Ok(()),
            _ => self.rotate(),
        }
    }

    /// Appends `buf` at the end of the active segment and fdatasyncs it. On failure the file is
    /// cut back so no half-written record stays, and the segment is retired: after a failed
    /// sync the page cache can no longer be trusted to match the disk (PostgreSQL's fsyncgate),
    /// so the next pass starts a fresh segment rather than retrying the sync and trusting it.
    fn append_and_sync(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let Some(active) = self.active.as_mut() else {
            return Err(std::io::Error::other("no spool segment to write to"));
        };
        let faults = &self.shared.faults;
        let result = faults
            .check(FaultPoint::Append)
            .and_then(|()| active.file.write_all_at(buf, active.len))
            .and_then(|()| faults.check(FaultPoint::Sync))
            .and_then(|()| active.file.sync_data());
        match result {
            Ok(()) => {
                active.len += buf.len() as u64;
                self.shared.took(buf.len() as u64);
                Ok(())
            }
            Err(e) => {
                let _ = active.file.set_len(active.len);
                self.retire_active();
                Err(e)
            }
        }
    }

    /// Stops appending to the active segment. It stays (with its live records) until they are
    /// all final, like any older segment; an empty one goes at once.
    fn retire_active(&mut self) {
        let Some(old) = self.active.take() else {
            return;
        };
        let empty = {
            let mut index = self.shared.index();
            let empty = index.segments.get(&old.number).is_some_and(|s| s.live == 0);
            if empty {
                index.segments.remove(&old.number);
            }
            empty
        };
        if empty {
            remove_segment_files(&self.shared.dir, old.number);
            if let Err(e) = sync_dir(&self.shared.dir) {
                tracing::warn!(error = %e, "spool: cannot sync the spool directory");
            }
        }
    }

    /// Punches out dead records and unlinks emptied segments. Returns the records whose punch
    /// failed, to be tried again.
    ///
    /// The punches are not synced here. A later pass's append sync makes those in the active
    /// segment durable for free; what is left is synced once the oldest punch has waited
    /// [`PUNCH_SYNC_DELAY`]. A punch is what makes a delivered message final on disk, so a crash
    /// before that sync brings the message back and its recipients get it again, exactly as a
    /// crash between the remote server's `250` and the update would: the window is a few
    /// milliseconds longer, and under load deliveries cost no `fdatasync` of their own.
    /// A body file goes only once its record's punch is synced.
    fn punch(&mut self, dead: &[Loc]) -> Vec<Loc> {
        if dead.is_empty() {
            return Vec::new();
        }
        let files: Vec<(Loc, Option<Arc<File>>)> = {
            let index = self.shared.index();
            dead.iter()
                .map(|l| (*l, index.segment_of(*l).ok().map(|s| s.file.clone())))
                .collect()
        };
        let mut failed = Vec::new();
        let mut done = Vec::new();
        for (loc, file) in files {
            let Some(file) = file else { continue };
            let punched =
                self.shared.faults.check(FaultPoint::Punch).and_then(|()| {
                    punch_hole(&file, loc.offset + HEADER_LEN as u64, loc.len as u64)
                });
            match punched {
                Ok(()) => {
                    done.push(loc);
                    self.punched_at.get_or_insert_with(std::time::Instant::now);
                    self.punched.push((loc, file));
                }
                Err(e) => {
                    tracing::error!(segment = loc.segment, error = %e, "spool: cannot punch out a destroyed record; retrying");
                    failed.push(loc);
                }
            }
        }
        self.release(&done);
        failed
    }

    /// Counts punches in segment `covered` (synced since they were made) durable, and with
    /// `force` syncs the other segments that punches touched. A sync that fails punches again,
    /// to be synced later.
    fn sync_punches(&mut self, covered: Option<u32>, force: bool) {
        // Most passes of a busy writer: nothing covered and nothing due.
        if self.punched.is_empty() || (covered.is_none() && !force) {
            return;
        }
        let mut by_segment: BTreeMap<u32, (Arc<File>, Vec<Loc>)> = BTreeMap::new();
        for (loc, file) in std::mem::take(&mut self.punched) {
            by_segment
                .entry(loc.segment)
                .or_insert((file, Vec::new()))
                .1
                .push(loc);
        }
        let mut durable = Vec::new();
        for (segment, (file, locs)) in by_segment {
            if Some(segment) == covered {
                durable.extend(locs);
                continue;
            }
            if !force {
                self.punched
                    .extend(locs.into_iter().map(|l| (l, file.clone())));
                continue;
            }
            let synced = self
                .shared
                .faults
                .check(FaultPoint::PunchSync)
                .and_then(|()| file.sync_data());
            match synced {
                Ok(()) => durable.extend(locs),
                Err(e) => {
                    // The pages may be gone (fsyncgate): punch again and sync at the next
                    // pass. Already counted off their segment, they are not released twice.
                    tracing::warn!(segment, error = %e, "spool: sync after punch failed; punching again");
                    for loc in locs {
                        let offset = loc.offset + HEADER_LEN as u64;
                        if let Err(e) = punch_hole(&file, offset, loc.len as u64) {
                            tracing::warn!(segment, error = %e, "spool: cannot punch again; retrying");
                        }
                        self.punched.push((loc, file.clone()));
                    }
                }
            }
        }
        if self.punched.is_empty() {
            self.punched_at = None;
        } else if force {
            // What a failed sync sent back waits its delay again.
            self.punched_at = Some(std::time::Instant::now());
        }
        self.remove_bodies(&durable);
    }

    /// Removes the body files of destroyed messages whose record is punched out (and synced):
    /// before that, a crash would bring back a record whose body was gone.
    fn remove_bodies(&self, done: &[Loc]) {
        let gone: Vec<QueueId> = {
            let mut index = self.shared.index();
            if index.dead_bodies.is_empty() {
                return;
            }
            let (gone, keep) = std::mem::take(&mut index.dead_bodies)
                .into_iter()
                .partition(|(loc, _)| done.contains(loc));
            index.dead_bodies = keep;
            gone.into_iter().map(|(_, id)| id).collect()
        };
        for id in &gone {
            bodyfile::remove(&bodyfile::path(&self.shared.dir, *id));
        }
    }

    /// Counts punched records off their segments and unlinks the segments left empty.
    fn release(&mut self, done: &[Loc]) {
        let active = self.active.as_ref().map(|a| a.number);
        let mut emptied = Vec::new();
        {
            let mut index = self.shared.index();
            for loc in done {
                let n = u64::from(loc.segment);
                if let Some(seg) = index.segments.get_mut(&n) {
                    seg.live = seg.live.saturating_sub(1);
                    if seg.live == 0 && Some(n) != active {
                        emptied.push(n);
                    }
                }
            }
            emptied.sort_unstable();
            emptied.dedup();
            for n in &emptied {
                index.segments.remove(n);
            }
        }
        if !emptied.is_empty() {
            for n in &emptied {
                remove_segment_files(&self.shared.dir, *n);
            }
            if let Err(e) = sync_dir(&self.shared.dir) {
                tracing::warn!(error = %e, "spool: cannot sync the spool directory");
            }
        }
    }

    /// Retires the active segment and opens the next one, with a number never tried before.
    fn rotate(&mut self) -> Result<(), SpoolError> {
        let n = self.next_number;
        self.next_number += 1;
        let (file, key) = create_segment(&self.shared, &self.master, n, self.spares.as_mut())?;
        self.retire_active();
        self.active = Some(Active {
            number: n,
            file,
            key,
            len: 0,
        });
        Ok(())
    }
}

enum Finished {
    Update(oneshot::Sender<Result<Liveness, SpoolError>>, Liveness),
    Destroy(
        oneshot::Sender<Result<(), SpoolError>>,
        Result<(), SpoolError>,
    ),
}

impl Index {
    /// Sets a message's state after an update. `loc` is where its new state record went, or
    /// None when none reached the disk (owed, and retried) or none was needed (all final).
    fn apply(
        &mut self,
        id: QueueId,
        loc: Option<Loc>,
        state: MessageState,
        dead: &mut Vec<Loc>,
    ) -> Liveness {
        let all_final = state.all_final();
        let Some(entry) = self.messages.get_mut(&id) else {
            // Destroyed earlier in this same batch.
            return Liveness::Destroyed;
        };
        entry.finals = Finals::from(&state.final_rcpts[..]);
        entry.due = state.due;
        if all_final {
            dead.extend(self.remove(id));
            return Liveness::Destroyed;
        }
        match loc {
            Some(loc) => {
                if let Some(old) = entry.state.replace(loc) {
                    dead.push(old);
                }
                self.unsynced.remove(&id);
                self.add_live(loc.segment);
            }
            None => {
                self.unsynced.insert(id, state);
            }
        }
        Liveness::Live
    }

    fn add_live(&mut self, segment: u32) {
        if let Some(s) = self.segments.get_mut(&u64::from(segment)) {
            s.live += 1;
        }
    }

    /// Drops a message from the index; returns its records, now dead. Its body file, if it
    /// has one, goes once its message record is punched out.
    fn remove(&mut self, id: QueueId) -> Vec<Loc> {
        self.unsynced.remove(&id);
        match self.messages.remove(&id) {
            Some(e) => {
                if self.spilled.remove(&id) {
                    self.dead_bodies.push((e.message, id));
                }
                std::iter::once(e.message).chain(e.state).collect()
            }
            None => Vec::new(),
        }
    }
}

/// Creates a segment: key file first (fsync'd), then the empty segment, then the directory sync.
/// On failure whatever was made is removed again (best effort; the number is not reused).
fn create_segment(
    shared: &Shared,
    master: &Key,
    n: u64,
    spares: Option<&mut Spares>,
) -> Result<(Arc<File>, Arc<Key>), SpoolError> {
    let made = (|| -> Result<(File, Key), SpoolError> {
        shared.faults.check(FaultPoint::CreateSegment)?;
        let key = Key::generate()?;
        master.write_wrapped(&key_path(&shared.dir, n), &key_purpose(n), &key)?;
        let path = segment_path(&shared.dir, n);
        let file = match spares.and_then(|s| s.take_as(&path)) {
            Some(file) => file,
            None => OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?,
        };
        sync_dir(&shared.dir)?;
        Ok((file, key))
    })();
    let (file, key) = match made {
        Ok(made) => made,
        Err(e) => {
            remove_segment_files(&shared.dir, n);
            return Err(e);
        }
    };
    let file = Arc::new(file);
    let key = Arc::new(key);
    shared.index().segments.insert(
        n,
        Segment {
            file: file.clone(),
            key: key.clone(),
            live: 0,
        },
    );
    Ok((file, key))
}

pub(super) fn remove_segment_files(dir: &std::path::Path, n: u64) {
    // Key first: once it is gone the segment's bytes are unreadable even if the unlink of the
    // segment itself does not reach the disk before a crash.
    for path in [key_path(dir, n), segment_path(dir, n)] {
        if let Err(e) = std::fs::remove_file(&path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "spool: cannot remove");
            }
        }
    }
}

/// Makes a byte range read back as zeros and frees its blocks; falls back to writing zeros
/// where the filesystem cannot punch holes.
pub(super) fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    match fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    ) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP) | Err(rustix::io::Errno::NOSYS) => {
            write_zeros(file, offset, len)
        }
        Err(e) => Err(e.into()),
    }
}

/// Zeros written at a time by [`write_zeros`].
const ZERO_CHUNK: u64 = 1 << 20;

/// Overwrites `len` bytes at `offset` with zeros, [`ZERO_CHUNK`] at a time: the ciphertext is
/// gone from the file although its blocks stay allocated.
pub(super) fn write_zeros(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// The error a store gets when the free-space reserve would be crossed.
fn storage_full() -> SpoolError {
    SpoolError::Io(std::io::Error::from(std::io::ErrorKind::StorageFull))
}

fn no_segment() -> SpoolError {
    SpoolError::Io(std::io::Error::other("no spool segment to write to"))
}

/// One I/O error answers many requests; keep its errno so callers can tell "disk full".
fn clone_io(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallback for filesystems without hole punching: exactly the range reads back as
    /// zeros, over several chunks, and nothing around it changes.
    #[test]
    fn write_zeros_clears_exactly_the_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("segment");
        let size = 3 * ZERO_CHUNK as usize;
        std::fs::write(&path, vec![0xAAu8; size]).expect("write");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open");
        let (offset, len) = (100u64, 2 * ZERO_CHUNK + 3);
        write_zeros(&file, offset, len).expect("zeros");
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(bytes.len(), size, "size unchanged");
        let end = (offset + len) as usize;
        assert!(
            bytes[..offset as usize].iter().all(|&b| b == 0xAA),
            "before intact"
        );
        assert!(
            bytes[offset as usize..end].iter().all(|&b| b == 0),
            "range zeroed"
        );
        assert!(bytes[end..].iter().all(|&b| b == 0xAA), "after intact");
        write_zeros(&file, 0, 0).expect("empty range");
        assert_eq!(std::fs::read(&path).expect("read")[0], 0xAA);
    }
}
