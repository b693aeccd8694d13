//! The spool: accepted messages, durable and sealed, until their last recipient is final.
//!
//! # Layout on disk
//! `<data_dir>/spool/` holds numbered segment files (`00000001.seg`) with their keys
//! (`00000001.key`, random, wrapped by the master key), a `quarantine/` folder, and `bodies/`:
//! the body files of messages too big to hold in memory ([`bodyfile`]). A segment is an
//! append-only log of [`record`]s. Only the newest segment is written to; every start of the
//! daemon opens a new one, so recovery never has to append after a torn tail.
//!
//! # In memory
//! Only an index: per live message, where its records are, which recipients are final and when
//! the queue next wants it (about 80 bytes; a million queued messages take some 90 MiB). The
//! envelope, the body and the queue's retry state are read from disk when a message is worked
//! on. Recovery opens envelopes (to count recipients) and state records, never bodies.
//!
//! # Group commit
//! One writer thread owns all writes. It takes every request that arrived while it was busy,
//! appends them with one `write`, calls `fdatasync` once and only then answers them all: with
//! fsync costing milliseconds, fifty sessions share one sync instead of queueing for fifty.
//! `store` returns only after that sync, so the SMTP session may then say `250`.
//!
//! # Destruction
//! When a message's last recipient is final its records are punched out of the segment
//! (`fallocate(PUNCH_HOLE)`, zeros on read-back) in the same writer pass, and a segment with no
//! live records left is unlinked together with its key. A state record superseded by a newer
//! one is punched only after the newer one is synced, so a crash in between leaves the old one.
//! A message's body file is removed once its record is punched out (and synced): the other way
//! round, a crash could bring back a record whose body was gone.
//!
//! # When storage fails
//! A failed append or `fdatasync` fails that batch's stores (the sessions answer 451/452) and
//! retires the segment: after a failed sync the page cache may no longer match the disk, so the
//! segment takes no more writes and the next batch starts a fresh one (with a fresh number,
//! whatever the failed attempt left behind). State changes of queued mail (a recipient delivered,
//! a message destroyed) are never lost to a full disk while the daemon runs: the index takes them
//! at once, so the queue never delivers a final recipient again, and the writer keeps retrying
//! the record (and any punch that failed) until it is on disk. Below `min_free` bytes of free
//! space new mail is refused, so that those state records have room.
//!
//! # Not done yet
//! Compaction: a long-deferred message keeps its (otherwise hollow, sparse) segment alive.

mod bodyfile;
mod envelope;
mod faults;
mod inbox;
mod record;
mod recovery;
mod spare;
mod writer;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

pub use bodyfile::{Body, BodyReader, Chunks, Spill, SpilledBody, SPILL_AT};
pub use envelope::{Envelope, MessageState, QueueData, NOT_DUE};
pub use faults::{FaultPoint, Faults};
pub use recovery::{Quarantined, RecoveryReport, Unreadable};

use crate::crypto::{CryptoError, Key};
use record::{Header, Kind, Part, HEADER_LEN};

/// Identifies a message for its whole life: 48 bits of milliseconds, then 80 random bits, so
/// ids sort roughly by arrival and never collide across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub [u8; 16]);

impl QueueId {
    /// A new id for a message accepted now.
    pub fn generate() -> Result<QueueId, CryptoError> {
        let mut id = [0u8; 16];
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        id[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        // The thread's CSPRNG (seeded from the OS): no getrandom system call per message.
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut id[6..]);
        Ok(QueueId(id))
    }
}

impl std::fmt::Display for QueueId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::str::FromStr for QueueId {
    type Err = SpoolError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = hex::decode(s).map_err(|_| SpoolError::NotFound)?;
        Ok(QueueId(bytes.try_into().map_err(|_| SpoolError::NotFound)?))
    }
}

/// What can go wrong in the spool. Every variant means "not durable": the caller must not
/// acknowledge the message.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Writing, syncing or reading failed (disk full, I/O error).
    #[error("spool I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A key could not be made or opened, or a record failed authentication.
    #[error("spool crypto error: {0}")]
    Crypto(#[from] CryptoError),
    /// The record exists but its contents do not decode.
    #[error("spool record of {0} is corrupt")]
    Corrupt(QueueId),
    /// No live message with that id.
    #[error("no such message in the spool")]
    NotFound,
    /// The writer thread is gone (shut down or crashed).
    #[error("spool writer has stopped")]
    Closed,
}

