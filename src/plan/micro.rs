//! Microbatches: `--microbatches M` splits dim 0 of every input over a temporal mesh axis `mb`
//! that adds no devices. Propagation and partitioning then give the program of one microbatch;
//! its only collectives over `mb` are sums of partial gradients and losses, which a device runs
//! as local accumulations after each microbatch. The part of the program after them (the data
//! parallel reductions, the update) runs once per step.

use crate::ir::{Annotation, Graph, Local, NodeId, Op, Phase, ReduceOp, Spec, ValueId};
use crate::mesh::{Mesh, MeshError, MICROBATCH_AXIS};
use crate::span::Span;

/// A program that cannot be split into microbatches.
#[derive(Debug, Clone, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum MicroError {
    /// The mesh already has an axis named `mb`.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Mesh(#[from] MeshError),
    /// The program uses the microbatch axis's name for a mesh axis of its own.
    #[error("--microbatches adds a mesh axis `{MICROBATCH_AXIS}`, and the program declares one")]
    #[diagnostic(
        code(tpc::microbatches),
        help("rename the program's mesh axis `{MICROBATCH_AXIS}` to use --microbatches")
    )]
    Reserved,
    /// `--microbatches` on a program that is not a training step.
    #[error("--microbatches {count} applies to training steps; this program has no `train` line (or --forward-only left it out)")]
    #[diagnostic(
        code(tpc::microbatches),
        help("microbatches accumulate gradients; run a forward program without --microbatches")
    )]
    NotTraining {
        /// Microbatches asked for.
        count: u64,
    },
    /// A program without inputs: there is no batch to split.
    #[error("--microbatches {count}: the program has no input whose batch could be split")]
    #[diagnostic(code(tpc::microbatches))]
    NoInputs {
        /// Microbatches asked for.
        count: u64,
    },
    /// An input whose dim 0 does not split into the microbatches.
    #[error("--microbatches {count}{default} does not divide the batch: input `{input}` has {size} rows on dim 0{per}")]
    #[diagnostic(
        code(tpc::microbatches),
        help("choose a number of microbatches that divides every input's dim 0 (the batch)")
    )]
    Indivisible {
        /// The input.
        input: String,
        /// Its dim 0.
        size: u64,
        /// Rows per block of the axes already splitting it, as a phrase (or empty).
        per: String,
        /// Microbatches asked for.
        count: u64,
        /// ` (the default: ...)` when not given, else empty.
        default: String,
        /// The input's declaration.
        #[label("dim 0 is split into {count} microbatches")]
        span: Span,
    },
    /// An op that would combine values of different microbatches.
    #[error("--microbatches: {what}")]
    #[diagnostic(
        code(tpc::microbatches),
        help(
            "each microbatch runs alone and only sums (the loss, gradients) are accumulated over \
             them; an op that mixes rows of the batch, or an output that is not the loss, a \
             gradient or an updated value, cannot be microbatched"
        )
    )]
    Mixes {
        /// What combines microbatches.
        what: String,
        /// Where.
        #[label("here")]
        span: Span,
    },
}

impl MicroError {
    /// The error for microbatches the user did not ask for: the pipeline's default.
    pub fn defaulted(self) -> MicroError {
        match self {
            MicroError::Indivisible {
                input,
                size,
                per,
                count,
                span,
                ..
            } => MicroError::Indivisible {
                input,
                size,
                per,
                count,
                default: " (the default: one per pipeline stage)".into(),
                span,
            },
            e => e,
        }
    }
}

/// Where each node of a microbatched program runs.
#[derive(Clone, Debug, PartialEq)]
pub struct Microbatches {
    /// The temporal axis.
    pub axis: usize,
    /// Number of microbatches.
    pub count: u64,
    /// Per node: runs once per step, after every microbatch (else once per microbatch).
    pub step: Vec<bool>,
    /// Per node: sums its operand over the microbatches (a temporal all-reduce).
    pub accumulate: Vec<bool>,
    /// Per node run per microbatch: made from params and state alone and read by the step's
    /// part, so that part runs it again (e.g. a regulariser's gradient added to the sums).
    pub again: Vec<bool>,
}

