//! ZeRO on the data-parallel axis (`--zero 1|2|3`): the optimizer state, then the gradients,
//! then the params split over `dp`. Results equal the unsharded reference; stages 1 and 2 send
//! exactly plain data parallelism's bytes over `dp`, stage 3 about 1.5 times; the memory per
//! param is Megatron's and the ZeRO paper's formula to the byte; a ZeRO checkpoint loads
//! without ZeRO on another mesh.

mod cli_support;

use cli_support::{assert_exit, assert_stderr_has, assert_stdout_has, scratch, stdout, tpc};
use tpc::cost::CollectiveKind;
use tpc::diag::SourceFile;
use tpc::driver::{compile_step, plan_declared, Compiled};
use tpc::ir::{Op, Phase};
use tpc::mesh::{Device, Mesh};
use tpc::plan::Plan;

/// gpt_pipe.tpl without its pipeline, at test dims where every param divides over dp = 8.
fn gpt_source(dims: &str) -> String {
    let text = std::fs::read_to_string(cli_support::example("gpt_pipe.tpl")).expect("example");
    let text = text.replace("repeat(L, layer, h) @ pp", "repeat(L, layer, h)");
    let text = text.replace("dim B = 4, S = 16, H = 64, NH = 8, L = 4, V = 256", dims);
    assert!(
        text.contains(dims),
        "gpt_pipe.tpl declares its dims as expected"
    );
    text
}

const SMALL: &str = "dim B = 8, S = 8, H = 32, NH = 4, L = 2, V = 64";

fn compiled(text: &str) -> Compiled {
    let src = SourceFile::new("gpt.tpl", text);
    compile_step(&src, &[], false).unwrap_or_else(|e| panic!("{}", e.render(Some(&src))))
}

fn planned(c: &Compiled, mesh: &str, zero: u8) -> Plan {
    let options = tpc::plan::Options {
        zero,
        ..Default::default()
    };
    let mesh = Mesh::parse(mesh).unwrap();
    plan_declared(c.graph.clone(), Some(mesh), Device::default(), &options)
        .unwrap_or_else(|e| panic!("zero {zero}: {}", e.render(None)))
}

/// Bytes each device sends over `axis`, from the plan's collectives (as its summary counts them).
fn bytes_over(p: &Plan, axis: &str) -> u64 {
    let mut total = 0;
    for (_, n) in p.local.nodes() {
        let on_axis = match &n.op {
            Op::AllReduce { axis: a, .. }
            | Op::AllGather { axis: a, .. }
            | Op::ReduceScatter { axis: a, .. } => a == axis,
            Op::AllToAll { axis: a, .. } => a == axis,
            _ => false,
        };
        let Some((kind, size)) = CollectiveKind::of(&n.op) else {
            continue;
        };
        if on_axis {
            let b: u64 = n.inputs.iter().map(|v| p.local.ty(*v).size_bytes()).sum();
            total += kind.traffic(size, b as f64).0.round() as u64;
        }
    }
    total
}

