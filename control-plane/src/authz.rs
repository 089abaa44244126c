//! Who may write what: bearer tokens checked against the cluster's token
//! table (the client API, the Admin API and the leader share the rules),
//! and what a member may commit through the leader.
//!
//! Members forward two kinds of writes to the leader: their own (their
//! registration, a drain of themselves, reports on their own stages,
//! receipts for what they served, notes, a new cluster's first admin
//! token) and their clients' (an admin's deploy, token or drain). A
//! member's certificate proves only the first kind. A client's write
//! travels with the client's bearer secret, and the leader checks that
//! secret against its own token table before it commits: a stolen node key
//! cannot mint an admin token, undeploy a model or drain another node.
//! Commands of the leader's own planner (placements, node status, removal)
//! are never taken from another node.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::command::{Command, NodeStatus, Scope, State, TokenRecord};
use crate::types::{Member, NodeId, Request, Secret};

/// Longest secret accepted from a file, a header or a forwarded write.
pub const MAX_SECRET_BYTES: usize = 512;

/// Hex SHA-256 of a bearer secret: what the token table stores.
pub fn secret_hash(secret: &str) -> String {
    crate::chain::hex(&Sha256::digest(secret.as_bytes()))
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Unknown,
    Expired { name: String, at_ms: u64 },
    Scope { name: String, have: Scope },
}

impl Refusal {
    /// The `reason` label of `trine_auth_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Unknown => "unknown",
            Self::Expired { .. } => "expired",
            Self::Scope { .. } => "scope",
        }
    }

    /// What the caller is told: the problem and the fix.
    pub fn message(&self, need: Scope) -> String {
        match (self, need) {
            (Self::Missing, Scope::Admin) => "the Admin API needs an admin token: pass --admin-token-file <file> or set TRINE_ADMIN_TOKEN (the cluster's first one is in the --init node's data dir, admin.token); gRPC clients send `authorization: Bearer <secret>`".into(),
            (Self::Missing, Scope::Inference) => "no API token: send `Authorization: Bearer <token>` (`trine token create` makes one)".into(),
            (Self::Unknown, _) => "the token is unknown or revoked; `trine token list` shows the valid ones".into(),
            (Self::Expired { name, at_ms }, _) => format!(
                "token {name} expired at {}; create a new one with `trine token create`",
                humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(*at_ms))
            ),
            (Self::Scope { name, have }, need) => format!(
                "token {name} has scope {} and this needs {}; use an admin token (`trine token create --scope admin <name>`)",
                have.as_str(),
                need.as_str()
            ),
        }
    }

    /// The gRPC status: UNAUTHENTICATED, or PERMISSION_DENIED for a valid
    /// token of the wrong scope.
    pub fn status(&self, need: Scope) -> tonic::Status {
        match self {
            Self::Scope { .. } => tonic::Status::permission_denied(self.message(need)),
            _ => tonic::Status::unauthenticated(self.message(need)),
        }
    }
}

/// The token whose secret is `secret`, if it may do what `need` allows at
/// `now_ms`.
pub fn check(
    state: &State,
    secret: Option<&str>,
    need: Scope,
    now_ms: u64,
) -> Result<TokenRecord, Refusal> {
    let secret = secret.ok_or(Refusal::Missing)?;
    if secret.len() > MAX_SECRET_BYTES {
        return Err(Refusal::Unknown);
    }
    let t = state
        .token_by_hash(&secret_hash(secret))
        .ok_or(Refusal::Unknown)?;
    if t.expires_ms != 0 && now_ms >= t.expires_ms {
        return Err(Refusal::Expired {
            name: t.name.clone(),
            at_ms: t.expires_ms,
        });
    }
    if !t.scope.allows(need) {
        return Err(Refusal::Scope {
            name: t.name.clone(),
            have: t.scope,
        });
    }
    Ok(t.clone())
}

/// The principal a write made with an admin token is recorded under.
pub fn token_principal(name: &str) -> String {
    format!("token:{name}")
}

/// The principal a node's own writes are recorded under.
pub fn node_principal(name: &str) -> String {
    format!("node:{name}")
}

