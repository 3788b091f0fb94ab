//! Propagation: assigns every value a placement from the user's few annotations. It runs per
//! mesh axis: forward over the nodes in order (each node picks the cheapest strategy given its
//! operands' placements and what its users asked for last time), then backward (collecting what
//! each value's users require), repeated to a fixpoint. Strategies come from the op's `Rule`;
//! a strategy is a candidate only when some operand, annotation or user already splits its
//! label, so shardings flow from annotations and are never invented.

use super::placement::{AxisPl, FxBuild, PartialOp, PlId, Placement, PlacementTable};
use super::rules::{rule, Contraction, Label, Rule};
use crate::cost::{self, CollectiveKind};
use crate::ir::{Graph, IdVec, NodeId, Op, Phase, PinState, TensorType, ValueId};
use crate::mesh::{Device, Mesh, SequenceParallel};
use crate::span::Span;
use std::collections::HashMap;

mod memo;

/// How one node runs along one mesh axis, named by what its `Rule` splits; the operand and
/// result states are read off the rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// Every operand and the result replicated.
    Replicate,
    /// Label `l` split: operands holding it split there, others replicated; the result split,
    /// partial, or (internal contraction) replicated.
    Split(Label),
    /// The rule's linear operand set `k` Partial (its sum or max), the others replicated; the
    /// result Partial the same way.
    Linear(usize),
}

impl Strategy {
    /// Every strategy of `rule`, in preference order: Replicate, Split(l) for each splittable
    /// label, Linear(k) for each linear operand set.
    pub fn all(rule: &Rule) -> impl Iterator<Item = Strategy> + '_ {
        std::iter::once(Strategy::Replicate)
            .chain(
                (0..rule.sizes.len())
                    .filter(|&l| splittable(rule, l))
                    .map(Strategy::Split),
            )
            .chain((0..rule.linear.len()).map(Strategy::Linear))
    }

    /// Required state of operand `i`.
    pub fn operand(self, rule: &Rule, i: usize) -> AxisPl {
        match self {
            Strategy::Replicate => AxisPl::Replicate,
            Strategy::Split(l) => rule.operands[i]
                .iter()
                .position(|&x| x == Some(l))
                .map(AxisPl::Shard)
                .unwrap_or(AxisPl::Replicate),
            Strategy::Linear(k) if rule.linear[k].1.contains(&i) => {
                AxisPl::Partial(rule.linear[k].0)
            }
            Strategy::Linear(_) => AxisPl::Replicate,
        }
    }

    /// State of the results as computed.
    pub fn result(self, rule: &Rule) -> AxisPl {
        match self {
            Strategy::Replicate => AxisPl::Replicate,
            Strategy::Split(l) => match rule.result.iter().position(|&x| x == Some(l)) {
                Some(d) => AxisPl::Shard(d),
                None => match rule.contracted.iter().find(|(c, _)| *c == l) {
                    Some((_, Contraction::Partial(op))) => AxisPl::Partial(*op),
                    _ => AxisPl::Replicate,
                },
            },
            Strategy::Linear(k) => AxisPl::Partial(rule.linear[k].0),
        }
    }

    /// The split label, if any.
    pub fn label(self) -> Option<Label> {
        match self {
            Strategy::Split(l) => Some(l),
            _ => None,
        }
    }

    /// The op reduces the split label with collectives of its own (vocab-parallel loss).
    pub fn internal(self, rule: &Rule) -> bool {
        match self {
            Strategy::Split(l) => {
                !rule.result.contains(&Some(l))
                    && matches!(
                        rule.contracted.iter().find(|(c, _)| *c == l),
                        Some((_, Contraction::Internal))
                    )
            }
            _ => false,
        }
    }
}

/// True when splitting label `l` is a strategy: some operand holds it, and the result holds it
/// or it may be contracted.
fn splittable(rule: &Rule, l: Label) -> bool {
    rule.operands.iter().any(|dims| dims.contains(&Some(l)))
        && (rule.result.contains(&Some(l)) || rule.contracted.iter().any(|(c, _)| *c == l))
}

/// The outcome of propagation.
#[derive(Clone, Debug)]
pub struct Sharding {
    /// The mesh it was computed for.
    pub mesh: Mesh,
    /// The distinct op rules (nodes with equal ops and types share one).
    pub rules: Vec<Rule>,
    /// Per node, the index of its rule in `rules` (`None` for leaves).
    pub rule_of: IdVec<NodeId, Option<u32>>,
    /// Per node and mesh axis, at `node * mesh.rank() + axis`: its strategy (unused for nodes
    /// without a rule).
    pub strategies: Vec<Strategy>,
    /// The distinct placements, referenced by `placement_of`.
    pub table: PlacementTable,
    /// Per value: its placement in `table` (for a free leaf, the one its first user asked for).
    pub placement_of: IdVec<ValueId, PlId>,
    /// Per value: an unannotated input or param, which tpc loads in whatever placement each
    /// user needs, without communication.
    pub free: IdVec<ValueId, bool>,
    /// The first node of each block instance whose forward-pass choices were copied from an
    /// earlier instance that read the same inputs, per axis and pass in order (a statistic: the
    /// outcome is the same as computing them).
    pub copied_instances: Vec<NodeId>,
}

