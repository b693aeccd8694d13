//! The queue under adverse destinations: remote reply texts kept out of the log, retries dated
//! from the end of an attempt, mail loops (MX back at us, a server with our name, too many
//! hops), a bounded shutdown with a tarpit open, and a tarpit that does not hold up other mail.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::dns::DnsServer;
use common::sink::Sink;
use common::tarpit::Tarpit;
use common::{contains, submit, Raw, TestServer};
use postern::clock::{Clock, ManualClock, SystemClock};
use postern::daemon::Options;
use postern::queue::{Queue, Schedule};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// What a [`Scripted`] server answers, as full wire replies ("250-a\r\n250 b\r\n"). Read at
/// every command, so a change applies to open (pooled) connections too.
#[derive(Clone)]
struct Script {
    greeting: String,
    ehlo: String,
    helo: String,
    starttls: String,
    auth: String,
    mail: String,
    rcpt: String,
    data: String,
    end_of_data: String,
}

impl Script {
    /// Every step succeeds, and every reply quotes `quote`.
    fn accepting(quote: &str) -> Script {
        let q = quote;
        Script {
            greeting: format!("220 scripted.test ESMTP {q}\r\n"),
            ehlo: format!("250-scripted.test hello {q}\r\n250-STARTTLS\r\n250 AUTH PLAIN\r\n"),
            helo: format!("250 scripted.test {q}\r\n"),
            starttls: format!("220 2.0.0 {q} go ahead\r\n"),
            auth: format!("235 2.7.0 {q} welcome\r\n"),
            mail: format!("250 2.1.0 {q} sender ok\r\n"),
            rcpt: format!("250 2.1.5 {q} recipient ok\r\n"),
            data: format!("354 {q} go on\r\n"),
            end_of_data: format!("250 2.0.0 {q} queued\r\n"),
        }
    }
}

/// A receiving server that follows a [`Script`], with STARTTLS on a self-signed certificate.
#[derive(Clone)]
struct Scripted {
    addr: SocketAddr,
    script: Arc<Mutex<Script>>,
    connections: Arc<AtomicUsize>,
    /// Called once per new connection, before the greeting (to move a manual clock).
    on_connect: Arc<Mutex<Option<Hook>>>,
}

type Hook = Box<dyn FnMut() + Send>;

/// One change to a [`Script`].
type Step<'a> = Box<dyn Fn(&mut Script) + 'a>;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Scripted {
    async fn start(addr: &str, script: Script) -> Scripted {
        let listener = TcpListener::bind(addr).await.expect("bind scripted server");
        let server = Scripted {
            addr: listener.local_addr().unwrap(),
            script: Arc::new(Mutex::new(script)),
            connections: Arc::new(AtomicUsize::new(0)),
            on_connect: Arc::new(Mutex::new(None)),
        };
        let tls = tokio_rustls::TlsAcceptor::from(common::self_signed_server(&["scripted.test"]));
        let s = server.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                s.connections.fetch_add(1, Ordering::SeqCst);
                if let Some(hook) = s.on_connect.lock().unwrap().as_mut() {
                    hook();
                }
                tokio::spawn(s.clone().session(socket, tls.clone()));
            }
        });
        server
    }

    fn set(&self, change: impl FnOnce(&mut Script)) {
        change(&mut self.script.lock().unwrap());
    }

    async fn session(
        self,
        socket: TcpStream,
        tls: tokio_rustls::TlsAcceptor,
    ) -> std::io::Result<()> {
        let mut io: BufReader<Box<dyn Io>> = BufReader::new(Box::new(socket));
        let greeting = self.script.lock().unwrap().greeting.clone();
        io.get_mut().write_all(greeting.as_bytes()).await?;
        loop {
            let Some(line) = read_line(&mut io).await? else {
                return Ok(());
            };
            let verb = line
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            let s = self.script.lock().unwrap().clone();
            let reply = match verb.as_str() {
                "EHLO" => s.ehlo,
                "HELO" => s.helo,
                "STARTTLS" => s.starttls,
                "AUTH" => s.auth,
                "MAIL" => s.mail,
                "RCPT" => s.rcpt,
                "DATA" => s.data,
                "RSET" => "250 2.0.0 ok\r\n".into(),
                "QUIT" => "221 2.0.0 bye\r\n".into(),
                _ => "500 5.5.2 unknown command\r\n".into(),
            };
            io.get_mut().write_all(reply.as_bytes()).await?;
            match verb.as_str() {
                "QUIT" => return Ok(()),
                "STARTTLS" if reply.starts_with("220") => {
                    let stream = tls.accept(io.into_inner()).await?;
                    io = BufReader::new(Box::new(stream));
                }
                "DATA" if reply.starts_with("354") => {
                    while read_line(&mut io).await?.is_some_and(|l| l != ".") {}
                    let end = self.script.lock().unwrap().end_of_data.clone();
                    io.get_mut().write_all(end.as_bytes()).await?;
                }
                _ => {}
            }
        }
    }
}

