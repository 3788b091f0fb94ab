//! The plan verifier: checks that the SPMD program computes the global one. Every local op is
//! checked against its global origin and its operands' placements: leaves keep their origin's
//! name and kind; an op is its origin's op (same kind and attributes, operands holding the
//! origin's operands) or a sharded form of it (the vocab-split embedding, the rescaled mean over
//! a split axis, the vocab-parallel cross-entropy); its placements are those a strategy of the
//! op's rule gives on every mesh axis (so Partial(sum) reaches only ops linear in it); each
//! collective or local slice moves exactly its own axis (`sharding::transition`); every value's local
//! type is its origin's type in its placement; and the outputs are the global outputs.
//!
//! `Plan::build` runs it after partitioning (a failure is a compiler bug) and the plan loader
//! runs it on every document (a failure is a corrupt document).

use crate::ir::{
    BinaryOp, Dtype, Graph, IdVec, Local, Node, NodeId, Op, ReduceOp, TensorType, UnaryOp, ValueId,
};
use crate::mesh::Mesh;
use crate::sharding::propagate::Strategy;
use crate::sharding::rules::{rule, Rule};
use crate::sharding::{transition, AxisPl, PartialOp, Placement};
use crate::span::Span;
use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// The class of an inconsistency found by [`verify`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    /// The side tables (placements, origins) or the mesh do not fit the local program.
    Tables,
    /// A placement is malformed, or a value's local type is not its origin's in its placement.
    Placement,
    /// A leaf's name or kind differs from its origin's.
    Leaf,
    /// An op is neither its origin's op nor a sharded form of it, or has no origin.
    Op,
    /// An op's operands do not hold its origin's operands.
    Operands,
    /// An op's placements are not what its rule or its transition gives.
    Transition,
    /// An SPMD op names a mesh axis or a group size the mesh lacks.
    MeshAxis,
    /// The outputs are not the global outputs.
    Output,
}

/// An inconsistency between a plan's local program and its global one.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub struct PlanVerifyError {
    /// Its class.
    pub problem: Problem,
    /// The local node at fault, if one is.
    pub node: Option<NodeId<Local>>,
    /// That node's op, as displayed.
    pub op: String,
    /// The global value the node's results hold a piece of, if any.
    pub origin: Option<ValueId>,
    /// The node's source span.
    pub span: Option<Span>,
    /// What is wrong.
    pub detail: String,
}

impl fmt::Display for PlanVerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(n) = self.node {
            write!(f, "local node {n} ({})", self.op)?;
            if let Some(o) = self.origin {
                write!(f, ", origin {o}")?;
            }
            if let Some(s) = self.span {
                write!(f, ", at {}:{}", s.line, s.col)?;
            }
            f.write_str(": ")?;
        }
        f.write_str(&self.detail)
    }
}

/// What [`verify`] reads: the two programs, the mesh and the per-local-value tables.
#[derive(Clone, Copy)]
pub struct PlanParts<'a> {
    /// The global program.
    pub global: &'a Graph,
    /// The SPMD program.
    pub local: &'a Graph<Local>,
    /// The mesh.
    pub mesh: &'a Mesh,
    /// Per local value, its placement.
    pub placements: &'a IdVec<ValueId<Local>, Placement>,
    /// Per local value, the global value it holds a piece of.
    pub origin: &'a IdVec<ValueId<Local>, Option<ValueId>>,
}

/// Checks that `p`'s local program computes its global program (see the module docs).
pub fn verify(p: PlanParts) -> Result<(), PlanVerifyError> {
    check_tables(&p).map_err(|d| plain(Problem::Tables, d))?;
    let v = Verifier {
        p,
        pending: BTreeMap::new(),
        covered: HashSet::new(),
    };
    v.run()
}

/// An error not tied to one node.
fn plain(problem: Problem, detail: String) -> PlanVerifyError {
    PlanVerifyError {
        problem,
        node: None,
        op: String::new(),
        origin: None,
        span: None,
        detail,
    }
}

/// Table lengths, origin ids and the local program's mesh axes.
fn check_tables(p: &PlanParts) -> Result<(), String> {
    let n = p.local.num_values();
    for (what, len) in [
        ("placements", p.placements.len()),
        ("origin", p.origin.len()),
    ] {
        if len != n {
            return Err(format!(
                "{what} lists {len} entries, but the local program has {n} values"
            ));
        }
    }
    for (v, o) in p.origin.iter() {
        if let Some(o) = o.filter(|o| o.index() >= p.global.num_values()) {
            return Err(format!(
                "the origin of local value {v} is {o}, but the global program has only {} values",
                p.global.num_values()
            ));
        }
    }
    let names: Vec<&str> = p.mesh.axes().iter().map(|(a, _)| a.as_str()).collect();
    if p.local.mesh_axes != names {
        return Err(format!(
            "the local program's mesh axes [{}] are not the mesh's [{}]",
            p.local.mesh_axes.join(", "),
            names.join(", ")
        ));
    }
    Ok(())
}

