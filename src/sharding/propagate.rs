//! Propagation: assigns every value a placement from the user's few annotations. It runs per
//! mesh axis: forward over the nodes in order (each node picks the cheapest strategy given its
//! operands' placements and what its users asked for last time), then backward (collecting what
//! each value's users require), repeated to a fixpoint. Strategies come from the op's `Rule`;
//! a strategy is a candidate only when some operand, annotation or user already splits its
//! label, so shardings flow from annotations and are never invented.

use super::placement::{AxisPl, PartialOp, Placement};
use super::rules::{rule, Contraction, Label, Rule};
use crate::cost::{self, CollectiveKind};
use crate::ir::{Graph, NodeId, Op, ValueId};
use crate::mesh::{Device, Mesh};
use crate::span::Span;

/// How one node runs along one mesh axis.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Strategy {
    /// Required state of each operand.
    pub operands: Vec<AxisPl>,
    /// State of the results as computed.
    pub result: AxisPl,
    /// The split label, if any.
    pub label: Option<Label>,
    /// The op reduces a split label with collectives of its own (vocab-parallel loss).
    pub internal: bool,
}

/// The outcome of propagation.
#[derive(Clone, Debug)]
pub struct Sharding {
    /// The mesh it was computed for.
    pub mesh: Mesh,
    /// Per node, per mesh axis (empty for leaves).
    pub strategies: Vec<Vec<Strategy>>,
    /// Per value: its placement (for a free leaf, the one its first user asked for).
    pub placements: Vec<Placement>,
    /// Per value: an unannotated input or param, which tpc loads in whatever placement each
    /// user needs, without communication.
    pub free: Vec<bool>,
}

impl Sharding {
    /// The placement node `n` needs its operand `i` in.
    pub fn operand_placement(&self, g: &Graph, n: NodeId, i: usize) -> Placement {
        let v = g.node(n).inputs[i];
        let states: Vec<AxisPl> = self.strategies[n.index()]
            .iter()
            .map(|s| s.operands[i])
            .collect();
        Placement::from_axes(g.ty(v).rank(), &states)
    }

    /// The placement node `n` computes its results in (before any constraint on them).
    pub fn computed_placement(&self, g: &Graph, n: NodeId) -> Placement {
        let rank = g
            .node(n)
            .outputs
            .first()
            .map(|v| g.ty(*v).rank())
            .unwrap_or(0);
        let states: Vec<AxisPl> = self.strategies[n.index()]
            .iter()
            .map(|s| s.result)
            .collect();
        Placement::from_axes(rank, &states)
    }
}

/// A user error found by propagation.
#[derive(Debug, Clone, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum ShardError {
    /// An annotation that splits a dim into blocks that do not divide it.
    #[error(
        "dim {dim} of `{name}` has size {size}, which does not divide into {parts} parts ({axes})"
    )]
    #[diagnostic(code(tpc::indivisible), help("choose sizes that divide (e.g. --set), or a smaller mesh axis; uneven shards are not supported yet"))]
    Indivisible {
        /// The value's name.
        name: String,
        /// The dim.
        dim: usize,
        /// Its global size.
        size: u64,
        /// Number of blocks asked for.
        parts: u64,
        /// The axes splitting it.
        axes: String,
        /// The annotation.
        #[label("splits dim {dim} ({size}) into {parts}")]
        span: Span,
    },
}

/// Passes of forward + backward before propagation stops (it usually settles in two).
const MAX_PASSES: usize = 6;

