//! Delivery status notifications (RFC 3464): "your message could not be delivered" and
//! "your message is delayed", sent to the envelope sender with the null reverse path.
//!
//! A DSN carries the original's headers (text/rfc822-headers), never its body: the body may
//! hold personal data the sender's mailbox should not receive back in bulk, and it is being
//! destroyed anyway.

use chrono::{DateTime, Utc};

use crate::spool::Envelope;

/// What the notice reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Recipients failed permanently or expired (Action: failed).
    Failure,
    /// Recipients still being retried (Action: delayed).
    Delay,
}

/// One recipient in a notice.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub rcpt: &'a str,
    /// "5.1.1", "4.4.7"...
    pub status: &'a str,
    /// "smtp; 550 5.1.1 No such user"
    pub diagnostic: &'a str,
    pub remote: Option<&'a str>,
}

/// Everything a notice is made from.
#[derive(Clone, Copy)]
pub struct Notice<'a> {
    pub kind: Kind,
    /// Our name (Reporting-MTA, From: MAILER-DAEMON@).
    pub hostname: &'a str,
    pub queue_id: &'a str,
    pub envelope: &'a Envelope,
    /// The spooled message as received; only its headers are used.
    pub original: &'a [u8],
    pub entries: &'a [Entry<'a>],
    pub now: DateTime<Utc>,
    /// Random, for the MIME boundary and Message-ID.
    pub boundary_seed: u64,
}

/// Builds the DSN message (CRLF line endings). `original` is the spooled message as received.
pub fn build(n: &Notice<'_>) -> Vec<u8> {
    let Notice {
        kind,
        hostname,
        queue_id,
        envelope,
        original,
        entries,
        now,
        boundary_seed,
    } = *n;
    let boundary = format!("{queue_id}/{boundary_seed:016x}/{hostname}");
    let date = now.format("%a, %d %b %Y %H:%M:%S +0000");
    let arrival = DateTime::from_timestamp(envelope.received_at, 0)
        .unwrap_or(now)
        .format("%a, %d %b %Y %H:%M:%S +0000");
    let (subject, intro, action) = match kind {
        Kind::Failure => (
            "Undelivered Mail Returned to Sender",
            "Your message could not be delivered to one or more recipients.\r\nThis is a permanent failure; it will not be retried.",
            "failed",
        ),
        Kind::Delay => (
            "Delayed Mail (still being retried)",
            "Your message has not been delivered yet to one or more recipients.\r\nIt is still being retried; no action is needed now.",
            "delayed",
        ),
    };
    let mut m = String::new();
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n"
    ));
    m.push_str(&format!("To: <{}>\r\n", envelope.mail_from));
    m.push_str(&format!("Subject: {subject}\r\n"));
    m.push_str(&format!("Date: {date}\r\n"));
    m.push_str(&format!(
        "Message-ID: <{queue_id}.{boundary_seed:x}.dsn@{hostname}>\r\n"
    ));
    m.push_str("Auto-Submitted: auto-replied\r\n");
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str("This is a MIME-encapsulated message.\r\n\r\n");

    m.push_str(&format!("--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"));
    m.push_str(&format!(
        "This is the mail system at {hostname}.\r\n\r\n{intro}\r\n\r\n"
    ));
    for e in entries {
        m.push_str(&format!("<{}>: {}\r\n", e.rcpt, e.diagnostic));
    }
    m.push_str("\r\n");

    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    m.push_str(&format!("Reporting-MTA: dns; {hostname}\r\n"));
    m.push_str(&format!("X-Postern-Queue-ID: {queue_id}\r\n"));
    m.push_str(&format!("Arrival-Date: {arrival}\r\n"));
    for e in entries {
        // RFC 6533: a non-ASCII address is typed utf-8 rather than rfc822.
        let addr_type = if e.rcpt.is_ascii() { "rfc822" } else { "utf-8" };
        m.push_str(&format!("\r\nFinal-Recipient: {addr_type}; {}\r\n", e.rcpt));
        m.push_str(&format!("Action: {action}\r\n"));
        m.push_str(&format!("Status: {}\r\n", e.status));
        if let Some(remote) = e.remote {
            m.push_str(&format!("Remote-MTA: dns; {remote}\r\n"));
        }
        m.push_str(&format!("Diagnostic-Code: {}\r\n", e.diagnostic));
        m.push_str(&format!("Last-Attempt-Date: {date}\r\n"));
    }
    m.push_str("\r\n");

    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n"
    ));
    let mut out = m.into_bytes();
    out.extend_from_slice(headers(original));
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

