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
use crate::queue::Queue;
use crate::server::{Server, ServerError};
use crate::spool::{RecoveryReport, Spool, SpoolError};
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
}

/// How to run: the clock, and whether the queue runs by itself.
pub struct Options {
    pub clock: Arc<dyn Clock>,
    /// False for tests that drive the queue with [`Queue::run_due`] and a manual clock.
    pub run_queue: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            clock: Arc::new(SystemClock),
            run_queue: true,
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
    /// Cancelling it starts a graceful shutdown.
    pub shutdown: CancellationToken,
    run_queue: bool,
}

impl Daemon {
    /// Opens keys and spool, loads (or generates) the certificate and binds every listener.
    pub async fn start(config: Config) -> Result<Daemon, StartError> {
        Daemon::start_with(config, Options::default()).await
    }

    /// [`Daemon::start`] with a chosen clock and queue mode.
    pub async fn start_with(config: Config, options: Options) -> Result<Daemon, StartError> {
        let data_dir = config.data_dir();
        // Private: nothing under it is for other local users, sealed or not.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&data_dir)
            .map_err(SpoolError::Io)?;
        let master = load_or_create_master_key(&config.master_key_path())?;
        let (spool, recovery) = Spool::open(&data_dir, master, config.spool.segment_size)?;
        let (cert, key) = (config.path(&config.tls.cert), config.path(&config.tls.key));
        let (tls, source) = crate::tls::server_config(&cert, &key, &config.server.hostname)?;
        if source == CertSource::Generated {
            tracing::warn!(cert = %cert.display(), "generated a self-signed certificate; install a real one for production");
        }
        let dkim = Arc::new(crate::dkim::Keys::load(&config)?);
        let shutdown = CancellationToken::new();
        let config = Arc::new(config);
        let deliverer = Arc::new(Deliverer::new(&config)?);
        let queue = Queue::new(spool.clone(), deliverer, options.clock, config.clone());
        let server = Server::bind(
            config,
            spool.clone(),
            queue.clone(),
            dkim,
            tls,
            shutdown.clone(),
        )
        .await?;
        Ok(Daemon {
            server,
            spool,
            recovery,
            queue,
            shutdown,
            run_queue: options.run_queue,
        })
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
        self.server.run(drain).await;
        if let Some(q) = queue {
            let _ = q.await;
        }
    }
}
