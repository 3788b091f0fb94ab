//! Training steps on the ranks (`exec::train`): each rank keeps its blocks of the params and
//! optimizer state from step to step and takes its own blocks of each step's inputs. The run
//! must be bitwise the same as stepping with global arrays (every leaf gathered and re-split
//! between steps) and agree with the unsharded reference.

use std::collections::BTreeMap;
use tpc::diag::SourceFile;
use tpc::driver::{compile_step, plan_declared, Compiled};
use tpc::exec::leaves::{global_leaves, seeded_inputs, LeafSource};
use tpc::exec::spmd::run_threads;
use tpc::exec::train::{step_seed, train_threads, Steps};
use tpc::exec::{reference, Tensor};
use tpc::mesh::{Device, Mesh};
use tpc::plan::Plan;

const MLP: &str = "mesh dp, tp
input x : f32[8, 16] @ [dp, _]
input t : f32[8, 16] @ [dp, _]
param w1 : f32[16, 32] @ [_, tp]
param b1 : f32[32] @ [tp]
param w2 : f32[32, 16] @ [tp, _]
h = gelu(x @ w1 + b1)
y = h @ w2 - t
loss = mean(mean(y * y, 1), 0)
";

const OPTIMIZERS: [&str; 3] = [
    "sgd(lr=0.05)",
    "sgd(lr=0.05, momentum=0.9)",
    "adamw(lr=0.01, weight_decay=0.1)",
];

fn compiled(optimizer: &str, gradients: bool) -> Compiled {
    let text = format!("{MLP}train loss with {optimizer}\n");
    let src = SourceFile::new("t.tpl", text);
    compile_step(&src, &[], gradients).unwrap_or_else(|e| panic!("{}", e.render(Some(&src))))
}