/// Why the leader refused a write (or a drain) a member sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forbidden {
    /// The `reason` label of `trine_raft_refused_total`: `identity` (the
    /// certificate does not name the member the write is from), `token`
    /// (a client's write without a valid admin token) or `command` (a
    /// command this principal may not send).
    pub reason: &'static str,
    pub message: String,
}

impl Forbidden {
    fn new(reason: &'static str, message: String) -> Self {
        Self { reason, message }
    }
}

/// The member a certificate with these names belongs to.
fn caller<'m>(
    state: &State,
    members: &'m BTreeMap<NodeId, Member>,
    names: &[String],
) -> Result<(NodeId, &'m Member), Forbidden> {
    if let Some(found) = members
        .iter()
        .find(|(_, m)| crate::tls::certifies(names, &m.name))
    {
        return Ok((*found.0, found.1));
    }
    // A node the cluster knows that is out of the Raft group just now
    // (drained, or restarted and not yet joined again) is no stranger:
    // its own writes wait until it is a member again.
    let message = match state
        .nodes
        .values()
        .find(|n| crate::tls::certifies(names, &n.name))
    {
        Some(n) => format!(
            "node {} is not a member of the control plane just now (drained, or not yet joined again), so the leader takes no write in its name; it writes again once it has rejoined (`trine status` on it shows when), and its clients' writes go through with their admin token meanwhile",
            n.name
        ),
        None => format!(
            "a write from a certificate that names [{}], which is no member; members write with their own certificate (`trine certs issue --name <node>`) and clients through the Admin API",
            names.join(", ")
        ),
    };
    Err(Forbidden::new("identity", message))
}

/// Whether a member (certificate `names`) may have the leader commit
/// `req`, which it asked for with `secret` (a client's write) or in its
/// own name.
pub fn check_forwarded(
    state: &State,
    members: &BTreeMap<NodeId, Member>,
    names: &[String],
    req: &Request,
    secret: Option<&Secret>,
    now_ms: u64,
) -> Result<(), Forbidden> {
    let principal = req.principal.as_str();
    if let Some(token) = principal.strip_prefix("token:") {
        // The token is the authority, as on the Admin API: a node of this
        // cluster that is no member just now (drained, and rejoining)
        // forwards its clients' writes too.
        let Some(secret) = secret else {
            return Err(Forbidden::new(
                "token",
                format!(
                    "{principal}'s write ({}) came from a node ([{}]) without the token it was asked with: a node's certificate does not let it write as a client",
                    req.command.kind(),
                    names.join(", ")
                ),
            ));
        };
        return match check(state, Some(secret.expose()), Scope::Admin, now_ms) {
            Ok(t) if t.name == token => Ok(()),
            Ok(t) => Err(Forbidden::new(
                "token",
                format!(
                    "the token sent with {principal}'s write is token {}'s",
                    t.name
                ),
            )),
            Err(r) => Err(Forbidden::new(
                "token",
                format!(
                    "the token sent with {principal}'s write is refused: {}",
                    r.message(Scope::Admin)
                ),
            )),
        };
    }
    let (from, sender) = caller(state, members, names)?;
    if secret.is_some() {
        return Err(Forbidden::new(
            "command",
            format!("a token came with {principal}'s write; only token:<name> writes carry one"),
        ));
    }
    if let Some(node) = principal.strip_prefix("node:") {
        // A node's principal names it; older writes named its id.
        let named = node
            .parse::<NodeId>()
            .ok()
            .filter(|id| members.contains_key(id));
        let claimed = named.or_else(|| {
            members
                .iter()
                .find(|(_, m)| m.name.eq_ignore_ascii_case(node))
                .map(|(id, _)| *id)
        });
        if claimed != Some(from) {
            return Err(Forbidden::new(
                "identity",
                format!(
                    "node {} sent a write as {principal}: a node writes only in its own name",
                    sender.name
                ),
            ));
        }
        return if own_write(state, from, &sender.name, &req.command) {
            Ok(())
        } else {
            Err(Forbidden::new(
                "command",
                format!(
                    "node {} may commit only its own registration, drain and stage reports, receipts, notes and a new cluster's first admin token, not {}; a client's write goes with its admin token",
                    sender.name,
                    req.command.summary()
                ),
            ))
        };
    }
    Err(Forbidden::new(
        "command",
        match principal {
            "system" | "planner" => format!(
                "node {} sent a write as {principal}: the leader's planner commits its own commands and takes none from another node",
                sender.name
            ),
            _ => format!(
                "node {} sent a write as {principal:?}: a forwarded write is a node's own (node:<its name>) or a client's (token:<name>, with its token)",
                sender.name
            ),
        },
    ))
}