/// Stages 1 and 2 send exactly plain data parallelism's bytes over dp (reduce-scatter plus
/// all-gather where it all-reduces each gradient); stage 3 adds one all-gather of each param
/// its backward reads: 1.5 times when every param is read there, never more. On dp=8 at these
/// toy sizes plain DP's own plan gathers some activations instead of all-reducing the bias and
/// norm gradients (fewer latency steps), so ZeRO, which keeps every gradient a partial sum
/// until the update, sends less there.
#[test]
fn dp_bytes_equal_plain_dp_then_one_and_a_half() {
    let c = compiled(&gpt_source(SMALL));
    for mesh in ["dp=2,tp=4", "dp=4,tp=2", "dp=8"] {
        let plain = bytes_over(&planned(&c, mesh, 0), "dp");
        let one = bytes_over(&planned(&c, mesh, 1), "dp");
        match mesh {
            "dp=8" => assert!(one < plain, "{mesh}: {one} vs {plain}"),
            _ => assert_eq!(one, plain, "{mesh}: zero 1"),
        }
        let p2 = planned(&c, mesh, 2);
        assert_eq!(bytes_over(&p2, "dp"), one, "{mesh}: zero 2");
        let rs = p2
            .local
            .nodes()
            .filter(|(_, n)| matches!(&n.op, Op::ReduceScatter { axis, .. } if axis == "dp"));
        let split = p2.summary.zero.as_ref().unwrap().layout.sharded.len();
        assert_eq!(
            rs.count(),
            split,
            "{mesh}: one reduce-scatter per split gradient"
        );
        let p3 = planned(&c, mesh, 3);
        let got = bytes_over(&p3, "dp") as f64 / one as f64;
        assert!((1.3..=1.5).contains(&got), "{mesh} zero 3: {got} × zero 1");
        let backward_gathers = p3
            .local
            .nodes()
            .filter(|(_, n)| matches!(&n.op, Op::AllGather { axis, .. } if axis == "dp"))
            .filter(|(_, n)| p3.local.region(n.region).phase == Phase::Backward)
            .count();
        assert!(
            backward_gathers > 0,
            "{mesh} zero 3: params gathered again in the backward"
        );
    }
}

/// An MLP whose every param has a dim no other axis splits.
const MLP: &str = "mesh dp, tp
dim B = 8, H = 32
input x : f32[B, H] @ [dp, _]
param g : f32[H]
param w1 : f32[H, 4*H] @ [_, tp]
param w2 : f32[4*H, H] @ [tp, _]
param b2 : f32[H]
y = gelu((x * g) @ w1) @ w2 + b2
loss = mean(mean(y * y, 1), 0)
train loss with adamw(lr=0.01)
";

/// The formula's bytes for `psi` param elements split over `d`, and stage `stage`.
fn formula(stage: u8, psi: u64, d: u64) -> u64 {
    match stage {
        0 => 16 * psi,
        1 => 8 * psi + 8 * psi / d,
        2 => 4 * psi + 12 * psi / d,
        _ => 16 * psi / d,
    }
}

/// Params + gradients + per-param optimizer state (AdamW's two moments; not the scalar step)
/// per device, per param element without ZeRO: 16 B, then 8 + 8/d, 4 + 12/d, 16/d, to the
/// byte, for the params split over dp; 16 B for those left whole (gpt's tp-split biases).
#[test]
fn memory_per_param_is_the_zero_formula() {
    for (text, all_split) in [(MLP.to_string(), true), (gpt_source(SMALL), false)] {
        let c = compiled(&text);
        for (mesh, d) in [("dp=2,tp=4", 2u64), ("dp=4,tp=2", 4), ("dp=8", 8)] {
            let plain = planned(&c, mesh, 0);
            let numel = |name: &str| {
                let (_, v) = plain
                    .local
                    .params()
                    .find(|(n, _)| *n == name)
                    .expect("param");
                plain.local.ty(v).numel()
            };
            let psi: u64 = plain.local.params().map(|(n, _)| numel(n)).sum();
            let m0 = plain.summary.memory_bytes_per_device;
            assert_eq!(
                m0.params + m0.grads + m0.optimizer,
                16 * psi + 4,
                "{mesh}: 16 B + step"
            );
            for stage in 1..=3u8 {
                let p = planned(&c, mesh, stage);
                let m = p.summary.memory_bytes_per_device;
                let z = p.summary.zero.as_ref().expect("zero summary");
                let split: u64 = z.layout.sharded.keys().map(|n| numel(n)).sum();
                let whole: u64 = z.layout.replicated.iter().map(|n| numel(n)).sum();
                assert_eq!(split + whole, psi, "{mesh}: every param listed");
                assert_eq!(z.layout.replicated.is_empty(), all_split, "{mesh}");
                assert!(split > whole, "{mesh}: most params split");
                assert_eq!(z.param_elements, psi, "{mesh} zero {stage}");
                let want = formula(stage, split, d) + formula(0, whole, d);
                assert_eq!(
                    m.params + m.grads + m.optimizer - 4,
                    want,
                    "{mesh} zero {stage}"
                );
                if all_split {
                    let per = formula(stage, 1 << 20, d) as f64 / (1u64 << 20) as f64;
                    assert_eq!(z.bytes_per_param, per, "{mesh} zero {stage}");
                }
                assert!(
                    m.peak < m0.peak,
                    "{mesh} zero {stage}: peak below plain DP's"
                );
            }
        }
    }
}

