//! The SMTP client: one connection to a remote server, able to carry several transactions.
//!
//! The client speaks ESMTP with PIPELINING when offered (MAIL, every RCPT and DATA in one
//! write), upgrades with STARTTLS according to the TLS policy, and reports per-recipient
//! replies. Nothing the server sent after its reply to STARTTLS is kept (response injection).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::tls::{TlsClient, TlsInfo};
use crate::config::TlsPolicy;
use crate::proto::stuffing::CHUNK as STUFF_CHUNK;
use crate::proto::{parse_response, DotStuffer, EnhancedStatusCode, Response, ResponseError};
use crate::spool::Body;

/// The step of a session something happened in (for errors and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Greeting,
    Ehlo,
    Helo,
    StartTls,
    Auth,
    Mail,
    Rcpt,
    Data,
    EndOfData,
    Rset,
    Quit,
}

impl std::fmt::Display for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Stage::Greeting => "greeting",
            Stage::Ehlo => "EHLO",
            Stage::Helo => "HELO",
            Stage::StartTls => "STARTTLS",
            Stage::Auth => "AUTH",
            Stage::Mail => "MAIL",
            Stage::Rcpt => "RCPT",
            Stage::Data => "DATA",
            Stage::EndOfData => "end of data",
            Stage::Rset => "RSET",
            Stage::Quit => "QUIT",
        })
    }
}

/// Why a connection or transaction failed as a whole.
///
/// `Display` is for logs, so it never includes the remote server's reply text (it often quotes
/// the address); the full reply travels in [`ClientError::Rejected`] for the DSN and the sealed
/// ledger.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// `reason` is the operating system's, not the remote's.
    #[error("connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("timeout waiting for {0}")]
    Timeout(Stage),
    #[error("connection lost during {0}")]
    Lost(Stage),
    #[error("unreadable reply during {stage}: {error}")]
    Protocol { stage: Stage, error: ResponseError },
    #[error("{host} offers no AUTH PLAIN or LOGIN")]
    NoAuthMechanism { host: String },
    /// The server answered a whole-session command (greeting, EHLO, MAIL, DATA) negatively.
    #[error("{stage} refused: {} {}", .reply.code, .reply.status())]
    Rejected { stage: Stage, reply: Response },
    /// TLS was required and could not be had, or the handshake failed (our own words).
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{host} does not support SMTPUTF8, which this message requires")]
    NoSmtpUtf8 { host: String },
    #[error("message size {size} exceeds {host}'s limit of {limit}")]
    TooBig {
        host: String,
        size: usize,
        limit: u64,
    },
    /// The server gives our own name in its greeting or EHLO reply: it is us (RFC 5321 6.3).
    #[error("{host} announces itself as this server at {stage}: mail loops back to myself")]
    LoopsBack { host: String, stage: Stage },
    /// The message could not be read back from the spool while it was being sent (ours, not
    /// the server's): the connection is dropped mid-DATA, so the server discards the content.
    #[error("cannot read the message from the spool: {0}")]
    Body(String),
}

impl ClientError {
    /// The RFC 3463 status this failure reports.
    pub fn status(&self) -> EnhancedStatusCode {
        match self {
            ClientError::Rejected { reply, .. } => reply.status(),
            ClientError::NoSmtpUtf8 { .. } => EnhancedStatusCode::new(5, 6, 7),
            ClientError::TooBig { .. } => EnhancedStatusCode::new(5, 3, 4),
            ClientError::Tls(_) => EnhancedStatusCode::new(4, 7, 5),
            ClientError::LoopsBack { .. } => EnhancedStatusCode::new(5, 4, 6),
            ClientError::NoAuthMechanism { .. } => EnhancedStatusCode::new(4, 7, 0),
            ClientError::Body(_) => EnhancedStatusCode::new(4, 3, 0),
            ClientError::Connect { .. }
            | ClientError::Timeout(_)
            | ClientError::Lost(_)
            | ClientError::Protocol { .. } => EnhancedStatusCode::new(4, 4, 1),
        }
    }

    /// True when a later attempt may succeed.
    pub fn is_temporary(&self) -> bool {
        self.status().is_transient()
    }
}

/// What the server offered in its EHLO reply.
#[derive(Debug, Clone, Default)]
pub struct Extensions {
    pub pipelining: bool,
    pub starttls: bool,
    pub eight_bit: bool,
    pub smtputf8: bool,
    /// SIZE limit, if announced (0 means none).
    pub size: Option<u64>,
    pub auth_plain: bool,
    pub auth_login: bool,
}

