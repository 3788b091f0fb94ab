//! Layout kernels, generic over the element type: transpose, reshape, split, concat, slice.
//! Results are always in standard (row-major) layout.

use super::pool::{take_vec, Pooled};
use super::{check_axis, from_vec, to_usize};
use crate::exec::ExecError;
use ndarray::{ArrayD, ArrayViewD, Axis, IxDyn, Slice};

/// Permutes dims: result dim i is operand dim `perm[i]` (numpy `transpose(x, perm)`).
pub fn transpose<T: Pooled>(x: &ArrayD<T>, perm: &[usize]) -> Result<ArrayD<T>, ExecError> {
    let mut seen = vec![false; x.ndim()];
    let valid = perm.len() == x.ndim()
        && perm
            .iter()
            .all(|&p| p < seen.len() && !std::mem::replace(&mut seen[p], true));
    if !valid {
        let detail = format!("{perm:?} is not a permutation of 0..{}", x.ndim());
        return Err(ExecError::shape("transpose", detail));
    }
    let Some(src) = x.as_slice() else {
        return Ok(x
            .view()
            .permuted_axes(IxDyn(perm))
            .as_standard_layout()
            .into_owned());
    };
    let shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let mut out = take_vec::<T>(src.len());
    if !src.is_empty() {
        permute_into(src, x.shape(), perm, &mut out);
    }
    from_vec("transpose", shape, out)
}

/// Pushes the elements of the row-major `src` of `shape`, permuted by `perm`, in row-major
/// order of the result: runs that stay contiguous are copied whole.
fn permute_into<T: Clone>(src: &[T], shape: &[usize], perm: &[usize], out: &mut Vec<T>) {
    let rank = shape.len();
    let mut stride = vec![1usize; rank];
    for d in (0..rank.saturating_sub(1)).rev() {
        stride[d] = stride[d + 1] * shape[d + 1];
    }
    // Result dims (outer first) as (size, stride in src): size-1 dims dropped, dims that are
    // also adjacent in src merged.
    let mut dims: Vec<(usize, usize)> = Vec::with_capacity(rank);
    for &p in perm {
        let (size, st) = (shape[p], stride[p]);
        if size == 1 {
            continue;
        }
        match dims.last_mut() {
            Some(last) if last.1 == st * size => *last = (last.0 * size, st),
            _ => dims.push((size, st)),
        }
    }
    let Some((inner, step)) = dims.pop() else {
        out.push(src[0].clone());
        return;
    };
    if step != 1 && dims.last().is_some_and(|d| d.1 == 1) {
        // The two innermost result dims are a transposed matrix of src: copy it by tiles, so
        // that both the reads and the writes of a tile stay within a few cache lines.
        const TILE: usize = 16;
        let (rows, _) = dims.pop().expect("checked");
        let start = out.len();
        out.resize(start + rows * inner * outer_len(&dims), src[0].clone());
        let dst = &mut out[start..];
        for_each_base(&dims, |o, base| {
            let blk = &mut dst[o * rows * inner..(o + 1) * rows * inner];
            for r0 in (0..rows).step_by(TILE) {
                for c0 in (0..inner).step_by(TILE) {
                    for r in r0..(r0 + TILE).min(rows) {
                        let line = &mut blk[r * inner..(r + 1) * inner];
                        for c in c0..(c0 + TILE).min(inner) {
                            line[c] = src[base + r + c * step].clone();
                        }
                    }
                }
            }
        });
        return;
    }
    for_each_base(&dims, |_, base| {
        if step == 1 {
            out.extend_from_slice(&src[base..base + inner]);
        } else {
            out.extend(src[base..].iter().step_by(step).take(inner).cloned());
        }
    });
}

/// Number of index combinations of `dims` (size, stride).
fn outer_len(dims: &[(usize, usize)]) -> usize {
    dims.iter().map(|d| d.0).product()
}

