//! One vector-Jacobian product per op: given the cotangents of a node's results, the
//! contributions to its operands' cotangents, as ordinary ops. Ties of `max` split the
//! cotangent evenly (as JAX does); relu'(0) = 0.

use super::builder::Builder;
use super::AutodiffError;
use crate::ir::{BinaryOp, Graph, NodeId, Op, ReduceOp, UnaryOp, ValueId};

type R<T> = Result<T, AutodiffError>;
type Contribs = Vec<Option<ValueId>>;

/// The contributions of node `id` to the cotangents of its operands (`None` where not
/// `wanted`), given its results' cotangents `outs` (`None`: zero).
pub(super) fn vjp(
    b: &mut Builder,
    g: &Graph,
    id: NodeId,
    outs: &[Option<ValueId>],
    wanted: &[bool],
) -> R<Contribs> {
    let node = g.node(id);
    let x = &node.inputs;
    let y = node.outputs[0];
    if let Op::Split { axis, .. } = &node.op {
        return split(b, &node.outputs, outs, *axis);
    }
    let Some(gy) = outs[0] else {
        return Ok(vec![None; x.len()]);
    };
    let w = |i: usize| wanted.get(i).copied().unwrap_or(false);
    match &node.op {
        Op::MatMul => matmul(b, x[0], x[1], gy, w(0), w(1)),
        Op::Binary { op } => binary(b, *op, x[0], x[1], y, gy),
        Op::Scalar {
            op,
            value,
            scalar_lhs,
        } => Ok(vec![Some(scalar(
            b,
            *op,
            *value,
            *scalar_lhs,
            x[0],
            y,
            gy,
        )?)]),
        Op::Unary { op: UnaryOp::Neg } => Ok(vec![Some(b.unary(UnaryOp::Neg, gy)?)]),
        Op::Unary { op } => Ok(vec![Some(b.op(Op::UnaryGrad { op: *op }, vec![x[0], gy])?)]),
        Op::Softmax { axis } => {
            let gy_y = b.bin(BinaryOp::Mul, gy, y)?;
            let s = b.reduce(ReduceOp::Sum, gy_y, *axis, true)?;
            let d = b.bin(BinaryOp::Sub, gy, s)?;
            Ok(vec![Some(b.bin(BinaryOp::Mul, y, d)?)])
        }
        Op::LayerNorm { eps } => norm(b, x, gy, *eps, true, wanted),
        Op::RmsNorm { eps } => norm(b, x, gy, *eps, false, wanted),
        Op::Reduce { op, axis, .. } => Ok(vec![Some(reduce(b, *op, x[0], y, gy, *axis)?)]),
        Op::Transpose { perm } => {
            let mut inv = vec![0; perm.len()];
            for (i, &p) in perm.iter().enumerate() {
                inv[p] = i;
            }
            Ok(vec![Some(b.op(Op::Transpose { perm: inv }, vec![gy])?)])
        }
        Op::Reshape { .. } => {
            let shape = b.ty(x[0]).shape.clone();
            Ok(vec![Some(b.reshape(gy, &shape)?)])
        }
        Op::Concat { axis } => concat(b, x, gy, *axis, wanted),
        Op::Slice { axis, start, end } => Ok(vec![Some(slice(b, x[0], gy, *axis, *start, *end)?)]),
        Op::Embedding => {
            let rows = b.ty(x[1]).shape[0];
            Ok(vec![
                None,
                Some(b.op(Op::ScatterAdd { rows }, vec![x[0], gy])?),
            ])
        }
        Op::CrossEntropy => Ok(vec![Some(cross_entropy(b, x[0], x[1], gy)?), None]),
        Op::CausalMask => {
            let zeros = b.full_like(gy, 0.0)?;
            let masked = b.op(Op::CausalMask, vec![zeros])?;
            let keep = b.unary(UnaryOp::Exp, masked)?;
            Ok(vec![Some(b.bin(BinaryOp::Mul, gy, keep)?)])
        }
        Op::Cast { .. } => {
            let to = b.ty(x[0]).dtype;
            Ok(vec![Some(b.op(Op::Cast { to }, vec![gy])?)])
        }
        Op::FullLike { .. } => Ok(vec![None]),
        Op::Select => select(b, x, gy),
        Op::Fill { .. } => Ok(vec![]),
        Op::Split { .. }
        | Op::Input { .. }
        | Op::Param { .. }
        | Op::State { .. }
        | Op::BroadcastTo { .. }
        | Op::UnaryGrad { .. }
        | Op::Equal
        | Op::ScatterAdd { .. }
        | Op::OneHot { .. }
        | Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::ReduceScatter { .. }
        | Op::AllToAll { .. }
        | Op::Redistribute { .. }
        | Op::ShardSlice { .. }
        | Op::KeepOnFirst { .. }
        | Op::VocabEmbedding { .. }
        | Op::TargetLogit { .. } => Err(b.bug("not an op of a forward program")),
    }
}

