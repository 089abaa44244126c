//! What this node knows of its peers: a pure table fed by mesh events
//! (connections, identify, ping, heartbeats) and aged by [`Table::expire`].
//!
//! A peer is known while it is connected or has been heard from (directly
//! or through a relayed heartbeat) within the table's TTL.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime};

use libp2p::{Multiaddr, PeerId};
use trine_proto::v1::Heartbeat;

use super::health::Last;

/// Most addresses remembered per peer.
const MAX_ADDRS: usize = 8;

/// The identify agent of a node: `trine/<version> region=<r> zone=<z> name=<n>`.
pub fn agent(version: &str, name: &str, region: &str, zone: &str) -> String {
    format!("trine/{version} region={region} zone={zone} name={name}")
}

/// Region, zone and name from a trine agent string; `None` for other agents
/// or values that are not DNS labels.
pub fn parse_agent(agent: &str) -> Option<(String, String, String)> {
    let mut words = agent.split_ascii_whitespace();
    words.next()?.strip_prefix("trine/")?;
    let (mut region, mut zone, mut name) = (None, String::new(), None);
    for word in words {
        let (k, v) = word.split_once('=')?;
        let ok = v.len() <= 63
            && v.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return None;
        }
        match k {
            "region" if !v.is_empty() => region = Some(v.to_owned()),
            "zone" => zone = v.to_owned(),
            "name" if !v.is_empty() => name = Some(v.to_owned()),
            _ => {}
        }
    }
    Some((region?, zone, name?))
}

/// One peer, as this node sees it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    pub region: Option<String>,
    pub zone: String,
    pub addrs: Vec<Multiaddr>,
    pub connections: u32,
    pub rtt: Option<Duration>,
    pub agent: String,
    pub admitted: bool,
    pub heartbeat: Option<Heartbeat>,
    pub last_heartbeat: Option<Last>,
    pub last_seen: Instant,
    pub last_seen_wall: SystemTime,
}

impl Peer {
    fn new(now: Instant) -> Self {
        Self {
            name: String::new(),
            region: None,
            zone: String::new(),
            addrs: Vec::new(),
            connections: 0,
            rtt: None,
            agent: String::new(),
            admitted: false,
            heartbeat: None,
            last_heartbeat: None,
            last_seen: now,
            last_seen_wall: SystemTime::now(),
        }
    }

    fn seen(&mut self, now: Instant) {
        self.last_seen = now;
        self.last_seen_wall = SystemTime::now();
    }

    fn add_addr(&mut self, addr: Multiaddr) {
        if !self.addrs.contains(&addr) {
            if self.addrs.len() == MAX_ADDRS {
                self.addrs.remove(0);
            }
            self.addrs.push(addr);
        }
    }
}

/// Every known peer.
#[derive(Debug)]
pub struct Table {
    peers: HashMap<PeerId, Peer>,
    ttl: Duration,
}

impl Table {
    pub fn new(ttl: Duration) -> Self {
        Self {
            peers: HashMap::new(),
            ttl,
        }
    }

    fn entry(&mut self, peer: PeerId, now: Instant) -> &mut Peer {
        let p = self.peers.entry(peer).or_insert_with(|| Peer::new(now));
        p.seen(now);
        p
    }

    pub fn get(&self, peer: &PeerId) -> Option<&Peer> {
        self.peers.get(peer)
    }

    pub fn connected(&mut self, peer: PeerId, addr: Multiaddr, admitted: bool, now: Instant) {
        let p = self.entry(peer, now);
        p.connections += 1;
        p.admitted = admitted;
        p.add_addr(addr);
    }

