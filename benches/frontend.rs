//! Compile-time benchmarks (prints figures; not a timed test). Run: `cargo bench --bench frontend`.
//!
//! - Front end: parse + lower + verify of gpt.tpl at GPT-3 175B shape and at L = 1, 64, 1024
//!   with H=256, in process (median of several runs), with the process's peak RSS.
//! - Whole compile as a process: `tpc compile gpt.tpl --degree 8` at H=256, S=64, B=2, NH=8 for
//!   L = 1, 16, 64, 1024 and at 175B shape, wall time (min of runs) and the child's peak RSS;
//!   the same for the training step of `gpt_train.tpl` (forward, backward and gradients).
//!
//! - 10 MB sources, parse + lower + verify: one value read by every statement (fan-out, the case
//!   that was quadratic in the number of users) beside a chain of the same size where each value
//!   has one reader (reference), and the fan-out at 1 MB (linearity). `-- big` runs only these.
//!
//! Every figure is printed beside a reference measured in the same run: the time of one lowering
//! at L=1 (linearity) and the time to start the process (`tpc --version`).

use std::process::Command;
use std::time::{Duration, Instant};
use tpc::diag::SourceFile;
use tpc::driver::compile_global;
use tpc::mesh::{Device, Mesh};
use tpc::plan::Plan;

const SMALL: &[(&str, i64)] = &[("H", 256), ("S", 64), ("B", 2), ("NH", 8)];
const GPT3: &[(&str, i64)] = &[
    ("L", 96),
    ("H", 12288),
    ("NH", 96),
    ("S", 2048),
    ("V", 50304),
];

