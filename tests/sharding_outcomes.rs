//! The plans the sharding issue requires, checked on the examples: collective counts and kinds,
//! where they run, what they move, and that each is explained.

use tpc::diag::SourceFile;
use tpc::driver::{compile_plan, Error};
use tpc::ir::{Op, ReduceOp};
use tpc::mesh::{Device, Mesh};
use tpc::plan::Plan;

fn source(path: &str) -> SourceFile {
    SourceFile::new(path, std::fs::read_to_string(path).expect("example exists"))
}

fn plan_src(src: &SourceFile, mesh: &str, device: Device) -> Result<Plan, Error> {
    let mesh = if mesh.contains('=') {
        Mesh::parse(mesh).unwrap()
    } else {
        Mesh::degree(mesh.parse().unwrap()).unwrap()
    };
    compile_plan(src, &[], mesh, device)
}

fn plan(path: &str, mesh: &str) -> Plan {
    plan_src(&source(path), mesh, Device::default())
        .unwrap_or_else(|e| panic!("{}", e.render(None)))
}

/// The collectives of the plan as (op name, input shape) pairs, in program order.
fn collectives(p: &Plan) -> Vec<(String, Vec<u64>)> {
    p.local
        .nodes()
        .filter(|(_, n)| n.op.is_collective())
        .map(|(_, n)| {
            (
                n.op.name().to_string(),
                p.local.ty(n.inputs[0]).shape.clone(),
            )
        })
        .collect()
}

fn count(p: &Plan, kind: &str) -> usize {
    collectives(p).iter().filter(|(k, _)| k == kind).count()
}

#[test]
fn mlp_degree_8_is_one_all_reduce_and_b2_is_added_once() {
    let p = plan("examples/mlp.tpl", "8");
    assert_eq!(
        collectives(&p),
        vec![("all_reduce".to_string(), vec![8, 128, 1024])]
    );
    // b2 is added after the reduction (or to a partial on one device only): never 8 times.
    let adds_of_b2: Vec<_> = p
        .local
        .nodes()
        .filter(|(_, n)| {
            matches!(n.op, Op::Binary { .. })
                && n.inputs
                    .iter()
                    .any(|v| p.local.value(*v).name.as_deref() == Some("b2"))
        })
        .collect();
    assert_eq!(adds_of_b2.len(), 1);
    let (_, add) = adds_of_b2[0];
    let other = add
        .inputs
        .iter()
        .find(|v| p.local.value(**v).name.as_deref() != Some("b2"))
        .unwrap();
    let summed_first = matches!(
        p.local.node(p.local.value(*other).node).op,
        Op::AllReduce { .. }
    );
    let b2 = add
        .inputs
        .iter()
        .find(|v| p.local.value(**v).name.as_deref() == Some("b2"))
        .unwrap();
    let b2_on_one_device = matches!(
        p.local.node(p.local.value(*b2).node).op,
        Op::KeepOnFirst { .. }
    );
    assert!(summed_first || b2_on_one_device);
    assert_eq!(p.summary.collectives["all_reduce"].count, 1);
}

#[test]
fn attention_degree_8_is_one_all_reduce() {
    let p = plan("examples/attention.tpl", "8");
    assert_eq!(
        collectives(&p),
        vec![("all_reduce".to_string(), vec![2, 16, 64])]
    );
}

#[test]
fn gpt_layer_is_two_all_reduces_and_no_all_gather() {
    for d in ["2", "4", "8"] {
        let p = plan("examples/gpt_layer.tpl", d);
        assert_eq!(count(&p, "all_reduce"), 2, "degree {d}");
        assert_eq!(
            collectives(&p).len(),
            2,
            "degree {d}: {:?}",
            collectives(&p)
        );
    }
}

