//! Checking a schedule: each stage on its own (every compute action and message exactly once,
//! each after what it needs), then all stages together under rendezvous semantics (messages
//! paired in order with equal microbatches, and no deadlock).

use super::{check_sizes, Action, Dir, ScheduleError};
use std::collections::VecDeque;

/// Checks that `actions` is a complete, consistent, deadlock-free schedule of `microbatches`.
pub fn check(actions: &[Vec<Action>], microbatches: u32) -> Result<(), ScheduleError> {
    check_sizes(actions.len() as u64, u64::from(microbatches))?;
    let p = actions.len();
    for (s, list) in actions.iter().enumerate() {
        check_stage(s, p, list, microbatches)?;
    }
    Rendezvous::new(actions).run()
}

/// One per-microbatch event of a stage: a compute pass, or one side of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Event {
    /// The forward pass.
    F,
    /// The backward pass.
    B,
    /// Sending a message.
    Send(Dir),
    /// Receiving a message.
    Recv(Dir),
}

/// Every event kind, in the order missing ones are reported.
const EVENTS: [Event; 6] = [
    Event::F,
    Event::B,
    Event::Send(Dir::Forward),
    Event::Send(Dir::Backward),
    Event::Recv(Dir::Forward),
    Event::Recv(Dir::Backward),
];

impl Event {
    /// Its position in `EVENTS`.
    fn slot(self) -> usize {
        match self {
            Event::F => 0,
            Event::B => 1,
            Event::Send(Dir::Forward) => 2,
            Event::Send(Dir::Backward) => 3,
            Event::Recv(Dir::Forward) => 4,
            Event::Recv(Dir::Backward) => 5,
        }
    }

    /// The single action of this event.
    fn action(self, mb: u32) -> Action {
        match self {
            Event::F => Action::Forward(mb),
            Event::B => Action::Backward(mb),
            Event::Send(dir) => Action::Send { dir, mb },
            Event::Recv(dir) => Action::Recv { dir, mb },
        }
    }

    /// The stage at the other end of a message of stage `s` of `p` (None for compute or when
    /// that stage does not exist).
    pub(super) fn peer(self, s: usize, p: usize) -> Option<usize> {
        match self {
            Event::F | Event::B => None,
            _ if self.towards_next() => Some(s + 1).filter(|&t| t < p),
            _ => s.checked_sub(1),
        }
    }

    /// Whether stage `s` of `p` must have this event once per microbatch.
    fn expected(self, s: usize, p: usize) -> bool {
        matches!(self, Event::F | Event::B) || self.peer(s, p).is_some()
    }

    /// The events of the same microbatch that must come earlier on stage `s` of `p`.
    fn needs(self, s: usize, p: usize) -> impl Iterator<Item = Event> {
        let needs = match self {
            Event::F => [Some(Event::Recv(Dir::Forward)), None],
            Event::B => [Some(Event::F), Some(Event::Recv(Dir::Backward))],
            Event::Send(Dir::Forward) => [Some(Event::F), None],
            Event::Send(Dir::Backward) => [Some(Event::B), None],
            Event::Recv(_) => [None, None],
        };
        needs
            .into_iter()
            .flatten()
            .filter(move |e| e.expected(s, p))
    }

    /// The direction of a message event.
    fn dir(self) -> Option<Dir> {
        match self {
            Event::Send(dir) | Event::Recv(dir) => Some(dir),
            Event::F | Event::B => None,
        }
    }

    /// Whether a message event's peer is the next stage (else the previous one).
    fn towards_next(self) -> bool {
        matches!(self, Event::Send(Dir::Forward) | Event::Recv(Dir::Backward))
    }
}

/// The events of an action, in the order they are posted.
pub(super) fn events(a: &Action) -> [Option<(Event, u32)>; 2] {
    match *a {
        Action::Forward(mb) => [Some((Event::F, mb)), None],
        Action::Backward(mb) => [Some((Event::B, mb)), None],
        Action::Send { dir, mb } => [Some((Event::Send(dir), mb)), None],
        Action::Recv { dir, mb } => [Some((Event::Recv(dir), mb)), None],
        Action::SendRecv { send, recv } => [
            Some((Event::Send(send.0), send.1)),
            Some((Event::Recv(recv.0), recv.1)),
        ],
    }
}

/// The message events of an action (none for a compute action).
fn messages(a: &Action) -> [Option<(Event, u32)>; 2] {
    events(a).map(|e| e.filter(|(event, _)| event.dir().is_some()))
}

/// Checks stage `s` of `p` on its own.
fn check_stage(s: usize, p: usize, list: &[Action], m: u32) -> Result<(), ScheduleError> {
    let mut seen = vec![vec![false; m as usize]; EVENTS.len()];
    for (index, a) in list.iter().enumerate() {
        for (event, mb) in events(a).into_iter().flatten() {
            let fail = |reason| ScheduleError::Action {
                stage: s,
                index,
                action: a.to_string(),
                reason,
            };
            check_event(s, p, &seen, event, mb, m).map_err(fail)?;
            seen[event.slot()][mb as usize] = true;
        }
    }
    missing(s, p, &seen)
}

/// Why `event` on `mb` may not come next on stage `s` of `p`, given the events `seen`.
fn check_event(
    s: usize,
    p: usize,
    seen: &[Vec<bool>],
    event: Event,
    mb: u32,
    m: u32,
) -> Result<(), String> {
    let label = event.action(mb);
    if mb >= m {
        return Err(format!(
            "microbatch {mb} is out of range (the schedule has {m})"
        ));
    }
    if !event.expected(s, p) {
        let side = if event.towards_next() {
            "after"
        } else {
            "before"
        };
        return Err(format!(
            "{label} needs a stage {side} stage {s}, and there is none"
        ));
    }
    if seen[event.slot()][mb as usize] {
        return Err(format!("{label} appears twice"));
    }
    match event.needs(s, p).find(|e| !seen[e.slot()][mb as usize]) {
        Some(need) => Err(format!(
            "{label} comes before {}, which it needs",
            need.action(mb)
        )),
        None => Ok(()),
    }
}

