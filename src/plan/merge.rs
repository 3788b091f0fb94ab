//! Merged reductions: `add(all_reduce(a), all_reduce(b))` over one group becomes
//! `all_reduce(add(a, b))`, also through a transpose or reshape between a reduction and the add
//! (they commute with a sum). A value summed from several partial terms (the gradient of a
//! tied weight, used by the embedding and by the LM head) is then reduced once instead of once
//! per term: the same bytes per message, one message fewer.

use crate::ir::{BinaryOp, Graph, GraphParts, IdVec, Local, Node, NodeId, Op, ReduceOp, ValueId};
use crate::mesh::Mesh;
use crate::partition::{Partitioned, Provenance};
use crate::sharding::PartialOp;
use std::collections::BTreeMap;

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
        let found = merges(&p.local);
        if found.is_empty() {
            return p;
        }
        p = rewrite(p, &found, mesh);
    }
}

/// The leg ending in `v`, if `v` is one.
fn leg(g: &Graph<Local>, v: ValueId<Local>) -> Option<Leg> {
    let single = |v: ValueId<Local>| g.users(v).len() == 1 && !is_output(g, v);
    if !single(v) {
        return None;
    }
    let id = g.value(v).node;
    let n = g.node(id);
    if is_sum_reduce(&n.op) && n.inputs.len() == 1 {
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

fn is_sum_reduce(op: &Op) -> bool {
    matches!(
        op,
        Op::AllReduce {
            reduce: ReduceOp::Sum,
            ..
        }
    )
}

fn is_output(g: &Graph<Local>, v: ValueId<Local>) -> bool {
    g.outputs().iter().any(|o| o.value == v)
}

/// The adds to merge, none sharing a node with another.
fn merges(g: &Graph<Local>) -> Vec<Merge> {
    let mut out = Vec::new();
    for (id, n) in g.nodes() {
        if !matches!(n.op, Op::Binary { op: BinaryOp::Add })
            || n.inputs.len() != 2
            || n.inputs[0] == n.inputs[1]
        {
            continue;
        }
        let same_type = n.inputs.iter().all(|&v| g.ty(v) == g.ty(n.outputs[0]));
        let (Some(a), Some(b)) = (leg(g, n.inputs[0]), leg(g, n.inputs[1])) else {
            continue;
        };
        if same_type && g.node(a.reduce).op == g.node(b.reduce).op {
            out.push(Merge {
                add: id,
                legs: [a, b],
            });
        }
    }
    out
}

/// The program with each merge applied: each leg's layout op reads the reduction's operand,
/// the add sums the partial terms, and one all-reduce right after it makes the add's old value.
fn rewrite(mut p: Partitioned, found: &[Merge], mesh: &Mesh) -> Partitioned {
    let g = &p.local;
    let mut parts = g.to_parts();
    let mut placements = std::mem::take(&mut p.placements);
    let mut origin = std::mem::take(&mut p.origin);
    let mut nodes: Vec<Option<Node<Local>>> = parts.nodes.drain(..).map(Some).collect();
    // Nodes to put right after the add at that index, with their provenance.
    let mut after: BTreeMap<usize, (Node<Local>, Option<Provenance>)> = BTreeMap::new();
    for m in found {
        let axis = match &g.node(m.legs[0].reduce).op {
            Op::AllReduce { axis, .. } => axis.clone(),
            _ => unreachable!("a leg starts with an all-reduce"),
        };
        let a = mesh
            .axis_index(&axis)
            .expect("an all-reduce's axis is the mesh's");
        let mut partial = |v: ValueId<Local>, parts: &mut GraphParts<Local>| {
            let mut pl = placements[v].clone();
            pl.partial[a] = Some(PartialOp::Sum);
            let mut val = parts.values[v.index()].clone();
            val.name = None;
            parts.values.push(val);
            placements.push(pl);
            origin.push(origin[v]);
            ValueId::new(parts.values.len() - 1)
        };
        let mut terms = Vec::with_capacity(2);
        for l in &m.legs {
            let operand = g.node(l.reduce).inputs[0];
            nodes[l.reduce.index()] = None;
            let term = match l.layout {
                None => operand,
                Some(t) => {
                    let node = nodes[t.index()].as_mut().expect("a layout op of one leg");
                    let v = partial(node.outputs[0], &mut parts);
                    node.inputs = vec![operand];
                    node.outputs = vec![v];
                    v
                }
            };
            terms.push(term);
        }
        let add = nodes[m.add.index()].as_mut().expect("one merge per add");
        let value = add.outputs[0];
        let summed = partial(value, &mut parts);
        add.inputs = terms;
        add.outputs = vec![summed];
        let reduce = Node {
            op: g.node(m.legs[0].reduce).op.clone(),
            inputs: vec![summed],
            outputs: vec![value],
            span: add.span,
            region: add.region,
        };
        after.insert(m.add.index(), (reduce, provenance(&p, m)));
    }
    let mut provenance: BTreeMap<NodeId<Local>, Provenance> = BTreeMap::new();
    let mut order = Vec::with_capacity(nodes.len());
    for (i, n) in nodes.into_iter().enumerate() {
        let Some(n) = n else { continue };
        if let Some(pr) = p.provenance.get(&NodeId::new(i)) {
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
    parts.nodes = order;
    compact(&mut parts, &mut placements, &mut origin);
    for (k, n) in parts.nodes.iter().enumerate() {
        for (i, v) in n.outputs.iter().enumerate() {
            let val = &mut parts.values[v.index()];
            val.node = NodeId::new(k);
            val.index = i as u32;
        }
    }
    p.local = Graph::from_parts(parts);
    p.placements = placements;
    p.origin = origin;
    p.provenance = provenance;
    p
}

/// The merged reduction's provenance: what the add makes, with each term's own reduction.
fn provenance(p: &Partitioned, m: &Merge) -> Option<Provenance> {
    let members: Vec<Provenance> = m
        .legs
        .iter()
        .filter_map(|l| p.provenance.get(&l.reduce).cloned())
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
        user: format!("the sum of {} partial terms", members.len()),
        span: add.span,
        value,
        members,
    })
}

/// Drops the values no node makes, renumbering the rest in order.
fn compact(
    parts: &mut GraphParts<Local>,
    placements: &mut IdVec<ValueId<Local>, crate::sharding::Placement>,
    origin: &mut IdVec<ValueId<Local>, Option<ValueId>>,
) {
    let n = parts.values.len();
    let mut made = vec![false; n];
    for node in &parts.nodes {
        for v in &node.outputs {
            made[v.index()] = true;
        }
    }
    let mut new_id = vec![usize::MAX; n];
    let mut k = 0;
    for (i, m) in made.iter().enumerate() {
        if *m {
            new_id[i] = k;
            k += 1;
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
    parts.annotations.retain(|(v, _)| made[v.index()]);
    for (v, _) in &mut parts.annotations {
        re(v);
    }
    *placements = IdVec::from_vec(kept(std::mem::take(placements).into_vec(), &made));
    *origin = IdVec::from_vec(kept(std::mem::take(origin).into_vec(), &made));
    parts.values = kept(std::mem::take(&mut parts.values), &made);
}

/// The items of `v` whose flag in `keep` is set, in order.
fn kept<T>(v: Vec<T>, keep: &[bool]) -> Vec<T> {
    v.into_iter()
        .zip(keep)
        .filter(|(_, k)| **k)
        .map(|(x, _)| x)
        .collect()
}
