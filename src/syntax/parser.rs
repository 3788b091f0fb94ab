//! pest parser and conversion of pest pairs to the AST.
//!
//! Parsing runs in three steps: a bracket-depth pre-scan (so that pest's recursive descent cannot
//! exhaust the stack), the pest grammar `grammar/tpl.pest`, and the conversion of pest pairs to
//! the AST (operator precedence through a Pratt parser, block-body rules). pest errors become
//! [`ParseError::Syntax`] with friendly token names; nothing pest-typed leaves this module.

use super::ast::{
    Arg, Assign, BinOp, BlockDef, Decl, DimDef, Expr, Ident, Item, Module, OutputItem, ScaleSpec,
    SpecExpr, Train, TypeExpr,
};
use crate::span::{LineIndex, Span};
use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::Pair;
use pest::pratt_parser::{Assoc, Op, PrattParser};
use pest::Parser as _;
use std::sync::LazyLock;

/// A syntax error with its location.
#[derive(Debug, Clone, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum ParseError {
    /// The text does not match the grammar.
    #[error("syntax error: {message}")]
    #[diagnostic(code(tpc::syntax))]
    Syntax {
        /// What was expected or found.
        message: String,
        /// Where.
        #[label("{label}")]
        span: Span,
        /// Short label under the caret.
        label: String,
        /// Optional hint.
        #[help]
        hint: Option<String>,
    },
}

/// Parses a whole `.tpl` source into a module.
pub fn parse(src: &str) -> Result<Module, ParseError> {
    let spans = SpanMap::new(src);
    let brackets = scan_brackets(src);
    if let Some(pos) = brackets.too_deep {
        return Err(syntax(
            spans.span(pos, pos + 1),
            format!("nesting deeper than {MAX_NESTING} levels"),
            "too deeply nested",
            Some("split the expression into several assignments".into()),
        ));
    }
    let mut pairs = TplParser::parse(Rule::file, src)
        .map_err(|e| convert_pest_error(e, src, &spans, &brackets))?;
    let conv = Conv { spans: &spans };
    match pairs.next() {
        Some(file) => conv.module(file),
        None => Ok(Module { items: Vec::new() }),
    }
}

/// Deepest allowed nesting of `(`, `[` and `{`.
const MAX_NESTING: usize = 256;

/// Deepest allowed expression tree (operators, negations, calls and lists).
const MAX_EXPR_DEPTH: u32 = 1024;

/// The keywords, which cannot be used as names.
const KEYWORDS: [&str; 7] = ["mesh", "dim", "input", "param", "output", "block", "return"];

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/tpl.pest"]
struct TplParser;

type Res<T> = Result<T, ParseError>;
type P<'i> = Pair<'i, Rule>;

/// Operator precedence: `+ -` lowest, then `* / @`, then prefix `-`; binary operators are left
/// associative.
static PRATT: LazyLock<PrattParser<Rule>> = LazyLock::new(|| {
    PrattParser::new()
        .op(Op::infix(Rule::add, Assoc::Left) | Op::infix(Rule::sub, Assoc::Left))
        .op(Op::infix(Rule::mul, Assoc::Left)
            | Op::infix(Rule::div, Assoc::Left)
            | Op::infix(Rule::matmul, Assoc::Left))
        .op(Op::prefix(Rule::neg))
});

/// Builds a [`ParseError::Syntax`].
fn syntax(span: Span, message: String, label: &str, hint: Option<String>) -> ParseError {
    ParseError::Syntax {
        message,
        span,
        label: label.to_owned(),
        hint,
    }
}

/// The error for a parse tree that does not have the shape the grammar guarantees.
fn internal_error() -> ParseError {
    syntax(
        Span::default(),
        "internal parser error: unexpected parse tree".into(),
        "here",
        None,
    )
}

/// The next pair of `it`, which the grammar guarantees to exist.
fn take<'i>(it: &mut impl Iterator<Item = P<'i>>) -> Res<P<'i>> {
    it.next().ok_or_else(internal_error)
}

// ---------------------------------------------------------------------------------------------
// Spans

/// Byte offsets to spans with line and column: [`LineIndex`], plus a fast path for offsets in the
/// ASCII prefix of their line (every AST node, since only comments may hold non-ASCII text), so
/// that a huge single-line file does not make column computation quadratic.
struct SpanMap<'s> {
    src: &'s str,
    index: LineIndex,
    /// Per line: its start offset and the offset of its first non-ASCII byte (or `usize::MAX`).
    lines: Vec<(usize, usize)>,
}

impl<'s> SpanMap<'s> {
    /// Indexes `src`.
    fn new(src: &'s str) -> Self {
        let mut lines = Vec::new();
        let (mut start, mut non_ascii) = (0, usize::MAX);
        for (i, b) in src.bytes().enumerate() {
            if b >= 0x80 && non_ascii == usize::MAX {
                non_ascii = i;
            }
            if b == b'\n' {
                lines.push((start, non_ascii));
                (start, non_ascii) = (i + 1, usize::MAX);
            }
        }
        lines.push((start, non_ascii));
        SpanMap {
            src,
            index: LineIndex::new(src),
            lines,
        }
    }