/// `g` with dim 0 of every input also split over the temporal axis (major to the axes of
/// `mesh` already splitting it, as the temporal axis is the mesh's first: microbatch m is
/// rows m·B/M .. (m+1)·B/M, split among the other axes); errors when `g` cannot be microbatched.
pub fn annotate(g: &Graph, mesh: &Mesh, count: u64) -> Result<Graph, MicroError> {
    if !g.is_training_step() {
        return Err(MicroError::NotTraining { count });
    }
    if g.mesh_axes.iter().any(|a| a == MICROBATCH_AXIS) {
        return Err(MicroError::Reserved);
    }
    let inputs: Vec<(String, ValueId)> = g.inputs().map(|(n, v)| (n.to_string(), v)).collect();
    if inputs.is_empty() {
        return Err(MicroError::NoInputs { count });
    }
    let mut out = g.clone();
    out.mesh_axes.insert(0, MICROBATCH_AXIS.to_string());
    for (name, v) in inputs {
        let a = input_annotation(g, mesh, &name, v, count)?;
        out.annotate(v, a);
    }
    Ok(out)
}

/// The annotation of input `v` with `mb` first on dim 0, checked to divide.
fn input_annotation(
    g: &Graph,
    mesh: &Mesh,
    name: &str,
    v: ValueId,
    count: u64,
) -> Result<Annotation, MicroError> {
    let ty = g.ty(v);
    let node_span = g.node(g.value(v).node).span;
    let mut a = g.annotation(v).cloned().unwrap_or(Annotation {
        spec: Spec::replicated(ty.rank()),
        span: node_span,
    });
    let Some(&size) = ty.shape.first() else {
        return Err(MicroError::Mixes {
            what: format!("input `{name}` is a scalar: it has no batch dim to split"),
            span: node_span,
        });
    };
    let split: u64 = a.spec.dims[0]
        .iter()
        .map(|ax| mesh.axis_index(ax).map_or(1, |i| mesh.axis_size(i)))
        .product();
    if size % (split * count) != 0 {
        let per = match split {
            1 => String::new(),
            _ => format!(
                ", {} per block of {}",
                size / split.max(1),
                a.spec.dims[0].join("×")
            ),
        };
        return Err(MicroError::Indivisible {
            input: name.to_string(),
            size,
            per,
            count,
            default: String::new(),
            span: node_span,
        });
    }
    a.spec.dims[0].insert(0, MICROBATCH_AXIS.to_string());
    Ok(a)
}

/// Where each node of `g` (partitioned over `mesh`) runs, or `None` without microbatches.
pub fn split(g: &Graph<Local>, mesh: &Mesh) -> Result<Option<Microbatches>, MicroError> {
    match mesh.temporal() {
        Some(axis) => classify(g, Some((axis, mesh))).map(Some),
        None => Ok(None),
    }
}

/// Where each node of `g` runs: once per microbatch or once per step (after the accumulations
/// over the temporal axis `axis` of `mesh`, if any; without one, a single microbatch).
pub fn classify(
    g: &Graph<Local>,
    axis: Option<(usize, &Mesh)>,
) -> Result<Microbatches, MicroError> {
    let name = axis.map_or("", |(a, mesh)| mesh.axis_name(a));
    let mut step = vec![false; g.num_nodes()];
    let mut accumulate = vec![false; g.num_nodes()];
    let mut per_mb = vec![false; g.num_values()];
    let mut invariant = vec![false; g.num_nodes()];
    for (id, n) in g.nodes() {
        let temporal = axis.is_some() && n.op.mesh_axes().iter().any(|(a, _)| *a == name);
        let reads_step = n.inputs.iter().any(|v| step[g.value(*v).node.index()]);
        let i = id.index();
        let local = matches!(n.op, Op::ShardSlice { .. } | Op::KeepOnFirst { .. });
        if temporal && !local {
            check_accumulation(g, id)?;
            accumulate[i] = true;
            step[i] = true;
        } else if !n.op.is_leaf() {
            let phase = g.region(n.region).phase;
            let reads_mb = n.inputs.iter().any(|v| per_mb[v.index()]);
            step[i] = match axis {
                // Microbatched: what reads a microbatch's value runs per microbatch (its
                // result is accumulated later), what reads the sums runs once.
                Some(_) => reads_step || (!reads_mb && phase == Phase::Update),
                // One microbatch: the update, and a forward-region node reading the
                // backward's result (an output's reshard of a gradient), follow the backward.
                None => reads_step || phase == Phase::Update || after_backward(g, n),
            };
            if temporal && step[i] {
                return Err(MicroError::Mixes {
                    what: format!("{} over the microbatches runs once per step", n.op.name()),
                    span: n.span,
                });
            }
        }
        if axis.is_some() && step[i] && !accumulate[i] {
            if let Some(&v) = n.inputs.iter().find(|v| per_mb[v.index()]) {
                return Err(mixes(g, id, v));
            }
        }
        // A value made from params and state alone is the same in every microbatch: the
        // step's part may read it too (it computes it again, see `again`).
        let varies = matches!(n.op, Op::Input { .. })
            || (!step[i] && !n.op.is_leaf() && n.inputs.iter().any(|v| per_mb[v.index()]));
        for &o in &n.outputs {
            per_mb[o.index()] = varies;
        }
        invariant[i] = !n.op.is_leaf() && !step[i] && !varies;
    }
    let again = again(g, &step, &invariant);
    if axis.is_some() {
        check_outputs(g, &per_mb)?;
    }
    Ok(Microbatches {
        axis: axis.map_or(0, |(a, _)| a),
        count: axis.map_or(1, |(a, mesh)| mesh.axis_size(a)),
        step,
        accumulate,
        again,
    })
}

