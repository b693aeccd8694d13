//! `config.toml`: the schema, its defaults and its validation.
//!
//! Every table uses `deny_unknown_fields`, so a misspelt key is an error that names it rather
//! than a setting silently ignored. Relative paths are resolved against the directory of the
//! configuration file (or the working directory for the embedded defaults), so that a service
//! started from `/` finds the same files as an operator who tried it from the shell.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The committed `config.toml`, used when `postern serve` is given no `--config`.
pub const EMBEDDED_DEFAULTS: &str = include_str!("../config.toml");

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax, a wrong type or an unknown key; toml's message names the key and line.
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    /// A value of the right type that cannot work.
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub tls: TlsConfig,
    #[serde(default)]
    pub relay: RelayConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub spool: SpoolConfig,
    #[serde(default, rename = "account")]
    pub accounts: Vec<AccountConfig>,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    #[serde(default)]
    pub dkim: DkimConfig,
    #[serde(default)]
    pub privacy: PrivacyConfig,
    /// Local submission (`sendmail`); off when absent.
    #[serde(default)]
    pub local: Option<LocalConfig>,
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Directory that relative paths are resolved against; not a TOML key.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// `[server]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Name used in the banner, the EHLO reply and `Received:` headers.
    pub hostname: String,
    /// Spool, keys and (later) the ledger live here.
    pub data_dir: PathBuf,
    /// Master key file; generated (mode 0600) on first start when missing.
    /// Defaults to `<data_dir>/master.key`.
    #[serde(default)]
    pub master_key: Option<PathBuf>,
    /// Addresses this host sends from, for the SPF record `postern dns-records` suggests.
    #[serde(default)]
    pub public_addresses: Vec<IpAddr>,
    /// More `[[account]]` entries, in a file of their own that `postern account` edits and
    /// SIGHUP reloads. A missing file holds no accounts.
    #[serde(default)]
    pub accounts_file: Option<PathBuf>,
    /// After SIGTERM, open sessions and queue work get this long; outbound attempts in flight
    /// are abandoned at once (their mail stays in the spool and is retried after restart).
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How log lines look on standard error.
    #[serde(default)]
    pub log_format: LogFormat,
}

fn default_shutdown_grace() -> Duration {
    Duration::from_secs(10)
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines (without timestamps under journald, which adds its own).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// `[local]`: submission by local programs through `sendmail`, which needs no AUTH.
///
/// The directory is for every local user: it holds the submission socket (mode 0666), the
/// maildrop where `sendmail` leaves sealed messages while the daemon is down (mode 1733: any user
/// may add a file, none may list or remove another's) and the public key they are sealed to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalConfig {
    /// Created by the daemon (mode 0755) when missing.
    pub dir: PathBuf,
    /// How often the daemon looks for maildrop files besides at start.
    #[serde(default = "default_pickup_interval", with = "humantime_serde")]
    pub pickup_interval: Duration,
}

fn default_pickup_interval() -> Duration {
    Duration::from_secs(60)
}

/// How a listener treats its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerMode {
    /// Port-25 style: clients in `relay.networks` may relay without AUTH; STARTTLS offered.
    Relay,
    /// Port-587 style: STARTTLS, and AUTH required before MAIL.
    Submission,
    /// Port-465 style: implicit TLS from the first byte, AUTH required.
    Submissions,
}

/// `[[listener]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub addr: SocketAddr,
    pub mode: ListenerMode,
    /// Every connection starts with a PROXY protocol header (v1 or v2) from a load balancer,
    /// whose client address then stands for the connection. Connections without one, or
    /// from an address not in `proxy_from`, are refused.
    #[serde(default)]
    pub proxy_protocol: bool,
    /// The load balancers' addresses (CIDR); required with `proxy_protocol`.
    #[serde(default)]
    pub proxy_from: Vec<IpNet>,
}

/// `[tls]`: the server certificate. When neither file exists a self-signed pair is generated.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    #[serde(default = "default_cert")]
    pub cert: PathBuf,
    #[serde(default = "default_key")]
    pub key: PathBuf,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: default_cert(),
            key: default_key(),
        }
    }
}

fn default_cert() -> PathBuf {
    PathBuf::from("certs/server.crt")
}
fn default_key() -> PathBuf {
    PathBuf::from("certs/server.key")
}

