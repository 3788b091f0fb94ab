//! `tpc run`: compile (or load) a plan, load or generate params and inputs, run it on one thread
//! per device (or, built with the `mpi` feature and started by `mpirun`, one process per device),
//! and optionally check against the unsharded reference.

use crate::{fail, say_err, say_out, write_output, DeviceArgs, Failure};
use anyhow::anyhow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tpc::autodiff::param_of_grad;
use tpc::diag::SourceFile;
use tpc::driver;
use tpc::exec::leaves::{global_leaves, LeafSource};
use tpc::exec::spmd::{run_threads, RunOutput};
use tpc::exec::{npz, reference, Tensor};
use tpc::files;
use tpc::mesh::{Device, Mesh};
use tpc::plan::Plan;

mod compare;
mod memory;
mod train;

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
    /// Params by full name (`layer.3.w1`) from an .npz archive or a .safetensors file (such as
    /// `tpc checkpoint export` writes; default: generated from --seed).
    #[arg(long, value_name = "P.npz|P.safetensors")]
    params: Option<String>,
    /// Inputs by name from an .npz archive or a .safetensors file (default: generated from
    /// --seed).
    #[arg(long, value_name = "X.npz|X.safetensors")]
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
    /// In --check, count NaN in both outputs at the same place as equal (numpy's equal_nan).
    #[arg(long)]
    equal_nan: bool,
    /// Refuse to start a run that needs more memory than this (e.g. 512MiB, 16GiB, or bytes);
    /// the machine's available memory is always a limit.
    #[arg(long, value_name = "SIZE")]
    max_memory: Option<String>,
    /// Run the step K times after loading and report the step times.
    #[arg(long, default_value_t = 1, value_name = "K")]
    repeat: usize,
    /// Write the measured figures as JSON to PATH.
    #[arg(long, value_name = "PATH")]
    stats: Option<String>,
    /// For a program with `train`: run only its forward pass.
    #[arg(long)]
    forward_only: bool,
    /// Microbatches per training step: dim 0 of every input split into M pieces run one after
    /// another, their gradients accumulated (the step equals the full batch's). Default: the
    /// pipeline axis's size for a pipelined program, else 1.
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u64).range(1..))]
    microbatches: Option<u64>,
    /// Pipeline schedule: 1f1b (Megatron's one-forward-one-backward, the default) or gpipe.
    #[arg(long, value_name = "KIND", value_parser = clap::value_parser!(tpc::pipeline::schedule::ScheduleKind))]
    schedule: Option<tpc::pipeline::schedule::ScheduleKind>,
    /// Activation recompute for a training step: none (the default), selective (the attention
    /// core: softmax back to the scores' matmul) or full (everything inside each outermost block
    /// instance, e.g. each layer, from its input). Results are bitwise those of none.
    #[arg(long, value_name = "POLICY", value_parser = clap::value_parser!(tpc::plan::remat::Recompute))]
    recompute: Option<tpc::plan::remat::Recompute>,
    /// ZeRO over the dp axis: 0 plain data parallelism (the default), 1 optimizer state split,
    /// 2 gradients too, 3 params too (gathered before each use).
    #[arg(long, value_name = "STAGE", value_parser = clap::value_parser!(u8).range(0..=3))]
    zero: Option<u8>,
    /// For a program with `train`: the loss scale, instead of its `loss_scale` clause:
    /// dynamic, dynamic(N) (doubling after N steps in a row without an overflow) or a scale.
    #[arg(long, value_name = "SCALE", value_parser = crate::parse_loss_scale)]
    loss_scale: Option<tpc::ir::LossScale>,
    /// For a program with `train`: the number of training steps.
    #[arg(long, default_value_t = 1, value_name = "N")]
    steps: usize,
    /// For a program with `train`: save sharded checkpoints into DIR (each rank writes only its
    /// own blocks), after the last step and every --save-every steps.
    #[arg(long, value_name = "DIR")]
    save: Option<String>,
    /// With --save: also save after every K steps (counted over the whole training).
    #[arg(long, value_name = "K", requires = "save", value_parser = clap::value_parser!(u64).range(1..))]
    save_every: Option<u64>,
    /// With --save: keep only the N newest checkpoints (default: keep all).
    #[arg(long, value_name = "N", requires = "save", value_parser = clap::value_parser!(u64).range(1..))]
    keep: Option<u64>,
    /// For a program with `train`: continue the training saved in DIR (on any mesh): its
    /// params, optimizer state and step count.
    #[arg(long, value_name = "DIR", conflicts_with = "params")]
    load: Option<String>,
    /// For a program with `train`: write one JSON line per step (`{"step", "loss", "time_s"}`).
    #[arg(long, value_name = "PATH")]
    log: Option<String>,
    /// For a program with `train`: write each trained param's gradient (global, by the param's
    /// name) to this .npz archive.
    #[arg(long, value_name = "G.npz")]
    grads: Option<String>,
    #[command(flatten)]
    device: DeviceArgs,
}

