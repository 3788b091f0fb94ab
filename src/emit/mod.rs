//! Emitters for the global (unsharded) program: the readable text IR ([`text`]), Graphviz DOT
//! ([`dot`]) and the versioned JSON document ([`json`]).
//!
//! The text and DOT emitters accept unverified graphs: dangling ids are printed, never looked up
//! blindly, so they never panic.

pub mod dot;
pub mod json;
pub mod plan;
pub mod plan_dot;
pub mod plan_json;
mod regions;
pub mod text;
pub mod timeline;

use crate::ir::{Global, Graph, Node, Region, RegionId, Space, Value, ValueId};

/// The final path component of `source` (`examples/mlp.tpl` → `mlp.tpl`), so that output does not
/// depend on the working directory.
pub(crate) fn file_name(source: &str) -> &str {
    source.rsplit(['/', '\\']).next().unwrap_or(source)
}

/// A panic-free view of a graph's tables, with the region tree normalized: a region whose parent
/// is missing, dangling or not earlier than itself hangs under the root, and a node in an unknown
/// region belongs to the root. Every walk up the tree therefore terminates.
pub(crate) struct View<'g, S = Global> {
    /// The graph.
    pub g: &'g Graph<S>,
    /// All values, indexed by id.
    pub values: Vec<&'g Value<S>>,
    /// All regions, indexed by id.
    pub regions: Vec<&'g Region<S>>,
    /// All nodes, indexed by id.
    pub nodes: Vec<&'g Node<S>>,
}

impl<'g, S: Space> View<'g, S> {
    /// Collects the tables of `g`.
    pub fn new(g: &'g Graph<S>) -> Self {
        View {
            g,
            values: g.values().map(|(_, v)| v).collect(),
            regions: g.regions().map(|(_, r)| r).collect(),
            nodes: g.nodes().map(|(_, n)| n).collect(),
        }
    }

    /// The value `v`, if it exists.
    pub fn value(&self, v: ValueId<S>) -> Option<&'g Value<S>> {
        self.values.get(v.index()).copied()
    }

    /// The region `r`, if it exists.
    pub fn region(&self, r: RegionId<S>) -> Option<&'g Region<S>> {
        self.regions.get(r.index()).copied()
    }

    /// The normalized region of a node: its own if it exists, the root otherwise.
    pub fn node_region(&self, n: &Node<S>) -> RegionId<S> {
        if n.region.index() < self.regions.len() {
            n.region
        } else {
            RegionId::new(0)
        }
    }

    /// The normalized parent of `r`; `None` for the root and unknown ids.
    pub fn parent(&self, r: RegionId<S>) -> Option<RegionId<S>> {
        if r.index() == 0 || r.index() >= self.regions.len() {
            return None;
        }
        match self.regions[r.index()].parent {
            Some(p) if p.index() < r.index() => Some(p),
            _ => Some(RegionId::new(0)),
        }
    }

    /// The non-root regions enclosing `r`, outermost first, ending with `r` itself (empty for the
    /// root or an unknown id).
    pub fn chain(&self, r: RegionId<S>) -> Vec<RegionId<S>> {
        let mut chain = Vec::new();
        let mut cur = Some(r);
        while let Some(c) = cur.filter(|c| c.index() != 0 && c.index() < self.regions.len()) {
            chain.push(c);
            cur = self.parent(c);
        }
        chain.reverse();
        chain
    }

    /// `layer.0 (layer)`: a region's path and block name.
    pub fn region_label(&self, r: RegionId<S>) -> String {
        match self.region(r) {
            Some(reg) => format!("{} ({})", reg.path, reg.block),
            None => format!("{r}"),
        }
    }
}

