//! The SPMD runtime: every rank runs the plan's per-device program on its own shards, in its own
//! thread, and the collectives move real data between ranks through a `Transport`. Ranks load
//! (or generate) only their own blocks of params and inputs; outputs are assembled into global
//! arrays from the ranks' blocks.

use super::apply::{apply_owned, arity, f32_arg, i32_arg};
use super::comm::{self, CommError, Elem, ThreadTransport, Transport};
use super::core::{self, Eval};
use super::kernels::{self as k, Pooled};
use super::leaves::{block_ranges, local_leaf, LeafSource};
use super::redistribute;
use super::{ExecError, Tensor};
use crate::cost::CollectiveKind;
use crate::ir::{Dtype, Local, Node, NodeId, Op, ReduceOp, ValueId};
use crate::plan::liveness::Liveness;
use crate::plan::Plan;
use ndarray::{ArrayD, Axis, IxDyn, Slice};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Instant;

/// Why an op failed on a rank: its own evaluation, or the communication with its peers.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NodeError {
    /// The op's evaluation failed (bad data, or an internal inconsistency).
    #[error(transparent)]
    Exec(#[from] ExecError),
    /// A collective's communication failed.
    #[error(transparent)]
    Comm(#[from] CommError),
}

impl RunError {
    /// An op's failure with `part` (`step 2`, `microbatch 1`) before the op it names.
    pub(crate) fn within(self, part: &str) -> RunError {
        match self {
            RunError::Op {
                rank,
                op,
                location,
                error,
            } => RunError::Op {
                rank,
                op: format!("{part}: {op}"),
                location,
                error,
            },
            e => e,
        }
    }
}

impl NodeError {
    /// True for a rank that stopped only because another failed (it was aborted, or a peer's
    /// endpoint went away): the failing rank's own error is the one to report.
    pub fn is_secondary(&self) -> bool {
        matches!(
            self,
            NodeError::Comm(CommError::Aborted | CommError::Disconnected(_))
        )
    }
}

/// Why a run failed: the first rank that failed, the op and where it comes from.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunError {
    /// An op failed on a rank.
    #[error("rank {rank}: {op} at {location}: {error}")]
    Op {
        /// The failing rank.
        rank: usize,
        /// The op (`%12 = matmul`).
        op: String,
        /// Source location of the op.
        location: String,
        /// What went wrong.
        error: Box<NodeError>,
    },
    /// A rank could not save its checkpoint blocks, or rank 0 could not commit them.
    #[error("rank {rank}: saving the checkpoint of step {step}: {detail} (the last committed checkpoint is unchanged)")]
    Save {
        /// The failing rank.
        rank: usize,
        /// The step being saved.
        step: usize,
        /// What went wrong.
        detail: String,
    },
    /// A rank could not load its params or inputs.
    #[error("rank {rank}: loading `{leaf}`: {error}")]
    Load {
        /// The failing rank.
        rank: usize,
        /// The leaf.
        leaf: String,
        /// What went wrong.
        error: ExecError,
    },
    /// A rank's thread died.
    #[error("rank {0}: the rank's thread panicked (a bug in tpc)")]
    Panicked(usize),
    /// The machine could not start a thread per rank.
    #[error(
        "cannot run {ranks} ranks as threads of one process ({reason}); use fewer devices, or \
         run one process per rank with MPI (`mpirun -n {ranks} tpc run ...`, built with \
         `--features mpi`)"
    )]
    TooManyRanks {
        /// Ranks asked for.
        ranks: usize,
        /// Why they could not start.
        reason: String,
    },
    /// The ranks' output blocks do not fit together (a backend bug or a corrupt message).
    #[error("assembling output `{output}`: {detail}")]
    Assemble {
        /// The output (or `*` for the run as a whole).
        output: String,
        /// What does not fit.
        detail: String,
    },
}

impl RunError {
    /// True for a rank that stopped only because another failed.
    pub fn is_secondary(&self) -> bool {
        matches!(self, RunError::Op { error, .. } if error.is_secondary())
    }
}

/// Figures measured on one run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunStats {
    /// Wall time of each step (the slowest rank's), seconds.
    pub step_times: Vec<f64>,
    /// Per collective kind (snake_case): count and bytes one rank sent, per step.
    pub collectives: BTreeMap<String, (u64, u64)>,
    /// The largest peak of live local bytes (params, inputs, activations) over the ranks.
    pub peak_bytes_per_rank: u64,
    /// On a pipelined plan: per stage, the figures of its first rank.
    pub pipeline: Vec<super::pipeline::StageRunStats>,
}

/// Global outputs and figures of a run.
#[derive(Clone, Debug)]
pub struct RunOutput {
    /// Every program output as a global array, by name.
    pub outputs: BTreeMap<String, Tensor>,
    /// Measured figures.
    pub stats: RunStats,
}

/// What one rank returns: its local outputs, step times, collective counts and peak bytes.
pub struct RankOutput {
    /// The local block of each output, in the plan's output order.
    pub outputs: Vec<Tensor>,
    /// Seconds per step.
    pub step_times: Vec<f64>,
    /// Collective counts and bytes sent per step.
    pub collectives: BTreeMap<String, (u64, u64)>,
    /// Peak live bytes.
    pub peak_bytes: u64,
    /// On a pipelined plan: this rank's stage figures.
    pub pipeline: Option<super::pipeline::StageRunStats>,
}

