//! The on-disk record format of a spool segment, as pure encoding and decoding.
//!
//! ```text
//! offset size
//!  0     4    magic "PSTR"
//!  4     1    kind (1 = whole message, 2 = state, 3 = message)
//!  5     3    reserved, zero
//!  8     16   queue id
//!  24    4    payload length (little endian)
//!  28    4    CRC-32 of bytes 0..28
//!  32    len  payload
//! ```
//!
//! A seal is XChaCha20-Poly1305 (nonce || ciphertext || tag) with the header's bytes 0..28 in
//! its AAD. A state record's payload is one seal. A message record's payload is two:
//!
//! ```text
//!  0     4    length E of the sealed envelope (little endian)
//!  4     E    sealed envelope   (AAD: header 0..28, then "envelope")
//!  4+E   ...  sealed body       (AAD: header 0..28, then "body")
//! ```
//!
//! so that recovery opens the envelope (to count recipients) and never the body: a restart
//! costs what the queue's envelopes cost, not what its bodies weigh. Kind 1, one seal over
//! envelope and body together, was written before this layout; it is still read.
//!
//! The header carries no personal data. Its CRC lets recovery trust the length (and so find
//! the next record) without the key; the AEAD tags cover the header too, so a record cannot be
//! moved to another queue id, and the labels keep an envelope from opening as a body. A
//! destroyed record keeps its header while its payload is punched out and reads back as zeros,
//! which is how recovery tells "destroyed" from "corrupt".

use super::QueueId;
use crate::crypto::{CryptoError, Key, OVERHEAD};

/// Header length in bytes.
pub const HEADER_LEN: usize = 32;
const MAGIC: &[u8; 4] = b"PSTR";
/// Largest payload a header may announce; guards recovery against absurd lengths.
pub const MAX_PAYLOAD: u32 = 1 << 30;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Envelope and body of an accepted message in one seal (the layout before [`Kind::Message`];
    /// read, no longer written).
    Whole = 1,
    /// Latest delivery state of a message; supersedes earlier state records.
    State = 2,
    /// Envelope and body of an accepted message, sealed apart.
    Message = 3,
    /// Like [`Kind::Message`], for a message whose body is in a body file
    /// ([`super::bodyfile`]): the body part holds the body file's extent, the trace and
    /// signature headers and the message's header section.
    Spilled = 4,
}

/// A decoded, CRC-checked record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub id: QueueId,
    pub len: u32,
}

/// Why bytes are not a valid header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer than [`HEADER_LEN`] bytes.
    Short,
    /// Wrong magic, kind, reserved bytes, CRC or length.
    Corrupt,
}

impl Header {
    /// Serialises the header (with its CRC).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(MAGIC);
        h[4] = self.kind as u8;
        h[8..24].copy_from_slice(&self.id.0);
        h[24..28].copy_from_slice(&self.len.to_le_bytes());
        let crc = crc32fast::hash(&h[0..28]);
        h[28..32].copy_from_slice(&crc.to_le_bytes());
        h
    }

    /// Parses and checks a header.
    pub fn decode(bytes: &[u8]) -> Result<Header, HeaderError> {
        let h = bytes.get(..HEADER_LEN).ok_or(HeaderError::Short)?;
        let crc = u32::from_le_bytes([h[28], h[29], h[30], h[31]]);
        if &h[0..4] != MAGIC || h[5..8] != [0, 0, 0] || crc32fast::hash(&h[0..28]) != crc {
            return Err(HeaderError::Corrupt);
        }
        let kind = match h[4] {
            1 => Kind::Whole,
            2 => Kind::State,
            3 => Kind::Message,
            4 => Kind::Spilled,
            _ => return Err(HeaderError::Corrupt),
        };
        let mut id = [0u8; 16];
        id.copy_from_slice(&h[8..24]);
        let len = u32::from_le_bytes([h[24], h[25], h[26], h[27]]);
        if len > MAX_PAYLOAD {
            return Err(HeaderError::Corrupt);
        }
        Ok(Header {
            kind,
            id: QueueId(id),
            len,
        })
    }

    /// The bytes bound into the payload's seal.
    pub fn aad(encoded: &[u8; HEADER_LEN]) -> &[u8] {
        &encoded[0..28]
    }
}

/// Appends a message record (`kind` is [`Kind::Message`] or [`Kind::Spilled`]) to `out`:
/// `envelope` and the concatenation of `body` sealed apart.
pub fn append_message(
    out: &mut Vec<u8>,
    kind: Kind,
    id: QueueId,
    key: &Key,
    envelope: &[u8],
    body: &[&[u8]],
) -> Result<(), CryptoError> {
    let env_len = envelope.len() + OVERHEAD;
    let body_len: usize = body.iter().map(|p| p.len()).sum();
    let len = u32::try_from(4 + env_len + body_len + OVERHEAD)
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or(CryptoError::Open)?;
    let header = Header { kind, id, len }.encode();
    let start = out.len();
    out.extend_from_slice(&header);
    out.extend_from_slice(&(env_len as u32).to_le_bytes());
    key.seal_into(&part_aad(&header, Part::Envelope), &[envelope], out)
        .and_then(|()| key.seal_into(&part_aad(&header, Part::Body), body, out))
        .inspect_err(|_| out.truncate(start))
}

