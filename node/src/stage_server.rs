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
    // Generations start at 1: a request without one (0) is refused too.
    if req.generation != loaded.generation {
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
    if session.generation != loaded.generation {
        return reply(
            req,
            StageStatus::Invalid,
            format!(
                "sequence {} began under generation {} here and the stage is now at generation {}; start again at position 0",
                req.request_id, session.generation, loaded.generation
            ),
        );
    }
    if session.cache.len() != position {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batcher::{Batcher, Batching};
    use crate::executor::Loaded;
    use trine_engine::synth::{Preset, TernaryType, Weights};

    /// A stage message for another placement generation than the one this
    /// node holds is refused NOT_SERVED (an old one replayed, a newer one
    /// this node never loaded, or none); once the slot is reloaded under a
    /// newer generation, a sequence begun under the old one does not go on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stage_message_for_another_generation_is_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("m.gguf");
        Weights::generate(Preset::Tiny, 4)
            .to_gguf(TernaryType::I2S)
            .expect("gguf")
            .write(&path)
            .expect("write");
        let layers = Preset::Tiny.config().layers;
        let pool = Arc::new(
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .expect("pool"),
        );
        let load = |generation| {
            let (model, tokenizer) = trine_engine::open(&path, Some(1..layers)).expect("open");
            let model = Arc::new(model);
            let batching = Batching {
                pool: pool.clone(),
                max_batch: 4,
                quant_embd: Default::default(),
                weight_layout: Default::default(),
                kernel: None,
            };
            Loaded {
                generation,
                model: model.clone(),
                tokenizer: Arc::new(tokenizer),
                batcher: Batcher::start(model, "m/0/1".into(), batching).expect("batcher"),
            }
        };
        let stages = Stages::default();
        let slot = ("m".to_owned(), 0, 1);
        stages.insert(slot.clone(), load(5));
        let server = StageServer::new(stages.clone());
        let hidden = Preset::Tiny.config().hidden;
        let step = |generation, position| StageRequest {
            request_id: "r1".into(),
            model: "m".into(),
            stage: 1,
            position,
            tokens: 1,
            width: hidden as u32,
            hidden: bytes(&vec![0.25; hidden]),
            replica: 0,
            generation,
            end: false,
        };
        let status = |r: &StageResponse| r.status();
        for (generation, why) in [
            (4, "generation 5 here, not 4"),
            (6, "generation 5 here, not 6"),
            (0, "generation 5 here, not 0"),
        ] {
            let r = server.answer(&step(generation, 0)).await;
            assert_eq!(status(&r), StageStatus::NotServed, "{r:?}");
            assert!(r.message.contains(why), "{}", r.message);
        }
        // The generation it holds is served.
        let r = server.answer(&step(5, 0)).await;
        assert_eq!(status(&r), StageStatus::Ok, "{}", r.message);
        assert_eq!(r.tokens, 1);
        // The slot moves away and comes back under generation 6: the
        // sequence's next step under 5 is refused, and under 6 it does not
        // continue the cache begun under 5.
        stages.insert(slot, load(6));
        let r = server.answer(&step(5, 1)).await;
        assert_eq!(status(&r), StageStatus::NotServed, "{r:?}");
        assert!(
            r.message.contains("generation 6 here, not 5"),
            "{}",
            r.message
        );
        let r = server.answer(&step(6, 1)).await;
        assert_eq!(status(&r), StageStatus::Invalid, "{r:?}");
        assert!(
            r.message.contains("began under generation 5"),
            "{}",
            r.message
        );
        // A new sequence under 6 is served.
        let r = server.answer(&step(6, 0)).await;
        assert_eq!(status(&r), StageStatus::Ok, "{}", r.message);
    }
}