async fn read_line<S: AsyncRead + Unpin>(io: &mut BufReader<S>) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    if io.read_until(b'\n', &mut buf).await? == 0 {
        return Ok(None);
    }
    Ok(Some(
        String::from_utf8_lossy(&buf)
            .trim_end_matches(['\r', '\n'])
            .to_string(),
    ))
}

/// Everything logged on this thread, at every level (the queue runs on the test's thread).
#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogBuf {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

async fn manual(extra: &str) -> (TestServer, Arc<Queue>, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(SystemClock.now()));
    let options = Options {
        clock: clock.clone(),
        run_queue: false,
        ..Default::default()
    };
    let (server, queue) = TestServer::start_with(extra, options).await;
    (server, queue, clock)
}

/// A free port on 127.0.0.1 (bound and released), for a listener that must be named in the
/// configuration before the server starts.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

#[tokio::test]
async fn remote_reply_texts_never_reach_the_log() {
    const ADDR: &str = "quoted.person@dest.test";
    let logs = LogBuf::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let quote = format!("<{ADDR}>");
    let remote = Scripted::start("127.0.0.1:0", Script::accepting(&quote)).await;
    let (server, queue, clock) = manual(&format!(
        "[delivery]\nsmarthost = \"{}\"\nretry_schedule = [\"1m\"]\n\
         [delivery.smarthost_auth]\nusername = \"u\"\npassword = \"p\"\n",
        remote.addr
    ))
    .await;
    submit(
        server.relay,
        "app@sender.test",
        &[ADDR],
        "Subject: s\r\n\r\nhi\r\n",
    )
    .await;

    let q = quote.as_str();
    let steps: Vec<Step<'_>> = vec![
        Box::new(|s| s.greeting = format!("421 4.3.2 {q} busy\r\n")),
        Box::new(|s| s.greeting = format!("garbage {q}\r\n")),
        Box::new(|s| {
            s.ehlo = format!("421 4.3.2 {q} no EHLO\r\n");
            s.helo = format!("421 4.3.2 {q} no HELO\r\n");
        }),
        Box::new(|s| s.starttls = format!("454 4.7.0 {q} no TLS now\r\n")),
        Box::new(|s| s.auth = format!("454 4.7.0 {q} no AUTH now\r\n")),
        Box::new(|s| s.mail = format!("451 4.3.0 {q} MAIL later\r\n")),
        Box::new(|s| s.rcpt = format!("450 4.2.0 {q} RCPT later\r\n")),
        Box::new(|s| s.data = format!("451 4.3.0 {q} DATA later\r\n")),
        Box::new(|s| s.end_of_data = format!("451 4.3.0 {q} content later\r\n")),
        // Finally a permanent refusal: a bounce and a DSN (which the smarthost refuses too).
        Box::new(|s| s.rcpt = format!("550 5.1.1 {q} no such user\r\n")),
    ];
    for (round, step) in steps.iter().enumerate() {
        remote.set(|s| {
            *s = Script::accepting(q);
            step(s);
        });
        assert!(queue.run_due().await >= 1, "round {round} attempted");
        clock.advance(60);
    }
    assert!(server.spool.live().is_empty(), "bounced in the end");
    assert!(remote.connections.load(Ordering::SeqCst) >= 5);
    let log = logs.text();
    // The failures are logged, by stage and code...
    for expected in [
        "greeting refused: 421 4.3.2",
        "unreadable reply during greeting",
        "HELO refused: 421 4.3.2",
        "STARTTLS refused: 454 4.7.0",
        "AUTH refused: 454 4.7.0",
        "deferred",
        "bounced",
    ] {
        assert!(
            log.contains(expected),
            "{expected:?} not in the log:\n{log}"
        );
    }
    // ...and the address the replies quote is nowhere.
    assert!(
        !log.contains("quoted.person"),
        "the reply text was logged:\n{log}"
    );
}

