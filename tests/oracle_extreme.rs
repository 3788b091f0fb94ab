//! The kernels against numpy on extreme inputs: `tests/golden/extreme.npz`, written by
//! `tests/golden/make_extreme.py` (regenerate: `bash benches/setup_peers.sh` once, then
//! `target/benchvenv/bin/python tests/golden/make_extreme.py`).
//!
//! The reference interpreter and the sharded executor share these kernels, so equivalence and
//! property tests cannot see a kernel bug; this outside oracle can. Each case runs twice: through
//! the kernel's public function, and as a small program through the reference interpreter (which
//! takes the kernels' in-place paths).
//!
//! Expected values are numpy's results in float64 from the float32 inputs, rounded once to f32.
//! Tolerances are per element, stored next to each result as `NAME.tol` and derived from f32's
//! unit roundoff u = 2^-24 and the condition number of each function (the formulas are in the
//! script's header): e.g. `(8 + 4κ)·u·|f(x)|` for the unary functions, `K·u·(|A|·|B|)` for a
//! matmul of depth K. Non-finite expected values must match exactly (NaN matches NaN).

use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::NpzReader;
use std::collections::BTreeMap;
use std::fs::File;
use tpc::diag::SourceFile;
use tpc::driver::compile_global;
use tpc::exec::kernels as k;
use tpc::exec::{reference, Tensor};
use tpc::ir::{ReduceOp, UnaryOp};

/// The golden file.
struct Golden(NpzReader<File>);

impl Golden {
    fn open() -> Golden {
        let path = format!("{}/tests/golden/extreme.npz", env!("CARGO_MANIFEST_DIR"));
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        Golden(NpzReader::new(file).unwrap_or_else(|e| panic!("{path}: {e}")))
    }

    fn f32(&mut self, key: &str) -> ArrayD<f32> {
        let r = self.0.by_name::<OwnedRepr<f32>, IxDyn>(key);
        r.unwrap_or_else(|e| panic!("extreme.npz[{key}]: {e}"))
    }

    fn i32(&mut self, key: &str) -> ArrayD<i32> {
        let r = self.0.by_name::<OwnedRepr<i32>, IxDyn>(key);
        r.unwrap_or_else(|e| panic!("extreme.npz[{key}]: {e}"))
    }

    /// Checks `got` against the result `key` and its tolerance `key.tol`.
    fn check(&mut self, what: &str, key: &str, got: &ArrayD<f32>) {
        let (want, tol) = (self.f32(key), self.f32(&format!("{key}.tol")));
        assert_within(&format!("{what} ({key})"), got, &want, &tol);
    }
}

/// Asserts `|got - want| <= tol` elementwise; non-finite `want` must match exactly.
fn assert_within(what: &str, got: &ArrayD<f32>, want: &ArrayD<f32>, tol: &ArrayD<f32>) {
    assert_eq!(got.shape(), want.shape(), "{what}: shape");
    let tol = tol.broadcast(want.raw_dim()).expect("tolerance shape");
    for (((ix, &g), &w), &t) in got.indexed_iter().zip(want.iter()).zip(tol.iter()) {
        let ok = if w.is_nan() {
            g.is_nan()
        } else if w.is_infinite() {
            g == w
        } else {
            ((g as f64) - (w as f64)).abs() <= t as f64
        };
        assert!(
            ok,
            "{what}: at {ix:?} got {g:e}, want {w:e} (tolerance {t:e})"
        );
    }
}

/// Runs `body` (statements over the leaves) as a program through the reference interpreter;
/// returns output `y`.
fn run_program(decls: &str, body: &str, leaves: &[(&str, Tensor)]) -> ArrayD<f32> {
    let text = format!("{decls}\n{body}\noutput y\n");
    let src = SourceFile::new("extreme.tpl", text);
    let g = compile_global(&src, &[]).unwrap_or_else(|e| panic!("{}", e.render(Some(&src))));
    let leaves: BTreeMap<String, Tensor> = leaves
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    let out = reference::run(&g, &leaves, &leaves).unwrap_or_else(|e| panic!("{body}: {e}"));
    match out.into_iter().next() {
        Some((_, Tensor::F32(y))) => y,
        other => panic!("{body}: unexpected output {other:?}"),
    }
}

/// `f32[a, b]` for the shape of `x`.
fn ty(x: &ArrayD<f32>) -> String {
    let dims: Vec<String> = x.shape().iter().map(|d| d.to_string()).collect();
    format!("f32[{}]", dims.join(", "))
}

const UNARY: [(&str, UnaryOp); 6] = [
    ("gelu", UnaryOp::Gelu),
    ("silu", UnaryOp::Silu),
    ("tanh", UnaryOp::Tanh),
    ("exp", UnaryOp::Exp),
    ("relu", UnaryOp::Relu),
    ("neg", UnaryOp::Neg),
];

const POSITIVE: [(&str, UnaryOp); 4] = [
    ("log", UnaryOp::Log),
    ("sqrt", UnaryOp::Sqrt),
    ("rsqrt", UnaryOp::Rsqrt),
    ("recip", UnaryOp::Recip),
];

#[test]
fn unary_tails() {
    let mut g = Golden::open();
    for (input, ops) in [("x", &UNARY[..]), ("xp", &POSITIVE[..])] {
        let x = g.f32(input);
        for &(name, op) in ops {
            g.check("kernel", name, &k::unary_f32(op, &x));
            let decl = format!("input x : {}", ty(&x));
            let leaves = [("x", Tensor::F32(x.clone()))];
            let y = run_program(&decl, &format!("y = {name}(x)"), &leaves);
            g.check("program", name, &y);
            // On an operand the program computed: the kernel's in-place path.
            let y = run_program(&decl, &format!("y = {name}(neg(neg(x)))"), &leaves);
            g.check("program, in place", name, &y);
        }
    }
}

