//! Pipeline parallelism: a training step whose pipelined `repeat` (`repeat(L, layer, h) @ pp`)
//! is cut into stages along the mesh axis `pp`, each stage a contiguous run of instances on its
//! own devices; the microbatches flow through the stages by a schedule (1F1B or GPipe), with
//! boundary messages between adjacent stages.

pub mod schedule;
pub mod stages;
pub mod summary;

use crate::ir::{Graph, Local};
use crate::mesh::{Device, Mesh};
use crate::plan::micro::{classify, Microbatches};
use schedule::{Action, ScheduleKind};
use serde::{Deserialize, Serialize};
pub use stages::{Crossing, StageError, Transfer, Where};
pub use summary::PipelineSummary;

/// A pipelined plan's stages and schedule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    /// The mesh axis of the stages.
    pub axis: String,
    /// Number of stages.
    pub stages: u32,
    /// Microbatches per step.
    pub microbatches: u32,
    /// The schedule's kind.
    pub schedule: ScheduleKind,
    /// Per stage, its instances of the pipelined block (`start..end`).
    pub instances: Vec<(u32, u32)>,
    /// Per local node, the stage that runs it.
    pub place: Vec<Where>,
    /// Every value read on another stage than the one making it.
    pub transfers: Vec<Transfer>,
    /// Per stage, its actions in order.
    pub actions: Vec<Vec<Action>>,
    /// Costs: bubble, time, memory per stage.
    pub summary: PipelineSummary,
}

/// The pipeline of a plan, or `None` when the program has no pipelined repeat, its axis has
/// size 1, or it is not a training step (a forward program runs every stage's work on every
/// device of the axis).
pub fn plan(
    global: &Graph,
    local: &Graph<Local>,
    mesh: &Mesh,
    device: &Device,
    kind: ScheduleKind,
) -> Result<Option<Pipeline>, StageError> {
    let (Some(spec), Some(stages)) = (global.pipeline(), stage_count(global, mesh)) else {
        return Ok(None);
    };
    if stages <= 1 {
        return Ok(None);
    }
    check_stages(global, mesh)?;
    let stages = stages as u32;
    let parts = parts(local, mesh)?;
    let input = stages::CutInput {
        local,
        parts: &parts,
        instance_paths: spec
            .instances
            .iter()
            .map(|r| global.region(*r).path.clone())
            .collect(),
        stages,
        device,
    };
    let cut = stages::cut(&input)?;
    let mut transfers = stages::transfers(local, &parts, &cut.place)?;
    let runs = summary::runs_on(local, &cut.place);
    transfers.extend(stages::carries(
        local,
        &runs,
        &summary::owners(local, &runs),
    ));
    let microbatches = parts.count as u32;
    let actions = schedule::actions(kind, stages, microbatches)
        .map_err(|e| StageError::Internal(e.to_string()))?;
    let summary = summary::compute(local, &parts, &cut, &transfers, &actions, device)?;
    Ok(Some(Pipeline {
        axis: spec.axis.clone(),
        stages,
        microbatches,
        schedule: kind,
        instances: cut.instances,
        place: cut.place,
        transfers,
        actions,
        summary,
    }))
}

/// For a training step with a pipelined repeat whose axis `mesh` has: the axis's size.
pub fn stage_count(global: &Graph, mesh: &Mesh) -> Option<u64> {
    let axis = mesh.axis_index(&global.pipeline()?.axis)?;
    global.is_training_step().then(|| mesh.axis_size(axis))
}

/// True when `global` is cut into more than one stage on `mesh` (the plans that get a
/// [`Pipeline`]).
pub fn pipelined(global: &Graph, mesh: &Mesh) -> bool {
    stage_count(global, mesh).is_some_and(|n| n > 1)
}

/// An error when the pipeline axis has more stages than the repeat has instances.
pub fn check_stages(global: &Graph, mesh: &Mesh) -> Result<(), StageError> {
    let Some(spec) = global.pipeline() else {
        return Ok(());
    };
    let stages = mesh.axis_index(&spec.axis).map_or(1, |a| mesh.axis_size(a));
    if stages as usize > spec.instances.len() {
        return Err(StageError::TooManyStages {
            axis: spec.axis.clone(),
            stages: stages.min(u64::from(u32::MAX)) as u32,
            block: spec.block.clone(),
            instances: spec.instances.len(),
            span: spec.span,
        });
    }
    Ok(())
}

/// Where each node runs: per microbatch or once per step.
fn parts(local: &Graph<Local>, mesh: &Mesh) -> Result<Microbatches, StageError> {
    let temporal = mesh.temporal().map(|a| (a, mesh));
    classify(local, temporal).map_err(|e| StageError::Internal(e.to_string()))
}