fn sets(base: &[(&str, i64)], l: Option<i64>) -> Vec<(String, i64)> {
    let mut v: Vec<(String, i64)> = base.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    if let Some(l) = l {
        v.push(("L".into(), l));
    }
    v
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time_n(n: usize, mut f: impl FnMut()) -> Duration {
    median(
        (0..n)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs the binary `runs` times; the minimum wall time and the largest peak RSS (KiB, from
/// getrusage of the children is not available portably: read with /usr/bin/time when present).
fn process(args: &[String], runs: usize) -> (Duration, Option<u64>) {
    let exe = env!("CARGO_BIN_EXE_tpc");
    let mut best = Duration::MAX;
    for _ in 0..runs {
        let t = Instant::now();
        let ok = Command::new(exe)
            .args(args)
            .output()
            .expect("tpc runs")
            .status
            .success();
        assert!(ok, "tpc {args:?} failed");
        best = best.min(t.elapsed());
    }
    let rss = Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg(exe)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()?
                .trim()
                .parse()
                .ok()
        });
    (best, rss)
}

/// A program of about `bytes` bytes of statements `aK = V + V`, where `V` is `x` for every
/// statement (`fan_out`) or the previous result (a chain).
fn big_source(bytes: usize, fan_out: bool) -> String {
    let mut s = String::from("mesh tp\ninput x : f32[4]\n");
    let mut i = 0usize;
    while s.len() < bytes {
        let v = if fan_out || i == 0 {
            "x".to_string()
        } else {
            format!("a{}", i - 1)
        };
        s.push_str(&format!("a{i} = {v} + {v}\n"));
        i += 1;
    }
    s.push_str(&format!("output a{}\n", i - 1));
    s
}

/// Times the front end on a generated source; returns (MB/s, statements).
fn front_end_rate(name: &str, text: String) -> (f64, usize) {
    let (len, stmts) = (text.len(), text.lines().count() - 3);
    let src = SourceFile::new(name, text);
    let t = time_n(3, || drop(compile_global(&src, &[]).unwrap()));
    (len as f64 / t.as_secs_f64() / 1e6, stmts)
}

/// The 10 MB sources: the fan-out's rate beside the chain's (same size, one reader per value).
fn big_sources() {
    println!("\n## 10 MB sources: parse + lower + verify (in process, median of 3)");
    let (chain, n) = front_end_rate("chain.tpl", big_source(10 << 20, false));
    println!(
        "{:<28} {chain:>8.2} MB/s  ({n} statements; reference)",
        "chain, 10 MB"
    );
    for (mb, label) in [(1, "fan-out of x, 1 MB"), (10, "fan-out of x, 10 MB")] {
        let (r, n) = front_end_rate("fanout.tpl", big_source(mb << 20, true));
        println!(
            "{label:<28} {r:>8.2} MB/s  ({n} statements; {:.2}x the chain's rate)",
            r / chain
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "big") {
        big_sources();
        return;
    }
    let text = std::fs::read_to_string("examples/gpt.tpl").expect("run from the crate root");
    let src = SourceFile::new("examples/gpt.tpl", text);
    println!("cpu: {}", cpu());

    println!("\n## front end: parse + lower + verify (in process, median)");
    let base = time_n(21, || {
        drop(compile_global(&src, &sets(SMALL, Some(1))).unwrap())
    });
    println!("{:<28} {:>10.3} ms  (reference)", "H=256 L=1", ms(base));
    for l in [64, 1024] {
        let n = if l > 100 { 5 } else { 11 };
        let t = time_n(n, || {
            drop(compile_global(&src, &sets(SMALL, Some(l))).unwrap())
        });
        println!(
            "{:<28} {:>10.3} ms  {:>8.1}x L=1  ({:.1} µs/layer)",
            format!("H=256 L={l}"),
            ms(t),
            ms(t) / ms(base),
            ms(t) * 1e3 / l as f64
        );
    }
    let t = time_n(11, || {
        drop(compile_global(&src, &sets(GPT3, None)).unwrap())
    });
    println!(
        "{:<28} {:>10.3} ms  {:>8.1}x L=1  (target <= 5 ms)",
        "175B (L=96, H=12288)",
        ms(t),
        ms(t) / ms(base)
    );

    big_sources();

    println!("\n## phases at degree 8 (in process, median)");
    for l in [1, 64, 1024] {
        let g = compile_global(&src, &sets(SMALL, Some(l))).unwrap();
        let mesh = Mesh::degree(8).unwrap().with_declared(&g.mesh_axes);
        let dev = Device::default();
        let n = if l > 100 { 3 } else { 11 };
        let tp = time_n(n, || {
            drop(tpc::sharding::propagate(&g, &mesh, &dev).unwrap())
        });
        let sh = tpc::sharding::propagate(&g, &mesh, &dev).unwrap();
        let tpart = time_n(n, || drop(tpc::partition::partition(&g, &sh).unwrap()));
        let plan = Plan::build(g.clone(), mesh.clone(), dev).unwrap();
        let ttext = time_n(n, || drop(tpc::emit::plan::print(&plan)));
        println!("L={l:<5} propagate {:>9.3} ms  partition {:>9.3} ms  text {:>9.3} ms  ({} global nodes)", ms(tp), ms(tpart), ms(ttext), g.num_nodes());
    }
    println!("peak RSS of this process so far: {} KiB", peak_rss_kib());

    println!("\n## whole compile, as a process (min of runs)");
    let (start, _) = process(&["--version".to_string()], 5);
    println!(
        "{:<28} {:>10.3} ms  (reference: process start)",
        "tpc --version",
        ms(start)
    );
    whole_compile("examples/gpt.tpl", &[], start, [50.0, 100.0, 100.0]);
    println!("\n## the training step (forward, backward, update: examples/gpt_train.tpl, V=4096), as a process");
    whole_compile(
        "examples/gpt_train.tpl",
        &[("V", 4096)],
        start,
        [100.0, 300.0, 200.0],
    );
}

/// `tpc compile FILE --degree 8` at L = 1, 16, 64, 1024 (H=256, S=64, B=2, NH=8) and at the
/// 175B shape, with `extra` dims; `targets`: ms at L=64, ms and MB at 175B.
fn whole_compile(file: &str, extra: &[(&str, i64)], start: Duration, targets: [f64; 3]) {
    let args_for = |dims: Vec<(String, i64)>| {
        let mut args: Vec<String> = ["compile", file, "--degree", "8", "-o", "/dev/null"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (k, v) in dims
            .into_iter()
            .chain(extra.iter().map(|(k, v)| (k.to_string(), *v)))
        {
            args.push("--set".into());
            args.push(format!("{k}={v}"));
        }
        args
    };
    let mut t64 = Duration::ZERO;
    for l in [1i64, 16, 64, 1024] {
        let args = args_for(sets(SMALL, Some(l)));
        let (t, rss) = process(&args, if l > 100 { 3 } else { 7 });
        if l == 64 {
            t64 = t;
        }
        let extra = match l {
            64 => format!(" (target <= {} ms)", targets[0]),
            1024 => format!(" ({:.1}x L=64, target <= 20x)", ms(t) / ms(t64)),
            _ => String::new(),
        };
        println!(
            "{:<28} {:>10.3} ms  {:>6.1}x start  peak RSS {} KiB{extra}",
            format!("degree 8, L={l}"),
            ms(t),
            ms(t) / ms(start),
            rss.map(|r| r.to_string()).unwrap_or("?".into())
        );
    }
    let (t, rss) = process(&args_for(sets(GPT3, None)), 7);
    println!(
        "{:<28} {:>10.3} ms  {:>6.1}x start  peak RSS {} KiB (targets <= {} ms, < {} MB)",
        "degree 8, 175B shape",
        ms(t),
        ms(t) / ms(start),
        rss.map(|r| r.to_string()).unwrap_or("?".into()),
        targets[1],
        targets[2]
    );
}

fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let avx512 = info.contains("avx512f");
    format!(
        "{model} ({} cores, {})",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        if avx512 { "AVX-512" } else { "AVX2" }
    )
}
