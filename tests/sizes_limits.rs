//! The program size limit (2^60 bytes of tensors in all) through the binary: a declaration, an op
//! result or a `--set` that passes it is a user error at its span (exit 1, `file:line:col`, no
//! panic, nothing on stdout); sizes within it never wrap, FLOPs past u64 included.

use std::path::Path;
use std::process::Output;

mod cli_support;
use cli_support::*;

/// Writes `src` to a scratch `.tpl` and runs `tpc compile` on it with `extra` flags.
fn compile(name: &str, src: &str, extra: &[&str]) -> Output {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("sizes_limits");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.tpl"));
    std::fs::write(&file, src).unwrap();
    let args = [&["compile", file.to_str().unwrap()], extra].concat();
    tpc_in(&dir, &args)
}

/// Asserts a user error (exit 1, empty stdout, no panic or internal error) whose message contains
/// each of `needles`; returns stderr.
#[track_caller]
fn refused(o: &Output, needles: &[&str]) -> String {
    assert_exit(o, 1);
    let err = stderr(o);
    assert!(o.stdout.is_empty(), "stdout not empty; stderr:\n{err}");
    assert!(!err.contains("internal"), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` missing in:\n{err}");
    }
    err
}

#[track_caller]
fn stdout_ok(o: &Output) -> String {
    assert_exit(o, 0);
    stdout(o)
}

#[test]
fn a_declared_tensor_of_2_64_elements_is_refused_at_its_declaration() {
    let src = "mesh tp\ninput x: f32[4294967296, 4294967296]\noutput x\n";
    refused(
        &compile("decl", src, &[]),
        &[
            "tensor f32[4294967296,4294967296] is too large",
            "18446744073709551616 elements, 73786976294838206464 bytes",
            "decl.tpl:2:1",
            "2^60 bytes",
        ],
    );
    // a param too, and at every dtype width
    let src = "mesh tp\nparam w: bf16[4611686018427387904, 2]\noutput w\n";
    refused(&compile("param", src, &[]), &["bf16[", "param.tpl:2:1"]);
}

#[test]
fn set_producing_a_huge_dim_is_refused_at_the_first_declaration_it_breaks() {
    let mlp = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/mlp.tpl");
    let src = std::fs::read_to_string(mlp).unwrap();
    let o = compile("mlp", &src, &["--set", "H=3037000500", "--degree", "2"]);
    refused(
        &o,
        &["f32[3037000500,12148002000] is too large", "mlp.tpl:6:1"],
    );
    // within the limit, the same program reports its real size (no wrap)
    let o = compile("mlp_ok", &src, &["--set", "H=1048576", "--degree", "2"]);
    let out = stdout_ok(&o);
    assert!(out.contains("peak memory per device"), "{out}");
}

#[test]
fn op_results_past_the_limit_are_refused_at_the_op() {
    let broadcast =
        "mesh tp\ninput a: f32[1073741824, 1]\ninput b: f32[1, 1073741824]\ny = a + b\noutput y\n";
    refused(
        &compile("broadcast", broadcast, &[]),
        &[
            "f32[1073741824,1073741824] is too large",
            "broadcast.tpl:4:5",
        ],
    );
    let parts = vec!["a"; 65].join(", ");
    let concat = format!(
        "mesh tp\ninput a: f32[268435456, 268435456]\ny = concat([{parts}], axis=0)\noutput y\n"
    );
    refused(
        &compile("concat", &concat, &[]),
        &["f32[17448304640,268435456] is too large", "concat.tpl:3:5"],
    );
    // a reshape keeps the element count, but its result is one more tensor of the program
    let reshape = "mesh tp\ninput a: f32[288230376151711744]\n\
                   y = reshape(a, [268435456, 1073741824])\noutput y\n";
    refused(
        &compile("reshape", reshape, &[]),
        &["program too large", "reshape.tpl:3:5"],
    );
    let matmul = "mesh tp\ninput a: f32[4294967296, 2]\ninput b: f32[2, 4294967296]\n\
                  y = a @ b\noutput y\n";
    refused(
        &compile("matmul", matmul, &[]),
        &["f32[4294967296,4294967296] is too large", "matmul.tpl:4:5"],
    );
}

#[test]
fn repeated_blocks_count_towards_the_limit() {
    let src = "mesh tp\ndim L = 64\n\
               block Grow(x: f32[9007199254740992]) -> f32[9007199254740992] {\n  \
               y = x * 2.0\n  return y\n}\n\
               input x: f32[9007199254740992]\ny = repeat(L, Grow, x)\noutput y\n";
    let o = compile("repeat_ok", src, &["--set", "L=4"]);
    stdout_ok(&o);
    refused(
        &compile("repeat", src, &[]),
        &["program too large", "repeat.tpl:4:7"],
    );
}

#[test]
fn flops_past_u64_are_reported_not_wrapped() {
    // 2 * 2^22 * 2^22 * 2^22 = 2^67 FLOPs; the tensors (3 * 2^46 bytes) are within the limit
    let src = "mesh tp\ndim N = 4194304\ninput a: f32[N, N]\ninput b: f32[N, N]\n\
               y = a @ b\noutput y\n";
    let out = stdout_ok(&compile("flops", src, &["--degree", "2"]));
    assert!(out.contains("flops per device: 1.4757e20"), "{out}");
    assert!(out.contains("TiB"), "{out}");
}

#[test]
fn a_negative_or_non_finite_eps_is_an_error_at_the_argument() {
    let head = "mesh tp\ninput x: f32[2, 8]\nparam g: f32[8]\nparam b: f32[8]\n";
    let cases = [
        ("y = layernorm(x, g, b, -1e-5)", "got -0.00001", "5:24"),
        ("y = layernorm(x, g, b, eps=-1.0)", "got -1", "5:28"),
        ("y = rmsnorm(x, g, -0.5)", "got -0.5", "5:19"),
        ("y = rmsnorm(x, g, eps=1e999)", "got inf", "5:23"),
        ("y = layernorm(x, g, b, 0.0 - 1e999)", "got -inf", "5:24"),
    ];
    for (i, (stmt, got, at)) in cases.into_iter().enumerate() {
        let src = format!("{head}{stmt}\noutput y\n");
        let o = compile(&format!("eps{i}"), &src, &[]);
        let err = refused(&o, &["eps must be a finite number >= 0", got]);
        assert!(err.contains(&format!("eps{i}.tpl:{at}")), "{stmt}:\n{err}");
    }
    for stmt in ["y = layernorm(x, g, b, 0.0)", "y = rmsnorm(x, g, eps=1e-6)"] {
        stdout_ok(&compile(
            "eps_ok",
            &format!("{head}{stmt}\noutput y\n"),
            &[],
        ));
    }
}
