//! Every metric this crate exports: names (a contract with dashboards,
//! alerts and runbooks), descriptions, and the Prometheus recorder.
//!
//! Names follow ARCHITECTURE.md: prefix `trine_`, base units, `_total` for
//! counters. Process metrics (`process_*`) come from `metrics-process`, in
//! the layout of the official Prometheus clients.

use std::sync::OnceLock;

use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Gauge, always 1: `{version, git_sha, simd}` of the running binary.
pub const BUILD_INFO: &str = "trine_build_info";
/// Gauge: 1 while the node serves, 0 once it has begun shutting down.
pub const NODE_UP: &str = "trine_node_up";
/// Gauge, always 1: `{name, region, zone, peer_id}` of this node.
pub const NODE_INFO: &str = "trine_node_info";

/// Gauge `{region}`: peers this node knows (connected or heard from lately).
pub const PEERS: &str = "trine_peers";
/// Gauge: entries in the Kademlia routing table.
pub const DHT_PEERS: &str = "trine_dht_peers";
/// Gauge: peers with at least one open connection.
pub const P2P_CONNECTED_PEERS: &str = "trine_p2p_connected_peers";
/// Counter: bytes written to mesh connections (before encryption overhead
/// is removed, i.e. what goes on the wire).
pub const P2P_BYTES_SENT: &str = "trine_p2p_bytes_sent_total";
/// Counter: bytes read from mesh connections.
pub const P2P_BYTES_RECEIVED: &str = "trine_p2p_bytes_received_total";
/// Histogram `{peer_region}`: libp2p ping round trips.
pub const PEER_RTT: &str = "trine_peer_rtt_seconds";
/// Counter: pings that failed or timed out.
pub const PING_FAILURES: &str = "trine_p2p_ping_failures_total";
/// Counter: heartbeats this node published.
pub const GOSSIP_PUBLISHED: &str = "trine_gossip_messages_published_total";
/// Counter: valid heartbeats received.
pub const GOSSIP_RECEIVED: &str = "trine_gossip_messages_received_total";
/// Counter `{reason}`: heartbeats dropped without penalty (stale, clock).
pub const GOSSIP_IGNORED: &str = "trine_gossip_messages_ignored_total";
/// Counter `{reason}`: heartbeats rejected as invalid (the forwarder is
/// scored down): oversized, malformed, field, rate, unsigned, not_member.
pub const GOSSIP_INVALID: &str = "trine_gossip_messages_invalid_total";
/// Inbound libp2p connections refused by a connection limit.
pub const P2P_DENIED: &str = "trine_p2p_connections_denied_total";
/// Counter `{direction, status}`: stage requests answered (in) or sent (out).
pub const STAGE_REQUESTS: &str = "trine_stage_requests_total";
/// Counter `{reason}`: stage requests refused before reaching a stage:
/// oversized, malformed, shape, request_id, model, not_member, failure.
pub const STAGE_REJECTED: &str = "trine_stage_rejected_total";
/// Gauge `{model,stage}`: replicas of that stage placed on this node.
pub const STAGE_ASSIGNED: &str = "trine_stage_assigned";
/// Counter `{api,code}`: inference requests answered (api: grpc, openai).
pub const REQUESTS: &str = "trine_requests_total";
/// Counter `{api,reason}`: calls refused by token authentication (api:
/// admin, inference; reason: missing, unknown, expired, scope).
pub const AUTH_REFUSED: &str = "trine_auth_refused_total";
/// Counter: tokens generated on this node.
pub const TOKENS_GENERATED: &str = "trine_tokens_generated_total";
/// Counter: requests this node continued on another replica after one
/// failed mid-answer.
pub const FAILOVERS: &str = "trine_request_failovers_total";
/// Histogram: a request from arrival at the entry node to its last event.
pub const REQUEST_DURATION: &str = "trine_request_duration_seconds";
/// Histogram: arrival to first token, at the entry node.
pub const TTFT: &str = "trine_time_to_first_token_seconds";
/// Histogram: time between consecutive tokens, at the entry node.
pub const INTER_TOKEN: &str = "trine_inter_token_seconds";
/// Gauge: generations waiting for a compute slot on this node.
pub const QUEUE_DEPTH: &str = "trine_queue_depth";
/// Gauge: slots (replica × stage) of deployed models not ready on an up
/// node, as this node's copy of the state sees them.
pub const PLACEMENT_UNREADY: &str = "trine_placement_unready_slots";
/// Gauges: bytes free (to an unprivileged user) and in all on the
/// filesystem holding the data dir.
pub const DATA_DIR_AVAILABLE: &str = "trine_data_dir_available_bytes";
pub const DATA_DIR_CAPACITY: &str = "trine_data_dir_capacity_bytes";
/// Gauge: when this node's certificate expires, Unix seconds.
pub const CERT_EXPIRY: &str = trine_control::metrics::CERT_EXPIRY;
/// Counter: requests ended by their deadline on this node.
pub const REQUEST_TIMEOUTS: &str = "trine_request_timeouts_total";
/// Histogram: sequences in each batched forward step on this node.
pub const BATCH_SIZE: &str = "trine_batch_size";
/// Histogram: tokens in each batched forward step on this node.
pub const BATCH_TOKENS: &str = "trine_batch_tokens";
/// Counter: request receipts this node committed to the chain.
pub const RECEIPTS: &str = "trine_receipts_total";
/// Counter: receipts lost (buffer full, or the cluster would not commit).
pub const RECEIPTS_DROPPED: &str = "trine_receipts_dropped_total";

