//! The region walk shared by the DOT printers ([`super::dot`], [`super::plan_dot`]): the
//! normalized region tree, which block instances are drawn (runs of identical consecutive
//! siblings collapse into their first member), and the document they are drawn into, one nested
//! `subgraph cluster_N` per drawn instance.

use super::dot::escape;
use super::View;
use crate::ir::{Global, Node, NodeId, Output, RegionId, Space, ValueId};
use std::collections::BTreeSet;

/// The normalized region tree: direct nodes and non-empty children of every region.
pub(crate) struct Tree<S = Global> {
    /// Nodes directly in each region, in storage order.
    direct: Vec<Vec<NodeId<S>>>,
    /// Children of each region that contain nodes, by id.
    children: Vec<Vec<RegionId<S>>>,
    /// Nodes of each region's subtree, in storage order.
    pub subtree: Vec<Vec<NodeId<S>>>,
}

impl<S: Space> Tree<S> {
    /// Builds the tree of `view`.
    fn new(view: &View<'_, S>) -> Self {
        let n = view.regions.len().max(1);
        let mut t = Tree {
            direct: vec![Vec::new(); n],
            children: vec![Vec::new(); n],
            subtree: vec![Vec::new(); n],
        };
        for (i, node) in view.nodes.iter().enumerate() {
            let id = NodeId::new(i);
            let chain = view.chain(view.node_region(node));
            t.direct[chain.last().map_or(0, |r| r.index())].push(id);
            t.subtree[0].push(id);
            for r in chain {
                t.subtree[r.index()].push(id);
            }
        }
        for r in 1..view.regions.len() {
            let r = RegionId::new(r);
            if let Some(p) = view.parent(r).filter(|_| !t.subtree[r.index()].is_empty()) {
                t.children[p.index()].push(r);
            }
        }
        t
    }
}

/// What is drawn: hidden regions, the node standing for each node, run labels and membership.
pub(crate) struct Layout<S = Global> {
    /// Regions not drawn (later members of a collapsed run, and everything inside them).
    hidden: Vec<bool>,
    /// The node drawn for each node (itself unless it lies in a hidden region).
    pub rep: Vec<NodeId<S>>,
    /// Labels of the clusters standing for a collapsed run, by region.
    run_labels: Vec<Option<String>>,
    /// Per node, the collapsed runs containing it, as (run, member index).
    member: Vec<Vec<(usize, usize)>>,
    /// Number of runs collapsed so far.
    runs: usize,
}

impl<S: Space> Layout<S> {
    /// Every region drawn.
    fn full(view: &View<'_, S>) -> Self {
        Layout {
            hidden: vec![false; view.regions.len()],
            rep: (0..view.nodes.len()).map(NodeId::new).collect(),
            run_labels: vec![None; view.regions.len()],
            member: vec![Vec::new(); view.nodes.len()],
            runs: 0,
        }
    }

    /// The layout of [`Canvas::collapse`].
    fn collapsed(
        view: &View<'_, S>,
        tree: &Tree<S>,
        min_run: usize,
        mut same: impl FnMut(RegionId<S>, RegionId<S>) -> bool,
    ) -> Self {
        let mut l = Layout::full(view);
        for r in 0..view.regions.len() {
            if l.hidden[r] {
                continue;
            }
            for run in runs(tree, &tree.children[r], min_run, &mut same) {
                l.collapse(view, tree, &run);
            }
        }
        l.resolve_reps(view.regions.len());
        l
    }

