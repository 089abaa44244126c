//! `trine deploy` / `trine undeploy`: record a model's spec on the chain.
//! The CLI reads the model here (its shape and its digest), so the cluster
//! sizes stages from real bytes per layer; the leader's planner then
//! places every stage of every replica.

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest as _, Sha256};
use trine_proto::v1;

use crate::cluster_cmd::Target;

#[derive(Debug, Args)]
pub struct DeployArgs {
    #[command(flatten)]
    pub target: Target,
    /// The model: a GGUF file, a Hugging Face directory, or a hub
    /// repository ORG/NAME (pulled into the Hugging Face cache here first,
    /// as `trine model pull` does: --file, else its only GGUF file, else
    /// the whole repository). Nodes find it at the same path, in their
    /// model store or Hugging Face cache by its sha256, or fetch it from a
    /// node that has it.
    pub model: PathBuf,
    /// With a hub repository: the file to deploy.
    #[arg(long)]
    pub file: Option<String>,
    /// With a hub repository: branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// With a hub repository: hub URL [default: $HF_ENDPOINT, else
    /// https://huggingface.co].
    #[arg(long, value_name = "URL")]
    pub endpoint: Option<String>,
    /// The name clients ask for (letters, digits and - _ . : /).
    #[arg(long)]
    pub name: String,
    /// Pipeline stages per replica (1: the whole model on one node).
    #[arg(long, default_value_t = 1)]
    pub stages: u32,
    /// Copies serving at once, spread over regions.
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// Regions allowed to hold replicas (comma-separated); any when absent.
    #[arg(long, value_delimiter = ',')]
    pub regions: Vec<String>,
    /// Where the nodes find the model (a path on them or a hub repository),
    /// when not at the same absolute path as here.
    #[arg(long)]
    pub source: Option<String>,
}

#[derive(Debug, Args)]
pub struct UndeployArgs {
    #[command(flatten)]
    pub target: Target,
    /// The deployed model's name.
    pub name: String,
}

/// A model's shape as placement needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub layers: u32,
    /// The largest block's weight bytes.
    pub bytes_per_layer: u64,
    /// Bytes outside the blocks.
    pub fixed_bytes: u64,
}

/// Sums tensor bytes into blocks (by the layer number after `prefix`) and
/// the rest.
fn shape_of<'a>(tensors: impl Iterator<Item = (&'a str, u64)>, prefix: &str) -> Result<Shape> {
    let mut per_layer: std::collections::BTreeMap<u32, u64> = std::collections::BTreeMap::new();
    let mut fixed = 0u64;
    for (name, bytes) in tensors {
        let layer = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<u32>().ok());
        match layer {
            Some(l) => *per_layer.entry(l).or_default() += bytes,
            None => fixed += bytes,
        }
    }
    let layers = per_layer.len() as u32;
    if layers == 0 || per_layer.keys().next_back() != Some(&(layers - 1)) {
        bail!("its blocks ({prefix}N.*) are missing or not numbered 0..N");
    }
    Ok(Shape {
        layers,
        bytes_per_layer: per_layer.values().copied().max().unwrap_or(0),
        fixed_bytes: fixed,
    })
}

/// The shape of a GGUF file or Hugging Face directory; refuses a model the
/// engine would not load.
pub fn shape(path: &Path) -> Result<Shape> {
    if path.is_dir() {
        let r = trine_engine::inspect::inspect_hf(path)?;
        if let Some(f) = r.findings.first() {
            bail!(
                "{}: {f} (`trine model inspect` lists every finding)",
                path.display()
            );
        }
        shape_of(
            r.tensors.iter().map(|t| (t.1.as_str(), t.4 as u64)),
            "model.layers.",
        )
    } else {
        let r = trine_engine::inspect::inspect(path)?;
        if let Some(f) = r.findings.first() {
            bail!(
                "{}: {f} (`trine model inspect` lists every finding)",
                path.display()
            );
        }
        shape_of(r.tensors.iter().map(|t| (t.name.as_str(), t.size)), "blk.")
    }
    .with_context(|| format!("{} is not a model placement can split", path.display()))
}

