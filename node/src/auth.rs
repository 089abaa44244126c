//! Bearer tokens: checking one against the cluster's token table (the
//! client API and the Admin API share the rules), and the first admin
//! token a new cluster is initialised with.
//!
//! The cluster stores only the SHA-256 of each secret (in the Raft state,
//! on the chain); a token has a scope (`inference`, or `admin`, which also
//! allows inference) and may expire. Secrets on disk (the bootstrap token
//! file) are treated like private keys: written 0600 and refused when group
//! or others can read them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use trine_control::{Command, ControlPlane, Scope, TokenRecord};

/// Where `--init` keeps the first admin token's secret, in the data dir.
pub const ADMIN_TOKEN_FILE: &str = "admin.token";
/// Present while the first admin token is not on the chain yet.
const BOOTSTRAP_PENDING: &str = "admin.token.pending";
/// The first admin token's name.
pub const ROOT_TOKEN: &str = "root";
pub use trine_control::authz::{MAX_SECRET_BYTES, Refusal, check};

/// The secret in an `authorization` value (`Bearer <secret>`).
pub fn bearer(authorization: Option<&str>) -> Option<&str> {
    authorization
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
                .map(str::trim)
        })
        .filter(|s| !s.is_empty())
}

pub fn now_ms() -> u64 {
    trine_control::clock::now_ms()
}

/// Errors reading or writing a secret file.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    File(#[from] trine_control::tls::Error),
    #[error(
        "{path} does not hold a token secret (one line of at most {MAX_SECRET_BYTES} printable characters); write one with `trine token secret --out {path}`"
    )]
    Content { path: String },
}

/// Reads a secret from `path`: one line, in a file only its owner can read.
pub fn read_secret(path: &Path) -> Result<String, FileError> {
    let content = || FileError::Content {
        path: path.display().to_string(),
    };
    // Bounded before reading: the path is the operator's, the bytes need
    // not be.
    if std::fs::metadata(path).is_ok_and(|m| m.len() > MAX_SECRET_BYTES as u64 + 2) {
        return Err(content());
    }
    let fix = format!(
        "make one with `trine token secret --out {}`, or point --admin-token-file (TRINE_ADMIN_TOKEN_FILE) at the right file",
        path.display()
    );
    let text = trine_control::tls::read_private(path, "token file", &fix)?;
    let secret = text.trim();
    if secret.is_empty()
        || secret.len() > MAX_SECRET_BYTES
        || !secret.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(content());
    }
    Ok(secret.to_owned())
}

/// Writes `secret` to a new file at `path`, 0600; refuses to overwrite.
pub fn write_secret(path: &Path, secret: &str) -> Result<(), FileError> {
    Ok(trine_control::tls::write_private(
        path,
        format!("{secret}\n").as_bytes(),
    )?)
}

/// The secret of a new cluster's first admin token: the one in `file`,
/// else `TRINE_ADMIN_TOKEN`'s, else a new random one.
pub fn initial_secret(file: Option<&Path>) -> anyhow::Result<String> {
    Ok(match file {
        Some(f) => read_secret(f)?,
        None => match std::env::var("TRINE_ADMIN_TOKEN") {
            Ok(s) if !s.trim().is_empty() => s.trim().to_owned(),
            _ => crate::token_cmd::new_secret()?,
        },
    })
}

/// The marker that says a new cluster's first admin token is not on the
/// chain yet.
pub fn pending_marker(data_dir: &Path) -> PathBuf {
    data_dir.join(BOOTSTRAP_PENDING)
}

/// The secret a cluster's first admin token gets (on `--init` of a new
/// cluster, or of an existing one whose data dir has no admin.token: a
/// cluster from before admin tokens, or one whose admin tokens were all
/// lost): from `file`, else `TRINE_ADMIN_TOKEN`, else a new random one. It
/// is kept in the data dir's `admin.token` (0600) for the CLI's
/// `--data-dir`, and a marker says it still has to be put on the chain;
/// [`record_root`] does that.
pub fn prepare_root(data_dir: &Path, file: Option<&Path>) -> anyhow::Result<PathBuf> {
    let kept = data_dir.join(ADMIN_TOKEN_FILE);
    let secret = initial_secret(file)?;
    if kept.exists() {
        std::fs::remove_file(&kept)
            .map_err(|e| anyhow::anyhow!("replacing {}: {e}", kept.display()))?;
    }
    write_secret(&kept, &secret)?;
    std::fs::write(data_dir.join(BOOTSTRAP_PENDING), b"")
        .map_err(|e| anyhow::anyhow!("{}: {e}", data_dir.display()))?;
    Ok(kept)
}

/// Puts the first admin token on the chain if [`prepare_root`] left it
/// pending (retrying until it is committed), then clears the marker. The
/// state machine adds it only while the cluster has no admin token that has
/// not expired, so a restart with `--init` never brings a revoked root back.
pub async fn record_root(control: ControlPlane, data_dir: PathBuf) {
    let marker = pending_marker(&data_dir);
    if !marker.exists() {
        return;
    }
    let secret = match read_secret(&data_dir.join(ADMIN_TOKEN_FILE)) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot record the first admin token");
            return;
        }
    };
    let sha256 = crate::token_cmd::secret_hash(&secret);
    let mut backoff = Duration::from_millis(100);
    loop {
        if control.reader().state().token_by_hash(&sha256).is_some() {
            break;
        }
        let record = TokenRecord::new(ROOT_TOKEN, sha256.clone(), Scope::Admin);
        match control
            .propose(
                &control.principal(),
                Command::BootstrapToken(Box::new(record)),
            )
            .await
        {
            Ok(r) if r.rejected.is_none() => break,
            Ok(r) => {
                tracing::warn!(
                    reason = r.rejected.as_deref().unwrap_or_default(),
                    "the first admin token was not added (the cluster has one already: use it, or ask its holder for one)"
                );
                let _ = std::fs::remove_file(&marker);
                return;
            }
            Err(e) => tracing::debug!(error = %e, "first admin token not recorded yet"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
    let _ = std::fs::remove_file(&marker);
    tracing::info!(
        file = %data_dir.join(ADMIN_TOKEN_FILE).display(),
        "the first admin token ({ROOT_TOKEN}) is recorded; its secret is in this file (0600): the CLI reads it with --data-dir or --admin-token-file"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_files_must_be_private_and_hold_one_secret() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("t");
        write_secret(&p, "trn_x").expect("write");
        assert_eq!(read_secret(&p).expect("read"), "trn_x");
        assert!(write_secret(&p, "trn_y").is_err(), "overwrote");
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert!(matches!(
            read_secret(&p),
            Err(FileError::File(trine_control::tls::Error::KeyMode { .. }))
        ));
        let missing = read_secret(&d.path().join("none")).expect_err("missing");
        assert!(
            missing.to_string().contains("trine token secret"),
            "{missing}"
        );
        let q = d.path().join("q");
        write_secret(&q, "two words").expect("write");
        assert!(matches!(read_secret(&q), Err(FileError::Content { .. })));
    }
}
