//! Pipelined training on the ranks: each rank runs its stage's share of the step (the stage is
//! its coordinate on the pipeline axis), microbatch by microbatch in its schedule's order, and
//! exchanges one packed boundary message per microbatch and direction with the rank of the same
//! other coordinates on the adjacent stage. Then the once-per-step part runs, passing the few
//! values one stage makes and another reads (a tied weight's gradient) in one global order;
//! carried params go to the stages that read them, and the loss to stage 0.

use super::comm::{CommError, Message};
use super::core::{self, Part};
use super::micro::leaf_table;
use super::spmd::{NodeError, Rank, RunError};
use super::{ExecError, Tensor};
use crate::ir::{Dtype, Graph, IdVec, Local, NodeId, Phase, ValueId};
use crate::pipeline::schedule::{Action, Dir};
use crate::pipeline::{summary, Crossing, Pipeline, Transfer, Where};
use crate::plan::liveness::Liveness;
use crate::plan::micro::{classify, Microbatches};
use crate::plan::Plan;
use std::collections::{BTreeMap, BTreeSet};

/// A slot table: one entry per local value.
type Slots = IdVec<ValueId<Local>, Option<Tensor>>;

/// One rank's blocks of leaves, by local value.
type LeafBlocks = BTreeMap<ValueId<Local>, Tensor>;

/// Measured figures of one stage's rank in the last step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StageRunStats {
    /// The stage.
    pub stage: u32,
    /// Boundary messages sent (forward and backward).
    pub sends: u64,
    /// Bytes of those messages.
    pub send_bytes: u64,
    /// Values sent once per step to another stage (gradients, carried params, the loss).
    pub step_sends: u64,
    /// Most microbatches whose forward had run and backward not, at once.
    pub max_in_flight: u32,
    /// Seconds in the stage's forward and backward passes (compute and its own collectives).
    pub busy_s: f64,
    /// Seconds from the step's start to the stage's last scheduled action (before the
    /// once-per-step part): its busy time plus its waits.
    pub schedule_s: f64,
}

/// The pass of a stage that runs a node once per microbatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Forward,
    Backward,
}

/// A value passed once per step from one stage to another, at its maker's position.
#[derive(Clone, Copy, Debug)]
struct StepTransfer {
    at: usize,
    value: ValueId<Local>,
    from: u32,
    to: u32,
}

/// What one rank's stage runs of the step and what it exchanges.
pub(crate) struct Stage<'p> {
    plan: &'p Plan,
    pipe: &'p Pipeline,
    /// This rank's stage.
    pub(crate) stage: u32,
    coords: Vec<u64>,
    axis: usize,
    parts: Microbatches,
    /// Per node, the stages that run it.
    runs: Vec<BTreeSet<u32>>,
    /// Per output, the stage whose blocks are the run's result.
    owner: Vec<u32>,
    /// Per node, the pass that runs it on this stage per microbatch.
    pass: Vec<Option<Pass>>,
    /// Per node, run on this stage in the once-per-step part.
    step: Vec<bool>,
    /// Liveness over a microbatch's forward pass then its backward pass.
    live_mb: Liveness<Local>,
    /// Liveness over the once-per-step part.
    live_step: Liveness<Local>,
    send_fwd: Vec<ValueId<Local>>,
    recv_fwd: Vec<ValueId<Local>>,
    send_bwd: Vec<ValueId<Local>>,
    recv_bwd: Vec<ValueId<Local>>,
    /// Sent forward and read no more here: dropped once sent.
    drop_fwd: Vec<ValueId<Local>>,
    step_transfers: Vec<StepTransfer>,
}

/// What a stage's step gives.
pub(crate) struct StageOutcome {
    /// Per output: its block, where this stage makes it.
    pub outputs: Vec<Option<Tensor>>,
    /// Peak live non-leaf bytes (all microbatches in flight and the accumulators).
    pub peak_bytes: u64,
    /// Measured figures.
    pub stats: StageRunStats,
}

fn internal(detail: String) -> ExecError {
    ExecError::Internal {
        node: "pipeline".into(),
        detail,
    }
}

