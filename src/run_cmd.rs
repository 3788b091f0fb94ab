//! `tpc run`: compile (or load) a plan, load or generate params and inputs, run it on one thread
//! per device (or, built with the `mpi` feature and started by `mpirun`, one process per device),
//! and optionally check against the unsharded reference.

use crate::{fail, write_output, DeviceArgs, Failure};
use anyhow::{anyhow, Context};
use std::time::Instant;
use tpc::driver;
use tpc::exec::leaves::{global_leaves, LeafSource};
use tpc::exec::spmd::{run_threads, RunOutput};
use tpc::exec::{npz, reference, Tensor};
use tpc::mesh::Mesh;
use tpc::plan::Plan;

/// Arguments of `tpc run`.
#[derive(clap::Args)]
pub struct RunArgs {
    /// A .tpl program (compiled first) or a saved plan (.json from `tpc compile --emit json`).
    file: String,
    /// Tensor-parallel degree: the 1-D mesh tp=N.
    #[arg(long, conflicts_with = "mesh")]
    degree: Option<u64>,
    /// An n-D mesh, e.g. dp=2,tp=4.
    #[arg(long)]
    mesh: Option<String>,
    /// Override a dim, e.g. --set H=4096 (repeatable; .tpl only).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    set: Vec<String>,
    /// Params by full name (`layer.3.w1`) from an .npz archive (default: generated from --seed).
    #[arg(long, value_name = "P.npz")]
    params: Option<String>,
    /// Inputs by name from an .npz archive (default: generated from --seed).
    #[arg(long, value_name = "X.npz")]
    inputs: Option<String>,
    /// Seed of the generated params and inputs (values depend only on name, shape and seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write every output as a global array to this .npz archive.
    #[arg(long, value_name = "Y.npz")]
    out: Option<String>,
    /// Also run the unsharded reference and compare (exit 1 when over tolerance).
    #[arg(long)]
    check: bool,
    /// Relative tolerance of --check.
    #[arg(long, default_value_t = 1e-4)]
    rtol: f64,
    /// Absolute tolerance of --check.
    #[arg(long, default_value_t = 1e-5)]
    atol: f64,
    /// Run the step K times after loading and report the step times.
    #[arg(long, default_value_t = 1, value_name = "K")]
    repeat: usize,
    /// Write the measured figures as JSON to PATH.
    #[arg(long, value_name = "PATH")]
    stats: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Runs `tpc run`: one thread per device, or, when built with the `mpi` feature and started by
/// an MPI launcher (`mpirun -n N tpc run ...`), one process per device.
pub fn run(args: &RunArgs) -> Result<(), Failure> {
    #[cfg(feature = "mpi")]
    if tpc::exec::mpi::launched_by_mpirun() {
        return run_mpi(args);
    }
    if args.repeat == 0 {
        return Err(anyhow!("--repeat must be at least 1").into());
    }
    let plan = load_plan(args)?;
    let source = leaf_source(args, &plan)?;
    let bar = progress(args.repeat);
    let tick = |_: usize| bar.inc(1);
    let out = run_threads(&plan, &source, args.repeat, Some(&tick)).map_err(|e| anyhow!("{e}"))?;
    bar.finish_and_clear();
    finish(args, &plan, &source, &out)
}

/// Under MPI: every rank compiles (or loads) the plan and its leaves itself, the ranks agree that
/// all of them succeeded (else the lowest failing rank reports, every rank exits non-zero), run
/// their shard of the plan, and rank 0 gathers the output blocks and does what the thread run
/// does with them (step times, --out, --stats, --check). A rank that fails during the run reports
/// `rank R: ...` and ends the whole job by `MPI_Abort`.
#[cfg(feature = "mpi")]
fn run_mpi(args: &RunArgs) -> Result<(), Failure> {
    use tpc::exec::comm::Transport;
    use tpc::exec::mpi::{decode_rank_output, encode_rank_output, Mpi};
    use tpc::exec::spmd::{assemble, run_rank};

    let mpi = Mpi::init().map_err(|e| anyhow!("cannot start MPI: {e}"))?;
    let (rank, size) = (mpi.rank(), mpi.size());
    let setup = (|| -> Result<(Plan, LeafSource), Failure> {
        if args.repeat == 0 {
            return Err(anyhow!("--repeat must be at least 1").into());
        }
        let plan = load_plan(args)?;
        let devices = plan.mesh.num_devices();
        if devices != size as u64 {
            return Err(anyhow!(
                "the plan's mesh {} has {devices} devices but MPI started {size} processes: \
                 run it with `mpirun -n {devices}`",
                plan.mesh
            )
            .into());
        }
        let source = leaf_source(args, &plan)?;
        Ok((plan, source))
    })();
    // Every rank learns whether any failed, so none goes on to wait for a missing peer. The
    // lowest failing rank reports; a barrier keeps the others from exiting (and mpirun from
    // killing the job) before its report is out; then every rank exits non-zero.
    let first_failed = mpi.min_over_ranks(if setup.is_err() {
        rank as u64
    } else {
        u64::MAX
    });
    let (plan, source) = match setup {
        Ok(s) if first_failed == u64::MAX => s,
        failed => {
            let code = match failed {
                Err(e) if first_failed == rank as u64 => report(e, rank),
                _ => 1,
            };
            mpi.min_over_ranks(0);
            drop(mpi);
            std::process::exit(code);
        }
    };

    let mut t = mpi.transport().with_deferred_abort();
    let bar = progress(if rank == 0 { args.repeat } else { 1 });
    let tick = |_: usize| bar.inc(1);
    let mine = match run_rank(&plan, &mut t, &source, args.repeat, Some(&tick)) {
        Ok(o) => o,
        Err(e) => {
            bar.finish_and_clear();
            say(&format!("error: {e}"));
            t.abort_job(1)
        }
    };
    bar.finish_and_clear();
    if rank != 0 {
        if let Err(e) = t.send(0, encode_rank_output(&mine)) {
            say(&format!(
                "error: rank {rank}: sending the outputs to rank 0: {e}"
            ));
            t.abort_job(1)
        }
        return Ok(());
    }
    let mut ranks = vec![mine];
    for r in 1..size {
        match t
            .recv(r)
            .map_err(|e| e.to_string())
            .and_then(|m| decode_rank_output(&m))
        {
            Ok(o) => ranks.push(o),
            Err(e) => {
                say(&format!(
                    "error: rank 0: receiving the outputs of rank {r}: {e}"
                ));
                t.abort_job(1)
            }
        }
    }
    if let Some(bad) = ranks.iter().position(|o| {
        o.outputs.len() != plan.local.outputs().len() || o.step_times.len() != args.repeat
    }) {
        say(&format!(
            "error: rank 0: rank {bad} sent the wrong number of outputs or step times"
        ));
        t.abort_job(1)
    }
    let out = match assemble(&plan, ranks) {
        Ok(out) => out,
        Err(e) => {
            say(&format!("error: rank 0: {e}"));
            t.abort_job(1)
        }
    };
    finish(args, &plan, &source, &out)
}

/// Prints a setup failure as `main` would (prefixed by the rank unless it is rank 0); returns the
/// exit code `main` would give it.
#[cfg(feature = "mpi")]
fn report(e: Failure, rank: usize) -> i32 {
    match e {
        Failure::Compile(b) => {
            let (e, src) = *b;
            say(e.render(src.as_ref()).trim_end());
            if e.is_internal() {
                70
            } else {
                1
            }
        }
        Failure::Other(e) if rank == 0 => {
            say(&format!("error: {e:#}"));
            1
        }
        Failure::Other(e) => {
            say(&format!("error: rank {rank}: {e:#}"));
            1
        }
    }
}

/// Writes `line` to stderr in one write, so a job-wide abort cannot cut it in the middle.
#[cfg(feature = "mpi")]
fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

/// What follows a run: step times, --out, --stats and --check.
fn finish(
    args: &RunArgs,
    plan: &Plan,
    source: &LeafSource,
    out: &RunOutput,
) -> Result<(), Failure> {
    report_steps(out);
    if let Some(path) = &args.out {
        npz::write(path, &out.outputs).map_err(|e| anyhow!("{e}"))?;
    }
    if let Some(path) = &args.stats {
        write_output(Some(std::path::Path::new(path)), &stats_json(plan, out))?;
    }
    if args.check {
        check(args, plan, source, out)?;
    }
    Ok(())
}

fn load_plan(args: &RunArgs) -> Result<Plan, Failure> {
    let mesh = match (args.degree, &args.mesh) {
        (Some(d), _) => Some(Mesh::degree(d).map_err(|e| fail(e, None))?),
        (None, Some(m)) => Some(Mesh::parse(m).map_err(|e| fail(e, None))?),
        (None, None) => None,
    };
    if args.file.ends_with(".json") {
        let text = std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read `{}`", args.file))?;
        let plan =
            tpc::emit::plan_json::from_json(&text).map_err(|e| anyhow!("{}: {e}", args.file))?;
        if !args.set.is_empty() {
            return Err(anyhow!(
                "--set applies to .tpl programs; the plan `{}` is already compiled",
                args.file
            )
            .into());
        }
        if let Some(m) = mesh {
            let m = m.with_declared(&plan.global.mesh_axes);
            if m != plan.mesh {
                return Err(anyhow!(
                    "the plan `{}` was compiled for mesh {}, not {m}",
                    args.file,
                    plan.mesh
                )
                .into());
            }
        }
        return Ok(plan);
    }
    let overrides = args
        .set
        .iter()
        .map(|s| driver::parse_set(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e, None))?;
    let src = driver::read_source(&args.file).map_err(|e| fail(e, None))?;
    let mesh = mesh.unwrap_or(Mesh::degree(1).map_err(|e| fail(e, None))?);
    let device = args.device.device()?;
    driver::compile_plan(&src, &overrides, mesh, device).map_err(|e| fail(e, Some(src.clone())))
}

/// Seed-generated leaves, with the params and/or inputs replaced by archives when given.
fn leaf_source(args: &RunArgs, plan: &Plan) -> Result<LeafSource, Failure> {
    if args.params.is_none() && args.inputs.is_none() {
        return Ok(LeafSource::Seed(args.seed));
    }
    let mut all =
        global_leaves(&plan.global, &LeafSource::Seed(args.seed)).map_err(|e| anyhow!("{e}"))?;
    for (path, params) in [(&args.params, true), (&args.inputs, false)] {
        if let Some(path) = path {
            let arrays = npz::read(path).map_err(|e| anyhow!("{e}"))?;
            npz::check(path, &plan.global, &arrays, params).map_err(|e| anyhow!("{e}"))?;
            all.extend(arrays);
        }
    }
    Ok(LeafSource::Arrays(all))
}

fn progress(steps: usize) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if steps < 2 || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar
}

