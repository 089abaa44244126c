//! Read-only memory maps of model files: weights are used where they lie in
//! the page cache, never copied.
#![allow(unsafe_code)]

use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

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

    /// `slice` (which must lie inside this map) as shared bytes.
    pub(crate) fn share(self: &Arc<Self>, slice: &[u8]) -> Bytes {
        let base = self.bytes().as_ptr() as usize;
        let start = (slice.as_ptr() as usize).wrapping_sub(base);
        assert!(
            start <= self.bytes().len() && start + slice.len() <= self.bytes().len(),
            "slice outside the map"
        );
        Bytes::mapped(self.clone(), start..start + slice.len())
    }
}

/// Bytes that are either owned or a range of a mapped file (shared, never
/// copied). Weights that need no repacking stay in the page cache.
#[derive(Clone)]
pub struct Bytes(Inner);

#[derive(Clone)]
enum Inner {
    Owned(Vec<u8>),
    Mapped(Arc<Mapped>, Range<usize>),
}

impl Bytes {
    pub(crate) fn mapped(map: Arc<Mapped>, range: Range<usize>) -> Self {
        debug_assert!(range.end <= map.bytes().len());
        Self(Inner::Mapped(map, range))
    }

    /// Whether these bytes are read from the file in place.
    pub fn is_mapped(&self) -> bool {
        matches!(self.0, Inner::Mapped(..))
    }

    /// A sub-range sharing the same storage.
    pub fn slice(&self, range: Range<usize>) -> Self {
        match &self.0 {
            Inner::Owned(v) => Self(Inner::Owned(v[range].to_vec())),
            Inner::Mapped(m, r) => {
                assert!(range.end <= r.len());
                Self(Inner::Mapped(
                    m.clone(),
                    r.start + range.start..r.start + range.end,
                ))
            }
        }
    }

    /// Mutable access, copying mapped bytes into memory first.
    pub fn make_mut(&mut self) -> &mut Vec<u8> {
        if let Inner::Mapped(..) = self.0 {
            self.0 = Inner::Owned(self.to_vec());
        }
        match &mut self.0 {
            Inner::Owned(v) => v,
            Inner::Mapped(..) => unreachable!("converted above"),
        }
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Inner::Owned(v) => v,
            Inner::Mapped(m, r) => &m.bytes()[r.clone()],
        }
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Self(Inner::Owned(v))
    }
}

impl From<&[u8]> for Bytes {
    fn from(v: &[u8]) -> Self {
        Self(Inner::Owned(v.to_vec()))
    }
}

impl PartialEq for Bytes {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Bytes({} bytes, {})",
            self.len(),
            if self.is_mapped() { "mapped" } else { "owned" }
        )
    }
}
