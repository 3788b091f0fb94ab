//! The op dispatcher: checks operand kinds and arity, then calls the kernel for one op.

use super::kernels as k;
use super::{ExecError, Tensor};
use crate::ir::{Dtype, Op, UnaryOp};
use ndarray::{ArrayD, IxDyn};
use std::borrow::{Borrow, Cow};

/// Applies a non-leaf `op` to `args` with global (unsharded) semantics; one tensor per result.
pub fn apply(op: &Op, args: &[&Tensor]) -> Result<Vec<Tensor>, ExecError> {
    let name = op.name();
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Input { .. } | Op::Param { .. } | Op::State { .. } => Err(ExecError::Leaf(name)),
        Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::ReduceScatter { .. }
        | Op::AllToAll { .. }
        | Op::Redistribute { .. }
        | Op::ShardSlice { .. }
        | Op::KeepOnFirst { .. }
        | Op::VocabEmbedding { .. }
        | Op::TargetLogit { .. } => Err(ExecError::Internal {
            node: name.to_string(),
            detail: "an SPMD op needs a rank (it runs in exec::spmd, not in the reference)".into(),
        }),
        Op::MatMul => {
            let [a, b] = arity(name, args)?;
            one(k::matmul(f32_arg(name, 0, a)?, f32_arg(name, 1, b)?)?.into())
        }
        Op::Binary { op: b } => {
            let [x, y] = arity(name, args)?;
            one(match (x, y) {
                (Tensor::F32(x), Tensor::F32(y)) => k::binary_f32(*b, x, y)?.into(),
                (Tensor::I32(x), Tensor::I32(y)) => k::binary_i32(*b, x, y)?.into(),
                (x, y) => return Err(dtype(name, 1, x.kind(), y.kind())),
            })
        }
        Op::Scalar {
            op: b,
            value,
            scalar_lhs,
        } => {
            let [x] = arity(name, args)?;
            one(match x {
                Tensor::F32(x) => k::scalar_f32(*b, *value, *scalar_lhs, x).into(),
                Tensor::I32(x) => k::scalar_i32(*b, *value, *scalar_lhs, x).into(),
            })
        }
        Op::Unary { op: u } => one(unary(*u, args)?),
        Op::Softmax { axis } => {
            let [x] = arity(name, args)?;
            one(k::softmax(f32_arg(name, 0, x)?, *axis)?.into())
        }
        Op::LayerNorm { eps } => one(layernorm(*eps, args)?.into()),
        Op::RmsNorm { eps } => {
            let [x, g] = arity(name, args)?;
            one(k::rmsnorm(f32_arg(name, 0, x)?, f32_arg(name, 1, g)?, *eps)?.into())
        }
        Op::Reduce {
            op: r,
            axis,
            keepdims,
        } => {
            let [x] = arity(name, args)?;
            one(match x {
                Tensor::F32(x) => k::reduce_f32(*r, x, *axis, *keepdims)?.into(),
                Tensor::I32(x) => k::reduce_i32(*r, x, *axis, *keepdims)?.into(),
            })
        }
        Op::Transpose { perm } => layout1(
            name,
            args,
            |x| k::transpose(x, perm),
            |x| k::transpose(x, perm),
        ),
        Op::Reshape { shape } => layout1(
            name,
            args,
            |x| k::reshape(x, shape),
            |x| k::reshape(x, shape),
        ),
        Op::Slice { axis, start, end } => layout1(
            name,
            args,
            |x| k::slice(x, *axis, *start, *end),
            |x| k::slice(x, *axis, *start, *end),
        ),
        Op::Split { axis, sizes } => {
            let [x] = arity(name, args)?;
            Ok(match x {
                Tensor::F32(x) => k::split(x, *axis, sizes)?
                    .into_iter()
                    .map(Tensor::F32)
                    .collect(),
                Tensor::I32(x) => k::split(x, *axis, sizes)?
                    .into_iter()
                    .map(Tensor::I32)
                    .collect(),
            })
        }
        Op::Concat { axis } => one(concat(args, *axis)?),
        Op::Embedding => {
            let [ids, table] = arity(name, args)?;
            one(k::embedding(i32_arg(name, 0, ids)?, f32_arg(name, 1, table)?)?.into())
        }
        Op::CrossEntropy => {
            let [logits, labels] = arity(name, args)?;
            one(k::cross_entropy(f32_arg(name, 0, logits)?, i32_arg(name, 1, labels)?)?.into())
        }
        Op::CausalMask => {
            let [x] = arity(name, args)?;
            one(k::causal_mask(f32_arg(name, 0, x)?)?.into())
        }
        Op::Cast { to } => {
            let [x] = arity(name, args)?;
            one(k::cast(x, *to))
        }
        Op::FullLike { value } => {
            let [x] = arity(name, args)?;
            let shape = IxDyn(x.shape());
            one(match x {
                Tensor::F32(_) => ArrayD::from_elem(shape, *value as f32).into(),
                Tensor::I32(_) => ArrayD::from_elem(shape, *value as i32).into(),
            })
        }
        Op::Fill {
            value,
            dtype,
            shape,
        } => {
            let [] = arity(name, args)?;
            let shape = IxDyn(&usize_shape(name, shape)?);
            one(match dtype {
                Dtype::I32 => ArrayD::from_elem(shape, *value as i32).into(),
                _ => ArrayD::from_elem(shape, *value as f32).into(),
            })
        }
        Op::BroadcastTo { shape } => layout1(
            name,
            args,
            |x| k::broadcast_to(x, shape),
            |x| k::broadcast_to(x, shape),
        ),
        Op::UnaryGrad { op: u } => {
            let [x, g] = arity(name, args)?;
            one(k::unary_grad(*u, f32_arg(name, 0, x)?, f32_arg(name, 1, g)?)?.into())
        }
        Op::Equal => {
            let [x, y] = arity(name, args)?;
            one(match (x, y) {
                (Tensor::F32(x), Tensor::F32(y)) => k::equal(x, y)?.into(),
                (Tensor::I32(x), Tensor::I32(y)) => k::equal(x, y)?.into(),
                (x, y) => return Err(dtype(name, 1, x.kind(), y.kind())),
            })
        }
        Op::Select => {
            let [c, x, y] = arity(name, args)?;
            let f = |i, t| f32_arg(name, i, t);
            one(k::select(f(0, c)?, f(1, x)?, f(2, y)?)?.into())
        }
        Op::ScatterAdd { rows } => {
            let [ids, g] = arity(name, args)?;
            one(k::scatter_add(i32_arg(name, 0, ids)?, f32_arg(name, 1, g)?, *rows)?.into())
        }
        Op::OneHot { depth } => {
            let [labels] = arity(name, args)?;
            one(k::one_hot(i32_arg(name, 0, labels)?, *depth)?.into())
        }
    }
}

