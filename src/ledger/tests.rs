use std::net::{IpAddr, Ipv4Addr};

use super::*;
use crate::suppress::Reason;

const DAY: i64 = 86_400;
/// 2026-11-01 00:00:00 UTC, plus a few hours.
const T0: i64 = 1_793_491_200 + 3 * 3600;
/// The ledger cache of the daemon's default (`limits.ledger_cache`).
const CACHE: u64 = 16 << 20;

fn envelope(from: &str, rcpts: &[&str], domain: &str, at: i64) -> Envelope {
    Envelope {
        mail_from: from.into(),
        recipients: rcpts.iter().map(|s| s.to_string()).collect(),
        received_at: at,
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        helo: "client.test".into(),
        auth_user: Some("app".into()),
        eight_bit: false,
        smtputf8: false,
        sending_domain: domain.into(),
    }
}

fn ledger(dir: &Path, strict: &[&str]) -> Ledger {
    let config = PrivacyConfig {
        strict_domains: strict.iter().map(|s| s.to_string()).collect(),
        ..PrivacyConfig::default()
    };
    Ledger::open(dir, &Key::generate().unwrap(), &config, CACHE, T0).unwrap()
}

fn id() -> QueueId {
    QueueId::generate().unwrap()
}

#[test]
fn records_follow_outcomes_and_are_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), &[]);
    let q = id();
    let env = envelope(
        "app@shop.test",
        &["Bob@Dest.test", "carol@dest.test"],
        "shop.test",
        T0,
    );
    l.accepted(
        q,
        &env,
        1234,
        &Signing {
            domain: Some("shop.test".into()),
            selectors: vec!["s1".into()],
        },
    )
    .unwrap();
    let r = l.get(q, T0, 0, "bob@dest.test").unwrap().unwrap();
    assert_eq!(r.outcome, Outcome::Queued);
    assert_eq!(r.recipient.as_deref(), Some("Bob@Dest.test"));
    assert_eq!(
        r.recipient_pseudonym,
        Some(l.pseudonyms().of("bob@dest.test").to_string())
    );
    assert_eq!(r.dkim_selectors, vec!["s1"]);
    let update = Update {
        code: Some("2.0.0".into()),
        text: Some("smtp; 250 ok".into()),
        remote_host: Some("mx.dest.test".into()),
        remote_ip: Some("192.0.2.1:25".into()),
        tls: Some("TLSv1.3 TLS13_AES_256_GCM_SHA384".into()),
        tls_verified: Some(true),
    };
    l.outcome(q, &env, 0, Outcome::Delivered, &update, T0 + 5)
        .unwrap();
    let r = l.get(q, T0, 0, "Bob@Dest.test").unwrap().unwrap();
    assert_eq!(
        (r.outcome, r.attempts, r.final_at),
        (Outcome::Delivered, 1, Some(T0 + 5))
    );
    assert_eq!(r.tls.as_deref(), Some("TLSv1.3 TLS13_AES_256_GCM_SHA384"));
    l.flush().unwrap();
    let raw = crate::spool_test_support::all_bytes(dir.path());
    for needle in [
        "Bob@Dest",
        "carol@dest",
        "app@shop",
        "mx.dest.test",
        "192.0.2.1",
    ] {
        assert!(
            !crate::spool_test_support::contains(&raw, needle.as_bytes()),
            "{needle} in clear"
        );
    }
}