/// The microbatch-invariant nodes the once-per-step nodes read, directly or through others,
/// and those making a program output (the step's outputs are the once-per-step part's).
fn again(g: &Graph<Local>, step: &[bool], invariant: &[bool]) -> Vec<bool> {
    let mut again = vec![false; g.num_nodes()];
    let mut output = vec![false; g.num_values()];
    for o in g.outputs() {
        output[o.value.index()] = true;
    }
    for i in (0..g.num_nodes()).rev() {
        if !invariant[i] {
            continue;
        }
        let n = g.node(NodeId::new(i));
        again[i] = n.outputs.iter().any(|&o| {
            output[o.index()]
                || g.users(o)
                    .iter()
                    .any(|u| (step[u.index()] && !invariant[u.index()]) || again[u.index()])
        });
    }
    again
}

/// A forward-region node reading a value the backward made.
fn after_backward(g: &Graph<Local>, n: &crate::ir::Node<Local>) -> bool {
    g.region(n.region).phase == Phase::Forward
        && n.inputs
            .iter()
            .any(|v| g.region(g.node(g.value(*v).node).region).phase == Phase::Backward)
}

/// A temporal collective must be a one-operand sum: anything else combines microbatches.
fn check_accumulation(g: &Graph<Local>, id: NodeId<Local>) -> Result<(), MicroError> {
    let n = g.node(id);
    match &n.op {
        Op::AllReduce {
            reduce: ReduceOp::Sum,
            ..
        } if n.inputs.len() == 1 => Ok(()),
        op => Err(MicroError::Mixes {
            what: format!(
                "{} of {} over the microbatches would combine them",
                op.name(),
                describe(g, n.inputs.first().copied())
            ),
            span: n.span,
        }),
    }
}

fn mixes(g: &Graph<Local>, id: NodeId<Local>, v: ValueId<Local>) -> MicroError {
    let n = g.node(id);
    MicroError::Mixes {
        what: format!(
            "{} runs once per step but reads {}, a value of one microbatch",
            n.op.name(),
            describe(g, Some(v))
        ),
        span: n.span,
    }
}

/// Every output is a leaf or made once per step (accumulated).
fn check_outputs(g: &Graph<Local>, per_mb: &[bool]) -> Result<(), MicroError> {
    match g.outputs().iter().find(|o| per_mb[o.value.index()]) {
        Some(o) => Err(MicroError::Mixes {
            what: format!("output `{}` differs per microbatch", o.name),
            span: o.span,
        }),
        None => Ok(()),
    }
}

fn describe(g: &Graph<Local>, v: Option<ValueId<Local>>) -> String {
    match v {
        Some(v) => match &g.value(v).name {
            Some(name) => format!("`{name}` ({v})"),
            None => format!("{v}"),
        },
        None => "nothing".into(),
    }
}