/// The two seals of a message record's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Envelope,
    Body,
}

/// Opens one part of a message record (`header` and `payload` as read from the segment).
pub fn open_part(
    key: &Key,
    header: &[u8; HEADER_LEN],
    payload: &[u8],
    part: Part,
) -> Result<Vec<u8>, CryptoError> {
    let env_len = sealed_envelope_len(payload).ok_or(CryptoError::Open)?;
    let rest = &payload[4..];
    let sealed = match part {
        Part::Envelope => rest.get(..env_len),
        Part::Body => rest.get(env_len..),
    };
    key.open(&part_aad(header, part), sealed.ok_or(CryptoError::Open)?)
}

/// The length of a message record's sealed envelope, from the start of its payload: the
/// envelope ends `4 +` this many bytes in.
pub fn sealed_envelope_len(payload: &[u8]) -> Option<usize> {
    let len = payload.get(..4)?.try_into().ok().map(u32::from_le_bytes)?;
    Some(len as usize)
}

/// The AAD of one part: the header's checked bytes, then the part's label.
fn part_aad(header: &[u8; HEADER_LEN], part: Part) -> Vec<u8> {
    let label: &[u8] = match part {
        Part::Envelope => b"envelope",
        Part::Body => b"body",
    };
    [Header::aad(header), label].concat()
}

/// Appends a record to `out` whose payload is one seal of `plaintext` with `key`.
pub fn append(
    out: &mut Vec<u8>,
    kind: Kind,
    id: QueueId,
    key: &Key,
    plaintext: &[u8],
) -> Result<(), CryptoError> {
    let len = u32::try_from(plaintext.len() + OVERHEAD)
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or(CryptoError::Open)?;
    let header = Header { kind, id, len }.encode();
    out.extend_from_slice(&header);
    key.seal_into(Header::aad(&header), &[plaintext], out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_corruption() {
        let h = Header {
            kind: Kind::State,
            id: QueueId([7; 16]),
            len: 1234,
        };
        let bytes = h.encode();
        assert_eq!(Header::decode(&bytes), Ok(h));
        assert_eq!(Header::decode(&bytes[..31]), Err(HeaderError::Short));
        for i in 0..HEADER_LEN {
            let mut b = bytes;
            b[i] ^= 0x10;
            assert_eq!(Header::decode(&b), Err(HeaderError::Corrupt), "byte {i}");
        }
        assert_eq!(
            Header::decode(&[0u8; HEADER_LEN]),
            Err(HeaderError::Corrupt)
        );
    }

    /// Envelope and body open apart, each only as itself and only under its own header.
    #[test]
    fn message_parts_open_apart() {
        let key = Key::generate().unwrap();
        let mut out = b"before".to_vec();
        append_message(
            &mut out,
            Kind::Message,
            QueueId([2; 16]),
            &key,
            b"{env}",
            &[b"the ", b"body"],
        )
        .unwrap();
        let rec = &out[6..];
        let h = Header::decode(rec).unwrap();
        assert_eq!(
            (h.kind, h.len as usize),
            (Kind::Message, rec.len() - HEADER_LEN)
        );
        let header: [u8; HEADER_LEN] = rec[..HEADER_LEN].try_into().unwrap();
        let payload = &rec[HEADER_LEN..];
        assert_eq!(
            open_part(&key, &header, payload, Part::Envelope).unwrap(),
            b"{env}"
        );
        assert_eq!(
            open_part(&key, &header, payload, Part::Body).unwrap(),
            b"the body"
        );
        // The envelope's seal does not open as a body (labels differ), nor under another id.
        let env_len = u32::from_le_bytes(payload[..4].try_into().unwrap()) as usize;
        let mut swapped = (env_len as u32).to_le_bytes().to_vec();
        swapped.extend_from_slice(&payload[4..4 + env_len]);
        swapped.extend_from_slice(&payload[4..4 + env_len]);
        assert!(open_part(&key, &header, &swapped, Part::Body).is_err());
        let mut moved = header;
        moved[8] ^= 1;
        assert!(open_part(&key, &moved, payload, Part::Envelope).is_err());
        assert!(open_part(&key, &header, &payload[..3], Part::Envelope).is_err());
        assert!(
            open_part(&key, &header, &[0u8; 64], Part::Body).is_err(),
            "punched"
        );
    }

    #[test]
    fn record_payload_opens_with_header_as_aad() {
        let key = crate::crypto::Key::generate().unwrap();
        let mut out = Vec::new();
        append(&mut out, Kind::State, QueueId([1; 16]), &key, b"body").unwrap();
        let h = Header::decode(&out).unwrap();
        assert_eq!(h.len as usize, out.len() - HEADER_LEN);
        let header: [u8; HEADER_LEN] = out[..HEADER_LEN].try_into().unwrap();
        assert_eq!(
            key.open(Header::aad(&header), &out[HEADER_LEN..]).unwrap(),
            b"body"
        );
        let mut moved = header;
        moved[8] ^= 1;
        assert!(key.open(Header::aad(&moved), &out[HEADER_LEN..]).is_err());
    }
}
