//! The readable text IR of the global program, the form insta snapshots hold.
//!
//! ```text
//! # tpc program from mlp.tpl
//! mesh tp
//! dim B = 8, H = 1024
//!
//! %0 = input x : f32[8,1024]                              # mlp.tpl:4:7
//! block layer.0 (layer) {
//!   %1 = param layer.0.w1 : f32[1024,4096] @ [_, tp]      # mlp.tpl:9:9  w1
//!   %2 = matmul %0, %1 : f32[8,4096]                      # mlp.tpl:10:9  h
//! }
//!
//! output y = %2 : f32[8,4096] @ [_, _]                    # mlp.tpl:12:1
//! ```
//!
//! A program with a pipelined `repeat` says so in its header, after its dims:
//! `pipeline layer ×4 over pp -> %230` (the block, its instances, the axis and the result).
//!
//! Every node is one line `results = op operands : types`, with an annotated value's spec after
//! its type (`@ [_, tp]`) and a comment holding the source location and the source names of the
//! results. Block instances are nested `block <path> (<block>) {` groups. Comments start at fixed
//! tab stops, so editing one line never realigns the others.

use super::{file_name, View};
use crate::ir::{Global, Node, Output, RegionId, Space, ValueId};
use crate::span::Span;
use std::fmt::Write;

/// The first column at which comments start.
const FIRST_STOP: usize = 56;
/// Distance between the comment tab stops after the first.
const STOP_STEP: usize = 16;

/// Prints `g` as text IR; deterministic, and panic-free on unverified graphs.
pub fn print(g: &crate::ir::Graph) -> String {
    let view = View::new(g);
    let mut p = Printer {
        view: &view,
        file: file_name(&g.source),
        b: Blocks::default(),
    };
    p.header();
    p.body();
    p.outputs();
    render(&p.b.lines)
}

/// One output line before alignment: code and an optional comment (empty for none).
pub(crate) struct Line {
    pub(crate) code: String,
    pub(crate) comment: String,
}

/// Lines inside nested `block <path> (<block>) {` groups, indented by their depth.
pub(crate) struct Blocks<S = Global> {
    /// The lines so far.
    pub(crate) lines: Vec<Line>,
    /// The open groups, outermost first.
    open: Vec<RegionId<S>>,
}

impl<S> Default for Blocks<S> {
    fn default() -> Self {
        Blocks {
            lines: Vec::new(),
            open: Vec::new(),
        }
    }
}

impl<S: Space> Blocks<S> {
    /// The indentation of a line at the current depth.
    pub(crate) fn indent(&self) -> String {
        "  ".repeat(self.open.len())
    }

    /// Adds a line with the current indentation.
    pub(crate) fn push(&mut self, code: String, comment: String) {
        let code = format!("{}{code}", self.indent());
        self.lines.push(Line { code, comment });
    }

    /// How many of the open groups lead `chain` (regions, outermost first).
    pub(crate) fn common(&self, chain: &[RegionId<S>]) -> usize {
        self.open
            .iter()
            .zip(chain)
            .take_while(|(a, b)| a == b)
            .count()
    }

    /// Closes groups until `depth` are open.
    pub(crate) fn close_to(&mut self, depth: usize) {
        while self.open.len() > depth {
            self.open.pop();
            self.push("}".into(), String::new());
        }
    }

    /// Opens one group per region of `regions`, outermost first.
    pub(crate) fn open(&mut self, view: &View<'_, S>, regions: &[RegionId<S>]) {
        for &r in regions {
            let label = view.region_label(r);
            self.push(format!("block {label} {{"), String::new());
            self.open.push(r);
        }
    }

    /// Closes and opens groups so that exactly the regions of `chain` are open.
    fn enter(&mut self, view: &View<'_, S>, chain: &[RegionId<S>]) {
        let common = self.common(chain);
        self.close_to(common);
        self.open(view, &chain[common..]);
    }
}

/// The text IR being written: lines in block groups.
struct Printer<'a, 'g> {
    view: &'a View<'g>,
    file: &'a str,
    b: Blocks,
}

impl Printer<'_, '_> {
    /// Adds a line with the current indentation.
    fn push(&mut self, code: String, comment: String) {
        self.b.push(code, comment);
    }

