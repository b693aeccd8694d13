//! What one attempt did for one recipient, as types: an RFC 3463 status and its cause.
//!
//! The queue decides retry, bounce or done from [`RcptOutcome::is_transient`] and
//! [`RcptOutcome::is_permanent`]; the remote reply (whose text may quote the address) is kept
//! in [`Cause::Reply`] for the DSN and the sealed ledger, and never logged.

use std::net::SocketAddr;

use super::client::ClientError;
use super::tls::TlsInfo;
use crate::dns::DnsError;
use crate::proto::{EnhancedStatusCode, Response};

/// Longest Diagnostic-Code value put into a DSN header field.
const MAX_DIAGNOSTIC: usize = 900;

/// Why a recipient ended up where it did.
#[derive(Debug, Clone)]
pub enum Cause {
    /// The remote server's reply (to RCPT, to the data, or to the whole session).
    Reply(Response),
    /// The connection or session failed without a reply to show for it.
    Client(ClientError),
    /// The domain or an MX host could not be resolved.
    Dns(DnsError),
    /// Routing gave no host to try.
    NoHost,
    /// An MX address is one of our own listening addresses (RFC 5321 5.1, 6.3).
    LoopsBack { domain: String },
    /// The destination was marked down after repeated connection failures: not tried now.
    DestinationDown,
    /// Too many deliveries wait for the destination's connections already: not tried now,
    /// and not an attempt; the queue tries it again once the destination has room.
    DestinationBusy,
    /// The attempt ran past its overall deadline.
    DeadlinePassed,
    /// The daemon is stopping; the message stays queued.
    ShuttingDown,
    /// The message's body could not be read from the spool when its turn came.
    Unreadable,
    /// `max_queue_lifetime` passed; carries the last temporary failure's diagnostic.
    Expired { last_diagnostic: Option<String> },
    /// An operator returned the message to its sender (`postern queue bounce`).
    Returned,
}

/// The outcome for one recipient.
#[derive(Debug, Clone)]
pub struct RcptOutcome {
    /// Index into the envelope's recipient list.
    pub index: usize,
    /// RFC 3463 status: 2.x.x delivered, 4.x.x retry, 5.x.x bounce (4.4.7 for an expiry,
    /// which is final although its class is 4).
    pub status: EnhancedStatusCode,
    pub cause: Cause,
    /// The host that answered, when one did.
    pub remote: Option<String>,
    pub remote_ip: Option<SocketAddr>,
    pub tls: Option<TlsInfo>,
}

impl RcptOutcome {
    /// An outcome with no remote details yet.
    pub fn new(status: EnhancedStatusCode, cause: Cause) -> RcptOutcome {
        RcptOutcome {
            index: 0,
            status,
            cause,
            remote: None,
            remote_ip: None,
            tls: None,
        }
    }

    /// The remote server's reply decides.
    pub fn from_reply(reply: &Response) -> RcptOutcome {
        RcptOutcome::new(reply.status(), Cause::Reply(reply.clone()))
    }

    /// A session failure; a refusal becomes the reply it carries.
    pub fn from_client(e: &ClientError) -> RcptOutcome {
        match e {
            ClientError::Rejected { reply, .. } => RcptOutcome::from_reply(reply),
            other => RcptOutcome::new(other.status(), Cause::Client(other.clone())),
        }
    }

    /// A DNS failure: nonexistent domain, null MX and missing addresses are permanent.
    pub fn from_dns(e: &DnsError) -> RcptOutcome {
        let status = match e {
            DnsError::NullMx(_) => EnhancedStatusCode::new(5, 1, 10),
            DnsError::NoSuchDomain(_) => EnhancedStatusCode::new(5, 1, 2),
            DnsError::NoAddresses(_) => EnhancedStatusCode::new(5, 4, 4),
            DnsError::Temporary { .. } | DnsError::Config(_) => EnhancedStatusCode::new(4, 4, 3),
        };
        RcptOutcome::new(status, Cause::Dns(e.clone()))
    }

    /// Gave up after `max_queue_lifetime` (4.4.7, RFC 3463).
    pub fn expired(last_diagnostic: Option<String>) -> RcptOutcome {
        RcptOutcome::new(
            EnhancedStatusCode::new(4, 4, 7),
            Cause::Expired { last_diagnostic },
        )
    }

    /// Not tried: too many deliveries wait for its destination already (4.4.5, congestion).
    pub fn busy() -> RcptOutcome {
        RcptOutcome::new(EnhancedStatusCode::new(4, 4, 5), Cause::DestinationBusy)
    }

