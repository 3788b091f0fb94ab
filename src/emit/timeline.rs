//! A timed pipeline schedule drawn as a standalone SVG picture: one row per stage with its
//! forward (`F3`) and backward (`B3`) boxes to scale, the collectives inside each box hatched,
//! the once-per-step update (`U`) after the stage's last pass, the boundary messages as arrows,
//! a time axis, a legend and the bubble fraction in the title line.

use crate::pipeline::schedule::{bubble_fraction, Action, Arrow, Dir, Slot, Timeline};
use std::fmt::Write;

/// What the picture shows besides the schedule itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TimelineInfo {
    /// The heading, e.g. `gpt_pipe.tpl on dp=2,pp=2,tp=2: 1F1B, 4 microbatches`.
    pub title: String,
    /// One label per stage, e.g. `stage 0: layer.0–1`.
    pub stage_labels: Vec<String>,
    /// Per stage, seconds of tensor- and data-parallel collectives inside one forward.
    pub forward_collective_s: Vec<f64>,
    /// Per stage, seconds of collectives inside one backward.
    pub backward_collective_s: Vec<f64>,
    /// Per stage, seconds of the once-per-step part (update and dp gradient reductions); 0 = none.
    pub step: Vec<f64>,
}

/// Input the picture cannot be drawn from.
#[derive(Debug, Clone, PartialEq, thiserror::Error, miette::Diagnostic)]
pub enum TimelineError {
    /// A plan without pipeline stages.
    #[error("--emit timeline draws a pipeline's schedule; this plan has none (a training step with `repeat(...) @ pp` on a mesh with pp > 1)")]
    #[diagnostic(code(tpc::bad_timeline))]
    NoPipeline,
    /// The schedule could not be timed.
    #[error("{0}")]
    #[diagnostic(code(tpc::bad_timeline))]
    Schedule(String),
    /// A per-stage list whose length is not the number of stages.
    #[error("{what} has {len} entries for {stages} stages")]
    #[diagnostic(code(tpc::bad_timeline))]
    Count {
        /// Which list.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The number of stages in the timeline.
        stages: usize,
    },
    /// A time that is not a finite, non-negative number of seconds.
    #[error("{what} is {value}, not a finite, non-negative number of seconds")]
    #[diagnostic(code(tpc::bad_timeline))]
    Number {
        /// Which time.
        what: String,
        /// Its value.
        value: f64,
    },
    /// A slot that does not name a forward or backward of its stage, or ends before it starts.
    #[error("stage {stage}, slot {slot}: {reason}")]
    #[diagnostic(code(tpc::bad_timeline))]
    Slot {
        /// The stage.
        stage: usize,
        /// The slot's index in the stage's row.
        slot: usize,
        /// What is wrong.
        reason: String,
    },
    /// A message from or to a stage that does not exist.
    #[error("arrow {index} goes from stage {from} to stage {to} of {stages}")]
    #[diagnostic(code(tpc::bad_timeline))]
    Arrow {
        /// The arrow's index.
        index: usize,
        /// Its sending stage.
        from: usize,
        /// Its receiving stage.
        to: usize,
        /// The number of stages.
        stages: usize,
    },
}

/// Pixels of the time axis from 0 to the end of the last update.
const DRAW_WIDTH: f64 = 1000.0;
/// Pixels from one stage row to the next.
const ROW_PITCH: f64 = 32.0;
/// Height of a box.
const BOX_HEIGHT: f64 = 22.0;
/// Pixels above the first row (title and legend).
const TOP: f64 = 60.0;
/// Pixels below the last row (axis and its labels).
const BOTTOM: f64 = 44.0;
/// Pixels right of the time axis.
const RIGHT: f64 = 24.0;
/// Estimated pixels per character of the 11 px box text.
const CHAR_WIDTH: f64 = 7.0;
/// Fill of forward boxes.
const FORWARD_FILL: &str = "#a6cee3";
/// Fill of backward boxes.
const BACKWARD_FILL: &str = "#1f78b4";
/// Fill of update boxes.
const UPDATE_FILL: &str = "#b2df8a";
/// Colour of activation arrows.
const FORWARD_ARROW: &str = "#e6550d";
/// Colour of gradient arrows.
const BACKWARD_ARROW: &str = "#756bb1";

