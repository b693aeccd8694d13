//! Hostile clients: password guessing, connection floods, idle sessions, malformed input.
//! Time-dependent limits run on a manual clock.

mod common;

use std::sync::Arc;

use common::{submit, Raw, Reply, TestServer, PASSWORD, USER};
use postern::clock::{Clock, ManualClock, SystemClock};

/// A server on a manual clock; `extra` is appended to the test configuration.
async fn start_on_clock(extra: &str) -> (TestServer, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(SystemClock.now()));
    let options = postern::daemon::Options {
        clock: clock.clone(),
        run_queue: false,
        ..Default::default()
    };
    let (server, _queue) = TestServer::start_with(extra, options).await;
    (server, clock)
}

fn plain(user: &str, password: &str) -> String {
    postern::proto::encode_base64(&format!("\0{user}\0{password}"))
}

/// Logs in from `source` over STARTTLS on the submission port; returns the reply to AUTH and
/// whether the server closed the connection after it.
async fn login(server: &TestServer, source: &str, password: &str) -> (Reply, bool) {
    let (mut c, greeting) = Raw::connect_from(source, server.submission).await;
    assert_eq!(greeting.map(|g| g.code), Some(220));
    c.expect("EHLO client.test", 250).await;
    c.expect("STARTTLS", 220).await;
    let mut c = c.tls(server.client_tls()).await;
    c.expect("EHLO client.test", 250).await;
    let reply = c
        .cmd(&format!("AUTH PLAIN {}", plain(USER, password)))
        .await;
    let closed = if reply.code == 421 {
        c.try_reply().await.is_none()
    } else {
        c.cmd("NOOP").await.code != 250
    };
    (reply, closed)
}

#[tokio::test]
async fn brute_force_locks_the_address_until_the_cooldown_passes() {
    let (server, clock) = start_on_clock(
        "[limits]\nmax_auth_failures = 3\nauth_cooldown = \"10m\"\nauth_failure_delay = \"10ms\"\n",
    )
    .await;
    for _ in 0..2 {
        let (r, _) = login(&server, "127.0.0.1", "wrong").await;
        assert_eq!((r.code, r.enhanced()), (535, "5.7.8"), "{r:?}");
    }
    // The third failure reaches the limit: refused and closed.
    let (r, closed) = login(&server, "127.0.0.1", "wrong").await;
    assert_eq!((r.code, r.enhanced()), (421, "4.7.0"), "{r:?}");
    assert!(r.text.contains("failed logins"), "{r:?}");
    assert!(closed);
    // N+1: still refused, and so is the right password, before any check.
    let (r, _) = login(&server, "127.0.0.1", "wrong again").await;
    assert_eq!((r.code, r.enhanced()), (421, "4.7.0"), "{r:?}");
    let (r, closed) = login(&server, "127.0.0.1", PASSWORD).await;
    assert_eq!((r.code, r.enhanced()), (421, "4.7.0"), "{r:?}");
    assert!(closed);
    // Another address is not affected.
    let (r, _) = login(&server, "127.0.0.2", PASSWORD).await;
    assert_eq!(r.code, 235, "{r:?}");
    // Just before the cool-down ends: still refused; once it has passed: accepted.
    clock.advance(599);
    let (r, _) = login(&server, "127.0.0.1", PASSWORD).await;
    assert_eq!(r.code, 421, "{r:?}");
    clock.advance(600);
    let (r, closed) = login(&server, "127.0.0.1", PASSWORD).await;
    assert_eq!((r.code, r.enhanced()), (235, "2.7.0"), "{r:?}");
    assert!(!closed);
}

/// Only 127.0.0.1 may relay, so 127.0.0.2 and .3 are outside clients subject to the caps.
const OUTSIDERS: &str = "[relay]\nnetworks = [\"127.0.0.1/32\"]\n";

