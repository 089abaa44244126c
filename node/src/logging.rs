//! Log setup: `tracing` to stderr, text or JSON, filtered by `log_level`.

use std::io::IsTerminal as _;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. `level` was validated with the config.
/// A second call (several nodes in one test process) keeps the first.
pub fn init(format: LogFormat, level: &str) {
    // openraft narrates every election and replication error at info/warn;
    // a node's log keeps its errors unless the filter names openraft.
    let level = if level.contains("openraft") {
        level.to_owned()
    } else {
        format!("{level},openraft=error")
    };
    let filter = EnvFilter::try_new(&level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .with_ansi(std::io::stderr().is_terminal());
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
    };
    // Already installed: fine in tests; the binary calls this once.
    drop(result);
}
