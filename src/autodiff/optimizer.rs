//! The optimizer's update as ops of the step, after the backward: each trained param and each
//! piece of optimizer state (a `State` leaf, zeros before the first step, laid out as its
//! param) gets its next value as an output `next(NAME)`, which the step loop feeds back.
//! The formulas are PyTorch's: SGD with momentum `b ← μ·b + g, p ← p − lr·b` (no dampening,
//! `b = g` at the first step); AdamW with decoupled weight decay and bias correction, whose step
//! count `t` is itself state (`step`, a scalar), so `β^t` is computed in the program.
//! A bf16/f16 param is trained through an f32 master weight `master(NAME)`, whose optimizer
//! state is f32 too.

use super::builder::Builder;
use super::AutodiffError;
use crate::ir::{BinaryOp, Dtype, Op, Optimizer, StateInit, TensorType, UnaryOp, ValueId};

type R<T> = Result<T, AutodiffError>;

/// The output name of a carried leaf's next value.
pub fn next_name(leaf: &str) -> String {
    format!("next({leaf})")
}

/// The leaf whose next value output `output` holds (`next(w)` -> `w`).
pub fn leaf_of_next(output: &str) -> Option<&str> {
    output.strip_prefix("next(")?.strip_suffix(')')
}

/// A carried leaf: its name, the leaf, and its next value.
pub(super) type Carried = (String, ValueId, ValueId);

/// Appends the update of every `(name, param, grad)`; returns each carried leaf (params first,
/// then state). A 16-bit param is updated through its f32 master weight (a state that starts as
/// the param): the gradient is cast to f32, the optimizer updates the master, and the param's
/// next value is the master's rounded to the param's dtype.
///
/// With a dynamic loss scale's overflow flag `skip`, each carried value's next value is kept at
/// its old value on an overflow, by a select made right after it (made after the whole update,
/// the selects kept every new value of the state alive at once).
pub(super) fn update(
    b: &mut Builder,
    opt: &Optimizer,
    trained: &[(String, ValueId, ValueId)],
    skip: Option<ValueId>,
) -> R<Vec<Carried>> {
    let mut work = Vec::new();
    let mut masters = Vec::new();
    for (name, p, g) in trained {
        match b.ty(*p).dtype {
            Dtype::F32 => work.push((name.clone(), *p, *g)),
            _ => {
                let (m, g32) = master(b, name, *p, *g)?;
                masters.push((*p, m));
                work.push((name.clone(), m, g32));
            }
        }
    }
    let (mut next, mut state) = match *opt {
        Optimizer::Sgd { lr, momentum } => sgd(b, lr, momentum, &work, skip)?,
        Optimizer::AdamW {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } => {
            let h = Hyper {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            };
            adamw(b, &h, &work, skip)?
        }
    };
    let mut master_state = Vec::new();
    for (name, leaf, value) in next.iter_mut() {
        if let Some(&(p, _)) = masters.iter().find(|(_, m)| *m == *leaf) {
            let to = b.ty(p).dtype;
            master_state.push((master_name(name), *leaf, *value));
            *value = b.op(Op::Cast { to }, vec![*value])?;
            *leaf = p;
        }
    }
    master_state.append(&mut state);
    next.extend(master_state);
    Ok(next)
}

/// The state name of a param's f32 master weight.
pub fn master_name(param: &str) -> String {
    format!("master({param})")
}

/// The f32 master weight of the 16-bit param `p` (a state laid out as `p`, starting as `p`'s
/// values) and its gradient `g` cast to f32.
fn master(b: &mut Builder, name: &str, p: ValueId, g: ValueId) -> R<(ValueId, ValueId)> {
    let mut ty = b.ty(p).clone();
    ty.dtype = Dtype::F32;
    let op = Op::State {
        name: master_name(name),
        init: StateInit::Param(name.to_string()),
    };
    let m = b.leaf(op, ty, Some(p));
    let g32 = b.op(Op::Cast { to: Dtype::F32 }, vec![g])?;
    Ok((m, g32))
}

/// The params' and the state's next values.
type Next = (Vec<Carried>, Vec<Carried>);

/// SGD with momentum `μ` (none when 0) on every `(name, param, grad)`.
fn sgd(
    b: &mut Builder,
    lr: f64,
    momentum: f64,
    trained: &[(String, ValueId, ValueId)],
    skip: Option<ValueId>,
) -> R<Next> {
    let mut next = Vec::new();
    let mut state = Vec::new();
    for (name, p, g) in trained {
        let step = if momentum > 0.0 {
            let buf_name = format!("sgd.momentum({name})");
            let buf = state_like(b, &buf_name, *p);
            let kept = b.scalar(BinaryOp::Mul, buf, momentum, false)?;
            let buf2 = b.add(kept, *g)?;
            state.push((buf_name, buf, guarded(b, skip, buf, buf2)?));
            buf2
        } else {
            *g
        };
        let delta = b.scalar(BinaryOp::Mul, step, lr, false)?;
        let p2 = b.bin(BinaryOp::Sub, *p, delta)?;
        next.push((name.clone(), *p, guarded(b, skip, *p, p2)?));
    }
    Ok((next, state))
}