/// A param no dim of which divides over dp stays replicated there, and the summary says so.
#[test]
fn indivisible_params_stay_whole_and_are_listed() {
    let text = "mesh dp, tp
input x : f32[4, 6] @ [dp, _]
input z : f32[4, 8] @ [dp, _]
param w : f32[6, 3]
param b : f32[3]
param u : f32[8, 8] @ [_, tp]
y = x @ w + b
loss = mean(mean(y * y, 1), 0) + mean(mean(z @ u, 1), 0)
train loss with adamw(lr=0.01)
";
    let c = compiled(text);
    let p = planned(&c, "dp=4,tp=2", 1);
    let z = p.summary.zero.as_ref().expect("zero summary");
    assert_eq!(z.layout.replicated, ["w", "b"]);
    assert_eq!(z.layout.sharded.keys().collect::<Vec<_>>(), ["u"]);
    let text = tpc::emit::plan::print(&p);
    assert!(
        text.contains("2 left whole over dp (no dim free of other axes divides): w, b"),
        "{text}"
    );
}

/// Each stage's training equals the unsharded reference (`--check` runs it for the same steps)
/// on three 8-device meshes, through the binary.
#[test]
fn zero_trains_equal_to_the_reference() {
    let dir = scratch("zero_check");
    let file = dir.join("gpt.tpl");
    std::fs::write(&file, gpt_source(SMALL)).unwrap();
    let file = file.to_str().unwrap();
    for mesh in ["dp=2,tp=4", "dp=4,tp=2", "dp=8"] {
        for stage in ["0", "1", "2", "3"] {
            let o = tpc(&[
                "run", file, "--mesh", mesh, "--steps", "3", "--zero", stage, "--check",
            ]);
            assert_exit(&o, 0);
            let out = stdout(&o);
            assert!(!out.contains("differ"), "{mesh} zero {stage}:\n{out}");
            assert_stdout_has(&o, "check layer.1.mlp.w1: ");
        }
    }
}

/// With microbatches, each stage still equals the reference.
#[test]
fn microbatched_zero_equals_the_reference() {
    let dir = scratch("zero_micro");
    let file = dir.join("gpt.tpl");
    std::fs::write(&file, gpt_source(SMALL)).unwrap();
    let o = tpc(&[
        "run",
        file.to_str().unwrap(),
        "--mesh",
        "dp=4,tp=2",
        "--microbatches",
        "2",
        "--steps",
        "2",
        "--zero",
        "2",
        "--check",
    ]);
    assert_stdout_has(&o, "check layer.1.mlp.w1: ");
    assert_exit(&o, 0);
    assert!(!stdout(&o).contains("differ"), "{}", stdout(&o));
}

/// On a pipelined mesh each stage's update is split over dp as well, and equals the reference.
#[test]
fn pipelined_zero_equals_the_reference() {
    for stage in ["1", "3"] {
        let o = tpc(&[
            "run",
            &cli_support::example("gpt_pipe.tpl"),
            "--mesh",
            "dp=2,pp=2,tp=2",
            "--steps",
            "2",
            "--zero",
            stage,
            "--check",
        ]);
        assert_exit(&o, 0);
        assert!(
            !stdout(&o).contains("differ"),
            "zero {stage}:\n{}",
            stdout(&o)
        );
        assert_stdout_has(&o, "check layer.3.mlp.w1: ");
    }
}