/// The most ranks the thread backend starts: beyond, one process per rank (MPI) is the way.
pub const MAX_THREAD_RANKS: usize = 4096;

/// Runs `plan` on one thread per device with the thread transport, `steps` times after loading.
/// `on_step` is called by rank 0 after each step (for progress).
pub fn run_threads(
    plan: &Plan,
    source: &LeafSource,
    steps: usize,
    on_step: Option<&(dyn Fn(usize) + Sync)>,
) -> Result<RunOutput, RunError> {
    let n = thread_ranks(plan)?;
    let ranks = spawn_ranks(n, |t| run_rank(plan, t, source, steps, on_step))?;
    assemble(plan, ranks)
}

/// The number of ranks of `plan`, if the thread backend can start that many.
pub(crate) fn thread_ranks(plan: &Plan) -> Result<usize, RunError> {
    let n = usize::try_from(plan.mesh.num_devices()).unwrap_or(usize::MAX);
    if n > MAX_THREAD_RANKS {
        return Err(RunError::TooManyRanks {
            ranks: n,
            reason: format!("the thread backend starts at most {MAX_THREAD_RANKS}"),
        });
    }
    Ok(n)
}

/// Runs `rank` on one thread per rank of an `n`-rank thread transport and collects their
/// results; the first failing rank's error (not one that only saw a peer fail) is returned.
pub(crate) fn spawn_ranks<R: Send>(
    n: usize,
    rank: impl Fn(&mut dyn Transport) -> Result<R, RunError> + Sync,
) -> Result<Vec<R>, RunError> {
    let rank = &rank;
    let (results, spawn_error) = std::thread::scope(|s| {
        let mut handles = Vec::with_capacity(n);
        let mut spawn_error = None;
        for (r, mut t) in ThreadTransport::world(n).into_iter().enumerate() {
            let builder = std::thread::Builder::new().name(format!("rank {r}"));
            match builder.spawn_scoped(s, move || rank(&mut t)) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // The endpoints not started are dropped: the started ranks see their peers
                    // gone and stop.
                    spawn_error = Some(format!("starting rank {r}'s thread: {e}"));
                    break;
                }
            }
        }
        let results: Vec<Result<R, RunError>> = handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| h.join().unwrap_or(Err(RunError::Panicked(r))))
            .collect();
        (results, spawn_error)
    });
    if let Some(reason) = spawn_error {
        return Err(RunError::TooManyRanks { ranks: n, reason });
    }
    let mut ranks = Vec::with_capacity(n);
    let mut first_err: Option<RunError> = None;
    for r in results {
        match r {
            Ok(o) => ranks.push(o),
            Err(e) => {
                if first_err
                    .as_ref()
                    .is_none_or(|f| f.is_secondary() && !e.is_secondary())
                {
                    first_err = Some(e);
                }
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(ranks)
}

/// Combines the ranks' results: global outputs from their blocks, the slowest rank per step.
/// Every rank must bring one block per output, of its placement's shape and the output's kind.
pub fn assemble(plan: &Plan, ranks: Vec<RankOutput>) -> Result<RunOutput, RunError> {
    let whole = |detail: String| RunError::Assemble {
        output: "*".into(),
        detail,
    };
    let devices = plan.mesh.num_devices();
    if ranks.len() as u64 != devices {
        return Err(whole(format!(
            "{} ranks for {devices} devices",
            ranks.len()
        )));
    }
    let steps = ranks.first().map(|r| r.step_times.len()).unwrap_or(0);
    let outs = plan.local.outputs();
    if let Some(r) = ranks
        .iter()
        .position(|o| o.step_times.len() != steps || o.outputs.len() != outs.len())
    {
        return Err(whole(format!(
            "rank {r} brought {} outputs and {} step times, expected {} and {steps}",
            ranks[r].outputs.len(),
            ranks[r].step_times.len(),
            outs.len()
        )));
    }
    let step_times = (0..steps)
        .map(|i| ranks.iter().map(|r| r.step_times[i]).fold(0.0, f64::max))
        .collect();
    let peak = ranks.iter().map(|r| r.peak_bytes).max().unwrap_or(0);
    let collectives = ranks
        .first()
        .map(|r| r.collectives.clone())
        .unwrap_or_default();
    let mut pipeline: Vec<super::pipeline::StageRunStats> = Vec::new();
    for s in ranks.iter().filter_map(|r| r.pipeline.as_ref()) {
        if pipeline.iter().all(|p| p.stage != s.stage) {
            pipeline.push(s.clone());
        }
    }
    pipeline.sort_by_key(|p| p.stage);
    let mut outputs = BTreeMap::new();
    for (k, o) in outs.iter().enumerate() {
        let blocks: Vec<&Tensor> = ranks.iter().map(|r| &r.outputs[k]).collect();
        let t = assemble_output(plan, &blocks, k).map_err(|detail| RunError::Assemble {
            output: o.name.clone(),
            detail,
        })?;
        outputs.insert(o.name.clone(), t);
    }
    Ok(RunOutput {
        outputs,
        stats: RunStats {
            step_times,
            collectives,
            peak_bytes_per_rank: peak,
            pipeline,
        },
    })
}

/// The global array of output `k` from every rank's block of it (in rank order).
pub(crate) fn assemble_output(plan: &Plan, blocks: &[&Tensor], k: usize) -> Result<Tensor, String> {
    let v = plan.local.outputs()[k].value;
    // The plan verifier checks that local output `k` holds global output `k`.
    let origin = plan
        .global
        .outputs()
        .get(k)
        .ok_or_else(|| format!("the global program has no output {k}"))?
        .value;
    let global_shape = &plan.global.ty(origin).shape;
    let pl = &plan.placements[v];
    // On a pipelined plan, the stage making an output holds its blocks.
    let owners = super::pipeline::output_owners(plan);
    let blocks: Vec<(usize, Vec<u64>, &Tensor)> = blocks
        .iter()
        .enumerate()
        .map(|(r, &t)| (r, plan.mesh.coords(r as u64), t))
        .filter(|(_, c, _)| {
            owners
                .as_ref()
                .is_none_or(|(a, o)| o.get(k).is_some_and(|&s| c[*a] == u64::from(s)))
        })
        .collect();
    Ok(match plan.global.ty(origin).dtype {
        Dtype::I32 => Tensor::I32(place(global_shape, &blocks, pl, plan, Tensor::as_i32)?),
        _ => Tensor::F32(place(global_shape, &blocks, pl, plan, Tensor::as_f32)?),
    })
}

/// Writes every rank's block into a global array of `shape`; a block of the wrong kind or
/// shape is an error.
fn place<T: Clone + Default>(
    shape: &[u64],
    blocks: &[(usize, Vec<u64>, &Tensor)],
    pl: &crate::sharding::Placement,
    plan: &Plan,
    get: impl Fn(&Tensor) -> Option<&ArrayD<T>>,
) -> Result<ArrayD<T>, String> {
    let dims = shape
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("dim {d} does not fit usize")))
        .collect::<Result<Vec<usize>, _>>()?;
    let mut out = ArrayD::<T>::default(IxDyn(&dims));
    for (r, coords, t) in blocks {
        let r = *r;
        let x = get(t).ok_or_else(|| format!("rank {r} sent a block of kind {}", t.kind()))?;
        let ranges = block_ranges(shape, pl, coords, &plan.mesh);
        let mut v = out.view_mut();
        for (d, rg) in ranges.iter().enumerate() {
            v.slice_axis_inplace(Axis(d), Slice::from(rg.start as usize..rg.end as usize));
        }
        if v.shape() != x.shape() {
            return Err(format!(
                "rank {r} sent a block of shape {:?}, its placement holds {:?}",
                x.shape(),
                v.shape()
            ));
        }
        v.assign(x);
    }
    Ok(out)
}

