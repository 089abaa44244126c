//! The commands the state machine applies. Each is one transaction of a
//! chain block; its canonical encoding (JSON of the whole [`Request`], field
//! order fixed by the types) is what the block hash covers.
//!
//! [`Request`]: crate::Request

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::types::NodeId;

/// Whether a node serves. Committed by the leader's failure detector, or by
/// the node itself when it drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Up,
    Down,
    Draining,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Down => "down",
            Self::Draining => "draining",
        }
    }
}

/// A cluster member as the state machine records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub name: String,
    pub region: String,
    pub zone: String,
    /// Mutual-TLS Raft endpoint, host:port.
    pub raft_addr: String,
    /// Client gRPC and HTTP endpoints, host:port.
    pub grpc_addr: String,
    pub http_addr: String,
    /// The client endpoints speak TLS only, with a certificate naming the
    /// node (absent from records written before it existed: false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub api_tls: bool,
    /// libp2p identity and addresses.
    pub peer_id: String,
    pub p2p_addrs: Vec<String>,
    pub cpu_cores: u32,
    pub simd: String,
    pub memory_bytes: u64,
    pub version: String,
    pub status: NodeStatus,
    /// When the status last changed (block time, ms since the epoch).
    pub status_since_ms: u64,
}

/// A deployed model: what the planner places and the nodes load. Its
/// identity is the file's sha256; the name is what clients ask for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRecord {
    pub name: String,
    /// Where nodes find it: a path on the nodes or a hub repository.
    pub source: String,
    /// Hex SHA-256 of the model file.
    pub sha256: String,
    /// Transformer blocks.
    pub layers: u32,
    /// Weight bytes of one block (what a stage needs per layer it holds).
    pub bytes_per_layer: u64,
    /// Bytes outside the blocks (embeddings, final norm, lm_head).
    pub fixed_bytes: u64,
    /// Pipeline stages per replica (1 = whole model on one node).
    pub stages: u32,
    pub replicas: u32,
    /// Regions allowed to hold replicas; empty means any.
    pub regions: Vec<String>,
    /// Block time of the deployment (set by the state machine).
    #[serde(default)]
    pub deployed_ms: u64,
}

/// The most stages or replicas one model may ask for.
pub const MAX_STAGES: u32 = 64;
pub const MAX_REPLICAS: u32 = 64;

/// Where one stage of one replica runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub model: String,
    pub replica: u32,
    pub stage: u32,
    /// Half-open layer range.
    pub layer_start: u32,
    pub layer_end: u32,
    pub node: NodeId,
    /// Fencing token: unique and increasing across every placement the
    /// cluster ever commits, so a node holding an older one knows it is
    /// stale.
    pub generation: u64,
    pub since_ms: u64,
    /// What the node last reported for this generation.
    #[serde(default)]
    pub state: StageState,
    /// The node's words with that report (why it failed, load time…).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// Nodes where this slot failed to load since it was last ready
    /// (oldest first, at most [`MAX_FAILED_ON`]): the planner moves a
    /// failed slot away from them while another node can take it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_on: Vec<NodeId>,
}

/// How many failed nodes a placement remembers.
pub const MAX_FAILED_ON: usize = 16;

/// Where a placed stage is on its node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    /// Placed; the node has not reported yet.
    #[default]
    Assigned,
    Loading,
    Ready,
    Failed,
}

impl StageState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Assigned => "assigned",
            Self::Loading => "loading",
            Self::Ready => "ready",
            Self::Failed => "failed",
        }
    }
}

/// The most bytes of a stage report's detail.
pub const MAX_DETAIL: usize = 1024;

/// The key of a placement slot.
pub type SlotKey = (String, u32, u32);

/// An API token, by the SHA-256 of its secret. The secret itself is never
/// stored: the node a client calls checks it, and so does the leader when
/// that node forwards the client's write (see [`crate::authz`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub name: String,
    /// Hex SHA-256 of the bearer secret.
    pub sha256: String,
    /// Requests per minute; 0 means no limit.
    pub requests_per_minute: u32,
    /// Generated tokens per minute; 0 means no limit.
    pub tokens_per_minute: u32,
    /// Requests running at once; 0 means no limit.
    #[serde(default)]
    pub concurrency: u32,
    #[serde(default)]
    pub created_ms: u64,
    /// What the token may do. Absent on records written before scopes
    /// existed, which were inference tokens.
    #[serde(default, skip_serializing_if = "Scope::is_inference")]
    pub scope: Scope,
    /// Unix ms after which the token is refused; 0 means it never expires.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub expires_ms: u64,
}

