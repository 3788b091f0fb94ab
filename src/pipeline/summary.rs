//! The costs of a pipelined step: per stage its forward and backward time for one microbatch,
//! its once-per-step time, its params and stashed activations; the boundary messages; and the
//! schedule timed by the cost model, giving the bubble and the step time's split.

use super::schedule::{self, Action, Durations};
use super::stages::{node_costs, Crossing, Cut, StageError, Transfer, Where};
use crate::cost::CollectiveKind;
use crate::ir::{Graph, Local, Op, Phase};
use crate::mesh::Device;
use crate::plan::micro::Microbatches;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// One stage's costs (per device of the stage).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageSummary {
    /// The stage.
    pub stage: u32,
    /// Its instances `start..end` of the pipelined block.
    pub instances: (u32, u32),
    /// Seconds of one microbatch's forward (compute and the stage's own collectives).
    pub forward_s: f64,
    /// Seconds of one microbatch's backward.
    pub backward_s: f64,
    /// Of those, seconds in tp/dp collectives (forward, backward).
    pub collective_s: (f64, f64),
    /// Seconds of the once-per-step part (gradient reductions, update).
    pub step_s: f64,
    /// Bytes of the params this stage holds.
    pub param_bytes: u64,
    /// Bytes of one microbatch's activations kept from its forward for its backward.
    pub activation_bytes_per_microbatch: u64,
    /// Most microbatches whose activations the schedule holds at once.
    pub peak_activation_microbatches: u32,
    /// `activation_bytes_per_microbatch` × `peak_activation_microbatches`.
    pub activation_bytes: u64,
    /// Bytes of optimizer state this stage holds (Adam's moments, momentum).
    pub optimizer_bytes: u64,
    /// Bytes of the gradients of this stage's trained params (accumulated over the
    /// microbatches).
    pub gradient_bytes: u64,
    /// Params, gradients, optimizer state and the held activations: the stage's memory
    /// before the transient values of the running pass.
    pub memory_bytes: u64,
}

/// A boundary message between adjacent stages, per microbatch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageSummary {
    /// Sending stage.
    pub from: u32,
    /// Receiving stage.
    pub to: u32,
    /// `forward` (activations) or `backward` (their gradients).
    pub dir: schedule::Dir,
    /// Values it carries.
    pub values: usize,
    /// Bytes per microbatch.
    pub bytes: u64,
}

/// The costs of a pipelined step.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PipelineSummary {
    /// Number of stages.
    pub stages: u32,
    /// Microbatches per step.
    pub microbatches: u32,
    /// Idle share of the schedule's time (all stages).
    pub bubble_fraction: f64,
    /// Per stage, the most microbatches in flight (forward done, backward not).
    pub peak_activation_microbatches: Vec<u32>,
    /// Boundary messages sent per step (forward and backward, all stages).
    pub sends_per_step: u64,
    /// The boundary messages.
    pub messages: Vec<MessageSummary>,
    /// Values sent once per step between stages (e.g. a tied weight's gradient).
    pub step_transfers: usize,
    /// Seconds of the schedule (first forward to last backward).
    pub schedule_s: f64,
    /// Estimated step time: the schedule plus the slowest once-per-step part.
    pub step_time_s: f64,
    /// Of the busiest stage's step: compute, communication and idle (bubble) seconds.
    pub split_s: (f64, f64, f64),
    /// Per stage.
    pub per_stage: Vec<StageSummary>,
}

