//! `tpc compile --auto`: the placements it finds, against the hand-written plans (Megatron, data
//! parallelism) and, on small programs, against every annotation enumerated here by writing it
//! into the source (independently of the search's own candidate code).

mod cli_support;

use cli_support::*;
use tpc::auto::{self, Cost, Mode, Request};
use tpc::diag::SourceFile;
use tpc::driver;
use tpc::mesh::{Device, Mesh};

/// The `# auto:` rows of a text plan: (name, spec, how).
fn rows(text: &str) -> Vec<(String, String, String)> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# auto: "))
        .filter_map(|l| {
            let rest = l
                .strip_prefix("param ")
                .or_else(|| l.strip_prefix("input "))?;
            let (name, rest) = rest.split_once(" @ ")?;
            let (spec, how) = rest.trim_end().rsplit_once("  ")?;
            Some((name.trim().into(), spec.trim().into(), how.trim().into()))
        })
        .collect()
}

/// The spec `--auto` gave the declaration `name`.
#[track_caller]
fn spec_of(text: &str, name: &str) -> String {
    rows(text)
        .into_iter()
        .find(|(n, _, _)| n == name)
        .unwrap_or_else(|| panic!("no row for {name} in:\n{text}"))
        .1
}

/// The plan's summary lines (collectives, flops, memory, step time, phases), not its value
/// numbers.
fn summary(text: &str) -> Vec<String> {
    let heads = [
        "# collectives per device",
        "# flops per device",
        "# estimated step time",
        "# forward collectives",
        "# backward collectives",
        "# update collectives",
        "# memory per device",
    ];
    text.lines()
        .filter(|l| heads.iter().any(|h| l.starts_with(h)))
        .map(String::from)
        .collect()
}

/// `tpc compile args...` that must succeed; its stdout.
#[track_caller]
fn compile_ok(args: &[&str]) -> String {
    let o = tpc(args);
    assert_exit(&o, 0);
    stdout(&o)
}

/// A copy of `example` in a scratch dir with every `@ [...]` taken out and `mesh` set to
/// `mesh_line`, plus `extra` edits: the unannotated program.
fn stripped(dir: &std::path::Path, example_name: &str, mesh_line: &str) -> String {
    let text = std::fs::read_to_string(example(example_name)).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let line = match line.find(" @ [") {
            Some(i) => {
                let close = line[i..].find(']').unwrap() + i + 1;
                format!("{}{}", &line[..i], &line[close..])
            }
            None => line.to_string(),
        };
        let line = if line.starts_with("mesh ") {
            mesh_line.to_string()
        } else {
            line
        };
        out.push_str(&line);
        out.push('\n');
    }
    let path = dir.join(example_name);
    std::fs::write(&path, out).unwrap();
    path.display().to_string()
}

/// Megatron's layer: Q, K, V and the MLP's first matmul split by columns, the two output
/// projections by rows.
#[track_caller]
fn assert_megatron(text: &str, prefix: &str, axis: &str) {
    for w in ["attention.wq", "attention.wk", "attention.wv", "mlp.w1"] {
        assert_eq!(
            spec_of(text, &format!("{prefix}{w}")),
            format!("[_, {axis}]"),
            "{w}"
        );
    }
    for w in ["attention.wo", "mlp.w2"] {
        assert_eq!(
            spec_of(text, &format!("{prefix}{w}")),
            format!("[{axis}, _]"),
            "{w}"
        );
    }
}

#[test]
fn a_budget_that_forbids_replicated_weights_finds_megatron_on_gpt_layer() {
    // Replicated, gpt_layer's weights take 196 KiB per device; Megatron's plan peaks at 49.7.
    // The file has no annotation left: the plan is found, not given.
    let dir = scratch("layer_megatron");
    let file = stripped(&dir, "gpt_layer.tpl", "mesh tp");
    assert!(!std::fs::read_to_string(&file).unwrap().contains("@ ["));
    let text = compile_ok(&[
        "compile",
        &file,
        "--degree",
        "8",
        "--auto",
        "--memory-budget",
        "64KiB",
    ]);
    assert_megatron(&text, "layer.", "tp");
    assert!(
        text.contains("all_gather 0 (0 B), all_reduce 2 (28.0 KiB), all_to_all 0 (0 B), reduce_scatter 0 (0 B)"),
        "{text}"
    );
    // The same cost as the hand-annotated example (whose annotations --auto ignored).
    let hand = compile_ok(&["compile", "examples/gpt_layer.tpl", "--degree", "8"]);
    assert_eq!(summary(&text), summary(&hand));
}

