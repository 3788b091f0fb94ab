//! Layout kernels, generic over the element type: transpose, reshape, split, concat, slice.
//! Results are always in standard (row-major) layout.

use super::{check_axis, from_vec, to_usize};
use crate::exec::ExecError;
use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Slice};

/// Permutes dims: result dim i is operand dim `perm[i]` (numpy `transpose(x, perm)`).
pub fn transpose<T: Clone>(x: &ArrayD<T>, perm: &[usize]) -> Result<ArrayD<T>, ExecError> {
    let mut seen = vec![false; x.ndim()];
    let valid = perm.len() == x.ndim()
        && perm
            .iter()
            .all(|&p| p < seen.len() && !std::mem::replace(&mut seen[p], true));
    if !valid {
        let detail = format!("{perm:?} is not a permutation of 0..{}", x.ndim());
        return Err(ExecError::shape("transpose", detail));
    }
    Ok(x.view()
        .permuted_axes(IxDyn(perm))
        .as_standard_layout()
        .into_owned())
}

/// Row-major reshape to `shape` (same element count).
pub fn reshape<T: Clone>(x: &ArrayD<T>, shape: &[u64]) -> Result<ArrayD<T>, ExecError> {
    const OP: &str = "reshape";
    let shape = shape
        .iter()
        .map(|&d| to_usize(OP, d))
        .collect::<Result<Vec<_>, _>>()?;
    let n = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if n != Some(x.len()) {
        let detail = format!(
            "cannot reshape {:?} ({} elements) to {shape:?}",
            x.shape(),
            x.len()
        );
        return Err(ExecError::shape(OP, detail));
    }
    from_vec(OP, shape, x.iter().cloned().collect())
}

/// Splits `axis` into consecutive pieces of `sizes` (summing to the axis size).
pub fn split<T: Clone>(
    x: &ArrayD<T>,
    axis: usize,
    sizes: &[u64],
) -> Result<Vec<ArrayD<T>>, ExecError> {
    const OP: &str = "split";
    check_axis(OP, x.ndim(), axis)?;
    let total = sizes.iter().try_fold(0u64, |n, &s| n.checked_add(s));
    if total != Some(x.shape()[axis] as u64) {
        let detail = format!(
            "sizes {sizes:?} do not sum to {} (axis {axis})",
            x.shape()[axis]
        );
        return Err(ExecError::shape(OP, detail));
    }
    let mut start = 0usize;
    let mut out = Vec::with_capacity(sizes.len());
    for &s in sizes {
        let end = start + s as usize;
        out.push(
            x.slice_axis(Axis(axis), Slice::from(start..end))
                .as_standard_layout()
                .into_owned(),
        );
        start = end;
    }
    Ok(out)
}

/// Concatenates `xs` (same rank, equal dims but `axis`) along `axis`.
pub fn concat<T: Clone>(xs: &[&ArrayD<T>], axis: usize) -> Result<ArrayD<T>, ExecError> {
    const OP: &str = "concat";
    let first = xs
        .first()
        .ok_or_else(|| ExecError::shape(OP, "no operand"))?;
    check_axis(OP, first.ndim(), axis)?;
    for x in xs {
        let same = x.ndim() == first.ndim()
            && (0..x.ndim()).all(|d| d == axis || x.shape()[d] == first.shape()[d]);
        if !same {
            let detail = format!(
                "{:?} and {:?} differ outside axis {axis}",
                first.shape(),
                x.shape()
            );
            return Err(ExecError::shape(OP, detail));
        }
    }
    let views: Vec<ArrayViewD<T>> = xs.iter().map(|x| x.view()).collect();
    let out = ndarray::concatenate(Axis(axis), &views)
        .map_err(|e| ExecError::shape(OP, e.to_string()))?;
    Ok(out.as_standard_layout().into_owned())
}

/// Elements `start..end` of `axis` (`start <= end <= size`).
pub fn slice<T: Clone>(
    x: &ArrayD<T>,
    axis: usize,
    start: u64,
    end: u64,
) -> Result<ArrayD<T>, ExecError> {
    const OP: &str = "slice";
    check_axis(OP, x.ndim(), axis)?;
    let size = x.shape()[axis] as u64;
    if start > end || end > size {
        let detail = format!("range {start}..{end} out of bounds for size {size} of axis {axis}");
        return Err(ExecError::shape(OP, detail));
    }
    let (s, e) = (start as usize, end as usize);
    Ok(x.slice_axis(Axis(axis), Slice::from(s..e))
        .as_standard_layout()
        .into_owned())
}
