//! The plan summary's figures, computed by hand for one small plan (kills the mutants of
//! `src/plan/summary.rs` that the property tests' self-consistency checks cannot see: they
//! recompute collectives from the same program, but not FLOPs, memory or times).

mod prop_support;

use prop_support::{plan_of, ROW_SPLIT_MATMUL};
use tpc::mesh::Device;
use tpc::plan::Plan;

/// Slow compute: `ROW_SPLIT_MATMUL` (`x` row-split over tp=4, `y` wanted replicated) runs the
/// matmul on row blocks: `x` [16, 256] (16 KiB), `w` [256, 4096] (4 MiB), the matmul
/// [16, 4096] (256 KiB), then one all-gather to `y` [64, 4096] (1 MiB).
fn dev() -> Device {
    Device {
        flops_f32: 1e12,
        mem_weight: 0.0,
        ..Device::default()
    }
}

fn plan() -> Plan {
    plan_of("summary.tpl", ROW_SPLIT_MATMUL, "4", dev())
}

#[test]
fn every_figure_of_the_summary_by_hand() {
    let plan = plan();
    let s = &plan.summary;
    let d = dev();
    let gather = &s.collectives["all_gather"];
    assert_eq!(gather.count, 1);
    // A ring all-gather over 4 sends 3 blocks of 256 KiB from each device.
    assert_eq!(gather.bytes_per_device, 3 * 262_144);
    for kind in ["all_reduce", "reduce_scatter", "all_to_all"] {
        assert_eq!(s.collectives[kind].count, 0, "{kind}");
        assert_eq!(s.collectives[kind].bytes_per_device, 0, "{kind}");
    }
    let flops = 2.0 * 16.0 * 4096.0 * 256.0;
    assert_eq!(s.flops_per_device, flops);
    assert_eq!(s.param_bytes_per_device, 4 * 1024 * 1024);
    // Live at the all-gather: its operand (256 KiB) and its result (1 MiB); `x` died at the
    // matmul.
    assert_eq!(
        s.peak_memory_bytes_per_device,
        4 * 1024 * 1024 + 262_144 + 1_048_576
    );
    let comm = d.launch + 3.0 * d.latency + 3.0 * 262_144.0 / d.bandwidth;
    assert!(
        (s.comm_time_s - comm).abs() <= 1e-12 * comm,
        "{}",
        s.comm_time_s
    );
    let compute = flops / d.flops_f32;
    assert!((s.compute_time_s - compute).abs() <= 1e-12 * compute);
    assert!((s.estimated_time_s - (comm + compute)).abs() <= 1e-12 * (comm + compute));
}

#[test]
fn half_precision_compute_is_priced_at_the_half_rate() {
    let text = ROW_SPLIT_MATMUL.replace("f32", "bf16");
    let d = dev();
    let plan = plan_of("summary_bf16.tpl", &text, "4", d);
    let s = &plan.summary;
    let want = s.flops_per_device / d.flops_half;
    assert!(s.flops_per_device > 0.0);
    assert!(
        (s.compute_time_s - want).abs() <= 1e-12 * want,
        "{}",
        s.compute_time_s
    );
}

/// A training step's peak holds the optimizer state, resident from step to step: the same
/// model trained with AdamW peaks at least its moments above SGD without momentum, whose
/// peak (in the backward, with a large batch) comes long before the update reads any state.
#[test]
fn a_training_peak_holds_the_optimizer_state() {
    let summary = |optimizer: &str| {
        let text = format!(
            "mesh tp
input x : f32[512, 16]
param w1 : f32[16, 64] @ [_, tp]
param w2 : f32[64, 16] @ [tp, _]
y = gelu(x @ w1) @ w2
loss = mean(mean(y * y, 1), 0)
train loss with {optimizer}
"
        );
        let src = tpc::diag::SourceFile::new("train.tpl", text);
        let c = tpc::driver::compile_step(&src, &[], false).expect("compiles");
        let mesh = tpc::mesh::Mesh::parse("tp=4").unwrap();
        let options = Default::default();
        let plan = tpc::driver::plan_declared(c.graph, Some(mesh), Device::default(), &options)
            .expect("plans");
        assert_eq!(
            plan.summary.peak_memory_bytes_per_device,
            plan.summary.memory_bytes_per_device.peak
        );
        plan.summary.memory_bytes_per_device
    };
    let (adam, sgd) = (summary("adamw(lr=0.01)"), summary("sgd(lr=0.01)"));
    assert_eq!(sgd.optimizer, 0);
    assert_eq!(adam.optimizer, 2 * adam.params + 4, "m, v and the step");
    assert!(
        adam.peak >= sgd.peak + adam.optimizer,
        "{adam:?} vs {sgd:?}"
    );
}
