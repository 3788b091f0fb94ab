//! Reductions pinned where cargo-mutants found `src/exec/kernels/reduce.rs` unchecked: the
//! row kernel of the last axis, and the symmetric max that the collectives combine with.

use ndarray::{ArrayD, IxDyn};
use tpc::exec::comm::{all_reduce, ThreadTransport};
use tpc::exec::kernels::reduce_f32;
use tpc::ir::ReduceOp;

/// Runs `f` on every rank of a thread world of `n` and returns the results in rank order.
fn on_world<T: Send + 'static>(
    n: usize,
    f: impl Fn(&mut ThreadTransport) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = ThreadTransport::world(n)
        .into_iter()
        .map(|mut t| {
            let f = f.clone();
            std::thread::spawn(move || f(&mut t))
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// One row of 64: 1e30 at 0, 1 at 1, -1e30 at 32 (the same lane of 32 as the 1e30).
fn cancelling_row() -> ArrayD<f32> {
    let mut row = vec![0.0f32; 64];
    row[0] = 1e30;
    row[1] = 1.0;
    row[32] = -1e30;
    ArrayD::from_shape_vec(IxDyn(&[1, 64]), row).unwrap()
}

/// A contiguous last axis goes through the 32-lane row kernel, which keeps the 1 that a
/// sequential f64 sum (1e30 + 1 - 1e30) loses: the exact sum and mean.
#[test]
fn a_contiguous_last_axis_is_summed_by_the_lane_kernel() {
    let x = cancelling_row();
    let sum = reduce_f32(ReduceOp::Sum, &x, 1, false).unwrap();
    assert_eq!(sum.as_slice().unwrap(), &[1.0]);
    let mean = reduce_f32(ReduceOp::Mean, &x, 1, true).unwrap();
    assert_eq!(mean.shape(), &[1, 1]);
    assert_eq!(mean.as_slice().unwrap(), &[1.0 / 64.0]);
}

/// The max of equal values is that value, bitwise, on every rank (not a bit operation of the two).
#[test]
fn the_max_all_reduce_of_equal_values_is_that_value() {
    let out = on_world(2, |t| {
        let mut d = vec![3.0f32, -0.0, 0.0, -2.5];
        all_reduce(t, &[0, 1], &mut d, ReduceOp::Max).unwrap();
        d.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    });
    let want: Vec<u32> = [3.0f32, -0.0, 0.0, -2.5]
        .iter()
        .map(|v| v.to_bits())
        .collect();
    assert!(out.iter().all(|o| o == &want), "{out:?}");
}