/// Removes the annotation of the params named in `names` from an example's text.
fn unannotate(path: &str, names: &[&str]) -> SourceFile {
    let text = std::fs::read_to_string(path).unwrap();
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            let t = l.trim_start();
            let is_target = names.iter().any(|n| {
                t.starts_with(&format!("param {n} ")) || t.starts_with(&format!("param  {n} "))
            });
            if is_target {
                l.split(" @ ").next().unwrap().to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    SourceFile::new(path, lines.join("\n"))
}

#[test]
fn attention_with_only_qkv_annotated_finds_the_megatron_plan() {
    let src = unannotate("examples/attention.tpl", &["wo"]);
    assert!(!src.text.contains("wo : f32[H, H] @"));
    let p = plan_src(&src, "8", Device::default()).unwrap();
    assert_eq!(
        collectives(&p),
        vec![("all_reduce".to_string(), vec![2, 16, 64])]
    );
    let wo = p.local.params().find(|(n, _)| *n == "wo").unwrap().1;
    assert_eq!(p.local.ty(wo).shape, vec![8, 64], "wo is row-sharded");
}

#[test]
fn mlp_with_only_w1_annotated_finds_the_megatron_plan() {
    let src = unannotate("examples/mlp.tpl", &["b1", "w2"]);
    let p = plan_src(&src, "8", Device::default()).unwrap();
    assert_eq!(
        collectives(&p),
        vec![("all_reduce".to_string(), vec![8, 128, 1024])]
    );
    let w2 = p.local.params().find(|(n, _)| *n == "w2").unwrap().1;
    assert_eq!(p.local.ty(w2).shape, vec![512, 1024], "w2 is row-sharded");
}

#[test]
fn time_alone_on_fast_compute_prefers_gathering_the_attention_output() {
    // The other side of the flip: memory not priced, compute almost free. Gathering the
    // attention output moves half the bytes of the all-reduce, and repeating wo costs nothing.
    let src = unannotate("examples/attention.tpl", &["wo"]);
    let device = Device {
        mem_weight: 0.0,
        flops_f32: 1e18,
        ..Device::default()
    };
    let p = plan_src(&src, "8", device).unwrap();
    assert_eq!(count(&p, "all_reduce"), 0, "{:?}", collectives(&p));
    assert_eq!(count(&p, "all_gather"), 1, "{:?}", collectives(&p));
    let wo = p.local.params().find(|(n, _)| *n == "wo").unwrap().1;
    assert_eq!(p.local.ty(wo).shape, vec![64, 64], "wo is replicated");
}

#[test]
fn gpt_vocab_parallel_embedding_and_loss() {
    let p = plan("examples/gpt.tpl", "8");
    let cs = collectives(&p);
    let (b, s, h) = (2u64, 16u64, 64u64);
    // Embedding + one all-reduce per attention and per MLP in each of the 2 layers.
    let big: Vec<_> = cs
        .iter()
        .filter(|(_, sh)| sh.iter().product::<u64>() == b * s * h)
        .collect();
    assert_eq!(big.len(), 1 + 2 * 2, "{cs:?}");
    assert!(big.iter().all(|(k, _)| k == "all_reduce"));
    // The loss: three all-reduces of [B, S] (max, sum of exp, target logit); nothing else.
    let small: Vec<_> = cs
        .iter()
        .filter(|(_, sh)| sh.iter().product::<u64>() == b * s)
        .collect();
    assert_eq!(small.len(), 3, "{cs:?}");
    assert_eq!(
        cs.len(),
        big.len() + small.len(),
        "no other collective: {cs:?}"
    );
    let maxes = p
        .local
        .nodes()
        .filter(|(_, n)| {
            matches!(
                n.op,
                Op::AllReduce {
                    reduce: ReduceOp::Max,
                    ..
                }
            )
        })
        .count();
    assert_eq!(maxes, 1);
    // The table never moves and stays sharded on V; the logits stay sharded on V.
    let wte = p.local.params().find(|(n, _)| *n == "wte").unwrap().1;
    assert_eq!(p.local.ty(wte).shape, vec![4096 / 8, 64]);
    assert!(p
        .local
        .nodes()
        .any(|(_, n)| matches!(n.op, Op::VocabEmbedding { .. })));
    assert!(p
        .local
        .values()
        .any(|(_, v)| v.name.as_deref() == Some("logits") && v.ty.shape == vec![2, 16, 512]));
}

#[test]
fn two_d_mesh_keeps_tp_collectives_inside_dp_groups() {
    for path in ["examples/mlp_2d.tpl"] {
        let p = plan(path, "dp=2,tp=4");
        let axes: Vec<String> = p
            .local
            .nodes()
            .filter_map(|(_, n)| match &n.op {
                Op::AllReduce { axis, .. }
                | Op::AllGather { axis, .. }
                | Op::ReduceScatter { axis, .. }
                | Op::AllToAll { axis, .. } => Some(axis.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(axes, vec!["tp".to_string()], "{path}");
        // The groups of tp are within one dp coordinate.
        for group in p.mesh.groups(1) {
            let dp: Vec<u64> = group.iter().map(|&d| p.mesh.coords(d)[0]).collect();
            assert!(dp.iter().all(|&c| c == dp[0]));
        }
    }
}

#[test]
fn every_collective_is_explained() {
    for path in [
        "examples/mlp.tpl",
        "examples/attention.tpl",
        "examples/gpt_layer.tpl",
        "examples/gpt.tpl",
    ] {
        for mesh in ["2", "8", "dp=2,tp=4"] {
            let p = plan(path, mesh);
            for (id, n) in p.local.nodes() {
                if n.op.is_collective() {
                    let pr = p
                        .provenance
                        .get(&id)
                        .unwrap_or_else(|| panic!("{path} {mesh}: {id} unexplained"));
                    assert!(pr.transition.contains("->") && pr.span.line > 0, "{pr:?}");
                }
            }
        }
    }
}

#[test]
fn summary_agrees_with_the_listed_program() {
    for path in [
        "examples/mlp.tpl",
        "examples/gpt.tpl",
        "examples/mlp_2d.tpl",
    ] {
        for mesh in ["1", "2", "8", "dp=2,tp=4"] {
            let p = plan(path, mesh);
            for (kind, s) in &p.summary.collectives {
                assert_eq!(s.count as usize, count(&p, kind), "{path} {mesh} {kind}");
            }
            let recomputed = tpc::plan::Summary::compute(&p.local, &p.mesh, &p.device);
            assert_eq!(recomputed, p.summary);
        }
    }
}

#[test]
fn degree_1_has_no_collectives() {
    for path in ["examples/mlp.tpl", "examples/gpt.tpl"] {
        assert!(collectives(&plan(path, "1")).is_empty());
    }
}

#[test]
fn indivisible_annotation_is_an_error_with_the_span() {
    let src = source("examples/mlp.tpl");
    let Err(e) = plan_src(&src, "3", Device::default()) else {
        panic!("4096 does not split in 3");
    };
    let text = e.render(Some(&src));
    assert!(text.contains("does not divide into 3 parts"), "{text}");
    assert!(text.contains("mlp.tpl:6:"), "{text}");
    assert!(!e.is_internal());
}

#[test]
fn gpt_layer_on_a_2d_mesh_with_dp_inputs_crosses_no_dp_in_the_forward() {
    let text = std::fs::read_to_string("examples/gpt_layer.tpl")
        .unwrap()
        .replace("mesh tp", "mesh dp, tp")
        .replace(
            "input x : f32[B, S, H]",
            "input x : f32[B, S, H] @ [dp, _, _]",
        )
        .replace("output y", "output y @ [dp, _, _]");
    let src = SourceFile::new("gpt_layer_dp.tpl", text);
    let p = plan_src(&src, "dp=2,tp=4", Device::default()).unwrap();
    let mut axes = Vec::new();
    for (_, n) in p.local.nodes() {
        if let Op::AllReduce { axis, .. }
        | Op::AllGather { axis, .. }
        | Op::ReduceScatter { axis, .. }
        | Op::AllToAll { axis, .. } = &n.op
        {
            axes.push(axis.clone());
        }
    }
    assert_eq!(axes, vec!["tp".to_string(); 2], "{:?}", collectives(&p));
    assert_eq!(count(&p, "all_reduce"), 2);
}