/// Calls `f(i, offset)` for every index of `dims` (size, stride) in row-major order: `i` counts
/// from 0 and `offset` is the index's Σ index·stride.
fn for_each_base(dims: &[(usize, usize)], mut f: impl FnMut(usize, usize)) {
    let mut idx = vec![0usize; dims.len()];
    let mut base = 0usize;
    for i in 0..outer_len(dims) {
        f(i, base);
        for d in (0..dims.len()).rev() {
            idx[d] += 1;
            base += dims[d].1;
            if idx[d] < dims[d].0 {
                break;
            }
            base -= dims[d].1 * dims[d].0;
            idx[d] = 0;
        }
    }
}

/// Copies, for every index of the dims before `axis`, the contiguous block `start..end` of
/// `axis` (times the dims after it) of the row-major `src` of `shape`.
fn copy_axis_range<T: Clone>(
    src: &[T],
    shape: &[usize],
    axis: usize,
    start: usize,
    end: usize,
    out: &mut Vec<T>,
) {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let size = shape[axis];
    for o in 0..outer {
        out.extend_from_slice(&src[(o * size + start) * inner..(o * size + end) * inner]);
    }
}

/// `x.shape` with `axis` resized to `n`.
fn with_axis(x: &[usize], axis: usize, n: usize) -> Vec<usize> {
    let mut s = x.to_vec();
    s[axis] = n;
    s
}

/// Row-major reshape to `shape` (same element count).
pub fn reshape<T: Pooled>(x: &ArrayD<T>, shape: &[u64]) -> Result<ArrayD<T>, ExecError> {
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
    let mut out = take_vec::<T>(x.len());
    match x.as_slice() {
        Some(s) => out.extend_from_slice(s),
        None => out.extend(x.iter().cloned()),
    }
    from_vec(OP, shape, out)
}

/// Splits `axis` into consecutive pieces of `sizes` (summing to the axis size).
pub fn split<T: Pooled>(
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
    if let Some(src) = x.as_slice() {
        let mut start = 0usize;
        let mut out = Vec::with_capacity(sizes.len());
        for &s in sizes {
            let end = start + s as usize;
            let shape = with_axis(x.shape(), axis, s as usize);
            let mut v = take_vec::<T>(shape.iter().product());
            copy_axis_range(src, x.shape(), axis, start, end, &mut v);
            out.push(from_vec(OP, shape, v)?);
            start = end;
        }
        return Ok(out);
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
pub fn concat<T: Pooled>(xs: &[&ArrayD<T>], axis: usize) -> Result<ArrayD<T>, ExecError> {
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
    let slices: Option<Vec<&[T]>> = xs.iter().map(|x| x.as_slice()).collect();
    if let Some(slices) = slices {
        let size: usize = xs.iter().map(|x| x.shape()[axis]).sum();
        let shape = with_axis(first.shape(), axis, size);
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        let mut out = take_vec::<T>(shape.iter().product());
        for o in 0..outer {
            for (x, s) in xs.iter().zip(&slices) {
                let block = x.shape()[axis] * inner;
                out.extend_from_slice(&s[o * block..(o + 1) * block]);
            }
        }
        return from_vec(OP, shape, out);
    }
    let views: Vec<ArrayViewD<T>> = xs.iter().map(|x| x.view()).collect();
    let out = ndarray::concatenate(Axis(axis), &views)
        .map_err(|e| ExecError::shape(OP, e.to_string()))?;
    Ok(out.as_standard_layout().into_owned())
}

/// Elements `start..end` of `axis` (`start <= end <= size`).
pub fn slice<T: Pooled>(
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
    if let Some(src) = x.as_slice() {
        let shape = with_axis(x.shape(), axis, e - s);
        let mut out = take_vec::<T>(shape.iter().product());
        copy_axis_range(src, x.shape(), axis, s, e, &mut out);
        return from_vec(OP, shape, out);
    }
    Ok(x.slice_axis(Axis(axis), Slice::from(s..e))
        .as_standard_layout()
        .into_owned())
}