/// Hand-built graphs shared by the emitter tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use crate::ir::{
        Annotation, BinaryOp, Dtype, Graph, Op, Output, RegionId, Spec, TensorType, UnaryOp,
        ValueId,
    };
    use crate::span::Span;

    /// An f32 tensor type of `shape`.
    pub(crate) fn f32t(shape: &[u64]) -> TensorType {
        TensorType::new(Dtype::F32, shape.to_vec())
    }

    /// A one-byte span at `line:col`.
    pub(crate) fn at(line: u32, col: u32) -> Span {
        Span {
            start: 0,
            end: 1,
            line,
            col,
        }
    }

    /// A spec from one entry per dim: `_` or a single axis.
    pub(crate) fn spec(dims: &[&str]) -> Spec {
        Spec {
            dims: dims
                .iter()
                .map(|d| match *d {
                    "_" => vec![],
                    a => vec![a.to_string()],
                })
                .collect(),
        }
    }

    /// `x -> layer.0 { w; h = x @ w; attention { softmax; split }; add } -> gelu -> y`.
    pub(crate) fn sample() -> Graph {
        let mut g = Graph::new("examples/t.tpl");
        g.mesh_axes = vec!["dp".into(), "tp".into()];
        g.dims = vec![("B".into(), 8), ("H".into(), 16)];
        let root = g.root();
        let x = g.add_node(
            Op::Input { name: "x".into() },
            vec![],
            vec![f32t(&[8, 16])],
            at(4, 7),
            root,
        );
        let x = g.node(x).outputs[0];
        g.set_value_name(x, "x");
        let l0 = g.add_region("layer.0".into(), "layer".into(), root, 1);
        let w = g.add_node(
            Op::Param {
                name: "layer.0.w".into(),
            },
            vec![],
            vec![f32t(&[16, 16])],
            at(9, 9),
            l0,
        );
        let w = g.node(w).outputs[0];
        g.set_value_name(w, "w");
        g.annotate(
            w,
            Annotation {
                spec: spec(&["_", "tp"]),
                span: at(9, 20),
            },
        );
        let h = g.add_node(Op::MatMul, vec![x, w], vec![f32t(&[8, 16])], at(10, 9), l0);
        let h = g.node(h).outputs[0];
        g.set_value_name(h, "h");
        let att = g.add_region("layer.0.attention".into(), "attention".into(), l0, 2);
        let s = g.add_node(
            Op::Softmax { axis: 1 },
            vec![h],
            vec![f32t(&[8, 16])],
            at(20, 5),
            att,
        );
        let s = g.node(s).outputs[0];
        let sp = g.add_node(
            Op::Split {
                axis: 1,
                sizes: vec![8, 8],
            },
            vec![s],
            vec![f32t(&[8, 8]), f32t(&[8, 8])],
            at(21, 5),
            att,
        );
        let (a, b) = (g.node(sp).outputs[0], g.node(sp).outputs[1]);
        g.set_value_name(b, "b");
        let sum = g.add_node(
            Op::Binary { op: BinaryOp::Add },
            vec![a, b],
            vec![f32t(&[8, 8])],
            at(12, 3),
            l0,
        );
        let sum = g.node(sum).outputs[0];
        let y = g.add_node(
            Op::Unary { op: UnaryOp::Gelu },
            vec![sum],
            vec![f32t(&[8, 8])],
            Span::default(),
            root,
        );
        let y = g.node(y).outputs[0];
        g.add_output(Output {
            name: "y".into(),
            value: y,
            annotation: Some(Annotation {
                spec: spec(&["dp", "_"]),
                span: at(30, 12),
            }),
            span: at(30, 1),
            like: None,
        });
        g
    }

    /// A graph with dangling ids: a node in an unknown region, and an operand, an annotation
    /// and an output naming missing values.
    pub(crate) fn dangling() -> Graph {
        let mut g = Graph::new("t.tpl");
        let x = add1(
            &mut g,
            Op::Input { name: "x".into() },
            vec![],
            &[2],
            RegionId::new(9),
        );
        g.add_node(
            Op::MatMul,
            vec![x, ValueId::new(77)],
            vec![],
            at(3, 4),
            g.root(),
        );
        g.annotate(
            ValueId::new(55),
            Annotation {
                spec: spec(&["tp"]),
                span: at(1, 1),
            },
        );
        g.add_output(Output {
            name: "y".into(),
            value: ValueId::new(99),
            annotation: None,
            span: Span::default(),
            like: None,
        });
        g
    }

    /// Adds a one-result node and returns its value.
    pub(crate) fn add1(
        g: &mut Graph,
        op: Op,
        inputs: Vec<ValueId>,
        shape: &[u64],
        r: RegionId,
    ) -> ValueId {
        let n = g.add_node(op, inputs, vec![f32t(shape)], at(1, 1), r);
        g.node(n).outputs[0]
    }

    /// `x -> n_layers × layer.i { param w; matmul; block mlp.j × n_inner { gelu } } -> y`.
    pub(crate) fn layers(n_layers: usize, n_inner: usize) -> Graph {
        let mut g = Graph::new("/abs/dir/stack.tpl");
        let root = g.root();
        let mut h = add1(
            &mut g,
            Op::Input { name: "x".into() },
            vec![],
            &[4, 4],
            root,
        );
        for i in 0..n_layers {
            let l = g.add_region(format!("layer.{i}"), "layer".into(), root, 1);
            let w = add1(
                &mut g,
                Op::Param {
                    name: format!("layer.{i}.w"),
                },
                vec![],
                &[4, 4],
                l,
            );
            h = add1(&mut g, Op::MatMul, vec![h, w], &[4, 4], l);
            for j in 0..n_inner {
                let m = g.add_region(format!("layer.{i}.act.{j}"), "act".into(), l, 2);
                h = add1(&mut g, Op::Unary { op: UnaryOp::Gelu }, vec![h], &[4, 4], m);
            }
        }
        let y = add1(
            &mut g,
            Op::Unary { op: UnaryOp::Relu },
            vec![h],
            &[4, 4],
            root,
        );
        g.add_output(Output {
            name: "y".into(),
            value: y,
            annotation: None,
            span: at(2, 1),
            like: None,
        });
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::{Dtype, Op, TensorType};
    use crate::span::Span;

    #[test]
    fn file_name_strips_directories() {
        assert_eq!(file_name("examples/mlp.tpl"), "mlp.tpl");
        assert_eq!(file_name("/a/b/c.tpl"), "c.tpl");
        assert_eq!(file_name("c:\\x\\y.tpl"), "y.tpl");
        assert_eq!(file_name("plain.tpl"), "plain.tpl");
        assert_eq!(file_name(""), "");
    }

    #[test]
    fn chains_terminate_on_bad_parents() {
        let mut g: Graph = Graph::new("t.tpl");
        let a = g.add_region("a".into(), "blk".into(), RegionId::new(0), 1);
        let b = g.add_region("a.b".into(), "inner".into(), a, 2);
        // A forward (cyclic) parent and a dangling one both hang under the root.
        let c = g.add_region("c".into(), "blk".into(), RegionId::new(7), 1);
        let d = g.add_region("d".into(), "blk".into(), RegionId::new(4), 1);
        let ty = TensorType::new(Dtype::F32, vec![2]);
        g.add_node(
            Op::Input { name: "x".into() },
            vec![],
            vec![ty],
            Span::default(),
            RegionId::new(42),
        );
        let v = View::new(&g);
        assert_eq!(v.chain(b), vec![a, b]);
        assert_eq!(v.chain(c), vec![c]);
        assert_eq!(v.chain(d), vec![d]);
        assert_eq!(v.chain(RegionId::new(0)), vec![]);
        assert_eq!(v.chain(RegionId::new(99)), vec![]);
        assert_eq!(v.node_region(v.nodes[0]), RegionId::new(0));
        assert_eq!(v.region_label(b), "a.b (inner)");
    }
}
