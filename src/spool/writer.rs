//! The spool's single writer thread: group commit, state updates and destruction.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::sync::{mpsc, Arc};

use tokio::sync::oneshot;

use super::record::{self, Kind, HEADER_LEN};
use super::{
    key_path, key_purpose, segment_path, Entry, Index, Liveness, Loc, MessageState, QueueId,
    Segment, Shared, SpoolError,
};
use crate::crypto::{sync_dir, Key};

/// Work for the writer. Each carries the channel its answer goes back on.
pub(super) enum Request {
    Store {
        id: QueueId,
        plaintext: Vec<u8>,
        rcpts: usize,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    Update {
        id: QueueId,
        final_rcpts: Vec<usize>,
        queue_data: Option<Vec<u8>>,
        reply: oneshot::Sender<Result<Liveness, SpoolError>>,
    },
    Destroy {
        id: QueueId,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
}

/// Caps on one batch, so one pass never holds an unbounded amount of memory.
const MAX_BATCH: usize = 4096;
const MAX_BATCH_BYTES: usize = 64 << 20;

pub(super) struct Writer {
    shared: Arc<Shared>,
    master: Key,
    segment_size: u64,
    /// Number, file and key of the segment being appended to.
    active: u64,
    file: Arc<File>,
    key: Arc<Key>,
    /// Bytes in the active segment: the offset of the next record.
    len: u64,
}

/// A record appended in this pass, waiting for the sync to succeed.
enum Pending {
    Store {
        id: QueueId,
        loc: Loc,
        rcpts: usize,
        reply: oneshot::Sender<Result<(), SpoolError>>,
    },
    Update {
        id: QueueId,
        /// None when the update made every recipient final (nothing written, destroy instead).
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
        let (file, key) = create_segment(&shared, &master, first)?;
        Ok(Writer {
            shared,
            master,
            segment_size,
            active: first,
            file,
            key,
            len: 0,
        })
    }

    pub(super) fn run(mut self, rx: mpsc::Receiver<Request>) {
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            let mut bytes = 0usize;
            while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match rx.try_recv() {
                    Ok(r) => {
                        if let Request::Store { plaintext, .. } = &r {
                            bytes += plaintext.len();
                        }
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.pass(batch);
        }
    }

    /// One group commit: append, sync once, answer, then punch what became dead.
    fn pass(&mut self, batch: Vec<Request>) {
        if self.len >= self.segment_size {
            if let Err(e) = self.rotate() {
                tracing::error!(error = %e, "spool: cannot start a new segment");
                fail_all(batch, &e);
                return;
            }
        }
        let mut buf = Vec::new();
        let mut pending = Vec::with_capacity(batch.len());
        // States written in this pass, so two updates of one message in a batch compose.
        let mut updated: std::collections::HashMap<QueueId, MessageState> = Default::default();
        for request in batch {
            match request {
                Request::Store {
                    id,
                    plaintext,
                    rcpts,
                    reply,
                } => {
                    let start = buf.len();
                    if let Err(e) =
                        record::append(&mut buf, Kind::Message, id, &self.key, &plaintext)
                    {
                        buf.truncate(start);
                        let _ = reply.send(Err(e.into()));
                        continue;
                    }
                    let loc = self.loc(start, buf.len());
                    pending.push(Pending::Store {
                        id,
                        loc,
                        rcpts,
                        reply,
                    });
                }
                Request::Update {
                    id,
                    final_rcpts,
                    queue_data,
                    reply,
                } => {
                    let current = match updated.get(&id) {
                        Some(s) => Some(s.clone()),
                        None => self
                            .shared
                            .index()
                            .messages
                            .get(&id)
                            .map(|e| e.current.clone()),
                    };
                    let Some(mut state) = current else {
                        let _ = reply.send(Err(SpoolError::NotFound));
                        continue;
                    };
                    for i in final_rcpts {
                        if let Some(flag) = state.final_rcpts.get_mut(i) {
                            *flag = true;
                        }
                    }
                    if let Some(data) = queue_data {
                        state.queue_data = data;
                    }
                    updated.insert(id, state.clone());
                    let loc = if state.all_final() {
                        None
                    } else {
                        let start = buf.len();
                        let plain = serde_json::to_vec(&state).unwrap_or_default();
                        if let Err(e) = record::append(&mut buf, Kind::State, id, &self.key, &plain)
                        {
                            buf.truncate(start);
                            let _ = reply.send(Err(e.into()));
                            continue;
                        }
                        Some(self.loc(start, buf.len()))
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

        if !buf.is_empty() {
            if let Err(e) = self.append_and_sync(&buf) {
                tracing::error!(error = %e, "spool: write or sync failed; nothing in this batch is acknowledged");
                fail_pending(pending, &e);
                return;
            }
        }

        // Durable: publish to the index and answer the stores before any punching.
        let mut dead: Vec<Loc> = Vec::new();
        let mut finished = Vec::new();
        {
            let mut index = self.shared.index();
            for p in pending {
                match p {
                    Pending::Store {
                        id,
                        loc,
                        rcpts,
                        reply,
                    } => {
                        index.add_live(loc.segment);
                        index.messages.insert(
                            id,
                            Entry {
                                message: loc,
                                state: None,
                                current: MessageState {
                                    final_rcpts: vec![false; rcpts],
                                    queue_data: Vec::new(),
                                },
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
                        let Some(entry) = index.messages.get_mut(&id) else {
                            // Destroyed earlier in this same batch.
                            let _ = reply.send(Ok(Liveness::Destroyed));
                            continue;
                        };
                        entry.current = state;
                        let liveness = match loc {
                            Some(loc) => {
                                if let Some(old) = entry.state.replace(loc) {
                                    dead.push(old);
                                }
                                index.add_live(loc.segment);
                                Liveness::Live
                            }
                            None => {
                                dead.extend(index.remove(id));
                                Liveness::Destroyed
                            }
                        };
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
        }

        let result = self.punch(&dead);
        for f in finished {
            match f {
                Finished::Update(reply, liveness) => {
                    let _ = reply.send(match &result {
                        Ok(()) => Ok(liveness),
                        Err(e) => Err(SpoolError::Io(clone_io(e))),
                    });
                }
                Finished::Destroy(reply, r) => {
                    let _ = reply.send(match (&result, r) {
                        (Err(e), _) => Err(SpoolError::Io(clone_io(e))),
                        (Ok(()), r) => r,
                    });
                }
            }
        }
    }

    fn loc(&self, start: usize, end: usize) -> Loc {
        Loc {
            segment: self.active,
            offset: self.len + start as u64,
            len: (end - start - HEADER_LEN) as u32,
        }
    }

    /// Appends `buf` at the end of the active segment and fdatasyncs it. On failure the file is
    /// cut back so no half-written record stays, and the next pass starts a fresh segment (after
    /// a failed fsync the page cache can no longer be trusted to match the disk).
    fn append_and_sync(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let result = self
            .file
            .write_all_at(buf, self.len)
            .and_then(|()| self.file.sync_data());
        match result {
            Ok(()) => {
                self.len += buf.len() as u64;
                Ok(())
            }
            Err(e) => {
                let _ = self.file.set_len(self.len);
                // Forces a rotation at the next pass.
                self.len = self.segment_size.max(self.len);
                Err(e)
            }
        }
    }

    /// Punches out dead records, syncs the segments touched, and unlinks emptied segments.
    fn punch(&mut self, dead: &[Loc]) -> std::io::Result<()> {
        if dead.is_empty() {
            return Ok(());
        }
        let mut touched = BTreeSet::new();
        let mut first_error = None;
        let files: Vec<(Loc, Option<Arc<File>>)> = {
            let index = self.shared.index();
            dead.iter()
                .map(|l| (*l, index.segments.get(&l.segment).map(|s| s.file.clone())))
                .collect()
        };
        for (loc, file) in files {
            let Some(file) = file else { continue };
            if let Err(e) = punch_hole(&file, loc.offset + HEADER_LEN as u64, loc.len as u64) {
                first_error.get_or_insert(e);
            }
            touched.insert(loc.segment);
        }
        let mut emptied = Vec::new();
        {
            let mut index = self.shared.index();
            for loc in dead {
                if let Some(seg) = index.segments.get_mut(&loc.segment) {
                    seg.live = seg.live.saturating_sub(1);
                    if seg.live == 0 && loc.segment != self.active {
                        emptied.push(loc.segment);
                    }
                }
            }
            emptied.sort_unstable();
            emptied.dedup();
            for n in &emptied {
                index.segments.remove(n);
            }
        }
        for n in touched.iter().filter(|n| !emptied.contains(n)) {
            let file = self.shared.index().segments.get(n).map(|s| s.file.clone());
            if let Some(file) = file {
                if let Err(e) = file.sync_data() {
                    first_error.get_or_insert(e);
                }
            }
        }
        if !emptied.is_empty() {
            for n in &emptied {
                remove_segment_files(&self.shared.dir, *n);
            }
            if let Err(e) = sync_dir(&self.shared.dir) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Closes the active segment and opens the next one. The old one is unlinked at once if it
    /// holds nothing live.
    fn rotate(&mut self) -> Result<(), SpoolError> {
        let next = self.active + 1;
        let (file, key) = create_segment(&self.shared, &self.master, next)?;
        let old = self.active;
        self.active = next;
        self.file = file;
        self.key = key;
        self.len = 0;
        let empty = {
            let mut index = self.shared.index();
            let empty = index.segments.get(&old).is_some_and(|s| s.live == 0);
            if empty {
                index.segments.remove(&old);
            }
            empty
        };
        if empty {
            remove_segment_files(&self.shared.dir, old);
            sync_dir(&self.shared.dir)?;
        }
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
    fn add_live(&mut self, segment: u64) {
        if let Some(s) = self.segments.get_mut(&segment) {
            s.live += 1;
        }
    }

    /// Drops a message from the index; returns its records, now dead.
    fn remove(&mut self, id: QueueId) -> Vec<Loc> {
        match self.messages.remove(&id) {
            Some(e) => std::iter::once(e.message).chain(e.state).collect(),
            None => Vec::new(),
        }
    }
}

/// Creates a segment: key file first (fsync'd), then the empty segment, then the directory sync.
fn create_segment(
    shared: &Shared,
    master: &Key,
    n: u64,
) -> Result<(Arc<File>, Arc<Key>), SpoolError> {
    let key = Key::generate()?;
    master.write_wrapped(&key_path(&shared.dir, n), &key_purpose(n), &key)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(segment_path(&shared.dir, n))?;
    sync_dir(&shared.dir)?;
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
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                file.write_all_at(&zeros[..n], offset + done)?;
                done += n as u64;
            }
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

fn fail_all(batch: Vec<Request>, e: &SpoolError) {
    let err = || SpoolError::Io(std::io::Error::other(e.to_string()));
    for r in batch {
        match r {
            Request::Store { reply, .. } => drop(reply.send(Err(err()))),
            Request::Update { reply, .. } => drop(reply.send(Err(err()))),
            Request::Destroy { reply, .. } => drop(reply.send(Err(err()))),
        }
    }
}

fn fail_pending(pending: Vec<Pending>, e: &std::io::Error) {
    let err = || SpoolError::Io(clone_io(e));
    for p in pending {
        match p {
            Pending::Store { reply, .. } => drop(reply.send(Err(err()))),
            Pending::Update { reply, .. } => drop(reply.send(Err(err()))),
            Pending::Destroy { reply, .. } => drop(reply.send(Err(err()))),
        }
    }
}

/// One I/O error answers many requests; keep its errno so callers can tell "disk full".
fn clone_io(e: &std::io::Error) -> std::io::Error {
    match e.raw_os_error() {
        Some(code) => std::io::Error::from_raw_os_error(code),
        None => std::io::Error::new(e.kind(), e.to_string()),
    }
}
