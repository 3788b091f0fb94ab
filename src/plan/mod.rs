//! The per-device plan: the SPMD program, its placements and provenance, buffer liveness, and a
//! cost summary (collectives, FLOPs, peak memory, estimated step time).

pub mod bucket;
pub mod liveness;
pub mod merge;
pub mod micro;
pub mod overflow;
pub mod remat;
pub mod rows;
pub mod summary;
pub mod verify;
pub mod zero;

pub use summary::{KindSummary, Summary};

use crate::ir::verify::{verify, VerifyError};
use crate::ir::{Graph, IdVec, Local, NodeId, Space, ValueId};
use crate::mesh::{Device, Mesh};
use crate::partition::{partition, PartitionError, Provenance};
use crate::pipeline::schedule::ScheduleKind;
use crate::pipeline::{Pipeline, StageError};
use crate::sharding::{propagate, Placement, ShardError};
use std::collections::BTreeMap;

/// A compiled per-device plan. Its two programs have distinct id types, so a table of one is
/// never indexed by an id of the other:
///
/// ```compile_fail
/// fn placement_of_a_global_value(p: &tpc::plan::Plan) {
///     let v = p.global.outputs()[0].value;
///     let _ = &p.placements[v]; // placements are per local value
/// }
/// ```
#[derive(Clone, Debug)]
pub struct Plan {
    /// The mesh the plan runs on.
    pub mesh: Mesh,
    /// The device constants the cost model used.
    pub device: Device,
    /// The global program (what the unsharded reference runs).
    pub global: Graph,
    /// The SPMD program every device runs, on local shapes.
    pub local: Graph<Local>,
    /// Per local value, its placement.
    pub placements: IdVec<ValueId<Local>, Placement>,
    /// Per local value, the global value it holds a piece of.
    pub origin: IdVec<ValueId<Local>, Option<ValueId>>,
    /// Why each collective is there.
    pub provenance: BTreeMap<NodeId<Local>, Provenance>,
    /// Costs and counts.
    pub summary: Summary,
    /// With a pipelined repeat: the stages, their schedule and its costs.
    pub pipeline: Option<Pipeline>,
}

