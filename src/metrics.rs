//! Prometheus metrics, served as text on `GET /metrics` at `[metrics] listen` (off by default).
//!
//! Counters and histograms are recorded where things happen, through the `metrics` crate's
//! macros: until a recorder is installed they cost an atomic load, so a daemon without
//! `[metrics]` pays nothing. Gauges that describe state (queue by state, spool bytes and free
//! space, outbound connections) are sampled when scraped rather than kept up to date on the hot
//! path. The endpoint is a few lines of HTTP/1.0 of our own: one route, nothing else exposed, no
//! HTTP stack to audit.
//!
//! No label carries an address or a pseudonym: refusal reasons are enhanced status codes,
//! destinations are domains, and at most [`MAX_DESTINATIONS`] of them (the rest are "other"),
//! so that a flood of one-off domains cannot grow the exposition without bound.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::config::ListenerMode;
use crate::queue::Queue;
use crate::spool::Spool;

/// Distinct destination domains given a label of their own; later ones count as "other".
pub const MAX_DESTINATIONS: usize = 200;

const ACCEPTED: &str = "postern_messages_accepted_total";
const REFUSED: &str = "postern_smtp_refusals_total";
const DELIVERIES: &str = "postern_deliveries_total";
const DELIVERED_TLS: &str = "postern_delivered_tls_total";
const ACCEPT_SECONDS: &str = "postern_accept_seconds";
const DELIVERY_SECONDS: &str = "postern_delivery_seconds";
const CONNECTIONS_IN: &str = "postern_connections_in";

/// Accept latency buckets (end of data to `250`: DKIM, fsync), in seconds.
const ACCEPT_BUCKETS: [f64; 10] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 2.0];
/// Delivery latency buckets (acceptance to delivery, retries included), in seconds.
const DELIVERY_BUCKETS: [f64; 10] = [
    1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 432000.0,
];

/// Why the exporter could not start.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics recorder: {0}")]
    Build(#[from] metrics_exporter_prometheus::BuildError),
    #[error("metrics endpoint {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What a delivery attempt came to, for one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Delivered,
    Deferred,
    Bounced,
}

impl Delivery {
    fn label(self) -> &'static str {
        match self {
            Delivery::Delivered => "delivered",
            Delivery::Deferred => "deferred",
            Delivery::Bounced => "bounced",
        }
    }
}

/// A message stored and answered `250`; `started` is the end of its data.
pub fn accepted(listener: &'static str, started: Instant) {
    metrics::counter!(ACCEPTED, "listener" => listener).increment(1);
    metrics::histogram!(ACCEPT_SECONDS).record(started.elapsed().as_secs_f64());
}

/// The label of a listener mode (`local` for the sendmail socket).
pub fn listener_label(mode: Option<ListenerMode>) -> &'static str {
    match mode {
        Some(ListenerMode::Relay) => "relay",
        Some(ListenerMode::Submission) => "submission",
        Some(ListenerMode::Submissions) => "submissions",
        None => "local",
    }
}

/// A 4xx or 5xx reply to a client, by its enhanced status code.
pub fn refused(status: &'static str) {
    metrics::counter!(REFUSED, "status" => status).increment(1);
}

/// One recipient's attempt outcome. `age` is the time since acceptance (delivered only).
pub fn delivery(result: Delivery, domain: &str, tls: bool, age: Duration) {
    let destination = destination_label(domain);
    metrics::counter!(DELIVERIES, "result" => result.label(), "destination" => destination)
        .increment(1);
    if result == Delivery::Delivered {
        let tls = if tls { "yes" } else { "no" };
        metrics::counter!(DELIVERED_TLS, "tls" => tls).increment(1);
        metrics::histogram!(DELIVERY_SECONDS).record(age.as_secs_f64());
    }
}

/// An inbound connection, counted in the open-connections gauge until dropped.
pub struct InboundConnection(());

impl InboundConnection {
    pub fn open() -> InboundConnection {
        metrics::gauge!(CONNECTIONS_IN).increment(1.0);
        InboundConnection(())
    }
}

impl Drop for InboundConnection {
    fn drop(&mut self) {
        metrics::gauge!(CONNECTIONS_IN).decrement(1.0);
    }
}

