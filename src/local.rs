//! Local submission: how programs on this host hand mail to the daemon without AUTH.
//!
//! `sendmail` ([`crate::sendmail`]) speaks SMTP over a Unix socket in the local directory
//! (`[local] dir`), which any local user may connect to. The daemon serves it as a trusted
//! session (no AUTH, relaying allowed), so local mail passes the same checks, DKIM signing and
//! durable store as any other; `250` still means fdatasync'd.
//!
//! When the daemon is not running, `sendmail` writes the message to the maildrop instead,
//! fsyncs file and directory, and exits 0: nothing is lost. Any user may write there, so the
//! files must not hold mail in clear: each is an X25519 sealed box to a public key whose
//! private half only the daemon holds (in its data directory, mode 0600). The daemon replays
//! each file through its own socket at start and every `pickup_interval`, and removes it once
//! the message is spooled.
//!
//! Layout of the local directory (created by the daemon):
//! - `submit.sock` (0666): the submission socket;
//! - `maildrop/` (1733): anyone may add a file, nobody but the daemon may list or remove one;
//! - `maildrop.pub` (0644): the public key the maildrop files are sealed to.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::BytesMut;
use crypto_box::{PublicKey, SecretKey};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::sync::CancellationToken;

use crate::crypto::{random_bytes, sync_dir, write_new_private};
use crate::proto::{parse_response, Response};

/// Why local submission or the maildrop failed.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("maildrop key: {0}")]
    Key(String),
    #[error("maildrop file is not sealed to this daemon's key, or is damaged")]
    Unseal,
    #[error("maildrop file: {0}")]
    Format(String),
}

/// Why a submission over the socket did not end in `250`.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// No daemon answers on the socket (not running, or not configured for local submission).
    #[error("cannot reach the daemon at {path}: {source}")]
    Unreachable {
        path: String,
        source: std::io::Error,
    },
    /// The connection failed or timed out midway; whether the message was stored is unknown.
    #[error("connection to the daemon failed during {0}")]
    Lost(&'static str),
    /// The daemon answered `4xx` (or garbage): try again later.
    #[error("{stage}: {}", reply.to_single_line())]
    Temporary {
        stage: &'static str,
        reply: Response,
    },
    /// The daemon refused with `5xx`: retrying will not help.
    #[error("{stage}: {}", reply.to_single_line())]
    Rejected { stage: Stage, reply: Response },
}

/// Where in the dialogue a permanent refusal came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Greeting,
    Sender,
    /// A recipient was refused (syntax, suppression list, policy).
    Recipient,
    /// The content was refused (size, line length, line endings, DKIM policy).
    Content,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Greeting => "greeting",
            Stage::Sender => "MAIL FROM",
            Stage::Recipient => "RCPT TO",
            Stage::Content => "message content",
        })
    }
}

/// The files of the local directory.
#[derive(Debug, Clone)]
pub struct LocalPaths {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub maildrop: PathBuf,
    pub public_key: PathBuf,
}

