//! ZeRO on the data-parallel axis (`--zero 1|2|3`), as pins made before propagation, so that
//! propagation and partitioning place the collectives themselves:
//! - stage 1: each trained param's optimizer state (Adam's moments, SGD's momentum; not the
//!   scalar `step`) pinned split over `dp`: the update then reduce-scatters the gradient, runs on
//!   the rank's slice and all-gathers the next param (the bytes of plain DP's all-reduce);
//! - every stage: the gradient pinned a partial sum over `dp`, reduce-scattered by the update;
//! - stage 2: the same program, but no full gradient buffer is counted resident; with
//!   microbatches the gradient is pinned split instead, so each microbatch reduce-scatters and
//!   a shard is accumulated;
//! - stage 3: the param pinned split as well, and read through two copies pinned whole over
//!   `dp` (one for the forward's users, one for the backward's): two all-gathers, each freed
//!   after its last use (about 1.5× plain DP's bytes).
//!
//! A param none of whose dims can be split over `dp` (every dim already split by another
//! axis, or indivisible)
//! stays replicated over `dp`; [`ZeroSummary::replicated`] lists it.

use crate::ir::{Graph, IdVec, Op, Output, Phase, Pin, PinState, PipelineSpec, ValueId};
use crate::mesh::{Device, Mesh};
use crate::sharding::placement::{AxisPl, PartialOp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The data-parallel axis ZeRO splits over.
pub const DP_AXIS: &str = "dp";

/// The highest ZeRO stage.
pub const MAX_STAGE: u8 = 3;

/// Why ZeRO cannot apply to a program.
#[derive(Debug, Clone, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum ZeroError {
    /// The program's mesh has no `dp` axis.
    #[error(
        "--zero {stage} splits the optimizer state over the data-parallel mesh axis `dp`, which \
         the program does not declare (mesh axes: {axes})"
    )]
    #[diagnostic(
        code(tpc::zero_no_dp),
        help("declare `mesh dp, ...` and split the batch over it, or use --zero 0")
    )]
    NoDpAxis {
        /// The stage asked for.
        stage: u8,
        /// The declared axes.
        axes: String,
    },
    /// The program has no optimizer update to shard.
    #[error("--zero {stage} shards a training step's optimizer update; this program has none")]
    #[diagnostic(
        code(tpc::zero_not_training),
        help("add `train LOSS with ...` (and drop --forward-only), or use --zero 0")
    )]
    NotTraining {
        /// The stage asked for.
        stage: u8,
    },
    /// Plain data parallelism's placement, which ZeRO starts from, failed.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Shard(#[from] Box<crate::sharding::ShardError>),
    /// A stage above 3.
    #[error("--zero {stage}: the stages are 0, 1, 2 and 3")]
    #[diagnostic(code(tpc::zero_stage))]
    Stage {
        /// The stage asked for.
        stage: u8,
    },
}

/// What ZeRO did to a plan: the stage, the `dp` degree and where each trained param's state
/// went (both lists empty when `dp` has size 1: there is nothing to split).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ZeroSummary {
    /// The stage (1, 2 or 3).
    pub stage: u8,
    /// The size of the `dp` axis (1: nothing to split, the plan is plain data parallelism).
    pub degree: u64,
    /// Per trained param split over `dp`, the dim split.
    pub sharded: BTreeMap<String, usize>,
    /// Trained params left replicated over `dp` (no dim divides), with their state.
    pub replicated: Vec<String>,
}

