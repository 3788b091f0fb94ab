//! Pipeline benchmarks (prints figures; not a timed test). Run: `cargo bench --bench pipeline`,
//! or one section: `cargo bench --bench pipeline -- bubble|compile`.
//!
//! 1. `bubble`: gpt_pipe.tpl training (L=8, H=256, S=64, B=16, NH=8) on `pp=4` and `pp=2` with
//!    M = 4, 8, 16 microbatches on the thread runtime, 1F1B. Per stage the runtime measures its
//!    busy seconds (its forward and backward passes) and its schedule's seconds (start of the
//!    step to its last action); the measured bubble is 1 − Σ busy / (pp × the longest schedule),
//!    printed beside the formula (pp − 1)/(M + pp − 1) for uniform stages and the plan's
//!    estimate. The reference in the same run is the same step unstaged (`pp=1`, same M): its
//!    step time is the sum of every stage's compute, run one after another.
//! 2. `compile`: in-process compile (front end, autodiff, propagation, partition, stages,
//!    schedule, summary) of gpt_pipe.tpl at the 175B shape (H=12288, NH=96, S=2048, V=51200,
//!    B=32) on `dp=4,pp=8,tp=8` with 8 microbatches, at L = 32, 64 and 128 (target < 1 s at 128,
//!    linear in L), beside the same at L = 8 as the reference.
//!
//! A machine with fewer cores than stages runs the stages' threads in turns: the measured
//! bubble there mixes the schedule's idle time with waiting for a core (printed with the core
//! count; compare `pp=2` on 2 cores).

use std::time::{Duration, Instant};
use tpc::diag::SourceFile;
use tpc::driver::{compile_step, plan_declared, Compiled};
use tpc::exec::leaves::LeafSource;
use tpc::exec::train::{train_threads, Steps, Trained};
use tpc::mesh::{Device, Mesh};
use tpc::pipeline::schedule::ScheduleKind;
use tpc::plan::{Options, Plan};

const STEPS: usize = 6;

fn source() -> SourceFile {
    let text = std::fs::read_to_string("examples/gpt_pipe.tpl").expect("run from the crate root");
    SourceFile::new("examples/gpt_pipe.tpl", text)
}

fn compiled(src: &SourceFile, sets: &[(&str, i64)]) -> Compiled {
    let sets: Vec<(String, i64)> = sets.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    compile_step(src, &sets, false).unwrap_or_else(|e| panic!("{}", e.render(Some(src))))
}

fn planned(c: &Compiled, mesh: &str, m: u64) -> Plan {
    let options = Options {
        microbatches: Some(m),
        schedule: ScheduleKind::OneFOneB,
        ..Default::default()
    };
    let mesh = Mesh::parse(mesh).expect("mesh");
    plan_declared(c.graph.clone(), Some(mesh), Device::default(), &options).expect("plans")
}

fn train(c: &Compiled, plan: &Plan) -> Trained {
    let stepped = Default::default();
    let spec = Steps {
        count: STEPS,
        start: &LeafSource::Seed(0),
        stepped: &stepped,
        reseed: Some(0),
        carried: &c.carried,
        loss: "loss",
        keep_first: false,
    };
    train_threads(plan, &spec, None).expect("trains")
}

fn median(v: &[f64]) -> f64 {
    let mut v = v[1..].to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bubble() {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "\n## 1. measured bubble: gpt_pipe L=8 (H=256, S=64, B=16), 1F1B, threads ({cores} cores)"
    );
    println!(
        "{:<6} {:>3} {:>10} {:>12} {:>11} {:>10} {:>10} {:>10}",
        "mesh", "M", "step ms", "unstaged ms", "ratio", "measured", "formula", "plan"
    );
    let src = source();
    let c = compiled(
        &src,
        &[("L", 8), ("H", 256), ("S", 64), ("B", 16), ("NH", 8)],
    );
    for p in [4u64, 2] {
        for m in [4u64, 8, 16] {
            let plan = planned(&c, &format!("pp={p}"), m);
            let got = train(&c, &plan);
            let step = median(&got.losses.iter().map(|l| l.1).collect::<Vec<_>>());
            let reference = train(&c, &planned(&c, "pp=1", m));
            let whole = median(&reference.losses.iter().map(|l| l.1).collect::<Vec<_>>());
            let stages = &got.stats.pipeline;
            let busy: f64 = stages.iter().map(|s| s.busy_s).sum();
            let span = stages.iter().map(|s| s.schedule_s).fold(0.0, f64::max);
            let measured = 1.0 - busy / (p as f64 * span);
            let formula = (p - 1) as f64 / (m + p - 1) as f64;
            let estimated = plan
                .pipeline
                .as_ref()
                .map_or(0.0, |x| x.summary.bubble_fraction);
            println!(
                "{:<6} {:>3} {:>10.2} {:>12.2} {:>10.2}x {:>9.1}% {:>9.1}% {:>9.1}%",
                format!("pp={p}"),
                m,
                step * 1e3,
                whole * 1e3,
                whole / step,
                measured * 100.0,
                formula * 100.0,
                estimated * 100.0
            );
        }
    }
    println!(
        "ratio: the unstaged step's time over the pipelined step's (the speedup from running \
         stages at once; at most min(pp, cores))"
    );
}

fn compile_time(src: &SourceFile, l: i64) -> Duration {
    let sets = [
        ("H", 12288),
        ("NH", 96),
        ("S", 2048),
        ("V", 51200),
        ("B", 32),
        ("L", l),
    ];
    let runs: Vec<Duration> = (0..3)
        .map(|_| {
            let t = Instant::now();
            let c = compiled(src, &sets);
            let plan = planned(&c, "dp=4,pp=8,tp=8", 8);
            assert!(plan.pipeline.is_some());
            drop(plan);
            t.elapsed()
        })
        .collect();
    runs.into_iter().min().expect("runs")
}

fn compile() {
    println!("\n## 2. compile of the 3-D 175B plan: gpt_pipe on dp=4,pp=8,tp=8, M=8 (in process, min of 3)");
    let src = source();
    let base = compile_time(&src, 8);
    println!(
        "{:<8} {:>10.1} ms  (reference)",
        "L=8",
        base.as_secs_f64() * 1e3
    );
    for l in [32, 64, 128] {
        let t = compile_time(&src, l);
        println!(
            "{:<8} {:>10.1} ms  {:>6.1}x L=8  ({:.2} ms/layer){}",
            format!("L={l}"),
            t.as_secs_f64() * 1e3,
            t.as_secs_f64() / base.as_secs_f64(),
            t.as_secs_f64() * 1e3 / l as f64,
            if l == 128 { "  target < 1000 ms" } else { "" }
        );
    }
}

fn main() {
    let sections: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |s: &str| sections.is_empty() || sections.iter().any(|x| x == s);
    println!("# tpc pipeline benchmarks");
    if want("bubble") {
        bubble();
    }
    if want("compile") {
        compile();
    }
}
