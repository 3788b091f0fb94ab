//! tpc: a tensor-parallel compiler. A `.tpl` program is parsed (`syntax`), lowered to the typed
//! IR (`lower`, `ir`), verified, and emitted (`emit`).

pub mod diag;
pub mod driver;
pub mod exec;
pub mod ir;
pub mod lower;
pub mod span;
pub mod syntax;
