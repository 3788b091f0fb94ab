//! Local forms of the ops. Most ops run unchanged on their local blocks; a few need rewriting:
//! reshape and broadcast_to (local target shape), mean over a split axis (rescaled partial), the vocab-split
//! embedding (masked lookup) and the vocab-parallel cross-entropy.

use super::reshard::{describe, Step};
use super::{PartitionError, Partitioner, Provenance};
use crate::ir::{BinaryOp, Dtype, Local, NodeId, Op, ReduceOp, RegionId, UnaryOp, ValueId};
use crate::sharding::placement::PlId;
use crate::sharding::{transition, PartialOp, Placement};
use crate::span::Span;

impl Partitioner<'_> {
    /// Emits the local form of node `id` on local operands `ins` (already in placements
    /// `reqs`); the results are in placement `computed`.
    pub(super) fn lower_op(
        &mut self,
        id: NodeId,
        ins: Vec<ValueId<Local>>,
        reqs: &[PlId],
        computed: PlId,
    ) -> Result<Vec<ValueId<Local>>, PartitionError> {
        let node = self.g.node(id);
        let origin = node.outputs.first().copied();
        let (span, region) = (node.span, self.regions[node.region]);
        let op = match &node.op {
            op @ (Op::Reshape { .. } | Op::BroadcastTo { .. } | Op::Fill { .. }) => {
                let ty = self.g.ty(node.outputs[0]);
                let computed = self.table.get(computed);
                let shape = computed.local_shape(ty, self.mesh).ok_or_else(|| {
                    PartitionError::Local(format!(
                        "{} result {ty} does not divide in {}",
                        op.name(),
                        computed.display(self.mesh)
                    ))
                })?;
                match op {
                    Op::Reshape { .. } => Op::Reshape { shape },
                    Op::Fill { value, dtype, .. } => Op::Fill {
                        value: *value,
                        dtype: *dtype,
                        shape,
                    },
                    _ => Op::BroadcastTo { shape },
                }
            }
            Op::Reduce {
                op: ReduceOp::Mean,
                axis,
                keepdims,
            } if self.table.get(reqs[0]).splits(*axis, self.mesh) > 1 => {
                let k = self.table.get(reqs[0]).splits(*axis, self.mesh);
                let m = self.emit(
                    Op::Reduce {
                        op: ReduceOp::Mean,
                        axis: *axis,
                        keepdims: *keepdims,
                    },
                    ins,
                    span,
                    region,
                    computed,
                    origin,
                )?;
                return self.emit(
                    Op::Scalar {
                        op: BinaryOp::Mul,
                        value: 1.0 / k as f64,
                        scalar_lhs: false,
                    },
                    m,
                    span,
                    region,
                    computed,
                    origin,
                );
            }
            Op::Embedding if !self.table.get(reqs[1]).dims[0].is_empty() => Op::VocabEmbedding {
                axes: self.mesh.named_axes(&self.table.get(reqs[1]).dims[0]),
            },
            Op::CrossEntropy => return self.cross_entropy(id, ins, reqs, computed),
            op => op.clone(),
        };
        self.emit(op, ins, span, region, computed, origin)
    }

    /// Mean softmax cross-entropy. With the vocab split: local max, all-reduce(max), local sum
    /// of exp, all-reduce(sum), target logit on the device owning it, all-reduce(sum): three
    /// collectives of the label shape, and the logits never move. With positions split, the
    /// local mean is scaled to a partial sum of the global mean.
    fn cross_entropy(
        &mut self,
        id: NodeId,
        ins: Vec<ValueId<Local>>,
        reqs: &[PlId],
        computed: PlId,
    ) -> Result<Vec<ValueId<Local>>, PartitionError> {
        let node = self.g.node(id);
        let region = self.regions[node.region];
        let (span, origin) = (node.span, node.outputs.first().copied());
        let at = (span, region);
        let logits_id = reqs[0];
        let (logits_pl, labels_pl) = (
            self.table.get(reqs[0]).clone(),
            self.table.get(reqs[1]).clone(),
        );
        let labels_pl = &labels_pl;
        let vaxes = logits_pl.dims.last().cloned().unwrap_or_default();
        let pos_blocks = labels_pl.blocks(self.mesh);
        let (x, y) = (ins[0], ins[1]);
        let mut loss = if vaxes.is_empty() {
            self.emit(Op::CrossEntropy, vec![x, y], span, region, computed, origin)?[0]
        } else {
            // The loss of 16-bit logits is computed in f32, as the unsplit op computes it.
            let x = match self.out.ty(x).dtype {
                Dtype::F32 => x,
                _ => self.emit_at(at, Op::Cast { to: Dtype::F32 }, vec![x], logits_id)?,
            };
            let last = self.out.ty(x).rank() - 1;
            let rows = |partial: Option<PartialOp>, keep: bool| {
                let mut dims = labels_pl.dims.clone();
                if keep {
                    dims.push(Vec::new());
                }
                let mut p = Placement {
                    dims,
                    partial: labels_pl.partial.clone(),
                };
                for &a in &vaxes {
                    p.partial[a] = partial;
                }
                p
            };
            let max_keep = self.intern(rows(Some(PartialOp::Max), true));
            let sum_rows = self.intern(rows(Some(PartialOp::Sum), false));
            let rows_pl = self.intern(rows(None, false));
            let m = self.emit_at(
                at,
                Op::Reduce {
                    op: ReduceOp::Max,
                    axis: last,
                    keepdims: true,
                },
                vec![x],
                max_keep,
            )?;
            let m = self.all_reduce(
                m,
                &vaxes,
                ReduceOp::Max,
                id,
                "max of the logits",
                rows(None, true),
            )?;
            let z = self.emit_at(at, Op::Binary { op: BinaryOp::Sub }, vec![x, m], logits_id)?;
            let e = self.emit_at(at, Op::Unary { op: UnaryOp::Exp }, vec![z], logits_id)?;
            let se = self.emit_at(
                at,
                Op::Reduce {
                    op: ReduceOp::Sum,
                    axis: last,
                    keepdims: false,
                },
                vec![e],
                sum_rows,
            )?;
            let se = self.all_reduce(
                se,
                &vaxes,
                ReduceOp::Sum,
                id,
                "sum of exp",
                rows(None, false),
            )?;
            let t = self.emit_at(
                at,
                Op::TargetLogit {
                    axes: self.mesh.named_axes(&vaxes),
                },
                vec![z, y],
                sum_rows,
            )?;
            let t = self.all_reduce(
                t,
                &vaxes,
                ReduceOp::Sum,
                id,
                "target logit",
                rows(None, false),
            )?;
            let lse = self.emit_at(at, Op::Unary { op: UnaryOp::Log }, vec![se], rows_pl)?;
            let per = self.emit_at(at, Op::Binary { op: BinaryOp::Sub }, vec![lse, t], rows_pl)?;
            let n = self.out.ty(per).numel();
            let flat_pl = Placement {
                dims: vec![labels_pl.dims.concat()],
                partial: labels_pl.partial.clone(),
            };
            let flat_pl = self.intern(flat_pl);
            if self.out.ty(per).rank() == 0 {
                per
            } else {
                let flat = self.emit_at(at, Op::Reshape { shape: vec![n] }, vec![per], flat_pl)?;
                self.emit(
                    Op::Reduce {
                        op: ReduceOp::Mean,
                        axis: 0,
                        keepdims: false,
                    },
                    vec![flat],
                    span,
                    region,
                    computed,
                    origin,
                )?[0]
            }
        };
        if pos_blocks > 1 {
            loss = self.emit(
                Op::Scalar {
                    op: BinaryOp::Mul,
                    value: 1.0 / pos_blocks as f64,
                    scalar_lhs: false,
                },
                vec![loss],
                span,
                region,
                computed,
                origin,
            )?[0];
        }
        Ok(vec![loss])
    }

    /// One op of a decomposition at `at` (span and region), with one result placed `pl`.
    fn emit_at(
        &mut self,
        at: (Span, RegionId<Local>),
        op: Op,
        ins: Vec<ValueId<Local>>,
        pl: PlId,
    ) -> Result<ValueId<Local>, PartitionError> {
        Ok(self.emit(op, ins, at.0, at.1, pl, None)?[0])
    }

    /// All-reduces `v` over each axis of `axes` inside a decomposed op, with provenance.
    fn all_reduce(
        &mut self,
        mut v: ValueId<Local>,
        axes: &[usize],
        reduce: ReduceOp,
        id: NodeId,
        what: &str,
        after: Placement,
    ) -> Result<ValueId<Local>, PartitionError> {
        let node = self.g.node(id);
        let region = self.regions[node.region];
        let mut cur = self.placements[v];
        for &a in axes {
            let op = Op::AllReduce {
                axis: self.mesh.axis_name(a).to_string(),
                size: self.mesh.axis_size(a),
                reduce,
                also: Vec::new(),
            };
            // Each all-reduce clears its own axis; the last one leaves `after`.
            let (_, _, to) = transition(&op).expect("an all-reduce moves one axis");
            let before = self.table.get(cur).clone();
            let next = before.moved(a, to).ok_or_else(|| {
                PartitionError::Local(format!("all-reduce over a split axis {a}"))
            })?;
            let step = Step {
                op: Some(op.clone()),
                axis: a,
                before,
                after: next,
            };
            cur = self.table.intern(&step.after);
            v = self.emit(op, vec![v], node.span, region, cur, None)?[0];
            let logits = node.inputs[0];
            let value = super::describe_value(self.g, logits);
            self.provenance.insert(
                self.out.value(v).node,
                Provenance {
                    transition: describe(&step, self.mesh),
                    user: format!("cross_entropy (vocab-parallel: {what})"),
                    span: node.span,
                    value,
                    members: Vec::new(),
                },
            );
        }
        if *self.table.get(cur) != after {
            return Err(PartitionError::Local(format!(
                "the vocab-parallel {what} ends in {}, not {}",
                self.table.get(cur).display(self.mesh),
                after.display(self.mesh)
            )));
        }
        Ok(v)
    }
}
