//! Per-recipient retry state, stored (sealed) with the message in the spool so that a restart
//! resumes with the same attempt counts and retry times.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Retry state of one recipient.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RcptSchedule {
    pub attempts: u32,
    /// Unix time of the next attempt; 0 means "now".
    pub next_attempt: i64,
    /// Status and diagnostic of the last temporary failure, for the expiry notice.
    pub last_status: String,
    pub last_diagnostic: String,
    pub last_remote: Option<String>,
}

/// What went wrong in a temporary failure, kept for the expiry notice.
#[derive(Debug, Clone, Copy)]
pub struct Failure<'a> {
    pub status: &'a str,
    pub diagnostic: &'a str,
    pub remote: Option<&'a str>,
}

/// Why a message is on hold: it is not tried until an operator releases it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HoldReason {
    /// `postern queue hold`.
    Operator,
    /// Its delivery was in progress at two crashes in a row: held so that one message cannot
    /// crash-loop the daemon.
    CrashLoop,
}

/// A hold, stored with the retry state so that it survives a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub reason: HoldReason,
    /// Unix time the hold began.
    pub since: i64,
}

/// Retry state of a message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub rcpts: Vec<RcptSchedule>,
    /// A delay notice has been sent for this message.
    pub warned: bool,
    /// Held messages are left alone by the scheduler (state written before holds existed
    /// decodes as not held).
    #[serde(default)]
    pub hold: Option<Hold>,
}

impl Schedule {
    /// Fresh state for `n` recipients, all due now.
    pub fn new(n: usize) -> Schedule {
        Schedule {
            rcpts: vec![RcptSchedule::default(); n],
            warned: false,
            hold: None,
        }
    }

    /// Decodes stored state; anything unreadable or of the wrong size starts afresh (at worst
    /// a recipient is tried again early, never forgotten).
    pub fn decode(bytes: &[u8], n: usize) -> Schedule {
        match serde_json::from_slice::<Schedule>(bytes) {
            Ok(s) if s.rcpts.len() == n => s,
            _ => Schedule::new(n),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// When the earliest non-final recipient is due, if any.
    pub fn next_due(&self, final_rcpts: &[bool]) -> Option<i64> {
        self.rcpts
            .iter()
            .zip(final_rcpts)
            .filter(|(_, done)| !**done)
            .map(|(r, _)| r.next_attempt)
            .min()
    }

    /// Records a temporary failure of recipient `i` at `now`: the next attempt follows
    /// `retry` (the last step repeats), but never later than `expires_at`, so that expiry is
    /// reported on time.
    pub fn deferred(
        &mut self,
        i: usize,
        now: i64,
        retry: &[Duration],
        expires_at: i64,
        last: Failure<'_>,
    ) {
        let Some(r) = self.rcpts.get_mut(i) else {
            return;
        };
        r.attempts += 1;
        let step = retry
            .get(r.attempts as usize - 1)
            .or(retry.last())
            .map_or(60, |d| d.as_secs() as i64);
        r.next_attempt = (now + step).min(expires_at).max(now + 1);
        r.last_status = last.status.to_string();
        r.last_diagnostic = last.diagnostic.to_string();
        r.last_remote = last.remote.map(str::to_string);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_steps_repeat_the_last_and_stop_at_expiry() {
        let retry = [Duration::from_secs(60), Duration::from_secs(300)];
        let mut s = Schedule::new(2);
        let f = Failure {
            status: "4.0.0",
            diagnostic: "smtp; 451 later",
            remote: Some("mx.test"),
        };
        s.deferred(0, 1000, &retry, 10_000, f);
        assert_eq!(s.rcpts[0].next_attempt, 1060);
        s.deferred(0, 1060, &retry, 10_000, f);
        assert_eq!(s.rcpts[0].next_attempt, 1360);
        s.deferred(0, 1360, &retry, 10_000, f);
        assert_eq!(s.rcpts[0].next_attempt, 1660, "last step repeats");
        s.deferred(0, 9900, &retry, 10_000, f);
        assert_eq!(s.rcpts[0].next_attempt, 10_000, "capped at expiry");
        assert_eq!(s.rcpts[0].attempts, 4);
        assert_eq!(
            s.next_due(&[false, false]),
            Some(0),
            "recipient 1 untried: due now"
        );
        assert_eq!(s.next_due(&[false, true]), Some(10_000));
        assert_eq!(s.next_due(&[true, true]), None);
        assert_eq!(Schedule::decode(&s.encode(), 2), s);
        assert_eq!(Schedule::decode(&s.encode(), 3), Schedule::new(3));
        assert_eq!(Schedule::decode(b"junk", 1), Schedule::new(1));
        s.hold = Some(Hold {
            reason: HoldReason::CrashLoop,
            since: 5,
        });
        assert_eq!(Schedule::decode(&s.encode(), 2).hold, s.hold);
        let old = br#"{"rcpts":[{"attempts":1,"next_attempt":9,"last_status":"","last_diagnostic":"","last_remote":null}],"warned":false}"#;
        assert_eq!(Schedule::decode(old, 1).rcpts[0].next_attempt, 9);
        assert_eq!(Schedule::decode(old, 1).hold, None);
    }
}
