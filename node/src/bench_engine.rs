//! `trine bench engine`: the engine against this machine's physical limit.
//! It measures the read bandwidth (a STREAM-like sum over a buffer far
//! larger than the caches, at the same thread counts), then each weight
//! shape's GEMV in GB/s and % of that bandwidth, decode tokens/s at one
//! thread and at all, and prefill tokens/s for 128- and 512-token prompts.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use clap::Args;
use serde::Serialize;
use trine_engine::kernels::{Activations, Kernel};
use trine_engine::model::{Input, Logits, Model, Output, QuantEmbd, WeightLayout};
use trine_engine::sampler::argmax;

#[derive(Debug, Args)]
pub struct EngineArgs {
    /// A GGUF model file or a Hugging Face model directory (`trine model
    /// synth --preset 2b4t` makes one with the real 2B4T shapes).
    #[arg(long, short = 'm', value_name = "PATH")]
    pub model: PathBuf,
    /// Thread counts to measure, comma-separated [default: 1 and one per
    /// physical core this process may use].
    #[arg(long, short = 't', value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// lm_head precisions to measure decode with: `file` (as stored), `q8`,
    /// `q4`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "file,q8,q4")]
    pub quant_embd: Vec<QuantEmbd>,
    /// Ternary weight layouts to measure the shapes, decode and prefill
    /// in, comma-separated: `i2s` (2 bits a weight), `base3` (1.6 bits,
    /// repacked at load), `auto` (the faster per shape, measured as a node
    /// does at load).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "i2s,base3",
        value_name = "i2s|base3|auto"
    )]
    pub weight_layout: Vec<WeightLayout>,
    /// Ternary kernel for every shape [default: the fastest per shape,
    /// measured at each thread count as a node does at load].
    #[arg(long)]
    pub kernel: Option<String>,
    /// AMX-INT8 tiles for prompts where the CPU has them: `auto` or `off`
    /// (the AVX register tiles, to compare on the same machine).
    #[arg(long, value_enum, default_value_t = crate::compute::Amx::Auto)]
    pub amx: crate::compute::Amx,
    /// Tokens to decode per measurement (after an 8-token prompt).
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Prompt lengths for prefill, comma-separated (0 skips prefill).
    #[arg(long, value_delimiter = ',', default_value = "128,512")]
    pub prompts: Vec<usize>,
    /// Repeats of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// MiB read per pass of the bandwidth measurement (keep it well above
    /// the last-level cache).
    #[arg(long, default_value_t = 1024)]
    pub bandwidth_mib: usize,
    /// Also compare each quantized lm_head of `--quant-embd` (q8, q4) with
    /// the file's over this many
    /// positions of a fixed token sequence (teacher-forced: every position
    /// sees the same prefix): argmax agreement, logit error and the
    /// sequence's perplexity under each. 0 skips it.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub accuracy_tokens: usize,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    cpu: String,
    flags: Vec<&'static str>,
    /// The kernel given with --kernel, or "measured".
    kernel: &'static str,
    /// AMX-INT8 tiles for prompts: "on", "off (--amx off)" or "absent (...)".
    amx: &'static str,
    /// With "measured": each thread count's per-shape choice and timings.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    kernel_choice: Vec<Choice>,
    model: String,
    layers: usize,
    hidden: usize,
    ffn: usize,
    vocab: usize,
    lm_head_type: &'static str,
    bandwidth: Vec<Bandwidth>,
    shapes: Vec<Shape>,
    decode: Vec<Decode>,
    prefill: Vec<Prefill>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    accuracy: Vec<Accuracy>,
}

/// A quantized lm_head against the file's, on the same hidden states.
#[derive(Debug, Serialize)]
struct Accuracy {
    /// The quantized head's type (Q8_0, Q4_0).
    lm_head: &'static str,
    positions: usize,
    /// Positions whose most likely next token is the same.
    argmax_agreement: f64,
    mean_abs_logit_error: f64,
    max_abs_logit_error: f64,
    /// Root mean square of the file head's logits, for scale.
    logit_rms: f64,
    perplexity_file: f64,
    perplexity_quantized: f64,
}

