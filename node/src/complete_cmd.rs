//! `trine complete`: a small client of any node's `Inference/Generate`.
//! Streams the answer to stdout as it is generated; `--verbose` adds, on
//! stderr, each token's timing and, at the end, the usage: counts, finish
//! reason, time to first token, total, the nodes that served it and the
//! failovers.

use std::io::Write as _;

use anyhow::{Context as _, Result, bail};
use clap::Args;
use tokio_stream::StreamExt as _;
use trine_proto::v1;
use trine_proto::v1::inference_client::InferenceClient;

use crate::cluster_cmd::Target;

#[derive(Debug, Args)]
pub struct CompleteArgs {
    #[command(flatten)]
    pub target: Target,
    /// The model, by its deployed name (`trine placement` lists them).
    #[arg(long, short = 'm')]
    pub model: String,
    /// The prompt.
    pub prompt: String,
    /// Send the prompt as one user turn of a chat (the model's template).
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Most tokens to generate.
    #[arg(long, short = 'n', default_value_t = 64)]
    pub max_tokens: u32,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0: all tokens.
    #[arg(long, default_value_t = 0)]
    pub top_k: u32,
    /// 1: off.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Stop before this string (repeatable, up to 4).
    #[arg(long)]
    pub stop: Vec<String>,
    /// API token (`trine token create`), unless the node allows anonymous
    /// requests.
    #[arg(long, env = "TRINE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Per-token timings and the usage (path, failovers) on stderr.
    #[arg(long, short)]
    pub verbose: bool,
}

fn ms(d: Option<&prost_types::Duration>) -> f64 {
    d.map_or(0.0, |d| d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6)
}

pub fn run(args: &CompleteArgs) -> Result<()> {
    let uri = args.target.uri()?;
    let input = if args.chat {
        let mut messages = Vec::new();
        if let Some(s) = &args.system {
            messages.push(v1::ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        messages.push(v1::ChatMessage {
            role: "user".into(),
            content: args.prompt.clone(),
        });
        v1::generate_request::Input::Chat(v1::Chat { messages })
    } else {
        v1::generate_request::Input::Prompt(args.prompt.clone())
    };
    let req = v1::GenerateRequest {
        model: args.model.clone(),
        input: Some(input),
        sampling: Some(v1::SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
            repetition_penalty: args.repetition_penalty,
        }),
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let channel = tonic::transport::Endpoint::from_shared(uri.clone())?
            .connect_timeout(args.target.timeout)
            .connect()
            .await
            .with_context(|| format!("cannot reach a trine node at {uri}; is it running? (--node or --data-dir choose which)"))?;
        let mut client = InferenceClient::new(channel);
        let mut request = tonic::Request::new(req);
        if let Some(t) = &args.token {
            request.metadata_mut().insert(
                "authorization",
                format!("Bearer {t}")
                    .parse()
                    .context("the token is not a valid header value")?,
            );
        }
        let mut stream = client
            .generate(request)
            .await
            .map_err(|s| anyhow::anyhow!("{uri}: {}: {}", s.code(), s.message()))?
            .into_inner();
        let mut out = std::io::stdout();
        let mut err = std::io::stderr();
        while let Some(ev) = stream.next().await {
            let ev = ev.map_err(|s| anyhow::anyhow!("{uri}: {}: {}", s.code(), s.message()))?;
            match ev.event {
                Some(v1::generate_response::Event::Token(t)) => {
                    out.write_all(t.text.as_bytes())?;
                    out.flush()?;
                    if args.verbose {
                        writeln!(
                            err,
                            "[token {} id {} at {:.1} ms, +{:.1} ms, logprob {:.3}]",
                            t.index,
                            t.id,
                            ms(t.since_start.as_ref()),
                            ms(t.since_previous.as_ref()),
                            t.logprob
                        )?;
                    }
                }
                Some(v1::generate_response::Event::Usage(u)) => {
                    writeln!(out)?;
                    if args.verbose {
                        let finish = v1::FinishReason::try_from(u.finish_reason)
                            .unwrap_or_default()
                            .as_str_name()
                            .trim_start_matches("FINISH_REASON_")
                            .to_lowercase();
                        let total = ms(u.total.as_ref());
                        writeln!(
                            err,
                            "request {}: prompt {} tokens, generated {} ({finish}); first token {:.1} ms, total {total:.1} ms ({:.1} tokens/s); path {:?}, failovers {}",
                            ev.request_id,
                            u.prompt_tokens,
                            u.completion_tokens,
                            ms(u.time_to_first_token.as_ref()),
                            f64::from(u.completion_tokens) / (total / 1e3).max(1e-9),
                            u.path,
                            u.failovers
                        )?;
                    }
                    return Ok(());
                }
                None => {}
            }
        }
        bail!("{uri} ended the answer without its usage")
    })?;
    Ok(())
}
