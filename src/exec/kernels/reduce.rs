//! Reductions of one axis (sum, mean, max), optionally keeping the axis with size 1.

use super::check_axis;
use super::norm::lane_max;
use super::simd::{max_f32, multiversion, sum_f64};
use crate::exec::ExecError;
use crate::ir::ReduceOp;
use ndarray::{ArrayD, Axis};

/// Reduces `axis` of a float tensor. Sum and mean accumulate in f64; mean of an empty axis is
/// NaN and max of an empty axis is an error (numpy: no identity); max propagates NaN.
pub fn reduce_f32(
    op: ReduceOp,
    x: &ArrayD<f32>,
    axis: usize,
    keepdims: bool,
) -> Result<ArrayD<f32>, ExecError> {
    check_reduce(op, x.shape(), axis)?;
    let n = x.shape()[axis];
    if let (Some(xs), true) = (x.as_slice(), axis + 1 == x.ndim() && n > 0) {
        // Contiguous rows: one vectorized pass per row.
        let v = reduce_rows(op, xs, n);
        let out = ArrayD::from_shape_vec(&x.shape()[..axis], v).expect("one value per row");
        return Ok(keep(out, axis, keepdims));
    }
    let out = x.map_axis(Axis(axis), |lane| match op {
        ReduceOp::Sum => lane.iter().map(|&v| v as f64).sum::<f64>() as f32,
        ReduceOp::Mean => (lane.iter().map(|&v| v as f64).sum::<f64>() / lane.len() as f64) as f32,
        ReduceOp::Max => lane_max(lane.iter()),
    });
    Ok(keep(out, axis, keepdims))
}

/// `acc = acc ⊕ other` elementwise, where `a ⊕ b` is bitwise `b ⊕ a` (so that the ranks of a
/// collective that combine the same two partial results agree): sum (mean sums too, as the
/// collectives do), or max that ignores NaN and prefers +0 to -0.
/// With `copy`, `other` receives the result too (the next message of a collective, written in
/// the same pass).
pub(crate) fn combine_symmetric(acc: &mut [f32], other: &mut [f32], op: ReduceOp, copy: bool) {
    assert_eq!(acc.len(), other.len(), "combine: lengths");
    match op {
        ReduceOp::Sum | ReduceOp::Mean => combine_with(acc, other, copy, |a, b| a + b),
        ReduceOp::Max => combine_with(acc, other, copy, max_symmetric),
    }
}

/// `acc = acc ⊕ other` with the symmetric `⊕` of [`combine_symmetric`], reading `other` only.
pub(crate) fn combine_from(acc: &mut [f32], other: &[f32], op: ReduceOp) {
    assert_eq!(acc.len(), other.len(), "combine: lengths");
    match op {
        ReduceOp::Sum | ReduceOp::Mean => combine_read(acc, other, |a, b| a + b),
        ReduceOp::Max => combine_read(acc, other, max_symmetric),
    }
}

/// Max that ignores NaN and prefers +0 to -0, so that `max(a, b)` is bitwise `max(b, a)`.
#[inline(always)]
fn max_symmetric(a: f32, b: f32) -> f32 {
    if b > a || a.is_nan() {
        b
    } else if a > b || b.is_nan() {
        a
    } else {
        f32::from_bits(a.to_bits() & b.to_bits())
    }
}

/// `acc[i] = f(acc[i], other[i])`, as an index loop.
#[inline(always)]
fn combine_read_imp<F: Fn(f32, f32) -> f32 + Copy>(acc: &mut [f32], other: &[f32], f: F) {
    let n = acc.len();
    let other = &other[..n];
    for i in 0..n {
        acc[i] = f(acc[i], other[i]);
    }
}

multiversion! {
    /// [`combine_read_imp`], vectorized.
    fn combine_read<F>(acc: &mut [f32], other: &[f32], f: F)
    where {F: Fn(f32, f32) -> f32 + Copy} = combine_read_imp;
}

/// `acc[i] = f(acc[i], other[i])` (and `other[i] = acc[i]` with `copy`), as index loops.
#[inline(always)]
fn combine_imp<F: Fn(f32, f32) -> f32 + Copy>(
    acc: &mut [f32],
    other: &mut [f32],
    copy: bool,
    f: F,
) {
    let n = acc.len();
    let other = &mut other[..n];
    if copy {
        for i in 0..n {
            let v = f(acc[i], other[i]);
            acc[i] = v;
            other[i] = v;
        }
    } else {
        for i in 0..n {
            acc[i] = f(acc[i], other[i]);
        }
    }
}

multiversion! {
    /// [`combine_imp`], vectorized.
    fn combine_with<F>(acc: &mut [f32], other: &mut [f32], copy: bool, f: F)
    where {F: Fn(f32, f32) -> f32 + Copy} = combine_imp;
}

/// Reduces every contiguous row of `n` elements of `xs`.
#[inline(always)]
fn reduce_rows_imp(op: ReduceOp, xs: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; xs.len() / n];
    for (o, r) in out.iter_mut().zip(xs.chunks_exact(n)) {
        *o = match op {
            ReduceOp::Sum => sum_f64(r) as f32,
            ReduceOp::Mean => (sum_f64(r) / n as f64) as f32,
            ReduceOp::Max => max_f32(r),
        };
    }
    out
}

multiversion! {
    /// [`reduce_rows_imp`], vectorized.
    fn reduce_rows<>(op: ReduceOp, xs: &[f32], n: usize) -> Vec<f32> where {} = reduce_rows_imp;
}

/// Reduces `axis` of an i32 tensor: sum wraps to i32, mean truncates toward zero (0 when empty).
pub fn reduce_i32(
    op: ReduceOp,
    x: &ArrayD<i32>,
    axis: usize,
    keepdims: bool,
) -> Result<ArrayD<i32>, ExecError> {
    check_reduce(op, x.shape(), axis)?;
    let out = x.map_axis(Axis(axis), |lane| {
        let sum = || lane.iter().map(|&v| v as i64).sum::<i64>();
        match op {
            ReduceOp::Sum => sum() as i32,
            ReduceOp::Mean => (sum() as f64 / lane.len() as f64) as i32,
            ReduceOp::Max => lane.iter().copied().max().unwrap_or(i32::MIN),
        }
    });
    Ok(keep(out, axis, keepdims))
}

/// Validates the axis, and rejects max over an empty axis.
fn check_reduce(op: ReduceOp, shape: &[usize], axis: usize) -> Result<(), ExecError> {
    check_axis(op.name(), shape.len(), axis)?;
    if op == ReduceOp::Max && shape[axis] == 0 {
        return Err(ExecError::EmptyReduction { op: op.name() });
    }
    Ok(())
}

/// Re-inserts the reduced axis with size 1 when `keepdims`.
fn keep<T>(out: ArrayD<T>, axis: usize, keepdims: bool) -> ArrayD<T> {
    if keepdims {
        out.insert_axis(Axis(axis))
    } else {
        out
    }
}