#[test]
fn purge_keeps_day_d_until_retention_then_shreds_it() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), &[]);
    let q = id();
    let env = envelope("a@shop.test", &["r@dest.test"], "shop.test", T0);
    l.accepted(q, &env, 10, &Signing::default()).unwrap();
    let copied = l.raw(q, T0, 0, "r@dest.test").unwrap().unwrap();
    let key_file = dir.path().join(format!("ledger/keys/{}.key", day_of(T0)));
    assert!(key_file.exists());

    assert_eq!(l.purge(T0 + 29 * DAY).unwrap(), Purged::default());
    assert!(
        l.get(q, T0, 0, "r@dest.test").unwrap().is_some(),
        "readable on day D+29"
    );
    let purged = l.purge(T0 + 31 * DAY).unwrap();
    assert_eq!(purged.records, 1);
    assert_eq!(purged.days, vec![day_of(T0)]);
    assert!(
        l.get(q, T0, 0, "r@dest.test").unwrap().is_none(),
        "gone on day D+31"
    );
    assert!(!key_file.exists(), "epoch key destroyed");
    assert!(
        l.open_raw(q, T0, 0, "r@dest.test", &copied).is_err(),
        "a copy taken before the purge stays sealed"
    );
    assert!(l.export("r@dest.test").unwrap().records.is_empty());
}

#[test]
fn strict_domains_keep_no_recipient_or_pseudonym() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), &["private.test"]);
    let q = id();
    let env = envelope("a@private.test", &["r@dest.test"], "private.test", T0);
    l.accepted(q, &env, 10, &Signing::default()).unwrap();
    let update = Update {
        text: Some("smtp; 550 5.1.1 <r@dest.test> unknown".into()),
        code: Some("5.1.1".into()),
        ..Update::default()
    };
    l.outcome(q, &env, 0, Outcome::Bounced, &update, T0 + 1)
        .unwrap();
    assert!(
        l.get(q, T0, 0, "r@dest.test").unwrap().is_none(),
        "not findable by address"
    );
    let records = l.message_records(q, T0).unwrap();
    assert_eq!(records.len(), 1);
    let r = records[0].clone();
    assert_eq!(
        (r.recipient, r.recipient_pseudonym, r.sender, r.last_text),
        (None, None, None, None)
    );
    assert_eq!(
        (r.outcome, r.last_code.as_deref()),
        (Outcome::Bounced, Some("5.1.1"))
    );
    assert!(
        l.export("r@dest.test").unwrap().records.is_empty(),
        "nothing links the subject to it"
    );
    assert_eq!(l.log_rcpt("r@dest.test", "private.test"), "-");
}

#[test]
fn export_and_erase_touch_exactly_the_subject() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), &[]);
    let (q1, q2, q3) = (id(), id(), id());
    l.accepted(
        q1,
        &envelope(
            "a@shop.test",
            &["bob@dest.test", "eve@dest.test"],
            "shop.test",
            T0,
        ),
        1,
        &Signing::default(),
    )
    .unwrap();
    l.accepted(
        q2,
        &envelope("a@shop.test", &["BOB@dest.test"], "shop.test", T0 + DAY),
        1,
        &Signing::default(),
    )
    .unwrap();
    l.accepted(
        q3,
        &envelope("bob@dest.test", &["eve@dest.test"], "dest.test", T0),
        1,
        &Signing::default(),
    )
    .unwrap();

    let mut got: Vec<(String, u32)> = l
        .export("bob@dest.test")
        .unwrap()
        .records
        .into_iter()
        .map(|r| (r.queue_id, r.rcpt_index))
        .collect();
    got.sort();
    let mut want = vec![
        (q1.to_string(), 0),
        (q2.to_string(), 0),
        (q3.to_string(), 0),
    ];
    want.sort();
    assert_eq!(got, want, "as recipient (both spellings) and as sender");
    let as_sender = l
        .export("bob@dest.test")
        .unwrap()
        .records
        .into_iter()
        .find(|r| r.queue_id == q3.to_string())
        .unwrap();
    assert_eq!(
        as_sender.recipient, None,
        "the other person's address is not handed out"
    );

    l.suppress
        .add("bob@dest.test", Reason::Unsubscribe, T0, None)
        .unwrap();
    assert_eq!(l.erase("bob@dest.test").unwrap(), 3);
    assert!(l.export("bob@dest.test").unwrap().records.is_empty());
    assert!(
        l.get(q1, T0, 1, "eve@dest.test").unwrap().is_some(),
        "eve's record is untouched"
    );
    assert_eq!(
        l.export("eve@dest.test").unwrap().records.len(),
        1,
        "q3 went with bob's erasure; q1 stays"
    );
    assert!(
        l.suppress.check("bob@dest.test", T0).unwrap().is_some(),
        "the opt-out survives erasure"
    );
}

