//! A follower's serving lease, and the stamps that date it on the
//! follower's own clock.
//!
//! A leader moves a node's stages when it has not heard from the node for
//! `down_after`, or by entries the node applies as they come. The node
//! serves its stages only while it holds a lease of `down_after / 2` and
//! has applied up to the commit index its leader last told it.
//!
//! Where the lease starts is the subtle part. The receipt time of an
//! AppendEntries says nothing about when it was sent: a message held in a
//! socket while the network was cut (or the node frozen) arrives late,
//! looking fresh. So each answer to an AppendEntries carries a [`Stamp`]
//! (the follower's monotonic time as it answers), the leader
//! echoes the newest stamp it holds from that follower in its next
//! AppendEntries with how long before receiving it a majority had last
//! accepted the leader, and the lease runs from the stamp less that lag.
//! The leader heard from the follower after the stamp (its `down_after`
//! silence counts from then or later) and a majority had accepted it by
//! the lag's start (a new leader can exist only after that), so the lease
//! ends before either bound. A late message carries an old echo, and so
//! an old lease. In steady state the start trails the receipt by about
//! one heartbeat, as the quorum age it replaces did.
//!
//! [`Stamp`]: pb::Stamp

use std::time::{Duration, Instant};

use trine_proto::v1 as pb;

/// This process's clock for stamps: a random boot id (a stamp from an
/// earlier run of the node is not this one's) and the instant its
/// microseconds count from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StampClock {
    boot: u64,
    epoch: Instant,
}

impl StampClock {
    pub(crate) fn new() -> Self {
        Self {
            // 0 means "no stamp yet" on the wire.
            boot: rand::random::<u64>().max(1),
            epoch: Instant::now(),
        }
    }

    /// A clock whose epoch is `back` ago (stamps can name moments since).
    #[cfg(test)]
    fn since(back: Duration) -> Self {
        Self {
            epoch: Instant::now().checked_sub(back).expect("uptime"),
            ..Self::new()
        }
    }

    pub(crate) fn stamp(&self, at: Instant) -> pb::Stamp {
        pb::Stamp {
            boot: self.boot,
            at_us: u64::try_from(at.saturating_duration_since(self.epoch).as_micros())
                .unwrap_or(u64::MAX),
        }
    }

    /// The instant a stamp names, if this process made it (same boot, not
    /// in the future).
    pub(crate) fn instant(&self, s: &pb::Stamp) -> Option<Instant> {
        if s.boot != self.boot {
            return None;
        }
        let at = self.epoch.checked_add(Duration::from_micros(s.at_us))?;
        (at <= Instant::now()).then_some(at)
    }
}

/// What dates a lease renewed by one AppendEntries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dating<'a> {
    /// The stamp the leader echoed, and how long before it received that
    /// stamp a majority had last accepted it (None: not known yet).
    Echo(&'a pb::Stamp, Option<Duration>),
    /// From a leader that predates echoes: when this node received the
    /// call, and the quorum age the leader sent (a late call makes this
    /// too late).
    Receipt(Instant, Option<Duration>),
}

/// When a lease renewed by one AppendEntries starts, if it does: the
/// echoed stamp less the quorum lag. The leader received the stamp at H
/// (after the stamp's moment; its `down_after` silence counts from H or
/// later) and a majority had accepted it at Q = H - lag (or later, lag 0),
/// so the start is no later than either.
pub(crate) fn start(clock: &StampClock, dating: Dating<'_>) -> Option<Instant> {
    match dating {
        Dating::Echo(s, lag) => clock.instant(s)?.checked_sub(lag?),
        Dating::Receipt(received, age) => received.checked_sub(age?),
    }
}

/// A follower's lease: from when, and the commit index it must have
/// applied to serve.
#[derive(Debug, Default)]
pub(crate) struct Lease(Option<(Instant, u64)>);

impl Lease {
    /// A renewal from `from`, by a leader that had committed `commit`.
    /// The lease runs from the latest start it was given, and the node
    /// must apply the highest commit it was told: while it catches up
    /// (after a cut, a freeze, or falling behind) its stages may have
    /// moved, and it learns so only by applying the log.
    pub(crate) fn renew(&mut self, span: Duration, from: Instant, commit: u64) {
        match &mut self.0 {
            Some((f, c)) if f.elapsed() <= span => {
                *f = (*f).max(from);
                *c = (*c).max(commit);
            }
            _ => self.0 = Some((from, commit)),
        }
    }

