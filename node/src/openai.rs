//! The OpenAI-compatible HTTP API on every cluster member:
//! `POST /v1/completions`, `POST /v1/chat/completions` (both streaming by
//! server-sent events with `"stream": true`) and `GET /v1/models`, in
//! OpenAI's request and response shapes, errors included
//! (`{"error": {"message", "type", "param", "code"}}` with the matching
//! HTTP status). Requests go through the same router as gRPC
//! ([`crate::serve`]).

use std::convert::Infallible;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_stream::StreamExt as _;
use trine_proto::v1;

use crate::http::AppState;
use crate::serve::{Principal, ServeError, Serving};

fn error(e: &ServeError) -> Response {
    error_response("openai", e)
}

/// A refusal in OpenAI's error JSON with its HTTP status, counted in
/// `trine_requests_total` under `api` (the console's playground uses it too).
pub(crate) fn error_response(api: &'static str, e: &ServeError) -> Response {
    crate::metrics::request(api, e.kind());
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({ "error": { "message": e.to_string(), "type": e.kind(), "param": null, "code": null } })
            .to_string(),
    )
        .into_response()
}

fn serving(s: &AppState) -> Result<&Serving, ServeError> {
    s.serving.as_ref().ok_or_else(|| {
        ServeError::Unavailable(
            "this node is not a cluster member; it serves no models (start it with --init or --join)"
                .into(),
        )
    })
}

fn auth(s: &Serving, headers: &HeaderMap) -> Result<(Option<String>, Principal), ServeError> {
    let a = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let p = s.authenticate(a.as_deref())?;
    Ok((a, p))
}

pub async fn models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let result = (|| {
        let s = serving(&state)?;
        auth(s, &headers)?;
        Ok::<_, ServeError>(s.models())
    })();
    match result {
        Err(e) => error(&e),
        Ok(models) => {
            let data: Vec<Value> = models
                .iter()
                .map(|m| {
                    json!({
                        "id": m.name, "object": "model", "created": 0, "owned_by": "trine",
                        "sha256": m.sha256, "replicas": m.replicas, "ready_replicas": m.ready_replicas,
                    })
                })
                .collect();
            (
                [(header::CONTENT_TYPE, "application/json")],
                json!({ "object": "list", "data": data }).to_string(),
            )
                .into_response()
        }
    }
}

/// A string or a list of strings (OpenAI accepts both for `stop` and
/// `prompt`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
    Tokens(Vec<u32>),
}

#[derive(Debug, Deserialize)]
struct Common {
    model: String,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: bool,
    seed: Option<u64>,
    n: Option<u32>,
    /// Extensions vLLM's OpenAI server also takes.
    top_k: Option<u32>,
    repetition_penalty: Option<f32>,
    /// Trine's extension: the request's deadline in seconds (capped by the
    /// node's --request-timeout).
    timeout: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    #[serde(flatten)]
    common: Common,
    prompt: OneOrMany,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(flatten)]
    common: Common,
    messages: Vec<Message>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: MessageContent,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum MessageContent {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: String,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ServeError> {
    serde_json::from_slice(body)
        .map_err(|e| ServeError::Invalid(format!("the request body is not a valid request: {e}")))
}

/// The `GenerateRequest` for `common` and `input`.
fn request(
    common: &Common,
    input: v1::generate_request::Input,
) -> Result<v1::GenerateRequest, ServeError> {
    if common.n.is_some_and(|n| n != 1) {
        return Err(ServeError::Invalid(
            "n: only 1 choice per request is supported".into(),
        ));
    }
    let stop = match &common.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
        Some(OneOrMany::Tokens(_)) => {
            return Err(ServeError::Invalid("stop: give strings".into()));
        }
    };
    Ok(v1::GenerateRequest {
        model: common.model.clone(),
        input: Some(input),
        sampling: Some(v1::SamplingParams {
            // OpenAI's default temperature is 1.
            temperature: common.temperature.unwrap_or(1.0),
            top_p: common.top_p.unwrap_or(1.0),
            top_k: common.top_k.unwrap_or(0),
            seed: common.seed,
            repetition_penalty: common.repetition_penalty.unwrap_or(1.0),
        }),
        max_tokens: common
            .max_completion_tokens
            .or(common.max_tokens)
            .unwrap_or(16),
        stop,
        timeout: match common.timeout {
            None => None,
            Some(t) if t.is_finite() && t > 0.0 && t <= 86_400.0 => Some(crate::serve::duration(
                std::time::Duration::from_secs_f64(t),
            )),
            Some(t) => {
                return Err(ServeError::Invalid(format!(
                    "timeout {t}: give seconds, more than 0 and at most 86400"
                )));
            }
        },
        ..Default::default()
    })
}

