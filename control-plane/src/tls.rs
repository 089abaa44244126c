//! The cluster's certificates: a CA (`trine certs init`) and node
//! certificates it signs (`trine certs issue`), and the mutual-TLS settings
//! of the Raft port built from them.
//!
//! Every node certificate carries the DNS name [`NODE_NAME`] (as
//! CockroachDB's node certificates carry "node"), plus the node's own name
//! and the names and addresses it was issued for; peers verify that name
//! and the chain to the cluster CA, so a node without a certificate from
//! this CA is refused. A member also checks that the certificate names the
//! node a Raft call claims to come from ([`names`]), so one node's key
//! cannot speak for another.
//! Private keys are written 0600 and refused when group or others can read
//! them.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// The name every node certificate holds and every peer checks.
pub const NODE_NAME: &str = "node.trine";
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const NODE_CERT: &str = "node.crt";
pub const NODE_KEY: &str = "node.key";

const CA_DAYS: i64 = 3650;
const NODE_DAYS: i64 = 365;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {reason}")]
    Io { path: String, reason: String },
    #[error(
        "{path} is readable by group or others (mode {mode:o}); a private key or token file must be 0600: run `chmod 600 {path}`"
    )]
    KeyMode { path: String, mode: u32 },
    #[error(
        "{path} already exists; refusing to overwrite a {what} (remove it first if you mean to replace it)"
    )]
    Exists { path: String, what: &'static str },
    #[error("no {what} at {path}; {fix}")]
    Missing {
        path: String,
        what: &'static str,
        fix: String,
    },
    #[error(
        "{path} names [{names}], not this node's name {name:?}: members refuse Raft calls from a certificate that does not name the node; issue one with `trine certs issue --ca-dir <CA dir> --name {name} --out <tls dir>` (or start the node with the name its certificate holds)"
    )]
    WrongName {
        path: String,
        names: String,
        name: String,
    },
    #[error("certificate generation: {0}")]
    Generate(String),
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn gen_err(e: rcgen::Error) -> Error {
    Error::Generate(e.to_string())
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// Creates `ca.crt` and `ca.key` in `dir` for a cluster called `cluster`.
pub fn init_ca(dir: &Path, cluster: &str) -> Result<PathBuf, Error> {
    fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
    let cert_path = dir.join(CA_CERT);
    let key_path = dir.join(CA_KEY);
    for (p, what) in [(&cert_path, "CA certificate"), (&key_path, "CA key")] {
        if p.exists() {
            return Err(Error::Exists {
                path: p.display().to_string(),
                what,
            });
        }
    }
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("trine cluster CA ({cluster})"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_DAYS);
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = params.self_signed(&key).map_err(gen_err)?;
    write_private(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    Ok(cert_path)
}

/// Signs a node certificate for `name` (plus `sans`: host names or IP
/// addresses peers may dial it by) with the CA in `ca_dir`, and writes
/// `ca.crt`, `node.crt` and `node.key` into `out`.
pub fn issue_node(ca_dir: &Path, name: &str, sans: &[String], out: &Path) -> Result<(), Error> {
    let ca_pem = read(
        &ca_dir.join(CA_CERT),
        "CA certificate",
        "run `trine certs init` first",
    )?;
    let ca_key_pem = read_private(
        &ca_dir.join(CA_KEY),
        "CA key",
        "run `trine certs init` first",
    )?;
    let ca_key = KeyPair::from_pem(&ca_key_pem).map_err(gen_err)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(gen_err)?;

    let mut names = vec![
        NODE_NAME.to_owned(),
        name.to_owned(),
        "localhost".into(),
        "127.0.0.1".into(),
    ];
    for s in sans {
        if !names.contains(s) {
            names.push(s.clone());
        }
    }
    let mut params = CertificateParams::new(names).map_err(gen_err)?;
    params
        .distinguished_name
        .push(DnType::CommonName, format!("trine node {name}"));
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    validity(&mut params, NODE_DAYS);
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = params.signed_by(&key, &issuer).map_err(gen_err)?;
    fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    write_private(&out.join(NODE_KEY), key.serialize_pem().as_bytes())?;
    write_public(&out.join(NODE_CERT), cert.pem().as_bytes())?;
    write_public(&out.join(CA_CERT), ca_pem.as_bytes())?;
    Ok(())
}

/// The DNS names a DER certificate holds (its subject alternative names),
/// lower-cased; empty for bytes that are not a certificate.
pub fn names(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
            _ => None,
        })
        .collect()
}

/// Whether a certificate with these [`names`] speaks for the node `name`.
pub fn certifies(names: &[String], name: &str) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// A node's certificate, key and the cluster CA, loaded from its TLS dir.
#[derive(Clone)]
pub struct NodeTls {
    ca: String,
    cert: String,
    key: String,
}

