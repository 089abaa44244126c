//! The peer filter: which peers may use health gossip and the stage
//! protocol (anyone may identify, ping and use the DHT). Until the control
//! plane feeds it the cluster's members, it admits the bootstrap peers — or
//! everyone, when the operator says so with `--open-mesh`. Never a silent
//! allow-all.

use std::collections::{HashMap, HashSet};

use libp2p::PeerId;

/// Who a member is, as the control plane records it: what its heartbeats
/// must say of themselves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub region: String,
}

#[derive(Debug, Clone, Default)]
pub struct PeerFilter {
    open: bool,
    /// Cluster members, as the control plane last said.
    members: HashMap<PeerId, Identity>,
    /// Peers named in, or answering at, a bootstrap address.
    bootstrap: HashSet<PeerId>,
}

impl PeerFilter {
    pub fn new(open: bool) -> Self {
        Self {
            open,
            ..Self::default()
        }
    }

    pub fn admits(&self, peer: &PeerId) -> bool {
        self.open || self.members.contains_key(peer) || self.bootstrap.contains(peer)
    }

    /// The member record of `peer`, when it is a member.
    pub fn identity(&self, peer: &PeerId) -> Option<&Identity> {
        self.members.get(peer)
    }

    pub fn add_bootstrap(&mut self, peer: PeerId) {
        self.bootstrap.insert(peer);
    }

    pub fn set_members(&mut self, members: HashMap<PeerId, Identity>) {
        self.members = members;
    }

    /// One line for the start log.
    pub fn describe(&self) -> &'static str {
        if self.open {
            "open mesh: every peer may gossip and use the stage protocol"
        } else {
            "bootstrap peers and cluster members only may gossip and use the stage protocol; others may identify, ping and use the DHT"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_by_default_open_on_request() {
        let (a, b, c) = (PeerId::random(), PeerId::random(), PeerId::random());
        let mut f = PeerFilter::new(false);
        assert!(!f.admits(&a));
        f.add_bootstrap(a);
        let id = Identity {
            name: "b".into(),
            region: "r".into(),
        };
        f.set_members(HashMap::from([(b, id.clone())]));
        assert!(f.admits(&a) && f.admits(&b) && !f.admits(&c));
        assert_eq!(f.identity(&b), Some(&id));
        assert_eq!(f.identity(&a), None, "a bootstrap peer has no record");
        f.set_members(HashMap::new());
        assert!(!f.admits(&b), "a removed member loses admission");
        assert!(PeerFilter::new(true).admits(&c));
    }
}