/// Bucket bounds of [`PEER_RTT`]: 1 ms to 2 s, dense where regions sit.
pub const RTT_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3,
    0.4, 0.5, 0.75, 1.0, 1.5, 2.0,
];

/// Every name above, for tests and docs that check the contract.
pub const ALL: &[&str] = &[
    BUILD_INFO,
    NODE_UP,
    NODE_INFO,
    PEERS,
    DHT_PEERS,
    P2P_CONNECTED_PEERS,
    P2P_BYTES_SENT,
    P2P_BYTES_RECEIVED,
    PEER_RTT,
    PING_FAILURES,
    GOSSIP_PUBLISHED,
    GOSSIP_RECEIVED,
    GOSSIP_IGNORED,
    GOSSIP_INVALID,
    P2P_DENIED,
    STAGE_REQUESTS,
    STAGE_REJECTED,
    STAGE_ASSIGNED,
    REQUESTS,
    TOKENS_GENERATED,
    FAILOVERS,
    RECEIPTS,
    RECEIPTS_DROPPED,
    REQUEST_DURATION,
    TTFT,
    INTER_TOKEN,
    QUEUE_DEPTH,
    BATCH_SIZE,
    BATCH_TOKENS,
    REQUEST_TIMEOUTS,
    PLACEMENT_UNREADY,
    DATA_DIR_AVAILABLE,
    DATA_DIR_CAPACITY,
    CERT_EXPIRY,
];

/// Buckets of the batch-size histogram (sequences per step).
pub const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0,
];
/// Buckets of the batch-tokens histogram.
pub const BATCH_TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

/// Buckets of the request and first-token histograms: 1 ms … 2 min.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Buckets of the inter-token histogram: 250 µs … 5 s.
pub const INTER_TOKEN_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
];

