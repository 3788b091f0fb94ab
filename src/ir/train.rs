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
    /// skipped (every carried value keeps its old value) and halves it.
    Dynamic,
}

/// The dynamic loss scale's first value (PyTorch's `GradScaler` default).
pub const DYNAMIC_START: f64 = 65536.0;
