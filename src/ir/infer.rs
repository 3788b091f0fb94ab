//! Shape and dtype inference, one rule per op. Lowering reports failures as user errors; the
//! verifier re-runs it and reports disagreements as compiler bugs.

use super::op::{Op, UnaryOp};
use super::types::{Dtype, TensorType};

/// Why an op cannot be applied to operands of the given types.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferError {
    /// Wrong number of operands.
    #[error("{op} takes {expected} operand(s), got {got}")]
    Arity {
        /// Op name.
        op: &'static str,
        /// Accepted count, e.g. "2" or "2 or 3".
        expected: &'static str,
        /// Given count.
        got: usize,
    },
    /// Shapes that do not fit together (both shown).
    #[error("shape mismatch in {op}: {lhs} vs {rhs}{detail}")]
    Shape {
        /// Op name.
        op: &'static str,
        /// First operand type.
        lhs: TensorType,
        /// Second operand type.
        rhs: TensorType,
        /// Extra explanation, starting with ": " when non-empty.
        detail: String,
    },
    /// An operand of the wrong rank.
    #[error("rank mismatch in {op}: {ty} has rank {}, expected {expected}", ty.rank())]
    Rank {
        /// Op name.
        op: &'static str,
        /// The operand type.
        ty: TensorType,
        /// What was expected, e.g. "at least 2".
        expected: String,
    },
    /// Operands of different or unsupported dtypes.
    #[error("dtype mismatch in {op}: {detail}")]
    Dtype {
        /// Op name.
        op: &'static str,
        /// Both dtypes or the rule broken.
        detail: String,
    },
    /// A bad attribute (axis out of range, bad permutation, element count change...).
    #[error("{op}: {detail}")]
    Attr {
        /// Op name.
        op: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// Result types of `op` applied to operands of types `inputs`.
pub fn infer(op: &Op, inputs: &[&TensorType]) -> Result<Vec<TensorType>, InferError> {
    let name = op.name();
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::State { .. } => {
            Err(attr(name, "leaf ops have declared types"))
        }
        Op::MatMul => {
            let [a, b] = operands(name, inputs)?;
            one(matmul(a, b))
        }
        Op::Binary { .. } => {
            let [a, b] = operands(name, inputs)?;
            one(binary(name, a, b))
        }
        Op::Scalar { .. } => {
            let [x] = operands(name, inputs)?;
            Ok(vec![x.clone()])
        }
        Op::Unary { op: u } => {
            let [x] = operands(name, inputs)?;
            one(unary(*u, x))
        }
        Op::Softmax { axis } => {
            let [x] = operands(name, inputs)?;
            one(softmax(x, *axis))
        }
        Op::LayerNorm { .. } => one(layer_norm(inputs)),
        Op::RmsNorm { .. } => {
            let [x, scale] = operands(name, inputs)?;
            one(norm(name, x, &[scale]))
        }
        Op::Reduce { axis, keepdims, .. } => {
            let [x] = operands(name, inputs)?;
            one(reduce(name, x, *axis, *keepdims))
        }
        Op::Transpose { perm } => {
            let [x] = operands(name, inputs)?;
            one(transpose(x, perm))
        }
        Op::Reshape { shape } => {
            let [x] = operands(name, inputs)?;
            one(reshape(x, shape))
        }
        Op::Split { axis, sizes } => {
            let [x] = operands(name, inputs)?;
            split(x, *axis, sizes)
        }
        Op::Concat { axis } => one(concat(inputs, *axis)),
        Op::Slice { axis, start, end } => {
            let [x] = operands(name, inputs)?;
            one(slice(x, *axis, *start, *end))
        }
        Op::Embedding => {
            let [ids, table] = operands(name, inputs)?;
            one(embedding(ids, table))
        }
        Op::CrossEntropy => {
            let [logits, labels] = operands(name, inputs)?;
            one(cross_entropy(logits, labels))
        }
        Op::CausalMask => {
            let [x] = operands(name, inputs)?;
            one(causal_mask(x))
        }
        Op::Cast { to } => {
            let [x] = operands(name, inputs)?;
            Ok(vec![TensorType::new(*to, x.shape.clone())])
        }
        Op::FullLike { .. } => {
            let [x] = operands(name, inputs)?;
            Ok(vec![x.clone()])
        }
        Op::Fill { dtype, shape, .. } => {
            let [] = operands(name, inputs)?;
            Ok(vec![TensorType::new(*dtype, shape.clone())])
        }
        Op::BroadcastTo { shape } => {
            let [x] = operands(name, inputs)?;
            one(broadcast_to(x, shape))
        }
        Op::UnaryGrad { .. } => {
            let [x, g] = operands(name, inputs)?;
            one(unary_grad(name, x, g))
        }
        Op::Equal => {
            let [a, b] = operands(name, inputs)?;
            one(binary(name, a, b).map(|t| TensorType::new(Dtype::F32, t.shape)))
        }
        Op::Select => {
            let [c, a, b] = operands(name, inputs)?;
            one(select(name, c, a, b))
        }
        Op::ScatterAdd { rows } => {
            let [ids, g] = operands(name, inputs)?;
            one(scatter_add(ids, g, *rows))
        }
        Op::OneHot { depth } => {
            let [labels] = operands(name, inputs)?;
            require_i32(name, labels)?;
            let mut shape = labels.shape.clone();
            shape.push(*depth);
            Ok(vec![TensorType::new(Dtype::F32, shape)])
        }
        Op::AllReduce { .. } => bucket(name, inputs),
        Op::KeepOnFirst { .. } => {
            let [x] = operands(name, inputs)?;
            Ok(vec![x.clone()])
        }
        Op::AllGather { size, dim, .. } => {
            let [x] = operands(name, inputs)?;
            one(resize_dim(name, x, *dim, |n| n.checked_mul(*size)))
        }
        Op::ReduceScatter { size, dim, .. } | Op::ShardSlice { size, dim, .. } => {
            let [x] = operands(name, inputs)?;
            one(resize_dim(name, x, *dim, |n| {
                (*size > 0 && n % size == 0).then(|| n / size)
            }))
        }
        Op::AllToAll {
            size,
            split,
            concat,
            ..
        } => {
            let [x] = operands(name, inputs)?;
            let y = resize_dim(name, x, *split, |n| {
                (*size > 0 && n % size == 0).then(|| n / size)
            })?;
            one(resize_dim(name, &y, *concat, |n| n.checked_mul(*size)))
        }
        Op::Redistribute { axes, from, to } => {
            let [x] = operands(name, inputs)?;
            one(redistribute(x, axes, from, to))
        }
        Op::VocabEmbedding { .. } => {
            let [ids, table] = operands(name, inputs)?;
            one(embedding(ids, table))
        }
        Op::TargetLogit { .. } => {
            let [x, labels] = operands(name, inputs)?;
            one(target_logit(x, labels))
        }
    }
}

