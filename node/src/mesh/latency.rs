//! Simulated inter-region latency: a region RTT matrix and a stream wrapper
//! that holds every received byte back for half the RTT to the sender's
//! region (plus jitter), so pings, gossip and stage traffic all feel it.
//!
//! This machine class has no `tc netem`; like `cockroach demo --global`, the
//! delay lives in the process. Both ends of a connection delay what they
//! receive, so a round trip costs the full matrix RTT. The two ends learn
//! each other's region from a one-line preamble sent before the security
//! handshake ([`exchange_regions`]); every node of a simulated mesh must
//! therefore run with the simulation on (the testnet does).

use std::collections::{BTreeMap, VecDeque};
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use rand::{Rng as _, SeedableRng as _};
use serde::Deserialize;
use tokio::time::{Instant, Sleep};

/// Most bytes a connection holds back before it stops reading the socket
/// (TCP flow control then pushes back on the sender).
const MAX_HELD_BYTES: usize = 4 << 20;
/// Read size while filling the hold queue.
const CHUNK: usize = 16 << 10;
/// Longest region name in the preamble (a DNS label).
const MAX_REGION_LEN: usize = 63;

/// Round-trip times between regions, symmetric, with jitter.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// RTT between two distinct regions, keyed with the smaller name first.
    rtt: BTreeMap<(String, String), Duration>,
    /// RTT between two nodes of the same region.
    pub intra_region: Duration,
    /// Each held chunk gets a uniform extra delay in [0, jitter).
    pub jitter: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    #[error(
        "latency matrix {path}: {reason}; see `trine node --help` (--simulated-latency) for the format"
    )]
    File { path: String, reason: String },
}

/// The TOML form: `intra_region = "1ms"`, `jitter = "2ms"` and a `[rtt]`
/// table of `"us-east/us-west" = "65ms"` entries.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MatrixFile {
    #[serde(default, with = "humantime_serde")]
    intra_region: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    jitter: Option<Duration>,
    rtt: BTreeMap<String, String>,
}

fn key(a: &str, b: &str) -> (String, String) {
    if a <= b {
        (a.to_owned(), b.to_owned())
    } else {
        (b.to_owned(), a.to_owned())
    }
}

impl Matrix {
    /// Realistic public-cloud medians between the four testnet regions
    /// (us-east ≈ Virginia, us-west ≈ Oregon, eu-central ≈ Frankfurt,
    /// ap-southeast ≈ Singapore).
    pub fn realistic() -> Self {
        let ms = Duration::from_millis;
        let rtt = [
            ("us-east", "us-west", 65),
            ("us-east", "eu-central", 90),
            ("us-east", "ap-southeast", 215),
            ("us-west", "eu-central", 145),
            ("us-west", "ap-southeast", 165),
            ("eu-central", "ap-southeast", 160),
        ]
        .into_iter()
        .map(|(a, b, t)| (key(a, b), ms(t)))
        .collect();
        Self {
            rtt,
            intra_region: ms(1),
            jitter: ms(2),
        }
    }

    /// Reads a matrix file (see [`MatrixFile`]).
    pub fn from_file(path: &Path) -> Result<Self, MatrixError> {
        let err = |reason: String| MatrixError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::from_toml(&text).map_err(err)
    }

    fn from_toml(text: &str) -> Result<Self, String> {
        let file: MatrixFile = toml::from_str(text).map_err(|e| e.message().replace('\n', " "))?;
        let default = Self::realistic();
        let mut rtt = BTreeMap::new();
        for (pair, value) in file.rtt {
            let (a, b) = pair
                .split_once('/')
                .filter(|(a, b)| !a.is_empty() && !b.is_empty() && a != b)
                .ok_or_else(|| format!("rtt key {pair:?} is not \"region-a/region-b\""))?;
            let d = humantime::parse_duration(&value)
                .map_err(|e| format!("rtt {pair:?} = {value:?}: {e}"))?;
            if d > Duration::from_secs(10) {
                return Err(format!("rtt {pair:?} = {value:?} is over 10s"));
            }
            rtt.insert(key(a, b), d);
        }
        Ok(Self {
            rtt,
            intra_region: file.intra_region.unwrap_or(default.intra_region),
            jitter: file.jitter.unwrap_or(default.jitter),
        })
    }

