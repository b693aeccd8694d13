//! The `sendmail` and `mailq` commands, as cron, PHP's `mail()`, logwatch and scripts expect
//! them from Postfix or Sendmail.
//!
//! `sendmail` reads a message on standard input, completes its headers (`From:`, `Date:`,
//! `Message-ID:` when missing), and hands it to the daemon over the local socket
//! ([`crate::local`]); when the daemon is not running it leaves the message, sealed, in the
//! maildrop. Exit codes are those of sysexits.h, which callers test.

use std::io::Read;
use std::path::PathBuf;

use crate::config::Config;
use crate::local::{LocalPaths, Stage, Submission, SubmitError};
use crate::proto::Address;

/// Exit codes from sysexits.h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    /// Bad arguments.
    Usage = 64,
    /// Bad input: an address that does not parse, a message the daemon refused.
    DataErr = 65,
    /// The daemon is needed and not there (`-bs`), or refused the whole session.
    Unavailable = 69,
    /// Could not write to the maildrop, or read standard input.
    IoErr = 74,
    /// Try again later.
    TempFail = 75,
    /// The configuration cannot be read, or has no `[local]`.
    Config = 78,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Read a message and send it (`-bm`, the default).
    #[default]
    Deliver,
    /// SMTP on standard input and output (`-bs`).
    Smtp,
    /// List the queue (`-bp`, or called as `mailq`).
    ListQueue,
    /// `-bi` (newaliases): there is no aliases database; succeeds doing nothing.
    Newaliases,
}

/// The command line, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    pub config: Option<PathBuf>,
    pub mode: Mode,
    /// `-t`: recipients also from `To:`, `Cc:` and `Bcc:`; `Bcc:` is removed.
    pub extract: bool,
    /// `-i` / `-oi`: a line holding only `.` is content, not the end of the message.
    pub dots_are_content: bool,
    /// `-f` / `-r`: the envelope sender; `""` or `<>` for the null sender.
    pub sender: Option<String>,
    /// `-F`: the full name for a `From:` header that sendmail adds.
    pub full_name: Option<String>,
    pub verbose: bool,
    pub recipients: Vec<String>,
}

/// Flags that take a value and are ignored (`-N never`, `-B 8BITMIME`, ...).
const IGNORED_WITH_VALUE: &[char] = &['B', 'N', 'R', 'V', 'X', 'L', 'h', 'O'];
/// Flags without a value that are ignored.
const IGNORED: &[&str] = &["-n", "-m", "-U", "-G", "-Am", "-Ac", "-bm"];

/// Parses sendmail's command line (without the program name).
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |flag: &str| -> Result<String, String> {
            match arg.strip_prefix(flag).filter(|v| !v.is_empty()) {
                Some(attached) => Ok(attached.to_string()),
                None => it.next().cloned().ok_or(format!("{flag} needs a value")),
            }
        };
        match arg.as_str() {
            "--" => {
                o.recipients.extend(it.by_ref().cloned());
                break;
            }
            "-t" => o.extract = true,
            "-i" | "-oi" => o.dots_are_content = true,
            "-v" => o.verbose = true,
            "-bs" => o.mode = Mode::Smtp,
            "-bp" => o.mode = Mode::ListQueue,
            "-bi" => o.mode = Mode::Newaliases,
            a if IGNORED.contains(&a) => {}
            a if a.starts_with("--config=") => o.config = Some(a["--config=".len()..].into()),
            "--config" => o.config = Some(value("--config")?.into()),
            a if a.starts_with("-C") => o.config = Some(value("-C")?.into()),
            a if a.starts_with("-f") => o.sender = Some(value("-f")?),
            a if a.starts_with("-r") => o.sender = Some(value("-r")?),
            a if a.starts_with("-F") => o.full_name = Some(value("-F")?),
            // -odi, -oem, -om, -oA...: delivery and error modes that do not apply here.
            a if a.starts_with("-o") || a.starts_with("-q") => {}
            a if a.len() >= 2
                && a.starts_with('-')
                && a[1..].starts_with(IGNORED_WITH_VALUE)
                && a.is_char_boundary(2) =>
            {
                value(&a[..2])?;
            }
            a if a.starts_with('-') && a.len() > 1 => {
                return Err(format!("unsupported option {a}"))
            }
            _ => o.recipients.push(arg.clone()),
        }
    }
    Ok(o)
}

