//! Body files: a message too big to hold in memory goes to disk as it arrives.
//!
//! A session that has received more than [`SPILL_AT`] bytes of a body starts a body file,
//! `<spool>/bodies/<queue id>.body`, and appends the body to it in sealed chunks as it reads
//! them; it holds about one chunk at a time, whatever the message's size. At the end of the data
//! the file is fdatasync'd (and its directory synced), and only then is the message record
//! written to a segment, as a [`Kind::Spilled`](super::record::Kind::Spilled) record that holds
//! the envelope, the trace and signature headers, and the body's length and chunk count. That
//! record is what commits the message: a body file without one (a client that went away, a
//! crash mid-upload, a message already destroyed) is an orphan, removed at the next start.
//!
//! # Format
//! `PSTB`, then chunks, each `u32` (little endian) sealed length and the seal of up to
//! 64 KiB. Each seal binds the queue id and the chunk's number (AAD), so chunks
//! cannot be swapped between files or reordered; the committing record's length and count
//! catch a truncated file. The key is derived from the master key (`spool body file`).
//!
//! Delivery reads the file back a chunk at a time ([`BodyReader`]): N deliveries of one message
//! cost N chunk buffers, not N copies.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::faults::FaultPoint;
use super::{QueueId, Shared, SpoolError};
use crate::crypto::{Key, OVERHEAD};

/// Bytes of body held in memory before the rest goes to a body file.
pub const SPILL_AT: usize = 256 * 1024;

/// Bytes of body sealed together: what a delivery holds of the file at a time.
const CHUNK: usize = 64 * 1024;

const MAGIC: &[u8; 4] = b"PSTB";

/// The sub-directory of the spool holding body files.
pub(super) const DIR: &str = "bodies";

/// The label the body file key is derived under.
pub(super) const KEY_LABEL: &str = "spool body file";

/// Where a message's body file lives.
pub(super) fn path(spool: &Path, id: QueueId) -> PathBuf {
    spool.join(DIR).join(format!("{id}.body"))
}

/// The queue id a body file's name gives, if it is one.
pub(super) fn id_of(name: &str) -> Option<QueueId> {
    name.strip_suffix(".body")?.parse().ok()
}

fn aad(id: QueueId, chunk: u32) -> [u8; 20] {
    let mut aad = [0u8; 20];
    aad[..16].copy_from_slice(&id.0);
    aad[16..].copy_from_slice(&chunk.to_le_bytes());
    aad
}

/// What the committing record says of a body file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Extent {
    /// Bytes of body (plaintext).
    pub len: u64,
    pub chunks: u32,
}

impl Extent {
    pub const ENCODED_LEN: usize = 12;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..8].copy_from_slice(&self.len.to_le_bytes());
        out[8..].copy_from_slice(&self.chunks.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Extent> {
        Some(Extent {
            len: u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?),
            chunks: u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?),
        })
    }
}

/// A body file being written. Dropped before [`Spill::commit`], the file is removed.
pub struct Spill {
    id: QueueId,
    path: PathBuf,
    file: Option<File>,
    shared: Arc<Shared>,
    /// Where the next chunk goes.
    offset: u64,
    extent: Extent,
    /// The file and its directory entry are on disk.
    synced: bool,
    committed: bool,
}

impl Spill {
    /// Creates the body file of message `id`.
    pub(super) fn create(shared: Arc<Shared>, id: QueueId) -> Result<Spill, SpoolError> {
        let path = path(&shared.dir, id);
        shared.faults.check(FaultPoint::BodyWrite)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let mut spill = Spill {
            id,
            path,
            file: Some(file),
            shared,
            offset: 0,
            extent: Extent { len: 0, chunks: 0 },
            synced: false,
            committed: false,
        };
        spill.write_at(MAGIC.to_vec())?;
        Ok(spill)
    }

    /// The message this body belongs to.
    pub fn id(&self) -> QueueId {
        self.id
    }

