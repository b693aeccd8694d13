//! `sendmail` end to end: the binary as `postern sendmail` and through a symlink named
//! `sendmail`, against a running daemon (a child process) that relays to a loopback sink, and
//! with the daemon stopped (the sealed maildrop).

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::sink::Sink;
use common::{all_bytes, contains, write_child_config, Child};

struct Rig {
    dir: tempfile::TempDir,
    sink: Sink,
    daemon: Child,
}

/// A daemon relaying everything to a sink, with local submission in `<dir>/local`.
async fn rig() -> Rig {
    let sink = Sink::start("127.0.0.1").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        "[delivery]\nsmarthost = \"127.0.0.1:{}\"\ntls = \"none\"\n[local]\ndir = \"{}\"\npickup_interval = \"1s\"\n",
        sink.addr.port(),
        dir.path().join("local").display()
    );
    write_child_config(dir.path(), &extra);
    let daemon = Child::spawn(dir.path(), None);
    Rig { dir, sink, daemon }
}

impl Rig {
    fn config(&self) -> PathBuf {
        self.dir.path().join("config.toml")
    }

    fn maildrop(&self) -> PathBuf {
        self.dir.path().join("local/maildrop")
    }
}

/// What a sendmail run returned.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `program args` with `input` on standard input, off the async runtime.
async fn run(program: &Path, args: Vec<String>, env_config: Option<&Path>, input: &[u8]) -> Run {
    use std::io::Write;
    let program = program.to_path_buf();
    let env_config = env_config.map(Path::to_path_buf);
    let input = input.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(program);
        cmd.args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        match env_config {
            Some(c) => cmd.env("POSTERN_CONFIG", c),
            None => cmd.env_remove("POSTERN_CONFIG"),
        };
        let mut child = cmd.spawn().expect("spawn sendmail");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(&input)
            .expect("write stdin");
        let out = child.wait_with_output().expect("wait");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .expect("join")
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

const BIN: &str = env!("CARGO_BIN_EXE_postern");

#[tokio::test]
async fn t_and_i_take_recipients_from_headers_drop_bcc_and_keep_a_lone_dot() {
    let rig = rig().await;
    let config = rig.config().display().to_string();
    let message = b"To: Ann <ann@dest.test>\nCc: cat@dest.test\nBcc: hidden@dest.test\nSubject: cron\n\nfirst\n.\nafter the dot\n";
    let args = strings(&["sendmail", "--config", &config, "-t", "-i", "-odi", "-oem"]);
    let r = run(Path::new(BIN), args, None, message).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let got = rig.sink.wait_for(1).await;
    let mut rcpts = got[0].rcpts.clone();
    rcpts.sort();
    assert_eq!(
        rcpts,
        ["ann@dest.test", "cat@dest.test", "hidden@dest.test"]
    );
    let data = &got[0].data;
    assert!(
        !contains(data, b"Bcc:") && !contains(data, b"hidden"),
        "Bcc removed"
    );
    assert!(
        contains(data, b"\r\nfirst\r\n.\r\nafter the dot\r\n"),
        "lone dot is content"
    );
    assert!(contains(data, b"\r\nDate: ") && contains(data, b"\r\nMessage-ID: <"));
}

#[tokio::test]
async fn a_symlink_named_sendmail_sends_to_its_arguments_and_stops_at_a_dot() {
    let rig = rig().await;
    let link = rig.dir.path().join("sendmail");
    std::os::unix::fs::symlink(BIN, &link).expect("symlink");
    let message = b"Subject: hello\n\nbody line\n.\nnot part of the message\n";
    let args = strings(&[
        "-f",
        "app@sender.test",
        "-F",
        "The App",
        "bob@dest.test",
        "carol@dest.test",
    ]);
    // Configuration from the environment this time.
    let r = run(&link, args, Some(&rig.config()), message).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    let got = rig.sink.wait_for(1).await;
    assert_eq!(got[0].from, "app@sender.test");
    assert_eq!(got[0].rcpts, ["bob@dest.test", "carol@dest.test"]);
    assert!(contains(
        &got[0].data,
        b"From: \"The App\" <app@sender.test>\r\n"
    ));
    assert!(contains(&got[0].data, b"body line\r\n"));
    assert!(
        !contains(&got[0].data, b"not part"),
        "a lone dot ends input without -i"
    );
}

#[tokio::test]
async fn bad_recipients_exit_with_sysexits_codes_and_send_nothing() {
    let rig = rig().await;
    let config = rig.config().display().to_string();
    let bad = run(
        Path::new(BIN),
        strings(&["sendmail", "--config", &config, "bob@@dest.test"]),
        None,
        b"Subject: x\n\nbody\n",
    )
    .await;
    assert_eq!(bad.code, Some(65), "EX_DATAERR: {}", bad.stderr);
    assert!(bad.stderr.contains("bad address"), "{}", bad.stderr);
    let none = run(
        Path::new(BIN),
        strings(&["sendmail", "--config", &config, "-t"]),
        None,
        b"Subject: no recipients\n\nbody\n",
    )
    .await;
    assert_eq!(none.code, Some(64), "EX_USAGE: {}", none.stderr);
    // Refused by the daemon itself: a suppressed recipient gets 550 at RCPT.
    let add = std::process::Command::new(BIN)
        .args(["suppress", "add", "gone@dest.test", "--config", &config])
        .output()
        .expect("suppress add");
    assert!(add.status.success(), "{add:?}");
    let refused = run(
        Path::new(BIN),
        strings(&["sendmail", "--config", &config, "gone@dest.test"]),
        None,
        b"Subject: x\n\nbody\n",
    )
    .await;
    assert_eq!(refused.code, Some(65), "EX_DATAERR: {}", refused.stderr);
    assert!(refused.stderr.contains("550"), "{}", refused.stderr);
    assert!(std::fs::read_dir(rig.maildrop())
        .expect("maildrop")
        .next()
        .is_none());
    assert_eq!(rig.sink.received().len(), 0);
}

#[tokio::test]
async fn with_the_daemon_stopped_mail_waits_sealed_in_the_maildrop_then_goes() {
    let mut rig = rig().await;
    assert!(rig.daemon.terminate().success());
    let config = rig.config().display().to_string();
    let message = b"Subject: while down\n\nMAILDROP-MARKER-7f3a\n";
    let args = strings(&["sendmail", "--config", &config, "-v", "late@dest.test"]);
    let r = run(Path::new(BIN), args, None, message).await;
    assert_eq!(r.code, Some(0), "{}", r.stderr);
    assert!(r.stderr.contains("maildrop"), "{}", r.stderr);
    let files: Vec<_> = std::fs::read_dir(rig.maildrop())
        .expect("maildrop")
        .flatten()
        .collect();
    assert_eq!(files.len(), 1);
    let bytes = all_bytes(&rig.dir.path().join("local"));
    assert!(!contains(&bytes, b"MAILDROP-MARKER-7f3a"), "body sealed");
    assert!(!contains(&bytes, b"late@dest.test"), "recipient sealed");
    assert!(rig.sink.received().is_empty());

    let _restarted = Child::spawn(rig.dir.path(), None);
    let got = rig.sink.wait_for(1).await;
    assert_eq!(got[0].rcpts, ["late@dest.test"]);
    assert!(contains(&got[0].data, b"MAILDROP-MARKER-7f3a"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read_dir(rig.maildrop()).expect("maildrop").count() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "maildrop file not removed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn mailq_and_queue_commands_list_deferred_mail_without_addresses() {
    let rig = rig().await;
    rig.sink
        .behaviour
        .lock()
        .unwrap()
        .rcpt_replies
        .insert("slow@dest.test".into(), "450 4.2.1 Try again later".into());
    let config = rig.config().display().to_string();
    let empty = run(
        Path::new(BIN),
        strings(&["mailq", "--config", &config]),
        None,
        b"",
    )
    .await;
    assert_eq!(empty.code, Some(0), "{}", empty.stderr);
    assert_eq!(empty.stdout, "Mail queue is empty\n");
    let sent = run(
        Path::new(BIN),
        strings(&["sendmail", "--config", &config, "slow@dest.test"]),
        None,
        b"Subject: deferred\n\nbody\n",
    )
    .await;
    assert_eq!(sent.code, Some(0), "{}", sent.stderr);
    let mailq = std::process::Command::new(BIN)
        .args(["mailq", "--config", &config])
        .output()
        .expect("mailq");
    let text = String::from_utf8_lossy(&mailq.stdout);
    assert!(mailq.status.success(), "{mailq:?}");
    assert!(
        text.contains("dest.test") && text.ends_with("-- 1 message(s)\n"),
        "{text}"
    );
    assert!(!text.contains("slow@"), "no address in the listing: {text}");
    let summary = std::process::Command::new(BIN)
        .args(["queue", "summary", "--config", &config])
        .output()
        .expect("queue summary");
    let text = String::from_utf8_lossy(&summary.stdout);
    let row = text.lines().find(|l| l.starts_with("dest.test"));
    assert_eq!(
        row.and_then(|r| r.split_whitespace().nth(1)),
        Some("1"),
        "{text}"
    );
}