/// `x` with dim `dim` resized by `f` (`None` from `f`: the size does not fit the op).
fn resize_dim(
    op: &'static str,
    x: &TensorType,
    dim: usize,
    f: impl Fn(u64) -> Option<u64>,
) -> Result<TensorType, InferError> {
    check_axis(op, x, dim)?;
    let n = f(x.shape[dim])
        .ok_or_else(|| attr(op, format!("dim {dim} of {x} does not fit the group size")))?;
    let mut shape = x.shape.clone();
    shape[dim] = n;
    Ok(x.with_shape(shape))
}

/// The local type after a redistribute: each dim grows by its `from` splits and shrinks by its
/// `to` splits; every group axis splits exactly one dim before and one after.
fn redistribute(
    x: &TensorType,
    axes: &[(String, u64)],
    from: &[Vec<usize>],
    to: &[Vec<usize>],
) -> Result<TensorType, InferError> {
    let op = "redistribute";
    if from.len() != x.rank() || to.len() != x.rank() {
        return Err(attr(
            op,
            format!("its split lists do not have one entry per dim of {x}"),
        ));
    }
    for side in [from, to] {
        let mut seen = vec![0u32; axes.len()];
        for &a in side.iter().flatten() {
            match seen.get_mut(a) {
                Some(n) => *n += 1,
                None => return Err(attr(op, format!("axis index {a} is not in its group"))),
            }
        }
        if seen.iter().any(|&n| n != 1) {
            return Err(attr(
                op,
                "every group axis must split exactly one dim".to_string(),
            ));
        }
    }
    let count = |d: &[usize]| {
        d.iter()
            .try_fold(1u64, |n, &a| n.checked_mul(axes[a].1))
            .filter(|&n| n > 0)
    };
    let mut shape = x.shape.clone();
    for (d, n) in shape.iter_mut().enumerate() {
        let whole = count(&from[d]).and_then(|k| n.checked_mul(k));
        *n = match (whole, count(&to[d])) {
            (Some(w), Some(k)) if w % k == 0 => w / k,
            _ => return Err(attr(op, format!("dim {d} of {x} does not fit the group"))),
        };
    }
    Ok(x.with_shape(shape))
}

fn target_logit(x: &TensorType, labels: &TensorType) -> Result<TensorType, InferError> {
    require_float("target_logit", x)?;
    require_i32("target_logit", labels)?;
    min_rank("target_logit", x, 1)?;
    if x.shape[..x.rank() - 1] != labels.shape[..] {
        return Err(shape_err(
            "target_logit",
            x,
            labels,
            ": label shape must be the logits shape without the last dim".into(),
        ));
    }
    Ok(x.with_shape(labels.shape.clone()))
}

/// The numpy broadcast of two shapes (aligned on the right, size-1 dims stretch); `None` when
/// some pair of dims differs and neither is 1.
pub fn broadcast_shapes(a: &[u64], b: &[u64]) -> Option<Vec<u64>> {
    broadcast(a, b).ok()
}

/// Like `broadcast_shapes`, but the error is the first incompatible pair of dims.
fn broadcast(a: &[u64], b: &[u64]) -> Result<Vec<u64>, (u64, u64)> {
    let n = a.len().max(b.len());
    let dim = |s: &[u64], i: usize| {
        let pad = n - s.len();
        if i < pad {
            1
        } else {
            s[i - pad]
        }
    };
    (0..n)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y || y == 1 => Ok(x),
            (1, y) => Ok(y),
            pair => Err(pair),
        })
        .collect()
}

/// Wraps a single result type.
fn one(r: Result<TensorType, InferError>) -> Result<Vec<TensorType>, InferError> {
    r.map(|t| vec![t])
}

/// The operands as an array of exactly `N`, or an arity error.
fn operands<'a, const N: usize>(
    op: &'static str,
    inputs: &[&'a TensorType],
) -> Result<[&'a TensorType; N], InferError> {
    inputs.try_into().map_err(|_| InferError::Arity {
        op,
        expected: ["0", "1", "2", "3"].get(N).copied().unwrap_or("?"),
        got: inputs.len(),
    })
}

