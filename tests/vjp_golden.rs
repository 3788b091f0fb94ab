//! Every op's VJP against an outside oracle in f64: `jax.grad` in float64, stored in
//! `tests/golden/vjp.npz` by `tests/golden/make_vjp.py` (see its header to regenerate and for
//! what each case covers). Each case below is the script's function written in `.tpl`; tpc
//! compiles its training step (`compile_program`), the reference interpreter runs the forward
//! and backward in f32 on the stored f32 params and inputs, and each param's gradient is
//! compared with JAX's float64 gradient of the same function at the same (f32-representable)
//! point, so the only differences are tpc's f32 rounding and any error in its VJPs.
//!
//! Tolerance, per param: `‖g − g64‖₂ ≤ RTOL · max(‖g64‖₂, FLOOR)`, with `RTOL = 1e-4`.
//! f32's unit roundoff is u = 2⁻²⁴ ≈ 6e-8. A gradient element here is the end of a chain of at
//! most ~40 rounded operations (forward and backward, sums over ≤ 16 terms; the composite
//! `attention` case is the longest), each contributing ≤ u relative error amplified by the
//! chain's conditioning (≤ ~10 for these well-scaled inputs: no near-cancelling sums, divisors
//! and square roots kept away from 0): 40·10·u ≈ 2.4e-5 as a worst-case bound; measured errors
//! are 2e-8 to 4e-7 (printed by each test with `--nocapture`; the composite `attention` case is
//! the largest). `RTOL` = 1e-4 sits above that bound (250× the largest measured error), and
//! 100× below the 1e-2 relative error of a 1% wrong factor: every comparison also
//! asserts that the gradient scaled by 1.01 would fail. A wrong sign, a missing term, a
//! transposed or wrongly unbroadcast cotangent gives O(1) relative error. `FLOOR` (1e-6) only
//! guards against a zero golden norm; every golden gradient is O(0.1–100), checked by the 1.01
//! sanity assertion. The loss itself is checked the same way.
//!
//! `cast` through bf16/f16 is the one op whose VJP is not the derivative of an f64 function:
//! as in JAX, the cotangent is converted back to the operand's dtype, i.e. rounded to bf16/f16
//! on its way back through the narrow value. The f64 oracle rounds its f64 cotangent the same
//! way, so both sides agree exactly unless a cotangent lies within f32 rounding of a bf16
//! rounding boundary (not the case for the stored data).

use ndarray::{ArrayD, IxDyn, OwnedRepr};
use ndarray_npy::NpzReader;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use tpc::diag::SourceFile;
use tpc::driver::{compile_program, Compiled};
use tpc::exec::{reference, Tensor};
use tpc::ir::Op;

const RTOL: f64 = 1e-4;
const FLOOR: f64 = 1e-6;

/// The golden archive.
struct Golden {
    npz: NpzReader<File>,
    names: Vec<String>,
}

impl Golden {
    fn open() -> Golden {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/vjp.npz");
        let file = File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let mut npz = NpzReader::new(file).unwrap_or_else(|e| panic!("{path}: {e}"));
        let names = npz.names().unwrap_or_else(|e| panic!("{path}: {e}"));
        Golden { npz, names }
    }

    /// The names under `prefix` (`CASE/param/`), without it.
    fn under(&self, prefix: &str) -> Vec<String> {
        self.names
            .iter()
            .filter_map(|n| n.strip_prefix(prefix).map(str::to_string))
            .collect()
    }

    fn f32(&mut self, key: &str) -> Option<ArrayD<f32>> {
        self.npz.by_name::<OwnedRepr<f32>, IxDyn>(key).ok()
    }

    fn i32(&mut self, key: &str) -> Option<ArrayD<i32>> {
        self.npz.by_name::<OwnedRepr<i32>, IxDyn>(key).ok()
    }

    fn f64(&mut self, key: &str) -> ArrayD<f64> {
        let r = self.npz.by_name::<OwnedRepr<f64>, IxDyn>(key);
        r.unwrap_or_else(|e| panic!("vjp.npz[{key}]: {e}"))
    }

