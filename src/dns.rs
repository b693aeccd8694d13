//! Looking up where mail for a domain goes (RFC 5321 section 5): MX records, the implicit MX,
//! null MX (RFC 7505), and the addresses of each host.
//!
//! Answers are classified the way delivery needs them: a domain that does not exist or
//! refuses mail is a permanent failure; a server failure or timeout is temporary.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use rand::seq::SliceRandom;

/// Why a lookup gave no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// NXDOMAIN: the domain does not exist. Permanent.
    #[error("domain {0} does not exist")]
    NoSuchDomain(String),
    /// The domain publishes a null MX: it accepts no mail. Permanent (5.1.10).
    #[error("domain {0} accepts no mail (null MX)")]
    NullMx(String),
    /// The name exists but has no address records. Permanent for an implicit MX.
    #[error("{0} has no address records")]
    NoAddresses(String),
    /// SERVFAIL, timeout, network error. Temporary.
    #[error("DNS lookup for {name} failed: {reason}")]
    Temporary { name: String, reason: String },
    /// The resolver could not be built from the configuration.
    #[error("resolver configuration: {0}")]
    Config(String),
}

impl DnsError {
    /// True when retrying later may help.
    pub fn is_temporary(&self) -> bool {
        matches!(self, DnsError::Temporary { .. } | DnsError::Config(_))
    }
}

/// One mail exchanger, by preference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    pub preference: u16,
    /// Host name without the trailing dot, lower case.
    pub name: String,
}

/// A DNS resolver for mail routing.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl Resolver {
    /// Uses `nameservers` ("ip:port" or "ip") when given, else the system's resolv.conf.
    pub fn new(nameservers: &[String], timeout: Duration) -> Result<Resolver, DnsError> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(|e| DnsError::Config(e.to_string()))?
        } else {
            let mut servers = Vec::new();
            for ns in nameservers {
                let addr: SocketAddr = ns
                    .parse()
                    .or_else(|_| ns.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                    .map_err(|_| {
                        DnsError::Config(format!("dns.nameservers: {ns:?} is not an address"))
                    })?;
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                servers.push(NameServerConfig::new(addr.ip(), true, vec![udp, tcp]));
            }
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let opts: &mut ResolverOpts = builder.options_mut();
        opts.timeout = timeout;
        opts.attempts = 2;
        // Mail domains are absolute: never try search suffixes.
        opts.ndots = 0;
        let inner = builder
            .build()
            .map_err(|e| DnsError::Config(e.to_string()))?;
        Ok(Resolver { inner })
    }

    /// The mail exchangers of `domain`, most preferred first, equal preferences shuffled.
    /// No MX record gives the implicit MX (the domain itself, preference 0).
    pub async fn mx(&self, domain: &str) -> Result<Vec<MxHost>, DnsError> {
        let fqdn = absolute(domain);
        match self.inner.mx_lookup(fqdn.as_str()).await {
            Ok(lookup) => {
                let mut hosts: Vec<MxHost> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(mx) => Some(MxHost {
                            preference: mx.preference,
                            name: mx
                                .exchange
                                .to_ascii()
                                .trim_end_matches('.')
                                .to_ascii_lowercase(),
                        }),
                        _ => None,
                    })
                    .collect();
                if hosts.is_empty() {
                    return Ok(vec![implicit(domain)]);
                }
                // RFC 7505: a single MX with the root as exchange means "no mail here".
                if hosts.len() == 1 && hosts[0].name.is_empty() {
                    return Err(DnsError::NullMx(domain.to_string()));
                }
                hosts.retain(|h| !h.name.is_empty());
                hosts.shuffle(&mut rand::thread_rng());
                hosts.sort_by_key(|h| h.preference); // stable: shuffled order kept within a preference
                Ok(hosts)
            }
            Err(e) if e.is_nx_domain() => Err(DnsError::NoSuchDomain(domain.to_string())),
            Err(e) if e.is_no_records_found() => Ok(vec![implicit(domain)]),
            Err(e) => Err(DnsError::Temporary {
                name: domain.to_string(),
                reason: e.to_string(),
            }),
        }
    }

    /// IPv6 and IPv4 addresses of `host` (IPv6 first, as RFC 6724 would usually order them).
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, DnsError> {
        if let Some(ip) = literal(host) {
            return Ok(vec![ip]);
        }
        let fqdn = absolute(host);
        let (v6, v4) = tokio::join!(
            self.inner.ipv6_lookup(fqdn.as_str()),
            self.inner.ipv4_lookup(fqdn.as_str())
        );
        let mut out = Vec::new();
        let mut temporary = None;
        let mut nxdomain = false;
        for result in [v6, v4] {
            match result {
                Ok(lookup) => out.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })),
                Err(e) if e.is_nx_domain() => nxdomain = true,
                Err(e) if e.is_no_records_found() => {}
                Err(e) => temporary = Some(e.to_string()),
            }
        }
        if !out.is_empty() {
            return Ok(out);
        }
        match (temporary, nxdomain) {
            (Some(reason), _) => Err(DnsError::Temporary {
                name: host.to_string(),
                reason,
            }),
            (None, true) => Err(DnsError::NoSuchDomain(host.to_string())),
            (None, false) => Err(DnsError::NoAddresses(host.to_string())),
        }
    }
}

fn implicit(domain: &str) -> MxHost {
    MxHost {
        preference: 0,
        name: domain.trim_end_matches('.').to_ascii_lowercase(),
    }
}

fn absolute(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

/// An address literal domain (`[192.0.2.1]`, `[IPv6:2001:db8::1]`) or a bare IP.
pub fn literal(domain: &str) -> Option<IpAddr> {
    let inner = domain
        .strip_prefix('[')
        .and_then(|d| d.strip_suffix(']'))
        .unwrap_or(domain);
    let inner = inner
        .strip_prefix("IPv6:")
        .or_else(|| inner.strip_prefix("ipv6:"))
        .unwrap_or(inner);
    inner.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_literals() {
        assert_eq!(literal("[192.0.2.1]"), Some("192.0.2.1".parse().unwrap()));
        assert_eq!(
            literal("[IPv6:2001:db8::1]"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(literal("example.test"), None);
    }
}
