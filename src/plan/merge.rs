//! Merged reductions: `add(all_reduce(a), all_reduce(b))` over one group becomes
//! `all_reduce(add(a, b))`, also through a transpose or reshape between a reduction and the add
//! (they commute with a sum); likewise `add(reduce_scatter(a), reduce_scatter(b))` of one
//! group and dim becomes `reduce_scatter(add(a, b))` (the input gradient of a layer input read
//! by several column-parallel matmuls under sequence parallelism). A value summed from several partial terms (the gradient of a
//! tied weight, used by the embedding and by the LM head) is then reduced once instead of once
//! per term: the same bytes per message, one message fewer. (The earlier term's reduction then
//! waits for the last term; the cost model has no overlap of communication with compute, so
//! it sees only the message saved.)

use crate::ir::{
    BinaryOp, Graph, GraphParts, IdVec, Local, Node, NodeId, Op, ReduceOp, Value, ValueId,
};
use crate::mesh::Mesh;
use crate::partition::{Partitioned, Provenance};
use crate::sharding::{PartialOp, Placement};
use std::collections::BTreeMap;

/// How a merged reduction's provenance begins (`the sum of 3 partial terms`).
const MERGED: &str = "the sum of";

/// One operand of the add: an all-reduce, then perhaps one layout op, each used only by the
/// next.
struct Leg {
    reduce: NodeId<Local>,
    layout: Option<NodeId<Local>>,
}

/// An add both of whose operands are legs over the same group.
struct Merge {
    add: NodeId<Local>,
    legs: [Leg; 2],
}

/// Merges every such pair, repeatedly (a sum of three terms merges twice), until none is left.
pub fn merge(mut p: Partitioned, mesh: &Mesh) -> Partitioned {
    loop {
        let found = merges(&p.local, mesh);
        if found.is_empty() {
            return p;
        }
        p = rewrite(p, &found, mesh);
    }
}

/// The leg ending in `v`, if `v` is one (`output[v]`: `v` is a program output).
fn leg(g: &Graph<Local>, v: ValueId<Local>, output: &[bool]) -> Option<Leg> {
    let single = |v: ValueId<Local>| g.users(v).len() == 1 && !output[v.index()];
    if !single(v) {
        return None;
    }
    let id = g.value(v).node;
    let n = g.node(id);
    if (is_sum_reduce(&n.op) || is_sum_scatter(&n.op)) && n.inputs.len() == 1 {
        return Some(Leg {
            reduce: id,
            layout: None,
        });
    }
    if !matches!(n.op, Op::Transpose { .. } | Op::Reshape { .. }) || !single(n.inputs[0]) {
        return None;
    }
    let r = g.value(n.inputs[0]).node;
    let rn = g.node(r);
    (is_sum_reduce(&rn.op) && rn.inputs.len() == 1).then_some(Leg {
        reduce: r,
        layout: Some(id),
    })
}

/// A reduce-scatter of a sum: merged only without a layout op between it and the add (the
/// layout op would have to be rewritten for the unscattered shape).
fn is_sum_scatter(op: &Op) -> bool {
    matches!(
        op,
        Op::ReduceScatter {
            reduce: ReduceOp::Sum,
            ..
        }
    )
}

fn is_sum_reduce(op: &Op) -> bool {
    matches!(
        op,
        Op::AllReduce {
            reduce: ReduceOp::Sum,
            also,
            ..
        } if also.is_empty()
    )
}

/// The adds to merge, none sharing a node with another. Sums over the temporal axis stay
/// apart: each term is accumulated where it is made (a tied weight's terms are made on the
/// first and last pipeline stages) and they are added once per step.
fn merges(g: &Graph<Local>, mesh: &Mesh) -> Vec<Merge> {
    let temporal = |op: &Op| match op {
        Op::AllReduce { axis, .. } | Op::ReduceScatter { axis, .. } => {
            mesh.axis_index(axis).is_some_and(|a| mesh.is_temporal(a))
        }
        _ => false,
    };
    let mut output = vec![false; g.num_values()];
    for o in g.outputs() {
        output[o.value.index()] = true;
    }
    let mut out = Vec::new();
    for (id, n) in g.nodes() {
        if !matches!(n.op, Op::Binary { op: BinaryOp::Add })
            || n.inputs.len() != 2
            || n.inputs[0] == n.inputs[1]
        {
            continue;
        }
        let same_type = n.inputs.iter().all(|&v| g.ty(v) == g.ty(n.outputs[0]));
        let (Some(a), Some(b)) = (leg(g, n.inputs[0], &output), leg(g, n.inputs[1], &output))
        else {
            continue;
        };
        let op = &g.node(a.reduce).op;
        if same_type && *op == g.node(b.reduce).op && !temporal(op) {
            out.push(Merge {
                add: id,
                legs: [a, b],
            });
        }
    }
    out
}