/// Propagates the annotations of `g` over `mesh`, choosing by the cost model of `dev`.
pub fn propagate(g: &Graph, mesh: &Mesh, dev: &Device) -> Result<Sharding, ShardError> {
    let fixed = fixed_placements(g, mesh)?;
    let free: Vec<bool> = g
        .values()
        .map(|(v, val)| g.node(val.node).op.is_leaf() && fixed[v.index()].is_none())
        .collect();
    let rules: Vec<Option<Rule>> = g
        .nodes()
        .map(|(_, n)| {
            let ins: Vec<_> = n.inputs.iter().map(|v| g.ty(*v)).collect();
            let outs: Vec<_> = n.outputs.iter().map(|v| g.ty(*v)).collect();
            rule(&n.op, &ins, &outs)
        })
        .collect();
    let compute: Vec<f64> = g
        .nodes()
        .map(|(_, n)| {
            let ins: Vec<_> = n.inputs.iter().map(|v| g.ty(*v)).collect();
            let outs: Vec<_> = n.outputs.iter().map(|v| g.ty(*v)).collect();
            let dtype = outs
                .first()
                .map(|t| t.dtype)
                .unwrap_or(crate::ir::Dtype::F32);
            cost::compute_time(cost::flops(&n.op, &ins, &outs), dtype, dev)
        })
        .collect();
    let mut strategies: Vec<Vec<Strategy>> = vec![Vec::new(); g.num_nodes()];
    let mut states: Vec<Vec<AxisPl>> = vec![Vec::new(); g.num_values()];
    for a in 0..mesh.rank() {
        let ctx = AxisCtx {
            g,
            mesh,
            a,
            n: mesh.axis_size(a),
            dev,
            fixed: &fixed,
            free: &free,
            rules: &rules,
            compute: &compute,
        };
        let (choice, st) = ctx.run(&strategies);
        for (i, s) in choice.into_iter().enumerate() {
            if let Some(s) = s {
                strategies[i].push(s);
            }
        }
        for (i, s) in st.into_iter().enumerate() {
            states[i].push(s);
        }
    }
    let placements = g
        .values()
        .map(|(v, val)| {
            fixed[v.index()]
                .clone()
                .unwrap_or_else(|| Placement::from_axes(val.ty.rank(), &states[v.index()]))
        })
        .collect();
    Ok(Sharding {
        mesh: mesh.clone(),
        strategies,
        placements,
        free,
    })
}

/// Placements required by annotations; an annotation that does not divide is an error.
fn fixed_placements(g: &Graph, mesh: &Mesh) -> Result<Vec<Option<Placement>>, ShardError> {
    let mut fixed = vec![None; g.num_values()];
    for (v, a) in g.annotations() {
        let p = Placement::from_spec(&a.spec, mesh).expect("the mesh includes every declared axis");
        check_divides(g, *v, &p, mesh, a.span)?;
        fixed[v.index()] = Some(p);
    }
    for o in g.outputs() {
        if let Some(a) = &o.annotation {
            let p =
                Placement::from_spec(&a.spec, mesh).expect("the mesh includes every declared axis");
            check_divides(g, o.value, &p, mesh, a.span)?;
        }
    }
    Ok(fixed)
}

fn check_divides(
    g: &Graph,
    v: ValueId,
    p: &Placement,
    mesh: &Mesh,
    span: Span,
) -> Result<(), ShardError> {
    let ty = g.ty(v);
    for (d, &size) in ty.shape.iter().enumerate() {
        let parts = p.splits(d, mesh);
        if size % parts != 0 {
            let axes = p.dims[d]
                .iter()
                .map(|&a| format!("{}={}", mesh.axis_name(a), mesh.axis_size(a)))
                .collect::<Vec<_>>()
                .join(" × ");
            let name = g.value(v).name.clone().unwrap_or_else(|| v.to_string());
            return Err(ShardError::Indivisible {
                name,
                dim: d,
                size,
                parts,
                axes,
                span,
            });
        }
    }
    Ok(())
}

/// Propagation along one mesh axis.
struct AxisCtx<'a> {
    g: &'a Graph,
    mesh: &'a Mesh,
    a: usize,
    n: u64,
    dev: &'a Device,
    fixed: &'a [Option<Placement>],
    free: &'a [bool],
    rules: &'a [Option<Rule>],
    compute: &'a [f64],
}

