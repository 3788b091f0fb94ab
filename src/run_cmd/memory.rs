//! The memory a run will need, from its plan, checked against the machine and `--max-memory`
//! before anything large is allocated: a run that cannot fit is refused with the figure instead
//! of dying in the allocator.

use super::RunArgs;
use crate::Failure;
use anyhow::anyhow;
use tpc::emit::plan::bytes as human;
use tpc::ir::{Graph, Op, Space, ValueId};
use tpc::plan::liveness::peak_live;
use tpc::plan::Plan;

/// Bytes per element as the executor holds it (every float dtype is computed in f32).
const ELEM: u128 = 4;

/// The process itself: code, allocator arenas, thread stacks, kernel scratch (measured: maximum
/// RSS of `tpc run mlp.tpl` exceeds the values it holds by 40-50 MiB at 2-8 ranks).
const PROCESS: u128 = 48 << 20;

/// What a run holds, in bytes. The sharded run and the --check reference come one after the
/// other: the peak is the larger of the two phases, plus what lives through both.
#[derive(Debug, Default, PartialEq)]
pub struct Need {
    /// One rank: its leaves, its peak of live values and its outputs.
    pub per_rank: u128,
    /// Ranks in this process.
    pub ranks: u128,
    /// The global outputs assembled from the ranks' blocks.
    pub assembled: u128,
    /// The --check reference: the whole leaves, its peak of live values and its outputs.
    pub reference: u128,
    /// Arrays loaded from .npz, held whole for the whole run.
    pub arrays: u128,
    /// The stored step times (8 bytes per step per rank).
    pub step_times: u128,
}

impl Need {
    /// The peak: the run phase or the check phase, whichever is larger, plus what both hold.
    pub fn total(&self) -> u128 {
        let run = self.per_rank.saturating_mul(self.ranks);
        PROCESS
            .saturating_add(self.arrays)
            .saturating_add(self.step_times)
            .saturating_add(self.assembled)
            .saturating_add(run.max(self.reference))
    }
}

/// Bytes of one value of `g` as the executor holds it.
fn bytes<S: Space>(g: &Graph<S>, v: ValueId<S>) -> u128 {
    u128::from(g.ty(v).numel()) * ELEM
}

/// Leaves, peak of live non-leaf values (liveness in program order), and outputs of `g`.
fn program<S: Space>(g: &Graph<S>) -> (u128, u128, u128) {
    let is_leaf = |op: &Op| op.is_leaf();
    let (leaves, peak) = peak_live(g, is_leaf, |v| bytes(g, v));
    let outputs = g
        .outputs()
        .iter()
        .fold(0u128, |acc, o| acc.saturating_add(bytes(g, o.value)));
    (leaves, peak, outputs)
}

/// The memory `plan` needs with these arguments, `ranks` of it in this process.
pub fn need(plan: &Plan, args: &RunArgs, ranks: u64) -> Need {
    let (leaves, peak, outputs) = program(&plan.local);
    let (g_leaves, g_peak, g_outputs) = program(&plan.global);
    let loaded = args.params.is_some() || args.inputs.is_some();
    Need {
        per_rank: leaves.saturating_add(peak).saturating_add(outputs),
        ranks: ranks as u128,
        assembled: g_outputs,
        reference: if args.check {
            g_leaves.saturating_add(g_peak).saturating_add(g_outputs)
        } else {
            0
        },
        arrays: if loaded { g_leaves } else { 0 },
        step_times: (args.repeat as u128).saturating_mul(8 * (ranks as u128 + 1)),
    }
}

/// Refuses a run whose needs exceed the available memory or `max_memory` (`--max-memory`).
pub fn check_fits(
    plan: &Plan,
    args: &RunArgs,
    max_memory: Option<u128>,
    ranks: u64,
) -> Result<(), Failure> {
    let need = need(plan, args, ranks);
    let total = need.total();
    let limit = max_memory.map(|m| (m, format!("--max-memory is {}", human(m))));
    let avail = available().map(|(b, what)| (b, format!("{} is available ({what})", human(b))));
    for (max, said) in [limit, avail].into_iter().flatten() {
        if total > max {
            let mut fixes = vec!["use a smaller --set", "fewer devices per machine (MPI)"];
            if args.check {
                fixes.push("leave out --check");
            }
            if need.step_times >= 1 << 20 {
                fixes.push("a smaller --repeat");
            }
            return Err(anyhow!(
                "this run needs about {} ({}), but {said}: {}",
                human(total),
                breakdown(&need),
                or_list(&fixes)
            )
            .into());
        }
    }
    Ok(())
}

/// `a, b or c`.
fn or_list(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => one.to_string(),
        [rest @ .., last] => format!("{} or {last}", rest.join(", ")),
    }
}

/// `1.2 GiB per rank x 8 ranks + 64.0 MiB of assembled outputs + ...`.
fn breakdown(n: &Need) -> String {
    let mut parts = vec![
        format!("{} per rank x {} ranks", human(n.per_rank), n.ranks),
        format!("{} for the process", human(PROCESS)),
    ];
    if n.assembled > 0 {
        parts.push(format!("{} of assembled outputs", human(n.assembled)));
    }
    if n.reference > 0 {
        parts.push(format!(
            "{} for the --check reference after the run",
            human(n.reference)
        ));
    }
    if n.arrays > 0 {
        parts.push(format!("{} of .npz arrays", human(n.arrays)));
    }
    if n.step_times >= 1 << 20 {
        parts.push(format!("{} of step times", human(n.step_times)));
    }
    parts.join(" + ")
}

/// The memory this process can still take: the least of MemAvailable and a cgroup's room.
fn available() -> Option<(u128, &'static str)> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        let line = t.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some((kb * 1024, "MemAvailable in /proc/meminfo"))
    });
    let read = |p: &str| -> Option<u128> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    let cgroup = read("/sys/fs/cgroup/memory.max").map(|max| {
        let used = read("/sys/fs/cgroup/memory.current").unwrap_or(0);
        (max.saturating_sub(used), "the cgroup's memory.max")
    });
    [meminfo, cgroup]
        .into_iter()
        .flatten()
        .min_by_key(|(b, _)| *b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_read_in_binary_units() {
        assert_eq!(human(512u128), "512 B");
        assert_eq!(human(1536u128), "1.5 KiB");
        assert_eq!(human(16u128 << 30), "16.0 GiB");
        assert_eq!(human(3u128 << 60), "3.0 EiB");
        assert_eq!(human(1u128 << 80), "1024.0 ZiB");
    }
}
