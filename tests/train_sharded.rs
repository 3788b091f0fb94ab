//! The sharded training step (forward and backward) equals the unsharded reference on every
//! example and mesh, and has the collectives Megatron's hand-written operators would give,
//! without any: the backward's all-reduces and the data-parallel gradient sync emerge from
//! propagation over the one graph.

mod prop_support;

use prop_support::assert_runs;
use tpc::ir::Op;
use tpc::plan::Plan;

/// An example with its dims shrunk by `dims` and a `train` statement appended (and, when the
/// example returns no scalar, a mean-square loss of `loss_of`).
fn example(name: &str, dims: (&str, &str), loss_of: Option<&str>) -> String {
    let path = format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).expect("example reads");
    assert!(text.contains(dims.0), "{name} declares `{}`", dims.0);
    let mut text = text.replace(dims.0, dims.1);
    if let Some(y) = loss_of {
        text.push_str(&format!("loss = mean(mean(mean({y} * {y}, 2), 1), 0)\n"));
    }
    text + "train loss with sgd(lr=0.1)\n"
}

fn gpt_layer() -> String {
    example(
        "gpt_layer.tpl",
        (
            "dim B = 2, S = 16, H = 64, NH = 8",
            "dim B = 2, S = 8, H = 64, NH = 8",
        ),
        Some("y"),
    )
}

fn gpt() -> String {
    example(
        "gpt.tpl",
        (
            "dim B = 2, S = 16, H = 64, NH = 8, L = 2, V = 4096",
            "dim B = 2, S = 16, H = 64, NH = 8, L = 3, V = 4096",
        ),
        None,
    )
}

fn mlp_2d() -> String {
    example(
        "mlp_2d.tpl",
        ("dim B = 8, S = 128, H = 1024", "dim B = 8, S = 8, H = 64"),
        Some("y"),
    )
}

/// The collectives of the plan by op name and local region path.
fn collectives(p: &Plan) -> Vec<(&'static str, String)> {
    p.local
        .nodes()
        .filter(|(_, n)| n.op.is_collective())
        .map(|(_, n)| (n.op.name(), p.local.region(n.region).path.clone()))
        .collect()
}

fn count(p: &Plan, name: &str) -> usize {
    collectives(p).iter().filter(|(n, _)| *n == name).count()
}

/// The local value holding output `name`.
fn output(p: &Plan, name: &str) -> tpc::ir::ValueId<tpc::ir::Local> {
    p.local
        .outputs()
        .iter()
        .find(|o| o.name == name)
        .unwrap_or_else(|| panic!("no output {name}"))
        .value
}

/// gpt_layer's step at degree 8: 2 all-reduces forward and 2 backward (the input gradients of
/// the column-parallel QKV and w1 matmuls, Q, K and V's partial gradients added before one),
/// no all-gather, and every gradient laid out as its param, with no communication of its own.
#[test]
fn gpt_layer_step_has_megatrons_four_all_reduces() {
    let plan = assert_runs(&gpt_layer(), "8");
    assert_eq!(count(&plan, "all_reduce"), 4, "{:?}", collectives(&plan));
    assert_eq!(collectives(&plan).len(), 4);
    let backward = collectives(&plan)
        .iter()
        .filter(|(_, r)| r.ends_with("backward"))
        .count();
    assert_eq!(backward, 2);
    for (name, v) in plan.global.params() {
        let grad = output(&plan, &tpc::autodiff::grad_name(name));
        let param = plan
            .local
            .params()
            .find(|(n, _)| *n == name)
            .map(|(_, l)| l)
            .expect("local param");
        assert_eq!(
            plan.placements[grad], plan.placements[param],
            "gradient of {name} ({v})"
        );
    }
}

/// Backward collectives name the forward op they differentiate.
#[test]
fn backward_collectives_say_so() {
    let plan = assert_runs(&gpt_layer(), "8");
    let users: Vec<&str> = plan.provenance.values().map(|p| p.user.as_str()).collect();
    assert_eq!(
        users
            .iter()
            .filter(|u| u.starts_with("backward of layernorm"))
            .count(),
        2,
        "{users:?}"
    );
}

