//! PROXY protocol on a listener behind a load balancer: the header's client address is the
//! one relay rules see; connections without a header, or from a non-proxy address, are refused.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Raw, Reply};
use postern::config::{Config, ListenerMode};
use postern::daemon::Daemon;

/// A daemon whose fourth listener (relay mode) expects PROXY headers from 127.0.0.1; only
/// `networks` (a CIDR) may relay. Returns its shutdown, the listener address and the spool.
async fn start(
    dir: &std::path::Path,
    networks: &str,
) -> (
    tokio_util::sync::CancellationToken,
    SocketAddr,
    postern::spool::Spool,
) {
    let extra = format!(
        "[[listener]]\naddr = \"127.0.0.1:0\"\nmode = \"relay\"\nproxy_protocol = true\nproxy_from = [\"127.0.0.1/32\"]\n\
         [relay]\nnetworks = [\"{networks}\"]\n"
    );
    let config = Config::parse(&common::config_text(dir, &extra), "test", dir).unwrap();
    let options = postern::daemon::Options {
        run_queue: false,
        ..Default::default()
    };
    let daemon = Daemon::start_with(config, options).await.unwrap();
    let addrs = daemon.local_addrs();
    assert_eq!(addrs[3].1, ListenerMode::Relay);
    let shutdown = daemon.shutdown.clone();
    let spool = daemon.spool.clone();
    tokio::spawn(daemon.run(Duration::from_secs(5)));
    (shutdown, addrs[3].0, spool)
}

fn v2_header(source: [u8; 4], port: u16) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    h.extend_from_slice(&[0x21, 0x11, 0, 12]);
    h.extend_from_slice(&source);
    h.extend_from_slice(&[127, 0, 0, 1]);
    h.extend_from_slice(&port.to_be_bytes());
    h.extend_from_slice(&25u16.to_be_bytes());
    h
}

/// Connects from `source`, sends `header`, and returns the client and the first reply.
async fn connect(
    source: &str,
    addr: SocketAddr,
    header: &[u8],
) -> (Raw<tokio::net::TcpStream>, Option<Reply>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(source.parse().unwrap(), 0))
        .unwrap();
    let stream = socket.connect(addr).await.unwrap();
    let mut c = Raw {
        io: tokio::io::BufReader::new(stream),
    };
    c.send(header).await;
    let first = tokio::time::timeout(Duration::from_secs(10), c.try_reply())
        .await
        .expect("a reply within 10 s");
    (c, first)
}

/// The reply to RCPT after EHLO and MAIL.
async fn rcpt_reply(c: &mut Raw<tokio::net::TcpStream>) -> Reply {
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<a@example.test>", 250).await;
    c.cmd("RCPT TO:<b@dest.test>").await
}

#[tokio::test]
async fn v1_and_v2_from_the_proxy_set_the_client_address() {
    let dir = tempfile::tempdir().unwrap();
    let (shutdown, addr, spool) = start(dir.path(), "192.0.2.0/24").await;

    let (mut c, g) = connect(
        "127.0.0.1",
        addr,
        b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n",
    )
    .await;
    assert_eq!(g.unwrap().code, 220);
    assert_eq!(rcpt_reply(&mut c).await.code, 250, "192.0.2.7 may relay");
    c.expect("DATA", 354).await;
    c.send("Subject: p\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    let id = spool.live()[0];
    let stored = spool.read_whole(id).await.unwrap();
    assert_eq!(stored.envelope.client_ip.to_string(), "192.0.2.7");

    let (mut c, g) = connect(
        "127.0.0.1",
        addr,
        b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 25\r\n",
    )
    .await;
    assert_eq!(g.unwrap().code, 220);
    let r = rcpt_reply(&mut c).await;
    assert_eq!(
        (r.code, r.enhanced()),
        (554, "5.7.1"),
        "198.51.100.7 may not relay: {r:?}"
    );

    let (mut c, g) = connect("127.0.0.1", addr, &v2_header([192, 0, 2, 8], 40001)).await;
    assert_eq!(g.unwrap().code, 220);
    assert_eq!(
        rcpt_reply(&mut c).await.code,
        250,
        "v2: 192.0.2.8 may relay"
    );

    let (mut c, g) = connect("127.0.0.1", addr, &v2_header([198, 51, 100, 8], 40001)).await;
    assert_eq!(g.unwrap().code, 220);
    assert_eq!(
        rcpt_reply(&mut c).await.code,
        554,
        "v2: 198.51.100.8 may not"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn a_header_from_elsewhere_or_no_header_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (shutdown, addr, _) = start(dir.path(), "192.0.2.0/24").await;
    for (source, header) in [
        (
            "127.0.0.2",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n".to_vec(),
        ),
        ("127.0.0.2", v2_header([192, 0, 2, 7], 40000)),
        ("127.0.0.1", b"EHLO client.test\r\n".to_vec()),
        ("127.0.0.1", b"PROXY TCP4 192.0.2.7\r\n".to_vec()),
    ] {
        let (mut c, first) = connect(source, addr, &header).await;
        let r = first.expect("a reply");
        assert_eq!(
            (r.code, r.enhanced()),
            (421, "4.7.0"),
            "{source} {header:?}: {r:?}"
        );
        assert!(c.try_reply().await.is_none(), "closed");
    }
    shutdown.cancel();
}

/// HAProxy (Debian package `haproxy`), started by a test in front of a PROXY-protocol listener:
/// real v1 and v2 headers from a real balancer, not ones this crate's tests wrote themselves.
/// It listens on 127.0.0.2 (an ephemeral port) and connects to Postern from 127.0.0.1, the
/// configured proxy address; killed when dropped.
struct Haproxy {
    child: std::process::Child,
    addr: SocketAddr,
    log: std::path::PathBuf,
}

/// Where haproxy is installed; `/usr/sbin` is often not on a user's PATH. Its absence fails
/// the test: CI installs the peers, so a missing one must not pass unnoticed.
fn haproxy_binary() -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("haproxy"))
        .find(|p| p.is_file())
        .expect("haproxy is not installed: .ci/run installs it (Debian package haproxy)")
}

