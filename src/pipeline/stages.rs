//! Cutting a partitioned training step into pipeline stages: the pipelined `repeat`'s instances
//! are split into contiguous runs of balanced cost, each local node gets the stage that runs it
//! (or is computed by every stage that reads it, when it reads only leaves), and every value
//! one stage makes and another reads becomes part of a boundary message between adjacent
//! stages (forward activations, backward gradients) or a once-per-step transfer.

use crate::cost::{compute_time, flops, CollectiveKind};
use crate::ir::{Dtype, Graph, Local, NodeId, Phase, ValueId};
use crate::mesh::Device;
use crate::plan::micro::Microbatches;
use std::collections::BTreeSet;

/// A pipeline that cannot be cut as asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum StageError {
    /// More stages than instances of the pipelined block.
    #[error("pipeline axis {axis}={stages} needs at least one instance of `{block}` per stage; the repeat makes {instances}")]
    #[diagnostic(
        code(tpc::pipeline),
        help("use fewer pipeline stages or more instances (e.g. --set L=...)")
    )]
    TooManyStages {
        /// The axis.
        axis: String,
        /// Its size.
        stages: u32,
        /// The block.
        block: String,
        /// The repeat's count.
        instances: usize,
        /// The repeat.
        #[label("{instances} instances")]
        span: crate::span::Span,
    },
    /// A value that would flow against the pipeline (a compiler limitation or bug).
    #[error("internal error (pipeline): {0}")]
    Internal(String),
}

/// Where a local node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Where {
    /// On one stage.
    Stage(u32),
    /// On every stage that reads its result (it reads only leaves and other such nodes).
    Everywhere,
}

/// The stage assignment of a local program.
#[derive(Clone, Debug, PartialEq)]
pub struct Cut {
    /// Per stage, its instances `start..end`.
    pub instances: Vec<(u32, u32)>,
    /// Per local node.
    pub place: Vec<Where>,
    /// Per instance, its estimated seconds (forward and backward of one microbatch).
    pub instance_cost: Vec<f64>,
}

/// What the cut needs of the plan.
pub struct CutInput<'a> {
    /// The partitioned program.
    pub local: &'a Graph<Local>,
    /// Per local node: runs once per microbatch or once per step.
    pub parts: &'a Microbatches,
    /// Region paths of the pipelined block's instances, in order.
    pub instance_paths: Vec<String>,
    /// Number of stages.
    pub stages: u32,
    /// Cost model constants.
    pub device: &'a Device,
}

/// Cuts `input.local` into `input.stages` stages.
pub fn cut(input: &CutInput<'_>) -> Result<Cut, StageError> {
    let g = input.local;
    let inst = instance_of_regions(g, &input.instance_paths);
    let node_inst: Vec<Option<usize>> = g.nodes().map(|(_, n)| inst[n.region.index()]).collect();
    let costs = node_costs(g, input.device);
    let mut instance_cost = vec![0.0; input.instance_paths.len()];
    let (mut pre, mut post) = (0.0, 0.0);
    let first_inst = node_inst.iter().position(Option::is_some);
    for (i, c) in costs.iter().enumerate() {
        // A sum over the microbatches is a local accumulation, not a message.
        if input.parts.accumulate[i] {
            continue;
        }
        match node_inst[i] {
            Some(k) => instance_cost[k] += c,
            None if input.parts.step[i] => {}
            None if first_inst.is_some_and(|f| i < f) => pre += c,
            None => post += c,
        }
    }
    let ranges = balance(&instance_cost, input.stages as usize, pre, post);
    let stage_of_inst: Vec<u32> = ranges
        .iter()
        .enumerate()
        .flat_map(|(s, &(a, b))| (a..b).map(move |_| s as u32))
        .collect();
    let place = assign(g, input.parts, &node_inst, &stage_of_inst)?;
    Ok(Cut {
        instances: ranges.iter().map(|&(a, b)| (a as u32, b as u32)).collect(),
        place,
        instance_cost,
    })
}

