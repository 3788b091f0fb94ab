//! One overflow flag for the whole mesh. A dynamic loss scale skips a step when any gradient
//! holds an inf or NaN (`autodiff::scale`). In the global program the flag is one value; in the
//! SPMD program each rank computes it from its own blocks: it is Partial(max) over the axes that
//! split a gradient (max, reduce max and a float cast pass a Partial(max) on, so one reshard
//! before the skipping `select`s reduces it), and replicated over the rest: a block replicated
//! over `dp` (every gradient after the data-parallel reduction) is trusted to be equal on every
//! `dp` rank. This pass replaces the chain of max all-reduces that makes the value the selects
//! read by ONE max all-reduce over every mesh axis (of more than one device, not the
//! microbatches'): over an axis where the flag is replicated it is the identity when the copies
//! agree and spreads the inf when one rank's copy alone was corrupted. So every rank skips
//! together and halves its copy of the scale together.
//!
//! Pipelined plans are left as they are (their stages' update runs stage by stage).

use super::merge::Tables;
use crate::autodiff::scale::OVERFLOW;
use crate::ir::{Graph, Local, Node, NodeId, Op, ReduceOp, ValueId};
use crate::mesh::Mesh;
use crate::partition::{Partitioned, Provenance};
use crate::sharding::PartialOp;
use std::collections::BTreeMap;

/// `p` with the overflow flag of `global` (if it has one) reduced by one all-reduce over every
/// mesh axis.
pub fn whole_mesh(mut p: Partitioned, global: &Graph, mesh: &Mesh) -> Partitioned {
    if crate::pipeline::pipelined(global, mesh) {
        return p;
    }
    let Some(flag) = global_flag(global) else {
        return p;
    };
    let axes: Vec<usize> = (0..mesh.axes().len())
        .filter(|&a| mesh.axis_size(a) > 1 && !mesh.is_temporal(a))
        .collect();
    if axes.is_empty() {
        return p;
    }
    while let Some(end) = pending(&p, flag, mesh, &axes) {
        let (_, start) = chain(&p.local, end);
        p = collapse(p, start, mesh);
        let end = pending(&p, flag, mesh, &axes).expect("collapsing keeps the flag's readers");
        p = replace(p, end, &axes, mesh);
    }
    p
}

/// `p` without the max all-reduces inside the flag's tree of max-linear ops (max, reduce max,
/// float casts) below `start`: the one all-reduce over the whole mesh covers them, each value
/// after a dropped all-reduce stays Partial(max) over its axes until then. Propagation reduces
/// each gradient's flag on its own (reducing a Partial(max) now costs what reducing the
/// result later does, and a bf16 flag is cheaper to send than its f32 cast).
fn collapse(p: Partitioned, start: ValueId<Local>, mesh: &Mesh) -> Partitioned {
    let g = &p.local;
    let mut drops = Vec::new();
    let mut below = vec![start];
    while let Some(v) = below.pop() {
        let id = g.value(v).node;
        let n = g.node(id);
        if !max_linear(g, &n.op, n) || (v != start && g.users(v).len() > 1) {
            continue;
        }
        if is_max(&n.op) && clears(g, &p.placements, n.outputs[0], &n.op, mesh, start) {
            drops.push(id);
        }
        if let Some(x) = gathered(g, n) {
            let ag = g.value(x).node;
            if clears(g, &p.placements, v, &g.node(ag).op, mesh, start) {
                drops.push(ag);
                // The walk goes on below the dropped gather (a flag reduced over two split
                // dims gathers twice).
                below.extend(g.node(ag).inputs.iter().copied());
                continue;
            }
        }
        below.extend(n.inputs.iter().copied());
    }
    if drops.is_empty() {
        return p;
    }
    drop_reduces(p, &drops, start, mesh)
}

