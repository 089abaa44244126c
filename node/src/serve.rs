//! Serving: every node accepts a request for any deployed model and gets it
//! answered by a ready replica. The node routes from its own replica of the
//! placement table: a replica it holds runs here; otherwise the request
//! goes to the best node that holds one (same region first), over that
//! node's gRPC `Inference/Generate`, marked as a hop so it is not routed
//! again. If that node dies or stalls mid-answer, the router asks the next
//! replica to continue: it sends the input plus the tokens generated so far
//! (`continue_from`), and that node prefills them, advances its sampler by
//! as many draws, and goes on. Greedy and seeded output are the same as
//! without the failure; the client sees a pause.
//!
//! The node the client asked enforces the API token's limits (requests and
//! generated tokens per minute, requests at once; buckets per node) and
//! leaves a receipt of each finished request for the chain
//! ([`crate::receipts`]).
//!
//! A replica in several stages runs as a pipeline driven by the node that
//! holds its first stage: it tokenizes, runs stage 0, sends the hidden
//! states to each later stage over `/trine/stage/1` (the stage nodes keep
//! the sequence's KV cache between steps, [`crate::stage_server`]), gets
//! the last position's logits back and samples. A stage that fails makes
//! the attempt fail, and the router continues on another replica.
//!
//! Not yet: continuous batching.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;
use trine_control::command::Receipt;
use trine_control::{ControlPlane, NodeRecord, NodeStatus, StageState, State};
use trine_engine::model::{Logits, Output};
use trine_engine::sampler::{Sampler, Settings};
use trine_engine::tokenizer::StreamDecoder;
use trine_proto::v1;
use trine_proto::v1::inference_client::InferenceClient;

use crate::batcher::{Owned, StepError};

/// gRPC metadata key marking a request one node forwarded to another.
pub const HOP: &str = "x-trine-hop";

/// Least time a request waits for this node's serving lease before it is
/// refused as `Unavailable`; longer where the control plane's timeouts let
/// an election take longer ([`ControlPlane::leader_loss_bound`]).
pub const LEASE_WAIT: Duration = Duration::from_secs(5);

/// Bounds on what one request may ask and how much waits.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Most prompt tokens.
    pub max_prompt_tokens: usize,
    /// Default and most `max_tokens`.
    pub default_max_tokens: u32,
    pub max_tokens: u32,
    /// Generations running at once on this node.
    pub concurrency: usize,
    /// Generations waiting for a slot; more are refused (429 /
    /// RESOURCE_EXHAUSTED) rather than queued without bound.
    pub queue: usize,
    /// Longest wait for a replica's next token before the router gives up
    /// on it and fails over; for the first token (prompt prefill included),
    /// `first_token`.
    pub stall: Duration,
    pub first_token: Duration,
    /// Most failovers for one request.
    pub max_failovers: u32,
    /// Longest a request may take end to end, unless the client asks for
    /// less.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_prompt_tokens: 8192,
            default_max_tokens: 256,
            max_tokens: 4096,
            concurrency: 32,
            queue: 64,
            stall: Duration::from_secs(10),
            first_token: Duration::from_secs(60),
            max_failovers: 3,
            request_timeout: Duration::from_secs(300),
        }
    }
}

/// Longest a request waits to catch up with the leader's log when this
/// node's state does not show what the request needs yet (a model it does
/// not know, a replica not yet ready here) before it is refused.
const CATCH_UP: Duration = Duration::from_secs(1);

/// Why a request was refused or ended early; each maps to a gRPC code and
/// an HTTP status (OpenAI's error shapes).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
    /// The request's deadline passed.
    #[error("{0}")]
    Deadline(String),
    /// The request body is over the size limit.
    #[error("{0}")]
    TooLarge(String),
}

impl ServeError {
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Invalid(_) => 400,
            Self::Unauthenticated(_) => 401,
            Self::NotFound(_) => 404,
            Self::Busy(_) => 429,
            Self::Unavailable(_) => 503,
            Self::Deadline(_) => 504,
            Self::TooLarge(_) => 413,
            Self::Internal(_) => 500,
        }
    }

    /// OpenAI's `error.type`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_request_error",
            Self::Unauthenticated(_) => "authentication_error",
            Self::NotFound(_) => "not_found_error",
            Self::Busy(_) => "rate_limit_error",
            Self::Unavailable(_) => "service_unavailable",
            Self::Internal(_) => "server_error",
            Self::Deadline(_) => "timeout",
            Self::TooLarge(_) => "invalid_request_error",
        }
    }

    pub fn status(&self) -> tonic::Status {
        let m = self.to_string();
        match self {
            Self::Invalid(_) => tonic::Status::invalid_argument(m),
            Self::Unauthenticated(_) => tonic::Status::unauthenticated(m),
            Self::NotFound(_) => tonic::Status::not_found(m),
            Self::Busy(_) => tonic::Status::resource_exhausted(m),
            Self::Unavailable(_) => tonic::Status::unavailable(m),
            Self::Internal(_) => tonic::Status::internal(m),
            Self::Deadline(_) => tonic::Status::deadline_exceeded(m),
            Self::TooLarge(_) => tonic::Status::invalid_argument(m),
        }
    }

    fn from_status(s: &tonic::Status) -> Self {
        let m = s.message().to_owned();
        // A status our own transport made (it carries the error as its
        // source: a TLS or HTTP/2 mismatch, a reset connection) says
        // nothing about the request; another replica may well answer it.
        if std::error::Error::source(s).is_some() {
            return Self::Unavailable(format!("the connection to the node failed: {m}"));
        }
        match s.code() {
            tonic::Code::InvalidArgument | tonic::Code::OutOfRange => Self::Invalid(m),
            tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => {
                Self::Unauthenticated(m)
            }
            tonic::Code::NotFound => Self::NotFound(m),
            tonic::Code::ResourceExhausted => Self::Busy(m),
            tonic::Code::Internal => Self::Internal(m),
            tonic::Code::DeadlineExceeded => Self::Deadline(m),
            _ => Self::Unavailable(m),
        }
    }

    /// Worth asking another replica.
    fn retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::Busy(_))
    }
}

/// One API token's budget on this node: token buckets refilled
/// continuously (a minute's worth at most), and the requests running.
#[derive(Debug, Clone)]
struct Quota {
    requests: f64,
    tokens: f64,
    at: Instant,
    running: u32,
}

/// The per-token limits of the token table, enforced by the node that
/// takes the request (each node keeps its own buckets: a client spreading
/// requests over n nodes gets up to n times the rate).
#[derive(Debug, Default)]
struct Quotas(Mutex<HashMap<String, Quota>>);

/// A request let in under its token's limits; its slot is freed on drop.
#[derive(Debug)]
pub struct Admission {
    quotas: Option<(Arc<Quotas>, String)>,
}

