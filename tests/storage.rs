//! Storage faults end to end: a disk that fills up and frees again, and delivery state the
//! disk refuses. The spool's own unit tests cover each fault point; these check what a client
//! and a receiving server see.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::sink::Sink;
use common::{submit, Raw, TestServer};
use postern::clock::{Clock, ManualClock, SystemClock};
use postern::daemon::Options;
use postern::spool::{FaultPoint, Faults};

const ENOSPC: i32 = 28;

/// Polls `cond` every 50 ms until it holds; fails the test after `secs` seconds.
async fn wait_until(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server on a manual clock with a fault injector under its spool, relaying to a sink that
/// answers `reply` to RCPT for `rcpt`.
struct FaultyRig {
    sink: Sink,
    server: TestServer,
    queue: Arc<postern::queue::Queue>,
    clock: Arc<ManualClock>,
    faults: Arc<Faults>,
}

impl FaultyRig {
    async fn start(rcpt: &str, reply: &str) -> FaultyRig {
        FaultyRig::start_with(rcpt, reply, "").await
    }

    /// [`FaultyRig::start`] with more configuration (a `[limits]` table).
    async fn start_with(rcpt: &str, reply: &str, more: &str) -> FaultyRig {
        let sink = Sink::start("127.0.0.1").await;
        sink.behaviour
            .lock()
            .unwrap()
            .rcpt_replies
            .insert(rcpt.into(), reply.into());
        let clock = Arc::new(ManualClock::new(SystemClock.now()));
        let faults = Arc::new(Faults::default());
        let options = Options {
            clock: clock.clone(),
            run_queue: false,
            spool_faults: faults.clone(),
        };
        let extra = format!(
            "[delivery]\nsmarthost = \"{}\"\ntls = \"none\"\n{more}",
            sink.addr
        );
        let (server, queue) = TestServer::start_with(&extra, options).await;
        FaultyRig {
            sink,
            server,
            queue,
            clock,
            faults,
        }
    }
}

#[tokio::test]
async fn delivered_recipients_are_not_resent_while_state_cannot_be_written() {
    let rig = FaultyRig::start("later@dest.test", "451 4.2.1 try later").await;
    let (sink, server, queue, clock, faults) =
        (rig.sink, rig.server, rig.queue, rig.clock, rig.faults);
    submit(
        server.relay,
        "app@sender.test",
        &["now@dest.test", "later@dest.test"],
        "Subject: once\r\n\r\nbody\r\n",
    )
    .await;
    // From here on the disk takes no appends: no state record can be written.
    faults.fail(FaultPoint::Append, u32::MAX, ENOSPC);
    queue.run_due().await;
    assert_eq!(
        server.spool.unsynced(),
        1,
        "the outcome is owed to the disk"
    );
    for _ in 0..4 {
        clock.advance(3 * 3600);
        assert_eq!(
            queue.run_due().await,
            1,
            "the deferred recipient is retried"
        );
    }
    let attempts = sink.state.lock().unwrap().data_attempts.clone();
    let to_now = attempts
        .iter()
        .filter(|(rcpts, _)| rcpts.iter().any(|r| r == "now@dest.test"))
        .count();
    assert_eq!(to_now, 1, "delivered once, never again: {attempts:?}");
    assert_eq!(
        server.spool.live().len(),
        1,
        "still queued for the deferred one"
    );
    // Space is back: the owed state reaches the disk without a restart.
    faults.clear();
    wait_until(10, "owed state written", || server.spool.unsynced() == 0).await;
}

/// A bounce whose notice the disk refuses stays queued: the recipient is tried again later
/// and only becomes final once its notice is stored (never a failure the sender never hears of).
#[tokio::test]
async fn a_failure_notice_that_cannot_be_stored_keeps_its_recipient_queued() {
    let rig = FaultyRig::start("gone@dest.test", "550 5.1.1 No such user").await;
    let (sink, server, queue, clock, faults) =
        (rig.sink, rig.server, rig.queue, rig.clock, rig.faults);
    let id = submit(
        server.relay,
        "app@sender.test",
        &["gone@dest.test"],
        "Subject: bounce me\r\n\r\nbody\r\n",
    )
    .await;
    let id: postern::spool::QueueId = id.parse().expect("id");
    faults.fail(FaultPoint::Append, u32::MAX, ENOSPC);
    queue.run_due().await;
    let state = server.spool.state(id).expect("still queued");
    assert_eq!(
        state.final_rcpts,
        vec![false],
        "not final without its notice"
    );
    assert!(sink.received().is_empty(), "no notice went out");

    faults.clear();
    wait_until(10, "owed state written", || server.spool.unsynced() == 0).await;
    clock.advance(60);
    queue.run_due().await;
    assert!(server.spool.live().is_empty(), "bounced and notified");
    let received = sink.received();
    assert_eq!(received.len(), 1, "one notice");
    assert_eq!(received[0].from, "");
    assert_eq!(received[0].rcpts, vec!["app@sender.test".to_string()]);
    let tries = sink
        .state
        .lock()
        .unwrap()
        .rcpt_attempts
        .iter()
        .filter(|(_, r, _)| r == "gone@dest.test")
        .count();
    assert_eq!(tries, 2, "tried again once the notice could be stored");
}

/// A tmpfs mounted on `<dir>/data` for the length of a test; unmounted on drop.
struct SmallDisk {
    mount: std::path::PathBuf,
}

impl SmallDisk {
    /// None when this process cannot mount (not root); CI runs as root and must not skip.
    fn mount(dir: &std::path::Path, size: &str) -> Option<SmallDisk> {
        let mount = dir.join("data");
        std::fs::create_dir_all(&mount).expect("mkdir");
        let ok = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&mount)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs as root and must be able to mount a tmpfs"
            );
            eprintln!("skipping: cannot mount a tmpfs here (not root)");
            return None;
        }
        Some(SmallDisk { mount })
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.mount.join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0x55u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mount)
            .status();
    }
}

