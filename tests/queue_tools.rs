//! The operator's queue tools against a daemon holding deferred mail: `postern queue
//! show|flush|hold|release|delete|bounce` and `list --state`, through the real binary and the
//! admin socket, with the queue on a manual clock and a sink that answers 4xx.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::sink::Sink;
use common::{assert_destroyed, config_text, queued_records, submit, TestServer};
use postern::clock::ManualClock;
use postern::queue::{HoldReason, Queue, Schedule};
use postern::spool::QueueId;

const BIN: &str = env!("CARGO_BIN_EXE_postern");
const SLOW: &str = "slow.person@dest.test";

struct Rig {
    server: TestServer,
    queue: Arc<Queue>,
    clock: Arc<ManualClock>,
    sink: Sink,
    config: PathBuf,
}

/// A daemon relaying to a sink that defers [`SLOW`] (retry every minute), with its config
/// written where the CLI can read it.
async fn rig() -> Rig {
    let sink = Sink::start("127.0.0.1").await;
    sink.behaviour
        .lock()
        .unwrap()
        .rcpt_replies
        .insert(SLOW.into(), "450 4.2.1 Try again later".into());
    let extra = format!(
        "[delivery]\nsmarthost = \"{}\"\ntls = \"none\"\nretry_schedule = [\"1m\"]\n",
        sink.addr
    );
    let (server, queue, clock) = TestServer::start_manual(&extra).await;
    let config = server.dir.path().join("config.toml");
    std::fs::write(&config, config_text(server.dir.path(), &extra)).expect("write config");
    Rig {
        server,
        queue,
        clock,
        sink,
        config,
    }
}

impl Rig {
    /// Attempts at the slow recipient the sink has seen.
    fn attempts(&self) -> usize {
        let state = self.sink.state.lock().unwrap();
        state
            .rcpt_attempts
            .iter()
            .filter(|(_, r, _)| r == SLOW)
            .count()
    }

    /// Submits one message for [`SLOW`] and lets its first attempt fail.
    async fn deferred_message(&self) -> QueueId {
        let id = submit(
            self.server.relay,
            "app@sender.test",
            &[SLOW],
            "Subject: waiting\r\n\r\nBODY-MARKER\r\n",
        )
        .await;
        self.queue.run_due().await;
        id.parse().expect("queue id")
    }

    /// Runs `postern queue ARGS --config ...`; returns (success, stdout, stderr).
    async fn cli(&self, args: &[&str]) -> (bool, String, String) {
        cli(&self.config, args).await
    }

    fn stored_schedule(&self, id: QueueId) -> Schedule {
        let state = self.server.spool.state(id).expect("still queued");
        Schedule::decode(&state.queue_data, state.final_rcpts.len())
    }
}