/// Whether a message is still in the spool after an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Some recipients are not final yet.
    Live,
    /// All recipients are final; the body is destroyed.
    Destroyed,
}

/// Where a record sits. 16 bytes: a million of these is what a million queued messages cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    offset: u64,
    segment: u32,
    /// Payload length (the header precedes it).
    len: u32,
}

/// What the spool keeps in memory of a live message: where its records are, which recipients
/// are final and when the queue next wants it. The envelope, the body and the queue's retry
/// state stay sealed on disk until the message is read.
struct Entry {
    message: Loc,
    state: Option<Loc>,
    finals: Finals,
    /// The queue's next due time (see [`MessageState::due`]).
    due: i64,
}

/// One flag per recipient (true once final), inline up to 64 recipients.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Finals {
    Few {
        count: u8,
        bits: u64,
    },
    // A thin pointer (a `Box<[bool]>` is two words): keeps `Finals` at 16 bytes.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<bool>>),
}

impl Finals {
    /// `count` recipients, none final.
    fn new(count: usize) -> Finals {
        match u8::try_from(count) {
            Ok(count) if count <= 64 => Finals::Few { count, bits: 0 },
            _ => Finals::Many(Box::new(vec![false; count])),
        }
    }

    fn to_vec(&self) -> Vec<bool> {
        match self {
            Finals::Few { count, bits } => (0..*count).map(|i| bits & (1u64 << i) != 0).collect(),
            Finals::Many(v) => v.to_vec(),
        }
    }

    fn len(&self) -> usize {
        match self {
            Finals::Few { count, .. } => *count as usize,
            Finals::Many(v) => v.len(),
        }
    }

    fn all_final(&self) -> bool {
        match self {
            Finals::Few { count, bits } => bits.count_ones() == u32::from(*count),
            Finals::Many(v) => v.iter().all(|f| *f),
        }
    }
}

impl From<&[bool]> for Finals {
    fn from(flags: &[bool]) -> Finals {
        if flags.len() > 64 {
            return Finals::Many(Box::new(flags.to_vec()));
        }
        let bits = flags
            .iter()
            .enumerate()
            .fold(0u64, |bits, (i, f)| bits | (u64::from(*f) << i));
        Finals::Few {
            count: flags.len() as u8,
            bits,
        }
    }
}

struct Segment {
    file: Arc<File>,
    key: Arc<Key>,
    /// Records in this segment still referenced by the index; at zero the segment goes.
    live: usize,
}

#[derive(Default)]
struct Index {
    /// Ordered by id, i.e. by arrival. A B-tree rather than a hash map: no table that doubles
    /// (and for a while holds twice the memory) as the queue grows past a power of two.
    messages: BTreeMap<QueueId, Entry>,
    segments: HashMap<u64, Segment>,
    /// Messages whose state is newer than their last state record on disk (the disk refused
    /// it), with that state: kept whole in memory until the writer gets it onto the disk.
    unsynced: BTreeMap<QueueId, MessageState>,
    /// Live messages whose body is in a body file (few: only those too big to hold).
    spilled: HashSet<QueueId>,
    /// Destroyed messages' body files, with their message record: a file goes once that
    /// record is punched out.
    dead_bodies: Vec<(Loc, QueueId)>,
}

struct Shared {
    dir: PathBuf,
    index: Mutex<Index>,
    faults: Arc<Faults>,
    /// Free bytes on the spool's filesystem, as the writer last saw them (`statvfs`).
    free: AtomicU64,
    /// The reserve kept for state records: new mail is refused below it.
    min_free: u64,
    /// Seals body files (derived from the master key).
    body_key: Arc<Key>,
}

