//! The search over candidates. Where every combination of every slot's placements is at most
//! [`exhaustive_limit`], all are planned: the result is optimal on the cost model. Otherwise a
//! block-coordinate descent, axis by axis: each block's params (and the top level's params and
//! inputs) are enumerated jointly along one axis with the rest held, until a sweep changes
//! nothing; it starts four ways from everything replicated (inputs with the params or after
//! them, axes in mesh order or reversed), and once more from the source's own annotations when
//! it has some; then, from the best end point, pairs of blocks move jointly. It keeps the best. Its result is a local optimum of that neighbourhood, not a
//! proof.

use super::eval::{Candidate, Cost, Evaluator};
use super::slots::Slot;
use crate::ir::Spec;
use crate::mesh::Mesh;

/// Most candidates planned by the exhaustive search, for the smallest programs.
pub const EXHAUSTIVE_LIMIT: u64 = 16384;

/// At least this many candidates are planned exhaustively, whatever the program's size: every
/// placement of 6 matrices on a 1-D mesh.
pub const EXHAUSTIVE_FLOOR: u64 = 729;

/// Candidates times forward ops planned exhaustively at most (a trial costs about 40 µs of CPU
/// per forward op: this keeps the exhaustive search within some 20 s of CPU).
const EXHAUSTIVE_WORK: u64 = 500_000;

/// The exhaustive search's limit for a program whose judged instances have `ops` forward ops.
pub fn exhaustive_limit(ops: usize) -> u64 {
    (EXHAUSTIVE_WORK / ops.max(1) as u64).clamp(EXHAUSTIVE_FLOOR, EXHAUSTIVE_LIMIT)
}

/// Most joint choices of one block along one axis; a larger block is searched slot by slot.
const GROUP_LIMIT: u64 = 256;

/// Most joint choices of a pair of blocks along one axis in the pair moves.
const PAIR_LIMIT: u64 = 128;

/// Most sweeps of the descent.
const MAX_SWEEPS: usize = 4;

/// How many of the best candidates are kept in case the whole program's plan differs from the
/// extrapolated one.
const RANKED: usize = 4;

/// How the placement was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Every combination planned: optimal on the cost model.
    Exhaustive {
        /// Combinations planned.
        candidates: u64,
    },
    /// Block-coordinate descent: a local optimum.
    Descent {
        /// Sweeps over every axis and block.
        sweeps: usize,
    },
}

/// Per slot, per mesh axis: the dim that axis splits, or none.
type Choice = Vec<Vec<Option<usize>>>;

/// The search's result: the best candidates first.
pub(crate) struct Outcome {
    pub ranked: Vec<(Candidate, Cost)>,
    pub method: Method,
}

/// What the search sees of the mesh and the budget.
pub(crate) struct Space<'a> {
    pub slots: &'a [Slot],
    pub mesh: &'a Mesh,
    /// Mesh axes the search may place along (size above 1, not the pipeline's).
    pub axes: Vec<usize>,
    pub budget: Option<f64>,
}

/// Searches `space` with `ev`; `None` when no candidate could be planned.
pub(crate) fn search(ev: &Evaluator, space: &Space) -> Option<Outcome> {
    let options: Vec<Vec<Vec<Option<usize>>>> = space
        .slots
        .iter()
        .map(|s| match s.kept {
            Some(_) => vec![vec![None; space.mesh.axes().len()]],
            None => full_options(s, space),
        })
        .collect();
    let total = options
        .iter()
        .try_fold(1u64, |acc, o| acc.checked_mul(o.len() as u64));
    let mut board = Board::new(space.budget);
    let method = match total {
        Some(n) if n <= exhaustive_limit(ev.forward_ops()) => {
            exhaustive(ev, space, &options, &mut board);
            Method::Exhaustive { candidates: n }
        }
        _ => Method::Descent {
            sweeps: descents(ev, space, &mut board),
        },
    };
    (!board.ranked.is_empty()).then_some(Outcome {
        ranked: board.ranked,
        method,
    })
}

