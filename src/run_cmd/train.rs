//! `tpc run` on a program with `train`: N training steps of the compiled step (forward,
//! backward, update). The ranks keep their blocks of the params and optimizer state from step
//! to step (`exec::train`); each step's inputs come from `--inputs` (an array with one extra
//! leading dim of K gives step i its slice `i mod K`, one of the declared shape serves every
//! step) or are generated per step from `--seed`. `--check` runs the same steps on the
//! unsharded reference and compares every step's loss and the final params.

use super::compare::{self, Tolerance};
use super::{RunArgs, Written};
use crate::{fail, say_err, say_out, Failure};
use anyhow::anyhow;
use std::collections::BTreeMap;
use std::time::Instant;
use tpc::diag::SourceFile;
use tpc::driver::{self, Compiled};
use tpc::exec::checkpoint::hash::program_hash;
use tpc::exec::leaves::{global_leaves, seeded_inputs, LeafSource};
use tpc::exec::train::{
    self as exec_train, loss_value, step_seed, step_slice, train_threads_with, Steps,
};
use tpc::exec::{reference, Tensor};
use tpc::ir::Graph;
use tpc::mesh::Mesh;
use tpc::plan::Plan;

/// One training run's record: per step its loss and seconds, and the final leaves.
struct Trained {
    /// Steps done before the run (after a --load).
    first: usize,
    losses: Vec<(f32, f64)>,
    leaves: BTreeMap<String, Tensor>,
    first_outputs: BTreeMap<String, Tensor>,
    /// Measured figures of the sharded run's last step (none for the reference).
    stats: Option<tpc::exec::spmd::RunStats>,
    /// With a dynamic loss scale: per step, whether it was skipped.
    skipped: Vec<bool>,
    /// With a dynamic loss scale: per step, the scale it ran with.
    scales: Vec<f32>,
}

/// A training run ready to start: the step compiled and planned, and where the ranks take
/// their leaves.
pub(super) struct Job {
    /// The compiled step (its graph moved into the plan).
    c: Compiled,
    /// The planned step.
    pub(super) plan: Plan,
    /// The first step's leaves.
    source: LeafSource,
    /// The inputs given per step.
    stepped: Leaves,
    /// Where the run stands (after a --load) and where it saves.
    ck: exec_train::Checkpointing,
    /// With --check after --load: the reference's start, read before the run can prune the
    /// checkpoint it came from.
    check_start: Option<Start>,
    /// The lock of the save directory, held by the process that commits (threads: this one).
    _lock: Option<std::fs::File>,
}

/// Plans the step `c` and loads its leaves; `ranks_here` is how many ranks share this
/// process's memory (all of them when `None`).
pub(super) fn prepare(
    args: &RunArgs,
    mut c: Compiled,
    src: SourceFile,
    mesh: Option<Mesh>,
    flags: &super::Flags,
    ranks_here: Option<u64>,
) -> Result<Job, Failure> {
    if args.repeat != 1 {
        return Err(anyhow!(
            "--repeat times one step of a forward program; a training run takes --steps"
        )
        .into());
    }
    let hash = program_hash(&c.graph, loss_name(&c), &c.carried);
    // The plan holds the program from here on.
    let graph = std::mem::take(&mut c.graph);
    let plan = driver::plan_declared(graph, mesh, flags.device, &args.plan_options())
        .map_err(|e| fail(e, Some(src.clone())))?;
    let here = ranks_here.unwrap_or_else(|| plan.mesh.num_devices());
    super::memory::check_fits(&plan, args, flags.max_memory, here)?;
    let (mut source, stepped) = rank_source(args, &plan)?;
    let mut ck = exec_train::Checkpointing::default();
    if let Some(dir) = &args.load {
        let reader = open_checkpoint(dir, &hash, &plan)?;
        warn_other_inputs(args, dir, &reader)?;
        ck.first = reader.index.step as usize;
        source = LeafSource::Checkpoint {
            reader: Box::new(reader),
            rest: Box::new(source),
        };
    }
    if let Some(dir) = &args.save {
        ck.save = Some(save_spec(args, dir, hash, &src, &plan)?);
    }
    let check_start = match args.check && args.load.is_some() {
        true => Some(start_leaves(args, &plan, &source, ck.first)?),
        false => None,
    };
    let lock = match (&args.save, ranks_here) {
        (Some(dir), None) => Some(lock_save_dir(dir)?),
        _ => None,
    };
    Ok(Job {
        c,
        plan,
        source,
        stepped,
        ck,
        check_start,
        _lock: lock,
    })
}

