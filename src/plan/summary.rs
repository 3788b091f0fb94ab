//! The plan's cost summary, recomputed from the listed program so it always agrees with it.

use crate::cost::{compute_time, flops, CollectiveKind};
use crate::ir::{Graph, Local, Op, Phase};
use crate::mesh::{Device, Mesh};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Count and bytes sent per device of one collective kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KindSummary {
    /// Number of collectives of this kind.
    pub count: u64,
    /// Bytes each device sends for them (ring algorithms).
    pub bytes_per_device: u64,
}

/// The collectives of one phase of a training step, every kind listed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PhaseSummary {
    /// Per collective kind, count and bytes sent per device.
    pub collectives: BTreeMap<String, KindSummary>,
}

/// Bytes each device holds, by what they are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MemorySummary {
    /// The params' blocks.
    pub params: u64,
    /// The trained params' gradients (0 for a forward program).
    pub grads: u64,
    /// Optimizer state (Adam's moments, SGD's momentum).
    pub optimizer: u64,
    /// The f32 master weights of 16-bit trained params.
    #[serde(default)]
    pub master: u64,
    /// Forward values the backward still needs when it starts (0 without a backward).
    pub activations: u64,
    /// Params and optimizer state (resident across steps) plus the largest set of live values.
    pub peak: u64,
}

/// The cost summary of a plan (per device).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Every collective kind, with count 0 when unused.
    pub collectives: BTreeMap<String, KindSummary>,
    /// FLOPs each device runs.
    pub flops_per_device: f64,
    /// Bytes of params each device holds.
    pub param_bytes_per_device: u64,
    /// Params plus the largest set of live activations, in bytes.
    pub peak_memory_bytes_per_device: u64,
    /// Estimated communication time (alpha-beta, ring).
    pub comm_time_s: f64,
    /// Estimated compute time at the device's FLOP rate.
    pub compute_time_s: f64,
    /// comm_time_s + compute_time_s.
    pub estimated_time_s: f64,
    /// The collectives of each phase: `forward`, `backward` and `update`.
    #[serde(default)]
    pub phases: BTreeMap<String, PhaseSummary>,
    /// Memory per device by kind.
    #[serde(default)]
    pub memory_bytes_per_device: MemorySummary,
    /// With microbatches: how they are accumulated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub microbatches: Option<MicrobatchSummary>,
    /// With pipeline stages: their costs (bubble, in-flight microbatches, memory per stage),
    /// the same as the plan's `pipeline.summary`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<crate::pipeline::PipelineSummary>,
    /// With `--recompute` other than none: what recompute costs and saves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recompute: Option<super::remat::RecomputeSummary>,
    /// With `--zero 1|2|3`: what was split over `dp`, and the memory per param.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zero: Option<ZeroMemory>,
}

/// ZeRO's layout and its memory per param.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ZeroMemory {
    /// The stage, the `dp` degree and which params were split.
    #[serde(flatten)]
    pub layout: super::zero::ZeroSummary,
    /// Elements of params each device would hold without ZeRO (the "per param" divisor).
    pub param_elements: u64,
    /// Bytes of params, gradients and per-param optimizer state (not the scalar `step`) each
    /// device holds per element of `param_elements`: 16 for f32 AdamW without ZeRO; 8 + 8/d,
    /// 4 + 12/d and 16/d for stages 1, 2 and 3 when every param splits.
    pub bytes_per_param: f64,
}

/// Every collective kind with count 0.
fn no_collectives() -> BTreeMap<String, KindSummary> {
    CollectiveKind::ALL
        .iter()
        .map(|k| (k.name().to_string(), KindSummary::default()))
        .collect()
}

/// How a microbatched step accumulates (per device).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MicrobatchSummary {
    /// Microbatches per step.
    pub count: u64,
    /// Values summed over the microbatches (local adds, no communication).
    pub accumulations: u64,
    /// Bytes of the accumulators, held across the microbatches.
    pub accumulator_bytes: u64,
}

