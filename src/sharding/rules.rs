//! Per-op sharding rules as einsum-like dimension mappings: each operand dim and result dim gets
//! a label (or none, when that dim can never be split), labels missing from the result are
//! contracted, and each op lists the operand sets it is linear in. Propagation and partitioning
//! only read these tables; no op is special-cased elsewhere except through `Contraction`.

use super::placement::PartialOp;
use crate::ir::{BinaryOp, Op, ReduceOp, TensorType, UnaryOp};

/// A dimension label, local to one op's rule.
pub type Label = usize;

/// What splitting a contracted label (one absent from the result) yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Contraction {
    /// A partial sum (matmul's k, sum/mean over an axis, vocab-sharded embedding lookup).
    Partial(PartialOp),
    /// A replicated result computed with collectives inside the op (vocab-parallel
    /// cross-entropy: max, sum of exp and target logit are all-reduced over `[B, S]`).
    Internal,
}

/// The dimension mapping of one op.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Per operand, per dim: the label, or `None` when the dim cannot be split.
    pub operands: Vec<Vec<Option<Label>>>,
    /// Per result dim (all results of a multi-result op share it): the label or `None`.
    pub result: Vec<Option<Label>>,
    /// Size of each label (all its occurrences have this size).
    pub sizes: Vec<u64>,
    /// Labels absent from the result that may still be split, and what that yields.
    pub contracted: Vec<(Label, Contraction)>,
    /// Operand sets the op is jointly linear in: Partial(sum) there (others Replicate) gives a
    /// Partial(sum) result.
    pub linear: Vec<Vec<usize>>,
}

struct Builder {
    sizes: Vec<u64>,
}

impl Builder {
    fn label(&mut self, size: u64) -> Label {
        self.sizes.push(size);
        self.sizes.len() - 1
    }

    fn labels(&mut self, shape: &[u64]) -> Vec<Option<Label>> {
        shape.iter().map(|&n| Some(self.label(n))).collect()
    }
}

