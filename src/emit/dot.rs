//! Graphviz DOT output of the global program: one nested `subgraph cluster_N` per block instance,
//! inputs, params and outputs as distinct shapes, edges labelled with the value's type and
//! annotation. Optionally, long runs of identical instances (96 layers) are drawn once.

use super::{file_name, View};
use crate::ir::{Graph, Node, NodeId, Op, RegionId, ValueId};
use std::collections::BTreeSet;
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
    let tree = Tree::new(&view);
    let layout = if opts.collapse_repeats {
        Layout::collapsed(&view, &tree)
    } else {
        Layout::full(&view)
    };
    let mut w = DotWriter {
        view: &view,
        tree: &tree,
        layout: &layout,
        out: String::new(),
    };
    w.graph();
    w.out
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

/// The normalized region tree: direct nodes and non-empty children of every region.
struct Tree {
    /// Nodes directly in each region, in storage order.
    direct: Vec<Vec<NodeId>>,
    /// Children of each region that contain nodes, by id.
    children: Vec<Vec<RegionId>>,
    /// Nodes of each region's subtree, in storage order.
    subtree: Vec<Vec<NodeId>>,
}

impl Tree {
    /// Builds the tree of `view`.
    fn new(view: &View) -> Self {
        let n = view.regions.len().max(1);
        let mut t = Tree {
            direct: vec![Vec::new(); n],
            children: vec![Vec::new(); n],
            subtree: vec![Vec::new(); n],
        };
        for (i, node) in view.nodes.iter().enumerate() {
            let id = NodeId(i as u32);
            let chain = view.chain(view.node_region(node));
            t.direct[chain.last().map_or(0, |r| r.index())].push(id);
            t.subtree[0].push(id);
            for r in chain {
                t.subtree[r.index()].push(id);
            }
        }
        for r in 1..view.regions.len() {
            let r = RegionId(r as u32);
            if let Some(p) = view.parent(r).filter(|_| !t.subtree[r.index()].is_empty()) {
                t.children[p.index()].push(r);
            }
        }
        t
    }
}

/// What is drawn: the hidden regions, the node each node is drawn as, and cluster labels.
struct Layout {
    /// Regions not drawn (later members of a collapsed run, and everything inside them).
    hidden: Vec<bool>,
    /// The node standing for each node (itself unless it lies in a hidden region).
    rep: Vec<NodeId>,
    /// Labels of the clusters standing for a collapsed run, by region.
    run_labels: Vec<Option<String>>,
}

impl Layout {
    /// Every region drawn.
    fn full(view: &View) -> Self {
        Layout {
            hidden: vec![false; view.regions.len()],
            rep: (0..view.nodes.len()).map(|i| NodeId(i as u32)).collect(),
            run_labels: vec![None; view.regions.len()],
        }
    }

    /// Runs of identical sibling instances collapsed into their first member.
    fn collapsed(view: &View, tree: &Tree) -> Self {
        let mut l = Layout::full(view);
        for p in 0..view.regions.len() {
            if l.hidden[p] {
                continue;
            }
            for run in runs(view, tree, &tree.children[p]) {
                l.collapse(view, tree, &run);
            }
        }
        l.resolve_reps(view.regions.len());
        l
    }

    /// Hides all members of `run` but the first, which stands for their nodes.
    fn collapse(&mut self, view: &View, tree: &Tree, run: &[RegionId]) {
        let (first, last) = (run[0], run[run.len() - 1]);
        let path = |r: RegionId| view.region(r).map_or(String::new(), |x| x.path.clone());
        let block = view
            .region(first)
            .map_or(String::new(), |x| x.block.clone());
        self.run_labels[first.index()] = Some(format!(
            "{} … {} ({block}) ×{}",
            path(first),
            path(last),
            run.len()
        ));
        let rep_nodes = &tree.subtree[first.index()];
        for &m in &run[1..] {
            for (k, &n) in tree.subtree[m.index()].iter().enumerate() {
                self.rep[n.index()] = rep_nodes[k];
            }
        }
        let members: BTreeSet<RegionId> = run[1..].iter().copied().collect();
        for r in 0..view.regions.len() {
            let chain = view.chain(RegionId(r as u32));
            if chain.iter().any(|c| members.contains(c)) {
                self.hidden[r] = true;
            }
        }
    }

