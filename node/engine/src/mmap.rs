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
    /// A range of one buffer shared by many matrices (see [`Arena`]).
    Shared(Arc<Vec<u8>>, Range<usize>),
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

    /// Whether these bytes are a range of an [`Arena`].
    pub fn is_shared(&self) -> bool {
        matches!(self.0, Inner::Shared(..))
    }

    /// A sub-range sharing the same storage.
    pub fn slice(&self, range: Range<usize>) -> Self {
        let sub = |r: &Range<usize>| {
            assert!(range.end <= r.len());
            r.start + range.start..r.start + range.end
        };
        match &self.0 {
            Inner::Owned(v) => Self(Inner::Owned(v[range].to_vec())),
            Inner::Mapped(m, r) => Self(Inner::Mapped(m.clone(), sub(r))),
            Inner::Shared(a, r) => Self(Inner::Shared(a.clone(), sub(r))),
        }
    }

    /// Mutable access, copying mapped or shared bytes into memory first.
    pub fn make_mut(&mut self) -> &mut Vec<u8> {
        if !matches!(self.0, Inner::Owned(..)) {
            self.0 = Inner::Owned(self.to_vec());
        }
        match &mut self.0 {
            Inner::Owned(v) => v,
            _ => unreachable!("converted above"),
        }
    }
}

/// One buffer for many matrices repacked at load, so that huge pages cover
/// them all: a matrix smaller than 2 MiB alone gets no 2 MiB-aligned
/// stretch (the 2B4T shape's q, k, v and o projections are 0.3–1.3 MB in
/// base 3), and a larger one loses its unaligned ends. Pieces start on
/// 64-byte boundaries (within the buffer) so no two share a cache line.
pub struct Arena {
    buf: Vec<u8>,
    pieces: Vec<Range<usize>>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Arena({} bytes, {} pieces)",
            self.buf.len(),
            self.pieces.len()
        )
    }
}

impl Arena {
    /// Room for pieces of these lengths, zeroed and advised as by
    /// [`huge_zeroed`].
    pub fn new(lens: &[usize]) -> Self {
        let mut pieces = Vec::with_capacity(lens.len());
        let mut at = 0;
        for &len in lens {
            pieces.push(at..at + len);
            at = (at + len).next_multiple_of(64);
        }
        Self {
            buf: huge_zeroed(at),
            pieces,
        }
    }

    /// Every piece, mutably, in the order of the lengths given.
    pub fn pieces_mut(&mut self) -> Vec<&mut [u8]> {
        let mut out = Vec::with_capacity(self.pieces.len());
        let mut rest = &mut self.buf[..];
        let mut at = 0;
        for r in &self.pieces {
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - at);
            let (piece, tail) = tail.split_at_mut(r.len());
            out.push(piece);
            rest = tail;
            at = r.end;
        }
        out
    }

    /// The filled pieces as shared [`Bytes`], in order.
    pub fn share(self) -> Vec<Bytes> {
        let buf = Arc::new(self.buf);
        self.pieces
            .into_iter()
            .map(|r| Bytes(Inner::Shared(buf.clone(), r)))
            .collect()
    }
}

impl std::ops::Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Inner::Owned(v) => v,
            Inner::Mapped(m, r) => &m.bytes()[r.clone()],
            Inner::Shared(a, r) => &a[r.clone()],
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
            match self.0 {
                Inner::Owned(..) => "owned",
                Inner::Mapped(..) => "mapped",
                Inner::Shared(..) => "shared",
            }
        )
    }
}

/// A zeroed buffer for weights repacked at load, backed by huge pages where
/// the kernel grants them: on Linux, the allocation (fresh, untouched pages
/// from the allocator's own map, as for any large `calloc`) is advised
/// `MADV_HUGEPAGE` before anything is written to it, so the first touch of
/// each 2 MiB-aligned stretch faults in a 2 MiB page. A decode GEMV walks
/// hundreds of MB a token; with 4 KiB pages every 4 KiB is a TLB miss,
/// and under a VM a two-level page walk (on a Xeon VM the Q8_0 lm_head's
/// GEMV took about 37% less time with them: BENCHMARKS.md). Transparent
/// huge pages in `madvise` mode (the common default) need exactly this;
/// with them off the advice is refused and the buffer works as any other.
pub fn huge_zeroed(len: usize) -> Vec<u8> {
    let v = vec![0u8; len];
    advise_huge(v.as_ptr(), len);
    v
}

