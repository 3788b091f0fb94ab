//! Shared by `prop_sharding.rs`, `regressions.rs` and the `mutants_*`/`cost_terms` tests: compile a program on a mesh, run its plan
//! on one thread per device, and check it against the unsharded reference and its own summary.

#![allow(dead_code)]

use ndarray::Dimension;
use std::collections::BTreeMap;
use tpc::diag::SourceFile;
use tpc::driver::compile_plan;
use tpc::exec::leaves::{global_leaves, LeafSource};
use tpc::exec::spmd::run_threads;
use tpc::exec::{apply, reference, Tensor};
use tpc::ir::{Graph, Op};
use tpc::mesh::{Device, Mesh};
use tpc::plan::Plan;

/// numpy `allclose` tolerances.
pub const RTOL: f32 = 1e-4;
/// numpy `allclose` tolerances.
pub const ATOL: f32 = 1e-5;

/// What a case came to, when it is not a failure.
#[derive(Debug)]
pub enum Outcome {
    /// The plan ran and matched the reference; it has this many collectives.
    Ran {
        /// Collectives in the plan.
        collectives: usize,
        /// The names of the SPMD ops in the plan (collectives, slices, vocab-parallel ops).
        spmd_ops: Vec<&'static str>,
        /// Outputs within tolerance only once their conditioning was allowed for.
        ill_conditioned: usize,
    },
    /// A user error (rendered).
    UserError(String),
}

/// `dp=2,tp=4`, or a bare number for `tp=N`.
pub fn mesh(text: &str) -> Mesh {
    if text.contains('=') {
        Mesh::parse(text).unwrap()
    } else {
        Mesh::degree(text.parse().unwrap()).unwrap()
    }
}

/// `y = x @ w` with `x` row-split over `tp` and `y` wanted replicated: the cost model picks
/// between an all-gather of `y` after a row-block matmul and an all-gather of `x` before it.
pub const ROW_SPLIT_MATMUL: &str = "
mesh tp
input x : f32[64, 256] @ [tp, _]
param w : f32[256, 4096] @ [_, _]
y = x @ w
output y @ [_, _]
";

/// Compiles the program `text`, named `name`, on `mesh_text` with `device`; a compile error
/// fails the test with its rendering.
pub fn plan_of(name: &str, text: &str, mesh_text: &str, device: Device) -> Plan {
    let src = SourceFile::new(name, text);
    compile_plan(&src, &[], mesh(mesh_text), device)
        .unwrap_or_else(|e| panic!("{}", e.render(Some(&src))))
}

/// Compiles `src` on `mesh_text`: `Ok(Ok(plan))`, `Ok(Err(rendered user error))`, or `Err` for a
/// failure (an internal error, or a user error that renders without a location).
pub fn compile(
    src: &SourceFile,
    mesh_text: &str,
    sets: &[(String, i64)],
) -> Result<Result<Plan, String>, String> {
    match compile_plan(src, sets, mesh(mesh_text), Device::default()) {
        Ok(p) => Ok(Ok(p)),
        Err(e) => {
            let text = e.render(Some(src));
            if e.is_internal() {
                return Err(format!("internal error:\n{text}"));
            }
            if !text.contains(&format!("--> {}:", src.name)) {
                return Err(format!("a user error without a location:\n{text}"));
            }
            Ok(Err(text))
        }
    }
}

/// Relative perturbation of the leaves for the conditioning estimate.
pub const PERTURBATION: f32 = 1e-6;
/// How many times the perturbed reference's deviation an element may be off.
pub const NOISE_FACTOR: f32 = 10.0;

