//! `trine model pull` against a real HTTP server on loopback that serves a
//! Hugging Face hub's URL layout (listing API and resolve URLs with Range
//! support), with faults injected: connections cut mid-file (resumed with
//! Range requests, within a run and on the next run), a corrupted body
//! (refused by its sha256), and a second pull served from the cache. And
//! `trine deploy ORG/NAME`: pulled here, then found by a node in its own
//! Hugging Face cache by sha256 (the recorded path existing nowhere).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};
use trine_tests::{Node, chain_note, cli_json, error_lines, run, trine, wait_for};

const REPO: &str = "trine-test/tiny-hf";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const T: Duration = Duration::from_secs(120);

#[derive(Default)]
struct Hub {
    files: HashMap<String, Vec<u8>>,
    /// Requests for model.safetensors to cut after half of what they send.
    cut: AtomicUsize,
    corrupt: AtomicBool,
    /// (file, Range header) of every file request.
    log: Mutex<Vec<(String, Option<String>)>>,
}

/// Files the fake hub stores in LFS (named by their sha256 in the cache).
fn lfs(name: &str) -> bool {
    name.ends_with(".safetensors") || name.ends_with(".gguf")
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn listing(
    State(hub): State<Arc<Hub>>,
    UrlPath((org, name, _rev)): UrlPath<(String, String, String)>,
) -> Response {
    if format!("{org}/{name}") != REPO {
        return StatusCode::NOT_FOUND.into_response();
    }
    let mut names: Vec<&String> = hub.files.keys().collect();
    names.sort();
    let siblings: Vec<serde_json::Value> = names
        .into_iter()
        .map(|n| {
            let data = &hub.files[n];
            if lfs(n) {
                serde_json::json!({"rfilename": n, "size": data.len(), "blobId": &sha256(data)[..40],
                    "lfs": {"sha256": sha256(data), "size": data.len(), "pointerSize": 134}})
            } else {
                serde_json::json!({"rfilename": n, "size": data.len(), "blobId": &sha256(data)[..40]})
            }
        })
        .collect();
    let body = serde_json::json!({"id": REPO, "sha": COMMIT, "siblings": siblings}).to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    UrlPath((org, name, commit, file)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    hub.log
        .lock()
        .map(|mut l| l.push((file.clone(), range.clone())))
        .ok();
    let Some(data) = hub
        .files
        .get(&file)
        .filter(|_| format!("{org}/{name}") == REPO && commit == COMMIT)
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut data = data.clone();
    if file.ends_with(".safetensors") && hub.corrupt.load(Ordering::SeqCst) {
        let mid = data.len() / 2;
        data[mid] ^= 0x01;
    }
    let start: usize = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse().ok())
        .unwrap_or(0);
    if start > data.len() {
        return StatusCode::RANGE_NOT_SATISFIABLE.into_response();
    }
    let rest = data[start..].to_vec();
    let status = if start > 0 {
        StatusCode::PARTIAL_CONTENT
    } else {
        StatusCode::OK
    };
    let len = rest.len();
    let cut = file.ends_with(".safetensors")
        && hub
            .cut
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    let body = if cut {
        let half = rest[..len / 2].to_vec();
        // Half the bytes, sent and flushed, then the connection breaks.
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(half)]);
        let cut = futures_util::stream::once(async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err(std::io::Error::other("cut by the test"))
        });
        Body::from_stream(first.chain(cut))
    } else {
        Body::from(rest)
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, len.into());
    if start > 0 {
        let total = data.len();
        if let Ok(v) = format!("bytes {start}-{}/{total}", total - 1).parse() {
            response.headers_mut().insert(header::CONTENT_RANGE, v);
        }
    }
    response
}

/// What huggingface_hub's HEAD sees: for an LFS file a redirect carrying
/// X-Linked-Etag (its sha256) and X-Linked-Size; for others a 200 with the
/// git blob id as ETag; X-Repo-Commit on both.
async fn head(
    State(hub): State<Arc<Hub>>,
    UrlPath((org, name, rev, file)): UrlPath<(String, String, String, String)>,
) -> Response {
    let Some(data) = hub
        .files
        .get(&file)
        .filter(|_| format!("{org}/{name}") == REPO && (rev == "main" || rev == COMMIT))
    else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let mut response = Response::new(Body::empty());
    let h = response.headers_mut();
    let set = |h: &mut HeaderMap, k: &'static str, v: String| {
        if let Ok(v) = v.parse() {
            h.insert(k, v);
        }
    };
    set(h, "x-repo-commit", COMMIT.to_owned());
    if lfs(&file) {
        set(h, "x-linked-etag", format!("\"{}\"", sha256(data)));
        set(h, "x-linked-size", data.len().to_string());
        set(h, "location", format!("/{REPO}/resolve/{COMMIT}/{file}"));
        *response.status_mut() = StatusCode::FOUND;
    } else {
        set(h, "etag", format!("\"{}\"", &sha256(data)[..40]));
        set(h, "content-length", data.len().to_string());
    }
    response
}

