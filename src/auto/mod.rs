//! Automatic sharding (`tpc compile --auto`): a placement for every param and input, chosen
//! to minimize the cost model's step time with peak memory per device under a budget. Each
//! candidate is judged by the whole planner (propagation, partitioning, merges, buckets,
//! liveness), so the source written back with the chosen annotations compiles to the plan found.

mod eval;
mod search;
mod slots;
mod source;

pub use eval::Cost;
pub use search::{exhaustive_limit, Method, EXHAUSTIVE_FLOOR, EXHAUSTIVE_LIMIT};
pub use slots::Slot;

use crate::autodiff::StepOutputs;
use crate::diag::SourceFile;
use crate::driver::{self, Error};
use crate::emit::plan::{bytes, secs};
use crate::ir::verify::VerifyError;
use crate::ir::{LossScale, Spec, ValueId};
use crate::mesh::{Device, Mesh};
use crate::plan::Plan;

/// What `--auto` may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every param and input is chosen; the source's annotations are ignored (not an output's
    /// `@ [...]`, the layout the program must deliver).
    Ignore,
    /// The source's annotations are kept; the unannotated params and inputs are chosen.
    Complete,
}

/// A search: the program, how it is compiled, and the budget.
#[derive(Clone, Debug)]
pub struct Request {
    /// The source file.
    pub source: SourceFile,
    /// `--set` dim overrides.
    pub overrides: Vec<(String, i64)>,
    /// Ignore or keep the source's annotations.
    pub mode: Mode,
    /// Peak memory per device allowed, in bytes (`None`: unlimited).
    pub budget: Option<u64>,
    /// The mesh.
    pub mesh: Mesh,
    /// The cost model's device.
    pub device: Device,
    /// Microbatches, schedule, recompute, ZeRO.
    pub plan: crate::plan::Options,
    /// For a training program, its step's outputs (`None`: the forward only).
    pub outputs: Option<StepOutputs>,
    /// `--loss-scale`, when given.
    pub scale: Option<LossScale>,
}

/// What the search found.
#[derive(Clone, Debug)]
pub struct Found {
    /// The whole program's plan with the chosen placements.
    pub plan: Plan,
    /// Every `param` and `input` declaration.
    pub slots: Vec<Slot>,
    /// Per slot, the spec written on it (`None`: kept as written, or left to propagation).
    pub chosen: Vec<Option<Spec>>,
    /// Per slot, true when its spec is the one propagation gave it (a bias or norm scale,
    /// written so that the annotated source annotates every param).
    pub derived: Vec<bool>,
    /// How it was found.
    pub method: Method,
    /// Candidates planned.
    pub evaluations: usize,
}

/// `--memory-budget`: a memory size as [`crate::cost::parse_size`] reads it, in bytes.
pub fn parse_budget(text: &str) -> Result<u64, String> {
    let bytes = crate::cost::parse_size(text).map_err(|e| format!("`{text}`: {e}"))?;
    u64::try_from(bytes).map_err(|_| format!("`{text}`: too large"))
}

/// No candidate's peak memory fits the budget.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
#[error(
    "no placement fits the memory budget of {budget} per device: the smallest peak memory found \
     is {smallest} ({evaluations} placements planned)"
)]
#[diagnostic(
    code(tpc::memory_budget),
    help(
        "raise --memory-budget to at least {smallest}, add devices, or save memory with --zero, \
         --recompute or 16-bit types"
    )
)]
pub struct BudgetError {
    /// The budget, as text.
    pub budget: String,
    /// The smallest peak found, as text.
    pub smallest: String,
    /// The smallest peak found, in bytes.
    pub smallest_bytes: u64,
    /// Candidates planned.
    pub evaluations: usize,
}

