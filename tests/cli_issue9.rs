//! Issue 9 through the binary: `--check` as numpy's allclose, undeclared mesh axes, outputs that
//! are never lost, resource limits before allocating, clear messages for bad archives, plans and
//! device flags, and the `.npz` checks (missing, extra, dtype, shape) in the default suite.

use ndarray::{ArrayD, IxDyn};
use ndarray_npy::NpzWriter;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};

mod cli_support;
use cli_support::*;

/// Runs a shell command line with `$TPC` set (for limits, pipes and redirections).
fn sh(dir: &Path, script: &str) -> Output {
    Command::new("bash")
        .args(["-c", script])
        .env("TPC", TPC)
        .current_dir(dir)
        .output()
        .expect("run bash")
}

/// Compiles `program` for `--degree 2` to the JSON plan `out` in `dir`.
#[track_caller]
fn save_plan(dir: &Path, program: &str, out: &str) {
    let args = [
        "compile", program, "--degree", "2", "--emit", "json", "-o", out,
    ];
    assert_exit(&tpc_in(dir, &args), 0);
}

/// A program whose outputs are +inf (y) and NaN (z) at the same places in both runs.
const NON_FINITE: &str = "mesh tp\ndim N = 8\ninput x : f32[N, 4] @ [tp, _]\n\
                          y = exp(x * 1000.0)\nz = log(x)\noutput y\noutput z\n";

// ---- 1. --check follows numpy's allclose -----------------------------------------------------

#[test]
fn check_follows_allclose_on_non_finite_outputs() {
    let d = scratch("nonfinite");
    std::fs::write(d.join("p.tpl"), NON_FINITE).unwrap();
    let o = tpc_in(&d, &["run", "p.tpl", "--degree", "2", "--check"]);
    assert_exit(&o, 1);
    let out = stdout(&o);
    // Equal infinities are close.
    assert!(out.contains("check y: max abs error"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("check y") && l.ends_with(" ok")),
        "{out}"
    );
    // NaN is never close; the failure names the element and both values, never an error of 0.
    let z = out.lines().find(|l| l.starts_with("check z")).unwrap();
    assert!(
        z.contains("FAILED") && z.contains("got nan, reference nan"),
        "{z}"
    );
    assert!(z.contains(" at ["), "{z}");
    assert!(!z.contains("0.000e0") && !z.contains("error 0"), "{z}");
    assert_stderr_has(&o, "--check: z differs");
    let o = tpc_in(
        &d,
        &["run", "p.tpl", "--degree", "2", "--check", "--equal-nan"],
    );
    assert_exit(&o, 0);
    assert!(!stdout(&o).contains("FAILED"), "{}", stdout(&o));
}

#[test]
fn integer_outputs_are_compared_exactly() {
    let d = scratch("ints");
    let src = "mesh tp\ndim N = 8\ninput ids : i32[N, 4] @ [tp, _]\noutput ids\n";
    std::fs::write(d.join("p.tpl"), src).unwrap();
    let o = tpc_in(&d, &["run", "p.tpl", "--degree", "2", "--check"]);
    assert_exit(&o, 0);
    assert_stdout_has(&o, "check ids: equal (integers, compared exactly) ok");
}

#[test]
fn tolerances_must_be_finite_and_non_negative() {
    let d = scratch("tol");
    for (flag, v) in [
        ("--rtol", "-1"),
        ("--atol", "nan"),
        ("--atol", "inf"),
        ("--rtol", "-0.5"),
    ] {
        let arg = format!("{flag}={v}");
        let o = tpc_in(&d, &["run", &example("mlp.tpl"), "--check", &arg]);
        assert_exit(&o, 1);
        let err = stderr(&o);
        assert!(
            err.contains(flag) && err.contains("finite number >= 0"),
            "{err}"
        );
        assert!(o.stdout.is_empty());
    }
}

// ---- 2. undeclared mesh axes -----------------------------------------------------------------

