//! The SPMD runtime: every rank runs the plan's per-device program on its own shards, in its own
//! thread, and the collectives move real data between ranks through a `Transport`. Ranks load
//! (or generate) only their own blocks of params and inputs; outputs are assembled into global
//! arrays from the ranks' blocks.

use super::apply::apply_owned;
use super::comm::{self, CommError, ThreadTransport, Transport};
use super::kernels as k;
use super::leaves::{block_ranges, local_leaf, LeafSource};
use super::{ExecError, Tensor};
use crate::ir::{Node, Op, ReduceOp, ValueId};
use crate::plan::summary::collective_kind;
use crate::plan::Plan;
use ndarray::{ArrayD, Axis, IxDyn, Slice};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::Instant;

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
        error: String,
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
}

/// Runs `plan` on one thread per device with the thread transport, `steps` times after loading.
/// `on_step` is called by rank 0 after each step (for progress).
pub fn run_threads(
    plan: &Plan,
    source: &LeafSource,
    steps: usize,
    on_step: Option<&(dyn Fn(usize) + Sync)>,
) -> Result<RunOutput, RunError> {
    let n = plan.mesh.num_devices() as usize;
    let results: Vec<Result<RankOutput, RunError>> = std::thread::scope(|s| {
        let handles: Vec<_> = ThreadTransport::world(n)
            .into_iter()
            .map(|mut t| s.spawn(move || run_rank(plan, &mut t, source, steps, on_step)))
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(r, h)| h.join().unwrap_or(Err(RunError::Panicked(r))))
            .collect()
    });
    let mut ranks = Vec::with_capacity(n);
    let mut first_err: Option<RunError> = None;
    for r in results {
        match r {
            Ok(o) => ranks.push(o),
            Err(e) => {
                if first_err.is_none()
                    || (!is_secondary(&e) && first_err.as_ref().is_some_and(is_secondary))
                {
                    first_err = Some(e);
                }
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(assemble(plan, ranks))
}

/// True for a rank that stopped only because another failed (it was aborted, or its peer's
/// channel closed): the failing rank's own error is the one to report.
fn is_secondary(e: &RunError) -> bool {
    matches!(e, RunError::Op { error, .. } if error == &CommError::Aborted.to_string() || error.ends_with("disconnected"))
}

/// Combines the ranks' results: global outputs from their blocks, the slowest rank per step.
pub fn assemble(plan: &Plan, ranks: Vec<RankOutput>) -> RunOutput {
    let steps = ranks.first().map(|r| r.step_times.len()).unwrap_or(0);
    let step_times = (0..steps)
        .map(|i| ranks.iter().map(|r| r.step_times[i]).fold(0.0, f64::max))
        .collect();
    let peak = ranks.iter().map(|r| r.peak_bytes).max().unwrap_or(0);
    let collectives = ranks
        .first()
        .map(|r| r.collectives.clone())
        .unwrap_or_default();
    let mut outputs = BTreeMap::new();
    for (k, o) in plan.local.outputs().iter().enumerate() {
        let origin = plan.origin[o.value.index()].unwrap_or(o.value);
        let global_shape: Vec<u64> = plan.global.ty(origin).shape.clone();
        let pl = &plan.placements[o.value.index()];
        let blocks: Vec<(Vec<u64>, &Tensor)> = ranks
            .iter()
            .enumerate()
            .map(|(r, ro)| (plan.mesh.coords(r as u64), &ro.outputs[k]))
            .collect();
        let t = match blocks[0].1 {
            Tensor::F32(_) => Tensor::F32(place(&global_shape, &blocks, pl, plan, |t| t.as_f32())),
            Tensor::I32(_) => Tensor::I32(place(&global_shape, &blocks, pl, plan, |t| t.as_i32())),
        };
        outputs.insert(o.name.clone(), t);
    }
    RunOutput {
        outputs,
        stats: RunStats {
            step_times,
            collectives,
            peak_bytes_per_rank: peak,
        },
    }
}

fn place<T: Clone + Default>(
    shape: &[u64],
    blocks: &[(Vec<u64>, &Tensor)],
    pl: &crate::sharding::Placement,
    plan: &Plan,
    get: impl Fn(&Tensor) -> Option<&ArrayD<T>>,
) -> ArrayD<T> {
    let dims: Vec<usize> = shape.iter().map(|&d| d as usize).collect();
    let mut out = ArrayD::<T>::default(IxDyn(&dims));
    for (coords, t) in blocks {
        let Some(x) = get(t) else { continue };
        let ranges = block_ranges(shape, pl, coords, &plan.mesh);
        let mut v = out.view_mut();
        for (d, r) in ranges.iter().enumerate() {
            v.slice_axis_inplace(Axis(d), Slice::from(r.start as usize..r.end as usize));
        }
        if v.shape() == x.shape() {
            v.assign(x);
        }
    }
    out
}

/// One rank's interpreter state.
struct Rank<'a> {
    plan: &'a Plan,
    t: &'a mut dyn Transport,
    coords: Vec<u64>,
    groups: Vec<Vec<usize>>,
    collectives: BTreeMap<String, (u64, u64)>,
}

/// Runs the plan's program on the calling thread as the transport's rank.
pub fn run_rank(
    plan: &Plan,
    t: &mut dyn Transport,
    source: &LeafSource,
    steps: usize,
    on_step: Option<&(dyn Fn(usize) + Sync)>,
) -> Result<RankOutput, RunError> {
    let rank = t.rank();
    let result = run_rank_inner(plan, t, source, steps, on_step);
    if result.is_err() {
        t.abort();
    }
    let _ = rank;
    result
}

fn run_rank_inner(
    plan: &Plan,
    t: &mut dyn Transport,
    source: &LeafSource,
    steps: usize,
    on_step: Option<&(dyn Fn(usize) + Sync)>,
) -> Result<RankOutput, RunError> {
    let rank = t.rank();
    let mesh = &plan.mesh;
    let coords = mesh.coords(rank as u64);
    let groups = (0..mesh.rank())
        .map(|a| {
            mesh.group(rank as u64, a)
                .into_iter()
                .map(|d| d as usize)
                .collect()
        })
        .collect();
    let leaves = load_leaves(plan, &coords, source, rank)?;
    let leaf_bytes: u64 = leaves.values().map(|t| t.len() as u64 * 4).sum();
    let world: Vec<usize> = (0..t.world()).collect();
    let mut r = Rank {
        plan,
        t,
        coords,
        groups,
        collectives: BTreeMap::new(),
    };
    let mut step_times = Vec::new();
    let mut outputs = Vec::new();
    let mut peak = 0;
    for step in 0..steps.max(1) {
        let mut sync = [0.0f32];
        comm::all_reduce(r.t, &world, &mut sync, ReduceOp::Sum)
            .map_err(|e| op_error(rank, "step barrier", "", &e.to_string()))?;
        r.collectives.clear();
        let t0 = Instant::now();
        let (outs, p) = r.step(&leaves)?;
        step_times.push(t0.elapsed().as_secs_f64());
        peak = peak.max(p + leaf_bytes);
        if step + 1 == steps.max(1) {
            outputs = outs;
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
    })
}

fn op_error(rank: usize, op: &str, location: &str, error: &str) -> RunError {
    RunError::Op {
        rank,
        op: op.to_string(),
        location: location.to_string(),
        error: error.to_string(),
    }
}

/// Loads (or generates) this rank's block of every leaf of the local program.
fn load_leaves(
    plan: &Plan,
    coords: &[u64],
    source: &LeafSource,
    rank: usize,
) -> Result<BTreeMap<ValueId, Tensor>, RunError> {
    let mut out = BTreeMap::new();
    for (_, n) in plan.local.nodes() {
        let (Op::Param { name } | Op::Input { name }) = &n.op else {
            continue;
        };
        let v = n.outputs[0];
        let global = plan.origin[v.index()].ok_or_else(|| RunError::Load {
            rank,
            leaf: name.clone(),
            error: ExecError::Internal {
                node: name.clone(),
                detail: "a leaf without a global value".into(),
            },
        })?;
        let t = local_leaf(
            &plan.global,
            global,
            name,
            &plan.placements[v.index()],
            coords,
            &plan.mesh,
            source,
        )
        .map_err(|error| RunError::Load {
            rank,
            leaf: name.clone(),
            error,
        })?;
        if !t.matches(plan.local.ty(v)) {
            return Err(RunError::Load {
                rank,
                leaf: name.clone(),
                error: ExecError::WrongType {
                    what: name.clone(),
                    expected: plan.local.ty(v).clone(),
                    got: t.describe(),
                },
            });
        }
        out.insert(v, t);
    }
    Ok(out)
}

fn bytes(t: &Tensor) -> u64 {
    t.len() as u64 * 4
}

impl Rank<'_> {
    /// One step: runs every node; returns the local outputs and the peak of live activation bytes.
    fn step(&mut self, leaves: &BTreeMap<ValueId, Tensor>) -> Result<(Vec<Tensor>, u64), RunError> {
        let g = &self.plan.local;
        let last = self.plan.last_uses();
        let mut slots: Vec<Option<Tensor>> = vec![None; g.num_values()];
        let (mut live, mut peak) = (0u64, 0u64);
        for (id, node) in g.nodes() {
            if node.op.is_leaf() {
                continue;
            }
            // Operands read for the last time (and only once here) are handed over, so that the
            // op can reuse their buffers; the rest are borrowed.
            let mut handed: Vec<Option<Tensor>> = node
                .inputs
                .iter()
                .map(|v| {
                    let dies = last[v.index()].is_none_or(|l| l <= id.index())
                        && !leaves.contains_key(v)
                        && node.inputs.iter().filter(|w| *w == v).count() == 1;
                    if dies {
                        slots[v.index()].take()
                    } else {
                        None
                    }
                })
                .collect();
            let handed_bytes: u64 = handed.iter().flatten().map(bytes).sum();
            let args: Vec<Cow<'_, Tensor>> = node
                .inputs
                .iter()
                .zip(handed.iter_mut())
                .map(|(v, h)| match h.take() {
                    Some(t) => Cow::Owned(t),
                    None => Cow::Borrowed(
                        leaves
                            .get(v)
                            .or(slots[v.index()].as_ref())
                            .expect("operands are computed before use"),
                    ),
                })
                .collect();
            let results = self.node(node, args).map_err(|e| {
                let loc = format!(
                    "{}:{}:{}",
                    crate::emit::file_name(&g.source),
                    node.span.line,
                    node.span.col
                );
                op_error(
                    self.t.rank(),
                    &format!("{} = {}", node.outputs[0], node.op.name()),
                    &loc,
                    &e,
                )
            })?;
            for (&v, t) in node.outputs.iter().zip(results) {
                live += bytes(&t);
                slots[v.index()] = Some(t);
            }
            peak = peak.max(live);
            live -= handed_bytes;
            for &v in node.inputs.iter().chain(&node.outputs) {
                if last[v.index()].is_none_or(|l| l <= id.index()) {
                    if let Some(t) = slots[v.index()].take() {
                        live -= bytes(&t);
                        // The buffer serves a later kernel's output on this rank.
                        k::recycle(t);
                    }
                }
            }
        }
        let outs = g
            .outputs()
            .iter()
            .map(|o| {
                leaves
                    .get(&o.value)
                    .cloned()
                    .or_else(|| slots[o.value.index()].clone())
                    .expect("outputs are computed")
            })
            .collect();
        Ok((outs, peak))
    }

    fn node(&mut self, node: &Node, owned: Vec<Cow<'_, Tensor>>) -> Result<Vec<Tensor>, String> {
        if !node.op.is_spmd_only() {
            return apply_owned(&node.op, owned).map_err(|e| e.to_string());
        }
        let first = owned.first().ok_or("a collective without an operand")?;
        if let Some((kind, size)) = collective_kind(&node.op) {
            let (sent, _) = kind.traffic(size, bytes(first) as f64);
            let e = self.collectives.entry(kind.name().to_string()).or_default();
            e.0 += 1;
            e.1 += sent.round() as u64;
        }
        let axis = |name: &str| {
            self.plan
                .mesh
                .axis_index(name)
                .ok_or_else(|| format!("unknown mesh axis `{name}`"))
        };
        if let Op::AllReduce {
            axis: a, reduce, ..
        } = &node.op
        {
            let a = axis(a)?;
            let shape = first.shape().to_vec();
            let int = matches!(first.as_ref(), Tensor::I32(_));
            let mut data = match owned.into_iter().next() {
                // A dying f32 operand is reduced in its own buffer.
                Some(Cow::Owned(Tensor::F32(x))) => into_flat(x),
                Some(t) => flat_f32(&t),
                None => unreachable!("checked above"),
            };
            comm::all_reduce(self.t, &self.groups[a], &mut data, *reduce)
                .map_err(|e| e.to_string())?;
            return Ok(vec![from_f32(&shape, data, int)?]);
        }
        let args: Vec<&Tensor> = owned.iter().map(|a| a.as_ref()).collect();
        let args = &args[..];
        Ok(vec![match &node.op {
            Op::AllGather { axis: a, dim, .. } => {
                let a = axis(a)?;
                let group = &self.groups[a];
                let k = group.len();
                let shape = args[0].shape();
                check_dim(shape, *dim)?;
                let all = match args[0] {
                    Tensor::F32(x) if x.is_standard_layout() => {
                        let mine = x.as_slice().expect("standard layout");
                        comm::all_gather(self.t, group, mine)
                    }
                    t => comm::all_gather(self.t, group, &flat_f32(t)),
                }
                .map_err(|e| e.to_string())?;
                let mut global = shape.to_vec();
                global[*dim] *= k;
                // Rank i's block is chunk i of `all`; along the outermost non-trivial dim the
                // chunks are already the concatenation.
                let data = if shape[..*dim].iter().all(|&d| d == 1) {
                    all
                } else {
                    let len = all.len() / k.max(1);
                    let pieces: Vec<&[f32]> = all.chunks_exact(len.max(1)).collect();
                    join(&pieces, shape, *dim)
                };
                from_f32(&global, data, is_int(args[0]))?
            }
            Op::ReduceScatter {
                axis: a,
                dim,
                reduce,
                ..
            } => {
                let a = axis(a)?;
                let k = self.groups[a].len();
                let shape = args[0].shape();
                check_split(shape, *dim, k)?;
                let mut flat = flat_f32(args[0]);
                if !shape[..*dim].iter().all(|&d| d == 1) {
                    // Piece i (the i-th block along `dim`) must be the i-th contiguous chunk.
                    let mut pieces = k::take_vec::<f32>(flat.len());
                    for r in 0..k {
                        piece(&flat, shape, *dim, k, r, &mut pieces);
                    }
                    k::recycle(Tensor::F32(
                        ArrayD::from_shape_vec(IxDyn(&[flat.len()]), flat)
                            .map_err(|e| e.to_string())?,
                    ));
                    flat = pieces;
                }
                let group = &self.groups[a];
                let mine = comm::reduce_scatter(self.t, group, &mut flat, *reduce)
                    .map_err(|e| e.to_string())?;
                let mut local = shape.to_vec();
                local[*dim] /= k;
                from_f32(&local, mine, is_int(args[0]))?
            }
            Op::AllToAll {
                axis: a,
                split,
                concat: c,
                ..
            } => {
                let a = axis(a)?;
                let k = self.groups[a].len();
                let shape = args[0].shape();
                check_split(shape, *split, k)?;
                check_dim(shape, *c)?;
                let flat = flat_f32(args[0]);
                let mut pshape = shape.to_vec();
                pshape[*split] /= k;
                let chunks: Vec<Vec<f32>> = (0..k)
                    .map(|r| {
                        let mut v = Vec::with_capacity(flat.len() / k);
                        piece(&flat, shape, *split, k, r, &mut v);
                        v
                    })
                    .collect();
                let group = &self.groups[a];
                let got = comm::all_to_all(self.t, group, chunks).map_err(|e| e.to_string())?;
                let len: usize = pshape.iter().product();
                if got.iter().any(|g| g.len() != len) {
                    return Err("all_to_all: a received block has the wrong size".into());
                }
                let pieces: Vec<&[f32]> = got.iter().map(|g| &g[..]).collect();
                let data = join(&pieces, &pshape, *c);
                let mut out = pshape.clone();
                out[*c] *= k;
                from_f32(&out, data, is_int(args[0]))?
            }
            Op::ShardSlice { axis: a, size, dim } => {
                let c = self.coords[axis(a)?];
                let n = args[0].shape()[*dim] / *size as usize;
                let r = c as usize * n..(c as usize + 1) * n;
                let (s, e) = (r.start as u64, r.end as u64);
                match args[0] {
                    Tensor::F32(x) => {
                        Tensor::F32(k::slice(x, *dim, s, e).map_err(|e| e.to_string())?)
                    }
                    Tensor::I32(x) => {
                        Tensor::I32(k::slice(x, *dim, s, e).map_err(|e| e.to_string())?)
                    }
                }
            }
            Op::KeepOnFirst { axis: a } => {
                if self.coords[axis(a)?] == 0 {
                    args[0].clone()
                } else {
                    map_tensor(
                        args[0],
                        |x| ArrayD::zeros(x.raw_dim()),
                        |x| ArrayD::zeros(x.raw_dim()),
                    )
                }
            }
            Op::VocabEmbedding { axes } => self.vocab_embedding(axes, args)?,
            Op::TargetLogit { axes } => self.target_logit(axes, args)?,
            op => {
                let refs = args.to_vec();
                return super::apply(op, &refs).map_err(|e| e.to_string());
            }
        }])
    }

    /// The vocab block `(offset, local rows)` of this rank along `axes` (major first).
    fn vocab_block(&self, axes: &[(String, u64)], local: usize) -> Result<(i64, i64, i64), String> {
        let mut b = 0u64;
        let mut k = 1u64;
        for (name, size) in axes {
            let a = self
                .plan
                .mesh
                .axis_index(name)
                .ok_or_else(|| format!("unknown mesh axis `{name}`"))?;
            b = b * size + self.coords[a];
            k *= size;
        }
        Ok((
            b as i64 * local as i64,
            local as i64,
            local as i64 * k as i64,
        ))
    }

    fn vocab_embedding(&self, axes: &[(String, u64)], args: &[&Tensor]) -> Result<Tensor, String> {
        let ids = args[0].as_i32().ok_or("vocab_embedding: ids must be i32")?;
        let table = args[1]
            .as_f32()
            .ok_or("vocab_embedding: the table must be float")?;
        let (rows, h) = (table.shape()[0], table.shape()[1]);
        let (off, local, vocab) = self.vocab_block(axes, rows)?;
        let mut shape = ids.shape().to_vec();
        shape.push(h);
        let mut buf = k::take_f32(shape.iter().product());
        buf.fill(0.0);
        let mut out = ArrayD::from_shape_vec(IxDyn(&shape), buf).map_err(|e| e.to_string())?;
        let table = table.as_standard_layout();
        let t = table.as_slice().ok_or("table layout")?;
        let o = out.as_slice_mut().ok_or("output layout")?;
        for (i, &id) in ids.iter().enumerate() {
            let id = id as i64;
            if id < 0 || id >= vocab {
                return Err(ExecError::IdOutOfRange {
                    id,
                    position: i,
                    vocab: vocab as usize,
                }
                .to_string());
            }
            if id >= off && id < off + local {
                let r = (id - off) as usize;
                o[i * h..(i + 1) * h].copy_from_slice(&t[r * h..(r + 1) * h]);
            }
        }
        Ok(Tensor::F32(out))
    }

    fn target_logit(&self, axes: &[(String, u64)], args: &[&Tensor]) -> Result<Tensor, String> {
        let x = args[0]
            .as_f32()
            .ok_or("target_logit: logits must be float")?;
        let labels = args[1].as_i32().ok_or("target_logit: labels must be i32")?;
        let v = *x.shape().last().ok_or("target_logit: rank 0 logits")?;
        let (off, local, vocab) = self.vocab_block(axes, v)?;
        let x = x.as_standard_layout();
        let xs = x.as_slice().ok_or("logits layout")?;
        let mut out = ArrayD::<f32>::zeros(labels.raw_dim());
        for (i, (&l, o)) in labels.iter().zip(out.iter_mut()).enumerate() {
            let l = l as i64;
            if l < 0 || l >= vocab {
                return Err(format!(
                    "cross_entropy: label {l} at flat position {i} is out of range [0, {vocab})"
                ));
            }
            if l >= off && l < off + local {
                *o = xs[i * v + (l - off) as usize];
            }
        }
        Ok(Tensor::F32(out))
    }
}

