//! Activation recompute (`--recompute selective|full`): the backward reads fewer forward values
//! and makes the others again; results are bitwise those of no recompute on the same mesh, the
//! summary's figures are the cloned nodes' and the dropped activations', and the plan verifier
//! checks the clones like any other node.

mod cli_support;

use cli_support::{assert_exit, assert_stderr_has, assert_stdout_has, stdout, tpc};
use std::collections::BTreeMap;
use tpc::cost::flops;
use tpc::diag::SourceFile;
use tpc::driver::{compile_step, plan_declared, Compiled};
use tpc::exec::leaves::LeafSource;
use tpc::exec::train::{train_threads, Steps};
use tpc::exec::Tensor;
use tpc::ir::{Dtype, Local, Op, Phase, TensorType};
use tpc::mesh::{Device, Mesh};
use tpc::plan::remat::Recompute;
use tpc::plan::Plan;

const POLICIES: [Recompute; 3] = [Recompute::None, Recompute::Selective, Recompute::Full];

/// An example's text, with `@ pp` dropped (gpt_pipe then runs on dp and tp alone).
fn example(name: &str) -> String {
    let path = format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).expect("example reads");
    text.replace(" @ pp ", " ")
}

fn compiled(name: &str, sets: &[(&str, i64)]) -> Compiled {
    let src = SourceFile::new(name, example(name));
    let sets: Vec<(String, i64)> = sets.iter().map(|(k, v)| (k.to_string(), *v)).collect();
    compile_step(&src, &sets, false).unwrap_or_else(|e| panic!("{}", e.render(Some(&src))))
}

fn mesh(text: &str) -> Mesh {
    match text.contains('=') {
        true => Mesh::parse(text).unwrap(),
        false => Mesh::degree(text.parse().unwrap()).unwrap(),
    }
}

fn planned(c: &Compiled, m: &str, recompute: Recompute, microbatches: u64) -> Plan {
    let options = tpc::plan::Options {
        microbatches: Some(microbatches),
        recompute,
        ..Default::default()
    };
    plan_declared(c.graph.clone(), Some(mesh(m)), Device::default(), &options)
        .unwrap_or_else(|e| panic!("{recompute} on {m}: {}", e.render(None)))
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v = t.as_f32().expect("f32");
    v.iter().map(|x| x.to_bits()).collect()
}

/// Three AdamW steps on threads: the losses' bits and every carried output's bits.
fn train(c: &Compiled, plan: &Plan) -> (Vec<u32>, BTreeMap<String, Vec<u32>>) {
    let stepped = BTreeMap::new();
    let spec = Steps {
        count: 3,
        start: &LeafSource::Seed(5),
        stepped: &stepped,
        reseed: Some(5),
        carried: &c.carried,
        loss: "loss",
        keep_first: false,
    };
    let t = train_threads(plan, &spec, None).expect("trains");
    let losses = t.losses.iter().map(|l| l.0.to_bits()).collect();
    let last = c
        .carried
        .iter()
        .map(|(_, next)| (next.clone(), bits(&t.last[next])))
        .collect();
    (losses, last)
}

/// The cases the bitwise test runs: (example, mesh, microbatches).
const CASES: [(&str, &str, u64); 3] = [
    ("gpt_train.tpl", "8", 1),
    ("gpt_pipe.tpl", "dp=2,tp=4", 1),
    ("gpt_train.tpl", "4", 2),
];

#[test]
fn recompute_is_bitwise_the_same_training() {
    for (name, m, mb) in CASES {
        let c = compiled(name, &[]);
        let none = train(&c, &planned(&c, m, Recompute::None, mb));
        for policy in [Recompute::Selective, Recompute::Full] {
            let plan = planned(&c, m, policy, mb);
            let r = plan
                .summary
                .recompute
                .as_ref()
                .expect("a recompute summary");
            assert!(r.nodes > 0, "{policy} on {name} {m}: clones nothing");
            let got = train(&c, &plan);
            assert_eq!(got.0, none.0, "{policy} on {name} {m} ×{mb}: losses");
            for (k, v) in &none.1 {
                assert!(got.1[k] == *v, "{policy} on {name} {m} ×{mb}: {k}");
            }
        }
    }
}

