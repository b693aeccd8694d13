//! Durability against the real binary: SIGKILL under load, and a write limit that makes the
//! spool fail. A `250` must mean "on disk"; anything else must not be a `250`.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::tarpit::Tarpit;
use common::{contains, eventually, open_spool, submit, write_child_config, Child, Raw};

/// Sends messages on one connection until the server goes away; records every acknowledged id.
async fn sender(
    addr: std::net::SocketAddr,
    worker: usize,
    acked: Arc<Mutex<HashMap<String, String>>>,
) {
    let stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("worker {worker}: connect {addr}: {e}");
            return;
        }
    };
    let mut c = Raw {
        io: tokio::io::BufReader::new(stream),
    };
    let greeting = c.try_reply().await;
    c.send("EHLO load.test\r\n").await;
    let ehlo = c.try_reply().await;
    if greeting.is_none() || ehlo.is_none() {
        eprintln!("worker {worker}: greeting {greeting:?}, EHLO {ehlo:?}");
        return;
    }
    // 2 KB of 100-octet lines: well under the 1000-octet line limit.
    let filler = format!("{}\r\n", "y".repeat(98)).repeat(20);
    for n in 0.. {
        let marker = format!("W{worker}-N{n}-MARK");
        let body = format!(
            "MAIL FROM:<load@example.test>\r\nRCPT TO:<crash-rcpt@dest.test>\r\nDATA\r\nSubject: {marker}\r\n\r\n{}{marker}\r\n.\r\n",
            filler
        );
        use tokio::io::AsyncWriteExt;
        if c.io.get_mut().write_all(body.as_bytes()).await.is_err() {
            return;
        }
        for expected in [250, 250, 354] {
            match c.try_reply().await {
                Some(r) if r.code == expected => {}
                other => {
                    eprintln!("worker {worker}: expected {expected}, got {other:?}");
                    return;
                }
            }
        }
        match c.try_reply().await {
            Some(r) if r.code == 250 => {
                let id = r.text.rsplit(' ').next().unwrap_or_default().to_string();
                acked.lock().unwrap().insert(id, marker);
            }
            other => {
                eprintln!("worker {worker}: end of data answered {other:?}");
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    write_child_config(dir.path(), "");
    let mut child = Child::spawn(dir.path(), None);
    let acked = Arc::new(Mutex::new(HashMap::new()));
    let senders: Vec<_> = (0..8)
        .map(|w| tokio::spawn(sender(child.relay, w, acked.clone())))
        .collect();
    // Kill once a good number of messages is acknowledged and a deferral (which names its
    // recipient) is in the log, so that the log check below has something to look at.
    let ready = common::eventually(Duration::from_secs(30), || {
        acked.lock().unwrap().len() >= 300 && child.log().contains(" deferred")
    })
    .await;
    child.kill9();
    for s in senders {
        let _ = s.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        ready,
        "load too small to mean anything ({} acknowledged) or no deferral logged",
        acked.len()
    );
    let log = child.log();

    // Restart the real daemon on the same directory: it must recover at least what was acked.
    let mut restarted = Child::spawn(dir.path(), None);
    let recovered: usize = restarted
        .log()
        .split("recovered=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("recovery count in the log");
    assert!(
        recovered >= acked.len(),
        "recovered {recovered} < acknowledged {}",
        acked.len()
    );
    assert!(restarted.terminate().success());

    let (spool, report) = open_spool(dir.path());
    assert!(report.quarantined.is_empty(), "{:?}", report.quarantined);
    let live: std::collections::HashSet<String> =
        spool.live().iter().map(|id| id.to_string()).collect();
    for (id, marker) in &acked {
        assert!(live.contains(id), "acknowledged {id} lost");
        let id = id.parse().unwrap();
        let m = spool.read_whole(id).await.unwrap();
        assert!(
            contains(&m.body, marker.as_bytes()),
            "{marker} body mismatch"
        );
    }
    // The log under load names no address: recipients appear only as pseudonyms.
    let rcpts = common::logged_rcpts(&log);
    assert!(!rcpts.is_empty(), "no recipient logged at all");
    for r in &rcpts {
        assert!(
            common::is_pseudonym_at(r, "dest.test"),
            "rcpt={r} in the log"
        );
    }
    for needle in ["crash-rcpt", "load@example"] {
        assert!(!log.contains(needle), "{needle} in the log");
    }
}

#[tokio::test]
async fn storage_failure_is_a_4xx_never_a_250() {
    let dir = tempfile::tempdir().unwrap();
    write_child_config(dir.path(), "");
    // Files may not grow past 256 KiB: the segment write of a larger message fails (EFBIG).
    let mut child = Child::spawn(dir.path(), Some(256));
    let (mut c, _) = Raw::connect(child.relay).await;
    c.expect("EHLO client.test", 250).await;
    let big = format!(
        "Subject: big\r\n\r\n{}",
        format!("{}\r\n", "z".repeat(998)).repeat(300)
    );
    let r = c.send_mail("a@example.test", &["b@dest.test"], &big).await;
    assert_eq!((r.code, r.enhanced()), (452, "4.3.1"), "{r:?}");
    // The spool recovers (a fresh segment) and small mail flows again.
    let r = c
        .send_mail(
            "a@example.test",
            &["b@dest.test"],
            "Subject: small\r\n\r\nSMALL-ONE\r\n",
        )
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    child.kill9();

    let (spool, report) = open_spool(dir.path());
    assert!(
        report.quarantined.is_empty(),
        "no half-written record: {:?}",
        report.quarantined
    );
    let live = spool.live();
    assert_eq!(live.len(), 1);
    assert!(contains(
        &spool.read_whole(live[0]).await.unwrap().body,
        b"SMALL-ONE"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_delivery_still_delivers_everything_after_restart() {
    let dns = common::dns::DnsServer::start().await;
    let sink = common::sink::Sink::start("127.0.0.1").await;
    dns.mx("dest.test", 10, "mx.sink.test");
    dns.addr("mx.sink.test", "127.0.0.1");
    // A slow receiver, so that the kill lands while deliveries are in progress.
    sink.behaviour.lock().unwrap().data_delay = Some(Duration::from_millis(150));
    let dir = tempfile::tempdir().unwrap();
    let text = common::config_text(
        dir.path(),
        &format!(
            "[delivery]\nport = {}\nmax_connections_per_destination = 2\n[dns]\nnameservers = [\"{}\"]\n",
            sink.addr.port(),
            dns.nameserver()
        ),
    );
    std::fs::write(dir.path().join("config.toml"), text).unwrap();
    let mut child = Child::spawn(dir.path(), None);

    let (mut c, _) = Raw::connect(child.relay).await;
    c.expect("EHLO client.test", 250).await;
    let mut markers = Vec::new();
    for i in 0..40 {
        let marker = format!("DELIVERY-CRASH-{i}-MARK");
        let r = c
            .send_mail(
                "app@sender.test",
                &["r@dest.test"],
                &format!("Subject: {i}\r\n\r\n{marker}\r\n"),
            )
            .await;
        assert_eq!(r.code, 250);
        markers.push(marker);
    }
    // Some delivered, most not: kill now.
    let start = Instant::now();
    while sink.received().is_empty() && start.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill9();
    let before = sink.received().len();
    assert!(
        before < markers.len(),
        "the kill came too late to test anything ({before})"
    );

    let _restarted = Child::spawn(dir.path(), None);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = sink.received();
        let missing: Vec<&String> = markers
            .iter()
            .filter(|m| !got.iter().any(|r| contains(&r.data, m.as_bytes())))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "never delivered: {missing:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `postern queue ARGS --config CONFIG`; returns (success, stdout + stderr).
async fn queue_cli(config: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_postern"))
        .arg("queue")
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .await
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// hang.test's exchanger (127.0.0.2) never answers; dest.test's (127.0.0.1) is a sink on the
/// same port. The daemon's config is written to `<dir>/config.toml`.
struct CrashRig {
    tarpit: Tarpit,
    sink: common::sink::Sink,
    _dns: common::dns::DnsServer,
    dir: tempfile::TempDir,
    config: std::path::PathBuf,
}

impl CrashRig {
    async fn new() -> CrashRig {
        let tarpit = Tarpit::start("127.0.0.2:0").await;
        let port = tarpit.addr.port();
        let sink = common::sink::Sink::start_on(&format!("127.0.0.1:{port}")).await;
        let dns = common::dns::DnsServer::start().await;
        dns.mx("hang.test", 10, "mx.hang.test");
        dns.addr("mx.hang.test", "127.0.0.2");
        dns.mx("dest.test", 10, "mx.sink.test");
        dns.addr("mx.sink.test", "127.0.0.1");
        let dir = tempfile::tempdir().unwrap();
        let text = common::config_text(
            dir.path(),
            &format!(
                "[delivery]\nport = {port}\nreply_timeout = \"10m\"\n[dns]\nnameservers = [\"{}\"]\n",
                dns.nameserver()
            ),
        );
        let config = dir.path().join("config.toml");
        std::fs::write(&config, text).unwrap();
        CrashRig {
            tarpit,
            sink,
            _dns: dns,
            dir,
            config,
        }
    }

    /// Waits (up to 20 s) until the tarpit has had `n` connections.
    async fn attempted(&self, n: usize) -> bool {
        eventually(Duration::from_secs(20), || self.tarpit.connections() >= n).await
    }

    async fn held(&self) -> String {
        let (ok, held) = queue_cli(&self.config, &["list", "--state", "held"]).await;
        assert!(ok, "{held}");
        held
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_in_flight_at_two_crashes_in_a_row_is_held_and_other_mail_flows() {
    let rig = CrashRig::new().await;
    let (dir, config, tarpit, sink) = (&rig.dir, &rig.config, &rig.tarpit, &rig.sink);
    let attempted = |n| rig.attempted(n);

    // Run 1: the attempt hangs; the daemon crashes with it in flight.
    let mut child = Child::spawn(dir.path(), None);
    let stuck = submit(
        child.relay,
        "app@sender.test",
        &["r@hang.test"],
        "Subject: stuck\r\n\r\nSTUCK\r\n",
    )
    .await;
    assert!(attempted(1).await, "never attempted: {}", child.log());
    child.kill9();

    // Run 2: one crash is not a loop: the message is tried again at once, and hangs again.
    let mut child = Child::spawn(dir.path(), None);
    assert!(
        attempted(2).await,
        "not retried after one crash: {}",
        child.log()
    );
    assert!(!child.log().contains("message held"), "{}", child.log());
    child.kill9();

    // Run 3: in flight at two crashes in a row: held, logged, shown as held.
    let child = Child::spawn(dir.path(), None);
    let log = child.log();
    let warning = log
        .lines()
        .find(|l| l.contains("crashes in a row") && l.contains(&stuck))
        .unwrap_or_else(|| panic!("no crash-loop warning for {stuck}: {log}"));
    assert!(warning.contains("WARN"), "{warning}");
    assert!(
        warning.contains(&format!("postern queue release {stuck}")),
        "{warning}"
    );
    let held = rig.held().await;
    assert!(held.contains(&stuck), "held list: {held}");
    let (ok, show) = queue_cli(config, &["show", &stuck]).await;
    assert!(ok && show.contains("crash-loop"), "show: {show}");

    // Other mail flows; the held message is not tried.
    submit(
        child.relay,
        "app@sender.test",
        &["r@dest.test"],
        "Subject: other\r\n\r\nOTHER-MAIL\r\n",
    )
    .await;
    let got = sink.wait_for(1).await;
    assert!(contains(&got[0].data, b"OTHER-MAIL"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(tarpit.connections(), 2, "the held message was tried");

    // Released: tried at once.
    let (ok, out) = queue_cli(config, &["release", &stuck]).await;
    assert!(ok, "release: {out}");
    assert!(attempted(3).await, "not tried after the release");
}

/// Two messages in flight at a crash; at the restart one of them "crashes" the daemon again
/// (kill -9 as soon as its attempt connects). Retried one at a time, the other was not in
/// flight with it: only the culprit is held, and the other is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_its_messages_are_retried_alone_so_only_the_culprit_is_held() {
    let rig = CrashRig::new().await;
    let slow = Duration::from_secs(30);
    rig.sink.behaviour.lock().unwrap().data_delay = Some(slow);
    let mut child = Child::spawn(rig.dir.path(), None);
    let culprit = submit(
        child.relay,
        "app@sender.test",
        &["r@hang.test"],
        "Subject: culprit\r\n\r\nCULPRIT\r\n",
    )
    .await;
    let innocent = submit(
        child.relay,
        "app@sender.test",
        &["r@dest.test"],
        "Subject: innocent\r\n\r\nINNOCENT\r\n",
    )
    .await;
    let innocent_in_flight = || !rig.sink.state.lock().unwrap().rcpt_attempts.is_empty();
    let both = eventually(Duration::from_secs(20), || {
        rig.tarpit.connections() >= 1 && innocent_in_flight()
    })
    .await;
    assert!(both, "not both in flight: {}", child.log());
    child.kill9();

    // Run 2: the innocent one now takes 2 s; the crash comes the moment the culprit connects.
    rig.sink.behaviour.lock().unwrap().data_delay = Some(Duration::from_secs(2));
    let mut child = Child::spawn(rig.dir.path(), None);
    assert!(
        rig.attempted(2).await,
        "culprit not retried: {}",
        child.log()
    );
    child.kill9();

    // Run 3: the culprit alone is held; the innocent one is delivered (in run 2 if its turn
    // came first, else now) and leaves the queue.
    rig.sink.behaviour.lock().unwrap().data_delay = None;
    let child = Child::spawn(rig.dir.path(), None);
    let held = rig.held().await;
    assert!(held.contains(&culprit), "culprit not held: {held}");
    assert!(!held.contains(&innocent), "innocent held too: {held}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ok, queued) = queue_cli(&rig.config, &["list"]).await;
        assert!(ok, "{queued}");
        if !queued.contains(&innocent) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "innocent still queued: {}",
            child.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(rig
        .sink
        .received()
        .iter()
        .any(|r| contains(&r.data, b"INNOCENT")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_certificate_and_a_broken_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_child_config(dir.path(), "");
    let child = Child::spawn(dir.path(), None);
    let hup = || {
        std::process::Command::new("kill")
            .arg("-HUP")
            .arg(child.child.id().to_string())
            .status()
            .unwrap()
    };
    let wait_for = |needle: &'static str| {
        let log = child.log.clone();
        async move {
            let seen = common::eventually(Duration::from_secs(10), || {
                log.lock().unwrap().contains(needle)
            })
            .await;
            assert!(seen, "no {needle:?} in {}", log.lock().unwrap());
        }
    };
    // A new certificate, which a client that trusts only it can tell from the first one.
    let new = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let trusts_new = trusting(new.cert.der().clone());
    assert!(
        starttls(child.relay, trusts_new.clone()).await.is_err(),
        "the new certificate is served before the reload"
    );
    let certs = dir.path().join("certs");
    std::fs::write(certs.join("server.crt"), new.cert.pem()).unwrap();
    let key = certs.join("server.key");
    std::fs::write(&key, new.signing_key.serialize_pem()).unwrap();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();

    assert!(hup().success());
    wait_for("reloaded DKIM keys, certificate and accounts").await;
    starttls(child.relay, trusts_new.clone())
        .await
        .expect("the new certificate after the reload");

    std::fs::write(
        dir.path().join("config.toml"),
        "[server]\nhostname = \"x\"\n",
    )
    .unwrap();
    assert!(hup().success());
    wait_for("reload refused").await;
    // Still serving, with what the last good reload loaded.
    starttls(child.relay, trusts_new)
        .await
        .expect("still the new certificate after a refused reload");
}

/// A TLS client that trusts `cert` alone.
fn trusting(cert: rustls::pki_types::CertificateDer<'static>) -> Arc<rustls::ClientConfig> {
    postern::tls::install_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// EHLO, STARTTLS and the handshake as "localhost"; the handshake's error, if it fails.
async fn starttls(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<(), std::io::Error> {
    let (mut c, greeting) = Raw::connect(addr).await;
    assert_eq!(greeting.code, 220);
    c.expect("EHLO client.test", 250).await;
    c.expect("STARTTLS", 220).await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, c.io.into_inner())
        .await
        .map(|_| ())
}

/// A big message (its body in a body file) acknowledged before a `kill -9` is whole after the
/// restart; the upload the kill cut short leaves no file behind once the spool is opened again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_keeps_an_acknowledged_big_message_and_drops_a_cut_upload() {
    let dir = tempfile::tempdir().unwrap();
    write_child_config(dir.path(), "");
    let mut child = Child::spawn(dir.path(), None);
    let mut body = String::from("Subject: big\r\n\r\n");
    while body.len() < 1 << 20 {
        body.push_str(&format!("{}\r\n", "k".repeat(76)));
    }
    body.push_str("BIG-ACKED-END\r\n");
    let id = submit(child.relay, "a@example.test", &["b@dest.test"], &body).await;
    let (mut cut, _) = Raw::connect(child.relay).await;
    cut.expect("EHLO client.test", 250).await;
    cut.expect("MAIL FROM:<a@example.test>", 250).await;
    cut.expect("RCPT TO:<b@dest.test>", 250).await;
    cut.expect("DATA", 354).await;
    cut.send(&body[..700_000]).await;
    let bodies = dir.path().join("data/spool/bodies");
    let files = || std::fs::read_dir(&bodies).map(|d| d.count()).unwrap_or(0);
    assert!(
        eventually(Duration::from_secs(10), || files() == 2).await,
        "the cut upload is on disk before the kill"
    );
    child.kill9();

    let (spool, report) = open_spool(dir.path());
    assert!(report.quarantined.is_empty(), "{:?}", report.quarantined);
    assert_eq!(files(), 1, "the cut upload's file is gone");
    let m = spool.read_whole(id.parse().unwrap()).await.unwrap();
    assert!(
        m.body.ends_with(body.as_bytes()),
        "the acknowledged body is whole"
    );
}