fn now() -> u64 {
    trine_control::clock::now_ms() / 1000
}

fn finish_reason(u: &v1::Usage) -> &'static str {
    match v1::FinishReason::try_from(u.finish_reason).unwrap_or_default() {
        v1::FinishReason::Length => "length",
        _ => "stop",
    }
}

fn usage(u: &v1::Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    Completions,
    Chat,
}

/// The body, or why it was not read (over the node's `max_body_bytes`, or
/// cut off).
type Body = Result<Bytes, axum::extract::rejection::BytesRejection>;

fn body(b: Body, limit: usize) -> Result<Bytes, ServeError> {
    b.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ServeError::TooLarge(format!(
                "the request body is over this node's limit of {limit} bytes (max_body_bytes); shorten the prompt"
            ))
        } else {
            ServeError::Invalid(format!("the request body could not be read: {r}"))
        }
    })
}

pub async fn completions(State(state): State<AppState>, headers: HeaderMap, raw: Body) -> Response {
    let prepared = (|| {
        let body = body(raw, state.max_body)?;
        let s = serving(&state)?;
        let a = auth(s, &headers)?;
        let (req, stream) = completion_request(&body)?;
        Ok((s.clone(), a, req, stream))
    })();
    run(prepared, Api::Completions).await
}

/// A `/v1/completions` body as the `GenerateRequest` it asks for, and
/// whether it wants a stream; or why the body is refused.
pub fn completion_request(body: &[u8]) -> Result<(v1::GenerateRequest, bool), ServeError> {
    let r: CompletionRequest = parse(body)?;
    let input = match r.prompt {
        OneOrMany::One(p) => v1::generate_request::Input::Prompt(p),
        OneOrMany::Many(mut v) if v.len() == 1 => v1::generate_request::Input::Prompt(v.remove(0)),
        OneOrMany::Many(_) => {
            return Err(ServeError::Invalid(
                "prompt: give one string (batches of prompts are not supported)".into(),
            ));
        }
        OneOrMany::Tokens(ids) => v1::generate_request::Input::Tokens(v1::TokenIds { ids }),
    };
    Ok((request(&r.common, input)?, r.common.stream))
}

/// A `/v1/chat/completions` body as the `GenerateRequest` it asks for, and
/// whether it wants a stream; or why the body is refused.
pub fn chat_request(body: &[u8]) -> Result<(v1::GenerateRequest, bool), ServeError> {
    let r: ChatRequest = parse(body)?;
    let messages = r
        .messages
        .into_iter()
        .map(|m| {
            let content = match m.content {
                MessageContent::Text(t) => t,
                MessageContent::Parts(parts) => {
                    if let Some(p) = parts.iter().find(|p| p.kind != "text") {
                        return Err(ServeError::Invalid(format!(
                            "message content of type {:?}: only text is supported",
                            p.kind
                        )));
                    }
                    parts.into_iter().map(|p| p.text).collect()
                }
            };
            let role = if m.role == "developer" {
                "system".to_owned()
            } else {
                m.role
            };
            Ok(v1::ChatMessage { role, content })
        })
        .collect::<Result<Vec<_>, ServeError>>()?;
    let input = v1::generate_request::Input::Chat(v1::Chat { messages });
    Ok((request(&r.common, input)?, r.common.stream))
}

pub async fn chat(State(state): State<AppState>, headers: HeaderMap, raw: Body) -> Response {
    let prepared = (|| {
        let body = body(raw, state.max_body)?;
        let s = serving(&state)?;
        let a = auth(s, &headers)?;
        let (req, stream) = chat_request(&body)?;
        Ok((s.clone(), a, req, stream))
    })();
    run(prepared, Api::Chat).await
}

type Prepared = Result<
    (
        Serving,
        (Option<String>, Principal),
        v1::GenerateRequest,
        bool,
    ),
    ServeError,
>;