impl LocalPaths {
    pub fn new(dir: &Path) -> LocalPaths {
        LocalPaths {
            dir: dir.to_path_buf(),
            socket: dir.join("submit.sock"),
            maildrop: dir.join("maildrop"),
            public_key: dir.join("maildrop.pub"),
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LocalError + '_ {
    move |source| LocalError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A message as `sendmail` hands it over: envelope and final content (CRLF line endings).
#[derive(Clone, Serialize, Deserialize)]
pub struct Submission {
    /// Envelope sender; empty for the null sender.
    pub from: String,
    pub recipients: Vec<String>,
    pub body: Vec<u8>,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submission")
            .field("recipients", &self.recipients.len())
            .field("size", &self.body.len())
            .finish_non_exhaustive()
    }
}

/// First bytes of a maildrop file: format and version, so a future format can be told apart.
const MAGIC: &[u8; 8] = b"PSTMDv1\n";

impl Submission {
    /// The bytes of a maildrop file: [`MAGIC`], then the submission sealed to `key`.
    pub fn seal(&self, key: &PublicKey) -> Result<Vec<u8>, LocalError> {
        let plain = postcard::to_allocvec(self).map_err(|e| LocalError::Format(e.to_string()))?;
        let sealed = key
            .seal(&mut crypto_box::aead::OsRng, &plain)
            .map_err(|_| LocalError::Key("sealing failed".into()))?;
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a maildrop file's bytes.
    pub fn open(bytes: &[u8], key: &SecretKey) -> Result<Submission, LocalError> {
        let sealed = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| LocalError::Format("not a postern maildrop file".into()))?;
        let plain = key.unseal(sealed).map_err(|_| LocalError::Unseal)?;
        postcard::from_bytes(&plain).map_err(|e| LocalError::Format(e.to_string()))
    }

    /// True when some content byte is not ASCII (the session needs `BODY=8BITMIME`).
    fn eight_bit(&self) -> bool {
        !self.body.is_ascii()
    }

    /// True when an address is not ASCII (the session needs `SMTPUTF8`).
    fn smtputf8(&self) -> bool {
        !self.from.is_ascii() || self.recipients.iter().any(|r| !r.is_ascii())
    }
}

/// Creates the local directory (0755) and the maildrop (1733), owned by the daemon's user.
pub fn prepare_dir(paths: &LocalPaths) -> Result<(), LocalError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(&paths.dir)
        .map_err(io_err(&paths.dir))?;
    match std::fs::DirBuilder::new()
        .mode(0o1733)
        .create(&paths.maildrop)
    {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err(&paths.maildrop)(e)),
    }
    // The umask may have cleared bits from the mode given at creation.
    std::fs::set_permissions(&paths.maildrop, std::fs::Permissions::from_mode(0o1733))
        .map_err(io_err(&paths.maildrop))
}

/// The daemon's maildrop key: the private half stays in the data directory.
pub struct MaildropKey(SecretKey);

impl MaildropKey {
    /// Loads `<data_dir>/maildrop.key` (creating it, 0600, on first start) and writes its
    /// public half to the local directory, replacing whatever is there, so that a file planted
    /// before the first start cannot redirect sealed mail to someone else's key.
    pub fn load_or_create(data_dir: &Path, paths: &LocalPaths) -> Result<MaildropKey, LocalError> {
        let path = data_dir.join("maildrop.key");
        let secret = match std::fs::read(&path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim_ascii())
                    .ok()
                    .and_then(|b| <[u8; 32]>::try_from(b).ok())
                    .ok_or_else(|| LocalError::Key(format!("{} is damaged", path.display())))?;
                SecretKey::from_bytes(bytes)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut bytes = [0u8; 32];
                random_bytes(&mut bytes).map_err(|e| LocalError::Key(e.to_string()))?;
                write_new_private(&path, format!("{}\n", hex::encode(bytes)).as_bytes())
                    .map_err(|e| LocalError::Key(e.to_string()))?;
                SecretKey::from_bytes(bytes)
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        publish(&paths.public_key, &secret.public_key())?;
        Ok(MaildropKey(secret))
    }
}

/// Writes the public key (hex, mode 0644) through a temporary file and a rename.
fn publish(path: &Path, key: &PublicKey) -> Result<(), LocalError> {
    let tmp = path.with_extension("pub.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(format!("{}\n", hex::encode(key.as_bytes())).as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        sync_dir(dir).map_err(io_err(dir))?;
    }
    Ok(())
}

/// Reads the public key the daemon published.
pub fn read_public_key(paths: &LocalPaths) -> Result<PublicKey, LocalError> {
    let text = std::fs::read(&paths.public_key).map_err(io_err(&paths.public_key))?;
    hex::decode(text.trim_ascii())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .map(PublicKey::from_bytes)
        .ok_or_else(|| LocalError::Key(format!("{} is damaged", paths.public_key.display())))
}

/// Suffix of a complete maildrop file; others are being written (or were abandoned).
const READY: &str = "msg";

