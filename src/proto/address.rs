//! Mailbox syntax of RFC 5321 4.1.2, extended with UTF-8 by RFC 6531 3.3.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

/// RFC 5321 4.5.3.1.1.
const MAX_LOCAL: usize = 64;
/// RFC 5321 4.5.3.1.2.
const MAX_DOMAIN: usize = 255;
/// RFC 5321 4.5.3.1.3, counting the angle brackets.
const MAX_PATH: usize = 256;
/// RFC 1035 2.3.4.
const MAX_LABEL: usize = 63;

/// A mailbox `local@domain` per RFC 5321 4.1.2 (Dot-string or Quoted-string local part; domain name or address literal `[1.2.3.4]` / `[IPv6:...]`), with RFC 6531 UTF-8 allowed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Address {
    /// The local part as written, quotes and escapes kept.
    pub local: String,
    /// The domain or address literal (brackets kept) as written.
    pub domain: String,
}

/// Why a mailbox was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// Nothing between the angle brackets.
    #[error("empty address")]
    Empty,
    /// No `@domain`, e.g. a bang path `host!user` or a bare `postmaster`.
    #[error("address has no domain")]
    NoDomain,
    /// An RFC 5321 source route `@a,@b:u@c`, which we refuse rather than ignore.
    #[error("source routes are not accepted")]
    SourceRoute,
    /// The local part is neither a Dot-string nor a Quoted-string.
    #[error("invalid local part")]
    BadLocalPart,
    /// The domain is neither a domain name nor an address literal.
    #[error("invalid domain")]
    BadDomain,
    /// Local part over 64, domain over 255 or path over 256 octets.
    #[error("address too long")]
    TooLong,
}

