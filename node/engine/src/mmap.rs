//! Read-only memory maps of model files: weights are used where they lie in
//! the page cache, never copied.
#![allow(unsafe_code)]

use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

/// A whole file mapped read-only.
#[derive(Debug)]
pub(crate) struct Mapped {
    // None for an empty file, which cannot be mapped.
    map: Option<Mmap>,
}

impl Mapped {
    pub(crate) fn open(path: &Path) -> Result<Self, crate::Error> {
        let io = |source| crate::Error::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let map = if len == 0 {
            None
        } else {
            // SAFETY: the map is read-only and private to this process. The
            // one hazard is another process truncating or rewriting the file
            // while it is mapped; model files are immutable by contract
            // (written atomically, identified by their sha256), as with
            // llama.cpp's mmap loading.
            Some(unsafe { Mmap::map(&file) }.map_err(io)?)
        };
        Ok(Self { map })
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or_default()
    }
}
