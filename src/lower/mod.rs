//! Lowering: AST to `ir::Graph`. Resolves names and dims, expands blocks (each block body is
//! lowered once per argument signature and stamped per call), and infers shapes.

mod builtins;
mod consts;
mod error;
mod expr;
mod pipeline;
mod scope;
mod size;
mod template;
mod train;

pub use error::LowerError;

use crate::ir::{Graph, Output, TensorType, Training};
use crate::span::Span;
use crate::syntax::ast::{BlockDef, Item, Module};
use scope::Scope;
use std::collections::HashMap;
use std::rc::Rc;
use template::Template;

/// A lowered program: the global forward graph and, when the program has a `train` statement,
/// what it trains.
#[derive(Clone, Debug)]
pub struct Lowered {
    /// The forward program.
    pub graph: Graph,
    /// The resolved `train` statement.
    pub training: Option<Training>,
    /// Each `repeat` call lowered, its count as written (before any cap).
    pub repeats: Vec<usize>,
}

/// Lowers a parsed module to its verified-shape global forward program (a `train` statement is
/// checked, then left out: see [`lower_program`]). `overrides` replace dim values
/// (`--set H=4096`); naming a dim the program does not declare is an error.
pub fn lower(
    module: &Module,
    source: &str,
    overrides: &[(String, i64)],
) -> Result<Graph, LowerError> {
    lower_program(module, source, overrides).map(|l| l.graph)
}

/// Lowers a parsed module to its forward program and what it trains.
pub fn lower_program(
    module: &Module,
    source: &str,
    overrides: &[(String, i64)],
) -> Result<Lowered, LowerError> {
    lower_program_capped(module, source, overrides, None)
}

/// [`lower_program`] with every `repeat` stamping at most `cap` instances, when given (the
/// auto-sharder's short instances of a deep stack).
pub fn lower_program_capped(
    module: &Module,
    source: &str,
    overrides: &[(String, i64)],
    cap: Option<usize>,
) -> Result<Lowered, LowerError> {
    let mut prog = Program::new(module, overrides)?;
    prog.repeat_cap = cap;
    let mut g = Graph::new(source);
    g.mesh_axes = prog.mesh_axes.iter().map(|(a, _)| a.clone()).collect();
    g.dims = prog
        .dim_order
        .iter()
        .map(|d| (d.clone(), prog.dims[d]))
        .collect();
    let root = g.root();
    let mut scope = Scope::new(&mut g, root, false, &module.items, None, &prog);
    for item in &module.items {
        scope.item(item, &mut prog)?;
    }
    let training = scope
        .training
        .take()
        .map(|(loss, optimizer, span)| Training {
            loss,
            optimizer,
            frozen: std::mem::take(&mut scope.frozen),
            loss_scale: scope.loss_scale,
            span,
        });
    if let (true, Some(t)) = (g.outputs().is_empty(), &training) {
        // A training program returns its loss when it declares nothing else.
        let name = g
            .value(t.loss)
            .name
            .clone()
            .unwrap_or_else(|| "loss".into());
        g.add_output(Output {
            name,
            value: t.loss,
            annotation: None,
            span: t.span,
            like: None,
        });
    }
    if g.outputs().is_empty() {
        let end = module.items.last().map(item_span).unwrap_or_default();
        return Err(LowerError::Invalid {
            message: "the program has no output".into(),
            span: Span {
                start: end.end,
                end: end.end,
                line: end.line,
                col: end.col,
            },
            hint: Some("declare what the program returns with `output NAME`".into()),
        });
    }
    Ok(Lowered {
        graph: g,
        training,
        repeats: prog.repeats,
    })
}

fn item_span(item: &Item) -> Span {
    match item {
        Item::Mesh(ids) => ids.first().map(|i| i.span).unwrap_or_default(),
        Item::Dims(defs) => defs
            .first()
            .map(|d| d.name.span.join(d.value.span()))
            .unwrap_or_default(),
        Item::Input(d) | Item::Param(d) => d.span,
        Item::Output(outs) => outs.first().map(|o| o.name.span).unwrap_or_default(),
        Item::Assign(a) => a.span,
        Item::Block(b) => b.span,
        Item::Train(t) => t.span,
    }
}

/// Program-wide context: declared blocks, dims, mesh axes, and the cache of lowered block bodies.
pub(crate) struct Program<'a> {
    blocks: HashMap<&'a str, &'a BlockDef>,
    dims: HashMap<String, i64>,
    dim_spans: HashMap<String, Span>,
    dim_order: Vec<String>,
    mesh_axes: Vec<(String, Span)>,
    /// The axis of the pipelined `repeat`, where it names it (see `find_pipeline_axis`).
    pipeline_axis: Option<(String, Span)>,
    templates: HashMap<(String, Vec<TensorType>), Rc<Template>>,
    next_body: u32,
    stack: Vec<String>,
    /// At most this many instances per `repeat`, when set.
    repeat_cap: Option<usize>,
    /// Each `repeat` call's count as written, in lowering order.
    repeats: Vec<usize>,
}

