//! The health heartbeat gossiped on `trine/health/1`: what a node says about
//! itself, and the strict checks a receiver applies before believing it.
//! Gossipsub signs every message with the author's key and checks the
//! signature ([`libp2p::gossipsub::ValidationMode::Strict`]); the rules here
//! bound the size, the rate and every field.

use std::time::Duration;

use prost::Message as _;
use trine_proto::v1::Heartbeat;

use super::filter::Identity;

pub const TOPIC: &str = "trine/health/1";
/// Largest heartbeat accepted; a real one is about 200 bytes.
pub const MAX_BYTES: usize = 2048;
/// Most stages one heartbeat may list.
pub const MAX_STAGES: usize = 64;
/// Longest "model/stage" entry.
pub const MAX_STAGE_LEN: usize = 160;
/// Heartbeats further than this from our clock are ignored as stale.
const MAX_CLOCK_SKEW: Duration = Duration::from_secs(600);

/// What to do with a received heartbeat.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Valid and new: deliver and forward.
    Accept(Heartbeat),
    /// Harmless but not useful (old, duplicate): drop without penalty.
    Ignore(&'static str),
    /// Broken or abusive: drop and score the forwarding peer down.
    Reject(&'static str),
}

/// What the receiver remembers of the author's last accepted heartbeat.
#[derive(Debug, Clone, Copy)]
pub struct Last {
    pub seq: u64,
    pub received_unix_ms: u64,
}

fn label_ok(s: &str, may_be_empty: bool) -> bool {
    (may_be_empty && s.is_empty())
        || ((1..=63).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'))
}

/// Judges `data` from an author whose previous heartbeat was `last`;
/// `signer` is the author's member record when it is a member (a heartbeat
/// must name that node and region: a member signs for itself only);
/// `interval` is the cluster's heartbeat interval, `now_ms` our clock.
pub fn judge(
    data: &[u8],
    signer: Option<&Identity>,
    last: Option<Last>,
    interval: Duration,
    now_ms: u64,
) -> Verdict {
    if data.len() > MAX_BYTES {
        return Verdict::Reject("oversized");
    }
    let Ok(hb) = Heartbeat::decode(data) else {
        return Verdict::Reject("malformed");
    };
    let fields_ok = label_ok(&hb.name, false)
        && label_ok(&hb.region, false)
        && label_ok(&hb.zone, true)
        && hb.seq > 0
        && hb.load.is_finite()
        && hb.load >= 0.0
        && hb.stages.len() <= MAX_STAGES
        && hb
            .stages
            .iter()
            .all(|s| !s.is_empty() && s.len() <= MAX_STAGE_LEN)
        && hb.backend.len() <= 64
        && hb.version.len() <= 64;
    if !fields_ok {
        return Verdict::Reject("field");
    }
    if signer.is_some_and(|me| me.name != hb.name || me.region != hb.region) {
        return Verdict::Reject("impersonation");
    }
    if hb.sent_unix_ms.abs_diff(now_ms) > MAX_CLOCK_SKEW.as_millis() as u64 {
        return Verdict::Ignore("clock");
    }
    if let Some(last) = last {
        if hb.seq <= last.seq {
            return Verdict::Ignore("stale");
        }
        // A sender may run a little fast; four times the rate is abuse.
        let min_gap = (interval / 4).as_millis() as u64;
        if now_ms.saturating_sub(last.received_unix_ms) < min_gap {
            return Verdict::Reject("rate");
        }
    }
    Verdict::Accept(hb)
}

pub fn encode(hb: &Heartbeat) -> Vec<u8> {
    hb.encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;
    const EVERY: Duration = Duration::from_secs(2);

    fn hb() -> Heartbeat {
        Heartbeat {
            seq: 5,
            name: "n1".into(),
            region: "us-east".into(),
            zone: "a".into(),
            sent_unix_ms: NOW,
            load: 0.5,
            queue_depth: 1,
            stages: vec!["m/0".into()],
            chain_height: 3,
            free_memory_bytes: 1 << 30,
            backend: "cpu-avx2".into(),
            version: "0.1.0".into(),
        }
    }

    #[test]
    fn a_good_heartbeat_is_accepted_once() {
        let data = encode(&hb());
        assert!(data.len() < 200);
        assert_eq!(judge(&data, None, None, EVERY, NOW), Verdict::Accept(hb()));
        let last = Some(Last {
            seq: 5,
            received_unix_ms: NOW - 2000,
        });
        assert_eq!(
            judge(&data, None, last, EVERY, NOW),
            Verdict::Ignore("stale")
        );
    }

    #[test]
    fn each_rule_is_enforced() {
        let big = Heartbeat {
            stages: vec!["x".repeat(100); 30],
            ..hb()
        };
        assert_eq!(
            judge(&encode(&big), None, None, EVERY, NOW),
            Verdict::Reject("oversized")
        );
        assert_eq!(
            judge(&[0xff; 16], None, None, EVERY, NOW),
            Verdict::Reject("malformed")
        );
        let cases = [
            Heartbeat {
                region: "US East".into(),
                ..hb()
            },
            Heartbeat {
                name: String::new(),
                ..hb()
            },
            Heartbeat { seq: 0, ..hb() },
            Heartbeat {
                load: f32::NAN,
                ..hb()
            },
            Heartbeat {
                stages: vec![String::new()],
                ..hb()
            },
        ];
        for c in cases {
            assert_eq!(
                judge(&encode(&c), None, None, EVERY, NOW),
                Verdict::Reject("field"),
                "{c:?}"
            );
        }
        let old = Heartbeat {
            sent_unix_ms: NOW - 3_600_000,
            ..hb()
        };
        assert_eq!(
            judge(&encode(&old), None, None, EVERY, NOW),
            Verdict::Ignore("clock")
        );
        let fast = Heartbeat { seq: 6, ..hb() };
        let last = Some(Last {
            seq: 5,
            received_unix_ms: NOW - 100,
        });
        assert_eq!(
            judge(&encode(&fast), None, last, EVERY, NOW),
            Verdict::Reject("rate")
        );
    }

    #[test]
    fn a_member_signs_for_itself_only() {
        let me = Identity {
            name: "n1".into(),
            region: "us-east".into(),
        };
        let data = encode(&hb());
        assert_eq!(
            judge(&data, Some(&me), None, EVERY, NOW),
            Verdict::Accept(hb())
        );
        for other in [
            Identity {
                name: "n2".into(),
                ..me.clone()
            },
            Identity {
                region: "eu-central".into(),
                ..me.clone()
            },
        ] {
            assert_eq!(
                judge(&data, Some(&other), None, EVERY, NOW),
                Verdict::Reject("impersonation"),
                "{other:?}"
            );
        }
        // Checked before the rate: a forgery is a forgery however paced.
        let last = Some(Last {
            seq: 4,
            received_unix_ms: NOW - 1,
        });
        let other = Identity {
            name: "n2".into(),
            ..me
        };
        assert_eq!(
            judge(&data, Some(&other), last, EVERY, NOW),
            Verdict::Reject("impersonation")
        );
    }
}
