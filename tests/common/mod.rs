//! Shared test harness: a real Postern on 127.0.0.1:0 with a temporary data directory, and a
//! raw SMTP client for the byte-exact cases no library client would send.
#![allow(dead_code)]

pub mod dns;
pub mod dnsmasq;
pub mod sink;
pub mod tarpit;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use postern::config::{Config, ListenerMode};
use postern::daemon::Daemon;
use postern::spool::{Spool, WholeMessage};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub const USER: &str = "app";
pub const PASSWORD: &str = "correct horse battery staple";

/// One argon2 hash for the whole test binary: hashing is slow on purpose.
fn password_hash() -> &'static str {
    static HASH: OnceLock<String> = OnceLock::new();
    HASH.get_or_init(|| postern::auth::hash_password(PASSWORD).expect("hash"))
}

/// A running in-process server.
pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub relay: SocketAddr,
    pub submission: SocketAddr,
    pub submissions: SocketAddr,
    pub spool: Spool,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    /// What SIGHUP calls.
    pub reload: postern::server::ReloadHandle,
    /// Where `GET /metrics` is served, with `[metrics] listen` in the test's config.
    pub metrics: Option<SocketAddr>,
}

/// The configuration text the tests start from; `extra` is appended (TOML tables).
pub fn config_text(dir: &Path, extra: &str) -> String {
    format!(
        r#"
[server]
hostname = "postern.example.test"
data_dir = "{data}"

[[listener]]
addr = "127.0.0.1:0"
mode = "relay"
[[listener]]
addr = "127.0.0.1:0"
mode = "submission"
[[listener]]
addr = "127.0.0.1:0"
mode = "submissions"

[tls]
cert = "{dir}/certs/server.crt"
key = "{dir}/certs/server.key"

[[account]]
username = "{USER}"
password_hash = "{hash}"
{extra}
"#,
        data = dir.join("data").display(),
        dir = dir.display(),
        hash = password_hash(),
    )
}

impl TestServer {
    /// Starts a server; `extra` adds or overrides TOML tables (e.g. `[limits]`).
    /// The queue does not run: messages stay in the spool for inspection.
    pub async fn start(extra: &str) -> TestServer {
        let options = postern::daemon::Options {
            run_queue: false,
            ..Default::default()
        };
        TestServer::start_with(extra, options).await.0
    }

    /// Starts with explicit daemon options; also returns the queue.
    pub async fn start_with(
        extra: &str,
        options: postern::daemon::Options,
    ) -> (TestServer, Arc<postern::queue::Queue>) {
        let dir = tempfile::tempdir().expect("tempdir");
        TestServer::start_in(dir, extra, options).await
    }

    /// Starts with the queue driven by the test (`Queue::run_due`) on a manual clock that
    /// starts now; returns the clock to move.
    pub async fn start_manual(
        extra: &str,
    ) -> (
        TestServer,
        Arc<postern::queue::Queue>,
        Arc<postern::clock::ManualClock>,
    ) {
        use postern::clock::Clock;
        let now = postern::clock::SystemClock.now();
        let clock = Arc::new(postern::clock::ManualClock::new(now));
        let options = postern::daemon::Options {
            clock: clock.clone(),
            run_queue: false,
            ..Default::default()
        };
        let (server, queue) = TestServer::start_with(extra, options).await;
        (server, queue, clock)
    }

    /// Starts with the data directory at `<dir>/data` (which the test may have prepared, e.g.
    /// as a small filesystem of its own).
    pub async fn start_in(
        dir: tempfile::TempDir,
        extra: &str,
        options: postern::daemon::Options,
    ) -> (TestServer, Arc<postern::queue::Queue>) {
        let text = config_text(dir.path(), extra);
        let config = Config::parse(&text, "test", dir.path()).expect("test config is valid");
        let daemon = Daemon::start_with(config, options)
            .await
            .expect("daemon starts");
        let queue = daemon.queue.clone();
        let addr = |mode| {
            daemon
                .local_addrs()
                .into_iter()
                .find(|(_, m)| *m == mode)
                .map(|(a, _)| a)
                .expect("listener")
        };
        let (relay, submission, submissions) = (
            addr(ListenerMode::Relay),
            addr(ListenerMode::Submission),
            addr(ListenerMode::Submissions),
        );
        let spool = daemon.spool.clone();
        let shutdown = daemon.shutdown.clone();
        let reload = daemon.reload_handle();
        let metrics = daemon.metrics_addr();
        let task = tokio::spawn(daemon.run(Duration::from_secs(5)));
        let server = TestServer {
            dir,
            relay,
            submission,
            submissions,
            spool,
            shutdown,
            task,
            reload,
            metrics,
        };
        (server, queue)
    }

