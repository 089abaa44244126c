//! The chain's archive: sealed runs of old blocks moved out of sled into
//! compressed, immutable segment files (`raft/chain/<first>-<last>.zst`).
//!
//! Every applied entry is a block, and the chain is the audit trail, so it
//! is never thrown away. Keeping all of it in sled would make sled's disk
//! use (and its in-memory page table) grow with the cluster's age. sled
//! therefore holds only the newest blocks (what snapshots and most reads
//! need); the rest lives here, about ten times smaller.
//!
//! A segment file is zstd (with its content checksum) over
//! `u32be(len) ‖ block JSON` records, in height order, with contiguous
//! heights `first..=last`. It is written to a temp file, fsynced and
//! renamed before the blocks leave sled, so a crash at any point leaves
//! every block in sled, in a segment, or in both (the copy in sled is then
//! dropped by the next archiving pass).

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::chain::Block;

/// Blocks per segment; segment boundaries are multiples of this (except
/// the first one of a chain that starts at a snapshot's height).
pub(crate) const SEGMENT_BLOCKS: u64 = 10_000;
/// The largest block record a segment may hold (a Raft entry is bounded by
/// the 64 MiB message limit; a block is its encoding plus summaries).
const MAX_RECORD: u32 = 256 << 20;
const EXT: &str = "zst";

#[derive(Debug)]
pub(super) struct Archive {
    dir: PathBuf,
    /// first height → last height of each segment.
    segments: RwLock<BTreeMap<u64, u64>>,
    /// The last segment read, decoded (reads walk the chain in order).
    cache: Mutex<Option<(u64, Arc<Vec<Block>>)>>,
}

fn segment_name(first: u64, last: u64) -> String {
    format!("{first:020}-{last:020}.{EXT}")
}

fn parse_name(name: &str) -> Option<(u64, u64)> {
    let stem = name.strip_suffix(&format!(".{EXT}"))?;
    let (a, b) = stem.split_once('-')?;
    let (first, last) = (a.parse().ok()?, b.parse().ok()?);
    (first <= last).then_some((first, last))
}

