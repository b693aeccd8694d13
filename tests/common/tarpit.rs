//! A listener that accepts connections and never says a word: they stay open, so a delivery
//! attempt to it stays in flight until the client's own timeouts end it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Tarpit {
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
}

impl Tarpit {
    pub async fn start(addr: &str) -> Tarpit {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind tarpit");
        let connections = Arc::new(AtomicUsize::new(0));
        let tarpit = Tarpit {
            addr: listener.local_addr().expect("tarpit address"),
            connections: connections.clone(),
        };
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                connections.fetch_add(1, Ordering::SeqCst);
                held.push(socket);
            }
        });
        tarpit
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Waits until `n` connections have been accepted; panics after 10 s.
    #[allow(dead_code)]
    pub async fn wait_for(&self, n: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.connections() < n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} of {n} connections reached the tarpit",
                self.connections()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
