//! Gradient buckets (`--bucket-mb`, default 25 MiB as PyTorch DDP): the backward's all-reduces
//! of one group, reduce op and dtype that are ready together become one all-reduce of several
//! operands. The bytes stay the same, each gradient is reduced exactly once, no bucket exceeds
//! the cap, and the numbers do not change (bitwise on dp=2, where a sum of two is exact
//! whatever the message layout).

mod prop_support;

use prop_support::{check_plan, plan_of};
use std::collections::BTreeMap;
use std::process::Command;
use tpc::exec::leaves::LeafSource;
use tpc::exec::spmd::run_threads;
use tpc::exec::Tensor;
use tpc::ir::{Local, Node, Op};
use tpc::mesh::Device;
use tpc::plan::Plan;

/// gpt.tpl (L=3, small) trained with SGD, tokens split over dp on `mesh dp, tp`.
fn gpt_dp() -> String {
    let path = format!("{}/examples/gpt.tpl", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(path).expect("gpt.tpl reads");
    let dims = "dim B = 2, S = 16, H = 64, NH = 8, L = 2, V = 4096";
    assert!(text.contains(dims));
    let out = text
        .replace(dims, "dim B = 4, S = 8, H = 64, NH = 8, L = 3, V = 512")
        .replace("mesh tp", "mesh dp, tp")
        .replace(
            "input tokens : i32[B, S]",
            "input tokens : i32[B, S] @ [dp, _]",
        );
    assert!(out.contains("@ [dp, _]"), "the tokens are split over dp");
    out + "train loss with sgd(lr=0.1)\n"
}

fn device(bucket_bytes: u64) -> Device {
    Device {
        bucket_bytes,
        ..Device::default()
    }
}

/// The all-reduces over `axis`.
fn over<'a>(plan: &'a Plan, axis: &'a str) -> impl Iterator<Item = &'a Node<Local>> + 'a {
    plan.local
        .nodes()
        .map(|(_, n)| n)
        .filter(move |n| matches!(&n.op, Op::AllReduce { axis: a, .. } if a == axis))
}

fn bytes(plan: &Plan, n: &Node<Local>) -> u64 {
    n.inputs
        .iter()
        .map(|&v| plan.local.ty(v).size_bytes())
        .sum()
}

/// The global values reduced over dp, one entry per operand.
fn reduced_over_dp(plan: &Plan) -> Vec<String> {
    let mut v: Vec<String> = over(plan, "dp")
        .flat_map(|n| n.inputs.iter().map(|&x| format!("{:?}", plan.origin[x])))
        .collect();
    v.sort();
    v
}

fn run(plan: &Plan) -> BTreeMap<String, Tensor> {
    run_threads(plan, &LeafSource::Seed(3), 1, None)
        .expect("the step runs")
        .outputs
}

/// With the default cap every dp gradient of gpt goes into buckets: far fewer all-reduces over
/// dp, the same operands each reduced once, the same bytes, a smaller estimated time, and
/// bitwise the same step (dp=2) as without fusion, which equals the reference.
#[test]
fn buckets_fuse_the_gradient_sync_without_changing_results() {
    let text = gpt_dp();
    let fused = plan_of("gpt.tpl", &text, "dp=2,tp=4", Device::default());
    let plain = plan_of("gpt.tpl", &text, "dp=2,tp=4", device(0));
    let (nf, np) = (over(&fused, "dp").count(), over(&plain, "dp").count());
    assert!(np >= 20, "without fusion one all-reduce per gradient: {np}");
    assert!(nf <= 3, "with 25 MiB buckets a handful: {nf}");
    assert!(over(&fused, "dp").any(|n| n.inputs.len() > 10));
    assert_eq!(reduced_over_dp(&fused), reduced_over_dp(&plain));
    let total = |p: &Plan| over(p, "dp").map(|n| bytes(p, n)).sum::<u64>();
    assert_eq!(total(&fused), total(&plain));
    let s = |p: &Plan| p.summary.collectives["all_reduce"].bytes_per_device;
    assert_eq!(s(&fused), s(&plain), "the same bytes move");
    assert!(fused.summary.comm_time_s < plain.summary.comm_time_s);
    assert!(over(&plain, "dp").all(|n| n.inputs.len() == 1));
    assert_eq!(run(&fused), run(&plain), "bitwise the same step");
    check_plan(&fused).expect("the bucketed step equals the reference");
}

/// A small cap makes several buckets, none above the cap unless it holds one gradient alone; the
/// step still equals the reference on a 2-D mesh with dp=4 (where the ring's order differs).
#[test]
fn a_small_cap_splits_buckets_and_keeps_each_under_it() {
    let text = gpt_dp();
    let cap = 40 << 10;
    let plan = plan_of("gpt.tpl", &text, "dp=4,tp=2", device(cap));
    let buckets: Vec<&Node<Local>> = over(&plan, "dp").filter(|n| n.inputs.len() > 1).collect();
    assert!(buckets.len() >= 2, "several buckets: {}", buckets.len());
    for n in over(&plan, "dp") {
        assert!(
            n.inputs.len() == 1 || bytes(&plan, n) <= cap,
            "{} bytes",
            bytes(&plan, n)
        );
    }
    let plain = plan_of("gpt.tpl", &text, "dp=4,tp=2", device(0));
    assert_eq!(reduced_over_dp(&plan), reduced_over_dp(&plain));
    check_plan(&plan).expect("equals the reference");
}

