//! The pipeline timeline SVG: well-formed for both schedules over several sizes, one group per
//! stage, one box per pass, one arrow per message, tooltips carrying the given durations, text
//! escaped, inconsistent input refused, and a snapshot of a small picture.

use roxmltree::{Document, Node};
use tpc::emit::timeline::{svg, TimelineError, TimelineInfo};
use tpc::pipeline::schedule::{
    actions, bubble_fraction, simulate, Action, Durations, ScheduleKind, Timeline,
};

const SVG_NS: &str = "http://www.w3.org/2000/svg";

/// Seconds of stage `s`'s forward: distinct per stage so tooltips can be told apart.
fn forward(s: usize) -> f64 {
    1e-3 * (1.0 + 0.25 * s as f64)
}

/// A schedule, its timeline and an info with collectives and an update on every stage.
fn build(kind: ScheduleKind, p: u32, m: u32) -> (Vec<Vec<Action>>, Timeline, TimelineInfo) {
    let list = actions(kind, p, m).unwrap();
    let n = p as usize;
    let durations = Durations {
        forward: (0..n).map(forward).collect(),
        backward: (0..n).map(|s| 2.0 * forward(s)).collect(),
        p2p: 1e-4,
    };
    let line = simulate(&list, &durations).unwrap();
    let info = TimelineInfo {
        title: format!("test: {kind}, {m} microbatches"),
        stage_labels: (0..n).map(|s| format!("stage {s}")).collect(),
        forward_collective_s: vec![2e-4; n],
        backward_collective_s: vec![4e-4; n],
        step: vec![5e-4; n],
    };
    (list, line, info)
}

/// Elements with `class`.
fn with_class<'a, 'i>(doc: &'a Document<'i>, class: &str) -> Vec<Node<'a, 'i>> {
    doc.descendants()
        .filter(|n| n.is_element() && n.attribute("class") == Some(class))
        .collect()
}

/// The text of an element's `<title>` child, if it has one.
fn title(n: Node) -> Option<String> {
    n.children()
        .find(|c| c.tag_name().name() == "title")
        .and_then(|t| t.text())
        .map(str::to_string)
}

