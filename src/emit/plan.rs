//! The text form of a per-device plan: the summary, the SPMD program with each value's local
//! type and placement and each collective's provenance, identical repeated block instances shown
//! once with a count, and the collectives listed by cost, largest first.

use super::text::{join, render, Blocks};
use super::{file_name, View};
use crate::cost::CollectiveKind;
use crate::ir::{Graph, IdVec, Local, Node, NodeId, Op, RegionId, ValueId};
use crate::plan::Plan;
use std::collections::HashMap;
use std::fmt::Write;

/// Prints the plan as text.
pub fn print(p: &Plan) -> String {
    let mut b = Blocks::default();
    let file = file_name(&p.global.source);
    let (mesh, devices) = (&p.mesh, p.mesh.num_devices());
    let title = format!("# tpc plan for {file} on mesh {mesh} ({devices} devices)");
    b.push(title, String::new());
    for l in summary_lines(p) {
        b.push(format!("# {l}"), String::new());
    }
    b.push(String::new(), String::new());
    Body::new(p, &mut b).print();
    b.push(String::new(), String::new());
    for o in p.local.outputs() {
        let ty = p.local.ty(o.value);
        let pl = placement(p, o.value);
        let code = format!("output {} = {} : {ty} {pl}", o.name, o.value);
        b.push(code, String::new());
    }
    let mut out = render(&b.lines);
    out.push('\n');
    out.push_str(&collectives_table(p));
    out
}

/// The placement of local value `v` as text; empty when it has none.
fn placement(p: &Plan, v: ValueId<Local>) -> String {
    let pl = p.placements.get(v);
    pl.map(|x| x.display(&p.mesh)).unwrap_or_default()
}

/// `Partial(sum) -> Replicate over tp for add at mlp.tpl:11:5 (%7)`: why node `id` is there,
/// located in `file`.
fn provenance(p: &Plan, id: NodeId<Local>, file: &str) -> Option<String> {
    p.provenance.get(&id).map(|pr| {
        format!(
            "{} for {} at {file}:{}:{} ({})",
            pr.transition, pr.user, pr.span.line, pr.span.col, pr.value
        )
    })
}

/// The summary lines of the header.
fn summary_lines(p: &Plan) -> Vec<String> {
    let s = &p.summary;
    let mut v = Vec::new();
    let kinds: Vec<String> = s
        .collectives
        .iter()
        .map(|(k, c)| format!("{k} {} ({})", c.count, bytes(c.bytes_per_device)))
        .collect();
    v.push(format!("collectives per device: {}", kinds.join(", ")));
    v.push(format!(
        "flops per device: {:.4e}; params per device: {}; peak memory per device: {}",
        s.flops_per_device,
        bytes(s.param_bytes_per_device),
        bytes(s.peak_memory_bytes_per_device)
    ));
    v.push(format!(
        "estimated step time: {} (communication {}, compute {})",
        secs(s.estimated_time_s),
        secs(s.comm_time_s),
        secs(s.compute_time_s)
    ));
    if p.local.is_training_step() {
        v.extend(training_lines(s));
    }
    if let Some(pl) = &p.pipeline {
        v.extend(pipeline_lines(pl));
        v.extend(transfer_lines(p, pl));
    }
    v
}