/// The descents: four from everything replicated (inputs with the params or after them, axes
/// in mesh order or reversed), the source's annotations as written and a descent from them,
/// then pair moves from the best end point; returns the sweeps run.
fn descents(ev: &Evaluator, space: &Space, board: &mut Board) -> usize {
    let mut sweeps = 0;
    let mut ends: Vec<(Choice, Pick)> = Vec::new();
    let orders = if space.axes.len() > 1 { 2 } else { 1 };
    let empty = vec![vec![None; space.mesh.axes().len()]; space.slots.len()];
    for reverse in [false, true].into_iter().take(orders) {
        for params_first in [false, true] {
            let start = Start {
                choice: empty.clone(),
                params_first,
                reverse,
                pick: Pick::Descent,
            };
            let (n, end) = descent(ev, space, board, start);
            sweeps += n;
            ends.push((end, Pick::Descent));
        }
    }
    // The source's own annotations as written (unannotated slots left free): the plan the
    // user would get without --auto competes too.
    if space.slots.iter().any(|s| s.written.is_some()) {
        let c: Candidate = space
            .slots
            .iter()
            .map(|s| s.kept.is_none().then(|| s.written.clone()).flatten())
            .collect();
        if let Some(cost) = ev.cost(&c) {
            board.offer(&c, cost);
        }
    }
    if let Some(choice) = written(space) {
        let start = Start {
            choice,
            params_first: false,
            reverse: false,
            pick: Pick::DescentWritten,
        };
        let (n, end) = descent(ev, space, board, start);
        sweeps += n;
        ends.push((end, Pick::DescentWritten));
    }
    sweeps + pair_moves(ev, space, board, ends)
}

/// From the best end point of the descents: every pair of blocks enumerated jointly along each
/// axis (where the pair has at most [`PAIR_LIMIT`] joint choices), which escapes the optima
/// where neither block can move alone (the attention's weights split only once the MLP's free
/// memory); after an improvement, a descent from there. Returns the sweeps run.
fn pair_moves(
    ev: &Evaluator,
    space: &Space,
    board: &mut Board,
    ends: Vec<(Choice, Pick)>,
) -> usize {
    let cost = |c: &Choice, pick: Pick| ev.cost(&candidate(space, c, pick));
    let mut best: Option<(Choice, Pick, Cost)> = None;
    for (c, pick) in ends {
        let Some(k) = cost(&c, pick) else { continue };
        if best
            .as_ref()
            .is_none_or(|(_, _, b)| k.better(b, space.budget))
        {
            best = Some((c, pick, k));
        }
    }
    let Some((mut choice, pick, _)) = best else {
        return 0;
    };
    let groups = groups(space);
    let mut changed = false;
    for &a in &space.axes {
        for (i, g1) in groups.iter().enumerate() {
            for g2 in &groups[i + 1..] {
                let group: Vec<usize> = g1.iter().chain(g2).copied().collect();
                if joint_choices(space, &choice, &group, a) > PAIR_LIMIT {
                    continue;
                }
                let m = Move {
                    group: &group,
                    axis: a,
                    budget: space.budget,
                    pick,
                };
                changed |= improve(ev, space, &mut choice, m, board);
            }
        }
    }
    if !changed {
        return 1;
    }
    let start = Start {
        choice,
        params_first: false,
        reverse: false,
        pick,
    };
    1 + descent(ev, space, board, start).0
}

/// How many joint choices `group` has along axis `a` from `choice`.
fn joint_choices(space: &Space, choice: &Choice, group: &[usize], a: usize) -> u64 {
    group
        .iter()
        .map(|&i| axis_options(&space.slots[i], &choice[i], a, space.mesh).len() as u64)
        .product()
}

/// Every placement of slot `s`: each searchable axis splits one dim it divides, or none.
fn full_options(s: &Slot, space: &Space) -> Vec<Vec<Option<usize>>> {
    let mut out = vec![vec![None; space.mesh.axes().len()]];
    for &a in &space.axes {
        let mut next = Vec::new();
        for o in &out {
            next.push(o.clone());
            for d in 0..s.shape.len() {
                let mut o2 = o.clone();
                o2[a] = Some(d);
                if divides(s, &o2, space.mesh) {
                    next.push(o2);
                }
            }
        }
        out = next;
    }
    out
}

/// True when every dim of `s` divides by the product of the axes `o` puts on it.
fn divides(s: &Slot, o: &[Option<usize>], mesh: &Mesh) -> bool {
    (0..s.shape.len()).all(|d| {
        let parts: u64 = o
            .iter()
            .enumerate()
            .filter(|(_, x)| **x == Some(d))
            .map(|(a, _)| mesh.axis_size(a))
            .product();
        s.shape[d].is_multiple_of(parts)
    })
}