/// Forward values the backward holds: (local value, producing node's region path).
fn kept(p: &Plan) -> Vec<(tpc::ir::ValueId<Local>, String)> {
    let g = &p.local;
    let first = g
        .nodes()
        .position(|(_, n)| g.region(n.region).phase == Phase::Backward)
        .expect("a backward");
    let last = p.last_uses();
    g.nodes()
        .take(first)
        .filter(|(_, n)| !n.op.is_leaf())
        .flat_map(|(_, n)| n.outputs.iter().map(move |&v| (v, n.region)))
        .filter(|(v, _)| last[*v].is_some_and(|l| l >= first))
        .map(|(v, r)| (v, g.region(r).path.clone()))
        .collect()
}

fn f32_ty(shape: &[u64]) -> TensorType {
    TensorType::new(Dtype::F32, shape.to_vec())
}

/// gpt_train at degree 8 (B=4, S=16, NH=8 heads, 1 per device, D=8, L=2): selective drops
/// exactly the softmax results [B, NH/8, S, S] of each layer, and adds the FLOPs of the scores'
/// matmul, scale, mask and softmax, per layer.
#[test]
fn selective_drops_the_attention_scores_and_adds_their_flops() {
    let c = compiled("gpt_train.tpl", &[]);
    let (b, s, h, d, l) = (4u64, 16u64, 1u64, 8u64, 2u64);
    let none = planned(&c, "8", Recompute::None, 1);
    let sel = planned(&c, "8", Recompute::Selective, 1);
    let r = sel.summary.recompute.clone().expect("summary");
    let scores = b * h * s * s * 4;
    let a0 = none.summary.memory_bytes_per_device.activations;
    let a1 = sel.summary.memory_bytes_per_device.activations;
    assert_eq!(r.activations_before, a0);
    assert_eq!(r.activations_after, a1);
    assert_eq!(a0 - a1, l * scores, "selective saves L softmax results");
    let (q, kt, p) = (
        f32_ty(&[b, h, s, d]),
        f32_ty(&[b, h, d, s]),
        f32_ty(&[b, h, s, s]),
    );
    let scale = Op::Scalar {
        op: tpc::ir::BinaryOp::Mul,
        value: 0.125f64.sqrt(),
        scalar_lhs: false,
    };
    let per_layer = flops(&Op::MatMul, &[&q, &kt], &[&p])
        + flops(&scale, &[&p], &[&p])
        + flops(&Op::CausalMask, &[&p], &[&p])
        + flops(&Op::Softmax { axis: 3 }, &[&p], &[&p]);
    assert_eq!(r.flops, l as f64 * per_layer);
    assert_eq!(r.nodes, 4 * l);
    assert_eq!(r.collectives, 0);
    let extra = sel.summary.flops_per_device - none.summary.flops_per_device;
    assert!(
        (extra - r.flops).abs() <= 1e-9 * r.flops,
        "{extra} vs {}",
        r.flops
    );
    assert!(
        sel.summary.peak_memory_bytes_per_device < none.summary.peak_memory_bytes_per_device,
        "the peak drops"
    );
    assert!(sel.summary.estimated_time_s > none.summary.estimated_time_s);
    let gone: Vec<_> = kept(&none)
        .into_iter()
        .filter(|(v, _)| !kept(&sel).iter().any(|(w, _)| w == v))
        .collect();
    assert_eq!(
        gone.len() as u64,
        l,
        "one dropped value per layer: {gone:?}"
    );
    for (v, _) in gone {
        let n = none.local.node(none.local.value(v).node);
        assert!(
            matches!(n.op, Op::Softmax { .. }),
            "{v} is made by {}",
            n.op
        );
    }
}

