//! Each term of propagation's cost model (compute, communication, memory) decides a plan, both
//! ways: raising the term's price flips the choice, lowering it flips it back.
//!
//! The program: `y = x @ w` with `x` split by rows over `tp=4` and `y` wanted replicated. Two
//! plans are possible:
//! - *shard*: the matmul runs on row blocks (a quarter of the FLOPs, the memory of a quarter of
//!   `x` and `y`), then `y` (64×4096) is all-gathered;
//! - *gather*: `x` (64×256, 16× smaller than `y`) is all-gathered first and the matmul runs
//!   replicated (all the FLOPs, whole `x` and `y` on every device).
//!
//! Slow compute, fast links or dear memory favour *shard*; the opposite favours *gather*. A sign
//! error in any term (e.g. compute counted as a gain) inverts one of these tests.

mod prop_support;

use prop_support::{plan_of, ROW_SPLIT_MATMUL};
use tpc::ir::Op;
use tpc::mesh::Device;
use tpc::plan::Plan;

/// The plan propagation chose.
#[derive(Debug, PartialEq)]
enum Choice {
    /// Matmul on row blocks, then an all-gather of its result.
    Shard,
    /// An all-gather of the input, then a replicated matmul.
    Gather,
}

fn compile(dev: Device) -> Plan {
    plan_of("cost_terms.tpl", ROW_SPLIT_MATMUL, "4", dev)
}

/// Reads the choice from the plan: the matmul's result placement and what the one all-gather
/// reads (both must agree).
fn choice(dev: Device) -> Choice {
    let plan = compile(dev);
    let g = &plan.local;
    let node_of = |pred: fn(&Op) -> bool| {
        let found: Vec<_> = g.nodes().filter(|(_, n)| pred(&n.op)).collect();
        assert_eq!(
            found.len(),
            1,
            "one such node in\n{}",
            tpc::emit::plan::print(&plan)
        );
        found[0].1
    };
    let matmul = node_of(|op| matches!(op, Op::MatMul));
    let gather = node_of(|op| matches!(op, Op::AllGather { .. }));
    let total: usize = g.nodes().filter(|(_, n)| n.op.is_collective()).count();
    assert_eq!(total, 1, "one collective");
    let y = matmul.outputs[0];
    let rows_split = !plan.placements[y].dims[0].is_empty();
    let gathers_result = gather.inputs[0] == y;
    let gathers_leaf = g.node(g.value(gather.inputs[0]).node).op.is_leaf();
    match (rows_split, gathers_result, gathers_leaf) {
        (true, true, false) => Choice::Shard,
        (false, false, true) => Choice::Gather,
        other => panic!("neither plan: {other:?}"),
    }
}

/// The default device with memory free, so that compute and links alone decide.
fn no_memory() -> Device {
    Device {
        mem_weight: 0.0,
        ..Device::default()
    }
}

#[test]
fn compute_price_decides() {
    let slow = |flops| Device {
        flops_f32: flops,
        ..no_memory()
    };
    assert_eq!(
        choice(slow(1e15)),
        Choice::Gather,
        "cheap compute: replicate it"
    );
    assert_eq!(choice(slow(1e12)), Choice::Shard, "dear compute: split it");
    assert_eq!(choice(slow(1e15)), Choice::Gather, "and back");
}

#[test]
fn communication_price_decides() {
    let link = |bandwidth| Device {
        flops_f32: 1e12,
        bandwidth,
        ..no_memory()
    };
    assert_eq!(
        choice(link(1e11)),
        Choice::Shard,
        "fast links: gather the big result"
    );
    assert_eq!(
        choice(link(1e9)),
        Choice::Gather,
        "slow links: gather the small input"
    );
    assert_eq!(choice(link(1e11)), Choice::Shard, "and back");
}

#[test]
fn latency_price_is_paid_by_both_plans_alike() {
    // Both plans launch one all-gather over the same group: latency alone never decides here.
    for latency in [0.0, 2e-6, 1e-2] {
        let dev = |flops| Device {
            flops_f32: flops,
            latency,
            ..no_memory()
        };
        assert_eq!(choice(dev(1e15)), Choice::Gather);
        assert_eq!(choice(dev(1e12)), Choice::Shard);
    }
}

#[test]
fn memory_price_decides() {
    let mem = |mem_weight| Device {
        flops_f32: 1e15,
        mem_weight,
        ..Device::default()
    };
    assert_eq!(
        choice(mem(0.0)),
        Choice::Gather,
        "free memory: the cheaper gather"
    );
    assert_eq!(
        choice(mem(1e-9)),
        Choice::Shard,
        "dear memory: hold quarters"
    );
    assert_eq!(choice(mem(0.0)), Choice::Gather, "and back");
}
