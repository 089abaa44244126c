//! Receipts: every request a node answers for a client becomes a
//! [`Receipt`] on the chain. The node that took the request batches them —
//! up to [`trine_control::command::MAX_RECEIPTS`] or one second, whichever
//! comes first — and commits each batch as one `Receipts` command through
//! the leader. Until its batch commits, a receipt counts in
//! `trine_chain_pending_txs`; a crash loses at most those. On a clean stop
//! the node commits what it holds before leaving the cluster.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use trine_control::command::{MAX_RECEIPTS, Receipt};
use trine_control::{Command, ControlPlane};

/// How long a receipt waits for others to share its batch.
pub const BATCH_EVERY: Duration = Duration::from_secs(1);
/// Receipts waiting at most; more are dropped (and counted) rather than
/// held without bound while the cluster cannot commit.
const BUFFER: usize = 20_000;

/// Where finished requests leave their receipt.
#[derive(Debug, Clone)]
pub struct Receipts {
    tx: mpsc::Sender<Receipt>,
}

impl Receipts {
    pub fn record(&self, r: Receipt) {
        match self.tx.try_send(r) {
            Ok(()) => pending(1),
            Err(_) => {
                crate::metrics::receipt_dropped();
                tracing::warn!(
                    "the receipt buffer is full (the cluster is not committing); a receipt was dropped"
                );
            }
        }
    }
}

fn pending(delta: i64) {
    let g = metrics::gauge!(trine_control::metrics::CHAIN_PENDING_TXS);
    if delta >= 0 {
        g.increment(delta as f64);
    } else {
        g.decrement((-delta) as f64);
    }
}

/// Starts the batcher; it commits what it holds and ends when `stop` turns
/// true.
pub fn start(
    control: ControlPlane,
    mut stop: watch::Receiver<bool>,
) -> (Receipts, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<Receipt>(BUFFER);
    let task = tokio::spawn(async move {
        let principal = control.principal();
        loop {
            let first = tokio::select! {
                r = rx.recv() => r,
                _ = stop.wait_for(|s| *s) => None,
            };
            let Some(first) = first else {
                // Stopping: whatever is still queued goes in one last batch.
                let mut rest = Vec::new();
                while let Ok(r) = rx.try_recv() {
                    rest.push(r);
                }
                for chunk in rest.chunks(MAX_RECEIPTS) {
                    commit(&control, &principal, chunk.to_vec()).await;
                }
                return;
            };
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + BATCH_EVERY;
            while batch.len() < MAX_RECEIPTS {
                tokio::select! {
                    r = rx.recv() => match r {
                        Some(r) => batch.push(r),
                        None => break,
                    },
                    () = tokio::time::sleep_until(deadline) => break,
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
            commit(&control, &principal, batch).await;
        }
    });
    (Receipts { tx }, task)
}

/// Commits one batch, retrying a few times (a leader change); gives up
/// with a warning.
async fn commit(control: &ControlPlane, principal: &str, batch: Vec<Receipt>) {
    let n = batch.len();
    let command = Command::Receipts { receipts: batch };
    for attempt in 0..5u32 {
        match control.propose(principal, command.clone()).await {
            Ok(r) if r.rejected.is_none() => {
                pending(-(n as i64));
                crate::metrics::receipts_committed(n as u64);
                return;
            }
            Ok(r) => {
                tracing::warn!(reason = ?r.rejected, receipts = n, "the chain refused a receipt batch");
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, attempt, "cannot commit receipts yet; retrying");
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        }
    }
    pending(-(n as i64));
    for _ in 0..n {
        crate::metrics::receipt_dropped();
    }
    tracing::warn!(
        receipts = n,
        "receipts lost: the cluster did not commit them"
    );
}
