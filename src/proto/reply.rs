//! SMTP replies (RFC 5321 4.2) with optional RFC 3463 enhanced status codes.

use std::fmt;

/// One SMTP reply: code, optional RFC 3463 enhanced status code, text lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit reply code.
    pub code: u16,
    /// Enhanced status code such as `"2.1.0"`, repeated on every line when present.
    pub enhanced: Option<&'static str>,
    /// Text of each reply line, without code or line ending.
    pub lines: Vec<String>,
}

impl Reply {
    /// A single-line reply with an enhanced status code.
    pub fn new(code: u16, enhanced: &'static str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced),
            lines: vec![text.into()],
        }
    }

    /// A single-line reply without an enhanced status code (greeting, HELO).
    pub fn plain(code: u16, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: None,
            lines: vec![text.into()],
        }
    }

    /// A multi-line reply without an enhanced status code (the EHLO response).
    pub fn multiline(code: u16, lines: Vec<String>) -> Reply {
        Reply {
            code,
            enhanced: None,
            lines,
        }
    }

    /// Appends the wire form, `"250-first\r\n250 last\r\n"`, to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let code = self.code.min(999);
        if self.lines.is_empty() {
            self.write_line(out, code, ' ', "");
            return;
        }
        let last = self.lines.len() - 1;
        for (i, line) in self.lines.iter().enumerate() {
            let sep = if i == last { ' ' } else { '-' };
            self.write_line(out, code, sep, line);
        }
    }

    fn write_line(&self, out: &mut Vec<u8>, code: u16, sep: char, text: &str) {
        out.extend_from_slice(format!("{code:03}{sep}").as_bytes());
        if let Some(enhanced) = self.enhanced {
            out.extend_from_slice(enhanced.as_bytes());
            if !text.is_empty() {
                out.push(b' ');
            }
        }
        // Reply text may echo client input (a parameter name, an address);
        // a CR or LF in it would let the client forge extra reply lines.
        out.extend(
            text.bytes()
                .map(|b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
        out.extend_from_slice(b"\r\n");
    }

    /// True for 2xx and 3xx replies.
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:03}", self.code)?;
        if let Some(enhanced) = self.enhanced {
            write!(f, " {enhanced}")?;
        }
        for (i, line) in self.lines.iter().enumerate() {
            let sep = match i {
                0 if line.is_empty() => "",
                0 => " ",
                _ => " / ",
            };
            f.write_str(sep)?;
            for c in line.chars() {
                // Log lines must stay single lines whatever the text holds.
                if c == '\r' || c == '\n' {
                    f.write_str(" ")?;
                } else {
                    write!(f, "{c}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(reply: &Reply) -> String {
        let mut out = Vec::new();
        reply.write_to(&mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn rendering() {
        let cases: Vec<(Reply, &str, &str)> = vec![
            (
                Reply::new(250, "2.1.0", "Sender OK"),
                "250 2.1.0 Sender OK\r\n",
                "250 2.1.0 Sender OK",
            ),
            (
                Reply::plain(220, "mx.example ESMTP"),
                "220 mx.example ESMTP\r\n",
                "220 mx.example ESMTP",
            ),
            (
                Reply::multiline(
                    250,
                    vec!["mx.example".into(), "SIZE 1000".into(), "8BITMIME".into()],
                ),
                "250-mx.example\r\n250-SIZE 1000\r\n250 8BITMIME\r\n",
                "250 mx.example / SIZE 1000 / 8BITMIME",
            ),
            (
                Reply {
                    code: 550,
                    enhanced: Some("5.7.1"),
                    lines: vec!["one".into(), "two".into()],
                },
                "550-5.7.1 one\r\n550 5.7.1 two\r\n",
                "550 5.7.1 one / two",
            ),
            (
                Reply::new(250, "2.0.0", "a\r\nb\nc"),
                "250 2.0.0 a  b c\r\n",
                "250 2.0.0 a  b c",
            ),
            (Reply::multiline(354, Vec::new()), "354 \r\n", "354"),
            (Reply::new(221, "2.0.0", ""), "221 2.0.0\r\n", "221 2.0.0"),
        ];
        for (reply, expected_wire, expected_display) in cases {
            assert_eq!(wire(&reply), expected_wire, "{reply:?}");
            assert_eq!(reply.to_string(), expected_display, "{reply:?}");
        }
    }

    #[test]
    fn write_to_appends() {
        let mut out = b"x".to_vec();
        Reply::plain(250, "ok").write_to(&mut out);
        assert_eq!(out, b"x250 ok\r\n");
    }

    #[test]
    fn positive() {
        for (code, positive) in [
            (199, false),
            (220, true),
            (250, true),
            (334, true),
            (354, true),
            (421, false),
            (550, false),
        ] {
            assert_eq!(Reply::plain(code, "").is_positive(), positive, "{code}");
        }
    }
}