/// For a pipelined step: the stages, the schedule as a table, the boundary messages, and each
/// stage's time and memory.
fn pipeline_lines(pl: &crate::pipeline::Pipeline) -> Vec<String> {
    let s = &pl.summary;
    let peak = s
        .peak_activation_microbatches
        .iter()
        .max()
        .copied()
        .unwrap_or(0);
    let mut v = vec![
        "pipeline: the figures above count every stage's work as one device's; each stage's own \
         follow"
            .to_string(),
    ];
    v.push(format!(
        "pipeline: {}={} stages, {} microbatches, {}; bubble {:.1}%; at most {peak} microbatches of \
         activations held (stage 0); {} boundary messages per step, {} once-per-step transfers",
        pl.axis,
        pl.stages,
        pl.microbatches,
        pl.schedule,
        100.0 * s.bubble_fraction,
        s.sends_per_step,
        s.step_transfers,
    ));
    v.push(format!(
        "pipeline step time: {} (schedule {}; busiest stage: compute {}, communication {}, idle {})",
        secs(s.step_time_s),
        secs(s.schedule_s),
        secs(s.split_s.0),
        secs(s.split_s.1),
        secs(s.split_s.2)
    ));
    for st in &s.per_stage {
        v.push(format!(
            "stage {}: instances {}..{}; forward {} and backward {} per microbatch, step {}; \
             memory {}: params {}, grads {}, optimizer {}, activations {} per microbatch × {} \
             held",
            st.stage,
            st.instances.0,
            st.instances.1,
            secs(st.forward_s),
            secs(st.backward_s),
            secs(st.step_s),
            bytes(st.memory_bytes),
            bytes(st.param_bytes),
            bytes(st.gradient_bytes),
            bytes(st.optimizer_bytes),
            bytes(st.activation_bytes_per_microbatch),
            st.peak_activation_microbatches
        ));
    }
    for m in &s.messages {
        v.push(format!(
            "message stage {} -> {} ({}): {} values, {} per microbatch",
            m.from,
            m.to,
            m.dir,
            m.values,
            bytes(m.bytes)
        ));
    }
    v.push("schedule (F = 1 slot, B = 2):".into());
    if let Ok(table) = crate::pipeline::schedule::table(&pl.actions) {
        v.extend(table.lines().map(|l| format!("  {l}")));
    }
    v
}

/// Each value crossing stages: which, from where to where, how, and its bytes.
fn transfer_lines(p: &Plan, pl: &crate::pipeline::Pipeline) -> Vec<String> {
    pl.transfers
        .iter()
        .map(|t| {
            let v = t.value;
            let output = p.local.outputs().iter().find(|o| o.value == v);
            let name = match (p.local.value(v).name.as_deref(), output) {
                (Some(n), _) => format!(" {n}"),
                (None, Some(o)) => format!(" {}", o.name),
                (None, None) => String::new(),
            };
            let maker = p.local.node(p.local.value(v).node);
            let region = &p.local.region(maker.region).path;
            let how = match t.crossing {
                crate::pipeline::Crossing::Forward => "forward, in each microbatch's messages",
                crate::pipeline::Crossing::Backward => "backward, in each microbatch's messages",
                crate::pipeline::Crossing::Step => "once per step",
                crate::pipeline::Crossing::Carry => "once per step, for the next step",
            };
            format!(
                "transfer {v}{name} ({} in {}): stage {} -> {} {how}, {}",
                maker.op.name(),
                if region.is_empty() {
                    "the program"
                } else {
                    region
                },
                t.from,
                t.to,
                bytes(p.local.ty(v).size_bytes())
            )
        })
        .collect()
}

/// For a training step: the collectives of each phase (kinds in use) and memory by kind.
fn training_lines(s: &crate::plan::summary::Summary) -> Vec<String> {
    let mut v = Vec::new();
    for phase in crate::ir::Phase::ALL.map(crate::ir::Phase::name) {
        let Some(ps) = s.phases.get(phase) else {
            continue;
        };
        let kinds: Vec<String> = ps
            .collectives
            .iter()
            .filter(|(_, c)| c.count > 0)
            .map(|(k, c)| format!("{k} {} ({})", c.count, bytes(c.bytes_per_device)))
            .collect();
        let kinds = if kinds.is_empty() {
            "none".to_string()
        } else {
            kinds.join(", ")
        };
        v.push(format!("{phase} collectives per device: {kinds}"));
    }
    let m = &s.memory_bytes_per_device;
    v.push(format!(
        "memory per device: params {}, grads {}, optimizer {}, activations kept for the backward {}",
        bytes(m.params),
        bytes(m.grads),
        bytes(m.optimizer),
        bytes(m.activations)
    ));
    if m.master > 0 {
        v.push(format!(
            "memory per device: f32 master weights {}",
            bytes(m.master)
        ));
    }
    if let Some(r) = &s.recompute {
        v.push(recompute_line(s.flops_per_device, r));
    }
    if let Some(z) = &s.zero {
        v.push(zero_line(z));
    }
    if let Some(mb) = &s.microbatches {
        v.push(format!(
            "microbatches: {} per step, run one after another; {} values accumulated over them \
             ({} of accumulators); collectives of one microbatch counted once per microbatch",
            mb.count,
            mb.accumulations,
            bytes(mb.accumulator_bytes)
        ));
    }
    v
}