/// An all-reduce of one operand, or a bucket of several fused into one message: at least one
/// operand, all of one dtype; each result is its operand's type.
fn bucket(op: &'static str, inputs: &[&TensorType]) -> Result<Vec<TensorType>, InferError> {
    let Some(first) = inputs.first() else {
        return Err(InferError::Arity {
            op,
            expected: "1 or more",
            got: 0,
        });
    };
    if let Some(t) = inputs.iter().find(|t| t.dtype != first.dtype) {
        return Err(attr(
            op,
            format!(
                "a bucket holds one dtype, but has {} and {}",
                first.dtype, t.dtype
            ),
        ));
    }
    Ok(inputs.iter().map(|t| (*t).clone()).collect())
}

/// An attribute error.
fn attr(op: &'static str, detail: impl Into<String>) -> InferError {
    InferError::Attr {
        op,
        detail: detail.into(),
    }
}

/// A shape error naming both operands.
fn shape_err(op: &'static str, lhs: &TensorType, rhs: &TensorType, detail: String) -> InferError {
    InferError::Shape {
        op,
        lhs: lhs.clone(),
        rhs: rhs.clone(),
        detail,
    }
}

/// A rank error.
fn rank_err(op: &'static str, ty: &TensorType, expected: impl Into<String>) -> InferError {
    InferError::Rank {
        op,
        ty: ty.clone(),
        expected: expected.into(),
    }
}

/// Formats a list of dims or indices as `[a,b,c]`.
fn list<T: std::fmt::Display>(v: &[T]) -> String {
    let items: Vec<String> = v.iter().map(|x| x.to_string()).collect();
    format!("[{}]", items.join(","))
}

/// Requires a floating-point operand.
fn require_float(op: &'static str, x: &TensorType) -> Result<(), InferError> {
    require_dtype(op, x, x.dtype.is_float(), "a float")
}

/// Requires an i32 operand.
fn require_i32(op: &'static str, x: &TensorType) -> Result<(), InferError> {
    require_dtype(op, x, x.dtype == Dtype::I32, "an i32")
}

/// A dtype error unless `ok`; `what` names the wanted kind ("a float").
fn require_dtype(op: &'static str, x: &TensorType, ok: bool, what: &str) -> Result<(), InferError> {
    if ok {
        return Ok(());
    }
    Err(InferError::Dtype {
        op,
        detail: format!("expected {what} operand, got {x}"),
    })
}

/// Requires both operands to have the same dtype.
fn same_dtype(op: &'static str, a: &TensorType, b: &TensorType) -> Result<(), InferError> {
    if a.dtype == b.dtype {
        return Ok(());
    }
    Err(InferError::Dtype {
        op,
        detail: format!("{a} vs {b} ({} and {} differ)", a.dtype, b.dtype),
    })
}

/// Requires rank at least `min`.
fn min_rank(op: &'static str, x: &TensorType, min: usize) -> Result<(), InferError> {
    if x.rank() >= min {
        return Ok(());
    }
    Err(rank_err(op, x, format!("at least {min}")))
}

/// Requires exactly rank `rank`.
fn exact_rank(op: &'static str, x: &TensorType, rank: usize) -> Result<(), InferError> {
    if x.rank() == rank {
        return Ok(());
    }
    Err(rank_err(op, x, rank.to_string()))
}

/// Requires `axis < rank`.
fn check_axis(op: &'static str, x: &TensorType, axis: usize) -> Result<(), InferError> {
    if axis < x.rank() {
        return Ok(());
    }
    Err(attr(
        op,
        format!("axis {axis} out of range for {x} (rank {})", x.rank()),
    ))
}

/// numpy matmul with 1-D promotion and batch broadcasting.
fn matmul(a: &TensorType, b: &TensorType) -> Result<TensorType, InferError> {
    const OP: &str = "matmul";
    for x in [a, b] {
        min_rank(OP, x, 1)?;
        require_float(OP, x)?;
    }
    same_dtype(OP, a, b)?;
    let sa = if a.rank() == 1 {
        vec![1, a.shape[0]]
    } else {
        a.shape.clone()
    };
    let sb = if b.rank() == 1 {
        vec![b.shape[0], 1]
    } else {
        b.shape.clone()
    };
    let (batch_a, mk) = sa.split_at(sa.len() - 2);
    let (batch_b, kn) = sb.split_at(sb.len() - 2);
    if mk[1] != kn[0] {
        let detail = format!(": contracting dims {} and {} differ", mk[1], kn[0]);
        return Err(shape_err(OP, a, b, detail));
    }
    let mut out = broadcast_shapes(batch_a, batch_b).ok_or_else(|| {
        let detail = format!(
            ": batch dims {} and {} do not broadcast",
            list(batch_a),
            list(batch_b)
        );
        shape_err(OP, a, b, detail)
    })?;
    if a.rank() > 1 {
        out.push(mk[0]);
    }
    if b.rank() > 1 {
        out.push(kn[1]);
    }
    Ok(a.with_shape(out))
}

/// Elementwise binary op: broadcast shapes, same dtype.
fn binary(op: &'static str, a: &TensorType, b: &TensorType) -> Result<TensorType, InferError> {
    same_dtype(op, a, b)?;
    let shape = broadcast(&a.shape, &b.shape)
        .map_err(|(x, y)| shape_err(op, a, b, format!(": dims {x} and {y} do not broadcast")))?;
    Ok(a.with_shape(shape))
}

/// Elementwise unary function: float operand (i32 also allowed for `neg`).
fn unary(u: UnaryOp, x: &TensorType) -> Result<TensorType, InferError> {
    if u == UnaryOp::Neg && x.dtype == Dtype::I32 {
        return Ok(x.clone());
    }
    require_float(u.name(), x)?;
    Ok(x.clone())
}