#[test]
fn hard_bounces_suppress_at_the_threshold_and_deliveries_reset() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), &[]);
    assert!(!l.suppress.hard_bounce("x@dest.test", T0).unwrap());
    assert!(!l.suppress.hard_bounce("x@dest.test", T0).unwrap());
    l.suppress.delivered("x@dest.test").unwrap();
    assert!(!l.suppress.hard_bounce("x@dest.test", T0).unwrap());
    assert!(!l.suppress.hard_bounce("X@DEST.test", T0).unwrap());
    assert!(
        l.suppress.hard_bounce("x@dest.test", T0).unwrap(),
        "third in a row"
    );
    let e = l.suppress.check("x@dest.test", T0).unwrap().unwrap();
    assert_eq!(e.reason, Reason::HardBounce);
    l.suppress
        .add("t@dest.test", Reason::Manual, T0, Some(T0 + 10))
        .unwrap();
    assert!(l.suppress.check("t@dest.test", T0 + 9).unwrap().is_some());
    assert!(
        l.suppress.check("t@dest.test", T0 + 10).unwrap().is_none(),
        "expired"
    );
    assert_eq!(l.suppress.list().unwrap().len(), 2);
    assert!(l.suppress.remove("x@dest.test").unwrap());
    assert!(l.suppress.check("x@dest.test", T0).unwrap().is_none());
}

#[test]
fn one_mailbox_however_spelled_is_one_subject() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), &[]);
    let spellings = [
        ("\"bob\"@dest.test", "bob@dest.test"),
        ("ann@bücher.test", "ann@xn--bcher-kva.test"),
    ];
    for (a, b) in spellings {
        assert_eq!(l.pseudonyms().of(a), l.pseudonyms().of(b), "{a} vs {b}");
    }
    let (q1, q2) = (id(), id());
    let shop = |rcpts: &[&str]| envelope("a@shop.test", rcpts, "shop.test", T0);
    l.accepted(
        q1,
        &shop(&["\"bob\"@dest.test", "ann@bücher.test"]),
        1,
        &Signing::default(),
    )
    .unwrap();
    l.accepted(
        q2,
        &shop(&["bob@dest.test", "ann@xn--bcher-kva.test"]),
        1,
        &Signing::default(),
    )
    .unwrap();

    // Suppressing one spelling suppresses the other.
    l.suppress
        .add("bob@dest.test", Reason::Unsubscribe, T0, None)
        .unwrap();
    l.suppress
        .add("ann@xn--bcher-kva.test", Reason::Complaint, T0, None)
        .unwrap();
    assert!(l.suppress.check("\"bob\"@dest.test", T0).unwrap().is_some());
    assert!(l.suppress.check("ann@bücher.test", T0).unwrap().is_some());
    assert_eq!(l.suppress.len(), 2, "one entry per person");

    // Exporting or erasing one spelling finds the records written under the other.
    assert_eq!(l.export("bob@dest.test").unwrap().records.len(), 2);
    assert_eq!(l.erase("\"bob\"@dest.test").unwrap(), 2);
    assert!(l.export("bob@dest.test").unwrap().records.is_empty());
    assert_eq!(l.erase("ann@bücher.test").unwrap(), 2);
    assert!(l
        .export("ann@xn--bcher-kva.test")
        .unwrap()
        .records
        .is_empty());
}

