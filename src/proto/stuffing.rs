//! The client's side of DATA transparency (RFC 5321 4.5.2): a line that starts with "." gets
//! another, and `<CRLF>.<CRLF>` ends the content. Done a chunk at a time, so that sending one
//! message to N servers at once costs N buffers of [`CHUNK`] bytes, not N stuffed copies.

/// Bytes of body taken per chunk (the chunk is at most that plus the dots it adds, plus the
/// terminator).
pub const CHUNK: usize = 64 * 1024;

/// Yields the stuffed content of `body`, then the terminator, in chunks.
pub struct DotStuffer<'a> {
    body: &'a [u8],
    pos: usize,
    line_start: bool,
    done: bool,
    buf: Vec<u8>,
}

impl<'a> DotStuffer<'a> {
    /// `body` should have CRLF line endings; a missing final CRLF is added.
    pub fn new(body: &'a [u8]) -> DotStuffer<'a> {
        DotStuffer {
            body,
            pos: 0,
            line_start: true,
            done: false,
            buf: Vec::with_capacity(body.len().min(CHUNK) + CHUNK.min(body.len()) / 64 + 8),
        }
    }

    /// The next chunk to send, None once the terminator has been given.
    pub fn next_chunk(&mut self) -> Option<&[u8]> {
        if self.done {
            return None;
        }
        self.buf.clear();
        let end = (self.pos + CHUNK).min(self.body.len());
        while self.pos < end {
            if self.line_start && self.body[self.pos] == b'.' {
                self.buf.push(b'.');
            }
            let rest = &self.body[self.pos..end];
            let take = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |i| i + 1);
            self.buf.extend_from_slice(&rest[..take]);
            self.pos += take;
            self.line_start = rest[take - 1] == b'\n';
        }
        if self.pos == self.body.len() {
            if !self.body.is_empty() && !self.body.ends_with(b"\r\n") {
                self.buf.extend_from_slice(b"\r\n");
            }
            self.buf.extend_from_slice(b".\r\n");
            self.done = true;
        }
        Some(&self.buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole stuffed content at once (tests and tools; the client sends chunks).
    fn dot_stuff(body: &[u8]) -> Vec<u8> {
        let mut stuffer = DotStuffer::new(body);
        let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
        while let Some(chunk) = stuffer.next_chunk() {
            out.extend_from_slice(chunk);
        }
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

    /// A dot at the start of a line that a chunk boundary cuts off is still stuffed, and the
    /// chunks stay bounded.
    #[test]
    fn chunk_boundaries_do_not_change_the_result() {
        let mut body = Vec::new();
        while body.len() < 3 * CHUNK {
            body.extend_from_slice(b".line that starts with a dot\r\nplain line\r\n");
        }
        body.truncate(CHUNK - 2);
        body.extend_from_slice(b"\r\n.dot right after the first chunk\r\nend\r\n");
        let mut expected = Vec::new();
        for line in body.split_inclusive(|&b| b == b'\n') {
            if line.starts_with(b".") {
                expected.push(b'.');
            }
            expected.extend_from_slice(line);
        }
        expected.extend_from_slice(b".\r\n");
        let mut stuffer = DotStuffer::new(&body);
        let mut got = Vec::new();
        let mut chunks = 0;
        while let Some(c) = stuffer.next_chunk() {
            assert!(c.len() <= CHUNK + CHUNK / 8 + 5, "bounded: {}", c.len());
            got.extend_from_slice(c);
            chunks += 1;
        }
        assert_eq!(chunks, 2);
        assert!(got == expected, "stuffed content differs");
    }
}
