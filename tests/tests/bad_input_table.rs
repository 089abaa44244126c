//! One table of bad inputs through every interface of a real node — the
//! OpenAI HTTP API, raw HTTP, gRPC (typed and raw frames), the CLI, the
//! config file and model files — each with the answer it must get: the
//! status (HTTP code, gRPC code, exit code) and the words that name the
//! problem and the fix. While the table runs, a well-behaved client streams
//! a long answer; afterwards the node is the same process, nothing panicked,
//! the chain verifies, the token and the model still work, the client got
//! its whole answer, and nothing a bad input tried to add exists.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use trine_proto::v1;
use trine_tests::{Node, error_lines, free_addr, run, synth_tiny, trine};

/// What an input got: a status ("400", "NotFound", "exit 1", "closed")
/// and the message that came with it.
#[derive(Debug)]
struct Got {
    status: String,
    message: String,
}

/// One row: the interface, the input, and what it must get.
struct Row {
    interface: &'static str,
    input: &'static str,
    status: &'static str,
    says: &'static [&'static str],
    got: Got,
}

async fn post(node: &Node, path: &str, token: Option<&str>, body: Vec<u8>) -> Result<Got> {
    let mut r = reqwest::Client::new()
        .post(node.url(path))
        .header("content-type", "application/json")
        .body(body);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    let r = r.send().await?;
    http_got(r).await
}

async fn http_got(r: reqwest::Response) -> Result<Got> {
    let status = r.status().as_u16().to_string();
    let body = r.text().await?;
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or(body);
    Ok(Got { status, message })
}

fn json(v: serde_json::Value) -> Vec<u8> {
    v.to_string().into_bytes()
}

/// Raw bytes to a TCP port; what comes back until the server closes (or
/// 10 s pass, which counts as a hang).
fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> Result<Got> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(bytes)?;
    let mut back = Vec::new();
    match s.read_to_end(&mut back) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => {
            return Ok(Got {
                status: "hang".into(),
                message: e.to_string(),
            });
        }
    }
    let text = String::from_utf8_lossy(&back).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .map_or_else(|| "closed".to_owned(), str::to_owned);
    Ok(Got {
        status,
        message: text,
    })
}

async fn generate(
    node: &Node,
    token: Option<&str>,
    req: v1::GenerateRequest,
) -> Result<Result<String, tonic::Status>> {
    let mut client = v1::inference_client::InferenceClient::new(node.channel().await?);
    let mut request = tonic::Request::new(req);
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse()?);
    }
    let mut stream = match client.generate(request).await {
        Ok(s) => s.into_inner(),
        Err(s) => return Ok(Err(s)),
    };
    let mut text = String::new();
    loop {
        match stream.message().await {
            Ok(Some(v1::GenerateResponse {
                event: Some(v1::generate_response::Event::Token(t)),
                ..
            })) => text.push_str(&t.text),
            Ok(Some(_)) => {}
            Ok(None) => return Ok(Ok(text)),
            Err(s) => return Ok(Err(s)),
        }
    }
}

fn grpc_got(r: Result<String, tonic::Status>) -> Got {
    match r {
        Ok(text) => Got {
            status: "Ok".into(),
            message: text,
        },
        Err(s) => Got {
            status: format!("{:?}", s.code()),
            message: s.message().to_owned(),
        },
    }
}

fn ask(model: &str, prompt: &str) -> v1::GenerateRequest {
    v1::GenerateRequest {
        model: model.into(),
        input: Some(v1::generate_request::Input::Prompt(prompt.into())),
        max_tokens: 8,
        ..Default::default()
    }
}

