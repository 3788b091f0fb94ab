//! Reverse-mode differentiation of the global program. The backward pass is appended to the
//! forward graph as ordinary ops (one VJP per op, `vjp.rs`), so propagation and partitioning see
//! forward and backward as one program and pick the backward's collectives with the same cost
//! model: the duals of the forward's collectives (Megatron's f/g) are not written anywhere, they
//! follow from the placements.
//!
//! The backward nodes of a forward node in block instance `R` go into the backward instance
//! `R/backward`, whose body id is shared by the backward instances of all instances of `R`'s
//! body; nodes are emitted in reverse forward order, so each backward instance is contiguous and
//! propagation's memo handles repeated layers once, as it does the forward.

mod builder;
pub mod optimizer;
pub mod scale;
mod vjp;

use crate::ir::{Graph, IdVec, NodeId, Output, Training, ValueId};
use crate::span::Span;
use builder::Builder;

/// Why a program cannot be differentiated.
#[derive(Debug, Clone, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum AutodiffError {
    /// The loss depends on no trainable param.
    #[error("the loss depends on no trainable param")]
    #[diagnostic(
        code(tpc::nothing_to_train),
        help("the loss must be computed from at least one float param that is not `frozen`")
    )]
    NothingToTrain {
        /// The `train` statement.
        #[label(primary, "nothing to train")]
        span: Span,
    },
    /// A training feature that is not there yet.
    #[error("{detail}")]
    #[diagnostic(code(tpc::unsupported))]
    Unsupported {
        /// What is not supported.
        detail: String,
        /// Where it was asked for.
        #[label(primary, "here")]
        span: Span,
    },
    /// A backward op could not be built: a bug in tpc.
    #[error("autodiff of {op} at {}:{}: {detail}", span.line, span.col)]
    #[diagnostic(code(tpc::internal))]
    Internal {
        /// The forward op.
        op: String,
        /// Its position.
        span: Span,
        /// What failed.
        detail: String,
    },
}

impl AutodiffError {
    /// True for compiler bugs.
    pub fn is_internal(&self) -> bool {
        matches!(self, AutodiffError::Internal { .. })
    }
}

/// The training step's gradient program: the forward graph with the backward appended.
#[derive(Clone, Debug)]
pub struct Gradients {
    /// Forward and backward; its outputs are the forward's, the loss (as `loss` unless it is
    /// already an output) and one `grad(NAME)` per trained param.
    pub graph: Graph,
    /// The loss value.
    pub loss: ValueId,
    /// The name of the output holding the loss.
    pub loss_output: String,
    /// Per trained param, in declaration order: its name, its leaf and its gradient.
    pub grads: Vec<(String, ValueId, ValueId)>,
    /// Params neither frozen nor reached by the loss (a warning, not an error).
    pub unused: Vec<String>,
    /// With the update: each carried leaf (params, then optimizer state) and the output
    /// holding its next value.
    pub carried: Vec<(String, String)>,
}

/// What a training step's program returns besides the loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepOutputs {
    /// Each trained param's gradient, as `grad(NAME)`.
    pub gradients: bool,
    /// The optimizer's update: each carried leaf's next value, as `next(NAME)`.
    pub update: bool,
}

/// The output name of a param's gradient.
pub fn grad_name(param: &str) -> String {
    format!("grad({param})")
}

/// The param whose gradient output is named `output` (`grad(w)` -> `w`).
pub fn param_of_grad(output: &str) -> Option<&str> {
    output.strip_prefix("grad(")?.strip_suffix(')')
}

/// The training step of `g`: its forward, backward and, as `outputs` asks, the gradients and
/// the optimizer's update.
pub fn training_step(
    g: &Graph,
    t: &Training,
    outputs: StepOutputs,
) -> Result<Gradients, AutodiffError> {
    let trained: Vec<(String, ValueId)> = g
        .params()
        .filter(|(name, v)| g.ty(*v).dtype.is_float() && !t.frozen.contains(*name))
        .map(|(name, v)| (name.to_string(), v))
        .collect();
    let needed = needed(g, &trained, t.loss);
    if !trained.iter().any(|(_, v)| needed[*v]) {
        return Err(AutodiffError::NothingToTrain { span: t.span });
    }
    let mut b = Builder::new(g.clone());
    let mut cot: IdVec<ValueId, Option<ValueId>> = IdVec::filled(g.num_values(), None);
    let loss_node = g.node(g.value(t.loss).node);
    b.at(loss_node.region, loss_node.span, &loss_node.op);
    let ty = g.ty(t.loss);
    let (seed, scale) = scale::seed(&mut b, t.loss_scale, ty)?;
    cot[t.loss] = Some(seed);
    for id in (0..g.num_nodes()).rev().map(NodeId::new) {
        let node = g.node(id);
        let outs: Vec<Option<ValueId>> = node.outputs.iter().map(|&v| cot[v]).collect();
        if node.op.is_leaf() || outs.iter().all(Option::is_none) {
            continue;
        }
        let wanted: Vec<bool> = node.inputs.iter().map(|&v| needed[v]).collect();
        if !wanted.contains(&true) {
            continue;
        }
        b.at(node.region, node.span, &node.op);
        let contribs = vjp::vjp(&mut b, g, id, &outs, &wanted)?;
        for (&x, c) in node.inputs.iter().zip(contribs) {
            if let Some(c) = c.filter(|_| needed[x]) {
                cot[x] = Some(match cot[x] {
                    Some(acc) => b.add(acc, c)?,
                    None => c,
                });
            }
        }
    }
    finish(b, g, t, trained, &cot, scale, outputs)
}

