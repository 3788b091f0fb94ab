//! `tpc run` on a program with `train`: N training steps of the compiled step (forward,
//! backward, update). Each step runs on the ranks with every leaf as a global array: the
//! params and optimizer state the previous step returned (its `next(NAME)` outputs), the
//! inputs (from `--inputs`: an array with one extra leading dim of K gives step i its slice
//! `i mod K`, one of the declared shape serves every step; or generated per step from `--seed`). The
//! carried leaves pass through global arrays between steps (ranks do not keep their blocks
//! across steps yet). `--check` runs the same steps on the unsharded reference and compares
//! every step's loss and the final params.

use super::compare::{self, Tolerance};
use super::{RunArgs, Written};
use crate::{fail, say_err, say_out, Failure};
use anyhow::anyhow;
use std::collections::BTreeMap;
use std::time::Instant;
use tpc::diag::SourceFile;
use tpc::driver::{self, Compiled};
use tpc::exec::leaves::{global_leaves, seeded_inputs, LeafSource};
use tpc::exec::spmd::run_threads;
use tpc::exec::{npz, reference, Tensor};
use tpc::ir::Graph;
use tpc::mesh::Mesh;
use tpc::plan::Plan;

/// One training run's record: per step its loss and seconds, and the final leaves.
struct Trained {
    losses: Vec<(f32, f64)>,
    leaves: BTreeMap<String, Tensor>,
    first_outputs: BTreeMap<String, Tensor>,
}

/// Plans the step `c` and runs `args.steps` steps.
pub(super) fn run(
    args: &RunArgs,
    mut c: Compiled,
    src: &SourceFile,
    mesh: Option<Mesh>,
    flags: &super::Flags,
) -> Result<(), Failure> {
    if args.repeat != 1 {
        return Err(anyhow!(
            "--repeat times one step of a forward program; a training run takes --steps"
        )
        .into());
    }
    // The plan holds the program from here on.
    let graph = std::mem::take(&mut c.graph);
    let plan =
        driver::plan_declared(graph, mesh, flags.device).map_err(|e| fail(e, Some(src.clone())))?;
    super::memory::check_fits(&plan, args, flags.max_memory, plan.mesh.num_devices())?;
    let c = &c;
    let start = start_leaves(args, &plan)?;
    let sharded = steps(args, c, &plan.global, &start, true, |leaves| {
        let out = run_threads(&plan, &LeafSource::Arrays(leaves.clone()), 1, None)
            .map_err(|e| anyhow!("{e}"))?;
        Ok(out.outputs)
    })?;
    let failed = if args.check {
        check(args, c, &plan, &start, &sharded)?
    } else {
        Vec::new()
    };
    write_results(args, c, &plan, &sharded, &failed)
}

/// Leaves by name.
type Leaves = BTreeMap<String, Tensor>;

/// What the first step starts from.
struct Start {
    /// Every leaf: generated from `--seed`, replaced by `--params` and `--inputs`.
    leaves: Leaves,
    /// The inputs given with a leading step axis.
    stepped: Leaves,
}

/// The first step's leaves and the inputs given per step.
fn start_leaves(args: &RunArgs, plan: &Plan) -> Result<Start, Failure> {
    let g = &plan.global;
    let mut all = global_leaves(g, &LeafSource::Seed(args.seed)).map_err(|e| anyhow!("{e}"))?;
    if let Some(p) = &args.params {
        all.extend(npz::load(p, g, true).map_err(|e| anyhow!("{e}"))?);
    }
    let mut stepped = BTreeMap::new();
    if let Some(p) = &args.inputs {
        let declared: BTreeMap<&str, usize> =
            g.inputs().map(|(n, v)| (n, g.ty(v).rank())).collect();
        for (name, t) in npz::load_step_inputs(p, g).map_err(|e| anyhow!("{e}"))? {
            if Some(&t.shape().len()) == declared.get(name.as_str()).map(|r| r + 1).as_ref() {
                stepped.insert(name, t);
            } else {
                all.insert(name, t);
            }
        }
    }
    Ok(Start {
        leaves: all,
        stepped,
    })
}

/// Slice `i` of the leading axis of `t`.
fn step_slice(t: &Tensor, i: usize) -> Tensor {
    use ndarray::Axis;
    match t {
        Tensor::F32(a) => Tensor::F32(a.index_axis(Axis(0), i).to_owned()),
        Tensor::I32(a) => Tensor::I32(a.index_axis(Axis(0), i).to_owned()),
    }
}