/// `[relay]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Clients that may relay without AUTH on a relay listener.
    #[serde(default = "default_networks")]
    pub networks: Vec<IpNet>,
    /// The sender rules and limits for those clients (counted per client address).
    #[serde(default)]
    pub sender_domains: Vec<String>,
    #[serde(default)]
    pub messages_per_hour: Option<u64>,
    #[serde(default)]
    pub recipients_per_message: Option<u64>,
    #[serde(default)]
    pub recipients_per_hour: Option<u64>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            networks: default_networks(),
            sender_domains: Vec::new(),
            messages_per_hour: None,
            recipients_per_message: None,
            recipients_per_hour: None,
        }
    }
}

/// Which senders a client may use and how much it may send: an account's, or the relay
/// networks'. Empty `sender_domains` and unset limits allow anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SenderPolicy {
    /// Domains (exact, lowercase) allowed in MAIL FROM and in the `From:` header.
    pub sender_domains: Vec<String>,
    pub messages_per_hour: Option<u64>,
    pub recipients_per_message: Option<u64>,
    pub recipients_per_hour: Option<u64>,
}

fn default_networks() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect()
}

impl RelayConfig {
    /// The rules for unauthenticated relay clients.
    pub fn policy(&self) -> SenderPolicy {
        SenderPolicy {
            sender_domains: lowercase(&self.sender_domains),
            messages_per_hour: self.messages_per_hour,
            recipients_per_message: self.recipients_per_message,
            recipients_per_hour: self.recipients_per_hour,
        }
    }

    /// Whether `ip` may relay without authenticating.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.networks.iter().any(|n| n.contains(&ip))
    }
}

/// What to do with a bare CR or LF in message data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LineEndingPolicy {
    /// Refuse the message (554 5.6.0): the safe default against SMTP smuggling.
    Reject,
    /// Turn each bare CR or LF into CRLF.
    Normalise,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Bytes, advertised in SIZE.
    #[serde(default = "default_max_message_size")]
    pub max_message_size: usize,
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    /// Message bytes deliveries hold in memory at once, each its message's record from the
    /// read of the body (once the destination's limits and a session let it send) to the end
    /// of the transaction: the whole of a message up to 256 KiB, the headers of a bigger one
    /// (whose body stays in its body file and is read a chunk at a time). Over it, a delivery
    /// waits before reading the body. A message waiting for its destination holds none of it,
    /// nor do sessions: past 256 KiB a body goes to disk as it arrives.
    #[serde(default = "default_max_body_memory")]
    pub max_body_memory: u64,
    /// Bytes of the ledger's pages (delivery metadata) kept in memory; the rest stay on disk
    /// and are read when needed. Without a cap the ledger's cache grew by about half a KiB
    /// per message relayed, to 1 GiB (sled's default).
    #[serde(default = "default_ledger_cache")]
    pub ledger_cache: u64,
    /// Concurrent SMTP connections over all listeners; more get `421 4.7.0`.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Sessions receiving message content at once (from DATA or the first BDAT to the end of
    /// the transaction). A session holds up to about 256 KiB of a body in memory; this caps
    /// what all of them hold together, however many clients send at once. More wait before
    /// the `354` (BDAT: before reading the chunk), up to `command_timeout`, then get
    /// `451 4.3.2`.
    #[serde(default = "default_max_concurrent_data")]
    pub max_concurrent_data: usize,
    /// Waiting for a command (RFC 5321 4.5.3.2: at least 5 minutes).
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Waiting for the next block of message data (RFC 5321 4.5.3.2.6: 3 minutes).
    #[serde(default = "default_data_timeout", with = "humantime_serde")]
    pub data_timeout: Duration,
    /// Bad commands in one session before it is closed with `421 4.7.0`.
    #[serde(default = "default_max_errors")]
    pub max_errors: usize,
    #[serde(default = "default_line_endings")]
    pub line_endings: LineEndingPolicy,
    /// A message arriving with this many `Received:` headers or more is refused with
    /// `554 5.4.6` (RFC 5321 6.3: a mail loop); Postfix's `hopcount_limit` is 50 too.
    #[serde(default = "default_max_hops")]
    pub max_hops: usize,
    /// Concurrent connections from one client address (IPv6: one /64); more get `421 4.7.0`.
    /// Clients in `relay.networks` are exempt, as from the next key.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// New connections per minute from one client address; more get `421 4.7.0`.
    #[serde(default = "default_connections_per_ip_per_minute")]
    pub connections_per_ip_per_minute: u64,
    /// A whole session, however busy, ends with `421 4.4.2` after this long.
    #[serde(default = "default_session_timeout", with = "humantime_serde")]
    pub session_timeout: Duration,
    /// NOOP, RSET, VRFY, HELP, EHLO and HELO allowed between two accepted messages; the next
    /// one ends the session with `421 4.7.0`.
    #[serde(default = "default_max_idle_commands")]
    pub max_idle_commands: usize,
    /// Failed AUTH attempts from one client address before it is refused (`421 4.7.0`) until
    /// `auth_cooldown` has passed since its last failure.
    #[serde(default = "default_max_auth_failures")]
    pub max_auth_failures: u64,
    #[serde(default = "default_auth_cooldown", with = "humantime_serde")]
    pub auth_cooldown: Duration,
    /// Wait before replying to a failed AUTH; doubles with each further failure from the same
    /// address, up to 30 s.
    #[serde(default = "default_auth_failure_delay", with = "humantime_serde")]
    pub auth_failure_delay: Duration,
    /// Threads for password checks; 0: one per core.
    #[serde(default)]
    pub auth_threads: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_message_size: default_max_message_size(),
            max_recipients: default_max_recipients(),
            max_body_memory: default_max_body_memory(),
            ledger_cache: default_ledger_cache(),
            max_connections: default_max_connections(),
            command_timeout: default_command_timeout(),
            data_timeout: default_data_timeout(),
            max_errors: default_max_errors(),
            line_endings: default_line_endings(),
            max_hops: default_max_hops(),
            max_connections_per_ip: default_max_connections_per_ip(),
            max_concurrent_data: default_max_concurrent_data(),
            connections_per_ip_per_minute: default_connections_per_ip_per_minute(),
            session_timeout: default_session_timeout(),
            max_idle_commands: default_max_idle_commands(),
            max_auth_failures: default_max_auth_failures(),
            auth_cooldown: default_auth_cooldown(),
            auth_failure_delay: default_auth_failure_delay(),
            auth_threads: 0,
        }
    }
}