#[tokio::test]
async fn the_next_retry_counts_from_the_end_of_a_slow_attempt() {
    let remote = Scripted::start("127.0.0.1:0", Script::accepting("x")).await;
    remote.set(|s| s.greeting = "421 4.3.2 busy\r\n".into());
    let (server, queue, clock) = manual(&format!(
        "[delivery]\nsmarthost = \"{}\"\nretry_schedule = [\"1m\"]\n",
        remote.addr
    ))
    .await;
    // The first attempt takes 100 s (on the manual clock) before it fails.
    let c = clock.clone();
    let mut fired = false;
    *remote.on_connect.lock().unwrap() = Some(Box::new(move || {
        if !std::mem::replace(&mut fired, true) {
            c.advance(100);
        }
    }));
    submit(
        server.relay,
        "app@sender.test",
        &["r@dest.test"],
        "Subject: s\r\n\r\nhi\r\n",
    )
    .await;
    assert_eq!(
        queue.run_due().await,
        1,
        "one attempt, not due again at once"
    );
    // Due one step (60 s) after the attempt ended, not after it started.
    clock.advance(59);
    assert_eq!(queue.run_due().await, 0);
    clock.advance(1);
    assert_eq!(queue.run_due().await, 1);
    assert_eq!(remote.connections.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn an_mx_pointing_back_at_this_server_fails_once_with_5_4_6() {
    // Our relay listener and the sender's MX share a port number on different addresses.
    let port = free_port();
    let sink = Sink::start_on(&format!("127.0.0.2:{port}")).await;
    let dns = DnsServer::start().await;
    dns.mx("loop.test", 10, "mx.self.test");
    dns.addr("mx.self.test", "127.0.0.1");
    dns.mx("sender.test", 10, "mx.sink.test");
    dns.addr("mx.sink.test", "127.0.0.2");
    let (server, queue, _clock) = manual(&format!(
        "[[listener]]\naddr = \"127.0.0.1:{port}\"\nmode = \"relay\"\n\
         [delivery]\nport = {port}\n[dns]\nnameservers = [\"{}\"]\n",
        dns.nameserver()
    ))
    .await;
    submit(
        server.relay,
        "app@sender.test",
        &["a@loop.test"],
        "Subject: loop\r\n\r\nhi\r\n",
    )
    .await;
    // The message and its DSN: nothing was accepted again (a loop would add a copy, due at once).
    assert_eq!(queue.run_due().await, 2);
    let got = sink.received();
    assert_eq!(got.len(), 1, "one DSN: {got:?}");
    assert_eq!(got[0].rcpts, vec!["app@sender.test"]);
    assert!(contains(&got[0].data, b"Status: 5.4.6"));
    assert!(contains(
        &got[0].data,
        b"mail for loop.test loops back to myself"
    ));
    assert!(server.spool.live().is_empty());
    assert_eq!(sink.connections(), 1, "nothing but the DSN went out");
}

#[tokio::test]
async fn a_server_greeting_with_our_own_name_is_a_loop_and_the_null_sender_gets_no_dsn() {
    let remote = Scripted::start("127.0.0.2:0", Script::accepting("x")).await;
    remote.set(|s| s.greeting = "220 postern.example.test ESMTP\r\n".into());
    let port = remote.addr.port();
    let sink = Sink::start_on(&format!("127.0.0.1:{port}")).await;
    let dns = DnsServer::start().await;
    dns.mx("other.test", 10, "mx.other.test");
    dns.addr("mx.other.test", "127.0.0.2");
    dns.mx("sender.test", 10, "mx.sink.test");
    dns.addr("mx.sink.test", "127.0.0.1");
    let (server, queue, _clock) = manual(&format!(
        "[delivery]\nport = {port}\n[dns]\nnameservers = [\"{}\"]\n",
        dns.nameserver()
    ))
    .await;
    submit(
        server.relay,
        "app@sender.test",
        &["a@other.test"],
        "Subject: l\r\n\r\nhi\r\n",
    )
    .await;
    submit(
        server.relay,
        "",
        &["b@other.test"],
        "Subject: l\r\n\r\nhi\r\n",
    )
    .await;
    // Two messages, one DSN (for the first); each tried once, at once permanent.
    assert_eq!(queue.run_due().await, 3);
    let got = sink.received();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].rcpts, vec!["app@sender.test"]);
    assert!(contains(&got[0].data, b"Status: 5.4.6"));
    assert!(contains(&got[0].data, b"loops back to myself"));
    assert_eq!(remote.connections.load(Ordering::SeqCst), 2);
    assert!(server.spool.live().is_empty());

    // The same when the name comes in the EHLO reply instead of the greeting.
    remote.set(|s| {
        s.greeting = "220 mx.other.test ESMTP\r\n".into();
        s.ehlo = "250-postern.example.test hello\r\n250 8BITMIME\r\n".into();
    });
    submit(
        server.relay,
        "app@sender.test",
        &["c@other.test"],
        "Subject: l\r\n\r\nhi\r\n",
    )
    .await;
    assert_eq!(queue.run_due().await, 2, "the message and its DSN");
    let got = sink.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(contains(&got[1].data, b"Status: 5.4.6"));
    assert!(contains(
        &got[1].data,
        b"Final-Recipient: rfc822; c@other.test"
    ));
    assert!(server.spool.live().is_empty());
}

