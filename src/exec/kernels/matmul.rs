//! numpy matmul on top of one single-threaded GEMM (`gemm`), backed by the `gemm` crate, which
//! picks AVX-512 / AVX2+FMA / SSE / scalar micro-kernels by run-time CPU detection.

use super::pool::take_f32;
use super::{broadcast_shape, from_vec, row_major};
use crate::exec::ExecError;
use ndarray::ArrayD;

/// `c[m×n] = a[m×k] · b[k×n]`, all row-major and contiguous; single-threaded.
///
/// Panics if a slice length differs from its extent (a caller bug, checked before any unsafe).
pub fn gemm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert_eq!(a.len(), m * k, "gemm: lhs length");
    assert_eq!(b.len(), k * n, "gemm: rhs length");
    assert_eq!(c.len(), m * n, "gemm: dst length");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    let (k_i, n_i) = (k as isize, n as isize);
    // SAFETY: the asserts above make every pointer valid for the given extents and row-major
    // strides (column stride 1, row stride k or n); `c` is a unique borrow, so no aliasing.
    unsafe {
        ::gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n_i,
            false,
            a.as_ptr(),
            1,
            k_i,
            b.as_ptr(),
            1,
            n_i,
            0.0,
            1.0,
            false,
            false,
            false,
            ::gemm::Parallelism::None,
        )
    }
}

/// numpy `a @ b`: `...mk,...kn->...mn`, batch dims broadcast, 1-D operands promoted then dropped.
pub fn matmul(a: &ArrayD<f32>, b: &ArrayD<f32>) -> Result<ArrayD<f32>, ExecError> {
    const OP: &str = "matmul";
    if a.ndim() == 0 || b.ndim() == 0 {
        return Err(ExecError::shape(OP, "operands must have rank at least 1"));
    }
    let sa = if a.ndim() == 1 {
        vec![1, a.len()]
    } else {
        a.shape().to_vec()
    };
    let sb = if b.ndim() == 1 {
        vec![b.len(), 1]
    } else {
        b.shape().to_vec()
    };
    let (batch_a, mk) = sa.split_at(sa.len() - 2);
    let (batch_b, kn) = sb.split_at(sb.len() - 2);
    let (m, k, n) = (mk[0], mk[1], kn[1]);
    if k != kn[0] {
        let detail = format!(
            "contracting dims {k} and {} differ ({:?} @ {:?})",
            kn[0],
            a.shape(),
            b.shape()
        );
        return Err(ExecError::shape(OP, detail));
    }
    let batch = broadcast_shape(batch_a, batch_b).ok_or_else(|| {
        ExecError::shape(
            OP,
            format!("batch dims {batch_a:?} and {batch_b:?} do not broadcast"),
        )
    })?;
    let nb: usize = batch.iter().product();
    let (da, db) = (row_major(a), row_major(b));
    // Every element is written by `gemm` (which never reads its destination).
    let mut out = take_f32(nb * m * n);
    if batch_b.iter().product::<usize>() == 1 {
        // b is one matrix: fold a's batch into its rows, one big GEMM.
        gemm(nb * m, k, n, &da, &db, &mut out);
    } else {
        let ia = batch_index(&batch, batch_a);
        let ib = batch_index(&batch, batch_b);
        for (t, c) in out.chunks_exact_mut(m * n).enumerate() {
            let (pa, pb) = (ia[t] * m * k, ib[t] * k * n);
            gemm(m, k, n, &da[pa..pa + m * k], &db[pb..pb + k * n], c);
        }
    }
    let mut shape = batch;
    if a.ndim() > 1 {
        shape.push(m);
    }
    if b.ndim() > 1 {
        shape.push(n);
    }
    from_vec(OP, shape, out)
}

/// For each flat index of the broadcast batch shape `full`, the flat index into the operand
/// batch shape `sub` (right-aligned; size-1 dims repeat).
fn batch_index(full: &[usize], sub: &[usize]) -> Vec<usize> {
    let total: usize = full.iter().product();
    let pad = full.len() - sub.len();
    let mut strides = vec![0usize; full.len()];
    let mut s = 1;
    for i in (0..sub.len()).rev() {
        strides[pad + i] = if sub[i] == 1 { 0 } else { s };
        s *= sub[i];
    }
    let mut idx = vec![0usize; full.len()];
    let mut out = Vec::with_capacity(total);
    for _ in 0..total {
        out.push(idx.iter().zip(&strides).map(|(i, s)| i * s).sum());
        for d in (0..full.len()).rev() {
            idx[d] += 1;
            if idx[d] < full[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}