/// `g` with the pins of ZeRO `stage` over `mesh`'s `dp` axis, and what was split. Stage 0 and a
/// `dp` axis of size 1 leave `g` unchanged.
pub fn annotate(
    g: &Graph,
    mesh: &Mesh,
    dev: &Device,
    stage: u8,
) -> Result<(Graph, ZeroSummary), ZeroError> {
    if stage > MAX_STAGE {
        return Err(ZeroError::Stage { stage });
    }
    if !g.mesh_axes.iter().any(|a| a == DP_AXIS) {
        return Err(ZeroError::NoDpAxis {
            stage,
            axes: g.mesh_axes.join(", "),
        });
    }
    let states = state_leaves(g);
    if !g.is_training_step() || !g.outputs().iter().any(|o| is_next(&o.name)) {
        return Err(ZeroError::NotTraining { stage });
    }
    let degree = mesh.axis_index(DP_AXIS).map_or(1, |a| mesh.axis_size(a));
    let mut summary = ZeroSummary {
        stage,
        degree,
        ..Default::default()
    };
    if degree == 1 {
        return Ok((g.clone(), summary));
    }
    let trained = trained_params(g);
    for (name, p) in &trained {
        match split_dim(g, *p, degree) {
            Some(d) => {
                summary.sharded.insert(name.clone(), d);
            }
            None => summary.replicated.push(name.clone()),
        }
    }
    let mut out = g.clone();
    as_plain_dp(&mut out, mesh, dev)?;
    let pin = |out: &mut Graph, value: ValueId, d: usize| {
        out.pin(Pin {
            value,
            axis: DP_AXIS.to_string(),
            state: PinState::Shard(d),
        })
    };
    for (param, leaf) in &states {
        if let Some(&d) = summary.sharded.get(param) {
            pin(&mut out, *leaf, d);
        }
    }
    // A gradient stays a partial sum over dp until the update reduce-scatters it (pinned, so
    // that pricing memory does not split the backward's reductions along the param's dims
    // instead); with microbatches, stage 2 reduce-scatters each microbatch's gradient and
    // accumulates a shard.
    let micro = g
        .mesh_axes
        .iter()
        .any(|a| a == crate::mesh::MICROBATCH_AXIS);
    for (name, g_value) in gradients(g) {
        if let Some(&d) = summary.sharded.get(&name) {
            let state = match stage >= 2 && micro {
                true => PinState::Shard(d),
                false => PinState::Partial,
            };
            out.pin(Pin {
                value: g_value,
                axis: DP_AXIS.to_string(),
                state,
            });
        }
    }
    if stage >= 3 {
        for (name, p) in &trained {
            if let Some(&d) = summary.sharded.get(name) {
                pin(&mut out, *p, d);
            }
        }
        let params: BTreeMap<ValueId, usize> = trained
            .iter()
            .filter_map(|(n, p)| Some((*p, *summary.sharded.get(n)?)))
            .collect();
        out = gathered_copies(&out, &params);
    }
    Ok((out, summary))
}

/// Pins every computed value of the forward and the backward, along every mesh axis, as plain
/// data parallelism places it, except that each gradient (and the sums making it that plain DP
/// all-reduced) stays a partial sum over `dp`: ZeRO changes the update alone. Propagation then
/// runs without a memory price ([`propagation_device`]), so that it places the update by its
/// communication: one reduce-scatter of each gradient and one all-gather of each param.
fn as_plain_dp(g: &mut Graph, mesh: &Mesh, dev: &Device) -> Result<(), ZeroError> {
    let sh = crate::sharding::propagate(g, mesh, dev).map_err(Box::new)?;
    let dp = mesh.axis_index(DP_AXIS).expect("checked by the caller");
    let mut partial: Vec<ValueId> = Vec::new();
    for (_, grad) in gradients(g) {
        sums_of(g, &sh, dp, grad, &mut partial);
    }
    let partial: std::collections::BTreeSet<ValueId> = partial.into_iter().collect();
    let values: Vec<ValueId> = g
        .nodes()
        .filter(|(_, n)| g.region(n.region).phase != Phase::Update && !n.op.is_leaf())
        .flat_map(|(_, n)| n.outputs.iter().copied())
        .filter(|v| g.annotation(*v).is_none())
        .collect();
    for v in values {
        for a in 0..mesh.rank() {
            let state = match (a == dp && partial.contains(&v), sh.placement(v).axis(a)) {
                (true, _) | (false, AxisPl::Partial(PartialOp::Sum)) => PinState::Partial,
                (false, AxisPl::Replicate) => PinState::Replicate,
                (false, AxisPl::Shard(d)) => PinState::Shard(d),
                (false, AxisPl::Partial(_)) => continue,
            };
            g.pin(Pin {
                value: v,
                axis: mesh.axis_name(a).to_string(),
                state,
            });
        }
    }
    Ok(())
}

