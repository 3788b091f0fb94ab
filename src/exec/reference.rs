//! The unsharded reference interpreter: runs a global graph with the shared executor loop
//! (`exec::core`), evaluating global ops only.

use super::apply::apply_owned;
use super::core::{self, Eval};
use super::{ExecError, Tensor};
use crate::ir::{Dtype, Graph, IdVec, Node, Op, ValueId};
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
    run_with(g, &leaves(g, params, inputs)?, &mut GlobalOps)
}

/// Runs `g` like `run`, but with every float op result scaled elementwise by `1 + rel·u`, `u`
/// in [-1, 1) a fixed pseudo-random function of `key`, the node and the element: a model of
/// rounding errors. How far an output moves estimates how far any change of summation order
/// (such as sharding) can move it: little for a well-conditioned value, a lot for a layernorm
/// of a nearly constant row, a cancelling sum, or AdamW's step on a gradient near zero.
/// A result declared bf16 or f16 is perturbed by `rel` scaled from f32's unit roundoff to its
/// type's (×2¹⁶ for bf16, ×2¹³ for f16): its rounding errors are that much larger.
pub fn run_perturbed(
    g: &Graph,
    leaves: &BTreeMap<String, Tensor>,
    rel: f32,
    key: u64,
) -> Result<BTreeMap<String, Tensor>, ExecError> {
    run_with(
        g,
        &self::leaves(g, leaves, leaves)?,
        &mut Perturbed {
            rel: g
                .values()
                .map(|(v, _)| rel * widening(g.ty(v).dtype))
                .collect(),
            key,
        },
    )
}

/// Runs `g` like `run` with the first element of the value named `value` set to +inf once it is
/// made (the reference side of a test's corrupted gradient, `exec::train::Poison`).
pub fn run_poisoned(
    g: &Graph,
    leaves: &BTreeMap<String, Tensor>,
    value: &str,
) -> Result<BTreeMap<String, Tensor>, ExecError> {
    let v = g
        .values()
        .map(|(v, _)| v)
        .filter(|&v| g.value(v).name.as_deref() == Some(value))
        .max_by_key(|&v| g.value(v).node.index())
        .ok_or_else(|| ExecError::Internal {
            node: "poison".into(),
            detail: format!("no value named `{value}`"),
        })?;
    run_with(g, &self::leaves(g, leaves, leaves)?, &mut Poisoned(v))
}

/// The global op evaluator that corrupts one value (see `run_poisoned`).
struct Poisoned(ValueId);

impl Eval for Poisoned {
    type Error = ExecError;
    fn eval(&mut self, node: &Node, args: Vec<Cow<'_, Tensor>>) -> Result<Vec<Tensor>, ExecError> {
        let mut out = apply_owned(&node.op, args)?;
        super::spmd::poison(node, &mut out, self.0);
        Ok(out)
    }
}

/// Runs `g` on its leaf values with the evaluator `ev`; the outputs by name.
fn run_with(
    g: &Graph,
    leaves: &IdVec<ValueId, Option<&Tensor>>,
    ev: &mut impl Eval<Error = ExecError>,
) -> Result<BTreeMap<String, Tensor>, ExecError> {
    let outcome = core::run(g, &Liveness::of(g), leaves, ev).map_err(|(_, e)| e)?;
    Ok(g.outputs()
        .iter()
        .map(|o| o.name.clone())
        .zip(outcome.outputs)
        .collect())
}

/// How much larger than f32's the unit roundoff of `dtype` is.
fn widening(dtype: Dtype) -> f32 {
    match dtype {
        Dtype::Bf16 => 65536.0,
        Dtype::F16 => 8192.0,
        Dtype::F32 | Dtype::I32 => 1.0,
    }
}

/// The global op evaluator that perturbs every float result (see `run_perturbed`) by its
/// value's relative amount.
struct Perturbed {
    rel: IdVec<ValueId, f32>,
    key: u64,
}

impl Eval for Perturbed {
    type Error = ExecError;
    fn eval(&mut self, node: &Node, args: Vec<Cow<'_, Tensor>>) -> Result<Vec<Tensor>, ExecError> {
        let mut out = apply_owned(&node.op, args)?;
        let node_key = node.outputs.first().map_or(0, |v| v.index() as u64);
        for (k, (t, &v)) in out.iter_mut().zip(&node.outputs).enumerate() {
            let rel = self.rel[v];
            if let Tensor::F32(x) = t {
                let key = self.key ^ (node_key << 8 ^ k as u64).wrapping_mul(0xa076_1d64_78bd_642f);
                for (i, v) in x.iter_mut().enumerate() {
                    *v *= 1.0 + rel * unit(key, i as u64);
                }
            }
        }
        Ok(out)
    }
}

/// A pseudo-random number in [-1, 1) from `key` and `i` (a splitmix64 finaliser).
fn unit(key: u64, i: u64) -> f32 {
    let mut z = key ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
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