impl Admission {
    fn charge(&self, tokens: u32) {
        if let Some((q, name)) = &self.quotas
            && let Ok(mut m) = q.0.lock()
            && let Some(quota) = m.get_mut(name)
        {
            quota.tokens -= f64::from(tokens);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some((q, name)) = &self.quotas
            && let Ok(mut m) = q.0.lock()
            && let Some(quota) = m.get_mut(name)
        {
            quota.running = quota.running.saturating_sub(1);
        }
    }
}

impl Quotas {
    /// Lets a request of token `t` in at `now`, or says which limit it hit
    /// and when to retry.
    fn admit(&self, t: &trine_control::TokenRecord, now: Instant) -> Result<(), ServeError> {
        let mut m = self
            .0
            .lock()
            .map_err(|_| ServeError::Internal("quota table poisoned".into()))?;
        let (rpm, tpm) = (
            f64::from(t.requests_per_minute),
            f64::from(t.tokens_per_minute),
        );
        let q = m.entry(t.name.clone()).or_insert(Quota {
            requests: rpm,
            tokens: tpm,
            at: now,
            running: 0,
        });
        let minutes = now.saturating_duration_since(q.at).as_secs_f64() / 60.0;
        q.at = now;
        q.requests = (q.requests + minutes * rpm).min(rpm);
        q.tokens = (q.tokens + minutes * tpm).min(tpm);
        if rpm > 0.0 && q.requests < 1.0 {
            return Err(ServeError::Busy(format!(
                "token {} is over its {} requests per minute; retry in {:.1} s",
                t.name,
                t.requests_per_minute,
                (1.0 - q.requests) * 60.0 / rpm
            )));
        }
        if tpm > 0.0 && q.tokens <= 0.0 {
            return Err(ServeError::Busy(format!(
                "token {} is over its {} generated tokens per minute; retry in {:.1} s",
                t.name,
                t.tokens_per_minute,
                (-q.tokens + 1.0) * 60.0 / tpm
            )));
        }
        if t.concurrency > 0 && q.running >= t.concurrency {
            return Err(ServeError::Busy(format!(
                "token {} has {} requests running, its limit; retry when one ends",
                t.name, t.concurrency
            )));
        }
        q.requests -= 1.0;
        q.running += 1;
        Ok(())
    }
}

/// What a generation streams: token events, then one usage event.
pub type Events = mpsc::Receiver<Result<v1::GenerateResponse, ServeError>>;

#[derive(Clone)]
pub struct Serving {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Serving {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Serving").finish_non_exhaustive()
    }
}

struct Inner {
    control: ControlPlane,
    limits: Limits,
    allow_anonymous: bool,
    running: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    /// Channels to other nodes, by address and TLS, with the generation of
    /// the trust they were made with (a reload makes them again).
    clients: Mutex<Clients>,
    /// TLS to other nodes' client ports (those serving it).
    api_tls: crate::api_tls::ApiTls,
    receipts: Option<crate::receipts::Receipts>,
    quotas: Arc<Quotas>,
    mesh: Option<crate::mesh::Mesh>,
    /// This node's region and the simulated latency matrix, when on.
    latency: Option<(String, Arc<crate::mesh::Matrix>)>,
    /// Later stages held here, for pipelines whose next stage is local.
    stage_server: crate::stage_server::StageServer,
}

/// Channels to other nodes by (address, TLS): the trust generation each
/// was made under, and the client.
type Clients = HashMap<(String, bool), (u64, InferenceClient<Channel>)>;

/// How this node reaches others: the mesh (pipelines), the simulated
/// latency (this node's region and the matrix, when on), and TLS to other
/// nodes' client ports (forwarded requests).
#[derive(Debug, Default)]
pub struct Links {
    pub mesh: Option<crate::mesh::Mesh>,
    pub latency: Option<(String, Arc<crate::mesh::Matrix>)>,
    pub api_tls: crate::api_tls::ApiTls,
}

/// Who is asking: the token's name, or "anonymous".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal(pub String);

impl Serving {
    /// `stage_server` holds the stages this node serves (the executor's
    /// table) and the caches of pipeline sequences passing through.
    pub fn new(
        control: ControlPlane,
        stage_server: crate::stage_server::StageServer,
        limits: Limits,
        allow_anonymous: bool,
        receipts: Option<crate::receipts::Receipts>,
        links: Links,
    ) -> anyhow::Result<Self> {
        let Links {
            mesh,
            latency,
            api_tls,
        } = links;
        Ok(Self {
            inner: Arc::new(Inner {
                running: Arc::new(Semaphore::new(limits.concurrency.max(1))),
                control,
                limits,
                allow_anonymous,
                latency,
                stage_server,
                waiting: Arc::default(),
                clients: Mutex::default(),
                api_tls,
                receipts,
                quotas: Arc::default(),
                mesh,
            }),
        })
    }

    /// The caller behind `authorization` (`Bearer <secret>`), checked
    /// against the token table (SHA-256 of the secret).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, ServeError> {
        use crate::auth::Refusal;
        let need = trine_control::Scope::Inference;
        let state = self.inner.control.reader().state();
        match crate::auth::check(
            &state,
            crate::auth::bearer(authorization),
            need,
            crate::auth::now_ms(),
        ) {
            Ok(t) => Ok(Principal(t.name)),
            // OpenAI's clients always send a key; where anonymous requests
            // are allowed, one the table does not know changes nothing.
            Err(Refusal::Missing | Refusal::Unknown) if self.inner.allow_anonymous => {
                Ok(Principal("anonymous".into()))
            }
            Err(r) => {
                crate::metrics::auth_refused("inference", r.reason());
                Err(ServeError::Unauthenticated(r.message(need)))
            }
        }
    }

    /// Lets a request of `principal` in under its token's limits (rate,
    /// generated tokens, concurrency), or refuses it with 429 /
    /// RESOURCE_EXHAUSTED and when to retry.
    pub fn admit(&self, principal: &Principal) -> Result<Admission, ServeError> {
        let state = self.inner.control.reader().state();
        let Some(t) = state.tokens.get(&principal.0) else {
            return Ok(Admission { quotas: None });
        };
        if t.requests_per_minute == 0 && t.tokens_per_minute == 0 && t.concurrency == 0 {
            return Ok(Admission { quotas: None });
        }
        self.inner.quotas.admit(t, Instant::now())?;
        Ok(Admission {
            quotas: Some((self.inner.quotas.clone(), t.name.clone())),
        })
    }

    /// The deployed models, as `ListModels` answers.
    pub fn models(&self) -> Vec<v1::ModelInfo> {
        let state = self.inner.control.reader().state();
        state
            .models
            .values()
            .map(|m| {
                let ready = ready_replicas(&state, &m.name).len() as u32;
                let local = (0..m.replicas).find_map(|r| {
                    self.inner
                        .stage_server
                        .stages()
                        .get(&(m.name.clone(), r, 0))
                });
                let (arch, vocab, context) = local.map_or((String::new(), 0, 0), |l| {
                    (
                        "bitnet-b1.58".to_owned(),
                        l.model.config.vocab as u32,
                        l.model.config.context as u32,
                    )
                });
                v1::ModelInfo {
                    name: m.name.clone(),
                    sha256: m.sha256.clone(),
                    architecture: arch,
                    layers: m.layers,
                    vocab_size: vocab,
                    context_length: context,
                    replicas: m.replicas,
                    ready_replicas: ready,
                }
            })
            .collect()
    }

