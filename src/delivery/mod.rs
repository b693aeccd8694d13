//! Outbound delivery: from "these recipients at this domain" to one outcome per recipient.
//!
//! [`Deliverer::deliver`] routes (smarthost, or MX by preference with the implicit MX and null
//! MX rules), applies the destination's limits and TLS policy, reuses an idle connection to the
//! same host when there is one, and runs one SMTP transaction for all the recipients. Every
//! recipient comes back [`Status::Delivered`], [`Status::Temporary`] or [`Status::Permanent`];
//! what to do about it (retry, bounce) is the queue's business.

pub mod client;
mod limits;
mod pool;
pub mod tls;

use std::net::SocketAddr;
use std::sync::Arc;

use client::{ClientError, ClientOptions, Connection, Needs, RemoteReply};
use tls::{TlsClient, TlsInfo, TlsSetupError};

use crate::config::{Config, DeliveryConfig, SmarthostAuth, TlsPolicy};
use crate::dns::{DnsError, MxHost, Resolver};

/// Why delivery could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("DNS: {0}")]
    Dns(#[from] DnsError),
    #[error("outbound TLS: {0}")]
    Tls(#[from] TlsSetupError),
}

/// A recipient's fate after one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Delivered,
    /// Try again later (4xx, connection failure, DNS trouble, TLS required but missing).
    Temporary,
    /// Give up now and bounce (5xx, null MX, no such domain).
    Permanent,
}

/// The outcome for one recipient.
#[derive(Debug, Clone)]
pub struct RcptOutcome {
    /// Index into the envelope's recipient list.
    pub index: usize,
    pub status: Status,
    /// RFC 3463 status, e.g. "5.1.1".
    pub code: String,
    /// RFC 3464 Diagnostic-Code value, e.g. "smtp; 550 5.1.1 User unknown".
    pub diagnostic: String,
    /// The host that answered, when one did.
    pub remote: Option<String>,
    pub remote_ip: Option<SocketAddr>,
    pub tls: Option<TlsInfo>,
}

/// One transaction to do: a message's recipients at one domain.
pub struct Job<'a> {
    /// Recipient domain (lower case); ignored for routing when a smarthost is set.
    pub domain: &'a str,
    /// Reverse path; empty for the null sender.
    pub from: &'a str,
    /// (index, address) pairs.
    pub rcpts: Vec<(usize, &'a str)>,
    pub body: &'a [u8],
    pub needs: Needs,
}

/// Limits and TLS policy resolved for one destination.
struct Destination {
    /// Shared by every domain matching the same override.
    key: String,
    policy: TlsPolicy,
    max_connections: usize,
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
        })
    }

    /// Idle pooled connections (for tests and metrics).
    pub fn idle_connections(&self) -> usize {
        self.pool.len()
    }

    /// Says QUIT on every idle connection (at shutdown, as a polite peer does).
    pub async fn close_idle(&self) {
        let conns = self.pool.drain();
        futures::future::join_all(conns.into_iter().map(Connection::quit)).await;
    }

    /// Delivers one message to the job's recipients; one outcome per recipient.
    pub async fn deliver(&self, job: Job<'_>) -> Vec<RcptOutcome> {
        // Where to go: the smarthosts, or the domain's mail exchangers.
        let (hosts, mx): (Vec<(String, u16)>, Vec<MxHost>) = if self.smarthosts.is_empty() {
            if let Some(ip) = crate::dns::literal(job.domain) {
                (vec![(ip.to_string(), self.config.port)], Vec::new())
            } else {
                match self.resolver.mx(job.domain).await {
                    Ok(mx) => (
                        mx.iter()
                            .map(|h| (h.name.clone(), self.config.port))
                            .collect(),
                        mx,
                    ),
                    Err(e) => return all(&job, dns_failure(&e)),
                }
            }
        } else {
            (self.smarthosts.clone(), Vec::new())
        };
        let dest = self.destination(job.domain, &mx);
        let Some(_slot) = self.limits.slot(&dest.key, dest.max_connections).await else {
            return all(
                &job,
                failure(
                    Status::Temporary,
                    "4.3.0",
                    "x-postern; shutting down".into(),
                ),
            );
        };
        self.limits.pace(&dest.key, dest.per_minute).await;

        let mut conn = match self.connection(&hosts, dest.policy).await {
            Ok(c) => c,
            Err(outcome) => return all(&job, outcome),
        };
        let rcpts: Vec<&str> = job.rcpts.iter().map(|(_, r)| *r).collect();
        let result = conn.send(job.from, &rcpts, job.body, job.needs).await;
        let remote = Some(conn.host.clone());
        let (remote_ip, tls) = (Some(conn.addr), conn.tls.clone());
        let outcomes: Vec<RcptOutcome> = match result {
            Ok(tx) => job
                .rcpts
                .iter()
                .zip(&tx.rcpt)
                .map(|((index, _), rcpt_reply)| {
                    let decisive = match (&tx.data, rcpt_reply.code / 100) {
                        (_, 4 | 5) | (None, _) => rcpt_reply,
                        (Some(data), _) => data,
                    };
                    let mut o = from_reply(decisive);
                    o.index = *index;
                    o
                })
                .collect(),
            Err(e) => {
                let o = client_failure(&e);
                job.rcpts
                    .iter()
                    .map(|(i, _)| RcptOutcome {
                        index: *i,
                        ..o.clone()
                    })
                    .collect()
            }
        };
        // Reuse only a connection that just completed a transaction cleanly.
        let reusable =
            result_ok(&outcomes) && conn.transactions < self.config.messages_per_connection;
        if reusable {
            self.pool
                .put(pool_key(&conn.host, conn.addr.port(), dest.policy), conn);
        } else {
            tokio::spawn(conn.quit());
        }
        outcomes
            .into_iter()
            .map(|o| RcptOutcome {
                remote: o.remote.or(remote.clone()),
                remote_ip,
                tls: tls.clone(),
                ..o
            })
            .collect()
    }

    /// An idle connection to one of `hosts`, or a new one to the first that answers.
    async fn connection(
        &self,
        hosts: &[(String, u16)],
        policy: TlsPolicy,
    ) -> Result<Connection, RcptOutcome> {
        for (host, port) in hosts {
            if let Some(mut conn) = self.pool.take(&pool_key(host, *port, policy)) {
                if conn.reset().await.is_ok() {
                    return Ok(conn);
                }
                tokio::spawn(conn.quit());
            }
        }
        let mut last = None;
        let mut tries = 0;
        let mut any_temporary_dns = false;
        for (host, port) in hosts {
            let addrs = match self.resolver.addresses(host).await {
                Ok(a) => a,
                Err(e) => {
                    any_temporary_dns |= e.is_temporary();
                    last = Some(dns_failure(&e));
                    continue;
                }
            };
            for ip in addrs {
                if tries >= 10 {
                    break;
                }
                tries += 1;
                let addr = SocketAddr::new(ip, *port);
                match self.open(addr, host, policy).await {
                    Ok(conn) => return Ok(conn),
                    Err(e) => {
                        tracing::info!(host = %host, %addr, error = %e, "connection failed");
                        last = Some(client_failure(&e));
                    }
                }
            }
        }
        let mut outcome = last.unwrap_or_else(|| {
            failure(
                Status::Temporary,
                "4.4.1",
                "x-postern; no host to try".into(),
            )
        });
        // One unreachable host among several is no reason to give up on the others later.
        if tries > 0 || any_temporary_dns {
            outcome.status = Status::Temporary;
            outcome.code = format!("4{}", &outcome.code[1..]);
        }
        Err(outcome)
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
        Destination {
            key,
            policy: matched.and_then(|d| d.tls).unwrap_or(self.config.tls),
            max_connections: matched
                .and_then(|d| d.max_connections)
                .unwrap_or(self.config.max_connections_per_destination),
            per_minute: matched.and_then(|d| d.messages_per_minute),
        }
    }
}