    /// Follows representative chains (a run inside the first member of another run) to the end.
    fn resolve_reps(&mut self, max_depth: usize) {
        for i in 0..self.rep.len() {
            let mut n = self.rep[i];
            for _ in 0..=max_depth {
                let next = self.rep[n.index()];
                if next == n {
                    break;
                }
                n = next;
            }
            self.rep[i] = n;
        }
    }
}

/// The maximal runs of at least [`MIN_COLLAPSED_RUN`] consecutive compatible regions of `sibs`.
fn runs(view: &View, tree: &Tree, sibs: &[RegionId]) -> Vec<Vec<RegionId>> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < sibs.len() {
        let mut j = i + 1;
        while j < sibs.len() && same_instance(view, tree, sibs[i], sibs[j]) {
            j += 1;
        }
        if j - i >= MIN_COLLAPSED_RUN {
            runs.push(sibs[i..j].to_vec());
        }
        i = j;
    }
    runs
}

/// True when `a` and `b` are instances of one body with the same ops in the same order.
fn same_instance(view: &View, tree: &Tree, a: RegionId, b: RegionId) -> bool {
    let (Some(ra), Some(rb)) = (view.region(a), view.region(b)) else {
        return false;
    };
    let (na, nb) = (&tree.subtree[a.index()], &tree.subtree[b.index()]);
    ra.body == rb.body
        && ra.block == rb.block
        && na.len() == nb.len()
        && na
            .iter()
            .zip(nb)
            .all(|(x, y)| same_op(&view.nodes[x.index()].op, &view.nodes[y.index()].op))
}

/// Op equality up to param names, which differ between instances (`layer.0.w`, `layer.1.w`).
fn same_op(a: &Op, b: &Op) -> bool {
    matches!((a, b), (Op::Param { .. }, Op::Param { .. })) || a == b
}

/// Writes the DOT text.
struct DotWriter<'a, 'g> {
    view: &'a View<'g>,
    tree: &'a Tree,
    layout: &'a Layout,
    out: String,
}

impl DotWriter<'_, '_> {
    /// Appends one line at nesting `depth`.
    fn line(&mut self, depth: usize, text: &str) {
        for _ in 0..depth {
            self.out.push_str("  ");
        }
        self.out.push_str(text);
        self.out.push('\n');
    }

    /// The whole `digraph`.
    fn graph(&mut self) {
        let title = escape(file_name(&self.view.g.source));
        self.line(0, "digraph tpc {");
        self.line(1, &format!("label=\"{title}\";"));
        self.line(1, "labelloc=t;");
        self.line(1, "node [fontname=\"Helvetica\", fontsize=10];");
        self.line(1, "edge [fontname=\"Helvetica\", fontsize=9];");
        self.region_body(RegionId(0), 1);
        self.outputs();
        self.edges();
        self.line(0, "}");
    }

    /// The direct nodes of `r` and its visible child clusters, in the order of their first nodes.
    fn region_body(&mut self, r: RegionId, depth: usize) {
        let mut items: Vec<(NodeId, Option<RegionId>)> = self.tree.direct[r.index()]
            .iter()
            .map(|&n| (n, None))
            .collect();
        for &c in &self.tree.children[r.index()] {
            if !self.layout.hidden[c.index()] {
                items.push((self.tree.subtree[c.index()][0], Some(c)));
            }
        }
        items.sort();
        for item in items {
            match item {
                (n, None) => {
                    let stmt = self.node_stmt(n);
                    self.line(depth, &stmt);
                }
                (_, Some(c)) => self.cluster(c, depth),
            }
        }
    }

    /// `subgraph cluster_N { ... }` for region `r`.
    fn cluster(&mut self, r: RegionId, depth: usize) {
        let (label, pen) = match &self.layout.run_labels[r.index()] {
            Some(l) => (l.clone(), 2),
            None => (self.view.region_label(r), 1),
        };
        self.line(depth, &format!("subgraph cluster_{} {{", r.index()));
        self.line(depth + 1, &format!("label=\"{}\";", escape(&label)));
        self.line(
            depth + 1,
            &format!("style=rounded; color=gray40; penwidth={pen};"),
        );
        self.region_body(r, depth + 1);
        self.line(depth, "}");
    }

    /// `n5 [label="matmul\n%5 h", shape=ellipse];`
    fn node_stmt(&self, id: NodeId) -> String {
        let n = self.view.nodes[id.index()];
        let shape = match n.op {
            Op::Input { .. } => "shape=invhouse",
            Op::Param { .. } => "shape=box, style=filled, fillcolor=lightyellow",
            _ => "shape=ellipse",
        };
        let label = format!(
            "{}\\n{}",
            escape(&n.op.to_string()),
            escape(&self.results(n))
        );
        format!("{id} [label=\"{label}\", {shape}];")
    }