/// numpy matmul: `dA = dC·Bᵀ`, `dB = Aᵀ·dC`, with 1-D operands promoted and broadcast batch
/// dims summed. A 2-D weight under a batched operand gets its gradient from one matmul over
/// the flattened rows (no per-batch products summed afterwards).
fn matmul(b: &mut Builder, a: ValueId, w: ValueId, gy: ValueId, da: bool, dw: bool) -> R<Contribs> {
    let (sa, sw) = (b.ty(a).shape.clone(), b.ty(w).shape.clone());
    let a2 = if sa.len() == 1 {
        b.reshape(a, &[1, sa[0]])?
    } else {
        a
    };
    let w2 = if sw.len() == 1 {
        b.reshape(w, &[sw[0], 1])?
    } else {
        w
    };
    let (sa2, sw2) = (b.ty(a2).shape.clone(), b.ty(w2).shape.clone());
    let mut sg2 = crate::ir::infer::broadcast_shapes(&sa2[..sa2.len() - 2], &sw2[..sw2.len() - 2])
        .ok_or_else(|| b.bug("batch dims do not broadcast"))?;
    sg2.extend([sa2[sa2.len() - 2], sw2[sw2.len() - 1]]);
    let g2 = b.reshape(gy, &sg2)?;
    let mut out = vec![None, None];
    if da {
        let wt = b.swap_last(w2)?;
        let d = b.op(Op::MatMul, vec![g2, wt])?;
        let d = b.unbroadcast(d, &sa2)?;
        out[0] = Some(b.reshape(d, &sa)?);
    }
    if dw {
        let d = if sw2.len() == 2 && sa2.len() > 2 {
            let k = sa2[sa2.len() - 1];
            let rows: u64 = sa2[..sa2.len() - 1].iter().product();
            let af = b.reshape(a2, &[rows, k])?;
            let gf = b.reshape(g2, &[rows, sw2[1]])?;
            let at = b.swap_last(af)?;
            b.op(Op::MatMul, vec![at, gf])?
        } else {
            let at = b.swap_last(a2)?;
            let d = b.op(Op::MatMul, vec![at, g2])?;
            b.unbroadcast(d, &sw2)?
        };
        out[1] = Some(b.reshape(d, &sw)?);
    }
    Ok(out)
}

/// Elementwise binary ops; each operand's contribution is summed over the dims it was
/// broadcast along.
fn binary(
    b: &mut Builder,
    op: BinaryOp,
    x0: ValueId,
    x1: ValueId,
    y: ValueId,
    gy: ValueId,
) -> R<Contribs> {
    let (g0, g1) = match op {
        BinaryOp::Add => (gy, gy),
        BinaryOp::Sub => (gy, b.unary(UnaryOp::Neg, gy)?),
        BinaryOp::Mul => (b.bin(BinaryOp::Mul, gy, x1)?, b.bin(BinaryOp::Mul, gy, x0)?),
        BinaryOp::Div => {
            let g0 = b.bin(BinaryOp::Div, gy, x1)?;
            let q = b.bin(BinaryOp::Div, y, x1)?;
            let gq = b.bin(BinaryOp::Mul, gy, q)?;
            (g0, b.unary(UnaryOp::Neg, gq)?)
        }
        BinaryOp::Max => {
            let d = b.bin(BinaryOp::Sub, x0, x1)?;
            let eq = b.op(Op::Equal, vec![x0, x1])?;
            let g0 = max_share(b, d, eq, gy)?;
            (g0, b.bin(BinaryOp::Sub, gy, g0)?)
        }
    };
    let (s0, s1) = (b.ty(x0).shape.clone(), b.ty(x1).shape.clone());
    Ok(vec![
        Some(b.unbroadcast(g0, &s0)?),
        Some(b.unbroadcast(g1, &s1)?),
    ])
}

/// The first operand's share of a max's cotangent: all of it where it is larger (`d` > 0),
/// half where they tie (`eq` = 1).
fn max_share(b: &mut Builder, d: ValueId, eq: ValueId, gy: ValueId) -> R<ValueId> {
    let larger = b.op(Op::UnaryGrad { op: UnaryOp::Relu }, vec![d, gy])?;
    let half = b.scalar(BinaryOp::Mul, eq, 0.5, false)?;
    let tied = b.bin(BinaryOp::Mul, gy, half)?;
    b.add(larger, tied)
}

