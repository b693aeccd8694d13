//! Builds a spool of many queued messages directly, for `benches/restart.sh` to time a restart
//! over it. Not a benchmark itself: it prints what it wrote.
//!
//! ```text
//! cargo bench --bench spool_fill -- --data-dir DIR --messages 1000000 [--size 4096]
//!     [--deferred]
//! ```
//!
//! The messages go through [`Spool::store`], so the spool holds exactly what the daemon writes
//! (sealed records, group-committed segments), under `DIR/spool` with the master key at
//! `DIR/master.key` (the daemon's default place for it). Every message has one recipient at
//! `bench.invalid`. With `--deferred`, each also gets the state record of one failed attempt
//! (a retry state with a last status and diagnostic, next attempt in an hour), as a queue
//! holds after an outage: a restart must then read a state record per message too.
//!
//! `--reopen` writes nothing: it opens the spool in DIR (recovery alone, without the rest of the
//! daemon's start) and prints how long that took and the process's resident memory after it.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern::crypto::load_or_create_master_key;
use postern::queue::Schedule;
use postern::spool::{Envelope, QueueData, QueueId, Spool};

struct Args {
    data_dir: PathBuf,
    messages: usize,
    size: usize,
    deferred: bool,
    reopen: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        data_dir: PathBuf::new(),
        messages: 100_000,
        size: 4096,
        deferred: false,
        reopen: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .unwrap_or_else(|| usage(&format!("{a} needs a value")))
        };
        match a.as_str() {
            "--data-dir" => args.data_dir = PathBuf::from(value()),
            "--messages" => args.messages = value().parse().unwrap_or_else(|_| usage("--messages")),
            "--size" => args.size = value().parse().unwrap_or_else(|_| usage("--size")),
            "--deferred" => args.deferred = true,
            "--reopen" => args.reopen = true,
            "--bench" => {}
            other => usage(&format!("unknown argument {other}")),
        }
    }
    if args.data_dir.as_os_str().is_empty() {
        usage("--data-dir is required");
    }
    args
}

fn usage(why: &str) -> ! {
    eprintln!("spool_fill: {why}\nusage: spool_fill --data-dir DIR [--messages N] [--size BYTES] [--deferred] [--reopen]");
    std::process::exit(2);
}

fn envelope(n: usize, now: i64) -> Envelope {
    Envelope {
        mail_from: "notifications@app.example.com".into(),
        recipients: vec![format!("user{n}@bench.invalid")],
        received_at: now,
        client_ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)),
        helo: "app-7.internal.example.com".into(),
        auth_user: None,
        eight_bit: false,
        smtputf8: false,
        sending_domain: "app.example.com".into(),
    }
}

/// The retry state after one failed attempt, due again in an hour.
fn deferred_state(now: i64) -> Vec<u8> {
    let mut sched = Schedule::new(1);
    sched.deferred(
        0,
        now,
        &[Duration::from_secs(3600)],
        now + 5 * 86400,
        postern::queue::Failure {
            status: "4.4.1",
            diagnostic: "smtp; 421 4.4.1 connection refused by mx.bench.invalid",
            remote: Some("mx.bench.invalid[127.0.0.1]"),
        },
    );
    sched.encode()
}

fn body(size: usize, n: usize) -> Vec<u8> {
    let mut b = format!(
        "From: <notifications@app.example.com>\r\nTo: <user{n}@bench.invalid>\r\n\
         Subject: restart bench {n}\r\nMessage-ID: <{n}@app.example.com>\r\n\r\n"
    )
    .into_bytes();
    while b.len() < size {
        b.extend_from_slice(b"The quick brown fox jumps over the lazy dog, again and again.\r\n");
    }
    b
}

async fn fill(spool: Spool, args: &Args) -> Result<(), String> {
    let now = chrono::Utc::now().timestamp();
    let state = args.deferred.then(|| QueueData {
        data: deferred_state(now),
        due: now + 3600,
    });
    // Enough stores in flight for full group commits (the writer takes up to 4,096 a pass).
    let limit = Arc::new(tokio::sync::Semaphore::new(2048));
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..args.messages {
        let permit = limit
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (spool, state, size) = (spool.clone(), state.clone(), args.size);
        tasks.spawn(async move {
            let _permit = permit;
            let id = QueueId::generate().map_err(|e| e.to_string())?;
            let body = body(size, n);
            spool
                .store(id, &envelope(n, now), &[&body])
                .await
                .map_err(|e| e.to_string())?;
            if let Some(state) = state {
                spool
                    .update(id, &[], Some(state))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        });
        while let Some(done) = tasks.try_join_next() {
            done.map_err(|e| e.to_string())??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// This process's resident memory (VmRSS) in MiB.
fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    kib.unwrap_or(0) / 1024
}

fn main() {
    let args = parse_args();
    let started = Instant::now();
    let master = load_or_create_master_key(&args.data_dir.join("master.key"))
        .unwrap_or_else(|e| usage(&format!("master key: {e}")));
    let (spool, report) = Spool::open(&args.data_dir, master, 64 << 20)
        .unwrap_or_else(|e| usage(&format!("cannot open the spool: {e}")));
    if args.reopen {
        println!(
            "spool_fill: recovered {} messages from {} segments in {:.2} s; RSS {} MiB",
            report.recovered,
            report.segments,
            started.elapsed().as_secs_f64(),
            rss_mib()
        );
        return;
    }
    let runtime = tokio::runtime::Runtime::new().unwrap_or_else(|e| usage(&e.to_string()));
    if let Err(e) = runtime.block_on(fill(spool.clone(), &args)) {
        usage(&format!("store failed: {e}"));
    }
    let live = spool.live().len();
    println!(
        "spool_fill: {live} messages of {} bytes{} in {}/spool, written in {:.1} s",
        args.size,
        if args.deferred {
            " (deferred once)"
        } else {
            ""
        },
        args.data_dir.display(),
        started.elapsed().as_secs_f64()
    );
}