#[tokio::test]
async fn one_address_cannot_hold_more_than_its_connections() {
    let server = TestServer::start(&format!(
        "{OUTSIDERS}[limits]\nmax_connections_per_ip = 2\nconnections_per_ip_per_minute = 100000\n"
    ))
    .await;
    let (mut a, g1) = Raw::connect_from("127.0.0.2", server.relay).await;
    let (_b, g2) = Raw::connect_from("127.0.0.2", server.relay).await;
    assert_eq!((g1.unwrap().code, g2.unwrap().code), (220, 220));
    let (mut c, g3) = Raw::connect_from("127.0.0.2", server.relay).await;
    let g3 = g3.expect("a reply before the close");
    assert_eq!((g3.code, g3.enhanced()), (421, "4.7.0"), "{g3:?}");
    assert!(c.try_reply().await.is_none(), "closed after the 421");
    // Other addresses, trusted or not, still get in.
    let (_d, g) = Raw::connect_from("127.0.0.3", server.relay).await;
    assert_eq!(g.unwrap().code, 220);
    let mut trusted = Vec::new();
    for _ in 0..3 {
        let (t, g) = Raw::connect_from("127.0.0.1", server.relay).await;
        assert_eq!(g.unwrap().code, 220);
        trusted.push(t);
    }
    // A slot is freed when its session ends.
    a.expect("QUIT", 221).await;
    assert!(a.try_reply().await.is_none());
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (_e, g) = Raw::connect_from("127.0.0.2", server.relay).await;
        let code = g.map(|g| g.code);
        if code == Some(220) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "slot never freed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn connection_rate_is_capped_per_minute_on_the_clock() {
    let (server, clock) = start_on_clock(&format!(
        "{OUTSIDERS}[limits]\nconnections_per_ip_per_minute = 3\n"
    ))
    .await;
    for _ in 0..3 {
        let (mut c, g) = Raw::connect_from("127.0.0.2", server.relay).await;
        assert_eq!(g.unwrap().code, 220);
        c.expect("QUIT", 221).await;
    }
    let (_, g) = Raw::connect_from("127.0.0.2", server.relay).await;
    let g = g.expect("a reply");
    assert_eq!((g.code, g.enhanced()), (421, "4.7.0"), "{g:?}");
    assert!(g.text.contains("per minute"), "{g:?}");
    clock.advance(60);
    let (_, g) = Raw::connect_from("127.0.0.2", server.relay).await;
    assert_eq!(g.unwrap().code, 220);
}

#[tokio::test]
async fn commands_that_do_no_work_have_a_budget_renewed_by_a_message() {
    let server = TestServer::start("[limits]\nmax_idle_commands = 4\n").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("NOOP", 250).await;
    c.expect("RSET", 250).await;
    c.expect("VRFY someone", 252).await;
    let r = c
        .send_mail(
            "a@example.test",
            &["b@dest.test"],
            "Subject: x\r\n\r\nx\r\n",
        )
        .await;
    assert_eq!(r.code, 250);
    for _ in 0..4 {
        c.expect("NOOP", 250).await;
    }
    let r = c.cmd("NOOP").await;
    assert_eq!((r.code, r.enhanced()), (421, "4.7.0"), "{r:?}");
    assert!(c.try_reply().await.is_none(), "closed after the 421");
}

#[tokio::test]
async fn pipelined_commands_past_the_budget_are_not_executed() {
    let server = TestServer::start("[limits]\nmax_idle_commands = 50\n").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    // 200 NOOPs in one write, small enough to be read at once (no reset on close).
    c.send("NOOP\r\n".repeat(200)).await;
    let mut replies = Vec::new();
    while let Some(r) = c.try_reply().await {
        replies.push(r.code);
    }
    assert_eq!(replies.len(), 51, "{replies:?}");
    assert!(replies[..50].iter().all(|&c| c == 250));
    assert_eq!(replies[50], 421);
}

#[tokio::test]
async fn a_client_that_never_reads_replies_is_not_buffered() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start("[limits]\nmax_idle_commands = 100000000\n").await;
    let stream = tokio::net::TcpStream::connect(server.relay).await.unwrap();
    let (_read, mut write) = stream.into_split();
    // 64 MiB of NOOPs, never reading a reply. A server that kept reading would take them
    // all in well under a second; ours stops reading once its replies cannot be written,
    // so the sender stalls when the socket buffers (a few MiB each way) are full.
    let chunk = "NOOP\r\n".repeat(64 << 10 >> 3).into_bytes();
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent.clone();
    let writer = tokio::spawn(async move {
        for _ in 0..(64 << 20) / chunk.len() {
            if write.write_all(&chunk).await.is_err() {
                return;
            }
            counter.fetch_add(chunk.len(), std::sync::atomic::Ordering::Relaxed);
        }
    });
    let finished = tokio::time::timeout(std::time::Duration::from_secs(3), writer).await;
    let sent = sent.load(std::sync::atomic::Ordering::Relaxed);
    assert!(finished.is_err(), "the server took all {sent} bytes");
    assert!(
        sent < 32 << 20,
        "{sent} bytes taken by a client that reads nothing"
    );
}