struct Exporter {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static EXPORTER: OnceLock<Exporter> = OnceLock::new();

/// Installs the global recorder (once per process) and describes every
/// metric. Later calls return the same handle, so several nodes may run
/// inside one test process.
pub fn install() -> Metrics {
    let exporter = EXPORTER.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(PEER_RTT.to_owned()), RTT_BUCKETS)
            .expect("RTT_BUCKETS is not empty")
            .set_buckets_for_metric(
                Matcher::Full(trine_control::metrics::RAFT_COMMIT_DURATION.to_owned()),
                trine_control::metrics::COMMIT_BUCKETS,
            )
            .expect("COMMIT_BUCKETS is not empty")
            .set_buckets_for_metric(
                Matcher::Full(trine_control::metrics::STAGE_RECOVERY.to_owned()),
                trine_control::metrics::RECOVERY_BUCKETS,
            )
            .expect("RECOVERY_BUCKETS is not empty")
            .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.to_owned()), LATENCY_BUCKETS)
            .expect("LATENCY_BUCKETS is not empty")
            .set_buckets_for_metric(Matcher::Full(TTFT.to_owned()), LATENCY_BUCKETS)
            .expect("LATENCY_BUCKETS is not empty")
            .set_buckets_for_metric(Matcher::Full(INTER_TOKEN.to_owned()), INTER_TOKEN_BUCKETS)
            .expect("INTER_TOKEN_BUCKETS is not empty")
            .set_buckets_for_metric(Matcher::Full(BATCH_SIZE.to_owned()), BATCH_BUCKETS)
            .expect("BATCH_BUCKETS is not empty")
            .set_buckets_for_metric(Matcher::Full(BATCH_TOKENS.to_owned()), BATCH_TOKEN_BUCKETS)
            .expect("BATCH_TOKEN_BUCKETS is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder is installed; the handle then
        // renders nothing, which the e2e test would catch.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        describe();
        let process = metrics_process::Collector::default();
        process.describe();
        Exporter { handle, process }
    });
    Metrics { exporter }
}

/// Counters without labels start at 0, so a rate or an alert over one
/// works before its first event (Prometheus's advice for counters).
fn start_counters_at_zero() {
    for name in [
        PING_FAILURES,
        TOKENS_GENERATED,
        FAILOVERS,
        REQUEST_TIMEOUTS,
        RECEIPTS,
        RECEIPTS_DROPPED,
        P2P_BYTES_SENT,
        P2P_BYTES_RECEIVED,
        GOSSIP_PUBLISHED,
        GOSSIP_RECEIVED,
    ] {
        counter!(name).increment(0);
    }
}

