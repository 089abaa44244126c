//! The compute pool: the rayon threads that run the matrix products of
//! `trine node`, `generate`, `perplexity` and the benchmarks.
//!
//! By default one thread per physical core this process may use: a second
//! hyper-thread on a core shares its vector units and its load ports, so it
//! adds contention, not throughput, to kernels that are bound by them or by
//! memory. `--pin-threads` binds thread i to the i-th such core, so a
//! thread's share of the rows stays in one core's caches.

use std::collections::HashSet;

/// Logical CPUs this process may use (affinity mask, cgroup quota).
pub fn logical_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The default thread count: the logical CPUs this process may use,
/// capped at the machine's physical cores.
pub fn default_threads() -> usize {
    logical_cpus().min(num_cpus::get_physical()).max(1)
}

/// One allowed logical CPU per physical core, in CPU order: where pinned
/// threads go. A CPU whose topology cannot be read counts as its own core.
pub fn pin_targets() -> Vec<core_affinity::CoreId> {
    let Some(ids) = core_affinity::get_core_ids() else {
        return Vec::new();
    };
    let mut seen = HashSet::new();
    ids.into_iter()
        .filter(|c| {
            let topo = |f: &str| {
                std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu{}/topology/{f}", c.id))
                    .ok()
                    .map(|s| s.trim().to_string())
            };
            match (topo("physical_package_id"), topo("core_id")) {
                (Some(p), Some(k)) => seen.insert((p, k)),
                _ => true,
            }
        })
        .collect()
}

/// A pool of `threads` workers (default: [`default_threads`]), each bound
/// to its own physical core when `pin` is set and the OS allows it (a
/// refusal is logged once per thread, and the thread runs unpinned).
pub fn pool(threads: Option<usize>, pin: bool) -> anyhow::Result<rayon::ThreadPool> {
    let n = match threads {
        Some(0) => anyhow::bail!("--threads 0: give at least 1"),
        Some(n) => n,
        None => default_threads(),
    };
    let targets = if pin { pin_targets() } else { Vec::new() };
    if pin && targets.is_empty() {
        tracing::warn!("--pin-threads: this OS did not list the CPUs; the threads run unpinned");
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("trine-compute-{i}"))
        .start_handler(move |i| {
            if let Some(&core) = targets.get(i % targets.len().max(1))
                && !core_affinity::set_for_current(core)
            {
                tracing::warn!(thread = i, cpu = core.id, "cannot pin a compute thread");
            }
        })
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start {n} compute threads: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_at_most_the_physical_cores_and_the_allowed_cpus() {
        let n = default_threads();
        assert!(n >= 1);
        assert!(n <= logical_cpus());
        assert!(n <= num_cpus::get_physical());
    }

    #[test]
    fn pin_targets_are_distinct_allowed_cpus_one_per_core() {
        let t = pin_targets();
        let ids: HashSet<usize> = t.iter().map(|c| c.id).collect();
        assert_eq!(ids.len(), t.len(), "{t:?}");
        assert!(t.len() <= logical_cpus(), "{t:?}");
        assert!(t.len() <= num_cpus::get_physical(), "{t:?}");
    }

    /// A pinned pool's threads run on their own core: each reports the CPU
    /// it runs on, which is the one it was bound to.
    #[test]
    fn pinned_threads_run_where_they_were_put() {
        let targets = pin_targets();
        assert!(!targets.is_empty(), "Linux lists the allowed CPUs");
        let pool = pool(Some(targets.len()), true).unwrap();
        let on: Vec<(usize, Option<usize>)> = pool.broadcast(|ctx| (ctx.index(), current_cpu()));
        for (i, cpu) in on {
            assert_eq!(cpu, Some(targets[i].id), "thread {i}");
        }
    }

    /// The CPU the calling thread last ran on, from /proc/thread-self/stat
    /// (field 39).
    fn current_cpu() -> Option<usize> {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
        let after = stat.rsplit_once(')')?.1;
        after.split_whitespace().nth(36)?.parse().ok()
    }
}

/// `--amx`: whether prompts and batched decode steps go through AMX-INT8
/// tiles where the CPU has them (Intel Sapphire Rapids and later). The
/// output is the same bits either way.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Amx {
    /// Use them where the CPU has them and Linux grants the tile state.
    #[default]
    Auto,
    /// Never: batches take the AVX register tiles (to compare speeds).
    Off,
}

/// Applies `--amx` to this process and says what it means here: "on",
/// "off (--amx off)" or "absent (...)".
pub fn apply_amx(mode: Amx) -> &'static str {
    use trine_engine::kernels::amx;
    amx::set_enabled(mode == Amx::Auto);
    match mode {
        Amx::Off => "off (--amx off)",
        Amx::Auto if amx::usable() => "on",
        Amx::Auto => "absent (no AMX-INT8 on this CPU, or Linux < 5.16 refused the tile state)",
    }
}
