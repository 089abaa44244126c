//! The placement executor: each node watches its replica of the state
//! machine and loads the stages assigned to it (checking the model's
//! SHA-256 first), drops the ones taken away, and reports every step as a
//! fenced `StageReport` on the chain, so `trine placement` shows
//! assigned → loading → ready (or failed, with the reason). A model file
//! missing here is found or fetched by [`crate::model_store`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use trine_control::command::SlotKey;
use trine_control::{Command, ControlPlane, Placement, StageState, State};

use crate::model_store::{Found, Store};

/// How often the node looks at its assignments when nothing is applied.
const EVERY: Duration = Duration::from_millis(500);
/// A failed load is tried again after this long (the file may appear).
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// A stage this node holds, ready to serve.
#[derive(Debug)]
pub struct Loaded {
    pub generation: u64,
    pub model: Arc<trine_engine::model::Model>,
    pub tokenizer: Arc<trine_engine::tokenizer::Tokenizer>,
    /// Runs every step on this stage, batching concurrent sequences.
    pub batcher: crate::batcher::Batcher,
}

/// The stages this node serves, by slot (what the serving path reads).
#[derive(Debug, Clone, Default)]
pub struct Stages(Arc<Mutex<BTreeMap<SlotKey, Arc<Loaded>>>>);

impl Stages {
    pub fn get(&self, slot: &SlotKey) -> Option<Arc<Loaded>> {
        self.0.lock().ok()?.get(slot).cloned()
    }

    /// Holds `loaded` in `slot` (replacing what was there), as a finished
    /// load does.
    #[cfg(test)]
    pub(crate) fn insert(&self, slot: SlotKey, loaded: Loaded) {
        if let Ok(mut held) = self.0.lock() {
            held.insert(slot, Arc::new(loaded));
        }
    }

    /// The slots held here.
    pub fn slots(&self) -> Vec<SlotKey> {
        self.0
            .lock()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }
}

/// What the loop knows beyond the state: loads in flight, failures.
#[derive(Debug, Default)]
struct Attempts {
    /// slot → generation being loaded.
    loading: BTreeMap<SlotKey, u64>,
    /// slot → (generation, when it failed).
    failed: BTreeMap<SlotKey, (u64, Instant)>,
}

/// Runs until `stop` turns true.
pub async fn run(
    control: ControlPlane,
    stages: Stages,
    store: Arc<Store>,
    batching: crate::batcher::Batching,
    mut stop: watch::Receiver<bool>,
) {
    let me = control.id();
    let attempts = Arc::new(Mutex::new(Attempts::default()));
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<Done>(16);
    let mut published = BTreeMap::new();
    // Woken by every applied entry (a placement can change), and at least
    // every EVERY (a failed load's retry).
    let mut metrics = control.raft().metrics();
    let mut seen = None;
    loop {
        let done = tokio::select! {
            () = tokio::time::sleep(EVERY) => None,
            Ok(m) = metrics.wait_for(|m| m.last_applied != seen) => {
                seen = m.last_applied;
                None
            }
            Some(done) = done_rx.recv() => Some(done),
            _ = stop.wait_for(|s| *s) => return,
        };
        if let Some((slot, generation, result, took)) = done {
            let result = result.and_then(|(model, tokenizer, found)| {
                let model = Arc::new(model);
                let name = format!("trine-batch-{}", slot.2);
                crate::batcher::Batcher::start(model.clone(), name, batching.clone())
                    .map(|b| (model, tokenizer, found, b))
                    .map_err(|e| format!("cannot start the stage's batching thread: {e}"))
            });
            finish(&control, &stages, &attempts, slot, generation, result, took).await;
            continue;
        }
        let state = control.reader().state();
        let mine: BTreeMap<SlotKey, Placement> = state
            .placements
            .iter()
            .filter(|(_, p)| p.node == me)
            .map(|(k, p)| (k.clone(), p.clone()))
            .collect();
        publish(&state, me, &mut published);
        // Drop what is no longer ours (moved, undeployed, or re-placed
        // under a newer generation).
        if let Ok(mut held) = stages.0.lock() {
            held.retain(|slot, l| {
                let keep = mine.get(slot).is_some_and(|p| p.generation == l.generation);
                if !keep {
                    tracing::info!(model = %slot.0, replica = slot.1, stage = slot.2, "stage dropped");
                }
                keep
            });
        }
        for (slot, p) in mine {
            if stages
                .get(&slot)
                .is_some_and(|l| l.generation == p.generation)
            {
                continue;
            }
            {
                let Ok(mut a) = attempts.lock() else { continue };
                if a.loading.get(&slot) == Some(&p.generation) {
                    continue;
                }
                if let Some((g, at)) = a.failed.get(&slot)
                    && *g == p.generation
                    && at.elapsed() < RETRY_AFTER
                {
                    continue;
                }
                a.loading.insert(slot.clone(), p.generation);
            }
            let Some(model) = state.models.get(&p.model).cloned() else {
                continue;
            };
            report(
                &control,
                &p,
                StageState::Loading,
                format!("loading from {}", model.source),
            )
            .await;
            let (tx, store, slot) = (done_tx.clone(), store.clone(), slot.clone());
            let generation = p.generation;
            let range = p.layer_start as usize..p.layer_end as usize;
            let peers = crate::model_store::peers(&state, me, &model.sha256);
            let (quant_embd, layout, kernel, pool) = (
                batching.quant_embd,
                batching.weight_layout,
                batching.kernel,
                batching.pool.clone(),
            );
            tokio::task::spawn_blocking(move || {
                let t = Instant::now();
                let how = (quant_embd, layout, kernel);
                let result = load(&model, range, &store, &peers, how, &pool);
                let _ = tx.blocking_send((slot, generation, result, t.elapsed()));
            });
        }
    }
}

