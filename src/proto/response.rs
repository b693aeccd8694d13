//! Replies a remote server sends us (the client side of RFC 5321 4.2), with their RFC 3463
//! enhanced status codes: pure parsing, no I/O, so the SMTP client only moves bytes.
//!
//! Modelled on KumoMTA's `rfc5321::Response` and `EnhancedStatusCode`: the meaning of a reply
//! travels as these types (class, subject, detail), never as strings compared by callers.

use std::fmt;

use bytes::{Buf, BytesMut};

/// Largest reply accepted from a server; more is an error, not unbounded memory.
pub const MAX_RESPONSE: usize = 64 * 1024;

/// An RFC 3463 enhanced status code: `class.subject.detail`, e.g. 5.1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnhancedStatusCode {
    /// 2 (success), 4 (persistent transient failure) or 5 (permanent failure).
    pub class: u8,
    pub subject: u16,
    pub detail: u16,
}

impl EnhancedStatusCode {
    /// A code from its three parts.
    pub const fn new(class: u8, subject: u16, detail: u16) -> EnhancedStatusCode {
        EnhancedStatusCode {
            class,
            subject,
            detail,
        }
    }

    /// Parses "5.1.1"; None unless the class is 2, 4 or 5 and the others are 1 to 3 digits.
    pub fn parse(s: &str) -> Option<EnhancedStatusCode> {
        let mut parts = s.split('.');
        let (class, subject, detail) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let number = |p: &str| {
            (!p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
                .then(|| p.parse::<u16>().ok())
                .flatten()
        };
        let class = match class {
            "2" => 2,
            "4" => 4,
            "5" => 5,
            _ => return None,
        };
        Some(EnhancedStatusCode::new(
            class,
            number(subject)?,
            number(detail)?,
        ))
    }

    /// 4.x.x: a later attempt may succeed.
    pub fn is_transient(&self) -> bool {
        self.class == 4
    }

    /// 5.x.x: no later attempt will succeed.
    pub fn is_permanent(&self) -> bool {
        self.class == 5
    }

    /// 2.x.x: done.
    pub fn is_success(&self) -> bool {
        self.class == 2
    }

    /// The same condition with another class (a permanent DNS answer becomes transient when
    /// another host may still be tried later).
    pub fn with_class(self, class: u8) -> EnhancedStatusCode {
        EnhancedStatusCode { class, ..self }
    }
}

impl fmt::Display for EnhancedStatusCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.class, self.subject, self.detail)
    }
}

/// One reply from a remote server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The three-digit reply code.
    pub code: u16,
    /// The enhanced status code at the start of the first line, when the server sent one.
    pub enhanced: Option<EnhancedStatusCode>,
    /// Text of each line, without the code (EHLO keywords are one per line).
    pub lines: Vec<String>,
}

impl Response {
    /// 2xx.
    pub fn is_success(&self) -> bool {
        self.code / 100 == 2
    }

    /// 4xx: try again later.
    pub fn is_transient(&self) -> bool {
        self.code / 100 == 4
    }

    /// 5xx (and anything outside 2xx to 4xx): give up.
    pub fn is_permanent(&self) -> bool {
        !(200..500).contains(&self.code)
    }

    /// The reply's enhanced status code, or the class default (x.0.0). A code whose class
    /// contradicts the reply code is ignored (RFC 3463 section 2).
    pub fn status(&self) -> EnhancedStatusCode {
        let class = match self.code / 100 {
            2 | 3 => 2,
            4 => 4,
            _ => 5,
        };
        self.enhanced
            .filter(|e| e.class == class)
            .unwrap_or(EnhancedStatusCode::new(class, 0, 0))
    }

    /// "550 5.1.1 User unknown" on one line, for the DSN and the sealed ledger only: the text
    /// may quote an address, so it never goes into a log line.
    pub fn to_single_line(&self) -> String {
        let mut out = format!("{} {}", self.code, self.lines.join(" "));
        out = out
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        out.trim_end().to_string()
    }

    /// The first word of the first line: what a server says its name is in a greeting or an
    /// EHLO reply (RFC 5321 4.1.1.1, 4.3.1).
    pub fn first_word(&self) -> Option<&str> {
        self.lines.first()?.split_whitespace().next()
    }
}

