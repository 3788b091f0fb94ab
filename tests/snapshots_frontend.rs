//! Snapshots of the front end: the text program and the collapsed DOT of every example, and one
//! rendered diagnostic per class of user error (inputs in `tests/errors/`).
//!
//! Snapshots live in the top-level `snapshots/` folder. Source names are paths relative to the
//! crate root (`examples/mlp.tpl`), so the snapshots do not depend on where the crate is checked
//! out. Review a changed snapshot with `cargo insta review` (or `INSTA_UPDATE=always cargo test`
//! then `git diff snapshots/`).

use std::path::Path;
use tpc::diag::SourceFile;
use tpc::driver::{self, compile_global, Error};
use tpc::emit::dot::{print_with, DotOptions};
use tpc::ir::Graph;

/// Asserts `value` against `snapshots/<name>.snap`.
macro_rules! snapshot {
    ($name:expr, $value:expr) => {
        insta::with_settings!({
            snapshot_path => "../snapshots",
            prepend_module_to_snapshot => false,
            omit_expression => true,
        }, {
            insta::assert_snapshot!($name, $value);
        })
    };
}

/// Reads `rel` (relative to the crate root) as a source file named `rel`.
fn load(rel: &str) -> SourceFile {
    let bytes = std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("cannot read {rel}: {e}"));
    driver::source_from_bytes(rel, bytes).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Compiles `rel` with `overrides`; panics with the rendered error on failure.
fn compile(rel: &str, overrides: &[(&str, i64)]) -> Graph {
    let src = load(rel);
    let ov: Vec<(String, i64)> = overrides.iter().map(|(n, v)| (n.to_string(), *v)).collect();
    compile_global(&src, &ov).unwrap_or_else(|e| panic!("{}", e.render(Some(&src))))
}

fn dot_collapsed(g: &Graph) -> String {
    print_with(
        g,
        DotOptions {
            collapse_repeats: true,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Examples

/// The examples that have snapshot tests below; `every_example_has_snapshots` keeps it complete.
const EXAMPLES: &[&str] = &[
    "attention",
    "gpt",
    "gpt_layer",
    "gpt_pipe",
    "gpt_train",
    "mlp",
    "mlp_2d",
];

fn example_snapshots(name: &str) {
    let rel = format!("examples/{name}.tpl");
    let g = compile(&rel, &[]);
    snapshot!(format!("example_{name}_text"), tpc::emit::text::print(&g));
    let dot = dot_collapsed(&g);
    graphviz_accepts(&dot);
    snapshot!(format!("example_{name}_dot"), dot);
}

/// Runs `dot -Tsvg` on `text` when graphviz is installed; skipped otherwise.
fn graphviz_accepts(text: &str) {
    use std::io::Write as _;
    use std::process::{Command, Stdio};
    let Ok(mut child) = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    else {
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.is_empty(), "{err}");
}

#[test]
fn example_attention() {
    example_snapshots("attention");
}

#[test]
fn example_gpt() {
    example_snapshots("gpt");
}

#[test]
fn example_gpt_layer() {
    example_snapshots("gpt_layer");
}

/// The pipelined GPT: its header names the pipelined repeat (four `layer`s over `pp`).
#[test]
fn example_gpt_pipe() {
    example_snapshots("gpt_pipe");
}

#[test]
fn example_gpt_train() {
    example_snapshots("gpt_train");
}

#[test]
fn example_mlp() {
    example_snapshots("mlp");
}

#[test]
fn example_mlp_2d() {
    example_snapshots("mlp_2d");
}
#[test]
fn example_gpt_l8_dot_collapsed() {
    let g = compile("examples/gpt.tpl", &[("L", 8)]);
    let dot = dot_collapsed(&g);
    assert!(dot.contains("layer.0 … layer.7 (layer) ×8"), "{dot}");
    graphviz_accepts(&dot);
    snapshot!("example_gpt_L8_dot", dot);
}

#[test]
fn every_example_has_snapshots() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "tpl").then(|| p.file_stem().unwrap().to_string_lossy().into())
        })
        .collect();
    found.sort();
    assert_eq!(found, EXAMPLES, "add a snapshot test for each new example");
}