/// What a message asks of the server.
#[derive(Debug, Clone, Copy, Default)]
pub struct Needs {
    pub eight_bit: bool,
    pub smtputf8: bool,
}

/// Timeouts and identity for a connection.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub helo: String,
    pub connect_timeout: Duration,
    pub reply_timeout: Duration,
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while the TLS handshake owns the socket, or after it failed.
    Closed,
}

/// An open SMTP connection after EHLO (and STARTTLS, when done).
pub struct Connection {
    stream: Stream,
    input: BytesMut,
    pub ext: Extensions,
    pub tls: Option<TlsInfo>,
    /// Host name the connection was made for (MX or smarthost), and its address.
    pub host: String,
    pub addr: SocketAddr,
    /// Transactions completed on this connection.
    pub transactions: usize,
    opts: ClientOptions,
}

/// The server's answers to one transaction.
#[derive(Debug, Clone)]
pub struct Transaction {
    /// One reply per recipient, in the order given.
    pub rcpt: Vec<Response>,
    /// The reply to the end of data; None when no recipient was accepted.
    pub data: Option<Response>,
}

impl Connection {
    /// Connects, reads the greeting, says EHLO and applies the TLS policy.
    pub async fn open(
        addr: SocketAddr,
        host: &str,
        policy: TlsPolicy,
        tls: &TlsClient,
        opts: &ClientOptions,
    ) -> Result<Connection, ClientError> {
        let connect = tokio::time::timeout(opts.connect_timeout, TcpStream::connect(addr)).await;
        let socket = match connect {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return Err(ClientError::Connect {
                    addr,
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(ClientError::Connect {
                    addr,
                    reason: "timed out".into(),
                })
            }
        };
        let _ = socket.set_nodelay(true);
        let mut conn = Connection {
            stream: Stream::Plain(socket),
            input: BytesMut::with_capacity(4096),
            ext: Extensions::default(),
            tls: None,
            host: host.to_string(),
            addr,
            transactions: 0,
            opts: opts.clone(),
        };
        let greeting = conn.read_reply(Stage::Greeting).await?;
        if greeting.code != 220 {
            return Err(ClientError::Rejected {
                stage: Stage::Greeting,
                reply: greeting,
            });
        }
        conn.check_not_myself(&greeting, Stage::Greeting)?;
        conn.hello().await?;
        match policy {
            TlsPolicy::None => {}
            TlsPolicy::Opportunistic if !conn.ext.starttls => {}
            TlsPolicy::Require if !conn.ext.starttls => {
                let _ = conn.quit().await;
                return Err(ClientError::Tls(format!("{host} does not offer STARTTLS")));
            }
            TlsPolicy::Opportunistic | TlsPolicy::Require => {
                conn.starttls(policy, tls).await?;
                conn.hello().await?;
            }
        }
        Ok(conn)
    }

    async fn hello(&mut self) -> Result<(), ClientError> {
        let ehlo = self
            .command(&format!("EHLO {}", self.opts.helo), Stage::Ehlo)
            .await?;
        if ehlo.code == 250 {
            self.check_not_myself(&ehlo, Stage::Ehlo)?;
            self.ext = parse_extensions(&ehlo);
            return Ok(());
        }
        // A server without ESMTP: HELO, and no extensions.
        let helo = self
            .command(&format!("HELO {}", self.opts.helo), Stage::Helo)
            .await?;
        if helo.code != 250 {
            return Err(ClientError::Rejected {
                stage: Stage::Helo,
                reply: helo,
            });
        }
        self.ext = Extensions::default();
        Ok(())
    }

    /// A server that names itself with our own hostname is this server (an MX or route
    /// pointing back at us): delivering would loop, so the attempt fails at once (5.4.6).
    fn check_not_myself(&self, reply: &Response, stage: Stage) -> Result<(), ClientError> {
        match reply.first_word() {
            Some(name) if name.eq_ignore_ascii_case(&self.opts.helo) => {
                Err(ClientError::LoopsBack {
                    host: self.host.clone(),
                    stage,
                })
            }
            _ => Ok(()),
        }
    }

    async fn starttls(&mut self, policy: TlsPolicy, tls: &TlsClient) -> Result<(), ClientError> {
        let reply = self.command("STARTTLS", Stage::StartTls).await?;
        if reply.code != 220 {
            return Err(ClientError::Rejected {
                stage: Stage::StartTls,
                reply,
            });
        }
        if !self.input.is_empty() {
            tracing::warn!(host = %self.host, bytes = self.input.len(), "discarding data sent before the TLS handshake");
            self.input.clear();
        }
        let Stream::Plain(socket) = std::mem::replace(&mut self.stream, Stream::Closed) else {
            return Err(ClientError::Tls("STARTTLS on a TLS connection".into()));
        };
        let (stream, info) = tls
            .connect(socket, &self.host, policy, self.opts.reply_timeout)
            .await?;
        self.stream = Stream::Tls(Box::new(stream));
        self.tls = Some(info);
        Ok(())
    }

    /// Authenticates (smarthost): PLAIN when offered, else LOGIN. Only over TLS.
    pub async fn auth(&mut self, username: &str, password: &str) -> Result<(), ClientError> {
        if self.tls.is_none() {
            return Err(ClientError::Tls(
                "refusing to send credentials without TLS".into(),
            ));
        }
        let reply = if self.ext.auth_plain {
            let token = crate::proto::encode_base64(&format!("\0{username}\0{password}"));
            self.command(&format!("AUTH PLAIN {token}"), Stage::Auth)
                .await?
        } else if self.ext.auth_login {
            let r = self.command("AUTH LOGIN", Stage::Auth).await?;
            if r.code != 334 {
                return Err(ClientError::Rejected {
                    stage: Stage::Auth,
                    reply: r,
                });
            }
            let r = self
                .command(&crate::proto::encode_base64(username), Stage::Auth)
                .await?;
            if r.code != 334 {
                return Err(ClientError::Rejected {
                    stage: Stage::Auth,
                    reply: r,
                });
            }
            self.command(&crate::proto::encode_base64(password), Stage::Auth)
                .await?
        } else {
            return Err(ClientError::NoAuthMechanism {
                host: self.host.clone(),
            });
        };
        if reply.code != 235 {
            return Err(ClientError::Rejected {
                stage: Stage::Auth,
                reply,
            });
        }
        Ok(())
    }

    /// Sends one message to `rcpts`. `body` has CRLF line endings and ends with CRLF.
    pub async fn send(
        &mut self,
        from: &str,
        rcpts: &[&str],
        body: &Body,
        needs: Needs,
    ) -> Result<Transaction, ClientError> {
        let mail = self.mail_command(from, body.len() as usize, needs)?;
        let mut rcpt_replies = Vec::with_capacity(rcpts.len());
        let data_reply;
        if self.ext.pipelining {
            let mut batch = format!("{mail}\r\n");
            for r in rcpts {
                batch.push_str(&format!("RCPT TO:<{r}>\r\n"));
            }
            batch.push_str("DATA\r\n");
            self.write(batch.as_bytes(), Stage::Mail).await?;
            let mail_reply = self.read_reply(Stage::Mail).await?;
            for _ in rcpts {
                rcpt_replies.push(self.read_reply(Stage::Rcpt).await?);
            }
            data_reply = self.read_reply(Stage::Data).await?;
            if mail_reply.code != 250 {
                self.after_failed_transaction(data_reply.code == 354)
                    .await?;
                return Err(ClientError::Rejected {
                    stage: Stage::Mail,
                    reply: mail_reply,
                });
            }
        } else {
            let mail_reply = self.command(&mail, Stage::Mail).await?;
            if mail_reply.code != 250 {
                self.reset().await?;
                return Err(ClientError::Rejected {
                    stage: Stage::Mail,
                    reply: mail_reply,
                });
            }
            for r in rcpts {
                rcpt_replies.push(self.command(&format!("RCPT TO:<{r}>"), Stage::Rcpt).await?);
            }
            if !rcpt_replies.iter().any(Response::is_success) {
                self.reset().await?;
                return Ok(Transaction {
                    rcpt: rcpt_replies,
                    data: None,
                });
            }
            data_reply = self.command("DATA", Stage::Data).await?;
        }
        self.data(rcpt_replies, data_reply, body).await
    }

    /// The MAIL command for this server: SIZE, BODY=8BITMIME and SMTPUTF8 as it offers and the
    /// message needs. Refuses what the server cannot take (too big, UTF-8 without SMTPUTF8).
    fn mail_command(&self, from: &str, size: usize, needs: Needs) -> Result<String, ClientError> {
        if needs.smtputf8 && !self.ext.smtputf8 {
            return Err(ClientError::NoSmtpUtf8 {
                host: self.host.clone(),
            });
        }
        if let Some(limit) = self.ext.size.filter(|l| *l > 0) {
            if size as u64 > limit {
                return Err(ClientError::TooBig {
                    host: self.host.clone(),
                    size,
                    limit,
                });
            }
        }
        let mut mail = format!("MAIL FROM:<{from}>");
        if self.ext.size.is_some() {
            mail.push_str(&format!(" SIZE={size}"));
        }
        // Without 8BITMIME the body is sent as it is (as Postfix does); it has no bare CR/LF.
        if needs.eight_bit && self.ext.eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if needs.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        Ok(mail)
    }

    /// After DATA was answered: the content when a recipient was accepted and the server said
    /// 354, else the transaction is ended as the server's replies require.
    async fn data(
        &mut self,
        rcpt_replies: Vec<Response>,
        data_reply: Response,
        body: &Body,
    ) -> Result<Transaction, ClientError> {
        let accepted = rcpt_replies.iter().any(Response::is_success);
        if data_reply.code != 354 {
            if accepted {
                self.reset().await?;
                return Err(ClientError::Rejected {
                    stage: Stage::Data,
                    reply: data_reply,
                });
            }
            // Pipelined DATA after all recipients failed: the expected refusal.
            self.reset().await?;
            return Ok(Transaction {
                rcpt: rcpt_replies,
                data: None,
            });
        }
        if !accepted {
            // The server took DATA although no recipient was accepted: end it empty.
            self.write(b".\r\n", Stage::Data).await?;
            let _ = self.read_reply(Stage::Data).await?;
            return Ok(Transaction {
                rcpt: rcpt_replies,
                data: None,
            });
        }
        self.content(body).await?;
        let end = self.read_reply(Stage::EndOfData).await?;
        self.transactions += 1;
        Ok(Transaction {
            rcpt: rcpt_replies,
            data: Some(end),
        })
    }

    /// Sends the content, stuffed, and the terminator, a chunk at a time: N deliveries of one
    /// message at once hold N small buffers (a spilled body is read from its file as it goes).
    async fn content(&mut self, body: &Body) -> Result<(), ClientError> {
        let body_error = |e: std::io::Error| ClientError::Body(e.to_string());
        let mut chunks = body.chunks().map_err(body_error)?;
        let mut stuffer = DotStuffer::new();
        let size = (body.len() as usize).min(STUFF_CHUNK);
        let mut out = Vec::with_capacity(size + size / 8 + 8);
        while let Some(chunk) = chunks.next().await.map_err(body_error)? {
            for piece in chunk.chunks(STUFF_CHUNK) {
                stuffer.push(piece, &mut out);
                if out.len() >= STUFF_CHUNK {
                    self.write(&out, Stage::Data).await?;
                    out.clear();
                }
            }
        }
        // The terminator goes with the last of the content: one write for a small message.
        stuffer.finish(&mut out);
        self.write(&out, Stage::Data).await
    }

    async fn after_failed_transaction(&mut self, data_open: bool) -> Result<(), ClientError> {
        if data_open {
            self.write(b".\r\n", Stage::Data).await?;
            self.read_reply(Stage::Data).await?;
        }
        self.reset().await
    }

    /// Whether an idle connection is still open: the server has neither closed it nor said
    /// anything unasked (a `421` before closing). One non-blocking read, no round trip.
    pub fn is_open(&self) -> bool {
        let socket = match &self.stream {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
            Stream::Closed => return false,
        };
        let mut probe = [0u8; 1];
        self.input.is_empty()
            && matches!(socket.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }

    /// RSET, after a refused transaction.
    async fn reset(&mut self) -> Result<(), ClientError> {
        let reply = self.command("RSET", Stage::Rset).await?;
        if reply.code != 250 {
            return Err(ClientError::Rejected {
                stage: Stage::Rset,
                reply,
            });
        }
        Ok(())
    }

    /// Says QUIT and closes, ignoring errors (the work is done either way).
    pub async fn quit(mut self) -> Result<(), ClientError> {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.write(b"QUIT\r\n", Stage::Quit).await;
            let _ = self.read_reply(Stage::Quit).await;
        })
        .await;
        Ok(())
    }

