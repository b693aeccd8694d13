//! One SMTP session: the state machine that drives [`crate::proto`] over a connection.
//!
//! Replies to pipelined commands are collected and flushed only when the input holds no further
//! complete command (RFC 2920), so a pipelining client costs one write per batch. Input is read
//! only once every complete command in hand has been answered, and pending replies are written
//! out once they pass [`MAX_PENDING_OUTPUT`], so a client that sends without reading stalls on
//! its own full socket buffer instead of growing ours.
//!
//! Hostile clients meet, besides the per-read timeouts: a deadline for the whole session, a
//! budget of commands that do no work (NOOP, RSET, VRFY, HELP, EHLO, HELO), and for AUTH a
//! per-address count of failures with a cool-down and a growing delay before each refusal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;

use super::policy::Sender;
use super::received::{self, Trace};
use super::stream::Stream;
use super::Context;
use crate::auth::Priority;
use crate::config::{LineEndingPolicy, ListenerMode};
use crate::ledger::Signing;
use crate::limits::{client_key, retry_text, LimitKey};
use crate::proto::{
    self, AuthMechanism, BodyChecker, BodyLimits, BodyType, Command, CommandFramer, DataDecoder,
    FramedLine, LineEndings, MailParams, Reply, ReversePath,
};
use crate::spool::{Envelope, QueueId, Spill, SpoolError, SPILL_AT};

/// Why a session ended early; each case has already been answered (or cannot be).
enum End {
    /// The client went away or the transport failed.
    Disconnected,
    /// QUIT, a timeout, too many errors or shutdown: a final reply was sent.
    Closed,
}

type Flow = Result<(), End>;

/// RFC 4954 4: an AUTH command or response line may be up to 12,288 octets, CRLF included;
/// every other command keeps the 512-octet limit.
const MAX_AUTH_LINE: usize = 12_288;

/// Up to this size, a message signed only with Ed25519 keys is signed on the session's own
/// task ([`crate::dkim::Keys::signs_quickly`]); bigger ones, and any RSA signing, go to a
/// blocking thread.
const SIGN_INLINE_UP_TO: usize = 64 * 1024;

/// Room made in the input buffer for a read of commands: a pipelined batch (EHLO, MAIL, a few
/// RCPT, DATA) fits; a longer one takes another read. Small, as 10,000 clients may all be
/// sending commands at once.
const COMMAND_CHUNK: usize = 1024;
/// Room made for a read of message content: a good piece per system call. Only sessions with
/// a place for content (`limits.max_concurrent_data`) read with it.
const DATA_CHUNK: usize = 8192;

/// Replies held for a client that pipelines; past this they are written out before any more
/// input is processed.
const MAX_PENDING_OUTPUT: usize = 64 * 1024;

/// The longest wait before a failed AUTH is answered.
const MAX_AUTH_DELAY: Duration = Duration::from_secs(30);

/// The envelope being built between MAIL and the end of DATA/BDAT.
struct Transaction {
    from: String,
    params: MailParams,
    rcpts: Vec<String>,
    /// Content received so far by BDAT, with the first error (drained, reported at LAST).
    bdat: Option<BodyChecker>,
    /// The body file, once the body passed [`SPILL_AT`]: the rest goes there as it arrives.
    /// Dropped with the transaction (an error, RSET, a client gone), the file goes too.
    spill: Option<Spill>,
    /// The header section of a spilled body, from its first chunk: what the loop check, the
    /// From: domain and bounces need of it.
    headers: Vec<u8>,
    /// Why the body file failed (the disk): the rest of the body is read and dropped, and the
    /// end of the data gets the refusal.
    spill_error: Option<SpoolError>,
    /// This session's place among those receiving content (`limits.max_concurrent_data`),
    /// from DATA or the first BDAT; given back with the transaction's reply, once the message
    /// is on disk or refused.
    data_slot: Option<OwnedSemaphorePermit>,
}

/// A received body: whole in memory, or in its body file (the header section in memory).
enum Content {
    Inline(Vec<u8>),
    Spilled { spill: Spill, headers: Vec<u8> },
}

impl Content {
    /// The message's header section.
    fn headers(&self) -> &[u8] {
        match self {
            Content::Inline(body) => crate::bounce::headers(body),
            Content::Spilled { headers, .. } => headers,
        }
    }

    fn len(&self) -> u64 {
        match self {
            Content::Inline(body) => body.len() as u64,
            Content::Spilled { spill, .. } => spill.written(),
        }
    }
}

struct Session {
    ctx: Arc<Context>,
    /// Accounts, DKIM keys and certificate as they were when the session began.
    live: Arc<super::Live>,
    mode: ListenerMode,
    peer: SocketAddr,
    /// A local program over the submission socket: trusted to relay, no TLS to offer.
    local: bool,
    stream: Stream,
    input: BytesMut,
    output: Vec<u8>,
    framer: CommandFramer,
    helo: Option<String>,
    esmtp: bool,
    /// Version and cipher once TLS is up.
    tls: Option<String>,
    auth_user: Option<String>,
    /// The account logged in as: its sender rules and limits apply.
    account: Option<Arc<crate::auth::Account>>,
    tx: Option<Transaction>,
    errors: usize,
    /// Commands that did no work since the last accepted message.
    idle_commands: usize,
    /// The session ends when this passes, however active it is.
    deadline: tokio::time::Instant,
}

/// How a listener treats its connections.
#[derive(Clone)]
pub(super) struct Listener {
    pub mode: ListenerMode,
    /// Set on a PROXY-protocol listener: the balancers allowed to send the header.
    pub proxy_from: Option<Arc<[ipnet::IpNet]>>,
}