/// Why a plan could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// A user error in the annotations (e.g. a split that does not divide).
    #[error(transparent)]
    Shard(#[from] ShardError),
    /// A compiler bug in partitioning.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// A compiler bug caught by the verifier.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// A program that cannot be split into the microbatches asked for.
    #[error(transparent)]
    Micro(#[from] micro::MicroError),
    /// ZeRO asked of a program it cannot apply to.
    #[error(transparent)]
    Zero(#[from] zero::ZeroError),
    /// A pipeline that cannot be cut as asked.
    #[error(transparent)]
    Stage(#[from] StageError),
    /// A compiler bug caught by the plan verifier (the local program does not compute the
    /// global one).
    #[error("internal compiler error (plan verifier, after partition): {0}")]
    PlanVerify(Box<verify::PlanVerifyError>),
    /// A recompute policy the program cannot take.
    #[error(transparent)]
    Recompute(#[from] remat::RematError),
}

impl From<verify::PlanVerifyError> for PlanError {
    fn from(e: verify::PlanVerifyError) -> Self {
        PlanError::PlanVerify(Box::new(e))
    }
}

impl Plan {
    /// Propagates placements over `mesh`, partitions, verifies and costs `global`. Mesh axes
    /// the program declares but `mesh` lacks are added with size 1 (they split nothing).
    pub fn build(global: Graph, mesh: Mesh, device: Device) -> Result<Plan, PlanError> {
        Plan::build_with(global, mesh, device, &Options::default())
    }

    /// [`Plan::build`] with the batch split into microbatches run one after another (their
    /// gradients accumulated) and, for a pipelined program, the stages' schedule.
    pub fn build_with(
        global: Graph,
        mesh: Mesh,
        device: Device,
        options: &Options,
    ) -> Result<Plan, PlanError> {
        Plan::build_checked(global, mesh, device, options, true)
    }

    /// [`Plan::build_with`] with the verifiers after each pass run only when `checks` (a search
    /// plans many candidates, then builds its choice with every check).
    pub fn build_checked(
        global: Graph,
        mesh: Mesh,
        device: Device,
        options: &Options,
        checks: bool,
    ) -> Result<Plan, PlanError> {
        let mesh = mesh.with_declared(&global.mesh_axes);
        crate::pipeline::check_stages(&global, &mesh)?;
        remat::check(&global, &mesh, options.recompute)?;
        let global = rows::split_row_sums(global, device.sequence_parallel);
        check(checks, &global, "rows")?;
        let microbatches = options
            .microbatches
            .unwrap_or_else(|| default_microbatches(&global, &mesh));
        let (global, mesh) = match microbatches {
            0 | 1 => (global, mesh),
            m => (
                micro::annotate(&global, &mesh, m).map_err(|e| match e {
                    micro::MicroError::Indivisible { .. } if options.microbatches.is_none() => {
                        e.defaulted()
                    }
                    e => e,
                })?,
                mesh.with_microbatches(m).map_err(micro::MicroError::from)?,
            ),
        };
        let (global, zero) = match options.zero {
            0 => (global, None),
            stage => {
                let (g, z) = zero::annotate(&global, &mesh, &device, stage)?;
                (g, Some(z))
            }
        };
        let sh = match zero {
            Some(_) => propagate(&global, &mesh, &zero::propagation_device(&device))?,
            None => propagate(&global, &mesh, &device)?,
        };
        let part = partition(&global, &sh)?;
        check(checks, &part.local, "partition")?;
        let part = merge::merge(part, &mesh);
        check(checks, &part.local, "merge")?;
        let part = overflow::whole_mesh(part, &global, &mesh);
        check(checks, &part.local, "overflow")?;
        let temporal = mesh.temporal().map(|a| mesh.axis_name(a).to_string());
        // A bucket would join gradients of different pipeline stages into one message.
        let cap = match crate::pipeline::pipelined(&global, &mesh) {
            true => 0,
            false => device.bucket_bytes,
        };
        let part = bucket::fuse(part, cap, temporal.as_deref());
        check(checks, &part.local, "bucket")?;
        let recompute = options.recompute != remat::Recompute::None;
        let before = recompute.then(|| summary::activation_bytes(&part.local));
        let (part, clones) = remat::recompute(part, options.recompute);
        check(checks, &part.local, "recompute")?;
        micro::split(&part.local, &mesh)?;
        if checks {
            verify::verify(verify::PlanParts {
                global: &global,
                local: &part.local,
                mesh: &mesh,
                placements: &part.placements,
                origin: &part.origin,
            })?;
        }
        let mut summary = Summary::compute(&part.local, &mesh, &device);
        if let Some(before) = before.filter(|_| part.local.is_training_step()) {
            let r = remat::summarize(&part.local, &clones, &mesh, &device, options.recompute);
            summary.recompute = Some(r.with_before(before));
        }
        let pipeline =
            crate::pipeline::plan(&global, &part.local, &mesh, &device, options.schedule)?;
        summary.pipeline = pipeline.as_ref().map(|p| p.summary.clone());
        if let Some(z) = zero {
            summary.set_zero(&part.local, z);
        }
        Ok(Plan {
            mesh,
            device,
            global,
            local: part.local,
            placements: part.placements,
            origin: part.origin,
            provenance: part.provenance,
            summary,
            pipeline,
        })
    }

    /// For each local value, the index of the last node reading it (`num_nodes` for outputs,
    /// which stay live to the end); `None` when never read.
    pub fn last_uses(&self) -> IdVec<ValueId<Local>, Option<usize>> {
        last_uses(&self.local)
    }
}

/// The IR verifier on `g` after `stage`, when `on`.
fn check<S: Space>(on: bool, g: &Graph<S>, stage: &'static str) -> Result<(), VerifyError> {
    match on {
        true => verify(g, stage),
        false => Ok(()),
    }
}

/// Planner options beyond the mesh and the cost model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    /// Microbatches per step (`None`: the pipeline axis's size for a pipelined training step,
    /// else 1).
    pub microbatches: Option<u64>,
    /// The pipeline schedule.
    pub schedule: ScheduleKind,
    /// Which forward values the backward recomputes instead of keeping.
    pub recompute: remat::Recompute,
    /// ZeRO stage over the `dp` axis (0: plain data parallelism).
    pub zero: u8,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            microbatches: Some(1),
            schedule: ScheduleKind::OneFOneB,
            recompute: remat::Recompute::None,
            zero: 0,
        }
    }
}

/// As many microbatches as pipeline stages (each stage busy in the steady state), for a
/// pipelined training step; else 1.
fn default_microbatches(global: &Graph, mesh: &Mesh) -> u64 {
    crate::pipeline::stage_count(global, mesh).unwrap_or(1)
}

/// Last reading node of each value of `g` (outputs count as read at the end): the
/// [`liveness::Liveness`] convention.
pub fn last_uses<S: Space>(g: &Graph<S>) -> IdVec<ValueId<S>, Option<usize>> {
    liveness::Liveness::of(g).into_table()
}
