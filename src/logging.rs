//! Where log lines go and what they look like.
//!
//! - Under systemd (`JOURNAL_STREAM` set, standard error connected to the journal): no
//!   timestamp (journald adds its own) and a `<N>` syslog priority prefix on each line, which
//!   journald turns into the entry's level, so `journalctl -p warning` works.
//! - `log_format = "json"`: one JSON object per line, for log shippers.
//! - Otherwise human-readable lines with timestamps.
//!
//! `RUST_LOG` chooses what is logged (default `info`).

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
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
        .with_writer(std::io::stderr)
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
