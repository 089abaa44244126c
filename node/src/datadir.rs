//! The node's data directory: created 0700 if absent, marked as Trine's,
//! locked exclusively while the node runs, left consistent when it stops.
//!
//! Layout:
//! - `LOCK` — held with `flock` while a node runs; holds that node's pid
//!   (the OS drops the lock when the process dies, even on `kill -9`).
//! - `trine-data.json` — format version and creation info, written once,
//!   atomically. A non-empty directory without it is refused, so a typo in
//!   `--data-dir` cannot make a node scribble over someone else's files.
//! - `endpoints.json` — the addresses the running node bound (useful with
//!   port 0), written atomically after binding and removed on clean stop.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{ErrorKind, Read as _, Seek as _, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Data-dir format this build writes and understands. 2: Raft in standard
/// mode (one leader per term), whose votes and log ids format 1's (two
/// leaders could share a term) cannot be read as.
pub const FORMAT: u32 = 2;
const LOCK_FILE: &str = "LOCK";
const META_FILE: &str = "trine-data.json";
const ENDPOINTS_FILE: &str = "endpoints.json";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "data dir {path} cannot be created: {source}; create it yourself or choose another with --data-dir"
    )]
    Create {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("data dir {path} is not a directory; point --data-dir at a directory")]
    NotADirectory { path: PathBuf },
    #[error(
        "data dir {path} is not writable ({source}); give this user write access to it or choose another with --data-dir"
    )]
    NotWritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "data dir {path} is locked by another running trine node{pid}; stop that node or give this one its own --data-dir",
        pid = .pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked { path: PathBuf, pid: Option<u32> },
    #[error(
        "data dir {path} is not empty and holds no {META_FILE}, so it is not a trine data dir; point --data-dir at an empty or trine-owned directory"
    )]
    Foreign { path: PathBuf },
    #[error(
        "data dir {path}: {META_FILE} is unreadable ({reason}); restore it from a backup, or move the directory away to start this node afresh"
    )]
    CorruptMeta { path: PathBuf, reason: String },
    #[error(
        "data dir {path} has format {found}, newer than this trine understands ({FORMAT}); run a newer trine or choose another --data-dir"
    )]
    TooNew { path: PathBuf, found: u32 },
    #[error(
        "data dir {path} has format {found} ({created_by}), older than this trine's ({FORMAT}): its Raft log records votes and log ids in the form of trine's earlier Raft mode, which this build does not read, and the two modes do not mix in one cluster (deploy/runbooks/rolling-upgrade.md, \"Across data-dir formats\"). Run the trine that wrote it, or move the whole cluster over as that runbook section says"
    )]
    TooOld {
        path: PathBuf,
        found: u32,
        created_by: String,
    },
    #[error("data dir {path}: writing {file} failed: {source}; check free space and permissions")]
    Write {
        path: PathBuf,
        file: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// Contents of `trine-data.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    pub created_by: String,
    pub created_at_unix: u64,
}

/// Addresses a running node is bound to (`endpoints.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    pub pid: u32,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    /// libp2p PeerId of the node.
    pub peer_id: String,
    /// libp2p listen addresses, ports resolved.
    pub p2p: Vec<String>,
    /// Mutual-TLS Raft address (bound), and the Raft node id, when the node
    /// is a cluster member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raft: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<u64>,
    /// The gRPC and HTTP ports speak TLS only (`--api-tls`); `api_ca` is
    /// the CA bundle that verifies them and `name` the node name their
    /// certificate holds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub api_tls: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_ca: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// The client ports require a client certificate
    /// (`--api-tls-client-ca`): a certificate and key the CLI on this
    /// machine may present (the node's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_client_identity: Option<(PathBuf, PathBuf)>,
}

/// An open, locked data directory. Dropping it releases the lock;
/// [`DataDir::close`] also removes the endpoints file.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    meta: Meta,
    // Held for the flock; released when the file closes.
    _lock: File,
}

