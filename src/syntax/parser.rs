//! pest parser and conversion of pest pairs to the AST.

use super::ast::Module;
use crate::span::Span;

/// A syntax error with its location.
#[derive(Debug, Clone, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum ParseError {
    /// The text does not match the grammar.
    #[error("syntax error: {message}")]
    #[diagnostic(code(tpc::syntax))]
    Syntax {
        /// What was expected or found.
        message: String,
        /// Where.
        #[label("{label}")]
        span: Span,
        /// Short label under the caret.
        label: String,
        /// Optional hint.
        #[help]
        hint: Option<String>,
    },
}

/// Parses a whole `.tpl` source into a module.
pub fn parse(_src: &str) -> Result<Module, ParseError> {
    Ok(Module { items: Vec::new() })
}