/// Sends one message and returns the first reply that is not a 2xx/3xx, or the final 250.
async fn try_submit(relay: std::net::SocketAddr) -> common::Reply {
    let (mut c, _) = Raw::connect(relay).await;
    c.expect("EHLO client.test", 250).await;
    for line in [
        "MAIL FROM:<app@sender.test>",
        "RCPT TO:<a@dest.test>",
        "DATA",
    ] {
        let r = c.cmd(line).await;
        if r.code >= 400 {
            return r;
        }
    }
    c.send("Subject: full\r\n\r\nbody\r\n.\r\n").await;
    c.reply().await
}

#[tokio::test]
async fn a_full_disk_refuses_mail_and_accepts_again_once_space_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(disk) = SmallDisk::mount(dir.path(), "24m") else {
        return;
    };
    let extra = "[spool]\nmin_free = 0\nsegment_size = 1048576\n";
    let options = Options {
        run_queue: false,
        ..Default::default()
    };
    let (server, _queue) = TestServer::start_in(dir, extra, options).await;
    submit(
        server.relay,
        "app@sender.test",
        &["a@dest.test"],
        "Subject: 1\r\n\r\nx\r\n",
    )
    .await;

    let filler = disk.fill();
    for _ in 0..3 {
        let r = try_submit(server.relay).await;
        assert_eq!((r.code, r.enhanced()), (452, "4.3.1"), "{r:?}");
    }
    std::fs::remove_file(&filler).expect("free the space");
    // No restart: the very next message is accepted.
    for _ in 0..3 {
        let r = try_submit(server.relay).await;
        assert_eq!(r.code, 250, "{r:?}");
    }
    assert_eq!(server.spool.live().len(), 4);
    let names: Vec<String> = std::fs::read_dir(server.spool.dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let count = |ext: &str| names.iter().filter(|n| n.ends_with(ext)).count();
    assert_eq!(count(".key"), count(".seg"), "no leftover files: {names:?}");
    server.shutdown.cancel();
    let _ = server.task.await;
}

/// A message body well past `postern::spool::SPILL_AT`, so that it goes to a body file, as
/// sent on the wire: lines that start with a dot (stuffed here) fall across the file's chunk
/// boundaries.
fn big_body(tag: &str) -> String {
    let mut body = format!("From: app@sender.test\r\nSubject: {tag}\r\n\r\n");
    let mut n = 0;
    while body.len() < 3 * postern::spool::SPILL_AT + 1000 {
        n += 1;
        body.push_str(&format!(
            "..line {n} starts with a dot\r\nplain line {n} of {tag}\r\n"
        ));
    }
    body
}

