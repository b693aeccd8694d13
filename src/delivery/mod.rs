//! Outbound delivery: from "these recipients at this domain" to one outcome per recipient.
//!
//! [`Deliverer::deliver`] routes (smarthost, or MX by preference with the implicit MX and null
//! MX rules), applies the destination's limits and TLS policy, reuses an idle connection to the
//! same host when there is one, and runs one SMTP transaction for all the recipients. Every
//! recipient comes back with a typed [`RcptOutcome`] (delivered, transient or permanent, with
//! its RFC 3463 status); what to do about it (retry, bounce) is the queue's business.

pub mod client;
mod limits;
mod outcome;
mod pool;
pub mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::sync::Semaphore;

use client::{ClientError, ClientOptions, Connection, Needs, Stage};
pub use limits::Wake;
pub use outcome::{Cause, RcptOutcome};
use tls::{TlsClient, TlsSetupError};

use crate::config::{Config, DeliveryConfig, SmarthostAuth, TlsPolicy};
use crate::dns::{DnsError, MxHost, Resolver};
use crate::memory::Holding;
use crate::proto::EnhancedStatusCode;
use crate::spool::Body;

/// Why delivery could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("DNS: {0}")]
    Dns(#[from] DnsError),
    #[error("outbound TLS: {0}")]
    Tls(#[from] TlsSetupError),
}

/// One transaction to do: a message's recipients at one domain.
pub struct Job<'a> {
    /// Recipient domain (lower case); ignored for routing when a smarthost is set.
    pub domain: &'a str,
    /// Reverse path; empty for the null sender.
    pub from: &'a str,
    /// (index, address) pairs.
    pub rcpts: Vec<(usize, &'a str)>,
    /// Read only once a session is ready to send it.
    pub content: &'a dyn Content,
    pub needs: Needs,
    /// How to wake the job's message if its destination has too many jobs waiting already:
    /// then the job ends at once with [`RcptOutcome::busy`] for every recipient, and the wake
    /// is called once the destination has room. None: the job waits, however many do.
    pub park: Option<&'a (dyn Fn() -> Wake + Sync)>,
}

/// Where a job's message content comes from. It is read once the job has its destination's
/// turn and a session, so that thousands of messages queued for one destination wait holding
/// their envelopes only, not their bodies.
pub trait Content: Sync {
    /// Reads the content, with the memory it takes held until the [`Holding`] drops; None
    /// when it cannot be read (the reader says why in the log).
    fn load(&self) -> futures::future::BoxFuture<'_, Option<Holding<Body>>>;
}

/// Limits and TLS policy resolved for one destination.
struct Destination {
    /// Shared by every domain matching the same override.
    key: String,
    policy: TlsPolicy,
    max_connections: usize,
    /// Jobs that may wait for one of its connections; more are turned away to wait as
    /// messages in the queue (see [`limits`]).
    max_waiting: usize,
    per_minute: Option<u32>,
}

/// The delivery engine, shared by all queue workers.
pub struct Deliverer {
    config: DeliveryConfig,
    resolver: Resolver,
    tls: TlsClient,
    pool: Arc<pool::Pool>,
    limits: limits::Limits,
    opts: ClientOptions,
    smarthosts: Vec<(String, u16)>,
    /// Outbound SMTP sessions at once (`max_in_flight`): held only while talking to a server.
    sessions: Arc<Semaphore>,
    /// Our own listening addresses and public addresses: an MX among them is a loop.
    own: OwnAddresses,
}

/// The addresses that reach this server.
#[derive(Default)]
struct OwnAddresses {
    /// Set once the listeners are bound.
    listeners: std::sync::OnceLock<Vec<SocketAddr>>,
    public: Vec<IpAddr>,
}

impl OwnAddresses {
    /// True when connecting to `addr` would reach one of our own listeners.
    fn contains(&self, addr: SocketAddr) -> bool {
        let listeners = self.listeners.get().map_or(&[][..], Vec::as_slice);
        listeners.iter().any(|l| {
            l.port() == addr.port()
                && (l.ip() == addr.ip()
                    || (l.ip().is_unspecified()
                        && (addr.ip().is_loopback() || self.public.contains(&addr.ip()))))
        })
    }
}

/// Parses "host", "host:port", "[v6]:port" or "v6".
pub fn parse_host_port(s: &str, default_port: u16) -> Option<(String, u16)> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Some((addr.ip().to_string(), addr.port()));
    }
    if let Ok(ip) = s.parse::<std::net::IpAddr>() {
        return Some((ip.to_string(), default_port));
    }
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, p.parse().ok()?),
        None => (s, default_port),
    };
    let valid = !host.is_empty()
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    valid.then(|| (host.to_ascii_lowercase(), port))
}

