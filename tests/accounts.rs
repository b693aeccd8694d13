//! Accounts and their rules, with a real client (lettre) where a client library can express
//! the case, and the byte-level client for the source address (lettre cannot bind one).

mod common;

use std::sync::Arc;

use common::{Raw, Reply, TestServer, PASSWORD, USER};
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Tokio1Executor};
use postern::clock::{Clock, ManualClock, SystemClock};

const SHOP: &str = "shop";
const SHOP_PASSWORD: &str = "shop password";

/// A second account, limited to shop.test and given `rules`, and the test server on a
/// manual clock.
async fn start(rules: &str) -> (TestServer, Arc<ManualClock>) {
    let hash = postern::auth::hash_password(SHOP_PASSWORD).unwrap();
    let text = format!(
        "[[account]]\nusername = \"{SHOP}\"\npassword_hash = \"{hash}\"\n\
         sender_domains = [\"shop.test\"]\n{rules}"
    );
    let clock = Arc::new(ManualClock::new(SystemClock.now()));
    let options = postern::daemon::Options {
        clock: clock.clone(),
        run_queue: false,
        ..Default::default()
    };
    let (server, _) = TestServer::start_with(&text, options).await;
    (server, clock)
}

fn mailer(server: &TestServer, user: &str, password: &str) -> AsyncSmtpTransport<Tokio1Executor> {
    let pem = std::fs::read(server.cert_path()).unwrap();
    let tls = TlsParameters::builder("localhost".into())
        .add_root_certificate(Certificate::from_pem(&pem).unwrap())
        .build_rustls()
        .unwrap();
    AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous("127.0.0.1")
        .port(server.submissions.port())
        .tls(Tls::Wrapper(tls))
        .credentials(Credentials::new(user.into(), password.into()))
        .authentication(vec![Mechanism::Plain])
        .build()
}

/// Sends a raw message with lettre; Ok(()) or the reply code and text of the refusal.
async fn send(
    m: &AsyncSmtpTransport<Tokio1Executor>,
    from: &str,
    header_from: &str,
    to: &[&str],
) -> Result<(), (u16, String)> {
    let envelope = Envelope::new(
        Some(from.parse().unwrap()),
        to.iter().map(|t| t.parse().unwrap()).collect(),
    )
    .unwrap();
    let body = format!(
        "From: <{header_from}>\r\nTo: <{}>\r\nSubject: s\r\n\r\nbody\r\n",
        to[0]
    );
    match m.send_raw(&envelope, body.as_bytes()).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let code = e
                .status()
                .map(|c| c.to_string().parse().unwrap())
                .unwrap_or(0);
            Err((code, e.to_string()))
        }
    }
}

#[tokio::test]
async fn sender_domains_apply_to_mail_from_and_the_from_header() {
    let (server, _) = start("").await;
    let m = mailer(&server, SHOP, SHOP_PASSWORD);
    send(&m, "a@shop.test", "a@shop.test", &["r@dest.test"])
        .await
        .unwrap();
    let (code, text) = send(&m, "a@else.test", "a@shop.test", &["r@dest.test"])
        .await
        .unwrap_err();
    assert_eq!(code, 550, "{text}");
    assert!(
        text.contains("5.7.1") && text.contains("Sender address not allowed"),
        "{text}"
    );
    assert!(text.contains("sender_domains of the account"), "{text}");
    let (code, text) = send(&m, "a@shop.test", "ceo@else.test", &["r@dest.test"])
        .await
        .unwrap_err();
    assert_eq!(code, 550, "{text}");
    assert!(
        text.contains("5.7.1") && text.contains("From: header not allowed"),
        "{text}"
    );
    // Only the allowed message reached the spool (and so only it could be DKIM-signed).
    assert_eq!(server.messages().await.len(), 1);
    // The account without rules sends from anywhere.
    let open = mailer(&server, USER, PASSWORD);
    send(&open, "a@else.test", "a@else.test", &["r@dest.test"])
        .await
        .unwrap();
}

#[tokio::test]
async fn messages_per_hour_defer_with_4_7_1_until_the_window_ends() {
    let (server, clock) = start("messages_per_hour = 2\n").await;
    let m = mailer(&server, SHOP, SHOP_PASSWORD);
    for _ in 0..2 {
        send(&m, "a@shop.test", "a@shop.test", &["r@dest.test"])
            .await
            .unwrap();
    }
    let (code, text) = send(&m, "a@shop.test", "a@shop.test", &["r@dest.test"])
        .await
        .unwrap_err();
    assert_eq!(code, 451, "{text}");
    assert!(
        text.contains("4.7.1") && text.contains("2 messages per hour"),
        "{text}"
    );
    assert!(
        text.contains("try again after") && text.contains("(in 3600 s)"),
        "{text}"
    );
    clock.advance(3600);
    send(&m, "a@shop.test", "a@shop.test", &["r@dest.test"])
        .await
        .unwrap();
    assert_eq!(server.messages().await.len(), 3);
}

#[tokio::test]
async fn recipients_per_message_and_per_hour() {
    let (server, _) = start("recipients_per_message = 2\nrecipients_per_hour = 3\n").await;
    let m = mailer(&server, SHOP, SHOP_PASSWORD);
    let three = ["r1@dest.test", "r2@dest.test", "r3@dest.test"];
    let (code, text) = send(&m, "a@shop.test", "a@shop.test", &three)
        .await
        .unwrap_err();
    assert_eq!(code, 452, "{text}");
    assert!(
        text.contains("4.7.1") && text.contains("2 recipients per message"),
        "{text}"
    );
    // Two recipients were accepted by that attempt and count towards the hour (limit 3).
    send(&m, "a@shop.test", "a@shop.test", &["r4@dest.test"])
        .await
        .unwrap();
    let (code, text) = send(&m, "a@shop.test", "a@shop.test", &["r5@dest.test"])
        .await
        .unwrap_err();
    assert_eq!(code, 451, "{text}");
    assert!(
        text.contains("4.7.1") && text.contains("3 recipients per hour"),
        "{text}"
    );
    assert!(text.contains("try again after"), "{text}");
}

