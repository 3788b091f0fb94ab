//! The text form of a per-device plan: the summary, the SPMD program with each value's local
//! type and placement and each collective's provenance, identical repeated block instances shown
//! once with a count, and the collectives listed by cost, largest first.

use super::text::{join, render, Line};
use super::{file_name, View};
use crate::ir::{Graph, Node, NodeId, Op, RegionId, ValueId};
use crate::plan::summary::collective_kind;
use crate::plan::Plan;
use std::collections::HashMap;
use std::fmt::Write;

/// Prints the plan as text.
pub fn print(p: &Plan) -> String {
    let mut lines = Vec::new();
    let push =
        |lines: &mut Vec<Line>, code: String, comment: String| lines.push(Line { code, comment });
    let file = file_name(&p.global.source);
    push(
        &mut lines,
        format!(
            "# tpc plan for {file} on mesh {} ({} devices)",
            p.mesh,
            p.mesh.num_devices()
        ),
        String::new(),
    );
    for l in summary_lines(p) {
        push(&mut lines, format!("# {l}"), String::new());
    }
    push(&mut lines, String::new(), String::new());
    Body::new(p, &mut lines).print();
    push(&mut lines, String::new(), String::new());
    for o in p.local.outputs() {
        let pl = p
            .placements
            .get(o.value.index())
            .map(|x| x.display(&p.mesh))
            .unwrap_or_default();
        push(
            &mut lines,
            format!(
                "output {} = {} : {} {pl}",
                o.name,
                o.value,
                p.local.ty(o.value)
            ),
            String::new(),
        );
    }
    let mut out = render(&lines);
    out.push('\n');
    out.push_str(&collectives_table(p));
    out
}

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
    v
}

/// `12.0 KiB`, `3 B`.
pub fn bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
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
    view: View<'a>,
    lines: &'a mut Vec<Line>,
    open: Vec<RegionId>,
    notes: HashMap<RegionId, (usize, RegionId)>,
    signature: HashMap<RegionId, String>,
    ranges: HashMap<RegionId, (usize, usize)>,
}

impl<'a> Body<'a> {
    fn new(p: &'a Plan, lines: &'a mut Vec<Line>) -> Self {
        let view = View::new(&p.local);
        Body {
            p,
            view,
            lines,
            open: Vec::new(),
            notes: HashMap::new(),
            signature: HashMap::new(),
            ranges: HashMap::new(),
        }
    }

    fn push(&mut self, code: String, comment: String) {
        let indent = "  ".repeat(self.open.len());
        self.lines.push(Line {
            code: format!("{indent}{code}"),
            comment,
        });
    }

