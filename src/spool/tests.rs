use std::net::{IpAddr, Ipv4Addr};

use super::*;
use std::sync::Arc;

fn envelope(rcpts: &[&str]) -> Envelope {
    Envelope {
        mail_from: "sender@example.test".into(),
        recipients: rcpts.iter().map(|r| r.to_string()).collect(),
        received_at: 1_700_000_000,
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        helo: "client.test".into(),
        auth_user: None,
        eight_bit: false,
        smtputf8: false,
        sending_domain: "example.test".into(),
    }
}

async fn store(spool: &Spool, env: &Envelope, body: &[u8]) -> QueueId {
    let id = QueueId::generate().unwrap();
    spool.store(id, env, &[body]).await.expect("stored");
    id
}

/// Queue data for an update, due now.
fn qd(data: &[u8]) -> QueueData {
    QueueData {
        data: data.to_vec(),
        due: 0,
    }
}

fn open(dir: &Path, master: &Key) -> (Spool, RecoveryReport) {
    Spool::open(dir, master.clone(), 1 << 20).expect("spool opens")
}

use crate::spool_test_support::{all_bytes, contains};

fn segment_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("spool"))
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().to_string_lossy().into_owned();
            n.ends_with(".seg").then_some(n)
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn store_read_round_trip_and_nothing_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, report) = open(dir.path(), &master);
    assert_eq!(report.recovered, 0);
    let env = envelope(&["rcpt-secret@example.test"]);
    let body = b"Subject: hi\r\n\r\nMARKER-7731 body\r\n".to_vec();
    let id = store(&spool, &env, &body).await;
    let msg = spool.read_whole(id).await.unwrap();
    assert_eq!(msg.envelope, env);
    assert_eq!(msg.body, body);
    assert_eq!(spool.live(), vec![id]);

    let raw = all_bytes(dir.path());
    assert!(!contains(&raw, b"rcpt-secret"));
    assert!(!contains(&raw, b"sender@example"));
    assert!(!contains(&raw, b"MARKER-7731"));
}

#[tokio::test]
async fn concurrent_stores_are_all_durable_and_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let spool = spool.clone();
        tasks.push(tokio::spawn(async move {
            let body = format!("Subject: {i}\r\n\r\n{}\r\n", "x".repeat(4000));
            (
                store(&spool, &envelope(&["a@b.test"]), body.as_bytes()).await,
                body,
            )
        }));
    }
    let mut stored = Vec::new();
    for t in tasks {
        stored.push(t.await.unwrap());
    }
    drop(spool);
    let (spool, report) = open(dir.path(), &master);
    assert_eq!(report.recovered, 200);
    assert!(report.quarantined.is_empty());
    for (id, body) in stored {
        assert_eq!(spool.read_whole(id).await.unwrap().body, body.as_bytes());
    }
}

#[tokio::test]
async fn partial_final_survives_restart_and_last_final_destroys() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let id = store(
        &spool,
        &envelope(&["a@x.test", "b@x.test", "c@x.test"]),
        b"X: y\r\n\r\nbody\r\n",
    )
    .await;
    assert_eq!(
        spool.update(id, &[1], Some(qd(b"sched-1"))).await.unwrap(),
        Liveness::Live
    );
    assert_eq!(
        spool.update(id, &[0], Some(qd(b"sched-2"))).await.unwrap(),
        Liveness::Live
    );
    drop(spool);

    let (spool, report) = open(dir.path(), &master);
    assert_eq!(report.recovered, 1);
    let state = spool.state(id).unwrap();
    assert_eq!(state.final_rcpts, vec![true, true, false]);
    assert_eq!(state.queue_data, b"sched-2");

    let loc = spool.shared.index().messages[&id].message;
    let seg = segment_path(spool.dir(), u64::from(loc.segment));
    assert_eq!(
        spool.update(id, &[2], None).await.unwrap(),
        Liveness::Destroyed
    );
    assert!(spool.live().is_empty());
    assert!(matches!(
        spool.read_whole(id).await,
        Err(SpoolError::NotFound)
    ));
    // The old segment held nothing else and is not the active one: gone, key and all.
    assert!(!seg.exists(), "emptied segment is unlinked at once");
    assert!(!key_path(spool.dir(), u64::from(loc.segment)).exists());
    drop(spool);
    let (_spool, report) = open(dir.path(), &master);
    assert_eq!(report.recovered, 0);
}

#[tokio::test]
async fn destroyed_body_range_reads_back_as_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let keep = store(&spool, &envelope(&["k@x.test"]), b"keep\r\n").await;
    let gone = store(&spool, &envelope(&["g@x.test"]), &vec![b'z'; 10_000]).await;
    let loc = spool.shared.index().messages[&gone].message;
    spool.destroy(gone).await.unwrap();
    let bytes = std::fs::read(segment_path(spool.dir(), u64::from(loc.segment))).unwrap();
    let payload = &bytes[loc.offset as usize + HEADER_LEN..][..loc.len as usize];
    assert!(payload.iter().all(|b| *b == 0));
    assert!(matches!(
        spool.destroy(gone).await,
        Err(SpoolError::NotFound)
    ));
    assert_eq!(spool.read_whole(keep).await.unwrap().body, b"keep\r\n");
}

