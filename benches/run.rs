//! Execution benchmarks (prints figures; not a timed test). Run: `cargo bench --bench run`, or
//! one section: `cargo bench --bench run -- matmul|allreduce|gpt|grad|train`. `-- profile-gpt` runs only
//! the sharded gpt forward (20 steps), to profile the bench binary with `perf record`.
//!
//! Machines are noisy and differ (AVX2 only or AVX-512), so every figure is printed beside a
//! reference measured in the same run, as a ratio, with the CPU it ran on:
//!
//! 1. `matmul`: f32 `tpc::exec::kernels::matmul` (gemm crate, single-threaded) at 1024³, 2048³
//!    and the per-rank matmul shapes of gpt.tpl (H=256, S=64, B=2, NH=8, degree 8, read off the
//!    plan), on 1 thread and on 2 threads (two concurrent single-threaded calls on independent
//!    data, as two ranks do), against numpy's matmul (OpenBLAS, one BLAS thread per call) run
//!    by `benches/matmul_numpy.py`, interleaved with ours. Goal: >= 0.8x OpenBLAS.
//! 2. `allreduce`: ring all-reduce of 64 MiB over 8 ranks of the thread transport; bus
//!    bandwidth 2(n-1)/n * bytes / time against memcpy into an already touched buffer of the
//!    same size. Goal: >= 0.5x.
//! 3. `gpt`: gpt.tpl at H=256, S=64, B=2, NH=8, L=64, forward, degree 8 on the thread runtime:
//!    median step time, beside the unsharded reference interpreter and JAX GSPMD running the
//!    same function with the same params (written to an npz) and the same Megatron sharding on
//!    8 virtual CPU devices (`benches/peers/jax_gpt.py`), unrolled and with `lax.scan`; the
//!    losses are compared. Goal: no slower than JAX.
//! 4. `grad`: the gradients of gpt.tpl's training step (same shape, L=4), computed by tpc at
//!    degree 8 on the thread runtime, against `jax.grad` of the same function in float64 on the
//!    same params (`benches/peers/jax_grad.py`); JAX in float32 is printed beside tpc as the
//!    error of an f32 implementation. Goal: tpc's error no larger than JAX f32's.
//! 5. `train`: gpt.tpl's training step (same shape, L=16: forward, backward, SGD update) at
//!    degree 8, the ranks keeping their blocks across steps, against JAX GSPMD's jitted
//!    `value_and_grad` + the same update with the params donated, on the same params and
//!    sharding (`benches/peers/jax_train.py`); every step's loss is compared. Goal: no slower
//!    than JAX.
//!
//! Python: `target/benchvenv/bin/python` in the build folder, made by `bash benches/setup_peers.sh`
//! (numpy, threadpoolctl and jax[cpu] at the versions of `benches/peers/requirements.txt`), or
//! `TPC_BENCH_PYTHON`; a missing interpreter or package skips that column with a note. The numpy child
//! runs with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset, so OpenBLAS picks its own kernel.

use ndarray::{ArrayD, IxDyn};
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::hint::black_box;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Barrier;
use std::time::Instant;
use tpc::driver::{compile_plan, read_source};
use tpc::exec::comm::{all_reduce, ThreadTransport};
use tpc::exec::kernels::matmul;
use tpc::exec::leaves::{global_leaves, LeafSource};
use tpc::exec::spmd::run_threads;
use tpc::exec::{npz, reference, Tensor};
use tpc::ir::{Op, ReduceOp};
use tpc::mesh::{Device, Mesh};
use tpc::plan::Plan;

const GPT: &[(&str, i64)] = &[("H", 256), ("S", 64), ("B", 2), ("NH", 8), ("L", 64)];
const DEGREE: u64 = 8;

fn main() {
    let sections: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |s: &str| sections.is_empty() || sections.iter().any(|x| x == s);
    if sections.iter().any(|x| x == "profile-gpt") {
        // Only the sharded gpt forward, 20 steps, nothing else: for `perf record` on this binary.
        let out = run_threads(&gpt_plan(), &LeafSource::Seed(0), 20, None).expect("tpc run");
        let (min, med) = min_median(&out.stats.step_times);
        println!(
            "gpt forward, degree {DEGREE}: median {:.1} ms, min {:.1} ms",
            med * 1e3,
            min * 1e3
        );
        return;
    }
    println!("# tpc execution benchmarks");
    print_machine();
    let python = python();
    let plan = gpt_plan();
    if want("matmul") {
        bench_matmul(&plan, python.as_deref());
    }
    if want("allreduce") {
        bench_allreduce();
    }
    if want("gpt") {
        bench_gpt(&plan, python.as_deref());
    }
    if want("grad") {
        bench_grad(python.as_deref());
    }
    if want("train") {
        bench_train(python.as_deref());
    }
}

// ---------------------------------------------------------------------------------------------
// Machine, python, helpers

