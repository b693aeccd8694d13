//! Wiring the pieces into a running MTA: keys, spool, TLS and listeners.
//!
//! The binary's `serve` is this plus signal handling; integration tests start the same thing
//! in-process on `127.0.0.1:0`.

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::clock::{Clock, SystemClock};
use crate::config::{Config, ListenerMode};
use crate::crypto::{load_or_create_master_key, CryptoError};
use crate::delivery::{Deliverer, DeliveryError};
use crate::ledger::{Ledger, Purged};
use crate::local::{LocalPaths, MaildropKey, Pickup};
use crate::metrics::Exporter;
use crate::queue::Queue;
use crate::server::Parts;
use crate::server::{Server, ServerError};
use crate::spool::{RecoveryReport, Spool, SpoolError, SpoolOptions};
use crate::tls::{CertSource, TlsError};

/// Why the daemon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("master key: {0}")]
    MasterKey(#[from] CryptoError),
    #[error("spool: {0}")]
    Spool(#[from] SpoolError),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("delivery: {0}")]
    Delivery(#[from] DeliveryError),
    #[error("DKIM: {0}")]
    Dkim(#[from] crate::dkim::DkimError),
    #[error("{0}")]
    Ledger(#[from] crate::ledger::LedgerError),
    #[error("admin socket: {0}")]
    Admin(std::io::Error),
    #[error("local submission: {0}")]
    Local(#[from] crate::local::LocalError),
    #[error("{0} is locked: another postern runs on this data directory")]
    Locked(String),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
}

/// The open-files limit the daemon runs under, after [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit now in force (None: unlimited).
    pub limit: Option<u64>,
    /// What the configuration can use at once: every connection in and out, and a margin for
    /// the spool, the ledger, logs and listeners.
    pub needed: u64,
}

impl OpenFiles {
    /// True when the configured limits could run out of descriptors first (the accept loop
    /// then backs off on EMFILE: clients wait, nothing is lost, but the caps do not hold).
    pub fn is_short(&self) -> bool {
        self.limit.is_some_and(|l| l < self.needed)
    }
}

/// Raises the soft open-files limit to the hard one, as a server that holds a descriptor per
/// connection must: a shell's default soft limit (1,024) is below `max_connections` alone.
/// The systemd unit sets both limits (`LimitNOFILE`), and this changes nothing there.
pub fn raise_open_files_limit(config: &Config) -> OpenFiles {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let needed = (config.limits.max_connections + config.delivery.max_in_flight) as u64 + 256;
    let now = getrlimit(Resource::Nofile);
    if now.current < now.maximum {
        let raised = Rlimit {
            current: now.maximum,
            maximum: now.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, raised) {
            tracing::warn!(error = %e, "cannot raise the open-files limit");
        }
    }
    OpenFiles {
        limit: getrlimit(Resource::Nofile).current,
        needed,
    }
}

/// How to run: the clock, and whether the queue runs by itself.
pub struct Options {
    pub clock: Arc<dyn Clock>,
    /// False for tests that drive the queue with [`Queue::run_due`] and a manual clock.
    pub run_queue: bool,
    /// Faults to inject under the spool's file operations (tests); none by default.
    pub spool_faults: Arc<crate::spool::Faults>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            clock: Arc::new(SystemClock),
            run_queue: true,
            spool_faults: Arc::default(),
        }
    }
}

/// A started daemon: listeners bound, spool recovered, not yet serving.
pub struct Daemon {
    server: Server,
    /// The spool, shared with the queue (and tests).
    pub spool: Spool,
    /// What recovery found in the spool at start.
    pub recovery: RecoveryReport,
    /// The delivery queue.
    pub queue: Arc<Queue>,
    /// Delivery metadata and suppression list.
    pub ledger: Arc<Ledger>,
    admin: tokio::net::UnixListener,
    admin_path: std::path::PathBuf,
    /// Held (flock) for the daemon's life.
    _lock: std::fs::File,
    clock: Arc<dyn Clock>,
    grace: Duration,
    /// Cancelling it starts a graceful shutdown.
    pub shutdown: CancellationToken,
    run_queue: bool,
    /// The maildrop pickup and how often it runs, when `[local]` is configured.
    pickup: Option<(Pickup, Duration)>,
    /// The Prometheus endpoint, when `[metrics] listen` is set.
    metrics: Option<crate::metrics::Exporter>,
}

impl Daemon {
    /// Opens keys and spool, loads (or generates) the certificate and binds every listener.
    pub async fn start(config: Config) -> Result<Daemon, StartError> {
        Daemon::start_with(config, Options::default()).await
    }

    /// [`Daemon::start`] with a chosen clock and queue mode.
    pub async fn start_with(config: Config, options: Options) -> Result<Daemon, StartError> {
        let data_dir = config.data_dir();
        let lock = own_data_dir(&data_dir)?;
        // What the configuration names is checked before any data is touched.
        let master = load_or_create_master_key(&config.master_key_path())?;
        let dkim = Arc::new(crate::dkim::Keys::load(&config)?);
        let tls = server_tls(&config)?;
        let deliverer = Arc::new(Deliverer::new(&config)?);
        let (ledger, spool, recovery) = open_stores(&config, &data_dir, master, &options)?;
        let pickup = local_submission(&config, &data_dir)?;
        let shutdown = CancellationToken::new();
        let grace = config.server.shutdown_grace;
        let metrics_addr = config.metrics.listen;
        let config = Arc::new(config);
        let clock = options.clock.clone();
        // What the last run was delivering when it crashed, if it did: held or tried alone.
        let (journal, crashes) = crate::queue::inflight::recover(&data_dir);
        let queue = Queue::new(
            spool.clone(),
            deliverer,
            ledger.clone(),
            options.clock,
            config.clone(),
            journal,
        );
        queue.after_crash(&crashes).await;
        let admin_path = data_dir.join("admin.sock");
        let admin = crate::admin::bind(&admin_path, 0o600).map_err(StartError::Admin)?;
        let parts = Parts {
            config,
            spool: spool.clone(),
            queue: queue.clone(),
            dkim,
            ledger: ledger.clone(),
            tls,
            clock: clock.clone(),
        };
        let server = Server::bind(parts, shutdown.clone()).await?;
        let own = server.local_addrs().into_iter().map(|(a, _)| a).collect();
        queue.deliverer().set_own_addresses(own);
        let metrics = match metrics_addr {
            Some(addr) => Some(Exporter::bind(addr, queue.clone(), spool.clone()).await?),
            None => None,
        };
        Ok(Daemon {
            server,
            spool,
            recovery,
            queue,
            ledger,
            admin,
            admin_path,
            _lock: lock,
            clock,
            grace,
            shutdown,
            run_queue: options.run_queue,
            pickup,
            metrics,
        })
    }

    /// Reloads DKIM keys, certificate and accounts (what SIGHUP does).
    pub fn reload_handle(&self) -> crate::server::ReloadHandle {
        self.server.reload_handle()
    }

    /// How long a shutdown may take (`server.shutdown_grace`).
    pub fn shutdown_grace(&self) -> Duration {
        self.grace
    }

    /// Where `GET /metrics` is served, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().and_then(Exporter::local_addr)
    }

    /// Bound listener addresses, in configuration order.
    pub fn local_addrs(&self) -> Vec<(SocketAddr, ListenerMode)> {
        self.server.local_addrs()
    }

    /// Serves until [`Daemon::shutdown`] is cancelled, then drains open sessions.
    pub async fn run(self, drain: Duration) {
        let queue = self
            .run_queue
            .then(|| tokio::spawn(self.queue.clone().run(self.shutdown.clone(), drain)));
        let admin = crate::admin::Admin {
            ledger: self.ledger.clone(),
            spool: self.spool.clone(),
            queue: self.queue.clone(),
            clock: self.clock.clone(),
        };
        tokio::spawn(admin.serve(self.admin, self.shutdown.clone()));
        // The submission socket is bound already: the first pass is served once `run` accepts.
        if let Some(exporter) = self.metrics {
            tokio::spawn(exporter.serve(self.shutdown.clone()));
        }
        if let Some((pickup, every)) = self.pickup {
            tokio::spawn(pickup.run(every, self.shutdown.clone()));
        }
        tokio::spawn(trim_heap_loop(self.shutdown.clone()));
        tokio::spawn(purge_loop(
            self.ledger.clone(),
            self.spool.clone(),
            self.clock.clone(),
            self.shutdown.clone(),
        ));
        self.server.run(drain).await;
        if let Some(q) = queue {
            let _ = q.await;
        }
        self.queue.stopped_cleanly();
        if let Err(e) = self.ledger.sync().and_then(|()| self.ledger.flush()) {
            tracing::error!(error = %e, "ledger flush at shutdown failed");
        }
        let _ = std::fs::remove_file(&self.admin_path);
    }
}

/// How often memory the allocator holds but nothing uses is handed back to the system.
const HEAP_TRIM_EVERY: Duration = Duration::from_secs(30);

/// glibc keeps freed memory in its per-thread arenas: after a burst (a thousand idle
/// connections, a flood of AUTH attempts) the daemon would keep its peak size for good. A trim
/// now and then returns it; the cost is a walk over the free lists, off the async threads.
async fn trim_heap_loop(shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(HEAP_TRIM_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                let _ = tokio::task::spawn_blocking(trim_heap).await;
            }
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_heap() {
    // SAFETY: malloc_trim takes no pointers and only releases memory the allocator holds free;
    // glibc makes it safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_heap() {}

/// Prepares the local directory and the maildrop key, when `[local]` is configured.
fn local_submission(
    config: &Config,
    data_dir: &std::path::Path,
) -> Result<Option<(Pickup, Duration)>, StartError> {
    let (Some(dir), Some(local)) = (config.local_dir(), config.local.as_ref()) else {
        return Ok(None);
    };
    let paths = LocalPaths::new(&dir);
    crate::local::prepare_dir(&paths)?;
    let key = MaildropKey::load_or_create(data_dir, &paths)?;
    // Room for the envelope and the sealing around the largest acceptable message.
    let max_size = config.limits.max_message_size as u64 + (1 << 20);
    let pickup = Pickup {
        paths,
        key,
        max_size,
    };
    Ok(Some((pickup, local.pickup_interval)))
}

/// What one retention pass removed.
#[derive(Debug, Default)]
pub struct Retention {
    pub ledger: Purged,
    /// Files of `spool/quarantine/`.
    pub quarantine_files: usize,
    /// The start day of a pseudonym generation this pass made.
    pub pseudonym_key_started: Option<String>,
}

impl Retention {
    fn log(&self) {
        let Retention {
            ledger,
            quarantine_files,
            pseudonym_key_started,
        } = self;
        if let Some(start) = pseudonym_key_started {
            tracing::info!(from = %start, "new pseudonym key; the old one stays until its days are purged");
        }
        if !ledger.pseudonym_keys.is_empty() {
            tracing::info!(generations = ?ledger.pseudonym_keys, "destroyed pseudonym keys past retention");
        }
        if ledger.records > 0 || ledger.bounce_runs > 0 || *quarantine_files > 0 {
            tracing::info!(
                records = ledger.records,
                days = ?ledger.days,
                bounce_runs = ledger.bounce_runs,
                quarantine_files,
                "purged data past retention"
            );
        }
    }
}

/// Removes everything kept about people for longer than `privacy.retention_days` at `now`:
/// the ledger's old days (records, index entries, bounce runs, then the days' keys and the
/// pseudonym keys that named only them) and quarantined spool data; first it rotates the
/// pseudonym key when `privacy.pseudonym_rotation` is up. The daemon runs it at start and then
/// hourly, on its clock.
pub fn retention_pass(ledger: &Ledger, spool: &Spool, now: i64) -> Result<Retention, StartError> {
    let cutoff = now - i64::from(ledger.retention_days()) * 86_400;
    Ok(Retention {
        pseudonym_key_started: ledger.rotate(now)?,
        ledger: ledger.purge(now)?,
        quarantine_files: spool.purge_quarantine(cutoff).map_err(SpoolError::Io)?,
    })
}

/// Runs the retention pass hourly (a day's data goes within an hour of passing retention).
async fn purge_loop(
    ledger: Arc<Ledger>,
    spool: Spool,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
        let (ledger, spool) = (ledger.clone(), spool.clone());
        let now = clock.now();
        match tokio::task::spawn_blocking(move || retention_pass(&ledger, &spool, now)).await {
            Ok(Ok(retention)) => retention.log(),
            Ok(Err(e)) => tracing::error!(error = %e, "retention pass failed"),
            Err(_) => {}
        }
    }
}

/// Creates the data directory (private: nothing under it is for other local users, sealed or
/// not) and locks it: one daemon per data directory, since a second one would recover (and
/// cut) the first one's active spool segment. The lock goes with the process, however it ends.
fn own_data_dir(data_dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(data_dir)
        .map_err(SpoolError::Io)?;
    lock_data_dir(data_dir)
}

/// The inbound certificate: loaded, or generated (self-signed) when neither file exists.
fn server_tls(config: &Config) -> Result<Arc<rustls::ServerConfig>, StartError> {
    let (cert, key) = (config.path(&config.tls.cert), config.path(&config.tls.key));
    let (tls, source) = crate::tls::server_config(&cert, &key, &config.server.hostname)?;
    if source == CertSource::Generated {
        tracing::warn!(cert = %cert.display(), "generated a self-signed certificate; install a real one for production");
    }
    Ok(tls)
}

/// Opens the ledger and the spool (recovering it), then runs the retention pass that catches
/// up after downtime (then it runs hourly, see `run`).
fn open_stores(
    config: &Config,
    data_dir: &std::path::Path,
    master: crate::crypto::Key,
    options: &Options,
) -> Result<(Arc<Ledger>, Spool, RecoveryReport), StartError> {
    let now = options.clock.now();
    let ledger = Arc::new(Ledger::open(
        data_dir,
        &master,
        &config.privacy,
        config.limits.ledger_cache,
        now,
    )?);
    let spool_options = SpoolOptions {
        segment_size: config.spool.segment_size,
        min_free: config.spool.min_free,
        faults: options.spool_faults.clone(),
    };
    let (spool, recovery) = Spool::open_with(data_dir, master, spool_options)?;
    retention_pass(&ledger, &spool, now)?.log();
    Ok((ledger, spool, recovery))
}

fn lock_data_dir(dir: &std::path::Path) -> Result<std::fs::File, StartError> {
    use rustix::fs::{flock, FlockOperation};
    let path = dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(SpoolError::Io)?;
    flock(&file, FlockOperation::NonBlockingLockExclusive)
        .map_err(|_| StartError::Locked(path.display().to_string()))?;
    Ok(file)
}
