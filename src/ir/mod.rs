//! The typed IR: entity ids, types, the `Op` enum, the graph, shape inference, verifier, printer.

mod graph;
mod ids;
mod idvec;
pub mod infer;
mod op;
mod train;
mod types;
pub mod verify;

pub use graph::{
    Annotation, Graph, GraphParts, Node, Output, Phase, Pin, PinState, PipelineSpec, Region, Value,
};
pub use ids::{EntityId, Global, Local, NodeId, RegionId, Space, ValueId};
pub use idvec::IdVec;
pub use op::{BinaryOp, Op, ReduceOp, StateInit, UnaryOp};
pub use train::{
    growth_interval, LossScale, Optimizer, Training, DYNAMIC_INTERVAL, DYNAMIC_START, MAX_INTERVAL,
};
pub use types::{Dtype, Spec, TensorType, MAX_PROGRAM_BYTES};
