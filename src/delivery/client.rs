//! The SMTP client: one connection to a remote server, able to carry several transactions.
//!
//! The client speaks ESMTP with PIPELINING when offered (MAIL, every RCPT and DATA in one
//! write), upgrades with STARTTLS according to the TLS policy, and reports per-recipient
//! replies. Nothing the server sent after its reply to STARTTLS is kept (response injection).

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::tls::{TlsClient, TlsInfo};
use crate::config::TlsPolicy;

/// A reply from the remote server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteReply {
    pub code: u16,
    /// All lines' text, joined with a space.
    pub text: String,
    /// The lines' text, one by one (EHLO keywords are one per line).
    pub lines: Vec<String>,
}

impl RemoteReply {
    /// The enhanced status code at the start of the text, if the server sent one.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.text.split_whitespace().next()?;
        let parts: Vec<&str> = first.split('.').collect();
        let valid = parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()));
        valid.then_some(first)
    }

    /// "550 5.1.1 User unknown", for diagnostics.
    pub fn to_line(&self) -> String {
        format!("{} {}", self.code, self.text)
    }
}

/// Why a connection or transaction failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {addr}: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("timeout waiting for {0}")]
    Timeout(&'static str),
    #[error("connection lost during {0}")]
    Lost(&'static str),
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The server answered a whole-session command (greeting, EHLO, MAIL, DATA) negatively.
    #[error("{stage}: {}", reply.to_line())]
    Rejected {
        stage: &'static str,
        reply: RemoteReply,
    },
    /// TLS was required and could not be had, or the handshake failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The message needs an extension the server lacks (SMTPUTF8) or exceeds its SIZE.
    #[error("{reason}")]
    Unsupported {
        status: &'static str,
        reason: String,
    },
}

impl ClientError {
    /// True when a later attempt may succeed.
    pub fn is_temporary(&self) -> bool {
        match self {
            ClientError::Rejected { reply, .. } => reply.code < 500,
            ClientError::Unsupported { .. } => false,
            _ => true,
        }
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

/// Largest reply accepted from a server; more is a protocol error, not unbounded memory.
const MAX_REPLY: usize = 64 * 1024;

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
    pub rcpt: Vec<RemoteReply>,
    /// The reply to the end of data; None when no recipient was accepted.
    pub data: Option<RemoteReply>,
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
        let greeting = conn.read_reply("greeting").await?;
        if greeting.code != 220 {
            return Err(ClientError::Rejected {
                stage: "greeting",
                reply: greeting,
            });
        }
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
            .command(&format!("EHLO {}", self.opts.helo), "EHLO")
            .await?;
        if ehlo.code == 250 {
            self.ext = parse_extensions(&ehlo);
            return Ok(());
        }
        // A server without ESMTP: HELO, and no extensions.
        let helo = self
            .command(&format!("HELO {}", self.opts.helo), "HELO")
            .await?;
        if helo.code != 250 {
            return Err(ClientError::Rejected {
                stage: "HELO",
                reply: helo,
            });
        }
        self.ext = Extensions::default();
        Ok(())
    }

    async fn starttls(&mut self, policy: TlsPolicy, tls: &TlsClient) -> Result<(), ClientError> {
        let reply = self.command("STARTTLS", "STARTTLS").await?;
        if reply.code != 220 {
            return Err(ClientError::Rejected {
                stage: "STARTTLS",
                reply,
            });
        }
        if !self.input.is_empty() {
            tracing::warn!(host = %self.host, bytes = self.input.len(), "discarding data sent before the TLS handshake");
            self.input.clear();
        }
        let Stream::Plain(socket) = std::mem::replace(&mut self.stream, Stream::Closed) else {
            return Err(ClientError::Protocol("STARTTLS on a TLS connection".into()));
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
            self.command(&format!("AUTH PLAIN {token}"), "AUTH").await?
        } else if self.ext.auth_login {
            let r = self.command("AUTH LOGIN", "AUTH").await?;
            if r.code != 334 {
                return Err(ClientError::Rejected {
                    stage: "AUTH",
                    reply: r,
                });
            }
            let r = self
                .command(&crate::proto::encode_base64(username), "AUTH")
                .await?;
            if r.code != 334 {
                return Err(ClientError::Rejected {
                    stage: "AUTH",
                    reply: r,
                });
            }
            self.command(&crate::proto::encode_base64(password), "AUTH")
                .await?
        } else {
            return Err(ClientError::Protocol(format!(
                "{} offers no AUTH PLAIN or LOGIN",
                self.host
            )));
        };
        if reply.code != 235 {
            return Err(ClientError::Rejected {
                stage: "AUTH",
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
        body: &[u8],
        needs: Needs,
    ) -> Result<Transaction, ClientError> {
        if needs.smtputf8 && !self.ext.smtputf8 {
            return Err(ClientError::Unsupported {
                status: "5.6.7",
                reason: format!(
                    "{} does not support SMTPUTF8, which this message requires",
                    self.host
                ),
            });
        }
        if let Some(limit) = self.ext.size.filter(|l| *l > 0) {
            if body.len() as u64 > limit {
                return Err(ClientError::Unsupported {
                    status: "5.3.4",
                    reason: format!(
                        "message size {} exceeds {}'s limit of {limit}",
                        body.len(),
                        self.host
                    ),
                });
            }
        }
        let mut mail = format!("MAIL FROM:<{from}>");
        if self.ext.size.is_some() {
            mail.push_str(&format!(" SIZE={}", body.len()));
        }
        // Without 8BITMIME the body is sent as it is (as Postfix does); it has no bare CR/LF.
        if needs.eight_bit && self.ext.eight_bit {
            mail.push_str(" BODY=8BITMIME");
        }
        if needs.smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        let mut rcpt_replies = Vec::with_capacity(rcpts.len());
        let data_reply;
        if self.ext.pipelining {
            let mut batch = format!("{mail}\r\n");
            for r in rcpts {
                batch.push_str(&format!("RCPT TO:<{r}>\r\n"));
            }
            batch.push_str("DATA\r\n");
            self.write(batch.as_bytes(), "MAIL").await?;
            let mail_reply = self.read_reply("MAIL").await?;
            for _ in rcpts {
                rcpt_replies.push(self.read_reply("RCPT").await?);
            }
            data_reply = self.read_reply("DATA").await?;
            if mail_reply.code != 250 {
                self.after_failed_transaction(data_reply.code == 354)
                    .await?;
                return Err(ClientError::Rejected {
                    stage: "MAIL",
                    reply: mail_reply,
                });
            }
        } else {
            let mail_reply = self.command(&mail, "MAIL").await?;
            if mail_reply.code != 250 {
                self.reset().await?;
                return Err(ClientError::Rejected {
                    stage: "MAIL",
                    reply: mail_reply,
                });
            }
            for r in rcpts {
                rcpt_replies.push(self.command(&format!("RCPT TO:<{r}>"), "RCPT").await?);
            }
            if !rcpt_replies.iter().any(|r| r.code / 100 == 2) {
                self.reset().await?;
                return Ok(Transaction {
                    rcpt: rcpt_replies,
                    data: None,
                });
            }
            data_reply = self.command("DATA", "DATA").await?;
        }
        let accepted = rcpt_replies.iter().any(|r| r.code / 100 == 2);
        if data_reply.code != 354 {
            if accepted {
                self.reset().await?;
                return Err(ClientError::Rejected {
                    stage: "DATA",
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
            self.write(b".\r\n", "DATA").await?;
            let _ = self.read_reply("DATA").await?;
            return Ok(Transaction {
                rcpt: rcpt_replies,
                data: None,
            });
        }
        let stuffed = dot_stuff(body);
        self.write(&stuffed, "DATA").await?;
        let end = self.read_reply("end of data").await?;
        self.transactions += 1;
        Ok(Transaction {
            rcpt: rcpt_replies,
            data: Some(end),
        })
    }

    async fn after_failed_transaction(&mut self, data_open: bool) -> Result<(), ClientError> {
        if data_open {
            self.write(b".\r\n", "DATA").await?;
            self.read_reply("DATA").await?;
        }
        self.reset().await
    }

    /// RSET, to start a clean transaction on a reused connection.
    pub async fn reset(&mut self) -> Result<(), ClientError> {
        let reply = self.command("RSET", "RSET").await?;
        if reply.code != 250 {
            return Err(ClientError::Rejected {
                stage: "RSET",
                reply,
            });
        }
        Ok(())
    }

    /// Says QUIT and closes, ignoring errors (the work is done either way).
    pub async fn quit(mut self) -> Result<(), ClientError> {
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            let _ = self.write(b"QUIT\r\n", "QUIT").await;
            let _ = self.read_reply("QUIT").await;
        })
        .await;
        Ok(())
    }

    async fn command(
        &mut self,
        line: &str,
        stage: &'static str,
    ) -> Result<RemoteReply, ClientError> {
        self.write(format!("{line}\r\n").as_bytes(), stage).await?;
        self.read_reply(stage).await
    }

    async fn write(&mut self, bytes: &[u8], stage: &'static str) -> Result<(), ClientError> {
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

    async fn read_reply(&mut self, stage: &'static str) -> Result<RemoteReply, ClientError> {
        let timeout = self.opts.reply_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(reply) = parse_reply(&mut self.input)? {
                return Ok(reply);
            }
            if self.input.len() > MAX_REPLY {
                return Err(ClientError::Protocol("reply too long".into()));
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

/// Takes one complete reply off the front of `buf`, if there is one.
pub fn parse_reply(buf: &mut BytesMut) -> Result<Option<RemoteReply>, ClientError> {
    let mut pos = 0;
    let mut code = None;
    let mut text = Vec::new();
    loop {
        let Some(nl) = buf[pos..].iter().position(|b| *b == b'\n') else {
            return Ok(None);
        };
        let raw = &buf[pos..pos + nl];
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
            return Err(ClientError::Protocol(format!(
                "malformed reply line {:?}",
                String::from_utf8_lossy(&line[..line.len().min(80)])
            )));
        }
        let this: u16 =
            (line[0] - b'0') as u16 * 100 + (line[1] - b'0') as u16 * 10 + (line[2] - b'0') as u16;
        if *code.get_or_insert(this) != this {
            return Err(ClientError::Protocol(
                "reply lines with different codes".into(),
            ));
        }
        text.push(String::from_utf8_lossy(line.get(4..).unwrap_or(b"")).into_owned());
        pos += nl + 1;
        if line.get(3) != Some(&b'-') {
            buf.advance(pos);
            return Ok(Some(RemoteReply {
                code: this,
                text: text.join(" "),
                lines: text,
            }));
        }
    }
}

fn parse_extensions(ehlo: &RemoteReply) -> Extensions {
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

/// RFC 5321 4.5.2 transparency: a line starting with "." gets another; then the terminator.
pub fn dot_stuff(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 64 + 5);
    let mut line_start = true;
    for &b in body {
        if line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        line_start = b == b'\n';
    }
    if !body.is_empty() && !body.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_across_lines_and_reject_garbage() {
        let mut buf =
            BytesMut::from(&b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n354 go"[..]);
        let r = parse_reply(&mut buf).unwrap().unwrap();
        assert_eq!(r.code, 250);
        let ext = parse_extensions(&r);
        assert!(ext.pipelining && !ext.starttls);
        assert_eq!(ext.size, Some(1000));
        assert!(parse_reply(&mut buf).unwrap().is_none(), "incomplete line");
        buf.extend_from_slice(b"\r\n");
        assert_eq!(parse_reply(&mut buf).unwrap().unwrap().code, 354);
        let mut bad = BytesMut::from(&b"hello\r\n"[..]);
        assert!(parse_reply(&mut bad).is_err());
        let mut mixed = BytesMut::from(&b"250-a\r\n450 b\r\n"[..]);
        assert!(parse_reply(&mut mixed).is_err());
    }

    #[test]
    fn enhanced_codes() {
        let r = |t: &str| RemoteReply {
            code: 550,
            text: t.into(),
            lines: vec![t.into()],
        };
        assert_eq!(r("5.1.1 User unknown").enhanced(), Some("5.1.1"));
        assert_eq!(r("User unknown").enhanced(), None);
        assert_eq!(r("5.1 nope").enhanced(), None);
    }

    #[test]
    fn stuffing() {
        assert_eq!(
            dot_stuff(b".a\r\nb\r\n..c\r\n"),
            b"..a\r\nb\r\n...c\r\n.\r\n"
        );
        assert_eq!(dot_stuff(b"x"), b"x\r\n.\r\n");
        assert_eq!(dot_stuff(b""), b".\r\n");
    }
}