/// The schedule `actions`, placed in time by `timeline`, as an SVG document.
pub fn svg(
    actions: &[Vec<Action>],
    timeline: &Timeline,
    info: &TimelineInfo,
) -> Result<String, TimelineError> {
    validate(actions, timeline, info)?;
    let layout = Layout::new(timeline, info)?;
    let mut out = String::new();
    layout.header(&mut out, info, timeline);
    layout.legend(&mut out);
    layout.grid(&mut out);
    for (s, list) in actions.iter().enumerate() {
        layout.stage(&mut out, s, list, timeline, info);
    }
    layout.arrows(&mut out, &timeline.arrows);
    layout.axis(&mut out);
    out.push_str("</svg>\n");
    Ok(out)
}

/// Refuses input whose lists disagree with the timeline or whose times are unusable.
fn validate(
    actions: &[Vec<Action>],
    timeline: &Timeline,
    info: &TimelineInfo,
) -> Result<(), TimelineError> {
    let stages = timeline.stages.len();
    check_count("actions", actions.len(), stages)?;
    check_count("stage_labels", info.stage_labels.len(), stages)?;
    for (what, times) in per_stage_times(info) {
        check_count(what, times.len(), stages)?;
        for (s, &t) in times.iter().enumerate() {
            check_seconds(|| format!("{what} of stage {s}"), t)?;
        }
    }
    check_seconds(|| "the makespan".to_string(), timeline.makespan)?;
    for (s, row) in timeline.stages.iter().enumerate() {
        check_row(s, row, &actions[s])?;
    }
    check_arrows(&timeline.arrows, stages)
}

/// The per-stage times of `info`, named.
fn per_stage_times(info: &TimelineInfo) -> [(&'static str, &[f64]); 3] {
    [
        ("forward_collective_s", &info.forward_collective_s),
        ("backward_collective_s", &info.backward_collective_s),
        ("step", &info.step),
    ]
}

/// Refuses a list of `len` entries for `stages` stages.
fn check_count(what: &'static str, len: usize, stages: usize) -> Result<(), TimelineError> {
    if len == stages {
        Ok(())
    } else {
        Err(TimelineError::Count { what, len, stages })
    }
}

/// Refuses a time that is negative or not finite.
fn check_seconds(what: impl FnOnce() -> String, value: f64) -> Result<(), TimelineError> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(TimelineError::Number {
            what: what(),
            value,
        })
    }
}

/// Refuses a slot of stage `s` with bad times or one not naming a forward or backward.
fn check_row(s: usize, row: &[Slot], list: &[Action]) -> Result<(), TimelineError> {
    for (i, slot) in row.iter().enumerate() {
        check_seconds(|| format!("the start of stage {s}'s slot {i}"), slot.start)?;
        check_seconds(|| format!("the end of stage {s}'s slot {i}"), slot.end)?;
        let bad = |reason: String| {
            Err(TimelineError::Slot {
                stage: s,
                slot: i,
                reason,
            })
        };
        if slot.end < slot.start {
            return bad("it ends before it starts".to_string());
        }
        match list.get(slot.action) {
            Some(Action::Forward(_) | Action::Backward(_)) => {}
            Some(a) => return bad(format!("action {} ({a}) is not a pass", slot.action)),
            None => return bad(format!("the stage has no action {}", slot.action)),
        }
    }
    Ok(())
}