    fn print(&mut self) {
        let n = self.view.nodes.len();
        let mut i = 0;
        let mut last_sibling: HashMap<Option<RegionId>, (RegionId, usize)> = HashMap::new();
        while i < n {
            let node = self.view.nodes[i];
            let chain = self.view.chain(self.view.node_region(node));
            let common = self
                .open
                .iter()
                .zip(&chain)
                .take_while(|(a, b)| a == b)
                .count();
            self.close_to(common);
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
                for &c in &chain[common..] {
                    let label = self.view.region_label(c);
                    self.push(format!("block {label} {{"), String::new());
                    self.open.push(c);
                }
            }
            let (code, comment) = self.node_line(NodeId(i as u32), node);
            self.push(code, comment);
            i += 1;
        }
        self.close_to(0);
    }

    fn close_to(&mut self, depth: usize) {
        while self.open.len() > depth {
            self.open.pop();
            self.push("}".into(), String::new());
        }
    }

    /// Index one past the last node (from `start`) inside region `r` or its descendants.
    fn region_end(&self, start: usize, r: RegionId) -> usize {
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
    fn note_repeat(&mut self, first: RegionId, skipped: RegionId, count: usize) {
        let label = |r: RegionId| {
            self.view
                .region(r)
                .map(|x| x.path.clone())
                .unwrap_or_default()
        };
        let indent = "  ".repeat(self.open.len());
        match self.notes.get(&first) {
            Some(&(line, from)) => {
                self.lines[line].code = format!(
                    "{indent}# {} … {}: same as {} (×{count} in all)",
                    label(from),
                    label(skipped),
                    label(first)
                )
            }
            None => {
                self.notes.insert(first, (self.lines.len(), skipped));
                self.lines.push(Line {
                    code: format!(
                        "{indent}# {}: same as {} (×{count} in all)",
                        label(skipped),
                        label(first)
                    ),
                    comment: String::new(),
                });
            }
        }
    }

    /// True when the two region instances print the same but for value ids and param prefixes.
    fn same(&mut self, a: RegionId, b: RegionId) -> bool {
        let sa = self.sig(a);
        let sb = self.sig(b);
        sa == sb
    }

    fn sig(&mut self, r: RegionId) -> String {
        if let Some(s) = self.signature.get(&r) {
            return s.clone();
        }
        let path = self
            .view
            .region(r)
            .map(|x| x.path.clone())
            .unwrap_or_default();
        let (start, end) = self.ranges.get(&r).copied().unwrap_or_default();
        let mut local: HashMap<ValueId, usize> = HashMap::new();
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
                let pl = self
                    .p
                    .placements
                    .get(o.index())
                    .map(|x| x.display(&self.p.mesh))
                    .unwrap_or_default();
                let _ = write!(s, "{}:{pl};", self.p.local.ty(o));
            }
            let prov = self
                .p
                .provenance
                .get(&NodeId(i as u32))
                .map(|x| format!("{}|{}|{}:{}", x.transition, x.user, x.span.line, x.span.col))
                .unwrap_or_default();
            let _ = writeln!(s, "{op} {} {prov}", ins.join(","));
        }
        self.signature.insert(r, s.clone());
        s
    }

    fn node_line(&self, id: NodeId, n: &Node) -> (String, String) {
        let g: &Graph = &self.p.local;
        let outs = join(n.outputs.iter().map(|v| v.to_string()));
        let ins = join(n.inputs.iter().map(|v| v.to_string()));
        let types = join(n.outputs.iter().map(|&v| {
            let pl = self
                .p
                .placements
                .get(v.index())
                .map(|x| x.display(&self.p.mesh))
                .unwrap_or_default();
            format!("{} {pl}", g.ty(v))
        }));
        let sep = if ins.is_empty() { "" } else { " " };
        let code = format!("{outs} = {}{sep}{ins} : {types}", n.op);
        let file = file_name(&g.source);
        let comment = match self.p.provenance.get(&id) {
            Some(pr) => format!(
                "{} for {} at {file}:{}:{} ({})",
                pr.transition, pr.user, pr.span.line, pr.span.col, pr.value
            ),
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

/// The collectives, largest estimated time first, with provenance.
fn collectives_table(p: &Plan) -> String {
    let mut rows: Vec<(f64, String)> = Vec::new();
    let file = file_name(&p.global.source);
    for (id, n) in p.local.nodes() {
        let Some((kind, size)) = collective_kind(&n.op) else {
            continue;
        };
        let b = p.local.ty(n.inputs[0]).size_bytes() as f64;
        let (sent, _) = kind.traffic(size, b);
        let t = kind.time(size, b, &p.device);
        let why = p
            .provenance
            .get(&id)
            .map(|pr| {
                format!(
                    "{} for {} at {file}:{}:{} ({})",
                    pr.transition, pr.user, pr.span.line, pr.span.col, pr.value
                )
            })
            .unwrap_or_default();
        rows.push((
            t,
            format!(
                "{:<10} {:<15} {:>12} {:>10}  {}  {why}",
                secs(t),
                kind.name(),
                bytes(sent.round() as u64),
                p.local.ty(n.inputs[0]).to_string(),
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
