//! Sharded checkpoints (issue 12), "no gather": a save's peak memory per rank is bounded by its
//! own blocks, not by the model. A counting global allocator (its own test binary, so the count
//! is this test's alone) keeps each thread's live and peak bytes; eight thread ranks save a
//! tp=8 GPT of 73 MiB (params and AdamW state) and each rank's extra peak during `save_rank` is
//! measured, as is rank 0's `commit` (headers only) and a tp=4 rank's `read_block` of the
//! blocks the tp=8 ranks saved.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use tpc::diag::SourceFile;
use tpc::driver::{compile_step, plan_declared};
use tpc::exec::checkpoint::load::Reader;
use tpc::exec::checkpoint::save::{
    commit, rank_file, save_rank, saved_leaves, writes_block, Item, RunFacts,
};
use tpc::exec::checkpoint::{st, CHUNK_BYTES};
use tpc::exec::leaves::{block_ranges, local_leaf, LeafSource};
use tpc::exec::Tensor;
use tpc::mesh::{Device, Mesh};
use tpc::plan::Plan;

/// The system allocator, counting per thread the bytes live and the most ever live (since the
/// last [`peak_during`] reset it). Bytes freed on another thread than the one that allocated
/// them count against the freeing thread, so the live count may go negative.
struct Counting;

#[global_allocator]
static ALLOC: Counting = Counting;

thread_local! {
    // `const` with a `Cell` of a plain integer: no lazy initialisation and no destructor, so
    // touching them from inside the allocator never allocates or registers anything.
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    // `try_with`: during a thread's teardown the slots may be gone; those bytes go uncounted.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now)
            }
        });
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        note(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            // Counted as both buffers live at once (a moving realloc copies), then the old freed.
            note(new_size as isize);
            note(-(layout.size() as isize));
        }
        p
    }
}

/// `f`'s result and the most bytes this thread had live during it beyond what it had before.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(before));
    let out = f();
    let peak = PEAK.with(Cell::get);
    (out, (peak - before).max(0) as u64)
}

const MIB: u64 = 1 << 20;

/// gpt_train.tpl at H=512 (two layers, V=256): 6.4 M params, with AdamW's two moments 73 MiB.
fn plan(mesh: &str) -> Plan {
    let text = std::fs::read_to_string("examples/gpt_train.tpl").expect("example");
    let src = SourceFile::new("examples/gpt_train.tpl", text);
    let sets = [("H".to_string(), 512)];
    let c = compile_step(&src, &sets, false).unwrap_or_else(|e| panic!("{}", e.render(Some(&src))));
    let mesh = Mesh::parse(mesh).unwrap();
    plan_declared(c.graph, Some(mesh), Device::default(), &Default::default()).expect("plans")
}

/// One saved leaf as a rank holds it.
struct Leaf {
    name: String,
    kind: &'static str,
    declared: String,
    shape: Vec<u64>,
    placement: String,
    ranges: Vec<std::ops::Range<u64>>,
}

/// Every param and optimizer state of `plan` as device `rank` holds it; with `generate`, the
/// blocks it writes too (generated from seed 4).
fn leaves(plan: &Plan, rank: usize, generate: bool) -> Vec<(Leaf, Option<Tensor>)> {
    let coords = plan.mesh.coords(rank as u64);
    let mut out = Vec::new();
    for (name, kind, v) in saved_leaves(plan) {
        let g = plan.origin[v].unwrap();
        let pl = &plan.placements[v];
        let shape = plan.global.ty(g).shape.clone();
        let name = name.to_string();
        let writes = writes_block(pl, &coords, &plan.mesh, None);
        let block = (generate && writes).then(|| {
            let seed = LeafSource::Seed(4);
            local_leaf(&plan.global, g, &name, pl, &coords, &plan.mesh, &seed).unwrap()
        });
        let leaf = Leaf {
            name,
            kind,
            declared: plan.global.ty(g).dtype.to_string(),
            ranges: block_ranges(&shape, pl, &coords, &plan.mesh),
            shape,
            placement: pl.display(&plan.mesh),
        };
        out.push((leaf, block));
    }
    out
}

/// The blocks device `rank` writes.
fn written_blocks(plan: &Plan, rank: usize) -> Vec<(Leaf, Tensor)> {
    leaves(plan, rank, true)
        .into_iter()
        .filter_map(|(l, t)| Some((l, t?)))
        .collect()
}

