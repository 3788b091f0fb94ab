//! Multi-axis shard-to-shard reshards: every pair of placements of a small tensor on 2-D and 3-D
//! meshes, f32 and i32, executed on threads and compared bit for bit with the unsharded program
//! (data movement is exact). Where the direct path applies it must be the one chosen.

use tpc::diag::SourceFile;
use tpc::driver::compile_plan;
use tpc::exec::leaves::{global_leaves, LeafSource};
use tpc::exec::reference;
use tpc::exec::spmd::run_threads;
use tpc::ir::Op;
use tpc::mesh::{Device, Mesh};

/// Every spec of a rank-`rank` tensor over `axes` (each axis unused or on one dim, in every
/// order within a dim), as `[dp, (tp,pp)]` text.
fn specs(axes: &[&str], rank: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut dims: Vec<Vec<&str>> = vec![Vec::new(); rank];
    place(axes, 0, &mut dims, &mut out);
    out.sort();
    out.dedup();
    out
}

fn place<'a>(axes: &[&'a str], i: usize, dims: &mut Vec<Vec<&'a str>>, out: &mut Vec<String>) {
    if i == axes.len() {
        out.push(spec(dims));
        return;
    }
    place(axes, i + 1, dims, out);
    for d in 0..dims.len() {
        for at in 0..=dims[d].len() {
            dims[d].insert(at, axes[i]);
            place(axes, i + 1, dims, out);
            dims[d].remove(at);
        }
    }
}

fn spec(dims: &[Vec<&str>]) -> String {
    let e: Vec<String> = dims
        .iter()
        .map(|d| match d.len() {
            0 => "_".to_string(),
            1 => d[0].to_string(),
            _ => format!("({})", d.join(",")),
        })
        .collect();
    format!("[{}]", e.join(", "))
}

/// Compiles and runs `x @ from -> output @ to` for an f32 and an i32 tensor; returns how many
/// redistribute ops the plan has.
fn run_pair(mesh: &str, axes: &[&str], shape: &str, from: &str, to: &str) -> usize {
    let text = format!(
        "mesh {}\ninput x : f32[{shape}] @ {from}\ninput ids : i32[{shape}] @ {from}\n\
         output x @ {to}\noutput ids @ {to}\n",
        axes.join(", ")
    );
    let src = SourceFile::new("pair.tpl", text);
    let plan = compile_plan(&src, &[], Mesh::parse(mesh).unwrap(), Device::default())
        .unwrap_or_else(|e| panic!("{from} -> {to}: {}", e.render(Some(&src))));
    let source = LeafSource::Seed(3);
    let leaves = global_leaves(&plan.global, &source).unwrap();
    let want = reference::run(&plan.global, &leaves, &leaves).unwrap();
    let got = run_threads(&plan, &source, 1, None)
        .unwrap_or_else(|e| panic!("{from} -> {to} on {mesh}: {e}"));
    assert_eq!(got.outputs, want, "{from} -> {to} on {mesh}");
    plan.local
        .nodes()
        .filter(|(_, n)| matches!(n.op, Op::Redistribute { .. }))
        .count()
}

#[test]
fn every_pair_of_placements_on_a_2d_mesh() {
    let axes = ["dp", "tp"];
    let all = specs(&axes, 2);
    assert_eq!(all.len(), 11);
    let mut direct = 0;
    for from in &all {
        for to in &all {
            direct += run_pair("dp=2,tp=4", &axes, "8, 16", from, to);
        }
    }
    assert!(direct > 0);
    // The two cases go through one exchange each (per tensor).
    assert_eq!(
        run_pair("dp=2,tp=4", &axes, "8, 16", "[dp, tp]", "[tp, dp]"),
        2
    );
    assert_eq!(
        run_pair("dp=2,tp=4", &axes, "8, 16", "[(dp,tp), _]", "[_, (dp,tp)]"),
        2
    );
}

#[test]
fn pairs_of_placements_on_a_3d_mesh() {
    let axes = ["dp", "pp", "tp"];
    let all = specs(&axes, 3);
    let mut direct = 0;
    // A deterministic sample of the pairs (every 37th), plus all pairs of one source.
    for (i, from) in all.iter().enumerate() {
        for (j, to) in all.iter().enumerate() {
            if (i * all.len() + j).is_multiple_of(37) || i == 5 {
                direct += run_pair("dp=2,pp=2,tp=2", &axes, "8, 8, 8", from, to);
            }
        }
    }
    assert!(direct > 0);
    assert_eq!(
        run_pair(
            "dp=2,pp=2,tp=2",
            &axes,
            "8, 8, 8",
            "[dp, pp, tp]",
            "[tp, dp, pp]"
        ),
        2
    );
}

/// A plan document whose redistribute claims another move than its placements make is refused by
/// the loader (the plan verifier), and the untampered one loads.
#[test]
fn a_tampered_redistribute_is_refused() {
    use tpc::emit::plan_json::{from_json, to_json, PlanDoc};
    // Square blocks on a square mesh: the swapped move has the same local shapes, so only the
    // placements tell it apart.
    let text = "mesh dp, tp\ninput x : f32[8, 8] @ [(dp,tp), _]\noutput x @ [_, (tp,dp)]\n";
    let src = SourceFile::new("rd.tpl", text);
    let plan = compile_plan(
        &src,
        &[],
        Mesh::parse("dp=2,tp=2").unwrap(),
        Device::default(),
    )
    .unwrap_or_else(|e| panic!("{}", e.render(Some(&src))));
    let json = to_json(&plan);
    from_json(&json).unwrap();
    let mut doc: PlanDoc = serde_json::from_str(&json).unwrap();
    let node = doc
        .local
        .nodes
        .iter_mut()
        .find(|n| matches!(n.op, Op::Redistribute { .. }))
        .expect("a redistribute");
    let Op::Redistribute { from, to, .. } = &mut node.op else {
        unreachable!()
    };
    // Claim another order of the axes on the new dim: same shapes, other blocks.
    assert_eq!(
        (from.clone(), to.clone()),
        (vec![vec![0, 1], vec![]], vec![vec![], vec![1, 0]])
    );
    *to = vec![vec![], vec![0, 1]];
    let err = from_json(&serde_json::to_string(&doc).unwrap())
        .expect_err("a tampered redistribute loaded");
    assert!(err.to_string().contains("not the move"), "{err}");
}