/// The device propagation of a ZeRO program runs with: `dev` without its memory price (every
/// forward and backward value is pinned, so only the update's placement is chosen, by its
/// communication; the memory it saves is the point of ZeRO, not a choice).
pub fn propagation_device(dev: &Device) -> Device {
    Device {
        mem_weight: 0.0,
        ..*dev
    }
}

/// Into `out`, `v` and the values it sums that plain data parallelism all-reduced over `dp`
/// on the way to a gradient `v` (through adds, sums, reshapes and transposes read only there):
/// they stay partial sums, reduce-scattered once by the update.
fn sums_of(
    g: &Graph,
    sh: &crate::sharding::Sharding,
    dp: usize,
    v: ValueId,
    out: &mut Vec<ValueId>,
) {
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        if out.contains(&v) {
            continue;
        }
        out.push(v);
        let n = g.node(g.value(v).node);
        if !matches!(n.op.name(), "add" | "sum" | "reshape" | "transpose") {
            continue;
        }
        for &x in &n.inputs {
            let whole = sh.placement(x).axis(dp) == AxisPl::Replicate;
            if whole && g.users(x).len() == 1 && !g.node(g.value(x).node).op.is_leaf() {
                stack.push(x);
            }
        }
    }
}

/// True for a carried leaf's next-value output.
fn is_next(name: &str) -> bool {
    crate::autodiff::optimizer::leaf_of_next(name).is_some()
}

/// The trained params (those with a `next(NAME)` output), by name, in program order.
fn trained_params(g: &Graph) -> Vec<(String, ValueId)> {
    let next: std::collections::BTreeSet<&str> = g
        .outputs()
        .iter()
        .filter_map(|o| crate::autodiff::optimizer::leaf_of_next(&o.name))
        .collect();
    g.params()
        .filter(|(n, _)| next.contains(n))
        .map(|(n, v)| (n.to_string(), v))
        .collect()
}

/// Each per-param optimizer state leaf (`adamw.m(P)`, `adamw.v(P)`, `sgd.momentum(P)`) with
/// its param's name; the scalar `step` has none.
fn state_leaves(g: &Graph) -> Vec<(String, ValueId)> {
    g.nodes()
        .filter_map(|(_, n)| match &n.op {
            Op::State { name, .. } => {
                let (_, rest) = name.split_once('(')?;
                Some((rest.strip_suffix(')')?.to_string(), n.outputs[0]))
            }
            _ => None,
        })
        .collect()
}

/// Each trained param's gradient value, found by the name autodiff gives it (`grad(P)`).
fn gradients(g: &Graph) -> Vec<(String, ValueId)> {
    g.values()
        .filter_map(|(v, val)| {
            let p = crate::autodiff::param_of_grad(val.name.as_deref()?)?;
            (!g.node(val.node).op.is_leaf()).then(|| (p.to_string(), v))
        })
        .collect()
}

/// The dim of `p` to split over `dp`: the largest one its annotation leaves whole whose size
/// `degree` divides (the first of equals); `None` when there is none. A dim another axis
/// already splits is not shared: its blocks over that axis would come before dp's in the
/// layout, which a reduce-scatter over dp of the gradient cannot produce.
fn split_dim(g: &Graph, p: ValueId, degree: u64) -> Option<usize> {
    let shape = &g.ty(p).shape;
    let taken = |d: usize| {
        g.annotation(p)
            .is_some_and(|a| a.spec.dims.get(d).is_some_and(|axes| !axes.is_empty()))
    };
    (0..shape.len())
        .filter(|&d| !taken(d) && shape[d] % degree == 0 && shape[d] >= degree)
        .fold(None, |best: Option<usize>, d| match best {
            Some(b) if shape[b] >= shape[d] => Some(b),
            _ => Some(d),
        })
}