/// Runs a session to its end. Never panics on client input; errors end in a reply or a close.
pub(super) async fn run(
    ctx: Arc<Context>,
    mut socket: TcpStream,
    peer: SocketAddr,
    listener: Listener,
) {
    let mode = listener.mode;
    // Behind a balancer, the client is the one the PROXY header names, for everything below.
    let peer = match &listener.proxy_from {
        None => peer,
        Some(proxies) => match super::proxy::client_address(&mut socket, peer, proxies).await {
            Ok(client) => client,
            Err(reply) => return refuse(socket, reply).await,
        },
    };
    // Held for the whole session: the per-address connection count.
    let _slot = match super::admit::admit(&ctx, peer.ip()) {
        Ok(slot) => slot,
        Err(reply) => return refuse(socket, reply).await,
    };
    drive(ctx, Stream::Plain(socket), peer, mode).await
}

/// Runs a local submission (`sendmail`): a relay session that may relay without AUTH.
pub(super) async fn run_local(ctx: Arc<Context>, socket: tokio::net::UnixStream) {
    let peer = SocketAddr::from(([127, 0, 0, 1], 0));
    drive(ctx, Stream::Local(socket), peer, ListenerMode::Relay).await
}

async fn drive(ctx: Arc<Context>, stream: Stream, peer: SocketAddr, mode: ListenerMode) {
    let _open = crate::metrics::InboundConnection::open();
    let local = matches!(stream, Stream::Local(_));
    let deadline = tokio::time::Instant::now() + ctx.config.limits.session_timeout;
    let mut s = Session {
        live: ctx.live(),
        ctx,
        mode,
        peer,
        local,
        stream,
        input: BytesMut::new(),
        output: Vec::new(),
        framer: CommandFramer::new(MAX_AUTH_LINE),
        helo: None,
        esmtp: false,
        tls: None,
        auth_user: None,
        account: None,
        tx: None,
        errors: 0,
        idle_commands: 0,
        deadline,
    };
    tracing::debug!(peer = %peer.ip(), ?mode, "connection");
    if mode == ListenerMode::Submissions && Box::pin(s.start_tls()).await.is_err() {
        return;
    }
    let banner = Reply::plain(
        220,
        format!("{} ESMTP Postern", s.ctx.config.server.hostname),
    );
    s.reply(banner);
    let _ = s.serve().await;
    // A closing reply (421 after too many errors) may still be queued.
    let _ = s.flush().await;
    let _ = s.stream.shutdown().await;
}