    /// Starts `req` and returns its events. `hop`: forwarded by another
    /// node, so it must run here.
    pub async fn generate(
        &self,
        mut req: v1::GenerateRequest,
        hop: bool,
        authorization: Option<String>,
        principal: &Principal,
    ) -> Result<Events, ServeError> {
        // Hops were admitted by the node the client asked.
        let admission = if hop {
            Admission { quotas: None }
        } else {
            self.admit(principal)?
        };
        let limits = &self.inner.limits;
        if req.request_id.is_empty() {
            req.request_id = format!("req-{:016x}", rand_id());
        }
        if req.request_id.len() > 128 {
            return Err(ServeError::Invalid(
                "request_id is longer than 128 bytes".into(),
            ));
        }
        if req.max_tokens == 0 {
            req.max_tokens = limits.default_max_tokens;
        }
        if req.max_tokens > limits.max_tokens {
            return Err(ServeError::Invalid(format!(
                "max_tokens {} is over this node's limit of {} (its max_tokens setting); ask for fewer",
                req.max_tokens, limits.max_tokens
            )));
        }
        if req.stop.len() > 4 || req.stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(ServeError::Invalid(
                "stop takes at most 4 non-empty strings of at most 256 bytes".into(),
            ));
        }
        settings(&req)?;
        // The request's budget: this node's limit, or less if asked.
        let budget = match req.timeout.and_then(|t| Duration::try_from(t).ok()) {
            Some(t) if !t.is_zero() => t.min(limits.request_timeout),
            _ => limits.request_timeout,
        };
        let deadline = tokio::time::Instant::now() + budget;
        if req.input.is_none() {
            return Err(ServeError::Invalid(
                "the request has no input: give prompt, chat or tokens".into(),
            ));
        }
        let mut state = self.inner.control.reader().state();
        if !state.models.contains_key(&req.model) {
            // A model deployed a moment ago may be committed but not yet
            // applied on this node (a follower across an ocean): catch up
            // to the leader's commit index once before saying it is not
            // deployed.
            if self.catch_up().await {
                state = self.inner.control.reader().state();
            }
        }
        let model = state.models.get(&req.model).ok_or_else(|| {
            ServeError::NotFound(format!(
                "model {:?} is not deployed; ListModels (GET /v1/models) shows the ones that are",
                req.model
            ))
        })?;
        let me = self.inner.control.id();
        if hop {
            return Ok(with_deadline(self.run_here(req).await?, deadline, budget));
        }
        let candidates = self.ranked(&state, &req.model).await;
        if candidates.is_empty() {
            return Err(ServeError::Unavailable(format!(
                "no replica of {} is ready yet; `trine placement --model {}` shows where it is loading",
                req.model, req.model
            )));
        }
        let receipt = self.inner.receipts.clone().map(|r| {
            (
                r,
                Receipt {
                    request_id: req.request_id.clone(),
                    principal: principal.0.clone(),
                    model: model.name.clone(),
                    model_sha256: model.sha256.clone(),
                    prompt_sha256: input_digest(&req.input),
                    output_sha256: String::new(),
                    prompt_tokens: 0,
                    completion_tokens: 0,
                    finish: String::new(),
                    entry: me,
                    path: Vec::new(),
                    failovers: 0,
                    latency_ms: 0,
                },
            )
        });
        let (tx, rx) = mpsc::channel(64);
        let this = self.clone();
        tokio::spawn(async move {
            this.route(req, candidates, authorization, deadline, tx)
                .await;
        });
        Ok(account(
            with_deadline(rx, deadline, budget),
            admission,
            receipt,
        ))
    }

    /// Requests waiting here for a compute slot.
    pub fn waiting(&self) -> u32 {
        self.inner.waiting.load(Ordering::Acquire) as u32
    }

    /// [`candidates_for`], ordered by [`rank`] with what the mesh measured.
    async fn ranked(&self, state: &State, model: &str) -> Vec<NodeRecord> {
        let me = self.inner.control.id();
        let nodes = candidates_for(state, model, me);
        let mut seen = HashMap::new();
        if let Some(mesh) = &self.inner.mesh
            && let Ok(Ok(snap)) =
                tokio::time::timeout(Duration::from_millis(200), mesh.snapshot()).await
        {
            for p in snap.peers {
                seen.insert(
                    p.peer_id.to_string(),
                    Seen {
                        rtt: p.rtt,
                        queue_depth: p.queue_depth,
                        connected: p.connected,
                    },
                );
            }
        }
        rank(nodes, me, self.waiting(), &seen)
    }

    /// Waits, within `budget`, until this node may serve its stages
    /// ([`ControlPlane::fenced`]): a node cut off from the control plane's
    /// majority stops serving before a leader can move its stages
    /// elsewhere, and a pause while a new leader is elected is a pause, not
    /// an error. It waits [`Self::lease_wait`]: the leader froze or died,
    /// every follower's lease runs out within the lease span and comes back
    /// only from the next leader.
    async fn leased(&self, budget: Duration) -> Result<(), ServeError> {
        let until = Instant::now() + budget.min(self.lease_wait());
        let mut logged = false;
        loop {
            let Some(why) = self.inner.control.fenced() else {
                return Ok(());
            };
            if Instant::now() >= until {
                return Err(ServeError::Unavailable(format!(
                    "{why}: its stages may have moved, so it does not serve them; retry through another node"
                )));
            }
            if !logged {
                tracing::info!(reason = %why, "serving waits for this node's lease");
                logged = true;
            }
            // Short: the common wait is a node in touch that has heard of
            // a new commit and applies it within milliseconds.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Longest a request, or an answer under way, waits for this node's
    /// lease: as long as an election can take, at least [`LEASE_WAIT`].
    fn lease_wait(&self) -> Duration {
        LEASE_WAIT.max(self.inner.control.leader_loss_bound())
    }

    /// Runs `req` on the replica this node holds.
    async fn run_here(&self, req: v1::GenerateRequest) -> Result<Events, ServeError> {
        let budget = req
            .timeout
            .and_then(|t| Duration::try_from(t).ok())
            .unwrap_or(Duration::MAX);
        self.leased(budget).await?;
        let pipeline = match self.pipeline(&req.model, false) {
            Ok(p) => p,
            // The router saw this replica ready in its own state; this
            // node may not have applied that commit yet (its stage loaded,
            // the "ready" entry still on its way). Catch up with the
            // leader's log once, as for an unknown model, and look again.
            Err(ServeError::Unavailable(_)) => {
                self.catch_up().await;
                self.pipeline(&req.model, true)?
            }
            Err(e) => return Err(e),
        };
        let limits = &self.inner.limits;
        let waiting = self.inner.waiting.fetch_add(1, Ordering::AcqRel);
        crate::metrics::queue_depth(waiting + 1);
        if waiting >= limits.queue {
            crate::metrics::queue_depth(self.inner.waiting.fetch_sub(1, Ordering::AcqRel) - 1);
            return Err(ServeError::Busy(format!(
                "this node has {} requests waiting (its max_queue setting); retry later",
                limits.queue
            )));
        }
        // The events start now; the wait for a compute slot happens behind
        // them (the router's first-token limit covers it), so a queued
        // request is not mistaken for a stalled node.
        let (tx, rx) = mpsc::channel(64);
        let me = self.inner.control.id();
        let max_prompt = limits.max_prompt_tokens;
        let fence = Fence {
            control: self.inner.control.clone(),
            model: pipeline.model.clone(),
            replica: pipeline.replica,
            generation: pipeline.first.generation,
            wait: self.lease_wait(),
        };
        let (running, waiting) = (self.inner.running.clone(), self.inner.waiting.clone());
        tokio::spawn(async move {
            let permit = running.acquire_owned().await;
            crate::metrics::queue_depth(waiting.fetch_sub(1, Ordering::AcqRel) - 1);
            let Ok(permit) = permit else {
                let _ = tx
                    .send(Err(ServeError::Unavailable("the node is stopping".into())))
                    .await;
                return;
            };
            if tx.is_closed() {
                // The client left while it waited.
                return;
            }
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                // Counted on stage 0's batcher while it runs (the batcher
                // waits briefly for its next step to batch it with the
                // others').
                let _active = pipeline.first.batcher.join();
                let started = Instant::now();
                let result = generate_local(&pipeline, &fence, &req, me, max_prompt, started, &tx);
                if let Err(e) = result {
                    let _ = tx.blocking_send(Err(e));
                }
            });
        });
        Ok(rx)
    }

    /// Waits, at most [`CATCH_UP`], until this node has applied the
    /// leader's commit index (a read-index round, as linearizable reads
    /// do); whether it got there. Bounded, so a node cut off from its
    /// leader still answers promptly.
    async fn catch_up(&self) -> bool {
        let read = self.inner.control.linearizable();
        matches!(tokio::time::timeout(CATCH_UP, read).await, Ok(Ok(_)))
    }

    /// A replica whose first stage this node holds, with where its other
    /// stages run (each ready, on an up node). A refusal because this
    /// node's copy is fenced counts in the metrics on the `last_try` only.
    fn pipeline(&self, model: &str, last_try: bool) -> Result<Pipeline, ServeError> {
        let state = self.inner.control.reader().state();
        let m = state
            .models
            .get(model)
            .ok_or_else(|| ServeError::NotFound(format!("model {model:?} is not deployed")))?;
        let mut why = format!("this node holds no ready first stage of {model}");
        let mut fenced = false;
        for replica in 0..m.replicas {
            let Some(first) = self
                .inner
                .stage_server
                .stages()
                .get(&(model.to_owned(), replica, 0))
            else {
                continue;
            };
            // What this node loaded serves only while the placement (read
            // after the lease check, so no staler than the lease) still
            // gives the slot to this node at that generation.
            let me = self.inner.control.id();
            if let Some(reason) = fenced_first_stage(&state, model, replica, me, first.generation) {
                why = reason;
                fenced = true;
                continue;
            }
            let mut rest = Vec::new();
            for stage in 1..m.stages {
                let hop = state
                    .placements
                    .get(&(model.to_owned(), replica, stage))
                    .filter(|p| p.state == StageState::Ready)
                    .and_then(|p| {
                        let n = state.nodes.get(&p.node)?;
                        (n.status == NodeStatus::Up).then_some(())?;
                        Some(Hop {
                            stage,
                            peer: n.peer_id.parse().ok()?,
                            node: n.name.clone(),
                            generation: p.generation,
                        })
                    });
                match hop {
                    Some(h) => rest.push(h),
                    None => {
                        why = format!("stage {stage} of {model} replica {replica} is not ready");
                        break;
                    }
                }
            }
            if rest.len() + 1 == m.stages as usize {
                return Ok(Pipeline {
                    first,
                    model: model.to_owned(),
                    replica,
                    rest,
                    mesh: self.inner.mesh.clone(),
                    local: self.inner.stage_server.clone(),
                    handle: tokio::runtime::Handle::current(),
                });
            }
        }
        if fenced && last_try {
            crate::metrics::stage_rejected("fenced");
        }
        Err(ServeError::Unavailable(why))
    }

    /// The simulated RTT (and jitter) from this node to `region`, if the
    /// node simulates latency.
    fn simulated_rtt(&self, region: &str) -> Option<(Duration, Duration)> {
        let (mine, matrix) = self.inner.latency.as_ref()?;
        Some((matrix.rtt(mine, region)?, matrix.jitter))
    }

    fn client(&self, node: &NodeRecord) -> Result<InferenceClient<Channel>, ServeError> {
        let (addr, region) = (node.grpc_addr.as_str(), node.region.as_str());
        let mut clients = self
            .inner
            .clients
            .lock()
            .map_err(|_| ServeError::Internal("client cache poisoned".into()))?;
        let key = (addr.to_owned(), node.api_tls);
        let generation = self.inner.api_tls.generation();
        if let Some((g, c)) = clients.get(&key)
            && *g == generation
        {
            return Ok(c.clone());
        }
        let endpoint = self
            .inner
            .api_tls
            .endpoint(addr, &node.name, node.api_tls)
            .map_err(ServeError::Unavailable)?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            // A frozen or cut-off node stops answering HTTP/2 pings: the
            // stream fails within PING_EVERY + PING_TIMEOUT and the router
            // continues elsewhere. A node that is only busy still answers
            // (its network runtime is not its compute threads).
            .http2_keep_alive_interval(PING_EVERY)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true);
        // Under simulated latency the forwarded request feels the RTT to
        // the node's region, as the mesh's own traffic does: what comes
        // back is held for the whole round trip (the request itself goes
        // out at once), so the first token arrives one RTT later and the
        // gaps between tokens are unchanged.
        let channel = match self.simulated_rtt(region) {
            None => endpoint.connect_lazy(),
            Some((rtt, jitter)) => {
                let connector = tower::service_fn(move |uri: tonic::transport::Uri| async move {
                    use tokio_util::compat::{
                        FuturesAsyncReadCompatExt as _, TokioAsyncReadCompatExt as _,
                    };
                    let host = uri.host().unwrap_or("127.0.0.1").to_owned();
                    let port = uri.port_u16().unwrap_or(80);
                    let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                    tcp.set_nodelay(true)?;
                    let hold = crate::mesh::latency::Hold::new(rtt * 2, jitter, rand_id());
                    let held = crate::mesh::latency::Held::new(tcp.compat(), hold);
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(held.compat()))
                });
                endpoint.connect_with_connector_lazy(connector)
            }
        };
        let c =
            InferenceClient::new(channel).max_decoding_message_size(crate::grpc::MAX_MESSAGE_BYTES);
        clients.insert(key, (generation, c.clone()));
        Ok(c)
    }

    /// The next event from `node`, or why it will not come: the node
    /// stalled for the stall limit, or the leader marked it down (whichever
    /// is first).
    async fn next_event(
        &self,
        events: &mut Events,
        node: &NodeRecord,
        limit: Duration,
    ) -> Result<Option<Result<v1::GenerateResponse, ServeError>>, ServeError> {
        let since = Instant::now();
        let remote = node.id != self.inner.control.id();
        loop {
            tokio::select! {
                ev = events.recv() => return Ok(ev),
                () = tokio::time::sleep(Duration::from_millis(200)) => {
                    let down = remote
                        && self
                            .inner
                            .control
                            .reader()
                            .state()
                            .nodes
                            .get(&node.id)
                            .is_none_or(|n| n.status != NodeStatus::Up);
                    if down {
                        return Err(ServeError::Unavailable(format!(
                            "node {} was marked down mid-answer",
                            node.name
                        )));
                    }
                    if since.elapsed() >= limit {
                        return Err(ServeError::Unavailable(format!(
                            "node {} stalled for {limit:?}",
                            node.name
                        )));
                    }
                }
            }
        }
    }

    /// `req` on `node` (a hop), its events as local ones.
    async fn remote(
        &self,
        node: &NodeRecord,
        req: v1::GenerateRequest,
        authorization: Option<&str>,
    ) -> Result<Events, ServeError> {
        let mut request = tonic::Request::new(req);
        request
            .metadata_mut()
            .insert(HOP, tonic::metadata::MetadataValue::from_static("1"));
        if let Some(v) =
            authorization.and_then(|a| tonic::metadata::MetadataValue::try_from(a).ok())
        {
            request.metadata_mut().insert("authorization", v);
        }
        let mut client = self.client(node)?;
        let stall = self.inner.limits.stall;
        // Fault injection (chaos runs): a cut-off node is a black hole, and
        // an added delay to its region is paid once per call.
        let faults = self.inner.control.faults().clone();
        let added = self.inner.control.delays().added_rtt(&node.region);
        let id = node.id;
        let call = async {
            if faults.blocked(id) {
                std::future::pending::<()>().await;
            }
            if !added.is_zero() {
                tokio::time::sleep(added).await;
            }
            client.generate(request).await
        };
        let mut stream = match tokio::time::timeout(stall, call).await {
            Err(_) => {
                return Err(ServeError::Unavailable(format!(
                    "node {} did not answer within {stall:?}",
                    node.name
                )));
            }
            Ok(Err(s)) => return Err(ServeError::from_status(&s)),
            Ok(Ok(stream)) => stream.into_inner(),
        };
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tokio::select! {
                    ev = stream.next() => {
                        let Some(ev) = ev else { return };
                        if tx.send(ev.map_err(|s| ServeError::from_status(&s))).await.is_err() {
                            return;
                        }
                    }
                    // Cut off mid-answer: nothing more arrives (the
                    // router's stall limit takes over).
                    _ = tick.tick(), if faults.blocked(id) => {
                        drop(stream);
                        tx.closed().await;
                        return;
                    }
                    // The router gave up on this node: stop reading.
                    () = tx.closed() => return,
                }
            }
        });
        Ok(rx)
    }

    /// Streams `req` from the first candidate that answers (this node's
    /// own replica in-process, others over gRPC); on a failure mid-answer,
    /// continues on the next one from the tokens so far.
    async fn route(
        &self,
        req: v1::GenerateRequest,
        mut candidates: Vec<NodeRecord>,
        authorization: Option<String>,
        deadline: tokio::time::Instant,
        tx: mpsc::Sender<Result<v1::GenerateResponse, ServeError>>,
    ) {
        let limits = self.inner.limits.clone();
        let me = self.inner.control.id();
        let started = Instant::now();
        let mut generated: Vec<u32> = req.continue_from.clone();
        let already = generated.len();
        let mut failovers = 0u32;
        let mut path = Vec::new();
        let mut tried = Vec::new();
        let mut errors: Vec<String> = Vec::new();
        // Whether every replica tried so far turned the request away as
        // busy (its queue full): then the answer is "busy, retry later"
        // (429), not "no replica could finish it" (503).
        let mut all_busy = true;
        let mut first_token: Option<Duration> = None;
        // The serving node's own measure of the first token's time.
        let mut serving_first: Option<prost_types::Duration> = None;
        let mut last = started;
        loop {
            // The replica that failed had sent every token asked for (only
            // its closing event was lost): end here rather than ask another
            // for zero more, which it would read as "the default". The
            // prompt's token count came in that lost event: 0 here.
            if failovers > 0 && generated.len() - already >= req.max_tokens as usize {
                let usage = v1::Usage {
                    completion_tokens: (generated.len() - already) as u32,
                    finish_reason: v1::FinishReason::Length.into(),
                    time_to_first_token: first_token.map(duration),
                    serving_time_to_first_token: serving_first,
                    total: Some(duration(started.elapsed())),
                    path: path.clone(),
                    failovers,
                    ..Default::default()
                };
                crate::metrics::request_done(started.elapsed());
                let _ = tx
                    .send(Ok(v1::GenerateResponse {
                        request_id: req.request_id.clone(),
                        event: Some(v1::generate_response::Event::Usage(usage)),
                    }))
                    .await;
                return;
            }
            let Some(node) = (!candidates.is_empty()).then(|| candidates.remove(0)) else {
                let e = if all_busy && !errors.is_empty() {
                    ServeError::Busy(format!(
                        "every replica of {} is busy ({}); retry later",
                        req.model,
                        errors.join("; ")
                    ))
                } else {
                    ServeError::Unavailable(format!(
                        "no replica of {} could finish the request ({})",
                        req.model,
                        errors.join("; ")
                    ))
                };
                let _ = tx.send(Err(e)).await;
                return;
            };
            tried.push(node.id);
            let mut r = req.clone();
            r.continue_from = generated.clone();
            r.max_tokens = req.max_tokens - (generated.len() - already) as u32;
            // The replica gets what is left of the budget.
            r.timeout = Some(duration(
                deadline.saturating_duration_since(tokio::time::Instant::now()),
            ));
            let events = if node.id == me {
                self.run_here(r).await
            } else {
                self.remote(&node, r, authorization.as_deref()).await
            };
            let outcome = match events {
                Err(e) => Err(e),
                Ok(mut events) => {
                    let mut end = Err(ServeError::Unavailable(format!(
                        "node {} ended the stream without a result",
                        node.name
                    )));
                    let mut limit = limits.first_token;
                    loop {
                        let ev = self.next_event(&mut events, &node, limit).await;
                        limit = limits.stall;
                        match ev {
                            Err(e) | Ok(Some(Err(e))) => {
                                end = Err(e);
                                break;
                            }
                            Ok(None) => break,
                            Ok(Some(Ok(mut ev))) => match ev.event.take() {
                                Some(v1::generate_response::Event::Token(mut t)) => {
                                    let now = Instant::now();
                                    // Indexes count from the first token of
                                    // the whole answer; a repeated one
                                    // carries held-back text, not a new
                                    // token.
                                    if t.index as usize >= generated.len() {
                                        generated.push(t.id);
                                    }
                                    t.index = (generated.len() - already).saturating_sub(1) as u32;
                                    if first_token.is_none() {
                                        serving_first = t.since_start;
                                    }
                                    t.since_start = Some(duration(now - started));
                                    t.since_previous = Some(duration(now - last));
                                    if first_token.is_none() {
                                        crate::metrics::first_token(now - started);
                                    } else {
                                        crate::metrics::inter_token(now - last);
                                    }
                                    last = now;
                                    first_token.get_or_insert(now - started);
                                    ev.event = Some(v1::generate_response::Event::Token(t));
                                    if tx.send(Ok(ev)).await.is_err() {
                                        return;
                                    }
                                }
                                Some(v1::generate_response::Event::Usage(mut u)) => {
                                    path.push(node.id);
                                    u.completion_tokens = (generated.len() - already) as u32;
                                    u.failovers = failovers;
                                    u.path = path.clone();
                                    u.time_to_first_token = first_token.map(duration);
                                    u.serving_time_to_first_token = serving_first;
                                    u.total = Some(duration(started.elapsed()));
                                    ev.event = Some(v1::generate_response::Event::Usage(u));
                                    crate::metrics::request_done(started.elapsed());
                                    let _ = tx.send(Ok(ev)).await;
                                    end = Ok(());
                                    break;
                                }
                                None => {}
                            },
                        }
                    }
                    end
                }
            };
            match outcome {
                Ok(()) => return,
                Err(e) if e.retryable() && failovers < limits.max_failovers => {
                    all_busy &= matches!(e, ServeError::Busy(_));
                    failovers += 1;
                    path.push(node.id);
                    errors.push(format!("{}: {e}", node.name));
                    crate::metrics::failover();
                    tracing::warn!(request_id = %req.request_id, node = %node.name, error = %e, generated = generated.len() - already, "replica failed mid-request; continuing on another");
                    crate::events::record(
                        "failover",
                        format!(
                            "request {} ({}): {} failed after {} tokens ({e}); continuing on another replica",
                            req.request_id,
                            req.model,
                            node.name,
                            generated.len()
                        ),
                    );
                    if candidates.is_empty() {
                        // The placement may have moved on: look again.
                        let state = self.inner.control.reader().state();
                        candidates = self
                            .ranked(&state, &req.model)
                            .await
                            .into_iter()
                            .filter(|n| !tried.contains(&n.id))
                            .collect();
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
    }
}

/// `events` until `deadline`; then a [`ServeError::Deadline`] and the
/// source is dropped (which stops whatever produces it at its next event).
fn with_deadline(mut events: Events, deadline: tokio::time::Instant, budget: Duration) -> Events {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                ev = events.recv() => {
                    let Some(ev) = ev else { return };
                    if tx.send(ev).await.is_err() {
                        return;
                    }
                }
                () = tokio::time::sleep_until(deadline) => {
                    crate::metrics::request_timed_out();
                    let _ = tx
                        .send(Err(ServeError::Deadline(format!(
                            "the request did not finish within its {} deadline; ask for fewer tokens or a longer timeout",
                            humantime::format_duration(Duration::from_millis(budget.as_millis() as u64))
                        ))))
                        .await;
                    return;
                }
            }
        }
    });
    rx
}