/// Searches placements for `req`'s program and plans the whole program with the best.
pub fn search(req: &Request) -> Result<Found, Error> {
    let full = driver::lower_source(&req.source, &req.overrides, None)?;
    let slots = slots::slots(&full.graph, req.mode);
    let ev = eval::Evaluator::new(req, &slots, &full)?;
    let pipeline_axis = full.graph.pipeline().map(|p| p.axis.clone());
    let axes = (0..req.mesh.axes().len())
        .filter(|&a| req.mesh.axis_size(a) > 1)
        .filter(|&a| pipeline_axis.as_deref() != Some(req.mesh.axis_name(a)))
        .collect();
    let budget = req.budget.map(|b| b as f64);
    let space = search::Space {
        slots: &slots,
        mesh: &req.mesh,
        axes,
        budget,
    };
    let Some(outcome) = search::search(&ev, &space) else {
        return Err(ev.take_error().unwrap_or(Error::Verify(VerifyError {
            stage: "auto",
            detail: "no candidate placement was planned".into(),
        })));
    };
    let at = slots::instances(&full.graph);
    let mut smallest = u64::MAX;
    for (c, _) in &outcome.ranked {
        let (c, derived) = write_followers(&ev, &slots, c);
        let plan = eval::plan(req, &slots, &full, &at, &c, true)?;
        let cost = Cost::of(&plan);
        if budget.is_none_or(|b| cost.peak <= b) {
            return Ok(Found {
                plan,
                slots: slots.clone(),
                chosen: c,
                derived,
                method: outcome.method,
                evaluations: ev.evaluations(),
            });
        }
        smallest = smallest.min(cost.peak as u64);
    }
    Err(Error::Budget(Box::new(BudgetError {
        budget: bytes(req.budget.unwrap_or(0)),
        smallest: bytes(smallest),
        smallest_bytes: smallest,
        evaluations: ev.evaluations(),
    })))
}

/// `c` with each slot it leaves unannotated and unkept (a bias or norm scale left to
/// propagation) written as propagation placed it, when all its instances got one placement and
/// the cost stays the same to the bit: then the annotated source annotates every param. The
/// flags say which were written so.
fn write_followers(
    ev: &eval::Evaluator,
    slots: &[Slot],
    c: &eval::Candidate,
) -> (eval::Candidate, Vec<bool>) {
    let unwritten = vec![false; slots.len()];
    let open = |i: usize| c[i].is_none() && slots[i].kept.is_none();
    if !(0..slots.len()).any(open) {
        return (c.clone(), unwritten);
    }
    let Ok(plan) = ev.trial_plan(c) else {
        return (c.clone(), unwritten);
    };
    let mut out = c.clone();
    let mut derived = unwritten.clone();
    for i in (0..slots.len()).filter(|&i| open(i)) {
        if let Some(spec) = propagated(&plan, &slots[i].name) {
            out[i] = Some(spec);
            derived[i] = true;
        }
    }
    match ev.cost(&out) == ev.cost(c) && ev.cost(c).is_some() {
        true => (out, derived),
        false => (c.clone(), unwritten),
    }
}

/// The one spec propagation gave every instance of the declaration `name` in `plan`, if one.
fn propagated(plan: &Plan, name: &str) -> Option<Spec> {
    let specs = instance_specs(plan, name);
    let first = specs.first()?;
    specs.iter().all(|s| s == first).then(|| first.clone())
}

/// The placement of each instance of the declaration `name` in `plan`, as a spec.
fn instance_specs(plan: &Plan, name: &str) -> Vec<Spec> {
    let wanted: Vec<ValueId> = plan
        .global
        .params()
        .chain(plan.global.inputs())
        .filter(|(n, _)| slots_name_matches(name, n))
        .map(|(_, v)| v)
        .collect();
    let mut found: Vec<Option<Spec>> = vec![None; wanted.len()];
    for (l, o) in plan.origin.iter() {
        let Some(i) = o.and_then(|o| wanted.iter().position(|&w| w == o)) else {
            continue;
        };
        found[i].get_or_insert_with(|| Spec {
            dims: plan.placements[l]
                .dims
                .iter()
                .map(|axes| {
                    axes.iter()
                        .map(|&a| plan.mesh.axis_name(a).to_string())
                        .collect()
                })
                .collect(),
        });
    }
    found.into_iter().flatten().collect()
}

