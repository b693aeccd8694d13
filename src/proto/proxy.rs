//! PROXY protocol headers, versions 1 (text) and 2 (binary), as a TCP load balancer such as
//! HAProxy sends them before the SMTP stream (haproxy.org/download/2.9/doc/proxy-protocol.txt).
//!
//! The reader must not take a byte past the header (on an implicit-TLS listener the next
//! bytes are the client's TLS hello), so parsing is split along the header's own framing:
//! [`V1_PREFIX`] or the first [`V2_FIXED`] octets tell the version; a v1 header then ends at
//! its LF (at most [`V1_MAX`] octets), a v2 header after the length its fixed part gives.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Every v1 header starts with this.
pub const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest v1 header, CRLF included.
pub const V1_MAX: usize = 107;
/// Every v2 header starts with this signature.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The fixed part of a v2 header: signature, version and command, family, length.
pub const V2_FIXED: usize = 16;
/// Longest v2 address block accepted (addresses plus TLVs); HAProxy sends well under this.
pub const V2_MAX_BODY: usize = 2048;

/// What a header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyHeader {
    /// A proxied client: its address and the address it connected to.
    Proxied {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The balancer's own connection (v2 LOCAL, v1 UNKNOWN, or a family other than TCP over
    /// IPv4/IPv6): the connection's own peer address stands.
    Local,
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    Missing,
    #[error("malformed PROXY v1 header: {0}")]
    BadV1(&'static str),
    #[error("malformed PROXY v2 header: {0}")]
    BadV2(&'static str),
}

/// Parses a complete v1 line, CRLF included.
pub fn parse_v1(line: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let bad = ProxyError::BadV1;
    let line = line
        .strip_suffix(b"\r\n")
        .ok_or(bad("no CRLF at the end"))?;
    let line = std::str::from_utf8(line).map_err(|_| bad("not ASCII"))?;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(ProxyHeader::Local),
        ["PROXY", family, src, dst, sport, dport] => {
            let ip = |s: &str| -> Result<IpAddr, ProxyError> {
                match *family {
                    "TCP4" => s.parse::<Ipv4Addr>().map(IpAddr::V4),
                    "TCP6" => s.parse::<Ipv6Addr>().map(IpAddr::V6),
                    _ => return Err(bad("unknown protocol family")),
                }
                .map_err(|_| bad("bad address"))
            };
            let port = |s: &str| -> Result<u16, ProxyError> {
                let digits = !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
                // No leading zeros (the specification's form), except "0" itself.
                let ok = digits && (s == "0" || !s.starts_with('0'));
                ok.then(|| s.parse().ok()).flatten().ok_or(bad("bad port"))
            };
            Ok(ProxyHeader::Proxied {
                source: SocketAddr::new(ip(src)?, port(sport)?),
                destination: SocketAddr::new(ip(dst)?, port(dport)?),
            })
        }
        _ => Err(bad("wrong number of fields")),
    }
}

/// Checks the fixed part of a v2 header; returns the length of the rest.
pub fn v2_body_len(fixed: &[u8; V2_FIXED]) -> Result<usize, ProxyError> {
    let bad = ProxyError::BadV2;
    if &fixed[..12] != V2_SIGNATURE {
        return Err(ProxyError::Missing);
    }
    if fixed[12] >> 4 != 2 {
        return Err(bad("version is not 2"));
    }
    let len = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    if len > V2_MAX_BODY {
        return Err(bad("header too long"));
    }
    Ok(len)
}

/// Parses a v2 header from its fixed part and the `v2_body_len` octets after it.
pub fn parse_v2(fixed: &[u8; V2_FIXED], body: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let bad = ProxyError::BadV2;
    match fixed[12] & 0x0f {
        0 => return Ok(ProxyHeader::Local),
        1 => {}
        _ => return Err(bad("unknown command")),
    }
    let addr =
        |ip: IpAddr, port: &[u8]| SocketAddr::new(ip, u16::from_be_bytes([port[0], port[1]]));
    match fixed[13] {
        // TCP over IPv4: 4 + 4 + 2 + 2 octets, then TLVs (ignored).
        0x11 => {
            let b = body.get(..12).ok_or(bad("IPv4 block too short"))?;
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]));
            Ok(ProxyHeader::Proxied {
                source: addr(ip(0), &b[8..10]),
                destination: addr(ip(4), &b[10..12]),
            })
        }
        // TCP over IPv6: 16 + 16 + 2 + 2 octets.
        0x21 => {
            let b = body.get(..36).ok_or(bad("IPv6 block too short"))?;
            let ip = |o: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&b[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            Ok(ProxyHeader::Proxied {
                source: addr(ip(0), &b[32..34]),
                destination: addr(ip(16), &b[34..36]),
            })
        }
        // UNSPEC, UDP, Unix sockets: nothing usable as a client address.
        _ => Ok(ProxyHeader::Local),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        assert_eq!(
            parse_v1(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n"),
            Ok(ProxyHeader::Proxied {
                source: sa("192.0.2.7:56324"),
                destination: sa("198.51.100.1:25")
            })
        );
        assert_eq!(
            parse_v1(b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 587\r\n"),
            Ok(ProxyHeader::Proxied {
                source: sa("[2001:db8::7]:4000"),
                destination: sa("[2001:db8::1]:587")
            })
        );
        assert_eq!(parse_v1(b"PROXY UNKNOWN\r\n"), Ok(ProxyHeader::Local));
    }

    #[test]
    fn v1_malformed_is_refused() {
        for bad in [
            &b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\n"[..],
            b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n",
            b"PROXY TCP4 2001:db8::7 198.51.100.1 1 25\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 25\r\n",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 025 25\r\n",
            b"PROXY UDP4 192.0.2.7 198.51.100.1 1 25\r\n",
            b"PROXY TCP4 192.0.2.7  198.51.100.1 1 25\r\n",
        ] {
            assert!(parse_v1(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    fn v2(command: u8, family: u8, body: &[u8]) -> ([u8; V2_FIXED], Vec<u8>) {
        let mut fixed = [0u8; V2_FIXED];
        fixed[..12].copy_from_slice(V2_SIGNATURE);
        fixed[12] = 0x20 | command;
        fixed[13] = family;
        fixed[14..].copy_from_slice(&(body.len() as u16).to_be_bytes());
        (fixed, body.to_vec())
    }

    #[test]
    fn v2_ipv4_ipv6_and_local() {
        let mut body = vec![192, 0, 2, 7, 198, 51, 100, 1, 0xdc, 0x04, 0, 25];
        body.extend_from_slice(&[0x04, 0, 1, 0]); // a TLV, ignored
        let (fixed, body) = v2(1, 0x11, &body);
        assert_eq!(v2_body_len(&fixed), Ok(16));
        assert_eq!(
            parse_v2(&fixed, &body),
            Ok(ProxyHeader::Proxied {
                source: sa("192.0.2.7:56324"),
                destination: sa("198.51.100.1:25")
            })
        );
        let mut body6 = Vec::new();
        body6.extend_from_slice(&"2001:db8::7".parse::<Ipv6Addr>().unwrap().octets());
        body6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        body6.extend_from_slice(&[0x0f, 0xa0, 0x02, 0x4b]);
        let (fixed, body6) = v2(1, 0x21, &body6);
        assert_eq!(
            parse_v2(&fixed, &body6),
            Ok(ProxyHeader::Proxied {
                source: sa("[2001:db8::7]:4000"),
                destination: sa("[2001:db8::1]:587")
            })
        );
        let (fixed, empty) = v2(0, 0, &[]);
        assert_eq!(parse_v2(&fixed, &empty), Ok(ProxyHeader::Local));
    }

    #[test]
    fn v2_malformed_is_refused() {
        let (mut fixed, body) = v2(1, 0x11, &[1, 2, 3]);
        assert!(parse_v2(&fixed, &body).is_err(), "short IPv4 block");
        fixed[12] = 0x11;
        assert!(v2_body_len(&fixed).is_err(), "version 1 in a v2 header");
        fixed[0] = b'X';
        assert_eq!(v2_body_len(&fixed), Err(ProxyError::Missing));
        let (mut fixed, _) = v2(1, 0x11, &[]);
        fixed[14..].copy_from_slice(&65535u16.to_be_bytes());
        assert!(v2_body_len(&fixed).is_err(), "too long");
        let (fixed, body) = v2(7, 0x11, &[0; 12]);
        assert!(parse_v2(&fixed, &body).is_err(), "unknown command");
    }
}