impl std::fmt::Debug for NodeTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeTls { .. }")
    }
}

impl NodeTls {
    /// Loads `ca.crt`, `node.crt` and `node.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let fix = format!(
            "issue one with `trine certs issue --ca-dir <CA dir> --name <node> --out {}`",
            dir.display()
        );
        Ok(Self {
            ca: read(&dir.join(CA_CERT), "cluster CA certificate", &fix)?,
            cert: read(&dir.join(NODE_CERT), "node certificate", &fix)?,
            key: read_private(&dir.join(NODE_KEY), "node key", &fix)?,
        })
    }

    /// The DNS names of this node's certificate.
    pub fn cert_names(&self) -> Vec<String> {
        x509_parser::pem::parse_x509_pem(self.cert.as_bytes())
            .map(|(_, pem)| names(&pem.contents))
            .unwrap_or_default()
    }

    /// Checks that this node's certificate names the node `name`: members
    /// refuse Raft calls from a certificate that does not name the node
    /// they claim to come from, so a mismatch would cut this node off.
    pub fn check_names(&self, name: &str, dir: &Path) -> Result<(), Error> {
        let names = self.cert_names();
        if certifies(&names, name) {
            return Ok(());
        }
        Err(Error::WrongName {
            path: dir.join(NODE_CERT).display().to_string(),
            names: names.join(", "),
            name: name.to_owned(),
        })
    }

    /// Whether `dir` holds a node certificate.
    pub fn present(dir: &Path) -> bool {
        dir.join(NODE_CERT).exists()
    }

    /// Server side: present our certificate, require one from the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert, &self.key))
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// Client side: present our certificate, verify the peer's against the
    /// CA and [`NODE_NAME`].
    pub fn client(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(Identity::from_pem(&self.cert, &self.key))
            .domain_name(NODE_NAME)
    }
}

fn read(path: &Path, what: &'static str, fix: &str) -> Result<String, Error> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Missing {
            path: path.display().to_string(),
            what,
            fix: fix.to_owned(),
        }),
        Err(e) => Err(io_err(path, e)),
    }
}

/// Reads a secret (a private key, a token file), refusing one that group or
/// others can read; a missing file is [`Error::Missing`] with `fix`.
pub fn read_private(path: &Path, what: &'static str, fix: &str) -> Result<String, Error> {
    if let Ok(meta) = fs::metadata(path) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::KeyMode {
                path: path.display().to_string(),
                mode,
            });
        }
    }
    read(path, what, fix)
}

/// Writes a secret to a new file, 0600, and syncs it; never overwrites.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    f.write_all(bytes).map_err(|e| io_err(path, e))?;
    f.sync_all().map_err(|e| io_err(path, e))
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).map_err(|e| io_err(&tmp, e))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)).map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_and_node_files_have_the_right_modes_and_refuse_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        init_ca(&ca, "t").unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca.join(CA_KEY)), 0o600);
        assert_eq!(mode(&ca.join(CA_CERT)), 0o644);
        assert!(matches!(init_ca(&ca, "t"), Err(Error::Exists { .. })));

        let node = d.path().join("n1");
        issue_node(&ca, "n1", &["10.0.0.1".into()], &node).unwrap();
        assert_eq!(mode(&node.join(NODE_KEY)), 0o600);
        NodeTls::load(&node).unwrap();

        fs::set_permissions(node.join(NODE_KEY), fs::Permissions::from_mode(0o644)).unwrap();
        let e = NodeTls::load(&node).unwrap_err();
        assert!(matches!(e, Error::KeyMode { .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn a_node_certificate_names_its_node_and_no_other() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        init_ca(&ca, "t").unwrap();
        let node = d.path().join("n1");
        issue_node(&ca, "eu-1", &["eu-1.example.internal".into()], &node).unwrap();
        let tls = NodeTls::load(&node).unwrap();
        let held = tls.cert_names();
        assert!(
            certifies(&held, "eu-1") && certifies(&held, "EU-1"),
            "{held:?}"
        );
        assert!(certifies(&held, NODE_NAME), "{held:?}");
        assert!(!certifies(&held, "eu-2"), "{held:?}");
        tls.check_names("eu-1", &node).unwrap();
        let e = tls.check_names("eu-2", &node).unwrap_err().to_string();
        assert!(e.contains("--name eu-2") && e.contains("eu-1"), "{e}");
        assert!(names(b"not a certificate").is_empty());
    }

    #[test]
    fn missing_certificates_name_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let e = NodeTls::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("trine certs issue"), "{e}");
    }
}