fn report_steps(out: &RunOutput) {
    let t = &out.stats.step_times;
    if t.len() < 2 {
        return;
    }
    for (i, s) in t.iter().enumerate() {
        eprintln!("step {}: {:.3} ms", i + 1, s * 1e3);
    }
    let (min, median) = min_median(t);
    eprintln!(
        "step time: min {:.3} ms, median {:.3} ms over {} steps",
        min * 1e3,
        median * 1e3,
        t.len()
    );
}

fn min_median(t: &[f64]) -> (f64, f64) {
    let mut v = t.to_vec();
    v.sort_by(f64::total_cmp);
    (
        v.first().copied().unwrap_or(0.0),
        v.get(v.len() / 2).copied().unwrap_or(0.0),
    )
}

fn stats_json(plan: &Plan, out: &RunOutput) -> String {
    let (min, median) = min_median(&out.stats.step_times);
    let mut collectives = serde_json::Map::new();
    for kind in tpc::cost::CollectiveKind::ALL {
        let (count, bytes) = out
            .stats
            .collectives
            .get(kind.name())
            .copied()
            .unwrap_or((0, 0));
        collectives.insert(
            kind.name().into(),
            serde_json::json!({ "count": count, "bytes": bytes }),
        );
    }
    let doc = serde_json::json!({
        "step_time_s": { "min": min, "median": median },
        "ranks": plan.mesh.num_devices(),
        "collectives": collectives,
        "peak_bytes_per_rank": out.stats.peak_bytes_per_rank,
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

/// Runs the reference on the same leaves and prints, per output, max abs and rel error.
fn check(args: &RunArgs, plan: &Plan, source: &LeafSource, out: &RunOutput) -> Result<(), Failure> {
    let leaves = global_leaves(&plan.global, source).map_err(|e| anyhow!("{e}"))?;
    let t = Instant::now();
    let want =
        reference::run(&plan.global, &leaves, &leaves).map_err(|e| anyhow!("reference: {e}"))?;
    let ref_time = t.elapsed().as_secs_f64();
    let mut bad = Vec::new();
    for (name, w) in &want {
        let g = out
            .outputs
            .get(name)
            .ok_or_else(|| anyhow!("output `{name}` missing from the sharded run"))?;
        let (abs, rel, ok) = compare(g, w, args.rtol, args.atol);
        println!(
            "check {name}: max abs error {abs:.3e}, max rel error {rel:.3e} {}",
            if ok { "ok" } else { "FAILED" }
        );
        if !ok {
            bad.push(name.clone());
        }
    }
    eprintln!("reference run: {:.3} ms", ref_time * 1e3);
    if !bad.is_empty() {
        return Err(anyhow!(
            "--check: {} differ from the unsharded reference beyond rtol {} / atol {}",
            bad.join(", "),
            args.rtol,
            args.atol
        )
        .into());
    }
    Ok(())
}

/// Max abs error, max rel error, and whether every element is within atol + rtol·|want|.
fn compare(got: &Tensor, want: &Tensor, rtol: f64, atol: f64) -> (f64, f64, bool) {
    let pairs: Vec<(f64, f64)> = match (got, want) {
        (Tensor::F32(g), Tensor::F32(w)) if g.shape() == w.shape() => g
            .iter()
            .zip(w.iter())
            .map(|(a, b)| (*a as f64, *b as f64))
            .collect(),
        (Tensor::I32(g), Tensor::I32(w)) if g.shape() == w.shape() => g
            .iter()
            .zip(w.iter())
            .map(|(a, b)| (*a as f64, *b as f64))
            .collect(),
        _ => return (f64::INFINITY, f64::INFINITY, false),
    };
    let (mut abs, mut rel, mut ok) = (0.0f64, 0.0f64, true);
    for (a, b) in pairs {
        if a.is_nan() && b.is_nan() {
            continue;
        }
        let d = (a - b).abs();
        if d.is_nan() || d.is_infinite() {
            (abs, rel, ok) = (f64::NAN, f64::NAN, false);
            continue;
        }
        abs = abs.max(d);
        rel = rel.max(d / b.abs().max(f64::MIN_POSITIVE));
        ok &= d <= atol + rtol * b.abs();
    }
    (abs, rel, ok)
}
