//! openraft's own storage conformance suite, run on the sled store in a
//! fresh temp dir per case.

use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;
use trine_control::store::{self, LogStore, StateMachine};
use trine_control::{NodeId, TypeConfig};

struct Sled;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Sled {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<NodeId>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = store::open(dir.path()).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn sled_store_passes_openraft_suite() {
    if let Err(e) = Suite::test_all(Sled) {
        panic!("openraft's storage suite failed on the sled store: {e}");
    }
}
