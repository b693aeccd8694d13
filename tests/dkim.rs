//! DKIM signatures made by Postern (mail-auth) verified by dkimpy, an independent verifier,
//! with the published key records served from the test instead of DNS.

mod common;

use std::collections::HashMap;
use std::path::Path;

use common::dns::DnsServer;
use common::sink::Sink;
use common::{Raw, TestServer};
use postern::dkim::{generate, public_key_record, Algorithm};

/// Verifies every signature in `message`; returns one bool per signature.
fn dkimpy(message: &[u8], records: &HashMap<String, String>) -> Vec<bool> {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let rec = dir.path().join("records.json");
    std::fs::write(&rec, serde_json::to_vec(records).unwrap()).unwrap();
    let mut child = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/clients/dkim_verify.py"
        ))
        .arg(&rec)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child.stdin.take().unwrap().write_all(message).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "dkimpy failed (pip install dkimpy pynacl): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_bool().unwrap())
        .collect()
}

/// Generates keys in `dir` and returns (config TOML, published records).
fn keys(dir: &Path, specs: &[(&str, &str, Algorithm, bool)]) -> (String, HashMap<String, String>) {
    let mut toml = String::new();
    let mut records = HashMap::new();
    for (domain, selector, alg, subdomains) in specs {
        let path = dir.join(format!("{domain}.{selector}.pem"));
        let key = generate(*alg, &path).unwrap();
        toml.push_str(&format!(
            "[[dkim.key]]\ndomain = \"{domain}\"\nselector = \"{selector}\"\nalgorithm = \"{}\"\nprivate_key = \"{}\"\nsubdomains = {subdomains}\n",
            alg.config_name(),
            path.display()
        ));
        records.insert(
            format!("{selector}._domainkey.{domain}."),
            public_key_record(*alg, &key.public_b64),
        );
    }
    (toml, records)
}

/// Sends raw DATA content; returns the stored message body.
async fn send(server: &TestServer, mail_params: &str, data: &str) -> Vec<u8> {
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    c.expect(&format!("MAIL FROM:<app@example.test>{mail_params}"), 250)
        .await;
    c.expect("RCPT TO:<r@dest.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send(format!("{data}.\r\n")).await;
    let r = c.reply().await;
    assert_eq!(r.code, 250, "{r:?}");
    let id = r.text.rsplit(' ').next().unwrap().parse().unwrap();
    server.spool.read_whole(id).await.unwrap().body
}

fn signature_headers(body: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(body);
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .replace("\r\n\t", " ")
        .replace("\r\n ", " ");
    head.lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("dkim-signature:"))
        .map(str::to_string)
        .collect()
}

const MESSAGE: &str = "From: App <app@example.test>\r\nTo: r@dest.test\r\nSubject: A long subject line that goes on and on and\r\n on, folded over several lines to test header canonicalisation\r\nDate: Sun, 29 Nov 2026 08:00:00 +0000\r\nMessage-ID: <m1@example.test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGrüße aus Köln €   with  spaces   \r\n\r\nline after blank\r\n\r\n\r\n\r\n";

