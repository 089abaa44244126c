//! The far end of a pipeline: answers `/trine/stage/1` requests for the
//! stages this node holds. A sequence's keys and values stay here between
//! steps (one KV cache per request, stage and replica), so each decode step
//! sends one token's hidden state, not the history. A request must continue
//! its sequence exactly (its position is the cache's length, or 0 to start
//! one); the placement generation fences a stage that moved. Caches are
//! bounded: at most [`MAX_SESSIONS`], the least recently used evicted (its
//! next step is refused with the reason) and dropped when the sender ends
//! the sequence.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::mpsc;
use trine_engine::model::{KvCache, Logits, Output};
use trine_proto::v1::{StageRequest, StageResponse, StageStatus};

use crate::batcher::{Active, Owned, StepError};
use crate::executor::Stages;
use crate::mesh::InboundStage;

/// Sequences whose caches a node keeps at once.
pub const MAX_SESSIONS: usize = 32;

type Key = (String, String, u32, u32);

struct Session {
    cache: KvCache,
    generation: u64,
    used: Instant,
    /// Counts the sequence on the stage's batcher while it lives.
    _active: Active,
}

fn reply(req: &StageRequest, status: StageStatus, message: String) -> StageResponse {
    StageResponse {
        request_id: req.request_id.clone(),
        status: status.into(),
        message,
        ..Default::default()
    }
}

pub fn floats(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The later stages this node holds and their sequences' caches: what
/// answers `/trine/stage/1` from peers, and, in-process, a pipeline whose
/// next stage is on this very node (a node cannot dial itself).
#[derive(Clone, Default)]
pub struct StageServer {
    stages: Stages,
    sessions: Arc<Mutex<HashMap<Key, Session>>>,
}

impl std::fmt::Debug for StageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageServer").finish_non_exhaustive()
    }
}

impl StageServer {
    pub fn new(stages: Stages) -> Self {
        Self {
            stages,
            sessions: Arc::default(),
        }
    }

    /// The stages this node holds.
    pub fn stages(&self) -> &Stages {
        &self.stages
    }

    /// Answers one stage request.
    pub async fn answer(&self, req: &StageRequest) -> StageResponse {
        answer(req, &self.stages, &self.sessions).await
    }
}

/// Answers stage requests until the mesh stops.
pub async fn run(mut requests: mpsc::Receiver<InboundStage>, server: StageServer) {
    while let Some(r) = requests.recv().await {
        let server = server.clone();
        tokio::spawn(async move {
            let response = server.answer(&r.request).await;
            let _ = r.reply.send(response);
        });
    }
}

async fn answer(
    req: &StageRequest,
    stages: &Stages,
    sessions: &Arc<Mutex<HashMap<Key, Session>>>,
) -> StageResponse {
    let key: Key = (
        req.request_id.clone(),
        req.model.clone(),
        req.replica,
        req.stage,
    );
    if req.end {
        if let Ok(mut s) = sessions.lock() {
            s.remove(&key);
        }
        return reply(req, StageStatus::Ok, String::new());
    }
    let slot = (req.model.clone(), req.replica, req.stage);
    let Some(loaded) = stages.get(&slot) else {
        return reply(
            req,
            StageStatus::NotServed,
            format!(
                "this node holds no ready stage {} of replica {} of model {:?}",
                req.stage, req.replica, req.model
            ),
        );
    };
    if req.generation != 0 && req.generation != loaded.generation {
        return reply(
            req,
            StageStatus::NotServed,
            format!(
                "stage {} of replica {} is at generation {} here, not {}",
                req.stage, req.replica, loaded.generation, req.generation
            ),
        );
    }
    let c = &loaded.model.config;
    if req.width as usize != c.hidden || loaded.model.range.start == 0 {
        return reply(
            req,
            StageStatus::Invalid,
            format!(
                "this stage takes hidden states of width {} (it is stage {} of layers {:?})",
                c.hidden, req.stage, loaded.model.range
            ),
        );
    }
    let position = req.position as usize;
    // Take the sequence's cache out while computing (a concurrent step of
    // the same sequence is refused below).
    let session = {
        let Ok(mut s) = sessions.lock() else {
            return reply(req, StageStatus::Busy, "session table poisoned".into());
        };
        match s.remove(&key) {
            Some(sess) if position != 0 => sess,
            _ if position == 0 => {
                if s.len() >= MAX_SESSIONS
                    && let Some(oldest) =
                        s.iter().min_by_key(|(_, v)| v.used).map(|(k, _)| k.clone())
                {
                    s.remove(&oldest);
                    tracing::info!(request_id = %oldest.0, "stage cache evicted (least recently used)");
                }
                Session {
                    cache: loaded.model.new_cache(c.context),
                    generation: loaded.generation,
                    used: Instant::now(),
                    _active: loaded.batcher.join(),
                }
            }
            _ => {
                return reply(
                    req,
                    StageStatus::Invalid,
                    format!(
                        "no sequence {} here at position {position}: its cache was evicted or never started; start again at position 0",
                        req.request_id
                    ),
                );
            }
        }
    };
    if session.cache.len() != position || session.generation != loaded.generation {
        return reply(
            req,
            StageStatus::Invalid,
            format!(
                "sequence {} is at position {} here, not {position}",
                req.request_id,
                session.cache.len()
            ),
        );
    }
    if position + req.tokens as usize > session.cache.capacity() {
        return reply(
            req,
            StageStatus::Invalid,
            format!(
                "position {position} + {} tokens exceed the context",
                req.tokens
            ),
        );
    }
    let hidden = floats(&req.hidden);
    let mut session = session;
    let out = match loaded
        .batcher
        .step(Owned::Hidden(hidden), &mut session.cache, Logits::Last)
        .await
    {
        Ok(o) => o,
        Err(StepError::Gone) => {
            return reply(
                req,
                StageStatus::NotServed,
                "the stage was unloaded mid-step".into(),
            );
        }
        Err(StepError::Forward(e)) => return reply(req, StageStatus::Invalid, e.to_string()),
    };
    session.used = Instant::now();
    if let Ok(mut s) = sessions.lock() {
        s.insert(key, session);
    }
    let (tokens, width, values) = match out {
        Output::Hidden(h) => (h.len() / c.hidden, c.hidden, h),
        Output::Logits(l) => (1, c.vocab, l),
    };
    StageResponse {
        request_id: req.request_id.clone(),
        status: StageStatus::Ok.into(),
        message: String::new(),
        tokens: tokens as u32,
        width: width as u32,
        hidden: bytes(&values),
    }
}
