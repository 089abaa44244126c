//! `/trine/stage/1`: moves hidden states between pipeline stages over
//! libp2p request-response. The codec only frames bytes (a big-endian u32
//! length, then the body) and never reads a frame over the limit; the event
//! loop decodes the protobuf body (`trine.v1.StageRequest`, `StageResponse`)
//! and checks it against the rules in [`check_request`].
//!
//! An oversized request is handed up as [`Frame::Oversized`] rather than as
//! a read error, because request-response drops read errors silently: this
//! way the loop learns the sender, counts it, scores it down and answers.

use std::io;

use futures_util::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use libp2p::StreamProtocol;
use trine_proto::v1::{StageRequest, StageStatus};

pub const PROTOCOL: StreamProtocol = StreamProtocol::new("/trine/stage/1");

/// A received request frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Body(Vec<u8>),
    /// The peer announced this many bytes, over the limit; none were read.
    Oversized(u32),
}

/// Length-prefixed frames of at most `max` bytes each way.
#[derive(Debug, Clone, Copy)]
pub struct Codec {
    pub max: usize,
}

async fn read_frame<T: AsyncRead + Unpin + Send>(io: &mut T, max: usize) -> io::Result<Vec<u8>> {
    match read_request_frame(io, max).await? {
        Frame::Body(b) => Ok(b),
        Frame::Oversized(len) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("stage frame of {len} bytes is over the {max}-byte limit"),
        )),
    }
}

async fn read_request_frame<T: AsyncRead + Unpin + Send>(
    io: &mut T,
    max: usize,
) -> io::Result<Frame> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let announced = u32::from_be_bytes(len);
    let len = announced as usize;
    if len > max {
        return Ok(Frame::Oversized(announced));
    }
    // Read through `take` so the buffer grows with bytes that really
    // arrive, not with the length the peer claims.
    let mut body = Vec::new();
    io.take(len as u64).read_to_end(&mut body).await?;
    if body.len() != len {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(Frame::Body(body))
}

async fn write_frame<T: AsyncWrite + Unpin + Send>(
    io: &mut T,
    body: &[u8],
    max: usize,
) -> io::Result<()> {
    let len = u32::try_from(body.len())
        .ok()
        .filter(|&l| l as usize <= max)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "stage frame of {} bytes is over the {max}-byte limit",
                    body.len()
                ),
            )
        })?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(body).await?;
    io.close().await
}

impl libp2p::request_response::Codec for Codec {
    type Protocol = StreamProtocol;
    type Request = Frame;
    type Response = Vec<u8>;

    async fn read_request<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Frame> {
        read_request_frame(io, self.max).await
    }

    async fn read_response<T: AsyncRead + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
    ) -> io::Result<Vec<u8>> {
        read_frame(io, self.max).await
    }

    async fn write_request<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: Frame,
    ) -> io::Result<()> {
        match req {
            Frame::Body(b) => write_frame(io, &b, self.max).await,
            Frame::Oversized(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an oversized frame marker is never sent",
            )),
        }
    }

    async fn write_response<T: AsyncWrite + Unpin + Send>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: Vec<u8>,
    ) -> io::Result<()> {
        write_frame(io, &res, self.max).await
    }
}

/// Longest request id and model name accepted.
const MAX_ID: usize = 128;

/// Checks a decoded request; the error is the reason sent back with
/// `STAGE_STATUS_INVALID` and the label of the rejection counter.
pub fn check_request(req: &StageRequest) -> Result<(), (&'static str, String)> {
    if req.request_id.is_empty() || req.request_id.len() > MAX_ID {
        return Err(("request_id", format!("request_id must be 1-{MAX_ID} bytes")));
    }
    if req.model.is_empty() || req.model.len() > MAX_ID {
        return Err(("model", format!("model must be 1-{MAX_ID} bytes")));
    }
    if req.end {
        return Ok(());
    }
    let values = u64::from(req.tokens) * u64::from(req.width);
    if req.tokens == 0 || req.width == 0 || values.checked_mul(4) != Some(req.hidden.len() as u64) {
        return Err((
            "shape",
            format!(
                "hidden holds {} bytes but tokens {} x width {} f32 values need {}",
                req.hidden.len(),
                req.tokens,
                req.width,
                values.saturating_mul(4)
            ),
        ));
    }
    Ok(())
}

/// A short status name for logs and counters.
pub fn status_name(status: StageStatus) -> &'static str {
    match status {
        StageStatus::Unspecified => "unspecified",
        StageStatus::Ok => "ok",
        StageStatus::NotServed => "not_served",
        StageStatus::Invalid => "invalid",
        StageStatus::Busy => "busy",
        StageStatus::Forbidden => "forbidden",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_oversize_is_refused_unread() {
        let mut buf = Vec::new();
        write_frame(&mut futures_util::io::Cursor::new(&mut buf), b"abc", 8)
            .await
            .unwrap();
        assert_eq!(buf, [0, 0, 0, 3, b'a', b'b', b'c']);
        let mut r = futures_util::io::Cursor::new(buf.clone());
        assert_eq!(read_frame(&mut r, 8).await.unwrap(), b"abc");
        let mut r = futures_util::io::Cursor::new(buf);
        assert!(read_frame(&mut r, 2).await.is_err());
        // A peer claiming 4 GiB gets an error, not a 4 GiB buffer.
        let mut r = futures_util::io::Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 1]);
        let e = read_frame(&mut r, 1 << 20).await.unwrap_err();
        assert!(e.to_string().contains("over the"), "{e}");
        let mut r = futures_util::io::Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 1]);
        let f = read_request_frame(&mut r, 1 << 20).await.unwrap();
        assert_eq!(f, Frame::Oversized(u32::MAX));
        assert_eq!(
            r.position(),
            4,
            "the body of an oversized frame is not read"
        );
        // A short body is an error too.
        let mut r = futures_util::io::Cursor::new(vec![0, 0, 0, 9, 1]);
        assert!(read_frame(&mut r, 64).await.is_err());
        let mut sink = futures_util::io::Cursor::new(Vec::new());
        assert!(write_frame(&mut sink, &[0; 9], 8).await.is_err());
    }

    #[test]
    fn request_rules() {
        let ok = StageRequest {
            request_id: "r1".into(),
            model: "m".into(),
            stage: 1,
            position: 0,
            tokens: 2,
            width: 3,
            hidden: vec![0; 24],
            ..Default::default()
        };
        assert!(check_request(&ok).is_ok());
        // Ending a sequence carries no hidden states.
        assert!(
            check_request(&StageRequest {
                end: true,
                tokens: 0,
                hidden: Vec::new(),
                ..ok.clone()
            })
            .is_ok()
        );
        let bad = [
            StageRequest {
                request_id: String::new(),
                ..ok.clone()
            },
            StageRequest {
                model: "x".repeat(200),
                ..ok.clone()
            },
            StageRequest {
                hidden: vec![0; 23],
                ..ok.clone()
            },
            StageRequest {
                tokens: 0,
                hidden: vec![],
                ..ok.clone()
            },
            StageRequest {
                tokens: u32::MAX,
                width: u32::MAX,
                ..ok.clone()
            },
        ];
        for b in bad {
            assert!(check_request(&b).is_err(), "{b:?}");
        }
    }
}