/// The summary of `cut` under `actions`.
pub fn compute(
    g: &Graph<Local>,
    parts: &Microbatches,
    cut: &Cut,
    transfers: &[Transfer],
    actions: &[Vec<Action>],
    dev: &Device,
) -> Result<PipelineSummary, StageError> {
    let p = cut.instances.len();
    let runs = runs_on(g, &cut.place);
    let costs = node_costs(g, dev);
    let peak = schedule::peak_in_flight(actions);
    let mut per_stage: Vec<StageSummary> = (0..p)
        .map(|s| StageSummary {
            stage: s as u32,
            instances: cut.instances[s],
            peak_activation_microbatches: peak.get(s).copied().unwrap_or(0),
            ..StageSummary::default()
        })
        .collect();
    add_times(g, parts, &runs, &costs, &mut per_stage);
    add_memory(g, parts, &runs, &mut per_stage);
    let messages = messages(g, transfers, p);
    let durations = durations(&per_stage, &messages, dev);
    let timeline =
        schedule::simulate(actions, &durations).map_err(|e| StageError::Internal(e.to_string()))?;
    let m = parts.count as f64;
    let busiest = per_stage
        .iter()
        .max_by(|a, b| (a.forward_s + a.backward_s).total_cmp(&(b.forward_s + b.backward_s)))
        .cloned()
        .unwrap_or_default();
    let busy = m * (busiest.forward_s + busiest.backward_s);
    let comm = m * (busiest.collective_s.0 + busiest.collective_s.1);
    let step = per_stage.iter().map(|s| s.step_s).fold(0.0, f64::max);
    Ok(PipelineSummary {
        stages: p as u32,
        microbatches: parts.count as u32,
        bubble_fraction: schedule::bubble_fraction(&timeline),
        peak_activation_microbatches: peak,
        sends_per_step: timeline.arrows.len() as u64,
        messages,
        step_transfers: transfers
            .iter()
            .filter(|t| matches!(t.crossing, Crossing::Step | Crossing::Carry))
            .count(),
        schedule_s: timeline.makespan,
        step_time_s: timeline.makespan + step,
        split_s: (busy - comm, comm, (timeline.makespan - busy).max(0.0)),
        per_stage,
    })
}

/// The schedule's durations: each stage's forward and backward of one microbatch, and a
/// message's time (latency plus the largest message at the link's bandwidth).
pub fn durations(
    per_stage: &[StageSummary],
    messages: &[MessageSummary],
    dev: &Device,
) -> Durations {
    let biggest = messages.iter().map(|m| m.bytes).max().unwrap_or(0) as f64;
    Durations {
        forward: per_stage.iter().map(|s| s.forward_s).collect(),
        backward: per_stage.iter().map(|s| s.backward_s).collect(),
        p2p: dev.latency + biggest / dev.bandwidth,
    }
}

/// Per local node, the stages that run it: its own, or (run everywhere) those of its readers.
pub fn runs_on(g: &Graph<Local>, place: &[Where]) -> Vec<BTreeSet<u32>> {
    let output_maker: BTreeSet<usize> = g
        .outputs()
        .iter()
        .map(|o| g.value(o.value).node.index())
        .collect();
    let mut runs: Vec<BTreeSet<u32>> = place
        .iter()
        .map(|w| match w {
            Where::Stage(s) => BTreeSet::from([*s]),
            Where::Everywhere => BTreeSet::new(),
        })
        .collect();
    for i in (0..g.num_nodes()).rev() {
        if place[i] != Where::Everywhere {
            continue;
        }
        let n = g.node(crate::ir::NodeId::new(i));
        let mut here = BTreeSet::new();
        for &o in &n.outputs {
            for u in g.users(o) {
                here.extend(runs[u.index()].iter().copied());
            }
        }
        // Made for an output alone: stage 0 makes it.
        if here.is_empty() && output_maker.contains(&i) {
            here.insert(0);
        }
        runs[i] = here;
    }
    runs
}

/// Per output, the stage whose blocks are the step's result: its maker's stage (the first
/// that runs a maker placed everywhere).
pub fn owners(g: &Graph<Local>, runs: &[BTreeSet<u32>]) -> Vec<u32> {
    g.outputs()
        .iter()
        .map(|o| {
            let i = g.value(o.value).node.index();
            runs[i].first().copied().unwrap_or(0)
        })
        .collect()
}

/// Forward, backward and step seconds per stage.
fn add_times(
    g: &Graph<Local>,
    parts: &Microbatches,
    runs: &[BTreeSet<u32>],
    costs: &[f64],
    per_stage: &mut [StageSummary],
) {
    for (id, n) in g.nodes() {
        let i = id.index();
        if n.op.is_leaf() || parts.accumulate[i] {
            continue;
        }
        let comm = CollectiveKind::of(&n.op).is_some();
        let backward = g.region(n.region).phase == Phase::Backward;
        for &s in &runs[i] {
            let st = &mut per_stage[s as usize];
            match (parts.step[i], backward) {
                (true, _) => st.step_s += costs[i],
                (false, false) => {
                    st.forward_s += costs[i];
                    st.collective_s.0 += if comm { costs[i] } else { 0.0 };
                }
                (false, true) => {
                    st.backward_s += costs[i];
                    st.collective_s.1 += if comm { costs[i] } else { 0.0 };
                }
            }
        }
    }
}