#[test]
fn an_undeclared_mesh_axis_is_an_error_with_a_suggestion() {
    let d = scratch("axis");
    let mlp = example("mlp.tpl");
    for args in [
        vec!["compile", mlp.as_str(), "--mesh", "xx=4"],
        vec!["run", mlp.as_str(), "--mesh", "xx=4"],
        vec!["compile", mlp.as_str(), "--mesh", "tp=2,dp=2"],
    ] {
        let o = tpc_in(&d, &args);
        assert_exit(&o, 1);
        let err = stderr(&o);
        assert!(
            err.contains("is not declared by the program"),
            "{args:?}: {err}"
        );
        assert!(err.contains("mesh tp"), "{err}");
    }
    let o = tpc_in(&d, &["compile", &mlp, "--mesh", "xx=4"]);
    assert_stderr_has(&o, "did you mean `tp`?");
    // The same through a saved plan.
    save_plan(&d, &mlp, "p.json");
    let o = tpc_in(&d, &["run", "p.json", "--mesh", "tq=2"]);
    assert_exit(&o, 1);
    assert_stderr_has(&o, "did you mean `tp`?");
    // A program without a mesh line takes no mesh.
    std::fs::write(
        d.join("flat.tpl"),
        "input x : f32[4]\ny = x * 2.0\noutput y\n",
    )
    .unwrap();
    assert_exit(&tpc_in(&d, &["run", "flat.tpl", "--check"]), 0);
    let o = tpc_in(&d, &["run", "flat.tpl", "--degree", "4"]);
    assert_exit(&o, 1);
    assert_stderr_has(&o, "declares no mesh axes");
}

// ---- 3. files: never lose the last good one --------------------------------------------------

#[test]
fn empty_and_unwritable_output_paths_are_refused_before_the_run() {
    let d = scratch("paths");
    let mlp = example("mlp.tpl");
    // clap refuses an empty -o itself (a usage error, exit 2).
    let o = tpc_in(&d, &["compile", &mlp, "-o", ""]);
    assert_exit(&o, 2);
    assert_stderr_has(&o, "a value is required");
    for args in [
        vec!["run", mlp.as_str(), "--out", ""],
        vec!["run", mlp.as_str(), "--stats", ""],
    ] {
        let o = tpc_in(&d, &args);
        assert_exit(&o, 1);
        assert_stderr_has(&o, "the path is empty");
    }
    let o = tpc_in(&d, &["run", &mlp, "--check", "--out", "no/dir/y.npz"]);
    assert_exit(&o, 1);
    let err = stderr(&o);
    assert!(err.contains("`no/dir` does not exist"), "{err}");
    // Refused before running: no check line, no reference run.
    assert!(
        o.stdout.is_empty() && !err.contains("reference run"),
        "{err}"
    );
    let o = tpc_in(&d, &["run", &mlp, "--stats", "."]);
    assert_exit(&o, 1);
    assert_stderr_has(&o, "is a directory");
    let is_root = sh(&d, "id -u").stdout.starts_with(b"0");
    if !is_root {
        std::fs::create_dir(d.join("ro")).unwrap();
        sh(&d, "chmod 555 ro");
        let o = tpc_in(&d, &["run", &mlp, "--out", "ro/y.npz"]);
        sh(&d, "chmod 755 ro");
        assert_exit(&o, 1);
        assert_stderr_has(&o, "cannot create a file");
    }
}

