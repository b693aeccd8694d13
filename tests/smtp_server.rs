//! The inbound SMTP server against real clients (lettre, and a byte-level client for what
//! libraries never send), with the spool checked after each exchange.

mod common;

use std::time::Duration;

use common::{contains, eventually, has_bare_cr_or_lf, Raw, TestServer, PASSWORD, USER};
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use postern::spool::{Body, QueueId, SPILL_AT};

fn lettre_message(marker: &str) -> Message {
    Message::builder()
        .from("Sender <sender@example.test>".parse::<Mailbox>().unwrap())
        .to("rcpt@dest.test".parse::<Mailbox>().unwrap())
        .subject("hello")
        .body(format!("body {marker}\r\n"))
        .unwrap()
}

fn tls_params(server: &TestServer) -> TlsParameters {
    let pem = std::fs::read(server.cert_path()).unwrap();
    TlsParameters::builder("localhost".into())
        .add_root_certificate(Certificate::from_pem(&pem).unwrap())
        .build_rustls()
        .unwrap()
}

#[tokio::test]
async fn lettre_plain_relay_is_spooled_with_trace_header() {
    let server = TestServer::start("").await;
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.relay.port())
        .build();
    let response = mailer.send(lettre_message("M-plain")).await.unwrap();
    assert_eq!(response.code().to_string(), "250");

    let msgs = server.messages().await;
    assert_eq!(msgs.len(), 1);
    let m = &msgs[0];
    assert_eq!(m.envelope.mail_from, "sender@example.test");
    assert_eq!(m.envelope.recipients, vec!["rcpt@dest.test"]);
    assert!(m.envelope.auth_user.is_none());
    let body = String::from_utf8_lossy(&m.body);
    assert!(body.starts_with("Received: from "), "{body}");
    assert!(
        body.contains("by postern.example.test (Postern) with ESMTP\r\n"),
        "{body}"
    );
    assert!(body.contains(&format!("id {};", m.id)));
    assert!(body.contains("Subject: hello\r\n"));
    assert!(body.contains("\r\n\r\nbody M-plain\r\n"), "{body:?}");
    assert!(!has_bare_cr_or_lf(&m.body));
}

#[tokio::test]
async fn lettre_starttls_and_auth_on_submission() {
    let server = TestServer::start("").await;
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.submission.port())
        .tls(Tls::Required(tls_params(&server)))
        .credentials(Credentials::new(USER.into(), PASSWORD.into()))
        .authentication(vec![Mechanism::Plain])
        .build();
    mailer.send(lettre_message("M-587")).await.unwrap();

    let m = &server.messages().await[0];
    assert_eq!(m.envelope.auth_user.as_deref(), Some(USER));
    let body = String::from_utf8_lossy(&m.body);
    assert!(body.contains("with ESMTPSA\r\n\t(using TLSv1.3 "), "{body}");
}

#[tokio::test]
async fn lettre_implicit_tls_with_login_on_submissions() {
    let server = TestServer::start("").await;
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.submissions.port())
        .tls(Tls::Wrapper(tls_params(&server)))
        .credentials(Credentials::new(USER.into(), PASSWORD.into()))
        .authentication(vec![Mechanism::Login])
        .build();
    mailer.send(lettre_message("M-465")).await.unwrap();
    let m = &server.messages().await[0];
    assert_eq!(m.envelope.auth_user.as_deref(), Some(USER));
    assert!(contains(&m.body, b"(using TLSv1.3 "));
}

#[tokio::test]
async fn lettre_wrong_password_is_refused() {
    let server = TestServer::start("").await;
    let mailer = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.submissions.port())
        .tls(Tls::Wrapper(tls_params(&server)))
        .credentials(Credentials::new(USER.into(), "wrong".into()))
        .authentication(vec![Mechanism::Plain])
        .build();
    let err = mailer.send(lettre_message("x")).await.unwrap_err();
    assert_eq!(err.status().map(|c| c.to_string()).as_deref(), Some("535"));
    assert!(server.messages().await.is_empty());
}

