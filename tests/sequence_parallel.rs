//! Sequence parallelism (Korthikanti et al. 2022): the activations between tensor-parallel
//! regions split along the sequence, each all-reduce of a layer becoming a reduce-scatter and an
//! all-gather. Given by annotation or `--sequence-parallel on`, found by propagation alone when
//! memory is priced, never when it is not; the numbers stay the unsharded program's.

mod prop_support;

use prop_support::{assert_runs, plan_of};
use std::collections::BTreeMap;
use tpc::ir::{Local, Node, Op, Phase};
use tpc::mesh::{Device, SequenceParallel};
use tpc::plan::Plan;

/// gpt_layer.tpl, its input annotated `x_spec` (none: unannotated), trained on a
/// mean-square loss.
fn gpt_layer(x_spec: Option<&str>, mesh_decl: &str) -> String {
    let path = format!("{}/examples/gpt_layer.tpl", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).expect("example reads");
    let mut text = text.replace("mesh tp\n", &format!("mesh {mesh_decl}\n"));
    if let Some(spec) = x_spec {
        text = text.replace(
            "input x : f32[B, S, H]\n",
            &format!("input x : f32[B, S, H] @ {spec}\n"),
        );
    }
    text.replace(
        "output y\n",
        "loss = mean(mean(mean(y * y, 2), 1), 0)\ntrain loss with sgd(lr=0.1)\n",
    )
}

/// B·S·H of [`gpt_layer`].
const BSH: u64 = 2 * 16 * 64;

/// The collective kinds moving a whole activation (a tensor of B·S·H elements, or its
/// data-parallel share, when gathered or not yet scattered), with their phase, in program
/// order.
fn activation_collectives(p: &Plan) -> Vec<(&'static str, Phase)> {
    let dp = p.mesh.axis_index("dp").map_or(1, |a| p.mesh.axis_size(a));
    let whole = |n: &Node<Local>| {
        let i = p.local.ty(n.inputs[0]).numel();
        let o = p.local.ty(n.outputs[0]).numel();
        p.local.ty(n.inputs[0]).rank() == 3 && i.max(o) == BSH / dp
    };
    p.local
        .nodes()
        .filter(|(_, n)| n.op.is_collective() && n.inputs.len() == 1 && whole(n))
        .map(|(_, n)| (n.op.name(), p.local.region(n.region).phase))
        .collect()
}

fn count(c: &[(&str, Phase)], kind: &str, phase: Phase) -> usize {
    c.iter()
        .filter(|(k, ph)| *k == kind && *ph == phase)
        .count()
}

/// Two reduce-scatters and two all-gathers of whole activations in each of the forward and the
/// backward (the paper's 4 + 4 per layer), and no all-reduce of one.
fn assert_megatron_sp(p: &Plan) {
    let c = activation_collectives(p);
    for phase in [Phase::Forward, Phase::Backward] {
        for kind in ["reduce_scatter", "all_gather"] {
            assert_eq!(count(&c, kind, phase), 2, "{kind} in {phase:?}: {c:?}");
        }
    }
    assert!(c.iter().all(|(k, _)| *k != "all_reduce"), "{c:?}");
}

/// Only the all-reduces of plain tensor parallelism: two forward, two backward.
fn assert_megatron_tp(p: &Plan) {
    let c = activation_collectives(p);
    assert_eq!(count(&c, "all_reduce", Phase::Forward), 2, "{c:?}");
    assert_eq!(count(&c, "all_reduce", Phase::Backward), 2, "{c:?}");
    assert!(c.iter().all(|(k, _)| *k == "all_reduce"), "{c:?}");
}

/// The default device with `mem_weight` and `sp`, and no gradient buckets (a bucket would
/// fuse an activation gradient's all-reduce with the params').
fn device(mem_weight: f64, sp: SequenceParallel) -> Device {
    Device {
        mem_weight,
        sequence_parallel: sp,
        bucket_bytes: 0,
        ..Device::default()
    }
}

#[test]
fn an_input_split_along_the_sequence_gives_four_gathers_and_four_scatters() {
    let text = gpt_layer(Some("[_, tp, _]"), "tp");
    let p = assert_runs(&text, "8");
    assert_megatron_sp(&p);
}

