//! The optimizer's update inside the step: one step of SGD (with and without momentum) and
//! AdamW computed by the program equals the formulas applied to the step's own gradients, on
//! the reference and sharded; the optimizer state is laid out as its param.

mod prop_support;

use prop_support::{check_plan, mesh};
use std::collections::BTreeMap;
use tpc::diag::SourceFile;
use tpc::driver::{compile_step, plan_declared, Compiled};
use tpc::exec::leaves::{global_leaves, LeafSource};
use tpc::exec::{reference, Tensor};
use tpc::mesh::Device;

const MLP: &str = "mesh dp, tp
input x : f32[8, 16] @ [dp, _]
param w1 : f32[16, 32] @ [_, tp]
param b1 : f32[32] @ [tp]
param w2 : f32[32, 16] @ [tp, _]
h = gelu(x @ w1 + b1)
y = h @ w2
loss = mean(mean(y * y, 1), 0)
";

fn compiled(optimizer: &str) -> Compiled {
    let text = format!("{MLP}train loss with {optimizer}\n");
    let src = SourceFile::new("t.tpl", text);
    compile_step(&src, &[], true).unwrap_or_else(|e| panic!("{}", e.render(Some(&src))))
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.as_f32().expect("f32").iter().copied().collect()
}

/// Runs one step on the reference: (leaves, outputs).
fn one_step(c: &Compiled) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    let leaves = global_leaves(&c.graph, &LeafSource::Seed(5)).expect("leaves");
    let out = reference::run(&c.graph, &leaves, &leaves).expect("runs");
    (leaves, out)
}

/// Checks `next(p)` against `f(p, g)` elementwise for every param.
fn check_params(c: &Compiled, f: impl Fn(f32, f32) -> f32) {
    let (leaves, out) = one_step(c);
    for name in ["w1", "b1", "w2"] {
        let p = f32s(&leaves[name]);
        let g = f32s(&out[&format!("grad({name})")]);
        let next = f32s(&out[&format!("next({name})")]);
        for ((p, g), n) in p.iter().zip(&g).zip(&next) {
            let want = f(*p, *g);
            assert!(
                (n - want).abs() <= 1e-6 * want.abs().max(1.0),
                "{name}: {n} vs {want}"
            );
        }
    }
}

#[test]
fn sgd_subtracts_the_scaled_gradient() {
    let c = compiled("sgd(lr=0.5)");
    check_params(&c, |p, g| p - 0.5 * g);
    let carried: Vec<&str> = c.carried.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(carried, ["w1", "b1", "w2"]);
}

#[test]
fn sgd_momentum_starts_from_the_gradient() {
    let c = compiled("sgd(lr=0.5, momentum=0.9)");
    check_params(&c, |p, g| p - 0.5 * g);
    let (_, out) = one_step(&c);
    assert_eq!(f32s(&out["next(sgd.momentum(w1))"]), f32s(&out["grad(w1)"]));
}

/// At step 1 the bias-corrected moments are g and g², so AdamW moves each weight by
/// lr·g/(|g| + eps) after decaying it by lr·wd.
#[test]
fn adamw_first_step_moves_by_the_gradients_sign() {
    let c = compiled("adamw(lr=0.01, weight_decay=0.1)");
    check_params(&c, |p, g| {
        p * (1.0 - 0.01 * 0.1) - 0.01 * g / (g.abs() + 1e-8)
    });
    let (_, out) = one_step(&c);
    assert_eq!(f32s(&out["next(step)"]), [1.0]);
    let g = f32s(&out["grad(w2)"]);
    let m = f32s(&out["next(adamw.m(w2))"]);
    for (m, g) in m.iter().zip(&g) {
        assert!((m - 0.1 * g).abs() <= 1e-7 * g.abs().max(1e-3));
    }
}

/// The whole step (update included) equals the reference on 1-D and 2-D meshes, and the
/// optimizer state is laid out as its param (no collective for it).
#[test]
fn the_step_with_its_update_equals_the_reference_sharded() {
    for opt in ["sgd(lr=0.1, momentum=0.9)", "adamw(lr=0.001)"] {
        for m in ["tp=4", "dp=2,tp=4", "dp=4,tp=2"] {
            let c = compiled(opt);
            let plan = plan_declared(
                c.graph,
                Some(mesh(m)),
                Device::default(),
                &tpc::plan::Options::default(),
            )
            .expect("plans");
            check_plan(&plan).unwrap_or_else(|e| panic!("{opt} on {m}: {e}"));
            let update = &plan.summary.phases["update"].collectives;
            assert!(
                update.values().all(|k| k.count == 0),
                "{opt} on {m}: the update communicates: {update:?}"
            );
        }
    }
}