    /// The span of bytes `[start, end)`; identical to `LineIndex::span`.
    fn span(&self, start: usize, end: usize) -> Span {
        let line = self
            .lines
            .partition_point(|&(ls, _)| ls <= start)
            .saturating_sub(1);
        match self.lines.get(line) {
            Some(&(ls, non_ascii)) if start <= non_ascii => Span {
                start: start as u32,
                end: end as u32,
                line: line as u32 + 1,
                col: (start - ls) as u32 + 1,
            },
            _ => self.index.span(self.src, start, end),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Bracket pre-scan

/// What the bracket pre-scan found.
struct Brackets {
    /// Offset of the first opening bracket nested deeper than [`MAX_NESTING`].
    too_deep: Option<usize>,
    /// Offsets of the opening brackets that are never closed, in order.
    unclosed: Vec<usize>,
}

/// Scans `(`, `[` and `{` nesting outside comments.
fn scan_brackets(src: &str) -> Brackets {
    let bytes = src.as_bytes();
    let mut open = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'#' => match bytes[i..].iter().position(|&b| b == b'\n') {
                Some(n) => i += n,
                None => break,
            },
            b'(' | b'[' | b'{' if open.len() == MAX_NESTING => {
                return Brackets {
                    too_deep: Some(i),
                    unclosed: Vec::new(),
                };
            }
            b'(' | b'[' | b'{' => open.push(i),
            b')' | b']' | b'}' => {
                open.pop();
            }
            _ => {}
        }
        i += 1;
    }
    Brackets {
        too_deep: None,
        unclosed: open,
    }
}

// ---------------------------------------------------------------------------------------------
// pest errors

/// Converts a pest error into a [`ParseError::Syntax`] with friendly names and a hint.
fn convert_pest_error(
    err: pest::error::Error<Rule>,
    src: &str,
    spans: &SpanMap,
    brackets: &Brackets,
) -> ParseError {
    let pos = match err.location {
        InputLocation::Pos(p) | InputLocation::Span((p, _)) => p,
    };
    let pos = (0..=pos.min(src.len()))
        .rev()
        .find(|&p| src.is_char_boundary(p))
        .unwrap_or(0);
    let span = error_span(src, pos, spans);
    let found = found_token(src, pos);
    match err.variant {
        ErrorVariant::ParsingError { positives, .. } => syntax(
            span,
            expected_message(&positives),
            &format!("unexpected {found}"),
            error_hint(src, pos, &positives, spans, brackets),
        ),
        ErrorVariant::CustomError { message } => syntax(
            span,
            format!("input too complex to parse ({message})"),
            "here",
            Some("simplify or split the expression".into()),
        ),
    }
}

/// The span of the character at `pos`; at the end of the text, an empty span right after the
/// last token (or the last character, when the text ends there, so that miette can show it).
fn error_span(src: &str, pos: usize, spans: &SpanMap) -> Span {
    if let Some(c) = src[pos..].chars().next() {
        return spans.span(pos, pos + c.len_utf8());
    }
    let end = significant_end(src);
    match src[..end].chars().next_back() {
        Some(c) if end == src.len() => spans.span(end - c.len_utf8(), end),
        _ => spans.span(end, end),
    }
}

/// The end offset of the last character that is neither whitespace nor in a comment.
fn significant_end(src: &str) -> usize {
    let mut end = 0;
    let mut line_start = 0;
    for line in src.split_inclusive('\n') {
        let code = line
            .split('#')
            .next()
            .unwrap_or("")
            .trim_end_matches([' ', '\t', '\r', '\n']);
        if !code.is_empty() {
            end = line_start + code.len();
        }
        line_start += line.len();
    }
    end
}

/// `expected one of: ...` from pest's expected rules.
fn expected_message(positives: &[Rule]) -> String {
    let mut rules = positives.to_vec();
    if rules.contains(&Rule::expr) {
        let in_expr = |r: &Rule| matches!(r, Rule::number | Rule::ident | Rule::neg | Rule::lparen);
        rules.retain(|r| !in_expr(r));
    }
    rules.sort_by_key(|r| (*r == Rule::EOI, *r));
    let is_op = |r: &Rule| {
        matches!(
            r,
            Rule::add | Rule::sub | Rule::mul | Rule::div | Rule::matmul
        )
    };
    let collapse_ops = rules.iter().filter(|r| is_op(r)).count() >= 4;
    let mut names: Vec<&str> = Vec::new();
    for rule in rules {
        let name = if collapse_ops && is_op(&rule) {
            "operator"
        } else {
            describe(rule)
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    match names.as_slice() {
        [] => "unexpected input".into(),
        [one] => format!("expected {one}"),
        many => format!("expected one of: {}", many.join(", ")),
    }
}

/// The friendly name of a grammar rule, as used in "expected ..." messages.
fn describe(rule: Rule) -> &'static str {
    match rule {
        Rule::EOI => "end of input",
        Rule::file | Rule::stmt => "statement",
        Rule::mesh_stmt | Rule::kw_mesh => "`mesh`",
        Rule::dim_stmt | Rule::kw_dim => "`dim`",
        Rule::input_stmt | Rule::kw_input => "`input`",
        Rule::param_stmt | Rule::kw_param => "`param`",
        Rule::output_stmt | Rule::kw_output => "`output`",
        Rule::block_stmt | Rule::kw_block => "`block`",
        Rule::return_stmt | Rule::kw_return => "`return`",
        Rule::train_stmt | Rule::kw_train => "`train`",
        Rule::kw_with => "`with`",
        Rule::loss_scale | Rule::kw_loss_scale => "`loss_scale`",
        Rule::kw_dynamic => "`dynamic`",
        Rule::kw_frozen => "`frozen`",
        Rule::leaf_tail => "`frozen` or '@'",
        Rule::assign_stmt => "assignment",
        Rule::dim_def => "dim definition",
        Rule::output_item => "output name",
        Rule::block_arg => "block argument",
        Rule::type_expr => "type",
        Rule::spec => "sharding spec",
        Rule::spec_entry => "spec entry (`_`, an axis, or `(axes)`)",
        Rule::expr | Rule::paren | Rule::primary => "expression",
        Rule::arg => "argument",
        Rule::spec_annot => "'@'",
        Rule::infix => "operator",
        Rule::WHITESPACE => "whitespace",
        Rule::COMMENT => "comment",
        Rule::call => "call",
        Rule::kwarg => "keyword argument",
        Rule::list => "list",
        Rule::number => "number",
        Rule::ident | Rule::keyword | Rule::ident_char => "identifier",
        Rule::blank => "'_'",
        Rule::add => "'+'",
        Rule::sub | Rule::neg => "'-'",
        Rule::mul => "'*'",
        Rule::div => "'/'",
        Rule::matmul => "'@'",
        Rule::lparen => "'('",
        Rule::rparen => "')'",
        Rule::lbrack => "'['",
        Rule::rbrack => "']'",
        Rule::lbrace => "'{'",
        Rule::rbrace => "'}'",
        Rule::comma => "','",
        Rule::colon => "':'",
        Rule::eq => "'='",
        Rule::arrow => "'->'",
    }
}

/// How the text at `pos` reads in a message: a word, a character, or the end of input.
fn found_token(src: &str, pos: usize) -> String {
    let rest = &src[pos..];
    let Some(c) = rest.chars().next() else {
        return "end of input".into();
    };
    let word = word_at(src, pos);
    if !word.is_empty() {
        let short: String = word.chars().take(24).collect();
        let dots = if short.len() < word.len() { "..." } else { "" };
        format!("`{short}{dots}`")
    } else if c.is_control() || c.is_whitespace() {
        format!("character {c:?}")
    } else {
        format!("`{c}`")
    }
}

/// The run of identifier characters (`[A-Za-z0-9_]`) starting at `pos`.
fn word_at(src: &str, pos: usize) -> &str {
    let rest = &src[pos..];
    let len = rest
        .bytes()
        .position(|b| !(b.is_ascii_alphanumeric() || b == b'_'))
        .unwrap_or(rest.len());
    &rest[..len]
}

/// The identifier-like word that ends right before `pos` (skipping spaces).
fn word_before(src: &str, pos: usize) -> &str {
    let head = src[..pos].trim_end();
    let start = head
        .bytes()
        .rposition(|b| !(b.is_ascii_alphanumeric() || b == b'_'))
        .map_or(0, |i| i + 1);
    &head[start..]
}

/// A hint for common mistakes at the error position, if one applies.
fn error_hint(
    src: &str,
    pos: usize,
    positives: &[Rule],
    spans: &SpanMap,
    brackets: &Brackets,
) -> Option<String> {
    let wants_expr = positives
        .iter()
        .any(|r| matches!(r, Rule::expr | Rule::number));
    let wants_name = wants_expr || positives.contains(&Rule::ident);
    let word = word_at(src, pos);
    let next = src[pos..].chars().next();
    let before = word_before(src, pos);
    if KEYWORDS.contains(&word) && wants_name {
        Some(format!(
            "`{word}` is a reserved word and cannot be used as a name"
        ))
    } else if KEYWORDS.contains(&before) && wants_name && next == Some('=') {
        Some(format!(
            "`{before}` is a reserved word and cannot be used as a name"
        ))
    } else if word == "_" && wants_name {
        Some("`_` is only allowed as an entry of a sharding spec".into())
    } else if next.is_some_and(|c| !c.is_ascii()) {
        Some("only comments may contain non-ASCII text; names are `[A-Za-z_][A-Za-z0-9_]*`".into())
    } else if next.is_some_and(|c| c.is_ascii_digit()) {
        Some("numbers are written like `8`, `0.125` or `1e-5`".into())
    } else if next == Some('[') && wants_expr {
        Some("a list `[...]` is only allowed directly as a call argument".into())
    } else {
        unclosed_hint(pos, spans, brackets)
    }
}

/// Points at the innermost bracket before `pos` that is never closed.
fn unclosed_hint(pos: usize, spans: &SpanMap, brackets: &Brackets) -> Option<String> {
    let open = *brackets.unclosed.iter().rev().find(|&&o| o < pos)?;
    let at = spans.span(open, open + 1);
    let c = spans.src[open..].chars().next()?;
    Some(format!(
        "the `{c}` at line {}, column {} is never closed",
        at.line, at.col
    ))
}

// ---------------------------------------------------------------------------------------------
// Conversion to the AST

/// A statement: an item, or a block's `return`.
enum Stmt {
    /// Any item.
    Item(Item),
    /// `return expr`.
    Return(Expr),
}

/// Converts pest pairs to AST nodes.
struct Conv<'a, 's> {
    spans: &'a SpanMap<'s>,
}

/// True for tokens that carry no information once parsed (punctuation and keywords).
fn is_punct(rule: Rule) -> bool {
    matches!(
        rule,
        Rule::kw_mesh
            | Rule::kw_dim
            | Rule::kw_input
            | Rule::kw_param
            | Rule::kw_output
            | Rule::kw_block
            | Rule::kw_return
            | Rule::kw_train
            | Rule::kw_with
            | Rule::kw_loss_scale
            | Rule::kw_dynamic
            | Rule::matmul
            | Rule::lparen
            | Rule::rparen
            | Rule::lbrack
            | Rule::rbrack
            | Rule::lbrace
            | Rule::comma
            | Rule::colon
            | Rule::eq
            | Rule::arrow
    )
}

/// The children of `pair` without punctuation and keywords.
fn parts<'i>(pair: P<'i>) -> impl Iterator<Item = P<'i>> {
    pair.into_inner().filter(|p| !is_punct(p.as_rule()))
}

