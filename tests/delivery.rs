//! Delivery end to end: client -> Postern -> loopback sink, routed by a DNS server on loopback.
//! Retries and expiry run on a manual clock; the sink's received bytes are checked.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::dns::DnsServer;
use common::sink::Sink;
use common::{contains, has_bare_cr_or_lf, submit, Raw, TestServer};
use postern::clock::{Clock, ManualClock, SystemClock};
use postern::daemon::Options;
use postern::queue::Queue;

struct Rig {
    dns: DnsServer,
    sink: Sink,
    server: TestServer,
    queue: Arc<Queue>,
    clock: Arc<ManualClock>,
}

/// DNS: dest.test and sender.test -> mx.sink.test -> 127.0.0.1, where the sink listens.
/// `delivery` adds keys to [delivery]; `more` adds tables. With `manual`, the queue only runs
/// when the test calls `run_due`, on a clock the test moves.
async fn rig(delivery: &str, more: &str, manual: bool) -> Rig {
    let dns = DnsServer::start().await;
    let sink = Sink::start("127.0.0.1").await;
    for domain in ["dest.test", "sender.test", "other.test"] {
        dns.mx(domain, 10, "mx.sink.test");
    }
    dns.addr("mx.sink.test", "127.0.0.1");
    let clock = Arc::new(ManualClock::new(SystemClock.now()));
    let extra = format!(
        "[delivery]\nport = {}\n{delivery}\n[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\n{more}",
        sink.addr.port(),
        dns.nameserver()
    );
    let options = if manual {
        Options {
            clock: clock.clone(),
            run_queue: false,
            ..Default::default()
        }
    } else {
        Options::default()
    };
    let (server, queue) = TestServer::start_with(&extra, options).await;
    Rig {
        dns,
        sink,
        server,
        queue,
        clock,
    }
}

/// Parses a DSN with Python's email package.
fn parse_dsn(bytes: &[u8]) -> serde_json::Value {
    use std::io::Write;
    let mut child = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/parse_dsn.py"
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().unwrap().write_all(bytes).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).expect("json")
}

async fn spool_empty(server: &TestServer) {
    for _ in 0..200 {
        if server.spool.live().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("spool still holds {} messages", server.spool.live().len());
}

#[tokio::test]
async fn end_to_end_by_mx_and_body_destroyed() {
    let rig = rig("", "", false).await;
    // Dot-stuffed as a client sends it; the content line is ".leading dot".
    let body = "Subject: e2e\r\n\r\n..leading dot\r\nE2E-MARKER\r\n";
    let id = submit(
        rig.server.relay,
        "app@sender.test",
        &["a@dest.test", "b@dest.test"],
        body,
    )
    .await;
    let got = rig.sink.wait_for(1).await;
    let m = &got[0];
    assert_eq!(m.from, "app@sender.test");
    assert_eq!(
        m.rcpts,
        vec!["a@dest.test", "b@dest.test"],
        "one transaction for both"
    );
    assert!(m.data.starts_with(b"Received: from client.test"));
    assert!(contains(&m.data, format!("id {id};").as_bytes()));
    assert!(
        m.data.ends_with(b"\r\n.leading dot\r\nE2E-MARKER\r\n"),
        "{:?}",
        String::from_utf8_lossy(&m.data)
    );
    assert!(
        contains(&m.raw, b"\r\n..leading dot\r\n"),
        "dot-stuffed on the wire"
    );
    assert!(!has_bare_cr_or_lf(&m.raw));
    assert!(m.tls.is_none(), "the sink offers no STARTTLS here");
    spool_empty(&rig.server).await;
    // The body is gone from disk: no segment holds the marker, sealed or not (punched out).
    assert!(!contains(
        &common::all_bytes(&rig.server.data_dir()),
        b"E2E-MARKER"
    ));
    drop(rig.dns);
}

#[tokio::test]
async fn ipv6_mx_and_per_domain_transactions() {
    let rig = rig("", "", false).await;
    // A second sink on ::1 with the same port: v6.test's MX has only an AAAA record.
    let sink6 = Sink::start_on(&format!("[::1]:{}", rig.sink.addr.port())).await;
    rig.dns.mx("v6.test", 5, "mx6.sink.test");
    rig.dns.addr("mx6.sink.test", "::1");
    submit(
        rig.server.relay,
        "app@sender.test",
        &["x@v6.test", "y@dest.test", "z@other.test"],
        "Subject: v6\r\n\r\nhi\r\n",
    )
    .await;
    let v6 = sink6.wait_for(1).await;
    assert_eq!(v6[0].rcpts, vec!["x@v6.test"]);
    let v4 = rig.sink.wait_for(2).await;
    let mut rcpts: Vec<Vec<String>> = v4.iter().map(|m| m.rcpts.clone()).collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        vec![
            vec!["y@dest.test".to_string()],
            vec!["z@other.test".to_string()]
        ],
        "one transaction per domain"
    );
}

