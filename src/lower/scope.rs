//! One lexical scope being lowered into a graph region: the root program or one block body.

use super::consts;
use super::error::LowerError;
use super::size;
use super::Program;
use crate::ir::infer::{infer, InferError};
use crate::ir::{
    Annotation, Dtype, Graph, Op, Optimizer, Output, RegionId, Spec, TensorType, ValueId,
};
use crate::span::Span;
use crate::syntax::ast::{Assign, Decl, Expr, Ident, Item, OutputItem, SpecExpr, Train, TypeExpr};
use std::collections::{BTreeSet, HashMap};

/// What an expression evaluates to: a tensor in the graph, or a compile-time scalar.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Val {
    /// A graph value.
    Tensor(ValueId),
    /// A constant; `is_int` when it came from integer literals and dims only.
    Scalar(f64, bool),
}

/// How a name was bound; leaves (inputs, params) cannot be rebound, assignments can.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BindKind {
    Leaf,
    Assigned,
}

#[derive(Clone, Copy, Debug)]
struct Binding {
    val: ValueId,
    span: Span,
    kind: BindKind,
}

/// A scope writing into `g` under `region`. Names of block instances created here are relative
/// to the region (`attention`, `layer.3`), and so are param names.
pub(crate) struct Scope<'g> {
    pub(crate) g: &'g mut Graph,
    pub(crate) region: RegionId,
    in_block: bool,
    env: HashMap<String, Binding>,
    call_totals: HashMap<String, usize>,
    call_next: HashMap<String, usize>,
    outputs: HashMap<String, Span>,
    /// Params declared `frozen`, named relative to this scope's graph.
    pub(crate) frozen: BTreeSet<String>,
    /// The `train` statement's loss and optimizer, and the statement's span.
    pub(crate) training: Option<(ValueId, Optimizer, Span)>,
    /// The `train` statement's loss scale.
    pub(crate) loss_scale: Option<crate::ir::LossScale>,
}

impl<'g> Scope<'g> {
    /// A scope over `items` (and a block's return expression), lowering into `region` of `g`.
    pub(crate) fn new(
        g: &'g mut Graph,
        region: RegionId,
        in_block: bool,
        items: &[Item],
        ret: Option<&Expr>,
        prog: &Program,
    ) -> Self {
        let mut totals = HashMap::new();
        for item in items {
            if let Item::Assign(a) = item {
                count_calls(&a.value, prog, &mut totals);
            }
        }
        if let Some(r) = ret {
            count_calls(r, prog, &mut totals);
        }
        Scope {
            g,
            region,
            in_block,
            env: HashMap::new(),
            call_totals: totals,
            call_next: HashMap::new(),
            outputs: HashMap::new(),
            frozen: BTreeSet::new(),
            training: None,
            loss_scale: None,
        }
    }

    /// Lowers one statement.
    pub(crate) fn item(&mut self, item: &Item, prog: &mut Program) -> Result<(), LowerError> {
        match item {
            Item::Mesh(_) | Item::Dims(_) | Item::Block(_) => Ok(()),
            Item::Input(d) => self.leaf(d, false, prog),
            Item::Param(d) => self.leaf(d, true, prog),
            Item::Assign(a) => self.assign(a, prog),
            Item::Output(outs) => outs.iter().try_for_each(|o| self.output(o, prog)),
            Item::Train(t) => self.train(t, prog),
        }
    }

    /// Records the program's one `train` statement.
    fn train(&mut self, t: &Train, prog: &mut Program) -> Result<(), LowerError> {
        if let Some((_, _, first)) = self.training {
            return Err(LowerError::SecondTrain {
                span: t.span,
                first,
            });
        }
        let (loss, opt) = super::train::resolve(self, t, prog)?;
        self.loss_scale = super::train::loss_scale(t)?;
        self.training = Some((loss, opt, t.span));
        Ok(())
    }