/// SHA-256 of a request's input, as a receipt records it.
fn input_digest(input: &Option<v1::generate_request::Input>) -> String {
    let mut h = Sha256::new();
    match input {
        Some(v1::generate_request::Input::Prompt(p)) => h.update(p.as_bytes()),
        Some(v1::generate_request::Input::Chat(c)) => {
            let messages: Vec<serde_json::Value> = c
                .messages
                .iter()
                .map(|m| serde_json::json!({ "role": m.role, "content": m.content }))
                .collect();
            h.update(serde_json::Value::from(messages).to_string().as_bytes());
        }
        Some(v1::generate_request::Input::Tokens(t)) => {
            for id in &t.ids {
                h.update(id.to_le_bytes());
            }
        }
        None => {}
    }
    trine_control::chain::hex(&h.finalize())
}

/// Passes the events through; when the answer is complete, charges its
/// tokens to the caller's quota and leaves its receipt. The admission (a
/// running slot) is held until the stream ends.
fn account(
    mut inner: Events,
    admission: Admission,
    receipt: Option<(crate::receipts::Receipts, Receipt)>,
) -> Events {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        let _admission = &admission;
        let started = Instant::now();
        let mut output = Sha256::new();
        while let Some(ev) = inner.recv().await {
            match &ev {
                Ok(v1::GenerateResponse {
                    event: Some(v1::generate_response::Event::Token(t)),
                    ..
                }) => output.update(t.text.as_bytes()),
                Ok(v1::GenerateResponse {
                    event: Some(v1::generate_response::Event::Usage(u)),
                    ..
                }) => {
                    admission.charge(u.completion_tokens);
                    let Some((receipts, mut receipt)) = receipt.clone() else {
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                        continue;
                    };
                    receipt.output_sha256 = trine_control::chain::hex(&output.clone().finalize());
                    receipt.prompt_tokens = u.prompt_tokens;
                    receipt.completion_tokens = u.completion_tokens;
                    receipt.finish =
                        match v1::FinishReason::try_from(u.finish_reason).unwrap_or_default() {
                            v1::FinishReason::Length => "length",
                            v1::FinishReason::StopSequence => "stop_sequence",
                            _ => "stop",
                        }
                        .into();
                    receipt.path.clone_from(&u.path);
                    receipt.failovers = u.failovers;
                    receipt.latency_ms = started.elapsed().as_millis() as u64;
                    receipts.record(receipt.clone());
                }
                _ => {}
            }
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    });
    rx
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