/// One rank's op evaluator: global ops by `apply`, SPMD ops with its peers.
pub(crate) struct Rank<'a> {
    plan: &'a Plan,
    t: &'a mut dyn Transport,
    /// This rank's coordinates; on the temporal axis, the running microbatch.
    pub(super) coords: Vec<u64>,
    groups: Vec<Vec<usize>>,
    collectives: BTreeMap<String, (u64, u64)>,
    /// Per accumulation's result, the sum of the microbatches run so far.
    pub(super) acc: BTreeMap<ValueId<Local>, Tensor>,
    /// A test's corrupted block: this value's first element is set to +inf once made.
    pub(super) poison: Option<ValueId<Local>>,
}

/// Runs the plan's program on the calling thread as the transport's rank.
pub fn run_rank(
    plan: &Plan,
    t: &mut dyn Transport,
    source: &LeafSource,
    steps: usize,
    on_step: Option<&(dyn Fn(usize) + Sync)>,
) -> Result<RankOutput, RunError> {
    let result = run_rank_inner(plan, t, source, steps, on_step);
    if result.is_err() {
        t.abort();
    }
    result
}

fn run_rank_inner(
    plan: &Plan,
    t: &mut dyn Transport,
    source: &LeafSource,
    steps: usize,
    on_step: Option<&(dyn Fn(usize) + Sync)>,
) -> Result<RankOutput, RunError> {
    if let Some(pipe) = &plan.pipeline {
        return run_stage_rank(plan, pipe, t, source, steps, on_step);
    }
    let rank = t.rank();
    let loaded = load_leaves(plan, &plan.mesh.coords(rank as u64), source, rank)?;
    let micro = super::micro::microbatches(plan).map_err(|error| RunError::Load {
        rank,
        leaf: "*".into(),
        error,
    })?;
    let later = super::micro::later_inputs(plan, rank, |coords, rank| {
        load_leaves_where(plan, coords, source, rank, |op, _| {
            matches!(op, Op::Input { .. })
        })
    })?;
    let leaf_bytes: u64 = loaded
        .values()
        .chain(later.iter().flat_map(|m| m.values()))
        .map(core::bytes)
        .sum();
    let live = Liveness::of(&plan.local);
    let mut r = Rank::new(plan, t);
    let mut step_times = Vec::with_capacity(steps.min(1 << 20));
    let mut outputs = Vec::new();
    let mut peak = 0;
    for step in 0..steps.max(1) {
        r.barrier()?;
        let t0 = Instant::now();
        let out = super::micro::run_step(micro.as_ref(), &live, &loaded, &later, &mut r)?;
        step_times.push(t0.elapsed().as_secs_f64());
        peak = peak.max(out.peak_bytes + leaf_bytes);
        if step + 1 == steps.max(1) {
            outputs = out.outputs;
        } else {
            out.outputs.into_iter().for_each(k::recycle);
        }
        if let (0, Some(f)) = (rank, on_step) {
            f(step);
        }
    }
    Ok(RankOutput {
        outputs,
        step_times,
        collectives: r.collectives,
        peak_bytes: peak,
        pipeline: None,
    })
}

