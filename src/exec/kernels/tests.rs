//! Edge cases of the kernels: broadcast corners, -inf rows, masks with Sq < Sk, keepdims, errors.

use super::*;
use crate::exec::{ExecError, Tensor};
use crate::ir::{BinaryOp, Dtype, ReduceOp, UnaryOp};
use ndarray::{array, ArrayD, IxDyn};

/// An f32 array of `shape` holding 0, 1, 2, ...
fn iota(shape: &[usize]) -> ArrayD<f32> {
    let n = shape.iter().product::<usize>();
    ArrayD::from_shape_vec(shape.to_vec(), (0..n).map(|i| i as f32).collect()).unwrap()
}

/// Naive matmul of two 2-D arrays.
fn naive(a: &ArrayD<f32>, b: &ArrayD<f32>) -> ArrayD<f32> {
    let (m, k, n) = (a.shape()[0], a.shape()[1], b.shape()[1]);
    ArrayD::from_shape_fn(vec![m, n], |ix| {
        (0..k).map(|p| a[[ix[0], p]] * b[[p, ix[1]]]).sum()
    })
}

#[test]
fn broadcast_shape_corners() {
    assert_eq!(broadcast_shape(&[2, 1, 3], &[4, 1]), Some(vec![2, 4, 3]));
    assert_eq!(broadcast_shape(&[], &[3]), Some(vec![3]));
    assert_eq!(broadcast_shape(&[0], &[1]), Some(vec![0]));
    assert_eq!(broadcast_shape(&[2], &[3]), None);
}

#[test]
fn binary_broadcasts_both_ways() {
    let a = iota(&[2, 1, 3]);
    let b = iota(&[4, 1]);
    let c = binary_f32(BinaryOp::Sub, &a, &b).unwrap();
    assert_eq!(c.shape(), &[2, 4, 3]);
    assert_eq!(c[[1, 2, 0]], a[[1, 0, 0]] - b[[2, 0]]);
    let s = ArrayD::from_elem(IxDyn(&[]), 2.0f32);
    let d = binary_f32(BinaryOp::Div, &s, &a).unwrap();
    assert_eq!(d.shape(), a.shape());
    assert_eq!(d[[0, 0, 1]], 2.0);
    let bad = binary_f32(BinaryOp::Add, &iota(&[2]), &iota(&[3]));
    assert!(matches!(bad, Err(ExecError::Shape { .. })));
}

#[test]
fn maximum_propagates_nan() {
    let a = array![1.0f32, f32::NAN, -1.0].into_dyn();
    let b = array![f32::NAN, 0.0, 0.0].into_dyn();
    let c = binary_f32(BinaryOp::Max, &a, &b).unwrap();
    assert!(c[[0]].is_nan() && c[[1]].is_nan());
    assert_eq!(c[[2]], 0.0);
}

#[test]
fn i32_binary_and_scalar_semantics() {
    let a = array![7, -7, 7, -7, 5].into_dyn();
    let b = array![2, 2, -2, -2, 0].into_dyn();
    let q = binary_i32(BinaryOp::Div, &a, &b).unwrap();
    assert_eq!(q.as_slice().unwrap(), &[3, -4, -4, 3, 0]);
    let s = scalar_i32(BinaryOp::Add, 1.0, false, &a);
    assert_eq!(s[[1]], -6);
    let h = scalar_i32(BinaryOp::Mul, 0.5, false, &a);
    assert_eq!(h.as_slice().unwrap(), &[3, -3, 3, -3, 2]);
    assert_eq!(unary_i32(UnaryOp::Neg, &a).unwrap()[[0]], -7);
    assert!(unary_i32(UnaryOp::Exp, &a).is_err());
}