impl<'p> Stage<'p> {
    /// The share of `plan`'s pipelined step that device `rank` runs.
    pub(crate) fn of(plan: &'p Plan, pipe: &'p Pipeline, rank: usize) -> Result<Self, ExecError> {
        let g = &plan.local;
        let axis = plan
            .mesh
            .axis_index(&pipe.axis)
            .ok_or_else(|| internal(format!("no pipeline axis `{}`", pipe.axis)))?;
        if pipe.place.len() != g.num_nodes() || pipe.actions.len() != pipe.stages as usize {
            return Err(internal("the pipeline does not fit the program".into()));
        }
        let coords = plan.mesh.coords(rank as u64);
        let s = coords[axis] as u32;
        let temporal = plan.mesh.temporal().map(|a| (a, &plan.mesh));
        let parts = classify(g, temporal).map_err(|e| internal(e.to_string()))?;
        let (runs, owner) = stage_runs(g, &pipe.place);
        let backward = backward_pass(g, &parts);
        let mut pass = vec![None; g.num_nodes()];
        let mut step = vec![false; g.num_nodes()];
        for (id, n) in g.nodes() {
            let i = id.index();
            if n.op.is_leaf() || !runs[i].contains(&s) {
                continue;
            }
            if parts.accumulate[i] || !parts.step[i] {
                pass[i] = Some(if backward[i] {
                    Pass::Backward
                } else {
                    Pass::Forward
                });
            }
            step[i] =
                (parts.step[i] && !parts.accumulate[i]) || (parts.again[i] && parts.count > 1);
        }
        let last = pipe.stages - 1;
        let boundary =
            |c, k: Option<u32>| k.map_or_else(Vec::new, |k| boundary(&pipe.transfers, c, k));
        let mut st = Stage {
            plan,
            pipe,
            stage: s,
            coords,
            axis,
            runs,
            owner,
            pass,
            step,
            live_mb: Liveness::of_order(g, [], |_| false),
            live_step: Liveness::of_order(g, [], |_| false),
            send_fwd: boundary(Crossing::Forward, (s < last).then_some(s)),
            recv_fwd: boundary(Crossing::Forward, s.checked_sub(1)),
            send_bwd: boundary(Crossing::Backward, s.checked_sub(1)),
            recv_bwd: boundary(Crossing::Backward, (s < last).then_some(s)),
            drop_fwd: Vec::new(),
            step_transfers: step_transfers(g, &pipe.transfers),
            parts,
        };
        (st.live_mb, st.live_step) = st.liveness();
        st.drop_fwd = st.dropped_after_forward_send();
        Ok(st)
    }

    /// Liveness over this stage's passes in the order they run (a microbatch's forward, its
    /// backward; the once-per-step part); what it sends and the outputs it makes never die,
    /// nor, with one microbatch, what the once-per-step part reads of the microbatch's values.
    fn liveness(&self) -> (Liveness<Local>, Liveness<Local>) {
        let g = &self.plan.local;
        let s = self.stage;
        let mut hold: BTreeSet<ValueId<Local>> = self
            .send_fwd
            .iter()
            .chain(&self.send_bwd)
            .copied()
            .collect();
        hold.extend(
            self.step_transfers
                .iter()
                .filter(|t| t.from == s)
                .map(|t| t.value),
        );
        hold.extend(
            g.outputs()
                .iter()
                .filter(|o| self.makes(o.value))
                .map(|o| o.value),
        );
        let n = g.num_nodes();
        let step: Vec<usize> = (0..n).filter(|&i| self.step[i]).collect();
        let step_reads: BTreeSet<ValueId<Local>> = match self.parts.count {
            1 => step
                .iter()
                .flat_map(|&i| g.node(NodeId::new(i)).inputs.iter().copied())
                .collect(),
            _ => BTreeSet::new(),
        };
        let in_pass = |p: Pass| (0..n).filter(move |&i| self.pass[i] == Some(p));
        let mb_order = in_pass(Pass::Forward).chain(in_pass(Pass::Backward));
        let live_mb = Liveness::of_order(g, mb_order, |v| {
            hold.contains(&v) || step_reads.contains(&v)
        });
        let live_step = Liveness::of_order(g, step, |v| hold.contains(&v));
        (live_mb, live_step)
    }