#[test]
fn a_trained_gpt_finds_megatron_with_four_all_reduces_per_layer() {
    let dir = scratch("trained_megatron");
    let file = stripped(&dir, "gpt_train.tpl", "mesh tp");
    let text = compile_ok(&[
        "compile",
        &file,
        "--degree",
        "8",
        "--auto",
        "--memory-budget",
        "600KiB",
    ]);
    assert_megatron(&text, "layer.*.", "tp");
    let hand = compile_ok(&["compile", "examples/gpt_train.tpl", "--degree", "8"]);
    assert_eq!(summary(&text), summary(&hand));
    // Per layer 2 all-reduces forward and 2 backward, plus the vocab-parallel embedding's and
    // loss's: the hand plan's count, phase by phase.
    let phase = |t: &str, p: &str| {
        t.lines()
            .find(|l| l.starts_with(&format!("# {p} collectives per device:")))
            .map(String::from)
    };
    assert_eq!(phase(&text, "forward"), phase(&hand, "forward"));
    assert_eq!(phase(&text, "backward"), phase(&hand, "backward"));
}

#[test]
fn ample_memory_on_dp8_is_pure_data_parallelism() {
    // A batch large enough that splitting it beats the gradients' all-reduce.
    let text = compile_ok(&[
        "compile",
        "examples/gpt_train.tpl",
        "--mesh",
        "dp=8",
        "--set",
        "B=512",
        "--set",
        "S=64",
        "--auto",
    ]);
    assert_eq!(spec_of(&text, "tokens"), "[dp, _]");
    for (name, spec, how) in rows(&text) {
        if name != "tokens" {
            assert!(!spec.contains("dp"), "{name} @ {spec} ({how})");
        }
    }
    assert!(text.contains("all_gather 0 (0 B)"), "{text}");
    assert!(text.contains("all_to_all 0 (0 B)"), "{text}");
    assert!(text.contains("reduce_scatter 0 (0 B)"), "{text}");
    // The forward's only collective is the loss's scalar mean.
    assert!(
        text.contains("# forward collectives per device: all_reduce 1 (7 B)"),
        "{text}"
    );
}

#[test]
fn a_tight_budget_on_dp2_tp4_splits_the_batch_over_dp_and_megatron_over_tp() {
    let dir = scratch("dp_tp");
    let file = stripped(&dir, "gpt_train.tpl", "mesh tp");
    let text = compile_ok(&[
        "compile",
        &file,
        "--mesh",
        "dp=2,tp=4",
        "--auto",
        "--memory-budget",
        "800KiB",
    ]);
    assert_eq!(spec_of(&text, "tokens"), "[dp, _]");
    assert_megatron(&text, "layer.*.", "tp");
    assert_eq!(spec_of(&text, "wte"), "[tp, _]");
}

#[test]
fn a_budget_nothing_meets_is_an_error_naming_the_smallest_peak() {
    let o = tpc(&[
        "compile",
        "examples/mlp.tpl",
        "--degree",
        "8",
        "--auto",
        "--memory-budget",
        "1MiB",
    ]);
    assert_exit(&o, 1);
    assert_stderr_has(
        &o,
        "no placement fits the memory budget of 1.0 MiB per device",
    );
    assert_stderr_has(&o, "the smallest peak memory found is 10.0 MiB");
    assert!(stdout(&o).is_empty());
}

