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