    /// True when this stage makes (or holds, for a leaf) value `v`.
    fn makes(&self, v: ValueId<Local>) -> bool {
        self.runs[self.plan.local.value(v).node.index()].contains(&self.stage)
    }

    /// The forward-sent values no backward or once-per-step node of this stage reads, and that
    /// are no output made here.
    fn dropped_after_forward_send(&self) -> Vec<ValueId<Local>> {
        let g = &self.plan.local;
        let later = |v: ValueId<Local>| {
            g.users(v).iter().any(|u| {
                let i = u.index();
                self.pass[i] == Some(Pass::Backward) || self.step[i]
            }) || g.outputs().iter().any(|o| o.value == v)
        };
        self.send_fwd
            .iter()
            .copied()
            .filter(|&v| !later(v))
            .collect()
    }

    /// The stage that saves leaf `v` in a checkpoint: the one making its next value (output
    /// `next`), else the first that holds it.
    pub(crate) fn writer(&self, v: ValueId<Local>, next: Option<usize>) -> u32 {
        match next {
            Some(k) => self.owner[k],
            None => {
                let leaf = self.plan.local.value(v).node.index();
                self.runs[leaf].first().copied().unwrap_or(0)
            }
        }
    }

    /// This rank's blocks of the leaves its stage reads from `source`: params, state and
    /// microbatch 0's inputs, then each later microbatch's inputs.
    pub(crate) fn load_leaves(
        &self,
        source: &super::leaves::LeafSource,
        rank: usize,
    ) -> Result<(LeafBlocks, Vec<LeafBlocks>), RunError> {
        use super::spmd::load_leaves_where;
        let (plan, coords) = (self.plan, &self.coords);
        let blocks = load_leaves_where(plan, coords, source, rank, |_, v| self.needs(v))?;
        let later = super::micro::later_inputs(plan, rank, |coords, rank| {
            load_leaves_where(plan, coords, source, rank, |op, v| {
                matches!(op, crate::ir::Op::Input { .. }) && self.needs(v)
            })
        })?;
        Ok((blocks, later))
    }

    /// The leaves this stage reads (or whose value is an output it owns).
    pub(crate) fn needs(&self, v: ValueId<Local>) -> bool {
        self.makes(v)
    }

    /// The device on stage `t` with this rank's other coordinates.
    fn peer(&self, t: u32) -> usize {
        let mut c = self.coords.clone();
        c[self.axis] = u64::from(t);
        self.plan.mesh.device(&c) as usize
    }

    /// Runs one step: the schedule's actions, then the once-per-step part. `blocks` holds the
    /// stage's leaves with microbatch 0's inputs, `later[m - 1]` microbatch m's inputs.
    pub(crate) fn run_step(
        &self,
        blocks: &BTreeMap<ValueId<Local>, Tensor>,
        later: &[BTreeMap<ValueId<Local>, Tensor>],
        r: &mut Rank<'_>,
    ) -> Result<StageOutcome, RunError> {
        let mut run = Running {
            mbs: (0..self.parts.count).map(|_| None).collect(),
            done: vec![(false, false); self.parts.count as usize],
            in_flight: 0,
            peak: 0,
            stats: StageRunStats {
                stage: self.stage,
                ..StageRunStats::default()
            },
        };
        r.acc.clear();
        let t0 = std::time::Instant::now();
        for a in &self.pipe.actions[self.stage as usize] {
            self.act(*a, blocks, later, &mut run, r)?;
            self.free_finished(&mut run);
        }
        run.stats.schedule_s = t0.elapsed().as_secs_f64();
        let slots = match self.parts.count {
            1 => run.mbs[0]
                .take()
                .unwrap_or_else(|| core::empty_slots(&self.plan.local)),
            _ => {
                let mut slots = core::empty_slots(&self.plan.local);
                for (v, t) in std::mem::take(&mut r.acc) {
                    slots[v] = Some(t);
                }
                slots
            }
        };
        let table = leaf_table(&self.plan.local, blocks, later, 0);
        let (outputs, peak) = self.step_part(&table, slots, &mut run.stats, r)?;
        run.stats.max_in_flight = run.stats.max_in_flight.max(run.in_flight);
        Ok(StageOutcome {
            outputs,
            peak_bytes: run.peak.max(peak),
            stats: run.stats,
        })
    }

