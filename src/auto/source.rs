//! `--emit annotated`: the source with the chosen `@ [...]` written into its declarations, the
//! ignored annotations (on declarations and statements; an output's is its required layout and
//! stays) taken out and the mesh's axes declared; the rest is kept byte for byte.

use super::slots::{key, DeclKey, Slot};
use super::Mode;
use crate::ir::Spec;
use crate::syntax::ast::{Decl, Item, Module};
use std::collections::HashMap;

/// One replacement of the bytes `start..end`.
struct Edit {
    start: usize,
    end: usize,
    text: String,
}

/// `text` (parsed as `module`) with `chosen` written in: each slot's spec on its declaration
/// (`None` leaves it as it is in `Complete` mode, unannotated in `Ignore` mode), and in
/// `Ignore` mode every other annotation removed; `mesh` lists `axes`.
pub fn annotated_source(
    text: &str,
    module: &Module,
    slots: &[Slot],
    chosen: &[Option<Spec>],
    mode: Mode,
    axes: &[String],
) -> String {
    let specs: HashMap<DeclKey, &Spec> = slots
        .iter()
        .zip(chosen)
        .filter_map(|(s, c)| c.as_ref().map(|c| (key(s.span), c)))
        .collect();
    let mut edits = Vec::new();
    items(&module.items, &specs, mode, &mut edits);
    edits.extend(mesh_edit(text, module, axes));
    edits.sort_by_key(|e| (e.start, e.end));
    let mut out = String::with_capacity(text.len() + 64 * edits.len());
    let mut at = 0;
    for e in edits {
        out.push_str(&text[at..e.start]);
        out.push_str(&e.text);
        at = e.end;
    }
    out.push_str(&text[at..]);
    out
}

/// The edits of `items` (recursing into blocks).
fn items(items: &[Item], specs: &HashMap<DeclKey, &Spec>, mode: Mode, out: &mut Vec<Edit>) {
    let ignore = mode == Mode::Ignore;
    for item in items {
        match item {
            Item::Input(d) | Item::Param(d) => out.extend(decl(d, specs.get(&key(d.span)), ignore)),
            Item::Block(b) => self::items(&b.body, specs, mode, out),
            Item::Assign(a) if ignore => {
                if let Some(s) = &a.spec {
                    out.push(remove(a.value.span().end, s.span.end));
                }
            }
            _ => {}
        }
    }
}

/// The edit of one declaration: its spec replaced or inserted, or (ignored) removed.
fn decl(d: &Decl, spec: Option<&&Spec>, ignore: bool) -> Option<Edit> {
    let ty_end = d.ty.span.end as usize;
    match (spec, &d.spec) {
        (Some(s), Some(old)) => Some(Edit {
            start: old.span.start as usize,
            end: old.span.end as usize,
            text: s.to_string(),
        }),
        (Some(s), None) => Some(Edit {
            start: ty_end,
            end: ty_end,
            text: format!(" @ {s}"),
        }),
        (None, Some(old)) if ignore => {
            // `f32[..] frozen @ [..]`: keep `frozen`.
            let from = match d.frozen {
                Some(f) if f.end <= old.span.start => f.end,
                _ => d.ty.span.end,
            };
            Some(remove(from, old.span.end))
        }
        (None, _) => None,
    }
}

/// Removes the bytes `start..end`.
fn remove(start: u32, end: u32) -> Edit {
    Edit {
        start: start as usize,
        end: end as usize,
        text: String::new(),
    }
}

/// Declares the axes of `axes` no `mesh` statement declares: appended to the first `mesh`
/// statement, or a new one before the first statement.
fn mesh_edit(text: &str, module: &Module, axes: &[String]) -> Option<Edit> {
    let declared: Vec<&str> = module
        .items
        .iter()
        .flat_map(|i| match i {
            Item::Mesh(ids) => ids.iter().map(|x| x.name.as_str()).collect(),
            _ => Vec::new(),
        })
        .collect();
    let new: Vec<&str> = axes
        .iter()
        .map(String::as_str)
        .filter(|a| !declared.contains(a))
        .collect();
    if new.is_empty() {
        return None;
    }
    let first_mesh = module.items.iter().find_map(|i| match i {
        Item::Mesh(ids) => ids.last(),
        _ => None,
    });
    Some(match first_mesh {
        Some(last) => Edit {
            start: last.span.end as usize,
            end: last.span.end as usize,
            text: format!(", {}", new.join(", ")),
        },
        None => {
            let at = module
                .items
                .first()
                .map_or(text.len(), |i| line_start(text, first_byte(i)));
            Edit {
                start: at,
                end: at,
                text: format!("mesh {}\n", new.join(", ")),
            }
        }
    })
}

/// The first byte of `item` past its keyword.
fn first_byte(item: &Item) -> usize {
    let span = match item {
        Item::Mesh(ids) => ids.first().map(|i| i.span),
        Item::Dims(defs) => defs.first().map(|d| d.name.span),
        Item::Input(d) | Item::Param(d) => Some(d.span),
        Item::Output(outs) => outs.first().map(|o| o.name.span),
        Item::Assign(a) => Some(a.span),
        Item::Block(b) => Some(b.span),
        Item::Train(t) => Some(t.span),
    };
    span.map_or(0, |s| s.start as usize)
}

/// The byte offset of the start of the line holding `at`.
fn line_start(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].rfind('\n').map_or(0, |i| i + 1)
}