/// The commands a node may commit in its own name.
fn own_write(state: &State, id: NodeId, name: &str, command: &Command) -> bool {
    match command {
        Command::RegisterNode(r) => r.id == id && r.name.eq_ignore_ascii_case(name),
        Command::SetNodeStatus { id: of, status } => *of == id && *status == NodeStatus::Draining,
        Command::StageReport { node, .. } => *node == id,
        // The chain records which node sent them.
        Command::Receipts { .. } | Command::Note { .. } => true,
        // The `--init` node's first admin token, when its node is no
        // longer the leader: only while the cluster never had an admin
        // token (the state machine's own rule, no live admin token, would
        // let a node key re-bootstrap a cluster whose admin tokens all
        // expired).
        Command::BootstrapToken(_) => !state.tokens.values().any(|t| t.scope == Scope::Admin),
        _ => false,
    }
}

/// Whether a node (certificate `names`) may remove `node` from the
/// cluster: a member itself, or any node sending an admin's token.
pub fn check_leave(
    state: &State,
    members: &BTreeMap<NodeId, Member>,
    names: &[String],
    node: NodeId,
    secret: Option<&Secret>,
    now_ms: u64,
) -> Result<(), Forbidden> {
    if let Some(secret) = secret {
        return check(state, Some(secret.expose()), Scope::Admin, now_ms)
            .map(|_| ())
            .map_err(|r| {
                Forbidden::new(
                    "token",
                    format!(
                        "the token sent with a request to remove node {node} is refused: {}",
                        r.message(Scope::Admin)
                    ),
                )
            });
    }
    let (from, sender) = caller(state, members, names)?;
    if from == node {
        return Ok(());
    }
    Err(Forbidden::new(
        "token",
        format!(
            "node {} asked to remove node {node} without an admin's token: a node removes only itself; remove others with `trine node leave --node-id <id>` and an admin token",
            sender.name
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Receipt, StageState};

    fn state_with(t: TokenRecord) -> State {
        let mut s = State::default();
        s.apply(&Command::AddToken(Box::new(t)), 1).expect("add");
        s
    }

    fn record(name: &str, secret: &str, scope: Scope, expires_ms: u64) -> TokenRecord {
        TokenRecord {
            expires_ms,
            ..TokenRecord::new(name, secret_hash(secret), scope)
        }
    }

    #[test]
    fn each_bad_token_gets_its_own_refusal() {
        let s = state_with(record("t", "trn_a", Scope::Inference, 100));
        let c = |secret, need, now| check(&s, secret, need, now).map(|t| t.name);
        assert_eq!(c(Some("trn_a"), Scope::Inference, 99), Ok("t".into()));
        assert_eq!(c(None, Scope::Inference, 0), Err(Refusal::Missing));
        assert_eq!(c(Some("trn_b"), Scope::Inference, 0), Err(Refusal::Unknown));
        assert!(matches!(
            c(Some("trn_a"), Scope::Inference, 100),
            Err(Refusal::Expired { at_ms: 100, .. })
        ));
        let scope = c(Some("trn_a"), Scope::Admin, 0).expect_err("scope");
        assert_eq!(
            scope.status(Scope::Admin).code(),
            tonic::Code::PermissionDenied
        );
        assert_eq!(
            Refusal::Unknown.status(Scope::Admin).code(),
            tonic::Code::Unauthenticated
        );
        let s = state_with(record("t", "trn_r", Scope::Admin, 0));
        assert!(check(&s, Some("trn_r"), Scope::Admin, u64::MAX - 1).is_ok());
        let long = "x".repeat(MAX_SECRET_BYTES + 1);
        assert_eq!(
            check(&s, Some(&long), Scope::Inference, 0).map(|t| t.name),
            Err(Refusal::Unknown)
        );
    }

    fn members() -> BTreeMap<NodeId, Member> {
        [(1, "a"), (2, "b")]
            .into_iter()
            .map(|(id, name)| {
                (
                    id,
                    Member {
                        addr: format!("127.0.0.1:{id}"),
                        region: "r".into(),
                        name: name.into(),
                    },
                )
            })
            .collect()
    }

    fn req(principal: &str, command: Command) -> Request {
        Request::now(principal, command)
    }

    fn note() -> Command {
        Command::Note { text: "x".into() }
    }

    fn add_token(name: &str) -> Command {
        Command::AddToken(Box::new(record(name, "new", Scope::Admin, 0)))
    }

    #[test]
    fn a_node_certificate_writes_only_its_own_commands() {
        let s = state_with(record("root", "trn_root", Scope::Admin, 0));
        let m = members();
        let b = ["b".to_string()];
        let ok = |r: &Request| check_forwarded(&s, &m, &b, r, None, 0);
        let reason = |r: &Request| ok(r).map_err(|f| f.reason);
        // Its own writes, by name or (older writes) by id.
        assert_eq!(ok(&req("node:b", note())), Ok(()));
        assert_eq!(ok(&req("node:2", note())), Ok(()));
        assert_eq!(ok(&req("node:B", note())), Ok(()));
        let receipts = Command::Receipts {
            receipts: Vec::<Receipt>::new(),
        };
        assert_eq!(ok(&req("node:b", receipts)), Ok(()));
        let report = |node| Command::StageReport {
            model: "m".into(),
            replica: 0,
            stage: 0,
            node,
            generation: 1,
            state: StageState::Ready,
            detail: String::new(),
        };
        assert_eq!(ok(&req("node:b", report(2))), Ok(()));
        let drain = |id| Command::SetNodeStatus {
            id,
            status: NodeStatus::Draining,
        };
        assert_eq!(ok(&req("node:b", drain(2))), Ok(()));
        let register = |id, name: &str| {
            Command::RegisterNode(Box::new(crate::local::record(id, name, "r", "")))
        };
        assert_eq!(ok(&req("node:b", register(2, "b"))), Ok(()));
        // A first admin token only in a cluster that never had one.
        let bootstrap = Command::BootstrapToken(Box::new(record("root2", "s", Scope::Admin, 0)));
        assert_eq!(reason(&req("node:b", bootstrap.clone())), Err("command"));
        let fresh = State::default();
        let r = req("node:b", bootstrap);
        assert_eq!(check_forwarded(&fresh, &m, &b, &r, None, 0), Ok(()));
        // Another node's name, another node's stage, status or record.
        assert_eq!(reason(&req("node:a", note())), Err("identity"));
        assert_eq!(reason(&req("node:1", note())), Err("identity"));
        assert_eq!(reason(&req("node:zz", note())), Err("identity"));
        assert_eq!(reason(&req("node:b", report(1))), Err("command"));
        assert_eq!(reason(&req("node:b", drain(1))), Err("command"));
        assert_eq!(reason(&req("node:b", register(1, "a"))), Err("command"));
        let up = Command::SetNodeStatus {
            id: 2,
            status: NodeStatus::Up,
        };
        assert_eq!(reason(&req("node:b", up)), Err("command"));
        // Admin commands in its own name, the planner's, or anyone's else.
        assert_eq!(reason(&req("node:b", add_token("x"))), Err("command"));
        let undeploy = Command::UndeployModel { name: "m".into() };
        assert_eq!(reason(&req("node:b", undeploy)), Err("command"));
        assert_eq!(reason(&req("planner", report(2))), Err("command"));
        assert_eq!(reason(&req("system", note())), Err("command"));
        assert_eq!(reason(&req("bench", note())), Err("command"));
        // A certificate no member holds writes nothing, its own notes
        // included.
        let mallory = ["mallory".to_string()];
        let f = check_forwarded(&s, &m, &mallory, &req("node:mallory", note()), None, 0);
        assert_eq!(f.map_err(|f| f.reason), Err("identity"));
    }

    #[test]
    fn a_clients_write_needs_its_own_live_admin_token() {
        let mut s = state_with(record("root", "trn_root", Scope::Admin, 0));
        s.apply(
            &Command::AddToken(Box::new(record("inf", "trn_inf", Scope::Inference, 0))),
            2,
        )
        .expect("add");
        s.apply(
            &Command::AddToken(Box::new(record("old", "trn_old", Scope::Admin, 50))),
            3,
        )
        .expect("add");
        let m = members();
        let b = ["b".to_string()];
        let secret = |s: &str| Some(Secret::new(s));
        let check = |p: &str, with: Option<Secret>| {
            check_forwarded(&s, &m, &b, &req(p, add_token("x")), with.as_ref(), 100)
                .map_err(|f| f.reason)
        };
        assert_eq!(check("token:root", secret("trn_root")), Ok(()));
        // No token, someone else's, an unknown one, an inference one, an
        // expired one.
        assert_eq!(check("token:root", None), Err("token"));
        assert_eq!(check("token:inf", secret("trn_root")), Err("token"));
        assert_eq!(check("token:root", secret("trn_guess")), Err("token"));
        assert_eq!(check("token:inf", secret("trn_inf")), Err("token"));
        assert_eq!(check("token:old", secret("trn_old")), Err("token"));
        // A node of the cluster that is no member just now (drained,
        // rejoining) forwards an admin's write with the admin's token, and
        // nothing without it.
        let c = ["c".to_string()];
        let with = |sec: Option<Secret>| {
            check_forwarded(
                &s,
                &m,
                &c,
                &req("token:root", add_token("x")),
                sec.as_ref(),
                100,
            )
            .map_err(|f| f.reason)
        };
        assert_eq!(with(secret("trn_root")), Ok(()));
        assert_eq!(with(None), Err("token"));
        let own = check_forwarded(&s, &m, &c, &req("node:c", note()), None, 100);
        let f = own.expect_err("a non-member's own write");
        assert_eq!(f.reason, "identity");
        assert!(f.message.contains("certs issue"), "{f:?}");
        // A node the state knows (drained, rejoining) is told to wait for
        // its rejoin, not to get a certificate.
        let mut known = s.clone();
        known
            .nodes
            .insert(3, crate::local::record(3, "c", "r", "127.0.0.1:3"));
        let f = check_forwarded(&known, &m, &c, &req("node:c", note()), None, 100)
            .expect_err("a drained node's own write");
        assert_eq!(f.reason, "identity");
        assert!(f.message.contains("node c is not a member"), "{f:?}");
        assert!(!f.message.contains("certs issue"), "{f:?}");
        // A token does not lend its rights to a node's own principal.
        assert_eq!(check("node:b", secret("trn_root")), Err("command"));
        // The secret appears in no message.
        let f = check_forwarded(
            &s,
            &m,
            &b,
            &req("token:inf", add_token("x")),
            secret("trn_root").as_ref(),
            100,
        )
        .expect_err("refused");
        assert!(!f.message.contains("trn_root"), "{f:?}");
        assert!(!format!("{:?}", Secret::new("trn_root")).contains("trn_root"));
    }

    #[test]
    fn a_node_removes_only_itself_unless_an_admin_asks() {
        let s = state_with(record("root", "trn_root", Scope::Admin, 0));
        let m = members();
        let b = ["b".to_string()];
        let leave = |node, secret: Option<Secret>| {
            check_leave(&s, &m, &b, node, secret.as_ref(), 0).map_err(|f| f.reason)
        };
        assert_eq!(leave(2, None), Ok(()));
        assert_eq!(leave(1, None), Err("token"));
        assert_eq!(leave(1, Some(Secret::new("trn_guess"))), Err("token"));
        assert_eq!(leave(1, Some(Secret::new("trn_root"))), Ok(()));
        // A node of the cluster that is no member just now (drained,
        // rejoining): only with an admin's token.
        let rejoining = ["c".to_string()];
        let f = check_leave(&s, &m, &rejoining, 1, None, 0);
        assert_eq!(f.map_err(|f| f.reason), Err("identity"));
        let f = check_leave(&s, &m, &rejoining, 1, Some(&Secret::new("trn_root")), 0);
        assert_eq!(f, Ok(()));
    }
}