impl Shared {
    /// Reads the filesystem's free space (for unprivileged users, as `df` shows it).
    fn refresh_free(&self) {
        if let Ok(st) = rustix::fs::statvfs(&self.dir) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            self.free.store(free, Ordering::Relaxed);
        }
    }

    fn has_room(&self, size: u64) -> bool {
        self.fits(self.free.load(Ordering::Relaxed), size)
    }

    /// Takes bytes just written off the free space, until the next statvfs reads it anew.
    fn took(&self, bytes: u64) {
        let _ = self
            .free
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |free| {
                Some(free.saturating_sub(bytes))
            });
    }

    /// [`Shared::has_room`], looking at the filesystem again before a refusal: space may be
    /// back. Costs a statvfs only on the refusal path.
    fn has_room_now(&self, size: u64) -> bool {
        if self.has_room(size) {
            return true;
        }
        self.refresh_free();
        self.has_room(size)
    }

    /// Whether `size` more bytes leave the reserve intact when `free` bytes are free.
    fn fits(&self, free: u64, size: u64) -> bool {
        free.checked_sub(size)
            .is_some_and(|left| left >= self.min_free)
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // loses mail (the disk is the truth), so keep serving rather than poison everyone.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// How to open a spool.
#[derive(Clone)]
pub struct SpoolOptions {
    /// A segment file is closed and the next started past this many bytes.
    pub segment_size: u64,
    /// Free space (bytes) kept on the spool's filesystem for delivery state: below it, new
    /// messages are refused (like Postfix's `queue_minfree`).
    pub min_free: u64,
    /// Injected faults (tests); `Faults::default()` injects none.
    pub faults: Arc<Faults>,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            segment_size: 64 << 20,
            min_free: 0,
            faults: Arc::default(),
        }
    }
}

/// A handle to the spool; cheap to clone, shared by sessions and the queue.
#[derive(Clone)]
pub struct Spool {
    shared: Arc<Shared>,
    /// Closes the writer's inbox when the last handle goes, so the writer finishes and stops.
    tx: Arc<inbox::Sender>,
}

/// A message's envelope and delivery state, read without its body: what the queue works from
/// while an attempt waits for its destination ([`Spool::read_envelope`]).
#[derive(Debug)]
pub struct StoredEnvelope {
    pub id: QueueId,
    pub envelope: Envelope,
    pub state: MessageState,
}

/// A message read back from the spool.
#[derive(Debug)]
pub struct StoredMessage {
    pub id: QueueId,
    pub envelope: Envelope,
    /// RFC 5322 message with CRLF line endings, `Received:` header included; a big one is
    /// read from its body file as it is sent.
    pub body: Body,
    pub state: MessageState,
}

impl StoredMessage {
    /// The envelope and state, and the body apart.
    pub fn split(self) -> (StoredEnvelope, Body) {
        let StoredMessage {
            id,
            envelope,
            body,
            state,
        } = self;
        (
            StoredEnvelope {
                id,
                envelope,
                state,
            },
            body,
        )
    }
}

/// A message read back whole ([`Spool::read_whole`]).
#[derive(Debug)]
pub struct WholeMessage {
    pub id: QueueId,
    pub envelope: Envelope,
    /// RFC 5322 message with CRLF line endings, `Received:` header included.
    pub body: Vec<u8>,
    pub state: MessageState,
}

impl Spool {
    /// Opens (creating if needed) the spool under `data_dir`, recovers what a previous run left
    /// and starts the writer. `segment_size` bounds a segment file before the next is started.
    pub fn open(
        data_dir: &Path,
        master: Key,
        segment_size: u64,
    ) -> Result<(Spool, RecoveryReport), SpoolError> {
        let options = SpoolOptions {
            segment_size,
            ..SpoolOptions::default()
        };
        Spool::open_with(data_dir, master, options)
    }

