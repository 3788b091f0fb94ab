//! Action labels: `F3`, `B3`, `SF3`, `SB3`, `RF3`, `RB3`, and `SF3+RB1` for a fused send and
//! receive; the form in which schedules are written to and read from JSON.

use super::{Action, Dir, ScheduleError};
use std::fmt;

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Action::Forward(mb) => write!(f, "F{mb}"),
            Action::Backward(mb) => write!(f, "B{mb}"),
            Action::Send { dir, mb } => write!(f, "S{}{mb}", dir_letter(dir)),
            Action::Recv { dir, mb } => write!(f, "R{}{mb}", dir_letter(dir)),
            Action::SendRecv { send, recv } => write!(
                f,
                "S{}{}+R{}{}",
                dir_letter(send.0),
                send.1,
                dir_letter(recv.0),
                recv.1
            ),
        }
    }
}

/// `F` or `B`.
fn dir_letter(dir: Dir) -> char {
    match dir {
        Dir::Forward => 'F',
        Dir::Backward => 'B',
    }
}

impl Action {
    /// The action a label names (the inverse of `Display`).
    pub fn parse(label: &str) -> Result<Action, ScheduleError> {
        let bad = |reason| ScheduleError::BadLabel {
            label: label.to_string(),
            reason,
        };
        match label.split_once('+') {
            None => simple(label).map_err(bad),
            Some((send, recv)) => match (simple(send), simple(recv)) {
                (Ok(Action::Send { dir, mb }), Ok(Action::Recv { dir: rdir, mb: rmb })) => {
                    Ok(Action::SendRecv {
                        send: (dir, mb),
                        recv: (rdir, rmb),
                    })
                }
                (Err(reason), _) | (_, Err(reason)) => Err(bad(reason)),
                _ => Err(bad("a fused action is a send, `+`, then a receive")),
            },
        }
    }
}

/// A label without `+`.
fn simple(label: &str) -> Result<Action, &'static str> {
    let (head, digits) = label.split_at(
        label
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(label.len()),
    );
    let mb = microbatch(digits)?;
    match head {
        "F" => Ok(Action::Forward(mb)),
        "B" => Ok(Action::Backward(mb)),
        "SF" => Ok(Action::Send {
            dir: Dir::Forward,
            mb,
        }),
        "SB" => Ok(Action::Send {
            dir: Dir::Backward,
            mb,
        }),
        "RF" => Ok(Action::Recv {
            dir: Dir::Forward,
            mb,
        }),
        "RB" => Ok(Action::Recv {
            dir: Dir::Backward,
            mb,
        }),
        _ => Err("the action is not one of F, B, SF, SB, RF, RB"),
    }
}

/// A microbatch number in canonical decimal (no sign, no leading zero).
fn microbatch(digits: &str) -> Result<u32, &'static str> {
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err("the action needs a microbatch number after its letters");
    }
    if digits.len() > 1 && digits.starts_with('0') {
        return Err("the microbatch number has a leading zero");
    }
    digits
        .parse()
        .map_err(|_| "the microbatch number does not fit in 32 bits")
}

impl From<Action> for String {
    fn from(a: Action) -> String {
        a.to_string()
    }
}

impl TryFrom<String> for Action {
    type Error = ScheduleError;

    fn try_from(label: String) -> Result<Action, ScheduleError> {
        Action::parse(&label)
    }
}