    /// One action of the schedule.
    fn act(
        &self,
        a: Action,
        blocks: &BTreeMap<ValueId<Local>, Tensor>,
        later: &[BTreeMap<ValueId<Local>, Tensor>],
        run: &mut Running,
        r: &mut Rank<'_>,
    ) -> Result<(), RunError> {
        match a {
            Action::Forward(m) => self.run_pass(Pass::Forward, m, blocks, later, run, r),
            Action::Backward(m) => self.run_pass(Pass::Backward, m, blocks, later, run, r),
            Action::Send { dir, mb } => {
                let msg = self.pack(dir, mb, run)?;
                let to = self.neighbour(dir, true);
                r.send(self.peer(to), msg)
                    .map_err(|e| self.comm_error(r, &format!("sending {}", what(dir, mb)), e))?;
                self.sent(dir, mb, run);
                Ok(())
            }
            Action::Recv { dir, mb } => {
                let from = self.neighbour(dir, false);
                let msg = r
                    .recv(self.peer(from))
                    .map_err(|e| self.comm_error(r, &format!("receiving {}", what(dir, mb)), e))?;
                self.unpack(dir, mb, msg, run, r)
            }
            Action::SendRecv { send, recv } => {
                let msg = self.pack(send.0, send.1, run)?;
                let (to, from) = (self.neighbour(send.0, true), self.neighbour(recv.0, false));
                let got = r
                    .exchange(self.peer(to), msg, self.peer(from))
                    .map_err(|e| {
                        let doing = format!(
                            "sending {} and receiving {}",
                            what(send.0, send.1),
                            what(recv.0, recv.1)
                        );
                        self.comm_error(r, &doing, e)
                    })?;
                self.sent(send.0, send.1, run);
                self.unpack(recv.0, recv.1, got, run, r)
            }
        }
    }

    /// The stage a message in direction `dir` goes to (`out`) or comes from.
    fn neighbour(&self, dir: Dir, out: bool) -> u32 {
        match (dir, out) {
            (Dir::Forward, true) | (Dir::Backward, false) => self.stage + 1,
            (Dir::Forward, false) | (Dir::Backward, true) => self.stage.saturating_sub(1),
        }
    }

    /// Runs `pass` of microbatch `m` on its slots.
    fn run_pass(
        &self,
        pass: Pass,
        m: u32,
        blocks: &BTreeMap<ValueId<Local>, Tensor>,
        later: &[BTreeMap<ValueId<Local>, Tensor>],
        run: &mut Running,
        r: &mut Rank<'_>,
    ) -> Result<(), RunError> {
        let g = &self.plan.local;
        let mi = m as usize;
        if let Some(a) = self.plan.mesh.temporal() {
            r.coords[a] = u64::from(m);
        }
        let held = run.held_except(mi) + r.acc.values().map(core::bytes).sum::<u64>();
        let table = leaf_table(g, blocks, later, mi);
        let slots = run.mbs[mi].get_or_insert_with(|| core::empty_slots(g));
        let part = |id: NodeId<Local>| match self.pass[id.index()] {
            Some(p) if p == pass && self.parts.accumulate[id.index()] => Part::Absorb,
            Some(p) if p == pass => Part::Run,
            _ => Part::Skip,
        };
        let t0 = std::time::Instant::now();
        let peak =
            core::run_nodes(g, &self.live_mb, &table, slots, r, &part).map_err(|(id, e)| {
                let pass = if pass == Pass::Forward {
                    "forward"
                } else {
                    "backward"
                };
                r.op_error(id, e)
                    .within(&format!("stage {}, microbatch {m}, {pass}", self.stage))
            })?;
        run.stats.busy_s += t0.elapsed().as_secs_f64();
        run.peak = run.peak.max(held + peak);
        match pass {
            Pass::Forward => {
                run.in_flight += 1;
                run.stats.max_in_flight = run.stats.max_in_flight.max(run.in_flight);
            }
            Pass::Backward => {
                run.in_flight = run.in_flight.saturating_sub(1);
                run.done[mi].0 = true;
            }
        }
        Ok(())
    }