impl Deliverer {
    pub fn new(config: &Config) -> Result<Deliverer, DeliveryError> {
        let d = &config.delivery;
        let resolver = Resolver::new(&config.dns.nameservers, config.dns.timeout)?;
        let ca = d.tls_ca_file.as_ref().map(|p| config.path(p));
        let tls = TlsClient::new(ca.as_deref())?;
        let smarthosts = d
            .smarthost
            .to_vec()
            .iter()
            .filter_map(|s| parse_host_port(s, 25))
            .collect();
        Ok(Deliverer {
            config: d.clone(),
            resolver,
            tls,
            pool: pool::Pool::new(d.idle_timeout),
            limits: limits::Limits::default(),
            opts: ClientOptions {
                helo: config.server.hostname.clone(),
                connect_timeout: d.connect_timeout,
                reply_timeout: d.reply_timeout,
            },
            smarthosts,
            sessions: Arc::new(Semaphore::new(d.max_in_flight.max(1))),
            own: OwnAddresses {
                listeners: Default::default(),
                public: config.server.public_addresses.clone(),
            },
        })
    }

    /// Tells the deliverer where this server listens (once, after binding), so that an MX
    /// pointing back at us fails at once instead of looping.
    pub fn set_own_addresses(&self, addrs: Vec<SocketAddr>) {
        let _ = self.own.listeners.set(addrs);
    }

    /// Idle pooled connections (for tests and metrics).
    pub fn idle_connections(&self) -> usize {
        self.pool.len()
    }

    /// Outbound sessions talking to a server now (for metrics).
    pub fn busy_sessions(&self) -> usize {
        self.config.max_in_flight.max(1) - self.sessions.available_permits()
    }

    /// Says QUIT on every idle connection (at shutdown, as a polite peer does).
    pub async fn close_idle(&self) {
        let conns = self.pool.drain();
        futures::future::join_all(conns.into_iter().map(Connection::quit)).await;
    }

    /// Delivers one message to the job's recipients; one outcome per recipient. The whole
    /// attempt ends after `attempt_timeout`, whatever the remote server does.
    pub async fn deliver(&self, job: Job<'_>) -> Vec<RcptOutcome> {
        match tokio::time::timeout(self.config.attempt_timeout, self.attempt(&job)).await {
            Ok(outcomes) => outcomes,
            Err(_) => all(
                &job,
                RcptOutcome::new(EnhancedStatusCode::new(4, 4, 2), Cause::DeadlinePassed),
            ),
        }
    }

    /// Where to go: the smarthosts, or the domain's mail exchangers (with their MX records,
    /// which decide the destination's limits).
    async fn route(&self, domain: &str) -> Result<(Vec<(String, u16)>, Vec<MxHost>), DnsError> {
        if !self.smarthosts.is_empty() {
            return Ok((self.smarthosts.clone(), Vec::new()));
        }
        if let Some(ip) = crate::dns::literal(domain) {
            return Ok((vec![(ip.to_string(), self.config.port)], Vec::new()));
        }
        let mx = self.resolver.mx(domain).await?;
        let hosts = mx
            .iter()
            .map(|h| (h.name.clone(), self.config.port))
            .collect();
        Ok((hosts, mx))
    }