    async fn command(&mut self, line: &str, stage: Stage) -> Result<Response, ClientError> {
        self.write(format!("{line}\r\n").as_bytes(), stage).await?;
        self.read_reply(stage).await
    }

    async fn write(&mut self, bytes: &[u8], stage: Stage) -> Result<(), ClientError> {
        let timeout = self.opts.reply_timeout;
        let result = tokio::time::timeout(timeout, async {
            match &mut self.stream {
                Stream::Plain(s) => write_all(s, bytes).await,
                Stream::Tls(s) => write_all(s, bytes).await,
                Stream::Closed => Err(std::io::ErrorKind::NotConnected.into()),
            }
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ClientError::Lost(stage)),
            Err(_) => Err(ClientError::Timeout(stage)),
        }
    }

    async fn read_reply(&mut self, stage: Stage) -> Result<Response, ClientError> {
        let timeout = self.opts.reply_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match parse_response(&mut self.input) {
                Ok(Some(reply)) => return Ok(reply),
                Ok(None) => {}
                Err(error) => return Err(ClientError::Protocol { stage, error }),
            }
            self.input.reserve(4096);
            let read = tokio::time::timeout_at(deadline, async {
                match &mut self.stream {
                    Stream::Plain(s) => s.read_buf(&mut self.input).await,
                    Stream::Tls(s) => s.read_buf(&mut self.input).await,
                    Stream::Closed => Err(std::io::ErrorKind::NotConnected.into()),
                }
            })
            .await;
            match read {
                Ok(Ok(0)) | Ok(Err(_)) => return Err(ClientError::Lost(stage)),
                Ok(Ok(_)) => {}
                Err(_) => return Err(ClientError::Timeout(stage)),
            }
        }
    }
}