/// The elements of `t` in row-major order as f32, in a pooled buffer (one copy).
fn flat_f32(t: &Tensor) -> Vec<f32> {
    let mut v = k::take_vec::<f32>(t.len());
    match t {
        Tensor::F32(x) => match x.as_slice() {
            Some(s) => v.extend_from_slice(s),
            None => v.extend(x.iter().copied()),
        },
        Tensor::I32(x) => v.extend(x.iter().map(|&e| e as f32)),
    }
    v
}

/// An array of `shape` from row-major f32 `data`, of the kind of `like` (i32 values travel
/// exactly as f32 below 2^24).
fn from_f32(shape: &[usize], data: Vec<f32>, int: bool) -> Result<Tensor, String> {
    let x = ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|e| e.to_string())?;
    Ok(if int {
        let t = Tensor::I32(x.mapv(|v| v as i32));
        k::recycle(Tensor::F32(x));
        t
    } else {
        Tensor::F32(x)
    })
}

/// The elements of an owned array in row-major order, in its own buffer when it is in standard
/// layout (no copy), else copied.
fn into_flat(x: ArrayD<f32>) -> Vec<f32> {
    if !x.is_standard_layout() {
        return flat_f32(&Tensor::F32(x));
    }
    let len = x.len();
    let (mut v, offset) = x.into_raw_vec_and_offset();
    let start = offset.unwrap_or(0);
    if start > 0 {
        v.drain(..start);
    }
    v.truncate(len);
    v
}

