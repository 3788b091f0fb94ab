//! A schedule drawn as text: one row per stage, one column per time slot of a unit run (a
//! forward takes one slot, a backward two, messages none).

use super::sim::{simulate, Durations, Timeline};
use super::{Action, ScheduleError};

/// What one time slot of a stage shows.
#[derive(Clone, Copy)]
enum Cell {
    /// Nothing runs.
    Idle,
    /// A compute action starts (the index in the stage's list).
    Start(usize),
    /// The compute action started earlier goes on.
    Continued,
}

/// The schedule (which must pass `check`) as an aligned text table, e.g.
/// `stage 0 | F0 F1 ·  ·  B0 -- ...`: `·` an idle slot, `--` a backward's second slot.
pub fn table(actions: &[Vec<Action>]) -> Result<String, ScheduleError> {
    let line = simulate(actions, &Durations::uniform(actions.len(), 1.0, 2.0, 0.0))?;
    let grid = cells(&line);
    let compute = actions
        .iter()
        .flatten()
        .filter(|a| matches!(a, Action::Forward(_) | Action::Backward(_)));
    let width = compute
        .map(|a| a.to_string().len())
        .max()
        .unwrap_or(0)
        .max(2);
    let name_width = actions.len().saturating_sub(1).to_string().len();
    let mut out = String::new();
    for (s, row) in grid.iter().enumerate() {
        let mut text = format!("stage {s:>name_width$} |");
        for cell in row {
            text.push(' ');
            text.push_str(&format!("{:<width$}", show(*cell, &actions[s], width)));
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    Ok(out)
}

/// Per stage, what each slot of the unit run shows.
fn cells(line: &Timeline) -> Vec<Vec<Cell>> {
    // Unit durations make every start and end a whole number of slots.
    let columns = line.makespan as usize;
    let mut grid = vec![vec![Cell::Idle; columns]; line.stages.len()];
    for (row, slots) in grid.iter_mut().zip(&line.stages) {
        for slot in slots {
            let (start, end) = (slot.start as usize, slot.end as usize);
            for (t, cell) in row.iter_mut().enumerate().take(end).skip(start) {
                *cell = if t == start {
                    Cell::Start(slot.action)
                } else {
                    Cell::Continued
                };
            }
        }
    }
    grid
}

/// The text of one cell, at most `width` characters.
fn show(cell: Cell, list: &[Action], width: usize) -> String {
    match cell {
        Cell::Idle => "·".to_string(),
        Cell::Start(i) => list.get(i).map(Action::to_string).unwrap_or_default(),
        Cell::Continued => "-".repeat(width),
    }
}