#[test]
fn scalar_lhs_order() {
    let x = array![1.0f32, 4.0].into_dyn();
    assert_eq!(
        scalar_f32(BinaryOp::Sub, 1.0, true, &x).as_slice().unwrap(),
        &[0.0, -3.0]
    );
    assert_eq!(
        scalar_f32(BinaryOp::Sub, 1.0, false, &x)
            .as_slice()
            .unwrap(),
        &[0.0, 3.0]
    );
    assert_eq!(
        scalar_f32(BinaryOp::Div, 2.0, true, &x).as_slice().unwrap(),
        &[2.0, 0.5]
    );
}

#[test]
fn unary_values() {
    let x = array![0.0f32, 1.0, -100.0, 100.0].into_dyn();
    let g = unary_f32(UnaryOp::Gelu, &x);
    assert_eq!(g[[0]], 0.0);
    assert!((g[[1]] - 0.841_192).abs() < 1e-5);
    assert_eq!(g[[2]], 0.0);
    assert_eq!(g[[3]], 100.0);
    let s = unary_f32(UnaryOp::Silu, &x);
    // -100·e^-100 = -3.72e-42, a subnormal: not flushed to 0.
    assert!((s[[2]] + 3.72e-42).abs() < 1e-44, "{}", s[[2]]);
    assert_eq!(s[[3]], 100.0);
    assert_eq!(
        unary_f32(UnaryOp::Rsqrt, &array![4.0f32].into_dyn())[[0]],
        0.5
    );
    assert!(unary_f32(UnaryOp::Relu, &array![f32::NAN].into_dyn())[[0]].is_nan());
}

#[test]
fn softmax_with_neg_inf() {
    let x = array![[0.0f32, f32::NEG_INFINITY, 0.0], [f32::NEG_INFINITY; 3]].into_dyn();
    let s = softmax(&x, 1).unwrap();
    assert_eq!(s.row_slice(0), vec![0.5, 0.0, 0.5]);
    assert!(s.row_slice(1).iter().all(|v| v.is_nan()));
    let t = softmax(&iota(&[2, 3]), 0).unwrap();
    assert!((t[[0, 1]] + t[[1, 1]] - 1.0).abs() < 1e-6);
    assert!(softmax(&x, 2).is_err());
}

trait RowSlice {
    fn row_slice(&self, i: usize) -> Vec<f32>;
}

impl RowSlice for ArrayD<f32> {
    fn row_slice(&self, i: usize) -> Vec<f32> {
        self.index_axis(ndarray::Axis(0), i)
            .iter()
            .copied()
            .collect()
    }
}

#[test]
fn norms() {
    let x = array![[1.0f32, 2.0, 3.0, 4.0]].into_dyn();
    let g = array![1.0f32, 1.0, 1.0, 2.0].into_dyn();
    let b = array![0.0f32, 0.0, 1.0, 0.0].into_dyn();
    let y = layernorm(&x, &g, Some(&b), 0.0).unwrap();
    let inv = 1.0 / 1.25f32.sqrt();
    assert!((y[[0, 0]] + 1.5 * inv).abs() < 1e-6);
    assert!((y[[0, 2]] - (0.5 * inv + 1.0)).abs() < 1e-6);
    assert!((y[[0, 3]] - 3.0 * inv).abs() < 1e-6);
    let r = rmsnorm(&x, &g, 0.0).unwrap();
    assert!((r[[0, 0]] - 1.0 / 7.5f32.sqrt()).abs() < 1e-6);
    let bad = array![1.0f32, 2.0].into_dyn();
    assert!(layernorm(&x, &bad, None, 1e-5).is_err());
    assert!(rmsnorm(&ArrayD::from_elem(IxDyn(&[]), 1.0), &bad, 1e-5).is_err());
}