/// Why a message could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("bad address syntax {address:?}: {reason}")]
    BadAddress {
        address: String,
        reason: crate::proto::AddressError,
    },
    #[error("no recipients specified")]
    NoRecipients,
    #[error("message too large (limit {0} bytes)")]
    TooLarge(usize),
}

impl PrepareError {
    pub fn exit(&self) -> Exit {
        match self {
            PrepareError::NoRecipients => Exit::Usage,
            _ => Exit::DataErr,
        }
    }
}

/// Who runs the command, for the default sender and `From:`.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Login name of the invoking user.
    pub user: String,
    /// Domain for the default sender and for bare local parts (`root` becomes `root@host`).
    pub hostname: String,
}

/// Reads the message from `input` as sendmail does: up to the end, or (without `-i`) up to a
/// line holding only `.`. Line endings become CRLF.
pub fn read_message(input: &mut impl Read, dots_are_content: bool) -> std::io::Result<Vec<u8>> {
    let mut raw = Vec::new();
    input.read_to_end(&mut raw)?;
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 32);
    for line in raw.split_inclusive(|b| *b == b'\n') {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        if !dots_are_content && text == b"." {
            break;
        }
        out.extend_from_slice(text);
        out.extend_from_slice(b"\r\n");
    }
    Ok(out)
}

/// Turns the options and the message read into what is submitted: envelope sender,
/// recipients (arguments, plus the headers' with `-t`), headers completed, `Bcc:` removed.
pub fn prepare(
    opts: &Options,
    id: &Identity,
    message: Vec<u8>,
    max_size: usize,
) -> Result<Submission, PrepareError> {
    let from = match opts.sender.as_deref().map(str::trim) {
        Some("" | "<>") => String::new(),
        Some(s) => qualify(s, id)?,
        None => qualify(&id.user, id)?,
    };
    let mut recipients = Vec::new();
    for r in &opts.recipients {
        // "a@b, c@d" as one argument is common in scripts.
        for one in r.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            recipients.push(qualify(one, id)?);
        }
    }
    let (head, body) = split_message(&message);
    let mut head = head.to_vec();
    if opts.extract {
        for r in header_recipients(&head) {
            recipients.push(qualify(&r, id)?);
        }
        head = remove_header(&head, "bcc");
    }
    recipients.dedup();
    if recipients.is_empty() {
        return Err(PrepareError::NoRecipients);
    }
    let added = missing_headers(&head, opts, id, &from);
    let mut out = Vec::with_capacity(added.len() + head.len() + body.len() + 2);
    out.extend_from_slice(added.as_bytes());
    out.extend_from_slice(&head);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    if out.len() > max_size {
        return Err(PrepareError::TooLarge(max_size));
    }
    Ok(Submission {
        from,
        recipients,
        body: out,
    })
}

/// An address as given on the command line or in a header, checked, with the host's domain
/// added to a bare local part as Postfix does (`root` becomes `root@host`).
fn qualify(raw: &str, id: &Identity) -> Result<String, PrepareError> {
    let bare = raw.trim().trim_start_matches('<').trim_end_matches('>');
    let full = if bare.contains('@') || bare.is_empty() {
        bare.to_string()
    } else {
        format!("{bare}@{}", id.hostname)
    };
    Address::parse(&full)
        .map(|a| a.to_string())
        .map_err(|reason| PrepareError::BadAddress {
            address: raw.to_string(),
            reason,
        })
}

/// Splits CRLF content into its header section (each line with its CRLF) and the body after
/// the empty line. Content that does not start with a header field is all body.
fn split_message(message: &[u8]) -> (&[u8], &[u8]) {
    let first = message.split(|b| *b == b'\n').next().unwrap_or_default();
    let looks_like_header = first
        .iter()
        .position(|b| *b == b':')
        .is_some_and(|i| i > 0 && first[..i].iter().all(|b| b.is_ascii_graphic()));
    if !looks_like_header {
        return (&[], message);
    }
    let head = crate::bounce::headers(message);
    let body = message
        .get(head.len() + 2..)
        .filter(|_| message[head.len()..].starts_with(b"\r\n"))
        .unwrap_or_default();
    (head, body)
}