#[tokio::test]
async fn a_session_has_a_deadline_however_active() {
    let server =
        TestServer::start("[limits]\nsession_timeout = \"1s\"\nmax_idle_commands = 100000000\n")
            .await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    let started = std::time::Instant::now();
    let last = loop {
        let r = c.cmd("NOOP").await;
        if r.code != 250 {
            break r;
        }
        assert!(started.elapsed().as_secs() < 10, "no deadline");
    };
    assert_eq!((last.code, last.enhanced()), (421, "4.4.2"), "{last:?}");
    assert!(started.elapsed().as_millis() >= 900);
}

/// Each case: commands sent first (each must succeed), then the hostile line.
const MALFORMED: &[(&[&str], &[u8])] = &[
    (&[], b"EHLO client\0.test"),
    (&[], b"EHLO \xff\xfe\xfd"),
    (&[], b"EHLO foo\rbar"),
    (&["EHLO client.test"], b"MAIL FROM:<a\0b@example.test>"),
    (&["EHLO client.test"], b"MAIL FROM:<\xc3\x28@example.test>"),
    (&["EHLO client.test"], b"MAIL FROM:<;sleep 10;>"),
    (&["EHLO client.test"], b"MAIL FROM:<`reboot`>"),
    (
        &["EHLO client.test", "MAIL FROM:<a@example.test>"],
        b"RCPT TO:<${run{...}}@x>",
    ),
    (
        &["EHLO client.test", "MAIL FROM:<a@example.test>"],
        b"RCPT TO:<b@dest.test>\0",
    ),
    (&["EHLO client.test"], b"\0\0\0\0"),
    (&["EHLO client.test"], b"DATA\r\x00"),
];

#[tokio::test]
async fn malformed_input_gets_a_5xx_with_an_enhanced_code_and_queues_nothing() {
    let server = TestServer::start("").await;
    let long_auth = format!("AUTH PLAIN {}", "A".repeat(13_000));
    let mut cases: Vec<(&[&str], Vec<u8>)> =
        MALFORMED.iter().map(|(p, l)| (*p, l.to_vec())).collect();
    cases.push((&["EHLO client.test"], long_auth.into_bytes()));
    for (preamble, line) in cases {
        let (mut c, _) = Raw::connect(server.relay).await;
        for p in preamble {
            let r = c.cmd(p).await;
            assert!(r.code < 400, "{p} -> {r:?}");
        }
        let mut bytes = line.clone();
        bytes.extend_from_slice(b"\r\n");
        c.send(&bytes).await;
        let r = c.reply().await;
        let shown = String::from_utf8_lossy(&line[..line.len().min(40)]).into_owned();
        assert!((500..600).contains(&r.code), "{shown:?} -> {r:?}");
        let e = r.enhanced();
        assert!(
            e.starts_with("5.") && e.split('.').count() == 3,
            "{shown:?} -> {r:?}"
        );
        // The session still answers (no hang), and nothing reached the spool.
        c.expect("RSET", 250).await;
        c.expect("QUIT", 221).await;
    }
    assert!(server.messages().await.is_empty());
}

