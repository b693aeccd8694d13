//! A cap on message bytes that delivery attempts hold in memory at once
//! (`limits.max_body_memory`).
//!
//! A delivery holds its message's record from the read of the body, once its destination's
//! limits and a session let it send, to the end of its transaction: the whole message when it
//! was small enough to be kept inline (up to [`crate::spool::SPILL_AT`]), the headers only when
//! its body is in a body file, read a chunk at a time. A message waiting for its turn holds
//! none: it has read its envelope only. Sessions need no share either: they hold at most
//! about one chunk of a body, and spill the rest to disk as it arrives.
//!
//! Each holder takes what it needs in one acquisition, and waits for it whole: nobody waits
//! for more while holding a part, so holders never wait on each other in a circle. A need
//! bigger than the cap takes all of it.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The shared cap.
pub struct BodyMemory {
    /// Free KiB.
    permits: Arc<Semaphore>,
    /// The cap in KiB.
    kib: u32,
}

/// Bytes held against the cap; given back when dropped.
#[derive(Default)]
pub struct Held {
    permit: Option<OwnedSemaphorePermit>,
}

impl BodyMemory {
    /// A cap of `bytes` (rounded down to KiB, at least 1 KiB).
    pub fn new(bytes: u64) -> BodyMemory {
        let kib = u32::try_from(bytes / 1024).unwrap_or(u32::MAX).max(1);
        BodyMemory {
            permits: Arc::new(Semaphore::new(kib as usize)),
            kib,
        }
    }

    /// Waits until `bytes` can be held (the whole cap, for more), and holds them.
    pub async fn hold(&self, bytes: u64) -> Held {
        let permit = self
            .permits
            .clone()
            .acquire_many_owned(self.kib_for(bytes))
            .await
            .ok();
        Held { permit }
    }

    /// Bytes free now.
    pub fn available(&self) -> u64 {
        self.permits.available_permits() as u64 * 1024
    }

    fn kib_for(&self, bytes: u64) -> u32 {
        bytes.div_ceil(1024).clamp(1, u64::from(self.kib)) as u32
    }
}

/// A value whose bytes are held against the cap for as long as it lives.
pub struct Holding<T> {
    value: T,
    _held: Held,
}

impl<T> std::ops::Deref for Holding<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl Held {
    /// The bytes held for `value`, given back when it goes.
    pub fn keeping<T>(self, value: T) -> Holding<T> {
        Holding { value, _held: self }
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        self.permit
            .as_ref()
            .map_or(0, |p| p.num_permits() as u64 * 1024)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn holders_wait_for_room_and_a_big_one_takes_the_whole_cap() {
        let memory = BodyMemory::new(1 << 20);
        let a = memory.hold(600 << 10).await;
        assert_eq!(a.bytes(), 600 << 10);
        // 600 KiB more do not fit: the second waits until the first is dropped.
        let waiting = tokio::time::timeout(Duration::from_millis(50), memory.hold(600 << 10));
        assert!(waiting.await.is_err(), "did not wait");
        drop(a);
        let b = memory.hold(600 << 10).await;
        drop(b);
        // More than the cap: all of it, not forever waiting.
        let big = memory.hold(50 << 20).await;
        assert_eq!((big.bytes(), memory.available()), (1 << 20, 0));
    }
}