/// gpt's step at degree 8: 4 all-reduces per layer, no all-gather, and neither the logits nor
/// the vocab-split table (or their gradients) ever move. (At a small vocabulary the cost model
/// rightly prefers gathering the logits: V = 4096 keeps the vocab-parallel loss cheaper.)
#[test]
fn gpt_step_keeps_the_vocab_split() {
    let plan = assert_runs(&gpt(), "8");
    assert_eq!(count(&plan, "all_gather"), 0, "{:?}", collectives(&plan));
    for l in 0..3 {
        let in_layer = collectives(&plan)
            .iter()
            .filter(|(_, r)| r.starts_with(&format!("layer.{l}")))
            .count();
        assert_eq!(in_layer, 4, "layer {l}: {:?}", collectives(&plan));
    }
    let moved_vocab = plan.local.nodes().any(|(_, n)| {
        n.op.is_collective() && plan.local.ty(n.inputs[0]).shape.last().copied() == Some(4096 / 8)
    });
    assert!(!moved_vocab, "a vocab-sized block moved");
}

/// Batch split over dp: each param's gradient is all-reduced over dp exactly once; nothing of
/// the tp backward crosses dp.
#[test]
fn data_parallel_gradients_are_reduced_once_over_dp() {
    let plan = assert_runs(&mlp_2d(), "dp=2,tp=4");
    // Each result of an all-reduce over dp (one bucket, or one each without bucketing).
    let over_dp: Vec<String> = plan
        .local
        .nodes()
        .filter(|(_, n)| matches!(&n.op, Op::AllReduce { axis, .. } if axis == "dp"))
        .flat_map(|(_, n)| n.outputs.iter().map(|v| format!("{v}")))
        .collect();
    assert_eq!(over_dp.len(), 4, "one per param: {over_dp:?}");
    for name in ["w1", "b1", "w2", "b2"] {
        let g = output(&plan, &tpc::autodiff::grad_name(name));
        let producer = &plan.local.node(plan.local.value(g).node).op;
        assert!(
            matches!(producer, Op::AllReduce { axis, .. } if axis == "dp"),
            "grad({name}) comes from {producer}"
        );
    }
}

/// gpt with its tokens split over dp: every param's gradient, the tied token table's too, is
/// reduced over dp exactly once, with and without buckets, and the step equals the reference.
/// (At V = 4096 the embedding's term is made from the dp-gathered activation gradient, 8 KiB,
/// rather than reduced as a 256 KiB table; at V = 256, gpt_train's, both terms are reduced and
/// the merge pass adds them before one reduction: `tests/train_buckets.rs`.) The position
/// table's gradient, a sum of that same activation gradient over the batch, reads the gathered
/// copy too and needs no reduction of its own.
#[test]
fn tied_table_gradient_is_reduced_once_over_dp() {
    let text = gpt()
        .replace("mesh tp\n", "mesh dp, tp\n")
        .replace(
            "input tokens : i32[B, S]",
            "input tokens : i32[B, S] @ [dp, _]",
        )
        .replace(
            "input labels : i32[B, S]",
            "input labels : i32[B, S] @ [dp, _]",
        );
    assert!(text.contains("mesh dp, tp"));
    for bucket in [0, 25 << 20] {
        let device = tpc::mesh::Device {
            bucket_bytes: bucket,
            ..Default::default()
        };
        let plan = prop_support::plan_of("case.tpl", &text, "dp=2,tp=4", device);
        if let Err(e) = prop_support::check_plan(&plan) {
            panic!("bucket {bucket}: {e}");
        }
        for (name, _) in plan.global.params() {
            let g = output(&plan, &tpc::autodiff::grad_name(name));
            let want = if name == "wpe" { 0 } else { 1 };
            assert_eq!(
                prop_support::dp_reductions(&plan, g),
                want,
                "grad({name}), bucket {bucket}"
            );
        }
    }
}