    pub fn cert_path(&self) -> PathBuf {
        self.dir.path().join("certs/server.crt")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Every message in the spool, oldest first.
    pub async fn messages(&self) -> Vec<WholeMessage> {
        let mut out = Vec::new();
        for id in self.spool.live() {
            out.push(self.spool.read_whole(id).await.expect("readable"));
        }
        out
    }

    /// A rustls client config that trusts this server's generated certificate.
    pub fn client_tls(&self) -> Arc<rustls::ClientConfig> {
        client_tls_for(&self.cert_path())
    }
}

/// A rustls client config that trusts the certificate in `cert` (PEM).
pub fn client_tls_for(cert: &Path) -> Arc<rustls::ClientConfig> {
    {
        postern::tls::install_provider();
        let mut roots = rustls::RootCertStore::empty();
        let pem = std::fs::read(cert).expect("cert");
        for cert in rustls_pemfile_certs(&pem) {
            roots.add(cert).expect("add root");
        }
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<_, _>>()
        .expect("pem")
}

/// True when `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// All bytes of all files under `dir`.
pub fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                out.extend(all_bytes(&path));
            } else if let Ok(b) = std::fs::read(&path) {
                out.extend(b);
            }
        }
    }
    out
}

/// Polls `condition` every 20 ms until it holds or `limit` has passed; returns whether it held.
/// Callers assert the result, so a condition that never comes true fails the test.
pub async fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One record of a message as it sits in a spool segment file: where it is and its sealed
/// bytes. Taken while the message is queued, it says what must be gone once it is destroyed.
#[derive(Debug, Clone)]
pub struct SealedRecord {
    pub segment: PathBuf,
    /// Offset of the payload (just after the 32-byte header) in the segment.
    pub offset: u64,
    /// The payload: nonce, ciphertext and tag.
    pub payload: Vec<u8>,
}

/// Every record (message and state) of queue id `id` (hex, as in "queued as <id>") in the
/// spool's segment files, found by header as src/spool/record.rs lays it out: "PSTR", kind,
/// three zero bytes, the 16-byte id, payload length (LE u32), CRC.
pub fn sealed_records(data_dir: &Path, id: &str) -> Vec<SealedRecord> {
    let id: postern::spool::QueueId = id.parse().expect("queue id");
    let mut out = Vec::new();
    let mut segments: Vec<PathBuf> = std::fs::read_dir(data_dir.join("spool"))
        .expect("spool dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    for segment in segments {
        let bytes = std::fs::read(&segment).expect("read segment");
        for kind in [1u8, 2, 3] {
            let mut header = b"PSTR".to_vec();
            header.extend_from_slice(&[kind, 0, 0, 0]);
            header.extend_from_slice(&id.0);
            let mut from = 0;
            while let Some(pos) = find(&bytes[from..], &header).map(|p| p + from) {
                let len = u32::from_le_bytes(bytes[pos + 24..pos + 28].try_into().unwrap());
                let start = pos + 32;
                let payload = bytes[start..start + len as usize].to_vec();
                out.push(SealedRecord {
                    segment: segment.clone(),
                    offset: start as u64,
                    payload,
                });
                from = start;
            }
        }
    }
    out
}

/// The records of a queued message that still hold sealed bytes (superseded state records
/// may already be punched); asserts there is at least one.
pub fn queued_records(data_dir: &Path, id: &str) -> Vec<SealedRecord> {
    let records: Vec<SealedRecord> = sealed_records(data_dir, id)
        .into_iter()
        .filter(|r| r.payload.iter().any(|&b| b != 0))
        .collect();
    assert!(
        !records.is_empty(),
        "message {id} has no sealed bytes on disk"
    );
    records
}