#[tokio::test]
async fn submission_requires_tls_for_auth_and_auth_for_mail() {
    let server = TestServer::start("").await;
    let (mut c, greeting) = Raw::connect(server.submission).await;
    assert_eq!(greeting.code, 220);
    let ehlo = c.expect("EHLO client.test", 250).await;
    assert!(ehlo.text.contains("STARTTLS"));
    assert!(
        !ehlo.text.contains("AUTH"),
        "AUTH is not offered in the clear"
    );
    let r = c.expect("AUTH PLAIN AGFwcABwdw==", 538).await;
    assert_eq!(r.enhanced(), "5.7.11");
    let r = c.expect("MAIL FROM:<a@example.test>", 530).await;
    assert_eq!(r.enhanced(), "5.7.0");

    c.expect("STARTTLS", 220).await;
    let mut c = c.tls(server.client_tls()).await;
    let ehlo = c.expect("EHLO client.test", 250).await;
    assert!(ehlo.text.contains("AUTH PLAIN LOGIN"));
    assert!(!ehlo.text.contains("STARTTLS"));
    c.expect("MAIL FROM:<a@example.test>", 530).await;
    let plain = postern::proto::encode_base64(&format!("\0{USER}\0{PASSWORD}"));
    let r = c.expect(&format!("AUTH PLAIN {plain}"), 235).await;
    assert_eq!(r.enhanced(), "2.7.0");
    c.expect("AUTH PLAIN AGFwcABwdw==", 503).await;
    let r = c
        .send_mail(
            "a@example.test",
            &["b@dest.test"],
            "Subject: x\r\n\r\nauthed\r\n",
        )
        .await;
    assert_eq!(r.code, 250, "{r:?}");
}

#[tokio::test]
async fn auth_login_challenge_and_cancel() {
    let server = TestServer::start("").await;
    // Implicit TLS: the greeting only comes after the handshake.
    let stream = tokio::net::TcpStream::connect(server.submissions)
        .await
        .unwrap();
    let connector = tokio_rustls::TlsConnector::from(server.client_tls());
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, stream).await.unwrap();
    let mut c = Raw {
        io: tokio::io::BufReader::new(tls),
    };
    assert_eq!(c.reply().await.code, 220);
    c.expect("EHLO client.test", 250).await;
    let r = c.expect("AUTH LOGIN", 334).await;
    assert_eq!(r.text, "VXNlcm5hbWU6");
    c.expect("*", 501).await;
    c.expect("AUTH LOGIN", 334).await;
    c.expect(&postern::proto::encode_base64(USER), 334).await;
    let r = c.expect(&postern::proto::encode_base64("nope"), 535).await;
    assert_eq!(r.enhanced(), "5.7.8");
    c.expect("AUTH LOGIN", 334).await;
    c.expect(&postern::proto::encode_base64(USER), 334).await;
    c.expect(&postern::proto::encode_base64(PASSWORD), 235)
        .await;
}

#[tokio::test]
async fn pipelined_commands_get_replies_in_order() {
    let server = TestServer::start("").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    let ehlo = c.expect("EHLO client.test", 250).await;
    for kw in [
        "PIPELINING",
        "SIZE 36700160",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "STARTTLS",
    ] {
        assert!(
            ehlo.text.lines().any(|l| l == kw),
            "{kw} missing from {ehlo:?}"
        );
    }
    c.send(
        "MAIL FROM:<a@example.test>\r\nRCPT TO:<b@dest.test>\r\nRCPT TO:<c@dest.test>\r\nDATA\r\n",
    )
    .await;
    let codes: Vec<u16> = [
        c.reply().await,
        c.reply().await,
        c.reply().await,
        c.reply().await,
    ]
    .iter()
    .map(|r| r.code)
    .collect();
    assert_eq!(codes, vec![250, 250, 250, 354]);
    // Body, end of data and the next transaction's commands in one write.
    c.send("Subject: p\r\n\r\n..dot\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n")
        .await;
    let r = c.reply().await;
    assert_eq!((r.code, r.enhanced()), (250, "2.0.0"));
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(c.reply().await.code, 221);
    let m = &server.messages().await[0];
    assert_eq!(m.envelope.recipients.len(), 2);
    assert!(m.body.ends_with(b"\r\n\r\n.dot\r\n"), "dot-unstuffed");
}