    pub fn disconnected(&mut self, peer: PeerId, remaining: u32, now: Instant) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.connections = remaining;
            p.seen(now);
        }
    }

    pub fn identified(&mut self, peer: PeerId, agent: &str, addrs: Vec<Multiaddr>, now: Instant) {
        let p = self.entry(peer, now);
        p.agent = agent.chars().take(128).collect();
        if let Some((region, zone, name)) = parse_agent(agent) {
            p.region = Some(region);
            p.zone = zone;
            p.name = name;
        }
        for a in addrs.into_iter().take(MAX_ADDRS) {
            p.add_addr(a);
        }
    }

    pub fn rtt(&mut self, peer: PeerId, rtt: Duration, now: Instant) {
        self.entry(peer, now).rtt = Some(rtt);
    }

    pub fn last_heartbeat(&self, peer: &PeerId) -> Option<Last> {
        self.peers.get(peer).and_then(|p| p.last_heartbeat)
    }

    /// Records an accepted heartbeat from `author`. The heartbeat's region
    /// and name fill in for a peer we have not identified directly.
    pub fn heartbeat(&mut self, author: PeerId, hb: Heartbeat, now_ms: u64, now: Instant) {
        let p = self.entry(author, now);
        if p.agent.is_empty() {
            p.region = Some(hb.region.clone());
            p.zone.clone_from(&hb.zone);
            p.name.clone_from(&hb.name);
        }
        p.last_heartbeat = Some(Last {
            seq: hb.seq,
            received_unix_ms: now_ms,
        });
        p.heartbeat = Some(hb);
    }

    pub fn set_admitted(&mut self, peer: &PeerId, admitted: bool) {
        if let Some(p) = self.peers.get_mut(peer) {
            p.admitted = admitted;
        }
    }

    /// Forgets peers neither connected nor heard from within the TTL.
    pub fn expire(&mut self, now: Instant) -> Vec<PeerId> {
        let ttl = self.ttl;
        let gone: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| p.connections == 0 && now.duration_since(p.last_seen) > ttl)
            .map(|(id, _)| *id)
            .collect();
        for id in &gone {
            self.peers.remove(id);
        }
        gone
    }

    /// Known peers per region ("unknown" for peers that never said).
    pub fn per_region(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for p in self.peers.values() {
            let r = p.region.clone().unwrap_or_else(|| "unknown".into());
            *m.entry(r).or_default() += 1;
        }
        m
    }

    pub fn iter(&self) -> impl Iterator<Item = (&PeerId, &Peer)> {
        self.peers.iter()
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_round_trips_and_rejects_others() {
        let a = agent("0.1.0", "n1", "us-east", "a");
        assert_eq!(
            parse_agent(&a),
            Some(("us-east".into(), "a".into(), "n1".into()))
        );
        assert_eq!(parse_agent("rust-libp2p/0.47"), None);
        assert_eq!(parse_agent("trine/0.1.0 region=US name=x"), None);
        assert_eq!(parse_agent("trine/0.1.0 name=x"), None);
    }

    #[test]
    fn peers_expire_only_when_disconnected_and_silent() {
        let t0 = Instant::now();
        let mut t = Table::new(Duration::from_secs(10));
        let a = PeerId::random();
        let b = PeerId::random();
        t.connected(a, "/ip4/127.0.0.1/tcp/1".parse().unwrap(), true, t0);
        t.identified(a, &agent("0.1.0", "na", "eu-central", ""), vec![], t0);
        let hb = Heartbeat {
            seq: 1,
            name: "nb".into(),
            region: "us-west".into(),
            ..Heartbeat::default()
        };
        t.heartbeat(b, hb, 0, t0);
        assert_eq!(t.per_region().get("eu-central"), Some(&1));
        assert_eq!(t.per_region().get("us-west"), Some(&1));
        let later = t0 + Duration::from_secs(11);
        // a is still connected; b is silent past the TTL.
        assert_eq!(t.expire(later), vec![b]);
        t.disconnected(a, 0, later);
        assert!(t.expire(later + Duration::from_secs(5)).is_empty());
        assert_eq!(t.expire(later + Duration::from_secs(11)), vec![a]);
        assert!(t.is_empty());
    }
}
