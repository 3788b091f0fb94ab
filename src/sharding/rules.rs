//! Per-op sharding rules as einsum-like dimension mappings: each operand dim and result dim gets
//! a label (or none, when that dim can never be split), labels missing from the result are
//! contracted, and each op lists the operand sets it is linear in (for a sum, or for a max:
//! monotone in and commuting with `max`). Propagation and partitioning
//! only read these tables; no op is special-cased elsewhere except through `Contraction`.

use super::placement::PartialOp;
use crate::ir::{BinaryOp, Op, ReduceOp, TensorType, UnaryOp};
use std::fmt;

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
    /// Operand sets the op is jointly linear in, each with the reduction it commutes with:
    /// Partial(op) there (others Replicate) gives a Partial(op) result. For `Sum`, op(Σ x) =
    /// Σ op(x); for `Max`, op(max x) = max op(x) (a monotone op: max, reduce max, a float cast).
    pub linear: Vec<(PartialOp, Vec<usize>)>,
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
        | Op::State { .. }
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
            let linear = match op {
                BinaryOp::Add | BinaryOp::Sub => sums(&[&[0, 1]]),
                BinaryOp::Mul => sums(&[&[0], &[1]]),
                BinaryOp::Div => sums(&[&[0]]),
                // max over ranks of max(a_r, b_r) = max(max a_r, max b_r), and with b
                // replicated max(max a_r, b) (max is idempotent).
                BinaryOp::Max => [vec![0, 1], vec![0], vec![1]]
                    .into_iter()
                    .map(|s| (PartialOp::Max, s))
                    .collect(),
            };
            broadcasting(&mut b, ins, out_shape, linear)
        }
        Op::Equal | Op::Select => broadcasting(&mut b, ins, out_shape, vec![]),
        Op::BroadcastTo { .. } => broadcasting(&mut b, ins, out_shape, sums(&[&[0]])),
        Op::FullLike { .. } => elementwise(&mut b, out_shape, 1, false),
        Op::Fill { .. } => elementwise(&mut b, out_shape, 0, false),
        Op::UnaryGrad { .. } => {
            let mut r = elementwise(&mut b, out_shape, 2, false);
            r.linear = sums(&[&[1]]);
            r
        }
        Op::ScatterAdd { .. } => scatter_add(&mut b, &ins[0].shape, *out_shape.last()?),
        Op::OneHot { .. } => {
            let pos = b.labels(&ins[0].shape);
            let mut result = pos.clone();
            result.push(None);
            Rule {
                operands: vec![pos],
                result,
                sizes: Vec::new(),
                contracted: vec![],
                linear: vec![],
            }
        }
        Op::Scalar { op, scalar_lhs, .. } => {
            let l = matches!(op, BinaryOp::Mul) || (matches!(op, BinaryOp::Div) && !scalar_lhs);
            elementwise(&mut b, out_shape, ins.len(), l)
        }
        Op::Unary { op } => elementwise(&mut b, out_shape, 1, *op == UnaryOp::Neg),
        Op::Cast { .. } => {
            let mut r = elementwise(&mut b, out_shape, 1, false);
            // Rounding to a float is monotone, so it commutes with max; a cast from or to
            // i32 is left out (it is never a flag's, and an int conversion need not be).
            if ins[0].dtype.is_float() && outs[0].dtype.is_float() {
                r.linear = vec![(PartialOp::Max, vec![0])];
            }
            r
        }
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
                ReduceOp::Sum | ReduceOp::Mean => (PartialOp::Sum, sums(&[&[0]])),
                ReduceOp::Max => (PartialOp::Max, vec![(PartialOp::Max, vec![0])]),
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
                linear: sums(&[&[0]]),
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
                linear: vec![(PartialOp::Sum, (0..ins.len()).collect())],
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
                linear: sums(&[&[1]]),
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
    let r = Rule {
        sizes: b.sizes,
        ..r
    };
    #[cfg(debug_assertions)]
    if let Err(e) = r.check(ins, outs, !matches!(op, Op::Reshape { .. })) {
        panic!("compiler bug: the rule of {op} on {ins:?} is inconsistent: {e}");
    }
    Some(r)
}

