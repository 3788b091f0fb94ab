//! The timed model of a schedule: each stage runs its list in order, a compute action starts
//! when its stage is free, a receive waits until the message is available (`p2p` seconds after
//! it was sent), and a send does not hold its stage up (`check` proves the schedule also runs
//! under rendezvous).

use super::check::{check, Event};
use super::{check_sizes, Action, Dir, ScheduleError};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;

/// How long each stage's passes and each boundary message take.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Durations {
    /// Per stage, seconds of one microbatch's forward.
    pub forward: Vec<f64>,
    /// Per stage, seconds of one microbatch's backward.
    pub backward: Vec<f64>,
    /// Seconds from a message's send to its availability at the receiver.
    pub p2p: f64,
}

/// One compute action placed in time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    /// The action's index in its stage's list.
    pub action: usize,
    /// When it starts.
    pub start: f64,
    /// When it ends.
    pub end: f64,
}

/// One boundary message placed in time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Arrow {
    /// The sending stage.
    pub from_stage: usize,
    /// The receiving stage.
    pub to_stage: usize,
    /// Forward (activation) or backward (gradient).
    pub dir: Dir,
    /// The microbatch.
    pub mb: u32,
    /// When the sender sends it.
    pub sent: f64,
    /// When the receiver's receive completes (no earlier than `sent + p2p`).
    pub received: f64,
}

/// A schedule placed in time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    /// Per stage, its compute actions in order.
    pub stages: Vec<Vec<Slot>>,
    /// Every message, in the order they are sent.
    pub arrows: Vec<Arrow>,
    /// When the last stage finishes.
    pub makespan: f64,
}

impl Durations {
    /// The same forward and backward time on each of `stages` stages.
    pub fn uniform(stages: usize, forward: f64, backward: f64, p2p: f64) -> Durations {
        Durations {
            forward: vec![forward; stages],
            backward: vec![backward; stages],
            p2p,
        }
    }

    /// Refuses durations that do not cover `stages` stages or are not finite and non-negative.
    fn validate(&self, stages: usize) -> Result<(), ScheduleError> {
        let err = |reason| Err(ScheduleError::Durations { reason });
        for (name, times) in [("forward", &self.forward), ("backward", &self.backward)] {
            if times.len() != stages {
                return err(format!(
                    "{name} has {} entries for {stages} stages",
                    times.len()
                ));
            }
            if let Some((s, t)) = times.iter().enumerate().find(|(_, t)| !seconds(**t)) {
                return err(format!(
                    "{name} time {t} of stage {s} is not a finite, non-negative number"
                ));
            }
        }
        if !seconds(self.p2p) {
            return err(format!(
                "p2p time {} is not a finite, non-negative number",
                self.p2p
            ));
        }
        Ok(())
    }
}

/// Whether `t` is a usable number of seconds.
fn seconds(t: f64) -> bool {
    t.is_finite() && t >= 0.0
}

/// Places a schedule (which must pass `check`) in time.
pub fn simulate(actions: &[Vec<Action>], durations: &Durations) -> Result<Timeline, ScheduleError> {
    check(actions, microbatch_count(actions)?)?;
    durations.validate(actions.len())?;
    Ok(Timed::new(actions, durations).run())
}

/// The number of microbatches a schedule names (one more than its largest tag).
fn microbatch_count(actions: &[Vec<Action>]) -> Result<u32, ScheduleError> {
    let tags = actions
        .iter()
        .flatten()
        .flat_map(|a| super::check::events(a).into_iter().flatten());
    let count = tags.map(|(_, mb)| u64::from(mb) + 1).max().unwrap_or(0);
    check_sizes(actions.len() as u64, count)?;
    Ok(count as u32)
}

/// The fraction of stage time spent idle: 1 − Σ busy / (stages × makespan).
pub fn bubble_fraction(timeline: &Timeline) -> f64 {
    let p = timeline.stages.len() as f64;
    if timeline.stages.is_empty() || timeline.makespan <= 0.0 {
        return 0.0;
    }
    let busy: f64 = timeline
        .stages
        .iter()
        .flatten()
        .map(|slot| slot.end - slot.start)
        .sum();
    1.0 - busy / (p * timeline.makespan)
}