impl TokenRecord {
    /// A token without limits or expiry.
    pub fn new(name: impl Into<String>, sha256: impl Into<String>, scope: Scope) -> Self {
        Self {
            name: name.into(),
            sha256: sha256.into(),
            requests_per_minute: 0,
            tokens_per_minute: 0,
            concurrency: 0,
            created_ms: 0,
            scope,
            expires_ms: 0,
        }
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// What a token may do: call the client API (`inference`), or everything,
/// the Admin API included (`admin`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Inference,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inference => "inference",
            Self::Admin => "admin",
        }
    }

    fn is_inference(&self) -> bool {
        *self == Self::Inference
    }

    /// Whether a token of this scope may do what `needed` allows.
    pub fn allows(self, needed: Scope) -> bool {
        self == Self::Admin || needed == Self::Inference
    }
}

impl Scope {
    /// A scope from the wire (`trine.v1.TokenScope`): unspecified means
    /// inference; `None` for a value this version does not know.
    pub fn from_wire(v: i32) -> Option<Self> {
        use trine_proto::v1::TokenScope as W;
        match W::try_from(v).ok()? {
            W::Unspecified | W::Inference => Some(Self::Inference),
            W::Admin => Some(Self::Admin),
        }
    }
}

impl From<Scope> for trine_proto::v1::TokenScope {
    fn from(s: Scope) -> Self {
        match s {
            Scope::Inference => Self::Inference,
            Scope::Admin => Self::Admin,
        }
    }
}

impl std::str::FromStr for Scope {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "inference" => Ok(Self::Inference),
            "admin" => Ok(Self::Admin),
            other => Err(format!(
                "unknown token scope {other:?}: use inference (client API) or admin (everything)"
            )),
        }
    }
}

/// What a finished inference request leaves on the chain: who asked, which
/// model (by its digest), fingerprints of the input and the output (never
/// the text), token counts, the nodes that served it and how long it took.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub request_id: String,
    /// The API token's name, or "anonymous".
    pub principal: String,
    pub model: String,
    pub model_sha256: String,
    /// SHA-256 of the input as sent: the prompt's UTF-8, the chat as JSON
    /// `[{"role","content"}…]`, or the token ids as little-endian u32s.
    pub prompt_sha256: String,
    /// SHA-256 of the generated text (UTF-8).
    pub output_sha256: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    /// stop, length or stop_sequence.
    pub finish: String,
    /// The node the client asked, then the nodes that generated (a failed
    /// one first, when the request failed over).
    pub entry: NodeId,
    pub path: Vec<NodeId>,
    pub failovers: u32,
    pub latency_ms: u64,
}

/// Most receipts in one `Receipts` command.
pub const MAX_RECEIPTS: usize = 512;

/// One state-machine command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    /// A node joined or re-registered (addresses, capacity). Keeps the
    /// recorded status unless the node was removed.
    RegisterNode(Box<NodeRecord>),
    SetNodeStatus {
        id: NodeId,
        status: NodeStatus,
    },
    /// A node left the cluster for good.
    RemoveNode {
        id: NodeId,
    },
    /// A free-form entry (operator annotations, benchmarks); it changes no
    /// state but lands on the chain like any other command.
    Note {
        text: String,
    },
    /// Records a model's spec (refused if the name is taken by another
    /// file: undeploy it first).
    DeployModel(Box<ModelRecord>),
    /// Drops a model and all its placements.
    UndeployModel {
        name: String,
    },
    /// Assigns a slot to a node; the state machine gives it the next
    /// generation.
    Place {
        model: String,
        replica: u32,
        stage: u32,
        layer_start: u32,
        layer_end: u32,
        node: NodeId,
    },
    /// Empties a slot.
    Unplace {
        model: String,
        replica: u32,
        stage: u32,
    },
    /// A node says where its stage is. Fenced: refused unless the slot is
    /// still this node's at this generation.
    StageReport {
        model: String,
        replica: u32,
        stage: u32,
        node: NodeId,
        generation: u64,
        state: StageState,
        detail: String,
    },
    AddToken(Box<TokenRecord>),
    /// A cluster's first admin token, from the `--init` node: added only
    /// while the cluster has no admin token that has not expired (a new
    /// cluster, or one from before admin tokens), refused otherwise.
    BootstrapToken(Box<TokenRecord>),
    /// Finished requests, batched by the node that answered them. They
    /// change no state; they are the chain's audit trail.
    Receipts {
        receipts: Vec<Receipt>,
    },
    RevokeToken {
        name: String,
    },
}