/// softmax along `axis` of a float operand.
fn softmax(x: &TensorType, axis: usize) -> Result<TensorType, InferError> {
    check_axis("softmax", x, axis)?;
    require_float("softmax", x)?;
    Ok(x.clone())
}

/// Layer norm: operands x, scale[, bias].
fn layer_norm(inputs: &[&TensorType]) -> Result<TensorType, InferError> {
    const OP: &str = "layernorm";
    match inputs {
        [x, params @ ..] if (1..=2).contains(&params.len()) => norm(OP, x, params),
        _ => Err(InferError::Arity {
            op: OP,
            expected: "2 or 3",
            got: inputs.len(),
        }),
    }
}

/// Norm over the last dim: float x of rank >= 1; each param 1-D of the last dim's size, same dtype.
fn norm(
    op: &'static str,
    x: &TensorType,
    params: &[&TensorType],
) -> Result<TensorType, InferError> {
    min_rank(op, x, 1)?;
    require_float(op, x)?;
    let last = x.shape[x.rank() - 1];
    for p in params {
        exact_rank(op, p, 1)?;
        if p.shape[0] != last {
            let detail = format!(
                ": scale/bias size {} differs from last dim {last}",
                p.shape[0]
            );
            return Err(shape_err(op, x, p, detail));
        }
        same_dtype(op, x, p)?;
    }
    Ok(x.clone())
}

/// Reduction of `axis`, dropped or kept with size 1.
fn reduce(
    op: &'static str,
    x: &TensorType,
    axis: usize,
    keepdims: bool,
) -> Result<TensorType, InferError> {
    check_axis(op, x, axis)?;
    let mut shape = x.shape.clone();
    if keepdims {
        shape[axis] = 1;
    } else {
        shape.remove(axis);
    }
    Ok(x.with_shape(shape))
}

/// Permutes dims: result dim i is operand dim `perm[i]`.
fn transpose(x: &TensorType, perm: &[usize]) -> Result<TensorType, InferError> {
    let mut seen = vec![false; x.rank()];
    let valid = perm.len() == x.rank()
        && perm
            .iter()
            .all(|&p| p < seen.len() && !std::mem::replace(&mut seen[p], true));
    if !valid {
        let detail = format!(
            "perm {} is not a permutation of 0..{} (operand {x})",
            list(perm),
            x.rank()
        );
        return Err(attr("transpose", detail));
    }
    Ok(x.with_shape(perm.iter().map(|&p| x.shape[p]).collect()))
}

/// Number of elements of `shape`, `None` on overflow.
fn numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))
}

/// Row-major reshape preserving the element count.
fn reshape(x: &TensorType, shape: &[u64]) -> Result<TensorType, InferError> {
    let target = x.with_shape(shape.to_vec());
    match (numel(&x.shape), numel(shape)) {
        (Some(a), Some(b)) if a == b => Ok(target),
        (Some(a), Some(b)) => Err(shape_err(
            "reshape",
            x,
            &target,
            format!(": element counts {a} and {b} differ"),
        )),
        _ => Err(shape_err(
            "reshape",
            x,
            &target,
            ": element count overflows u64".into(),
        )),
    }
}

/// Splits `axis` into pieces of `sizes` (all positive, summing to the axis size).
fn split(x: &TensorType, axis: usize, sizes: &[u64]) -> Result<Vec<TensorType>, InferError> {
    check_axis("split", x, axis)?;
    let total = sizes.iter().try_fold(0u64, |n, &s| n.checked_add(s));
    let valid = !sizes.is_empty() && sizes.iter().all(|&s| s > 0);
    if !valid || total != Some(x.shape[axis]) {
        let detail = format!(
            "sizes {} must be positive and sum to {} (axis {axis} of {x})",
            list(sizes),
            x.shape[axis]
        );
        return Err(attr("split", detail));
    }
    let piece = |s: u64| {
        let mut shape = x.shape.clone();
        shape[axis] = s;
        x.with_shape(shape)
    };
    Ok(sizes.iter().map(|&s| piece(s)).collect())
}

/// Concatenation along `axis` of one or more operands agreeing on all other dims.
fn concat(inputs: &[&TensorType], axis: usize) -> Result<TensorType, InferError> {
    const OP: &str = "concat";
    let (first, rest) = inputs.split_first().ok_or(InferError::Arity {
        op: OP,
        expected: "at least 1",
        got: 0,
    })?;
    check_axis(OP, first, axis)?;
    let mut total = first.shape[axis];
    for (i, x) in rest.iter().enumerate() {
        same_dtype(OP, first, x)?;
        concat_dims_agree(first, x, i + 1, axis)?;
        total = total
            .checked_add(x.shape[axis])
            .ok_or_else(|| attr(OP, "concatenated size overflows u64"))?;
    }
    let mut shape = first.shape.clone();
    shape[axis] = total;
    Ok(first.with_shape(shape))
}

/// Operand `i` of a concat has the first operand's rank and dims except on `axis`.
fn concat_dims_agree(
    first: &TensorType,
    x: &TensorType,
    i: usize,
    axis: usize,
) -> Result<(), InferError> {
    if x.rank() != first.rank() {
        let detail = format!(
            ": operand {i} has rank {}, operand 0 has rank {}",
            x.rank(),
            first.rank()
        );
        return Err(shape_err("concat", first, x, detail));
    }
    let bad = (0..x.rank()).find(|&d| d != axis && x.shape[d] != first.shape[d]);
    match bad {
        None => Ok(()),
        Some(d) => Err(shape_err(
            "concat",
            first,
            x,
            format!(": operand {i} differs from operand 0 at dim {d} (not the concat axis {axis})"),
        )),
    }
}