#[test]
fn export_holds_the_suppression_entry_and_bounce_run_and_erase_keeps_only_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), &[]);
    l.suppress.hard_bounce("x@dest.test", T0).unwrap();
    l.suppress.hard_bounce("X@dest.test", T0 + 60).unwrap();
    l.suppress
        .add("x@dest.test", Reason::Manual, T0 + 90, Some(T0 + 100))
        .unwrap();
    let data = l.export("x@dest.test").unwrap();
    assert_eq!(
        data.bounce_run,
        Some(crate::suppress::BounceRun {
            count: 2,
            since: T0
        })
    );
    let entry = data.suppression.expect("the entry, even once expired");
    assert_eq!(
        (entry.reason, entry.expires_at),
        (Reason::Manual, Some(T0 + 100))
    );

    l.erase("x@dest.test").unwrap();
    let data = l.export("x@dest.test").unwrap();
    assert_eq!(data.bounce_run, None, "the counter goes with an erasure");
    assert!(data.suppression.is_some(), "the opt-out stays");
    assert!(
        !l.suppress.hard_bounce("x@dest.test", T0 + 200).unwrap(),
        "the run starts again from one"
    );
}

#[test]
fn bounce_runs_are_purged_with_the_day_they_started() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), &[]);
    l.suppress.hard_bounce("x@dest.test", T0).unwrap();
    l.suppress
        .hard_bounce("x@dest.test", T0 + 20 * DAY)
        .unwrap();
    l.suppress.hard_bounce("y@dest.test", T0 + 5 * DAY).unwrap();
    assert_eq!(l.purge(T0 + 29 * DAY).unwrap().bounce_runs, 0);
    assert_eq!(
        l.suppress
            .bounce_run("x@dest.test")
            .unwrap()
            .map(|r| r.count),
        Some(2)
    );
    let purged = l.purge(T0 + 31 * DAY).unwrap();
    assert_eq!(purged.bounce_runs, 1, "{purged:?}");
    assert_eq!(purged.days, vec![day_of(T0)], "the run's day key goes too");
    assert_eq!(l.suppress.bounce_run("x@dest.test").unwrap(), None);
    assert!(l.suppress.bounce_run("y@dest.test").unwrap().is_some());
    assert!(
        !l.suppress
            .hard_bounce("x@dest.test", T0 + 31 * DAY)
            .unwrap(),
        "a bounce after the purge starts a new run"
    );
    assert_eq!(
        l.suppress
            .bounce_run("x@dest.test")
            .unwrap()
            .map(|r| r.count),
        Some(1)
    );
}

#[test]
fn no_pseudonym_in_sled_keys_and_a_purged_day_names_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), &[]);
    let (q1, q2) = (id(), id());
    let env1 = envelope(
        "sender@shop.test",
        &["r1@dest.test", "r2@dest.test"],
        "shop.test",
        T0,
    );
    l.accepted(q1, &env1, 1, &Signing::default()).unwrap();
    l.outcome(q1, &env1, 0, Outcome::Delivered, &Update::default(), T0 + 1)
        .unwrap();
    let env2 = envelope(
        "sender@shop.test",
        &["r1@dest.test"],
        "shop.test",
        T0 + 2 * DAY,
    );
    l.accepted(q2, &env2, 1, &Signing::default()).unwrap();
    l.sync().unwrap();
    l.flush().unwrap();
    let pseudonyms: Vec<[u8; 32]> = ["r1@dest.test", "r2@dest.test", "sender@shop.test"]
        .iter()
        .map(|a| l.pseudonyms().of(a).0)
        .collect();
    let on_disk = crate::spool_test_support::all_bytes(dir.path());
    for p in &pseudonyms {
        assert!(
            !crate::spool_test_support::contains(&on_disk, p),
            "a pseudonym in sled"
        );
    }
    // Both days are found by address while they are held.
    assert_eq!(l.export("r1@dest.test").unwrap().records.len(), 2);
    assert_eq!(l.export("sender@shop.test").unwrap().records.len(), 3);

    let purged = l.purge(T0 + 31 * DAY).unwrap();
    assert_eq!((purged.records, purged.days.len()), (2, 1));
    let records = l.export("sender@shop.test").unwrap().records;
    assert_eq!(records.len(), 1, "the later day's record remains");
    assert_eq!(records[0].queue_id, q2.to_string());
    drop(l);
    let on_disk = crate::spool_test_support::all_bytes(dir.path());
    for p in &pseudonyms {
        assert!(!crate::spool_test_support::contains(&on_disk, p));
        assert!(!crate::spool_test_support::contains(
            &on_disk,
            hex::encode(p).as_bytes()
        ));
        // The key the records had before tags: day ‖ pseudonym.
        let mut old_key = day_of(T0).into_bytes();
        old_key.extend_from_slice(p);
        assert!(!crate::spool_test_support::contains(&on_disk, &old_key));
    }
}

