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
    let empty = common::eventually(Duration::from_secs(5), || server.spool.live().is_empty()).await;
    assert!(
        empty,
        "spool still holds {} messages",
        server.spool.live().len()
    );
}

/// The ledger's records about `address`, through the admin socket of the running daemon.
async fn ledger_records(server: &TestServer, address: &str) -> Vec<serde_json::Value> {
    let export = postern::admin::request(
        &server.data_dir().join("admin.sock"),
        &postern::admin::Request::Export {
            address: address.into(),
        },
    )
    .await
    .expect("export");
    export["records"].as_array().expect("records").clone()
}

#[tokio::test]
async fn end_to_end_by_mx_and_body_destroyed() {
    let rig = rig("", "", true).await;
    // Dot-stuffed as a client sends it; the content line is ".leading dot".
    let body = "Subject: e2e\r\n\r\n..leading dot\r\nE2E-MARKER\r\n";
    let id = submit(
        rig.server.relay,
        "app@sender.test",
        &["a@dest.test", "b@dest.test"],
        body,
    )
    .await;
    // What destruction must remove: the message's sealed bytes, as they are on disk now.
    let sealed = common::queued_records(&rig.server.data_dir(), &id);
    assert_eq!(rig.queue.run_due().await, 1);
    let got = rig.sink.received();
    assert_eq!(got.len(), 1);
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
    let records = ledger_records(&rig.server, "a@dest.test").await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(records[0]["tls"].is_null(), "sent in clear: {records:?}");
    assert!(rig.server.spool.live().is_empty());
    // The body is gone from disk: its record's range reads back as zeros (or its segment is
    // gone), and its ciphertext is nowhere in the data directory.
    common::assert_destroyed(&sealed, &rig.server.data_dir());
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
    // The message record and the state records the two deferrals wrote.
    let sealed = common::queued_records(&rig.server.data_dir(), &id);
    assert!(sealed.len() >= 2, "{sealed:?}");
    rig.clock.advance(1);
    assert_eq!(rig.queue.run_due().await, 1);

    let got = rig.sink.received();
    assert_eq!(got.len(), 1, "delivered exactly once");
    assert!(contains(&got[0].data, format!("id {id};").as_bytes()));
    assert!(rig.server.spool.live().is_empty(), "final");
    common::assert_destroyed(&sealed, &rig.server.data_dir());
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
    for _ in 0..30 {
        rig.clock.advance(3600);
        rig.queue.run_due().await;
        if rig.server.spool.live().is_empty() {
            break;
        }
    }
    let rcpts = rig.sink.state.lock().unwrap().rcpt_attempts.clone();
    let tried = |who: &str| rcpts.iter().filter(|(_, r, _)| r == who).count();
    assert_eq!(
        tried("slow@dest.test"),
        24,
        "hourly from 0 h to 23 h; at 24 h it expires untried"
    );
    // The expiry is final with 4.4.7 (the ledger keeps the outcome and its code).
    let records = ledger_records(&rig.server, "slow@dest.test").await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["outcome"], "expired", "{records:?}");
    assert_eq!(records[0]["last_code"], "4.4.7", "{records:?}");
    // Its notice went to the sender once, from the null sender; refused, it caused nothing.
    let notices: Vec<_> = rcpts
        .iter()
        .filter(|(from, _, _)| from.is_empty())
        .collect();
    assert_eq!(notices.len(), 1, "{rcpts:?}");
    assert_eq!(notices[0].1, "app@sender.test");
    assert_eq!(tried("app@sender.test"), 1, "no bounce of the bounce");
    let data_attempts = rig.sink.state.lock().unwrap().data_attempts.clone();
    assert!(data_attempts.is_empty(), "no DATA: every RCPT was refused");
    assert!(
        rig.server.spool.live().is_empty(),
        "DSN bounced, no bounce of the bounce queued"
    );
}