#[tokio::test]
async fn rsa_and_ed25519_sign_together_and_dkimpy_verifies_both() {
    let dir = tempfile::tempdir().unwrap();
    let (toml, records) = keys(
        dir.path(),
        &[
            ("example.test", "rsa1", Algorithm::Rsa, false),
            ("example.test", "ed1", Algorithm::Ed25519, false),
        ],
    );
    let server = TestServer::start(&toml).await;
    let body = send(&server, " BODY=8BITMIME", MESSAGE).await;
    let sigs = signature_headers(&body);
    assert_eq!(sigs.len(), 2, "{sigs:?}");
    for s in &sigs {
        assert!(s.contains("d=example.test"), "{s}");
        assert!(s.contains("c=relaxed/relaxed"), "{s}");
        assert!(s.contains("t="), "{s}");
        let h = s
            .split("h=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap()
            .to_ascii_lowercase();
        let h: Vec<&str> = h.split(':').map(str::trim).collect();
        assert_eq!(
            h.iter().filter(|x| **x == "from").count(),
            2,
            "From oversigned: {h:?}"
        );
        for name in [
            "to",
            "subject",
            "date",
            "message-id",
            "mime-version",
            "content-type",
        ] {
            assert!(h.contains(&name), "{name} not signed: {h:?}");
        }
    }
    assert!(sigs
        .iter()
        .any(|s| s.contains("a=rsa-sha256") && s.contains("s=rsa1")));
    assert!(sigs
        .iter()
        .any(|s| s.contains("a=ed25519-sha256") && s.contains("s=ed1")));
    assert_eq!(dkimpy(&body, &records), vec![true, true]);

    // One changed byte in the body breaks both signatures.
    let mut tampered = body.clone();
    let pos = tampered
        .windows(10)
        .position(|w| w == b"line after")
        .unwrap();
    tampered[pos] = b'L';
    assert_eq!(dkimpy(&tampered, &records), vec![false, false]);
    // So does a changed signed header.
    let text = String::from_utf8_lossy(&body).replace("To: r@dest.test", "To: s@dest.test");
    assert_eq!(dkimpy(text.as_bytes(), &records), vec![false, false]);
}

/// A server with `toml`'s keys and its queue running, relaying dest.test (by MX, from a DNS
/// server of the test's) to a sink. The DNS server must live as long as the test.
async fn relaying_to_a_sink(toml: &str) -> (TestServer, Sink, DnsServer) {
    let dns = DnsServer::start().await;
    let sink = Sink::start("127.0.0.1").await;
    dns.mx("dest.test", 10, "mx.sink.test");
    dns.addr("mx.sink.test", "127.0.0.1");
    let extra = format!(
        "{toml}[delivery]\nport = {}\n[dns]\nnameservers = [\"{}\"]\n",
        sink.addr.port(),
        dns.nameserver()
    );
    let (server, _) = TestServer::start_with(&extra, postern::daemon::Options::default()).await;
    (server, sink, dns)
}

#[tokio::test]
async fn signature_survives_relay_through_the_sink() {
    let dir = tempfile::tempdir().unwrap();
    let (toml, records) = keys(dir.path(), &[("example.test", "s1", Algorithm::Rsa, false)]);
    let (server, sink, _dns) = relaying_to_a_sink(&toml).await;
    // Dots at line starts are stuffed and unstuffed on both hops.
    let data = MESSAGE.replace("line after blank", "..dot line\r\nline after blank");
    send(&server, " BODY=8BITMIME", &data).await;
    let got = sink.wait_for(1).await;
    assert!(common::contains(&got[0].data, b"\r\n.dot line\r\n"));
    assert_eq!(dkimpy(&got[0].data, &records), vec![true]);
}

/// A message past the spill threshold goes to disk as it arrives, is signed from its body file
/// (mail-auth's streaming signer) and sent from it a chunk at a time: dkimpy verifies both
/// signatures on what the sink received, which is the stored message byte for byte (dots at
/// line starts, across chunk boundaries, included), and the body file goes once delivered.
#[tokio::test]
async fn a_message_spilled_to_disk_is_signed_and_delivered_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (toml, records) = keys(
        dir.path(),
        &[
            ("example.test", "rsa1", Algorithm::Rsa, false),
            ("example.test", "ed1", Algorithm::Ed25519, false),
        ],
    );
    let (server, sink, _dns) = relaying_to_a_sink(&toml).await;
    // As sent on the wire: ".." is a stuffed ".".
    let mut data = MESSAGE.to_string();
    let mut n = 0;
    while data.len() < 3 * postern::spool::SPILL_AT {
        n += 1;
        data.push_str(&format!(
            "..line {n} starts with a dot\r\nplain   line {n}  with  spaces \t\r\n"
        ));
    }
    data.push_str("\r\n\r\n");
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    let r = c
        .send_mail("app@example.test", &["r@dest.test"], &data)
        .await;
    assert_eq!(r.code, 250, "{r:?}");
    let got = sink.wait_for(1).await;
    assert_eq!(dkimpy(&got[0].data, &records), vec![true, true]);
    let unstuffed = data.replace("\r\n..", "\r\n.");
    assert!(got[0].data.ends_with(unstuffed.as_bytes()), "sent whole");
    assert_eq!(signature_headers(&got[0].data).len(), 2);
    let bodies = server.data_dir().join("spool/bodies");
    let empty = || {
        std::fs::read_dir(&bodies)
            .map(|d| d.count() == 0)
            .unwrap_or(false)
    };
    assert!(
        common::eventually(std::time::Duration::from_secs(10), empty).await,
        "the body file goes once the message is delivered"
    );
}

