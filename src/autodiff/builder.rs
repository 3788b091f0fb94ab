//! Appends backward ops to the graph: each op's result types are inferred as lowering does, and
//! each node goes into the backward instance of the forward node being differentiated.

use super::AutodiffError;
use crate::ir::infer::infer;
use crate::ir::{BinaryOp, Graph, Op, Phase, ReduceOp, RegionId, TensorType, UnaryOp, ValueId};
use crate::span::Span;
use std::collections::HashMap;

/// The graph under construction and where its next node goes.
pub(super) struct Builder {
    g: Graph,
    /// Forward region -> its backward instance.
    backward: HashMap<RegionId, RegionId>,
    /// Backward bodies are numbered after every forward body.
    body_offset: u32,
    region: RegionId,
    span: Span,
    /// The forward op being differentiated, for error messages.
    of: String,
    /// The update's region, once made.
    update: Option<RegionId>,
}

type R<T> = Result<T, AutodiffError>;

impl Builder {
    /// Starts from the forward graph.
    pub(super) fn new(g: Graph) -> Self {
        let body_offset = g.regions().map(|(_, r)| r.body).max().unwrap_or(0) + 1;
        let root = g.root();
        Builder {
            g,
            backward: HashMap::new(),
            body_offset,
            region: root,
            span: Span::default(),
            of: String::new(),
            update: None,
        }
    }

    /// The finished graph.
    pub(super) fn into_graph(self) -> Graph {
        self.g
    }

    /// The type of `v`.
    pub(super) fn ty(&self, v: ValueId) -> &TensorType {
        self.g.ty(v)
    }

    /// Next nodes differentiate `op` in forward region `region`, written at `span`.
    pub(super) fn at(&mut self, region: RegionId, span: Span, op: &Op) {
        self.region = self.backward_of(region);
        self.span = span;
        self.of = op.to_string();
    }

    /// The backward instance of forward region `r` (the root is its own).
    /// The backward instance of forward region `r`; the root's ops get one too (`backward`), so
    /// every backward node is in a region marked backward.
    fn backward_of(&mut self, r: RegionId) -> RegionId {
        if let Some(&b) = self.backward.get(&r) {
            return b;
        }
        let fwd = self.g.region(r).clone();
        let (path, block, parent) = match fwd.parent {
            Some(p) => (
                format!("{}/backward", fwd.path),
                fwd.block,
                self.backward_of(p),
            ),
            None => ("backward".to_string(), "backward".to_string(), r),
        };
        let b = self
            .g
            .add_region(path, block, parent, fwd.body + self.body_offset);
        self.g.set_phase(b, Phase::Backward);
        self.backward.insert(r, b);
        b
    }

    /// Next nodes are the optimizer's update, in region `update` (created once), at `span`.
    pub(super) fn at_update(&mut self, span: Span) {
        let root = self.g.root();
        if self.update.is_none() {
            let body = self.body_offset * 2;
            let r = self
                .g
                .add_region("update".into(), "update".into(), root, body);
            self.g.set_phase(r, Phase::Update);
            self.update = Some(r);
        }
        self.region = self.update.unwrap_or(root);
        self.span = span;
        self.of = "the update".into();
    }

    /// Appends a leaf of type `ty` (annotated like `like`, when that has an annotation).
    pub(super) fn leaf(&mut self, op: Op, ty: TensorType, like: Option<ValueId>) -> ValueId {
        let n = self
            .g
            .add_node(op, vec![], vec![ty], self.span, self.region);
        let v = self.g.node(n).outputs[0];
        if let Some(a) = like.and_then(|l| self.g.annotation(l).cloned()) {
            self.g.annotate(v, a);
        }
        v
    }

    /// The graph so far, to add outputs.
    pub(super) fn graph_mut(&mut self) -> &mut Graph {
        &mut self.g
    }

    /// A compiler bug while differentiating the current op.
    pub(super) fn bug(&self, detail: impl Into<String>) -> AutodiffError {
        AutodiffError::Internal {
            op: self.of.clone(),
            span: self.span,
            detail: detail.into(),
        }
    }

    /// Appends `op` on `ins`; all its results.
    pub(super) fn op_n(&mut self, op: Op, ins: Vec<ValueId>) -> R<Vec<ValueId>> {
        let tys: Vec<&TensorType> = ins.iter().map(|&v| self.g.ty(v)).collect();
        let out = infer(&op, &tys).map_err(|e| self.bug(e.to_string()))?;
        let n = self.g.add_node(op, ins, out, self.span, self.region);
        Ok(self.g.node(n).outputs.clone())
    }

    /// Appends single-result `op` on `ins`.
    pub(super) fn op(&mut self, op: Op, ins: Vec<ValueId>) -> R<ValueId> {
        let out = self.op_n(op, ins)?;
        out.first().copied().ok_or_else(|| self.bug("no result"))
    }

    /// a + b.
    pub(super) fn add(&mut self, a: ValueId, b: ValueId) -> R<ValueId> {
        self.bin(BinaryOp::Add, a, b)
    }

    /// a `op` b, numpy broadcasting.
    pub(super) fn bin(&mut self, op: BinaryOp, a: ValueId, b: ValueId) -> R<ValueId> {
        self.op(Op::Binary { op }, vec![a, b])
    }

    /// f(x).
    pub(super) fn unary(&mut self, op: UnaryOp, x: ValueId) -> R<ValueId> {
        self.op(Op::Unary { op }, vec![x])
    }

    /// x `op` value (or value `op` x when `lhs`).
    pub(super) fn scalar(&mut self, op: BinaryOp, x: ValueId, value: f64, lhs: bool) -> R<ValueId> {
        let op = Op::Scalar {
            op,
            value,
            scalar_lhs: lhs,
        };
        self.op(op, vec![x])
    }

    /// Reduction of `axis`.
    pub(super) fn reduce(
        &mut self,
        op: ReduceOp,
        x: ValueId,
        axis: usize,
        keep: bool,
    ) -> R<ValueId> {
        let op = Op::Reduce {
            op,
            axis,
            keepdims: keep,
        };
        self.op(op, vec![x])
    }

    /// Row-major reshape, skipped when the shape is already `shape`.
    pub(super) fn reshape(&mut self, x: ValueId, shape: &[u64]) -> R<ValueId> {
        if self.ty(x).shape == shape {
            return Ok(x);
        }
        let op = Op::Reshape {
            shape: shape.to_vec(),
        };
        self.op(op, vec![x])
    }

    /// Swaps the last two dims.
    pub(super) fn swap_last(&mut self, x: ValueId) -> R<ValueId> {
        let r = self.ty(x).rank();
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(r - 2, r - 1);
        self.op(Op::Transpose { perm }, vec![x])
    }

    /// A tensor of `x`'s type filled with `value`.
    pub(super) fn full_like(&mut self, x: ValueId, value: f64) -> R<ValueId> {
        self.op(Op::FullLike { value }, vec![x])
    }

    /// The cotangent `g` of a broadcast result summed back to operand shape `shape`.
    pub(super) fn unbroadcast(&mut self, g: ValueId, shape: &[u64]) -> R<ValueId> {
        let mut g = g;
        while self.ty(g).rank() > shape.len() {
            g = self.reduce(ReduceOp::Sum, g, 0, false)?;
        }
        for (d, &n) in shape.iter().enumerate() {
            if n == 1 && self.ty(g).shape[d] != 1 {
                g = self.reduce(ReduceOp::Sum, g, d, true)?;
            }
        }
        Ok(g)
    }
}