/// Seals `submission` into a new maildrop file, durably: written to a temporary name, fsync'd,
/// renamed, and the directory fsync'd, so the daemon never sees half a file and a crash after
/// this returns loses nothing. Returns the file's path.
pub fn write_to_maildrop(
    paths: &LocalPaths,
    key: &PublicKey,
    submission: &Submission,
) -> Result<PathBuf, LocalError> {
    let sealed = submission.seal(key)?;
    let mut name = [0u8; 16];
    random_bytes(&mut name).map_err(|e| LocalError::Key(e.to_string()))?;
    let name = hex::encode(name);
    let tmp = paths.maildrop.join(format!("{name}.tmp"));
    let done = paths.maildrop.join(format!("{name}.{READY}"));
    // Readable by the daemon's user, which owns neither the file nor the process writing it.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(&sealed)
        .and_then(|()| file.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &done).map_err(io_err(&done))?;
    sync_dir(&paths.maildrop).map_err(io_err(&paths.maildrop))?;
    Ok(done)
}

/// How long the client waits for each reply from its own daemon.
const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// A minimal SMTP client over the local socket: one transaction, content sent with
/// `BDAT LAST` (no dot-stuffing to get wrong). Returns the daemon's `250` reply.
pub async fn submit(socket: &Path, submission: &Submission) -> Result<Response, SubmitError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| SubmitError::Unreachable {
            path: socket.display().to_string(),
            source,
        })?;
    let mut c = Client {
        stream,
        input: BytesMut::new(),
    };
    c.expect("greeting", Stage::Greeting).await?;
    c.command("EHLO localhost".into(), "EHLO", Stage::Greeting)
        .await?;
    let mut mail = format!("MAIL FROM:<{}>", submission.from);
    if submission.eight_bit() {
        mail.push_str(" BODY=8BITMIME");
    }
    if submission.smtputf8() {
        mail.push_str(" SMTPUTF8");
    }
    c.command(mail, "MAIL", Stage::Sender).await?;
    for rcpt in &submission.recipients {
        c.command(format!("RCPT TO:<{rcpt}>"), "RCPT", Stage::Recipient)
            .await?;
    }
    c.write(
        format!("BDAT {} LAST\r\n", submission.body.len()).as_bytes(),
        "BDAT",
    )
    .await?;
    c.write(&submission.body, "BDAT").await?;
    let accepted = c.expect("BDAT", Stage::Content).await?;
    // The message is stored; a failed QUIT changes nothing.
    let _ = c.command("QUIT".into(), "QUIT", Stage::Greeting).await;
    Ok(accepted)
}

struct Client {
    stream: UnixStream,
    input: BytesMut,
}

impl Client {
    async fn command(
        &mut self,
        line: String,
        stage: &'static str,
        refused: Stage,
    ) -> Result<Response, SubmitError> {
        self.write(format!("{line}\r\n").as_bytes(), stage).await?;
        self.expect(stage, refused).await
    }

    async fn write(&mut self, bytes: &[u8], stage: &'static str) -> Result<(), SubmitError> {
        match tokio::time::timeout(REPLY_TIMEOUT, self.stream.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(SubmitError::Lost(stage)),
        }
    }

    /// Reads one reply; anything but 2xx/3xx is an error of the matching kind.
    async fn expect(
        &mut self,
        stage: &'static str,
        refused: Stage,
    ) -> Result<Response, SubmitError> {
        let reply = loop {
            match parse_response(&mut self.input) {
                Ok(Some(reply)) => break reply,
                Ok(None) => {}
                Err(_) => return Err(SubmitError::Lost(stage)),
            }
            let read = tokio::time::timeout(REPLY_TIMEOUT, self.stream.read_buf(&mut self.input));
            match read.await {
                Ok(Ok(n)) if n > 0 && self.input.len() < 64 * 1024 => {}
                _ => return Err(SubmitError::Lost(stage)),
            }
        };
        match reply.code {
            200..=399 => Ok(reply),
            500..=599 => Err(SubmitError::Rejected {
                stage: refused,
                reply,
            }),
            _ => Err(SubmitError::Temporary { stage, reply }),
        }
    }
}

/// The daemon side of the maildrop: replays files through the submission socket.
pub struct Pickup {
    pub paths: LocalPaths,
    pub key: MaildropKey,
    /// Files larger than this are not read (the session would refuse them anyway).
    pub max_size: u64,
}

/// What one pass over the maildrop did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PickupReport {
    pub submitted: usize,
    /// Refused by the session (5xx) or unreadable: renamed to `*.rejected`, kept sealed.
    pub rejected: usize,
    /// Left for the next pass (the daemon answered 4xx).
    pub deferred: usize,
}

