//! Sharded checkpoint benchmarks (issue 12; prints figures, not a timed test). Run:
//! `cargo bench --bench checkpoint`, or one section: `cargo bench --bench checkpoint -- save|load`.
//!
//! The model: gpt_train.tpl (AdamW) at H=1024, NH=8, L=7, V=1280 (S=16, B=4), whose params and
//! AdamW moments (m, v) are 1 GiB of f32, planned on `tp=8`. Every rank's blocks are generated
//! from a seed before anything is timed.
//!
//! 1. `save`: the 8 ranks' `save::save_rank` on 8 threads at once (each hashes its blocks in
//!    4 MiB chunks, writes its safetensors file and fsyncs it), then `save::commit` (the index
//!    from the headers, its tiling check, the renames, `latest`). References on the same
//!    filesystem, same bytes, same run: (a) one `std::fs::write` of a fresh file; (b) the same
//!    then `File::sync_all` (durable, as the save is).
//! 2. `load`: `load::Reader::open` and every rank of a `tp=8` plan (the saved layout), then of a
//!    `tp=4` plan (each block read from two saved ones), reading each leaf it holds with
//!    `read_block` (sha256 of every chunk read verified), on 8 (resp. 4) threads at once, page
//!    cache hot. Reference: one `std::fs::read` of a file of the same size, page cache hot. What
//!    was read is compared with the generated blocks outside the timing.
//!
//! Also: sha256 (the `sha2` crate, the checkpoint's) over 256 MiB on one core, and context rows:
//! the same chunk hashes of the saved blocks on 8 threads without I/O, and a read into an already
//! touched buffer (what `fs::read` costs without faulting in its buffer). Each measurement is
//! taken 3 times, interleaved with its references, each after an untimed 1 GiB write (or read) so
//! that all start from the same memory state (see `settle`); printed: best and median
//! (`TPC_BENCH_DEBUG=1`: every repetition). Files go to `target/bench-checkpoint` and are deleted
//! afterwards.

use sha2::{Digest, Sha256};
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tpc::diag::SourceFile;
use tpc::driver::{compile_step, plan_declared, Compiled};
use tpc::exec::checkpoint::hash::program_hash;
use tpc::exec::checkpoint::load::Reader;
use tpc::exec::checkpoint::save::{commit, save_rank, saved_leaves, writes_block, Item, RunFacts};
use tpc::exec::checkpoint::st::tensor_bytes;
use tpc::exec::checkpoint::{chunk_hashes, CHUNK_BYTES};
use tpc::exec::leaves::{block_ranges, local_leaf, LeafSource};
use tpc::exec::Tensor;
use tpc::mesh::{Device, Mesh};
use tpc::plan::Plan;

const REPS: usize = 3;
const STEP: u64 = 100;
const SEED: u64 = 7;
const SETS: [(&str, i64); 4] = [("H", 1024), ("NH", 8), ("L", 7), ("V", 1280)];
const SOURCE: &str = "examples/gpt_train.tpl";

/// The checkpoint's files and the references', deleted on the way out (also after a panic).
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One param or optimizer-state leaf a rank holds.
struct Leaf {
    name: String,
    kind: &'static str,
    declared: String,
    shape: Vec<u64>,
    placement: String,
    ranges: Vec<Range<u64>>,
    writes: bool,
    block: Option<Tensor>,
}

fn compiled() -> Compiled {
    let text = std::fs::read_to_string(SOURCE).expect("run from the crate root");
    let src = SourceFile::new(SOURCE, text);
    let sets: Vec<(String, i64)> = SETS.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    compile_step(&src, &sets, false).unwrap_or_else(|e| panic!("{}", e.render(Some(&src))))
}

fn planned(c: &Compiled, mesh: &str) -> Plan {
    let mesh = Mesh::parse(mesh).expect("mesh");
    plan_declared(
        c.graph.clone(),
        Some(mesh),
        Device::default(),
        &Default::default(),
    )
    .expect("plans")
}

