//! Ledger write throughput: records sealed and stored through the batching writer, as the
//! server and queue produce them (one `accepted` and one final `outcome` per recipient).
//!
//! `cargo bench --ignore-rust-version --bench ledger [-- --messages 50000]`
//! Prints records per second and the CPU time the process used per record.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use postern::config::PrivacyConfig;
use postern::crypto::Key;
use postern::ledger::{Ledger, Outcome, Signing, Update};
use postern::spool::{Envelope, QueueId};

fn cpu_seconds() -> f64 {
    // utime + stime of this process, from /proc (in clock ticks of 1/100 s on Linux).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).and_then(|u| u.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let messages: usize = args
        .iter()
        .position(|a| a == "--messages")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(50_000);
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
    let ledger = Ledger::open(
        dir.path(),
        &Key::generate().expect("key"),
        &PrivacyConfig::default(),
        16 << 20,
        1_796_000_000,
    )
    .expect("ledger");
    let now = 1_796_000_000;
    let update = Update {
        code: Some("2.0.0".into()),
        text: Some("smtp; 250 2.0.0 OK queued as 12345".into()),
        remote_host: Some("mx.dest.test".into()),
        remote_ip: Some("192.0.2.10:25".into()),
        tls: Some("TLSv1.3 TLS13_AES_256_GCM_SHA384".into()),
        tls_verified: Some(true),
    };
    let signing = Signing {
        domain: Some("shop.test".into()),
        selectors: vec!["s1".into()],
    };
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    for i in 0..messages {
        let id = QueueId::generate().expect("id");
        let env = Envelope {
            mail_from: "orders@shop.test".into(),
            recipients: vec![format!("customer{i}@dest.test")],
            received_at: now,
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            helo: "app.test".into(),
            auth_user: Some("app".into()),
            eight_bit: false,
            smtputf8: false,
            sending_domain: "shop.test".into(),
        };
        ledger.accepted(id, &env, 4096, &signing).expect("accepted");
        ledger
            .outcome(id, &env, 0, Outcome::Delivered, &update, now + 1)
            .expect("outcome");
    }
    ledger.sync().expect("sync");
    ledger.flush().expect("flush");
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    println!("ledger: {messages} messages (1 recipient each: accepted + delivered), batched writer, sled flush at end");
    println!(
        "  {:.0} records/s wall ({:.2} s), CPU {:.1} us per record ({:.2} s CPU on all threads)",
        messages as f64 / secs,
        secs,
        cpu * 1e6 / messages as f64,
        cpu
    );
}