    /// Regions the matrix names.
    pub fn regions(&self) -> Vec<&str> {
        let mut r: Vec<&str> = self
            .rtt
            .keys()
            .flat_map(|(a, b)| [a.as_str(), b.as_str()])
            .collect();
        r.sort_unstable();
        r.dedup();
        r
    }

    /// The RTT between two regions, `None` if the matrix does not name the pair.
    pub fn rtt(&self, a: &str, b: &str) -> Option<Duration> {
        if a == b {
            return Some(self.intra_region);
        }
        self.rtt.get(&key(a, b)).copied()
    }
}

/// Sends our region and reads the remote's, before any other byte.
pub async fn exchange_regions<S>(stream: &mut S, local: &str) -> io::Result<String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let len = u8::try_from(local.len())
        .ok()
        .filter(|&l| usize::from(l) <= MAX_REGION_LEN)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "region name too long"))?;
    let mut hello = Vec::with_capacity(1 + local.len());
    hello.push(len);
    hello.extend_from_slice(local.as_bytes());
    stream.write_all(&hello).await?;
    stream.flush().await?;
    let mut len = [0u8; 1];
    stream.read_exact(&mut len).await?;
    let len = usize::from(len[0]);
    if len == 0 || len > MAX_REGION_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "bad simulated-latency preamble: is the simulation on at both ends (--simulated-latency)?",
        ));
    }
    let mut name = vec![0u8; len];
    stream.read_exact(&mut name).await?;
    let name = String::from_utf8(name)
        .ok()
        .filter(|n| {
            n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "bad simulated-latency preamble: region is not a DNS label",
            )
        })?;
    Ok(name)
}

/// Receive-side hold: bytes become readable `one_way` (+ jitter) after they
/// arrived, in order.
#[derive(Debug)]
pub struct Hold {
    one_way: Duration,
    jitter: Duration,
    rng: rand_chacha::ChaCha8Rng,
    queue: VecDeque<(Instant, Vec<u8>, usize)>,
    held: usize,
    last_due: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    eof: bool,
    error: Option<io::Error>,
}

impl Hold {
    pub fn new(rtt: Duration, jitter: Duration, seed: u64) -> Self {
        Self {
            one_way: rtt / 2,
            jitter,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
            queue: VecDeque::new(),
            held: 0,
            last_due: Instant::now(),
            sleep: None,
            eof: false,
            error: None,
        }
    }

    fn due(&mut self) -> Instant {
        let jitter = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            self.jitter.mul_f64(self.rng.random::<f64>())
        };
        // Never before an earlier chunk: a stream stays in order.
        let due = (Instant::now() + self.one_way + jitter).max(self.last_due);
        self.last_due = due;
        due
    }

    /// Reads from `inner` into the queue and hands out what is due.
    pub fn poll_read<S: AsyncRead + Unpin>(
        &mut self,
        inner: &mut S,
        cx: &mut Context<'_>,
        buf: &mut [u8],
        mut on_bytes: impl FnMut(usize),
    ) -> Poll<io::Result<usize>> {
        while !self.eof && self.error.is_none() && self.held < MAX_HELD_BYTES {
            let mut chunk = vec![0u8; CHUNK];
            match Pin::new(&mut *inner).poll_read(cx, &mut chunk) {
                Poll::Ready(Ok(0)) => self.eof = true,
                Poll::Ready(Ok(n)) => {
                    on_bytes(n);
                    chunk.truncate(n);
                    let due = self.due();
                    self.held += n;
                    self.queue.push_back((due, chunk, 0));
                }
                Poll::Ready(Err(e)) => self.error = Some(e),
                Poll::Pending => break,
            }
        }
        loop {
            let Some((due, chunk, offset)) = self.queue.front_mut() else {
                if let Some(e) = self.error.take() {
                    return Poll::Ready(Err(e));
                }
                return if self.eof {
                    Poll::Ready(Ok(0))
                } else {
                    Poll::Pending
                };
            };
            if *due <= Instant::now() {
                self.sleep = None;
                let n = (chunk.len() - *offset).min(buf.len());
                buf[..n].copy_from_slice(&chunk[*offset..*offset + n]);
                *offset += n;
                self.held -= n;
                if *offset == chunk.len() {
                    self.queue.pop_front();
                }
                return Poll::Ready(Ok(n));
            }
            let due = *due;
            let sleep = self
                .sleep
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
            if sleep.deadline() != due {
                sleep.as_mut().reset(due);
            }
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }
}

