//! Block instances. A block body is lowered once per argument signature into a template (a small
//! graph with placeholder arguments and relative param names), then stamped at each call: the
//! 96 layers of a large model cost one lowering and 96 cheap copies.

use super::consts;
use super::error::LowerError;
use super::scope::{Scope, Val};
use super::{Program, MAX_BLOCK_DEPTH, MAX_NODES};
use crate::ir::{Graph, Op, RegionId, TensorType, ValueId};
use crate::span::Span;
use crate::syntax::ast::{BlockDef, Expr};
use std::rc::Rc;

/// A lowered block body: its graph (placeholder `Input` leaves stand for the arguments), the
/// argument and result values, and the body id shared by all its instances.
pub(crate) struct Template {
    graph: Graph,
    args: Vec<ValueId>,
    ret: ValueId,
    body: u32,
    /// Its params declared `frozen`, by relative name.
    frozen: Vec<String>,
}

/// Instantiates block `name` on `args` in scope `s`; returns the block's result value and the
/// instance's region.
pub(crate) fn instantiate(
    s: &mut Scope,
    name: &str,
    args: &[ValueId],
    arg_spans: &[Span],
    span: Span,
    prog: &mut Program,
) -> Result<(ValueId, RegionId), LowerError> {
    let block = *prog
        .blocks
        .get(name)
        .expect("caller checked the block exists");
    if args.len() != block.args.len() {
        return Err(LowerError::BlockArity {
            block: name.into(),
            expected: block.args.len(),
            got: args.len(),
            span,
            hint: signature(block),
        });
    }
    let mut tys = Vec::with_capacity(args.len());
    for (i, ((arg, decl), v)) in block.args.iter().zip(args).enumerate() {
        let want = s.eval_type(decl, prog)?;
        let got = s.g.ty(*v).clone();
        if want != got {
            return Err(LowerError::BlockType {
                block: name.into(),
                what: format!("argument {} (`{}`)", i + 1, arg.name),
                expected: want.to_string(),
                got: got.to_string(),
                span: arg_spans[i],
            });
        }
        tys.push(got);
    }
    let key = (name.to_string(), tys);
    let tpl = match prog.templates.get(&key) {
        Some(t) => t.clone(),
        None => {
            let t = Rc::new(build(block, &key.1, span, prog)?);
            prog.templates.insert(key, t.clone());
            t
        }
    };
    let path = s.next_instance(name);
    let region = s.region;
    let stamped = stamp(&tpl, s.g, region, &path, name, args)?;
    s.frozen
        .extend(tpl.frozen.iter().map(|p| format!("{path}.{p}")));
    Ok(stamped)
}

fn signature(b: &BlockDef) -> String {
    let args: Vec<&str> = b.args.iter().map(|(a, _)| a.name.as_str()).collect();
    format!("declared as `block {}({})`", b.name.name, args.join(", "))
}