#[derive(Debug, Serialize)]
struct Choice {
    /// The `--weight-layout` measured.
    weight_layout: &'static str,
    threads: usize,
    rows: usize,
    cols: usize,
    kernel: &'static str,
    /// The layout kept for the shape.
    layout: &'static str,
    /// Microseconds per GEMV of each kernel (and layout, with `auto`),
    /// fastest first.
    us_per_gemv: Vec<(&'static str, &'static str, f64)>,
}

#[derive(Debug, Serialize)]
struct Bandwidth {
    threads: usize,
    gb_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Shape {
    name: String,
    /// The ternary layout of the shape's matrices ("" for an lm_head).
    #[serde(skip_serializing_if = "str::is_empty")]
    layout: &'static str,
    rows: usize,
    cols: usize,
    /// Matrices of this shape the pass cycles through (all layers'), so
    /// the weights come from memory, not cache.
    matrices: usize,
    threads: usize,
    /// The kernel that ran (the file's precision for an lm_head).
    kernel: &'static str,
    us_per_gemv: f64,
    gb_per_s: f64,
    pct_of_bandwidth: f64,
}

#[derive(Debug, Serialize)]
struct Decode {
    /// The ternary weights' layout(s): "i2s", "base3", or "auto: ..."
    /// with the layouts measurement kept.
    weights: String,
    threads: usize,
    lm_head: &'static str,
    bytes_per_token: usize,
    ms_per_token: f64,
    tokens_per_s: f64,
    gb_per_s: f64,
    pct_of_bandwidth: f64,
    /// bandwidth ÷ bytes per token: the tokens/s a perfect kernel reaches.
    limit_tokens_per_s: f64,
}

#[derive(Debug, Serialize)]
struct Prefill {
    weights: String,
    threads: usize,
    prompt: usize,
    tokens_per_s: f64,
}

pub fn run(args: &EngineArgs) -> Result<()> {
    anyhow::ensure!(args.reps > 0, "--reps 0: give at least 1");
    anyhow::ensure!(args.tokens > 0, "--tokens 0: give at least 1");
    let threads = if args.threads.is_empty() {
        let all = crate::compute::default_threads();
        if all > 1 { vec![1, all] } else { vec![1] }
    } else {
        args.threads.clone()
    };
    let forced = args
        .kernel
        .as_deref()
        .map(crate::generate_cmd::kernel)
        .transpose()?;
    let amx = crate::compute::apply_amx(args.amx);
    let progress = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    progress(&format!("loading {} ...", args.model.display()));
    let (model, _) = trine_engine::open(&args.model, None)
        .with_context(|| format!("cannot open {}", args.model.display()))?;
    anyhow::ensure!(
        model.is_first() && model.is_last(),
        "{} is not a whole model",
        args.model.display()
    );
    let c = model.config.clone();
    let file_head = model.lm_head.as_ref().map_or("none", |h| h.type_name());

    let mut bandwidth = Vec::new();
    for &t in &threads {
        progress(&format!("read bandwidth, {t} thread(s) ..."));
        let pool = crate::generate_cmd::pool(Some(t))?;
        let gb = pool.install(|| read_bandwidth(args.bandwidth_mib << 20, args.reps.max(3)));
        bandwidth.push(Bandwidth {
            threads: t,
            gb_per_s: gb,
        });
    }
    let bw = |t: usize| {
        bandwidth
            .iter()
            .find(|b| b.threads == t)
            .map_or(f64::NAN, |b| b.gb_per_s)
    };

    // Each lm_head precision, quantized once.
    let heads: Vec<(
        QuantEmbd,
        Option<std::sync::Arc<trine_engine::model::Dense>>,
    )> = args
        .quant_embd
        .iter()
        .map(|&how| {
            let mut m = model.clone();
            m.set_lm_head(how);
            (how, m.lm_head)
        })
        .collect();

    let mut shapes = Vec::new();
    for &t in &threads {
        let pool = crate::generate_cmd::pool(Some(t))?;
        for (_, head) in &heads {
            let Some(head) = head.as_ref() else {
                continue;
            };
            let x: Vec<f32> = (0..c.hidden)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let mut out = vec![0f32; c.vocab];
            let per_pass = pool.install(|| median_time(args.reps, || head.matvec(&x, &mut out)));
            let name = format!("lm_head {}", head.type_name());
            shapes.push(shape_row(
                &name,
                "",
                (c.vocab, c.hidden, 1),
                t,
                head.type_name(),
                head.byte_len(),
                per_pass,
                bw(t),
            ));
        }
    }

    let mut kernel_choice = Vec::new();
    let mut decode = Vec::new();
    let mut prefill = Vec::new();
    let mut layouts = args.weight_layout.clone();
    layouts.dedup();
    for &how in &layouts {
        // The model as it runs at each thread count: packed in this layout
        // (or, with `auto`, the faster per shape), with one kernel
        // (--kernel) or the fastest per shape, measured in that pool.
        let mut at_threads: Vec<(Model, String)> = Vec::new();
        for &t in &threads {
            let mut m = model.clone();
            progress(&format!(
                "weights {how}: packing, choosing kernels, {t} thread(s) ..."
            ));
            let pool = crate::generate_cmd::pool(Some(t))?;
            for sc in pool.install(|| m.choose(how, forced)) {
                kernel_choice.push(Choice {
                    weight_layout: how.name(),
                    threads: t,
                    rows: sc.rows,
                    cols: sc.cols,
                    kernel: sc.kernel.name(),
                    layout: sc.layout.name(),
                    us_per_gemv: sc
                        .timings
                        .iter()
                        .map(|(k, l, d)| (k.name(), l.name(), d.as_secs_f64() * 1e6))
                        .collect(),
                });
            }
            let kept: Vec<&str> = m.layouts().iter().map(|l| l.name()).collect();
            let label = match how {
                WeightLayout::Auto => format!("auto: {}", kept.join("+")),
                _ => how.name().to_owned(),
            };
            at_threads.push((m, label));
        }

        for (&t, (tuned, _)) in threads.iter().zip(&at_threads) {
            progress(&format!("weights {how}: GEMV per shape, {t} thread(s) ..."));
            let pool = crate::generate_cmd::pool(Some(t))?;
            for (name, mats) in tuned.shape_groups() {
                let (rows, cols) = (mats[0].rows(), mats[0].cols());
                let bytes: usize = mats.iter().map(|m| m.data().len()).sum();
                let x: Vec<f32> = (0..cols)
                    .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                    .collect();
                let acts = Activations::quantize(&x);
                let mut out = vec![0f32; rows];
                let kernel = tuned.kernel_for(mats[0]);
                let per_pass = pool.install(|| {
                    median_time(args.reps, || {
                        for m in &mats {
                            kernel.gemv(m, &acts, &mut out);
                        }
                    })
                });
                shapes.push(shape_row(
                    &name,
                    mats[0].layout().name(),
                    (rows, cols, mats.len()),
                    t,
                    kernel.name(),
                    bytes,
                    per_pass,
                    bw(t),
                ));
            }
        }

        for (how, head) in &heads {
            let label = head_label(*how, file_head);
            for (&t, (tuned, weights)) in threads.iter().zip(&at_threads) {
                let mut m = tuned.clone();
                m.lm_head = head.clone();
                progress(&format!(
                    "decode, weights {weights}, lm_head {label}, {t} thread(s) ..."
                ));
                let pool = crate::generate_cmd::pool(Some(t))?;
                let per_token = pool.install(|| decode_time(&m, args.tokens, args.reps))?;
                let bytes = m.bytes_per_token();
                let tps = 1.0 / per_token.as_secs_f64();
                let gbs = bytes as f64 * tps / 1e9;
                decode.push(Decode {
                    weights: weights.clone(),
                    threads: t,
                    lm_head: label,
                    bytes_per_token: bytes,
                    ms_per_token: per_token.as_secs_f64() * 1e3,
                    tokens_per_s: tps,
                    gb_per_s: gbs,
                    pct_of_bandwidth: 100.0 * gbs / bw(t),
                    limit_tokens_per_s: bw(t) * 1e9 / bytes as f64,
                });
            }
        }

        for &p in args.prompts.iter().filter(|&&p| p > 0) {
            if p > c.context {
                progress(&format!(
                    "skipping the {p}-token prompt: the model's context is {}",
                    c.context
                ));
                continue;
            }
            for (&t, (tuned, weights)) in threads.iter().zip(&at_threads) {
                progress(&format!(
                    "prefill, weights {weights}, {p} tokens, {t} thread(s) ..."
                ));
                let pool = crate::generate_cmd::pool(Some(t))?;
                let took = pool.install(|| prefill_time(tuned, p, args.reps))?;
                prefill.push(Prefill {
                    weights: weights.clone(),
                    threads: t,
                    prompt: p,
                    tokens_per_s: p as f64 / took.as_secs_f64(),
                });
            }
        }
    }

    let mut accuracies = Vec::new();
    for (how, head) in heads.iter().filter(|(h, _)| *h != QuantEmbd::File) {
        if args.accuracy_tokens == 0 {
            break;
        }
        progress(&format!(
            "{how} lm_head accuracy over {} positions ...",
            args.accuracy_tokens
        ));
        let pool = crate::generate_cmd::pool(threads.last().copied())?;
        let mut quantized = model.clone();
        quantized.lm_head = head.clone();
        accuracies.push(pool.install(|| accuracy(&model, &quantized, *how, args.accuracy_tokens))?);
    }

    let report = Report {
        cpu: cpu_model(),
        flags: cpu_flags(),
        kernel: forced.map_or("measured", Kernel::name),
        amx,
        kernel_choice,
        model: args.model.display().to_string(),
        layers: c.layers,
        hidden: c.hidden,
        ffn: c.ffn,
        vocab: c.vocab,
        lm_head_type: file_head,
        bandwidth,
        shapes,
        decode,
        prefill,
        accuracy: accuracies,
    };
    #[allow(clippy::print_stdout)]
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report));
    }
    Ok(())
}