/// Per local region, the pipelined instance it belongs to (forward or backward).
fn instance_of_regions(g: &Graph<Local>, paths: &[String]) -> Vec<Option<usize>> {
    let own = |path: &str| {
        let path = path.strip_suffix("/backward").unwrap_or(path);
        paths.iter().position(|p| path == p)
    };
    let mut out: Vec<Option<usize>> = Vec::with_capacity(g.regions().len());
    for (_, r) in g.regions() {
        let up = r.parent.and_then(|p| out.get(p.index()).copied().flatten());
        out.push(own(&r.path).or(up));
    }
    out
}

/// Estimated seconds of each local node: its compute, or its collective's time.
pub(crate) fn node_costs(g: &Graph<Local>, dev: &Device) -> Vec<f64> {
    g.nodes()
        .map(|(_, n)| {
            let ins: Vec<_> = n.inputs.iter().map(|v| g.ty(*v)).collect();
            let outs: Vec<_> = n.outputs.iter().map(|v| g.ty(*v)).collect();
            if let Some((kind, size)) = CollectiveKind::of(&n.op) {
                let bytes = ins.iter().map(|t| t.size_bytes()).sum::<u64>() as f64;
                return kind.time(size, bytes, dev);
            }
            let dtype = outs.first().map_or(Dtype::F32, |t| t.dtype);
            compute_time(flops(&n.op, &ins, &outs), dtype, dev)
        })
        .collect()
}

/// Contiguous split of `costs` into `p` non-empty runs minimising the largest run's cost, with
/// `pre` added to the first run and `post` to the last (dynamic programming, earliest split on
/// ties). `p` is at most `costs.len()`.
pub fn balance(costs: &[f64], p: usize, pre: f64, post: f64) -> Vec<(usize, usize)> {
    let n = costs.len();
    let prefix: Vec<f64> = std::iter::once(0.0)
        .chain(costs.iter().scan(0.0, |acc, c| {
            *acc += c;
            Some(*acc)
        }))
        .collect();
    let run = |a: usize, b: usize, s: usize| {
        prefix[b] - prefix[a] + if s == 0 { pre } else { 0.0 } + if s == p - 1 { post } else { 0.0 }
    };
    // best[s][j]: smallest bottleneck of the first s+1 runs covering instances 0..j.
    let mut best = vec![vec![f64::INFINITY; n + 1]; p];
    let mut from = vec![vec![0usize; n + 1]; p];
    for (j, b) in best[0].iter_mut().enumerate().skip(1) {
        *b = run(0, j, 0);
    }
    for s in 1..p {
        for j in (s + 1)..=n {
            for i in s..j {
                let c = best[s - 1][i].max(run(i, j, s));
                if c < best[s][j] {
                    best[s][j] = c;
                    from[s][j] = i;
                }
            }
        }
    }
    let mut ranges = vec![(0, 0); p];
    let mut j = n;
    for s in (0..p).rev() {
        let i = if s == 0 { 0 } else { from[s][j] };
        ranges[s] = (i, j);
        j = i;
    }
    ranges
}

/// The stage of each local node: an instance's nodes on its stage; others after the data they
/// read (the latest stage for forward work, the earliest for backward work, the reading
/// gradient's stage for once-per-step work); nodes reading only leaves and such nodes
/// everywhere.
fn assign(
    g: &Graph<Local>,
    parts: &Microbatches,
    node_inst: &[Option<usize>],
    stage_of_inst: &[u32],
) -> Result<Vec<Where>, StageError> {
    let mut place = Vec::with_capacity(g.num_nodes());
    for (id, n) in g.nodes() {
        let i = id.index();
        if n.op.is_leaf() {
            place.push(Where::Everywhere);
            continue;
        }
        if let Some(k) = node_inst[i] {
            place.push(Where::Stage(stage_of_inst[k]));
            continue;
        }
        let from: BTreeSet<u32> = n
            .inputs
            .iter()
            .filter_map(|v| match place[g.value(*v).node.index()] {
                Where::Stage(s) => Some(s),
                Where::Everywhere => None,
            })
            .collect();
        let backward = g.region(n.region).phase == Phase::Backward && !parts.step[i];
        place.push(match (from.first(), from.last()) {
            (None, _) => Where::Everywhere,
            (Some(&lo), _) if backward => Where::Stage(lo),
            (_, Some(&hi)) => Where::Stage(hi),
            _ => unreachable!("a non-empty set has a first and a last"),
        });
    }
    Ok(place)
}