fn print_machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        cpuinfo
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let model = field("model name").unwrap_or_else(|| "unknown".into());
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let avx512 = std::arch::is_x86_feature_detected!("avx512f");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "CPU: {model}, {cores} logical cores; AVX-512: {} (avx512f {}), AVX2: {}, FMA: {}",
        if avx512 { "yes" } else { "no" },
        if has("avx512f") {
            "in /proc/cpuinfo"
        } else {
            "absent"
        },
        if std::arch::is_x86_feature_detected!("avx2") {
            "yes"
        } else {
            "no"
        },
        if std::arch::is_x86_feature_detected!("fma") {
            "yes"
        } else {
            "no"
        },
    );
    println!("load average at start: {}", load.join(" "));
}

/// The peers' interpreter: `TPC_BENCH_PYTHON`, else `benchvenv/bin/python` in the build folder
/// (made by `benches/setup_peers.sh`).
fn python() -> Option<PathBuf> {
    let p = match std::env::var_os("TPC_BENCH_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => target_dir().join("benchvenv/bin/python"),
    };
    if p.exists() {
        Some(p)
    } else {
        println!(
            "note: no python at {}: the numpy and JAX columns are skipped; \
             run `bash benches/setup_peers.sh` (or set TPC_BENCH_PYTHON)",
            p.display()
        );
        None
    }
}

/// The build folder: `CARGO_TARGET_DIR` (relative to the repository) or the repository's
/// `target/`, as `benches/setup_peers.sh` resolves it.
fn target_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(t) => root.join(t),
        None => root.join("target"),
    }
}

fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("benches")
}

fn gpt_plan() -> Plan {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gpt.tpl");
    let src = read_source(path.to_str().expect("utf-8 path")).expect("gpt.tpl reads");
    let sets: Vec<(String, i64)> = GPT.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    compile_plan(
        &src,
        &sets,
        Mesh::degree(DEGREE).unwrap(),
        Device::default(),
    )
    .unwrap_or_else(|e| panic!("gpt.tpl compiles: {}", e.render(Some(&src))))
}

fn sorted(v: &[f64]) -> Vec<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

fn min_median(v: &[f64]) -> (f64, f64) {
    let s = sorted(v);
    (s[0], s[s.len() / 2])
}

/// Deterministic values in [-1, 1).
fn fill(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. matmul

/// Sampling parameters, the same on both sides (sent to the numpy script).
const MIN_TIME: f64 = 0.3;
const MIN_SAMPLES: usize = 7;
const SAMPLE_TIME: f64 = 0.02;
/// Measurements alternate tpc, numpy, tpc, numpy, ... this many rounds (drifting load).
const ROUNDS: usize = 3;

/// Calibrates `iters` so one sample takes >= SAMPLE_TIME, then samples until MIN_SAMPLES and
/// MIN_TIME; returns seconds per call of every sample.
fn run_samples(mut sample: impl FnMut(usize) -> f64) -> Vec<f64> {
    let (mut iters, mut t) = (1usize, sample(1));
    while t < SAMPLE_TIME && iters < 1 << 20 {
        let want = (iters as f64 * SAMPLE_TIME / t.max(1e-9)) as usize + 1;
        iters = want.clamp(2 * iters, 16 * iters).min(1 << 20);
        t = sample(iters);
        if std::env::var_os("TPC_BENCH_DEBUG").is_some() {
            eprintln!("calibrate: {iters} iters take {t:.6} s");
        }
    }
    let mut out = Vec::new();
    let start = Instant::now();
    while (out.len() < MIN_SAMPLES || start.elapsed().as_secs_f64() < MIN_TIME) && out.len() < 200 {
        out.push(sample(iters) / iters as f64);
    }
    out
}

fn operands(sa: &[usize], sb: &[usize], seed: u64) -> (ArrayD<f32>, ArrayD<f32>) {
    let n = |s: &[usize]| s.iter().product::<usize>();
    (
        ArrayD::from_shape_vec(IxDyn(sa), fill(n(sa), seed)).unwrap(),
        ArrayD::from_shape_vec(IxDyn(sb), fill(n(sb), seed + 1)).unwrap(),
    )
}

/// Seconds per `matmul` call, `k` concurrent callers on independent data.
fn time_tpc_matmul(sa: &[usize], sb: &[usize], k: usize) -> Vec<f64> {
    let data: Vec<_> = (0..k)
        .map(|i| operands(sa, sb, 10 + 2 * i as u64))
        .collect();
    if k == 1 {
        let (a, b) = &data[0];
        return run_samples(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                black_box(matmul(black_box(a), black_box(b)).unwrap());
            }
            t.elapsed().as_secs_f64()
        });
    }
    // Each worker times its own `iters` calls; a sample is the slowest worker's time (timing
    // in the main thread would be wrong when it is preempted between the barriers).
    let start = Barrier::new(k + 1);
    let done = Barrier::new(k + 1);
    let iters = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let times: Vec<AtomicU64> = (0..k).map(|_| AtomicU64::new(0)).collect();
    std::thread::scope(|s| {
        for ((a, b), slot) in data.iter().zip(&times) {
            let (start, done, iters, stop) = (&start, &done, &iters, &stop);
            s.spawn(move || loop {
                start.wait();
                if stop.load(Ordering::Acquire) {
                    return;
                }
                let t = Instant::now();
                for _ in 0..iters.load(Ordering::Acquire) {
                    black_box(matmul(black_box(a), black_box(b)).unwrap());
                }
                slot.store(t.elapsed().as_nanos() as u64, Ordering::Release);
                done.wait();
            });
        }
        let out = run_samples(|n| {
            iters.store(n, Ordering::Release);
            start.wait();
            done.wait();
            times
                .iter()
                .map(|t| t.load(Ordering::Acquire))
                .max()
                .unwrap_or(0) as f64
                * 1e-9
        });
        stop.store(true, Ordering::Release);
        start.wait();
        out
    })
}