/// A warning when the checkpoint `dir` (`reader`) was trained on other inputs than this run
/// gives: another `--inputs` file (by content) or another `--seed` for generated ones.
fn warn_other_inputs(
    args: &RunArgs,
    dir: &str,
    reader: &tpc::exec::checkpoint::load::Reader,
) -> Result<(), Failure> {
    let digest = inputs_digest(args)?;
    let name = |i: &Option<String>| match i {
        Some(d) => format!("--inputs of sha256 {}", &d[..d.len().min(12)]),
        None => "generated inputs".to_string(),
    };
    let (was, now) = if reader.index.inputs != digest {
        (name(&reader.index.inputs), name(&digest))
    } else if reader.index.seed != args.seed && args.inputs.is_none() {
        let seed = |s| format!("--seed {s}");
        (seed(reader.index.seed), seed(args.seed))
    } else {
        return Ok(());
    };
    say_err(&format!(
        "warning: `{dir}` was trained with {was}, this run uses {now}: its inputs are not those \
         the uninterrupted run would have read"
    ));
    Ok(())
}

/// Where and how the run saves: `dir` created if missing, refused when it holds something
/// other than checkpoints, or a checkpoint of another program (`hash`).
fn save_spec(
    args: &RunArgs,
    dir: &str,
    hash: String,
    src: &SourceFile,
    plan: &Plan,
) -> Result<exec_train::SaveSpec, Failure> {
    let path = std::path::Path::new(dir);
    check_save_dir(args, dir, &hash)?;
    std::fs::create_dir_all(path)
        .map_err(|e| anyhow!("--save `{dir}`: {}", tpc::files::os_reason(&e)))?;
    tpc::files::check_writable("--save", &path.join("latest")).map_err(|e| anyhow!("{e}"))?;
    let abort = std::env::var("TPC_TEST_SAVE_ABORT").ok();
    Ok(exec_train::SaveSpec {
        dir: dir.into(),
        every: args.save_every.unwrap_or(0) as usize,
        facts: tpc::exec::checkpoint::save::RunFacts {
            program: hash,
            source: src.name.clone(),
            seed: args.seed,
            inputs: inputs_digest(args)?,
            mesh: plan.mesh.to_string(),
        },
        keep: args.keep.map(|k| k as usize),
        abort: abort.and_then(|a| tpc::exec::checkpoint::save::AbortAt::parse(&a)),
    })
}