/// gpt_pipe without pp on dp=2,tp=4 (B=4, S=64, H=64, L=4): full keeps, of what each layer
/// makes, only its result (the next layer's input), [B/dp, S, H]; the extra FLOPs are the
/// clones' (found by the forward values they hold): the layers' forward but for what the
/// backward never reads.
#[test]
fn full_keeps_only_the_layers_inputs() {
    // S = 64: activations, not the update's params and state, make the peak.
    let c = compiled("gpt_pipe.tpl", &[("S", 64)]);
    let (b, s, h, l) = (4u64 / 2, 64u64, 64u64, 4usize);
    let none = planned(&c, "dp=2,tp=4", Recompute::None, 1);
    let full = planned(&c, "dp=2,tp=4", Recompute::Full, 1);
    let r = full.summary.recompute.clone().expect("summary");
    let in_layer: Vec<_> = kept(&full)
        .into_iter()
        .filter(|(_, path)| path.starts_with("layer."))
        .collect();
    assert_eq!(in_layer.len(), l, "{in_layer:?}");
    for (i, (v, path)) in in_layer.iter().enumerate() {
        assert_eq!(
            path,
            &format!("layer.{i}"),
            "the layer's result, not a sub-block's"
        );
        assert_eq!(full.local.ty(*v).shape, vec![b, s, h]);
    }
    let in_forward_layer = |p: &Plan, n: &tpc::ir::Node<Local>| {
        let o = n.outputs.first().and_then(|&v| p.origin[v]);
        o.is_some_and(|o| {
            let gn = p.global.node(p.global.value(o).node);
            let r = p.global.region(gn.region);
            r.phase == Phase::Forward && r.path.starts_with("layer.")
        })
    };
    let node_flops = |p: &Plan, n: &tpc::ir::Node<Local>| {
        let g = &p.local;
        let ins: Vec<_> = n.inputs.iter().map(|v| g.ty(*v)).collect();
        let outs: Vec<_> = n.outputs.iter().map(|v| g.ty(*v)).collect();
        flops(&n.op, &ins, &outs)
    };
    let forward_layer_flops: f64 = none
        .local
        .nodes()
        .filter(|(_, n)| in_forward_layer(&none, n) && !n.op.is_spmd_only())
        .map(|(_, n)| node_flops(&none, n))
        .sum();
    // The clones, found by what they hold: backward nodes computing a layer's forward value.
    let g = &full.local;
    let cloned: Vec<_> = g
        .nodes()
        .filter(|(_, n)| g.region(n.region).phase == Phase::Backward)
        .filter(|(_, n)| in_forward_layer(&full, n) && !n.op.is_spmd_only())
        .map(|(_, n)| n)
        .collect();
    assert_eq!(
        r.flops,
        cloned.iter().map(|n| node_flops(&full, n)).sum::<f64>()
    );
    // Everything but what the backward never reads again: each layer's result adds and the
    // MLP's output projection (an add's derivative needs neither operand).
    assert!(r.flops < forward_layer_flops && r.flops > 0.6 * forward_layer_flops);
    let unread = |op: &str| cloned.iter().filter(|n| n.op.name() == op).count();
    assert_eq!(
        unread("layernorm"),
        2 * l,
        "both layer norms of every layer"
    );
    assert_eq!(unread("softmax"), l);
    assert_eq!(unread("gelu"), l);
    assert_eq!(
        r.collectives as usize, l,
        "each layer's attention all-reduce again (h feeds the ln2 backward)"
    );
    let extra = full.summary.flops_per_device - none.summary.flops_per_device;
    assert!(
        (extra - r.flops).abs() <= 1e-9 * r.flops,
        "{extra} vs {}",
        r.flops
    );
    let per_layer_input = b * s * h * 4;
    let bytes = |p: &Plan, layers: bool| -> u64 {
        let kept = kept(p).into_iter();
        let kept = kept.filter(|(_, path)| path.starts_with("layer.") == layers);
        kept.map(|(v, _)| p.local.ty(v).size_bytes()).sum()
    };
    let (a0, a1) = (r.activations_before, r.activations_after);
    assert_eq!(a1, bytes(&full, true) + bytes(&full, false));
    assert_eq!(bytes(&full, true), l as u64 * per_layer_input);
    assert_eq!(
        a0 - a1,
        bytes(&none, true) - bytes(&full, true),
        "only layers' values go"
    );
    assert!(full.summary.peak_memory_bytes_per_device < none.summary.peak_memory_bytes_per_device);
}

/// No recompute: no summary entry and the program is untouched; recompute of a forward program
/// is nothing.
#[test]
fn none_and_forward_programs_are_untouched() {
    let c = compiled("gpt_train.tpl", &[]);
    let a = planned(&c, "8", Recompute::None, 1);
    assert!(a.summary.recompute.is_none());
    let text = tpc::emit::plan::print(&a);
    assert!(!text.contains("recompute"), "{text}");
    let src = SourceFile::new("g", example("gpt.tpl"));
    let g = tpc::driver::compile_global(&src, &[]).unwrap();
    for policy in POLICIES {
        let options = tpc::plan::Options {
            recompute: policy,
            ..Default::default()
        };
        let p = plan_declared(g.clone(), Some(mesh("8")), Device::default(), &options).unwrap();
        assert!(p.summary.recompute.is_none());
        assert_eq!(
            tpc::emit::plan::print(&p),
            tpc::emit::plan::print(&a_forward(&g))
        );
    }
}