/// The activations one more layer keeps for the backward (plan liveness) are Korthikanti et
/// al.'s (2022) per-layer formula adjusted to f32 and no dropout: per layer `sbh(16 + 48/t) +
/// 4as²b/t` bytes on t tensor-parallel devices (`64sbh + 4as²b` at t = 1): LN inputs, QKV
/// input and MLP input replicated (16sbh); Q, K, V, the projection input, GeLU input and
/// output split (48sbh/t); the softmax output split by heads (4as²b/t).
#[test]
fn activation_memory_per_layer_is_korthikantis_in_f32() {
    let (s, b, h, a) = (16u64, 2u64, 64u64, 8u64);
    let activations = |layers: u32, t: u64| {
        let text = gpt().replace("L = 3, V = 4096", &format!("L = {layers}, V = 4096"));
        let plan = prop_support::plan_of(
            "gpt.tpl",
            &text,
            &t.to_string(),
            tpc::mesh::Device::default(),
        );
        plan.summary.memory_bytes_per_device.activations
    };
    for t in [1u64, 2, 4, 8] {
        let per_layer = activations(3, t) - activations(2, t);
        let want = s * b * h * (16 + 48 / t) + 4 * a * s * s * b / t;
        assert_eq!(per_layer, want, "t = {t}");
        assert_eq!(
            activations(2, t) - activations(1, t),
            want,
            "t = {t}, layer 2"
        );
    }
}

/// Every example's training step equals the reference on 1-D meshes of 1, 2, 4 and 8 devices.
#[test]
fn examples_train_equal_to_the_reference_on_1d_meshes() {
    for text in [gpt_layer(), gpt()] {
        for mesh in ["1", "2", "4", "8"] {
            assert_runs(&text, mesh);
        }
    }
}

/// ... and on 2-D meshes.
#[test]
fn mlp_2d_trains_equal_to_the_reference_on_2d_meshes() {
    for mesh in ["dp=2,tp=4", "dp=4,tp=2", "dp=8,tp=1", "dp=1,tp=8"] {
        assert_runs(&mlp_2d(), mesh);
    }
}

/// The summary splits the collectives by phase and the memory by kind: gpt_layer's step has 2
/// all-reduces forward, 2 backward, none in the update; its gradients take the params' bytes
/// (every param is trained, laid out as its param), and the backward keeps activations alive.
#[test]
fn summary_has_phases_and_memory_by_kind() {
    let plan = assert_runs(&gpt_layer(), "8");
    let s = &plan.summary;
    let count = |phase: &str, kind: &str| s.phases[phase].collectives[kind].count;
    assert_eq!(count("forward", "all_reduce"), 2);
    assert_eq!(count("backward", "all_reduce"), 2);
    assert_eq!(count("update", "all_reduce"), 0);
    for phase in ["forward", "backward", "update"] {
        assert_eq!(
            s.phases[phase].collectives.len(),
            4,
            "{phase}: every kind listed"
        );
    }
    let m = &s.memory_bytes_per_device;
    assert_eq!(m.params, s.param_bytes_per_device);
    assert_eq!(m.grads, m.params);
    assert!(m.activations > 0 && m.activations < m.peak, "{m:?}");
    let forward =
        tpc::driver::compile_program(&tpc::diag::SourceFile::new("t.tpl", gpt_layer()), &[], true)
            .expect("compiles");
    let plan = tpc::driver::plan_declared(
        forward.graph,
        Some(tpc::mesh::Mesh::degree(8).unwrap()),
        tpc::mesh::Device::default(),
        &tpc::plan::Options::default(),
    )
    .expect("plans");
    let m = &plan.summary.memory_bytes_per_device;
    assert_eq!((m.grads, m.activations), (0, 0), "a forward program");
}

/// A weight left unannotated that propagation splits (attention's `wo`, row-split after the
/// head-split QKV) keeps its gradient and next value in that split: no gather for them.
#[test]
fn a_free_weight_split_by_propagation_keeps_its_gradient_split() {
    let text = example(
        "attention.tpl",
        ("param wo : f32[H, H] @ [tp, _]", "param wo : f32[H, H]"),
        Some("y"),
    );
    let plan = assert_runs(&text, "8");
    assert_eq!(count(&plan, "all_gather"), 0, "{:?}", collectives(&plan));
    let grad = output(&plan, "grad(wo)");
    assert_eq!(plan.local.ty(grad).shape, [8, 64], "row blocks of wo");
    let src = tpc::diag::SourceFile::new("t.tpl", text);
    let step = tpc::driver::compile_step(&src, &[], false).expect("compiles");
    let plan = tpc::driver::plan_declared(
        step.graph,
        Some(tpc::mesh::Mesh::degree(8).unwrap()),
        tpc::mesh::Device::default(),
        &tpc::plan::Options::default(),
    )
    .expect("plans");
    assert_eq!(count(&plan, "all_gather"), 0, "{:?}", collectives(&plan));
    prop_support::check_plan(&plan).expect("the step equals the reference");
}