/// Without latency (and with a summed loss) the QKV input gradient is partitioned as three
/// reduce-scattered terms; the merge pass sums them first and reduce-scatters once (as it
/// does all-reduces).
#[test]
fn the_three_terms_of_the_qkv_input_gradient_are_scattered_once() {
    let text = gpt_layer(Some("[_, tp, _]"), "tp").replace(
        "loss = mean(mean(mean(y * y, 2), 1), 0)",
        "loss = sum(sum(sum(y * y, 2), 1), 0)",
    );
    let dev = Device {
        latency: 0.0,
        ..device(1e-9, SequenceParallel::Off)
    };
    let p = plan_of("l.tpl", &text, "8", dev);
    prop_support::check_plan(&p).unwrap();
    assert_megatron_sp(&p);
    let merged: Vec<_> = p
        .provenance
        .iter()
        .filter(|(_, pr)| pr.user == "the sum of 3 partial terms")
        .map(|(id, pr)| (p.local.node(*id).op.name(), pr.members.len()))
        .collect();
    assert_eq!(merged, vec![("reduce_scatter", 3)]);
}

#[test]
fn sequence_parallel_trains_equal_to_the_reference_on_every_mesh() {
    let text = gpt_layer(Some("[_, tp, _]"), "tp");
    for mesh in ["1", "2", "4", "8"] {
        assert_runs(&text, mesh);
    }
    let text = gpt_layer(Some("[dp, tp, _]"), "dp, tp");
    let p = assert_runs(&text, "dp=2,tp=4");
    assert_megatron_sp(&p);
}

/// Sequence parallelism on a layer whose input comes replicated (unannotated): the first norm
/// reads it as it is, so the forward gathers once (before the MLP) and scatters twice; the
/// backward gathers and scatters twice each.
fn assert_found(p: &Plan) {
    let c = activation_collectives(p);
    assert_eq!(count(&c, "reduce_scatter", Phase::Forward), 2, "{c:?}");
    assert_eq!(count(&c, "all_gather", Phase::Forward), 1, "{c:?}");
    assert_eq!(count(&c, "reduce_scatter", Phase::Backward), 2, "{c:?}");
    assert_eq!(count(&c, "all_gather", Phase::Backward), 2, "{c:?}");
    assert!(c.iter().all(|(k, _)| *k != "all_reduce"), "{c:?}");
}

#[test]
fn propagation_finds_it_when_memory_is_priced_and_not_when_it_is_not() {
    let text = gpt_layer(None, "tp");
    for mem_weight in [1e-8, 1e-6] {
        let priced = plan_of(
            "l.tpl",
            &text,
            "8",
            device(mem_weight, SequenceParallel::Auto),
        );
        assert_found(&priced);
    }
    let unpriced = plan_of("l.tpl", &text, "8", device(0.0, SequenceParallel::Auto));
    assert_megatron_tp(&unpriced);
    let off = plan_of("l.tpl", &text, "8", device(1e-6, SequenceParallel::Off));
    assert_megatron_tp(&off);
    let on = plan_of("l.tpl", &text, "8", device(0.0, SequenceParallel::On));
    assert_found(&on);
}

#[test]
fn found_sequence_parallelism_trains_equal_to_the_reference() {
    let text = gpt_layer(None, "tp");
    for mesh in ["2", "4", "8"] {
        let p = plan_of("l.tpl", &text, mesh, device(1e-6, SequenceParallel::Auto));
        prop_support::check_plan(&p).unwrap_or_else(|e| panic!("on {mesh}: {e}"));
    }
}

/// gpt.tpl with `layers` layers, trained.
fn gpt(layers: u32) -> String {
    let path = format!("{}/examples/gpt.tpl", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).expect("example reads");
    let from = "dim B = 2, S = 16, H = 64, NH = 8, L = 2, V = 4096";
    assert!(text.contains(from));
    let to = format!("dim B = 2, S = 16, H = 64, NH = 8, L = {layers}, V = 4096");
    text.replace(from, &to) + "train loss with sgd(lr=0.1)\n"
}

/// With sequence parallelism the two layer-norm inputs of a layer are split along the
/// sequence: Korthikanti et al.'s per-layer activations in f32 without dropout go from
/// `sbh(16 + 48/t) + 4as²b/t` to `sbh(8 + 56/t) + 4as²b/t` (the QKV and MLP inputs stay kept
/// gathered, 8sbh: the weight gradients read them, and tpc keeps the all-gathered copy
/// instead of gathering it again in the backward).
#[test]
fn activation_memory_per_layer_drops_by_the_layer_norm_inputs() {
    let (s, b, h, a) = (16u64, 2u64, 64u64, 8u64);
    let activations = |layers: u32, t: u64, sp: SequenceParallel| {
        let p = plan_of("gpt.tpl", &gpt(layers), &t.to_string(), device(1e-9, sp));
        p.summary.memory_bytes_per_device.activations
    };
    for t in [1u64, 2, 4, 8] {
        let sp = activations(3, t, SequenceParallel::On) - activations(2, t, SequenceParallel::On);
        let tp =
            activations(3, t, SequenceParallel::Off) - activations(2, t, SequenceParallel::Off);
        assert_eq!(
            tp,
            s * b * h * (16 + 48 / t) + 4 * a * s * s * b / t,
            "t = {t}"
        );
        assert_eq!(
            sp,
            s * b * h * 8 + s * b * h * 56 / t + 4 * a * s * s * b / t,
            "t = {t}"
        );
    }
}

