//! Normalizing kernels: softmax along an axis, layer norm and RMS norm over the last dim.
//! Sums and means are accumulated in f64.

use super::{check_axis, check_min_rank, row_major};
use crate::exec::ExecError;
use ndarray::{ArrayD, ArrayViewMut1, Axis};
use std::borrow::Cow;

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
pub fn softmax(x: &ArrayD<f32>, axis: usize) -> Result<ArrayD<f32>, ExecError> {
    check_axis("softmax", x.ndim(), axis)?;
    let mut out = x.to_owned();
    for mut lane in out.lanes_mut(Axis(axis)) {
        let m = lane_max(lane.iter());
        lane.mapv_inplace(|v| (v - m).exp());
        let s = lane.iter().map(|&v| v as f64).sum::<f64>() as f32;
        lane.mapv_inplace(|v| v / s);
    }
    Ok(out)
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

/// Mean of a lane in f64 (NaN for an empty lane).
fn mean(lane: &ArrayViewMut1<f32>) -> f64 {
    lane.iter().map(|&v| v as f64).sum::<f64>() / lane.len() as f64
}

/// Layer norm over the last dim: `(x - mean) / √(var + eps) · scale (+ bias)`, biased variance.
pub fn layernorm(
    x: &ArrayD<f32>,
    scale: &ArrayD<f32>,
    bias: Option<&ArrayD<f32>>,
    eps: f64,
) -> Result<ArrayD<f32>, ExecError> {
    let mut params = vec![scale];
    params.extend(bias);
    check_norm_params("layernorm", x, &params)?;
    let last = Axis(x.ndim() - 1);
    let g = row_major(scale);
    let zeros = vec![0.0f32; g.len()];
    let b = bias.map_or(Cow::Borrowed(&zeros[..]), row_major);
    let mut out = x.to_owned();
    for mut lane in out.lanes_mut(last) {
        let mu = mean(&lane);
        let var = lane.iter().map(|&v| (v as f64 - mu).powi(2)).sum::<f64>() / lane.len() as f64;
        let inv = 1.0 / (var + eps).sqrt();
        for ((v, &gi), &bi) in lane.iter_mut().zip(g.iter()).zip(b.iter()) {
            *v = ((*v as f64 - mu) * inv) as f32 * gi + bi;
        }
    }
    Ok(out)
}

/// RMS norm over the last dim: `x / √(mean(x²) + eps) · scale`.
pub fn rmsnorm(x: &ArrayD<f32>, scale: &ArrayD<f32>, eps: f64) -> Result<ArrayD<f32>, ExecError> {
    check_norm_params("rmsnorm", x, &[scale])?;
    let last = Axis(x.ndim() - 1);
    let g = row_major(scale);
    let mut out = x.to_owned();
    for mut lane in out.lanes_mut(last) {
        let ms = lane.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / lane.len() as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for (v, &gi) in lane.iter_mut().zip(g.iter()) {
            *v = (*v as f64 * inv) as f32 * gi;
        }
    }
    Ok(out)
}
