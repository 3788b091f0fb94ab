//! Calls: the built-in ops (with positional or keyword arguments) and block calls.

use super::consts;
use super::error::LowerError;
use super::scope::{Scope, Val};
use super::Program;
use crate::ir::{BinaryOp, Dtype, Op, ReduceOp, UnaryOp, ValueId};
use crate::span::Span;
use crate::syntax::ast::{Arg, Expr, Ident};

/// Built-in ops and their parameter names (`?` marks optional ones), for binding and for hints.
const SIGNATURES: &[(&str, &[&str])] = &[
    ("gelu", &["x"]),
    ("relu", &["x"]),
    ("silu", &["x"]),
    ("tanh", &["x"]),
    ("exp", &["x"]),
    ("log", &["x"]),
    ("neg", &["x"]),
    ("sqrt", &["x"]),
    ("rsqrt", &["x"]),
    ("recip", &["x"]),
    ("nonfinite", &["x"]),
    ("scale", &["x", "by"]),
    ("maximum", &["a", "b"]),
    ("where", &["cond", "a", "b"]),
    ("softmax", &["x", "axis?"]),
    ("layernorm", &["x", "scale", "bias?", "eps?"]),
    ("rmsnorm", &["x", "scale", "eps?"]),
    ("sum", &["x", "axis", "keepdims?"]),
    ("mean", &["x", "axis", "keepdims?"]),
    ("max", &["x", "axis", "keepdims?"]),
    ("transpose", &["x", "perm?"]),
    ("reshape", &["x", "shape"]),
    ("split", &["x", "parts", "axis?"]),
    ("concat", &["xs", "axis"]),
    ("slice", &["x", "axis", "start", "end"]),
    ("embedding", &["ids", "table"]),
    ("cross_entropy", &["logits", "labels"]),
    ("causal_mask", &["x"]),
    ("cast", &["x", "dtype"]),
    ("repeat", &["count", "block", "x"]),
];

/// Most pieces one `split` may produce.
const MAX_PARTS: i64 = 1 << 16;

/// True when `name` is a built-in op.
pub fn is_builtin(name: &str) -> bool {
    SIGNATURES.iter().any(|(n, _)| *n == name)
}

fn signature(name: &str) -> Option<&'static [&'static str]> {
    SIGNATURES.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

fn usage(name: &str, sig: &[&str]) -> String {
    let params: Vec<String> = sig
        .iter()
        .map(|p| {
            p.strip_suffix('?')
                .map(|q| format!("{q}=..."))
                .unwrap_or_else(|| p.to_string())
        })
        .collect();
    let extra = if name == "repeat" { ", extra..." } else { "" };
    format!("usage: {name}({}{extra})", params.join(", "))
}

/// Arguments of one built-in call, bound to the signature's slots.
pub(super) struct Bound<'e> {
    name: &'static str,
    slots: Vec<Option<&'e Expr>>,
    extra: Vec<&'e Expr>,
    span: Span,
    usage: String,
}

/// Binds `args` to the slots of signature `sig` (names, `?` for optional ones) of call `name`.
pub(super) fn bind<'e>(
    name: &'static str,
    sig: &[&str],
    args: &'e [Arg],
    span: Span,
) -> Result<Bound<'e>, LowerError> {
    let usage = usage(name, sig);
    let err = |message: String, span: Span| LowerError::BadOp {
        message,
        span,
        hint: Some(usage.clone()),
    };
    let mut slots: Vec<Option<&Expr>> = vec![None; sig.len()];
    let mut extra = Vec::new();
    let mut next = 0;
    for a in args {
        let i = match &a.name {
            None => {
                if next >= sig.len() {
                    if name == "repeat" {
                        extra.push(&a.value);
                        continue;
                    }
                    return Err(err(
                        format!("`{name}` takes at most {} argument(s)", sig.len()),
                        a.value.span(),
                    ));
                }
                next += 1;
                next - 1
            }
            Some(k) => sig
                .iter()
                .position(|p| p.trim_end_matches('?') == k.name)
                .ok_or_else(|| err(format!("`{name}` has no argument `{}`", k.name), k.span))?,
        };
        if slots[i].is_some() {
            return Err(err(
                format!("argument `{}` given twice", sig[i].trim_end_matches('?')),
                a.value.span(),
            ));
        }
        slots[i] = Some(&a.value);
    }
    for (i, p) in sig.iter().enumerate() {
        if slots[i].is_none() && !p.ends_with('?') {
            return Err(err(format!("`{name}` is missing argument `{p}`"), span));
        }
    }
    Ok(Bound {
        name,
        slots,
        extra,
        span,
        usage,
    })
}

