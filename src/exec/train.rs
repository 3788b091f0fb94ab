//! Training on the ranks: each rank keeps its blocks of the params and optimizer state from one
//! step to the next (step s's block of `next(NAME)` is step s+1's block of the leaf `NAME`) and
//! takes each step's inputs as its own blocks. Nothing is gathered between steps; the global
//! arrays are assembled once, after the last step.

use super::comm::Transport;
use super::core;
use super::kernels as k;
use super::leaves::{block_ranges, local_leaf, LeafSource};
use super::pipeline::Stage;
use super::spmd::{
    assemble, assemble_output, load_leaves, load_leaves_where, spawn_ranks, thread_ranks, Rank,
    RankOutput, RunError, RunStats,
};
use super::{ExecError, Tensor};
use crate::ir::{Local, Op, ValueId};
use crate::plan::liveness::Liveness;
use crate::plan::Plan;
use ndarray::{ArrayD, ArrayViewD, Axis, Slice};
use std::collections::BTreeMap;
use std::time::Instant;

/// What a training run needs besides the plan.
#[derive(Clone, Copy, Debug)]
pub struct Steps<'a> {
    /// How many steps.
    pub count: usize,
    /// The first step's leaves: params, optimizer state and inputs.
    pub start: &'a LeafSource,
    /// Inputs given with a leading step axis of K (global): step s reads slice s mod K.
    pub stepped: &'a BTreeMap<String, Tensor>,
    /// With a seed and no input arrays: step s > 0 generates its inputs from `step_seed(seed, s)`.
    pub reseed: Option<u64>,
    /// Each carried leaf and the output holding its next value.
    pub carried: &'a [(String, String)],
    /// The output holding the loss (an f32 scalar).
    pub loss: &'a str,
    /// Keep the first step's outputs that are not carried (its gradients).
    pub keep_first: bool,
}

