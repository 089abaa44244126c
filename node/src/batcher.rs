//! Continuous batching. Each stage a node holds has one batcher: a thread
//! that takes the steps of every sequence running on that stage (local
//! generations and pipeline requests from peers alike) and runs them as one
//! [`Model::forward_batch`], so concurrent sequences share each weight read
//! (one GEMM per projection, not one GEMV per sequence). A sequence joins
//! or leaves between steps: whoever is waiting when a step starts is in it.
//!
//! After taking the first waiting step, the batcher waits a little
//! ([`GATHER`]) for the other active sequences' next steps (each samples
//! its token between steps), but never for more than are active, and never
//! once the batch is full ([`Batching::max_batch`] sequences or
//! [`MAX_BATCH_TOKENS`] tokens; the rest go in the next step).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use trine_engine::model::{ForwardError, Input, KvCache, Logits, Model, Output, Step};

/// Longest wait for other active sequences to join a step.
pub const GATHER: Duration = Duration::from_millis(2);
/// Most tokens in one batched step (a long prompt's prefill fills it alone).
pub const MAX_BATCH_TOKENS: usize = 4096;

/// How a node batches.
#[derive(Debug, Clone)]
pub struct Batching {
    pub pool: Arc<rayon::ThreadPool>,
    /// Most sequences in one step; 1 turns batching off.
    pub max_batch: usize,
    /// The lm_head precision of the last stages this node loads.
    pub quant_embd: trine_engine::model::QuantEmbd,
    /// How the stages this node loads pack their ternary weights.
    pub weight_layout: trine_engine::model::WeightLayout,
    /// One ternary kernel for every stage, or `None`: the fastest per
    /// shape, measured at each stage load.
    pub kernel: Option<trine_engine::kernels::Kernel>,
}

/// A step's input, owned (it crosses to the batcher's thread).
#[derive(Debug)]
pub enum Owned {
    Tokens(Vec<u32>),
    Hidden(Vec<f32>),
}

impl Owned {
    fn input(&self) -> Input<'_> {
        match self {
            Owned::Tokens(t) => Input::Tokens(t),
            Owned::Hidden(h) => Input::Hidden(h),
        }
    }

    fn tokens(&self, hidden: usize) -> usize {
        match self {
            Owned::Tokens(t) => t.len(),
            Owned::Hidden(h) => h.len() / hidden.max(1),
        }
    }
}

/// A step's result, with the cache it ran on.
type Answer = (Result<Output, ForwardError>, KvCache);

struct Job {
    input: Owned,
    cache: KvCache,
    logits: Logits,
    reply: oneshot::Sender<Answer>,
}

/// Why a step did not run.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Forward(#[from] ForwardError),
    #[error("the stage was unloaded while the step waited")]
    Gone,
}

/// The handle every user of one stage shares; the thread ends when the
/// last handle is dropped.
#[derive(Debug)]
pub struct Batcher {
    jobs: mpsc::Sender<Job>,
    active: Arc<AtomicUsize>,
}