    /// The case's params and inputs, by name (f32 or i32 as stored).
    fn leaves(&mut self, case: &str) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for kind in ["param", "input"] {
            for name in self.under(&format!("{case}/{kind}/")) {
                let key = format!("{case}/{kind}/{name}");
                let t = match self.f32(&key) {
                    Some(a) => Tensor::from(a),
                    None => Tensor::from(
                        self.i32(&key)
                            .unwrap_or_else(|| panic!("vjp.npz[{key}]: neither f32 nor i32")),
                    ),
                };
                out.insert(name, t);
            }
        }
        out
    }
}

/// Expands `HEAD(y, r, k)` (y and r names, k the rank) into `sum(y * (r + y))` over all k
/// dims: the loss term of the golden script's `head`.
fn expand(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("HEAD(") {
        out.push_str(&rest[..at]);
        let close = rest[at..].find(')').expect("HEAD(...)") + at;
        let args: Vec<&str> = rest[at + 5..close].split(',').map(str::trim).collect();
        let [y, r, k] = args[..] else {
            panic!("HEAD takes 3 arguments: {}", &rest[at..=close])
        };
        let rank: usize = k.parse().expect("HEAD rank");
        let mut e = format!("{y} * ({r} + {y})");
        for axis in (0..rank).rev() {
            e = format!("sum({e}, {axis})");
        }
        out.push_str(&e);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out + "train loss with sgd(lr=0.1)\n"
}

/// Compiles `text` (its training step, or only its forward); panics with the rendered error.
fn compile(text: &str, forward_only: bool) -> Compiled {
    let src = SourceFile::new("t.tpl", text);
    compile_program(&src, &[], forward_only)
        .unwrap_or_else(|e| panic!("{}\n{text}", e.render(Some(&src))))
}

/// `‖got − want‖₂` and `‖want‖₂`, in f64.
fn norms(got: impl Iterator<Item = f64>, want: &ArrayD<f64>) -> (f64, f64) {
    let (mut d, mut w) = (0.0, 0.0);
    for (g, &x) in got.zip(want.iter()) {
        d += (g - x) * (g - x);
        w += x * x;
    }
    (d.sqrt(), w.sqrt())
}

/// Checks `got` against `want` (see the module doc); returns the relative error.
fn compare(what: &str, got: &[f64], want: &ArrayD<f64>) -> f64 {
    let (err, norm) = norms(got.iter().copied(), want);
    let tol = RTOL * norm.max(FLOOR);
    assert!(
        err <= tol,
        "{what}: ‖g − g64‖ = {err:e} > {tol:e} (‖g64‖ = {norm:e}, relative {:e})\n\
         got  {got:?}\nwant {:?}",
        err / norm,
        want.iter().collect::<Vec<_>>()
    );
    let (scaled, _) = norms(got.iter().map(|g| 1.01 * g), want);
    assert!(
        scaled > tol,
        "{what}: the tolerance {tol:e} would pass a 1% error ({scaled:e})"
    );
    err / norm
}

/// Runs `case`'s program on its golden params and inputs and checks the loss and every
/// gradient against the f64 oracle; prints the worst relative error.
fn check(case: &str, text: &str) {
    let text = expand(text);
    let c = compile(&text, false);
    let mut g = Golden::open();
    let leaves = g.leaves(case);
    assert!(!leaves.is_empty(), "no golden data for case {case}");
    let out = reference::run(&c.graph, &leaves, &leaves)
        .unwrap_or_else(|e| panic!("{case}: run: {e}\n{text}"));
    let f64s = |t: &Tensor| -> Vec<f64> {
        let a = t.as_f32().expect("f32 output");
        a.iter().map(|&x| f64::from(x)).collect()
    };
    let loss = f64s(&out[c.loss.as_ref().expect("trains")]);
    let mut worst = compare(
        &format!("{case}/loss"),
        &loss,
        &g.f64(&format!("{case}/loss")),
    );
    let trained: BTreeSet<&str> = c.grads.iter().map(|(p, _)| p.as_str()).collect();
    let golden = g.under(&format!("{case}/grad/"));
    let golden: BTreeSet<&str> = golden.iter().map(String::as_str).collect();
    assert_eq!(
        trained, golden,
        "{case}: trained params vs golden gradients"
    );
    let mut line = Vec::new();
    for (param, grad) in &c.grads {
        let what = format!("{case}/grad/{param}");
        let want = g.f64(&what);
        let got = &out[grad];
        let shape = got.as_f32().expect("f32 gradient").shape().to_vec();
        assert_eq!(shape, want.shape(), "{what}: shape");
        let rel = compare(&what, &f64s(got), &want);
        line.push(format!("{param} {rel:.1e}"));
        worst = worst.max(rel);
    }
    println!(
        "{case}: worst relative error {worst:.2e} ({})",
        line.join(", ")
    );
}

macro_rules! cases {
    ($($name:ident: $text:expr;)*) => {
        /// Every case, by name (the golden archive's top-level keys).
        const CASES: &[(&str, &str)] = &[$((stringify!($name), $text)),*];
        $(
            #[test]
            fn $name() {
                check(stringify!($name), $text);
            }
        )*
    };
}

cases! {
    matmul_2d: "
param a : f32[3, 4]
param w : f32[4, 5]
input r : f32[3, 5]
y = a @ w
loss = HEAD(y, r, 2)
";
    matmul_vec: "
param v : f32[4]
param m : f32[4, 3]
param u : f32[3]
input r1 : f32[3]
input r2 : f32[4]
y1 = v @ m
y2 = m @ u
loss = HEAD(y1, r1, 1) + HEAD(y2, r2, 1)
";
    matmul_3d_2d: "
param a : f32[2, 3, 4]
param w : f32[4, 5]
param b : f32[5]
input r : f32[2, 3, 5]
y = a @ w + b
loss = HEAD(y, r, 3)
";
    matmul_4d_4d: "
param q : f32[2, 3, 4, 5]
param k : f32[2, 3, 5, 4]
input r : f32[2, 3, 4, 4]
y = q @ k
loss = HEAD(y, r, 4)
";
    matmul_4d_3d: "
param q : f32[2, 3, 4, 5]
param k : f32[3, 5, 2]
input r : f32[2, 3, 4, 2]
y = q @ k
loss = HEAD(y, r, 4)
";
    add: "
param a : f32[3, 4]
param b : f32[4]
param c : f32[3, 1]
param d : f32[3, 4]
input r1 : f32[3, 4]
input r2 : f32[3, 4]
y1 = a + b + c
y2 = b + d
loss = HEAD(y1, r1, 2) + HEAD(y2, r2, 2)
";
    sub: "
param a : f32[3, 4]
param b : f32[4]
param c : f32[3, 1]
param d : f32[3, 4]
input r1 : f32[3, 4]
input r2 : f32[3, 4]
y1 = a - b - c
y2 = b - d
loss = HEAD(y1, r1, 2) + HEAD(y2, r2, 2)
";
    mul: "
param a : f32[3, 4]
param b : f32[4]
param c : f32[3, 1]
param d : f32[3, 4]
input r1 : f32[3, 4]
input r2 : f32[3, 4]
y1 = a * b * c
y2 = b * d
loss = HEAD(y1, r1, 2) + HEAD(y2, r2, 2)
";
    div: "
param a : f32[3, 4]
param b : f32[4]
param c : f32[3, 1]
param d : f32[3, 4]
input r1 : f32[3, 4]
input r2 : f32[3, 4]
y1 = a / b / c
y2 = b / d
loss = HEAD(y1, r1, 2) + HEAD(y2, r2, 2)
";
    maximum: "
param a : f32[3, 4]
param b : f32[4]
param c : f32[3, 1]
param d : f32[3, 4]
input r1 : f32[3, 4]
input r2 : f32[3, 4]
y1 = maximum(maximum(a, b), c)
y2 = max(b, d)
loss = HEAD(y1, r1, 2) + HEAD(y2, r2, 2)
";
    unary: "
param x_gelu : f32[4, 6]
param x_relu : f32[4, 6]
param x_silu : f32[4, 6]
param x_tanh : f32[4, 6]
param x_exp : f32[4, 6]
param x_neg : f32[4, 6]
param x_minus : f32[4, 6]
param x_log : f32[4, 6]
param x_sqrt : f32[4, 6]
param x_rsqrt : f32[4, 6]
param x_recip : f32[4, 6]
input r_gelu : f32[4, 6]
input r_relu : f32[4, 6]
input r_silu : f32[4, 6]
input r_tanh : f32[4, 6]
input r_exp : f32[4, 6]
input r_neg : f32[4, 6]
input r_minus : f32[4, 6]
input r_log : f32[4, 6]
input r_sqrt : f32[4, 6]
input r_rsqrt : f32[4, 6]
input r_recip : f32[4, 6]
y_gelu = gelu(x_gelu)
y_relu = relu(x_relu)
y_silu = silu(x_silu)
y_tanh = tanh(x_tanh)
y_exp = exp(x_exp)
y_neg = neg(x_neg)
y_minus = -x_minus
y_log = log(x_log)
y_sqrt = sqrt(x_sqrt)
y_rsqrt = rsqrt(x_rsqrt)
y_recip = recip(x_recip)
loss = HEAD(y_gelu, r_gelu, 2) + HEAD(y_relu, r_relu, 2) + HEAD(y_silu, r_silu, 2)
  + HEAD(y_tanh, r_tanh, 2) + HEAD(y_exp, r_exp, 2) + HEAD(y_neg, r_neg, 2)
  + HEAD(y_minus, r_minus, 2) + HEAD(y_log, r_log, 2) + HEAD(y_sqrt, r_sqrt, 2)
  + HEAD(y_rsqrt, r_rsqrt, 2) + HEAD(y_recip, r_recip, 2)
";
    scalar: "
param x_mul : f32[3, 4]
param x_lmul : f32[3, 4]
param x_scale : f32[3, 4]
param x_add : f32[3, 4]
param x_ladd : f32[3, 4]
param x_sub : f32[3, 4]
param x_rsub : f32[3, 4]
param x_div : f32[3, 4]
param x_rdiv : f32[3, 4]
input r_mul : f32[3, 4]
input r_lmul : f32[3, 4]
input r_scale : f32[3, 4]
input r_add : f32[3, 4]
input r_ladd : f32[3, 4]
input r_sub : f32[3, 4]
input r_rsub : f32[3, 4]
input r_div : f32[3, 4]
input r_rdiv : f32[3, 4]
y_mul = x_mul * 0.5
y_lmul = 2.5 * x_lmul
y_scale = scale(x_scale, 0.25)
y_add = x_add + 1.5
y_ladd = 1.5 + x_ladd
y_sub = x_sub - 0.25
y_rsub = 1.0 - x_rsub
y_div = x_div / 3.0
y_rdiv = 2.0 / x_rdiv
loss = HEAD(y_mul, r_mul, 2) + HEAD(y_lmul, r_lmul, 2) + HEAD(y_scale, r_scale, 2)
  + HEAD(y_add, r_add, 2) + HEAD(y_ladd, r_ladd, 2) + HEAD(y_sub, r_sub, 2)
  + HEAD(y_rsub, r_rsub, 2) + HEAD(y_div, r_div, 2) + HEAD(y_rdiv, r_rdiv, 2)
";
    reduce_sum: "
param a : f32[3, 4, 5]
input r0 : f32[4, 5]
input r1 : f32[3, 5]
input r2 : f32[3, 4, 1]
y0 = sum(a, 0)
y1 = sum(a, 1)
y2 = sum(a, 2, keepdims=true)
loss = HEAD(y0, r0, 2) + HEAD(y1, r1, 2) + HEAD(y2, r2, 3)
";
    reduce_mean: "
param a : f32[3, 4, 5]
input r0 : f32[4, 5]
input r1 : f32[3, 5]
input r2 : f32[3, 4, 1]
y0 = mean(a, 0)
y1 = mean(a, 1)
y2 = mean(a, 2, keepdims=true)
loss = HEAD(y0, r0, 2) + HEAD(y1, r1, 2) + HEAD(y2, r2, 3)
";
    reduce_max: "
param a : f32[3, 4, 5]
input r0 : f32[4, 5]
input r1 : f32[3, 5]
input r2 : f32[3, 4, 1]
y0 = max(a, 0)
y1 = max(a, 1)
y2 = max(a, 2, keepdims=true)
loss = HEAD(y0, r0, 2) + HEAD(y1, r1, 2) + HEAD(y2, r2, 3)
";
    softmax: "
param a : f32[3, 5]
param b : f32[2, 3, 4]
input r1 : f32[3, 5]
input r2 : f32[3, 5]
input r3 : f32[2, 3, 4]
y1 = softmax(a)
y2 = softmax(a, 0)
y3 = softmax(b, axis=1)
loss = HEAD(y1, r1, 2) + HEAD(y2, r2, 2) + HEAD(y3, r3, 3)
";
    layernorm: "
param x : f32[2, 3, 8]
param g : f32[8]
param b : f32[8]
param x2 : f32[2, 3, 8]
param g2 : f32[8]
param x3 : f32[3, 8]
param g3 : f32[8]
param b3 : f32[8]
input r1 : f32[2, 3, 8]
input r2 : f32[2, 3, 8]
input r3 : f32[3, 8]
y1 = layernorm(x, g, b)
y2 = layernorm(x2, g2)
y3 = layernorm(x3, g3, b3, eps=0.1)
loss = HEAD(y1, r1, 3) + HEAD(y2, r2, 3) + HEAD(y3, r3, 2)
";
    rmsnorm: "
param x : f32[2, 3, 8]
param g : f32[8]
param x2 : f32[3, 8]
param g2 : f32[8]
input r1 : f32[2, 3, 8]
input r2 : f32[3, 8]
y1 = rmsnorm(x, g)
y2 = rmsnorm(x2, g2, eps=0.05)
loss = HEAD(y1, r1, 3) + HEAD(y2, r2, 2)
";
    reshape: "
param a : f32[2, 3, 4]
input r1 : f32[6, 4]
input r2 : f32[4, 6]
input r3 : f32[24]
y1 = reshape(a, [6, 4])
y2 = reshape(a, [4, 6])
y3 = reshape(a, [24])
loss = HEAD(y1, r1, 2) + HEAD(y2, r2, 2) + HEAD(y3, r3, 1)
";
    transpose: "
param a : f32[2, 3, 4]
param m : f32[3, 5]
input r1 : f32[2, 4, 3]
input r2 : f32[4, 2, 3]
input r3 : f32[5, 3]
y1 = transpose(a)
y2 = transpose(a, [2, 0, 1])
y3 = transpose(m)
loss = HEAD(y1, r1, 3) + HEAD(y2, r2, 3) + HEAD(y3, r3, 2)
";
    split: "
param a : f32[2, 6]
param b : f32[4, 3]
input r1 : f32[2, 2]
input r3 : f32[2, 2]
input ru : f32[1, 3]
input rv : f32[3, 3]
p, q, s = split(a, 3, axis=1)
u, v = split(b, [1, 3], axis=0)
loss = HEAD(p, r1, 2) + HEAD(s, r3, 2) + HEAD(u, ru, 2) + HEAD(v, rv, 2)
";
    concat: "
param a : f32[2, 3]
param b : f32[2, 2]
param c : f32[1, 3]
input r1 : f32[2, 5]
input r2 : f32[3, 3]
y1 = concat([a, b], 1)
y2 = concat([a, c], 0)
loss = HEAD(y1, r1, 2) + HEAD(y2, r2, 2)
";
    slice: "
param a : f32[4, 5]
input r1 : f32[4, 3]
input r2 : f32[2, 5]
input r3 : f32[2, 5]
y1 = slice(a, 1, 1, 4)
y2 = slice(a, 0, 0, 2)
y3 = slice(a, 0, 2, 4)
loss = HEAD(y1, r1, 2) + HEAD(y2, r2, 2) + HEAD(y3, r3, 2)
";
    embedding: "
input ids : i32[2, 5]
param wte : f32[7, 4]
input r : f32[2, 5, 4]
y = embedding(ids, wte)
loss = HEAD(y, r, 3)
";
    causal_mask: "
param a : f32[2, 4, 4]
param b : f32[3, 5]
input r1 : f32[2, 4, 4]
input r2 : f32[3, 5]
y1 = softmax(causal_mask(a))
y2 = softmax(causal_mask(b))
loss = HEAD(y1, r1, 3) + HEAD(y2, r2, 2)
";
    cross_entropy: "
param z : f32[2, 3, 7]
param x : f32[4, 5]
param w : f32[5, 7]
input labels : i32[2, 3]
input labels2 : i32[4]
c2 = cross_entropy(x @ w, labels2)
loss = cross_entropy(z, labels) + c2 * c2
";
    cast: "
param a : f32[3, 8]
param b : f32[3, 8]
input r1 : f32[3, 8]
input r2 : f32[3, 8]
y1 = cast(cast(a, bf16), f32)
y2 = cast(cast(b, f16), f32)
loss = HEAD(y1, r1, 2) + HEAD(y2, r2, 2)
";
    attention: "
dim B = 2, S = 4, H = 8, NH = 2, D = H / NH, V = 11
input tokens : i32[B, S]
input labels : i32[B, S]
param wte : f32[V, H]
param ln_g : f32[H]
param ln_b : f32[H]
param wq : f32[H, H]
param wk : f32[H, H]
param wv : f32[H, H]
param rms_g : f32[H]
param w1 : f32[H, 2 * H]
param b1 : f32[2 * H]
param w2 : f32[2 * H, H]
h = embedding(tokens, wte)
n = layernorm(h, ln_g, ln_b)
q = transpose(reshape(n @ wq, [B, S, NH, D]), [0, 2, 1, 3])
k = transpose(reshape(n @ wk, [B, S, NH, D]), [0, 2, 1, 3])
v = transpose(reshape(n @ wv, [B, S, NH, D]), [0, 2, 1, 3])
att = softmax(causal_mask(q @ transpose(k) * 0.5))
o = reshape(transpose(att @ v, [0, 2, 1, 3]), [B, S, H])
h2 = h + o
m = gelu(rmsnorm(h2, rms_g) @ w1 + b1) @ w2
logits = (h2 + m) @ transpose(wte)
loss = cross_entropy(logits, labels)
";
}

/// The archive and the cases agree: every golden case has a test and every test its data.
#[test]
fn every_golden_case_has_a_test() {
    let g = Golden::open();
    let golden: BTreeSet<&str> = g
        .names
        .iter()
        .map(|n| n.split('/').next().expect("a case"))
        .collect();
    let tested: BTreeSet<&str> = CASES.iter().map(|(n, _)| *n).collect();
    assert_eq!(golden, tested);
}

/// The cases together exercise every op of the language that has a VJP (the forward
/// programs' ops; scalar ops by operation and side).
#[test]
fn the_cases_cover_every_differentiable_op() {
    let mut seen = BTreeSet::new();
    for (_, text) in CASES {
        let c = compile(&expand(text), true);
        for (_, node) in c.graph.nodes() {
            seen.insert(match &node.op {
                Op::Scalar { op, scalar_lhs, .. } => {
                    let side = if *scalar_lhs { "lhs" } else { "rhs" };
                    format!("scalar {} {side}", op.name())
                }
                op => op.name().to_string(),
            });
        }
    }
    let every = [
        "matmul",
        "add",
        "sub",
        "mul",
        "div",
        "maximum",
        "scalar add lhs",
        "scalar add rhs",
        "scalar sub lhs",
        "scalar sub rhs",
        "scalar mul lhs",
        "scalar mul rhs",
        "scalar div lhs",
        "scalar div rhs",
        "gelu",
        "relu",
        "silu",
        "tanh",
        "exp",
        "log",
        "neg",
        "sqrt",
        "rsqrt",
        "recip",
        "softmax",
        "layernorm",
        "rmsnorm",
        "sum",
        "mean",
        "max",
        "transpose",
        "reshape",
        "split",
        "concat",
        "slice",
        "embedding",
        "cross_entropy",
        "causal_mask",
        "cast",
    ];
    let missing: Vec<&str> = every
        .iter()
        .copied()
        .filter(|op| !seen.contains(*op))
        .collect();
    assert!(
        missing.is_empty(),
        "ops without a golden VJP case: {missing:?}"
    );
}