impl RunArgs {
    /// The planner options of the command line.
    fn plan_options(&self) -> tpc::plan::Options {
        tpc::plan::Options {
            microbatches: self.microbatches,
            schedule: self
                .schedule
                .unwrap_or(tpc::pipeline::schedule::ScheduleKind::OneFOneB),
            recompute: self.recompute.unwrap_or_default(),
            zero: self.zero.unwrap_or(0),
        }
    }
}

/// Runs `tpc run`: one thread per device, or, when built with the `mpi` feature and started by
/// an MPI launcher (`mpirun -n N tpc run ...`), one process per device.
pub fn run(args: &RunArgs) -> Result<(), Failure> {
    #[cfg(feature = "mpi")]
    if tpc::exec::mpi::launched_by_mpirun() {
        return run_mpi(args);
    }
    #[cfg(not(feature = "mpi"))]
    refuse_mpirun_without_mpi()?;
    let flags = validate(args)?;
    let plan = match load(args, flags.device)? {
        Runnable::Train(t) => {
            let (c, src, mesh) = *t;
            return train::run(args, train::prepare(args, c, src, mesh, &flags, None)?);
        }
        Runnable::Plan(plan) => *plan,
    };
    forward_steps(args, &plan)?;
    check_grads_wanted(args, &plan)?;
    memory::check_fits(&plan, args, flags.max_memory, plan.mesh.num_devices())?;
    let source = leaf_source(args, &plan)?;
    let bar = progress(args.repeat);
    let tick = |_: usize| bar.inc(1);
    let out = run_threads(&plan, &source, args.repeat, Some(&tick)).map_err(|e| anyhow!("{e}"))?;
    bar.finish_and_clear();
    finish(args, &plan, &source, &out)
}

/// An error when two output flags name the same file (the second would overwrite the first).
fn distinct_outputs(outputs: &[(&str, &Option<String>)]) -> Result<(), Failure> {
    let named: Vec<(&str, PathBuf)> = outputs
        .iter()
        .filter_map(|(w, p)| {
            let p = Path::new(p.as_deref()?);
            Some((
                *w,
                std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf()),
            ))
        })
        .collect();
    for (i, (a, pa)) in named.iter().enumerate() {
        if let Some((b, _)) = named[i + 1..].iter().find(|(_, pb)| pb == pa) {
            return Err(anyhow!(
                "{a} and {b} name the same file `{}`: give each its own path",
                pa.display()
            )
            .into());
        }
    }
    Ok(())
}

