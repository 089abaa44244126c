//! The operator console: `GET /ui` on every cluster member's HTTP port.
//!
//! One server-rendered page (askama templates, no external script, style or
//! font: it works offline) with six views — cluster map, latency, placement,
//! chain, events, playground. Each view is also served alone at
//! `/ui/view/<name>`; the page's few lines of script re-fetch them every two
//! seconds, so it stays live without reloading. Plots are SVG drawn here.
//! Everything shown is escaped (askama escapes by default; the SVG built in
//! Rust escapes through [`esc`]).
//!
//! The page is read-only. The playground sends a completion through this
//! node's router with the caller's bearer token, like the OpenAI API: the
//! same token rules apply.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use askama::Template;
use axum::Router;
use std::convert::Infallible;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use trine_control::ControlPlane;
use trine_control::command::{NodeRecord, NodeStatus, StageState};
use trine_proto::v1;

use tokio_stream::{Stream, StreamExt as _};

use crate::mesh::Mesh;
use crate::serve::{ServeError, Serving};

/// How long a gathered view is reused (every open page polls every 2 s).
const FRESH: Duration = Duration::from_millis(900);
/// Per-node budget for the fan-out to other nodes' Admin APIs.
const PEER_TIMEOUT: Duration = Duration::from_millis(700);
/// RTT samples kept per peer for the sparklines (one per 2 s: 2 minutes).
const HISTORY: usize = 60;
/// Blocks shown in the chain view.
const BLOCKS: u64 = 12;
/// Events shown.
const EVENTS: usize = 60;
/// Longest playground prompt, in bytes.
const MAX_PROMPT: usize = 8192;

#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("cluster", &self.inner.cluster)
            .finish_non_exhaustive()
    }
}

struct Inner {
    /// TLS to other nodes' client ports (the peer-table fan-out).
    api_tls: crate::api_tls::ApiTls,
    control: ControlPlane,
    mesh: Mesh,
    serving: Option<Serving>,
    cluster: String,
    /// This node's RTT samples per peer name, in ms.
    history: Mutex<BTreeMap<String, VecDeque<f64>>>,
    cache: tokio::sync::Mutex<Option<(Instant, Arc<View>)>>,
}

impl Console {
    pub fn new(
        control: ControlPlane,
        mesh: Mesh,
        serving: Option<Serving>,
        cluster: String,
        api_tls: crate::api_tls::ApiTls,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                api_tls,
                control,
                mesh,
                serving,
                cluster,
                history: Mutex::default(),
                cache: tokio::sync::Mutex::default(),
            }),
        }
    }

    /// Samples RTTs for the sparklines and turns changes in the cluster
    /// state into events, every 2 s until `stop`.
    pub async fn watch(self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut last: Option<Seen> = None;
        loop {
            if let Ok(snap) = self.inner.mesh.snapshot().await {
                let mut h = self
                    .inner
                    .history
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for p in snap.peers.iter().filter(|p| !p.name.is_empty()) {
                    let samples = h.entry(p.name.clone()).or_default();
                    if samples.len() == HISTORY {
                        samples.pop_front();
                    }
                    samples.push_back(
                        p.rtt
                            .filter(|_| p.connected)
                            .map_or(f64::NAN, |r| r.as_secs_f64() * 1e3),
                    );
                }
            }
            let seen = Seen::of(&self.inner.control);
            if let Some(before) = &last {
                before.diff(&seen);
            }
            last = Some(seen);
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/ui", get(page))
            .route("/ui/", get(page))
            .route("/ui/view/{name}", get(view))
            .route("/ui/block/{file}", get(block))
            .route("/ui/playground", post(playground))
            .with_state(self.clone())
    }

    async fn view(&self) -> Arc<View> {
        let mut cache = self.inner.cache.lock().await;
        if let Some((at, v)) = cache.as_ref()
            && at.elapsed() < FRESH
        {
            return v.clone();
        }
        let v = Arc::new(gather(&self.inner).await);
        *cache = Some((Instant::now(), v.clone()));
        v
    }
}

/// What the watcher compares between two looks at the cluster state.
struct Seen {
    status: BTreeMap<u64, (String, NodeStatus)>,
    leader: Option<u64>,
    term: u64,
    placements: BTreeMap<(String, u32, u32), (u64, u64, StageState)>,
    names: BTreeMap<u64, String>,
}

