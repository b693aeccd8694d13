//! The `Received:` trace header (RFC 5321 4.4) Postern prepends to every accepted message.
//!
//! It deliberately has no `for <recipient>` clause: the header travels with the message to
//! every recipient, and naming one of them to all the others would leak an address.

use std::net::IpAddr;

/// What the trace header records about one transaction.
pub struct Trace<'a> {
    pub helo: &'a str,
    pub client_ip: IpAddr,
    pub hostname: &'a str,
    pub esmtp: bool,
    pub authenticated: bool,
    pub smtputf8: bool,
    /// "TLSv1.3 TLS13_AES_256_GCM_SHA384" when the session was encrypted.
    pub tls: Option<&'a str>,
    pub queue_id: &'a str,
    pub date: chrono::DateTime<chrono::Utc>,
}

/// How many `Received:` fields a header section holds: the hop count of RFC 5321 6.3.
/// Only field names at the start of a line count, never continuation lines or the body.
pub fn hops(headers: &[u8]) -> usize {
    headers
        .split(|b| *b == b'\n')
        .filter(|line| {
            line.get(..9)
                .is_some_and(|name| name.eq_ignore_ascii_case(b"received:"))
        })
        .count()
}

/// Renders the header, folded, with CRLF line endings.
pub fn header(t: &Trace<'_>) -> String {
    // RFC 3848 (and RFC 6531 for UTF8SMTP) protocol names.
    let mut with = String::from(match (t.smtputf8, t.esmtp) {
        (true, _) => "UTF8SMTP",
        (false, true) => "ESMTP",
        (false, false) => "SMTP",
    });
    if t.tls.is_some() {
        with.push('S');
    }
    if t.authenticated {
        with.push('A');
    }
    let ip = match t.client_ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPv6:{v6}"),
    };
    let mut h = format!(
        "Received: from {} ([{ip}])\r\n\tby {} (Postern) with {with}",
        sanitize(t.helo),
        t.hostname
    );
    if let Some(tls) = t.tls {
        h.push_str(&format!("\r\n\t(using {tls})"));
    }
    h.push_str(&format!(
        "\r\n\tid {}; {}\r\n",
        t.queue_id,
        t.date.format("%a, %d %b %Y %H:%M:%S +0000")
    ));
    h
}

/// The HELO argument is client-controlled: keep only characters that cannot break the header.
fn sanitize(helo: &str) -> String {
    let s: String = helo
        .chars()
        .filter(|c| c.is_ascii_graphic() && !matches!(c, '(' | ')' | '\\' | ';'))
        .take(255)
        .collect();
    if s.is_empty() {
        "unknown".into()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use chrono::TimeZone;

    #[test]
    fn hop_count() {
        let h = b"Received: from a\r\n\tby b\r\nX-Received: no\r\nRECEIVED: from c\r\n received: folded\r\n";
        assert_eq!(hops(h), 2);
        assert_eq!(hops(b""), 0);
    }

    #[test]
    fn renders_protocol_tls_and_no_recipient() {
        let date = chrono::Utc.with_ymd_and_hms(2026, 11, 29, 8, 5, 3).unwrap();
        let h = header(&Trace {
            helo: "app(1)\u{7f}.example",
            client_ip: "2001:db8::1".parse().unwrap(),
            hostname: "mx.example.test",
            esmtp: true,
            authenticated: true,
            smtputf8: false,
            tls: Some("TLSv1.3 TLS13_AES_128_GCM_SHA256"),
            queue_id: "abc",
            date,
        });
        assert_eq!(
            h,
            "Received: from app1.example ([IPv6:2001:db8::1])\r\n\tby mx.example.test (Postern) with ESMTPSA\r\n\t(using TLSv1.3 TLS13_AES_128_GCM_SHA256)\r\n\tid abc; Sun, 29 Nov 2026 08:05:03 +0000\r\n"
        );
    }
}
