//! `trine bench serve`: serving as a client sees it, on a real cluster of
//! `trine node` processes. It starts a `trine testnet` (or uses a running
//! cluster with `--node`), then for each client count streams greedy
//! requests for `--duration` and reports throughput, time to first token
//! and inter-token gaps as measured at the client, and the time to first
//! token split in two: the serving node's own (as it reports it in the
//! usage) and the rest, the way there and back; with `--local`, the same
//! model run in this process (no cluster, no network; medians of several
//! runs) as the baseline the cluster's overhead is measured against; with
//! `--failovers N` (own
//! testnet only), N rounds of freezing the node serving a stream mid-answer
//! and measuring the pause the client sees.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;
use tokio_stream::StreamExt as _;
use trine_proto::v1;
use trine_proto::v1::inference_client::InferenceClient;

use crate::bench_cmd::percentile;
use crate::testnet_cmd::Latency;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Benchmark this running cluster (a node's gRPC address) instead of
    /// starting a testnet.
    #[arg(long, value_name = "HOST:PORT")]
    pub node: Option<String>,
    /// The deployed model to ask for (the testnet's default is tiny).
    #[arg(long, short = 'm', default_value = "tiny")]
    pub model: String,
    /// The model file for the testnet to deploy (and for --local)
    /// [default: the testnet's synthetic tiny].
    #[arg(long, value_name = "PATH")]
    pub model_path: Option<PathBuf>,
    /// Concurrent clients, one run each (closed loop: each client sends its
    /// next request when its answer is done).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub clients: Vec<usize>,
    /// Open loop instead: requests arrive at this fixed rate (per second)
    /// whatever the answers do, for --duration or --requests, whichever
    /// ends first; latencies count from each request's scheduled arrival.
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
    /// With --rate: most requests.
    #[arg(long)]
    pub requests: Option<usize>,
    /// The node the clients send to, by name (own testnet) [default: the
    /// first node].
    #[arg(long, value_name = "NAME")]
    pub entry: Option<String>,
    /// How long each run streams requests.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Tokens per answer.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    #[arg(long, default_value = "The capital of France is")]
    pub prompt: String,
    /// The testnet's simulated latency.
    #[arg(long, value_enum, default_value = "realistic")]
    pub latency: Latency,
    /// Replicas the testnet deploys.
    #[arg(long, default_value_t = 2)]
    pub replicas: u32,
    /// The testnet nodes' --max-batch (1: no continuous batching).
    #[arg(long)]
    pub max_batch: Option<u32>,
    /// Also run the model in this process, one stream, as the baseline
    /// (set up as the nodes are, from the TRINE_QUANT_EMBD,
    /// TRINE_WEIGHT_LAYOUT and TRINE_KERNEL they inherit; medians of 5
    /// runs after a warm-up).
    #[arg(long)]
    pub local: bool,
    /// Rounds of freezing (SIGSTOP) the node serving a stream mid-answer;
    /// the pause is the longest gap between tokens the client saw.
    #[arg(long, default_value_t = 0)]
    pub failovers: usize,
    /// First port of the testnet.
    #[arg(long, default_value_t = 7600)]
    pub base_port: u16,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One client count's run.
#[derive(Debug, Serialize)]
struct Run {
    /// Concurrent clients (closed loop), or 0 for an open-loop run.
    clients: usize,
    /// Arrivals per second (open loop).
    rate: Option<f64>,
    requests: usize,
    errors: usize,
    tokens: usize,
    seconds: f64,
    tokens_per_second: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    /// The first token's time as the serving node measured it (from the
    /// request's arrival there): its own queueing and prefill.
    node_ttft_p50_ms: f64,
    /// Per request, the client's TTFT less the serving node's: the way
    /// there and back (client to entry, forwarding, the simulated RTT).
    way_p50_ms: f64,
    itl_p50_ms: f64,
    itl_p99_ms: f64,
    /// Requests by the first node on their path.
    served_by: std::collections::BTreeMap<String, usize>,
    /// The first error, if any.
    first_error: Option<String>,
}

#[derive(Debug, Serialize)]
struct Local {
    ttft_ms: f64,
    itl_p50_ms: f64,
    itl_p99_ms: f64,
    tokens_per_second: f64,
}

#[derive(Debug, Serialize)]
struct Failovers {
    rounds: usize,
    failed_over: usize,
    /// Freezes that missed (the router had picked the other replica).
    missed: usize,
    pause_p50_ms: f64,
    pause_p99_ms: f64,
    pause_max_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    model: String,
    entry: String,
    max_tokens: u32,
    latency: String,
    max_batch: Option<u32>,
    runs: Vec<Run>,
    local: Option<Local>,
    failovers: Option<Failovers>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A testnet this bench started; stopped on drop.
struct Net {
    child: Child,
    root: tempfile::TempDir,
    grpc: String,
}

impl Drop for Net {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

fn start_testnet(args: &ServeArgs) -> Result<Net> {
    let root = tempfile::Builder::new()
        .prefix("trine-bench-serve-")
        .tempdir()?;
    let exe = std::env::current_exe().context("locating the trine binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("testnet")
        .arg("--data-dir")
        .arg(root.path().join("net"))
        .args(["--base-port", &args.base_port.to_string()])
        .args(["--replicas", &args.replicas.to_string()])
        .args(["--model-name", &args.model])
        .args([
            "--latency",
            match args.latency {
                Latency::Realistic => "realistic",
                Latency::None => "none",
            },
        ]);
    if let Some(b) = args.max_batch {
        cmd.args(["--max-batch", &b.to_string()]);
    }
    if let Some(p) = &args.model_path {
        cmd.arg("--model").arg(p);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting trine testnet")?;
    let stdout = child.stdout.take().context("testnet stdout")?;
    let mut net = Net {
        child,
        root,
        grpc: format!("127.0.0.1:{}", args.base_port),
    };
    eprintln!("starting a testnet for the benchmark…");
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        if line.contains("press Ctrl-C") {
            return Ok(net);
        }
    }
    let status = net.child.wait()?;
    bail!(
        "the testnet exited ({status}) before it was ready; run `trine testnet --base-port {}` to see why",
        args.base_port
    )
}

async fn client(addr: &str) -> Result<InferenceClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot reach {addr}"))?;
    Ok(InferenceClient::new(channel))
}

fn request(args: &ServeArgs) -> v1::GenerateRequest {
    v1::GenerateRequest {
        model: args.model.clone(),
        input: Some(v1::generate_request::Input::Prompt(args.prompt.clone())),
        sampling: Some(v1::SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            ..Default::default()
        }),
        max_tokens: args.max_tokens,
        ..Default::default()
    }
}

/// One streamed answer as the client saw it: when each token arrived
/// (from the send), and the usage.
struct Answer {
    arrivals: Vec<Duration>,
    usage: v1::Usage,
}

/// Times count from `t0` (the send, or an open-loop arrival's schedule).
async fn stream(
    c: &mut InferenceClient<tonic::transport::Channel>,
    req: v1::GenerateRequest,
    t0: Instant,
    mut on_token: impl FnMut(usize),
) -> Result<Answer> {
    let mut s = c.generate(req).await?.into_inner();
    let mut arrivals = Vec::new();
    let mut last_index = None;
    while let Some(ev) = s.next().await {
        match ev?.event {
            // A repeated index carries held-back text, not a token.
            Some(v1::generate_response::Event::Token(t)) if last_index != Some(t.index) => {
                last_index = Some(t.index);
                arrivals.push(t0.elapsed());
                on_token(arrivals.len());
            }
            Some(v1::generate_response::Event::Usage(usage)) => {
                return Ok(Answer { arrivals, usage });
            }
            _ => {}
        }
    }
    bail!("the stream ended without its usage")
}

/// How a run sends requests.
#[derive(Debug, Clone, Copy)]
enum Load {
    /// n clients, each sending its next request when its answer is done.
    Closed(usize),
    /// Arrivals at a fixed rate, at most `count`.
    Open { rate: f64, count: usize },
}

async fn run_level(
    args: &ServeArgs,
    addr: &str,
    load: Load,
    names: &std::collections::BTreeMap<u64, String>,
) -> Result<Run> {
    let started = Instant::now();
    let until = started + args.duration;
    let mut tasks = Vec::new();
    match load {
        Load::Closed(clients) => {
            for _ in 0..clients {
                let (addr, req) = (addr.to_owned(), request(args));
                tasks.push(tokio::spawn(async move {
                    let mut c = client(&addr).await?;
                    let mut answers = Vec::new();
                    let mut errors = Vec::new();
                    while Instant::now() < until {
                        match stream(&mut c, req.clone(), Instant::now(), |_| {}).await {
                            Ok(a) => answers.push(a),
                            Err(e) => errors.push(format!("{e:#}")),
                        }
                    }
                    anyhow::Ok((answers, errors))
                }));
            }
        }
        Load::Open { rate, count } => {
            let c = client(addr).await?;
            let every = Duration::from_secs_f64(1.0 / rate);
            for i in 0..count {
                let due = started + every.mul_f64(i as f64);
                if due >= until {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                let (mut c, req) = (c.clone(), request(args));
                tasks.push(tokio::spawn(async move {
                    match stream(&mut c, req, due, |_| {}).await {
                        Ok(a) => anyhow::Ok((vec![a], Vec::new())),
                        Err(e) => anyhow::Ok((Vec::new(), vec![format!("{e:#}")])),
                    }
                }));
            }
        }
    }
    let (mut ttft, mut itl) = (Vec::new(), Vec::new());
    let (mut node_ttft, mut way) = (Vec::new(), Vec::new());
    let (mut requests, mut errors, mut tokens) = (0, 0, 0);
    let mut first_error = None;
    let mut served_by = std::collections::BTreeMap::new();
    for t in tasks {
        let (answers, e) = t.await??;
        errors += e.len();
        if first_error.is_none() {
            first_error = e.into_iter().next();
        }
        for a in answers {
            requests += 1;
            tokens += a.arrivals.len();
            if let Some(first) = a.arrivals.first() {
                ttft.push(*first);
                if let Some(node) = a
                    .usage
                    .serving_time_to_first_token
                    .and_then(|d| Duration::try_from(d).ok())
                {
                    node_ttft.push(node);
                    way.push(first.saturating_sub(node));
                }
            }
            itl.extend(a.arrivals.windows(2).map(|w| w[1] - w[0]));
            if let Some(n) = a.usage.path.first() {
                let name = names.get(n).cloned().unwrap_or_else(|| n.to_string());
                *served_by.entry(name).or_default() += 1;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    ttft.sort();
    itl.sort();
    node_ttft.sort();
    way.sort();
    let (clients, rate) = match load {
        Load::Closed(c) => (c, None),
        Load::Open { rate, .. } => (0, Some(rate)),
    };
    Ok(Run {
        clients,
        rate,
        requests,
        errors,
        tokens,
        seconds,
        tokens_per_second: tokens as f64 / seconds,
        ttft_p50_ms: ms(percentile(&ttft, 0.5)),
        ttft_p99_ms: ms(percentile(&ttft, 0.99)),
        node_ttft_p50_ms: ms(percentile(&node_ttft, 0.5)),
        way_p50_ms: ms(percentile(&way, 0.5)),
        itl_p50_ms: ms(percentile(&itl, 0.5)),
        itl_p99_ms: ms(percentile(&itl, 0.99)),
        served_by,
        first_error,
    })
}

/// The model in this process, one stream: the no-cluster baseline.
fn run_local(args: &ServeArgs, path: &Path) -> Result<Local> {
    use trine_engine::sampler::{Sampler, Settings};
    let (mut model, tokenizer) =
        trine_engine::open(path, None).with_context(|| format!("opening {}", path.display()))?;
    let pool = crate::generate_cmd::pool(None)?;
    // Set up as the testnet's nodes set up their stage (and as `trine
    // generate` does): the lm_head, weight layout and kernel they take from
    // the environment they inherit, kernels measured in the pool.
    let setting = |var: &str| std::env::var(var).ok().filter(|v| !v.is_empty());
    if let Some(v) = setting("TRINE_QUANT_EMBD") {
        model.set_lm_head(v.parse().map_err(anyhow::Error::msg)?);
    }
    let layout = match setting("TRINE_WEIGHT_LAYOUT") {
        Some(v) => v.parse().map_err(anyhow::Error::msg)?,
        None => trine_engine::model::WeightLayout::default(),
    };
    let kernel = match setting("TRINE_KERNEL").filter(|k| k != "auto") {
        Some(k) => Some(crate::generate_cmd::kernel(&k)?),
        None => None,
    };
    pool.install(|| model.choose(layout, kernel));
    let prompt = tokenizer.encode_prompt(&args.prompt);
    // Medians over several runs, as the cluster's figures are medians over
    // its requests (a best-of would flatter the baseline); the first run
    // warms the caches and is not counted.
    let (mut ttft, mut itl, mut rates) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..=LOCAL_RUNS {
        let t0 = Instant::now();
        let mut arrivals = Vec::new();
        let mut sampler = Sampler::new(Settings::default());
        pool.install(|| {
            trine_engine::generate::generate(
                &model,
                &tokenizer,
                &prompt,
                args.max_tokens as usize,
                &mut sampler,
                |t, _| {
                    if t != u32::MAX {
                        arrivals.push(t0.elapsed());
                    }
                    true
                },
            )
        })?;
        let (Some(&first), Some(&total)) = (arrivals.first(), arrivals.last()) else {
            bail!("the local run generated no token");
        };
        if run == 0 {
            continue;
        }
        ttft.push(first);
        itl.extend(arrivals.windows(2).map(|w| w[1] - w[0]));
        rates.push(arrivals.len() as f64 / total.as_secs_f64().max(1e-9));
    }
    ttft.sort();
    itl.sort();
    rates.sort_by(f64::total_cmp);
    Ok(Local {
        ttft_ms: ms(percentile(&ttft, 0.5)),
        itl_p50_ms: ms(percentile(&itl, 0.5)),
        itl_p99_ms: ms(percentile(&itl, 0.99)),
        tokens_per_second: rates[rates.len() / 2],
    })
}

/// Counted runs of the local baseline.
const LOCAL_RUNS: usize = 5;

/// The endpoints of every node of the testnet under `root`.
fn nodes(root: &Path) -> Vec<crate::datadir::Endpoints> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Vec::new();
    };
    let mut v: Vec<_> = entries
        .filter_map(Result::ok)
        .filter_map(|e| crate::datadir::DataDir::read_endpoints(&e.path().join("data")))
        .collect();
    v.sort_by_key(|e| e.grpc.port());
    v
}

async fn all_ready(addr: &str, model: &str) -> Result<bool> {
    let mut c = client(addr).await?;
    let l = c
        .list_models(v1::ListModelsRequest::default())
        .await?
        .into_inner();
    Ok(l.models
        .iter()
        .any(|m| m.name == model && m.ready_replicas == m.replicas))
}

async fn wait_ready(addr: &str, model: &str) -> Result<()> {
    let t = Instant::now();
    while !all_ready(addr, model).await.unwrap_or(false) {
        ensure!(
            t.elapsed() < Duration::from_secs(120),
            "{model} did not get all its replicas ready again within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Freezes the node serving a stream after its 8th token, `rounds` times;
/// the pause is the longest gap between two tokens of that stream.
async fn run_failovers(args: &ServeArgs, root: &Path, rounds: usize) -> Result<Failovers> {
    let mut pauses = Vec::new();
    let mut missed = 0;
    let mut round = 0;
    while pauses.len() < rounds {
        round += 1;
        ensure!(
            missed <= rounds,
            "{missed} freezes missed the stream; the serving node could not be predicted"
        );
        let all = nodes(root);
        wait_ready(&all[0].grpc.to_string(), &args.model).await?;
        // Find an entry node that forwards (so freezing the replica does
        // not also cut the client off), and the node it forwards to.
        let mut chosen = None;
        for entry in &all {
            let mut c = client(&entry.grpc.to_string()).await?;
            let mut probe = request(args);
            probe.max_tokens = 1;
            let a = stream(&mut c, probe, Instant::now(), |_| {}).await?;
            let serving = a.usage.path.first().copied();
            if serving.is_some() && serving != entry.node_id {
                let target = all
                    .iter()
                    .find(|e| e.node_id == serving)
                    .context("the serving node's endpoints")?;
                chosen = Some((entry.grpc.to_string(), target.pid, target.node_id));
                break;
            }
        }
        let (entry, pid, target) =
            chosen.context("no node forwards: deploy fewer replicas than nodes")?;
        let pid = Pid::from_raw(i32::try_from(pid)?);
        let mut c = client(&entry).await?;
        let mut frozen = false;
        let answer = stream(&mut c, request(args), Instant::now(), |n| {
            if n == 8 && !frozen {
                frozen = kill(pid, Signal::SIGSTOP).is_ok();
            }
        })
        .await;
        kill(pid, Signal::SIGCONT)?;
        let a = answer?;
        if a.usage.failovers == 0 || a.usage.path.first().copied() != target {
            // The router chose another replica this time (or the answer
            // was done before the freeze): nothing was measured.
            missed += 1;
            eprintln!("failover round {round}: the frozen node was not serving the stream; again");
            continue;
        }
        let pause = a
            .arrivals
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        eprintln!(
            "failover round {round}: pause {:.0} ms, path {:?}",
            ms(pause),
            a.usage.path
        );
        pauses.push(pause);
    }
    let failed_over = pauses.len();
    pauses.sort();
    Ok(Failovers {
        rounds,
        failed_over,
        missed,
        pause_p50_ms: ms(percentile(&pauses, 0.5)),
        pause_p99_ms: ms(percentile(&pauses, 0.99)),
        pause_max_ms: ms(pauses.last().copied().unwrap_or_default()),
    })
}

pub fn run(args: &ServeArgs) -> Result<()> {
    if args.clients.is_empty() || args.clients.contains(&0) || args.max_tokens == 0 {
        bail!("--clients takes counts of at least 1, and --max-tokens at least 1");
    }
    if args
        .rate
        .is_some_and(|r| !(r.is_finite() && r > 0.0 && r <= 10_000.0))
    {
        bail!("--rate takes requests per second, more than 0 and at most 10000");
    }
    if args.failovers > 0 && args.node.is_some() {
        bail!("--failovers freezes nodes of a testnet this bench starts; drop --node");
    }
    let net = match &args.node {
        Some(_) => None,
        None => Some(start_testnet(args)?),
    };
    // Node names by id and the entry's address, from the testnet's files.
    let mut names = std::collections::BTreeMap::new();
    let mut entry_addr = None;
    if let Some(n) = &net {
        let root = n.root.path().join("net");
        for (name, grpc) in crate::testnet_cmd::node_ports(&root)? {
            let e = crate::datadir::DataDir::read_endpoints(&root.join(&name).join("data"));
            if let Some(id) = e.and_then(|e| e.node_id) {
                names.insert(id, name.clone());
            }
            if args.entry.as_deref() == Some(name.as_str()) {
                entry_addr = Some(format!("127.0.0.1:{grpc}"));
            }
        }
    }
    let addr = match (&args.node, &net, &args.entry) {
        (Some(n), _, _) => n.clone(),
        (None, Some(_), Some(e)) => entry_addr
            .with_context(|| format!("--entry {e}: the testnet has no node of that name"))?,
        (None, Some(n), None) => n.grpc.clone(),
        (None, None, _) => unreachable!("a testnet was started"),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut report = Report {
        model: args.model.clone(),
        entry: args.entry.clone().unwrap_or_else(|| addr.clone()),
        max_tokens: args.max_tokens,
        latency: format!("{:?}", args.latency).to_lowercase(),
        max_batch: args.max_batch,
        runs: Vec::new(),
        local: None,
        failovers: None,
    };
    runtime.block_on(async {
        wait_ready(&addr, &args.model).await?;
        let loads: Vec<Load> = match args.rate {
            Some(rate) => vec![Load::Open {
                rate,
                count: args.requests.unwrap_or(usize::MAX),
            }],
            None => args.clients.iter().map(|&c| Load::Closed(c)).collect(),
        };
        for load in loads {
            eprintln!(
                "{load:?} for {}…",
                humantime::format_duration(args.duration)
            );
            report
                .runs
                .push(run_level(args, &addr, load, &names).await?);
        }
        if let Some(n) = &net
            && args.failovers > 0
        {
            report.failovers =
                Some(run_failovers(args, &n.root.path().join("net"), args.failovers).await?);
        }
        anyhow::Ok(())
    })?;
    if args.local {
        let path = match (&args.model_path, &net) {
            (Some(p), _) => p.clone(),
            (None, Some(n)) => n.root.path().join("net").join("models").join("tiny.gguf"),
            (None, None) => bail!("--local with --node needs --model-path"),
        };
        report.local = Some(run_local(args, &path)?);
    }
    drop(net);
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &report)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "model {}, entry {}, {} tokens per answer, latency {}, max batch {}",
        report.model,
        report.entry,
        report.max_tokens,
        report.latency,
        report
            .max_batch
            .map_or_else(|| "node default".to_owned(), |b| b.to_string())
    )?;
    writeln!(
        out,
        "{:>7} {:>8} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  served by",
        "clients",
        "requests",
        "errors",
        "tokens/s",
        "TTFT p50",
        "TTFT p99",
        "node p50",
        "way p50",
        "ITL p50",
        "ITL p99"
    )?;
    for r in &report.runs {
        let load = match r.rate {
            Some(rate) => format!("{rate}/s"),
            None => r.clients.to_string(),
        };
        writeln!(
            out,
            "{:>7} {:>8} {:>6} {:>9.1} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.2}ms {:>7.2}ms  {:?}",
            load,
            r.requests,
            r.errors,
            r.tokens_per_second,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.node_ttft_p50_ms,
            r.way_p50_ms,
            r.itl_p50_ms,
            r.itl_p99_ms,
            r.served_by
        )?;
        if let Some(e) = &r.first_error {
            writeln!(out, "        first error: {e}")?;
        }
    }
    if let Some(l) = &report.local {
        writeln!(
            out,
            "{:>7} {:>8} {:>6} {:>9.1} {:>7.1}ms {:>9} {:>9} {:>9} {:>7.2}ms {:>7.2}ms   (in this process, no cluster)",
            "local", 1, 0, l.tokens_per_second, l.ttft_ms, "", "", "", l.itl_p50_ms, l.itl_p99_ms
        )?;
    }
    if let Some(f) = &report.failovers {
        writeln!(
            out,
            "failover: {} rounds measured ({} freezes missed the stream); pause p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            f.failed_over, f.missed, f.pause_p50_ms, f.pause_p99_ms, f.pause_max_ms
        )?;
    }
    Ok(())
}