impl Bound<'_> {
    /// An error at `span` with the call's usage as the hint.
    pub(super) fn bad(&self, message: String, span: Span) -> LowerError {
        LowerError::BadOp {
            message,
            span,
            hint: Some(self.usage.clone()),
        }
    }

    /// The argument in slot `i`, if given.
    pub(super) fn expr(&self, i: usize) -> Option<&Expr> {
        self.slots[i]
    }

    /// The positional arguments past the signature (a `repeat`'s extra block arguments).
    pub(super) fn extra(&self) -> &[&Expr] {
        &self.extra
    }

    fn tensor(&self, i: usize, s: &mut Scope, prog: &mut Program) -> Result<ValueId, LowerError> {
        s.tensor(self.slots[i].expect("required slot"), prog)
    }

    fn tensors(
        &self,
        n: usize,
        s: &mut Scope,
        prog: &mut Program,
    ) -> Result<Vec<ValueId>, LowerError> {
        (0..n).map(|i| self.tensor(i, s, prog)).collect()
    }

    fn int(&self, i: usize, prog: &Program) -> Result<Option<i64>, LowerError> {
        self.slots[i]
            .map(|e| consts::eval_int(e, &prog.dims))
            .transpose()
    }

    /// The constant in slot `i`, if given.
    pub(super) fn float(
        &self,
        i: usize,
        s: &mut Scope,
        prog: &mut Program,
    ) -> Result<Option<f64>, LowerError> {
        let Some(e) = self.slots[i] else {
            return Ok(None);
        };
        match s.expr(e, prog)? {
            Val::Scalar(v, _) => Ok(Some(v)),
            Val::Tensor(_) => {
                Err(self.bad(format!("`{}` needs a constant here", self.name), e.span()))
            }
        }
    }

    fn bool(&self, i: usize) -> Result<bool, LowerError> {
        match self.slots[i] {
            None => Ok(false),
            Some(Expr::Name(id)) if id.name == "true" => Ok(true),
            Some(Expr::Name(id)) if id.name == "false" => Ok(false),
            Some(e) => Err(self.bad("expected `true` or `false`".into(), e.span())),
        }
    }

    fn int_list(&self, i: usize, prog: &Program) -> Result<Option<Vec<i64>>, LowerError> {
        match self.slots[i] {
            None => Ok(None),
            Some(Expr::List { items, .. }) => items
                .iter()
                .map(|e| consts::eval_int(e, &prog.dims))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(e) => Err(self.bad("expected a list `[...]`".into(), e.span())),
        }
    }

    fn axis(
        &self,
        i: usize,
        default: i64,
        rank: usize,
        prog: &Program,
    ) -> Result<usize, LowerError> {
        let a = self.int(i, prog)?.unwrap_or(default);
        let span = self.slots[i].map(|e| e.span()).unwrap_or(self.span);
        let r = rank as i64;
        if a < -r || a >= r {
            return Err(self.bad(format!("axis {a} is out of range for rank {rank}"), span));
        }
        Ok(if a < 0 { (a + r) as usize } else { a as usize })
    }
}