#[test]
fn a_size_limit_or_a_full_device_never_truncates_the_last_good_output() {
    let d = scratch("full");
    let gpt = example("gpt.tpl");
    std::fs::write(d.join("plan.txt"), "the last good plan\n").unwrap();
    // The write is stopped by SIGXFSZ past 8 blocks: killed mid-write, the old file stays.
    let o = sh(
        &d,
        &format!("ulimit -f 8; exec \"$TPC\" compile {gpt} --degree 8 --emit json -o plan.txt"),
    );
    assert!(!o.status.success());
    assert_eq!(
        std::fs::read_to_string(d.join("plan.txt")).unwrap(),
        "the last good plan\n"
    );
    // A killed process cannot clean up: its partial write is a hidden temporary, never the target.
    for e in std::fs::read_dir(&d).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        if name != "plan.txt" {
            assert!(
                name.starts_with(".plan.txt.tpc-") && name.ends_with(".tmp"),
                "{name}"
            );
            std::fs::remove_file(d.join(name)).unwrap();
        }
    }
    // With SIGXFSZ ignored the write fails with EFBIG: an error, and no temporary is left.
    let o = sh(
        &d,
        &format!("trap '' XFSZ; ulimit -f 8; exec \"$TPC\" compile {gpt} --degree 8 --emit json -o plan.txt"),
    );
    assert_exit(&o, 1);
    assert_stderr_has(&o, "File too large");
    assert_stderr_has(&o, "unchanged");
    assert_eq!(
        std::fs::read_to_string(d.join("plan.txt")).unwrap(),
        "the last good plan\n"
    );
    let names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("plan.txt")]);
    // A device is written in place, not replaced: /dev/full reports the full disk.
    let o = tpc_in(&d, &["compile", &gpt, "--degree", "8", "-o", "/dev/full"]);
    assert_exit(&o, 1);
    assert_stderr_has(&o, "No space left on device");
    assert_exit(&tpc_in(&d, &["compile", &gpt, "-o", "/dev/null"]), 0);
    assert!(!std::fs::metadata("/dev/null").unwrap().is_file());
    // The same for run --out.
    std::fs::write(d.join("y.npz"), "good").unwrap();
    let o = sh(
        &d,
        &format!(
            "trap '' XFSZ; ulimit -f 8; exec \"$TPC\" run {} --out y.npz",
            example("mlp.tpl")
        ),
    );
    assert_exit(&o, 1);
    assert_eq!(std::fs::read_to_string(d.join("y.npz")).unwrap(), "good");
}

#[test]
fn a_failed_check_writes_its_outputs_beside_the_good_ones() {
    let d = scratch("failed");
    std::fs::write(d.join("p.tpl"), NON_FINITE).unwrap();
    std::fs::write(d.join("y.npz"), "good outputs").unwrap();
    std::fs::write(d.join("s.json"), "good stats").unwrap();
    let args = [
        "run", "p.tpl", "--check", "--out", "y.npz", "--stats", "s.json",
    ];
    let o = tpc_in(&d, &args);
    assert_exit(&o, 1);
    let err = stderr(&o);
    assert!(
        err.contains("`y.failed.npz`; `y.npz` is left as it was"),
        "{err}"
    );
    assert!(
        err.contains("`s.failed.json`; `s.json` is left as it was"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("y.npz")).unwrap(),
        "good outputs"
    );
    assert_eq!(
        std::fs::read_to_string(d.join("s.json")).unwrap(),
        "good stats"
    );
    let failed = tpc::exec::npz::read(d.join("y.failed.npz").to_str().unwrap()).unwrap();
    assert_eq!(failed.keys().collect::<Vec<_>>(), ["y", "z"]);
    assert!(std::fs::read_to_string(d.join("s.failed.json"))
        .unwrap()
        .contains("ranks"));
    // A passing run replaces them.
    let mut args = args.to_vec();
    args.push("--equal-nan");
    assert_exit(&tpc_in(&d, &args), 0);
    assert_eq!(
        tpc::exec::npz::read(d.join("y.npz").to_str().unwrap())
            .unwrap()
            .len(),
        2
    );
}

// ---- 4. resource limits and closed streams ---------------------------------------------------

#[test]
fn a_run_that_cannot_fit_is_refused_with_the_figure() {
    let d = scratch("memory");
    let mlp = example("mlp.tpl");
    let o = tpc_in(
        &d,
        &[
            "run",
            &mlp,
            "--set",
            "H=16384",
            "--degree",
            "8",
            "--max-memory",
            "4GiB",
        ],
    );
    assert_exit(&o, 1);
    let err = stderr(&o);
    assert!(err.contains("this run needs about 10.1 GiB"), "{err}");
    assert!(
        err.contains("per rank x 8 ranks") && err.contains("--max-memory is 4.0 GiB"),
        "{err}"
    );
    // Far beyond any machine: refused by the available memory, not aborted by the allocator.
    let o = tpc_in(&d, &["run", &mlp, "--set", "H=1048576", "--degree", "8"]);
    assert_exit(&o, 1);
    assert_stderr_has(&o, "is available");
    let o = tpc_in(&d, &["run", &mlp, "--repeat", "1000000000000"]);
    assert_exit(&o, 1);
    assert_stderr_has(&o, "of step times");
    assert_stderr_has(&o, "a smaller --repeat");
    for bad in ["0", "12XB", "-1GiB", "lots"] {
        let arg = format!("--max-memory={bad}");
        let o = tpc_in(&d, &["run", &mlp, &arg]);
        assert_exit(&o, 1);
        assert_stderr_has(&o, "--max-memory");
    }
    assert_exit(&tpc_in(&d, &["run", &mlp, "--max-memory", "512MiB"]), 0);
}