/// End offset of the last token of `pair` (pest spans may include trailing whitespace).
fn token_end(pair: &P) -> usize {
    let mut last = pair.clone();
    while let Some(child) = last.clone().into_inner().next_back() {
        last = child;
    }
    last.as_span().end()
}

impl Conv<'_, '_> {
    /// The span of `pair`, from its first to its last token.
    fn span(&self, pair: &P) -> Span {
        self.spans.span(pair.as_span().start(), token_end(pair))
    }

    /// An identifier token.
    fn ident(&self, pair: P) -> Ident {
        Ident {
            name: pair.as_str().to_owned(),
            span: self.span(&pair),
        }
    }

    /// The whole file.
    fn module(&self, file: P) -> Res<Module> {
        let mut items = Vec::new();
        for pair in file.into_inner().filter(|p| p.as_rule() == Rule::stmt) {
            let span = self.span(&pair);
            match self.stmt(pair)? {
                Stmt::Item(item) => items.push(item),
                Stmt::Return(_) => {
                    return Err(syntax(
                        span,
                        "`return` outside a block".into(),
                        "not inside a block",
                        Some("`return` ends the body of a `block` definition".into()),
                    ))
                }
            }
        }
        Ok(Module { items })
    }

    /// One statement (a `stmt` pair).
    fn stmt(&self, pair: P) -> Res<Stmt> {
        let inner = take(&mut pair.into_inner())?;
        let item = match inner.as_rule() {
            Rule::mesh_stmt => Item::Mesh(parts(inner).map(|p| self.ident(p)).collect()),
            Rule::dim_stmt => {
                Item::Dims(parts(inner).map(|p| self.dim_def(p)).collect::<Res<_>>()?)
            }
            Rule::input_stmt => Item::Input(not_frozen(self.decl(inner)?)?),
            Rule::param_stmt => Item::Param(self.decl(inner)?),
            Rule::output_stmt => Item::Output(
                parts(inner)
                    .map(|p| self.output_item(p))
                    .collect::<Res<_>>()?,
            ),
            Rule::assign_stmt => Item::Assign(self.assign(inner)?),
            Rule::block_stmt => Item::Block(self.block(inner)?),
            Rule::train_stmt => Item::Train(self.train(inner)?),
            Rule::return_stmt => return Ok(Stmt::Return(self.expr(take(&mut parts(inner))?)?)),
            _ => return Err(internal_error()),
        };
        Ok(Stmt::Item(item))
    }

    /// `NAME = expr` in a `dim` statement.
    fn dim_def(&self, pair: P) -> Res<DimDef> {
        let mut it = parts(pair);
        let name = self.ident(take(&mut it)?);
        let value = self.expr(take(&mut it)?)?;
        Ok(DimDef { name, value })
    }

    /// An `input` or `param` declaration.
    fn decl(&self, pair: P) -> Res<Decl> {
        let span = self.span(&pair);
        let mut it = parts(pair);
        let name = self.ident(take(&mut it)?);
        let ty = self.type_expr(take(&mut it)?)?;
        let (mut spec, mut frozen) = (None, None);
        for p in it {
            match p.as_rule() {
                Rule::spec => spec = Some(self.spec(p)?),
                Rule::kw_frozen => frozen = Some(self.span(&p)),
                _ => return Err(internal_error()),
            }
        }
        Ok(Decl {
            name,
            ty,
            spec,
            frozen,
            span,
        })
    }

