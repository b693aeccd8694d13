//! A receiving SMTP server on loopback that can be told how to behave: offer STARTTLS or not,
//! refuse recipients, answer the end of data with a scripted sequence, inject bytes after its
//! STARTTLS reply, go slow. It records what it received, byte for byte.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

/// How the sink behaves; change it at any time through [`Sink::behaviour`].
#[derive(Default)]
pub struct Behaviour {
    /// Offer STARTTLS with this configuration.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub no_pipelining: bool,
    pub no_smtputf8: bool,
    /// Replies to RCPT by address, e.g. "550 5.1.1 No such user"; others get 250.
    pub rcpt_replies: HashMap<String, String>,
    /// Replies to the end of data, used up in order; then "250 2.0.0 OK".
    pub data_replies: VecDeque<String>,
    /// Sent right after the 220 to STARTTLS, before the handshake (response injection).
    pub inject_after_starttls: Option<String>,
    /// Wait this long before answering the end of data.
    pub data_delay: Option<Duration>,
    /// AUTH PLAIN credentials accepted after TLS (user, password); None: no AUTH offered.
    pub auth: Option<(String, String)>,
    /// Replies to MAIL, used up in order; then "250 2.1.0 ok".
    pub mail_replies: VecDeque<String>,
    /// Close the connection right after answering each end of data, as a server that keeps
    /// no idle connections does.
    pub close_after_message: bool,
    /// On a connection that has carried a message, close at the next MAIL without a reply: a
    /// close that crosses the client's reuse of the connection.
    pub close_at_next_mail: bool,
}

/// One message the sink accepted.
#[derive(Debug, Clone)]
pub struct Received {
    pub from: String,
    pub rcpts: Vec<String>,
    /// Message content as sent on the wire between DATA and the final dot (still stuffed).
    pub raw: Vec<u8>,
    /// Content with dot-stuffing undone.
    pub data: Vec<u8>,
    /// "TLSv1_3" etc. when the session was encrypted.
    pub tls: Option<String>,
    pub authenticated: Option<String>,
    /// Which connection carried it (1 for the sink's first).
    pub connection: usize,
    /// When the sink accepted it.
    pub at: std::time::Instant,
}

#[derive(Default)]
pub struct State {
    pub received: Vec<Received>,
    /// Every end-of-data seen, with the reply given (accepted or not).
    pub data_attempts: Vec<(Vec<String>, String)>,
    /// Every RCPT seen: (MAIL FROM of its transaction, recipient, reply given).
    pub rcpt_attempts: Vec<(String, String, String)>,
    pub connections: usize,
    pub active: usize,
    pub max_active: usize,
    /// RSET commands received, over all connections.
    pub rsets: usize,
}

#[derive(Clone)]
pub struct Sink {
    pub addr: SocketAddr,
    pub behaviour: Arc<Mutex<Behaviour>>,
    pub state: Arc<Mutex<State>>,
}

impl Sink {
    /// Listens on `ip:0`.
    pub async fn start(ip: &str) -> Sink {
        Sink::start_on(&format!("{ip}:0")).await
    }

    /// Listens on a given address (to share a port number between 127.0.0.1 and ::1).
    pub async fn start_on(addr: &str) -> Sink {
        let listener = TcpListener::bind(addr).await.expect("bind sink");
        let sink = Sink {
            addr: listener.local_addr().unwrap(),
            behaviour: Arc::new(Mutex::new(Behaviour::default())),
            state: Arc::new(Mutex::new(State::default())),
        };
        let s = sink.clone();
        tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let connection = {
                        let mut st = s.state.lock().unwrap();
                        st.connections += 1;
                        st.active += 1;
                        st.max_active = st.max_active.max(st.active);
                        st.connections
                    };
                    let _ = session(s.clone(), socket, connection).await;
                    s.state.lock().unwrap().active -= 1;
                });
            }
        });
        sink
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    /// Waits (up to 20 s) until `n` messages have been accepted.
    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        for _ in 0..400 {
            let r = self.received();
            if r.len() >= n {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("sink got {} messages, expected {n}", self.received().len());
    }
}

