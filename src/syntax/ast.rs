//! The abstract syntax tree of a `.tpl` file. Every node carries its span; nothing here knows pest.

use crate::span::Span;

/// A name as written, with its span.
#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    /// The identifier text.
    pub name: String,
    /// Where it was written.
    pub span: Span,
}

/// A whole file: its top-level items in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Module {
    /// Items in source order.
    pub items: Vec<Item>,
}

/// A top-level item.
#[derive(Clone, Debug, PartialEq)]
pub enum Item {
    /// `mesh dp, tp`: declares mesh axes.
    Mesh(Vec<Ident>),
    /// `dim B = 8, H = 4*B`: integer constants, overridable from the command line.
    Dims(Vec<DimDef>),
    /// `input x : f32[B, H] @ [dp, _]`.
    Input(Decl),
    /// `param w : f32[H, H] @ [_, tp]` (also allowed inside blocks).
    Param(Decl),
    /// `output y, z @ [dp, _]`.
    Output(Vec<OutputItem>),
    /// `a, b = expr @ spec`.
    Assign(Assign),
    /// `block name(args) -> type { ... }`.
    Block(BlockDef),
    /// `train loss with adamw(lr=1e-3)`: the program is a training step.
    Train(Train),
}

/// `train LOSS with OPTIMIZER(args)`.
#[derive(Clone, Debug, PartialEq)]
pub struct Train {
    /// The scalar loss to minimise.
    pub loss: Ident,
    /// The optimizer's name (`sgd`, `adamw`).
    pub optimizer: Ident,
    /// The optimizer's arguments as written.
    pub args: Vec<Arg>,
    /// The `loss_scale` clause, with its span.
    pub loss_scale: Option<(ScaleSpec, Span)>,
    /// Span of the whole statement.
    pub span: Span,
}

/// A `loss_scale` clause as written.
#[derive(Clone, Debug, PartialEq)]
pub enum ScaleSpec {
    /// `loss_scale N`.
    Static(f64),
    /// `loss_scale dynamic` or `loss_scale dynamic(N)` (N with its span).
    Dynamic(Option<(f64, Span)>),
}

/// One `NAME = expr` of a `dim` statement.
#[derive(Clone, Debug, PartialEq)]
pub struct DimDef {
    /// The dim's name.
    pub name: Ident,
    /// Integer expression over earlier dims.
    pub value: Expr,
}

/// An `input` or `param` declaration.
#[derive(Clone, Debug, PartialEq)]
pub struct Decl {
    /// Declared name.
    pub name: Ident,
    /// Declared type.
    pub ty: TypeExpr,
    /// Optional sharding annotation.
    pub spec: Option<SpecExpr>,
    /// Where `frozen` was written (params only): the param is not trained.
    pub frozen: Option<Span>,
    /// Span of the whole declaration.
    pub span: Span,
}

/// `f32[B, 4*H]`: dtype and dim expressions.
#[derive(Clone, Debug, PartialEq)]
pub struct TypeExpr {
    /// The dtype keyword (`f32`, `bf16`, `f16`, `i32`) as written.
    pub dtype: Ident,
    /// One integer expression per dim (empty for a scalar).
    pub dims: Vec<Expr>,
    /// Span of the whole type.
    pub span: Span,
}

/// `[_, tp]` or `[(dp, tp), _]`: for each tensor dim, the mesh axes splitting it (major first).
#[derive(Clone, Debug, PartialEq)]
pub struct SpecExpr {
    /// One entry per dim; empty for `_`.
    pub dims: Vec<Vec<Ident>>,
    /// Span from `[` to `]`.
    pub span: Span,
}

/// One item of an `output` statement.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputItem {
    /// The value's name.
    pub name: Ident,
    /// Optional required placement.
    pub spec: Option<SpecExpr>,
}

/// `targets = value @ spec`.
#[derive(Clone, Debug, PartialEq)]
pub struct Assign {
    /// One or more names (several for `split`).
    pub targets: Vec<Ident>,
    /// The right-hand side.
    pub value: Expr,
    /// Optional sharding constraint on the result(s).
    pub spec: Option<SpecExpr>,
    /// Span of the whole statement.
    pub span: Span,
}

/// A block definition: typed arguments, a body of params and assignments, one `return`.
#[derive(Clone, Debug, PartialEq)]
pub struct BlockDef {
    /// The block's name.
    pub name: Ident,
    /// Arguments with their types.
    pub args: Vec<(Ident, TypeExpr)>,
    /// Declared result type, if given.
    pub ret_ty: Option<TypeExpr>,
    /// Body statements (`Param` and `Assign` only; the parser rejects others).
    pub body: Vec<Item>,
    /// The returned expression.
    pub ret: Expr,
    /// Span of the whole definition.
    pub span: Span,
}

/// A binary operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BinOp {
    /// `+`
    Add,
    /// `-`
    Sub,
    /// `*`
    Mul,
    /// `/`
    Div,
    /// `@` (matmul)
    MatMul,
}

/// An expression.
#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    /// A numeric literal; `is_int` when written without `.`/exponent.
    Num {
        /// The value.
        value: f64,
        /// True for integer literals.
        is_int: bool,
        /// The exact value of an integer literal that fits in i64 (f64 is exact only to 2^53).
        int: Option<i64>,
        /// Where it was written.
        span: Span,
    },
    /// A name: a value, a dim, or (as a call argument) a block or dtype.
    Name(Ident),
    /// `-e`.
    Neg {
        /// The operand.
        expr: Box<Expr>,
        /// Span including the `-`.
        span: Span,
    },
    /// `lhs op rhs`.
    Binary {
        /// The operator.
        op: BinOp,
        /// Left operand.
        lhs: Box<Expr>,
        /// Right operand.
        rhs: Box<Expr>,
        /// Span of the whole expression.
        span: Span,
        /// Span of the operator token.
        op_span: Span,
    },
    /// `f(a, b, key=c)`.
    Call {
        /// The callee: a builtin op or a block.
        func: Ident,
        /// Arguments in order.
        args: Vec<Arg>,
        /// Span of the whole call.
        span: Span,
    },
    /// `[a, b, c]`: only as a call argument (shapes, permutations).
    List {
        /// The items.
        items: Vec<Expr>,
        /// Span from `[` to `]`.
        span: Span,
    },
}

impl Expr {
    /// The span of the whole expression.
    pub fn span(&self) -> Span {
        match self {
            Expr::Num { span, .. }
            | Expr::Neg { span, .. }
            | Expr::Binary { span, .. }
            | Expr::Call { span, .. }
            | Expr::List { span, .. } => *span,
            Expr::Name(id) => id.span,
        }
    }
}

/// A call argument, positional or `name=value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Arg {
    /// The keyword, if given.
    pub name: Option<Ident>,
    /// The value.
    pub value: Expr,
}
