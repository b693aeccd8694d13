//! A seam under the spool's file operations, so tests (and chaos drills) can make the disk fail
//! on demand: "the next 3 appends get ENOSPC", "the next fdatasync gets EIO".
//!
//! Real faults come from the filesystem (a full tmpfs, `ulimit -f`); these reach the paths that
//! a real disk rarely offers on cue, such as a failing `fdatasync` or a key file that cannot be
//! read once. Each check is one relaxed atomic load when nothing is armed.

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

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
}

/// Armed faults; shared by the spool and whoever drives the test.
#[derive(Default)]
pub struct Faults {
    slots: [Slot; 8],
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

    /// Disarms every fault.
    pub fn clear(&self) {
        for slot in &self.slots {
            slot.remaining.store(0, Ordering::SeqCst);
        }
    }

    /// `Err` when a fault is armed at `point` (and uses up one of its count).
    pub(super) fn check(&self, point: FaultPoint) -> std::io::Result<()> {
        let slot = &self.slots[point as usize];
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
}
