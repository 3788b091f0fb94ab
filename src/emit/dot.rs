//! Graphviz DOT output of the global program: one nested `subgraph cluster_N` per block instance,
//! inputs, params and outputs as distinct shapes, edges labelled with the value's type and
//! annotation. Optionally, long runs of identical instances (96 layers) are drawn once.

use super::regions::{Canvas, Style, Tree};
use super::{file_name, View};
use crate::ir::{Graph, NodeId, Op, Output, RegionId, ValueId};
use std::fmt::Write;

/// Runs of at least this many consecutive identical instances are collapsed when
/// [`DotOptions::collapse_repeats`] is set.
pub const MIN_COLLAPSED_RUN: usize = 5;

/// Options of the DOT emitter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DotOptions {
    /// Draw a run of at least [`MIN_COLLAPSED_RUN`] consecutive sibling instances of the same
    /// body once, labelled `layer.0 … layer.95 (layer) ×96`, with the chain connected through it.
    pub collapse_repeats: bool,
}

/// Prints `g` as DOT with every instance drawn (no collapsing).
pub fn print(g: &Graph) -> String {
    print_with(g, DotOptions::default())
}

/// Prints `g` as DOT with `opts`; deterministic, and panic-free on unverified graphs.
pub fn print_with(g: &Graph, opts: DotOptions) -> String {
    let view = View::new(g);
    let mut canvas = Canvas::new(&view);
    if opts.collapse_repeats {
        canvas.collapse(MIN_COLLAPSED_RUN, |tree, a, b| {
            same_instance(&view, tree, a, b)
        });
    }
    canvas.draw(&Global, "tpc", file_name(&g.source))
}

/// Escapes `s` for a double-quoted DOT string: quotes and backslashes are escaped, line breaks
/// become `\n` and other control characters spaces.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// True when `a` and `b` are instances of one body with the same ops in the same order (the
/// layout only asks about instances with as many nodes).
fn same_instance(view: &View, tree: &Tree, a: RegionId, b: RegionId) -> bool {
    let (Some(ra), Some(rb)) = (view.region(a), view.region(b)) else {
        return false;
    };
    let (na, nb) = (&tree.subtree[a.index()], &tree.subtree[b.index()]);
    ra.body == rb.body
        && ra.block == rb.block
        && na
            .iter()
            .zip(nb)
            .all(|(x, y)| same_op(&view.nodes[x.index()].op, &view.nodes[y.index()].op))
}

/// Op equality up to param names, which differ between instances (`layer.0.w`, `layer.1.w`).
fn same_op(a: &Op, b: &Op) -> bool {
    matches!((a, b), (Op::Param { .. }, Op::Param { .. })) || a == b
}

/// How the global program is drawn.
struct Global;

impl Style for Global {
    /// `n5 [label="matmul\\n%5 h", shape=ellipse];`
    fn node_stmt(&self, c: &Canvas, id: NodeId) -> String {
        let n = c.view.nodes[id.index()];
        let shape = match n.op {
            Op::Input { .. } => "shape=invhouse",
            Op::Param { .. } => "shape=box, style=filled, fillcolor=lightyellow",
            _ => "shape=ellipse",
        };
        let label = format!("{}\\n{}", escape(&n.op.to_string()), escape(&c.results(n)));
        format!("{id} [label=\"{label}\", {shape}];")
    }

    /// Not drawn when dangling, or running backwards between members of a collapsed run.
    fn node_edge(&self, c: &Canvas, v: ValueId, dst: NodeId) -> Option<String> {
        let (src, label) = source(c, v)?;
        let to = c.layout.rep[dst.index()];
        let from_orig = c.view.value(v)?.node;
        let mapped = src != from_orig || to != dst;
        if mapped && src.index() >= to.index() {
            return None;
        }
        Some(format!("{src} -> {to} [label=\"{}\"];", escape(&label)))
    }

    /// Labelled like a node edge, then the output's annotation.
    fn output_edge(&self, c: &Canvas, i: usize, out: &Output) -> Option<String> {
        let (src, label) = source(c, out.value)?;
        let spec = out.annotation.as_ref().map(|a| format!(" @ {}", a.spec));
        let label = format!("{label}{}", spec.unwrap_or_default());
        Some(format!("{src} -> out{i} [label=\"{}\"];", escape(&label)))
    }
}