/// `recompute: full; +2.1e15 FLOPs (+33.0%), activations 542.2 GiB → 9.0 GiB, ...`: the cloned
/// nodes' cost (`flops` counts them) and the activations kept for the backward before and after.
fn recompute_line(flops: f64, r: &crate::plan::remat::RecomputeSummary) -> String {
    let base = flops - r.flops;
    let pct = if base > 0.0 {
        100.0 * r.flops / base
    } else {
        0.0
    };
    format!(
        "recompute: {}; +{:.4e} FLOPs (+{pct:.1}%) in {} recomputed nodes ({} collectives), +{}; \
         activations kept for the backward {} → {}",
        r.policy,
        r.flops,
        r.nodes,
        r.collectives,
        secs(r.time_s),
        bytes(r.activations_before),
        bytes(r.activations_after)
    )
}

/// ZeRO's line: the stage, what it split, the params it left whole and the memory per param
/// beside the formula it should equal when every param splits.
fn zero_line(z: &crate::plan::summary::ZeroMemory) -> String {
    let l = &z.layout;
    let (what, formula) = match l.stage {
        1 => ("optimizer state", "8 + 8/d"),
        2 => ("optimizer state and gradients", "4 + 12/d"),
        _ => ("optimizer state, gradients and params", "16/d"),
    };
    let d = l.degree as f64;
    let expected = match l.stage {
        1 => 8.0 + 8.0 / d,
        2 => 4.0 + 12.0 / d,
        _ => 16.0 / d,
    };
    let whole = left_whole(&l.replicated);
    format!(
        "zero {}: {what} of {} params split over dp={}{whole}; memory per param {:.2} B (f32 adamw: {formula} = {expected:.2})",
        l.stage,
        l.sharded.len(),
        l.degree,
        z.bytes_per_param
    )
}

/// The params ZeRO left whole over dp: their count and the first eight names.
fn left_whole(names: &[String]) -> String {
    if names.is_empty() {
        return String::new();
    }
    let more = if names.len() > 8 { ", ..." } else { "" };
    format!(
        "; {} left whole over dp (no dim free of other axes divides): {}{more}",
        names.len(),
        names[..names.len().min(8)].join(", ")
    )
}

/// `12.0 KiB`, `3 B`.
pub fn bytes(b: impl Into<u128>) -> String {
    const UNITS: [&str; 8] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB"];
    let b = b.into();
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u < UNITS.len() - 1 {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.1} {}", UNITS[u])
    }
}

/// `12.3 µs`, `4.56 ms`, `1.20 s`.
pub fn secs(t: f64) -> String {
    if t >= 1.0 {
        format!("{t:.2} s")
    } else if t >= 1e-3 {
        format!("{:.2} ms", t * 1e3)
    } else {
        format!("{:.1} µs", t * 1e6)
    }
}

/// The program body, with block groups and repeat compression.
struct Body<'a> {
    p: &'a Plan,
    view: View<'a, Local>,
    b: &'a mut Blocks<Local>,
    notes: HashMap<RegionId<Local>, (usize, RegionId<Local>)>,
    signature: HashMap<RegionId<Local>, String>,
    ranges: HashMap<RegionId<Local>, (usize, usize)>,
    /// Per value, the index of the last node reading it (`plan::liveness`).
    last_use: IdVec<ValueId<Local>, Option<usize>>,
}