impl Rule {
    /// Checks the rule against the types it was built for: one entry per dim of every operand and
    /// result, each label at most once per tensor, every label's dims of size `sizes[label]`
    /// (with `exact` false, a multiple of it: reshape labels a major dim on both sides, whose
    /// sizes may differ), contracted labels absent from the result, linear sets naming operands.
    pub fn check(
        &self,
        ins: &[&TensorType],
        outs: &[&TensorType],
        exact: bool,
    ) -> Result<(), String> {
        if self.operands.len() != ins.len() {
            return Err(format!(
                "{} operand maps for {} operands",
                self.operands.len(),
                ins.len()
            ));
        }
        for (i, (map, ty)) in self.operands.iter().zip(ins).enumerate() {
            self.check_map(map, &ty.shape, exact)
                .map_err(|e| format!("operand {i}: {e}"))?;
        }
        for (i, ty) in outs.iter().enumerate() {
            self.check_map(&self.result, &ty.shape, exact)
                .map_err(|e| format!("result {i}: {e}"))?;
        }
        self.check_contracted_and_linear()
    }

    /// One label list against one shape.
    fn check_map(&self, map: &[Option<Label>], shape: &[u64], exact: bool) -> Result<(), String> {
        if map.len() != shape.len() {
            return Err(format!("{} labels for rank {}", map.len(), shape.len()));
        }
        let mut seen = vec![false; self.sizes.len()];
        for (d, (l, &n)) in map.iter().zip(shape).enumerate() {
            let Some(l) = *l else { continue };
            let size = *self
                .sizes
                .get(l)
                .ok_or_else(|| format!("dim {d}: label {l} has no size"))?;
            if std::mem::replace(&mut seen[l], true) {
                return Err(format!("label {} labels two dims", letter(l)));
            }
            let fits = if exact {
                n == size
            } else {
                size > 0 && n.is_multiple_of(size)
            };
            if !fits {
                return Err(format!("dim {d} has size {n}, label {} {size}", letter(l)));
            }
        }
        Ok(())
    }

    /// Contracted labels are distinct, used by an operand and absent from the result; linear
    /// sets name existing operands.
    fn check_contracted_and_linear(&self) -> Result<(), String> {
        let in_result = |l: Label| self.result.contains(&Some(l));
        let in_operand = |l: Label| self.operands.iter().any(|m| m.contains(&Some(l)));
        for (i, &(l, _)) in self.contracted.iter().enumerate() {
            if in_result(l) || !in_operand(l) || self.contracted[..i].iter().any(|c| c.0 == l) {
                return Err(format!("contracted label {} is misplaced", letter(l)));
            }
        }
        match self
            .linear
            .iter()
            .flat_map(|(_, s)| s)
            .find(|&&i| i >= self.operands.len())
        {
            Some(i) => Err(format!(
                "linear set names operand {i}, of {}",
                self.operands.len()
            )),
            None => Ok(()),
        }
    }
}

/// The einsum letter of a label: `a`..`z`, then `{26}` and so on.
fn letter(l: Label) -> String {
    match u8::try_from(l) {
        Ok(n) if n < 26 => char::from(b'a' + n).to_string(),
        _ => format!("{{{l}}}"),
    }
}

/// Einsum form: `abc,cd->abd` (`_` for a dim that cannot be split), then the contracted labels
/// with what splitting them gives, and the operand sets the op is linear in (`0+1` jointly, as
/// add; `0 | 1` in each alone, as matmul): `abc,cd->abd; c: partial sum; linear in 0 | 1`;
/// then the sets it is max-linear in (`max-linear in 0+1`).
impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = |m: &[Option<Label>]| -> String {
            m.iter()
                .map(|l| l.map_or("_".to_string(), letter))
                .collect()
        };
        let ops: Vec<String> = self.operands.iter().map(|m| map(m)).collect();
        write!(f, "{}->{}", ops.join(","), map(&self.result))?;
        for (l, c) in &self.contracted {
            match c {
                Contraction::Partial(p) => write!(f, "; {}: partial {}", letter(*l), p.name())?,
                Contraction::Internal => write!(f, "; {}: internal collectives", letter(*l))?,
            }
        }
        for (op, what) in [(PartialOp::Sum, "linear"), (PartialOp::Max, "max-linear")] {
            let sets: Vec<String> = self
                .linear
                .iter()
                .filter(|(o, _)| *o == op)
                .map(|(_, s)| {
                    s.iter()
                        .map(|i| i.to_string())
                        .collect::<Vec<_>>()
                        .join("+")
                })
                .collect();
            if !sets.is_empty() {
                write!(f, "; {what} in {}", sets.join(" | "))?;
            }
        }
        Ok(())
    }
}

/// Operand sets linear for a sum.
fn sums(sets: &[&[usize]]) -> Vec<(PartialOp, Vec<usize>)> {
    sets.iter().map(|s| (PartialOp::Sum, s.to_vec())).collect()
}

fn elementwise(b: &mut Builder, shape: &[u64], n_operands: usize, linear: bool) -> Rule {
    let result = b.labels(shape);
    let operands = vec![result.clone(); n_operands];
    Rule {
        operands,
        result,
        sizes: Vec::new(),
        contracted: vec![],
        linear: if linear { sums(&[&[0]]) } else { vec![] },
    }
}

