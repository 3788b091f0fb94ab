//! The unsharded reference interpreter: runs a global graph with the shared executor loop
//! (`exec::core`), evaluating global ops only.

use super::apply::apply_owned;
use super::core::{self, Eval};
use super::{ExecError, Tensor};
use crate::ir::{Graph, IdVec, Node, Op, ValueId};
use crate::plan::liveness::Liveness;
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
    let leaves = leaves(g, params, inputs)?;
    let outcome = core::run(g, &Liveness::of(g), &leaves, &mut GlobalOps).map_err(|(_, e)| e)?;
    Ok(g.outputs()
        .iter()
        .map(|o| o.name.clone())
        .zip(outcome.outputs)
        .collect())
}

/// The global op evaluator.
struct GlobalOps;

impl Eval for GlobalOps {
    type Error = ExecError;
    fn eval(&mut self, node: &Node, args: Vec<Cow<'_, Tensor>>) -> Result<Vec<Tensor>, ExecError> {
        apply_owned(&node.op, args)
    }
}

/// Each leaf value of `g` from the params and inputs, checked against its
/// declared type.
fn leaves<'a>(
    g: &Graph,
    params: &'a BTreeMap<String, Tensor>,
    inputs: &'a BTreeMap<String, Tensor>,
) -> Result<IdVec<ValueId, Option<&'a Tensor>>, ExecError> {
    let mut out = IdVec::filled(g.num_values(), None);
    for (_, node) in g.nodes() {
        let (map, missing): (_, fn(String) -> ExecError) = match &node.op {
            Op::Param { .. } | Op::State { .. } => (params, ExecError::MissingParam),
            Op::Input { .. } => (inputs, ExecError::MissingInput),
            _ => continue,
        };
        let Some(name) = node.op.leaf_name() else {
            continue;
        };
        let t = map.get(name).ok_or_else(|| missing(name.to_string()))?;
        let v = node.outputs[0];
        if !t.matches(g.ty(v)) {
            return Err(ExecError::WrongType {
                what: format!("{} `{name}`", node.op.name()),
                expected: g.ty(v).clone(),
                got: t.describe(),
            });
        }
        out[v] = Some(t);
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