/// The expiry notice names each expired recipient with its own last error and the host that
/// gave it, and not the recipient delivered at the first attempt (listed first, so that an
/// expiry filed under the wrong recipient index would show).
#[tokio::test]
async fn expiry_notice_reaches_the_sender() {
    let rig = rig(
        "retry_schedule = [\"6h\"]\nmax_queue_lifetime = \"12h\"",
        "",
        true,
    )
    .await;
    {
        let mut b = rig.sink.behaviour.lock().unwrap();
        b.rcpt_replies
            .insert("slow@dest.test".into(), "451 4.4.0 try again".into());
        b.rcpt_replies
            .insert("busy@dest.test".into(), "452 4.2.2 mailbox full".into());
    }
    submit(
        rig.server.relay,
        "app@sender.test",
        &["ok@dest.test", "slow@dest.test", "busy@dest.test"],
        "Subject: expire\r\n\r\nx\r\n",
    )
    .await;
    rig.queue.run_due().await;
    assert_eq!(rig.sink.received().len(), 1, "ok@dest.test at once");
    rig.clock.advance(6 * 3600);
    rig.queue.run_due().await;
    rig.clock.advance(6 * 3600);
    rig.queue.run_due().await;
    let got = rig.sink.received();
    assert_eq!(got.len(), 2, "the delivery, then one notice");
    let parsed = parse_dsn(&got[1].data);
    let rcpts = parsed["recipients"].as_array().unwrap();
    let fields = |r: &serde_json::Value, k: &str| r[k].as_str().unwrap_or("").to_string();
    let listed: Vec<[String; 4]> = rcpts
        .iter()
        .map(|r| {
            ["final-recipient", "status", "remote-mta", "diagnostic-code"].map(|k| fields(r, k))
        })
        .collect();
    let expect = |rcpt: &str, reply: &str| {
        [
            format!("rfc822; {rcpt}"),
            "4.4.7".to_string(),
            "dns; mx.sink.test".to_string(),
            format!("smtp; {reply}"),
        ]
    };
    assert_eq!(
        listed,
        vec![
            expect("slow@dest.test", "451 4.4.0 try again"),
            expect("busy@dest.test", "452 4.2.2 mailbox full"),
        ]
    );
    assert!(rcpts.iter().all(|r| r["action"] == "failed"), "{rcpts:?}");
    assert!(rig.server.spool.live().is_empty());
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
    let got = rig.sink.wait_for(100).await;
    let conns = rig.sink.connections();
    assert!(conns <= 10, "{conns} connections for 100 messages");
    // Reuse happened: fewer connections than messages, and connections carrying several.
    let mut per_connection = std::collections::HashMap::new();
    for m in &got {
        *per_connection.entry(m.connection).or_insert(0usize) += 1;
    }
    let most = per_connection.values().copied().max().unwrap_or(0);
    assert!(
        conns < 100 && most > 1,
        "{conns} connections, at most {most} messages on one"
    );
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
    assert_eq!(
        max_active, 2,
        "two domains behind one MX share the limit, and it is used: {max_active}"
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
    // The ledger keeps how it went: over TLS 1.3, the certificate verified.
    let records = ledger_records(&rig.server, "t@dest.test").await;
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["outcome"], "delivered", "{records:?}");
    let tls = records[0]["tls"].as_str().unwrap_or_default();
    assert!(
        tls.starts_with("TLSv1.3 TLS13_"),
        "version and cipher: {records:?}"
    );
    assert_eq!(records[0]["tls_verified"], true, "{records:?}");
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
    assert_deferred_for_tls(&rig);
}

/// The message went nowhere, though Postern reached the sink, and waits with 4.7.5.
fn assert_deferred_for_tls(rig: &Rig) {
    assert!(rig.sink.connections() >= 1, "Postern never connected");
    assert!(rig.sink.received().is_empty(), "sent without verified TLS");
    assert_eq!(rig.server.spool.live().len(), 1, "deferred");
    let state = rig.server.spool.state(rig.server.spool.live()[0]).unwrap();
    assert!(!state.final_rcpts[0], "deferred, not bounced");
    let sched = postern::queue::Schedule::decode(&state.queue_data, 1);
    assert_eq!(sched.rcpts[0].last_status, "4.7.5");
}