/// The flag through the binary: the summary line, a stage above 3 refused by the parser, a
/// mesh without dp refused, dp = 1 a no-op, and the default output unchanged.
#[test]
fn the_flag_through_the_binary() {
    let dir = scratch("zero_cli");
    let file = dir.join("gpt.tpl");
    std::fs::write(&file, gpt_source(SMALL)).unwrap();
    let f = file.to_str().unwrap();
    let o = tpc(&["compile", f, "--mesh", "dp=4,tp=2", "--zero", "1"]);
    assert_exit(&o, 0);
    assert_stdout_has(
        &o,
        "zero 1: optimizer state of 28 params split over dp=4; 8 left whole",
    );
    assert_stdout_has(&o, "(f32 adamw: 8 + 8/d = 10.00)");
    let plain = tpc(&["compile", f, "--mesh", "dp=4,tp=2"]);
    let zero0 = tpc(&["compile", f, "--mesh", "dp=4,tp=2", "--zero", "0"]);
    assert_eq!(stdout(&plain), stdout(&zero0), "--zero 0 is the default");
    assert!(!stdout(&plain).contains("zero"), "no zero line by default");
    let o = tpc(&["compile", f, "--mesh", "dp=4,tp=2", "--zero", "4"]);
    assert_exit(&o, 2);
    assert_stderr_has(&o, "--zero");
    let o = tpc(&["run", f, "--mesh", "dp=4,tp=2", "--zero", "4"]);
    assert_exit(&o, 2);
    let no_dp = dir.join("tp.tpl");
    std::fs::write(
        &no_dp,
        "mesh tp\ninput x : f32[4, 8]\nparam w : f32[8, 8] @ [_, tp]\n\
         loss = mean(mean(x @ w, 1), 0)\ntrain loss with adamw(lr=0.01)\n",
    )
    .unwrap();
    let o = tpc(&[
        "compile",
        no_dp.to_str().unwrap(),
        "--degree",
        "2",
        "--zero",
        "1",
    ]);
    assert_exit(&o, 1);
    assert_stderr_has(
        &o,
        "--zero 1 splits the optimizer state over the data-parallel",
    );
    assert_stderr_has(&o, "(mesh axes: tp)");
    let o = tpc(&["compile", f, "--mesh", "tp=8", "--zero", "2"]);
    assert_exit(&o, 0);
    assert_stdout_has(
        &o,
        "zero 2: optimizer state and gradients of 0 params split over dp=1",
    );
}

/// A checkpoint saved by a `--zero 1` run holds each dp rank's block of the optimizer state,
/// and loads without ZeRO on another mesh, continuing the training as the uninterrupted run.
#[test]
fn a_zero_checkpoint_loads_without_zero_on_another_mesh() {
    let dir = scratch("zero_ckpt");
    let file = dir.join("gpt.tpl");
    std::fs::write(&file, gpt_source(SMALL)).unwrap();
    let f = file.to_str().unwrap();
    let save = dir.join("ck");
    let whole_log = dir.join("whole.jsonl");
    let o = tpc(&[
        "run",
        f,
        "--mesh",
        "dp=4,tp=2",
        "--zero",
        "1",
        "--steps",
        "4",
        "--save",
        save.to_str().unwrap(),
        "--save-every",
        "2",
        "--log",
        whole_log.to_str().unwrap(),
    ]);
    assert_exit(&o, 0);
    let rest_log = dir.join("rest.jsonl");
    let o = tpc(&[
        "run",
        f,
        "--mesh",
        "dp=2,tp=2",
        "--steps",
        "2",
        "--load",
        save.join("step-00000002").to_str().unwrap(),
        "--log",
        rest_log.to_str().unwrap(),
    ]);
    assert_exit(&o, 0);
    let losses = |p: &std::path::Path| -> Vec<f64> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["loss"].as_f64().unwrap()
            })
            .collect()
    };
    let (whole, rest) = (losses(&whole_log), losses(&rest_log));
    assert_eq!((whole.len(), rest.len()), (4, 2));
    for (a, b) in rest.iter().zip(&whole[2..]) {
        assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }
}
