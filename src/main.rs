//! The `postern` command: a thin CLI over the library.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use postern::config::Config;
use postern::daemon::Daemon;

#[derive(Parser)]
#[command(
    name = "postern",
    version,
    about = "Postern: an outbound mail transfer agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the MTA (the embedded defaults when no --config is given).
    Serve {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validates a configuration file; names the bad key and why.
    CheckConfig {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// SMTP accounts.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
    },
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Reads a password from standard input and prints its argon2 hash for `[[account]]`.
    Hash,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => check_config(config),
        Command::Account {
            command: AccountCommand::Hash,
        } => hash_password(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("postern: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: Option<PathBuf>) -> anyhow::Result<Config> {
    Ok(match path {
        Some(p) => Config::load(&p)?,
        None => Config::embedded()?,
    })
}

fn check_config(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    println!(
        "{}: OK ({} listener(s), data in {})",
        path.display(),
        config.listeners.len(),
        config.data_dir().display()
    );
    Ok(())
}

fn hash_password() -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let password = line.trim_end_matches(['\r', '\n']);
    anyhow::ensure!(!password.is_empty(), "no password on standard input");
    println!("{}", postern::auth::hash_password(password)?);
    Ok(())
}

fn serve(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = load(path)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async move {
        // Handling SIGXFSZ turns "file size limit exceeded" into a write error (answered with a
        // 4xx) instead of killing the daemon mid-transaction.
        let _xfsz = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(25));
        let daemon = Daemon::start(config).await?;
        let report = &daemon.recovery;
        tracing::info!(
            recovered = report.recovered,
            segments = report.segments,
            quarantined = report.quarantined.len(),
            "spool recovered"
        );
        for (addr, mode) in daemon.local_addrs() {
            tracing::info!(%addr, ?mode, "listening");
        }
        let shutdown = daemon.shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let (Ok(mut term), Ok(mut int)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) else {
                return;
            };
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutting down: no new connections, finishing open transactions");
            shutdown.cancel();
        });
        daemon.run(Duration::from_secs(30)).await;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
}