#[tokio::test]
async fn too_many_received_headers_are_refused_with_5_4_6() {
    let server = TestServer::start("[limits]\nmax_hops = 5\n").await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    let hops = |n: usize| "Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n".repeat(n);
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@dest.test"],
            &format!("{}Subject: x\r\n\r\nhi\r\n", hops(5)),
        )
        .await;
    assert_eq!((r.code, r.enhanced()), (554, "5.4.6"), "{r:?}");
    assert!(server.spool.live().is_empty(), "nothing stored");
    // One hop fewer is accepted (ours makes five), on the same connection.
    let r = c
        .send_mail(
            "a@sender.test",
            &["b@dest.test"],
            &format!("{}Subject: x\r\n\r\nhi\r\n", hops(4)),
        )
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    assert_eq!(server.spool.live().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_a_tarpit_open_stops_within_the_grace() {
    let tarpit = Tarpit::start("127.0.0.1:0").await;
    let dir = tempfile::tempdir().unwrap();
    common::write_child_config(
        dir.path(),
        &format!(
            "[delivery]\nsmarthost = \"{}\"\nreply_timeout = \"10m\"\n",
            tarpit.addr
        ),
    );
    let path = dir.path().join("config.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replacen("[server]\n", "[server]\nshutdown_grace = \"2s\"\n", 1);
    std::fs::write(&path, text).unwrap();
    let mut child = common::Child::spawn(dir.path(), None);
    submit(
        child.relay,
        "app@sender.test",
        &["r@dest.test"],
        "Subject: s\r\n\r\nhi\r\n",
    )
    .await;
    // The delivery attempt is stuck in the tarpit; an inbound client idles too.
    tarpit.wait_for(1).await;
    let (_idle, _) = Raw::connect(child.relay).await;
    let started = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let s = child.terminate();
        (s, child.log())
    });
    let (status, log) = status.await.unwrap();
    let took = started.elapsed();
    assert!(status.success(), "{log}");
    assert!(
        took < Duration::from_secs(5),
        "stop took {took:?} with a 2 s grace:\n{log}"
    );
    // The abandoned message is safe in the spool, for the next start.
    let (spool, _) = common::open_spool(dir.path());
    assert_eq!(spool.live().len(), 1);
}

