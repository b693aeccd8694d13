//! Where log lines go and what they look like.
//!
//! - Under systemd (`JOURNAL_STREAM` set, standard error connected to the journal): no
//!   timestamp (journald adds its own) and a `<N>` syslog priority prefix on each line, which
//!   journald turns into the entry's level, so `journalctl -p warning` works.
//! - `log_format = "json"`: one JSON object per line, for log shippers.
//! - Otherwise human-readable lines with timestamps.
//!
//! `RUST_LOG` chooses what is logged (default `info`).
//!
//! Output is batched ([`Batched`]): a busy daemon logs a couple of lines per message, and a
//! `write(2)` per line was a measurable part of what a message costs. Lines at INFO and below
//! collect in memory and a thread writes them out together at most [`FLUSH_EVERY`] later;
//! WARN and ERROR lines go out at once, after everything logged before them. [`flush`] writes
//! what is pending; the daemon calls it as it exits, and a panic does too.

use std::fmt;
use std::io::Write;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tracing::{Event, Level, Metadata, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Call once, early.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !journal && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(Batched::start())
        .with_ansi(ansi);
    // A second init (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text if journal => builder
            .event_format(JournalPrefix(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_level(false),
            ))
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Puts the syslog priority (`<3>` error .. `<7>` debug) in front of each line.
struct JournalPrefix<F>(F);

/// sd-daemon(3) priorities.
fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

impl<S, N, F> FormatEvent<S, N> for JournalPrefix<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// The longest a line waits in memory before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(25);
/// Pending bytes that are written at once, without waiting for [`FLUSH_EVERY`].
const FLUSH_AT: usize = 64 << 10;

/// Lines waiting to be written to standard error, and the lock that keeps writes in order.
struct Output {
    pending: Mutex<Vec<u8>>,
    /// Told when lines arrive in an empty buffer, or the buffer passes [`FLUSH_AT`].
    arrived: Condvar,
    /// Held across each write(2), taken while `pending` is still held: batches reach standard
    /// error in the order their lines were logged.
    stderr: Mutex<()>,
    /// Set once the flusher thread runs; until then (or if it cannot start) lines are written
    /// at once.
    flusher: std::sync::atomic::AtomicBool,
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Output {
    /// Writes `batch` to standard error; `pending` is released only once the write lock is
    /// held. Errors are dropped: there is nowhere left to report them.
    fn write_out(&self, batch: &[u8], pending: MutexGuard<'_, Vec<u8>>) {
        let _order = lock(&self.stderr);
        drop(pending);
        let _ = std::io::stderr().lock().write_all(batch);
    }

    /// The flusher thread: waits for lines, gives them [`FLUSH_EVERY`] to gather, writes them.
    fn run(&self) {
        let mut pending = lock(&self.pending);
        loop {
            while pending.is_empty() {
                pending = self
                    .arrived
                    .wait(pending)
                    .unwrap_or_else(|p| p.into_inner());
            }
            if pending.len() < FLUSH_AT {
                pending = self
                    .arrived
                    .wait_timeout(pending, FLUSH_EVERY)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            let batch = std::mem::take(&mut *pending);
            self.write_out(&batch, pending);
            pending = lock(&self.pending);
        }
    }
}

/// Writes what is pending now (at exit; a panic does it too).
pub fn flush() {
    if let Some(out) = OUTPUT.get() {
        let mut pending = lock(&out.pending);
        let batch = std::mem::take(&mut *pending);
        out.write_out(&batch, pending);
    }
}

/// The subscriber's writer: see the module's documentation.
#[derive(Clone, Copy)]
pub struct Batched(&'static Output);

impl Batched {
    /// The batched writer, starting its flusher thread the first time. Without a thread (none
    /// could be started), lines are written at once.
    fn start() -> Batched {
        let mut started = false;
        let out = OUTPUT.get_or_init(|| {
            started = true;
            Output {
                pending: Mutex::new(Vec::new()),
                arrived: Condvar::new(),
                stderr: Mutex::new(()),
                flusher: std::sync::atomic::AtomicBool::new(false),
            }
        });
        if started {
            let spawned = std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || out.run());
            match spawned {
                Ok(_) => out
                    .flusher
                    .store(true, std::sync::atomic::Ordering::Release),
                Err(_) => {
                    eprintln!("postern: cannot start the log writer thread; logging unbatched")
                }
            }
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                flush();
                previous(info);
            }));
        }
        Batched(out)
    }
}

/// One event's output: appended to the pending lines, or written at once with them (WARN and
/// ERROR).
pub struct Line {
    out: &'static Output,
    urgent: bool,
}

impl<'a> MakeWriter<'a> for Batched {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line {
            out: self.0,
            urgent: false,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Line {
        Line {
            out: self.0,
            urgent: *meta.level() <= Level::WARN,
        }
    }
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut pending = lock(&self.out.pending);
        let was_empty = pending.is_empty();
        pending.extend_from_slice(buf);
        if self.urgent || !self.out.flusher.load(std::sync::atomic::Ordering::Acquire) {
            let batch = std::mem::take(&mut *pending);
            self.out.write_out(&batch, pending);
        } else if was_empty || pending.len() >= FLUSH_AT {
            self.out.arrived.notify_one();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