    /// `train LOSS with OPTIMIZER(args)`.
    fn train(&self, pair: P) -> Res<Train> {
        let span = self.span(&pair);
        let mut it = parts(pair);
        let loss = self.ident(take(&mut it)?);
        let (call, _) = self.call(take(&mut it)?)?;
        let Expr::Call { func, args, .. } = call else {
            return Err(internal_error());
        };
        let loss_scale = it
            .next()
            .map(|p| (self.scale_spec(p.clone()), self.span(&p)));
        Ok(Train {
            loss,
            optimizer: func,
            args,
            loss_scale,
            span,
        })
    }

    /// A `loss_scale` clause: `dynamic`, `dynamic(N)` or `N` (an unparsable number is inf, which
    /// lowering rejects at its span).
    fn scale_spec(&self, pair: P) -> ScaleSpec {
        let inner: Vec<P> = pair.into_inner().collect();
        let dynamic = inner.iter().any(|q| q.as_rule() == Rule::kw_dynamic);
        let number = inner.iter().find(|q| q.as_rule() == Rule::number).map(|q| {
            let v = q.as_str().parse().unwrap_or(f64::INFINITY);
            (v, self.span(q))
        });
        match (dynamic, number) {
            (true, n) => ScaleSpec::Dynamic(n),
            (false, n) => ScaleSpec::Static(n.map_or(f64::INFINITY, |(v, _)| v)),
        }
    }

    /// One name of an `output` statement with its optional spec.
    fn output_item(&self, pair: P) -> Res<OutputItem> {
        let mut it = parts(pair);
        let name = self.ident(take(&mut it)?);
        let spec = it.next().map(|p| self.spec(p)).transpose()?;
        Ok(OutputItem { name, spec })
    }

    /// `a, b = expr @ spec`.
    fn assign(&self, pair: P) -> Res<Assign> {
        let span = self.span(&pair);
        let mut targets = Vec::new();
        let mut value = None;
        let mut spec = None;
        for p in parts(pair) {
            match p.as_rule() {
                Rule::ident => targets.push(self.ident(p)),
                Rule::expr => value = Some(self.expr(p)?),
                Rule::spec => spec = Some(self.spec(p)?),
                _ => return Err(internal_error()),
            }
        }
        Ok(Assign {
            targets,
            value: value.ok_or_else(internal_error)?,
            spec,
            span,
        })
    }

    /// `f32[B, 4*H]`.
    fn type_expr(&self, pair: P) -> Res<TypeExpr> {
        let span = self.span(&pair);
        let mut it = parts(pair);
        let dtype = self.ident(take(&mut it)?);
        let dims = it.map(|p| self.expr(p)).collect::<Res<_>>()?;
        Ok(TypeExpr { dtype, dims, span })
    }

    /// `[_, tp]`, `[(dp, tp), _]`.
    fn spec(&self, pair: P) -> Res<SpecExpr> {
        let span = self.span(&pair);
        let dims = parts(pair)
            .map(|entry| {
                parts(entry)
                    .filter(|p| p.as_rule() == Rule::ident)
                    .map(|p| self.ident(p))
                    .collect()
            })
            .collect();
        Ok(SpecExpr { dims, span })
    }

    /// `block name(args) -> type { body; return e }`.
    fn block(&self, pair: P) -> Res<BlockDef> {
        let span = self.span(&pair);
        let mut it = parts(pair);
        let name = self.ident(take(&mut it)?);
        let (mut args, mut ret_ty, mut stmts, mut close) = (Vec::new(), None, Vec::new(), span);
        for p in it {
            match p.as_rule() {
                Rule::block_arg => args.push(self.block_arg(p)?),
                Rule::type_expr => ret_ty = Some(self.type_expr(p)?),
                Rule::stmt => stmts.push((self.span(&p), self.stmt(p)?)),
                Rule::rbrace => close = self.span(&p),
                _ => return Err(internal_error()),
            }
        }
        let (body, ret) = block_body(stmts, close, &name)?;
        Ok(BlockDef {
            name,
            args,
            ret_ty,
            body,
            ret,
            span,
        })
    }

    /// `x: f32[B, H]` in a block's argument list.
    fn block_arg(&self, pair: P) -> Res<(Ident, TypeExpr)> {
        let mut it = parts(pair);
        let name = self.ident(take(&mut it)?);
        Ok((name, self.type_expr(take(&mut it)?)?))
    }

    /// An expression (an `expr` pair).
    fn expr(&self, pair: P) -> Res<Expr> {
        Ok(self.expr_depth(pair)?.0)
    }

    /// An expression and the depth of its tree, which is limited to [`MAX_EXPR_DEPTH`].
    fn expr_depth(&self, pair: P) -> Res<(Expr, u32)> {
        self.check_prefix_runs(&pair)?;
        PRATT
            .map_primary(|p| self.primary(p))
            .map_prefix(|op, rhs| self.neg(op, rhs?))
            .map_infix(|lhs, op, rhs| self.binary(lhs?, op, rhs?))
            .parse(pair.into_inner())
    }

    /// Rejects runs of prefix `-` longer than the depth limit (the Pratt parser recurses on them).
    fn check_prefix_runs(&self, pair: &P) -> Res<()> {
        let mut run = 0;
        for p in pair.clone().into_inner() {
            run = if p.as_rule() == Rule::neg { run + 1 } else { 0 };
            if run > MAX_EXPR_DEPTH {
                return Err(self.too_deep(self.span(&p)));
            }
        }
        Ok(())
    }

    /// The error for an expression deeper than [`MAX_EXPR_DEPTH`].
    fn too_deep(&self, span: Span) -> ParseError {
        syntax(
            span,
            format!("expression nested deeper than {MAX_EXPR_DEPTH} levels"),
            "too deep",
            Some("split the expression into several assignments".into()),
        )
    }

    /// Checks the depth `depth` of a node whose operator or head is at `at`.
    fn check_depth(&self, depth: u32, at: Span) -> Res<u32> {
        if depth > MAX_EXPR_DEPTH {
            Err(self.too_deep(at))
        } else {
            Ok(depth)
        }
    }

    /// `-e`.
    fn neg(&self, op: P, (expr, depth): (Expr, u32)) -> Res<(Expr, u32)> {
        let op_span = self.span(&op);
        let depth = self.check_depth(depth + 1, op_span)?;
        let span = op_span.join(expr.span());
        Ok((
            Expr::Neg {
                expr: Box::new(expr),
                span,
            },
            depth,
        ))
    }

    /// `lhs op rhs`.
    fn binary(&self, lhs: (Expr, u32), op: P, rhs: (Expr, u32)) -> Res<(Expr, u32)> {
        let op_span = self.span(&op);
        let depth = self.check_depth(lhs.1.max(rhs.1) + 1, op_span)?;
        let op = match op.as_rule() {
            Rule::add => BinOp::Add,
            Rule::sub => BinOp::Sub,
            Rule::mul => BinOp::Mul,
            Rule::div => BinOp::Div,
            Rule::matmul => BinOp::MatMul,
            _ => return Err(internal_error()),
        };
        let span = lhs.0.span().join(rhs.0.span());
        let expr = Expr::Binary {
            op,
            lhs: Box::new(lhs.0),
            rhs: Box::new(rhs.0),
            span,
            op_span,
        };
        Ok((expr, depth))
    }