#[test]
fn closed_streams_end_the_program_quietly() {
    let d = scratch("streams");
    let mlp = example("mlp.tpl");
    std::fs::write(d.join("p.tpl"), NON_FINITE).unwrap();
    let o = sh(
        &d,
        &format!(
            "\"$TPC\" compile {} --degree 8 | head -c 10 >/dev/null; echo ${{PIPESTATUS[0]}}",
            example("gpt.tpl")
        ),
    );
    assert_eq!(stdout(&o).trim(), "0", "{}", stderr(&o));
    assert_clean(&stderr(&o));
    let o = sh(
        &d,
        "\"$TPC\" run p.tpl --check --equal-nan | true; echo ${PIPESTATUS[0]}",
    );
    assert_eq!(stdout(&o).trim(), "0", "{}", stderr(&o));
    assert_clean(&stderr(&o));
    // Nowhere to report: still the right exit code, no abort.
    let o = sh(&d, "\"$TPC\" compile missing.tpl 2>/dev/full; echo $?");
    assert_eq!(stdout(&o).trim(), "1");
    let o = sh(
        &d,
        &format!("\"$TPC\" run {mlp} --repeat 3 2>/dev/full >/dev/full; echo $?"),
    );
    assert_eq!(stdout(&o).trim(), "0");
    // A full stdout for compile output is an error, reported.
    let o = sh(&d, &format!("\"$TPC\" compile {mlp} >/dev/full"));
    assert_exit(&o, 1);
    assert_stderr_has(&o, "cannot write to stdout: No space left");
}

// ---- 5. clear messages ---------------------------------------------------------------------

/// A tiny program with two inputs and three params.
const SMALL: &str = "dim N = 4\ninput x : f32[N, 2]\ninput ids : i32[N]\nparam w : f32[2, 3]\n\
                     param b : f32[3]\nparam c : f32[3]\ny = x @ w + b + c\noutput y\n";

fn f32s(shape: &[usize]) -> ArrayD<f32> {
    let n = shape.iter().product();
    ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(|i| i as f32 * 0.25).collect()).unwrap()
}

fn good_params(path: &Path) {
    let mut z = NpzWriter::new(std::fs::File::create(path).unwrap());
    z.add_array("w", &f32s(&[2, 3])).unwrap();
    z.add_array("b", &f32s(&[3])).unwrap();
    z.add_array("c", &f32s(&[3])).unwrap();
    z.finish().unwrap();
}

#[test]
fn every_npz_problem_is_reported_together() {
    let d = scratch("npz-all");
    std::fs::write(d.join("p.tpl"), SMALL).unwrap();
    let mut z = NpzWriter::new(std::fs::File::create(d.join("p.npz")).unwrap());
    z.add_array("w", &ArrayD::<f64>::zeros(IxDyn(&[2, 3])))
        .unwrap();
    z.add_array("c", &f32s(&[4])).unwrap();
    z.add_array("bias", &f32s(&[3])).unwrap();
    z.finish().unwrap();
    let o = tpc_in(&d, &["run", "p.tpl", "--params", "p.npz"]);
    assert_exit(&o, 1);
    let err = stderr(&o);
    for want in [
        "p.npz does not fit the program",
        "`w` is float64, the program declares f32[2,3] (store f32 as float32)",
        "missing param `b` (f32[3])",
        "`c` has shape [4], the program declares f32[3]",
        "extra array `bias`: the program has no param of that name",
    ] {
        assert!(err.contains(want), "`{want}` missing:\n{err}");
    }
    // Inputs: int32 where f32 is declared, float32 where int32 is.
    let mut z = NpzWriter::new(std::fs::File::create(d.join("x.npz")).unwrap());
    z.add_array("x", &ArrayD::<i32>::zeros(IxDyn(&[4, 2])))
        .unwrap();
    z.add_array("ids", &f32s(&[4])).unwrap();
    z.finish().unwrap();
    let o = tpc_in(&d, &["run", "p.tpl", "--inputs", "x.npz"]);
    assert_exit(&o, 1);
    let err = stderr(&o);
    assert!(
        err.contains("`x` is int32, the program declares f32[4,2]"),
        "{err}"
    );
    assert!(
        err.contains("`ids` is float32, the program declares i32[4] (store i32 as int32)"),
        "{err}"
    );
    // Good archives run.
    good_params(&d.join("good.npz"));
    assert_exit(
        &tpc_in(&d, &["run", "p.tpl", "--params", "good.npz", "--check"]),
        0,
    );
}

