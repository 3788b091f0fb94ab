//! Run-time errors of the kernels and interpreters. Bad data is reported, never panicked on.

use crate::ir::TensorType;

/// Why an execution failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExecError {
    /// A `Param` leaf with no tensor supplied.
    #[error("missing param `{0}`")]
    MissingParam(String),
    /// An `Input` leaf with no tensor supplied.
    #[error("missing input `{0}`")]
    MissingInput(String),
    /// A supplied leaf whose storage kind or shape differs from its declared type.
    #[error("{what}: expected {expected}, got {got}")]
    WrongType {
        /// Which leaf (`param \`wq\``).
        what: String,
        /// The declared type.
        expected: TensorType,
        /// The supplied storage kind and shape (`f32[2,3]`).
        got: String,
    },
    /// Wrong number of operands for an op.
    #[error("{op} takes {expected} operand(s), got {got}")]
    Arity {
        /// Op name.
        op: &'static str,
        /// Accepted count.
        expected: &'static str,
        /// Given count.
        got: usize,
    },
    /// An operand of the wrong storage kind.
    #[error("{op}: operand {index} must be {expected}, got {got}")]
    Dtype {
        /// Op name.
        op: &'static str,
        /// Operand position.
        index: usize,
        /// Wanted kind (`f32`, `i32`).
        expected: &'static str,
        /// Given kind.
        got: &'static str,
    },
    /// Operand shapes or attributes that do not fit together.
    #[error("{op}: {detail}")]
    Shape {
        /// Op name.
        op: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// An embedding id outside `[0, vocab)`.
    #[error("embedding: id {id} at flat position {position} is out of range [0, {vocab})")]
    IdOutOfRange {
        /// The id.
        id: i64,
        /// Flat (row-major) position in the ids tensor.
        position: usize,
        /// Number of table rows.
        vocab: usize,
    },
    /// A cross-entropy label outside `[0, classes)`.
    #[error(
        "cross_entropy: label {label} at flat position {position} is out of range [0, {classes})"
    )]
    LabelOutOfRange {
        /// The label.
        label: i64,
        /// Flat (row-major) position in the labels tensor.
        position: usize,
        /// Size of the logits' last dim.
        classes: usize,
    },
    /// `max` over an axis of size 0 (no identity, as in numpy).
    #[error("{op}: reduction over an empty axis has no identity")]
    EmptyReduction {
        /// Op name.
        op: &'static str,
    },
    /// A leaf op (`input`, `param`) given to `apply`.
    #[error("{0} is a leaf op and cannot be applied")]
    Leaf(&'static str),
    /// A checkpoint that cannot be read as the program needs.
    #[error(transparent)]
    Checkpoint(Box<super::checkpoint::CheckpointError>),
    /// The graph is inconsistent with what the kernels produced (a compiler or kernel bug).
    #[error("internal error at {node}: {detail}")]
    Internal {
        /// The node (`n7 matmul`).
        node: String,
        /// What went wrong.
        detail: String,
    },
}

impl From<super::checkpoint::CheckpointError> for ExecError {
    fn from(e: super::checkpoint::CheckpointError) -> Self {
        ExecError::Checkpoint(Box::new(e))
    }
}

impl ExecError {
    /// A `Shape` error.
    pub fn shape(op: &'static str, detail: impl Into<String>) -> Self {
        ExecError::Shape {
            op,
            detail: detail.into(),
        }
    }
}