/// [`apply`] where the caller may hand operands over (`Cow::Owned`) that it no longer needs:
/// elementwise ops, softmax, the causal mask and reshapes then write their result into an
/// operand's buffer (a reshape of a contiguous array moves no data). Results are the same as
/// [`apply`]'s; owned operands not reused are recycled.
pub(crate) fn apply_owned(op: &Op, args: Vec<Cow<'_, Tensor>>) -> Result<Vec<Tensor>, ExecError> {
    if !args.iter().any(|a| matches!(a, Cow::Owned(_))) {
        let refs: Vec<&Tensor> = args.iter().map(|a| a.as_ref()).collect();
        return apply(op, &refs);
    }
    let name = op.name();
    let one = |t: ArrayD<f32>| Ok(vec![Tensor::F32(t)]);
    match (op, args.as_slice()) {
        (Op::Unary { op: u }, [Cow::Owned(Tensor::F32(_))]) => {
            let x = own_f32(args.into_iter().next());
            one(k::unary_f32_owned(*u, x))
        }
        (
            Op::Scalar {
                op: b,
                value,
                scalar_lhs,
            },
            [Cow::Owned(Tensor::F32(_))],
        ) => {
            let x = own_f32(args.into_iter().next());
            one(k::scalar_f32_owned(*b, *value, *scalar_lhs, x))
        }
        (Op::Binary { op: b }, [x, y])
            if matches!(x.as_ref(), Tensor::F32(_)) && matches!(y.as_ref(), Tensor::F32(_)) =>
        {
            let mut it = args.into_iter().map(operand);
            let (x, y) = (it.next().expect("two"), it.next().expect("two"));
            one(k::binary_f32_owned(*b, x, y)?)
        }
        (Op::Softmax { axis }, [Cow::Owned(Tensor::F32(_))]) => {
            let x = own_f32(args.into_iter().next());
            one(k::softmax_owned(x, *axis)?)
        }
        (Op::CausalMask, [Cow::Owned(Tensor::F32(_))]) => {
            let x = own_f32(args.into_iter().next());
            one(k::causal_mask_owned(x)?)
        }
        (Op::Reshape { shape }, [Cow::Owned(t)]) if standard(t) => {
            let dims = shape
                .iter()
                .map(|&d| usize::try_from(d).ok())
                .collect::<Option<Vec<usize>>>();
            match (dims, args.into_iter().next()) {
                (Some(dims), Some(Cow::Owned(t))) if dims.iter().product::<usize>() == t.len() => {
                    Ok(vec![match t {
                        Tensor::F32(x) => Tensor::F32(reshaped(x, &dims)),
                        Tensor::I32(x) => Tensor::I32(reshaped(x, &dims)),
                    }])
                }
                (_, Some(t)) => apply(op, &[t.as_ref()]),
                (_, None) => Err(ExecError::Arity {
                    op: name,
                    expected: "1",
                    got: 0,
                }),
            }
        }
        _ => {
            let refs: Vec<&Tensor> = args.iter().map(|a| a.as_ref()).collect();
            let out = apply(op, &refs);
            drop(refs);
            for a in args {
                if let Cow::Owned(t) = a {
                    k::recycle(t);
                }
            }
            out
        }
    }
}