/// Addresses in `To:`, `Cc:` and `Bcc:` (groups and display names understood).
fn header_recipients(head: &[u8]) -> Vec<String> {
    let mut with_end = head.to_vec();
    with_end.extend_from_slice(b"\r\n");
    let Some(msg) = mail_parser::MessageParser::new().parse_headers(&with_end) else {
        return Vec::new();
    };
    [msg.to(), msg.cc(), msg.bcc()]
        .into_iter()
        .flatten()
        .flat_map(|list| {
            list.mailboxes()
                .filter_map(|m| m.address().map(str::to_string))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The header section without the field `name` (and its folded continuation lines).
fn remove_header(head: &[u8], name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len());
    let mut skipping = false;
    for line in head.split_inclusive(|b| *b == b'\n') {
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            if !skipping {
                out.extend_from_slice(line);
            }
            continue;
        }
        skipping = field_name(line).is_some_and(|n| n.eq_ignore_ascii_case(name.as_bytes()));
        if !skipping {
            out.extend_from_slice(line);
        }
    }
    out
}

fn field_name(line: &[u8]) -> Option<&[u8]> {
    let colon = line.iter().position(|b| *b == b':')?;
    Some(line[..colon].trim_ascii_end())
}

fn has_header(head: &[u8], name: &str) -> bool {
    head.split(|b| *b == b'\n')
        .filter_map(field_name)
        .any(|n| n.eq_ignore_ascii_case(name.as_bytes()))
}

/// `From:`, `Date:` and `Message-ID:` lines for what the message lacks (RFC 5322 requires
/// the first two; receivers distrust mail without the third).
fn missing_headers(head: &[u8], opts: &Options, id: &Identity, from: &str) -> String {
    let mut out = String::new();
    if !has_header(head, "from") {
        let address = if from.is_empty() {
            format!("MAILER-DAEMON@{}", id.hostname)
        } else {
            from.to_string()
        };
        match opts.full_name.as_deref().filter(|n| !n.is_empty()) {
            Some(name) => {
                let name = name.replace(['\\', '"', '\r', '\n'], "");
                out.push_str(&format!("From: \"{name}\" <{address}>\r\n"));
            }
            None => out.push_str(&format!("From: {address}\r\n")),
        }
    }
    if !has_header(head, "date") {
        out.push_str(&format!("Date: {}\r\n", chrono::Local::now().to_rfc2822()));
    }
    if !has_header(head, "message-id") {
        let mut rand = [0u8; 12];
        if crate::crypto::random_bytes(&mut rand).is_ok() {
            let stamp = chrono::Utc::now().format("%Y%m%d%H%M%S");
            let id_part = hex::encode(rand);
            out.push_str(&format!(
                "Message-ID: <{stamp}.{id_part}@{}>\r\n",
                id.hostname
            ));
        }
    }
    out
}

/// The invoking user's login name, from the password database (not the environment, which
/// the caller controls).
pub fn login_name() -> String {
    let uid = rustix::process::getuid().as_raw();
    let from_passwd = std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
            })
        });
    from_passwd
        .or_else(|| std::env::var("LOGNAME").ok())
        .unwrap_or_else(|| format!("uid{uid}"))
}

/// Finds the configuration: `--config`, else `POSTERN_CONFIG`, else `/etc/postern/config.toml`.
pub fn config_path(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| std::env::var_os("POSTERN_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/etc/postern/config.toml"))
}