// ---------------------------------------------------------------------------------------------
// Errors

/// Every input of `tests/errors/`, by stem; `every_error_input_is_used` keeps it complete.
const ERROR_INPUTS: &[&str] = &[
    "bad_set",
    "block_arg_type",
    "block_arity",
    "block_result_type",
    "conflicting_spec",
    "deep_parens",
    "dtype_mismatch",
    "duplicate_axis",
    "empty",
    "inexact_division",
    "non_positive_dim",
    "not_utf8",
    "pipeline_axis_in_spec",
    "pipeline_in_block",
    "pipeline_in_expression",
    "pipeline_not_repeat",
    "pipeline_zero_count",
    "rank_mismatch",
    "recursive_block",
    "redefinition",
    "second_pipeline",
    "second_train",
    "shape_mismatch",
    "spec_rank",
    "syntax_error",
    "train_not_scalar",
    "unexpected_eof",
    "unknown_axis",
    "unknown_dtype",
    "unknown_name",
    "unknown_op",
    "unknown_pipeline_axis",
];

/// Compiles `tests/errors/<name>.tpl` (with `overrides`), expects a user error, checks its code
/// and returns the rendering, exactly as `tpc compile` prints it.
fn error_of(name: &str, overrides: &[(&str, i64)], code: &str) -> String {
    let rel = format!("tests/errors/{name}.tpl");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(&rel);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"));
    let ov: Vec<(String, i64)> = overrides.iter().map(|(n, v)| (n.to_string(), *v)).collect();
    let out = match driver::source_from_bytes(&rel, bytes) {
        Err(e) => Error::from(e).render(None),
        Ok(src) => match compile_global(&src, &ov) {
            Ok(_) => panic!("{rel} compiled"),
            Err(e) => {
                assert!(!e.is_internal(), "{rel}: internal error: {e}");
                e.render(Some(&src))
            }
        },
    };
    assert!(
        out.starts_with(&format!("error[{code}]: ")),
        "{rel}: expected error[{code}], got:\n{out}"
    );
    out
}

/// Snapshot `snapshots/error_<name>.snap` of the error of `tests/errors/<name>.tpl`.
fn error_snapshot(name: &str, code: &str) -> String {
    let out = error_of(name, &[], code);
    snapshot!(format!("error_{name}"), out.clone());
    out
}

/// The `-->` location line of a rendering: `file:line:col`.
fn location(out: &str) -> &str {
    out.lines()
        .find_map(|l| l.trim_start().strip_prefix("--> "))
        .unwrap_or_else(|| panic!("no location in:\n{out}"))
}

#[test]
fn error_syntax() {
    let out = error_snapshot("syntax_error", "syntax");
    assert_eq!(location(&out), "tests/errors/syntax_error.tpl:4:9");
}

#[test]
fn error_unexpected_end_of_input() {
    let out = error_snapshot("unexpected_eof", "syntax");
    assert!(out.contains("unexpected end of input"), "{out}");
}

#[test]
fn error_unknown_name_with_suggestion() {
    let out = error_snapshot("unknown_name", "unknown_name");
    assert!(out.contains("did you mean `hidden`?"), "{out}");
}

/// The `-->` line names the earlier label (the first definition) instead of the offending one:
/// the three two-label errors below are snapshotted with the location they should have.
#[test]

fn error_redefinition() {
    let out = error_snapshot("redefinition", "redefinition");
    assert_eq!(location(&out), "tests/errors/redefinition.tpl:5:7");
}

#[test]

fn error_duplicate_axis() {
    let out = error_snapshot("duplicate_axis", "duplicate_axis");
    assert_eq!(location(&out), "tests/errors/duplicate_axis.tpl:4:28");
}

#[test]

fn error_conflicting_annotations() {
    let out = error_snapshot("conflicting_spec", "conflicting_spec");
    assert_eq!(location(&out), "tests/errors/conflicting_spec.tpl:7:9");
}