    /// Why the node must not serve now (None when it may), having applied
    /// the log to `applied`.
    pub(crate) fn fenced(&self, span: Duration, applied: u64) -> Option<String> {
        match self.0 {
            Some((from, _)) if from.elapsed() > span => Some(format!(
                "this node has not heard from a leader backed by a majority for {:.1} s (its serving lease is {:.1} s)",
                from.elapsed().as_secs_f64(),
                span.as_secs_f64()
            )),
            Some((_, commit)) if applied < commit => Some(format!(
                "this node has applied the control plane's log to {applied}, short of the leader's commit {commit}"
            )),
            Some(_) => None,
            None => Some("this node has not heard from a leader since it started".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPAN: Duration = Duration::from_secs(2);

    fn ago(d: Duration) -> Instant {
        Instant::now().checked_sub(d).expect("uptime")
    }

    #[test]
    fn a_late_message_echoing_an_old_stamp_gives_no_lease() {
        // The follower answered 10 s ago, then was cut off; the leader's
        // AppendEntries sent just after (quorum fresh) arrives only now.
        let clock = StampClock::since(Duration::from_secs(60));
        let old = clock.stamp(ago(Duration::from_secs(10)));
        let now = Instant::now();
        let from =
            start(&clock, Dating::Echo(&old, Some(Duration::from_millis(5)))).expect("a start");
        let mut lease = Lease::default();
        lease.renew(SPAN, from, 7);
        let why = lease.fenced(SPAN, 7).expect("fenced");
        assert!(why.contains("has not heard"), "{why}");
        // Dated by receipt instead (the old way), it would serve.
        let naive =
            start(&clock, Dating::Receipt(now, Some(Duration::from_millis(5)))).expect("a start");
        let mut lease = Lease::default();
        lease.renew(SPAN, naive, 7);
        assert_eq!(lease.fenced(SPAN, 7), None);
    }

    #[test]
    fn a_fresh_echo_less_the_quorum_lag_starts_the_lease() {
        let clock = StampClock::since(Duration::from_secs(60));
        let echo = clock.stamp(ago(Duration::from_millis(300)));
        let from = start(
            &clock,
            Dating::Echo(&echo, Some(Duration::from_millis(200))),
        )
        .expect("a start");
        let age = from.elapsed();
        assert!(age >= Duration::from_millis(500), "{age:?}");
        let mut lease = Lease::default();
        lease.renew(SPAN, from, 3);
        assert_eq!(lease.fenced(SPAN, 3), None);
    }

    #[test]
    fn stamps_of_another_run_or_from_the_future_are_refused() {
        let clock = StampClock::since(Duration::from_secs(60));
        let other = StampClock::since(Duration::from_secs(60));
        let theirs = other.stamp(Instant::now());
        assert_eq!(clock.instant(&theirs), None);
        let none_yet = pb::Stamp { boot: 0, at_us: 0 };
        assert_eq!(
            start(&clock, Dating::Echo(&none_yet, Some(Duration::ZERO))),
            None
        );
        // A stamp of this run, but no quorum known: no lease either.
        let known = clock.stamp(Instant::now());
        assert_eq!(start(&clock, Dating::Echo(&known, None)), None);
        let mut future = clock.stamp(Instant::now());
        future.at_us += 60_000_000;
        assert_eq!(clock.instant(&future), None);
        let mine = clock.stamp(ago(Duration::from_millis(1)));
        assert!(clock.instant(&mine).is_some());
    }

    #[test]
    fn a_running_lease_must_apply_the_newest_commit_it_hears_of() {
        // In touch all along, but behind: the leader's commit moved on
        // (a stage may have moved off this node) and the node has not
        // applied it yet, so it must not serve on the older commit.
        let mut lease = Lease::default();
        lease.renew(SPAN, Instant::now(), 10);
        assert_eq!(lease.fenced(SPAN, 10), None);
        lease.renew(SPAN, Instant::now(), 1_500);
        let why = lease.fenced(SPAN, 10).expect("fenced while behind");
        assert!(why.contains("short of the leader's commit 1500"), "{why}");
        assert_eq!(lease.fenced(SPAN, 1_500), None);
        // A renewal from a message with an older commit lowers nothing.
        lease.renew(SPAN, Instant::now(), 12);
        assert!(lease.fenced(SPAN, 1_499).is_some());
    }

    #[test]
    fn a_lease_that_ran_out_restarts_only_from_a_fresh_renewal() {
        let mut lease = Lease::default();
        assert!(lease.fenced(SPAN, 0).is_some());
        lease.renew(SPAN, ago(Duration::from_secs(5)), 4);
        assert!(lease.fenced(SPAN, 4).is_some());
        lease.renew(SPAN, ago(Duration::from_millis(100)), 9);
        assert!(lease.fenced(SPAN, 4).is_some(), "must apply the new commit");
        assert_eq!(lease.fenced(SPAN, 9), None);
    }
}