#[tokio::test]
async fn corrupt_and_truncated_records_are_quarantined_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let a = store(&spool, &envelope(&["a@x.test"]), b"first\r\n").await;
    let b = store(&spool, &envelope(&["b@x.test"]), b"second\r\n").await;
    let c = store(&spool, &envelope(&["c@x.test"]), b"third\r\n").await;
    let (loc_b, seg) = {
        let index = spool.shared.index();
        (
            index.messages[&b].message,
            u64::from(index.messages[&b].message.segment),
        )
    };
    drop(spool);
    let path = segment_path(&dir.path().join("spool"), seg);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[loc_b.offset as usize + HEADER_LEN + 30] ^= 0xff; // flip a ciphertext bit in b
    bytes.extend_from_within(..40); // a torn record at the tail
    std::fs::write(&path, &bytes).unwrap();

    let (spool, report) = open(dir.path(), &master);
    assert_eq!(spool.live(), {
        let mut v = vec![a, c];
        v.sort();
        v
    });
    assert_eq!(report.quarantined.len(), 2, "{:?}", report.quarantined);
    assert!(report.quarantined.iter().all(|q| q.path.exists()));
    assert!(report
        .quarantined
        .iter()
        .any(|q| q.reason.contains("authentication")));
    assert!(report
        .quarantined
        .iter()
        .any(|q| q.reason.contains("truncated")));

    // Kept for an operator to examine, but no longer than the retention period.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert_eq!(spool.purge_quarantine(now - 30 * 86_400).unwrap(), 0);
    assert!(report.quarantined.iter().all(|q| q.path.exists()));
    assert_eq!(
        spool.purge_quarantine(now + 1).unwrap(),
        3,
        "two records and their segment's key copy"
    );
    let quarantine = spool.dir().join("quarantine");
    assert_eq!(std::fs::read_dir(quarantine).unwrap().count(), 0);
}

#[tokio::test]
async fn segments_rotate_and_empty_ones_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let big = vec![b'q'; 300_000];
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(store(&spool, &envelope(&["a@x.test"]), &big).await);
    }
    assert!(
        segment_files(dir.path()).len() >= 2,
        "{:?}",
        segment_files(dir.path())
    );
    for id in ids {
        spool.destroy(id).await.unwrap();
    }
    assert_eq!(
        segment_files(dir.path()).len(),
        1,
        "only the active segment remains"
    );
}

// ---- Storage faults: the spool recovers by itself, refuses new mail, never drops state. ----

const ENOSPC: i32 = 28;
const EIO: i32 = 5;

fn open_with(dir: &Path, master: &Key, min_free: u64) -> (Spool, RecoveryReport) {
    let options = SpoolOptions {
        segment_size: 1 << 20,
        min_free,
        faults: Arc::default(),
    };
    Spool::open_with(dir, master.clone(), options).expect("spool opens")
}

fn is_disk_full(e: &SpoolError) -> bool {
    matches!(e, SpoolError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull)
}

fn active_segment(spool: &Spool, id: QueueId) -> u64 {
    u64::from(spool.shared.index().messages[&id].message.segment)
}

#[tokio::test]
async fn enospc_on_append_refuses_that_batch_then_accepts_again_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let before = store(&spool, &envelope(&["a@x.test"]), b"before\r\n").await;
    spool.faults().fail(FaultPoint::Append, 3, ENOSPC);
    for _ in 0..3 {
        let id = QueueId::generate().unwrap();
        let err = spool
            .store(id, &envelope(&["b@x.test"]), &[b"refused\r\n"])
            .await
            .expect_err("disk full");
        assert!(is_disk_full(&err), "{err:?}");
        assert!(!spool.contains(id), "nothing half-accepted");
    }
    // Space is back: the next message is accepted, in a fresh segment.
    let after = store(&spool, &envelope(&["c@x.test"]), b"after\r\n").await;
    assert!(active_segment(&spool, after) > active_segment(&spool, before));
    drop(spool);
    let (spool, report) = open(dir.path(), &master);
    let mut expected = vec![before, after];
    expected.sort();
    assert_eq!(
        spool.live(),
        expected,
        "only acknowledged mail is recovered"
    );
    assert!(report.quarantined.is_empty(), "{:?}", report.quarantined);
    assert_eq!(spool.read_whole(after).await.unwrap().body, b"after\r\n");
}

#[tokio::test]
async fn a_failed_fdatasync_is_never_retried_and_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let a = store(&spool, &envelope(&["a@x.test"]), b"first\r\n").await;
    let seg_a = active_segment(&spool, a);
    spool.faults().fail(FaultPoint::Sync, 1, EIO);
    let b = QueueId::generate().unwrap();
    let err = spool
        .store(b, &envelope(&["b@x.test"]), &[b"second\r\n"])
        .await
        .expect_err("sync failed");
    assert!(matches!(&err, SpoolError::Io(io) if io.raw_os_error() == Some(EIO)));
    let c = store(&spool, &envelope(&["c@x.test"]), b"third\r\n").await;
    assert_ne!(
        active_segment(&spool, c),
        seg_a,
        "the segment whose sync failed takes no more writes"
    );
    // What was durable before the failure stays readable.
    assert_eq!(spool.read_whole(a).await.unwrap().body, b"first\r\n");
    drop(spool);
    let (spool, _) = open(dir.path(), &master);
    assert!(
        !spool.contains(b),
        "the unacknowledged one is not resurrected"
    );
    assert!(spool.contains(a) && spool.contains(c));
}

