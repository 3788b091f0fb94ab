//! Kernels with data-dependent indexing or masking: embedding, cross-entropy, causal mask.

use super::pool::take_vec;
use super::simd::{exp, max_f32, multiversion, sum_f64};
use super::{check_min_rank, from_vec, row_major};
use crate::exec::ExecError;
use ndarray::{ArrayD, IxDyn};

/// Row lookup: `ids` of any shape, `table[V, H]`; result `ids.shape + [H]`. Ids outside
/// `[0, V)` are an error.
pub fn embedding(ids: &ArrayD<i32>, table: &ArrayD<f32>) -> Result<ArrayD<f32>, ExecError> {
    const OP: &str = "embedding";
    let &[vocab, h] = table.shape() else {
        return Err(ExecError::shape(
            OP,
            format!("table must be 2-D, got {:?}", table.shape()),
        ));
    };
    let t = row_major(table);
    let mut out = take_vec::<f32>(ids.len() * h);
    for (position, &id) in ids.iter().enumerate() {
        let row = usize::try_from(id).ok().filter(|&r| r < vocab);
        let row = row.ok_or(ExecError::IdOutOfRange {
            id: id as i64,
            position,
            vocab,
        })?;
        out.extend_from_slice(&t[row * h..(row + 1) * h]);
    }
    let mut shape = ids.shape().to_vec();
    shape.push(h);
    from_vec(OP, shape, out)
}

/// Mean over all positions of `logsumexp(logits) - logits[label]`; logits `[..., V]`, labels
/// `[...]`; result an f32 scalar (NaN when there are no positions). Labels outside `[0, V)`
/// are an error.
pub fn cross_entropy(logits: &ArrayD<f32>, labels: &ArrayD<i32>) -> Result<ArrayD<f32>, ExecError> {
    const OP: &str = "cross_entropy";
    check_min_rank(OP, logits.shape(), 1)?;
    let (batch, classes) = logits.shape().split_at(logits.ndim() - 1);
    let classes = classes[0];
    if labels.shape() != batch {
        let detail = format!("labels {:?} must have shape {batch:?}", labels.shape());
        return Err(ExecError::shape(OP, detail));
    }
    let x = row_major(logits);
    let mut total = 0.0f64;
    let mut scratch = Vec::with_capacity(classes);
    for (position, &label) in labels.iter().enumerate() {
        let col = usize::try_from(label).ok().filter(|&c| c < classes);
        let col = col.ok_or(ExecError::LabelOutOfRange {
            label: label as i64,
            position,
            classes,
        })?;
        let row = &x[position * classes..(position + 1) * classes];
        total += logsumexp(row, &mut scratch) - row[col] as f64;
    }
    let mean = (total / labels.len() as f64) as f32;
    Ok(ArrayD::from_elem(IxDyn(&[]), mean))
}

/// `log Σ exp(row)` with max subtraction (NaN for a row of -inf or with +inf, as numpy): the
/// exponentials in f32 (the vectorized `exp`, within 2e-7 relative), their sum and the log in f64.
#[inline(always)]
fn logsumexp_imp(row: &[f32], scratch: &mut Vec<f32>) -> f64 {
    let m = max_f32(row);
    scratch.clear();
    scratch.extend(row.iter().map(|&v| exp(v - m)));
    m as f64 + sum_f64(scratch).ln()
}

multiversion! {
    /// [`logsumexp_imp`], vectorized (`scratch` holds the exponentials).
    fn logsumexp<>(row: &[f32], scratch: &mut Vec<f32>) -> f64 where {} = logsumexp_imp;
}

/// Sets entry (i, j) of the last two dims `[.., Sq, Sk]` to -inf where `j > i + (Sk - Sq)`.
pub fn causal_mask(x: &ArrayD<f32>) -> Result<ArrayD<f32>, ExecError> {
    const OP: &str = "causal_mask";
    check_min_rank(OP, x.shape(), 2)?;
    let (sq, sk) = (x.shape()[x.ndim() - 2], x.shape()[x.ndim() - 1]);
    let mut data = take_vec::<f32>(x.len());
    match x.as_slice() {
        Some(s) => data.extend_from_slice(s),
        None => data.extend(x.iter().copied()),
    }
    mask_rows(&mut data, sq, sk);
    from_vec(OP, x.shape().to_vec(), data)
}

/// [`causal_mask`] on an operand the caller gives up: masked in its buffer when contiguous.
pub(crate) fn causal_mask_owned(mut x: ArrayD<f32>) -> Result<ArrayD<f32>, ExecError> {
    check_min_rank("causal_mask", x.shape(), 2)?;
    let (sq, sk) = (x.shape()[x.ndim() - 2], x.shape()[x.ndim() - 1]);
    match x.as_slice_mut() {
        Some(data) => {
            mask_rows(data, sq, sk);
            Ok(x)
        }
        None => causal_mask(&x),
    }
}

/// Sets entry (i, j) of every `[sq, sk]` matrix of `data` to -inf where `j > i + (sk - sq)`.
fn mask_rows(data: &mut [f32], sq: usize, sk: usize) {
    let offset = sk as i64 - sq as i64;
    if sq * sk > 0 {
        for mat in data.chunks_exact_mut(sq * sk) {
            for (i, row) in mat.chunks_exact_mut(sk).enumerate() {
                let first = (i as i64 + offset + 1).clamp(0, sk as i64) as usize;
                row[first..].fill(f32::NEG_INFINITY);
            }
        }
    }
}
