//! Fuzzes the SMTP protocol layer: command framing and parsing, DATA
//! decoding and BDAT content checking, AUTH decoding.
//!
//! The first two input bytes choose how the rest is split into reads and
//! which limits apply, so one corpus explores both.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use postern::proto::{
    decode_base64_text, decode_plain, encode_base64, parse_command, Address, BodyChecker,
    BodyError, BodyLimits, Command, CommandFramer, DataDecoder, FramedLine, LineEndings,
    ReversePath, Reply, MAX_COMMAND_LINE, MAX_TEXT_LINE,
};

fuzz_target!(|data: &[u8]| {
    let [split, config, rest @ ..] = data else {
        return;
    };
    let chunk = usize::from(split % 16) + 1;
    let limits = BodyLimits {
        max_size: [16, 100, 1024, 1 << 20][usize::from(config & 3)],
        // Short lines make the line-length rule reachable with small inputs.
        max_line: if config & 4 == 0 { MAX_TEXT_LINE } else { 8 },
        line_endings: if config & 8 == 0 {
            LineEndings::Reject
        } else {
            LineEndings::Normalise
        },
    };
    commands(rest, chunk);
    data_stream(rest, chunk, limits);
    bdat(rest, chunk, limits);
    auth(rest);
});

fn commands(data: &[u8], chunk: usize) {
    let mut framer = CommandFramer::new(MAX_COMMAND_LINE);
    let mut buf = BytesMut::new();
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        while let Some(framed) = framer.next_line(&mut buf) {
            if let FramedLine::Line(line) = framed {
                assert!(line.len() < MAX_COMMAND_LINE);
                assert!(!line.contains(&b'\n'));
                command(&line);
            }
        }
        // Whatever the input, the framer holds less than one line.
        assert!(buf.len() < MAX_COMMAND_LINE);
    }
    command(data);
}

fn command(line: &[u8]) {
    match parse_command(line) {
        Ok(Command::Mail {
            from: ReversePath::Address(address),
            ..
        })
        | Ok(Command::Rcpt { to: address }) => address_round_trip(&address),
        Ok(Command::Ehlo(name)) | Ok(Command::Helo(name)) => {
            assert!(!name.is_empty());
            assert_eq!(name.trim(), name);
        }
        Ok(_) => {}
        Err(err) => {
            let reply = err.reply();
            assert!(!reply.is_positive());
            check_reply(&reply);
        }
    }
}

fn address_round_trip(address: &Address) {
    assert!(address.local.len() <= 64 && address.domain.len() <= 255);
    assert_eq!(Address::parse(&address.to_string()).as_ref(), Ok(address));
}

fn check_reply(reply: &Reply) {
    let mut out = Vec::new();
    reply.write_to(&mut out);
    assert!(out.ends_with(b"\r\n"));
    assert!(!has_bare_line_ending(&out));
    let lines = out.windows(2).filter(|w| w == b"\r\n").count();
    assert_eq!(lines, reply.lines.len().max(1));
    assert!(!reply.to_string().contains(['\r', '\n']));
}

fn data_stream(data: &[u8], chunk: usize, limits: BodyLimits) {
    let mut one_shot = DataDecoder::new(limits);
    let (consumed, finished) = one_shot.feed(data);
    assert_eq!(one_shot.is_finished(), finished);

    // The end is exactly the first CRLF.CRLF, counting the start as after a CRLF.
    let framed = [b"\r\n", data].concat();
    match framed.windows(5).position(|w| w == b"\r\n.\r\n") {
        Some(at) => {
            assert!(finished);
            assert_eq!(consumed, at + 3);
        }
        None => {
            assert!(!finished);
            assert_eq!(consumed, data.len());
        }
    }

    let mut split = DataDecoder::new(limits);
    let mut split_consumed = 0;
    let mut split_finished = false;
    for piece in data.chunks(chunk) {
        let (n, done) = split.feed(piece);
        split_consumed += n;
        if done {
            split_finished = true;
            break;
        }
        assert_eq!(n, piece.len());
    }
    assert_eq!((split_consumed, split_finished), (consumed, finished));

    let body = one_shot.finish();
    assert_eq!(split.finish(), body);
    check_body(&body, limits);

    if let (Ok(body), LineEndings::Reject, true) = (&body, limits.line_endings, finished) {
        // Without bare line endings, the body is the content with one
        // leading dot removed from each line.
        let content = data.get(..consumed - 3).unwrap_or_default();
        let mut expected = Vec::new();
        for line in content.split_inclusive(|&b| b == b'\n') {
            expected.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
        }
        assert_eq!(body, &expected);
    }
}

fn bdat(data: &[u8], chunk: usize, limits: BodyLimits) {
    let mut one_shot = BodyChecker::new(limits);
    one_shot.feed(data);
    let mut split = BodyChecker::new(limits);
    for piece in data.chunks(chunk) {
        split.feed(piece);
    }
    assert_eq!(one_shot.size(), data.len());
    assert_eq!(split.size(), data.len());
    let body = one_shot.finish();
    assert_eq!(split.finish(), body);
    check_body(&body, limits);

    if let (Ok(body), LineEndings::Reject) = (&body, limits.line_endings) {
        let mut expected = data.to_vec();
        if !expected.is_empty() && !expected.ends_with(b"\r\n") {
            expected.extend_from_slice(b"\r\n");
        }
        assert_eq!(body, &expected);
    }
}

fn check_body(body: &Result<Vec<u8>, BodyError>, limits: BodyLimits) {
    match body {
        Ok(body) => {
            assert!(body.len() <= limits.max_size);
            assert!(!has_bare_line_ending(body));
            assert!(body.is_empty() || body.ends_with(b"\r\n"));
            for line in body.split(|&b| b == b'\n') {
                assert!(line.len() < limits.max_line);
            }
        }
        Err(BodyError::LineTooLong { max_line }) => assert_eq!(*max_line, limits.max_line),
        Err(err) => check_reply(&err.reply()),
    }
}

fn auth(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok((user, password)) = decode_plain(text) {
        assert!(!user.is_empty() && !password.is_empty());
    }
    if let Ok(decoded) = decode_base64_text(text) {
        assert_eq!(decode_base64_text(&encode_base64(&decoded)), Ok(decoded));
    }
}

fn has_bare_line_ending(bytes: &[u8]) -> bool {
    bytes.iter().enumerate().any(|(i, &b)| match b {
        b'\r' => bytes.get(i + 1) != Some(&b'\n'),
        b'\n' => i == 0 || bytes.get(i - 1) != Some(&b'\r'),
        _ => false,
    })
}
