//! Pipeline parallelism: stage schedules (1F1B, GPipe), their checks and timed simulation.

pub mod schedule;