#[test]
fn reductions_keepdims() {
    let x = iota(&[2, 3, 4]);
    let s = reduce_f32(ReduceOp::Sum, &x, 1, true).unwrap();
    assert_eq!(s.shape(), &[2, 1, 4]);
    assert_eq!(s[[1, 0, 2]], 14.0 + 18.0 + 22.0);
    let m = reduce_f32(ReduceOp::Mean, &x, 2, false).unwrap();
    assert_eq!(m.shape(), &[2, 3]);
    assert_eq!(m[[0, 0]], 1.5);
    let mx = reduce_f32(ReduceOp::Max, &x, 0, false).unwrap();
    assert_eq!(mx[[2, 3]], 23.0);
    let e = ArrayD::<f32>::zeros(vec![2, 0]);
    assert!(matches!(
        reduce_f32(ReduceOp::Max, &e, 1, false),
        Err(ExecError::EmptyReduction { .. })
    ));
    assert!(reduce_f32(ReduceOp::Mean, &e, 1, false).unwrap()[[0]].is_nan());
    let xi = array![[1, 2], [3, -8]].into_dyn();
    assert_eq!(
        reduce_i32(ReduceOp::Mean, &xi, 1, true)
            .unwrap()
            .as_slice()
            .unwrap(),
        &[1, -2]
    );
    assert!(reduce_f32(ReduceOp::Sum, &x, 3, false).is_err());
}

#[test]
fn matmul_shapes_and_values() {
    let a = iota(&[3, 4]);
    let b = iota(&[4, 5]);
    assert_eq!(matmul(&a, &b).unwrap(), naive(&a, &b));
    // 1-D on either side, batch broadcast of b.
    let v = iota(&[4]);
    assert_eq!(matmul(&v, &iota(&[2, 4, 5])).unwrap().shape(), &[2, 5]);
    assert_eq!(matmul(&a, &v).unwrap().shape(), &[3]);
    assert_eq!(matmul(&v, &v).unwrap().shape(), &[] as &[usize]);
    let ab = matmul(&iota(&[2, 1, 3, 4]), &iota(&[5, 4, 2])).unwrap();
    assert_eq!(ab.shape(), &[2, 5, 3, 2]);
    let slice = |x: &ArrayD<f32>, i: usize, j: usize| {
        x.index_axis(ndarray::Axis(0), i)
            .index_axis(ndarray::Axis(0), j)
            .to_owned()
    };
    let lhs = iota(&[2, 1, 3, 4]);
    let rhs = iota(&[5, 4, 2]);
    let want = naive(
        &slice(&lhs, 1, 0),
        &rhs.index_axis(ndarray::Axis(0), 3).to_owned(),
    );
    assert_eq!(slice(&ab, 1, 3), want);
    assert!(matmul(&a, &a).is_err());
    assert!(matmul(&iota(&[2, 3, 4]), &iota(&[3, 4, 2])).is_err());
    // k = 0 gives zeros; non-contiguous operands are handled.
    assert_eq!(
        matmul(&iota(&[2, 0]), &iota(&[0, 3])).unwrap(),
        ArrayD::<f32>::zeros(vec![2, 3])
    );
    let at = a.t().to_owned().into_dyn();
    let at_t = at.t().into_dyn();
    assert_eq!(matmul(&at_t.to_owned(), &b).unwrap(), naive(&a, &b));
    let at_view = at.view().reversed_axes().into_owned();
    assert_eq!(matmul(&at_view, &b).unwrap(), naive(&a, &b));
}

#[test]
fn layout_ops() {
    let x = iota(&[2, 3, 4]);
    let t = transpose(&x, &[2, 0, 1]).unwrap();
    assert_eq!(t.shape(), &[4, 2, 3]);
    assert_eq!(t[[3, 1, 2]], x[[1, 2, 3]]);
    assert!(transpose(&x, &[0, 0, 1]).is_err());
    let r = reshape(&t, &[8, 3]).unwrap();
    assert_eq!(r[[7, 2]], t[[3, 1, 2]]);
    assert!(reshape(&x, &[5, 5]).is_err());
    let parts = split(&x, 2, &[1, 3]).unwrap();
    assert_eq!(parts[1].shape(), &[2, 3, 3]);
    assert_eq!(parts[1][[1, 1, 0]], x[[1, 1, 1]]);
    assert!(split(&x, 2, &[1, 2]).is_err());
    let c = concat(&[&parts[1], &parts[0]], 2).unwrap();
    assert_eq!(c[[0, 0, 3]], x[[0, 0, 0]]);
    assert!(concat(&[&x, &iota(&[2, 4, 4])], 2).is_err());
    let s = slice(&x, 1, 1, 3).unwrap();
    assert_eq!(s.shape(), &[2, 2, 4]);
    assert_eq!(s[[0, 0, 0]], x[[0, 1, 0]]);
    assert!(slice(&x, 1, 2, 4).is_err());
}