/// A sequence counted as active on a batcher while it lives: the batcher
/// waits (briefly) for the next step of every active sequence.
#[derive(Debug)]
pub struct Active(Arc<AtomicUsize>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Batcher {
    /// Starts the batching thread for `model`.
    pub fn start(model: Arc<Model>, name: String, batching: Batching) -> std::io::Result<Self> {
        let (jobs, rx) = mpsc::channel();
        let active = Arc::new(AtomicUsize::new(0));
        let counted = active.clone();
        std::thread::Builder::new()
            .name(name)
            .spawn(move || run(&model, &rx, &counted, &batching))?;
        Ok(Self { jobs, active })
    }

    /// Counts a sequence as active until the guard drops.
    pub fn join(&self) -> Active {
        self.active.fetch_add(1, Ordering::AcqRel);
        Active(self.active.clone())
    }

    /// Submits a step; the answer comes back with the cache.
    fn submit(
        &self,
        input: Owned,
        cache: KvCache,
        logits: Logits,
    ) -> Result<oneshot::Receiver<Answer>, StepError> {
        let (reply, rx) = oneshot::channel();
        self.jobs
            .send(Job {
                input,
                cache,
                logits,
                reply,
            })
            .map_err(|_| StepError::Gone)?;
        Ok(rx)
    }

    /// Runs a step from a blocking thread. `cache` is moved to the batcher
    /// and back; if the stage disappears meanwhile it is left empty.
    pub fn step_blocking(
        &self,
        input: Owned,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Output, StepError> {
        let rx = self.submit(input, std::mem::take(cache), logits)?;
        let (out, back) = rx.blocking_recv().map_err(|_| StepError::Gone)?;
        *cache = back;
        Ok(out?)
    }

    /// Runs a step from async code.
    pub async fn step(
        &self,
        input: Owned,
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Output, StepError> {
        let rx = self.submit(input, std::mem::take(cache), logits)?;
        let (out, back) = rx.await.map_err(|_| StepError::Gone)?;
        *cache = back;
        Ok(out?)
    }
}

fn run(model: &Model, rx: &mpsc::Receiver<Job>, active: &AtomicUsize, b: &Batching) {
    let hidden = model.config.hidden;
    let max = b.max_batch.max(1);
    let mut carried: Option<Job> = None;
    loop {
        let first = match carried.take() {
            Some(j) => j,
            None => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
        };
        let mut tokens = first.input.tokens(hidden);
        let mut jobs = vec![first];
        let deadline = Instant::now() + GATHER;
        while jobs.len() < max && tokens < MAX_BATCH_TOKENS {
            let next = match rx.try_recv() {
                Ok(j) => Some(j),
                Err(mpsc::TryRecvError::Disconnected) => None,
                Err(mpsc::TryRecvError::Empty) => {
                    let now = Instant::now();
                    if jobs.len() >= active.load(Ordering::Acquire) || now >= deadline {
                        None
                    } else {
                        rx.recv_timeout(deadline - now).ok()
                    }
                }
            };
            let Some(j) = next else { break };
            let t = j.input.tokens(hidden);
            if tokens + t > MAX_BATCH_TOKENS {
                carried = Some(j);
                break;
            }
            tokens += t;
            jobs.push(j);
        }
        crate::metrics::batch(jobs.len(), tokens);
        if jobs.len() > 1 {
            BATCHED.fetch_add(1, Ordering::Relaxed);
        }
        let mut caches: Vec<KvCache> = jobs
            .iter_mut()
            .map(|j| std::mem::take(&mut j.cache))
            .collect();
        let results = {
            let mut steps: Vec<Step<'_>> = jobs
                .iter()
                .zip(caches.iter_mut())
                .map(|(j, cache)| Step {
                    input: j.input.input(),
                    cache,
                    logits: j.logits,
                })
                .collect();
            b.pool.install(|| model.forward_batch(&mut steps))
        };
        for ((job, cache), result) in jobs.into_iter().zip(caches).zip(results) {
            // A requester that gave up drops its receiver; nothing to do.
            let _ = job.reply.send((result, cache));
        }
    }
}

/// Steps this process ran with more than one sequence (what the tests
/// check; the histogram holds the same for operators).
pub static BATCHED: AtomicUsize = AtomicUsize::new(0);

#[cfg(test)]
mod tests {
    use super::*;
    use trine_engine::synth::{Preset, TernaryType, Weights};

    fn model() -> (tempfile::TempDir, Arc<Model>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        let w = Weights::generate(Preset::Tiny, 4);
        w.to_gguf(TernaryType::I2S).unwrap().write(&path).unwrap();
        let m = Model::open(&path).unwrap();
        (dir, Arc::new(m))
    }

    fn batching(max_batch: usize) -> Batching {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        Batching {
            pool: Arc::new(pool),
            max_batch,
            quant_embd: Default::default(),
            weight_layout: Default::default(),
            kernel: None,
        }
    }

    /// Greedy decode of `prompt` for `n` tokens through the batcher.
    fn decode(b: &Batcher, model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
        let _active = b.join();
        let mut cache = model.new_cache(64);
        let mut input = Owned::Tokens(prompt.to_vec());
        let mut out = Vec::new();
        for _ in 0..n {
            let Output::Logits(l) = b.step_blocking(input, &mut cache, Logits::Last).unwrap()
            else {
                panic!("a whole model returns logits")
            };
            let t = l
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0 as u32;
            out.push(t);
            input = Owned::Tokens(vec![t]);
        }
        out
    }

    /// Eight sequences decoding at once through one batcher produce what
    /// each produces alone, and their steps really were batched (the batch
    /// size histogram saw batches of more than one).
    #[test]
    fn concurrent_sequences_share_steps_and_answer_as_alone() {
        let (_dir, model) = model();
        let prompts: Vec<Vec<u32>> = (0..8u32).map(|i| vec![1 + i, 40 + 3 * i, 7]).collect();
        let alone: Vec<Vec<u32>> = {
            let b = Batcher::start(model.clone(), "t".into(), batching(1)).unwrap();
            prompts.iter().map(|p| decode(&b, &model, p, 12)).collect()
        };
        let b = Arc::new(Batcher::start(model.clone(), "t".into(), batching(32)).unwrap());
        let before = BATCHED.load(Ordering::Relaxed);
        let together: Vec<Vec<u32>> = std::thread::scope(|s| {
            let handles: Vec<_> = prompts
                .iter()
                .map(|p| {
                    let (b, model) = (b.clone(), model.clone());
                    s.spawn(move || decode(&b, &model, p, 12))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(together, alone);
        assert!(
            BATCHED.load(Ordering::Relaxed) > before,
            "no step ran more than one sequence"
        );
    }

    /// A bad step fails alone; its cache comes back unchanged.
    #[test]
    fn a_bad_step_fails_alone() {
        let (_dir, model) = model();
        let b = Batcher::start(model.clone(), "t".into(), batching(8)).unwrap();
        let mut cache = model.new_cache(4);
        let e = b
            .step_blocking(Owned::Tokens(vec![1, 100_000]), &mut cache, Logits::Last)
            .unwrap_err();
        assert!(
            matches!(e, StepError::Forward(ForwardError::BadToken { .. })),
            "{e}"
        );
        assert_eq!(cache.capacity(), 4, "the cache came back");
        b.step_blocking(Owned::Tokens(vec![1, 2]), &mut cache, Logits::Last)
            .unwrap();
        assert_eq!(cache.len(), 2);
    }
}
