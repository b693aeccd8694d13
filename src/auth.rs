//! SMTP accounts: who may submit mail with AUTH.
//!
//! Passwords are stored only as argon2 PHC strings. A check costs tens of milliseconds of CPU
//! and 19 MiB of memory by design, so checks run on a [`CheckPool`] of their own: a few threads
//! (about one per core), never the reactor threads and never tokio's blocking pool, which grows
//! to hundreds of threads (each with its 19 MiB) under a password-guessing flood and is also
//! where spool reads and DKIM signing run.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

use argon2::password_hash::{PasswordHash, PasswordHasher, SaltString};
use argon2::Argon2;

use crate::config::{AccountConfig, SenderPolicy};

/// Why a password could not be hashed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("password hashing failed: {0}")]
    Hash(String),
}

/// One account: its password hash, where it may log in from and what it may send.
#[derive(Debug)]
pub struct Account {
    pub username: String,
    hash: String,
    /// Empty: any address.
    pub allowed_ips: Vec<ipnet::IpNet>,
    pub policy: SenderPolicy,
}

impl Account {
    /// Whether a login from `ip` is allowed (IPv4-mapped IPv6 counts as IPv4).
    pub fn allows_ip(&self, ip: std::net::IpAddr) -> bool {
        let ip = match ip {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.allowed_ips.is_empty() || self.allowed_ips.iter().any(|n| n.contains(&ip))
    }
}

/// The configured accounts, by user name.
#[derive(Debug, Default)]
pub struct Accounts {
    accounts: HashMap<String, Arc<Account>>,
}

impl Accounts {
    /// Builds the table from `[[account]]` entries (already validated by `config`).
    pub fn from_config(accounts: &[AccountConfig]) -> Accounts {
        Accounts {
            accounts: accounts
                .iter()
                .map(|a| {
                    let account = Account {
                        username: a.username.clone(),
                        hash: a.password_hash.clone(),
                        allowed_ips: a.allowed_ips.clone(),
                        policy: a.policy(),
                    };
                    (a.username.clone(), Arc::new(account))
                })
                .collect(),
        }
    }

    /// True when no account is configured (AUTH is then not offered).
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty()
    }

    /// Checks a user name and password on `pool`; the account when both are right. An
    /// unknown user costs the same as a wrong password, so timing does not reveal which user
    /// names exist.
    pub async fn verify(
        self: &Arc<Self>,
        pool: &CheckPool,
        priority: Priority,
        username: &str,
        password: &str,
    ) -> Option<Arc<Account>> {
        let this = self.clone();
        let username = username.to_string();
        let password = password.to_string();
        pool.run(priority, move || this.verify_blocking(&username, &password))
            .await
            .flatten()
    }

    fn verify_blocking(&self, username: &str, password: &str) -> Option<Arc<Account>> {
        let account = self.accounts.get(username);
        let hash = account.map_or(DUMMY_HASH, |a| a.hash.as_str());
        let ok = verify_in_place(hash, password.as_bytes());
        account.filter(|_| ok).cloned()
    }
}

/// Which queue of the [`CheckPool`] a check waits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A client with no recent failed login: served first, newest first.
    Clean,
    /// A client that failed recently: served when no clean check waits, so a guessing flood
    /// delays other guessers, not a legitimate login.
    Suspect,
}

type Job = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Queues {
    clean: VecDeque<Job>,
    suspect: VecDeque<Job>,
    closed: bool,
}

struct PoolShared {
    queues: Mutex<Queues>,
    ready: Condvar,
}

/// A fixed set of threads for password checks. The queues hold at most one check per open
/// session (a session waits for its answer), so they are bounded by the connection limits;
/// memory for the checks themselves is bounded by the number of threads.
pub struct CheckPool {
    shared: Arc<PoolShared>,
}

impl CheckPool {
    /// Starts `threads` workers (at least one).
    pub fn new(threads: usize) -> CheckPool {
        let shared = Arc::new(PoolShared {
            queues: Mutex::new(Queues::default()),
            ready: Condvar::new(),
        });
        for i in 0..threads.max(1) {
            let shared = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("postern-auth-{i}"))
                .spawn(move || worker(&shared));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password-check thread");
            }
        }
        CheckPool { shared }
    }

    /// One thread per core the process may use.
    pub fn per_core() -> CheckPool {
        CheckPool::new(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Runs `f` on a pool thread and waits for its result; None if the pool is gone.
    pub async fn run<T: Send + 'static>(
        &self,
        priority: Priority,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            // The session is gone (client left, timeout): the check would be wasted.
            if !tx.is_closed() {
                let _ = tx.send(f());
            }
        });
        {
            let mut q = self.shared.queues.lock().unwrap_or_else(|p| p.into_inner());
            match priority {
                // Newest first: a flood from many fresh addresses queues ahead of a legitimate
                // client only what arrives after it, not everything that came before.
                Priority::Clean => q.clean.push_front(job),
                Priority::Suspect => q.suspect.push_back(job),
            }
        }
        self.shared.ready.notify_one();
        rx.await.ok()
    }
}

impl Drop for CheckPool {
    /// Workers finish what is queued, then exit.
    fn drop(&mut self) {
        self.shared
            .queues
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .closed = true;
        self.shared.ready.notify_all();
    }
}

