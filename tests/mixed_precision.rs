//! 16-bit tensors are computed as such: every result declared bf16/f16 is the f32 kernel's
//! result (f32 accumulation on operands that are already 16-bit values) rounded once to its
//! type. The oracle here is computed outside tpc, in f64 from the rounded inputs, then rounded to
//! the type; an element may differ only when the f64 value lies within the f32 kernel's own
//! rounding error of a rounding boundary of the 16-bit type (counted, and required to be rare).

mod cli_support;

use cli_support::{assert_exit, stdout, tpc};
use ndarray::{Axis, Ix2};
use std::collections::BTreeMap;
use tpc::diag::SourceFile;
use tpc::driver::compile_program;
use tpc::exec::kernels::{round_bf16, round_f16};
use tpc::exec::leaves::{global_leaves, LeafSource};
use tpc::exec::{reference, Tensor};

const M: usize = 8;
const K: usize = 64;
const N: usize = 32;

/// A matmul, a softmax and a layernorm of 16-bit values of dtype `dt`.
fn program(dt: &str) -> String {
    format!(
        "input a : {dt}[{M}, {K}]\nparam w : {dt}[{K}, {N}]\nparam n_g : {dt}[{N}]\n\
         param n_b : {dt}[{N}]\ny = a @ w\ns = softmax(y)\nl = layernorm(y, n_g, n_b)\n\
         output y, s, l\n"
    )
}

/// The reference interpreter's outputs and leaves for `program(dt)`.
fn run(dt: &str) -> (BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    let src = SourceFile::new("mixed.tpl", program(dt));
    let c = compile_program(&src, &[], true).unwrap_or_else(|e| panic!("{}", e.render(None)));
    let leaves = global_leaves(&c.graph, &LeafSource::Seed(3)).unwrap();
    let out = reference::run(&c.graph, &leaves, &leaves).unwrap();
    (out, leaves)
}

fn f64_2d(t: &Tensor) -> ndarray::Array2<f64> {
    let a = t.as_f32().expect("float").mapv(f64::from);
    a.into_dimensionality::<Ix2>().expect("2-d")
}

fn f64_1d(t: &Tensor) -> Vec<f64> {
    t.as_f32()
        .expect("float")
        .iter()
        .map(|&v| v as f64)
        .collect()
}

/// Softmax of each row, in f64.
fn softmax(y: &ndarray::Array2<f64>) -> ndarray::Array2<f64> {
    let mut out = y.clone();
    for mut row in out.axis_iter_mut(Axis(0)) {
        let max = row.fold(f64::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row.mapv_inplace(|v| v / sum);
    }
    out
}

/// Layernorm of each row (biased variance, eps 1e-5), in f64.
fn layernorm(y: &ndarray::Array2<f64>, g: &[f64], b: &[f64]) -> ndarray::Array2<f64> {
    let mut out = y.clone();
    for mut row in out.axis_iter_mut(Axis(0)) {
        let n = row.len() as f64;
        let mu = row.sum() / n;
        let var = row.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / n;
        let inv = 1.0 / (var + 1e-5).sqrt();
        for (j, v) in row.iter_mut().enumerate() {
            *v = (*v - mu) * inv * g[j] + b[j];
        }
    }
    out
}

/// Checks `got` (a 16-bit result) elementwise against `round(exact)`: equal, or `exact` within
/// `slack` (relative, the f32 kernel's error) of a rounding boundary. Returns how many elements
/// were exempt and how many differ from the unrounded f32 value of `exact`.
fn assert_rounded(
    name: &str,
    got: &Tensor,
    exact: &ndarray::Array2<f64>,
    round: fn(f32) -> f32,
    slack: f64,
) -> (usize, usize) {
    let got = got.as_f32().unwrap();
    assert_eq!(got.shape(), exact.shape(), "{name}");
    let (mut exempt, mut visible) = (0, 0);
    for (&g, &e) in got.iter().zip(exact.iter()) {
        assert_eq!(round(g), g, "{name}: {g} is not a value of the type");
        let want = round(e as f32);
        visible += usize::from(want != e as f32);
        if g == want {
            continue;
        }
        let near = |d: f64| round((e + d) as f32) != want || round((e - d) as f32) != want;
        assert!(
            near(slack * e.abs().max(1e-30)),
            "{name}: got {g}, want round({e}) = {want}"
        );
        exempt += 1;
    }
    (exempt, visible)
}

fn check(dt: &str, round: fn(f32) -> f32) {
    let (out, leaves) = run(dt);
    let a = f64_2d(&leaves["a"]);
    let w = f64_2d(&leaves["w"]);
    for (name, t) in [("a", &leaves["a"]), ("w", &leaves["w"])] {
        let x = t.as_f32().unwrap();
        assert!(x.iter().all(|&v| round(v) == v), "leaf {name} is {dt}");
    }
    // `y` is rounded, and `s`, `l` take the rounded `y` as their operand.
    let y_exact = a.dot(&w);
    let y = f64_2d(&out["y"]);
    let checks = [
        ("y", &out["y"], y_exact, 1e-5),
        ("s", &out["s"], softmax(&y), 1e-5),
        (
            "l",
            &out["l"],
            layernorm(&y, &f64_1d(&leaves["n_g"]), &f64_1d(&leaves["n_b"])),
            1e-5,
        ),
    ];
    for (name, got, exact, slack) in checks {
        let (exempt, visible) = assert_rounded(name, got, &exact, round, slack);
        let total = exact.len();
        assert!(exempt * 50 <= total, "{name}: {exempt} of {total} exempt");
        // The rounding is there to see: most exact values are not values of the 16-bit type.
        assert!(
            visible * 2 > total,
            "{name}: only {visible} of {total} rounded"
        );
    }
}

#[test]
fn bf16_matmul_softmax_layernorm_are_rounded_f32_results() {
    check("bf16", round_bf16);
}

#[test]
fn f16_matmul_softmax_layernorm_are_rounded_f32_results() {
    check("f16", round_f16);
}

/// f32 programs are not rounded: the f32 matmul keeps bits a bf16 one would drop.
#[test]
fn f32_results_keep_their_bits() {
    let (out, _) = run("f32");
    let y = out["y"].as_f32().unwrap();
    assert!(y.iter().any(|&v| round_bf16(v) != v));
}

/// A bf16 gpt forward sharded over 8 devices agrees with the bf16 reference within bf16's
/// precision (2⁻⁸ relative, one unit of the last place at the logits' magnitude ~0.5 is 2⁻⁹;
/// measured: 2.4e-3 absolute): a sharded matmul rounds each rank's partial sum to bf16 before
/// the all-reduce sums them, the reference rounds the whole sum once. The loss of the bf16
/// logits is the vocab-parallel cross-entropy, computed in f32 as the unsplit op computes it.
#[test]
fn bf16_gpt_forward_at_degree_8_checks_against_the_reference() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gpt.tpl"))
        .unwrap()
        .replace("f32[", "bf16[")
        .replace("output loss", "output loss, logits");
    let dir = cli_support::scratch("bf16_gpt");
    let path = dir.join("gpt_bf16.tpl");
    std::fs::write(&path, text).unwrap();
    let plan = tpc(&["compile", path.to_str().unwrap(), "--degree", "8"]);
    assert_exit(&plan, 0);
    assert!(
        stdout(&plan).contains("target_logit"),
        "vocab-parallel loss"
    );
    let o = tpc(&[
        "run",
        path.to_str().unwrap(),
        "--degree",
        "8",
        "--check",
        "--rtol",
        "0.01",
        "--atol",
        "0.005",
    ]);
    assert_exit(&o, 0);
    assert!(stdout(&o).contains("check "), "{}", stdout(&o));
}