/// `sendmail ARGS`: returns the exit code.
pub fn main(args: &[String]) -> Exit {
    let opts = match parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sendmail: {e}");
            return Exit::Usage;
        }
    };
    if opts.mode == Mode::Newaliases {
        return Exit::Ok;
    }
    let path = config_path(opts.config.clone());
    let config = match Config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sendmail: {e}");
            return Exit::Config;
        }
    };
    if opts.mode == Mode::ListQueue {
        return list_queue(&config);
    }
    let Some(dir) = config.local_dir() else {
        eprintln!(
            "sendmail: {} has no [local] table: local submission is off",
            path.display()
        );
        return Exit::Config;
    };
    let paths = LocalPaths::new(&dir);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sendmail: {e}");
            return Exit::TempFail;
        }
    };
    let exit = match opts.mode {
        Mode::Smtp => runtime.block_on(smtp_over_stdio(&paths)),
        _ => deliver(&opts, &config, &paths, &runtime),
    };
    // A read of standard input may still be blocked (-bs): do not wait for it.
    runtime.shutdown_background();
    exit
}

fn deliver(
    opts: &Options,
    config: &Config,
    paths: &LocalPaths,
    runtime: &tokio::runtime::Runtime,
) -> Exit {
    let message = match read_message(&mut std::io::stdin().lock(), opts.dots_are_content) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("sendmail: reading the message: {e}");
            return Exit::IoErr;
        }
    };
    let id = Identity {
        user: login_name(),
        hostname: config.server.hostname.clone(),
    };
    let submission = match prepare(opts, &id, message, config.limits.max_message_size) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sendmail: {e}");
            return e.exit();
        }
    };
    match runtime.block_on(crate::local::submit(&paths.socket, &submission)) {
        Ok(reply) => {
            if opts.verbose {
                eprintln!("sendmail: {}", reply.to_single_line());
            }
            Exit::Ok
        }
        Err(SubmitError::Rejected { stage, reply }) => {
            eprintln!("sendmail: {stage} refused: {}", reply.to_single_line());
            match stage {
                Stage::Greeting => Exit::Unavailable,
                Stage::Sender | Stage::Recipient | Stage::Content => Exit::DataErr,
            }
        }
        Err(e) => to_maildrop(opts, paths, &submission, &e),
    }
}

/// The daemon is down or busy: the message goes to the maildrop, sealed and fsync'd.
fn to_maildrop(opts: &Options, paths: &LocalPaths, s: &Submission, why: &SubmitError) -> Exit {
    let written = crate::local::read_public_key(paths)
        .and_then(|key| crate::local::write_to_maildrop(paths, &key, s));
    match written {
        Ok(file) => {
            if opts.verbose {
                eprintln!(
                    "sendmail: {why}; queued in the maildrop as {}",
                    file.display()
                );
            }
            Exit::Ok
        }
        Err(e) => {
            eprintln!("sendmail: {why}; and the maildrop failed: {e}");
            Exit::TempFail
        }
    }
}

/// `-bs`: standard input and output become an SMTP session with the daemon.
async fn smtp_over_stdio(paths: &LocalPaths) -> Exit {
    let stream = match tokio::net::UnixStream::connect(&paths.socket).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sendmail: -bs needs the daemon, which is not running: {e}");
            return Exit::Unavailable;
        }
    };
    let (mut read, mut write) = stream.into_split();
    let upstream = async {
        let _ = tokio::io::copy(&mut tokio::io::stdin(), &mut write).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut write).await;
    };
    let mut stdout = tokio::io::stdout();
    let downstream = tokio::io::copy(&mut read, &mut stdout);
    // The session ends when the daemon closes (after QUIT, or on end of input).
    tokio::select! {
        _ = async { upstream.await; std::future::pending::<()>().await } => Exit::Ok,
        r = downstream => if r.is_ok() { Exit::Ok } else { Exit::IoErr },
    }
}

/// `mailq` / `-bp`: the queue as the running daemon sees it, through its admin socket (which
/// only the daemon's user and root can reach).
pub fn list_queue(config: &Config) -> Exit {
    let socket = config.data_dir().join("admin.sock");
    let request = crate::admin::Request::QueueList {
        domain: None,
        state: None,
    };
    let answer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(crate::admin::AdminError::Io)
        .and_then(|rt| rt.block_on(crate::admin::request(&socket, &request)));
    match answer {
        Ok(list) => {
            print!("{}", format_queue(&list));
            Exit::Ok
        }
        Err(e) => {
            eprintln!("mailq: {e}");
            Exit::Unavailable
        }
    }
}

