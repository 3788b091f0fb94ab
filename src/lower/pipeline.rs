//! Pipelined repeats: `h = repeat(L, layer, h) @ pp` marks the instances of the program's one
//! top-level `repeat` to be cut into contiguous pipeline stages over mesh axis `pp`. Lowering
//! records the split on the graph; every value stays replicated over `pp` until a later pass cuts.

use super::builtins;
use super::error::LowerError;
use super::scope::{Scope, Val};
use super::template;
use super::Program;
use crate::ir::PipelineSpec;
use crate::span::Span;
use crate::syntax::ast::{Arg, Assign, BinOp, Expr, Ident, Item};
use std::collections::HashSet;

/// The parts of `repeat(...) @ axis`.
struct Piped<'e> {
    args: &'e [Arg],
    call: Span,
    axis: &'e Ident,
    span: Span,
}

/// `e` as `repeat(...) @ name`, whatever `name` turns out to be.
fn piped(e: &Expr) -> Option<Piped<'_>> {
    let Expr::Binary {
        op: BinOp::MatMul,
        lhs,
        rhs,
        span,
        ..
    } = e
    else {
        return None;
    };
    match (&**lhs, &**rhs) {
        (
            Expr::Call {
                func,
                args,
                span: call,
            },
            Expr::Name(axis),
        ) if func.name == "repeat" => Some(Piped {
            args,
            call: *call,
            axis,
            span: *span,
        }),
        _ => None,
    }
}

impl Program<'_> {
    /// The axis of the first top-level `repeat(...) @ a` where `a` is a mesh axis and no tensor
    /// or dim, found before lowering so that a spec written before it is checked too. The root
    /// scope binds tensors only by leaves and assignments, so following those in order tells
    /// exactly what lowering will see.
    pub(super) fn find_pipeline_axis(&self, items: &[Item]) -> Option<(String, Span)> {
        let mut bound: HashSet<&str> = HashSet::new();
        for item in items {
            match item {
                Item::Input(d) | Item::Param(d) => {
                    bound.insert(&d.name.name);
                }
                Item::Assign(a) => {
                    let p = piped(&a.value).map(|p| p.axis);
                    if let Some(axis) = p.filter(|x| !bound.contains(x.name.as_str())) {
                        if self.is_axis(&axis.name) && !self.dims.contains_key(&axis.name) {
                            return Some((axis.name.clone(), axis.span));
                        }
                    }
                    bound.extend(a.targets.iter().map(|t| t.name.as_str()));
                }
                _ => {}
            }
        }
        None
    }

    /// True when `name` is a declared mesh axis.
    pub(super) fn is_axis(&self, name: &str) -> bool {
        self.mesh_axes.iter().any(|(a, _)| a == name)
    }

    /// Rejects the pipeline's axis in a sharding spec.
    pub(super) fn check_spec_axis(&self, axis: &Ident) -> Result<(), LowerError> {
        match &self.pipeline_axis {
            Some((p, pipeline)) if *p == axis.name => Err(LowerError::PipelineAxisInSpec {
                axis: p.clone(),
                span: axis.span,
                pipeline: *pipeline,
            }),
            _ => Ok(()),
        }
    }
}

impl Scope<'_> {
    /// Lowers `a` when its right side is `repeat(...) @ name` with `name` no tensor or dim in
    /// scope: a pipelined repeat, or an error. `None` for any other assignment.
    pub(super) fn pipelined(
        &mut self,
        a: &Assign,
        prog: &mut Program,
    ) -> Result<Option<Vec<Val>>, LowerError> {
        let Some(p) = piped(&a.value).filter(|p| !self.binds(&p.axis.name, prog)) else {
            return Ok(None);
        };
        if !prog.is_axis(&p.axis.name) {
            return Err(unknown_axis(p.axis, prog));
        }
        self.check_top_level(p.span, prog)?;
        if let Some(first) = self.g.pipeline() {
            return Err(LowerError::SecondPipeline {
                span: p.span,
                first: first.span,
            });
        }
        let sig = ["count", "block", "x"];
        let b = builtins::bind("repeat", &sig, p.args, p.call)?;
        let (count, block, x) = (b.expr(0), b.expr(1), b.expr(2));
        let r = template::repeat_instances(self, count, block, x, b.extra(), p.call, prog)?;
        if r.instances.is_empty() {
            return Err(LowerError::BadOp {
                message: "a pipelined `repeat` needs at least one instance, but its count is 0"
                    .into(),
                span: r.count,
                hint: Some("pipeline stages are cut from the repeat's instances".into()),
            });
        }
        self.g.set_pipeline(Some(PipelineSpec {
            axis: p.axis.name.clone(),
            block: r.block,
            instances: r.instances,
            output: r.value,
            span: p.span,
        }));
        Ok(Some(vec![Val::Tensor(r.value)]))
    }

    /// Rejects `lhs @ name` where `name` is a mesh axis and no tensor or dim in scope: the
    /// pipelined repeats, the only place for it, were taken by [`Scope::pipelined`].
    pub(super) fn check_matmul_operand(
        &self,
        lhs: &Expr,
        rhs: &Expr,
        span: Span,
        prog: &Program,
    ) -> Result<(), LowerError> {
        let Expr::Name(axis) = rhs else {
            return Ok(());
        };
        if self.binds(&axis.name, prog) || !prog.is_axis(&axis.name) {
            return Ok(());
        }
        let is_repeat = matches!(lhs, Expr::Call { func, .. } if func.name == "repeat");
        if is_repeat {
            self.check_top_level(span, prog)?;
        }
        let label = if is_repeat {
            "a pipelined `repeat` must be the whole right side of an assignment"
        } else {
            "not a `repeat(...)` call"
        };
        Err(LowerError::MisplacedPipeline {
            axis: axis.name.clone(),
            span: lhs.span(),
            label: label.into(),
        })
    }

    /// Rejects a pipelined `repeat` (at `span`) inside a block.
    fn check_top_level(&self, span: Span, prog: &Program) -> Result<(), LowerError> {
        match prog.stack.last() {
            Some(block) => Err(LowerError::PipelineInBlock {
                block: block.clone(),
                span,
            }),
            None => Ok(()),
        }
    }
}

/// `repeat(...) @ axis` with an axis the program does not declare.
fn unknown_axis(axis: &Ident, prog: &Program) -> LowerError {
    let names: Vec<&str> = prog.mesh_axes.iter().map(|(a, _)| a.as_str()).collect();
    let what = "`repeat(...) @ AXIS` splits the repeat's instances into pipeline stages over a \
                mesh axis declared by `mesh`";
    let hint = if names.is_empty() {
        format!("{what}; this program declares none")
    } else {
        match crate::diag::suggest(&axis.name, names.iter().copied()) {
            Some(s) => format!("{s} {what}"),
            None => format!("{what}: {}", names.join(", ")),
        }
    };
    LowerError::UnknownAxis {
        axis: axis.name.clone(),
        span: axis.span,
        hint,
    }
}
