//! Graphviz DOT output of a per-device plan: the SPMD (local) program, with one nested
//! `subgraph cluster_N` per block instance, runs of identical consecutive instances drawn once
//! (`layer.0 … layer.7 (layer) ×8`), collectives and local slices drawn distinctly with the
//! transition that required them, and edges labelled with the local type and placement.

use super::dot::escape;
use super::plan::{bytes, secs};
use super::{file_name, View};
use crate::ir::{Node, NodeId, Op, RegionId, ValueId};
use crate::plan::Plan;
use std::collections::{BTreeSet, HashMap};
use std::fmt::Write;

/// Runs of at least this many consecutive identical sibling instances are drawn once.
pub const MIN_COLLAPSED_RUN: usize = 2;

/// Node attributes of collectives.
const COLLECTIVE_STYLE: &str = "shape=doubleoctagon, style=filled, fillcolor=\"#f4a582\"";
/// Node attributes of local slices (`shard_slice`, `keep_on_first`): no communication.
const SLICE_STYLE: &str = "shape=box, style=\"filled,dashed\", fillcolor=\"#92c5de\"";

/// Prints the plan's SPMD program as DOT, identical consecutive instances drawn once.
pub fn print(p: &Plan) -> String {
    render(p, true)
}

/// The DOT text, with or without collapsing.
fn render(p: &Plan, collapse: bool) -> String {
    let view = View::new(&p.local);
    let tree = Tree::new(&view);
    let layout = if collapse {
        Layout::collapsed(p, &view, &tree)
    } else {
        Layout::full(&view)
    };
    let mut w = Writer {
        p,
        view: &view,
        tree: &tree,
        layout: &layout,
        out: String::new(),
    };
    w.graph();
    w.out
}

/// The placement as text, or `?` when it does not fit the mesh (never panics).
fn placement(p: &Plan, v: ValueId) -> String {
    let rank = p.mesh.rank();
    match p.placements.get(v.index()) {
        Some(pl) if pl.partial.len() == rank && pl.dims.iter().flatten().all(|&a| a < rank) => {
            pl.display(&p.mesh)
        }
        _ => "?".to_string(),
    }
}

/// The normalized region tree of the local program.
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

/// What is drawn: hidden regions, the node standing for each node, run labels and membership.
struct Layout {
    /// Regions not drawn (later members of a collapsed run, and everything inside them).
    hidden: Vec<bool>,
    /// The node drawn for each node (itself unless it lies in a hidden region).
    rep: Vec<NodeId>,
    /// Labels of the clusters standing for a collapsed run, by region.
    run_labels: Vec<Option<String>>,
    /// Per node, the collapsed runs containing it, as (run, member index).
    member: Vec<Vec<(usize, usize)>>,
    /// Number of runs collapsed so far.
    runs: usize,
}

impl Layout {
    /// Every region drawn.
    fn full(view: &View) -> Self {
        Layout {
            hidden: vec![false; view.regions.len()],
            rep: (0..view.nodes.len()).map(|i| NodeId(i as u32)).collect(),
            run_labels: vec![None; view.regions.len()],
            member: vec![Vec::new(); view.nodes.len()],
            runs: 0,
        }
    }