#[tokio::test]
async fn a_segment_that_cannot_be_created_blocks_nothing_once_the_fault_clears() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    store(&spool, &envelope(&["a@x.test"]), b"first\r\n").await;
    // The active segment is retired by a failed sync, and the next two creations fail.
    spool.faults().fail(FaultPoint::Sync, 1, EIO);
    spool.faults().fail(FaultPoint::CreateSegment, 2, ENOSPC);
    for _ in 0..3 {
        let id = QueueId::generate().unwrap();
        assert!(spool
            .store(id, &envelope(&["b@x.test"]), &[b"x\r\n"])
            .await
            .is_err());
    }
    let ok = store(&spool, &envelope(&["c@x.test"]), b"accepted\r\n").await;
    assert_eq!(spool.read_whole(ok).await.unwrap().body, b"accepted\r\n");
    let keys = std::fs::read_dir(spool.dir())
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".key"))
        })
        .count();
    assert_eq!(keys, segment_files(dir.path()).len(), "no orphan key files");
}

#[tokio::test]
async fn state_the_disk_refuses_is_kept_in_memory_and_written_later() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let id = store(&spool, &envelope(&["a@x.test", "b@x.test"]), b"m\r\n").await;
    spool.faults().fail(FaultPoint::Append, 2, ENOSPC);
    // The queue hears "done": recipient 0 is final and must never be delivered again.
    assert_eq!(
        spool.update(id, &[0], Some(qd(b"s1"))).await.unwrap(),
        Liveness::Live
    );
    assert_eq!(spool.state(id).unwrap().final_rcpts, vec![true, false]);
    assert_eq!(spool.unsynced(), 1, "owed to the disk");
    // The writer retries on its own (the fault fires once more, then clears).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while spool.unsynced() > 0 {
        assert!(std::time::Instant::now() < deadline, "state never written");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    drop(spool);
    let (spool, _) = open(dir.path(), &master);
    let state = spool.state(id).unwrap();
    assert_eq!(
        state.final_rcpts,
        vec![true, false],
        "the retried record is on disk"
    );
    assert_eq!(state.queue_data, b"s1");
}

#[tokio::test]
async fn the_last_final_recipient_destroys_the_body_even_when_appends_fail() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let id = store(&spool, &envelope(&["a@x.test"]), &vec![b'z'; 5000]).await;
    let loc = spool.shared.index().messages[&id].message;
    spool.faults().fail(FaultPoint::Append, 100, ENOSPC);
    assert_eq!(
        spool.update(id, &[0], None).await.unwrap(),
        Liveness::Destroyed
    );
    let bytes = std::fs::read(segment_path(spool.dir(), u64::from(loc.segment))).unwrap();
    let payload = &bytes[loc.offset as usize + HEADER_LEN..][..loc.len as usize];
    assert!(payload.iter().all(|b| *b == 0), "punching needs no space");
    spool.faults().clear();
}

#[tokio::test]
async fn a_punch_that_fails_is_retried_and_the_queue_is_not_told_to_resend() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let id = store(&spool, &envelope(&["a@x.test"]), &vec![b'z'; 5000]).await;
    let loc = spool.shared.index().messages[&id].message;
    spool.faults().fail(FaultPoint::Punch, 1, EIO);
    assert_eq!(
        spool.update(id, &[0], None).await.unwrap(),
        Liveness::Destroyed
    );
    assert!(!spool.contains(id));
    let path = segment_path(spool.dir(), u64::from(loc.segment));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let bytes = std::fs::read(&path).unwrap();
        let payload = &bytes[loc.offset as usize + HEADER_LEN..][..loc.len as usize];
        if payload.iter().all(|b| *b == 0) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "punch never retried");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_key_file_that_fails_once_at_recovery_is_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let id = store(&spool, &envelope(&["a@x.test"]), b"keep me\r\n").await;
    drop(spool);
    let faults = Arc::new(Faults::default());
    faults.fail(FaultPoint::ReadKey, 1, EIO);
    let options = SpoolOptions {
        segment_size: 1 << 20,
        min_free: 0,
        faults,
    };
    let (spool, report) = Spool::open_with(dir.path(), master.clone(), options).unwrap();
    assert!(report.unreadable.is_empty(), "{:?}", report.unreadable);
    assert_eq!(spool.read_whole(id).await.unwrap().body, b"keep me\r\n");
}

#[tokio::test]
async fn a_segment_that_cannot_be_read_stays_in_place_and_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let id = store(&spool, &envelope(&["a@x.test"]), b"keep me\r\n").await;
    let seg = active_segment(&spool, id);
    let spool_dir = spool.dir().to_path_buf();
    drop(spool);
    let key = key_path(&spool_dir, seg);
    let seg_bytes = std::fs::read(segment_path(&spool_dir, seg)).unwrap();
    let key_bytes = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap(); // e.g. restored from a backup without its keys

    let (spool, report) = open(dir.path(), &master);
    assert!(!spool.contains(id));
    assert_eq!(report.unreadable.len(), 1, "{report:?}");
    assert_eq!(report.unreadable[0].segment, seg);
    assert_eq!(
        std::fs::read(segment_path(&spool_dir, seg)).unwrap(),
        seg_bytes,
        "left exactly as it was"
    );
    // The new writer never takes its number; once the key is back, the mail is too.
    let other = store(&spool, &envelope(&["b@x.test"]), b"new\r\n").await;
    assert!(active_segment(&spool, other) > seg);
    drop(spool);
    std::fs::write(&key, key_bytes).unwrap();
    let (spool, report) = open(dir.path(), &master);
    assert!(report.unreadable.is_empty());
    assert_eq!(spool.read_whole(id).await.unwrap().body, b"keep me\r\n");
}