/// Two destinations on one port: tarpit.test's MX (127.0.0.2) accepts connections and never
/// answers, dest.test's (127.0.0.1) takes everything.
async fn tarpit_and_sink() -> (Tarpit, Sink, DnsServer) {
    let tarpit = Tarpit::start("127.0.0.2:0").await;
    let sink = Sink::start_on(&format!("127.0.0.1:{}", tarpit.addr.port())).await;
    let dns = DnsServer::start().await;
    dns.mx("tarpit.test", 10, "mx.tarpit.test");
    dns.addr("mx.tarpit.test", "127.0.0.2");
    dns.mx("dest.test", 10, "mx.sink.test");
    dns.addr("mx.sink.test", "127.0.0.1");
    (tarpit, sink, dns)
}

/// A server delivering on the tarpit's port, resolving with `dns`, with `delivery` lines added
/// to its `[delivery]` table and `more` tables after it; and a client past its EHLO.
async fn beside_tarpit(
    tarpit: &Tarpit,
    dns: &DnsServer,
    delivery: &str,
    more: &str,
) -> (TestServer, Raw<TcpStream>) {
    let port = tarpit.addr.port();
    let (server, _queue) = TestServer::start_with(
        &format!(
            "[delivery]\nport = {port}\nreply_timeout = \"8s\"\n{delivery}{more}\
             [dns]\nnameservers = [\"{}\"]\n",
            dns.nameserver()
        ),
        Options::default(),
    )
    .await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    (server, c)
}

/// A `[[delivery.destination]]` allowing the tarpit two connections.
const TARPIT_TWO_CONNECTIONS: &str =
    "[[delivery.destination]]\ndomain = \"tarpit.test\"\nmax_connections = 2\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tarpit_destination_holds_up_no_other_mail_and_is_marked_down() {
    const STUCK: usize = 300;
    let (tarpit, sink, dns) = tarpit_and_sink().await;
    // Fewer session slots than tarpit messages: a message waiting for its destination must
    // not hold one.
    let (server, mut c) = beside_tarpit(&tarpit, &dns, "max_in_flight = 30\n", "").await;
    for _ in 0..STUCK {
        let r = c
            .send_mail(
                "app@sender.test",
                &["x@tarpit.test"],
                "Subject: t\r\n\r\nhi\r\n",
            )
            .await;
        assert_eq!(r.code, 250);
    }
    let started = Instant::now();
    for i in 0..10 {
        let r = c
            .send_mail(
                "app@sender.test",
                &[&format!("n{i}@dest.test")],
                "Subject: n\r\n\r\nhi\r\n",
            )
            .await;
        assert_eq!(r.code, 250);
    }
    sink.wait_for(10).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "normal mail took {took:?}");
    // Meanwhile the tarpit's mail was all still in its first attempt (none deferred yet).
    assert_eq!(
        tried(&server),
        0,
        "the tarpit timed out before the normal mail arrived"
    );
    assert!(
        tarpit.connections.load(Ordering::SeqCst) <= 20,
        "per-destination limit"
    );

    // After the first connections time out (8 s) the tarpit is marked down: every message for
    // it is deferred within seconds, without a connection each.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tried = tried(&server);
        if tried == STUCK {
            break;
        }
        assert!(Instant::now() < deadline, "{tried} of {STUCK} deferred");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connections = tarpit.connections.load(Ordering::SeqCst);
    assert!(
        connections < 40,
        "{connections} connections to a dead destination"
    );
}