/// The tables a rewrite edits: the graph's parts, and per value its placement and origin.
pub(super) struct Tables {
    pub(super) parts: GraphParts<Local>,
    pub(super) placements: IdVec<ValueId<Local>, Placement>,
    pub(super) origin: IdVec<ValueId<Local>, Option<ValueId>>,
}

impl Tables {
    /// `p`'s tables, with its nodes taken out to be rewritten (a `None` is a dropped node).
    pub(super) fn of(p: &Partitioned) -> (Tables, Vec<Option<Node<Local>>>) {
        let mut t = Tables {
            parts: p.local.to_parts(),
            placements: p.placements.clone(),
            origin: p.origin.clone(),
        };
        let nodes = t.parts.nodes.drain(..).map(Some).collect();
        (t, nodes)
    }

    /// The program of the rewritten `nodes`, each node of `after` placed right after the node
    /// at its index, unused values dropped; `old` is the provenance before the rewrite.
    pub(super) fn finish(
        mut self,
        nodes: Vec<Option<Node<Local>>>,
        after: BTreeMap<usize, (Node<Local>, Option<Provenance>)>,
        old: &BTreeMap<NodeId<Local>, Provenance>,
    ) -> Partitioned {
        let (order, provenance) = reorder(nodes, after, old);
        self.parts.nodes = order;
        compact(&mut self);
        Partitioned {
            local: Graph::from_parts(self.parts),
            placements: self.placements,
            origin: self.origin,
            provenance,
        }
    }

    /// A new value holding `v`'s global value as `like` holds its own: `like`'s type and
    /// placement, `v`'s origin, unnamed (the sum of reduce-scatter operands).
    fn unscattered(&mut self, v: ValueId<Local>, like: ValueId<Local>) -> ValueId<Local> {
        let pl = self.placements[like].clone();
        let mut val = self.parts.values[v.index()].clone();
        val.ty = self.parts.values[like.index()].ty.clone();
        val.name = None;
        self.push(val, pl, self.origin[v])
    }

    /// A new value like `v` but a partial sum over mesh axis `a` (named as `v` when `named`).
    fn partial(&mut self, v: ValueId<Local>, a: usize, named: bool) -> ValueId<Local> {
        let mut pl = self.placements[v].clone();
        pl.partial[a] = Some(PartialOp::Sum);
        let mut val = self.parts.values[v.index()].clone();
        if !named {
            val.name = None;
        }
        self.push(val, pl, self.origin[v])
    }

    /// Appends a value with its placement and origin; its id.
    pub(super) fn push(
        &mut self,
        val: Value<Local>,
        pl: Placement,
        origin: Option<ValueId>,
    ) -> ValueId<Local> {
        self.parts.values.push(val);
        self.placements.push(pl);
        self.origin.push(origin);
        ValueId::new(self.parts.values.len() - 1)
    }
}

/// The program with each merge applied: each leg's layout op reads the reduction's operand,
/// the add sums the partial terms, and one all-reduce right after it makes the add's old value.
fn rewrite(p: Partitioned, found: &[Merge], mesh: &Mesh) -> Partitioned {
    let g = &p.local;
    let (mut t, mut nodes) = Tables::of(&p);
    // The all-reduce to put right after the add at that index, with its provenance.
    let mut after: BTreeMap<usize, (Node<Local>, Option<Provenance>)> = BTreeMap::new();
    for m in found {
        let reduce = apply(g, m, mesh, &mut nodes, &mut t);
        after.insert(m.add.index(), (reduce, provenance(&p, m)));
    }
    t.finish(nodes, after, &p.provenance)
}

/// Rewires merge `m`'s nodes in `nodes`; returns the reduction that replaces its two.
fn apply(
    g: &Graph<Local>,
    m: &Merge,
    mesh: &Mesh,
    nodes: &mut [Option<Node<Local>>],
    t: &mut Tables,
) -> Node<Local> {
    let op = g.node(m.legs[0].reduce).op.clone();
    let (Op::AllReduce { axis, .. } | Op::ReduceScatter { axis, .. }) = &op else {
        unreachable!("a leg starts with an all-reduce or a reduce-scatter")
    };
    let a = mesh
        .axis_index(axis)
        .expect("an all-reduce's axis is the mesh's");
    let mut terms = Vec::with_capacity(2);
    for l in &m.legs {
        let operand = g.node(l.reduce).inputs[0];
        nodes[l.reduce.index()] = None;
        terms.push(match l.layout {
            None => operand,
            Some(id) => {
                let node = nodes[id.index()].as_mut().expect("a layout op of one leg");
                let v = t.partial(node.outputs[0], a, true);
                node.inputs = vec![operand];
                node.outputs = vec![v];
                v
            }
        });
    }
    let add = nodes[m.add.index()].as_mut().expect("one merge per add");
    let value = add.outputs[0];
    let summed = match op {
        Op::ReduceScatter { .. } => t.unscattered(value, terms[0]),
        _ => t.partial(value, a, false),
    };
    add.inputs = terms;
    add.outputs = vec![summed];
    Node {
        op,
        inputs: vec![summed],
        outputs: vec![value],
        span: add.span,
        region: add.region,
    }
}

