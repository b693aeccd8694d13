//! The `postern` command: a thin CLI over the library.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use postern::config::Config;
use postern::daemon::Daemon;
use postern::notify::Notifier;

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
    /// SMTP accounts in the accounts file (`server.accounts_file`); SIGHUP makes the
    /// running daemon read it again.
    Account {
        #[command(subcommand)]
        command: AccountCommand,
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// DKIM keys.
    Dkim {
        #[command(subcommand)]
        command: DkimCommand,
    },
    /// Data subjects' rights and the record of processing (through the running daemon).
    Privacy {
        #[command(subcommand)]
        command: PrivacyCommand,
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// The suppression list (through the running daemon).
    Suppress {
        #[command(subcommand)]
        command: SuppressCommand,
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// The delivery queue (through the running daemon). `mailq` prints `queue list`.
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
        #[arg(long, short, global = true)]
        config: Option<PathBuf>,
    },
    /// Prints the DNS records to publish for a sending domain: DKIM, SPF, DMARC.
    DnsRecords {
        #[arg(long)]
        domain: String,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum PrivacyCommand {
    /// Prints every ledger record about ADDRESS (as recipient or sender), its suppression
    /// entry and its run of hard bounces, as JSON.
    Export { address: String },
    /// Removes ADDRESS's records, bounce run and queued deliveries; its suppression entry stays.
    Erase { address: String },
    /// Settings in force and what is stored, for a record of processing activities.
    Report,
    /// Runs the retention pass now (the daemon runs it hourly): what is older than
    /// `privacy.retention_days` goes, e.g. after lowering it.
    Purge,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Messages waiting, oldest first: id, age, size, pending recipients, domains.
    List {
        /// Only messages with a pending recipient at this domain.
        #[arg(long)]
        domain: Option<String>,
        /// Only messages in this state: queued, active, deferred or held.
        #[arg(long)]
        state: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Messages per destination domain and age bucket (like Postfix's qshape).
    Summary,
    /// One message: envelope and attempts per recipient, pseudonymous as in the logs (JSON).
    Show { id: String },
    /// Tries messages now: ID, every message for --domain, or the whole queue.
    Flush {
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        domain: Option<String>,
    },
    /// Stops trying a message until it is released (survives restarts).
    Hold { id: String },
    /// Lifts a hold; the message is tried at once.
    Release { id: String },
    /// Removes a message: its body is destroyed, its recipients recorded as cancelled.
    Delete { id: String },
    /// Returns a message to its sender with a failure notice, then removes it.
    Bounce { id: String },
}

#[derive(Subcommand)]
enum SuppressCommand {
    /// Stops all mail to ADDRESS.
    Add {
        address: String,
        /// unsubscribe, complaint, hard-bounce or manual.
        #[arg(long, default_value = "manual")]
        reason: String,
        /// Lift the entry after this long (e.g. 90d); default never.
        #[arg(long)]
        expires: Option<humantime::Duration>,
    },
    Remove {
        address: String,
    },
    /// Lists entries (pseudonyms; addresses are never stored).
    List,
    /// Adds every address in FILE (one per line, optional ",reason"), or restores an export (JSON).
    Import {
        file: PathBuf,
    },
    /// Prints all entries as JSON, for backup or a move to another host.
    Export,
}

#[derive(Subcommand)]
enum DkimCommand {
    /// Generates a signing key (mode 0600) and prints the TXT record to publish.
    Keygen {
        #[arg(long)]
        domain: String,
        #[arg(long)]
        selector: String,
        /// ed25519 or rsa (2048 bits).
        #[arg(long, default_value = "ed25519")]
        algorithm: String,
        /// Where to write the key; default keys/DOMAIN.SELECTOR.pem.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum AccountCommand {
    /// Reads a password from standard input and prints its argon2id hash for `[[account]]`.
    Hash,
    /// Adds an account; the password is asked for (or read from standard input).
    Add {
        name: String,
        /// A network it may log in from (CIDR; repeat for more); default anywhere.
        #[arg(long = "allowed-ip")]
        allowed_ips: Vec<ipnet::IpNet>,
        /// A domain it may send from (repeat for more); default any.
        #[arg(long = "sender-domain")]
        sender_domains: Vec<String>,
    },
    /// Sets a new password for an account.
    Passwd { name: String },
    /// Removes an account.
    Remove { name: String },
    /// Lists the accounts of the accounts file and the configuration, without hashes.
    List,
}

fn main() -> ExitCode {
    // Called as `sendmail`/`mailq` (a symlink, as /usr/sbin/sendmail) or `postern sendmail`:
    // sendmail's own command line, which clap's conventions do not fit.
    let args: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let called = args
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("postern");
    let (personality, rest) = match (called, args.get(1).map(String::as_str)) {
        ("sendmail" | "mailq" | "newaliases", _) => (called, &args[1..]),
        (_, Some(sub @ ("sendmail" | "mailq"))) => (sub, &args[2..]),
        _ => ("postern", &args[..0]),
    };
    match personality {
        "sendmail" => return ExitCode::from(postern::sendmail::main(rest) as u8),
        "mailq" => {
            let mut with_bp = vec!["-bp".to_string()];
            with_bp.extend_from_slice(rest);
            return ExitCode::from(postern::sendmail::main(&with_bp) as u8);
        }
        "newaliases" => return ExitCode::SUCCESS,
        _ => {}
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => serve(config),
        Command::CheckConfig { config } => check_config(config),
        Command::Account {
            command: AccountCommand::Hash,
            ..
        } => hash_password(),
        Command::Account { command, config } => account(config, command),
        Command::Dkim {
            command:
                DkimCommand::Keygen {
                    domain,
                    selector,
                    algorithm,
                    out,
                },
        } => keygen(&domain, &selector, &algorithm, out),
        Command::DnsRecords { domain, config } => dns_records(config, &domain),
        Command::Privacy { command, config } => privacy(config, command),
        Command::Suppress { command, config } => suppress(config, command),
        Command::Queue { command, config } => queue(config, command),
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

/// Reads a password: from a prompt without echo on a terminal, else one line of stdin.
fn read_password() -> anyhow::Result<String> {
    use std::io::{IsTerminal, Write};
    let terminal = std::io::stdin().is_terminal();
    let stty = |arg: &str| {
        let _ = std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .status();
    };
    if terminal {
        eprint!("Password: ");
        std::io::stderr().flush()?;
        stty("-echo");
    }
    let mut line = String::new();
    let read = std::io::stdin().lock().read_line(&mut line);
    if terminal {
        stty("echo");
        eprintln!();
    }
    read?;
    let password = line.trim_end_matches(['\r', '\n']).to_string();
    anyhow::ensure!(!password.is_empty(), "empty password");
    Ok(password)
}

/// Edits the accounts file: read, change, validate with the configuration's own accounts,
/// then replace it atomically (mode 0600).
fn account(config: Option<PathBuf>, command: AccountCommand) -> anyhow::Result<()> {
    use postern::config::{validate_accounts, AccountConfig, AccountsFile};
    let config = load(config)?;
    let path = config.server.accounts_file.as_ref().map(|p| config.path(p));
    let path =
        path.ok_or_else(|| anyhow::anyhow!("set server.accounts_file in the configuration first"))?;
    let mut file = AccountsFile::load(&path)?;
    // Config::parse appends the file's accounts after the configuration's own.
    let inline = config.accounts.len() - file.accounts.len();
    let position = |file: &AccountsFile, name: &str| {
        file.accounts
            .iter()
            .position(|a| a.username == name)
            .ok_or_else(|| anyhow::anyhow!("no account {name:?} in {}", path.display()))
    };
    match command {
        AccountCommand::Hash => unreachable!("handled in main"),
        AccountCommand::List => {
            list_accounts(&config.accounts);
            return Ok(());
        }
        AccountCommand::Add {
            name,
            allowed_ips,
            sender_domains,
        } => {
            anyhow::ensure!(
                !config.accounts.iter().any(|a| a.username == name),
                "account {name:?} already exists"
            );
            file.accounts.push(AccountConfig {
                username: name,
                password_hash: postern::auth::hash_password(&read_password()?)?,
                allowed_ips,
                sender_domains,
                ..Default::default()
            });
        }
        AccountCommand::Passwd { name } => {
            let i = position(&file, &name)?;
            file.accounts[i].password_hash = postern::auth::hash_password(&read_password()?)?;
        }
        AccountCommand::Remove { name } => {
            let i = position(&file, &name)?;
            file.accounts.remove(i);
        }
    }
    let mut all = config.accounts[..inline].to_vec();
    all.extend(file.accounts.iter().cloned());
    validate_accounts(&all)?;
    write_private(&path, &file.to_toml()?)?;
    println!(
        "{} updated; send SIGHUP to the daemon to apply",
        path.display()
    );
    Ok(())
}

fn list_accounts(accounts: &[postern::config::AccountConfig]) {
    for a in accounts {
        let ips: Vec<String> = a.allowed_ips.iter().map(|n| n.to_string()).collect();
        println!(
            "{}\tallowed_ips=[{}]\tsender_domains=[{}]",
            a.username,
            ips.join(","),
            a.sender_domains.join(",")
        );
    }
}

/// Writes `text` to `path` through a temporary file and a rename, mode 0600.
fn write_private(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Sends one request to the running daemon's admin socket and prints the answer.
fn admin(
    config: Option<PathBuf>,
    request: postern::admin::Request,
) -> anyhow::Result<serde_json::Value> {
    let config = load(config)?;
    let socket = config.data_dir().join("admin.sock");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    Ok(runtime.block_on(postern::admin::request(&socket, &request))?)
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn privacy(config: Option<PathBuf>, command: PrivacyCommand) -> anyhow::Result<()> {
    use postern::admin::Request;
    let request = match command {
        PrivacyCommand::Export { address } => Request::Export { address },
        PrivacyCommand::Erase { address } => Request::Erase { address },
        PrivacyCommand::Report => Request::Report,
        PrivacyCommand::Purge => Request::Purge,
    };
    print_json(&admin(config, request)?)
}

fn suppress(config: Option<PathBuf>, command: SuppressCommand) -> anyhow::Result<()> {
    use postern::admin::Request;
    use postern::suppress::Reason;
    let reason = |r: &str| {
        Reason::parse(r).ok_or_else(|| {
            anyhow::anyhow!("unknown reason {r:?}: unsubscribe, complaint, hard-bounce or manual")
        })
    };
    let request = match command {
        SuppressCommand::Add {
            address,
            reason: r,
            expires,
        } => Request::SuppressAdd {
            address,
            reason: reason(&r)?,
            expires_at: expires.map(|d| {
                chrono::Utc::now().timestamp() + std::time::Duration::from(d).as_secs() as i64
            }),
        },
        SuppressCommand::Remove { address } => Request::SuppressRemove { address },
        SuppressCommand::List | SuppressCommand::Export => Request::SuppressList,
        SuppressCommand::Import { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            if let Ok(entries) = serde_json::from_str::<Vec<postern::suppress::Entry>>(&text) {
                Request::SuppressImport {
                    entries,
                    addresses: Vec::new(),
                }
            } else {
                let mut addresses = Vec::new();
                for line in text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                {
                    let (addr, why) = match line.split_once(',') {
                        Some((a, r)) => (a.trim(), reason(r.trim())?),
                        None => (line, Reason::Manual),
                    };
                    addresses.push((addr.to_string(), why));
                }
                Request::SuppressImport {
                    entries: Vec::new(),
                    addresses,
                }
            }
        }
    };
    print_json(&admin(config, request)?)
}

fn queue(config: Option<PathBuf>, command: QueueCommand) -> anyhow::Result<()> {
    use postern::admin::Request;
    use postern::sendmail::{format_queue, format_summary};
    let request = match command {
        QueueCommand::List {
            domain,
            state,
            json,
        } => {
            let state = state
                .map(|s| serde_json::from_value(serde_json::Value::String(s.clone())))
                .transpose()
                .map_err(|_| anyhow::anyhow!("--state must be queued, active, deferred or held"))?;
            let list = admin(config, Request::QueueList { domain, state })?;
            if json {
                return print_json(&list);
            }
            print!("{}", format_queue(&list));
            return Ok(());
        }
        QueueCommand::Summary => {
            let all = Request::QueueList {
                domain: None,
                state: None,
            };
            print!("{}", format_summary(&admin(config, all)?));
            return Ok(());
        }
        QueueCommand::Show { id } => Request::QueueShow { id },
        QueueCommand::Flush { id, domain } => Request::QueueFlush { id, domain },
        QueueCommand::Hold { id } => Request::QueueHold { id },
        QueueCommand::Release { id } => Request::QueueRelease { id },
        QueueCommand::Delete { id } => Request::QueueDelete { id },
        QueueCommand::Bounce { id } => Request::QueueBounce { id },
    };
    print_json(&admin(config, request)?)
}

fn dns_records(config: Option<PathBuf>, domain: &str) -> anyhow::Result<()> {
    let config = load(config)?;
    print!("{}", postern::dkim::dns_records(&config, domain)?);
    Ok(())
}

fn keygen(
    domain: &str,
    selector: &str,
    algorithm: &str,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    use postern::dkim::{generate, public_key_record, txt_chunks, Algorithm};
    let alg = Algorithm::parse(algorithm)
        .ok_or_else(|| anyhow::anyhow!("--algorithm must be ed25519 or rsa"))?;
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let path = out.unwrap_or_else(|| PathBuf::from(format!("keys/{domain}.{selector}.pem")));
    let key = generate(alg, &path)?;
    println!(
        "; private key written to {} (mode 0600); add to config.toml:",
        path.display()
    );
    println!(";   [[dkim.key]]");
    println!(";   domain = \"{domain}\"");
    println!(";   selector = \"{selector}\"");
    println!(";   algorithm = \"{}\"", alg.config_name());
    println!(";   private_key = \"{}\"", path.display());
    println!("; and publish:");
    println!(
        "{selector}._domainkey.{domain}. IN TXT {}",
        txt_chunks(&public_key_record(alg, &key.public_b64))
    );
    Ok(())
}

fn serve(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = load(path.clone())?;
    postern::logging::init(config.server.log_format);
    let files = postern::daemon::raise_open_files_limit(&config);
    if files.is_short() {
        tracing::warn!(
            limit = files.limit,
            needed = files.needed,
            "the open-files limit is below what max_connections and max_in_flight can use; raise it (LimitNOFILE, ulimit -n)"
        );
    }
    let notifier = Arc::new(Notifier::from_env());
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    let result = runtime.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        // Handlers first: a signal that arrives once the listeners are up must find them
        // installed (SIGHUP's default action would kill the daemon). Handling SIGXFSZ turns
        // "file size limit exceeded" into a write error (answered with a 4xx).
        let _xfsz = signal(SignalKind::from_raw(25));
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let daemon = Daemon::start(config).await?;
        let report = &daemon.recovery;
        tracing::info!(
            recovered = report.recovered,
            segments = report.segments,
            quarantined = report.quarantined.len(),
            unreadable = report.unreadable.len(),
            "spool recovered"
        );
        let reload = daemon.reload_handle();
        let n = notifier.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                n.reloading();
                let result = load(path.clone()).and_then(|c| Ok(reload.reload(&c)?));
                match result {
                    Ok(()) => tracing::info!("reloaded DKIM keys, certificate and accounts"),
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "reload refused; the running configuration stays"),
                }
                n.notify("READY=1");
            }
        });
        let shutdown = daemon.shutdown.clone();
        let n = notifier.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            tracing::info!("shutting down: no new connections, finishing open transactions");
            n.notify("STOPPING=1\nSTATUS=draining");
            shutdown.cancel();
        });
        for (addr, mode) in daemon.local_addrs() {
            tracing::info!(%addr, ?mode, "listening");
        }
        // The spool is recovered and every listener bound: systemd may start what needs us.
        notifier.notify("READY=1\nSTATUS=serving");
        if let Some(every) = notifier.watchdog_interval() {
            tokio::spawn(notifier.clone().watchdog(every));
        }
        let grace = daemon.shutdown_grace();
        daemon.run(grace).await;
        tracing::info!("stopped");
        anyhow::Ok(())
    });
    // Tasks still running (abandoned deliveries, sessions past the grace) are dropped here, not
    // waited for: the stop stays within the grace whatever remote peers do.
    runtime.shutdown_timeout(Duration::from_secs(1));
    // Log lines still batched in memory.
    postern::logging::flush();
    result
}