/// An error when the save directory `dir` holds something other than checkpoints, checkpoints
/// this run does not continue (`--load` them), or checkpoints of another program (`hash`).
fn check_save_dir(args: &RunArgs, dir: &str, hash: &str) -> Result<(), Failure> {
    let path = std::path::Path::new(dir);
    let entries: Vec<String> = match std::fs::read_dir(path) {
        Ok(rd) => rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect(),
        Err(_) if !path.exists() => Vec::new(),
        Err(e) => return Err(anyhow!("--save `{dir}`: {}", tpc::files::os_reason(&e)).into()),
    };
    // Under MPI every rank checks while another may be probing the directory (a
    // `.latest.tpc-PID-N.tmp` of `check_writable`) or writing a step: those names are ours too.
    let ours = |n: &String| {
        ["latest", ".lock", ".latest.tmp"].contains(&n.as_str())
            || n.starts_with("step-")
            || n.starts_with(".tmp-step-")
            || n.starts_with(".old-step-")
            || (n.starts_with(".latest.tpc-") && n.ends_with(".tmp"))
    };
    if !entries.is_empty() && !entries.iter().any(ours) {
        return Err(anyhow!(
            "--save `{dir}` is not empty and holds no tpc checkpoint: give a new or empty directory"
        )
        .into());
    }
    let holds = entries
        .iter()
        .any(|n| n == "latest" || n.starts_with("step-"));
    if holds && !continues(path, args.load.as_deref()) {
        return Err(anyhow!(
            "--save `{dir}` already holds checkpoints: continue them with --load {dir} (or \
             --load {dir}/step-N), or save into another directory"
        )
        .into());
    }
    if entries.iter().any(|n| n == "latest") {
        let r = tpc::exec::checkpoint::load::Reader::open(path)
            .map_err(|e| anyhow!("--save `{dir}`: its latest checkpoint cannot be read: {e}"))?;
        if r.index.program != hash {
            return Err(anyhow!(
                "--save `{dir}` holds checkpoints of another program ({}, this one is \
                 {hash}): give another directory",
                r.index.program
            )
            .into());
        }
    }
    Ok(())
}

/// The sha256 of the `--inputs` file (what a checkpoint records of the data).
fn inputs_digest(args: &RunArgs) -> Result<Option<String>, Failure> {
    let Some(p) = &args.inputs else {
        return Ok(None);
    };
    let d = tpc::exec::checkpoint::file_sha256(std::path::Path::new(p))
        .map_err(|e| anyhow!("--inputs `{p}`: {}", tpc::files::os_reason(&e)))?;
    Ok(Some(d))
}

/// True when the run continues the checkpoints in `save`: it loads `save` itself or one of
/// its step directories.
fn continues(save: &std::path::Path, load: Option<&str>) -> bool {
    let Some(load) = load.map(std::path::Path::new) else {
        return false;
    };
    let canon = |p: &std::path::Path| match p.as_os_str().is_empty() {
        true => std::fs::canonicalize("."),
        false => std::fs::canonicalize(p),
    };
    let save = canon(save).ok();
    save.is_some()
        && (canon(load).ok() == save || load.parent().and_then(|p| canon(p).ok()) == save)
}

/// Takes the lock of the save directory `dir` for this process's lifetime: two runs saving
/// into one directory would mix their files.
pub(super) fn lock_save_dir(dir: &str) -> Result<std::fs::File, Failure> {
    let path = std::path::Path::new(dir).join(".lock");
    if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_file()) {
        return Err(anyhow!("--save `{dir}`: `.lock` there is not a regular file").into());
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow!("--save `{dir}`: {}", tpc::files::os_reason(&e)))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => {
            Err(anyhow!("--save `{dir}`: another run is saving into it").into())
        }
        Err(std::fs::TryLockError::Error(e)) => Err(anyhow!(
            "--save `{dir}`: cannot lock it: {}",
            tpc::files::os_reason(&e)
        )
        .into()),
    }
}

