//! What a program trains: its loss, its optimizer, and the params it leaves alone.

use super::ValueId;
use crate::span::Span;
use std::collections::BTreeSet;
use std::fmt;

/// An optimizer and its hyper-parameters, each checked when the program is lowered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Optimizer {
    /// `p -= lr·(g + momentum·buf)`-style SGD; momentum 0 keeps no state.
    Sgd {
        /// Learning rate, finite and > 0.
        lr: f64,
        /// Momentum in [0, 1).
        momentum: f64,
    },
    /// AdamW (decoupled weight decay, bias-corrected moments).
    AdamW {
        /// Learning rate, finite and > 0.
        lr: f64,
        /// First-moment decay in [0, 1).
        beta1: f64,
        /// Second-moment decay in [0, 1).
        beta2: f64,
        /// Added to the second moment's square root, > 0.
        eps: f64,
        /// Decoupled weight decay, >= 0.
        weight_decay: f64,
    },
}

impl Optimizer {
    /// The optimizer's name as written in a program.
    pub fn name(&self) -> &'static str {
        match self {
            Optimizer::Sgd { .. } => "sgd",
            Optimizer::AdamW { .. } => "adamw",
        }
    }
}

impl fmt::Display for Optimizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Optimizer::Sgd { lr, momentum } => write!(f, "sgd(lr={lr}, momentum={momentum})"),
            Optimizer::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => write!(
                f,
                "adamw(lr={lr}, beta1={beta1}, beta2={beta2}, eps={eps}, \
                 weight_decay={weight_decay})"
            ),
        }
    }
}

/// A program's `train` statement, resolved: the step minimises `loss` with `optimizer` over
/// every param the loss depends on but the frozen ones.
#[derive(Clone, Debug, PartialEq)]
pub struct Training {
    /// The f32 scalar minimised.
    pub loss: ValueId,
    /// How params are updated.
    pub optimizer: Optimizer,
    /// Full names of the params declared `frozen` (every instance of a block's frozen param).
    pub frozen: BTreeSet<String>,
    /// The loss scale, if any.
    pub loss_scale: Option<LossScale>,
    /// The `train` statement.
    pub span: Span,
}

/// How the loss is scaled before the backward (gradients are unscaled before the update).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LossScale {
    /// A constant scale, finite and > 0.
    Static(f64),
    /// A scale carried from step to step, one value for all ranks: it starts at
    /// [`DYNAMIC_START`]; a step whose gradients hold an inf or NaN anywhere on the mesh is
    /// skipped (every carried value keeps its old value) and halves it; after `interval` steps
    /// in a row without one it doubles (PyTorch's `GradScaler`, Megatron).
    Dynamic {
        /// Good steps in a row before the scale doubles (≥ 1, at most [`MAX_INTERVAL`]).
        interval: u64,
    },
}

/// The default growth interval of a dynamic scale (PyTorch's `growth_interval`).
pub const DYNAMIC_INTERVAL: u64 = 2000;

/// The largest growth interval: the count of good steps is an f32, exact up to 2^24.
pub const MAX_INTERVAL: u64 = 1 << 24;

/// `n` as a growth interval, if it is a whole number in 1..=[`MAX_INTERVAL`].
pub fn growth_interval(n: f64) -> Option<u64> {
    (n.fract() == 0.0 && (1.0..=MAX_INTERVAL as f64).contains(&n)).then_some(n as u64)
}

impl std::str::FromStr for LossScale {
    type Err = String;

    /// `dynamic`, `dynamic(N)` or a finite scale > 0 (the `--loss-scale` flag's values).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("`{s}`: write `dynamic`, `dynamic(N)` (N steps between doublings, 1 to {MAX_INTERVAL}) or a finite scale > 0 such as 1024")
        };
        if s == "dynamic" {
            return Ok(LossScale::Dynamic {
                interval: DYNAMIC_INTERVAL,
            });
        }
        if let Some(n) = s.strip_prefix("dynamic(").and_then(|r| r.strip_suffix(')')) {
            let n: f64 = n.trim().parse().map_err(|_| bad())?;
            return growth_interval(n)
                .map(|interval| LossScale::Dynamic { interval })
                .ok_or_else(bad);
        }
        match s.parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 => Ok(LossScale::Static(v)),
            _ => Err(bad()),
        }
    }
}

/// The dynamic loss scale's first value (PyTorch's `GradScaler` default).
pub const DYNAMIC_START: f64 = 65536.0;