    fn leaf(&mut self, d: &Decl, is_param: bool, prog: &Program) -> Result<(), LowerError> {
        let ty = self.eval_type(&d.ty, prog)?;
        self.check_fresh(&d.name, prog)?;
        let name = d.name.name.clone();
        if d.frozen.is_some() {
            self.frozen.insert(name.clone());
        }
        let op = if is_param {
            Op::Param { name: name.clone() }
        } else {
            Op::Input { name: name.clone() }
        };
        size::check_fits(self.g, std::slice::from_ref(&ty), d.span)?;
        let n = self.g.add_node(op, vec![], vec![ty], d.span, self.region);
        let v = self.g.node(n).outputs[0];
        self.g.set_value_name(v, name);
        self.env.insert(
            d.name.name.clone(),
            Binding {
                val: v,
                span: d.name.span,
                kind: BindKind::Leaf,
            },
        );
        if let Some(spec) = &d.spec {
            self.annotate(v, spec, prog)?;
        }
        Ok(())
    }

    /// Binds an argument of a block body.
    pub(crate) fn bind_arg(
        &mut self,
        name: &Ident,
        v: ValueId,
        prog: &Program,
    ) -> Result<(), LowerError> {
        self.check_fresh(name, prog)?;
        self.g.set_value_name(v, name.name.clone());
        self.env.insert(
            name.name.clone(),
            Binding {
                val: v,
                span: name.span,
                kind: BindKind::Assigned,
            },
        );
        Ok(())
    }

    fn assign(&mut self, a: &Assign, prog: &mut Program) -> Result<(), LowerError> {
        let vals = match self.pipelined(a, prog)? {
            Some(vals) => vals,
            None => self.expr_multi(&a.value, prog)?,
        };
        if vals.len() != a.targets.len() {
            return Err(LowerError::BadOp {
                message: format!(
                    "{} name(s) on the left, but the right side gives {} value(s)",
                    a.targets.len(),
                    vals.len()
                ),
                span: a.span,
                hint: None,
            });
        }
        for (t, val) in a.targets.iter().zip(vals) {
            let v =
                match val {
                    Val::Tensor(v) => v,
                    Val::Scalar(..) => return Err(LowerError::Invalid {
                        message: format!(
                            "`{}` would be a compile-time scalar; only tensors can be assigned",
                            t.name
                        ),
                        span: a.value.span(),
                        hint: Some(
                            "use `dim` for integer constants, or write the scalar where it is used"
                                .into(),
                        ),
                    }),
                };
            self.rebind(t, v, prog)?;
            if let Some(spec) = &a.spec {
                self.annotate(v, spec, prog)?;
            }
        }
        Ok(())
    }

    fn rebind(&mut self, t: &Ident, v: ValueId, prog: &Program) -> Result<(), LowerError> {
        match self.env.get(&t.name) {
            Some(b) if b.kind == BindKind::Leaf => {
                return Err(LowerError::Redefinition {
                    name: t.name.clone(),
                    span: t.span,
                    first: b.span,
                });
            }
            Some(_) => {}
            None => self.check_fresh(t, prog)?,
        }
        if self.g.value(v).name.is_none() {
            self.g.set_value_name(v, t.name.clone());
        }
        self.env.insert(
            t.name.clone(),
            Binding {
                val: v,
                span: t.span,
                kind: BindKind::Assigned,
            },
        );
        Ok(())
    }

    fn check_fresh(&self, name: &Ident, prog: &Program) -> Result<(), LowerError> {
        let first = self
            .env
            .get(&name.name)
            .map(|b| b.span)
            .or_else(|| prog.dim_spans.get(&name.name).copied())
            .or_else(|| prog.blocks.get(name.name.as_str()).map(|b| b.name.span));
        match first {
            Some(first) => Err(LowerError::Redefinition {
                name: name.name.clone(),
                span: name.span,
                first,
            }),
            None => Ok(()),
        }
    }

