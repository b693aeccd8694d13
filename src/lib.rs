//! Postern: an outbound mail transfer agent. It accepts mail from applications over SMTP,
//! keeps it durable and sealed on disk, DKIM-signs it and relays it to the recipients' mail
//! servers, keeping only sealed, pseudonymous delivery metadata, for a limited time.
//!
//! # Layout
//! - [`config`]: `config.toml`, its defaults and validation.
//! - [`proto`]: the SMTP wire protocol as pure, I/O-free parsing (fuzzed in `fuzz/`).
//! - [`server`]: listeners and sessions; drives `proto` over TCP and TLS.
//! - [`auth`]: SMTP accounts (argon2) and the password-check pool. [`tls`]: the inbound certificate.
//! - [`limits`]: counters for failed logins, connection rates and sending limits, behind a trait.
//! - [`memory`]: the cap on message bytes delivery attempts hold in memory.
//! - [`dkim`]: signing with mail-auth, key generation, the DNS records to publish.
//! - [`spool`]: encrypted append-only segments with group commit; `250` only after fdatasync.
//! - [`queue`]: due times, retries, expiry, notices; [`clock`] makes its time injectable.
//! - [`delivery`]: routing ([`dns`]), the SMTP client, outbound TLS, pooling, traffic shaping.
//! - [`bounce`]: RFC 3464 delivery status notifications (headers only, never the body).
//! - [`ledger`]: delivery metadata in sled, sealed per day, purged after the retention period.
//! - [`suppress`]: the suppression list, by pseudonym.
//! - [`admin`]: the local Unix socket the CLI uses for privacy and suppression requests.
//! - [`local`]: local submission for `sendmail`: a socket any user may use, and a sealed
//!   maildrop for when the daemon is down. [`sendmail`]: the `sendmail`/`mailq` commands.
//! - [`crypto`]: keys, key files, sealing (XChaCha20-Poly1305), HMAC pseudonyms.
//! - [`metrics`]: Prometheus counters, histograms and scrape-time gauges on `GET /metrics`.
//! - [`notify`]: systemd readiness, reload, stop and watchdog notifications; [`logging`]:
//!   journald-friendly or JSON log lines.
//! - [`daemon`]: wires the above into a running MTA; the binary adds a CLI and signals.
//!
//! # A message's life
//! A session collects the envelope (refusing suppressed recipients), decodes DATA or BDAT
//! through `proto`'s checks (line length, bare CR/LF, size), writing a body past 256 KiB to a
//! sealed body file as it arrives, DKIM-signs on a blocking thread, prepends a `Received:`
//! header and hands the message to the spool. The spool's writer appends
//! it with everything else that arrived during the previous sync, syncs once, and only then does
//! the session say `250`. The queue then groups the recipients by domain, delivers, records each
//! outcome in the ledger, retries or bounces, and the spool destroys the body as soon as the last
//! recipient is final.

pub mod admin;
pub mod auth;
pub mod bounce;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod daemon;
pub mod delivery;
pub mod dkim;
pub mod dns;
pub mod ledger;
pub mod limits;
pub mod local;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod proto;
pub mod queue;
pub mod sendmail;
pub mod server;
pub mod spool;
pub mod suppress;
pub mod tls;

/// Byte-search helpers shared by unit tests.
#[cfg(test)]
pub(crate) mod spool_test_support {
    use std::path::Path;

    pub fn all_bytes(dir: &Path) -> Vec<u8> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(all_bytes(&path));
            } else if let Ok(b) = std::fs::read(&path) {
                out.extend(b);
            }
        }
        out
    }

    pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }
}
