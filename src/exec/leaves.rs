//! Where a run's params and inputs come from: arrays given by name (from `.npz`) or generated
//! from a seed; and how one rank takes its block of a global leaf.

use super::init::{generate_slice, Leaf};
use super::{ExecError, Tensor};
use crate::ir::{Graph, Op, StateInit, ValueId};
use crate::mesh::Mesh;
use crate::sharding::Placement;
use ndarray::{ArrayD, Slice};
use std::collections::BTreeMap;
use std::ops::Range;

/// The global params and inputs of a run.
#[derive(Clone, Debug)]
pub enum LeafSource {
    /// Arrays by leaf name (all params and inputs of the program).
    Arrays(BTreeMap<String, Tensor>),
    /// Generated from the seed: values depend only on name, shape, dtype and seed.
    Seed(u64),
    /// Params and optimizer state from a checkpoint (each rank reads its own blocks), inputs
    /// from `rest`.
    Checkpoint {
        /// The opened checkpoint.
        reader: Box<super::checkpoint::load::Reader>,
        /// Where the inputs come from.
        rest: Box<LeafSource>,
    },
}

/// The range of integer values an i32 leaf may take: the vocabulary of the embeddings and the
/// classes of the losses it feeds (the smallest, if several); 1000 when it feeds neither.
pub fn int_range(g: &Graph, v: ValueId) -> u64 {
    g.users(v)
        .iter()
        .filter_map(|&u| {
            let n = g.node(u);
            match n.op {
                Op::Embedding if n.inputs[0] == v => Some(g.ty(n.inputs[1]).shape[0]),
                Op::CrossEntropy if n.inputs[1] == v => g.ty(n.inputs[0]).shape.last().copied(),
                _ => None,
            }
        })
        .min()
        .unwrap_or(1000)
}

fn leaf_kind(op: &Op) -> Leaf {
    match op {
        Op::Param { .. } => Leaf::Param,
        Op::State { .. } => Leaf::State,
        _ => Leaf::Input,
    }
}

/// All leaves of `g` (params, inputs, optimizer state) as global tensors, by name.
pub fn global_leaves(
    g: &Graph,
    source: &LeafSource,
) -> Result<BTreeMap<String, Tensor>, ExecError> {
    match source {
        LeafSource::Arrays(a) => Ok(a.clone()),
        LeafSource::Seed(seed) => Ok(seeded(g, *seed, |_| true)),
        LeafSource::Checkpoint { reader, rest } => {
            let mut all = global_leaves(g, rest)?;
            for (_, n) in g.nodes() {
                if let (Some(name), Op::Param { .. } | Op::State { .. }) = (n.op.leaf_name(), &n.op)
                {
                    let whole: Vec<Range<u64>> =
                        g.ty(n.outputs[0]).shape.iter().map(|&d| 0..d).collect();
                    all.insert(name.to_string(), reader.read_block(name, &whole)?);
                }
            }
            Ok(all)
        }
    }
}

/// The inputs of `g` generated from `seed`, by name.
pub fn seeded_inputs(g: &Graph, seed: u64) -> BTreeMap<String, Tensor> {
    seeded(g, seed, |op| matches!(op, Op::Input { .. }))
}

/// The leaves of `g` whose op `keep` accepts, generated from `seed`, by name.
fn seeded(g: &Graph, seed: u64, keep: impl Fn(&Op) -> bool) -> BTreeMap<String, Tensor> {
    g.nodes()
        .filter(|(_, n)| keep(&n.op))
        .filter_map(|(_, n)| {
            let name = n.op.leaf_name()?;
            let v = n.outputs[0];
            let whole: Vec<Range<u64>> = g.ty(v).shape.iter().map(|&d| 0..d).collect();
            let t = seeded_block(g, v, name, seed, &whole).ok()?;
            Some((name.to_string(), t))
        })
        .collect()
}