    /// Returned to the sender by an operator (5.0.0: no reason of the destination's).
    pub fn returned() -> RcptOutcome {
        RcptOutcome::new(EnhancedStatusCode::new(5, 0, 0), Cause::Returned)
    }

    pub fn is_delivered(&self) -> bool {
        self.status.is_success()
    }

    /// Worth another attempt later.
    pub fn is_transient(&self) -> bool {
        self.status.is_transient() && !self.is_expired()
    }

    /// Final failure: bounced now (5.x.x) or expired.
    pub fn is_permanent(&self) -> bool {
        self.status.is_permanent() || self.is_expired()
    }

    pub fn is_expired(&self) -> bool {
        matches!(self.cause, Cause::Expired { .. })
    }

    /// Not tried, as its destination was busy ([`RcptOutcome::busy`]): no attempt to count,
    /// log or record.
    pub fn is_busy(&self) -> bool {
        matches!(self.cause, Cause::DestinationBusy)
    }

    /// No server could be reached, or none greeted: what counts towards marking the
    /// destination down.
    pub fn is_unreachable(&self) -> bool {
        use super::client::Stage;
        matches!(
            &self.cause,
            Cause::Client(
                ClientError::Connect { .. }
                    | ClientError::Timeout(Stage::Greeting)
                    | ClientError::Lost(Stage::Greeting)
            )
        )
    }

    /// A remote 5xx about the mailbox itself (5.1.x): what counts towards suppression.
    pub fn is_hard_bounce(&self) -> bool {
        matches!(&self.cause, Cause::Reply(r) if r.is_permanent()) && self.status.subject == 1
    }

    /// The RFC 3464 Diagnostic-Code value: "smtp; 550 5.1.1 ..." for a remote reply,
    /// "x-postern; ..." for our own findings. One line, bounded. For the DSN and the sealed
    /// ledger only: a reply text may quote the address.
    pub fn diagnostic(&self) -> String {
        let text = match &self.cause {
            Cause::Reply(r) => format!("smtp; {}", r.to_single_line()),
            Cause::Client(e) => format!("x-postern; {e}"),
            Cause::Dns(e) => format!("x-postern; {e}"),
            Cause::NoHost => "x-postern; no host to try".into(),
            Cause::LoopsBack { domain } => {
                format!("x-postern; mail for {domain} loops back to myself")
            }
            Cause::DestinationDown => "x-postern; destination not responding; deferred".into(),
            Cause::DestinationBusy => "x-postern; destination busy; waiting its turn".into(),
            Cause::DeadlinePassed => "x-postern; delivery attempt took too long".into(),
            Cause::ShuttingDown => "x-postern; shutting down".into(),
            Cause::Unreadable => "x-postern; message could not be read from the spool".into(),
            Cause::Expired {
                last_diagnostic: Some(d),
            } if !d.is_empty() => d.clone(),
            Cause::Expired { .. } => "x-postern; delivery time expired".into(),
            Cause::Returned => {
                "x-postern; returned to the sender by the mail system administrator".into()
            }
        };
        one_line(&text)
    }
}

/// Diagnostics go into DSN header fields: one line, bounded.
fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_DIAGNOSTIC)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn reply(s: &str) -> Response {
        crate::proto::parse_response(&mut BytesMut::from(s.as_bytes()))
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("{s:?} parses"))
    }

    #[test]
    fn classes_from_replies() {
        let o = RcptOutcome::from_reply(&reply("550 5.1.1 No such user\r\n"));
        assert!(o.is_permanent() && !o.is_transient() && o.is_hard_bounce());
        assert_eq!(o.status.to_string(), "5.1.1");
        assert_eq!(o.diagnostic(), "smtp; 550 5.1.1 No such user");
        let o = RcptOutcome::from_reply(&reply("451 try later\r\n"));
        assert!(o.is_transient() && !o.is_permanent());
        assert_eq!(o.status.to_string(), "4.0.0");
        let o = RcptOutcome::from_reply(&reply("550 5.7.1 policy\r\n"));
        assert!(
            o.is_permanent() && !o.is_hard_bounce(),
            "not about the mailbox"
        );
        assert!(RcptOutcome::from_reply(&reply("250 2.0.0 ok\r\n")).is_delivered());
    }

    #[test]
    fn expiry_is_final_with_4_4_7() {
        let o = RcptOutcome::expired(Some("smtp; 451 4.4.0 later".into()));
        assert!(o.is_permanent() && !o.is_transient());
        assert_eq!(o.status.to_string(), "4.4.7");
        assert_eq!(o.diagnostic(), "smtp; 451 4.4.0 later");
        assert_eq!(
            RcptOutcome::expired(None).diagnostic(),
            "x-postern; delivery time expired"
        );
    }
}