impl AxisCtx<'_> {
    /// Chosen strategy per node and state per value along this axis.
    fn run(&self, earlier: &[Vec<Strategy>]) -> (Vec<Option<Strategy>>, Vec<AxisPl>) {
        let g = self.g;
        let mut st: Vec<AxisPl> = (0..g.num_values())
            .map(|v| {
                self.fixed_state(ValueId(v as u32))
                    .unwrap_or(AxisPl::Replicate)
            })
            .collect();
        let mut choice: Vec<Option<Strategy>> = vec![None; g.num_nodes()];
        if self.n == 1 {
            for (i, r) in self.rules.iter().enumerate() {
                if let Some(r) = r {
                    choice[i] = Some(Strategy {
                        operands: vec![AxisPl::Replicate; r.operands.len()],
                        result: AxisPl::Replicate,
                        label: None,
                        internal: false,
                    });
                }
            }
            return (choice, st);
        }
        let mut demand: Option<Vec<Vec<AxisPl>>> = None;
        for _ in 0..MAX_PASSES {
            let mut changed = false;
            for (id, node) in g.nodes() {
                let Some(rule) = &self.rules[id.index()] else {
                    continue;
                };
                let best = self.choose(id, rule, &st, demand.as_deref(), &earlier[id.index()]);
                for &o in &node.outputs {
                    st[o.index()] = self.fixed_state(o).unwrap_or(best.result);
                }
                if choice[id.index()].as_ref() != Some(&best) {
                    changed = true;
                    choice[id.index()] = Some(best);
                }
            }
            self.free_leaf_states(&choice, &mut st);
            if !changed && demand.is_some() {
                break;
            }
            demand = Some(self.demands(&choice));
        }
        (choice, st)
    }

    fn fixed_state(&self, v: ValueId) -> Option<AxisPl> {
        self.fixed[v.index()].as_ref().map(|p| p.axis(self.a))
    }

    /// A free leaf's displayed state: what its first user asked for.
    fn free_leaf_states(&self, choice: &[Option<Strategy>], st: &mut [AxisPl]) {
        for (v, _) in self.g.values() {
            if !self.free[v.index()] {
                continue;
            }
            let first = self.g.users(v).iter().find_map(|&u| {
                let s = choice[u.index()].as_ref()?;
                let i = self.g.node(u).inputs.iter().position(|&x| x == v)?;
                Some(s.operands[i])
            });
            st[v.index()] = first.unwrap_or(AxisPl::Replicate);
        }
    }

    /// What each value's users (and the program outputs) require, sorted and deduplicated.
    fn demands(&self, choice: &[Option<Strategy>]) -> Vec<Vec<AxisPl>> {
        let mut d: Vec<Vec<AxisPl>> = vec![Vec::new(); self.g.num_values()];
        for (id, node) in self.g.nodes() {
            if let Some(s) = &choice[id.index()] {
                for (i, &v) in node.inputs.iter().enumerate() {
                    d[v.index()].push(s.operands[i]);
                }
            }
        }
        for o in self.g.outputs() {
            let want = o
                .annotation
                .as_ref()
                .and_then(|a| Placement::from_spec(&a.spec, self.mesh))
                .map(|p| p.axis(self.a))
                .unwrap_or(AxisPl::Replicate);
            d[o.value.index()].push(want);
        }
        for x in &mut d {
            x.sort();
            x.dedup();
        }
        d
    }

    fn choose(
        &self,
        id: NodeId,
        rule: &Rule,
        st: &[AxisPl],
        demand: Option<&[Vec<AxisPl>]>,
        earlier: &[Strategy],
    ) -> Strategy {
        let mut best: Option<(f64, Strategy)> = None;
        for s in self.candidates(id, rule, st, demand, earlier) {
            let c = self.cost(id, &s, st, demand);
            if best
                .as_ref()
                .is_none_or(|(bc, _)| c < *bc * (1.0 - 1e-9) - 1e-18)
            {
                best = Some((c, s));
            }
        }
        best.map(|(_, s)| s)
            .expect("Replicate is always a candidate")
    }

    /// Replicate, then each label some operand, annotation or user splits (if it divides), then
    /// pass-through of Partial operands through linear ops.
    fn candidates(
        &self,
        id: NodeId,
        rule: &Rule,
        st: &[AxisPl],
        demand: Option<&[Vec<AxisPl>]>,
        earlier: &[Strategy],
    ) -> Vec<Strategy> {
        let node = self.g.node(id);
        let nops = rule.operands.len();
        let mut out = vec![Strategy {
            operands: vec![AxisPl::Replicate; nops],
            result: AxisPl::Replicate,
            label: None,
            internal: false,
        }];
        let mut wanted: Vec<AxisPl> = Vec::new();
        for &o in &node.outputs {
            wanted.extend(self.fixed_state(o));
            if let Some(d) = demand {
                wanted.extend(d[o.index()].iter().copied());
            }
        }
        for l in 0..rule.sizes.len() {
            let prior: u64 = earlier
                .iter()
                .enumerate()
                .filter(|(_, s)| s.label == Some(l))
                .map(|(a, _)| self.mesh.axis_size(a))
                .product();
            if !rule.sizes[l].is_multiple_of(self.n * prior) {
                continue;
            }
            let Some(s) = label_strategy(rule, l) else {
                continue;
            };
            let induced = node.inputs.iter().enumerate().any(|(i, v)| {
                !self.free[v.index()]
                    && st[v.index()] == s.operands[i]
                    && s.operands[i] != AxisPl::Replicate
            }) || (s.result != AxisPl::Replicate && wanted.contains(&s.result))
                || (s.internal
                    && node.inputs.iter().enumerate().any(|(i, v)| {
                        st[v.index()] == s.operands[i] && matches!(s.operands[i], AxisPl::Shard(_))
                    }));
            if induced {
                out.push(s);
            }
        }
        for set in &rule.linear {
            let any_partial = set
                .iter()
                .any(|&i| st[node.inputs[i].index()] == AxisPl::Partial(PartialOp::Sum));
            if any_partial {
                let operands = (0..nops)
                    .map(|i| {
                        if set.contains(&i) {
                            AxisPl::Partial(PartialOp::Sum)
                        } else {
                            AxisPl::Replicate
                        }
                    })
                    .collect();
                out.push(Strategy {
                    operands,
                    result: AxisPl::Partial(PartialOp::Sum),
                    label: None,
                    internal: false,
                });
            }
        }
        out
    }

    fn bytes(&self, v: ValueId, s: AxisPl) -> f64 {
        let b = self.g.ty(v).size_bytes() as f64;
        if matches!(s, AxisPl::Shard(_)) {
            b / self.n as f64
        } else {
            b
        }
    }

    /// Seconds to move `v` from state `from` to `to` along this axis (`bytes` of the whole).
    fn reshard(&self, v: ValueId, from: AxisPl, to: AxisPl) -> f64 {
        let whole = self.g.ty(v).size_bytes() as f64;
        let n = self.n;
        let launch = |k: CollectiveKind, b: f64| k.time(n, b, self.dev);
        match (from, to) {
            _ if from == to => 0.0,
            (AxisPl::Replicate, _) => 0.0,
            (AxisPl::Partial(_), AxisPl::Replicate) | (AxisPl::Partial(_), AxisPl::Partial(_)) => {
                launch(CollectiveKind::AllReduce, whole)
            }
            (AxisPl::Partial(_), AxisPl::Shard(_)) => launch(CollectiveKind::ReduceScatter, whole),
            (AxisPl::Shard(_), AxisPl::Replicate) | (AxisPl::Shard(_), AxisPl::Partial(_)) => {
                launch(CollectiveKind::AllGather, whole / n as f64)
            }
            (AxisPl::Shard(_), AxisPl::Shard(_)) => launch(CollectiveKind::AllToAll, whole),
        }
    }

    /// Objective of running node `id` with strategy `s`: operand reshards, compute, the future
    /// reshards its users need, and memory (params weighted by their training state).
    fn cost(&self, id: NodeId, s: &Strategy, st: &[AxisPl], demand: Option<&[Vec<AxisPl>]>) -> f64 {
        let g = self.g;
        let node = g.node(id);
        let dev = self.dev;
        let mut c = 0.0;
        for (i, &v) in node.inputs.iter().enumerate() {
            let req = s.operands[i];
            let is_param = matches!(g.node(g.value(v).node).op, Op::Param { .. });
            let factor = if is_param {
                dev.param_state_factor
            } else {
                1.0
            };
            c += self.bytes(v, req) * factor * dev.mem_weight;
            if !self.free[v.index()] {
                c += self.reshard(v, st[v.index()], req);
            }
        }
        let frac = if s.label.is_some() {
            1.0 / self.n as f64
        } else {
            1.0
        };
        c += self.compute[id.index()] * frac;
        if s.internal {
            let rows = g.ty(node.inputs[1]).size_bytes() as f64;
            c += 3.0 * CollectiveKind::AllReduce.time(self.n, rows, dev);
        }
        for &o in &node.outputs {
            let placed = self.fixed_state(o).unwrap_or(s.result);
            c += self.reshard(o, s.result, placed);
            c += match demand {
                Some(d) => d[o.index()]
                    .iter()
                    .map(|&want| self.reshard(o, placed, want))
                    .sum::<f64>(),
                None if matches!(placed, AxisPl::Partial(_)) => {
                    self.reshard(o, placed, AxisPl::Replicate)
                }
                None => 0.0,
            };
            c += self.bytes(o, placed) * dev.mem_weight;
        }
        c
    }
}

/// The strategy splitting label `l`: operands holding it are split there, others replicated;
/// the result is split, partial, or (internal contraction) replicated.
fn label_strategy(rule: &Rule, l: Label) -> Option<Strategy> {
    let operands: Vec<AxisPl> = rule
        .operands
        .iter()
        .map(|dims| {
            dims.iter()
                .position(|&x| x == Some(l))
                .map(AxisPl::Shard)
                .unwrap_or(AxisPl::Replicate)
        })
        .collect();
    if operands.iter().all(|s| *s == AxisPl::Replicate) {
        return None;
    }
    let (result, internal) = match rule.result.iter().position(|&x| x == Some(l)) {
        Some(d) => (AxisPl::Shard(d), false),
        None => match rule.contracted.iter().find(|(c, _)| *c == l)?.1 {
            Contraction::Partial(op) => (AxisPl::Partial(op), false),
            Contraction::Internal => (AxisPl::Replicate, true),
        },
    };
    Some(Strategy {
        operands,
        result,
        label: Some(l),
        internal,
    })
}