fn describe() {
    start_counters_at_zero();
    // The control plane's metrics (trine-control sets them).
    for (name, help) in trine_control::metrics::DESCRIPTIONS {
        let name = *name;
        if name.ends_with("_total") {
            describe_counter!(name, *help);
        } else if trine_control::metrics::HISTOGRAMS.contains(&name) {
            describe_histogram!(name, metrics::Unit::Seconds, *help);
        } else {
            describe_gauge!(name, *help);
        }
    }
    describe_gauge!(
        BUILD_INFO,
        "Build of the running trine binary (value is always 1)."
    );
    describe_gauge!(
        NODE_UP,
        "1 while the node serves; 0 once it is shutting down."
    );
    describe_gauge!(
        NODE_INFO,
        "Name, region, zone and libp2p peer id of this node (value is always 1)."
    );
    describe_gauge!(
        PEERS,
        "Peers this node knows, by region: connected, or heard from within the peer TTL."
    );
    describe_gauge!(DHT_PEERS, "Entries in this node's Kademlia routing table.");
    describe_gauge!(
        P2P_CONNECTED_PEERS,
        "Peers with at least one open mesh connection."
    );
    describe_counter!(
        P2P_BYTES_SENT,
        metrics::Unit::Bytes,
        "Bytes written to mesh connections."
    );
    describe_counter!(
        P2P_BYTES_RECEIVED,
        metrics::Unit::Bytes,
        "Bytes read from mesh connections."
    );
    describe_histogram!(
        PEER_RTT,
        metrics::Unit::Seconds,
        "libp2p ping round-trip time to peers, by the peer's region."
    );
    describe_counter!(PING_FAILURES, "libp2p pings that failed or timed out.");
    describe_counter!(
        GOSSIP_PUBLISHED,
        "Health heartbeats this node published on trine/health/1."
    );
    describe_counter!(GOSSIP_RECEIVED, "Valid health heartbeats received.");
    describe_counter!(
        GOSSIP_IGNORED,
        "Heartbeats dropped without penalty (stale, clock), by reason."
    );
    describe_counter!(
        GOSSIP_INVALID,
        "Heartbeats rejected as invalid, by reason; the forwarding peer is scored down."
    );
    describe_counter!(
        P2P_DENIED,
        "Inbound libp2p connections refused by a limit (max_connections, max_connections_per_peer, pending handshakes)."
    );
    describe_counter!(
        STAGE_REQUESTS,
        "Requests on /trine/stage/1, by direction (in, out) and status."
    );
    describe_counter!(
        STAGE_REJECTED,
        "Stage requests refused before reaching a stage, by reason."
    );
    describe_gauge!(
        STAGE_ASSIGNED,
        "Replicas of a model's stage placed on this node, by model and stage."
    );
    describe_counter!(
        REQUESTS,
        "Inference requests this node answered, by API (grpc, openai) and outcome code."
    );
    describe_counter!(TOKENS_GENERATED, "Tokens generated on this node.");
    describe_counter!(
        AUTH_REFUSED,
        "Calls refused by token authentication, by API (admin, inference) and reason (missing, unknown, expired, scope)."
    );
    describe_histogram!(
        REQUEST_DURATION,
        metrics::Unit::Seconds,
        "Inference requests this node took from clients: arrival to the last event."
    );
    describe_histogram!(
        TTFT,
        metrics::Unit::Seconds,
        "Inference requests this node took from clients: arrival to the first token."
    );
    describe_histogram!(
        INTER_TOKEN,
        metrics::Unit::Seconds,
        "Time between consecutive tokens streamed to clients of this node."
    );
    describe_gauge!(
        QUEUE_DEPTH,
        "Generations waiting for a compute slot on this node."
    );
    describe_gauge!(
        PLACEMENT_UNREADY,
        "Slots (replica x stage) of deployed models that are not ready on an up node."
    );
    describe_gauge!(
        DATA_DIR_AVAILABLE,
        metrics::Unit::Bytes,
        "Bytes free on the filesystem holding this node's data dir."
    );
    describe_gauge!(
        DATA_DIR_CAPACITY,
        metrics::Unit::Bytes,
        "Size of the filesystem holding this node's data dir."
    );
    describe_gauge!(
        CERT_EXPIRY,
        "When a certificate of this node expires, in Unix seconds: cert=\"raft\" is the node certificate (mutual TLS on the Raft port), cert=\"api\" the client ports' (with --api-tls)."
    );
    describe_counter!(
        REQUEST_TIMEOUTS,
        "Inference requests ended by their deadline (the node's --request-timeout or the client's)."
    );
    describe_histogram!(
        BATCH_SIZE,
        "Sequences sharing each batched forward step of a stage on this node (continuous batching)."
    );
    describe_histogram!(
        BATCH_TOKENS,
        "Tokens in each batched forward step of a stage on this node (prefill and decode together)."
    );
    describe_counter!(
        RECEIPTS,
        "Request receipts this node committed to the chain."
    );
    describe_counter!(
        RECEIPTS_DROPPED,
        "Request receipts lost: the buffer was full or the cluster would not commit them."
    );
    describe_counter!(
        FAILOVERS,
        "Requests this node routed that continued on another replica after one failed mid-answer."
    );
}

pub fn p2p_sent(n: usize) {
    counter!(P2P_BYTES_SENT).increment(n as u64);
}

pub fn p2p_received(n: usize) {
    counter!(P2P_BYTES_RECEIVED).increment(n as u64);
}

pub fn set_peers(region: &str, n: usize) {
    gauge!(PEERS, "region" => region.to_owned()).set(n as f64);
}