/// A bucket sits right after its last gradient is made: before the update reads any of them,
/// and every result is read only after it.
#[test]
fn a_bucket_is_placed_when_its_last_gradient_is_ready() {
    let plan = plan_of("gpt.tpl", &gpt_dp(), "dp=2,tp=4", Device::default());
    let pos: BTreeMap<_, usize> = plan.local.nodes().map(|(id, _)| (id, id.index())).collect();
    let buckets = plan
        .local
        .nodes()
        .filter(|(_, n)| matches!(n.op, Op::AllReduce { .. }) && n.inputs.len() > 1);
    for (id, n) in buckets {
        let last = n
            .inputs
            .iter()
            .map(|&v| pos[&plan.local.value(v).node])
            .max()
            .unwrap();
        assert_eq!(
            id.index(),
            last + 1,
            "{} is placed right after %{last}",
            n.op
        );
    }
}

/// The plan text names every gradient of a bucket; the JSON keeps each member's provenance and
/// reads back.
#[test]
fn a_bucket_says_what_it_holds() {
    let dir = std::env::temp_dir().join(format!("tpc_buckets_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gpt.tpl");
    std::fs::write(&file, gpt_dp()).unwrap();
    let tpc = env!("CARGO_BIN_EXE_tpc");
    let out = Command::new(tpc)
        .args(["compile", file.to_str().unwrap(), "--mesh", "dp=2,tp=4"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("all_reduce{sum:dp=2}") && l.contains("a bucket of"))
        .expect("a bucket in the text");
    for g in [
        "grad(wpe)",
        "grad(layer.0.mlp.w1)",
        "grad(layer.2.attention.bq)",
    ] {
        assert!(line.contains(g), "{g} in {line}");
    }
    let json = dir.join("plan.json");
    let st = Command::new(tpc)
        .args(["compile", file.to_str().unwrap(), "--mesh", "dp=2,tp=4"])
        .args(["--emit", "json", "-o", json.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success());
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let members = doc["provenance"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p[1]["members"].as_array())
        .map(|m| m.len())
        .max()
        .unwrap_or(0);
    assert!(members > 10, "the members' provenance is in the JSON");
    let back = Command::new(tpc)
        .args(["run", json.to_str().unwrap(), "--check"])
        .output()
        .unwrap();
    assert!(
        back.status.success(),
        "{}",
        String::from_utf8_lossy(&back.stderr)
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `--bucket-mb` takes a finite number of MiB from 0; anything else is a clear error.
#[test]
fn bad_bucket_sizes_are_refused() {
    let file = format!("{}/examples/gpt_train.tpl", env!("CARGO_MANIFEST_DIR"));
    for bad in ["-1", "nan", "inf", "1e9"] {
        let out = Command::new(env!("CARGO_BIN_EXE_tpc"))
            .args([
                "compile",
                &file,
                "--degree",
                "2",
                &format!("--bucket-mb={bad}"),
            ])
            .output()
            .unwrap();
        // A usage error (exit 1, as every bad flag value), never a panic (101).
        assert_eq!(out.status.code(), Some(1), "--bucket-mb {bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--bucket-mb"), "{err}");
    }
    let ok = Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args(["compile", &file, "--degree", "2", "--bucket-mb", "0.5"])
        .output()
        .unwrap();
    assert!(ok.status.success());
}

/// gpt's tied token table (V = 512, tokens over dp): its embedding and LM-head gradient terms
/// are both partial over dp, and the merge pass adds them before one reduction; so every
/// param's gradient is reduced over dp exactly once, bucketed or not.
#[test]
fn the_tied_table_is_reduced_once() {
    for cap in [0, 25 << 20] {
        let plan = plan_of("gpt.tpl", &gpt_dp(), "dp=2,tp=4", device(cap));
        for (name, _) in plan.global.params() {
            let grad = tpc::autodiff::grad_name(name);
            let g = plan
                .local
                .outputs()
                .iter()
                .find(|o| o.name == grad)
                .expect("gradient output")
                .value;
            assert_eq!(
                prop_support::dp_reductions(&plan, g),
                1,
                "{grad}, cap {cap}"
            );
        }
        let merged = plan
            .provenance
            .values()
            .filter(|p| p.user.starts_with("the sum of 2 partial terms"))
            .count()
            + plan
                .provenance
                .values()
                .flat_map(|p| &p.members)
                .filter(|p| p.user.starts_with("the sum of 2 partial terms"))
                .count();
        assert_eq!(merged, 1, "the table's two terms merged once, cap {cap}");
        check_plan(&plan).expect("equals the reference");
    }
}

/// Gradients of different dtypes (a bf16 matmul's and an f32 one's) go into different buckets:
/// a bucket is one message of one element type.
#[test]
fn a_bucket_holds_one_dtype() {
    let text = "mesh dp
dim B = 4, H = 16
input x : f32[B, H] @ [dp, _]
param w1 : f32[H, H]
param w2 : f32[H, H]
y = cast(cast(x, bf16) @ cast(w1, bf16), f32) @ w2
loss = mean(mean(y * y, 1), 0)
train loss with sgd(lr=0.1)
";
    let plan = plan_of("bf16.tpl", text, "dp=2", Device::default());
    for n in over(&plan, "dp") {
        let dtypes: std::collections::BTreeSet<_> =
            n.inputs.iter().map(|&v| plan.local.ty(v).dtype).collect();
        assert_eq!(dtypes.len(), 1, "one dtype per bucket");
    }
    // bf16 values are stored and sent as f32 at run time while the summary sizes them at 2
    // bytes, so the step is compared with the unbucketed one rather than by `check_plan`.
    let plain = plan_of("bf16.tpl", text, "dp=2", device(0));
    assert!(over(&plan, "dp").any(|n| n.inputs.len() == 1));
    assert_eq!(run(&plan), run(&plain), "bitwise the unbucketed step");
}