fn pool_key(host: &str, port: u16, policy: TlsPolicy) -> String {
    format!("{host}:{port}:{policy:?}")
}

fn result_ok(outcomes: &[RcptOutcome]) -> bool {
    // A whole-transaction failure (connection lost, timeout) marks every outcome with no reply.
    outcomes.iter().all(|o| o.diagnostic.starts_with("smtp;"))
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

fn failure(status: Status, code: &str, diagnostic: String) -> RcptOutcome {
    RcptOutcome {
        index: 0,
        status,
        code: code.to_string(),
        diagnostic,
        remote: None,
        remote_ip: None,
        tls: None,
    }
}

fn from_reply(reply: &RemoteReply) -> RcptOutcome {
    let (status, default) = match reply.code / 100 {
        2 => (Status::Delivered, "2.0.0"),
        4 => (Status::Temporary, "4.0.0"),
        _ => (Status::Permanent, "5.0.0"),
    };
    // An enhanced code whose class contradicts the reply code is ignored (RFC 3463 section 2).
    let code = reply
        .enhanced()
        .filter(|c| c.as_bytes()[0] == default.as_bytes()[0])
        .unwrap_or(default);
    failure(
        status,
        code,
        format!("smtp; {}", one_line(&reply.to_line())),
    )
}

fn client_failure(e: &ClientError) -> RcptOutcome {
    match e {
        ClientError::Rejected { reply, .. } => from_reply(reply),
        ClientError::Unsupported { status, reason } => {
            failure(Status::Permanent, status, format!("x-postern; {reason}"))
        }
        ClientError::Tls(reason) => failure(
            Status::Temporary,
            "4.7.5",
            format!("x-postern; {}", one_line(reason)),
        ),
        other => failure(
            Status::Temporary,
            "4.4.1",
            format!("x-postern; {}", one_line(&other.to_string())),
        ),
    }
}

fn dns_failure(e: &DnsError) -> RcptOutcome {
    let (status, code) = match e {
        DnsError::NullMx(_) => (Status::Permanent, "5.1.10"),
        DnsError::NoSuchDomain(_) => (Status::Permanent, "5.1.2"),
        DnsError::NoAddresses(_) => (Status::Permanent, "5.4.4"),
        DnsError::Temporary { .. } | DnsError::Config(_) => (Status::Temporary, "4.4.3"),
    };
    failure(status, code, format!("x-postern; {e}"))
}

/// Diagnostics go into DSN header fields: one line, bounded.
fn one_line(s: &str) -> String {
    let flat: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    flat.chars().take(900).collect()
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

    #[test]
    fn reply_classes_and_codes() {
        let r = |code, text: &str| RemoteReply {
            code,
            text: text.into(),
            lines: vec![text.into()],
        };
        let o = from_reply(&r(550, "5.1.1 No such user"));
        assert_eq!((o.status, o.code.as_str()), (Status::Permanent, "5.1.1"));
        assert_eq!(o.diagnostic, "smtp; 550 5.1.1 No such user");
        let o = from_reply(&r(451, "try later"));
        assert_eq!((o.status, o.code.as_str()), (Status::Temporary, "4.0.0"));
        let o = from_reply(&r(450, "5.1.1 contradictory"));
        assert_eq!(o.code, "4.0.0");
        assert_eq!(from_reply(&r(250, "2.0.0 ok")).status, Status::Delivered);
    }
}