/// The numpy child (matmul_numpy.py): requests and results as JSON lines.
struct Numpy {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Numpy {
    fn start(python: &Path) -> Result<(Numpy, Json), String> {
        let script = bench_dir().join("matmul_numpy.py");
        let mut child = Command::new(python)
            .arg(&script)
            // Some machines pin OpenBLAS to an older kernel; let it pick its own (this child only).
            .env_remove("OPENBLAS_CORETYPE")
            .env_remove("OPENBLAS_L2_SIZE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", python.display()))?;
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        match read_json_line(&mut stdout) {
            Ok(header) => Ok((
                Numpy {
                    child,
                    stdin,
                    stdout,
                },
                header,
            )),
            Err(_) => {
                drop(stdin);
                let err = child
                    .wait_with_output()
                    .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
                    .unwrap_or_default();
                Err(format!("matmul_numpy.py failed: {}", last_line(&err)))
            }
        }
    }

    fn line(&mut self) -> Result<Json, String> {
        read_json_line(&mut self.stdout)
    }

    /// Seconds per call: (best, median) of the child's samples.
    fn time(&mut self, sa: &[usize], sb: &[usize], k: usize) -> Result<(f64, f64), String> {
        let req = serde_json::json!({
            "a": sa, "b": sb, "threads": k,
            "min_time": MIN_TIME, "min_samples": MIN_SAMPLES, "sample_time": SAMPLE_TIME,
        });
        writeln!(self.stdin, "{req}").map_err(|e| e.to_string())?;
        self.stdin.flush().map_err(|e| e.to_string())?;
        let r = self.line()?;
        let f = |k: &str| r[k].as_f64().ok_or_else(|| format!("no `{k}` in {r}"));
        Ok((f("best_s")?, f("median_s")?))
    }
}

impl Drop for Numpy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_json_line(r: &mut impl BufRead) -> Result<Json, String> {
    let mut s = String::new();
    r.read_line(&mut s).map_err(|e| e.to_string())?;
    serde_json::from_str(&s).map_err(|e| format!("bad reply `{}`: {e}", s.trim()))
}

fn last_line(s: &str) -> &str {
    s.lines().last().unwrap_or("")
}

/// The distinct local matmul operand shapes of the plan, with how often each runs per step.
fn plan_matmuls(plan: &Plan) -> Vec<(Vec<usize>, Vec<usize>, usize)> {
    let g = &plan.local;
    let mut out: Vec<(Vec<usize>, Vec<usize>, usize)> = Vec::new();
    for (_, n) in g.nodes() {
        if !matches!(n.op, Op::MatMul) {
            continue;
        }
        let s = |i: usize| -> Vec<usize> {
            g.ty(n.inputs[i])
                .shape
                .iter()
                .map(|&d| d as usize)
                .collect()
        };
        let (a, b) = (s(0), s(1));
        match out.iter_mut().find(|(x, y, _)| *x == a && *y == b) {
            Some(e) => e.2 += 1,
            None => out.push((a, b, 1)),
        }
    }
    out
}

/// 2·m·k·n·batch of `a @ b` (batch dims broadcast; a rank-2 b shared by a's batch).
fn flops(a: &[usize], b: &[usize]) -> f64 {
    let (m, k) = (a[a.len() - 2], a[a.len() - 1]);
    let n = b[b.len() - 1];
    let ba: usize = a[..a.len() - 2].iter().product();
    let bb: usize = b[..b.len() - 2].iter().product();
    2.0 * (m * k * n * ba.max(bb)) as f64
}

fn shape_str(s: &[usize]) -> String {
    format!(
        "[{}]",
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(",")
    )
}

