//! The search's cost function: the whole planner on the program annotated with a candidate.
//! A deep `repeat` is judged on one and two instances and extrapolated to its count (every
//! instance shares its placement, so time and memory grow by the same step per instance).

use super::slots::{instances, key, DeclKey, Slot};
use super::Request;
use crate::driver::{self, Error};
use crate::ir::{Annotation, Spec, ValueId};
use crate::lower::Lowered;
use crate::plan::Plan;
use std::collections::HashMap;
use std::sync::Mutex;

/// A candidate: per slot, its spec (`None`: unannotated, left to propagation, or kept as the
/// source writes it).
pub(crate) type Candidate = Vec<Option<Spec>>;

/// What the cost model says of a plan: its step time and peak memory per device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Cost {
    /// Estimated step time in seconds (a pipelined step's schedule).
    pub time: f64,
    /// Peak memory per device in bytes (a pipeline's fullest stage).
    pub peak: f64,
}

impl Cost {
    /// The figures of `plan`.
    pub fn of(plan: &Plan) -> Cost {
        match &plan.pipeline {
            Some(p) => Cost {
                time: p.summary.step_time_s,
                peak: p
                    .summary
                    .per_stage
                    .iter()
                    .map(|s| s.memory_bytes)
                    .max()
                    .unwrap_or(0) as f64,
            },
            None => Cost {
                time: plan.summary.estimated_time_s,
                peak: plan.summary.peak_memory_bytes_per_device as f64,
            },
        }
    }

    /// True when `self` is strictly better than `other` under `budget`: fitting beats not
    /// fitting; among fitting, the faster (then the smaller); among not fitting, the smaller.
    pub fn better(&self, other: &Cost, budget: Option<f64>) -> bool {
        let fits = |c: &Cost| budget.is_none_or(|b| c.peak <= b);
        match (fits(self), fits(other)) {
            (true, false) => true,
            (false, true) => false,
            (true, true) => (self.time, self.peak) < (other.time, other.peak),
            (false, false) => (self.peak, self.time) < (other.peak, other.time),
        }
    }
}

/// One lowering of the program and where its declarations' instances are.
struct Base {
    lowered: Lowered,
    instances: HashMap<DeclKey, Vec<ValueId>>,
}

/// Plans candidates and remembers their costs.
pub(crate) struct Evaluator<'a> {
    req: &'a Request,
    slots: &'a [Slot],
    /// The program at one and two instances of its `repeat` (extrapolated to `count`), or
    /// whole.
    bases: Vec<Base>,
    count: Option<usize>,
    memo: Mutex<HashMap<Candidate, Option<Cost>>>,
    first_error: Mutex<Option<Error>>,
}

impl<'a> Evaluator<'a> {
    /// An evaluator of `slots`' candidates for `req`; `full` is the whole lowered program.
    pub fn new(req: &'a Request, slots: &'a [Slot], full: &Lowered) -> Result<Self, Error> {
        let count = match full.repeats[..] {
            [n] if n > 2 && full.graph.pipeline().is_none() => Some(n),
            _ => None,
        };
        let bases = match count {
            Some(_) => vec![base(req, Some(1))?, base(req, Some(2))?],
            None => vec![Base {
                instances: instances(&full.graph),
                lowered: full.clone(),
            }],
        };
        Ok(Evaluator {
            req,
            slots,
            bases,
            count,
            memo: Mutex::new(HashMap::new()),
            first_error: Mutex::new(None),
        })
    }

    /// Forward ops of the instances a candidate is planned on.
    pub fn forward_ops(&self) -> usize {
        self.bases.iter().map(|b| b.lowered.graph.num_nodes()).sum()
    }

    /// Candidates planned so far.
    pub fn evaluations(&self) -> usize {
        self.memo.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// The first error a candidate's planning met (what to report when none plans).
    pub fn take_error(&self) -> Option<Error> {
        self.first_error.lock().ok().and_then(|mut e| e.take())
    }

    /// The costs of `list`, planned on the machine's cores (at most 4 threads); `None` where
    /// planning failed.
    pub fn costs(&self, list: &[Candidate]) -> Vec<Option<Cost>> {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
        let chunk = list.len().div_ceil(threads).max(1);
        std::thread::scope(|s| {
            let handles: Vec<_> = list
                .chunks(chunk)
                .map(|part| s.spawn(move || part.iter().map(|c| self.cost(c)).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        })
    }

    /// The cost of `c` (remembered).
    pub fn cost(&self, c: &Candidate) -> Option<Cost> {
        if let Some(hit) = self.memo.lock().ok().and_then(|m| m.get(c).copied()) {
            return hit;
        }
        let costs: Result<Vec<Cost>, Error> = self
            .bases
            .iter()
            .map(|b| {
                plan(self.req, self.slots, &b.lowered, &b.instances, c, false).map(|p| Cost::of(&p))
            })
            .collect();
        let cost = match costs {
            Ok(v) => Some(self.extrapolate(&v)),
            Err(e) => {
                if let Ok(mut first) = self.first_error.lock() {
                    first.get_or_insert(e);
                }
                None
            }
        };
        if let Ok(mut m) = self.memo.lock() {
            m.insert(c.clone(), cost);
        }
        cost
    }

    /// The trial plan of `c` on the longest base (unchecked).
    pub fn trial_plan(&self, c: &Candidate) -> Result<Plan, Error> {
        let b = &self.bases[self.bases.len() - 1];
        plan(self.req, self.slots, &b.lowered, &b.instances, c, false)
    }

    /// The whole program's cost from its bases' costs.
    fn extrapolate(&self, v: &[Cost]) -> Cost {
        match (self.count, v) {
            (Some(n), [one, two]) => {
                let k = (n - 1) as f64;
                Cost {
                    time: one.time + k * (two.time - one.time),
                    peak: (one.peak + k * (two.peak - one.peak)).max(one.peak),
                }
            }
            _ => v[0],
        }
    }
}

/// The program lowered with each `repeat` capped at `cap` instances.
fn base(req: &Request, cap: Option<usize>) -> Result<Base, Error> {
    let lowered = driver::lower_source(&req.source, &req.overrides, cap)?;
    Ok(Base {
        instances: instances(&lowered.graph),
        lowered,
    })
}

/// Plans `lowered` annotated with candidate `c`, verifying each pass when `checks`.
pub(crate) fn plan(
    req: &Request,
    slots: &[Slot],
    lowered: &Lowered,
    at: &HashMap<DeclKey, Vec<ValueId>>,
    c: &Candidate,
    checks: bool,
) -> Result<Plan, Error> {
    let mut l = lowered.clone();
    if req.mode == super::Mode::Ignore {
        l.graph.clear_annotations();
    }
    for a in req.mesh.axes() {
        if !l.graph.mesh_axes.contains(&a.0) {
            l.graph.mesh_axes.push(a.0.clone());
        }
    }
    for (slot, spec) in slots.iter().zip(c) {
        let Some(spec) = spec else { continue };
        for &v in at.get(&key(slot.span)).map(Vec::as_slice).unwrap_or(&[]) {
            let a = Annotation {
                spec: spec.clone(),
                span: slot.span,
            };
            l.graph.annotate(v, a);
        }
    }
    let g = driver::finish_checked(l, req.outputs, req.scale, checks)?.graph;
    driver::plan_checked(g, req.mesh.clone(), req.device, &req.plan, checks)
}
