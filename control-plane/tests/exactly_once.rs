//! A group of writes sent again (its sender's leader stepped down before
//! answering) is answered from the state machine's record, not applied
//! twice: right after, after a reopen from disk, and on a member that
//! caught up by snapshot. The record forgets groups older than its window.

use anyhow::{Context as _, Result, ensure};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder as _};
use trine_control::store::{self, RECENT_SPAN_MS};
use trine_control::{Batch, Command, Request, Response, Scope, TokenRecord, TypeConfig, chain};

const T0: u64 = 1_700_000_000_000;

fn entry(index: u64, batch: Batch) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(batch),
    }
}

fn group(id: u64, time_ms: u64, commands: Vec<Command>) -> Batch {
    Batch {
        requests: commands
            .into_iter()
            .map(|command| Request {
                time_ms,
                principal: "node:a".into(),
                command,
            })
            .collect(),
        id,
    }
}

fn note(text: &str) -> Command {
    Command::Note { text: text.into() }
}

fn token(name: &str) -> Command {
    Command::AddToken(Box::new(TokenRecord::new(
        name,
        format!("{:0>64}", name.len()),
        Scope::Admin,
    )))
}

/// Applies one entry and returns its answers.
async fn apply(sm: &mut store::StateMachine, e: Entry<TypeConfig>) -> Result<Vec<Response>> {
    sm.apply([e]).await?.pop().context("an answer per entry")
}

/// How many transactions of `kind` with `summary` the chain holds.
fn count(reader: &store::Reader, kind: &str, summary: &str) -> Result<usize> {
    let mut n = 0;
    for b in reader.blocks(0, usize::MAX) {
        let b = b.map_err(|(h, e)| anyhow::anyhow!("block {h}: {e}"))?;
        n += b
            .txs
            .iter()
            .filter(|t| t.kind == kind && t.summary.contains(summary))
            .count();
    }
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_sent_again_is_answered_from_the_record_not_applied_twice() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_log, mut sm) = store::open(dir.path())?;
    // A group with a command the state machine refuses the second time
    // (the token exists): a retry must get the first answers.
    let g = group(7, T0, vec![note("once"), token("ci"), token("ci")]);
    let first = apply(&mut sm, entry(1, g.clone())).await?;
    ensure!(first.len() == 3 && first.iter().all(|r| r.index == 1));
    ensure!(
        first[0].rejected.is_none() && first[1].rejected.is_none(),
        "{first:?}"
    );
    ensure!(first[2].rejected.is_some(), "{first:?}");
    let again = apply(&mut sm, entry(2, g.clone())).await?;
    ensure!(again == first, "a retry answered {again:?}, not {first:?}");
    // Another group with the same commands and another id is applied.
    let other = apply(&mut sm, entry(3, group(8, T0 + 1, vec![note("once")]))).await?;
    ensure!(other.len() == 1 && other[0].index == 3, "{other:?}");
    let reader = sm.reader();
    ensure!(count(&reader, "note", "once")? == 2);
    ensure!(count(&reader, "duplicate", "0000000000000007")? == 1);
    ensure!(reader.state().tokens.len() == 1);
    chain::verify(reader.blocks(0, usize::MAX))?;
    drop((_log, sm, reader));

    // Reopened from disk: the record came back with the state.
    let (_log, mut sm) = store::open(dir.path())?;
    let again = apply(&mut sm, entry(4, g.clone())).await?;
    ensure!(again == first, "after a reopen: {again:?}");
    ensure!(count(&sm.reader(), "note", "once")? == 2);

    // A member that catches up by snapshot knows the group too.
    let snap = sm.build_snapshot().await?;
    let fresh = tempfile::tempdir()?;
    let (_log2, mut sm2) = store::open(fresh.path())?;
    sm2.install_snapshot(&snap.meta, snap.snapshot).await?;
    let again = apply(&mut sm2, entry(5, g)).await?;
    ensure!(again == first, "after a snapshot: {again:?}");
    ensure!(sm2.reader().state().tokens.len() == 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_forgets_groups_older_than_its_window() -> Result<()> {
    let dir = tempfile::tempdir()?;
    {
        let (_log, mut sm) = store::open(dir.path())?;
        apply(&mut sm, entry(1, group(1, T0, vec![note("old")]))).await?;
        // Inside the window the group is still known.
        let late = T0 + RECENT_SPAN_MS - 1;
        apply(&mut sm, entry(2, group(2, late, vec![note("later")]))).await?;
        let r = apply(&mut sm, entry(3, group(1, late, vec![note("old")]))).await?;
        ensure!(r[0].index == 1, "{r:?}");
        // A block past the window drops it: sent again now, it applies.
        let past = T0 + RECENT_SPAN_MS + 1;
        apply(&mut sm, entry(4, group(3, past, vec![note("past")]))).await?;
    }
    // The drop was written to disk too.
    let (_log, mut sm) = store::open(dir.path())?;
    let r = apply(
        &mut sm,
        entry(5, group(1, T0 + 2 * RECENT_SPAN_MS, vec![note("old")])),
    )
    .await?;
    ensure!(r[0].index == 5, "{r:?}");
    ensure!(count(&sm.reader(), "note", "old")? == 2);
    // Entries without an id (written before ids existed) are never matched.
    for index in [6, 7] {
        let r = apply(
            &mut sm,
            entry(
                index,
                group(0, T0 + 3 * RECENT_SPAN_MS, vec![note("no id")]),
            ),
        )
        .await?;
        ensure!(r[0].index == index);
    }
    Ok(())
}