/// Runs the steps with `step` (leaves -> outputs), printing each loss when `print`.
fn steps(
    args: &RunArgs,
    c: &Compiled,
    g: &Graph,
    start: &Start,
    print: bool,
    mut step: impl FnMut(&BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, anyhow::Error>,
) -> Result<Trained, Failure> {
    let loss_name = c.loss.as_deref().unwrap_or("loss");
    let mut leaves = start.leaves.clone();
    let mut losses = Vec::with_capacity(args.steps.min(1 << 20));
    let mut first_outputs = BTreeMap::new();
    for s in 0..args.steps {
        reseed_inputs(args, g, &mut leaves, s);
        for (name, t) in &start.stepped {
            let k = t.shape().first().copied().unwrap_or(1).max(1);
            leaves.insert(name.clone(), step_slice(t, s % k));
        }
        let t = Instant::now();
        let mut out = step(&leaves)?;
        let secs = t.elapsed().as_secs_f64();
        let loss = scalar(&out, loss_name)?;
        if print {
            say_out(&format!("step {}: loss {loss:.6}", s + 1));
        }
        losses.push((loss, secs));
        for (leaf, next) in &c.carried {
            let v = out
                .remove(next)
                .ok_or_else(|| anyhow!("the step returned no `{next}`"))?;
            leaves.insert(leaf.clone(), v);
        }
        if s == 0 {
            first_outputs = out;
        }
    }
    Ok(Trained {
        losses,
        leaves,
        first_outputs,
    })
}

/// With `--seed` and no `--inputs`, step `s` reads inputs generated from (name, shape, seed,
/// step); step 0's are the seed's own.
fn reseed_inputs(args: &RunArgs, g: &Graph, leaves: &mut BTreeMap<String, Tensor>, s: usize) {
    if args.inputs.is_some() || s == 0 {
        return;
    }
    let seed = args
        .seed
        .wrapping_add((s as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    leaves.extend(seeded_inputs(g, seed));
}

/// The scalar output `name`.
fn scalar(out: &BTreeMap<String, Tensor>, name: &str) -> Result<f32, anyhow::Error> {
    out.get(name)
        .and_then(|t| t.as_f32())
        .and_then(|a| a.iter().next().copied())
        .ok_or_else(|| anyhow!("the step returned no loss `{name}`"))
}

/// Runs the same steps on the unsharded reference; compares each step's loss and the final
/// params. Returns what differs.
fn check(
    args: &RunArgs,
    c: &Compiled,
    plan: &Plan,
    start: &Start,
    sharded: &Trained,
) -> Result<Vec<String>, Failure> {
    let t = Instant::now();
    let want = steps(args, c, &plan.global, start, false, |leaves| {
        reference::run(&plan.global, leaves, leaves).map_err(|e| anyhow!("reference: {e}"))
    })?;
    let tol = Tolerance {
        rtol: args.rtol,
        atol: args.atol,
        equal_nan: args.equal_nan,
    };
    let mut bad = Vec::new();
    for (s, ((got, _), (w, _))) in sharded.losses.iter().zip(&want.losses).enumerate() {
        let verdict = compare::compare(&scalar_tensor(*got), &scalar_tensor(*w), &tol);
        say_out(&format!("check loss at step {}: {verdict}", s + 1));
        if !verdict.is_close() {
            bad.push(format!("the loss at step {}", s + 1));
        }
    }
    for (name, _) in c.carried.iter().filter(|(l, _)| is_param(plan, l)) {
        let (g, w) = (&sharded.leaves[name], &want.leaves[name]);
        let verdict = compare::compare(g, w, &tol);
        say_out(&format!("check {name}: {verdict}"));
        if !verdict.is_close() {
            bad.push(name.clone());
        }
    }
    say_err(&format!(
        "reference training: {:.3} ms",
        t.elapsed().as_secs_f64() * 1e3
    ));
    Ok(bad)
}

fn scalar_tensor(x: f32) -> Tensor {
    Tensor::from(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[]), x))
}

fn is_param(plan: &Plan, name: &str) -> bool {
    plan.global.params().any(|(n, _)| n == name)
}

/// Writes `--out` (the trained params), `--grads` (the first step's), `--log` (one JSON line
/// per step), beside the target when the check failed.
fn write_results(
    args: &RunArgs,
    c: &Compiled,
    plan: &Plan,
    t: &Trained,
    failed: &[String],
) -> Result<(), Failure> {
    let mut w = Written::new(failed);
    w.npz(&args.out, || {
        t.leaves
            .iter()
            .filter(|(n, _)| is_param(plan, n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect::<Leaves>()
    })?;
    w.npz(&args.grads, || {
        c.grads
            .iter()
            .filter_map(|(p, g)| Some((p.clone(), t.first_outputs.get(g)?.clone())))
            .collect::<Leaves>()
    })?;
    w.text(&args.log, || {
        let mut text = String::new();
        for (s, (loss, secs)) in t.losses.iter().enumerate() {
            let line = serde_json::json!({"step": s + 1, "loss": loss, "time_s": secs});
            text.push_str(&line.to_string());
            text.push('\n');
        }
        text
    })?;
    w.finish(args)
}
