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
//! The file list, commit and checksums come from
//! `GET <endpoint>/api/models/<repo>/revision/<rev>?blobs=true`; files from
//! `GET <endpoint>/<repo>/resolve/<commit>/<file>`. A download goes to
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

#[derive(Debug, Deserialize)]
struct RepoInfo {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(Debug, Deserialize)]
struct Sibling {
    rfilename: String,
    size: Option<u64>,
    #[serde(rename = "blobId")]
    blob_id: Option<String>,
    lfs: Option<Lfs>,
}

#[derive(Debug, Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

fn cache_dir(flag: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
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

async fn pull(args: &PullArgs) -> anyhow::Result<PathBuf> {
    if !args.repo.contains('/') || !safe_relative(&args.repo) || args.repo.matches('/').count() != 1
    {
        bail!(
            "repository {:?} is not <org>/<name>, e.g. microsoft/bitnet-b1.58-2B-4T-gguf",
            args.repo
        );
    }
    let endpoint = args
        .endpoint
        .clone()
        .or_else(|| std::env::var("HF_ENDPOINT").ok())
        .unwrap_or_else(|| "https://huggingface.co".into());
    let endpoint = endpoint.trim_end_matches('/');
    let root =
        cache_dir(&args.cache_dir)?.join(format!("models--{}", args.repo.replace('/', "--")));
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(token) = std::env::var("HF_TOKEN") {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("HF_TOKEN is not a valid header value")?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let client = reqwest::Client::builder()
        .user_agent(concat!("trine/", env!("CARGO_PKG_VERSION")))
        .default_headers(headers)
        .connect_timeout(Duration::from_secs(20))
        .read_timeout(Duration::from_secs(60))
        .build()
        .context("cannot build the HTTP client")?;

    let info_url = format!(
        "{endpoint}/api/models/{}/revision/{}?blobs=true",
        args.repo, args.revision
    );
    let response = client
        .get(&info_url)
        .send()
        .await
        .with_context(|| format!("cannot reach {endpoint}: check the network or --endpoint"))?;
    match response.status().as_u16() {
        200 => {}
        401 | 403 => bail!(
            "{info_url}: {} — the repository is private or gated: set HF_TOKEN",
            response.status()
        ),
        404 => bail!("{info_url}: not found — check the repository name and --revision"),
        _ => bail!("{info_url}: {}", response.status()),
    }
    let body = response
        .bytes()
        .await
        .context("reading the repository listing")?;
    let info: RepoInfo = serde_json::from_slice(&body)
        .with_context(|| format!("{info_url} did not answer a model listing"))?;
    if info.sha.len() < 7 || !info.sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{info_url} gave commit {:?}, not a hex id", info.sha);
    }
    let wanted: Vec<&Sibling> = if args.files.is_empty() {
        info.siblings.iter().collect()
    } else {
        args.files
            .iter()
            .map(|f| {
                info.siblings
                    .iter()
                    .find(|s| &s.rfilename == f)
                    .with_context(|| {
                        format!(
                            "{} has no file {f:?} at {}; files: {}",
                            args.repo,
                            args.revision,
                            info.siblings
                                .iter()
                                .map(|s| s.rfilename.as_str())
                                .collect::<Vec<_>>()
                                .join(", ")
                        )
                    })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let snapshot = root.join("snapshots").join(&info.sha);
    for (i, file) in wanted.iter().enumerate() {
        if !safe_relative(&file.rfilename) {
            bail!(
                "the hub listed a file named {:?}, which would leave the cache; refusing",
                file.rfilename
            );
        }
        let etag = match (&file.lfs, &file.blob_id) {
            (Some(lfs), _) => lfs.sha256.clone(),
            (None, Some(id)) => id.clone(),
            (None, None) => bail!("the hub gave no checksum or blob id for {}", file.rfilename),
        };
        if etag.is_empty() || !etag.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!(
                "the hub gave {:?} as the id of {}, not a hex id",
                etag,
                file.rfilename
            );
        }
        let blob = root.join("blobs").join(&etag);
        let label = format!("[{}/{}] {}", i + 1, wanted.len(), file.rfilename);
        if blob.exists() {
            eprintln!("{label}: in the cache");
        } else {
            let url = format!(
                "{endpoint}/{}/resolve/{}/{}",
                args.repo, info.sha, file.rfilename
            );
            download(&client, &url, &blob, file, &label).await?;
        }
        link(&snapshot, &file.rfilename, &etag)?;
    }
    let refs = root.join("refs");
    std::fs::create_dir_all(&refs).with_context(|| format!("cannot create {}", refs.display()))?;
    if args.revision != info.sha && safe_relative(&args.revision) {
        let r = refs.join(&args.revision);
        if let Some(parent) = r.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&r, &info.sha).with_context(|| format!("cannot write {}", r.display()))?;
    }
    eprintln!(
        "{} at {} is in {}",
        args.repo,
        &info.sha[..7.min(info.sha.len())],
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
    file: &Sibling,
    label: &str,
) -> anyhow::Result<()> {
    let dir = blob.parent().context("blob without a directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let partial = blob.with_extension("incomplete");
    let size = file.lfs.as_ref().map(|l| l.size).or(file.size);
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
    if let Some(lfs) = &file.lfs {
        let got =
            sha256_file(&partial).with_context(|| format!("reading back {}", partial.display()))?;
        if !got.eq_ignore_ascii_case(&lfs.sha256) {
            let _ = std::fs::remove_file(&partial);
            bail!(
                "{label}: sha256 {got} does not match the hub's {}; the download was corrupted and has been deleted: run the pull again",
                lfs.sha256
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
