//! The node's wall clock, and its one seam: an offset that fault injection
//! (chaos runs) sets to skew this process's idea of the time. Everything
//! that stamps or compares wall-clock times (log entries and so block
//! times, token expiry, mesh heartbeats, receipts) reads it here; Raft's
//! timers use the monotonic clock and do not see the skew, as a real
//! node's would not.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

static SKEW_MS: AtomicI64 = AtomicI64::new(0);

/// Milliseconds since the Unix epoch, skew included.
pub fn now_ms() -> u64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    real.saturating_add_signed(SKEW_MS.load(Ordering::Relaxed))
}

/// The current time as a `SystemTime`, skew included.
pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(now_ms())
}

/// Sets the skew (milliseconds, either sign; 0 heals).
pub fn set_skew_ms(ms: i64) {
    SKEW_MS.store(ms, Ordering::Relaxed);
}

pub fn skew_ms() -> i64 {
    SKEW_MS.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skew_moves_the_clock_both_ways() {
        let before = now_ms();
        set_skew_ms(3_600_000);
        let ahead = now_ms();
        set_skew_ms(-3_600_000);
        let behind = now_ms();
        set_skew_ms(0);
        assert!(ahead >= before + 3_600_000);
        assert!(behind + 3_600_000 <= now_ms() + 10);
        assert!(behind < before);
        assert_eq!(skew_ms(), 0);
    }
}