    /// `%3 q, %4`: the node's results with their source names.
    fn results(&self, n: &Node) -> String {
        let items: Vec<String> = n
            .outputs
            .iter()
            .map(
                |&v| match self.view.value(v).and_then(|x| x.name.as_deref()) {
                    Some(name) => format!("{v} {name}"),
                    None => v.to_string(),
                },
            )
            .collect();
        items.join(", ")
    }

    /// One `house` node per program output.
    fn outputs(&mut self) {
        for (i, out) in self.view.g.outputs().iter().enumerate() {
            let label = escape(&format!("output {}", out.name));
            self.line(1, &format!("out{i} [label=\"{label}\", shape=house];"));
        }
    }

    /// All edges: operands into nodes, then values into outputs, without duplicates.
    fn edges(&mut self) {
        let mut seen = BTreeSet::new();
        let mut lines = Vec::new();
        for (i, n) in self.view.nodes.iter().enumerate() {
            let dst = NodeId(i as u32);
            for &v in &n.inputs {
                if let Some(e) = self.node_edge(v, dst) {
                    if seen.insert(e.clone()) {
                        lines.push(e);
                    }
                }
            }
        }
        for (i, out) in self.view.g.outputs().iter().enumerate() {
            if let Some((src, label)) = self.source(out.value) {
                let spec = out.annotation.as_ref().map(|a| format!(" @ {}", a.spec));
                let label = format!("{label}{}", spec.unwrap_or_default());
                lines.push(format!("{src} -> out{i} [label=\"{}\"];", escape(&label)));
            }
        }
        for e in lines {
            self.line(1, &e);
        }
    }

    /// The edge carrying `v` into node `dst`, as drawn; `None` when it is not drawn (dangling, or
    /// running backwards between members of a collapsed run).
    fn node_edge(&self, v: ValueId, dst: NodeId) -> Option<String> {
        let (src, label) = self.source(v)?;
        let to = self.layout.rep[dst.index()];
        let from_orig = self.view.value(v)?.node;
        let mapped = src != from_orig || to != dst;
        if mapped && src.index() >= to.index() {
            return None;
        }
        Some(format!("{src} -> {to} [label=\"{}\"];", escape(&label)))
    }

    /// The drawn producer of `v` and the edge label (`%v ` when the producer has several results,
    /// the type, the annotation).
    fn source(&self, v: ValueId) -> Option<(NodeId, String)> {
        let val = self.view.value(v)?;
        let producer = self.view.nodes.get(val.node.index())?;
        let mut label = String::new();
        if producer.outputs.len() > 1 {
            write!(label, "{v} ").unwrap();
        }
        write!(label, "{}", val.ty).unwrap();
        if let Some(a) = self.view.g.annotation(v) {
            write!(label, " @ {}", a.spec).unwrap();
        }
        Some((self.layout.rep[val.node.index()], label))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::fixtures::*;
    use crate::ir::{Annotation, Output, UnaryOp};

    /// The statements of `dot` that mention `needle`.
    fn lines_with<'a>(dot: &'a str, needle: &str) -> Vec<&'a str> {
        dot.lines().filter(|l| l.contains(needle)).collect()
    }

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
            ValueId(1),
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
        let mut g = Graph::new("t.tpl");
        let x = add1(
            &mut g,
            Op::Input { name: "x".into() },
            vec![],
            &[2],
            RegionId(9),
        );
        g.add_node(Op::MatMul, vec![x, ValueId(77)], vec![], at(3, 4), g.root());
        g.add_output(Output {
            name: "y".into(),
            value: ValueId(99),
            annotation: None,
            span: at(1, 1),
        });
        let dot = print_with(
            &g,
            DotOptions {
                collapse_repeats: true,
            },
        );
        assert_eq!(lines_with(&dot, " -> ").len(), 1, "{dot}");
    }

    /// Runs `dot -Tsvg` on the output when graphviz is installed.
    #[test]
    fn graphviz_accepts_the_output() {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let opts = DotOptions {
            collapse_repeats: true,
        };
        for text in [print(&sample()), print_with(&layers(12, 6), opts)] {
            let Ok(mut child) = Command::new("dot")
                .arg("-Tsvg")
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
            else {
                return;
            };
            child
                .stdin
                .take()
                .unwrap()
                .write_all(text.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && err.is_empty(), "{err}\n{text}");
        }
    }
}
