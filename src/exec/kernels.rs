//! One kernel per op, numpy semantics, on `ndarray::ArrayD`. Float kernels take and return f32
//! arrays; layout kernels are generic over the element type so they serve i32 tensors too.
//! Reductions accumulate in f64 (at least as accurate as numpy's pairwise f32 sums).
//! Every kernel validates its operands and reports bad shapes or data as `ExecError`.

mod elementwise;
mod grad;
mod layout;
mod lookup;
mod matmul;
mod norm;
mod pool;
mod reduce;
mod simd;
#[cfg(test)]
mod tests;

pub use elementwise::{
    binary_f32, binary_i32, cast, round_bf16, round_f16, scalar_f32, scalar_i32, unary_f32,
    unary_i32,
};
pub use grad::{broadcast_to, equal, one_hot, scatter_add, select, unary_grad};
pub use layout::{concat, reshape, slice, split, transpose};
pub use lookup::{causal_mask, cross_entropy, embedding};
pub use matmul::{gemm, matmul};
pub use norm::{layernorm, rmsnorm, softmax};
pub use pool::recycle;

pub(crate) use elementwise::{binary_f32_owned, scalar_f32_owned, unary_f32_owned, Operand};
pub(crate) use lookup::causal_mask_owned;
pub(crate) use norm::softmax_owned;
pub use pool::Pooled;
pub(crate) use pool::{give, take, take_f32, take_vec};
pub(crate) use reduce::{combine_from, combine_symmetric};
pub use reduce::{reduce_f32, reduce_i32};

use crate::exec::ExecError;
use ndarray::ArrayD;
use std::borrow::Cow;

/// The numpy broadcast of two shapes (right-aligned, size-1 dims stretch); `None` if incompatible.
pub fn broadcast_shape(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let n = a.len().max(b.len());
    let dim = |s: &[usize], i: usize| {
        if i < n - s.len() {
            1
        } else {
            s[i - (n - s.len())]
        }
    };
    (0..n)
        .map(|i| match (dim(a, i), dim(b, i)) {
            (x, y) if x == y || y == 1 => Some(x),
            (1, y) => Some(y),
            _ => None,
        })
        .collect()
}

/// The elements in row-major order, borrowed when already contiguous, else in a pooled buffer.
pub(crate) fn row_major<T: Pooled>(x: &ArrayD<T>) -> Cow<'_, [T]> {
    match x.as_slice() {
        Some(s) => Cow::Borrowed(s),
        None => {
            let mut v = take_vec::<T>(x.len());
            v.extend(x.iter().copied());
            Cow::Owned(v)
        }
    }
}

/// Builds an array from a shape and row-major data of the right length.
pub(crate) fn from_vec<T>(
    op: &'static str,
    shape: Vec<usize>,
    data: Vec<T>,
) -> Result<ArrayD<T>, ExecError> {
    ArrayD::from_shape_vec(shape, data).map_err(|e| ExecError::shape(op, e.to_string()))
}

/// An error unless `axis < rank`.
pub(crate) fn check_axis(op: &'static str, rank: usize, axis: usize) -> Result<(), ExecError> {
    if axis < rank {
        return Ok(());
    }
    Err(ExecError::shape(
        op,
        format!("axis {axis} out of range for rank {rank}"),
    ))
}

/// An error unless `rank >= min`.
fn check_min_rank(op: &'static str, shape: &[usize], min: usize) -> Result<(), ExecError> {
    if shape.len() >= min {
        return Ok(());
    }
    Err(ExecError::shape(
        op,
        format!(
            "operand of shape {shape:?} has rank {}, expected at least {min}",
            shape.len()
        ),
    ))
}

/// Converts a u64 attribute to usize, or a shape error.
fn to_usize(op: &'static str, v: u64) -> Result<usize, ExecError> {
    usize::try_from(v).map_err(|_| ExecError::shape(op, format!("size {v} does not fit usize")))
}
