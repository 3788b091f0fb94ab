//! `reshard`: the one place that chooses collectives. It moves a local value from one placement
//! to another, axis by axis, in an order that never moves more than it must: reduce-scatters and
//! local slices first (they shrink), then all-to-alls, then all-reduces, then all-gathers (they
//! grow). A dim split by several axes is only changed at its minor end, so every step keeps
//! each device's block contiguous.

use crate::ir::{Op, ReduceOp};
use crate::mesh::Mesh;
use crate::sharding::{transition, AxisPl, PartialOp, Placement};

mod direct;

/// One step of a reshard: the op to emit (`None` for a relabelling without data movement) and
/// the placement after it.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    /// The SPMD op, or `None`.
    pub op: Option<Op>,
    /// The mesh axis the step runs on.
    pub axis: usize,
    /// Placement before the step.
    pub before: Placement,
    /// Placement after the step.
    pub after: Placement,
}

/// A reshard that does not reach its target: a compiler bug (or placements that are not well
/// formed), reported with the placements it was asked to connect and where it stopped.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error(
    "reshard from {} to {} does not converge (stuck at {})",
    .from.display(.mesh),
    .to.display(.mesh),
    .stuck.display(.mesh)
)]
pub struct ReshardError {
    /// The mesh the placements are on.
    pub mesh: Mesh,
    /// The placement the value is in.
    pub from: Placement,
    /// The placement asked for.
    pub to: Placement,
    /// The placement where no further step applies (or the step limit ran out).
    pub stuck: Placement,
}

/// The steps moving a tensor from `from` to `to` (empty when equal): the direct move when it
/// applies and sends fewer bytes, else the axis-by-axis path; an error when no sequence of
/// steps reaches `to`.
pub fn plan_reshard(
    from: &Placement,
    to: &Placement,
    mesh: &Mesh,
) -> Result<Vec<Step>, Box<ReshardError>> {
    let steps = stepwise(from, to, mesh)?;
    match direct::step(from, to, mesh) {
        Some(d) if direct::sent(std::slice::from_ref(&d), mesh) < direct::sent(&steps, mesh) => {
            Ok(vec![d])
        }
        _ => Ok(steps),
    }
}

/// The axis-by-axis path from `from` to `to`, one mesh axis per step.
fn stepwise(from: &Placement, to: &Placement, mesh: &Mesh) -> Result<Vec<Step>, Box<ReshardError>> {
    let mut cur = from.clone();
    let mut steps = Vec::new();
    let limit = 4 * (mesh.rank() + from.dims.len()) + 4;
    while cur != *to {
        let step = (steps.len() < limit)
            .then(|| next_step(&cur, to, mesh))
            .flatten()
            .ok_or_else(|| {
                Box::new(ReshardError {
                    mesh: mesh.clone(),
                    from: from.clone(),
                    to: to.clone(),
                    stuck: cur.clone(),
                })
            })?;
        cur = step.after.clone();
        steps.push(step);
    }
    Ok(steps)
}

fn reduce_of(op: PartialOp) -> ReduceOp {
    match op {
        PartialOp::Sum => ReduceOp::Sum,
        PartialOp::Max => ReduceOp::Max,
    }
}

/// True when `cur` followed by `a` is a prefix of `target`.
fn extends(cur: &[usize], a: usize, target: &[usize]) -> bool {
    target.len() > cur.len() && target[..cur.len()] == *cur && target[cur.len()] == a
}