/// True for an i32 tensor.
fn is_int(t: &Tensor) -> bool {
    matches!(t, Tensor::I32(_))
}

fn map_tensor(
    t: &Tensor,
    f: impl Fn(&ArrayD<f32>) -> ArrayD<f32>,
    g: impl Fn(&ArrayD<i32>) -> ArrayD<i32>,
) -> Tensor {
    match t {
        Tensor::F32(x) => Tensor::F32(f(x)),
        Tensor::I32(x) => Tensor::I32(g(x)),
    }
}

/// An error unless `dim` is a dim of `shape`.
fn check_dim(shape: &[usize], dim: usize) -> Result<(), String> {
    if dim < shape.len() {
        Ok(())
    } else {
        Err(format!("dim {dim} out of range for shape {shape:?}"))
    }
}

/// An error unless dim `dim` of `shape` splits into `k` equal blocks.
fn check_split(shape: &[usize], dim: usize, k: usize) -> Result<(), String> {
    check_dim(shape, dim)?;
    let n = shape[dim];
    if k == 0 || !n.is_multiple_of(k) {
        return Err(format!("dim {dim} of size {n} does not split into {k}"));
    }
    Ok(())
}

/// Pushes block `r` of `k` equal blocks along `dim` of the row-major `src` of `shape`.
fn piece(src: &[f32], shape: &[usize], dim: usize, k: usize, r: usize, out: &mut Vec<f32>) {
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let size = shape[dim];
    let p = size / k;
    for o in 0..outer {
        out.extend_from_slice(&src[(o * size + r * p) * inner..(o * size + (r + 1) * p) * inner]);
    }
}

/// The concatenation along `dim` of row-major blocks, each of shape `shape`.
fn join(pieces: &[&[f32]], shape: &[usize], dim: usize) -> Vec<f32> {
    let outer: usize = shape[..dim].iter().product();
    let block: usize = shape[dim..].iter().product();
    let mut out = k::take_vec::<f32>(block * outer * pieces.len());
    for o in 0..outer {
        for p in pieces {
            out.extend_from_slice(&p[o * block..(o + 1) * block]);
        }
    }
    out
}
