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

mod sealed {
    /// Only the pool's element types implement [`super::Pooled`].
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for i32 {}
}

/// An element type whose buffers the pool holds: f32 or i32 (sealed). Both have f32's size and
/// alignment and every bit pattern is valid for both, so a buffer serves either.
pub trait Pooled: sealed::Sealed + Copy + Default + Send + Sync + 'static {
    /// A pooled f32 buffer as a buffer of `Self` (same allocation, same initialized length).
    fn from_pool(v: Vec<f32>) -> Vec<Self>;
    /// A buffer of `Self` as an f32 buffer for the pool (same allocation).
    fn to_pool(v: Vec<Self>) -> Vec<f32>;
}

impl Pooled for f32 {
    fn from_pool(v: Vec<f32>) -> Vec<f32> {
        v
    }
    fn to_pool(v: Vec<f32>) -> Vec<f32> {
        v
    }
}

impl Pooled for i32 {
    fn from_pool(v: Vec<f32>) -> Vec<i32> {
        let mut v = std::mem::ManuallyDrop::new(v);
        // SAFETY: i32 has f32's size and alignment, so the allocation is a valid buffer for
        // `capacity` i32 freed with the same layout; every f32 bit pattern is a valid i32.
        unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<i32>(), v.len(), v.capacity()) }
    }
    fn to_pool(v: Vec<i32>) -> Vec<f32> {
        let mut v = std::mem::ManuallyDrop::new(v);
        // SAFETY: as in `from_pool`; every i32 bit pattern is a valid f32.
        unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity()) }
    }
}

/// A buffer of exactly `len` elements whose contents are unspecified (stale values or zeros):
/// the caller must overwrite every element.
pub(crate) fn take<T: Pooled>(len: usize) -> Vec<T> {
    match best_fit(len) {
        Some(v) => {
            let mut v = T::from_pool(v);
            if v.len() >= len {
                v.truncate(len);
            } else {
                v.resize(len, T::default());
            }
            v
        }
        None => vec![T::default(); len],
    }
}

/// A buffer of exactly `len` f32 whose contents are unspecified (see [`take`]).
pub(crate) fn take_f32(len: usize) -> Vec<f32> {
    take(len)
}

/// An empty vector with room for `len` elements, from the pool.
pub(crate) fn take_vec<T: Pooled>(len: usize) -> Vec<T> {
    match best_fit(len) {
        Some(mut v) => {
            v.clear();
            T::from_pool(v)
        }
        None => Vec::with_capacity(len),
    }
}

/// Returns a buffer to the pool (or to the allocator when small or the pool is full).
pub(crate) fn give<T: Pooled>(v: Vec<T>) {
    if v.capacity() < MIN_LEN {
        return;
    }
    let v = T::to_pool(v);
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
        Tensor::F32(a) => give(a.into_raw_vec_and_offset().0),
        Tensor::I32(a) => give(a.into_raw_vec_and_offset().0),
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