/// The next step from `cur` towards `to`, `None` when none applies. Each step's placement
/// after is the op's own transition (`sharding::transition`) applied by `Placement::moved`.
fn next_step(cur: &Placement, to: &Placement, mesh: &Mesh) -> Option<Step> {
    let name = |a: usize| mesh.axis_name(a).to_string();
    let size = |a: usize| mesh.axis_size(a);
    let mk = |op: Op, a: usize| {
        let (_, _, to) = transition(&op)?;
        Some(Step {
            after: cur.moved(a, to)?,
            op: Some(op),
            axis: a,
            before: cur.clone(),
        })
    };
    let axes = 0..mesh.rank();
    // 1. Partial -> Shard: reduce-scatter.
    for a in axes.clone() {
        if let (AxisPl::Partial(p), AxisPl::Shard(d)) = (cur.axis(a), to.axis(a)) {
            if extends(&cur.dims[d], a, &to.dims[d]) {
                return mk(
                    Op::ReduceScatter {
                        axis: name(a),
                        size: size(a),
                        dim: d,
                        reduce: reduce_of(p),
                    },
                    a,
                );
            }
        }
    }
    // 2. Replicate -> Shard: local slice; Replicate -> Partial: keep on the first device.
    for a in axes.clone() {
        match (cur.axis(a), to.axis(a)) {
            (AxisPl::Replicate, AxisPl::Shard(d)) if extends(&cur.dims[d], a, &to.dims[d]) => {
                return mk(
                    Op::ShardSlice {
                        axis: name(a),
                        size: size(a),
                        dim: d,
                    },
                    a,
                );
            }
            (AxisPl::Replicate, AxisPl::Partial(PartialOp::Sum)) => {
                return mk(Op::KeepOnFirst { axis: name(a) }, a);
            }
            // Every device's copy is a valid max term: a relabelling, no data moves.
            (AxisPl::Replicate, AxisPl::Partial(p)) => {
                return Some(Step {
                    op: None,
                    axis: a,
                    before: cur.clone(),
                    after: cur.moved(a, AxisPl::Partial(p))?,
                });
            }
            _ => {}
        }
    }
    // 3. Shard(i) -> Shard(j): all-to-all, when the axis is the minor one of dim i.
    for a in axes.clone() {
        if let (AxisPl::Shard(i), AxisPl::Shard(j)) = (cur.axis(a), to.axis(a)) {
            if i != j && cur.dims[i].last() == Some(&a) && extends(&cur.dims[j], a, &to.dims[j]) {
                return mk(
                    Op::AllToAll {
                        axis: name(a),
                        size: size(a),
                        split: j,
                        concat: i,
                    },
                    a,
                );
            }
        }
    }
    // 4. Partial -> anything else: all-reduce.
    for a in axes.clone() {
        if let AxisPl::Partial(p) = cur.axis(a) {
            if to.axis(a) != AxisPl::Partial(p) {
                return mk(
                    Op::AllReduce {
                        axis: name(a),
                        size: size(a),
                        reduce: reduce_of(p),
                        also: Vec::new(),
                    },
                    a,
                );
            }
        }
    }
    // 5. All-gather the minor axis of a dim whose split is not a prefix of the target's.
    for (d, axs) in cur.dims.iter().enumerate() {
        let ok = to.dims[d].len() >= axs.len() && to.dims[d][..axs.len()] == axs[..];
        if let (false, Some(&a)) = (ok, axs.last()) {
            return mk(
                Op::AllGather {
                    axis: name(a),
                    size: size(a),
                    dim: d,
                },
                a,
            );
        }
    }
    None
}