pub fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// Replicas of `model` whose every stage is ready on an up node.
fn ready_replicas(state: &State, model: &str) -> Vec<u32> {
    let Some(m) = state.models.get(model) else {
        return Vec::new();
    };
    (0..m.replicas)
        .filter(|r| {
            (0..m.stages).all(|s| {
                state
                    .placements
                    .get(&(model.to_owned(), *r, s))
                    .is_some_and(|p| {
                        p.state == StageState::Ready
                            && state
                                .nodes
                                .get(&p.node)
                                .is_some_and(|n| n.status == NodeStatus::Up)
                    })
            })
        })
        .collect()
}

/// Why this node may not serve its loaded copy (at `loaded` generation) of
/// the first stage of `model` replica `replica`, by the placement in
/// `state`: `None` while the slot is this node's, at that generation,
/// ready, and the node is up. A node whose stage moved while it was away
/// (drained, cut off, restarted from old state), or whose executor has not
/// unloaded it yet, is fenced: the new holder serves.
fn fenced_first_stage(
    state: &State,
    model: &str,
    replica: u32,
    me: u64,
    loaded: u64,
) -> Option<String> {
    let up = state
        .nodes
        .get(&me)
        .is_some_and(|n| n.status == NodeStatus::Up);
    if !up {
        return Some(format!(
            "this node is not up in the placement's view (drained, down or not yet registered), so it serves no stage of {model}"
        ));
    }
    match state.placements.get(&(model.to_owned(), replica, 0)) {
        None => Some(format!("{model} replica {replica} is no longer placed")),
        Some(p) if p.node != me => Some(format!(
            "stage 0 of {model} replica {replica} has moved to node {} (generation {}); this node's copy (generation {loaded}) is fenced",
            p.node, p.generation
        )),
        Some(p) if p.generation != loaded || p.state != StageState::Ready => Some(format!(
            "stage 0 of {model} replica {replica} is at generation {} ({}) here, not this node's ready generation {loaded}",
            p.generation,
            p.state.as_str()
        )),
        Some(_) => None,
    }
}

/// What the mesh tells the router of a peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    pub rtt: Option<Duration>,
    pub queue_depth: Option<u32>,
    pub connected: bool,
}

/// How often the router pings a node it forwards to, and how long it
/// waits for the answer before giving the node up (failover).
pub const PING_EVERY: Duration = Duration::from_millis(400);
pub const PING_TIMEOUT: Duration = Duration::from_millis(800);

/// How long a pipeline waits for a later stage's answer to one step, plus
/// [`STAGE_TOKEN_TIME`] per token in it.
pub const STAGE_STEP_TIMEOUT: Duration = Duration::from_secs(5);
pub const STAGE_TOKEN_TIME: Duration = Duration::from_millis(20);

/// What one request waiting ahead is taken to cost, in the router's sum.
pub const QUEUED_COST: Duration = Duration::from_millis(100);
/// The cost assumed for a peer whose RTT has not been measured yet.
pub const UNMEASURED_RTT: Duration = Duration::from_secs(1);

/// Orders candidates by expected wait: the mesh RTT to the node (0 for
/// this node; unmeasured counts as [`UNMEASURED_RTT`], unconnected as ten
/// times that) plus [`QUEUED_COST`] for each request waiting there (this
/// node's own count, the others' from their last heartbeat). Ties keep
/// [`candidates_for`]'s order (this node, its region, then by id).
pub fn rank(
    mut nodes: Vec<NodeRecord>,
    me: u64,
    my_queue: u32,
    seen: &HashMap<String, Seen>,
) -> Vec<NodeRecord> {
    let cost = |n: &NodeRecord| -> Duration {
        if n.id == me {
            return QUEUED_COST * my_queue;
        }
        let s = seen.get(&n.peer_id).copied().unwrap_or_default();
        let rtt = match (s.connected, s.rtt) {
            (false, _) => UNMEASURED_RTT * 10,
            (true, None) => UNMEASURED_RTT,
            (true, Some(r)) => r,
        };
        rtt + QUEUED_COST * s.queue_depth.unwrap_or(0)
    };
    nodes.sort_by_cached_key(cost);
    nodes
}