    fn output(&mut self, o: &OutputItem, prog: &Program) -> Result<(), LowerError> {
        let v = match self.lookup(&o.name, prog)? {
            Val::Tensor(v) => v,
            Val::Scalar(..) => {
                return Err(LowerError::Invalid {
                    message: format!("`{}` is a dim, not a tensor", o.name.name),
                    span: o.name.span,
                    hint: None,
                })
            }
        };
        if let Some(first) = self.outputs.insert(o.name.name.clone(), o.name.span) {
            return Err(LowerError::Redefinition {
                name: o.name.name.clone(),
                span: o.name.span,
                first,
            });
        }
        let annotation = match &o.spec {
            Some(s) => Some(self.check_spec(v, s, prog)?),
            None => None,
        };
        self.g.add_output(Output {
            name: o.name.name.clone(),
            value: v,
            annotation,
            span: o.name.span,
            like: None,
        });
        Ok(())
    }

    /// True when `name` is a tensor in scope or a dim.
    pub(crate) fn binds(&self, name: &str, prog: &Program) -> bool {
        self.env.contains_key(name) || prog.dims.contains_key(name)
    }

    /// Resolves a name used in an expression: a tensor in scope, or a dim as a scalar.
    pub(crate) fn lookup(&self, id: &Ident, prog: &Program) -> Result<Val, LowerError> {
        if let Some(b) = self.env.get(&id.name) {
            return Ok(Val::Tensor(b.val));
        }
        if let Some(d) = prog.dims.get(&id.name) {
            return Ok(Val::Scalar(*d as f64, true));
        }
        let mut hint = crate::diag::suggest(
            &id.name,
            self.env
                .keys()
                .map(|s| s.as_str())
                .chain(prog.dims.keys().map(|s| s.as_str())),
        );
        if hint.is_none() && prog.blocks.contains_key(id.name.as_str()) {
            hint = Some(format!(
                "`{}` is a block: call it, `{}(...)`",
                id.name, id.name
            ));
        }
        if hint.is_none() && self.in_block {
            hint = Some(
                "a block sees only its arguments, its own params and assignments, and dims".into(),
            );
        }
        Err(LowerError::UnknownName {
            name: id.name.clone(),
            span: id.span,
            hint,
        })
    }

    /// Evaluates a declared type.
    pub(crate) fn eval_type(&self, t: &TypeExpr, prog: &Program) -> Result<TensorType, LowerError> {
        let dtype = Dtype::parse(&t.dtype.name).ok_or_else(|| LowerError::Invalid {
            message: format!("unknown dtype `{}`", t.dtype.name),
            span: t.dtype.span,
            hint: Some("dtypes are f32, bf16, f16 and i32".into()),
        })?;
        let shape = t
            .dims
            .iter()
            .map(|d| consts::eval_size(d, &prog.dims))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(TensorType::new(dtype, shape))
    }

    fn check_spec(
        &self,
        v: ValueId,
        s: &SpecExpr,
        prog: &Program,
    ) -> Result<Annotation, LowerError> {
        let ty = self.g.ty(v);
        if s.dims.len() != ty.rank() {
            return Err(LowerError::SpecRank {
                got: s.dims.len(),
                rank: ty.rank(),
                ty: ty.to_string(),
                span: s.span,
            });
        }
        let mut seen: HashMap<&str, Span> = HashMap::new();
        for axis in s.dims.iter().flatten() {
            if !prog.mesh_axes.iter().any(|(a, _)| *a == axis.name) {
                let names: Vec<&str> = prog.mesh_axes.iter().map(|(a, _)| a.as_str()).collect();
                let hint = if names.is_empty() {
                    format!("declare it first: `mesh {}`", axis.name)
                } else {
                    crate::diag::suggest(&axis.name, names.iter().copied())
                        .unwrap_or_else(|| format!("declared axes: {}", names.join(", ")))
                };
                return Err(LowerError::UnknownAxis {
                    axis: axis.name.clone(),
                    span: axis.span,
                    hint,
                });
            }
            prog.check_spec_axis(axis)?;
            if let Some(first) = seen.insert(&axis.name, axis.span) {
                return Err(LowerError::DuplicateAxis {
                    axis: axis.name.clone(),
                    span: axis.span,
                    first,
                });
            }
        }
        let spec = Spec {
            dims: s
                .dims
                .iter()
                .map(|d| d.iter().map(|a| a.name.clone()).collect())
                .collect(),
        };
        Ok(Annotation { spec, span: s.span })
    }