#[test]
fn unary_non_finite() {
    let mut g = Golden::open();
    let xs = g.f32("xs");
    for (name, op) in UNARY {
        let want = g.f32(&format!("{name}_s"));
        // gelu and silu: only NaN (the last input); their ±inf limits are conventions.
        let x = xs
            .slice(ndarray::s![xs.len() - want.len()..])
            .to_owned()
            .into_dyn();
        let zero = ArrayD::zeros(want.raw_dim());
        assert_within(name, &k::unary_f32(op, &x), &want, &zero);
    }
}

#[test]
fn softmax_rows() {
    let mut g = Golden::open();
    for key in ["softmax_short", "softmax_long"] {
        let x = g.f32(&format!("{key}.x"));
        g.check("kernel", key, &k::softmax(&x, 1).unwrap());
        // The strided path: softmax along axis 0 of the transpose.
        let xt = x.t().to_owned();
        let yt = k::softmax(&xt, 0).unwrap();
        g.check("kernel, axis 0", key, &yt.t().to_owned());
        let decl = format!("input x : {}", ty(&x));
        let y = run_program(&decl, "y = softmax(x)", &[("x", Tensor::F32(x.clone()))]);
        g.check("program", key, &y);
        // An operand the program computed (neg is exact) is normalized in its own buffer.
        let body = "y = softmax(neg(neg(x)))";
        let y = run_program(&decl, body, &[("x", Tensor::F32(x.clone()))]);
        g.check("program, in place", key, &y);
        let y = run_program(
            &format!("input x : {}", ty(&xt)),
            "y = transpose(softmax(x, axis=0))",
            &[("x", Tensor::F32(xt))],
        );
        g.check("program, axis 0", key, &y);
    }
}

#[test]
fn cross_entropy_large_logits() {
    let mut g = Golden::open();
    for i in 0..5 {
        let key = format!("ce{i}");
        let (x, labels) = (
            g.f32(&format!("{key}.logits")),
            g.i32(&format!("{key}.labels")),
        );
        g.check("kernel", &key, &k::cross_entropy(&x, &labels).unwrap());
        let decl = format!("input x : {}\ninput l : i32[{}]", ty(&x), labels.len());
        let leaves = [("x", Tensor::F32(x)), ("l", Tensor::I32(labels))];
        let y = run_program(&decl, "y = cross_entropy(x, l)", &leaves);
        g.check("program", &key, &y);
    }
}

#[test]
fn norms_of_large_means_and_magnitudes() {
    let mut g = Golden::open();
    let (x, gain, bias) = (g.f32("norm.x"), g.f32("norm.g"), g.f32("norm.b"));
    g.check(
        "kernel",
        "layernorm",
        &k::layernorm(&x, &gain, Some(&bias), 1e-5).unwrap(),
    );
    g.check(
        "kernel",
        "layernorm_nobias",
        &k::layernorm(&x, &gain, None, 1e-5).unwrap(),
    );
    g.check("kernel", "rmsnorm", &k::rmsnorm(&x, &gain, 1e-5).unwrap());
    let n = gain.len();
    let decl = format!(
        "input x : {}\nparam s : f32[{n}]\nparam b : f32[{n}]",
        ty(&x)
    );
    let leaves = [
        ("x", Tensor::F32(x)),
        ("s", Tensor::F32(gain)),
        ("b", Tensor::F32(bias)),
    ];
    for (key, body) in [
        ("layernorm", "y = layernorm(x, s, b, eps=1e-5)"),
        ("layernorm_nobias", "y = layernorm(x, s, eps=1e-5) + 0 * b"),
        ("rmsnorm", "y = rmsnorm(x, s, eps=1e-5) + 0 * b"),
    ] {
        g.check("program", key, &run_program(&decl, body, &leaves));
    }
}

#[test]
fn reductions_with_inf_and_nan() {
    let mut g = Golden::open();
    for name in ["red", "redw"] {
        let x = g.f32(&format!("{name}.x"));
        let cases = [
            ("sum", ReduceOp::Sum, 1),
            ("mean", ReduceOp::Mean, 1),
            ("max", ReduceOp::Max, 1),
            ("sum0", ReduceOp::Sum, 0),
            ("max0", ReduceOp::Max, 0),
        ];
        for (key, op, axis) in cases {
            let key = format!("{name}.{key}");
            g.check("kernel", &key, &k::reduce_f32(op, &x, axis, false).unwrap());
            let decl = format!("input x : {}", ty(&x));
            let body = format!("y = {}(x, axis={axis})", op.name());
            let y = run_program(&decl, &body, &[("x", Tensor::F32(x.clone()))]);
            g.check("program", &key, &y);
        }
    }
}

#[test]
fn matmul_large_k() {
    let mut g = Golden::open();
    for i in 0..2 {
        let key = format!("mm{i}");
        let (a, b) = (g.f32(&format!("{key}.a")), g.f32(&format!("{key}.b")));
        g.check("kernel", &key, &k::matmul(&a, &b).unwrap());
        let decl = format!("input a : {}\nparam b : {}", ty(&a), ty(&b));
        let leaves = [("a", Tensor::F32(a)), ("b", Tensor::F32(b))];
        g.check("program", &key, &run_program(&decl, "y = a @ b", &leaves));
    }
}
