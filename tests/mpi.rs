//! The MPI backend, end to end: `mpirun -n N tpc run ...` gives outputs bitwise identical to the
//! thread backend's for every example on 1-D and 2-D meshes, and training steps bitwise
//! identical to the thread backend's, passes `--check`, and fails fast (non-zero, no hang) on a
//! world-size mismatch, a bad params file or a rank failing mid-run.
//!
//! Needs `mpirun` (Open MPI) on the PATH; runs as root with `--allow-run-as-root`.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tpc::exec::{npz, Tensor};

/// One MPI job at a time: every job oversubscribes the machine's cores.
static MPI_JOBS: Mutex<()> = Mutex::new(());

/// Seconds after which a run counts as hung (coreutils `timeout` ends it).
const TIMEOUT_S: u64 = 600;

const TPC: &str = env!("CARGO_BIN_EXE_tpc");

/// The small MLP sizes of the equivalence test.
const SMALL_MLP: &[&str] = &["--set", "B=4", "--set", "S=8", "--set", "H=64"];

/// Runs `cmd` (program and arguments) under `timeout`; panics if it hung.
fn run_with_timeout(cmd: &[&str], secs: u64) -> (Output, Duration) {
    let t = Instant::now();
    let out = Command::new("timeout")
        .args(["-k", "10", &secs.to_string()])
        .args(cmd)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .output()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let took = t.elapsed();
    assert!(
        !matches!(out.status.code(), Some(124) | Some(137)),
        "{cmd:?} hung (killed after {secs} s)\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out, took)
}

/// `mpirun -n n tpc run ARGS`.
fn mpirun(n: usize, args: &[&str], secs: u64) -> (Output, Duration) {
    let _one = MPI_JOBS.lock().unwrap_or_else(|e| e.into_inner());
    let n = n.to_string();
    let mut cmd = vec![
        "mpirun",
        "--oversubscribe",
        "--allow-run-as-root",
        "-n",
        &n,
        TPC,
        "run",
    ];
    cmd.extend_from_slice(args);
    run_with_timeout(&cmd, secs)
}

/// `tpc run ARGS` on the thread backend.
fn threads(args: &[&str]) -> Output {
    let mut cmd = vec![TPC, "run"];
    cmd.extend_from_slice(args);
    run_with_timeout(&cmd, TIMEOUT_S).0
}

fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mpi-{}-{name}", std::process::id()))
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The bits of every element (f32 by bit pattern, so NaNs and signed zeros compare exactly).
fn bits(t: &Tensor) -> (Vec<usize>, Vec<u32>) {
    let data = match t {
        Tensor::F32(x) => x.iter().map(|v| v.to_bits()).collect(),
        Tensor::I32(x) => x.iter().map(|v| *v as u32).collect(),
    };
    (t.shape().to_vec(), data)
}

/// Asserts that the two archives hold the same names, kinds, shapes and bits.
fn assert_bitwise_equal(mpi: &Path, threads: &Path, what: &str) {
    let a = npz::read(mpi.to_str().unwrap()).unwrap_or_else(|e| panic!("{what}: {e}"));
    let b = npz::read(threads.to_str().unwrap()).unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(!a.is_empty(), "{what}: no outputs");
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: output names"
    );
    for (name, x) in &a {
        let y = &b[name];
        assert_eq!(x.kind(), y.kind(), "{what}: kind of {name}");
        let ((sx, bx), (sy, by)) = (bits(x), bits(y));
        assert_eq!(sx, sy, "{what}: shape of {name}");
        let diff = bx.iter().zip(&by).filter(|(p, q)| p != q).count();
        assert_eq!(diff, 0, "{what}: {diff} elements of {name} differ in bits");
    }
}