#[test]
fn error_train_loss_not_scalar() {
    let out = error_snapshot("train_not_scalar", "invalid");
    assert_eq!(location(&out), "tests/errors/train_not_scalar.tpl:7:7");
}

#[test]
fn error_second_train() {
    let out = error_snapshot("second_train", "second_train");
    assert!(out.contains("first `train` here"), "{out}");
}

/// What does work in the three errors above: the class, the message and both labels.
#[test]
fn two_label_errors_show_both_labels() {
    let out = error_of("redefinition", &[], "redefinition");
    assert!(out.contains("`w` is already defined"), "{out}");
    assert!(out.contains("^ first defined here"), "{out}");
    assert!(out.contains("^ redefined here"), "{out}");
    let out = error_of("duplicate_axis", &[], "duplicate_axis");
    assert!(out.contains("^^ first used here"), "{out}");
    assert!(out.contains("^^ used again here"), "{out}");
    let out = error_of("conflicting_spec", &[], "conflicting_spec");
    assert!(out.contains("[dp, _] and [_, tp]"), "{out}");
    assert!(out.contains("^^^^^^^ earlier annotation"), "{out}");
    assert!(out.contains("^^^^^^^ conflicts"), "{out}");
}

#[test]
fn error_shape_mismatch_names_both_shapes() {
    let out = error_snapshot("shape_mismatch", "shape_mismatch");
    assert!(
        out.contains("f32[2,3]") && out.contains("f32[4,5]"),
        "{out}"
    );
}

#[test]
fn error_rank_mismatch() {
    error_snapshot("rank_mismatch", "rank_mismatch");
}

#[test]
fn error_dtype_mismatch() {
    let out = error_snapshot("dtype_mismatch", "dtype_mismatch");
    assert!(out.contains("f32") && out.contains("i32"), "{out}");
}

#[test]
fn error_inexact_division() {
    let out = error_snapshot("inexact_division", "bad_dim");
    assert!(out.contains("64 / 3 is not exact"), "{out}");
}

#[test]
fn error_non_positive_dim() {
    let out = error_snapshot("non_positive_dim", "bad_dim");
    assert!(out.contains("not positive"), "{out}");
}

#[test]
fn error_unknown_mesh_axis() {
    let out = error_snapshot("unknown_axis", "unknown_axis");
    assert!(out.contains("did you mean `tp`?"), "{out}");
}

#[test]
fn error_spec_length_is_not_rank() {
    error_snapshot("spec_rank", "spec_rank");
}

#[test]
fn error_block_arity() {
    error_snapshot("block_arity", "block_arity");
}

#[test]
fn error_block_argument_type() {
    error_snapshot("block_arg_type", "block_type");
}

#[test]
fn error_block_result_type() {
    error_snapshot("block_result_type", "block_type");
}

#[test]
fn error_recursive_block() {
    let out = error_snapshot("recursive_block", "bad_op");
    assert!(out.contains("calls itself"), "{out}");
}

#[test]
fn error_unknown_dtype() {
    error_snapshot("unknown_dtype", "invalid");
}

#[test]
fn error_unknown_op() {
    let out = error_snapshot("unknown_op", "unknown_name");
    assert!(out.contains("did you mean `gelu`?"), "{out}");
}

#[test]
fn error_bad_set_unknown_dim() {
    let out = error_of("bad_set", &[("HH", 3)], "bad_set");
    assert!(
        !out.contains("-->"),
        "a --set error has no source location:\n{out}"
    );
    snapshot!("error_bad_set", out);
}

#[test]
fn error_not_utf8() {
    let out = error_snapshot("not_utf8", "encoding");
    assert!(out.contains("invalid byte at 2:12"), "{out}");
}

#[test]
fn error_deep_parentheses() {
    let out = error_snapshot("deep_parens", "syntax");
    // The 257th `(` (after `y = `) is the first one too deep.
    assert_eq!(location(&out), "tests/errors/deep_parens.tpl:3:261");
    // The cut line keeps the caret under a `(`.
    let lines: Vec<&str> = out.lines().collect();
    let i = lines.iter().position(|l| l.contains('^')).unwrap();
    let caret = lines[i].chars().position(|c| c == '^').unwrap();
    assert_eq!(lines[i - 1].chars().nth(caret), Some('('), "{out}");
    assert!(lines.iter().all(|l| l.chars().count() < 130), "{out}");
}