/// Elements `start..end` of `axis`.
fn slice(x: &TensorType, axis: usize, start: u64, end: u64) -> Result<TensorType, InferError> {
    check_axis("slice", x, axis)?;
    let size = x.shape[axis];
    if start >= end || end > size {
        let detail =
            format!("range {start}..{end} is empty or exceeds size {size} of axis {axis} of {x}");
        return Err(attr("slice", detail));
    }
    let mut shape = x.shape.clone();
    shape[axis] = end - start;
    Ok(x.with_shape(shape))
}

/// Row lookup: i32 ids of any rank, float table `[V, H]`; result `ids.shape + [H]`.
fn embedding(ids: &TensorType, table: &TensorType) -> Result<TensorType, InferError> {
    const OP: &str = "embedding";
    require_i32(OP, ids)?;
    require_float(OP, table)?;
    exact_rank(OP, table, 2)?;
    let mut shape = ids.shape.clone();
    shape.push(table.shape[1]);
    Ok(table.with_shape(shape))
}

/// Mean cross-entropy: float logits `[..., V]`, i32 labels `[...]`; result f32 scalar.
fn cross_entropy(logits: &TensorType, labels: &TensorType) -> Result<TensorType, InferError> {
    const OP: &str = "cross_entropy";
    min_rank(OP, logits, 1)?;
    require_float(OP, logits)?;
    require_i32(OP, labels)?;
    let batch = &logits.shape[..logits.rank() - 1];
    if labels.shape != batch {
        let detail = format!(
            ": labels must have shape {} (logits without the last dim)",
            list(batch)
        );
        return Err(shape_err(OP, logits, labels, detail));
    }
    Ok(TensorType::new(Dtype::F32, Vec::new()))
}

/// numpy `broadcast_to`: every operand dim, aligned at the end, equals the target's or is 1.
fn broadcast_to(x: &TensorType, shape: &[u64]) -> Result<TensorType, InferError> {
    const OP: &str = "broadcast_to";
    let fits = x.rank() <= shape.len()
        && x.shape
            .iter()
            .rev()
            .zip(shape.iter().rev())
            .all(|(&a, &b)| a == b || a == 1);
    if !fits {
        return Err(attr(
            OP,
            format!("{x} does not broadcast to [{}]", list(shape)),
        ));
    }
    Ok(x.with_shape(shape.to_vec()))
}

/// g·f'(x): float x and g of one type.
fn unary_grad(op: &'static str, x: &TensorType, g: &TensorType) -> Result<TensorType, InferError> {
    require_float(op, x)?;
    if x != g {
        return Err(shape_err(
            op,
            x,
            g,
            ": the cotangent has the operand's type".into(),
        ));
    }
    Ok(x.clone())
}

/// Sums rows `g[..., :]` into `[rows, H]` by i32 ids `[...]`.
fn scatter_add(ids: &TensorType, g: &TensorType, rows: u64) -> Result<TensorType, InferError> {
    const OP: &str = "scatter_add";
    require_i32(OP, ids)?;
    require_float(OP, g)?;
    if g.rank() != ids.rank() + 1 || g.shape[..ids.rank()] != ids.shape[..] {
        let detail = ": rows must have shape ids + [H]".to_string();
        return Err(shape_err(OP, ids, g, detail));
    }
    Ok(g.with_shape(vec![rows, g.shape[ids.rank()]]))
}

/// Causal mask over the last two dims of a float operand.
fn causal_mask(x: &TensorType) -> Result<TensorType, InferError> {
    min_rank("causal_mask", x, 2)?;
    require_float("causal_mask", x)?;
    Ok(x.clone())
}

