//! Splitting the command stream into lines.

use bytes::{Buf, Bytes, BytesMut};

/// The RFC 5321 4.5.3.1.4 command-line limit, CRLF included.
pub const MAX_COMMAND_LINE: usize = 512;

/// Splits the command stream into lines; enforces the RFC 5321 4.5.3.1.4 512-octet command-line limit (including CRLF).
#[derive(Debug, Clone)]
pub struct CommandFramer {
    max_line: usize,
    /// Set while skipping the rest of an over-long line whose end has not arrived yet.
    discarding: bool,
}

/// One result of [`CommandFramer::next_line`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramedLine {
    /// A complete line, without its CRLF or LF.
    Line(Bytes),
    /// A line longer than the limit was received and thrown away.
    TooLong,
}

impl CommandFramer {
    /// A framer accepting lines of up to `max_line` octets, line ending included.
    pub fn new(max_line: usize) -> Self {
        CommandFramer {
            max_line,
            discarding: false,
        }
    }

    /// Takes the next complete line from buf (advancing it). Returns None when more input is needed.
    ///
    /// A line longer than max_line: the framer discards bytes up to and including the next LF
    /// (possibly across several calls) and then returns Some(TooLong) exactly once for it.
    /// Lines end at LF; a CR right before it is stripped (commands are lenient about bare LF; DATA is not).
    pub fn next_line(&mut self, buf: &mut BytesMut) -> Option<FramedLine> {
        let newline = buf.iter().position(|&b| b == b'\n');
        if self.discarding {
            return match newline {
                Some(end) => {
                    buf.advance(end + 1);
                    self.discarding = false;
                    Some(FramedLine::TooLong)
                }
                None => {
                    // Dropping what we have keeps memory bounded however long the line gets.
                    buf.clear();
                    None
                }
            };
        }
        match newline {
            Some(end) if end < self.max_line => {
                let mut line = buf.split_to(end + 1);
                line.truncate(end);
                if line.last() == Some(&b'\r') {
                    line.truncate(end - 1);
                }
                Some(FramedLine::Line(line.freeze()))
            }
            Some(end) => {
                buf.advance(end + 1);
                Some(FramedLine::TooLong)
            }
            None if buf.len() >= self.max_line => {
                // Even if the LF came next, the line would exceed the limit.
                buf.clear();
                self.discarding = true;
                None
            }
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `chunks` one after another, collecting every framed line.
    fn frame(max_line: usize, chunks: &[&[u8]]) -> (Vec<FramedLine>, Vec<u8>) {
        let mut framer = CommandFramer::new(max_line);
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            while let Some(line) = framer.next_line(&mut buf) {
                out.push(line);
            }
        }
        (out, buf.to_vec())
    }

    fn line(s: &str) -> FramedLine {
        FramedLine::Line(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn framing() {
        let long = "A".repeat(600);
        let just_fits = format!("{}\r\n", "B".repeat(510));
        let just_fits_lf = format!("{}\n", "B".repeat(511));
        let one_over = format!("{}\r\n", "C".repeat(511));
        let one_over_lf = format!("{}\n", "C".repeat(512));
        let two_long = format!("{long}\r\n{long}\r\nNOOP\r\n");
        type Case<'a> = (Vec<&'a [u8]>, Vec<FramedLine>, &'a [u8]);
        let cases: Vec<Case> = vec![
            (vec![b"NOOP\r\n"], vec![line("NOOP")], b""),
            (vec![b"NOOP\n"], vec![line("NOOP")], b""),
            (vec![b"NOOP"], vec![], b"NOOP"),
            (
                vec![b"NO", b"OP\r", b"\nQU", b"IT\r\n"],
                vec![line("NOOP"), line("QUIT")],
                b"",
            ),
            (vec![b"\r\n\n"], vec![line(""), line("")], b""),
            // Only the CR right before the LF is part of the line ending.
            (vec![b"A\r\r\n"], vec![line("A\r")], b""),
            (vec![b"A\rB\r\n"], vec![line("A\rB")], b""),
            (
                vec![b"RSET\r\nDATA\r\nrest"],
                vec![line("RSET"), line("DATA")],
                b"rest",
            ),
            (
                vec![just_fits.as_bytes()],
                vec![line(&"B".repeat(510))],
                b"",
            ),
            (
                vec![just_fits_lf.as_bytes()],
                vec![line(&"B".repeat(511))],
                b"",
            ),
            (
                vec![one_over.as_bytes(), b"NOOP\r\n"],
                vec![FramedLine::TooLong, line("NOOP")],
                b"",
            ),
            (vec![one_over_lf.as_bytes()], vec![FramedLine::TooLong], b""),
            (
                vec![long.as_bytes(), long.as_bytes(), b"\r\nQUIT\r\n"],
                vec![FramedLine::TooLong, line("QUIT")],
                b"",
            ),
            (
                vec![long.as_bytes(), b"x\r", b"\nQUIT\r\n"],
                vec![FramedLine::TooLong, line("QUIT")],
                b"",
            ),
            (
                vec![two_long.as_bytes()],
                vec![FramedLine::TooLong, FramedLine::TooLong, line("NOOP")],
                b"",
            ),
        ];
        for (chunks, expected, rest) in cases {
            let (lines, buf) = frame(512, &chunks);
            assert_eq!(lines, expected, "{chunks:?}");
            assert_eq!(buf, rest, "{chunks:?}");
        }
    }

    #[test]
    fn byte_by_byte_matches_one_shot() {
        let input = format!(
            "EHLO a\r\n{}\r\nMAIL FROM:<a@b>\nRCPT TO:<c@d>\r\n{}\nQUIT\r\n",
            "x".repeat(700),
            "y".repeat(512)
        );
        let (one_shot, _) = frame(512, &[input.as_bytes()]);
        let bytes: Vec<&[u8]> = input.as_bytes().chunks(1).collect();
        let (split, rest) = frame(512, &bytes);
        assert_eq!(one_shot, split);
        assert!(rest.is_empty());
        assert_eq!(split.len(), 6);
    }

    #[test]
    fn discarding_keeps_buffer_small() {
        let mut framer = CommandFramer::new(512);
        let mut buf = BytesMut::new();
        for _ in 0..100 {
            buf.extend_from_slice(&[b'z'; 400]);
            assert_eq!(framer.next_line(&mut buf), None);
            assert!(buf.len() < 512);
        }
        buf.extend_from_slice(b"\r\nNOOP\r\n");
        assert_eq!(framer.next_line(&mut buf), Some(FramedLine::TooLong));
        assert_eq!(framer.next_line(&mut buf), Some(line("NOOP")));
        assert_eq!(framer.next_line(&mut buf), None);
    }
}