/// The spec of one slot's choice (axes on one dim in mesh order, major first).
fn spec_of(s: &Slot, o: &[Option<usize>], mesh: &Mesh) -> Spec {
    let mut spec = Spec::replicated(s.shape.len());
    for (a, d) in o.iter().enumerate() {
        if let Some(d) = d {
            spec.dims[*d].push(mesh.axis_name(a).to_string());
        }
    }
    spec
}

/// How a choice becomes a candidate.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pick {
    /// Every slot but the kept ones annotated as chosen (the exhaustive search).
    Every,
    /// The descent's: followers unannotated, tied slots placed as the slot they are tied to.
    Descent,
    /// As `Descent`, with the followers as the source writes them.
    DescentWritten,
}

/// The candidate of `choice` by `pick` (kept slots are always unannotated).
fn candidate(space: &Space, choice: &Choice, pick: Pick) -> Candidate {
    let spec = |i: usize, s: &Slot| {
        let o = match (pick, s.tied_to) {
            (Pick::Every, _) | (_, None) => &choice[i],
            (_, Some(j)) => &choice[j],
        };
        Some(spec_of(s, o, space.mesh))
    };
    space
        .slots
        .iter()
        .enumerate()
        .map(|(i, s)| match (s.kept.is_some(), s.follower(), pick) {
            (true, _, _) => None,
            (_, true, Pick::Descent) => None,
            (_, true, Pick::DescentWritten) => s.written.clone(),
            _ => spec(i, s),
        })
        .collect()
}

/// The best candidates seen, under the real budget.
struct Board {
    budget: Option<f64>,
    ranked: Vec<(Candidate, Cost)>,
}

impl Board {
    fn new(budget: Option<f64>) -> Self {
        Board {
            budget,
            ranked: Vec::new(),
        }
    }

    /// Records `c`, keeping the [`RANKED`] best (the earlier of equals first).
    fn offer(&mut self, c: &Candidate, cost: Cost) {
        if self.ranked.iter().any(|(x, _)| x == c) {
            return;
        }
        let at = self
            .ranked
            .iter()
            .position(|(_, x)| cost.better(x, self.budget))
            .unwrap_or(self.ranked.len());
        if at < RANKED {
            self.ranked.insert(at, (c.clone(), cost));
            self.ranked.truncate(RANKED);
        }
    }
}

/// Plans every combination of `options`.
fn exhaustive(
    ev: &Evaluator,
    space: &Space,
    options: &[Vec<Vec<Option<usize>>>],
    board: &mut Board,
) {
    let mut list = Vec::new();
    let mut idx = vec![0usize; options.len()];
    loop {
        let choice: Choice = idx
            .iter()
            .zip(options)
            .map(|(&i, o)| o[i].clone())
            .collect();
        list.push(candidate(space, &choice, Pick::Every));
        if !advance(&mut idx, options) {
            break;
        }
    }
    for (c, cost) in list.iter().zip(ev.costs(&list)) {
        if let Some(cost) = cost {
            board.offer(c, cost);
        }
    }
}

/// The next index of an odometer over `options`; false after the last.
fn advance(idx: &mut [usize], options: &[Vec<Vec<Option<usize>>>]) -> bool {
    for (i, o) in idx.iter_mut().zip(options) {
        *i += 1;
        if *i < o.len() {
            return true;
        }
        *i = 0;
    }
    false
}

/// Where a descent starts.
struct Start {
    /// The first choice.
    choice: Choice,
    /// Inputs wait for the second sweep.
    params_first: bool,
    /// Axes are placed last to first.
    reverse: bool,
    /// How choices become candidates.
    pick: Pick,
}

/// The source's own annotations on params and inputs as a choice (what each can express on the
/// searched axes), when it has any.
fn written(space: &Space) -> Option<Choice> {
    if space.slots.iter().all(|s| s.written.is_none()) {
        return None;
    }
    let axes = space.mesh.axes().len();
    let choice = space
        .slots
        .iter()
        .map(|s| {
            let mut o = vec![None; axes];
            for (d, names) in s.written.iter().flat_map(|w| w.dims.iter().enumerate()) {
                for &a in &space.axes {
                    if names.iter().any(|n| n == space.mesh.axis_name(a)) {
                        o[a] = Some(d);
                    }
                }
            }
            match divides(s, &o, space.mesh) {
                true => o,
                false => vec![None; axes],
            }
        })
        .collect();
    Some(choice)
}

