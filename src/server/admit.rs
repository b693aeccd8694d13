//! Admission: the per-client caps checked before a session is served.
//!
//! The global cap (`limits.max_connections`) is taken in the accept loop; these need the
//! client's address, which behind a PROXY-protocol balancer is known only once the header is
//! read, so the session checks them first thing.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::Context;
use crate::limits::{client_key, retry_text, LimitKey};
use crate::proto::Reply;

/// Open connections per client address.
#[derive(Debug, Default)]
pub(crate) struct OpenConnections {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection, counted until dropped.
pub(crate) struct Slot {
    owner: Arc<OpenConnections>,
    ip: IpAddr,
}

impl OpenConnections {
    fn try_open(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<Slot> {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Slot {
            owner: self.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.owner.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// Checks the per-client caps for a new connection from `ip`. Clients in `relay.networks`
/// (the operator's own applications, often one busy host) are exempt. The returned slot, if
/// any, must live as long as the session.
pub(super) fn admit(ctx: &Context, ip: IpAddr) -> Result<Option<Slot>, Reply> {
    if ctx.config.relay.allows(ip) {
        return Ok(None);
    }
    let limits = &ctx.config.limits;
    let key = client_key(ip);
    let Some(slot) = ctx.open.try_open(key, limits.max_connections_per_ip) else {
        tracing::info!(peer = %ip, "refused: too many connections from this address");
        return Err(Reply::new(
            421,
            "4.7.0",
            "Too many connections from your address; try again later",
        ));
    };
    let now = ctx.clock.now();
    let per_minute = limits.connections_per_ip_per_minute;
    match ctx
        .limits
        .try_add(&LimitKey::Connections(key), 1, per_minute, 60, now)
    {
        Ok(_) => Ok(Some(slot)),
        Err(retry) => {
            tracing::info!(peer = %ip, "refused: connection rate from this address");
            Err(Reply::new(
                421,
                "4.7.0",
                format!(
                    "Too many connections from your address (limit {per_minute} per minute); try again {}",
                    retry_text(retry, now)
                ),
            ))
        }
    }
}