fn worker(shared: &PoolShared) {
    loop {
        let job = {
            let mut q = shared.queues.lock().unwrap_or_else(|p| p.into_inner());
            loop {
                if let Some(job) = q.clean.pop_front().or_else(|| q.suspect.pop_front()) {
                    break job;
                }
                if q.closed {
                    return;
                }
                q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
            }
        };
        job();
    }
}

thread_local! {
    /// Each pool thread's argon2 working memory, allocated once and reused for every check.
    /// Allocating 19 MiB per check made glibc raise its trim threshold and keep freed blocks
    /// in every malloc arena: hundreds of MiB resident under a guessing flood.
    static MEMORY: std::cell::RefCell<Vec<argon2::Block>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Verifies `password` against a PHC string, computing in this thread's reused memory; the
/// comparison is constant-time ([`argon2::password_hash::Output`]'s equality).
fn verify_in_place(hash: &str, password: &[u8]) -> bool {
    use argon2::password_hash::Output;
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return false;
    };
    let mut salt_buf = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
        return false;
    };
    let (Ok(algorithm), Ok(params)) = (
        argon2::Algorithm::try_from(parsed.algorithm),
        argon2::Params::try_from(&parsed),
    ) else {
        return false;
    };
    let version = match parsed.version.map(argon2::Version::try_from) {
        Some(Ok(v)) => v,
        None => argon2::Version::default(),
        Some(Err(_)) => return false,
    };
    let blocks = params.block_count();
    let argon = Argon2::new(algorithm, version, params);
    let mut out = vec![0u8; expected.len()];
    MEMORY.with(|memory| {
        let mut memory = memory.borrow_mut();
        if memory.len() < blocks {
            memory.resize(blocks, argon2::Block::default());
        }
        argon
            .hash_password_into_with_memory(password, salt, &mut out, &mut memory[..blocks])
            .is_ok()
            && Output::new(&out).is_ok_and(|o| o == expected)
    })
}

/// argon2id of a random string, with the default parameters: burnt for unknown users.
const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$c29tZXNhbHRzb21lc2FsdA$0CtxhiR3+SJEtPaPHzcnU8/S2nk5Ob6YgZ0HQNZ4U1I";

/// Hashes a password for `[[account]]` (argon2id, default parameters, random salt).
pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    crate::crypto::random_bytes(&mut salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verifies_only_the_right_password_of_a_known_user() {
        let hash = hash_password("s3cret").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        let accounts = Arc::new(Accounts::from_config(&[AccountConfig {
            username: "app".into(),
            password_hash: hash,
            ..Default::default()
        }]));
        let pool = CheckPool::new(1);
        let check =
            |u: &'static str, p: &'static str| accounts.verify(&pool, Priority::Clean, u, p);
        assert_eq!(check("app", "s3cret").await.unwrap().username, "app");
        assert!(check("app", "s3cret ").await.is_none());
        assert!(check("other", "s3cret").await.is_none());
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
    }

    #[tokio::test]
    async fn clean_checks_overtake_queued_suspect_ones() {
        let pool = CheckPool::new(1);
        let order = Arc::new(Mutex::new(Vec::new()));
        // Hold the only worker so that the next jobs queue up behind it.
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let busy = pool.run(Priority::Clean, move || {
            let _ = hold.recv();
        });
        let record = |tag: &'static str| {
            let order = order.clone();
            move || order.lock().unwrap().push(tag)
        };
        let suspect = pool.run(Priority::Suspect, record("suspect"));
        let clean = pool.run(Priority::Clean, record("clean"));
        let all = async { tokio::join!(busy, suspect, clean) };
        let waiter = tokio::spawn(async move {
            // Released only once the other two are surely queued (they are queued on first poll).
            tokio::task::yield_now().await;
            let _ = release.send(());
        });
        let (b, s, c) = all.await;
        waiter.await.unwrap();
        assert!(b.is_some() && s.is_some() && c.is_some());
        assert_eq!(*order.lock().unwrap(), vec!["clean", "suspect"]);
    }

    /// User enumeration by timing: a login for a name that does not exist must cost what a
    /// wrong password for a real one costs (the dummy hash is verified in its place). Samples
    /// alternate and medians are compared, with bounds wide enough for a busy machine: skipping
    /// the hash makes the unknown user thousands of times cheaper, far outside them.
    #[test]
    fn an_unknown_user_costs_about_what_a_wrong_password_costs() {
        let accounts = Accounts::from_config(&[AccountConfig {
            username: "app".into(),
            password_hash: hash_password("s3cret").unwrap(),
            ..Default::default()
        }]);
        let time = |user: &str| {
            let start = std::time::Instant::now();
            assert!(accounts.verify_blocking(user, "wrong").is_none());
            start.elapsed()
        };
        let (mut known, mut unknown) = (Vec::new(), Vec::new());
        for _ in 0..7 {
            known.push(time("app"));
            unknown.push(time("nobody"));
        }
        known.sort();
        unknown.sort();
        let ratio = unknown[3].as_secs_f64() / known[3].as_secs_f64();
        assert!(
            (0.33..3.0).contains(&ratio),
            "unknown user {:?} vs wrong password {:?} (median)",
            unknown[3],
            known[3]
        );
    }
}