/// One line per message, as `mailq` prints it.
pub fn format_queue(list: &serde_json::Value) -> String {
    let entries = list.as_array().map(Vec::as_slice).unwrap_or_default();
    if entries.is_empty() {
        return "Mail queue is empty\n".to_string();
    }
    let mut out = format!(
        "{:<32} {:<8} {:>8} {:>10} {:>6}  DOMAINS\n",
        "QUEUE ID", "STATE", "AGE", "SIZE", "RCPTS"
    );
    for e in entries {
        let age = std::time::Duration::from_secs(e["age_seconds"].as_u64().unwrap_or(0));
        let domains: Vec<&str> = e["domains"]
            .as_array()
            .map(|d| d.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<32} {:<8} {:>8} {:>10} {:>6}  {}\n",
            e["id"].as_str().unwrap_or("?"),
            e["state"].as_str().unwrap_or("?"),
            humantime::format_duration(age).to_string().replace(' ', ""),
            e["size"].as_u64().unwrap_or(0),
            e["pending_recipients"].as_u64().unwrap_or(0),
            domains.join(",")
        ));
    }
    out.push_str(&format!("-- {} message(s)\n", entries.len()));
    out
}

/// Age buckets of `postern queue summary`, in seconds (upper bounds), like Postfix's qshape.
const AGE_BUCKETS: [(u64, &str); 5] = [
    (300, "<5m"),
    (3600, "<1h"),
    (4 * 3600, "<4h"),
    (86400, "<1d"),
    (u64::MAX, ">=1d"),
];