#[tokio::test]
async fn tls_required_refuses_a_trusted_certificate_for_another_name() {
    let dir = tempfile::tempdir().unwrap();
    // Signed by a CA Postern trusts, but for a name that is not the MX host's.
    let ca = common::test_ca(dir.path(), &["elsewhere.test"]);
    let rig = rig(
        &format!(
            "tls = \"require\"\ntls_ca_file = \"{}\"",
            ca.ca_file.display()
        ),
        "",
        true,
    )
    .await;
    rig.sink.behaviour.lock().unwrap().tls = Some(ca.server.clone());
    submit(
        rig.server.relay,
        "app@sender.test",
        &["t@dest.test"],
        "Subject: tls\r\n\r\nx\r\n",
    )
    .await;
    rig.queue.run_due().await;
    assert_deferred_for_tls(&rig);
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
    // Encrypted, but to a certificate nobody vouches for: the ledger says so.
    let records = ledger_records(&rig.server, "o@dest.test").await;
    assert_eq!(records.len(), 1, "{records:?}");
    let tls = records[0]["tls"].as_str().unwrap_or_default();
    assert!(
        tls.starts_with("TLSv1.3 TLS13_"),
        "version and cipher: {records:?}"
    );
    assert_eq!(records[0]["tls_verified"], false, "{records:?}");
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
    let ledger = daemon.ledger.clone();
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
    // sled releases its lock when the last ledger handle goes: wait until ours is the last
    // (the daemon's tasks drop theirs as they end), then drop it, which joins the writer.
    let last = common::eventually(Duration::from_secs(5), || Arc::strong_count(&ledger) == 1).await;
    assert!(last, "the stopped daemon still holds the ledger");
    drop(ledger);

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

#[tokio::test]
async fn a_connection_carries_at_most_messages_per_connection() {
    let rig = rig("messages_per_connection = 2", "", true).await;
    // One at a time: each finds the previous one's connection in the pool, if it is kept.
    in_turn(&rig, 6).await;
    let got = rig.sink.received();
    let on_each: Vec<usize> = (1..=rig.sink.connections())
        .map(|c| got.iter().filter(|m| m.connection == c).count())
        .collect();
    assert_eq!(
        on_each,
        vec![2, 2, 2],
        "two messages per connection, reused"
    );
}

/// Sends `n` messages one after another, each delivered by its own queue run, and checks that
/// each was delivered then and there (nothing left to retry).
async fn in_turn(rig: &Rig, n: usize) {
    for i in 0..n {
        submit(
            rig.server.relay,
            "app@sender.test",
            &["r@dest.test"],
            &format!("Subject: {i}\r\n\r\nx\r\n"),
        )
        .await;
        assert_eq!(rig.queue.run_due().await, 1);
        assert!(
            rig.server.spool.live().is_empty(),
            "message {i} was not delivered at its first attempt"
        );
    }
    assert_eq!(rig.sink.received().len(), n);
}

#[tokio::test]
async fn a_pooled_connection_is_reused_without_an_rset_round_trip() {
    let rig = rig("", "", true).await;
    in_turn(&rig, 3).await;
    assert_eq!(
        rig.sink.connections(),
        1,
        "one connection carried all three"
    );
    assert_eq!(rig.sink.state.lock().unwrap().rsets, 0);
}

#[tokio::test]
async fn a_connection_stays_pooled_after_a_refused_transaction() {
    let rig = rig("", "", true).await;
    rig.sink
        .behaviour
        .lock()
        .unwrap()
        .mail_replies
        .push_back("451 4.3.0 try again later".into());
    submit(
        rig.server.relay,
        "app@sender.test",
        &["r@dest.test"],
        "Subject: first\r\n\r\nx\r\n",
    )
    .await;
    assert_eq!(rig.queue.run_due().await, 1);
    assert!(rig.sink.received().is_empty(), "MAIL was refused");
    // The refusal was answered by RSET and the connection kept: the retry goes out on it.
    rig.clock.advance(3600);
    assert_eq!(rig.queue.run_due().await, 1);
    assert_eq!(rig.sink.received().len(), 1);
    assert_eq!(
        rig.sink.connections(),
        1,
        "a new connection after the refusal"
    );
    assert_eq!(rig.sink.state.lock().unwrap().rsets, 1);
}

#[tokio::test]
async fn a_pooled_connection_the_server_closed_is_not_used() {
    let rig = rig("", "", true).await;
    rig.sink.behaviour.lock().unwrap().close_after_message = true;
    in_turn(&rig, 3).await;
    let on_each: Vec<usize> = rig.sink.received().iter().map(|m| m.connection).collect();
    assert_eq!(on_each, vec![1, 2, 3], "a new connection for each message");
}

#[tokio::test]
async fn a_close_that_crosses_the_reuse_of_a_pooled_connection_costs_no_retry() {
    let rig = rig("", "", true).await;
    rig.sink.behaviour.lock().unwrap().close_at_next_mail = true;
    in_turn(&rig, 3).await;
    // Each reuse is cut at MAIL (after the client's look found the connection open); the
    // message goes on a new connection in the same attempt, not to the retry schedule.
    let on_each: Vec<usize> = rig.sink.received().iter().map(|m| m.connection).collect();
    assert_eq!(on_each, vec![1, 2, 3]);
    assert_eq!(rig.sink.connections(), 3);
}

#[tokio::test]
async fn the_next_smarthost_is_tried_when_the_first_is_down() {
    let sink = Sink::start("127.0.0.1").await;
    // A port nobody listens on: bound, then released.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let down_port = down.local_addr().unwrap().port();
    drop(down);
    let extra = format!(
        "[delivery]\nsmarthost = [\"127.0.0.1:{down_port}\", \"127.0.0.1:{}\"]\n[dns]\nnameservers = [\"127.0.0.1:9\"]\n",
        sink.addr.port()
    );
    let (server, queue, _clock) = TestServer::start_manual(&extra).await;
    submit(
        server.relay,
        "app@sender.test",
        &["a@one.test"],
        "Subject: fallback\r\n\r\nx\r\n",
    )
    .await;
    queue.run_due().await;
    assert_eq!(sink.received().len(), 1, "delivered through the second");
    assert!(server.spool.live().is_empty());
    let records = ledger_records(&server, "a@one.test").await;
    assert_eq!(records[0]["outcome"], "delivered", "{records:?}");
    assert_eq!(
        records[0]["remote_ip"],
        format!("127.0.0.1:{}", sink.addr.port()),
        "{records:?}"
    );
}

#[tokio::test]
async fn messages_per_minute_spaces_deliveries_to_a_destination() {
    // 300 a minute: one every 200 ms. Unpaced, six messages go out together in a few ms.
    let rig = rig(
        "",
        "[[delivery.destination]]\ndomain = \"dest.test\"\nmessages_per_minute = 300\n",
        true,
    )
    .await;
    for i in 0..6 {
        submit(
            rig.server.relay,
            "app@sender.test",
            &[&format!("r{i}@dest.test")],
            "Subject: paced\r\n\r\nx\r\n",
        )
        .await;
    }
    // other.test has no rate: its message is not held back by dest.test's.
    submit(
        rig.server.relay,
        "app@sender.test",
        &["free@other.test"],
        "Subject: free\r\n\r\nx\r\n",
    )
    .await;
    assert_eq!(rig.queue.run_due().await, 7);
    let got = rig.sink.received();
    assert_eq!(got.len(), 7);
    let mut paced: Vec<std::time::Instant> = got
        .iter()
        .filter(|m| m.rcpts[0].ends_with("@dest.test"))
        .map(|m| m.at)
        .collect();
    paced.sort();
    let gaps: Vec<Duration> = paced.windows(2).map(|w| w[1] - w[0]).collect();
    // The pacer starts each message 200 ms after the previous one's start; delivery times vary,
    // so allow some slack per gap but require the total.
    let span = paced[5] - paced[0];
    assert!(
        span >= Duration::from_millis(900),
        "six messages in {span:?} at 300 a minute: {gaps:?}"
    );
    assert!(span < Duration::from_secs(20), "{span:?}");
    let free = got
        .iter()
        .find(|m| m.rcpts[0] == "free@other.test")
        .unwrap();
    assert!(
        free.at < paced[5],
        "the unpaced destination waited for the paced one"
    );
}

/// Routing through dnsmasq (not the hickory-based test server): an MX answer too big for UDP,
/// whose only reachable exchanger is in the part that only TCP carries.
#[tokio::test]
async fn delivery_routed_by_a_real_dns_server_over_tcp() {
    let sink = Sink::start("127.0.0.1").await;
    let mut records = common::dnsmasq::big_mx_answer("big.test", 150, "mx.sink.test");
    records.push("--host-record=mx.sink.test,127.0.0.1".into());
    let Some(dns) = common::dnsmasq::Dnsmasq::start(&records) else {
        return;
    };
    let extra = format!(
        "[delivery]\nport = {}\n[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\n",
        sink.addr.port(),
        dns.nameserver()
    );
    let (server, queue, _clock) = TestServer::start_manual(&extra).await;
    submit(
        server.relay,
        "app@sender.test",
        &["someone@big.test"],
        "Subject: big\r\n\r\nx\r\n",
    )
    .await;
    queue.run_due().await;
    let got = sink.received();
    assert_eq!(got.len(), 1, "dnsmasq log: {}", dns.log());
    assert_eq!(got[0].rcpts, vec!["someone@big.test"]);
    assert!(dns.tcp_queries("MX", "big.test") >= 1, "{}", dns.log());
}

/// The spool's segment files, by path.
fn segments(server_data: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(server_data.join("spool"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    out.sort();
    out
}

/// A segment goes (with its key) once its last message is final, not before; the segment being
/// written stays even when all its messages are final. Segments written by an earlier run are
/// no longer active, hence the restart.
#[tokio::test]
async fn an_emptied_segment_is_unlinked_with_its_key_and_not_before() {
    let dns = DnsServer::start().await;
    let sink = Sink::start("127.0.0.1").await;
    dns.mx("dest.test", 10, "mx.sink.test");
    dns.addr("mx.sink.test", "127.0.0.1");
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "[delivery]\nport = {}\nretry_schedule = [\"1m\"]\n[dns]\nnameservers = [\"{}\"]\n",
        sink.addr.port(),
        dns.nameserver()
    );
    let clock = Arc::new(ManualClock::new(SystemClock.now()));
    let start = || {
        let config = postern::config::Config::parse(
            &common::config_text(dir.path(), &extra),
            "t",
            dir.path(),
        )
        .unwrap();
        let options = Options {
            clock: clock.clone(),
            run_queue: false,
            ..Default::default()
        };
        async move {
            postern::daemon::Daemon::start_with(config, options)
                .await
                .unwrap()
        }
    };
    let data = dir.path().join("data");

    // First run: two messages, then a clean stop.
    let daemon = start().await;
    let relay = daemon.local_addrs()[0].0;
    let (ledger, shutdown) = (daemon.ledger.clone(), daemon.shutdown.clone());
    let task = tokio::spawn(daemon.run(Duration::from_secs(5)));
    let a = submit(
        relay,
        "app@sender.test",
        &["a@dest.test"],
        "Subject: a\r\n\r\na\r\n",
    )
    .await;
    submit(
        relay,
        "app@sender.test",
        &["b@dest.test"],
        "Subject: b\r\n\r\nb\r\n",
    )
    .await;
    shutdown.cancel();
    task.await.unwrap();
    let last = common::eventually(Duration::from_secs(5), || Arc::strong_count(&ledger) == 1).await;
    assert!(last, "the stopped daemon still holds the ledger");
    drop(ledger);
    let old = common::queued_records(&data, &a)[0].segment.clone();
    let old_key = old.with_extension("key");
    assert!(old_key.exists());

    // Second run writes elsewhere. a is delivered, b deferred: the old segment must stay.
    let daemon = start().await;
    let relay = daemon.local_addrs()[0].0;
    let (queue, spool) = (daemon.queue.clone(), daemon.spool.clone());
    tokio::spawn(daemon.run(Duration::from_secs(5)));
    assert_eq!(queue.len(), 2, "recovered");
    sink.behaviour
        .lock()
        .unwrap()
        .rcpt_replies
        .insert("b@dest.test".into(), "450 4.2.1 busy".into());
    assert_eq!(queue.run_due().await, 2);
    assert_eq!(spool.live().len(), 1, "b waits");
    assert!(old.exists(), "a segment with a live message was unlinked");
    let b = spool.read(spool.live()[0]).await.expect("b still readable");
    assert_eq!(b.envelope.recipients, vec!["b@dest.test"]);

    sink.behaviour.lock().unwrap().rcpt_replies.clear();
    clock.advance(60);
    assert_eq!(queue.run_due().await, 1);
    assert!(spool.live().is_empty());
    assert!(!old.exists(), "the emptied segment is still there");
    assert!(!old_key.exists(), "its key is still there");

    // The active segment stays, though everything in it is final.
    let c = submit(
        relay,
        "app@sender.test",
        &["c@dest.test"],
        "Subject: c\r\n\r\nc\r\n",
    )
    .await;
    let active = common::queued_records(&data, &c)[0].segment.clone();
    assert_ne!(active, old);
    assert_eq!(queue.run_due().await, 1);
    assert!(spool.live().is_empty());
    assert!(active.exists(), "the segment being written was unlinked");
    assert_eq!(segments(&data), vec![active]);
    assert_eq!(sink.received().len(), 3);
}
