//! Pipeline-parallel schedules: per stage, the order in which a rank runs its forward and
//! backward passes over the microbatches and exchanges boundary messages with its neighbours.
//! Megatron's non-interleaved 1F1B and GPipe are built here, checked for completeness, message
//! agreement and deadlock freedom under rendezvous (`check`), timed (`simulate`) and drawn
//! (`table`). Both schedules run the backward passes in microbatch order, so gradients are
//! accumulated in the same order and the two give bitwise equal results.

mod check;
mod label;
mod sim;
mod table;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use check::check;
pub use sim::{bubble_fraction, simulate, Arrow, Durations, Slot, Timeline};
pub use table::table;

/// Most stages a schedule may have.
pub const MAX_STAGES: u32 = 4096;
/// Most microbatches a schedule may have.
pub const MAX_MICROBATCHES: u32 = 4096;
/// Most stage × microbatch pairs a built schedule may have (bounds its memory).
pub const MAX_STAGE_MICROBATCHES: u64 = 1 << 20;

/// Which pipeline schedule to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ScheduleKind {
    /// Megatron's non-interleaved one-forward-one-backward schedule (`1f1b`).
    #[serde(rename = "1f1b")]
    OneFOneB,
    /// All forwards, then all backwards (`gpipe`).
    #[serde(rename = "gpipe")]
    GPipe,
}

/// The direction of a boundary message between adjacent stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    /// An activation: sent to stage s+1, received from stage s-1.
    Forward,
    /// An activation's gradient: sent to stage s-1, received from stage s+1.
    Backward,
}

/// One step of a stage's schedule; serialised as its label (`F3`, `SF3+RB1`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Action {
    /// Run the stage's forward on a microbatch.
    Forward(u32),
    /// Run the stage's backward on a microbatch.
    Backward(u32),
    /// Send a microbatch's boundary message.
    Send {
        /// Which way it goes.
        dir: Dir,
        /// Its microbatch.
        mb: u32,
    },
    /// Receive a microbatch's boundary message.
    Recv {
        /// Which way it comes.
        dir: Dir,
        /// Its microbatch.
        mb: u32,
    },
    /// A send and a receive posted at once (MPI_Sendrecv); done when both are matched.
    SendRecv {
        /// The message sent.
        send: (Dir, u32),
        /// The message received.
        recv: (Dir, u32),
    },
}

/// A schedule that cannot be built, parsed, checked or simulated.
#[derive(Debug, Clone, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum ScheduleError {
    /// A schedule name other than `1f1b` or `gpipe`.
    #[error("unknown pipeline schedule `{text}`")]
    #[diagnostic(code(tpc::bad_schedule), help("write 1f1b or gpipe"))]
    UnknownKind {
        /// The name given.
        text: String,
    },
    /// No stages or no microbatches.
    #[error("a pipeline schedule needs at least one {what}")]
    #[diagnostic(code(tpc::bad_schedule))]
    Empty {
        /// `stage` or `microbatch`.
        what: &'static str,
    },
    /// More stages or microbatches than supported.
    #[error("{count} {what} exceed the limit of {max}")]
    #[diagnostic(code(tpc::bad_schedule))]
    TooLarge {
        /// What was counted.
        what: &'static str,
        /// How many were asked for.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// An action label that does not parse.
    #[error("bad schedule action `{label}`: {reason}")]
    #[diagnostic(
        code(tpc::bad_schedule),
        help("labels are F3, B3, SF3, SB3, RF3, RB3 or a send and a receive as SF3+RB1")
    )]
    BadLabel {
        /// The label given.
        label: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// An action that breaks a rule of its stage (range, peer, duplicate or order).
    #[error("stage {stage}, action {index} ({action}): {reason}")]
    #[diagnostic(code(tpc::bad_schedule))]
    Action {
        /// The stage.
        stage: usize,
        /// The action's index in the stage's list.
        index: usize,
        /// The action's label.
        action: String,
        /// What is wrong.
        reason: String,
    },
    /// A compute action or message a stage lacks.
    #[error("stage {stage} has no {action}")]
    #[diagnostic(code(tpc::bad_schedule))]
    Missing {
        /// The stage.
        stage: usize,
        /// The missing action's label.
        action: String,
    },
    /// Two stages pair a send and a receive of different microbatches.
    #[error(
        "stage {receiver} receives {dir} microbatch {received} but stage {sender} sends \
         microbatch {sent} (stage {receiver} action {recv_index}, stage {sender} action \
         {send_index})"
    )]
    #[diagnostic(code(tpc::bad_schedule))]
    TagMismatch {
        /// The receiving stage.
        receiver: usize,
        /// The sending stage.
        sender: usize,
        /// The message's direction.
        dir: Dir,
        /// The microbatch the receiver expects.
        received: u32,
        /// The microbatch the sender sends.
        sent: u32,
        /// The receive's index in the receiver's list.
        recv_index: usize,
        /// The send's index in the sender's list.
        send_index: usize,
    },
    /// Under rendezvous semantics some stages wait forever.
    #[error("the schedule deadlocks: {stuck}")]
    #[diagnostic(
        code(tpc::schedule_deadlock),
        help("post a send and the receive it waits on together as one SendRecv")
    )]
    Deadlock {
        /// Each stuck stage with its head action.
        stuck: String,
    },
    /// Durations that do not fit the schedule.
    #[error("bad stage durations: {reason}")]
    #[diagnostic(code(tpc::bad_schedule))]
    Durations {
        /// What is wrong.
        reason: String,
    },
}

impl std::fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ScheduleKind::OneFOneB => "1f1b",
            ScheduleKind::GPipe => "gpipe",
        })
    }
}