/// Nodes holding the first stage of a ready replica of `model`, best first:
/// this node, then its region, then by id.
pub fn candidates_for(state: &State, model: &str, me: u64) -> Vec<NodeRecord> {
    let my_region = state.nodes.get(&me).map(|n| n.region.clone());
    let mut nodes: Vec<NodeRecord> = ready_replicas(state, model)
        .into_iter()
        .filter_map(|r| state.placements.get(&(model.to_owned(), r, 0)))
        .filter_map(|p| state.nodes.get(&p.node).cloned())
        .filter(|n| n.id == me || !n.grpc_addr.is_empty())
        .collect();
    nodes.sort_by_key(|n| (n.id != me, Some(&n.region) != my_region.as_ref(), n.id));
    nodes.dedup_by_key(|n| n.id);
    nodes
}

fn settings(req: &v1::GenerateRequest) -> Result<Settings, ServeError> {
    let p = req.sampling.unwrap_or_default();
    let s = Settings {
        temperature: p.temperature,
        top_k: p.top_k as usize,
        top_p: if p.top_p == 0.0 { 1.0 } else { p.top_p },
        repetition_penalty: if p.repetition_penalty == 0.0 {
            1.0
        } else {
            p.repetition_penalty
        },
        seed: p.seed.unwrap_or(0),
        ..Settings::default()
    };
    s.validate().map_err(|e| ServeError::Invalid(e.0))?;
    Ok(s)
}

/// Holds back text that could be the start of a stop string; reports a
/// match.
#[derive(Debug, Default)]
struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// Text that may be emitted now, and whether a stop string matched
    /// (the text before it is emitted; the rest is dropped).
    fn push(&mut self, piece: &str) -> (String, bool) {
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_owned();
            self.held.clear();
            return (out, true);
        }
        // Keep the longest tail that is a prefix of some stop string.
        let keep = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len().min(self.held.len() + 1)).rev().find(|&k| {
                    self.held.is_char_boundary(self.held.len() - k)
                        && s.starts_with(&self.held[self.held.len() - k..])
                })
            })
            .max()
            .unwrap_or(0);
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_owned();
        self.held.drain(..cut);
        (out, false)
    }

    fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// log p(token) from raw logits.
fn logprob(logits: &[f32], token: u32) -> f32 {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|l| f64::from(l - max).exp())
        .sum();
    let l = logits
        .get(token as usize)
        .copied()
        .unwrap_or(f32::NEG_INFINITY);
    (f64::from(l - max) - sum.ln()) as f32
}

/// A later stage of a replica: where it runs.
#[derive(Debug, Clone)]
struct Hop {
    stage: u32,
    peer: libp2p::PeerId,
    node: String,
    generation: u64,
}

/// What a running answer re-checks before each token: this node's
/// serving lease and its hold on the slot.
struct Fence {
    control: ControlPlane,
    model: String,
    replica: u32,
    /// The generation of the first stage this node loaded.
    generation: u64,
    /// Longest pause for a lease to come back.
    wait: Duration,
}

/// Whether a running answer may send its next token.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hold {
    Serve,
    /// No lease now (it may come back: wait).
    Wait(String),
    /// The slot is no longer this node's (it will not come back).
    Stop(String),
}

impl Fence {
    fn check(&self) -> Hold {
        if let Some(why) = self.control.fenced() {
            return Hold::Wait(why);
        }
        let me = self.control.id();
        match self
            .control
            .reader()
            .with_state(|s| fenced_first_stage(s, &self.model, self.replica, me, self.generation))
        {
            Some(why) => Hold::Stop(why),
            None => Hold::Serve,
        }
    }

    /// Blocks (the answer's thread) until the next token may go out.
    fn hold(&self) -> Result<(), ServeError> {
        hold(|| self.check(), self.wait, Duration::from_millis(10))
    }
}

/// Waits while `check` says [`Hold::Wait`], polling every `poll`, at most
/// `wait`; an error (Unavailable: the router continues on another replica)
/// for a stop, or a wait that did not end.
fn hold(check: impl Fn() -> Hold, wait: Duration, poll: Duration) -> Result<(), ServeError> {
    let until = Instant::now() + wait;
    let mut logged = false;
    loop {
        match check() {
            Hold::Serve => return Ok(()),
            Hold::Stop(why) => {
                return Err(ServeError::Unavailable(format!(
                    "{why}: this node stopped mid-answer; continue on another replica"
                )));
            }
            Hold::Wait(why) if Instant::now() >= until => {
                return Err(ServeError::Unavailable(format!(
                    "{why}: its stages may have moved, so it stopped mid-answer; continue on another replica"
                )));
            }
            Hold::Wait(why) => {
                if !logged {
                    tracing::info!(reason = %why, "an answer waits for this node's lease");
                    logged = true;
                }
                std::thread::sleep(poll);
            }
        }
    }
}

/// One replica as this node runs it: its first stage here, the others on
/// their nodes, reached over `/trine/stage/1`.
struct Pipeline {
    first: Arc<crate::executor::Loaded>,
    model: String,
    replica: u32,
    rest: Vec<Hop>,
    mesh: Option<crate::mesh::Mesh>,
    /// Answers the stages held on this node (no dial to itself).
    local: crate::stage_server::StageServer,
    handle: tokio::runtime::Handle,
}

impl Pipeline {
    /// Runs `tokens` through every stage (the cache's length is their
    /// position); the last position's logits. Blocking.
    fn step(
        &self,
        session: &str,
        tokens: &[u32],
        cache: &mut trine_engine::model::KvCache,
    ) -> Result<Vec<f32>, ServeError> {
        let position = cache.len();
        let out = self
            .first
            .batcher
            .step_blocking(Owned::Tokens(tokens.to_vec()), cache, Logits::Last)
            .map_err(|e| match e {
                StepError::Gone => ServeError::Unavailable(format!(
                    "stage 0 of {} was unloaded mid-answer",
                    self.model
                )),
                StepError::Forward(e) => ServeError::Internal(e.to_string()),
            })?;
        let mut h = match out {
            Output::Logits(l) if self.rest.is_empty() => return Ok(l),
            Output::Hidden(h) if !self.rest.is_empty() => h,
            _ => {
                return Err(ServeError::Internal(format!(
                    "stage 0 of {} does not match its placement",
                    self.model
                )));
            }
        };
        let mesh = self.mesh.as_ref().ok_or_else(|| {
            ServeError::Unavailable("this node has no mesh to reach the other stages".into())
        })?;
        let width = self.first.model.config.hidden;
        for hop in &self.rest {
            let req = trine_proto::v1::StageRequest {
                request_id: session.to_owned(),
                model: self.model.clone(),
                stage: hop.stage,
                position: position as u64,
                tokens: (h.len() / width) as u32,
                width: width as u32,
                hidden: crate::stage_server::bytes(&h),
                replica: self.replica,
                generation: hop.generation,
                end: false,
            };
            // A decode step is one token: a peer that does not answer in a
            // few seconds is frozen or cut off (a prefill gets more time).
            let limit = STAGE_STEP_TIMEOUT + STAGE_TOKEN_TIME * req.tokens;
            let here = hop.peer == mesh.peer_id();
            let resp = self
                .handle
                .block_on(async {
                    if here {
                        return Ok(Ok(self.local.answer(&req).await));
                    }
                    tokio::time::timeout(limit, mesh.stage(hop.peer, &req)).await
                })
                .map_err(|_| {
                    ServeError::Unavailable(format!(
                        "stage {} on {} timed out",
                        hop.stage, hop.node
                    ))
                })?
                .map_err(|e| {
                    ServeError::Unavailable(format!("stage {} on {}: {e}", hop.stage, hop.node))
                })?;
            if resp.status() != trine_proto::v1::StageStatus::Ok {
                return Err(ServeError::Unavailable(format!(
                    "stage {} on {} answered {}: {}",
                    hop.stage,
                    hop.node,
                    crate::mesh::stage::status_name(resp.status()),
                    resp.message
                )));
            }
            h = crate::stage_server::floats(&resp.hidden);
        }
        Ok(h)
    }

    /// Lets the other stages drop the sequence's caches.
    fn end(&self, session: &str) {
        let Some(mesh) = self.mesh.clone() else {
            return;
        };
        for hop in &self.rest {
            let req = trine_proto::v1::StageRequest {
                request_id: session.to_owned(),
                model: self.model.clone(),
                stage: hop.stage,
                replica: self.replica,
                end: true,
                ..Default::default()
            };
            let (mesh, peer, local) = (mesh.clone(), hop.peer, self.local.clone());
            self.handle.spawn(async move {
                if peer == mesh.peer_id() {
                    local.answer(&req).await;
                } else {
                    let _ = mesh.stage(peer, &req).await;
                }
            });
        }
    }
}

