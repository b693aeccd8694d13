//! Spool throughput: acknowledged messages per second with many concurrent writers, against
//! the naive durable design (one file per message, fsync'd and renamed into place).
//!
//! Not a criterion benchmark: a plain program that prints figures.
//!
//! ```text
//! cargo bench --bench spool
//! cargo bench --bench spool -- --writers 50 --seconds 5 --warmup 1 --size 4096
//! ```
//!
//! Both designs run in the same process, one after the other, with the same number of writers,
//! body size, warm-up and measuring window. Only operations that *complete* inside the window
//! count; their latency is measured from the call to its (durable) return.
//!
//! # Where the files go
//! Under `CARGO_TARGET_TMPDIR` (`target/tmp/`), i.e. on the crate's own filesystem, never in
//! `/tmp`: on many systems `/tmp` is a tmpfs, where fsync costs nothing and both designs would
//! look equally fast. (On the machine this was written on, `stat -f /tmp` and `df /tmp` show
//! `/tmp` on the same ext4 root device, `/dev/vda`, as the crate, but that is not something to
//! rely on.) The program prints the filesystem type it measured on and warns if it is tmpfs.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use postern::crypto::Key;
use postern::spool::{Envelope, QueueId, Spool};

/// The daemon's default `spool.segment_size`.
const DEFAULT_SEGMENT_SIZE: u64 = 64 << 20;

const TMPFS_MAGIC: u64 = 0x0102_1994;

struct Args {
    writers: usize,
    seconds: f64,
    warmup: f64,
    size: usize,
    segment_size: u64,
}

const USAGE: &str = "usage: cargo bench --bench spool -- [--writers N] [--seconds S] [--warmup S] \
                     [--size BYTES] [--segment-mb MIB]";

fn parse_args() -> Args {
    let mut args = Args {
        writers: 50,
        seconds: 5.0,
        warmup: 1.0,
        size: 4096,
        segment_size: DEFAULT_SEGMENT_SIZE,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let mut value = |name: &str| -> String {
            inline
                .clone()
                .or_else(|| it.next())
                .unwrap_or_else(|| fail(&format!("{name} needs a value")))
        };
        match name.as_str() {
            // cargo bench passes --bench to every harness = false target.
            "--bench" => {}
            "--writers" => args.writers = number(&name, &value(&name)),
            "--seconds" => args.seconds = number(&name, &value(&name)),
            "--warmup" => args.warmup = number(&name, &value(&name)),
            "--size" => args.size = number(&name, &value(&name)),
            "--segment-mb" => args.segment_size = number::<u64>(&name, &value(&name)) << 20,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other if other.starts_with('-') => fail(&format!("unknown option {other}")),
            // A benchmark name filter (`cargo bench -- foo`): there is only one benchmark.
            _ => {}
        }
    }
    if args.writers == 0 || args.seconds <= 0.0 || args.warmup < 0.0 || args.size == 0 {
        fail("--writers, --seconds and --size must be positive, --warmup not negative");
    }
    args
}

fn number<T: std::str::FromStr>(name: &str, value: &str) -> T {
    value
        .parse()
        .unwrap_or_else(|_| fail(&format!("{name}: not a number: {value}")))
}

fn fail(msg: &str) -> ! {
    eprintln!("spool bench: {msg}\n{USAGE}");
    std::process::exit(2);
}

/// The envelope an application submitting over SMTP AUTH would produce.
fn envelope() -> Envelope {
    Envelope {
        mail_from: "notifications@app.example.com".into(),
        recipients: vec!["jane.doe@example.org".into()],
        received_at: chrono::Utc::now().timestamp(),
        client_ip: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 17)),
        helo: "app-7.internal.example.com".into(),
        auth_user: Some("app".into()),
        eight_bit: false,
        smtputf8: false,
        sending_domain: String::new(),
    }
}

