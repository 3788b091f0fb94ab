//! Row sums for sequence parallelism. The backward sums a norm's weight gradients over every
//! row of a `[batch, sequence, features]` activation as `reduce(reshape(g, [rows, features]))`.
//! A sequence split is the minor factor of that merge and cannot pass the reshape, so a
//! sequence-parallel plan would all-gather the whole activation for it. This pass rewrites
//! each such row sum of a rank-3 value as `reduce(reduce(g, batch), sequence)`: the batch sum
//! keeps the sequence split (`[sequence, features]`, split), and the sequence sum makes a
//! partial sum of `[features]`, reduced by one small all-reduce.
//!
//! It runs before propagation, only for sequence-parallel programs (`--sequence-parallel` not
//! off, or an annotation splitting the sequence dim of a rank-3 value): elsewhere the per-dim
//! sums would let propagation split activations along the sequence in the middle of a
//! tensor-parallel plan, which `--sequence-parallel off` promises not to do. The sum is the same
//! (in another order: equal within float tolerance, as any sharding).

use crate::ir::{Graph, Op, ReduceOp};
use crate::mesh::SequenceParallel;

/// The program with its row sums of rank-3 values summed dim by dim, when `sp` is not off or
/// the program splits a sequence dim by annotation; else the program as it is.
pub fn split_row_sums(g: Graph, sp: SequenceParallel) -> Graph {
    if sp == SequenceParallel::Off && !annotates_sequence(&g) {
        return g;
    }
    let found: Vec<usize> = g
        .nodes()
        .filter(|(_, n)| is_row_sum(&g, n))
        .map(|(_, n)| g.value(n.inputs[0]).node.index())
        .collect();
    if found.is_empty() {
        return g;
    }
    let mut parts = g.to_parts();
    for reshape in found {
        let node = &mut parts.nodes[reshape];
        let src = &parts.values[node.inputs[0].index()].ty;
        let shape = vec![src.shape[1], src.shape[2]];
        node.op = Op::Reduce {
            op: ReduceOp::Sum,
            axis: 0,
            keepdims: false,
        };
        let out = node.outputs[0].index();
        parts.values[out].ty.shape = shape;
    }
    Graph::from_parts(parts)
}

/// Some annotation splits dim 1 of a rank-3 value (the sequence of `[batch, sequence,
/// features]`).
fn annotates_sequence(g: &Graph) -> bool {
    let rank3_seq = |v, spec: &crate::ir::Spec| {
        g.ty(v).rank() == 3 && spec.dims.get(1).is_some_and(|d| !d.is_empty())
    };
    g.annotations().iter().any(|(v, a)| rank3_seq(*v, &a.spec))
        || g.outputs().iter().any(|o| {
            o.annotation
                .as_ref()
                .is_some_and(|a| rank3_seq(o.value, &a.spec))
        })
}

/// `n` sums over dim 0 (dropping it) a reshape of a rank-3 value to `[rows, features]` that
/// nothing else reads.
fn is_row_sum(g: &Graph, n: &crate::ir::Node) -> bool {
    let Op::Reduce {
        op: ReduceOp::Sum,
        axis: 0,
        keepdims: false,
    } = n.op
    else {
        return false;
    };
    let flat = n.inputs[0];
    let r = g.node(g.value(flat).node);
    let output = g.outputs().iter().any(|o| o.value == flat);
    if !matches!(r.op, Op::Reshape { .. }) || g.users(flat).len() != 1 || output {
        return false;
    }
    let (src, dst) = (&g.ty(r.inputs[0]).shape, &g.ty(flat).shape);
    src.len() == 3 && dst.len() == 2 && dst[0] == src[0] * src[1] && dst[1] == src[2]
}
