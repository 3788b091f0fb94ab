//! Every op's VJP against central finite differences: each program's gradient (run by the
//! reference interpreter on the differentiated program) is compared with the directional
//! derivative of its loss along a random direction per param.
//!
//! The loss is evaluated in f32, so the difference quotient uses Richardson extrapolation of
//! two central differences (error O(h⁴)) with h = 1e-2 along a direction of unit RMS entries:
//! truncation ≈ 1e-8, f32 roundoff of the loss (≈ 1e-7 of its magnitude) over 2h ≈ 1e-5 of
//! it. The tolerance, 2e-3 of the derivative plus 1e-4 of the loss's magnitude, is 100× that
//! and 100× below what any wrong factor, sign or missing term gives.

use std::collections::BTreeMap;
use tpc::diag::SourceFile;
use tpc::driver::{compile_program, Compiled};
use tpc::exec::leaves::{global_leaves, LeafSource};
use tpc::exec::{reference, Tensor};

/// Compiles `text`'s training step; panics with the rendered error.
fn compile(text: &str) -> Compiled {
    let src = SourceFile::new("t.tpl", text);
    compile_program(&src, &[], false).unwrap_or_else(|e| panic!("{}", e.render(Some(&src))))
}

/// A deterministic direction with entries in [-√3, √3] (unit mean square).
fn direction(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let u = (s >> 40) as f32 / (1u64 << 24) as f32;
            (2.0 * u - 1.0) * 3f32.sqrt()
        })
        .collect()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.as_f32().expect("f32").iter().copied().collect()
}

/// The loss with param `name` moved by `h·dir`.
fn loss_at(
    c: &Compiled,
    leaves: &BTreeMap<String, Tensor>,
    name: &str,
    dir: &[f32],
    h: f32,
) -> f64 {
    let mut moved = leaves.clone();
    let Some(Tensor::F32(p)) = moved.get_mut(name) else {
        panic!("{name} is not an f32 param")
    };
    for (x, d) in p.iter_mut().zip(dir) {
        *x += h * d;
    }
    let out = reference::run(&c.graph, &moved, &moved).expect("runs");
    f64::from(f32s(&out[c.loss.as_ref().expect("trains")])[0])
}

/// Checks every trained param's gradient of `text` against finite differences; returns the
/// names checked.
fn check(text: &str) -> Vec<String> {
    check_with(text, 1e-2)
}

fn check_with(text: &str, h: f32) -> Vec<String> {
    let c = compile(text);
    let leaves = global_leaves(&c.graph, &LeafSource::Seed(11)).expect("leaves");
    let out = reference::run(&c.graph, &leaves, &leaves).expect("runs");
    let loss = f64::from(f32s(&out[c.loss.as_ref().expect("trains")])[0]);
    for (i, (param, grad)) in c.grads.iter().enumerate() {
        let g = f32s(&out[grad]);
        let dir = direction(g.len(), i as u64 + 1);
        let analytic: f64 = g.iter().zip(&dir).map(|(a, b)| f64::from(a * b)).sum();
        let d = |h: f32| {
            (loss_at(&c, &leaves, param, &dir, h) - loss_at(&c, &leaves, param, &dir, -h))
                / (2.0 * f64::from(h))
        };
        let numeric = (4.0 * d(h / 2.0) - d(h)) / 3.0;
        let tol = 2e-3 * analytic.abs() + 1e-4 * loss.abs().max(1.0);
        assert!(
            (analytic - numeric).abs() <= tol,
            "{param}: analytic {analytic} vs numeric {numeric} (tolerance {tol})\n{text}"
        );
    }
    c.grads.iter().map(|(p, _)| p.clone()).collect()
}

#[test]
fn matmul_with_a_batched_activation_and_a_bias() {
    let names = check(
        "input x : f32[2, 3, 4]
param w : f32[4, 5]
param b : f32[5]
y = x @ w + b
per = mean(sum(y * y, 2), 1)
loss = sum(per, 0)
train loss with sgd(lr=0.1)
",
    );
    assert_eq!(names, ["w", "b"]);
}

#[test]
fn matmul_promotes_and_broadcasts() {
    check(
        "param v : f32[4]
param m : f32[4, 3]
param a : f32[2, 3, 4]
param c : f32[4, 5]
param u : f32[3]
y1 = v @ m
y2 = a @ c
y3 = m @ u
y4 = a @ transpose(a, [0, 2, 1])
loss = sum(y1 * y1, 0) + sum(sum(sum(y2, 2), 1), 0) + sum(y3 * y3, 0) + mean(mean(mean(y4, 2), 1), 0)
train loss with sgd(lr=0.1)
",
    );
}

#[test]
fn batched_matmul_broadcasts_a_weight_over_the_batch() {
    check(
        "param q : f32[2, 3, 4, 5]
param k : f32[3, 5, 4]
s = q @ k
loss = sum(sum(sum(sum(s * s, 3), 2), 1), 0)
train loss with sgd(lr=0.1)
",
    );
}

#[test]
fn elementwise_binaries_with_broadcasting() {
    check(
        "param a : f32[3, 4]
param b : f32[4]
param c : f32[3, 1]
param d : f32[3, 4]
x = a * b + c - d / (c * c + 2.0)
y = maximum(a, d) + maximum(b, c)
loss = sum(sum(x * y, 1), 0)
train loss with sgd(lr=0.1)
",
    );
}