    /// The values of microbatch `m`'s message in direction `dir`, packed.
    fn pack(&self, dir: Dir, m: u32, run: &mut Running) -> Result<Message, RunError> {
        let values = match dir {
            Dir::Forward => &self.send_fwd,
            Dir::Backward => &self.send_bwd,
        };
        let slots = run.mbs.get(m as usize).and_then(Option::as_ref);
        let mut words: Vec<f32> = Vec::new();
        for &v in values {
            let t = slots.and_then(|s| s[v].as_ref()).ok_or_else(|| {
                self.error_here(internal(format!("{v} of {} is not made", what(dir, m))))
            })?;
            match t {
                Tensor::F32(a) => words.extend(a.iter()),
                // Integers travel as their bits.
                Tensor::I32(a) => words.extend(a.iter().map(|&x| f32::from_bits(x as u32))),
            }
        }
        run.stats.sends += 1;
        run.stats.send_bytes += words.len() as u64 * 4;
        Ok(Message::F32(words))
    }

    /// After microbatch `m`'s message in direction `dir` went: what it alone needed is freed.
    fn sent(&self, dir: Dir, m: u32, run: &mut Running) {
        let mi = m as usize;
        match dir {
            Dir::Forward => {
                if let Some(slots) = run.mbs[mi].as_mut() {
                    for &v in &self.drop_fwd {
                        if let Some(t) = slots[v].take() {
                            super::kernels::recycle(t);
                        }
                    }
                }
            }
            Dir::Backward => run.done[mi].1 = true,
        }
    }

    /// Puts a received message's values into microbatch `m`'s slots.
    fn unpack(
        &self,
        dir: Dir,
        m: u32,
        msg: Message,
        run: &mut Running,
        r: &Rank<'_>,
    ) -> Result<(), RunError> {
        let g = &self.plan.local;
        let values = match dir {
            Dir::Forward => &self.recv_fwd,
            Dir::Backward => &self.recv_bwd,
        };
        let Message::F32(words) = msg else {
            return Err(self.error_here(internal(format!("{} of integers", what(dir, m)))));
        };
        let want: u64 = values.iter().map(|&v| g.ty(v).numel()).sum();
        if want != words.len() as u64 {
            let e = CommError::Length {
                from: self.peer(self.neighbour(dir, false)),
                got: words.len(),
                want: want as usize,
            };
            return Err(self.comm_error(r, &format!("receiving {}", what(dir, m)), e));
        }
        let slots = run.mbs[m as usize].get_or_insert_with(|| core::empty_slots(g));
        let mut at = 0usize;
        for &v in values {
            let n = g.ty(v).numel() as usize;
            slots[v] =
                Some(unpack_value(g, v, &words[at..at + n]).map_err(|e| self.error_here(e))?);
            at += n;
        }
        let held = run.held_except(usize::MAX) + r.acc.values().map(core::bytes).sum::<u64>();
        run.peak = run.peak.max(held);
        super::kernels::give(words);
        Ok(())
    }

    /// Frees the slots of microbatches whose backward ran and whose gradients were sent (with one
    /// microbatch, the once-per-step part still reads them).
    fn free_finished(&self, run: &mut Running) {
        if self.parts.count == 1 {
            return;
        }
        for (m, done) in run.done.iter().enumerate() {
            if done.0 && (done.1 || self.stage == 0) {
                if let Some(slots) = run.mbs[m].take() {
                    slots
                        .into_vec()
                        .into_iter()
                        .flatten()
                        .for_each(super::kernels::recycle);
                }
            }
        }
    }