#[tokio::test]
async fn keygen_cli_record_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let mut records = HashMap::new();
    let mut toml = String::new();
    for (sel, alg) in [("cli-ed", "ed25519"), ("cli-rsa", "rsa")] {
        let key = dir.path().join(format!("{sel}.pem"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_postern"))
            .args([
                "dkim",
                "keygen",
                "--domain",
                "example.test",
                "--selector",
                sel,
                "--algorithm",
                alg,
                "--out",
            ])
            .arg(&key)
            .output()
            .unwrap();
        assert!(out.status.success());
        let stdout = String::from_utf8(out.stdout).unwrap();
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{sel}._domainkey.example.test. IN TXT ")))
            .unwrap();
        // Rejoin the 255-byte character-strings as a resolver would.
        let quoted = line.split(" IN TXT ").nth(1).unwrap();
        let parts: Vec<&str> = quoted.split('"').filter(|p| !p.trim().is_empty()).collect();
        assert!(parts.iter().all(|p| p.len() <= 255));
        let value = parts.concat();
        assert!(value.starts_with("v=DKIM1; k="), "{value}");
        records.insert(format!("{sel}._domainkey.example.test."), value);
        let config_name = if alg == "rsa" {
            "rsa-sha256"
        } else {
            "ed25519"
        };
        toml.push_str(&format!(
            "[[dkim.key]]\ndomain = \"example.test\"\nselector = \"{sel}\"\nalgorithm = \"{config_name}\"\nprivate_key = \"{}\"\n",
            key.display()
        ));
    }
    let server = TestServer::start(&toml).await;
    let body = send(
        &server,
        "",
        "From: a@example.test\r\nSubject: cli\r\n\r\nhello\r\n",
    )
    .await;
    assert_eq!(dkimpy(&body, &records), vec![true, true]);
}

#[tokio::test]
async fn unsigned_without_key_refused_when_required_and_subdomains_inherit() {
    let dir = tempfile::tempdir().unwrap();
    let (toml, records) = keys(
        dir.path(),
        &[("example.test", "p1", Algorithm::Ed25519, true)],
    );
    let server = TestServer::start(&toml).await;
    let body = send(
        &server,
        "",
        "From: x@other.test\r\nSubject: s\r\n\r\nno key\r\n",
    )
    .await;
    assert!(
        signature_headers(&body).is_empty(),
        "no key for other.test: unsigned"
    );
    let body = send(
        &server,
        "",
        "From: x@mail.example.test\r\nSubject: s\r\n\r\nsub\r\n",
    )
    .await;
    let sigs = signature_headers(&body);
    assert_eq!(sigs.len(), 1);
    assert!(sigs[0].contains("d=example.test;"), "{}", sigs[0]);
    assert_eq!(dkimpy(&body, &records), vec![true]);

    let required = TestServer::start(&format!("{toml}[dkim]\nrequire = true\n")).await;
    let (mut c, _) = Raw::connect(required.relay).await;
    c.expect("EHLO client.test", 250).await;
    let r = c
        .send_mail(
            "app@example.test",
            &["r@dest.test"],
            "From: x@other.test\r\n\r\nx\r\n",
        )
        .await;
    assert_eq!((r.code, r.enhanced()), (550, "5.7.1"));
    assert!(required.spool.live().is_empty());
}

#[tokio::test]
async fn existing_signatures_are_kept_and_ours_added() {
    let dir = tempfile::tempdir().unwrap();
    let (toml, records) = keys(
        dir.path(),
        &[("example.test", "s1", Algorithm::Ed25519, false)],
    );
    let server = TestServer::start(&toml).await;
    let foreign =
        "DKIM-Signature: v=1; a=rsa-sha256; d=upstream.test; s=x; h=from; bh=AAAA; b=BBBB\r\n";
    let body = send(
        &server,
        "",
        &format!("{foreign}From: a@example.test\r\nSubject: s\r\n\r\nbody\r\n"),
    )
    .await;
    let sigs = signature_headers(&body);
    assert_eq!(sigs.len(), 2);
    assert!(
        sigs.iter().any(|s| s.contains("d=upstream.test")),
        "foreign signature kept"
    );
    let results = dkimpy(&body, &records);
    assert_eq!(
        results,
        vec![true, false],
        "ours first and valid; the foreign one is untouched (and bogus)"
    );
}

#[tokio::test]
async fn bad_key_files_stop_the_start_naming_the_file() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (toml, _) = keys(
        dir.path(),
        &[("example.test", "s1", Algorithm::Ed25519, false)],
    );
    let key = dir.path().join("example.test.s1.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg_dir = tempfile::tempdir().unwrap();
    let config = postern::config::Config::parse(
        &common::config_text(cfg_dir.path(), &toml),
        "t",
        cfg_dir.path(),
    )
    .unwrap();
    let err = postern::daemon::Daemon::start(config.clone())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("example.test.s1.pem") && err.contains("chmod 600"),
        "{err}"
    );

    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&key, "not a key").unwrap();
    let err = postern::daemon::Daemon::start(config.clone())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("example.test.s1.pem"), "{err}");
    std::fs::remove_file(&key).unwrap();
    let err = postern::daemon::Daemon::start(config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("example.test.s1.pem"), "{err}");
}