/// The header section of a message, as Postfix finds it: it ends at the first empty line, or at
/// the first line that is neither a header field (`name:` with a printable name) nor the
/// continuation of one, whichever comes first. Mail from scripts often has no empty line at all;
/// without the second rule its whole body would be taken for headers and returned in a DSN.
/// A line of white space only ends the section too: it continues no field, and treating it as
/// a continuation would let an indented body through.
pub fn headers(message: &[u8]) -> &[u8] {
    let mut end = 0;
    let mut in_field = false;
    for line in message.split_inclusive(|b| *b == b'\n') {
        let content = line.strip_suffix(b"\n").unwrap_or(line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        let folded = content.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        let continues = in_field && folded && !content.trim_ascii().is_empty();
        if !(continues || is_field_start(content)) {
            break;
        }
        in_field = true;
        end += line.len();
    }
    &message[..end]
}

/// `field-name ":"` (RFC 5322 3.6.8): one or more printable ASCII characters other than the
/// colon, then a colon. Postfix also allows white space before the colon (obsolete syntax).
fn is_field_start(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|b| *b == b':') else {
        return false;
    };
    let name = line[..colon].trim_ascii_end();
    !name.is_empty() && name.iter().all(|b| (33..=126).contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_only_never_the_body() {
        assert_eq!(
            headers(b"A: 1\r\nB: 2\r\n\r\nsecret body\r\n"),
            b"A: 1\r\nB: 2\r\n"
        );
        assert_eq!(headers(b"\r\nbody"), b"");
        assert_eq!(headers(b"A: 1\r\n"), b"A: 1\r\n");
        assert_eq!(
            headers(b"Subject: a\r\n folded\r\nB : 2\r\n\r\nbody"),
            b"Subject: a\r\n folded\r\nB : 2\r\n",
            "folding and the obsolete space before the colon are headers"
        );
    }

    #[test]
    fn the_header_section_ends_at_the_first_line_that_is_no_header() {
        // No empty line: the body starts at the first line that is not a field.
        assert_eq!(
            headers(b"Subject: a\r\nhello there\r\nX: not a header now\r\n"),
            b"Subject: a\r\n"
        );
        // A first line that looks like a continuation continues nothing.
        assert_eq!(headers(b"  indented body\r\nA: 1\r\n"), b"");
        // A line of white space continues nothing either: the body follows it.
        assert_eq!(headers(b"A: 1\r\n \t\r\n  body\r\n"), b"A: 1\r\n");
        // Bare LF endings, as a script might write them.
        assert_eq!(headers(b"A: 1\nbody\n"), b"A: 1\n");
        assert_eq!(headers(b"no colon here"), b"");
        assert_eq!(headers(b": empty name\r\n"), b"");
    }

    fn notice_for(original: &[u8]) -> Vec<u8> {
        let envelope = Envelope {
            mail_from: "app@sender.test".into(),
            recipients: vec!["rcpt@dest.test".into()],
            received_at: 1_793_491_200,
            client_ip: std::net::Ipv4Addr::LOCALHOST.into(),
            helo: "client.test".into(),
            auth_user: None,
            eight_bit: false,
            smtputf8: false,
            sending_domain: "sender.test".into(),
        };
        let entries = [Entry {
            rcpt: "rcpt@dest.test",
            status: "5.1.1",
            diagnostic: "smtp; 550 5.1.1 no such user",
            remote: Some("mx.dest.test"),
        }];
        build(&Notice {
            kind: Kind::Failure,
            hostname: "postern.test",
            queue_id: "0123456789abcdef",
            envelope: &envelope,
            original,
            entries: &entries,
            now: DateTime::from_timestamp(1_793_491_300, 0).unwrap_or_default(),
            boundary_seed: 7,
        })
    }

    /// The marker must be absent from the DSN's bytes and from every part as a MIME parser
    /// decodes it (base64 and quoted-printable included).
    fn assert_no_marker(dsn: &[u8], marker: &str) {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(marker);
        let text = String::from_utf8_lossy(dsn);
        assert!(!text.contains(marker), "raw marker in the DSN:\n{text}");
        assert!(!text.contains(&b64), "base64 marker in the DSN:\n{text}");
        let parsed = mail_parser::MessageParser::default()
            .parse(dsn)
            .expect("the DSN parses");
        assert!(parsed.parts().len() >= 4, "a report with three parts");
        for part in parsed.parts() {
            let decoded = String::from_utf8_lossy(&part.decoded()).into_owned();
            assert!(!decoded.contains(marker), "decoded marker: {decoded}");
        }
    }

    #[test]
    fn a_dsn_never_carries_the_body_of_a_message_without_an_empty_line() {
        use base64::Engine;
        let marker = "BODY-MARKER-4711";
        let b64 = base64::engine::general_purpose::STANDARD.encode(marker);
        let cases = [
            // A script's message: no empty line between header and body.
            format!("From: app@sender.test\r\nSubject: report\r\nHello,\r\n{marker}\r\n{b64}\r\n"),
            // The body starts with a line that looks like a header continuation.
            format!("From: app@sender.test\r\nSubject: report\r\n \r\n  {marker}\r\n {b64}\r\n"),
            format!("From: app@sender.test\r\nSubject: report\r\nbody starts\r\n  {marker}\r\n"),
        ];
        for original in cases {
            let dsn = notice_for(original.as_bytes());
            assert_no_marker(&dsn, marker);
            let text = String::from_utf8_lossy(&dsn);
            assert!(
                text.contains("Subject: report\r\n"),
                "the headers are there: {text}"
            );
        }
    }

    fn envelope() -> Envelope {
        Envelope {
            mail_from: "app@sender.test".into(),
            recipients: vec!["a@dest.test".into()],
            received_at: 1_700_000_000,
            client_ip: "127.0.0.1".parse().unwrap(),
            helo: "client.test".into(),
            auth_user: None,
            eight_bit: false,
            smtputf8: false,
            sending_domain: "sender.test".into(),
        }
    }

    fn notice(kind: Kind, original: &[u8], entries: &[Entry<'_>]) -> String {
        let envelope = envelope();
        let n = Notice {
            kind,
            hostname: "mx.example.test",
            queue_id: "q1",
            envelope: &envelope,
            original,
            entries,
            now: DateTime::from_timestamp(1_700_000_100, 0).unwrap(),
            boundary_seed: 0xab,
        };
        String::from_utf8(build(&n)).unwrap()
    }

    /// The report part, per recipient, and the parts' framing (RFC 3464, RFC 6533).
    #[test]
    fn a_failure_report_per_recipient_with_headers_and_framing() {
        let entries = [
            Entry {
                rcpt: "a@dest.test",
                status: "5.1.1",
                diagnostic: "smtp; 550 5.1.1 no such user",
                remote: Some("mx.dest.test"),
            },
            Entry {
                rcpt: "jürgen@dest.test",
                status: "4.4.7",
                diagnostic: "x-postern; expired",
                remote: None,
            },
        ];
        let m = notice(
            Kind::Failure,
            b"Subject: hi\r\n\r\nSECRET BODY\r\n",
            &entries,
        );
        let boundary = "q1/00000000000000ab/mx.example.test";
        assert!(m.starts_with("From: Mail Delivery System <MAILER-DAEMON@mx.example.test>\r\nTo: <app@sender.test>\r\n"), "{m}");
        assert!(m.contains(&format!("boundary=\"{boundary}\"")));
        assert!(
            m.contains("Arrival-Date: Tue, 14 Nov 2023 22:13:20 +0000\r\n"),
            "{m}"
        );
        assert!(
            m.contains("Last-Attempt-Date: Tue, 14 Nov 2023 22:15:00 +0000\r\n"),
            "{m}"
        );
        let first = "\r\nFinal-Recipient: rfc822; a@dest.test\r\nAction: failed\r\nStatus: 5.1.1\r\nRemote-MTA: dns; mx.dest.test\r\nDiagnostic-Code: smtp; 550 5.1.1 no such user\r\n";
        assert!(m.contains(first), "{m}");
        let second = "\r\nFinal-Recipient: utf-8; jürgen@dest.test\r\nAction: failed\r\nStatus: 4.4.7\r\nDiagnostic-Code: x-postern; expired\r\n";
        assert!(m.contains(second), "no Remote-MTA without a remote: {m}");
        assert!(m.contains("<a@dest.test>: smtp; 550 5.1.1 no such user\r\n"));
        assert!(!m.contains("SECRET BODY"));
        assert!(
            m.ends_with(&format!(
                "text/rfc822-headers\r\n\r\nSubject: hi\r\n\r\n--{boundary}--\r\n"
            )),
            "{m}"
        );
    }

    #[test]
    fn a_delay_report_and_an_original_without_a_body() {
        let entries = [Entry {
            rcpt: "a@dest.test",
            status: "4.2.0",
            diagnostic: "smtp; 451 4.2.0 later",
            remote: None,
        }];
        // No empty line and no final CRLF: the headers part still ends its last line.
        let m = notice(Kind::Delay, b"Subject: hi", &entries);
        assert!(m.contains("Subject: Delayed Mail (still being retried)\r\n"));
        assert!(m.contains("Action: delayed\r\n"));
        assert!(!m.contains("Action: failed"));
        assert!(
            m.ends_with("\r\n\r\nSubject: hi\r\n\r\n--q1/00000000000000ab/mx.example.test--\r\n"),
            "{m}"
        );
    }
}
