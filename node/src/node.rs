//! A node's life: open the data dir, bind the listeners, serve gRPC and HTTP,
//! and on shutdown drain in order — readiness off, gRPC drained within the
//! deadline, HTTP last (so probes and scrapes see the drain), data dir closed.

use std::future::Future;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic_health::ServingStatus;

use crate::config::Config;
use crate::datadir::{self, DataDir, Endpoints};
use crate::{cluster, grpc, http, mesh, metrics};

/// How long the HTTP server may take to finish after gRPC has drained.
const HTTP_STOP_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    DataDir(#[from] datadir::Error),
    #[error("cannot listen for {what} on {addr}: {reason}; {fix}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        reason: String,
        fix: String,
    },
    #[error("gRPC reflection cannot load the trine.v1 descriptors: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the {what} server stopped unexpectedly: {reason}")]
    Server { what: &'static str, reason: String },
    #[error(transparent)]
    Mesh(#[from] mesh::Error),
    #[error(transparent)]
    Latency(#[from] mesh::latency::MatrixError),
    #[error(transparent)]
    Tls(#[from] trine_control::tls::Error),
    #[error(transparent)]
    Control(#[from] trine_control::Error),
    #[error("{0}")]
    Cluster(String),
}

/// The node's bound sockets. Binding is separate from serving so tests can
/// bind port 0 and learn the addresses first.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
    /// Bound only for a cluster member (or a node becoming one).
    pub raft: Option<TcpListener>,
}

impl Listeners {
    pub async fn bind(config: &Config) -> Result<Self, Error> {
        Ok(Self {
            grpc: bind("gRPC", config.grpc_addr, "--grpc-addr").await?,
            http: bind("HTTP", config.http_addr, "--http-addr").await?,
            raft: if cluster::wants_raft(config) {
                Some(bind("Raft", config.raft_addr, "--raft-addr").await?)
            } else {
                None
            },
        })
    }
}

async fn bind(what: &'static str, addr: SocketAddr, flag: &str) -> Result<TcpListener, Error> {
    TcpListener::bind(addr).await.map_err(|e| {
        let fix = match e.kind() {
            ErrorKind::AddrInUse => format!(
                "another process is using port {port} (`ss -ltnp 'sport = :{port}'` shows which); stop it or choose another port with {flag}",
                port = addr.port()
            ),
            ErrorKind::AddrNotAvailable => {
                format!("{} is not an address of this host; choose one that is with {flag}", addr.ip())
            }
            ErrorKind::PermissionDenied => format!(
                "ports below 1024 need root or CAP_NET_BIND_SERVICE; choose a higher port with {flag}"
            ),
            _ => format!("choose another address with {flag}"),
        };
        Error::Bind {
            what,
            addr,
            reason: e.to_string(),
            fix,
        }
    })
}

/// Runs a node until `shutdown` resolves, then drains and stops.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let data_dir = DataDir::open(&config.data_dir)?;
    let listeners = Listeners::bind(&config).await?;
    serve(&config, data_dir, listeners, shutdown).await
}

/// Serves on already-bound listeners until `shutdown` resolves.
pub async fn serve(
    config: &Config,
    data_dir: DataDir,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let metrics = metrics::install();
    let (key, created) =
        mesh::identity::load_or_create(data_dir.path()).map_err(mesh::Error::from)?;
    let peer_id = key.public().to_peer_id();
    metrics.set_identity(
        &config.name,
        &config.region,
        &config.zone,
        &peer_id.to_string(),
    );
    tracing::info!(%peer_id, new = created, "node identity");
    let mesh::Started {
        mesh,
        stage_requests,
        task: mesh_task,
    } = mesh::start(mesh_config(config)?, key).await?;
    let stages = crate::executor::Stages::default();
    let pool = Arc::new(
        crate::compute::pool(
            (config.threads > 0).then_some(config.threads as usize),
            config.pin_threads,
        )
        .map_err(|e| Error::Cluster(format!("cannot start the compute threads: {e:#}")))?,
    );
    tracing::info!(
        threads = pool.current_num_threads(),
        pinned = config.pin_threads,
        amx = crate::compute::apply_amx(config.amx),
        "compute pool"
    );
    let stage_server = crate::stage_server::StageServer::new(stages.clone());
    let stage_task = tokio::spawn(crate::stage_server::run(
        stage_requests,
        stage_server.clone(),
    ));
    let ready = Arc::new(AtomicBool::new(false));
    let mut endpoints = Endpoints {
        pid: std::process::id(),
        grpc: local_addr(&listeners.grpc, "gRPC")?,
        http: local_addr(&listeners.http, "HTTP")?,
        peer_id: peer_id.to_string(),
        p2p: mesh
            .listen_addrs()
            .iter()
            .map(ToString::to_string)
            .collect(),
        raft: None,
        node_id: None,
        api_tls: false,
        api_ca: None,
        name: config.name.clone(),
        api_client_identity: None,
    };
    tracing::info!(
        p2p = ?endpoints.p2p,
        bootstrap = config.bootstrap.len(),
        simulated_latency = %config.simulated_latency,
        filter = mesh::filter::PeerFilter::new(config.open_mesh).describe(),
        "mesh listening"
    );

    if config.simulated_latency != "off" && endpoints.p2p.iter().any(|a| a.contains("/quic-v1")) {
        tracing::warn!(
            "QUIC connections are not delayed by --simulated-latency (it wraps TCP byte streams); use TCP addresses to simulate regions"
        );
    }
    let raft_addr = match &listeners.raft {
        Some(l) => Some(local_addr(l, "Raft")?),
        None => None,
    };
    let control = match listeners.raft {
        Some(l) => cluster::start(config, &data_dir, &endpoints, peer_id, l).await?,
        None => {
            tracing::info!(
                "not a cluster member (no certificate, no --init or --join): this node runs the mesh only"
            );
            None
        }
    };
    let members_task = control.as_ref().map(|c| {
        endpoints.raft = raft_addr;
        endpoints.node_id = Some(c.id());
        tokio::spawn(crate::auth::record_root(
            c.clone(),
            data_dir.path().to_owned(),
        ));
        // Ends with the mesh.
        tokio::spawn(cluster::feed_heard(c.clone(), mesh.clone()));
        tokio::spawn(cluster::feed_mesh(c.clone(), mesh.clone()))
    });
    let store = crate::model_store::Store::new(
        data_dir.path(),
        (!config.model_cache.as_os_str().is_empty()).then(|| config.model_cache.clone()),
    );
    let (executor_stop, executor_stop_rx) = watch::channel(false);
    let executor_task = control.as_ref().map(|c| {
        tokio::spawn(crate::executor::run(
            c.clone(),
            stages.clone(),
            store.clone(),
            crate::batcher::Batching {
                pool: pool.clone(),
                max_batch: config.max_batch as usize,
                quant_embd: config.quant_embd,
                weight_layout: config.weight_layout,
                kernel: config.fixed_kernel(),
            },
            executor_stop_rx,
        ))
    });
    // After the control plane: on --init it creates the node certificate
    // the client ports serve by default.
    let api_tls = crate::api_tls::ApiTls::load(config, control.is_some())?;
    if api_tls.serves() {
        endpoints.api_tls = true;
        // Absolute: CLI commands read it from another directory.
        let absolute = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
        endpoints.api_ca = Some(absolute(config.api_tls_ca()));
        if api_tls.requires_client_certs() {
            let dir = config.tls_dir();
            endpoints.api_client_identity = Some((
                absolute(dir.join(trine_control::tls::NODE_CERT)),
                absolute(dir.join(trine_control::tls::NODE_KEY)),
            ));
        }
    }
    let (receipts_stop, receipts_stop_rx) = watch::channel(false);
    let receipts = control
        .as_ref()
        .map(|c| crate::receipts::start(c.clone(), receipts_stop_rx));
    let serving = control
        .as_ref()
        .map(|c| {
            crate::serve::Serving::new(
                c.clone(),
                stage_server.clone(),
                crate::serve::Limits {
                    concurrency: config.max_batch as usize,
                    request_timeout: config.request_timeout,
                    first_token: config.first_token_timeout,
                    max_prompt_tokens: config.max_prompt_tokens as usize,
                    max_tokens: config.max_tokens,
                    default_max_tokens: config.max_tokens.min(256),
                    queue: config.max_queue as usize,
                    ..crate::serve::Limits::default()
                },
                config.allow_anonymous,
                receipts.as_ref().map(|(r, _)| r.clone()),
                crate::serve::Links {
                    mesh: Some(mesh.clone()),
                    latency: config
                        .latency_matrix()
                        .ok()
                        .flatten()
                        .map(|m| (config.region.clone(), Arc::new(m))),
                    api_tls: api_tls.clone(),
                },
            )
        })
        .transpose()
        .map_err(|e| Error::Cluster(format!("cannot start serving: {e:#}")))?;
    // What the heartbeats advertise: queue depth (the routers' input),
    // the stages held here, the chain height.
    let status_task = {
        let (mesh, stages, control, serving) = (
            mesh.clone(),
            stages.clone(),
            control.clone(),
            serving.clone(),
        );
        let dir = data_dir.path().to_owned();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            for n in 0u64.. {
                tick.tick().await;
                if n % 20 == 0 {
                    crate::metrics::data_dir_space(&dir);
                }
                mesh.set_status(mesh::Status {
                    queue_depth: serving.as_ref().map_or(0, |s| s.waiting()),
                    stages: stages
                        .slots()
                        .into_iter()
                        .map(|(m, _, s)| format!("{m}/{s}"))
                        // What a heartbeat may carry (peers drop others).
                        .filter(|s| s.len() <= mesh::health::MAX_STAGE_LEN)
                        .take(mesh::health::MAX_STAGES)
                        .collect(),
                    // A block's height is its Raft index: no need to
                    // clone the head block (and its transactions).
                    chain_height: control
                        .as_ref()
                        .and_then(|c| c.reader().last_applied())
                        .map_or(0, |l| l.index),
                });
            }
        })
    };
    let grpc::Services { health, router } = grpc::services(
        mesh.clone(),
        control.clone(),
        serving.clone(),
        config.fault_injection,
        usize::try_from(config.max_message_bytes).unwrap_or(usize::MAX),
    )
    .await?;
    let (grpc_stop, grpc_stop_rx) = watch::channel(false);
    let grpc_server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(config.max_streams)
        .tcp_nodelay(true)
        .add_routes(router);
    let mut grpc_task = if api_tls.serves() {
        let tls = api_tls.clone();
        let first = tls
            .grpc_server()
            .ok_or_else(|| Error::Cluster("client-port TLS without a certificate".into()))?;
        tokio::spawn(grpc_server.serve_with_incoming_shutdown(
            trine_control::tls::accept(
                listeners.grpc,
                move || tls.grpc_server().unwrap_or_else(|| first.clone()),
                "gRPC",
                grpc_stop_rx.clone(),
            ),
            stopped(grpc_stop_rx),
        ))
    } else {
        tokio::spawn(grpc_server.serve_with_incoming_shutdown(
            // Accepted sockets get TCP_NODELAY (the builder's flag covers
            // only listeners tonic binds itself).
            tonic::transport::server::TcpIncoming::from(listeners.grpc).with_nodelay(Some(true)),
            stopped(grpc_stop_rx),
        ))
    };
    let (http_stop, http_stop_rx) = watch::channel(false);
    // The operator console (/ui) and its watcher (RTT history, events).
    let console = control.as_ref().map(|c| {
        crate::console::Console::new(
            c.clone(),
            mesh.clone(),
            serving.clone(),
            config.cluster.clone(),
            api_tls.clone(),
        )
    });
    if let Some(c) = &console {
        tokio::spawn(c.clone().watch(http_stop_rx.clone()));
    }
    let state = http::AppState {
        metrics,
        ready: ready.clone(),
        settled: Arc::default(),
        name: config.name.as_str().into(),
        models: control.as_ref().map(|c| (store.clone(), c.clone())),
        serving: serving.clone(),
        console: console.clone(),
        admin_pending: control
            .as_ref()
            .map(|_| crate::auth::pending_marker(data_dir.path())),
        max_body: usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX),
    };
    tokio::spawn(api_tls.clone().watch(http_stop_rx.clone()));
    let mut http_task = if api_tls.serves() {
        let listener =
            crate::api_tls::Listener::new(listeners.http, api_tls.clone(), http_stop_rx.clone())
                .map_err(|e| Error::Cluster(format!("HTTP TLS listener: {e}")))?;
        tokio::spawn(
            axum::serve(listener, http::router(state))
                .with_graceful_shutdown(stopped(http_stop_rx))
                .into_future(),
        )
    } else {
        tokio::spawn(
            axum::serve(
                // Streamed answers (SSE) go out token by token: no Nagle.
                axum::serve::ListenerExt::tap_io(listeners.http, |tcp| {
                    let _ = tcp.set_nodelay(true);
                }),
                http::router(state),
            )
            .with_graceful_shutdown(stopped(http_stop_rx))
            .into_future(),
        )
    };

    data_dir.write_endpoints(&endpoints)?;
    ready.store(true, Ordering::Release);
    metrics.set_up(true);
    tracing::info!(
        name = %config.name,
        region = %config.region,
        grpc = %endpoints.grpc,
        http = %endpoints.http,
        tls = api_tls.serves(),
        data_dir = %data_dir.path().display(),
        version = crate::build::VERSION,
        git_sha = crate::build::GIT_SHA,
        simd = %crate::simd::Level::detect(),
        "node serving"
    );

    // A server that ends on its own is a failure; the other still drains.
    // So is a Raft core that stopped (fatal storage or state error): the
    // node exits non-zero for its supervisor to restart it, rather than run
    // on with frozen cluster state while /healthz says ok.
    let raft_failed = async {
        match &control {
            Some(c) => c.failed().await,
            None => std::future::pending().await,
        }
    };
    let (failure, grpc_done, http_done) = tokio::select! {
        () = shutdown => (None, false, false),
        reason = raft_failed => {
            tracing::error!(%reason, "the Raft control plane stopped; the node stops too (restart it: its data dir is intact)");
            (Some(Error::Server { what: "Raft", reason }), false, false)
        }
        r = &mut grpc_task => (Some(server_failure("gRPC", r.map(|r| r.map_err(|e| e.to_string())))), true, false),
        r = &mut http_task => (Some(server_failure("HTTP", r.map(|r| r.map_err(|e| e.to_string())))), false, true),
    };

    // Drain: tell probes and health watchers first, then stop accepting.
    ready.store(false, Ordering::Release);
    metrics.set_up(false);
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let started = Instant::now();
    tracing::info!(
        deadline = %humantime::format_duration(config.shutdown_timeout),
        "shutting down: draining in-flight gRPC requests"
    );
    let _ = grpc_stop.send(true);
    if !grpc_done {
        match tokio::time::timeout(config.shutdown_timeout, &mut grpc_task).await {
            Ok(_) => tracing::info!(took = ?started.elapsed(), "gRPC drained"),
            Err(_) => {
                grpc_task.abort();
                tracing::warn!(
                    deadline = %humantime::format_duration(config.shutdown_timeout),
                    "drain deadline passed; cutting the gRPC requests still in flight"
                );
            }
        }
    }
    let _ = http_stop.send(true);
    if !http_done
        && tokio::time::timeout(HTTP_STOP_TIMEOUT, &mut http_task)
            .await
            .is_err()
    {
        http_task.abort();
    }
    // Receipts still held go to the chain before the node leaves.
    let _ = receipts_stop.send(true);
    if let Some((_, t)) = receipts {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let _ = executor_stop.send(true);
    if let Some(t) = executor_task {
        let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
    }
    if let Some(c) = &control {
        c.shutdown().await;
    }
    if let Some(t) = members_task {
        t.abort();
    }
    mesh_task.abort();
    stage_task.abort();
    status_task.abort();
    drop(mesh);
    data_dir.close();
    match failure {
        None => {
            tracing::info!(took = ?started.elapsed(), "node stopped cleanly");
            Ok(())
        }
        Some(e) => Err(e),
    }
}

