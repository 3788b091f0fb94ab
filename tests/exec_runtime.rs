//! The SPMD runtime on integer data, bad ids, many ranks and corrupt rank outputs: integers move
//! exactly through every collective, bad ids are reported at their global position, the thread
//! backend runs (or refuses cleanly) at 1024 ranks, and output assembly checks every block.
//! An `.npz` that does not fit the program is refused on its headers, before its data is read.

use ndarray::{ArrayD, IxDyn};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::Write;
use tpc::diag::SourceFile;
use tpc::driver::compile_plan;
use tpc::exec::leaves::{global_leaves, LeafSource};
use tpc::exec::npz::{self, NpzError};
use tpc::exec::spmd::{assemble, run_threads, RankOutput, RunError};
use tpc::exec::{reference, ExecError, Tensor};
use tpc::ir::Op;
use tpc::mesh::{Device, Mesh};
use tpc::plan::Plan;

/// The largest single allocation this test binary grants.
const ALLOC_CAP: usize = 1 << 30;

/// The system allocator, refusing any single allocation above [`ALLOC_CAP`]: reading what an
/// untrusted header declares fails here instead of taking the machine's memory.
struct Capped;

// SAFETY: every call is forwarded to `System` unchanged, or refused with a null pointer.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > ALLOC_CAP {
            return std::ptr::null_mut();
        }
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOC: Capped = Capped;

/// Ids above 2^24 (not representable in f32) and near i32::MAX.
const BIG: [i32; 4] = [16_777_217, i32::MAX - 1, 16_777_219, -16_777_217];

/// A program whose i32 inputs are resharded by every collective kind the partitioner picks for
/// them: all-reduce (sum and max), all-to-all, all-gather and shard slice. Each reduction reads
/// its own copy of the ids: reductions of one split input would share one gather of it.
const INTS: &str = "mesh tp
dim B = 8, S = 1024
input ids : i32[B, S] @ [tp, _]
input idm : i32[B, S] @ [tp, _]
input idr : i32[B, S] @ [tp, _]
input idt : i32[B, S] @ [tp, _]
input rep : i32[B, S]
input g : i32[B, 4] @ [tp, _]
s = sum(ids, 0)
m = max(idm, 0)
r = sum(idr, 0)
t = sum(idt, 0) + sum(rep, 0)
a = ids * 1
output s, m, t, g
output r @ [tp]
output a @ [_, tp]
output rep @ [tp, _]
";

fn plan(src: &str, mesh: &str) -> Plan {
    let src = SourceFile::new("t.tpl", src.to_string());
    let mesh = if mesh.contains('=') {
        Mesh::parse(mesh).unwrap()
    } else {
        Mesh::degree(mesh.parse().unwrap()).unwrap()
    };
    compile_plan(&src, &[], mesh, Device::default())
        .unwrap_or_else(|e| panic!("{}", e.render(Some(&src))))
}

/// An i32 array of `shape` whose element at flat position `i` is `f(i)`.
fn ints(shape: &[usize], f: impl Fn(usize) -> i32) -> Tensor {
    let n = shape.iter().product();
    Tensor::I32(ArrayD::from_shape_vec(IxDyn(shape), (0..n).map(f).collect()).unwrap())
}

/// Each column of `ids` holds one big id (in row `c % 8`) and zeros: sums and maxima are the big
/// ids themselves, exactly.
fn int_leaves() -> BTreeMap<String, Tensor> {
    let big = |c: usize| BIG[c % BIG.len()];
    let mut m = BTreeMap::new();
    let ids = ints(&[8, 1024], |i| {
        if i / 1024 == i % 8 {
            big(i % 1024)
        } else {
            0
        }
    });
    for name in ["ids", "idm", "idr", "idt"] {
        m.insert(name.into(), ids.clone());
    }
    m.insert("rep".into(), ints(&[8, 1024], |i| big(i) - (i % 3) as i32));
    m.insert("g".into(), ints(&[8, 4], big));
    m
}