#[test]
fn error_empty_file_has_no_output() {
    let out = error_snapshot("empty", "invalid");
    assert!(out.contains("the program has no output"), "{out}");
}

#[test]
fn error_second_pipeline() {
    let out = error_snapshot("second_pipeline", "second_pipeline");
    assert_eq!(location(&out), "tests/errors/second_pipeline.tpl:10:5");
    assert!(out.contains("first pipelined here"), "{out}");
}

#[test]
fn error_pipeline_axis_on_a_tensor() {
    let out = error_snapshot("pipeline_not_repeat", "misplaced_pipeline");
    assert_eq!(location(&out), "tests/errors/pipeline_not_repeat.tpl:5:10");
    assert!(out.contains("`pp` can only split a `repeat`"), "{out}");
}

#[test]
fn error_pipeline_axis_on_an_expression() {
    let out = error_snapshot("pipeline_in_expression", "misplaced_pipeline");
    assert_eq!(
        location(&out),
        "tests/errors/pipeline_in_expression.tpl:9:5"
    );
}

#[test]
fn error_pipeline_in_a_block() {
    let out = error_snapshot("pipeline_in_block", "pipeline_in_block");
    assert_eq!(location(&out), "tests/errors/pipeline_in_block.tpl:9:9");
    assert!(out.contains("not inside block `stack`"), "{out}");
}

/// The spec comes before the pipelined repeat that claims `pp`: found all the same.
#[test]
fn error_pipeline_axis_in_a_spec() {
    let out = error_snapshot("pipeline_axis_in_spec", "pipeline_axis_in_spec");
    assert_eq!(
        location(&out),
        "tests/errors/pipeline_axis_in_spec.tpl:9:27"
    );
    assert!(out.contains("pipeline stages over `pp` here"), "{out}");
}

#[test]
fn error_pipeline_of_zero_instances() {
    let out = error_snapshot("pipeline_zero_count", "bad_op");
    assert_eq!(location(&out), "tests/errors/pipeline_zero_count.tpl:9:12");
}

#[test]
fn error_unknown_pipeline_axis() {
    let out = error_snapshot("unknown_pipeline_axis", "unknown_axis");
    assert_eq!(
        location(&out),
        "tests/errors/unknown_pipeline_axis.tpl:9:27"
    );
    assert!(out.contains("did you mean `pp`?"), "{out}");
    assert!(out.contains("pipeline stages"), "{out}");
}

#[test]
fn every_error_input_is_used() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/errors");
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| {
            let p = e.unwrap().path();
            (p.extension()? == "tpl").then(|| p.file_stem().unwrap().to_string_lossy().into())
        })
        .collect();
    found.sort();
    assert_eq!(found, ERROR_INPUTS);
}

// ---------------------------------------------------------------------------------------------
// Misleading suggestions (no snapshot: the message itself is wrong)

/// `pt` is `tp` with two letters swapped, but plain Levenshtein puts `dp` and `tp` both at 2 and
/// the tie goes to the alphabetically smaller `dp`.
#[test]

fn unknown_axis_suggests_the_transposed_name() {
    let src = SourceFile::new(
        "t.tpl",
        "mesh dp, tp\ndim H = 4\nparam w : f32[H, H] @ [_, pt]\noutput w\n",
    );
    let out = compile_global(&src, &[]).unwrap_err().render(Some(&src));
    assert!(!out.contains("`dp`"), "{out}");
}

/// Any one-letter name is within the distance limit (2) of every one- to three-letter dim, so an
/// unknown one-letter dim always gets an arbitrary suggestion (the alphabetically first dim).
#[test]

fn bad_set_one_letter_name_gets_no_arbitrary_suggestion() {
    let out = error_of("bad_set", &[("Q", 3)], "bad_set");
    assert!(!out.contains("did you mean"), "{out}");
    assert!(out.contains("B, H"), "{out}");
}