/// 100, as Postfix's smtpd processes: on the 10,000-client burst (`benches/connections.py`),
/// 500 places peaked at about 140 MiB where 100 stayed under 90 MiB, and were no faster.
fn default_max_concurrent_data() -> usize {
    100
}
fn default_max_connections_per_ip() -> usize {
    20
}
fn default_connections_per_ip_per_minute() -> u64 {
    60
}
fn default_session_timeout() -> Duration {
    Duration::from_secs(3600)
}
fn default_max_idle_commands() -> usize {
    100
}
fn default_max_auth_failures() -> u64 {
    5
}
fn default_auth_cooldown() -> Duration {
    Duration::from_secs(900)
}
fn default_auth_failure_delay() -> Duration {
    Duration::from_secs(1)
}

fn default_max_message_size() -> usize {
    36_700_160
}
fn default_max_recipients() -> usize {
    1000
}
fn default_max_connections() -> usize {
    1000
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_data_timeout() -> Duration {
    Duration::from_secs(180)
}
fn default_max_errors() -> usize {
    20
}
fn default_line_endings() -> LineEndingPolicy {
    LineEndingPolicy::Reject
}
fn default_max_hops() -> usize {
    50
}

/// `[metrics]`: the Prometheus endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where `GET /metrics` is served; off when absent. Labels carry no address or pseudonym,
    /// but keep it on loopback or a private network all the same: the figures describe traffic.
    pub listen: Option<SocketAddr>,
}

/// `[spool]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// A segment file is closed and a new one started past this many bytes.
    #[serde(default = "default_segment_size")]
    pub segment_size: u64,
    /// Free space (bytes) kept on the data filesystem: below it new mail gets `452 4.3.1`, so
    /// that delivery state of queued mail always has room (Postfix's `queue_minfree`).
    #[serde(default = "default_min_free")]
    pub min_free: u64,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            segment_size: default_segment_size(),
            min_free: default_min_free(),
        }
    }
}

fn default_min_free() -> u64 {
    100 << 20
}

fn default_segment_size() -> u64 {
    64 << 20
}

/// `[[account]]`: an SMTP AUTH identity, with what it may send.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    pub username: String,
    /// An argon2id PHC string (`postern account add` or `hash` makes one); never the password.
    pub password_hash: String,
    /// Client addresses (CIDR) this account may log in from; empty: anywhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_ips: Vec<IpNet>,
    /// Domains allowed in MAIL FROM and `From:`; empty: any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sender_domains: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages_per_hour: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients_per_message: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipients_per_hour: Option<u64>,
}

impl AccountConfig {
    /// The account's sender rules and limits.
    pub fn policy(&self) -> SenderPolicy {
        SenderPolicy {
            sender_domains: lowercase(&self.sender_domains),
            messages_per_hour: self.messages_per_hour,
            recipients_per_message: self.recipients_per_message,
            recipients_per_hour: self.recipients_per_hour,
        }
    }
}

