//! Shared by the tests of the `tpc` binary (`cli.rs`, `cli_issue9.rs`, `sizes_limits.rs`): run it,
//! read what it printed, and assert on that.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The binary under test.
pub const TPC: &str = env!("CARGO_BIN_EXE_tpc");

/// Runs `tpc args...` in `dir`.
pub fn tpc_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(TPC)
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run tpc")
}

/// Runs `tpc args...` from the crate root.
pub fn tpc(args: &[&str]) -> Output {
    tpc_in(Path::new(env!("CARGO_MANIFEST_DIR")), args)
}

/// What `o` printed on stdout (it must be UTF-8).
pub fn stdout(o: &Output) -> String {
    String::from_utf8(o.stdout.clone()).expect("stdout is UTF-8")
}

/// What `o` printed on stderr (it must be UTF-8).
pub fn stderr(o: &Output) -> String {
    String::from_utf8(o.stderr.clone()).expect("stderr is UTF-8")
}

/// Asserts the exit code, showing both streams on failure, and that stderr is clean.
#[track_caller]
pub fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
    assert_clean(&stderr(o));
}

/// No panic, and no Rust debug text in what the user reads.
#[track_caller]
pub fn assert_clean(err: &str) {
    for bad in [
        "panicked",
        "RUST_BACKTRACE",
        "Some(",
        "None",
        "Os {",
        "kind:",
        "\\\"",
    ] {
        assert!(!err.contains(bad), "`{bad}` in:\n{err}");
    }
}

/// Asserts that `o` printed `needle` on stderr, showing stderr on failure.
#[track_caller]
pub fn assert_stderr_has(o: &Output, needle: &str) {
    let err = stderr(o);
    assert!(err.contains(needle), "`{needle}` missing in:\n{err}");
}

/// Asserts that `o` printed `needle` on stdout, showing stdout on failure.
#[track_caller]
pub fn assert_stdout_has(o: &Output, needle: &str) {
    let out = stdout(o);
    assert!(out.contains(needle), "`{needle}` missing in:\n{out}");
}

/// A fresh scratch directory for one test (named after the test file and `name`).
pub fn scratch(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{name}", env!("CARGO_CRATE_NAME")));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The absolute path of `examples/NAME`.
pub fn example(name: &str) -> String {
    format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}