/// Refuses arrows with bad times or stages.
fn check_arrows(arrows: &[Arrow], stages: usize) -> Result<(), TimelineError> {
    for (i, a) in arrows.iter().enumerate() {
        if a.from_stage >= stages || a.to_stage >= stages {
            return Err(TimelineError::Arrow {
                index: i,
                from: a.from_stage,
                to: a.to_stage,
                stages,
            });
        }
        check_seconds(|| format!("the send time of arrow {i}"), a.sent)?;
        check_seconds(|| format!("the receive time of arrow {i}"), a.received)?;
    }
    Ok(())
}

/// The unit of the axis and of the numbers in tooltips.
#[derive(Clone, Copy)]
struct Unit {
    /// Its symbol.
    name: &'static str,
    /// Units per second.
    per_second: f64,
}

impl Unit {
    /// Milliseconds, or microseconds when `span` seconds is under one millisecond.
    fn for_span(span: f64) -> Unit {
        if span >= 1e-3 {
            Unit {
                name: "ms",
                per_second: 1e3,
            }
        } else {
            Unit {
                name: "µs",
                per_second: 1e6,
            }
        }
    }

    /// `t` seconds with two decimals and the unit, e.g. `1.20 ms`.
    fn show(self, t: f64) -> String {
        format!("{:.2} {}", t * self.per_second, self.name)
    }
}

/// Where things go on the canvas.
struct Layout {
    /// Pixels left of the time axis (stage labels).
    left: f64,
    /// Pixels per second.
    scale: f64,
    /// Seconds from 0 to the end of the last update box.
    span: f64,
    /// The unit of the axis and tooltips.
    unit: Unit,
    /// The number of stages.
    stages: usize,
}

impl Layout {
    /// Fits the makespan and the update boxes into the drawing width.
    fn new(timeline: &Timeline, info: &TimelineInfo) -> Result<Layout, TimelineError> {
        let span = (timeline.stages.iter().zip(&info.step))
            .map(|(row, step)| last_end(row) + step)
            .chain(timeline.arrows.iter().map(|a| a.sent.max(a.received)))
            .fold(timeline.makespan, f64::max);
        check_seconds(|| "the drawn span".to_string(), span)?;
        let longest = info
            .stage_labels
            .iter()
            .map(|l| l.chars().count())
            .max()
            .unwrap_or(0);
        Ok(Layout {
            left: (longest as f64 * CHAR_WIDTH + 20.0).clamp(80.0, 400.0),
            scale: if span > 0.0 { DRAW_WIDTH / span } else { 0.0 },
            span,
            unit: Unit::for_span(span),
            stages: timeline.stages.len(),
        })
    }

    /// The x coordinate of time `t`.
    fn x(&self, t: f64) -> f64 {
        self.left + t * self.scale
    }

    /// The top of stage `s`'s boxes.
    fn box_top(&self, s: usize) -> f64 {
        TOP + s as f64 * ROW_PITCH + (ROW_PITCH - BOX_HEIGHT) / 2.0
    }

    /// The canvas size.
    fn size(&self) -> (f64, f64) {
        (
            self.left + DRAW_WIDTH + RIGHT,
            TOP + self.stages as f64 * ROW_PITCH + BOTTOM,
        )
    }

    /// The SVG element, its definitions and the title line.
    fn header(&self, out: &mut String, info: &TimelineInfo, timeline: &Timeline) {
        let (w, h) = self.size();
        let _ = writeln!(
            out,
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<svg xmlns=\"http://www.w3.org/2000/svg\" \
             width=\"{w:.0}\" height=\"{h:.0}\" viewBox=\"0 0 {w:.0} {h:.0}\" \
             font-family=\"sans-serif\" font-size=\"12\">"
        );
        let heading = format!(
            "{} — makespan {}, bubble {:.1}%",
            info.title,
            self.unit.show(timeline.makespan),
            100.0 * bubble_fraction(timeline)
        );
        let _ = writeln!(out, "<title>{}</title>", escape(&heading));
        out.push_str(DEFS);
        let _ = writeln!(
            out,
            "<text class=\"heading\" x=\"8\" y=\"20\" font-size=\"14\" font-weight=\"bold\">{}</text>",
            escape(&heading)
        );
    }