impl Command {
    /// The transaction kind a block lists.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::RegisterNode(_) | Self::SetNodeStatus { .. } | Self::RemoveNode { .. } => "node",
            Self::Note { .. } => "note",
            Self::DeployModel(_) | Self::UndeployModel { .. } => "model",
            Self::Place { .. } | Self::Unplace { .. } | Self::StageReport { .. } => "placement",
            Self::AddToken(_) | Self::BootstrapToken(_) | Self::RevokeToken { .. } => "token",
            Self::Receipts { .. } => "receipt",
        }
    }

    /// One line for people.
    pub fn summary(&self) -> String {
        match self {
            Self::RegisterNode(n) => format!(
                "register node {} ({}) in {} at {}",
                n.id, n.name, n.region, n.raft_addr
            ),
            Self::SetNodeStatus { id, status } => format!("node {id} is {}", status.as_str()),
            Self::RemoveNode { id } => format!("remove node {id}"),
            Self::Note { text } => {
                let mut t: String = text.chars().take(80).collect();
                if t.len() < text.len() {
                    t.push('…');
                }
                format!("note: {t}")
            }
            Self::DeployModel(m) => format!(
                "deploy model {} (sha256 {}…, {} stages × {} replicas)",
                m.name,
                m.sha256.get(..12).unwrap_or(&m.sha256),
                m.stages,
                m.replicas
            ),
            Self::UndeployModel { name } => format!("undeploy model {name}"),
            Self::Place {
                model,
                replica,
                stage,
                layer_start,
                layer_end,
                node,
            } => format!(
                "place {model} replica {replica} stage {stage} (layers {layer_start}..{layer_end}) on node {node}"
            ),
            Self::Unplace {
                model,
                replica,
                stage,
            } => format!("unplace {model} replica {replica} stage {stage}"),
            Self::StageReport {
                model,
                replica,
                stage,
                node,
                generation,
                state,
                ..
            } => format!(
                "node {node}: {model} replica {replica} stage {stage} (generation {generation}) is {}",
                state.as_str()
            ),
            Self::AddToken(t) => format!("add API token {}", t.name),
            Self::BootstrapToken(t) => format!("add the first admin token {}", t.name),
            Self::RevokeToken { name } => format!("revoke API token {name}"),
            Self::Receipts { receipts: r } => format!(
                "{} request receipt(s), {} tokens generated",
                r.len(),
                r.iter()
                    .map(|r| u64::from(r.completion_tokens))
                    .sum::<u64>()
            ),
        }
    }

    /// The state rows applying this command to `state` may change.
    pub fn touches(&self, state: &State) -> Vec<Row> {
        match self {
            Self::RegisterNode(n) => vec![Row::Node(n.id)],
            Self::SetNodeStatus { id, .. } | Self::RemoveNode { id } => vec![Row::Node(*id)],
            Self::Note { .. } | Self::Receipts { .. } => Vec::new(),
            Self::DeployModel(m) => std::iter::once(Row::Model(m.name.clone()))
                .chain(
                    state
                        .placements_of(&m.name)
                        .filter(|p| p.replica >= m.replicas)
                        .map(|p| Row::Placement((p.model.clone(), p.replica, p.stage))),
                )
                .collect(),
            Self::UndeployModel { name } => std::iter::once(Row::Model(name.clone()))
                .chain(
                    state
                        .placements_of(name)
                        .map(|p| Row::Placement((p.model.clone(), p.replica, p.stage))),
                )
                .collect(),
            Self::Place {
                model,
                replica,
                stage,
                ..
            }
            | Self::Unplace {
                model,
                replica,
                stage,
            } => vec![
                Row::Placement((model.clone(), *replica, *stage)),
                Row::Generation,
            ],
            Self::StageReport {
                model,
                replica,
                stage,
                ..
            } => vec![Row::Placement((model.clone(), *replica, *stage))],
            Self::AddToken(t) | Self::BootstrapToken(t) => vec![Row::Token(t.name.clone())],
            Self::RevokeToken { name } => vec![Row::Token(name.clone())],
        }
    }
}

/// One row of the [`State`], as the store writes it through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    Node(NodeId),
    Model(String),
    Placement(SlotKey),
    Token(String),
    /// The placement generation counter.
    Generation,
}

/// The state the commands build (besides the chain): small, kept in memory
/// and written through to sled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    #[serde(default)]
    pub models: BTreeMap<String, ModelRecord>,
    /// A list of [key, value] pairs in JSON: its keys are tuples, which a
    /// JSON object cannot hold.
    #[serde(default, with = "entries")]
    pub placements: BTreeMap<SlotKey, Placement>,
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenRecord>,
    /// The last placement generation handed out.
    #[serde(default)]
    pub generation: u64,
}

/// A map as a list of [key, value] pairs, for keys that JSON's object keys
/// (strings) cannot hold.
mod entries {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<K: Serialize, V: Serialize, S: Serializer>(
        m: &BTreeMap<K, V>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub(super) fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

/// Names of models and tokens: what a URL path or a metric label can hold.
fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} name {name:?} must be 1-128 characters of letters, digits and - _ . : /"
        ))
    }
}

fn check_sha256(what: &str, hex: &str) -> Result<(), String> {
    if hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        Ok(())
    } else {
        Err(format!("{what} must be 64 lowercase hex digits"))
    }
}