/// True when `t` is in standard (row-major, contiguous) layout.
fn standard(t: &Tensor) -> bool {
    match t {
        Tensor::F32(x) => x.is_standard_layout(),
        Tensor::I32(x) => x.is_standard_layout(),
    }
}

/// `shape` as array dims, or an error when it does not fit in memory's index type.
fn usize_shape(op: &'static str, shape: &[u64]) -> Result<Vec<usize>, ExecError> {
    let dims: Option<Vec<usize>> = shape.iter().map(|&d| usize::try_from(d).ok()).collect();
    dims.filter(|d| {
        d.iter()
            .try_fold(1usize, |n, &x| n.checked_mul(x))
            .is_some()
    })
    .ok_or_else(|| ExecError::Shape {
        op,
        detail: format!("shape {shape:?} is too large"),
    })
}

/// A standard-layout array given a new shape of the same element count, without moving data.
fn reshaped<T>(x: ArrayD<T>, dims: &[usize]) -> ArrayD<T> {
    x.into_shape_with_order(IxDyn(dims))
        .expect("same element count, standard layout")
}

/// The owned f32 array of an operand the pattern matched as `Cow::Owned(Tensor::F32(_))`.
fn own_f32(a: Option<Cow<'_, Tensor>>) -> ArrayD<f32> {
    match a {
        Some(Cow::Owned(Tensor::F32(x))) => x,
        _ => unreachable!("matched as an owned f32 operand"),
    }
}