    /// [`Spool::open`] with every option.
    pub fn open_with(
        data_dir: &Path,
        master: Key,
        options: SpoolOptions,
    ) -> Result<(Spool, RecoveryReport), SpoolError> {
        let dir = data_dir.join("spool");
        create_private_dir(&dir)?;
        create_private_dir(&dir.join("quarantine"))?;
        create_private_dir(&dir.join(bodyfile::DIR))?;
        let (index, report, next_segment) = recovery::recover(&dir, &master, &options.faults)?;
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            index: Mutex::new(index),
            faults: options.faults,
            free: AtomicU64::new(u64::MAX),
            min_free: options.min_free,
            body_key: Arc::new(master.derive(bodyfile::KEY_LABEL)),
        });
        shared.refresh_free();
        let writer =
            writer::Writer::start(shared.clone(), master, next_segment, options.segment_size)?;
        let (tx, rx) = inbox::channel();
        std::thread::Builder::new()
            .name("spool-writer".into())
            .spawn(move || writer.run(rx))?;
        let tx = Arc::new(tx);
        Ok((Spool { shared, tx }, report))
    }

    /// Stores a message durably under `id` (from [`QueueId::generate`], so that the id can go in
    /// the `Received:` header first). The body is the concatenation of `parts` (trace and
    /// signature headers, then the message as received). Returns only after the record is
    /// fsync'd to disk.
    pub async fn store(
        &self,
        id: QueueId,
        envelope: &Envelope,
        parts: &[&[u8]],
    ) -> Result<(), SpoolError> {
        self.store_body(id, envelope, &[], parts.concat()).await
    }

    /// [`Spool::store`] of `head` (trace and signature headers) then `body`, taken as it is:
    /// the body is copied once, into the writer's batch, where it is sealed in place.
    pub async fn store_body(
        &self,
        id: QueueId,
        envelope: &Envelope,
        head: &[&[u8]],
        body: Vec<u8>,
    ) -> Result<(), SpoolError> {
        self.send_store(id, envelope, head.concat(), body, None)
            .await
    }

    /// Starts the body file of message `id`, for a body too big to hold in memory: the
    /// session appends to it as the body arrives, then commits it with [`Spool::store_spilled`].
    pub fn spill(&self, id: QueueId) -> Result<Spill, SpoolError> {
        Spill::create(self.shared.clone(), id)
    }

    /// [`Spool::store_body`] for a body written to `spill`: the body file is synced, then the
    /// record that commits it (envelope, `head`, and the message's `headers` for bounces).
    /// Returns only after that record is fsync'd. On any failure the body file is removed.
    pub async fn store_spilled(
        &self,
        envelope: &Envelope,
        head: &[&[u8]],
        headers: &[u8],
        mut spill: Spill,
    ) -> Result<(), SpoolError> {
        spill.sync().await?;
        let part = bodyfile::encode_spilled(spill.extent(), &head.concat(), headers);
        self.send_store(spill.id(), envelope, Vec::new(), part, Some(spill))
            .await
    }

    /// Hands a message record to the writer and waits until it is synced.
    async fn send_store(
        &self,
        id: QueueId,
        envelope: &Envelope,
        head: Vec<u8>,
        body: Vec<u8>,
        spill: Option<Spill>,
    ) -> Result<(), SpoolError> {
        let sealed_envelope =
            envelope::encode_envelope(envelope).map_err(|_| SpoolError::Closed)?;
        let (reply, rx) = oneshot::channel();
        self.send(writer::Request::Store {
            id,
            envelope: sealed_envelope,
            head,
            body,
            rcpts: envelope.recipients.len(),
            spill,
            reply,
        })?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Marks recipients (indices into the envelope's list) final and, when given, replaces the
    /// queue's data. When every recipient is final the message is destroyed at once. Returns
    /// after the change is durable.
    pub async fn update(
        &self,
        id: QueueId,
        final_rcpts: &[usize],
        queue: Option<QueueData>,
    ) -> Result<Liveness, SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.send(writer::Request::Update {
            id,
            final_rcpts: final_rcpts.to_vec(),
            queue,
            reply,
        })?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Destroys a message whatever its recipients' state (cancelled by an operator or erased).
    pub async fn destroy(&self, id: QueueId) -> Result<(), SpoolError> {
        let (reply, rx) = oneshot::channel();
        self.send(writer::Request::Destroy { id, reply })?;
        rx.await.map_err(|_| SpoolError::Closed)?
    }

    /// Ids of every live message, oldest first.
    pub fn live(&self) -> Vec<QueueId> {
        self.shared.index().messages.keys().copied().collect()
    }

    /// The size of a live message's record (envelope and body, sealed), without reading it.
    pub fn size(&self, id: QueueId) -> Option<u64> {
        let index = self.shared.index();
        index.messages.get(&id).map(|e| u64::from(e.message.len))
    }

    /// Whether `id` is a live message.
    pub fn contains(&self, id: QueueId) -> bool {
        self.shared.index().messages.contains_key(&id)
    }

    /// Every live message with the due time the queue last stored for it
    /// ([`MessageState::due`]), oldest first: what a restart schedules from, with no record read.
    pub fn dues(&self) -> Vec<(QueueId, i64)> {
        let index = self.shared.index();
        index.messages.iter().map(|(id, e)| (*id, e.due)).collect()
    }

    /// The current delivery state of a live message, with the queue's data read from its state
    /// record (a small read from disk).
    pub fn state(&self, id: QueueId) -> Result<MessageState, SpoolError> {
        read_current_state(&self.shared, id)
    }

    /// Reads and opens a live message and its state.
    pub async fn read(&self, id: QueueId) -> Result<StoredMessage, SpoolError> {
        let (head, body) = self.read_parts(id, Parts::Both).await?;
        Ok(StoredMessage {
            id,
            envelope: head.envelope,
            body: body.ok_or(SpoolError::Corrupt(id))?,
            state: head.state,
        })
    }

    /// Reads a live message's envelope and state, opening none of its body: an attempt holds
    /// this while it waits for its destination, and reads the body ([`Spool::read_body`]) once
    /// it can send it.
    pub async fn read_envelope(&self, id: QueueId) -> Result<StoredEnvelope, SpoolError> {
        Ok(self.read_parts(id, Parts::Envelope).await?.0)
    }

    /// The envelope and state, and the body when `parts` asks for it.
    async fn read_parts(
        &self,
        id: QueueId,
        parts: Parts,
    ) -> Result<(StoredEnvelope, Option<Body>), SpoolError> {
        self.with_record(id, parts, move |shared, record| {
            let (envelope, body) = record.open(shared, parts)?;
            let head = StoredEnvelope {
                id,
                envelope: envelope.ok_or(SpoolError::Corrupt(id))?,
                state: read_current_state(shared, id)?,
            };
            Ok((head, body))
        })
        .await
    }

    /// Reads a live message's body (a big one's headers, with the way to its body file).
    pub async fn read_body(&self, id: QueueId) -> Result<Body, SpoolError> {
        self.with_record(id, Parts::Body, move |shared, record| {
            let (_, body) = record.open(shared, Parts::Body)?;
            body.ok_or(SpoolError::Corrupt(id))
        })
        .await
    }

    /// Reads the record of live message `id` and hands it to `open`: on this thread for a
    /// small record, on a blocking thread for a bigger one. For the envelope alone, only the
    /// record's start is read when the envelope fits in it ([`ENVELOPE_READ`]).
    async fn with_record<T, F>(&self, id: QueueId, parts: Parts, open: F) -> Result<T, SpoolError>
    where
        T: Send + 'static,
        F: FnOnce(&Shared, Record) -> Result<T, SpoolError> + Send + 'static,
    {
        let (loc, file, key) = {
            let index = self.shared.index();
            let entry = index.messages.get(&id).ok_or(SpoolError::NotFound)?;
            let segment = index.segment_of(entry.message)?;
            (entry.message, segment.file.clone(), segment.key.clone())
        };
        let read = move |shared: &Shared| {
            let record = |payload| {
                let (kind, bytes) = read_raw(&file, loc, id, payload)?;
                Ok::<_, SpoolError>(Record {
                    id,
                    kind,
                    bytes,
                    key: &key,
                })
            };
            let start = match parts {
                Parts::Envelope if loc.len > ENVELOPE_READ => Some(record(ENVELOPE_READ)?),
                _ => None,
            };
            let record = match start {
                Some(start) if start.holds_envelope() => start,
                _ => record(loc.len)?,
            };
            open(shared, record)
        };
        if loc.len <= INLINE_READ {
            return read(&self.shared);
        }
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || read(&shared))
            .await
            .map_err(|_| SpoolError::Closed)?
    }

    /// [`Spool::read`] with the body read whole, body file and all (tools and tests).
    pub async fn read_whole(&self, id: QueueId) -> Result<WholeMessage, SpoolError> {
        let msg = self.read(id).await?;
        let body = msg.body.whole().await?;
        Ok(WholeMessage {
            id,
            envelope: msg.envelope,
            body,
            state: msg.state,
        })
    }

    /// Deletes what recovery set aside in `quarantine/` before `cutoff` (Unix time): mail
    /// that could not be read back, kept for an operator to examine, but no longer than the
    /// retention period. Returns how many files went.
    pub fn purge_quarantine(&self, cutoff: i64) -> std::io::Result<usize> {
        recovery::purge_quarantine(&self.shared.dir.join("quarantine"), cutoff)
    }

    /// The spool directory (segments, keys, quarantine).
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Whether a message of `size` bytes would leave the free-space reserve intact, as of the
    /// writer's last look at the filesystem. Sessions ask at `MAIL FROM` so that a client is
    /// turned away before it sends a body the spool would refuse anyway.
    pub fn has_room(&self, size: u64) -> bool {
        self.shared.has_room_now(size)
    }

    /// Bytes the spool's files take on disk (allocated blocks: punched holes do not count) and
    /// free bytes on its filesystem, read now. For metrics; it lists the directory.
    pub fn disk_usage(&self) -> (u64, u64) {
        use std::os::unix::fs::MetadataExt;
        let used = std::fs::read_dir(&self.shared.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.blocks() * 512)
            .sum();
        self.shared.refresh_free();
        (used, self.shared.free.load(Ordering::Relaxed))
    }

    /// The fault injector this spool was opened with.
    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    /// State changes answered but not yet on disk (the disk refused them); the writer retries
    /// them. Zero in normal operation.
    pub fn unsynced(&self) -> usize {
        self.shared.index().unsynced.len()
    }

    fn send(&self, request: writer::Request) -> Result<(), SpoolError> {
        self.tx.send(request).map_err(|_| SpoolError::Closed)
    }
}