/// The block `ranges` of leaf `name` (value `v` of `g`) generated from `seed`: a state that
/// starts as a param is generated as that param (its dtype's values, held in the state's f32),
/// a filled state is its constant.
fn seeded_block(
    g: &Graph,
    v: ValueId,
    name: &str,
    seed: u64,
    ranges: &[Range<u64>],
) -> Result<Tensor, ExecError> {
    let op = &g.node(g.value(v).node).op;
    match op {
        Op::State {
            init: StateInit::Param(p),
            ..
        } => {
            let pv = param_value(g, p)?;
            generate_slice(p, g.ty(pv), seed, Leaf::Param, 0, ranges)
        }
        Op::State {
            init: StateInit::Fill(x),
            ..
        } => Ok(filled(ranges, *x)),
        _ => generate_slice(name, g.ty(v), seed, leaf_kind(op), int_range(g, v), ranges),
    }
}

/// A float block of the lengths of `ranges`, every element `x`.
fn filled(ranges: &[Range<u64>], x: f64) -> Tensor {
    let shape: Vec<usize> = ranges.iter().map(|r| (r.end - r.start) as usize).collect();
    Tensor::F32(ArrayD::from_elem(shape, x as f32))
}

/// The value of the param named `p`.
fn param_value(g: &Graph, p: &str) -> Result<ValueId, ExecError> {
    g.params()
        .find(|(n, _)| *n == p)
        .map(|(_, v)| v)
        .ok_or_else(|| ExecError::MissingParam(p.to_string()))
}

/// Sets every state of `g` that starts as a param (a master weight) to that param's value in
/// `leaves` (after the params were given as arrays).
pub fn states_from_params(g: &Graph, leaves: &mut BTreeMap<String, Tensor>) {
    for (_, n) in g.nodes() {
        if let Op::State {
            name,
            init: StateInit::Param(p),
        } = &n.op
        {
            if let Some(t) = leaves.get(p).cloned() {
                leaves.insert(name.clone(), t);
            }
        }
    }
}

/// Per dim, the range of global indices that device `coords` holds under `pl`.
pub fn block_ranges(shape: &[u64], pl: &Placement, coords: &[u64], mesh: &Mesh) -> Vec<Range<u64>> {
    shape
        .iter()
        .enumerate()
        .map(|(d, &n)| {
            let (b, k) = pl.block(d, coords, mesh);
            let len = n / k;
            b * len..(b + 1) * len
        })
        .collect()
}

/// The block of the global leaf `name` (global type of `global`) that `coords` holds under `pl`.
pub fn local_leaf(
    g: &Graph,
    global: ValueId,
    name: &str,
    pl: &Placement,
    coords: &[u64],
    mesh: &Mesh,
    source: &LeafSource,
) -> Result<Tensor, ExecError> {
    let ty = g.ty(global);
    let ranges = block_ranges(&ty.shape, pl, coords, mesh);
    let op = &g.node(g.value(global).node).op;
    match source {
        LeafSource::Checkpoint { reader, .. }
            if matches!(op, Op::Param { .. } | Op::State { .. }) =>
        {
            Ok(reader.read_block(name, &ranges)?)
        }
        LeafSource::Checkpoint { rest, .. } => local_leaf(g, global, name, pl, coords, mesh, rest),
        LeafSource::Seed(seed) => seeded_block(g, global, name, *seed, &ranges),
        LeafSource::Arrays(a) => {
            let t = a
                .get(name)
                .ok_or_else(|| ExecError::MissingParam(name.to_string()))?;
            Ok(match t {
                Tensor::F32(x) => Tensor::F32(slice_block(x, &ranges)),
                Tensor::I32(x) => Tensor::I32(slice_block(x, &ranges)),
            })
        }
    }
}

/// An owned copy of the block `ranges` of `x`.
pub fn slice_block<T: Clone>(x: &ArrayD<T>, ranges: &[Range<u64>]) -> ArrayD<T> {
    let mut v = x.view();
    for (d, r) in ranges.iter().enumerate() {
        v.slice_axis_inplace(
            ndarray::Axis(d),
            Slice::from(r.start as usize..r.end as usize),
        );
    }
    v.to_owned()
}