/// The params and optimizer state rank `rank` of `plan` holds, with their blocks generated
/// when `generate`.
fn leaves(plan: &Plan, rank: usize, generate: bool) -> Vec<Leaf> {
    let coords = plan.mesh.coords(rank as u64);
    let mut out = Vec::new();
    for (name, kind, v) in saved_leaves(plan) {
        let g = plan.origin[v].expect("a leaf has a global value");
        let name = name.to_string();
        let pl = plan.placements[v].clone();
        let shape = plan.global.ty(g).shape.clone();
        let block = generate.then(|| {
            local_leaf(
                &plan.global,
                g,
                &name,
                &pl,
                &coords,
                &plan.mesh,
                &LeafSource::Seed(SEED),
            )
            .expect("generates")
        });
        out.push(Leaf {
            kind,
            declared: plan.global.ty(g).dtype.to_string(),
            ranges: block_ranges(&shape, &pl, &coords, &plan.mesh),
            writes: writes_block(&pl, &coords, &plan.mesh, None),
            name,
            shape,
            placement: pl.display(&plan.mesh),
            block,
        });
    }
    out
}

/// Every rank's leaves of `plan`, generated on as many threads as there are cores.
fn all_leaves(plan: &Plan, generate: bool) -> Vec<Vec<Leaf>> {
    let world = plan.mesh.num_devices() as usize;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut out: Vec<Vec<Leaf>> = (0..world).map(|_| Vec::new()).collect();
    std::thread::scope(|s| {
        let mut slots: Vec<(usize, &mut Vec<Leaf>)> = out.iter_mut().enumerate().collect();
        let per = world.div_ceil(cores);
        let mut handles = Vec::new();
        while !slots.is_empty() {
            let mine: Vec<_> = slots.drain(..per.min(slots.len())).collect();
            handles.push(s.spawn(move || {
                for (rank, slot) in mine {
                    *slot = leaves(plan, rank, generate);
                }
            }));
        }
        for h in handles {
            h.join().expect("generation thread");
        }
    });
    out
}

fn bytes_of(t: &Tensor) -> u64 {
    t.len() as u64 * 4
}

fn gbs(bytes: u64, s: f64) -> f64 {
    bytes as f64 / s / 1e9
}

/// (best, median) of the times.
fn stats(v: &[f64]) -> (f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

fn secs(f: impl FnOnce()) -> f64 {
    let t = Instant::now();
    f();
    t.elapsed().as_secs_f64()
}

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
    let sha_ni = field("flags")
        .unwrap_or_default()
        .split_whitespace()
        .any(|f| f == "sha_ni");
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    println!(
        "CPU: {model}, {cores} logical cores; SHA-NI: {}",
        if sha_ni { "yes" } else { "no" }
    );
    println!("load average at start: {}", load.join(" "));
}

fn header() {
    println!(
        "{:<34} {:>19}  {:>21}  ratio best / median: reference time / this time",
        "", "s, best / median", "GB/s, best / median"
    );
}

/// A row: the figure's best and median seconds and GB/s, and its ratio (the reference's time
/// over its own, i.e. its throughput over the reference's) against each reference.
fn row(what: &str, bytes: u64, t: &[f64], refs: &[(&str, &[f64])]) {
    if std::env::var_os("TPC_BENCH_DEBUG").is_some() {
        println!("  [{what}: {t:.3?} s, in order]");
    }
    let (best, med) = stats(t);
    let mut line = format!(
        "{what:<34} {:>7.3} / {:>7.3} s  {:>6.2} / {:>6.2} GB/s",
        best,
        med,
        gbs(bytes, best),
        gbs(bytes, med)
    );
    for (name, r) in refs {
        let (rb, rm) = stats(r);
        line += &format!("  {:.2} / {:.2}x {name}", rb / best, rm / med);
    }
    println!("{line}");
}