impl Seen {
    fn of(control: &ControlPlane) -> Self {
        let state = control.reader().state();
        let status = control.status();
        Self {
            status: state
                .nodes
                .values()
                .map(|n| (n.id, (n.name.clone(), n.status)))
                .collect(),
            leader: status.leader,
            term: status.term,
            placements: state
                .placements
                .iter()
                .map(|(k, p)| (k.clone(), (p.node, p.generation, p.state)))
                .collect(),
            names: state
                .nodes
                .values()
                .map(|n| (n.id, n.name.clone()))
                .collect(),
        }
    }

    fn name(&self, id: u64) -> String {
        self.names
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    fn diff(&self, now: &Seen) {
        for (id, (name, status)) in &now.status {
            match self.status.get(id) {
                None => crate::events::record("node", format!("{name} joined the cluster")),
                Some((_, before)) if before != status => crate::events::record(
                    "node",
                    format!("{name} is {} (was {})", status.as_str(), before.as_str()),
                ),
                Some(_) => {}
            }
        }
        for (id, (name, _)) in &self.status {
            if !now.status.contains_key(id) {
                crate::events::record("node", format!("{name} left the cluster"));
            }
        }
        if now.term != self.term || now.leader != self.leader {
            let leader = now
                .leader
                .map_or_else(|| "none yet".into(), |l| now.name(l));
            crate::events::record("election", format!("term {}: leader {leader}", now.term));
        }
        for ((model, replica, stage), (node, generation, state)) in &now.placements {
            let key = (model.clone(), *replica, *stage);
            match self.placements.get(&key) {
                Some((n, g, before)) if n == node && g == generation => {
                    if before != state {
                        crate::events::record(
                            "placement",
                            format!(
                                "{model} replica {replica} stage {stage} on {}: {}",
                                now.name(*node),
                                state.as_str()
                            ),
                        );
                    }
                }
                Some((n, _, _)) => crate::events::record(
                    "placement",
                    format!(
                        "{model} replica {replica} stage {stage} moved from {} to {} (generation {generation})",
                        self.name(*n),
                        now.name(*node)
                    ),
                ),
                None => crate::events::record(
                    "placement",
                    format!(
                        "{model} replica {replica} stage {stage} placed on {} (generation {generation})",
                        now.name(*node)
                    ),
                ),
            }
        }
    }
}

/// One node's card.
struct Card {
    name: String,
    region: String,
    zone: String,
    role: &'static str,
    status: &'static str,
    backend: String,
    load: String,
    queue: String,
    stages: Vec<String>,
    grpc: String,
    height: String,
    here: bool,
    leader_rtt: String,
}

struct Region {
    name: String,
    cards: Vec<Card>,
}

struct Slot {
    model: String,
    replica: u32,
    stage: u32,
    layers: String,
    node: String,
    region: String,
    state: &'static str,
    generation: u64,
    detail: String,
}

struct TxRow {
    kind: String,
    summary: String,
    principal: String,
    rejected: String,
}

struct BlockRow {
    height: u64,
    time: String,
    hash: String,
    txs: Vec<TxRow>,
}

struct EventRow {
    time: String,
    kind: &'static str,
    message: String,
}

struct Spark {
    peer: String,
    region: String,
    last: String,
    svg: String,
}

/// Everything the views show, gathered once per refresh.
struct View {
    cluster: String,
    here: String,
    leader: String,
    term: u64,
    up: usize,
    total: usize,
    regions: Vec<Region>,
    matrix_svg: String,
    sparks: Vec<Spark>,
    slots: Vec<Slot>,
    models: Vec<String>,
    head_height: u64,
    head_hash: String,
    blocks: Vec<BlockRow>,
    events: Vec<EventRow>,
    generated: String,
}

fn time_of(at: SystemTime) -> String {
    humantime::format_rfc3339_seconds(at).to_string()
}

fn ms(d: f64) -> String {
    if d.is_nan() {
        "–".into()
    } else if d < 10.0 {
        format!("{d:.1} ms")
    } else {
        format!("{d:.0} ms")
    }
}

/// Other nodes' peer tables (their measured RTTs), asked in parallel.
async fn peer_tables(
    api_tls: &crate::api_tls::ApiTls,
    nodes: &[NodeRecord],
) -> BTreeMap<u64, v1::ListPeersResponse> {
    let asks = nodes.iter().map(|n| async move {
        let id = &n.id;
        let ask = async {
            let endpoint = api_tls.endpoint(&n.grpc_addr, &n.name, n.api_tls).ok()?;
            crate::cluster_cmd::connect(endpoint, &n.grpc_addr, PEER_TIMEOUT, Default::default())
                .await
                .ok()?
                .list_peers(v1::ListPeersRequest::default())
                .await
                .ok()
                .map(tonic::Response::into_inner)
        };
        (
            *id,
            tokio::time::timeout(PEER_TIMEOUT * 2, ask)
                .await
                .ok()
                .flatten(),
        )
    });
    futures_util::future::join_all(asks)
        .await
        .into_iter()
        .filter_map(|(id, r)| r.map(|r| (id, r)))
        .collect()
}

async fn gather(inner: &Inner) -> View {
    let control = &inner.control;
    let status = control.status();
    let state = control.reader().state();
    let me = control.id();
    let snapshot = inner.mesh.snapshot().await.ok();
    let by_peer: BTreeMap<String, &crate::mesh::PeerView> = snapshot
        .iter()
        .flat_map(|s| s.peers.iter())
        .map(|p| (p.peer_id.to_string(), p))
        .collect();
    let leader_peer = status
        .leader
        .and_then(|l| state.nodes.get(&l))
        .map(|n| n.peer_id.clone());

    // Every other reachable node's pings (its RTT to each peer).
    let others: Vec<NodeRecord> = state
        .nodes
        .values()
        .filter(|n| n.id != me && n.status != NodeStatus::Down && !n.grpc_addr.is_empty())
        .cloned()
        .collect();
    let tables = peer_tables(&inner.api_tls, &others).await;

    // Cards, by region.
    let mut regions: BTreeMap<String, Vec<Card>> = BTreeMap::new();
    for n in state.nodes.values() {
        let role = if Some(n.id) == status.leader {
            "leader"
        } else if status.voters.contains(&n.id) {
            "voter"
        } else if status.members.contains_key(&n.id) {
            "learner"
        } else {
            "not a member"
        };
        let stages: Vec<String> = state
            .placements
            .values()
            .filter(|p| p.node == n.id)
            .map(|p| {
                format!(
                    "{} r{} s{} ({})",
                    p.model,
                    p.replica,
                    p.stage,
                    p.state.as_str()
                )
            })
            .collect();
        let peer = by_peer.get(&n.peer_id);
        let here = n.id == me;
        let (load, queue, backend) = if here {
            (
                Some(crate::mesh::host_load().0),
                inner.serving.as_ref().map(Serving::waiting),
                Some(crate::mesh::backend()),
            )
        } else {
            (
                peer.and_then(|p| p.load),
                peer.and_then(|p| p.queue_depth),
                peer.and_then(|p| p.backend.clone()),
            )
        };
        let leader_rtt = if Some(n.id) == status.leader {
            "(the leader)".into()
        } else if here {
            leader_peer
                .as_ref()
                .and_then(|lp| by_peer.get(lp))
                .and_then(|p| p.rtt)
                .map_or("?".into(), |r| ms(r.as_secs_f64() * 1e3))
        } else {
            // What that node measured to the leader.
            tables
                .get(&n.id)
                .and_then(|t| {
                    t.peers
                        .iter()
                        .find(|p| Some(&p.peer_id) == leader_peer.as_ref() && p.rtt_seconds > 0.0)
                })
                .map_or("?".into(), |p| ms(p.rtt_seconds * 1e3))
        };
        regions.entry(n.region.clone()).or_default().push(Card {
            name: n.name.clone(),
            region: n.region.clone(),
            zone: n.zone.clone(),
            role,
            status: n.status.as_str(),
            backend: backend.unwrap_or_else(|| n.simd.clone()),
            load: load
                .filter(|l| l.is_finite())
                .map_or("?".into(), |l| format!("{:.0}%", l * 100.0)),
            queue: queue.map_or("?".into(), |q| q.to_string()),
            stages,
            grpc: n.grpc_addr.clone(),
            height: if here {
                control.reader().head().map_or(0, |b| b.height).to_string()
            } else {
                String::new()
            },
            here,
            leader_rtt,
        });
    }
    for cards in regions.values_mut() {
        cards.sort_by(|a, b| a.name.cmp(&b.name));
    }

    // The region × region RTT matrix, from every reachable node's pings.
    let region_of_peer: BTreeMap<&str, &str> = state
        .nodes
        .values()
        .map(|n| (n.peer_id.as_str(), n.region.as_str()))
        .collect();
    let mut samples: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut add = |from: &str, peer: &str, rtt: f64| {
        if let Some(to) = region_of_peer.get(peer)
            && rtt > 0.0
        {
            samples
                .entry((from.to_owned(), (*to).to_owned()))
                .or_default()
                .push(rtt * 1e3);
        }
    };
    if let (Some(snap), Some(mine)) = (&snapshot, state.nodes.get(&me)) {
        for p in snap.peers.iter().filter(|p| p.connected) {
            add(
                &mine.region,
                &p.peer_id.to_string(),
                p.rtt.map_or(0.0, |r| r.as_secs_f64()),
            );
        }
    }
    for (id, t) in &tables {
        if let Some(n) = state.nodes.get(id) {
            for p in t.peers.iter().filter(|p| p.connected) {
                add(&n.region, &p.peer_id, p.rtt_seconds);
            }
        }
    }
    let region_names: Vec<String> = regions.keys().cloned().collect();
    let matrix_svg = matrix(&region_names, &samples);

    // Sparklines: this node's RTT to each peer over the last two minutes.
    let history = inner
        .history
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let region_of_name: BTreeMap<&str, &str> = state
        .nodes
        .values()
        .map(|n| (n.name.as_str(), n.region.as_str()))
        .collect();
    let sparks = history
        .iter()
        .filter(|(peer, _)| region_of_name.contains_key(peer.as_str()))
        .map(|(peer, s)| Spark {
            peer: peer.clone(),
            region: region_of_name
                .get(peer.as_str())
                .copied()
                .unwrap_or("")
                .into(),
            last: ms(s.back().copied().unwrap_or(f64::NAN)),
            svg: sparkline(s),
        })
        .collect();

    let slots = state
        .placements
        .values()
        .map(|p| {
            let node = state.nodes.get(&p.node);
            Slot {
                model: p.model.clone(),
                replica: p.replica,
                stage: p.stage,
                layers: format!("{}..{}", p.layer_start, p.layer_end),
                node: node.map_or_else(|| p.node.to_string(), |n| n.name.clone()),
                region: node.map_or(String::new(), |n| n.region.clone()),
                state: p.state.as_str(),
                generation: p.generation,
                detail: p.detail.clone(),
            }
        })
        .collect();

    // The chain's last blocks, newest first.
    let reader = control.reader();
    let head = reader.head();
    let head_height = head.as_ref().map_or(0, |b| b.height);
    let first = reader.first_height().unwrap_or(0);
    let from = head_height.saturating_sub(BLOCKS - 1).max(first);
    let mut blocks: Vec<BlockRow> = reader
        .blocks(from, BLOCKS as usize)
        .filter_map(Result::ok)
        .map(|b| BlockRow {
            height: b.height,
            time: time_of(SystemTime::UNIX_EPOCH + Duration::from_millis(b.time_ms)),
            hash: hex::encode(&b.hash[..8]),
            txs: b
                .txs
                .iter()
                .map(|t| TxRow {
                    kind: t.kind.clone(),
                    summary: t.summary.clone(),
                    principal: t.principal.clone(),
                    rejected: t.rejected.clone().unwrap_or_default(),
                })
                .collect(),
        })
        .collect();
    blocks.reverse();

    let events = crate::events::recent(EVENTS)
        .into_iter()
        .map(|e| EventRow {
            time: time_of(e.at),
            kind: e.kind,
            message: e.message,
        })
        .collect();

    View {
        cluster: inner.cluster.clone(),
        here: state
            .nodes
            .get(&me)
            .map_or_else(|| me.to_string(), |n| n.name.clone()),
        leader: status.leader.map_or_else(
            || "none".into(),
            |l| {
                state
                    .nodes
                    .get(&l)
                    .map_or(l.to_string(), |n| n.name.clone())
            },
        ),
        term: status.term,
        up: state
            .nodes
            .values()
            .filter(|n| n.status == NodeStatus::Up)
            .count(),
        total: state.nodes.len(),
        regions: regions
            .into_iter()
            .map(|(name, cards)| Region { name, cards })
            .collect(),
        matrix_svg,
        sparks,
        slots,
        models: state.models.keys().cloned().collect(),
        head_height,
        head_hash: head.map_or(String::new(), |b| hex::encode(b.hash)),
        blocks,
        events,
        generated: time_of(SystemTime::now()),
    }
}

/// Escapes text for HTML and SVG.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Heat colour for an RTT: green near 0, red at 250 ms and beyond.
fn heat(rtt: f64) -> String {
    let t = (rtt / 250.0).clamp(0.0, 1.0);
    format!("hsl({:.0} 70% 45%)", 120.0 * (1.0 - t))
}

/// The region × region median RTT as an SVG heat map.
fn matrix(regions: &[String], samples: &BTreeMap<(String, String), Vec<f64>>) -> String {
    const CELL_W: usize = 96;
    const CELL_H: usize = 34;
    const LABEL: usize = 110;
    let n = regions.len();
    let (w, h) = (LABEL + n * CELL_W, 28 + n * CELL_H);
    let mut svg = format!(
        r#"<svg class="matrix" role="img" aria-label="median RTT between regions" viewBox="0 0 {w} {h}" width="{w}" height="{h}" xmlns="http://www.w3.org/2000/svg">"#
    );
    for (j, to) in regions.iter().enumerate() {
        let _ = write!(
            svg,
            r#"<text x="{}" y="18" text-anchor="middle" class="axis">{}</text>"#,
            LABEL + j * CELL_W + CELL_W / 2,
            esc(to)
        );
    }
    for (i, from) in regions.iter().enumerate() {
        let y = 28 + i * CELL_H;
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end" class="axis">{}</text>"#,
            LABEL - 8,
            y + CELL_H / 2 + 5,
            esc(from)
        );
        for (j, to) in regions.iter().enumerate() {
            let x = LABEL + j * CELL_W;
            let mut s = samples
                .get(&(from.clone(), to.clone()))
                .cloned()
                .unwrap_or_default();
            let (fill, label) = if s.is_empty() {
                ("var(--cell-empty)".to_owned(), "–".to_owned())
            } else {
                let m = median(&mut s);
                (heat(m), ms(m))
            };
            let _ = write!(
                svg,
                r#"<rect x="{x}" y="{y}" width="{}" height="{}" rx="4" fill="{fill}"><title>{} → {}: {}</title></rect><text x="{}" y="{}" text-anchor="middle" class="cell">{}</text>"#,
                CELL_W - 4,
                CELL_H - 4,
                esc(from),
                esc(to),
                esc(&label),
                x + (CELL_W - 4) / 2,
                y + CELL_H / 2 + 3,
                esc(&label)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

/// An RTT history as a small SVG polyline (gaps where no RTT was known).
fn sparkline(samples: &VecDeque<f64>) -> String {
    const W: f64 = 160.0;
    const H: f64 = 28.0;
    let max = samples
        .iter()
        .copied()
        .filter(|v| v.is_finite())
        .fold(1.0_f64, f64::max);
    let step = W / (HISTORY.max(2) - 1) as f64;
    let offset = HISTORY.saturating_sub(samples.len());
    let mut svg = format!(
        r#"<svg class="spark" viewBox="0 0 {W} {H}" width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg"><polyline fill="none" stroke="currentColor" stroke-width="1.5" points=""#
    );
    for (i, v) in samples.iter().enumerate() {
        if v.is_finite() {
            let _ = write!(
                svg,
                "{:.1},{:.1} ",
                (offset + i) as f64 * step,
                H - 2.0 - (v / max) * (H - 4.0)
            );
        }
    }
    svg.push_str(r#""/></svg>"#);
    svg
}

#[derive(Template)]
#[template(path = "console/page.html")]
struct PageTemplate<'a> {
    v: &'a View,
}

#[derive(Template)]
#[template(path = "console/cluster.html")]
struct ClusterTemplate<'a> {
    v: &'a View,
}

#[derive(Template)]
#[template(path = "console/latency.html")]
struct LatencyTemplate<'a> {
    v: &'a View,
}

#[derive(Template)]
#[template(path = "console/placement.html")]
struct PlacementTemplate<'a> {
    v: &'a View,
}

#[derive(Template)]
#[template(path = "console/chain.html")]
struct ChainTemplate<'a> {
    v: &'a View,
}