    /// The legend under the title line.
    fn legend(&self, out: &mut String) {
        out.push_str("<g class=\"legend\" font-size=\"11\">\n");
        let mut x = 8.0;
        for (swatch, text) in legend_items() {
            let _ = writeln!(
                out,
                "<g transform=\"translate({x:.0},32)\">{swatch}<text x=\"24\" y=\"11\">{}</text></g>",
                escape(text)
            );
            x += 32.0 + text.chars().count() as f64 * 6.0;
        }
        out.push_str("</g>\n");
    }

    /// Stage `s`'s row: its label, its passes and its update.
    fn stage(
        &self,
        out: &mut String,
        s: usize,
        list: &[Action],
        timeline: &Timeline,
        info: &TimelineInfo,
    ) {
        let top = self.box_top(s);
        let _ = writeln!(out, "<g class=\"stage\" data-stage=\"{s}\">");
        let _ = writeln!(
            out,
            "<rect class=\"lane\" x=\"{:.2}\" y=\"{top:.2}\" width=\"{DRAW_WIDTH:.2}\" \
             height=\"{BOX_HEIGHT:.2}\" fill=\"#eee\" fill-opacity=\"0.6\"/>",
            self.left
        );
        let _ = writeln!(
            out,
            "<text class=\"label\" x=\"{:.2}\" y=\"{:.2}\" text-anchor=\"end\">{}</text>",
            self.left - 8.0,
            top + BOX_HEIGHT / 2.0 + 4.0,
            escape(&info.stage_labels[s])
        );
        for slot in &timeline.stages[s] {
            self.pass(out, s, slot, list[slot.action], info);
        }
        if info.step[s] > 0.0 {
            self.update(out, s, last_end(&timeline.stages[s]), info.step[s]);
        }
        out.push_str("</g>\n");
    }

    /// One forward or backward box with its collective band.
    fn pass(&self, out: &mut String, s: usize, slot: &Slot, action: Action, info: &TimelineInfo) {
        let (class, collective) = match action {
            Action::Forward(_) => ("f", info.forward_collective_s[s]),
            _ => ("b", info.backward_collective_s[s]),
        };
        let mut tip = format!(
            "{action} on stage {s}: {}",
            self.unit.show(slot.end - slot.start)
        );
        if collective > 0.0 {
            let _ = write!(tip, " (collectives {})", self.unit.show(collective));
        }
        let _ = write!(
            tip,
            ", from {} to {}",
            self.unit.show(slot.start),
            self.unit.show(slot.end)
        );
        let b = Bar {
            class,
            tip,
            text: action.to_string(),
            start: slot.start,
            end: slot.end,
            collective,
        };
        self.draw_box(out, s, &b);
    }

    /// The update box of stage `s`, `seconds` long from `start`.
    fn update(&self, out: &mut String, s: usize, start: f64, seconds: f64) {
        let b = Bar {
            class: "u",
            tip: format!(
                "update on stage {s}: {} (once per step: optimizer update and dp gradient \
                 reductions), from {} to {}",
                self.unit.show(seconds),
                self.unit.show(start),
                self.unit.show(start + seconds)
            ),
            text: "U".to_string(),
            start,
            end: start + seconds,
            collective: 0.0,
        };
        self.draw_box(out, s, &b);
    }

