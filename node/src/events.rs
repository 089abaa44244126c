//! What happened on and around this node, for operators: nodes going down
//! and up, elections, placements, failovers. A bounded in-memory log (the
//! chain keeps the durable history); the console's events view shows it.

use std::collections::VecDeque;
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

/// Events kept; older ones are dropped.
pub const KEEP: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at: SystemTime,
    /// "node", "election", "placement", "failover", …
    pub kind: &'static str,
    pub message: String,
}

fn log() -> &'static Mutex<VecDeque<Event>> {
    static LOG: OnceLock<Mutex<VecDeque<Event>>> = OnceLock::new();
    LOG.get_or_init(|| Mutex::new(VecDeque::with_capacity(KEEP)))
}

/// Records an event (and logs it at info).
pub fn record(kind: &'static str, message: String) {
    tracing::info!(kind, "{message}");
    let mut log = log()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if log.len() == KEEP {
        log.pop_front();
    }
    log.push_back(Event {
        at: SystemTime::now(),
        kind,
        message,
    });
}

/// The newest `n` events, newest first.
pub fn recent(n: usize) -> Vec<Event> {
    let log = log()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    log.iter().rev().take(n).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_is_bounded_and_newest_first() {
        for i in 0..KEEP + 10 {
            record("test", format!("event {i}"));
        }
        let r = recent(usize::MAX);
        assert!(r.len() <= KEEP);
        assert_eq!(r[0].message, format!("event {}", KEEP + 9));
        assert!(r.windows(2).all(|w| w[0].at >= w[1].at));
    }
}