/// Logs in from `source` over STARTTLS on `submission`; the reply to AUTH PLAIN.
async fn login(
    submission: std::net::SocketAddr,
    cert: &std::path::Path,
    source: &str,
    user: &str,
    password: &str,
) -> Reply {
    let (mut c, greeting) = Raw::connect_from(source, submission).await;
    assert_eq!(greeting.map(|g| g.code), Some(220));
    c.expect("EHLO client.test", 250).await;
    c.expect("STARTTLS", 220).await;
    let mut c = c.tls(common::client_tls_for(cert)).await;
    c.expect("EHLO client.test", 250).await;
    let plain = postern::proto::encode_base64(&format!("\0{user}\0{password}"));
    c.cmd(&format!("AUTH PLAIN {plain}")).await
}

async fn login_from(server: &TestServer, source: &str) -> Reply {
    login(
        server.submission,
        &server.cert_path(),
        source,
        SHOP,
        SHOP_PASSWORD,
    )
    .await
}

#[tokio::test]
async fn allowed_ips_refuse_a_login_from_elsewhere() {
    let (server, _) = start("allowed_ips = [\"127.0.0.2/32\", \"2001:db8::/32\"]\n").await;
    let r = login_from(&server, "127.0.0.2").await;
    assert_eq!((r.code, r.enhanced()), (235, "2.7.0"), "{r:?}");
    let r = login_from(&server, "127.0.0.3").await;
    assert_eq!((r.code, r.enhanced()), (535, "5.7.8"), "{r:?}");
}

#[tokio::test]
async fn relay_networks_can_be_given_sender_rules_and_limits() {
    let server = TestServer::start(
        "[relay]\nnetworks = [\"127.0.0.0/8\"]\nsender_domains = [\"app.test\"]\nmessages_per_hour = 1\n",
    )
    .await;
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    let r = c.cmd("MAIL FROM:<a@else.test>").await;
    assert_eq!((r.code, r.enhanced()), (550, "5.7.1"), "{r:?}");
    assert!(
        r.text.contains("sender_domains of the relay networks"),
        "{r:?}"
    );
    let r = c
        .send_mail(
            "a@app.test",
            &["b@dest.test"],
            "From: a@app.test\r\n\r\nx\r\n",
        )
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    let r = c.cmd("MAIL FROM:<a@app.test>").await;
    assert_eq!((r.code, r.enhanced()), (451, "4.7.1"), "{r:?}");
}

/// Runs `postern account ARGS --config CONFIG` with `stdin`; its standard output.
fn cli(config: &std::path::Path, args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
        .arg("account")
        .args(args)
        .arg("--config")
        .arg(config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test]
async fn accounts_file_is_edited_by_the_cli_and_reloaded() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let text = common::config_text(dir.path(), "[limits]\nauth_failure_delay = \"0s\"\n").replace(
        "[server]\n",
        "[server]\naccounts_file = \"accounts.toml\"\n",
    );
    let config_path = dir.path().join("config.toml");
    std::fs::write(&config_path, text).unwrap();
    let file = dir.path().join("accounts.toml");

    cli(
        &config_path,
        &["add", "late", "--sender-domain", "late.test"],
        "first pw\n",
    );
    let stored = std::fs::read_to_string(&file).unwrap();
    assert!(
        stored.contains("$argon2id$") && stored.contains("late.test"),
        "{stored}"
    );
    assert!(!stored.contains("first pw"));
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let list = cli(&config_path, &["list"], "");
    assert!(list.contains(USER) && list.contains("late\t"), "{list}");

    let config = postern::config::Config::load(&config_path).unwrap();
    let daemon = postern::daemon::Daemon::start(config).await.unwrap();
    let submission = daemon
        .local_addrs()
        .into_iter()
        .find(|(_, m)| *m == postern::config::ListenerMode::Submission)
        .unwrap()
        .0;
    let reload = daemon.reload_handle();
    let shutdown = daemon.shutdown.clone();
    let task = tokio::spawn(daemon.run(std::time::Duration::from_secs(5)));
    let cert = dir.path().join("certs/server.crt");
    let try_login = |pw: &'static str| login(submission, &cert, "127.0.0.1", "late", pw);
    assert_eq!(try_login("first pw").await.code, 235);

    cli(&config_path, &["passwd", "late"], "second pw\n");
    assert_eq!(
        try_login("first pw").await.code,
        235,
        "not applied before SIGHUP"
    );
    reload
        .reload(&postern::config::Config::load(&config_path).unwrap())
        .unwrap();
    assert_eq!(try_login("first pw").await.code, 535);
    assert_eq!(try_login("second pw").await.code, 235);

    cli(&config_path, &["remove", "late"], "");
    reload
        .reload(&postern::config::Config::load(&config_path).unwrap())
        .unwrap();
    assert_eq!(try_login("second pw").await.code, 535);
    let list = cli(&config_path, &["list"], "");
    assert!(!list.contains("late"), "{list}");
    shutdown.cancel();
    let _ = task.await;
}