/// Records up to this size are read on the calling task: a `pread` from the page cache costs
/// less than the hop to a blocking thread and back. Bigger ones go to a blocking thread.
const INLINE_READ: u32 = 64 << 10;

/// Which parts of a message record to open.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Parts {
    Envelope,
    Body,
    Both,
}

/// Payload bytes an envelope-only read takes first: with the header, one small allocation
/// (1 KiB) that holds the envelope of a message to a few recipients. A longer envelope is read
/// again with the whole record.
const ENVELOPE_READ: u32 = 1024 - HEADER_LEN as u32;

/// A message record as read (its header and payload, or the payload's start for an
/// envelope-only read), not yet opened.
struct Record<'k> {
    id: QueueId,
    kind: Kind,
    bytes: Vec<u8>,
    key: &'k Key,
}

impl Record<'_> {
    /// Opens the `parts` asked for. Envelope and body are sealed apart, so a part not asked
    /// for is not decrypted; a record of the old single-seal kind is opened whole.
    fn open(
        &self,
        shared: &Shared,
        parts: Parts,
    ) -> Result<(Option<Envelope>, Option<Body>), SpoolError> {
        if self.kind == Kind::Whole {
            let (envelope, body) = self.open_whole()?;
            return Ok((Some(envelope), Some(body)));
        }
        let envelope = match parts {
            Parts::Body => None,
            Parts::Envelope | Parts::Both => Some(self.open_envelope()?),
        };
        let body = match parts {
            Parts::Envelope => None,
            Parts::Body | Parts::Both => Some(self.open_body(shared)?),
        };
        Ok((envelope, body))
    }

    fn open_envelope(&self) -> Result<Envelope, SpoolError> {
        let (raw, payload) = self.sealed()?;
        let env = record::open_part(self.key, raw, payload, Part::Envelope)?;
        envelope::decode_envelope(&env).ok_or(SpoolError::Corrupt(self.id))
    }

    fn open_body(&self, shared: &Shared) -> Result<Body, SpoolError> {
        let (raw, payload) = self.sealed()?;
        let body = record::open_part(self.key, raw, payload, Part::Body)?;
        match self.kind {
            Kind::Spilled => {
                SpilledBody::decode(body, self.id, &shared.dir, shared.body_key.clone())
                    .map(Body::Spilled)
                    .ok_or(SpoolError::Corrupt(self.id))
            }
            _ => Ok(Body::Inline(body)),
        }
    }

    fn open_whole(&self) -> Result<(Envelope, Body), SpoolError> {
        let (raw, payload) = split_record(&self.bytes);
        let plain = self.key.open(Header::aad(raw), payload)?;
        let (envelope, body) =
            envelope::decode_whole(&plain).ok_or(SpoolError::Corrupt(self.id))?;
        Ok((envelope, Body::Inline(body)))
    }

    /// Whether the bytes read hold the whole sealed envelope (of a record sealed in parts).
    fn holds_envelope(&self) -> bool {
        let (_, payload) = split_record(&self.bytes);
        matches!(self.kind, Kind::Message | Kind::Spilled)
            && record::sealed_envelope_len(payload).is_some_and(|e| 4 + e <= payload.len())
    }

    /// Header and payload of a record whose parts are sealed apart (a message record).
    fn sealed(&self) -> Result<(&[u8; HEADER_LEN], &[u8]), SpoolError> {
        match self.kind {
            Kind::Message | Kind::Spilled => Ok(split_record(&self.bytes)),
            Kind::Whole | Kind::State => Err(SpoolError::Corrupt(self.id)),
        }
    }
}