#[tokio::test]
async fn below_the_free_space_reserve_new_mail_is_refused_but_state_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open_with(dir.path(), &master, 0);
    let id = store(&spool, &envelope(&["a@x.test", "b@x.test"]), b"m\r\n").await;
    drop(spool);
    // A reserve no filesystem here can meet.
    let (spool, _) = open_with(dir.path(), &master, u64::MAX / 2);
    assert!(!spool.has_room(0));
    let refused = QueueId::generate().unwrap();
    let err = spool
        .store(refused, &envelope(&["c@x.test"]), &[b"no room\r\n"])
        .await
        .expect_err("below the reserve");
    assert!(is_disk_full(&err), "{err:?}");
    assert_eq!(spool.update(id, &[0], None).await.unwrap(), Liveness::Live);
    assert_eq!(spool.unsynced(), 0, "state records still go to disk");
}

/// Recovery opens envelopes, never bodies: a body whose seal no longer opens is not noticed at
/// start (the message is recovered, nothing is quarantined), only when the message is read.
#[tokio::test]
async fn recovery_opens_envelopes_not_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let id = store(&spool, &envelope(&["a@x.test"]), &vec![b'b'; 4096]).await;
    let loc = spool.shared.index().messages[&id].message;
    drop(spool);
    let path = segment_path(&dir.path().join("spool"), u64::from(loc.segment));
    let mut bytes = std::fs::read(&path).unwrap();
    let end = (loc.offset + HEADER_LEN as u64 + u64::from(loc.len)) as usize;
    bytes[end - 100] ^= 0xff; // inside the body's ciphertext
    std::fs::write(&path, &bytes).unwrap();

    let (spool, report) = open(dir.path(), &master);
    assert_eq!(report.recovered, 1);
    assert!(report.quarantined.is_empty(), "{:?}", report.quarantined);
    assert_eq!(spool.dues(), vec![(id, 0)]);
    assert!(matches!(
        spool.read_whole(id).await,
        Err(SpoolError::Crypto(_))
    ));
}

/// A spool written before envelope and body were sealed apart (one seal over both, kind 1) is
/// still recovered and read.
#[tokio::test]
async fn whole_records_of_the_old_layout_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let spool_dir = dir.path().join("spool");
    std::fs::create_dir_all(&spool_dir).unwrap();
    let key = Key::generate().unwrap();
    master
        .write_wrapped(&key_path(&spool_dir, 1), &key_purpose(1), &key)
        .unwrap();
    let env = envelope(&["old@x.test", "older@x.test"]);
    let json = serde_json::to_vec(&env).unwrap();
    let mut plain = (json.len() as u32).to_le_bytes().to_vec();
    plain.extend_from_slice(&json);
    plain.extend_from_slice(b"Subject: old\r\n\r\nbody\r\n");
    let id = QueueId::generate().unwrap();
    let mut seg = Vec::new();
    record::append(&mut seg, Kind::Whole, id, &key, &plain).unwrap();
    std::fs::write(segment_path(&spool_dir, 1), &seg).unwrap();

    let (spool, report) = open(dir.path(), &master);
    assert_eq!((report.recovered, report.quarantined.len()), (1, 0));
    let msg = spool.read_whole(id).await.unwrap();
    assert_eq!(msg.envelope, env);
    assert_eq!(msg.body, b"Subject: old\r\n\r\nbody\r\n");
    assert_eq!(msg.state.final_rcpts, vec![false, false]);
    // The queue's two reads, each from the one seal.
    assert_eq!(spool.read_envelope(id).await.unwrap().envelope, env);
    let body = spool.read_body(id).await.unwrap().whole().await.unwrap();
    assert_eq!(body, b"Subject: old\r\n\r\nbody\r\n");
}

/// The queue reads a message in two steps, each opening one seal: the envelope (and state)
/// while an attempt waits for its destination, the body once it can be sent. Spoiling one
/// part's ciphertext (in place, under the running spool) shows which read opens what.
#[tokio::test]
async fn envelope_and_body_are_read_apart() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let env = envelope(&["a@x.test", "b@x.test"]);
    let body_spoilt = store(&spool, &env, &vec![b'b'; 4096]).await;
    let envelope_spoilt = store(&spool, &env, &vec![b'c'; 4096]).await;
    spool.update(body_spoilt, &[1], None).await.unwrap();
    let (a, b) = {
        let index = spool.shared.index();
        let loc = |id| index.messages[&id].message;
        (loc(body_spoilt), loc(envelope_spoilt))
    };
    let path = segment_path(spool.dir(), u64::from(a.segment));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let flip = |at: u64| {
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, at).unwrap();
        file.write_all_at(&[byte[0] ^ 0xff], at).unwrap();
    };
    flip(a.offset + HEADER_LEN as u64 + u64::from(a.len) - 100); // in the first's body
    flip(b.offset + HEADER_LEN as u64 + 40); // in the second's envelope

    let head = spool.read_envelope(body_spoilt).await.unwrap();
    assert_eq!((head.id, &head.envelope), (body_spoilt, &env));
    assert_eq!(head.state.final_rcpts, vec![false, true]);
    assert!(matches!(
        spool.read_body(body_spoilt).await,
        Err(SpoolError::Crypto(_))
    ));

    let body = spool.read_body(envelope_spoilt).await.unwrap();
    assert_eq!(body.whole().await.unwrap(), vec![b'c'; 4096]);
    assert!(matches!(
        spool.read_envelope(envelope_spoilt).await,
        Err(SpoolError::Crypto(_))
    ));
    assert!(matches!(
        spool.read_body(QueueId::generate().unwrap()).await,
        Err(SpoolError::NotFound)
    ));
}

