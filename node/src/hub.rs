//! `trine model pull`: downloads a model repository from a Hugging
//! Face-compatible hub into a cache laid out like huggingface_hub's (so an
//! existing HF cache is reused, and other tools reuse ours):
//!
//! ```text
//! <cache>/models--<org>--<name>/blobs/<etag>                  file contents
//! <cache>/models--<org>--<name>/snapshots/<commit>/<file>     → ../../blobs/<etag>
//! <cache>/models--<org>--<name>/refs/<revision>               the commit
//! ```
//!
//! The file list comes from `GET <endpoint>/api/models/<repo>/revision/<rev>`
//! (or `--file`); each file's commit, ETag, size and sha256 from a `HEAD` on
//! `<endpoint>/<repo>/resolve/<rev>/<file>` (X-Repo-Commit, X-Linked-Etag /
//! ETag, X-Linked-Size / Content-Length), as huggingface_hub asks; the bytes
//! from `GET <endpoint>/<repo>/resolve/<commit>/<file>`. A download goes to
//! `blobs/<etag>.incomplete` and resumes with a Range request after an
//! interruption (automatically a few times, and on the next run); LFS files
//! are checked against the sha256 the hub lists before they are used.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::Args;
use futures_util::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// Attempts per file within one run before giving up (the partial file
/// stays, and the next run resumes it).
const ATTEMPTS: usize = 4;

#[derive(Debug, Args)]
pub struct PullArgs {
    /// Repository, e.g. microsoft/bitnet-b1.58-2B-4T-gguf.
    pub repo: String,
    /// Only these files (repeatable); all files of the repository when absent.
    #[arg(long = "file", value_name = "FILE")]
    pub files: Vec<String>,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Hub URL [default: $HF_ENDPOINT, else https://huggingface.co].
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// Cache directory [default: $HF_HUB_CACHE, else $HF_HOME/hub, else
    /// ~/.cache/huggingface/hub].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
}

/// One file as the hub describes it.
#[derive(Debug)]
struct FileMeta {
    name: String,
    commit: String,
    /// The blob's name in the cache: the sha256 for LFS files, the git blob
    /// id for the others (huggingface_hub's convention).
    etag: String,
    size: Option<u64>,
    /// Known for LFS files: checked before the file is used.
    sha256: Option<String>,
}

/// File names of a repository at a revision.
async fn list(
    client: &reqwest::Client,
    endpoint: &str,
    repo: &str,
    revision: &str,
) -> anyhow::Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Listing {
        siblings: Vec<Sibling>,
    }
    #[derive(Deserialize)]
    struct Sibling {
        rfilename: String,
    }
    let url = format!("{endpoint}/api/models/{repo}/revision/{revision}");
    let response = client
        .get(&url)
        .send()
        .await
        .with_context(|| format!("cannot reach {endpoint}: check the network or --endpoint"))?;
    check_status(&url, response.status())?;
    let body = response
        .bytes()
        .await
        .context("reading the repository listing")?;
    let listing: Listing = serde_json::from_slice(&body)
        .with_context(|| format!("{url} did not answer a model listing"))?;
    Ok(listing.siblings.into_iter().map(|s| s.rfilename).collect())
}

fn check_status(url: &str, status: reqwest::StatusCode) -> anyhow::Result<()> {
    match status.as_u16() {
        200..=399 => Ok(()),
        401 | 403 => bail!("{url}: {status} — the repository is private or gated: set HF_TOKEN"),
        404 => bail!("{url}: not found — check the repository, the file name and --revision"),
        _ => bail!("{url}: {status}"),
    }
}

/// A header's value without the quotes and weak marker of an ETag.
fn header(h: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    let v = h.get(name)?.to_str().ok()?.trim();
    Some(v.trim_start_matches("W/").trim_matches('"').to_owned()).filter(|v| !v.is_empty())
}