    /// One attempt. Waiting for DNS and for the destination's limits holds no session slot, so
    /// a slow or stuck destination never keeps mail for other destinations waiting; nor its
    /// message's body, read only once a session is free. The DNS lookup and the sending are
    /// boxed, so that a job waiting its turn is a small future (thousands may wait for one
    /// destination after a burst).
    async fn attempt(&self, job: &Job<'_>) -> Vec<RcptOutcome> {
        let (hosts, mx) = match Box::pin(self.route(job.domain)).await {
            Ok(route) => route,
            Err(e) => return all(job, RcptOutcome::from_dns(&e)),
        };
        let dest = self.destination(job.domain, &mx);
        let down = || RcptOutcome::new(EnhancedStatusCode::new(4, 4, 1), Cause::DestinationDown);
        if self.limits.is_down(&dest.key) {
            return all(job, down());
        }
        let slot = self
            .limits
            .slot(&dest.key, dest.max_connections, dest.max_waiting, job.park);
        let _slot = match slot.await {
            limits::Turn::Go(slot) => slot,
            limits::Turn::Busy => return all(job, RcptOutcome::busy()),
            limits::Turn::Closed => {
                let stopping =
                    RcptOutcome::new(EnhancedStatusCode::new(4, 3, 0), Cause::ShuttingDown);
                return all(job, stopping);
            }
        };
        self.limits.pace(&dest.key, dest.per_minute).await;
        // Marked down while this message waited its turn: deferred with the others.
        if self.limits.is_down(&dest.key) {
            return all(job, down());
        }
        let Ok(_session) = self.sessions.acquire().await else {
            let stopping = RcptOutcome::new(EnhancedStatusCode::new(4, 3, 0), Cause::ShuttingDown);
            return all(job, stopping);
        };
        let Some(body) = job.content.load().await else {
            let unreadable = RcptOutcome::new(EnhancedStatusCode::new(4, 3, 0), Cause::Unreadable);
            return all(job, unreadable);
        };
        Box::pin(self.send(job, &body, &hosts, &dest)).await
    }

    /// Sends the job on a pooled or new connection to one of `hosts`, once the destination's
    /// limits and a session allow it.
    async fn send(
        &self,
        job: &Job<'_>,
        body: &Body,
        hosts: &[(String, u16)],
        dest: &Destination,
    ) -> Vec<RcptOutcome> {
        let mut reuse = true;
        loop {
            let conn = self.connection(job.domain, hosts, dest.policy, reuse).await;
            match &conn {
                Ok(_) => self.limits.connected(&dest.key),
                Err(o) if o.is_unreachable() => {
                    if self.limits.connect_failed(&dest.key, self.down_policy()) {
                        tracing::warn!(destination = %dest.key, period = ?self.config.destination_down_for, "destination marked down after repeated connection failures");
                    }
                }
                Err(_) => {}
            }
            let (conn, reused) = match conn {
                Ok(conn) => conn,
                Err(outcome) => return all(job, outcome),
            };
            match self.transaction(job, body, conn, dest.policy, reused).await {
                Some(outcomes) => return outcomes,
                // A pooled connection the server had closed while it idled: once more on a
                // new one (the second time round takes nothing from the pool, so this ends).
                None => reuse = false,
            }
        }
    }

    fn down_policy(&self) -> limits::DownPolicy {
        limits::DownPolicy {
            after: self.config.destination_down_after,
            period: self.config.destination_down_for,
        }
    }

