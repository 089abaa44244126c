//! TLS on the client ports (`--api-tls`): the gRPC port (HTTP/2) and the
//! HTTP port (HTTP/1.1: the OpenAI API, the console, /metrics) accept TLS
//! only, with the node's certificate from its TLS dir or one given with
//! `--api-tls-cert`; the files are re-read every [`RELOAD_EVERY`] and new
//! connections get what is current (renewal without a restart).
//!
//! The same type holds the trust this node uses to reach other nodes'
//! client ports (forwarded requests, the console's fan-out): the CA bundle
//! `--api-tls-ca` (the cluster's ca.crt by default), and the name to check,
//! the target's node name. A node that does not serve TLS still forwards
//! over TLS to one that does, so TLS can be turned on one node at a time.
//!
//! With `--api-tls-client-ca` the client ports also require a client
//! certificate from that bundle (mutual TLS, as etcd's client-cert-auth);
//! this node presents its own node certificate when it forwards, so the
//! bundle must hold the cluster CA.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::Endpoint;
use trine_control::tls::{self, Error};

use crate::config::Config;

/// How often the certificate files are read again.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The client ports' TLS and the trust for other nodes'; cheap to clone.
#[derive(Clone, Default)]
pub struct ApiTls(Arc<Inner>);

#[derive(Default)]
struct Inner {
    /// Certificate and key files, when this node serves TLS.
    files: Option<(PathBuf, PathBuf)>,
    /// The CA bundle that verifies other nodes.
    ca_file: Option<PathBuf>,
    /// The CA bundle client certificates must chain to, when required.
    client_ca_file: Option<PathBuf>,
    /// This node's certificate and key, presented when it forwards.
    identity_files: Option<(PathBuf, PathBuf)>,
    /// The node name the certificate must hold (in a cluster), else empty.
    name: String,
    current: RwLock<Current>,
}

#[derive(Default, PartialEq, Eq)]
struct Files {
    cert: String,
    key: String,
    ca: String,
    client_ca: String,
    id_cert: String,
    id_key: String,
}

#[derive(Default)]
struct Current {
    files: Files,
    grpc: Option<Arc<rustls::ServerConfig>>,
    http: Option<Arc<rustls::ServerConfig>>,
    generation: u64,
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls")
            .field("serves", &self.serves())
            .field("generation", &self.generation())
            .finish()
    }
}

impl ApiTls {
    /// Loads what `config` asks for. `clustered`: the node is a cluster
    /// member, so its certificate must name it (`config.name`): other
    /// nodes forwarding requests to it check that name.
    pub fn load(config: &Config, clustered: bool) -> Result<Self, Error> {
        let ca = config.api_tls_ca();
        let inner = Inner {
            files: config.api_tls.then(|| config.api_tls_files()),
            // The default bundle may be absent (a node outside a cluster);
            // one named explicitly must be there.
            ca_file: (ca.exists() || !config.api_tls_ca.as_os_str().is_empty()).then_some(ca),
            client_ca_file: (config.api_tls && !config.api_tls_client_ca.as_os_str().is_empty())
                .then(|| config.api_tls_client_ca.clone()),
            identity_files: {
                let dir = config.tls_dir();
                let (cert, key) = (dir.join(tls::NODE_CERT), dir.join(tls::NODE_KEY));
                (clustered && cert.exists()).then_some((cert, key))
            },
            name: if clustered {
                config.name.clone()
            } else {
                String::new()
            },
            current: RwLock::default(),
        };
        let files = inner.read()?;
        let current = inner.build(files)?;
        *inner.current.write().unwrap_or_else(|e| e.into_inner()) = current;
        Ok(Self(Arc::new(inner)))
    }

    /// Whether the client ports speak TLS.
    pub fn serves(&self) -> bool {
        self.0.files.is_some()
    }