async fn head(
    client: &reqwest::Client,
    endpoint: &str,
    repo: &str,
    revision: &str,
    name: &str,
) -> anyhow::Result<FileMeta> {
    let url = format!("{endpoint}/{repo}/resolve/{revision}/{name}");
    let response = client
        .head(&url)
        .header(reqwest::header::ACCEPT_ENCODING, "identity")
        .send()
        .await
        .with_context(|| format!("cannot reach {endpoint}: check the network or --endpoint"))?;
    check_status(&url, response.status())?;
    let h = response.headers();
    let linked = header(h, "x-linked-etag");
    let etag = linked
        .clone()
        .or_else(|| header(h, "etag"))
        .with_context(|| {
            format!("{url}: the hub sent no ETag, so the file cannot be cached or checked")
        })?;
    if !etag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        bail!("{url}: ETag {etag:?} is not a plain id; refusing to use it as a file name");
    }
    let commit = header(h, "x-repo-commit")
        .with_context(|| format!("{url}: the hub did not say which commit (X-Repo-Commit)"))?;
    if !commit.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{url}: commit {commit:?} is not a hex id");
    }
    let size = header(h, "x-linked-size")
        .or_else(|| {
            linked
                .is_none()
                .then(|| header(h, "content-length"))
                .flatten()
        })
        .and_then(|v| v.parse().ok());
    let sha256 = linked.filter(|e| e.len() == 64 && e.bytes().all(|b| b.is_ascii_hexdigit()));
    Ok(FileMeta {
        name: name.to_owned(),
        commit,
        etag,
        size,
        sha256,
    })
}

pub(crate) fn cache_dir(flag: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(d) = flag {
        return Ok(d.clone());
    }
    if let Some(d) = std::env::var_os("HF_HUB_CACHE") {
        return Ok(d.into());
    }
    if let Some(d) = std::env::var_os("HF_HOME") {
        return Ok(PathBuf::from(d).join("hub"));
    }
    let home = std::env::var_os("HOME").context("no HOME: give --cache-dir")?;
    Ok(PathBuf::from(home).join(".cache/huggingface/hub"))
}

/// Names the hub gives must stay inside the snapshot directory.
fn safe_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && name
            .split('/')
            .all(|part| !part.is_empty() && part != "." && part != "..")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn run(args: &PullArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let snapshot = runtime.block_on(pull(args))?;
    writeln!(std::io::stdout().lock(), "{}", snapshot.display())?;
    Ok(())
}