async fn cli(config: &Path, args: &[&str]) -> (bool, String, String) {
    let mut argv: Vec<String> = vec!["queue".into()];
    argv.extend(args.iter().map(|s| s.to_string()));
    argv.extend(["--config".into(), config.display().to_string()]);
    let out = tokio::process::Command::new(BIN)
        .args(argv)
        .output()
        .await
        .expect("run postern");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn hold_stops_retries_release_and_flush_try_at_once() {
    let rig = rig().await;
    let id = rig.deferred_message().await;
    assert_eq!(rig.attempts(), 1);
    let ids = id.to_string();

    let (ok, _, err) = rig.cli(&["hold", &ids]).await;
    assert!(ok, "hold: {err}");
    assert_eq!(
        rig.stored_schedule(id).hold.map(|h| h.reason),
        Some(HoldReason::Operator),
        "the hold is in the spool (it survives a restart)"
    );
    rig.clock.advance(3600);
    assert_eq!(rig.queue.run_due().await, 0, "held: not dispatched");
    assert_eq!(rig.attempts(), 1, "held: no retry an hour later");
    let (_, held, _) = rig.cli(&["list", "--state", "held"]).await;
    assert!(held.contains(&ids) && held.contains("held"), "{held}");
    let (_, deferred, _) = rig.cli(&["list", "--state", "deferred"]).await;
    assert_eq!(deferred, "Mail queue is empty\n");
    let (ok, _, err) = rig.cli(&["flush", &ids]).await;
    assert!(ok, "{err}");
    assert_eq!(rig.queue.run_due().await, 0, "a flush does not lift a hold");

    let (ok, _, err) = rig.cli(&["release", &ids]).await;
    assert!(ok, "release: {err}");
    assert_eq!(rig.stored_schedule(id).hold, None);
    rig.queue.run_due().await;
    assert_eq!(rig.attempts(), 2, "released: tried at once");

    // The retry is a minute away; a flush tries it now, without moving the clock.
    rig.queue.run_due().await;
    assert_eq!(rig.attempts(), 2, "not due yet");
    let (ok, out, err) = rig.cli(&["flush", "--domain", "DEST.test"]).await;
    assert!(ok && out.contains("\"flushed\": 1"), "{out} {err}");
    rig.queue.run_due().await;
    assert_eq!(rig.attempts(), 3, "flushed: tried now");
    let (ok, _, err) = rig.cli(&["release", &ids]).await;
    assert!(!ok && err.contains("not on hold"), "{err}");
}

#[tokio::test]
async fn show_gives_attempts_in_log_form_never_the_address_or_body() {
    let rig = rig().await;
    let id = rig.deferred_message().await;
    let (ok, out, err) = rig.cli(&["show", &id.to_string()]).await;
    assert!(ok, "{err}");
    let view: serde_json::Value = serde_json::from_str(&out).expect("show prints JSON");
    assert_eq!(view["state"], "deferred");
    let rcpt = &view["recipients"][0];
    assert_eq!(rcpt["attempts"], 1);
    assert_eq!(rcpt["last_status"], "4.2.1");
    assert_eq!(rcpt["done"], false);
    assert!(
        common::is_pseudonym_at(rcpt["rcpt"].as_str().unwrap_or(""), "dest.test"),
        "{out}"
    );
    assert!(
        !out.contains("slow.person") && !out.contains("app@"),
        "{out}"
    );
    assert!(
        !out.contains("BODY-MARKER") && !out.contains("Try again"),
        "{out}"
    );
    let missing = "0".repeat(32);
    let (ok, _, err) = rig.cli(&["show", &missing]).await;
    assert!(!ok && err.contains("no such message"), "{err}");
}

#[tokio::test]
async fn delete_destroys_the_body_and_bounce_returns_one_notice() {
    let rig = rig().await;
    let doomed = rig.deferred_message().await;
    let returned = rig.deferred_message().await;
    let data = rig.server.data_dir();
    let sealed = queued_records(&data, &doomed.to_string());

    let (ok, out, err) = rig.cli(&["delete", &doomed.to_string()]).await;
    assert!(ok && out.contains("\"cancelled\": 1"), "{out} {err}");
    assert!(!rig.server.spool.contains(doomed), "gone from the spool");
    assert_destroyed(&sealed, &data);
    rig.clock.advance(3600);
    rig.queue.run_due().await;
    assert_eq!(rig.attempts(), 3, "the deleted one is not tried again");

    let before = rig.sink.received().len();
    let (ok, out, err) = rig.cli(&["bounce", &returned.to_string()]).await;
    assert!(ok && out.contains("\"returned\": 1"), "{out} {err}");
    assert!(!rig.server.spool.contains(returned));
    rig.queue.run_due().await;
    let notices: Vec<_> = rig.sink.received().into_iter().skip(before).collect();
    assert_eq!(notices.len(), 1, "one notice");
    let dsn = String::from_utf8_lossy(&notices[0].data).into_owned();
    assert_eq!(notices[0].from, "", "from the null sender");
    assert_eq!(notices[0].rcpts, vec!["app@sender.test".to_string()]);
    assert!(dsn.contains("Status: 5.0.0"), "{dsn}");
    assert!(!dsn.contains("BODY-MARKER"), "headers only: {dsn}");
    let (_, list, _) = rig.cli(&["list"]).await;
    assert_eq!(list, "Mail queue is empty\n");
}

#[tokio::test]
async fn delete_is_refused_while_an_attempt_runs() {
    let rig = rig().await;
    let id = rig.deferred_message().await;
    // The next attempt hangs at the end of data for a moment: the message is active.
    rig.sink.behaviour.lock().unwrap().rcpt_replies.clear();
    rig.sink.behaviour.lock().unwrap().data_delay = Some(std::time::Duration::from_secs(2));
    rig.clock.advance(60);
    let queue = rig.queue.clone();
    let attempt = tokio::spawn(async move { queue.run_due().await });
    while rig.queue.state_of(id) != Some(postern::queue::QueueState::Active) {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let (ok, _, err) = rig.cli(&["delete", &id.to_string()]).await;
    assert!(!ok && err.contains("in progress"), "{err}");
    attempt.await.expect("attempt");
    assert!(
        !rig.server.spool.contains(id),
        "the running attempt delivered it"
    );
    assert_eq!(rig.sink.received().len(), 1);
}

#[tokio::test]
async fn with_no_daemon_the_cli_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_text(dir.path(), "")).expect("config");
    let (ok, _, err) = cli(&config, &["hold", &"0".repeat(32)]).await;
    assert!(!ok);
    assert!(err.contains("is `postern serve` running?"), "{err}");
}

/// A hold stored in the spool is kept even when the due index does not know of it: a state
/// record from before due times were stored says "due now" (0), and the attempt that then
/// reads the message finds the hold and puts it back instead of delivering.
#[tokio::test]
async fn a_stored_hold_is_kept_when_the_message_comes_due() {
    let rig = rig().await;
    let id = rig.deferred_message().await;
    let before = rig.attempts();
    let state = rig.server.spool.state(id).expect("queued");
    let mut sched = Schedule::decode(&state.queue_data, 1);
    sched.hold = Some(postern::queue::Hold {
        reason: HoldReason::Operator,
        since: 0,
    });
    let old_style = postern::spool::QueueData {
        data: sched.encode(),
        due: 0,
    };
    rig.server
        .spool
        .update(id, &[], Some(old_style))
        .await
        .expect("stored");
    rig.clock.advance(120);
    rig.queue.run_due().await;
    assert_eq!(rig.attempts(), before, "a held message was tried");
    assert_eq!(rig.queue.counts().held, 1);
}