impl State {
    /// Applies one command at block time `time_ms`; an error is a refusal
    /// (deterministic on every replica), never a failure of the machine.
    pub fn apply(&mut self, command: &Command, time_ms: u64) -> Result<(), String> {
        match command {
            Command::RegisterNode(n) => {
                let mut n = (**n).clone();
                match self.nodes.get(&n.id) {
                    Some(old) => {
                        n.status = old.status;
                        n.status_since_ms = old.status_since_ms;
                    }
                    None => {
                        n.status = NodeStatus::Up;
                        n.status_since_ms = time_ms;
                    }
                }
                self.nodes.insert(n.id, n);
                Ok(())
            }
            Command::SetNodeStatus { id, status } => {
                let n = self
                    .nodes
                    .get_mut(id)
                    .ok_or_else(|| format!("node {id} is not registered"))?;
                if n.status != *status {
                    n.status = *status;
                    n.status_since_ms = time_ms;
                }
                Ok(())
            }
            Command::RemoveNode { id } => self
                .nodes
                .remove(id)
                .map(|_| ())
                .ok_or_else(|| format!("node {id} is not registered")),
            Command::Note { .. } => Ok(()),
            Command::Receipts { receipts } => {
                if receipts.is_empty() || receipts.len() > MAX_RECEIPTS {
                    return Err(format!(
                        "a batch holds 1 to {MAX_RECEIPTS} receipts, not {}",
                        receipts.len()
                    ));
                }
                for r in receipts {
                    if r.request_id.is_empty() || r.request_id.len() > 128 {
                        return Err("a receipt's request_id must be 1 to 128 bytes".into());
                    }
                    check_sha256("a receipt's prompt_sha256", &r.prompt_sha256)?;
                    check_sha256("a receipt's output_sha256", &r.output_sha256)?;
                    if r.path.len() > 64 || r.principal.len() > 128 || r.model.len() > 256 {
                        return Err(format!("receipt {} is oversized", r.request_id));
                    }
                }
                Ok(())
            }
            Command::DeployModel(m) => {
                check_name("model", &m.name)?;
                check_sha256("the model's sha256", &m.sha256)?;
                if m.layers == 0 {
                    return Err(format!("model {} has no layers", m.name));
                }
                if !(1..=MAX_STAGES.min(m.layers)).contains(&m.stages) {
                    return Err(format!(
                        "model {}: {} stages; give 1 to {} (at most one per layer)",
                        m.name,
                        m.stages,
                        MAX_STAGES.min(m.layers)
                    ));
                }
                if !(1..=MAX_REPLICAS).contains(&m.replicas) {
                    return Err(format!(
                        "model {}: {} replicas; give 1 to {MAX_REPLICAS}",
                        m.name, m.replicas
                    ));
                }
                let mut m = (**m).clone();
                match self.models.get(&m.name) {
                    Some(old) if old.sha256 != m.sha256 => {
                        return Err(format!(
                            "model {} is deployed from another file (sha256 {}); undeploy it first or pick another name",
                            m.name, old.sha256
                        ));
                    }
                    Some(old) if old.stages != m.stages => {
                        return Err(format!(
                            "model {} runs in {} stages; undeploy it to change its stage count",
                            m.name, old.stages
                        ));
                    }
                    Some(old) => m.deployed_ms = old.deployed_ms,
                    None => m.deployed_ms = time_ms,
                }
                // Fewer replicas: the extra slots go.
                let (name, replicas) = (m.name.clone(), m.replicas);
                self.placements
                    .retain(|(model, r, _), _| *model != name || *r < replicas);
                self.models.insert(m.name.clone(), m);
                Ok(())
            }
            Command::UndeployModel { name } => {
                self.models
                    .remove(name)
                    .ok_or_else(|| format!("model {name} is not deployed"))?;
                self.placements.retain(|(model, _, _), _| model != name);
                Ok(())
            }
            Command::Place {
                model,
                replica,
                stage,
                layer_start,
                layer_end,
                node,
            } => {
                let m = self
                    .models
                    .get(model)
                    .ok_or_else(|| format!("model {model} is not deployed"))?;
                if *replica >= m.replicas || *stage >= m.stages {
                    return Err(format!(
                        "model {model} has {} replicas of {} stages; there is no replica {replica} stage {stage}",
                        m.replicas, m.stages
                    ));
                }
                if layer_start >= layer_end || *layer_end > m.layers {
                    return Err(format!(
                        "layers {layer_start}..{layer_end} are not a range within model {model}'s {} layers",
                        m.layers
                    ));
                }
                let n = self
                    .nodes
                    .get(node)
                    .ok_or_else(|| format!("node {node} is not registered"))?;
                if n.status != NodeStatus::Up {
                    return Err(format!(
                        "node {node} is {}; only an up node takes a stage",
                        n.status.as_str()
                    ));
                }
                self.generation += 1;
                let slot = (model.clone(), *replica, *stage);
                let failed_on = self.placements.get(&slot).map_or_else(Vec::new, |old| {
                    let mut f = old.failed_on.clone();
                    if old.state == StageState::Failed && !f.contains(&old.node) {
                        f.push(old.node);
                    }
                    let extra = f.len().saturating_sub(MAX_FAILED_ON);
                    f.drain(..extra);
                    f
                });
                self.placements.insert(
                    slot,
                    Placement {
                        model: model.clone(),
                        replica: *replica,
                        stage: *stage,
                        layer_start: *layer_start,
                        layer_end: *layer_end,
                        node: *node,
                        generation: self.generation,
                        since_ms: time_ms,
                        state: StageState::Assigned,
                        detail: String::new(),
                        failed_on,
                    },
                );
                Ok(())
            }
            Command::StageReport {
                model,
                replica,
                stage,
                node,
                generation,
                state,
                detail,
            } => {
                let p = self
                    .placements
                    .get_mut(&(model.clone(), *replica, *stage))
                    .ok_or_else(|| {
                        format!("{model} replica {replica} stage {stage} is not placed")
                    })?;
                if p.node != *node || p.generation != *generation {
                    return Err(format!(
                        "stale report from node {node} for generation {generation}: {model} replica {replica} stage {stage} is node {}'s at generation {}",
                        p.node, p.generation
                    ));
                }
                p.state = *state;
                p.detail = detail.chars().take(MAX_DETAIL).collect();
                if *state == StageState::Ready {
                    p.failed_on.clear();
                }
                Ok(())
            }
            Command::Unplace {
                model,
                replica,
                stage,
            } => self
                .placements
                .remove(&(model.clone(), *replica, *stage))
                .map(|_| ())
                .ok_or_else(|| format!("{model} replica {replica} stage {stage} is not placed")),
            Command::BootstrapToken(t) => {
                if self.tokens.values().any(|o| {
                    o.scope == Scope::Admin && (o.expires_ms == 0 || o.expires_ms > time_ms)
                }) {
                    return Err(
                        "the cluster has an admin token already; the first one is not added again"
                            .into(),
                    );
                }
                if t.scope != Scope::Admin {
                    return Err("a bootstrap token must have the admin scope".into());
                }
                self.apply(&Command::AddToken(t.clone()), time_ms)
            }
            Command::AddToken(t) => {
                check_name("token", &t.name)?;
                check_sha256("the token's sha256", &t.sha256)?;
                if self.tokens.contains_key(&t.name) {
                    return Err(format!(
                        "a token named {} exists; revoke it first or pick another name",
                        t.name
                    ));
                }
                if self.tokens.values().any(|o| o.sha256 == t.sha256) {
                    return Err("another token has the same secret; generate a new one".into());
                }
                let mut t = (**t).clone();
                t.created_ms = time_ms;
                self.tokens.insert(t.name.clone(), t);
                Ok(())
            }
            Command::RevokeToken { name } => {
                let Some(t) = self.tokens.get(name) else {
                    return Err(format!("no token is named {name}"));
                };
                let admins = self
                    .tokens
                    .values()
                    .filter(|o| o.scope == Scope::Admin && o.name != *name)
                    .filter(|o| o.expires_ms == 0 || o.expires_ms > time_ms)
                    .count();
                if t.scope == Scope::Admin && admins == 0 {
                    return Err(format!(
                        "{name} is the last admin token that has not expired; revoking it would lock every operator out. Create another first: `trine token create --scope admin <name>`"
                    ));
                }
                self.tokens.remove(name);
                Ok(())
            }
        }
    }

