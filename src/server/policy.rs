//! What a client may send: the sender domains and sending limits of its account, or of the
//! relay networks for a client that relays without AUTH.
//!
//! Each check returns the exact reply to send, so the session only decides *when* to ask.
//! Counters live in the [`LimitStore`], keyed by account or by client address.

use std::net::IpAddr;

use crate::config::SenderPolicy;
use crate::limits::{client_key, retry_text, LimitKey, LimitStore};
use crate::proto::Reply;

const HOUR: i64 = 3600;

/// The rules in force for one session's transactions, with the counters they are kept under.
pub(super) struct Sender {
    rules: SenderPolicy,
    /// "account app" or "relay networks": names the rule in refusals and logs.
    whose: &'static str,
    messages: LimitKey,
    recipients: LimitKey,
}

impl Sender {
    /// An authenticated account's rules.
    pub fn account(name: &str, rules: &SenderPolicy) -> Sender {
        Sender {
            rules: rules.clone(),
            whose: "account",
            messages: LimitKey::AccountMessages(name.to_string()),
            recipients: LimitKey::AccountRecipients(name.to_string()),
        }
    }

    /// The relay networks' rules, counted per client address.
    pub fn relay(ip: IpAddr, rules: &SenderPolicy) -> Sender {
        let key = client_key(ip);
        Sender {
            rules: rules.clone(),
            whose: "relay networks",
            messages: LimitKey::RelayMessages(key),
            recipients: LimitKey::RelayRecipients(key),
        }
    }

    fn domain_allowed(&self, domain: Option<&str>) -> bool {
        let allowed = &self.rules.sender_domains;
        allowed.is_empty()
            || domain.is_some_and(|d| {
                let d = d.trim_end_matches('.');
                allowed.iter().any(|a| a.eq_ignore_ascii_case(d))
            })
    }

    /// MAIL FROM: the envelope sender's domain (None for `<>`) must be allowed.
    pub fn check_mail_from(&self, domain: Option<&str>) -> Result<(), Reply> {
        if self.domain_allowed(domain) {
            return Ok(());
        }
        Err(Reply::new(
            550,
            "5.7.1",
            format!(
                "Sender address not allowed: its domain is not in the sender_domains of the {}",
                self.whose
            ),
        ))
    }

    /// End of data: the `From:` header's domain (None when it has none) must be allowed.
    pub fn check_from_header(&self, domain: Option<&str>) -> Result<(), Reply> {
        if self.domain_allowed(domain) {
            return Ok(());
        }
        Err(Reply::new(
            550,
            "5.7.1",
            format!(
                "From: header not allowed: its domain is not in the sender_domains of the {}",
                self.whose
            ),
        ))
    }

    /// Counts a new message against `messages_per_hour`.
    pub fn count_message(&self, store: &dyn LimitStore, now: i64) -> Result<(), Reply> {
        let Some(limit) = self.rules.messages_per_hour else {
            return Ok(());
        };
        store
            .try_add(&self.messages, 1, limit, HOUR, now)
            .map(drop)
            .map_err(|retry| {
                Reply::new(
                    451,
                    "4.7.1",
                    format!(
                        "Limit of {limit} messages per hour for the {} reached; try again {}",
                        self.whose,
                        retry_text(retry, now)
                    ),
                )
            })
    }

    /// Counts one more recipient (the message already has `so_far`) against
    /// `recipients_per_message` and `recipients_per_hour`.
    pub fn count_recipient(
        &self,
        store: &dyn LimitStore,
        so_far: usize,
        now: i64,
    ) -> Result<(), Reply> {
        if let Some(limit) = self.rules.recipients_per_message {
            if so_far as u64 >= limit {
                return Err(Reply::new(
                    452,
                    "4.7.1",
                    format!(
                        "Limit of {limit} recipients per message for the {} reached; send the others in another message",
                        self.whose
                    ),
                ));
            }
        }
        let Some(limit) = self.rules.recipients_per_hour else {
            return Ok(());
        };
        store
            .try_add(&self.recipients, 1, limit, HOUR, now)
            .map(drop)
            .map_err(|retry| {
                Reply::new(
                    451,
                    "4.7.1",
                    format!(
                        "Limit of {limit} recipients per hour for the {} reached; try again {}",
                        self.whose,
                        retry_text(retry, now)
                    ),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::LocalLimits;

    fn rules() -> SenderPolicy {
        SenderPolicy {
            sender_domains: vec!["example.test".into()],
            messages_per_hour: Some(2),
            recipients_per_message: Some(2),
            recipients_per_hour: Some(3),
        }
    }

    #[test]
    fn sender_domains_are_matched_exactly_ignoring_case() {
        let s = Sender::account("app", &rules());
        assert!(s.check_mail_from(Some("Example.TEST")).is_ok());
        assert!(s.check_from_header(Some("example.test.")).is_ok());
        let r = s.check_mail_from(Some("sub.example.test")).unwrap_err();
        assert_eq!((r.code, r.enhanced), (550, Some("5.7.1")));
        assert!(
            r.lines[0].contains("sender_domains of the account"),
            "{r:?}"
        );
        assert!(
            s.check_mail_from(None).is_err(),
            "null sender has no allowed domain"
        );
        let any = Sender::relay("127.0.0.1".parse().unwrap(), &SenderPolicy::default());
        assert!(any.check_mail_from(None).is_ok());
        assert!(any.check_from_header(Some("anything.test")).is_ok());
    }

    #[test]
    fn limits_answer_with_4_7_1_and_a_retry_time() {
        let store = LocalLimits::default();
        let s = Sender::account("app", &rules());
        assert!(s.count_message(&store, 0).is_ok());
        assert!(s.count_message(&store, 10).is_ok());
        let r = s.count_message(&store, 20).unwrap_err();
        assert_eq!((r.code, r.enhanced), (451, Some("4.7.1")));
        assert!(r.lines[0].contains("(in 3580 s)"), "{r:?}");
        let r = s.count_recipient(&store, 2, 0).unwrap_err();
        assert_eq!((r.code, r.enhanced), (452, Some("4.7.1")));
        for _ in 0..3 {
            s.count_recipient(&store, 0, 0).unwrap();
        }
        let r = s.count_recipient(&store, 0, 0).unwrap_err();
        assert_eq!((r.code, r.enhanced), (451, Some("4.7.1")));
        // Counted per account: another one is not affected.
        assert!(Sender::account("other", &rules())
            .count_message(&store, 20)
            .is_ok());
    }
}