impl std::str::FromStr for ScheduleKind {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<ScheduleKind, ScheduleError> {
        match text {
            "1f1b" => Ok(ScheduleKind::OneFOneB),
            "gpipe" => Ok(ScheduleKind::GPipe),
            _ => Err(ScheduleError::UnknownKind {
                text: text.to_string(),
            }),
        }
    }
}

impl std::fmt::Display for Dir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Dir::Forward => "forward",
            Dir::Backward => "backward",
        })
    }
}

/// Refuses stage and microbatch counts that are zero or too large to build.
pub(crate) fn check_sizes(stages: u64, microbatches: u64) -> Result<(), ScheduleError> {
    if stages == 0 {
        return Err(ScheduleError::Empty { what: "stage" });
    }
    if microbatches == 0 {
        return Err(ScheduleError::Empty { what: "microbatch" });
    }
    let too_large = |what, count, max| Err(ScheduleError::TooLarge { what, count, max });
    if stages > u64::from(MAX_STAGES) {
        return too_large("stages", stages, u64::from(MAX_STAGES));
    }
    if microbatches > u64::from(MAX_MICROBATCHES) {
        return too_large("microbatches", microbatches, u64::from(MAX_MICROBATCHES));
    }
    Ok(())
}

/// Per stage, the actions of `kind` for `stages` stages and `microbatches` microbatches, in
/// the order the stage executes them.
pub fn actions(
    kind: ScheduleKind,
    stages: u32,
    microbatches: u32,
) -> Result<Vec<Vec<Action>>, ScheduleError> {
    check_sizes(u64::from(stages), u64::from(microbatches))?;
    let pairs = u64::from(stages) * u64::from(microbatches);
    if pairs > MAX_STAGE_MICROBATCHES {
        return Err(ScheduleError::TooLarge {
            what: "stage-microbatch pairs",
            count: pairs,
            max: MAX_STAGE_MICROBATCHES,
        });
    }
    Ok((0..stages)
        .map(|s| stage_actions(kind, s, stages, microbatches))
        .collect())
}

/// The actions of stage `s` of `p`.
fn stage_actions(kind: ScheduleKind, s: u32, p: u32, m: u32) -> Vec<Action> {
    let mut b = Builder {
        list: Vec::with_capacity(5 * m as usize),
        prev: s > 0,
        next: s + 1 < p,
    };
    match kind {
        ScheduleKind::OneFOneB => b.one_f_one_b(p - s - 1, m),
        ScheduleKind::GPipe => b.gpipe(m),
    }
    b.list
}

/// Appends a stage's actions, leaving out messages to or from a stage that does not exist.
struct Builder {
    list: Vec<Action>,
    prev: bool,
    next: bool,
}

impl Builder {
    /// Megatron's non-interleaved 1F1B with `later` stages after this one.
    fn one_f_one_b(&mut self, later: u32, m: u32) {
        let warmup = later.min(m);
        let steady = m - warmup;
        (0..warmup).for_each(|i| self.forward_step(i));
        if steady > 0 {
            self.recv(self.prev, Dir::Forward, warmup);
        }
        for j in 0..steady {
            self.list.push(Action::Forward(warmup + j));
            self.send_recv(self.next, (Dir::Forward, warmup + j), (Dir::Backward, j));
            self.list.push(Action::Backward(j));
            if j + 1 == steady {
                self.send(self.prev, Dir::Backward, j);
            } else {
                self.send_recv(
                    self.prev,
                    (Dir::Backward, j),
                    (Dir::Forward, warmup + j + 1),
                );
            }
        }
        (steady..m).for_each(|i| self.backward_step(i));
    }

    /// GPipe: every forward, then every backward.
    fn gpipe(&mut self, m: u32) {
        (0..m).for_each(|i| self.forward_step(i));
        (0..m).for_each(|i| self.backward_step(i));
    }

    /// Receive the activation, run the forward, send its output on.
    fn forward_step(&mut self, mb: u32) {
        self.recv(self.prev, Dir::Forward, mb);
        self.list.push(Action::Forward(mb));
        self.send(self.next, Dir::Forward, mb);
    }

    /// Receive the gradient, run the backward, send the input's gradient back.
    fn backward_step(&mut self, mb: u32) {
        self.recv(self.next, Dir::Backward, mb);
        self.list.push(Action::Backward(mb));
        self.send(self.prev, Dir::Backward, mb);
    }

    /// A send, if the peer exists.
    fn send(&mut self, peer: bool, dir: Dir, mb: u32) {
        if peer {
            self.list.push(Action::Send { dir, mb });
        }
    }

    /// A receive, if the peer exists.
    fn recv(&mut self, peer: bool, dir: Dir, mb: u32) {
        if peer {
            self.list.push(Action::Recv { dir, mb });
        }
    }

    /// A fused send and receive with one peer, if it exists.
    fn send_recv(&mut self, peer: bool, send: (Dir, u32), recv: (Dir, u32)) {
        if peer {
            self.list.push(Action::SendRecv { send, recv });
        }
    }
}

/// Per stage, the most microbatches whose forward has run and whose backward has not.
pub fn peak_in_flight(actions: &[Vec<Action>]) -> Vec<u32> {
    actions.iter().map(|list| stage_peak(list)).collect()
}

/// The peak in-flight count of one stage's list.
fn stage_peak(list: &[Action]) -> u32 {
    let (mut now, mut peak) = (0u32, 0u32);
    for a in list {
        match a {
            Action::Forward(_) => now = now.saturating_add(1),
            Action::Backward(_) => now = now.saturating_sub(1),
            _ => {}
        }
        peak = peak.max(now);
    }
    peak
}