/// A zip with one stored or deflated entry `name` holding `bytes`.
fn zip_with(path: &Path, name: &str, bytes: &[u8], deflate: bool) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let method = if deflate {
        zip::CompressionMethod::Deflated
    } else {
        zip::CompressionMethod::Stored
    };
    let opts = zip::write::SimpleFileOptions::default().compression_method(method);
    z.start_file(name, opts).unwrap();
    z.write_all(bytes).unwrap();
    z.finish().unwrap();
}

/// An .npy file: header for `descr` and `shape`, then `data`.
fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend((h.len() as u16).to_le_bytes());
    out.extend(h.as_bytes());
    out.extend(data);
    out
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[test]
fn compressed_archives_are_read() {
    let d = scratch("npz-deflate");
    std::fs::write(
        d.join("p.tpl"),
        "input x : f32[2, 2]\ny = x * 2.0\noutput y\n",
    )
    .unwrap();
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    zip_with(
        &d.join("x.npz"),
        "x.npy",
        &npy("<f4", "(2, 2)", &data),
        true,
    );
    let o = tpc_in(&d, &["run", "p.tpl", "--inputs", "x.npz", "--out", "y.npz"]);
    assert_exit(&o, 0);
    let y = tpc::exec::npz::read(d.join("y.npz").to_str().unwrap()).unwrap();
    let tpc::exec::Tensor::F32(y) = &y["y"] else {
        panic!("y is f32")
    };
    assert_eq!(y.iter().copied().collect::<Vec<_>>(), [2.0, 4.0, 6.0, 8.0]);
    // Fortran order and big-endian data are read as numpy would.
    let be: Vec<u8> = [1.0f32, 3.0, 2.0, 4.0]
        .iter()
        .flat_map(|x| x.to_be_bytes())
        .collect();
    let mut h = npy(">f4", "(2, 2)", &be);
    let text_at = h.windows(5).position(|w| w == b"False").unwrap();
    h.splice(text_at..text_at + 5, b"True ".iter().copied());
    zip_with(&d.join("xf.npz"), "x.npy", &h, false);
    let o = tpc_in(
        &d,
        &["run", "p.tpl", "--inputs", "xf.npz", "--out", "yf.npz"],
    );
    assert_exit(&o, 0);
    let yf = tpc::exec::npz::read(d.join("yf.npz").to_str().unwrap()).unwrap();
    let tpc::exec::Tensor::F32(yf) = &yf["y"] else {
        panic!("y is f32")
    };
    assert_eq!(yf.iter().copied().collect::<Vec<_>>(), [2.0, 4.0, 6.0, 8.0]);
}

