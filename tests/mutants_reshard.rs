//! Reshards at the edges of `plan_reshard`'s step limit (found by cargo-mutants: lowering the
//! limit `4·(mesh rank + tensor rank) + 4` survived the suite).

mod prop_support;

use prop_support::assert_runs;
use tpc::ir::Op;

/// A partial scalar on a one-axis mesh: mesh rank 1, tensor rank 0, one all-reduce step.
#[test]
fn a_partial_scalar_is_all_reduced() {
    let text = "
mesh tp
input x : f32[4096] @ [tp]
y = sum(x, axis=0)
output y
";
    let plan = assert_runs(text, "tp=4");
    let all_reduces = plan
        .local
        .nodes()
        .filter(|(_, n)| matches!(n.op, Op::AllReduce { .. }))
        .count();
    assert_eq!(all_reduces, 1);
}