    /// A number, name, call or parenthesised expression.
    fn primary(&self, pair: P) -> Res<(Expr, u32)> {
        match pair.as_rule() {
            Rule::number => Ok((self.number(pair), 1)),
            Rule::ident => Ok((Expr::Name(self.ident(pair)), 1)),
            Rule::call => self.call(pair),
            Rule::paren => self.paren(pair),
            _ => Err(internal_error()),
        }
    }

    /// A numeric literal.
    fn number(&self, pair: P) -> Expr {
        let text = pair.as_str();
        let is_int = !text.contains(['.', 'e', 'E']);
        Expr::Num {
            value: text.parse().unwrap_or(f64::INFINITY),
            is_int,
            int: if is_int { text.parse().ok() } else { None },
            span: self.span(&pair),
        }
    }

    /// `(e)`: the inner expression; a compound one gets a span that includes the parentheses.
    fn paren(&self, pair: P) -> Res<(Expr, u32)> {
        let outer = self.span(&pair);
        let (mut expr, depth) = self.expr_depth(take(&mut parts(pair))?)?;
        if let Expr::Binary { span, .. } | Expr::Neg { span, .. } = &mut expr {
            *span = outer;
        }
        Ok((expr, depth))
    }

    /// `f(a, key=b, [1, 2])`.
    fn call(&self, pair: P) -> Res<(Expr, u32)> {
        let span = self.span(&pair);
        let mut it = parts(pair);
        let func = self.ident(take(&mut it)?);
        let mut args = Vec::new();
        let mut depth = 0;
        for p in it {
            let (arg, d) = self.arg(p)?;
            depth = depth.max(d);
            args.push(arg);
        }
        let depth = self.check_depth(depth + 1, func.span)?;
        Ok((Expr::Call { func, args, span }, depth))
    }

    /// A positional or keyword call argument.
    fn arg(&self, pair: P) -> Res<(Arg, u32)> {
        if pair.as_rule() != Rule::kwarg {
            let (value, depth) = self.arg_value(pair)?;
            return Ok((Arg { name: None, value }, depth));
        }
        let mut it = parts(pair);
        let name = Some(self.ident(take(&mut it)?));
        let (value, depth) = self.arg_value(take(&mut it)?)?;
        Ok((Arg { name, value }, depth))
    }

    /// A call argument's value: a list or an expression.
    fn arg_value(&self, pair: P) -> Res<(Expr, u32)> {
        if pair.as_rule() != Rule::list {
            return self.expr_depth(pair);
        }
        let span = self.span(&pair);
        let mut items = Vec::new();
        let mut depth = 0;
        for p in parts(pair) {
            let (item, d) = self.expr_depth(p)?;
            depth = depth.max(d);
            items.push(item);
        }
        let depth = self.check_depth(depth + 1, span)?;
        Ok((Expr::List { items, span }, depth))
    }
}

/// Splits a block's statements into its body and its final `return`, rejecting statements that
/// are not allowed in a block.
fn block_body(stmts: Vec<(Span, Stmt)>, close: Span, name: &Ident) -> Res<(Vec<Item>, Expr)> {
    let mut body = Vec::new();
    let mut ret = None;
    for (span, stmt) in stmts {
        if ret.is_some() {
            return Err(syntax(
                span,
                "statement after `return`".into(),
                "after the block's `return`",
                Some("`return` must be the last statement of a block".into()),
            ));
        }
        match stmt {
            Stmt::Return(e) => ret = Some(e),
            Stmt::Item(item @ (Item::Param(_) | Item::Assign(_))) => body.push(item),
            Stmt::Item(other) => return Err(forbidden_in_block(&other, span)),
        }
    }
    let ret = ret.ok_or_else(|| {
        syntax(
            close,
            format!("block `{}` has no `return`", name.name),
            "expected `return ...` before this `}`",
            Some("a block body ends with `return expr`".into()),
        )
    })?;
    Ok((body, ret))
}

/// An input declaration, which may not be `frozen` (only params are trained).
fn not_frozen(d: Decl) -> Res<Decl> {
    match d.frozen {
        None => Ok(d),
        Some(span) => Err(syntax(
            span,
            format!("input `{}` cannot be `frozen`", d.name.name),
            "only params can be frozen",
            Some("inputs are never trained; `frozen` keeps a `param` out of training".into()),
        )),
    }
}