/// Queued one-recipient messages that have had one (failed) attempt.
fn tried(server: &TestServer) -> usize {
    server
        .spool
        .live()
        .into_iter()
        .filter_map(|id| server.spool.state(id).ok())
        .filter(|s| Schedule::decode(&s.queue_data, 1).rcpts[0].attempts == 1)
        .count()
}

/// The working set is bounded: with more messages due than `max_active_messages`, only that
/// many are taken from the due index (and journaled, and read); the others wait there, holding
/// nothing but their index entry, instead of each becoming a task that waits for a slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_messages_are_taken_than_there_are_active_slots() {
    let tarpit = Tarpit::start("127.0.0.1:0").await;
    let (server, queue) = TestServer::start_with(
        &format!(
            "[delivery]\nsmarthost = \"{}\"\nmax_active_messages = 3\nreply_timeout = \"10m\"\n",
            tarpit.addr
        ),
        Options::default(),
    )
    .await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    for i in 0..10 {
        let r = c
            .send_mail(
                "app@sender.test",
                &[&format!("r{i}@dest.test")],
                "Subject: t\r\n\r\nhi\r\n",
            )
            .await;
        assert_eq!(r.code, 250);
    }
    tarpit.wait_for(3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = queue.counts();
    assert_eq!((counts.active, counts.waiting), (3, 7), "{counts:?}");
    assert_eq!(tarpit.connections(), 3);
}

/// A message of about 240 KiB: held whole by a delivery, as it is under the spill threshold.
fn body_of_240_kib() -> String {
    let body = format!(
        "Subject: big\r\n\r\n{}",
        format!("{}\r\n", "y".repeat(76)).repeat(3150)
    );
    assert!(body.len() > 240_000 && body.len() < postern::spool::SPILL_AT);
    body
}

/// Sends `body` from app@sender.test to each recipient in turn, one message each.
async fn send_each(c: &mut Raw<TcpStream>, rcpts: impl Iterator<Item = String>, body: &str) {
    for rcpt in rcpts {
        let r = c.send_mail("app@sender.test", &[&rcpt], body).await;
        assert_eq!(r.code, 250, "{rcpt}");
    }
}

/// Deliveries hold their message's body against `limits.max_body_memory` (1 MiB here) from
/// its read, once a session is free for it, to the end of the transaction: of five messages of
/// about 240 KiB (each held whole, as they are under the spill threshold), four fit, and the
/// fifth is not read (it never reaches the tarpit) while the others hang there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_wait_for_body_memory() {
    let tarpit = Tarpit::start("127.0.0.1:0").await;
    let (server, queue) = TestServer::start_with(
        &format!(
            "[delivery]\nsmarthost = \"{}\"\nreply_timeout = \"10m\"\n[limits]\nmax_body_memory = 1048576\n",
            tarpit.addr
        ),
        Options {
            run_queue: false,
            ..Options::default()
        },
    )
    .await;
    let body = body_of_240_kib();
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    send_each(&mut c, (0..5).map(|i| format!("r{i}@dest.test")), &body).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(queue.clone().run(stop.clone(), Duration::from_secs(1)));
    tarpit.wait_for(4).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        queue.counts().active,
        5,
        "all taken, one waiting for memory"
    );
    assert_eq!(
        tarpit.connections(),
        4,
        "the fifth message was read and sent while the others held the memory"
    );
    stop.cancel();
    let _ = running.await;
}

