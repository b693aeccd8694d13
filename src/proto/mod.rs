//! The SMTP wire protocol: pure parsing and formatting, no I/O (server side, plus the client's
//! reply parser).
//!
//! Everything here works on byte slices and buffers handed in by the
//! caller, never panics on any input, and keeps memory bounded by the
//! configured limits, so it can be fuzzed directly (see `fuzz/`).
//!
//! Layout, one job per file:
//! - [`line`]: [`CommandFramer`] cuts the command stream into lines and
//!   enforces the 512-octet command-line limit (RFC 5321 4.5.3.1.4).
//! - [`command`]: [`parse_command`] turns one line into a [`Command`]
//!   (RFC 5321, plus SIZE, 8BITMIME, SMTPUTF8, CHUNKING and AUTH parameters).
//! - [`address`]: [`Address`], the mailbox syntax of RFC 5321 4.1.2 with
//!   RFC 6531 UTF-8.
//! - [`data`]: message content. [`DataDecoder`] undoes DATA dot-stuffing and
//!   finds the `<CRLF>.<CRLF>` end, refusing every look-alike used for SMTP
//!   smuggling; [`BodyChecker`] applies the content rules (line length, bare
//!   CR/LF, size) and is used directly for BDAT chunks.
//! - [`auth`]: decoding of AUTH PLAIN and LOGIN responses (RFC 4954, 4616).
//! - [`reply`]: [`Reply`], rendered with RFC 3463 enhanced status codes.
//! - [`response`]: the other direction, for the SMTP client: [`parse_response`] reads a
//!   remote server's [`Response`] and its [`EnhancedStatusCode`].
//! - [`stuffing`]: the client's side of DATA: [`DotStuffer`] stuffs outgoing content a chunk at
//!   a time.
//! - [`proxy`]: PROXY protocol v1 and v2 headers from a load balancer.
//!
//! Policy that needs session state (command order, whether an extension was
//! advertised, whether a non-ASCII address came with SMTPUTF8) belongs to the
//! server, not here.

pub mod address;
pub mod auth;
pub mod command;
pub mod data;
pub mod line;
pub mod proxy;
pub mod reply;
pub mod response;
pub mod stuffing;

pub use address::{Address, AddressError};
pub use auth::{decode_base64_text, decode_plain, encode_base64, AuthError};
pub use command::{
    parse_command, AuthMechanism, BodyType, Command, CommandError, MailParams, ReversePath,
};
pub use data::{BodyChecker, BodyError, BodyLimits, DataDecoder, LineEndings, MAX_TEXT_LINE};
pub use line::{CommandFramer, FramedLine, MAX_COMMAND_LINE};
pub use reply::Reply;
pub use response::{parse_response, EnhancedStatusCode, Response, ResponseError};
pub use stuffing::DotStuffer;