    /// Hides all members of `run` but the first, which stands for their nodes.
    fn collapse(&mut self, view: &View<'_, S>, tree: &Tree<S>, run: &[RegionId<S>]) {
        let (first, last) = (run[0], run[run.len() - 1]);
        let path = |r: RegionId<S>| view.region(r).map_or(String::new(), |x| x.path.clone());
        let block = view
            .region(first)
            .map_or(String::new(), |x| x.block.clone());
        self.run_labels[first.index()] = Some(format!(
            "{} … {} ({block}) ×{}",
            path(first),
            path(last),
            run.len()
        ));
        let id = self.runs;
        self.runs += 1;
        let rep_nodes = &tree.subtree[first.index()];
        for (m, &r) in run.iter().enumerate() {
            for (k, &n) in tree.subtree[r.index()].iter().enumerate() {
                self.member[n.index()].push((id, m));
                if let Some(&r) = rep_nodes.get(k).filter(|_| m > 0) {
                    self.rep[n.index()] = r;
                }
            }
        }
        let members: BTreeSet<RegionId<S>> = run[1..].iter().copied().collect();
        // Parents precede their children, so a hidden parent is seen before its children.
        for r in 1..view.regions.len() {
            let id = RegionId::new(r);
            let parent_hidden = view.parent(id).is_some_and(|p| self.hidden[p.index()]);
            if members.contains(&id) || parent_hidden {
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

    /// True when `a` and `b` lie in different members of one collapsed run (the flow from one
    /// instance to the next, which the collapsed drawing leaves out).
    pub fn crosses_members(&self, a: NodeId<S>, b: NodeId<S>) -> bool {
        let (ma, mb) = (&self.member[a.index()], &self.member[b.index()]);
        ma.iter()
            .any(|&(run, i)| mb.iter().any(|&(r2, j)| r2 == run && j != i))
    }
}

/// The maximal runs of at least `min_run` consecutive regions of `sibs` with as many nodes as
/// the run's first and identical to it by `same`.
fn runs<S: Space>(
    tree: &Tree<S>,
    sibs: &[RegionId<S>],
    min_run: usize,
    same: &mut impl FnMut(RegionId<S>, RegionId<S>) -> bool,
) -> Vec<Vec<RegionId<S>>> {
    let size = |r: RegionId<S>| tree.subtree[r.index()].len();
    let mut runs = Vec::new();
    let mut i = 0;
    while i < sibs.len() {
        let mut j = i + 1;
        while j < sibs.len() && size(sibs[i]) == size(sibs[j]) && same(sibs[i], sibs[j]) {
            j += 1;
        }
        if j - i >= min_run {
            runs.push(sibs[i..j].to_vec());
        }
        i = j;
    }
    runs
}

/// How a DOT printer draws nodes and edges; the document, its clusters, the output nodes and
/// the edge list are drawn by [`Canvas::draw`].
pub(crate) trait Style<S: Space = Global> {
    /// The statement drawing node `id`.
    fn node_stmt(&self, c: &Canvas<'_, '_, S>, id: NodeId<S>) -> String;

    /// The edge statement carrying `v` into node `dst`, or `None` when it is not drawn.
    fn node_edge(&self, c: &Canvas<'_, '_, S>, v: ValueId<S>, dst: NodeId<S>) -> Option<String>;

    /// The edge statement into the `i`th output node, or `None` when it is not drawn.
    fn output_edge(&self, c: &Canvas<'_, '_, S>, i: usize, out: &Output<S>) -> Option<String>;
}

/// A graph with its region tree and layout, ready to draw.
pub(crate) struct Canvas<'a, 'g, S = Global> {
    /// The graph drawn.
    pub view: &'a View<'g, S>,
    /// Its region tree.
    pub tree: Tree<S>,
    /// What is drawn of it.
    pub layout: Layout<S>,
}

impl<'a, 'g, S: Space> Canvas<'a, 'g, S> {
    /// `view` with every region drawn.
    pub fn new(view: &'a View<'g, S>) -> Self {
        Canvas {
            view,
            tree: Tree::new(view),
            layout: Layout::full(view),
        }
    }

    /// Collapses runs of at least `min_run` consecutive sibling instances that `same` calls
    /// identical into their first member, outer runs first, then runs inside the first members.
    /// `same` is only asked about instances with as many nodes.
    pub fn collapse(
        &mut self,
        min_run: usize,
        mut same: impl FnMut(&Tree<S>, RegionId<S>, RegionId<S>) -> bool,
    ) {
        let tree = &self.tree;
        self.layout = Layout::collapsed(self.view, tree, min_run, |a, b| same(tree, a, b));
    }

    /// The whole `digraph name`, labelled `title`, in `style`.
    pub fn draw(&self, style: &dyn Style<S>, name: &str, title: &str) -> String {
        let mut d = Doc {
            c: self,
            style,
            out: String::new(),
        };
        d.line(0, &format!("digraph {name} {{"));
        d.line(1, &format!("label=\"{}\";", escape(title)));
        d.line(1, "labelloc=t;");
        d.line(1, "node [fontname=\"Helvetica\", fontsize=10];");
        d.line(1, "edge [fontname=\"Helvetica\", fontsize=9];");
        d.region_body(RegionId::new(0), 1);
        d.outputs();
        for e in self.edges(style) {
            d.line(1, &e);
        }
        d.line(0, "}");
        d.out
    }

    /// All edges as drawn: operands into nodes, then values into outputs, without duplicates.
    fn edges(&self, style: &dyn Style<S>) -> Vec<String> {
        let into_nodes = self.view.nodes.iter().enumerate().flat_map(|(i, n)| {
            n.inputs
                .iter()
                .filter_map(move |&v| style.node_edge(self, v, NodeId::new(i)))
        });
        let outputs = self.view.g.outputs().iter().enumerate();
        let into_outputs = outputs.filter_map(|(i, out)| style.output_edge(self, i, out));
        let mut seen = BTreeSet::new();
        into_nodes
            .chain(into_outputs)
            .filter(|e| seen.insert(e.clone()))
            .collect()
    }

    /// `%3 q, %4`: the node's results with their source names.
    pub fn results(&self, n: &Node<S>) -> String {
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
}

/// The DOT text being written.
struct Doc<'c, 'a, 'g, S = Global> {
    c: &'c Canvas<'a, 'g, S>,
    style: &'c dyn Style<S>,
    out: String,
}

impl<S: Space> Doc<'_, '_, '_, S> {
    /// Appends one line at nesting `depth`.
    fn line(&mut self, depth: usize, text: &str) {
        for _ in 0..depth {
            self.out.push_str("  ");
        }
        self.out.push_str(text);
        self.out.push('\n');
    }

    /// The direct nodes of `r` and its visible child clusters, in the order of their first nodes.
    fn region_body(&mut self, r: RegionId<S>, depth: usize) {
        let (tree, layout) = (&self.c.tree, &self.c.layout);
        let mut items: Vec<(NodeId<S>, Option<RegionId<S>>)> =
            tree.direct[r.index()].iter().map(|&n| (n, None)).collect();
        for &c in &tree.children[r.index()] {
            if !layout.hidden[c.index()] {
                items.push((tree.subtree[c.index()][0], Some(c)));
            }
        }
        items.sort();
        for item in items {
            match item {
                (n, None) => {
                    let stmt = self.style.node_stmt(self.c, n);
                    self.line(depth, &stmt);
                }
                (_, Some(c)) => self.cluster(c, depth),
            }
        }
    }

    /// `subgraph cluster_N { ... }` for region `r`.
    fn cluster(&mut self, r: RegionId<S>, depth: usize) {
        let (label, pen) = match &self.c.layout.run_labels[r.index()] {
            Some(l) => (l.clone(), 2),
            None => (self.c.view.region_label(r), 1),
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

    /// One `house` node per program output.
    fn outputs(&mut self) {
        for (i, out) in self.c.view.g.outputs().iter().enumerate() {
            let label = escape(&format!("output {}", out.name));
            self.line(1, &format!("out{i} [label=\"{label}\", shape=house];"));
        }
    }
}

/// Helpers shared by the DOT printers' tests.
#[cfg(test)]
pub(crate) mod test_util {
    use std::io::Write as _;
    use std::process::{Command, Stdio};

    /// The statements of `dot` that mention `needle`.
    pub(crate) fn lines_with<'a>(dot: &'a str, needle: &str) -> Vec<&'a str> {
        dot.lines().filter(|l| l.contains(needle)).collect()
    }

    /// Runs `dot -Tsvg` on `text` and asserts that it renders without a warning; does nothing
    /// when graphviz is not installed.
    pub(crate) fn assert_graphviz_accepts(text: &str) {
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
