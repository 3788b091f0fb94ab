//! Compile-time evaluation: integer dim expressions and scalar constants.

use super::error::LowerError;
use crate::syntax::ast::{BinOp, Expr};
use std::collections::HashMap;

/// Evaluates an integer dim expression over the known dims: literals, dim names, `+ - * /`
/// (division must be exact), unary minus, parentheses. Overflow and division by zero are errors.
pub fn eval_int(e: &Expr, dims: &HashMap<String, i64>) -> Result<i64, LowerError> {
    match e {
        Expr::Num {
            value,
            is_int,
            int,
            span,
        } => match (is_int, int) {
            (true, Some(v)) => Ok(*v),
            (true, None) => Err(bad_dim(
                format!("integer literal {value:.0} does not fit in 64 bits"),
                *span,
                None,
            )),
            (false, _) => Err(bad_dim(format!("`{value}` is not an integer"), *span, None)),
        },
        Expr::Name(id) => dims.get(&id.name).copied().ok_or_else(|| {
            bad_dim(
                format!("`{}` is not a dim", id.name),
                id.span,
                dim_hint(dims),
            )
        }),
        Expr::Neg { expr, span } => eval_int(expr, dims)?
            .checked_neg()
            .ok_or_else(|| overflow(*span)),
        Expr::Binary {
            op, lhs, rhs, span, ..
        } => {
            let (a, b) = (eval_int(lhs, dims)?, eval_int(rhs, dims)?);
            int_binary(*op, a, b, *span)
        }
        Expr::Call { span, .. } | Expr::List { span, .. } => Err(bad_dim(
            "only integers, dims and + - * / are allowed here".into(),
            *span,
            None,
        )),
    }
}

fn int_binary(op: BinOp, a: i64, b: i64, span: crate::span::Span) -> Result<i64, LowerError> {
    let r = match op {
        BinOp::Add => a.checked_add(b),
        BinOp::Sub => a.checked_sub(b),
        BinOp::Mul => a.checked_mul(b),
        BinOp::Div => {
            if b == 0 {
                return Err(bad_dim("division by zero".into(), span, None));
            }
            let rem = a.checked_rem(b).ok_or_else(|| overflow(span))?;
            if rem != 0 {
                return Err(bad_dim(
                    format!("{a} / {b} is not exact"),
                    span,
                    Some("dims are integers: choose sizes that divide".into()),
                ));
            }
            a.checked_div(b)
        }
        BinOp::MatMul => return Err(bad_dim("`@` in a dim expression".into(), span, None)),
    };
    r.ok_or_else(|| overflow(span))
}

/// Evaluates `e` as a positive dim size.
pub fn eval_size(e: &Expr, dims: &HashMap<String, i64>) -> Result<u64, LowerError> {
    let v = eval_int(e, dims)?;
    if v <= 0 {
        return Err(bad_dim(format!("size {v} is not positive"), e.span(), None));
    }
    Ok(v as u64)
}

fn overflow(span: crate::span::Span) -> LowerError {
    bad_dim("integer overflow".into(), span, None)
}

fn bad_dim(message: String, span: crate::span::Span, hint: Option<String>) -> LowerError {
    LowerError::BadDim {
        message,
        span,
        hint,
    }
}

fn dim_hint(dims: &HashMap<String, i64>) -> Option<String> {
    let mut names: Vec<&str> = dims.keys().map(|s| s.as_str()).collect();
    names.sort_unstable();
    if names.is_empty() {
        Some("no dims are declared: add `dim NAME = VALUE`".into())
    } else {
        Some(format!("declared dims: {}", names.join(", ")))
    }
}

/// Folds a binary op on two compile-time scalars (floats; `@` is rejected by the caller).
pub fn fold_scalar(op: BinOp, a: f64, b: f64) -> f64 {
    match op {
        BinOp::Add => a + b,
        BinOp::Sub => a - b,
        BinOp::Mul => a * b,
        BinOp::Div => a / b,
        BinOp::MatMul => f64::NAN,
    }
}