fn build(
    block: &BlockDef,
    tys: &[TensorType],
    span: Span,
    prog: &mut Program,
) -> Result<Template, LowerError> {
    let name = &block.name.name;
    if prog.stack.iter().any(|b| b == name) {
        return Err(LowerError::BadOp {
            message: format!("block `{name}` calls itself (directly or through other blocks)"),
            span,
            hint: Some("blocks cannot be recursive: use `repeat` to stack them".into()),
        });
    }
    if prog.stack.len() >= MAX_BLOCK_DEPTH {
        return Err(LowerError::BadOp {
            message: format!("blocks are nested more than {MAX_BLOCK_DEPTH} calls deep"),
            span,
            hint: Some("flatten the chain of block calls".into()),
        });
    }

    prog.stack.push(name.clone());
    let body = prog.next_body;
    prog.next_body += 1;
    let mut g = Graph::new("");
    let root = g.root();
    let (args, ret, frozen) = {
        let mut scope = Scope::new(&mut g, root, true, &block.body, Some(&block.ret), prog);
        let mut args = Vec::new();
        for ((id, _), ty) in block.args.iter().zip(tys) {
            let n = scope.g.add_node(
                Op::Input {
                    name: id.name.clone(),
                },
                vec![],
                vec![ty.clone()],
                id.span,
                root,
            );
            let v = scope.g.node(n).outputs[0];
            scope.bind_arg(id, v, prog)?;
            args.push(v);
        }
        for item in &block.body {
            scope.item(item, prog)?;
        }
        let ret = scope.tensor(&block.ret, prog)?;
        if let Some(rt) = &block.ret_ty {
            let want = scope.eval_type(rt, prog)?;
            let got = scope.g.ty(ret).clone();
            if want != got {
                return Err(LowerError::BlockType {
                    block: name.clone(),
                    what: "the result".into(),
                    expected: want.to_string(),
                    got: got.to_string(),
                    span: block.ret.span(),
                });
            }
        }
        (args, ret, std::mem::take(&mut scope.frozen))
    };
    prog.stack.pop();
    Ok(Template {
        graph: g,
        args,
        ret,
        body,
        frozen: frozen.into_iter().collect(),
    })
}

/// Copies the template into `g` as a new region `path` under `parent`, with `args` for its
/// placeholders; returns the value of the block's result and the new region.
fn stamp(
    t: &Template,
    g: &mut Graph,
    parent: RegionId,
    path: &str,
    block: &str,
    args: &[ValueId],
) -> Result<(ValueId, RegionId), LowerError> {
    if g.num_nodes() + t.graph.num_nodes() > MAX_NODES {
        return Err(LowerError::Invalid {
            message: format!("the program grows beyond {MAX_NODES} ops"),
            span: t
                .graph
                .nodes()
                .next()
                .map(|(_, n)| n.span)
                .unwrap_or_default(),
            hint: Some("check the repeat counts and dims (e.g. --set L=...)".into()),
        });
    }
    let mut regions = Vec::with_capacity(t.graph.regions().len());
    regions.push(g.add_region(path.to_string(), block.to_string(), parent, t.body));
    for (_, r) in t.graph.regions().skip(1) {
        let p = regions[r.parent.map(|p| p.index()).unwrap_or(0)];
        regions.push(g.add_region(format!("{path}.{}", r.path), r.block.clone(), p, r.body));
    }
    let mut map: Vec<Option<ValueId>> = vec![None; t.graph.num_values()];
    for (a, v) in t.args.iter().zip(args) {
        map[a.index()] = Some(*v);
        if let Some(ann) = t.graph.annotation(*a) {
            annotate_arg(g, *v, ann)?;
        }
    }
    for (_, n) in t.graph.nodes() {
        if let Op::Input { .. } = n.op {
            continue;
        }
        let op = match &n.op {
            Op::Param { name } => Op::Param {
                name: format!("{path}.{name}"),
            },
            op => op.clone(),
        };
        let inputs = n
            .inputs
            .iter()
            .map(|v| map[v.index()].expect("template values are defined before use"))
            .collect();
        let tys: Vec<TensorType> = n.outputs.iter().map(|v| t.graph.ty(*v).clone()).collect();
        super::size::check_fits(g, &tys, n.span)?;
        let id = g.add_node(op, inputs, tys, n.span, regions[n.region.index()]);
        for (old, new) in n.outputs.iter().zip(g.node(id).outputs.clone()) {
            map[old.index()] = Some(new);
            if let Some(name) = &t.graph.value(*old).name {
                g.set_value_name(new, name.clone());
            }
            if let Some(a) = t.graph.annotation(*old) {
                g.annotate(new, a.clone());
            }
        }
    }
    Ok((
        map[t.ret.index()].expect("the result is defined"),
        regions[0],
    ))
}