/// `x op value` (or `value op x`).
fn scalar(
    b: &mut Builder,
    op: BinaryOp,
    value: f64,
    lhs: bool,
    x: ValueId,
    y: ValueId,
    gy: ValueId,
) -> R<ValueId> {
    match (op, lhs) {
        (BinaryOp::Add, _) | (BinaryOp::Sub, false) => Ok(gy),
        (BinaryOp::Sub, true) => b.unary(UnaryOp::Neg, gy),
        (BinaryOp::Mul, _) => b.scalar(BinaryOp::Mul, gy, value, false),
        (BinaryOp::Div, false) => b.scalar(BinaryOp::Div, gy, value, false),
        (BinaryOp::Div, true) => {
            let q = b.bin(BinaryOp::Div, y, x)?;
            let gq = b.bin(BinaryOp::Mul, gy, q)?;
            b.unary(UnaryOp::Neg, gq)
        }
        (BinaryOp::Max, _) => {
            let d = b.scalar(BinaryOp::Sub, x, value, false)?;
            let zero = b.full_like(d, 0.0)?;
            let eq = b.op(Op::Equal, vec![d, zero])?;
            max_share(b, d, eq, gy)
        }
    }
}

/// Reductions: the cotangent broadcast back (mean: scaled by 1/n; max: shared evenly by the
/// maxima).
fn reduce(
    b: &mut Builder,
    op: ReduceOp,
    x: ValueId,
    y: ValueId,
    gy: ValueId,
    axis: usize,
) -> R<ValueId> {
    let xs = b.ty(x).shape.clone();
    let mut kept = xs.clone();
    kept[axis] = 1;
    let gk = b.reshape(gy, &kept)?;
    match op {
        ReduceOp::Sum => b.op(Op::BroadcastTo { shape: xs }, vec![gk]),
        ReduceOp::Mean => {
            let scaled = b.scalar(BinaryOp::Div, gk, xs[axis] as f64, false)?;
            b.op(Op::BroadcastTo { shape: xs }, vec![scaled])
        }
        ReduceOp::Max => {
            let yk = b.reshape(y, &kept)?;
            let at_max = b.op(Op::Equal, vec![x, yk])?;
            let count = b.reduce(ReduceOp::Sum, at_max, axis, true)?;
            let share = b.bin(BinaryOp::Div, at_max, count)?;
            b.bin(BinaryOp::Mul, share, gk)
        }
    }
}

/// Split: the pieces' cotangents (zeros for pieces without one) joined.
fn split(b: &mut Builder, ys: &[ValueId], outs: &[Option<ValueId>], axis: usize) -> R<Contribs> {
    if outs.iter().all(Option::is_none) {
        return Ok(vec![None]);
    }
    let mut parts = Vec::with_capacity(ys.len());
    for (&y, g) in ys.iter().zip(outs) {
        parts.push(match g {
            Some(g) => *g,
            None => b.full_like(y, 0.0)?,
        });
    }
    Ok(vec![Some(b.op(Op::Concat { axis }, parts)?)])
}

/// Concat: each operand's slice of the cotangent.
fn concat(
    b: &mut Builder,
    xs: &[ValueId],
    gy: ValueId,
    axis: usize,
    wanted: &[bool],
) -> R<Contribs> {
    let mut out = Vec::with_capacity(xs.len());
    let mut start = 0;
    for (&x, &w) in xs.iter().zip(wanted) {
        let end = start + b.ty(x).shape[axis];
        out.push(if w {
            Some(b.op(Op::Slice { axis, start, end }, vec![gy])?)
        } else {
            None
        });
        start = end;
    }
    Ok(out)
}

/// Slice: the cotangent padded with zeros to the operand's extent.
fn slice(
    b: &mut Builder,
    x: ValueId,
    gy: ValueId,
    axis: usize,
    start: u64,
    end: u64,
) -> R<ValueId> {
    let n = b.ty(x).shape[axis];
    let mut parts = Vec::with_capacity(3);
    if start > 0 {
        let before = b.op(
            Op::Slice {
                axis,
                start: 0,
                end: start,
            },
            vec![x],
        )?;
        parts.push(b.full_like(before, 0.0)?);
    }
    parts.push(gy);
    if end < n {
        let after = b.op(
            Op::Slice {
                axis,
                start: end,
                end: n,
            },
            vec![x],
        )?;
        parts.push(b.full_like(after, 0.0)?);
    }
    if parts.len() == 1 {
        return Ok(gy);
    }
    b.op(Op::Concat { axis }, parts)
}

