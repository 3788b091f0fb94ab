//! Activation recompute (`--recompute`): the backward reads fewer values the forward made; the
//! rest are made again by clones of their producing chains, placed just before their first
//! backward reader. A clone is its original's op on the same operands (kept values, leaves, or
//! earlier clones), so it computes the same bits; it holds the same global value (`origin`) in
//! the same placement, and the plan verifier checks it as it checks its original.
//!
//! Policies, by op pattern and block structure (never by names):
//! - `selective`: the attention core, as Megatron's selective recompute: each `softmax` and the
//!   chain of one-operand elementwise and layout ops before it back to the `matmul` making its
//!   scores (`softmax(causal_mask(q @ kᵀ * c))`); q and kᵀ stay kept.
//! - `full`: every outermost block instance of the forward (a `layer.N` of a `repeat`): only what
//!   enters it and what leaves it are kept; everything made inside is made again.

use super::summary::activation_bytes;
use crate::cost::{compute_time, flops, CollectiveKind};
use crate::ir::{Graph, GraphParts, Local, Node, NodeId, Op, Phase, RegionId, Value, ValueId};
use crate::mesh::{Device, Mesh};
use crate::partition::Partitioned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which forward values the backward recomputes instead of keeping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recompute {
    /// Keep every value the backward reads.
    #[default]
    None,
    /// Recompute the attention core (softmax back to the scores' matmul).
    Selective,
    /// Recompute everything made inside each outermost forward block instance.
    Full,
}

impl Recompute {
    /// `none`, `selective` or `full`.
    pub fn name(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        }
    }
}

impl std::fmt::Display for Recompute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Recompute {
    type Err = String;

    fn from_str(text: &str) -> Result<Recompute, String> {
        match text {
            "none" => Ok(Recompute::None),
            "selective" => Ok(Recompute::Selective),
            "full" => Ok(Recompute::Full),
            _ => Err(format!(
                "unknown recompute policy `{text}`: expected none, selective or full"
            )),
        }
    }
}

/// A recompute the planner cannot do.
#[derive(Debug, Clone, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum RematError {
    /// Recompute asked for a pipelined program.
    #[error(
        "--recompute {policy} is not supported with a pipelined repeat (the `@ {axis}` stages)"
    )]
    #[diagnostic(
        code(tpc::recompute),
        help(
            "drop --recompute, or run without the pipeline axis (--mesh without {axis}, or size 1)"
        )
    )]
    Pipelined {
        /// The policy asked for.
        policy: Recompute,
        /// The pipeline axis.
        axis: String,
        /// The pipelined repeat.
        #[label("pipelined here")]
        span: crate::span::Span,
    },
}

/// What recompute costs and saves, per device.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RecomputeSummary {
    /// The policy.
    pub policy: Recompute,
    /// Cloned nodes.
    pub nodes: u64,
    /// FLOPs of the cloned nodes (each counted as often as it runs per step).
    pub flops: f64,
    /// Cloned collectives (run again in the backward).
    pub collectives: u64,
    /// Estimated time of the cloned nodes (compute and communication), included in the step time.
    pub time_s: f64,
    /// Bytes of forward values the backward holds without recompute.
    pub activations_before: u64,
    /// The same with recompute.
    pub activations_after: u64,
}

/// The program with the values `policy` selects recomputed in the backward, and the clones' ids.
pub fn recompute(p: Partitioned, policy: Recompute) -> (Partitioned, Vec<NodeId<Local>>) {
    let g = &p.local;
    let Some(first) = first_backward(g) else {
        return (p, Vec::new());
    };
    let marked = match policy {
        Recompute::None => return (p, Vec::new()),
        Recompute::Selective => attention_core(g, first),
        Recompute::Full => block_interiors(g, first),
    };
    let marked = cloneable(&p, marked, first);
    if !marked.iter().any(|&m| m) {
        return (p, Vec::new());
    }
    rebuild(p, &marked, first)
}

/// Checks that `policy` applies to a program pipelined as `global` says on `mesh`.
pub fn check(global: &crate::ir::Graph, mesh: &Mesh, policy: Recompute) -> Result<(), RematError> {
    match global.pipeline() {
        Some(spec) if policy != Recompute::None && crate::pipeline::pipelined(global, mesh) => {
            Err(RematError::Pipelined {
                policy,
                axis: spec.axis.clone(),
                span: spec.span,
            })
        }
        _ => Ok(()),
    }
}

/// The position of the first backward node.
fn first_backward(g: &Graph<Local>) -> Option<usize> {
    g.nodes()
        .position(|(_, n)| g.region(n.region).phase == Phase::Backward)
}