/// Adds the update and the outputs (loss, gradients, next values) and lists the unused params.
fn finish(
    mut b: Builder,
    g: &Graph,
    t: &Training,
    trained: Vec<(String, ValueId)>,
    cot: &IdVec<ValueId, Option<ValueId>>,
    scale: Option<scale::Scale>,
    outputs: StepOutputs,
) -> Result<Gradients, AutodiffError> {
    let mut with_grads: Vec<(String, ValueId, ValueId)> = trained
        .iter()
        .filter_map(|(n, v)| Some((n.clone(), *v, cot[*v]?)))
        .collect();
    if let Some(s) = &scale {
        b.at_update(t.span);
        scale::unscale(&mut b, s, &mut with_grads)?;
    }
    for (n, _, grad) in &with_grads {
        // Names the gradient for provenance (`... over dp for ... (grad(w1))`).
        if b.graph_mut().value(*grad).name.is_none() {
            b.graph_mut().set_value_name(*grad, grad_name(n));
        }
    }
    let mut carried = Vec::new();
    if outputs.update {
        b.at_update(t.span);
        let flag = match &scale {
            Some(s) => scale::flag(&mut b, s, &with_grads)?,
            None => None,
        };
        let mut next = optimizer::update(&mut b, &t.optimizer, &with_grads, flag)?;
        if let (Some(s), Some(flag)) = (&scale, flag) {
            next.extend(scale::next_scale(&mut b, s, flag)?);
            b.graph_mut().add_output(Output {
                name: unique_name(g, scale::OVERFLOW),
                value: flag,
                annotation: None,
                span: t.span,
                like: None,
            });
        }
        for (leaf, value, next) in next {
            let name = optimizer::next_name(&leaf);
            // The next value is laid out as its leaf, so the loop feeds it back without moving.
            b.graph_mut().add_output(Output {
                name: name.clone(),
                value: next,
                annotation: None,
                span: t.span,
                like: Some(value),
            });
            carried.push((leaf, name));
        }
    }
    let mut graph = b.into_graph();
    let loss_output = match g.outputs().iter().find(|o| o.value == t.loss) {
        Some(o) => o.name.clone(),
        None => {
            let name = unique_name(g, "loss");
            graph.add_output(Output {
                name: name.clone(),
                value: t.loss,
                annotation: None,
                span: t.span,
                like: None,
            });
            name
        }
    };
    let mut grads = Vec::new();
    let mut unused = Vec::new();
    for (name, v) in trained {
        let grad = with_grads
            .iter()
            .find(|(_, p, _)| *p == v)
            .map(|(_, _, d)| *d);
        match grad {
            Some(d) if outputs.gradients => {
                // A gradient is laid out as its param is: a split weight's gradient stays split.
                graph.add_output(Output {
                    name: grad_name(&name),
                    value: d,
                    annotation: None,
                    span: g.node(g.value(v).node).span,
                    like: Some(v),
                });
                grads.push((name, v, d));
            }
            Some(d) => grads.push((name, v, d)),
            None => unused.push(name),
        }
    }
    Ok(Gradients {
        graph,
        loss: t.loss,
        loss_output,
        grads,
        unused,
        carried,
    })
}

/// `base`, or `base_2`, `base_3`, ... : the first name no output of `g` has.
fn unique_name(g: &Graph, base: &str) -> String {
    let taken = |n: &str| g.outputs().iter().any(|o| o.name == n);
    let mut name = base.to_string();
    let mut k = 2;
    while taken(&name) {
        name = format!("{base}_{k}");
        k += 1;
    }
    name
}

/// Values on a path from a trained param to the loss, of a float type: the ones that get a
/// cotangent.
fn needed(g: &Graph, trained: &[(String, ValueId)], loss: ValueId) -> IdVec<ValueId, bool> {
    let n = g.num_values();
    let mut active = IdVec::filled(n, false);
    for (_, v) in trained {
        active[*v] = true;
    }
    for (_, node) in g.nodes() {
        if node.inputs.iter().any(|&x| active[x]) {
            for &y in &node.outputs {
                active[y] = g.ty(y).dtype.is_float();
            }
        }
    }
    let mut reaches = IdVec::filled(n, false);
    reaches[loss] = true;
    for id in (0..g.num_nodes()).rev().map(NodeId::new) {
        let node = g.node(id);
        if node.outputs.iter().any(|&y| reaches[y]) {
            for &x in &node.inputs {
                reaches[x] = true;
            }
        }
    }
    active
        .values()
        .zip(reaches.values())
        .map(|(&a, &r)| a && r)
        .collect()
}
