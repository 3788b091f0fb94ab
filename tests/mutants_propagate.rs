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

/// A partial sum goes through a matmul with a replicated weight (linear in its first operand)
/// and is all-reduced once, at the smaller result; the weight stays whole on every device.
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

/// An output's split reaches back one op per pass: propagation repeats its passes until nothing
/// changes, so every op of the chain runs on row blocks, not only the last one.
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

/// A vocab-parallel loss pays three all-reduces of the rows: with a vocab of 8 on 4 devices,
/// gathering the logits once is cheaper, so the loss runs replicated.
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

/// A label is a strategy only when an operand holds it and the result keeps it or it may be
/// contracted: softmax's axis is in no tensor, and a label an operand alone holds is dropped.
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

/// `y = x + z` with `x` split on rows and `z` on columns: both splits cost the same (one
/// all-to-all), and a tie keeps the earlier label, so `z` moves to row blocks.
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

/// On a device where everything is nearly free, the strategies' costs differ by less than the
/// absolute margin (1e-18 s) a later candidate must win by, so the add stays replicated.
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

/// An unannotated param shows the placement its first user asked for: `w2` after a
/// column-split `w1` is row blocks; the unannotated input `x` stays whole.
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

/// `h` is wanted whole by an output and in row blocks by `exp`: both demands count, so on slow
/// compute `h` is computed in row blocks (and gathered for the output), not whole.
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

/// One value output twice, in row blocks and whole: both outputs' demands count, so on slow
/// compute `h` is computed in row blocks and gathered once for the whole copy.
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

/// A free leaf's shown state (its first user's split of `x`) is no reason for another user to
/// split: shardings are never invented, so `gelu(x)` runs on the whole `x`.
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

/// With whole logits, the vocab-parallel loss is not a candidate: nothing splits the vocab, so
/// the loss runs replicated with no collective and `w` stays whole.
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

/// A sharded tensor still costs its block in memory: at a memory price just below the break
/// even, row-splitting `w2` (half of it per device, one all-reduce) loses to gathering `h`.
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

/// With no latency, gathering `h` costs its bytes: just below the memory price where
/// row-splitting `w2` pays off the plan gathers `h`, just above it all-reduces `y`.
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

/// With memory free, the only gain of running `gelu` on row blocks is a quarter of the compute:
/// that is enough to gather `y` after it rather than `x` before it.
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
        mem_weight: 0.0,
        bandwidth: 1e16,
        flops_f32: 1e21,
        flops_half: 1e21,
        ..Device::default()
    }
}

/// Resharding a result into its constraint is a cost: `h` wanted in column blocks is computed
/// in them (gathering the small `x` first), not in row blocks moved by an all-to-all.
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

/// Before any demand is known, a partial result is priced with the all-reduce it will need:
/// the partial `h` is reduced once and both of its users run replicated, instead of a
/// reduce-scatter for `y` and a second all-reduce later.
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

/// Propagation runs until no choice changes, even after a pass in which every choice changed:
/// `a` first follows its output into column blocks, then (a tie between its two demands) takes
/// `b`'s row blocks, so the one all-to-all moves the output `a`, not `a` before `exp`.
#[test]
fn a_pass_in_which_every_choice_changed_is_not_the_fixpoint() {
    let text = "
mesh tp
input x : f32[64, 32]
a = gelu(x)
b = exp(a)
output a @ [_, tp]
output b @ [tp, _]
";
    let plan = assert_runs(text, "4");
    assert_eq!(local_shape(&plan, "a"), vec![16, 32]);
    assert_eq!(collectives(&plan), vec![("all_to_all", vec![16, 32])]);
}