/// A plausible RFC 5322 message with CRLF line endings, exactly `size` bytes long: the
/// `Received:` trace header (the first part, as the session hands it to the spool) and the
/// message as received.
fn message(size: usize) -> (Vec<u8>, Vec<u8>) {
    let trace = b"Received: from app-7.internal.example.com ([192.0.2.17])\r\n\
        \tby mx.example.com (Postern) with ESMTPSA id 0190f3a2b7c4e5d6a7b8c9d0e1f2a3b4\r\n\
        \tfor <jane.doe@example.org>; Tue, 4 Jun 2024 09:12:44 +0000\r\n"
        .to_vec();
    let mut body = b"From: Example App <notifications@app.example.com>\r\n\
        To: Jane Doe <jane.doe@example.org>\r\n\
        Subject: Your weekly activity summary\r\n\
        Date: Tue, 4 Jun 2024 09:12:43 +0000\r\n\
        Message-ID: <20240604091243.5f1c2e@app.example.com>\r\n\
        MIME-Version: 1.0\r\n\
        Content-Type: text/plain; charset=us-ascii\r\n\
        Content-Transfer-Encoding: 7bit\r\n\
        \r\n"
        .to_vec();
    let line =
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n";
    let want = size.saturating_sub(trace.len());
    while body.len() < want {
        body.extend_from_slice(line);
    }
    body.truncate(want);
    if body.len() >= 2 {
        let n = body.len();
        body[n - 2..].copy_from_slice(b"\r\n");
    }
    let mut trace = trace;
    trace.truncate(size);
    (trace, body)
}

/// The phases of one run, shared by every writer.
#[derive(Clone, Copy)]
struct Window {
    /// Measuring starts here (after the warm-up)...
    start: Instant,
    /// ...and ends here; no new operation begins after it.
    end: Instant,
}

impl Window {
    fn new(args: &Args) -> Window {
        let start = Instant::now() + Duration::from_secs_f64(args.warmup);
        Window {
            start,
            end: start + Duration::from_secs_f64(args.seconds),
        }
    }

    fn contains(&self, t: Instant) -> bool {
        t >= self.start && t < self.end
    }
}

/// What one design achieved inside the window.
struct Outcome {
    /// Latencies (call to durable return) of the operations completed in the window.
    latencies: Vec<Duration>,
    window: Duration,
    errors: u64,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.window.as_secs_f64()
    }

    fn print(&mut self, label: &str, size: usize) {
        self.latencies.sort_unstable();
        let rate = self.rate();
        println!(
            "{label:<26} {rate:>9.0} msg/s  {:>7.1} MiB/s  p50 {:>6.2} ms  p99 {:>7.2} ms  ({} messages in {:.1} s{})",
            rate * size as f64 / (1024.0 * 1024.0),
            ms(percentile(&self.latencies, 0.50)),
            ms(percentile(&self.latencies, 0.99)),
            self.latencies.len(),
            self.window.as_secs_f64(),
            if self.errors > 0 {
                format!(", {} ERRORS", self.errors)
            } else {
                String::new()
            },
        );
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The spool with group commit: `writers` tasks, each storing one message after another.
fn bench_spool(args: &Args, root: &Path, trace: &[u8], body: &[u8]) -> (Outcome, usize) {
    let data_dir = root.join("spool-data");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let (spool, _report) = Spool::open(&data_dir, Key::generate().expect("key"), args.segment_size)
        .expect("open spool");
    let trace: Arc<[u8]> = trace.into();
    let body: Arc<[u8]> = body.into();
    let errors = Arc::new(AtomicU64::new(0));
    let window = Window::new(args);

    let latencies = runtime.block_on(async {
        let mut tasks = Vec::with_capacity(args.writers);
        for _ in 0..args.writers {
            let spool = spool.clone();
            let (trace, body, errors) = (trace.clone(), body.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                while Instant::now() < window.end {
                    // Per message, as a session does: an id, then the envelope.
                    let id = QueueId::generate().expect("queue id");
                    let envelope = envelope();
                    let t0 = Instant::now();
                    let result = spool.store(id, &envelope, &[&trace[..], &body[..]]).await;
                    let t1 = Instant::now();
                    if !window.contains(t1) {
                        continue;
                    }
                    match result {
                        Ok(()) => latencies.push(t1 - t0),
                        Err(e) => {
                            if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("spool store failed: {e}");
                            }
                        }
                    }
                }
                latencies
            }));
        }
        let mut all = Vec::new();
        for task in tasks {
            all.extend(task.await.expect("writer task"));
        }
        all
    });

    let segments = std::fs::read_dir(spool.dir())
        .expect("read spool dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "seg"))
        .count();
    drop(spool);
    runtime.shutdown_timeout(Duration::from_secs(5));
    let outcome = Outcome {
        latencies,
        window: window.end - window.start,
        errors: errors.load(Ordering::Relaxed),
    };
    (outcome, segments)
}

