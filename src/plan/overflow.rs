//! One overflow flag for the whole mesh. A dynamic loss scale skips a step when any gradient
//! holds an inf or NaN (`autodiff::scale`). In the global program the flag is one value; in the
//! SPMD program each rank computes it from its own blocks, and partitioning reduces it (max)
//! only over the axes that split a gradient: a block replicated over `dp` (every gradient after
//! the data-parallel reduction) is trusted to be equal on every `dp` rank. This pass makes the
//! flag the max over every device: after the chain of max all-reduces that makes the value the
//! skipping `select`s read, it adds a max all-reduce over each mesh axis the chain lacks (an
//! all-reduce of a value replicated on its axis, which is the identity when the copies agree and
//! spreads the inf when one rank's copy alone was corrupted). So every rank skips together and
//! halves its copy of the scale together.
//!
//! Pipelined plans are left as they are (their stages' update runs stage by stage).

use super::merge::{compact, reorder, Tables};
use crate::autodiff::scale::OVERFLOW;
use crate::ir::{Graph, Local, Node, Op, ReduceOp, ValueId};
use crate::mesh::Mesh;
use crate::partition::{Partitioned, Provenance};
use std::collections::BTreeMap;

/// `p` with the overflow flag of `global` (if it has one) reduced over every mesh axis.
pub fn whole_mesh(mut p: Partitioned, global: &Graph, mesh: &Mesh) -> Partitioned {
    if crate::pipeline::pipelined(global, mesh) {
        return p;
    }
    let Some(flag) = global_flag(global) else {
        return p;
    };
    while let Some((end, a)) = missing(&p, flag, mesh) {
        p = insert(p, end, a, mesh);
    }
    p
}

/// The global flag: the value named [`OVERFLOW`] that the skipping selects read.
fn global_flag(g: &Graph) -> Option<ValueId> {
    g.nodes()
        .filter(|(_, n)| n.op == Op::Select)
        .map(|(_, n)| n.inputs[0])
        .find(|&v| g.value(v).name.as_deref() == Some(OVERFLOW))
}

/// A local value of the flag that a select reads, with a mesh axis (of more than one device,
/// not the microbatches') that its chain of max all-reduces does not cover.
fn missing(p: &Partitioned, flag: ValueId, mesh: &Mesh) -> Option<(ValueId<Local>, usize)> {
    let g = &p.local;
    let read = g
        .nodes()
        .filter(|(_, n)| n.op == Op::Select)
        .map(|(_, n)| n.inputs[0])
        .filter(|&v| p.origin[v] == Some(flag));
    read.into_iter().find_map(|end| {
        let covered = chain_axes(g, end, mesh);
        (0..mesh.axes().len())
            .find(|&a| !covered[a] && mesh.axis_size(a) > 1 && !mesh.is_temporal(a))
            .map(|a| (end, a))
    })
}

/// Per mesh axis: whether the chain of single-operand max all-reduces ending in `v` covers it.
fn chain_axes(g: &Graph<Local>, mut v: ValueId<Local>, mesh: &Mesh) -> Vec<bool> {
    let mut covered = vec![false; mesh.axes().len()];
    loop {
        let n = g.node(g.value(v).node);
        match &n.op {
            Op::AllReduce {
                axis,
                reduce: ReduceOp::Max,
                ..
            } if n.inputs.len() == 1 => {
                if let Some(a) = mesh.axis_index(axis) {
                    covered[a] = true;
                }
                v = n.inputs[0];
            }
            _ => return covered,
        }
    }
}

/// `p` with a max all-reduce over axis `a` right after the node making `end`, every reader of
/// `end` (and any output of it) reading its result instead.
fn insert(p: Partitioned, end: ValueId<Local>, a: usize, mesh: &Mesh) -> Partitioned {
    let g = &p.local;
    let mut t = Tables {
        parts: g.to_parts(),
        placements: p.placements.clone(),
        origin: p.origin.clone(),
    };
    let new = ValueId::new(t.parts.values.len());
    t.parts.values.push(t.parts.values[end.index()].clone());
    t.placements.push(t.placements[end].clone());
    t.origin.push(t.origin[end]);
    let at = g.value(end).node;
    let mut nodes: Vec<Option<Node<Local>>> = t.parts.nodes.drain(..).map(Some).collect();
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
    let (name, size) = (mesh.axis_name(a).to_string(), mesh.axis_size(a));
    let producer = g.node(at);
    let provenance = Provenance {
        transition: format!("each rank's own flag -> its max over {name}"),
        user: "the loss scale's overflow check (one flag for the whole mesh)".into(),
        span: producer.span,
        value: format!("{end} {OVERFLOW}"),
        members: Vec::new(),
    };
    let reduce = Node {
        op: Op::AllReduce {
            axis: name,
            size,
            reduce: ReduceOp::Max,
        },
        inputs: vec![end],
        outputs: vec![new],
        span: producer.span,
        region: producer.region,
    };
    let after = BTreeMap::from([(at.index(), (reduce, Some(provenance)))]);
    let (order, provenance) = reorder(nodes, after, &p.provenance);
    t.parts.nodes = order;
    compact(&mut t);
    Partitioned {
        local: Graph::from_parts(t.parts),
        placements: t.placements,
        origin: t.origin,
        provenance,
    }
}