#[test]
fn integers_above_2_pow_24_move_exactly_through_every_collective() {
    for mesh in ["2", "4", "8", "dp=2,tp=4"] {
        let src = if mesh.contains("dp") {
            INTS.replace("mesh tp", "mesh dp, tp")
        } else {
            INTS.to_string()
        };
        let plan = plan(&src, mesh);
        let ops: Vec<String> = plan
            .local
            .nodes()
            .map(|(_, n)| match &n.op {
                Op::AllReduce { reduce, .. } => format!("all_reduce {reduce:?}"),
                op => op.name().to_string(),
            })
            .collect();
        for kind in [
            "all_reduce Sum",
            "all_reduce Max",
            "all_to_all",
            "all_gather",
            "shard_slice",
        ] {
            assert!(
                ops.iter().any(|o| o == kind),
                "{mesh}: no {kind} in {ops:?}"
            );
        }
        let leaves = int_leaves();
        let want = reference::run(&plan.global, &leaves, &leaves).unwrap();
        let got = run_threads(&plan, &LeafSource::Arrays(leaves), 1, None).unwrap();
        assert_eq!(
            got.outputs, want,
            "{mesh}: outputs differ from the reference"
        );
        let s = got.outputs["s"].as_i32().unwrap();
        assert_eq!(s[[0]], BIG[0]);
        assert_eq!(s[[1]], BIG[1]);
        assert_eq!(got.outputs["m"].as_i32().unwrap()[[2]], BIG[2]);
        assert_eq!(got.outputs["g"], int_leaves()["g"]);
    }
}

/// A program whose ids (sharded over the batch) index a table, replicated or split by rows.
fn lookup_program(table: &str) -> String {
    format!(
        "mesh tp
dim B = 8, S = 4, V = 16, H = 8
input ids : i32[B, S] @ [tp, _]
input labels : i32[B, S] @ [tp, _]
param emb : f32[V, H] {table}
param w : f32[H, V]
x = embedding(ids, emb)
l = cross_entropy(x @ w, labels)
output l
"
    )
}

#[test]
fn bad_ids_and_labels_are_reported_at_their_global_position() {
    // Row 7, column 2 of the global [8, 4] tensor: flat position 30, in the last rank's block at
    // degree 4 (where it is that block's position 6).
    for table in ["", "@ [tp, _]"] {
        let plan = plan(&lookup_program(table), "4");
        let mut leaves = global_leaves(&plan.global, &LeafSource::Seed(3)).unwrap();
        let good = ints(&[8, 4], |i| (i % 16) as i32);
        let bad = ints(&[8, 4], |i| if i == 30 { 99 } else { (i % 16) as i32 });
        leaves.insert("ids".into(), bad.clone());
        leaves.insert("labels".into(), good.clone());
        let e = run_threads(&plan, &LeafSource::Arrays(leaves.clone()), 1, None).unwrap_err();
        let want = reference::run(&plan.global, &leaves, &leaves).unwrap_err();
        assert_eq!(
            want,
            ExecError::IdOutOfRange {
                id: 99,
                position: 30,
                vocab: 16
            }
        );
        assert!(e.to_string().contains(&want.to_string()), "{table}: {e}");
        assert!(e.to_string().starts_with("rank 3:"), "{table}: {e}");
        leaves.insert("ids".into(), good);
        leaves.insert("labels".into(), bad);
        let e = run_threads(&plan, &LeafSource::Arrays(leaves), 1, None).unwrap_err();
        let want = ExecError::LabelOutOfRange {
            label: 99,
            position: 30,
            classes: 16,
        };
        assert!(e.to_string().contains(&want.to_string()), "{table}: {e}");
    }
}

#[test]
fn a_thousand_ranks_run_on_threads_or_fail_cleanly() {
    let src = "mesh tp
dim N = 2048
input x : f32[N] @ [tp]
y = x * 2.0
output y
";
    let plan = plan(src, "1024");
    match run_threads(&plan, &LeafSource::Seed(1), 1, None) {
        Ok(out) => {
            let leaves = global_leaves(&plan.global, &LeafSource::Seed(1)).unwrap();
            let want = reference::run(&plan.global, &leaves, &leaves).unwrap();
            assert_eq!(out.outputs, want);
        }
        Err(e @ RunError::TooManyRanks { .. }) => assert!(e.to_string().contains("MPI")),
        Err(e) => panic!("1024 ranks: {e}"),
    }
    let plan = plan_of_size(tpc::exec::spmd::MAX_THREAD_RANKS * 2);
    let e = run_threads(&plan, &LeafSource::Seed(1), 1, None).unwrap_err();
    assert!(matches!(e, RunError::TooManyRanks { .. }), "{e}");
    assert!(e.to_string().contains("mpirun"), "{e}");
}