/// [`huge_zeroed`] in 8-byte words (`bench engine`'s read probe, so that
/// it reads what the repacked weights read).
pub fn huge_zeroed_words(words: usize) -> Vec<u64> {
    let v = vec![0u64; words];
    advise_huge(v.as_ptr().cast(), words * 8);
    v
}

/// Advises `MADV_HUGEPAGE` for the whole pages inside `len` bytes at
/// `start`, a live allocation no byte of which has been written yet.
fn advise_huge(start: *const u8, len: usize) {
    #[cfg(target_os = "linux")]
    if len >= HUGE_PAGE {
        const PAGE: usize = 4096;
        let start = start as usize;
        let first = start.div_ceil(PAGE) * PAGE;
        let end = (start + len) / PAGE * PAGE;
        if end > first {
            // SAFETY: [first, end) is page-aligned and inside the caller's
            // live allocation; MADV_HUGEPAGE changes how the kernel backs
            // the pages, never their contents or the mapping's permissions.
            // Its failure (THP off, an old kernel) is harmless: the pages
            // stay 4 KiB.
            let _ = unsafe {
                libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE)
            };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, len);
}

/// The huge page size the advice aims at (x86-64 and arm64 with 4 KiB base
/// pages); smaller buffers are left alone.
pub const HUGE_PAGE: usize = 2 << 20;

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// The VmFlags of the mapping holding `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let head = line.split_whitespace().next().unwrap_or("");
            if let Some((lo, hi)) = head.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
                continue;
            }
            if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
                return Some(flags.trim().to_owned());
            }
        }
        None
    }

    #[test]
    fn a_large_repack_buffer_is_zeroed_and_advised_huge() {
        if !Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            eprintln!("skipped: this kernel has no transparent huge pages");
            return;
        }
        let mut v = huge_zeroed(8 * HUGE_PAGE);
        assert_eq!(v.len(), 8 * HUGE_PAGE);
        assert!(v.iter().all(|&b| b == 0));
        v.iter_mut().for_each(|b| *b = 7);
        let middle = v.as_ptr() as usize + 4 * HUGE_PAGE;
        let flags = vm_flags(middle).expect("the buffer's mapping in smaps");
        assert!(
            flags.split_whitespace().any(|f| f == "hg"),
            "the buffer is not advised MADV_HUGEPAGE: VmFlags {flags}"
        );
        // A small buffer is left alone (and is still zeroed).
        assert!(huge_zeroed(1000).iter().all(|&b| b == 0));
    }

    #[test]
    fn arena_pieces_are_disjoint_aligned_and_shared() {
        // Small pieces (as a 2B4T shape's k/v projections) whose sum needs
        // huge pages: the one buffer is advised as a whole.
        let lens = [1000, 333_333, 64, 0, 5 * HUGE_PAGE / 2, 1];
        let mut arena = Arena::new(&lens);
        let pieces = arena.pieces_mut();
        assert_eq!(pieces.len(), lens.len());
        let base = pieces[0].as_ptr() as usize;
        for (i, (p, &len)) in pieces.into_iter().zip(&lens).enumerate() {
            assert_eq!(p.len(), len);
            assert_eq!((p.as_ptr() as usize - base) % 64, 0, "piece {i}");
            assert!(p.iter().all(|&b| b == 0), "piece {i} zeroed");
            p.fill(i as u8 + 1);
        }
        let shared = arena.share();
        for (i, b) in shared.iter().enumerate() {
            assert!(b.is_shared() && !b.is_mapped());
            assert_eq!(b.len(), lens[i]);
            assert!(b.iter().all(|&x| x == i as u8 + 1), "piece {i} kept");
        }
        // A slice shares the buffer; make_mut copies, leaving the rest.
        let mut tail = shared[1].slice(10..20);
        assert!(tail.is_shared() && tail.len() == 10);
        tail.make_mut()[0] = 99;
        assert!(!tail.is_shared() && tail[0] == 99 && shared[1][10] == 2);
        if Path::new("/sys/kernel/mm/transparent_hugepage/enabled").exists() {
            let inside = shared[1].as_ptr() as usize + 200_000;
            let flags = vm_flags(inside).expect("the arena in smaps");
            assert!(
                flags.split_whitespace().any(|f| f == "hg"),
                "a small piece lies in an advised buffer: VmFlags {flags}"
            );
        }
    }
}
