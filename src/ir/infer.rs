//! Shape and dtype inference, one rule per op. Lowering reports failures as user errors; the
//! verifier re-runs it and reports disagreements as compiler bugs.

use super::op::Op;
use super::types::TensorType;

/// Why an op cannot be applied to operands of the given types.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InferError {
    /// Wrong number of operands.
    #[error("{op} takes {expected} operand(s), got {got}")]
    Arity {
        /// Op name.
        op: &'static str,
        /// Accepted count, e.g. "2" or "2 or 3".
        expected: &'static str,
        /// Given count.
        got: usize,
    },
    /// Shapes that do not fit together (both shown).
    #[error("shape mismatch in {op}: {lhs} vs {rhs}{detail}")]
    Shape {
        /// Op name.
        op: &'static str,
        /// First operand type.
        lhs: TensorType,
        /// Second operand type.
        rhs: TensorType,
        /// Extra explanation, starting with ": " when non-empty.
        detail: String,
    },
    /// An operand of the wrong rank.
    #[error("rank mismatch in {op}: {ty} has rank {}, expected {expected}", ty.rank())]
    Rank {
        /// Op name.
        op: &'static str,
        /// The operand type.
        ty: TensorType,
        /// What was expected, e.g. "at least 2".
        expected: String,
    },
    /// Operands of different or unsupported dtypes.
    #[error("dtype mismatch in {op}: {detail}")]
    Dtype {
        /// Op name.
        op: &'static str,
        /// Both dtypes or the rule broken.
        detail: String,
    },
    /// A bad attribute (axis out of range, bad permutation, element count change...).
    #[error("{op}: {detail}")]
    Attr {
        /// Op name.
        op: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// Result types of `op` applied to operands of types `inputs`.
pub fn infer(_op: &Op, _inputs: &[&TensorType]) -> Result<Vec<TensorType>, InferError> {
    Err(InferError::Attr {
        op: "todo",
        detail: "not implemented".into(),
    })
}
