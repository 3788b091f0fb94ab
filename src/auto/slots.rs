//! The search's unknowns: one slot per `param` or `input` declaration. A declaration inside a
//! block is stamped once per call (every layer of a `repeat`), and its annotation is written
//! once, so all its instances share one placement: a repeated body is solved once.

use super::Mode;
use crate::ir::{Graph, Op, Spec, ValueId};
use crate::span::Span;
use std::collections::{HashMap, HashSet};

/// One `param` or `input` declaration and what the search may do with it.
#[derive(Clone, Debug)]
pub struct Slot {
    /// The declaration's span (shared by every instance).
    pub span: Span,
    /// Its name, with instance numbers as `*` (`layer.*.attention.wq`).
    pub name: String,
    /// A param (else an input).
    pub param: bool,
    /// Its global shape.
    pub shape: Vec<u64>,
    /// The block declaring it (empty at top level): the search's unit of joint choice.
    pub group: String,
    /// With `--auto=complete`: the source's annotation, kept as written.
    pub kept: Option<Spec>,
    /// The source's annotation, in either mode (one of the descent's starts).
    pub written: Option<Spec>,
    /// An earlier slot of the same block and shape read the same way (the same op, at the same
    /// operand position, with the same other operands: `x @ wq`, `x @ wk`, `x @ wv`), whose
    /// placement the descent gives this one too, as a fused QKV weight has one.
    pub tied_to: Option<usize>,
}

impl Slot {
    /// True for a param of rank 0 or 1 (a bias, a norm's scale), which the search leaves to
    /// propagation when it cannot enumerate everything.
    pub fn follower(&self) -> bool {
        self.param && self.shape.len() <= 1
    }
}

/// The key of a declaration: its span's bytes.
pub(crate) type DeclKey = (u32, u32);

/// The key of `span`.
pub(crate) fn key(span: Span) -> DeclKey {
    (span.start, span.end)
}

/// The slots of `g` (a lowered forward program), in declaration order of first use.
pub fn slots(g: &Graph, mode: Mode) -> Vec<Slot> {
    let mut out: Vec<Slot> = Vec::new();
    let mut seen: HashSet<DeclKey> = HashSet::new();
    let mut sigs = Vec::new();
    for (_, n) in g.nodes() {
        let (name, param) = match &n.op {
            Op::Param { name } => (name, true),
            Op::Input { name } => (name, false),
            _ => continue,
        };
        if !seen.insert(key(n.span)) {
            continue;
        }
        let v = n.outputs[0];
        out.push(Slot {
            span: n.span,
            name: wildcard(name),
            param,
            shape: g.ty(v).shape.clone(),
            group: g.region(n.region).block.clone(),
            kept: match mode {
                Mode::Complete => g.annotation(v).map(|a| a.spec.clone()),
                Mode::Ignore => None,
            },
            tied_to: None,
            written: g.annotation(v).map(|a| a.spec.clone()),
        });
        sigs.push(signature(g, v));
    }
    for i in 0..out.len() {
        out[i].tied_to = (0..i).find(|&j| {
            let (a, b) = (&out[j], &out[i]);
            a.tied_to.is_none()
                && a.param == b.param
                && a.group == b.group
                && a.shape == b.shape
                && a.kept == b.kept
                && sigs[i].is_some()
                && sigs[j] == sigs[i]
        });
    }
    out
}

/// How `v` is first read: the reading op's name, `v`'s operand position and the other
/// operands.
fn signature(g: &Graph, v: ValueId) -> Option<(&'static str, usize, Vec<ValueId>)> {
    let n = g.node(*g.users(v).first()?);
    let at = n.inputs.iter().position(|&x| x == v)?;
    let others = n.inputs.iter().copied().filter(|&x| x != v).collect();
    Some((n.op.name(), at, others))
}

/// Every instance of each declaration in `g`.
pub(crate) fn instances(g: &Graph) -> HashMap<DeclKey, Vec<ValueId>> {
    let mut out: HashMap<DeclKey, Vec<ValueId>> = HashMap::new();
    for (_, n) in g.nodes() {
        if matches!(n.op, Op::Param { .. } | Op::Input { .. }) {
            out.entry(key(n.span)).or_default().push(n.outputs[0]);
        }
    }
    out
}

/// `layer.3.attention.wq` as `layer.*.attention.wq`.
fn wildcard(name: &str) -> String {
    name.split('.')
        .map(
            |s| match s.chars().all(|c| c.is_ascii_digit()) && !s.is_empty() {
                true => "*",
                false => s,
            },
        )
        .collect::<Vec<_>>()
        .join(".")
}

#[cfg(test)]
mod tests {
    #[test]
    fn instance_numbers_become_stars() {
        assert_eq!(super::wildcard("layer.12.mlp.w1"), "layer.*.mlp.w1");
        assert_eq!(super::wildcard("wte"), "wte");
        assert_eq!(super::wildcard("enc.0.ff.1.w"), "enc.*.ff.*.w");
    }
}