/// The stage of the `g.stage` enclosing `n`.
fn stage_of(n: Node) -> usize {
    n.ancestors()
        .find(|a| a.attribute("class") == Some("stage"))
        .and_then(|a| a.attribute("data-stage"))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn every_size_draws_each_pass_and_message_once() {
    for kind in [ScheduleKind::OneFOneB, ScheduleKind::GPipe] {
        for p in [1u32, 2, 4] {
            for m in [1u32, 2, 4, 8] {
                let (list, line, info) = build(kind, p, m);
                let text = svg(&list, &line, &info).unwrap();
                let doc = Document::parse(&text)
                    .unwrap_or_else(|e| panic!("{kind} p={p} M={m}: {e}\n{text}"));
                check_document(&doc, &line, p as usize, m as usize);
            }
        }
    }
}

/// The counts and tooltips of one picture.
fn check_document(doc: &Document, line: &Timeline, p: usize, m: usize) {
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(root.tag_name().namespace(), Some(SVG_NS));
    for attr in ["width", "height", "viewBox"] {
        assert!(root.attribute(attr).is_some(), "no {attr}");
    }
    let stages = with_class(doc, "stage");
    assert_eq!(stages.len(), p);
    for (s, g) in stages.iter().enumerate() {
        assert_eq!(g.tag_name().name(), "g");
        assert_eq!(g.attribute("data-stage"), Some(s.to_string().as_str()));
    }
    assert_eq!(with_class(doc, "f").len(), p * m);
    assert_eq!(with_class(doc, "b").len(), p * m);
    assert_eq!(with_class(doc, "u").len(), p);
    assert_eq!(with_class(doc, "send-f").len(), (p - 1) * m);
    assert_eq!(with_class(doc, "send-b").len(), (p - 1) * m);
    for arrow in with_class(doc, "send-f")
        .iter()
        .chain(&with_class(doc, "send-b"))
    {
        assert!(arrow.attribute("marker-end").is_some());
        assert!(title(*arrow).is_some());
    }
    check_tooltips(doc, "f", m, |s| (forward(s), "0.20 ms"));
    check_tooltips(doc, "b", m, |s| (2.0 * forward(s), "0.40 ms"));
    let heading = title(doc.root_element()).unwrap();
    let bubble = format!("bubble {:.1}%", 100.0 * bubble_fraction(line));
    assert!(heading.contains(&bubble), "{heading} lacks {bubble}");
}

/// Each box of `class` has a tooltip naming its pass, stage, duration and collective time, and
/// each stage has one box per microbatch.
fn check_tooltips(
    doc: &Document,
    class: &str,
    m: usize,
    expect: impl Fn(usize) -> (f64, &'static str),
) {
    let letter = class.to_uppercase();
    let mut seen = vec![
        Vec::new();
        doc.descendants()
            .filter(|n| n.attribute("class") == Some("stage"))
            .count()
    ];
    for node in with_class(doc, class) {
        let s = stage_of(node);
        let tip = title(node).unwrap_or_else(|| panic!("a {class} box without a title"));
        let (seconds, collective) = expect(s);
        let rest = tip.strip_prefix(&letter).unwrap();
        let (mb, rest) = rest.split_once(' ').unwrap();
        seen[s].push(mb.parse::<usize>().unwrap());
        let duration = format!(
            "on stage {s}: {:.2} ms (collectives {collective})",
            seconds * 1e3
        );
        assert!(
            rest.starts_with(&duration),
            "{tip} does not start with {letter}{mb} {duration}"
        );
    }
    for mut mbs in seen {
        mbs.sort_unstable();
        assert_eq!(mbs, (0..m).collect::<Vec<_>>());
    }
}

#[test]
fn labels_and_title_are_escaped() {
    let (list, line, mut info) = build(ScheduleKind::OneFOneB, 2, 2);
    info.title = "a <b> & \"c\" 'd'".to_string();
    info.stage_labels = vec!["<&>\"".to_string(), "x'y".to_string()];
    let text = svg(&list, &line, &info).unwrap();
    let doc = Document::parse(&text).unwrap();
    let labels: Vec<_> = with_class(&doc, "label")
        .iter()
        .filter_map(|n| n.text())
        .collect();
    assert_eq!(labels, ["<&>\"", "x'y"]);
    let heading = with_class(&doc, "heading")[0].text().unwrap();
    assert!(heading.starts_with("a <b> & \"c\" 'd' — "), "{heading}");
}

#[test]
fn zero_and_tiny_times_draw() {
    let list = actions(ScheduleKind::GPipe, 2, 2).unwrap();
    let zero = simulate(&list, &Durations::uniform(2, 0.0, 0.0, 0.0)).unwrap();
    let mut info = build(ScheduleKind::GPipe, 2, 2).2;
    info.forward_collective_s = vec![0.0; 2];
    info.backward_collective_s = vec![0.0; 2];
    info.step = vec![0.0; 2];
    let doc_text = svg(&list, &zero, &info).unwrap();
    let doc = Document::parse(&doc_text).unwrap();
    assert_eq!(with_class(&doc, "u").len(), 0);
    let tiny = simulate(&list, &Durations::uniform(2, 1e-6, 2e-6, 0.0)).unwrap();
    let text = svg(&list, &tiny, &info).unwrap();
    assert!(text.contains("time (µs)"));
    Document::parse(&text).unwrap();
}

#[test]
fn inconsistent_input_is_refused() {
    let (list, line, info) = build(ScheduleKind::OneFOneB, 2, 2);
    let refuse = |list: &[Vec<Action>], line: &Timeline, info: &TimelineInfo| {
        svg(list, line, info).expect_err("inconsistent input was drawn")
    };
    let mut bad = info.clone();
    bad.stage_labels.pop();
    assert!(matches!(
        refuse(&list, &line, &bad),
        TimelineError::Count {
            what: "stage_labels",
            ..
        }
    ));
    let mut bad = info.clone();
    bad.step[1] = f64::NAN;
    assert!(matches!(
        refuse(&list, &line, &bad),
        TimelineError::Number { .. }
    ));
    let mut bad = info.clone();
    bad.forward_collective_s[0] = -1.0;
    assert!(matches!(
        refuse(&list, &line, &bad),
        TimelineError::Number { .. }
    ));
    let mut bad = info.clone();
    bad.backward_collective_s.push(0.0);
    assert!(matches!(
        refuse(&list, &line, &bad),
        TimelineError::Count { .. }
    ));
    assert!(matches!(
        refuse(&list[..1], &line, &info),
        TimelineError::Count {
            what: "actions",
            ..
        }
    ));
    refuse_bad_timelines(&list, &line, &info);
}

/// Timelines whose slots or arrows do not fit the schedule.
fn refuse_bad_timelines(list: &[Vec<Action>], line: &Timeline, info: &TimelineInfo) {
    let mut bad = line.clone();
    bad.stages[0][0].action = 999;
    assert!(matches!(
        svg(list, &bad, info),
        Err(TimelineError::Slot {
            stage: 0,
            slot: 0,
            ..
        })
    ));
    let mut bad = line.clone();
    let send = list[0]
        .iter()
        .position(|a| matches!(a, Action::Send { .. }))
        .unwrap();
    bad.stages[0][0].action = send;
    assert!(matches!(
        svg(list, &bad, info),
        Err(TimelineError::Slot { .. })
    ));
    let mut bad = line.clone();
    bad.stages[1][0].end = f64::INFINITY;
    assert!(matches!(
        svg(list, &bad, info),
        Err(TimelineError::Number { .. })
    ));
    let mut bad = line.clone();
    bad.stages[1][0].end = bad.stages[1][0].start - 1.0;
    assert!(svg(list, &bad, info).is_err());
    let mut bad = line.clone();
    bad.arrows[0].to_stage = 7;
    assert!(matches!(
        svg(list, &bad, info),
        Err(TimelineError::Arrow { .. })
    ));
    let mut bad = line.clone();
    bad.makespan = f64::NAN;
    assert!(matches!(
        svg(list, &bad, info),
        Err(TimelineError::Number { .. })
    ));
}

#[test]
fn snapshot_1f1b_two_stages_two_microbatches() {
    let (list, line, mut info) = build(ScheduleKind::OneFOneB, 2, 2);
    info.title = "gpt_pipe.tpl on pp=2: 1F1B, 2 microbatches".to_string();
    info.stage_labels = vec![
        "stage 0: layer.0–1".to_string(),
        "stage 1: layer.2–3".to_string(),
    ];
    let text = svg(&list, &line, &info).unwrap();
    insta::with_settings!({ snapshot_path => "../snapshots", prepend_module_to_snapshot => false }, {
        insta::assert_snapshot!("timeline_1f1b_pp_2_mb_2", text);
    });
}