/// A constraint written on a block argument inside the body applies to the value passed in.
fn annotate_arg(g: &mut Graph, v: ValueId, ann: &crate::ir::Annotation) -> Result<(), LowerError> {
    match g.annotation(v) {
        Some(prev) if prev.spec != ann.spec => Err(LowerError::ConflictingSpec {
            first_spec: prev.spec.to_string(),
            second_spec: ann.spec.to_string(),
            span: ann.span,
            first: prev.span,
        }),
        Some(_) => Ok(()),
        None => {
            g.annotate(v, ann.clone());
            Ok(())
        }
    }
}

/// A lowered `repeat`: its result, the block it stacks, the region of each instance in order,
/// and the span of its count.
pub(crate) struct Repeated {
    /// The last instance's result (the argument itself for a count of 0).
    pub(crate) value: ValueId,
    /// The block stacked.
    pub(crate) block: String,
    /// Each instance's region, in order.
    pub(crate) instances: Vec<RegionId>,
    /// The count argument.
    pub(crate) count: Span,
}

/// `repeat(count, block, x, extra...)`: `count` instances chained through their first argument.
pub(crate) fn repeat(
    s: &mut Scope,
    count: Option<&Expr>,
    block: Option<&Expr>,
    x: Option<&Expr>,
    extra: &[&Expr],
    span: Span,
    prog: &mut Program,
) -> Result<Vec<Val>, LowerError> {
    let r = repeat_instances(s, count, block, x, extra, span, prog)?;
    Ok(vec![Val::Tensor(r.value)])
}

/// Lowers `repeat(count, block, x, extra...)` and says which instances it made.
pub(crate) fn repeat_instances(
    s: &mut Scope,
    count: Option<&Expr>,
    block: Option<&Expr>,
    x: Option<&Expr>,
    extra: &[&Expr],
    span: Span,
    prog: &mut Program,
) -> Result<Repeated, LowerError> {
    let (Some(count), Some(block), Some(x)) = (count, block, x) else {
        return Err(LowerError::BadOp {
            message: "repeat needs a count, a block and an argument".into(),
            span,
            hint: Some("usage: repeat(L, block, x, extra...)".into()),
        });
    };
    let n = repeat_count(count, prog)?;
    prog.repeats.push(n);
    let n = prog.repeat_cap.map_or(n, |c| n.min(c));
    let name = match block {
        Expr::Name(id) if prog.blocks.contains_key(id.name.as_str()) => id.name.clone(),
        e => {
            return Err(LowerError::BadOp {
                message: "the second argument of repeat must name a block".into(),
                span: e.span(),
                hint: None,
            })
        }
    };
    let mut cur = s.tensor(x, prog)?;
    let rest = extra
        .iter()
        .map(|e| s.tensor(e, prog))
        .collect::<Result<Vec<_>, _>>()?;
    let mut spans = vec![x.span()];
    spans.extend(extra.iter().map(|e| e.span()));
    let mut instances = Vec::new();
    for _ in 0..n {
        let mut args = vec![cur];
        args.extend(&rest);
        let (next, region) = instantiate(s, &name, &args, &spans, span, prog)?;
        if s.g.ty(next) != s.g.ty(cur) {
            return Err(LowerError::BlockType {
                block: name,
                what: "the result (repeat threads it into the next instance)".into(),
                expected: s.g.ty(cur).to_string(),
                got: s.g.ty(next).to_string(),
                span,
            });
        }
        instances.push(region);
        cur = next;
    }
    Ok(Repeated {
        value: cur,
        block: name,
        instances,
        count: count.span(),
    })
}

/// The repeat count: a non-negative integer constant.
fn repeat_count(count: &Expr, prog: &Program) -> Result<usize, LowerError> {
    let n = consts::eval_int(count, &prog.dims)?;
    usize::try_from(n).map_err(|_| LowerError::BadOp {
        message: format!("repeat count {n} is negative"),
        span: count.span(),
        hint: None,
    })
}
