//! The plan verifier: every example's plan verifies, and each class of tampered plan document
//! (one that would otherwise run with a wrong answer) is refused by the loader and by `tpc run`.

use std::process::Command;
use tpc::diag::SourceFile;
use tpc::driver::compile_plan;
use tpc::emit::plan_json::{from_json, to_json, PlanDoc, PlanJsonError};
use tpc::ir::{Op, ReduceOp, UnaryOp, ValueId};
use tpc::mesh::{Device, Mesh};
use tpc::plan::verify::{verify, PlanParts};
use tpc::plan::Plan;
use tpc::sharding::{PartialOp, Placement};

/// The plan of `text` on `mesh`.
fn plan(name: &str, text: &str, mesh: &str) -> Plan {
    let src = SourceFile::new(name, text);
    let m = if mesh.contains('=') {
        Mesh::parse(mesh).unwrap()
    } else {
        Mesh::degree(mesh.parse().unwrap()).unwrap()
    };
    compile_plan(&src, &[], m, Device::default())
        .unwrap_or_else(|e| panic!("{name} on {mesh:?}: {}", e.render(Some(&src))))
}

fn example(name: &str, mesh: &str) -> Plan {
    let path = format!("examples/{name}.tpl");
    plan(&path, &std::fs::read_to_string(&path).unwrap(), mesh)
}

fn parts(p: &Plan) -> PlanParts<'_> {
    PlanParts {
        global: &p.global,
        local: &p.local,
        mesh: &p.mesh,
        placements: &p.placements,
        origin: &p.origin,
    }
}

#[test]
fn every_example_verifies_on_every_mesh() {
    let mut names: Vec<String> = std::fs::read_dir("examples")
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            n.strip_suffix(".tpl").map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 5, "{names:?}");
    for name in &names {
        for mesh in ["1", "2", "4", "8", "dp=2,tp=4"] {
            let p = example(name, mesh);
            verify(parts(&p)).unwrap_or_else(|e| panic!("{name} on {mesh}: {e}"));
            from_json(&to_json(&p)).unwrap_or_else(|e| panic!("{name} on {mesh}: {e}"));
        }
    }
}

/// The message of the loader's refusal of `doc`.
fn refused(doc: &PlanDoc) -> String {
    match from_json(&serde_json::to_string(doc).unwrap()) {
        Err(PlanJsonError::Corrupt(m)) => m,
        Err(e) => panic!("expected a corrupt document, got {e}"),
        Ok(_) => panic!("a tampered plan loaded"),
    }
}

fn doc(p: &Plan) -> PlanDoc {
    serde_json::from_str(&to_json(p)).unwrap()
}

/// The local node index of the first node whose op satisfies `f`, from `start`.
fn find(d: &PlanDoc, start: usize, f: impl Fn(&Op) -> bool) -> usize {
    (start..d.local.nodes.len())
        .find(|&i| f(&d.local.nodes[i].op))
        .expect("no such node")
}

fn mlp() -> PlanDoc {
    let d = doc(&example("mlp", "8"));
    // The shape these tests rely on (see `tpc compile examples/mlp.tpl --degree 8`).
    assert!(matches!(d.local.nodes[8].op, Op::AllReduce { .. }));
    assert!(matches!(
        d.local.nodes[6].op,
        Op::Unary { op: UnaryOp::Gelu }
    ));
    d
}

#[test]
fn the_untampered_documents_load() {
    from_json(&serde_json::to_string(&mlp()).unwrap()).unwrap();
}

const ROW_GELU: &str = "mesh tp\ndim B = 8, H = 64\ninput x : f32[B, H] @ [_, tp]\n\
                        param w : f32[H, H] @ [tp, _]\ny = gelu(x @ w)\noutput y\n";