    /// Whether the client ports require a client certificate.
    pub fn requires_client_certs(&self) -> bool {
        self.0.client_ca_file.is_some()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.0.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The gRPC port's server configuration (ALPN h2) for the next
    /// connection; `None` when the node does not serve TLS.
    pub fn grpc_server(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.read().grpc.clone()
    }

    /// The HTTP port's (ALPN http/1.1).
    pub fn http_server(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.read().http.clone()
    }

    /// Bumped by every reload that changed a file.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// When the served certificate expires (Unix seconds).
    pub fn not_after(&self) -> Option<i64> {
        let current = self.read();
        current.grpc.as_ref()?;
        tls::pem_not_after(&current.files.cert)
    }

    /// A channel endpoint for another node's client gRPC port at `addr`:
    /// `https://` verified against the CA bundle and the node's `name`
    /// when it serves TLS (`tls`), else plain `http://`.
    pub fn endpoint(&self, addr: &str, name: &str, tls: bool) -> Result<Endpoint, String> {
        if !tls {
            return Endpoint::from_shared(format!("http://{addr}"))
                .map_err(|e| format!("node address {addr}: {e}"));
        }
        let current = self.read();
        let f = &current.files;
        if f.ca.is_empty() {
            return Err(format!(
                "node {name} serves its client ports over TLS and this node has no CA bundle to verify it; set --api-tls-ca (or put the cluster's ca.crt in the TLS dir)"
            ));
        }
        // This node's certificate goes along: a node requiring client
        // certificates accepts it when its bundle holds the cluster CA.
        let identity = (!f.id_cert.is_empty()).then_some((f.id_cert.as_str(), f.id_key.as_str()));
        let config = tls::client_config(&f.ca, Some(name), identity);
        Endpoint::from_shared(format!("https://{addr}"))
            .map_err(|e| format!("node address {addr}: {e}"))?
            .tls_config(config)
            .map_err(|e| format!("TLS to node {name}: {e}"))
    }

    /// Reads the files again; swaps them in when they changed and make a
    /// usable set. `Ok(false)`: nothing changed. On an error what is
    /// current stays.
    pub fn reload(&self) -> Result<bool, Error> {
        let files = self.0.read()?;
        if files == self.read().files {
            return Ok(false);
        }
        let mut next = self.0.build(files)?;
        let mut current = self.0.current.write().unwrap_or_else(|e| e.into_inner());
        next.generation = current.generation + 1;
        *current = next;
        Ok(true)
    }

    /// Reloads every [`RELOAD_EVERY`] until `stop`, keeping the expiry
    /// metric current and logging each change or failure once.
    pub async fn watch(self, mut stop: watch::Receiver<bool>) {
        let mut last_error = String::new();
        self.export_expiry();
        loop {
            tokio::select! {
                () = tokio::time::sleep(RELOAD_EVERY) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            match self.reload() {
                Ok(false) => {}
                Ok(true) => {
                    last_error.clear();
                    self.export_expiry();
                    tracing::info!(
                        generation = self.generation(),
                        serves = self.serves(),
                        "client-port TLS files changed; new connections use them"
                    );
                }
                Err(e) => {
                    let e = e.to_string();
                    if e != last_error {
                        tracing::warn!(error = %e, "client-port TLS files changed but cannot be used; the previous ones stay");
                        last_error = e;
                    }
                }
            }
        }
    }

    fn export_expiry(&self) {
        if let Some(t) = self.not_after() {
            metrics::gauge!(crate::metrics::CERT_EXPIRY, "cert" => "api").set(t as f64);
        }
    }
}

impl Inner {
    fn read(&self) -> Result<Files, Error> {
        let mut files = Files::default();
        if let Some((cert, key)) = &self.files {
            let fix = "give an existing file with --api-tls-cert and --api-tls-key, or issue the node's own with `trine certs issue`";
            files.cert = tls::read(cert, "client-port certificate", fix)?;
            files.key = tls::read_private(key, "client-port key", fix)?;
        }
        if let Some(ca) = &self.client_ca_file {
            files.client_ca = tls::read(
                ca,
                "CA bundle for client certificates",
                "set --api-tls-client-ca to the bundle that signs your clients' certificates",
            )?;
        }
        if let Some((cert, key)) = &self.identity_files {
            let fix = "issue the node's certificate with `trine certs issue`";
            files.id_cert = tls::read(cert, "node certificate", fix)?;
            files.id_key = tls::read_private(key, "node key", fix)?;
        }
        if let Some(ca) = &self.ca_file {
            files.ca = tls::read(
                ca,
                "CA bundle for other nodes' client ports",
                "set --api-tls-ca to the bundle that signed the nodes' client-port certificates",
            )?;
        }
        Ok(files)
    }

    fn build(&self, files: Files) -> Result<Current, Error> {
        let mut current = Current::default();
        if let Some((cert, key)) = &self.files {
            let bad = |e: Error| Error::Io {
                path: format!("{} and {}", cert.display(), key.display()),
                reason: e.to_string(),
            };
            if !self.name.is_empty() {
                let names = tls::pem_names(&files.cert);
                if !tls::certifies(&names, &self.name) {
                    return Err(Error::Io {
                        path: cert.display().to_string(),
                        reason: format!(
                            "names [{}], not this node's name {:?}: other nodes forwarding requests to this one check that name; use a certificate that also holds it as a DNS name (or drop --api-tls-cert to serve the node certificate)",
                            names.join(", "),
                            self.name
                        ),
                    });
                }
            }
            let client_ca = (!files.client_ca.is_empty()).then_some(files.client_ca.as_str());
            current.grpc = Some(Arc::new(
                tls::server_config(&files.cert, &files.key, client_ca, b"h2").map_err(bad)?,
            ));
            current.http = Some(Arc::new(
                tls::server_config(&files.cert, &files.key, client_ca, b"http/1.1").map_err(bad)?,
            ));
        }
        current.files = files;
        Ok(current)
    }
}

/// The HTTP port's TLS connections as an axum listener.
pub struct Listener {
    incoming: tokio_stream::wrappers::ReceiverStream<std::io::Result<tls::TlsConn>>,
    local: std::net::SocketAddr,
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Accepts on `listener` with `api`'s current HTTP configuration.
    pub fn new(
        listener: tokio::net::TcpListener,
        api: ApiTls,
        stop: watch::Receiver<bool>,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let first = api.http_server().ok_or_else(|| {
            std::io::Error::other("the node does not serve TLS on its client ports")
        })?;
        let config = move || api.http_server().unwrap_or_else(|| first.clone());
        Ok(Self {
            incoming: tls::accept(listener, config, "HTTP", stop),
            local,
        })
    }
}

impl axum::serve::Listener for Listener {
    type Io = tls::TlsConn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt as _;
        loop {
            match self.incoming.next().await {
                Some(Ok(conn)) => {
                    let peer = conn.get_ref().0.peer_addr().unwrap_or(self.local);
                    return (conn, peer);
                }
                Some(Err(_)) => {}
                // Stopped: no more connections; the server is shutting down.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