/// A placement has one entry per dim and per mesh axis, names existing axes, and uses each axis
/// at most once (splitting one dim, or holding partial terms).
fn check_placement(pl: &Placement, rank: usize, mesh: &Mesh) -> Result<(), String> {
    if pl.dims.len() != rank {
        return Err(format!(
            "{} dim entries for a rank-{rank} value",
            pl.dims.len()
        ));
    }
    if pl.partial.len() != mesh.rank() {
        return Err(format!(
            "{} partial entries on a mesh of {} axes",
            pl.partial.len(),
            mesh.rank()
        ));
    }
    let mut used = vec![false; mesh.rank()];
    for (d, axes) in pl.dims.iter().enumerate() {
        for &a in axes {
            let Some(u) = used.get_mut(a) else {
                return Err(format!(
                    "dim {d} is split by mesh axis {a}, but the mesh has {} axes",
                    mesh.rank()
                ));
            };
            if std::mem::replace(u, true) {
                return Err(format!("mesh axis {} is used twice", mesh.axis_name(a)));
            }
        }
    }
    for (a, p) in pl.partial.iter().enumerate() {
        if p.is_some() && used[a] {
            return Err(format!(
                "mesh axis {} both splits a dim and holds partial terms",
                mesh.axis_name(a)
            ));
        }
    }
    Ok(())
}

/// The walk over the local program.
struct Verifier<'a> {
    p: PlanParts<'a>,
    /// Values computed as a local mean over a split axis (or positions), by the block count their
    /// only reader must scale them by; ordered, so the failure `run` reports is deterministic.
    pending: BTreeMap<ValueId<Local>, u64>,
    /// Nodes without an origin recognised as part of a vocab-parallel cross-entropy.
    covered: HashSet<NodeId<Local>>,
}

/// `p` after a redistribute over the mesh axes `group` from split `from` to split `to` (per dim,
/// indices into `group`, major first), or `None` when `p` is not split as `from` says or a group
/// axis holds partial terms.
fn redistributed(
    p: &Placement,
    group: &[usize],
    from: &[Vec<usize>],
    to: &[Vec<usize>],
) -> Option<Placement> {
    let rank = p.dims.len();
    if from.len() != rank || to.len() != rank || group.iter().any(|&a| p.partial[a].is_some()) {
        return None;
    }
    let axes =
        |d: &[usize]| -> Option<Vec<usize>> { d.iter().map(|&i| group.get(i).copied()).collect() };
    let mut out = p.clone();
    for (d, dim) in out.dims.iter_mut().enumerate() {
        let old = axes(&from[d])?;
        let keep = dim.len().checked_sub(old.len())?;
        if dim[keep..] != old[..] {
            return None;
        }
        dim.truncate(keep);
        dim.extend(axes(&to[d])?);
    }
    Some(out)
}

/// An operand and the result holding its value after a data-moving op.
type Pair = (ValueId<Local>, ValueId<Local>);

/// The result of one node-level check: the detail and its class.
type Check = Result<(), (Problem, String)>;

impl<'a> Verifier<'a> {
    fn run(mut self) -> Result<(), PlanVerifyError> {
        let local = self.p.local;
        for (v, _) in local.values() {
            self.check_value(v).map_err(|d| {
                let node = local.value(v).node;
                self.error(node, Problem::Placement, d)
            })?;
        }
        let mut deferred = Vec::new();
        for (id, n) in local.nodes() {
            let o = n.outputs.first().and_then(|&v| self.p.origin[v]);
            if o.is_none() && transition(&n.op).is_none() {
                deferred.push(id);
                continue;
            }
            self.check_node(id).map_err(|(k, d)| self.error(id, k, d))?;
        }
        // Origin-less nodes are checked once the losses they belong to have claimed them.
        for id in deferred {
            self.check_node(id).map_err(|(k, d)| self.error(id, k, d))?;
        }
        for (&v, &k) in &self.pending {
            let id = local.value(v).node;
            self.check_scaled(v, k)
                .map_err(|d| self.error(id, Problem::Op, d))?;
        }
        self.check_outputs().map_err(|d| plain(Problem::Output, d))
    }

    /// A typed error at local node `id`.
    fn error(&self, id: NodeId<Local>, problem: Problem, detail: String) -> PlanVerifyError {
        let n = self.p.local.node(id);
        PlanVerifyError {
            problem,
            node: Some(id),
            op: n.op.to_string(),
            origin: n.outputs.first().and_then(|&v| self.p.origin[v]),
            span: Some(n.span),
            detail,
        }
    }