    /// The provenance comment, mesh axes and dims, then a blank line.
    fn header(&mut self) {
        let g = self.view.g;
        self.push(format!("# tpc program from {}", self.file), String::new());
        if !g.mesh_axes.is_empty() {
            self.push(format!("mesh {}", g.mesh_axes.join(", ")), String::new());
        }
        if !g.dims.is_empty() {
            let dims: Vec<String> = g.dims.iter().map(|(n, v)| format!("{n} = {v}")).collect();
            self.push(format!("dim {}", dims.join(", ")), String::new());
        }
        if let Some(p) = g.pipeline() {
            let code = format!(
                "pipeline {} ×{} over {} -> {}",
                p.block,
                p.instances.len(),
                p.axis,
                p.output
            );
            let comment = self.location(p.span);
            self.push(code, comment);
        }
        self.push(String::new(), String::new());
    }

    /// All nodes in storage order, inside their block groups.
    fn body(&mut self) {
        let view = self.view;
        for n in &view.nodes {
            self.b.enter(view, &view.chain(view.node_region(n)));
            let code = self.node_code(n);
            let comment = self.node_comment(n);
            self.push(code, comment);
        }
        self.b.enter(view, &[]);
    }

    /// `%3, %4 = split{axis=1,sizes=[2,2]} %2 : f32[2,2], f32[2,2]`.
    fn node_code(&self, n: &Node) -> String {
        let mut code = String::new();
        if !n.outputs.is_empty() {
            code = format!("{} = ", join(n.outputs.iter().map(|v| v.to_string())));
        }
        write!(code, "{}", n.op).unwrap();
        if !n.inputs.is_empty() {
            write!(code, " {}", join(n.inputs.iter().map(|v| v.to_string()))).unwrap();
        }
        if !n.outputs.is_empty() {
            let types = join(n.outputs.iter().map(|&v| self.typed(v)));
            write!(code, " : {types}").unwrap();
        }
        code
    }

    /// `f32[8,128] @ [_, tp]`: the type of `v` and its annotation; `?` for a dangling id.
    fn typed(&self, v: ValueId) -> String {
        let mut s = match self.view.value(v) {
            Some(val) => val.ty.to_string(),
            None => "?".into(),
        };
        if let Some(a) = self.view.g.annotation(v) {
            write!(s, " @ {}", a.spec).unwrap();
        }
        s
    }

    /// Source location, then the results' source names (`_` for unnamed ones), if any is named.
    /// A leaf's name equal to its declared name is not repeated.
    fn node_comment(&self, n: &Node) -> String {
        let leaf_name = n.op.leaf_name();
        let names: Vec<Option<&str>> = n
            .outputs
            .iter()
            .map(|&v| self.view.value(v).and_then(|val| val.name.as_deref()))
            .map(|name| name.filter(|&s| Some(s) != leaf_name))
            .collect();
        let mut parts = vec![self.location(n.span)];
        if names.iter().any(Option::is_some) {
            parts.push(join(names.iter().map(|s| s.unwrap_or("_").to_string())));
        }
        join_nonempty(&parts)
    }

    /// `mlp.tpl:9:9`, or nothing for a synthetic span (line 0).
    fn location(&self, span: Span) -> String {
        if span.line == 0 {
            return String::new();
        }
        format!("{}:{}:{}", self.file, span.line, span.col)
    }

    /// A blank line, then `output y = %9 : f32[8,128] @ [_, _]` per output.
    fn outputs(&mut self) {
        let outputs = self.view.g.outputs();
        if outputs.is_empty() {
            return;
        }
        self.push(String::new(), String::new());
        for out in outputs {
            self.output(out);
        }
    }

    /// One output line.
    fn output(&mut self, out: &Output) {
        let ty = match self.view.value(out.value) {
            Some(val) => val.ty.to_string(),
            None => "?".into(),
        };
        let mut code = format!("output {} = {} : {ty}", out.name, out.value);
        if let Some(a) = &out.annotation {
            write!(code, " @ {}", a.spec).unwrap();
        }
        let comment = self.location(out.span);
        self.push(code, comment);
    }
}

