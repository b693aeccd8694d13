//! The local admin API: a Unix socket (`<data_dir>/admin.sock`, mode 0600) that the CLI uses
//! for what needs the running daemon's ledger (sled admits one process): subject export and
//! erasure, the privacy report, the retention pass on demand, and the suppression list.
//!
//! One JSON request per line, one JSON response per line: `{"op":"export","address":"..."}`
//! answers `{"ok":true,"result":...}` or `{"ok":false,"error":"..."}`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::ledger::Ledger;
use crate::queue::{HoldReason, Queue, QueueState, Selector};
use crate::spool::Spool;
use crate::suppress::{Entry, Reason};

/// A request to the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Every ledger record about an address, its suppression entry and its bounce run.
    Export {
        address: String,
    },
    /// Removes the address's records, its run of hard bounces and its queued deliveries;
    /// keeps its suppression entry.
    Erase {
        address: String,
    },
    Report,
    /// Runs the retention pass now, on the daemon's clock.
    Purge,
    SuppressAdd {
        address: String,
        reason: Reason,
        expires_at: Option<i64>,
    },
    SuppressRemove {
        address: String,
    },
    SuppressList,
    /// Messages waiting in the queue, oldest first: ids, ages, sizes, recipient counts and
    /// destination domains; never an address or the body.
    QueueList {
        /// Only messages with a pending recipient at this domain.
        #[serde(default)]
        domain: Option<String>,
        /// Only messages in this state.
        #[serde(default)]
        state: Option<QueueState>,
    },
    /// One message's envelope and attempts, in log form; never the body.
    QueueShow {
        id: String,
    },
    /// Makes messages due now: one (`id`), those for a domain, or all.
    QueueFlush {
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        domain: Option<String>,
    },
    QueueHold {
        id: String,
    },
    QueueRelease {
        id: String,
    },
    /// Removes a message; its body is destroyed and its recipients recorded as cancelled.
    QueueDelete {
        id: String,
    },
    /// Returns a message to its sender with a failure notice.
    QueueBounce {
        id: String,
    },
    /// Entries as `suppress export` wrote them (pseudonyms), or addresses with reasons.
    SuppressImport {
        #[serde(default)]
        entries: Vec<Entry>,
        #[serde(default)]
        addresses: Vec<(String, Reason)>,
    },
}

/// Why the CLI could not get an answer.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach the daemon at {path} (is `postern serve` running?): {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("admin socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("daemon answered: {0}")]
    Refused(String),
    #[error("bad answer from the daemon")]
    Protocol,
}

/// Binds a Unix socket with `mode`, replacing a stale one but refusing to steal a live
/// daemon's. Also used for the local submission socket.
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use: another daemon runs on this data directory",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// The daemon side.
pub struct Admin {
    pub ledger: Arc<Ledger>,
    pub spool: Spool,
    pub queue: Arc<Queue>,
    pub clock: Arc<dyn Clock>,
}

