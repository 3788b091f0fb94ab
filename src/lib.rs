//! tpc: a tensor-parallel compiler. A `.tpl` program is parsed (`syntax`), lowered to the typed
//! IR (`lower`, `ir`), verified, sharded over a `mesh` (`sharding`, `partition`), planned and
//! costed (`plan`), emitted (`emit`), and executed on simulated devices (`exec`).

pub mod auto;
pub mod autodiff;
pub mod cost;
pub mod diag;
pub mod driver;
pub mod emit;
pub mod exec;
pub mod files;
pub mod ir;
pub mod lower;
pub mod mesh;
pub mod partition;
pub mod pipeline;
pub mod plan;
pub mod sharding;
pub mod span;
pub mod syntax;
