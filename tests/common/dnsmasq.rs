//! dnsmasq, a DNS server that shares no code with Postern's resolver, started by the test on
//! 127.0.0.1 with an ephemeral port. The in-process server in [`super::dns`] is built on
//! hickory-proto, the library under test, and speaks UDP only: an encoding bug both ends share
//! would go unseen there, and so would the TCP fallback for answers too big for UDP.
//!
//! Debian package `dnsmasq-base`. Outside CI a test skips (with a message) when it is absent;
//! with `CI` set its absence fails the test.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running dnsmasq; killed when dropped.
pub struct Dnsmasq {
    child: Child,
    pub addr: SocketAddr,
    /// Its query log (stderr): `dnsmasq[pid]: query[MX] name from 127.0.0.1` per query.
    log: Arc<Mutex<String>>,
}

/// Where dnsmasq is installed, if it is. `/usr/sbin` is often not on a user's PATH.
fn binary() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join("dnsmasq"))
        .find(|p| p.is_file())
}

/// A port free for both UDP and TCP on 127.0.0.1 right now (dnsmasq listens on both).
fn free_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind udp");
        let port = udp.local_addr().expect("addr").port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Dnsmasq {
    /// Starts dnsmasq serving `records` (dnsmasq options such as `--mx-host=a.test,mx.a.test,10`
    /// and `--host-record=mx.a.test,127.0.0.1`); authoritative for `.test`, so other names
    /// there are NXDOMAIN. `None` when dnsmasq is absent outside CI: the caller returns early,
    /// and this has already said why on stderr.
    pub fn start(records: &[String]) -> Option<Dnsmasq> {
        let Some(bin) = binary() else {
            assert!(
                std::env::var_os("CI").is_none(),
                "dnsmasq is required in CI (Debian package dnsmasq-base)"
            );
            eprintln!("SKIPPED: dnsmasq not installed (apt-get install dnsmasq-base)");
            return None;
        };
        // The port is free when chosen but could be taken before dnsmasq binds it: retry.
        for _ in 0..5 {
            if let Some(d) = Dnsmasq::try_start(&bin, records) {
                return Some(d);
            }
        }
        panic!("dnsmasq did not start");
    }

    fn try_start(bin: &PathBuf, records: &[String]) -> Option<Dnsmasq> {
        let port = free_port();
        let mut child = Command::new(bin)
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--pid-file",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--local=/test/",
                "--log-queries",
                "--log-facility=-",
                &format!("--port={port}"),
            ])
            .args(records)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dnsmasq");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let log2 = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                let mut l = log2.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // Ready once it accepts TCP (it binds UDP first); gone if it could not bind.
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                eprintln!("dnsmasq exited: {}", log.lock().unwrap());
                return None;
            }
            if std::net::TcpStream::connect(addr).is_ok() {
                return Some(Dnsmasq { child, addr, log });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        None
    }

    /// The `dns.nameservers` value pointing at this server.
    pub fn nameserver(&self) -> String {
        self.addr.to_string()
    }

    /// How many queries for `name` (of type `rtype`, e.g. "MX") were answered over TCP. dnsmasq
    /// serves each TCP connection in a forked child, so its log lines carry another pid than
    /// the main process's.
    pub fn tcp_queries(&self, rtype: &str, name: &str) -> usize {
        let main = format!("dnsmasq[{}]:", self.child.id());
        let query = format!(" query[{rtype}] {name} from ");
        self.log
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.contains(&query) && !l.starts_with(&main))
            .count()
    }

    /// Everything dnsmasq logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `count` MX records for `domain`, preference 10 and up, each naming a long host name that has
/// no address: together far more than fits in a UDP answer (even with EDNS at 4096 bytes), so
/// the resolver must retry over TCP to see them all. The last one, at preference 1, is the
/// only reachable exchanger: `real` (give it a `--host-record`).
pub fn big_mx_answer(domain: &str, count: usize, real: &str) -> Vec<String> {
    let mut records: Vec<String> = (0..count)
        .map(|i| {
            format!(
                "--mx-host={domain},unreachable-exchanger-number-{i:03}-of-a-long-list.{domain},{}",
                10 + i
            )
        })
        .collect();
    records.push(format!("--mx-host={domain},{real},1"));
    records
}
