//! `trine complete` and `trine chat`: small clients of any node's
//! `Inference/Generate`.
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

/// Sampling, length, token and output flags shared by `trine complete` and
/// `trine chat`.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Most tokens to generate (per answer).
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
    /// The answer's deadline, e.g. 30s: past it the node ends the request
    /// with DEADLINE_EXCEEDED [default: the node's --request-timeout].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub deadline: Option<std::time::Duration>,
    /// API token (`trine token create`), unless the node allows anonymous
    /// requests.
    #[arg(long, env = "TRINE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Per-token timings and each answer's usage (path, failovers) on stderr.
    #[arg(long, short)]
    pub verbose: bool,
}

impl ClientArgs {
    fn request(&self, model: &str, input: v1::generate_request::Input) -> v1::GenerateRequest {
        v1::GenerateRequest {
            model: model.to_owned(),
            input: Some(input),
            sampling: Some(v1::SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed,
                repetition_penalty: self.repetition_penalty,
            }),
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            timeout: self.deadline.map(crate::serve::duration),
            ..Default::default()
        }
    }
}

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
    #[command(flatten)]
    pub client: ClientArgs,
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub target: Target,
    /// The model, by its deployed name (`trine placement` lists them).
    #[arg(long, short = 'm')]
    pub model: String,
    /// System message opening the conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

fn ms(d: Option<&prost_types::Duration>) -> f64 {
    d.map_or(0.0, |d| d.seconds as f64 * 1e3 + f64::from(d.nanos) / 1e6)
}

async fn connect(target: &Target) -> Result<InferenceClient<tonic::transport::Channel>> {
    let crate::cluster_cmd::Resolved { uri, endpoint, .. } = target.endpoint()?;
    let channel = endpoint
        .connect_timeout(target.timeout)
        .connect()
        .await
        .with_context(|| format!("cannot reach a trine node at {uri}; is it running? (--node or --data-dir choose which)"))?;
    Ok(InferenceClient::new(channel).max_decoding_message_size(crate::grpc::MAX_MESSAGE_BYTES))
}

/// Streams one answer to stdout (timings on stderr with `verbose`);
/// returns its text.
async fn stream_answer(
    client: &mut InferenceClient<tonic::transport::Channel>,
    uri: &str,
    req: v1::GenerateRequest,
    token: Option<&str>,
    verbose: bool,
) -> Result<String> {
    let mut request = tonic::Request::new(req);
    if let Some(t) = token {
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
        .map_err(crate::cluster_cmd::answered(uri))?
        .into_inner();
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let mut text = String::new();
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(|s| anyhow::anyhow!("{uri}: {}: {}", s.code(), s.message()))?;
        match ev.event {
            Some(v1::generate_response::Event::Token(t)) => {
                out.write_all(t.text.as_bytes())?;
                out.flush()?;
                text.push_str(&t.text);
                if verbose {
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
                if verbose {
                    let finish = v1::FinishReason::try_from(u.finish_reason)
                        .unwrap_or_default()
                        .as_str_name()
                        .trim_start_matches("FINISH_REASON_")
                        .to_lowercase();
                    let total = ms(u.total.as_ref());
                    writeln!(
                        err,
                        "request {}: prompt {} tokens, generated {} ({finish}); first token {:.1} ms ({:.1} ms of it at the serving node), total {total:.1} ms ({:.1} tokens/s); path {:?}, failovers {}",
                        ev.request_id,
                        u.prompt_tokens,
                        u.completion_tokens,
                        ms(u.time_to_first_token.as_ref()),
                        ms(u.serving_time_to_first_token.as_ref()),
                        f64::from(u.completion_tokens) / (total / 1e3).max(1e-9),
                        u.path,
                        u.failovers
                    )?;
                }
                return Ok(text);
            }
            None => {}
        }
    }
    bail!("{uri} ended the answer without its usage")
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
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
    let req = args.client.request(&args.model, input);
    runtime()?.block_on(async {
        let mut client = connect(&args.target).await?;
        stream_answer(
            &mut client,
            &uri,
            req,
            args.client.token.as_deref(),
            args.client.verbose,
        )
        .await
    })?;
    Ok(())
}

/// `trine chat`: a conversation on stdin. Each line is a user turn; the
/// answer streams back and joins the history sent with the next turn.
/// `/reset` forgets the history, `/quit` (or end of input) leaves.
pub fn chat(args: &ChatArgs) -> Result<()> {
    use std::io::{BufRead as _, IsTerminal as _};
    let uri = args.target.uri()?;
    let interactive = std::io::stdin().is_terminal();
    let rt = runtime()?;
    let mut client = rt.block_on(connect(&args.target))?;
    let opening: Vec<v1::ChatMessage> = args
        .system
        .iter()
        .map(|s| v1::ChatMessage {
            role: "system".into(),
            content: s.clone(),
        })
        .collect();
    let mut history = opening.clone();
    if interactive {
        eprintln!(
            "chatting with {} at {uri}; /reset forgets the conversation, /quit or Ctrl-D leaves",
            args.model
        );
    }
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading standard input")?;
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                history.clone_from(&opening);
                if interactive {
                    eprintln!("(conversation forgotten)");
                }
                continue;
            }
            _ => {}
        }
        history.push(v1::ChatMessage {
            role: "user".into(),
            content: line.to_owned(),
        });
        let req = args.client.request(
            &args.model,
            v1::generate_request::Input::Chat(v1::Chat {
                messages: history.clone(),
            }),
        );
        match rt.block_on(stream_answer(
            &mut client,
            &uri,
            req,
            args.client.token.as_deref(),
            args.client.verbose,
        )) {
            Ok(text) => history.push(v1::ChatMessage {
                role: "assistant".into(),
                content: text,
            }),
            Err(e) if interactive => {
                // The turn is dropped; the conversation goes on.
                history.pop();
                eprintln!("error: {e:#}");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