async fn serve(hub: Arc<Hub>) -> Result<SocketAddr> {
    let app = Router::new()
        .route("/api/models/{org}/{name}/revision/{rev}", get(listing))
        .route(
            "/{org}/{name}/resolve/{commit}/{*file}",
            get(resolve).head(head),
        )
        .with_state(hub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

/// A synthetic Hugging Face directory's files.
fn model_files() -> Result<HashMap<String, Vec<u8>>> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("m");
    let mut cmd = trine();
    cmd.args(["model", "synth", "--format", "hf", "--seed", "9", "--out"])
        .arg(&dir);
    ensure!(run(cmd, T)?.status.success(), "synth failed");
    let mut files = HashMap::new();
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        files.insert(name.to_owned(), std::fs::read(dir.join(name))?);
    }
    Ok(files)
}

async fn pull(addr: SocketAddr, cache: &Path) -> Result<std::process::Output> {
    let mut cmd = trine();
    cmd.args([
        "model",
        "pull",
        REPO,
        "--endpoint",
        &format!("http://{addr}"),
        "--cache-dir",
    ])
    .arg(cache);
    tokio::task::spawn_blocking(move || run(cmd, T)).await?
}

fn requests(hub: &Hub) -> Vec<(String, Option<String>)> {
    hub.log
        .lock()
        .map(|mut l| std::mem::take(&mut *l))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_resumes_verifies_and_reuses_the_cache() -> Result<()> {
    let files = model_files()?;
    let hub = Arc::new(Hub {
        files: files.clone(),
        cut: AtomicUsize::new(2),
        ..Hub::default()
    });
    let addr = serve(hub.clone()).await?;
    let cache = tempfile::tempdir()?;

    // Two cuts: the pull resumes by itself and succeeds in one run.
    let out = pull(addr, cache.path()).await?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.success(), "{stderr}");
    ensure!(stderr.contains("interrupted"), "{stderr}");
    let snapshot = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    let root = cache.path().join("models--trine-test--tiny-hf");
    ensure!(
        snapshot == root.join("snapshots").join(COMMIT),
        "{}",
        snapshot.display()
    );
    let log = requests(&hub);
    let ranges: Vec<&Option<String>> = log
        .iter()
        .filter(|(f, _)| f == "model.safetensors")
        .map(|(_, r)| r)
        .collect();
    ensure!(ranges.len() == 3 && ranges[0].is_none(), "{log:?}");
    ensure!(
        ranges[1]
            .as_deref()
            .is_some_and(|r| r.starts_with("bytes=") && r != "bytes=0-"),
        "{log:?}"
    );
    for (name, data) in &files {
        let link = snapshot.join(name);
        ensure!(
            std::fs::symlink_metadata(&link)?.file_type().is_symlink(),
            "{name} is not a link"
        );
        ensure!(&std::fs::read(&link)? == data, "{name} differs");
    }
    ensure!(std::fs::read_to_string(root.join("refs/main"))? == COMMIT);
    // The snapshot is a model directory.
    let mut cmd = trine();
    cmd.args(["generate", "-n", "4", "--model"])
        .arg(&snapshot)
        .arg("Hello");
    let out = run(cmd, T)?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Again: everything comes from the cache.
    let out = pull(addr, cache.path()).await?;
    ensure!(out.status.success());
    ensure!(requests(&hub).is_empty(), "files were downloaded again");
    ensure!(String::from_utf8_lossy(&out.stderr).contains("in the cache"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_download_is_refused_and_deleted() -> Result<()> {
    let hub = Arc::new(Hub {
        files: model_files()?,
        corrupt: AtomicBool::new(true),
        ..Hub::default()
    });
    let addr = serve(hub.clone()).await?;
    let cache = tempfile::tempdir()?;
    let out = pull(addr, cache.path()).await?;
    let errors = error_lines(&out.stderr);
    ensure!(out.status.code() == Some(1), "{:?}", out.status);
    ensure!(
        errors.len() == 1 && errors[0].contains("sha256") && errors[0].contains("corrupted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let blobs = cache.path().join("models--trine-test--tiny-hf/blobs");
    let names: Vec<String> = std::fs::read_dir(&blobs)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    let model_sha = sha256(&hub.files["model.safetensors"]);
    ensure!(
        !names.iter().any(|n| n.starts_with(&model_sha)),
        "corrupt data kept: {names:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_run_is_resumed_by_the_next() -> Result<()> {
    let hub = Arc::new(Hub {
        files: model_files()?,
        cut: AtomicUsize::new(100),
        ..Hub::default()
    });
    let addr = serve(hub.clone()).await?;
    let cache = tempfile::tempdir()?;
    let out = pull(addr, cache.path()).await?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(out.status.code() == Some(1), "{stderr}");
    ensure!(
        error_lines(&out.stderr)
            .iter()
            .any(|l| l.contains("resumes")),
        "{stderr}"
    );
    let model_sha = sha256(&hub.files["model.safetensors"]);
    let partial = cache.path().join(format!(
        "models--trine-test--tiny-hf/blobs/{model_sha}.incomplete"
    ));
    let kept = std::fs::metadata(&partial)
        .context("no partial file kept")?
        .len();
    ensure!(kept > 0);
    requests(&hub);
    hub.cut.store(0, Ordering::SeqCst);
    let out = pull(addr, cache.path()).await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = requests(&hub);
    let want = format!("bytes={kept}-");
    ensure!(
        log.iter()
            .any(|(f, r)| f == "model.safetensors" && r.as_deref() == Some(want.as_str())),
        "no resume from {kept}: {log:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_files_only_and_unknown_ones_refused() -> Result<()> {
    let hub = Arc::new(Hub {
        files: model_files()?,
        ..Hub::default()
    });
    let addr = serve(hub.clone()).await?;
    let cache = tempfile::tempdir()?;
    let endpoint = format!("http://{addr}");
    let pull_files = |files: &[&str]| {
        let mut cmd = trine();
        cmd.args([
            "model",
            "pull",
            REPO,
            "--endpoint",
            &endpoint,
            "--cache-dir",
        ])
        .arg(cache.path());
        for f in files {
            cmd.args(["--file", f]);
        }
        cmd
    };
    let cmd = pull_files(&["config.json", "tokenizer.json"]);
    let out = tokio::task::spawn_blocking(move || run(cmd, T)).await??;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snapshot = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    let mut names: Vec<String> = std::fs::read_dir(&snapshot)?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    names.sort();
    ensure!(names == ["config.json", "tokenizer.json"], "{names:?}");
    ensure!(requests(&hub).iter().all(|(f, _)| f != "model.safetensors"));

    let cmd = pull_files(&["weights.gguf"]);
    let out = tokio::task::spawn_blocking(move || run(cmd, T)).await??;
    let errors = error_lines(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && errors.len() == 1 && errors[0].contains("not found"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_from_a_hub_repository_and_a_node_finds_it_in_its_cache() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let gguf = trine_tests::synth_tiny(tmp.path())?;
    let bytes = std::fs::read(&gguf)?;
    let mut files = HashMap::new();
    files.insert("tiny.gguf".to_owned(), bytes.clone());
    files.insert("README.md".to_owned(), b"a tiny model".to_vec());
    let addr = serve(Arc::new(Hub {
        files: files.clone(),
        ..Hub::default()
    }))
    .await?;
    let cache = tmp.path().join("hf");
    let raft = trine_tests::free_addr()?;
    let cache_arg = cache.display().to_string();
    let node = Node::start(&["--init", "--raft-addr", &raft, "--model-cache", &cache_arg]).await?;
    let grpc = node.endpoints.grpc.to_string();
    wait_for("a leader", Duration::from_secs(20), || async {
        chain_note(&grpc, "ready").ok()
    })
    .await?;

    let deploy = |extra: &[&str]| {
        let mut cmd = trine();
        cmd.env("HF_HUB_CACHE", &cache)
            .args(["deploy", REPO, "--node", &grpc, "--name", "tiny"])
            .args(["--endpoint", &format!("http://{addr}")])
            .args(extra);
        run(cmd, T)
    };
    // The recorded source exists nowhere: the node must use its cache.
    let out = deploy(&["--source", "/nonexistent/tiny.gguf"])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(stdout.contains(&sha256(&bytes)), "{stdout}");
    let blob = cache
        .join("models--trine-test--tiny-hf/blobs")
        .join(sha256(&bytes));
    ensure!(
        std::fs::read(&blob)? == bytes,
        "the pull did not fill the cache"
    );
    ensure!(
        !cache
            .join("models--trine-test--tiny-hf/snapshots")
            .join(COMMIT)
            .join("README.md")
            .exists(),
        "only the model file is pulled"
    );
    let slot = wait_for("the stage ready", Duration::from_secs(60), || async {
        cli_json::<serde_json::Value>(&["placement", "--node", &grpc, "-o", "json"])
            .ok()?
            .into_iter()
            .find(|s| s["state"] == "ready")
    })
    .await?;
    let detail = slot["detail"].as_str().unwrap_or_default();
    ensure!(
        detail.contains(&blob.display().to_string()),
        "not loaded from the cache's blob: {slot}"
    );

    // A repository with two GGUF files needs --file.
    let mut two = files;
    two.insert("other.gguf".to_owned(), b"GGUF".to_vec());
    let addr2 = serve(Arc::new(Hub {
        files: two,
        ..Hub::default()
    }))
    .await?;
    let mut cmd = trine();
    cmd.env("HF_HUB_CACHE", tmp.path().join("hf2"))
        .args(["deploy", REPO, "--node", &grpc, "--name", "again"])
        .args(["--endpoint", &format!("http://{addr2}")]);
    let out = run(cmd, T)?;
    let errors = error_lines(&out.stderr).join("\n");
    ensure!(
        !out.status.success() && errors.contains("--file") && errors.contains("other.gguf"),
        "{errors}"
    );
    drop(node);
    Ok(())
}
