//! Parsing of one SMTP command line (RFC 5321 4.1.1 and the extensions we advertise).

use super::address::{Address, AddressError};
use super::reply::Reply;

/// One parsed SMTP command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `EHLO domain-or-literal`; the argument is kept as sent, trimmed.
    Ehlo(String),
    /// `HELO domain`; the argument is kept as sent, trimmed.
    Helo(String),
    /// `MAIL FROM:<reverse-path> [params]`.
    Mail {
        /// The sender, or the null path `<>`.
        from: ReversePath,
        /// The ESMTP parameters we understand.
        params: MailParams,
    },
    /// `RCPT TO:<forward-path>`.
    Rcpt {
        /// The recipient.
        to: Address,
    },
    /// `DATA`.
    Data,
    /// `BDAT size [LAST]` (RFC 3030).
    Bdat {
        /// Octets of the chunk that follows the command line.
        size: u64,
        /// Whether this is the final chunk.
        last: bool,
    },
    /// `RSET`.
    Rset,
    /// `NOOP`, with any argument ignored.
    Noop,
    /// `QUIT`.
    Quit,
    /// `VRFY`, with any argument ignored.
    Vrfy,
    /// `HELP`, with any argument ignored.
    Help,
    /// `STARTTLS` (RFC 3207).
    StartTls,
    /// `AUTH mechanism [initial-response]` (RFC 4954).
    Auth {
        /// The requested SASL mechanism.
        mechanism: AuthMechanism,
        /// The initial response as sent: base64, or `=` for an empty one.
        initial: Option<String>,
    },
}

/// The reverse-path of `MAIL FROM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReversePath {
    /// `<>`, used for bounces.
    Null,
    /// A sender mailbox.
    Address(Address),
}

/// The RFC 6152 / RFC 1652 `BODY=` parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyType {
    /// `BODY=7BIT`.
    SevenBit,
    /// `BODY=8BITMIME`.
    EightBitMime,
}

/// ESMTP parameters of `MAIL FROM`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MailParams {
    /// RFC 1870 `SIZE=` declared message size.
    pub size: Option<u64>,
    /// `BODY=` declared body type.
    pub body: Option<BodyType>,
    /// RFC 6531 `SMTPUTF8` was given.
    pub smtputf8: bool,
}

/// SASL mechanisms we implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMechanism {
    /// RFC 4616 PLAIN.
    Plain,
    /// The de-facto LOGIN mechanism.
    Login,
}

/// Why a command line was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Unknown verb.
    #[error("command not recognized")]
    Unrecognized,
    /// Known verb, malformed arguments.
    #[error("syntax error: {0}")]
    Syntax(&'static str),
    /// The mailbox in `MAIL FROM` or `RCPT TO` is invalid.
    #[error("bad address: {0}")]
    BadAddress(AddressError),
    /// An ESMTP parameter we do not support, as sent.
    #[error("unsupported parameter {0}")]
    UnknownParameter(String),
    /// `AUTH` with a mechanism other than PLAIN or LOGIN.
    #[error("unsupported authentication mechanism")]
    UnsupportedMechanism,
}

impl CommandError {
    /// The reply to send for this error.
    ///
    /// Address errors get `553 5.1.3` whether they concern the sender or a
    /// recipient: it is the one code RFC 5321 gives for a syntactically bad
    /// mailbox, and one code keeps the mapping independent of the verb.
    pub fn reply(&self) -> Reply {
        match self {
            CommandError::Unrecognized => Reply::new(500, "5.5.1", "Command not recognized"),
            CommandError::Syntax(why) => Reply::new(501, "5.5.2", format!("Syntax error: {why}")),
            CommandError::BadAddress(why) => {
                let text = match why {
                    AddressError::Empty => "Empty address",
                    AddressError::NoDomain => "Address must include a domain",
                    AddressError::SourceRoute => "Source routes are not accepted",
                    AddressError::BadLocalPart => "Invalid local part",
                    AddressError::BadDomain => "Invalid domain",
                    AddressError::TooLong => "Address too long",
                };
                Reply::new(553, "5.1.3", text)
            }
            CommandError::UnknownParameter(param) => {
                Reply::new(555, "5.5.4", format!("Unsupported parameter {param}"))
            }
            CommandError::UnsupportedMechanism => {
                Reply::new(504, "5.5.4", "Unsupported authentication mechanism")
            }
        }
    }
}

