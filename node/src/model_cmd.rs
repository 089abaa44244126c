//! `trine model …`: look inside a model file, score tokens with it, and
//! make synthetic ones.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, Subcommand, ValueEnum};
use trine_engine::synth::{Preset, TernaryType, Weights};

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Print a model file's architecture, hyper-parameters, metadata and
    /// tensor table (types, shapes, sizes), then what is wrong with it, if
    /// anything: every ternary tensor is decoded and checked.
    Inspect(InspectArgs),
    /// Run token ids through a model and print, for every position, the
    /// most likely next tokens and the sequence's log-likelihood.
    Eval(crate::eval_cmd::EvalArgs),
    /// Download a model repository from a Hugging Face-compatible hub into
    /// the Hugging Face cache (resumable, sha256-checked); prints the
    /// snapshot directory, which `--model` accepts.
    Pull(crate::hub::PullArgs),
    /// Write a random-weight BitNet b1.58 model in a real file format, so
    /// everything runs with no download.
    Synth(SynthArgs),
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A GGUF model file or a Hugging Face model directory.
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PresetArg {
    /// BITNET.md's test model: hidden 256, 2 heads, 1 KV head, ffn 512, 2 layers, vocab 512.
    Tiny,
    /// The real shapes of BitNet b1.58 2B4T (2.4 B parameters, about 1.2 GB as I2_S).
    #[value(name = "2b4t")]
    B2b4t,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum FormatArg {
    /// GGUF, bitnet.cpp's I2_S (the official 2B4T file's type).
    #[value(name = "i2_s")]
    I2S,
    /// GGUF, ggml's TQ2_0 (2.06 bits per weight).
    #[value(name = "tq2_0")]
    Tq2_0,
    /// GGUF, ggml's TQ1_0 (1.69 bits per weight).
    #[value(name = "tq1_0")]
    Tq1_0,
    /// A Hugging Face directory in the packed layout of
    /// microsoft/bitnet-b1.58-2B-4T (config.json, model.safetensors, tokenizer.json).
    Hf,
}

#[derive(Debug, Args)]
pub struct SynthArgs {
    /// Model shape.
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: PresetArg,
    /// How the ternary weights are stored.
    #[arg(long, value_enum, default_value = "i2_s")]
    pub format: FormatArg,
    /// Seed of the weight generator: the same seed gives the same file.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// GGUF architecture name: `bitnet-b1.58` (bitnet.cpp's and the
    /// official 2B4T file's; ReLU² FFN) or `bitnet` (upstream llama.cpp's,
    /// whose loader treats the FFN as SiLU): the same weights, for running
    /// llama.cpp's llama-bench side by side with `trine bench engine`.
    #[arg(long, default_value = "bitnet-b1.58", value_parser = ["bitnet-b1.58", "bitnet"])]
    pub arch: String,
    /// Where to write the model: a file for GGUF (replaced atomically if it
    /// exists), a directory for hf.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
}

/// Runs a `trine model` subcommand; the error is one line for the user.
pub fn run(command: &ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Inspect(args) => inspect(args),
        ModelCommand::Synth(args) => synth(args),
        ModelCommand::Eval(args) => crate::eval_cmd::eval(args),
        ModelCommand::Pull(args) => crate::hub::run(args),
    }
}

fn inspect(args: &InspectArgs) -> anyhow::Result<()> {
    let (text, findings) = if args.path.is_dir() {
        let r = trine_engine::inspect::inspect_hf(&args.path)?;
        (r.to_string(), r.findings.len())
    } else {
        let r = trine_engine::inspect::inspect(&args.path)?;
        (r.to_string(), r.findings.len())
    };
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()) {
        // A reader that stopped early (`| head`) is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        other => other?,
    }
    if findings > 0 {
        anyhow::bail!(
            "{}: {findings} finding(s) above; this model will not load as it is",
            args.path.display()
        );
    }
    Ok(())
}

fn synth(args: &SynthArgs) -> anyhow::Result<()> {
    let preset = match args.preset {
        PresetArg::Tiny => Preset::Tiny,
        PresetArg::B2b4t => Preset::B2b4t,
    };
    let ty = match args.format {
        FormatArg::I2S => Some(TernaryType::I2S),
        FormatArg::Tq2_0 => Some(TernaryType::TQ2_0),
        FormatArg::Tq1_0 => Some(TernaryType::TQ1_0),
        FormatArg::Hf => None,
    };
    let started = Instant::now();
    let mut err = std::io::stderr().lock();
    let mut weights = Weights::generate_with_progress(preset, args.seed, &mut |done, total| {
        let _ = write!(err, "\rgenerating weights: layer {done}/{total}");
        let _ = err.flush();
    });
    weights.config.arch.clone_from(&args.arch);
    let _ = writeln!(
        err,
        "\nencoding as {} and writing {} ...",
        args.format
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default(),
        args.out.display()
    );
    let written = match ty {
        Some(ty) => weights.to_gguf(ty)?.write(&args.out),
        None => weights.write_hf(&args.out),
    };
    written.map_err(|e| {
        anyhow::anyhow!(
            "cannot write {}: {e}; check the directory exists and is writable",
            args.out.display()
        )
    })?;
    let bytes = du(&args.out);
    let _ = writeln!(
        err,
        "wrote {} ({bytes} bytes) in {:.1} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Bytes of a file, or of the files directly inside a directory.
fn du(path: &std::path::Path) -> u64 {
    match std::fs::read_dir(path) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum(),
        Err(_) => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
    }
}
