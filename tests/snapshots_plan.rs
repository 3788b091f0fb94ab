//! Snapshots of per-device plans: every example as text at degrees 1, 2, 8 and on a 2-D mesh, the
//! plan DOT at degree 8, and the errors of indivisible annotations and bad meshes. Review changes
//! with `cargo insta review`.

use tpc::diag::SourceFile;
use tpc::driver::{compile_plan, Error};
use tpc::mesh::{Device, Mesh};

const EXAMPLES: &[&str] = &[
    "mlp",
    "mlp_2d",
    "attention",
    "gpt_layer",
    "gpt",
    "gpt_train",
];

fn source(name: &str) -> SourceFile {
    let path = format!("examples/{name}.tpl");
    SourceFile::new(path.clone(), std::fs::read_to_string(&path).unwrap())
}

fn mesh(m: &str) -> Mesh {
    if m.contains('=') {
        Mesh::parse(m).unwrap()
    } else {
        Mesh::degree(m.parse().unwrap()).unwrap()
    }
}

fn snap(name: &str, text: &str) {
    insta::with_settings!({ snapshot_path => "../snapshots", prepend_module_to_snapshot => false }, {
        insta::assert_snapshot!(name, text);
    });
}

#[test]
fn plans_as_text() {
    for ex in EXAMPLES {
        let src = source(ex);
        // The MLP examples are large by default; their plans do not depend on the sizes' scale.
        for m in ["1", "2", "8", "dp=2,tp=4"] {
            let plan = compile_plan(&src, &[], mesh(m), Device::default())
                .unwrap_or_else(|e| panic!("{}", e.render(Some(&src))));
            let tag = m.replace(['=', ','], "_");
            snap(&format!("plan_{ex}_{tag}"), &tpc::emit::plan::print(&plan));
        }
    }
}

#[test]
fn plans_as_dot() {
    for ex in EXAMPLES {
        let src = source(ex);
        let plan = compile_plan(&src, &[], mesh("8"), Device::default()).unwrap();
        snap(
            &format!("plan_dot_{ex}_8"),
            &tpc::emit::plan_dot::print(&plan),
        );
    }
    let src = source("gpt");
    let plan = compile_plan(&src, &[("L".into(), 8)], mesh("8"), Device::default()).unwrap();
    snap("plan_dot_gpt_L8_8", &tpc::emit::plan_dot::print(&plan));
}

/// The pipelined GPT as `tpc compile` plans it (microbatches: the stages' count), on `pp=2`
/// and on the 3-D mesh it is written for: the stages, their messages with provenance, the
/// schedule table, and the schedule as an SVG timeline.
#[test]
fn pipelined_plan_as_text_and_timeline() {
    let src = source("gpt_pipe");
    for (m, name) in [("pp=2", "pp_2"), ("dp=2,pp=2,tp=2", "dp_2_pp_2_tp_2")] {
        let g = tpc::driver::compile_step(&src, &[], false)
            .unwrap_or_else(|e| panic!("{}", e.render(Some(&src))))
            .graph;
        let options = tpc::plan::Options {
            microbatches: None,
            ..Default::default()
        };
        let plan = tpc::driver::plan_declared(g, Some(mesh(m)), Device::default(), &options)
            .unwrap_or_else(|e| panic!("{}", e.render(Some(&src))));
        snap(
            &format!("plan_gpt_pipe_{name}"),
            &tpc::emit::plan::print(&plan),
        );
        let svg = tpc::emit::timeline::of_plan(&plan).expect("a pipelined plan");
        snap(&format!("timeline_gpt_pipe_{name}"), &svg);
    }
}

/// The header of gpt_train's plan at degree 8 with each recompute policy: the summary line and
/// the figures it changes (FLOPs, peak memory, step time, backward collectives).
#[test]
fn recompute_plan_headers() {
    let src = source("gpt_train");
    let mut text = String::new();
    for policy in ["selective", "full"] {
        let g = tpc::driver::compile_step(&src, &[], false).unwrap().graph;
        let options = tpc::plan::Options {
            recompute: policy.parse().unwrap(),
            ..Default::default()
        };
        let plan = tpc::driver::plan_declared(g, Some(mesh("8")), Device::default(), &options)
            .unwrap_or_else(|e| panic!("{}", e.render(Some(&src))));
        let printed = tpc::emit::plan::print(&plan);
        text.extend(
            printed
                .lines()
                .take_while(|l| l.starts_with('#'))
                .map(|l| l.to_string() + "\n"),
        );
    }
    snap("plan_gpt_train_8_recompute", &text);
}

fn err_text(e: Error, src: &SourceFile) -> String {
    e.render(Some(src))
}

#[test]
fn sharding_errors() {
    let src = source("mlp");
    let e = compile_plan(&src, &[], mesh("3"), Device::default())
        .err()
        .unwrap();
    snap("error_indivisible_annotation", &err_text(e, &src));
    let src = source("attention");
    let e = compile_plan(&src, &[], mesh("128"), Device::default())
        .err()
        .unwrap();
    snap("error_indivisible_heads", &err_text(e, &src));
    let mut bad = String::new();
    for m in ["tp=0", "tp", "tp=2,tp=2", "tp=x", "=4", "a=4096,b=4096"] {
        let e = Mesh::parse(m).err().unwrap();
        bad.push_str(&format!("--mesh {m}\n{}\n", Error::from(e).render(None)));
    }
    let e = Mesh::degree(0).err().unwrap();
    bad.push_str(&format!("--degree 0\n{}", Error::from(e).render(None)));
    snap("error_bad_meshes", &bad);
}