/// Attempts at reading a state record that the writer replaced (and punched) meanwhile.
const STATE_READS: usize = 3;

/// A live message's state: the one owed to the disk if any, else its state record's, else that
/// of a message never updated.
fn read_current_state(shared: &Shared, id: QueueId) -> Result<MessageState, SpoolError> {
    for _ in 0..STATE_READS {
        let (loc, file, key) = {
            let index = shared.index();
            let (state, loc) = index.known_state(id)?;
            let Some(loc) = loc else {
                return Ok(state);
            };
            let segment = index.segment_of(loc)?;
            (loc, segment.file.clone(), segment.key.clone())
        };
        match read_state(&file, &key, loc, id) {
            // The record says what the index does (a state ahead of its record is owed).
            Ok(plain) => {
                return serde_json::from_slice(&plain).map_err(|_| SpoolError::Corrupt(id))
            }
            // Replaced and punched between the lookup and the read: look again.
            Err(e) if shared.index().messages.get(&id).and_then(|e| e.state) != Some(loc) => {
                tracing::debug!(queue_id = %id, error = %e, "state record replaced while read");
            }
            Err(e) => return Err(e),
        }
    }
    Err(SpoolError::Corrupt(id))
}

impl Index {
    /// What the index knows of a live message's state, and the state record that holds the
    /// rest: the state owed to the disk, whole (no record to read); else the final flags and
    /// due time, with the queue's data left empty and to be read from the record, if any.
    fn known_state(&self, id: QueueId) -> Result<(MessageState, Option<Loc>), SpoolError> {
        if let Some(owed) = self.unsynced.get(&id) {
            return Ok((owed.clone(), None));
        }
        let entry = self.messages.get(&id).ok_or(SpoolError::NotFound)?;
        let state = MessageState {
            final_rcpts: entry.finals.to_vec(),
            queue_data: Vec::new(),
            due: entry.due,
        };
        Ok((state, entry.state))
    }

