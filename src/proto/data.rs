//! Message content after DATA (dot-stuffed, ends at CRLF.CRLF) or BDAT (raw chunks).
//!
//! [`DataDecoder`] only undoes the DATA transparency procedure and finds the
//! terminator; every rule about the content itself (line length, line
//! endings, size) lives in [`BodyChecker`], which BDAT uses directly, so both
//! transfer modes accept exactly the same messages.

use super::reply::Reply;

/// The RFC 5321 4.5.3.1.6 text-line limit, CRLF included.
pub const MAX_TEXT_LINE: usize = 1000;

/// What to do with a CR or LF that is not part of a CRLF pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineEndings {
    /// Refuse the message (RFC 5321 2.3.8); the safe choice against SMTP smuggling.
    Reject,
    /// Turn each bare CR and bare LF into CRLF.
    Normalise,
}

/// Limits applied to message content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyLimits {
    /// Largest accepted body, in octets as stored (after normalisation).
    pub max_size: usize,
    /// Longest line, CRLF included: 1000 per RFC 5321 4.5.3.1.6.
    pub max_line: usize,
    /// Treatment of bare CR and LF.
    pub line_endings: LineEndings,
}

/// Why message content was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// The body exceeds `max_size`.
    #[error("message exceeds the maximum size")]
    TooLarge,
    /// A line exceeds `max_line` octets, CRLF included.
    #[error("line longer than {max_line} octets")]
    LineTooLong {
        /// The limit that was exceeded, so the reply can name it.
        max_line: usize,
    },
    /// A CR or LF outside a CRLF pair, under [`LineEndings::Reject`].
    #[error("bare CR or LF in message data")]
    BareLineEnding,
}

impl BodyError {
    /// The reply to send for this error.
    pub fn reply(&self) -> Reply {
        match self {
            BodyError::TooLarge => Reply::new(552, "5.3.4", "Message exceeds the maximum size"),
            BodyError::LineTooLong { max_line } => {
                Reply::new(500, "5.5.2", format!("Line longer than {max_line} octets"))
            }
            BodyError::BareLineEnding => Reply::new(554, "5.6.0", "Bare CR or LF in message data"),
        }
    }
}

/// What a body's buffer starts at: most messages fit in it.
const FIRST_CAPACITY: usize = 8 << 10;

/// Checks and collects message content (already unstuffed): line length, bare CR/LF, size.
/// Keeps going after a violation (the rest of the data must be drained, not buffered): once
/// an error is recorded it stops appending to the body but still consumes input.
#[derive(Debug, Clone)]
pub struct BodyChecker {
    limits: BodyLimits,
    body: Vec<u8>,
    /// Octets of checked content already handed out by [`take`](Self::take) (a body streamed
    /// to disk as it arrives); they count towards `max_size` all the same.
    taken: usize,
    /// Octets of content fed so far, including any past an error.
    seen: usize,
    /// Octets of the current line so far, line ending excluded.
    line_len: usize,
    /// The last octet fed was a CR whose partner (an LF or not) is still to come.
    pending_cr: bool,
    /// The first violation; later ones are not reported.
    error: Option<BodyError>,
}

impl BodyChecker {
    /// A checker enforcing `limits`.
    pub fn new(limits: BodyLimits) -> Self {
        BodyChecker {
            limits,
            body: Vec::new(),
            taken: 0,
            seen: 0,
            line_len: 0,
            pending_cr: false,
            error: None,
        }
    }