/// An envelope-only read takes the record's first KiB; an envelope longer than that (70
/// recipients here) is read with the whole record, and comes back whole.
#[tokio::test]
async fn an_envelope_longer_than_the_first_read_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let many: Vec<String> = (0..70).map(|i| format!("recipient-{i}@x.test")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let env = envelope(&many);
    assert!(envelope::encode_envelope(&env).unwrap().len() > ENVELOPE_READ as usize);
    let id = store(&spool, &env, &vec![b'b'; 4096]).await;
    let short = store(&spool, &envelope(&["a@x.test"]), &vec![b'c'; 4096]).await;
    assert_eq!(spool.read_envelope(id).await.unwrap().envelope, env);
    assert_eq!(
        spool.read_envelope(short).await.unwrap().envelope,
        envelope(&["a@x.test"])
    );
}

/// What the index keeps in memory survives a restart without the state records being read
/// for it: the due time the queue stored (or "held"), and the final flags, inline up to 64
/// recipients and beyond. The queue's data is read from disk when asked for.
#[tokio::test]
async fn due_times_and_finals_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let many: Vec<String> = (0..70).map(|i| format!("r{i}@x.test")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    let a = store(&spool, &envelope(&many), b"X: a\r\n\r\n").await;
    let b = store(
        &spool,
        &envelope(&["b@x.test", "c@x.test"]),
        b"X: b\r\n\r\n",
    )
    .await;
    let fresh = store(&spool, &envelope(&["d@x.test"]), b"X: d\r\n\r\n").await;
    let data = |due| QueueData {
        data: format!("due {due}").into_bytes(),
        due,
    };
    spool
        .update(a, &[0, 65, 69], Some(data(500)))
        .await
        .unwrap();
    spool.update(b, &[1], Some(data(NOT_DUE))).await.unwrap();
    drop(spool);

    let (spool, _) = open(dir.path(), &master);
    let mut dues = spool.dues();
    dues.sort();
    let mut want = vec![(a, 500), (b, NOT_DUE), (fresh, 0)];
    want.sort();
    assert_eq!(dues, want);
    let state = spool.state(a).unwrap();
    let finals: Vec<usize> = (0..70).filter(|&i| state.final_rcpts[i]).collect();
    assert_eq!(finals, vec![0, 65, 69]);
    assert_eq!((state.queue_data, state.due), (b"due 500".to_vec(), 500));
    assert_eq!(spool.state(b).unwrap().final_rcpts, vec![false, true]);
    // An update without queue data keeps the stored data (read back from disk) and due time.
    spool.update(b, &[], None).await.unwrap();
    let state = spool.state(b).unwrap();
    assert_eq!(
        (state.queue_data, state.due),
        (format!("due {NOT_DUE}").into_bytes(), NOT_DUE)
    );
    assert!(matches!(
        spool.state(QueueId([9; 16])),
        Err(SpoolError::NotFound)
    ));
}

#[test]
fn finals_pack_and_unpack() {
    for n in [0usize, 1, 63, 64, 65, 200] {
        let flags: Vec<bool> = (0..n).map(|i| i % 3 == 0).collect();
        let finals = Finals::from(&flags[..]);
        assert_eq!(finals.to_vec(), flags, "{n}");
        assert_eq!(finals.len(), n);
        assert_eq!(finals.all_final(), flags.iter().all(|f| *f), "{n}");
        assert!(Finals::from(&vec![true; n][..]).all_final());
        assert_eq!(Finals::new(n).all_final(), n == 0);
    }
}

/// The queue's data is written as a base64 string (skipped quickly by recovery), and state
/// records of the earlier form, with the bytes as an array of numbers, still read.
#[test]
fn queue_data_is_a_string_and_arrays_still_read() {
    let state = MessageState {
        final_rcpts: vec![true, false],
        queue_data: b"{\"sched\":1}".to_vec(),
        due: 42,
    };
    let json = serde_json::to_string(&state).unwrap();
    assert!(
        json.contains("\"queue_data\":\"eyJzY2hlZCI6MX0=\""),
        "{json}"
    );
    assert_eq!(serde_json::from_str::<MessageState>(&json).unwrap(), state);
    let old = r#"{"final_rcpts":[true,false],"queue_data":[104,105]}"#;
    let read: MessageState = serde_json::from_str(old).unwrap();
    assert_eq!((read.queue_data, read.due), (b"hi".to_vec(), 0));
    assert!(
        serde_json::from_str::<MessageState>(r#"{"final_rcpts":[],"queue_data":"!!"}"#).is_err()
    );
}

/// When superseded state records are still on disk (their punch failed, or a crash came
/// between the sync of the new one and the punch of the old), recovery takes the newest.
#[tokio::test]
async fn recovery_takes_the_newest_of_several_state_records() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let a = store(
        &spool,
        &envelope(&["a@x.test", "b@x.test"]),
        b"X: a\r\n\r\n",
    )
    .await;
    let b = store(&spool, &envelope(&["c@x.test"]), b"X: b\r\n\r\n").await;
    spool.faults().fail(FaultPoint::Punch, 1000, EIO);
    let data = |text: &str, due| QueueData {
        data: text.as_bytes().to_vec(),
        due,
    };
    spool.update(a, &[], Some(data("a1", 10))).await.unwrap();
    spool.update(b, &[], Some(data("b1", 20))).await.unwrap();
    spool.update(a, &[1], Some(data("a2", 30))).await.unwrap();
    spool.update(b, &[], Some(data("b2", 40))).await.unwrap();
    spool.update(a, &[], Some(data("a3", 50))).await.unwrap();
    drop(spool);
    let (spool, _) = open(dir.path(), &master);
    let mut dues = spool.dues();
    dues.sort();
    let mut want = vec![(a, 50), (b, 40)];
    want.sort();
    assert_eq!(dues, want);
    let state = spool.state(a).unwrap();
    assert_eq!(state.queue_data, b"a3");
    assert_eq!(state.final_rcpts, vec![false, true]);
    assert_eq!(spool.state(b).unwrap().queue_data, b"b2");
}