impl DataDir {
    /// Creates (if needed), validates and locks the directory.
    pub fn open(path: &Path) -> Result<Self, Error> {
        let path = path.to_owned();
        match std::fs::metadata(&path) {
            Ok(m) if !m.is_dir() => return Err(Error::NotADirectory { path }),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .map_err(|source| classify_create(&path, source))?,
            Err(source) => return Err(classify_create(&path, source)),
        }
        refuse_foreign(&path)?;
        let lock = lock(&path)?;
        let meta = load_or_init_meta(&path)?;
        Ok(Self {
            path,
            meta,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Records the bound addresses for tools and tests (atomic replace).
    pub fn write_endpoints(&self, endpoints: &Endpoints) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(endpoints).map_err(|e| Error::Write {
            path: self.path.clone(),
            file: ENDPOINTS_FILE,
            source: std::io::Error::other(e),
        })?;
        write_atomic(&self.path, ENDPOINTS_FILE, &json)
    }

    /// Reads the endpoints file of the node running in `dir`, if any.
    pub fn read_endpoints(dir: &Path) -> Option<Endpoints> {
        let bytes = std::fs::read(dir.join(ENDPOINTS_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Clean stop: removes the endpoints file, then releases the lock.
    pub fn close(self) {
        if let Err(e) = std::fs::remove_file(self.path.join(ENDPOINTS_FILE))
            && e.kind() != ErrorKind::NotFound
        {
            tracing::warn!(error = %e, "could not remove {ENDPOINTS_FILE}");
        }
    }
}

fn classify_create(path: &Path, source: std::io::Error) -> Error {
    match source.kind() {
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => Error::NotWritable {
            path: path.to_owned(),
            source,
        },
        ErrorKind::NotADirectory => Error::NotADirectory {
            path: path.to_owned(),
        },
        _ => Error::Create {
            path: path.to_owned(),
            source,
        },
    }
}

fn not_writable(path: &Path, source: std::io::Error) -> Error {
    match source.kind() {
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => Error::NotWritable {
            path: path.to_owned(),
            source,
        },
        _ => Error::Write {
            path: path.to_owned(),
            file: LOCK_FILE,
            source,
        },
    }
}

fn lock(dir: &Path) -> Result<File, Error> {
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(LOCK_FILE))
        .map_err(|e| not_writable(dir, e))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let pid = file
                .read_to_string(&mut text)
                .ok()
                .and_then(|_| text.trim().parse().ok());
            return Err(Error::Locked {
                path: dir.to_owned(),
                pid,
            });
        }
        Err(TryLockError::Error(e)) => return Err(not_writable(dir, e)),
    }
    // An existing LOCK file can be writable in a read-only directory; probe
    // the directory itself so the failure shows now, not at the first write.
    write_atomic(dir, ".write-probe", b"")?;
    let _ = std::fs::remove_file(dir.join(".write-probe"));
    let pid = std::process::id().to_string();
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| file.write_all(pid.as_bytes()))
        .and_then(|()| file.sync_data())
        .map_err(|e| not_writable(dir, e))?;
    Ok(file)
}

/// A directory without our marker must hold nothing but what a previous,
/// interrupted first start of ours may have left.
fn refuse_foreign(dir: &Path) -> Result<(), Error> {
    if dir.join(META_FILE).exists() {
        return Ok(());
    }
    let ours = |name: &str| {
        name == LOCK_FILE
            || (name.starts_with('.') && name.ends_with(".tmp"))
            || name == ".write-probe"
    };
    // Also fine before the first start: the default TLS dir, where `trine
    // certs issue --out <data-dir>/tls` puts the certificate, and the
    // lost+found of a freshly formatted volume (a Kubernetes PVC's root).
    let expected_dir = |name: &str| name == "tls" || name == "lost+found";
    let foreign = std::fs::read_dir(dir)
        .map_err(|e| not_writable(dir, e))?
        .filter_map(Result::ok)
        .any(|entry| {
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                return true;
            };
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            !(ours(name) || (is_dir && expected_dir(name)))
        });
    if foreign {
        return Err(Error::Foreign {
            path: dir.to_owned(),
        });
    }
    Ok(())
}

fn load_or_init_meta(dir: &Path) -> Result<Meta, Error> {
    let corrupt = |reason: String| Error::CorruptMeta {
        path: dir.to_owned(),
        reason,
    };
    match std::fs::read(dir.join(META_FILE)) {
        Ok(bytes) => {
            let meta: Meta = serde_json::from_slice(&bytes).map_err(|e| corrupt(e.to_string()))?;
            if meta.format > FORMAT {
                return Err(Error::TooNew {
                    path: dir.to_owned(),
                    found: meta.format,
                });
            }
            if meta.format < FORMAT {
                return Err(Error::TooOld {
                    path: dir.to_owned(),
                    found: meta.format,
                    created_by: meta.created_by,
                });
            }
            Ok(meta)
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let meta = Meta {
                format: FORMAT,
                created_by: format!("trine {}", crate::build::VERSION),
                created_at_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            };
            let json = serde_json::to_vec_pretty(&meta).map_err(|e| corrupt(e.to_string()))?;
            write_atomic(dir, META_FILE, &json)?;
            Ok(meta)
        }
        Err(e) => Err(corrupt(e.to_string())),
    }
}