/// Retention ends with day D+30: the day's key lives as long as its records (not a day less),
/// and the subject index loses exactly the entries of purged records.
#[test]
fn purge_at_the_boundary_and_of_the_subject_index() {
    let dir = tempfile::tempdir().unwrap();
    let l = ledger(dir.path(), &[]);
    let (old, edge) = (id(), id());
    let env = |at| envelope("a@shop.test", &["r@dest.test"], "shop.test", at);
    l.accepted(old, &env(T0), 10, &Signing::default()).unwrap();
    l.accepted(edge, &env(T0 + DAY), 10, &Signing::default())
        .unwrap();

    // On D+30 day D is still within retention: its records and its key stay.
    assert_eq!(l.purge(T0 + 30 * DAY).unwrap(), Purged::default());
    assert!(l.get(old, T0, 0, "r@dest.test").unwrap().is_some());
    assert_eq!(
        l.export("a@shop.test").unwrap().records.len(),
        2,
        "both indexed"
    );

    // On D+31, day D goes; day D+1 (the cutoff day itself) stays, index included.
    let purged = l.purge(T0 + 31 * DAY).unwrap();
    assert_eq!(purged.days, vec![day_of(T0)]);
    let cutoff = day_of(T0 + DAY);
    for item in l.tables.subjects.iter() {
        let (k, _) = item.unwrap();
        assert!(
            k.len() >= 8 && k[..8] >= *cutoff.as_bytes(),
            "an index entry of a purged record is left"
        );
    }
    let left = l.export("r@dest.test").unwrap().records;
    assert_eq!(left.len(), 1, "the cutoff day's record is still found");
    assert_eq!(left[0].queue_id, edge.to_string());
    // The sender's records are found through the index alone.
    let sent = l.export("a@shop.test").unwrap().records;
    assert_eq!(sent.len(), 1, "the cutoff day's index entry is kept");
    assert_eq!(sent[0].queue_id, edge.to_string());
}

/// A ledger whose pseudonym key rotates weekly, under `master`, opened at `now`.
fn weekly(dir: &Path, master: &Key, now: i64) -> Ledger {
    let config = PrivacyConfig {
        pseudonym_rotation: std::time::Duration::from_secs(7 * DAY as u64),
        ..PrivacyConfig::default()
    };
    Ledger::open(dir, master, &config, CACHE, now).unwrap()
}

fn queue_ids(records: &[Record]) -> Vec<String> {
    let mut ids: Vec<String> = records.iter().map(|r| r.queue_id.clone()).collect();
    ids.sort();
    ids
}

