//! The MPI backend against the thread backend, on this machine (prints figures; not a test):
//!
//! 1. AllReduce (sum) of 64 MiB of f32 over 8 ranks: bus bandwidth 2(n-1)/n · bytes / time of
//!    the MPI backend (8 processes under mpirun) and the thread backend (8 threads), beside a
//!    memcpy of 64 MiB into a warm buffer measured in the same run.
//! 2. gpt.tpl, 64 layers, forward at 8 ranks (`--set H=256 --set S=64 --set B=2 --set NH=8
//!    --set L=64 --repeat 5`): median step time, MPI against threads.
//!
//! Run: `cargo bench --features mpi --bench mpi_allreduce` (it starts mpirun itself; as root it
//! sets Open MPI's run-as-root variables).

use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::Instant;
use tpc::exec::comm::{self, ThreadTransport, Transport};
use tpc::exec::mpi::{launched_by_mpirun, Mpi};
use tpc::ir::ReduceOp;

const RANKS: usize = 8;
const BYTES: usize = 64 << 20;
const REPS: usize = 5;
const TPC: &str = env!("CARGO_BIN_EXE_tpc");

/// Rank `r`'s contribution: the same values in both backends.
fn data(rank: usize) -> Vec<f32> {
    (0..BYTES / 4)
        .map(|i| ((rank * 7919 + i) % 1000) as f32 * 1e-3)
        .collect()
}

/// FNV-1a over the bits of `v`.
fn checksum(v: &[f32]) -> u64 {
    v.iter().fold(0xcbf29ce484222325u64, |h, x| {
        (h ^ x.to_bits() as u64).wrapping_mul(0x100000001b3)
    })
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bus_gbs(secs: f64) -> f64 {
    2.0 * (RANKS - 1) as f64 / RANKS as f64 * BYTES as f64 / secs / 1e9
}

/// Under mpirun: one rank of the MPI AllReduce; rank 0 prints `MPI <checksum> <seconds>...`.
fn mpi_child() {
    let mpi = match Mpi::init() {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cannot start MPI: {e}");
            std::process::exit(1);
        }
    };
    let mut t = mpi.transport();
    let world: Vec<usize> = (0..t.world()).collect();
    let mut times = Vec::new();
    let mut sum = 0;
    for rep in 0..=REPS {
        let mut d = data(t.rank());
        mpi.min_over_ranks(0);
        let t0 = Instant::now();
        if let Err(e) = comm::all_reduce(&mut t, &world, &mut d, ReduceOp::Sum) {
            eprintln!("rank {}: {e}", t.rank());
            mpi.abort_job(1);
        }
        mpi.min_over_ranks(0);
        if rep > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
        sum = checksum(&d);
    }
    if t.rank() == 0 {
        let ts: Vec<String> = times.iter().map(|s| format!("{s}")).collect();
        println!("MPI {sum} {}", ts.join(" "));
    }
}

/// The thread backend's AllReduce: returns rank 0's checksum and the seconds per repetition.
fn threads_all_reduce() -> (u64, Vec<f64>) {
    let barrier = Arc::new(Barrier::new(RANKS));
    let handles: Vec<_> = ThreadTransport::world(RANKS)
        .into_iter()
        .map(|mut t| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let world: Vec<usize> = (0..RANKS).collect();
                let mut times = Vec::new();
                let mut sum = 0;
                for rep in 0..=REPS {
                    let mut d = data(t.rank());
                    barrier.wait();
                    let t0 = Instant::now();
                    comm::all_reduce(&mut t, &world, &mut d, ReduceOp::Sum)
                        .expect("thread all-reduce");
                    barrier.wait();
                    if rep > 0 {
                        times.push(t0.elapsed().as_secs_f64());
                    }
                    sum = checksum(&d);
                }
                (sum, times)
            })
        })
        .collect();
    let mut results: Vec<(u64, Vec<f64>)> = handles
        .into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect();
    results.swap_remove(0)
}