    fn annotate(&mut self, v: ValueId, s: &SpecExpr, prog: &Program) -> Result<(), LowerError> {
        let a = self.check_spec(v, s, prog)?;
        if let Some(prev) = self.g.annotation(v) {
            if prev.spec != a.spec {
                return Err(LowerError::ConflictingSpec {
                    first_spec: prev.spec.to_string(),
                    second_spec: a.spec.to_string(),
                    span: a.span,
                    first: prev.span,
                });
            }
            return Ok(());
        }
        self.g.annotate(v, a);
        Ok(())
    }

    /// The relative instance path for the next call of `block` in this scope: the bare name when
    /// the scope calls it once, else `block.K` numbered in call order.
    pub(crate) fn next_instance(&mut self, block: &str) -> String {
        let k = self.call_next.entry(block.to_string()).or_insert(0);
        let name = if self.call_totals.get(block).copied().unwrap_or(0) <= 1 {
            block.to_string()
        } else {
            format!("{block}.{k}")
        };
        *k += 1;
        name
    }

    /// Applies `op` to `inputs`: infers the result types (a failure is the user's error, at
    /// `span`) and appends the node.
    pub(crate) fn apply(
        &mut self,
        op: Op,
        inputs: Vec<ValueId>,
        span: Span,
    ) -> Result<Vec<ValueId>, LowerError> {
        let constant = match op {
            Op::Scalar { value, .. } => Some(value),
            Op::LayerNorm { eps } | Op::RmsNorm { eps } => Some(eps),
            _ => None,
        };
        if let Some(c) = constant.filter(|c| !c.is_finite()) {
            return Err(LowerError::BadOp {
                message: format!("the constant {c} is not a finite number"),
                span,
                hint: None,
            });
        }
        let tys: Vec<&TensorType> = inputs.iter().map(|v| self.g.ty(*v)).collect();
        let out = infer(&op, &tys).map_err(|e| infer_error(e, span))?;
        size::check_fits(self.g, &out, span)?;
        let n = self.g.add_node(op, inputs, out, span, self.region);
        Ok(self.g.node(n).outputs.clone())
    }
}

/// Converts an inference failure into the user error at `span`.
pub(crate) fn infer_error(e: InferError, span: Span) -> LowerError {
    let message = e.to_string();
    match e {
        InferError::Shape { lhs, rhs, .. } => LowerError::ShapeMismatch {
            message,
            span,
            label: format!("{lhs} vs {rhs}"),
        },
        InferError::Rank { .. } => LowerError::RankMismatch { message, span },
        InferError::Dtype { .. } => LowerError::DtypeMismatch {
            message,
            span,
            hint: Some("convert one side with `cast(x, f32)`".into()),
        },
        _ => LowerError::BadOp {
            message,
            span,
            hint: None,
        },
    }
}

/// Counts, per block, how many instances the expression creates (a `repeat` counts as many).
fn count_calls(e: &Expr, prog: &Program, totals: &mut HashMap<String, usize>) {
    match e {
        Expr::Call { func, args, .. } => {
            if prog.blocks.contains_key(func.name.as_str()) {
                *totals.entry(func.name.clone()).or_insert(0) += 1;
            }
            if func.name == "repeat" {
                let block = args
                    .iter()
                    .find(|a| a.name.as_ref().is_some_and(|n| n.name == "block"))
                    .or_else(|| args.iter().filter(|a| a.name.is_none()).nth(1));
                if let Some(Expr::Name(b)) = block.map(|a| &a.value) {
                    *totals.entry(b.name.clone()).or_insert(0) += 2;
                }
            }
            args.iter()
                .for_each(|a| count_calls(&a.value, prog, totals));
        }
        Expr::Binary { lhs, rhs, .. } => {
            count_calls(lhs, prog, totals);
            count_calls(rhs, prog, totals);
        }
        Expr::Neg { expr, .. } => count_calls(expr, prog, totals),
        Expr::List { items, .. } => items.iter().for_each(|i| count_calls(i, prog, totals)),
        Expr::Num { .. } | Expr::Name(_) => {}
    }
}