    /// A box on stage `s`'s row, at least one pixel wide, its text shown when it fits.
    fn draw_box(&self, out: &mut String, s: usize, b: &Bar) {
        let (x, y) = (self.x(b.start), self.box_top(s));
        let w = ((b.end - b.start) * self.scale).max(1.0);
        let (fill, ink) = match b.class {
            "f" => (FORWARD_FILL, "#000"),
            "b" => (BACKWARD_FILL, "#fff"),
            _ => (UPDATE_FILL, "#000"),
        };
        let _ = writeln!(
            out,
            "<g class=\"{}\"><title>{}</title>",
            b.class,
            escape(&b.tip)
        );
        let _ = writeln!(
            out,
            "<rect x=\"{x:.2}\" y=\"{y:.2}\" width=\"{w:.2}\" height=\"{BOX_HEIGHT:.2}\" \
             fill=\"{fill}\" stroke=\"#333\" stroke-width=\"0.5\"/>"
        );
        if b.collective > 0.0 {
            let band = (b.collective * self.scale).min(w);
            let _ = writeln!(
                out,
                "<rect class=\"collective\" x=\"{:.2}\" y=\"{y:.2}\" width=\"{band:.2}\" \
                 height=\"{BOX_HEIGHT:.2}\" fill=\"url(#hatch-{})\"/>",
                x + w - band,
                b.class
            );
        }
        if b.text.chars().count() as f64 * CHAR_WIDTH + 4.0 <= w {
            let _ = writeln!(
                out,
                "<text x=\"{:.2}\" y=\"{:.2}\" font-size=\"11\" text-anchor=\"middle\" \
                 fill=\"{ink}\">{}</text>",
                x + w / 2.0,
                y + BOX_HEIGHT / 2.0 + 4.0,
                escape(&b.text)
            );
        }
        out.push_str("</g>\n");
    }

    /// Every message as an arrow from its send on the sender's row to its receive.
    fn arrows(&self, out: &mut String, arrows: &[Arrow]) {
        out.push_str("<g class=\"arrows\" stroke-width=\"1.2\">\n");
        for a in arrows {
            self.arrow(out, a);
        }
        out.push_str("</g>\n");
    }

    /// One message: activations solid and downwards, gradients dashed and upwards.
    fn arrow(&self, out: &mut String, a: &Arrow) {
        let (id, colour, dash, what) = match a.dir {
            Dir::Forward => ("f", FORWARD_ARROW, "", "activation"),
            Dir::Backward => ("b", BACKWARD_ARROW, " stroke-dasharray=\"4 3\"", "gradient"),
        };
        let (y1, y2) = self.arrow_ends(a);
        let _ = writeln!(
            out,
            "<line class=\"send-{id}\" x1=\"{:.2}\" y1=\"{y1:.2}\" x2=\"{:.2}\" y2=\"{y2:.2}\" \
             stroke=\"{colour}\"{dash} marker-end=\"url(#arrow-{id})\"><title>{what} of {} \
             from stage {} to stage {}: sent {}, received {}</title></line>",
            self.x(a.sent),
            self.x(a.received),
            mb_label(a),
            a.from_stage,
            a.to_stage,
            self.unit.show(a.sent),
            self.unit.show(a.received)
        );
    }

    /// The y coordinates of an arrow: from the sender's box edge facing the receiver to the
    /// receiver's box edge facing the sender.
    fn arrow_ends(&self, a: &Arrow) -> (f64, f64) {
        let (from, to) = (self.box_top(a.from_stage), self.box_top(a.to_stage));
        if a.to_stage >= a.from_stage {
            (from + BOX_HEIGHT, to)
        } else {
            (from, to + BOX_HEIGHT)
        }
    }

    /// The axis units of the ticks and the decimals their labels need.
    fn ticks(&self) -> (Vec<f64>, usize) {
        let span = self.span * self.unit.per_second;
        let (step, decimals) = tick_step(span);
        let ticks = (0..=tick_count(span, step)).map(|k| k as f64 * step);
        (ticks.collect(), decimals)
    }

    /// The y coordinate of the time axis.
    fn axis_y(&self) -> f64 {
        TOP + self.stages as f64 * ROW_PITCH + 4.0
    }

