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
use std::sync::{Arc, RwLock};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

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
    let (cert, key) = new_ca(cluster)?;
    write_private(&key_path, key.as_bytes())?;
    write_public(&cert_path, cert.as_bytes())?;
    Ok(cert_path)
}

/// A new self-signed CA: its certificate and key, PEM.
fn new_ca(cluster: &str) -> Result<(String, String), Error> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err)?;
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("trine cluster CA ({cluster}, {stamp})"),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut params, CA_DAYS);
    let key = KeyPair::generate().map_err(gen_err)?;
    let cert = params.self_signed(&key).map_err(gen_err)?;
    Ok((cert.pem(), key.serialize_pem()))
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

/// The DNS names a DER certificate holds (its subject alternative names
/// other than IP addresses), lower-cased; empty for bytes that are not a
/// certificate.
pub fn names(der: &[u8]) -> Vec<String> {
    alt_names(der)
        .into_iter()
        .filter(|n| n.parse::<std::net::IpAddr>().is_err())
        .map(|n| n.to_ascii_lowercase())
        .collect()
}

/// The DNS names of the first certificate in a PEM chain ([`names`]);
/// empty when it holds none.
pub fn pem_names(pem: &str) -> Vec<String> {
    first_der(pem).map(|der| names(&der)).unwrap_or_default()
}