/// `a, b, c`.
pub(crate) fn join(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

/// The non-empty parts, separated by two spaces.
fn join_nonempty(parts: &[String]) -> String {
    let kept: Vec<&str> = parts
        .iter()
        .filter(|s| !s.is_empty())
        .map(String::as_str)
        .collect();
    kept.join("  ")
}

/// The column at which the comment of a line whose code is `width` characters wide starts: the
/// first tab stop leaving at least two spaces.
fn comment_column(width: usize) -> usize {
    let mut col = FIRST_STOP;
    while col < width + 2 {
        col += STOP_STEP;
    }
    col
}

/// Joins the lines, aligning comments at tab stops.
pub(crate) fn render(lines: &[Line]) -> String {
    let mut out = String::new();
    for line in lines {
        out.push_str(&line.code);
        if !line.comment.is_empty() {
            let width = line.code.chars().count();
            out.extend(std::iter::repeat_n(' ', comment_column(width) - width));
            out.push_str("# ");
            out.push_str(&line.comment);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::fixtures::*;
    use crate::ir::{Graph, Op, UnaryOp};

    #[test]
    fn prints_small_graph_exactly() {
        let got = print(&sample());
        assert_eq!(got, EXPECTED_SAMPLE, "got:\n{got}");
    }

    const EXPECTED_SAMPLE: &str = r#"# tpc program from t.tpl
mesh dp, tp
dim B = 8, H = 16

%0 = input x : f32[8,16]                                # t.tpl:4:7
block layer.0 (layer) {
  %1 = param layer.0.w : f32[16,16] @ [_, tp]           # t.tpl:9:9  w
  %2 = matmul %0, %1 : f32[8,16]                        # t.tpl:10:9  h
  block layer.0.attention (attention) {
    %3 = softmax{axis=1} %2 : f32[8,16]                 # t.tpl:20:5
    %4, %5 = split{axis=1,sizes=[8,8]} %3 : f32[8,8], f32[8,8]          # t.tpl:21:5  _, b
  }
  %6 = add %4, %5 : f32[8,8]                            # t.tpl:12:3
}
%7 = gelu %6 : f32[8,8]

output y = %7 : f32[8,8] @ [dp, _]                      # t.tpl:30:1
"#;

    #[test]
    fn output_is_deterministic() {
        let g = sample();
        assert_eq!(print(&g), print(&g.clone()));
    }

    #[test]
    fn empty_graph_has_only_the_header() {
        assert_eq!(
            print(&Graph::new("dir/e.tpl")),
            "# tpc program from e.tpl\n\n"
        );
    }

    #[test]
    fn reopens_interleaved_regions() {
        let mut g = Graph::new("t.tpl");
        let root = g.root();
        let a = g.add_region("a".into(), "blk".into(), root, 1);
        let b = g.add_region("b".into(), "blk".into(), root, 1);
        let x = add1(&mut g, Op::Input { name: "x".into() }, vec![], &[2], a);
        let y = add1(&mut g, Op::Unary { op: UnaryOp::Neg }, vec![x], &[2], b);
        add1(&mut g, Op::Unary { op: UnaryOp::Exp }, vec![y], &[2], a);
        let text = print(&g);
        assert_eq!(text.matches("block a (blk) {").count(), 2, "{text}");
        assert_eq!(text.matches("block b (blk) {").count(), 1, "{text}");
        assert_eq!(
            text.matches('{').count(),
            text.matches('}').count(),
            "{text}"
        );
        assert!(text.ends_with("}\n"), "{text}");
    }

    #[test]
    fn dangling_ids_print_without_panicking() {
        let text = print(&dangling());
        assert!(text.contains("\nmatmul %0, %77"), "{text}");
        assert!(text.contains("output y = %99 : ?\n"), "{text}");
    }

    #[test]
    fn long_lines_move_comments_to_the_next_stop() {
        assert_eq!(comment_column(0), FIRST_STOP);
        assert_eq!(comment_column(FIRST_STOP - 2), FIRST_STOP);
        assert_eq!(comment_column(FIRST_STOP - 1), FIRST_STOP + STOP_STEP);
    }
}