/// The mesh settings of a node configuration.
fn mesh_config(config: &Config) -> Result<mesh::Config, Error> {
    let mut m = mesh::Config::new(&config.name, &config.region, &config.zone);
    m.listen.clone_from(&config.p2p_listen);
    m.announce.clone_from(&config.p2p_announce);
    m.bootstrap.clone_from(&config.bootstrap);
    m.open = config.open_mesh;
    m.latency = config.latency_matrix()?.map(Arc::new);
    m.heartbeat_interval = config.heartbeat_interval;
    m.ping_interval = config.ping_interval;
    m.peer_ttl = config.peer_ttl;
    m.max_connections = config.max_connections;
    m.max_connections_per_peer = config.max_connections_per_peer;
    m.target_peers = m.target_peers.min(config.max_connections / 2);
    Ok(m)
}

fn local_addr(listener: &TcpListener, what: &'static str) -> Result<SocketAddr, Error> {
    listener.local_addr().map_err(|e| Error::Server {
        what,
        reason: e.to_string(),
    })
}

fn server_failure(
    what: &'static str,
    joined: Result<Result<(), String>, tokio::task::JoinError>,
) -> Error {
    let reason = match joined {
        Ok(Ok(())) => "it exited without being asked to".to_owned(),
        Ok(Err(e)) => e,
        Err(e) => e.to_string(),
    };
    Error::Server { what, reason }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    // A dropped sender also means stop.
    let _ = rx.wait_for(|stop| *stop).await;
}