/// Body files in the spool now.
fn body_files(server: &TestServer) -> usize {
    std::fs::read_dir(server.data_dir().join("spool/bodies"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Sends `body` in one transaction; returns the reply to the end of the data.
async fn send_big(server: &TestServer, body: &str) -> common::Reply {
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    c.send_mail("app@sender.test", &["r@dest.test"], body).await
}

/// A body file the disk refuses (a chunk that cannot be written, an fdatasync that fails) gets
/// 452 or 451 at the end of the data, leaves no file behind, and the next message is taken
/// without a restart.
#[tokio::test]
async fn a_body_file_the_disk_refuses_gets_4xx_and_leaves_nothing() {
    let rig = FaultyRig::start("none@dest.test", "250 ok").await;
    let (server, faults) = (rig.server, rig.faults);
    let body = big_body("refused");
    faults.fail(FaultPoint::BodyWrite, 1, ENOSPC);
    let r = send_big(&server, &body).await;
    assert_eq!((r.code, r.enhanced()), (452, "4.3.1"), "{r:?}");
    faults.fail(FaultPoint::BodySync, 1, 5);
    let r = send_big(&server, &body).await;
    assert_eq!((r.code, r.enhanced()), (451, "4.3.0"), "{r:?}");
    assert_eq!(
        body_files(&server),
        0,
        "a refused message leaves no body file"
    );
    assert!(server.spool.live().is_empty());
    let r = send_big(&server, &body).await;
    assert_eq!(r.code, 250, "accepted once the disk takes writes: {r:?}");
    assert_eq!((server.spool.live().len(), body_files(&server)), (1, 1));
}

/// A spilled message is delivered from its body file, byte for byte, and the file goes once
/// its last recipient is final. One whose file no longer opens (damaged on disk) is not sent at
/// all: the connection is dropped mid-DATA, and the message stays queued for a retry.
#[tokio::test]
async fn a_spilled_message_is_sent_from_its_file_and_a_damaged_file_sends_nothing() {
    let rig = FaultyRig::start("none@dest.test", "250 ok").await;
    let (sink, server, queue) = (rig.sink, rig.server, rig.queue);
    let body = big_body("whole");
    let id: postern::spool::QueueId =
        submit(server.relay, "app@sender.test", &["r@dest.test"], &body)
            .await
            .parse()
            .expect("id");
    let stored = server.spool.read_whole(id).await.expect("stored").body;
    assert!(stored.ends_with(body.replace("\r\n..", "\r\n.").as_bytes()));
    assert_eq!(body_files(&server), 1);
    queue.run_due().await;
    let got = sink.wait_for(1).await;
    assert!(got[0].data == stored, "delivered exactly as stored");
    wait_until(10, "body file removed", || body_files(&server) == 0).await;

    let damaged: postern::spool::QueueId = submit(
        server.relay,
        "app@sender.test",
        &["r@dest.test"],
        &big_body("damaged"),
    )
    .await
    .parse()
    .expect("id");
    let path = server
        .data_dir()
        .join(format!("spool/bodies/{damaged}.body"));
    let mut bytes = std::fs::read(&path).expect("body file");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&path, bytes).expect("damage");
    queue.run_due().await;
    assert_eq!(
        sink.received().len(),
        1,
        "nothing of the damaged message delivered"
    );
    assert!(server.spool.contains(damaged), "still queued");
}

/// A client at DATA, its recipient accepted.
async fn at_data(server: &TestServer) -> Raw<tokio::net::TcpStream> {
    let (mut c, _) = Raw::connect(server.relay).await;
    c.expect("EHLO client.test", 250).await;
    c.expect("MAIL FROM:<app@sender.test>", 250).await;
    c.expect("RCPT TO:<r@dest.test>", 250).await;
    c
}

/// A message whose body waits for a slow disk keeps its place among the sessions receiving
/// content (`max_concurrent_data`) until its reply: its body is still in memory, and with the
/// place given back early a stuck disk would have the daemon hold every connected client's
/// body at once.
#[tokio::test]
async fn a_message_waiting_for_the_disk_keeps_its_place_for_content() {
    let limits = "[limits]\nmax_concurrent_data = 1\ncommand_timeout = \"20s\"\n";
    let rig = FaultyRig::start_with("none@dest.test", "250 ok", limits).await;
    let (server, faults) = (rig.server, rig.faults);
    faults.stall(FaultPoint::Sync);
    let mut first = at_data(&server).await;
    first.expect("DATA", 354).await;
    first.send("Subject: one\r\n\r\nfirst\r\n.\r\n").await;
    let mut second = at_data(&server).await;
    second.send("DATA\r\n").await;
    let early = tokio::time::timeout(Duration::from_millis(300), second.try_reply()).await;
    assert!(
        early.is_err(),
        "354 while the only place waits for the disk: {early:?}"
    );
    assert!(
        server.spool.live().is_empty(),
        "nothing stored while the disk stalls"
    );
    faults.resume(FaultPoint::Sync);
    assert_eq!(first.reply().await.code, 250);
    assert_eq!(
        second.reply().await.code,
        354,
        "the place passed on after the 250"
    );
    second.send("Subject: two\r\n\r\nsecond\r\n.\r\n").await;
    assert_eq!(second.reply().await.code, 250);
    assert_eq!(server.spool.live().len(), 2);
}