/// The rule of `op` for operands of types `ins` producing results of types `outs`; `None` for
/// leaves (they have no operands and are placed freely or by annotation) and for the SPMD ops,
/// which exist only in partitioned programs.
pub fn rule(op: &Op, ins: &[&TensorType], outs: &[&TensorType]) -> Option<Rule> {
    let mut b = Builder { sizes: Vec::new() };
    let out_shape = &outs.first()?.shape;
    let r = match op {
        Op::Input { .. }
        | Op::Param { .. }
        | Op::AllReduce { .. }
        | Op::AllGather { .. }
        | Op::ReduceScatter { .. }
        | Op::AllToAll { .. }
        | Op::Redistribute { .. }
        | Op::ShardSlice { .. }
        | Op::KeepOnFirst { .. }
        | Op::VocabEmbedding { .. }
        | Op::TargetLogit { .. } => return None,
        Op::MatMul => matmul(&mut b, &ins[0].shape, &ins[1].shape),
        Op::Binary { op } => {
            let result = b.labels(out_shape);
            let operands = ins
                .iter()
                .map(|t| broadcast_labels(&t.shape, out_shape, &result))
                .collect();
            let linear = match op {
                BinaryOp::Add | BinaryOp::Sub => vec![vec![0, 1]],
                BinaryOp::Mul => vec![vec![0], vec![1]],
                BinaryOp::Div => vec![vec![0]],
                BinaryOp::Max => vec![],
            };
            Rule {
                operands,
                result,
                sizes: Vec::new(),
                contracted: vec![],
                linear,
            }
        }
        Op::Scalar { op, scalar_lhs, .. } => {
            let l = matches!(op, BinaryOp::Mul) || (matches!(op, BinaryOp::Div) && !scalar_lhs);
            elementwise(&mut b, out_shape, ins.len(), l)
        }
        Op::Unary { op } => elementwise(&mut b, out_shape, 1, *op == UnaryOp::Neg),
        Op::Cast { .. } => elementwise(&mut b, out_shape, 1, false),
        Op::Softmax { axis } => {
            let mut r = elementwise(&mut b, out_shape, 1, false);
            r.operands[0][*axis] = None;
            r.result[*axis] = None;
            r
        }
        Op::CausalMask => {
            let mut r = elementwise(&mut b, out_shape, 1, false);
            let n = out_shape.len();
            for d in [n - 2, n - 1] {
                r.operands[0][d] = None;
                r.result[d] = None;
            }
            r
        }
        Op::LayerNorm { .. } | Op::RmsNorm { .. } => {
            let mut result = b.labels(out_shape);
            *result.last_mut()? = None;
            let mut operands = vec![result.clone()];
            operands.extend(ins[1..].iter().map(|_| vec![None]));
            Rule {
                operands,
                result,
                sizes: Vec::new(),
                contracted: vec![],
                linear: vec![],
            }
        }
        Op::Reduce { op, axis, keepdims } => {
            let x = b.labels(&ins[0].shape);
            let mut result = x.clone();
            let l = x[*axis]?;
            if *keepdims {
                result[*axis] = None;
            } else {
                result.remove(*axis);
            }
            let (kind, linear) = match op {
                ReduceOp::Sum | ReduceOp::Mean => (PartialOp::Sum, vec![vec![0]]),
                ReduceOp::Max => (PartialOp::Max, vec![]),
            };
            Rule {
                operands: vec![x],
                result,
                sizes: Vec::new(),
                contracted: vec![(l, Contraction::Partial(kind))],
                linear,
            }
        }
        Op::Transpose { perm } => {
            let x = b.labels(&ins[0].shape);
            let result = perm.iter().map(|&p| x[p]).collect();
            Rule {
                operands: vec![x],
                result,
                sizes: Vec::new(),
                contracted: vec![],
                linear: vec![vec![0]],
            }
        }
        Op::Reshape { shape } => reshape(&mut b, &ins[0].shape, shape),
        Op::Split { axis, .. } | Op::Slice { axis, .. } => {
            let mut r = elementwise(&mut b, &ins[0].shape, 1, true);
            r.operands[0][*axis] = None;
            r.result[*axis] = None;
            r
        }
        Op::Concat { axis } => {
            let mut result = b.labels(out_shape);
            result[*axis] = None;
            let operands = ins.iter().map(|_| result.clone()).collect();
            Rule {
                operands,
                result,
                sizes: Vec::new(),
                contracted: vec![],
                linear: vec![(0..ins.len()).collect()],
            }
        }
        Op::Embedding => {
            let ids = b.labels(&ins[0].shape);
            let v = b.label(ins[1].shape[0]);
            let h = b.label(ins[1].shape[1]);
            let mut result = ids.clone();
            result.push(Some(h));
            Rule {
                operands: vec![ids, vec![Some(v), Some(h)]],
                result,
                sizes: Vec::new(),
                contracted: vec![(v, Contraction::Partial(PartialOp::Sum))],
                linear: vec![vec![1]],
            }
        }
        Op::CrossEntropy => {
            let pos = b.labels(&ins[1].shape);
            let v = b.label(*ins[0].shape.last()?);
            let mut logits = pos.clone();
            logits.push(Some(v));
            let mut contracted: Vec<(Label, Contraction)> = pos
                .iter()
                .flatten()
                .map(|&l| (l, Contraction::Partial(PartialOp::Sum)))
                .collect();
            contracted.push((v, Contraction::Internal));
            Rule {
                operands: vec![logits, pos],
                result: vec![],
                sizes: Vec::new(),
                contracted,
                linear: vec![],
            }
        }
    };
    Some(Rule {
        sizes: b.sizes,
        ..r
    })
}

