//! Independent SMTP clients against Postern: Python's smtplib and swaks (installed by
//! `.ci/run`). Each test checks what reached the spool, not just the client's exit code.

mod common;

use std::process::Command;

use common::{contains, TestServer, PASSWORD, USER};

fn run(cmd: &mut Command) -> String {
    let out = tokio::task::block_in_place(|| cmd.output())
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (run .ci/run to install it)"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn smtplib(server: &TestServer, mode: &str, port: u16, marker: &str, auth: bool) {
    let mut cmd = Command::new("python3");
    cmd.arg(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/smtplib_client.py"
    ))
    .arg(mode)
    .arg(port.to_string())
    .arg(server.cert_path())
    .arg(marker);
    if auth {
        cmd.arg(USER).arg(PASSWORD);
    }
    run(&mut cmd);
}

#[tokio::test(flavor = "multi_thread")]
async fn python_smtplib_plain_starttls_ssl_and_utf8() {
    let server = TestServer::start("").await;
    smtplib(&server, "plain", server.relay.port(), "PY-PLAIN", false);
    smtplib(
        &server,
        "starttls",
        server.submission.port(),
        "PY-STARTTLS",
        true,
    );
    smtplib(&server, "ssl", server.submissions.port(), "PY-SSL", true);
    smtplib(&server, "utf8", server.relay.port(), "PY-UTF8", false);

    let msgs = server.messages().await;
    assert_eq!(msgs.len(), 4);
    let find = |marker: &str| {
        msgs.iter()
            .find(|m| contains(&m.body, marker.as_bytes()))
            .unwrap_or_else(|| panic!("{marker} not spooled"))
    };
    let plain = find("PY-PLAIN");
    assert_eq!(plain.envelope.recipients, vec!["py-rcpt@dest.test"]);
    assert!(
        contains(&plain.body, b"\r\n.leading dot\r\n"),
        "smtplib's dot-stuffing undone"
    );
    let tls = find("PY-STARTTLS");
    assert_eq!(tls.envelope.auth_user.as_deref(), Some(USER));
    assert!(contains(&tls.body, b"with ESMTPSA"));
    assert!(find("PY-SSL").envelope.auth_user.is_some());
    let utf8 = find("PY-UTF8");
    assert!(utf8.envelope.smtputf8);
    assert_eq!(utf8.envelope.recipients, vec!["empfänger@bücher.test"]);
    assert!(contains(&utf8.body, "Grüße PY-UTF8".as_bytes()));
}

#[tokio::test(flavor = "multi_thread")]
async fn swaks_pipelined_starttls_auth_and_implicit_tls() {
    let server = TestServer::start("").await;
    let swaks = |port: u16, extra: &[&str], marker: &str| {
        let mut cmd = Command::new("swaks");
        cmd.args(["--server", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--from",
                "swaks-sender@example.test",
                "--to",
                "swaks-rcpt@dest.test",
            ])
            .args([
                "--helo",
                "swaks.test",
                "--body",
                &format!("swaks body {marker}"),
                "--timeout",
                "10",
            ])
            .args(extra);
        run(&mut cmd)
    };
    let out = swaks(server.relay.port(), &["--pipeline"], "SW-PIPE");
    assert!(out.contains("250 2.0.0 OK queued as"), "{out}");
    let auth = [
        "--auth",
        "LOGIN",
        "--auth-user",
        USER,
        "--auth-password",
        PASSWORD,
    ];
    let mut starttls = vec!["--tls"];
    starttls.extend(auth);
    swaks(server.submission.port(), &starttls, "SW-STARTTLS");
    let mut implicit = vec!["--tlsc"];
    implicit.extend([
        "--auth",
        "PLAIN",
        "--auth-user",
        USER,
        "--auth-password",
        PASSWORD,
    ]);
    swaks(server.submissions.port(), &implicit, "SW-465");

    let msgs = server.messages().await;
    assert_eq!(msgs.len(), 3);
    for marker in ["SW-PIPE", "SW-STARTTLS", "SW-465"] {
        let m = msgs
            .iter()
            .find(|m| contains(&m.body, marker.as_bytes()))
            .unwrap_or_else(|| panic!("{marker} not spooled"));
        assert_eq!(m.envelope.recipients, vec!["swaks-rcpt@dest.test"]);
        assert_eq!(m.envelope.auth_user.is_some(), marker != "SW-PIPE");
    }
}