fn a_forward(g: &tpc::ir::Graph) -> Plan {
    let options = tpc::plan::Options::default();
    plan_declared(g.clone(), Some(mesh("8")), Device::default(), &options).unwrap()
}

/// A clone is checked as its original is: a clone made into another op fails the verifier.
#[test]
fn the_plan_verifier_checks_the_clones() {
    let c = compiled("gpt_train.tpl", &[]);
    let p = planned(&c, "8", Recompute::Selective, 1);
    let g = &p.local;
    let clone = g
        .nodes()
        .find(|(_, n)| {
            matches!(n.op, Op::Softmax { .. }) && g.region(n.region).phase == Phase::Backward
        })
        .map(|(id, _)| id)
        .expect("a recomputed softmax");
    let check = |local: &tpc::ir::Graph<Local>| {
        tpc::plan::verify::verify(tpc::plan::verify::PlanParts {
            global: &p.global,
            local,
            mesh: &p.mesh,
            placements: &p.placements,
            origin: &p.origin,
        })
    };
    check(g).expect("the plan verifies");
    let mut parts = g.to_parts();
    parts.nodes[clone.index()].op = Op::Softmax { axis: 2 };
    let e = check(&tpc::ir::Graph::from_parts(parts)).expect_err("a wrong clone is caught");
    assert_eq!(e.node, Some(clone), "{e}");
    let mut parts = g.to_parts();
    let n = &mut parts.nodes[clone.index()];
    let other = g.node(g.value(n.inputs[0]).node).inputs[0];
    n.inputs[0] = other;
    let e = check(&tpc::ir::Graph::from_parts(parts)).expect_err("a misread clone is caught");
    assert_eq!(e.node, Some(clone), "{e}");
}

/// Recompute with a pipelined repeat is refused with the repeat's span.
#[test]
fn pipelined_recompute_is_refused() {
    let text = std::fs::read_to_string(format!(
        "{}/examples/gpt_pipe.tpl",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let src = SourceFile::new("gpt_pipe.tpl", text);
    let c = compile_step(&src, &[], false).unwrap();
    let options = tpc::plan::Options {
        microbatches: None,
        recompute: Recompute::Full,
        ..Default::default()
    };
    let e = plan_declared(c.graph, Some(mesh("pp=2")), Device::default(), &options)
        .expect_err("refused");
    let text = e.render(Some(&src));
    assert!(
        text.contains("--recompute full is not supported with a pipelined repeat"),
        "{text}"
    );
    assert!(text.contains("gpt_pipe.tpl:"), "{text}");
}

/// Through the binary: the flag on `compile` and `run` (with `--check` against the reference),
/// its summary line only when asked for, a bad value and a pipelined program refused.
#[test]
fn the_flag_through_the_binary() {
    let base = ["compile", "examples/gpt_train.tpl", "--degree", "8"];
    let o = tpc(&base);
    assert_exit(&o, 0);
    assert!(!stdout(&o).contains("recompute"), "none prints nothing");
    let o = tpc(&[&base[..], &["--recompute", "none"]].concat());
    assert_exit(&o, 0);
    assert!(!stdout(&o).contains("recompute"));
    let o = tpc(&[&base[..], &["--recompute", "selective"]].concat());
    assert_exit(&o, 0);
    assert_stdout_has(&o, "# recompute: selective; +");
    assert_stdout_has(&o, "FLOPs (+");
    assert_stdout_has(
        &o,
        "activations kept for the backward 232.3 KiB → 224.3 KiB",
    );
    let o = tpc(&[
        "run",
        "examples/gpt_train.tpl",
        "--degree",
        "8",
        "--steps",
        "3",
        "--recompute",
        "full",
        "--check",
    ]);
    assert_exit(&o, 0);
    assert_stdout_has(&o, "check loss at step 3: ");
    assert!(!stdout(&o).contains("FAIL"), "{}", stdout(&o));
    let o = tpc(&[&base[..], &["--recompute", "some"]].concat());
    assert_eq!(o.status.code(), Some(2));
    assert_stderr_has(
        &o,
        "unknown recompute policy `some`: expected none, selective or full",
    );
    let o = tpc(&[
        "compile",
        "examples/gpt_pipe.tpl",
        "--mesh",
        "pp=2",
        "--recompute",
        "full",
    ]);
    assert_exit(&o, 1);
    assert_stderr_has(
        &o,
        "--recompute full is not supported with a pipelined repeat",
    );
    assert_stderr_has(&o, "gpt_pipe.tpl:50:5");
}