#[tokio::test]
async fn reload_swaps_keys_and_keeps_the_old_set_when_the_new_one_is_bad() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (toml_a, mut records) = keys(
        dir.path(),
        &[("example.test", "a1", Algorithm::Ed25519, false)],
    );
    let server = TestServer::start(&toml_a).await;
    let msg = "From: a@example.test\r\nSubject: r\r\n\r\nbody\r\n";
    let body = send(&server, "", msg).await;
    assert!(signature_headers(&body)[0].contains("s=a1"));

    let (toml_b, records_b) = keys(dir.path(), &[("example.test", "b1", Algorithm::Rsa, false)]);
    records.extend(records_b);
    let config = |toml: &str| {
        postern::config::Config::parse(
            &common::config_text(server.dir.path(), toml),
            "reload",
            server.dir.path(),
        )
        .unwrap()
    };
    server.reload.reload(&config(&toml_b)).expect("reload");
    let body = send(&server, "", msg).await;
    let sigs = signature_headers(&body);
    assert_eq!(sigs.len(), 1);
    assert!(sigs[0].contains("s=b1"), "{}", sigs[0]);
    assert_eq!(dkimpy(&body, &records), vec![true]);

    // An exposed key file is refused; the running keys stay in force.
    let b_key = dir.path().join("example.test.b1.pem");
    std::fs::set_permissions(&b_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = server
        .reload
        .reload(&config(&toml_b))
        .unwrap_err()
        .to_string();
    assert!(err.contains("example.test.b1.pem"), "{err}");
    let body = send(&server, "", msg).await;
    assert!(signature_headers(&body)[0].contains("s=b1"));
}

#[tokio::test]
async fn expiry_tag_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let (toml, records) = keys(
        dir.path(),
        &[("example.test", "x1", Algorithm::Ed25519, false)],
    );
    let server = TestServer::start(&format!("{toml}[dkim]\nexpire_after = \"7d\"\n")).await;
    let body = send(
        &server,
        "",
        "From: a@example.test\r\nSubject: x\r\n\r\nbody\r\n",
    )
    .await;
    let sig = signature_headers(&body).remove(0);
    let tag = |name: &str| -> i64 {
        sig.split(';')
            .map(str::trim)
            .find_map(|t| t.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name}= in {sig}"))
            .trim()
            .parse()
            .unwrap()
    };
    assert_eq!(tag("x") - tag("t"), 7 * 86_400);
    assert_eq!(dkimpy(&body, &records), vec![true]);
}

#[tokio::test]
async fn a_display_name_with_angle_brackets_at_and_comma_does_not_pick_the_signing_domain() {
    let dir = tempfile::tempdir().unwrap();
    let (toml, records) = keys(
        dir.path(),
        &[
            ("c.example", "decoy", Algorithm::Ed25519, false),
            ("y.example", "real", Algorithm::Ed25519, false),
        ],
    );
    let server = TestServer::start(&toml).await;
    let body = send(
        &server,
        "",
        "From: \"a <b@c.example>, x\" <x@y.example>\r\nSubject: x\r\n\r\nbody\r\n",
    )
    .await;
    let sigs = signature_headers(&body);
    assert_eq!(sigs.len(), 1, "{sigs:?}");
    assert!(sigs[0].contains("d=y.example"), "{}", sigs[0]);
    assert!(sigs[0].contains("s=real"), "{}", sigs[0]);
    assert_eq!(dkimpy(&body, &records), vec![true]);
}