impl Pickup {
    /// Runs a pass now and then every `interval` until shutdown.
    pub async fn run(self, interval: Duration, shutdown: CancellationToken) {
        loop {
            let report = self.pass().await;
            if report != PickupReport::default() {
                tracing::info!(
                    submitted = report.submitted,
                    rejected = report.rejected,
                    deferred = report.deferred,
                    "maildrop pickup"
                );
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One pass over every complete file in the maildrop.
    pub async fn pass(&self) -> PickupReport {
        let mut report = PickupReport::default();
        let entries = match std::fs::read_dir(&self.paths.maildrop) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the maildrop");
                return report;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some(READY) {
                continue;
            }
            match self.one(&path).await {
                Ok(()) => report.submitted += 1,
                Err(PickupError::Later(e)) => {
                    tracing::warn!(error = %e, "maildrop: daemon busy; will retry");
                    report.deferred += 1;
                    break;
                }
                Err(PickupError::Refused(reason)) => {
                    tracing::error!(file = %path.display(), %reason, "maildrop file refused; kept as .rejected");
                    let _ = std::fs::rename(&path, path.with_extension("rejected"));
                    report.rejected += 1;
                }
            }
        }
        if report.submitted + report.rejected > 0 {
            let _ = sync_dir(&self.paths.maildrop);
        }
        report
    }

    async fn one(&self, path: &Path) -> Result<(), PickupError> {
        // Not followed: a link planted here must not make the daemon read its own files.
        let meta =
            std::fs::symlink_metadata(path).map_err(|e| PickupError::Later(e.to_string()))?;
        if !meta.file_type().is_file() || meta.len() > self.max_size {
            return Err(PickupError::Refused(
                "not a regular file, or too large".into(),
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| PickupError::Later(e.to_string()))?;
        let submission = Submission::open(&bytes, &self.key.0)
            .map_err(|e| PickupError::Refused(e.to_string()))?;
        match submit(&self.paths.socket, &submission).await {
            Ok(reply) => {
                std::fs::remove_file(path).map_err(|e| PickupError::Later(e.to_string()))?;
                tracing::info!(reply = %reply.to_single_line(), "maildrop message submitted");
                Ok(())
            }
            Err(SubmitError::Rejected { stage, reply }) => Err(PickupError::Refused(format!(
                "{stage}: {}",
                reply.to_single_line()
            ))),
            Err(e) => Err(PickupError::Later(e.to_string())),
        }
    }
}

enum PickupError {
    Later(String),
    Refused(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submission() -> Submission {
        Submission {
            from: "app@sender.test".into(),
            recipients: vec!["bob@dest.test".into()],
            body: b"Subject: hi\r\n\r\nSECRET-BODY-MARKER\r\n".to_vec(),
        }
    }

    #[test]
    fn maildrop_files_are_sealed_to_the_daemon_key_only() {
        let dir = tempfile::tempdir().unwrap();
        let paths = LocalPaths::new(&dir.path().join("local"));
        prepare_dir(&paths).unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let key = MaildropKey::load_or_create(&dir.path().join("data"), &paths).unwrap();
        let public = read_public_key(&paths).unwrap();
        let file = write_to_maildrop(&paths, &public, &submission()).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        assert!(!bytes.windows(18).any(|w| w == b"SECRET-BODY-MARKER"));
        assert!(!bytes.windows(8).any(|w| w == b"dest.test"));
        let opened = Submission::open(&bytes, &key.0).unwrap();
        assert_eq!(opened.body, submission().body);
        assert_eq!(opened.recipients, submission().recipients);
        let other = SecretKey::from_bytes([7; 32]);
        assert!(matches!(
            Submission::open(&bytes, &other),
            Err(LocalError::Unseal)
        ));
        // The same key after a restart, and the maildrop's mode is what users rely on.
        let again = MaildropKey::load_or_create(&dir.path().join("data"), &paths).unwrap();
        assert_eq!(again.0.to_bytes(), key.0.to_bytes());
        let mode = std::fs::metadata(&paths.maildrop)
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o1733);
    }
}