/// A message whose state record says every recipient is final (the previous run stopped
/// before its records were punched) is finished at start: not requeued, and exactly its bytes
/// punched, its header and its neighbour left as they were.
#[tokio::test]
async fn a_final_message_left_unpunched_is_punched_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let a = store(&spool, &envelope(&["a@x.test"]), &vec![b'a'; 3000]).await;
    let b = store(&spool, &envelope(&["b@x.test"]), b"X: b\r\n\r\nkeep\r\n").await;
    let loc = spool.shared.index().messages[&a].message;
    drop(spool);
    let spool_dir = dir.path().join("spool");
    let n = u64::from(loc.segment);
    let key = master
        .read_wrapped(&key_path(&spool_dir, n), &key_purpose(n))
        .unwrap();
    let done = MessageState {
        final_rcpts: vec![true],
        ..MessageState::default()
    };
    let mut record = Vec::new();
    record::append(
        &mut record,
        Kind::State,
        a,
        &key,
        &serde_json::to_vec(&done).unwrap(),
    )
    .unwrap();
    let path = segment_path(&spool_dir, n);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend_from_slice(&record);
    std::fs::write(&path, &bytes).unwrap();

    let (spool, report) = open(dir.path(), &master);
    assert_eq!(report.recovered, 1);
    assert_eq!(spool.live(), vec![b]);
    let after = std::fs::read(&path).unwrap();
    let start = loc.offset as usize;
    let payload = start + HEADER_LEN..start + HEADER_LEN + loc.len as usize;
    assert_eq!(
        after[start..start + HEADER_LEN],
        bytes[start..start + HEADER_LEN],
        "header kept"
    );
    assert!(
        after[payload.clone()].iter().all(|&x| x == 0),
        "payload punched"
    );
    let state_at = bytes.len() - record.len();
    assert_eq!(
        after[payload.end..state_at],
        bytes[payload.end..state_at],
        "b untouched"
    );
    assert!(
        after[state_at + HEADER_LEN..].iter().all(|&x| x == 0),
        "state punched"
    );
    assert_eq!(
        spool.read_whole(b).await.unwrap().body,
        b"X: b\r\n\r\nkeep\r\n"
    );
}

/// An operator's destroy hears of a punch that failed: the bytes are not gone yet (they are
/// punched later); an update that makes the message final does not (its recipients are final
/// whatever the disk says).
#[tokio::test]
async fn a_destroy_whose_punch_fails_is_not_reported_done() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let id = store(&spool, &envelope(&["a@x.test"]), b"X: y\r\n\r\nbody\r\n").await;
    spool.faults().fail(FaultPoint::Punch, 1, EIO);
    assert!(matches!(spool.destroy(id).await, Err(SpoolError::Io(_))));
    assert!(!spool.contains(id), "gone from the index all the same");
    let other = store(&spool, &envelope(&["a@x.test"]), b"X: y\r\n\r\nbody\r\n").await;
    assert!(spool.destroy(other).await.is_ok());
}

/// Stores `body` as a spilled message: written to a body file in pieces, then committed.
async fn store_spilled(spool: &Spool, env: &Envelope, head: &[u8], body: &[u8]) -> QueueId {
    let id = QueueId::generate().unwrap();
    let mut spill = spool.spill(id).expect("body file");
    for piece in body.chunks(SPILL_AT / 3 + 7) {
        spill.write(piece.to_vec()).await.expect("written");
    }
    let headers = crate::bounce::headers(body).to_vec();
    spool
        .store_spilled(env, &[head], &headers, spill)
        .await
        .expect("stored");
    id
}

