//! The one executor loop, shared by the reference interpreter (global ops) and every SPMD rank
//! (which also runs the collectives): nodes run in storage (topological) order, operands read
//! for the last time are handed over so the op can reuse their buffers, dead values go back to
//! the buffer pool, and every result is checked against the graph's declared type.
//!
//! A float result declared bf16 or f16 is rounded to that type here, once, after its kernel: the
//! kernels compute and accumulate in f32 on operands that are already 16-bit values, so every op
//! is "f32 accumulate, round the output" on both the reference and the ranks. A collective of a
//! 16-bit value therefore sums in f32 and rounds once at the end (NCCL rounds at every hop of its
//! ring; tpc's single rounding is at least as accurate, and the fixed ring order keeps it
//! deterministic). f32 and i32 results are untouched.

use super::kernels::{recycle, round_bf16, round_f16};
use super::{ExecError, Tensor};
use crate::ir::{Dtype, Global, Graph, IdVec, Node, NodeId, Space, ValueId};
use crate::plan::liveness::Liveness;
use std::borrow::Cow;

/// Evaluates the non-leaf ops of a graph.
pub(crate) trait Eval<S: Space = Global> {
    /// What a failed op reports.
    type Error: From<ExecError>;
    /// The results of `node` on `args` (owned where the operand dies here).
    fn eval(
        &mut self,
        node: &Node<S>,
        args: Vec<Cow<'_, Tensor>>,
    ) -> Result<Vec<Tensor>, Self::Error>;

    /// Takes the operands of an accumulation `node` (a partial run's [`Part::Absorb`]); only
    /// evaluators of microbatched programs accept it.
    fn absorb(&mut self, node: &Node<S>, _args: Vec<Cow<'_, Tensor>>) -> Result<(), Self::Error> {
        Err(ExecError::Internal {
            node: here(node),
            detail: "an accumulation outside a microbatched run".into(),
        }
        .into())
    }
}

/// What one run of a graph gives.
pub(crate) struct Outcome {
    /// The program outputs, in the graph's output order.
    pub outputs: Vec<Tensor>,
    /// The peak of live non-leaf bytes.
    pub peak_bytes: u64,
}

/// Runs every non-leaf node of `g` with `ev`. `leaves[v]` holds each leaf value (borrowed, never
/// handed over). A failing node is returned with its error.
pub(crate) fn run<S: Space, E: Eval<S>>(
    g: &Graph<S>,
    live: &Liveness<S>,
    leaves: &IdVec<ValueId<S>, Option<&Tensor>>,
    ev: &mut E,
) -> Result<Outcome, (NodeId<S>, E::Error)> {
    let mut slots = empty_slots(g);
    let peak = run_nodes(g, live, leaves, &mut slots, ev, &|_| Part::Run)?;
    let outputs = outputs(g, leaves, &mut slots)?;
    Ok(Outcome {
        outputs,
        peak_bytes: peak,
    })
}

/// What a partial run does with a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// Runs it.
    Run,
    /// Leaves it for another part.
    Skip,
    /// Hands its operands to [`Eval::absorb`] (an accumulation); its results are not made.
    Absorb,
}

/// A slot table with every value absent.
pub(crate) fn empty_slots<S: Space>(g: &Graph<S>) -> IdVec<ValueId<S>, Option<Tensor>> {
    (0..g.num_values()).map(|_| None).collect()
}

/// Runs the non-leaf nodes `part` selects, in storage order, on `slots` (values made by other
/// parts are expected there); returns the peak of live bytes it saw. A value read for the last
/// time by a node this run skips stays in its slot.
pub(crate) fn run_nodes<S: Space, E: Eval<S>>(
    g: &Graph<S>,
    live: &Liveness<S>,
    leaves: &IdVec<ValueId<S>, Option<&Tensor>>,
    slots: &mut IdVec<ValueId<S>, Option<Tensor>>,
    ev: &mut E,
    part: &dyn Fn(NodeId<S>) -> Part,
) -> Result<u64, (NodeId<S>, E::Error)> {
    let mut live_bytes: u64 = slots
        .iter()
        .filter_map(|(_, t)| t.as_ref())
        .map(bytes)
        .sum();
    let mut peak = live_bytes;
    for (id, node) in g.nodes() {
        let what = part(id);
        if node.op.is_leaf() || what == Part::Skip {
            continue;
        }
        let i = id.index();
        let args = operands(node, live, i, leaves, slots).map_err(|e| (id, e.into()))?;
        let handed: u64 = args
            .iter()
            .filter(|a| matches!(a, Cow::Owned(_)))
            .map(|a| bytes(a))
            .sum();
        if what == Part::Absorb {
            ev.absorb(node, args).map_err(|e| (id, e))?;
        } else {
            let mut results = ev.eval(node, args).map_err(|e| (id, e))?;
            check_results(g, id, node, &results).map_err(|e| (id, e.into()))?;
            round_to_declared(g, node, &mut results);
            for (&v, t) in node.outputs.iter().zip(results) {
                live_bytes += bytes(&t);
                slots[v] = Some(t);
            }
        }
        peak = peak.max(live_bytes);
        live_bytes -= handed;
        for &v in node.inputs.iter().chain(&node.outputs) {
            if live.dies_at(v, i) {
                if let Some(t) = slots[v].take() {
                    live_bytes -= bytes(&t);
                    // The buffer serves a later kernel's output.
                    recycle(t);
                }
            }
        }
    }
    Ok(peak)
}