/// A finished load: slot, generation, result, time taken.
type Done = (SlotKey, u64, Result<Opened, String>, Duration);
type Opened = (
    trine_engine::model::Model,
    trine_engine::tokenizer::Tokenizer,
    Found,
);

/// Records a finished load (if the slot is still ours at that generation)
/// and reports it.
async fn finish(
    control: &ControlPlane,
    stages: &Stages,
    attempts: &Mutex<Attempts>,
    slot: SlotKey,
    generation: u64,
    result: Result<
        (
            Arc<trine_engine::model::Model>,
            trine_engine::tokenizer::Tokenizer,
            Found,
            crate::batcher::Batcher,
        ),
        String,
    >,
    took: Duration,
) {
    if let Ok(mut a) = attempts.lock() {
        a.loading.remove(&slot);
    }
    let state = control.reader().state();
    let Some(p) = state.placements.get(&slot).cloned() else {
        return;
    };
    if p.node != control.id() || p.generation != generation {
        // Moved while loading: the result is stale.
        return;
    }
    match result {
        Ok((model, tokenizer, found, batcher)) => {
            let loaded = Loaded {
                generation,
                model,
                tokenizer: Arc::new(tokenizer),
                batcher,
            };
            if let Ok(mut held) = stages.0.lock() {
                held.insert(slot.clone(), Arc::new(loaded));
            }
            let detail = match &found {
                Found::Local(path) => {
                    format!("loaded from {} in {} ms", path.display(), took.as_millis())
                }
                Found::Fetched {
                    from,
                    took: fetch,
                    bytes,
                    ..
                } => format!(
                    "fetched {:.1} MiB from {from} in {} ms; ready in {} ms",
                    *bytes as f64 / f64::from(1 << 20),
                    fetch.as_millis(),
                    took.as_millis()
                ),
            };
            tracing::info!(model = %slot.0, replica = slot.1, stage = slot.2, generation, took = ?took, %detail, "stage ready");
            report(control, &p, StageState::Ready, detail).await;
        }
        Err(e) => {
            if let Ok(mut a) = attempts.lock() {
                a.failed.insert(slot.clone(), (generation, Instant::now()));
            }
            tracing::warn!(model = %slot.0, replica = slot.1, stage = slot.2, error = %e, "stage failed to load; retrying in 30 s");
            report(control, &p, StageState::Failed, e).await;
        }
    }
}

/// Finds (or fetches) a verified copy of the model and opens the stage's
/// layers.
fn load(
    model: &trine_control::ModelRecord,
    range: std::ops::Range<usize>,
    store: &Store,
    peers: &[crate::model_store::Peer],
    (quant_embd, layout, kernel): (
        trine_engine::model::QuantEmbd,
        trine_engine::model::WeightLayout,
        Option<trine_engine::kernels::Kernel>,
    ),
    pool: &rayon::ThreadPool,
) -> Result<Opened, String> {
    let found = store.locate(model, peers)?;
    let (mut m, t) = trine_engine::open(found.path(), Some(range)).map_err(|e| e.to_string())?;
    m.set_lm_head(quant_embd);
    // Packed and measured in the pool the stage runs in, at its thread
    // count.
    let chosen = pool.install(|| m.choose(layout, kernel));
    let chosen: Vec<String> = chosen.iter().map(ToString::to_string).collect();
    let layouts: Vec<&str> = m.layouts().iter().map(|l| l.name()).collect();
    match kernel {
        Some(k) => tracing::info!(
            model = %model.name,
            layout = %layouts.join("+"),
            "ternary kernel {} (--kernel); weight layout {layout}{}",
            k.name(),
            if chosen.is_empty() { String::new() } else { format!(" by measurement: {}", chosen.join("; ")) }
        ),
        None => tracing::info!(
            model = %model.name,
            threads = pool.current_num_threads(),
            layout = %layouts.join("+"),
            "ternary kernels by measurement (weight layout {layout}): {}",
            chosen.join("; ")
        ),
    }
    Ok((m, t, found))
}

async fn report(control: &ControlPlane, p: &Placement, state: StageState, detail: String) {
    let command = Command::StageReport {
        model: p.model.clone(),
        replica: p.replica,
        stage: p.stage,
        node: p.node,
        generation: p.generation,
        state,
        detail,
    };
    match control.propose(&control.principal(), command).await {
        Ok(r) if r.rejected.is_some() => {
            tracing::debug!(reason = ?r.rejected, "stage report refused (the slot moved on)");
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot report a stage's state; will report the next change")
        }
    }
}

/// `trine_stage_assigned{model,stage}`: how many replicas of that stage
/// are placed on this node (series that drop to none go to 0).
fn publish(state: &State, me: u64, published: &mut BTreeMap<(String, u32), usize>) {
    let slots: usize = state
        .models
        .values()
        .map(|m| m.replicas as usize * m.stages as usize)
        .sum();
    let ready = state
        .placements
        .values()
        .filter(|p| {
            p.state == StageState::Ready
                && state
                    .nodes
                    .get(&p.node)
                    .is_some_and(|n| n.status == trine_control::NodeStatus::Up)
        })
        .count();
    crate::metrics::placement_unready(slots.saturating_sub(ready));
    let mut now: BTreeMap<(String, u32), usize> = BTreeMap::new();
    for p in state.placements.values().filter(|p| p.node == me) {
        *now.entry((p.model.clone(), p.stage)).or_default() += 1;
    }
    for key in published.keys() {
        if !now.contains_key(key) {
            crate::metrics::stage_assigned(&key.0, key.1, 0);
        }
    }
    for ((model, stage), n) in &now {
        crate::metrics::stage_assigned(model, *stage, *n);
    }
    *published = now;
}