#[tokio::test]
async fn temporary_failures_are_retried_on_schedule_then_delivered_once() {
    let rig = rig("retry_schedule = [\"1m\", \"5m\"]", "", true).await;
    rig.sink.behaviour.lock().unwrap().data_replies =
        ["451 4.3.0 try later", "452 4.2.2 still busy"]
            .map(String::from)
            .into();
    let id = submit(
        rig.server.relay,
        "app@sender.test",
        &["r@dest.test"],
        "Subject: retry\r\n\r\nRETRY\r\n",
    )
    .await;

    assert_eq!(rig.queue.run_due().await, 1);
    assert_eq!(rig.sink.state.lock().unwrap().data_attempts.len(), 1);
    assert_eq!(rig.server.spool.live().len(), 1);
    // Not due yet: nothing happens 59 s later.
    rig.clock.advance(59);
    assert_eq!(rig.queue.run_due().await, 0);
    rig.clock.advance(1);
    assert_eq!(rig.queue.run_due().await, 1);
    assert_eq!(rig.sink.state.lock().unwrap().data_attempts.len(), 2);
    // Second step of the schedule: 5 minutes.
    rig.clock.advance(299);
    assert_eq!(rig.queue.run_due().await, 0);
    rig.clock.advance(1);
    assert_eq!(rig.queue.run_due().await, 1);

    let got = rig.sink.received();
    assert_eq!(got.len(), 1, "delivered exactly once");
    assert!(contains(&got[0].data, format!("id {id};").as_bytes()));
    assert!(rig.server.spool.live().is_empty(), "final: body destroyed");
    assert_eq!(rig.queue.len(), 0);
}

#[tokio::test]
async fn permanent_failure_bounces_with_a_dsn_of_headers_only() {
    let rig = rig("", "", true).await;
    rig.sink.behaviour.lock().unwrap().rcpt_replies.insert(
        "nobody@dest.test".into(),
        "550 5.1.1 <nobody@dest.test>: no such user".into(),
    );
    submit(
        rig.server.relay,
        "app@sender.test",
        &["nobody@dest.test", "ok@dest.test"],
        "Subject: will bounce\r\nMessage-ID: <orig-1@sender.test>\r\n\r\nSECRET-BODY-TEXT\r\n",
    )
    .await;
    // The original (to ok@) and then the DSN it caused (to app@sender.test).
    rig.queue.run_due().await;
    let got = rig.sink.received();
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(got[0].rcpts, vec!["ok@dest.test"]);
    let dsn = &got[1];
    assert_eq!(dsn.from, "", "DSNs use the null sender");
    assert_eq!(dsn.rcpts, vec!["app@sender.test"]);
    assert!(!contains(&dsn.data, b"SECRET-BODY-TEXT"), "never the body");
    let parsed = parse_dsn(&dsn.data);
    assert_eq!(parsed["content_type"], "multipart/report");
    assert_eq!(parsed["report_type"], "delivery-status");
    assert_eq!(
        parsed["parts"],
        serde_json::json!([
            "text/plain",
            "message/delivery-status",
            "text/rfc822-headers"
        ])
    );
    assert_eq!(
        parsed["per_message"]["reporting-mta"],
        "dns; postern.example.test"
    );
    let r = &parsed["recipients"][0];
    assert_eq!(r["final-recipient"], "rfc822; nobody@dest.test");
    assert_eq!(r["action"], "failed");
    assert_eq!(r["status"], "5.1.1");
    assert_eq!(r["remote-mta"], "dns; mx.sink.test");
    assert_eq!(
        r["diagnostic-code"],
        "smtp; 550 5.1.1 <nobody@dest.test>: no such user"
    );
    assert_eq!(parsed["recipients"].as_array().unwrap().len(), 1);
    assert!(parsed["original_headers"]
        .as_str()
        .unwrap()
        .contains("Message-ID: <orig-1@sender.test>"));
    assert_eq!(parsed["auto_submitted"], "auto-replied");
    assert!(rig.server.spool.live().is_empty());
}

