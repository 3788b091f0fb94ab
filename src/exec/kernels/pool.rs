//! A per-thread pool of tensor buffers.
//!
//! The interpreters hand every value they free to [`recycle`]; kernels take their output buffers
//! from the pool. Writing into a warm buffer avoids the allocator's fresh pages (a page fault per
//! 4 KiB on first touch), which cost several times the work of a small elementwise kernel.
//!
//! Every SPMD rank runs on its own thread, so a rank's pool holds only that rank's buffers and
//! needs no lock. Buffers carry no meaning: a kernel overwrites every element it hands out, so
//! results never depend on the pool's contents.

use crate::exec::Tensor;
use std::cell::RefCell;

/// Buffers smaller than this (elements) go back to the allocator, which serves them cheaply.
const MIN_LEN: usize = 1024;
/// At most this many idle buffers per thread.
const MAX_BUFFERS: usize = 32;
/// At most this many idle bytes per thread (the pool is not counted in the interpreters' peak
/// live bytes, so it stays small next to them; larger buffers go back to the allocator).
const MAX_BYTES: usize = 64 << 20;

thread_local! {
    /// Idle buffers; `len` is how many leading elements are initialized (any f32 bits).
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// Removes and returns the idle buffer of the smallest capacity that holds `len` elements (and
/// not more than 4×, so a small request does not pin a large buffer).
fn best_fit(len: usize) -> Option<Vec<f32>> {
    if len < MIN_LEN {
        return None;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let i = p
            .iter()
            .enumerate()
            .filter(|(_, v)| v.capacity() >= len && v.capacity() / 4 <= len)
            .min_by_key(|(_, v)| v.capacity())
            .map(|(i, _)| i)?;
        Some(p.swap_remove(i))
    })
}

/// A buffer of exactly `len` f32 whose contents are unspecified (stale values or zeros): the
/// caller must overwrite every element.
pub(crate) fn take_f32(len: usize) -> Vec<f32> {
    match best_fit(len) {
        Some(mut v) => {
            if v.len() >= len {
                v.truncate(len);
            } else {
                v.resize(len, 0.0);
            }
            v
        }
        None => vec![0.0; len],
    }
}

/// An empty vector with room for `len` elements, from the pool when `T` has the size and
/// alignment of f32 (f32, i32).
pub(crate) fn take_vec<T>(len: usize) -> Vec<T> {
    if !same_layout::<T>() {
        return Vec::with_capacity(len);
    }
    match best_fit(len) {
        Some(mut v) => {
            v.clear();
            let mut v = std::mem::ManuallyDrop::new(v);
            // SAFETY: the vector is empty and T has f32's size and alignment, so the allocation
            // (capacity · 4 bytes, align 4) is a valid buffer for `capacity` T's and is freed with
            // the same layout.
            unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<T>(), 0, v.capacity()) }
        }
        None => Vec::with_capacity(len),
    }
}

/// True when T can share f32 buffers.
fn same_layout<T>() -> bool {
    std::mem::size_of::<T>() == 4 && std::mem::align_of::<T>() == 4
}

/// Returns a buffer to the pool (or to the allocator when small or the pool is full).
pub(crate) fn give(v: Vec<f32>) {
    if v.capacity() < MIN_LEN {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        let mut bytes: usize = p.iter().map(|b| b.capacity() * 4).sum::<usize>();
        while !p.is_empty() && (p.len() >= MAX_BUFFERS || bytes + v.capacity() * 4 > MAX_BYTES) {
            bytes -= p.remove(0).capacity() * 4;
        }
        if v.capacity() * 4 <= MAX_BYTES {
            p.push(v);
        }
    });
}

/// Hands a dead tensor's storage to this thread's pool, for the kernels' next outputs.
pub fn recycle(t: Tensor) {
    match t {
        Tensor::F32(a) => {
            let (v, _) = a.into_raw_vec_and_offset();
            give(v);
        }
        Tensor::I32(a) => {
            let (v, _) = a.into_raw_vec_and_offset();
            let mut v = std::mem::ManuallyDrop::new(v);
            // SAFETY: i32 and f32 have the same size and alignment, and every i32 bit pattern is
            // a valid f32, so the initialized elements stay initialized.
            let v =
                unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) };
            give(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_sized() {
        let v = take_f32(5000);
        assert_eq!(v.len(), 5000);
        let ptr = v.as_ptr();
        give(v);
        let w = take_f32(4000);
        assert_eq!((w.len(), w.as_ptr()), (4000, ptr));
        give(w);
        let x: Vec<i32> = take_vec(4500);
        assert!(x.is_empty() && x.capacity() >= 4500);
        assert_eq!(x.as_ptr().cast::<f32>(), ptr);
        let small = take_f32(10);
        assert_eq!(small.len(), 10);
        recycle(Tensor::I32(
            ndarray::ArrayD::from_shape_vec(vec![4500], vec![7; 4500]).unwrap(),
        ));
        let y = take_f32(4500);
        assert_eq!(y.len(), 4500);
        drop(x);
    }
}