#[test]
fn a_skipped_all_reduce_before_gelu_is_refused() {
    let mut d = doc(&plan("row.tpl", ROW_GELU, "4"));
    let ar = find(&d, 0, |op| matches!(op, Op::AllReduce { .. }));
    let gelu = find(&d, ar, |op| matches!(op, Op::Unary { .. }));
    let partial = d.local.nodes[ar].inputs[0];
    d.local.nodes[gelu].inputs[0] = partial;
    let msg = refused(&d);
    assert!(
        msg.contains("(gelu)") && msg.contains("not linear"),
        "{msg}"
    );
    // Claiming that gelu passes the partial sum through is refused too.
    let y = d.local.nodes[gelu].outputs[0];
    d.placements[y.index()] = d.placements[partial.index()].clone();
    let msg = refused(&d);
    assert!(
        msg.contains("(gelu)") && msg.contains("not linear"),
        "{msg}"
    );
}

#[test]
fn a_sum_turned_into_max_is_refused() {
    let mut d = mlp();
    d.local.nodes[8].op = Op::AllReduce {
        axis: "tp".into(),
        size: 8,
        reduce: ReduceOp::Max,
        also: Vec::new(),
    };
    let msg = refused(&d);
    assert!(
        msg.contains("but it moves Partial(max) -> Replicate over tp"),
        "{msg}"
    );
}

#[test]
fn a_renamed_param_is_refused() {
    let mut d = mlp();
    d.local.nodes[0].op = Op::Param { name: "w9".into() };
    let msg = refused(&d);
    assert!(
        msg.starts_with("local node n0 (param w9), origin %1"),
        "{msg}"
    );
    assert!(msg.contains("its origin %1 is param w1"), "{msg}");
}

#[test]
fn gelu_swapped_for_relu_is_refused() {
    let mut d = mlp();
    d.local.nodes[6].op = Op::Unary { op: UnaryOp::Relu };
    let msg = refused(&d);
    assert!(msg.starts_with("local node n6 (relu)"), "{msg}");
    assert!(msg.contains("is computed by gelu"), "{msg}");
}

#[test]
fn an_output_pointing_elsewhere_is_refused() {
    let mut d = mlp();
    // %8 has the output's type and placement, but holds the matmul result, not y.
    d.local.outputs[0].value = ValueId::new(8);
    let msg = refused(&d);
    assert!(msg.contains("output y is local value %8"), "{msg}");
}

#[test]
fn a_collective_changing_another_mesh_axis_is_refused() {
    let text = "mesh dp, tp\ndim B = 8, H = 64, N = 16\ninput x : f32[B, H] @ [_, (dp, tp)]\n\
                param w : f32[H, N]\ny = x @ w\noutput y\n";
    let p = plan("two.tpl", text, "dp=2,tp=4");
    let mut d = doc(&p);
    let first = find(
        &d,
        0,
        |op| matches!(op, Op::AllReduce { axis, .. } if axis == "dp"),
    );
    let second = find(&d, first + 1, |op| matches!(op, Op::AllReduce { .. }));
    let mm = d.local.nodes[first].inputs[0];
    let (a, b) = (
        d.local.nodes[first].outputs[0],
        d.local.nodes[second].outputs[0],
    );
    assert_eq!(d.local.outputs[0].value, b);
    // The dp all-reduce claims to clear tp's partial sum too; the tp one is left dead but
    // consistent, and the output reads the first.
    d.placements[a.index()] = Placement::replicated(2, 2);
    d.local.nodes[second].inputs[0] = mm;
    d.placements[b.index()] = Placement {
        dims: vec![vec![], vec![]],
        partial: vec![Some(PartialOp::Sum), None],
    };
    d.local.outputs[0].value = a;
    let msg = refused(&d);
    assert!(msg.contains("differ on other axes"), "{msg}");
}

#[test]
fn a_shard_slice_on_the_wrong_dim_is_refused() {
    let text = "mesh tp\ndim B = 8, H = 64\ninput x : f32[B, H] @ [_, tp]\n\
                r = relu(x) @ [_, _]\ns = r * 2.0 @ [tp, _]\noutput s @ [tp, _]\n";
    let mut d = doc(&plan("slice.tpl", text, "4"));
    let s = find(&d, 0, |op| matches!(op, Op::ShardSlice { .. }));
    d.local.nodes[s].op = Op::ShardSlice {
        axis: "tp".into(),
        size: 4,
        dim: 1,
    };
    // Every local type follows (the IR verifier is satisfied); the placements do not.
    let y = d.local.nodes[s].outputs[0];
    d.local.values[y.index()].ty.shape = vec![8, 16];
    d.local.values[y.index() + 1].ty.shape = vec![8, 16];
    let msg = refused(&d);
    assert!(msg.contains("shard_slice{dim=1,tp=4}"), "{msg}");
    assert!(
        msg.contains("is f32[8,16] in [tp, _], but its origin"),
        "{msg}"
    );
    // Also claiming the placement the slice gives is refused: the slice moves tp, not dim 0.
    d.placements[y.index()] = Placement {
        dims: vec![vec![], vec![0]],
        partial: vec![None],
    };
    let msg = refused(&d);
    assert!(msg.contains("(mul_scalar"), "{msg}");
}