/// The domain as a label, or "other" once [`MAX_DESTINATIONS`] domains have labels.
fn destination_label(domain: &str) -> String {
    static SEEN: OnceLock<Mutex<HashSet<String>>> = OnceLock::new();
    let domain = domain.to_ascii_lowercase();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if seen.contains(&domain) {
        return domain;
    }
    if seen.len() >= MAX_DESTINATIONS {
        return "other".into();
    }
    seen.insert(domain.clone());
    domain
}

/// The process-wide recorder's handle, once installed.
static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Whether metrics are being recorded: callers skip the work of preparing labels when not.
pub fn enabled() -> bool {
    HANDLE.get().is_some()
}

/// Installs the process-wide recorder (once: later calls share it, as several daemons in one
/// test process do).
fn recorder() -> Result<PrometheusHandle, MetricsError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(ACCEPT_SECONDS.into()), &ACCEPT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(DELIVERY_SECONDS.into()), &DELIVERY_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(HANDLE.get_or_init(|| handle).clone())
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(ACCEPTED, "Messages stored and answered 250, by listener");
    describe_counter!(
        REFUSED,
        "4xx/5xx replies to clients, by enhanced status code"
    );
    describe_counter!(
        DELIVERIES,
        "Recipient delivery outcomes, by result and destination"
    );
    describe_counter!(
        DELIVERED_TLS,
        "Delivered recipients, by whether the session used TLS"
    );
    describe_histogram!(ACCEPT_SECONDS, Unit::Seconds, "End of data to 250");
    describe_histogram!(DELIVERY_SECONDS, Unit::Seconds, "Acceptance to delivery");
    describe_gauge!(CONNECTIONS_IN, "Open inbound SMTP connections");
}

/// The endpoint: the recorder's handle and what the scrape-time gauges are read from.
pub struct Exporter {
    handle: PrometheusHandle,
    queue: Arc<Queue>,
    spool: Spool,
    listener: TcpListener,
}

impl Exporter {
    /// Installs the recorder and binds `addr`.
    pub async fn bind(
        addr: SocketAddr,
        queue: Arc<Queue>,
        spool: Spool,
    ) -> Result<Exporter, MetricsError> {
        let handle = recorder()?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| MetricsError::Bind { addr, source })?;
        Ok(Exporter {
            handle,
            queue,
            spool,
            listener,
        })
    }

    /// Where it listens (the port may have been chosen by the system).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves scrapes until `shutdown`; the recorder's upkeep runs between them.
    pub async fn serve(self, shutdown: CancellationToken) {
        let this = Arc::new(self);
        let mut upkeep = tokio::time::interval(Duration::from_secs(5));
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = upkeep.tick() => {
                    this.handle.run_upkeep();
                    continue;
                }
                a = this.listener.accept() => a,
            };
            let Ok((stream, _)) = accepted else { continue };
            let this = this.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(Duration::from_secs(10), this.answer(stream)).await;
            });
        }
    }

    /// Reads the request head and answers: the exposition for `GET /metrics`, 404 otherwise.
    async fn answer(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let mut head = Vec::with_capacity(512);
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        let wanted = head.starts_with(b"GET /metrics ") || head.starts_with(b"GET /metrics?");
        let (status, body) = if wanted {
            ("200 OK", self.render())
        } else {
            ("404 Not Found", "not found\n".to_string())
        };
        let response = format!(
            "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    }

    /// Samples the state gauges, then renders everything.
    fn render(&self) -> String {
        let counts = self.queue.counts();
        let queue = |state: &'static str, n: usize| {
            metrics::gauge!("postern_queue_messages", "state" => state).set(n as f64);
        };
        queue("waiting", counts.waiting);
        queue("active", counts.active);
        queue("held", counts.held);
        let deliverer = self.queue.deliverer();
        metrics::gauge!("postern_connections_out", "state" => "busy")
            .set(deliverer.busy_sessions() as f64);
        metrics::gauge!("postern_connections_out", "state" => "idle")
            .set(deliverer.idle_connections() as f64);
        let (used, free) = self.spool.disk_usage();
        metrics::gauge!("postern_spool_bytes").set(used as f64);
        metrics::gauge!("postern_spool_free_bytes").set(free as f64);
        self.handle.run_upkeep();
        self.handle.render()
    }
}