#[test]
fn embedding_and_errors() {
    let table = iota(&[5, 2]);
    let ids = array![[4, 0], [1, 1]].into_dyn();
    let e = embedding(&ids, &table).unwrap();
    assert_eq!(e.shape(), &[2, 2, 2]);
    assert_eq!(e[[0, 0, 1]], 9.0);
    let bad = array![0, 5].into_dyn();
    let err = embedding(&bad, &table).unwrap_err();
    assert_eq!(
        err,
        ExecError::IdOutOfRange {
            id: 5,
            position: 1,
            vocab: 5
        }
    );
    assert!(embedding(&array![-1].into_dyn(), &table).is_err());
}

#[test]
fn cross_entropy_values_and_errors() {
    let logits = array![[0.0f32, 0.0], [0.0, f32::ln(3.0)]].into_dyn();
    let labels = array![0, 1].into_dyn();
    let l = cross_entropy(&logits, &labels).unwrap();
    let want = (2f32.ln() + (4f32.ln() - 3f32.ln())) / 2.0;
    assert!((l[[]] - want).abs() < 1e-6);
    let bad = array![0, 2].into_dyn();
    assert!(matches!(
        cross_entropy(&logits, &bad),
        Err(ExecError::LabelOutOfRange { label: 2, .. })
    ));
    assert!(cross_entropy(&logits, &array![0].into_dyn()).is_err());
}

#[test]
fn causal_mask_rectangular() {
    let x = ArrayD::<f32>::zeros(vec![2, 2, 4]);
    let m = causal_mask(&x).unwrap();
    let inf = f32::NEG_INFINITY;
    assert_eq!(
        m.row_slice(1).to_vec(),
        vec![0.0, 0.0, 0.0, inf, 0.0, 0.0, 0.0, 0.0]
    );
    let tall = causal_mask(&ArrayD::<f32>::zeros(vec![3, 2])).unwrap();
    assert_eq!(
        tall.iter().copied().collect::<Vec<_>>(),
        vec![inf, inf, 0.0, inf, 0.0, 0.0]
    );
    assert!(causal_mask(&iota(&[3])).is_err());
}

#[test]
fn casts() {
    assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0); // tie, rounds to even
    assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0); // tie, rounds up to even
    assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
    assert!(round_bf16(f32::NAN).is_nan());
    assert_eq!(round_f16(65520.0), f32::INFINITY);
    let x = Tensor::F32(array![-1.7f32, 2.9, f32::NAN].into_dyn());
    assert_eq!(
        cast(&x, Dtype::I32),
        Tensor::I32(array![-1, 2, 0].into_dyn())
    );
    let i = Tensor::I32(array![16_777_217].into_dyn());
    assert_eq!(
        cast(&i, Dtype::Bf16),
        Tensor::F32(array![16_777_216.0f32].into_dyn())
    );
}