fn lowercase(domains: &[String]) -> Vec<String> {
    domains
        .iter()
        .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
        .collect()
}

/// The accounts file (`server.accounts_file`): `[[account]]` entries and nothing else.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AccountsFile {
    #[serde(default, rename = "account")]
    pub accounts: Vec<AccountConfig>,
}

impl AccountsFile {
    /// Reads the file; a missing file is an empty one.
    pub fn load(path: &Path) -> Result<AccountsFile, ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// The file's text (comments are not kept).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string(self).map_err(|e| ConfigError::Invalid {
            key: "account".into(),
            reason: e.to_string(),
        })
    }
}

/// How hard outbound delivery insists on TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsPolicy {
    /// STARTTLS when offered, any certificate accepted (whether it verified is recorded).
    Opportunistic,
    /// STARTTLS with a certificate that verifies for the host name, or defer.
    Require,
    /// Never STARTTLS.
    None,
}

/// One string or a list of them (`smarthost = "a:25"` or `smarthost = ["a:25", "b:25"]`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    /// The non-empty entries.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::None => Vec::new(),
            OneOrMany::One(s) => vec![s.clone()]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect(),
            OneOrMany::Many(v) => v.iter().filter(|s| !s.is_empty()).cloned().collect(),
        }
    }
}

/// `[delivery]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Relay everything through these hosts ("host:port", tried in order); empty: deliver by MX.
    #[serde(default)]
    pub smarthost: OneOrMany,
    /// Credentials for the smarthost (AUTH PLAIN or LOGIN, only over TLS).
    #[serde(default)]
    pub smarthost_auth: Option<SmarthostAuth>,
    /// Remote port for MX delivery (tests point it at a loopback sink).
    #[serde(default = "default_delivery_port")]
    pub port: u16,
    #[serde(default = "default_tls_policy")]
    pub tls: TlsPolicy,
    /// Extra trust anchors (PEM) for verifying remote certificates, besides the Mozilla roots.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    #[serde(default = "default_max_conns")]
    pub max_connections_per_destination: usize,
    /// Messages carried by one connection before it is closed.
    #[serde(default = "default_messages_per_connection")]
    pub messages_per_connection: usize,
    /// An unused pooled connection is closed after this long.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Waiting for a reply from the remote server (RFC 5321 4.5.3.2 suggests 5 to 10 minutes).
    #[serde(default = "default_reply_timeout", with = "humantime_serde")]
    pub reply_timeout: Duration,
    /// Delays between attempts; the last one repeats.
    #[serde(default = "default_retry_schedule", deserialize_with = "durations")]
    pub retry_schedule: Vec<Duration>,
    /// After this long a recipient still not delivered expires (bounced with 4.4.7).
    #[serde(default = "default_max_queue_lifetime", with = "humantime_serde")]
    pub max_queue_lifetime: Duration,
    /// Send one "delayed" notice to the sender after this long; unset: never.
    #[serde(default, with = "humantime_serde")]
    pub delay_warning: Option<Duration>,
    /// Outbound SMTP sessions at once, over all destinations. Only a session holds one: a
    /// message waiting for DNS or for its destination's limits does not.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Messages being worked on at once (read from the spool, waiting for DNS or their
    /// destination, or being sent); the rest wait in the due index. Postfix's
    /// `qmgr_message_active_limit` is 20,000 too.
    #[serde(default = "default_max_active_messages")]
    pub max_active_messages: usize,
    /// Addresses of mail exchangers tried in one attempt (Postfix: `smtp_mx_address_limit`).
    #[serde(default = "default_max_mx_addresses")]
    pub max_mx_addresses: usize,
    /// One attempt (routing, waiting for the destination, connecting, the transaction) ends
    /// after this long, whatever the remote server does.
    #[serde(default = "default_attempt_timeout", with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Consecutive failed connections (refused, timed out, no greeting) after which a
    /// destination is marked down; its messages are then deferred without trying.
    #[serde(default = "default_destination_down_after")]
    pub destination_down_after: u32,
    /// How long a destination stays marked down before it is tried again.
    #[serde(default = "default_destination_down_for", with = "humantime_serde")]
    pub destination_down_for: Duration,
    /// Per-destination overrides.
    #[serde(default, rename = "destination")]
    pub destinations: Vec<DestinationConfig>,
}

/// `[delivery.smarthost_auth]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmarthostAuth {
    pub username: String,
    pub password: String,
}