    fn pl(&self, v: ValueId<Local>) -> &'a Placement {
        &self.p.placements[v]
    }

    /// The global value local `v` holds a piece of. A local multi-result node records its
    /// origin's first result for every result: result `k` holds the origin node's result `k`.
    fn held(&self, v: ValueId<Local>) -> Option<ValueId> {
        let (g, l) = (self.p.global, self.p.local);
        let o = self.p.origin[v]?;
        let k = l.value(v).index as usize;
        let gval = g.value(o);
        if k > 0 && gval.index == 0 {
            if let Some(&r) = g.node(gval.node).outputs.get(k) {
                return Some(r);
            }
        }
        Some(o)
    }

    /// True when global `o` is a cross-entropy result, whose vocab-parallel form computes
    /// intermediates of other ranks with `o` as origin.
    fn in_loss(&self, o: ValueId) -> bool {
        let g = self.p.global;
        matches!(g.node(g.value(o).node).op, Op::CrossEntropy)
    }

    /// The placement of `v` is well formed, and `v`'s type is its origin's in that placement.
    fn check_value(&self, v: ValueId<Local>) -> Result<(), String> {
        let (g, mesh) = (self.p.global, self.p.mesh);
        let ty = self.p.local.ty(v);
        let pl = self.pl(v);
        let o = self.p.origin[v];
        let loss_term = o.is_some_and(|o| self.in_loss(o) && ty.rank() != g.ty(o).rank());
        let rank = match o {
            Some(o) if loss_term && pl.dims.len() == g.ty(o).rank() => pl.dims.len(),
            _ => ty.rank(),
        };
        check_placement(pl, rank, mesh)
            .map_err(|e| format!("the placement of local value {v} {ty}: {e}"))?;
        let Some(h) = self.held(v).filter(|_| !loss_term) else {
            return Ok(());
        };
        let gty = g.ty(h);
        let want = (pl.dims.len() == gty.rank())
            .then(|| pl.local_shape(gty, mesh).map(|s| gty.with_shape(s)))
            .flatten();
        if want.as_ref() != Some(ty) {
            let placed = match want {
                Some(t) => format!("is {t}"),
                None => "does not fit".to_string(),
            };
            return Err(format!(
                "local value {v} is {ty} in {}, but its origin {h} {gty} in that placement {placed}",
                pl.display(mesh)
            ));
        }
        Ok(())
    }

    fn check_node(&mut self, id: NodeId<Local>) -> Check {
        let n = self.p.local.node(id);
        self.check_axes(&n.op).map_err(|d| (Problem::MeshAxis, d))?;
        let o = n.outputs.first().and_then(|&v| self.p.origin[v]);
        if transition(&n.op).is_some() {
            return self.check_move(id);
        }
        if let Op::Redistribute { axes, from, to } = &n.op {
            return self.check_redistribute(id, axes, from, to);
        }
        match o {
            Some(o) if n.op.is_leaf() => self.check_leaf(id, o),
            Some(o) => self.check_form(id, o),
            None if self.covered.contains(&id) => self.check_local_rule(id),
            None => Err((
                Problem::Op,
                "it has no origin and is not part of a vocab-parallel cross-entropy".into(),
            )),
        }
    }

    /// An SPMD op names mesh axes of the mesh with their real sizes.
    fn check_axes(&self, op: &Op) -> Result<(), String> {
        let mesh = self.p.mesh;
        for (name, size) in op.mesh_axes() {
            let Some(a) = mesh.axis_index(name) else {
                return Err(format!(
                    "names mesh axis {name:?}, which the mesh {mesh} lacks"
                ));
            };
            if let Some(k) = size.filter(|&k| k != mesh.axis_size(a)) {
                return Err(format!(
                    "claims {k} devices along {name}, but the mesh {mesh} has {}",
                    mesh.axis_size(a)
                ));
            }
        }
        Ok(())
    }

    /// The operand and result of a data-moving op: one each, holding the same global value.
    fn moved_value(
        &self,
        n: &Node<Local>,
    ) -> Result<(ValueId<Local>, ValueId<Local>), (Problem, String)> {
        let (&[x], &[y]) = (n.inputs.as_slice(), n.outputs.as_slice()) else {
            return Err((
                Problem::Operands,
                "it must have one operand and one result".into(),
            ));
        };
        self.same_origin(x, y)?;
        Ok((x, y))
    }

    fn same_origin(&self, x: ValueId<Local>, y: ValueId<Local>) -> Check {
        if self.p.origin[x] != self.p.origin[y] {
            return Err((
                Problem::Operands,
                format!("its operand {x} holds another value than its result {y}"),
            ));
        }
        Ok(())
    }

    /// The operand/result pairs a data-moving op moves: one, or for an all-reduce bucket one
    /// per operand, result `k` holding operand `k`'s value.
    fn moved_pairs(&self, n: &Node<Local>) -> Result<Vec<Pair>, (Problem, String)> {
        if !matches!(n.op, Op::AllReduce { .. }) || n.inputs.len() < 2 {
            return Ok(vec![self.moved_value(n)?]);
        }
        if n.inputs.len() != n.outputs.len() {
            return Err((
                Problem::Operands,
                format!(
                    "a bucket of {} operands must have as many results, not {}",
                    n.inputs.len(),
                    n.outputs.len()
                ),
            ));
        }
        let pairs: Vec<_> = n
            .inputs
            .iter()
            .copied()
            .zip(n.outputs.iter().copied())
            .collect();
        for &(x, y) in &pairs {
            self.same_origin(x, y)?;
        }
        Ok(pairs)
    }

    /// A collective or local slice moves its operand along its axis as `sharding::transition` says,
    /// other axes unchanged, and keeps the operand's origin.
    fn check_move(&self, id: NodeId<Local>) -> Check {
        let (n, mesh) = (self.p.local.node(id), self.p.mesh);
        let (name, from, to) = transition(&n.op).expect("checked by the caller");
        let a = mesh.axis_index(name).expect("checked by check_axes");
        if let Op::AllReduce { also, .. } = &n.op {
            if !also.is_empty() {
                return self.check_product(n, from);
            }
        }
        for (x, y) in self.moved_pairs(n)? {
            // A max over copies of one value is that value: the whole-mesh overflow flag
            // (`plan::overflow`) is max-reduced over axes it is replicated on.
            let idempotent = matches!(
                n.op,
                Op::AllReduce {
                    reduce: ReduceOp::Max,
                    ..
                }
            ) && self.pl(x).axis(a) == AxisPl::Replicate;
            let from = if idempotent { AxisPl::Replicate } else { from };
            self.check_pair(name, a, (from, to), x, y)?;
        }
        Ok(())
    }

    /// An all-reduce over several axes moves each of them `from` (or, for a max, Replicate) to
    /// Replicate, other axes unchanged.
    fn check_product(&self, n: &Node<Local>, from: AxisPl) -> Check {
        let mesh = self.p.mesh;
        let axes: Vec<usize> =
            n.op.mesh_axes()
                .into_iter()
                .map(|(a, _)| mesh.axis_index(a).expect("checked by check_axes"))
                .collect();
        let max = from == AxisPl::Partial(PartialOp::Max);
        for (x, y) in self.moved_pairs(n)? {
            let (px, py) = (self.pl(x), self.pl(y));
            let ok = |a: usize| {
                let s = px.axis(a);
                s == from || (max && s == AxisPl::Replicate)
            };
            let moved = axes
                .iter()
                .try_fold(px.clone(), |p, &a| p.moved(a, AxisPl::Replicate));
            if !axes.iter().all(|&a| ok(a)) || moved.as_ref() != Some(py) {
                return Err((
                    Problem::Transition,
                    format!(
                        "it moves {x} in {} to {y} in {}, but it moves {from} -> Replicate over {}",
                        px.display(mesh),
                        py.display(mesh),
                        n.op.mesh_axes()
                            .iter()
                            .map(|(a, _)| *a)
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// One operand/result pair of a data-moving op over axis `a` (`name`) moves `from -> to`.
    fn check_pair(
        &self,
        name: &str,
        a: usize,
        (from, to): (AxisPl, AxisPl),
        x: ValueId<Local>,
        y: ValueId<Local>,
    ) -> Check {
        let mesh = self.p.mesh;
        let (px, py) = (self.pl(x), self.pl(y));
        if px.axis(a) != from || py.axis(a) != to {
            return Err((
                Problem::Transition,
                format!(
                    "it moves {x} in {} to {y} in {}, but it moves {from} -> {to} over {name}",
                    px.display(mesh),
                    py.display(mesh)
                ),
            ));
        }
        if px.moved(a, to).as_ref() != Some(py) {
            return Err((
                Problem::Transition,
                format!(
                    "it runs over {name}, but its placements {} and {} differ on other axes or in the order of a dim's axes",
                    px.display(mesh),
                    py.display(mesh)
                ),
            ));
        }
        Ok(())
    }

    /// A redistribute moves its operand from its group's `from` split to its `to` split; the
    /// axes outside the group (a major prefix of each dim, partial states) stay as they are.
    fn check_redistribute(
        &self,
        id: NodeId<Local>,
        axes: &[(String, u64)],
        from: &[Vec<usize>],
        to: &[Vec<usize>],
    ) -> Check {
        let (n, mesh) = (self.p.local.node(id), self.p.mesh);
        let (x, y) = self.moved_value(n)?;
        let group: Vec<usize> = axes
            .iter()
            .map(|(a, _)| mesh.axis_index(a).expect("checked by check_axes"))
            .collect();
        let (px, py) = (self.pl(x), self.pl(y));
        if redistributed(px, &group, from, to).as_ref() != Some(py) {
            return Err((
                Problem::Transition,
                format!(
                    "it moves {x} in {} to {y} in {}, which is not the move {} says",
                    px.display(mesh),
                    py.display(mesh),
                    n.op
                ),
            ));
        }
        Ok(())
    }

    /// A leaf has its origin's op (kind and name), and is loaded whole (never partial).
    fn check_leaf(&self, id: NodeId<Local>, o: ValueId) -> Check {
        let g = self.p.global;
        let n = self.p.local.node(id);
        let gop = &g.node(g.value(o).node).op;
        if &n.op != gop {
            return Err((Problem::Leaf, format!("its origin {o} is {gop}")));
        }
        if self.pl(n.outputs[0]).has_partial() {
            return Err((Problem::Leaf, "a leaf is never partial".into()));
        }
        Ok(())
    }

    /// A non-leaf op with an origin is the origin's op or one of its sharded forms.
    fn check_form(&mut self, id: NodeId<Local>, o: ValueId) -> Check {
        let (g, l) = (self.p.global, self.p.local);
        let n = l.node(id);
        let gid = g.value(o).node;
        let gop = &g.node(gid).op;
        if g.value(o).index != 0 {
            return Err((
                Problem::Tables,
                format!("its origin {o} is not a first result"),
            ));
        }
        match (&n.op, gop) {
            (
                Op::Scalar { .. },
                Op::Reduce {
                    op: ReduceOp::Mean, ..
                }
                | Op::CrossEntropy,
            ) if n.op != *gop => self.check_scaler(id),
            (Op::VocabEmbedding { axes }, Op::Embedding) => {
                self.check_operands(id, gid)?;
                let table = self.pl(n.inputs[1]);
                if table.dims[0].is_empty() || *axes != self.p.mesh.named_axes(&table.dims[0]) {
                    return Err((
                        Problem::Op,
                        format!("its table is in {}", table.display(self.p.mesh)),
                    ));
                }
                self.check_global_rule(id, gid)
            }
            (Op::Reduce { .. } | Op::Binary { .. }, Op::CrossEntropy) => {
                self.check_vocab_loss(id, gid)
            }
            (Op::Reshape { .. }, Op::Reshape { .. })
            | (Op::BroadcastTo { .. }, Op::BroadcastTo { .. })
            | (Op::Fill { .. }, Op::Fill { .. }) => {
                self.check_operands(id, gid)?;
                self.check_global_rule(id, gid)
            }
            (lop, gop) if lop == gop => {
                self.check_operands(id, gid)?;
                if matches!(gop, Op::Embedding) && !self.pl(n.inputs[1]).dims[0].is_empty() {
                    return Err((
                        Problem::Op,
                        "a plain embedding on a vocab-split table".into(),
                    ));
                }
                self.check_global_rule(id, gid)?;
                self.note_mean(id);
                Ok(())
            }
            _ => Err((
                Problem::Op,
                format!("its origin {o} is computed by {gop}, of which it is not a sharded form"),
            )),
        }
    }

    /// The operands of local `id` hold the operands of global `gid`, in order.
    fn check_operands(&self, id: NodeId<Local>, gid: NodeId) -> Check {
        let (n, gn) = (self.p.local.node(id), self.p.global.node(gid));
        if n.inputs.len() != gn.inputs.len() || n.outputs.len() != gn.outputs.len() {
            return Err((
                Problem::Operands,
                format!(
                    "it has {} operands and {} results, its origin {} and {}",
                    n.inputs.len(),
                    n.outputs.len(),
                    gn.inputs.len(),
                    gn.outputs.len()
                ),
            ));
        }
        for (k, (&y, &gy)) in n.outputs.iter().zip(&gn.outputs).enumerate() {
            if self.held(y) != Some(gy) {
                return Err((
                    Problem::Tables,
                    format!("its result {k} ({y}) does not hold its origin's result {gy}"),
                ));
            }
        }
        for (i, (&x, &gx)) in n.inputs.iter().zip(&gn.inputs).enumerate() {
            if self.held(x) != Some(gx) {
                let held = self
                    .held(x)
                    .map_or("no global value".into(), |h| h.to_string());
                return Err((
                    Problem::Operands,
                    format!("its operand {i} ({x}) holds {held}, but its origin reads {gx}"),
                ));
            }
        }
        Ok(())
    }

    /// The placements of local `id` follow a strategy of global `gid`'s rule on every axis.
    fn check_global_rule(&self, id: NodeId<Local>, gid: NodeId) -> Check {
        let g = self.p.global;
        let gn = g.node(gid);
        let ins: Vec<&TensorType> = gn.inputs.iter().map(|&v| g.ty(v)).collect();
        let outs: Vec<&TensorType> = gn.outputs.iter().map(|&v| g.ty(v)).collect();
        self.check_rule(id, rule(&gn.op, &ins, &outs), true)
    }

    /// The placements of origin-less `id` follow a strategy of its own rule on every axis.
    fn check_local_rule(&self, id: NodeId<Local>) -> Check {
        let l = self.p.local;
        let n = l.node(id);
        if let Op::TargetLogit { axes } = &n.op {
            return self.check_target_logit(n, axes);
        }
        if let (Op::Reshape { .. }, &[x], &[y]) = (&n.op, n.inputs.as_slice(), n.outputs.as_slice())
        {
            // The loss flattens its per-position terms: the flat dim is split by all their axes.
            let want = Placement {
                dims: vec![self.pl(x).dims.concat()],
                partial: self.pl(x).partial.clone(),
            };
            if self.pl(y) != &want {
                return Err((
                    Problem::Transition,
                    format!(
                        "it flattens {} into {}, not {}",
                        self.pl(x).display(self.p.mesh),
                        self.pl(y).display(self.p.mesh),
                        want.display(self.p.mesh)
                    ),
                ));
            }
            return Ok(());
        }
        let ins: Vec<&TensorType> = n.inputs.iter().map(|&v| l.ty(v)).collect();
        let outs: Vec<&TensorType> = n.outputs.iter().map(|&v| l.ty(v)).collect();
        self.check_rule(id, rule(&n.op, &ins, &outs), false)
    }

    /// The target logit reads logits split over `axes` on their last dim and gives a partial sum
    /// over those axes, placed as the labels elsewhere.
    fn check_target_logit(&self, n: &Node<Local>, axes: &[(String, u64)]) -> Check {
        let mesh = self.p.mesh;
        let (&[z, y], &[t]) = (n.inputs.as_slice(), n.outputs.as_slice()) else {
            return Err((Problem::Operands, "it must read logits and labels".into()));
        };
        let vaxes: Vec<usize> = axes
            .iter()
            .filter_map(|(a, _)| mesh.axis_index(a))
            .collect();
        let mut want = self.pl(y).clone();
        for &a in &vaxes {
            want.partial[a] = Some(PartialOp::Sum);
        }
        let zl = self.pl(z).dims.last();
        if zl != Some(&vaxes) || self.pl(t) != &want {
            return Err((
                Problem::Transition,
                format!(
                    "it reads logits in {} and gives {}, but should give {}",
                    self.pl(z).display(mesh),
                    self.pl(t).display(mesh),
                    want.display(mesh)
                ),
            ));
        }
        Ok(())
    }

    /// On every mesh axis, some strategy of `rule` gives the operand and result states of `id`
    /// (a vocab-parallel internal contraction does not count); when `canonical`, the
    /// placements are exactly those states (several axes on one dim in mesh order).
    fn check_rule(&self, id: NodeId<Local>, rule: Option<Rule>, canonical: bool) -> Check {
        let (n, mesh) = (self.p.local.node(id), self.p.mesh);
        let Some(rule) = rule else {
            return Err((Problem::Op, "its op has no sharding rule".into()));
        };
        let strategies: Vec<Strategy> = Strategy::all(&rule)
            .filter(|s| !s.internal(&rule))
            .collect();
        let ins: Vec<&Placement> = n.inputs.iter().map(|&v| self.pl(v)).collect();
        let outs: Vec<&Placement> = n.outputs.iter().map(|&v| self.pl(v)).collect();
        let mut chosen = Vec::with_capacity(mesh.rank());
        for a in 0..mesh.rank() {
            let fits = |s: &&Strategy| {
                ins.iter()
                    .enumerate()
                    .all(|(i, p)| p.axis(a) == s.operand(&rule, i))
                    && outs.iter().all(|p| p.axis(a) == s.result(&rule))
            };
            let Some(&s) = strategies.iter().find(fits) else {
                let states: Vec<String> = ins.iter().map(|p| p.axis(a).to_string()).collect();
                let res = outs.first().map_or("-".into(), |p| p.axis(a).to_string());
                return Err((
                    Problem::Transition,
                    format!(
                        "over {} it reads [{}] and gives {res}, which no strategy of its rule does{}",
                        mesh.axis_name(a),
                        states.join(", "),
                        if ins.iter().any(|p| matches!(p.axis(a), AxisPl::Partial(_))) {
                            " (it is not linear in its partial operands)"
                        } else {
                            ""
                        }
                    ),
                ));
            };
            chosen.push(s);
        }
        if canonical {
            self.check_canonical(&rule, &chosen, &ins, &outs)?;
        }
        Ok(())
    }

    /// Operand and result placements are the canonical ones of the per-axis strategies.
    fn check_canonical(
        &self,
        rule: &Rule,
        chosen: &[Strategy],
        ins: &[&Placement],
        outs: &[&Placement],
    ) -> Check {
        let mesh = self.p.mesh;
        let bad = |p: &Placement, want: Placement| {
            (p != &want).then(|| {
                (
                    Problem::Transition,
                    format!(
                        "a placement is {}, but its strategies give {}",
                        p.display(mesh),
                        want.display(mesh)
                    ),
                )
            })
        };
        for (i, p) in ins.iter().enumerate() {
            let states: Vec<AxisPl> = chosen.iter().map(|s| s.operand(rule, i)).collect();
            if let Some(e) = bad(p, Placement::from_axes(p.dims.len(), &states)) {
                return Err(e);
            }
        }
        let states: Vec<AxisPl> = chosen.iter().map(|s| s.result(rule)).collect();
        for p in outs {
            if let Some(e) = bad(p, Placement::from_axes(p.dims.len(), &states)) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Records a local mean over split positions, which its only reader must rescale: a mean
    /// over a split axis, or a cross-entropy over split positions.
    fn note_mean(&mut self, id: NodeId<Local>) {
        let n = self.p.local.node(id);
        let k = match &n.op {
            Op::Reduce {
                op: ReduceOp::Mean,
                axis,
                ..
            } => self.pl(n.inputs[0]).splits(*axis, self.p.mesh),
            Op::CrossEntropy => self.pl(n.inputs[1]).blocks(self.p.mesh),
            _ => 1,
        };
        if k > 1 {
            self.pending.insert(n.outputs[0], k);
        }
    }

    /// A scaler of a mean: its operand is a pending local mean of the same origin and placement.
    fn check_scaler(&mut self, id: NodeId<Local>) -> Check {
        let n = self.p.local.node(id);
        let (&[x], &[y]) = (n.inputs.as_slice(), n.outputs.as_slice()) else {
            return Err((
                Problem::Operands,
                "it must have one operand and one result".into(),
            ));
        };
        if !self.pending.contains_key(&x) || self.p.origin[x] != self.p.origin[y] {
            return Err((
                Problem::Op,
                "a scalar op whose origin is a mean must rescale that mean's local result".into(),
            ));
        }
        if self.pl(x) != self.pl(y) {
            return Err((
                Problem::Transition,
                "rescaling changes the placement".into(),
            ));
        }
        Ok(())
    }

    /// A pending local mean `v` over `k` blocks is read once, by `* (1/k)`, and is no output.
    fn check_scaled(&self, v: ValueId<Local>, k: u64) -> Result<(), String> {
        let l = self.p.local;
        let ok = match l.users(v) {
            [u] => {
                let n = l.node(*u);
                n.inputs == [v]
                    && n.op
                        == Op::Scalar {
                            op: BinaryOp::Mul,
                            value: 1.0 / k as f64,
                            scalar_lhs: false,
                        }
            }
            _ => false,
        };
        if !ok || l.outputs().iter().any(|o| o.value == v) {
            return Err(format!(
                "its result {v} is a mean of 1/{k} of the positions: its only reader must scale it by 1/{k}"
            ));
        }
        Ok(())
    }

    /// The vocab-parallel cross-entropy ending at local `id` (origin the global loss `gid`):
    /// `per = log(allreduce_sum(sum(exp(z)))) - allreduce_sum(target_logit(z, y))` with
    /// `z = x - allreduce_max(max(x))`, then (for a non-scalar loss) `mean(reshape(per))`.
    /// Marks its origin-less nodes as covered; they are checked by their own rules.
    fn check_vocab_loss(&mut self, id: NodeId<Local>, gid: NodeId) -> Check {
        let l = self.p.local;
        let gn = self.p.global.node(gid);
        let mut m = Matcher {
            l,
            nodes: Vec::new(),
        };
        let n = l.node(id);
        let per = match &n.op {
            Op::Reduce {
                op: ReduceOp::Mean,
                axis: 0,
                keepdims: false,
            } => {
                let flat = m.arg(id, 0, |op| matches!(op, Op::Reshape { .. }))?;
                Some(m.arg(flat, 0, |op| *op == Op::Binary { op: BinaryOp::Sub })?)
            }
            Op::Binary { .. } if n.op == Op::Binary { op: BinaryOp::Sub } => None,
            _ => return Err(m.fail()),
        };
        let per = per.unwrap_or(id);
        let (x, y, vaxes) = m.loss_terms(per, self.p.mesh, self.p.placements)?;
        for (i, (v, gv)) in [(x, gn.inputs[0]), (y, gn.inputs[1])]
            .into_iter()
            .enumerate()
        {
            if self.held(v) != Some(gv) {
                return Err((
                    Problem::Operands,
                    format!("operand {i} of its vocab-parallel loss ({v}) does not hold {gv}"),
                ));
            }
        }
        if vaxes.is_empty() {
            return Err((
                Problem::Op,
                "a vocab-parallel loss on unsplit logits".into(),
            ));
        }
        for &node in &m.nodes {
            if node != id && self.p.origin[l.node(node).outputs[0]].is_some() {
                return Err((
                    Problem::Op,
                    format!("{node} inside its vocab-parallel loss has an origin"),
                ));
            }
            self.covered.insert(node);
        }
        self.check_local_rule(id)?;
        if id != per {
            self.note_mean(id);
        }
        Ok(())
    }

    /// The outputs are the global outputs: same names and order, each holding its global
    /// value in the output's placement.
    fn check_outputs(&self) -> Result<(), String> {
        let (g, l, mesh) = (self.p.global, self.p.local, self.p.mesh);
        let (go, lo) = (g.outputs(), l.outputs());
        if go.len() != lo.len() {
            return Err(format!(
                "the local program has {} outputs, the global one {}",
                lo.len(),
                go.len()
            ));
        }
        for (a, b) in go.iter().zip(lo) {
            if a.name != b.name {
                return Err(format!(
                    "local output {} stands where global output {} is",
                    b.name, a.name
                ));
            }
            if self.held(b.value) != Some(a.value) {
                return Err(format!(
                    "output {} is local value {}, which does not hold global {}",
                    b.name, b.value, a.value
                ));
            }
            if b.annotation != a.annotation || b.like.map(|l| self.held(l)) != a.like.map(Some) {
                return Err(format!(
                    "output {} is not laid out as its global output says",
                    b.name
                ));
            }
            let want = match (&a.annotation, b.like) {
                (Some(ann), _) => Placement::from_spec(&ann.spec, mesh),
                (None, Some(l)) => Some(self.pl(l).clone()),
                (None, None) => Some(Placement::replicated(g.ty(a.value).rank(), mesh.rank())),
            };
            let pl = self.pl(b.value);
            if want.as_ref() != Some(pl) {
                return Err(format!(
                    "output {} is in {}, not in its declared placement",
                    b.name,
                    pl.display(mesh)
                ));
            }
        }
        Ok(())
    }
}

/// The logits and labels a vocab-parallel loss reads, and its vocab axes.
type LossTerms = (ValueId<Local>, ValueId<Local>, Vec<usize>);

/// Walks a decomposition backwards, collecting its nodes.
struct Matcher<'a> {
    l: &'a Graph<Local>,
    nodes: Vec<NodeId<Local>>,
}

impl Matcher<'_> {
    fn fail(&self) -> (Problem, String) {
        let at = self
            .nodes
            .last()
            .map_or(String::new(), |n| format!(" (at {n})"));
        (
            Problem::Op,
            format!("it is not the vocab-parallel form of its cross-entropy{at}"),
        )
    }

    /// The producer of operand `i` of `id`, when its op satisfies `want`.
    fn arg(
        &mut self,
        id: NodeId<Local>,
        i: usize,
        want: impl Fn(&Op) -> bool,
    ) -> Result<NodeId<Local>, (Problem, String)> {
        self.nodes.push(id);
        let p = self
            .l
            .node(id)
            .inputs
            .get(i)
            .map(|&v| self.l.value(v).node)
            .filter(|&p| want(&self.l.node(p).op));
        p.ok_or_else(|| self.fail())
    }

    /// The value operand `i` of `id` reads.
    fn input(&self, id: NodeId<Local>, i: usize) -> Result<ValueId<Local>, (Problem, String)> {
        self.l
            .node(id)
            .inputs
            .get(i)
            .copied()
            .ok_or_else(|| self.fail())
    }

    /// Skips a chain of all-reduces of `reduce` over `axes` (last axis nearest), ending at the
    /// producer of `id`'s operand `i`.
    fn all_reduced(
        &mut self,
        mut id: NodeId<Local>,
        mut i: usize,
        reduce: ReduceOp,
        axes: &[String],
    ) -> Result<NodeId<Local>, (Problem, String)> {
        for a in axes.iter().rev() {
            id = self.arg(id, i, |op| {
                matches!(op, Op::AllReduce { axis, reduce: r, .. } if axis == a && *r == reduce)
            })?;
            i = 0;
        }
        self.arg(id, i, |_| true)
    }

    /// Matches `per = log(se) - t` and returns the logits, the labels and the vocab axes.
    fn loss_terms(
        &mut self,
        per: NodeId<Local>,
        mesh: &Mesh,
        pls: &IdVec<ValueId<Local>, Placement>,
    ) -> Result<LossTerms, (Problem, String)> {
        // The target logit fixes the vocab axes; everything else is matched against them.
        let peek = self
            .l
            .node(per)
            .inputs
            .get(1)
            .map(|&v| self.l.value(v).node);
        let mut tl = peek.ok_or_else(|| self.fail())?;
        while let Op::AllReduce { .. } = self.l.node(tl).op {
            tl = self.l.value(self.l.node(tl).inputs[0]).node;
        }
        let Op::TargetLogit { axes } = &self.l.node(tl).op else {
            return Err(self.fail());
        };
        let names: Vec<String> = axes.iter().map(|(a, _)| a.clone()).collect();
        let vaxes: Vec<usize> = names.iter().filter_map(|a| mesh.axis_index(a)).collect();
        let lse = self.arg(per, 0, |op| *op == Op::Unary { op: UnaryOp::Log })?;
        let sum = self.all_reduced(lse, 0, ReduceOp::Sum, &names)?;
        let tl2 = self.all_reduced(per, 1, ReduceOp::Sum, &names)?;
        if tl2 != tl
            || !matches!(
                self.l.node(sum).op,
                Op::Reduce {
                    op: ReduceOp::Sum,
                    keepdims: false,
                    ..
                }
            )
        {
            return Err(self.fail());
        }
        let exp = self.arg(sum, 0, |op| *op == Op::Unary { op: UnaryOp::Exp })?;
        let z = self.arg(exp, 0, |op| *op == Op::Binary { op: BinaryOp::Sub })?;
        self.nodes.push(tl);
        if self.input(tl, 0)? != self.l.node(z).outputs[0] {
            return Err(self.fail());
        }
        let y = self.input(tl, 1)?;
        let x = self.input(z, 0)?;
        let mx = self.all_reduced(z, 1, ReduceOp::Max, &names)?;
        self.nodes.push(mx);
        let last = self
            .l
            .ty(x)
            .rank()
            .checked_sub(1)
            .ok_or_else(|| self.fail())?;
        let max_ok = matches!(self.l.node(mx).op, Op::Reduce { op: ReduceOp::Max, axis, keepdims: true } if axis == last);
        let sum_ok = matches!(self.l.node(sum).op, Op::Reduce { axis, .. } if axis == last);
        if !max_ok || !sum_ok || self.input(mx, 0)? != x || pls[x].dims[last] != vaxes {
            return Err(self.fail());
        }
        // 16-bit logits are cast to f32 first, in the same placement.
        let at = self.l.value(x).node;
        if self.l.node(at).op == (Op::Cast { to: Dtype::F32 }) {
            self.nodes.push(at);
            let logits = self.input(at, 0)?;
            if self.l.ty(logits).dtype == Dtype::F32 || pls[logits] != pls[x] {
                return Err(self.fail());
            }
            return Ok((logits, y, vaxes));
        }
        Ok((x, y, vaxes))
    }
}