impl Summary {
    /// Computes the summary of the SPMD program `local` (ops of one microbatch counted once per
    /// microbatch).
    pub fn compute(local: &Graph<Local>, mesh: &Mesh, dev: &Device) -> Summary {
        let micro = super::micro::split(local, mesh).ok().flatten();
        let times = |i: usize| match &micro {
            Some(m) if !m.step[i] => m.count,
            _ => 1,
        };
        let mut collectives = no_collectives();
        let mut phases: BTreeMap<String, PhaseSummary> = Phase::ALL
            .iter()
            .map(|p| {
                let collectives = no_collectives();
                (p.name().to_string(), PhaseSummary { collectives })
            })
            .collect();
        let (mut fl, mut comm, mut compute) = (0.0, 0.0, 0.0);
        for (id, n) in local.nodes() {
            if micro.as_ref().is_some_and(|m| m.accumulate[id.index()]) {
                continue;
            }
            let k = times(id.index());
            let ins: Vec<_> = n.inputs.iter().map(|v| local.ty(*v)).collect();
            let outs: Vec<_> = n.outputs.iter().map(|v| local.ty(*v)).collect();
            if let Some((kind, size)) = CollectiveKind::of(&n.op) {
                let bytes = ins.iter().map(|t| t.size_bytes()).sum::<u64>() as f64;
                let (sent, _) = kind.traffic(size, bytes);
                let phase = moved_phase(local, n.inputs[0]).name();
                let in_phase = &mut phases.get_mut(phase).expect("every phase").collectives;
                for e in [&mut collectives, in_phase] {
                    let e = e.get_mut(kind.name()).expect("all kinds present");
                    e.count += k;
                    e.bytes_per_device = e
                        .bytes_per_device
                        .saturating_add((sent.round() as u64).saturating_mul(k));
                }
                comm += kind.time(size, bytes, dev) * k as f64;
                continue;
            }
            let f = flops(&n.op, &ins, &outs) * k as f64;
            fl += f;
            compute += compute_time(
                f,
                outs.first()
                    .map(|t| t.dtype)
                    .unwrap_or(crate::ir::Dtype::F32),
                dev,
            );
        }
        let microbatches = micro.as_ref().map(|m| accumulators(local, m));
        let held = microbatches.map_or(0, |m| m.accumulator_bytes);
        let (param_bytes, peak) = memory(local);
        let peak = peak.saturating_add(held);
        let memory_bytes_per_device = MemorySummary {
            params: param_bytes,
            grads: gradient_bytes(local),
            optimizer: state_bytes(local, false),
            master: state_bytes(local, true),
            activations: activation_bytes(local),
            peak,
        };
        Summary {
            collectives,
            flops_per_device: fl,
            param_bytes_per_device: param_bytes,
            peak_memory_bytes_per_device: peak,
            comm_time_s: comm,
            compute_time_s: compute,
            estimated_time_s: comm + compute,
            phases,
            memory_bytes_per_device,
            microbatches,
            pipeline: None,
            recompute: None,
            zero: None,
        }
    }
}

impl Summary {
    /// Records ZeRO's layout: from stage 2 on, a split param's gradient is counted at its
    /// shard's size (no full gradient buffer is resident), and the memory per param follows.
    pub fn set_zero(&mut self, local: &Graph<Local>, layout: super::zero::ZeroSummary) {
        let split = |name: &str| layout.sharded.contains_key(name) && layout.degree > 1;
        let mem = &mut self.memory_bytes_per_device;
        if layout.stage == 2 {
            let d = layout.degree;
            mem.grads = gradient_bytes_by(local, |n, b| if split(n) { b / d } else { b });
        }
        let gathered = |name: &str| match layout.stage >= 3 && split(name) {
            true => layout.degree,
            false => 1,
        };
        let param_elements = local.params().fold(0u64, |acc, (n, v)| {
            acc.saturating_add(local.ty(v).numel().saturating_mul(gathered(n)))
        });
        let state = per_param_state_bytes(local);
        let held = mem.params.saturating_add(mem.grads).saturating_add(state);
        self.zero = Some(ZeroMemory {
            layout,
            param_elements,
            bytes_per_param: held as f64 / param_elements.max(1) as f64,
        });
    }
}

/// Bytes of the optimizer state kept per param (every `State` leaf of one param, `NAME(P)`:
/// not the scalars `step` and `loss_scale`).
fn per_param_state_bytes(g: &Graph<Local>) -> u64 {
    g.nodes()
        .filter(|(_, n)| matches!(&n.op, Op::State { name, .. } if name.contains('(')))
        .fold(0u64, |acc, (_, n)| {
            acc.saturating_add(g.ty(n.outputs[0]).size_bytes())
        })
}

