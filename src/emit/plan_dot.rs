//! Graphviz DOT output of a per-device plan: the SPMD (local) program, with one nested
//! `subgraph cluster_N` per block instance, runs of identical consecutive instances drawn once
//! (`layer.0 … layer.7 (layer) ×8`), collectives and local slices drawn distinctly with the
//! transition that required them, and edges labelled with the local type and placement.

use super::dot::escape;
use super::plan::{bytes, secs};
use super::regions::{Canvas, Style, Tree};
use super::{file_name, View};
use crate::ir::{Local, Node, NodeId, Op, Output, RegionId, ValueId};
use crate::plan::Plan;
use std::collections::HashMap;
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
    let mut canvas = Canvas::new(&view);
    if collapse {
        let mut sigs = Signatures {
            p,
            view: &view,
            cache: HashMap::new(),
        };
        canvas.collapse(MIN_COLLAPSED_RUN, |tree, a, b| sigs.same(tree, a, b));
    }
    let title = format!(
        "{} on mesh {} ({} devices)\n{}",
        file_name(&p.global.source),
        p.mesh,
        p.mesh.num_devices(),
        summary(p)
    );
    canvas.draw(&PlanStyle { p }, "tpc_plan", &title)
}

/// `all_reduce ×1 (7.0 MiB); est. step 179.3 µs`: the collectives used, bytes sent per
/// device, and the estimated step time.
fn summary(p: &Plan) -> String {
    let s = &p.summary;
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

/// The placement as text, or `?` when it does not fit the mesh (never panics).
fn placement(p: &Plan, v: ValueId<Local>) -> String {
    let rank = p.mesh.rank();
    match p.placements.get(v) {
        Some(pl) if pl.partial.len() == rank && pl.dims.iter().flatten().all(|&a| a < rank) => {
            pl.display(&p.mesh)
        }
        _ => "?".to_string(),
    }
}

/// Region signatures: two sibling instances collapse when theirs are equal.
struct Signatures<'a, 'g> {
    p: &'a Plan,
    view: &'a View<'g, Local>,
    cache: HashMap<RegionId<Local>, Option<String>>,
}

impl Signatures<'_, '_> {
    /// True when both regions are instances of one body drawing the same way.
    fn same(&mut self, tree: &Tree<Local>, a: RegionId<Local>, b: RegionId<Local>) -> bool {
        match (self.sig(tree, a), self.sig(tree, b)) {
            (Some(x), Some(y)) => x == y,
            _ => false,
        }
    }

    /// What the instance `r` draws, up to its own path: block and body, then per node its
    /// region and op relative to `r`, operands (results of earlier nodes of `r`, or external),
    /// result types and placements, and provenance.
    fn sig(&mut self, tree: &Tree<Local>, r: RegionId<Local>) -> Option<String> {
        if let Some(s) = self.cache.get(&r) {
            return s.clone();
        }
        let s = self.compute(tree, r);
        self.cache.insert(r, s.clone());
        s
    }

    /// Computes [`Self::sig`].
    fn compute(&self, tree: &Tree<Local>, r: RegionId<Local>) -> Option<String> {
        let reg = self.view.region(r)?;
        let path = reg.path.as_str();
        let rel = |s: &str| s.strip_prefix(path).unwrap_or(s).to_string();
        let mut s = format!("{} {}\n", reg.block, reg.body);
        let mut local: HashMap<ValueId<Local>, usize> = HashMap::new();
        for &id in &tree.subtree[r.index()] {
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

/// How a plan's local program is drawn.
struct PlanStyle<'a> {
    p: &'a Plan,
}

impl Style<Local> for PlanStyle<'_> {
    /// The statement drawing node `id`.
    fn node_stmt(&self, c: &Canvas<'_, '_, Local>, id: NodeId<Local>) -> String {
        let n = c.view.nodes[id.index()];
        let results = c.results(n);
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

    /// Not drawn when dangling, a loop, the flow between members of a collapsed run, or running
    /// backwards into one.
    fn node_edge(
        &self,
        c: &Canvas<'_, '_, Local>,
        v: ValueId<Local>,
        dst: NodeId<Local>,
    ) -> Option<String> {
        let (from, src, label) = self.source(c, v)?;
        let to = c.layout.rep[dst.index()];
        let mapped = src != from || to != dst;
        if src == to || c.layout.crosses_members(from, dst) || (mapped && src.index() >= to.index())
        {
            return None;
        }
        Some(format!("{src} -> {to} [label=\"{}\"];", escape(&label)))
    }

    /// Labelled like a node edge.
    fn output_edge(
        &self,
        c: &Canvas<'_, '_, Local>,
        i: usize,
        out: &Output<Local>,
    ) -> Option<String> {
        let (_, src, label) = self.source(c, out.value)?;
        Some(format!("{src} -> out{i} [label=\"{}\"];", escape(&label)))
    }
}

impl PlanStyle<'_> {
    /// `all_reduce sum over tp`, the transition, the op it is for and where, and the results.
    fn spmd_label(&self, id: NodeId<Local>, n: &Node<Local>, results: &str) -> String {
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

    /// The producer of `v`, the node drawn for it, and the edge label: `%v ` when the producer
    /// has several results, then the local type and placement (`f32[8,128,512] [_, _, tp]`).
    fn source(
        &self,
        c: &Canvas<'_, '_, Local>,
        v: ValueId<Local>,
    ) -> Option<(NodeId<Local>, NodeId<Local>, String)> {
        let val = c.view.value(v)?;
        let producer = c.view.nodes.get(val.node.index())?;
        let mut label = String::new();
        if producer.outputs.len() > 1 {
            let _ = write!(label, "{v} ");
        }
        let _ = write!(label, "{} {}", val.ty, placement(self.p, v));
        Some((val.node, c.layout.rep[val.node.index()], label))
    }
}

/// The first label line of an SPMD op (`all_reduce sum over tp`) and its mesh axis (`tp`, or
/// `(dp,tp)` for a redistribute), as its provenance names it.
fn headline(op: &Op) -> (String, String) {
    match op {
        Op::AllReduce {
            axis, reduce, also, ..
        } if also.is_empty() => (
            format!("all_reduce {} over {axis}", reduce.name()),
            axis.clone(),
        ),
        Op::AllReduce { reduce, .. } => {
            let names: Vec<&str> = op.mesh_axes().into_iter().map(|(a, _)| a).collect();
            let group = format!("({})", names.join(","));
            (format!("all_reduce {} over {group}", reduce.name()), group)
        }
        Op::AllGather { axis, dim, .. } => {
            (format!("all_gather dim {dim} over {axis}"), axis.clone())
        }
        Op::ReduceScatter {
            axis, dim, reduce, ..
        } => (
            format!("reduce_scatter {} to dim {dim} over {axis}", reduce.name()),
            axis.clone(),
        ),
        Op::AllToAll {
            axis,
            split,
            concat,
            ..
        } => (
            format!("all_to_all dim {concat} to dim {split} over {axis}"),
            axis.clone(),
        ),
        Op::ShardSlice { axis, dim, .. } => {
            (format!("shard_slice dim {dim} over {axis}"), axis.clone())
        }
        Op::KeepOnFirst { axis } => (format!("keep_on_first over {axis}"), axis.clone()),
        Op::Redistribute { axes, .. } => {
            let names: Vec<&str> = axes.iter().map(|(a, _)| a.as_str()).collect();
            let group = format!("({})", names.join(","));
            (format!("redistribute over {group}"), group)
        }
        Op::Input { .. }
        | Op::Param { .. }
        | Op::State { .. }
        | Op::MatMul
        | Op::Binary { .. }
        | Op::Scalar { .. }
        | Op::CausalMask
        | Op::FullLike { .. }
        | Op::Fill { .. }
        | Op::BroadcastTo { .. }
        | Op::UnaryGrad { .. }
        | Op::Equal
        | Op::Select
        | Op::ScatterAdd { .. }
        | Op::OneHot { .. }
        | Op::Unary { .. }
        | Op::Softmax { .. }
        | Op::LayerNorm { .. }
        | Op::RmsNorm { .. }
        | Op::Reduce { .. }
        | Op::CrossEntropy
        | Op::Embedding
        | Op::Transpose { .. }
        | Op::Reshape { .. }
        | Op::Split { .. }
        | Op::Concat { .. }
        | Op::Slice { .. }
        | Op::Cast { .. }
        | Op::VocabEmbedding { .. }
        | Op::TargetLogit { .. } => (op.to_string(), String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::CollectiveKind;
    use crate::emit::plan_json::test_plans::*;
    use crate::emit::regions::test_util::*;
    use crate::ir::IdVec;

    /// The number of collectives drawn in `dot`.
    fn collectives_drawn(dot: &str) -> usize {
        dot.lines().filter(|l| l.contains(COLLECTIVE_STYLE)).count()
    }

    /// The collective kinds of `p`, in program order.
    fn kinds(p: &Plan) -> Vec<&'static str> {
        p.local
            .nodes()
            .filter_map(|(_, n)| CollectiveKind::of(&n.op).map(|(k, _)| k.name()))
            .collect()
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
            .find(|(_, n)| matches!(n.op, Op::LayerNorm { .. }) && n.region == RegionId::new(0))
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
    fn draws_a_redistribute_with_its_placements_once() {
        let text = "mesh dp, tp\ninput x : f32[8, 8] @ [dp, tp]\noutput x @ [tp, dp]\n";
        let dot = print(&plan_of("redist.tpl", text, "dp=2,tp=4", &[]));
        assert!(
            dot.contains(
                "  n1 [label=\"redistribute over (dp,tp)\\n[dp, tp] -> [tp, dp]\\nfor output x at redist.tpl:3:8\\n%1\", shape=doubleoctagon"
            ),
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
        p.placements[ValueId::new(0)].dims[0] = vec![5];
        let mut short = std::mem::take(&mut p.placements).into_vec();
        short.truncate(3);
        p.placements = IdVec::from_vec(short);
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
        let mut plans = all();
        plans.push(example("gpt", "tp=8", &[("L", 8)]));
        for p in plans {
            assert_graphviz_accepts(&print(&p));
            assert_graphviz_accepts(&render(&p, false));
        }
    }
}