/// Answers a connection that may not be served, and closes it. What the client already sent
/// is read and dropped for a moment (a "lingering close"): closing with unread input makes
/// the kernel send a reset, which can destroy the reply before the client reads it.
async fn refuse(mut socket: TcpStream, reply: Reply) {
    let mut out = Vec::new();
    reply.write_to(&mut out);
    let close = async {
        socket.write_all(&out).await?;
        socket.shutdown().await?;
        // On the heap: an array here would be part of every session's future, refused or not.
        let mut sink = vec![0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            match socket.read(&mut sink).await? {
                0 => break,
                n => left = left.saturating_sub(n),
            }
        }
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
}

/// Signs `content` with `keys` (a spilled body is read from its file, blocking).
fn sign_content(
    keys: &crate::dkim::Keys,
    from_domain: Option<&str>,
    from: &str,
    content: Content,
) -> (Result<crate::dkim::Signed, crate::dkim::DkimError>, Content) {
    let result = match &content {
        Content::Inline(body) => keys.sign(&[body], from_domain, from),
        Content::Spilled { spill, .. } => keys.sign_streamed(from_domain, from, |feed| {
            let mut reader = spill.reader()?;
            while let Some(chunk) = reader.next_blocking()? {
                feed(&chunk);
            }
            Ok(())
        }),
    };
    (result, content)
}

/// The answer to DATA or BDAT when no place for content came free in time.
fn too_busy() -> Reply {
    Reply::new(
        451,
        "4.3.2",
        "Too busy receiving other messages; try again later",
    )
}

/// How long to wait before answering the `strikes`-th failed AUTH from an address: `base`,
/// doubled for each earlier failure, at most [`MAX_AUTH_DELAY`].
fn auth_failure_delay(strikes: u64, base: Duration) -> Duration {
    let doublings = strikes.saturating_sub(1).min(16) as u32;
    base.saturating_mul(1 << doublings).min(MAX_AUTH_DELAY)
}

/// True for an over-long command line that RFC 4954 allows: AUTH, up to [`MAX_AUTH_LINE`].
fn is_auth_line(line: &[u8]) -> bool {
    line.len() >= 5 && line[..5].eq_ignore_ascii_case(b"AUTH ")
}

impl Session {
    async fn serve(&mut self) -> Flow {
        loop {
            while let Some(framed) = self.framer.next_line(&mut self.input) {
                match framed {
                    FramedLine::Line(line)
                        if line.len() + 2 <= proto::MAX_COMMAND_LINE || is_auth_line(&line) =>
                    {
                        self.command(&line).await?
                    }
                    _ => self.error(Reply::new(500, "5.5.2", "Line too long"))?,
                }
                if self.output.len() > MAX_PENDING_OUTPUT {
                    self.flush().await?;
                }
            }
            self.flush().await?;
            self.read_command_input().await?;
        }
    }

    async fn command(&mut self, line: &[u8]) -> Flow {
        let command = match proto::parse_command(line) {
            Ok(c) => c,
            Err(e) => return self.error(e.reply()),
        };
        if matches!(
            command,
            Command::Noop
                | Command::Rset
                | Command::Vrfy
                | Command::Help
                | Command::Ehlo(_)
                | Command::Helo(_)
        ) {
            self.idle_command()?;
        }
        match command {
            Command::Ehlo(name) => self.hello(name, true),
            Command::Helo(name) => self.hello(name, false),
            Command::Mail { from, params } => self.mail(from, params),
            Command::Rcpt { to } => self.rcpt(to),
            // The place for content is waited for before the (boxed) receiving starts: a session
            // waiting its turn holds no more memory than an idle one.
            Command::Data => {
                let has_place = self.take_data_slot().await;
                Box::pin(self.data(has_place)).await
            }
            Command::Bdat { size, last } => {
                let has_place = self.take_data_slot().await;
                Box::pin(self.bdat(size, last, has_place)).await
            }
            Command::Rset => {
                self.tx = None;
                self.reply(Reply::new(250, "2.0.0", "OK"));
                Ok(())
            }
            Command::Noop => {
                self.reply(Reply::new(250, "2.0.0", "OK"));
                Ok(())
            }
            Command::Vrfy => {
                self.reply(Reply::new(
                    252,
                    "2.5.2",
                    "Cannot VRFY user; send mail and delivery will be attempted",
                ));
                Ok(())
            }
            Command::Help => {
                self.reply(Reply::new(214, "2.0.0", "See RFC 5321; commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH"));
                Ok(())
            }
            Command::Quit => self.close_with(Reply::new(221, "2.0.0", "Bye")).await,
            Command::StartTls => Box::pin(self.starttls()).await,
            Command::Auth { mechanism, initial } => Box::pin(self.auth(mechanism, initial)).await,
        }
    }

    /// Counts a command that does no work; past the budget the session ends.
    fn idle_command(&mut self) -> Flow {
        self.idle_commands += 1;
        if self.idle_commands <= self.ctx.config.limits.max_idle_commands {
            return Ok(());
        }
        tracing::info!(peer = %self.peer.ip(), "too many commands without a message; closing");
        self.reply(Reply::new(
            421,
            "4.7.0",
            "Too many commands without a message; closing connection",
        ));
        Err(End::Closed)
    }

    fn hello(&mut self, name: String, esmtp: bool) -> Flow {
        self.tx = None;
        self.helo = Some(name);
        self.esmtp = esmtp;
        let host = self.ctx.config.server.hostname.clone();
        if !esmtp {
            self.reply(Reply::plain(250, host));
            return Ok(());
        }
        let mut lines = vec![
            host,
            "PIPELINING".into(),
            format!("SIZE {}", self.ctx.config.limits.max_message_size),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "CHUNKING".into(),
        ];
        if self.local {
            // Nothing to encrypt on a local socket, and no account to log in to.
        } else if self.tls.is_none() {
            lines.push("STARTTLS".into());
        } else if !self.live.accounts.is_empty() && self.auth_user.is_none() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        self.reply(Reply::multiline(250, lines));
        Ok(())
    }

    fn mail(&mut self, from: ReversePath, params: MailParams) -> Flow {
        if self.helo.is_none() {
            return self.error(Reply::new(503, "5.5.1", "Send EHLO or HELO first"));
        }
        if self.tx.is_some() {
            return self.error(Reply::new(503, "5.5.1", "Nested MAIL command"));
        }
        if self.mode != ListenerMode::Relay && self.auth_user.is_none() {
            return self.error(Reply::new(530, "5.7.0", "Authentication required"));
        }
        let limit = self.ctx.config.limits.max_message_size;
        if params.size.is_some_and(|s| s > limit as u64) {
            return self.error(Reply::new(
                552,
                "5.3.4",
                format!("Message size exceeds the limit of {limit} bytes"),
            ));
        }
        // Below the spool's free-space reserve: turn the client away before it sends a body
        // the spool would refuse, and keep the room for delivery state of queued mail.
        if !self.ctx.spool.has_room(params.size.unwrap_or(0)) {
            self.reply(Reply::new(
                452,
                "4.3.1",
                "Insufficient system storage; try again later",
            ));
            return Ok(());
        }
        if (params.body.is_some() || params.smtputf8) && !self.esmtp {
            return self.error(Reply::new(555, "5.5.4", "MAIL parameters need EHLO"));
        }
        if let Some(sender) = self.sender() {
            let domain = match &from {
                ReversePath::Null => None,
                ReversePath::Address(a) => Some(a.domain_lowercase()),
            };
            if let Err(refusal) = sender.check_mail_from(domain.as_deref()) {
                tracing::info!(peer = %self.peer.ip(), "refused: sender domain not allowed");
                return self.error(refusal);
            }
            if let Err(refusal) = sender.count_message(&*self.ctx.limits, self.ctx.clock.now()) {
                tracing::info!(peer = %self.peer.ip(), "deferred: messages per hour");
                self.reply(refusal);
                return Ok(());
            }
        }
        let from = match from {
            ReversePath::Null => String::new(),
            ReversePath::Address(a) => {
                if !a.is_ascii() && !params.smtputf8 {
                    return self.error(Reply::new(
                        553,
                        "5.6.7",
                        "Non-ASCII address requires SMTPUTF8",
                    ));
                }
                a.to_string()
            }
        };
        self.tx = Some(Transaction {
            from,
            params,
            rcpts: Vec::new(),
            bdat: None,
            spill: None,
            headers: Vec::new(),
            spill_error: None,
            data_slot: None,
        });
        self.reply(Reply::new(250, "2.1.0", "Sender OK"));
        Ok(())
    }

    fn rcpt(&mut self, to: proto::Address) -> Flow {
        let may_relay =
            self.local || self.auth_user.is_some() || self.ctx.config.relay.allows(self.peer.ip());
        let max = self.ctx.config.limits.max_recipients;
        let Some(tx) = self.tx.as_mut() else {
            return self.error(Reply::new(503, "5.5.1", "Send MAIL first"));
        };
        if tx.bdat.is_some() {
            return self.error(Reply::new(503, "5.5.1", "RCPT not allowed during BDAT"));
        }
        if !to.is_ascii() && !tx.params.smtputf8 {
            return self.error(Reply::new(
                553,
                "5.6.7",
                "Non-ASCII address requires SMTPUTF8",
            ));
        }
        if !may_relay {
            tracing::info!(peer = %self.peer.ip(), "relay denied");
            return self.error(Reply::new(554, "5.7.1", "Relay access denied"));
        }
        let rcpt = to.to_string();
        let now = self.ctx.clock.now();
        if let Ok(Some(entry)) = self.ctx.ledger.suppress.check(&rcpt, now) {
            tracing::info!(peer = %self.peer.ip(), reason = ?entry.reason, "refused: recipient is on the suppression list");
            return self.error(Reply::new(
                550,
                "5.7.1",
                "Recipient is on the suppression list (opted out or repeatedly bounced); not sent",
            ));
        }
        let Some(tx) = self.tx.as_mut() else {
            return self.error(Reply::new(503, "5.5.1", "Send MAIL first"));
        };
        if tx.rcpts.len() >= max {
            // Not counted as an error: a client sending large lists is behaving correctly.
            self.reply(Reply::new(452, "4.5.3", "Too many recipients"));
            return Ok(());
        }
        let so_far = tx.rcpts.len();
        if let Some(sender) = self.sender() {
            let counted = sender.count_recipient(&*self.ctx.limits, so_far, now);
            if let Err(refusal) = counted {
                tracing::info!(peer = %self.peer.ip(), "deferred: recipient limit");
                self.reply(refusal);
                return Ok(());
            }
        }
        let Some(tx) = self.tx.as_mut() else {
            return self.error(Reply::new(503, "5.5.1", "Send MAIL first"));
        };
        tx.rcpts.push(rcpt);
        self.reply(Reply::new(250, "2.1.5", "Recipient OK"));
        Ok(())
    }

    fn body_limits(&self) -> BodyLimits {
        let limits = &self.ctx.config.limits;
        BodyLimits {
            max_size: limits.max_message_size,
            max_line: proto::MAX_TEXT_LINE,
            line_endings: match limits.line_endings {
                LineEndingPolicy::Reject => LineEndings::Reject,
                LineEndingPolicy::Normalise => LineEndings::Normalise,
            },
        }
    }

    async fn data(&mut self, has_place: bool) -> Flow {
        match &self.tx {
            None => return self.error(Reply::new(503, "5.5.1", "Send MAIL first")),
            Some(tx) if tx.bdat.is_some() => {
                return self.error(Reply::new(503, "5.5.1", "DATA not allowed after BDAT"))
            }
            Some(tx) if tx.rcpts.is_empty() => {
                return self.error(Reply::new(554, "5.5.1", "No valid recipients"))
            }
            Some(_) => {}
        }
        if !has_place {
            self.reply(too_busy());
            return Ok(());
        }
        self.reply(Reply::plain(354, "End data with <CR><LF>.<CR><LF>"));
        self.flush().await?;
        let mut decoder = DataDecoder::new(self.body_limits());
        loop {
            let (used, done) = decoder.feed(&self.input);
            self.input.advance(used);
            if done {
                break;
            }
            if decoder.buffered() >= SPILL_AT {
                self.spill(decoder.take()).await;
            }
            self.read_data_input().await?;
        }
        let tx = self.tx.take();
        match decoder.finish() {
            Ok(body) => self.accept(tx, body).await,
            Err(e) => {
                tracing::info!(peer = %self.peer.ip(), error = %e, "message refused");
                self.error(e.reply())
            }
        }
    }

    async fn bdat(&mut self, size: u64, last: bool, has_place: bool) -> Flow {
        let limits = self.body_limits();
        let mut refusal = match &self.tx {
            None => Some(Reply::new(503, "5.5.1", "Send MAIL first")),
            Some(tx) if tx.rcpts.is_empty() => {
                Some(Reply::new(554, "5.5.1", "No valid recipients"))
            }
            Some(_) => None,
        };
        // The chunk stayed unread (in the kernel's buffers) while the session waited.
        if refusal.is_none() && !has_place {
            refusal = Some(too_busy());
        }
        // The chunk must be read off the wire whatever happens, or its bytes would be taken
        // for commands.
        let mut checker = match (&refusal, self.tx.as_mut()) {
            (None, Some(tx)) => Some(tx.bdat.take().unwrap_or_else(|| BodyChecker::new(limits))),
            _ => None,
        };
        let mut remaining = size;
        loop {
            let take = remaining.min(self.input.len() as u64) as usize;
            if let Some(c) = checker.as_mut() {
                c.feed(&self.input[..take]);
            }
            self.input.advance(take);
            remaining -= take as u64;
            if remaining == 0 {
                break;
            }
            if let Some(c) = checker.as_mut().filter(|c| c.buffered() >= SPILL_AT) {
                let content = c.take();
                self.spill(content).await;
            }
            self.read_data_input().await?;
        }
        if let Some(reply) = refusal {
            return self.error(reply);
        }
        let Some(checker) = checker else {
            return self.error(Reply::new(503, "5.5.1", "Send MAIL first"));
        };
        if !last {
            let seen = checker.size();
            if let Some(tx) = self.tx.as_mut() {
                tx.bdat = Some(checker);
            }
            self.reply(Reply::new(
                250,
                "2.0.0",
                format!("{size} octets received ({seen} in all)"),
            ));
            return Ok(());
        }
        let tx = self.tx.take();
        match checker.finish() {
            Ok(body) => self.accept(tx, body).await,
            Err(e) => {
                tracing::info!(peer = %self.peer.ip(), error = %e, "message refused");
                self.error(e.reply())
            }
        }
    }

    /// A body past [`SPILL_AT`] goes to a body file as it arrives, so that a session holds
    /// about a chunk of it at a time whatever the message's size. A write the disk refuses is
    /// remembered, the file dropped, and the rest of the body read and discarded.
    async fn spill(&mut self, content: Vec<u8>) {
        let Some(tx) = self.tx.as_mut() else {
            return;
        };
        if tx.spill_error.is_some() {
            return;
        }
        if tx.spill.is_none() {
            tx.headers = crate::bounce::headers(&content).to_vec();
            let started = QueueId::generate()
                .map_err(SpoolError::from)
                .and_then(|id| self.ctx.spool.spill(id));
            match started {
                Ok(spill) => tx.spill = Some(spill),
                Err(e) => {
                    tracing::error!(peer = %self.peer.ip(), error = %e, "cannot start a body file; message not accepted");
                    tx.spill_error = Some(e);
                    return;
                }
            }
        }
        if let Some(spill) = tx.spill.as_mut() {
            if let Err(e) = spill.write(content).await {
                tracing::error!(peer = %self.peer.ip(), error = %e, "body file write failed; message not accepted");
                tx.spill = None;
                tx.spill_error = Some(e);
            }
        }
    }

    /// The body as received: `rest` (what was not spilled) added to the body file if there is
    /// one. Err when the body file failed.
    async fn content(tx: &mut Transaction, rest: Vec<u8>) -> Result<Content, SpoolError> {
        if let Some(e) = tx.spill_error.take() {
            return Err(e);
        }
        match tx.spill.take() {
            None => Ok(Content::Inline(rest)),
            Some(mut spill) => {
                spill.write(rest).await?;
                let headers = std::mem::take(&mut tx.headers);
                Ok(Content::Spilled { spill, headers })
            }
        }
    }

    /// The end of a transaction: trace header, durable store, and only then 250.
    async fn accept(&mut self, tx: Option<Transaction>, rest: Vec<u8>) -> Flow {
        let started = std::time::Instant::now();
        // The session now waits for the disk: it holds no input buffer meanwhile.
        self.release_input();
        let Some(mut tx) = tx else {
            return self.error(Reply::new(503, "5.5.1", "Send MAIL first"));
        };
        // The place for content is held until the reply: a body waiting for the disk is still
        // in memory, and with a slow disk every connected client's body would be.
        let _content_place = tx.data_slot.take();
        let Some((id, content)) = self.received(&mut tx, rest).await else {
            return Ok(());
        };
        // A mail loop (RFC 5321 6.3): refused here, before it is stored, so the previous hop
        // bounces it; nothing of it stays with us.
        let hops = received::hops(content.headers());
        if hops >= self.ctx.config.limits.max_hops {
            tracing::info!(hops, "refused: too many hops, mail loop");
            self.reply(Reply::new(554, "5.4.6", "Too many hops: mail loop"));
            return Ok(());
        }
        let queue_id = id.to_string();
        let now = chrono::DateTime::from_timestamp(self.ctx.clock.now(), 0)
            .unwrap_or_else(chrono::Utc::now);
        let trace = self.trace_header(&tx, &queue_id, now);
        // Parsed once here; DKIM signs for the same domain.
        let from_domain = crate::dkim::from_domain(content.headers());
        // Before signing: DKIM then signs only for domains the sender may use.
        let allowed = self
            .sender()
            .map(|s| s.check_from_header(from_domain.as_deref()));
        if let Some(Err(refusal)) = allowed {
            tracing::info!(peer = %self.peer.ip(), "refused: From: domain not allowed");
            return self.error(refusal);
        }
        let envelope = self.envelope(tx, from_domain.as_deref(), now.timestamp());
        let (signature, signing, content) = match self.sign(&envelope, from_domain, content).await {
            Ok(signed) => signed,
            Err(reply) => {
                self.reply(reply);
                return Ok(());
            }
        };
        let head = [signature.as_bytes(), trace.as_bytes()];
        self.store(id, &queue_id, &envelope, (head, content), &signing, started)
            .await;
        Ok(())
    }

    /// The body as received and the message's queue id (its body file's, if it has one);
    /// None once the failure has been answered.
    async fn received(
        &mut self,
        tx: &mut Transaction,
        rest: Vec<u8>,
    ) -> Option<(QueueId, Content)> {
        let content = match Session::content(tx, rest).await {
            Ok(content) => content,
            Err(e) => {
                self.reply(storage_refusal(&e));
                return None;
            }
        };
        let id = match &content {
            Content::Spilled { spill, .. } => Ok(spill.id()),
            Content::Inline(_) => QueueId::generate(),
        };
        match id {
            Ok(id) => Some((id, content)),
            Err(e) => {
                tracing::error!(error = %e, "cannot make a queue id");
                self.reply(Reply::new(451, "4.3.0", "Local error; try again later"));
                None
            }
        }
    }

    /// The envelope to store: the transaction's, with who sent it, how and when.
    fn envelope(&self, tx: Transaction, from_domain: Option<&str>, received_at: i64) -> Envelope {
        let sending_domain = from_domain
            .map(str::to_string)
            .or_else(|| tx.from.rsplit_once('@').map(|(_, d)| d.to_lowercase()))
            .unwrap_or_default();
        Envelope {
            sending_domain,
            mail_from: tx.from,
            recipients: tx.rcpts,
            received_at,
            client_ip: self.peer.ip(),
            helo: self.helo.clone().unwrap_or_default(),
            auth_user: self.auth_user.clone(),
            eight_bit: tx.params.body == Some(BodyType::EightBitMime),
            smtputf8: tx.params.smtputf8,
        }
    }

    /// The `Received:` header this server adds (RFC 5321 4.4).
    fn trace_header(
        &self,
        tx: &Transaction,
        queue_id: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> String {
        received::header(&Trace {
            helo: self.helo.as_deref().unwrap_or(""),
            client_ip: self.peer.ip(),
            hostname: &self.ctx.config.server.hostname,
            esmtp: self.esmtp,
            authenticated: self.auth_user.is_some(),
            smtputf8: tx.params.smtputf8,
            tls: self.tls.as_deref(),
            queue_id,
            date: now,
        })
    }

    /// The durable store, then the answer: `250` only once the spool has synced the message;
    /// then the ledger and the queue hear of it.
    async fn store(
        &mut self,
        id: QueueId,
        queue_id: &str,
        envelope: &Envelope,
        (head, content): ([&[u8]; 2], Content),
        signing: &Signing,
        started: std::time::Instant,
    ) {
        let size = head.iter().map(|p| p.len() as u64).sum::<u64>() + content.len();
        let stored = match content {
            Content::Inline(body) => self.ctx.spool.store_body(id, envelope, &head, body).await,
            Content::Spilled { spill, headers } => {
                let spool = &self.ctx.spool;
                spool.store_spilled(envelope, &head, &headers, spill).await
            }
        };
        match stored {
            Ok(()) => {
                // Metadata follows the durable store; losing it must never lose the message.
                if let Err(e) = self.ctx.ledger.accepted(id, envelope, size, signing) {
                    tracing::error!(queue_id = %queue_id, error = %e, "ledger write failed");
                }
                self.ctx.queue.submitted(id);
                self.idle_commands = 0;
                tracing::info!(
                    peer = %self.peer.ip(),
                    queue_id = %queue_id,
                    rcpts = envelope.recipients.len(),
                    size,
                    tls = self.tls.is_some(),
                    "accepted"
                );
                self.reply(Reply::new(250, "2.0.0", format!("OK queued as {queue_id}")));
                let listener = (!self.local).then_some(self.mode);
                crate::metrics::accepted(crate::metrics::listener_label(listener), started);
            }
            Err(e) => {
                tracing::error!(peer = %self.peer.ip(), error = %e, "spool write failed; message not accepted");
                self.reply(storage_refusal(&e));
            }
        }
    }

    /// DKIM-signs the message on a blocking thread (RSA costs ~0.3 ms of CPU; a spilled body
    /// is read back from its file a chunk at a time). Returns the signature headers to prepend
    /// (empty when the domain has no key) and the content back.
    async fn sign(
        &self,
        envelope: &Envelope,
        from_domain: Option<String>,
        content: Content,
    ) -> Result<(String, Signing, Content), Reply> {
        let keys = self.live.dkim.clone();
        if keys.is_empty() && !keys.require {
            return Ok((String::new(), Signing::default(), content));
        }
        let from = envelope.mail_from.clone();
        let quick = keys.signs_quickly()
            && matches!(&content, Content::Inline(body) if body.len() <= SIGN_INLINE_UP_TO);
        let (result, content) = if quick {
            sign_content(&keys, from_domain.as_deref(), &from, content)
        } else {
            tokio::task::spawn_blocking(move || {
                sign_content(&keys, from_domain.as_deref(), &from, content)
            })
            .await
            .map_err(|_| Reply::new(451, "4.3.0", "Local error in processing; try again later"))?
        };
        match result {
            Ok(signed) if signed.domain.is_some() => {
                tracing::debug!(domain = ?signed.domain, selectors = ?signed.selectors, "signed");
                let signing = Signing {
                    domain: signed.domain,
                    selectors: signed.selectors,
                };
                Ok((signed.headers, signing, content))
            }
            Ok(_) if self.live.dkim.require => {
                tracing::info!(peer = %self.peer.ip(), "refused: no DKIM key for the sending domain");
                Err(Reply::new(
                    550,
                    "5.7.1",
                    "No DKIM key for the sending domain; message not accepted",
                ))
            }
            Ok(_) => {
                tracing::info!(peer = %self.peer.ip(), domain = %envelope.sending_domain, "no DKIM key for the sending domain; relaying unsigned");
                Ok((String::new(), Signing::default(), content))
            }
            Err(e) => {
                tracing::error!(error = %e, "DKIM signing failed");
                Err(Reply::new(
                    451,
                    "4.3.0",
                    "Local error in processing; try again later",
                ))
            }
        }
    }

    async fn starttls(&mut self) -> Flow {
        if self.tls.is_some() {
            return self.error(Reply::new(503, "5.5.1", "TLS already active"));
        }
        if self.local {
            return self.error(Reply::new(
                454,
                "4.7.0",
                "TLS not available on the local socket",
            ));
        }
        self.reply(Reply::new(220, "2.0.0", "Ready to start TLS"));
        self.flush().await?;
        // Anything the client pipelined after STARTTLS was sent in the clear and could have
        // been injected by an attacker: it must not be executed inside TLS (CVE-2011-0411).
        self.input.clear();
        self.start_tls().await?;
        self.helo = None;
        self.esmtp = false;
        self.tx = None;
        self.auth_user = None;
        self.account = None;
        Ok(())
    }

    async fn start_tls(&mut self) -> Flow {
        let Stream::Plain(socket) = std::mem::replace(&mut self.stream, Stream::Upgrading) else {
            return Err(End::Disconnected);
        };
        let handshake = self.live.tls.accept(socket);
        match tokio::time::timeout(self.ctx.config.limits.command_timeout, handshake).await {
            Ok(Ok(tls)) => {
                self.tls = crate::tls::describe(tls.get_ref().1);
                self.stream = Stream::Tls(Box::new(tls));
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::info!(peer = %self.peer.ip(), error = %e, "TLS handshake failed");
                Err(End::Disconnected)
            }
            Err(_) => {
                tracing::info!(peer = %self.peer.ip(), "TLS handshake timed out");
                Err(End::Disconnected)
            }
        }
    }

    async fn auth(&mut self, mechanism: AuthMechanism, initial: Option<String>) -> Flow {
        if self.tls.is_none() {
            return self.error(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            ));
        }
        if self.live.accounts.is_empty() {
            return self.error(Reply::new(503, "5.5.1", "Authentication not enabled"));
        }
        if self.auth_user.is_some() || self.tx.is_some() {
            return self.error(Reply::new(503, "5.5.1", "AUTH not allowed now"));
        }
        let failures = LimitKey::AuthFailures(client_key(self.peer.ip()));
        let (strikes, until) = self.ctx.limits.strikes(&failures, self.ctx.clock.now());
        if strikes >= self.ctx.config.limits.max_auth_failures {
            return self.auth_locked(until);
        }
        let credentials = match mechanism {
            AuthMechanism::Plain => {
                let response = match initial {
                    Some(r) => r,
                    None => match self.challenge("").await? {
                        Ok(r) => r,
                        Err(refusal) => return self.error(refusal),
                    },
                };
                // "=" is an empty initial response (RFC 4954 section 4).
                let response = if response == "=" {
                    String::new()
                } else {
                    response
                };
                proto::decode_plain(&response)
            }
            AuthMechanism::Login => {
                let user = match initial {
                    Some(r) => r,
                    None => match self.challenge("VXNlcm5hbWU6").await? {
                        Ok(r) => r,
                        Err(refusal) => return self.error(refusal),
                    },
                };
                let pass = match self.challenge("UGFzc3dvcmQ6").await? {
                    Ok(r) => r,
                    Err(refusal) => return self.error(refusal),
                };
                proto::decode_base64_text(&user)
                    .and_then(|u| Ok((u, proto::decode_base64_text(&pass)?)))
            }
        };
        let (user, pass) = match credentials {
            Ok(c) => c,
            Err(e) => return self.error(e.reply()),
        };
        let priority = if strikes == 0 {
            Priority::Clean
        } else {
            Priority::Suspect
        };
        let accounts = self.live.accounts.clone();
        let pool = &self.ctx.auth_pool;
        match accounts.verify(pool, priority, &user, &pass).await {
            Some(account) if account.allows_ip(self.peer.ip()) => {
                tracing::info!(peer = %self.peer.ip(), "authenticated");
                self.auth_user = Some(user);
                self.account = Some(account);
                self.reply(Reply::new(235, "2.7.0", "Authentication successful"));
                Ok(())
            }
            Some(account) => {
                tracing::warn!(peer = %self.peer.ip(), account = %account.username, "login refused: address not in the account's allowed_ips");
                self.auth_failed(&failures).await
            }
            None => self.auth_failed(&failures).await,
        }
    }

    /// The sender rules in force: the account's after AUTH, the relay networks' for a client
    /// relaying without it, none otherwise.
    fn sender(&self) -> Option<Sender> {
        if let Some(account) = &self.account {
            return Some(Sender::account(&account.username, &account.policy));
        }
        let relay = &self.ctx.config.relay;
        relay
            .allows(self.peer.ip())
            .then(|| Sender::relay(self.peer.ip(), &relay.policy()))
    }

    /// Counts a failed login against the client's address and answers it after a delay
    /// that grows with each failure; the failure that reaches the limit closes the session.
    async fn auth_failed(&mut self, failures: &LimitKey) -> Flow {
        let limits = &self.ctx.config.limits;
        let cooldown = limits.auth_cooldown.as_secs() as i64;
        let strikes = self
            .ctx
            .limits
            .strike(failures, cooldown, self.ctx.clock.now());
        tracing::warn!(peer = %self.peer.ip(), strikes, "authentication failed");
        tokio::time::sleep(auth_failure_delay(strikes, limits.auth_failure_delay)).await;
        if strikes >= limits.max_auth_failures {
            let (_, until) = self.ctx.limits.strikes(failures, self.ctx.clock.now());
            return self.auth_locked(until);
        }
        self.error(Reply::new(
            535,
            "5.7.8",
            "Authentication credentials invalid",
        ))
    }

    /// Refuses AUTH from an address in its cool-down, and closes.
    fn auth_locked(&mut self, until: crate::limits::RetryAt) -> Flow {
        tracing::warn!(peer = %self.peer.ip(), "too many failed logins from this address; closing");
        let retry = retry_text(until, self.ctx.clock.now());
        self.reply(Reply::new(
            421,
            "4.7.0",
            format!("Too many failed logins from your address; try again {retry}"),
        ));
        Err(End::Closed)
    }

    /// Sends a 334 challenge and reads one response line. The refusal to send instead: `*`
    /// cancels (`501 5.7.0`), a line over [`MAX_AUTH_LINE`] is `500 5.5.6` (RFC 4954).
    async fn challenge(&mut self, text: &str) -> Result<Result<String, Reply>, End> {
        self.reply(Reply::plain(334, text));
        self.flush().await?;
        loop {
            match self.framer.next_line(&mut self.input) {
                Some(FramedLine::Line(line)) => {
                    let line = String::from_utf8_lossy(&line).trim().to_string();
                    if line == "*" {
                        return Ok(Err(Reply::new(501, "5.7.0", "Authentication cancelled")));
                    }
                    return Ok(Ok(line));
                }
                Some(FramedLine::TooLong) => {
                    return Ok(Err(Reply::new(
                        500,
                        "5.5.6",
                        "Authentication exchange line is too long",
                    )))
                }
                None => self.read_command_input().await?,
            }
        }
    }

    /// Queues a reply for the next flush.
    /// Says `reply` (a 221 or 421), flushes what is pending and ends the session.
    async fn close_with(&mut self, reply: Reply) -> Flow {
        self.reply(reply);
        let _ = self.flush().await;
        Err(End::Closed)
    }

    fn reply(&mut self, reply: Reply) {
        if reply.code >= 400 {
            crate::metrics::refused(reply.enhanced.unwrap_or("none"));
        }
        reply.write_to(&mut self.output);
    }

    /// Queues an error reply; too many errors end the session.
    fn error(&mut self, reply: Reply) -> Flow {
        self.reply(reply);
        self.errors += 1;
        if self.errors >= self.ctx.config.limits.max_errors {
            tracing::info!(peer = %self.peer.ip(), "too many errors; closing");
            self.reply(Reply::new(
                421,
                "4.7.0",
                "Too many errors; closing connection",
            ));
            return Err(End::Closed);
        }
        Ok(())
    }

    async fn flush(&mut self) -> Flow {
        if self.output.is_empty() {
            return Ok(());
        }
        let write = async {
            self.stream.write_all(&self.output).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.ctx.config.limits.command_timeout, write).await {
            Ok(Ok(())) => {
                self.output.clear();
                Ok(())
            }
            _ => Err(End::Disconnected),
        }
    }

    /// Waits for more command input, or ends the session on timeout or shutdown.
    async fn read_command_input(&mut self) -> Flow {
        let timeout = self.ctx.config.limits.command_timeout;
        let shutdown = self.ctx.shutdown.clone();
        tokio::select! {
            r = self.read_input(timeout, COMMAND_CHUNK) => r,
            _ = shutdown.cancelled() => {
                self.close_with(Reply::new(421, "4.3.2", "Service shutting down")).await
            }
        }
    }

    /// Waits for more message data; shutdown does not interrupt a transaction in progress.
    async fn read_data_input(&mut self) -> Flow {
        self.read_input(self.ctx.config.limits.data_timeout, DATA_CHUNK)
            .await
    }

    /// Waits for a place among the sessions receiving content, unless this transaction holds
    /// one already. False when none came free within `command_timeout`, and at once for a
    /// transaction that cannot take content (no MAIL, no recipient: refused by the caller).
    async fn take_data_slot(&mut self) -> bool {
        match &self.tx {
            None => return false,
            Some(tx) if tx.rcpts.is_empty() => return false,
            Some(tx) if tx.data_slot.is_some() => return true,
            Some(_) => {}
        }
        let slots = self.ctx.data_slots.clone();
        let wait = self.ctx.config.limits.command_timeout;
        // Waiting may take a while when thousands send at once: hold no empty buffer meanwhile.
        if slots.available_permits() == 0 {
            self.release_input();
        }
        match tokio::time::timeout(wait, slots.acquire_owned()).await {
            Ok(Ok(slot)) => {
                if let Some(tx) = self.tx.as_mut() {
                    tx.data_slot = Some(slot);
                }
                true
            }
            Ok(Err(_)) | Err(_) => {
                tracing::info!(peer = %self.peer.ip(), "no place for message content came free; told to try later");
                false
            }
        }
    }

    /// Gives the input buffer back when all it held has been handled, as a session is about to
    /// wait (for its client, or for the disk): 10,000 silent sessions hold no 8 KiB each. The
    /// next read takes one again. A few bytes still to handle move to a buffer their size.
    fn release_input(&mut self) {
        if self.input.is_empty() {
            self.input = BytesMut::new();
        } else if self.input.len() <= 1024 && self.input.capacity() > 4096 {
            // A pipelined command or two (QUIT after the data): kept, in a buffer their size.
            self.input = BytesMut::from(&self.input[..]);
        }
    }

    /// Reads what the client sent, with room for at least `chunk` more bytes.
    async fn read_input(&mut self, timeout: Duration, chunk: usize) -> Flow {
        let left = self
            .deadline
            .saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return self.session_expired().await;
        }
        self.release_input();
        let read = async {
            self.stream.readable().await?;
            self.input.reserve(chunk);
            self.stream.read_buf(&mut self.input).await
        };
        match tokio::time::timeout(timeout.min(left), read).await {
            Ok(Ok(0)) | Ok(Err(_)) => Err(End::Disconnected),
            Ok(Ok(_)) => Ok(()),
            Err(_) if timeout > left => self.session_expired().await,
            Err(_) => {
                tracing::info!(peer = %self.peer.ip(), "timeout");
                self.close_with(Reply::new(
                    421,
                    "4.4.2",
                    "Timeout exceeded; closing connection",
                ))
                .await
            }
        }
    }

    /// The whole-session deadline passed (checked whenever input is awaited).
    async fn session_expired(&mut self) -> Flow {
        tracing::info!(peer = %self.peer.ip(), "session time limit reached");
        self.close_with(Reply::new(
            421,
            "4.4.2",
            "Session time limit reached; closing connection",
        ))
        .await
    }
}