/// When the first certificate in a PEM chain expires, in Unix seconds.
pub fn pem_not_after(pem: &str) -> Option<i64> {
    let der = first_der(pem).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

fn first_der(pem: &str) -> Result<Vec<u8>, String> {
    x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map(|(_, pem)| pem.contents)
        .map_err(|e| format!("not a PEM certificate: {e}"))
}

/// A rustls server configuration (ring provider, TLS 1.2 and 1.3) that
/// presents the PEM `chain` with its `key`, requires a client certificate
/// from one of the CAs in `client_ca` when given, and offers `alpn`.
/// rustls checks that the key is the certificate's.
pub fn server_config(
    chain: &str,
    key: &str,
    client_ca: Option<&str>,
    alpn: &[u8],
) -> Result<rustls::ServerConfig, Error> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let bad = |what: &str, e: &dyn std::fmt::Display| Error::Generate(format!("{what}: {e}"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("TLS versions", &e))?;
    let builder = match client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(ca.as_bytes()) {
                let ca = ca.map_err(|e| bad("the CA bundle", &e))?;
                roots.add(ca).map_err(|e| bad("the CA bundle", &e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| bad("the CA bundle", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("the certificate", &e))?;
    if chain.is_empty() {
        return Err(bad("the certificate", &"no PEM CERTIFICATE block"));
    }
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| bad("the key", &e))?;
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| bad("the certificate and key", &e))?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// The client side of TLS: trust the CAs in the PEM bundle `ca`, check the
/// server's certificate for `name` (else the address's host), and present
/// `identity` (certificate and key, PEM) when given.
pub fn client_config(
    ca: &str,
    name: Option<&str>,
    identity: Option<(&str, &str)>,
) -> ClientTlsConfig {
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    if let Some(name) = name {
        config = config.domain_name(name);
    }
    if let Some((cert, key)) = identity {
        config = config.identity(Identity::from_pem(cert, key));
    }
    config
}

/// A TLS connection accepted by [`accept`].
pub type TlsConn = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// Longest a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Accepts TCP connections on `listener` and completes each one's TLS
/// handshake, concurrently, with the configuration `config` gives at that
/// moment (so reloaded certificates apply to new connections); those that
/// pass come out of the stream. `port` names the listener in logs. Ends
/// when `stop` turns true.
pub fn accept<F>(
    listener: tokio::net::TcpListener,
    config: F,
    port: &'static str,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>>
where
    F: Fn() -> Arc<rustls::ServerConfig> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(port, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(config());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(port, %peer, error = %e, "TLS handshake refused");
                    }
                    Err(_) => tracing::debug!(port, %peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Whether a certificate with these [`names`] speaks for the node `name`.
pub fn certifies(names: &[String], name: &str) -> bool {
    names.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// A node's certificate, key and the cluster CA, loaded from its TLS dir.
#[derive(Clone, PartialEq, Eq)]
pub struct NodeTls {
    ca: String,
    cert: String,
    key: String,
    /// Where they were read from (reloaded from there when they change).
    dir: Option<PathBuf>,
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
            dir: Some(dir.to_owned()),
        })
    }

    /// The directory these were loaded from.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// When this node's certificate expires, in Unix seconds.
    pub fn not_after(&self) -> Option<i64> {
        pem_not_after(&self.cert)
    }

    /// Checks that the key is the certificate's (a rotation writes the two
    /// files one after the other: a reader between them sees a mismatch).
    pub fn check_pair(&self) -> Result<(), Error> {
        let err = |reason: String| Error::Io {
            path: self.dir.as_deref().map_or_else(
                || format!("{NODE_CERT} and {NODE_KEY}"),
                |d| format!("{} and {NODE_KEY}", d.join(NODE_CERT).display()),
            ),
            reason,
        };
        let key = KeyPair::from_pem(&self.key)
            .map_err(|e| err(format!("{NODE_KEY} is not a private key: {e}")))?;
        let der = self.cert_der().map_err(err)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| err(format!("{NODE_CERT}: {e}")))?;
        if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key).as_slice() {
            return Err(err(
                "the key does not belong to the certificate (a rotation half done?); issue both again with `trine certs rotate`".into(),
            ));
        }
        Ok(())
    }

    /// The rustls server side: present our certificate, require a client
    /// certificate from one of the CAs in `ca.crt`, speak HTTP/2.
    pub fn rustls_server(&self) -> Result<rustls::ServerConfig, Error> {
        server_config(&self.cert, &self.key, Some(&self.ca), b"h2")
    }

    /// This node's certificate, DER (the first block of node.crt).
    fn cert_der(&self) -> Result<Vec<u8>, String> {
        first_der(&self.cert).map_err(|e| format!("{NODE_CERT}: {e}"))
    }

    /// The DNS names of this node's certificate.
    pub fn cert_names(&self) -> Vec<String> {
        pem_names(&self.cert)
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

    /// Client side: present our certificate, verify the peer's against the
    /// CA and [`NODE_NAME`].
    pub fn client(&self) -> ClientTlsConfig {
        client_config(&self.ca, Some(NODE_NAME), Some((&self.cert, &self.key)))
    }
}

/// A member's live certificates: what its Raft server presents and trusts
/// for each new connection, and what its clients use for each new channel.
/// [`Certs::reload`] swaps in new files (a rotation) without a restart;
/// connections already open keep the certificates they were made with.
#[derive(Clone)]
pub struct Certs(Arc<RwLock<Current>>);

struct Current {
    tls: NodeTls,
    /// Built from `tls` (parsing and checking it is the costly part).
    server: Arc<rustls::ServerConfig>,
    generation: u64,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Certs {{ generation: {} }}", self.generation())
    }
}

impl Certs {
    pub fn new(tls: NodeTls) -> Result<Self, Error> {
        let server = Arc::new(tls.rustls_server()?);
        Ok(Self(Arc::new(RwLock::new(Current {
            server,
            tls,
            generation: 0,
        }))))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The server configuration for the next accepted connection.
    pub fn server(&self) -> Arc<rustls::ServerConfig> {
        self.read().server.clone()
    }

    /// The client configuration for the next channel.
    pub fn client(&self) -> ClientTlsConfig {
        self.read().tls.client()
    }

    /// Bumped by every reload that changed something: channels made under
    /// an older generation are made again.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// When the current node certificate expires, in Unix seconds.
    pub fn not_after(&self) -> Option<i64> {
        self.read().tls.not_after()
    }

    /// Reads the files again and swaps them in when they changed and make
    /// a usable set: key and certificate belong together, the certificate
    /// names `name`, and rustls accepts them. `Ok(false)`: nothing changed.
    /// On an error the current certificates stay.
    pub fn reload(&self, name: &str) -> Result<bool, Error> {
        let Some(dir) = self.read().tls.dir.clone() else {
            return Ok(false);
        };
        let tls = NodeTls::load(&dir)?;
        if tls == self.read().tls {
            return Ok(false);
        }
        tls.check_pair()?;
        tls.check_names(name, &dir)?;
        let server = Arc::new(tls.rustls_server()?);
        let mut current = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        current.server = server;
        current.tls = tls;
        current.generation += 1;
        Ok(true)
    }
}

/// The PEM blocks of a bundle, each with its trailing newline.
fn pem_blocks(bundle: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in bundle.lines() {
        if line.starts_with("-----BEGIN ") {
            cur.clear();
        }
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END ") {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

/// `trine certs rotate-ca`: a new CA signs from now on. `ca.crt` becomes a
/// bundle: the new CA first (the one `ca.key` signs as), then the ones it
/// replaces, so nodes trust both while their certificates are re-issued
/// (the overlap). The old key is kept as `ca.key.<unix time>` (0600).
/// With `retire`, `ca.crt` keeps only the signing CA (the overlap ends).
/// Returns the number of CAs `ca.crt` now holds.
pub fn rotate_ca(dir: &Path, cluster: &str, retire: bool) -> Result<usize, Error> {
    let fix = "run `trine certs init` first";
    let bundle = read(&dir.join(CA_CERT), "CA certificate", fix)?;
    let old_key = read_private(&dir.join(CA_KEY), "CA key", fix)?;
    let blocks = pem_blocks(&bundle);
    if blocks.is_empty() {
        return Err(Error::Generate(format!(
            "{} holds no certificate",
            dir.join(CA_CERT).display()
        )));
    }
    if retire {
        write_public(&dir.join(CA_CERT), blocks[0].as_bytes())?;
        return Ok(1);
    }
    let (cert, key) = new_ca(cluster)?;
    let stamp = time::OffsetDateTime::now_utc().unix_timestamp();
    write_private(&dir.join(format!("{CA_KEY}.{stamp}")), old_key.as_bytes())?;
    replace_private(&dir.join(CA_KEY), key.as_bytes())?;
    let mut out = cert;
    for b in &blocks {
        out.push_str(b);
    }
    write_public(&dir.join(CA_CERT), out.as_bytes())?;
    Ok(blocks.len() + 1)
}

/// `trine certs rotate`: copies the CA bundle into a node's TLS dir and,
/// unless `trust_only`, replaces its key and certificate with new ones from
/// the signing CA (for the names the old certificate held when `sans` is
/// empty). A running node picks the files up within seconds.
pub fn rotate_node(
    ca_dir: &Path,
    name: &str,
    sans: &[String],
    out: &Path,
    trust_only: bool,
) -> Result<(), Error> {
    let bundle = read(
        &ca_dir.join(CA_CERT),
        "CA certificate",
        "run `trine certs init` first",
    )?;
    if trust_only {
        fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
        return write_public(&out.join(CA_CERT), bundle.as_bytes());
    }
    let mut sans = sans.to_vec();
    if sans.is_empty()
        && let Ok(pem) = fs::read(out.join(NODE_CERT))
        && let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(&pem)
    {
        sans = alt_names(&pem.contents);
    }
    let staged = tempfile::Builder::new()
        .prefix(".rotate")
        .tempdir_in(out.parent().unwrap_or(Path::new(".")))
        .map_err(|e| io_err(out, e))?;
    issue_node(ca_dir, name, &sans, staged.path())?;
    fs::create_dir_all(out).map_err(|e| io_err(out, e))?;
    write_public(&out.join(CA_CERT), bundle.as_bytes())?;
    // Key first, then certificate: a reader between the two sees a pair
    // that does not match and keeps what it has (Certs::reload).
    for f in [NODE_KEY, NODE_CERT] {
        fs::rename(staged.path().join(f), out.join(f)).map_err(|e| io_err(&out.join(f), e))?;
    }
    Ok(())
}

/// Every subject alternative name of a DER certificate: DNS names and IP
/// addresses, as `certs issue --san` takes them.
fn alt_names(der: &[u8]) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
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
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            GeneralName::IPAddress(b) => match *b {
                [a, b, c, d] => Some(std::net::IpAddr::from([*a, *b, *c, *d]).to_string()),
                _ => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
            },
            _ => None,
        })
        .collect()
}

/// Replaces a secret file: a new 0600 file renamed over the old one.
fn replace_private(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let tmp = path.with_extension("new");
    let _ = fs::remove_file(&tmp);
    write_private(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// Reads a public file (a certificate); a missing one is
/// [`Error::Missing`] with `fix`.
pub fn read(path: &Path, what: &'static str, fix: &str) -> Result<String, Error> {
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
    fn a_ca_rotation_overlaps_then_retires_and_a_node_keeps_its_names() {
        let d = tempfile::tempdir().unwrap();
        let ca = d.path().join("ca");
        init_ca(&ca, "t").unwrap();
        let node = d.path().join("n1");
        issue_node(&ca, "n1", &["10.1.2.3".into(), "n1.example".into()], &node).unwrap();
        let before = NodeTls::load(&node).unwrap();
        let first_ca = fs::read_to_string(ca.join(CA_CERT)).unwrap();

        assert_eq!(rotate_ca(&ca, "t", false).unwrap(), 2);
        let bundle = fs::read_to_string(ca.join(CA_CERT)).unwrap();
        assert_eq!(pem_blocks(&bundle).len(), 2);
        assert!(
            bundle.ends_with(&first_ca),
            "the old CA follows the new one"
        );
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca.join(CA_KEY)), 0o600);
        let kept: Vec<_> = fs::read_dir(&ca)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with("ca.key."))
            .collect();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert_eq!(mode(&ca.join(&kept[0])), 0o600);

        // Trust first: the certificate and key stay.
        rotate_node(&ca, "n1", &[], &node, true).unwrap();
        let trusted = NodeTls::load(&node).unwrap();
        assert_eq!((&trusted.cert, &trusted.key), (&before.cert, &before.key));
        assert_eq!(trusted.ca, bundle);
        // Then a new pair from the new CA, with the names the old one held.
        rotate_node(&ca, "n1", &[], &node, false).unwrap();
        let after = NodeTls::load(&node).unwrap();
        assert_ne!(after.cert, before.cert);
        after.check_pair().unwrap();
        let (_, pem) = x509_parser::pem::parse_x509_pem(after.cert.as_bytes()).unwrap();
        let sans = alt_names(&pem.contents);
        for want in ["n1", "n1.example", "10.1.2.3", NODE_NAME] {
            assert!(
                sans.iter().any(|s| s == want),
                "{want} missing from {sans:?}"
            );
        }
        // A key that is not the certificate's is caught.
        let mixed = NodeTls {
            key: before.key.clone(),
            ..after.clone()
        };
        assert!(
            mixed
                .check_pair()
                .unwrap_err()
                .to_string()
                .contains("does not belong")
        );

        assert_eq!(rotate_ca(&ca, "t", true).unwrap(), 1);
        let retired = fs::read_to_string(ca.join(CA_CERT)).unwrap();
        assert_eq!(pem_blocks(&retired), pem_blocks(&bundle)[..1]);
    }

    #[test]
    fn missing_certificates_name_the_fix() {
        let d = tempfile::tempdir().unwrap();
        let e = NodeTls::load(d.path()).unwrap_err().to_string();
        assert!(e.contains("trine certs issue"), "{e}");
    }
}
