//! Front end: `grammar/tpl.pest` to the AST. Only this module knows pest.

pub mod ast;
mod parser;

pub use parser::{parse, ParseError};