/// The reply to a message the spool could not store: 452 when the disk is full, else 451.
fn storage_refusal(e: &SpoolError) -> Reply {
    use std::io::ErrorKind;
    let disk_full = matches!(e, SpoolError::Io(io)
        if matches!(io.kind(), ErrorKind::StorageFull | ErrorKind::FileTooLarge | ErrorKind::QuotaExceeded));
    if disk_full {
        Reply::new(452, "4.3.1", "Insufficient system storage; try again later")
    } else {
        Reply::new(451, "4.3.0", "Local error in processing; try again later")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_before_a_failed_login_doubles_up_to_a_cap() {
        let base = Duration::from_millis(500);
        let delays: Vec<u64> = (1..=8)
            .map(|n| auth_failure_delay(n, base).as_millis() as u64)
            .collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert_eq!(auth_failure_delay(u64::MAX, base), MAX_AUTH_DELAY);
        assert!(auth_failure_delay(3, Duration::ZERO).is_zero());
    }

    #[test]
    fn only_auth_lines_may_pass_the_command_limit() {
        assert!(is_auth_line(b"AUTH PLAIN AAAA"));
        assert!(is_auth_line(b"auth plain AAAA"));
        assert!(!is_auth_line(b"MAIL FROM:<a@b>"));
        assert!(!is_auth_line(b"AUTHX"));
    }
}
