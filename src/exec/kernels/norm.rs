//! Normalizing kernels: softmax along an axis, layer norm and RMS norm over the last dim.
//! Sums and means are accumulated in f64.

use super::pool::take_f32;
use super::simd::{exp, max_f32, multiversion, sum_f64, sum_sq_dev_f64};
use super::{check_axis, check_min_rank, row_major};
use crate::exec::ExecError;
use ndarray::{ArrayD, Axis};

/// Max of a lane, NaN-propagating (numpy `max`); -inf for an empty lane.
pub(super) fn lane_max<'a>(xs: impl IntoIterator<Item = &'a f32>) -> f32 {
    xs.into_iter().fold(f32::NEG_INFINITY, |m, &x| {
        if m.is_nan() || x.is_nan() {
            f32::NAN
        } else {
            m.max(x)
        }
    })
}

/// Softmax along `axis`: `exp(x - max) / Σ exp(x - max)`. A row of only -inf gives NaN, as numpy.
/// The sum is accumulated in f64; `exp` is the vectorized one (within 2e-7 relative).
pub fn softmax(x: &ArrayD<f32>, axis: usize) -> Result<ArrayD<f32>, ExecError> {
    check_axis("softmax", x.ndim(), axis)?;
    let n = x.shape()[axis];
    if let (Some(xs), true) = (x.as_slice(), axis + 1 == x.ndim() && n > 0) {
        let mut out = take_f32(xs.len());
        softmax_rows(xs, &mut out, n);
        return Ok(ArrayD::from_shape_vec(x.raw_dim(), out).expect("same element count"));
    }
    let mut out = x.to_owned();
    for mut lane in out.lanes_mut(Axis(axis)) {
        let m = lane_max(lane.iter());
        lane.mapv_inplace(|v| exp(v - m));
        let s = lane.iter().map(|&v| v as f64).sum::<f64>() as f32;
        lane.mapv_inplace(|v| v / s);
    }
    Ok(out)
}

/// [`softmax`] on an operand the caller gives up: computed in its buffer when contiguous.
pub(crate) fn softmax_owned(mut x: ArrayD<f32>, axis: usize) -> Result<ArrayD<f32>, ExecError> {
    check_axis("softmax", x.ndim(), axis)?;
    let n = x.shape()[axis];
    if let (true, Some(xs)) = (axis + 1 == x.ndim() && n > 0, x.as_slice_mut()) {
        softmax_rows_inplace(xs, n);
        return Ok(x);
    }
    softmax(&x, axis)
}

/// Softmax of every contiguous row of `n` elements of `xs`, in place.
#[inline(always)]
fn softmax_rows_self(xs: &mut [f32], n: usize) {
    for row in xs.chunks_exact_mut(n) {
        let m = max_f32(row);
        for d in row.iter_mut() {
            *d = exp(*d - m);
        }
        let s = sum_f64(row) as f32;
        for d in row.iter_mut() {
            *d /= s;
        }
    }
}

multiversion! {
    /// [`softmax_rows_self`], vectorized.
    fn softmax_rows_inplace<>(xs: &mut [f32], n: usize) where {} = softmax_rows_self;
}

/// Softmax of every contiguous row of `n` elements of `xs` into `out`.
#[inline(always)]
fn softmax_rows_imp(xs: &[f32], out: &mut [f32], n: usize) {
    for (row, o) in xs.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let m = max_f32(row);
        for (d, &v) in o.iter_mut().zip(row) {
            *d = exp(v - m);
        }
        let s = sum_f64(o) as f32;
        for d in o.iter_mut() {
            *d /= s;
        }
    }
}

multiversion! {
    /// [`softmax_rows_imp`], vectorized.
    fn softmax_rows<>(xs: &[f32], out: &mut [f32], n: usize) where {} = softmax_rows_imp;
}