/// `t` with every float element scaled by `1 + PERTURBATION·u`, `u` in [-1, 1] a fixed
/// pseudo-random function of `key` and the element index.
fn perturb(t: Tensor, key: u64) -> Tensor {
    match t {
        Tensor::F32(mut x) => {
            for (i, v) in x.iter_mut().enumerate() {
                let h = (key ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
                    .wrapping_mul(0xbf58_476d_1ce4_e5b9)
                    .rotate_left(31)
                    .wrapping_mul(0x94d0_49bb_1331_11eb);
                let u = (h >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                *v *= 1.0 + PERTURBATION * u;
            }
            Tensor::F32(x)
        }
        other => other,
    }
}

/// The global program run like the reference, but with every leaf and every op result
/// perturbed by a relative `PERTURBATION` (the model of rounding errors): how far each output
/// element moves estimates how much any change of summation order (such as sharding) can move
/// it. Elements of a layernorm over a nearly constant row, or of a cancelling sum, move a lot.
pub fn perturbed_reference(
    g: &Graph,
    leaves: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>, String> {
    let mut slots: Vec<Option<Tensor>> = vec![None; g.num_values()];
    for (id, node) in g.nodes() {
        let results = match &node.op {
            Op::Param { name } | Op::Input { name } => vec![leaves
                .get(name)
                .cloned()
                .ok_or_else(|| format!("no leaf {name}"))?],
            op => {
                let args: Vec<&Tensor> = node
                    .inputs
                    .iter()
                    .map(|v| slots[v.index()].as_ref().expect("topological order"))
                    .collect();
                apply(op, &args).map_err(|e| format!("{id} {}: {e}", op.name()))?
            }
        };
        for (&v, t) in node.outputs.iter().zip(results) {
            slots[v.index()] = Some(perturb(t, 0x5eed ^ v.index() as u64));
        }
    }
    Ok(g.outputs()
        .iter()
        .map(|o| (o.name.clone(), slots[o.value.index()].clone().unwrap()))
        .collect())
}

/// numpy `allclose(got, want, rtol, atol)` with a description of the worst element. With
/// `noisy` (the perturbed reference, see `perturbed_reference`), an element may also differ by up to
/// `NOISE_FACTOR` times its deviation there: ill-conditioned elements (a layernorm of a nearly
/// constant row, a cancelling sum) change with any summation order, sharded or not.
pub fn allclose(
    name: &str,
    got: &Tensor,
    want: &Tensor,
    noisy: Option<&Tensor>,
) -> Result<(), String> {
    match (got, want) {
        (Tensor::F32(g), Tensor::F32(w)) => {
            if g.shape() != w.shape() {
                return Err(format!(
                    "output {name}: shape {:?}, reference {:?}",
                    g.shape(),
                    w.shape()
                ));
            }
            let noise = noisy
                .and_then(|n| n.as_f32())
                .filter(|n| n.shape() == w.shape());
            let mut bad = 0usize;
            let mut worst: Option<(f32, Vec<usize>, f32, f32)> = None;
            for (k, ((idx, &a), &b)) in g.indexed_iter().zip(w.iter()).enumerate() {
                let slack = noise
                    .and_then(|n| n.as_slice())
                    .map(|n| NOISE_FACTOR * (n[k] - b).abs())
                    .unwrap_or(0.0);
                let ok = (a == b) || (a - b).abs() <= ATOL + RTOL * b.abs() + slack;
                if !ok {
                    bad += 1;
                    let excess = if a.is_nan() || b.is_nan() {
                        f32::INFINITY
                    } else {
                        (a - b).abs() - RTOL * b.abs()
                    };
                    if worst.as_ref().is_none_or(|(e, ..)| excess > *e) {
                        worst = Some((excess, idx.slice().to_vec(), a, b));
                    }
                }
            }
            match worst {
                None => Ok(()),
                Some((_, idx, a, b)) => Err(format!(
                    "output {name} {:?}: {bad} of {} elements differ{}; worst at {idx:?}: got {a}, reference {b}",
                    w.shape(),
                    w.len(),
                    if noise.is_some() { " (beyond the conditioning estimate too)" } else { "" }
                )),
            }
        }
        (Tensor::I32(g), Tensor::I32(w)) => {
            if g == w {
                Ok(())
            } else {
                Err(format!("output {name}: i32 values differ"))
            }
        }
        _ => Err(format!(
            "output {name}: {} vs reference {}",
            got.describe(),
            want.describe()
        )),
    }
}

/// Per collective kind, count and bytes per device, recomputed from the ops of `plan.local`.
pub fn listed_collectives(plan: &Plan) -> BTreeMap<String, (u64, u64)> {
    use tpc::cost::CollectiveKind as K;
    let mut m: BTreeMap<String, (u64, u64)> = K::ALL
        .iter()
        .map(|k| (k.name().to_string(), (0, 0)))
        .collect();
    for (_, n) in plan.local.nodes() {
        let (kind, size) = match &n.op {
            Op::AllReduce { size, .. } => (K::AllReduce, *size),
            Op::AllGather { size, .. } => (K::AllGather, *size),
            Op::ReduceScatter { size, .. } => (K::ReduceScatter, *size),
            Op::AllToAll { size, .. } => (K::AllToAll, *size),
            // One all-to-all over the combined group of its axes.
            Op::Redistribute { axes, .. } => (K::AllToAll, axes.iter().map(|(_, k)| k).product()),
            _ => continue,
        };
        // A bucket (an all-reduce of several operands) moves them all as one message.
        let bytes: u64 = n
            .inputs
            .iter()
            .map(|&v| plan.local.ty(v).size_bytes())
            .sum();
        if n.inputs.len() > 1 {
            assert!(
                bytes <= plan.device.bucket_bytes,
                "a bucket of {bytes} bytes exceeds the cap of {}",
                plan.device.bucket_bytes
            );
        }
        let bytes = bytes as f64;
        let e = m.get_mut(kind.name()).unwrap();
        e.0 += 1;
        e.1 += kind.traffic(size, bytes).0.round() as u64;
    }
    m
}

/// The summary agrees with the listed collectives, and every collective spans > 1 device.
pub fn check_summary(plan: &Plan) -> Result<(), String> {
    let listed = listed_collectives(plan);
    let summary: BTreeMap<String, (u64, u64)> = plan
        .summary
        .collectives
        .iter()
        .map(|(k, s)| (k.clone(), (s.count, s.bytes_per_device)))
        .collect();
    if listed != summary {
        return Err(format!(
            "summary collectives {summary:?} differ from the listed ones {listed:?}"
        ));
    }
    for (_, n) in plan.local.nodes() {
        if let Op::AllReduce { size, .. }
        | Op::AllGather { size, .. }
        | Op::ReduceScatter { size, .. }
        | Op::AllToAll { size, .. } = &n.op
        {
            if *size <= 1 {
                return Err(format!("a collective over {size} device(s): {}", n.op));
            }
        }
    }
    Ok(())
}

/// Checks a compiled plan: summary consistency, a threaded run equal to the reference, and the
/// run's measured collectives equal to the summary's.
/// Every plan runs: there is no filter for known bugs (a bug found is fixed, and pinned in
/// `tests/regressions.rs`).
pub fn check_plan(plan: &Plan) -> Result<Outcome, String> {
    check_summary(plan)?;
    let source = LeafSource::Seed(7);
    let leaves =
        global_leaves(&plan.global, &source).map_err(|e| format!("generating leaves: {e}"))?;
    let want = reference::run(&plan.global, &leaves, &leaves)
        .map_err(|e| format!("the reference failed: {e}"))?;
    let got = run_threads(plan, &source, 1, None).map_err(|e| format!("the run failed: {e}"))?;
    let mut errors = Vec::new();
    let mut noisy = None;
    let mut ill_conditioned = 0;
    for (name, w) in &want {
        let Some(g) = got.outputs.get(name) else {
            errors.push(format!("output {name} missing from the run"));
            continue;
        };
        if allclose(name, g, w, None).is_ok() {
            continue;
        }
        // Outside allclose: compare again, allowing for the element's conditioning.
        if noisy.is_none() {
            noisy = Some(perturbed_reference(&plan.global, &leaves)?);
        }
        let n = noisy.as_ref().and_then(|m| m.get(name));
        match allclose(name, g, w, n) {
            Ok(()) => ill_conditioned += 1,
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("\n"));
    }
    let mut measured: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for (k, s) in &plan.summary.collectives {
        let m = got.stats.collectives.get(k).copied().unwrap_or((0, 0));
        if m != (s.count, s.bytes_per_device) {
            measured.insert(k.clone(), m);
        }
    }
    if !measured.is_empty() {
        return Err(format!(
            "the run measured collectives {:?}, the summary lists {:?}",
            got.stats.collectives, plan.summary.collectives
        ));
    }
    let collectives = plan
        .local
        .nodes()
        .filter(|(_, n)| n.op.is_collective())
        .count();
    let mut spmd_ops: Vec<&'static str> = plan
        .local
        .nodes()
        .filter(|(_, n)| n.op.is_spmd_only())
        .map(|(_, n)| n.op.name())
        .collect();
    spmd_ops.sort();
    spmd_ops.dedup();
    Ok(Outcome::Ran {
        collectives,
        spmd_ops,
        ill_conditioned,
    })
}

/// Compiles and checks a source text on a mesh (for the regression tests): panics with the
/// reason on a failure; returns the outcome otherwise.
pub fn check_text(text: &str, mesh_text: &str) -> Outcome {
    let src = SourceFile::new("case.tpl", text);
    let r = compile(&src, mesh_text, &[]).and_then(|r| match r {
        Ok(plan) => check_plan(&plan),
        Err(e) => Ok(Outcome::UserError(e)),
    });
    match r {
        Ok(o) => o,
        Err(msg) => panic!("on {mesh_text}:\n{msg}"),
    }
}

/// `check_text`, and the program must compile.
pub fn assert_runs(text: &str, mesh_text: &str) -> Plan {
    match check_text(text, mesh_text) {
        Outcome::Ran { .. } => {}
        Outcome::UserError(e) => panic!("on {mesh_text}: unexpected user error:\n{e}"),
    }
    plan_of("case.tpl", text, mesh_text, Device::default())
}

/// The dp reductions on the way to `v`: a value made by an all-reduce over dp counts one and
/// continues through the operand it reduces (result k of a bucket is operand k reduced); a
/// `full_like` reads only its operand's shape, so the walk stops there.
#[allow(dead_code)]
pub fn dp_reductions(p: &Plan, v: tpc::ir::ValueId<tpc::ir::Local>) -> usize {
    let g = &p.local;
    let mut seen = std::collections::BTreeSet::new();
    let mut stack = vec![v];
    let mut count = 0;
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        let val = g.value(v);
        let n = g.node(val.node);
        match &n.op {
            tpc::ir::Op::AllReduce { axis, .. } if axis == "dp" => {
                count += 1;
                stack.push(n.inputs[val.index as usize]);
            }
            // Only the operand's shape matters (the loss's cotangent seed).
            tpc::ir::Op::FullLike { .. } => {}
            _ => stack.extend(n.inputs.iter().copied()),
        }
    }
    count
}
