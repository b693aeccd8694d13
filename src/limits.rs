//! Counters that decide who may do how much: failed logins per address, connections per
//! minute, messages and recipients per hour.
//!
//! The session asks a [`LimitStore`] and never keeps counters of its own, so that several
//! Postern nodes behind one balancer can later share one store (Redis or Valkey) by
//! implementing the trait; [`LocalLimits`] keeps them in this process. Time comes from the
//! daemon's [`crate::clock::Clock`], so cool-downs are tested by moving a manual clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

/// What is being counted. Keys are values, never formatted strings, so a shared store maps
/// them to its own key names in one place.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LimitKey {
    /// Failed AUTH attempts from one client (see [`client_key`]).
    AuthFailures(IpAddr),
    /// New connections from one client.
    Connections(IpAddr),
    /// Messages started by an account.
    AccountMessages(String),
    /// Recipients accepted for an account.
    AccountRecipients(String),
    /// Messages started by an unauthenticated relay client.
    RelayMessages(IpAddr),
    /// Recipients accepted for an unauthenticated relay client.
    RelayRecipients(IpAddr),
}

/// A limit that was reached: when its window ends and counting starts afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAt(pub i64);

/// Shared counters. Every method is one atomic step, so concurrent sessions cannot both
/// take the last unit.
pub trait LimitStore: Send + Sync + 'static {
    /// Adds `n` to `key` if the total stays within `limit` and returns the new total;
    /// otherwise adds nothing and says when the window ends. A window opens with the first
    /// unit counted in it and lasts `window` seconds.
    fn try_add(
        &self,
        key: &LimitKey,
        n: u64,
        limit: u64,
        window: i64,
        now: i64,
    ) -> Result<u64, RetryAt>;

    /// Counts one strike against `key`; the strikes are forgotten `cooldown` seconds after
    /// the last one. Returns the number of strikes now held.
    fn strike(&self, key: &LimitKey, cooldown: i64, now: i64) -> u64;

    /// The strikes held against `key`, and when they will be forgotten.
    fn strikes(&self, key: &LimitKey, now: i64) -> (u64, RetryAt);
}

/// Entries are swept once the table has grown by this many since the last sweep, so memory
/// follows the number of clients seen within the longest window, not since start.
const SWEEP_EVERY: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Entry {
    count: u64,
    /// The counter is forgotten at this time.
    expires: i64,
}

/// Counters in this process's memory.
#[derive(Debug, Default)]
pub struct LocalLimits {
    inner: Mutex<Table>,
}

#[derive(Debug, Default)]
struct Table {
    entries: HashMap<LimitKey, Entry>,
    size_after_sweep: usize,
}

impl Table {
    fn live(&mut self, key: &LimitKey, now: i64) -> Option<&mut Entry> {
        match self.entries.get(key) {
            Some(e) if e.expires <= now => {
                self.entries.remove(key);
                None
            }
            _ => self.entries.get_mut(key),
        }
    }

    fn insert(&mut self, key: &LimitKey, entry: Entry, now: i64) {
        self.entries.insert(key.clone(), entry);
        if self.entries.len() >= self.size_after_sweep + SWEEP_EVERY {
            self.entries.retain(|_, e| e.expires > now);
            self.size_after_sweep = self.entries.len();
        }
    }
}

impl LocalLimits {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many counters are held (for tests of the sweep).
    pub fn len(&self) -> usize {
        self.table().entries.len()
    }

    /// True when no counter is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl LimitStore for LocalLimits {
    fn try_add(
        &self,
        key: &LimitKey,
        n: u64,
        limit: u64,
        window: i64,
        now: i64,
    ) -> Result<u64, RetryAt> {
        let mut table = self.table();
        if let Some(e) = table.live(key, now) {
            if e.count.saturating_add(n) > limit {
                return Err(RetryAt(e.expires));
            }
            e.count += n;
            return Ok(e.count);
        }
        if n > limit {
            return Err(RetryAt(now + window));
        }
        let entry = Entry {
            count: n,
            expires: now + window,
        };
        table.insert(key, entry, now);
        Ok(n)
    }

    fn strike(&self, key: &LimitKey, cooldown: i64, now: i64) -> u64 {
        let mut table = self.table();
        let count = table.live(key, now).map_or(0, |e| e.count) + 1;
        let entry = Entry {
            count,
            expires: now + cooldown,
        };
        table.insert(key, entry, now);
        count
    }

    fn strikes(&self, key: &LimitKey, now: i64) -> (u64, RetryAt) {
        let mut table = self.table();
        match table.live(key, now) {
            Some(e) => (e.count, RetryAt(e.expires)),
            None => (0, RetryAt(now)),
        }
    }
}

/// The address a client is counted under: IPv4 as is (IPv4-mapped IPv6 included), IPv6 by
/// its /64, since one host is normally given a whole /64 and could otherwise rotate through it.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

/// Renders a retry time for a reply: "after 14:05:00 UTC (in 300 s)".
pub fn retry_text(at: RetryAt, now: i64) -> String {
    let when = chrono::DateTime::from_timestamp(at.0, 0)
        .map(|t| t.format("%H:%M:%S UTC").to_string())
        .unwrap_or_default();
    format!("after {when} (in {} s)", (at.0 - now).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_window_refuses_past_its_limit_until_it_ends() {
        let l = LocalLimits::default();
        let k = LimitKey::AccountMessages("app".into());
        assert_eq!(l.try_add(&k, 2, 3, 3600, 1000), Ok(2));
        assert_eq!(l.try_add(&k, 1, 3, 3600, 1500), Ok(3));
        assert_eq!(l.try_add(&k, 1, 3, 3600, 2000), Err(RetryAt(4600)));
        // A batch that would overshoot is refused whole.
        assert_eq!(
            l.try_add(&LimitKey::AccountRecipients("app".into()), 5, 3, 60, 0),
            Err(RetryAt(60))
        );
        assert_eq!(l.try_add(&k, 1, 3, 3600, 4600), Ok(1));
    }

    #[test]
    fn strikes_are_forgotten_a_cooldown_after_the_last() {
        let l = LocalLimits::default();
        let k = LimitKey::AuthFailures(ip("192.0.2.1"));
        assert_eq!(l.strike(&k, 600, 0), 1);
        assert_eq!(l.strike(&k, 600, 500), 2);
        assert_eq!(l.strikes(&k, 1099), (2, RetryAt(1100)));
        assert_eq!(l.strikes(&k, 1100).0, 0);
        let other = LimitKey::AuthFailures(ip("192.0.2.2"));
        assert_eq!(l.strikes(&other, 0).0, 0);
    }

    #[test]
    fn expired_counters_are_swept() {
        let l = LocalLimits::default();
        for i in 1..SWEEP_EVERY as u32 {
            let k = LimitKey::Connections(IpAddr::V4(i.into()));
            l.try_add(&k, 1, 10, 60, 0).unwrap();
        }
        assert_eq!(l.len(), SWEEP_EVERY - 1);
        // The insertion that reaches the threshold, after every earlier window ended.
        let k = LimitKey::Connections(ip("192.0.2.9"));
        l.try_add(&k, 1, 10, 60, 100).unwrap();
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        assert_eq!(client_key(ip("2001:db8:1:2:a::1")), ip("2001:db8:1:2::"));
        assert_eq!(client_key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(client_key(ip("192.0.2.7")), ip("192.0.2.7"));
    }
}
