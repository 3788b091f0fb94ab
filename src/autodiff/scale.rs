//! Loss scaling: the backward's seed is the scale instead of 1, so small gradients survive
//! 16-bit arithmetic; the gradients are multiplied by 1/scale before anything reads them. With
//! a dynamic scale (a `State` carried from step to step), a step whose gradients hold an inf or
//! NaN is skipped: every carried value keeps its old value (`select(overflow, old, new)`) and
//! the scale halves; after `interval` steps in a row without one it doubles (a second state
//! counts them). The flag `overflow` is one value for the whole mesh: the plan reduces it (max)
//! over every mesh axis at once (`plan::overflow`), so a gradient block corrupted on one rank
//! alone makes every rank skip.

use super::builder::Builder;
use super::optimizer::Carried;
use super::AutodiffError;
use crate::ir::{
    BinaryOp, Dtype, LossScale, Op, ReduceOp, StateInit, TensorType, UnaryOp, ValueId,
    DYNAMIC_START,
};

type R<T> = Result<T, AutodiffError>;

/// The name of the dynamic loss scale's state.
pub const SCALE_STATE: &str = "loss_scale";

/// The name of the dynamic scale's count of steps in a row without an overflow (an f32 whole
/// number below its growth interval).
pub const GOOD_STEPS: &str = "loss_scale_good_steps";

/// The name of the step output (and value) that is 1 when the step was skipped, else 0.
pub const OVERFLOW: &str = "overflow";

/// A scaled loss's scale: a constant, or the dynamic scale's state leaf.
pub(super) enum Scale {
    /// `loss_scale N`.
    Static(f64),
    /// `loss_scale dynamic(interval)`: the state leaf and the growth interval.
    Dynamic(ValueId, u64),
}

/// The backward's seed for a loss of type `ty` (a scalar): 1, the constant scale, or the
/// dynamic scale's state; and the scale, if any.
pub(super) fn seed(
    b: &mut Builder,
    scale: Option<LossScale>,
    ty: &TensorType,
) -> R<(ValueId, Option<Scale>)> {
    let fill = |value| Op::Fill {
        value,
        dtype: ty.dtype,
        shape: ty.shape.clone(),
    };
    match scale {
        None => Ok((b.op(fill(1.0), vec![])?, None)),
        Some(LossScale::Static(n)) => Ok((b.op(fill(n), vec![])?, Some(Scale::Static(n)))),
        Some(LossScale::Dynamic { interval }) => {
            let op = Op::State {
                name: SCALE_STATE.into(),
                init: StateInit::Fill(DYNAMIC_START),
            };
            let s = b.leaf(op, ty.clone(), None);
            Ok((s, Some(Scale::Dynamic(s, interval))))
        }
    }
}

/// Replaces each `(name, param, grad)`'s gradient by the gradient × 1/scale.
pub(super) fn unscale(
    b: &mut Builder,
    s: &Scale,
    grads: &mut [(String, ValueId, ValueId)],
) -> R<()> {
    let inv = match *s {
        Scale::Static(n) => {
            for (_, _, g) in grads.iter_mut() {
                *g = b.scalar(BinaryOp::Mul, *g, 1.0 / n, false)?;
            }
            return Ok(());
        }
        Scale::Dynamic(v, _) => b.unary(UnaryOp::Recip, v)?,
    };
    let mut by_dtype: Vec<(Dtype, ValueId)> = vec![(b.ty(inv).dtype, inv)];
    for (_, _, g) in grads.iter_mut() {
        let dtype = b.ty(*g).dtype;
        let f = match by_dtype.iter().find(|(d, _)| *d == dtype) {
            Some(&(_, f)) => f,
            None => {
                // 1/scale is a power of two: exact in every float dtype.
                let f = b.op(Op::Cast { to: dtype }, vec![inv])?;
                by_dtype.push((dtype, f));
                f
            }
        };
        *g = b.bin(BinaryOp::Mul, *g, f)?;
    }
    Ok(())
}

/// The f32 scalar that is 1 when any gradient element is ±inf or NaN, else 0.
fn overflow(b: &mut Builder, grads: &[(String, ValueId, ValueId)]) -> R<ValueId> {
    let mut found: Option<ValueId> = None;
    for (_, _, g) in grads {
        let mut f = b.unary(UnaryOp::NonFinite, *g)?;
        while !b.ty(f).shape.is_empty() {
            f = b.reduce(ReduceOp::Max, f, 0, false)?;
        }
        if b.ty(f).dtype != Dtype::F32 {
            f = b.op(Op::Cast { to: Dtype::F32 }, vec![f])?;
        }
        found = Some(match found {
            Some(a) => b.bin(BinaryOp::Max, a, f)?,
            None => f,
        });
    }
    let found = found.ok_or_else(|| b.bug("a loss scale without gradients"))?;
    b.graph_mut().set_value_name(found, OVERFLOW.to_string());
    Ok(found)
}

/// With a dynamic scale, the overflow flag of `grads` (made before the update, so that the
/// optimizer keeps each carried value with its select as it makes it: `optimizer::guarded`).
pub(super) fn flag(
    b: &mut Builder,
    s: &Scale,
    grads: &[(String, ValueId, ValueId)],
) -> R<Option<ValueId>> {
    match *s {
        Scale::Dynamic(..) => Ok(Some(overflow(b, grads)?)),
        Scale::Static(_) => Ok(None),
    }
}

/// With a dynamic scale and its flag `found`: the scale's and the good-step count's next values.
pub(super) fn next_scale(b: &mut Builder, s: &Scale, found: ValueId) -> R<Vec<Carried>> {
    let Scale::Dynamic(scale, interval) = *s else {
        return Ok(Vec::new());
    };
    Ok(grow(b, scale, interval, found)?.to_vec())
}

/// The scale's and the good-step count's next values: on an overflow the scale halves and the
/// count restarts; else the count grows, and on reaching `interval` the scale doubles and the
/// count restarts.
fn grow(b: &mut Builder, scale: ValueId, interval: u64, found: ValueId) -> R<[Carried; 2]> {
    let ty = b.ty(scale).clone();
    let op = Op::State {
        name: GOOD_STEPS.into(),
        init: StateInit::Fill(0.0),
    };
    let good = b.leaf(op, ty.clone(), None);
    let fill = |value| Op::Fill {
        value,
        dtype: ty.dtype,
        shape: ty.shape.clone(),
    };
    let (zero, every) = (
        b.op(fill(0.0), vec![])?,
        b.op(fill(interval as f64), vec![])?,
    );
    let counted = b.scalar(BinaryOp::Add, good, 1.0, false)?;
    let full = b.op(Op::Equal, vec![counted, every])?;
    let kept = b.op(Op::Select, vec![full, zero, counted])?;
    let next_good = b.op(Op::Select, vec![found, zero, kept])?;
    let double = b.scalar(BinaryOp::Mul, scale, 2.0, false)?;
    let grown = b.op(Op::Select, vec![full, double, scale])?;
    let half = b.scalar(BinaryOp::Mul, scale, 0.5, false)?;
    let next = b.op(Op::Select, vec![found, half, grown])?;
    Ok([
        (SCALE_STATE.to_string(), scale, next),
        (GOOD_STEPS.to_string(), good, next_good),
    ])
}