    /// Faint vertical lines at the ticks, behind the rows.
    fn grid(&self, out: &mut String) {
        out.push_str("<g class=\"grid\" stroke=\"#ccc\" stroke-width=\"0.5\">\n");
        for value in self.ticks().0 {
            let x = self.x(value / self.unit.per_second);
            let _ = writeln!(
                out,
                "<line x1=\"{x:.2}\" y1=\"{TOP:.2}\" x2=\"{x:.2}\" y2=\"{:.2}\"/>",
                self.axis_y()
            );
        }
        out.push_str("</g>\n");
    }

    /// The time axis under the rows, with a few round ticks.
    fn axis(&self, out: &mut String) {
        let y = self.axis_y();
        let _ = writeln!(
            out,
            "<g class=\"axis\" font-size=\"11\">\n<line x1=\"{:.2}\" y1=\"{y:.2}\" x2=\"{:.2}\" \
             y2=\"{y:.2}\" stroke=\"#000\"/>",
            self.left,
            self.left + DRAW_WIDTH
        );
        let (ticks, decimals) = self.ticks();
        for value in ticks {
            self.tick(out, y, value, decimals);
        }
        let _ = writeln!(
            out,
            "<text x=\"{:.2}\" y=\"{:.2}\" text-anchor=\"end\">time ({})</text>\n</g>",
            self.left + DRAW_WIDTH,
            y + 32.0,
            self.unit.name
        );
    }

    /// One tick at `value` axis units, with its label.
    fn tick(&self, out: &mut String, y: f64, value: f64, decimals: usize) {
        let x = self.x(value / self.unit.per_second);
        let _ = writeln!(
            out,
            "<line x1=\"{x:.2}\" y1=\"{y:.2}\" x2=\"{x:.2}\" \
             y2=\"{:.2}\" stroke=\"#000\"/><text x=\"{x:.2}\" y=\"{:.2}\" \
             text-anchor=\"middle\">{value:.decimals$}</text>",
            y + 5.0,
            y + 17.0
        );
    }
}

/// A box to draw.
struct Bar {
    /// `f`, `b` or `u`.
    class: &'static str,
    /// Its tooltip.
    tip: String,
    /// Its text, shown when it fits.
    text: String,
    /// When it starts, in seconds.
    start: f64,
    /// When it ends.
    end: f64,
    /// Seconds of collectives inside it, hatched at its end.
    collective: f64,
}

/// The pass whose boundary message an arrow carries, e.g. `F3`.
fn mb_label(a: &Arrow) -> Action {
    match a.dir {
        Dir::Forward => Action::Forward(a.mb),
        Dir::Backward => Action::Backward(a.mb),
    }
}

/// When a stage's last pass ends (0 for a stage without passes).
fn last_end(row: &[Slot]) -> f64 {
    row.iter().map(|slot| slot.end).fold(0.0, f64::max)
}

/// A round tick distance (1, 2 or 5 times a power of ten) giving at most nine ticks over `span`,
/// and the decimals its labels need; `(0, 0)` when there is nothing to divide.
fn tick_step(span: f64) -> (f64, usize) {
    let raw = span / 8.0;
    if !(raw > 0.0 && raw.is_finite()) {
        return (0.0, 0);
    }
    let power = raw.log10().floor();
    let magnitude = 10f64.powf(power);
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * magnitude)
        .find(|&s| s >= raw)
        .unwrap_or(10.0 * magnitude);
    if !(step > 0.0 && step.is_finite()) {
        return (0.0, 0);
    }
    (step, (-step.log10().floor()).clamp(0.0, 9.0) as usize)
}

/// The index of the last tick of `step` within `span` (0 without a step).
fn tick_count(span: f64, step: f64) -> usize {
    if step > 0.0 {
        // A hair of slack keeps a tick that lands on the end despite rounding.
        (span / step * (1.0 + 1e-9)).floor().min(20.0) as usize
    } else {
        0
    }
}