/// The state of the timed run.
struct Timed<'a> {
    lists: &'a [Vec<Action>],
    durations: &'a Durations,
    head: Vec<usize>,
    clock: Vec<f64>,
    // Whether the send of a stage's head SendRecv has gone out (it waits on the receive).
    sent: Vec<bool>,
    // Per stage and direction (forward, backward), the arrows sent to it and not yet received.
    inbox: Vec<[VecDeque<usize>; 2]>,
    line: Timeline,
    queue: VecDeque<usize>,
    queued: Vec<bool>,
}

impl<'a> Timed<'a> {
    /// Every stage at time zero, all queued to run.
    fn new(lists: &'a [Vec<Action>], durations: &'a Durations) -> Timed<'a> {
        let p = lists.len();
        Timed {
            lists,
            durations,
            head: vec![0; p],
            clock: vec![0.0; p],
            sent: vec![false; p],
            inbox: vec![[VecDeque::new(), VecDeque::new()]; p],
            line: Timeline {
                stages: vec![Vec::new(); p],
                arrows: Vec::new(),
                makespan: 0.0,
            },
            queue: (0..p).collect(),
            queued: vec![true; p],
        }
    }

    /// Runs every stage as far as its messages allow.
    fn run(mut self) -> Timeline {
        while let Some(s) = self.queue.pop_front() {
            self.queued[s] = false;
            self.advance(s);
        }
        self.line.makespan = self.clock.iter().copied().fold(0.0, f64::max);
        self.line
    }

    /// Moves stage `s` on until it waits for a message or finishes.
    fn advance(&mut self, s: usize) {
        let lists = self.lists;
        while let Some(a) = lists[s].get(self.head[s]) {
            if !self.step(s, a) {
                return;
            }
            self.head[s] += 1;
            self.sent[s] = false;
        }
    }

    /// Runs action `a` of stage `s`; false if it must wait for a message.
    fn step(&mut self, s: usize, a: &Action) -> bool {
        match *a {
            Action::Forward(_) => self.compute(s, self.durations.forward[s]),
            Action::Backward(_) => self.compute(s, self.durations.backward[s]),
            Action::Send { dir, mb } => self.send(s, dir, mb),
            Action::Recv { dir, .. } => return self.recv(s, dir),
            Action::SendRecv { send, recv } => {
                if !self.sent[s] {
                    self.send(s, send.0, send.1);
                    self.sent[s] = true;
                }
                return self.recv(s, recv.0);
            }
        }
        true
    }

    /// Runs a compute action of `seconds` on stage `s`.
    fn compute(&mut self, s: usize, seconds: f64) {
        let start = self.clock[s];
        self.clock[s] = start + seconds;
        self.line.stages[s].push(Slot {
            action: self.head[s],
            start,
            end: self.clock[s],
        });
    }

    /// Sends stage `s`'s message of `mb` in `dir` to its peer.
    fn send(&mut self, s: usize, dir: Dir, mb: u32) {
        let Some(to) = Event::Send(dir).peer(s, self.lists.len()) else {
            return;
        };
        let sent = self.clock[s];
        let received = sent + self.durations.p2p;
        self.inbox[to][dir_index(dir)].push_back(self.line.arrows.len());
        self.line.arrows.push(Arrow {
            from_stage: s,
            to_stage: to,
            dir,
            mb,
            sent,
            received,
        });
        if !self.queued[to] {
            self.queued[to] = true;
            self.queue.push_back(to);
        }
    }

    /// Receives stage `s`'s next message in `dir`; false if none has been sent yet.
    fn recv(&mut self, s: usize, dir: Dir) -> bool {
        let Some(i) = self.inbox[s][dir_index(dir)].pop_front() else {
            return false;
        };
        let arrow = &mut self.line.arrows[i];
        self.clock[s] = self.clock[s].max(arrow.received);
        arrow.received = self.clock[s];
        true
    }
}

/// A direction's index in an inbox.
fn dir_index(dir: Dir) -> usize {
    match dir {
        Dir::Forward => 0,
        Dir::Backward => 1,
    }
}