fn planned(c: &mut Compiled, mesh: &str) -> Plan {
    let g = std::mem::take(&mut c.graph);
    plan_declared(
        g,
        Some(Mesh::parse(mesh).unwrap()),
        Device::default(),
        &tpc::plan::Options::default(),
    )
    .expect("plans")
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.as_f32()
        .expect("f32")
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// Global inputs of step `s` from `seed` (step 0's are the seed's own).
fn inputs(plan: &Plan, seed: u64, s: usize) -> BTreeMap<String, Tensor> {
    let seed = if s == 0 { seed } else { step_seed(seed, s) };
    seeded_inputs(&plan.global, seed)
}

/// `n` steps with every leaf as a global array between steps: (losses, final leaves).
fn global_loop(
    c: &Compiled,
    n: usize,
    mut step: impl FnMut(&BTreeMap<String, Tensor>, usize) -> BTreeMap<String, Tensor>,
    start: BTreeMap<String, Tensor>,
) -> (Vec<f32>, BTreeMap<String, Tensor>) {
    let mut leaves = start;
    let mut losses = Vec::new();
    for s in 0..n {
        let mut out = step(&leaves, s);
        losses.push(
            out["loss"]
                .as_f32()
                .unwrap()
                .iter()
                .copied()
                .next()
                .unwrap(),
        );
        for (leaf, next) in &c.carried {
            leaves.insert(leaf.clone(), out.remove(next).expect("carried output"));
        }
    }
    (losses, leaves)
}

#[test]
fn ranks_keep_their_blocks_bitwise_as_a_global_loop() {
    for opt in OPTIMIZERS {
        for mesh in ["dp=2,tp=2", "dp=1,tp=4", "dp=4,tp=1"] {
            let mut c = compiled(opt, false);
            let plan = planned(&mut c, mesh);
            let seed = 11;
            let stepped = BTreeMap::new();
            let spec = Steps {
                count: 5,
                start: &LeafSource::Seed(seed),
                stepped: &stepped,
                reseed: Some(seed),
                carried: &c.carried,
                loss: "loss",
                keep_first: false,
            };
            let trained = train_threads(&plan, &spec, None).expect("trains");
            let start = global_leaves(&plan.global, &LeafSource::Seed(seed)).unwrap();
            let (losses, leaves) = global_loop(
                &c,
                5,
                |leaves, s| {
                    let mut l = leaves.clone();
                    l.extend(inputs(&plan, seed, s));
                    run_threads(&plan, &LeafSource::Arrays(l), 1, None)
                        .expect("runs")
                        .outputs
                },
                start,
            );
            let got: Vec<f32> = trained.losses.iter().map(|l| l.0).collect();
            assert_eq!(got, losses, "{opt} on {mesh}: losses");
            for (leaf, next) in &c.carried {
                assert_eq!(
                    bits(&trained.last[next]),
                    bits(&leaves[leaf]),
                    "{opt} on {mesh}: {leaf} after 5 steps"
                );
            }
        }
    }
}

#[test]
fn stepped_inputs_and_first_gradients_match_the_reference() {
    let mut c = compiled("adamw(lr=0.01)", true);
    let plan = planned(&mut c, "dp=2,tp=2");
    let k = 3;
    let x = ndarray::ArrayD::from_shape_fn(ndarray::IxDyn(&[k, 8, 16]), |i| {
        ((i[0] * 31 + i[1] * 7 + i[2]) % 13) as f32 / 6.0 - 1.0
    });
    let stepped = BTreeMap::from([("x".to_string(), Tensor::F32(x.clone()))]);
    let start = global_leaves(&plan.global, &LeafSource::Seed(2)).unwrap();
    let spec = Steps {
        count: 7,
        start: &LeafSource::Arrays(start.clone()),
        stepped: &stepped,
        reseed: None,
        carried: &c.carried,
        loss: "loss",
        keep_first: true,
    };
    let trained = train_threads(&plan, &spec, None).expect("trains");
    let mut first = BTreeMap::new();
    let (losses, leaves) = global_loop(
        &c,
        7,
        |leaves, s| {
            let mut l = leaves.clone();
            let xs = x.index_axis(ndarray::Axis(0), s % k).to_owned();
            l.insert("x".into(), Tensor::F32(xs));
            let out = reference::run(&plan.global, &l, &l).expect("reference");
            if s == 0 {
                first = out.clone();
            }
            out
        },
        start,
    );
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * b.abs().max(1e-3);
    for (s, (got, want)) in trained.losses.iter().zip(&losses).enumerate() {
        assert!(close(got.0, *want), "step {}: {} vs {want}", s + 1, got.0);
    }
    for (p, g) in &c.grads {
        let (a, b) = (&trained.first[g], &first[g]);
        let (a, b) = (a.as_f32().unwrap(), b.as_f32().unwrap());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * scale, "grad of {p}: {x} vs {y}");
        }
    }
    assert!(
        c.carried
            .iter()
            .all(|(l, _)| !trained.first.contains_key(l)),
        "the first outputs keep only what is not carried"
    );
    for (leaf, next) in c.carried.iter().filter(|(l, _)| l == "w1" || l == "w2") {
        let (a, b) = (&trained.last[next], &leaves[leaf]);
        let (a, b) = (a.as_f32().unwrap(), b.as_f32().unwrap());
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() <= 1e-5 * scale, "{leaf}: {x} vs {y}");
        }
    }
}

/// A loss the step does not output, or a carried output whose layout is not its leaf's (a
/// corrupted link), is refused, not run.
#[test]
fn a_missing_loss_or_a_mislaid_carry_is_an_error() {
    let mut c = compiled("sgd(lr=0.1)", false);
    let plan = planned(&mut c, "dp=2,tp=2");
    let stepped = BTreeMap::new();
    let carried = vec![("w1".to_string(), "next(w2)".to_string())];
    for (loss, carried) in [("nope", &c.carried), ("loss", &carried)] {
        let spec = Steps {
            count: 2,
            start: &LeafSource::Seed(1),
            stepped: &stepped,
            reseed: None,
            carried,
            loss,
            keep_first: false,
        };
        let e = train_threads(&plan, &spec, None).expect_err("refused");
        let text = e.to_string();
        assert!(
            text.contains("no output `nope`") || text.contains("is not laid out as `w1`"),
            "{text}"
        );
    }
}