    /// Runs the transaction on `conn`, then pools or closes it. None when `conn` came from the
    /// pool and turned out closed before the server answered anything (its MAIL was lost): the
    /// caller tries again on a new connection, as nothing of this message reached the server.
    async fn transaction(
        &self,
        job: &Job<'_>,
        body: &Body,
        mut conn: Connection,
        policy: TlsPolicy,
        reused: bool,
    ) -> Option<Vec<RcptOutcome>> {
        let rcpts: Vec<&str> = job.rcpts.iter().map(|(_, r)| *r).collect();
        let result = conn.send(job.from, &rcpts, body, job.needs).await;
        if reused && matches!(result, Err(ClientError::Lost(Stage::Mail))) {
            tracing::debug!(host = %conn.host, "pooled connection was closed by the server; opening another");
            return None;
        }
        let outcomes: Vec<RcptOutcome> = match &result {
            Ok(tx) => job
                .rcpts
                .iter()
                .zip(&tx.rcpt)
                .map(|((index, _), rcpt_reply)| {
                    // A refused recipient is decided by its RCPT reply, the others by the data's.
                    let decisive = match &tx.data {
                        Some(data) if rcpt_reply.is_success() => data,
                        _ => rcpt_reply,
                    };
                    RcptOutcome {
                        index: *index,
                        ..RcptOutcome::from_reply(decisive)
                    }
                })
                .collect(),
            Err(e) => all(job, RcptOutcome::from_client(e)),
        };
        let (remote, remote_ip, tls) = (conn.host.clone(), conn.addr, conn.tls.clone());
        // Reuse only a connection whose transaction ended in a reply (a refusal resets it, and
        // a completed DATA leaves the server reset, RFC 5321 4.1.1.4); after a timeout, a lost
        // connection or a refused RSET its state is unknown.
        let clean = match &result {
            Ok(_) => true,
            Err(ClientError::Rejected { stage, .. }) => *stage != Stage::Rset,
            Err(_) => false,
        };
        if clean && conn.transactions < self.config.messages_per_connection {
            self.pool
                .put(pool_key(&conn.host, conn.addr.port(), policy), conn);
        } else if matches!(result, Err(ClientError::Body(_))) {
            // Mid-DATA: a QUIT now would be taken as content. Dropped, the content is discarded.
            drop(conn);
        } else {
            tokio::spawn(conn.quit());
        }
        let outcomes = outcomes
            .into_iter()
            .map(|o| RcptOutcome {
                remote: o.remote.or(Some(remote.clone())),
                remote_ip: Some(remote_ip),
                tls: tls.clone(),
                ..o
            })
            .collect();
        Some(outcomes)
    }

    /// An idle connection to one of `hosts` (when `reuse`), or a new one to the first that
    /// answers, trying at most `max_mx_addresses` addresses. True with one from the pool.
    async fn connection(
        &self,
        domain: &str,
        hosts: &[(String, u16)],
        policy: TlsPolicy,
        reuse: bool,
    ) -> Result<(Connection, bool), RcptOutcome> {
        if let Some(conn) = reuse.then(|| self.pooled(hosts, policy)).flatten() {
            return Ok((conn, true));
        }
        let mut last = None;
        let mut tries = 0;
        let mut any_temporary_dns = false;
        for (host, port) in hosts {
            if tries >= self.config.max_mx_addresses {
                break;
            }
            let addrs = match self.resolver.addresses(host).await {
                Ok(a) => a,
                Err(e) => {
                    any_temporary_dns |= e.is_temporary();
                    last = Some(RcptOutcome::from_dns(&e));
                    continue;
                }
            };
            for ip in addrs {
                let addr = SocketAddr::new(ip, *port);
                if self.own.contains(addr) {
                    tracing::warn!(domain, host = %host, %addr, "mail exchanger is this server: mail loops back to myself");
                    return Err(RcptOutcome::new(
                        EnhancedStatusCode::new(5, 4, 6),
                        Cause::LoopsBack {
                            domain: domain.to_string(),
                        },
                    ));
                }
                if tries >= self.config.max_mx_addresses {
                    break;
                }
                tries += 1;
                match self.open(addr, host, policy).await {
                    Ok(conn) => return Ok((conn, false)),
                    // It greeted with our own name: it is us, whatever other hosts there are.
                    Err(e @ ClientError::LoopsBack { .. }) => {
                        tracing::warn!(domain, host = %host, %addr, error = %e, "mail loops back to myself");
                        return Err(RcptOutcome::from_client(&e));
                    }
                    Err(e) => {
                        tracing::info!(host = %host, %addr, error = %e, "connection failed");
                        last = Some(RcptOutcome::from_client(&e));
                    }
                }
            }
        }
        let mut outcome = last
            .unwrap_or_else(|| RcptOutcome::new(EnhancedStatusCode::new(4, 4, 1), Cause::NoHost));
        // One unreachable host among several is no reason to give up on the others later.
        if tries > 0 || any_temporary_dns {
            outcome.status = outcome.status.with_class(4);
        }
        Err(outcome)
    }

    /// An idle pooled connection to one of `hosts` that the server has not closed. No RSET
    /// round trip: the last transaction left the server reset, and a look at the socket shows
    /// a close or a parting `421` (a close just after the look is caught in `transaction`).
    fn pooled(&self, hosts: &[(String, u16)], policy: TlsPolicy) -> Option<Connection> {
        for (host, port) in hosts {
            while let Some(conn) = self.pool.take(&pool_key(host, *port, policy)) {
                if conn.is_open() {
                    return Some(conn);
                }
                drop(conn);
            }
        }
        None
    }