/// The error for an item that may not appear inside a block.
fn forbidden_in_block(item: &Item, span: Span) -> ParseError {
    let what = match item {
        Item::Mesh(_) => "`mesh` declarations are",
        Item::Dims(_) => "`dim` definitions are",
        Item::Input(_) => "`input` declarations are",
        Item::Output(_) => "`output` statements are",
        Item::Block(_) => "nested `block` definitions are",
        Item::Train(_) => "`train` statements are",
        Item::Param(_) | Item::Assign(_) => "this statement is",
    };
    syntax(
        span,
        format!("{what} not allowed inside a block"),
        "not allowed inside a block",
        Some("a block body holds `param` declarations and assignments, then `return`".into()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diag::{render, SourceFile};

    const MLP: &str = "\
# mlp.tpl — Megatron MLP block
mesh tp
dim B = 8, S = 128, H = 1024
input  x  : f32[B, S, H]
param  w1 : f32[H, 4*H] @ [_, tp]
param  b1 : f32[4*H]    @ [tp]
param  w2 : f32[4*H, H] @ [tp, _]
param  b2 : f32[H]
y = gelu(x @ w1 + b1) @ w2 + b2
output y
";

    /// Compact rendering of an expression with explicit parentheses.
    fn show(e: &Expr) -> String {
        match e {
            Expr::Num { value, .. } => format!("{value}"),
            Expr::Name(id) => id.name.clone(),
            Expr::Neg { expr, .. } => format!("(-{})", show(expr)),
            Expr::Binary { op, lhs, rhs, .. } => {
                let op = match op {
                    BinOp::Add => "+",
                    BinOp::Sub => "-",
                    BinOp::Mul => "*",
                    BinOp::Div => "/",
                    BinOp::MatMul => "@",
                };
                format!("({} {op} {})", show(lhs), show(rhs))
            }
            Expr::Call { func, args, .. } => {
                let args: Vec<String> = args
                    .iter()
                    .map(|a| match &a.name {
                        Some(n) => format!("{}={}", n.name, show(&a.value)),
                        None => show(&a.value),
                    })
                    .collect();
                format!("{}({})", func.name, args.join(", "))
            }
            Expr::List { items, .. } => {
                let items: Vec<String> = items.iter().map(show).collect();
                format!("[{}]", items.join(", "))
            }
        }
    }

    fn items(src: &str) -> Vec<Item> {
        match parse(src) {
            Ok(m) => m.items,
            Err(e) => panic!("unexpected error for {src:?}: {e:?}"),
        }
    }

    fn assign(src: &str) -> Assign {
        match items(src).pop() {
            Some(Item::Assign(a)) => a,
            other => panic!("not an assignment: {other:?}"),
        }
    }

    /// The right-hand side of `y = <src>`.
    fn rhs(src: &str) -> Expr {
        assign(&format!("y = {src}")).value
    }

    /// The fields of the syntax error for `src`.
    fn error(src: &str) -> (String, Span, String, Option<String>) {
        match parse(src) {
            Err(ParseError::Syntax {
                message,
                span,
                label,
                hint,
            }) => {
                assert!(
                    span.end as usize <= src.len(),
                    "span past the end: {span:?}"
                );
                assert!(span.start <= span.end);
                (message, span, label, hint)
            }
            Ok(m) => panic!("expected an error for {src:?}, got {m:?}"),
        }
    }

    fn spec_names(spec: &SpecExpr) -> Vec<Vec<&str>> {
        spec.dims
            .iter()
            .map(|d| d.iter().map(|i| i.name.as_str()).collect())
            .collect()
    }

    fn block(src: &str) -> BlockDef {
        match items(src).pop() {
            Some(Item::Block(b)) => b,
            other => panic!("not a block: {other:?}"),
        }
    }

    #[test]
    fn parses_the_mlp_example() {
        let items = items(MLP);
        assert_eq!(items.len(), 9);
        let Item::Mesh(axes) = &items[0] else {
            panic!()
        };
        assert_eq!(axes[0].name, "tp");
        let Item::Dims(dims) = &items[1] else {
            panic!()
        };
        let names: Vec<&str> = dims.iter().map(|d| d.name.name.as_str()).collect();
        assert_eq!(names, ["B", "S", "H"]);
        let Item::Input(x) = &items[2] else { panic!() };
        assert_eq!(
            (x.name.name.as_str(), x.ty.dims.len(), &x.spec),
            ("x", 3, &None)
        );
        let Item::Param(w1) = &items[3] else { panic!() };
        assert_eq!(w1.ty.dtype.name, "f32");
        assert_eq!(show(&w1.ty.dims[1]), "(4 * H)");
        assert_eq!(spec_names(w1.spec.as_ref().unwrap()), [vec![], vec!["tp"]]);
        let Item::Assign(y) = &items[7] else { panic!() };
        assert_eq!(show(&y.value), "((gelu(((x @ w1) + b1)) @ w2) + b2)");
        let Item::Output(out) = &items[8] else {
            panic!()
        };
        assert_eq!(out[0].name.name, "y");
    }

    #[test]
    fn empty_inputs_are_empty_modules() {
        for src in [
            "",
            "   \n\t\r\n",
            "# only a comment",
            "# é ✓ 漢字\n# two\n",
            ";;\n;",
        ] {
            assert_eq!(items(src), Vec::new(), "{src:?}");
        }
    }

    #[test]
    fn mesh_dim_and_output() {
        let items = items("mesh dp, tp; dim NH = 8, D = H / NH\noutput y, loss @ [dp, _, _]");
        let Item::Mesh(axes) = &items[0] else {
            panic!()
        };
        assert_eq!(axes.len(), 2);
        let Item::Dims(dims) = &items[1] else {
            panic!()
        };
        assert_eq!(show(&dims[1].value), "(H / NH)");
        let Item::Output(out) = &items[2] else {
            panic!()
        };
        assert_eq!(out[0].spec, None);
        assert_eq!(out[1].name.name, "loss");
        assert_eq!(
            spec_names(out[1].spec.as_ref().unwrap()),
            [vec!["dp"], vec![], vec![]]
        );
    }

    #[test]
    fn declarations_and_scalar_types() {
        let items = items("input ids : i32[B, S]\nparam s : f32[]\ninput x : bf16[B] @ [dp]");
        let Item::Input(ids) = &items[0] else {
            panic!()
        };
        assert_eq!(ids.ty.dtype.name, "i32");
        let Item::Param(s) = &items[1] else { panic!() };
        assert!(s.ty.dims.is_empty() && s.spec.is_none());
        let Item::Input(x) = &items[2] else { panic!() };
        assert_eq!(x.ty.dtype.name, "bf16");
        assert!(x.spec.is_some());
    }

    #[test]
    fn spec_forms() {
        let spec = |src: &str| match items(src).pop() {
            Some(Item::Param(d)) => d.spec.unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            spec_names(&spec("param w : f32[H, H] @ [_, tp]")),
            [vec![], vec!["tp"]]
        );
        assert_eq!(
            spec_names(&spec("param w : f32[H, H] @ [(dp, tp), _]")),
            [vec!["dp", "tp"], vec![]]
        );
        assert!(spec("param s : f32[] @ []").dims.is_empty());
    }

    #[test]
    fn trailing_spec_on_assignment_versus_matmul() {
        let a = assign("h = x @ w1 @ [_, _, tp]");
        assert_eq!(show(&a.value), "(x @ w1)");
        assert_eq!(
            spec_names(a.spec.as_ref().unwrap()),
            [vec![], vec![], vec!["tp"]]
        );
        let b = assign("h = x @ w1 @ w2");
        assert_eq!(show(&b.value), "((x @ w1) @ w2)");
        assert!(b.spec.is_none());
    }

    #[test]
    fn multi_target_assignment_with_keyword_args() {
        let a = assign("q, k, v = split(qkv, 3, axis=-1)");
        let targets: Vec<&str> = a.targets.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(targets, ["q", "k", "v"]);
        assert_eq!(show(&a.value), "split(qkv, 3, axis=(-1))");
    }

    #[test]
    fn calls_with_lists() {
        assert_eq!(
            show(&rhs(
                "transpose(reshape(x, [B, S, NH, D],), perm=[0, 2, 1, 3])"
            )),
            "transpose(reshape(x, [B, S, NH, D]), perm=[0, 2, 1, 3])"
        );
        assert_eq!(show(&rhs("f()")), "f()");
        assert_eq!(show(&rhs("f([], [a + 1])")), "f([], [(a + 1)])");
        assert_eq!(show(&rhs("repeat(L, layer, x)")), "repeat(L, layer, x)");
    }

    #[test]
    fn precedence() {
        assert_eq!(show(&rhs("a + b @ c * d")), "(a + ((b @ c) * d))");
        assert_eq!(show(&rhs("(a + b) * c")), "((a + b) * c)");
        assert_eq!(show(&rhs("a * b + c / d - e")), "(((a * b) + (c / d)) - e)");
    }

    #[test]
    fn left_associativity() {
        assert_eq!(show(&rhs("a - b - c")), "((a - b) - c)");
        assert_eq!(show(&rhs("a / b * c @ d")), "(((a / b) * c) @ d)");
        assert_eq!(show(&rhs("a + b - c + d")), "(((a + b) - c) + d)");
    }

    #[test]
    fn unary_minus() {
        assert_eq!(show(&rhs("-a * b")), "((-a) * b)");
        assert_eq!(show(&rhs("a - -b")), "(a - (-b))");
        assert_eq!(show(&rhs("--a")), "(-(-a))");
        assert_eq!(show(&rhs("-(a + b) @ c")), "((-(a + b)) @ c)");
        let Expr::Neg { expr, span } = rhs("-1") else {
            panic!()
        };
        assert!(matches!(
            *expr,
            Expr::Num {
                value: 1.0,
                is_int: true,
                ..
            }
        ));
        assert_eq!((span.start, span.end), (4, 6));
    }

    #[test]
    fn numbers() {
        let num = |src: &str| match rhs(src) {
            Expr::Num { value, is_int, .. } => (value, is_int),
            other => panic!("{other:?}"),
        };
        assert_eq!(num("8"), (8.0, true));
        assert_eq!(num("0.125"), (0.125, false));
        assert_eq!(num("1e-5"), (1e-5, false));
        assert_eq!(num("2.5E+3"), (2500.0, false));
        let (big, is_int) = num(&"9".repeat(400));
        assert!(is_int && big.is_infinite());
        assert_eq!(
            num("123456789012345678901234567890"),
            (1.2345678901234568e29, true)
        );
    }

    #[test]
    fn blocks() {
        let src = "block mlp(x: f32[B, S, H], y: f32[]) -> f32[B, S, H] {\n\
                   param w1 : f32[H, 4*H] @ [_, tp]\n\
                   h = gelu(x @ w1); return h @ w2\n}";
        let b = block(src);
        assert_eq!(b.name.name, "mlp");
        assert_eq!(b.args.len(), 2);
        assert_eq!(b.args[1].0.name, "y");
        assert_eq!(b.ret_ty.as_ref().unwrap().dims.len(), 3);
        assert!(matches!(b.body[0], Item::Param(_)));
        assert!(matches!(b.body[1], Item::Assign(_)));
        assert_eq!(show(&b.ret), "(h @ w2)");
        assert_eq!((b.span.start, b.span.end as usize), (0, src.len()));
        let b = block("block id() { return x }");
        assert!(b.args.is_empty() && b.ret_ty.is_none() && b.body.is_empty());
    }

    #[test]
    fn spans_have_lines_and_columns() {
        let src = "mesh tp\n\n  param w : f32[H, 4*H] @ [_, tp]   # c\ny = a +\n  b * c # é\n";
        let items = items(src);
        let Item::Param(w) = &items[1] else { panic!() };
        assert_eq!((w.span.line, w.span.col), (3, 3));
        assert_eq!(
            &src[w.span.start as usize..w.span.end as usize],
            "param w : f32[H, 4*H] @ [_, tp]"
        );
        assert_eq!((w.name.span.line, w.name.span.col), (3, 9));
        assert_eq!((w.ty.span.col, w.spec.as_ref().unwrap().span.col), (13, 27));
        let Item::Assign(y) = &items[2] else { panic!() };
        assert_eq!(
            &src[y.span.start as usize..y.span.end as usize],
            "y = a +\n  b * c"
        );
        let Expr::Binary {
            op_span, span, rhs, ..
        } = &y.value
        else {
            panic!()
        };
        assert_eq!((op_span.line, op_span.col, op_span.len()), (4, 7, 1));
        assert_eq!((span.line, span.col), (4, 5));
        let Expr::Binary { op_span, .. } = &**rhs else {
            panic!()
        };
        assert_eq!((op_span.line, op_span.col), (5, 5));
    }

    #[test]
    fn parenthesised_compound_spans_include_the_parentheses() {
        let e = rhs("(a + b) * c");
        let Expr::Binary { lhs, span, .. } = &e else {
            panic!()
        };
        assert_eq!((span.start, lhs.span().start, lhs.span().end), (4, 4, 11));
    }

    #[test]
    fn span_map_matches_line_index() {
        let src = "a = 1 # ünïcödé ✓\n  bb = c\n\n# 漢字 x\nd=e";
        let (map, index) = (SpanMap::new(src), LineIndex::new(src));
        for (i, _) in src.char_indices() {
            assert_eq!(map.span(i, i), index.span(src, i, i), "offset {i}");
        }
        assert_eq!(
            map.span(src.len(), src.len()),
            index.span(src, src.len(), src.len())
        );
    }

    #[test]
    fn keyword_as_name() {
        let (msg, span, label, hint) = error("mesh tp\nparam param : f32[]");
        assert!(msg.contains("identifier"), "{msg}");
        assert_eq!((span.line, span.col), (2, 7));
        assert!(label.contains("param"));
        assert!(hint.unwrap().contains("`param` is a reserved word"));
        let (_, span, _, hint) = error("block = 3");
        assert_eq!((span.line, span.col), (1, 7));
        assert!(hint.unwrap().contains("`block` is a reserved word"));
        let (_, _, _, hint) = error("y = output + 1");
        assert!(hint.unwrap().contains("reserved"));
    }

    #[test]
    fn messages_use_friendly_names() {
        let (msg, span, label, _) = error("y = f(a b)");
        assert_eq!(msg, "expected one of: operator, '(', ')', ',', '='");
        assert_eq!((span.col, label.as_str()), (9, "unexpected `b`"));
        let (msg, ..) = error("y = a + *");
        assert_eq!(msg, "expected one of: number, identifier, '-', '('");
        let (msg, ..) = error("mesh a\n)");
        assert_eq!(msg, "expected one of: statement, ',', end of input");
        let (msg, ..) = error("input x : f32[B] @ [a b]");
        assert_eq!(msg, "expected one of: ']', ','");
        for src in [
            "y = f(a b)",
            "x = )",
            "input x f32[]",
            "block b(x) {}",
            "mesh a,",
        ] {
            let (msg, ..) = error(src);
            assert!(!msg.contains('_'), "raw rule name in {msg:?}");
        }
    }

    #[test]
    fn unclosed_brackets() {
        let (msg, span, label, hint) = error("y = gelu(x @ w1\n\n");
        assert!(msg.contains("')'"), "{msg}");
        assert_eq!((span.line, span.col, span.len()), (1, 16, 0));
        assert_eq!(label, "unexpected end of input");
        assert_eq!(hint.unwrap(), "the `(` at line 1, column 9 is never closed");
        let (_, _, _, hint) = error("block b(x: f32[]) {\n return x\n");
        assert!(hint.unwrap().contains("`{` at line 1, column 19"));
    }

    #[test]
    fn errors_at_end_of_input_render_with_a_caret() {
        for src in ["y = f(", "mesh", "y = a +  # trailing\n"] {
            let err = parse(src).unwrap_err();
            let ParseError::Syntax { span, .. } = &err;
            assert!(span.end as usize <= src.len());
            let out = render(&err, Some(&SourceFile::new("t.tpl", src)));
            assert!(out.contains("unexpected end of input"), "{src:?}:\n{out}");
        }
    }

    #[test]
    fn list_only_as_call_argument() {
        let (msg, span, _, hint) = error("y = [1, 2]");
        assert!(msg.contains("expression"));
        assert_eq!(span.col, 5);
        assert!(hint
            .unwrap()
            .contains("only allowed directly as a call argument"));
        error("y = f([[1]])");
        let (_, _, _, hint) = error("y = _ + 1");
        assert!(hint.unwrap().contains("sharding spec"));
        error("y = f(x) @ [1] + 2");
    }

    #[test]
    fn non_ascii_identifiers_are_errors() {
        let (_, span, label, hint) = error("# ok: é\nx = café");
        assert_eq!((span.line, span.col, span.len()), (2, 8, 2));
        assert!(label.contains('é'));
        assert!(hint.unwrap().contains("ASCII"));
        error("é = 1");
    }

    #[test]
    fn block_bodies_are_checked() {
        let (msg, span, ..) = error("block b(x: f32[]) {\n  h = x\n}");
        assert!(msg.contains("no `return`"), "{msg}");
        assert_eq!((span.line, span.col), (3, 1));
        for (stmt, word) in [
            ("input z : f32[]", "`input`"),
            ("output x", "`output`"),
            ("mesh dp", "`mesh`"),
            ("dim K = 2", "`dim`"),
            ("block c() { return x }", "nested `block`"),
        ] {
            let src = format!("block b(x: f32[]) {{\n  {stmt}\n  return x\n}}");
            let (msg, span, ..) = error(&src);
            assert!(msg.contains(word) && msg.contains("not allowed"), "{msg}");
            assert_eq!((span.line, span.col, span.len()), (2, 3, stmt.len()));
        }
        let (msg, span, ..) = error("block b(x: f32[]) {\n return x\n y = x\n}");
        assert!(msg.contains("after `return`"));
        assert_eq!((span.line, span.col), (3, 2));
        let (msg, span, ..) = error("mesh tp\nreturn x");
        assert!(msg.contains("outside a block"));
        assert_eq!((span.line, span.col), (2, 1));
    }

    #[test]
    fn malformed_numbers_get_a_hint() {
        let (_, _, label, hint) = error("x = 1e");
        assert_eq!(label, "unexpected `1e`");
        assert!(hint.unwrap().contains("numbers are written like"));
    }

    #[test]
    fn deep_nesting_is_rejected_before_pest() {
        let src = format!("y = {}x{}", "(".repeat(2000), ")".repeat(2000));
        let (msg, span, ..) = error(&src);
        assert_eq!(msg, "nesting deeper than 256 levels");
        assert_eq!((span.start, span.len()), (4 + 256, 1));
        let commented = format!("# {}\ny = x", "(".repeat(1000));
        assert_eq!(items(&commented).len(), 1);
    }

    #[test]
    fn nesting_at_the_limit_parses() {
        let parens = format!("y = {}x{}", "(".repeat(256), ")".repeat(256));
        assert_eq!(show(&assign(&parens).value), "x");
        let calls = format!("y = {}x{}", "-f(".repeat(256), ")".repeat(256));
        assign(&calls);
        let lists = format!("y = {}{}", "f([".repeat(128), "])".repeat(128));
        assign(&lists);
    }

    #[test]
    fn deep_expressions_are_rejected_without_overflow() {
        let negs = format!("y = {}x", "-".repeat(100_000));
        assert!(error(&negs).0.contains("nested deeper than"));
        let chain = format!("y = x{}", " + x".repeat(100_000));
        let (msg, span, ..) = error(&chain);
        assert!(msg.contains("nested deeper than 1024"));
        assert_eq!(span.len(), 1);
        assign(&format!("y = x{}", " + x".repeat(1000)));
        assign(&format!("y = {}x", "-".repeat(1000)));
    }

    #[test]
    fn garbage_does_not_panic() {
        let samples = [
            "\0\u{1}\u{7f}\u{fffd}",
            "}}}{{{",
            ")]",
            "@@@",
            "x = = =",
            "block",
            "block b(",
            "param w : f32[H @ [_",
            "y = 1..2",
            "\u{feff}x = 1",
            "x = 1 # \u{2028}\ny",
        ];
        for src in samples {
            let _ = parse(src);
        }
        let long_name = "a".repeat(200_000);
        let a = assign(&format!("{long_name} = {long_name}"));
        assert_eq!(a.targets[0].name.len(), 200_000);
    }

    #[test]
    fn large_inputs_parse() {
        let stmt = "y = gelu(x @ w1 + b1) @ w2 + b2 # ✓\n";
        let src = stmt.repeat(2_000_000 / stmt.len());
        assert_eq!(items(&src).len(), 2_000_000 / stmt.len());
        let one_line = "y = -a * b + c; ".repeat(100_000);
        let last = items(&one_line).pop();
        let Some(Item::Assign(a)) = last else {
            panic!()
        };
        assert_eq!(a.span.col as usize, 16 * 99_999 + 1);
    }

    /// Parses a 10 MB file; run with `cargo test --release -- --ignored ten_megabytes`.
    #[test]
    #[ignore]
    fn ten_megabytes() {
        let src = MLP.repeat(10_000_000 / MLP.len());
        let start = std::time::Instant::now();
        assert!(parse(&src).is_ok());
        assert!(start.elapsed().as_secs_f64() < 5.0, "{:?}", start.elapsed());
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(src in "\\PC{0,200}") {
            if let Err(ParseError::Syntax { span, .. }) = parse(&src) {
                proptest::prop_assert!(span.end as usize <= src.len());
            }
        }

        #[test]
        fn token_soup_never_panics(
            toks in proptest::collection::vec(
                proptest::sample::select(vec![
                    "x", "f", "_", "1", "2.5", "1e3", "(", ")", "[", "]", "{", "}", ",", ";", "=",
                    ":", "@", "+", "-", "*", "/", "->", "mesh", "dim", "input", "param", "output",
                    "block", "return", "f32", "\n", " ", "#", "é",
                ]),
                0..60,
            )
        ) {
            let src = toks.join(" ");
            if let Err(ParseError::Syntax { span, .. }) = parse(&src) {
                proptest::prop_assert!(span.end as usize <= src.len());
            }
        }
    }
}
