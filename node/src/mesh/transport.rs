//! The mesh's transport: TCP (with `/dns4/` and `/dns6/` resolution) or, for
//! in-process scale runs, libp2p's memory transport; then the optional
//! simulated-latency preamble, byte counting, noise and yamux. Builds with
//! the `quic` feature add QUIC (`/udp/<port>/quic-v1`, TLS 1.3 and QUIC's
//! own streams) beside TCP; QUIC datagrams are neither delayed nor counted
//! (the simulation and the byte counters wrap byte streams).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::io::{AsyncRead, AsyncWrite};
use libp2p::core::ConnectedPoint;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::{Boxed, MemoryTransport};
use libp2p::core::upgrade::Version;
use libp2p::identity::Keypair;
use libp2p::{PeerId, Transport as _, noise, tcp, yamux};

use super::latency::{self, Hold, Matrix};
use crate::metrics;

/// How connections reach other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Kind {
    /// TCP with DNS resolution: what nodes use.
    #[default]
    Tcp,
    /// In-process channels (`/memory/N` addresses), for scale runs.
    Memory,
}

/// The simulation each new connection applies.
#[derive(Debug, Clone)]
pub struct Simulation {
    pub region: String,
    pub matrix: Arc<Matrix>,
}

/// Noise handshake and yamux negotiation must finish within this.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether this build speaks QUIC (the `quic` cargo feature).
pub const QUIC: bool = cfg!(feature = "quic");

pub fn build(
    kind: Kind,
    key: &Keypair,
    simulation: Option<Simulation>,
) -> io::Result<Boxed<(PeerId, StreamMuxerBox)>> {
    let noise = noise::Config::new(key).map_err(io::Error::other)?;
    let mut yamux = yamux::Config::default();
    yamux.set_max_num_streams(256);
    let seed = u64::from_le_bytes(
        key.public().to_peer_id().to_bytes()[2..10]
            .try_into()
            .unwrap_or_default(),
    );
    Ok(match kind {
        Kind::Tcp => {
            let tcp = tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                .and_then(counted(simulation, seed))
                .upgrade(Version::V1)
                .authenticate(noise)
                .multiplex(yamux)
                .timeout(UPGRADE_TIMEOUT)
                .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)));
            #[cfg(feature = "quic")]
            let tcp = {
                use futures_util::future::Either;
                let quic = libp2p::quic::tokio::Transport::new(libp2p::quic::Config::new(key));
                tcp.or_transport(quic).map(|either, _| match either {
                    Either::Left(out) => out,
                    Either::Right((peer, conn)) => (peer, StreamMuxerBox::new(conn)),
                })
            };
            libp2p::dns::tokio::Transport::system(tcp)?.boxed()
        }
        Kind::Memory => MemoryTransport::default()
            .and_then(counted(simulation, seed))
            .upgrade(Version::V1)
            .authenticate(noise)
            .multiplex(yamux)
            .timeout(UPGRADE_TIMEOUT)
            .boxed(),
    })
}

/// The step that turns a raw stream into a [`Wire`].
fn counted<S>(
    simulation: Option<Simulation>,
    seed: u64,
) -> impl FnOnce(S, ConnectedPoint) -> futures_util::future::BoxFuture<'static, io::Result<Wire<S>>>
+ Clone
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    move |stream, _| Box::pin(Wire::open(stream, simulation, seed))
}

/// A raw connection that counts its bytes and, under simulation, holds
/// received bytes back by half the RTT to the remote's region.
#[derive(Debug)]
pub struct Wire<S> {
    inner: S,
    hold: Option<Hold>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    async fn open(mut inner: S, simulation: Option<Simulation>, seed: u64) -> io::Result<Self> {
        let hold = match simulation {
            None => None,
            Some(sim) => {
                let remote = latency::exchange_regions(&mut inner, &sim.region).await?;
                match sim.matrix.rtt(&sim.region, &remote) {
                    Some(rtt) => Some(Hold::new(rtt, sim.matrix.jitter, seed)),
                    None => {
                        tracing::warn!(
                            local = %sim.region,
                            remote = %remote,
                            "the latency matrix has no RTT for this region pair; this connection is not delayed"
                        );
                        None
                    }
                }
            }
        };
        Ok(Self { inner, hold })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Wire<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match &mut this.hold {
            Some(hold) => hold.poll_read(&mut this.inner, cx, buf, metrics::p2p_received),
            None => {
                let r = Pin::new(&mut this.inner).poll_read(cx, buf);
                if let Poll::Ready(Ok(n)) = r {
                    metrics::p2p_received(n);
                }
                r
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Wire<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.get_mut().inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            metrics::p2p_sent(n);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}
