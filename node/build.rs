//! Embeds the git commit of the build as `TRINE_GIT_SHA` (overridable by the
//! environment variable of the same name, e.g. in image builds without .git).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
}

fn main() {
    println!("cargo:rerun-if-env-changed=TRINE_GIT_SHA");
    let sha = std::env::var("TRINE_GIT_SHA")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=TRINE_GIT_SHA={sha}");
    // Rebuild when HEAD moves: HEAD itself (branch switch) and the ref it
    // points at (new commit). Only existing files, or cargo reruns always.
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let head = std::path::Path::new(&git_dir).join("HEAD");
        if head.exists() {
            println!("cargo:rerun-if-changed={}", head.display());
        }
        if let Some(reference) = git(&["symbolic-ref", "-q", "HEAD"]) {
            let path = std::path::Path::new(&git_dir).join(reference);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
        // A first commit or a new branch creates a ref file that did not
        // exist at the last build: watch the directory that will hold it.
        for extra in ["packed-refs", "refs/heads"] {
            let path = std::path::Path::new(&git_dir).join(extra);
            if path.exists() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
