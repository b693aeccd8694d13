//! A seam under the spool's file operations, so tests (and chaos drills) can make the disk fail
//! on demand: "the next 3 appends get ENOSPC", "the next fdatasync gets EIO".
//!
//! A point can also be made to stall ("the next fdatasync hangs until told"), for a disk that
//! is slow or stuck rather than failing: the operation blocks its thread until resumed.
//!
//! Real faults come from the filesystem (a full tmpfs, `ulimit -f`); these reach the paths that
//! a real disk rarely offers on cue, such as a failing `fdatasync` or a key file that cannot be
//! read once. Each check is one relaxed atomic load when nothing is armed.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};

/// The file operations that can be made to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// Appending a batch to the active segment.
    Append,
    /// `fdatasync` of the active segment after an append.
    Sync,
    /// Creating a segment (its key file and the file itself).
    CreateSegment,
    /// Reading a segment's key file during recovery.
    ReadKey,
    /// Punching out a destroyed record.
    Punch,
    /// Creating a body file, or appending a chunk to one.
    BodyWrite,
    /// `fdatasync` of a body file before its message is committed.
    BodySync,
    /// `fdatasync` of a segment that punches touched (when no append sync covered them).
    PunchSync,
}

#[derive(Default)]
struct Slot {
    remaining: AtomicU32,
    errno: AtomicI32,
    stalled: AtomicBool,
}

/// Armed faults; shared by the spool and whoever drives the test.
#[derive(Default)]
pub struct Faults {
    slots: [Slot; 8],
    /// Stalled operations wait on `resumed` under this lock until their point is resumed.
    stalls: Mutex<()>,
    resumed: Condvar,
}

impl Faults {
    /// The next `times` operations at `point` fail with `errno` (e.g. `libc`'s `ENOSPC` = 28).
    pub fn fail(&self, point: FaultPoint, times: u32, errno: i32) {
        let slot = &self.slots[point as usize];
        slot.errno.store(errno, Ordering::SeqCst);
        slot.remaining.store(times, Ordering::SeqCst);
    }

    /// How many more operations at `point` will fail.
    pub fn remaining(&self, point: FaultPoint) -> u32 {
        self.slots[point as usize].remaining.load(Ordering::SeqCst)
    }

    /// Operations at `point` block their thread from now on, until [`Faults::resume`].
    pub fn stall(&self, point: FaultPoint) {
        self.slots[point as usize]
            .stalled
            .store(true, Ordering::SeqCst);
    }

    /// Lets operations stalled at `point` go on.
    pub fn resume(&self, point: FaultPoint) {
        let _lock = self.stalls.lock().unwrap_or_else(|p| p.into_inner());
        self.slots[point as usize]
            .stalled
            .store(false, Ordering::SeqCst);
        self.resumed.notify_all();
    }

    /// Disarms every fault, and resumes stalled operations.
    pub fn clear(&self) {
        for slot in &self.slots {
            slot.remaining.store(0, Ordering::SeqCst);
        }
        let _lock = self.stalls.lock().unwrap_or_else(|p| p.into_inner());
        for slot in &self.slots {
            slot.stalled.store(false, Ordering::SeqCst);
        }
        self.resumed.notify_all();
    }

    /// Blocks while `point` is stalled.
    fn wait_while_stalled(&self, slot: &Slot) {
        let mut lock = self.stalls.lock().unwrap_or_else(|p| p.into_inner());
        while slot.stalled.load(Ordering::SeqCst) {
            lock = self.resumed.wait(lock).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits while `point` is stalled; then `Err` when a fault is armed at `point` (and uses
    /// up one of its count).
    pub(super) fn check(&self, point: FaultPoint) -> std::io::Result<()> {
        let slot = &self.slots[point as usize];
        if slot.stalled.load(Ordering::Relaxed) {
            self.wait_while_stalled(slot);
        }
        if slot.remaining.load(Ordering::Relaxed) == 0 {
            return Ok(());
        }
        let took = slot
            .remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        match took {
            Ok(_) => Err(std::io::Error::from_raw_os_error(
                slot.errno.load(Ordering::SeqCst),
            )),
            Err(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fault_fires_the_armed_number_of_times() {
        let faults = Faults::default();
        assert!(faults.check(FaultPoint::Sync).is_ok());
        faults.fail(FaultPoint::Sync, 2, 5);
        assert_eq!(
            faults.check(FaultPoint::Sync).unwrap_err().raw_os_error(),
            Some(5)
        );
        assert!(
            faults.check(FaultPoint::Append).is_ok(),
            "other points unaffected"
        );
        assert!(faults.check(FaultPoint::Sync).is_err());
        assert!(faults.check(FaultPoint::Sync).is_ok());
    }

    #[test]
    fn a_stalled_point_waits_until_resumed() {
        let faults = std::sync::Arc::new(Faults::default());
        faults.stall(FaultPoint::Sync);
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = {
            let faults = faults.clone();
            std::thread::spawn(move || {
                let _ = tx.send(faults.check(FaultPoint::Sync).is_ok());
            })
        };
        let early = rx.recv_timeout(std::time::Duration::from_millis(200));
        assert!(early.is_err(), "went on while stalled: {early:?}");
        assert!(
            faults.check(FaultPoint::Append).is_ok(),
            "other points go on"
        );
        faults.resume(FaultPoint::Sync);
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(5)), Ok(true));
        waiter.join().expect("waiter");
    }
}