/// One generation on this node's replica, streaming events to `tx`.
/// Blocking (runs on a compute thread).
fn generate_local(
    pipeline: &Pipeline,
    fence: &Fence,
    req: &v1::GenerateRequest,
    me: u64,
    max_prompt: usize,
    started: Instant,
    tx: &mpsc::Sender<Result<v1::GenerateResponse, ServeError>>,
) -> Result<(), ServeError> {
    let model = &pipeline.first.model;
    let tokenizer = &pipeline.first.tokenizer;
    let vocab = model.config.vocab;
    let prompt: Vec<u32> = match &req.input {
        Some(v1::generate_request::Input::Prompt(p)) => {
            if p.len() > max_prompt * 16 {
                return Err(ServeError::Invalid(format!(
                    "the prompt is {} bytes; this node's limit is {max_prompt} tokens (max_prompt_tokens); shorten the prompt",
                    p.len()
                )));
            }
            tokenizer.encode_prompt(p)
        }
        Some(v1::generate_request::Input::Chat(c)) => {
            if c.messages.is_empty() {
                return Err(ServeError::Invalid("the chat has no messages".into()));
            }
            let mut turns = Vec::with_capacity(c.messages.len());
            for m in &c.messages {
                if !["system", "user", "assistant"].contains(&m.role.as_str()) {
                    return Err(ServeError::Invalid(format!(
                        "chat role {:?}: use system, user or assistant",
                        m.role
                    )));
                }
                turns.push((m.role.as_str(), m.content.as_str()));
            }
            tokenizer
                .chat(&turns)
                .map_err(|e| ServeError::Invalid(e.to_string()))?
        }
        Some(v1::generate_request::Input::Tokens(t)) => {
            if let Some(bad) = t.ids.iter().find(|&&id| id as usize >= vocab) {
                return Err(ServeError::Invalid(format!(
                    "token id {bad} is outside the model's vocabulary of {vocab}"
                )));
            }
            t.ids.clone()
        }
        None => return Err(ServeError::Invalid("no input".into())),
    };
    if prompt.is_empty() {
        return Err(ServeError::Invalid("the input is empty".into()));
    }
    if prompt.len() > max_prompt {
        return Err(ServeError::Invalid(format!(
            "the prompt is {} tokens; this node's limit is {max_prompt} (max_prompt_tokens); shorten the prompt",
            prompt.len()
        )));
    }
    if let Some(bad) = req.continue_from.iter().find(|&&id| id as usize >= vocab) {
        return Err(ServeError::Invalid(format!(
            "continue_from token {bad} is outside the vocabulary"
        )));
    }
    let context = model.config.context;
    let total = prompt.len() + req.continue_from.len() + req.max_tokens as usize;
    if total > context {
        return Err(ServeError::Invalid(format!(
            "the prompt ({} tokens) plus max_tokens ({}) exceed the model's context of {context} tokens; shorten the prompt or lower max_tokens",
            prompt.len() + req.continue_from.len(),
            req.max_tokens
        )));
    }
    let mut sampler = Sampler::new(settings(req)?);
    // The draws the earlier node made for the tokens it generated.
    sampler.advance(req.continue_from.len());
    let mut history = prompt.clone();
    history.extend_from_slice(&req.continue_from);
    let mut cache = model.new_cache(total);
    // The other stages key this sequence's caches by it; unique per attempt.
    let session = format!("{}#{:x}", req.request_id, rand_id());
    let result = decode(
        pipeline, fence, req, &session, &prompt, history, &mut cache, sampler, me, started, tx,
    );
    pipeline.end(&session);
    result
}