impl Archive {
    /// Opens (creating) the archive directory and indexes its segments;
    /// leftover temp files of an interrupted write are removed.
    pub(super) fn open(dir: PathBuf) -> Result<Self, String> {
        let ctx = |e: std::io::Error| format!("{}: {e}", dir.display());
        std::fs::create_dir_all(&dir).map_err(ctx)?;
        let mut segments = BTreeMap::new();
        for entry in std::fs::read_dir(&dir).map_err(ctx)? {
            let entry = entry.map_err(ctx)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".tmp") {
                std::fs::remove_file(entry.path()).map_err(ctx)?;
                continue;
            }
            let (first, last) = parse_name(&name).ok_or_else(|| {
                format!(
                    "{}: {name} is not a chain segment (<first>-<last>.{EXT}); move it out of the directory",
                    dir.display()
                )
            })?;
            segments.insert(first, last);
        }
        Ok(Self {
            dir,
            segments: RwLock::new(segments),
            cache: Mutex::new(None),
        })
    }

    fn index(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<u64, u64>> {
        self.segments
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn first(&self) -> Option<u64> {
        self.index().keys().next().copied()
    }

    /// The newest archived height.
    pub(super) fn last(&self) -> Option<u64> {
        self.index().values().next_back().copied()
    }

    pub(super) fn segment_count(&self) -> usize {
        self.index().len()
    }

    /// The segment holding `height`, as (first, last).
    pub(super) fn segment_of(&self, height: u64) -> Option<(u64, u64)> {
        let idx = self.index();
        let (&first, &last) = idx.range(..=height).next_back()?;
        (height <= last).then_some((first, last))
    }

    /// The first segment starting above `height` (to skip a hole).
    fn segment_after(&self, height: u64) -> Option<u64> {
        self.index()
            .range(height.saturating_add(1)..)
            .next()
            .map(|(f, _)| *f)
    }

    /// The archived block at `height`, if a segment holds it.
    pub(super) fn block(&self, height: u64) -> Result<Option<Block>, String> {
        let Some((first, last)) = self.segment_of(height) else {
            return Ok(None);
        };
        let blocks = self.load(first, last)?;
        let i = usize::try_from(height - first).map_err(|e| e.to_string())?;
        Ok(blocks.get(i).cloned())
    }

    /// The held height at or above `height` that is archived, if any.
    pub(super) fn next_held(&self, height: u64) -> Option<u64> {
        match self.segment_of(height) {
            Some(_) => Some(height),
            None => self.segment_after(height),
        }
    }

    fn load(&self, first: u64, last: u64) -> Result<Arc<Vec<Block>>, String> {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((f, blocks)) = cache.as_ref()
            && *f == first
        {
            return Ok(blocks.clone());
        }
        let path = self.dir.join(segment_name(first, last));
        let blocks = Arc::new(read_segment(&path, first, last)?);
        *cache = Some((first, blocks.clone()));
        Ok(blocks)
    }

    /// Seals `blocks` (contiguous, in order) as one segment: written, fsynced
    /// and renamed into place, then indexed.
    pub(super) fn write(&self, blocks: &[Block]) -> std::io::Result<()> {
        let (Some(first), Some(last)) = (blocks.first(), blocks.last()) else {
            return Ok(());
        };
        let (first, last) = (first.height, last.height);
        let path = self.dir.join(segment_name(first, last));
        let tmp = path.with_extension("tmp");
        let file = std::fs::File::create(&tmp)?;
        let mut z = zstd::stream::write::Encoder::new(file, 3)?;
        z.include_checksum(true)?;
        for b in blocks {
            let json = serde_json::to_vec(b).map_err(std::io::Error::other)?;
            let len = u32::try_from(json.len()).map_err(std::io::Error::other)?;
            z.write_all(&len.to_be_bytes())?;
            z.write_all(&json)?;
        }
        let file = z.finish()?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        std::fs::File::open(&self.dir)?.sync_all()?;
        self.segments
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(first, last);
        Ok(())
    }

    /// Removes every segment (a snapshot replaced the chain).
    pub(super) fn clear(&self) -> std::io::Result<()> {
        let mut idx = self
            .segments
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (&first, &last) in idx.iter() {
            match std::fs::remove_file(self.dir.join(segment_name(first, last))) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        idx.clear();
        *self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        std::fs::File::open(&self.dir)?.sync_all()
    }

    /// Bytes the segment files occupy.
    pub(super) fn disk_bytes(&self) -> u64 {
        self.index()
            .iter()
            .filter_map(|(f, l)| std::fs::metadata(self.dir.join(segment_name(*f, *l))).ok())
            .map(|m| m.len())
            .sum()
    }
}

/// Decodes one segment, checking that it holds exactly `first..=last`.
fn read_segment(path: &Path, first: u64, last: u64) -> Result<Vec<Block>, String> {
    let bad = |what: String| format!("chain segment {}: {what}", path.display());
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut z = zstd::stream::read::Decoder::new(file).map_err(|e| bad(e.to_string()))?;
    let mut blocks = Vec::new();
    let mut height = first;
    loop {
        let mut len = [0u8; 4];
        match z.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(bad(format!("{e} (the file is damaged)"))),
        }
        let len = u32::from_be_bytes(len);
        if len > MAX_RECORD {
            return Err(bad(format!(
                "record at height {height} claims {len} bytes (the file is damaged)"
            )));
        }
        // Read through `take`: the buffer grows with the bytes actually
        // there, never to a size the file merely claims.
        let mut json = Vec::new();
        (&mut z)
            .take(u64::from(len))
            .read_to_end(&mut json)
            .map_err(|e| bad(format!("{e} (the file is damaged)")))?;
        if json.len() != len as usize {
            return Err(bad(format!("record at height {height} is truncated")));
        }
        let block: Block = serde_json::from_slice(&json)
            .map_err(|e| bad(format!("block at height {height}: {e}")))?;
        if block.height != height {
            return Err(bad(format!(
                "holds height {} where {height} belongs",
                block.height
            )));
        }
        blocks.push(block);
        height += 1;
    }
    if height != last + 1 {
        return Err(bad(format!(
            "ends at height {} but its name says {last}",
            height.saturating_sub(1)
        )));
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::Tx;

    fn chain(from: u64, n: u64) -> Vec<Block> {
        let mut out: Vec<Block> = Vec::new();
        for h in from..from + n {
            let tx = Tx {
                kind: "note".into(),
                summary: format!("note {h}"),
                body: format!("{{\"n\":{h}}}").into_bytes(),
                principal: "test".into(),
                rejected: None,
            };
            out.push(Block::next(out.last(), h, 1, h, vec![tx]));
        }
        out
    }

    #[test]
    fn segments_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Archive::open(dir.path().join("chain")).expect("open");
        let blocks = chain(5, 30);
        a.write(&blocks[..10]).expect("write");
        a.write(&blocks[10..]).expect("write");
        assert_eq!((a.first(), a.last()), (Some(5), Some(34)));
        let a = Archive::open(dir.path().join("chain")).expect("reopen");
        for b in &blocks {
            assert_eq!(a.block(b.height).expect("read").as_ref(), Some(b));
        }
        assert_eq!(a.block(4).expect("read"), None);
        assert_eq!(a.block(35).expect("read"), None);
        assert_eq!(a.next_held(0), Some(5));
        assert_eq!(a.next_held(20), Some(20));
        assert_eq!(a.next_held(35), None);
    }

    #[test]
    fn a_damaged_segment_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Archive::open(dir.path().to_path_buf()).expect("open");
        a.write(&chain(0, 50)).expect("write");
        let path = dir.path().join(segment_name(0, 49));
        let mut bytes = std::fs::read(&path).expect("read");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x5a;
        std::fs::write(&path, bytes).expect("write");
        let a = Archive::open(dir.path().to_path_buf()).expect("reopen");
        let e = a.block(10).expect_err("damage must be reported");
        assert!(e.contains(&segment_name(0, 49)), "{e}");
    }

    #[test]
    fn a_segment_missing_blocks_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Archive::open(dir.path().to_path_buf()).expect("open");
        a.write(&chain(0, 10)).expect("write");
        // Rename it so its name claims more than it holds.
        std::fs::rename(
            dir.path().join(segment_name(0, 9)),
            dir.path().join(segment_name(0, 10)),
        )
        .expect("rename");
        let a = Archive::open(dir.path().to_path_buf()).expect("reopen");
        let e = a.block(3).expect_err("short segment");
        assert!(e.contains("ends at height 9"), "{e}");
    }

    #[test]
    fn stray_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("notes.txt"), b"x").expect("write");
        let e = Archive::open(dir.path().to_path_buf()).expect_err("stray file");
        assert!(e.contains("notes.txt"), "{e}");
        std::fs::remove_file(dir.path().join("notes.txt")).expect("rm");
        std::fs::write(dir.path().join("x.tmp"), b"x").expect("write");
        Archive::open(dir.path().to_path_buf()).expect("temp files are cleaned up");
        assert!(!dir.path().join("x.tmp").exists());
    }
}