/// `examples/gpt_train.tpl` with every float declared bf16 (and, with `dp`, the batch split
/// over a `dp` axis), written into `dir`.
fn gpt_train_bf16(dir: &std::path::Path, dp: bool) -> String {
    let text = std::fs::read_to_string(cli_support::example("gpt_train.tpl"))
        .unwrap()
        .replace("f32[", "bf16[")
        .replace(
            "loss = cross_entropy(logits, labels)",
            "loss = cross_entropy(cast(logits, f32), labels)",
        );
    let text = match dp {
        true => text.replace("mesh tp", "mesh dp, tp").replace(
            "input tokens : i32[B, S]",
            "input tokens : i32[B, S] @ [dp, _]",
        ),
        false => text,
    };
    let path = dir.join(if dp {
        "gpt_bf16_dp.tpl"
    } else {
        "gpt_bf16.tpl"
    });
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

/// One SGD step of a bf16 param: its f32 master weight is the f32 update of the param's values
/// by the f32 gradient (`w - 0.5·g`, computed here), and the param is the master rounded to
/// bf16; the master keeps bits bf16 drops.
#[test]
fn one_step_updates_the_f32_master_and_rounds_the_param() {
    let text = "input x : bf16[4, 16]\nparam w : bf16[16, 8]\n\
                loss = cast(mean(mean((x @ w) * (x @ w), 1), 0), f32)\ntrain loss with sgd(lr=0.5)\n";
    let src = SourceFile::new("step.tpl", text);
    let c =
        tpc::driver::compile_step(&src, &[], true).unwrap_or_else(|e| panic!("{}", e.render(None)));
    let leaves = global_leaves(&c.graph, &LeafSource::Seed(5)).unwrap();
    assert_eq!(
        leaves["master(w)"], leaves["w"],
        "the master starts as the param"
    );
    let out = reference::run(&c.graph, &leaves, &leaves).unwrap();
    let w = leaves["w"].as_f32().unwrap();
    let g = out["grad(w)"].as_f32().unwrap();
    let master = out["next(master(w))"].as_f32().unwrap();
    let param = out["next(w)"].as_f32().unwrap();
    let mut kept = 0;
    for (((&w, &g), &m), &p) in w.iter().zip(g).zip(master).zip(param) {
        assert_eq!(
            m.to_bits(),
            (w - g * 0.5f32).to_bits(),
            "master {m} = {w} - 0.5·{g}"
        );
        assert_eq!(
            p.to_bits(),
            round_bf16(m).to_bits(),
            "param {p} = bf16({m})"
        );
        kept += usize::from(p != m);
    }
    assert!(
        kept * 2 > w.len(),
        "the master holds what bf16 drops ({kept})"
    );
    let carried: Vec<&str> = c.carried.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(carried, ["w", "master(w)"]);
}

/// bf16 + AdamW: 2 bytes of param, 2 of gradient (bf16: the dp reduction, if any, moves
/// bf16), 4 of f32 master and 8 of f32 moments per param: 16 bytes, as f32 without a master;
/// AdamW's step count is the 4 bytes over.
#[test]
fn memory_per_param_is_16_bytes_with_the_master() {
    let dir = cli_support::scratch("bf16_memory");
    let path = gpt_train_bf16(&dir, false);
    let src = tpc::driver::read_source(&path).unwrap();
    let c = tpc::driver::compile_step(&src, &[], false).unwrap();
    let n: u64 = c.graph.params().map(|(_, v)| c.graph.ty(v).numel()).sum();
    let mesh = tpc::mesh::Mesh::new(Vec::new()).unwrap();
    let plan = tpc::plan::Plan::build(c.graph, mesh, tpc::mesh::Device::default()).unwrap();
    let m = plan.summary.memory_bytes_per_device;
    assert_eq!((m.params, m.grads, m.master), (2 * n, 2 * n, 4 * n));
    assert_eq!(m.optimizer, 8 * n + 4);
    assert_eq!(m.params + m.grads + m.master + m.optimizer - 4, 16 * n);
}

/// A bf16 gpt_train (AdamW through f32 masters) at degree 8 and on `dp=2,tp=4` checks against
/// the bf16 reference, every loss and param, at the default tolerances (each element also
/// within its sensitivity measured by a reference perturbed at bf16's rounding level).
#[test]
fn bf16_training_checks_against_the_reference() {
    let dir = cli_support::scratch("bf16_train");
    for (dp, mesh) in [(false, ["--degree", "8"]), (true, ["--mesh", "dp=2,tp=4"])] {
        let path = gpt_train_bf16(&dir, dp);
        let mut args = vec!["run", path.as_str(), "--steps", "3", "--check"];
        args.extend(mesh);
        let o = tpc(&args);
        assert_exit(&o, 0);
        let out = stdout(&o);
        let checks: Vec<&str> = out.lines().filter(|l| l.starts_with("check ")).collect();
        assert_eq!(checks.len(), 3 + 36, "3 losses and 36 params\n{out}");
        assert!(checks.iter().all(|l| l.ends_with(" ok")), "{out}");
    }
}

/// A bf16 run saved after step 2 and resumed gives steps 3 and 4 bitwise: the f32 masters are
/// in the checkpoint (restarting them from the bf16 params would lose their low bits).
#[test]
fn bf16_checkpoint_round_trips_with_its_masters() {
    let dir = cli_support::scratch("bf16_ck");
    let path = gpt_train_bf16(&dir, false);
    let ck = dir.join("ck");
    let steps = |o: &std::process::Output| -> Vec<String> {
        stdout(o)
            .lines()
            .filter(|l| l.starts_with("step "))
            .map(String::from)
            .collect()
    };
    let whole = tpc(&["run", &path, "--degree", "8", "--steps", "4"]);
    assert_exit(&whole, 0);
    let saved = tpc(&[
        "run",
        &path,
        "--degree",
        "8",
        "--steps",
        "2",
        "--save",
        ck.to_str().unwrap(),
    ]);
    assert_exit(&saved, 0);
    let reader = tpc::exec::checkpoint::load::Reader::open(&ck).unwrap();
    assert!(reader.index.tensors.contains_key("master(wte)"));
    let rest = tpc(&[
        "run",
        &path,
        "--degree",
        "8",
        "--steps",
        "2",
        "--load",
        ck.to_str().unwrap(),
    ]);
    assert_exit(&rest, 0);
    assert_eq!(steps(&rest), steps(&whole)[2..].to_vec());
}

/// The cross-entropy of bf16 logits differentiates (its cotangent is f32, the logits' bf16).
#[test]
fn bf16_cross_entropy_has_a_bf16_gradient() {
    let text = "input x : bf16[4, 8]\ninput y : i32[4]\nparam w : bf16[8, 16]\n\
                loss = cross_entropy(x @ w, y)\ntrain loss with sgd(lr=0.5)\n";
    let src = SourceFile::new("ce.tpl", text);
    let c =
        tpc::driver::compile_step(&src, &[], true).unwrap_or_else(|e| panic!("{}", e.render(None)));
    let leaves = global_leaves(&c.graph, &LeafSource::Seed(5)).unwrap();
    let out = reference::run(&c.graph, &leaves, &leaves).unwrap();
    let g = out["grad(w)"].as_f32().unwrap();
    assert!(g.iter().all(|&v| v.is_finite() && round_bf16(v) == v));
    assert!(g.iter().any(|&v| v != 0.0));
}
