//! `trine generate`: load a model, stream a completion to stdout, then
//! report prefill and decode speed on stderr.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use trine_engine::sampler::{Sampler, Settings};

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A GGUF model file or a Hugging Face model directory (`trine model
    /// synth` makes either).
    #[arg(long, short = 'm', value_name = "PATH")]
    pub model: PathBuf,
    /// The prompt.
    pub prompt: String,
    /// Wrap the prompt as one user turn of the model's chat format.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities add up to p (1: all).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0: none).
    #[arg(long, default_value_t = 0.0)]
    pub min_p: f32,
    /// Divide the logits of tokens seen in the last 64 by this (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed for sampling; the same seed gives the same text.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Worker threads for the matrix products [default: one per physical
    /// core this process may use]. The output does not depend on it.
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// Ternary kernel: scalar, avx2, avx-vnni, avx512, avx512-vnni [default:
    /// the fastest per weight shape, measured at load with --threads]. The
    /// output does not depend on it; this is for comparing speeds.
    #[arg(long)]
    pub kernel: Option<String>,
    /// lm_head precision: `file` (as stored, F16 in official files), `q8`
    /// (quantized to Q8_0 at load: about half the bytes per token, a small
    /// logit error) or `q4` (Q4_0: about a quarter, a larger error);
    /// BENCHMARKS.md measures both.
    #[arg(long, default_value = "file", value_name = "file|q8|q4")]
    pub quant_embd: trine_engine::model::QuantEmbd,
    /// How the ternary weights are packed: `i2s` (2 bits a weight, as I2_S
    /// files store them), `base3` (five trits a byte, 1.6 bits, repacked at
    /// load) or `auto` (per weight shape, whichever multiplies faster here,
    /// measured at load). The output does not depend on it.
    #[arg(long, default_value = "i2s", value_name = "i2s|base3|auto")]
    pub weight_layout: trine_engine::model::WeightLayout,
    /// AMX-INT8 tiles for the prompt where the CPU has them: `auto` or
    /// `off`. The output does not depend on it; this is for comparing
    /// speeds.
    #[arg(long, value_enum, default_value_t = crate::compute::Amx::Auto)]
    pub amx: crate::compute::Amx,
}

/// The kernel called `name`, if this CPU runs it.
pub fn kernel(name: &str) -> anyhow::Result<trine_engine::kernels::Kernel> {
    let available = trine_engine::kernels::Kernel::available();
    available
        .iter()
        .copied()
        .find(|k| k.name() == name)
        .ok_or_else(|| {
            let names: Vec<&str> = available.iter().map(|k| k.name()).collect();
            anyhow::anyhow!(
                "--kernel {name}: this CPU runs {}; choose one of those",
                names.join(", ")
            )
        })
}

/// The kernels a model runs, named once each: "avx2", or "avx2 +
/// avx512-vnni" when the measured choice differs per shape.
fn kernels_used(model: &trine_engine::model::Model) -> String {
    let mut names: Vec<&str> = model.by_shape.iter().map(|c| c.kernel.name()).collect();
    if names.is_empty() {
        names.push(model.kernel.name());
    }
    names.sort_unstable();
    names.dedup();
    names.join(" + ")
}

/// A compute pool of `threads` workers, unpinned (default: one per
/// physical core, [`crate::compute::default_threads`]).
pub fn pool(threads: Option<usize>) -> anyhow::Result<rayon::ThreadPool> {
    crate::compute::pool(threads, false)
}

pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let settings = Settings {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        min_p: args.min_p,
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
        ..Settings::default()
    };
    settings.validate()?;
    let mut err = std::io::stderr();
    let _ = writeln!(err, "loading {} ...", args.model.display());
    let started = Instant::now();
    let kernel = args.kernel.as_deref().map(kernel).transpose()?;
    let amx = crate::compute::apply_amx(args.amx);
    let (mut model, tokenizer) = trine_engine::open(&args.model, None)?;
    model.set_lm_head(args.quant_embd);
    let pool = pool(args.threads)?;
    for c in pool.install(|| model.choose(args.weight_layout, kernel)) {
        let _ = writeln!(err, "kernel {c}");
    }
    let c = &model.config;
    let _ = writeln!(
        err,
        "loaded {} layers, hidden {}, vocab {} in {:.1} s",
        c.layers,
        c.hidden,
        c.vocab,
        started.elapsed().as_secs_f64()
    );
    let prompt = if args.chat {
        let mut turns = Vec::new();
        if let Some(system) = &args.system {
            turns.push(("system", system.as_str()));
        }
        turns.push(("user", args.prompt.as_str()));
        tokenizer.chat(&turns)?
    } else {
        tokenizer.encode_prompt(&args.prompt)
    };
    if prompt.len() + args.max_tokens > c.context {
        anyhow::bail!(
            "the prompt ({} tokens) plus --max-tokens {} exceed the model's context of {} tokens; shorten the prompt or lower --max-tokens",
            prompt.len(),
            args.max_tokens,
            c.context
        );
    }
    // Stdout, not a lock: the callback runs on a compute thread.
    let mut out = std::io::stdout();
    let mut sampler = Sampler::new(settings);
    let stats = pool.install(|| {
        trine_engine::generate::generate(
            &model,
            &tokenizer,
            &prompt,
            args.max_tokens,
            &mut sampler,
            |_, text| {
                out.write_all(text.as_bytes())
                    .and_then(|()| out.flush())
                    .is_ok()
            },
        )
    })?;
    let _ = writeln!(out);
    let layouts: Vec<&str> = model.layouts().iter().map(|l| l.name()).collect();
    let _ = writeln!(
        err,
        "prefill {} tokens at {:.1} tok/s, decode {} tokens at {:.1} tok/s ({:?}); backend cpu, kernel {}, weights {}, threads {}, amx {amx}",
        stats.prompt_tokens,
        stats.prefill_tokens_per_second(),
        stats.generated,
        stats.decode_tokens_per_second(),
        stats.finish,
        kernels_used(&model),
        layouts.join(" + "),
        pool.current_num_threads()
    );
    Ok(())
}