/// The remaining nodes in order, each merged all-reduce right after its add, and the
/// provenance by the new node ids.
fn reorder(
    nodes: Vec<Option<Node<Local>>>,
    mut after: BTreeMap<usize, (Node<Local>, Option<Provenance>)>,
    old: &BTreeMap<NodeId<Local>, Provenance>,
) -> (Vec<Node<Local>>, BTreeMap<NodeId<Local>, Provenance>) {
    let mut provenance = BTreeMap::new();
    let mut order = Vec::with_capacity(nodes.len());
    for (i, n) in nodes.into_iter().enumerate() {
        let Some(n) = n else { continue };
        if let Some(pr) = old.get(&NodeId::new(i)) {
            provenance.insert(NodeId::new(order.len()), pr.clone());
        }
        order.push(n);
        if let Some((r, pr)) = after.remove(&i) {
            if let Some(pr) = pr {
                provenance.insert(NodeId::new(order.len()), pr);
            }
            order.push(r);
        }
    }
    (order, provenance)
}

/// The merged reduction's provenance: what the add makes, with each term's own reduction.
fn provenance(p: &Partitioned, m: &Merge) -> Option<Provenance> {
    // A term that is itself a merge contributes its terms (a sum of three merges twice).
    let members: Vec<Provenance> = m
        .legs
        .iter()
        .filter_map(|l| p.provenance.get(&l.reduce))
        .flat_map(|pr| match pr.user.starts_with(MERGED) {
            true => pr.members.clone(),
            false => vec![pr.clone()],
        })
        .collect();
    let first = members.first()?.clone();
    let g = &p.local;
    let add = g.node(m.add);
    let value = g
        .value(add.outputs[0])
        .name
        .clone()
        .unwrap_or_else(|| "the add result".into());
    Some(Provenance {
        transition: first.transition,
        user: format!("{MERGED} {} partial terms", members.len()),
        span: add.span,
        value,
        members,
    })
}

/// Drops the values no node makes and numbers the rest in node order (each value after the
/// values its node reads, as partitioning numbers them), pointing each at its node.
fn compact(t: &mut Tables) {
    let parts = &mut t.parts;
    let n = parts.values.len();
    let mut new_id = vec![usize::MAX; n];
    let mut order = Vec::with_capacity(n);
    for node in &parts.nodes {
        for v in &node.outputs {
            new_id[v.index()] = order.len();
            order.push(v.index());
        }
    }
    let re = |v: &mut ValueId<Local>| *v = ValueId::new(new_id[v.index()]);
    for node in &mut parts.nodes {
        node.inputs
            .iter_mut()
            .chain(node.outputs.iter_mut())
            .for_each(re);
    }
    for o in &mut parts.outputs {
        re(&mut o.value);
        if let Some(l) = &mut o.like {
            re(l);
        }
    }
    parts
        .annotations
        .retain(|(v, _)| new_id[v.index()] != usize::MAX);
    for (v, _) in &mut parts.annotations {
        re(v);
    }
    t.placements = IdVec::from_vec(permuted(
        std::mem::take(&mut t.placements).into_vec(),
        &order,
    ));
    t.origin = IdVec::from_vec(permuted(std::mem::take(&mut t.origin).into_vec(), &order));
    parts.values = permuted(std::mem::take(&mut parts.values), &order);
    for (k, node) in parts.nodes.iter().enumerate() {
        for (i, v) in node.outputs.iter().enumerate() {
            let val = &mut parts.values[v.index()];
            val.node = NodeId::new(k);
            val.index = i as u32;
        }
    }
}

/// The items of `v` at the positions `order` lists, in that order.
fn permuted<T>(v: Vec<T>, order: &[usize]) -> Vec<T> {
    let mut slots: Vec<Option<T>> = v.into_iter().map(Some).collect();
    order
        .iter()
        .map(|&i| slots[i].take().expect("each value once"))
        .collect()
}