#[test]
fn the_annotated_source_compiles_to_the_plan_found() {
    let dir = scratch("annotated");
    let src = dir.join("m.tpl");
    std::fs::copy(example("gpt_train.tpl"), &src).unwrap();
    let args = ["--mesh", "dp=2,tp=4", "--auto", "--memory-budget", "800KiB"];
    let mut auto_args = vec!["compile", "m.tpl"];
    auto_args.extend(args);
    let o = tpc_in(&dir, &auto_args);
    assert_exit(&o, 0);
    let found: String = stdout(&o)
        .lines()
        .filter(|l| !l.starts_with("# auto:"))
        .map(|l| format!("{l}\n"))
        .collect();
    auto_args.extend(["--emit", "annotated", "-o", "out/m.tpl"]);
    std::fs::create_dir_all(dir.join("out")).unwrap();
    assert_exit(&tpc_in(&dir, &auto_args), 0);
    let written = std::fs::read_to_string(dir.join("out/m.tpl")).unwrap();
    assert!(written.contains("mesh tp, dp"), "{written}");
    assert!(
        written.contains("input tokens : i32[B, S] @ [dp, _]"),
        "{written}"
    );
    let o = tpc_in(
        &dir.join("out"),
        &["compile", "m.tpl", "--mesh", "dp=2,tp=4"],
    );
    assert_exit(&o, 0);
    assert_eq!(stdout(&o), found);
}