/// `g` with every forward and every backward user of each param of `params` reading a copy
/// (an identity reshape pinned whole over `dp`) made just before its first such user; the
/// update keeps reading the param.
fn gathered_copies(g: &Graph, params: &BTreeMap<ValueId, usize>) -> Graph {
    let mut out = Graph::new(g.source.clone());
    out.mesh_axes = g.mesh_axes.clone();
    out.dims = g.dims.clone();
    for (r, region) in g.regions().skip(1) {
        let parent = region.parent.expect("only the root has no parent");
        let id = out.add_region(
            region.path.clone(),
            region.block.clone(),
            parent,
            region.body,
        );
        debug_assert_eq!(id.index(), r.index());
        out.set_phase(id, region.phase);
    }
    let mut map: IdVec<ValueId, Option<ValueId>> = IdVec::filled(g.num_values(), None);
    let mut copies: BTreeMap<(ValueId, Phase), ValueId> = BTreeMap::new();
    for (_, n) in g.nodes() {
        let phase = g.region(n.region).phase;
        let mut inputs = Vec::with_capacity(n.inputs.len());
        for &x in &n.inputs {
            let mine = map[x].expect("operands come first");
            let v = match (phase, params.get(&x)) {
                (Phase::Forward | Phase::Backward, Some(&d)) => *copies
                    .entry((x, phase))
                    .or_insert_with(|| gather(&mut out, g, (mine, d), x, n.region, n.span)),
                _ => mine,
            };
            inputs.push(v);
        }
        let id = out.add_node(
            n.op.clone(),
            inputs,
            n.outputs.iter().map(|v| g.ty(*v).clone()).collect(),
            n.span,
            n.region,
        );
        for (&old, &new) in n.outputs.iter().zip(&out.node(id).outputs.clone()) {
            map[old] = Some(new);
            if let Some(name) = &g.value(old).name {
                out.set_value_name(new, name.clone());
            }
        }
    }
    let m = |v: ValueId| map[v].expect("every value is copied");
    for (v, a) in g.annotations() {
        out.annotate(m(*v), a.clone());
    }
    for p in g.pins() {
        out.pin(Pin {
            value: m(p.value),
            ..p
        });
    }
    for o in g.outputs() {
        out.add_output(Output {
            value: m(o.value),
            like: o.like.map(m),
            ..o.clone()
        });
    }
    out.set_pipeline(g.pipeline().map(|p| PipelineSpec {
        output: m(p.output),
        ..p.clone()
    }));
    out
}

/// Appends the gathered copy of the global param `global` (held as `p`, split along dim `d`):
/// an identity reshape pinned split as `p` is, then one pinned whole over `dp`. The first is
/// a value of its own, so that the forward's and the backward's gathers are two all-gathers
/// (the partitioner reuses one gather of the same value).
fn gather(
    out: &mut Graph,
    g: &Graph,
    (p, d): (ValueId, usize),
    global: ValueId,
    region: crate::ir::RegionId,
    span: crate::span::Span,
) -> ValueId {
    let split = identity(out, g, p, global, region, span, PinState::Shard(d));
    identity(out, g, split, global, region, span, PinState::Replicate)
}

/// Appends `reshape(p)` to its own shape, pinned `state` over `dp`.
fn identity(
    out: &mut Graph,
    g: &Graph,
    p: ValueId,
    global: ValueId,
    region: crate::ir::RegionId,
    span: crate::span::Span,
    state: PinState,
) -> ValueId {
    let ty = g.ty(global).clone();
    let op = Op::Reshape {
        shape: ty.shape.clone(),
    };
    let n = out.add_node(op, vec![p], vec![ty], span, region);
    let v = out.node(n).outputs[0];
    if let Some(name) = &g.value(global).name {
        out.set_value_name(v, format!("{name} (gathered)"));
    }
    out.pin(Pin {
        value: v,
        axis: DP_AXIS.to_string(),
        state,
    });
    v
}