/// The legend's swatches and texts.
fn legend_items() -> [(String, &'static str); 6] {
    let rect = |fill: &str| {
        format!(
            "<rect class=\"legend-swatch\" width=\"18\" height=\"12\" fill=\"{fill}\" \
             stroke=\"#333\" stroke-width=\"0.5\"/>"
        )
    };
    let line = |colour: &str, dash: &str, id: &str| {
        format!(
            "<line x1=\"0\" y1=\"6\" x2=\"18\" y2=\"6\" stroke=\"{colour}\"{dash} \
             marker-end=\"url(#arrow-{id})\"/>"
        )
    };
    [
        (rect(FORWARD_FILL), "forward"),
        (rect(BACKWARD_FILL), "backward"),
        (rect("url(#hatch-f)"), "collectives"),
        (rect(UPDATE_FILL), "update + dp reductions"),
        (line(FORWARD_ARROW, "", "f"), "activation"),
        (
            line(BACKWARD_ARROW, " stroke-dasharray=\"4 3\"", "b"),
            "gradient",
        ),
    ]
}

/// The hatch patterns and arrow heads.
const DEFS: &str = "<defs>
<pattern id=\"hatch-f\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" patternTransform=\"rotate(45)\"><line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"6\" stroke=\"#333\" stroke-width=\"2\"/></pattern>
<pattern id=\"hatch-b\" width=\"6\" height=\"6\" patternUnits=\"userSpaceOnUse\" patternTransform=\"rotate(45)\"><line x1=\"0\" y1=\"0\" x2=\"0\" y2=\"6\" stroke=\"#fff\" stroke-width=\"2\"/></pattern>
<marker id=\"arrow-f\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"6\" markerHeight=\"6\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#e6550d\"/></marker>
<marker id=\"arrow-b\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"6\" markerHeight=\"6\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#756bb1\"/></marker>
</defs>
";

/// `s` escaped for XML text and attribute values; control characters XML forbids become spaces.
fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// The timeline of `plan`'s pipeline, timed by its cost model.
pub fn of_plan(plan: &crate::plan::Plan) -> Result<String, TimelineError> {
    let pl = plan.pipeline.as_ref().ok_or(TimelineError::NoPipeline)?;
    let s = &pl.summary;
    let durations = crate::pipeline::summary::durations(&s.per_stage, &s.messages, &plan.device);
    let timeline = crate::pipeline::schedule::simulate(&pl.actions, &durations)
        .map_err(|e| TimelineError::Schedule(e.to_string()))?;
    let block = plan.global.pipeline().map_or("", |p| p.block.as_str());
    let info = TimelineInfo {
        title: format!(
            "{} on {}: {}, {} microbatches",
            super::file_name(&plan.global.source),
            plan.mesh,
            pl.schedule,
            pl.microbatches
        ),
        stage_labels: s
            .per_stage
            .iter()
            .map(|st| {
                let (a, b) = st.instances;
                format!("stage {}: {block}.{a}–{}", st.stage, b.saturating_sub(1))
            })
            .collect(),
        forward_collective_s: s.per_stage.iter().map(|st| st.collective_s.0).collect(),
        backward_collective_s: s.per_stage.iter().map(|st| st.collective_s.1).collect(),
        step: s.per_stage.iter().map(|st| st.step_s).collect(),
    };
    svg(&pl.actions, &timeline, &info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_control_characters() {
        assert_eq!(escape("a<b>&\"c'\u{1}"), "a&lt;b&gt;&amp;&quot;c&apos; ");
    }

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(10.0), (2.0, 0));
        let (step, decimals) = tick_step(0.7);
        assert!((step - 0.1).abs() < 1e-12 && decimals == 1);
        assert_eq!(tick_step(0.0), (0.0, 0));
        assert_eq!(tick_count(10.0, 2.0), 5);
        assert_eq!(tick_count(0.0, 0.0), 0);
    }

    #[test]
    fn small_spans_use_microseconds() {
        assert_eq!(Unit::for_span(5e-4).show(1.5e-4), "150.00 µs");
        assert_eq!(Unit::for_span(2.0).show(1.2e-3), "1.20 ms");
    }
}