#[test]
fn a_wrong_local_shape_is_refused() {
    let mut d = mlp();
    // b2 as f32[1] still broadcasts in the add, but is not b2's block.
    d.local.values[9].ty.shape = vec![1];
    let msg = refused(&d);
    assert!(
        msg.contains("local value %9 is f32[1] in [_], but its origin"),
        "{msg}"
    );
}

#[test]
fn a_dropped_node_is_refused() {
    // gelu skipped: the second matmul reads its operand.
    let mut d = mlp();
    d.local.nodes[7].inputs[0] = ValueId::new(5);
    let msg = refused(&d);
    assert!(msg.starts_with("local node n7 (matmul)"), "{msg}");
    assert!(msg.contains("its operand 0 (%5) holds"), "{msg}");
    // The last node removed: the output reads the all-reduce.
    let mut d = mlp();
    d.local.nodes.pop();
    d.local.values.pop();
    d.placements.pop();
    d.origin.pop();
    d.local.outputs[0].value = ValueId::new(8);
    let msg = refused(&d);
    assert!(msg.contains("output y is local value %8"), "{msg}");
}

#[test]
fn a_dropped_rescaling_of_a_split_mean_is_refused() {
    let text = "mesh tp\ndim B = 64, H = 65536\ninput x : f32[B, H] @ [_, tp]\n\
                h = relu(x) @ [_, tp]\nm = mean(h, axis=1)\noutput m\n";
    let d0 = doc(&plan("mean.tpl", text, "4"));
    let s = find(&d0, 0, |op| matches!(op, Op::Scalar { .. }));
    let mut d = d0.clone();
    let mean = d.local.nodes[s].inputs[0];
    let user = find(&d, s + 1, |op| matches!(op, Op::AllReduce { .. }));
    d.local.nodes[user].inputs[0] = mean;
    let msg = refused(&d);
    assert!(
        msg.contains("its only reader must scale it by 1/4"),
        "{msg}"
    );
    let mut d = d0;
    d.local.nodes[s].op = Op::Scalar {
        op: tpc::ir::BinaryOp::Mul,
        value: 0.5,
        scalar_lhs: false,
    };
    let msg = refused(&d);
    assert!(msg.contains("scale it by 1/4"), "{msg}");
}

