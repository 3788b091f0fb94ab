//! Sharding: placements, per-op dimension rules, and propagation.

pub mod placement;
pub mod propagate;
pub mod rules;

pub use placement::{transition, AxisPl, PartialOp, Placement};
pub use propagate::{propagate, ShardError, Sharding, Strategy};