/// An f32 operand, owned or borrowed (matched as f32 by the caller).
fn operand(a: Cow<'_, Tensor>) -> k::Operand<'_> {
    match a {
        Cow::Owned(Tensor::F32(x)) => k::Operand::Own(x),
        Cow::Borrowed(Tensor::F32(x)) => k::Operand::Ref(x),
        _ => unreachable!("matched as an f32 operand"),
    }
}

/// The operands (borrowed or owned) as an array of exactly `N`, or an arity error.
pub(super) fn arity<'a, A: Borrow<Tensor>, const N: usize>(
    op: &'static str,
    args: &'a [A],
) -> Result<[&'a Tensor; N], ExecError> {
    let args: &[A; N] = args.try_into().map_err(|_| ExecError::Arity {
        op,
        expected: ["0", "1", "2", "3"].get(N).copied().unwrap_or("?"),
        got: args.len(),
    })?;
    Ok(args.each_ref().map(Borrow::borrow))
}

/// A storage-kind error for operand `index`.
fn dtype(op: &'static str, index: usize, expected: &'static str, got: &'static str) -> ExecError {
    ExecError::Dtype {
        op,
        index,
        expected,
        got,
    }
}

/// Operand `index` as f32, or a kind error.
pub(super) fn f32_arg<'a>(
    op: &'static str,
    index: usize,
    t: &'a Tensor,
) -> Result<&'a ArrayD<f32>, ExecError> {
    t.as_f32().ok_or_else(|| dtype(op, index, "f32", t.kind()))
}

/// Operand `index` as i32, or a kind error.
pub(super) fn i32_arg<'a>(
    op: &'static str,
    index: usize,
    t: &'a Tensor,
) -> Result<&'a ArrayD<i32>, ExecError> {
    t.as_i32().ok_or_else(|| dtype(op, index, "i32", t.kind()))
}

/// A unary function on f32, or `neg` on i32.
fn unary(u: UnaryOp, args: &[&Tensor]) -> Result<Tensor, ExecError> {
    let [x] = arity(u.name(), args)?;
    Ok(match x {
        Tensor::F32(x) => k::unary_f32(u, x).into(),
        Tensor::I32(x) => k::unary_i32(u, x)?.into(),
    })
}

/// Layer norm with 2 (x, scale) or 3 (x, scale, bias) operands.
fn layernorm(eps: f64, args: &[&Tensor]) -> Result<ArrayD<f32>, ExecError> {
    const OP: &str = "layernorm";
    let f = |i: usize| f32_arg(OP, i, args[i]);
    match args.len() {
        2 => k::layernorm(f(0)?, f(1)?, None, eps),
        3 => k::layernorm(f(0)?, f(1)?, Some(f(2)?), eps),
        got => Err(ExecError::Arity {
            op: OP,
            expected: "2 or 3",
            got,
        }),
    }
}

/// A one-operand layout op on either storage kind.
fn layout1(
    op: &'static str,
    args: &[&Tensor],
    f: impl Fn(&ArrayD<f32>) -> Result<ArrayD<f32>, ExecError>,
    g: impl Fn(&ArrayD<i32>) -> Result<ArrayD<i32>, ExecError>,
) -> Result<Vec<Tensor>, ExecError> {
    let [x] = arity(op, args)?;
    Ok(vec![match x {
        Tensor::F32(x) => f(x)?.into(),
        Tensor::I32(x) => g(x)?.into(),
    }])
}

/// Concatenation of operands that all have the first one's storage kind.
fn concat(args: &[&Tensor], axis: usize) -> Result<Tensor, ExecError> {
    const OP: &str = "concat";
    match args.first() {
        None => Err(ExecError::Arity {
            op: OP,
            expected: "at least 1",
            got: 0,
        }),
        Some(Tensor::F32(_)) => {
            let xs = args
                .iter()
                .enumerate()
                .map(|(i, t)| f32_arg(OP, i, t))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(k::concat(&xs, axis)?.into())
        }
        Some(Tensor::I32(_)) => {
            let xs = args
                .iter()
                .enumerate()
                .map(|(i, t)| i32_arg(OP, i, t))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(k::concat(&xs, axis)?.into())
        }
    }
}
