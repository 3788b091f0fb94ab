//! The `train` statement: the loss it names, checked to be an f32 scalar, and the optimizer it
//! asks for, with every hyper-parameter checked at its argument.

use super::builtins::{bind, Bound};
use super::error::LowerError;
use super::scope::{Scope, Val};
use super::Program;
use crate::ir::{
    growth_interval, Dtype, LossScale, Optimizer, ValueId, DYNAMIC_INTERVAL, MAX_INTERVAL,
};
use crate::syntax::ast::{ScaleSpec, Train};

/// The optimizers and their arguments (`?`: optional, with the default of [`optimizer`]).
const OPTIMIZERS: &[(&str, &[&str])] = &[
    ("sgd", &["lr", "momentum?"]),
    (
        "adamw",
        &["lr", "beta1?", "beta2?", "eps?", "weight_decay?"],
    ),
];

/// The loss value and the optimizer of statement `t`, in scope `s`.
pub(super) fn resolve(
    s: &mut Scope,
    t: &Train,
    prog: &mut Program,
) -> Result<(ValueId, Optimizer), LowerError> {
    let loss = loss(s, t, prog)?;
    Ok((loss, optimizer(s, t, prog)?))
}

/// The statement's loss scale: `dynamic`, `dynamic(N)` with N a whole number of steps in
/// 1..=2^24, or a constant that must be finite and > 0.
pub(super) fn loss_scale(t: &Train) -> Result<Option<LossScale>, LowerError> {
    match &t.loss_scale {
        None => Ok(None),
        Some((ScaleSpec::Dynamic(None), _)) => Ok(Some(LossScale::Dynamic {
            interval: DYNAMIC_INTERVAL,
        })),
        Some((ScaleSpec::Dynamic(Some((n, span))), _)) => match growth_interval(*n) {
            Some(interval) => Ok(Some(LossScale::Dynamic { interval })),
            None => Err(LowerError::Invalid {
                message: format!(
                    "`loss_scale dynamic({n})`: the growth interval must be a whole number of steps from 1 to {MAX_INTERVAL}"
                ),
                span: *span,
                hint: Some("write e.g. `loss_scale dynamic(2000)`".into()),
            }),
        },
        Some((ScaleSpec::Static(v), _)) if positive(*v) => Ok(Some(LossScale::Static(*v))),
        Some((ScaleSpec::Static(v), span)) => Err(LowerError::Invalid {
            message: format!("`loss_scale` {v}: it must be finite and > 0"),
            span: *span,
            hint: Some("write `loss_scale dynamic` or a scale such as `loss_scale 1024`".into()),
        }),
    }
}

/// The loss: a tensor in scope whose type is `f32[]`.
fn loss(s: &mut Scope, t: &Train, prog: &Program) -> Result<ValueId, LowerError> {
    let not_scalar = |what: String| LowerError::Invalid {
        message: format!(
            "`train` needs an f32 scalar loss; `{}` is {what}",
            t.loss.name
        ),
        span: t.loss.span,
        hint: Some("reduce it to a scalar, e.g. with `cross_entropy` or `mean`".into()),
    };
    match s.lookup(&t.loss, prog)? {
        Val::Scalar(..) => Err(not_scalar("a dim".into())),
        Val::Tensor(v) => {
            let ty = s.g.ty(v);
            if ty.dtype == Dtype::F32 && ty.shape.is_empty() {
                Ok(v)
            } else {
                Err(not_scalar(ty.to_string()))
            }
        }
    }
}

/// The optimizer named by `t` with its arguments, defaults filled in, each checked.
fn optimizer(s: &mut Scope, t: &Train, prog: &mut Program) -> Result<Optimizer, LowerError> {
    let name = t.optimizer.name.as_str();
    let Some(&(name, sig)) = OPTIMIZERS.iter().find(|(n, _)| *n == name) else {
        let hint = crate::diag::suggest(name, OPTIMIZERS.iter().map(|(n, _)| *n))
            .or_else(|| Some("the optimizers are `sgd` and `adamw`".into()));
        return Err(LowerError::BadOp {
            message: format!("unknown optimizer `{name}`"),
            span: t.optimizer.span,
            hint,
        });
    };
    let b = bind(name, sig, &t.args, t.span)?;
    let mut arg = |i: usize, default: f64, ok: fn(f64) -> bool, what: &str| {
        let check = Check {
            name: sig[i].trim_end_matches('?'),
            default,
            ok,
            what,
        };
        hyper(&b, i, &check, s, prog)
    };
    Ok(match name {
        "sgd" => Optimizer::Sgd {
            lr: arg(0, 0.0, positive, "finite and > 0")?,
            momentum: arg(1, 0.0, unit, "in [0, 1)")?,
        },
        _ => Optimizer::AdamW {
            lr: arg(0, 0.0, positive, "finite and > 0")?,
            beta1: arg(1, 0.9, unit, "in [0, 1)")?,
            beta2: arg(2, 0.999, unit, "in [0, 1)")?,
            eps: arg(3, 1e-8, positive, "finite and > 0")?,
            weight_decay: arg(4, 0.01, non_negative, "finite and >= 0")?,
        },
    })
}

/// How one hyper-parameter is checked.
struct Check<'a> {
    name: &'a str,
    default: f64,
    ok: fn(f64) -> bool,
    what: &'a str,
}

/// Argument `i` of `b` (or the default when absent), which must pass `c`.
fn hyper(
    b: &Bound,
    i: usize,
    c: &Check,
    s: &mut Scope,
    prog: &mut Program,
) -> Result<f64, LowerError> {
    let Some(v) = b.float(i, s, prog)? else {
        return Ok(c.default);
    };
    if (c.ok)(v) {
        return Ok(v);
    }
    let span = b.expr(i).map(|e| e.span()).unwrap_or_default();
    Err(b.bad(format!("`{}` = {v}: it must be {}", c.name, c.what), span))
}

fn positive(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

fn unit(v: f64) -> bool {
    (0.0..1.0).contains(&v)
}

fn non_negative(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}
