//! Idle outbound connections, kept for the next message to the same host.
//!
//! A connection is keyed by host, port and TLS policy, so a connection made under a weaker
//! policy is never handed to a destination that requires more.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::client::Connection;

pub(super) struct Pool {
    idle: Mutex<HashMap<String, Vec<(Connection, Instant)>>>,
    idle_timeout: Duration,
}

impl Pool {
    /// A pool whose idle connections are closed after `idle_timeout` by a background task.
    pub(super) fn new(idle_timeout: Duration) -> Arc<Pool> {
        let pool = Arc::new(Pool {
            idle: Mutex::new(HashMap::new()),
            idle_timeout,
        });
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(reap(Arc::downgrade(&pool), idle_timeout));
        }
        pool
    }

    /// An idle connection for `key`, if one is still fresh.
    pub(super) fn take(&self, key: &str) -> Option<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        while let Some((conn, since)) = list.pop() {
            if since.elapsed() < self.idle_timeout {
                return Some(conn);
            }
            tokio::spawn(conn.quit());
        }
        None
    }

    pub(super) fn put(&self, key: String, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.entry(key).or_default().push((conn, Instant::now()));
    }

    /// Connections currently idle, over all keys.
    pub(super) fn len(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.values().map(Vec::len).sum()
    }

    /// Takes every idle connection (shutdown).
    pub(super) fn drain(&self) -> Vec<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.drain()
            .flat_map(|(_, l)| l.into_iter().map(|(c, _)| c))
            .collect()
    }

    fn expire(&self) -> Vec<Connection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let mut expired = Vec::new();
        for list in idle.values_mut() {
            let (keep, old): (Vec<_>, Vec<_>) = list
                .drain(..)
                .partition(|(_, t)| t.elapsed() < self.idle_timeout);
            *list = keep;
            expired.extend(old.into_iter().map(|(c, _)| c));
        }
        idle.retain(|_, l| !l.is_empty());
        expired
    }
}

async fn reap(pool: Weak<Pool>, every: Duration) {
    let period = (every / 2).max(Duration::from_millis(100));
    loop {
        tokio::time::sleep(period).await;
        let Some(pool) = pool.upgrade() else { return };
        for conn in pool.expire() {
            let _ = conn.quit().await;
        }
    }
}
