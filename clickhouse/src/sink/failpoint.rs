//! Fail points: `TALLY_SINK_FAILPOINT=<name>` aborts the process at that point, after
//! skipping `TALLY_SINK_FAILPOINT_SKIP` hits (default 0). Tests crash the sink with
//! them; the names are listed in the module docs of [`super`].
use std::sync::atomic::{AtomicU64, Ordering};

/// Whether `name` is the configured fail point (one that shapes the state it crashes
/// in, e.g. `after-ids`).
pub(super) fn armed(name: &str) -> bool {
    std::env::var("TALLY_SINK_FAILPOINT").as_deref() == Ok(name)
}

/// Aborts the process if `name` is the configured fail point (and its skips are used).
pub(super) fn failpoint(name: &str) {
    static HITS: AtomicU64 = AtomicU64::new(0);
    if armed(name) {
        let skip: u64 = std::env::var("TALLY_SINK_FAILPOINT_SKIP")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if HITS.fetch_add(1, Ordering::SeqCst) >= skip {
            eprintln!("tally-sink: failpoint {name} hit, aborting");
            std::process::abort();
        }
    }
}