#[tokio::test]
async fn bdat_chunks_are_joined() {
    let server = TestServer::start("").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@example.test>", 250).await;
    c.expect("RCPT TO:<b@dest.test>", 250).await;
    let part1 = "Subject: chunked\r\n\r\nfirst ";
    let part2 = "half, second half\r\n.not stuffed\r\n";
    c.send(format!("BDAT {}\r\n{part1}", part1.len())).await;
    let r = c.reply().await;
    assert_eq!((r.code, r.enhanced()), (250, "2.0.0"));
    c.send(format!("BDAT {} LAST\r\n{part2}", part2.len()))
        .await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    assert!(r.text.contains("queued as"));
    let m = &server.messages().await[0];
    assert!(m.body.ends_with(format!("{part1}{part2}").as_bytes()));

    // BDAT without a transaction: the chunk is still consumed, then refused.
    c.send("BDAT 6 LAST\r\nNOOP\r\n").await;
    assert_eq!(c.reply().await.code, 503);
    assert_eq!(c.expect("NOOP", 250).await.enhanced(), "2.0.0");
    // DATA after BDAT in one transaction is refused.
    c.expect("MAIL FROM:<a@example.test>", 250).await;
    c.expect("RCPT TO:<b@dest.test>", 250).await;
    c.send("BDAT 3\r\nabc").await;
    assert_eq!(c.reply().await.code, 250);
    c.expect("DATA", 503).await;
}