/// Opens the checkpoint `dir` for `plan`: of the same program (`hash`), with every param and
/// optimizer state of the program at its global shape.
fn open_checkpoint(
    dir: &str,
    hash: &str,
    plan: &Plan,
) -> Result<tpc::exec::checkpoint::load::Reader, Failure> {
    let reader = tpc::exec::checkpoint::load::Reader::open(std::path::Path::new(dir))
        .map_err(|e| anyhow!("--load: {e}"))?;
    if reader.index.program != hash {
        return Err(anyhow!(
            "checkpoint `{dir}` was saved from another program ({}, this one is {hash}): pass \
             the .tpl and --set values it was trained with",
            reader.index.program
        )
        .into());
    }
    let g = &plan.global;
    let mut ours = std::collections::BTreeSet::new();
    for (_, n) in g.nodes() {
        let (Some(name), true) = (
            n.op.leaf_name(),
            matches!(n.op, tpc::ir::Op::Param { .. } | tpc::ir::Op::State { .. }),
        ) else {
            continue;
        };
        ours.insert(name);
        let ty = g.ty(n.outputs[0]);
        match reader.index.tensors.get(name) {
            None => return Err(anyhow!("checkpoint `{dir}` has no `{name}`").into()),
            Some(t) if t.shape != ty.shape || t.declared != ty.dtype.to_string() => {
                return Err(anyhow!(
                    "checkpoint `{dir}`: `{name}` is {}{:?} there, {ty} here",
                    t.declared,
                    t.shape
                )
                .into())
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = reader
        .index
        .tensors
        .keys()
        .find(|n| !ours.contains(n.as_str()))
    {
        return Err(anyhow!("checkpoint `{dir}` has `{extra}`, which this program has not").into());
    }
    Ok(reader)
}

/// Runs `args.steps` steps of `job` on one thread per device.
/// A failed run keeps the losses of the steps that succeeded in `--log`, beside its target
/// (`NAME.failed.jsonl`).
pub(super) fn run(args: &RunArgs, job: Job) -> Result<(), Failure> {
    let bar = super::progress(args.steps);
    let first = job.ck.first;
    let done = std::sync::Mutex::new((Vec::new(), Instant::now()));
    let print = |s: usize, loss: f32| {
        bar.suspend(|| say_loss(first + s, loss));
        bar.inc(1);
        if let Ok(mut d) = done.lock() {
            let secs = d.1.elapsed().as_secs_f64();
            d.0.push((loss, secs));
            d.1 = Instant::now();
        }
    };
    let spec = spec(args, &job.c, &job.source, &job.stepped);
    let out = match test_poison() {
        None => train_threads_with(&job.plan, &spec, &job.ck, Some(&print)),
        Some(p) => {
            exec_train::train_ranks_poisoned(&job.plan, &spec, &job.ck, Some(&p), Some(&print))
                .and_then(|ranks| exec_train::assemble_trained(&job.plan, &spec, ranks))
        }
    };
    bar.finish_and_clear();
    match out {
        Ok(out) => finish(args, &job, trained(&job.c, job.ck.first, out)),
        Err(e) => {
            let losses = done.into_inner().map(|d| d.0).unwrap_or_default();
            if !losses.is_empty() {
                let failed = [String::from("the run")];
                let mut w = Written::new(&failed);
                w.text(&args.log, || log_lines(&losses, first, &Scales::default()))?;
                w.report();
            }
            Err(anyhow!("{e}").into())
        }
    }
}

/// A dynamic loss scale's record: per step whether it was skipped and the scale it ran with.
#[derive(Default)]
struct Scales<'a> {
    skipped: &'a [bool],
    scales: &'a [f32],
}

impl Scales<'_> {
    /// The scale each step ran with, when recorded for every step.
    fn per_step(&self) -> Option<Vec<f64>> {
        let ok = !self.scales.is_empty() && self.scales.len() == self.skipped.len();
        ok.then(|| self.scales.iter().map(|&s| f64::from(s)).collect())
    }
}

/// One JSON line per step: `{"step", "loss", "time_s"}` (and, with a dynamic loss scale,
/// `"scale"` and `"skipped"`), steps counted from `first` done.
fn log_lines(losses: &[(f32, f64)], first: usize, scales: &Scales<'_>) -> String {
    let mut text = String::new();
    let per_step = scales.per_step().filter(|p| p.len() == losses.len());
    for (s, (loss, secs)) in losses.iter().enumerate() {
        let mut line = serde_json::json!({"step": first + s + 1, "loss": loss, "time_s": secs});
        if let Some(p) = &per_step {
            line["scale"] = serde_json::json!(p[s]);
            line["skipped"] = serde_json::json!(scales.skipped[s]);
        }
        text.push_str(&line.to_string());
        text.push('\n');
    }
    text
}

fn say_loss(s: usize, loss: f32) {
    say_out(&format!("step {}: loss {loss:.6}", s + 1));
}

/// Under MPI: this process's rank of `job`'s training; rank 0 gathers the ranks' results and
/// does what the thread run does with them. A rank that fails ends the job.
#[cfg(feature = "mpi")]
pub(super) fn run_mpi(
    args: &RunArgs,
    t: &mut tpc::exec::mpi::MpiTransport<'_>,
    job: Job,
) -> Result<(), Failure> {
    use tpc::exec::mpi::{decode_trained, encode_trained};
    use tpc::exec::train::{assemble_trained, train_rank_poisoned};
    let mut job = job;
    if let (Some(dir), 0) = (&args.save, tpc::exec::comm::Transport::rank(t)) {
        match lock_save_dir(dir) {
            Ok(f) => job._lock = Some(f),
            Err(e) => {
                if let Failure::Other(e) = e {
                    crate::say_err(&format!("error: {e}"));
                }
                t.abort_job(1)
            }
        }
    }
    let spec = spec(args, &job.c, &job.source, &job.stepped);
    let first = job.ck.first;
    let print = |s: usize, loss: f32| say_loss(first + s, loss);
    let poison = test_poison();
    let mine =
        match train_rank_poisoned(&job.plan, t, &spec, &job.ck, poison.as_ref(), Some(&print)) {
            Ok(o) => o,
            Err(e) => {
                crate::say_err(&format!("error: {e}"));
                t.abort_job(1)
            }
        };
    let Some(ranks) = super::gather(t, mine, encode_trained, decode_trained) else {
        return Ok(());
    };
    let out = match assemble_trained(&job.plan, &spec, ranks) {
        Ok(out) => out,
        Err(e) => {
            crate::say_err(&format!("error: rank 0: {e}"));
            t.abort_job(1)
        }
    };
    finish(args, &job, trained(&job.c, job.ck.first, out))
}

/// What follows the sharded run: `--check` against the reference, then the files.
fn finish(args: &RunArgs, job: &Job, sharded: Trained) -> Result<(), Failure> {
    if let Some(s) = sharded.losses.iter().position(|(l, _)| !l.is_finite()) {
        say_err(&format!(
            "warning: the loss is not finite from step {} on (non-finite inputs or params, or \
             a diverging run)",
            sharded.first + s + 1
        ));
    }
    let failed = if args.check {
        let read;
        let start = match &job.check_start {
            Some(start) => start,
            None => {
                read = start_leaves(args, &job.plan, &job.source, job.ck.first)?;
                &read
            }
        };
        check(args, &job.c, &job.plan, start, &sharded)?
    } else {
        Vec::new()
    };
    write_results(args, &job.c, &job.plan, &sharded, &failed)
}

/// Where the ranks take the first step's leaves (each its own blocks: generated from the seed
/// when no arrays are given) and the inputs given per step.
fn rank_source(args: &RunArgs, plan: &Plan) -> Result<(LeafSource, Leaves), Failure> {
    if args.params.is_none() && args.inputs.is_none() {
        return Ok((LeafSource::Seed(args.seed), Leaves::new()));
    }
    let start = start_leaves(args, plan, &LeafSource::Seed(args.seed), 0)?;
    Ok((LeafSource::Arrays(start.leaves), start.stepped))
}

/// The steps to run, as the ranks need them.
fn spec<'a>(
    args: &RunArgs,
    c: &'a Compiled,
    source: &'a LeafSource,
    stepped: &'a Leaves,
) -> Steps<'a> {
    Steps {
        count: args.steps,
        start: source,
        stepped,
        reseed: args.inputs.is_none().then_some(args.seed),
        carried: &c.carried,
        loss: loss_name(c),
        keep_first: args.grads.is_some(),
    }
}