#[tokio::test]
async fn expiry_bounces_with_4_4_7_and_bounces_of_bounces_are_dropped() {
    let rig = rig(
        "retry_schedule = [\"1h\"]\nmax_queue_lifetime = \"1d\"",
        "",
        true,
    )
    .await;
    {
        let mut b = rig.sink.behaviour.lock().unwrap();
        b.rcpt_replies
            .insert("slow@dest.test".into(), "450 4.2.1 mailbox busy".into());
        // The DSN's own recipient fails too: it must not produce another DSN.
        b.rcpt_replies
            .insert("app@sender.test".into(), "550 5.1.1 gone".into());
    }
    submit(
        rig.server.relay,
        "app@sender.test",
        &["slow@dest.test"],
        "Subject: expire\r\n\r\nx\r\n",
    )
    .await;
    rig.queue.run_due().await;
    let mut attempts = 1;
    for _ in 0..30 {
        rig.clock.advance(3600);
        attempts += rig.queue.run_due().await;
        if rig.server.spool.live().is_empty() {
            break;
        }
    }
    assert_eq!(
        attempts,
        25 + 1,
        "24 hourly retries, the expiry at 24 h, and the one DSN"
    );
    let dsn_attempts: Vec<_> = rig.sink.state.lock().unwrap().data_attempts.clone();
    assert!(dsn_attempts.is_empty(), "no DATA: every RCPT was refused");
    assert!(
        rig.server.spool.live().is_empty(),
        "DSN bounced, no bounce of the bounce queued"
    );
}

#[tokio::test]
async fn expiry_notice_reaches_the_sender() {
    let rig = rig(
        "retry_schedule = [\"6h\"]\nmax_queue_lifetime = \"12h\"",
        "",
        true,
    )
    .await;
    rig.sink
        .behaviour
        .lock()
        .unwrap()
        .rcpt_replies
        .insert("slow@dest.test".into(), "451 4.4.0 try again".into());
    submit(
        rig.server.relay,
        "app@sender.test",
        &["slow@dest.test"],
        "Subject: expire\r\n\r\nx\r\n",
    )
    .await;
    rig.queue.run_due().await;
    rig.clock.advance(6 * 3600);
    rig.queue.run_due().await;
    rig.clock.advance(6 * 3600);
    rig.queue.run_due().await;
    let got = rig.sink.received();
    assert_eq!(got.len(), 1);
    let parsed = parse_dsn(&got[0].data);
    let r = &parsed["recipients"][0];
    assert_eq!(r["status"], "4.4.7");
    assert_eq!(r["action"], "failed");
    assert_eq!(
        r["diagnostic-code"], "smtp; 451 4.4.0 try again",
        "last error reported"
    );
}