/// Largest program accepted, in ops (a guard against runaway repeat counts).
const MAX_NODES: usize = 2_000_000;

/// Deepest chain of nested block calls accepted (guards runaway recursion through blocks).
const MAX_BLOCK_DEPTH: usize = 64;

impl<'a> Program<'a> {
    fn new(module: &'a Module, overrides: &[(String, i64)]) -> Result<Self, LowerError> {
        let mut p = Program {
            blocks: HashMap::new(),
            dims: HashMap::new(),
            dim_spans: HashMap::new(),
            dim_order: Vec::new(),
            mesh_axes: Vec::new(),
            pipeline_axis: None,
            templates: HashMap::new(),
            next_body: 1,
            stack: Vec::new(),
            repeat_cap: None,
            repeats: Vec::new(),
        };
        if let Some((name, v)) = overrides.iter().find(|(_, v)| *v <= 0) {
            return Err(LowerError::BadSet {
                message: format!("{name}={v}: a dim must be a positive integer"),
                hint: None,
            });
        }
        let ov: HashMap<&str, i64> = overrides.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        for item in &module.items {
            match item {
                Item::Mesh(axes) => p.declare_axes(axes)?,
                Item::Dims(defs) => p.declare_dims(defs, &ov)?,
                Item::Block(b) => p.declare_block(b)?,
                _ => {}
            }
        }
        p.check_overrides(overrides)?;
        p.pipeline_axis = p.find_pipeline_axis(&module.items);
        Ok(p)
    }

    fn declare_axes(&mut self, axes: &[crate::syntax::ast::Ident]) -> Result<(), LowerError> {
        for a in axes {
            if let Some((_, first)) = self.mesh_axes.iter().find(|(n, _)| *n == a.name) {
                return Err(LowerError::Redefinition {
                    name: a.name.clone(),
                    span: a.span,
                    first: *first,
                });
            }
            self.mesh_axes.push((a.name.clone(), a.span));
        }
        Ok(())
    }

    fn declare_dims(
        &mut self,
        defs: &[crate::syntax::ast::DimDef],
        ov: &HashMap<&str, i64>,
    ) -> Result<(), LowerError> {
        for d in defs {
            if let Some(first) = self.dim_spans.get(&d.name.name) {
                return Err(LowerError::Redefinition {
                    name: d.name.name.clone(),
                    span: d.name.span,
                    first: *first,
                });
            }
            let v = match ov.get(d.name.name.as_str()) {
                Some(v) => *v,
                None => consts::eval_int(&d.value, &self.dims)?,
            };
            if v <= 0 {
                return Err(LowerError::BadDim {
                    message: format!("dim `{}` = {v} is not positive", d.name.name),
                    span: d.value.span(),
                    hint: None,
                });
            }
            self.dims.insert(d.name.name.clone(), v);
            self.dim_spans.insert(d.name.name.clone(), d.name.span);
            self.dim_order.push(d.name.name.clone());
        }
        Ok(())
    }

    fn declare_block(&mut self, b: &'a BlockDef) -> Result<(), LowerError> {
        if let Some(first) = self.blocks.get(b.name.name.as_str()) {
            return Err(LowerError::Redefinition {
                name: b.name.name.clone(),
                span: b.name.span,
                first: first.name.span,
            });
        }
        if builtins::is_builtin(&b.name.name) {
            return Err(LowerError::Invalid {
                message: format!("`{}` is a built-in op and cannot name a block", b.name.name),
                span: b.name.span,
                hint: None,
            });
        }
        self.blocks.insert(&b.name.name, b);
        Ok(())
    }

    fn check_overrides(&self, overrides: &[(String, i64)]) -> Result<(), LowerError> {
        for (name, _) in overrides {
            if !self.dims.contains_key(name) {
                let mut known = self.dim_order.clone();
                known.sort();
                let hint =
                    crate::diag::suggest(name, known.iter().map(|s| s.as_str())).or_else(|| {
                        Some(if known.is_empty() {
                            "the program declares no dims".into()
                        } else {
                            format!("dims of this program: {}", known.join(", "))
                        })
                    });
                return Err(LowerError::BadSet {
                    message: format!("the program has no dim `{name}`"),
                    hint,
                });
            }
        }
        Ok(())
    }
}