async fn run(prepared: Prepared, api: Api) -> Response {
    let (serving, (auth, principal), req, stream) = match prepared {
        Ok(p) => p,
        Err(e) => return error(&e),
    };
    let model = req.model.clone();
    let mut events = match serving.generate(req, false, auth, &principal).await {
        Ok(rx) => rx,
        Err(e) => return error(&e),
    };
    let created = now();
    if !stream {
        let mut text = String::new();
        let mut id = String::new();
        loop {
            match events.recv().await {
                None => {
                    return error(&ServeError::Internal(
                        "the generation ended without a result".into(),
                    ));
                }
                Some(Err(e)) => return error(&e),
                Some(Ok(ev)) => {
                    id.clone_from(&ev.request_id);
                    match ev.event {
                        Some(v1::generate_response::Event::Token(t)) => text.push_str(&t.text),
                        Some(v1::generate_response::Event::Usage(u)) => {
                            crate::metrics::request("openai", "ok");
                            let body = match api {
                                Api::Completions => json!({
                                    "id": format!("cmpl-{id}"), "object": "text_completion",
                                    "created": created, "model": model,
                                    "choices": [{ "text": text, "index": 0, "logprobs": null, "finish_reason": finish_reason(&u) }],
                                    "usage": usage(&u),
                                }),
                                Api::Chat => json!({
                                    "id": format!("chatcmpl-{id}"), "object": "chat.completion",
                                    "created": created, "model": model,
                                    "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": null, "finish_reason": finish_reason(&u) }],
                                    "usage": usage(&u),
                                }),
                            };
                            return (
                                [(header::CONTENT_TYPE, "application/json")],
                                body.to_string(),
                            )
                                .into_response();
                        }
                        None => {}
                    }
                }
            }
        }
    }
    // Streaming: one chunk per token, a last chunk with the finish reason
    // and usage, then [DONE]. An error after the first byte arrives as an
    // `error` object in the stream (the status is already sent).
    let mut first = true;
    let chunks = tokio_stream::wrappers::ReceiverStream::new(events).map(move |ev| {
        let chunk = match ev {
            Err(e) => {
                crate::metrics::request("openai", e.kind());
                json!({ "error": { "message": e.to_string(), "type": e.kind(), "param": null, "code": null } })
            }
            Ok(ev) => {
                let id = &ev.request_id;
                let (delta_text, finish, u) = match &ev.event {
                    Some(v1::generate_response::Event::Token(t)) => (Some(t.text.clone()), None, None),
                    Some(v1::generate_response::Event::Usage(u)) => {
                        crate::metrics::request("openai", "ok");
                        (None, Some(finish_reason(u)), Some(usage(u)))
                    }
                    None => (None, None, None),
                };
                match api {
                    Api::Completions => json!({
                        "id": format!("cmpl-{id}"), "object": "text_completion", "created": created, "model": model,
                        "choices": [{ "text": delta_text.unwrap_or_default(), "index": 0, "logprobs": null, "finish_reason": finish }],
                        "usage": u,
                    }),
                    Api::Chat => {
                        let mut delta = serde_json::Map::new();
                        if first {
                            delta.insert("role".into(), json!("assistant"));
                        }
                        if let Some(t) = delta_text {
                            delta.insert("content".into(), json!(t));
                        }
                        first = false;
                        json!({
                            "id": format!("chatcmpl-{id}"), "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }],
                            "usage": u,
                        })
                    }
                }
            }
        };
        Ok::<_, Infallible>(Event::default().data(chunk.to_string()))
    });
    let done = tokio_stream::once(Ok::<_, Infallible>(Event::default().data("[DONE]")));
    Sse::new(chunks.chain(done))
        .keep_alive(KeepAlive::default())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_take_openai_shapes() {
        let r: CompletionRequest = parse(
            br#"{"model":"m","prompt":"hi","max_tokens":5,"stop":["\n"],"temperature":0,"seed":7,"user":"x"}"#,
        )
        .expect("parse");
        let g =
            request(&r.common, v1::generate_request::Input::Prompt("hi".into())).expect("request");
        assert_eq!(g.max_tokens, 5);
        assert_eq!(g.stop, vec!["\n".to_owned()]);
        assert_eq!(
            g.sampling.as_ref().map(|s| (s.temperature, s.seed)),
            Some((0.0, Some(7)))
        );
        let r: ChatRequest = parse(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"stop":"x"}"#,
        )
        .expect("parse");
        assert_eq!(r.messages.len(), 1);
        let e = parse::<CompletionRequest>(br#"{"prompt":"no model"}"#).expect_err("refused");
        assert_eq!(e.http_status(), 400);
        assert!(e.to_string().contains("model"), "{e}");
        let r: CompletionRequest = parse(br#"{"model":"m","prompt":"x","n":2}"#).expect("parse");
        assert!(request(&r.common, v1::generate_request::Input::Prompt("x".into())).is_err());
    }
}