impl Sharding {
    /// The rule of node `n`, if it has one.
    pub fn rule(&self, n: NodeId) -> Option<&Rule> {
        self.rule_of[n].map(|r| &self.rules[r as usize])
    }

    /// The strategies of node `n`, one per mesh axis (empty for a node without a rule).
    pub fn strategies(&self, n: NodeId) -> &[Strategy] {
        if self.rule_of[n].is_none() {
            return &[];
        }
        let r = self.mesh.rank();
        &self.strategies[n.index() * r..(n.index() + 1) * r]
    }

    /// The placement of value `v`.
    pub fn placement(&self, v: ValueId) -> &Placement {
        self.table.get(self.placement_of[v])
    }

    /// The placement node `n` needs its operand `i` in, interned in `table`.
    pub fn operand_placement(
        &self,
        g: &Graph,
        n: NodeId,
        i: usize,
        table: &mut PlacementTable,
    ) -> PlId {
        let v = g.node(n).inputs[i];
        let states = self.strategies(n).iter();
        match self.rule(n) {
            Some(rule) => table.intern_axes(g.ty(v).rank(), states.map(|s| s.operand(rule, i))),
            None => table.intern_axes(g.ty(v).rank(), []),
        }
    }

    /// The placement node `n` computes its results in (before any constraint on them),
    /// interned in `table`.
    pub fn computed_placement(&self, g: &Graph, n: NodeId, table: &mut PlacementTable) -> PlId {
        let rank = g
            .node(n)
            .outputs
            .first()
            .map(|v| g.ty(*v).rank())
            .unwrap_or(0);
        let states = self.strategies(n).iter();
        match self.rule(n) {
            Some(rule) => table.intern_axes(rank, states.map(|s| s.result(rule))),
            None => table.intern_axes(rank, []),
        }
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
    propagate_with(g, mesh, dev, true)
}

/// `propagate`, copying repeated block instances when `reuse` (else every node is computed).
fn propagate_with(
    g: &Graph,
    mesh: &Mesh,
    dev: &Device,
    reuse: bool,
) -> Result<Sharding, ShardError> {
    let mut table = PlacementTable::default();
    let fixed = fixed_placements(g, mesh, &mut table)?;
    let pins = axis_pins(g, mesh, &fixed);
    let free: IdVec<ValueId, bool> = g
        .values()
        .map(|(v, val)| g.node(val.node).op.is_leaf() && fixed[v].is_none())
        .collect();
    let mut rules: Vec<Rule> = Vec::new();
    let mut rule_ids: HashMap<Rule, u32, FxBuild> = HashMap::default();
    let mut rule_of: IdVec<NodeId, Option<u32>> = IdVec::default();
    let mut compute: IdVec<NodeId, f64> = IdVec::default();
    let (mut ins, mut outs): (Vec<&TensorType>, Vec<&TensorType>) = (Vec::new(), Vec::new());
    for (_, n) in g.nodes() {
        ins.clear();
        ins.extend(n.inputs.iter().map(|v| g.ty(*v)));
        outs.clear();
        outs.extend(n.outputs.iter().map(|v| g.ty(*v)));
        rule_of.push(rule(&n.op, &ins, &outs).map(|r| {
            *rule_ids.entry(r).or_insert_with_key(|r| {
                rules.push(r.clone());
                rules.len() as u32 - 1
            })
        }));
        let dtype = outs
            .first()
            .map(|t| t.dtype)
            .unwrap_or(crate::ir::Dtype::F32);
        compute.push(cost::compute_time(
            cost::flops(&n.op, &ins, &outs),
            dtype,
            dev,
        ));
    }
    let bytes: IdVec<ValueId, f64> = g.values().map(|(_, v)| v.ty.size_bytes() as f64).collect();
    let param: IdVec<ValueId, bool> = g
        .values()
        .map(|(_, v)| matches!(g.node(v.node).op, Op::Param { .. }))
        .collect();
    let late: IdVec<NodeId, bool> = g
        .nodes()
        .map(|(_, n)| g.region(n.region).phase != Phase::Forward)
        .collect();
    let held = held(g, &late);
    let edges = Edges::new(g);
    let instances = if reuse {
        memo::instances(g)
    } else {
        Vec::new()
    };
    let mut copied_instances = Vec::new();
    let rank = mesh.rank();
    let mut strategies = vec![Strategy::Replicate; g.num_nodes() * rank];
    let mut states = vec![AxisPl::Replicate; g.num_values() * rank];
    let inert = g.pipeline().and_then(|p| mesh.axis_index(&p.axis));
    for a in 0..rank {
        // The pipeline axis splits nothing: every value stays whole on each stage's devices.
        if inert == Some(a) {
            continue;
        }
        let pinned: HashMap<ValueId, AxisPl> = pins
            .iter()
            .filter(|(_, b, _)| *b == a)
            .map(|&(v, _, s)| (v, s))
            .collect();
        // A value pinned along this axis is placed here, not loaded as each user asks.
        let free_here = (!pinned.is_empty()).then(|| {
            let mut f = free.clone();
            pinned.keys().for_each(|v| f[*v] = false);
            f
        });
        let local_bytes = per_device(&bytes, &states, mesh, a, |s| matches!(s, AxisPl::Shard(_)));
        let local_compute = per_device(&compute, &strategies, mesh, a, |s| s.label().is_some());
        let ctx = AxisCtx {
            g,
            mesh,
            a,
            n: mesh.axis_size(a),
            dev,
            fixed: &fixed,
            pinned: &pinned,
            fixed_axis: (0..table.len() as PlId)
                .map(|id| table.get(id).axis(a))
                .collect(),
            bytes: &local_bytes,
            param: &param,
            held: &held,
            free: free_here.as_ref().unwrap_or(&free),
            rules: &rules,
            rule_of: &rule_of,
            compute: &local_compute,
            edges: &edges,
        };
        let (choice, st, copied) = ctx.run(&strategies, rank, &instances);
        copied_instances.extend(copied);
        for (i, s) in choice.into_iter().enumerate() {
            if let Some(s) = s {
                strategies[i * rank + a] = s;
            }
        }
        for (i, s) in st.into_iter().enumerate() {
            states[i * rank + a] = s;
        }
    }
    let mut free = free;
    for &(v, _, _) in &pins {
        free[v] = false;
    }
    check_pins_divide(g, mesh, &pins, &states)?;
    let placement_of = g
        .values()
        .map(|(v, val)| match fixed[v] {
            Some(id) => id,
            None => table.intern_axes(
                val.ty.rank(),
                states[v.index() * rank..(v.index() + 1) * rank]
                    .iter()
                    .copied(),
            ),
        })
        .collect();
    Ok(Sharding {
        mesh: mesh.clone(),
        rules,
        rule_of,
        strategies,
        table,
        placement_of,
        free,
        copied_instances,
    })
}

/// Per value, whether its bytes weigh in the memory term: in a forward program every value; in
/// a training step the leaves, the program's outputs and the forward's values that the backward
/// reads (the activations kept). Any other value of a step lives from its producer to its last
/// reader within one phase, and adds to the peak at most while it lives: pricing each such
/// transient as if it were kept made the largest shapes trade a few milliseconds of
/// communication for a transient's gigabyte, one node at a time.
fn held(g: &Graph, late: &IdVec<NodeId, bool>) -> IdVec<ValueId, bool> {
    let training = late.iter().any(|(_, &l)| l);
    let mut held: IdVec<ValueId, bool> = g
        .values()
        .map(|(v, val)| {
            !training
                || g.node(val.node).op.is_leaf()
                || (!late[val.node] && g.users(v).iter().any(|&u| late[u]))
        })
        .collect();
    for o in g.outputs() {
        held[o.value] = true;
    }
    held
}

/// `whole` per entity (a value's bytes, a node's compute time) divided by the sizes of the axes
/// before `a` whose choice (`per_axis`, `rank` per entity) `splits` it: what one device holds or
/// does once the earlier axes are decided, so that bytes moved, bytes kept and compute along `a`
/// are weighed per device (an activation split over dp is not charged its whole batch along tp).
fn per_device<I: crate::ir::EntityId, S: Copy>(
    whole: &IdVec<I, f64>,
    per_axis: &[S],
    mesh: &Mesh,
    a: usize,
    splits: impl Fn(S) -> bool,
) -> IdVec<I, f64> {
    let rank = mesh.rank();
    whole
        .iter()
        .map(|(i, &w)| {
            let at = i.index() * rank;
            let parts: u64 = (0..a)
                .filter(|&b| splits(per_axis[at + b]))
                .map(|b| mesh.axis_size(b))
                .product();
            w / parts as f64
        })
        .collect()
}

/// Placements required by annotations; an annotation that does not divide is an error.
fn fixed_placements(
    g: &Graph,
    mesh: &Mesh,
    table: &mut PlacementTable,
) -> Result<IdVec<ValueId, Option<PlId>>, ShardError> {
    let mut fixed = IdVec::filled(g.num_values(), None);
    for (v, a) in g.annotations() {
        let p = Placement::from_spec(&a.spec, mesh).expect("the mesh includes every declared axis");
        check_divides(g, *v, &p, mesh, a.span)?;
        fixed[*v] = Some(table.intern_owned(p));
    }
    for pin in g.pins() {
        let Some(id) = fixed[pin.value] else { continue };
        let a = mesh
            .axis_index(&pin.axis)
            .expect("the mesh includes every declared axis");
        // The verifier keeps a pinned axis out of the value's annotation, so the annotation
        // leaves it replicated: a split pin joins its dim at the minor end.
        let mut p = table.get(id).clone();
        match pin.state {
            PinState::Shard(d) => p.dims[d].push(a),
            PinState::Partial => p.partial[a] = Some(PartialOp::Sum),
            PinState::Replicate => {}
        }
        let span = g.annotation(pin.value).map_or(Span::default(), |x| x.span);
        check_divides(g, pin.value, &p, mesh, span)?;
        fixed[pin.value] = Some(table.intern_owned(p));
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

/// The state a pin fixes along its axis.
fn pin_state(s: PinState) -> AxisPl {
    match s {
        PinState::Shard(d) => AxisPl::Shard(d),
        PinState::Replicate => AxisPl::Replicate,
        PinState::Partial => AxisPl::Partial(PartialOp::Sum),
    }
}

/// The pins of unannotated values (an annotated value's pins are folded into its fixed
/// placement), as (value, axis index, state).
fn axis_pins(
    g: &Graph,
    mesh: &Mesh,
    fixed: &IdVec<ValueId, Option<PlId>>,
) -> Vec<(ValueId, usize, AxisPl)> {
    g.pins()
        .filter(|p| fixed[p.value].is_none())
        .filter_map(|p| Some((p.value, mesh.axis_index(&p.axis)?, pin_state(p.state))))
        .collect()
}

/// Every pinned value's final placement divides its shape.
fn check_pins_divide(
    g: &Graph,
    mesh: &Mesh,
    pins: &[(ValueId, usize, AxisPl)],
    states: &[AxisPl],
) -> Result<(), ShardError> {
    let rank = mesh.rank();
    for &(v, _, _) in pins {
        let st = &states[v.index() * rank..(v.index() + 1) * rank];
        let p = Placement::from_axes(g.ty(v).rank(), st);
        check_divides(g, v, &p, mesh, g.node(g.value(v).node).span)?;
    }
    Ok(())
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
    fixed: &'a IdVec<ValueId, Option<PlId>>,
    /// Unannotated values pinned along this axis, with their state.
    pinned: &'a HashMap<ValueId, AxisPl>,
    /// Per placement of the table, its state along this axis.
    fixed_axis: Vec<AxisPl>,
    /// Per value, its size in bytes.
    bytes: &'a IdVec<ValueId, f64>,
    /// Per value, whether it is a param.
    param: &'a IdVec<ValueId, bool>,
    /// Per value, whether its bytes are held beyond the node that reads it (see [`held`]).
    held: &'a IdVec<ValueId, bool>,
    free: &'a IdVec<ValueId, bool>,
    rules: &'a [Rule],
    rule_of: &'a IdVec<NodeId, Option<u32>>,
    compute: &'a IdVec<NodeId, f64>,
    edges: &'a Edges,
}

/// The operands and results of every node in two flat lists, so that the passes read a few
/// dense arrays instead of every `Node`.
struct Edges {
    ins_at: Vec<u32>,
    ins: Vec<ValueId>,
    outs_at: Vec<u32>,
    outs: Vec<ValueId>,
}

impl Edges {
    fn new(g: &Graph) -> Self {
        let mut e = Edges {
            ins_at: Vec::with_capacity(g.num_nodes() + 1),
            ins: Vec::new(),
            outs_at: Vec::with_capacity(g.num_nodes() + 1),
            outs: Vec::with_capacity(g.num_values()),
        };
        e.ins_at.push(0);
        e.outs_at.push(0);
        for (_, n) in g.nodes() {
            e.ins.extend_from_slice(&n.inputs);
            e.outs.extend_from_slice(&n.outputs);
            e.ins_at.push(e.ins.len() as u32);
            e.outs_at.push(e.outs.len() as u32);
        }
        e
    }

    fn inputs(&self, id: NodeId) -> &[ValueId] {
        &self.ins[self.ins_at[id.index()] as usize..self.ins_at[id.index() + 1] as usize]
    }

    fn outputs(&self, id: NodeId) -> &[ValueId] {
        &self.outs[self.outs_at[id.index()] as usize..self.outs_at[id.index() + 1] as usize]
    }
}

/// What each value's users (and the program outputs) require along one axis, sorted and
/// deduplicated: value `v`'s states are `list[start[v]..start[v + 1]]`, and `count[k]` is how
/// many operands (and outputs) require `list[k]`.
#[derive(Default)]
struct Demands {
    start: Vec<u32>,
    list: Vec<AxisPl>,
    count: Vec<u32>,
    /// What the program outputs require, as (value, state).
    outputs: Vec<(ValueId, AxisPl)>,
}

impl Demands {
    fn of(&self, v: ValueId) -> &[AxisPl] {
        &self.list[self.range(v)]
    }

    /// How many operands (and outputs) require `v` in state `s`.
    fn count(&self, v: ValueId, s: AxisPl) -> u32 {
        let r = self.range(v);
        self.list[r.clone()]
            .iter()
            .position(|&x| x == s)
            .map_or(0, |k| self.count[r.start + k])
    }

    /// The counts of `of(v)`, in its order.
    fn counts(&self, v: ValueId) -> &[u32] {
        &self.count[self.range(v)]
    }

    fn range(&self, v: ValueId) -> std::ops::Range<usize> {
        self.start[v.index()] as usize..self.start[v.index() + 1] as usize
    }
}

impl AxisCtx<'_> {
    fn rule(&self, id: NodeId) -> Option<&Rule> {
        self.rule_of[id].map(|r| &self.rules[r as usize])
    }

    /// Chosen strategy per node and state per value along this axis, and the first nodes of the
    /// instances copied; `earlier` holds the strategies of the previous axes (`rank` per node).
    fn run(
        &self,
        earlier: &[Strategy],
        rank: usize,
        instances: &[memo::Instance],
    ) -> (Vec<Option<Strategy>>, Vec<AxisPl>, Vec<NodeId>) {
        let g = self.g;
        let mut st: Vec<AxisPl> = (0..g.num_values())
            .map(|v| {
                self.fixed_state(ValueId::new(v))
                    .unwrap_or(AxisPl::Replicate)
            })
            .collect();
        let mut choice: Vec<Option<Strategy>> = vec![None; g.num_nodes()];
        if self.n == 1 {
            for (i, r) in self.rule_of.iter() {
                if r.is_some() {
                    choice[i.index()] = Some(Strategy::Replicate);
                }
            }
            return (choice, st, Vec::new());
        }
        let mut memo = self.memo(instances, earlier, rank);
        let mut demand = Demands::default();
        let mut have_demand = false;
        for _ in 0..MAX_PASSES {
            let d = have_demand.then_some(&demand);
            let changed = self.forward(&mut memo, &mut st, &mut choice, d, earlier, rank);
            self.free_leaf_states(&choice, &mut st);
            if !changed && have_demand {
                break;
            }
            self.demands(&choice, &st, &mut demand);
            have_demand = true;
        }
        (choice, st, memo.copied)
    }

    /// One forward pass over the nodes in order, copying block instances the memo knows; true
    /// when some choice changed.
    fn forward(
        &self,
        memo: &mut memo::Memo,
        st: &mut [AxisPl],
        choice: &mut [Option<Strategy>],
        demand: Option<&Demands>,
        earlier: &[Strategy],
        rank: usize,
    ) -> bool {
        let mut changed = false;
        let mut cands: Vec<Strategy> = Vec::new();
        memo.begin_pass();
        let mut i = 0;
        while i < self.g.num_nodes() {
            if let Some(end) = self.copy_instance(memo, i, st, choice, demand, &mut changed) {
                i = end;
                continue;
            }
            let prior = &earlier[i * rank..i * rank + self.a];
            changed |= self.step(NodeId::new(i), st, choice, demand, prior, &mut cands);
            i += 1;
        }
        changed
    }

    /// Chooses the strategy of node `id` (if it has a rule) and sets its results' states;
    /// true when its choice changed.
    fn step(
        &self,
        id: NodeId,
        st: &mut [AxisPl],
        choice: &mut [Option<Strategy>],
        demand: Option<&Demands>,
        prior: &[Strategy],
        cands: &mut Vec<Strategy>,
    ) -> bool {
        let Some(rule) = self.rule(id) else {
            return false;
        };
        let prev = choice[id.index()];
        let best = self.choose(id, rule, st, demand, prior, cands, prev);
        let result = best.result(rule);
        for &o in self.edges.outputs(id) {
            st[o.index()] = self.fixed_state(o).unwrap_or(result);
        }
        let changed = choice[id.index()] != Some(best);
        choice[id.index()] = Some(best);
        changed
    }

    fn fixed_state(&self, v: ValueId) -> Option<AxisPl> {
        match self.fixed[v] {
            Some(id) => Some(self.fixed_axis[id as usize]),
            None => self.pinned.get(&v).copied(),
        }
    }

    /// A free leaf's displayed state: what its first user asked for.
    fn free_leaf_states(&self, choice: &[Option<Strategy>], st: &mut [AxisPl]) {
        for (v, _) in self.g.values() {
            if !self.free[v] {
                continue;
            }
            let first = self.g.users(v).iter().find_map(|&u| {
                let s = choice[u.index()]?;
                let i = self.g.node(u).inputs.iter().position(|&x| x == v)?;
                Some(s.operand(self.rule(u)?, i))
            });
            st[v.index()] = first.unwrap_or(AxisPl::Replicate);
        }
    }

    /// Fills `d` with what each value's users (and the program outputs) require: an output
    /// laid out `like` a value asks for that value's current state.
    fn demands(&self, choice: &[Option<Strategy>], st: &[AxisPl], d: &mut Demands) {
        let g = self.g;
        let nv = g.num_values();
        let outputs: Vec<(ValueId, AxisPl)> = g
            .outputs()
            .iter()
            .map(|o| {
                let annotated = o
                    .annotation
                    .as_ref()
                    .and_then(|a| Placement::from_spec(&a.spec, self.mesh))
                    .map(|p| p.axis(self.a));
                let like = o.like.map(|l| st[l.index()]);
                let want = annotated.or(like).unwrap_or(AxisPl::Replicate);
                (o.value, want)
            })
            .collect();
        // Counting sort by value: `start[v + 1]` first counts, then becomes the fill cursor.
        d.start.clear();
        d.start.resize(nv + 1, 0);
        for id in (0..g.num_nodes()).map(NodeId::new) {
            if choice[id.index()].is_some() {
                for &v in self.edges.inputs(id) {
                    d.start[v.index() + 1] += 1;
                }
            }
        }
        for (v, _) in &outputs {
            d.start[v.index() + 1] += 1;
        }
        for v in 0..nv {
            d.start[v + 1] += d.start[v];
        }
        d.list.clear();
        d.list.resize(d.start[nv] as usize, AxisPl::Replicate);
        let mut fill: Vec<u32> = d.start[..nv].to_vec();
        for id in (0..g.num_nodes()).map(NodeId::new) {
            if let Some(s) = choice[id.index()] {
                let rule = self.rule(id).expect("a chosen node has a rule");
                for (i, &v) in self.edges.inputs(id).iter().enumerate() {
                    d.list[fill[v.index()] as usize] = s.operand(rule, i);
                    fill[v.index()] += 1;
                }
            }
        }
        for &(v, want) in &outputs {
            d.list[fill[v.index()] as usize] = want;
            fill[v.index()] += 1;
        }
        d.outputs = outputs;
        // Sort and deduplicate each value's run, compacting the list in place and counting.
        d.count.clear();
        let mut w = 0usize;
        for v in 0..nv {
            let (lo, hi) = (d.start[v] as usize, d.start[v + 1] as usize);
            d.list[lo..hi].sort();
            d.start[v] = w as u32;
            for r in lo..hi {
                if r == lo || d.list[r] != d.list[r - 1] {
                    d.list[w] = d.list[r];
                    d.count.push(1);
                    w += 1;
                } else {
                    d.count[w - 1] += 1;
                }
            }
        }
        d.start[nv] = w as u32;
        d.list.truncate(w);
    }

    /// The cheapest candidate strategy of node `id`, whose choice in the previous pass was
    /// `prev`.
    #[allow(clippy::too_many_arguments)]
    fn choose(
        &self,
        id: NodeId,
        rule: &Rule,
        st: &[AxisPl],
        demand: Option<&Demands>,
        earlier: &[Strategy],
        cands: &mut Vec<Strategy>,
        prev: Option<Strategy>,
    ) -> Strategy {
        self.candidates(id, rule, st, demand, earlier, cands);
        let users = Users { demand, prev };
        let mut best: Option<(f64, Strategy)> = None;
        for &s in cands.iter() {
            let c = self.cost(id, rule, s, st, &users);
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

    /// Into `out`, of `Strategy::all`: Replicate, each label some operand, annotation or user
    /// splits (if it divides), and pass-through of Partial operands through linear ops.
    fn candidates(
        &self,
        id: NodeId,
        rule: &Rule,
        st: &[AxisPl],
        demand: Option<&Demands>,
        earlier: &[Strategy],
        out: &mut Vec<Strategy>,
    ) {
        let (inputs, outputs) = (self.edges.inputs(id), self.edges.outputs(id));
        out.clear();
        let wanted = |x: AxisPl| {
            outputs.iter().any(|&o| {
                self.fixed_state(o) == Some(x) || demand.is_some_and(|d| d.of(o).contains(&x))
            })
        };
        let divides = |l: Label| {
            let prior: u64 = earlier
                .iter()
                .enumerate()
                .filter(|(_, s)| s.label() == Some(l))
                .map(|(a, _)| self.mesh.axis_size(a))
                .product();
            rule.sizes[l].is_multiple_of(self.n * prior)
        };
        let split = |l: Label| {
            if !divides(l) {
                return false;
            }
            let s = Strategy::Split(l);
            let result = s.result(rule);
            let internal = s.internal(rule);
            inputs.iter().enumerate().any(|(i, v)| {
                let req = s.operand(rule, i);
                // An operand split so, or a copy split so that its other users ask for.
                let copied = || demand.is_some_and(|d| d.of(*v).contains(&req));
                !self.free[*v] && req != AxisPl::Replicate && (st[v.index()] == req || copied())
            }) || (result != AxisPl::Replicate && wanted(result))
                || (internal
                    && inputs.iter().enumerate().any(|(i, v)| {
                        let req = s.operand(rule, i);
                        st[v.index()] == req && matches!(req, AxisPl::Shard(_))
                    }))
        };
        let scatter = |l: Label| divides(l) && self.scatters(rule, Strategy::Split(l), st, inputs);
        let partial_in = |k: usize| {
            let (op, set) = &rule.linear[k];
            set.iter()
                .any(|&i| st[inputs[i].index()] == AxisPl::Partial(*op))
        };
        out.extend(Strategy::all(rule).filter(|&s| match s {
            Strategy::Replicate => true,
            Strategy::Split(l) => split(l) || scatter(l),
            Strategy::Linear(k) => partial_in(k),
        }));
    }

    /// Strategy `s` reduce-scatters a partial-sum operand into a split result along the dim
    /// right before its last (the sequence of `[batch, sequence, features]`, the rows of
    /// `[rows, features]`): sequence parallelism, the partial output of a row-parallel matmul
    /// split by rows where the row-wise ops (residual adds, norms) keep it split. Never when
    /// `--sequence-parallel off`.
    fn scatters(&self, rule: &Rule, s: Strategy, st: &[AxisPl], inputs: &[ValueId]) -> bool {
        self.dev.sequence_parallel != SequenceParallel::Off
            && !self.mesh.is_temporal(self.a)
            && s.label().is_some_and(|l| rule.result.contains(&Some(l)))
            && inputs.iter().enumerate().any(|(i, v)| {
                !self.free[*v]
                    && st[v.index()] == AxisPl::Partial(PartialOp::Sum)
                    && matches!(s.operand(rule, i), AxisPl::Shard(d) if d + 2 == self.g.ty(*v).rank())
            })
    }

    /// The users of `v` with node `id`'s rule that read `v` where `id` does (`id` among them).
    fn siblings(&self, id: NodeId, v: ValueId) -> usize {
        let at = |u: NodeId| self.edges.inputs(u).iter().position(|&x| x == v);
        let (rule, pos) = (self.rule_of[id], at(id));
        let mut users: Vec<NodeId> = self.g.users(v).to_vec();
        users.dedup();
        users
            .into_iter()
            .filter(|&u| self.rule_of[u] == rule && at(u) == pos)
            .count()
            .max(1)
    }

    fn bytes(&self, v: ValueId, s: AxisPl) -> f64 {
        let b = self.bytes[v];
        if matches!(s, AxisPl::Shard(_)) {
            b / self.n as f64
        } else {
            b
        }
    }

    /// Seconds to move `v` from state `from` to `to` along this axis (`bytes` of the whole).
    fn reshard(&self, v: ValueId, from: AxisPl, to: AxisPl) -> f64 {
        if self.mesh.is_temporal(self.a) {
            return temporal_reshard(from, to);
        }
        let whole = self.bytes[v];
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

    /// The price of moving result `o` from `placed` to `want` for a user that asked for `want`
    /// in the previous pass. A move from one split to another weighs a hair less than the
    /// same move of an operand: through a chain of layout-preserving ops between a producer
    /// and a consumer that disagree, each node in between sees the two as a tie (its users'
    /// demands are a pass old), and the tie leaves the all-to-all to a later node, until it
    /// reaches the consumer that wants the producer's layout and vanishes. A program output's
    /// layout is no demand of the previous pass: it weighs in full.
    fn demanded(&self, d: &Demands, o: ValueId, placed: AxisPl, want: AxisPl) -> f64 {
        let c = self.reshard(o, placed, want);
        match (placed, want) {
            (AxisPl::Shard(_), AxisPl::Shard(_)) if !d.outputs.contains(&(o, want)) => {
                c * (1.0 - 1e-6)
            }
            _ => c,
        }
    }

    /// Objective of running node `id` with strategy `s`: operand reshards, compute, the future
    /// reshards its users need, and memory (params weighted by their training state). An
    /// operand in the state this node reads it is one buffer (and, resharded, one move) for
    /// every user that reads it so (partitioning reshards a value once per state), so its
    /// share of them is what it pays.
    fn cost(&self, id: NodeId, rule: &Rule, s: Strategy, st: &[AxisPl], users: &Users) -> f64 {
        let (inputs, outputs) = (self.edges.inputs(id), self.edges.outputs(id));
        let demand = users.demand;
        let dev = self.dev;
        let mut c = 0.0;
        for (i, &v) in inputs.iter().enumerate() {
            let req = s.operand(rule, i);
            // A value read twice in one state (`g * g`) is one buffer and one move.
            if (0..i).any(|j| inputs[j] == v && s.operand(rule, j) == req) {
                continue;
            }
            let factor = if self.param[v] {
                dev.param_state_factor
            } else {
                1.0
            };
            let mut term = self.bytes(v, req) * factor * dev.mem_weight;
            if !self.free[v] {
                term += self.reshard(v, st[v.index()], req);
                term /= users.sharing(self, id, rule, v, (st[v.index()], req));
            }
            c += term;
        }
        let frac = if s.label().is_some() {
            1.0 / self.n as f64
        } else {
            1.0
        };
        c += self.compute[id] * frac;
        if s.internal(rule) {
            let rows = self.bytes[inputs[1]];
            c += match self.mesh.is_temporal(self.a) {
                true => 1e30,
                false => 3.0 * CollectiveKind::AllReduce.time(self.n, rows, dev),
            };
        }
        let result = s.result(rule);
        // Before users have said what they need, a scattered result is costed as the gather
        // its replicated users will need (the mirror of a partial result's all-reduce), so
        // that a reduce-scatter is not taken for a cheaper all-reduce.
        let regather = demand.is_none()
            && self.dev.sequence_parallel == SequenceParallel::Auto
            && self.scatters(rule, s, st, inputs);
        for &o in outputs {
            let placed = self.fixed_state(o).unwrap_or(result);
            c += self.reshard(o, result, placed);
            c += match demand {
                None if regather => self.reshard(o, placed, AxisPl::Replicate),
                Some(d) => d
                    .of(o)
                    .iter()
                    .map(|&want| self.demanded(d, o, placed, want))
                    .sum::<f64>(),
                None if matches!(placed, AxisPl::Partial(_)) => {
                    self.reshard(o, placed, AxisPl::Replicate)
                }
                None => 0.0,
            };
            if self.held[o] {
                c += self.bytes(o, placed) * dev.mem_weight;
            }
        }
        c
    }
}

/// What a node's cost reads of the other users of its operands: the demands of the previous
/// pass and the node's own choice in it.
struct Users<'d> {
    demand: Option<&'d Demands>,
    prev: Option<Strategy>,
}

impl Users<'_> {
    /// How many users share the copy of operand `v` (now in state `now`) in state `req` that
    /// node `id` (of `rule`) asks for: itself and the others that required it in the previous
    /// pass. Before any demand is known, its siblings (users of the same rule reading `v` at
    /// the same operand) are taken to share it, as they face the same choice: a first pass
    /// that priced each copy whole would settle on moving three weights instead of the one
    /// activation that the query, key and value projections read, and later passes only
    /// refine it node by node.
    ///
    /// An all-reduce is not shared so: each reader of a partial value that asks for it whole
    /// pays it whole. Shared, an all-reduce that several readers took first (a gradient read
    /// by three update ops) would keep each of them from moving alone to the reduce-scatter
    /// that all of them would rather share.
    fn sharing(
        &self,
        ctx: &AxisCtx,
        id: NodeId,
        rule: &Rule,
        v: ValueId,
        (now, req): (AxisPl, AxisPl),
    ) -> f64 {
        if matches!(now, AxisPl::Partial(_)) && !matches!(req, AxisPl::Shard(_)) {
            return 1.0;
        }
        let Some(d) = self.demand else {
            return ctx.siblings(id, v) as f64;
        };
        let own = self.prev.map_or(0, |p| {
            let inputs = ctx.edges.inputs(id);
            (0..inputs.len())
                .filter(|&i| inputs[i] == v && p.operand(rule, i) == req)
                .count() as u32
        });
        (1 + d.count(v, req).saturating_sub(own)) as f64
    }
}

/// A move along the temporal (microbatch) axis: free where it stays within one microbatch
/// (slicing a replicated value, accumulating a partial sum); anything else would mix
/// microbatches and is priced out of every choice that has an alternative.
fn temporal_reshard(from: AxisPl, to: AxisPl) -> f64 {
    match (from, to) {
        _ if from == to => 0.0,
        (AxisPl::Replicate, _) | (AxisPl::Partial(PartialOp::Sum), AxisPl::Replicate) => 0.0,
        _ => 1e30,
    }
}