/// The model's identity: SHA-256 of a file; for a directory, of every
/// regular file in name order as `name ‖ 0x00 ‖ u64be(len) ‖ bytes`.
pub fn digest(path: &Path, progress: bool) -> Result<String> {
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path).with_context(|| format!("reading {}", path.display()))? {
            let e = e?;
            if e.file_type()?.is_file() {
                files.push(e.path());
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let total: u64 = files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    let bar = if progress {
        ProgressBar::new(total)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("hashing {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in &files {
        let mut file =
            std::fs::File::open(f).with_context(|| format!("opening {}", f.display()))?;
        if path.is_dir() {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
            h.update(name.unwrap_or_default().as_bytes());
            h.update([0]);
            h.update(file.metadata()?.len().to_be_bytes());
        }
        loop {
            let n = file
                .read(&mut buf)
                .with_context(|| format!("reading {}", f.display()))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            bar.inc(n as u64);
        }
    }
    bar.finish_and_clear();
    Ok(trine_control::chain::hex(&h.finalize()))
}

/// `org/name`: one slash, plain parts, not a path that could exist.
fn hub_repo(model: &Path) -> Option<&str> {
    let s = model.to_str()?;
    let (org, name) = s.split_once('/')?;
    let plain = |p: &str| {
        !p.is_empty()
            && p != "."
            && p != ".."
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    (plain(org) && plain(name) && !model.exists()).then_some(s)
}

pub fn deploy(args: &DeployArgs) -> Result<()> {
    let model = match hub_repo(&args.model) {
        Some(repo) => crate::hub::pull_model(
            repo,
            args.file.as_deref(),
            &args.revision,
            args.endpoint.clone(),
        )?,
        None => {
            if args.file.is_some() || args.endpoint.is_some() {
                bail!(
                    "--file and --endpoint go with a hub repository (ORG/NAME); {} is not one",
                    args.model.display()
                );
            }
            args.model.clone()
        }
    };
    let path =
        std::path::absolute(&model).with_context(|| format!("resolving {}", model.display()))?;
    if !path.exists() {
        bail!(
            "{} does not exist; give a GGUF file or a Hugging Face directory (`trine model pull` fetches one)",
            path.display()
        );
    }
    let shape = shape(&path)?;
    let sha256 = digest(&path, true)?;
    let source = args
        .source
        .clone()
        .unwrap_or_else(|| path.display().to_string());
    let req = v1::DeployModelRequest {
        name: args.name.clone(),
        source,
        sha256,
        stages: args.stages,
        replicas: args.replicas,
        regions: args.regions.clone(),
        layers: shape.layers,
        bytes_per_layer: shape.bytes_per_layer,
        fixed_bytes: shape.fixed_bytes,
        ..Default::default()
    };
    let r = args
        .target
        .call(|mut a| async move { a.deploy_model(req).await })?;
    writeln!(
        std::io::stdout().lock(),
        "deployed {} (sha256 {}, {} layers of {:.1} MiB, {} stage(s) × {} replica(s)) in block {}; `trine placement --model {}` shows where it runs",
        args.name,
        r.sha256,
        shape.layers,
        shape.bytes_per_layer as f64 / f64::from(1 << 20),
        args.stages,
        args.replicas,
        r.log_index,
        args.name
    )?;
    Ok(())
}

pub fn undeploy(args: &UndeployArgs) -> Result<()> {
    let req = v1::UndeployModelRequest {
        name: args.name.clone(),
        ..Default::default()
    };
    let r = args
        .target
        .call(|mut a| async move { a.undeploy_model(req).await })?;
    writeln!(
        std::io::stdout().lock(),
        "undeployed {} in block {}",
        args.name,
        r.log_index
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_count_blocks_and_the_rest() {
        let t = [
            ("token_embd.weight", 100),
            ("blk.0.attn_q.weight", 10),
            ("blk.0.ffn_up.weight", 5),
            ("blk.1.attn_q.weight", 10),
            ("blk.1.ffn_up.weight", 6),
            ("output_norm.weight", 1),
        ];
        let s = shape_of(t.iter().map(|(n, b)| (*n, *b)), "blk.").expect("shape");
        assert_eq!(
            s,
            Shape {
                layers: 2,
                bytes_per_layer: 16,
                fixed_bytes: 101
            }
        );
        let gap = [("blk.0.a", 1), ("blk.2.a", 1)];
        assert!(shape_of(gap.iter().map(|(n, b)| (*n, *b)), "blk.").is_err());
        assert_eq!(
            hub_repo(Path::new("microsoft/bitnet-b1.58-2B-4T-gguf")),
            Some("microsoft/bitnet-b1.58-2B-4T-gguf")
        );
        for not in ["/abs/x", "a/b/c", "./x", "x", "../x", "a b/c"] {
            assert_eq!(hub_repo(Path::new(not)), None, "{not}");
        }
        let none = [("token_embd.weight", 1)];
        assert!(shape_of(none.iter().map(|(n, b)| (*n, *b)), "blk.").is_err());
    }

    #[test]
    fn directory_digest_covers_names_and_contents() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::write(d.path().join("a"), b"xy").expect("write");
        std::fs::write(d.path().join("b"), b"z").expect("write");
        let one = digest(d.path(), false).expect("digest");
        std::fs::rename(d.path().join("b"), d.path().join("c")).expect("rename");
        assert_ne!(
            digest(d.path(), false).expect("digest"),
            one,
            "a rename must change it"
        );
        let f = d.path().join("a");
        assert_eq!(
            digest(&f, false).expect("digest"),
            trine_control::chain::hex(&Sha256::digest(b"xy"))
        );
    }
}