/// [`run_rank_inner`] on a pipelined plan: the rank runs its stage's share of each step; the
/// outputs its stage does not make are empty.
fn run_stage_rank(
    plan: &Plan,
    pipe: &crate::pipeline::Pipeline,
    t: &mut dyn Transport,
    source: &LeafSource,
    steps: usize,
    on_step: Option<&(dyn Fn(usize) + Sync)>,
) -> Result<RankOutput, RunError> {
    let rank = t.rank();
    let stage = super::pipeline::Stage::of(plan, pipe, rank).map_err(|error| RunError::Load {
        rank,
        leaf: "*".into(),
        error,
    })?;
    let (loaded, later) = stage.load_leaves(source, rank)?;
    let leaf_bytes: u64 = loaded
        .values()
        .chain(later.iter().flat_map(|m| m.values()))
        .map(core::bytes)
        .sum();
    let mut r = Rank::new(plan, t);
    let (mut step_times, mut outputs, mut peak, mut stats) = (Vec::new(), Vec::new(), 0, None);
    for step in 0..steps.max(1) {
        r.barrier()?;
        let t0 = Instant::now();
        let out = stage
            .run_step(&loaded, &later, &mut r)
            .map_err(|e| e.within(&format!("step {}", step + 1)))?;
        step_times.push(t0.elapsed().as_secs_f64());
        peak = peak.max(out.peak_bytes + leaf_bytes);
        outputs = super::pipeline::or_empty(out.outputs);
        stats = Some(out.stats);
        if let (0, Some(f)) = (rank, on_step) {
            f(step);
        }
    }
    Ok(RankOutput {
        outputs,
        step_times,
        collectives: r.collectives,
        peak_bytes: peak,
        pipeline: stats,
    })
}

/// Loads (or generates) this rank's block of every leaf of the local program.
pub(crate) fn load_leaves(
    plan: &Plan,
    coords: &[u64],
    source: &LeafSource,
    rank: usize,
) -> Result<BTreeMap<ValueId<Local>, Tensor>, RunError> {
    load_leaves_where(plan, coords, source, rank, |_, _| true)
}

/// [`load_leaves`] for the leaves `pick` accepts (by op and value).
pub(crate) fn load_leaves_where(
    plan: &Plan,
    coords: &[u64],
    source: &LeafSource,
    rank: usize,
    pick: impl Fn(&Op, ValueId<Local>) -> bool,
) -> Result<BTreeMap<ValueId<Local>, Tensor>, RunError> {
    let mut out = BTreeMap::new();
    for (_, n) in plan.local.nodes() {
        let Some(name) = n.op.leaf_name().filter(|_| pick(&n.op, n.outputs[0])) else {
            continue;
        };
        let v = n.outputs[0];
        let global = plan.origin[v].ok_or_else(|| RunError::Load {
            rank,
            leaf: name.to_string(),
            error: ExecError::Internal {
                node: name.to_string(),
                detail: "a leaf without a global value".into(),
            },
        })?;
        let t = local_leaf(
            &plan.global,
            global,
            name,
            &plan.placements[v],
            coords,
            &plan.mesh,
            source,
        )
        .map_err(|error| RunError::Load {
            rank,
            leaf: name.to_string(),
            error,
        })?;
        if !t.matches(plan.local.ty(v)) {
            return Err(RunError::Load {
                rank,
                leaf: name.to_string(),
                error: ExecError::WrongType {
                    what: name.to_string(),
                    expected: plan.local.ty(v).clone(),
                    got: t.describe(),
                },
            });
        }
        out.insert(v, t);
    }
    Ok(out)
}

/// Sets the first element of `node`'s result `v` (when it makes it) to +inf.
pub(crate) fn poison<S: crate::ir::Space>(node: &Node<S>, out: &mut [Tensor], v: ValueId<S>) {
    let k = node.outputs.iter().position(|&o| o == v);
    if let Some(Tensor::F32(a)) = k.and_then(|k| out.get_mut(k)) {
        if let Some(x) = a.iter_mut().next() {
            *x = f32::INFINITY;
        }
    }
}

impl Eval<Local> for Rank<'_> {
    type Error = NodeError;
    fn eval(
        &mut self,
        node: &Node<Local>,
        args: Vec<Cow<'_, Tensor>>,
    ) -> Result<Vec<Tensor>, NodeError> {
        let mut out = self.node(node, args).map_err(|e| self.globalize(node, e))?;
        if let Some(v) = self.poison {
            poison(node, &mut out, v);
        }
        Ok(out)
    }

    fn absorb(&mut self, node: &Node<Local>, args: Vec<Cow<'_, Tensor>>) -> Result<(), NodeError> {
        Ok(super::micro::accumulate(&mut self.acc, node, args)?)
    }
}

