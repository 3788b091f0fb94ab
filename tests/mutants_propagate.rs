//! Placements propagation must choose, pinned on small programs (found by cargo-mutants on
//! `src/sharding/propagate.rs`: these choices survived the suite). Each program also runs on
//! threads against the unsharded reference.

mod prop_support;

use prop_support::{assert_runs, check_plan, mesh, plan_of};
use tpc::diag::SourceFile;
use tpc::driver::compile_global;
use tpc::ir::{Dtype, Graph, Op, TensorType, ValueId};
use tpc::mesh::Device;
use tpc::plan::Plan;
use tpc::sharding::rules::{rule, Rule};
use tpc::sharding::{propagate, AxisPl, Sharding, Strategy};

/// The collectives of the plan as (op name, local input shape), in program order.
fn collectives(p: &Plan) -> Vec<(&'static str, Vec<u64>)> {
    p.local
        .nodes()
        .filter(|(_, n)| n.op.is_collective())
        .map(|(_, n)| (n.op.name(), p.local.ty(n.inputs[0]).shape.clone()))
        .collect()
}

/// A partial sum passes a linear matmul and is all-reduced once, at the smaller result.
#[test]
fn a_partial_sum_is_reduced_after_a_linear_matmul() {
    let text = "
mesh tp
input x : f32[8, 256] @ [_, tp]
param w1 : f32[256, 512] @ [tp, _]
param w2 : f32[512, 16] @ [_, _]
h = x @ w1
y = h @ w2
output y
";
    let plan = assert_runs(text, "4");
    assert_eq!(collectives(&plan), vec![("all_reduce", vec![8, 16])]);
    let kept = plan
        .local
        .nodes()
        .filter(|(_, n)| matches!(n.op, Op::KeepOnFirst { .. }))
        .count();
    assert_eq!(kept, 0);
}