/// A gRPC call sent as raw HTTP/2 with `frame` as its body: the
/// grpc-status and grpc-message it gets.
async fn raw_grpc(node: &Node, token: &str, frame: Vec<u8>) -> Result<Got> {
    let tcp = tokio::net::TcpStream::connect(node.endpoints.grpc).await?;
    let (send, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(conn);
    let mut send = send.ready().await?;
    let req = http::Request::post(format!(
        "http://{}/trine.v1.Inference/Generate",
        node.endpoints.grpc
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("authorization", format!("Bearer {token}"))
    .body(())?;
    let (response, mut stream) = send.send_request(req, false)?;
    stream.send_data(prost::bytes::Bytes::from(frame), true)?;
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .context("no answer in 10 s")??;
    // tonic reads grpc-status and the percent-encoded grpc-message.
    let status = match tonic::Status::from_header_map(response.headers()) {
        Some(s) => s,
        None => {
            let mut body = response.into_body();
            while let Some(chunk) = body.data().await {
                chunk?;
            }
            let trailers = body.trailers().await?.unwrap_or_default();
            tonic::Status::from_header_map(&trailers).context("no grpc-status")?
        }
    };
    Ok(Got {
        status: format!("{:?}", status.code()),
        message: status.message().to_owned(),
    })
}

/// A `trine` command: "exit N" and its single error line (all of stderr
/// when there is not exactly one).
fn cli(args: &[&str], files: &[&Path]) -> Result<Got> {
    let mut c = trine();
    c.args(args).args(files);
    let out = run(c, Duration::from_secs(60))?;
    let errors = error_lines(&out.stderr);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    Ok(Got {
        status: format!("exit {}", out.status.code().unwrap_or(-1)),
        message: if errors.len() == 1 && !stderr.contains("panicked") {
            errors[0].clone()
        } else {
            stderr
        },
    })
}

/// [`cli`], with stdout too in the message (commands that list findings
/// there before their error line).
fn cli_all(args: &[&str], files: &[&Path]) -> Result<Got> {
    let mut c = trine();
    c.args(args).args(files);
    let out = run(c, Duration::from_secs(60))?;
    Ok(Got {
        status: format!("exit {}", out.status.code().unwrap_or(-1)),
        message: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_interface_answers_bad_input_with_a_clear_error_and_loses_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = synth_tiny(dir.path())?;
    let raft = free_addr()?;
    let node = Node::start(&[
        "--init",
        "--raft-addr",
        &raft,
        "--max-prompt-tokens",
        "64",
        "--max-body-bytes",
        "4096",
        "--max-message-bytes",
        "65536",
    ])
    .await?;
    let grpc = node.endpoints.grpc.to_string();
    let deployed = cli(&["deploy", "--node", &grpc, "--name", "tiny"], &[&model])?;
    ensure!(deployed.status == "exit 0", "{deployed:?}");
    let mut c = trine();
    c.args(["token", "create", "--node", &grpc, "user1"]);
    let out = run(c, Duration::from_secs(30))?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout)?
        .lines()
        .next()
        .context("no secret printed")?
        .trim()
        .to_owned();
    let tok = Some(token.as_str());
    let answer = trine_tests::wait_for("tiny served", Duration::from_secs(60), || async {
        generate(&node, tok, ask("tiny", "Hello")).await.ok()?.ok()
    })
    .await?;
    ensure!(!answer.is_empty());
    let pid = node.pid();
    let height_before = trine_tests::chain_note(&grpc, "before the table")?;

    // A well-behaved client asks again and again while the table runs;
    // every answer must be the reference.
    let long = v1::GenerateRequest {
        max_tokens: 100,
        sampling: Some(v1::SamplingParams {
            repetition_penalty: 5.0,
            ..Default::default()
        }),
        ..ask("tiny", "Once upon a time")
    };
    let reference = generate(&node, tok, long.clone()).await??;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let during = {
        let channel = node.channel().await?;
        let (token, long, reference) = (token.clone(), long.clone(), reference.clone());
        tokio::spawn(async move {
            let mut answers = 0u32;
            while !*stopped.borrow() {
                let mut client = v1::inference_client::InferenceClient::new(channel.clone());
                let mut request = tonic::Request::new(long.clone());
                request
                    .metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse()?);
                let mut stream = client.generate(request).await?.into_inner();
                let mut text = String::new();
                while let Some(ev) = stream.message().await? {
                    if let Some(v1::generate_response::Event::Token(t)) = ev.event {
                        text.push_str(&t.text);
                    }
                }
                ensure!(
                    text == reference,
                    "answer {answers}: {text:?}, not {reference:?}"
                );
                answers += 1;
            }
            anyhow::Ok(answers)
        })
    };

    // Files the CLI and config rows use.
    let files = dir.path();
    let tiny = std::fs::read(&model)?;
    let truncated = files.join("truncated.gguf");
    std::fs::write(&truncated, &tiny[..tiny.len() / 2])?;
    let huge_count = files.join("huge-count.gguf");
    let mut header = b"GGUF".to_vec();
    header.extend_from_slice(&3u32.to_le_bytes());
    header.extend_from_slice(&(1u64 << 60).to_le_bytes());
    header.extend_from_slice(&0u64.to_le_bytes());
    std::fs::write(&huge_count, &header)?;
    let not_gguf = files.join("notes.gguf");
    std::fs::write(&not_gguf, b"just some text, not a model")?;
    let hf = files.join("hf");
    std::fs::create_dir_all(&hf)?;
    std::fs::write(
        hf.join("config.json"),
        b"{\"architectures\": [\"BitNetForCausalLM\"]}",
    )?;
    let mut st = (1u64 << 62).to_le_bytes().to_vec();
    st.extend_from_slice(b"{}");
    std::fs::write(hf.join("model.safetensors"), &st)?;
    let bad_config = files.join("trine.toml");
    std::fs::write(&bad_config, b"max_tokens = \"many\"\n")?;
    let unknown_key = files.join("unknown.toml");
    std::fs::write(&unknown_key, b"max_tokenz = 5\n")?;

    let v = |v: serde_json::Value| json(v);
    let completions = "/v1/completions";
    let chat = "/v1/chat/completions";
    let mut rows = vec![
        Row {
            interface: "HTTP",
            input: "body that is not JSON",
            status: "400",
            says: &["not a valid request", "EOF"],
            got: post(&node, completions, tok, b"{\"model\":".to_vec()).await?,
        },
        Row {
            interface: "HTTP",
            input: "body that is not UTF-8",
            status: "400",
            says: &["not a valid request"],
            got: post(&node, completions, tok, vec![0xff, 0xfe, b'{']).await?,
        },
        Row {
            interface: "HTTP",
            input: "a field of the wrong type",
            status: "400",
            says: &["not a valid request", "\"ten\"", "u32"],
            got: post(&node, completions, tok, v(serde_json::json!({"model": "tiny", "prompt": "Hi", "max_tokens": "ten"}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "a negative max_tokens",
            status: "400",
            says: &["-3"],
            got: post(&node, completions, tok, v(serde_json::json!({"model": "tiny", "prompt": "Hi", "max_tokens": -3}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "a missing prompt",
            status: "400",
            says: &["missing field `prompt`"],
            got: post(&node, completions, tok, v(serde_json::json!({"model": "tiny"}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "an unknown model",
            status: "404",
            says: &["\"nope\" is not deployed", "/v1/models"],
            got: post(&node, completions, tok, v(serde_json::json!({"model": "nope", "prompt": "Hi"}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "a chat with no messages",
            status: "400",
            says: &["no messages"],
            got: post(&node, chat, tok, v(serde_json::json!({"model": "tiny", "messages": []}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "an unknown chat role",
            status: "400",
            says: &["\"wizard\"", "system, user or assistant"],
            got: post(&node, chat, tok, v(serde_json::json!({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "a negative temperature",
            status: "400",
            says: &["temperature must be between 0"],
            got: post(&node, completions, tok, v(serde_json::json!({"model": "tiny", "prompt": "Hi", "temperature": -1}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "top_p out of range",
            status: "400",
            says: &["top_p"],
            got: post(&node, completions, tok, v(serde_json::json!({"model": "tiny", "prompt": "Hi", "top_p": 7}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "more than one choice (n = 5)",
            status: "400",
            says: &["n:", "1 choice"],
            got: post(&node, completions, tok, v(serde_json::json!({"model": "tiny", "prompt": "Hi", "n": 5}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "100 stop strings",
            status: "400",
            says: &["stop takes at most 4"],
            got: post(&node, completions, tok, v(serde_json::json!({"model": "tiny", "prompt": "Hi", "stop": vec!["x"; 100]}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "max_tokens over the node's limit",
            status: "400",
            says: &["max_tokens 99999999", "limit of 4096", "max_tokens setting"],
            got: post(&node, completions, tok, v(serde_json::json!({"model": "tiny", "prompt": "Hi", "max_tokens": 99_999_999}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "a prompt over max_prompt_tokens",
            status: "400",
            says: &["max_prompt_tokens", "shorten the prompt"],
            got: post(&node, completions, tok, v(serde_json::json!({"model": "tiny", "prompt": "word ".repeat(500)}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "a body over max_body_bytes",
            status: "413",
            says: &["max_body_bytes"],
            got: post(&node, completions, tok, v(serde_json::json!({"model": "tiny", "prompt": "a".repeat(10_000)}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "JSON nested 2,000 deep",
            status: "400",
            says: &["not a valid request", "recursion limit"],
            got: post(&node, completions, tok, format!("{{\"model\":\"tiny\",\"prompt\":\"Hi\",\"stop\":{}{}}}", "[".repeat(2000), "]".repeat(2000)).into_bytes()).await?,
        },
        Row {
            interface: "HTTP",
            input: "no token",
            status: "401",
            says: &["no API token", "trine token create"],
            got: post(&node, completions, None, v(serde_json::json!({"model": "tiny", "prompt": "Hi"}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "an unknown token",
            status: "401",
            says: &["unknown or revoked", "trine token list"],
            got: post(&node, completions, Some("trn_0000"), v(serde_json::json!({"model": "tiny", "prompt": "Hi"}))).await?,
        },
        Row {
            interface: "HTTP",
            input: "an unknown path",
            status: "404",
            says: &["no such path /v1/nothing", "/v1/completions"],
            got: post(&node, "/v1/nothing", tok, b"{}".to_vec()).await?,
        },
        Row {
            interface: "HTTP",
            input: "GET on a POST endpoint",
            status: "405",
            says: &["GET is not served on /v1/completions", "POST"],
            got: http_got(reqwest::get(node.url(completions)).await?).await?,
        },
        Row {
            interface: "raw HTTP",
            input: "bytes that are not HTTP",
            status: "400",
            says: &[],
            got: raw(node.endpoints.http, b"\x16\x03\x01garbage\r\n\r\n")?,
        },
        Row {
            interface: "gRPC",
            input: "an unknown model",
            status: "NotFound",
            says: &["\"nope\" is not deployed"],
            got: grpc_got(generate(&node, tok, ask("nope", "Hi")).await?),
        },
        Row {
            interface: "gRPC",
            input: "no token",
            status: "Unauthenticated",
            says: &["no API token"],
            got: grpc_got(generate(&node, None, ask("tiny", "Hi")).await?),
        },
        Row {
            interface: "gRPC",
            input: "a negative temperature",
            status: "InvalidArgument",
            says: &["temperature"],
            got: grpc_got(
                generate(&node, tok, v1::GenerateRequest { sampling: Some(v1::SamplingParams { temperature: -1.0, ..Default::default() }), ..ask("tiny", "Hi") }).await?,
            ),
        },
        Row {
            interface: "gRPC",
            input: "no prompt",
            status: "InvalidArgument",
            says: &["prompt"],
            got: grpc_got(
                generate(&node, tok, v1::GenerateRequest { input: None, ..ask("tiny", "Hi") }).await?,
            ),
        },
        Row {
            interface: "gRPC",
            input: "a message over max_message_bytes",
            status: "OutOfRange",
            says: &["65536"],
            got: grpc_got(generate(&node, tok, ask("tiny", &"a".repeat(100_000))).await?),
        },
        Row {
            interface: "raw gRPC",
            input: "a frame claiming 4 GiB",
            status: "OutOfRange",
            says: &["65536"],
            got: raw_grpc(&node, &token, vec![0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3]).await?,
        },
        Row {
            interface: "raw gRPC",
            input: "a frame that is not protobuf",
            status: "Internal",
            says: &["decode"],
            got: raw_grpc(&node, &token, vec![0, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff]).await?,
        },
        Row {
            interface: "raw gRPC port",
            input: "bytes that are not HTTP/2",
            status: "closed",
            says: &[],
            got: raw(node.endpoints.grpc, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?,
        },
        Row {
            interface: "CLI",
            input: "deploy a truncated model file",
            status: "exit 1",
            says: &["truncated.gguf", "lies outside the file", "fetch it again"],
            got: cli(&["deploy", "--node", &grpc, "--name", "bad"], &[&truncated])?,
        },
        Row {
            interface: "CLI",
            input: "complete with an unknown model",
            status: "exit 1",
            says: &["\"nope\" is not deployed"],
            got: cli(&["complete", "--node", &grpc, "-m", "nope", "--token", &token, "Hi"], &[])?,
        },
        Row {
            interface: "CLI",
            input: "a token name with spaces",
            status: "exit 1",
            says: &["\"bad name!\"", "letters, digits"],
            got: cli(&["token", "create", "--node", &grpc, "bad name!"], &[])?,
        },
        Row {
            interface: "CLI",
            input: "a block height past the head",
            status: "exit 1",
            says: &["no block at height 99999999"],
            got: cli(&["chain", "show", "--node", &grpc, "99999999"], &[])?,
        },
        Row {
            interface: "CLI",
            input: "a node address that is not one",
            status: "exit 1",
            says: &["not a valid address"],
            got: cli(&["status", "--node", "http://[::1"], &[])?,
        },
        Row {
            interface: "config",
            input: "a value of the wrong type",
            status: "exit 78",
            says: &["trine.toml, line 1", "\"many\"", "expected u32", "--print-config"],
            got: cli(&["node", "--print-config", "--config"], &[&bad_config])?,
        },
        Row {
            interface: "config",
            input: "a kernel this CPU does not run",
            status: "exit 78",
            says: &["kernel", "avx1024", "give auto", "scalar"],
            got: cli(&["node", "--print-config", "--kernel", "avx1024"], &[])?,
        },
        Row {
            interface: "config",
            input: "an unknown key",
            status: "exit 78",
            says: &["unknown field `max_tokenz`", "--print-config"],
            got: cli(&["node", "--print-config", "--config"], &[&unknown_key])?,
        },
        Row {
            interface: "model file",
            input: "GGUF claiming 2^60 tensors",
            status: "exit 1",
            says: &["tensor count", "claims 1152921504606846976", "corrupt"],
            got: cli(&["model", "inspect"], &[&huge_count])?,
        },
        Row {
            interface: "model file",
            input: "a text file named .gguf",
            status: "exit 1",
            says: &["not a GGUF file"],
            got: cli(&["model", "inspect"], &[&not_gguf])?,
        },
        Row {
            interface: "model file",
            input: "safetensors header claiming 2^62 bytes",
            status: "exit 1",
            says: &["model.safetensors", "claims 4611686018427387904 bytes", "fetch the file again"],
            got: cli_all(&["model", "inspect"], &[&hf])?,
        },
        Row {
            interface: "model file",
            input: "generate from a truncated file",
            status: "exit 1",
            says: &["truncated.gguf", "truncated"],
            got: cli(&["generate", "-n", "2", "--model"], &[&truncated, Path::new("Hi")])?,
        },
    ];

    // Every row, then one report of all that differ.
    let mut wrong = Vec::new();
    for r in &mut rows {
        let status_ok = r.got.status == r.status;
        let says_ok = r.says.iter().all(|s| r.got.message.contains(s));
        let no_panic = !r.got.message.contains("panicked");
        if !(status_ok && says_ok && no_panic) {
            wrong.push(format!(
                "{} / {}: want {} saying {:?}, got {} {:?}",
                r.interface, r.input, r.status, r.says, r.got.status, r.got.message
            ));
        }
    }
    ensure!(
        wrong.is_empty(),
        "{} of {} rows:\n{}",
        wrong.len(),
        rows.len(),
        wrong.join("\n")
    );

    // Nothing lost, nobody else hurt.
    stop.send(true)?;
    let answers = tokio::time::timeout(Duration::from_secs(120), during)
        .await
        .context("the well-behaved client's answer never finished")???;
    ensure!(answers > 0, "the client beside the table got no answer");
    ensure!(node.pid() == pid, "the node restarted");
    let logs = node.logs();
    ensure!(!logs.contains("panicked"), "{logs}");
    let after = generate(&node, tok, ask("tiny", "Hello")).await??;
    ensure!(
        after == answer,
        "the token or the model stopped working: {after:?}"
    );
    let height_after = trine_tests::chain_note(&grpc, "after the table")?;
    ensure!(height_after > height_before);
    let verify = cli(&["chain", "verify", "--node", &grpc], &[])?;
    ensure!(verify.status == "exit 0", "{verify:?}");
    let models: Vec<serde_json::Value> =
        trine_tests::cli_json(&["placement", "--node", &grpc, "-o", "json"])?;
    ensure!(
        models.iter().all(|m| m.to_string().contains("\"tiny\"")),
        "a bad deploy left something placed: {models:?}"
    );
    Ok(())
}
