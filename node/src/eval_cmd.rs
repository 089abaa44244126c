//! `trine model eval` (per-position top-k and the sequence's likelihood,
//! for cross-checking against other implementations) and `trine perplexity`.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use trine_engine::eval;

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A GGUF model file or a Hugging Face model directory.
    #[arg(long, short = 'm', value_name = "PATH")]
    pub model: PathBuf,
    /// Token ids, comma-separated, e.g. 128000,791,6864 (no BOS is added).
    #[arg(long, value_delimiter = ',', required = true)]
    pub tokens: Vec<u32>,
    /// How many of the most likely next tokens to show per position.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also write every position's logits to FILE: little-endian f32,
    /// positions × vocab, row-major.
    #[arg(long, value_name = "FILE")]
    pub dump_logits: Option<PathBuf>,
    /// Worker threads [default: one per physical core this process may use].
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// lm_head precision: `file` (as stored), `q8` (Q8_0, made at load) or
    /// `q4` (Q4_0, made at load).
    #[arg(long, default_value = "file", value_name = "file|q8|q4")]
    pub quant_embd: trine_engine::model::QuantEmbd,
}

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    /// A GGUF model file or a Hugging Face model directory.
    #[arg(long, short = 'm', value_name = "PATH")]
    pub model: PathBuf,
    /// A UTF-8 text file to score.
    #[arg(long, short = 'f', value_name = "TEXT")]
    pub file: PathBuf,
    /// Tokens per chunk; the second half of each chunk is scored.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Worker threads [default: one per physical core this process may use].
    #[arg(long, short = 't')]
    pub threads: Option<usize>,
    /// lm_head precision: `file` (as stored), `q8` (Q8_0, made at load) or
    /// `q4` (Q4_0, made at load).
    #[arg(long, default_value = "file", value_name = "file|q8|q4")]
    pub quant_embd: trine_engine::model::QuantEmbd,
}

pub fn eval(args: &EvalArgs) -> anyhow::Result<()> {
    let (mut model, _) = trine_engine::open(&args.model, None)?;
    model.set_lm_head(args.quant_embd);
    let vocab = model.config.vocab;
    if let Some(bad) = args.tokens.iter().find(|&&t| t as usize >= vocab) {
        anyhow::bail!("token {bad} is outside the vocabulary of {vocab}; give ids below {vocab}");
    }
    if args.tokens.len() > model.config.context {
        anyhow::bail!(
            "{} tokens exceed the model's context of {}; give fewer",
            args.tokens.len(),
            model.config.context
        );
    }
    let pool = crate::generate_cmd::pool(args.threads)?;
    let logits = pool.install(|| eval::all_logits(&model, &args.tokens))?;
    if let Some(path) = &args.dump_logits {
        let bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let rows: Vec<&[f32]> = logits.chunks_exact(vocab).collect();
    let nll: f64 = args
        .tokens
        .windows(2)
        .zip(&rows)
        .map(|(pair, row)| -eval::log_prob(row, pair[1]))
        .sum();
    let scored = args.tokens.len().saturating_sub(1);
    let mean = if scored > 0 {
        nll / scored as f64
    } else {
        f64::NAN
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let positions: Vec<serde_json::Value> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                serde_json::json!({
                    "position": i,
                    "token": args.tokens[i],
                    "top": eval::top_k(row, args.top_k).iter().map(|(id, l)| serde_json::json!([id, l])).collect::<Vec<_>>(),
                    "next_logprob": args.tokens.get(i + 1).map(|&n| eval::log_prob(row, n)),
                })
            })
            .collect();
        let doc = serde_json::json!({
            "model": args.model.display().to_string(),
            "vocab": vocab,
            "positions": positions,
            "nll": mean,
            "perplexity": mean.exp(),
        });
        writeln!(out, "{doc}")?;
        return Ok(());
    }
    writeln!(out, "pos  token  next-token top-{} (id:logit)", args.top_k)?;
    for (i, row) in rows.iter().enumerate() {
        let top: Vec<String> = eval::top_k(row, args.top_k)
            .iter()
            .map(|(id, l)| format!("{id}:{l:.4}"))
            .collect();
        writeln!(out, "{i:>3}  {:>6}  {}", args.tokens[i], top.join("  "))?;
    }
    writeln!(
        out,
        "NLL {mean:.6} nats/token over {scored} predictions, perplexity {:.4}",
        mean.exp()
    )?;
    Ok(())
}

pub fn perplexity(args: &PerplexityArgs) -> anyhow::Result<()> {
    let (mut model, tokenizer) = trine_engine::open(&args.model, None)?;
    model.set_lm_head(args.quant_embd);
    let text = std::fs::read_to_string(&args.file)
        .with_context(|| format!("cannot read {} as UTF-8 text", args.file.display()))?;
    if args.ctx < 4 || args.ctx > model.config.context {
        anyhow::bail!(
            "--ctx {} must be between 4 and the model's context of {}",
            args.ctx,
            model.config.context
        );
    }
    let tokens = tokenizer.encode_prompt(&text);
    if tokens.len() < 2 * args.ctx {
        anyhow::bail!(
            "{} holds {} tokens; perplexity needs at least 2 × --ctx = {}: give a longer text or a smaller --ctx",
            args.file.display(),
            tokens.len(),
            2 * args.ctx
        );
    }
    eprintln!(
        "{} tokens, {} chunks of {}",
        tokens.len(),
        tokens.len() / args.ctx,
        args.ctx
    );
    let pool = crate::generate_cmd::pool(args.threads)?;
    let result = pool.install(|| {
        eval::perplexity(
            &model,
            &tokens,
            args.ctx,
            tokenizer.bos,
            |done, total, ppl| {
                eprint!("[{done}/{total}] {ppl:.4}  ");
                let _ = std::io::stderr().flush();
            },
        )
    })?;
    eprintln!();
    writeln!(
        std::io::stdout().lock(),
        "perplexity {:.4} +/- {:.4} over {} tokens in {} chunks of {} (NLL {:.6})",
        result.value(),
        result.error(),
        result.scored_tokens,
        result.chunks,
        args.ctx,
        result.nll
    )?;
    Ok(())
}