/// The doubling program on `n` ranks (compiled, never run past the rank check).
fn plan_of_size(n: usize) -> Plan {
    let src = format!("mesh tp\ndim N = {n}\ninput x : f32[N] @ [tp]\ny = x * 2.0\noutput y\n");
    plan(&src, &n.to_string())
}

#[test]
fn assembly_refuses_blocks_of_the_wrong_shape_or_kind() {
    let plan = plan(INTS, "2");
    let good: Vec<RankOutput> = (0..2)
        .map(|_| RankOutput {
            outputs: plan
                .local
                .outputs()
                .iter()
                .map(|o| {
                    let ty = plan.local.ty(o.value);
                    let shape: Vec<usize> = ty.shape.iter().map(|&d| d as usize).collect();
                    ints(&shape, |i| i as i32)
                })
                .collect(),
            step_times: vec![0.0],
            collectives: BTreeMap::new(),
            peak_bytes: 0,
            pipeline: None,
        })
        .collect();
    let copy = |f: &dyn Fn(&mut Vec<RankOutput>)| {
        let mut r: Vec<RankOutput> = good
            .iter()
            .map(|o| RankOutput {
                outputs: o.outputs.clone(),
                step_times: o.step_times.clone(),
                collectives: BTreeMap::new(),
                peak_bytes: 0,
                pipeline: None,
            })
            .collect();
        f(&mut r);
        r
    };
    assert!(assemble(&plan, copy(&|_| {})).is_ok());
    let wrong_shape = copy(&|r| r[1].outputs[0] = ints(&[3], |i| i as i32));
    let e = assemble(&plan, wrong_shape).unwrap_err();
    assert!(matches!(e, RunError::Assemble { .. }), "{e}");
    assert!(e.to_string().contains("shape"), "{e}");
    let wrong_kind = copy(&|r| r[0].outputs[0] = Tensor::F32(ArrayD::zeros(IxDyn(&[1024]))));
    assert!(matches!(
        assemble(&plan, wrong_kind),
        Err(RunError::Assemble { .. })
    ));
    let missing = copy(&|r| {
        r[1].outputs.pop();
    });
    assert!(matches!(
        assemble(&plan, missing),
        Err(RunError::Assemble { .. })
    ));
    let one_rank = copy(&|r| {
        r.pop();
    });
    assert!(matches!(
        assemble(&plan, one_rank),
        Err(RunError::Assemble { .. })
    ));
}

/// Writes a compressed archive at `path` whose array `name` honestly holds `n` float32 zeros
/// (streamed: the file is about n/256 bytes).
fn zeros_npz(path: &std::path::Path, name: &str, n: u64) {
    use zip::write::SimpleFileOptions;
    let opts = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    z.start_file(format!("{name}.npy"), opts).unwrap();
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({n},), }}");
    let mut header = format!("{dict:<117}").into_bytes();
    header.push(b'\n');
    z.write_all(b"\x93NUMPY\x01\x00").unwrap();
    z.write_all(&(header.len() as u16).to_le_bytes()).unwrap();
    z.write_all(&header).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut left = n * 4;
    while left > 0 {
        let k = left.min(chunk.len() as u64);
        z.write_all(&chunk[..k as usize]).unwrap();
        left -= k;
    }
    z.finish().unwrap();
}

#[test]
fn an_npz_that_does_not_fit_is_refused_before_its_data_is_read() {
    // 2^30 float32 zeros: 4 GiB of data, four times what this binary may allocate at once.
    let big = 1u64 << 30;
    let dir = std::env::temp_dir().join(format!("tpc-npz-headers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let g = plan(
        "mesh tp\nparam w : f32[4]\ninput x : f32[4]\ny = x * w\noutput y\n",
        "1",
    )
    .global;
    let cases = [
        (
            "w",
            "`w` has shape [1073741824], the program declares f32[4]",
        ),
        (
            "huge",
            "extra array `huge`: the program has no param of that name",
        ),
    ];
    for (name, problem) in cases {
        let path = dir.join(format!("{name}.npz"));
        zeros_npz(&path, name, big);
        assert!(
            std::fs::metadata(&path).unwrap().len() < big / 64,
            "{name}: compressed"
        );
        let e = npz::load(path.to_str().unwrap(), &g, true).unwrap_err();
        let NpzError::Mismatch { problems, .. } = &e else {
            panic!("{name}: {e}");
        };
        assert!(problems.iter().any(|p| p == problem), "{name}: {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