fn loss_name(c: &Compiled) -> &str {
    c.loss.as_deref().unwrap_or("loss")
}

/// The run's record from the ranks' results: the final leaves from the last `next(NAME)`s.
fn trained(c: &Compiled, first: usize, mut out: exec_train::Trained) -> Trained {
    let mut leaves = Leaves::new();
    for (leaf, next) in &c.carried {
        if let Some(t) = out.last.remove(next) {
            leaves.insert(leaf.clone(), t);
        }
    }
    Trained {
        first,
        losses: out.losses,
        leaves,
        first_outputs: out.first,
        stats: Some(out.stats),
        skipped: out.skipped,
        scales: out.scales,
    }
}

/// Leaves by name.
type Leaves = BTreeMap<String, Tensor>;

/// What the first step starts from.
struct Start {
    /// Steps done before it (after a --load).
    first: usize,
    /// Every leaf: generated from `--seed`, replaced by `--params` and `--inputs`.
    leaves: Leaves,
    /// The inputs given with a leading step axis.
    stepped: Leaves,
}

/// The first step's leaves (`first` steps done; the params and optimizer state from `source`
/// when it is a checkpoint) and the inputs given per step.
fn start_leaves(
    args: &RunArgs,
    plan: &Plan,
    source: &LeafSource,
    first: usize,
) -> Result<Start, Failure> {
    let g = &plan.global;
    let mut all = global_leaves(g, &LeafSource::Seed(args.seed)).map_err(|e| anyhow!("{e}"))?;
    if let LeafSource::Checkpoint { reader, .. } = source {
        for (_, n) in g.nodes() {
            if let (Some(name), tpc::ir::Op::Param { .. } | tpc::ir::Op::State { .. }) =
                (n.op.leaf_name(), &n.op)
            {
                let t = reader
                    .read_global(name)
                    .map_err(|e| anyhow!("--load: {e}"))?;
                all.insert(name.to_string(), t);
            }
        }
    }
    if let Some(p) = &args.params {
        all.extend(tpc::exec::arrays::load(p, g, true).map_err(|e| anyhow!("{e}"))?);
        if !matches!(source, LeafSource::Checkpoint { .. }) {
            // Master weights start as the params given.
            tpc::exec::leaves::states_from_params(g, &mut all);
        }
    }
    let mut stepped = BTreeMap::new();
    if let Some(p) = &args.inputs {
        let declared: BTreeMap<&str, usize> =
            g.inputs().map(|(n, v)| (n, g.ty(v).rank())).collect();
        for (name, t) in tpc::exec::arrays::load_step_inputs(p, g).map_err(|e| anyhow!("{e}"))? {
            if Some(&t.shape().len()) == declared.get(name.as_str()).map(|r| r + 1).as_ref() {
                stepped.insert(name, t);
            } else {
                all.insert(name, t);
            }
        }
    }
    Ok(Start {
        first,
        leaves: all,
        stepped,
    })
}