/// For each mesh: the MPI run's `--out` equals the thread run's bit for bit, and `--check` passes.
fn example(file: &str, sets: &[&str]) {
    let meshes: [(&str, &str, usize); 4] = [
        ("--degree", "2", 2),
        ("--degree", "4", 4),
        ("--degree", "8", 8),
        ("--mesh", "dp=2,tp=4", 8),
    ];
    let declares_dp = std::fs::read_to_string(file).unwrap().contains("mesh dp");
    for (flag, mesh, n) in meshes {
        // The command line refuses a mesh axis the program does not declare.
        if mesh.contains("dp=") && !declares_dp {
            continue;
        }
        let what = format!("{file} {flag} {mesh} on {n} MPI ranks");
        let stem = format!(
            "{}-{}",
            Path::new(file).file_stem().unwrap().to_string_lossy(),
            mesh.replace([',', '='], "_")
        );
        let (t_out, m_out) = (tmp(&format!("{stem}-t.npz")), tmp(&format!("{stem}-m.npz")));
        let mut args = vec![file, flag, mesh, "--seed", "3"];
        args.extend_from_slice(sets);
        let mut t_args = args.clone();
        t_args.extend(["--out", t_out.to_str().unwrap()]);
        let t = threads(&t_args);
        assert!(
            t.status.success(),
            "{what}: thread run failed\n{}",
            text(&t)
        );
        let mut m_args = args.clone();
        m_args.extend(["--out", m_out.to_str().unwrap(), "--check"]);
        let (m, _) = mpirun(n, &m_args, TIMEOUT_S);
        assert!(m.status.success(), "{what}: MPI run failed\n{}", text(&m));
        let stdout = String::from_utf8_lossy(&m.stdout);
        assert!(
            stdout.contains("check ") && stdout.contains(" ok") && !stdout.contains("FAILED"),
            "{what}: --check\n{}",
            text(&m)
        );
        assert_eq!(
            stdout.matches("check ").count(),
            stdout.lines().filter(|l| l.starts_with("check ")).count(),
            "{what}: only rank 0 checks"
        );
        assert_bitwise_equal(&m_out, &t_out, &what);
        let _ = std::fs::remove_file(&t_out);
        let _ = std::fs::remove_file(&m_out);
    }
}

#[test]
fn mlp_is_bitwise_identical_to_threads() {
    example("examples/mlp.tpl", SMALL_MLP);
}

#[test]
fn mlp_2d_is_bitwise_identical_to_threads() {
    example("examples/mlp_2d.tpl", SMALL_MLP);
}

#[test]
fn attention_is_bitwise_identical_to_threads() {
    example("examples/attention.tpl", &[]);
}

#[test]
fn gpt_layer_is_bitwise_identical_to_threads() {
    example("examples/gpt_layer.tpl", &[]);
}

#[test]
fn gpt_is_bitwise_identical_to_threads() {
    example("examples/gpt.tpl", &[]);
}