/// Describes a step's transition for provenance: `Partial(sum) -> Replicate over tp`.
pub fn describe(step: &Step, mesh: &Mesh) -> String {
    if let Some(Op::Redistribute { axes, .. }) = &step.op {
        let names: Vec<&str> = axes.iter().map(|(a, _)| a.as_str()).collect();
        return format!(
            "{} -> {} over ({})",
            step.before.display(mesh),
            step.after.display(mesh),
            names.join(",")
        );
    }
    format!(
        "{} -> {} over {}",
        step.before.axis(step.axis),
        step.after.axis(step.axis),
        mesh.axis_name(step.axis)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pl(rank: usize, states: &[AxisPl]) -> Placement {
        Placement::from_axes(rank, states)
    }

    fn kinds(steps: &[Step]) -> Vec<&'static str> {
        steps
            .iter()
            .map(|s| s.op.as_ref().map(|o| o.name()).unwrap_or("relabel"))
            .collect()
    }

    use AxisPl::{Partial, Replicate as R, Shard as S};
    const P: AxisPl = Partial(PartialOp::Sum);
    const PMAX: AxisPl = Partial(PartialOp::Max);

    #[test]
    fn every_transition_on_a_1d_mesh() {
        let m = Mesh::parse("tp=4").unwrap();
        let table: &[(AxisPl, AxisPl, &[&str])] = &[
            (P, R, &["all_reduce"]),
            (P, S(1), &["reduce_scatter"]),
            (S(0), R, &["all_gather"]),
            (S(0), S(1), &["all_to_all"]),
            (R, S(1), &["shard_slice"]),
            (R, P, &["keep_on_first"]),
            (R, PMAX, &["relabel"]),
            (S(0), P, &["all_gather", "keep_on_first"]),
            (PMAX, P, &["all_reduce", "keep_on_first"]),
            (R, R, &[]),
            (S(1), S(1), &[]),
        ];
        for (from, to, want) in table {
            let steps = plan_reshard(&pl(2, &[*from]), &pl(2, &[*to]), &m).unwrap();
            assert_eq!(kinds(&steps), *want, "{from} -> {to}");
            assert_eq!(
                steps
                    .last()
                    .map(|s| s.after.clone())
                    .unwrap_or(pl(2, &[*from])),
                pl(2, &[*to])
            );
        }
    }

    #[test]
    fn transitions_on_a_2d_mesh() {
        let m = Mesh::parse("dp=2,tp=4").unwrap();
        let table: &[(&[AxisPl], &[AxisPl], &[&str])] = &[
            (&[S(0), P], &[S(0), R], &["all_reduce"]),
            (&[P, P], &[R, R], &["all_reduce", "all_reduce"]),
            (&[R, P], &[S(0), S(1)], &["reduce_scatter", "shard_slice"]),
            (&[S(0), S(0)], &[R, R], &["all_gather", "all_gather"]),
            (&[S(0), S(0)], &[S(0), R], &["all_gather"]),
            (&[S(0), S(1)], &[S(1), S(0)], &["redistribute"]),
            (&[R, R], &[S(0), S(0)], &["shard_slice", "shard_slice"]),
            (&[S(1), R], &[S(0), S(1)], &["all_to_all", "shard_slice"]),
        ];
        for (from, to, want) in table {
            let (f, t) = (pl(2, from), pl(2, to));
            let steps = plan_reshard(&f, &t, &m).unwrap();
            assert_eq!(kinds(&steps), *want, "{from:?} -> {to:?}");
            assert_eq!(steps.last().unwrap().after, t);
        }
    }

    #[test]
    fn order_of_axes_on_one_dim_is_respected() {
        let m = Mesh::parse("dp=2,tp=4").unwrap();
        let from = Placement {
            dims: vec![vec![0, 1], vec![]],
            partial: vec![None, None],
        };
        let to = Placement {
            dims: vec![vec![1, 0], vec![]],
            partial: vec![None, None],
        };
        let steps = plan_reshard(&from, &to, &m).unwrap();
        assert_eq!(kinds(&steps), ["redistribute"]);
        assert_eq!(steps.last().unwrap().after, to);
    }

    /// Per dim, the mesh axes splitting it.
    type Split<'a> = &'a [&'a [usize]];

    fn dims(d: &[&[usize]], axes: usize) -> Placement {
        Placement {
            dims: d.iter().map(|x| x.to_vec()).collect(),
            partial: vec![None; axes],
        }
    }

    #[test]
    fn several_axes_move_in_one_exchange_when_it_sends_less() {
        let m = Mesh::parse("dp=2,tp=4").unwrap();
        let cases: &[(Split, Split)] = &[
            (&[&[0], &[1]], &[&[1], &[0]]),
            (&[&[0, 1], &[]], &[&[], &[0, 1]]),
            (&[&[0, 1], &[]], &[&[1, 0], &[]]),
            (&[&[1], &[0]], &[&[], &[1, 0]]),
        ];
        for (f, t) in cases {
            let (from, to) = (dims(f, 2), dims(t, 2));
            let steps = plan_reshard(&from, &to, &m).unwrap();
            assert_eq!(kinds(&steps), ["redistribute"], "{from:?} -> {to:?}");
            let old = stepwise(&from, &to, &m).unwrap();
            assert!(
                direct::sent(&steps, &m) < direct::sent(&old, &m),
                "{from:?} -> {to:?}: {} vs {}",
                direct::sent(&steps, &m),
                direct::sent(&old, &m)
            );
            assert!(describe(&steps[0], &m).ends_with("over (dp,tp)"));
        }
    }

    #[test]
    fn a_kept_major_axis_stays_out_of_the_group() {
        let m = Mesh::parse("dp=2,pp=2,tp=2").unwrap();
        // dp keeps splitting dim 0 (major); pp and tp trade dims under it.
        let from = dims(&[&[0, 1], &[2]], 3);
        let to = dims(&[&[0, 2], &[1]], 3);
        let steps = plan_reshard(&from, &to, &m).unwrap();
        assert_eq!(kinds(&steps), ["redistribute"]);
        let Some(Op::Redistribute {
            axes,
            from: f,
            to: t,
        }) = &steps[0].op
        else {
            panic!("{steps:?}")
        };
        let names: Vec<&str> = axes.iter().map(|(a, _)| a.as_str()).collect();
        assert_eq!(names, ["pp", "tp"]);
        assert_eq!(
            (f.clone(), t.clone()),
            (vec![vec![0], vec![1]], vec![vec![1], vec![0]])
        );
    }

    #[test]
    fn partial_or_gathered_moves_keep_the_axis_by_axis_path() {
        let m = Mesh::parse("dp=2,tp=4").unwrap();
        // One axis only: the all-to-all is already direct.
        let steps = plan_reshard(&pl(2, &[S(0), R]), &pl(2, &[S(1), R]), &m).unwrap();
        assert_eq!(kinds(&steps), ["all_to_all"]);
        // A gather to Replicate is not a shard-to-shard move.
        let steps = plan_reshard(&pl(2, &[S(0), S(1)]), &pl(2, &[R, S(0)]), &m).unwrap();
        assert!(
            !kinds(&steps).contains(&"redistribute"),
            "{:?}",
            kinds(&steps)
        );
        // Partial states differ: reduce first.
        let steps = plan_reshard(&pl(2, &[S(0), P]), &pl(2, &[S(1), S(0)]), &m).unwrap();
        assert!(
            !kinds(&steps).contains(&"redistribute"),
            "{:?}",
            kinds(&steps)
        );
    }

    #[test]
    fn a_target_that_cannot_be_reached_is_an_error() {
        let m = Mesh::parse("dp=2,tp=4").unwrap();
        let from = Placement::replicated(2, 2);
        // Axis dp splitting two dims: no sequence of steps reaches it.
        let to = Placement {
            dims: vec![vec![0], vec![0]],
            partial: vec![None, None],
        };
        let err = plan_reshard(&from, &to, &m).unwrap_err();
        assert_eq!(err.from, from);
        assert_eq!(err.to, to);
        assert_eq!(err.stuck.dims, vec![vec![0], vec![]]);
        assert_eq!(
            err.to_string(),
            "reshard from [_, _] to [dp, dp] does not converge (stuck at [dp, _])"
        );
        // Every step keeps its contract: it starts where the previous one ended and moves one
        // axis as its op says.
        let to = Placement {
            dims: vec![vec![1, 0], vec![]],
            partial: vec![None, None],
        };
        let steps = plan_reshard(&pl(2, &[S(1), P]), &to, &m).unwrap();
        let mut cur = pl(2, &[S(1), P]);
        for s in &steps {
            assert_eq!(s.before, cur);
            if let Some((_, from, to)) = s.op.as_ref().and_then(transition) {
                assert_eq!(s.before.axis(s.axis), from);
                assert_eq!(s.after.axis(s.axis), to);
            }
            cur = s.after.clone();
        }
        assert_eq!(cur, to);
    }
}