/// `where(c, a, b)`: a float condition, float branches of one dtype; the broadcast of all three,
/// in the branches' dtype.
fn select(
    name: &'static str,
    c: &TensorType,
    a: &TensorType,
    b: &TensorType,
) -> Result<TensorType, InferError> {
    if !c.dtype.is_float() || !a.dtype.is_float() {
        return Err(InferError::Dtype {
            op: name,
            detail: format!(
                "condition {} and branch {} must be floats",
                c.dtype, a.dtype
            ),
        });
    }
    let branches = binary(name, a, b)?;
    binary(name, &TensorType::new(a.dtype, c.shape.clone()), &branches)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::op::{BinaryOp, ReduceOp};

    /// Expected outcome of one inference case.
    enum Expect {
        /// These result types.
        Ok(Vec<TensorType>),
        /// An error of this class.
        Err(&'static str),
    }
    use Expect::{Err as E, Ok as O};

    fn t(dtype: Dtype, shape: &[u64]) -> TensorType {
        TensorType::new(dtype, shape.to_vec())
    }

    fn f(shape: &[u64]) -> TensorType {
        t(Dtype::F32, shape)
    }

    fn i(shape: &[u64]) -> TensorType {
        t(Dtype::I32, shape)
    }

    fn bf(shape: &[u64]) -> TensorType {
        t(Dtype::Bf16, shape)
    }

    fn class(e: &InferError) -> &'static str {
        match e {
            InferError::Arity { .. } => "arity",
            InferError::Shape { .. } => "shape",
            InferError::Rank { .. } => "rank",
            InferError::Dtype { .. } => "dtype",
            InferError::Attr { .. } => "attr",
        }
    }

    fn run(op: &Op, cases: Vec<(Vec<TensorType>, Expect)>) {
        for (n, (inputs, expect)) in cases.into_iter().enumerate() {
            let refs: Vec<&TensorType> = inputs.iter().collect();
            let got = infer(op, &refs);
            match (expect, got) {
                (O(want), Ok(have)) => assert_eq!(have, want, "{op} case {n}"),
                (E(want), Err(e)) => assert_eq!(class(&e), want, "{op} case {n}: {e}"),
                (O(want), Err(e)) => panic!("{op} case {n}: expected {want:?}, got error {e}"),
                (E(want), Ok(have)) => panic!("{op} case {n}: expected {want} error, got {have:?}"),
            }
        }
    }

    fn msg(op: &Op, inputs: &[TensorType]) -> String {
        let refs: Vec<&TensorType> = inputs.iter().collect();
        infer(op, &refs).unwrap_err().to_string()
    }

    #[test]
    fn broadcast_rules() {
        type Case<'a> = (&'a [u64], &'a [u64], Option<&'a [u64]>);
        let cases: &[Case] = &[
            (&[3, 1], &[1, 4], Some(&[3, 4])),
            (&[], &[2, 3], Some(&[2, 3])),
            (&[2, 3], &[], Some(&[2, 3])),
            (&[2, 1, 3], &[4, 1], Some(&[2, 4, 3])),
            (&[5, 4], &[4], Some(&[5, 4])),
            (&[0], &[1], Some(&[0])),
            (&[3], &[4], None),
            (&[0], &[3], None),
            (&[2, 3], &[3, 3], None),
        ];
        for (a, b, want) in cases {
            let got = broadcast_shapes(a, b);
            assert_eq!(got.as_deref(), *want, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn leaves_are_not_inferred() {
        let ops = [
            Op::Input { name: "x".into() },
            Op::Param { name: "w".into() },
        ];
        for op in &ops {
            run(op, vec![(vec![], E("attr"))]);
        }
    }

    #[test]
    fn matmul_rules() {
        run(
            &Op::MatMul,
            vec![
                (vec![f(&[2, 3]), f(&[3, 4])], O(vec![f(&[2, 4])])),
                (
                    vec![f(&[2, 3, 4, 5]), f(&[2, 3, 5, 6])],
                    O(vec![f(&[2, 3, 4, 6])]),
                ),
                (vec![f(&[1, 4, 5]), f(&[3, 5, 6])], O(vec![f(&[3, 4, 6])])),
                (vec![f(&[4, 5]), f(&[3, 5, 6])], O(vec![f(&[3, 4, 6])])),
                (vec![f(&[7]), f(&[7, 2])], O(vec![f(&[2])])),
                (vec![f(&[3, 7]), f(&[7])], O(vec![f(&[3])])),
                (vec![f(&[7]), f(&[7])], O(vec![f(&[])])),
                (vec![f(&[2, 7]), f(&[3, 7, 2])], O(vec![f(&[3, 2, 2])])),
                (vec![f(&[5, 7]), f(&[2, 7])], E("shape")),
                (vec![f(&[2, 3, 4]), f(&[3, 4, 5])], E("shape")),
                (vec![f(&[7]), f(&[8])], E("shape")),
                (vec![f(&[]), f(&[3, 4])], E("rank")),
                (vec![f(&[3, 4]), f(&[])], E("rank")),
                (vec![f(&[2, 3]), bf(&[3, 4])], E("dtype")),
                (vec![i(&[2, 3]), i(&[3, 4])], E("dtype")),
                (vec![f(&[2, 3])], E("arity")),
                (vec![bf(&[2, 3]), bf(&[3, 4])], O(vec![bf(&[2, 4])])),
            ],
        );
    }

    #[test]
    fn matmul_messages_name_both_shapes() {
        let m = msg(&Op::MatMul, &[f(&[8, 64]), f(&[32, 16])]);
        assert_eq!(
            m,
            "shape mismatch in matmul: f32[8,64] vs f32[32,16]: contracting dims 64 and 32 differ"
        );
        let m = msg(&Op::MatMul, &[f(&[2, 4, 5]), f(&[3, 5, 6])]);
        assert_eq!(
            m,
            "shape mismatch in matmul: f32[2,4,5] vs f32[3,5,6]: batch dims [2] and [3] do not broadcast"
        );
        let m = msg(&Op::MatMul, &[f(&[2, 3]), bf(&[3, 4])]);
        assert!(m.contains("f32[2,3]") && m.contains("bf16[3,4]"), "{m}");
    }

    #[test]
    fn binary_rules() {
        for op in [
            BinaryOp::Add,
            BinaryOp::Sub,
            BinaryOp::Mul,
            BinaryOp::Div,
            BinaryOp::Max,
        ] {
            run(
                &Op::Binary { op },
                vec![
                    (vec![f(&[3, 1]), f(&[1, 4])], O(vec![f(&[3, 4])])),
                    (vec![f(&[]), f(&[2, 3])], O(vec![f(&[2, 3])])),
                    (vec![f(&[2, 1, 3]), f(&[4, 1])], O(vec![f(&[2, 4, 3])])),
                    (vec![i(&[2]), i(&[2])], O(vec![i(&[2])])),
                    (vec![f(&[3]), f(&[4])], E("shape")),
                    (vec![f(&[3]), bf(&[3])], E("dtype")),
                    (vec![f(&[3]), i(&[3])], E("dtype")),
                    (vec![f(&[3])], E("arity")),
                    (vec![f(&[3]), f(&[3]), f(&[3])], E("arity")),
                ],
            );
        }
        let m = msg(&Op::Binary { op: BinaryOp::Add }, &[f(&[2, 3]), f(&[2, 4])]);
        assert_eq!(
            m,
            "shape mismatch in add: f32[2,3] vs f32[2,4]: dims 3 and 4 do not broadcast"
        );
        let m = msg(&Op::Binary { op: BinaryOp::Mul }, &[f(&[3]), i(&[3])]);
        assert!(m.contains("f32[3]") && m.contains("i32[3]"), "{m}");
    }

    #[test]
    fn scalar_rules() {
        let op = Op::Scalar {
            op: BinaryOp::Mul,
            value: 0.5,
            scalar_lhs: false,
        };
        run(
            &op,
            vec![
                (vec![f(&[2, 3])], O(vec![f(&[2, 3])])),
                (vec![i(&[])], O(vec![i(&[])])),
                (vec![], E("arity")),
            ],
        );
    }

    #[test]
    fn unary_rules() {
        for u in [UnaryOp::Gelu, UnaryOp::Exp, UnaryOp::Rsqrt] {
            run(
                &Op::Unary { op: u },
                vec![
                    (vec![bf(&[2, 3])], O(vec![bf(&[2, 3])])),
                    (vec![i(&[2])], E("dtype")),
                    (vec![f(&[2]), f(&[2])], E("arity")),
                ],
            );
        }
        run(
            &Op::Unary { op: UnaryOp::Neg },
            vec![
                (vec![i(&[2])], O(vec![i(&[2])])),
                (vec![f(&[])], O(vec![f(&[])])),
            ],
        );
    }

    #[test]
    fn softmax_rules() {
        run(
            &Op::Softmax { axis: 1 },
            vec![
                (vec![f(&[2, 3])], O(vec![f(&[2, 3])])),
                (vec![f(&[2])], E("attr")),
                (vec![i(&[2, 3])], E("dtype")),
                (vec![], E("arity")),
            ],
        );
    }

    #[test]
    fn norm_rules() {
        run(
            &Op::LayerNorm { eps: 1e-5 },
            vec![
                (vec![f(&[2, 8]), f(&[8])], O(vec![f(&[2, 8])])),
                (vec![f(&[2, 8]), f(&[8]), f(&[8])], O(vec![f(&[2, 8])])),
                (vec![f(&[2, 8]), f(&[4])], E("shape")),
                (vec![f(&[2, 8]), f(&[8]), f(&[4])], E("shape")),
                (vec![f(&[2, 8]), f(&[1, 8])], E("rank")),
                (vec![f(&[]), f(&[1])], E("rank")),
                (vec![f(&[2, 8]), bf(&[8])], E("dtype")),
                (vec![i(&[2, 8]), i(&[8])], E("dtype")),
                (vec![f(&[2, 8])], E("arity")),
                (vec![f(&[8]), f(&[8]), f(&[8]), f(&[8])], E("arity")),
            ],
        );
        run(
            &Op::RmsNorm { eps: 1e-6 },
            vec![
                (vec![bf(&[4, 8]), bf(&[8])], O(vec![bf(&[4, 8])])),
                (vec![f(&[4, 8]), f(&[4])], E("shape")),
                (vec![f(&[4, 8]), f(&[8]), f(&[8])], E("arity")),
            ],
        );
    }

    #[test]
    fn reduce_rules() {
        let red = |axis, keepdims| Op::Reduce {
            op: ReduceOp::Sum,
            axis,
            keepdims,
        };
        run(
            &red(1, false),
            vec![
                (vec![f(&[2, 3, 4])], O(vec![f(&[2, 4])])),
                (vec![i(&[2, 3])], O(vec![i(&[2])])),
                (vec![f(&[2])], E("attr")),
            ],
        );
        run(&red(0, true), vec![(vec![f(&[2, 3])], O(vec![f(&[1, 3])]))]);
        run(&red(0, false), vec![(vec![f(&[5])], O(vec![f(&[])]))]);
    }

    #[test]
    fn transpose_rules() {
        run(
            &Op::Transpose {
                perm: vec![2, 0, 1],
            },
            vec![
                (vec![f(&[2, 3, 4])], O(vec![f(&[4, 2, 3])])),
                (vec![f(&[2, 3])], E("attr")),
            ],
        );
        for perm in [vec![0, 0], vec![0, 2], vec![0]] {
            run(&Op::Transpose { perm }, vec![(vec![f(&[2, 3])], E("attr"))]);
        }
    }

    #[test]
    fn reshape_rules() {
        let op = Op::Reshape {
            shape: vec![3, 2, 1],
        };
        run(
            &op,
            vec![
                (vec![f(&[2, 3])], O(vec![f(&[3, 2, 1])])),
                (vec![f(&[6])], O(vec![f(&[3, 2, 1])])),
                (vec![f(&[7])], E("shape")),
            ],
        );
        let m = msg(&op, &[f(&[7])]);
        assert_eq!(
            m,
            "shape mismatch in reshape: f32[7] vs f32[3,2,1]: element counts 7 and 6 differ"
        );
        let scalar = Op::Reshape { shape: vec![] };
        run(&scalar, vec![(vec![f(&[1, 1])], O(vec![f(&[])]))]);
    }

    #[test]
    fn split_rules() {
        let op = Op::Split {
            axis: 1,
            sizes: vec![2, 4],
        };
        run(
            &op,
            vec![
                (vec![f(&[3, 6])], O(vec![f(&[3, 2]), f(&[3, 4])])),
                (vec![f(&[3, 7])], E("attr")),
                (vec![f(&[6])], E("attr")),
            ],
        );
        for sizes in [vec![], vec![0, 6], vec![6, 0]] {
            run(
                &Op::Split { axis: 1, sizes },
                vec![(vec![f(&[3, 6])], E("attr"))],
            );
        }
    }

    #[test]
    fn concat_rules() {
        run(
            &Op::Concat { axis: 1 },
            vec![
                (vec![f(&[2, 3]), f(&[2, 5])], O(vec![f(&[2, 8])])),
                (vec![f(&[2, 3])], O(vec![f(&[2, 3])])),
                (
                    vec![f(&[2, 3]), f(&[2, 1]), f(&[2, 4])],
                    O(vec![f(&[2, 8])]),
                ),
                (vec![], E("arity")),
                (vec![f(&[2, 3]), f(&[3, 3])], E("shape")),
                (vec![f(&[2, 3]), f(&[2, 3, 1])], E("shape")),
                (vec![f(&[2, 3]), bf(&[2, 3])], E("dtype")),
                (vec![f(&[2])], E("attr")),
            ],
        );
    }

    #[test]
    fn slice_rules() {
        let sl = |start, end| Op::Slice {
            axis: 0,
            start,
            end,
        };
        run(&sl(1, 3), vec![(vec![f(&[4, 2])], O(vec![f(&[2, 2])]))]);
        run(&sl(0, 4), vec![(vec![f(&[4])], O(vec![f(&[4])]))]);
        run(&sl(2, 2), vec![(vec![f(&[4])], E("attr"))]);
        run(&sl(3, 2), vec![(vec![f(&[4])], E("attr"))]);
        run(&sl(0, 5), vec![(vec![f(&[4])], E("attr"))]);
        run(&sl(0, 1), vec![(vec![f(&[])], E("attr"))]);
    }

    #[test]
    fn embedding_rules() {
        run(
            &Op::Embedding,
            vec![
                (vec![i(&[2, 5]), bf(&[100, 16])], O(vec![bf(&[2, 5, 16])])),
                (vec![i(&[]), f(&[100, 16])], O(vec![f(&[16])])),
                (vec![f(&[2]), f(&[100, 16])], E("dtype")),
                (vec![i(&[2]), i(&[100, 16])], E("dtype")),
                (vec![i(&[2]), f(&[100])], E("rank")),
                (vec![i(&[2])], E("arity")),
            ],
        );
    }

    #[test]
    fn cross_entropy_rules() {
        run(
            &Op::CrossEntropy,
            vec![
                (vec![bf(&[2, 5, 100]), i(&[2, 5])], O(vec![f(&[])])),
                (vec![f(&[100]), i(&[])], O(vec![f(&[])])),
                (vec![f(&[2, 5, 100]), i(&[2, 4])], E("shape")),
                (vec![f(&[2, 100]), i(&[2, 100])], E("shape")),
                (vec![f(&[]), i(&[])], E("rank")),
                (vec![i(&[2, 100]), i(&[2])], E("dtype")),
                (vec![f(&[2, 100]), f(&[2])], E("dtype")),
                (vec![f(&[2, 100])], E("arity")),
            ],
        );
    }

    #[test]
    fn causal_mask_rules() {
        run(
            &Op::CausalMask,
            vec![
                (vec![f(&[2, 4, 4])], O(vec![f(&[2, 4, 4])])),
                (vec![f(&[4])], E("rank")),
                (vec![i(&[4, 4])], E("dtype")),
            ],
        );
    }

    #[test]
    fn cast_rules() {
        run(
            &Op::Cast { to: Dtype::Bf16 },
            vec![
                (vec![f(&[2, 3])], O(vec![bf(&[2, 3])])),
                (vec![i(&[])], O(vec![bf(&[])])),
                (vec![], E("arity")),
            ],
        );
    }

    #[test]
    fn backward_op_rules() {
        run(
            &Op::FullLike { value: 1.0 },
            vec![(vec![i(&[2])], O(vec![i(&[2])])), (vec![], E("arity"))],
        );
        let fill = Op::Fill {
            value: 1.0,
            dtype: Dtype::F32,
            shape: vec![2, 3],
        };
        run(
            &fill,
            vec![(vec![], O(vec![f(&[2, 3])])), (vec![f(&[2])], E("arity"))],
        );
        let to = Op::BroadcastTo {
            shape: vec![2, 3, 4],
        };
        run(
            &to,
            vec![
                (vec![f(&[3, 1])], O(vec![f(&[2, 3, 4])])),
                (vec![f(&[])], O(vec![f(&[2, 3, 4])])),
                (vec![f(&[2, 4])], E("attr")),
                (vec![f(&[1, 2, 3, 4])], E("attr")),
            ],
        );
        let grad = Op::UnaryGrad { op: UnaryOp::Gelu };
        run(
            &grad,
            vec![
                (vec![f(&[2, 3]), f(&[2, 3])], O(vec![f(&[2, 3])])),
                (vec![f(&[2, 3]), f(&[3])], E("shape")),
                (vec![i(&[2]), i(&[2])], E("dtype")),
            ],
        );
        run(
            &Op::Equal,
            vec![
                (vec![i(&[2, 1]), i(&[3])], O(vec![f(&[2, 3])])),
                (vec![f(&[2]), i(&[2])], E("dtype")),
            ],
        );
        run(
            &Op::ScatterAdd { rows: 10 },
            vec![
                (vec![i(&[2, 5]), f(&[2, 5, 4])], O(vec![f(&[10, 4])])),
                (vec![i(&[2, 5]), f(&[2, 4, 4])], E("shape")),
                (vec![f(&[2]), f(&[2, 4])], E("dtype")),
            ],
        );
        run(
            &Op::OneHot { depth: 7 },
            vec![
                (vec![i(&[2, 5])], O(vec![f(&[2, 5, 7])])),
                (vec![f(&[2])], E("dtype")),
            ],
        );
    }
}