impl<'a> Rank<'a> {
    /// The plan this rank runs.
    pub(crate) fn plan(&self) -> &'a Plan {
        self.plan
    }

    /// The evaluator of the transport's rank of `plan`.
    pub(crate) fn new(plan: &'a Plan, t: &'a mut dyn Transport) -> Self {
        let rank = t.rank() as u64;
        let groups = (0..plan.mesh.rank())
            .map(|a| {
                plan.mesh
                    .group(rank, a)
                    .into_iter()
                    .map(|d| d as usize)
                    .collect()
            })
            .collect();
        Rank {
            plan,
            coords: plan.mesh.coords(rank),
            t,
            groups,
            collectives: BTreeMap::new(),
            acc: BTreeMap::new(),
            poison: None,
        }
    }

    /// Waits for every rank to start the step together, and resets the step's counts.
    pub(crate) fn barrier(&mut self) -> Result<(), RunError> {
        self.wait_all("step barrier")?;
        self.collectives.clear();
        Ok(())
    }

    /// Waits for every rank (a one-element all-reduce over the world); `what` names it in
    /// errors.
    fn wait_all(&mut self, what: &str) -> Result<(), RunError> {
        let world: Vec<usize> = (0..self.t.world()).collect();
        let mut sync = [0.0f32];
        comm::all_reduce(self.t, &world, &mut sync, ReduceOp::Sum).map_err(|e| RunError::Op {
            rank: self.t.rank(),
            op: what.into(),
            location: String::new(),
            error: Box::new(e.into()),
        })
    }
}