/// AdamW's hyper-parameters.
struct Hyper {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

/// AdamW on every `(name, param, grad)`, with its step count.
fn adamw(
    b: &mut Builder,
    h: &Hyper,
    trained: &[(String, ValueId, ValueId)],
    skip: Option<ValueId>,
) -> R<Next> {
    let mut next = Vec::new();
    let mut state = Vec::new();
    let step = b.leaf(
        Op::State {
            name: "step".into(),
            init: StateInit::Zeros,
        },
        TensorType::new(Dtype::F32, vec![]),
        None,
    );
    let t = b.scalar(BinaryOp::Add, step, 1.0, false)?;
    let c1 = correction(b, t, h.beta1)?;
    let c2 = correction(b, t, h.beta2)?;
    for (name, p, g) in trained {
        let a = Adam {
            lr: h.lr,
            beta1: h.beta1,
            beta2: h.beta2,
            eps: h.eps,
            weight_decay: h.weight_decay,
            c1,
            c2,
        };
        let [p2, m, m2, v, v2] = adam(b, &a, name, *p, *g)?;
        next.push((name.clone(), *p, guarded(b, skip, *p, p2)?));
        state.push((format!("adamw.m({name})"), m, guarded(b, skip, m, m2)?));
        state.push((format!("adamw.v({name})"), v, guarded(b, skip, v, v2)?));
    }
    state.push(("step".into(), step, guarded(b, skip, step, t)?));
    Ok((next, state))
}

/// `next`, or with an overflow flag `skip`, `where(skip, old, next)`: a skipped step keeps the
/// old value.
fn guarded(b: &mut Builder, skip: Option<ValueId>, old: ValueId, next: ValueId) -> R<ValueId> {
    match skip {
        Some(f) => b.op(Op::Select, vec![f, old, next]),
        None => Ok(next),
    }
}

/// A state leaf named `name` of `like`'s type and layout.
fn state_like(b: &mut Builder, name: &str, like: ValueId) -> ValueId {
    let ty = b.ty(like).clone();
    let op = Op::State {
        name: name.to_string(),
        init: StateInit::Zeros,
    };
    b.leaf(op, ty, Some(like))
}

/// `1 / (1 − β^t)` as an f32 scalar (`None` when β = 0: no correction).
fn correction(b: &mut Builder, t: ValueId, beta: f64) -> R<Option<ValueId>> {
    if beta == 0.0 {
        return Ok(None);
    }
    let log_pow = b.scalar(BinaryOp::Mul, t, beta.ln(), false)?;
    let pow = b.unary(UnaryOp::Exp, log_pow)?;
    let denom = b.scalar(BinaryOp::Sub, pow, 1.0, true)?;
    Ok(Some(b.unary(UnaryOp::Recip, denom)?))
}

/// AdamW's hyper-parameters with this step's bias corrections.
struct Adam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    c1: Option<ValueId>,
    c2: Option<ValueId>,
}

/// One param's AdamW update: its next value, and each moment's leaf and next value.
fn adam(b: &mut Builder, h: &Adam, name: &str, p: ValueId, g: ValueId) -> R<[ValueId; 5]> {
    let m = state_like(b, &format!("adamw.m({name})"), p);
    let v = state_like(b, &format!("adamw.v({name})"), p);
    let m2 = ema(b, m, g, h.beta1)?;
    let g2 = b.bin(BinaryOp::Mul, g, g)?;
    let v2 = ema(b, v, g2, h.beta2)?;
    let mhat = corrected(b, m2, h.c1)?;
    let vhat = corrected(b, v2, h.c2)?;
    let root = b.unary(UnaryOp::Sqrt, vhat)?;
    let denom = b.scalar(BinaryOp::Add, root, h.eps, false)?;
    let ratio = b.bin(BinaryOp::Div, mhat, denom)?;
    let delta = b.scalar(BinaryOp::Mul, ratio, h.lr, false)?;
    let decayed = if h.weight_decay > 0.0 {
        b.scalar(BinaryOp::Mul, p, 1.0 - h.lr * h.weight_decay, false)?
    } else {
        p
    };
    Ok([b.bin(BinaryOp::Sub, decayed, delta)?, m, m2, v, v2])
}

/// `β·s + (1 − β)·x`.
fn ema(b: &mut Builder, s: ValueId, x: ValueId, beta: f64) -> R<ValueId> {
    let kept = b.scalar(BinaryOp::Mul, s, beta, false)?;
    let new = b.scalar(BinaryOp::Mul, x, 1.0 - beta, false)?;
    b.add(kept, new)
}

/// `s · c` (broadcast scalar), or `s` without a correction.
fn corrected(b: &mut Builder, s: ValueId, c: Option<ValueId>) -> R<ValueId> {
    match c {
        Some(c) => b.bin(BinaryOp::Mul, s, c),
        None => Ok(s),
    }
}
