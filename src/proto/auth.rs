//! Decoding of RFC 4954 AUTH exchanges for the PLAIN (RFC 4616) and LOGIN mechanisms.
//!
//! Lines of an AUTH exchange may be up to 12288 octets (RFC 4954 4), longer
//! than the 512-octet command limit; the caller frames them accordingly.

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;

use super::reply::Reply;

/// The `334` challenge text asking for the user name in AUTH LOGIN (`Username:`).
pub const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
/// The `334` challenge text asking for the password in AUTH LOGIN (`Password:`).
pub const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

/// Clients disagree about padding, so accept it present or missing.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why an AUTH response could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Not valid base64.
    #[error("invalid base64 data")]
    Base64,
    /// Valid base64, but not the expected structure or not UTF-8.
    #[error("malformed authentication response")]
    Malformed,
}

impl AuthError {
    /// The `501 5.5.2` reply for this error.
    pub fn reply(&self) -> Reply {
        let text = match self {
            AuthError::Base64 => "Invalid base64 data",
            AuthError::Malformed => "Malformed authentication response",
        };
        Reply::new(501, "5.5.2", text)
    }
}

fn decode(b64: &str) -> Result<Vec<u8>, AuthError> {
    let b64 = b64.trim_matches(|c: char| c.is_ascii_whitespace());
    // RFC 4954 4: a lone "=" is an empty initial response.
    if b64 == "=" {
        return Ok(Vec::new());
    }
    LENIENT.decode(b64).map_err(|_| AuthError::Base64)
}

/// Decodes an AUTH PLAIN response (base64 of authzid NUL authcid NUL passwd).
///
/// Returns the authentication identity and password, both non-empty. An
/// authorization identity other than empty or the authentication identity
/// itself is refused as [`AuthError::Malformed`]: we do not support acting on
/// behalf of another user, and silently ignoring the request would be wrong.
pub fn decode_plain(b64: &str) -> Result<(String, String), AuthError> {
    let raw = decode(b64)?;
    let text = String::from_utf8(raw).map_err(|_| AuthError::Malformed)?;
    let mut parts = text.split('\0');
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    if authcid.is_empty() || password.is_empty() || !(authzid.is_empty() || authzid == authcid) {
        return Err(AuthError::Malformed);
    }
    Ok((authcid.to_owned(), password.to_owned()))
}

/// Decodes one base64 AUTH LOGIN step (user name or password) to UTF-8 text; `=` is empty.
pub fn decode_base64_text(b64: &str) -> Result<String, AuthError> {
    String::from_utf8(decode(b64)?).map_err(|_| AuthError::Malformed)
}

/// Base64-encodes a challenge or response with padding.
pub fn encode_base64(s: &str) -> String {
    STANDARD.encode(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain() {
        let ok = |u: &str, p: &str| Ok((u.to_owned(), p.to_owned()));
        type Case = (String, Result<(String, String), AuthError>);
        let cases: Vec<Case> = vec![
            (encode_base64("\0alice\0secret"), ok("alice", "secret")),
            (encode_base64("alice\0alice\0secret"), ok("alice", "secret")),
            (
                encode_base64("\0jürgen\0pässword"),
                ok("jürgen", "pässword"),
            ),
            (
                encode_base64("\0alice\0pass word"),
                ok("alice", "pass word"),
            ),
            (
                encode_base64("\0alice\0secret")
                    .trim_end_matches('=')
                    .to_owned(),
                ok("alice", "secret"),
            ),
            (format!(" {} ", encode_base64("\0a\0b")), ok("a", "b")),
            (
                encode_base64("bob\0alice\0secret"),
                Err(AuthError::Malformed),
            ),
            (encode_base64("\0\0secret"), Err(AuthError::Malformed)),
            (encode_base64("\0alice\0"), Err(AuthError::Malformed)),
            (encode_base64("\0alice"), Err(AuthError::Malformed)),
            (encode_base64("alice"), Err(AuthError::Malformed)),
            (encode_base64("\0a\0b\0c"), Err(AuthError::Malformed)),
            ("=".to_owned(), Err(AuthError::Malformed)),
            ("AGFsaWNlAP8=".to_owned(), Err(AuthError::Malformed)),
            ("not base64!".to_owned(), Err(AuthError::Base64)),
            ("AGFsaWNlAHNlY3JldA=x".to_owned(), Err(AuthError::Base64)),
        ];
        for (input, expected) in cases {
            assert_eq!(decode_plain(&input), expected, "{input}");
        }
    }

    #[test]
    fn login_steps() {
        let cases: Vec<(&str, Result<String, AuthError>)> = vec![
            ("YWxpY2U=", Ok("alice".into())),
            ("YWxpY2U", Ok("alice".into())),
            ("=", Ok(String::new())),
            ("", Ok(String::new())),
            ("/w==", Err(AuthError::Malformed)),
            ("***", Err(AuthError::Base64)),
        ];
        for (input, expected) in cases {
            assert_eq!(decode_base64_text(input), expected, "{input}");
        }
        assert_eq!(
            decode_base64_text(LOGIN_USERNAME_PROMPT).as_deref(),
            Ok("Username:")
        );
        assert_eq!(
            decode_base64_text(LOGIN_PASSWORD_PROMPT).as_deref(),
            Ok("Password:")
        );
    }

    #[test]
    fn encode() {
        assert_eq!(encode_base64(""), "");
        assert_eq!(encode_base64("\0a\0b"), "AGEAYg==");
        assert_eq!(
            decode_base64_text(&encode_base64("héllo")).as_deref(),
            Ok("héllo")
        );
    }

    #[test]
    fn replies() {
        for err in [AuthError::Base64, AuthError::Malformed] {
            let reply = err.reply();
            assert_eq!((reply.code, reply.enhanced), (501, Some("5.5.2")));
        }
    }
}