    /// The once-per-step part: this stage's nodes in program order, with each value passed
    /// between stages sent or received where its maker stands; then this stage's outputs.
    fn step_part(
        &self,
        leaves: &IdVec<ValueId<Local>, Option<&Tensor>>,
        mut slots: Slots,
        stats: &mut StageRunStats,
        r: &mut Rank<'_>,
    ) -> Result<(Vec<Option<Tensor>>, u64), RunError> {
        let g = &self.plan.local;
        if let Some(a) = self.plan.mesh.temporal() {
            r.coords[a] = 0;
        }
        let s = self.stage;
        let mut from = 0usize;
        let mut peak = 0;
        let mut segment = |upto: usize, slots: &mut Slots, r: &mut Rank<'_>| {
            let part = |id: NodeId<Local>| {
                let i = id.index();
                match self.step[i] && i >= from && i < upto {
                    true => Part::Run,
                    false => Part::Skip,
                }
            };
            let p = core::run_nodes(g, &self.live_step, leaves, slots, r, &part).map_err(
                |(id, e)| {
                    r.op_error(id, e)
                        .within(&format!("stage {s}, once per step"))
                },
            )?;
            peak = peak.max(p);
            from = upto;
            Ok::<(), RunError>(())
        };
        for t in self
            .step_transfers
            .iter()
            .filter(|t| t.from == s || t.to == s)
        {
            segment(t.at + 1, &mut slots, r)?;
            if t.from == s {
                let x = slots[t.value]
                    .as_ref()
                    .ok_or_else(|| self.error_here(internal(format!("{} is not made", t.value))))?;
                let msg = tensor_message(x);
                stats.step_sends += 1;
                r.send(self.peer(t.to), msg).map_err(|e| {
                    self.comm_error(r, &format!("sending {} to stage {}", t.value, t.to), e)
                })?;
            } else {
                let msg = r.recv(self.peer(t.from)).map_err(|e| {
                    self.comm_error(
                        r,
                        &format!("receiving {} from stage {}", t.value, t.from),
                        e,
                    )
                })?;
                slots[t.value] = Some(self.message_value(t.value, msg, t.from)?);
            }
        }
        segment(g.num_nodes(), &mut slots, r)?;
        let outputs = self.outputs(leaves, &mut slots)?;
        slots
            .into_vec()
            .into_iter()
            .flatten()
            .for_each(super::kernels::recycle);
        Ok((outputs, peak))
    }

    /// The outputs this stage makes (others `None`).
    fn outputs(
        &self,
        leaves: &IdVec<ValueId<Local>, Option<&Tensor>>,
        slots: &mut Slots,
    ) -> Result<Vec<Option<Tensor>>, RunError> {
        let outs = self.plan.local.outputs();
        let mut got = Vec::with_capacity(outs.len());
        for (k, o) in outs.iter().enumerate() {
            if !self.makes(o.value) {
                got.push(None);
                continue;
            }
            let again = outs[k + 1..].iter().any(|p| p.value == o.value);
            let t = match leaves[o.value] {
                Some(t) => Some(t.clone()),
                None if again => slots[o.value].clone(),
                None => slots[o.value].take(),
            };
            let t = t.ok_or_else(|| {
                self.error_here(internal(format!("output `{}` was never computed", o.name)))
            })?;
            got.push(Some(t));
        }
        Ok(got)
    }

    /// A received value of `v`'s local type.
    fn message_value(
        &self,
        v: ValueId<Local>,
        msg: Message,
        from: u32,
    ) -> Result<Tensor, RunError> {
        let g = &self.plan.local;
        let Message::F32(words) = msg else {
            return Err(self.error_here(internal(format!("{v} came as integers"))));
        };
        let want = g.ty(v).numel() as usize;
        if words.len() != want {
            let e = CommError::Length {
                from: self.peer(from),
                got: words.len(),
                want,
            };
            return Err(RunError::Op {
                rank: self.plan.mesh.device(&self.coords) as usize,
                op: format!("receiving {v} from stage {from}"),
                location: String::new(),
                error: Box::new(e.into()),
            });
        }
        let t = unpack_value(g, v, &words).map_err(|e| self.error_here(e));
        super::kernels::give(words);
        t
    }

    /// Hands the carried params on: the stage making `next(NAME)` sends it to each stage that
    /// reads `NAME` and does not make it; each stage keeps the blocks it reads.
    pub(crate) fn carry(
        &self,
        outputs: &mut [Option<Tensor>],
        carried: &[(ValueId<Local>, usize)],
        blocks: &mut BTreeMap<ValueId<Local>, Tensor>,
        stats: &mut StageRunStats,
        r: &mut Rank<'_>,
    ) -> Result<(), RunError> {
        let g = &self.plan.local;
        let s = self.stage;
        for &(v, k) in carried {
            let maker = g.value(g.outputs()[k].value).node.index();
            let leaf = g.value(v).node.index();
            let u = self.owner[k];
            for t in (0..self.pipe.stages).filter(|t| *t != u) {
                if !self.runs[leaf].contains(&t) || self.runs[maker].contains(&t) {
                    continue;
                }
                if s == u {
                    let x = outputs[k].as_ref().ok_or_else(|| {
                        self.error_here(internal(format!("carried output {k} is not made")))
                    })?;
                    stats.step_sends += 1;
                    r.send(self.peer(t), tensor_message(x)).map_err(|e| {
                        self.comm_error(r, &format!("sending the next {v} to stage {t}"), e)
                    })?;
                } else if s == t {
                    let msg = r.recv(self.peer(u)).map_err(|e| {
                        self.comm_error(r, &format!("receiving the next {v} from stage {u}"), e)
                    })?;
                    let x = self.message_value(v, msg, u)?;
                    if let Some(old) = blocks.insert(v, x) {
                        super::kernels::recycle(old);
                    }
                }
            }
            if self.runs[leaf].contains(&s) && self.runs[maker].contains(&s) {
                if let Some(x) = outputs[k].clone() {
                    if let Some(old) = blocks.insert(v, x) {
                        super::kernels::recycle(old);
                    }
                }
            }
        }
        Ok(())
    }

    /// Reports the loss (output `k`) to stage 0: its value there, NaN on the stages between.
    pub(crate) fn report_loss(
        &self,
        outputs: &[Option<Tensor>],
        k: usize,
        stats: &mut StageRunStats,
        r: &mut Rank<'_>,
    ) -> Result<f32, RunError> {
        let u = self.owner[k];
        let s = self.stage;
        let own = || -> Result<f32, RunError> {
            let t = outputs[k]
                .as_ref()
                .ok_or_else(|| self.error_here(internal("the loss is not made".into())))?;
            super::train::loss_value(t).map_err(|e| self.error_here(e))
        };
        if u == 0 || (s != 0 && s != u) {
            return match s == u {
                true => own(),
                false => Ok(f32::NAN),
            };
        }
        if s == u {
            let loss = own()?;
            stats.step_sends += 1;
            r.send(self.peer(0), Message::F32(vec![loss]))
                .map_err(|e| self.comm_error(r, "sending the loss to stage 0", e))?;
            return Ok(loss);
        }
        match r.recv(self.peer(u)) {
            Ok(Message::F32(v)) if v.len() == 1 => Ok(v[0]),
            Ok(_) => Err(self.error_here(internal("the loss came malformed".into()))),
            Err(e) => Err(self.comm_error(r, &format!("receiving the loss from stage {u}"), e)),
        }
    }

    fn comm_error(&self, r: &Rank<'_>, doing: &str, e: CommError) -> RunError {
        RunError::Op {
            rank: r.rank(),
            op: format!("stage {}: {doing}", self.stage),
            location: String::new(),
            error: Box::new(e.into()),
        }
    }

    fn error_here(&self, e: ExecError) -> RunError {
        RunError::Op {
            rank: self.plan.mesh.device(&self.coords) as usize,
            op: format!("stage {}", self.stage),
            location: String::new(),
            error: Box::new(NodeError::Exec(e)),
        }
    }
}

