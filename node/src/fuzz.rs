//! Entry points of the node's fuzz targets (`node/fuzz`, cargo-fuzz) and of
//! the corpus replay and random-input tests CI runs: each takes bytes from
//! outside (a peer, a client, an operator's file) through the same code the
//! node runs on them. A panic, a hang or an allocation sized by the input
//! is a bug; a refusal is the expected answer to garbage.

use std::path::Path;
use std::time::Duration;

use prost::Message as _;

/// A heartbeat as gossip delivers it, judged fresh and after a previous one.
pub fn gossip(data: &[u8]) {
    use crate::mesh::health::{Last, Verdict, judge};
    let now = 1_700_000_000_000;
    let interval = Duration::from_secs(1);
    let first = judge(data, None, None, interval, now);
    if let Verdict::Accept(hb) = &first {
        // What is accepted holds to the documented bounds.
        assert!(data.len() <= crate::mesh::health::MAX_BYTES);
        assert!(hb.stages.len() <= crate::mesh::health::MAX_STAGES);
        assert!(hb.load.is_finite() && hb.load >= 0.0);
    }
    let signer = crate::mesh::filter::Identity {
        name: "n1".into(),
        region: "us-east".into(),
    };
    let _ = judge(
        data,
        Some(&signer),
        Some(Last {
            seq: 5,
            received_unix_ms: now - 500,
        }),
        interval,
        now,
    );
}

/// A stage request or response body as the stage protocol decodes it.
pub fn stage(data: &[u8]) {
    if let Ok(req) = trine_proto::v1::StageRequest::decode(data)
        && crate::mesh::stage::check_request(&req).is_ok()
        && !req.end
    {
        // An accepted shape is exactly the bytes it claims.
        assert_eq!(
            u64::from(req.tokens) * u64::from(req.width) * 4,
            req.hidden.len() as u64
        );
    }
    let _ = trine_proto::v1::StageResponse::decode(data);
}

/// Bytes a peer writes on a `/trine/stage/1` stream, read by the codec as a
/// request and as a response, at a small limit (the oversized path) and at
/// the node's default: a frame is never longer than the limit nor than the
/// bytes that arrived, and an oversized one reads nothing past its header.
pub fn stage_frame(data: &[u8]) {
    use crate::mesh::stage::{Codec, Frame, PROTOCOL};
    use libp2p::request_response::Codec as _;
    for max in [64, 64 << 20] {
        let mut codec = Codec { max };
        let mut io = futures_util::io::Cursor::new(data);
        match from_memory(codec.read_request(&PROTOCOL, &mut io)) {
            Ok(Frame::Body(body)) => {
                assert!(body.len() <= max);
                assert_eq!(&data[4..4 + body.len()], body.as_slice());
            }
            Ok(Frame::Oversized(len)) => {
                assert!(len as usize > max);
                assert_eq!(io.position(), 4, "nothing read past the header");
            }
            Err(_) => {}
        }
        let mut io = futures_util::io::Cursor::new(data);
        if let Ok(body) = from_memory(codec.read_response(&PROTOCOL, &mut io)) {
            assert!(body.len() <= max && body.len() + 4 <= data.len());
        }
    }
}

/// Runs a read from memory to completion (it never waits).
fn from_memory<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => unreachable!("a read from memory never waits"),
    }
}

/// A body of `/v1/completions` and of `/v1/chat/completions`.
pub fn openai(data: &[u8]) {
    let parsed = [
        crate::openai::completion_request(data),
        crate::openai::chat_request(data),
    ];
    for (req, _) in parsed.into_iter().flatten() {
        assert!(req.input.is_some(), "an accepted body has an input");
    }
}

/// A config file (TOML), parsed and resolved with the defaults.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(layer) = crate::config::Layer::from_toml(text, Path::new("fuzz.toml"))
        && let Ok(config) = crate::config::Config::resolve(layer)
    {
        let _ = config.latency_matrix();
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    fn fuzz_dir(kind: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz")
            .join(kind)
    }

    type Target = (&'static str, fn(&[u8]));
    const TARGETS: [Target; 5] = [
        ("gossip", super::gossip),
        ("stage", super::stage),
        ("stage_frame", super::stage_frame),
        ("openai", super::openai),
        ("config", super::config),
    ];

    /// Every input the fuzzers kept (node/fuzz/corpus/<target>, minimized
    /// with `cargo fuzz cmin`) and the hand-made seeds
    /// (node/fuzz/seeds/<target>), replayed.
    #[test]
    fn the_fuzz_corpora_replay_cleanly() {
        for kind in ["corpus", "seeds"] {
            for (name, target) in TARGETS {
                let dir = fuzz_dir(kind).join(name);
                let mut n = 0;
                for entry in std::fs::read_dir(&dir).expect("the corpus dir") {
                    let path = entry.expect("entry").path();
                    target(&std::fs::read(&path).expect("a corpus file"));
                    n += 1;
                }
                assert!(n > 0, "{} is empty", dir.display());
            }
        }
    }

    /// The valid seeds are accepted, so the targets reach past the parsers.
    #[test]
    fn the_seeds_are_accepted() {
        let root = fuzz_dir("seeds");
        let read = |p: &str| std::fs::read(root.join(p)).expect("seed");
        let hb = read("gossip/heartbeat");
        assert!(matches!(
            crate::mesh::health::judge(
                &hb,
                None,
                None,
                std::time::Duration::from_secs(1),
                1_700_000_000_000
            ),
            crate::mesh::health::Verdict::Accept(_)
        ));
        let req =
            <trine_proto::v1::StageRequest as prost::Message>::decode(&*read("stage/request"))
                .expect("decodes");
        assert!(crate::mesh::stage::check_request(&req).is_ok());
        assert!(crate::openai::completion_request(&read("openai/completion")).is_ok());
        assert!(crate::openai::chat_request(&read("openai/chat")).is_ok());
        let text = String::from_utf8(read("config/small.toml")).expect("utf-8");
        let layer = crate::config::Layer::from_toml(&text, std::path::Path::new("small.toml"))
            .expect("parses");
        crate::config::Config::resolve(layer).expect("valid");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]
        /// Random bytes, and random edits of the seeds, never panic.
        #[test]
        fn random_inputs_are_refused_or_accepted_never_a_panic(
            data in proptest::collection::vec(any::<u8>(), 0..2048),
            seed in 0usize..9,
            at in any::<usize>(),
            byte in any::<u8>(),
        ) {
            for (_, target) in TARGETS {
                target(&data);
            }
            let root = fuzz_dir("seeds");
            let seeds = ["gossip/heartbeat", "stage/request", "stage/response", "openai/completion",
                "openai/chat", "openai/completion_tokens", "config/small.toml", "gossip/stale",
                "stage_frame/request"];
            let mut edited = std::fs::read(root.join(seeds[seed])).expect("seed");
            if !edited.is_empty() {
                let i = at % edited.len();
                edited[i] = byte;
                edited.truncate(edited.len().saturating_sub(at % 3));
            }
            for (_, target) in TARGETS {
                target(&edited);
            }
        }
    }
}