    async fn open(
        &self,
        addr: SocketAddr,
        host: &str,
        policy: TlsPolicy,
    ) -> Result<Connection, ClientError> {
        let mut conn = match Connection::open(addr, host, policy, &self.tls, &self.opts).await {
            // Opportunistic TLS that fails the handshake falls back to plain text, as peers do:
            // refusing would make delivery to that host impossible, not safer.
            Err(ClientError::Tls(reason)) if policy == TlsPolicy::Opportunistic => {
                tracing::info!(host, %addr, reason, "TLS handshake failed; retrying without TLS");
                Connection::open(addr, host, TlsPolicy::None, &self.tls, &self.opts).await?
            }
            other => other?,
        };
        if let (Some(SmarthostAuth { username, password }), false) =
            (&self.config.smarthost_auth, self.smarthosts.is_empty())
        {
            conn.auth(username, password).await?;
        }
        Ok(conn)
    }

    fn destination(&self, domain: &str, mx: &[MxHost]) -> Destination {
        let matched = self.config.destinations.iter().find(|d| {
            d.domain
                .as_deref()
                .is_some_and(|x| x.eq_ignore_ascii_case(domain))
                || d.mx_suffix.as_deref().is_some_and(|suffix| {
                    mx.iter()
                        .any(|h| h.name.ends_with(&suffix.to_ascii_lowercase()))
                })
        });
        let key = match matched {
            Some(d) => match (&d.domain, &d.mx_suffix) {
                (Some(dom), _) => format!("domain:{}", dom.to_ascii_lowercase()),
                (None, Some(sfx)) => format!("mx:{}", sfx.to_ascii_lowercase()),
                (None, None) => format!("domain:{domain}"),
            },
            None if !self.smarthosts.is_empty() => "smarthost".to_string(),
            None => format!("domain:{domain}"),
        };
        let max_connections = matched
            .and_then(|d| d.max_connections)
            .unwrap_or(self.config.max_connections_per_destination);
        Destination {
            key,
            policy: matched.and_then(|d| d.tls).unwrap_or(self.config.tls),
            max_connections,
            max_waiting: max_waiting(max_connections, self.config.max_active_messages),
            per_minute: matched.and_then(|d| d.messages_per_minute),
        }
    }
}

/// Jobs that may wait for a destination's `max_connections`: enough that a connection coming
/// free always finds one ready ([`WAITING_PER_CONNECTION`] each), but no more than half of the
/// queue's `max_active_messages` places, so that one stuck destination leaves room for the
/// others however small the queue is set.
fn max_waiting(max_connections: usize, max_active_messages: usize) -> usize {
    (max_connections * WAITING_PER_CONNECTION).min(max_active_messages / 2)
}

/// See [`max_waiting`]: with the default 20 connections, 80 waiting jobs, more than a burst of
/// 50 clients (`benches/relay.sh`) ever makes, so that nothing is turned away in steady work.
const WAITING_PER_CONNECTION: usize = 4;

fn pool_key(host: &str, port: u16, policy: TlsPolicy) -> String {
    format!("{host}:{port}:{policy:?}")
}

fn all(job: &Job<'_>, outcome: RcptOutcome) -> Vec<RcptOutcome> {
    job.rcpts
        .iter()
        .map(|(i, _)| RcptOutcome {
            index: *i,
            ..outcome.clone()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            parse_host_port("relay.test", 25),
            Some(("relay.test".into(), 25))
        );
        assert_eq!(
            parse_host_port("Relay.test:587", 25),
            Some(("relay.test".into(), 587))
        );
        assert_eq!(
            parse_host_port("[::1]:2525", 25),
            Some(("::1".into(), 2525))
        );
        assert_eq!(
            parse_host_port("127.0.0.1:26", 25),
            Some(("127.0.0.1".into(), 26))
        );
        assert_eq!(parse_host_port("relay.test:99999", 25), None);
        assert_eq!(parse_host_port("bad host", 25), None);
    }
}
