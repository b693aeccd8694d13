//! systemd's service notification protocol (sd_notify(3)), written by hand: one datagram to the
//! Unix socket named in `NOTIFY_SOCKET`. Outside systemd (no variable) every call does nothing.
//!
//! The daemon says `READY=1` once the spool is recovered and every listener is bound,
//! `RELOADING=1` then `READY=1` around a SIGHUP reload, `STOPPING=1` when it starts draining,
//! and `WATCHDOG=1` at half the interval systemd asks for in `WATCHDOG_USEC`.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Where notifications go; `None` when not started by systemd with `Type=notify`.
pub struct Notifier {
    target: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace).
    pub fn from_env() -> Notifier {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|name| {
            let name = name.to_str()?.to_string();
            let addr = match name.strip_prefix('@') {
                Some(abs) => {
                    use std::os::linux::net::SocketAddrExt;
                    std::os::unix::net::SocketAddr::from_abstract_name(abs.as_bytes()).ok()?
                }
                None => std::os::unix::net::SocketAddr::from_pathname(&name).ok()?,
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        Notifier { target }
    }

    /// Sends one notification, e.g. `"READY=1\nSTATUS=serving"`. Failures are logged only:
    /// a lost notification must not take the daemon down.
    pub fn notify(&self, state: &str) {
        if let Some((socket, addr)) = &self.target {
            if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
                tracing::warn!(error = %e, "systemd notification failed");
            }
        }
    }

    /// `RELOADING=1` needs the monotonic time it started (systemd.service(5), notify-reload).
    pub fn reloading(&self) {
        let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
        self.notify(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
    }

    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when the watchdog is on and
    /// meant for this process.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.target.as_ref()?;
        if let Ok(pid) = std::env::var("WATCHDOG_PID") {
            if pid.trim() != std::process::id().to_string() {
                return None;
            }
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }

    /// Pings the watchdog until the runtime stops: if the runtime hangs, the pings stop and
    /// systemd restarts the service.
    pub async fn watchdog(self: std::sync::Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            self.notify("WATCHDOG=1");
        }
    }
}