fn sha256_rate() {
    let n = 256usize << 20;
    let data: Vec<u8> = (0..n)
        .map(|i| (i as u32).wrapping_mul(2654435761) as u8)
        .collect();
    let mut t = Vec::new();
    for _ in 0..REPS {
        t.push(secs(|| {
            std::hint::black_box(Sha256::digest(std::hint::black_box(&data)));
        }));
    }
    let (best, med) = stats(&t);
    println!(
        "\n## sha256 (sha2 crate), 256 MiB on one core: {:.2} / {:.2} GB/s (best / median)",
        gbs(n as u64, best),
        gbs(n as u64, med)
    );
}

/// A buffer of `bytes` bytes, touched, not all zero.
fn payload(bytes: u64) -> Vec<u8> {
    (0..bytes as usize)
        .map(|i| (i as u32).wrapping_mul(2654435761) as u8)
        .collect()
}

/// Writes `buf` to `path` and deletes it (its dirty pages are dropped unwritten), untimed,
/// right before a timed write: every timed write then takes its page-cache pages from memory
/// the guest just freed. Without it, a write whose pages were last freed a few seconds earlier
/// ran 2-5x slower on a KVM guest (memory returned to the host is faulted in again).
fn settle(path: &Path, buf: &[u8]) {
    std::fs::write(path, buf).expect("write");
    std::fs::remove_file(path).expect("remove");
}

/// The save of every rank's `items` into `dir`, timed: the ranks' `save_rank` on one thread each,
/// then the commit. Returns the whole time and the commit's.
fn save_once(dir: &Path, items: &[Vec<Item<'_>>], facts: &RunFacts) -> (f64, f64) {
    let _ = std::fs::remove_dir_all(dir);
    let t = Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = items
            .iter()
            .enumerate()
            .map(|(rank, its)| s.spawn(move || save_rank(dir, STEP, rank, its)))
            .collect();
        for h in handles {
            h.join().expect("rank thread").expect("save_rank");
        }
    });
    let c = secs(|| {
        commit(dir, STEP, items.len(), facts).expect("commit");
    });
    (t.elapsed().as_secs_f64(), c)
}

/// The sha256 chunk hashes `save_rank` computes of every rank's blocks (the load verifies the
/// same chunks), one thread per rank, timed: the hashing's share of a save or a load.
fn hash_once(items: &[Vec<Item<'_>>]) -> f64 {
    secs(|| {
        std::thread::scope(|s| {
            for its in items {
                s.spawn(move || {
                    for it in its {
                        std::hint::black_box(chunk_hashes(&tensor_bytes(it.block), CHUNK_BYTES));
                    }
                });
            }
        });
    })
}

fn items_of(ranks: &[Vec<Leaf>]) -> Vec<Vec<Item<'_>>> {
    ranks
        .iter()
        .map(|held| {
            held.iter()
                .filter(|l| l.writes)
                .map(|l| Item {
                    name: &l.name,
                    kind: l.kind,
                    declared: l.declared.clone(),
                    shape: l.shape.clone(),
                    placement: l.placement.clone(),
                    offset: l.ranges.iter().map(|r| r.start).collect(),
                    block: l.block.as_ref().expect("generated"),
                })
                .collect()
        })
        .collect()
}

