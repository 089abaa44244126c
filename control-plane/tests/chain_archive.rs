//! The chain archive: old blocks leave sled in sealed segments when a
//! snapshot is built, and stay readable and verifiable from there, across
//! a reopen; damage to a segment is reported at its height.

use anyhow::{Context as _, Result, ensure};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder as _};
use trine_control::store::{self, CHAIN_SEGMENT_BLOCKS, SNAPSHOT_CHAIN_TAIL};
use trine_control::{Batch, Command, Request, TypeConfig, chain};

fn note(index: u64) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Batch {
            requests: vec![Request {
                time_ms: 1_700_000_000_000 + index,
                principal: "test".into(),
                command: Command::Note {
                    text: format!("entry {index}"),
                },
            }],
            id: 0,
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_blocks_move_to_segments_and_stay_verifiable() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let head = 3 * CHAIN_SEGMENT_BLOCKS + SNAPSHOT_CHAIN_TAIL / 2;
    let before = {
        let (_log, mut sm) = store::open(dir.path())?;
        for from in (1..=head).step_by(1000) {
            sm.apply((from..(from + 1000).min(head + 1)).map(note))
                .await?;
        }
        let reader = sm.reader();
        let block = reader
            .block(7)
            .map_err(anyhow::Error::msg)?
            .context("block 7 before archiving")?;
        ensure!(
            reader.archive_bytes().1 == 0,
            "nothing is archived before a snapshot"
        );
        sm.build_snapshot().await?;
        let (bytes, segments) = reader.archive_bytes();
        // Heights below align_down(head - tail, segment) are archived.
        let cutoff = (head - SNAPSHOT_CHAIN_TAIL) / CHAIN_SEGMENT_BLOCKS * CHAIN_SEGMENT_BLOCKS;
        ensure!(
            segments as u64 == cutoff / CHAIN_SEGMENT_BLOCKS,
            "{segments} segments for a cutoff of {cutoff}"
        );
        ensure!(bytes > 0);
        ensure!(
            reader.hot_first_height() == Some(cutoff),
            "sled still holds from {:?}, not from {cutoff}",
            reader.hot_first_height()
        );
        ensure!(
            reader.block(7).map_err(anyhow::Error::msg)?.as_ref() == Some(&block),
            "archived block 7 reads back"
        );
        ensure!(reader.first_height() == Some(1));
        let v = chain::verify(reader.blocks(1, usize::MAX))?;
        ensure!(v.blocks == head, "verified {} of {head} blocks", v.blocks);
        // A read that starts inside the archive and ends in sled.
        let span: Vec<u64> = reader
            .blocks(cutoff - 2, 4)
            .map(|b| b.map(|b| b.height))
            .collect::<Result<_, _>>()
            .map_err(|(h, e)| anyhow::anyhow!("{h}: {e}"))?;
        ensure!(
            span == vec![cutoff - 2, cutoff - 1, cutoff, cutoff + 1],
            "{span:?}"
        );
        v.head
    };
    // Reopened from disk: same chain, same head.
    let (log, sm) = store::open(dir.path())?;
    let reader = sm.reader();
    let v = chain::verify(reader.blocks(0, usize::MAX))?;
    ensure!(v.head == before && v.blocks == head);
    ensure!(reader.head().map(|b| b.height) == Some(head));
    drop((log, sm, reader));

    // Damage inside the first segment is found, at a height it holds.
    let seg_dir = dir.path().join("chain");
    let first = std::fs::read_dir(&seg_dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .min()
        .context("a segment file")?;
    let mut bytes = std::fs::read(&first)?;
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&first, bytes)?;
    let (_log, sm) = store::open(dir.path())?;
    let reader = sm.reader();
    let e = chain::verify(reader.blocks(0, usize::MAX)).expect_err("a damaged segment");
    ensure!(
        e.height() >= 1 && e.height() < CHAIN_SEGMENT_BLOCKS,
        "reported at {} ({e})",
        e.height()
    );
    Ok(())
}