    /// Every row the state holds.
    pub fn rows(&self) -> impl Iterator<Item = Row> + '_ {
        self.nodes
            .keys()
            .map(|id| Row::Node(*id))
            .chain(self.models.keys().map(|m| Row::Model(m.clone())))
            .chain(self.placements.keys().map(|k| Row::Placement(k.clone())))
            .chain(self.tokens.keys().map(|t| Row::Token(t.clone())))
            .chain(std::iter::once(Row::Generation))
    }

    /// Every placement of `model`.
    pub fn placements_of<'a>(&'a self, model: &'a str) -> impl Iterator<Item = &'a Placement> + 'a {
        self.placements
            .range((model.to_owned(), 0, 0)..)
            .take_while(move |((m, _, _), _)| m == model)
            .map(|(_, p)| p)
    }

    /// The token whose secret hashes to `sha256`, if any.
    pub fn token_by_hash(&self, sha256: &str) -> Option<&TokenRecord> {
        self.tokens.values().find(|t| t.sha256 == sha256)
    }

    /// The stored form of `row`: `(key, Some(value))`, or `None` for a
    /// deleted row. Keys: a one-byte table tag, then the row's key.
    pub fn row_bytes(&self, row: &Row) -> Result<(Vec<u8>, Option<Vec<u8>>), serde_json::Error> {
        let mut key;
        let value = match row {
            Row::Node(id) => {
                key = vec![b'n'];
                key.extend_from_slice(&id.to_be_bytes());
                self.nodes.get(id).map(serde_json::to_vec).transpose()?
            }
            Row::Model(name) => {
                key = vec![b'm'];
                key.extend_from_slice(name.as_bytes());
                self.models.get(name).map(serde_json::to_vec).transpose()?
            }
            Row::Placement(slot) => {
                key = vec![b'p'];
                key.extend_from_slice(&serde_json::to_vec(slot)?);
                self.placements
                    .get(slot)
                    .map(serde_json::to_vec)
                    .transpose()?
            }
            Row::Token(name) => {
                key = vec![b't'];
                key.extend_from_slice(name.as_bytes());
                self.tokens.get(name).map(serde_json::to_vec).transpose()?
            }
            Row::Generation => {
                key = vec![b'g'];
                Some(serde_json::to_vec(&self.generation)?)
            }
        };
        Ok((key, value))
    }

    /// Rebuilds one row from its stored form (see [`State::row_bytes`]).
    pub fn load_row(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        let e = |what: &str, err: serde_json::Error| format!("{what} row: {err}");
        match key.first() {
            Some(b'n') => {
                let n: NodeRecord = serde_json::from_slice(value).map_err(|x| e("node", x))?;
                self.nodes.insert(n.id, n);
            }
            Some(b'm') => {
                let m: ModelRecord = serde_json::from_slice(value).map_err(|x| e("model", x))?;
                self.models.insert(m.name.clone(), m);
            }
            Some(b'g') => {
                self.generation = serde_json::from_slice(value).map_err(|x| e("generation", x))?;
            }
            Some(b'p') => {
                let p: Placement = serde_json::from_slice(value).map_err(|x| e("placement", x))?;
                self.placements
                    .insert((p.model.clone(), p.replica, p.stage), p);
            }
            Some(b't') => {
                let t: TokenRecord = serde_json::from_slice(value).map_err(|x| e("token", x))?;
                self.tokens.insert(t.name.clone(), t);
            }
            _ => return Err(format!("unknown state row key {key:?}")),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    fn node(id: NodeId) -> Command {
        Command::RegisterNode(Box::new(crate::local::record(
            id,
            &format!("n{id}"),
            "r",
            "",
        )))
    }

    fn model(name: &str, sha: char, stages: u32, replicas: u32) -> Command {
        Command::DeployModel(Box::new(ModelRecord {
            name: name.into(),
            source: "/models/x.gguf".into(),
            sha256: sha.to_string().repeat(64),
            layers: 4,
            bytes_per_layer: 1000,
            fixed_bytes: 10,
            stages,
            replicas,
            regions: Vec::new(),
            deployed_ms: 0,
        }))
    }

    /// The state travels as JSON in snapshots: a placed model must survive
    /// the trip (tuple-keyed placements once made every snapshot fail, which
    /// stopped every member at once after 10,000 entries).
    #[test]
    fn a_state_with_placements_round_trips_through_json() {
        let mut s = State::default();
        for (i, c) in [node(1), node(2), model("m", 'a', 2, 1)].iter().enumerate() {
            s.apply(c, i as u64).expect("applies");
        }
        s.apply(&place("m", 0, 0, 1), 3).expect("placed");
        s.apply(&place("m", 0, 1, 2), 4).expect("placed");
        assert_eq!(s.placements.len(), 2);
        let json = serde_json::to_vec(&s).expect("a state with placements serializes");
        let back: State = serde_json::from_slice(&json).expect("and deserializes");
        assert_eq!(back, s);
    }

    fn place(m: &str, replica: u32, stage: u32, node: NodeId) -> Command {
        Command::Place {
            model: m.into(),
            replica,
            stage,
            layer_start: stage * 2,
            layer_end: stage * 2 + 2,
            node,
        }
    }

    fn token(name: &str, sha: char) -> Command {
        Command::AddToken(Box::new(TokenRecord {
            name: name.into(),
            sha256: sha.to_string().repeat(64),
            requests_per_minute: 60,
            tokens_per_minute: 0,
            concurrency: 0,
            created_ms: 0,
            scope: Scope::Inference,
            expires_ms: 0,
        }))
    }

    fn admin_token(name: &str, sha: char, expires_ms: u64) -> Command {
        let Command::AddToken(mut t) = token(name, sha) else {
            unreachable!()
        };
        t.scope = Scope::Admin;
        t.expires_ms = expires_ms;
        Command::AddToken(t)
    }

    #[test]
    fn the_last_live_admin_token_cannot_be_revoked() {
        let mut s = State::default();
        s.apply(&admin_token("root", 'a', 0), 1).expect("root");
        s.apply(&token("app", 'b'), 1).expect("app");
        // An inference token goes; the only admin token stays.
        s.apply(&Command::RevokeToken { name: "app".into() }, 2)
            .expect("revoke app");
        let e = s
            .apply(
                &Command::RevokeToken {
                    name: "root".into(),
                },
                2,
            )
            .expect_err("last admin");
        assert!(e.contains("last admin token"), "{e}");
        // An expired admin token does not count as a way back in.
        s.apply(&admin_token("old", 'c', 10), 3).expect("old");
        let e = s
            .apply(
                &Command::RevokeToken {
                    name: "root".into(),
                },
                11,
            )
            .expect_err("only an expired one left");
        assert!(e.contains("last admin token"), "{e}");
        s.apply(&admin_token("ops", 'd', 0), 12).expect("ops");
        s.apply(
            &Command::RevokeToken {
                name: "root".into(),
            },
            13,
        )
        .expect("another admin exists");
        assert!(!s.tokens.contains_key("root"));
    }

    #[test]
    fn a_bootstrap_token_is_added_only_to_a_cluster_without_a_live_admin_token() {
        let boot = |name: &str, sha: char| {
            let Command::AddToken(t) = admin_token(name, sha, 0) else {
                unreachable!()
            };
            Command::BootstrapToken(t)
        };
        let mut s = State::default();
        s.apply(&token("app", 'a'), 1).expect("an inference token");
        s.apply(&boot("root", 'b'), 2).expect("first bootstrap");
        assert_eq!(s.tokens["root"].scope, Scope::Admin);
        let e = s.apply(&boot("again", 'c'), 3).expect_err("second");
        assert!(e.contains("admin token already"), "{e}");
        // Only expired admin tokens left: bootstrapping works again.
        let mut s = State::default();
        s.apply(&admin_token("old", 'd', 10), 1).expect("old");
        s.apply(&boot("root", 'e'), 11).expect("after expiry");
        let Command::AddToken(mut t) = token("weak", 'f') else {
            unreachable!()
        };
        t.expires_ms = 0;
        let e = State::default()
            .apply(&Command::BootstrapToken(t), 1)
            .expect_err("inference scope");
        assert!(e.contains("admin scope"), "{e}");
    }

    #[test]
    fn token_records_from_before_scopes_read_as_inference_and_write_the_same_bytes() {
        let old = r#"{"name":"ci","sha256":"aa","requests_per_minute":1,"tokens_per_minute":2,"concurrency":0,"created_ms":5}"#;
        let t: TokenRecord = serde_json::from_str(old).expect("old record");
        assert_eq!((t.scope, t.expires_ms), (Scope::Inference, 0));
        assert_eq!(serde_json::to_string(&t).expect("json"), old);
        let admin = TokenRecord {
            scope: Scope::Admin,
            expires_ms: 9,
            ..t
        };
        let json = serde_json::to_string(&admin).expect("json");
        assert!(
            json.ends_with(r#""scope":"admin","expires_ms":9}"#),
            "{json}"
        );
        assert!(Scope::Admin.allows(Scope::Inference));
        assert!(!Scope::Inference.allows(Scope::Admin));
        assert_eq!("admin".parse::<Scope>(), Ok(Scope::Admin));
        assert!("root".parse::<Scope>().is_err());
    }

    #[test]
    fn placements_get_increasing_generations_and_follow_their_model() {
        let mut s = State::default();
        for c in [node(1), node(2), model("m", 'a', 2, 2)] {
            s.apply(&c, 5).expect("apply");
        }
        s.apply(&place("m", 0, 0, 1), 6).expect("place");
        s.apply(&place("m", 0, 1, 2), 6).expect("place");
        s.apply(&place("m", 0, 0, 2), 7).expect("move");
        let p = &s.placements[&("m".to_owned(), 0, 0)];
        assert_eq!((p.node, p.generation, p.since_ms), (2, 3, 7));
        assert_eq!(s.placements_of("m").count(), 2);
        // Unplacing does not rewind the counter.
        s.apply(
            &Command::Unplace {
                model: "m".into(),
                replica: 0,
                stage: 0,
            },
            8,
        )
        .expect("unplace");
        s.apply(&place("m", 1, 0, 1), 9).expect("place");
        assert_eq!(s.placements[&("m".to_owned(), 1, 0)].generation, 4);
        // Fewer replicas drop the extra slots; undeploy drops the rest.
        s.apply(&model("m", 'a', 2, 1), 10).expect("shrink");
        assert_eq!(s.placements_of("m").count(), 1);
        s.apply(&Command::UndeployModel { name: "m".into() }, 11)
            .expect("undeploy");
        assert!(s.placements.is_empty() && s.models.is_empty());
    }

    #[test]
    fn stage_reports_are_fenced_by_generation() {
        let mut s = State::default();
        for c in [node(1), node(2), model("m", 'a', 1, 1)] {
            s.apply(&c, 1).expect("apply");
        }
        s.apply(&place("m", 0, 0, 1), 2).expect("place");
        let report = |node, generation| Command::StageReport {
            model: "m".into(),
            replica: 0,
            stage: 0,
            node,
            generation,
            state: StageState::Ready,
            detail: String::new(),
        };
        s.apply(&report(1, 1), 3).expect("the holder reports");
        assert_eq!(
            s.placements[&("m".to_owned(), 0, 0)].state,
            StageState::Ready
        );
        s.apply(&place("m", 0, 0, 2), 4).expect("move");
        assert_eq!(
            s.placements[&("m".to_owned(), 0, 0)].state,
            StageState::Assigned
        );
        let e = s
            .apply(&report(1, 1), 5)
            .expect_err("the old holder is fenced");
        assert!(e.contains("stale report"), "{e}");
        assert!(
            s.apply(&report(2, 1), 5).is_err(),
            "right node, old generation"
        );
        s.apply(&report(2, 2), 5).expect("the new holder reports");
    }

    #[test]
    fn bad_commands_are_refused_and_change_nothing() {
        let mut s = State::default();
        for c in [node(1), node(2), model("m", 'a', 2, 1), token("ci", 'b')] {
            s.apply(&c, 1).expect("apply");
        }
        s.apply(
            &Command::SetNodeStatus {
                id: 2,
                status: NodeStatus::Down,
            },
            2,
        )
        .expect("down");
        let before = s.clone();
        let cases: Vec<(Command, &str)> = vec![
            (place("nope", 0, 0, 1), "not deployed"),
            (place("m", 1, 0, 1), "no replica 1"),
            (place("m", 0, 2, 1), "no replica 0 stage 2"),
            (place("m", 0, 0, 9), "node 9 is not registered"),
            (place("m", 0, 0, 2), "node 2 is down"),
            (
                Command::Place {
                    model: "m".into(),
                    replica: 0,
                    stage: 0,
                    layer_start: 3,
                    layer_end: 9,
                    node: 1,
                },
                "not a range",
            ),
            (model("m", 'c', 2, 1), "another file"),
            (model("m", 'a', 1, 1), "stage count"),
            (model("x", 'c', 5, 1), "at most one per layer"),
            (model("x", 'c', 1, 0), "replicas"),
            (model("bad name", 'c', 1, 1), "must be 1-128"),
            (model("x", 'G', 1, 1), "64 lowercase hex"),
            (token("ci", 'c'), "exists"),
            (token("ci2", 'b'), "same secret"),
            (Command::RevokeToken { name: "zz".into() }, "no token"),
            (Command::UndeployModel { name: "zz".into() }, "not deployed"),
        ];
        for (c, want) in cases {
            let e = s.apply(&c, 3).expect_err(&format!("{c:?} must be refused"));
            assert!(e.contains(want), "{c:?}: {e} (wanted {want:?})");
            assert_eq!(s, before, "{c:?} changed the state");
        }
        assert_eq!(
            s.token_by_hash(&"b".repeat(64)).map(|t| t.name.as_str()),
            Some("ci")
        );
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        let name = prop::sample::select(vec!["m", "n"]);
        prop_oneof![
            (1u64..4).prop_map(node),
            (1u64..4, prop::bool::ANY).prop_map(|(id, up)| Command::SetNodeStatus {
                id,
                status: if up { NodeStatus::Up } else { NodeStatus::Down },
            }),
            (1u64..4).prop_map(|id| Command::RemoveNode { id }),
            (name.clone(), 1u32..3, 1u32..4).prop_map(|(m, st, r)| model(m, 'a', st, r)),
            name.clone()
                .prop_map(|m| Command::UndeployModel { name: m.into() }),
            (name.clone(), 0u32..3, 0u32..2, 1u64..4).prop_map(|(m, r, st, n)| place(m, r, st, n)),
            (name, 0u32..3, 0u32..2).prop_map(|(m, r, st)| Command::Unplace {
                model: m.into(),
                replica: r,
                stage: st,
            }),
            (
                prop::sample::select(vec!["a", "b"]),
                prop::sample::select(vec!['1', '2'])
            )
                .prop_map(|(n, c)| token(n, c)),
            prop::sample::select(vec!["a", "b"])
                .prop_map(|n| Command::RevokeToken { name: n.into() }),
            (
                prop::sample::select(vec!["m", "n"]),
                0u32..2,
                1u64..4,
                0u64..6
            )
                .prop_map(|(m, r, node, generation)| Command::StageReport {
                    model: m.into(),
                    replica: r,
                    stage: 0,
                    node,
                    generation,
                    state: StageState::Ready,
                    detail: "loaded".into(),
                }),
        ]
    }

    proptest! {
        /// What the store writes through (the rows each command touches)
        /// always rebuilds exactly the state in memory: a restarted node
        /// holds what its peers hold.
        #[test]
        fn touched_rows_rebuild_the_state(cmds in prop::collection::vec(arb_command(), 1..60)) {
            let mut s = State::default();
            let mut stored: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
            for (t, c) in cmds.iter().enumerate() {
                let touched = c.touches(&s);
                let before = s.clone();
                if s.apply(c, t as u64).is_err() {
                    prop_assert_eq!(&s, &before);
                }
                for row in touched {
                    match s.row_bytes(&row).expect("encode") {
                        (k, Some(v)) => { stored.insert(k, v); }
                        (k, None) => { stored.remove(&k); }
                    }
                }
            }
            let mut rebuilt = State::default();
            for (k, v) in &stored {
                rebuilt.load_row(k, v).expect("decode");
            }
            prop_assert_eq!(rebuilt, s);
        }
    }
}