fn elementwise(b: &mut Builder, shape: &[u64], n_operands: usize, linear: bool) -> Rule {
    let result = b.labels(shape);
    let operands = vec![result.clone(); n_operands];
    Rule {
        operands,
        result,
        sizes: Vec::new(),
        contracted: vec![],
        linear: if linear { vec![vec![0]] } else { vec![] },
    }
}

/// Labels of an operand broadcast to `out`: aligned from the right; a dim of size 1 broadcast
/// against a larger one gets no label.
fn broadcast_labels(
    shape: &[u64],
    out: &[u64],
    out_labels: &[Option<Label>],
) -> Vec<Option<Label>> {
    let off = out.len() - shape.len();
    shape
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            if n == out[off + i] {
                out_labels[off + i]
            } else {
                None
            }
        })
        .collect()
}

fn matmul(b: &mut Builder, a: &[u64], w: &[u64]) -> Rule {
    let (a2, w2): (Vec<u64>, Vec<u64>) = (
        if a.len() == 1 {
            vec![1, a[0]]
        } else {
            a.to_vec()
        },
        if w.len() == 1 {
            vec![w[0], 1]
        } else {
            w.to_vec()
        },
    );
    let (ab, wb) = (&a2[..a2.len() - 2], &w2[..w2.len() - 2]);
    let nb = ab.len().max(wb.len());
    let batch: Vec<u64> = (0..nb)
        .map(|i| {
            let x = if i + ab.len() >= nb {
                ab[i + ab.len() - nb]
            } else {
                1
            };
            let y = if i + wb.len() >= nb {
                wb[i + wb.len() - nb]
            } else {
                1
            };
            x.max(y)
        })
        .collect();
    let bl = b.labels(&batch);
    let (m, k, n) = (
        b.label(a2[a2.len() - 2]),
        b.label(a2[a2.len() - 1]),
        b.label(w2[w2.len() - 1]),
    );
    let mut la = broadcast_labels(ab, &batch, &bl);
    let mut lw = broadcast_labels(wb, &batch, &bl);
    let mut result = bl.clone();
    if a.len() == 1 {
        la = vec![Some(k)];
    } else {
        la.extend([Some(m), Some(k)]);
        result.push(Some(m));
    }
    if w.len() == 1 {
        lw = vec![Some(k)];
    } else {
        lw.extend([Some(k), Some(n)]);
        result.push(Some(n));
    }
    Rule {
        operands: vec![la, lw],
        result,
        sizes: Vec::new(),
        contracted: vec![(k, Contraction::Partial(PartialOp::Sum))],
        linear: vec![vec![0], vec![1]],
    }
}

/// Reshape groups input and output dims into runs of equal element count; within a group the
/// major (first) input dim and the major output dim share a label, since a split of the major
/// dim maps to contiguous blocks on both sides. Other dims get no label.
fn reshape(b: &mut Builder, from: &[u64], to: &[u64]) -> Rule {
    let mut li = vec![None; from.len()];
    let mut lo = vec![None; to.len()];
    let (mut i, mut o) = (0, 0);
    while i < from.len() && o < to.len() {
        let (si, so) = (i, o);
        let (mut pi, mut po) = (from[i], to[o]);
        i += 1;
        o += 1;
        while pi != po {
            if pi < po && i < from.len() {
                pi *= from[i];
                i += 1;
            } else if o < to.len() {
                po *= to[o];
                o += 1;
            } else {
                break;
            }
        }
        if from[si] > 1 && to[so] > 1 {
            let l = b.label(from[si].min(to[so]));
            let l_ok = from[si].is_multiple_of(to[so]) || to[so].is_multiple_of(from[si]);
            if l_ok {
                li[si] = Some(l);
                lo[so] = Some(l);
            }
        }
        while i < from.len() && from[i] == 1 {
            i += 1;
        }
        while o < to.len() && to[o] == 1 {
            o += 1;
        }
    }
    Rule {
        operands: vec![li],
        result: lo,
        sizes: Vec::new(),
        contracted: vec![],
        linear: vec![vec![0]],
    }
}