fn body_files(spool_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(spool_dir.join(bodyfile::DIR))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn big(marker: &str) -> Vec<u8> {
    let mut body = format!("Subject: {marker}\r\n\r\n").into_bytes();
    while body.len() < 2 * SPILL_AT + 1234 {
        body.extend_from_slice(format!("{marker} line of the body\r\n").as_bytes());
    }
    body
}

/// A spilled message reads back exactly (head, then the file), survives a restart, keeps no
/// clear text on disk, and its body file goes with its last final recipient.
#[tokio::test]
async fn a_spilled_body_reads_back_survives_restart_and_goes_when_final() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let env = envelope(&["a@x.test", "b@x.test"]);
    let body = big("SECRET-8812");
    let id = store_spilled(&spool, &env, b"Received: head\r\n", &body).await;
    let expected = [b"Received: head\r\n".as_slice(), &body].concat();
    let msg = spool.read(id).await.unwrap();
    assert_eq!(msg.body.len(), expected.len() as u64);
    assert!(!msg.body.is_empty());
    assert_eq!(
        msg.body.start(),
        b"Received: head\r\nSubject: SECRET-8812\r\n"
    );
    assert_eq!(spool.read_whole(id).await.unwrap().body, expected);
    assert!(!contains(&all_bytes(dir.path()), b"SECRET-8812"));
    assert!(spool.size(id).unwrap() < 1024, "the record holds no body");
    let spool_dir = spool.dir().to_path_buf();
    drop(spool);

    let (spool, report) = open(dir.path(), &master);
    assert_eq!(report.recovered, 1);
    let msg = spool.read_whole(id).await.unwrap();
    assert_eq!((msg.envelope, msg.body), (env, expected));
    assert_eq!(spool.update(id, &[0], None).await.unwrap(), Liveness::Live);
    assert_eq!(body_files(&spool_dir).len(), 1);
    assert_eq!(
        spool.update(id, &[1], None).await.unwrap(),
        Liveness::Destroyed
    );
    // It goes once the punch is synced, a few milliseconds later.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !body_files(&spool_dir).is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(
        body_files(&spool_dir).is_empty(),
        "the body file went with the message"
    );
}

/// Recovery removes body files no record commits (an upload cut short by a crash, a message
/// destroyed just before one), but only after a scan that read every segment: with one
/// unreadable, a file might belong to a message in it, and stays.
#[tokio::test]
async fn orphan_body_files_go_at_start_unless_a_segment_was_unreadable() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let live = store_spilled(&spool, &envelope(&["a@x.test"]), b"", &big("live")).await;
    let seg = active_segment(&spool, live);
    let spool_dir = spool.dir().to_path_buf();
    let orphan = QueueId::generate().unwrap();
    let mut cut_short = spool.spill(orphan).unwrap();
    cut_short.write(big("cut short")).await.unwrap();
    // A crash: the file stays, no record commits it.
    std::mem::forget(cut_short);
    drop(spool);
    assert_eq!(body_files(&spool_dir).len(), 2);

    let key = key_path(&spool_dir, seg);
    let key_bytes = std::fs::read(&key).unwrap();
    std::fs::remove_file(&key).unwrap();
    let (spool, report) = open(dir.path(), &master);
    assert_eq!(report.unreadable.len(), 1);
    assert_eq!(
        body_files(&spool_dir).len(),
        2,
        "nothing removed after an unreadable segment"
    );
    drop(spool);

    std::fs::write(&key, key_bytes).unwrap();
    let (spool, report) = open(dir.path(), &master);
    assert!(report.unreadable.is_empty());
    assert_eq!(body_files(&spool_dir), vec![format!("{live}.body")]);
    assert_eq!(spool.read_whole(live).await.unwrap().body, big("live"));
}

/// A body file that ends early, or whose chunk was altered, is an error when read: never a
/// short or altered message sent as if whole.
#[tokio::test]
async fn a_truncated_or_altered_body_file_fails_to_read() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let id = store_spilled(&spool, &envelope(&["a@x.test"]), b"", &big("cut")).await;
    let path = bodyfile::path(spool.dir(), id);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    assert!(spool.read_whole(id).await.is_err(), "truncated");
    let mut altered = bytes.clone();
    altered[10] ^= 1;
    std::fs::write(&path, &altered).unwrap();
    assert!(spool.read_whole(id).await.is_err(), "altered");
    // Whole again: reads.
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(spool.read_whole(id).await.unwrap().body, big("cut"));
}

/// The (offset, length) of each chunk of a body file: `u32` length, then the seal.
fn chunk_spans(file: &[u8]) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut at = 4;
    while at < file.len() {
        let len = u32::from_le_bytes(file[at..at + 4].try_into().unwrap()) as usize;
        spans.push((at, 4 + len));
        at += 4 + len;
    }
    spans
}

/// Each chunk is bound to its message and its place: two chunks swapped, or a chunk taken from
/// another message's file (same length, same key), make the body fail to read.
#[tokio::test]
async fn body_file_chunks_cannot_be_swapped_or_moved_between_messages() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let a = store_spilled(&spool, &envelope(&["a@x.test"]), b"", &big("aaaa")).await;
    let b = store_spilled(&spool, &envelope(&["b@x.test"]), b"", &big("bbbb")).await;
    let (path_a, path_b) = (
        bodyfile::path(spool.dir(), a),
        bodyfile::path(spool.dir(), b),
    );
    let original = std::fs::read(&path_a).unwrap();
    let spans = chunk_spans(&original);
    // Two full chunks (they seal to the same length).
    let full: Vec<(usize, usize)> = spans
        .iter()
        .copied()
        .filter(|s| s.1 == spans[0].1)
        .collect();
    assert!(full.len() >= 2, "{spans:?}");
    let (first, second) = (full[0], full[1]);

    let mut swapped = original.clone();
    swapped[first.0..first.0 + first.1].copy_from_slice(&original[second.0..second.0 + second.1]);
    swapped[second.0..second.0 + second.1].copy_from_slice(&original[first.0..first.0 + first.1]);
    std::fs::write(&path_a, &swapped).unwrap();
    assert!(spool.read_whole(a).await.is_err(), "chunks swapped");

    let other = std::fs::read(&path_b).unwrap();
    let mut moved = original.clone();
    moved[first.0..first.0 + first.1].copy_from_slice(&other[first.0..first.0 + first.1]);
    std::fs::write(&path_a, &moved).unwrap();
    assert!(
        spool.read_whole(a).await.is_err(),
        "a chunk of another message"
    );

    std::fs::write(&path_a, &original).unwrap();
    assert_eq!(spool.read_whole(a).await.unwrap().body, big("aaaa"));
}

