//! One step of a rank, microbatch by microbatch: each microbatch's part of the program runs on
//! that microbatch's inputs (the rank's temporal coordinate set to it), its partial gradients
//! and loss are summed into accumulators in microbatch order, and then the step's part (the
//! data-parallel reductions, the update) runs once on the sums.

use super::core::{self, Outcome, Part};
use super::spmd::{Rank, RunError};
use super::{ExecError, Tensor};
use crate::ir::{Graph, IdVec, Local, Node, NodeId, ValueId};
use crate::plan::liveness::Liveness;
use crate::plan::micro::{split, Microbatches};
use crate::plan::Plan;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// The plan's microbatches, or `None` when it runs the whole batch at once.
pub(crate) fn microbatches(plan: &Plan) -> Result<Option<Microbatches>, ExecError> {
    split(&plan.local, &plan.mesh).map_err(|e| ExecError::Internal {
        node: "microbatches".into(),
        detail: e.to_string(),
    })
}

/// This rank's input blocks of microbatches 1.. (microbatch 0's are loaded with the other
/// leaves), each loaded by `load` at the rank's coordinates with that microbatch's.
pub(crate) fn later_inputs(
    plan: &Plan,
    rank: usize,
    load: impl Fn(&[u64], usize) -> Result<BTreeMap<ValueId<Local>, Tensor>, RunError>,
) -> Result<Vec<BTreeMap<ValueId<Local>, Tensor>>, RunError> {
    let Some(a) = plan.mesh.temporal() else {
        return Ok(Vec::new());
    };
    let mut coords = plan.mesh.coords(rank as u64);
    (1..plan.mesh.axis_size(a))
        .map(|m| {
            coords[a] = m;
            load(&coords, rank)
        })
        .collect()
}

/// Runs one step of the plan on rank `r` (whole, or by `micro`'s microbatches): `blocks` holds
/// its params, state and microbatch 0's inputs, `later[m - 1]` microbatch m's inputs.
pub(crate) fn run_step(
    micro: Option<&Microbatches>,
    live: &Liveness<Local>,
    blocks: &BTreeMap<ValueId<Local>, Tensor>,
    later: &[BTreeMap<ValueId<Local>, Tensor>],
    r: &mut Rank<'_>,
) -> Result<Outcome, RunError> {
    let plan = r.plan();
    let g = &plan.local;
    let table = |m: usize| leaf_table(g, blocks, later, m);
    let Some(mb) = micro else {
        return core::run(g, live, &table(0), r).map_err(|(id, e)| r.op_error(id, e));
    };
    r.acc.clear();
    let mut peak = 0;
    for m in 0..mb.count as usize {
        r.coords[mb.axis] = m as u64;
        let mut slots = core::empty_slots(g);
        let part = |id: NodeId<Local>| match (mb.accumulate[id.index()], mb.step[id.index()]) {
            (true, _) => Part::Absorb,
            (false, true) => Part::Skip,
            (false, false) => Part::Run,
        };
        let p = core::run_nodes(g, live, &table(m), &mut slots, r, &part)
            .map_err(|(id, e)| r.op_error(id, e).within(&format!("microbatch {m}")))?;
        let held: u64 = r.acc.values().map(core::bytes).sum();
        peak = peak.max(p + held);
        slots
            .into_vec()
            .into_iter()
            .flatten()
            .for_each(super::kernels::recycle);
    }
    r.coords[mb.axis] = 0;
    let mut slots = core::empty_slots(g);
    for (v, t) in std::mem::take(&mut r.acc) {
        slots[v] = Some(t);
    }
    let leaves = table(0);
    let part = |id: NodeId<Local>| {
        let i = id.index();
        match (mb.step[i] && !mb.accumulate[i]) || mb.again[i] {
            true => Part::Run,
            false => Part::Skip,
        }
    };
    let p = core::run_nodes(g, live, &leaves, &mut slots, r, &part)
        .map_err(|(id, e)| r.op_error(id, e))?;
    let outputs = core::outputs(g, &leaves, &mut slots).map_err(|(id, e)| r.op_error(id, e))?;
    slots
        .into_vec()
        .into_iter()
        .flatten()
        .for_each(super::kernels::recycle);
    Ok(Outcome {
        outputs,
        peak_bytes: peak.max(p),
    })
}

/// The leaf table of microbatch `m`: `blocks` (params, state, microbatch 0's inputs) with
/// microbatch m's inputs `later[m - 1]` over them.
pub(crate) fn leaf_table<'t>(
    g: &Graph<Local>,
    blocks: &'t BTreeMap<ValueId<Local>, Tensor>,
    later: &'t [BTreeMap<ValueId<Local>, Tensor>],
    m: usize,
) -> IdVec<ValueId<Local>, Option<&'t Tensor>> {
    let mut leaves = IdVec::filled(g.num_values(), None);
    let extra = m.checked_sub(1).and_then(|k| later.get(k));
    for (v, t) in blocks.iter().chain(extra.into_iter().flatten()) {
        leaves[*v] = Some(t);
    }
    leaves
}

/// Adds the operand of accumulation `node` into its accumulator (the first microbatch's is
/// taken as it is).
pub(crate) fn accumulate(
    acc: &mut BTreeMap<ValueId<Local>, Tensor>,
    node: &Node<Local>,
    args: Vec<Cow<'_, Tensor>>,
) -> Result<(), ExecError> {
    let (Some(&out), [x]) = (node.outputs.first(), args.as_slice()) else {
        return Err(ExecError::Internal {
            node: node.op.name().into(),
            detail: "an accumulation of other than one operand".into(),
        });
    };
    let Some(sum) = acc.get_mut(&out) else {
        acc.insert(out, x.clone().into_owned());
        return Ok(());
    };
    match (sum, x.as_ref()) {
        (Tensor::F32(s), Tensor::F32(x)) if s.shape() == x.shape() => *s += x,
        (Tensor::I32(s), Tensor::I32(x)) if s.shape() == x.shape() => {
            s.zip_mut_with(x, |a, b| *a = a.wrapping_add(*b))
        }
        (s, x) => {
            return Err(ExecError::Internal {
                node: node.op.name().into(),
                detail: format!("accumulating {} into {}", x.describe(), s.describe()),
            })
        }
    }
    Ok(())
}