impl<'a> Body<'a> {
    /// The body of `p`, written into `b`.
    fn new(p: &'a Plan, b: &'a mut Blocks<Local>) -> Self {
        Body {
            p,
            view: View::new(&p.local),
            b,
            notes: HashMap::new(),
            signature: HashMap::new(),
            ranges: HashMap::new(),
            last_use: p.last_uses(),
        }
    }

    /// Writes all nodes in storage order, inside their block groups; instances the same as
    /// their previous sibling are skipped and noted.
    fn print(&mut self) {
        let n = self.view.nodes.len();
        let mut i = 0;
        let mut last_sibling: HashMap<Option<RegionId<Local>>, (RegionId<Local>, usize)> =
            HashMap::new();
        while i < n {
            let node = self.view.nodes[i];
            let chain = self.view.chain(self.view.node_region(node));
            let common = self.b.common(&chain);
            self.b.close_to(common);
            if let Some(&r) = chain.get(common) {
                let end = self.region_end(i, r);
                self.ranges.insert(r, (i, end));
                let parent = self.view.parent(r);
                if let Some((prev, count)) = last_sibling.get(&parent).copied() {
                    if self.same(prev, r) {
                        last_sibling.insert(parent, (prev, count + 1));
                        self.note_repeat(prev, r, count + 1);
                        i = end;
                        continue;
                    }
                }
                last_sibling.insert(parent, (r, 1));
                self.b.open(&self.view, &chain[common..]);
            }
            let (code, comment) = self.node_line(NodeId::new(i), node);
            self.b.push(code, comment);
            i += 1;
        }
        self.b.close_to(0);
    }

    /// Index one past the last node (from `start`) inside region `r` or its descendants.
    fn region_end(&self, start: usize, r: RegionId<Local>) -> usize {
        let mut i = start;
        while i < self.view.nodes.len()
            && self
                .view
                .chain(self.view.node_region(self.view.nodes[i]))
                .contains(&r)
        {
            i += 1;
        }
        i
    }

    /// After repeated instances are skipped, one line after the first one's `}` says so; it is
    /// updated as more repeats are found.
    fn note_repeat(&mut self, first: RegionId<Local>, skipped: RegionId<Local>, count: usize) {
        let label = |r: RegionId<Local>| {
            self.view
                .region(r)
                .map(|x| x.path.clone())
                .unwrap_or_default()
        };
        let returns = self.returns(skipped);
        match self.notes.get(&first) {
            Some(&(line, from)) => {
                self.b.lines[line].code = format!(
                    "{}# {} … {}: same as {} (×{count} in all){returns}",
                    self.b.indent(),
                    label(from),
                    label(skipped),
                    label(first)
                )
            }
            None => {
                self.notes.insert(first, (self.b.lines.len(), skipped));
                let note = format!(
                    "# {}: same as {} (×{count} in all){returns}",
                    label(skipped),
                    label(first)
                );
                self.b.push(note, String::new());
            }
        }
    }

    /// `"; <path> defines %a, %b"` for the values of skipped instance `r` that are read after it
    /// (so that every id the listing references is named somewhere), or "" when none are.
    fn returns(&self, r: RegionId<Local>) -> String {
        let (start, end) = self.ranges.get(&r).copied().unwrap_or_default();
        let ids: Vec<String> = self.view.nodes[start..end]
            .iter()
            .flat_map(|n| &n.outputs)
            .filter(|v| self.last_use[**v].is_some_and(|l| l >= end))
            .map(|v| v.to_string())
            .collect();
        if ids.is_empty() {
            return String::new();
        }
        let path = self.view.region(r).map(|x| x.path.as_str()).unwrap_or("");
        format!("; {path} defines {}", ids.join(", "))
    }

    /// True when the two region instances print the same but for value ids and param prefixes.
    fn same(&mut self, a: RegionId<Local>, b: RegionId<Local>) -> bool {
        let sa = self.sig(a);
        let sb = self.sig(b);
        sa == sb
    }