impl Address {
    /// Parses the text between `<` and `>`.
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        if s.is_empty() {
            return Err(AddressError::Empty);
        }
        if s.starts_with('@') {
            return Err(AddressError::SourceRoute);
        }
        if s.len() + 2 > MAX_PATH {
            return Err(AddressError::TooLong);
        }
        let (local, domain) = if s.starts_with('"') {
            let end = quoted_string_end(s).ok_or(AddressError::BadLocalPart)?;
            let (local, rest) = s.split_at(end);
            match rest.strip_prefix('@') {
                Some(domain) => (local, domain),
                None if rest.is_empty() => return Err(AddressError::NoDomain),
                None => return Err(AddressError::BadLocalPart),
            }
        } else {
            // '@' is not atext, so the first one ends a Dot-string.
            let (local, domain) = s.split_once('@').ok_or(AddressError::NoDomain)?;
            if !is_dot_string(local) {
                return Err(AddressError::BadLocalPart);
            }
            (local, domain)
        };
        if local.len() > MAX_LOCAL || domain.len() > MAX_DOMAIN {
            return Err(AddressError::TooLong);
        }
        if !is_domain(domain) && !is_address_literal(domain) {
            return Err(AddressError::BadDomain);
        }
        Ok(Address {
            local: local.to_owned(),
            domain: domain.to_owned(),
        })
    }

    /// False when the address needs SMTPUTF8 (RFC 6531) to be transmitted.
    pub fn is_ascii(&self) -> bool {
        self.local.is_ascii() && self.domain.is_ascii()
    }

    /// The domain in lower case, for comparisons (domains are case-insensitive, local parts not).
    pub fn domain_lowercase(&self) -> String {
        self.domain.to_lowercase()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// An address as one subject's identity, for pseudonyms, suppression and erasure: every way
/// of writing one mailbox gives the same string, so that an opt-out or an erasure request
/// cannot miss the person because of how an address was spelled.
/// - A quoted local part is unquoted when that is equivalent (RFC 5321 4.1.2: `"bob"` and
///   `bob` are one mailbox), that is when its content is a Dot-string; otherwise it is
///   requoted with only the escapes it needs (`"a\b c"` and `"ab c"` are one mailbox too).
/// - The domain in A-label form, lower case ([`normalise_domain`]).
/// - The local part lower-cased when `lowercase_local` (`privacy.local_part`): RFC 5321 leaves
///   its case to the receiving host, and nearly every provider ignores it.
///
/// Text that is not a mailbox (an operator's typo in an erasure request, say) is normalised
/// as far as it can be: split at its last `@`, or lower-cased whole.
pub fn normalise(address: &str, lowercase_local: bool) -> String {
    let address = address.trim();
    let address = address
        .strip_prefix('<')
        .and_then(|a| a.strip_suffix('>'))
        .unwrap_or(address);
    let (local, domain) = match Address::parse(address) {
        Ok(a) => (canonical_local_part(&a.local), a.domain),
        Err(_) => match address.rsplit_once('@') {
            Some((local, domain)) => (local.to_string(), domain.to_string()),
            None => return address.to_lowercase(),
        },
    };
    let local = if lowercase_local {
        local.to_lowercase()
    } else {
        local
    };
    format!("{local}@{}", normalise_domain(&domain))
}

/// A domain as compared and stored: A-labels (IDNA, so `bücher.example` and
/// `xn--bcher-kva.example` are one domain), lower case, no trailing dot. Address literals and
/// names IDNA refuses are only lower-cased.
pub fn normalise_domain(domain: &str) -> String {
    let domain = domain.trim().trim_end_matches('.');
    if domain.starts_with('[') {
        return domain.to_lowercase();
    }
    idna::domain_to_ascii(domain).unwrap_or_else(|_| domain.to_lowercase())
}

/// A local part in its shortest equivalent form: a Quoted-string whose content is a
/// Dot-string loses its quotes; any other keeps them, escaping only `"` and `\`.
fn canonical_local_part(local: &str) -> String {
    let Some(inner) = local.strip_prefix('"').and_then(|l| l.strip_suffix('"')) else {
        return local.to_string();
    };
    let mut content = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        // quoted-pairSMTP: the backslash only says that the next character is literal.
        content.push(if c == '\\' {
            chars.next().unwrap_or(c)
        } else {
            c
        });
    }
    if is_dot_string(&content) {
        return content;
    }
    let mut quoted = String::with_capacity(content.len() + 2);
    quoted.push('"');
    for c in content.chars() {
        if c == '"' || c == '\\' {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// RFC 6531 3.3 extends the ASCII productions with any non-ASCII UTF-8 character.
fn is_utf8_non_ascii(c: char) -> bool {
    !c.is_ascii() && !c.is_control()
}

fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || is_utf8_non_ascii(c)
}

fn is_dot_string(s: &str) -> bool {
    s.split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// Byte index just past the closing quote of the Quoted-string starting `s`.
fn quoted_string_end(s: &str) -> Option<usize> {
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Some(i + 1),
            // quoted-pairSMTP: backslash followed by any printable ASCII.
            '\\' => match chars.next() {
                Some((_, ' '..='~')) => {}
                _ => return None,
            },
            // qtextSMTP: printable ASCII except '"' and '\'.
            ' '..='~' => {}
            c if is_utf8_non_ascii(c) => {}
            _ => return None,
        }
    }
    None
}

fn is_domain(s: &str) -> bool {
    !s.is_empty() && s.split('.').all(is_sub_domain)
}

/// RFC 5321 sub-domain (Let-dig [Ldh-str]), or an RFC 6531 U-label.
fn is_sub_domain(label: &str) -> bool {
    let letdig = |c: char| c.is_ascii_alphanumeric() || is_utf8_non_ascii(c);
    let (Some(first), Some(last)) = (label.chars().next(), label.chars().next_back()) else {
        return false;
    };
    // A U-label's length limit applies to its A-label form, which we do not compute.
    (!label.is_ascii() || label.len() <= MAX_LABEL)
        && letdig(first)
        && letdig(last)
        && label.chars().all(|c| letdig(c) || c == '-')
}

fn is_address_literal(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('[').and_then(|s| s.strip_suffix(']')) else {
        return false;
    };
    // The tag is case-insensitive like every ABNF literal; no other
    // General-address-literal tag is registered, so any other tag is refused.
    let tag = inner.get(..5);
    if tag.is_some_and(|tag| tag.eq_ignore_ascii_case("IPv6:")) {
        return inner
            .get(5..)
            .is_some_and(|ip| ip.parse::<Ipv6Addr>().is_ok());
    }
    inner.parse::<Ipv4Addr>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalised_addresses_name_one_mailbox_once() {
        let same = [
            ("\"bob\"@x.example", "bob@x.example"),
            ("<\"b\\ob\"@X.Example>", "bob@x.example"),
            ("\"first.last\"@x.example", "first.last@x.example"),
            ("bob@bücher.example", "bob@xn--bcher-kva.example"),
            ("bob@BÜCHER.example", "bob@xn--bcher-kva.example"),
            ("\"a\\b c\"@x.example", "\"ab c\"@x.example"),
        ];
        for (a, b) in same {
            assert_eq!(normalise(a, true), normalise(b, true), "{a} vs {b}");
        }
        assert_eq!(
            normalise("\"Bob\"@Bücher.Example", true),
            "bob@xn--bcher-kva.example"
        );
        assert_eq!(normalise("\"Bob\"@x.example", false), "Bob@x.example");
        assert_ne!(
            normalise("Bob@x.example", false),
            normalise("bob@x.example", false)
        );
        // Quotes that are needed stay, with minimal escapes.
        assert_eq!(
            normalise("\"john doe\"@x.example", true),
            "\"john doe\"@x.example"
        );
        assert_eq!(
            normalise("\"a\\\"b\"@x.example", true),
            "\"a\\\"b\"@x.example"
        );
        assert_eq!(normalise("\"a..b\"@x.example", true), "\"a..b\"@x.example");
        assert_eq!(normalise("u@[192.0.2.1]", true), "u@[192.0.2.1]");
        // Not a mailbox: normalised as far as possible.
        assert_eq!(
            normalise(" Not A Mailbox@Bücher.Example ", true),
            "not a mailbox@xn--bcher-kva.example"
        );
        assert_eq!(normalise("postmaster", true), "postmaster");
        assert_eq!(normalise_domain("Example.ORG."), "example.org");
    }

    #[test]
    fn valid() {
        let cases = [
            ("user@example.com", "user", "example.com", true),
            ("First.Last@Example.COM", "First.Last", "Example.COM", true),
            (
                "a+tag@sub.example.co.uk",
                "a+tag",
                "sub.example.co.uk",
                true,
            ),
            ("!#$&'*+-/=?^_`{|}~@x.y", "!#$&'*+-/=?^_`{|}~", "x.y", true),
            (
                "\"john doe\"@example.com",
                "\"john doe\"",
                "example.com",
                true,
            ),
            ("\"a@b\"@example.com", "\"a@b\"", "example.com", true),
            (
                "\"a\\\"b\\\\c\"@example.com",
                "\"a\\\"b\\\\c\"",
                "example.com",
                true,
            ),
            ("\"\"@example.com", "\"\"", "example.com", true),
            ("u%x@host.example", "u%x", "host.example", true),
            ("user@[192.0.2.1]", "user", "[192.0.2.1]", true),
            (
                "user@[IPv6:2001:db8::1]",
                "user",
                "[IPv6:2001:db8::1]",
                true,
            ),
            ("user@[ipv6:::1]", "user", "[ipv6:::1]", true),
            ("user@localhost", "user", "localhost", true),
            ("user@a-b.c9", "user", "a-b.c9", true),
            ("user@123.example", "user", "123.example", true),
            ("jürgen@example.com", "jürgen", "example.com", false),
            ("用户@例子.广告", "用户", "例子.广告", false),
            ("user@bücher.example", "user", "bücher.example", false),
            ("\"é x\"@example.com", "\"é x\"", "example.com", false),
        ];
        for (input, local, domain, ascii) in cases {
            let addr = Address::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(addr.local, local, "{input}");
            assert_eq!(addr.domain, domain, "{input}");
            assert_eq!(addr.is_ascii(), ascii, "{input}");
            assert_eq!(addr.to_string(), input);
            assert_eq!(Address::parse(&addr.to_string()), Ok(addr));
        }
    }

    #[test]
    fn invalid() {
        let long_local = format!("{}@example.com", "a".repeat(65));
        let ok_local = format!("{}@example.com", "a".repeat(64));
        let long_label = format!("a@{}.com", "b".repeat(64));
        let long_domain = format!("a@{}", ["abcdefghij"; 24].join("."));
        let long_path = format!("{}@{}", "a".repeat(60), ["abcdefghij"; 18].join("."));
        // Exactly 256 octets with the brackets.
        let ok_path = format!("{}@{}.ab", "a".repeat(64), ["abcdefghij"; 17].join("."));
        assert_eq!(ok_path.len() + 2, 256);
        for ok in [&ok_local, &ok_path] {
            assert!(Address::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(
            Address::parse(&format!("{ok_path}c")),
            Err(AddressError::TooLong)
        );
        let cases: Vec<(&str, AddressError)> = vec![
            ("", AddressError::Empty),
            ("@a,@b:u@c", AddressError::SourceRoute),
            ("@relay.example:user@example.com", AddressError::SourceRoute),
            ("host!user", AddressError::NoDomain),
            ("postmaster", AddressError::NoDomain),
            ("\"quoted\"", AddressError::NoDomain),
            ("user@", AddressError::BadDomain),
            ("user@example.com.", AddressError::BadDomain),
            ("user@.example.com", AddressError::BadDomain),
            ("user@example..com", AddressError::BadDomain),
            ("user@-example.com", AddressError::BadDomain),
            ("user@example-.com", AddressError::BadDomain),
            ("user@exa_mple.com", AddressError::BadDomain),
            ("user@exa mple.com", AddressError::BadDomain),
            ("user@a@b.com", AddressError::BadDomain),
            ("user@[1.2.3]", AddressError::BadDomain),
            ("user@[300.1.1.1]", AddressError::BadDomain),
            ("user@[IPv6:zz::1]", AddressError::BadDomain),
            ("user@[2001:db8::1]", AddressError::BadDomain),
            ("user@[x-tag:stuff]", AddressError::BadDomain),
            ("user@[1.2.3.4", AddressError::BadDomain),
            (".user@example.com", AddressError::BadLocalPart),
            ("user.@example.com", AddressError::BadLocalPart),
            ("us..er@example.com", AddressError::BadLocalPart),
            ("us er@example.com", AddressError::BadLocalPart),
            ("us(er@example.com", AddressError::BadLocalPart),
            ("@example.com", AddressError::SourceRoute),
            ("\"unterminated@example.com", AddressError::BadLocalPart),
            ("\"a\"b@example.com", AddressError::BadLocalPart),
            ("\"a\tb\"@example.com", AddressError::BadLocalPart),
            ("\"a\\\"@example.com", AddressError::BadLocalPart),
            ("us\u{7f}er@example.com", AddressError::BadLocalPart),
            (&long_local, AddressError::TooLong),
            (&long_label, AddressError::BadDomain),
            (&long_domain, AddressError::TooLong),
            (&long_path, AddressError::TooLong),
        ];
        for (input, expected) in cases {
            assert_eq!(Address::parse(input), Err(expected), "{input}");
        }
    }

    #[test]
    fn domain_lowercase() {
        let addr = Address::parse("User@Example.COM").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(addr.domain_lowercase(), "example.com");
        assert_eq!(addr.local, "User");
        let addr = Address::parse("u@BÜCHER.example").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(addr.domain_lowercase(), "bücher.example");
    }
}