/// Block-coordinate descent from `start`; returns the sweeps run and where it ended. In the first sweep an axis is
/// judged against the budget times the sizes of the axes not yet placed (they will divide
/// memory further); with `params_first` the inputs wait for the second sweep (a start that
/// splits the batch first and one that splits the weights first can end in different local
/// optima; the board keeps the best of both); with `reverse` the axes are placed last to first.
fn descent(ev: &Evaluator, space: &Space, board: &mut Board, start: Start) -> (usize, Choice) {
    let Start {
        mut choice,
        params_first,
        reverse,
        pick,
    } = start;
    let groups = groups(space);
    let mut axes = space.axes.clone();
    if reverse {
        axes.reverse();
    }
    let mut sweeps = 0;
    while sweeps < MAX_SWEEPS {
        sweeps += 1;
        let mut changed = false;
        for (k, &a) in axes.iter().enumerate() {
            let later: u64 = match sweeps {
                1 => axes[k + 1..]
                    .iter()
                    .map(|&b| space.mesh.axis_size(b))
                    .product(),
                _ => 1,
            };
            let budget = space.budget.map(|b| b * later as f64);
            for g in &groups {
                let waits = params_first && sweeps == 1 && g.iter().any(|&i| !space.slots[i].param);
                if !waits {
                    let m = Move {
                        group: g,
                        axis: a,
                        budget,
                        pick,
                    };
                    changed |= improve(ev, space, &mut choice, m, board);
                }
            }
        }
        if !(changed || params_first && sweeps == 1) {
            break;
        }
    }
    (sweeps, choice)
}

/// The searched slots (not kept, followers or tied) by declaring block, blocks in order of first
/// declaration; a block with more than [`GROUP_LIMIT`] joint choices is split slot by slot.
fn groups(space: &Space) -> Vec<Vec<usize>> {
    let mut out: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, s) in space.slots.iter().enumerate() {
        if s.kept.is_some() || s.follower() || s.tied_to.is_some() {
            continue;
        }
        match out.iter_mut().find(|(g, _)| *g == s.group) {
            Some((_, v)) => v.push(i),
            None => out.push((s.group.clone(), vec![i])),
        }
    }
    let worst = |v: &[usize]| {
        v.iter()
            .map(|&i| 1 + space.slots[i].shape.len() as u64)
            .product::<u64>()
    };
    out.into_iter()
        .flat_map(|(_, v)| match worst(&v) <= GROUP_LIMIT {
            true => vec![v],
            false => v.into_iter().map(|i| vec![i]).collect(),
        })
        .collect()
}

/// One step of the descent: a group, an axis, the budget it is judged against and how its
/// choices become candidates.
struct Move<'a> {
    group: &'a [usize],
    axis: usize,
    budget: Option<f64>,
    pick: Pick,
}

/// Tries every joint choice of `m.group` along `m.axis`, the rest held; keeps the best (the
/// current one on ties). True when it changed.
fn improve(ev: &Evaluator, space: &Space, choice: &mut Choice, m: Move, board: &mut Board) -> bool {
    let (group, a, budget) = (m.group, m.axis, m.budget);
    let mut tries: Vec<Choice> = vec![choice.clone()];
    for &i in group {
        let mut next = Vec::new();
        for t in &tries {
            for d in axis_options(&space.slots[i], &t[i], a, space.mesh) {
                let mut t2 = t.clone();
                t2[i][a] = d;
                next.push(t2);
            }
        }
        tries = next;
    }
    tries.retain(|t| t != choice);
    tries.insert(0, choice.clone());
    let list: Vec<Candidate> = tries.iter().map(|t| candidate(space, t, m.pick)).collect();
    let costs = ev.costs(&list);
    let mut best: Option<(usize, Cost)> = None;
    for (i, cost) in costs.iter().enumerate() {
        let Some(cost) = cost else { continue };
        board.offer(&list[i], *cost);
        if best.is_none_or(|(_, b)| cost.better(&b, budget)) {
            best = Some((i, *cost));
        }
    }
    match best {
        Some((i, _)) if i > 0 => {
            *choice = tries.swap_remove(i);
            true
        }
        _ => false,
    }
}

/// Slot `s`'s choices along axis `a` given its choice `o` along the others: none, or a dim no
/// other axis splits that `a`'s size divides.
fn axis_options(s: &Slot, o: &[Option<usize>], a: usize, mesh: &Mesh) -> Vec<Option<usize>> {
    let mut out = vec![None];
    for d in 0..s.shape.len() {
        let taken = o.iter().enumerate().any(|(b, x)| b != a && *x == Some(d));
        if !taken && s.shape[d].is_multiple_of(mesh.axis_size(a)) {
            out.push(Some(d));
        }
    }
    out
}
