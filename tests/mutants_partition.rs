//! What partitioning emits, pinned on small programs (found by cargo-mutants on
//! `src/partition/mod.rs` and `src/partition/ops.rs`: these survived the suite). Each program
//! also runs on threads against the unsharded reference.

mod prop_support;

use prop_support::assert_runs;
use tpc::plan::Plan;

/// Each collective of the plan as (op name, who asked for it, the global value it moves).
fn explained(p: &Plan) -> Vec<(&'static str, String, String)> {
    p.local
        .nodes()
        .filter(|(_, n)| n.op.is_collective())
        .map(|(id, n)| {
            let pr = &p.provenance[&id];
            (n.op.name(), pr.user.clone(), pr.value.clone())
        })
        .collect()
}

/// Provenance names the asking op or output and the value moved (by name, else by its op).
#[test]
fn provenance_names_the_user_and_the_value() {
    let text = "
mesh tp
input x : f32[8, 256] @ [_, tp]
param w : f32[256, 16] @ [tp, _]
h = gelu(x @ w)
y = exp(h) @ [tp, _]
output y
";
    let plan = assert_runs(text, "4");
    let want = vec![
        ("reduce_scatter", "gelu".into(), "the matmul result".into()),
        ("all_gather", "output y".into(), "y".into()),
    ];
    assert_eq!(explained(&plan), want);
}

/// A constraint on an intermediate is named as the user of the reshard it causes.
#[test]
fn provenance_names_a_sharding_constraint() {
    let text = "
mesh tp
input x : f32[8, 256] @ [_, tp]
param w : f32[256, 16] @ [tp, _]
h = x @ w @ [_, tp]
output h @ [_, tp]
";
    let plan = assert_runs(text, "4");
    let want = vec![(
        "reduce_scatter",
        "sharding constraint on h".into(),
        "h".into(),
    )];
    assert_eq!(explained(&plan), want);
}