async fn session(sink: Sink, socket: TcpStream, connection: usize) -> std::io::Result<()> {
    let mut io = BufReader::new(socket);
    io.get_mut()
        .write_all(b"220 sink.test ESMTP test sink\r\n")
        .await?;
    let mut tx = Tx {
        connection,
        ..Tx::default()
    };
    loop {
        let Some(line) = read_line(&mut io).await? else {
            return Ok(());
        };
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("STARTTLS") {
            let (config, inject) = {
                let b = sink.behaviour.lock().unwrap();
                (b.tls.clone(), b.inject_after_starttls.clone())
            };
            let Some(config) = config else {
                io.get_mut().write_all(b"502 5.5.1 no TLS\r\n").await?;
                continue;
            };
            let mut reply = b"220 2.0.0 go ahead\r\n".to_vec();
            if let Some(extra) = inject {
                reply.extend_from_slice(extra.as_bytes());
            }
            io.get_mut().write_all(&reply).await?;
            let acceptor = tokio_rustls::TlsAcceptor::from(config);
            let tls = acceptor.accept(io.into_inner()).await?;
            let version = tls.get_ref().1.protocol_version().map(|v| format!("{v:?}"));
            let mut tls_io = BufReader::new(tls);
            return tls_session(&sink, &mut tls_io, version, connection).await;
        }
        if !handle(&sink, &mut io, &line, None, &mut tx).await? {
            return Ok(());
        }
    }
}

async fn tls_session<S: AsyncRead + AsyncWrite + Unpin>(
    sink: &Sink,
    io: &mut BufReader<S>,
    version: Option<String>,
    connection: usize,
) -> std::io::Result<()> {
    // STARTTLS resets the session: a fresh transaction state.
    let mut tx = Tx {
        connection,
        ..Tx::default()
    };
    loop {
        let Some(line) = read_line(io).await? else {
            return Ok(());
        };
        if upper_is(&line, "STARTTLS") {
            io.get_mut()
                .write_all(b"503 5.5.1 TLS already active\r\n")
                .await?;
            continue;
        }
        if !handle(sink, io, &line, version.clone(), &mut tx).await? {
            return Ok(());
        }
    }
}