/// Mean cross-entropy over N positions: `(softmax(x) - onehot(labels)) · g / N`, the softmax
/// through a max and a sum over the vocab dim, so that a vocab-split `x` needs only two
/// reductions of the positions (and no gather of the logits).
fn cross_entropy(b: &mut Builder, x: ValueId, labels: ValueId, gy: ValueId) -> R<ValueId> {
    let xs = b.ty(x).shape.clone();
    let last = xs.len() - 1;
    let n: u64 = xs[..last].iter().product();
    let m = b.reduce(ReduceOp::Max, x, last, true)?;
    let z = b.bin(BinaryOp::Sub, x, m)?;
    let e = b.unary(UnaryOp::Exp, z)?;
    let s = b.reduce(ReduceOp::Sum, e, last, true)?;
    let p = b.bin(BinaryOp::Div, e, s)?;
    let onehot = b.op(Op::OneHot { depth: xs[last] }, vec![labels])?;
    let onehot = as_dtype_of(b, onehot, x)?;
    let d = b.bin(BinaryOp::Sub, p, onehot)?;
    let scale = b.scalar(BinaryOp::Div, gy, n as f64, false)?;
    // The loss (and its cotangent) is f32 whatever the logits' dtype.
    let scale = as_dtype_of(b, scale, x)?;
    b.bin(BinaryOp::Mul, d, scale)
}

/// `v` cast to `like`'s dtype (itself when they agree).
fn as_dtype_of(b: &mut Builder, v: ValueId, like: ValueId) -> R<ValueId> {
    let to = b.ty(like).dtype;
    match b.ty(v).dtype == to {
        true => Ok(v),
        false => b.op(Op::Cast { to }, vec![v]),
    }
}

/// Layer norm (`layer`: mean-centred, with an optional bias) or RMS norm over the last dim:
/// `dx = r·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂))` (RMS: without the first mean), `dscale =
/// Σ g·x̂`, `dbias = Σ g` over the leading dims.
fn norm(
    b: &mut Builder,
    xs: &[ValueId],
    gy: ValueId,
    eps: f64,
    layer: bool,
    wanted: &[bool],
) -> R<Contribs> {
    let (x, scale) = (xs[0], xs[1]);
    let shape = b.ty(x).shape.clone();
    let last = shape.len() - 1;
    let centred = if layer {
        let mu = b.reduce(ReduceOp::Mean, x, last, true)?;
        b.bin(BinaryOp::Sub, x, mu)?
    } else {
        x
    };
    let sq = b.bin(BinaryOp::Mul, centred, centred)?;
    let var = b.reduce(ReduceOp::Mean, sq, last, true)?;
    let var_eps = b.scalar(BinaryOp::Add, var, eps, false)?;
    let r = b.unary(UnaryOp::Rsqrt, var_eps)?;
    let xhat = b.bin(BinaryOp::Mul, centred, r)?;
    let mut out = vec![None; xs.len()];
    if wanted[0] {
        let dxhat = b.bin(BinaryOp::Mul, gy, scale)?;
        let prod = b.bin(BinaryOp::Mul, dxhat, xhat)?;
        let m2 = b.reduce(ReduceOp::Mean, prod, last, true)?;
        let corr = b.bin(BinaryOp::Mul, xhat, m2)?;
        let mut d = b.bin(BinaryOp::Sub, dxhat, corr)?;
        if layer {
            let m1 = b.reduce(ReduceOp::Mean, dxhat, last, true)?;
            d = b.bin(BinaryOp::Sub, d, m1)?;
        }
        out[0] = Some(b.bin(BinaryOp::Mul, d, r)?);
    }
    if wanted[1] {
        let gx = b.bin(BinaryOp::Mul, gy, xhat)?;
        out[1] = Some(sum_rows(b, gx)?);
    }
    if wanted.get(2).copied().unwrap_or(false) {
        out[2] = Some(sum_rows(b, gy)?);
    }
    Ok(out)
}

/// Sums `[..., H]` over every leading dim: `[H]`.
fn sum_rows(b: &mut Builder, v: ValueId) -> R<ValueId> {
    let shape = b.ty(v).shape.clone();
    let h = shape[shape.len() - 1];
    let rows: u64 = shape[..shape.len() - 1].iter().product();
    let flat = b.reshape(v, &[rows, h])?;
    b.reduce(ReduceOp::Sum, flat, 0, false)
}

/// `where(c, a, b)`: the cotangent goes to the branch chosen (`where(c, g, 0)`,
/// `where(c, 0, g)`), unbroadcast to its shape; the condition gets none.
fn select(b: &mut Builder, x: &[ValueId], gy: ValueId) -> R<Vec<Option<ValueId>>> {
    let zero = b.full_like(gy, 0.0)?;
    let ga = b.op(Op::Select, vec![x[0], gy, zero])?;
    let gb = b.op(Op::Select, vec![x[0], zero, gy])?;
    let (sa, sb) = (b.ty(x[1]).shape.clone(), b.ty(x[2]).shape.clone());
    Ok(vec![
        None,
        Some(b.unbroadcast(ga, &sa)?),
        Some(b.unbroadcast(gb, &sb)?),
    ])
}