/// The local shape of the value named `name` in the plan.
fn local_shape(p: &Plan, name: &str) -> Vec<u64> {
    let (v, _) = p
        .local
        .values()
        .find(|(_, val)| val.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no local value {name}"));
    p.local.ty(v).shape.clone()
}

/// Passes repeat to the fixpoint, so an output split reaches back through the whole chain.
#[test]
fn an_output_split_flows_back_through_a_chain_to_the_fixpoint() {
    let text = "
mesh tp
input x : f32[64, 32] @ [_, _]
a = gelu(x)
b = gelu(a)
c = gelu(b)
output c @ [tp, _]
";
    let plan = assert_runs(text, "4");
    for name in ["a", "b", "c"] {
        assert_eq!(local_shape(&plan, name), vec![16, 32], "{name}");
    }
    assert!(collectives(&plan).is_empty());
}

/// The vocab-parallel loss pays 3 row all-reduces: for a vocab of 8, gathering logits is cheaper.
#[test]
fn a_narrow_vocab_gathers_the_logits_instead_of_the_vocab_parallel_loss() {
    let text = "
mesh tp
input h : f32[64, 16]
input labels : i32[64]
param w : f32[16, 8] @ [_, tp]
loss = cross_entropy(h @ w, labels)
output loss
";
    let plan = assert_runs(text, "4");
    assert_eq!(collectives(&plan), vec![("all_gather", vec![64, 2])]);
}

/// Only labels an operand holds and the result keeps (or contracts) are split strategies.
#[test]
fn only_labels_an_operand_holds_and_the_result_keeps_are_strategies() {
    let t = TensorType::new(Dtype::F32, vec![4, 8]);
    let softmax = rule(&Op::Softmax { axis: 1 }, &[&t], &[&t]).unwrap();
    let all: Vec<Strategy> = Strategy::all(&softmax).collect();
    assert_eq!(all, vec![Strategy::Replicate, Strategy::Split(0)]);
    let operand_only = Rule {
        operands: vec![vec![Some(0)]],
        result: vec![None],
        sizes: vec![8],
        contracted: vec![],
        linear: vec![],
    };
    let all: Vec<Strategy> = Strategy::all(&operand_only).collect();
    assert_eq!(all, vec![Strategy::Replicate]);
}

/// Row and column splits of the add cost the same; the tie keeps the first label (rows).
#[test]
fn a_tie_between_two_splits_keeps_the_first_label() {
    let plan = assert_runs(CROSSED_ADD, "4");
    let want = vec![("all_to_all", vec![8, 4]), ("all_gather", vec![2, 16])];
    assert_eq!(collectives(&plan), want);
}

/// Row-split `x` plus column-split `z`, wanted whole.
const CROSSED_ADD: &str = "
mesh tp
input x : f32[8, 16] @ [tp, _]
input z : f32[8, 16] @ [_, tp]
y = x + z
output y
";

/// Near-free costs differ by less than the 1e-18 s margin, so the first candidate stays.
#[test]
fn below_the_absolute_margin_the_first_candidate_stays() {
    let plan = plan_of("case.tpl", CROSSED_ADD, "4", nearly_free());
    check_plan(&plan).unwrap();
    let want = vec![("all_gather", vec![2, 16]), ("all_gather", vec![8, 4])];
    assert_eq!(collectives(&plan), want);
}

/// The global value named `name` in `g`.
fn value(g: &Graph, name: &str) -> ValueId {
    g.values()
        .find(|(_, v)| v.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("no value {name}"))
        .0
}

/// Propagation alone on `mesh_text` with the default device: the global graph and its sharding.
fn sharding(text: &str, mesh_text: &str) -> (Graph, Sharding) {
    let g = compile_global(&SourceFile::new("case.tpl", text), &[]).unwrap();
    let m = mesh(mesh_text).with_declared(&g.mesh_axes);
    let sh = propagate(&g, &m, &Device::default()).unwrap();
    (g, sh)
}

/// A free leaf shows its first user's ask: `w2` row blocks after a column-split `w1`.
#[test]
fn a_free_leaf_shows_the_placement_its_first_user_asked_for() {
    let text = "
mesh tp
input x : f32[8, 32]
param w1 : f32[32, 64] @ [_, tp]
param w2 : f32[64, 32]
y = gelu(x @ w1) @ w2
output y
";
    let (g, sh) = sharding(text, "4");
    assert!(sh.free[value(&g, "w2")] && sh.free[value(&g, "x")]);
    assert_eq!(sh.placement(value(&g, "w2")).axis(0), AxisPl::Shard(0));
    assert_eq!(sh.placement(value(&g, "x")).axis(0), AxisPl::Replicate);
}

/// A device whose compute is so slow that saving any of it beats any collective.
fn slow_compute() -> Device {
    Device {
        flops_f32: 1e3,
        flops_half: 1e3,
        ..Device::default()
    }
}

/// Both demands on `h` count (whole output, row-block `exp`): on slow compute `h` is split.
#[test]
fn every_distinct_demand_of_a_value_counts() {
    let text = "
mesh tp
input x : f32[64, 32]
h = gelu(x)
y = exp(h)
output y @ [tp, _]
output h
";
    let plan = plan_of("case.tpl", text, "4", slow_compute());
    check_plan(&plan).unwrap();
    assert_eq!(local_shape(&plan, "h"), vec![16, 32]);
    assert_eq!(collectives(&plan), vec![("all_gather", vec![16, 32])]);
}

/// Two outputs of one value are two demands: on slow compute `h` is split, gathered once.
#[test]
fn each_output_of_the_same_value_is_a_demand() {
    let text = "
mesh tp
input x : f32[64, 32]
h = gelu(x)
g = h
output h @ [tp, _]
output g
";
    let plan = plan_of("case.tpl", text, "4", slow_compute());
    check_plan(&plan).unwrap();
    assert_eq!(local_shape(&plan, "h"), vec![16, 32]);
    assert_eq!(collectives(&plan), vec![("all_gather", vec![16, 32])]);
}

/// A free leaf's shown split invents no split for its other users: `gelu(x)` runs whole.
#[test]
fn a_free_leaf_split_by_one_user_does_not_split_the_others() {
    let text = "
mesh tp
input x : f32[64, 32]
param w : f32[32, 64] @ [tp, _]
a = x @ w
b = gelu(x)
output a
output b
";
    let plan = assert_runs(text, "4");
    assert_eq!(local_shape(&plan, "b"), vec![64, 32]);
}

/// Whole logits never start a vocab-parallel loss: no collective, `w` stays whole.
#[test]
fn whole_logits_never_start_a_vocab_parallel_loss() {
    let text = "
mesh tp
input h : f32[64, 16]
input labels : i32[64]
param w : f32[16, 256]
loss = cross_entropy(h @ w, labels)
output loss
";
    let plan = assert_runs(text, "4");
    assert_eq!(collectives(&plan), vec![]);
    assert_eq!(local_shape(&plan, "w"), vec![16, 256]);
}

/// A shard still costs its block of memory: just below break-even, gathering `h` wins.
#[test]
fn a_sharded_weight_still_costs_its_block_of_memory() {
    let text = "
mesh tp
input x : f32[64, 256]
param w1 : f32[256, 256] @ [_, tp]
param w2 : f32[256, 256]
y = gelu(x @ w1) @ w2
output y
";
    let dev = Device {
        mem_weight: 3e-12,
        ..Device::default()
    };
    let plan = plan_of("case.tpl", text, "2", dev);
    check_plan(&plan).unwrap();
    assert_eq!(collectives(&plan), vec![("all_gather", vec![64, 128])]);
}

/// With no latency an all-gather costs its bytes: the gather/all-reduce flip sits between.
#[test]
fn an_all_gather_costs_the_blocks_it_brings() {
    let text = "
mesh tp
input x : f32[64, 256]
param w1 : f32[256, 256] @ [_, tp]
param w2 : f32[256, 256]
y = gelu(x @ w1) @ w2
output y
";
    for (mem_weight, want) in [
        (3e-13, ("all_gather", vec![64, 128])),
        (7e-13, ("all_reduce", vec![64, 256])),
    ] {
        let dev = Device {
            mem_weight,
            latency: 0.0,
            ..Device::default()
        };
        let plan = plan_of("case.tpl", text, "2", dev);
        check_plan(&plan).unwrap();
        assert_eq!(collectives(&plan), vec![want], "memory price {mem_weight}");
    }
}

/// With memory free, a quarter of the compute is reason enough to split `gelu` and gather `y`.
#[test]
fn a_split_runs_a_fraction_of_the_compute() {
    let text = "
mesh tp
input x : f32[64, 32] @ [tp, _]
y = gelu(x)
output y
";
    let dev = Device {
        mem_weight: 0.0,
        ..Device::default()
    };
    let plan = plan_of("case.tpl", text, "4", dev);
    check_plan(&plan).unwrap();
    assert_eq!(local_shape(&plan, "y"), vec![16, 32]);
    assert_eq!(collectives(&plan), vec![("all_gather", vec![16, 32])]);
}

/// A device on which compute, memory and latency are (nearly) free: only bytes moved count.
fn nearly_free() -> Device {
    Device {
        latency: 0.0,
        launch: 0.0,
        mem_weight: 0.0,
        bandwidth: 1e16,
        flops_f32: 1e21,
        flops_half: 1e21,
        ..Device::default()
    }
}

/// Resharding into a constraint costs: `h` is computed in its column blocks, no all-to-all.
#[test]
fn resharding_into_a_constraint_is_a_cost() {
    let text = "
mesh tp
input x : f32[64, 32] @ [tp, _]
param w : f32[32, 256]
h = x @ w @ [_, tp]
output h @ [_, tp]
";
    let plan = plan_of("case.tpl", text, "4", nearly_free());
    check_plan(&plan).unwrap();
    assert_eq!(local_shape(&plan, "h"), vec![64, 64]);
    assert_eq!(collectives(&plan), vec![("all_gather", vec![16, 32])]);
}

/// Before demands exist a partial result pays its all-reduce: `h` is reduced once.
#[test]
fn a_partial_result_is_priced_with_its_all_reduce_before_demands_are_known() {
    let text = "
mesh tp
input x : f32[64, 256] @ [_, tp]
param w : f32[256, 64] @ [tp, _]
param v : f32[64, 64]
h = x @ w
y = h @ v
z = neg(y) + h
output z
";
    let plan = assert_runs(text, "4");
    assert_eq!(collectives(&plan), vec![("all_reduce", vec![64, 64])]);
    assert_eq!(local_shape(&plan, "v"), vec![64, 64]);
}

/// Two outputs that disagree on a layout: `a` is made in its output's column blocks, which
/// `b` reads as they are (one buffer for both readers), and the one all-to-all is `b`'s.
#[test]
fn two_outputs_that_disagree_move_once() {
    let text = "
mesh tp
input x : f32[64, 32]
a = gelu(x)
b = exp(a)
output a @ [_, tp]
output b @ [tp, _]
";
    let plan = assert_runs(text, "4");
    assert_eq!(local_shape(&plan, "a"), vec![64, 8]);
    assert_eq!(collectives(&plan), vec![("all_to_all", vec![64, 8])]);
}