/// An elementwise op whose operands broadcast to `out`.
fn broadcasting(
    b: &mut Builder,
    ins: &[&TensorType],
    out: &[u64],
    linear: Vec<(PartialOp, Vec<usize>)>,
) -> Rule {
    let result = b.labels(out);
    let operands = ins
        .iter()
        .map(|t| broadcast_labels(&t.shape, out, &result))
        .collect();
    Rule {
        operands,
        result,
        sizes: Vec::new(),
        contracted: vec![],
        linear,
    }
}

/// Rows summed by id: splitting the ids' positions gives a partial sum; the table's rows are
/// never split (each device would need to know which ids fall in its block).
fn scatter_add(b: &mut Builder, ids: &[u64], h: u64) -> Rule {
    let pos = b.labels(ids);
    let h = Some(b.label(h));
    let mut rows = pos.clone();
    rows.push(h);
    let contracted = pos
        .iter()
        .flatten()
        .map(|&l| (l, Contraction::Partial(PartialOp::Sum)))
        .collect();
    Rule {
        operands: vec![pos, rows],
        result: vec![None, h],
        sizes: Vec::new(),
        contracted,
        linear: sums(&[&[1]]),
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
        linear: sums(&[&[0], &[1]]),
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
        linear: sums(&[&[0]]),
    }
}

#[cfg(test)]
mod check_tests {
    use super::*;
    use crate::ir::Dtype;

    fn f(shape: &[u64]) -> TensorType {
        TensorType::new(Dtype::F32, shape.to_vec())
    }

    /// matmul f32[4,8] @ f32[8,2]: `ab,bc->ac`.
    fn matmul_rule() -> (Rule, [TensorType; 3]) {
        let tys = [f(&[4, 8]), f(&[8, 2]), f(&[4, 2])];
        let r = rule(&Op::MatMul, &[&tys[0], &tys[1]], &[&tys[2]]).unwrap();
        (r, tys)
    }

    fn check(r: &Rule, tys: &[TensorType; 3]) -> Result<(), String> {
        r.check(&[&tys[0], &tys[1]], &[&tys[2]], true)
    }

    #[test]
    fn a_consistent_rule_passes_and_prints_as_einsum() {
        let (r, tys) = matmul_rule();
        assert_eq!(check(&r, &tys), Ok(()));
        assert_eq!(r.to_string(), "ab,bc->ac; b: partial sum; linear in 0 | 1");
    }

    /// A cast passes Partial(max) only between floats: a conversion to or from i32 need not
    /// commute with max.
    #[test]
    fn only_a_float_cast_is_max_linear() {
        let cast = |from: Dtype, to: Dtype| {
            let (x, y) = (TensorType::new(from, vec![4]), TensorType::new(to, vec![4]));
            rule(&Op::Cast { to }, &[&x], &[&y]).unwrap().to_string()
        };
        assert_eq!(cast(Dtype::Bf16, Dtype::F32), "a->a; max-linear in 0");
        assert_eq!(cast(Dtype::F32, Dtype::I32), "a->a");
        assert_eq!(cast(Dtype::I32, Dtype::F32), "a->a");
    }

    type Edit = fn(&mut Rule);

    #[test]
    fn each_broken_invariant_is_reported() {
        let (good, tys) = matmul_rule();
        let cases: [(&str, Edit); 7] = [
            ("label a labels two dims", |r| r.operands[0][1] = Some(0)),
            ("dim 1 has size 2, label a 4", |r| {
                r.operands[1][1] = Some(0)
            }),
            ("1 labels for rank 2", |r| r.result.truncate(1)),
            ("label 9 has no size", |r| r.result[0] = Some(9)),
            ("1 operand maps for 2 operands", |r| r.operands.truncate(1)),
            ("contracted label b is misplaced", |r| r.result[1] = None),
            ("linear set names operand 2", |r| {
                r.linear.push((PartialOp::Sum, vec![2]))
            }),
        ];
        for (needle, edit) in cases {
            let mut r = good.clone();
            edit(&mut r);
            if needle.starts_with("contracted") {
                r.contracted.push((1, Contraction::Internal));
            }
            let e = check(&r, &tys).expect_err(needle);
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
        let mut sizes_off = good.clone();
        sizes_off.sizes[1] = 4;
        assert!(check(&sizes_off, &tys).is_err());
        assert_eq!(
            sizes_off.check(&[&tys[0], &tys[1]], &[&tys[2]], false),
            Ok(())
        );
    }
}