#[tokio::test]
async fn an_auth_response_over_12288_octets_is_refused_with_5_5_6() {
    let server = TestServer::start("").await;
    let (mut c, _) = Raw::connect(server.submission).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("STARTTLS", 220).await;
    let mut c = c.tls(server.client_tls()).await;
    c.expect("EHLO client.test", 250).await;
    // An initial response of 1,000 octets is fine (RFC 4954 allows 12,288 per line).
    let long_user = "u".repeat(700);
    let r = c
        .cmd(&format!("AUTH PLAIN {}", plain(&long_user, "x")))
        .await;
    assert_eq!((r.code, r.enhanced()), (535, "5.7.8"), "{r:?}");
    c.expect("AUTH PLAIN", 334).await;
    let r = c.cmd(&"A".repeat(12_300)).await;
    assert_eq!((r.code, r.enhanced()), (500, "5.5.6"), "{r:?}");
    let r = c
        .cmd(&format!("AUTH PLAIN {}", plain(USER, PASSWORD)))
        .await;
    assert_eq!(r.code, 235, "{r:?}");
}

/// Raises this process's soft limit on open files to at least `needed` (up to the hard limit);
/// the test holds both ends of every connection.
fn raise_open_files(needed: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current.is_none_or(|c| c >= needed) {
        return;
    }
    assert!(
        limit.maximum.is_none_or(|m| m >= needed),
        "the hard limit on open files ({:?}) is below the {needed} this test needs",
        limit.maximum
    );
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(needed),
            maximum: limit.maximum,
        },
    )
    .expect("raise RLIMIT_NOFILE");
}

/// 1,000 idle connections from outside clients (10 from each of 100 addresses) take every
/// slot; the command timeout closes each with `421 4.4.2` no sooner than it is due, and then
/// both the global and the per-address slots are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_by_the_timeout_and_their_slots_freed() {
    use std::time::{Duration, Instant};
    const IDLE: usize = 1000;
    const PER_ADDRESS: usize = 10;
    const TIMEOUT: Duration = Duration::from_secs(2);
    raise_open_files(2 * IDLE as u64 + 256);
    let server = TestServer::start(&format!(
        "{OUTSIDERS}[limits]\nmax_connections = {IDLE}\ncommand_timeout = \"{}s\"\n\
         max_connections_per_ip = {PER_ADDRESS}\nconnections_per_ip_per_minute = 1000\n",
        TIMEOUT.as_secs()
    ))
    .await;
    let source = |i: usize| format!("127.0.1.{}", i / PER_ADDRESS + 1);

    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        // The server's timer starts after the connection is made: no reply can be due before
        // TIMEOUT from here.
        let started = Instant::now();
        let (c, g) = Raw::connect_from(&source(i), server.relay).await;
        assert_eq!(g.map(|g| g.code), Some(220), "connection {i}");
        idle.push((c, started));
    }
    let opened = idle[0].1.elapsed();
    eprintln!("opened {IDLE} connections in {opened:?}");
    // Every slot is taken (unless the first ones already timed out: opening took too long).
    let (_, g) = Raw::connect_from("127.0.0.1", server.relay).await;
    let g = g.expect("a reply");
    assert!(
        opened < TIMEOUT,
        "opening {IDLE} connections took {opened:?}"
    );
    assert_eq!((g.code, g.enhanced()), (421, "4.7.0"), "{g:?}");

    let closes = idle.into_iter().map(|(mut c, started)| async move {
        let r = tokio::time::timeout(TIMEOUT + Duration::from_secs(10), c.try_reply())
            .await
            .expect("closed within 10 s of the timeout");
        let after = started.elapsed();
        let eof = tokio::time::timeout(Duration::from_secs(5), c.try_reply()).await;
        (r, after, matches!(eof, Ok(None)))
    });
    let results = futures::future::join_all(closes).await;
    for (i, (r, after, eof)) in results.into_iter().enumerate() {
        let r = r.unwrap_or_else(|| panic!("connection {i}: closed without a reply"));
        assert_eq!(
            (r.code, r.enhanced()),
            (421, "4.4.2"),
            "connection {i}: {r:?}"
        );
        assert!(
            after >= TIMEOUT - Duration::from_millis(5),
            "connection {i} closed after {after:?}, before the timeout"
        );
        assert!(eof, "connection {i} not closed after its 421");
    }

    // All slots are back: a trusted client sends a message, and an address whose ten
    // connections were all open gets in again.
    submit(
        server.relay,
        "a@example.test",
        &["b@dest.test"],
        "Subject: x\r\n\r\nx\r\n",
    )
    .await;
    let (mut c, g) = Raw::connect_from(&source(0), server.relay).await;
    assert_eq!(g.map(|g| g.code), Some(220));
    c.expect("EHLO client.test", 250).await;
}