/// The drawn producer of `v` and the edge label (`%v ` when the producer has several results,
/// the type, the annotation).
fn source(c: &Canvas, v: ValueId) -> Option<(NodeId, String)> {
    let val = c.view.value(v)?;
    let producer = c.view.nodes.get(val.node.index())?;
    let mut label = String::new();
    if producer.outputs.len() > 1 {
        write!(label, "{v} ").unwrap();
    }
    write!(label, "{}", val.ty).unwrap();
    if let Some(a) = c.view.g.annotation(v) {
        write!(label, " @ {}", a.spec).unwrap();
    }
    Some((c.layout.rep[val.node.index()], label))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::fixtures::*;
    use crate::emit::regions::test_util::*;
    use crate::ir::{Annotation, Output, UnaryOp};

    #[test]
    fn draws_nested_clusters_shapes_and_edges() {
        let dot = print(&sample());
        assert!(
            dot.starts_with("digraph tpc {\n  label=\"t.tpl\";\n"),
            "{dot}"
        );
        assert!(dot.ends_with("}\n"), "{dot}");
        assert!(dot.contains("  subgraph cluster_1 {\n    label=\"layer.0 (layer)\";"));
        assert!(dot
            .contains("    subgraph cluster_2 {\n      label=\"layer.0.attention (attention)\";"));
        assert!(
            dot.contains("  n0 [label=\"input x\\n%0 x\", shape=invhouse];"),
            "{dot}"
        );
        assert!(dot.contains(
            "    n1 [label=\"param layer.0.w\\n%1 w\", shape=box, style=filled, fillcolor=lightyellow];"
        ));
        assert!(dot
            .contains("      n4 [label=\"split{axis=1,sizes=[8,8]}\\n%4, %5 b\", shape=ellipse];"));
        assert!(dot.contains("  out0 [label=\"output y\", shape=house];"));
        assert!(
            dot.contains("  n1 -> n2 [label=\"f32[16,16] @ [_, tp]\"];"),
            "{dot}"
        );
        assert!(dot.contains("  n4 -> n5 [label=\"%5 f32[8,8]\"];"), "{dot}");
        assert!(
            dot.contains("  n6 -> out0 [label=\"f32[8,8] @ [dp, _]\"];"),
            "{dot}"
        );
        assert_eq!(dot.matches('{').count(), dot.matches('}').count());
    }

    #[test]
    fn escapes_labels() {
        assert_eq!(escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(escape("x\ny\tz"), "x\\ny z");
        let mut g = Graph::new(r#"dir/we"ird\.tpl"#);
        let root = g.root();
        let r = g.add_region(r#"b."q""#.into(), r"bl\k".into(), root, 1);
        let x = add1(
            &mut g,
            Op::Input {
                name: r#"x"\"#.into(),
            },
            vec![],
            &[2],
            r,
        );
        g.set_value_name(x, "n\"m");
        g.add_output(Output {
            name: "o\"".into(),
            value: x,
            annotation: None,
            span: at(1, 1),
            like: None,
        });
        let dot = print(&g);
        assert!(dot.contains(r#"label="b.\"q\" (bl\\k)";"#), "{dot}");
        assert!(dot.contains(r#"[label="input x\"\\\n%0 n\"m""#), "{dot}");
        assert!(dot.contains(r#"[label="output o\"""#), "{dot}");
        // Every quote inside a label is escaped: unescaped quotes pair up on each line.
        for l in dot.lines() {
            let bare = l.replace("\\\\", "").replace("\\\"", "");
            assert_eq!(bare.matches('"').count() % 2, 0, "{l}");
        }
    }

    #[test]
    fn full_drawing_has_one_cluster_per_instance() {
        let g = layers(8, 2);
        let dot = print(&g);
        assert_eq!(lines_with(&dot, "subgraph cluster_").len(), 8 + 16);
        assert_eq!(dot, print_with(&g, DotOptions::default()));
    }

    #[test]
    fn collapses_long_runs_recursively() {
        let g = layers(96, 6);
        let dot = print_with(
            &g,
            DotOptions {
                collapse_repeats: true,
            },
        );
        // One layer cluster, and one act cluster inside it.
        assert_eq!(lines_with(&dot, "subgraph cluster_").len(), 2, "{dot}");
        assert!(
            dot.contains("label=\"layer.0 … layer.95 (layer) ×96\";"),
            "{dot}"
        );
        assert!(
            dot.contains("label=\"layer.0.act.0 … layer.0.act.5 (act) ×6\";"),
            "{dot}"
        );
        // x, w, matmul, gelu, relu drawn; the chain enters and leaves through the representative.
        assert_eq!(lines_with(&dot, "shape=").len(), 6, "{dot}");
        assert!(dot.contains("  n0 -> n2 [label=\"f32[4,4]\"];"), "{dot}");
        assert!(dot.contains("  n1 -> n2 [label=\"f32[4,4]\"];"), "{dot}");
        assert!(dot.contains("  n2 -> n3 [label=\"f32[4,4]\"];"), "{dot}");
        let relu = g.num_nodes() - 1;
        assert!(
            dot.contains(&format!("  n3 -> n{relu} [label=\"f32[4,4]\"];")),
            "{dot}"
        );
        assert_eq!(lines_with(&dot, " -> ").len(), 5, "{dot}");
    }

    #[test]
    fn short_runs_stay_expanded() {
        let g = layers(MIN_COLLAPSED_RUN - 1, 1);
        let opts = DotOptions {
            collapse_repeats: true,
        };
        assert_eq!(print_with(&g, opts), print(&g));
    }

    #[test]
    fn different_bodies_are_not_merged() {
        let mut g = layers(6, 1);
        g.annotate(
            ValueId::new(1),
            Annotation {
                spec: spec(&["_", "tp"]),
                span: at(1, 1),
            },
        );
        // Same op count, but the last layer runs another op: only layers 0..5 merge.
        let mut parts = g.to_parts();
        let last_gelu = parts.nodes.len() - 2;
        parts.nodes[last_gelu].op = Op::Unary { op: UnaryOp::Tanh };
        let g = Graph::from_parts(parts);
        let dot = print_with(
            &g,
            DotOptions {
                collapse_repeats: true,
            },
        );
        assert!(dot.contains("layer.0 … layer.4 (layer) ×5"), "{dot}");
        assert!(dot.contains("label=\"layer.5 (layer)\";"), "{dot}");
    }

    #[test]
    fn dangling_ids_do_not_panic() {
        let dot = print_with(
            &dangling(),
            DotOptions {
                collapse_repeats: true,
            },
        );
        assert_eq!(lines_with(&dot, " -> ").len(), 1, "{dot}");
    }

    /// Runs `dot -Tsvg` on the output when graphviz is installed.
    #[test]
    fn graphviz_accepts_the_output() {
        let opts = DotOptions {
            collapse_repeats: true,
        };
        assert_graphviz_accepts(&print(&sample()));
        assert_graphviz_accepts(&print_with(&layers(12, 6), opts));
    }
}
