//! Reading the PROXY protocol header on a listener behind a load balancer.
//!
//! Only the configured balancer addresses may send one; the client address it carries then
//! stands for the connection everywhere (relay rules, allowed_ips, limits, logs, `Received:`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::proto::proxy::{self, ProxyError, ProxyHeader, V1_MAX, V1_PREFIX, V2_FIXED};
use crate::proto::Reply;

/// A balancer sends its header at once; a peer that does not is not one.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads the header and returns the client's address; the reply to refuse with otherwise.
pub(super) async fn client_address(
    socket: &mut TcpStream,
    peer: SocketAddr,
    proxies: &[IpNet],
) -> Result<SocketAddr, Reply> {
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer.ip(), IpAddr::V4),
        v4 => v4,
    };
    if !proxies.iter().any(|n| n.contains(&ip)) {
        tracing::warn!(peer = %peer.ip(), "refused: not a configured proxy on a PROXY-protocol listener");
        return Err(Reply::new(
            421,
            "4.7.0",
            "Connections must come through the load balancer",
        ));
    }
    match tokio::time::timeout(HEADER_TIMEOUT, read_header(socket)).await {
        Ok(Ok(ProxyHeader::Proxied { source, .. })) => {
            tracing::debug!(proxy = %peer.ip(), client = %source.ip(), "PROXY header");
            Ok(source)
        }
        Ok(Ok(ProxyHeader::Local)) => Ok(peer),
        Ok(Err(e)) => {
            tracing::warn!(peer = %peer.ip(), error = %e, "refused: bad PROXY header");
            Err(Reply::new(421, "4.7.0", "PROXY protocol header required"))
        }
        Err(_) => {
            tracing::warn!(peer = %peer.ip(), "refused: no PROXY header in time");
            Err(Reply::new(421, "4.7.0", "PROXY protocol header required"))
        }
    }
}

/// Reads exactly the header's octets, never more.
async fn read_header(socket: &mut TcpStream) -> Result<ProxyHeader, ProxyError> {
    let io = |_| ProxyError::Missing;
    let mut fixed = [0u8; V2_FIXED];
    socket
        .read_exact(&mut fixed[..V1_PREFIX.len()])
        .await
        .map_err(io)?;
    if &fixed[..V1_PREFIX.len()] == V1_PREFIX {
        // v1: byte by byte up to the LF (at most 107 octets, once per connection).
        let mut line = fixed[..V1_PREFIX.len()].to_vec();
        while line.last() != Some(&b'\n') {
            if line.len() >= V1_MAX {
                return Err(ProxyError::BadV1("longer than 107 octets"));
            }
            line.push(socket.read_u8().await.map_err(io)?);
        }
        return proxy::parse_v1(&line);
    }
    socket
        .read_exact(&mut fixed[V1_PREFIX.len()..])
        .await
        .map_err(io)?;
    let mut body = vec![0u8; proxy::v2_body_len(&fixed)?];
    socket.read_exact(&mut body).await.map_err(io)?;
    proxy::parse_v2(&fixed, &body)
}