/// Saves, with the references interleaved; leaves the last checkpoint in `dir`.
fn bench_save(root: &Path, dir: &Path, ranks: &[Vec<Leaf>], facts: &RunFacts, bytes: u64) {
    println!(
        "\n## 1. save: 8 ranks' save_rank on 8 threads + commit, against one file of the \
         same bytes"
    );
    let items = items_of(ranks);
    let buf = payload(bytes);
    let refp = root.join("reference.bin");
    let (mut write, mut synced, mut save) = (Vec::new(), Vec::new(), Vec::new());
    let (mut commits, mut hashes) = (Vec::new(), Vec::new());
    let scratch = root.join("settle.bin");
    for _ in 0..REPS {
        settle(&scratch, &buf);
        write.push(secs(|| std::fs::write(&refp, &buf).expect("write")));
        // Deleting drops its dirty pages unwritten: the next figure starts from a quiet disk.
        std::fs::remove_file(&refp).expect("remove");
        settle(&scratch, &buf);
        synced.push(secs(|| {
            let mut f = std::fs::File::create(&refp).expect("create");
            f.write_all(&buf).expect("write");
            f.sync_all().expect("sync");
        }));
        std::fs::remove_file(&refp).expect("remove");
        let _ = std::fs::remove_dir_all(dir);
        settle(&scratch, &buf);
        let (t, c) = save_once(dir, &items, facts);
        save.push(t);
        commits.push(c);
        hashes.push(hash_once(&items));
    }
    drop(buf);
    let files: u64 = Reader::open(dir).expect("opens").index.files.values().sum();
    header();
    row("(a) std::fs::write", bytes, &write, &[]);
    row("(b) fs::write + sync_all", bytes, &synced, &[]);
    row(
        "checkpoint save (8 files, fsync'd)",
        bytes,
        &save,
        &[("(a)", &write), ("(b)", &synced)],
    );
    row("(context) sha256 chunks, 8 threads", bytes, &hashes, &[]);
    let (cb, cm) = stats(&commits);
    println!(
        "GB/s of the {bytes} payload bytes; the 8 rank files hold {files} bytes with their \
         headers; of the save, the commit took {:.3} / {:.3} s",
        cb, cm
    );
}