    /// Adds content. Stateful across calls: a CR ending one call and an LF
    /// starting the next are a proper CRLF.
    pub fn feed(&mut self, content: &[u8]) {
        self.seen = self.seen.saturating_add(content.len());
        let mut rest = content;
        if self.pending_cr {
            let Some((&first, tail)) = rest.split_first() else {
                return;
            };
            self.pending_cr = false;
            if first == b'\n' {
                self.end_line();
                rest = tail;
            } else {
                self.bare_line_ending();
            }
        }
        while self.error.is_none() && !rest.is_empty() {
            let Some(pos) = rest.iter().position(|&b| b == b'\r' || b == b'\n') else {
                self.text(rest);
                return;
            };
            let (text, ending) = rest.split_at(pos);
            self.text(text);
            if self.error.is_some() {
                return;
            }
            match ending {
                [b'\r', b'\n', tail @ ..] => {
                    self.end_line();
                    rest = tail;
                }
                [b'\r'] => {
                    self.pending_cr = true;
                    rest = &[];
                }
                [_, tail @ ..] => {
                    self.bare_line_ending();
                    rest = tail;
                }
                [] => rest = &[],
            }
        }
    }

    /// Octets of content fed so far, even past the size limit or another error.
    pub fn size(&self) -> usize {
        self.seen
    }

    /// Checked content not yet taken.
    pub fn buffered(&self) -> usize {
        self.body.len()
    }

    /// Takes the checked content so far, for a body that is streamed on as it arrives. A CR
    /// whose partner is still to come stays behind. What [`finish`](Self::finish) returns is
    /// then only the rest; the size limit counts everything.
    pub fn take(&mut self) -> Vec<u8> {
        let room = self.limits.max_size.saturating_sub(self.stored());
        let next = Vec::with_capacity(self.body.capacity().min(room));
        self.taken += self.body.len();
        std::mem::replace(&mut self.body, next)
    }

    /// Octets of checked content, taken or not.
    fn stored(&self) -> usize {
        self.taken + self.body.len()
    }

    /// Ends the content. Ok(body) has only CRLF line endings (after [`take`](Self::take), the
    /// part not taken). In Normalise mode, bare LF and bare CR become CRLF.
    ///
    /// A final line without CRLF (possible with BDAT, never with DATA) gets a
    /// CRLF appended: the stored message must consist of complete lines. That
    /// CRLF counts towards `max_size`.
    pub fn finish(mut self) -> Result<Vec<u8>, BodyError> {
        if self.error.is_none() && self.pending_cr {
            self.pending_cr = false;
            self.bare_line_ending();
        }
        if self.error.is_none() && self.line_len > 0 {
            self.end_line();
        }
        match self.error {
            Some(error) => Err(error),
            None => Ok(self.body),
        }
    }

    /// Line content without CR or LF.
    fn text(&mut self, text: &[u8]) {
        if text.is_empty() || self.error.is_some() {
            return;
        }
        // The line limit counts the CRLF that will end the line.
        let line_room = self
            .limits
            .max_line
            .saturating_sub(2)
            .saturating_sub(self.line_len);
        let size_room = self.limits.max_size.saturating_sub(self.stored());
        if text.len() > line_room.min(size_room) {
            // Report the limit that the first offending octet breaks, so the
            // error does not depend on how the input was split into reads.
            self.fail(if line_room <= size_room {
                BodyError::LineTooLong {
                    max_line: self.limits.max_line,
                }
            } else {
                BodyError::TooLarge
            });
            return;
        }
        self.line_len += text.len();
        self.append(text);
    }

    fn fail(&mut self, error: BodyError) {
        self.error = Some(error);
        // Nothing more will be appended; give the memory back now.
        self.body = Vec::new();
    }

    fn end_line(&mut self) {
        if self.error.is_some() {
            return;
        }
        self.line_len = 0;
        self.append(b"\r\n");
    }

    fn bare_line_ending(&mut self) {
        match self.limits.line_endings {
            LineEndings::Reject => {
                if self.error.is_none() {
                    self.fail(BodyError::BareLineEnding);
                }
            }
            LineEndings::Normalise => self.end_line(),
        }
    }