pub fn set_dht_peers(n: usize) {
    gauge!(DHT_PEERS).set(n as f64);
}

pub fn set_connected_peers(n: usize) {
    gauge!(P2P_CONNECTED_PEERS).set(n as f64);
}

pub fn observe_rtt(peer_region: &str, rtt: Duration) {
    histogram!(PEER_RTT, "peer_region" => peer_region.to_owned()).record(rtt.as_secs_f64());
}

pub fn ping_failure() {
    counter!(PING_FAILURES).increment(1);
}

pub fn gossip_published() {
    counter!(GOSSIP_PUBLISHED).increment(1);
}

pub fn gossip_received() {
    counter!(GOSSIP_RECEIVED).increment(1);
}

pub fn gossip_ignored(reason: &'static str) {
    counter!(GOSSIP_IGNORED, "reason" => reason).increment(1);
}

pub fn gossip_invalid(reason: &'static str) {
    counter!(GOSSIP_INVALID, "reason" => reason).increment(1);
}

pub fn p2p_denied() {
    counter!(P2P_DENIED).increment(1);
}

pub fn stage_request(direction: &'static str, status: &'static str) {
    counter!(STAGE_REQUESTS, "direction" => direction, "status" => status).increment(1);
}

pub fn stage_assigned(model: &str, stage: u32, replicas: usize) {
    metrics::gauge!(STAGE_ASSIGNED, "model" => model.to_owned(), "stage" => stage.to_string())
        .set(replicas as f64);
}

pub fn request(api: &'static str, code: &'static str) {
    counter!(REQUESTS, "api" => api, "code" => code).increment(1);
}

pub fn auth_refused(api: &'static str, reason: &'static str) {
    counter!(AUTH_REFUSED, "api" => api, "reason" => reason).increment(1);
}

pub fn generated(n: u64) {
    counter!(TOKENS_GENERATED).increment(n);
}

pub fn failover() {
    counter!(FAILOVERS).increment(1);
}

pub fn request_done(took: Duration) {
    histogram!(REQUEST_DURATION).record(took.as_secs_f64());
}

pub fn first_token(took: Duration) {
    histogram!(TTFT).record(took.as_secs_f64());
}

pub fn inter_token(gap: Duration) {
    histogram!(INTER_TOKEN).record(gap.as_secs_f64());
}

pub fn placement_unready(n: usize) {
    gauge!(PLACEMENT_UNREADY).set(n as f64);
}

/// Free and total bytes of the filesystem holding `dir`.
pub fn data_dir_space(dir: &std::path::Path) {
    if let Ok(s) = nix::sys::statvfs::statvfs(dir) {
        let block = s.fragment_size() as f64;
        gauge!(DATA_DIR_AVAILABLE).set(s.blocks_available() as f64 * block);
        gauge!(DATA_DIR_CAPACITY).set(s.blocks() as f64 * block);
    }
}

pub fn request_timed_out() {
    counter!(REQUEST_TIMEOUTS).increment(1);
}

pub fn batch(sequences: usize, tokens: usize) {
    histogram!(BATCH_SIZE).record(sequences as f64);
    histogram!(BATCH_TOKENS).record(tokens as f64);
}

pub fn queue_depth(n: usize) {
    gauge!(QUEUE_DEPTH).set(n as f64);
}

pub fn receipts_committed(n: u64) {
    counter!(RECEIPTS).increment(n);
}

pub fn receipt_dropped() {
    counter!(RECEIPTS_DROPPED).increment(1);
}

pub fn stage_rejected(reason: &'static str) {
    counter!(STAGE_REJECTED, "reason" => reason).increment(1);
}