/// The operands of node `i`: owned when the value dies here, is read once by the node and is
/// not a leaf (the op may reuse its buffer), else borrowed.
fn operands<'s, S: Space>(
    node: &Node<S>,
    live: &Liveness<S>,
    i: usize,
    leaves: &IdVec<ValueId<S>, Option<&'s Tensor>>,
    slots: &'s mut IdVec<ValueId<S>, Option<Tensor>>,
) -> Result<Vec<Cow<'s, Tensor>>, ExecError> {
    let once = |v: ValueId<S>| node.inputs.iter().filter(|&&w| w == v).count() == 1;
    let mut owned: Vec<Option<Tensor>> = node
        .inputs
        .iter()
        .map(|&v| {
            let hand = live.dies_at(v, i) && leaves[v].is_none() && once(v);
            hand.then(|| slots[v].take()).flatten()
        })
        .collect();
    let slots: &'s IdVec<ValueId<S>, Option<Tensor>> = slots;
    node.inputs
        .iter()
        .zip(owned.iter_mut())
        .map(|(v, h)| match h.take() {
            Some(t) => Ok(Cow::Owned(t)),
            None => leaves[*v]
                .or(slots[*v].as_ref())
                .map(Cow::Borrowed)
                .ok_or_else(|| ExecError::Internal {
                    node: here(node),
                    detail: format!("operand {v} is not available"),
                }),
        })
        .collect()
}

/// An error unless `node` gave one result per output, each of its declared type.
fn check_results<S: Space>(
    g: &Graph<S>,
    id: NodeId<S>,
    node: &Node<S>,
    results: &[Tensor],
) -> Result<(), ExecError> {
    let detail = if results.len() != node.outputs.len() {
        format!(
            "{} results for {} outputs",
            results.len(),
            node.outputs.len()
        )
    } else if let Some((t, &v)) = results
        .iter()
        .zip(&node.outputs)
        .find(|(t, &v)| !t.matches(g.ty(v)))
    {
        let ty = g.ty(v);
        format!("result {} does not match declared type {ty}", t.describe())
    } else {
        return Ok(());
    };
    Err(ExecError::Internal {
        node: format!("{id} {}", node.op.name()),
        detail,
    })
}

/// Rounds each float result declared bf16 or f16 to that type, in place.
fn round_to_declared<S: Space>(g: &Graph<S>, node: &Node<S>, results: &mut [Tensor]) {
    for (&v, t) in node.outputs.iter().zip(results) {
        if let (Some(round), Tensor::F32(a)) = (rounding(g.ty(v).dtype), t) {
            a.mapv_inplace(round);
        }
    }
}

/// The rounding of a 16-bit float dtype; `None` for f32 and i32 (kept as computed).
pub(crate) fn rounding(dtype: Dtype) -> Option<fn(f32) -> f32> {
    match dtype {
        Dtype::Bf16 => Some(round_bf16),
        Dtype::F16 => Some(round_f16),
        Dtype::F32 | Dtype::I32 => None,
    }
}

/// The program outputs, moved out of their slots (copied when a value is returned twice, or is
/// a leaf).
pub(crate) fn outputs<S: Space, E: From<ExecError>>(
    g: &Graph<S>,
    leaves: &IdVec<ValueId<S>, Option<&Tensor>>,
    slots: &mut IdVec<ValueId<S>, Option<Tensor>>,
) -> Result<Vec<Tensor>, (NodeId<S>, E)> {
    let outs = g.outputs();
    outs.iter()
        .enumerate()
        .map(|(k, o)| {
            let v = o.value;
            let again = outs[k + 1..].iter().any(|p| p.value == o.value);
            let t = match leaves[v] {
                Some(t) => Some(t.clone()),
                None if again => slots[v].clone(),
                None => slots[v].take(),
            };
            t.ok_or_else(|| {
                let node = g.value(o.value).node;
                let e = ExecError::Internal {
                    node: format!("output `{}`", o.name),
                    detail: format!("value {} was never computed", o.value),
                };
                (node, e.into())
            })
        })
        .collect()
}

/// Names a node in internal errors (`%3 matmul`).
fn here<S: Space>(node: &Node<S>) -> String {
    format!(
        "{} {}",
        node.outputs
            .first()
            .map(|v| v.to_string())
            .unwrap_or_default(),
        node.op.name()
    )
}

/// Bytes a tensor holds (4 per element for both storage kinds).
pub(crate) fn bytes(t: &Tensor) -> u64 {
    t.len() as u64 * 4
}