/// Mail from before a rotation keeps the old generation's names: a later outcome still finds
/// its record, and export and erase find it beside the new generation's, also after a restart.
#[test]
fn records_from_before_a_rotation_are_updated_exported_and_erased() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let l = weekly(dir.path(), &master, T0);
    let (q1, qs, q2) = (id(), id(), id());
    let env1 = envelope(
        "a@shop.test",
        &["bob@dest.test", "eve@dest.test"],
        "shop.test",
        T0,
    );
    l.accepted(q1, &env1, 1, &Signing::default()).unwrap();
    let as_sender = envelope("bob@dest.test", &["eve@dest.test"], "dest.test", T0);
    l.accepted(qs, &as_sender, 1, &Signing::default()).unwrap();
    let old = l.pseudonyms().of("bob@dest.test");

    assert_eq!(l.rotate(T0 + 6 * DAY).unwrap(), None, "not due yet");
    let start = l.rotate(T0 + 8 * DAY).unwrap();
    assert_eq!(start, Some(day_of(T0 + 9 * DAY)), "from tomorrow");
    assert_eq!(
        l.pseudonyms().of("bob@dest.test"),
        old,
        "today keeps its key"
    );
    assert_eq!(l.rotate(T0 + 9 * DAY).unwrap(), None);
    let new = l.pseudonyms().of("bob@dest.test");
    assert_ne!(new, old, "log lines move to the new generation on its day");

    let env2 = envelope("a@shop.test", &["Bob@dest.test"], "shop.test", T0 + 9 * DAY);
    l.accepted(q2, &env2, 1, &Signing::default()).unwrap();
    l.outcome(
        q1,
        &env1,
        0,
        Outcome::Delivered,
        &Update::default(),
        T0 + 9 * DAY,
    )
    .unwrap();
    let r1 = l.get(q1, T0, 0, "bob@dest.test").unwrap().unwrap();
    assert_eq!(r1.outcome, Outcome::Delivered, "the old record was updated");
    assert_eq!(r1.recipient_pseudonym, Some(old.to_string()));
    let r2 = l
        .get(q2, T0 + 9 * DAY, 0, "bob@dest.test")
        .unwrap()
        .unwrap();
    assert_eq!(r2.recipient_pseudonym, Some(new.to_string()));

    let want = queue_ids(&[r1, r2, l.message_records(qs, T0).unwrap()[0].clone()]);
    assert_eq!(queue_ids(&l.export("bob@dest.test").unwrap().records), want);
    drop(l);
    let l = weekly(dir.path(), &master, T0 + 9 * DAY);
    assert_eq!(
        l.pseudonyms().of("bob@dest.test"),
        new,
        "after a restart too"
    );
    assert_eq!(queue_ids(&l.export("bob@dest.test").unwrap().records), want);
    assert_eq!(l.erase("bob@dest.test").unwrap(), 3);
    assert!(l.export("bob@dest.test").unwrap().records.is_empty());
    assert_eq!(
        queue_ids(&l.export("eve@dest.test").unwrap().records),
        vec![q1.to_string()],
        "eve's record of q1 stays; qs went with its sender"
    );
}

/// The suppression list has a key of its own: an opt-out, and a run of bounces, hold across
/// a rotation and after the generation they were made in is destroyed.
#[test]
fn suppression_holds_across_rotations_and_destroyed_keys() {
    let dir = tempfile::tempdir().unwrap();
    let l = weekly(dir.path(), &Key::generate().unwrap(), T0);
    let old = l.pseudonyms().of("bob@dest.test");
    let entry = l
        .suppress
        .add("bob@dest.test", Reason::Unsubscribe, T0, None)
        .unwrap();
    assert_ne!(
        entry.pseudonym,
        old.to_string(),
        "not named by a key that will be destroyed"
    );
    l.suppress.hard_bounce("x@dest.test", T0 + 8 * DAY).unwrap();
    assert!(l.rotate(T0 + 8 * DAY).unwrap().is_some());
    l.rotate(T0 + 9 * DAY).unwrap();
    assert_ne!(l.pseudonyms().of("bob@dest.test"), old);
    assert!(l
        .suppress
        .check("bob@dest.test", T0 + 9 * DAY)
        .unwrap()
        .is_some());
    l.suppress.hard_bounce("x@dest.test", T0 + 9 * DAY).unwrap();
    assert_eq!(
        l.suppress
            .bounce_run("x@dest.test")
            .unwrap()
            .map(|r| r.count),
        Some(2),
        "the run goes on across the rotation"
    );

    let purged = l.purge(T0 + 40 * DAY).unwrap();
    assert_eq!(purged.pseudonym_keys, vec![day_of(T0)]);
    let kept = l.suppress.check("Bob@dest.test", T0 + 40 * DAY).unwrap();
    assert_eq!(
        kept,
        Some(entry),
        "the opt-out outlives the key it was made under"
    );
}