/// A test's corrupted gradient block, from `TPC_TEST_POISON=STEP:RANK:NAME` (thread and MPI
/// runs and the reference of `--check`; see `exec::train::Poison`).
fn test_poison() -> Option<exec_train::Poison> {
    exec_train::Poison::parse(&std::env::var("TPC_TEST_POISON").ok()?)
}

/// Runs the steps with `step` (leaves -> outputs) on global arrays (the reference's loop).
fn steps(
    args: &RunArgs,
    c: &Compiled,
    g: &Graph,
    start: &Start,
    mut step: impl FnMut(&BTreeMap<String, Tensor>) -> Result<BTreeMap<String, Tensor>, anyhow::Error>,
) -> Result<Trained, Failure> {
    let loss_name = loss_name(c);
    let mut leaves = start.leaves.clone();
    let mut losses = Vec::with_capacity(args.steps.min(1 << 20));
    let mut first_outputs = BTreeMap::new();
    for s in 0..args.steps {
        let global = start.first + s;
        reseed_inputs(args, g, &mut leaves, global);
        for (name, t) in &start.stepped {
            leaves.insert(
                name.clone(),
                step_slice(t, global).map_err(|e| anyhow!("`{name}`: {e}"))?,
            );
        }
        let t = Instant::now();
        let mut out = step(&leaves)?;
        let secs = t.elapsed().as_secs_f64();
        let loss = scalar(&out, loss_name)?;
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
        first: start.first,
        losses,
        leaves,
        first_outputs,
        stats: None,
        skipped: Vec::new(),
        scales: Vec::new(),
    })
}