/// The model to deploy from a hub repository (`trine deploy ORG/NAME`):
/// `file` if given; else the repository's only GGUF file; else (no GGUF)
/// the whole repository as a Hugging Face directory. Pulled into the cache
/// like `trine model pull`; returns the path in the snapshot.
pub fn pull_model(
    repo: &str,
    file: Option<&str>,
    revision: &str,
    endpoint: Option<String>,
) -> anyhow::Result<PathBuf> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let mut args = PullArgs {
            repo: repo.to_owned(),
            files: file.map(|f| vec![f.to_owned()]).unwrap_or_default(),
            revision: revision.to_owned(),
            endpoint,
            cache_dir: None,
        };
        if file.is_none() {
            let client = reqwest::Client::builder()
                .user_agent(concat!("trine/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(Duration::from_secs(20))
                .build()
                .context("cannot build the HTTP client")?;
            let endpoint = endpoint_of(&args);
            let names = list(&client, &endpoint, repo, revision).await?;
            let ggufs: Vec<&String> = names.iter().filter(|n| n.ends_with(".gguf")).collect();
            match ggufs.as_slice() {
                [] => {}
                [one] => args.files = vec![(*one).clone()],
                many => bail!(
                    "{repo} has {} GGUF files ({}); name one with --file",
                    many.len(),
                    many.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        let snapshot = pull(&args).await?;
        Ok(match args.files.as_slice() {
            [one] => snapshot.join(one),
            _ => snapshot,
        })
    })
}

fn endpoint_of(args: &PullArgs) -> String {
    args.endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok())
        .unwrap_or_else(|| "https://huggingface.co".into())
        .trim_end_matches('/')
        .to_owned()
}

async fn pull(args: &PullArgs) -> anyhow::Result<PathBuf> {
    if !args.repo.contains('/') || !safe_relative(&args.repo) || args.repo.matches('/').count() != 1
    {
        bail!(
            "repository {:?} is not <org>/<name>, e.g. microsoft/bitnet-b1.58-2B-4T-gguf",
            args.repo
        );
    }
    let endpoint = endpoint_of(args);
    let endpoint = endpoint.as_str();
    let root =
        cache_dir(&args.cache_dir)?.join(format!("models--{}", args.repo.replace('/', "--")));
    let mut auth = reqwest::header::HeaderMap::new();
    if let Ok(token) = std::env::var("HF_TOKEN") {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("HF_TOKEN is not a valid header value")?;
        auth.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = reqwest::Client::builder()
        .user_agent(concat!("trine/", env!("CARGO_PKG_VERSION")))
        .default_headers(auth.clone())
        .connect_timeout(Duration::from_secs(20))
        .read_timeout(Duration::from_secs(60))
        .build()
        .context("cannot build the HTTP client")?;

    // The file list: the ones asked for, or the repository's listing.
    let names: Vec<String> = if args.files.is_empty() {
        list(&client, endpoint, &args.repo, &args.revision).await?
    } else {
        args.files.clone()
    };
    // Metadata the way huggingface_hub's hf_hub_download asks for it: a HEAD
    // on the resolve URL, redirects not followed (an LFS file answers with a
    // redirect to its storage, carrying X-Linked-Etag = its sha256).
    let no_redirect = reqwest::Client::builder()
        .user_agent(concat!("trine/", env!("CARGO_PKG_VERSION")))
        .default_headers(auth)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(20))
        .timeout(Duration::from_secs(60))
        .build()
        .context("cannot build the HTTP client")?;
    let mut files = Vec::with_capacity(names.len());
    for name in &names {
        if !safe_relative(name) {
            bail!("file name {name:?} would leave the cache; refusing");
        }
        files.push(head(&no_redirect, endpoint, &args.repo, &args.revision, name).await?);
    }
    let commit = files
        .first()
        .map(|f| f.commit.clone())
        .context("the repository has no files")?;
    if let Some(other) = files.iter().find(|f| f.commit != commit) {
        bail!(
            "the hub answered commit {} for {} but {commit} for {}; the branch moved during the pull: run it again",
            other.commit,
            other.name,
            files[0].name
        );
    }
    let snapshot = root.join("snapshots").join(&commit);
    for (i, file) in files.iter().enumerate() {
        let blob = root.join("blobs").join(&file.etag);
        let label = format!("[{}/{}] {}", i + 1, files.len(), file.name);
        if blob.exists() {
            eprintln!("{label}: in the cache");
        } else {
            let url = format!("{endpoint}/{}/resolve/{commit}/{}", args.repo, file.name);
            download(&client, &url, &blob, file, &label).await?;
        }
        link(&snapshot, &file.name, &file.etag)?;
    }
    let refs = root.join("refs");
    std::fs::create_dir_all(&refs).with_context(|| format!("cannot create {}", refs.display()))?;
    if args.revision != commit && safe_relative(&args.revision) {
        let r = refs.join(&args.revision);
        if let Some(parent) = r.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&r, &commit).with_context(|| format!("cannot write {}", r.display()))?;
    }
    eprintln!(
        "{} at {} is in {}",
        args.repo,
        &commit[..7.min(commit.len())],
        snapshot.display()
    );
    Ok(snapshot)
}

