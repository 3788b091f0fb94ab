//! Checks the kernels against numpy results stored in `tests/golden/*.npz` (written by
//! `tests/golden/make_golden.py`; see its header to regenerate).
//!
//! Tolerance: `|got - want| <= 1e-5·|want| + 1e-6` (relative, with a tiny absolute floor for
//! results near zero, where f32 summation order dominates); NaN matches NaN and infinities must
//! match exactly. Layout, lookup, mask and cast results must be bit-identical.

use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::NpzReader;
use std::fs::File;
use tpc::exec::kernels as k;
use tpc::exec::Tensor;
use tpc::ir::{BinaryOp, Dtype, ReduceOp, UnaryOp};

const RTOL: f32 = 1e-5;
const ATOL: f32 = 1e-6;

/// One golden file, read on demand.
struct Golden {
    name: &'static str,
    npz: NpzReader<File>,
}

impl Golden {
    fn open(name: &'static str) -> Golden {
        let path = format!("{}/tests/golden/{name}.npz", env!("CARGO_MANIFEST_DIR"));
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let npz = NpzReader::new(file).unwrap_or_else(|e| panic!("{path}: {e}"));
        Golden { name, npz }
    }

    fn f32(&mut self, key: &str) -> ArrayD<f32> {
        let r = self.npz.by_name::<OwnedRepr<f32>, IxDyn>(key);
        r.unwrap_or_else(|e| panic!("{}.npz[{key}]: {e}", self.name))
    }

    fn i32(&mut self, key: &str) -> ArrayD<i32> {
        let r = self.npz.by_name::<OwnedRepr<i32>, IxDyn>(key);
        r.unwrap_or_else(|e| panic!("{}.npz[{key}]: {e}", self.name))
    }
}

/// Asserts equal shapes and elementwise closeness (see the module doc).
fn assert_close(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for ((ix, &g), &w) in got.indexed_iter().zip(want.iter()) {
        let ok = if w.is_nan() || w.is_infinite() {
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan())
        } else {
            (g - w).abs() <= RTOL * w.abs() + ATOL
        };
        assert!(ok, "{what}: at {ix:?} got {g:e}, want {w:e}");
    }
}

/// Asserts bit-identical f32 arrays (NaNs compare by bits too).
fn assert_bits(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    for ((ix, g), w) in got.indexed_iter().zip(want.iter()) {
        assert_eq!(
            g.to_bits(),
            w.to_bits(),
            "{what}: at {ix:?} got {g:e}, want {w:e}"
        );
    }
}

#[test]
fn unary() {
    let mut g = Golden::open("unary");
    let (x, xp) = (g.f32("x"), g.f32("xp"));
    let cases = [
        ("gelu", UnaryOp::Gelu, &x),
        ("relu", UnaryOp::Relu, &x),
        ("silu", UnaryOp::Silu, &x),
        ("tanh", UnaryOp::Tanh, &x),
        ("exp", UnaryOp::Exp, &x),
        ("neg", UnaryOp::Neg, &x),
        ("log", UnaryOp::Log, &xp),
        ("sqrt", UnaryOp::Sqrt, &xp),
        ("rsqrt", UnaryOp::Rsqrt, &xp),
    ];
    for (key, op, input) in cases {
        assert_close(key, &k::unary_f32(op, input), &g.f32(key));
    }
    let x4 = x.slice(ndarray::s![.., 4..]).to_owned().into_dyn();
    assert_close("recip", &k::unary_f32(UnaryOp::Recip, &x4), &g.f32("recip"));
}

#[test]
fn binary_and_scalar() {
    let mut g = Golden::open("binary");
    let (a, b, x) = (g.f32("a"), g.f32("b"), g.f32("x"));
    for (key, op) in [
        ("add", BinaryOp::Add),
        ("sub", BinaryOp::Sub),
        ("mul", BinaryOp::Mul),
        ("div", BinaryOp::Div),
        ("maximum", BinaryOp::Max),
    ] {
        assert_close(key, &k::binary_f32(op, &a, &b).unwrap(), &g.f32(key));
    }
    let cases = [
        ("x_minus_1_5", BinaryOp::Sub, 1.5, false),
        ("one_5_minus_x", BinaryOp::Sub, 1.5, true),
        ("two_over_x", BinaryOp::Div, 2.0, true),
        ("x_times_0_125", BinaryOp::Mul, 0.125, false),
    ];
    for (key, op, value, lhs) in cases {
        assert_close(key, &k::scalar_f32(op, value, lhs, &x), &g.f32(key));
    }
}

#[test]
fn softmax() {
    let mut g = Golden::open("softmax");
    let x = g.f32("x");
    for axis in 0..3 {
        let key = format!("axis{axis}");
        assert_close(&key, &k::softmax(&x, axis).unwrap(), &g.f32(&key));
    }
}