/// Messages waiting for their destination's turn hold no body memory: with a tarpit allowed
/// two connections and eight of its messages of about 240 KiB queued (twice the 1 MiB cap of
/// `limits.max_body_memory`), mail for another destination still goes at once. Were the
/// waiting messages read before their turn, four would fill the cap and the other mail would
/// wait for the tarpit's 8 s timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_waiting_for_their_destination_hold_no_body_memory() {
    let (tarpit, sink, dns) = tarpit_and_sink().await;
    let more = format!("{TARPIT_TWO_CONNECTIONS}[limits]\nmax_body_memory = 1048576\n");
    let (server, mut c) = beside_tarpit(&tarpit, &dns, "", &more).await;
    let body = body_of_240_kib();
    send_each(&mut c, (0..8).map(|i| format!("t{i}@tarpit.test")), &body).await;
    tarpit.wait_for(2).await;
    let started = Instant::now();
    send_each(&mut c, (0..2).map(|i| format!("n{i}@dest.test")), &body).await;
    sink.wait_for(2).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "the other mail took {took:?}"
    );
    assert_eq!(
        tarpit.connections(),
        2,
        "the tarpit's connection limit (the rest of its mail waits its turn)"
    );
    assert_eq!(
        tried(&server),
        0,
        "the tarpit timed out before the other mail went"
    );
}

/// Messages waiting for a destination's connection limit do not take every place among
/// `max_active_messages`: with a tarpit allowed two connections and eight of its messages
/// queued against six places, mail for another destination still goes at once, instead of
/// waiting behind the tarpit's messages for its timeouts (head-of-line blocking across
/// destinations).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_destination_does_not_take_every_active_place() {
    let (tarpit, sink, dns) = tarpit_and_sink().await;
    let (server, mut c) = beside_tarpit(
        &tarpit,
        &dns,
        "max_active_messages = 6\n",
        TARPIT_TWO_CONNECTIONS,
    )
    .await;
    let body = "Subject: hello\r\n\r\nhello\r\n";
    send_each(&mut c, (0..8).map(|i| format!("t{i}@tarpit.test")), body).await;
    tarpit.wait_for(2).await;
    let started = Instant::now();
    send_each(&mut c, (0..2).map(|i| format!("n{i}@dest.test")), body).await;
    sink.wait_for(2).await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "the other mail took {took:?}"
    );
    assert_eq!(tarpit.connections(), 2);
    assert_eq!(
        tried(&server),
        0,
        "the tarpit timed out before the other mail went"
    );
}

/// Messages turned away by a busy destination are woken as it makes room, not left to the
/// queue's later look: a slow destination allowed one connection, with two deliveries allowed
/// to wait for it (half of four places), takes twelve messages one after another; the eight
/// parked ones go as soon as their turn comes, all within seconds (their fallback is a minute).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_turned_away_by_a_busy_destination_go_in_turn() {
    let sink = Sink::start("127.0.0.1").await;
    sink.behaviour.lock().unwrap().data_delay = Some(Duration::from_millis(150));
    let (server, _queue) = TestServer::start_with(
        &format!(
            "[delivery]\nsmarthost = \"{}\"\ntls = \"none\"\nmax_active_messages = 4\n\
             max_connections_per_destination = 1\n",
            sink.addr
        ),
        Options::default(),
    )
    .await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    let started = Instant::now();
    let rcpts: Vec<String> = (0..12).map(|i| format!("r{i}@dest.test")).collect();
    send_each(&mut c, rcpts.iter().cloned(), "Subject: hi\r\n\r\nhi\r\n").await;
    let got = sink.wait_for(12).await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(20), "took {took:?}");
    let mut delivered: Vec<String> = got.iter().flat_map(|m| m.rcpts.clone()).collect();
    delivered.sort();
    let mut expected = rcpts;
    expected.sort();
    assert_eq!(delivered, expected, "each delivered once");
    assert_eq!(tried(&server), 0, "none deferred");
}