/// A shape's row; `(rows, cols, matrices)`.
#[allow(clippy::too_many_arguments)]
fn shape_row(
    name: &str,
    layout: &'static str,
    (rows, cols, matrices): (usize, usize, usize),
    threads: usize,
    kernel: &'static str,
    bytes: usize,
    per_pass: Duration,
    bandwidth: f64,
) -> Shape {
    let gbs = bytes as f64 / per_pass.as_secs_f64() / 1e9;
    Shape {
        name: name.to_string(),
        layout,
        rows,
        cols,
        matrices,
        threads,
        kernel,
        us_per_gemv: per_pass.as_secs_f64() * 1e6 / matrices as f64,
        gb_per_s: gbs,
        pct_of_bandwidth: 100.0 * gbs / bandwidth,
    }
}

/// The per-call time of `f`: after one warm-up call, `reps` rounds each
/// repeating `f` for at least 0.2 s; the median round.
fn median_time(reps: usize, mut f: impl FnMut()) -> Duration {
    f();
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        let mut calls = 0u32;
        while calls == 0 || start.elapsed() < Duration::from_millis(200) {
            f();
            calls += 1;
        }
        times.push(start.elapsed() / calls);
    }
    times.sort();
    times[times.len() / 2]
}

/// A STREAM-like read: every thread of the current pool sums its share of
/// a `bytes` buffer (8-byte words, huge pages advised, all pages touched
/// first); the best of
/// `reps` passes, in GB/s.
fn read_bandwidth(bytes: usize, reps: usize) -> f64 {
    use rayon::prelude::*;
    let words = (bytes / 8).max(1 << 20);
    // Advised for huge pages as the weights repacked at load are: the
    // figure is what memory gives with them (where THP is not off).
    let mut buf = trine_engine::mmap::huge_zeroed_words(words);
    buf.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        for (j, w) in c.iter_mut().enumerate() {
            *w = (i as u64) ^ (j as u64);
        }
    });
    let threads = rayon::current_num_threads();
    let chunk = words.div_ceil(threads);
    let mut best = 0f64;
    for _ in 0..reps {
        let start = Instant::now();
        let sum: u64 = buf
            .par_chunks(chunk)
            .map(trine_engine::kernels::sum_words)
            .sum();
        let secs = start.elapsed().as_secs_f64();
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / secs / 1e9);
    }
    best
}