/// The decode loop of [`generate_local`].
#[allow(clippy::too_many_arguments)]
fn decode(
    pipeline: &Pipeline,
    fence: &Fence,
    req: &v1::GenerateRequest,
    session: &str,
    prompt: &[u32],
    mut history: Vec<u32>,
    cache: &mut trine_engine::model::KvCache,
    mut sampler: Sampler,
    me: u64,
    started: Instant,
    tx: &mpsc::Sender<Result<v1::GenerateResponse, ServeError>>,
) -> Result<(), ServeError> {
    let tokenizer = &pipeline.first.tokenizer;
    let mut logits = pipeline.step(session, &history, cache)?;
    let mut text = StreamDecoder::default();
    // Re-feed the text of the continued tokens so multi-byte characters
    // and stop strings that straddle the failover come out right.
    for &t in &req.continue_from {
        let _ = text.push(&tokenizer.token_bytes(t));
    }
    let mut stops = StopMatcher {
        stops: req.stop.clone(),
        held: String::new(),
    };
    let mut finish = v1::FinishReason::Length;
    let mut generated = 0u32;
    let mut last = Instant::now();
    let mut first_token = None;
    let send = |ev: v1::generate_response::Event| {
        tx.blocking_send(Ok(v1::GenerateResponse {
            request_id: req.request_id.clone(),
            event: Some(ev),
        }))
        .is_ok()
    };
    let mut last_id = 0;
    while generated < req.max_tokens {
        let raw = logits.clone();
        let token = sampler.sample(&mut logits, &history);
        generated += 1;
        history.push(token);
        if tokenizer.stop.contains(&token) {
            finish = v1::FinishReason::Stop;
            break;
        }
        // Each token goes out only while this node may still serve the
        // slot: a lease that ran out mid-answer pauses it (an election),
        // a slot that moved ends it (the router continues elsewhere).
        fence.hold()?;
        let piece = text.push(&tokenizer.token_bytes(token));
        let (out, stopped) = stops.push(&piece);
        let now = Instant::now();
        first_token.get_or_insert(now - started);
        let index = req.continue_from.len() as u32 + generated - 1;
        let ok = send(v1::generate_response::Event::Token(v1::Token {
            id: token,
            text: out,
            index,
            logprob: logprob(&raw, token),
            since_start: Some(duration(now - started)),
            since_previous: Some(duration(now - last)),
        }));
        last = now;
        last_id = token;
        if !ok {
            // The client is gone.
            return Ok(());
        }
        if stopped {
            finish = v1::FinishReason::StopSequence;
            break;
        }
        if generated == req.max_tokens {
            break;
        }
        logits = pipeline.step(session, &[token], cache)?;
    }
    if finish != v1::FinishReason::StopSequence {
        let mut rest = text.finish();
        rest = stops.push(&rest).0 + &stops.finish();
        if !rest.is_empty() && generated > 0 {
            // Text held back at the end, carried by a repeat of the last
            // token's index.
            let now = Instant::now();
            send(v1::generate_response::Event::Token(v1::Token {
                id: last_id,
                text: rest,
                index: req.continue_from.len() as u32 + generated - 1,
                logprob: 0.0,
                since_start: Some(duration(now - started)),
                since_previous: Some(duration(now - last)),
            }));
        }
    }
    crate::metrics::generated(u64::from(generated));
    send(v1::generate_response::Event::Usage(v1::Usage {
        prompt_tokens: prompt.len() as u32,
        completion_tokens: generated,
        finish_reason: finish.into(),
        time_to_first_token: first_token.map(duration),
        serving_time_to_first_token: first_token.map(duration),
        total: Some(duration(started.elapsed())),
        path: vec![me],
        failovers: 0,
    }));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_answer_pauses_without_a_lease_and_stops_when_its_slot_moves() {
        use std::cell::Cell;
        let poll = Duration::from_millis(1);
        // The lease comes back on the third look: the token goes out.
        let looks = Cell::new(0);
        let back = || {
            looks.set(looks.get() + 1);
            if looks.get() < 3 {
                Hold::Wait("no lease".into())
            } else {
                Hold::Serve
            }
        };
        assert_eq!(hold(back, Duration::from_secs(10), poll), Ok(()));
        assert_eq!(looks.get(), 3);
        // It never comes back: refused once the wait is over, naming why.
        let e = hold(
            || Hold::Wait("no lease for 9 s".into()),
            Duration::from_millis(20),
            poll,
        )
        .expect_err("the wait ends");
        assert!(
            matches!(&e, ServeError::Unavailable(m) if m.contains("no lease for 9 s") && m.contains("mid-answer")),
            "{e:?}"
        );
        // The slot moved: no wait at all.
        let looks = Cell::new(0);
        let moved = || {
            looks.set(looks.get() + 1);
            Hold::Stop("moved to node 7".into())
        };
        let e = hold(moved, Duration::from_secs(10), poll).expect_err("stopped");
        assert!(
            matches!(&e, ServeError::Unavailable(m) if m.contains("moved to node 7")),
            "{e:?}"
        );
        assert_eq!(looks.get(), 1);
    }

    #[test]
    fn stop_strings_hold_back_prefixes_and_cut_at_the_match() {
        let mut s = StopMatcher {
            stops: vec!["\n\n".into(), "END".into()],
            held: String::new(),
        };
        assert_eq!(s.push("Hello"), ("Hello".into(), false));
        assert_eq!(s.push(" E"), (" ".into(), false), "E may start END");
        assert_eq!(s.push("N"), (String::new(), false));
        assert_eq!(s.push("Dless"), (String::new(), true), "END matched");
        let mut s = StopMatcher {
            stops: vec!["END".into()],
            held: String::new(),
        };
        assert_eq!(s.push("EN"), (String::new(), false));
        assert_eq!(s.push("tity"), ("ENtity".into(), false));
        assert_eq!(s.push("E"), (String::new(), false));
        assert_eq!(s.finish(), "E");
        let mut s = StopMatcher {
            stops: vec!["é!".into()],
            held: String::new(),
        };
        assert_eq!(s.push("café"), ("caf".into(), false));
        assert_eq!(s.push("!x"), (String::new(), true));
    }

    #[test]
    fn quotas_refill_over_time_and_count_running_requests() {
        let t = trine_control::TokenRecord {
            name: "ci".into(),
            sha256: "a".repeat(64),
            requests_per_minute: 2,
            tokens_per_minute: 100,
            concurrency: 0,
            created_ms: 0,
            scope: trine_control::Scope::Inference,
            expires_ms: 0,
        };
        let q = Quotas::default();
        let t0 = Instant::now();
        q.admit(&t, t0).expect("first");
        q.admit(&t, t0).expect("second");
        let e = q.admit(&t, t0).expect_err("over 2/min");
        assert!(
            e.to_string().contains("2 requests per minute") && e.http_status() == 429,
            "{e}"
        );
        // Half a minute refills one request.
        q.admit(&t, t0 + Duration::from_secs(30)).expect("refilled");
        // Tokens: spend more than the minute's budget, then wait it back.
        let a = Admission {
            quotas: Some((Arc::new(Quotas::default()), "ci".into())),
        };
        drop(a);
        let quotas = Arc::new(Quotas::default());
        quotas.admit(&t, t0).expect("in");
        let a = Admission {
            quotas: Some((quotas.clone(), "ci".into())),
        };
        a.charge(150);
        drop(a);
        let e = quotas.admit(&t, t0).expect_err("tokens spent");
        assert!(e.to_string().contains("tokens per minute"), "{e}");
        quotas
            .admit(&t, t0 + Duration::from_secs(60))
            .expect("a minute later");
        // Concurrency: the slot is held until the admission drops.
        let c = trine_control::TokenRecord {
            concurrency: 1,
            requests_per_minute: 0,
            tokens_per_minute: 0,
            ..t
        };
        let quotas = Arc::new(Quotas::default());
        quotas.admit(&c, t0).expect("one");
        let held = Admission {
            quotas: Some((quotas.clone(), "ci".into())),
        };
        assert!(quotas.admit(&c, t0).is_err(), "a second while one runs");
        drop(held);
        quotas.admit(&c, t0).expect("after the first ended");
    }

    #[test]
    fn logprobs_are_log_softmax() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|x| f64::from(*x).exp()).sum();
        for (i, x) in l.iter().enumerate() {
            let want = (f64::from(*x).exp() / z).ln() as f32;
            assert!((logprob(&l, i as u32) - want).abs() < 1e-5);
        }
        assert_eq!(logprob(&l, 9), f32::NEG_INFINITY);
    }

    #[test]
    fn errors_map_to_grpc_and_http() {
        let e = ServeError::Busy("x".into());
        assert_eq!(e.http_status(), 429);
        assert_eq!(e.status().code(), tonic::Code::ResourceExhausted);
        assert_eq!(ServeError::from_status(&e.status()), e);
        assert!(e.retryable());
        assert!(!ServeError::Invalid("x".into()).retryable());
        let d = ServeError::Deadline("late".into());
        assert_eq!(d.http_status(), 504);
        assert_eq!(d.status().code(), tonic::Code::DeadlineExceeded);
        assert_eq!(ServeError::from_status(&d.status()), d);
        assert!(!d.retryable(), "a request past its deadline is not retried");
        // INTERNAL from the node is its answer; from our own transport (a
        // protocol or TLS mismatch, with the error as its source) it is a
        // failed connection, worth another replica.
        let answered = tonic::Status::internal("h2 protocol error");
        assert!(!ServeError::from_status(&answered).retryable());
        let transport =
            tonic::Status::from_error(Box::new(h2::Error::from(h2::Reason::PROTOCOL_ERROR)));
        assert_eq!(transport.code(), tonic::Code::Internal);
        let e = ServeError::from_status(&transport);
        assert!(e.retryable(), "{e:?}");
        assert!(
            e.to_string().contains("connection to the node failed"),
            "{e}"
        );
    }

    fn node(id: u64) -> NodeRecord {
        NodeRecord {
            id,
            name: format!("n{id}"),
            region: String::new(),
            zone: String::new(),
            raft_addr: String::new(),
            grpc_addr: String::new(),
            http_addr: String::new(),
            api_tls: false,
            peer_id: format!("peer{id}"),
            p2p_addrs: Vec::new(),
            cpu_cores: 1,
            simd: String::new(),
            memory_bytes: 0,
            version: String::new(),
            status: NodeStatus::Up,
            status_since_ms: 0,
        }
    }

    fn ids(v: &[NodeRecord]) -> Vec<u64> {
        v.iter().map(|n| n.id).collect()
    }

    /// The router prefers the nearest replica by measured RTT, lets a
    /// queue outweigh distance, and puts unmeasured and unconnected peers
    /// behind measured ones; this node counts only its own queue.
    #[test]
    fn replicas_are_ranked_by_rtt_and_queue_depth() {
        let ms = Duration::from_millis;
        let seen = |rtt: u64, queue: u32| Seen {
            rtt: Some(ms(rtt)),
            queue_depth: Some(queue),
            connected: true,
        };
        // Candidates in candidates_for's order: 2, 3, 4, 5.
        let nodes = || vec![node(2), node(3), node(4), node(5)];
        let mut m = HashMap::new();
        m.insert("peer2".to_owned(), seen(150, 0));
        m.insert("peer3".to_owned(), seen(80, 0));
        m.insert("peer4".to_owned(), seen(2, 0));
        // Connected, not yet pinged: 1 s.
        m.insert(
            "peer5".to_owned(),
            Seen {
                connected: true,
                ..Seen::default()
            },
        );
        assert_eq!(
            ids(&rank(nodes(), 1, 0, &m)),
            [4, 3, 2, 5],
            "by RTT; 5 unmeasured last"
        );
        // Three requests waiting at the nearest (300 ms) outweigh 80 ms.
        m.insert("peer4".to_owned(), seen(2, 3));
        assert_eq!(ids(&rank(nodes(), 1, 0, &m)), [3, 2, 4, 5]);
        // A peer the mesh has lost goes behind an unmeasured one.
        m.insert(
            "peer3".to_owned(),
            Seen {
                connected: false,
                ..seen(80, 0)
            },
        );
        assert_eq!(ids(&rank(nodes(), 1, 0, &m)), [2, 4, 5, 3]);
        // This node (id 2 here) costs only its own queue.
        assert_eq!(ids(&rank(nodes(), 2, 0, &m))[0], 2);
        assert_eq!(
            ids(&rank(nodes(), 2, 5, &m))[0],
            4,
            "own queue of 5 (500 ms)"
        );
    }

    /// A node serves the first stage it loaded only while the placement
    /// still gives it that slot, at that generation, ready, and it is up
    /// (chaos seed 72: a drained node that came back served a stage that
    /// had moved away while it was gone).
    #[test]
    fn a_loaded_first_stage_serves_only_while_the_placement_holds_it() {
        let mut state = State::default();
        for id in [1, 2] {
            state.nodes.insert(id, node(id));
        }
        let place = |node, generation, st| trine_control::Placement {
            model: "m".into(),
            replica: 0,
            stage: 0,
            layer_start: 0,
            layer_end: 2,
            node,
            generation,
            since_ms: 0,
            state: st,
            detail: String::new(),
            failed_on: Vec::new(),
        };
        let slot = ("m".to_owned(), 0, 0);
        state
            .placements
            .insert(slot.clone(), place(1, 7, StageState::Ready));
        assert_eq!(fenced_first_stage(&state, "m", 0, 1, 7), None);
        // Another replica, or a generation this node did not load.
        assert!(fenced_first_stage(&state, "m", 1, 1, 7).is_some());
        let older = fenced_first_stage(&state, "m", 0, 1, 6).expect("an old copy");
        assert!(older.contains("generation 7"), "{older}");
        // Moved to node 2 (a new generation there).
        state
            .placements
            .insert(slot.clone(), place(2, 8, StageState::Ready));
        let moved = fenced_first_stage(&state, "m", 0, 1, 7).expect("moved away");
        assert!(moved.contains("moved to node 2"), "{moved}");
        assert_eq!(fenced_first_stage(&state, "m", 0, 2, 8), None);
        // Back on node 1 under a new generation, still loading.
        state
            .placements
            .insert(slot.clone(), place(1, 9, StageState::Loading));
        assert!(fenced_first_stage(&state, "m", 0, 1, 9).is_some());
        state
            .placements
            .insert(slot, place(1, 9, StageState::Ready));
        assert_eq!(fenced_first_stage(&state, "m", 0, 1, 9), None);
        // Its own node drained or down: fenced, slot or not.
        for status in [NodeStatus::Draining, NodeStatus::Down] {
            state.nodes.get_mut(&1).expect("node 1").status = status;
            let why = fenced_first_stage(&state, "m", 0, 1, 9).expect("not up");
            assert!(why.contains("not up"), "{why}");
        }
        state.nodes.remove(&1);
        assert!(fenced_first_stage(&state, "m", 0, 1, 9).is_some());
    }
}
