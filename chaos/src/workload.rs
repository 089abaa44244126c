//! The workload that runs throughout a chaos run, and what it records: every
//! operation (admin writes, linearizable reads, inference requests) with
//! the node it went through, its start and end, and its outcome — the
//! history the checkers judge — plus samples of each node's Raft view, of
//! stage readiness and of Prometheus's firing alerts.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use trine_proto::v1;

use crate::cluster::{Node, inference_client};

/// The prompts inference requests use (greedy, so each has one right answer).
pub const PROMPTS: [&str; 4] = [
    "The capital of France is",
    "Once upon a time",
    "1, 2, 3, 4,",
    "Ternary weights are",
];
/// The model the cluster serves (the testnet's and the compose file's
/// default deployment).
pub const MODEL: &str = "tiny";
/// Tokens each inference request asks for.
pub const MAX_TOKENS: u32 = 12;
/// Each inference request's deadline (sent to the node as its timeout).
pub const DEADLINE: Duration = Duration::from_secs(20);
/// Each admin call's deadline.
pub const ADMIN_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OpKind {
    /// AppendNote with a unique text (an acknowledged write must land once).
    Note,
    CreateToken,
    RevokeToken,
    /// ListTokens, linearizable.
    ReadTokens,
    /// DeployModel of a model of this run's own.
    Deploy,
    Undeploy,
    Generate,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Op {
    pub id: u64,
    pub kind: OpKind,
    pub node: String,
    /// Milliseconds since the run started.
    pub start_ms: f64,
    pub end_ms: f64,
    /// The note text, token name, or prompt index.
    pub key: String,
    pub ok: bool,
    /// gRPC code name on failure ("OK" on success).
    pub code: String,
    /// The error message, the generated text, or the token names read.
    pub detail: String,
    /// Inference: the nodes that served the request (node ids, pipeline
    /// order), as the node reported them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub path: Vec<u64>,
}

/// One node's own view of Raft at one moment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusSample {
    pub t_ms: f64,
    pub node: String,
    pub term: u64,
    pub leader_id: u64,
    pub is_leader: bool,
    pub chain_height: u64,
    pub head: String,
    pub nodes_up: u32,
    pub nodes_total: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageSample {
    pub t_ms: f64,
    pub ready: usize,
    pub total: usize,
    /// The node of each slot (ready or not).
    pub on: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AlertSample {
    pub t_ms: f64,
    /// Names of the alerts firing.
    pub firing: Vec<String>,
}

/// Everything recorded during a run.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct History {
    pub ops: Vec<Op>,
    pub status: Vec<StatusSample>,
    pub stages: Vec<StageSample>,
    pub alerts: Vec<AlertSample>,
}

/// A shared, growing history and the run's clock.
#[derive(Debug, Clone)]
pub struct Recorder {
    pub t0: Instant,
    pub history: Arc<Mutex<History>>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            t0: Instant::now(),
            history: Arc::default(),
            next: Arc::default(),
        }
    }

    pub fn now_ms(&self) -> f64 {
        self.t0.elapsed().as_secs_f64() * 1000.0
    }

    fn id(&self) -> u64 {
        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn push(&self, op: Op) {
        if let Ok(mut h) = self.history.lock() {
            h.ops.push(op);
        }
    }

    /// Records an admin call through `node`, begun at `start`: its
    /// outcome (or the status it failed with) as the op's detail.
    fn admin_op(
        &self,
        kind: OpKind,
        node: &Node,
        start: f64,
        key: String,
        r: Result<String, tonic::Status>,
    ) {
        self.push(Op {
            id: self.id(),
            kind,
            node: node.name.clone(),
            start_ms: start,
            end_ms: self.now_ms(),
            key,
            ok: r.is_ok(),
            code: r.as_ref().map_or_else(code_name, |_| "Ok".into()),
            detail: r.unwrap_or_else(|s| s.message().to_owned()),
            path: Vec::new(),
        });
    }

    pub fn snapshot(&self) -> History {
        self.history.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// What the workload needs to know about the cluster.
#[derive(Debug, Clone)]
pub struct Target {
    pub nodes: Vec<Node>,
    pub model: String,
    pub prometheus: Option<String>,
    /// 16 hex digits that make this run's note texts, token names and
    /// token hashes unique.
    pub tag: String,
}

/// Runs the workload until `stop` turns true.
pub async fn run(target: Target, rec: Recorder, stop: watch::Receiver<bool>) {
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(writer(
        target.clone(),
        rec.clone(),
        stop.clone(),
    )));
    tasks.push(tokio::spawn(tokens(
        target.clone(),
        rec.clone(),
        stop.clone(),
    )));
    tasks.push(tokio::spawn(models(
        target.clone(),
        rec.clone(),
        stop.clone(),
    )));
    for k in 0..2 {
        tasks.push(tokio::spawn(inference(
            target.clone(),
            rec.clone(),
            stop.clone(),
            k,
        )));
    }
    tasks.push(tokio::spawn(observe(
        target.clone(),
        rec.clone(),
        stop.clone(),
    )));
    for t in tasks {
        let _ = t.await;
    }
}

fn code_name(s: &tonic::Status) -> String {
    format!("{:?}", s.code())
}

/// Unique notes through each node in turn, a new one every 150 ms
/// whatever the earlier ones are doing (a client blocked on a cut-off node
/// does not hold the others back), at most 16 in flight.
async fn writer(t: Target, rec: Recorder, stop: watch::Receiver<bool>) {
    let mut seq = 0u64;
    let slots = Arc::new(tokio::sync::Semaphore::new(16));
    let mut running = tokio::task::JoinSet::new();
    while !*stop.borrow() {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (t2, rec2) = (t.clone(), rec.clone());
        running.spawn(async move {
            note(&t2, &rec2, seq).await;
            drop(permit);
        });
        seq += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    while running.join_next().await.is_some() {}
}

async fn note(t: &Target, rec: &Recorder, seq: u64) {
    let node = &t.nodes[seq as usize % t.nodes.len()];
    let text = format!("chaos {} note {seq}", t.tag);
    let start = rec.now_ms();
    let r = node
        .admin
        .clone()
        .append_note(v1::AppendNoteRequest {
            request_id: format!("{}-n{seq}", t.tag),
            text: text.clone(),
        })
        .await;
    let r = r.map(|h| format!("height {}", h.get_ref().height));
    rec.admin_op(OpKind::Note, node, start, text, r);
}

/// Token creates, revokes of older ones, and linearizable reads of the
/// token list, each through a different node.
async fn tokens(t: Target, rec: Recorder, stop: watch::Receiver<bool>) {
    let mut seq = 0u64;
    let mut created: Vec<String> = Vec::new();
    while !*stop.borrow() {
        let node = &t.nodes[(seq as usize * 3 + 1) % t.nodes.len()];
        let start = rec.now_ms();
        let mut client = node.admin.clone();
        let (kind, key, r): (OpKind, String, Result<String, tonic::Status>) = match seq % 3 {
            0 => {
                let name = format!("chaos-{}-{seq}", t.tag);
                let r = client
                    .create_token(v1::CreateTokenRequest {
                        request_id: format!("{}-t{seq}", t.tag),
                        name: name.clone(),
                        // 16 hex digits of tag, 48 of sequence: unique per run.
                        sha256: format!("{}{:048x}", t.tag, seq + 1),
                        ..Default::default()
                    })
                    .await
                    .map(|h| format!("height {}", h.get_ref().height));
                if r.is_ok() {
                    created.push(name.clone());
                }
                (OpKind::CreateToken, name, r)
            }
            1 if created.len() > 2 => {
                let name = created.remove(0);
                let r = client
                    .revoke_token(v1::RevokeTokenRequest {
                        request_id: format!("{}-r{seq}", t.tag),
                        name: name.clone(),
                    })
                    .await
                    .map(|h| format!("height {}", h.get_ref().height));
                (OpKind::RevokeToken, name, r)
            }
            _ => {
                let r = client
                    .list_tokens(v1::ListTokensRequest {
                        request_id: format!("{}-l{seq}", t.tag),
                        consistency: v1::ReadConsistency::Linearizable.into(),
                        max_staleness_ms: 0,
                    })
                    .await
                    .map(|l| {
                        l.into_inner()
                            .tokens
                            .into_iter()
                            .map(|t| t.name)
                            .collect::<Vec<_>>()
                            .join(" ")
                    });
                (OpKind::ReadTokens, String::new(), r)
            }
        };
        rec.admin_op(kind, node, start, key, r);
        seq += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the names of this run's models start with.
pub fn model_prefix(tag: &str) -> String {
    format!("chaos-{tag}-m")
}

/// The name of this run's `seq`th model.
pub fn model_name(tag: &str, seq: u64) -> String {
    format!("{}{seq}", model_prefix(tag))
}

/// The record of the deployed model `name`, from the first node that has it.
pub async fn deployed(nodes: &[Node], name: &str) -> Option<v1::DeployedModel> {
    for n in nodes {
        if let Ok(p) = n
            .status
            .clone()
            .get_placement(v1::GetPlacementRequest {
                model: name.to_owned(),
                consistency: v1::ReadConsistency::Local.into(),
                max_staleness_ms: 3_600_000,
                ..Default::default()
            })
            .await
            && let Some(m) = p.into_inner().models.into_iter().find(|m| m.name == name)
        {
            return Some(m);
        }
    }
    None
}

/// Deploys and undeploys models of this run's own (the served model's
/// file under new names, one stage, one replica), a call a second, each
/// through another node: writes whose outcome the final state must show,
/// and placement churn while faults hit. At most two are deployed at once;
/// a deploy that failed is undeployed too (it may have landed).
async fn models(t: Target, rec: Recorder, stop: watch::Receiver<bool>) {
    let Some(base) = deployed(&t.nodes, &t.model).await else {
        rec.push(Op {
            id: rec.id(),
            kind: OpKind::Deploy,
            node: String::new(),
            start_ms: rec.now_ms(),
            end_ms: rec.now_ms(),
            key: String::new(),
            ok: false,
            code: "NotFound".into(),
            detail: format!("no node knows the record of model {}: no deploys", t.model),
            path: Vec::new(),
        });
        return;
    };
    let mut seq = 0u64;
    let mut next_model = 0u64;
    let mut live: std::collections::VecDeque<String> = Default::default();
    while !*stop.borrow() {
        let node = &t.nodes[(seq as usize * 2 + 3) % t.nodes.len()];
        let mut client = node.admin.clone();
        let start = rec.now_ms();
        let (kind, key, r) = if live.len() >= 2 || (seq % 2 == 1 && !live.is_empty()) {
            let name = live.pop_front().unwrap_or_default();
            let r = client
                .undeploy_model(v1::UndeployModelRequest {
                    request_id: format!("{}-u{seq}", t.tag),
                    name: name.clone(),
                })
                .await
                .map(|r| format!("log index {}", r.get_ref().log_index));
            (OpKind::Undeploy, name, r)
        } else {
            let name = model_name(&t.tag, next_model);
            next_model += 1;
            let r = client
                .deploy_model(v1::DeployModelRequest {
                    request_id: format!("{}-d{seq}", t.tag),
                    name: name.clone(),
                    source: base.source.clone(),
                    sha256: base.sha256.clone(),
                    stages: 1,
                    replicas: 1,
                    regions: Vec::new(),
                    layers: base.layers,
                    bytes_per_layer: base.bytes_per_layer,
                    fixed_bytes: base.fixed_bytes,
                })
                .await
                .map(|r| format!("log index {}", r.get_ref().log_index));
            live.push_back(name.clone());
            (OpKind::Deploy, name, r)
        };
        rec.admin_op(kind, node, start, key, r);
        seq += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// One greedy generation of prompt `p` through `node`: the text and the
/// nodes that served it, or the status it failed with.
pub async fn generate(
    node: &Node,
    model: &str,
    p: usize,
    id: String,
) -> Result<(String, Vec<u64>), tonic::Status> {
    let mut client = inference_client(&node.grpc, DEADLINE + Duration::from_secs(5))
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    let req = v1::GenerateRequest {
        request_id: id,
        model: model.to_owned(),
        input: Some(v1::generate_request::Input::Prompt(PROMPTS[p].to_owned())),
        sampling: Some(v1::SamplingParams {
            temperature: 0.0,
            ..Default::default()
        }),
        max_tokens: MAX_TOKENS,
        timeout: Some(prost_types::Duration {
            seconds: DEADLINE.as_secs() as i64,
            nanos: 0,
        }),
        ..Default::default()
    };
    let mut stream = client.generate(req).await?.into_inner();
    let mut text = String::new();
    let mut path = Vec::new();
    while let Some(ev) = stream.next().await {
        match ev?.event {
            Some(v1::generate_response::Event::Token(t)) => text.push_str(&t.text),
            Some(v1::generate_response::Event::Usage(u)) => path = u.path,
            None => {}
        }
    }
    Ok((text, path))
}

/// Greedy generations through each node in turn.
async fn inference(t: Target, rec: Recorder, stop: watch::Receiver<bool>, lane: usize) {
    let mut seq = lane;
    while !*stop.borrow() {
        let node = &t.nodes[(seq * 5 + lane) % t.nodes.len()];
        let p = seq % PROMPTS.len();
        let start = rec.now_ms();
        let r = generate(node, &t.model, p, format!("{}-g{seq}", t.tag)).await;
        let (r, path) = match r {
            Ok((text, path)) => (Ok(text), path),
            Err(e) => (Err(e), Vec::new()),
        };
        rec.push(Op {
            id: rec.id(),
            kind: OpKind::Generate,
            node: node.name.clone(),
            start_ms: start,
            end_ms: rec.now_ms(),
            key: p.to_string(),
            ok: r.is_ok(),
            code: r.as_ref().map_or_else(code_name, |_| "Ok".into()),
            detail: r.unwrap_or_else(|s| s.message().to_owned()),
            path,
        });
        seq += 2;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Samples every node's Raft view and stage readiness (every 250 ms) and
/// firing alerts (every second).
async fn observe(t: Target, rec: Recorder, stop: watch::Receiver<bool>) {
    let http = reqwest::Client::new();
    let mut tick = 0u64;
    while !*stop.borrow() {
        let samples = futures_util::future::join_all(t.nodes.iter().map(status_of)).await;
        // Placement as the leader of the highest term sees it (the first to
        // know of a move), then as any node does.
        let mut order: Vec<(u64, usize)> = samples
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let lead = s.as_ref().filter(|s| s.is_leader).map_or(0, |s| s.term + 1);
                (u64::MAX - lead, i)
            })
            .collect();
        order.sort();
        let by_leader: Vec<Node> = order.iter().map(|(_, i)| t.nodes[*i].clone()).collect();
        for (n, s) in t.nodes.iter().zip(samples) {
            if let Some(s) = s {
                let sample = StatusSample {
                    t_ms: rec.now_ms(),
                    node: n.name.clone(),
                    ..s
                };
                if let Ok(mut h) = rec.history.lock() {
                    h.status.push(sample);
                }
            }
        }
        if let Some(s) = stages(&by_leader, &t.model).await {
            let sample = StageSample {
                t_ms: rec.now_ms(),
                ..s
            };
            if let Ok(mut h) = rec.history.lock() {
                h.stages.push(sample);
            }
        }
        if tick.is_multiple_of(4)
            && let Some(p) = &t.prometheus
            && let Some(firing) = firing_alerts(&http, p).await
        {
            let sample = AlertSample {
                t_ms: rec.now_ms(),
                firing,
            };
            if let Ok(mut h) = rec.history.lock() {
                h.alerts.push(sample);
            }
        }
        tick += 1;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A node's ClusterStatus from its own replica (local read), or None when
/// it does not answer within 1 s.
pub async fn local_status(n: &Node) -> Option<v1::ClusterStatusResponse> {
    let mut c = n.status.clone();
    c.cluster_status(v1::ClusterStatusRequest {
        consistency: v1::ReadConsistency::Local.into(),
        max_staleness_ms: 3_600_000,
        ..Default::default()
    })
    .await
    .ok()
    .map(tonic::Response::into_inner)
}

/// A node's own view (local read), or None when it does not answer within 1 s.
pub async fn status_of(n: &Node) -> Option<StatusSample> {
    let s = local_status(n).await?;
    let mut c = n.status.clone();
    let head = c
        .chain_head(v1::ChainHeadRequest {
            consistency: v1::ReadConsistency::Local.into(),
            max_staleness_ms: 3_600_000,
            ..Default::default()
        })
        .await
        .ok()
        .and_then(|h| h.into_inner().head);
    Some(StatusSample {
        t_ms: 0.0,
        node: n.name.clone(),
        term: s.term,
        leader_id: s.leader_id,
        is_leader: s.role == v1::RaftRole::Leader as i32,
        chain_height: head.as_ref().map_or(0, |h| h.height),
        head: head.map(|h| hex::encode(h.hash)).unwrap_or_default(),
        nodes_up: s.nodes_up,
        nodes_total: s.nodes_total,
    })
}

/// Ready and total stage slots of `model` (the served one), as the first
/// node that answers sees them.
pub async fn stages(nodes: &[Node], model: &str) -> Option<StageSample> {
    for n in nodes {
        if let Ok(p) = n
            .status
            .clone()
            .get_placement(v1::GetPlacementRequest {
                model: model.to_owned(),
                consistency: v1::ReadConsistency::Local.into(),
                max_staleness_ms: 3_600_000,
                ..Default::default()
            })
            .await
        {
            let a = p.into_inner().assignments;
            return Some(StageSample {
                t_ms: 0.0,
                ready: a
                    .iter()
                    .filter(|s| s.state == v1::StageState::Ready as i32)
                    .count(),
                total: a.len(),
                on: a.iter().map(|s| s.node_id).collect(),
            });
        }
    }
    None
}

#[derive(Deserialize)]
struct AlertsReply {
    data: AlertsData,
}

#[derive(Deserialize)]
struct AlertsData {
    alerts: Vec<PromAlert>,
}

#[derive(Deserialize)]
struct PromAlert {
    labels: std::collections::BTreeMap<String, String>,
    state: String,
}

/// The alerts Prometheus has firing (not pending).
pub async fn firing_alerts(http: &reqwest::Client, base: &str) -> Option<Vec<String>> {
    let r: AlertsReply = http
        .get(format!("{base}/api/v1/alerts"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    let mut names: Vec<String> = r
        .data
        .alerts
        .into_iter()
        .filter(|a| a.state == "firing")
        .filter_map(|a| a.labels.get("alertname").cloned())
        .collect();
    names.sort();
    names.dedup();
    Some(names)
}