/// Why bytes from a server are not a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    /// A line without a three-digit code (the line itself is not kept: it is remote text).
    #[error("malformed reply line")]
    Malformed,
    #[error("reply lines with different codes")]
    MixedCodes,
    #[error("reply longer than {MAX_RESPONSE} bytes")]
    TooLong,
}

/// Takes one complete reply off the front of `buf`; Ok(None) when more bytes are needed.
pub fn parse_response(buf: &mut BytesMut) -> Result<Option<Response>, ResponseError> {
    let mut pos = 0;
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let Some(nl) = buf[pos..].iter().position(|b| *b == b'\n') else {
            return if buf.len() > MAX_RESPONSE {
                Err(ResponseError::TooLong)
            } else {
                Ok(None)
            };
        };
        let raw = &buf[pos..pos + nl];
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(ResponseError::Malformed);
        }
        let this = line[..3]
            .iter()
            .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
        if *code.get_or_insert(this) != this {
            return Err(ResponseError::MixedCodes);
        }
        lines.push(String::from_utf8_lossy(line.get(4..).unwrap_or(b"")).into_owned());
        pos += nl + 1;
        if line.get(3) != Some(&b'-') {
            buf.advance(pos);
            let enhanced = lines
                .first()
                .and_then(|l| l.split_whitespace().next())
                .and_then(EnhancedStatusCode::parse);
            return Ok(Some(Response {
                code: this,
                enhanced,
                lines,
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_across_lines_and_reject_garbage() {
        let mut buf =
            BytesMut::from(&b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n354 go"[..]);
        let r = parse_response(&mut buf).unwrap().unwrap();
        assert_eq!(r.code, 250);
        assert_eq!(r.lines, ["mx.test", "PIPELINING", "SIZE 1000"]);
        assert_eq!(r.first_word(), Some("mx.test"));
        assert!(
            parse_response(&mut buf).unwrap().is_none(),
            "incomplete line"
        );
        buf.extend_from_slice(b"\r\n");
        assert_eq!(parse_response(&mut buf).unwrap().unwrap().code, 354);
        let mut bad = BytesMut::from(&b"hello\r\n"[..]);
        assert_eq!(parse_response(&mut bad), Err(ResponseError::Malformed));
        let mut mixed = BytesMut::from(&b"250-a\r\n450 b\r\n"[..]);
        assert_eq!(parse_response(&mut mixed), Err(ResponseError::MixedCodes));
        let mut long = BytesMut::from(&vec![b'2'; MAX_RESPONSE + 1][..]);
        assert_eq!(parse_response(&mut long), Err(ResponseError::TooLong));
    }

    #[test]
    fn enhanced_codes_and_classes() {
        let parse = |s: &str| parse_response(&mut BytesMut::from(s.as_bytes())).unwrap();
        let r = parse("550 5.1.1 User unknown\r\n").unwrap();
        assert_eq!(r.enhanced, Some(EnhancedStatusCode::new(5, 1, 1)));
        assert_eq!(r.status().to_string(), "5.1.1");
        assert!(r.is_permanent() && r.status().is_permanent());
        assert_eq!(r.to_single_line(), "550 5.1.1 User unknown");
        let r = parse("451 try later\r\n").unwrap();
        assert_eq!(r.enhanced, None);
        assert_eq!(r.status(), EnhancedStatusCode::new(4, 0, 0));
        assert!(r.is_transient() && r.status().is_transient());
        let r = parse("450 5.1.1 contradictory\r\n").unwrap();
        assert_eq!(
            r.status(),
            EnhancedStatusCode::new(4, 0, 0),
            "class mismatch"
        );
        assert!(parse("250 2.0.0 ok\r\n").unwrap().status().is_success());
        assert_eq!(EnhancedStatusCode::parse("5.1"), None);
        assert_eq!(EnhancedStatusCode::parse("3.1.1"), None);
        assert_eq!(EnhancedStatusCode::parse("5.1.1.1"), None);
        assert_eq!(EnhancedStatusCode::parse("5.1000.1"), None);
        assert_eq!(
            EnhancedStatusCode::parse("5.1.10"),
            Some(EnhancedStatusCode::new(5, 1, 10))
        );
    }
}