#[tokio::test]
async fn dns_outcomes_null_mx_nxdomain_servfail() {
    let rig = rig("", "", true).await;
    rig.dns.mx("nullmx.test", 0, ".");
    rig.dns.servfail("broken.test");
    submit(
        rig.server.relay,
        "app@sender.test",
        &["a@nullmx.test", "b@no-such-domain.test", "c@broken.test"],
        "Subject: dns\r\n\r\nx\r\n",
    )
    .await;
    rig.queue.run_due().await;
    let got = rig.sink.received();
    assert_eq!(got.len(), 1, "one DSN for the two permanent failures");
    let parsed = parse_dsn(&got[0].data);
    let statuses: Vec<(String, String)> = parsed["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["final-recipient"].as_str().unwrap().to_string(),
                r["status"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        statuses,
        vec![
            ("rfc822; a@nullmx.test".to_string(), "5.1.10".to_string()),
            (
                "rfc822; b@no-such-domain.test".to_string(),
                "5.1.2".to_string()
            )
        ]
    );
    // SERVFAIL is temporary: the message waits for c@broken.test.
    assert_eq!(rig.server.spool.live().len(), 1);
    let state = rig.server.spool.state(rig.server.spool.live()[0]).unwrap();
    assert_eq!(state.final_rcpts, vec![true, true, false]);
}

#[tokio::test]
async fn hundred_messages_reuse_few_connections() {
    let rig = rig("max_connections_per_destination = 4", "", false).await;
    let (mut c, _) = Raw::connect(rig.server.relay).await;
    c.expect("EHLO client.test", 250).await;
    for i in 0..100 {
        let r = c
            .send_mail(
                "app@sender.test",
                &["r@dest.test"],
                &format!("Subject: {i}\r\n\r\nbody {i}\r\n"),
            )
            .await;
        assert_eq!(r.code, 250);
    }
    rig.sink.wait_for(100).await;
    let conns = rig.sink.connections();
    assert!(conns <= 10, "{conns} connections for 100 messages");
    let max_active = rig.sink.state.lock().unwrap().max_active;
    assert!(
        max_active <= 4,
        "per-destination limit exceeded: {max_active}"
    );
    spool_empty(&rig.server).await;
}

#[tokio::test]
async fn per_destination_connection_limit_holds_under_load() {
    let rig = rig(
        "",
        "[[delivery.destination]]\nmx_suffix = \".sink.test\"\nmax_connections = 2\n",
        true,
    )
    .await;
    rig.sink.behaviour.lock().unwrap().data_delay = Some(Duration::from_millis(100));
    for i in 0..10 {
        let domain = if i % 2 == 0 {
            "dest.test"
        } else {
            "other.test"
        };
        submit(
            rig.server.relay,
            "app@sender.test",
            &[&format!("r{i}@{domain}")],
            "Subject: x\r\n\r\nx\r\n",
        )
        .await;
    }
    assert_eq!(rig.queue.run_due().await, 10);
    assert_eq!(rig.sink.received().len(), 10);
    let max_active = rig.sink.state.lock().unwrap().max_active;
    assert!(
        max_active <= 2,
        "two domains behind one MX share the limit: {max_active}"
    );
}

#[tokio::test]
async fn tls_required_defers_without_starttls_and_delivers_with_a_verified_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::test_ca(dir.path(), &["mx.sink.test"]);
    let rig = rig(
        &format!(
            "tls = \"require\"\ntls_ca_file = \"{}\"",
            ca.ca_file.display()
        ),
        "",
        true,
    )
    .await;
    submit(
        rig.server.relay,
        "app@sender.test",
        &["t@dest.test"],
        "Subject: tls\r\n\r\nTLS-BODY\r\n",
    )
    .await;
    rig.queue.run_due().await;
    assert!(
        rig.sink.received().is_empty(),
        "no STARTTLS offered: deferred, not sent in clear"
    );
    assert_eq!(rig.server.spool.live().len(), 1);
    let state = rig.server.spool.state(rig.server.spool.live()[0]).unwrap();
    let sched = postern::queue::Schedule::decode(&state.queue_data, 1);
    assert_eq!(sched.rcpts[0].last_status, "4.7.5");

    rig.sink.behaviour.lock().unwrap().tls = Some(ca.server.clone());
    rig.clock.advance(60);
    rig.queue.run_due().await;
    let got = rig.sink.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].tls.as_deref(), Some("TLSv1_3"));
    assert!(rig.server.spool.live().is_empty());
}