#[test]
fn handed_over_operands_give_the_borrowed_results() {
    use crate::exec::apply::apply_owned;
    use crate::exec::{apply, Tensor};
    use crate::ir::Op;
    use std::borrow::Cow;
    let t = |shape: &[usize]| Tensor::F32(iota(shape).mapv(|v| v * 0.37 - 3.0));
    let ops_pairs: Vec<(Op, Vec<Tensor>)> = [
        (&[2, 3, 4][..], &[2, 3, 4][..]),
        (&[2, 3, 4], &[]),
        (&[], &[2, 3, 4]),
        (&[2, 3, 4], &[4]),
        (&[4], &[2, 3, 4]),
        (&[2, 3, 4], &[2, 3, 1]),
        (&[2, 3, 1], &[2, 3, 4]),
        (&[2, 1, 4], &[3, 1]),
    ]
    .iter()
    .flat_map(|(a, b)| {
        [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Div, BinaryOp::Max]
            .map(|op| (Op::Binary { op }, vec![t(a), t(b)]))
    })
    .chain([
        (Op::Unary { op: UnaryOp::Gelu }, vec![t(&[3, 5])]),
        (
            Op::Scalar {
                op: BinaryOp::Sub,
                value: 1.5,
                scalar_lhs: true,
            },
            vec![t(&[3, 5])],
        ),
        (Op::Softmax { axis: 1 }, vec![t(&[3, 5])]),
        (Op::Softmax { axis: 0 }, vec![t(&[3, 5])]),
        (Op::CausalMask, vec![t(&[2, 3, 5])]),
        (Op::Reshape { shape: vec![5, 3] }, vec![t(&[3, 5])]),
        (
            Op::Reshape { shape: vec![4] },
            vec![Tensor::I32(array![[1, 2], [3, 4]].into_dyn())],
        ),
        (Op::Reshape { shape: vec![4] }, vec![t(&[3, 5])]),
        (Op::MatMul, vec![t(&[3, 5]), t(&[5, 2])]),
    ])
    .collect();
    for (op, args) in ops_pairs {
        let refs: Vec<&Tensor> = args.iter().collect();
        let want = apply(&op, &refs);
        for mask in 0..(1u32 << args.len()) {
            let handed: Vec<Cow<'_, Tensor>> = args
                .iter()
                .enumerate()
                .map(|(i, a)| {
                    if mask & (1 << i) != 0 {
                        Cow::Owned(a.clone())
                    } else {
                        Cow::Borrowed(a)
                    }
                })
                .collect();
            let got = apply_owned(&op, handed);
            match (&want, &got) {
                (Ok(w), Ok(g)) => {
                    assert_eq!(w.len(), g.len());
                    for (w, g) in w.iter().zip(g) {
                        assert_eq!(w.shape(), g.shape(), "{op:?} mask {mask}");
                        let bits = |t: &Tensor| -> Vec<u32> {
                            match t {
                                Tensor::F32(x) => x.iter().map(|v| v.to_bits()).collect(),
                                Tensor::I32(x) => x.iter().map(|&v| v as u32).collect(),
                            }
                        };
                        assert_eq!(bits(w), bits(g), "{op:?} mask {mask}");
                    }
                }
                (Err(_), Err(_)) => {}
                _ => panic!("{op:?} mask {mask}: {want:?} vs {got:?}"),
            }
        }
    }
}

#[test]
fn transposes_match_ndarray() {
    for (shape, perm) in [
        (&[3usize, 37, 19][..], &[0usize, 2, 1][..]),
        (&[40, 33], &[1, 0]),
        (&[2, 5, 3, 17], &[0, 2, 1, 3]),
        (&[2, 5, 3, 17], &[3, 1, 0, 2]),
        (&[2, 1, 64, 32], &[0, 1, 3, 2]),
        (&[1, 1], &[1, 0]),
    ] {
        let x = iota(shape);
        let want = x
            .view()
            .permuted_axes(IxDyn(perm))
            .as_standard_layout()
            .into_owned();
        assert_eq!(transpose(&x, perm).unwrap(), want, "{shape:?} {perm:?}");
        let xi = x.mapv(|v| v as i32);
        let wi = want.mapv(|v| v as i32);
        assert_eq!(transpose(&xi, perm).unwrap(), wi, "{shape:?} {perm:?}");
    }
}