/// Parses one command line, without its line ending.
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    let line = std::str::from_utf8(line).map_err(|_| CommandError::Syntax("invalid UTF-8"))?;
    // Control characters have no place in a command; refusing them here keeps
    // NULs and stray CRs out of everything downstream (logs, Received headers).
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(CommandError::Syntax("control character in command"));
    }
    let (verb, args) = line.split_once(' ').unwrap_or((line, ""));
    let is = |name: &str| verb.eq_ignore_ascii_case(name);
    let trimmed = args.trim();
    let no_args = |command: Command| {
        if trimmed.is_empty() {
            Ok(command)
        } else {
            Err(CommandError::Syntax("command takes no arguments"))
        }
    };
    if is("EHLO") || is("HELO") {
        if trimmed.is_empty() {
            return Err(CommandError::Syntax(
                "a domain or address literal is required",
            ));
        }
        let name = trimmed.to_owned();
        return Ok(if is("EHLO") {
            Command::Ehlo(name)
        } else {
            Command::Helo(name)
        });
    }
    if is("MAIL") {
        return parse_mail(args);
    }
    if is("RCPT") {
        return parse_rcpt(args);
    }
    if is("DATA") {
        return no_args(Command::Data);
    }
    if is("BDAT") {
        return parse_bdat(trimmed);
    }
    if is("RSET") {
        return no_args(Command::Rset);
    }
    if is("QUIT") {
        return no_args(Command::Quit);
    }
    if is("STARTTLS") {
        return no_args(Command::StartTls);
    }
    if is("NOOP") {
        return Ok(Command::Noop);
    }
    if is("VRFY") {
        return Ok(Command::Vrfy);
    }
    if is("HELP") {
        return Ok(Command::Help);
    }
    if is("AUTH") {
        return parse_auth(trimmed);
    }
    Err(CommandError::Unrecognized)
}

fn parse_mail(args: &str) -> Result<Command, CommandError> {
    let (path, params) = split_path(args, "FROM:")?;
    let from = if path.is_empty() {
        ReversePath::Null
    } else {
        ReversePath::Address(Address::parse(path).map_err(CommandError::BadAddress)?)
    };
    let mut out = MailParams::default();
    let mut seen_auth = false;
    for param in params {
        let (keyword, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        let duplicate = CommandError::Syntax("duplicate parameter");
        if keyword.eq_ignore_ascii_case("SIZE") {
            let value = value.ok_or(CommandError::Syntax("SIZE needs a value"))?;
            if out.size.is_some() {
                return Err(duplicate);
            }
            out.size = Some(parse_digits(value).ok_or(CommandError::Syntax("bad SIZE value"))?);
        } else if keyword.eq_ignore_ascii_case("BODY") {
            let value = value.ok_or(CommandError::Syntax("BODY needs a value"))?;
            if out.body.is_some() {
                return Err(duplicate);
            }
            out.body = Some(if value.eq_ignore_ascii_case("7BIT") {
                BodyType::SevenBit
            } else if value.eq_ignore_ascii_case("8BITMIME") {
                BodyType::EightBitMime
            } else {
                // BINARYMIME included: we do not advertise it.
                return Err(CommandError::UnknownParameter(param.to_owned()));
            });
        } else if keyword.eq_ignore_ascii_case("SMTPUTF8") {
            if value.is_some() {
                return Err(CommandError::Syntax("SMTPUTF8 takes no value"));
            }
            if out.smtputf8 {
                return Err(duplicate);
            }
            out.smtputf8 = true;
        } else if keyword.eq_ignore_ascii_case("AUTH") {
            // RFC 4954 5: we may ignore the claimed submitter, and we do.
            if value.is_none_or(str::is_empty) {
                return Err(CommandError::Syntax("AUTH needs a value"));
            }
            if seen_auth {
                return Err(duplicate);
            }
            seen_auth = true;
        } else {
            return Err(CommandError::UnknownParameter(param.to_owned()));
        }
    }
    Ok(Command::Mail { from, params: out })
}

fn parse_rcpt(args: &str) -> Result<Command, CommandError> {
    let (path, mut params) = split_path(args, "TO:")?;
    // We advertise no RCPT extension (notably not DSN).
    if let Some(param) = params.next() {
        return Err(CommandError::UnknownParameter(param.to_owned()));
    }
    let to = Address::parse(path).map_err(CommandError::BadAddress)?;
    Ok(Command::Rcpt { to })
}

/// Splits `FROM:<path> params` into the text between the brackets and the parameters.
fn split_path<'a>(
    args: &'a str,
    keyword: &'static str,
) -> Result<(&'a str, impl Iterator<Item = &'a str>), CommandError> {
    let missing = if keyword == "TO:" {
        CommandError::Syntax("expected TO:<address>")
    } else {
        CommandError::Syntax("expected FROM:<address>")
    };
    let rest = match args.get(..keyword.len()) {
        Some(k) if k.eq_ignore_ascii_case(keyword) => args.get(keyword.len()..).unwrap_or(""),
        _ => return Err(missing),
    };
    // Many clients put a space after the colon; RFC 5321 does not, but it is harmless.
    let rest = rest.strip_prefix(' ').unwrap_or(rest);
    let inner = rest.strip_prefix('<').ok_or(missing)?;
    let end = path_end(inner).ok_or(CommandError::Syntax("unterminated address"))?;
    let path = inner.get(..end).unwrap_or("");
    let after = inner.get(end + 1..).unwrap_or("");
    if !(after.is_empty() || after.starts_with(' ')) {
        return Err(CommandError::Syntax("expected a space after the address"));
    }
    Ok((path, after.split(' ').filter(|p| !p.is_empty())))
}