#[test]
fn the_flags_are_checked_and_change_the_plan() {
    let tpc = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tpc"))
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap()
    };
    let bad = tpc(&[
        "compile",
        "examples/gpt_layer.tpl",
        "--sequence-parallel",
        "yes",
    ]);
    assert_eq!(bad.status.code(), Some(2));
    let bad = tpc(&["compile", "examples/gpt_layer.tpl", "--launch=-1"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--launch"));
    let scatters = |sp: &str| {
        let o = tpc(&[
            "compile",
            "examples/gpt_layer.tpl",
            "--degree",
            "8",
            "--sequence-parallel",
            sp,
        ]);
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stdout)
            .matches("= reduce_scatter")
            .count()
    };
    assert_eq!(scatters("off"), 0);
    assert_eq!(scatters("on"), 2);
}

/// gpt_pipe.tpl without its pipeline at the 175B shape (two layers), its residual stream
/// annotated along the sequence as `benches/scale_table.sh` does.
fn gpt_175b_sp() -> String {
    let path = format!("{}/examples/gpt_pipe.tpl", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).expect("example reads");
    let edits = [
        ("repeat(L, layer, h) @ pp", "repeat(L, layer, h)"),
        (
            "dim B = 4, S = 16, H = 64, NH = 8, L = 4, V = 256",
            "dim B = 32, S = 2048, H = 12288, NH = 96, L = 2, V = 51200",
        ),
        (
            "    h = x + attention(layernorm(x, ln1_g, ln1_b))\n",
            "    h = x + attention(layernorm(x, ln1_g, ln1_b)) @ [dp, tp, _]\n",
        ),
        (
            "    return h + mlp(layernorm(h, ln2_g, ln2_b))\n",
            "    y = h + mlp(layernorm(h, ln2_g, ln2_b)) @ [dp, tp, _]\n    return y\n",
        ),
        (
            "h = embedding(tokens, wte) + wpe\n",
            "h = embedding(tokens, wte) + wpe @ [dp, tp, _]\n",
        ),
    ];
    edits.iter().fold(text, |t, (from, to)| {
        assert!(t.contains(from), "gpt_pipe.tpl holds {from:?}");
        t.replace(from, to)
    })
}

/// At the 175B shape on dp=4,tp=8 the annotated residual stream gives Megatron's
/// sequence-parallel layers: in each layer's forward and backward, two all-gathers and two
/// reduce-scatters over tp, and nothing else over tp (no weight gathered, no all-to-all, no
/// all-reduce of an activation). Propagation prices a gathered input once for the query, key
/// and value projections that share it, and weighs bytes per device (an activation split over
/// dp is a quarter of its global size along tp).
#[test]
fn at_the_175b_shape_the_annotated_layers_are_megatron_sp() {
    let p = plan_of("gpt.tpl", &gpt_175b_sp(), "dp=4,tp=8", Device::default());
    let mut per_layer: BTreeMap<(&str, Phase), usize> = BTreeMap::new();
    for (_, n) in p.local.nodes() {
        let over_tp = match &n.op {
            Op::AllReduce { axis, .. }
            | Op::AllGather { axis, .. }
            | Op::ReduceScatter { axis, .. }
            | Op::AllToAll { axis, .. } => axis == "tp",
            _ => false,
        };
        let region = p.local.region(n.region);
        if over_tp && region.path.starts_with("layer.") {
            *per_layer.entry((n.op.name(), region.phase)).or_default() += 1;
        }
    }
    let want = BTreeMap::from([
        (("all_gather", Phase::Forward), 4),
        (("reduce_scatter", Phase::Forward), 4),
        (("all_gather", Phase::Backward), 4),
        (("reduce_scatter", Phase::Backward), 4),
    ]);
    assert_eq!(per_layer, want);
}