/// The overlap ends with the last day the old generation named: then its key file goes, no key
/// left computes its pseudonyms, and the same address gets a different pseudonym.
#[test]
fn after_rotation_and_retention_the_old_key_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let master = Key::generate().unwrap();
    let l = weekly(dir.path(), &master, T0);
    let q = id();
    // The old generation's last day: the new one starts the day after.
    let env = envelope("a@shop.test", &["bob@dest.test"], "shop.test", T0 + 8 * DAY);
    l.accepted(q, &env, 1, &Signing::default()).unwrap();
    let old = l.pseudonyms().of("bob@dest.test");
    let new_start = l.rotate(T0 + 8 * DAY).unwrap().unwrap();
    let old_file = dir
        .path()
        .join(format!("ledger/pseudonyms/{}.key", day_of(T0)));
    assert!(old_file.exists());

    // Day T0+8 is still held on T0+38: so is the key that names its records.
    let purged = l.purge(T0 + 38 * DAY).unwrap();
    assert_eq!((purged.records, purged.pseudonym_keys.len()), (0, 0));
    assert!(old_file.exists());
    assert_eq!(l.export("bob@dest.test").unwrap().records.len(), 1);

    let purged = l.purge(T0 + 39 * DAY).unwrap();
    assert_eq!(purged.records, 1);
    assert_eq!(purged.pseudonym_keys, vec![day_of(T0)]);
    assert!(
        !old_file.exists(),
        "the old generation's key file is destroyed"
    );
    drop(l);

    let l = weekly(dir.path(), &master, T0 + 39 * DAY);
    assert_eq!(l.pseudonym_generations(), vec![new_start]);
    for day in [day_of(T0 - DAY), day_of(T0), day_of(T0 + 39 * DAY)] {
        assert_ne!(
            l.pseudonyms_of_day(&day).of("bob@dest.test"),
            old,
            "no key held computes the old pseudonym ({day})"
        );
    }
    assert_ne!(l.pseudonyms().of("bob@dest.test"), old);
    let raw = crate::spool_test_support::all_bytes(dir.path());
    assert!(!crate::spool_test_support::contains(&raw, &old.0));
    assert!(!crate::spool_test_support::contains(
        &raw,
        old.to_string().as_bytes()
    ));
}

/// A data directory from before rotation has one `pseudonym.key`: it becomes the first
/// generation (the records it indexed are still found) and the suppression list's key (its
/// entries still match), and its own file goes. A start interrupted half-way finishes this.
#[test]
fn a_key_from_before_rotation_carries_on() {
    for interrupted in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let master = Key::generate().unwrap();
        let legacy = Key::generate().unwrap();
        let ledger_dir = dir.path().join("ledger");
        std::fs::create_dir_all(&ledger_dir).unwrap();
        let legacy_file = ledger_dir.join("pseudonym.key");
        master
            .write_wrapped(&legacy_file, "postern pseudonym key", &legacy)
            .unwrap();
        if interrupted {
            let id_file = ledger_dir.join("suppress-id.key");
            master
                .write_wrapped(&id_file, "postern suppression identity key", &legacy)
                .unwrap();
        }
        let before = Pseudonymizer::new(&legacy, true).of("bob@dest.test");
        let l = weekly(dir.path(), &master, T0);
        assert!(!legacy_file.exists(), "{interrupted}");
        for day in [day_of(T0 - 100 * DAY), day_of(T0)] {
            assert_eq!(l.pseudonyms_of_day(&day).of("bob@dest.test"), before);
        }
        let entry = l
            .suppress
            .add("bob@dest.test", Reason::Manual, T0, None)
            .unwrap();
        assert_eq!(entry.pseudonym, before.to_string(), "{interrupted}");
        drop(l);
        let l = weekly(dir.path(), &master, T0);
        assert_eq!(l.pseudonyms().of("bob@dest.test"), before);
        assert!(l.suppress.check("bob@dest.test", T0).unwrap().is_some());
    }
}