#[tokio::test]
async fn tls_required_refuses_an_untrusted_certificate() {
    let rig = rig("tls = \"require\"", "", true).await;
    rig.sink.behaviour.lock().unwrap().tls = Some(common::self_signed_server(&["mx.sink.test"]));
    submit(
        rig.server.relay,
        "app@sender.test",
        &["t@dest.test"],
        "Subject: tls\r\n\r\nx\r\n",
    )
    .await;
    rig.queue.run_due().await;
    assert!(rig.sink.received().is_empty());
    assert_eq!(rig.server.spool.live().len(), 1, "deferred");
}

#[tokio::test]
async fn opportunistic_tls_encrypts_with_any_certificate_and_ignores_injected_replies() {
    let rig = rig("", "", true).await;
    {
        let mut b = rig.sink.behaviour.lock().unwrap();
        b.tls = Some(common::self_signed_server(&["somewhere.else"]));
        // A man in the middle appends a reply to the plaintext STARTTLS answer; were it kept,
        // it would be taken as the answer to the EHLO inside TLS.
        b.inject_after_starttls = Some("250 injected\r\n".into());
    }
    submit(
        rig.server.relay,
        "app@sender.test",
        &["o@dest.test"],
        "Subject: opp\r\n\r\nx\r\n",
    )
    .await;
    rig.queue.run_due().await;
    let got = rig.sink.received();
    assert_eq!(got.len(), 1, "delivered");
    assert_eq!(got[0].tls.as_deref(), Some("TLSv1_3"));
}

#[tokio::test]
async fn smtputf8_message_to_a_host_without_it_bounces_5_6_7() {
    let rig = rig("", "", true).await;
    rig.sink.behaviour.lock().unwrap().no_smtputf8 = true;
    let (mut c, _) = Raw::connect(rig.server.relay).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<app@sender.test> SMTPUTF8", 250).await;
    c.expect("RCPT TO:<jürgen@dest.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: utf8\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    rig.queue.run_due().await;
    let got = rig.sink.received();
    assert_eq!(got.len(), 1, "only the DSN");
    let parsed = parse_dsn(&got[0].data);
    assert_eq!(parsed["recipients"][0]["status"], "5.6.7");
    assert_eq!(
        parsed["recipients"][0]["final-recipient"],
        "utf-8; jürgen@dest.test"
    );
}

#[tokio::test]
async fn smarthost_carries_every_domain_with_auth_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = common::test_ca(dir.path(), &["127.0.0.1"]);
    let sink = Sink::start("127.0.0.1").await;
    {
        let mut b = sink.behaviour.lock().unwrap();
        b.tls = Some(ca.server.clone());
        b.auth = Some(("relayuser".into(), "relaypass".into()));
    }
    let extra = format!(
        "[delivery]\nsmarthost = \"127.0.0.1:{}\"\ntls = \"require\"\ntls_ca_file = \"{}\"\n[delivery.smarthost_auth]\nusername = \"relayuser\"\npassword = \"relaypass\"\n[dns]\nnameservers = [\"127.0.0.1:9\"]\n",
        sink.addr.port(),
        ca.ca_file.display()
    );
    let (server, _) = TestServer::start_with(&extra, Options::default()).await;
    submit(
        server.relay,
        "app@sender.test",
        &["a@one.test", "b@two.test"],
        "Subject: smart\r\n\r\nx\r\n",
    )
    .await;
    let got = sink.wait_for(1).await;
    assert_eq!(
        got[0].rcpts,
        vec!["a@one.test", "b@two.test"],
        "no DNS needed, one transaction"
    );
    assert_eq!(got[0].authenticated.as_deref(), Some("relayuser"));
    assert!(got[0].tls.is_some());
}