/// Checks that each of `params` is 1-D with the size of `x`'s last dim (rank of x at least 1).
fn check_norm_params(
    op: &'static str,
    x: &ArrayD<f32>,
    params: &[&ArrayD<f32>],
) -> Result<usize, ExecError> {
    check_min_rank(op, x.shape(), 1)?;
    let last = x.shape()[x.ndim() - 1];
    for p in params {
        if p.shape() != [last] {
            let detail = format!(
                "scale/bias of shape {:?} must be [{last}] for x {:?}",
                p.shape(),
                x.shape()
            );
            return Err(ExecError::shape(op, detail));
        }
    }
    Ok(last)
}

/// Layer norm over the last dim: `(x - mean) / √(var + eps) · scale (+ bias)`, biased variance,
/// the mean, variance and normalized values in f64 (see [`layernorm_rows_imp`]).
pub fn layernorm(
    x: &ArrayD<f32>,
    scale: &ArrayD<f32>,
    bias: Option<&ArrayD<f32>>,
    eps: f64,
) -> Result<ArrayD<f32>, ExecError> {
    let mut params = vec![scale];
    params.extend(bias);
    let n = check_norm_params("layernorm", x, &params)?;
    let g = row_major(scale);
    let b = bias.map(row_major);
    let xs = row_major(x);
    let mut out = take_f32(xs.len());
    if n > 0 {
        layernorm_rows(&xs, &mut out, &g, b.as_deref(), eps);
    }
    Ok(ArrayD::from_shape_vec(x.raw_dim(), out).expect("same element count"))
}

/// Layer norm of every contiguous row (of `g.len()` elements) of `xs` into `out`. The mean and
/// the squared deviations from it are summed in f64 (in f32 a large mean loses the spread to
/// rounding, and squares past 1.8e19 overflow), and `(x - mean) · inv` is formed in f64 and
/// rounded once before `· g + b`.
#[inline(always)]
fn layernorm_rows_imp(xs: &[f32], out: &mut [f32], g: &[f32], b: Option<&[f32]>, eps: f64) {
    let n = g.len();
    for (row, o) in xs.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let mu = sum_f64(row) / n as f64;
        let var = sum_sq_dev_f64(row, mu) / n as f64;
        let inv = 1.0 / (var + eps).sqrt();
        let norm = |v: f32| ((v as f64 - mu) * inv) as f32;
        match b {
            Some(b) => {
                for (((d, &v), &gi), &bi) in o.iter_mut().zip(row).zip(g).zip(b) {
                    *d = norm(v) * gi + bi;
                }
            }
            None => {
                for ((d, &v), &gi) in o.iter_mut().zip(row).zip(g) {
                    *d = norm(v) * gi;
                }
            }
        }
    }
}

multiversion! {
    /// [`layernorm_rows_imp`], vectorized.
    fn layernorm_rows<>(xs: &[f32], out: &mut [f32], g: &[f32], b: Option<&[f32]>, eps: f64)
    where {} = layernorm_rows_imp;
}

/// RMS norm over the last dim: `x / √(mean(x²) + eps) · scale`.
pub fn rmsnorm(x: &ArrayD<f32>, scale: &ArrayD<f32>, eps: f64) -> Result<ArrayD<f32>, ExecError> {
    let n = check_norm_params("rmsnorm", x, &[scale])?;
    let g = row_major(scale);
    let xs = row_major(x);
    let mut out = take_f32(xs.len());
    if n > 0 {
        rmsnorm_rows(&xs, &mut out, &g, eps);
    }
    Ok(ArrayD::from_shape_vec(x.raw_dim(), out).expect("same element count"))
}

/// RMS norm of every contiguous row (of `g.len()` elements) of `xs` into `out`.
#[inline(always)]
fn rmsnorm_rows_imp(xs: &[f32], out: &mut [f32], g: &[f32], eps: f64) {
    let n = g.len();
    for (row, o) in xs.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let ms = sum_sq_dev_f64(row, 0.0) / n as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for ((d, &v), &gi) in o.iter_mut().zip(row).zip(g) {
            *d = (v as f64 * inv) as f32 * gi;
        }
    }
}

multiversion! {
    /// [`rmsnorm_rows_imp`], vectorized.
    fn rmsnorm_rows<>(xs: &[f32], out: &mut [f32], g: &[f32], eps: f64) where {} = rmsnorm_rows_imp;
}