/// One session's transaction state.
#[derive(Default)]
struct Tx {
    from: Option<String>,
    rcpts: Vec<String>,
    auth: Option<String>,
    connection: usize,
    /// Messages this connection has carried.
    messages: usize,
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(
    sink: &Sink,
    io: &mut BufReader<S>,
    line: &str,
    tls: Option<String>,
    tx: &mut Tx,
) -> std::io::Result<bool> {
    let upper = line.to_ascii_uppercase();
    let reply: String;
    if upper.starts_with("EHLO") {
        let b = sink.behaviour.lock().unwrap();
        let mut lines = vec![
            "250-sink.test".to_string(),
            "250-SIZE 50000000".into(),
            "250-8BITMIME".into(),
        ];
        if !b.no_pipelining {
            lines.push("250-PIPELINING".into());
        }
        if !b.no_smtputf8 {
            lines.push("250-SMTPUTF8".into());
        }
        if b.tls.is_some() && tls.is_none() {
            lines.push("250-STARTTLS".into());
        }
        if b.auth.is_some() && tls.is_some() {
            lines.push("250-AUTH PLAIN".into());
        }
        lines.push("250 ENHANCEDSTATUSCODES".into());
        reply = lines.join("\r\n");
    } else if upper.starts_with("HELO") {
        reply = "250 sink.test".into();
    } else if upper.starts_with("AUTH PLAIN ") {
        let expected = sink.behaviour.lock().unwrap().auth.clone();
        let decoded = postern::proto::decode_plain(&line[11..]).ok();
        reply = match (expected, decoded) {
            (Some((u, p)), Some((du, dp))) if u == du && p == dp => {
                tx.auth = Some(du);
                "235 2.7.0 ok".into()
            }
            _ => "535 5.7.8 bad credentials".into(),
        };
    } else if upper.starts_with("MAIL FROM:") {
        if tx.messages > 0 && sink.behaviour.lock().unwrap().close_at_next_mail {
            return Ok(false);
        }
        let scripted = sink.behaviour.lock().unwrap().mail_replies.pop_front();
        tx.rcpts.clear();
        match scripted {
            Some(refusal) => {
                tx.from = None;
                reply = refusal;
            }
            None => {
                tx.from = Some(between(line, '<', '>'));
                reply = "250 2.1.0 ok".into();
            }
        }
    } else if upper.starts_with("RCPT TO:") {
        let rcpt = between(line, '<', '>');
        let custom = sink
            .behaviour
            .lock()
            .unwrap()
            .rcpt_replies
            .get(&rcpt)
            .cloned();
        match custom {
            _ if tx.from.is_none() => reply = "503 5.5.1 MAIL first".into(),
            Some(r) => reply = r,
            None => {
                tx.rcpts.push(rcpt.clone());
                reply = "250 2.1.5 ok".into();
            }
        }
        sink.state.lock().unwrap().rcpt_attempts.push((
            tx.from.clone().unwrap_or_default(),
            rcpt,
            reply.clone(),
        ));
    } else if upper == "DATA" {
        if tx.rcpts.is_empty() {
            reply = "554 5.5.1 no valid recipients".into();
        } else {
            io.get_mut().write_all(b"354 go\r\n").await?;
            io.get_mut().flush().await?;
            let mut raw = Vec::new();
            let mut data = Vec::new();
            loop {
                let mut l = Vec::new();
                if io.read_until(b'\n', &mut l).await? == 0 {
                    return Ok(false);
                }
                if l == b".\r\n" {
                    break;
                }
                raw.extend_from_slice(&l);
                data.extend_from_slice(if l.starts_with(b".") { &l[1..] } else { &l });
            }
            let (delay, scripted) = {
                let mut b = sink.behaviour.lock().unwrap();
                (b.data_delay, b.data_replies.pop_front())
            };
            if let Some(d) = delay {
                tokio::time::sleep(d).await;
            }
            let answer = scripted.unwrap_or_else(|| "250 2.0.0 OK accepted".into());
            let rcpts = std::mem::take(&mut tx.rcpts);
            {
                let mut st = sink.state.lock().unwrap();
                st.data_attempts.push((rcpts.clone(), answer.clone()));
                if answer.starts_with('2') {
                    st.received.push(Received {
                        from: tx.from.clone().unwrap_or_default(),
                        rcpts,
                        raw,
                        data,
                        tls: tls.clone(),
                        authenticated: tx.auth.clone(),
                        connection: tx.connection,
                        at: std::time::Instant::now(),
                    });
                }
            }
            io.get_mut()
                .write_all(format!("{answer}\r\n").as_bytes())
                .await?;
            io.get_mut().flush().await?;
            tx.messages += 1;
            return Ok(!sink.behaviour.lock().unwrap().close_after_message);
        }
    } else if upper == "RSET" {
        sink.state.lock().unwrap().rsets += 1;
        tx.from = None;
        tx.rcpts.clear();
        reply = "250 2.0.0 ok".into();
    } else if upper == "NOOP" {
        reply = "250 2.0.0 ok".into();
    } else if upper == "QUIT" {
        io.get_mut().write_all(b"221 2.0.0 bye\r\n").await?;
        return Ok(false);
    } else {
        reply = "500 5.5.1 unknown".into();
    }
    io.get_mut()
        .write_all(format!("{reply}\r\n").as_bytes())
        .await?;
    io.get_mut().flush().await?;
    Ok(true)
}

fn upper_is(line: &str, word: &str) -> bool {
    line.trim().eq_ignore_ascii_case(word)
}

fn between(s: &str, a: char, b: char) -> String {
    s.split_once(a)
        .and_then(|(_, rest)| rest.rsplit_once(b))
        .map(|(inner, _)| inner.to_string())
        .unwrap_or_default()
}

async fn read_line<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut BufReader<S>,
) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    if io.read_until(b'\n', &mut buf).await? == 0 {
        return Ok(None);
    }
    let s = String::from_utf8_lossy(&buf);
    Ok(Some(s.trim_end_matches(['\r', '\n']).to_string()))
}