/// Messages per destination domain and age bucket (a message counts once per domain).
pub fn format_summary(list: &serde_json::Value) -> String {
    let mut rows: std::collections::BTreeMap<String, [usize; 5]> = Default::default();
    let mut total = [0usize; 5];
    for e in list.as_array().map(Vec::as_slice).unwrap_or_default() {
        let age = e["age_seconds"].as_u64().unwrap_or(0);
        let bucket = AGE_BUCKETS
            .iter()
            .position(|(max, _)| age < *max)
            .unwrap_or(4);
        total[bucket] += 1;
        for d in e["domains"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            rows.entry(d.as_str().unwrap_or("?").to_string())
                .or_default()[bucket] += 1;
        }
    }
    let line = |name: &str, counts: &[usize; 5]| {
        let mut l = format!("{name:<32} {:>6}", counts.iter().sum::<usize>());
        for c in counts {
            l.push_str(&format!(" {c:>6}"));
        }
        l + "\n"
    };
    let mut out = format!("{:<32} {:>6}", "DOMAIN", "TOTAL");
    for (_, label) in AGE_BUCKETS {
        out.push_str(&format!(" {label:>6}"));
    }
    out.push('\n');
    out.push_str(&line("(messages)", &total));
    for (domain, counts) in &rows {
        out.push_str(&line(domain, counts));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    fn id() -> Identity {
        Identity {
            user: "www-data".into(),
            hostname: "host.example.test".into(),
        }
    }

    #[test]
    fn common_command_lines_parse() {
        let o = parse_args(&args("-t -i -f app@example.test -odi -oem -N never")).unwrap();
        assert!(o.extract && o.dots_are_content);
        assert_eq!(o.sender.as_deref(), Some("app@example.test"));
        assert!(o.recipients.is_empty());
        let o = parse_args(&args("-oi -fapp@x.test -FCron bob@y.test -- -odd@y.test")).unwrap();
        assert_eq!(o.full_name.as_deref(), Some("Cron"));
        assert_eq!(o.recipients, ["bob@y.test", "-odd@y.test"]);
        assert_eq!(parse_args(&args("-bs")).unwrap().mode, Mode::Smtp);
        assert_eq!(parse_args(&args("-bp")).unwrap().mode, Mode::ListQueue);
        assert_eq!(
            parse_args(&args("--config /x.toml a@b.test"))
                .unwrap()
                .config,
            Some(PathBuf::from("/x.toml"))
        );
        assert!(parse_args(&args("-bd")).is_err());
        assert!(parse_args(&args("-f")).is_err());
    }

    #[test]
    fn queue_listing_and_summary_format() {
        let list = serde_json::json!([
            {"id": "AAA", "age_seconds": 7200, "size": 900, "pending_recipients": 2, "domains": ["a.test", "b.test"]},
            {"id": "BBB", "age_seconds": 10, "size": 100, "pending_recipients": 1, "domains": ["a.test"]},
        ]);
        let text = format_queue(&list);
        assert!(
            text.contains("AAA") && text.contains("2h") && text.contains("a.test,b.test"),
            "{text}"
        );
        assert!(text.ends_with("-- 2 message(s)\n"), "{text}");
        assert_eq!(
            format_queue(&serde_json::json!([])),
            "Mail queue is empty\n"
        );
        let summary = format_summary(&list);
        let a = summary.lines().find(|l| l.starts_with("a.test")).unwrap();
        let counts: Vec<&str> = a.split_whitespace().collect();
        assert_eq!(
            counts,
            ["a.test", "2", "1", "0", "1", "0", "0"],
            "{summary}"
        );
        let b = summary.lines().find(|l| l.starts_with("b.test")).unwrap();
        assert_eq!(b.split_whitespace().nth(1), Some("1"));
    }

    #[test]
    fn a_lone_dot_ends_input_unless_i() {
        let input = b"Subject: x\n\nline\n.\nafter\n";
        let cut = read_message(&mut &input[..], false).unwrap();
        assert_eq!(cut, b"Subject: x\r\n\r\nline\r\n");
        let all = read_message(&mut &input[..], true).unwrap();
        assert_eq!(all, b"Subject: x\r\n\r\nline\r\n.\r\nafter\r\n");
    }

    #[test]
    fn extract_takes_to_cc_bcc_and_removes_bcc() {
        let msg = b"To: Bob <bob@a.test>, carol@b.test\r\nCc: grp: dan@c.test;\r\nBcc: eve@d.test,\r\n  frank@e.test\r\nSubject: s\r\n\r\nBcc: not a header\r\n".to_vec();
        let opts = Options {
            extract: true,
            ..Default::default()
        };
        let s = prepare(&opts, &id(), msg, 1 << 20).unwrap();
        assert_eq!(
            s.recipients,
            [
                "bob@a.test",
                "carol@b.test",
                "dan@c.test",
                "eve@d.test",
                "frank@e.test"
            ]
        );
        let text = String::from_utf8(s.body).unwrap();
        assert!(
            !text.contains("eve@d.test") && !text.contains("frank"),
            "{text}"
        );
        assert!(
            text.contains("\r\n\r\nBcc: not a header\r\n"),
            "body untouched: {text}"
        );
        assert!(
            text.starts_with("From: www-data@host.example.test\r\nDate: "),
            "{text}"
        );
        assert!(text.contains("Message-ID: <"), "{text}");
        assert_eq!(s.from, "www-data@host.example.test");
    }

    #[test]
    fn recipients_are_checked_and_qualified() {
        let opts = |r: &str| Options {
            recipients: vec![r.into()],
            full_name: Some("Cron \"Daemon\"".into()),
            ..Default::default()
        };
        let s = prepare(&opts("root"), &id(), b"hi\r\n".to_vec(), 1 << 20).unwrap();
        assert_eq!(s.recipients, ["root@host.example.test"]);
        let text = String::from_utf8(s.body).unwrap();
        assert!(
            text.starts_with("From: \"Cron Daemon\" <www-data@host.example.test>\r\n"),
            "{text}"
        );
        assert!(
            text.ends_with("\r\n\r\nhi\r\n"),
            "no headers: all body: {text}"
        );
        let err = prepare(&opts("bad@@x"), &id(), b"hi\r\n".to_vec(), 1 << 20).unwrap_err();
        assert_eq!(err.exit(), Exit::DataErr);
        let none = prepare(&Options::default(), &id(), b"hi\r\n".to_vec(), 1 << 20).unwrap_err();
        assert_eq!(none.exit(), Exit::Usage);
        let big = prepare(&opts("a@b.test"), &id(), vec![b'x'; 2000], 1024).unwrap_err();
        assert!(matches!(big, PrepareError::TooLarge(1024)));
    }
}
