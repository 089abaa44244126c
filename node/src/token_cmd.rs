//! `trine token create|list|revoke`: API tokens for the client API. The
//! secret is generated here from the OS's random source and shown once;
//! the cluster records only its SHA-256 (on the chain, like every change).

use std::io::Write as _;

use anyhow::{Context as _, Result};
use clap::Subcommand;
use rand::TryRngCore as _;
use trine_proto::v1;

use crate::cluster_cmd::{Output, Target};

/// Prefix of every secret (lets secret scanners and people recognise one).
pub const SECRET_PREFIX: &str = "trn_";

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; prints its secret once (the cluster keeps only the
    /// SHA-256 of it). Clients send it as `Authorization: Bearer <secret>`.
    Create {
        #[command(flatten)]
        target: Target,
        /// A name for the token (who or what uses it): 1-128 characters of
        /// letters, digits and - _ . : /
        name: String,
        /// Requests per minute it may make; 0 means no limit.
        #[arg(long, default_value_t = 0)]
        requests_per_minute: u32,
        /// Generated tokens per minute it may use; 0 means no limit.
        #[arg(long, default_value_t = 0)]
        tokens_per_minute: u32,
        /// Requests it may have running at once; 0 means no limit.
        #[arg(long, default_value_t = 0)]
        concurrency: u32,
        /// What it may do: `inference` (the client API) or `admin`
        /// (everything: the Admin API and this command included).
        #[arg(long, default_value = "inference", value_name = "inference|admin")]
        scope: trine_control::Scope,
        /// Refuse it after this long (e.g. 90d, 12h); without it the token
        /// works until revoked.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// Write a new random secret to a file (0600), without asking any node:
    /// for `trine node --init --admin-token-file FILE`, which makes it the
    /// cluster's first admin token. Prints nothing secret.
    Secret {
        /// The file to create; an existing one is not overwritten.
        #[arg(long, value_name = "FILE")]
        out: std::path::PathBuf,
    },
    /// List tokens: name, limits, creation time and the secret's SHA-256.
    List {
        #[command(flatten)]
        target: Target,
        /// Read through the leader (read index) instead of the node's replica.
        #[arg(long)]
        linearizable: bool,
        #[arg(long, short, value_enum, default_value_t)]
        output: Output,
    },
    /// Revoke a token by name; requests that present it are refused from
    /// the moment each node applies the block.
    Revoke {
        #[command(flatten)]
        target: Target,
        name: String,
    },
}

/// SHA-256 of a bearer secret, as the state machine stores it.
pub use trine_control::authz::secret_hash;

/// A new secret: the prefix and 32 random bytes from the OS, in hex.
pub fn new_secret() -> Result<String> {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .context("reading the operating system's random source")?;
    Ok(format!(
        "{SECRET_PREFIX}{}",
        trine_control::chain::hex(&bytes)
    ))
}

fn scope_name(s: i32) -> &'static str {
    trine_control::Scope::from_wire(s).map_or("unknown", trine_control::Scope::as_str)
}

pub fn run(command: &TokenCommand) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        TokenCommand::Create {
            target,
            name,
            requests_per_minute,
            tokens_per_minute,
            concurrency,
            scope,
            ttl,
        } => {
            let ttl_seconds = match ttl {
                Some(t) if t.as_secs() == 0 => {
                    anyhow::bail!(
                        "--ttl must be at least one second (omit it for a token that does not expire)"
                    )
                }
                Some(t) => t.as_secs(),
                None => 0,
            };
            let secret = new_secret()?;
            let req = v1::CreateTokenRequest {
                name: name.clone(),
                sha256: secret_hash(&secret),
                requests_per_minute: *requests_per_minute,
                tokens_per_minute: *tokens_per_minute,
                concurrency: *concurrency,
                scope: v1::TokenScope::from(*scope).into(),
                ttl_seconds,
                ..Default::default()
            };
            let r = target.call(|mut a| async move { a.create_token(req).await })?;
            writeln!(out, "{secret}")?;
            drop(out);
            let mut err = std::io::stderr().lock();
            writeln!(
                err,
                "token {name} recorded in block {}; the secret above is shown only now: store it (the cluster keeps only its SHA-256)",
                r.height
            )?;
        }
        TokenCommand::List {
            target,
            linearizable,
            output,
        } => {
            let req = v1::ListTokensRequest {
                consistency: crate::cluster_cmd::consistency(*linearizable),
                ..Default::default()
            };
            let r = target.call(|mut a| async move { a.list_tokens(req).await })?;
            match output {
                Output::Table => {
                    writeln!(out, "as of index {}", r.as_of_index)?;
                    writeln!(
                        out,
                        "{:<24} {:<9} {:>9} {:>11} {:>11}  {:<24}  {:<24}  SHA256",
                        "NAME",
                        "SCOPE",
                        "REQ/MIN",
                        "TOKENS/MIN",
                        "CONCURRENCY",
                        "CREATED",
                        "EXPIRES"
                    )?;
                    for t in &r.tokens {
                        let limit = |n: u32| {
                            if n == 0 {
                                "-".to_owned()
                            } else {
                                n.to_string()
                            }
                        };
                        writeln!(
                            out,
                            "{:<24} {:<9} {:>9} {:>11} {:>11}  {:<24}  {:<24}  {}…",
                            t.name,
                            scope_name(t.scope),
                            limit(t.requests_per_minute),
                            limit(t.tokens_per_minute),
                            limit(t.concurrency),
                            crate::cluster_cmd::unix(t.created.as_ref()),
                            t.expires
                                .as_ref()
                                .map_or("never".to_owned(), |e| crate::cluster_cmd::unix(Some(e))),
                            t.sha256.get(..16).unwrap_or(&t.sha256)
                        )?;
                    }
                }
                Output::Json => {
                    for t in &r.tokens {
                        let line = serde_json::json!({
                            "name": t.name,
                            "sha256": t.sha256,
                            "requests_per_minute": t.requests_per_minute,
                            "tokens_per_minute": t.tokens_per_minute,
                            "concurrency": t.concurrency,
                            "created_s": t.created.as_ref().map_or(0, |c| c.seconds),
                            "scope": scope_name(t.scope),
                            "expires_s": t.expires.as_ref().map_or(0, |c| c.seconds),
                        });
                        writeln!(out, "{line}")?;
                    }
                }
            }
        }
        TokenCommand::Secret { out: path } => {
            crate::auth::write_secret(path, &new_secret()?)?;
            writeln!(out, "wrote a new token secret to {} (0600)", path.display())?;
        }
        TokenCommand::Revoke { target, name } => {
            let req = v1::RevokeTokenRequest {
                name: name.clone(),
                ..Default::default()
            };
            let r = target.call(|mut a| async move { a.revoke_token(req).await })?;
            writeln!(out, "token {name} revoked in block {}", r.height)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_fresh_and_hash_like_sha256sum() {
        let (a, b) = (new_secret().expect("rng"), new_secret().expect("rng"));
        assert_ne!(a, b);
        assert!(a.starts_with(SECRET_PREFIX) && a.len() == SECRET_PREFIX.len() + 64);
        // `printf 'abc' | sha256sum`
        assert_eq!(
            secret_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