/// Writes `dir/name` so that readers see the old or the new content, never
/// a torn one, and the new content survives a crash once this returns.
fn write_atomic(dir: &Path, name: &'static str, bytes: &[u8]) -> Result<(), Error> {
    let err = |source: std::io::Error| match source.kind() {
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => Error::NotWritable {
            path: dir.to_owned(),
            source,
        },
        _ => Error::Write {
            path: dir.to_owned(),
            file: name,
            source,
        },
    };
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(err)?;
    std::fs::rename(&tmp, dir.join(name)).map_err(err)?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creates_marks_and_reopens() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        let d = DataDir::open(&dir).unwrap();
        assert_eq!(d.meta().format, FORMAT);
        let mode = std::fs::metadata(&dir).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o700
        );
        d.close();
        let again = DataDir::open(&dir).unwrap();
        assert_eq!(again.meta().format, FORMAT);
    }

    #[test]
    fn second_open_is_refused_with_the_holder_pid() {
        let tmp = tempfile::tempdir().unwrap();
        let _held = DataDir::open(tmp.path()).unwrap();
        match DataDir::open(tmp.path()) {
            Err(Error::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn lock_is_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        drop(DataDir::open(tmp.path()).unwrap());
        DataDir::open(tmp.path()).unwrap();
    }

    #[test]
    fn a_tls_dir_or_lost_found_made_before_the_first_start_is_not_foreign() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("tls")).unwrap();
        std::fs::write(tmp.path().join("tls").join("node.crt"), "cert").unwrap();
        std::fs::create_dir(tmp.path().join("lost+found")).unwrap();
        DataDir::open(tmp.path()).unwrap();
        assert!(tmp.path().join(META_FILE).exists());
        // A file by those names is still foreign.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("tls"), "not a dir").unwrap();
        assert!(matches!(
            DataDir::open(tmp.path()),
            Err(Error::Foreign { .. })
        ));
    }

    #[test]
    fn foreign_directory_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("thesis.tex"), "precious").unwrap();
        assert!(matches!(
            DataDir::open(tmp.path()),
            Err(Error::Foreign { .. })
        ));
        // Nothing of ours was left behind.
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("thesis.tex")]);
    }

    #[test]
    fn corrupt_newer_and_older_meta_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(META_FILE), "{not json").unwrap();
        assert!(matches!(
            DataDir::open(tmp.path()),
            Err(Error::CorruptMeta { .. })
        ));
        std::fs::write(
            tmp.path().join(META_FILE),
            r#"{"format": 99, "created_by": "x", "created_at_unix": 0}"#,
        )
        .unwrap();
        assert!(matches!(
            DataDir::open(tmp.path()),
            Err(Error::TooNew { found: 99, .. })
        ));
        // Format 1 (openraft's two-leaders-per-term mode) is refused with
        // the way out, and left as it was.
        let old = r#"{"format": 1, "created_by": "trine 0.1.0 (abc)", "created_at_unix": 0}"#;
        std::fs::write(tmp.path().join(META_FILE), old).unwrap();
        let e = DataDir::open(tmp.path()).expect_err("format 1 must be refused");
        assert!(matches!(e, Error::TooOld { found: 1, .. }), "{e}");
        assert!(
            e.to_string().contains("trine 0.1.0 (abc)")
                && e.to_string().contains("Across data-dir formats")
        );
        assert_eq!(
            std::fs::read_to_string(tmp.path().join(META_FILE)).unwrap(),
            old
        );
    }

    #[test]
    fn a_file_is_not_a_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("f");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(
            DataDir::open(&file),
            Err(Error::NotADirectory { .. })
        ));
        assert!(matches!(
            DataDir::open(&file.join("sub")),
            Err(Error::NotADirectory { .. })
        ));
    }

    #[test]
    fn endpoints_round_trip_and_close_removes_them() {
        let tmp = tempfile::tempdir().unwrap();
        let d = DataDir::open(tmp.path()).unwrap();
        let e = Endpoints {
            pid: 7,
            grpc: "127.0.0.1:1".parse().unwrap(),
            http: "127.0.0.1:2".parse().unwrap(),
            peer_id: "12D3KooW".into(),
            p2p: vec!["/ip4/127.0.0.1/tcp/3".into()],
            raft: Some("127.0.0.1:4".parse().unwrap()),
            node_id: Some(9),
            api_tls: true,
            api_ca: Some(PathBuf::from("/etc/trine/ca.crt")),
            name: "a".into(),
            api_client_identity: Some((PathBuf::from("/t/node.crt"), PathBuf::from("/t/node.key"))),
        };
        d.write_endpoints(&e).unwrap();
        assert_eq!(DataDir::read_endpoints(tmp.path()), Some(e));
        d.close();
        assert_eq!(DataDir::read_endpoints(tmp.path()), None);
    }
}