#[test]
fn the_plan_found_computes_the_unsharded_program() {
    let dir = scratch("run_check");
    let out = dir.join("layer.auto.tpl");
    let o = tpc(&[
        "compile",
        "examples/gpt_layer.tpl",
        "--degree",
        "8",
        "--auto",
        "--memory-budget",
        "64KiB",
        "--emit",
        "annotated",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_exit(&o, 0);
    let o = tpc(&["run", out.to_str().unwrap(), "--degree", "8", "--check"]);
    assert_exit(&o, 0);
    assert_stdout_has(&o, "ok");
}

#[test]
fn auto_complete_keeps_the_written_annotations() {
    let text = compile_ok(&[
        "compile",
        "examples/gpt_layer.tpl",
        "--degree",
        "8",
        "--auto=complete",
    ]);
    let r = rows(&text);
    let how = |n: &str| {
        r.iter()
            .find(|x| x.0 == n)
            .map(|x| (x.1.clone(), x.2.clone()))
    };
    assert_eq!(
        how("layer.attention.wq"),
        Some(("[_, tp]".into(), "kept".into()))
    );
    assert_eq!(how("layer.mlp.w2"), Some(("[tp, _]".into(), "kept".into())));
    assert_eq!(how("x").map(|x| x.1), Some("chosen".into()));
    assert_eq!(
        how("layer.attention.bo").map(|x| x.1),
        Some("chosen".into())
    );
}

#[test]
fn json_output_carries_the_table() {
    let text = compile_ok(&[
        "compile",
        "examples/mlp.tpl",
        "--degree",
        "8",
        "--auto",
        "--memory-budget",
        "16MiB",
        "--emit",
        "json",
    ]);
    let doc: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let auto = &doc["auto"];
    assert_eq!(auto["exhaustive"], true);
    let specs: Vec<(String, String)> = auto["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().into(),
                r["spec"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        specs.contains(&("w1".into(), "[_, tp]".into())),
        "{specs:?}"
    );
    assert!(
        specs.contains(&("w2".into(), "[tp, _]".into())),
        "{specs:?}"
    );
    assert!(
        doc["summary"].is_object() || doc.get("summary").is_some(),
        "{text}"
    );
}

#[test]
fn bad_flags_are_clear_errors() {
    let cases: [(&[&str], &str); 4] = [
        (
            &["--degree", "8", "--auto", "--memory-budget", "16XB"],
            "`16XB`: unknown unit `XB`",
        ),
        (&["--degree", "8", "--memory-budget", "16GiB"], "--auto"),
        (&["--auto"], "--auto chooses placements over a mesh"),
        (
            &["--degree", "8", "--emit", "annotated"],
            "--emit annotated",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["compile", "examples/mlp.tpl"];
        all.extend(args);
        let o = tpc(&all);
        assert_ne!(o.status.code(), Some(0), "{args:?}");
        assert_stderr_has(&o, needle);
        assert_clean(&stderr(&o));
    }
}

#[test]
fn an_unknown_axis_in_a_kept_annotation_is_the_usual_error() {
    let dir = scratch("bad_axis");
    let src = dir.join("m.tpl");
    let text = std::fs::read_to_string(example("mlp.tpl"))
        .unwrap()
        .replace("@ [_, tp]        # column", "@ [_, xx]        # column");
    std::fs::write(&src, text).unwrap();
    let o = tpc(&["compile", src.to_str().unwrap(), "--degree", "8", "--auto"]);
    assert_exit(&o, 1);
    assert_stderr_has(&o, "m.tpl:6:");
}

// ---- Exhaustive check: the search against every annotation, enumerated here. ----

/// A small program: its text with `{0}`, `{1}`... where each declaration's annotation goes,
/// and per declaration its shape.
struct Model {
    text: &'static str,
    shapes: &'static [&'static [u64]],
}

/// A forward MLP: 4 params and 1 input.
const MLP: Model = Model {
    text: "mesh tp\ndim B = 16, H = 64\ninput x : f32[B, H]{0}\nparam w1 : f32[H, 4*H]{1}\n\
           param b1 : f32[4*H]{2}\nparam w2 : f32[4*H, H]{3}\nparam b2 : f32[H]{4}\n\
           y = gelu(x @ w1 + b1) @ w2 + b2\noutput y\n",
    shapes: &[&[16, 64], &[64, 256], &[256], &[256, 64], &[64]],
};

/// A trained two-matmul classifier: 3 params, 2 inputs.
const TRAINED: Model = Model {
    text: "mesh tp\ndim B = 16, H = 32, V = 64\ninput x : f32[B, H]{0}\ninput t : i32[B]{1}\n\
           param w1 : f32[H, 4*H]{2}\nparam b1 : f32[4*H]{3}\nparam w2 : f32[4*H, V]{4}\n\
           loss = cross_entropy(gelu(x @ w1 + b1) @ w2, t)\ntrain loss with adamw(lr=0.01)\n",
    shapes: &[&[16, 32], &[16], &[32, 128], &[128], &[128, 64]],
};

/// Six chained matmuls: 6 params, 1 input.
const CHAIN: Model = Model {
    text: "mesh tp\ndim B = 8, H = 64\ninput x : f32[B, H]{0}\nparam w1 : f32[H, H]{1}\n\
           param w2 : f32[H, H]{2}\nparam w3 : f32[H, H]{3}\nparam w4 : f32[H, H]{4}\n\
           param w5 : f32[H, H]{5}\nparam w6 : f32[H, H]{6}\n\
           y = gelu(gelu(gelu(gelu(gelu(x @ w1) @ w2) @ w3) @ w4) @ w5) @ w6\noutput y\n",
    shapes: &[
        &[8, 64],
        &[64, 64],
        &[64, 64],
        &[64, 64],
        &[64, 64],
        &[64, 64],
        &[64, 64],
    ],
};

/// Every spec of a tensor of `shape` on the 1-D mesh `tp` of size `n`.
fn specs(shape: &[u64], n: u64) -> Vec<String> {
    let mut out = vec![format!("[{}]", vec!["_"; shape.len()].join(", "))];
    for d in 0..shape.len() {
        if shape[d].is_multiple_of(n) {
            let dims: Vec<&str> = (0..shape.len())
                .map(|i| if i == d { "tp" } else { "_" })
                .collect();
            out.push(format!("[{}]", dims.join(", ")));
        }
    }
    out
}

/// `model`'s text with `annots` written in.
fn fill(model: &Model, annots: &[String]) -> String {
    let mut t = model.text.to_string();
    for (i, a) in annots.iter().enumerate() {
        t = t.replace(&format!("{{{i}}}"), &format!(" @ {a}"));
    }
    t
}

/// The cost of `text` compiled as the command line does, on tp=`n`.
fn cost_of(text: &str, n: u64) -> Cost {
    let src = SourceFile::new("m.tpl", text.to_string());
    let g = driver::compile_step_scaled(&src, &[], false, None)
        .unwrap()
        .graph;
    let plan = driver::plan_declared(
        g,
        Some(Mesh::degree(n).unwrap()),
        Device::default(),
        &tpc::plan::Options::default(),
    )
    .unwrap();
    Cost::of(&plan)
}

/// Every annotation of `model` and its cost.
fn enumerate(model: &Model, n: u64) -> Vec<Cost> {
    let options: Vec<Vec<String>> = model.shapes.iter().map(|s| specs(s, n)).collect();
    let mut idx = vec![0usize; options.len()];
    let mut out = Vec::new();
    'all: loop {
        let annots: Vec<String> = idx
            .iter()
            .zip(&options)
            .map(|(&i, o)| o[i].clone())
            .collect();
        out.push(cost_of(&fill(model, &annots), n));
        for (i, o) in idx.iter_mut().zip(&options) {
            *i += 1;
            if *i < o.len() {
                continue 'all;
            }
            *i = 0;
        }
        break;
    }
    out
}

/// The best of `all` under `budget`: the fastest that fits (then the smallest), `None` when
/// none fits.
fn best(all: &[Cost], budget: Option<u64>) -> Option<Cost> {
    all.iter()
        .filter(|c| budget.is_none_or(|b| c.peak <= b as f64))
        .copied()
        .min_by(|a, b| (a.time, a.peak).partial_cmp(&(b.time, b.peak)).unwrap())
}

/// `--auto` on `model` (with no annotations written) under `budget`.
fn search(model: &Model, n: u64, budget: Option<u64>) -> Result<Cost, String> {
    let text = fill(model, &vec![String::new(); model.shapes.len()]).replace(" @ \n", "\n");
    let text = (0..model.shapes.len()).fold(text, |t, i| t.replace(&format!("{{{i}}}"), ""));
    let req = Request {
        source: SourceFile::new("m.tpl", text),
        overrides: Vec::new(),
        mode: Mode::Ignore,
        budget,
        mesh: Mesh::degree(n).unwrap(),
        device: Device::default(),
        plan: tpc::plan::Options::default(),
        outputs: Some(tpc::autodiff::StepOutputs {
            gradients: false,
            update: true,
        }),
        scale: None,
    };
    match auto::search(&req) {
        Ok(f) => {
            assert!(matches!(f.method, auto::Method::Exhaustive { .. }));
            Ok(Cost::of(&f.plan))
        }
        Err(e) => Err(e.render(None)),
    }
}

/// On `model`, for budgets from unlimited down to below the smallest peak, `--auto` finds
/// the best of every annotation, or says none fits.
fn check_exhaustive(model: &Model, n: u64) {
    let all = enumerate(model, n);
    let mut peaks: Vec<u64> = all.iter().map(|c| c.peak as u64).collect();
    peaks.sort_unstable();
    peaks.dedup();
    let fastest = best(&all, None).unwrap();
    let budgets = [
        None,
        Some(fastest.peak as u64 - 1),
        Some(peaks[peaks.len() / 2]),
        Some(peaks[0]),
        Some(peaks[0] - 1),
    ];
    for budget in budgets {
        match (best(&all, budget), search(model, n, budget)) {
            (Some(want), Ok(got)) => assert_eq!(got, want, "budget {budget:?}"),
            (None, Err(e)) => assert!(e.contains("no placement fits"), "{e}"),
            (want, got) => panic!("budget {budget:?}: enumerated {want:?}, --auto {got:?}"),
        }
    }
}

#[test]
fn exhaustive_equals_every_annotation_enumerated_on_an_mlp() {
    check_exhaustive(&MLP, 8);
}

#[test]
fn exhaustive_equals_every_annotation_enumerated_on_a_trained_model() {
    check_exhaustive(&TRAINED, 4);
}

#[test]
fn exhaustive_equals_every_annotation_enumerated_on_six_params() {
    check_exhaustive(&CHAIN, 8);
}

#[test]
fn a_pipelined_program_finds_the_hand_plan_on_dp_pp_tp() {
    // The pipeline's cut (`@ pp`) is structure, not a placement: --auto keeps it and places the
    // weights and the batch over dp and tp. The hand plan's stages peak at 1.0 MiB.
    let args = [
        "compile",
        "examples/gpt_pipe.tpl",
        "--mesh",
        "dp=2,pp=2,tp=2",
    ];
    let hand = compile_ok(&args);
    let mut auto_args = args.to_vec();
    auto_args.extend(["--auto", "--memory-budget", "1100KiB"]);
    let text = compile_ok(&auto_args);
    assert_eq!(spec_of(&text, "tokens"), "[dp, _]");
    assert_megatron(&text, "layer.*.", "tp");
    let step = |t: &str| {
        t.lines()
            .find(|l| l.starts_with("# pipeline step time"))
            .map(String::from)
    };
    assert!(step(&text).is_some());
    assert_eq!(step(&text), step(&hand));
}

/// A snapshot in `snapshots/`.
fn snapshot(name: &str, text: &str) {
    insta::with_settings!({ snapshot_path => "../snapshots", prepend_module_to_snapshot => false }, {
        insta::assert_snapshot!(name, text);
    });
}

#[test]
fn snapshots_of_the_table_the_annotated_source_and_the_budget_error() {
    let args = [
        "compile",
        "examples/gpt_layer.tpl",
        "--degree",
        "8",
        "--auto",
    ];
    let mut table_args = args.to_vec();
    table_args.extend(["--memory-budget", "64KiB"]);
    let table: String = compile_ok(&table_args)
        .lines()
        .filter(|l| l.starts_with("# auto:"))
        .map(|l| format!("{l}\n"))
        .collect();
    snapshot("auto_gpt_layer_table", &table);
    let mut annotated = table_args.clone();
    annotated.extend(["--emit", "annotated"]);
    snapshot("auto_gpt_layer_annotated", &compile_ok(&annotated));
    let mut tight = args.to_vec();
    tight.extend(["--memory-budget", "4KiB"]);
    let o = tpc(&tight);
    assert_exit(&o, 1);
    snapshot("error_auto_budget", &stderr(&o));
}

/// The estimated step time in seconds and the peak bytes of `tpc compile args --emit json`.
fn time_and_peak(args: &[&str]) -> (f64, u64) {
    let mut all = args.to_vec();
    all.extend(["--emit", "json"]);
    let doc: serde_json::Value = serde_json::from_str(&compile_ok(&all)).unwrap();
    let s = &doc["summary"];
    (
        s["estimated_time_s"].as_f64().unwrap(),
        s["peak_memory_bytes_per_device"].as_u64().unwrap(),
    )
}

#[test]
fn never_slower_than_the_examples_own_annotations_within_their_peak() {
    for (example_name, mesh) in [
        ("mlp_2d.tpl", "dp=2,tp=4"),
        ("gpt.tpl", "tp=2"),
        ("gpt.tpl", "tp=8"),
        ("attention.tpl", "tp=8"),
        ("gpt_layer.tpl", "tp=4"),
    ] {
        let file = example(example_name);
        let args = ["compile", file.as_str(), "--mesh", mesh];
        let (hand_time, hand_peak) = time_and_peak(&args);
        let budget = hand_peak.to_string();
        let mut auto_args = args.to_vec();
        auto_args.extend(["--auto", "--memory-budget", budget.as_str()]);
        let (time, peak) = time_and_peak(&auto_args);
        assert!(
            peak <= hand_peak,
            "{example_name} on {mesh}: {peak} > {hand_peak}"
        );
        assert!(
            time <= hand_time * (1.0 + 1e-12),
            "{example_name} on {mesh}: {time} s against the hand plan's {hand_time} s"
        );
    }
}

#[test]
fn a_looser_budget_never_gives_a_slower_plan() {
    // gpt_layer unannotated at degree 8: from Megatron (49.7 KiB) up to everything replicated
    // (267 KiB), through plans that replicate part of the layer.
    let dir = scratch("monotone");
    let file = stripped(&dir, "gpt_layer.tpl", "mesh tp");
    let mut last = f64::INFINITY;
    for kib in [50, 100, 120, 140, 190, 230, 270] {
        let budget = format!("{kib}KiB");
        let args = [
            "compile",
            file.as_str(),
            "--degree",
            "8",
            "--auto",
            "--memory-budget",
            budget.as_str(),
        ];
        let (time, peak) = time_and_peak(&args);
        assert!(peak <= kib * 1024, "{budget}: peak {peak}");
        assert!(
            time <= last,
            "{budget}: {time} s after {last} s under a tighter budget"
        );
        last = time;
    }
}