/// A stream whose received bytes are held back by a [`Hold`] (what the
/// router's forwarded gRPC connections use: the mesh has its own wrapper,
/// which also counts p2p bytes).
#[derive(Debug)]
pub struct Held<S> {
    inner: S,
    hold: Hold,
}

impl<S> Held<S> {
    pub fn new(inner: S, hold: Hold) -> Self {
        Self { inner, hold }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.hold.poll_read(&mut this.inner, cx, buf, |_| {})
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realistic_matrix_is_symmetric_and_complete() {
        let m = Matrix::realistic();
        let regions = m.regions();
        assert_eq!(regions.len(), 4);
        for a in &regions {
            for b in &regions {
                assert_eq!(m.rtt(a, b), m.rtt(b, a));
                assert!(m.rtt(a, b).is_some(), "{a}/{b}");
            }
        }
        assert_eq!(
            m.rtt("us-east", "eu-central"),
            Some(Duration::from_millis(90))
        );
        assert_eq!(m.rtt("us-east", "mars"), None);
    }

    #[test]
    fn matrix_file_parses_and_rejects_bad_keys() {
        let m = Matrix::from_toml("jitter = \"0s\"\n[rtt]\n\"a/b\" = \"30ms\"\n").unwrap();
        assert_eq!(m.rtt("b", "a"), Some(Duration::from_millis(30)));
        assert_eq!(m.jitter, Duration::ZERO);
        for bad in [
            "[rtt]\n\"a\" = \"30ms\"\n",
            "[rtt]\n\"a/a\" = \"30ms\"\n",
            "[rtt]\n\"a/b\" = \"soon\"\n",
            "[rtt]\n\"a/b\" = \"1h\"\n",
            "colour = 1\n[rtt]\n",
        ] {
            assert!(Matrix::from_toml(bad).is_err(), "{bad}");
        }
    }

    /// Reads from a script, writes into a log.
    struct Scripted {
        input: futures_util::io::Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl AsyncRead for Scripted {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.input).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Scripted {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.output.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn scripted(input: &[u8]) -> Scripted {
        Scripted {
            input: futures_util::io::Cursor::new(input.to_vec()),
            output: Vec::new(),
        }
    }

    #[tokio::test]
    async fn preamble_round_trips_and_rejects_garbage() {
        let mut s = scripted(b"\x07us-westrest");
        assert_eq!(exchange_regions(&mut s, "eu").await.unwrap(), "us-west");
        assert_eq!(s.output, b"\x02eu");
        // A peer without the simulation starts with multistream-select.
        let mut s = scripted(b"\x13/multistream/1.0.0\n");
        assert!(exchange_regions(&mut s, "eu").await.is_err());
        let mut s = scripted(b"\x02EU");
        assert!(exchange_regions(&mut s, "eu").await.is_err());
        let mut s = scripted(b"\x00");
        assert!(exchange_regions(&mut s, "eu").await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn hold_releases_bytes_after_half_the_rtt_in_order() {
        let mut inner = scripted(b"hello world");
        let mut hold = Hold::new(Duration::from_millis(100), Duration::ZERO, 1);
        let start = Instant::now();
        let mut counted = 0;
        let mut out = Vec::new();
        while out.len() < 11 {
            let mut buf = [0u8; 4];
            let n = std::future::poll_fn(|cx| {
                hold.poll_read(&mut inner, cx, &mut buf, |n| counted += n)
            })
            .await
            .unwrap();
            assert!(
                start.elapsed() >= Duration::from_millis(50),
                "{:?}",
                start.elapsed()
            );
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, b"hello world");
        assert_eq!(counted, 11);
        assert!(
            start.elapsed() < Duration::from_millis(60),
            "{:?}",
            start.elapsed()
        );
        let mut buf = [0u8; 4];
        let eof = std::future::poll_fn(|cx| hold.poll_read(&mut inner, cx, &mut buf, |_| {})).await;
        assert_eq!(eof.unwrap(), 0);
    }
}