/// Whether something listens on `addr` now, from /proc/net/tcp (state 0A), without connecting:
/// a probe connection would itself be proxied to Postern.
fn listening(addr: SocketAddr) -> bool {
    let std::net::IpAddr::V4(ip) = addr.ip() else {
        return false;
    };
    // The kernel prints the address as the native-endian u32 of its network-order octets.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(ip.octets()),
        addr.port()
    );
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(1) == Some(&local.as_str()) && f.get(3) == Some(&"0A")
        })
}

impl Haproxy {
    /// Starts haproxy forwarding to `backend` with `send_proxy` (`send-proxy` for v1,
    /// `send-proxy-v2`); its configuration and log go into `dir`.
    async fn start(dir: &std::path::Path, backend: SocketAddr, send_proxy: &str) -> Haproxy {
        let bin = haproxy_binary();
        // The port is free when chosen but could be taken before haproxy binds it: retry.
        for attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.2:0")
                .and_then(|l| l.local_addr())
                .expect("a free port on 127.0.0.2")
                .port();
            let addr = SocketAddr::from(([127, 0, 0, 2], port));
            let config = dir.join(format!("haproxy-{attempt}.cfg"));
            std::fs::write(
                &config,
                format!(
                    "global\n    maxconn 64\n\
                     defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\
                     frontend smtp\n    bind {addr}\n    default_backend postern\n\
                     backend postern\n    server postern {backend} {send_proxy} source 127.0.0.1\n"
                ),
            )
            .unwrap();
            let log = dir.join(format!("haproxy-{attempt}.log"));
            let out = std::fs::File::create(&log).unwrap();
            let child = std::process::Command::new(&bin)
                .arg("-db") // foreground, no daemon
                .arg("-f")
                .arg(&config)
                .stdin(std::process::Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .expect("spawn haproxy");
            let mut h = Haproxy { child, addr, log };
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(status)) = h.child.try_wait() {
                    eprintln!("haproxy exited ({status}): {}", h.log_text());
                    break;
                }
                if listening(addr) {
                    return h;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        panic!("haproxy did not start (logs in {})", dir.display());
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Through HAProxy with `send_proxy`: a client from 127.0.0.3 (the only address that may
/// relay) is seen as 127.0.0.3 by the relay decision, in the envelope and in `Received:`, and
/// one from 127.0.0.4 is refused; Postern itself only ever sees connections from 127.0.0.1.
async fn through_haproxy(send_proxy: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (shutdown, addr, spool) = start(dir.path(), "127.0.0.3/32").await;
    let haproxy = Haproxy::start(dir.path(), addr, send_proxy).await;

    let (mut c, g) = Raw::connect_from("127.0.0.3", haproxy.addr).await;
    let g = g.unwrap_or_else(|| panic!("no greeting; haproxy log: {}", haproxy.log_text()));
    assert_eq!(g.code, 220, "{g:?}");
    assert_eq!(rcpt_reply(&mut c).await.code, 250, "127.0.0.3 may relay");
    c.expect("DATA", 354).await;
    c.send("Subject: through haproxy\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.code, 250);
    c.expect("QUIT", 221).await;
    let live = spool.live();
    assert_eq!(live.len(), 1);
    let stored = spool.read_whole(live[0]).await.unwrap();
    assert_eq!(stored.envelope.client_ip.to_string(), "127.0.0.3");
    let received = String::from_utf8_lossy(&stored.body);
    assert!(
        received.starts_with("Received: from client.test ([127.0.0.3])"),
        "{received}"
    );

    let (mut c, g) = Raw::connect_from("127.0.0.4", haproxy.addr).await;
    assert_eq!(g.map(|g| g.code), Some(220));
    let r = rcpt_reply(&mut c).await;
    assert_eq!(
        (r.code, r.enhanced()),
        (554, "5.7.1"),
        "127.0.0.4 may not relay: {r:?}"
    );
    shutdown.cancel();
}

#[tokio::test]
async fn haproxy_send_proxy_v1_passes_the_client_address() {
    through_haproxy("send-proxy").await;
}

#[tokio::test]
async fn haproxy_send_proxy_v2_passes_the_client_address() {
    through_haproxy("send-proxy-v2").await;
}