impl Admin {
    pub async fn serve(self, listener: UnixListener, shutdown: CancellationToken) {
        let this = Arc::new(self);
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else { continue };
            let this = this.clone();
            tokio::spawn(async move {
                let _ = this.connection(stream).await;
            });
        }
    }

    async fn connection(&self, stream: UnixStream) -> std::io::Result<()> {
        let (read, mut write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        while let Some(line) = lines.next_line().await? {
            let response = match serde_json::from_str::<Request>(&line) {
                Ok(req) => match self.handle(req).await {
                    Ok(result) => serde_json::json!({"ok": true, "result": result}),
                    Err(e) => serde_json::json!({"ok": false, "error": e}),
                },
                Err(e) => serde_json::json!({"ok": false, "error": format!("bad request: {e}")}),
            };
            write.write_all(format!("{response}\n").as_bytes()).await?;
        }
        Ok(())
    }

    /// Carries out one request.
    pub async fn handle(&self, req: Request) -> Result<serde_json::Value, String> {
        let now = self.clock.now();
        let l = &self.ledger;
        let err = |e: &dyn std::fmt::Display| e.to_string();
        match req {
            Request::Export { address } => {
                let data = l.export(&address).map_err(|e| err(&e))?;
                Ok(serde_json::json!({
                    "address": address,
                    "records": data.records,
                    "suppression": data.suppression,
                    "bounce_run": data.bounce_run,
                }))
            }
            Request::Erase { address } => {
                let records = l.erase(&address).map_err(|e| err(&e))?;
                let (messages, recipients) = self.cancel_queued(&address).await?;
                tracing::info!(records, messages, recipients, "erasure request carried out");
                Ok(serde_json::json!({
                    "records_removed": records,
                    "queued_recipients_removed": recipients,
                    "queued_messages_touched": messages,
                    "suppression_kept": l.suppress.check(&address, now).map_err(|e| err(&e))?.is_some(),
                }))
            }
            Request::Report => {
                let mut report = l.report().map_err(|e| err(&e))?;
                report["spool_live_messages"] = self.spool.live().len().into();
                Ok(report)
            }
            Request::Purge => {
                let retention =
                    crate::daemon::retention_pass(l, &self.spool, now).map_err(|e| err(&e))?;
                Ok(serde_json::json!({
                    "records": retention.ledger.records,
                    "days": retention.ledger.days,
                    "bounce_runs": retention.ledger.bounce_runs,
                    "quarantine_files": retention.quarantine_files,
                    "pseudonym_keys_destroyed": retention.ledger.pseudonym_keys,
                    "pseudonym_key_started": retention.pseudonym_key_started,
                }))
            }
            Request::SuppressAdd {
                address,
                reason,
                expires_at,
            } => {
                let e = l
                    .suppress
                    .add(&address, reason, now, expires_at)
                    .map_err(|e| err(&e))?;
                Ok(serde_json::to_value(e).unwrap_or_default())
            }
            Request::SuppressRemove { address } => Ok(
                serde_json::json!({ "removed": l.suppress.remove(&address).map_err(|e| err(&e))? }),
            ),
            Request::SuppressList => Ok(serde_json::to_value(
                l.suppress.list().map_err(|e| err(&e))?,
            )
            .unwrap_or_default()),
            Request::QueueList { .. }
            | Request::QueueShow { .. }
            | Request::QueueFlush { .. }
            | Request::QueueHold { .. }
            | Request::QueueRelease { .. }
            | Request::QueueDelete { .. }
            | Request::QueueBounce { .. } => self.queue_op(req).await,
            Request::SuppressImport { entries, addresses } => {
                for e in &entries {
                    l.suppress.add_entry(e).map_err(|e| err(&e))?;
                }
                for (a, reason) in &addresses {
                    l.suppress.add(a, *reason, now, None).map_err(|e| err(&e))?;
                }
                Ok(serde_json::json!({ "imported": entries.len() + addresses.len() }))
            }
        }
    }

    /// The queue tools' requests.
    async fn queue_op(&self, req: Request) -> Result<serde_json::Value, String> {
        let q = &self.queue;
        let id = |s: &str| s.parse().map_err(|_| format!("{s:?} is not a queue id"));
        match req {
            Request::QueueList { domain, state } => {
                json(Ok(q.list(domain.as_deref(), state).await))
            }
            Request::QueueShow { id: s } => json(q.show(id(&s)?).await),
            Request::QueueFlush { id: Some(s), .. } => {
                let n = q.flush(&Selector::One(id(&s)?)).await;
                Ok(serde_json::json!({ "flushed": n }))
            }
            Request::QueueFlush { id: None, domain } => {
                let which = domain.map_or(Selector::All, Selector::Domain);
                Ok(serde_json::json!({ "flushed": q.flush(&which).await }))
            }
            Request::QueueHold { id: s } => json(q.hold(id(&s)?, HoldReason::Operator).await),
            Request::QueueRelease { id: s } => json(q.release(id(&s)?).await),
            Request::QueueDelete { id: s } => json(
                q.delete(id(&s)?)
                    .await
                    .map(|n| serde_json::json!({ "cancelled": n })),
            ),
            Request::QueueBounce { id: s } => json(
                q.bounce(id(&s)?)
                    .await
                    .map(|n| serde_json::json!({ "returned": n })),
            ),
            _ => Err("not a queue request".into()),
        }
    }

    /// Drops `address` from every queued message (the body goes when no recipient is left).
    /// This reads each live message: erasure is rare, the queue is what is waiting now.
    async fn cancel_queued(&self, address: &str) -> Result<(usize, usize), String> {
        // One generation for the whole scan: a rotation meanwhile must not hide a match.
        let pseudonyms = self.ledger.pseudonyms();
        let me = pseudonyms.of(address);
        let (mut messages, mut recipients) = (0, 0);
        for id in self.spool.live() {
            let Ok(msg) = self.spool.read(id).await else {
                continue;
            };
            let hits: Vec<usize> = msg
                .envelope
                .recipients
                .iter()
                .enumerate()
                .filter(|(i, r)| !msg.state.final_rcpts[*i] && pseudonyms.of(r) == me)
                .map(|(i, _)| i)
                .collect();
            if hits.is_empty() {
                continue;
            }
            self.spool
                .update(id, &hits, None)
                .await
                .map_err(|e| e.to_string())?;
            messages += 1;
            recipients += hits.len();
        }
        Ok((messages, recipients))
    }
}

/// An operator action's result as the admin API answers it.
fn json<T: Serialize>(v: Result<T, crate::queue::OpError>) -> Result<serde_json::Value, String> {
    v.map_err(|e| e.to_string())
        .and_then(|v| serde_json::to_value(v).map_err(|e| e.to_string()))
}

/// The CLI side: sends one request and returns the result.
pub async fn request(path: &Path, req: &Request) -> Result<serde_json::Value, AdminError> {
    let stream = UnixStream::connect(path)
        .await
        .map_err(|source| AdminError::Connect {
            path: path.display().to_string(),
            source,
        })?;
    let (read, mut write) = stream.into_split();
    let line = serde_json::to_string(req).map_err(|_| AdminError::Protocol)?;
    write.write_all(format!("{line}\n").as_bytes()).await?;
    let mut lines = BufReader::new(read).lines();
    let answer = lines.next_line().await?.ok_or(AdminError::Protocol)?;
    let v: serde_json::Value = serde_json::from_str(&answer).map_err(|_| AdminError::Protocol)?;
    if v["ok"].as_bool() == Some(true) {
        Ok(v["result"].clone())
    } else {
        Err(AdminError::Refused(
            v["error"].as_str().unwrap_or("unknown error").to_string(),
        ))
    }
}