    /// Bytes of body written so far.
    pub fn written(&self) -> u64 {
        self.extent.len
    }

    pub(super) fn extent(&self) -> Extent {
        self.extent
    }

    /// Seals `chunk` (64 KiB at a time) and appends it, on a
    /// blocking thread. Refused, with nothing appended, when it would eat into the spool's
    /// free-space reserve.
    pub async fn write(&mut self, chunk: Vec<u8>) -> Result<(), SpoolError> {
        if chunk.is_empty() {
            return Ok(());
        }
        let mut file = self.file.take().ok_or(SpoolError::Closed)?;
        let (shared, id, offset, extent) = (self.shared.clone(), self.id, self.offset, self.extent);
        let done = tokio::task::spawn_blocking(move || {
            let result = seal_and_append(&shared, &mut file, id, offset, extent, &chunk);
            (file, result)
        })
        .await;
        let (file, result) = done.map_err(|_| SpoolError::Closed)?;
        self.file = Some(file);
        let (offset, extent) = result?;
        self.offset = offset;
        self.extent = extent;
        Ok(())
    }

    /// Makes the file and its name durable: called before the committing record is written.
    pub(super) async fn sync(&mut self) -> Result<(), SpoolError> {
        if self.synced {
            return Ok(());
        }
        let file = self.file.take().ok_or(SpoolError::Closed)?;
        let shared = self.shared.clone();
        let done = tokio::task::spawn_blocking(move || {
            let result = shared
                .faults
                .check(FaultPoint::BodySync)
                .and_then(|()| file.sync_data())
                .and_then(|()| crate::crypto::sync_dir(&shared.dir.join(DIR)));
            (file, result)
        })
        .await;
        let (file, result) = done.map_err(|_| SpoolError::Closed)?;
        self.file = Some(file);
        result?;
        self.synced = true;
        Ok(())
    }

    /// Reads back what was written so far (to sign the message before it is committed).
    pub fn reader(&self) -> std::io::Result<BodyReader> {
        let key = self.shared.body_key.clone();
        BodyReader::open(&self.shared.dir, key, self.id, self.extent)
    }

    /// The committing record is on disk: the file stays.
    pub(super) fn commit(mut self) {
        self.committed = true;
    }

    fn write_at(&mut self, bytes: Vec<u8>) -> std::io::Result<()> {
        if let Some(file) = &self.file {
            file.write_all_at(&bytes, self.offset)?;
            self.offset += bytes.len() as u64;
        }
        Ok(())
    }
}

/// The work of [`Spill::write`]: the reserve check, the seals and one write. Returns the new
/// end of the file and extent. A failed write is cut back off the file.
fn seal_and_append(
    shared: &Shared,
    file: &mut File,
    id: QueueId,
    offset: u64,
    mut extent: Extent,
    chunk: &[u8],
) -> Result<(u64, Extent), SpoolError> {
    if !shared.has_room_now(chunk.len() as u64) {
        return Err(SpoolError::Io(std::io::ErrorKind::StorageFull.into()));
    }
    let key = &shared.body_key;
    let mut out = Vec::with_capacity(chunk.len() + 2 * (OVERHEAD + 4));
    for piece in chunk.chunks(CHUNK) {
        let start = out.len();
        out.extend_from_slice(&[0u8; 4]);
        key.seal_into(&aad(id, extent.chunks), &[piece], &mut out)?;
        let sealed = (out.len() - start - 4) as u32;
        out[start..start + 4].copy_from_slice(&sealed.to_le_bytes());
        extent.chunks += 1;
        extent.len += piece.len() as u64;
    }
    let written = shared
        .faults
        .check(FaultPoint::BodyWrite)
        .and_then(|()| file.write_all_at(&out, offset));
    if let Err(e) = written {
        let _ = file.set_len(offset);
        return Err(e.into());
    }
    shared.took(out.len() as u64);
    Ok((offset + out.len() as u64, extent))
}