/// The first event stage `s` of `p` should have and lacks.
fn missing(s: usize, p: usize, seen: &[Vec<bool>]) -> Result<(), ScheduleError> {
    for event in EVENTS.into_iter().filter(|e| e.expected(s, p)) {
        if let Some(mb) = seen[event.slot()].iter().position(|&done| !done) {
            return Err(ScheduleError::Missing {
                stage: s,
                action: event.action(mb as u32).to_string(),
            });
        }
    }
    Ok(())
}

/// All stages run together; a message completes only when both its sides are posted.
struct Rendezvous<'a> {
    lists: &'a [Vec<Action>],
    head: Vec<usize>,
    // Which events of each stage's head action are matched (cleared when the head moves).
    done: Vec<[bool; 2]>,
    queue: VecDeque<usize>,
    queued: Vec<bool>,
}

impl<'a> Rendezvous<'a> {
    /// Every stage at its first action, all queued to run.
    fn new(lists: &'a [Vec<Action>]) -> Rendezvous<'a> {
        let p = lists.len();
        Rendezvous {
            lists,
            head: vec![0; p],
            done: vec![[false; 2]; p],
            queue: (0..p).collect(),
            queued: vec![true; p],
        }
    }

    /// Runs until no stage can move; an error if some stage has not finished.
    fn run(mut self) -> Result<(), ScheduleError> {
        while let Some(s) = self.queue.pop_front() {
            self.queued[s] = false;
            self.advance(s)?;
        }
        self.stuck()
    }

    /// Moves stage `s` on until it waits on a peer or finishes.
    fn advance(&mut self, s: usize) -> Result<(), ScheduleError> {
        let lists = self.lists;
        while let Some(a) = lists[s].get(self.head[s]) {
            for (k, ev) in messages(a).into_iter().enumerate() {
                if let Some((event, mb)) = ev.filter(|_| !self.done[s][k]) {
                    self.try_match(s, k, event, mb)?;
                }
            }
            if !self.head_done(s) {
                return Ok(());
            }
            self.next(s);
        }
        Ok(())
    }

    /// Whether every event of stage `s`'s head action is matched.
    fn head_done(&self, s: usize) -> bool {
        let Some(a) = self.lists[s].get(self.head[s]) else {
            return true;
        };
        messages(a)
            .iter()
            .zip(self.done[s])
            .all(|(e, done)| e.is_none() || done)
    }

    /// Moves stage `s` to its next action.
    fn next(&mut self, s: usize) {
        self.head[s] += 1;
        self.done[s] = [false; 2];
    }

    /// Matches event `k` of stage `s`'s head with the peer's head, if the peer has posted the
    /// other side of the message.
    fn try_match(
        &mut self,
        s: usize,
        k: usize,
        event: Event,
        mb: u32,
    ) -> Result<(), ScheduleError> {
        let (Some(peer), Some(dir)) = (event.peer(s, self.lists.len()), event.dir()) else {
            return Ok(());
        };
        let Some((pk, pmb)) = self.posted(peer, event) else {
            return Ok(());
        };
        if pmb != mb {
            let receives = matches!(event, Event::Recv(_));
            let (receiver, received, sender, sent) = if receives {
                (s, mb, peer, pmb)
            } else {
                (peer, pmb, s, mb)
            };
            return Err(ScheduleError::TagMismatch {
                receiver,
                sender,
                dir,
                received,
                sent,
                recv_index: self.head[receiver],
                send_index: self.head[sender],
            });
        }
        self.done[s][k] = true;
        self.done[peer][pk] = true;
        if self.head_done(peer) {
            self.next(peer);
            self.enqueue(peer);
        }
        Ok(())
    }

    /// The unmatched event of `peer`'s head action that is the other side of `event`, with its
    /// position in the action and its microbatch.
    fn posted(&self, peer: usize, event: Event) -> Option<(usize, u32)> {
        let a = self.lists[peer].get(self.head[peer])?;
        messages(a).into_iter().enumerate().find_map(|(k, e)| {
            e.filter(|&(pe, _)| !self.done[peer][k] && complements(event, pe))
                .map(|(_, mb)| (k, mb))
        })
    }

    /// Queues stage `s` to run again.
    fn enqueue(&mut self, s: usize) {
        if !self.queued[s] {
            self.queued[s] = true;
            self.queue.push_back(s);
        }
    }

    /// Ok if every stage finished, else the deadlock with each stuck stage's head.
    fn stuck(&self) -> Result<(), ScheduleError> {
        let stuck: Vec<String> = (0..self.lists.len())
            .filter_map(|s| {
                let a = self.lists[s].get(self.head[s])?;
                Some(format!("stage {s} waits at action {} ({a})", self.head[s]))
            })
            .collect();
        if stuck.is_empty() {
            return Ok(());
        }
        Err(ScheduleError::Deadlock {
            stuck: stuck.join("; "),
        })
    }
}

/// Whether `b` (on the peer) is the other side of message event `a`.
fn complements(a: Event, b: Event) -> bool {
    match (a, b) {
        (Event::Send(x), Event::Recv(y)) | (Event::Recv(x), Event::Send(y)) => x == y,
        _ => false,
    }
}
