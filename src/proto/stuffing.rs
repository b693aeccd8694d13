//! The client's side of DATA transparency (RFC 5321 4.5.2): a line that starts with "." gets
//! another, and `<CRLF>.<CRLF>` ends the content. Streamed: content goes in as it comes (from
//! memory or read back from the spool a chunk at a time), so that sending one message to N
//! servers at once costs N buffers of about [`CHUNK`] bytes, not N stuffed copies.

/// Bytes of content the client stuffs and writes at a time (the output is at most that plus
/// the dots it adds, plus the terminator).
pub const CHUNK: usize = 64 * 1024;

/// Stuffs content given in pieces that may split lines (and CRLFs) anywhere.
#[derive(Debug, Clone)]
pub struct DotStuffer {
    /// The next octet starts a line.
    line_start: bool,
    /// The last two octets of content so far (a missing final CRLF is added at the end).
    tail: [u8; 2],
    /// Octets of content so far.
    len: u64,
}

impl Default for DotStuffer {
    fn default() -> Self {
        DotStuffer::new()
    }
}

impl DotStuffer {
    /// A stuffer at the start of the content.
    pub fn new() -> DotStuffer {
        DotStuffer {
            line_start: true,
            tail: [0; 2],
            len: 0,
        }
    }

    /// Appends the stuffed form of `content` (CRLF line endings) to `out`.
    pub fn push(&mut self, content: &[u8], out: &mut Vec<u8>) {
        out.reserve(content.len() + content.len() / 64 + 8);
        let mut rest = content;
        while !rest.is_empty() {
            if self.line_start && rest[0] == b'.' {
                out.push(b'.');
            }
            let take = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |i| i + 1);
            out.extend_from_slice(&rest[..take]);
            self.line_start = rest[take - 1] == b'\n';
            rest = &rest[take..];
        }
        self.len += content.len() as u64;
        match content {
            [.., a, b] => self.tail = [*a, *b],
            [b] => self.tail = [self.tail[1], *b],
            [] => {}
        }
    }

    /// Appends the end of the content: a CRLF if the last line lacked one, then `.` CRLF.
    pub fn finish(self, out: &mut Vec<u8>) {
        if self.len > 0 && self.tail != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole stuffed content at once.
    fn dot_stuff(body: &[u8]) -> Vec<u8> {
        let mut stuffer = DotStuffer::new();
        let mut out = Vec::new();
        stuffer.push(body, &mut out);
        stuffer.finish(&mut out);
        out
    }

    #[test]
    fn stuffing() {
        assert_eq!(
            dot_stuff(b".a\r\nb\r\n..c\r\n"),
            b"..a\r\nb\r\n...c\r\n.\r\n".to_vec()
        );
        assert_eq!(dot_stuff(b"x"), b"x\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
    }

    /// Content given in pieces, split anywhere (between CR and LF, right before a dot at the
    /// start of a line), stuffs to exactly what the whole does.
    #[test]
    fn piece_boundaries_do_not_change_the_result() {
        let body = b".a\r\nb\r\n..c\r\nd.\r\n.\r\n.e\r\nlast".to_vec();
        let whole = dot_stuff(&body);
        assert_eq!(
            whole,
            b"..a\r\nb\r\n...c\r\nd.\r\n..\r\n..e\r\nlast\r\n.\r\n".to_vec()
        );
        for size in 1..body.len() {
            let mut stuffer = DotStuffer::new();
            let mut out = Vec::new();
            for piece in body.chunks(size) {
                stuffer.push(piece, &mut out);
            }
            stuffer.finish(&mut out);
            assert_eq!(out, whole, "pieces of {size}");
        }
        // The CRLF that ends the content may come in two pieces too.
        let mut stuffer = DotStuffer::new();
        let mut out = Vec::new();
        stuffer.push(b"x\r", &mut out);
        stuffer.push(b"\n", &mut out);
        stuffer.finish(&mut out);
        assert_eq!(out, b"x\r\n.\r\n".to_vec());
    }
}
