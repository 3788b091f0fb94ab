//! Expressions: operators, names, constants; calls go to `builtins` or to a block.

use super::consts::fold_scalar;
use super::error::LowerError;
use super::scope::{Scope, Val};
use super::{builtins, Program};
use crate::ir::{BinaryOp, Op, UnaryOp, ValueId};
use crate::span::Span;
use crate::syntax::ast::{BinOp, Expr};

impl Scope<'_> {
    /// Lowers an expression that yields exactly one value.
    pub(crate) fn expr(&mut self, e: &Expr, prog: &mut Program) -> Result<Val, LowerError> {
        let vals = self.expr_multi(e, prog)?;
        match vals.as_slice() {
            [v] => Ok(*v),
            _ => Err(LowerError::BadOp {
                message: format!(
                    "this expression gives {} values where one is needed",
                    vals.len()
                ),
                span: e.span(),
                hint: Some("assign the values to several names: `a, b = split(...)`".into()),
            }),
        }
    }

    /// Lowers an expression that may yield several values (a `split`).
    pub(crate) fn expr_multi(
        &mut self,
        e: &Expr,
        prog: &mut Program,
    ) -> Result<Vec<Val>, LowerError> {
        match e {
            Expr::Num { value, is_int, .. } => Ok(vec![Val::Scalar(*value, *is_int)]),
            Expr::Name(id) => Ok(vec![self.lookup(id, prog)?]),
            Expr::Neg { expr, span } => Ok(vec![match self.expr(expr, prog)? {
                Val::Scalar(v, i) => Val::Scalar(-v, i),
                Val::Tensor(t) => {
                    Val::Tensor(self.apply(Op::Unary { op: UnaryOp::Neg }, vec![t], *span)?[0])
                }
            }]),
            Expr::Binary {
                op, lhs, rhs, span, ..
            } => {
                if *op == BinOp::MatMul {
                    self.check_matmul_operand(lhs, rhs, *span, prog)?;
                }
                let a = self.expr(lhs, prog)?;
                let b = self.expr(rhs, prog)?;
                Ok(vec![self.binary(*op, a, b, *span)?])
            }
            Expr::Call { func, args, span } => builtins::call(self, func, args, *span, prog),
            Expr::List { span, .. } => Err(LowerError::Invalid {
                message: "a list `[...]` is only allowed as an argument of a built-in op".into(),
                span: *span,
                hint: None,
            }),
        }
    }

    /// Lowers an expression that must be a tensor.
    pub(crate) fn tensor(&mut self, e: &Expr, prog: &mut Program) -> Result<ValueId, LowerError> {
        match self.expr(e, prog)? {
            Val::Tensor(t) => Ok(t),
            Val::Scalar(..) => Err(LowerError::Invalid {
                message: "expected a tensor, found a compile-time scalar".into(),
                span: e.span(),
                hint: None,
            }),
        }
    }

    fn binary(&mut self, op: BinOp, a: Val, b: Val, span: Span) -> Result<Val, LowerError> {
        if op == BinOp::MatMul {
            return match (a, b) {
                (Val::Tensor(x), Val::Tensor(y)) => {
                    Ok(Val::Tensor(self.apply(Op::MatMul, vec![x, y], span)?[0]))
                }
                _ => Err(LowerError::BadOp {
                    message: "`@` needs two tensors".into(),
                    span,
                    hint: Some("scale by a scalar with `*`".into()),
                }),
            };
        }
        let bop = match op {
            BinOp::Add => BinaryOp::Add,
            BinOp::Sub => BinaryOp::Sub,
            BinOp::Mul => BinaryOp::Mul,
            BinOp::Div => BinaryOp::Div,
            BinOp::MatMul => unreachable!("handled above"),
        };
        Ok(match (a, b) {
            (Val::Tensor(x), Val::Tensor(y)) => {
                Val::Tensor(self.apply(Op::Binary { op: bop }, vec![x, y], span)?[0])
            }
            (Val::Tensor(x), Val::Scalar(s, _)) => Val::Tensor(
                self.apply(
                    Op::Scalar {
                        op: bop,
                        value: s,
                        scalar_lhs: false,
                    },
                    vec![x],
                    span,
                )?[0],
            ),
            (Val::Scalar(s, _), Val::Tensor(y)) => Val::Tensor(
                self.apply(
                    Op::Scalar {
                        op: bop,
                        value: s,
                        scalar_lhs: true,
                    },
                    vec![y],
                    span,
                )?[0],
            ),
            (Val::Scalar(x, xi), Val::Scalar(y, yi)) => {
                if op == BinOp::Div && y == 0.0 {
                    return Err(LowerError::BadOp {
                        message: "division by zero in a constant".into(),
                        span,
                        hint: None,
                    });
                }
                Val::Scalar(fold_scalar(op, x, y), xi && yi && op != BinOp::Div)
            }
        })
    }
}