fn bytes(t: &Tensor) -> u64 {
    t.len() as u64 * 4
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("checkpoint-memory-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The counter sees what a thread allocates and nothing another thread does.
#[test]
fn the_counting_allocator_sees_this_threads_bytes_only() {
    let ((), seen) = peak_during(|| {
        let v = std::hint::black_box(vec![1u8; 10 * MIB as usize]);
        drop(v);
    });
    assert!(
        (10 * MIB..11 * MIB).contains(&seen),
        "10 MiB seen as {seen}"
    );
    let ((), seen) = peak_during(|| {
        std::thread::spawn(|| drop(std::hint::black_box(vec![1u8; 10 * MIB as usize])))
            .join()
            .unwrap();
    });
    assert!(seen < MIB, "another thread's 10 MiB seen as {seen}");
    // Grown in place or moved: a realloc counts the old and the new buffer at once.
    let ((), seen) = peak_during(|| {
        let mut v: Vec<u8> = Vec::with_capacity(4 * MIB as usize);
        v.resize(4 * MIB as usize, 1);
        v.reserve_exact(8 * MIB as usize);
        std::hint::black_box(&v);
    });
    assert!(
        seen >= 12 * MIB,
        "a realloc from 4 to 12 MiB seen as {seen}"
    );
}

/// Saved from eight thread ranks at tp=8: each rank's extra peak during `save_rank` is within
/// its largest block plus a small constant (so far below the model's share per rank: nothing is
/// gathered), every distinct block is written once (file bytes = the global tensors' bytes +
/// headers), `commit` reads headers only (its peak does not follow the model's size), and a tp=4
/// rank reading its blocks peaks at its block plus one chunk.
#[test]
fn save_peak_memory_per_rank_is_its_own_blocks() {
    let saved = plan("tp=8");
    let world = saved.mesh.num_devices() as usize;
    let total: u64 = leaves(&saved, 0, false)
        .iter()
        .map(|(l, _)| l.shape.iter().product::<u64>() * 4)
        .sum();
    assert!(
        total >= 64 * MIB,
        "the model is {total} bytes: too small to tell"
    );
    let blocks: Vec<Vec<(Leaf, Tensor)>> = (0..world).map(|r| written_blocks(&saved, r)).collect();
    let dir = scratch("save");
    let step = 7;

    // Each rank saves on its own thread; the peak is that thread's.
    let peaks: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = blocks
            .iter()
            .enumerate()
            .map(|(rank, held)| {
                let dir = &dir;
                s.spawn(move || {
                    let items: Vec<Item<'_>> = held
                        .iter()
                        .map(|(l, t)| Item {
                            name: &l.name,
                            kind: l.kind,
                            declared: l.declared.clone(),
                            shape: l.shape.clone(),
                            placement: l.placement.clone(),
                            offset: l.ranges.iter().map(|r| r.start).collect(),
                            block: t,
                        })
                        .collect();
                    let (r, peak) = peak_during(|| save_rank(dir, step, rank, &items));
                    r.unwrap();
                    peak
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let tmp = dir.join(format!(".tmp-step-{step:08}"));
    let mut data = 0u64;
    for (rank, held) in blocks.iter().enumerate() {
        let own: u64 = held.iter().map(|(_, t)| bytes(t)).sum();
        let largest = held.iter().map(|(_, t)| bytes(t)).max().unwrap_or(0);
        let file = tmp.join(rank_file(rank));
        let (md, base) = st::read_header(&file).unwrap();
        let len = std::fs::metadata(&file).unwrap().len();
        assert_eq!(
            len - base,
            own,
            "rank {rank}: its file holds exactly its blocks"
        );
        assert!(base < 64 * 1024, "rank {rank}: a {base}-byte header");
        assert_eq!(md.tensors().len(), held.len());
        data += len - base;
        let bound = largest + MIB + 4 * base;
        // A save that gathered the model (or even one rank's share of it) would not fit.
        assert!(
            total > 8 * bound,
            "rank {rank}: bound {bound} vs model {total}"
        );
        eprintln!(
            "save rank {rank}: extra peak {} KiB; its blocks {} KiB, largest {} KiB, header {} B, \
             bound {} KiB; model / 8 = {} KiB",
            peaks[rank] / 1024,
            own / 1024,
            largest / 1024,
            base,
            bound / 1024,
            total / 8 / 1024
        );
        assert!(
            peaks[rank] <= bound,
            "rank {rank}: save_rank peaked {} bytes over its {} before; bound {bound}",
            peaks[rank],
            own
        );
    }
    assert_eq!(
        data, total,
        "every distinct block written exactly once: the files' data is the global tensors' bytes"
    );

    // The commit reads each file's header, never its blocks.
    let facts = RunFacts {
        program: "sha256:test".into(),
        source: "gpt_train.tpl".into(),
        seed: 4,
        inputs: None,
        mesh: saved.mesh.to_string(),
    };
    let (target, peak) = peak_during(|| commit(&dir, step, world, &facts).unwrap());
    let index_bytes = std::fs::metadata(target.join("index.json")).unwrap().len();
    eprintln!(
        "commit: extra peak {} KiB (index.json {} KiB, model {} MiB)",
        peak / 1024,
        index_bytes / 1024,
        total / MIB
    );
    assert!(peak <= 4 * MIB, "commit peaked {peak} bytes");
    assert!(total > 8 * 4 * MIB);

    // Loading at tp=4: each read peaks at the asked block plus one chunk of a saved block.
    let reader = Reader::open(&dir).unwrap();
    assert_eq!(reader.index.step, step);
    let loaded = plan("tp=4");
    let mut worst = (0u64, 0u64, String::new());
    for rank in 0..loaded.mesh.num_devices() as usize {
        for (l, _) in leaves(&loaded, rank, false) {
            let asked: u64 = l.ranges.iter().map(|r| r.end - r.start).product::<u64>() * 4;
            let (t, peak) = peak_during(|| reader.read_block(&l.name, &l.ranges).unwrap());
            assert_eq!(bytes(&t), asked);
            let bound = asked + CHUNK_BYTES + MIB;
            assert!(
                peak <= bound,
                "tp=4 rank {rank} reading `{}` ({asked} bytes) peaked {peak}; bound {bound}",
                l.name
            );
            if peak.saturating_sub(asked) >= worst.0.saturating_sub(worst.1) {
                worst = (peak, asked, format!("rank {rank} `{}`", l.name));
            }
        }
    }
    let (peak, asked, what) = worst;
    eprintln!(
        "load at tp=4: largest extra over the asked block: {what}: peak {} KiB for a {} KiB block",
        peak / 1024,
        asked / 1024
    );
    assert!(total > 8 * (asked + CHUNK_BYTES + MIB));
    let _ = std::fs::remove_dir_all(&dir);
}

/// DESIGN.md §5: a read verifies whole chunks "into one reusable ≤ 4 MiB buffer", so reading
/// part of a saved block costs one chunk beyond the asked block (a column quarter of a 16 MiB
/// saved block touches every row: reading its whole span at once peaked at ~20 MiB).
#[test]
fn reading_part_of_a_large_saved_block_costs_one_chunk() {
    let dir = scratch("large");
    let n = 2048usize;
    let x = ndarray::Array2::from_shape_fn((n, n), |(i, j)| (i * n + j) as f32).into_dyn();
    let t = Tensor::F32(x);
    let item = Item {
        name: "w",
        kind: "param",
        declared: "f32".into(),
        shape: vec![n as u64, n as u64],
        placement: "[_, _]".into(),
        offset: vec![0, 0],
        block: &t,
    };
    save_rank(&dir, 1, 0, std::slice::from_ref(&item)).unwrap();
    let facts = RunFacts {
        program: String::new(),
        source: String::new(),
        seed: 0,
        inputs: None,
        mesh: "tp=1".into(),
    };
    commit(&dir, 1, 1, &facts).unwrap();
    let reader = Reader::open(&dir).unwrap();
    let q = n as u64 / 4;
    for (what, ranges) in [
        ("a row quarter", [0..q, 0..n as u64]),
        ("a column quarter", [0..n as u64, 0..q]),
    ] {
        let (got, peak) = peak_during(|| reader.read_block("w", &ranges).unwrap());
        let asked = bytes(&got);
        eprintln!(
            "{what} of a {} MiB saved block: peak {} KiB for a {} KiB block",
            bytes(&t) / MIB,
            peak / 1024,
            asked / 1024
        );
        assert!(
            peak <= asked + CHUNK_BYTES + MIB,
            "{what}: peaked {peak} bytes for a {asked}-byte block"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// DESIGN.md §4: a block held in a non-standard layout (a transposed view) is copied once to
/// row-major order to be hashed and written: one block extra (two copies alive at once
/// peaked at two blocks).
#[test]
fn a_transposed_block_costs_one_copy_to_save() {
    let dir = scratch("transposed");
    let n = 1024usize;
    let x = ndarray::Array2::from_shape_fn((n, n), |(i, j)| (i * n + j) as f32);
    let t = Tensor::F32(x.reversed_axes().into_dyn());
    let item = Item {
        name: "w",
        kind: "param",
        declared: "f32".into(),
        shape: vec![n as u64, n as u64],
        placement: "[_, _]".into(),
        offset: vec![0, 0],
        block: &t,
    };
    let (r, peak) = peak_during(|| save_rank(&dir, 1, 0, std::slice::from_ref(&item)));
    r.unwrap();
    eprintln!(
        "a transposed {} KiB block: save_rank peak {} KiB",
        bytes(&t) / 1024,
        peak / 1024
    );
    assert!(peak <= bytes(&t) + MIB, "peaked {peak} bytes");
    let _ = std::fs::remove_dir_all(&dir);
}