    /// Runs of identical consecutive sibling instances collapsed into their first member,
    /// outer runs first, then runs inside the first members.
    fn collapsed(p: &Plan, view: &View, tree: &Tree) -> Self {
        let mut l = Layout::full(view);
        let mut sigs = Signatures {
            p,
            view,
            tree,
            cache: HashMap::new(),
        };
        for r in 0..view.regions.len() {
            if l.hidden[r] {
                continue;
            }
            for run in sigs.runs(&tree.children[r]) {
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
        let members: BTreeSet<RegionId> = run[1..].iter().copied().collect();
        for r in 1..view.regions.len() {
            let id = RegionId(r as u32);
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
    fn crosses_members(&self, a: NodeId, b: NodeId) -> bool {
        let (ma, mb) = (&self.member[a.index()], &self.member[b.index()]);
        ma.iter()
            .any(|&(run, i)| mb.iter().any(|&(r2, j)| r2 == run && j != i))
    }
}

/// Region signatures: two sibling instances collapse when theirs are equal.
struct Signatures<'a, 'g> {
    p: &'a Plan,
    view: &'a View<'g>,
    tree: &'a Tree,
    cache: HashMap<RegionId, Option<String>>,
}

impl Signatures<'_, '_> {
    /// The maximal runs of at least [`MIN_COLLAPSED_RUN`] consecutive identical regions of
    /// `sibs`.
    fn runs(&mut self, sibs: &[RegionId]) -> Vec<Vec<RegionId>> {
        let mut runs = Vec::new();
        let mut i = 0;
        while i < sibs.len() {
            let mut j = i + 1;
            while j < sibs.len() && self.same(sibs[i], sibs[j]) {
                j += 1;
            }
            if j - i >= MIN_COLLAPSED_RUN {
                runs.push(sibs[i..j].to_vec());
            }
            i = j;
        }
        runs
    }

    /// True when both regions are instances of one body drawing the same way.
    fn same(&mut self, a: RegionId, b: RegionId) -> bool {
        let (na, nb) = (&self.tree.subtree[a.index()], &self.tree.subtree[b.index()]);
        if na.len() != nb.len() {
            return false;
        }
        match (self.sig(a), self.sig(b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        }
    }

    /// What the instance `r` draws, up to its own path: block and body, then per node its
    /// region and op relative to `r`, operands (results of earlier nodes of `r`, or external),
    /// result types and placements, and provenance.
    fn sig(&mut self, r: RegionId) -> Option<String> {
        if let Some(s) = self.cache.get(&r) {
            return s.clone();
        }
        let s = self.compute(r);
        self.cache.insert(r, s.clone());
        s
    }

    /// Computes [`Self::sig`].
    fn compute(&self, r: RegionId) -> Option<String> {
        let reg = self.view.region(r)?;
        let path = reg.path.as_str();
        let rel = |s: &str| s.strip_prefix(path).unwrap_or(s).to_string();
        let mut s = format!("{} {}\n", reg.block, reg.body);
        let mut local: HashMap<ValueId, usize> = HashMap::new();
        for &id in &self.tree.subtree[r.index()] {
            let n = self.view.nodes[id.index()];
            let inner = self
                .view
                .region(self.view.node_region(n))
                .map_or(String::new(), |x| format!("{} {}", rel(&x.path), x.block));
            let op = match &n.op {
                Op::Param { name } => format!("param {}", rel(name)),
                op => op.to_string(),
            };
            let ins: Vec<String> = n
                .inputs
                .iter()
                .map(|v| local.get(v).map_or("ext".into(), |k| format!("v{k}")))
                .collect();
            let outs: Vec<String> = n
                .outputs
                .iter()
                .map(|&v| {
                    let ty = self.view.value(v).map(|x| x.ty.to_string());
                    format!("{} {}", ty.unwrap_or_default(), placement(self.p, v))
                })
                .collect();
            for &o in &n.outputs {
                let k = local.len();
                local.insert(o, k);
            }
            let prov = self
                .p
                .provenance
                .get(&id)
                .map(|x| format!("{}|{}|{}:{}", x.transition, x.user, x.span.line, x.span.col));
            let _ = writeln!(
                s,
                "[{inner}] {op} ({}) -> {} {}",
                ins.join(","),
                outs.join(","),
                prov.unwrap_or_default()
            );
        }
        Some(s)
    }
}

/// Writes the DOT text.
struct Writer<'a, 'g> {
    p: &'a Plan,
    view: &'a View<'g>,
    tree: &'a Tree,
    layout: &'a Layout,
    out: String,
}

impl Writer<'_, '_> {
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
        let title = format!(
            "{} on mesh {} ({} devices)\n{}",
            file_name(&self.p.global.source),
            self.p.mesh,
            self.p.mesh.num_devices(),
            self.summary()
        );
        self.line(0, "digraph tpc_plan {");
        self.line(1, &format!("label=\"{}\";", escape(&title)));
        self.line(1, "labelloc=t;");
        self.line(1, "node [fontname=\"Helvetica\", fontsize=10];");
        self.line(1, "edge [fontname=\"Helvetica\", fontsize=9];");
        self.region_body(RegionId(0), 1);
        self.outputs();
        self.edges();
        self.line(0, "}");
    }

    /// `all_reduce ×1 (7.0 MiB); est. step 179.3 µs`: the collectives used, bytes sent per
    /// device, and the estimated step time.
    fn summary(&self) -> String {
        let s = &self.p.summary;
        let used: Vec<String> = s
            .collectives
            .iter()
            .filter(|(_, k)| k.count > 0)
            .map(|(name, k)| format!("{name} ×{} ({})", k.count, bytes(k.bytes_per_device)))
            .collect();
        let used = if used.is_empty() {
            "no collectives".to_string()
        } else {
            used.join(", ")
        };
        format!("{used}; est. step {}", secs(s.estimated_time_s))
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

    /// The statement drawing node `id`.
    fn node_stmt(&self, id: NodeId) -> String {
        let n = self.view.nodes[id.index()];
        let results = self.results(n);
        let (label, style) = match &n.op {
            Op::Input { .. } => (format!("{}\n{results}", n.op), "shape=invhouse"),
            Op::Param { .. } => (
                format!("{}\n{results}", n.op),
                "shape=box, style=filled, fillcolor=lightyellow",
            ),
            op if op.is_collective() => (self.spmd_label(id, n, &results), COLLECTIVE_STYLE),
            Op::ShardSlice { .. } | Op::KeepOnFirst { .. } => {
                (self.spmd_label(id, n, &results), SLICE_STYLE)
            }
            op => (format!("{op}\n{results}"), "shape=ellipse"),
        };
        format!("{id} [label=\"{}\", {style}];", escape(&label))
    }

    /// `all_reduce sum over tp`, the transition, the op it is for and where, and the results.
    fn spmd_label(&self, id: NodeId, n: &Node, results: &str) -> String {
        let (head, axis) = headline(&n.op);
        let mut label = head;
        if let Some(pr) = self.p.provenance.get(&id) {
            let suffix = format!(" over {axis}");
            let t = pr
                .transition
                .strip_suffix(&suffix)
                .unwrap_or(&pr.transition);
            let file = file_name(&self.p.local.source);
            let _ = write!(
                label,
                "\n{t}\nfor {} at {file}:{}:{}",
                pr.user, pr.span.line, pr.span.col
            );
        }
        label.push('\n');
        label.push_str(results);
        label
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

    /// All edges as drawn: operands into nodes, then values into outputs, without duplicates.
    fn edges(&mut self) {
        let mut seen = BTreeSet::new();
        let mut lines = Vec::new();
        for (i, n) in self.view.nodes.iter().enumerate() {
            let dst = NodeId(i as u32);
            for &v in &n.inputs {
                let Some((from, src, label)) = self.source(v) else {
                    continue;
                };
                let to = self.layout.rep[dst.index()];
                let mapped = src != from || to != dst;
                if src == to
                    || self.layout.crosses_members(from, dst)
                    || (mapped && src.index() >= to.index())
                {
                    continue;
                }
                let e = format!("{src} -> {to} [label=\"{}\"];", escape(&label));
                if seen.insert(e.clone()) {
                    lines.push(e);
                }
            }
        }
        for (i, out) in self.view.g.outputs().iter().enumerate() {
            if let Some((_, src, label)) = self.source(out.value) {
                let e = format!("{src} -> out{i} [label=\"{}\"];", escape(&label));
                if seen.insert(e.clone()) {
                    lines.push(e);
                }
            }
        }
        for e in lines {
            self.line(1, &e);
        }
    }

    /// The producer of `v`, the node drawn for it, and the edge label: `%v ` when the producer
    /// has several results, then the local type and placement (`f32[8,128,512] [_, _, tp]`).
    fn source(&self, v: ValueId) -> Option<(NodeId, NodeId, String)> {
        let val = self.view.value(v)?;
        let producer = self.view.nodes.get(val.node.index())?;
        let mut label = String::new();
        if producer.outputs.len() > 1 {
            let _ = write!(label, "{v} ");
        }
        let _ = write!(label, "{} {}", val.ty, placement(self.p, v));
        Some((val.node, self.layout.rep[val.node.index()], label))
    }
}

/// The first label line of an SPMD op (`all_reduce sum over tp`) and its mesh axis.
fn headline(op: &Op) -> (String, &str) {
    match op {
        Op::AllReduce { axis, reduce, .. } => {
            (format!("all_reduce {} over {axis}", reduce.name()), axis)
        }
        Op::AllGather { axis, dim, .. } => (format!("all_gather dim {dim} over {axis}"), axis),
        Op::ReduceScatter {
            axis, dim, reduce, ..
        } => (
            format!("reduce_scatter {} to dim {dim} over {axis}", reduce.name()),
            axis,
        ),
        Op::AllToAll {
            axis,
            split,
            concat,
            ..
        } => (
            format!("all_to_all dim {concat} to dim {split} over {axis}"),
            axis,
        ),
        Op::ShardSlice { axis, dim, .. } => (format!("shard_slice dim {dim} over {axis}"), axis),
        Op::KeepOnFirst { axis } => (format!("keep_on_first over {axis}"), axis),
        op => (op.to_string(), ""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::plan_json::test_plans::*;
    use crate::plan::summary::collective_kind;

    /// The number of collectives drawn in `dot`.
    fn collectives_drawn(dot: &str) -> usize {
        dot.lines().filter(|l| l.contains(COLLECTIVE_STYLE)).count()
    }

    /// The collective kinds of `p`, in program order.
    fn kinds(p: &Plan) -> Vec<&'static str> {
        p.local
            .nodes()
            .filter_map(|(_, n)| collective_kind(&n.op).map(|(k, _)| k.name()))
            .collect()
    }

    /// The statements of `dot` that mention `needle`.
    fn lines_with<'a>(dot: &'a str, needle: &str) -> Vec<&'a str> {
        dot.lines().filter(|l| l.contains(needle)).collect()
    }

    #[test]
    fn draws_the_mlp_plan() {
        let p = example("mlp", "tp=8", &[]);
        let dot = print(&p);
        let title = format!(
            "digraph tpc_plan {{\n  label=\"mlp.tpl on mesh tp=8 (8 devices)\\nall_reduce ×1 (7.0 MiB); est. step {}\";\n",
            secs(p.summary.estimated_time_s)
        );
        assert!(dot.starts_with(&title), "{dot}");
        assert!(dot.ends_with("}\n"), "{dot}");
        assert!(dot.contains(
            "  n8 [label=\"all_reduce sum over tp\\nPartial(sum) -> Replicate\\nfor add at mlp.tpl:11:5\\n%8\", shape=doubleoctagon, style=filled, fillcolor=\"#f4a582\"];"
        ), "{dot}");
        assert!(
            dot.contains("  n3 [label=\"input x\\n%3 x\", shape=invhouse];"),
            "{dot}"
        );
        assert!(dot.contains(
            "  n0 [label=\"param w1\\n%0 w1\", shape=box, style=filled, fillcolor=lightyellow];"
        ));
        assert!(
            dot.contains("  n4 -> n5 [label=\"f32[8,128,512] [_, _, tp]\"];"),
            "{dot}"
        );
        assert!(
            dot.contains("  n7 -> n8 [label=\"f32[8,128,1024] [_, _, _]{sum:tp}\"];"),
            "{dot}"
        );
        assert!(
            dot.contains("  n10 -> out0 [label=\"f32[8,128,1024] [_, _, _]\"];"),
            "{dot}"
        );
        assert!(dot.contains("  out0 [label=\"output y\", shape=house];"));
        assert_eq!(collectives_drawn(&dot), 1);
        assert_eq!(lines_with(&dot, " -> ").len(), 12, "{dot}");
        assert_eq!(dot, print(&p));
    }

    #[test]
    fn collapses_identical_layers() {
        let p = example("gpt", "tp=8", &[("L", 8)]);
        let dot = print(&p);
        assert!(
            dot.contains("label=\"layer.0 … layer.7 (layer) ×8\";"),
            "{dot}"
        );
        assert!(!dot.contains("layer.1 (layer)"), "{dot}");
        // One layer drawn, with its attention and mlp instances.
        assert_eq!(lines_with(&dot, "subgraph cluster_").len(), 3, "{dot}");
        assert!(
            dot.contains("label=\"layer.0.attention (attention)\";"),
            "{dot}"
        );
        // Each collective kind of one layer appears once, plus those outside the layers.
        let per_layer = kinds(&example("gpt", "tp=8", &[("L", 1)])).len();
        let all = kinds(&p).len();
        assert_eq!(all, per_layer + 7 * 2, "two all-reduces per layer");
        assert_eq!(collectives_drawn(&dot), per_layer);
        // The chain enters the run at layer.0 and leaves it from layer.0's last node.
        let full = render(&p, false);
        assert_eq!(lines_with(&full, "subgraph cluster_").len(), 8 * 3);
        assert_eq!(collectives_drawn(&full), all);
        let lnf = p
            .local
            .nodes()
            .find(|(_, n)| matches!(n.op, Op::LayerNorm { .. }) && n.region == RegionId(0))
            .map(|(id, _)| id)
            .unwrap();
        assert_eq!(
            lines_with(&dot, &format!("-> {lnf} ")).len(),
            3,
            "h, lnf_g, lnf_b into the final layernorm: {dot}"
        );
        let l2 = example("gpt", "tp=8", &[]);
        assert!(print(&l2).contains("label=\"layer.0 … layer.1 (layer) ×2\";"));
    }

    #[test]
    fn single_instances_are_not_collapsed() {
        for ex in ["mlp", "attention", "gpt_layer"] {
            let p = example(ex, "tp=8", &[]);
            assert_eq!(print(&p), render(&p, false), "{ex}");
        }
        let p = example("gpt", "tp=8", &[("L", 1)]);
        assert_eq!(print(&p), render(&p, false));
    }

    #[test]
    fn draws_each_kind_of_resharding() {
        let p = reshard_plan();
        let dot = print(&p);
        let title = format!(
            "  label=\"reshard.tpl on mesh tp=8 (8 devices)\\nall_gather ×1 (1.8 KiB), \
             all_to_all ×1 (224 B), reduce_scatter ×1 (1.8 KiB); est. step {}\";",
            secs(p.summary.estimated_time_s)
        );
        assert!(dot.contains(&title), "{dot}");
        let want = [
            "  n3 [label=\"reduce_scatter sum to dim 1 over tp\\nPartial(sum) -> Shard(1)\\nfor sharding constraint on h at reshard.tpl:5:13\\n%3\", shape=doubleoctagon, style=filled, fillcolor=\"#f4a582\"];",
            "  n5 [label=\"all_gather dim 1 over tp\\nShard(1) -> Replicate\\nfor sharding constraint on r at reshard.tpl:6:15\\n%5\", shape=doubleoctagon, style=filled, fillcolor=\"#f4a582\"];",
            "  n6 [label=\"shard_slice dim 0 over tp\\nReplicate -> Shard(0)\\nfor scalar at reshard.tpl:7:5\\n%6\", shape=box, style=\"filled,dashed\", fillcolor=\"#92c5de\"];",
            "  n8 [label=\"all_to_all dim 0 to dim 1 over tp\\nShard(0) -> Shard(1)\\nfor output s at reshard.tpl:8:8\\n%8\", shape=doubleoctagon, style=filled, fillcolor=\"#f4a582\"];",
            "  n2 -> n3 [label=\"f32[8,64] [_, _]{sum:tp}\"];",
            "  n5 -> n6 [label=\"f32[8,64] [_, _]\"];",
            "  n6 -> n7 [label=\"f32[1,64] [tp, _]\"];",
            "  n8 -> out0 [label=\"f32[8,8] [_, tp]\"];",
        ];
        for w in want {
            assert!(dot.contains(w), "{w}\n{dot}");
        }
        assert_eq!(collectives_drawn(&dot), 3);
        assert_eq!(lines_with(&dot, SLICE_STYLE).len(), 1);
    }

    #[test]
    fn draws_the_vocab_parallel_loss() {
        let dot = print(&vocab_parallel_plan());
        assert!(dot.contains(
            "  n5 [label=\"all_reduce max over tp\\nPartial(max) -> Replicate\\nfor cross_entropy (vocab-parallel: max of the logits) at ce.tpl:7:8\\n%5\""
        ), "{dot}");
        assert_eq!(collectives_drawn(&dot), 3);
        assert!(
            dot.contains("  n10 [label=\"target_logit{tp=8}\\n%10\", shape=ellipse];"),
            "{dot}"
        );
        assert!(
            dot.contains("  n4 -> n5 [label=\"f32[8,2048,1] [_, _, _]{max:tp}\"];"),
            "{dot}"
        );
    }

    #[test]
    fn multi_result_edges_name_the_value() {
        let dot = print(&split_plan());
        assert!(
            dot.contains(
                "  n4 [label=\"split{axis=1,sizes=[16,48]}\\n%4 a, %5 b\", shape=ellipse];"
            ),
            "{dot}"
        );
        assert!(
            dot.contains("  n4 -> out0 [label=\"%4 f32[8,16] [_, _]\"];"),
            "{dot}"
        );
        assert!(
            dot.contains("  n4 -> out1 [label=\"%5 f32[8,48] [_, _]\"];"),
            "{dot}"
        );
    }

    #[test]
    fn labels_are_escaped_and_plans_without_provenance_draw() {
        let mut p = reshard_plan();
        p.global.source = "dir/we\"ird.tpl".into();
        p.local.source = p.global.source.clone();
        p.provenance.clear();
        let dot = print(&p);
        assert!(dot.contains("label=\"we\\\"ird.tpl on mesh tp=8"), "{dot}");
        assert!(
            dot.contains(
                "  n3 [label=\"reduce_scatter sum to dim 1 over tp\\n%3\", shape=doubleoctagon"
            ),
            "{dot}"
        );
        for l in dot.lines() {
            let bare = l.replace("\\\\", "").replace("\\\"", "");
            assert_eq!(bare.matches('"').count() % 2, 0, "{l}");
        }
        // Placements that do not fit the mesh print as `?` rather than panicking.
        p.placements[0].dims[0] = vec![5];
        p.placements.truncate(3);
        let dot = print(&p);
        assert!(dot.contains("  n0 -> n2 [label=\"f32[8,8] ?\"];"), "{dot}");
        assert!(
            dot.contains("  n8 -> out0 [label=\"f32[8,8] ?\"];"),
            "{dot}"
        );
    }

    #[test]
    fn loaded_plans_draw_the_same() {
        for p in all() {
            let back =
                crate::emit::plan_json::from_json(&crate::emit::plan_json::to_json(&p)).unwrap();
            assert_eq!(print(&back), print(&p));
        }
    }

    /// Every plan renders with `dot -Tsvg` without a warning (when graphviz is installed).
    #[test]
    fn graphviz_accepts_every_example() {
        use std::io::Write as _;
        use std::process::{Command, Stdio};
        let mut plans = all();
        plans.push(example("gpt", "tp=8", &[("L", 8)]));
        for p in plans {
            for text in [print(&p), render(&p, false)] {
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
}
