//! Running under systemd: readiness notification on NOTIFY_SOCKET, and JSON log lines.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::config_text;

const BIN: &str = env!("CARGO_BIN_EXE_postern");

/// Writes a config with one relay listener on :0 and no reachable resolver; `server_keys` go
/// into `[server]`.
fn write_config(dir: &std::path::Path, server_keys: &str) -> std::path::PathBuf {
    let text = config_text(dir, "[dns]\nnameservers = [\"127.0.0.1:9\"]\n")
        .replace("[server]\n", &format!("[server]\n{server_keys}"));
    let path = dir.join("config.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

#[test]
fn the_daemon_says_ready_on_notify_socket_once_listening_and_stopping_on_term() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "200000")
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let mut buf = [0u8; 4096];
    let n = socket.recv(&mut buf).expect("a notification within 30 s");
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    // Sent after the start: spool recovered, listeners and sockets bound.
    assert!(dir.path().join("data/admin.sock").exists());
    // The watchdog is served (WATCHDOG_USEC=200ms: a ping every 100 ms).
    let n = socket.recv(&mut buf).expect("a watchdog ping");
    assert_eq!(&buf[..n], b"WATCHDOG=1");
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(30);
    let stopping = loop {
        let n = socket
            .recv(&mut buf)
            .expect("STOPPING=1 before the timeout");
        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
        if text.contains("STOPPING=1") || Instant::now() > deadline {
            break text;
        }
    };
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert!(child.wait().expect("wait").success());
}

/// Runs the daemon until it is up (its admin socket exists), stops it with SIGTERM and returns
/// what it wrote on standard error.
fn run_briefly(dir: &std::path::Path, config: &std::path::Path, env: &[(&str, &str)]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("JOURNAL_STREAM")
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn");
    let admin = dir.join("data/admin.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !admin.exists() {
        assert!(Instant::now() < deadline, "daemon did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "log_format = \"json\"\n");
    let log = run_briefly(dir.path(), &config, &[]);
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 3, "{log}");
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
    let listening = lines
        .iter()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap_or_default())
        .find(|v| v["message"] == "listening")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(listening["mode"], "Relay", "fields are keys: {listening}");
}

#[test]
fn under_journald_lines_carry_a_level_prefix_and_no_timestamp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), "");
    let log = run_briefly(dir.path(), &config, &[("JOURNAL_STREAM", "8:12345")]);
    let listening = log
        .lines()
        .find(|l| l.contains("listening"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(listening.starts_with("<6>"), "info is <6>: {listening}");
    assert!(
        !listening.contains("INFO"),
        "level only as the prefix: {listening}"
    );
    let year = chrono::Utc::now().format("%Y-").to_string();
    assert!(!log.contains(&year), "no timestamps: {log}");
    assert!(log.lines().all(|l| l.starts_with('<')), "{log}");
}

/// The soft and hard "Max open files" of a running process, from /proc/PID/limits.
fn open_files_limits(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut fields = line["Max open files".len()..].split_whitespace();
    let soft = fields.next().expect("soft").to_string();
    let hard = fields.next().expect("hard").to_string();
    (soft, hard)
}

/// Starts the daemon (shipped limits) after the shell command `ulimit`; returns its soft and
/// hard open-files limits while it runs, and its log once stopped.
fn serve_under(ulimit: &str) -> ((String, String), String) {
    let dir = tempfile::tempdir().unwrap();
    common::write_child_config(dir.path(), "");
    let mut child = common::Child::spawn_under(dir.path(), Some(ulimit.into()));
    let limits = open_files_limits(child.child.id());
    child.terminate();
    let log = child.log.lock().unwrap().clone();
    (limits, log)
}

#[test]
fn serve_raises_its_open_files_limit_to_the_hard_limit() {
    // A shell's usual soft limit, far below the hard one and below what 1,000 connections use.
    let ((soft, hard), _) = serve_under("ulimit -Sn 1024");
    assert_ne!(
        hard, "1024",
        "the test needs a hard limit above 1024 (ulimit -Hn)"
    );
    assert_eq!(soft, hard, "the soft limit was not raised");
}

#[test]
fn serve_warns_when_the_open_files_limit_is_below_its_connection_limits() {
    // Hard limit 512 too: nothing to raise to, and 1,000 connections need more.
    let ((soft, _), log) = serve_under("ulimit -n 512");
    assert_eq!(soft, "512");
    assert!(
        log.contains("open-files limit is below") && log.contains("needed=2256"),
        "no warning in: {log}"
    );
}
