//! PROXY protocol on a listener behind a load balancer: the header's client address is the
//! one relay rules see; connections without a header, or from a non-proxy address, are refused.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{Raw, Reply};
use postern::config::{Config, ListenerMode};
use postern::daemon::Daemon;

/// A daemon whose fourth listener (relay mode) expects PROXY headers from 127.0.0.1; only
/// 192.0.2.0/24 may relay. Returns the daemon's task, its shutdown and the listener address.
async fn start(
    dir: &std::path::Path,
) -> (
    tokio_util::sync::CancellationToken,
    SocketAddr,
    postern::spool::Spool,
) {
    let extra = "[[listener]]\naddr = \"127.0.0.1:0\"\nmode = \"relay\"\nproxy_protocol = true\nproxy_from = [\"127.0.0.1/32\"]\n\
                 [relay]\nnetworks = [\"192.0.2.0/24\"]\n";
    let config = Config::parse(&common::config_text(dir, extra), "test", dir).unwrap();
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
    let (shutdown, addr, spool) = start(dir.path()).await;

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
    let stored = spool.read(id).await.unwrap();
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
    let (shutdown, addr, _) = start(dir.path()).await;
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