/// Reads every rank's leaves of `plan` from `dir` on one thread per rank; the time includes
/// opening the index.
fn load_once(dir: &Path, plan: &Plan, ranks: &[Vec<Leaf>]) -> (f64, Vec<Vec<Tensor>>) {
    let t = Instant::now();
    let reader = Reader::open(dir).expect("opens");
    let got: Vec<Vec<Tensor>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranks
            .iter()
            .map(|held| {
                let reader = &reader;
                s.spawn(move || {
                    held.iter()
                        .map(|l| reader.read_block(&l.name, &l.ranges).expect("read_block"))
                        .collect::<Vec<Tensor>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    let s = t.elapsed().as_secs_f64();
    assert_eq!(got.len(), plan.mesh.num_devices() as usize);
    (s, got)
}

/// What was read equals the blocks generated from the seed (`want`, or generated here rank by
/// rank when `None`).
fn check(plan: &Plan, got: &[Vec<Tensor>], want: Option<&[Vec<Leaf>]>) {
    for (rank, read) in got.iter().enumerate() {
        let fresh;
        let held = match want {
            Some(w) => &w[rank],
            None => {
                fresh = leaves(plan, rank, true);
                &fresh
            }
        };
        assert_eq!(held.len(), read.len());
        for (l, t) in held.iter().zip(read) {
            assert!(
                l.block.as_ref() == Some(t),
                "{} rank {rank}: `{}` read back differs from what was saved",
                plan.mesh,
                l.name
            );
        }
    }
}

fn bench_load(root: &Path, dir: &Path, c: &Compiled, tp8: &Plan, ranks: &[Vec<Leaf>], bytes: u64) {
    println!(
        "\n## 2. load: every rank of a plan reads its blocks (read_block, sha256 verified), \
         page cache hot"
    );
    let tp4 = planned(c, "tp=4");
    let ranks4 = all_leaves(&tp4, false);
    let asked = |rs: &[Vec<Leaf>]| -> u64 {
        rs.iter()
            .flatten()
            .map(|l| l.ranges.iter().map(|r| r.end - r.start).product::<u64>() * 4)
            .sum()
    };
    let (b8, b4) = (asked(ranks), asked(&ranks4));
    let refp = root.join("reference.bin");
    {
        let mut f = std::fs::File::create(&refp).expect("create");
        f.write_all(&payload(bytes)).expect("write");
        f.sync_all().expect("sync");
    }
    // Warm: the reference file and the checkpoint (just saved, so already cached) read once.
    drop(std::fs::read(&refp).expect("read"));
    let (mut read, mut l8, mut l4) = (Vec::new(), Vec::new(), Vec::new());
    let mut touched = vec![1u8; bytes as usize];
    let mut into = Vec::new();
    let items = items_of(ranks);
    let mut hashes = Vec::new();
    // Untimed before each timed figure, as `settle` for writes: every figure takes its fresh
    // buffers from memory the guest just freed.
    let settle = || drop(std::fs::read(&refp).expect("read"));
    for rep in 0..REPS {
        settle();
        let t = Instant::now();
        let v = std::fs::read(&refp).expect("read");
        read.push(t.elapsed().as_secs_f64());
        assert_eq!(v.len() as u64, bytes);
        drop(v);
        settle();
        let (s, got) = load_once(dir, tp8, ranks);
        l8.push(s);
        if rep == 0 {
            check(tp8, &got, Some(ranks));
        }
        drop(got);
        settle();
        let (s, got) = load_once(dir, &tp4, &ranks4);
        l4.push(s);
        if rep == 0 {
            check(&tp4, &got, None);
        }
        drop(got);
        hashes.push(hash_once(&items));
        into.push(secs(|| {
            let mut f = std::fs::File::open(&refp).expect("open");
            std::io::Read::read_exact(&mut f, &mut touched).expect("read");
        }));
    }
    std::fs::remove_file(&refp).expect("remove");
    header();
    row("(c) std::fs::read", bytes, &read, &[]);
    row(
        "checkpoint load, tp=8 (8 threads)",
        bytes,
        &l8,
        &[("(c)", &read)],
    );
    row(
        "checkpoint load, tp=4 (4 threads)",
        bytes,
        &l4,
        &[("(c)", &read)],
    );
    row("(context) sha256 chunks, 8 threads", bytes, &hashes, &[]);
    row("(context) read into touched buffer", bytes, &into, &[]);
    println!(
        "GB/s of the {bytes} checkpoint bytes; the ranks ask for {b8} (tp=8) and {b4} (tp=4) \
         bytes, replicated leaves once per rank; read back equal to the saved blocks: yes"
    );
}

fn main() {
    let sections: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |s: &str| sections.is_empty() || sections.iter().any(|x| x == s);
    println!("# tpc checkpoint benchmarks");
    print_machine();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-checkpoint");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("scratch directory");
    let scratch = Scratch(root.clone());
    let dir = root.join("ck");

    let c = compiled();
    let facts = RunFacts {
        program: program_hash(&c.graph, "loss", &c.carried),
        source: SOURCE.into(),
        seed: SEED,
        inputs: None,
        mesh: "tp=8".into(),
    };
    let plan = planned(&c, "tp=8");
    let t = Instant::now();
    let ranks = all_leaves(&plan, true);
    let gen = t.elapsed().as_secs_f64();
    let saved: Vec<&Leaf> = ranks.iter().flatten().filter(|l| l.writes).collect();
    let bytes: u64 = saved
        .iter()
        .map(|l| bytes_of(l.block.as_ref().expect("generated")))
        .sum();
    let params: u64 = saved
        .iter()
        .filter(|l| l.kind == "param")
        .map(|l| bytes_of(l.block.as_ref().expect("generated")) / 4)
        .sum();
    let dims: Vec<String> = SETS.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!(
        "model: {SOURCE} {} (S=16, B=4), tp=8: {params} params; params + AdamW state = {bytes} \
         bytes ({:.4} GiB) in {} blocks written by 8 ranks (generated in {gen:.1} s, untimed)",
        dims.join(" "),
        bytes as f64 / (1u64 << 30) as f64,
        saved.len()
    );
    println!("filesystem: {} (files deleted afterwards)", root.display());

    sha256_rate();
    if want("save") {
        bench_save(&root, &dir, &ranks, &facts, bytes);
    }
    if want("load") {
        if !dir.join("latest").exists() {
            save_once(&dir, &items_of(&ranks), &facts);
        }
        bench_load(&root, &dir, &c, &plan, &ranks, bytes);
    }
    drop(scratch);
}