#[derive(Template)]
#[template(path = "console/events.html")]
struct EventsTemplate<'a> {
    v: &'a View,
}

fn html(rendered: Result<String, askama::Error>) -> Response {
    match rendered {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, "text/html; charset=utf-8"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            body,
        )
            .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the console could not render this view: {e}"),
        )
            .into_response(),
    }
}

async fn page(State(c): State<Console>) -> Response {
    let v = c.view().await;
    html(PageTemplate { v: &v }.render())
}

async fn view(State(c): State<Console>, Path(name): Path<String>) -> Response {
    let v = c.view().await;
    match name.as_str() {
        "cluster" => html(ClusterTemplate { v: &v }.render()),
        "latency" => html(LatencyTemplate { v: &v }.render()),
        "placement" => html(PlacementTemplate { v: &v }.render()),
        "chain" => html(ChainTemplate { v: &v }.render()),
        "events" => html(EventsTemplate { v: &v }.render()),
        _ => (
            StatusCode::NOT_FOUND,
            "no such view: cluster, latency, placement, chain or events",
        )
            .into_response(),
    }
}

/// `/ui/block/<height>.json`: one block as JSON, as `trine chain show`
/// would print it.
async fn block(State(c): State<Console>, Path(file): Path<String>) -> Response {
    let Some(height) = file
        .strip_suffix(".json")
        .and_then(|h| h.parse::<u64>().ok())
    else {
        return (StatusCode::NOT_FOUND, "use /ui/block/<height>.json").into_response();
    };
    let reader = c.inner.control.reader().clone();
    match tokio::task::spawn_blocking(move || reader.block(height)).await {
        Ok(Ok(Some(b))) => match serde_json::to_vec_pretty(&b) {
            Ok(body) => ([(header::CONTENT_TYPE, "application/json")], body).into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        },
        Ok(Ok(None)) => (
            StatusCode::NOT_FOUND,
            format!("no block at height {height} on this node"),
        )
            .into_response(),
        Ok(Err(e)) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[derive(serde::Deserialize)]
struct PlaygroundRequest {
    model: String,
    prompt: String,
    #[serde(default)]
    max_tokens: u32,
}

/// `POST /ui/playground` {model, prompt, max_tokens}: the completion as
/// server-sent events — `token` ({text, ms}) as they come, then `done`
/// ({path, failovers, prompt_tokens, completion_tokens, ttft_ms}) or
/// `error` ({message}). The caller's Authorization header applies, as on
/// the OpenAI API; refusals come in its error JSON.
async fn playground(State(c): State<Console>, headers: HeaderMap, body: String) -> Response {
    match start_playground(&c, &headers, &body).await {
        Ok(sse) => sse.into_response(),
        Err(e) => crate::openai::error_response("console", &e),
    }
}

async fn start_playground(
    c: &Console,
    headers: &HeaderMap,
    body: &str,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>> + use<>>, ServeError> {
    let serving = c
        .inner
        .serving
        .clone()
        .ok_or_else(|| ServeError::Unavailable("this node serves no models".into()))?;
    let req: PlaygroundRequest = serde_json::from_str(body).map_err(|e| {
        ServeError::Invalid(format!(
            "the body must be JSON {{model, prompt, max_tokens}}: {e}"
        ))
    })?;
    if req.prompt.len() > MAX_PROMPT {
        return Err(ServeError::TooLarge(format!(
            "the prompt is over {MAX_PROMPT} bytes"
        )));
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let principal = serving.authenticate(authorization.as_deref())?;
    let greq = v1::GenerateRequest {
        model: req.model,
        input: Some(v1::generate_request::Input::Prompt(req.prompt)),
        max_tokens: req.max_tokens.clamp(1, 256),
        sampling: Some(v1::SamplingParams {
            repetition_penalty: 1.3,
            ..Default::default()
        }),
        ..Default::default()
    };
    let events = serving
        .generate(greq, false, authorization, &principal)
        .await?;
    let names: BTreeMap<u64, String> = c
        .inner
        .control
        .reader()
        .state()
        .nodes
        .values()
        .map(|n| (n.id, n.name.clone()))
        .collect();
    let millis = |d: Option<prost_types::Duration>| {
        d.and_then(|d| Duration::try_from(d).ok())
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let stream = tokio_stream::wrappers::ReceiverStream::new(events).filter_map(move |item| {
        let (name, data) = match item {
            Ok(r) => match r.event? {
                v1::generate_response::Event::Token(t) => (
                    "token",
                    serde_json::json!({ "text": t.text, "ms": millis(t.since_start) }),
                ),
                v1::generate_response::Event::Usage(u) => {
                    let path: Vec<String> = u
                        .path
                        .iter()
                        .map(|id| names.get(id).cloned().unwrap_or_else(|| id.to_string()))
                        .collect();
                    (
                        "done",
                        serde_json::json!({
                            "path": path,
                            "failovers": u.failovers,
                            "prompt_tokens": u.prompt_tokens,
                            "completion_tokens": u.completion_tokens,
                            "ttft_ms": millis(u.time_to_first_token),
                        }),
                    )
                }
            },
            Err(e) => ("error", serde_json::json!({ "message": e.to_string() })),
        };
        Some(Ok(Event::default().event(name).data(data.to_string())))
    });
    Ok(Sse::new(stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn svg_text_is_escaped() {
        let regions = vec!["<script>".to_owned(), "b&b".to_owned()];
        let mut samples = BTreeMap::new();
        samples.insert(("<script>".to_owned(), "b&b".to_owned()), vec![65.0]);
        let svg = matrix(&regions, &samples);
        assert!(!svg.contains("<script>"), "{svg}");
        assert!(svg.contains("&lt;script&gt;") && svg.contains("b&amp;b"));
        assert!(svg.contains("65 ms"));
    }

    fn view_with_node(name: &str) -> View {
        View {
            cluster: "c".into(),
            here: name.into(),
            leader: name.into(),
            term: 1,
            up: 1,
            total: 1,
            regions: vec![Region {
                name: "us-east".into(),
                cards: vec![Card {
                    name: name.into(),
                    region: "us-east".into(),
                    zone: String::new(),
                    role: "leader",
                    status: "up",
                    backend: "cpu".into(),
                    load: "1%".into(),
                    queue: "0".into(),
                    stages: vec![format!("{name} r0 s0 (ready)")],
                    grpc: "127.0.0.1:7400".into(),
                    height: "1".into(),
                    here: true,
                    leader_rtt: "(the leader)".into(),
                }],
            }],
            matrix_svg: matrix(&["us-east".into()], &BTreeMap::new()),
            sparks: Vec::new(),
            slots: vec![Slot {
                model: name.into(),
                replica: 0,
                stage: 0,
                layers: "0..2".into(),
                node: name.into(),
                region: "us-east".into(),
                state: "ready",
                generation: 1,
                detail: name.into(),
            }],
            models: vec![name.into()],
            head_height: 1,
            head_hash: "00".into(),
            blocks: vec![BlockRow {
                height: 1,
                time: "t".into(),
                hash: "00".into(),
                txs: vec![TxRow {
                    kind: "note".into(),
                    summary: name.into(),
                    principal: name.into(),
                    rejected: String::new(),
                }],
            }],
            events: vec![EventRow {
                time: "t".into(),
                kind: "node",
                message: format!("{name} is down"),
            }],
            generated: "t".into(),
        }
    }

    #[test]
    fn every_view_escapes_what_it_shows() {
        let v = view_with_node("<script>alert(1)</script>");
        let page = PageTemplate { v: &v }.render().unwrap();
        // The page's own two scripts, and no third.
        assert_eq!(page.matches("<script>").count(), 2, "{page}");
        assert!(page.contains("&#60;script&#62;alert(1)"), "{page}");
        for html in [
            ClusterTemplate { v: &v }.render().unwrap(),
            PlacementTemplate { v: &v }.render().unwrap(),
            ChainTemplate { v: &v }.render().unwrap(),
            EventsTemplate { v: &v }.render().unwrap(),
            LatencyTemplate { v: &v }.render().unwrap(),
        ] {
            assert!(!html.contains("<script>alert"), "{html}");
        }
    }

    #[test]
    fn heat_runs_from_green_to_red() {
        assert_eq!(heat(0.0), "hsl(120 70% 45%)");
        assert_eq!(heat(250.0), "hsl(0 70% 45%)");
        assert_eq!(heat(1000.0), "hsl(0 70% 45%)");
    }

    #[test]
    fn sparkline_skips_unknown_samples() {
        let s: VecDeque<f64> = [10.0, f64::NAN, 20.0].into_iter().collect();
        let svg = sparkline(&s);
        assert_eq!(svg.matches(',').count(), 2, "{svg}");
    }
}
