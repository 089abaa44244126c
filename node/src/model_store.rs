//! Where a node finds a deployed model's file. A model's identity is its
//! sha256, so any copy with that digest will do; the node looks, in order:
//!
//! 1. at the deployed source path;
//! 2. in its own store, `<data-dir>/models/<sha256>.gguf` (where fetched
//!    files land; an operator may also copy a file there);
//! 3. in the Hugging Face cache (`trine model pull` puts it there: an LFS
//!    blob is named by its sha256, `models--*/blobs/<sha256>`);
//! 4. on its peers: every node serves the deployed files it has verified at
//!    `GET /v1/models/blobs/<sha256>` on its HTTP port, and the node
//!    downloads from them (nodes with the model ready and in its own region
//!    first), resuming a partial download, checking the digest before the
//!    file is used, and trying the next peer if one sends the wrong bytes.
//!
//! Every copy is hashed before it is used or served (each digest once per
//! file version: path, size and modification time).

use std::collections::BTreeMap;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};
use trine_control::ModelRecord;

/// A node another node can fetch a model from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub name: String,
    /// host:port of its HTTP server.
    pub http: String,
}

/// Digests already computed, by (path, size, mtime).
type Digests = BTreeMap<(PathBuf, u64, SystemTime), String>;

#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    hf_cache: Option<PathBuf>,
    digests: Mutex<Digests>,
    client: reqwest::Client,
}

/// Where a model came from, for the logs and the stage report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    Local(PathBuf),
    Fetched {
        path: PathBuf,
        from: String,
        took: Duration,
        bytes: u64,
    },
}