#[test]
fn saved_plan_runs_under_mpi_with_stats() {
    let plan = tmp("plan.json");
    let c = Command::new(TPC)
        .args(["compile", "examples/gpt_layer.tpl", "--degree", "4"])
        .args(["--emit", "json", "-o", plan.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(c.status.success(), "{}", text(&c));
    let (t_out, m_out, stats) = (tmp("plan-t.npz"), tmp("plan-m.npz"), tmp("stats.json"));
    let p = plan.to_str().unwrap();
    let t = threads(&[p, "--out", t_out.to_str().unwrap()]);
    assert!(t.status.success(), "{}", text(&t));
    let m_args = [
        p,
        "--out",
        m_out.to_str().unwrap(),
        "--repeat",
        "3",
        "--stats",
        stats.to_str().unwrap(),
    ];
    let (m, _) = mpirun(4, &m_args, TIMEOUT_S);
    assert!(m.status.success(), "{}", text(&m));
    assert_bitwise_equal(&m_out, &t_out, "saved plan on 4 MPI ranks");
    let stderr = String::from_utf8_lossy(&m.stderr);
    assert_eq!(
        stderr.matches("step time: min").count(),
        1,
        "step times printed once\n{}",
        text(&m)
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).unwrap()).unwrap();
    assert_eq!(doc["ranks"], 4);
    assert!(doc["collectives"]["all_reduce"]["count"].as_u64().unwrap() > 0);
    assert!(doc["peak_bytes_per_rank"].as_u64().unwrap() > 0);
}

#[test]
fn world_size_mismatch_fails_fast_and_reports_once() {
    let mut args = vec!["examples/mlp.tpl", "--degree", "8"];
    args.extend_from_slice(SMALL_MLP);
    let (m, took) = mpirun(4, &args, 120);
    assert!(!m.status.success(), "{}", text(&m));
    let stderr = String::from_utf8_lossy(&m.stderr);
    assert_eq!(
        stderr.matches("MPI started 4 processes").count(),
        1,
        "reported once\n{}",
        text(&m)
    );
    assert!(stderr.contains("mpirun -n 8"), "{}", text(&m));
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

#[test]
fn bad_params_file_fails_without_hanging() {
    let bad = tmp("bad-params.npz");
    std::fs::write(&bad, b"this is not an npz archive").unwrap();
    let mut args = vec![
        "examples/mlp.tpl",
        "--degree",
        "4",
        "--params",
        bad.to_str().unwrap(),
    ];
    args.extend_from_slice(SMALL_MLP);
    let (m, took) = mpirun(4, &args, 120);
    assert!(!m.status.success(), "{}", text(&m));
    let stderr = String::from_utf8_lossy(&m.stderr);
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error:")).count(),
        1,
        "reported once\n{}",
        text(&m)
    );
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

#[test]
fn params_from_an_archive_match_threads() {
    // Params written by one run and read back by every rank: the `Arrays` leaf source.
    let (params, t_out, m_out) = (tmp("p.npz"), tmp("p-t.npz"), tmp("p-m.npz"));
    let mut leaves = std::collections::BTreeMap::new();
    let src = tpc::diag::SourceFile::new(
        "examples/mlp.tpl",
        std::fs::read_to_string("examples/mlp.tpl").unwrap(),
    );
    let sets = [("B", 4), ("S", 8), ("H", 64)].map(|(k, v)| (k.to_string(), v));
    let g = tpc::driver::compile_global(&src, &sets)
        .unwrap_or_else(|e| panic!("{}", e.render(Some(&src))));
    let all = tpc::exec::leaves::global_leaves(&g, &tpc::exec::leaves::LeafSource::Seed(11))
        .unwrap_or_else(|e| panic!("{e}"));
    for name in ["w1", "b1", "w2", "b2"] {
        leaves.insert(name.to_string(), all[name].clone());
    }
    npz::write(params.to_str().unwrap(), &leaves).unwrap();
    let mut args = vec![
        "examples/mlp.tpl",
        "--degree",
        "4",
        "--params",
        params.to_str().unwrap(),
    ];
    args.extend_from_slice(SMALL_MLP);
    let mut t_args = args.clone();
    t_args.extend(["--out", t_out.to_str().unwrap()]);
    let t = threads(&t_args);
    assert!(t.status.success(), "{}", text(&t));
    let mut m_args = args.clone();
    m_args.extend(["--out", m_out.to_str().unwrap(), "--check"]);
    let (m, _) = mpirun(4, &m_args, TIMEOUT_S);
    assert!(m.status.success(), "{}", text(&m));
    assert_bitwise_equal(&m_out, &t_out, "params archive on 4 MPI ranks");
}

#[test]
fn a_rank_failing_mid_run_aborts_the_job() {
    // Token ids past the vocabulary: every rank's vocab-parallel embedding fails during the step.
    let inputs = tmp("bad-inputs.npz");
    let ids = |v: i32| Tensor::I32(ndarray::ArrayD::from_elem(ndarray::IxDyn(&[2, 16]), v));
    let arrays = [("tokens", ids(5000)), ("labels", ids(1))]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    npz::write(inputs.to_str().unwrap(), &arrays).unwrap();
    let args = [
        "examples/gpt.tpl",
        "--degree",
        "4",
        "--inputs",
        inputs.to_str().unwrap(),
    ];
    let (m, took) = mpirun(4, &args, 120);
    assert_a_rank_failed_on_an_id(&m);
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

/// The job failed, some rank reporting an id out of range; its stderr.
fn assert_a_rank_failed_on_an_id(m: &Output) -> String {
    assert!(!m.status.success(), "{}", text(m));
    let stderr = String::from_utf8_lossy(&m.stderr).into_owned();
    assert!(
        stderr.contains("error: rank ") && stderr.contains("out of range"),
        "{}",
        text(m)
    );
    stderr
}

/// An i32 input resharded by all-reduce (sum, max), all-to-all, all-gather and shard slice.
const INTS: &str = "mesh tp
dim B = 8, S = 1024
input ids : i32[B, S] @ [tp, _]
input g : i32[B, 4] @ [tp, _]
s = sum(ids, 0)
m = max(ids, 0)
a = ids * 1
output s, m, g
output a @ [_, tp]
output ids @ [_, _]
";

#[test]
fn integers_above_2_pow_24_move_exactly_under_mpi() {
    let big = [16_777_217, i32::MAX - 1, 16_777_219, -16_777_217];
    let src = tmp("ints.tpl");
    std::fs::write(&src, INTS).unwrap();
    let arr = |shape: &[usize], f: &dyn Fn(usize) -> i32| {
        let n: usize = shape.iter().product();
        Tensor::I32(ndarray::ArrayD::from_shape_vec(shape, (0..n).map(f).collect()).unwrap())
    };
    // Each column holds one big id (in row c % 8), so sums and maxima are that id exactly.
    let ids = arr(&[8, 1024], &|i| {
        if i / 1024 == i % 8 {
            big[i % 1024 % 4]
        } else {
            0
        }
    });
    let mut arrays = std::collections::BTreeMap::new();
    arrays.insert("ids".to_string(), ids.clone());
    arrays.insert("g".to_string(), arr(&[8, 4], &|i| big[i % 4]));
    let inputs = tmp("ints-in.npz");
    npz::write(inputs.to_str().unwrap(), &arrays).unwrap();
    let (t_out, m_out) = (tmp("ints-t.npz"), tmp("ints-m.npz"));
    let args = [src.to_str().unwrap(), "--degree", "4", "--inputs"];
    let mut t_args = args.to_vec();
    t_args.extend([inputs.to_str().unwrap(), "--out", t_out.to_str().unwrap()]);
    let t = threads(&t_args);
    assert!(t.status.success(), "{}", text(&t));
    let mut m_args = args.to_vec();
    m_args.extend([
        inputs.to_str().unwrap(),
        "--out",
        m_out.to_str().unwrap(),
        "--check",
    ]);
    let (m, _) = mpirun(4, &m_args, TIMEOUT_S);
    assert!(m.status.success(), "{}", text(&m));
    assert_bitwise_equal(&m_out, &t_out, "integers on 4 MPI ranks");
    let out = npz::read(m_out.to_str().unwrap()).unwrap();
    let s = out["s"].as_i32().unwrap();
    assert_eq!((s[[0]], s[[1]], s[[2]]), (big[0], big[1], big[2]));
    assert_eq!(out["m"].as_i32().unwrap()[[1]], big[1]);
    assert_eq!(out["ids"], ids);
    assert_eq!(out["a"], ids);
    assert_eq!(out["g"], arrays["g"]);
}

/// A program whose outputs need multi-axis redistributes (`[dp, tp] -> [tp, dp]`, f32 and i32).
const REDISTRIBUTE: &str = "mesh dp, tp\ninput x : f32[8, 16] @ [dp, tp]\n\
    input ids : i32[8, 16] @ [(dp,tp), _]\ny = gelu(x) @ [tp, dp]\n\
    output y @ [tp, dp]\noutput ids @ [_, (dp,tp)]\n";

#[test]
fn redistribute_over_two_axes_is_bitwise_identical_to_threads() {
    let src = tmp("redistribute.tpl");
    std::fs::write(&src, REDISTRIBUTE).unwrap();
    let (t_out, m_out) = (tmp("rd-t.npz"), tmp("rd-m.npz"));
    let args = [src.to_str().unwrap(), "--mesh", "dp=2,tp=4", "--seed", "5"];
    let mut t_args = args.to_vec();
    t_args.extend(["--out", t_out.to_str().unwrap()]);
    let t = threads(&t_args);
    assert!(t.status.success(), "{}", text(&t));
    let mut m_args = args.to_vec();
    m_args.extend(["--out", m_out.to_str().unwrap(), "--check"]);
    let (m, _) = mpirun(8, &m_args, TIMEOUT_S);
    assert!(m.status.success(), "{}", text(&m));
    assert!(
        !String::from_utf8_lossy(&m.stdout).contains("FAILED"),
        "{}",
        text(&m)
    );
    assert_bitwise_equal(&m_out, &t_out, "redistribute on 8 MPI ranks");
}

/// gpt_train.tpl with its tokens split over dp, on `dp=2,tp=2`.
fn gpt_train_dp() -> PathBuf {
    let src = std::fs::read_to_string("examples/gpt_train.tpl").unwrap();
    let src = src.replace("mesh tp\n", "mesh dp, tp\n").replace(
        "input tokens : i32[B, S]",
        "input tokens : i32[B, S] @ [dp, _]",
    );
    assert!(
        src.contains("@ [dp, _]"),
        "the example's tokens line changed"
    );
    let file = tmp("gpt_train_dp.tpl");
    std::fs::write(&file, src).unwrap();
    file
}

/// The losses a `--log` file holds, as written (so equal text is equal bits).
fn logged_losses(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["loss"].to_string()
        })
        .collect()
}

/// Training under MPI: each process keeps its blocks of the params and AdamW state across
/// steps; the losses, trained params and first gradients are bitwise the thread backend's, and
/// `--check` against the unsharded reference passes.
#[test]
fn training_under_mpi_is_bitwise_identical_to_threads() {
    let file = gpt_train_dp();
    let f = file.to_str().unwrap();
    let paths =
        |tag: &str| ["log.jsonl", "out.npz", "grads.npz"].map(|n| tmp(&format!("train-{tag}-{n}")));
    let args = |p: &[PathBuf; 3]| -> Vec<String> {
        let mut a: Vec<String> = [f, "--mesh", "dp=2,tp=2", "--steps", "4"]
            .map(String::from)
            .to_vec();
        for (flag, path) in ["--log", "--out", "--grads"].iter().zip(p) {
            a.push(flag.to_string());
            a.push(path.to_str().unwrap().to_string());
        }
        a
    };
    let (mp, tp) = (paths("mpi"), paths("threads"));
    let mut margs = args(&mp);
    margs.push("--check".into());
    let margs: Vec<&str> = margs.iter().map(String::as_str).collect();
    let (m, _) = mpirun(4, &margs, TIMEOUT_S);
    assert!(m.status.success(), "{}", text(&m));
    let stdout = String::from_utf8_lossy(&m.stdout);
    let printed = stdout.lines().filter(|l| l.starts_with("step ")).count();
    assert_eq!(printed, 4, "{}", text(&m));
    assert!(stdout.contains("check loss at step 4: "), "{}", text(&m));
    let targs = args(&tp);
    let targs: Vec<&str> = targs.iter().map(String::as_str).collect();
    let t = threads(&targs);
    assert!(t.status.success(), "{}", text(&t));
    let (ml, tl) = (logged_losses(&mp[0]), logged_losses(&tp[0]));
    assert_eq!(ml.len(), 4);
    assert_eq!(ml, tl, "losses under MPI and threads");
    assert_bitwise_equal(&mp[1], &tp[1], "trained params");
    assert_bitwise_equal(&mp[2], &tp[2], "first step's gradients");
}

/// Microbatches under MPI: each process runs its microbatches one after another and
/// accumulates; losses and trained params are bitwise the thread backend's, `--check` passes.
#[test]
fn microbatched_training_under_mpi_is_bitwise_identical_to_threads() {
    let file = gpt_train_dp();
    let f = file.to_str().unwrap();
    let run = |tag: &str| {
        let (log, out) = (
            tmp(&format!("mb-{tag}-log.jsonl")),
            tmp(&format!("mb-{tag}-out.npz")),
        );
        let args: Vec<String> = [
            f,
            "--mesh",
            "dp=2,tp=2",
            "--microbatches",
            "2",
            "--steps",
            "3",
        ]
        .map(String::from)
        .into_iter()
        .chain(["--log".into(), log.to_str().unwrap().into()])
        .chain(["--out".into(), out.to_str().unwrap().into()])
        .collect();
        (args, log, out)
    };
    let (mut margs, mlog, mout) = run("mpi");
    margs.push("--check".into());
    let margs: Vec<&str> = margs.iter().map(String::as_str).collect();
    let (m, _) = mpirun(4, &margs, TIMEOUT_S);
    assert!(m.status.success(), "{}", text(&m));
    assert!(String::from_utf8_lossy(&m.stdout).contains("check loss at step 3: "));
    let (targs, tlog, tout) = run("threads");
    let targs: Vec<&str> = targs.iter().map(String::as_str).collect();
    let t = threads(&targs);
    assert!(t.status.success(), "{}", text(&t));
    assert_eq!(
        logged_losses(&mlog),
        logged_losses(&tlog),
        "losses under MPI and threads"
    );
    assert_bitwise_equal(&mout, &tout, "trained params");
}

/// Recompute under MPI: with `--recompute full` each layer's attention all-reduce runs again in
/// the backward on every process, in program order; losses and trained params are bitwise the
/// thread backend's without recompute, and `--check` passes.
#[test]
fn recomputed_training_under_mpi_is_bitwise_identical_to_threads_without_recompute() {
    let file = gpt_train_dp();
    let f = file.to_str().unwrap();
    let run = |tag: &str, policy: &str| {
        let (log, out) = (
            tmp(&format!("remat-{tag}-log.jsonl")),
            tmp(&format!("remat-{tag}-out.npz")),
        );
        let args: Vec<String> = [
            f,
            "--mesh",
            "dp=2,tp=2",
            "--steps",
            "3",
            "--recompute",
            policy,
        ]
        .map(String::from)
        .into_iter()
        .chain(["--log".into(), log.to_str().unwrap().into()])
        .chain(["--out".into(), out.to_str().unwrap().into()])
        .collect();
        (args, log, out)
    };
    for policy in ["selective", "full"] {
        let (mut margs, mlog, mout) = run(&format!("mpi-{policy}"), policy);
        margs.push("--check".into());
        let margs: Vec<&str> = margs.iter().map(String::as_str).collect();
        let (m, _) = mpirun(4, &margs, TIMEOUT_S);
        assert!(m.status.success(), "{}", text(&m));
        assert!(String::from_utf8_lossy(&m.stdout).contains("check loss at step 3: "));
        let (targs, tlog, tout) = run("threads-none", "none");
        let targs: Vec<&str> = targs.iter().map(String::as_str).collect();
        let t = threads(&targs);
        assert!(t.status.success(), "{}", text(&t));
        assert_eq!(
            logged_losses(&mlog),
            logged_losses(&tlog),
            "{policy}: losses"
        );
        assert_bitwise_equal(&mout, &tout, "trained params");
    }
}

/// A rank that fails in a later training step (step 2's tokens are past the vocabulary) ends
/// the whole job quickly, naming the rank and the cause, under MPI and on threads.
#[test]
fn a_rank_failing_in_a_later_training_step_aborts_the_job() {
    let file = gpt_train_dp();
    let inputs = tmp("train-bad-steps.npz");
    let mut tokens = ndarray::ArrayD::from_elem(ndarray::IxDyn(&[2, 4, 16]), 3i32);
    tokens.index_axis_mut(ndarray::Axis(0), 1).fill(5000);
    let arrays = [("tokens".to_string(), Tensor::I32(tokens))].into();
    npz::write(inputs.to_str().unwrap(), &arrays).unwrap();
    let args = [
        file.to_str().unwrap(),
        "--mesh",
        "dp=2,tp=2",
        "--steps",
        "3",
        "--inputs",
        inputs.to_str().unwrap(),
    ];
    let (m, took) = mpirun(4, &args, 120);
    let stderr = assert_a_rank_failed_on_an_id(&m);
    assert!(
        String::from_utf8_lossy(&m.stdout).contains("step 1: loss"),
        "{}",
        text(&m)
    );
    assert!(stderr.contains("step 2: "), "names the step\n{}", text(&m));
    assert!(took < Duration::from_secs(60), "took {took:?}");
    let t = threads(&args);
    assert_eq!(t.status.code(), Some(1), "{}", text(&t));
    assert!(
        String::from_utf8_lossy(&t.stderr).contains("out of range"),
        "{}",
        text(&t)
    );
}

/// Pipeline stages as MPI processes: the boundary messages and the once-per-step transfers go
/// between processes by the schedule; losses and trained params are bitwise the thread
/// backend's, and `--check` passes, on `pp=2,tp=2` and `dp=2,pp=2` under both schedules.
#[test]
fn pipelined_training_under_mpi_is_bitwise_identical_to_threads() {
    for (mesh, schedule) in [("pp=2,tp=2", "1f1b"), ("dp=2,pp=2", "gpipe")] {
        let tag = mesh.replace([',', '='], "");
        let run = |backend: &str| {
            let (log, out) = (
                tmp(&format!("pipe-{tag}-{backend}-log.jsonl")),
                tmp(&format!("pipe-{tag}-{backend}-out.npz")),
            );
            let args: Vec<String> = [
                "examples/gpt_pipe.tpl",
                "--mesh",
                mesh,
                "--schedule",
                schedule,
                "--steps",
                "3",
            ]
            .map(String::from)
            .into_iter()
            .chain(["--log".into(), log.to_str().unwrap().into()])
            .chain(["--out".into(), out.to_str().unwrap().into()])
            .collect();
            (args, log, out)
        };
        let (mut margs, mlog, mout) = run("mpi");
        margs.push("--check".into());
        let margs: Vec<&str> = margs.iter().map(String::as_str).collect();
        let (m, _) = mpirun(4, &margs, TIMEOUT_S);
        assert!(m.status.success(), "{mesh}: {}", text(&m));
        let stdout = String::from_utf8_lossy(&m.stdout);
        assert!(stdout.contains("check loss at step 3: "), "{}", text(&m));
        assert_eq!(stdout.lines().filter(|l| l.starts_with("step ")).count(), 3);
        let (targs, tlog, tout) = run("threads");
        let targs: Vec<&str> = targs.iter().map(String::as_str).collect();
        let t = threads(&targs);
        assert!(t.status.success(), "{}", text(&t));
        assert_eq!(logged_losses(&mlog), logged_losses(&tlog), "{mesh}: losses");
        assert_bitwise_equal(&mout, &tout, &format!("{mesh}: trained params"));
    }
}

/// A stage failing under MPI (a token past the vocabulary in microbatch 1's rows) ends the
/// job quickly, naming the stage and the microbatch.
#[test]
fn a_failing_stage_ends_the_mpi_job() {
    let inputs = tmp("pipe-bad.npz");
    let mut tokens = ndarray::ArrayD::from_elem(ndarray::IxDyn(&[4, 16]), 3i32);
    tokens[[3, 0]] = 5000;
    let arrays = [("tokens".to_string(), Tensor::I32(tokens))].into();
    npz::write(inputs.to_str().unwrap(), &arrays).unwrap();
    let args = [
        "examples/gpt_pipe.tpl",
        "--mesh",
        "pp=2,tp=2",
        "--steps",
        "2",
        "--inputs",
        inputs.to_str().unwrap(),
    ];
    let (m, took) = mpirun(4, &args, 120);
    assert_eq!(m.status.code(), Some(1), "{}", text(&m));
    let stderr = String::from_utf8_lossy(&m.stderr);
    assert!(
        stderr.contains("stage 0, microbatch 1, forward"),
        "{}",
        text(&m)
    );
    assert!(stderr.contains("out of range"), "{}", text(&m));
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

/// Each `--log` line's step number and loss.
fn logged_steps(p: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

/// Sharded checkpoints under MPI: four processes on `dp=2,pp=2` save every 2 of 4 steps into a
/// shared directory, each writing its own rank file and rank 0 committing; the index lists
/// every rank's file and is the thread backend's save bit for bit (same blocks, same sha256);
/// the steps run as the thread backend's; and the thread backend loads the checkpoint on
/// `pp=1,tp=4` and continues with steps 5 and 6 as an uninterrupted 6-step run there does.
#[test]
fn checkpoint_save_under_mpi_loads_with_threads() {
    let (saved_on, loaded_on) = ("dp=2,pp=2", "pp=1,tp=4");
    // `tpc run` of gpt_pipe.tpl on `mesh` for `steps` steps with the flags (each one's value).
    let run = |mesh: &str, steps: &str, flags: &[(&str, &str)]| -> Vec<String> {
        let mut a = vec!["examples/gpt_pipe.tpl", "--mesh", mesh, "--steps", steps];
        for (flag, value) in flags {
            a.extend([*flag, *value]);
        }
        a.into_iter().map(String::from).collect()
    };
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (mdir, tdir) = (tmp("ck-mpi"), tmp("ck-threads"));
    for d in [&mdir, &tdir] {
        let _ = std::fs::remove_dir_all(d);
    }
    let (mlog, tlog) = (tmp("ck-mpi.jsonl"), tmp("ck-threads.jsonl"));
    let (ms, ml) = (s(&mdir), s(&mlog));
    let margs = run(
        saved_on,
        "4",
        &[("--save", &ms), ("--save-every", "2"), ("--log", &ml)],
    );
    let margs: Vec<&str> = margs.iter().map(String::as_str).collect();
    let (m, _) = mpirun(4, &margs, TIMEOUT_S);
    assert!(m.status.success(), "{}", text(&m));

    // What rank 0 committed: `latest` names step 4, both saves are there, every rank's file.
    let latest = std::fs::read_to_string(mdir.join("latest")).unwrap();
    assert_eq!(latest.lines().next(), Some("step-00000004"), "{latest}");
    assert!(mdir.join("step-00000002/index.json").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&mdir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let step4 = mdir.join("step-00000004");
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(step4.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["step"], 4);
    let files = index["files"].as_object().unwrap();
    let want: Vec<String> = (0..4).map(|r| format!("rank-{r:05}.safetensors")).collect();
    assert_eq!(files.keys().cloned().collect::<Vec<_>>(), want);
    for (file, len) in files {
        let on_disk = std::fs::metadata(step4.join(file)).unwrap().len();
        assert_eq!(Some(on_disk), len.as_u64(), "{file}'s length");
    }
    for (name, t) in index["tensors"].as_object().unwrap() {
        for b in t["blocks"].as_array().unwrap() {
            assert!(files.contains_key(b["file"].as_str().unwrap()), "{name}");
        }
    }

    // The same save on threads: the same steps, bit for bit, and the same index (so the same
    // blocks in the same files: every block's sha256 and byte range agree).
    let (ts, tl) = (s(&tdir), s(&tlog));
    let targs = run(
        saved_on,
        "4",
        &[("--save", &ts), ("--save-every", "2"), ("--log", &tl)],
    );
    let targs: Vec<&str> = targs.iter().map(String::as_str).collect();
    let t = threads(&targs);
    assert!(t.status.success(), "{}", text(&t));
    assert_eq!(logged_losses(&mlog), logged_losses(&tlog), "steps 1-4");
    assert_eq!(logged_losses(&mlog).len(), 4);
    for step in ["step-00000002", "step-00000004"] {
        let read = |d: &Path| std::fs::read_to_string(d.join(step).join("index.json")).unwrap();
        assert_eq!(
            read(&mdir),
            read(&tdir),
            "{step}/index.json under MPI and threads"
        );
    }

    // Threads load the MPI checkpoint on another mesh: steps 5 and 6 as if never interrupted.
    let (rlog, wlog) = (tmp("ck-resumed.jsonl"), tmp("ck-whole.jsonl"));
    let rl = s(&rlog);
    let rargs = run(loaded_on, "2", &[("--load", &ms), ("--log", &rl)]);
    let rargs: Vec<&str> = rargs.iter().map(String::as_str).collect();
    let r = threads(&rargs);
    assert!(r.status.success(), "{}", text(&r));
    let wl = s(&wlog);
    let wargs = run(loaded_on, "6", &[("--log", &wl)]);
    let wargs: Vec<&str> = wargs.iter().map(String::as_str).collect();
    let w = threads(&wargs);
    assert!(w.status.success(), "{}", text(&w));
    let (resumed, whole) = (logged_steps(&rlog), logged_steps(&wlog));
    assert_eq!(
        resumed.iter().map(|s| s.0).collect::<Vec<_>>(),
        [5, 6],
        "logged steps are global"
    );
    assert_eq!(whole.len(), 6);
    for ((step, got), (_, want)) in resumed.iter().zip(&whole[4..]) {
        assert!(
            (got - want).abs() <= 1e-5 * want.abs(),
            "step {step} after loading the MPI save on {loaded_on}: {got} vs {want}"
        );
    }

    // MPI loads a checkpoint too (each process reads its own blocks), with --check against the
    // reference started from the checkpoint: bitwise the thread resume on the same mesh.
    let (mrlog, trlog) = (tmp("ck-mpi-resumed.jsonl"), tmp("ck-threads-resumed.jsonl"));
    let (mrl, trl) = (s(&mrlog), s(&trlog));
    let margs = run("dp=2,tp=2", "2", &[("--load", &ts), ("--log", &mrl)]);
    let mut margs: Vec<&str> = margs.iter().map(String::as_str).collect();
    margs.push("--check");
    let (m, _) = mpirun(4, &margs, TIMEOUT_S);
    assert!(m.status.success(), "{}", text(&m));
    assert!(text(&m).contains("check loss at step 6:"), "{}", text(&m));
    let targs = run("dp=2,tp=2", "2", &[("--load", &ts), ("--log", &trl)]);
    let targs: Vec<&str> = targs.iter().map(String::as_str).collect();
    let t = threads(&targs);
    assert!(t.status.success(), "{}", text(&t));
    assert_eq!(
        logged_losses(&mrlog),
        logged_losses(&trlog),
        "steps 5-6 resumed"
    );
    for p in [&mdir, &tdir] {
        let _ = std::fs::remove_dir_all(p);
    }
    for p in [&mlog, &tlog, &rlog, &wlog, &mrlog, &trlog] {
        let _ = std::fs::remove_file(p);
    }
}

/// Each logged step's loss (as written), scale and whether it was skipped.
fn logged_scales(p: &Path) -> Vec<(String, f64, bool)> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let scale = v["scale"].as_f64().expect("a scale in the log");
            let skipped = v["skipped"].as_bool().expect("skipped in the log");
            (v["loss"].to_string(), scale, skipped)
        })
        .collect()
}

/// A dynamic loss scale under MPI with an inf injected into one rank's block of a tp-split
/// gradient at step 3: every process skips the step (one max all-reduce over the whole mesh),
/// the scale doubled after steps 1-2 halves and the training goes on; the log shows each step's
/// scale and skip as the thread run's does, params are bitwise the thread run's, and `--check`
/// (the reference skipping the same step) passes.
#[test]
fn loss_scale_skip_under_mpi_is_the_threads_and_the_references() {
    let file = gpt_train_dp();
    let poison = "3:1:grad(layer.1.mlp.w1)";
    let run = |tag: &str, mpi: bool| {
        let (log, out) = (
            tmp(&format!("ls-{tag}-log.jsonl")),
            tmp(&format!("ls-{tag}-out.npz")),
        );
        let mut cmd: Vec<String> = Vec::new();
        if mpi {
            cmd.extend(
                ["mpirun", "--oversubscribe", "--allow-run-as-root", "-x"].map(String::from),
            );
            cmd.extend(["TPC_TEST_POISON", "-n", "4"].map(String::from));
        }
        cmd.extend([TPC, "run", file.to_str().unwrap()].map(String::from));
        cmd.extend(["--mesh", "dp=2,tp=2", "--steps", "4"].map(String::from));
        cmd.extend(["--loss-scale", "dynamic(2)", "--check"].map(String::from));
        cmd.extend(["--log".into(), log.to_str().unwrap().to_string()]);
        cmd.extend(["--out".into(), out.to_str().unwrap().to_string()]);
        let _one = MPI_JOBS.lock().unwrap_or_else(|e| e.into_inner());
        let o = Command::new("timeout")
            .args(["-k", "10", &TIMEOUT_S.to_string()])
            .args(&cmd)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("TPC_TEST_POISON", poison)
            .output()
            .unwrap();
        assert!(o.status.success(), "{tag}: {}", text(&o));
        let stdout = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(stdout.contains("check loss at step 4: "), "{}", text(&o));
        (logged_scales(&log), out)
    };
    let (m, m_out) = run("mpi", true);
    let (t, t_out) = run("threads", false);
    let k = 65536.0;
    let seen: Vec<(f64, bool)> = m.iter().map(|l| (l.1, l.2)).collect();
    assert_eq!(seen, [(k, false), (k, false), (2.0 * k, true), (k, false)]);
    assert_eq!(m, t, "the MPI log is the thread run's");
    assert_bitwise_equal(&m_out, &t_out, "trained params");
}