/// Under an MPI launcher with several processes, a build without the `mpi` feature would run
/// every rank in every process: refused.
#[cfg(not(feature = "mpi"))]
fn refuse_mpirun_without_mpi() -> Result<(), Failure> {
    let size = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .filter_map(|v| std::env::var(v).ok()?.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(1);
    if size > 1 {
        return Err(anyhow!(
            "started by an MPI launcher with {size} processes, but this tpc was built without \
             MPI (each process would run every rank): build with `--features mpi`, or run \
             without mpirun"
        )
        .into());
    }
    Ok(())
}

/// An error when a forward program (or a plan document) is given --steps, --log, --save or
/// --load.
fn forward_steps(args: &RunArgs, plan: &Plan) -> Result<(), Failure> {
    if args.save.is_some() || args.load.is_some() {
        let what = match plan.global.is_training_step() {
            true => "a plan document runs its training step once: train from the .tpl program",
            false => "this program has no `train` statement (or --forward-only was given)",
        };
        return Err(anyhow!("--save and --load checkpoint a training run: {what}").into());
    }
    if (args.steps != 1 || args.log.is_some()) && plan.global.is_training_step() {
        return Err(anyhow!(
            "--steps and --log train from the .tpl program: a plan document runs its training \
             step once (with --check, against the reference's step)"
        )
        .into());
    }
    if args.steps != 1 || args.log.is_some() {
        return Err(anyhow!(
            "--steps and --log train a program with a `train` statement (without --forward-only)"
        )
        .into());
    }
    Ok(())
}

/// The flags `validate` parsed.
struct Flags {
    /// --max-memory in bytes.
    max_memory: Option<u128>,
    /// The device constants.
    device: Device,
}

/// Checks the flags that do not depend on the program, before any work: --repeat, the
/// tolerances, --max-memory, the device constants, and that every output path can be written.
fn validate(args: &RunArgs) -> Result<Flags, Failure> {
    if args.repeat == 0 {
        return Err(anyhow!("--repeat must be at least 1").into());
    }
    for (name, v) in [("--rtol", args.rtol), ("--atol", args.atol)] {
        if !v.is_finite() || v < 0.0 {
            return Err(anyhow!("{name} {v}: a tolerance must be a finite number >= 0").into());
        }
    }
    let max_memory = match &args.max_memory {
        Some(m) => Some(tpc::cost::parse_size(m).map_err(|e| anyhow!("--max-memory `{m}`: {e}"))?),
        None => None,
    };
    let device = args.device.device()?;
    if args.steps == 0 {
        return Err(anyhow!("--steps must be at least 1").into());
    }
    for (what, dir) in [("--save", &args.save), ("--load", &args.load)] {
        if dir.as_deref().is_some_and(|d| d.trim().is_empty()) {
            return Err(anyhow!("{what} needs a directory, not an empty path").into());
        }
    }
    let outputs = [
        ("--out", &args.out),
        ("--stats", &args.stats),
        ("--grads", &args.grads),
        ("--log", &args.log),
    ];
    for (what, path) in outputs {
        if let Some(p) = path {
            files::check_writable(what, Path::new(p)).map_err(|e| anyhow!("{e}"))?;
        }
    }
    distinct_outputs(&outputs)?;
    Ok(Flags { max_memory, device })
}

/// Under MPI: every rank compiles (or loads) the plan and its leaves itself, the ranks agree that
/// all of them succeeded (else the lowest failing rank reports, every rank exits non-zero), run
/// their shard of the plan, and rank 0 gathers the output blocks and does what the thread run
/// does with them (step times, --out, --stats, --check). A rank that fails during the run reports
/// `rank R: ...` and ends the whole job by `MPI_Abort`.
#[cfg(feature = "mpi")]
fn run_mpi(args: &RunArgs) -> Result<(), Failure> {
    use tpc::exec::mpi::Mpi;

    let mpi = Mpi::init().map_err(|e| anyhow!("cannot start MPI: {e}"))?;
    let (rank, size) = (mpi.rank(), mpi.size());
    let setup = mpi_job(args, size);
    // Every rank learns whether any failed, so none goes on to wait for a missing peer. The
    // lowest failing rank reports; a barrier keeps the others from exiting (and mpirun from
    // killing the job) before its report is out; then every rank exits non-zero.
    let first_failed = mpi.min_over_ranks(if setup.is_err() {
        rank as u64
    } else {
        u64::MAX
    });
    let job = match setup {
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
    match job {
        MpiJob::Forward(plan, source) => run_mpi_forward(args, &mut t, &plan, &source),
        MpiJob::Train(job) => train::run_mpi(args, &mut t, *job),
    }
}

/// What one MPI process runs.
#[cfg(feature = "mpi")]
enum MpiJob {
    /// A forward plan and where its leaves come from.
    Forward(Box<Plan>, LeafSource),
    /// Training steps.
    Train(Box<train::Job>),
}

/// Compiles (or loads) the plan and its leaves on this process, as every rank does.
#[cfg(feature = "mpi")]
fn mpi_job(args: &RunArgs, size: usize) -> Result<MpiJob, Failure> {
    let flags = validate(args)?;
    let job = match load(args, flags.device)? {
        Runnable::Train(t) => {
            let (c, src, mesh) = *t;
            let job = train::prepare(args, c, src, mesh, &flags, Some(1))?;
            MpiJob::Train(Box::new(job))
        }
        Runnable::Plan(plan) => {
            forward_steps(args, &plan)?;
            memory::check_fits(&plan, args, flags.max_memory, 1)?;
            let source = leaf_source(args, &plan)?;
            MpiJob::Forward(plan, source)
        }
    };
    let plan = match &job {
        MpiJob::Forward(p, _) => &**p,
        MpiJob::Train(j) => &j.plan,
    };
    let devices = plan.mesh.num_devices();
    if devices != size as u64 {
        return Err(anyhow!(
            "the plan's mesh {} has {devices} devices but MPI started {size} processes: \
             run it with `mpirun -n {devices}`",
            plan.mesh
        )
        .into());
    }
    Ok(job)
}

/// This process's rank of a forward plan; rank 0 gathers the output blocks and does what the
/// thread run does with them (step times, --out, --stats, --check). A rank that fails during
/// the run reports `rank R: ...` and ends the whole job by `MPI_Abort`.
#[cfg(feature = "mpi")]
fn run_mpi_forward(
    args: &RunArgs,
    t: &mut tpc::exec::mpi::MpiTransport<'_>,
    plan: &Plan,
    source: &LeafSource,
) -> Result<(), Failure> {
    use tpc::exec::mpi::{decode_rank_output, encode_rank_output};
    use tpc::exec::spmd::{assemble, run_rank};
    let rank = tpc::exec::comm::Transport::rank(t);
    let bar = progress(if rank == 0 { args.repeat } else { 1 });
    let tick = |_: usize| bar.inc(1);
    let mine = match run_rank(plan, t, source, args.repeat, Some(&tick)) {
        Ok(o) => o,
        Err(e) => {
            bar.finish_and_clear();
            crate::say_err(&format!("error: {e}"));
            t.abort_job(1)
        }
    };
    bar.finish_and_clear();
    let Some(ranks) = gather(t, mine, encode_rank_output, decode_rank_output) else {
        return Ok(());
    };
    if let Some(bad) = ranks.iter().position(|o| {
        o.outputs.len() != plan.local.outputs().len() || o.step_times.len() != args.repeat
    }) {
        crate::say_err(&format!(
            "error: rank 0: rank {bad} sent the wrong number of outputs or step times"
        ));
        t.abort_job(1)
    }
    let out = match assemble(plan, ranks) {
        Ok(out) => out,
        Err(e) => {
            crate::say_err(&format!("error: rank 0: {e}"));
            t.abort_job(1)
        }
    };
    finish(args, plan, source, &out)
}

/// Every rank's result on rank 0 (its own first), `None` on the others, which send theirs;
/// a message that cannot be sent or read ends the job.
#[cfg(feature = "mpi")]
fn gather<T>(
    t: &mut tpc::exec::mpi::MpiTransport<'_>,
    mine: T,
    encode: fn(&T) -> tpc::exec::comm::Message,
    decode: fn(&tpc::exec::comm::Message) -> Result<T, String>,
) -> Option<Vec<T>> {
    use tpc::exec::comm::Transport;
    let (rank, size) = (t.rank(), t.world());
    if rank != 0 {
        if let Err(e) = t.send(0, encode(&mine)) {
            crate::say_err(&format!(
                "error: rank {rank}: sending the outputs to rank 0: {e}"
            ));
            t.abort_job(1)
        }
        return None;
    }
    let mut all = vec![mine];
    for r in 1..size {
        match t
            .recv(r)
            .map_err(|e| e.to_string())
            .and_then(|m| decode(&m))
        {
            Ok(o) => all.push(o),
            Err(e) => {
                crate::say_err(&format!(
                    "error: rank 0: receiving the outputs of rank {r}: {e}"
                ));
                t.abort_job(1)
            }
        }
    }
    Some(all)
}

/// Prints a setup failure as `main` would (prefixed by the rank unless it is rank 0); returns the
/// exit code `main` would give it.
#[cfg(feature = "mpi")]
fn report(e: Failure, rank: usize) -> i32 {
    match e {
        Failure::Compile(b) => {
            let (e, src) = *b;
            crate::say_err(e.render(src.as_ref()).trim_end());
            if e.is_internal() {
                70
            } else {
                1
            }
        }
        Failure::Other(e) if rank == 0 => {
            crate::say_err(&format!("error: {e:#}"));
            1
        }
        Failure::Other(e) => {
            crate::say_err(&format!("error: rank {rank}: {e:#}"));
            1
        }
    }
}

/// What follows a run: step times, --check, then --out and --stats. A run whose check failed
/// writes its outputs beside the requested paths (`y.failed.npz`), leaving the last good ones.
fn finish(
    args: &RunArgs,
    plan: &Plan,
    source: &LeafSource,
    out: &RunOutput,
) -> Result<(), Failure> {
    report_steps(out);
    let failed = if args.check {
        check(args, plan, source, out)?
    } else {
        Vec::new()
    };
    let mut w = Written::new(&failed);
    w.npz(&args.out, || &out.outputs)?;
    w.npz(&args.grads, || gradients(&out.outputs))?;
    w.text(&args.stats, || stats_json(plan, &out.stats))?;
    w.finish(args)
}

/// The files a run writes: each in place, or, when `--check` failed, beside its target
/// (`y.failed.npz`), so the last good one stays.
pub(super) struct Written<'a> {
    /// What `--check` found different (empty: it passed, or did not run).
    failed: &'a [String],
    /// Each file written: the path asked for and the path written.
    files: Vec<(&'a str, PathBuf)>,
}

impl<'a> Written<'a> {
    /// Nothing written yet; `failed` is what the check found different.
    pub(super) fn new(failed: &'a [String]) -> Self {
        Written {
            failed,
            files: Vec::new(),
        }
    }

    /// Where a file asked for at `path` goes.
    fn place(&mut self, path: &'a str) -> PathBuf {
        let p = if self.failed.is_empty() {
            PathBuf::from(path)
        } else {
            files::failed_path(Path::new(path))
        };
        self.files.push((path, p.clone()));
        p
    }

    /// Writes `arrays()` as an .npz archive at `asked`, when it is asked for.
    pub(super) fn npz<M: std::borrow::Borrow<BTreeMap<String, Tensor>>>(
        &mut self,
        asked: &'a Option<String>,
        arrays: impl FnOnce() -> M,
    ) -> Result<(), Failure> {
        let Some(path) = asked else { return Ok(()) };
        let p = self.place(path);
        npz::write(&p.to_string_lossy(), arrays().borrow()).map_err(|e| anyhow!("{e}"))?;
        Ok(())
    }

    /// Writes `text()` at `asked`, when it is asked for.
    pub(super) fn text(
        &mut self,
        asked: &'a Option<String>,
        text: impl FnOnce() -> String,
    ) -> Result<(), Failure> {
        let Some(path) = asked else { return Ok(()) };
        let p = self.place(path);
        write_output(Some(&p), &text())?;
        Ok(())
    }

    /// Says where each file of a failed run went.
    pub(super) fn report(&self) {
        for (asked, p) in &self.files {
            say_err(&format!(
                "the outputs of this failed run are in `{}`; `{asked}` is left as it was",
                p.display()
            ));
        }
    }

    /// Done when the check passed; else says where each file went and fails naming what
    /// differs.
    pub(super) fn finish(self, args: &RunArgs) -> Result<(), Failure> {
        if self.failed.is_empty() {
            return Ok(());
        }
        self.report();
        Err(anyhow!(
            "--check: {} differ{} from the unsharded reference beyond rtol {} / atol {}",
            self.failed.join(", "),
            if self.failed.len() == 1 { "s" } else { "" },
            args.rtol,
            args.atol
        )
        .into())
    }
}

/// The gradient outputs, keyed by their params' names.
fn gradients(outputs: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    outputs
        .iter()
        .filter_map(|(k, t)| Some((param_of_grad(k)?.to_string(), t.clone())))
        .collect()
}

/// `--grads` needs a plan with gradient outputs: a program with `train`, not `--forward-only`.
fn check_grads_wanted(args: &RunArgs, plan: &Plan) -> Result<(), Failure> {
    let has = plan
        .global
        .outputs()
        .iter()
        .any(|o| param_of_grad(&o.name).is_some());
    match (&args.grads, has) {
        (Some(_), false) => Err(anyhow!(
            "--grads: `{}` computes no gradients (it needs a `train` statement{})",
            args.file,
            if args.forward_only {
                " and no --forward-only"
            } else {
                ""
            }
        )
        .into()),
        _ => Ok(()),
    }
}

/// True when `bytes` are a plan document rather than a .tpl source: a JSON object (a .tpl file
/// cannot start with `{`), whatever the file's extension.
fn is_plan_document(path: &str, bytes: &[u8]) -> bool {
    path.ends_with(".json") || bytes.trim_ascii_start().starts_with(b"{")
}

/// What `tpc run` runs.
enum Runnable {
    /// The training steps of a .tpl program with `train`: its compiled step, its source (for
    /// errors) and the mesh asked for.
    Train(Box<(driver::Compiled, SourceFile, Option<Mesh>)>),
    /// A forward program, or a saved plan, run as one function.
    Plan(Box<Plan>),
}

/// Reads and compiles `args.file` once: a plan document, or a .tpl program compiled to its
/// training step (without --forward-only) or planned as its forward.
fn load(args: &RunArgs, device: Device) -> Result<Runnable, Failure> {
    let mesh = run_mesh(args)?;
    let bytes = driver::read_bytes(&args.file).map_err(|e| fail(e, None))?;
    if is_plan_document(&args.file, &bytes) {
        return load_plan_document(args, &bytes, mesh, device).map(|p| Runnable::Plan(Box::new(p)));
    }
    let overrides = overrides(args)?;
    let src = driver::source_from_bytes(&args.file, bytes).map_err(|e| fail(e, None))?;
    let c = crate::compile_source(
        &src,
        &overrides,
        args.forward_only,
        args.grads.is_some(),
        args.loss_scale,
    )?;
    if c.loss.is_some() {
        return Ok(Runnable::Train(Box::new((c, src, mesh))));
    }
    driver::plan_declared(c.graph, mesh, device, &args.plan_options())
        .map(|p| Runnable::Plan(Box::new(p)))
        .map_err(|e| fail(e, Some(src)))
}

/// The `--degree` / `--mesh` of the run.
fn run_mesh(args: &RunArgs) -> Result<Option<Mesh>, Failure> {
    Ok(match (args.degree, &args.mesh) {
        (Some(d), _) => Some(Mesh::degree(d).map_err(|e| fail(e, None))?),
        (None, Some(m)) => Some(Mesh::parse(m).map_err(|e| fail(e, None))?),
        (None, None) => None,
    })
}

/// The `--set` overrides.
fn overrides(args: &RunArgs) -> Result<Vec<(String, i64)>, Failure> {
    args.set
        .iter()
        .map(|s| driver::parse_set(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(e, None))
}

/// Loads a saved plan; the planner's flags (--set, --microbatches, --schedule, device constants
/// other than the plan's) cannot apply, and a --mesh/--degree must be the plan's mesh.
fn load_plan_document(
    args: &RunArgs,
    bytes: &[u8],
    mesh: Option<Mesh>,
    device: Device,
) -> Result<Plan, Failure> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| anyhow!("{}: a plan document is UTF-8 JSON text", args.file))?;
    let plan = tpc::emit::plan_json::from_json(text).map_err(|e| anyhow!("{}: {e}", args.file))?;
    let planner = [
        ("--set applies", !args.set.is_empty()),
        ("--microbatches applies", args.microbatches.is_some()),
        ("--schedule applies", args.schedule.is_some()),
        ("--recompute applies", args.recompute.is_some()),
        ("--zero applies", args.zero.is_some()),
        ("--loss-scale applies", args.loss_scale.is_some()),
        (
            "the cost model's flags (--flops, --bandwidth, --latency, --bucket-mb, ...) apply",
            device != Device::default() && device != plan.device,
        ),
    ];
    if let Some((flag, _)) = planner.iter().find(|(_, given)| *given) {
        return Err(anyhow!(
            "{flag} to .tpl programs; the plan `{}` is already compiled (recompile it with \
             `tpc compile ... --emit json`)",
            args.file
        )
        .into());
    }
    plan.device
        .check()
        .map_err(|e| anyhow!("{}: the plan's device constants: {e}", args.file))?;
    if let Some(m) = mesh {
        // The microbatch axis is the plan's own, not a device axis to give.
        let temporal = plan
            .mesh
            .temporal()
            .map(|a| plan.mesh.axis_name(a).to_string());
        let declared: Vec<String> = plan
            .global
            .mesh_axes
            .iter()
            .filter(|a| Some(*a) != temporal.as_ref())
            .cloned()
            .collect();
        m.check_declared(&declared).map_err(|e| fail(e, None))?;
        let m = m.with_declared(&declared);
        if m != plan.mesh.devices_mesh() {
            return Err(anyhow!(
                "the plan `{}` was compiled for mesh {}, not {m}",
                args.file,
                plan.mesh
            )
            .into());
        }
    }
    Ok(plan)
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
            let arrays =
                tpc::exec::arrays::load(path, &plan.global, params).map_err(|e| anyhow!("{e}"))?;
            all.extend(arrays);
        }
    }
    tpc::exec::leaves::states_from_params(&plan.global, &mut all);
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
        say_err(&format!("step {}: {:.3} ms", i + 1, s * 1e3));
    }
    let (min, median) = min_median(t);
    say_err(&format!(
        "step time: min {:.3} ms, median {:.3} ms over {} steps",
        min * 1e3,
        median * 1e3,
        t.len()
    ));
}

