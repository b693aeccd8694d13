use std::net::{IpAddr, Ipv4Addr};

use super::*;

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
    let msg = spool.read(id).await.unwrap();
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
        assert_eq!(spool.read(id).await.unwrap().body, body.as_bytes());
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
        spool
            .update(id, &[1], Some(b"sched-1".to_vec()))
            .await
            .unwrap(),
        Liveness::Live
    );
    assert_eq!(
        spool
            .update(id, &[0], Some(b"sched-2".to_vec()))
            .await
            .unwrap(),
        Liveness::Live
    );
    drop(spool);

    let (spool, report) = open(dir.path(), &master);
    assert_eq!(report.recovered, 1);
    let state = spool.state(id).unwrap();
    assert_eq!(state.final_rcpts, vec![true, true, false]);
    assert_eq!(state.queue_data, b"sched-2");

    let loc = spool.shared.index().messages[&id].message;
    let seg = segment_path(spool.dir(), loc.segment);
    assert_eq!(
        spool.update(id, &[2], None).await.unwrap(),
        Liveness::Destroyed
    );
    assert!(spool.live().is_empty());
    assert!(matches!(spool.read(id).await, Err(SpoolError::NotFound)));
    // The old segment held nothing else and is not the active one: gone, key and all.
    assert!(!seg.exists(), "emptied segment is unlinked at once");
    assert!(!key_path(spool.dir(), loc.segment).exists());
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
    let bytes = std::fs::read(segment_path(spool.dir(), loc.segment)).unwrap();
    let payload = &bytes[loc.offset as usize + HEADER_LEN..][..loc.len as usize];
    assert!(payload.iter().all(|b| *b == 0));
    assert!(matches!(
        spool.destroy(gone).await,
        Err(SpoolError::NotFound)
    ));
    assert_eq!(spool.read(keep).await.unwrap().body, b"keep\r\n");
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
            index.messages[&b].message.segment,
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
