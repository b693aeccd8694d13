//! `GET /metrics`: parsed by Prometheus's own Python client (`prometheus_client`, which `.ci/run`
//! installs), with counters that move with traffic and no address or pseudonym anywhere.
//!
//! One test in this file: the recorder is process-wide, so no other daemon's traffic mixes in.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;

use common::sink::Sink;
use common::{submit, Raw, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Fetches `path` with a bare HTTP/1.0 request; returns the status line and the body.
async fn get(addr: SocketAddr, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let (head, body) = out.split_once("\r\n\r\n").expect("a head and a body");
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// Every sample, as `name{label="v",...}` (labels sorted) -> value, by prometheus_client's
/// parser; panics if the text does not parse.
fn parse(text: &str) -> HashMap<String, f64> {
    const SCRIPT: &str = r#"
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        out["%s{%s}" % (s.name, labels)] = s.value
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 (.ci/run installs prometheus_client)");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "prometheus_client could not parse the exposition: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

fn value(samples: &HashMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("{key} not exposed; have {:?}", samples.keys()))
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let sink = Sink::start("127.0.0.1").await;
    sink.behaviour
        .lock()
        .unwrap()
        .rcpt_replies
        .insert("later@slow.test".into(), "450 4.2.1 Try again later".into());
    let (server, queue, _clock) = TestServer::start_manual(&format!(
        "[metrics]\nlisten = \"127.0.0.1:0\"\n[delivery]\nsmarthost = \"{}\"\ntls = \"none\"\n",
        sink.addr
    ))
    .await;
    let addr = server.metrics.expect("metrics endpoint bound");

    let before = parse(&get(addr, "/metrics").await.1);
    assert_eq!(
        before.get("postern_messages_accepted_total{listener=\"relay\"}"),
        None
    );
    assert_eq!(
        value(&before, "postern_queue_messages{state=\"waiting\"}"),
        0.0
    );

    for to in [
        "a.person@fast.test",
        "b.person@fast.test",
        "later@slow.test",
    ] {
        submit(
            server.relay,
            "app@sender.test",
            &[to],
            "Subject: m\r\n\r\nx\r\n",
        )
        .await;
    }
    // A refusal: MAIL before EHLO.
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("MAIL FROM:<app@sender.test>", 503).await;
    queue.run_due().await;

    // The submitting sessions end just after their 221: wait until only `c` is open.
    let mut scrape = get(addr, "/metrics").await;
    for _ in 0..100 {
        if parse(&scrape.1).get("postern_connections_in{}") == Some(&1.0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        scrape = get(addr, "/metrics").await;
    }
    let (status, text) = scrape;
    assert_eq!(status, "HTTP/1.0 200 OK");
    let after = parse(&text);
    let delivered = "postern_deliveries_total{destination=\"fast.test\",result=\"delivered\"}";
    assert_eq!(
        value(
            &after,
            "postern_messages_accepted_total{listener=\"relay\"}"
        ),
        3.0
    );
    assert_eq!(value(&after, delivered), 2.0);
    let deferred = "postern_deliveries_total{destination=\"slow.test\",result=\"deferred\"}";
    assert_eq!(value(&after, deferred), 1.0);
    assert_eq!(
        value(&after, "postern_delivered_tls_total{tls=\"no\"}"),
        2.0
    );
    assert_eq!(
        value(&after, "postern_smtp_refusals_total{status=\"5.5.1\"}"),
        1.0
    );
    assert_eq!(
        value(&after, "postern_queue_messages{state=\"waiting\"}"),
        1.0
    );
    assert_eq!(value(&after, "postern_accept_seconds_count{}"), 3.0);
    assert_eq!(value(&after, "postern_delivery_seconds_count{}"), 2.0);
    assert!(
        after.contains_key("postern_accept_seconds_bucket{le=\"0.01\"}"),
        "a histogram with buckets, not a summary"
    );
    assert_eq!(
        value(&after, "postern_connections_in{}"),
        1.0,
        "the open client"
    );
    assert!(value(&after, "postern_spool_bytes{}") > 0.0);
    assert!(value(&after, "postern_spool_free_bytes{}") > 0.0);
    for personal in ["person", "later@", "app@", "sender.test"] {
        assert!(
            !text.contains(personal),
            "{personal:?} in the exposition:\n{text}"
        );
    }
    drop(c);

    let (status, _) = get(addr, "/").await;
    assert_eq!(status, "HTTP/1.0 404 Not Found");
}