    fn append(&mut self, bytes: &[u8]) {
        if self.stored().saturating_add(bytes.len()) > self.limits.max_size {
            self.fail(BodyError::TooLarge);
            return;
        }
        let needed = self.body.len() + bytes.len();
        if needed > self.body.capacity() {
            // Vec's own doubling could reserve up to twice max_size; cap it. Start at
            // FIRST_CAPACITY: most mail fits, without a chain of reallocations and copies.
            let target = needed
                .max(self.body.capacity().saturating_mul(2))
                .max(FIRST_CAPACITY)
                .min(self.limits.max_size - self.taken);
            self.body.reserve_exact(target - self.body.len());
        }
        self.body.extend_from_slice(bytes);
    }

    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.body.capacity()
    }
}

/// Where the decoder is relative to lines and the terminator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Right after a real CRLF, or at the very start of the data.
    LineStart,
    /// Inside a line; the last octet was not a CR.
    Text,
    /// Inside a line; the last octet was a CR.
    Cr,
    /// A `.` at the start of a line, withheld from the body.
    Dot,
    /// `.` CR at the start of a line, both withheld until we know whether LF follows.
    DotCr,
    /// The terminator has been consumed.
    Done,
}

/// DATA stream decoder: removes dot-stuffing and finds the end. Only the exact sequence
/// `<CRLF>.<CRLF>` ends the data (the start of data counts as after a CRLF, so ".\r\n" first is an empty message).
/// "\n.\n", "\r.\r", "\r.\n", "\n.\r", "\r\n.\n", "\n.\r\n", "\r.\r\n", "\r\n.\r", "\r\n\x00.\r\n" never end the data (SMTP smuggling).
/// A line starting with "." has that first dot removed (RFC 5321 4.5.2) — only after a real CRLF.
#[derive(Debug, Clone)]
pub struct DataDecoder {
    state: State,
    checker: BodyChecker,
}

impl DataDecoder {
    /// A decoder whose content is checked against `limits`.
    pub fn new(limits: BodyLimits) -> Self {
        DataDecoder {
            state: State::LineStart,
            checker: BodyChecker::new(limits),
        }
    }

