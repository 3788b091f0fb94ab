//! Sharding: placements, per-op dimension rules, reshard costs, and propagation.

pub mod placement;

pub use placement::{AxisPl, PartialOp, Placement};