/// Asserts every record taken by [`queued_records`] is gone from disk: its range reads back as
/// zeros (punched out) or its segment is unlinked, and its sealed bytes occur nowhere under
/// `data_dir`.
pub fn assert_destroyed(records: &[SealedRecord], data_dir: &Path) {
    use std::os::unix::fs::FileExt;
    assert!(!records.is_empty(), "nothing was captured to check");
    let everything = all_bytes(data_dir);
    for r in records {
        if let Ok(file) = std::fs::File::open(&r.segment) {
            let mut now = vec![0xAAu8; r.payload.len()];
            file.read_exact_at(&mut now, r.offset).expect("read range");
            assert!(
                now.iter().all(|&b| b == 0),
                "{} at {}: the record's bytes are still there",
                r.segment.display(),
                r.offset
            );
        }
        // 64 bytes of ciphertext cannot occur by chance: were they copied anywhere, they'd show.
        let n = r.payload.len().min(64);
        let start = (r.payload.len() - n) / 2;
        let probe = &r.payload[start..start + n];
        assert!(
            !contains(&everything, probe),
            "sealed bytes of a destroyed record are still in the data directory"
        );
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The `rcpt=` values of the log lines that carry one (delivery outcomes, suppressions),
/// without the quotes the log puts around string fields.
pub fn logged_rcpts(log: &str) -> Vec<String> {
    log.split_whitespace()
        .filter_map(|w| w.strip_prefix("rcpt="))
        .map(|v| v.trim_matches('"').to_string())
        .collect()
}

/// True when `s` is a recipient pseudonym as logged: 12 lower-case hex digits, '@', `domain`.
pub fn is_pseudonym_at(s: &str, domain: &str) -> bool {
    s.split_once('@').is_some_and(|(local, d)| {
        d == domain
            && local.len() == 12
            && local
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// True when the bytes hold a CR not followed by LF, or an LF not preceded by CR.
pub fn has_bare_cr_or_lf(b: &[u8]) -> bool {
    b.iter().enumerate().any(|(i, &c)| {
        (c == b'\r' && b.get(i + 1) != Some(&b'\n'))
            || (c == b'\n' && (i == 0 || b[i - 1] != b'\r'))
    })
}

/// A byte-level SMTP client.
pub struct Raw<S> {
    pub io: BufReader<S>,
}

/// A parsed reply: code and the text of all its lines joined by '\n'.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    /// The enhanced status code of the first line ("5.5.2"), if any.
    pub fn enhanced(&self) -> &str {
        self.text.split_whitespace().next().unwrap_or("")
    }
}

impl Raw<TcpStream> {
    /// Connects and reads the greeting.
    pub async fn connect(addr: SocketAddr) -> (Raw<TcpStream>, Reply) {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let mut raw = Raw {
            io: BufReader::new(stream),
        };
        let greeting = raw.reply().await;
        (raw, greeting)
    }

    /// Connects from a chosen loopback source address (127.0.0.2 is outside the default
    /// test `relay.networks` only when a test narrows them) and reads the greeting.
    pub async fn connect_from(source: &str, addr: SocketAddr) -> (Raw<TcpStream>, Option<Reply>) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(source.parse().expect("source ip"), 0))
            .expect("bind source");
        let stream = socket.connect(addr).await.expect("connect");
        let mut raw = Raw {
            io: BufReader::new(stream),
        };
        let greeting = tokio::time::timeout(Duration::from_secs(10), raw.try_reply())
            .await
            .expect("greeting within 10 s");
        (raw, greeting)
    }

    /// Upgrades to TLS after a `220` to STARTTLS (or right away for implicit TLS).
    pub async fn tls(
        self,
        config: Arc<rustls::ClientConfig>,
    ) -> Raw<tokio_rustls::client::TlsStream<TcpStream>> {
        assert!(self.io.buffer().is_empty(), "unread bytes before TLS");
        let connector = tokio_rustls::TlsConnector::from(config);
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let tls = connector
            .connect(name, self.io.into_inner())
            .await
            .expect("TLS handshake");
        Raw {
            io: BufReader::new(tls),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    pub async fn send(&mut self, bytes: impl AsRef<[u8]>) {
        self.io
            .get_mut()
            .write_all(bytes.as_ref())
            .await
            .expect("write");
        self.io.get_mut().flush().await.expect("flush");
    }

    /// Reads one (possibly multi-line) reply; panics after 10 s so no test hangs.
    pub async fn reply(&mut self) -> Reply {
        tokio::time::timeout(Duration::from_secs(10), self.try_reply())
            .await
            .expect("reply within 10 s")
            .expect("a reply, not EOF")
    }

    /// Reads one reply, or None at EOF.
    pub async fn try_reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.io.read_line(&mut line).await.ok()?;
            if n == 0 {
                return None;
            }
            let line = line.trim_end_matches(['\r', '\n']);
            assert!(line.len() >= 3, "short reply line {line:?}");
            let code: u16 = line[..3].parse().expect("numeric code");
            lines.push(line.get(4..).unwrap_or("").to_string());
            if line.as_bytes().get(3) != Some(&b'-') {
                return Some(Reply {
                    code,
                    text: lines.join("\n"),
                });
            }
        }
    }
    #[allow(dead_code)]
    fn _unused(code: u16, lines: Vec<String>) -> Option<Reply> {
        Some(Reply {
            code,
            text: lines.join("\n"),
        })
    }

    /// Sends a command line and returns its reply.
    pub async fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n")).await;
        self.reply().await
    }

    /// Sends and asserts the reply code, returning the reply.
    pub async fn expect(&mut self, line: &str, code: u16) -> Reply {
        let r = self.cmd(line).await;
        assert_eq!(r.code, code, "{line} -> {r:?}");
        r
    }

    /// EHLO, MAIL, one RCPT per recipient, DATA, body (already dot-stuffed, ending CRLF), end.
    pub async fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> Reply {
        self.expect(&format!("MAIL FROM:<{from}>"), 250).await;
        for rcpt in to {
            self.expect(&format!("RCPT TO:<{rcpt}>"), 250).await;
        }
        self.expect("DATA", 354).await;
        self.send(format!("{body}.\r\n")).await;
        self.reply().await
    }
}

/// Sends one message over a relay port (EHLO, the transaction, QUIT); asserts the 250 and
/// returns the queue id.
pub async fn submit(relay: SocketAddr, from: &str, to: &[&str], body: &str) -> String {
    let (mut c, _) = Raw::connect(relay).await;
    c.expect("EHLO client.test", 250).await;
    let r = c.send_mail(from, to, body).await;
    assert_eq!(r.code, 250, "{r:?}");
    c.expect("QUIT", 221).await;
    r.text.rsplit(' ').next().unwrap().to_string()
}

/// The `postern` binary running as a child process, for crash and resource-limit tests.
pub struct Child {
    pub child: std::process::Child,
    pub relay: SocketAddr,
    /// Everything the daemon logged so far (stderr), filled by a reader thread.
    pub log: Arc<std::sync::Mutex<String>>,
}

impl Child {
    /// Starts `postern serve --config <dir>/config.toml`, optionally under `ulimit -f <kib>`,
    /// and waits until its listeners are up.
    pub fn spawn(dir: &Path, file_size_limit_kib: Option<u64>) -> Child {
        Child::spawn_under(
            dir,
            file_size_limit_kib.map(|kib| format!("ulimit -f {kib}")),
        )
    }

    /// As [`spawn`](Self::spawn), started by bash after `limits` (e.g. `ulimit -Sn 512`).
    pub fn spawn_under(dir: &Path, limits: Option<String>) -> Child {
        use std::io::BufRead;
        let config = dir.join("config.toml");
        let bin = env!("CARGO_BIN_EXE_postern");
        let mut cmd = match limits {
            Some(limits) => {
                let mut c = std::process::Command::new("bash");
                c.arg("-c")
                    .arg(format!("{limits}; exec \"$0\" serve --config \"$1\""))
                    .arg(bin)
                    .arg(&config);
                c
            }
            None => {
                let mut c = std::process::Command::new(bin);
                c.arg("serve").arg("--config").arg(&config);
                c
            }
        };
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn postern");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("listening") && line.contains("mode=Relay") {
                    if let Some(addr) = line
                        .split("addr=")
                        .nth(1)
                        .and_then(|s| s.split_whitespace().next())
                    {
                        let _ = tx.send(addr.to_string());
                    }
                }
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("postern did not start: {}", log.lock().unwrap()));
        Child {
            child,
            relay: addr.parse().expect("addr"),
            log,
        }
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(&mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("wait")
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `<dir>/config.toml` for [`Child`]: fixed test config with one relay listener on :0.
pub fn write_child_config(dir: &Path, extra: &str) {
    // A resolver that never answers (the discard port): deliveries defer, nothing leaves the
    // machine, and the messages stay in the spool for the test to inspect.
    let text = config_text(
        dir,
        &format!("[dns]\nnameservers = [\"127.0.0.1:9\"]\ntimeout = \"1s\"\n{extra}"),
    );
    std::fs::write(dir.join("config.toml"), text).expect("write config");
}

/// Opens the spool a (dead) child left behind, as recovery at the next start would.
pub fn open_spool(dir: &Path) -> (Spool, postern::spool::RecoveryReport) {
    let data = dir.join("data");
    let key =
        postern::crypto::load_or_create_master_key(&data.join("master.key")).expect("master key");
    Spool::open(&data, key, 64 << 20).expect("spool")
}

/// A test certificate authority and a server certificate it issued.
pub struct TestCa {
    /// The CA certificate (PEM), to trust via `delivery.tls_ca_file`.
    pub ca_file: PathBuf,
    /// Server config presenting the issued certificate.
    pub server: Arc<rustls::ServerConfig>,
}

/// Makes a CA in `dir` and a server certificate for `names` signed by it.
pub fn test_ca(dir: &Path, names: &[&str]) -> TestCa {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    postern::tls::install_provider();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Postern Test CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let leaf = CertificateParams::new(names)
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let ca_file = dir.join("test-ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let server = server_config(leaf.der().clone(), leaf_key.serialize_der());
    TestCa { ca_file, server }
}

/// A self-signed certificate no one trusts (for opportunistic TLS).
pub fn self_signed_server(names: &[&str]) -> Arc<rustls::ServerConfig> {
    postern::tls::install_provider();
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let c = rcgen::generate_simple_self_signed(names).unwrap();
    server_config(c.cert.der().clone(), c.signing_key.serialize_der())
}

fn server_config(
    cert: rustls::pki_types::CertificateDer<'static>,
    key: Vec<u8>,
) -> Arc<rustls::ServerConfig> {
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.into());
    Arc::new(
        rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap(),
    )
}
