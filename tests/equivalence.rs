//! The invariant, executed: every example on every mesh gives the numbers of the unsharded model.

use tpc::diag::SourceFile;
use tpc::driver::compile_plan;
use tpc::exec::leaves::{global_leaves, LeafSource};
use tpc::exec::spmd::run_threads;
use tpc::exec::{reference, Tensor};
use tpc::mesh::{Device, Mesh};

fn max_err(a: &Tensor, b: &Tensor) -> (f32, f32) {
    match (a, b) {
        (Tensor::F32(x), Tensor::F32(y)) => {
            assert_eq!(x.shape(), y.shape());
            x.iter()
                .zip(y.iter())
                .fold((0.0f32, 0.0f32), |(ma, mr), (p, q)| {
                    let d = (p - q).abs();
                    (ma.max(d), mr.max(d / q.abs().max(1e-6)))
                })
        }
        (Tensor::I32(x), Tensor::I32(y)) => (if x == y { 0.0 } else { f32::INFINITY }, 0.0),
        _ => (f32::INFINITY, f32::INFINITY),
    }
}

pub fn check(path: &str, mesh: &str, sets: &[(&str, i64)]) {
    let src = SourceFile::new(path, std::fs::read_to_string(path).unwrap());
    let mesh_v = if mesh.contains('=') {
        Mesh::parse(mesh).unwrap()
    } else {
        Mesh::degree(mesh.parse().unwrap()).unwrap()
    };
    let sets: Vec<(String, i64)> = sets.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    let plan = compile_plan(&src, &sets, mesh_v, Device::default())
        .unwrap_or_else(|e| panic!("{}", e.render(Some(&src))));
    let source = LeafSource::Seed(7);
    let leaves = global_leaves(&plan.global, &source).unwrap();
    let want = reference::run(&plan.global, &leaves, &leaves).unwrap();
    let got =
        run_threads(&plan, &source, 1, None).unwrap_or_else(|e| panic!("{path} on {mesh}: {e}"));
    for (name, w) in &want {
        let (abs, _rel) = max_err(&got.outputs[name], w);
        let scale = match w {
            Tensor::F32(x) => x.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0),
            Tensor::I32(_) => 1.0,
        };
        assert!(
            abs <= 1e-4 * scale,
            "{path} on {mesh}: output {name} differs by {abs} (scale {scale})"
        );
    }
}

#[test]
fn examples_match_the_reference_on_every_mesh() {
    let small_mlp = [("B", 4), ("S", 8), ("H", 64)];
    for mesh in ["1", "2", "4", "8", "dp=2,tp=4", "dp=4,tp=2"] {
        check("examples/mlp.tpl", mesh, &small_mlp);
        check("examples/mlp_2d.tpl", mesh, &small_mlp);
        check("examples/attention.tpl", mesh, &[]);
        check("examples/gpt_layer.tpl", mesh, &[]);
        check("examples/gpt.tpl", mesh, &[]);
    }
}
