//! The SMTP server: listeners, connection limits and one task per session.
//!
//! [`Server::bind`] binds every configured listener before anything is served, so a port
//! conflict fails the start instead of leaving a half-running daemon, and tests can bind to
//! `127.0.0.1:0` and learn the ports. [`Server::run`] accepts until the cancellation token
//! fires, then waits for sessions to finish their current transaction.

mod admit;
mod policy;
mod proxy;
mod received;
mod session;
mod stream;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::Accounts;
use crate::config::{Config, ListenerConfig, ListenerMode};
use crate::queue::Queue;
use crate::spool::Spool;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot bind the local submission socket {path}: {source}")]
    Local {
        path: String,
        source: std::io::Error,
    },
}

/// What every session shares.
pub(crate) struct Context {
    pub config: Arc<Config>,
    pub spool: Spool,
    /// Told about each accepted message, so delivery starts at once.
    pub queue: Arc<Queue>,
    /// Accounts, DKIM keys and certificate: replaced as a whole on reload (SIGHUP).
    live: RwLock<Arc<Live>>,
    /// Delivery metadata and the suppression list.
    pub ledger: Arc<crate::ledger::Ledger>,
    /// The daemon's clock: arrival times must agree with the queue's (expiry, delay notices).
    pub clock: Arc<dyn crate::clock::Clock>,
    /// Fires on shutdown: sessions between commands say 421 and close.
    pub shutdown: CancellationToken,
    /// Failed logins, connection rates and sending limits.
    pub limits: Arc<dyn crate::limits::LimitStore>,
    /// Password checks run here, never on the reactor or the shared blocking pool.
    pub auth_pool: crate::auth::CheckPool,
    /// Open connections per client address.
    pub(crate) open: Arc<admit::OpenConnections>,
    /// Places for sessions receiving message content (`limits.max_concurrent_data`): what
    /// bounds the bodies held in memory when thousands of clients send at once.
    pub data_slots: Arc<Semaphore>,
}

/// What a reload replaces without a restart. A session takes a snapshot when it starts, so it
/// sees one consistent set for its whole life.
pub(crate) struct Live {
    pub accounts: Arc<Accounts>,
    /// DKIM keys; every accepted message is signed before it is spooled.
    pub dkim: Arc<crate::dkim::Keys>,
    pub tls: TlsAcceptor,
}

impl Context {
    pub(crate) fn live(&self) -> Arc<Live> {
        self.live.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Why a reload was refused (the running set stays in force).
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("DKIM: {0}")]
    Dkim(#[from] crate::dkim::DkimError),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// Replaces accounts, DKIM keys and the certificate of a running server.
#[derive(Clone)]
pub struct ReloadHandle {
    ctx: Arc<Context>,
}

impl ReloadHandle {
    /// Loads everything from `config` first; swaps only if all of it loaded. Other settings
    /// (listeners, limits, delivery) need a restart.
    pub fn reload(&self, config: &Config) -> Result<(), ReloadError> {
        let dkim = Arc::new(crate::dkim::Keys::load(config)?);
        let (cert, key) = (config.path(&config.tls.cert), config.path(&config.tls.key));
        let (tls, _) = crate::tls::server_config(&cert, &key, &config.server.hostname)?;
        let live = Arc::new(Live {
            accounts: Arc::new(Accounts::from_config(&config.accounts)),
            dkim,
            tls: TlsAcceptor::from(tls),
        });
        *self.ctx.live.write().unwrap_or_else(|p| p.into_inner()) = live;
        Ok(())
    }
}

/// What the server is built from.
pub struct Parts {
    pub config: Arc<Config>,
    pub spool: Spool,
    pub queue: Arc<Queue>,
    pub dkim: Arc<crate::dkim::Keys>,
    pub ledger: Arc<crate::ledger::Ledger>,
    pub tls: Arc<rustls::ServerConfig>,
    pub clock: Arc<dyn crate::clock::Clock>,
}

/// A server with its listeners bound.
pub struct Server {
    ctx: Arc<Context>,
    listeners: Vec<(TcpListener, ListenerConfig)>,
    /// The local submission socket, when `[local]` is configured.
    local: Option<tokio::net::UnixListener>,
}

impl Server {
    /// Binds every `[[listener]]` of `config`.
    pub async fn bind(parts: Parts, shutdown: CancellationToken) -> Result<Server, ServerError> {
        let Parts {
            config,
            spool,
            queue,
            dkim,
            ledger,
            tls,
            clock,
        } = parts;
        let mut listeners = Vec::new();
        for l in &config.listeners {
            let listener = TcpListener::bind(l.addr)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: l.addr,
                    source,
                })?;
            listeners.push((listener, l.clone()));
        }
        let local = match config.local_dir() {
            Some(dir) => {
                let path = crate::local::LocalPaths::new(&dir).socket;
                // Any local user may submit, as with Postfix's sendmail.
                let bound =
                    crate::admin::bind(&path, 0o666).map_err(|source| ServerError::Local {
                        path: path.display().to_string(),
                        source,
                    })?;
                Some(bound)
            }
            None => None,
        };
        let accounts = Arc::new(Accounts::from_config(&config.accounts));
        let auth_pool = match config.limits.auth_threads {
            0 => crate::auth::CheckPool::per_core(),
            n => crate::auth::CheckPool::new(n),
        };
        let data_slots = Arc::new(Semaphore::new(config.limits.max_concurrent_data));
        Ok(Server {
            ctx: Arc::new(Context {
                config,
                spool,
                queue,
                live: RwLock::new(Arc::new(Live {
                    accounts,
                    dkim,
                    tls: TlsAcceptor::from(tls),
                })),
                ledger,
                clock,
                shutdown,
                limits: Arc::new(crate::limits::LocalLimits::default()),
                auth_pool,
                open: Arc::default(),
                data_slots,
            }),
            listeners,
            local,
        })
    }