/// Index of the `>` closing a path, skipping any inside a quoted local part.
fn path_end(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        if escaped {
            escaped = false;
        } else if quoted && c == '\\' {
            escaped = true;
        } else if c == '"' {
            quoted = !quoted;
        } else if c == '>' && !quoted {
            return Some(i);
        }
    }
    None
}

/// A non-empty run of ASCII digits that fits a u64.
fn parse_digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_bdat(args: &str) -> Result<Command, CommandError> {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let size = words
        .next()
        .and_then(parse_digits)
        .ok_or(CommandError::Syntax("BDAT needs a chunk size"))?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(CommandError::Syntax("expected BDAT size [LAST]")),
    };
    if words.next().is_some() {
        return Err(CommandError::Syntax("expected BDAT size [LAST]"));
    }
    Ok(Command::Bdat { size, last })
}

fn parse_auth(args: &str) -> Result<Command, CommandError> {
    let mut words = args.split(' ').filter(|w| !w.is_empty());
    let mechanism = match words.next() {
        None => return Err(CommandError::Syntax("AUTH needs a mechanism")),
        Some(m) if m.eq_ignore_ascii_case("PLAIN") => AuthMechanism::Plain,
        Some(m) if m.eq_ignore_ascii_case("LOGIN") => AuthMechanism::Login,
        Some(_) => return Err(CommandError::UnsupportedMechanism),
    };
    let initial = words.next().map(str::to_owned);
    if words.next().is_some() {
        return Err(CommandError::Syntax(
            "expected AUTH mechanism [initial-response]",
        ));
    }
    Ok(Command::Auth { mechanism, initial })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Address {
        Address::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn mail(from: &str, params: MailParams) -> Command {
        let from = if from.is_empty() {
            ReversePath::Null
        } else {
            ReversePath::Address(addr(from))
        };
        Command::Mail { from, params }
    }

    fn params(size: Option<u64>, body: Option<BodyType>, smtputf8: bool) -> MailParams {
        MailParams {
            size,
            body,
            smtputf8,
        }
    }

    #[test]
    fn valid_commands() {
        let none = MailParams::default();
        let cases: Vec<(&[u8], Command)> = vec![
            (
                b"EHLO mx.example.com",
                Command::Ehlo("mx.example.com".into()),
            ),
            (b"ehlo [192.0.2.1]", Command::Ehlo("[192.0.2.1]".into())),
            (b"EhLo  client  ", Command::Ehlo("client".into())),
            (
                b"HELO client.example",
                Command::Helo("client.example".into()),
            ),
            (b"MAIL FROM:<a@b.example>", mail("a@b.example", none)),
            (b"mail from:<a@b.example>", mail("a@b.example", none)),
            (b"MAIL FROM: <a@b.example>", mail("a@b.example", none)),
            (b"MAIL FROM:<>", mail("", none)),
            (b"MAIL FROM:<> ", mail("", none)),
            (
                b"MAIL FROM:<a@b.example> SIZE=12345",
                mail("a@b.example", params(Some(12345), None, false)),
            ),
            (
                b"MAIL FROM:<a@b.example> size=0 body=8bitmime",
                mail(
                    "a@b.example",
                    params(Some(0), Some(BodyType::EightBitMime), false),
                ),
            ),
            (
                b"MAIL FROM:<a@b.example> BODY=7BIT",
                mail("a@b.example", params(None, Some(BodyType::SevenBit), false)),
            ),
            (
                "MAIL FROM:<jürgen@bücher.example> SMTPUTF8 BODY=8BITMIME".as_bytes(),
                mail(
                    "jürgen@bücher.example",
                    params(None, Some(BodyType::EightBitMime), true),
                ),
            ),
            (
                b"MAIL FROM:<a@b.example> AUTH=<>",
                mail("a@b.example", none),
            ),
            (
                b"MAIL FROM:<a@b.example>  AUTH=a+40b.example  SIZE=1",
                mail("a@b.example", params(Some(1), None, false)),
            ),
            (
                b"MAIL FROM:<\"a>b\"@c.example>",
                mail("\"a>b\"@c.example", none),
            ),
            (
                b"MAIL FROM:<\"a\\\">\"@c.example>",
                mail("\"a\\\">\"@c.example", none),
            ),
            (
                b"RCPT TO:<c@d.example>",
                Command::Rcpt {
                    to: addr("c@d.example"),
                },
            ),
            (
                b"rcpt to: <c@d.example>",
                Command::Rcpt {
                    to: addr("c@d.example"),
                },
            ),
            (
                b"RCPT TO:<u%x@d.example>",
                Command::Rcpt {
                    to: addr("u%x@d.example"),
                },
            ),
            (b"DATA", Command::Data),
            (b"data ", Command::Data),
            (
                b"BDAT 100",
                Command::Bdat {
                    size: 100,
                    last: false,
                },
            ),
            (
                b"BDAT 0 LAST",
                Command::Bdat {
                    size: 0,
                    last: true,
                },
            ),
            (
                b"bdat 7 last",
                Command::Bdat {
                    size: 7,
                    last: true,
                },
            ),
            (b"RSET", Command::Rset),
            (b"NOOP", Command::Noop),
            (b"NOOP anything at all", Command::Noop),
            (b"QUIT", Command::Quit),
            (b"VRFY postmaster", Command::Vrfy),
            (b"VRFY", Command::Vrfy),
            (b"HELP", Command::Help),
            (b"HELP MAIL", Command::Help),
            (b"STARTTLS", Command::StartTls),
            (b"starttls", Command::StartTls),
            (
                b"AUTH PLAIN",
                Command::Auth {
                    mechanism: AuthMechanism::Plain,
                    initial: None,
                },
            ),
            (
                b"AUTH plain AGEAYg==",
                Command::Auth {
                    mechanism: AuthMechanism::Plain,
                    initial: Some("AGEAYg==".into()),
                },
            ),
            (
                b"AUTH PLAIN =",
                Command::Auth {
                    mechanism: AuthMechanism::Plain,
                    initial: Some("=".into()),
                },
            ),
            (
                b"AUTH LOGIN",
                Command::Auth {
                    mechanism: AuthMechanism::Login,
                    initial: None,
                },
            ),
        ];
        for (line, expected) in cases {
            let text = String::from_utf8_lossy(line);
            assert_eq!(parse_command(line), Ok(expected), "{text}");
        }
    }

    #[test]
    fn errors() {
        use CommandError::*;
        let syntax = Syntax("");
        let cases: Vec<(&[u8], CommandError, u16, &str)> = vec![
            (b"", Unrecognized, 500, "5.5.1"),
            (b"FOO bar", Unrecognized, 500, "5.5.1"),
            (b"EHLOX a", Unrecognized, 500, "5.5.1"),
            (b" EHLO a", Unrecognized, 500, "5.5.1"),
            (b"MAIL\tFROM:<a@b>", Unrecognized, 500, "5.5.1"),
            (b"EHLO", syntax.clone(), 501, "5.5.2"),
            (b"HELO   ", syntax.clone(), 501, "5.5.2"),
            (b"EHLO \xff\xfe", syntax.clone(), 501, "5.5.2"),
            (b"NOOP a\0b", syntax.clone(), 501, "5.5.2"),
            (b"NOOP a\rb", syntax.clone(), 501, "5.5.2"),
            (b"MAIL", syntax.clone(), 501, "5.5.2"),
            (b"MAIL FROM:a@b.example", syntax.clone(), 501, "5.5.2"),
            (b"MAIL FROM:<a@b.example", syntax.clone(), 501, "5.5.2"),
            (b"MAIL FROM:  <a@b.example>", syntax.clone(), 501, "5.5.2"),
            (b"MAIL  FROM:<a@b.example>", syntax.clone(), 501, "5.5.2"),
            (b"MAIL TO:<a@b.example>", syntax.clone(), 501, "5.5.2"),
            (b"MAIL FROM <a@b.example>", syntax.clone(), 501, "5.5.2"),
            (
                b"MAIL FROM:<a@b.example>SIZE=1",
                syntax.clone(),
                501,
                "5.5.2",
            ),
            (
                b"MAIL FROM:<a@b.example> SIZE=",
                syntax.clone(),
                501,
                "5.5.2",
            ),
            (
                b"MAIL FROM:<a@b.example> SIZE",
                syntax.clone(),
                501,
                "5.5.2",
            ),
            (
                b"MAIL FROM:<a@b.example> SIZE=-1",
                syntax.clone(),
                501,
                "5.5.2",
            ),
            (
                b"MAIL FROM:<a@b.example> SIZE=+1",
                syntax.clone(),
                501,
                "5.5.2",
            ),
            (
                b"MAIL FROM:<a@b.example> SIZE=1x",
                syntax.clone(),
                501,
                "5.5.2",
            ),
            (
                b"MAIL FROM:<a@b.example> SIZE=99999999999999999999999",
                syntax.clone(),
                501,
                "5.5.2",
            ),
            (
                b"MAIL FROM:<a@b.example> SIZE=1 SIZE=2",
                syntax.clone(),
                501,
                "5.5.2",
            ),
            (
                b"MAIL FROM:<a@b.example> BODY",
                syntax.clone(),
                501,
                "5.5.2",
            ),
            (
                b"MAIL FROM:<a@b.example> SMTPUTF8=yes",
                syntax.clone(),
                501,
                "5.5.2",
            ),
            (
                b"MAIL FROM:<a@b.example> AUTH",
                syntax.clone(),
                501,
                "5.5.2",
            ),
            (
                b"MAIL FROM:<a@b.example> AUTH=",
                syntax.clone(),
                501,
                "5.5.2",
            ),
            (b"RCPT TO:c@d.example", syntax.clone(), 501, "5.5.2"),
            (b"RCPT FROM:<c@d.example>", syntax.clone(), 501, "5.5.2"),
            (b"DATA now", syntax.clone(), 501, "5.5.2"),
            (b"RSET x", syntax.clone(), 501, "5.5.2"),
            (b"QUIT now", syntax.clone(), 501, "5.5.2"),
            (b"STARTTLS x", syntax.clone(), 501, "5.5.2"),
            (b"BDAT", syntax.clone(), 501, "5.5.2"),
            (b"BDAT x", syntax.clone(), 501, "5.5.2"),
            (b"BDAT -1", syntax.clone(), 501, "5.5.2"),
            (b"BDAT 10 FIRST", syntax.clone(), 501, "5.5.2"),
            (b"BDAT 10 LAST x", syntax.clone(), 501, "5.5.2"),
            (b"BDAT 99999999999999999999", syntax.clone(), 501, "5.5.2"),
            (b"AUTH", syntax.clone(), 501, "5.5.2"),
            (b"AUTH PLAIN a b", syntax.clone(), 501, "5.5.2"),
            (
                b"MAIL FROM:<@a,@b:u@c.example>",
                BadAddress(AddressError::SourceRoute),
                553,
                "5.1.3",
            ),
            (
                b"MAIL FROM:<user>",
                BadAddress(AddressError::NoDomain),
                553,
                "5.1.3",
            ),
            (b"RCPT TO:<>", BadAddress(AddressError::Empty), 553, "5.1.3"),
            (
                b"RCPT TO:<postmaster>",
                BadAddress(AddressError::NoDomain),
                553,
                "5.1.3",
            ),
            (
                b"RCPT TO:<host!user>",
                BadAddress(AddressError::NoDomain),
                553,
                "5.1.3",
            ),
            (
                b"RCPT TO:<u@d.example.>",
                BadAddress(AddressError::BadDomain),
                553,
                "5.1.3",
            ),
            (
                b"RCPT TO:<.u@d.example>",
                BadAddress(AddressError::BadLocalPart),
                553,
                "5.1.3",
            ),
            (
                b"MAIL FROM:<a@b.example> BODY=BINARYMIME",
                UnknownParameter("BODY=BINARYMIME".into()),
                555,
                "5.5.4",
            ),
            (
                b"MAIL FROM:<a@b.example> BODY=9BIT",
                UnknownParameter("BODY=9BIT".into()),
                555,
                "5.5.4",
            ),
            (
                b"MAIL FROM:<a@b.example> RET=HDRS",
                UnknownParameter("RET=HDRS".into()),
                555,
                "5.5.4",
            ),
            (
                b"MAIL FROM:<a@b.example> REQUIRETLS",
                UnknownParameter("REQUIRETLS".into()),
                555,
                "5.5.4",
            ),
            (
                b"RCPT TO:<c@d.example> NOTIFY=NEVER",
                UnknownParameter("NOTIFY=NEVER".into()),
                555,
                "5.5.4",
            ),
            (
                b"RCPT TO:<c@d.example> ORCPT=rfc822;c@d.example",
                UnknownParameter("ORCPT=rfc822;c@d.example".into()),
                555,
                "5.5.4",
            ),
            (b"AUTH CRAM-MD5", UnsupportedMechanism, 504, "5.5.4"),
            (b"AUTH XOAUTH2 abc", UnsupportedMechanism, 504, "5.5.4"),
        ];
        for (line, expected, code, enhanced) in cases {
            let text = String::from_utf8_lossy(line);
            let err = match parse_command(line) {
                Ok(cmd) => panic!("{text}: parsed as {cmd:?}"),
                Err(err) => err,
            };
            match (&err, &expected) {
                (Syntax(_), Syntax(_)) => {}
                _ => assert_eq!(err, expected, "{text}"),
            }
            let reply = err.reply();
            assert_eq!(reply.code, code, "{text}");
            assert_eq!(reply.enhanced, Some(enhanced), "{text}");
            assert!(!reply.is_positive());
        }
    }

    #[test]
    fn error_reply_texts() {
        let cases = [
            (
                CommandError::Unrecognized,
                "500 5.5.1 Command not recognized",
            ),
            (
                CommandError::UnknownParameter("X=1".into()),
                "555 5.5.4 Unsupported parameter X=1",
            ),
            (
                CommandError::BadAddress(AddressError::SourceRoute),
                "553 5.1.3 Source routes are not accepted",
            ),
            (
                CommandError::UnsupportedMechanism,
                "504 5.5.4 Unsupported authentication mechanism",
            ),
            (
                CommandError::Syntax("BDAT needs a chunk size"),
                "501 5.5.2 Syntax error: BDAT needs a chunk size",
            ),
        ];
        for (err, text) in cases {
            assert_eq!(err.reply().to_string(), text);
        }
    }
}