/// Per node, true for the attention core: each softmax and the one-operand ops before it back
/// to (and including) the matmul making its scores; nothing when no matmul starts the chain.
fn attention_core(g: &Graph<Local>, first: usize) -> Vec<bool> {
    let mut marked = vec![false; g.num_nodes()];
    for (id, n) in g.nodes().take(first) {
        if !matches!(n.op, Op::Softmax { .. }) {
            continue;
        }
        let mut chain = vec![id];
        let mut at = n;
        while let [x] = at.inputs.as_slice() {
            let p = g.value(*x).node;
            at = g.node(p);
            chain.push(p);
            match &at.op {
                Op::MatMul => {
                    chain.iter().for_each(|c| marked[c.index()] = true);
                    break;
                }
                Op::Scalar { .. }
                | Op::CausalMask
                | Op::Unary { .. }
                | Op::Cast { .. }
                | Op::Reshape { .. }
                | Op::Transpose { .. } => {}
                _ => break,
            }
        }
    }
    marked
}

/// Per node, true when it is inside an outermost forward block instance and no forward node
/// outside that instance reads its results (it is not the instance's result).
fn block_interiors(g: &Graph<Local>, first: usize) -> Vec<bool> {
    let unit = units(g);
    let mut marked = vec![false; g.num_nodes()];
    for (id, n) in g.nodes().take(first) {
        let Some(u) = unit[n.region.index()] else {
            continue;
        };
        let leaves_unit = n.outputs.iter().any(|&v| {
            g.users(v)
                .iter()
                .any(|&r| r.index() < first && unit[g.node(r).region.index()] != Some(u))
        });
        marked[id.index()] = !leaves_unit;
    }
    marked
}

/// Per region, the outermost forward block instance containing it (a child of the root).
fn units(g: &Graph<Local>) -> Vec<Option<RegionId<Local>>> {
    let regions: Vec<_> = g.regions().collect();
    let mut unit = vec![None; regions.len()];
    for (id, r) in &regions {
        if r.phase != Phase::Forward {
            continue;
        }
        let mut at = (*id, *r);
        for _ in 0..regions.len() {
            match at.1.parent {
                Some(p) if p.index() == 0 => {
                    unit[id.index()] = Some(at.0);
                    break;
                }
                Some(p) => at = (p, g.region(p)),
                None => break,
            }
        }
    }
    unit
}

/// `marked` kept to the nodes a clone can stand in for: forward, not leaves, with a global
/// origin (the vocab-parallel loss's origin-less nodes are kept), making no program output.
fn cloneable(p: &Partitioned, mut marked: Vec<bool>, first: usize) -> Vec<bool> {
    let g = &p.local;
    let mut output = vec![false; g.num_values()];
    for o in g.outputs() {
        output[o.value.index()] = true;
    }
    for (id, n) in g.nodes() {
        let i = id.index();
        marked[i] = marked[i]
            && i < first
            && !n.op.is_leaf()
            && !n.outputs.is_empty()
            && n.outputs
                .iter()
                .all(|&v| p.origin[v].is_some() && !output[v.index()]);
    }
    marked
}

/// The tables being rebuilt: the graph's parts, per value its placement and origin, and the
/// program's provenance.
struct Tables {
    parts: GraphParts<Local>,
    placements: crate::ir::IdVec<ValueId<Local>, crate::sharding::Placement>,
    origin: crate::ir::IdVec<ValueId<Local>, Option<crate::ir::ValueId>>,
    provenance: BTreeMap<NodeId<Local>, crate::partition::Provenance>,
    /// Per value of the old program, the old index of the node making it.
    made_by: Vec<usize>,
    /// Per value, its clone (once made).
    clone_of: Vec<Option<ValueId<Local>>>,
    /// The new node order.
    nodes: Vec<Node<Local>>,
    /// New provenance, by new node index.
    new_provenance: BTreeMap<usize, crate::partition::Provenance>,
    /// New indices of the clones.
    clones: Vec<NodeId<Local>>,
}

/// The program with every backward read of a marked node's result redirected to a clone made
/// just before the first such reader.
fn rebuild(p: Partitioned, marked: &[bool], first: usize) -> (Partitioned, Vec<NodeId<Local>>) {
    let g = &p.local;
    let mut parts = g.to_parts();
    let old: Vec<Node<Local>> = std::mem::take(&mut parts.nodes);
    let made_by = g.values().map(|(_, v)| v.node.index()).collect();
    let mut t = Tables {
        made_by,
        clone_of: vec![None; parts.values.len()],
        parts,
        placements: p.placements,
        origin: p.origin,
        provenance: p.provenance,
        nodes: Vec::with_capacity(old.len()),
        new_provenance: BTreeMap::new(),
        clones: Vec::new(),
    };
    for (i, mut n) in old.iter().cloned().enumerate() {
        if i >= first {
            for x in n.inputs.iter_mut() {
                if marked[t.made_by[x.index()]] {
                    *x = t.ensure(&old, marked, *x, n.region);
                }
            }
        }
        if let Some(pr) = t.provenance.get(&NodeId::new(i)) {
            t.new_provenance.insert(t.nodes.len(), pr.clone());
        }
        t.push(n);
    }
    let clones = std::mem::take(&mut t.clones);
    t.parts.nodes = std::mem::take(&mut t.nodes);
    let provenance = std::mem::take(&mut t.new_provenance)
        .into_iter()
        .map(|(i, pr)| (NodeId::new(i), pr))
        .collect();
    let part = Partitioned {
        local: Graph::from_parts(t.parts),
        placements: t.placements,
        origin: t.origin,
        provenance,
    };
    (part, clones)
}