fn logits_of(out: Output) -> Result<Vec<f32>> {
    match out {
        Output::Logits(l) => Ok(l),
        Output::Hidden(_) => anyhow::bail!("the model returned hidden states"),
    }
}

fn prompt_tokens(n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % vocab) as u32).collect()
}

/// Median time per greedy decode step over `reps` runs of `tokens` steps
/// after an 8-token prompt.
fn decode_time(model: &Model, tokens: usize, reps: usize) -> Result<Duration> {
    let prompt = prompt_tokens(8, model.config.vocab);
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let mut cache = model.new_cache(prompt.len() + tokens + 1);
        let mut logits =
            logits_of(model.forward(Input::Tokens(&prompt), &mut cache, Logits::Last)?)?;
        let start = Instant::now();
        for _ in 0..tokens {
            let t = argmax(&logits);
            logits = logits_of(model.forward(Input::Tokens(&[t]), &mut cache, Logits::Last)?)?;
        }
        times.push(start.elapsed() / tokens as u32);
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// Median time to run a `n`-token prompt from an empty cache (last
/// position's logits), over `reps` runs after one warm-up.
fn prefill_time(model: &Model, n: usize, reps: usize) -> Result<Duration> {
    let prompt = prompt_tokens(n, model.config.vocab);
    let mut times = Vec::with_capacity(reps);
    for rep in 0..=reps {
        let mut cache = model.new_cache(n);
        let start = Instant::now();
        logits_of(model.forward(Input::Tokens(&prompt), &mut cache, Logits::Last)?)?;
        if rep > 0 {
            times.push(start.elapsed());
        }
    }
    times.sort();
    Ok(times[times.len() / 2])
}

/// How a decode row names its lm_head.
fn head_label(how: QuantEmbd, file_head: &'static str) -> &'static str {
    match how {
        QuantEmbd::File => file_head,
        QuantEmbd::Q8 => "Q8_0",
        QuantEmbd::Q4 => "Q4_0",
    }
}

/// Teacher-forced comparison of `quantized` (the model with its lm_head
/// quantized as `how`) with `model` (the file's head) on one pseudo-random
/// token sequence of `n` + 1 tokens (capped at the context).
fn accuracy(model: &Model, quantized: &Model, how: QuantEmbd, n: usize) -> Result<Accuracy> {
    let n = n.min(model.config.context - 1);
    let tokens = prompt_tokens(n + 1, model.config.vocab);
    let exact = trine_engine::eval::all_logits(model, &tokens[..n])?;
    let approx = trine_engine::eval::all_logits(quantized, &tokens[..n])?;
    let vocab = model.config.vocab;
    let (mut agree, mut sum_err, mut max_err, mut sum_sq) = (0usize, 0f64, 0f64, 0f64);
    let (mut nll_file, mut nll_quant) = (0f64, 0f64);
    for (i, (a, b)) in exact
        .chunks_exact(vocab)
        .zip(approx.chunks_exact(vocab))
        .enumerate()
    {
        if argmax(a) == argmax(b) {
            agree += 1;
        }
        for (x, y) in a.iter().zip(b) {
            let e = f64::from((x - y).abs());
            sum_err += e;
            max_err = max_err.max(e);
            sum_sq += f64::from(x * x);
        }
        nll_file -= trine_engine::eval::log_prob(a, tokens[i + 1]);
        nll_quant -= trine_engine::eval::log_prob(b, tokens[i + 1]);
    }
    let values = (n * vocab) as f64;
    Ok(Accuracy {
        lm_head: head_label(how, "file"),
        positions: n,
        argmax_agreement: agree as f64 / n as f64,
        mean_abs_logit_error: sum_err / values,
        max_abs_logit_error: max_err,
        logit_rms: (sum_sq / values).sqrt(),
        perplexity_file: (nll_file / n as f64).exp(),
        perplexity_quantized: (nll_quant / n as f64).exp(),
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".to_string())
}

fn cpu_flags() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut flags = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        for (name, on) in [
            ("avx2", has!("avx2")),
            ("f16c", has!("f16c")),
            ("fma", has!("fma")),
            ("avxvnni", has!("avxvnni")),
            ("avx512f", has!("avx512f")),
            ("avx512bw", has!("avx512bw")),
            ("avx512vnni", has!("avx512vnni")),
            ("amx-int8", trine_engine::kernels::amx::usable()),
        ] {
            if on {
                flags.push(name);
            }
        }
    }
    flags
}

fn render(r: &Report) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "CPU: {} ({})", r.cpu, r.flags.join(" "));
    let _ = writeln!(
        s,
        "model: {} ({} layers, hidden {}, ffn {}, vocab {}, lm_head {}); kernel {}; amx {}",
        r.model, r.layers, r.hidden, r.ffn, r.vocab, r.lm_head_type, r.kernel, r.amx
    );
    if !r.kernel_choice.is_empty() {
        let _ = writeln!(s, "\nkernels by measurement (µs per GEMV, fastest first)");
        for c in &r.kernel_choice {
            let timings: Vec<String> = c
                .us_per_gemv
                .iter()
                .map(|(k, l, us)| format!("{k} {l} {us:.1}"))
                .collect();
            let _ = writeln!(
                s,
                "  {:<5} {:>3}t {:>12}  {:<12} {:<5} ({})",
                c.weight_layout,
                c.threads,
                format!("{}×{}", c.rows, c.cols),
                c.kernel,
                c.layout,
                timings.join(", ")
            );
        }
    }
    let _ = writeln!(s, "\nread bandwidth");
    for b in &r.bandwidth {
        let _ = writeln!(s, "  {} thread(s)  {:6.1} GB/s", b.threads, b.gb_per_s);
    }
    let _ = writeln!(
        s,
        "\nGEMV per shape (cycling through every layer's matrix of the shape)"
    );
    let _ = writeln!(
        s,
        "  {:<16} {:<6} {:>12} {:>4} {:>3}t {:<12} {:>10} {:>8} {:>7}",
        "shape", "layout", "rows×cols", "n", "", "kernel", "µs/gemv", "GB/s", "% bw"
    );
    for x in &r.shapes {
        let _ = writeln!(
            s,
            "  {:<16} {:<6} {:>12} {:>4} {:>3}t {:<12} {:>10.1} {:>8.1} {:>6.0}%",
            x.name,
            x.layout,
            format!("{}×{}", x.rows, x.cols),
            x.matrices,
            x.threads,
            x.kernel,
            x.us_per_gemv,
            x.gb_per_s,
            x.pct_of_bandwidth
        );
    }
    let _ = writeln!(s, "\ndecode (greedy, after an 8-token prompt)");
    let _ = writeln!(
        s,
        "  {:<18} {:<8} {:>3}t {:>10} {:>9} {:>8} {:>8} {:>7} {:>10}",
        "weights", "lm_head", "", "MB/token", "ms/token", "tok/s", "GB/s", "% bw", "limit t/s"
    );
    for d in &r.decode {
        let _ = writeln!(
            s,
            "  {:<18} {:<8} {:>3}t {:>10.1} {:>9.2} {:>8.2} {:>8.1} {:>6.0}% {:>10.1}",
            d.weights,
            d.lm_head,
            d.threads,
            d.bytes_per_token as f64 / 1e6,
            d.ms_per_token,
            d.tokens_per_s,
            d.gb_per_s,
            d.pct_of_bandwidth,
            d.limit_tokens_per_s
        );
    }
    if !r.prefill.is_empty() {
        let _ = writeln!(s, "\nprefill (one prompt from an empty cache)");
        for p in &r.prefill {
            let _ = writeln!(
                s,
                "  {:<18} pp{:<5} {:>3}t {:>9.1} tok/s",
                p.weights, p.prompt, p.threads, p.tokens_per_s
            );
        }
    }
    for a in &r.accuracy {
        let _ = writeln!(
            s,
            "\n{} lm_head against {} over {} teacher-forced positions",
            a.lm_head, r.lm_head_type, a.positions
        );
        let _ = writeln!(
            s,
            "  argmax agreement {:.2}%  logit error mean {:.4} max {:.4} (logit rms {:.3})  perplexity {:.3} → {:.3} ({:+.3}%)",
            100.0 * a.argmax_agreement,
            a.mean_abs_logit_error,
            a.max_abs_logit_error,
            a.logit_rms,
            a.perplexity_file,
            a.perplexity_quantized,
            100.0 * (a.perplexity_quantized / a.perplexity_file - 1.0)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_bandwidth_is_positive_and_finite() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let gb = pool.install(|| read_bandwidth(8 << 20, 1));
        assert!(gb.is_finite() && gb > 0.0, "{gb}");
    }
}
