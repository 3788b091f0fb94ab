//! Buffer liveness of a graph, the one convention every interpreter and the memory estimate
//! share: a value is dead after its last reading node; a value never read is dead after the node
//! that makes it; a program output is read "at the end" (index `num_nodes`) and never dies.

use crate::ir::{Global, Graph, IdVec, Op, Space, ValueId};

/// For each value of a graph, the index of the node after which it is dead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Liveness<S = Global> {
    last: IdVec<ValueId<S>, Option<usize>>,
    /// A value dies at its last reader only (not at any later node): the nodes do not run in
    /// program order.
    exact: bool,
}

impl<S: Space> Liveness<S> {
    /// The liveness of `g`'s values.
    pub fn of(g: &Graph<S>) -> Liveness<S> {
        let mut last = IdVec::filled(g.num_values(), None);
        for (id, n) in g.nodes() {
            for v in &n.inputs {
                last[*v] = Some(id.index());
            }
        }
        for o in g.outputs() {
            last[o.value] = Some(g.num_nodes());
        }
        Liveness { last, exact: false }
    }

    /// The liveness of `g`'s values when the nodes of `order` run in that order (one pipeline
    /// stage's passes, which need not follow the program's): a value dies after the last of
    /// them that reads it; the values `hold` selects (sent elsewhere, or outputs) never die.
    /// Its [`Liveness::dies_at`] is exact: a value dies at that reader alone.
    pub fn of_order(
        g: &Graph<S>,
        order: impl IntoIterator<Item = usize>,
        hold: impl Fn(ValueId<S>) -> bool,
    ) -> Liveness<S> {
        let mut last = IdVec::filled(g.num_values(), None);
        for i in order {
            for v in &g.node(crate::ir::NodeId::new(i)).inputs {
                last[*v] = Some(i);
            }
        }
        for i in 0..g.num_values() {
            let v = ValueId::new(i);
            if hold(v) {
                last[v] = Some(g.num_nodes());
            }
        }
        Liveness { last, exact: true }
    }

    /// The index of the last node reading `v` (`num_nodes` for outputs); `None` when unread.
    pub fn last_use(&self, v: ValueId<S>) -> Option<usize> {
        self.last[v]
    }

    /// True when `v` is dead once node `node` has run: `node` is its last reader, or `v` is
    /// never read (then it dies where it is made).
    pub fn dies_at(&self, v: ValueId<S>, node: usize) -> bool {
        match self.exact {
            true => self.last[v].is_none_or(|l| l == node),
            false => self.last[v].is_none_or(|l| l <= node),
        }
    }

    /// The last use of every value.
    pub fn into_table(self) -> IdVec<ValueId<S>, Option<usize>> {
        self.last
    }
}

/// Walks `g` in program order and returns the bytes of the leaves (outputs of nodes whose op
/// `is_leaf` accepts, held for the whole program) and the peak bytes of the other values live at
/// once, by the [`Liveness`] convention; `size` gives a value's bytes. Sums saturate.
pub fn peak_live<S: Space>(
    g: &Graph<S>,
    is_leaf: impl Fn(&Op) -> bool,
    size: impl Fn(ValueId<S>) -> u128,
) -> (u128, u128) {
    let live_until = Liveness::of(g);
    let (mut leaves, mut live, mut peak) = (0u128, 0u128, 0u128);
    let mut frees: Vec<Vec<u128>> = vec![Vec::new(); g.num_nodes() + 1];
    for (id, n) in g.nodes() {
        let leaf = is_leaf(&n.op);
        for &v in &n.outputs {
            let b = size(v);
            if leaf {
                leaves = leaves.saturating_add(b);
                continue;
            }
            live = live.saturating_add(b);
            frees[live_until.last_use(v).unwrap_or(id.index())].push(b);
        }
        peak = peak.max(live);
        for b in frees[id.index()].drain(..) {
            live = live.saturating_sub(b);
        }
    }
    (leaves, peak)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dtype, Op, Output, TensorType, UnaryOp};
    use crate::span::Span;

    #[test]
    fn outputs_live_to_the_end_and_unread_values_die_where_made() {
        let mut g = Graph::new("t");
        let (root, ty) = (g.root(), TensorType::new(Dtype::F32, vec![2]));
        let node = |g: &mut Graph, op: Op, inputs: Vec<ValueId>| {
            let n = g.add_node(op, inputs, vec![ty.clone()], Span::default(), root);
            g.node(n).outputs[0]
        };
        let exp = Op::Unary { op: UnaryOp::Exp };
        let x = node(&mut g, Op::Input { name: "x".into() }, vec![]);
        let y = node(&mut g, exp.clone(), vec![x]);
        let unused = node(&mut g, exp, vec![x]);
        g.add_output(Output {
            name: "y".into(),
            value: y,
            annotation: None,
            span: Span::default(),
            like: None,
        });
        let live = Liveness::of(&g);
        assert_eq!(live.last_use(x), Some(2));
        assert!(live.dies_at(x, 2) && !live.dies_at(x, 1));
        assert_eq!(live.last_use(y), Some(g.num_nodes()));
        assert!(!live.dies_at(y, g.num_nodes() - 1));
        assert_eq!(live.last_use(unused), None);
        assert!(live.dies_at(unused, 2));
        let input = |op: &Op| matches!(op, Op::Input { .. });
        assert_eq!(peak_live(&g, input, |_| 8), (8, 16));
        assert_eq!(peak_live(&g, |_| false, |_| 8), (0, 24));
    }
}