impl Found {
    pub fn path(&self) -> &Path {
        match self {
            Self::Local(p) | Self::Fetched { path: p, .. } => p,
        }
    }
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl Store {
    /// The store under `data_dir/models`, and the Hugging Face cache
    /// `hf_cache`, else the one the environment names (as `trine model
    /// pull` uses it).
    pub fn new(data_dir: &Path, hf_cache: Option<PathBuf>) -> Arc<Self> {
        Arc::new(Self {
            dir: data_dir.join("models"),
            hf_cache: crate::hub::cache_dir(&hf_cache).ok(),
            digests: Mutex::default(),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .read_timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The digest of `path` (a file or a model directory), computed once
    /// per version of the file.
    pub fn digest(&self, path: &Path) -> Result<String, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let key = (
            path.to_owned(),
            meta.len(),
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        );
        if let Some(d) = self.digests.lock().ok().and_then(|d| d.get(&key).cloned()) {
            return Ok(d);
        }
        let d = crate::deploy_cmd::digest(path, false).map_err(|e| format!("{e:#}"))?;
        if let Ok(mut m) = self.digests.lock() {
            m.insert(key, d.clone());
        }
        Ok(d)
    }

    /// The places a copy of `model` may be on this node, in order.
    fn candidates(&self, model: &ModelRecord) -> Vec<PathBuf> {
        let mut c = vec![PathBuf::from(&model.source)];
        if is_sha256(&model.sha256) {
            c.push(self.dir.join(format!("{}.gguf", model.sha256)));
            if let Some(cache) = &self.hf_cache
                && let Ok(repos) = std::fs::read_dir(cache)
            {
                let mut blobs: Vec<PathBuf> = repos
                    .flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("models--"))
                    .map(|e| e.path().join("blobs").join(&model.sha256))
                    .filter(|p| p.is_file())
                    .collect();
                blobs.sort();
                c.extend(blobs);
            }
        }
        c
    }

    /// A verified copy of `model` on this node, if there is one. A copy in
    /// the store with the wrong digest is deleted (it is ours to manage).
    pub fn find(&self, model: &ModelRecord) -> Option<PathBuf> {
        let ours = self.dir.join(format!("{}.gguf", model.sha256));
        for path in self.candidates(model) {
            if !path.exists() {
                continue;
            }
            match self.digest(&path) {
                Ok(d) if d == model.sha256 => return Some(path),
                Ok(d) => {
                    tracing::warn!(path = %path.display(), sha256 = %d, want = %model.sha256, "a copy of the model has the wrong digest; not using it");
                    if path == ours {
                        let _ = std::fs::remove_file(&path);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read a copy of the model"),
            }
        }
        None
    }

    /// A verified copy of `model`: found on this node, or fetched from one
    /// of `peers` (in the order given). Blocking: call from a blocking
    /// thread inside the runtime.
    pub fn locate(&self, model: &ModelRecord, peers: &[Peer]) -> Result<Found, String> {
        if let Some(p) = self.find(model) {
            return Ok(Found::Local(p));
        }
        let not_here = format!(
            "{} is not at {} nor in {}",
            model.name,
            model.source,
            self.dir.display()
        );
        if !is_sha256(&model.sha256) {
            return Err(format!("{not_here}, and its digest is not a sha256"));
        }
        if peers.is_empty() {
            return Err(format!(
                "{not_here}, and no other node is up to fetch it from; copy the file to either place"
            ));
        }
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| "fetching needs the node's runtime".to_owned())?;
        let mut errors = Vec::new();
        for peer in peers {
            let t = Instant::now();
            match handle.block_on(self.fetch(model, peer)) {
                Ok((path, bytes)) => {
                    return Ok(Found::Fetched {
                        path,
                        from: peer.name.clone(),
                        took: t.elapsed(),
                        bytes,
                    });
                }
                Err(e) => {
                    tracing::info!(peer = %peer.name, error = %e, "cannot fetch the model from this peer; trying the next");
                    errors.push(format!("{}: {e}", peer.name));
                }
            }
        }
        Err(format!(
            "{not_here}, and no peer could send it ({}); copy the file to either place",
            errors.join("; ")
        ))
    }

    /// The most bytes a model file may have: its tensors with room to spare
    /// (a peer cannot make us fill the disk).
    fn limit(model: &ModelRecord) -> u64 {
        u64::from(model.layers)
            .saturating_mul(model.bytes_per_layer)
            .saturating_add(model.fixed_bytes.saturating_mul(2))
            .saturating_mul(2)
            .saturating_add(256 << 20)
    }

    /// Downloads `model` from `peer` into the store, resuming a partial
    /// download; returns the path and the bytes transferred.
    async fn fetch(&self, model: &ModelRecord, peer: &Peer) -> Result<(PathBuf, u64), String> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        let done = self.dir.join(format!("{}.gguf", model.sha256));
        let partial = self.dir.join(format!("{}.partial", model.sha256));
        let limit = Self::limit(model);
        let io = |e: std::io::Error| format!("{}: {e}", partial.display());
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&partial)
            .map_err(io)?;
        // What is already there counts toward the digest.
        let mut hasher = Sha256::new();
        let mut have = 0u64;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            have += n as u64;
        }
        let url = format!("http://{}/v1/models/blobs/{}", peer.http, model.sha256);
        let mut req = self.client.get(&url);
        if have > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
        }
        let resp = req.send().await.map_err(|e| format!("{url}: {e}"))?;
        match resp.status().as_u16() {
            206 => {}
            200 => {
                // The peer ignored the range: start over.
                file.set_len(0).map_err(io)?;
                file.rewind().map_err(io)?;
                hasher = Sha256::new();
                have = 0;
            }
            416 => {
                // Nothing left to send: the partial file is complete (or
                // wrong); the digest below decides.
            }
            404 => return Err("it has no verified copy".into()),
            s => return Err(format!("{url}: HTTP {s}")),
        }
        if resp.content_length().unwrap_or(0).saturating_add(have) > limit {
            let _ = std::fs::remove_file(&partial);
            return Err(format!(
                "it offers {} bytes, more than the {limit} a model of this shape can have",
                resp.content_length().unwrap_or(0) + have
            ));
        }
        tracing::info!(peer = %peer.name, model = %model.name, resume_at = have, "fetching the model from a peer");
        let mut got = 0u64;
        let mut stream = resp.bytes_stream();
        let mut next_log = Instant::now() + Duration::from_secs(5);
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|e| format!("download interrupted after {got} bytes: {e}"))?;
            got += chunk.len() as u64;
            if have + got > limit {
                let _ = std::fs::remove_file(&partial);
                return Err(format!(
                    "it sent more than the {limit} bytes a model of this shape can have"
                ));
            }
            hasher.update(&chunk);
            file.write_all(&chunk).map_err(io)?;
            if Instant::now() >= next_log {
                next_log += Duration::from_secs(5);
                tracing::info!(peer = %peer.name, model = %model.name, bytes = have + got, "fetching");
            }
        }
        file.sync_all().map_err(io)?;
        let digest = trine_control::chain::hex(&hasher.finalize());
        if digest != model.sha256 {
            let _ = std::fs::remove_file(&partial);
            return Err(format!(
                "it sent a file with sha256 {digest}, not {}; the copy was deleted",
                model.sha256
            ));
        }
        std::fs::rename(&partial, &done).map_err(io)?;
        if let Ok(meta) = std::fs::metadata(&done)
            && let Ok(mut m) = self.digests.lock()
        {
            m.insert(
                (
                    done.clone(),
                    meta.len(),
                    meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                ),
                digest,
            );
        }
        Ok((done, got))
    }
}