/// `[[delivery.destination]]`: limits and TLS for one recipient domain, or for every domain whose
/// MX host ends in `mx_suffix` (so that all domains hosted by one provider share the limits).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationConfig {
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub mx_suffix: Option<String>,
    #[serde(default)]
    pub tls: Option<TlsPolicy>,
    #[serde(default)]
    pub max_connections: Option<usize>,
    #[serde(default)]
    pub messages_per_minute: Option<u32>,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("all delivery keys have defaults"))
    }
}

fn default_delivery_port() -> u16 {
    25
}
fn default_tls_policy() -> TlsPolicy {
    TlsPolicy::Opportunistic
}
fn default_max_conns() -> usize {
    20
}
fn default_messages_per_connection() -> usize {
    100
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_reply_timeout() -> Duration {
    Duration::from_secs(300)
}
fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let v: Vec<humantime_serde::Serde<Duration>> = Deserialize::deserialize(d)?;
    Ok(v.into_iter().map(|s| s.into_inner()).collect())
}

fn default_retry_schedule() -> Vec<Duration> {
    [60, 300, 900, 1800, 3600, 7200, 14400]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}
fn default_max_queue_lifetime() -> Duration {
    Duration::from_secs(5 * 86400)
}
fn default_max_in_flight() -> usize {
    1000
}
fn default_max_active_messages() -> usize {
    20_000
}
fn default_max_body_memory() -> u64 {
    128 << 20
}
fn default_ledger_cache() -> u64 {
    16 << 20
}
fn default_max_mx_addresses() -> usize {
    5
}
fn default_attempt_timeout() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_destination_down_after() -> u32 {
    3
}
fn default_destination_down_for() -> Duration {
    Duration::from_secs(5 * 60)
}

/// `[dns]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// "ip:port" of the resolvers to ask; empty: the system's (/etc/resolv.conf).
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default = "default_dns_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout: default_dns_timeout(),
        }
    }
}

fn default_dns_timeout() -> Duration {
    Duration::from_secs(5)
}

/// How addresses appear in logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogAddresses {
    /// `3f9a1c0b7d2e@example.org`: stable per address, not reversible without the key.
    Pseudonym,
    /// The address itself (only where the operator's processing terms allow it).
    Clear,
    /// No recipient in logs at all.
    None,
}

/// How the local part of an address is normalised before it is pseudonymised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalPart {
    /// `Bob` and `bob` are one subject (what nearly every mailbox provider does).
    Lowercase,
    /// Case-sensitive, as RFC 5321 allows.
    Preserve,
}

/// `[privacy]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyConfig {
    /// Delivery metadata is purged this many days after the message was received.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    #[serde(default = "default_log_addresses")]
    pub log_addresses: LogAddresses,
    /// Sending domains whose ledger records keep no recipient and no pseudonym.
    #[serde(default)]
    pub strict_domains: Vec<String>,
    #[serde(default = "default_local_part")]
    pub local_part: LocalPart,
    /// Consecutive hard bounces that put an address on the suppression list.
    #[serde(default = "default_bounce_threshold")]
    pub bounce_threshold: u32,
    /// How long one pseudonym key names people before a new one takes over (from the next
    /// day). The old key stays while records written under it are retained, then is destroyed.
    #[serde(default = "default_pseudonym_rotation", with = "humantime_serde")]
    pub pseudonym_rotation: Duration,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        PrivacyConfig {
            retention_days: default_retention_days(),
            log_addresses: default_log_addresses(),
            strict_domains: Vec::new(),
            local_part: default_local_part(),
            bounce_threshold: default_bounce_threshold(),
            pseudonym_rotation: default_pseudonym_rotation(),
        }
    }
}

fn default_retention_days() -> u32 {
    30
}
fn default_log_addresses() -> LogAddresses {
    LogAddresses::Pseudonym
}
fn default_local_part() -> LocalPart {
    LocalPart::Lowercase
}
fn default_bounce_threshold() -> u32 {
    3
}
fn default_pseudonym_rotation() -> Duration {
    Duration::from_secs(365 * 86_400)
}

/// `[dkim]`
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimConfig {
    /// Refuse mail from a sending domain that has no key, instead of relaying it unsigned.
    #[serde(default)]
    pub require: bool,
    /// Sign for the envelope sender's domain when the message has no usable `From:`.
    #[serde(default)]
    pub fallback_to_envelope: bool,
    /// Adds `x=` (signature expiry) this long after signing.
    #[serde(default, with = "humantime_serde")]
    pub expire_after: Option<Duration>,
    #[serde(default, rename = "key")]
    pub keys: Vec<DkimKeyConfig>,
}

/// `[[dkim.key]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimKeyConfig {
    pub domain: String,
    pub selector: String,
    /// "ed25519" or "rsa-sha256".
    pub algorithm: String,
    pub private_key: PathBuf,
    /// Also sign for subdomains of `domain` (with `d=` this domain).
    #[serde(default)]
    pub subdomains: bool,
}