#[test]
fn corrupt_truncated_and_lying_archives_say_so() {
    let d = scratch("npz-bad");
    std::fs::write(
        d.join("p.tpl"),
        "input x : f32[2, 2]\ny = x * 2.0\noutput y\n",
    )
    .unwrap();
    let run = |file: &str| tpc_in(&d, &["run", "p.tpl", "--inputs", file]);
    let data = f32_bytes(&[1.0, 2.0, 3.0, 4.0]);
    // A header claiming 10^12 elements: refused before allocating.
    zip_with(
        &d.join("huge.npz"),
        "x.npy",
        &npy("<f4", "(1000000, 1000000)", &data),
        false,
    );
    let o = run("huge.npz");
    assert_exit(&o, 1);
    let err = stderr(&o);
    assert!(
        err.contains("[1000000, 1000000]") && err.contains("corrupt or truncated"),
        "{err}"
    );
    // A flipped data byte: a CRC error.
    zip_with(
        &d.join("crc.npz"),
        "x.npy",
        &npy("<f4", "(2, 2)", &data),
        false,
    );
    let mut bytes = std::fs::read(d.join("crc.npz")).unwrap();
    let at = bytes
        .windows(4)
        .position(|w| w == 1.0f32.to_le_bytes())
        .unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(d.join("crc.npz"), &bytes).unwrap();
    let o = run("crc.npz");
    assert_exit(&o, 1);
    assert_stderr_has(&o, "CRC mismatch");
    // Cut in half: truncated.
    good_params(&d.join("full.npz"));
    let bytes = std::fs::read(d.join("full.npz")).unwrap();
    std::fs::write(d.join("cut.npz"), &bytes[..bytes.len() / 2]).unwrap();
    let o = run("cut.npz");
    assert_exit(&o, 1);
    assert_stderr_has(&o, "truncated");
    // Not a zip at all.
    std::fs::write(d.join("text.npz"), "hello").unwrap();
    let o = run("text.npz");
    assert_exit(&o, 1);
    assert_stderr_has(&o, "not a zip file");
}

#[test]
fn device_flags_are_checked_for_plans_as_for_sources() {
    let d = scratch("device");
    let mlp = example("mlp.tpl");
    save_plan(&d, &mlp, "plan.json");
    for (flag, v) in [
        ("--flops", "-1"),
        ("--bandwidth", "0"),
        ("--latency", "1e9"),
        ("--flops", "1e300"),
    ] {
        let arg = format!("{flag}={v}");
        for file in [mlp.as_str(), "plan.json"] {
            let o = tpc_in(&d, &["run", file, &arg]);
            assert_exit(&o, 1);
            let err = stderr(&o);
            assert!(
                err.contains(flag) && err.contains("must be a finite number from"),
                "{err}"
            );
        }
    }
}

#[test]
fn a_plan_is_recognised_by_its_content() {
    let d = scratch("plan-ext");
    let mlp = example("mlp.tpl");
    save_plan(&d, &mlp, "plan.out");
    let o = tpc_in(&d, &["run", "plan.out", "--check"]);
    assert_exit(&o, 0);
    assert_stdout_has(&o, "check y:");
}

#[test]
fn too_little_memory_to_start_is_not_an_internal_error() {
    let d = scratch("oom");
    let o = sh(
        &d,
        &format!(
            "ulimit -v 200000; exec \"$TPC\" compile {}",
            example("mlp.tpl")
        ),
    );
    assert_exit(&o, 1);
    assert!(
        !stderr(&o).contains("internal compiler error"),
        "{}",
        stderr(&o)
    );
    assert_stderr_has(&o, "memory");
}

#[test]
fn damaged_archives_never_panic() {
    let d = scratch("npz-fuzz");
    let good = d.join("good.npz");
    good_params(&good);
    let deflated = npy("<f4", "(2, 3)", &f32_bytes(&[1.0; 6]));
    zip_with(&d.join("deflated.npz"), "w.npy", &deflated, true);
    let bad = d.join("bad.npz");
    for src in [good, d.join("deflated.npz")] {
        let bytes = std::fs::read(&src).unwrap();
        // Every truncation, and every byte replaced by a few values, read as an untrusted file.
        let mut cases: Vec<Vec<u8>> = (0..bytes.len()).map(|n| bytes[..n].to_vec()).collect();
        for i in 0..bytes.len() {
            for v in [0x00, 0xff, bytes[i] ^ 0x01, b'9'] {
                let mut b = bytes.clone();
                b[i] = v;
                cases.push(b);
            }
        }
        for case in cases {
            std::fs::write(&bad, &case).unwrap();
            if let Err(e) = tpc::exec::npz::read(bad.to_str().unwrap()) {
                assert_clean(&e.to_string());
            }
        }
    }
}