    /// Consumes input; returns (bytes consumed, finished). Bytes after the terminator are NOT consumed (they are the next pipelined command).
    pub fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        if self.state == State::Done {
            return (0, true);
        }
        let mut i = 0;
        // Start of the octets not yet passed to the checker; they go in one slice.
        let mut run = 0;
        while let Some(&b) = input.get(i) {
            match self.state {
                State::Text => match input
                    .get(i..)
                    .and_then(|s| s.iter().position(|&c| c == b'\r'))
                {
                    Some(offset) => {
                        i += offset + 1;
                        self.state = State::Cr;
                    }
                    None => i = input.len(),
                },
                State::Cr => {
                    i += 1;
                    self.state = match b {
                        b'\n' => State::LineStart,
                        b'\r' => State::Cr,
                        _ => State::Text,
                    };
                }
                State::LineStart => {
                    if b == b'.' {
                        self.flush(input, run, i);
                        i += 1;
                        run = i;
                        self.state = State::Dot;
                    } else {
                        self.state = State::Text;
                    }
                }
                State::Dot => {
                    if b == b'\r' {
                        i += 1;
                        run = i;
                        self.state = State::DotCr;
                    } else {
                        // Not the terminator: the dot was stuffing and stays removed.
                        self.state = State::Text;
                    }
                }
                State::DotCr => {
                    if b == b'\n' {
                        self.state = State::Done;
                        return (i + 1, true);
                    }
                    // ".\r" then something else: the dot was stuffing, the CR is content.
                    self.checker.feed(b"\r");
                    self.state = State::Cr;
                }
                State::Done => break,
            }
        }
        self.flush(input, run, i);
        (i, false)
    }

    fn flush(&mut self, input: &[u8], from: usize, to: usize) {
        if let Some(run) = input.get(from..to) {
            if !run.is_empty() {
                self.checker.feed(run);
            }
        }
    }

    /// Whether the terminator has been seen.
    pub fn is_finished(&self) -> bool {
        self.state == State::Done
    }

    /// Octets of content (after unstuffing) seen so far.
    pub fn size(&self) -> usize {
        self.checker.size()
    }

    /// See [`BodyChecker::buffered`].
    pub fn buffered(&self) -> usize {
        self.checker.buffered()
    }

    /// See [`BodyChecker::take`].
    pub fn take(&mut self) -> Vec<u8> {
        self.checker.take()
    }

    /// The body without the terminating ".\r\n"; last line's CRLF kept.
    ///
    /// Meant to be called once [`feed`](Self::feed) reported the end; called
    /// earlier, the content so far is checked and returned as if complete.
    pub fn finish(self) -> Result<Vec<u8>, BodyError> {
        self.checker.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(line_endings: LineEndings) -> BodyLimits {
        BodyLimits {
            max_size: 1 << 20,
            max_line: MAX_TEXT_LINE,
            line_endings,
        }
    }

    const REJECT: LineEndings = LineEndings::Reject;
    const NORMALISE: LineEndings = LineEndings::Normalise;

    /// After the first violation the rest is drained, not buffered: memory stays at nothing
    /// however much follows.
    /// A body taken in pieces as it arrives (streamed to disk) is the same body, byte for
    /// byte, whatever the split; and the size limit counts what was taken.
    #[test]
    fn taken_pieces_make_the_same_body_and_count_towards_the_limit() {
        let input = b"Subject: x\r\n\r\n..dot\r\nbare\rcr\r\nline two\r\n.\r\n";
        let mut whole = DataDecoder::new(limits(NORMALISE));
        assert_eq!(whole.feed(input), (input.len(), true));
        let whole = whole.finish().expect("body");
        for split in 1..input.len() {
            let mut decoder = DataDecoder::new(limits(NORMALISE));
            let mut out = Vec::new();
            for piece in input.chunks(split) {
                decoder.feed(piece);
                out.extend(decoder.take());
                assert_eq!(decoder.buffered(), 0);
            }
            out.extend(decoder.finish().expect("body"));
            assert_eq!(out, whole, "split every {split}");
        }
        let mut checker = BodyChecker::new(BodyLimits {
            max_size: 10,
            max_line: MAX_TEXT_LINE,
            line_endings: REJECT,
        });
        checker.feed(b"12345678\r\n");
        assert_eq!(checker.take(), b"12345678\r\n".to_vec());
        checker.feed(b"x");
        assert_eq!(checker.finish(), Err(BodyError::TooLarge));
    }

    #[test]
    fn nothing_is_buffered_after_an_error() {
        let mut checker = BodyChecker::new(limits(REJECT));
        checker.feed(b"Subject: x\r\n\r\nbare\nline\r\n");
        assert_eq!(checker.error, Some(BodyError::BareLineEnding));
        for _ in 0..100 {
            checker.feed(&[b'a'; 1000]);
            checker.feed(b"\r\n");
        }
        assert_eq!((checker.body.len(), checker.body.capacity()), (0, 0));
        assert_eq!(checker.size(), 25 + 100 * 1002);
    }

    /// The body never reserves past `max_size`, however it is fed (Vec's own doubling would).
    #[test]
    fn the_body_never_reserves_past_max_size() {
        let max_size = 100_000;
        let mut checker = BodyChecker::new(BodyLimits {
            max_size,
            ..limits(REJECT)
        });
        let line = [b'x'; 98];
        while checker.body.len() + 100 <= max_size {
            checker.feed(&line);
            checker.feed(b"\r\n");
            assert!(
                checker.body.capacity() <= max_size,
                "{}",
                checker.body.capacity()
            );
        }
        assert!(checker.error.is_none());
        assert!(checker.body.capacity() >= checker.body.len());
    }

    /// Feeds `chunks` in order, stopping at the end of data. Returns the
    /// total consumed, whether the end was seen, and the result.
    fn decode_chunks(
        limits: BodyLimits,
        chunks: &[&[u8]],
    ) -> (usize, bool, Result<Vec<u8>, BodyError>) {
        let mut decoder = DataDecoder::new(limits);
        let mut consumed = 0;
        let mut finished = false;
        for chunk in chunks {
            let (n, done) = decoder.feed(chunk);
            consumed += n;
            if done {
                assert!(n <= chunk.len());
                finished = true;
                break;
            }
            assert_eq!(n, chunk.len(), "an unfinished decoder consumes everything");
        }
        (consumed, finished, decoder.finish())
    }

    fn decode(limits: BodyLimits, input: &[u8]) -> (usize, bool, Result<Vec<u8>, BodyError>) {
        decode_chunks(limits, &[input])
    }

    /// Deterministic xorshift so split tests need no extra dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// One-shot, byte-by-byte and random splits must all agree.
    fn assert_split_invariant(limits: BodyLimits, input: &[u8]) {
        let one_shot = decode(limits, input);
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(decode_chunks(limits, &bytes), one_shot, "byte by byte");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ input.len() as u64);
        for _ in 0..50 {
            let mut chunks = Vec::new();
            let mut rest = input;
            while !rest.is_empty() {
                let n = (rng.next() % 8) as usize;
                let (chunk, tail) = rest.split_at(n.min(rest.len()));
                chunks.push(chunk);
                rest = tail;
            }
            assert_eq!(decode_chunks(limits, &chunks), one_shot, "split {chunks:?}");
        }
    }

    fn has_bare_line_ending(body: &[u8]) -> bool {
        body.iter().enumerate().any(|(i, &b)| match b {
            b'\r' => body.get(i + 1) != Some(&b'\n'),
            b'\n' => i == 0 || body.get(i - 1) != Some(&b'\r'),
            _ => false,
        })
    }

    #[test]
    fn data_decoding() {
        type Case = (&'static [u8], usize, Result<&'static [u8], BodyError>);
        let cases: Vec<Case> = vec![
            (
                b"Subject: x\r\n\r\nhello\r\n.\r\n",
                24,
                Ok(b"Subject: x\r\n\r\nhello\r\n"),
            ),
            (b".\r\n", 3, Ok(b"")),
            (b".\r\nMAIL FROM:<a@b>\r\n", 3, Ok(b"")),
            (b"a\r\n.\r\nQUIT\r\n", 6, Ok(b"a\r\n")),
            (b"..\r\n.\r\n", 7, Ok(b".\r\n")),
            (b"..x\r\n...y\r\n.z\r\n.\r\n", 18, Ok(b".x\r\n..y\r\nz\r\n")),
            (b"a.\r\n.\r\n", 7, Ok(b"a.\r\n")),
            (b"\r\n.\r\n", 5, Ok(b"\r\n")),
            (b"a\r\n. \r\n.\r\n", 10, Ok(b"a\r\n \r\n")),
            (b"a\r\n.\r.\r\n.\r\n", 11, Err(BodyError::BareLineEnding)),
            (b"a\nb\r\n.\r\n", 8, Err(BodyError::BareLineEnding)),
            (b"a\rb\r\n.\r\n", 8, Err(BodyError::BareLineEnding)),
            (b"a\r\r\n.\r\n", 7, Err(BodyError::BareLineEnding)),
        ];
        for (input, consumed, expected) in cases {
            let text = String::from_utf8_lossy(input);
            let (n, finished, body) = decode(limits(REJECT), input);
            assert!(finished, "{text}");
            assert_eq!(n, consumed, "{text}");
            assert_eq!(body.as_deref().map_err(|e| *e), expected, "{text}");
            assert_split_invariant(limits(REJECT), input);
            assert_split_invariant(limits(NORMALISE), input);
        }
    }

    #[test]
    fn unfinished_data() {
        for input in [
            &b""[..],
            b"abc",
            b"a\r\n.",
            b"a\r\n.\r",
            b"a\r\n..\r\n",
            b"a\n.\n",
        ] {
            let mut decoder = DataDecoder::new(limits(REJECT));
            assert_eq!(decoder.feed(input), (input.len(), false));
            assert!(!decoder.is_finished());
        }
        let mut decoder = DataDecoder::new(limits(REJECT));
        assert_eq!(decoder.feed(b"x\r\n.\r"), (5, false));
        assert_eq!(decoder.feed(b"\nNOOP"), (1, true));
        assert_eq!(decoder.feed(b"NOOP"), (0, true));
        assert!(decoder.is_finished());
        assert_eq!(decoder.finish().as_deref(), Ok(&b"x\r\n"[..]));
    }

    #[test]
    fn smuggling_sequences_never_end_data() {
        let sequences: [&[u8]; 9] = [
            b"\n.\n",
            b"\r.\r",
            b"\r.\n",
            b"\n.\r",
            b"\r\n.\n",
            b"\n.\r\n",
            b"\r.\r\n",
            b"\r\n.\r",
            b"\r\n\x00.\r\n",
        ];
        let tail: &[u8] = b"MAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\nsmuggled\r\n.\r\n";
        for seq in sequences {
            let mut input = b"Subject: a\r\n\r\nbody".to_vec();
            input.extend_from_slice(seq);
            input.extend_from_slice(tail);
            let terminator = input.len();
            input.extend_from_slice(b"QUIT\r\n");
            let label = format!("{seq:?}");

            let (n, finished, body) = decode(limits(REJECT), &input);
            assert!(finished, "{label}");
            assert_eq!(
                n, terminator,
                "{label}: must end only at the real CRLF.CRLF"
            );
            if seq.contains(&0) {
                // Only proper CRLFs here: the NUL line is ordinary content, and
                // the would-be smuggled commands stay inside the message.
                let body = body.unwrap_or_else(|e| panic!("{label}: {e}"));
                assert!(body.windows(5).any(|w| w == b"\r\n\x00.\r"), "{label}");
                assert!(body.windows(15).any(|w| w == b"MAIL FROM:<x@y>"), "{label}");
            } else {
                assert_eq!(body, Err(BodyError::BareLineEnding), "{label}");
            }

            let (n, finished, body) = decode(limits(NORMALISE), &input);
            assert!(finished, "{label}");
            assert_eq!(n, terminator, "{label}");
            let body = body.unwrap_or_else(|e| panic!("{label}: {e}"));
            assert!(!has_bare_line_ending(&body), "{label}: {body:?}");
            assert!(body.ends_with(b"smuggled\r\n"), "{label}");
            assert!(
                body.windows(15).any(|w| w == b"MAIL FROM:<x@y>"),
                "{label}: smuggled command stays in the body"
            );

            assert_split_invariant(limits(REJECT), &input);
            assert_split_invariant(limits(NORMALISE), &input);
        }
    }

    #[test]
    fn normalisation() {
        let cases: [(&[u8], &[u8]); 6] = [
            (b"a\nb\r\n.\r\n", b"a\r\nb\r\n"),
            (b"a\rb\r\n.\r\n", b"a\r\nb\r\n"),
            (b"a\r\r\n.\r\n", b"a\r\n\r\n"),
            (b"a\n\nb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
            // A dot after a bare LF is not at a line start, so it stays.
            (b"a\n.b\r\n.\r\n", b"a\r\n.b\r\n"),
            (b"a\r\n.\nb\r\n.\r\n", b"a\r\n\r\nb\r\n"),
        ];
        for (input, expected) in cases {
            let (_, finished, body) = decode(limits(NORMALISE), input);
            assert!(finished);
            assert_eq!(
                body.as_deref(),
                Ok(expected),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    fn line_of(len: usize) -> Vec<u8> {
        let mut input = vec![b'x'; len];
        input.extend_from_slice(b"\r\n.\r\n");
        input
    }

    #[test]
    fn line_length() {
        let too_long = Err(BodyError::LineTooLong { max_line: 1000 });
        for mode in [REJECT, NORMALISE] {
            let (_, _, body) = decode(limits(mode), &line_of(998));
            assert_eq!(body.map(|b| b.len()), Ok(1000));
            let (n, finished, body) = decode(limits(mode), &line_of(999));
            assert!(finished);
            assert_eq!(n, 1004, "the rest of the data is still drained");
            assert_eq!(body, too_long);
            let (_, _, body) = decode(limits(mode), &[b"a\r\n", &line_of(999)[..]].concat());
            assert_eq!(body, too_long);
        }
        // Lengths count after unstuffing: a stuffed 998-octet line is 999 on the wire.
        let mut stuffed = b".".to_vec();
        stuffed.extend_from_slice(&line_of(998));
        assert_eq!(
            decode(limits(REJECT), &stuffed).2.map(|b| b.len()),
            Ok(1000)
        );
        assert_split_invariant(limits(REJECT), &line_of(999));

        let err = BodyError::LineTooLong { max_line: 1000 }.reply();
        assert_eq!(err.to_string(), "500 5.5.2 Line longer than 1000 octets");
    }

    #[test]
    fn size_limit() {
        let small = BodyLimits {
            max_size: 100,
            max_line: MAX_TEXT_LINE,
            line_endings: REJECT,
        };
        let mut exact = vec![b'y'; 98];
        exact.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(decode(small, &exact).2.map(|b| b.len()), Ok(100));

        let mut decoder = DataDecoder::new(small);
        let line = [b"z".repeat(50), b"\r\n".to_vec()].concat();
        for _ in 0..1000 {
            assert_eq!(decoder.feed(&line), (line.len(), false));
            assert!(decoder.checker.body.len() <= 100);
            assert!(decoder.checker.capacity() <= 100);
        }
        assert_eq!(decoder.feed(b".\r\n"), (3, true));
        assert_eq!(decoder.size(), 52_000);
        assert_eq!(decoder.finish(), Err(BodyError::TooLarge));

        // Normalisation grows the body; the limit applies to what is stored.
        let normalise = BodyLimits {
            line_endings: NORMALISE,
            ..small
        };
        let mut grows = b"a\n".repeat(40);
        grows.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(decode(normalise, &grows).2, Err(BodyError::TooLarge));
    }

    #[test]
    fn first_error_wins() {
        let small = BodyLimits {
            max_size: 10,
            max_line: MAX_TEXT_LINE,
            line_endings: REJECT,
        };
        let (_, _, body) = decode(small, b"a\nbbbbbbbbbbbbbbbbbbbb\r\n.\r\n");
        assert_eq!(body, Err(BodyError::BareLineEnding));
        let (_, _, body) = decode(small, b"bbbbbbbbbbbbbbbbbbbb\na\r\n.\r\n");
        assert_eq!(body, Err(BodyError::TooLarge));
    }

    fn check_chunks(limits: BodyLimits, chunks: &[&[u8]]) -> (usize, Result<Vec<u8>, BodyError>) {
        let mut checker = BodyChecker::new(limits);
        for chunk in chunks {
            checker.feed(chunk);
        }
        (checker.size(), checker.finish())
    }

    #[test]
    fn bdat_chunks() {
        type Case = (
            Vec<&'static [u8]>,
            LineEndings,
            Result<&'static [u8], BodyError>,
        );
        let cases: Vec<Case> = vec![
            (vec![b"a\r", b"\nb\r\n"], REJECT, Ok(b"a\r\nb\r\n")),
            (vec![b"a\r", b"", b"\nb\r\n"], REJECT, Ok(b"a\r\nb\r\n")),
            (vec![b"a", b"\r", b"\n", b"b"], REJECT, Ok(b"a\r\nb\r\n")),
            (vec![b"no final crlf"], REJECT, Ok(b"no final crlf\r\n")),
            (vec![b""], REJECT, Ok(b"")),
            (vec![], REJECT, Ok(b"")),
            // No dot-stuffing in BDAT.
            (vec![b".\r\n..\r\n"], REJECT, Ok(b".\r\n..\r\n")),
            (vec![b"a\r", b"b"], REJECT, Err(BodyError::BareLineEnding)),
            (vec![b"a\r"], REJECT, Err(BodyError::BareLineEnding)),
            (vec![b"a\n"], REJECT, Err(BodyError::BareLineEnding)),
            (vec![b"a\r", b"b"], NORMALISE, Ok(b"a\r\nb\r\n")),
            (vec![b"a\r"], NORMALISE, Ok(b"a\r\n")),
            (vec![b"a\r", b"\r", b"\n"], NORMALISE, Ok(b"a\r\n\r\n")),
            (vec![b"a\n", b"\n"], NORMALISE, Ok(b"a\r\n\r\n")),
        ];
        for (chunks, mode, expected) in cases {
            let (_, body) = check_chunks(limits(mode), &chunks);
            assert_eq!(body.as_deref().map_err(|e| *e), expected, "{chunks:?}");
            let joined = chunks.concat();
            let (_, one_shot) = check_chunks(limits(mode), &[&joined]);
            assert_eq!(
                one_shot.as_deref().map_err(|e| *e),
                expected,
                "{chunks:?} joined"
            );
        }
    }

    #[test]
    fn bdat_line_length_across_chunks() {
        let half = vec![b'x'; 499];
        let (_, body) = check_chunks(limits(REJECT), &[&half, &half, b"\r\n"]);
        assert_eq!(body.map(|b| b.len()), Ok(1000));
        let (size, body) = check_chunks(limits(REJECT), &[&half, &half, b"x", b"\r\nmore"]);
        assert_eq!(size, 1005);
        assert_eq!(body, Err(BodyError::LineTooLong { max_line: 1000 }));
        // An unterminated last line still counts.
        let (_, body) = check_chunks(limits(REJECT), &[&half, &half, b"x"]);
        assert_eq!(body, Err(BodyError::LineTooLong { max_line: 1000 }));
    }

    #[test]
    fn bdat_size_limit() {
        let small = BodyLimits {
            max_size: 10,
            max_line: MAX_TEXT_LINE,
            line_endings: REJECT,
        };
        assert_eq!(
            check_chunks(small, &[b"12345678", b"\r\n"])
                .1
                .map(|b| b.len()),
            Ok(10)
        );
        // The CRLF appended to an unterminated line counts too.
        assert_eq!(
            check_chunks(small, &[b"123456789"]).1,
            Err(BodyError::TooLarge)
        );
        let mut checker = BodyChecker::new(small);
        for _ in 0..100 {
            checker.feed(b"abc\r\n");
            assert!(checker.body.len() <= 10 && checker.capacity() <= 10);
        }
        assert_eq!(checker.size(), 500);
        assert_eq!(checker.finish(), Err(BodyError::TooLarge));
    }

    #[test]
    fn error_independent_of_splits() {
        let inputs: [&[u8]; 4] = [
            b"abcdefghijklmnop\r\n.\r\n",
            b"abc\r\nabcdefgh\r\n.\r\n",
            b"abcd\r\nabcd\r\nabcdef\r\n.\r\n",
            b"ab\ncdefghijklm\r\n.\r\n",
        ];
        for (max_size, max_line) in [(10, 8), (8, 10), (9, 9), (12, 8)] {
            for mode in [REJECT, NORMALISE] {
                let small = BodyLimits {
                    max_size,
                    max_line,
                    line_endings: mode,
                };
                for input in inputs {
                    assert_split_invariant(small, input);
                    let (_, one_shot) = check_chunks(small, &[input]);
                    let bytes: Vec<&[u8]> = input.chunks(1).collect();
                    assert_eq!(check_chunks(small, &bytes).1, one_shot, "{input:?}");
                }
            }
        }
    }

    #[test]
    fn error_replies() {
        let cases = [
            (
                BodyError::TooLarge,
                "552 5.3.4 Message exceeds the maximum size",
            ),
            (
                BodyError::LineTooLong { max_line: 2000 },
                "500 5.5.2 Line longer than 2000 octets",
            ),
            (
                BodyError::BareLineEnding,
                "554 5.6.0 Bare CR or LF in message data",
            ),
        ];
        for (err, text) in cases {
            assert_eq!(err.reply().to_string(), text);
        }
    }
}
