//! Privacy end to end: nothing personal in clear on disk or in logs after a delivery, subject
//! export and erasure through the running daemon, strict domains, and the suppression list.

mod common;

use std::time::Duration;

use common::dns::DnsServer;
use common::sink::Sink;
use common::{contains, submit, Child, Raw, TestServer};
use postern::admin::{request, Request};
use postern::clock::Clock;
use postern::daemon::Options;

fn routing(sink: &Sink, dns: &DnsServer) -> String {
    for d in ["dest.test", "shop.test", "private.test"] {
        dns.mx(d, 10, "mx.sink.test");
    }
    dns.addr("mx.sink.test", "127.0.0.1");
    format!(
        "[delivery]\nport = {}\nretry_schedule = [\"1m\"]\n[dns]\nnameservers = [\"{}\"]\n",
        sink.addr.port(),
        dns.nameserver()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_delivery_no_address_or_body_in_the_data_directory_or_the_log() {
    let dns = DnsServer::start().await;
    let sink = Sink::start("127.0.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let extra = routing(&sink, &dns);
    std::fs::write(
        dir.path().join("config.toml"),
        common::config_text(dir.path(), &extra),
    )
    .unwrap();
    let mut child = Child::spawn(dir.path(), None);
    submit(
        child.relay,
        "jane.sender@shop.test",
        &["john.rcpt@dest.test"],
        "From: jane.sender@shop.test\r\nSubject: order\r\n\r\nBODY-MARKER-90210\r\n",
    )
    .await;
    sink.wait_for(1).await;
    // The outcome is logged just before the queue records it; SIGTERM then drains the queue
    // and flushes the ledger before the process exits.
    let logged = common::eventually(Duration::from_secs(10), || {
        child.log().contains(" delivered")
    })
    .await;
    assert!(logged, "the delivery is logged: {}", child.log());
    assert!(child.terminate().success());
    let log = child.log();
    // The ledger on disk holds the delivery (so the search below looks where it is).
    let records = ledger_on_disk(dir.path(), "john.rcpt@dest.test");
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].outcome, postern::ledger::Outcome::Delivered);
    let raw = common::all_bytes(&dir.path().join("data"));
    for needle in ["john.rcpt", "jane.sender", "BODY-MARKER-90210"] {
        assert!(
            !contains(&raw, needle.as_bytes()),
            "{needle} in the data directory"
        );
        assert!(!log.contains(needle), "{needle} in the log");
    }
    // The log names the recipient by pseudonym and domain.
    let rcpts = common::logged_rcpts(&log);
    assert!(!rcpts.is_empty(), "{log}");
    assert!(
        rcpts
            .iter()
            .all(|r| common::is_pseudonym_at(r, "dest.test")),
        "{rcpts:?}"
    );
}

/// Opens the ledger a stopped daemon left in `dir` (config.toml there) and exports `address`.
fn ledger_on_disk(dir: &std::path::Path, address: &str) -> Vec<postern::ledger::Record> {
    let text = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    let config = postern::config::Config::parse(&text, "test", dir).unwrap();
    let data = dir.join("data");
    let master = postern::crypto::load_or_create_master_key(&data.join("master.key")).unwrap();
    let now = postern::clock::SystemClock.now();
    let ledger = postern::ledger::Ledger::open(
        &data,
        &master,
        &config.privacy,
        config.limits.ledger_cache,
        now,
    )
    .unwrap();
    ledger.export(address).unwrap().records
}

/// A daemon child whose deliveries all defer (its resolver never answers), logging recipients
/// as `log_addresses` says; returns its log once a deferral is in it.
async fn log_of_a_deferral(log_addresses: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    common::write_child_config(
        dir.path(),
        &format!("[privacy]\nlog_addresses = \"{log_addresses}\"\n"),
    );
    let mut child = Child::spawn(dir.path(), None);
    submit(
        child.relay,
        "jane.sender@shop.test",
        &["john.rcpt@dest.test"],
        "From: jane.sender@shop.test\r\n\r\nx\r\n",
    )
    .await;
    let deferred = common::eventually(Duration::from_secs(20), || {
        child.log().contains(" deferred")
    })
    .await;
    assert!(deferred, "no deferral logged: {}", child.log());
    assert!(child.terminate().success());
    child.log()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_addresses_clear_names_the_recipient() {
    let log = log_of_a_deferral("clear").await;
    assert_eq!(
        common::logged_rcpts(&log),
        vec!["john.rcpt@dest.test"],
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_addresses_none_names_no_recipient_at_all() {
    let log = log_of_a_deferral("none").await;
    assert_eq!(common::logged_rcpts(&log), vec!["-"], "{log}");
    for needle in ["john.rcpt", "dest.test", "jane.sender"] {
        assert!(!log.contains(needle), "{needle} in the log: {log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_addresses_pseudonym_is_the_default() {
    let log = log_of_a_deferral("pseudonym").await;
    let rcpts = common::logged_rcpts(&log);
    assert_eq!(rcpts.len(), 1, "{log}");
    assert!(common::is_pseudonym_at(&rcpts[0], "dest.test"), "{log}");
    assert!(!log.contains("john.rcpt"), "{log}");
}

#[tokio::test]
async fn export_and_erase_through_the_daemon() {
    let (server, queue) = TestServer::start_with(
        "",
        Options {
            run_queue: false,
            ..Default::default()
        },
    )
    .await;
    let socket = server.data_dir().join("admin.sock");
    let send = |from: &'static str, to: Vec<&'static str>| {
        let relay = server.relay;
        async move {
            submit(relay, from, &to, &format!("From: {from}\r\n\r\nx\r\n")).await;
        }
    };
    send(
        "shop@shop.test",
        vec!["subject@dest.test", "other@dest.test"],
    )
    .await;
    send("shop@shop.test", vec!["Subject@DEST.test"]).await;
    send("shop@shop.test", vec!["other@dest.test"]).await;
    assert_eq!(queue.len(), 3);

    let export = request(
        &socket,
        &Request::Export {
            address: "subject@dest.test".into(),
        },
    )
    .await
    .unwrap();
    let records = export["records"].as_array().unwrap();
    assert_eq!(records.len(), 2, "exactly the subject's records: {export}");
    for r in records {
        assert_eq!(
            r["recipient"].as_str().unwrap().to_lowercase(),
            "subject@dest.test"
        );
        assert_eq!(r["outcome"], "queued");
    }

    request(
        &socket,
        &Request::SuppressAdd {
            address: "subject@dest.test".into(),
            reason: postern::suppress::Reason::Unsubscribe,
            expires_at: None,
        },
    )
    .await
    .unwrap();
    let erased = request(
        &socket,
        &Request::Erase {
            address: "subject@dest.test".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(erased["records_removed"], 2);
    assert_eq!(erased["queued_recipients_removed"], 2);
    assert_eq!(erased["suppression_kept"], true);
    let export = request(
        &socket,
        &Request::Export {
            address: "subject@dest.test".into(),
        },
    )
    .await
    .unwrap();
    assert!(export["records"].as_array().unwrap().is_empty());
    // The message only for the subject is gone (body destroyed); the shared one keeps "other".
    assert_eq!(server.spool.live().len(), 2);
    for m in server.messages().await {
        let pending: Vec<&String> = m
            .envelope
            .recipients
            .iter()
            .enumerate()
            .filter(|(i, _)| !m.state.final_rcpts[*i])
            .map(|(_, r)| r)
            .collect();
        assert_eq!(pending, vec!["other@dest.test"]);
    }
    let other = request(
        &socket,
        &Request::Export {
            address: "other@dest.test".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        other["records"].as_array().unwrap().len(),
        2,
        "others untouched"
    );

    let report = request(&socket, &Request::Report).await.unwrap();
    assert_eq!(report["retention_days"], 30);
    assert_eq!(report["records"], 2);
    assert_eq!(report["suppression_entries"], 1);
    assert_eq!(report["key_epochs_held"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn strict_domain_records_hold_no_recipient() {
    let dns = DnsServer::start().await;
    let sink = Sink::start("127.0.0.1").await;
    let extra = format!(
        "{}[privacy]\nstrict_domains = [\"private.test\"]\n",
        routing(&sink, &dns)
    );
    let (server, queue) = TestServer::start_with(
        &extra,
        Options {
            run_queue: false,
            ..Default::default()
        },
    )
    .await;
    submit(
        server.relay,
        "news@private.test",
        &["reader@dest.test"],
        "From: news@private.test\r\n\r\nx\r\n",
    )
    .await;
    queue.run_due().await;
    assert_eq!(sink.received().len(), 1);
    let socket = server.data_dir().join("admin.sock");
    let export = request(
        &socket,
        &Request::Export {
            address: "reader@dest.test".into(),
        },
    )
    .await
    .unwrap();
    assert!(export["records"].as_array().unwrap().is_empty());
    let report = request(&socket, &Request::Report).await.unwrap();
    assert_eq!(report["records"], 1, "the count remains");
}

#[tokio::test]
async fn three_hard_bounces_then_refused_at_rcpt_and_queued_mail_is_dropped() {
    let dns = DnsServer::start().await;
    let sink = Sink::start("127.0.0.1").await;
    sink.behaviour.lock().unwrap().rcpt_replies.insert(
        "gone@dest.test".into(),
        "550 5.1.1 <gone@dest.test>: no such user".into(),
    );
    let (server, queue, clock) = TestServer::start_manual(&routing(&sink, &dns)).await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    for _ in 0..3 {
        let r = c
            .send_mail(
                "shop@shop.test",
                &["gone@dest.test"],
                "From: shop@shop.test\r\n\r\nx\r\n",
            )
            .await;
        assert_eq!(r.code, 250);
        queue.run_due().await;
    }
    c.expect("MAIL FROM:<shop@shop.test>", 250).await;
    let r = c.expect("RCPT TO:<Gone@dest.test>", 550).await;
    assert_eq!(r.enhanced(), "5.7.1");
    assert!(r.text.contains("suppression list"), "{r:?}");
    c.expect("RSET", 250).await;

    // Mail queued before a suppression is dropped, not delivered, with no notice.
    sink.behaviour.lock().unwrap().data_replies = ["451 4.3.0 later".to_string()].into();
    let r = c
        .send_mail(
            "shop@shop.test",
            &["later@dest.test"],
            "From: shop@shop.test\r\n\r\nx\r\n",
        )
        .await;
    assert_eq!(r.code, 250);
    let id = r.text.rsplit(' ').next().unwrap().to_string();
    queue.run_due().await;
    assert_eq!(server.spool.live().len(), 1, "deferred, still queued");
    let sealed = common::queued_records(&server.data_dir(), &id);
    let socket = server.data_dir().join("admin.sock");
    request(
        &socket,
        &Request::SuppressAdd {
            address: "later@dest.test".into(),
            reason: postern::suppress::Reason::Complaint,
            expires_at: None,
        },
    )
    .await
    .unwrap();
    let received_before = sink.received().len();
    let attempts_before = sink.state.lock().unwrap().rcpt_attempts.len();
    clock.advance(60);
    assert_eq!(
        queue.run_due().await,
        1,
        "the retry ran, and caused no notice"
    );
    assert_eq!(sink.received().len(), received_before, "not delivered");
    assert_eq!(
        sink.state.lock().unwrap().rcpt_attempts.len(),
        attempts_before,
        "not even tried"
    );
    // run_due returns once the message is final: dropped from the spool, bytes destroyed.
    assert!(
        server.spool.live().is_empty(),
        "the suppressed message stays queued"
    );
    common::assert_destroyed(&sealed, &server.data_dir());
    let export = request(
        &socket,
        &Request::Export {
            address: "later@dest.test".into(),
        },
    )
    .await
    .unwrap();
    assert_eq!(export["records"][0]["outcome"], "suppressed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppress_cli_talks_to_the_running_daemon() {
    let server = TestServer::start("").await;
    let config = server.dir.path().join("cli.toml");
    std::fs::write(&config, common::config_text(server.dir.path(), "")).unwrap();
    let cli = |args: &[&str]| {
        // The daemon answering runs on this runtime: block only this worker thread.
        let out = tokio::task::block_in_place(|| {
            std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
                .args(args)
                .arg("--config")
                .arg(&config)
                .output()
                .unwrap()
        });
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let list = server.dir.path().join("list.txt");
    std::fs::write(&list, "# opt-outs\na@dest.test,unsubscribe\nb@dest.test\n").unwrap();
    assert_eq!(
        cli(&["suppress", "import", list.to_str().unwrap()])["imported"],
        2
    );
    cli(&[
        "suppress",
        "add",
        "c@dest.test",
        "--reason",
        "complaint",
        "--expires",
        "30d",
    ]);
    let entries = cli(&["suppress", "list"]);
    assert_eq!(entries.as_array().unwrap().len(), 3);
    let text = entries.to_string();
    assert!(
        !text.contains("dest.test"),
        "only pseudonyms are listed: {text}"
    );
    assert_eq!(cli(&["suppress", "remove", "b@dest.test"])["removed"], true);
    assert_eq!(cli(&["suppress", "export"]).as_array().unwrap().len(), 2);

    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<shop@shop.test>", 250).await;
    c.expect("RCPT TO:<a@dest.test>", 550).await;
    c.expect("RCPT TO:<b@dest.test>", 250).await;
    let report = cli(&["privacy", "report"]);
    assert_eq!(report["suppression_entries"], 2);
}

/// Every pseudonymiser of a data directory, from its key files (each generation, and the
/// suppression list's), as an intruder holding the whole directory (master key included) would
/// compute them.
fn pseudonyms_of(data: &std::path::Path) -> Vec<postern::crypto::Pseudonymizer> {
    let master = postern::crypto::load_or_create_master_key(&data.join("master.key")).unwrap();
    let ledger = data.join("ledger");
    let mut keys = vec![(
        ledger.join("suppress-id.key"),
        "postern suppression identity key".to_string(),
    )];
    for entry in std::fs::read_dir(ledger.join("pseudonyms")).unwrap() {
        let path = entry.unwrap().path();
        let start = path.file_stem().unwrap().to_str().unwrap().to_string();
        keys.push((path, format!("postern pseudonym key from {start}")));
    }
    keys.iter()
        .map(|(path, purpose)| {
            let key = master.read_wrapped(path, purpose).unwrap();
            postern::crypto::Pseudonymizer::new(&key, true)
        })
        .collect()
}

#[tokio::test]
async fn after_the_purge_nothing_on_disk_links_an_address_or_pseudonym_to_the_day() {
    let dns = DnsServer::start().await;
    let sink = Sink::start("127.0.0.1").await;
    sink.behaviour.lock().unwrap().rcpt_replies.insert(
        "gone@dest.test".into(),
        "550 5.1.1 <gone@dest.test>: no such user".into(),
    );
    let (server, queue, clock) = TestServer::start_manual(&routing(&sink, &dns)).await;
    let day = clock.now();
    let (sender, rcpts) = ("shop@shop.test", ["kept@dest.test", "gone@dest.test"]);
    submit(
        server.relay,
        sender,
        &rcpts,
        "From: shop@shop.test\r\n\r\nx\r\n",
    )
    .await;
    queue.run_due().await;
    assert_eq!(sink.received().len(), 2, "the delivery and the DSN");
    let socket = server.data_dir().join("admin.sock");
    let export = |address: &str| {
        let req = Request::Export {
            address: address.into(),
        };
        let socket = socket.clone();
        async move { request(&socket, &req).await.unwrap() }
    };
    let gone = export("gone@dest.test").await;
    assert_eq!(gone["records"][0]["outcome"], "bounced", "{gone}");
    assert_eq!(gone["bounce_run"]["count"], 1, "{gone}");
    assert_eq!(export(sender).await["records"].as_array().unwrap().len(), 2);
    let held = request(&socket, &Request::Report).await.unwrap()["records"].clone();

    clock.advance(31 * 86_400);
    let purged = request(&socket, &Request::Purge).await.unwrap();
    assert_eq!(purged["records"], held, "{purged}");
    assert_eq!(purged["bounce_runs"], 1, "{purged}");
    for address in rcpts.iter().chain([&sender]) {
        let data = export(address).await;
        assert!(data["records"].as_array().unwrap().is_empty(), "{data}");
        assert!(data["bounce_run"].is_null(), "{data}");
    }
    let data = server.data_dir();
    server.shutdown.cancel();
    server.task.await.unwrap();

    let raw = common::all_bytes(&data);
    let purged_day = postern::ledger::day_of(day);
    for pseudonyms in pseudonyms_of(&data) {
        for address in rcpts.iter().chain([&sender]) {
            let p = pseudonyms.of(address).0;
            assert!(!contains(&raw, &p), "{address}'s pseudonym on disk");
            assert!(!contains(&raw, hex::encode(p).as_bytes()));
            // A record key as it was: day ‖ pseudonym ‖ queue id ‖ index.
            let record_key = [purged_day.as_bytes(), &p].concat();
            assert!(
                !contains(&raw, &record_key),
                "{address}'s record key on disk"
            );
        }
    }
}

/// Mail from `shop@shop.test` to `rcpt`, accepted.
async fn shop_mail(server: &TestServer, rcpt: &str) {
    let body = "From: shop@shop.test\r\n\r\nx\r\n";
    submit(server.relay, "shop@shop.test", &[rcpt], body).await;
}

/// `rcpt` is refused at RCPT as suppressed; the session is ready for the next transaction.
async fn assert_suppressed(c: &mut Raw<tokio::net::TcpStream>, rcpt: &str, when: &str) {
    c.expect("MAIL FROM:<shop@shop.test>", 250).await;
    let r = c.expect(&format!("RCPT TO:<{rcpt}>"), 550).await;
    assert_eq!(r.enhanced(), "5.7.1", "{when}");
    c.expect("RSET", 250).await;
}

/// Stops `server` and lets go of everything that holds its ledger (and so sled's lock), for a
/// restart on the same directory.
async fn stop(server: TestServer) -> tempfile::TempDir {
    server.shutdown.cancel();
    server.task.await.unwrap();
    server.dir
}

/// The pseudonym key files of a data directory, sorted.
fn pseudonym_key_files(data: &std::path::Path) -> Vec<String> {
    let mut held: Vec<String> = std::fs::read_dir(data.join("ledger/pseudonyms"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    held.sort();
    held
}

/// The daemon's retention pass rotates the pseudonym key on its clock: mail from before the
/// rotation is exported and erased with the new mail, an opt-out still refuses at RCPT, and
/// once the old key's days are purged its key file is gone and no key on disk computes its
/// pseudonyms.
#[tokio::test]
async fn the_pseudonym_key_rotates_and_older_records_stay_found_until_purged() {
    const ROTATION: &str = "[privacy]\npseudonym_rotation = \"7d\"\n";
    let (server, queue, clock) = TestServer::start_manual(ROTATION).await;
    let socket = server.data_dir().join("admin.sock");
    let admin = |req: Request| {
        let socket = socket.clone();
        async move { request(&socket, &req).await.unwrap() }
    };
    let (first_day, subject) = (postern::ledger::day_of(clock.now()), "subject@dest.test");
    let export = || {
        admin(Request::Export {
            address: subject.into(),
        })
    };
    shop_mail(&server, subject).await;
    admin(Request::SuppressAdd {
        address: "optout@dest.test".into(),
        reason: postern::suppress::Reason::Unsubscribe,
        expires_at: None,
    })
    .await;
    let old = export().await["records"][0]["recipient_pseudonym"].clone();
    assert!(old.is_string(), "{old}");

    clock.advance(8 * 86_400);
    let pass = admin(Request::Purge).await;
    let next_day = postern::ledger::day_of(clock.now() + 86_400);
    assert_eq!(pass["pseudonym_key_started"], next_day.as_str(), "{pass}");
    clock.advance(86_400);
    shop_mail(&server, subject).await;
    let records = export().await["records"].as_array().unwrap().clone();
    let names: Vec<_> = records.iter().map(|r| &r["recipient_pseudonym"]).collect();
    assert_eq!(names.len(), 2, "{records:?}");
    assert!(names.contains(&&old), "{names:?}");
    assert!(names.iter().all(|p| p.is_string()), "{names:?}");
    assert_ne!(names[0], names[1], "the new mail is named by the new key");

    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    assert_suppressed(&mut c, "optout@dest.test", "after the rotation").await;
    let erased = admin(Request::Erase {
        address: subject.into(),
    })
    .await;
    assert_eq!(erased["records_removed"], 2, "{erased}");
    assert_eq!(erased["queued_recipients_removed"], 2, "{erased}");

    // The new key started on day 9; on day 40 the oldest day held is day 10, so every day the
    // old key named is purged. The new key has served its week: a third is made.
    clock.advance(31 * 86_400);
    let later = admin(Request::Purge).await;
    let destroyed = &later["pseudonym_keys_destroyed"];
    assert_eq!(*destroyed, serde_json::json!([first_day]), "{later}");
    assert_suppressed(&mut c, "optout@dest.test", "after the old key is gone").await;
    // Restarted: only what is on disk counts now, no key kept in memory.
    drop((c, queue));
    let dir = stop(server).await;
    let options = Options {
        clock: clock.clone(),
        run_queue: false,
        ..Default::default()
    };
    let (server, _) = TestServer::start_in(dir, ROTATION, options).await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    assert_suppressed(&mut c, "optout@dest.test", "after a restart").await;
    let data = server.data_dir();
    server.shutdown.cancel();
    server.task.await.unwrap();

    let third = later["pseudonym_key_started"].as_str().unwrap();
    let want = [format!("{next_day}.key"), format!("{third}.key")];
    assert_eq!(pseudonym_key_files(&data), want);
    for pseudonyms in pseudonyms_of(&data) {
        let p = serde_json::json!(pseudonyms.of(subject).to_string());
        assert_ne!(p, old, "a key on disk still computes the old pseudonym");
    }
}

#[tokio::test]
async fn a_dsn_never_returns_the_body_of_a_message_without_an_empty_line() {
    use base64::Engine;
    let dns = DnsServer::start().await;
    let sink = Sink::start("127.0.0.1").await;
    sink.behaviour
        .lock()
        .unwrap()
        .rcpt_replies
        .insert("nobody@dest.test".into(), "550 5.1.1 no such user".into());
    let (server, queue) = TestServer::start_with(
        &routing(&sink, &dns),
        Options {
            run_queue: false,
            ..Default::default()
        },
    )
    .await;
    let marker = "BODY-MARKER-31337";
    let b64 = base64::engine::general_purpose::STANDARD.encode(marker);
    let bodies = [
        // From a script: no empty line between header and body.
        format!("From: app@shop.test\r\nSubject: report\r\nHello,\r\n{marker}\r\n{b64}\r\n"),
        // The body starts with lines that look like header continuations.
        format!("From: app@shop.test\r\nSubject: report\r\n \r\n  {marker}\r\n {b64}\r\n"),
    ];
    for body in &bodies {
        submit(server.relay, "app@shop.test", &["nobody@dest.test"], body).await;
    }
    queue.run_due().await;
    let dsns: Vec<_> = sink
        .received()
        .into_iter()
        .filter(|m| m.from.is_empty())
        .collect();
    assert_eq!(dsns.len(), 2, "one DSN per message");
    for dsn in dsns {
        let text = String::from_utf8_lossy(&dsn.data);
        assert!(
            text.contains("Subject: report\r\n"),
            "headers returned: {text}"
        );
        assert!(!text.contains(marker) && !text.contains(&b64), "{text}");
        let parsed = mail_parser::MessageParser::default()
            .parse(&dsn.data)
            .expect("the DSN parses");
        for part in parsed.parts() {
            let decoded = part.decoded();
            assert!(!contains(&decoded, marker.as_bytes()), "decoded: {text}");
        }
    }
}