/// For a reduce max `n` of an all-gather's result along the gathered dim: the all-gather's
/// result (the reduce may read its operand instead, giving Partial(max)).
fn gathered(g: &Graph<Local>, n: &Node<Local>) -> Option<ValueId<Local>> {
    let Op::Reduce {
        op: ReduceOp::Max,
        axis,
        ..
    } = &n.op
    else {
        return None;
    };
    let x = n.inputs[0];
    let ag = g.node(g.value(x).node);
    match &ag.op {
        Op::AllGather { dim, .. } if dim == axis && g.users(x).len() == 1 => Some(x),
        _ => None,
    }
}

/// An op the flag passes as Partial(max): a one-operand max all-reduce, a max, a reduce max,
/// a cast between floats.
fn max_linear(g: &Graph<Local>, op: &Op, n: &Node<Local>) -> bool {
    match op {
        Op::AllReduce { .. } => is_max(op) && n.inputs.len() == 1,
        Op::Binary {
            op: crate::ir::BinaryOp::Max,
        }
        | Op::Reduce {
            op: ReduceOp::Max, ..
        } => true,
        Op::Cast { to } => to.is_float() && g.ty(n.inputs[0]).dtype.is_float(),
        _ => false,
    }
}

/// The values from `from` up to `start` (each read once), none split over an axis of `op`
/// (the collective dropped), so each can hold Partial(max) there instead.
fn clears(
    g: &Graph<Local>,
    pls: &crate::ir::IdVec<ValueId<Local>, crate::sharding::Placement>,
    from: ValueId<Local>,
    op: &Op,
    mesh: &Mesh,
    start: ValueId<Local>,
) -> bool {
    let axes = reduced_axes(op, mesh);
    let mut v = from;
    loop {
        if axes
            .iter()
            .any(|&a| pls[v].dims.iter().any(|d| d.contains(&a)))
        {
            return false;
        }
        if v == start {
            return true;
        }
        match g.users(v) {
            [u] => v = g.node(*u).outputs[0],
            _ => return false,
        }
    }
}

fn reduced_axes(op: &Op, mesh: &Mesh) -> Vec<usize> {
    op.mesh_axes()
        .iter()
        .filter_map(|(a, _)| mesh.axis_index(a))
        .collect()
}

/// `p` with each all-reduce of `drops` removed (its readers read its operand) and every value
/// after it up to `start` Partial(max) over its axes.
fn drop_reduces(
    p: Partitioned,
    drops: &[NodeId<Local>],
    start: ValueId<Local>,
    mesh: &Mesh,
) -> Partitioned {
    let g = &p.local;
    let (mut t, mut nodes) = Tables::of(&p);
    for &id in drops {
        let n = g.node(id);
        let (x, y) = (n.inputs[0], n.outputs[0]);
        let axes = reduced_axes(&n.op, mesh);
        let mut v = y;
        while let (false, [u]) = (v == start, g.users(v)) {
            let out = g.node(*u).outputs[0];
            for &a in &axes {
                t.placements[out].partial[a] = Some(PartialOp::Max);
            }
            v = out;
        }
        for v in nodes.iter_mut().flatten().flat_map(|n| n.inputs.iter_mut()) {
            if *v == y {
                *v = x;
            }
        }
        nodes[id.index()] = None;
    }
    t.finish(nodes, BTreeMap::new(), &p.provenance)
}

/// The global flag: the value named [`OVERFLOW`] that the skipping selects read.
fn global_flag(g: &Graph) -> Option<ValueId> {
    g.nodes()
        .filter(|(_, n)| n.op == Op::Select)
        .map(|(_, n)| n.inputs[0])
        .find(|&v| g.value(v).name.as_deref() == Some(OVERFLOW))
}

/// A local value of the flag that a select reads and that is not yet made by one max
/// all-reduce over exactly `axes`.
fn pending(p: &Partitioned, flag: ValueId, mesh: &Mesh, axes: &[usize]) -> Option<ValueId<Local>> {
    let g = &p.local;
    let done = |v: ValueId<Local>| {
        let n = g.node(g.value(v).node);
        let mut over: Vec<usize> =
            n.op.mesh_axes()
                .iter()
                .filter_map(|(a, _)| mesh.axis_index(a))
                .collect();
        over.sort_unstable();
        is_max(&n.op) && n.inputs.len() == 1 && over == axes
    };
    g.nodes()
        .filter(|(_, n)| n.op == Op::Select)
        .map(|(_, n)| n.inputs[0])
        .find(|&v| p.origin[v] == Some(flag) && !done(v))
}

