//! The node's libp2p identity: an ed25519 key in `<data dir>/node.key`
//! (libp2p's protobuf key encoding), created with mode 0600 on first start.
//! A key file that group or others may read is refused, as ssh does.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

pub const KEY_FILE: &str = "node.key";
/// An encoded ed25519 keypair is 68 bytes; anything much larger is not ours.
const MAX_KEY_FILE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "node key {path} is readable by others (mode {mode:o}); run `chmod 600 {path}` (and keep it secret: it is this node's identity)"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "node key {path} is not a libp2p ed25519 key ({reason}); restore it from a backup, or delete it to give this node a new identity (peers will see a new PeerId)"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("node key {path}: {source}; check the data dir's permissions and free space")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Loads the node key from `dir`, or creates one there.
pub fn load_or_create(dir: &Path) -> Result<(Keypair, bool), Error> {
    let path = dir.join(KEY_FILE);
    let io = |source| Error::Io {
        path: path.clone(),
        source,
    };
    match std::fs::metadata(&path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(Error::Exposed { path, mode });
            }
            if meta.len() > MAX_KEY_FILE {
                return Err(Error::Corrupt {
                    path,
                    reason: format!("{} bytes, expected 68", meta.len()),
                });
            }
            let bytes = std::fs::read(&path).map_err(io)?;
            let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| Error::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            if key.key_type() != libp2p::identity::KeyType::Ed25519 {
                return Err(Error::Corrupt {
                    path,
                    reason: format!("key type {:?}", key.key_type()),
                });
            }
            Ok((key, false))
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| Error::Corrupt {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            // Written to a temporary name, synced, then renamed: a crash
            // never leaves a half-written identity.
            let tmp = dir.join(format!("{KEY_FILE}.tmp"));
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            file.write_all(&bytes).map_err(io)?;
            file.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            Ok((key, true))
        }
        Err(e) => Err(io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_0600_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let (a, created) = load_or_create(dir.path()).unwrap();
        assert!(created);
        let mode = std::fs::metadata(dir.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (b, created) = load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
    }

    #[test]
    fn readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        load_or_create(dir.path()).unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Exposed { mode: 0o644, .. }), "{err}");
        assert!(err.to_string().contains("chmod 600"), "{err}");
    }

    #[test]
    fn garbage_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(KEY_FILE);
        std::fs::write(&path, b"not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let err = load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("delete it"), "{err}");
    }
}