#[tokio::test]
async fn delay_warning_is_sent_once_while_retrying() {
    let rig = rig(
        "retry_schedule = [\"30m\"]\ndelay_warning = \"1h\"",
        "",
        true,
    )
    .await;
    rig.sink
        .behaviour
        .lock()
        .unwrap()
        .rcpt_replies
        .insert("slow@dest.test".into(), "451 4.2.0 greylisted".into());
    submit(
        rig.server.relay,
        "app@sender.test",
        &["slow@dest.test"],
        "Subject: wait\r\n\r\nx\r\n",
    )
    .await;
    rig.queue.run_due().await;
    rig.clock.advance(1800);
    rig.queue.run_due().await;
    assert!(rig.sink.received().is_empty(), "no notice before an hour");
    rig.clock.advance(1800);
    rig.queue.run_due().await;
    let got = rig.sink.received();
    assert_eq!(got.len(), 1, "one delay notice");
    let parsed = parse_dsn(&got[0].data);
    assert_eq!(parsed["recipients"][0]["action"], "delayed");
    assert_eq!(parsed["recipients"][0]["status"], "4.2.0");
    rig.clock.advance(1800);
    rig.queue.run_due().await;
    assert_eq!(rig.sink.received().len(), 1, "not repeated");
    assert_eq!(
        rig.server.spool.live().len(),
        1,
        "the original is still queued"
    );
}

#[tokio::test]
async fn a_restart_keeps_retry_times() {
    let dns = DnsServer::start().await;
    let sink = Sink::start("127.0.0.1").await;
    dns.mx("dest.test", 10, "mx.sink.test");
    dns.addr("mx.sink.test", "127.0.0.1");
    sink.behaviour.lock().unwrap().data_replies = ["451 4.3.0 later".to_string()].into();
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[delivery]\nport = {}\nretry_schedule = [\"10m\"]\n[dns]\nnameservers = [\"{}\"]\n",
        sink.addr.port(),
        dns.nameserver()
    );
    let config = || {
        postern::config::Config::parse(&common::config_text(dir.path(), &extra), "t", dir.path())
            .unwrap()
    };
    let clock = Arc::new(ManualClock::new(SystemClock.now()));
    let start = |clock: Arc<ManualClock>| {
        let config = config();
        async move {
            postern::daemon::Daemon::start_with(
                config,
                Options {
                    clock,
                    run_queue: false,
                    ..Default::default()
                },
            )
            .await
            .unwrap()
        }
    };
    let daemon = start(clock.clone()).await;
    let relay = daemon.local_addrs()[0].0;
    let (queue, shutdown) = (daemon.queue.clone(), daemon.shutdown.clone());
    let task = tokio::spawn(daemon.run(Duration::from_secs(5)));
    let (mut c, _) = Raw::connect(relay).await;
    c.expect("EHLO client.test", 250).await;
    assert_eq!(
        c.send_mail("a@sender.test", &["r@dest.test"], "Subject: x\r\n\r\nx\r\n")
            .await
            .code,
        250
    );
    queue.run_due().await;
    assert_eq!(sink.state.lock().unwrap().data_attempts.len(), 1);
    drop(c);
    shutdown.cancel();
    task.await.unwrap();
    drop(queue);
    // sled releases its lock when the last handle goes; give the ledger writer a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let daemon = start(clock.clone()).await;
    let queue = daemon.queue.clone();
    assert_eq!(queue.len(), 1, "recovered");
    clock.advance(599);
    assert_eq!(
        queue.run_due().await,
        0,
        "the retry time survived the restart"
    );
    clock.advance(1);
    assert_eq!(queue.run_due().await, 1);
    assert_eq!(sink.received().len(), 1, "delivered on schedule");
}

#[tokio::test]
async fn idle_pooled_connections_are_closed_after_the_timeout() {
    let rig = rig("idle_timeout = \"1s\"", "", true).await;
    submit(
        rig.server.relay,
        "app@sender.test",
        &["r@dest.test"],
        "Subject: idle\r\n\r\nx\r\n",
    )
    .await;
    rig.queue.run_due().await;
    assert_eq!(rig.sink.received().len(), 1);
    assert_eq!(
        rig.sink.state.lock().unwrap().active,
        1,
        "kept open for reuse"
    );
    let start = std::time::Instant::now();
    while rig.sink.state.lock().unwrap().active > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "idle connection never closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rig.queue.deliverer().idle_connections(), 0);
}