/// A client past EHLO and MAIL, and RCPT when `rcpt`: ready for DATA or BDAT.
async fn at_data(server: &TestServer, rcpt: bool) -> Raw<tokio::net::TcpStream> {
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<app@example.test>", 250).await;
    if rcpt {
        c.expect("RCPT TO:<r@dest.test>", 250).await;
    }
    c
}

/// A client that reached DATA, holding the one place for content; returns it past its 354.
async fn holding_the_data_place(server: &TestServer) -> Raw<tokio::net::TcpStream> {
    let mut c = at_data(server, true).await;
    c.expect("DATA", 354).await;
    c
}

#[tokio::test]
async fn senders_past_max_concurrent_data_wait_for_their_354() {
    let (server, _clock) =
        start_on_clock("[limits]\nmax_concurrent_data = 1\ncommand_timeout = \"20s\"\n").await;
    let mut first = holding_the_data_place(&server).await;
    let mut second = at_data(&server, true).await;
    second.send("DATA\r\n").await;
    let early =
        tokio::time::timeout(std::time::Duration::from_millis(300), second.try_reply()).await;
    assert!(
        early.is_err(),
        "354 while the only place was taken: {early:?}"
    );
    // The first message ends; its place passes to the waiting session.
    first.send("Subject: one\r\n\r\nfirst\r\n.\r\n").await;
    assert_eq!(first.reply().await.code, 250);
    assert_eq!(second.reply().await.code, 354);
    second.send("Subject: two\r\n\r\nsecond\r\n.\r\n").await;
    assert_eq!(second.reply().await.code, 250);
    assert_eq!(server.spool.live().len(), 2);
}

#[tokio::test]
async fn a_sender_that_finds_no_place_for_content_in_time_is_told_to_retry() {
    let (server, _clock) =
        start_on_clock("[limits]\nmax_concurrent_data = 1\ncommand_timeout = \"1s\"\n").await;
    let _first = holding_the_data_place(&server).await;
    let mut second = at_data(&server, true).await;
    let refused = second.cmd("DATA").await;
    assert_eq!((refused.code, refused.enhanced()), (451, "4.3.2"));
    // BDAT waits the same way; its chunk is read and dropped, and the session goes on.
    second.send("BDAT 5 LAST\r\nhello").await;
    let refused = second.reply().await;
    assert_eq!((refused.code, refused.enhanced()), (451, "4.3.2"));
    second.expect("NOOP", 250).await;
    assert!(server.spool.live().is_empty());
}

#[tokio::test]
async fn a_transaction_without_recipients_takes_no_place_for_content() {
    let (server, _clock) =
        start_on_clock("[limits]\nmax_concurrent_data = 1\ncommand_timeout = \"20s\"\n").await;
    let mut empty = at_data(&server, false).await;
    let refused = empty.cmd("DATA").await;
    assert_eq!((refused.code, refused.enhanced()), (554, "5.5.1"));
    empty.send("BDAT 5 LAST\r\nhello").await;
    let refused = empty.reply().await;
    assert_eq!((refused.code, refused.enhanced()), (554, "5.5.1"));
    // The transaction is still open, and holds no place: another client gets its 354 at once.
    let _other = holding_the_data_place(&server).await;
}

#[tokio::test]
async fn a_message_in_several_bdat_chunks_keeps_its_one_place() {
    let (server, _clock) =
        start_on_clock("[limits]\nmax_concurrent_data = 1\ncommand_timeout = \"20s\"\n").await;
    let mut c = at_data(&server, true).await;
    let head = "Subject: chunks\r\n\r\n";
    c.send(format!("BDAT {}\r\n{head}", head.len())).await;
    assert_eq!(c.reply().await.code, 250);
    c.send("BDAT 6 LAST\r\nbody\r\n").await;
    let done = tokio::time::timeout(std::time::Duration::from_secs(5), c.reply())
        .await
        .expect("the second chunk waited for the place its own transaction holds");
    assert_eq!(done.code, 250);
    assert_eq!(server.spool.live().len(), 1);
}