fn is_max(op: &Op) -> bool {
    matches!(
        op,
        Op::AllReduce {
            reduce: ReduceOp::Max,
            ..
        }
    )
}

/// The chain of single-operand max all-reduces ending in `end`, last first, and the value it
/// starts from.
fn chain(g: &Graph<Local>, end: ValueId<Local>) -> (Vec<NodeId<Local>>, ValueId<Local>) {
    let (mut nodes, mut v) = (Vec::new(), end);
    loop {
        let id = g.value(v).node;
        let n = g.node(id);
        if !is_max(&n.op) || n.inputs.len() != 1 {
            return (nodes, v);
        }
        nodes.push(id);
        v = n.inputs[0];
    }
}

/// `p` with the flag value `end` made by one max all-reduce over `axes` of the value its chain
/// of max all-reduces starts from (right after that value's node); every reader of `end` (and
/// any output of it) reads the new result, and the chain's nodes no one else reads are dropped.
fn replace(p: Partitioned, end: ValueId<Local>, axes: &[usize], mesh: &Mesh) -> Partitioned {
    let g = &p.local;
    let (links, start) = chain(g, end);
    let (mut t, mut nodes) = Tables::of(&p);
    // Replicated over every axis reduced (`end` is `start` itself when no chain made it).
    let mut replicated = t.placements[end].clone();
    for &a in axes {
        replicated.partial[a] = None;
    }
    let new = t.push(
        t.parts.values[end.index()].clone(),
        replicated,
        t.origin[end],
    );
    let at = g.value(start).node;
    for v in nodes.iter_mut().flatten().flat_map(|n| n.inputs.iter_mut()) {
        if *v == end {
            *v = new;
        }
    }
    for o in &mut t.parts.outputs {
        if o.value == end {
            o.value = new;
        }
    }
    drop_dead(&mut nodes, &links);
    let producer = g.node(at);
    let names: Vec<&str> = axes.iter().map(|&a| mesh.axis_name(a)).collect();
    let provenance = Provenance {
        transition: format!("each rank's own flag -> its max over ({})", names.join(",")),
        user: "the loss scale's overflow check (one flag for the whole mesh)".into(),
        span: producer.span,
        value: format!("{end} {OVERFLOW}"),
        members: Vec::new(),
    };
    let reduce = Node {
        op: whole(axes, mesh),
        inputs: vec![start],
        outputs: vec![new],
        span: producer.span,
        region: g.node(g.value(end).node).region,
    };
    let after = BTreeMap::from([(at.index(), (reduce, Some(provenance)))]);
    t.finish(nodes, after, &p.provenance)
}

/// Drops the chain's nodes (last first) whose result no remaining node reads.
fn drop_dead(nodes: &mut [Option<Node<Local>>], links: &[NodeId<Local>]) {
    for id in links {
        let outs = nodes[id.index()].as_ref().map(|n| n.outputs.clone());
        let Some(outs) = outs else { continue };
        let read = nodes
            .iter()
            .flatten()
            .any(|n| n.inputs.iter().any(|v| outs.contains(v)));
        if !read {
            nodes[id.index()] = None;
        }
    }
}

/// The max all-reduce over the product group of `axes`.
fn whole(axes: &[usize], mesh: &Mesh) -> Op {
    let (first, rest) = axes.split_first().expect("at least one axis");
    Op::AllReduce {
        axis: mesh.axis_name(*first).to_string(),
        size: mesh.axis_size(*first),
        reduce: ReduceOp::Max,
        also: rest
            .iter()
            .map(|&a| (mesh.axis_name(a).to_string(), mesh.axis_size(a)))
            .collect(),
    }
}