async fn write_all<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    bytes: &[u8],
) -> std::io::Result<()> {
    s.write_all(bytes).await?;
    s.flush().await
}

fn parse_extensions(ehlo: &Response) -> Extensions {
    let mut ext = Extensions::default();
    // The first line is the server's name and greeting; each later line is one keyword.
    for line in ehlo.lines.iter().skip(1) {
        let mut words = line.split_whitespace().map(|w| w.to_ascii_uppercase());
        let keyword = words.next().unwrap_or_default();
        let params: Vec<String> = words.collect();
        match keyword.as_str() {
            "PIPELINING" => ext.pipelining = true,
            "STARTTLS" => ext.starttls = true,
            "8BITMIME" => ext.eight_bit = true,
            "SMTPUTF8" => ext.smtputf8 = true,
            "SIZE" => ext.size = Some(params.first().and_then(|n| n.parse().ok()).unwrap_or(0)),
            "AUTH" => {
                ext.auth_plain |= params.iter().any(|m| m == "PLAIN");
                ext.auth_login |= params.iter().any(|m| m == "LOGIN");
            }
            _ => {}
        }
    }
    ext
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_from_the_ehlo_reply() {
        let mut buf = BytesMut::from(&b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"[..]);
        let r = parse_response(&mut buf).unwrap().unwrap();
        let ext = parse_extensions(&r);
        assert!(ext.pipelining && !ext.starttls);
        assert_eq!(ext.size, Some(1000));
    }

    #[test]
    fn error_display_leaves_the_remote_text_out() {
        let mut buf = BytesMut::from(&b"550 5.1.1 <secret@dest.test> unknown\r\n"[..]);
        let reply = parse_response(&mut buf).unwrap().unwrap();
        let e = ClientError::Rejected {
            stage: Stage::Mail,
            reply,
        };
        assert_eq!(e.to_string(), "MAIL refused: 550 5.1.1");
        assert!(!e.is_temporary());
        assert_eq!(e.status(), EnhancedStatusCode::new(5, 1, 1));
    }

    /// A connection to a one-shot server that greets, answers EHLO, then does `after` (and
    /// holds the socket open until the test ends).
    async fn connection_then(after: &'static [u8], close: bool) -> Connection {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"220 mx.test ESMTP\r\n").await.unwrap();
            let mut line = [0u8; 64];
            let _ = s.read(&mut line).await.unwrap();
            s.write_all(b"250 mx.test\r\n").await.unwrap();
            s.write_all(after).await.unwrap();
            if !close {
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        });
        let opts = ClientOptions {
            helo: "me.test".into(),
            connect_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(5),
        };
        let tls = TlsClient::new(None).unwrap();
        let conn = Connection::open(addr, "mx.test", TlsPolicy::None, &tls, &opts)
            .await
            .unwrap();
        // Let whatever the server did after EHLO reach this side's socket.
        tokio::time::sleep(Duration::from_millis(100)).await;
        conn
    }

    #[tokio::test]
    async fn an_idle_connection_is_open_until_the_server_closes_or_speaks() {
        assert!(connection_then(b"", false).await.is_open());
        assert!(!connection_then(b"", true).await.is_open());
        let parting = b"421 4.4.2 mx.test idle too long\r\n";
        assert!(!connection_then(parting, false).await.is_open());
    }
}