impl Drop for Spill {
    fn drop(&mut self) {
        if !self.committed {
            remove(&self.path);
        }
    }
}

/// Removes a body file; a file already gone is no error.
pub(super) fn remove(path: &Path) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), error = %e, "spool: cannot remove a body file");
        }
    }
}

/// Reads a committed body file back, chunk by chunk.
pub struct BodyReader {
    id: QueueId,
    file: Arc<File>,
    key: Arc<Key>,
    extent: Extent,
    offset: u64,
    next: u32,
    read: u64,
}

impl BodyReader {
    pub(super) fn open(
        spool: &Path,
        key: Arc<Key>,
        id: QueueId,
        extent: Extent,
    ) -> std::io::Result<BodyReader> {
        let file = File::open(path(spool, id))?;
        let mut magic = [0u8; 4];
        file.read_exact_at(&mut magic, 0)?;
        if &magic != MAGIC {
            return Err(invalid("not a body file"));
        }
        Ok(BodyReader {
            id,
            file: Arc::new(file),
            key,
            extent,
            offset: MAGIC.len() as u64,
            next: 0,
            read: 0,
        })
    }

    /// The next chunk of the body (read and opened on a blocking thread), None at the end. A
    /// chunk that does not open, or a file that ends early or runs long, is an error.
    pub async fn next(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if self.at_end()? {
            return Ok(None);
        }
        let (file, key, id, offset, n) = (
            self.file.clone(),
            self.key.clone(),
            self.id,
            self.offset,
            self.next,
        );
        let (chunk, sealed_len) =
            tokio::task::spawn_blocking(move || read_chunk(&file, &key, id, offset, n))
                .await
                .map_err(std::io::Error::other)??;
        self.advance(chunk, sealed_len).map(Some)
    }

    /// [`BodyReader::next`] on the calling thread (for work already on a blocking thread).
    pub fn next_blocking(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        if self.at_end()? {
            return Ok(None);
        }
        let (chunk, sealed_len) =
            read_chunk(&self.file, &self.key, self.id, self.offset, self.next)?;
        self.advance(chunk, sealed_len).map(Some)
    }

    fn at_end(&self) -> std::io::Result<bool> {
        if self.next < self.extent.chunks {
            Ok(false)
        } else if self.read == self.extent.len {
            Ok(true)
        } else {
            Err(invalid("body file shorter than its record says"))
        }
    }

    fn advance(&mut self, chunk: Vec<u8>, sealed_len: u32) -> std::io::Result<Vec<u8>> {
        self.offset += 4 + u64::from(sealed_len);
        self.next += 1;
        self.read += chunk.len() as u64;
        if self.read > self.extent.len {
            return Err(invalid("body file longer than its record says"));
        }
        Ok(chunk)
    }
}

/// Reads and opens chunk `n` at `offset`; returns it and its sealed length.
fn read_chunk(
    file: &File,
    key: &Key,
    id: QueueId,
    offset: u64,
    n: u32,
) -> std::io::Result<(Vec<u8>, u32)> {
    let mut len = [0u8; 4];
    file.read_exact_at(&mut len, offset)?;
    let len = u32::from_le_bytes(len);
    if len as usize > CHUNK + OVERHEAD {
        return Err(invalid("body file chunk too long"));
    }
    let mut sealed = vec![0u8; len as usize];
    file.read_exact_at(&mut sealed, offset + 4)?;
    let plain = key
        .open_in_place(&aad(id, n), sealed)
        .map_err(|_| invalid("body file chunk fails authentication"))?;
    Ok((plain, len))
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// The content of a message read back from the spool.
#[derive(Debug)]
pub enum Body {
    /// Held whole: a message that was small enough to keep in memory when it arrived.
    Inline(Vec<u8>),
    /// The trace and signature headers in memory, the message as received in its body file.
    Spilled(SpilledBody),
}

/// A [`Body::Spilled`]: what the committing record holds, and how to read the file.
pub struct SpilledBody {
    /// The trace and signature headers, then the message's header section (what a bounce
    /// quotes), kept in the record so that nothing but delivery reads the file.
    start: Vec<u8>,
    /// Bytes of `start` that are trace and signature headers.
    head_len: usize,
    id: QueueId,
    extent: Extent,
    spool: PathBuf,
    key: Arc<Key>,
}

impl std::fmt::Debug for SpilledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpilledBody")
            .field("id", &self.id)
            .field("head_len", &self.head_len)
            .field("extent", &self.extent)
            .finish_non_exhaustive()
    }
}