#[tokio::test]
async fn smtputf8_and_8bitmime() {
    let server = TestServer::start("").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    let r = c.expect("MAIL FROM:<jörg@example.test>", 553).await;
    assert_eq!(r.enhanced(), "5.6.7");
    c.expect("MAIL FROM:<a@example.test>", 250).await;
    let r = c.expect("RCPT TO:<用户@例子.test>", 553).await;
    assert_eq!(r.enhanced(), "5.6.7");
    c.expect("RSET", 250).await;
    c.expect("MAIL FROM:<jörg@example.test> SMTPUTF8 BODY=8BITMIME", 250)
        .await;
    c.expect("RCPT TO:<用户@例子.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: Grüße\r\n\r\nKäse €\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    let m = &server.messages().await[0];
    assert!(m.envelope.smtputf8 && m.envelope.eight_bit);
    assert_eq!(m.envelope.recipients, vec!["用户@例子.test"]);
    assert!(contains(&m.body, "Käse €\r\n".as_bytes()));
    assert!(contains(&m.body, b"with UTF8SMTP\r\n"));
}

#[tokio::test]
async fn command_line_limit() {
    let server = TestServer::start("").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    let r = c.cmd(&format!("NOOP {}", "x".repeat(600))).await;
    assert_eq!((r.code, r.enhanced()), (500, "5.5.2"));
    // The session is still in step: the next command is answered normally.
    c.expect("NOOP", 250).await;
    // 512 octets including CRLF is allowed.
    c.expect(&format!("NOOP {}", "x".repeat(505)), 250).await;
}

#[tokio::test]
async fn text_line_over_1000_octets_is_refused_and_not_queued() {
    let server = TestServer::start("").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    let ok = format!("Subject: x\r\n\r\n{}\r\n", "a".repeat(998));
    assert_eq!(
        c.send_mail("a@example.test", &["b@dest.test"], &ok)
            .await
            .code,
        250
    );
    let long = format!("Subject: x\r\n\r\n{}\r\n", "a".repeat(999));
    let r = c.send_mail("a@example.test", &["b@dest.test"], &long).await;
    assert_eq!((r.code, r.enhanced()), (500, "5.5.2"));
    assert_eq!(
        server.messages().await.len(),
        1,
        "only the 998-octet message is queued"
    );
    c.expect("NOOP", 250).await;
}

#[tokio::test]
async fn size_limits() {
    let server = TestServer::start("[limits]\nmax_message_size = 10000\n").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    let ehlo = c.expect("EHLO client.test", 250).await;
    assert!(ehlo.text.contains("SIZE 10000"));
    let r = c.expect("MAIL FROM:<a@example.test> SIZE=10001", 552).await;
    assert_eq!(r.enhanced(), "5.3.4");
    // Declared small, sent large: refused after the data is drained, session still usable.
    let big = format!("Subject: x\r\n\r\n{}", "0123456789abcdef\r\n".repeat(2000));
    let r = c.send_mail("a@example.test", &["b@dest.test"], &big).await;
    assert_eq!((r.code, r.enhanced()), (552, "5.3.4"));
    c.expect("NOOP", 250).await;
    // The same over BDAT.
    c.expect("MAIL FROM:<a@example.test>", 250).await;
    c.expect("RCPT TO:<b@dest.test>", 250).await;
    c.send(format!("BDAT {} LAST\r\n{big}", big.len())).await;
    let r = c.reply().await;
    assert_eq!((r.code, r.enhanced()), (552, "5.3.4"));
    c.expect("NOOP", 250).await;
    assert!(server.messages().await.is_empty());
}

#[tokio::test]
async fn too_many_recipients() {
    let server = TestServer::start("[limits]\nmax_recipients = 3\n").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@example.test>", 250).await;
    for i in 0..3 {
        c.expect(&format!("RCPT TO:<r{i}@dest.test>"), 250).await;
    }
    let r = c.expect("RCPT TO:<r3@dest.test>", 452).await;
    assert_eq!(r.enhanced(), "4.5.3");
    c.expect("DATA", 354).await;
    c.send("Subject: x\r\n\r\nbody\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(server.messages().await[0].envelope.recipients.len(), 3);
}

#[tokio::test]
async fn idle_session_times_out_with_421() {
    let server = TestServer::start("[limits]\ncommand_timeout = \"1s\"\n").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    let r = c.reply().await;
    assert_eq!((r.code, r.enhanced()), (421, "4.4.2"));
    assert!(c.try_reply().await.is_none(), "closed after 421");
}

#[tokio::test]
async fn stalled_data_times_out_with_421_after_data_timeout() {
    // The command timeout is far longer: a 421 within seconds can only be the data timeout.
    let server =
        TestServer::start("[limits]\ncommand_timeout = \"60s\"\ndata_timeout = \"1s\"\n").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@example.test>", 250).await;
    c.expect("RCPT TO:<b@dest.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: stalled\r\n\r\nhalf a mess").await;
    let start = std::time::Instant::now();
    let r = c.reply().await;
    let waited = start.elapsed();
    assert_eq!((r.code, r.enhanced()), (421, "4.4.2"), "{r:?}");
    assert!(
        waited >= std::time::Duration::from_millis(900),
        "before the timeout: {waited:?}"
    );
    assert!(c.try_reply().await.is_none(), "the connection is closed");
    assert!(server.spool.live().is_empty(), "nothing of it is queued");
}

#[tokio::test]
async fn connection_cap_answers_421() {
    let server = TestServer::start("[limits]\nmax_connections = 2\n").await;
    let (_a, ga) = Raw::connect(server.relay).await;
    let (_b, gb) = Raw::connect(server.submission).await;
    assert_eq!((ga.code, gb.code), (220, 220));
    let (mut c, gc) = Raw::connect(server.relay).await;
    assert_eq!((gc.code, gc.enhanced()), (421, "4.7.0"));
    assert!(c.try_reply().await.is_none());
}

#[tokio::test]
async fn sequence_errors_and_misc_commands() {
    let server = TestServer::start("").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("MAIL FROM:<a@example.test>", 503).await;
    c.expect("HELO client.test", 250).await;
    c.expect("RCPT TO:<b@dest.test>", 503).await;
    c.expect("DATA", 503).await;
    c.expect("MAIL FROM:<a@example.test>", 250).await;
    c.expect("MAIL FROM:<a@example.test>", 503).await;
    let r = c.expect("DATA", 554).await;
    assert_eq!(r.enhanced(), "5.5.1");
    assert_eq!(c.expect("VRFY someone", 252).await.enhanced(), "2.5.2");
    assert_eq!(c.expect("HELP", 214).await.enhanced(), "2.0.0");
    assert_eq!(c.expect("FROB", 500).await.enhanced(), "5.5.1");
    assert_eq!(c.expect("MAIL FROM:<>", 503).await.code, 503);
    c.expect("RSET", 250).await;
    c.expect("MAIL FROM:<>", 250).await;
    assert_eq!(
        c.expect("RCPT TO:<b@dest.test> NOTIFY=NEVER", 555)
            .await
            .enhanced(),
        "5.5.4"
    );
    assert_eq!(c.expect("QUIT", 221).await.enhanced(), "2.0.0");
}

#[tokio::test]
async fn too_many_errors_close_the_session() {
    let server = TestServer::start("[limits]\nmax_errors = 3\n").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("BAD1", 500).await;
    c.expect("BAD2", 500).await;
    c.send("BAD3\r\n").await;
    assert_eq!(c.reply().await.code, 500);
    let r = c.reply().await;
    assert_eq!((r.code, r.enhanced()), (421, "4.7.0"));
    assert!(c.try_reply().await.is_none());
}

#[tokio::test]
async fn no_open_relay_for_outside_clients() {
    // Loopback is not in the relay networks here, so this client is "outside".
    let server = TestServer::start("[relay]\nnetworks = [\"192.0.2.0/24\"]\n").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@example.test>", 250).await;
    for rcpt in [
        "<victim@dest.test>",
        "<victim%other.test@dest.test>",
        "<\"victim@other.test\"@dest.test>",
        "<VICTIM@[192.0.2.7]>",
    ] {
        let r = c.expect(&format!("RCPT TO:{rcpt}"), 554).await;
        assert_eq!(r.enhanced(), "5.7.1", "{rcpt}");
    }
    for rcpt in [
        "<dest.test!victim>",
        "<@relay.test:victim@dest.test>",
        "<victim>",
    ] {
        let r = c.expect(&format!("RCPT TO:{rcpt}"), 553).await;
        assert_eq!(r.enhanced(), "5.1.3", "{rcpt}");
    }
    c.expect("DATA", 554).await;
    assert!(server.messages().await.is_empty());
}

/// Sends `Subject`, a smuggling sequence, an embedded second transaction, then the real end.
async fn smuggle(server: &TestServer, seq: &[u8]) -> (Vec<u16>, usize) {
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@example.test>", 250).await;
    c.expect("RCPT TO:<b@dest.test>", 250).await;
    c.expect("DATA", 354).await;
    let mut payload = b"Subject: first\r\n\r\nfirst body".to_vec();
    payload.extend_from_slice(seq);
    payload.extend_from_slice(
        b"MAIL FROM:<evil@example.test>\r\nRCPT TO:<victim@dest.test>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n",
    );
    c.send(&payload).await;
    let mut codes = vec![c.reply().await.code];
    // Anything the server parsed as extra commands would produce more replies; NOOP marks the end.
    c.send("NOOP\r\n").await;
    loop {
        let r = c.reply().await;
        if r.code == 250 && r.text.starts_with("2.0.0 OK") && r.text.len() == 8 {
            break;
        }
        codes.push(r.code);
    }
    (codes, server.messages().await.len())
}

const SMUGGLING: &[&[u8]] = &[
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

#[tokio::test]
async fn smtp_smuggling_is_impossible_with_reject() {
    for seq in SMUGGLING {
        let server = TestServer::start("").await;
        let (codes, queued) = smuggle(&server, seq).await;
        assert_eq!(
            codes.len(),
            1,
            "{seq:?}: one reply to the whole data, got {codes:?}"
        );
        assert!(queued <= 1, "{seq:?}");
        for m in server.messages().await {
            assert!(!has_bare_cr_or_lf(&m.body), "{seq:?}");
            assert_eq!(m.envelope.mail_from, "a@example.test");
        }
        if seq.contains(&b'\0') {
            assert_eq!((codes[0], queued), (250, 1), "NUL is not a line ending");
        } else {
            assert_eq!((codes[0], queued), (554, 0), "{seq:?}: bare CR/LF refused");
        }
    }
}

#[tokio::test]
async fn smtp_smuggling_is_impossible_with_normalise() {
    for seq in SMUGGLING {
        let server = TestServer::start("[limits]\nline_endings = \"normalise\"\n").await;
        let (codes, queued) = smuggle(&server, seq).await;
        assert_eq!(codes, vec![250], "{seq:?}");
        assert_eq!(queued, 1, "{seq:?}");
        let m = &server.messages().await[0];
        assert!(
            !has_bare_cr_or_lf(&m.body),
            "{seq:?}: {:?}",
            String::from_utf8_lossy(&m.body)
        );
        assert_eq!(m.envelope.recipients, vec!["b@dest.test"], "{seq:?}");
        assert!(
            contains(&m.body, b"MAIL FROM:<evil@example.test>"),
            "kept as content"
        );
    }
}

#[tokio::test]
async fn starttls_discards_pipelined_plaintext() {
    let server = TestServer::start("").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    // HELP answers 214, which nothing we send inside TLS does: replies come in order, so had
    // the injected HELP run inside TLS, its 214 would come before the reply to our EHLO.
    c.send("STARTTLS\r\nHELP\r\n").await;
    assert_eq!(c.reply().await.code, 220);
    let mut c = c.tls(server.client_tls()).await;
    let ehlo = c.cmd("EHLO client.test").await;
    assert_eq!(ehlo.code, 250, "the first reply inside TLS: {ehlo:?}");
    assert!(ehlo.text.contains("PIPELINING"), "{ehlo:?}");
    assert!(!ehlo.text.contains("STARTTLS"));
    let noop = c.cmd("NOOP").await;
    assert_eq!(
        noop.code, 250,
        "no late reply to the injected command: {noop:?}"
    );
    // The session was reset: MAIL is accepted as a fresh transaction.
    c.expect("MAIL FROM:<a@example.test>", 250).await;
}

#[tokio::test]
async fn data_directory_holds_no_address_or_body_in_clear() {
    let server = TestServer::start("").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    let r = c
        .send_mail(
            "secret-sender@example.test",
            &["secret-rcpt@dest.test"],
            "Subject: private\r\n\r\nBODY-MARKER-4417\r\n",
        )
        .await;
    assert_eq!(r.code, 250);
    assert_eq!(
        server.messages().await.len(),
        1,
        "the message is there, sealed"
    );
    let raw = common::all_bytes(&server.data_dir());
    assert!(raw.len() > 100);
    for needle in [
        "secret-rcpt",
        "secret-sender",
        "dest.test",
        "BODY-MARKER-4417",
        "private",
    ] {
        assert!(
            !contains(&raw, needle.as_bytes()),
            "{needle} found in clear"
        );
    }
}

#[tokio::test]
async fn graceful_shutdown_says_421_to_idle_sessions() {
    let server = TestServer::start("").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    let admin_socket = server.data_dir().join("admin.sock");
    assert!(admin_socket.exists());
    server.shutdown.cancel();
    let r = c.reply().await;
    assert_eq!((r.code, r.enhanced()), (421, "4.3.2"));
    tokio::time::timeout(std::time::Duration::from_secs(5), server.task)
        .await
        .expect("server stops")
        .unwrap();
    assert!(
        !admin_socket.exists(),
        "the admin socket is removed on a clean stop"
    );
}

#[tokio::test]
async fn a_second_daemon_on_the_same_data_directory_is_refused() {
    let server = TestServer::start("").await;
    let text = common::config_text(server.dir.path(), "");
    let config = postern::config::Config::parse(&text, "second", server.dir.path()).unwrap();
    let err = postern::daemon::Daemon::start(config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("another postern runs on this data directory"),
        "{err}"
    );
    // The first one is unharmed.
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    let r = c
        .send_mail(
            "a@example.test",
            &["b@dest.test"],
            "Subject: x\r\n\r\nx\r\n",
        )
        .await;
    assert_eq!(r.code, 250);
}

/// Bytes in the spool's body files now, and how many there are.
fn body_files(server: &TestServer) -> (u64, usize) {
    let dir = server.data_dir().join("spool/bodies");
    let sizes: Vec<u64> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .collect();
    (sizes.iter().sum(), sizes.len())
}

/// A body past `SPILL_AT` goes to its body file as it arrives: with half of a 2 MiB body sent
/// and the data not ended, nearly all of that half is on disk already (the session holds a
/// chunk at a time). It reads back exactly, from the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_body_goes_to_disk_as_it_arrives() {
    let server = TestServer::start("").await;
    let line = format!("{}\r\n", "z".repeat(76));
    let body = format!("Subject: big\r\n\r\n{}", line.repeat((2 << 20) / 78));
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO a.test", 250).await;
    c.expect("MAIL FROM:<a@sender.test>", 250).await;
    c.expect("RCPT TO:<r@dest.test>", 250).await;
    c.expect("DATA", 354).await;
    let half = body.len() / 2;
    c.send(&body[..half]).await;
    let spilled = (half - 2 * SPILL_AT) as u64;
    assert!(
        eventually(Duration::from_secs(10), || body_files(&server).0 >= spilled).await,
        "before the end of the data, the body is on disk: {:?}",
        body_files(&server)
    );
    c.send(format!("{}.\r\n", &body[half..])).await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    let id: QueueId = r.text.rsplit(' ').next().unwrap().parse().unwrap();
    let msg = server.spool.read(id).await.unwrap();
    assert!(matches!(msg.body, Body::Spilled(_)), "{:?}", msg.body);
    assert_eq!(
        msg.body.len(),
        server.spool.read_whole(id).await.unwrap().body.len() as u64
    );
    let stored = server.spool.read_whole(id).await.unwrap().body;
    assert!(stored.ends_with(body.as_bytes()), "reads back exactly");
    assert!(stored.starts_with(b"Received: "));
}

/// BDAT chunks add up past `SPILL_AT` as DATA does; a body just under it stays in the record.
#[tokio::test]
async fn bdat_bodies_spill_too_and_small_ones_stay_inline() {
    let server = TestServer::start("").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO a.test", 250).await;
    let chunk = format!(
        "Subject: part\r\n\r\n{}",
        format!("{}\r\n", "b".repeat(98)).repeat(2000)
    );
    let mut sent = String::new();
    c.expect("MAIL FROM:<a@sender.test>", 250).await;
    c.expect("RCPT TO:<r@dest.test>", 250).await;
    for last in [false, false, true] {
        let verb = if last { " LAST" } else { "" };
        c.send(format!("BDAT {}{verb}\r\n{chunk}", chunk.len()))
            .await;
        sent.push_str(&chunk);
        let r = c.reply().await;
        assert_eq!(r.code, 250, "{r:?}");
        if last {
            let id: QueueId = r.text.rsplit(' ').next().unwrap().parse().unwrap();
            let msg = server.spool.read(id).await.unwrap();
            assert!(matches!(msg.body, Body::Spilled(_)));
            let stored = server.spool.read_whole(id).await.unwrap().body;
            assert!(stored.ends_with(sent.as_bytes()));
        }
    }
    // 250,000 bytes: under the 256 KiB threshold, as the README promises.
    let small = format!(
        "Subject: small\r\n\r\n{}",
        format!("{}\r\n", "s".repeat(98)).repeat(2_500)
    );
    let r = c.send_mail("a@sender.test", &["r@dest.test"], &small).await;
    let id: QueueId = r.text.rsplit(' ').next().unwrap().parse().unwrap();
    let msg = server.spool.read(id).await.unwrap();
    assert!(matches!(msg.body, Body::Inline(_)));
    assert_eq!(body_files(&server).1, 1, "only the big one has a body file");
}

/// An upload that ends without a message leaves no body file: a client gone mid-data, a
/// message over the size limit, a BDAT transaction reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unfinished_big_upload_leaves_no_body_file() {
    let server = TestServer::start("[limits]\nmax_message_size = 1048576\n").await;
    let body = format!(
        "Subject: big\r\n\r\n{}",
        format!("{}\r\n", "q".repeat(70)).repeat(10_000)
    );
    let (mut gone, _) = Raw::connect(server.relay).await;
    gone.expect("EHLO a.test", 250).await;
    gone.expect("MAIL FROM:<a@sender.test>", 250).await;
    gone.expect("RCPT TO:<r@dest.test>", 250).await;
    gone.expect("DATA", 354).await;
    gone.send(&body[..700_000]).await;
    assert!(eventually(Duration::from_secs(10), || body_files(&server).1 == 1).await);
    drop(gone);
    assert!(
        eventually(Duration::from_secs(10), || body_files(&server).1 == 0).await,
        "the file of an upload whose client went away is removed"
    );

    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO a.test", 250).await;
    let huge = format!(
        "Subject: huge\r\n\r\n{}",
        format!("{}\r\n", "h".repeat(70)).repeat(30_000)
    );
    let r = c.send_mail("a@sender.test", &["r@dest.test"], &huge).await;
    assert_eq!((r.code, r.enhanced()), (552, "5.3.4"));
    assert_eq!(body_files(&server).1, 0, "too big: no file left");

    c.expect("MAIL FROM:<a@sender.test>", 250).await;
    c.expect("RCPT TO:<r@dest.test>", 250).await;
    let part = format!("{}\r\n", "p".repeat(70)).repeat(5000);
    c.send(format!("BDAT {}\r\n{part}", part.len())).await;
    assert_eq!(c.reply().await.code, 250);
    assert_eq!(body_files(&server).1, 1, "the BDAT body is on disk");
    c.expect("RSET", 250).await;
    assert_eq!(body_files(&server).1, 0, "reset: no file left");
    assert!(server.spool.live().is_empty());
}