/// A stage's outputs as a rank's: those it does not make as empty arrays (assembly takes each
/// output from the stage making it).
pub(crate) fn or_empty(outputs: Vec<Option<Tensor>>) -> Vec<Tensor> {
    let empty = || Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[0])));
    outputs
        .into_iter()
        .map(|o| o.unwrap_or_else(empty))
        .collect()
}

/// A step's running state on a stage.
struct Running {
    /// Per microbatch, its values (while in flight).
    mbs: Vec<Option<Slots>>,
    /// Per microbatch: its backward ran, its gradients were sent.
    done: Vec<(bool, bool)>,
    in_flight: u32,
    peak: u64,
    stats: StageRunStats,
}

impl Running {
    /// Bytes held by the microbatches other than `m`.
    fn held_except(&self, m: usize) -> u64 {
        self.mbs
            .iter()
            .enumerate()
            .filter(|(k, _)| *k != m)
            .filter_map(|(_, s)| s.as_ref())
            .flat_map(|s| s.values().flatten())
            .map(core::bytes)
            .sum()
    }
}

/// `microbatch 3's forward message` and the like.
fn what(dir: Dir, m: u32) -> String {
    let dir = match dir {
        Dir::Forward => "activations",
        Dir::Backward => "gradients",
    };
    format!("microbatch {m}'s {dir}")
}

