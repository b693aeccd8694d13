//! The envelope of a spooled message and its delivery state, as stored (sealed) in the spool.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Who sent a message to whom, and how it arrived. Holds addresses, so it only ever leaves
/// memory sealed; `Debug` is written by hand so that a stray `{:?}` cannot log them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Reverse path; empty for the null sender `<>` (bounces).
    pub mail_from: String,
    /// Forward paths, in RCPT order; recipient indices elsewhere refer to this order.
    pub recipients: Vec<String>,
    /// Unix time (seconds) of the 250 reply.
    pub received_at: i64,
    pub client_ip: IpAddr,
    pub helo: String,
    /// Authenticated SMTP account, if any.
    pub auth_user: Option<String>,
    /// `BODY=8BITMIME` was declared: the next hop must offer 8BITMIME.
    pub eight_bit: bool,
    /// `SMTPUTF8` was declared: the next hop must offer SMTPUTF8.
    pub smtputf8: bool,
    /// The `From:` domain (else the envelope sender's): decides DKIM keys and strict privacy.
    #[serde(default)]
    pub sending_domain: String,
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("recipients", &self.recipients.len())
            .field("received_at", &self.received_at)
            .field("client_ip", &self.client_ip)
            .finish_non_exhaustive()
    }
}

/// Delivery progress of one message, rewritten as a whole on every change.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageState {
    /// One flag per recipient: true once it is final (delivered, bounced, expired, cancelled).
    pub final_rcpts: Vec<bool>,
    /// Opaque to the spool: the queue's retry schedule and attempt counts.
    #[serde(default, with = "opaque_bytes")]
    pub queue_data: Vec<u8>,
    /// When the queue next wants the message (Unix time; [`NOT_DUE`] while it is held). The
    /// spool keeps it in memory, so that a restart schedules every message without reading its
    /// state record. 0 (due now) in records written before it existed.
    #[serde(default)]
    pub due: i64,
}

/// What recovery reads of a state record: the queue's data is skipped, not decoded.
#[derive(Deserialize)]
pub(crate) struct StateSummary {
    pub final_rcpts: Vec<bool>,
    #[serde(default)]
    pub due: i64,
}

/// Opaque bytes in JSON as a base64 string, which a reader that skips them passes over at
/// once, rather than as an array of numbers, each parsed. Arrays (written before) still read.
mod opaque_bytes {
    use base64::Engine;
    use serde::de::{Deserializer, SeqAccess, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_any(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a base64 string or an array of bytes")
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Vec<u8>, E> {
            base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(E::custom)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::new();
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(out)
        }
    }
}

/// [`MessageState::due`] of a message the queue leaves alone until told otherwise (held).
pub const NOT_DUE: i64 = i64::MAX;

/// What the queue stores with a message on an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueData {
    /// Its retry state, opaque to the spool.
    pub data: Vec<u8>,
    /// Its next due time ([`MessageState::due`]).
    pub due: i64,
}

impl MessageState {
    /// True when no recipient is left to deliver to.
    pub fn all_final(&self) -> bool {
        self.final_rcpts.iter().all(|f| *f)
    }
}

/// The envelope as sealed in a message record.
pub(crate) fn encode_envelope(envelope: &Envelope) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(envelope)
}

/// Inverse of [`encode_envelope`].
pub(crate) fn decode_envelope(plain: &[u8]) -> Option<Envelope> {
    serde_json::from_slice(plain).ok()
}

/// How many recipients an encoded envelope has, without building the rest of it (no address
/// is copied out): what recovery needs of a message.
pub(crate) fn recipient_count(plain: &[u8]) -> Option<usize> {
    #[derive(Deserialize)]
    struct Recipients {
        recipients: Vec<serde::de::IgnoredAny>,
    }
    let count: Recipients = serde_json::from_slice(plain).ok()?;
    Some(count.recipients.len())
}

/// The encoded envelope inside the plaintext of a [`super::record::Kind::Whole`] record.
pub(crate) fn whole_envelope(plain: &[u8]) -> Option<&[u8]> {
    let len = u32::from_le_bytes(plain.get(..4)?.try_into().ok()?) as usize;
    plain.get(4..4usize.checked_add(len)?)
}

/// Envelope and body of a [`super::record::Kind::Whole`] record (the layout before envelope and
/// body were sealed apart): envelope length (u32 LE), envelope JSON, body.
pub(crate) fn decode_whole(plain: &[u8]) -> Option<(Envelope, Vec<u8>)> {
    let env = whole_envelope(plain)?;
    let envelope = decode_envelope(env)?;
    Some((envelope, plain[4 + env.len()..].to_vec()))
}