/// The path to serve for `sha256`: a verified copy of a model deployed
/// with that digest, or nothing (only deployed files are ever served).
pub fn servable(store: &Store, state: &trine_control::State, sha256: &str) -> Option<PathBuf> {
    if !is_sha256(sha256) {
        return None;
    }
    let model = state.models.values().find(|m| m.sha256 == sha256)?;
    let path = store.find(model)?;
    path.is_file().then_some(path)
}

/// The peers to fetch `sha256` from, best first: up nodes other than `me`
/// with an HTTP address; those holding a ready stage of a model with that
/// digest first, then those in `my_region`, then by id.
pub fn peers(state: &trine_control::State, me: u64, sha256: &str) -> Vec<Peer> {
    let my_region = state.nodes.get(&me).map(|n| n.region.clone());
    let ready: std::collections::BTreeSet<u64> = state
        .placements
        .values()
        .filter(|p| {
            p.state == trine_control::StageState::Ready
                && state
                    .models
                    .get(&p.model)
                    .is_some_and(|m| m.sha256 == sha256)
        })
        .map(|p| p.node)
        .collect();
    let mut nodes: Vec<_> = state
        .nodes
        .values()
        .filter(|n| {
            n.id != me && n.status == trine_control::NodeStatus::Up && !n.http_addr.is_empty()
        })
        .collect();
    nodes.sort_by_key(|n| {
        (
            !ready.contains(&n.id),
            Some(&n.region) != my_region.as_ref(),
            n.id,
        )
    });
    nodes
        .into_iter()
        .map(|n| Peer {
            name: n.name.clone(),
            http: n.http_addr.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use axum::Router;
    use axum::routing::get;

    use super::*;

    fn model(bytes: &[u8]) -> ModelRecord {
        ModelRecord {
            name: "m".into(),
            source: "/nonexistent/m.gguf".into(),
            sha256: trine_control::chain::hex(&Sha256::digest(bytes)),
            layers: 1,
            bytes_per_layer: 1 << 20,
            fixed_bytes: 0,
            stages: 1,
            replicas: 1,
            regions: Vec::new(),
            deployed_ms: 0,
        }
    }

    /// An HTTP server that answers every blob request with `body`.
    async fn serve(body: &'static [u8]) -> Peer {
        let app = Router::new().route("/v1/models/blobs/{sha}", get(move || async move { body }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Peer {
            name: format!("peer-{}", addr.port()),
            http: addr.to_string(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lying_peer_is_skipped_and_an_honest_one_used() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path(), Some(dir.path().join("hf")));
        let good: &'static [u8] = b"the real model bytes";
        let liar = serve(b"something else entirely").await;
        let honest = serve(good).await;
        let m = model(good);
        let s = store.clone();
        let (mm, peers) = (m.clone(), vec![liar.clone(), honest.clone()]);
        let found = tokio::task::spawn_blocking(move || s.locate(&mm, &peers))
            .await
            .expect("join")
            .expect("fetched");
        let Found::Fetched { path, from, .. } = &found else {
            panic!("expected a fetch, got {found:?}");
        };
        assert_eq!(from, &honest.name);
        assert_eq!(std::fs::read(path).expect("read"), good);
        assert!(!store.dir().join(format!("{}.partial", m.sha256)).exists());
        // Now it is found locally, without asking anyone.
        let s = store.clone();
        let local = tokio::task::spawn_blocking(move || s.locate(&m, &[]))
            .await
            .expect("join")
            .expect("found");
        assert!(matches!(local, Found::Local(_)), "{local:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_liars_mean_a_clear_error_and_nothing_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path(), Some(dir.path().join("hf")));
        let liar = serve(b"not it").await;
        let m = model(b"the real model bytes");
        let (s, mm, peers) = (store.clone(), m.clone(), vec![liar.clone()]);
        let e = tokio::task::spawn_blocking(move || s.locate(&mm, &peers))
            .await
            .expect("join")
            .expect_err("a liar's bytes must not be used");
        assert!(e.contains(&liar.name) && e.contains("sha256"), "{e}");
        assert!(e.contains("copy the file"), "the error names the fix: {e}");
        let left: Vec<_> = std::fs::read_dir(store.dir())
            .expect("dir")
            .flatten()
            .collect();
        assert!(left.is_empty(), "kept {left:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_peer_offering_more_than_the_model_can_be_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path(), Some(dir.path().join("hf")));
        static BIG: [u8; 300 << 20] = [0; 300 << 20];
        let peer = serve(&BIG).await;
        let mut m = model(b"small");
        m.bytes_per_layer = 1;
        let (s, peers) = (store.clone(), vec![peer]);
        let e = tokio::task::spawn_blocking(move || s.locate(&m, &peers))
            .await
            .expect("join")
            .expect_err("refused");
        assert!(e.contains("more than"), "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_partial_download_resumes_where_it_stopped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let file = dir.path().join("served.gguf");
        std::fs::write(&file, &body).expect("write");
        let app = Router::new().route_service(
            "/v1/models/blobs/{sha}",
            tower_http::services::ServeFile::new(&file),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let peer = Peer {
            name: "seed".into(),
            http: addr.to_string(),
        };
        let store = Store::new(&dir.path().join("node"), Some(dir.path().join("hf")));
        let m = model(&body);
        std::fs::create_dir_all(store.dir()).expect("mkdir");
        std::fs::write(
            store.dir().join(format!("{}.partial", m.sha256)),
            &body[..150_000],
        )
        .expect("write partial");
        let (s, mm) = (store.clone(), m.clone());
        let found = tokio::task::spawn_blocking(move || s.locate(&mm, &[peer]))
            .await
            .expect("join")
            .expect("fetched");
        let Found::Fetched { path, bytes, .. } = found else {
            panic!("expected a fetch");
        };
        assert_eq!(bytes, 50_000, "only the missing tail is transferred");
        assert_eq!(std::fs::read(path).expect("read"), body);
    }

    #[test]
    fn a_wrong_copy_in_the_store_is_removed_and_a_right_one_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path(), Some(dir.path().join("hf")));
        let m = model(b"right");
        std::fs::create_dir_all(store.dir()).expect("mkdir");
        let ours = store.dir().join(format!("{}.gguf", m.sha256));
        std::fs::write(&ours, b"wrong").expect("write");
        assert_eq!(store.find(&m), None);
        assert!(!ours.exists(), "the wrong copy stays");
        std::fs::write(&ours, b"right").expect("write");
        assert_eq!(store.find(&m), Some(ours));
    }
}