#[test]
fn tpc_run_refuses_a_tampered_plan() {
    let dir = std::env::temp_dir().join(format!("tpc-plan-verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tampered.json");
    let mut d = mlp();
    d.local.nodes[6].op = Op::Unary { op: UnaryOp::Relu };
    std::fs::write(&path, serde_json::to_string(&d).unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args(["run", path.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("corrupt plan document"), "{err}");
    assert!(err.contains("local node n6 (relu)"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn the_library_entry_point_applies_the_declared_mesh() {
    let path = "examples/mlp_2d.tpl";
    let src = SourceFile::new(path, std::fs::read_to_string(path).unwrap());
    let g = tpc::driver::compile_global(&src, &[]).unwrap();
    assert_eq!(g.mesh_axes, ["dp", "tp"]);
    // Only tp sized: dp is declared by the program and gets size 1.
    let p = Plan::build(g.clone(), Mesh::parse("tp=4").unwrap(), Device::default()).unwrap();
    assert_eq!(p.mesh.axis_size(p.mesh.axis_index("dp").unwrap()), 1);
    assert_eq!(p.mesh.num_devices(), 4);
    verify(parts(&p)).unwrap();
    // The same plan as with the axis given explicitly.
    let q = Plan::build(g, Mesh::parse("tp=4,dp=1").unwrap(), Device::default()).unwrap();
    assert_eq!(to_json(&p), to_json(&q));
}

const VOCAB_LOSS: &str = "mesh tp\ndim B = 8, S = 256, H = 1024, V = 65536\n\
                          input x : f32[B, S, H]\ninput labels : i32[B, S]\n\
                          param w : f32[H, V] @ [_, tp]\nlogits = x @ w @ [_, _, tp]\n\
                          loss = cross_entropy(logits, labels)\noutput loss\n";

#[test]
fn a_tampered_vocab_parallel_loss_is_refused() {
    let d0 = doc(&plan("ce.tpl", VOCAB_LOSS, "4"));
    let tl = find(&d0, 0, |op| matches!(op, Op::TargetLogit { .. }));
    // The target logit read from the raw logits instead of the shifted ones.
    let mut d = d0.clone();
    let z = d.local.nodes[tl].inputs[0];
    let sub = d.local.values[z.index()].node;
    d.local.nodes[tl].inputs[0] = d.local.nodes[sub.index()].inputs[0];
    let msg = refused(&d);
    assert!(msg.contains("not the vocab-parallel form"), "{msg}");
    // log swapped for exp.
    let mut d = d0;
    let log = find(&d, tl, |op| matches!(op, Op::Unary { op: UnaryOp::Log }));
    d.local.nodes[log].op = Op::Unary { op: UnaryOp::Exp };
    let msg = refused(&d);
    assert!(msg.contains("not the vocab-parallel form"), "{msg}");
}

#[test]
fn outputs_renamed_or_replaced_are_refused() {
    let mut d = mlp();
    d.local.outputs[0].name = "z".into();
    let msg = refused(&d);
    assert!(
        msg.contains("local output z stands where global output y is"),
        "{msg}"
    );
    let mut d = mlp();
    d.local.outputs.clear();
    assert!(refused(&d).contains("has 0 outputs"));
}

#[test]
fn a_partial_leaf_is_refused() {
    let mut d = mlp();
    // b2 claimed to be a partial sum: every device would add its full copy.
    d.placements[9].partial = vec![Some(PartialOp::Sum)];
    let msg = refused(&d);
    assert!(msg.contains("a leaf is never partial"), "{msg}");
}

/// gpt_train.tpl with its tokens split over dp on `dp=2,tp=4`: its gradient sync is a bucket.
fn bucketed() -> PlanDoc {
    let path = "examples/gpt_train.tpl";
    let text = std::fs::read_to_string(path)
        .unwrap()
        .replace("mesh tp", "mesh dp, tp")
        .replace(
            "input tokens : i32[B, S]",
            "input tokens : i32[B, S] @ [dp, _]",
        );
    doc(&plan(path, &text, "dp=2,tp=4"))
}

fn bucket_index(d: &PlanDoc) -> usize {
    (0..d.local.nodes.len())
        .find(|&i| {
            matches!(d.local.nodes[i].op, Op::AllReduce { .. }) && d.local.nodes[i].inputs.len() > 3
        })
        .expect("a bucket")
}

/// A bucket whose results are swapped (result 0 holding operand 1's value), one missing a
/// result, or one reduced over another axis is refused; the untampered one loads.
#[test]
fn tampered_buckets_are_refused() {
    let d = bucketed();
    from_json(&serde_json::to_string(&d).unwrap()).expect("the bucketed plan loads");
    let b = bucket_index(&d);
    let mut swapped = d.clone();
    swapped.local.nodes[b].inputs.swap(0, 1);
    assert!(
        refused(&swapped).contains("holds another value"),
        "{}",
        refused(&swapped)
    );
    let mut short = d.clone();
    short.local.nodes[b].inputs.pop();
    assert!(
        refused(&short).contains("does not verify"),
        "{}",
        refused(&short)
    );
    let mut other_axis = d.clone();
    other_axis.local.nodes[b].op = Op::AllReduce {
        axis: "tp".into(),
        size: 4,
        reduce: ReduceOp::Sum,
        also: Vec::new(),
    };
    let msg = refused(&other_axis);
    assert!(msg.contains("Partial(sum) -> Replicate over tp"), "{msg}");
}