#[test]
fn scalar_ops_on_both_sides() {
    check(
        "param a : f32[3, 4]
x = (a + 1.5) * 2.0 - 0.5
y = 3.0 - x / 4.0
z = 2.0 / (a * a + 1.0)
loss = sum(sum(x * y + z, 1), 0)
train loss with sgd(lr=0.1)
",
    );
}

#[test]
fn every_unary_function() {
    check(
        "param a : f32[4, 6]
p = a * a + 0.5
x = gelu(a) + relu(a) + silu(a) + tanh(a) + exp(a) + neg(a)
y = log(p) + sqrt(p) + rsqrt(p) + recip(p)
loss = sum(sum(x * y, 1), 0)
train loss with sgd(lr=0.1)
",
    );
}

#[test]
fn softmax_on_each_axis_and_the_norms() {
    check(
        "param a : f32[3, 5]
param g : f32[5]
param b : f32[5]
s0 = softmax(a, 0)
s1 = softmax(a)
l = layernorm(a * 3.0, g, b)
ln = layernorm(a, g)
r = rmsnorm(a, g)
loss = sum(sum((s0 + s1 + r) * l + ln * ln, 1), 0)
train loss with sgd(lr=0.1)
",
    );
}

#[test]
fn reductions_with_and_without_kept_dims() {
    check(
        "param a : f32[3, 4, 5]
x = sum(a, 1) + mean(a, 1) + max(a, 1)
y = sum(a, 2, keepdims=true) * mean(a, 0, keepdims=true) + max(a, 2, keepdims=true)
loss = sum(sum(x * x, 1), 0) + sum(sum(sum(y * y, 2), 1), 0)
train loss with sgd(lr=0.1)
",
    );
}

#[test]
fn layout_ops() {
    check(
        "param a : f32[2, 3, 4]
param b : f32[2, 3, 2]
t = transpose(a, [2, 0, 1])
r = reshape(a, [6, 4])
p, q = split(a, [1, 3], axis=2)
c = concat([a, b], 2)
s = slice(a, 1, 1, 3)
loss = sum(sum(sum(t * t, 2), 1), 0) + sum(sum(r * r * r, 1), 0) + sum(sum(sum(q, 2), 1), 0) + sum(sum(sum(c * c, 2), 1), 0) + sum(sum(sum(s * s, 2), 1), 0)
train loss with sgd(lr=0.1)
",
    );
}

#[test]
fn a_split_piece_without_a_use_gets_zero_gradient() {
    check(
        "param a : f32[4, 6]
x, y, z = split(a, 3, axis=1)
loss = sum(sum(y * y, 1), 0)
train loss with sgd(lr=0.1)
",
    );
}

#[test]
fn embedding_cross_entropy_and_the_causal_mask() {
    let names = check(
        "input tokens : i32[2, 4]
input labels : i32[2, 4]
param wte : f32[11, 6]
param wq : f32[6, 6]
h = embedding(tokens, wte)
q = h @ wq
att = softmax(causal_mask(q @ transpose(h, [0, 2, 1])))
o = att @ h
logits = o @ transpose(wte)
loss = cross_entropy(logits, labels)
train loss with adamw(lr=0.001)
",
    );
    assert_eq!(names, ["wte", "wq"]);
}

#[test]
fn frozen_and_unused_params_get_no_gradient() {
    let c = compile(
        "input x : f32[2, 4]
param w : f32[4, 4]
param f : f32[4, 4] frozen
param unused : f32[3]
y = (x @ w) @ f
loss = sum(sum(y * y, 1), 0)
train loss with sgd(lr=0.1)
",
    );
    let names: Vec<&str> = c.grads.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(names, ["w"]);
    assert_eq!(
        c.warnings,
        ["param `unused` does not affect the loss; it is not trained"]
    );
}

/// The gpt example with a `train` statement: repeated layers (backward built per instance),
/// the tied table used twice (embedding and LM head), every op of a transformer.
#[test]
fn gpt_with_repeated_layers_and_a_tied_table() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gpt.tpl"))
        .expect("example")
        .replace(
            "dim B = 2, S = 16, H = 64, NH = 8, L = 2, V = 4096",
            "dim B = 2, S = 4, H = 16, NH = 2, L = 2, V = 32",
        )
        + "train loss with adamw(lr=0.001)\n";
    let names = check(&text);
    assert_eq!(names.len(), 4 + 2 * 16);
}

/// `where(c, a, b)` sends the cotangent to the branch chosen, elementwise and unbroadcast (`b`
/// is a scalar), and none to the condition: half of `a`'s elements are chosen (`relu(c)` is
/// non-zero where the input is positive), the rest take `b`.
#[test]
fn where_sends_the_cotangent_to_the_branch_chosen() {
    let names = check(
        "input c : f32[4, 6]
param a : f32[4, 6]
param b : f32[]
y = where(relu(c), a, b)
loss = mean(sum(y * y * a, 1), 0)
train loss with sgd(lr=0.1)
",
    );
    assert_eq!(names, ["a", "b"]);
}

/// `nonfinite(x)` is piecewise constant (0 on finite values): no cotangent flows through it,
/// so a condition made from a param leaves that param's gradient to the branches.
#[test]
fn nonfinite_has_a_zero_derivative() {
    let names = check(
        "param a : f32[3, 5]
param b : f32[3, 5]
y = where(nonfinite(a), b, a) + nonfinite(b)
loss = mean(sum(y * y, 1), 0)
train loss with sgd(lr=0.1)
",
    );
    assert_eq!(names, ["a", "b"]);
}