impl Rank<'_> {
    /// Waits for every rank (without resetting the step's counts).
    pub(crate) fn sync(&mut self) -> Result<(), RunError> {
        self.wait_all("checkpoint barrier")
    }

    /// This rank's id.
    pub(crate) fn rank(&self) -> usize {
        self.t.rank()
    }

    /// Sends a pipeline message to rank `to`.
    pub(crate) fn send(&mut self, to: usize, msg: comm::Message) -> Result<(), CommError> {
        self.t.send(to, msg)
    }

    /// Receives the next pipeline message from rank `from`.
    pub(crate) fn recv(&mut self, from: usize) -> Result<comm::Message, CommError> {
        self.t.recv(from)
    }

    /// Sends to `to` and receives from `from` as one step (both must be matched).
    pub(crate) fn exchange(
        &mut self,
        to: usize,
        msg: comm::Message,
        from: usize,
    ) -> Result<comm::Message, CommError> {
        self.t.exchange(to, msg, from)
    }

    /// The collective counts and bytes of the last step.
    pub(crate) fn into_collectives(self) -> BTreeMap<String, (u64, u64)> {
        self.collectives
    }

    /// The run error of node `id` on this rank.
    pub(crate) fn op_error(&self, id: NodeId<Local>, error: NodeError) -> RunError {
        let g = &self.plan.local;
        let node = g.node(id);
        let location = format!(
            "{}:{}:{}",
            crate::emit::file_name(&g.source),
            node.span.line,
            node.span.col
        );
        let op = match node.outputs.first() {
            Some(v) => format!("{v} = {}", node.op.name()),
            None => node.op.name().to_string(),
        };
        RunError::Op {
            rank: self.t.rank(),
            op,
            location,
            error: Box::new(error),
        }
    }

    /// An out-of-range id or label with its position in the global ids (or labels) tensor
    /// instead of this rank's block.
    fn globalize(&self, node: &Node<Local>, e: NodeError) -> NodeError {
        let operand = match node.op {
            Op::Embedding | Op::VocabEmbedding { .. } => 0,
            Op::CrossEntropy | Op::TargetLogit { .. } => 1,
            _ => return e,
        };
        let Some(&v) = node.inputs.get(operand) else {
            return e;
        };
        let global = |p: usize| self.global_position(v, p).unwrap_or(p);
        match e {
            NodeError::Exec(ExecError::IdOutOfRange {
                id,
                position,
                vocab,
            }) => NodeError::Exec(ExecError::IdOutOfRange {
                id,
                position: global(position),
                vocab,
            }),
            NodeError::Exec(ExecError::LabelOutOfRange {
                label,
                position,
                classes,
            }) => NodeError::Exec(ExecError::LabelOutOfRange {
                label,
                position: global(position),
                classes,
            }),
            e => e,
        }
    }

    /// The row-major position in the global tensor of element `p` of this rank's block of local
    /// value `v`; `None` when `v` is not a block of a global value.
    fn global_position(&self, v: ValueId<Local>, p: usize) -> Option<usize> {
        let plan = self.plan;
        let origin = plan.origin[v]?;
        let shape = &plan.global.ty(origin).shape;
        let local = &plan.local.ty(v).shape;
        let ranges = block_ranges(shape, &plan.placements[v], &self.coords, &plan.mesh);
        if local.len() != shape.len()
            || ranges.iter().zip(local).any(|(r, &n)| r.end - r.start != n)
        {
            return None;
        }
        let (mut rest, mut flat) = (p as u64, 0u64);
        let mut stride = 1u64;
        for ((r, &n), &g) in ranges.iter().zip(local).zip(shape).rev() {
            let i = rest % n.max(1);
            rest /= n.max(1);
            flat += (r.start + i) * stride;
            stride *= g;
        }
        usize::try_from(flat).ok()
    }

    fn node(
        &mut self,
        node: &Node<Local>,
        args: Vec<Cow<'_, Tensor>>,
    ) -> Result<Vec<Tensor>, NodeError> {
        if !node.op.is_spmd_only() {
            return Ok(apply_owned(&node.op, args)?);
        }
        let name = node.op.name();
        if args.is_empty() {
            return Err(ExecError::shape(name, "an SPMD op without an operand").into());
        }
        if CollectiveKind::of(&node.op).is_some() && self.temporal(&node.op) {
            return Err(
                ExecError::shape(name, "a collective over the microbatches run as an op").into(),
            );
        }
        if let Some((kind, size)) = CollectiveKind::of(&node.op) {
            let whole: u64 = args.iter().map(|a| core::bytes(a)).sum();
            let (sent, _) = kind.traffic(size, whole as f64);
            let e = self.collectives.entry(kind.name().to_string()).or_default();
            e.0 += 1;
            e.1 += sent.round() as u64;
        }
        match &node.op {
            Op::VocabEmbedding { axes } => {
                return Ok(vec![self.vocab_embedding(&node.op, axes, &args)?])
            }
            Op::TargetLogit { axes } => return Ok(vec![self.target_logit(&node.op, axes, &args)?]),
            Op::AllReduce { reduce, .. } if args.len() > 1 => {
                return self.bucket(&node.op, *reduce, args)
            }
            _ => {}
        }
        let x = args.into_iter().next().expect("checked above");
        let t = match x {
            Cow::Owned(Tensor::F32(a)) => Tensor::F32(self.collective(&node.op, Cow::Owned(a))?),
            Cow::Owned(Tensor::I32(a)) => Tensor::I32(self.collective(&node.op, Cow::Owned(a))?),
            Cow::Borrowed(Tensor::F32(a)) => {
                Tensor::F32(self.collective(&node.op, Cow::Borrowed(a))?)
            }
            Cow::Borrowed(Tensor::I32(a)) => {
                Tensor::I32(self.collective(&node.op, Cow::Borrowed(a))?)
            }
        };
        Ok(vec![t])
    }

    /// A bucket: its operands packed into one buffer, reduced as one message, unpacked.
    fn bucket(
        &mut self,
        op: &Op,
        reduce: ReduceOp,
        args: Vec<Cow<'_, Tensor>>,
    ) -> Result<Vec<Tensor>, NodeError> {
        let group = &self.reduce_group(op)?;
        Ok(match &*args[0] {
            Tensor::F32(_) => reduce_bucket(self.t, group, &args, Tensor::as_f32, op, reduce)?
                .into_iter()
                .map(Tensor::F32)
                .collect(),
            Tensor::I32(_) => reduce_bucket(self.t, group, &args, Tensor::as_i32, op, reduce)?
                .into_iter()
                .map(Tensor::I32)
                .collect(),
        })
    }

    /// True when `op` names the mesh's temporal axis.
    fn temporal(&self, op: &Op) -> bool {
        let mesh = &self.plan.mesh;
        op.mesh_axes()
            .iter()
            .any(|(a, _)| mesh.axis_index(a).is_some_and(|i| mesh.is_temporal(i)))
    }

    /// The ranks an all-reduce reduces over: its axis's group, or the product group of all
    /// its axes.
    fn reduce_group(&self, op: &Op) -> Result<Vec<usize>, ExecError> {
        let axes = op
            .mesh_axes()
            .into_iter()
            .map(|(a, _)| self.axis(op, a))
            .collect::<Result<Vec<_>, _>>()?;
        if let [a] = axes[..] {
            return Ok(self.groups[a].clone());
        }
        let rank = self.t.rank() as u64;
        let group = self.plan.mesh.product_group(rank, &axes);
        Ok(group.into_iter().map(|d| d as usize).collect())
    }

    /// The index of mesh axis `name`.
    fn axis(&self, op: &Op, name: &str) -> Result<usize, ExecError> {
        self.plan
            .mesh
            .axis_index(name)
            .ok_or_else(|| ExecError::shape(op.name(), format!("unknown mesh axis `{name}`")))
    }

    /// A data-moving SPMD op on an f32 or i32 block: elements move exactly, integers are summed
    /// and maximized as integers.
    fn collective<T: Elem>(
        &mut self,
        op: &Op,
        x: Cow<'_, ArrayD<T>>,
    ) -> Result<ArrayD<T>, NodeError> {
        let name = op.name();
        match op {
            Op::AllReduce { reduce, .. } => {
                let group = &self.reduce_group(op)?;
                let shape = x.shape().to_vec();
                // A dying operand is reduced in its own buffer.
                let mut data = into_flat(x);
                comm::all_reduce(self.t, group, &mut data, *reduce)?;
                Ok(k::from_vec(name, shape, data)?)
            }
            Op::AllGather { axis, dim, .. } => self.all_gather(op, axis, *dim, &x),
            Op::ReduceScatter {
                axis, dim, reduce, ..
            } => self.reduce_scatter(op, axis, *dim, *reduce, x),
            Op::AllToAll {
                axis,
                split,
                concat,
                ..
            } => self.all_to_all(op, axis, *split, *concat, &x),
            Op::ShardSlice { axis, size, dim } => {
                let c = self.coords[self.axis(op, axis)?] as usize;
                check_split(name, x.shape(), *dim, *size as usize)?;
                let n = x.shape()[*dim] / *size as usize;
                Ok(k::slice(&x, *dim, (c * n) as u64, ((c + 1) * n) as u64)?)
            }
            Op::KeepOnFirst { axis } => Ok(if self.coords[self.axis(op, axis)?] == 0 {
                x.into_owned()
            } else {
                ArrayD::from_elem(x.raw_dim(), T::default())
            }),
            Op::Redistribute { axes, from, to } => {
                let axes = axes
                    .iter()
                    .map(|(a, _)| self.axis(op, a))
                    .collect::<Result<Vec<usize>, _>>()?;
                let spec = redistribute::Spec {
                    axes: &axes,
                    from,
                    to,
                };
                Ok(redistribute::run(
                    self.t,
                    &self.plan.mesh,
                    &self.coords,
                    &spec,
                    x.view(),
                )?)
            }
            _ => Err(ExecError::shape(name, "not a collective").into()),
        }
    }

    /// Concatenates the group's blocks along `dim`.
    fn all_gather<T: Elem>(
        &mut self,
        op: &Op,
        axis: &str,
        dim: usize,
        x: &ArrayD<T>,
    ) -> Result<ArrayD<T>, NodeError> {
        let group = &self.groups[self.axis(op, axis)?];
        let shape = x.shape();
        k::check_axis(op.name(), shape.len(), dim)?;
        let k = group.len();
        let all = comm::all_gather(self.t, group, &k::row_major(x))?;
        let mut global = shape.to_vec();
        global[dim] *= k;
        // Rank i's block is chunk i of `all`; along the outermost non-trivial dim the chunks are
        // already the concatenation.
        let data = if shape[..dim].iter().all(|&d| d == 1) {
            all
        } else {
            let len = all.len() / k.max(1);
            let pieces: Vec<&[T]> = all.chunks_exact(len.max(1)).collect();
            join(&pieces, shape, dim)
        };
        Ok(k::from_vec(op.name(), global, data)?)
    }

    /// Reduces the group's blocks and keeps this rank's piece along `dim`.
    fn reduce_scatter<T: Elem>(
        &mut self,
        op: &Op,
        axis: &str,
        dim: usize,
        reduce: ReduceOp,
        x: Cow<'_, ArrayD<T>>,
    ) -> Result<ArrayD<T>, NodeError> {
        let group = &self.groups[self.axis(op, axis)?];
        let k = group.len();
        let shape = x.shape().to_vec();
        check_split(op.name(), &shape, dim, k)?;
        let mut flat = into_flat(x);
        if !shape[..dim].iter().all(|&d| d == 1) {
            // Piece i (the i-th block along `dim`) must be the i-th contiguous chunk.
            let mut pieces = k::take_vec::<T>(flat.len());
            for r in 0..k {
                piece(&flat, &shape, dim, k, r, &mut pieces);
            }
            k::give(std::mem::replace(&mut flat, pieces));
        }
        let mine = comm::reduce_scatter(self.t, group, &mut flat, reduce)?;
        k::give(flat);
        let mut local = shape;
        local[dim] /= k;
        Ok(k::from_vec(op.name(), local, mine)?)
    }

    /// Splits the block along `split`, exchanges the pieces, joins them along `concat`.
    fn all_to_all<T: Elem>(
        &mut self,
        op: &Op,
        axis: &str,
        split: usize,
        concat: usize,
        x: &ArrayD<T>,
    ) -> Result<ArrayD<T>, NodeError> {
        let group = &self.groups[self.axis(op, axis)?];
        let k = group.len();
        let shape = x.shape();
        check_split(op.name(), shape, split, k)?;
        k::check_axis(op.name(), shape.len(), concat)?;
        let flat = k::row_major(x);
        let mut pshape = shape.to_vec();
        pshape[split] /= k;
        let chunks: Vec<Vec<T>> = (0..k)
            .map(|r| {
                let mut v = Vec::with_capacity(flat.len() / k);
                piece(&flat, shape, split, k, r, &mut v);
                v
            })
            .collect();
        let got = comm::all_to_all(self.t, group, chunks)?;
        let len: usize = pshape.iter().product();
        if got.iter().any(|g| g.len() != len) {
            return Err(ExecError::shape(op.name(), "a received block has the wrong size").into());
        }
        let pieces: Vec<&[T]> = got.iter().map(|g| &g[..]).collect();
        let data = join(&pieces, &pshape, concat);
        let mut out = pshape;
        out[concat] *= k;
        Ok(k::from_vec(op.name(), out, data)?)
    }

    /// The vocab block `(offset, vocab)` of this rank's `local` rows along `axes` (major first).
    fn vocab_block(
        &self,
        op: &Op,
        axes: &[(String, u64)],
        local: usize,
    ) -> Result<(i64, i64), ExecError> {
        let mut b = 0u64;
        let mut k = 1u64;
        for (name, size) in axes {
            b = b * size + self.coords[self.axis(op, name)?];
            k *= size;
        }
        Ok((b as i64 * local as i64, local as i64 * k as i64))
    }

    /// `op`'s embedding of global `ids` in this rank's rows of the table (zeros elsewhere).
    fn vocab_embedding(
        &self,
        op: &Op,
        axes: &[(String, u64)],
        args: &[Cow<'_, Tensor>],
    ) -> Result<Tensor, ExecError> {
        let name = op.name();
        let [ids, table] = arity(name, args)?;
        let ids = i32_arg(name, 0, ids)?;
        let table = f32_arg(name, 1, table)?;
        if table.ndim() != 2 {
            return Err(ExecError::shape(name, "the table must have rank 2"));
        }
        let (rows, h) = (table.shape()[0], table.shape()[1]);
        let (off, vocab) = self.vocab_block(op, axes, rows)?;
        let local = rows as i64;
        let mut shape = ids.shape().to_vec();
        shape.push(h);
        let mut buf = k::take_f32(shape.iter().product());
        buf.fill(0.0);
        let t = k::row_major(table);
        for (i, &id) in ids.iter().enumerate() {
            let id = id as i64;
            if id < 0 || id >= vocab {
                return Err(ExecError::IdOutOfRange {
                    id,
                    position: i,
                    vocab: vocab as usize,
                });
            }
            if id >= off && id < off + local {
                let r = (id - off) as usize;
                buf[i * h..(i + 1) * h].copy_from_slice(&t[r * h..(r + 1) * h]);
            }
        }
        k::from_vec(name, shape, buf).map(Tensor::F32)
    }

    /// `op`'s logit of each global label, from this rank's columns (zero elsewhere).
    fn target_logit(
        &self,
        op: &Op,
        axes: &[(String, u64)],
        args: &[Cow<'_, Tensor>],
    ) -> Result<Tensor, ExecError> {
        let name = op.name();
        let [x, labels] = arity(name, args)?;
        let x = f32_arg(name, 0, x)?;
        let labels = i32_arg(name, 1, labels)?;
        let v = *x
            .shape()
            .last()
            .ok_or_else(|| ExecError::shape(name, "rank 0 logits"))?;
        if x.len() != labels.len() * v {
            return Err(ExecError::shape(name, "logits and labels do not fit"));
        }
        let (off, vocab) = self.vocab_block(op, axes, v)?;
        let local = v as i64;
        let xs = k::row_major(x);
        let mut out = ArrayD::<f32>::zeros(labels.raw_dim());
        for (i, (&l, o)) in labels.iter().zip(out.iter_mut()).enumerate() {
            let l = l as i64;
            if l < 0 || l >= vocab {
                return Err(ExecError::LabelOutOfRange {
                    label: l,
                    position: i,
                    classes: vocab as usize,
                });
            }
            if l >= off && l < off + local {
                *o = xs[i * v + (l - off) as usize];
            }
        }
        Ok(Tensor::F32(out))
    }
}

/// The elements in row-major order as an owned buffer: an owned array's own buffer when in
/// standard layout (no copy), else a pooled copy.
fn into_flat<T: Pooled>(x: Cow<'_, ArrayD<T>>) -> Vec<T> {
    match x {
        Cow::Owned(x) if x.is_standard_layout() => {
            let len = x.len();
            let (mut v, offset) = x.into_raw_vec_and_offset();
            let start = offset.unwrap_or(0);
            if start > 0 {
                v.drain(..start);
            }
            v.truncate(len);
            v
        }
        x => k::row_major(&x).into_owned(),
    }
}

/// An error unless dim `dim` of `shape` splits into `k` equal blocks.
fn check_split(op: &'static str, shape: &[usize], dim: usize, k: usize) -> Result<(), ExecError> {
    k::check_axis(op, shape.len(), dim)?;
    let n = shape[dim];
    if k == 0 || !n.is_multiple_of(k) {
        return Err(ExecError::shape(
            op,
            format!("dim {dim} of size {n} does not split into {k}"),
        ));
    }
    Ok(())
}

/// Pushes block `r` of `k` equal blocks along `dim` of the row-major `src` of `shape`.
fn piece<T: Copy>(src: &[T], shape: &[usize], dim: usize, k: usize, r: usize, out: &mut Vec<T>) {
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let size = shape[dim];
    let p = size / k;
    for o in 0..outer {
        out.extend_from_slice(&src[(o * size + r * p) * inner..(o * size + (r + 1) * p) * inner]);
    }
}

/// The concatenation along `dim` of row-major blocks, each of shape `shape`.
fn join<T: Pooled>(pieces: &[&[T]], shape: &[usize], dim: usize) -> Vec<T> {
    let outer: usize = shape[..dim].iter().product();
    let block: usize = shape[dim..].iter().product();
    let mut out = k::take_vec::<T>(block * outer * pieces.len());
    for o in 0..outer {
        for p in pieces {
            out.extend_from_slice(&p[o * block..(o + 1) * block]);
        }
    }
    out
}

/// A bucket of one element kind: its operands packed one after another, reduced over `group`
/// as one message, and split back into arrays of their shapes.
fn reduce_bucket<T: Elem>(
    t: &mut dyn Transport,
    group: &[usize],
    args: &[Cow<'_, Tensor>],
    view: impl Fn(&Tensor) -> Option<&ArrayD<T>>,
    op: &Op,
    reduce: ReduceOp,
) -> Result<Vec<ArrayD<T>>, NodeError> {
    let total = args.iter().map(|a| a.len()).sum();
    let mut flat = Vec::with_capacity(total);
    for a in args {
        let a = view(a).ok_or_else(|| ExecError::shape(op.name(), "a bucket mixes dtypes"))?;
        flat.extend(a.iter().copied());
    }
    comm::all_reduce(t, group, &mut flat, reduce)?;
    let mut out = Vec::with_capacity(args.len());
    let mut at = 0;
    for a in args {
        let n = a.len();
        out.push(k::from_vec(
            op.name(),
            a.shape().to_vec(),
            flat[at..at + n].to_vec(),
        )?);
        at += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_stopped_by_another_is_told_by_its_variant() {
        let op = |error: NodeError| RunError::Op {
            rank: 1,
            op: "%3 = all_reduce".into(),
            location: String::new(),
            error: Box::new(error),
        };
        assert!(op(CommError::Aborted.into()).is_secondary());
        assert!(op(CommError::Disconnected(2).into()).is_secondary());
        let length = CommError::Length {
            from: 0,
            got: 1,
            want: 2,
        };
        assert!(!op(length.into()).is_secondary());
        // An exec error whose text reads like a secondary one is still the rank's own.
        let own = ExecError::shape("all_reduce", "rank 2 disconnected");
        assert!(!op(own.into()).is_secondary());
        assert!(!RunError::Panicked(0).is_secondary());
    }
}