/// A body file not committed goes: dropped (a client gone, a refusal), or when its sync fails,
/// in which case the store fails and nothing is live. Before the commit it reads back as
/// written (what DKIM signs).
#[tokio::test]
async fn an_uncommitted_body_file_goes_and_a_failed_sync_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let body = big("uncommitted");
    let mut spill = spool.spill(QueueId::generate().unwrap()).unwrap();
    spill.write(body.clone()).await.unwrap();
    assert_eq!(spill.written(), body.len() as u64);
    let mut reader = spill.reader().unwrap();
    let mut read = Vec::new();
    while let Some(chunk) = reader.next_blocking().unwrap() {
        read.extend(chunk);
    }
    assert_eq!(read, body, "reads back before the commit");
    assert_eq!(body_files(spool.dir()).len(), 1);
    drop(spill);
    assert!(body_files(spool.dir()).is_empty(), "dropped: removed");

    let mut spill = spool.spill(QueueId::generate().unwrap()).unwrap();
    spill.write(body.clone()).await.unwrap();
    spool.faults().fail(FaultPoint::BodySync, 1, EIO);
    let stored = spool
        .store_spilled(&envelope(&["a@x.test"]), &[b""], b"", spill)
        .await;
    assert!(
        stored.is_err(),
        "a failed fdatasync is not a stored message"
    );
    assert!(body_files(spool.dir()).is_empty());
    assert!(spool.live().is_empty());
}

/// Punches in a segment no append has synced since get a sync of their own; one that fails is
/// punched again (at the same place: the record before it is untouched) and synced later, and
/// the body file goes only after a sync that succeeded.
#[tokio::test]
async fn a_punch_is_synced_before_its_body_file_goes_even_when_the_sync_fails_once() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = open(dir.path(), &master);
    let before = store(&spool, &envelope(&["a@x.test"]), b"the record before\r\n").await;
    let id = store_spilled(&spool, &envelope(&["b@x.test"]), b"", &big("punched")).await;
    drop(spool);
    // Reopened, the spool appends to a new segment: the punch's segment is not the active one.
    let (spool, _) = open(dir.path(), &master);
    let path = bodyfile::path(spool.dir(), id);
    spool.faults().fail(FaultPoint::PunchSync, 1, EIO);
    assert_eq!(
        spool.update(id, &[0], None).await.unwrap(),
        Liveness::Destroyed
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while path.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert!(!path.exists(), "removed once a sync succeeded");
    assert_eq!(
        spool.faults().remaining(FaultPoint::PunchSync),
        0,
        "the punch's segment was synced (and failed once) before the body file went"
    );
    drop(spool);
    let (spool, _) = open(dir.path(), &master);
    assert_eq!(spool.live(), vec![before]);
    assert_eq!(
        spool.read_whole(before).await.unwrap().body,
        b"the record before\r\n"
    );
}

/// Segments after the first are zeroed ahead of use: the spare (`spool/next.spare`, made once
/// the active segment is half full) is renamed into place at the rotation, so the new segment's
/// file is `segment_size` long before its first record. A restart reads its unused zeros as its
/// end: every message comes back whole and nothing is quarantined.
#[tokio::test]
async fn segments_zeroed_ahead_of_use_hold_their_records_across_a_restart() {
    const SEGMENT: u64 = 64 << 10;
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let (spool, _) = Spool::open(dir.path(), master.clone(), SEGMENT).expect("spool opens");
    let seg_len = |name: &str| {
        std::fs::metadata(dir.path().join("spool").join(name))
            .map(|m| m.len())
            .unwrap_or(0)
    };
    let mut stored = Vec::new();
    let mut zeroed_ahead = None;
    // 8 KiB bodies: a rotation every eight messages or so.
    for i in 0..64 {
        let before = segment_files(dir.path()).len();
        let body = format!("Subject: {i}\r\n\r\n{}\r\n", "z".repeat(8 << 10));
        stored.push((
            store(&spool, &envelope(&["a@x.test"]), body.as_bytes()).await,
            body,
        ));
        let segments = segment_files(dir.path());
        let newest = segments.last().cloned().unwrap_or_default();
        if segments.len() > before && before > 0 && seg_len(&newest) == SEGMENT {
            // One record of about 8 KiB in it, yet the file is the whole segment: a spare.
            zeroed_ahead = Some(newest);
            break;
        }
    }
    let zeroed_ahead = zeroed_ahead.expect("a segment started from a spare");
    drop(spool);
    let (spool, report) = open(dir.path(), &master);
    assert!(report.quarantined.is_empty(), "{:?}", report.quarantined);
    assert_eq!(spool.live().len(), stored.len());
    for (id, body) in &stored {
        assert_eq!(spool.read_whole(*id).await.unwrap().body, body.as_bytes());
    }
    assert!(
        segment_files(dir.path()).contains(&zeroed_ahead),
        "the spare became a segment like any other"
    );
}