    /// A handle for reloading keys and certificate while serving.
    pub fn reload_handle(&self) -> ReloadHandle {
        ReloadHandle {
            ctx: self.ctx.clone(),
        }
    }

    /// The bound addresses, in `[[listener]]` order (ports resolved when `:0` was configured).
    pub fn local_addrs(&self) -> Vec<(SocketAddr, ListenerMode)> {
        self.listeners
            .iter()
            .filter_map(|(l, c)| l.local_addr().ok().map(|a| (a, c.mode)))
            .collect()
    }

    /// Serves until the shutdown token fires, then waits (up to `drain`) for open sessions.
    pub async fn run(self, drain: Duration) {
        let sessions = TaskTracker::new();
        let slots = Arc::new(Semaphore::new(self.ctx.config.limits.max_connections));
        let mut accept_loops = Vec::new();
        for (listener, config) in self.listeners {
            let ctx = self.ctx.clone();
            let sessions = sessions.clone();
            let slots = slots.clone();
            let how = session::Listener {
                mode: config.mode,
                proxy_from: config
                    .proxy_protocol
                    .then(|| Arc::from(config.proxy_from.as_slice())),
            };
            accept_loops.push(tokio::spawn(accept_loop(
                ctx, listener, how, sessions, slots,
            )));
        }
        if let Some(listener) = self.local {
            let (ctx, sessions, slots) = (self.ctx.clone(), sessions.clone(), slots.clone());
            accept_loops.push(tokio::spawn(accept_local(ctx, listener, sessions, slots)));
        }
        for l in accept_loops {
            let _ = l.await;
        }
        sessions.close();
        if tokio::time::timeout(drain, sessions.wait()).await.is_err() {
            tracing::warn!(
                open = sessions.len(),
                "shutdown: sessions still open after the drain period"
            );
        }
    }
}

async fn accept_loop(
    ctx: Arc<Context>,
    listener: TcpListener,
    how: session::Listener,
    sessions: TaskTracker,
    slots: Arc<Semaphore>,
) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        match slots.clone().try_acquire_owned() {
            Ok(permit) => {
                let ctx = ctx.clone();
                let how = how.clone();
                sessions.spawn(async move {
                    session::run(ctx, socket, peer, how).await;
                    drop(permit);
                });
            }
            Err(_) => {
                tracing::warn!(peer = %peer.ip(), "connection limit reached; refusing");
                sessions.spawn(async move {
                    let mut socket = socket;
                    let refuse =
                        socket.write_all(b"421 4.7.0 Too many connections, try again later\r\n");
                    let _ = tokio::time::timeout(Duration::from_secs(5), refuse).await;
                });
            }
        }
    }
}

/// Accepts local submissions (`sendmail`); they share the connection limit with TCP clients.
async fn accept_local(
    ctx: Arc<Context>,
    listener: tokio::net::UnixListener,
    sessions: TaskTracker,
    slots: Arc<Semaphore>,
) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let socket = match accepted {
            Ok((socket, _)) => socket,
            Err(e) => {
                tracing::warn!(error = %e, "local accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let uid = socket.peer_cred().ok().map(|c| c.uid());
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!(
                ?uid,
                "connection limit reached; refusing a local submission"
            );
            continue;
        };
        tracing::debug!(?uid, "local submission");
        let ctx = ctx.clone();
        sessions.spawn(async move {
            session::run_local(ctx, socket).await;
            drop(permit);
        });
    }
}