/// One value as a message (integers as their bits).
fn tensor_message(t: &Tensor) -> Message {
    Message::F32(match t {
        Tensor::F32(a) => a.iter().copied().collect(),
        Tensor::I32(a) => a.iter().map(|&x| f32::from_bits(x as u32)).collect(),
    })
}

/// The tensor of `v`'s local type from its words.
fn unpack_value(g: &Graph<Local>, v: ValueId<Local>, words: &[f32]) -> Result<Tensor, ExecError> {
    let ty = g.ty(v);
    let shape: Vec<usize> = ty.shape.iter().map(|&d| d as usize).collect();
    Ok(match ty.dtype {
        Dtype::I32 => {
            let data = words.iter().map(|x| x.to_bits() as i32).collect();
            Tensor::I32(super::kernels::from_vec("recv", shape, data)?)
        }
        _ => Tensor::F32(super::kernels::from_vec("recv", shape, words.to_vec())?),
    })
}

/// The values of the message across boundary `k` (between stages k and k+1) in `crossing`'s
/// direction: each transfer passing that boundary, once per value, in program order.
fn boundary(transfers: &[Transfer], crossing: Crossing, k: u32) -> Vec<ValueId<Local>> {
    let mut seen = BTreeSet::new();
    transfers
        .iter()
        .filter(|t| t.crossing == crossing && t.from.min(t.to) <= k && k < t.from.max(t.to))
        .filter(|t| seen.insert(t.value))
        .map(|t| t.value)
        .collect()
}

/// The once-per-step transfers in the order every rank takes them: by their maker's position.
fn step_transfers(g: &Graph<Local>, transfers: &[Transfer]) -> Vec<StepTransfer> {
    let mut out: Vec<StepTransfer> = transfers
        .iter()
        .filter(|t| t.crossing == Crossing::Step)
        .map(|t| StepTransfer {
            at: g.value(t.value).node.index(),
            value: t.value,
            from: t.from,
            to: t.to,
        })
        .collect();
    out.sort_by_key(|t| (t.at, t.value.index(), t.to));
    out
}

/// Per node the stages that run it, and per output the stage owning it.
fn stage_runs(g: &Graph<Local>, place: &[Where]) -> (Vec<BTreeSet<u32>>, Vec<u32>) {
    let runs = summary::runs_on(g, place);
    let owner = summary::owners(g, &runs);
    (runs, owner)
}

/// Per node, whether a stage runs it in its backward pass: backward work, accumulations (their
/// operands are complete once the microbatch's backward ran) and what reads backward values.
fn backward_pass(g: &Graph<Local>, parts: &Microbatches) -> Vec<bool> {
    let mut b = vec![false; g.num_nodes()];
    for (id, n) in g.nodes() {
        let i = id.index();
        if n.op.is_leaf() || (parts.step[i] && !parts.accumulate[i]) {
            continue;
        }
        let reads_b = n.inputs.iter().any(|v| {
            let j = g.value(*v).node.index();
            b[j] && !parts.step[j]
        });
        b[i] = parts.accumulate[i] || g.region(n.region).phase == Phase::Backward || reads_b;
    }
    b
}

/// Per output of a pipelined plan, the stage whose blocks are the result, with the pipeline
/// axis; `None` without a pipeline.
pub(crate) fn output_owners(plan: &Plan) -> Option<(usize, Vec<u32>)> {
    let pipe = plan.pipeline.as_ref()?;
    let axis = plan.mesh.axis_index(&pipe.axis)?;
    if pipe.place.len() != plan.local.num_nodes() {
        return None;
    }
    Some((axis, stage_runs(&plan.local, &pipe.place).1))
}