impl Tables {
    /// Appends `n`, pointing its results' values at it.
    fn push(&mut self, n: Node<Local>) {
        let at = self.nodes.len();
        for (k, v) in n.outputs.iter().enumerate() {
            let val = &mut self.parts.values[v.index()];
            val.node = NodeId::new(at);
            val.index = k as u32;
        }
        self.nodes.push(n);
    }

    /// The clone of marked value `v`, made (with the clones it needs, operands first) in
    /// region `region` if not made yet. Iterative: a chain can be a whole layer long.
    fn ensure(
        &mut self,
        old: &[Node<Local>],
        marked: &[bool],
        v: ValueId<Local>,
        region: RegionId<Local>,
    ) -> ValueId<Local> {
        let mut stack = vec![(v, false)];
        while let Some((x, ready)) = stack.pop() {
            if self.clone_of[x.index()].is_some() {
                continue;
            }
            let p = self.made_by[x.index()];
            if ready {
                self.clone_node(&old[p], p, region);
                continue;
            }
            stack.push((x, true));
            for &y in old[p].inputs.iter().rev() {
                if marked[self.made_by[y.index()]] && self.clone_of[y.index()].is_none() {
                    stack.push((y, false));
                }
            }
        }
        self.clone_of[v.index()].expect("made above")
    }

    /// Appends a clone of old node `n` (index `i`) reading the clones of its marked operands.
    fn clone_node(&mut self, n: &Node<Local>, i: usize, region: RegionId<Local>) {
        let inputs = n
            .inputs
            .iter()
            .map(|&x| self.clone_of[x.index()].unwrap_or(x))
            .collect();
        let outputs: Vec<ValueId<Local>> = n.outputs.iter().map(|&o| self.new_value(o)).collect();
        for (&o, &c) in n.outputs.iter().zip(&outputs) {
            self.clone_of[o.index()] = Some(c);
        }
        if let Some(pr) = self.provenance.get(&NodeId::new(i)) {
            let mut pr = pr.clone();
            pr.user = format!("{} (recomputed for the backward)", pr.user);
            self.new_provenance.insert(self.nodes.len(), pr);
        }
        self.clones.push(NodeId::new(self.nodes.len()));
        self.push(Node {
            op: n.op.clone(),
            inputs,
            outputs,
            span: n.span,
            region,
        });
    }

    /// A new value with `v`'s type, name, placement and origin.
    fn new_value(&mut self, v: ValueId<Local>) -> ValueId<Local> {
        let val: Value<Local> = self.parts.values[v.index()].clone();
        self.parts.values.push(val);
        self.clone_of.push(None);
        let pl = self.placements[v].clone();
        self.placements.push(pl);
        let o = self.origin[v];
        self.origin.push(o)
    }
}

impl RecomputeSummary {
    /// The summary with `before` the activation bytes of the program without recompute.
    pub fn with_before(self, before: u64) -> RecomputeSummary {
        RecomputeSummary {
            activations_before: before,
            ..self
        }
    }
}

/// The recompute figures of `local` whose clones are `clones` (the activations before them
/// are left 0: see [`RecomputeSummary::with_before`]).
pub fn summarize(
    local: &Graph<Local>,
    clones: &[NodeId<Local>],
    mesh: &Mesh,
    dev: &Device,
    policy: Recompute,
) -> RecomputeSummary {
    let micro = super::micro::split(local, mesh).ok().flatten();
    let mut s = RecomputeSummary {
        policy,
        nodes: clones.len() as u64,
        activations_after: activation_bytes(local),
        ..RecomputeSummary::default()
    };
    for &id in clones {
        let n = local.node(id);
        let k = match &micro {
            Some(m) if !m.step[id.index()] => m.count as f64,
            _ => 1.0,
        };
        let ins: Vec<_> = n.inputs.iter().map(|v| local.ty(*v)).collect();
        let outs: Vec<_> = n.outputs.iter().map(|v| local.ty(*v)).collect();
        if let Some((kind, size)) = CollectiveKind::of(&n.op) {
            let bytes = ins.iter().map(|t| t.size_bytes()).sum::<u64>() as f64;
            s.collectives += 1;
            s.time_s += kind.time(size, bytes, dev) * k;
            continue;
        }
        let f = flops(&n.op, &ins, &outs) * k;
        s.flops += f;
        let dtype = outs.first().map_or(crate::ir::Dtype::F32, |t| t.dtype);
        s.time_s += compute_time(f, dtype, dev);
    }
    s
}