/// The error for `key`, with why it is refused.
fn invalid(key: &str, reason: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        key: key.to_string(),
        reason: reason.to_string(),
    })
}

fn is_domain(s: &str) -> bool {
    let s = s.trim_end_matches('.');
    !s.is_empty()
        && s.len() <= 253
        && s.split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// Checks `[[account]]` entries, from the config and the accounts file together.
pub fn validate_accounts(accounts: &[AccountConfig]) -> Result<(), ConfigError> {
    let invalid = |key: String, reason: &str| {
        Err(ConfigError::Invalid {
            key,
            reason: reason.to_string(),
        })
    };
    for (i, account) in accounts.iter().enumerate() {
        let name = &account.username;
        if name.is_empty() || name.chars().any(char::is_control) {
            return invalid(format!("account[{i}].username"), "must be non-empty text");
        }
        if accounts[..i].iter().any(|a| &a.username == name) {
            return invalid(format!("account[{i}].username"), "is defined twice");
        }
        let argon2id = argon2::PasswordHash::new(&account.password_hash)
            .is_ok_and(|h| h.algorithm.as_str() == "argon2id");
        if !argon2id {
            return invalid(
                format!("account[{i}].password_hash"),
                "is not an argon2id PHC string (make one with `postern account hash`)",
            );
        }
        for (j, d) in account.sender_domains.iter().enumerate() {
            if !is_domain(d) {
                return invalid(
                    format!("account[{i}].sender_domains[{j}]"),
                    "must be a domain name",
                );
            }
        }
    }
    Ok(())
}

impl Config {
    /// Reads and validates a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Config::parse(&text, &path.display().to_string(), &base)
    }

    /// The embedded defaults, with paths relative to the working directory.
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::parse(EMBEDDED_DEFAULTS, "embedded defaults", Path::new("."))
    }

    /// Parses and validates TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })?;
        config.base_dir = base_dir.to_path_buf();
        if let Some(file) = &config.server.accounts_file {
            let more = AccountsFile::load(&config.path(file))?;
            config.accounts.extend(more.accounts);
        }
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_listeners()?;
        self.validate_limits()?;
        self.validate_delivery()?;
        self.validate_privacy()?;
        self.validate_dkim()?;
        validate_accounts(&self.accounts)?;
        for (i, d) in self.relay.sender_domains.iter().enumerate() {
            if !is_domain(d) {
                return invalid(
                    &format!("relay.sender_domains[{i}]"),
                    "must be a domain name",
                );
            }
        }
        Ok(())
    }

    /// Checks `[server]` hostname and the `[[listener]]`s.
    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let host = &self.server.hostname;
        if host.ends_with('.') || !is_domain(host) {
            return invalid("server.hostname", "must be a fully qualified domain name");
        }
        if self.listeners.is_empty() {
            return invalid("listener", "at least one [[listener]] is needed");
        }
        for (i, a) in self.listeners.iter().enumerate() {
            if a.addr.port() != 0 && self.listeners[..i].iter().any(|b| b.addr == a.addr) {
                return invalid(
                    &format!("listener[{i}].addr"),
                    &format!("{} is used by two listeners", a.addr),
                );
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.proxy_protocol && l.proxy_from.is_empty() {
                return invalid(
                    &format!("listener[{i}].proxy_from"),
                    "proxy_protocol needs the load balancers' addresses",
                );
            }
        }
        Ok(())
    }

    /// Checks `[limits]` and `[spool]`.
    fn validate_limits(&self) -> Result<(), ConfigError> {
        let limits = &self.limits;
        if limits.max_message_size < 1024 {
            return invalid("limits.max_message_size", "must be at least 1024 bytes");
        }
        if limits.max_recipients == 0 {
            return invalid("limits.max_recipients", "must be at least 1");
        }
        if limits.max_body_memory < 1 << 20 {
            return invalid("limits.max_body_memory", "must be at least 1 MiB (1048576)");
        }
        if limits.ledger_cache < 1 << 20 {
            return invalid("limits.ledger_cache", "must be at least 1 MiB (1048576)");
        }
        if limits.max_connections == 0 {
            return invalid("limits.max_connections", "must be at least 1");
        }
        if limits.max_concurrent_data == 0 {
            return invalid("limits.max_concurrent_data", "must be at least 1");
        }
        if limits.command_timeout < Duration::from_secs(1)
            || limits.data_timeout < Duration::from_secs(1)
            || limits.session_timeout < Duration::from_secs(1)
        {
            return invalid("limits", "timeouts must be at least one second");
        }
        if limits.max_connections_per_ip == 0
            || limits.connections_per_ip_per_minute == 0
            || limits.max_idle_commands == 0
            || limits.max_auth_failures == 0
        {
            return invalid("limits", "per-client limits must be at least 1");
        }
        if limits.auth_cooldown < Duration::from_secs(1) {
            return invalid("limits.auth_cooldown", "must be at least one second");
        }
        if self.spool.segment_size < 1 << 20 {
            return invalid("spool.segment_size", "must be at least 1 MiB");
        }
        Ok(())
    }

    /// Checks `[delivery]` and `[dns]`.
    fn validate_delivery(&self) -> Result<(), ConfigError> {
        let d = &self.delivery;
        if d.retry_schedule.is_empty() || d.retry_schedule.iter().any(|r| r.is_zero()) {
            return invalid(
                "delivery.retry_schedule",
                "needs at least one non-zero delay",
            );
        }
        if d.max_connections_per_destination == 0
            || d.messages_per_connection == 0
            || d.max_in_flight == 0
        {
            return invalid(
                "delivery",
                "connection and message limits must be at least 1",
            );
        }
        for (i, host) in d.smarthost.to_vec().iter().enumerate() {
            if crate::delivery::parse_host_port(host, 25).is_none() {
                return invalid(
                    &format!("delivery.smarthost[{i}]"),
                    &format!("{host:?} is not host or host:port"),
                );
            }
        }
        for (i, dest) in d.destinations.iter().enumerate() {
            if dest.domain.is_some() == dest.mx_suffix.is_some() {
                return invalid(
                    &format!("delivery.destination[{i}]"),
                    "set exactly one of domain and mx_suffix",
                );
            }
            if dest.max_connections == Some(0) || dest.messages_per_minute == Some(0) {
                return invalid(
                    &format!("delivery.destination[{i}]"),
                    "limits must be at least 1",
                );
            }
        }
        for (i, ns) in self.dns.nameservers.iter().enumerate() {
            if ns.parse::<SocketAddr>().is_err() && ns.parse::<IpAddr>().is_err() {
                return invalid(
                    &format!("dns.nameservers[{i}]"),
                    &format!("{ns:?} is not ip or ip:port"),
                );
            }
        }
        Ok(())
    }

    /// Checks `[local]` and `[privacy]`.
    fn validate_privacy(&self) -> Result<(), ConfigError> {
        if let Some(local) = &self.local {
            if local.dir.as_os_str().is_empty() {
                return invalid("local.dir", "must not be empty");
            }
            if local.pickup_interval < Duration::from_secs(1) {
                return invalid("local.pickup_interval", "must be at least one second");
            }
        }
        if self.privacy.retention_days == 0 {
            return invalid("privacy.retention_days", "must be at least 1");
        }
        if self.privacy.bounce_threshold == 0 {
            return invalid("privacy.bounce_threshold", "must be at least 1");
        }
        // A generation covers whole days (see `ledger::pseudonym`): a shorter period would
        // only leave new keys waiting for the next day.
        if self.privacy.pseudonym_rotation < Duration::from_secs(86_400) {
            return invalid("privacy.pseudonym_rotation", "must be at least one day");
        }
        Ok(())
    }

    /// Checks `[[dkim.key]]`s.
    fn validate_dkim(&self) -> Result<(), ConfigError> {
        for (i, k) in self.dkim.keys.iter().enumerate() {
            if crate::dkim::Algorithm::parse(&k.algorithm).is_none() {
                return invalid(
                    &format!("dkim.key[{i}].algorithm"),
                    "must be \"ed25519\" or \"rsa-sha256\"",
                );
            }
            let label_ok = |s: &str| {
                !s.is_empty()
                    && s.split('.').all(|l| {
                        !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    })
            };
            if !label_ok(&k.domain) {
                return invalid(&format!("dkim.key[{i}].domain"), "must be a domain name");
            }
            if !label_ok(&k.selector) {
                return invalid(
                    &format!("dkim.key[{i}].selector"),
                    "must be letters, digits, '-' and '.'",
                );
            }
        }
        Ok(())
    }

    /// Resolves a configured path against the configuration's directory.
    pub fn path(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// The data directory, resolved.
    pub fn data_dir(&self) -> PathBuf {
        self.path(&self.server.data_dir)
    }

    /// The local submission directory, resolved; None when `[local]` is absent.
    pub fn local_dir(&self) -> Option<PathBuf> {
        self.local.as_ref().map(|l| self.path(&l.dir))
    }

    /// The master key file, resolved.
    pub fn master_key_path(&self) -> PathBuf {
        match &self.server.master_key {
            Some(p) => self.path(p),
            None => self.data_dir().join("master.key"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "test", Path::new("/etc/postern"))
    }

    const MINIMAL: &str = "[server]\nhostname = \"mx.example.test\"\ndata_dir = \"data\"\n[[listener]]\naddr = \"127.0.0.1:2525\"\nmode = \"relay\"\n";

    #[test]
    fn embedded_defaults_are_valid() {
        let c = Config::embedded().expect("embedded config.toml must validate");
        assert!(!c.listeners.is_empty());
        assert_eq!(c.limits.max_message_size, 36_700_160);
    }

    #[test]
    fn packaged_config_is_valid_and_turns_sendmail_on() {
        let text = include_str!("../packaging/config.toml");
        let c = parse(text).expect("packaging/config.toml must validate");
        assert_eq!(c.data_dir(), PathBuf::from("/var/lib/postern"));
        assert_eq!(c.local_dir(), Some(PathBuf::from("/var/spool/postern")));
        assert_eq!(c.server.log_format, LogFormat::Text);
        let json = parse(&MINIMAL.replace("[server]\n", "[server]\nlog_format = \"json\"\n"));
        assert_eq!(json.expect("valid").server.log_format, LogFormat::Json);
    }

    #[test]
    fn minimal_file_gets_defaults_and_resolves_paths() {
        let c = parse(MINIMAL).expect("valid");
        assert_eq!(c.limits.max_recipients, 1000);
        assert_eq!(c.delivery.port, 25);
        assert_eq!(c.delivery.retry_schedule.len(), 7);
        assert_eq!(c.delivery.max_queue_lifetime, Duration::from_secs(432_000));
        assert!(c.delivery.smarthost.to_vec().is_empty());
        assert_eq!(c.data_dir(), PathBuf::from("/etc/postern/data"));
        assert_eq!(
            c.master_key_path(),
            PathBuf::from("/etc/postern/data/master.key")
        );
        assert_eq!(
            c.privacy.pseudonym_rotation,
            Duration::from_secs(365 * 86_400),
            "yearly"
        );
        assert!(c.relay.allows("127.0.0.9".parse().unwrap()));
        assert!(c.relay.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!c.relay.allows("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn pseudonym_rotation_takes_a_humantime_period() {
        let c = parse(&format!(
            "{MINIMAL}[privacy]\npseudonym_rotation = \"90d\"\n"
        ))
        .unwrap();
        assert_eq!(
            c.privacy.pseudonym_rotation,
            Duration::from_secs(90 * 86_400)
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let err = parse(&format!("{MINIMAL}[limits]\nmax_recipient = 5\n")).unwrap_err();
        assert!(err.to_string().contains("max_recipient"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let cases = [
            ("[limits]\nmax_recipients = 0\n", "limits.max_recipients"),
            (
                "[limits]\ncommand_timeout = \"5 parsecs\"\n",
                "command_timeout",
            ),
            (
                "[[account]]\nusername = \"app\"\npassword_hash = \"hunter2\"\n",
                "account[0].password_hash",
            ),
            ("[relay]\nnetworks = [\"10.0.0.0/33\"]\n", "networks"),
            (
                "[delivery]\nretry_schedule = []\n",
                "delivery.retry_schedule",
            ),
            (
                "[delivery]\nsmarthost = [\"relay.test:99999\"]\n",
                "delivery.smarthost[0]",
            ),
            ("[delivery]\ntls = \"maybe\"\n", "tls"),
            (
                "[limits]\nmax_body_memory = 65536\n",
                "limits.max_body_memory",
            ),
            ("[limits]\nledger_cache = 65536\n", "limits.ledger_cache"),
            (
                "[local]\ndir = \"spool\"\npickup_interval = \"0s\"\n",
                "local.pickup_interval",
            ),
            (
                "[[delivery.destination]]\nmax_connections = 2\n",
                "delivery.destination[0]",
            ),
            (
                "[dns]\nnameservers = [\"localhost\"]\n",
                "dns.nameservers[0]",
            ),
            (
                "[privacy]\npseudonym_rotation = \"23h\"\n",
                "privacy.pseudonym_rotation",
            ),
        ];
        for (extra, key) in cases {
            let err = parse(&format!("{MINIMAL}{extra}")).unwrap_err();
            assert!(err.to_string().contains(key), "{extra}: {err}");
        }
        let err = parse(&MINIMAL.replace("mx.example.test", "bad host")).unwrap_err();
        assert!(err.to_string().contains("server.hostname"), "{err}");
    }
}