/// snapshots/<commit>/<file> → ../../blobs/<etag> (relative, as huggingface_hub makes it).
fn link(snapshot: &Path, rfilename: &str, etag: &str) -> anyhow::Result<()> {
    let path = snapshot.join(rfilename);
    let parent = path.parent().context("file without a directory")?;
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let depth = rfilename.matches('/').count() + 2;
    let target = PathBuf::from("../".repeat(depth)).join("blobs").join(etag);
    match std::fs::symlink_metadata(&path) {
        Ok(_) => std::fs::remove_file(&path)
            .with_context(|| format!("cannot replace {}", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    std::os::unix::fs::symlink(&target, &path)
        .with_context(|| format!("cannot link {}", path.display()))
}

async fn download(
    client: &reqwest::Client,
    url: &str,
    blob: &Path,
    file: &FileMeta,
    label: &str,
) -> anyhow::Result<()> {
    let dir = blob.parent().context("blob without a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let partial = blob.with_extension("incomplete");
    let size = file.size;
    let bar = ProgressBar::new(size.unwrap_or(0));
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(label.to_owned());
    let mut last_error = None;
    for attempt in 1..=ATTEMPTS {
        match fetch(client, url, &partial, size, &bar).await {
            Ok(()) => {
                last_error = None;
                break;
            }
            Err(e) => {
                bar.suspend(|| {
                    eprintln!("{label}: attempt {attempt}/{ATTEMPTS} interrupted: {e:#}; resuming")
                });
                last_error = Some(e);
                tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
            }
        }
    }
    if let Some(e) = last_error {
        bar.abandon();
        bail!(
            "{label}: download failed {ATTEMPTS} times ({e:#}); {} bytes are kept in {} and the next `trine model pull` resumes from there",
            std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0),
            partial.display()
        );
    }
    bar.finish();
    if let Some(want) = &file.sha256 {
        let got =
            sha256_file(&partial).with_context(|| format!("reading back {}", partial.display()))?;
        if !got.eq_ignore_ascii_case(want) {
            let _ = std::fs::remove_file(&partial);
            bail!(
                "{label}: sha256 {got} does not match the hub's {want}; the download was corrupted and has been deleted: run the pull again"
            );
        }
    }
    if let Some(want) = size {
        let got = std::fs::metadata(&partial)?.len();
        if got != want {
            let _ = std::fs::remove_file(&partial);
            bail!("{label}: got {got} bytes, the hub lists {want}; deleted: run the pull again");
        }
    }
    std::fs::rename(&partial, blob)
        .with_context(|| format!("cannot move the download to {}", blob.display()))?;
    eprintln!("{label}: done");
    Ok(())
}

/// Appends the rest of `url` to `partial`, from its current length.
async fn fetch(
    client: &reqwest::Client,
    url: &str,
    partial: &Path,
    size: Option<u64>,
    bar: &ProgressBar,
) -> anyhow::Result<()> {
    let have = std::fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
    if size.is_some_and(|s| have == s) {
        return Ok(());
    }
    let mut request = client.get(url);
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let response = request.send().await.context("request failed")?;
    let status = response.status().as_u16();
    let append = match status {
        206 => true,
        200 => false,
        416 if size == Some(have) => return Ok(()),
        401 | 403 => bail!(
            "{url}: {} — set HF_TOKEN for private or gated repositories",
            response.status()
        ),
        404 => bail!("{url}: not found"),
        _ => bail!("{url}: {}", response.status()),
    };
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(partial)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    let mut written = if append { have } else { 0 };
    bar.set_position(written);
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.context("the connection broke")?;
        if size.is_some_and(|s| written + chunk.len() as u64 > s) {
            bail!(
                "the server sent more than the {} bytes the hub lists",
                size.unwrap_or(0)
            );
        }
        out.write_all(&chunk)
            .with_context(|| format!("cannot write {} (disk full?)", partial.display()))?;
        written += chunk.len() as u64;
        bar.set_position(written);
    }
    out.sync_all()?;
    if let Some(s) = size
        && written < s
    {
        bail!("the body ended after {written} of {s} bytes");
    }
    Ok(())
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher)?;
    Ok(hex(&hasher.finalize()))
}