/// Lowers a call: a built-in op or a block instance.
pub(crate) fn call(
    s: &mut Scope,
    func: &Ident,
    args: &[Arg],
    span: Span,
    prog: &mut Program,
) -> Result<Vec<Val>, LowerError> {
    if prog.blocks.contains_key(func.name.as_str()) {
        return block_call(s, func, args, span, prog);
    }
    let Some((name, sig)) = SIGNATURES.iter().find(|(n, _)| *n == func.name) else {
        let cands = SIGNATURES
            .iter()
            .map(|(n, _)| *n)
            .chain(prog.blocks.keys().copied());
        let hint = crate::diag::suggest(&func.name, cands);
        return Err(LowerError::UnknownName {
            name: func.name.clone(),
            span: func.span,
            hint,
        });
    };
    if *name == "max"
        && args.len() >= 2
        && args[1].name.is_none()
        && is_tensor_arg(s, &args[1].value, prog)
    {
        let b = bind("maximum", signature("maximum").unwrap_or(&[]), args, span)?;
        let ins = b.tensors(2, s, prog)?;
        return one(s.apply(Op::Binary { op: BinaryOp::Max }, ins, span)?);
    }
    let b = bind(name, sig, args, span)?;
    builtin(s, &b, prog)
}

fn is_tensor_arg(s: &Scope, e: &Expr, prog: &Program) -> bool {
    match e {
        Expr::Name(id) => matches!(s.lookup(id, prog), Ok(Val::Tensor(_))),
        Expr::Num { .. } => false,
        Expr::Neg { expr, .. } => is_tensor_arg(s, expr, prog),
        Expr::Binary { lhs, rhs, .. } => is_tensor_arg(s, lhs, prog) || is_tensor_arg(s, rhs, prog),
        Expr::Call { .. } | Expr::List { .. } => true,
    }
}

fn one(v: Vec<ValueId>) -> Result<Vec<Val>, LowerError> {
    Ok(v.into_iter().map(Val::Tensor).collect())
}

fn unary(name: &str) -> Option<UnaryOp> {
    Some(match name {
        "gelu" => UnaryOp::Gelu,
        "relu" => UnaryOp::Relu,
        "silu" => UnaryOp::Silu,
        "tanh" => UnaryOp::Tanh,
        "exp" => UnaryOp::Exp,
        "log" => UnaryOp::Log,
        "neg" => UnaryOp::Neg,
        "sqrt" => UnaryOp::Sqrt,
        "rsqrt" => UnaryOp::Rsqrt,
        "recip" => UnaryOp::Recip,
        "nonfinite" => UnaryOp::NonFinite,
        _ => return None,
    })
}

fn fold_unary(op: UnaryOp, x: f64) -> f64 {
    match op {
        UnaryOp::Neg => -x,
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Rsqrt => 1.0 / x.sqrt(),
        UnaryOp::Recip => 1.0 / x,
        UnaryOp::NonFinite => f64::from(u8::from(!x.is_finite())),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Relu => x.max(0.0),
        UnaryOp::Silu => x / (1.0 + (-x).exp()),
        UnaryOp::Gelu => {
            0.5 * x
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
        }
    }
}

