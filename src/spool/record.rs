//! The on-disk record format of a spool segment, as pure encoding and decoding.
//!
//! ```text
//! offset size
//!  0     4    magic "PSTR"
//!  4     1    kind (1 = message, 2 = state)
//!  5     3    reserved, zero
//!  8     16   queue id
//!  24    4    payload length (little endian)
//!  28    4    CRC-32 of bytes 0..28
//!  32    len  payload: XChaCha20-Poly1305 seal (nonce || ciphertext || tag), AAD = bytes 0..28
//! ```
//!
//! The header carries no personal data. Its CRC lets recovery trust the length (and so find
//! the next record) without the key; the AEAD tag covers the header too, so a record cannot be
//! moved to another queue id. A destroyed record keeps its header while its payload is punched
//! out and reads back as zeros, which is how recovery tells "destroyed" from "corrupt".

use super::QueueId;

/// Header length in bytes.
pub const HEADER_LEN: usize = 32;
const MAGIC: &[u8; 4] = b"PSTR";
/// Largest payload a header may announce; guards recovery against absurd lengths.
pub const MAX_PAYLOAD: u32 = 1 << 30;

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Envelope and body of an accepted message.
    Message = 1,
    /// Latest delivery state of a message; supersedes earlier state records.
    State = 2,
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
            1 => Kind::Message,
            2 => Kind::State,
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

/// Appends a whole record to `out`, sealing `plaintext` with `key`.
pub fn append(
    out: &mut Vec<u8>,
    kind: Kind,
    id: QueueId,
    key: &crate::crypto::Key,
    plaintext: &[u8],
) -> Result<(), crate::crypto::CryptoError> {
    let len = u32::try_from(plaintext.len() + crate::crypto::OVERHEAD)
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or(crate::crypto::CryptoError::Open)?;
    let header = Header { kind, id, len }.encode();
    out.extend_from_slice(&header);
    key.seal_into(Header::aad(&header), plaintext, out)
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

    #[test]
    fn record_payload_opens_with_header_as_aad() {
        let key = crate::crypto::Key::generate().unwrap();
        let mut out = Vec::new();
        append(&mut out, Kind::Message, QueueId([1; 16]), &key, b"body").unwrap();
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