fn min_median(t: &[f64]) -> (f64, f64) {
    let mut v = t.to_vec();
    v.sort_by(f64::total_cmp);
    (
        v.first().copied().unwrap_or(0.0),
        v.get(v.len() / 2).copied().unwrap_or(0.0),
    )
}

pub(super) fn stats_json(plan: &Plan, stats: &tpc::exec::spmd::RunStats) -> String {
    let (min, median) = min_median(&stats.step_times);
    let mut collectives = serde_json::Map::new();
    for kind in tpc::cost::CollectiveKind::ALL {
        let (count, bytes) = stats
            .collectives
            .get(kind.name())
            .copied()
            .unwrap_or((0, 0));
        collectives.insert(
            kind.name().into(),
            serde_json::json!({ "count": count, "bytes": bytes }),
        );
    }
    let mut doc = serde_json::json!({
        "step_time_s": { "min": min, "median": median },
        "ranks": plan.mesh.num_devices(),
        "collectives": collectives,
        "peak_bytes_per_rank": stats.peak_bytes_per_rank,
    });
    if !stats.pipeline.is_empty() {
        let stages: Vec<serde_json::Value> = stats
            .pipeline
            .iter()
            .map(|s| {
                serde_json::json!({
                    "stage": s.stage,
                    "sends": s.sends,
                    "send_bytes": s.send_bytes,
                    "step_sends": s.step_sends,
                    "max_in_flight": s.max_in_flight,
                    "busy_s": s.busy_s,
                    "schedule_s": s.schedule_s,
                })
            })
            .collect();
        let sends: u64 = stats.pipeline.iter().map(|s| s.sends).sum();
        doc["pipeline"] = serde_json::json!({ "sends_per_step": sends, "stages": stages });
    }
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

/// Runs the reference on the same leaves and prints, per output, how the sharded run compares;
/// returns the outputs that differ.
fn check(
    args: &RunArgs,
    plan: &Plan,
    source: &LeafSource,
    out: &RunOutput,
) -> Result<Vec<String>, Failure> {
    let leaves = global_leaves(&plan.global, source).map_err(|e| anyhow!("{e}"))?;
    let t = Instant::now();
    let want =
        reference::run(&plan.global, &leaves, &leaves).map_err(|e| anyhow!("reference: {e}"))?;
    // A training step's updated params are compared as training runs compare them: each
    // element within the tolerance or within its own rounding sensitivity (AdamW on a gradient
    // near zero), measured by a perturbed reference run.
    let noisy = match plan.global.is_training_step() {
        true => Some(
            reference::run_perturbed(&plan.global, &leaves, train::PERTURBATION, 1)
                .map_err(|e| anyhow!("perturbed reference: {e}"))?,
        ),
        false => None,
    };
    let ref_time = t.elapsed().as_secs_f64();
    let tol = compare::Tolerance {
        rtol: args.rtol,
        atol: args.atol,
        equal_nan: args.equal_nan,
    };
    let mut bad = Vec::new();
    for (name, w) in &want {
        let g = out
            .outputs
            .get(name)
            .ok_or_else(|| anyhow!("output `{name}` missing from the sharded run"))?;
        let verdict = match noisy.as_ref().and_then(|n| n.get(name)) {
            Some(n) => compare::compare_noisy(g, w, Some(n), &tol),
            None => compare::compare(g, w, &tol),
        };
        say_out(&format!("check {name}: {verdict}"));
        if !verdict.is_close() {
            bad.push(name.clone());
        }
    }
    say_err(&format!("reference run: {:.3} ms", ref_time * 1e3));
    Ok(bad)
}
