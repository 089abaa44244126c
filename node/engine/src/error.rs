//! The engine's error type: every variant names the file (and tensor) and
//! says what to do.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model file {path}: {source}; check the path and its permissions")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model file {path}: {source}")]
    Gguf {
        path: PathBuf,
        #[source]
        source: crate::gguf::Error,
    },
    #[error("model file {path}: {problem}")]
    Model { path: PathBuf, problem: String },
    #[error("model file {path}: tensor {tensor}: {source}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        #[source]
        source: crate::formats::Error,
    },
}