fn bench_matmul(plan: &Plan, python: Option<&Path>) {
    println!("\n## 1. f32 matmul: tpc (gemm 0.19, one thread per call) vs numpy (OpenBLAS, one BLAS thread per call)");
    println!("GFLOP/s from the best sample (median in parentheses); 2 threads = two concurrent calls on independent data, aggregate GFLOP/s.");
    println!("tpc/numpy: ratio of the best samples (in parentheses: median over the {ROUNDS} alternating rounds of the ratio of the round medians).");
    let mut np = match python {
        None => None,
        Some(p) => match Numpy::start(p) {
            Ok((np, header)) => {
                let blas: Vec<String> = header["blas"]
                    .as_array()
                    .map(|v| {
                        v.iter()
                            .map(|l| {
                                format!(
                                    "{} {} kernel {} ({})",
                                    l["internal_api"].as_str().unwrap_or("?"),
                                    l["version"].as_str().unwrap_or("?"),
                                    l["architecture"].as_str().unwrap_or("?"),
                                    l["filepath"]
                                        .as_str()
                                        .and_then(|f| f.rsplit('/').next())
                                        .unwrap_or("?"),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                println!(
                    "numpy {}; BLAS as threadpoolctl reports it: {}",
                    header["numpy"].as_str().unwrap_or("?"),
                    blas.join("; ")
                );
                Some(np)
            }
            Err(e) => {
                println!("note: numpy column skipped: {e}");
                None
            }
        },
    };
    let mut shapes: Vec<(Vec<usize>, Vec<usize>, String)> = vec![
        (vec![1024, 1024], vec![1024, 1024], "1024³".into()),
        (vec![2048, 2048], vec![2048, 2048], "2048³".into()),
    ];
    for (a, b, count) in plan_matmuls(plan) {
        shapes.push((a, b, format!("gpt rank, {count}×/step")));
    }
    println!();
    println!("| shape | where | threads | tpc GFLOP/s | numpy GFLOP/s | tpc/numpy |");
    println!("|---|---|---|---|---|---|");
    for (a, b, what) in &shapes {
        let f = flops(a, b);
        for k in [1usize, 2] {
            // Per round: tpc's samples, then numpy's best and median; rounds alternate the two
            // so that a slow drift of the machine's load hits both.
            let (mut tpc, mut nb, mut nm, mut paired) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut np_err = None;
            for _ in 0..ROUNDS {
                let round = time_tpc_matmul(a, b, k);
                let (_, round_med) = min_median(&round);
                tpc.extend(round);
                if let Some(n) = np.as_mut() {
                    match n.time(a, b, k) {
                        Ok((best, med)) => {
                            nb.push(best);
                            nm.push(med);
                            paired.push(med / round_med);
                        }
                        Err(e) => np_err = Some(e),
                    }
                }
            }
            let gf = |t: f64| k as f64 * f / t / 1e9;
            let (tb, tm) = min_median(&tpc);
            let (numpy, ratio) = if let Some(e) = np_err {
                (format!("error: {e}"), "–".to_string())
            } else if nb.is_empty() {
                ("skipped".to_string(), "–".to_string())
            } else {
                let best = sorted(&nb)[0];
                let med = sorted(&nm)[nm.len() / 2];
                let (_, paired_med) = min_median(&paired);
                (
                    format!("{:.1} ({:.1})", gf(best), gf(med)),
                    format!("{:.2} ({:.2})", best / tb, paired_med),
                )
            };
            println!(
                "| {}@{} | {what} | {k} | {:.1} ({:.1}) | {numpy} | {ratio} |",
                shape_str(a),
                shape_str(b),
                gf(tb),
                gf(tm),
            );
        }
    }
    println!("goal: tpc/numpy >= 0.8");
}

// ---------------------------------------------------------------------------------------------
// 2. all-reduce

const AR_RANKS: usize = 8;
const AR_BYTES: usize = 64 << 20;
const AR_REPS: usize = 7;

/// Times `all_reduce` of AR_BYTES per rank over a world of `ranks` threads: per repetition, from
/// a barrier to a barrier, the slowest rank; checks the result.
fn time_all_reduce(ranks: usize) -> Vec<f64> {
    let len = AR_BYTES / 4;
    let group: Vec<usize> = (0..ranks).collect();
    let barrier = Barrier::new(ranks);
    std::thread::scope(|s| {
        let handles: Vec<_> = ThreadTransport::world(ranks)
            .into_iter()
            .map(|mut t| {
                let (barrier, group) = (&barrier, &group);
                s.spawn(move || {
                    let mut data = vec![0.0f32; len];
                    let mut times = Vec::new();
                    for rep in 0..=AR_REPS {
                        data.fill(1.0);
                        barrier.wait();
                        let t0 = Instant::now();
                        all_reduce(&mut t, group, &mut data, ReduceOp::Sum).expect("all-reduce");
                        barrier.wait();
                        if rep > 0 {
                            times.push(t0.elapsed().as_secs_f64());
                        }
                    }
                    assert!(data.iter().all(|&v| v == ranks as f32), "all-reduce result");
                    times
                })
            })
            .collect();
        let all: Vec<Vec<f64>> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        (0..AR_REPS)
            .map(|i| all.iter().map(|t| t[i]).fold(0.0, f64::max))
            .collect()
    })
}

fn bench_allreduce() {
    println!("\n## 2. all-reduce, 64 MiB f32 per rank, 8 ranks, thread transport (halving-doubling), vs memcpy into a touched buffer");
    let len = AR_BYTES / 4;
    let times = time_all_reduce(AR_RANKS);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let few = time_all_reduce(cores.clamp(2, AR_RANKS).next_power_of_two().min(AR_RANKS));
    let bus_n = |n: usize, t: f64| 2.0 * (n - 1) as f64 / n as f64 * AR_BYTES as f64 / t / 1e9;
    let bus = |t: f64| bus_n(AR_RANKS, t);

    let src = vec![1.0f32; len];
    let mut dst = vec![0.0f32; len];
    let mut copy = Vec::new();
    let mut fresh = Vec::new();
    for rep in 0..=10 {
        let t = Instant::now();
        dst.copy_from_slice(black_box(&src));
        black_box(&mut dst);
        if rep > 0 {
            copy.push(t.elapsed().as_secs_f64());
        }
    }
    for _ in 0..5 {
        let t = Instant::now();
        let v = black_box(&src).to_vec();
        black_box(&v);
        fresh.push(t.elapsed().as_secs_f64());
        drop(v);
    }
    // Context: both cores copying at once (each thread its own touched 64 MiB pair), the most
    // the 8 ranks sharing this machine's cores could get from memory together.
    let pairs: Vec<(Vec<f32>, Vec<f32>)> = (0..cores)
        .map(|_| (vec![1.0f32; len], vec![0.0f32; len]))
        .collect();
    let par_barrier = Barrier::new(cores);
    let par: Vec<Vec<f64>> = std::thread::scope(|s| {
        let hs: Vec<_> = pairs
            .into_iter()
            .map(|(src, mut dst)| {
                let b = &par_barrier;
                s.spawn(move || {
                    (0..=10)
                        .map(|_| {
                            b.wait();
                            let t = Instant::now();
                            dst.copy_from_slice(black_box(&src));
                            black_box(&mut dst);
                            t.elapsed().as_secs_f64()
                        })
                        .skip(1)
                        .collect::<Vec<f64>>()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let par: Vec<f64> = (0..10)
        .map(|i| par.iter().map(|t| t[i]).fold(0.0, f64::max))
        .collect();
    let bw = |t: f64| AR_BYTES as f64 / t / 1e9;
    let (pa_min, pa_med) = min_median(&par);
    let (ar_min, ar_med) = min_median(&times);
    let (cp_min, cp_med) = min_median(&copy);
    let (fr_min, fr_med) = min_median(&fresh);
    println!();
    println!("| what | time min / median | GB/s best / median |");
    println!("|---|---|---|");
    println!(
        "| all-reduce 64 MiB × 8 ranks (bus bandwidth 2(n−1)/n·bytes/time) | {:.1} / {:.1} ms | {:.2} / {:.2} |",
        ar_min * 1e3, ar_med * 1e3, bus(ar_min), bus(ar_med)
    );
    println!(
        "| memcpy 64 MiB into a touched buffer (reference) | {:.2} / {:.2} ms | {:.2} / {:.2} |",
        cp_min * 1e3,
        cp_med * 1e3,
        bw(cp_min),
        bw(cp_med)
    );
    println!(
        "| (context) copy into a fresh 64 MiB allocation (`to_vec`) | {:.2} / {:.2} ms | {:.2} / {:.2} |",
        fr_min * 1e3, fr_med * 1e3, bw(fr_min), bw(fr_med)
    );
    println!(
        "| (context) memcpy 64 MiB on each of the {cores} cores at once, aggregate | {:.2} / {:.2} ms | {:.2} / {:.2} |",
        pa_min * 1e3, pa_med * 1e3, cores as f64 * bw(pa_min), cores as f64 * bw(pa_med)
    );
    let n_few = cores.clamp(2, AR_RANKS).next_power_of_two().min(AR_RANKS);
    let (fw_min, fw_med) = min_median(&few);
    println!(
        "| (context) all-reduce 64 MiB × {n_few} ranks, at most one per core | {:.1} / {:.1} ms | {:.2} / {:.2} |",
        fw_min * 1e3, fw_med * 1e3, bus_n(n_few, fw_min), bus_n(n_few, fw_med)
    );
    println!(
        "all-reduce bus bandwidth / memcpy: {:.3} (best) / {:.3} (median); goal >= 0.5; {} repetitions",
        bus(ar_min) / bw(cp_min),
        bus(ar_med) / bw(cp_med),
        AR_REPS
    );
    // Over point-to-point messages every rank receives at least 2(n-1)/n·bytes (the all-reduce
    // bandwidth lower bound), and taking in a received byte costs at least a copy; the n ranks
    // share the machine's cores, so together they copy at most at the aggregate rate.
    let bound = cores as f64 * bw(pa_min) / AR_RANKS as f64;
    println!(
        "bound for point-to-point algorithms with {AR_RANKS} ranks on {cores} cores: bus bandwidth <= aggregate copy rate / ranks = {bound:.2} GB/s = {:.3} × memcpy; all-reduce / bound: {:.2} (best)",
        bound / bw(cp_min),
        bus(ar_min) / bound
    );
    println!(
        "{n_few} ranks (<= cores, the bound does not bind): bus bandwidth / memcpy {:.3} (best) / {:.3} (median)",
        bus_n(n_few, fw_min) / bw(cp_min),
        bus_n(n_few, fw_med) / bw(cp_med)
    );
}

// ---------------------------------------------------------------------------------------------
// 3. gpt forward

const GPT_STEPS: usize = 5;
const REF_REPS: usize = 3;
const JAX_REPS: usize = 10;

fn scalar(outputs: &BTreeMap<String, Tensor>, name: &str) -> f32 {
    outputs[name]
        .as_f32()
        .expect("f32 output")
        .iter()
        .copied()
        .next()
        .unwrap()
}

fn bench_gpt(plan: &Plan, python: Option<&Path>) {
    let dims: Vec<String> = GPT.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "\n## 3. gpt.tpl forward ({}, V=4096), degree {DEGREE}: tpc thread runtime vs the unsharded reference vs JAX GSPMD",
        dims.join(", ")
    );
    let source = LeafSource::Seed(0);
    let out = run_threads(plan, &source, GPT_STEPS, None).expect("tpc run");
    let (t_min, t_med) = min_median(&out.stats.step_times);
    let loss = scalar(&out.outputs, "loss");
    let colls: Vec<String> = out
        .stats
        .collectives
        .iter()
        .map(|(k, (n, b))| format!("{n} {k} ({:.1} KiB/rank)", *b as f64 / 1024.0))
        .collect();

    let leaves = global_leaves(&plan.global, &source).expect("leaves");
    let mut ref_times = Vec::new();
    let mut ref_loss = f32::NAN;
    for _ in 0..REF_REPS {
        let t = Instant::now();
        let r = reference::run(&plan.global, &leaves, &leaves).expect("reference run");
        ref_times.push(t.elapsed().as_secs_f64());
        ref_loss = scalar(&r, "loss");
    }
    let (r_min, r_med) = min_median(&ref_times);

    let jax = python.map(|p| run_jax(p, &leaves));

    println!();
    println!("| what | ms per forward, median (min) | tpc / this |");
    println!("|---|---|---|");
    println!(
        "| tpc, degree {DEGREE}, thread runtime ({GPT_STEPS} steps) | {:.1} ({:.1}) | 1 |",
        t_med * 1e3,
        t_min * 1e3
    );
    println!(
        "| tpc unsharded reference interpreter ({REF_REPS} runs) | {:.1} ({:.1}) | {:.2} |",
        r_med * 1e3,
        r_min * 1e3,
        t_med / r_med
    );
    let mut losses = vec![
        ("tpc degree 8".to_string(), loss),
        ("tpc reference".into(), ref_loss),
    ];
    match &jax {
        None => println!("| JAX | skipped: no python | – |"),
        Some(Err(e)) => println!("| JAX | skipped: {e} | – |"),
        Some(Ok(j)) => {
            for name in ["unrolled", "scan"] {
                let v = &j["variants"][name];
                if v.is_null() {
                    continue;
                }
                let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
                println!(
                    "| JAX {} GSPMD {name}, {} devices ({} reps; compile {:.2} s; {} all-reduce in HLO) | {:.1} ({:.1}) | {:.2} |",
                    j["jax"].as_str().unwrap_or("?"),
                    j["devices"],
                    v["reps"],
                    f("compile_s"),
                    v["all_reduce_ops_in_hlo"],
                    f("median_ms"),
                    f("min_ms"),
                    t_med * 1e3 / f("median_ms"),
                );
                losses.push((format!("JAX {name}"), f("loss") as f32));
            }
        }
    }
    println!();
    println!("collectives per rank per step (tpc): {}", colls.join(", "));
    println!(
        "peak live bytes per rank (tpc): {:.2} MiB",
        out.stats.peak_bytes_per_rank as f64 / (1 << 20) as f64
    );
    println!("losses (difference from tpc degree 8):");
    for (name, l) in &losses {
        println!("  {name:<16} {l:.9}  ({:+.3e})", *l as f64 - loss as f64);
    }
    println!("goal: tpc / JAX <= 1 (no slower than JAX)");
}

fn run_jax(python: &Path, leaves: &BTreeMap<String, Tensor>) -> Result<Json, String> {
    let npz = TempNpz::write("gpt", leaves)?;
    let layers = GPT.iter().find(|(k, _)| *k == "L").unwrap().1;
    let heads = GPT.iter().find(|(k, _)| *k == "NH").unwrap().1;
    let args = [
        npz.path.clone(),
        "--layers".into(),
        layers.to_string(),
        "--heads".into(),
        heads.to_string(),
        "--devices".into(),
        DEGREE.to_string(),
        "--reps".into(),
        JAX_REPS.to_string(),
    ];
    run_peer(python, "jax_gpt.py", &args, true)
}

/// An npz of `arrays` in the temp folder, removed when dropped.
struct TempNpz {
    path: String,
}

impl TempNpz {
    fn write(what: &str, arrays: &BTreeMap<String, Tensor>) -> Result<TempNpz, String> {
        let p = std::env::temp_dir().join(format!("tpc-bench-{what}-{}.npz", std::process::id()));
        let path = p.to_str().ok_or("temp path is not UTF-8")?.to_string();
        npz::write(&path, arrays).map_err(|e| e.to_string())?;
        Ok(TempNpz { path })
    }
}

impl Drop for TempNpz {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Runs `benches/peers/SCRIPT ARGS` on the CPU backend (with `DEGREE` virtual devices when
/// `devices`) and reads the JSON document its last line prints.
fn run_peer(python: &Path, script: &str, args: &[String], devices: bool) -> Result<Json, String> {
    let mut cmd = Command::new(python);
    cmd.arg(bench_dir().join("peers").join(script))
        .args(args)
        .env("JAX_PLATFORMS", "cpu");
    if devices {
        let mut flags = std::env::var("XLA_FLAGS").unwrap_or_default();
        flags.push_str(&format!(" --xla_force_host_platform_device_count={DEGREE}"));
        cmd.env("XLA_FLAGS", flags.trim());
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot start {}: {e}", python.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{script} failed: {}", last_line(err.trim())));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(last_line(text.trim())).map_err(|e| format!("{script} output: {e}"))
}

// ---------------------------------------------------------------------------------------------
// 4. Gradients against jax.grad

/// Layers of the gradient check (the rest of the shape is `GPT`'s).
const GRAD_LAYERS: i64 = 4;

fn bench_grad(python: Option<&Path>) {
    println!("\n## 4. gpt.tpl training step gradients (L={GRAD_LAYERS}), degree {DEGREE}, against jax.grad");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gpt.tpl");
    let text =
        std::fs::read_to_string(&path).expect("gpt.tpl reads") + "train loss with sgd(lr=0.1)\n";
    let src = tpc::diag::SourceFile::new("gpt.tpl", text);
    let mut sets: Vec<(String, i64)> = GPT.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    sets.retain(|(k, _)| k != "L");
    sets.push(("L".into(), GRAD_LAYERS));
    let plan = compile_plan(
        &src,
        &sets,
        Mesh::degree(DEGREE).unwrap(),
        Device::default(),
    )
    .unwrap_or_else(|e| panic!("gpt.tpl trains: {}", e.render(Some(&src))));
    let source = LeafSource::Seed(0);
    let out = run_threads(&plan, &source, 1, None).expect("tpc run");
    let grads: BTreeMap<String, Tensor> = out
        .outputs
        .iter()
        .filter_map(|(k, t)| Some((tpc::autodiff::param_of_grad(k)?.to_string(), t.clone())))
        .collect();
    let leaves = global_leaves(&plan.global, &source).expect("leaves");
    let Some(python) = python else {
        println!("skipped: no python");
        return;
    };
    match run_jax_grad(python, &leaves, &grads) {
        Err(e) => println!("skipped: {e}"),
        Ok(j) => {
            let f = |k: &str| j[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "| what | max relative error over the {} params | / JAX f32 |",
                grads.len()
            );
            println!("|---|---|---|");
            println!(
                "| tpc degree {DEGREE} vs JAX f64 | {:.3e} (worst: {}) | {:.2} |",
                f("max_rel_tpc"),
                j["worst_param"].as_str().unwrap_or("?"),
                f("max_rel_tpc") / f("max_rel_jax_f32")
            );
            println!(
                "| JAX {} f32 vs JAX f64 | {:.3e} | 1 |",
                j["jax"].as_str().unwrap_or("?"),
                f("max_rel_jax_f32")
            );
            println!(
                "loss: tpc {:.9}, JAX f64 {:.9}",
                scalar(&out.outputs, "loss"),
                f("loss_f64")
            );
            println!("error: ||g - g64|| / max(||g64||, 1e-4 ||all of g64||) per param");
            println!("goal: tpc / JAX f32 <= 1");
        }
    }
}

fn run_jax_grad(
    python: &Path,
    leaves: &BTreeMap<String, Tensor>,
    grads: &BTreeMap<String, Tensor>,
) -> Result<Json, String> {
    let (l, g) = (
        TempNpz::write("leaves", leaves)?,
        TempNpz::write("grads", grads)?,
    );
    let heads = GPT.iter().find(|(k, _)| *k == "NH").unwrap().1;
    let args = [
        l.path.clone(),
        g.path.clone(),
        "--layers".into(),
        GRAD_LAYERS.to_string(),
        "--heads".into(),
        heads.to_string(),
    ];
    run_peer(python, "jax_grad.py", &args, false)
}

// ---------------------------------------------------------------------------------------------
// 5. Training step time against JAX

/// Layers of the training-step benchmark (the rest of the shape is `GPT`'s).
const TRAIN_LAYERS: i64 = 16;
/// Timed steps after one warm-up, for tpc and JAX alike.
const TRAIN_STEPS: usize = 10;
/// The SGD learning rate of both.
const TRAIN_LR: f64 = 0.1;

fn bench_train(python: Option<&Path>) {
    println!(
        "\n## 5. gpt.tpl training step (L={TRAIN_LAYERS}, forward + backward + SGD update), degree {DEGREE}: tpc vs JAX GSPMD"
    );
    let (c, plan) = train_plan();
    let source = LeafSource::Seed(0);
    let stepped = BTreeMap::new();
    let steps = tpc::exec::train::Steps {
        count: TRAIN_STEPS + 1,
        start: &source,
        stepped: &stepped,
        reseed: None,
        carried: &c.carried,
        loss: "loss",
        keep_first: false,
    };
    let trained = tpc::exec::train::train_threads(&plan, &steps, None).expect("tpc trains");
    let times: Vec<f64> = trained.losses[1..].iter().map(|l| l.1).collect();
    let tpc_losses: Vec<f32> = trained.losses.iter().map(|l| l.0).collect();
    let all = global_leaves(&plan.global, &source).expect("leaves");
    let t = Instant::now();
    reference::run(&plan.global, &all, &all).expect("reference step");
    let ref_s = t.elapsed().as_secs_f64();
    let jax = python.map(|p| run_jax_train(p, &params_and_inputs(&plan, &all)));
    let jax_losses = print_train_table(min_median(&times), ref_s, jax.as_ref());
    println!();
    println!("loss per step (tpc degree {DEGREE} | JAX | relative difference):");
    for (s, l) in tpc_losses.iter().enumerate() {
        match jax_losses.get(s) {
            Some(j) => println!(
                "  step {:>2}: {l:.9} | {j:.9} | {:+.2e}",
                s + 1,
                (*l as f64 - j) / j.abs()
            ),
            None => println!("  step {:>2}: {l:.9}", s + 1),
        }
    }
    println!("goal: tpc / JAX <= 1 (no slower than JAX)");
}

/// gpt.tpl at `TRAIN_LAYERS` with an SGD step, compiled and planned at degree `DEGREE`.
fn train_plan() -> (tpc::driver::Compiled, Plan) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/gpt.tpl");
    let text = std::fs::read_to_string(&path).expect("gpt.tpl reads")
        + &format!("train loss with sgd(lr={TRAIN_LR})\n");
    let src = tpc::diag::SourceFile::new("gpt.tpl", text);
    let mut sets: Vec<(String, i64)> = GPT.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    sets.retain(|(k, _)| k != "L");
    sets.push(("L".into(), TRAIN_LAYERS));
    let mut c = tpc::driver::compile_step(&src, &sets, false)
        .unwrap_or_else(|e| panic!("gpt.tpl trains: {}", e.render(Some(&src))));
    let graph = std::mem::take(&mut c.graph);
    let mesh = Mesh::degree(DEGREE).unwrap();
    let plan = tpc::driver::plan_declared(
        graph,
        Some(mesh),
        Device::default(),
        &tpc::plan::Options::default(),
    )
    .unwrap_or_else(|e| panic!("gpt.tpl plans: {}", e.render(Some(&src))));
    (c, plan)
}

/// The params and inputs among `all` (not the optimizer state), for the peer.
fn params_and_inputs(plan: &Plan, all: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    let g = &plan.global;
    let keep: Vec<&str> = g
        .params()
        .map(|(n, _)| n)
        .chain(g.inputs().map(|(n, _)| n))
        .collect();
    all.iter()
        .filter(|(k, _)| keep.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Prints the step-time table (tpc's (min, median), the reference's seconds, JAX's result);
/// returns JAX's losses (empty when it did not run).
fn print_train_table(
    (t_min, t_med): (f64, f64),
    ref_s: f64,
    jax: Option<&Result<Json, String>>,
) -> Vec<f64> {
    println!();
    println!("| what | ms per training step, median (min) | tpc / this |");
    println!("|---|---|---|");
    println!(
        "| tpc, degree {DEGREE}, thread runtime, ranks keep their blocks ({TRAIN_STEPS} steps) | {:.1} ({:.1}) | 1 |",
        t_med * 1e3,
        t_min * 1e3
    );
    println!(
        "| tpc unsharded reference interpreter (1 step) | {:.1} | {:.2} |",
        ref_s * 1e3,
        t_med / ref_s
    );
    let j = match jax {
        None => {
            println!("| JAX | skipped: no python | – |");
            return Vec::new();
        }
        Some(Err(e)) => {
            println!("| JAX | skipped: {e} | – |");
            return Vec::new();
        }
        Some(Ok(j)) => j,
    };
    let f = |k: &str| j[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "| JAX {} GSPMD unrolled, value_and_grad + update, params donated, {} devices ({} steps; compile {:.2} s; {} all-reduce in HLO) | {:.1} ({:.1}) | {:.2} |",
        j["jax"].as_str().unwrap_or("?"),
        j["devices"],
        j["steps"],
        f("compile_s"),
        j["all_reduce_ops_in_hlo"],
        f("median_ms"),
        f("min_ms"),
        t_med * 1e3 / f("median_ms"),
    );
    j["losses"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
        .unwrap_or_default()
}

fn run_jax_train(python: &Path, leaves: &BTreeMap<String, Tensor>) -> Result<Json, String> {
    let npz = TempNpz::write("train", leaves)?;
    let heads = GPT.iter().find(|(k, _)| *k == "NH").unwrap().1;
    let args = [
        npz.path.clone(),
        "--layers".into(),
        TRAIN_LAYERS.to_string(),
        "--heads".into(),
        heads.to_string(),
        "--lr".into(),
        TRAIN_LR.to_string(),
        "--devices".into(),
        DEGREE.to_string(),
        "--steps".into(),
        TRAIN_STEPS.to_string(),
    ];
    run_peer(python, "jax_train.py", &args, true)
}