    fn segment_of(&self, loc: Loc) -> Result<&Segment, SpoolError> {
        self.segments
            .get(&u64::from(loc.segment))
            .ok_or(SpoolError::NotFound)
    }
}

/// Reads a state record and opens it.
fn read_state(file: &File, key: &Key, loc: Loc, id: QueueId) -> Result<Vec<u8>, SpoolError> {
    match read_raw(file, loc, id, loc.len)? {
        (Kind::State, buf) => {
            let (raw, payload) = split_record(&buf);
            Ok(key.open(Header::aad(raw), payload)?)
        }
        _ => Err(SpoolError::Corrupt(id)),
    }
}

/// Reads one record's header and the first `payload` bytes of its payload (all of them when
/// `payload` is `loc.len`) with one `pread`, checking that the header still names `id` and has
/// the length the index knows.
fn read_raw(
    file: &File,
    loc: Loc,
    id: QueueId,
    payload: u32,
) -> Result<(Kind, Vec<u8>), SpoolError> {
    let mut buf = vec![0u8; HEADER_LEN + payload.min(loc.len) as usize];
    file.read_exact_at(&mut buf, loc.offset)?;
    let header = Header::decode(&buf).map_err(|_| SpoolError::Corrupt(id))?;
    if header.id != id || header.len != loc.len {
        return Err(SpoolError::Corrupt(id));
    }
    Ok((header.kind, buf))
}

/// A whole record's header bytes and payload.
pub(super) fn split_record(record: &[u8]) -> (&[u8; HEADER_LEN], &[u8]) {
    let (raw, payload) = record.split_at(HEADER_LEN);
    (raw.try_into().expect("split at HEADER_LEN"), payload)
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:08}.seg"))
}

fn key_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{n:08}.key"))
}

/// The AAD that binds a wrapped segment key to its segment number.
fn key_purpose(n: u64) -> String {
    format!("postern spool segment {n}")
}

#[cfg(test)]
mod tests;