/// Seconds per memcpy of 64 MiB into a warm buffer.
fn memcpy() -> Vec<f64> {
    let src = data(1);
    let mut dst = vec![0.0f32; src.len()];
    dst.copy_from_slice(&src);
    (0..REPS)
        .map(|_| {
            let t0 = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
            t0.elapsed().as_secs_f64()
        })
        .collect()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `mpirun --oversubscribe -n 8 PROGRAM ARGS`, its stdout (panics on failure).
fn mpirun(program: &str, args: &[&str]) -> String {
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "-n", &RANKS.to_string(), program])
        .args(args);
    if is_root() {
        cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
    }
    let out = cmd.output().expect("cannot start mpirun");
    assert!(
        out.status.success(),
        "mpirun {program} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Median step time (seconds) of `tpc run` from its --stats file.
fn gpt_median(mpi: bool) -> f64 {
    let stats = std::env::temp_dir().join(format!(
        "tpc-bench-gpt-{}-{}.json",
        if mpi { "mpi" } else { "threads" },
        std::process::id()
    ));
    let stats_s = stats.to_str().expect("utf-8 temp path");
    let args = [
        "run",
        "examples/gpt.tpl",
        "--degree",
        "8",
        "--set",
        "H=256",
        "--set",
        "S=64",
        "--set",
        "B=2",
        "--set",
        "NH=8",
        "--set",
        "L=64",
        "--repeat",
        "5",
        "--stats",
        stats_s,
    ];
    if mpi {
        mpirun(TPC, &args);
    } else {
        let out = Command::new(TPC).args(args).output().expect("tpc run");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&stats).expect("stats file"))
            .expect("stats JSON");
    let _ = std::fs::remove_file(&stats);
    doc["step_time_s"]["median"].as_f64().expect("median")
}

fn cpu() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = info
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_string();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    format!("{model}, {cores} cores")
}

fn main() {
    if launched_by_mpirun() {
        mpi_child();
        return;
    }
    let exe = std::env::current_exe().expect("own path");
    println!("CPU: {}", cpu());
    println!(
        "AllReduce (sum) of {} MiB f32 over {RANKS} ranks, median of {REPS}:",
        BYTES >> 20
    );
    let mc = median(&memcpy());
    println!(
        "  memcpy into a warm buffer: {:8.2} ms  {:6.2} GB/s",
        mc * 1e3,
        BYTES as f64 / mc / 1e9
    );
    let (t_sum, t_times) = threads_all_reduce();
    let tt = median(&t_times);
    println!(
        "  threads AllReduce:         {:8.2} ms  bus {:6.2} GB/s",
        tt * 1e3,
        bus_gbs(tt)
    );
    let out = mpirun(exe.to_str().expect("utf-8 path"), &[]);
    let line = out
        .lines()
        .find(|l| l.starts_with("MPI "))
        .expect("rank 0's figures");
    let mut words = line.split_whitespace().skip(1);
    let m_sum: u64 = words.next().and_then(|w| w.parse().ok()).expect("checksum");
    let m_times: Vec<f64> = words.filter_map(|w| w.parse().ok()).collect();
    let mt = median(&m_times);
    println!(
        "  MPI AllReduce:             {:8.2} ms  bus {:6.2} GB/s  (result {} the threads')",
        mt * 1e3,
        bus_gbs(mt),
        if m_sum == t_sum {
            "bitwise identical to"
        } else {
            "DIFFERS from"
        }
    );
    println!("gpt.tpl forward, L=64 H=256 S=64 B=2 NH=8, {RANKS} ranks, median step of 5:");
    let gt = gpt_median(false);
    println!("  threads: {:9.2} ms", gt * 1e3);
    let gm = gpt_median(true);
    println!(
        "  MPI:     {:9.2} ms  ({:.2}x the threads' time)",
        gm * 1e3,
        gm / gt
    );
}