#[test]
fn norms() {
    let mut g = Golden::open("norms");
    let (x, gain, bias) = (g.f32("x"), g.f32("g"), g.f32("b"));
    let ln = k::layernorm(&x, &gain, Some(&bias), 1e-5).unwrap();
    assert_close("layernorm_bias", &ln, &g.f32("layernorm_bias"));
    let ln = k::layernorm(&x, &gain, None, 1e-5).unwrap();
    assert_close("layernorm", &ln, &g.f32("layernorm"));
    assert_close(
        "rmsnorm",
        &k::rmsnorm(&x, &gain, 1e-5).unwrap(),
        &g.f32("rmsnorm"),
    );
}

#[test]
fn cross_entropy() {
    let mut g = Golden::open("cross_entropy");
    let loss = k::cross_entropy(&g.f32("logits"), &g.i32("labels")).unwrap();
    assert_close("loss", &loss, &g.f32("loss"));
}

#[test]
fn causal_mask() {
    let mut g = Golden::open("causal_mask");
    for i in 1..=3 {
        let out = k::causal_mask(&g.f32(&format!("x{i}"))).unwrap();
        assert_bits(&format!("out{i}"), &out, &g.f32(&format!("out{i}")));
    }
}

#[test]
fn matmul() {
    let mut g = Golden::open("matmul");
    for i in 0..8 {
        let got = k::matmul(&g.f32(&format!("a{i}")), &g.f32(&format!("b{i}"))).unwrap();
        assert_close(
            &format!("matmul case {i}"),
            &got,
            &g.f32(&format!("out{i}")),
        );
    }
}

#[test]
fn embedding() {
    let mut g = Golden::open("embedding");
    let out = k::embedding(&g.i32("ids"), &g.f32("table")).unwrap();
    assert_bits("embedding", &out, &g.f32("out"));
}

#[test]
fn reductions() {
    let mut g = Golden::open("reduce");
    let x = g.f32("x");
    for (name, op) in [
        ("sum", ReduceOp::Sum),
        ("mean", ReduceOp::Mean),
        ("max", ReduceOp::Max),
    ] {
        for axis in 0..3 {
            for keep in [false, true] {
                let key = format!("{name}_{axis}_{}", keep as u8);
                assert_close(
                    &key,
                    &k::reduce_f32(op, &x, axis, keep).unwrap(),
                    &g.f32(&key),
                );
            }
        }
    }
}

#[test]
fn layout() {
    let mut g = Golden::open("layout");
    let x = g.f32("x");
    let t = k::transpose(&x, &[2, 0, 1]).unwrap();
    assert_bits("transpose_201", &t, &g.f32("transpose_201"));
    assert_bits(
        "transpose_102",
        &k::transpose(&x, &[1, 0, 2]).unwrap(),
        &g.f32("transpose_102"),
    );
    assert_bits(
        "reshape_t_4_6",
        &k::reshape(&t, &[4, 6]).unwrap(),
        &g.f32("reshape_t_4_6"),
    );
    let parts = k::split(&x, 1, &[1, 2]).unwrap();
    assert_bits("split_1_a", &parts[0], &g.f32("split_1_a"));
    assert_bits("split_1_b", &parts[1], &g.f32("split_1_b"));
    let x2 = k::scalar_f32(BinaryOp::Mul, 2.0, false, &x);
    assert_bits(
        "concat_0",
        &k::concat(&[&x, &x2], 0).unwrap(),
        &g.f32("concat_0"),
    );
    let lhs = k::transpose(&parts[1], &[0, 2, 1]).unwrap();
    let rhs = k::transpose(&k::slice(&x, 1, 0, 2).unwrap(), &[0, 2, 1]).unwrap();
    assert_bits(
        "concat_2",
        &k::concat(&[&lhs, &rhs], 2).unwrap(),
        &g.f32("concat_2"),
    );
    assert_bits(
        "slice_2_1_3",
        &k::slice(&x, 2, 1, 3).unwrap(),
        &g.f32("slice_2_1_3"),
    );
    let ids = g.i32("ids");
    assert_eq!(
        k::transpose(&ids, &[2, 1, 0]).unwrap(),
        g.i32("ids_transpose_210")
    );
    assert_eq!(k::reshape(&ids, &[6, 4]).unwrap(), g.i32("ids_reshape_6_4"));
}

#[test]
fn casts() {
    let mut g = Golden::open("cast");
    let x = Tensor::F32(g.f32("x"));
    let f = |t: Tensor| match t {
        Tensor::F32(a) => a,
        Tensor::I32(_) => panic!("expected a float result"),
    };
    assert_bits("bf16", &f(k::cast(&x, Dtype::Bf16)), &g.f32("bf16"));
    assert_bits("f16", &f(k::cast(&x, Dtype::F16)), &g.f32("f16"));
    let small = Tensor::F32(g.f32("small"));
    assert_eq!(k::cast(&small, Dtype::I32), Tensor::I32(g.i32("i32")));
}