/// The seed of step `s`'s generated inputs (step 0's are the run's own seed's).
pub fn step_seed(seed: u64, s: usize) -> u64 {
    seed.wrapping_add((s as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// What one rank brings back from training.
pub struct TrainedRank {
    /// The last step's outputs (its `outputs`), step times, collectives and peak bytes.
    pub rank: RankOutput,
    /// The first step's outputs that are not carried, in output order (empty unless kept).
    pub first: Vec<Tensor>,
    /// The loss of each step as this rank holds it.
    pub losses: Vec<f32>,
    /// With a dynamic loss scale: per step, whether this rank skipped it (empty otherwise).
    pub skipped: Vec<bool>,
    /// With a dynamic loss scale: per step, the scale it ran with (empty otherwise).
    pub scales: Vec<f32>,
}

/// A training run's results, as global arrays.
#[derive(Clone, Debug)]
pub struct Trained {
    /// Per step: the loss and the slowest rank's seconds.
    pub losses: Vec<(f32, f64)>,
    /// The first step's outputs that are not carried (empty unless kept), by name.
    pub first: BTreeMap<String, Tensor>,
    /// The last step's outputs, by name (the carried `next(NAME)` among them).
    pub last: BTreeMap<String, Tensor>,
    /// Measured figures of the last step.
    pub stats: RunStats,
    /// With a dynamic loss scale: per step, whether it was skipped (rank 0's flag; every rank
    /// reads the same one).
    pub skipped: Vec<bool>,
    /// With a dynamic loss scale: per step, the scale it ran with (rank 0's; one for all).
    pub scales: Vec<f32>,
}

/// Where a run stands among the steps of a longer training, and where it saves checkpoints.
#[derive(Clone, Debug, Default)]
pub struct Checkpointing {
    /// Steps done before this run (a resumed run's first step is step `first + 1`): per-step
    /// inputs continue from there.
    pub first: usize,
    /// Where and how often to save.
    pub save: Option<SaveSpec>,
}

/// Checkpoints to save during a run.
#[derive(Clone, Debug)]
pub struct SaveSpec {
    /// The checkpoint directory.
    pub dir: std::path::PathBuf,
    /// Save after every `every` steps (counted over the whole training); 0: only at the end.
    pub every: usize,
    /// What the index records of the run.
    pub facts: super::checkpoint::save::RunFacts,
    /// Keep only this many step directories (the newest); `None`: all.
    pub keep: Option<usize>,
    /// A test's simulated crash in the middle of a save.
    pub abort: Option<super::checkpoint::save::AbortAt>,
}

impl SaveSpec {
    /// True when a checkpoint is saved after global step `done` (1-based), `last` the run's last.
    fn due(&self, done: usize, last: bool) -> bool {
        last || (self.every > 0 && done.is_multiple_of(self.every))
    }
}

/// Trains on one thread per device. `on_step(s, loss)` is called by rank 0 after each step.
pub fn train_threads(
    plan: &Plan,
    steps: &Steps<'_>,
    on_step: Option<&(dyn Fn(usize, f32) + Sync)>,
) -> Result<Trained, RunError> {
    train_threads_with(plan, steps, &Checkpointing::default(), on_step)
}

/// [`train_threads`] resuming at `ck.first` and saving checkpoints as `ck.save` says.
pub fn train_threads_with(
    plan: &Plan,
    steps: &Steps<'_>,
    ck: &Checkpointing,
    on_step: Option<&(dyn Fn(usize, f32) + Sync)>,
) -> Result<Trained, RunError> {
    let ranks = train_ranks_poisoned(plan, steps, ck, None, on_step)?;
    assemble_trained(plan, steps, ranks)
}

/// A test's corrupted gradient block: at global step `step` (1-based), rank `rank` sets the first
/// element of its block of the value named `value` (`grad(w1)`) to +inf once it is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Poison {
    /// The global step, from 1.
    pub step: usize,
    /// The rank whose block is corrupted.
    pub rank: usize,
    /// The global value's name.
    pub value: String,
}

impl Poison {
    /// Reads `STEP:RANK:NAME` (the `TPC_TEST_POISON` variable).
    pub fn parse(s: &str) -> Option<Poison> {
        let mut it = s.splitn(3, ':');
        let step = it.next()?.parse().ok()?;
        let rank = it.next()?.parse().ok()?;
        let value = it.next()?.to_string();
        Some(Poison { step, rank, value })
    }

    /// The local value poisoned: the last one (in program order) holding the named global
    /// value, i.e. the block the update reads.
    pub fn local_value(&self, plan: &Plan) -> Option<ValueId<Local>> {
        let named = |v: ValueId<Local>| {
            plan.origin[v]
                .is_some_and(|o| plan.global.value(o).name.as_deref() == Some(&self.value))
        };
        plan.local
            .values()
            .map(|(v, _)| v)
            .filter(|&v| named(v))
            .max_by_key(|&v| plan.local.value(v).node.index())
    }
}

/// Trains on one thread per device, `poison` (if any) corrupting one rank's block; returns
/// each rank's results, in rank order (see [`assemble_trained`]).
pub fn train_ranks_poisoned(
    plan: &Plan,
    steps: &Steps<'_>,
    ck: &Checkpointing,
    poison: Option<&Poison>,
    on_step: Option<&(dyn Fn(usize, f32) + Sync)>,
) -> Result<Vec<TrainedRank>, RunError> {
    let n = thread_ranks(plan)?;
    spawn_ranks(n, |t| {
        let result = train_rank_inner(plan, t, steps, ck, poison, on_step);
        if result.is_err() {
            t.abort();
        }
        result
    })
}

/// Trains on the calling thread as the transport's rank; a failure aborts the peers.
pub fn train_rank(
    plan: &Plan,
    t: &mut dyn Transport,
    steps: &Steps<'_>,
    on_step: Option<&(dyn Fn(usize, f32) + Sync)>,
) -> Result<TrainedRank, RunError> {
    train_rank_with(plan, t, steps, &Checkpointing::default(), on_step)
}

/// [`train_rank`] resuming at `ck.first` and saving checkpoints as `ck.save` says.
pub fn train_rank_with(
    plan: &Plan,
    t: &mut dyn Transport,
    steps: &Steps<'_>,
    ck: &Checkpointing,
    on_step: Option<&(dyn Fn(usize, f32) + Sync)>,
) -> Result<TrainedRank, RunError> {
    train_rank_poisoned(plan, t, steps, ck, None, on_step)
}

/// [`train_rank_with`] with `poison` corrupting a gradient block if it names this rank (a
/// test's hook, as in [`train_ranks_poisoned`]; an MPI rank reads it from the environment).
pub fn train_rank_poisoned(
    plan: &Plan,
    t: &mut dyn Transport,
    steps: &Steps<'_>,
    ck: &Checkpointing,
    poison: Option<&Poison>,
    on_step: Option<&(dyn Fn(usize, f32) + Sync)>,
) -> Result<TrainedRank, RunError> {
    let result = train_rank_inner(plan, t, steps, ck, poison, on_step);
    if result.is_err() {
        t.abort();
    }
    result
}

/// How a step's outputs feed the next step, by local ids and output positions.
struct Links {
    /// Each carried leaf's value and the position of its next value among the outputs.
    carried: Vec<(ValueId<Local>, usize)>,
    /// The position of the loss among the outputs.
    loss: usize,
    /// Each input's value and name.
    inputs: Vec<(ValueId<Local>, String)>,
}

impl Links {
    /// The links of `plan` for `steps`; a name the plan lacks or a carried pair whose blocks
    /// differ is an internal error (the plan verifier ties `next(NAME)` to `NAME`'s layout).
    fn of(plan: &Plan, steps: &Steps<'_>) -> Result<Links, ExecError> {
        let g = &plan.local;
        let output = |name: &str| {
            g.outputs()
                .iter()
                .position(|o| o.name == name)
                .ok_or_else(|| internal(format!("the step has no output `{name}`")))
        };
        let leaf = |name: &str| {
            g.nodes()
                .find(|(_, n)| n.op.leaf_name() == Some(name))
                .map(|(_, n)| n.outputs[0])
                .ok_or_else(|| internal(format!("the step has no leaf `{name}`")))
        };
        let mut carried = Vec::with_capacity(steps.carried.len());
        for (l, next) in steps.carried {
            let (v, k) = (leaf(l)?, output(next)?);
            let w = g.outputs()[k].value;
            let global = |v: ValueId<Local>| plan.origin[v].map(|o| plan.global.ty(o));
            if g.ty(v) != g.ty(w)
                || global(v) != global(w)
                || plan.placements[v] != plan.placements[w]
            {
                return Err(internal(format!(
                    "`{next}` is not laid out as `{l}` ({} {} against {} {})",
                    g.ty(w),
                    plan.placements[w].display(&plan.mesh),
                    g.ty(v),
                    plan.placements[v].display(&plan.mesh)
                )));
            }
            carried.push((v, k));
        }
        let inputs = g
            .nodes()
            .filter(|(_, n)| matches!(n.op, crate::ir::Op::Input { .. }))
            .filter_map(|(_, n)| Some((n.outputs[0], n.op.leaf_name()?.to_string())))
            .collect();
        Ok(Links {
            carried,
            loss: output(steps.loss)?,
            inputs,
        })
    }

    /// The output positions that are not carried, in order.
    fn kept(&self, outputs: usize) -> Vec<usize> {
        (0..outputs)
            .filter(|k| self.carried.iter().all(|&(_, c)| c != *k))
            .collect()
    }
}

fn internal(detail: String) -> ExecError {
    ExecError::Internal {
        node: "training step".into(),
        detail,
    }
}

fn train_rank_inner(
    plan: &Plan,
    t: &mut dyn Transport,
    steps: &Steps<'_>,
    ck: &Checkpointing,
    poison: Option<&Poison>,
    on_step: Option<&(dyn Fn(usize, f32) + Sync)>,
) -> Result<TrainedRank, RunError> {
    if let Some(pipe) = &plan.pipeline {
        return train_stage_rank(plan, pipe, t, steps, ck, on_step);
    }
    let rank = t.rank();
    let load_err = |leaf: &str, error| RunError::Load {
        rank,
        leaf: leaf.to_string(),
        error,
    };
    let links = Links::of(plan, steps).map_err(|e| load_err("*", e))?;
    let coords = plan.mesh.coords(rank as u64);
    let mut blocks = load_leaves(plan, &coords, steps.start, rank)?;
    let micro = super::micro::microbatches(plan).map_err(|e| load_err("*", e))?;
    let mut later = super::micro::later_inputs(plan, rank, |coords, rank| {
        load_leaves_where(plan, coords, steps.start, rank, |op, _| {
            matches!(op, Op::Input { .. })
        })
    })?;
    let live = Liveness::of(&plan.local);
    let kept = links.kept(plan.local.outputs().len());
    let mut r = Rank::new(plan, t);
    let (mut times, mut losses) = (Vec::new(), Vec::new());
    let (mut first, mut last, mut peak) = (Vec::new(), Vec::new(), 0);
    let poisoned = poison.filter(|p| p.rank == rank);
    let flag = plan
        .local
        .outputs()
        .iter()
        .position(|o| o.name == crate::autodiff::scale::OVERFLOW);
    let mut skipped = Vec::new();
    let (scale_leaf, mut scales) = (scale_leaf(plan), Vec::new());
    for s in 0..steps.count.max(1) {
        let g = ck.first + s;
        r.poison = poisoned
            .filter(|p| p.step == g + 1)
            .and_then(|p| p.local_value(plan));
        let leaf_bytes = all_step_inputs(plan, &coords, steps, &links, g, &mut blocks, &mut later)
            .map_err(|(l, e)| load_err(&l, e))?;
        r.barrier()?;
        let t0 = Instant::now();
        let out = super::micro::run_step(micro.as_ref(), &live, &blocks, &later, &mut r)
            .map_err(|e| e.within(&format!("step {}", g + 1)))?;
        times.push(t0.elapsed().as_secs_f64());
        peak = peak.max(out.peak_bytes + leaf_bytes);
        let loss = loss_value(&out.outputs[links.loss]).map_err(|e| load_err(steps.loss, e))?;
        losses.push(loss);
        if let Some(k) = flag {
            let f = loss_value(&out.outputs[k]).map_err(|e| load_err("overflow", e))?;
            skipped.push(f != 0.0);
        }
        if let Some(t) = scale_leaf.and_then(|v| blocks.get(&v)) {
            scales.push(loss_value(t).map_err(|e| load_err("loss_scale", e))?);
        }
        if let (0, Some(f)) = (rank, on_step) {
            f(s, loss);
        }
        if s == 0 && steps.keep_first {
            first = kept.iter().map(|&k| out.outputs[k].clone()).collect();
        }
        let end = s + 1 == steps.count.max(1);
        if let Some(save) = ck.save.as_ref().filter(|sv| sv.due(g + 1, end)) {
            let outputs: Vec<Option<&Tensor>> = out.outputs.iter().map(Some).collect();
            let writer = |_: ValueId<Local>, _: Option<usize>| None;
            save_step(
                plan,
                save,
                g + 1,
                &links,
                &outputs,
                &blocks,
                &writer,
                &mut r,
            )
            .map_err(|e| e.within(&format!("step {}", g + 1)))?;
        }
        if end {
            last = out.outputs;
            break;
        }
        carry(out.outputs, &links, &mut blocks);
    }
    Ok(TrainedRank {
        rank: RankOutput {
            outputs: last,
            step_times: times,
            collectives: r.into_collectives(),
            peak_bytes: peak,
            pipeline: None,
        },
        first,
        losses,
        skipped,
        scales,
    })
}

/// The local value of the dynamic loss scale's state leaf, if the plan has one.
fn scale_leaf(plan: &Plan) -> Option<ValueId<Local>> {
    plan.local.nodes().find_map(|(_, n)| match &n.op {
        crate::ir::Op::State { name, .. } if name == crate::autodiff::scale::SCALE_STATE => {
            Some(n.outputs[0])
        }
        _ => None,
    })
}

/// [`train_rank_inner`] on a pipelined plan: the rank loads the leaves its stage reads and
/// runs its stage's share of each step (`exec::pipeline`).
fn train_stage_rank(
    plan: &Plan,
    pipe: &crate::pipeline::Pipeline,
    t: &mut dyn Transport,
    steps: &Steps<'_>,
    ck: &Checkpointing,
    on_step: Option<&(dyn Fn(usize, f32) + Sync)>,
) -> Result<TrainedRank, RunError> {
    let rank = t.rank();
    let load_err = |leaf: &str, error| RunError::Load {
        rank,
        leaf: leaf.to_string(),
        error,
    };
    let stage = Stage::of(plan, pipe, rank).map_err(|e| load_err("*", e))?;
    let mut links = Links::of(plan, steps).map_err(|e| load_err("*", e))?;
    links.inputs.retain(|(v, _)| stage.needs(*v));
    let coords = plan.mesh.coords(rank as u64);
    let (mut blocks, mut later) = stage.load_leaves(steps.start, rank)?;
    let kept = links.kept(plan.local.outputs().len());
    let mut r = Rank::new(plan, t);
    let (mut times, mut losses) = (Vec::new(), Vec::new());
    let (mut first, mut last, mut peak, mut stats) = (Vec::new(), Vec::new(), 0, None);
    for s in 0..steps.count.max(1) {
        let g = ck.first + s;
        let within = |e: RunError| e.within(&format!("step {}", g + 1));
        let leaf_bytes = all_step_inputs(plan, &coords, steps, &links, g, &mut blocks, &mut later)
            .map_err(|(l, e)| load_err(&l, e))?;
        r.barrier()?;
        let t0 = Instant::now();
        let mut out = stage.run_step(&blocks, &later, &mut r).map_err(within)?;
        let loss = stage
            .report_loss(&out.outputs, links.loss, &mut out.stats, &mut r)
            .map_err(within)?;
        let end = s + 1 == steps.count.max(1);
        if let Some(save) = ck.save.as_ref().filter(|sv| sv.due(g + 1, end)) {
            let outputs: Vec<Option<&Tensor>> = out.outputs.iter().map(Option::as_ref).collect();
            let writer = |v, next| Some(stage.writer(v, next));
            save_step(
                plan,
                save,
                g + 1,
                &links,
                &outputs,
                &blocks,
                &writer,
                &mut r,
            )
            .map_err(within)?;
        }
        if !end {
            stage
                .carry(
                    &mut out.outputs,
                    &links.carried,
                    &mut blocks,
                    &mut out.stats,
                    &mut r,
                )
                .map_err(within)?;
        }
        times.push(t0.elapsed().as_secs_f64());
        peak = peak.max(out.peak_bytes + leaf_bytes);
        losses.push(loss);
        if let (0, Some(f)) = (rank, on_step) {
            f(s, loss);
        }
        let mut outputs = super::pipeline::or_empty(out.outputs);
        if s == 0 && steps.keep_first {
            first = kept.iter().map(|&k| outputs[k].clone()).collect();
        }
        if end {
            last = std::mem::take(&mut outputs);
            stats = Some(out.stats);
        }
        outputs.into_iter().for_each(k::recycle);
    }
    Ok(TrainedRank {
        rank: RankOutput {
            outputs: last,
            step_times: times,
            collectives: r.into_collectives(),
            peak_bytes: peak,
            pipeline: stats,
        },
        first,
        losses,
        skipped: Vec::new(),
        scales: Vec::new(),
    })
}

/// Saves the checkpoint of global step `done`: this rank writes the blocks it is the writer
/// of (the params and optimizer state the step leaves: a carried leaf's `next` output, a
/// frozen one's block), every rank waits, and rank 0 commits. `writer(v, next)`: on a
/// pipelined plan, the stage that writes leaf `v` (whose next value is output `next`).
#[allow(clippy::too_many_arguments)]
fn save_step(
    plan: &Plan,
    save: &SaveSpec,
    done: usize,
    links: &Links,
    outputs: &[Option<&Tensor>],
    blocks: &BTreeMap<ValueId<Local>, Tensor>,
    writer: &dyn Fn(ValueId<Local>, Option<usize>) -> Option<u32>,
    r: &mut Rank<'_>,
) -> Result<(), RunError> {
    use super::checkpoint::save::{commit_hooked, prune, save_rank_hooked, writes_block, Item};
    let rank = r.rank();
    let fail = |detail: String| RunError::Save {
        rank,
        step: done,
        detail,
    };
    let mesh = &plan.mesh;
    let coords = mesh.coords(rank as u64);
    let axis = plan
        .pipeline
        .as_ref()
        .and_then(|p| mesh.axis_index(&p.axis));
    let mut items = Vec::new();
    for (name, kind, v) in super::checkpoint::save::saved_leaves(plan) {
        let next = links.carried.iter().find(|(c, _)| *c == v).map(|&(_, k)| k);
        let stage = axis.zip(writer(v, next)).map(|(a, s)| (a, u64::from(s)));
        let pl = &plan.placements[v];
        if !writes_block(pl, &coords, mesh, stage) {
            continue;
        }
        let block = match next {
            Some(k) => outputs.get(k).copied().flatten(),
            None => blocks.get(&v),
        };
        let block = block.ok_or_else(|| fail(format!("`{name}` is not held by its writer")))?;
        let global = plan.origin[v].ok_or_else(|| fail(format!("`{name}` has no global value")))?;
        let shape = plan.global.ty(global).shape.clone();
        let offset = block_ranges(&shape, pl, &coords, mesh)
            .iter()
            .map(|r| r.start)
            .collect();
        items.push(Item {
            name,
            kind,
            declared: plan.global.ty(global).dtype.to_string(),
            shape,
            placement: pl.display(mesh),
            offset,
            block,
        });
    }
    let step = done as u64;
    save_rank_hooked(&save.dir, step, rank, &items, save.abort).map_err(|e| fail(e.to_string()))?;
    r.sync()?;
    if rank == 0 {
        let world = mesh.num_devices() as usize;
        commit_hooked(&save.dir, step, world, &save.facts, save.abort)
            .map_err(|e| fail(e.to_string()))?;
        prune(&save.dir, step, save.keep);
    }
    r.sync()
}

/// Step `s`'s inputs into `blocks` (microbatch 0's) and `later` (the others'); returns the
/// bytes of every leaf the rank holds.
fn all_step_inputs(
    plan: &Plan,
    coords: &[u64],
    steps: &Steps<'_>,
    links: &Links,
    s: usize,
    blocks: &mut BTreeMap<ValueId<Local>, Tensor>,
    later: &mut [BTreeMap<ValueId<Local>, Tensor>],
) -> Result<u64, (String, ExecError)> {
    step_inputs(plan, coords, steps, links, s, blocks)?;
    for (m, inputs) in later.iter_mut().enumerate() {
        let coords = microbatch_coords(plan, coords, m + 1);
        step_inputs(plan, &coords, steps, links, s, inputs)?;
    }
    Ok(blocks
        .values()
        .chain(later.iter().flat_map(|m| m.values()))
        .map(core::bytes)
        .sum())
}

/// `coords` with the temporal coordinate set to microbatch `m`.
fn microbatch_coords(plan: &Plan, coords: &[u64], m: usize) -> Vec<u64> {
    let mut c = coords.to_vec();
    if let Some(a) = plan.mesh.temporal() {
        c[a] = m as u64;
    }
    c
}

/// The step's carried outputs become the next step's leaf blocks; the rest go back to the pool.
fn carry(outputs: Vec<Tensor>, links: &Links, blocks: &mut BTreeMap<ValueId<Local>, Tensor>) {
    let mut outs: Vec<Option<Tensor>> = outputs.into_iter().map(Some).collect();
    for &(v, k) in &links.carried {
        if let Some(t) = outs[k].take() {
            if let Some(old) = blocks.insert(v, t) {
                k::recycle(old);
            }
        }
    }
    outs.into_iter().flatten().for_each(k::recycle);
}

/// The value of a loss: a one-element f32 array.
pub fn loss_value(t: &Tensor) -> Result<f32, ExecError> {
    match t.as_f32().map(|a| a.iter().copied().collect::<Vec<_>>()) {
        Some(v) if v.len() == 1 => Ok(v[0]),
        _ => Err(internal(format!(
            "the loss is {}, not an f32 scalar",
            t.describe()
        ))),
    }
}

/// This rank's blocks of step `s`'s inputs: sliced from the stepped arrays, or (after the
/// first step) generated from the step's seed; other inputs stay as they are.
fn step_inputs(
    plan: &Plan,
    coords: &[u64],
    steps: &Steps<'_>,
    links: &Links,
    s: usize,
    blocks: &mut BTreeMap<ValueId<Local>, Tensor>,
) -> Result<(), (String, ExecError)> {
    for (v, name) in &links.inputs {
        let fail = |e| (name.clone(), e);
        let t = if let Some(all) = steps.stepped.get(name) {
            stepped_block(plan, *v, all, coords, s).map_err(fail)?
        } else if let Some(seed) = steps.reseed.filter(|_| s > 0) {
            let global = plan.origin[*v]
                .ok_or_else(|| fail(internal(format!("input `{name}` has no global value"))))?;
            let source = LeafSource::Seed(step_seed(seed, s));
            local_leaf(
                &plan.global,
                global,
                name,
                &plan.placements[*v],
                coords,
                &plan.mesh,
                &source,
            )
            .map_err(fail)?
        } else {
            continue;
        };
        if !t.matches(plan.local.ty(*v)) {
            return Err(fail(ExecError::WrongType {
                what: name.clone(),
                expected: plan.local.ty(*v).clone(),
                got: t.describe(),
            }));
        }
        if let Some(old) = blocks.insert(*v, t) {
            k::recycle(old);
        }
    }
    Ok(())
}

/// This rank's block of slice `s mod K` of a stepped input `all` (`[K, ...]`) for local `v`.
fn stepped_block(
    plan: &Plan,
    v: ValueId<Local>,
    all: &Tensor,
    coords: &[u64],
    s: usize,
) -> Result<Tensor, ExecError> {
    let shape: Vec<u64> = all.shape().iter().skip(1).map(|&d| d as u64).collect();
    let ranges = block_ranges(&shape, &plan.placements[v], coords, &plan.mesh);
    step_block(all, s, &ranges)
}

/// Step `s`'s slice (`s mod K`) of a stepped input `all` (`[K, ...]`), whole: what the
/// reference reads in step `s`.
pub fn step_slice(all: &Tensor, s: usize) -> Result<Tensor, ExecError> {
    step_block(all, s, &[])
}

/// The block `ranges` (leading dims; the rest whole) of step `s`'s slice of `all`.
fn step_block(
    all: &Tensor,
    s: usize,
    ranges: &[std::ops::Range<u64>],
) -> Result<Tensor, ExecError> {
    let k = all.shape().first().copied().unwrap_or(0);
    if k == 0 {
        return Err(internal("a stepped input with no steps".into()));
    }
    Ok(match all {
        Tensor::F32(a) => Tensor::F32(block_of(a.view(), s % k, ranges)),
        Tensor::I32(a) => Tensor::I32(block_of(a.view(), s % k, ranges)),
    })
}

/// An owned copy of the block `ranges` of slice `i` of `x`'s leading axis.
fn block_of<T: Clone>(
    x: ArrayViewD<'_, T>,
    i: usize,
    ranges: &[std::ops::Range<u64>],
) -> ArrayD<T> {
    let mut x = x.index_axis_move(Axis(0), i);
    for (d, r) in ranges.iter().enumerate() {
        x.slice_axis_inplace(Axis(d), Slice::from(r.start as usize..r.end as usize));
    }
    x.to_owned()
}

/// The global results of the ranks' training: rank 0's losses, the slowest rank's times, the
/// first and last steps' outputs assembled from every rank's blocks.
pub fn assemble_trained(
    plan: &Plan,
    steps: &Steps<'_>,
    ranks: Vec<TrainedRank>,
) -> Result<Trained, RunError> {
    let links = Links::of(plan, steps).map_err(|e| RunError::Assemble {
        output: "*".into(),
        detail: e.to_string(),
    })?;
    let outs = plan.local.outputs();
    let kept = links.kept(outs.len());
    let mut first = BTreeMap::new();
    if let Some(r) = ranks
        .iter()
        .position(|r| steps.keep_first && r.first.len() != kept.len())
    {
        return Err(RunError::Assemble {
            output: "*".into(),
            detail: format!(
                "rank {r} kept {} first-step outputs, expected {}",
                ranks[r].first.len(),
                kept.len()
            ),
        });
    }
    if steps.keep_first {
        for (i, &k) in kept.iter().enumerate() {
            let blocks: Vec<&Tensor> = ranks.iter().map(|r| &r.first[i]).collect();
            let t = assemble_output(plan, &blocks, k).map_err(|detail| RunError::Assemble {
                output: outs[k].name.clone(),
                detail,
            })?;
            first.insert(outs[k].name.clone(), t);
        }
    }
    let losses = ranks.first().map(|r| r.losses.clone()).unwrap_or_default();
    let skipped = ranks.first().map(|r| r.skipped.clone()).unwrap_or_default();
    let scales = ranks.first().map(|r| r.scales.clone()).unwrap_or_default();
    let mut trained = Vec::with_capacity(ranks.len());
    for r in ranks {
        if r.losses.len() != losses.len() {
            return Err(RunError::Assemble {
                output: steps.loss.into(),
                detail: format!(
                    "{} losses from one rank, {} from rank 0",
                    r.losses.len(),
                    losses.len()
                ),
            });
        }
        trained.push(r.rank);
    }
    let out = assemble(plan, trained)?;
    Ok(Trained {
        losses: losses
            .into_iter()
            .zip(out.stats.step_times.iter().copied())
            .collect(),
        first,
        last: out.outputs,
        stats: out.stats,
        skipped,
        scales,
    })
}