/// Params held and activations stashed per stage.
fn add_memory(
    g: &Graph<Local>,
    parts: &Microbatches,
    runs: &[BTreeSet<u32>],
    per_stage: &mut [StageSummary],
) {
    let backward_reader = |v| {
        g.users(v)
            .iter()
            .any(|u| g.region(g.node(*u).region).phase == Phase::Backward && !parts.step[u.index()])
    };
    use crate::autodiff::{optimizer::leaf_of_next, param_of_grad};
    // A trained param's gradient is held where its update (or gradient output) is made.
    let trained: std::collections::BTreeMap<&str, &BTreeSet<u32>> = g
        .outputs()
        .iter()
        .filter_map(|o| {
            let name = param_of_grad(&o.name).or_else(|| leaf_of_next(&o.name))?;
            Some((name, &runs[g.value(o.value).node.index()]))
        })
        .collect();
    for (id, n) in g.nodes() {
        let i = id.index();
        let bytes: u64 = n.outputs.iter().map(|v| g.ty(*v).size_bytes()).sum();
        for &s in &runs[i] {
            let st = &mut per_stage[s as usize];
            if let Op::Param { name } = &n.op {
                st.param_bytes = st.param_bytes.saturating_add(bytes);
                if trained.get(name.as_str()).is_some_and(|at| at.contains(&s)) {
                    st.gradient_bytes = st.gradient_bytes.saturating_add(bytes);
                }
            } else if matches!(n.op, Op::State { .. }) {
                st.optimizer_bytes = st.optimizer_bytes.saturating_add(bytes);
            } else if !n.op.is_leaf()
                && !parts.step[i]
                && g.region(n.region).phase == Phase::Forward
                && n.outputs.iter().any(|&v| backward_reader(v))
            {
                st.activation_bytes_per_microbatch =
                    st.activation_bytes_per_microbatch.saturating_add(bytes);
            }
        }
    }
    for st in per_stage.iter_mut() {
        st.activation_bytes = st
            .activation_bytes_per_microbatch
            .saturating_mul(u64::from(st.peak_activation_microbatches));
        st.memory_bytes = [st.activation_bytes, st.optimizer_bytes, st.gradient_bytes]
            .iter()
            .fold(st.param_bytes, |a, b| a.saturating_add(*b));
    }
}

/// The boundary messages: each per-microbatch transfer rides every boundary between its stages.
fn messages(g: &Graph<Local>, transfers: &[Transfer], p: usize) -> Vec<MessageSummary> {
    let mut fwd = vec![(0usize, 0u64); p.saturating_sub(1)];
    let mut bwd = vec![(0usize, 0u64); p.saturating_sub(1)];
    for t in transfers {
        let bytes = g.ty(t.value).size_bytes();
        let (lo, hi) = (t.from.min(t.to) as usize, t.from.max(t.to) as usize);
        let table = match t.crossing {
            Crossing::Forward => &mut fwd,
            Crossing::Backward => &mut bwd,
            Crossing::Step | Crossing::Carry => continue,
        };
        for e in &mut table[lo..hi] {
            e.0 += 1;
            e.1 = e.1.saturating_add(bytes);
        }
    }
    let edge = |k: usize, dir, (values, bytes): (usize, u64)| {
        let (from, to) = match dir {
            schedule::Dir::Forward => (k as u32, k as u32 + 1),
            schedule::Dir::Backward => (k as u32 + 1, k as u32),
        };
        MessageSummary {
            from,
            to,
            dir,
            values,
            bytes,
        }
    };
    let f = fwd
        .into_iter()
        .enumerate()
        .map(|(k, e)| edge(k, schedule::Dir::Forward, e));
    let b = bwd
        .into_iter()
        .enumerate()
        .map(|(k, e)| edge(k, schedule::Dir::Backward, e));
    f.chain(b).collect()
}