/// The naive durable design: each message in a file of its own, written to a temporary name,
/// fsync'd, renamed into place and made durable by an fsync of the directory. Sealed with the
/// same cipher as the spool so that both do the same work apart from the I/O pattern.
fn bench_file_per_message(args: &Args, root: &Path, trace: &[u8], body: &[u8]) -> Outcome {
    let dir: Arc<PathBuf> = Arc::new(root.join("file-per-message"));
    std::fs::create_dir_all(&*dir).expect("create baseline dir");
    let key = Arc::new(Key::generate().expect("key"));
    let trace: Arc<[u8]> = trace.into();
    let body: Arc<[u8]> = body.into();
    let errors = Arc::new(AtomicU64::new(0));
    let window = Window::new(args);

    let threads: Vec<_> = (0..args.writers)
        .map(|_| {
            let (dir, key, trace, body, errors) = (
                dir.clone(),
                key.clone(),
                trace.clone(),
                body.clone(),
                errors.clone(),
            );
            std::thread::spawn(move || {
                let mut latencies = Vec::new();
                while Instant::now() < window.end {
                    let id = QueueId::generate().expect("queue id");
                    let envelope = envelope();
                    let t0 = Instant::now();
                    let result = store_file(&dir, &key, id, &envelope, &trace, &body);
                    let t1 = Instant::now();
                    if !window.contains(t1) {
                        continue;
                    }
                    match result {
                        Ok(()) => latencies.push(t1 - t0),
                        Err(e) => {
                            if errors.fetch_add(1, Ordering::Relaxed) == 0 {
                                eprintln!("file-per-message store failed: {e}");
                            }
                        }
                    }
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for thread in threads {
        latencies.extend(thread.join().expect("writer thread"));
    }
    Outcome {
        latencies,
        window: window.end - window.start,
        errors: errors.load(Ordering::Relaxed),
    }
}

fn store_file(
    dir: &Path,
    key: &Key,
    id: QueueId,
    envelope: &Envelope,
    trace: &[u8],
    body: &[u8],
) -> std::io::Result<()> {
    use std::io::Write;

    let env = serde_json::to_vec(envelope)?;
    let mut plain = Vec::with_capacity(4 + env.len() + trace.len() + body.len());
    plain.extend_from_slice(&(env.len() as u32).to_le_bytes());
    plain.extend_from_slice(&env);
    plain.extend_from_slice(trace);
    plain.extend_from_slice(body);
    let sealed = key
        .seal(&id.0, &plain)
        .map_err(|e| std::io::Error::other(e.to_string()))?;

    let tmp = dir.join(format!("{id}.tmp"));
    let dst = dir.join(format!("{id}.msg"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?;
    file.write_all(&sealed)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, &dst)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The filesystem type of `path`, for the report.
fn fs_type(path: &Path) -> Option<u64> {
    rustix::fs::statfs(path).ok().map(|s| s.f_type as u64)
}

fn main() {
    let args = parse_args();
    let root = tempfile::Builder::new()
        .prefix("postern-spool-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temp dir under CARGO_TARGET_TMPDIR");
    let (trace, body) = message(args.size);

    let fs = fs_type(root.path());
    println!(
        "spool bench: {} writers, {} B messages, {:.1} s warm-up + {:.1} s measured, segments of {} MiB",
        args.writers,
        args.size,
        args.warmup,
        args.seconds,
        args.segment_size >> 20
    );
    println!(
        "directory: {} (filesystem type {})",
        root.path().display(),
        fs.map_or("unknown".into(), |t| format!("{t:#x}"))
    );
    if fs == Some(TMPFS_MAGIC) {
        println!("WARNING: this is tmpfs; fsync is free here and the comparison means nothing");
    }
    println!();

    let (mut spool, segments) = bench_spool(&args, root.path(), &trace, &body);
    spool.print("spool (group commit):", args.size);
    println!("{:<26} {segments} segment file(s)", "");

    let mut naive = bench_file_per_message(&args, root.path(), &trace, &body);
    naive.print("file per message + fsync:", args.size);

    if naive.rate() > 0.0 {
        println!("ratio: {:.1}x", spool.rate() / naive.rate());
    } else {
        println!("ratio: n/a (the baseline completed nothing in the window)");
    }
}