fn builtin(s: &mut Scope, b: &Bound, prog: &mut Program) -> Result<Vec<Val>, LowerError> {
    let span = b.span;
    if let Some(op) = unary(b.name) {
        return match s.expr(b.expr(0).expect("required"), prog)? {
            Val::Scalar(v, _) => Ok(vec![Val::Scalar(fold_unary(op, v), false)]),
            Val::Tensor(t) => one(s.apply(Op::Unary { op }, vec![t], span)?),
        };
    }
    match b.name {
        "scale" => {
            let x = b.tensor(0, s, prog)?;
            let by = b.float(1, s, prog)?.unwrap_or(1.0);
            one(s.apply(
                Op::Scalar {
                    op: BinaryOp::Mul,
                    value: by,
                    scalar_lhs: false,
                },
                vec![x],
                span,
            )?)
        }
        "maximum" => {
            let ins = b.tensors(2, s, prog)?;
            one(s.apply(Op::Binary { op: BinaryOp::Max }, ins, span)?)
        }
        "where" => {
            let ins = b.tensors(3, s, prog)?;
            one(s.apply(Op::Select, ins, span)?)
        }
        "softmax" => {
            let x = b.tensor(0, s, prog)?;
            let axis = b.axis(1, -1, s.g.ty(x).rank(), prog)?;
            one(s.apply(Op::Softmax { axis }, vec![x], span)?)
        }
        "layernorm" | "rmsnorm" => norm(s, b, prog),
        "sum" | "mean" | "max" => {
            let x = b.tensor(0, s, prog)?;
            let axis = b.axis(1, -1, s.g.ty(x).rank(), prog)?;
            let op = match b.name {
                "sum" => ReduceOp::Sum,
                "mean" => ReduceOp::Mean,
                _ => ReduceOp::Max,
            };
            one(s.apply(
                Op::Reduce {
                    op,
                    axis,
                    keepdims: b.bool(2)?,
                },
                vec![x],
                span,
            )?)
        }
        "transpose" => transpose(s, b, prog),
        "reshape" => {
            let x = b.tensor(0, s, prog)?;
            let shape = b.int_list(1, prog)?.unwrap_or_default();
            if let Some(d) = shape.iter().find(|d| **d <= 0) {
                return Err(b.bad(
                    format!("reshape sizes must be positive, found {d}"),
                    b.expr(1).map(|e| e.span()).unwrap_or(span),
                ));
            }
            one(s.apply(
                Op::Reshape {
                    shape: shape.into_iter().map(|d| d as u64).collect(),
                },
                vec![x],
                span,
            )?)
        }
        "split" => split(s, b, prog),
        "concat" => concat(s, b, prog),
        "slice" => {
            let x = b.tensor(0, s, prog)?;
            let axis = b.axis(1, 0, s.g.ty(x).rank(), prog)?;
            let (start, end) = (b.int(2, prog)?.unwrap_or(0), b.int(3, prog)?.unwrap_or(0));
            if start < 0 || end < 0 {
                return Err(b.bad(
                    format!("slice bounds must be non-negative, got {start}..{end}"),
                    span,
                ));
            }
            one(s.apply(
                Op::Slice {
                    axis,
                    start: start as u64,
                    end: end as u64,
                },
                vec![x],
                span,
            )?)
        }
        "embedding" => {
            let ins = b.tensors(2, s, prog)?;
            one(s.apply(Op::Embedding, ins, span)?)
        }
        "cross_entropy" => {
            let ins = b.tensors(2, s, prog)?;
            one(s.apply(Op::CrossEntropy, ins, span)?)
        }
        "causal_mask" => {
            let ins = b.tensors(1, s, prog)?;
            one(s.apply(Op::CausalMask, ins, span)?)
        }
        "cast" => {
            let x = b.tensor(0, s, prog)?;
            let to = match b.expr(1) {
                Some(Expr::Name(id)) => Dtype::parse(&id.name),
                _ => None,
            };
            let to = to.ok_or_else(|| {
                b.bad(
                    "expected a dtype: f32, bf16, f16 or i32".into(),
                    b.expr(1).map(|e| e.span()).unwrap_or(span),
                )
            })?;
            one(s.apply(Op::Cast { to }, vec![x], span)?)
        }
        "repeat" => {
            super::template::repeat(s, b.expr(0), b.expr(1), b.expr(2), &b.extra, span, prog)
        }
        other => unreachable!("builtin `{other}` listed in SIGNATURES but not lowered"),
    }
}

fn norm(s: &mut Scope, b: &Bound, prog: &mut Program) -> Result<Vec<Val>, LowerError> {
    let x = b.tensor(0, s, prog)?;
    let scale = b.tensor(1, s, prog)?;
    if b.name == "rmsnorm" {
        let eps = eps(s, b, 2, prog)?.unwrap_or(1e-6);
        return one(s.apply(Op::RmsNorm { eps }, vec![x, scale], b.span)?);
    }
    let mut inputs = vec![x, scale];
    if b.expr(2).is_some() {
        inputs.push(b.tensor(2, s, prog)?);
    }
    let eps = eps(s, b, 3, prog)?.unwrap_or(1e-5);
    one(s.apply(Op::LayerNorm { eps }, inputs, b.span)?)
}

/// The `eps` argument in slot `i`, if given: a finite constant >= 0 (a negative one would make
/// `var + eps` negative, and its square root NaN), else an error at the argument.
fn eps(s: &mut Scope, b: &Bound, i: usize, prog: &mut Program) -> Result<Option<f64>, LowerError> {
    let eps = b.float(i, s, prog)?;
    match (eps, b.expr(i)) {
        (Some(e), Some(at)) if !(e >= 0.0 && e.is_finite()) => Err(b.bad(
            format!("`{}`: eps must be a finite number >= 0, got {e}", b.name),
            at.span(),
        )),
        _ => Ok(eps),
    }
}