/// Which way a value crosses from stage `from` to stage `to`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Crossing {
    /// In the forward messages of one microbatch (to a later stage).
    Forward,
    /// In the backward messages of one microbatch (to an earlier stage).
    Backward,
    /// Once per step, after the accumulations.
    Step,
    /// Once per step, after the update: a carried param's next value, to a stage that reads
    /// the param and does not make it (a tied weight updated on another stage).
    Carry,
}

/// One value read on a stage other than the one that makes it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Transfer {
    /// The value.
    pub value: ValueId<Local>,
    /// The stage that makes it.
    pub from: u32,
    /// The stage that reads it.
    pub to: u32,
    /// How it travels.
    pub crossing: Crossing,
}

/// Every value that crosses stages, once per (value, reading stage), in program order.
pub fn transfers(
    g: &Graph<Local>,
    parts: &Microbatches,
    place: &[Where],
) -> Result<Vec<Transfer>, StageError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (id, n) in g.nodes() {
        let Where::Stage(to) = place[id.index()] else {
            continue;
        };
        for &v in &n.inputs {
            let p = g.value(v).node;
            let Where::Stage(from) = place[p.index()] else {
                continue;
            };
            if from == to || !seen.insert((v, to)) {
                continue;
            }
            let crossing = crossing(g, parts, p, id, from, to)?;
            out.push(Transfer {
                value: v,
                from,
                to,
                crossing,
            });
        }
    }
    Ok(out)
}

/// How a value made by `maker` on stage `from` reaches `reader` on stage `to`.
fn crossing(
    g: &Graph<Local>,
    parts: &Microbatches,
    maker: NodeId<Local>,
    reader: NodeId<Local>,
    from: u32,
    to: u32,
) -> Result<Crossing, StageError> {
    let (ms, rs) = (parts.step[maker.index()], parts.step[reader.index()]);
    let made_backward = g.region(g.node(maker).region).phase == Phase::Backward;
    match (ms, rs) {
        (true, true) => Ok(Crossing::Step),
        // With one microbatch its values are the step's.
        (false, true) if parts.count == 1 => Ok(Crossing::Step),
        (false, false) if from < to && !made_backward => Ok(Crossing::Forward),
        (false, false) if from > to => Ok(Crossing::Backward),
        _ => Err(StageError::Internal(format!(
            "{} made on stage {from} is read on stage {to} by {}",
            g.node(maker).op.name(),
            g.node(reader).op.name()
        ))),
    }
}

/// The carried params' next values each stage reading the param and not making its next value
/// needs from the stage that does (`runs`: per node, the stages running it; `owner`: per output,
/// the stage making it).
pub fn carries(g: &Graph<Local>, runs: &[BTreeSet<u32>], owner: &[u32]) -> Vec<Transfer> {
    let leaves: std::collections::BTreeMap<&str, usize> = g
        .nodes()
        .filter_map(|(id, n)| Some((n.op.leaf_name()?, id.index())))
        .collect();
    let leaf = |name: &str| leaves.get(name).copied();
    let mut out = Vec::new();
    for (k, o) in g.outputs().iter().enumerate() {
        let Some(l) = crate::autodiff::optimizer::leaf_of_next(&o.name).and_then(leaf) else {
            continue;
        };
        let maker = g.value(o.value).node.index();
        for &t in runs[l].difference(&runs[maker]) {
            out.push(Transfer {
                value: o.value,
                from: owner[k],
                to: t,
                crossing: Crossing::Carry,
            });
        }
    }
    out
}