/// With `--seed` and no `--inputs`, step `s` reads inputs generated from (name, shape, seed,
/// step); step 0's are the seed's own.
fn reseed_inputs(args: &RunArgs, g: &Graph, leaves: &mut BTreeMap<String, Tensor>, s: usize) {
    if args.inputs.is_some() || s == 0 {
        return;
    }
    leaves.extend(seeded_inputs(g, step_seed(args.seed, s)));
}

/// The loss output `name`.
fn scalar(out: &BTreeMap<String, Tensor>, name: &str) -> Result<f32, anyhow::Error> {
    let t = out
        .get(name)
        .ok_or_else(|| anyhow!("the step returned no loss `{name}`"))?;
    loss_value(t).map_err(|e| anyhow!("{e}"))
}

/// Runs the same steps on the unsharded reference, and again with every op result perturbed
/// at rounding level (see `reference::run_perturbed`); compares each step's loss and the final
/// params, each element within the tolerance or within `NOISE_FACTOR` times its own move in
/// the perturbed run (an element AdamW steps on a gradient near zero, or a param the loss does
/// not depend on, moves with any rounding). Returns what differs.
fn check(
    args: &RunArgs,
    c: &Compiled,
    plan: &Plan,
    start: &Start,
    sharded: &Trained,
) -> Result<Vec<String>, Failure> {
    let t = Instant::now();
    let g = &plan.global;
    let poison = test_poison();
    let mut done = start.first;
    let want = steps(args, c, g, start, |leaves| {
        done += 1;
        match poison.as_ref().filter(|p| p.step == done) {
            Some(p) => reference::run_poisoned(g, leaves, &p.value),
            None => reference::run(g, leaves, leaves),
        }
        .map_err(|e| anyhow!("reference: {e}"))
    })?;
    let mut s = 0u64;
    let noisy = steps(args, c, g, start, |leaves| {
        s += 1;
        reference::run_perturbed(g, leaves, PERTURBATION, s)
            .map_err(|e| anyhow!("perturbed reference: {e}"))
    })?;
    let tol = Tolerance {
        rtol: args.rtol,
        atol: args.atol,
        equal_nan: args.equal_nan,
    };
    let mut bad = Vec::new();
    let losses = sharded.losses.iter().zip(&want.losses).zip(&noisy.losses);
    for (s, (((got, _), (w, _)), (n, _))) in losses.enumerate() {
        let (got, w, n) = (scalar_tensor(*got), scalar_tensor(*w), scalar_tensor(*n));
        let verdict = compare::compare_noisy(&got, &w, Some(&n), &tol);
        let step = sharded.first + s + 1;
        say_out(&format!("check loss at step {step}: {verdict}"));
        if !verdict.is_close() {
            bad.push(format!("the loss at step {step}"));
        }
    }
    for (name, _) in c.carried.iter().filter(|(l, _)| is_param(plan, l)) {
        let (got, w, n) = (
            &sharded.leaves[name],
            &want.leaves[name],
            &noisy.leaves[name],
        );
        let verdict = compare::compare_noisy(got, w, Some(n), &tol);
        say_out(&format!("check {name}: {verdict}"));
        if !verdict.is_close() {
            bad.push(name.clone());
        }
    }
    say_err(&format!(
        "reference training (plain and perturbed): {:.3} ms",
        t.elapsed().as_secs_f64() * 1e3
    ));
    Ok(bad)
}

/// The relative size of the perturbed reference's changes to every op result: about 16 f32
/// roundings, so an element's move there bounds what a different summation order (sharding)
/// can do to it, with `NOISE_FACTOR` to spare.
pub(super) const PERTURBATION: f32 = 1e-6;

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
    if let Some(stats) = &t.stats {
        w.text(&args.stats, || super::stats_json(plan, stats))?;
    }
    let scales = Scales {
        skipped: &t.skipped,
        scales: &t.scales,
    };
    w.text(&args.log, || log_lines(&t.losses, t.first, &scales))?;
    w.finish(args)
}