fn transpose(s: &mut Scope, b: &Bound, prog: &mut Program) -> Result<Vec<Val>, LowerError> {
    let x = b.tensor(0, s, prog)?;
    let rank = s.g.ty(x).rank();
    let perm: Vec<usize> = match b.int_list(1, prog)? {
        Some(p) => {
            let span = b.expr(1).map(|e| e.span()).unwrap_or(b.span);
            p.iter()
                .map(|&a| if a < 0 { a + rank as i64 } else { a })
                .map(|a| {
                    usize::try_from(a)
                        .map_err(|_| b.bad(format!("bad axis in perm for rank {rank}"), span))
                })
                .collect::<Result<_, _>>()?
        }
        None if rank >= 2 => {
            let mut p: Vec<usize> = (0..rank).collect();
            p.swap(rank - 2, rank - 1);
            p
        }
        None => {
            return Err(b.bad(
                format!("transpose of a rank-{rank} tensor needs `perm`"),
                b.span,
            ))
        }
    };
    one(s.apply(Op::Transpose { perm }, vec![x], b.span)?)
}

fn split(s: &mut Scope, b: &Bound, prog: &mut Program) -> Result<Vec<Val>, LowerError> {
    let x = b.tensor(0, s, prog)?;
    let axis = b.axis(2, -1, s.g.ty(x).rank(), prog)?;
    let size = s.g.ty(x).shape[axis];
    let parts_span = b.expr(1).map(|e| e.span()).unwrap_or(b.span);
    let sizes: Vec<u64> = match b.expr(1) {
        Some(Expr::List { .. }) => {
            let l = b.int_list(1, prog)?.unwrap_or_default();
            if l.iter().any(|&v| v <= 0) {
                return Err(b.bad("split sizes must be positive".into(), parts_span));
            }
            l.into_iter().map(|v| v as u64).collect()
        }
        _ => {
            let n = b.int(1, prog)?.unwrap_or(1);
            if n <= 0 || n > MAX_PARTS || !size.is_multiple_of(n as u64) {
                return Err(b.bad(
                    format!("cannot split an axis of size {size} into {n} equal parts"),
                    parts_span,
                ));
            }
            vec![size / n as u64; n as usize]
        }
    };
    one(s.apply(Op::Split { axis, sizes }, vec![x], b.span)?)
}

fn concat(s: &mut Scope, b: &Bound, prog: &mut Program) -> Result<Vec<Val>, LowerError> {
    let Some(Expr::List { items, .. }) = b.expr(0) else {
        return Err(b.bad(
            "concat takes a list of tensors: `concat([a, b], axis=0)`".into(),
            b.expr(0).map(|e| e.span()).unwrap_or(b.span),
        ));
    };
    let xs = items
        .iter()
        .map(|e| s.tensor(e, prog))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(&first) = xs.first() else {
        return Err(b.bad("concat of an empty list".into(), b.span));
    };
    let axis = b.axis(1, 0, s.g.ty(first).rank(), prog)?;
    one(s.apply(Op::Concat { axis }, xs, b.span)?)
}

fn block_call(
    s: &mut Scope,
    func: &Ident,
    args: &[Arg],
    span: Span,
    prog: &mut Program,
) -> Result<Vec<Val>, LowerError> {
    if let Some(a) = args.iter().find(|a| a.name.is_some()) {
        return Err(LowerError::BadOp {
            message: "block arguments are positional".into(),
            span: a.value.span(),
            hint: None,
        });
    }
    let exprs: Vec<&Expr> = args.iter().map(|a| &a.value).collect();
    let vals = exprs
        .iter()
        .map(|e| s.tensor(e, prog))
        .collect::<Result<Vec<_>, _>>()?;
    let arg_spans: Vec<Span> = exprs.iter().map(|e| e.span()).collect();
    let (v, _) = super::template::instantiate(s, &func.name, &vals, &arg_spans, span, prog)?;
    Ok(vec![Val::Tensor(v)])
}