/// The accumulations of a microbatched program. Its peak memory adds every accumulator to the
/// program-order peak: they are held from the first microbatch to the step's part.
fn accumulators(g: &Graph<Local>, m: &super::micro::Microbatches) -> MicrobatchSummary {
    let accs = g.nodes().filter(|(id, _)| m.accumulate[id.index()]);
    let (count, bytes) = accs.fold((0u64, 0u64), |(c, b), (_, n)| {
        let size = g.ty(n.outputs[0]).size_bytes();
        (c + 1, b.saturating_add(size))
    });
    MicrobatchSummary {
        count: m.count,
        accumulations: count,
        accumulator_bytes: bytes,
    }
}

/// Param bytes and peak bytes (params and optimizer state, resident across steps, + live
/// values, from liveness in program order). Sums saturate at u64::MAX; within
/// `MAX_PROGRAM_BYTES` they never reach it.
fn memory(g: &Graph<Local>) -> (u64, u64) {
    let size = |v| u128::from(g.ty(v).size_bytes());
    let resident = |op: &Op| matches!(op, Op::Param { .. } | Op::State { .. });
    let (leaves, peak) = super::liveness::peak_live(g, resident, size);
    let params = g
        .params()
        .fold(0u128, |a, (_, v)| a.saturating_add(size(v)));
    let clamp = |b: u128| u64::try_from(b).unwrap_or(u64::MAX);
    (clamp(params), clamp(leaves.saturating_add(peak)))
}

/// Bytes of the gradients the program returns.
/// Bytes of the trained params' gradients, each the size of its param's block: the params with
/// a gradient output `grad(NAME)` or a next value `next(NAME)` (counted once).
fn gradient_bytes(g: &Graph<Local>) -> u64 {
    gradient_bytes_by(g, |_, b| b)
}

/// [`gradient_bytes`] with each param's block size `b` counted as `size(name, b)`.
fn gradient_bytes_by(g: &Graph<Local>, size: impl Fn(&str, u64) -> u64) -> u64 {
    use crate::autodiff::{optimizer::leaf_of_next, param_of_grad};
    let params: std::collections::BTreeMap<&str, u64> =
        g.params().map(|(n, v)| (n, g.ty(v).size_bytes())).collect();
    let trained: std::collections::BTreeSet<&str> = g
        .outputs()
        .iter()
        .filter_map(|o| param_of_grad(&o.name).or_else(|| leaf_of_next(&o.name)))
        .filter(|n| params.contains_key(n))
        .collect();
    trained
        .iter()
        .fold(0u64, |acc, n| acc.saturating_add(size(n, params[*n])))
}

/// Bytes of the forward's computed values still live when the first backward node runs.
pub(crate) fn activation_bytes(g: &Graph<Local>) -> u64 {
    let Some(first) = g
        .nodes()
        .position(|(_, n)| g.region(n.region).phase == Phase::Backward)
    else {
        return 0;
    };
    let live = super::liveness::Liveness::of(g);
    g.nodes()
        .take(first)
        .filter(|(_, n)| !n.op.is_leaf())
        .flat_map(|(_, n)| n.outputs.iter().copied())
        .filter(|&v| live.last_use(v).is_some_and(|l| l >= first))
        .fold(0u64, |acc, v| acc.saturating_add(g.ty(v).size_bytes()))
}

/// Bytes of the master weights (states that start as a param) when `masters`, else of the rest
/// of the optimizer state.
fn state_bytes(g: &Graph<Local>, masters: bool) -> u64 {
    use crate::ir::StateInit;
    g.nodes()
        .filter(|(_, n)| match &n.op {
            Op::State { init, .. } => matches!(init, StateInit::Param(_)) == masters,
            _ => false,
        })
        .fold(0u64, |acc, (_, n)| {
            acc.saturating_add(g.ty(n.outputs[0]).size_bytes())
        })
}

/// The phase a collective moving `v` belongs to: that of the computation that made `v`, found
/// through any chain of collectives and slices before it (a data-parallel gradient sync is part
/// of the backward even when the update is what needs it).
pub(crate) fn moved_phase(g: &Graph<Local>, v: crate::ir::ValueId<Local>) -> Phase {
    let mut v = v;
    loop {
        let n = g.node(g.value(v).node);
        match n.inputs.first() {
            Some(&x) if n.op.is_spmd_only() => v = x,
            _ => return g.region(n.region).phase,
        }
    }
}