    fn sig(&mut self, r: RegionId<Local>) -> String {
        if let Some(s) = self.signature.get(&r) {
            return s.clone();
        }
        let path = self
            .view
            .region(r)
            .map(|x| x.path.clone())
            .unwrap_or_default();
        let (start, end) = self.ranges.get(&r).copied().unwrap_or_default();
        let mut local: HashMap<ValueId<Local>, usize> = HashMap::new();
        let mut s = String::new();
        for i in start..end {
            let n = self.view.nodes[i];
            let op = match &n.op {
                Op::Param { name } => format!("param {}", name.strip_prefix(&path).unwrap_or(name)),
                op => op.to_string(),
            };
            let ins: Vec<String> = n
                .inputs
                .iter()
                .map(|v| {
                    local
                        .get(v)
                        .map(|k| format!("v{k}"))
                        .unwrap_or_else(|| "ext".into())
                })
                .collect();
            for &o in &n.outputs {
                let k = local.len();
                local.insert(o, k);
                let _ = write!(s, "{}:{};", self.p.local.ty(o), placement(self.p, o));
            }
            let prov = self
                .p
                .provenance
                .get(&NodeId::new(i))
                .map(|x| format!("{}|{}|{}:{}", x.transition, x.user, x.span.line, x.span.col))
                .unwrap_or_default();
            let _ = writeln!(s, "{op} {} {prov}", ins.join(","));
        }
        self.signature.insert(r, s.clone());
        s
    }

    fn node_line(&self, id: NodeId<Local>, n: &Node<Local>) -> (String, String) {
        let g: &Graph<Local> = &self.p.local;
        let outs = join(n.outputs.iter().map(|v| v.to_string()));
        let ins = join(n.inputs.iter().map(|v| v.to_string()));
        let types = join(
            n.outputs
                .iter()
                .map(|&v| format!("{} {}", g.ty(v), placement(self.p, v))),
        );
        let sep = if ins.is_empty() { "" } else { " " };
        let code = format!("{outs} = {}{sep}{ins} : {types}", n.op);
        let file = file_name(&g.source);
        let comment = match provenance(self.p, id, file) {
            Some(why) => why,
            None => {
                let name = n
                    .outputs
                    .first()
                    .and_then(|v| g.value(*v).name.clone())
                    .filter(|_| !n.op.is_leaf())
                    .map(|s| format!("  {s}"))
                    .unwrap_or_default();
                format!("{file}:{}:{}{name}", n.span.line, n.span.col)
            }
        };
        (code, comment)
    }
}

/// The type a collective moves, or for a bucket its size: `bucket of 12`.
fn moved_type(p: &Plan, n: &Node<Local>) -> String {
    match n.inputs.as_slice() {
        [x] => p.local.ty(*x).to_string(),
        all => format!("bucket of {}", all.len()),
    }
}

/// The collectives, largest estimated time first, with provenance.
fn collectives_table(p: &Plan) -> String {
    let mut rows: Vec<(f64, String)> = Vec::new();
    let file = file_name(&p.global.source);
    let temporal = p.mesh.temporal().map(|a| p.mesh.axis_name(a));
    for (id, n) in p.local.nodes() {
        let Some((kind, size)) = CollectiveKind::of(&n.op) else {
            continue;
        };
        // A sum over the microbatches is a local accumulation, not a collective.
        if n.op.mesh_axes().iter().any(|(a, _)| Some(*a) == temporal) {
            continue;
        }
        let b = n
            .inputs
            .iter()
            .map(|&v| p.local.ty(v).size_bytes())
            .sum::<u64>() as f64;
        let (sent, _) = kind.traffic(size, b);
        let t = kind.time(size, b, &p.device);
        let why = provenance(p, id, file).unwrap_or_default();
        rows.push((
            t,
            format!(
                "{:<10} {:<15} {:>12} {:>10}  {}  {why}",
                secs(t),
                kind.name(),
                bytes(sent.round() as u64),
                moved_type(p, n),
                n.outputs[0]
            ),
        ));
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut out = format!("# collectives, largest first ({}):\n", rows.len());
    if rows.is_empty() {
        out.push_str("#   none\n");
    }
    for (_, r) in rows {
        let _ = writeln!(out, "#   {r}");
    }
    out
}