/// Each g·f'(x) against a central difference of the forward kernel itself (f64 steps on f32
/// values of moderate size: the difference quotient is good to ~1e-3 relative).
#[test]
fn unary_grads_are_the_forward_kernels_slopes() {
    use UnaryOp::*;
    let x = ArrayD::from_shape_vec(vec![5], vec![-2.5f32, -0.7, 0.3, 1.1, 3.0]).unwrap();
    let pos = x.mapv(|v| v.abs() + 0.5);
    let g = ArrayD::from_elem(IxDyn(&[5]), 2.0f32);
    for op in [Gelu, Relu, Silu, Tanh, Exp, Log, Neg, Sqrt, Rsqrt, Recip] {
        let at = if matches!(op, Log | Sqrt | Rsqrt | Recip) {
            &pos
        } else {
            &x
        };
        let d = unary_grad(op, at, &g).unwrap();
        let h = 1e-2f32;
        let up = unary_f32(op, &at.mapv(|v| v + h));
        let down = unary_f32(op, &at.mapv(|v| v - h));
        for k in 0..5 {
            let slope = 2.0 * (up[k] - down[k]) / (2.0 * h);
            assert!(
                (d[k] - slope).abs() <= 2e-3 * slope.abs().max(1.0),
                "{op:?} at {}: {} vs {slope}",
                at[k],
                d[k]
            );
        }
    }
    assert!(unary_grad(Gelu, &x, &iota(&[4])).is_err(), "shapes differ");
}

/// A zero cotangent gives 0 even where f' is infinite (log at 0).
#[test]
fn a_zero_cotangent_gives_zero() {
    let zero = ArrayD::from_elem(IxDyn(&[1]), 0.0f32);
    assert_eq!(unary_grad(UnaryOp::Log, &zero, &zero).unwrap()[0], 0.0);
}

/// Rows with the same id are summed, others stay 0; an id out of range is named.
#[test]
fn scatter_add_sums_rows_by_id() {
    let ids = ArrayD::from_shape_vec(vec![3], vec![2, 0, 2]).unwrap();
    let g = iota(&[3, 2]);
    let t = scatter_add(&ids, &g, 4).unwrap();
    assert_eq!(
        t,
        array![[2.0, 3.0], [0.0, 0.0], [4.0, 6.0], [0.0, 0.0]].into_dyn()
    );
    let bad = ArrayD::from_shape_vec(vec![3], vec![2, 4, 2]).unwrap();
    assert!(matches!(
        scatter_add(&bad, &g, 4),
        Err(ExecError::IdOutOfRange {
            id: 4,
            position: 1,
            vocab: 4
        })
    ));
    assert!(
        scatter_add(&ids, &iota(&[2, 2]), 4).is_err(),
        "shapes differ"
    );
}

/// One 1.0 per label; a label out of range is named.
#[test]
fn one_hot_marks_each_label() {
    let labels = ArrayD::from_shape_vec(vec![2], vec![1, 0]).unwrap();
    assert_eq!(
        one_hot(&labels, 3).unwrap(),
        array![[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]].into_dyn()
    );
    let bad = ArrayD::from_shape_vec(vec![2], vec![1, -1]).unwrap();
    assert!(matches!(
        one_hot(&bad, 3),
        Err(ExecError::LabelOutOfRange {
            label: -1,
            position: 1,
            classes: 3
        })
    ));
}

/// Equality broadcasts like the binary ops; broadcast_to refuses a misfit.
#[test]
fn equal_and_broadcast_to() {
    let a = iota(&[2, 1]);
    let b = ArrayD::from_shape_vec(vec![3], vec![0.0f32, 1.0, 5.0]).unwrap();
    assert_eq!(
        equal(&a, &b).unwrap(),
        array![[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]].into_dyn()
    );
    assert_eq!(broadcast_to(&a, &[3, 2, 2]).unwrap().shape(), &[3, 2, 2]);
    assert!(broadcast_to(&a, &[3]).is_err());
}
