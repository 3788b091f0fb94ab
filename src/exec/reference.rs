//! The unsharded reference interpreter: runs a global graph node by node, in storage
//! (topological) order, freeing each value after its last use.

use super::apply::apply_owned;
use super::{ExecError, Tensor};
use crate::ir::{Graph, Node, NodeId, Op, TensorType};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Runs `g` on the given params and inputs (by leaf name); returns the outputs by name.
///
/// Leaves are checked against their declared types (storage kind and shape); every result is
/// checked against the graph's type. Params and inputs are borrowed, never copied, unless
/// returned as an output.
pub fn run(
    g: &Graph,
    params: &BTreeMap<String, Tensor>,
    inputs: &BTreeMap<String, Tensor>,
) -> Result<BTreeMap<String, Tensor>, ExecError> {
    let last = last_uses(g);
    let mut slots: Vec<Option<Cow<'_, Tensor>>> = (0..g.num_values()).map(|_| None).collect();
    for (i, (id, node)) in g.nodes().enumerate() {
        // Operands read for the last time (and only once here) that this run computed are
        // handed over, so that the op can reuse their buffers.
        let handed: Vec<Option<Tensor>> = node
            .inputs
            .iter()
            .map(|&v| {
                let dies =
                    last[v.index()] == i && node.inputs.iter().filter(|&&w| w == v).count() == 1;
                match slots[v.index()].take() {
                    Some(Cow::Owned(t)) if dies => Some(t),
                    other => {
                        slots[v.index()] = other;
                        None
                    }
                }
            })
            .collect();
        let results = eval(g, id, node, &slots, handed, params, inputs)?;
        for (&v, t) in node.outputs.iter().zip(results) {
            slots[v.index()] = Some(t);
        }
        for &v in node.inputs.iter().chain(&node.outputs) {
            if last[v.index()] == i {
                if let Some(Cow::Owned(t)) = slots[v.index()].take() {
                    // The buffer serves a later kernel's output.
                    super::kernels::recycle(t);
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    for o in g.outputs() {
        let t = slots[o.value.index()]
            .as_ref()
            .ok_or_else(|| ExecError::Internal {
                node: format!("output `{}`", o.name),
                detail: format!("value {} was never computed", o.value),
            })?;
        out.insert(o.name.clone(), t.as_ref().clone());
    }
    Ok(out)
}

/// For each value, the index of the last node that reads it: its own node's index when unread,
/// `usize::MAX` for program outputs (never freed).
fn last_uses(g: &Graph) -> Vec<usize> {
    let mut last: Vec<usize> = g.values().map(|(_, v)| v.node.index()).collect();
    for (i, (_, node)) in g.nodes().enumerate() {
        for &v in &node.inputs {
            last[v.index()] = last[v.index()].max(i);
        }
    }
    for o in g.outputs() {
        last[o.value.index()] = usize::MAX;
    }
    last
}

/// Evaluates one node: looks up a leaf, or applies the op to its operands; results are checked
/// against the graph's types.
fn eval<'a>(
    g: &Graph,
    id: NodeId,
    node: &Node,
    slots: &[Option<Cow<'a, Tensor>>],
    handed: Vec<Option<Tensor>>,
    params: &'a BTreeMap<String, Tensor>,
    inputs: &'a BTreeMap<String, Tensor>,
) -> Result<Vec<Cow<'a, Tensor>>, ExecError> {
    let here = || format!("{id} {}", node.op.name());
    let results: Vec<Cow<'a, Tensor>> = match &node.op {
        Op::Param { name } => vec![leaf(params, name, ExecError::MissingParam)?],
        Op::Input { name } => vec![leaf(inputs, name, ExecError::MissingInput)?],
        op => {
            let args = node
                .inputs
                .iter()
                .zip(handed)
                .map(|(v, h)| match h {
                    Some(t) => Ok(Cow::Owned(t)),
                    None => slots[v.index()]
                        .as_deref()
                        .map(Cow::Borrowed)
                        .ok_or_else(|| ExecError::Internal {
                            node: here(),
                            detail: format!("operand {v} is not available"),
                        }),
                })
                .collect::<Result<Vec<Cow<'_, Tensor>>, _>>()?;
            apply_owned(op, args)?.into_iter().map(Cow::Owned).collect()
        }
    };
    if results.len() != node.outputs.len() {
        let detail = format!(
            "{} results for {} outputs",
            results.len(),
            node.outputs.len()
        );
        return Err(ExecError::Internal {
            node: here(),
            detail,
        });
    }
    for (t, &v) in results.iter().zip(&node.outputs) {
        check_type(t, g.ty(v), here, &node.op)?;
    }
    Ok(results)
}

/// Looks up a leaf tensor by name; `missing` builds the error when absent.
fn leaf<'a>(
    map: &'a BTreeMap<String, Tensor>,
    name: &str,
    missing: fn(String) -> ExecError,
) -> Result<Cow<'a, Tensor>, ExecError> {
    map.get(name)
        .map(Cow::Borrowed)
        .ok_or_else(|| missing(name.to_string()))
}

/// Checks a result against its declared type: a leaf mismatch is the caller's `WrongType`, any
/// other mismatch an `Internal` error.
fn check_type(
    t: &Tensor,
    ty: &TensorType,
    here: impl Fn() -> String,
    op: &Op,
) -> Result<(), ExecError> {
    if t.matches(ty) {
        return Ok(());
    }
    Err(match op {
        Op::Param { name } | Op::Input { name } => ExecError::WrongType {
            what: format!("{} `{name}`", op.name()),
            expected: ty.clone(),
            got: t.describe(),
        },
        _ => ExecError::Internal {
            node: here(),
            detail: format!("result {} does not match declared type {ty}", t.describe()),
        },
    })
}

#[cfg(test)]
mod tests;