/// Access to the installed exporter.
#[derive(Clone, Copy)]
pub struct Metrics {
    exporter: &'static Exporter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Sets the metrics that describe this binary and node.
    pub fn set_identity(&self, name: &str, region: &str, zone: &str, peer_id: &str) {
        gauge!(
            BUILD_INFO,
            "version" => crate::build::VERSION,
            "git_sha" => crate::build::GIT_SHA,
            "simd" => crate::simd::Level::detect().as_str()
        )
        .set(1.0);
        gauge!(
            NODE_INFO,
            "name" => name.to_owned(),
            "region" => region.to_owned(),
            "zone" => zone.to_owned(),
            "peer_id" => peer_id.to_owned()
        )
        .set(1.0);
    }

    pub fn set_up(&self, up: bool) {
        gauge!(NODE_UP).set(if up { 1.0 } else { 0.0 });
    }

    /// Prometheus text exposition of every metric, process metrics fresh.
    pub fn render(&self) -> String {
        self.exporter.process.collect();
        self.exporter.handle.run_upkeep();
        self.exporter.handle.render()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_convention() {
        for name in ALL {
            assert!(name.starts_with("trine_"), "{name}");
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{name}"
            );
        }
        // Counters end in _total, durations in _seconds.
        for name in [
            P2P_BYTES_SENT,
            P2P_BYTES_RECEIVED,
            PING_FAILURES,
            GOSSIP_INVALID,
            P2P_DENIED,
            REQUESTS,
            TOKENS_GENERATED,
            FAILOVERS,
            RECEIPTS,
            RECEIPTS_DROPPED,
        ] {
            assert!(name.ends_with("_total"), "{name}");
        }
        assert!(PEER_RTT.ends_with("_seconds"));
    }

    #[test]
    fn render_shows_identity_and_process_metrics() {
        let m = install();
        m.set_identity("n1", "us-east", "a", "12D3KooWtest");
        m.set_up(true);
        set_peers("us-west", 2);
        set_dht_peers(2);
        set_connected_peers(2);
        p2p_sent(10);
        p2p_received(20);
        observe_rtt("us-west", Duration::from_millis(65));
        ping_failure();
        gossip_published();
        gossip_received();
        gossip_ignored("stale");
        gossip_invalid("malformed");
        stage_request("in", "ok");
        stage_rejected("oversized");
        p2p_denied();
        stage_assigned("tiny", 0, 1);
        request("grpc", "ok");
        generated(3);
        failover();
        receipts_committed(2);
        receipt_dropped();
        request_done(Duration::from_millis(30));
        first_token(Duration::from_millis(3));
        inter_token(Duration::from_millis(1));
        queue_depth(0);
        batch(3, 7);
        request_timed_out();
        placement_unready(0);
        data_dir_space(std::path::Path::new("."));
        // Set by the control plane on every certificate (re)load.
        gauge!(CERT_EXPIRY, "cert" => "raft").set(2e9);
        let text = m.render();
        assert!(
            text.contains("trine_batch_size_bucket{le=\"3\"} 1"),
            "{text}"
        );
        assert!(text.contains("# TYPE trine_build_info gauge"), "{text}");
        assert!(
            text.contains("# TYPE trine_peer_rtt_seconds histogram"),
            "{text}"
        );
        // The RTT buckets resolve 1 ms through 2 s.
        for le in ["0.001", "0.06", "0.08", "2"] {
            let bucket =
                format!("trine_peer_rtt_seconds_bucket{{peer_region=\"us-west\",le=\"{le}\"}}");
            assert!(text.contains(&bucket), "{bucket}: {text}");
        }
        assert!(
            text.contains(&format!("git_sha=\"{}\"", crate::build::GIT_SHA)),
            "{text}"
        );
        assert!(
            text.contains("trine_node_info{name=\"n1\",region=\"us-east\",zone=\"a\",peer_id=\"12D3KooWtest\"} 1"),
            "{text}"
        );
        assert!(text.contains("process_resident_memory_bytes"), "{text}");
        // Every name of the contract is exported with its description.
        for name in ALL {
            assert!(text.contains(&format!("# HELP {name} ")), "{name}: {text}");
        }
    }
}