/// The plaintext of a spilled record's body part: extent, head length, head, headers.
pub(super) fn encode_spilled(extent: Extent, head: &[u8], headers: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(Extent::ENCODED_LEN + 4 + head.len() + headers.len());
    out.extend_from_slice(&extent.encode());
    out.extend_from_slice(&(head.len() as u32).to_le_bytes());
    out.extend_from_slice(head);
    out.extend_from_slice(headers);
    out
}

impl SpilledBody {
    /// Decodes what [`encode_spilled`] made.
    pub(super) fn decode(
        plain: Vec<u8>,
        id: QueueId,
        spool: &Path,
        key: Arc<Key>,
    ) -> Option<SpilledBody> {
        let extent = Extent::decode(&plain)?;
        let at = Extent::ENCODED_LEN;
        let head_len = u32::from_le_bytes(plain.get(at..at + 4)?.try_into().ok()?) as usize;
        let start = plain.get(at + 4..)?.to_vec();
        (head_len <= start.len()).then(|| SpilledBody {
            start,
            head_len,
            id,
            extent,
            spool: spool.to_path_buf(),
            key,
        })
    }
}

impl Body {
    /// Bytes of content: trace and signature headers, then the message as received.
    pub fn len(&self) -> u64 {
        match self {
            Body::Inline(b) => b.len() as u64,
            Body::Spilled(s) => s.head_len as u64 + s.extent.len,
        }
    }

    /// Whether there is no content at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message from its start to at least the end of its header section: all of an
    /// inline body, the headers of a spilled one (for bounces, which quote headers only).
    pub fn start(&self) -> &[u8] {
        match self {
            Body::Inline(b) => b,
            Body::Spilled(s) => &s.start,
        }
    }

    /// Reads the content in order, a chunk at a time.
    pub fn chunks(&self) -> std::io::Result<Chunks<'_>> {
        Ok(match self {
            Body::Inline(b) => Chunks::Inline(Some(b)),
            Body::Spilled(s) => Chunks::Spilled {
                head: Some(&s.start[..s.head_len]),
                file: BodyReader::open(&s.spool, s.key.clone(), s.id, s.extent)?,
            },
        })
    }

    /// The whole content in one buffer (tools and tests: delivery reads [`Body::chunks`]).
    pub async fn whole(&self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(self.len() as usize);
        let mut chunks = self.chunks()?;
        while let Some(chunk) = chunks.next().await? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }
}

/// The content of a [`Body`], in order.
pub enum Chunks<'a> {
    Inline(Option<&'a [u8]>),
    Spilled {
        head: Option<&'a [u8]>,
        file: BodyReader,
    },
}

impl<'a> Chunks<'a> {
    /// The next piece of content, None at the end.
    pub async fn next(&mut self) -> std::io::Result<Option<std::borrow::Cow<'a, [u8]>>> {
        use std::borrow::Cow;
        match self {
            Chunks::Inline(body) => Ok(body.take().map(Cow::Borrowed)),
            Chunks::Spilled { head, file } => match head.take() {
                Some(head) => Ok(Some(Cow::Borrowed(head))),
                None => Ok(file.next().await?.map(Cow::Owned)),
            },
        }
    }
}