/// One declaration's placement in the table.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Row {
    /// `param` or `input`.
    pub kind: &'static str,
    /// The declaration's name (`layer.*.attention.wq`).
    pub name: String,
    /// Its placement (`[_, tp]`).
    pub spec: String,
    /// `chosen` by the search, `kept` from the source, or given by `propagation` (and written
    /// into the annotated source when that keeps the plan).
    pub how: &'static str,
}

impl Found {
    /// One row per declaration.
    pub fn rows(&self) -> Vec<Row> {
        self.slots
            .iter()
            .zip(&self.chosen)
            .zip(&self.derived)
            .map(|((s, c), &derived)| {
                let (spec, how) = match (c, &s.kept) {
                    (Some(c), _) if derived => (c.to_string(), "propagation"),
                    (Some(c), _) => (c.to_string(), "chosen"),
                    (None, Some(k)) => (k.to_string(), "kept"),
                    (None, None) => (self.placement_of(&s.name), "propagation"),
                };
                Row {
                    kind: if s.param { "param" } else { "input" },
                    name: s.name.clone(),
                    spec,
                    how,
                }
            })
            .collect()
    }

    /// How the placement was found, in words.
    pub fn how(&self) -> String {
        match self.method {
            Method::Exhaustive { candidates } => format!(
                "exhaustive: all {candidates} placements planned, optimal on the cost model"
            ),
            Method::Descent { sweeps } => format!(
                "block-coordinate descent ({sweeps} sweeps; a local optimum), {} placements planned",
                self.evaluations
            ),
        }
    }

    /// The chosen annotations as `#`-comment lines: how they were found, then one line per
    /// declaration (`layer.*.attention.wq @ [_, tp]`).
    pub fn table(&self) -> String {
        let cost = Cost::of(&self.plan);
        let mut out = format!(
            "# auto: {}; step {}, peak memory per device {}\n",
            self.how(),
            secs(cost.time),
            bytes(cost.peak as u64)
        );
        let rows = self.rows();
        let width = rows.iter().map(|r| r.name.len()).max().unwrap_or(0);
        let swidth = rows.iter().map(|r| r.spec.len()).max().unwrap_or(0);
        for r in rows {
            out.push_str(&format!(
                "# auto: {} {:width$} @ {:swidth$}  {}\n",
                r.kind, r.name, r.spec, r.how
            ));
        }
        out
    }

    /// The table as a JSON object: `how`, `evaluations` and `annotations` (the rows).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "how": self.how(),
            "exhaustive": matches!(self.method, Method::Exhaustive { .. }),
            "evaluations": self.evaluations,
            "annotations": self.rows(),
        })
    }

    /// The source with the chosen annotations written in (see [`source::annotated_source`]).
    pub fn annotated(&self, text: &str, module: &crate::syntax::ast::Module, mode: Mode) -> String {
        let axes: Vec<String> = self.plan.global.mesh_axes.clone();
        source::annotated_source(text, module, &self.slots, &self.chosen, mode, &axes)
    }

    /// The placement propagation gave the first instance of the declaration named `name`.
    fn placement_of(&self, name: &str) -> String {
        instance_specs(&self.plan, name)
            .first()
            .map_or_else(|| "?".into(), Spec::to_string)
    }
}

/// True when the instance name `n` is an instance of the wildcard name `name`.
fn slots_name_matches(name: &str, n: &str) -> bool {
    let a: Vec<&str> = name.split('.').collect();
    let b: Vec<&str> = n.split('.').collect();
    a.len() == b.len() && a.iter().zip(&b).all(|(x, y)| x == y || *x == "*")
}
