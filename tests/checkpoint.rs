//! Sharded checkpoints (issue 12, in progress): a run saves every K steps without gathering;
//! a run loading the checkpoint on any mesh continues the training as if never interrupted.

use std::path::{Path, PathBuf};
use tpc::diag::SourceFile;
use tpc::driver::{compile_step, plan_declared, Compiled};
use tpc::exec::checkpoint::load::Reader;
use tpc::exec::checkpoint::save::RunFacts;
use tpc::exec::leaves::LeafSource;
use tpc::exec::train::{train_threads_with, Checkpointing, SaveSpec, Steps, Trained};
use tpc::mesh::{Device, Mesh};
use tpc::plan::Plan;

fn compiled() -> Compiled {
    let text = std::fs::read_to_string("examples/gpt_pipe.tpl").expect("example");
    let src = SourceFile::new("examples/gpt_pipe.tpl", text);
    compile_step(&src, &[], false).unwrap_or_else(|e| panic!("{}", e.render(Some(&src))))
}

fn planned(c: &Compiled, mesh: &str) -> Plan {
    let mesh = Mesh::parse(mesh).unwrap();
    let options = tpc::plan::Options {
        microbatches: None,
        ..Default::default()
    };
    plan_declared(c.graph.clone(), Some(mesh), Device::default(), &options).expect("plans")
}

fn train(
    c: &Compiled,
    plan: &Plan,
    start: &LeafSource,
    count: usize,
    ck: &Checkpointing,
) -> Trained {
    let stepped = Default::default();
    let spec = Steps {
        count,
        start,
        stepped: &stepped,
        reseed: Some(3),
        carried: &c.carried,
        loss: "loss",
        keep_first: false,
    };
    train_threads_with(plan, &spec, ck, None).expect("trains")
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("checkpoint-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn losses(t: &Trained) -> Vec<f32> {
    t.losses.iter().map(|l| l.0).collect()
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= 1e-5 * y.abs().max(1.0),
            "{what}: {x} vs {y}"
        );
    }
}

/// Six steps saving every three on one mesh; loading step 3 on the same mesh continues bit for
/// bit, and on other meshes (fewer or more devices, with and without stages) within float
/// tolerance; saving changes nothing of the run.
#[test]
fn resume_equals_uninterrupted_on_any_mesh() {
    let c = compiled();
    let dir = scratch("resume");
    for saved_on in ["dp=2,pp=2,tp=2", "pp=1,tp=4"] {
        let plan = planned(&c, saved_on);
        let save = SaveSpec {
            dir: dir.join(saved_on.replace([',', '='], "")),
            every: 3,
            facts: RunFacts {
                program: "sha256:test".into(),
                source: "gpt_pipe.tpl".into(),
                seed: 3,
                mesh: saved_on.into(),
            },
        };
        let ck = Checkpointing {
            first: 0,
            save: Some(save.clone()),
        };
        let whole = train(&c, &plan, &LeafSource::Seed(3), 6, &ck);
        let plain = train(
            &c,
            &plan,
            &LeafSource::Seed(3),
            6,
            &Checkpointing::default(),
        );
        assert_eq!(losses(&whole), losses(&plain), "saving changes nothing");
        let reader = Reader::open(&save.dir.join("step-00000003")).expect("step 3 saved");
        assert_eq!(
            Reader::open(&save.dir).unwrap().index.step,
            6,
            "latest is step 6"
        );
        for mesh in [saved_on, "pp=1,tp=1", "dp=2,pp=1,tp=4", "pp=4,tp=1"] {
            let p = planned(&c, mesh);
            let start = LeafSource::Checkpoint {
                reader: Box::new(reader.clone()),
                rest: Box::new(LeafSource::Seed(3)),
            };
            let ck = Checkpointing {
                first: 3,
                save: None,
            };
            let rest = train(&c, &p, &start, 3, &ck);
            let want = &losses(&whole)[3..];
            if mesh == saved_on {
                assert_eq!(losses(&rest), want, "{saved_on} -> {mesh}: bitwise");
                assert_eq!(
                    rest.last, whole.last,
                    "{saved_on} -> {mesh}: final params bitwise"
                );
            } else {
                close(&losses(&rest), want, &format!("{saved_on} -> {mesh}"));
            }
        }
    }
}

fn tpc(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args(args)
        .output()
        .expect("tpc runs")
}

fn logged(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{} {}", v["step"], v["loss"])
        })
        .collect()
}

/// Through the binary: `--save DIR --save-every 3` over six steps, then `--load` of step 3 on
/// another mesh runs steps 4 to 6 with the uninterrupted run's losses; a checkpoint of another
/// program is refused; a flipped byte names the tensor and file.
#[test]
fn save_and_load_through_the_binary() {
    let dir = scratch("cli");
    let save = dir.join("ck");
    let s = save.to_str().unwrap();
    let log = dir.join("whole.jsonl");
    let o = tpc(&[
        "run",
        "examples/gpt_pipe.tpl",
        "--mesh",
        "dp=2,pp=2,tp=2",
        "--steps",
        "6",
        "--save",
        s,
        "--save-every",
        "3",
        "--log",
        log.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let whole = logged(&log);
    let step3 = save.join("step-00000003");
    let log2 = dir.join("rest.jsonl");
    let o = tpc(&[
        "run",
        "examples/gpt_pipe.tpl",
        "--mesh",
        "pp=2,tp=2",
        "--steps",
        "3",
        "--load",
        step3.to_str().unwrap(),
        "--log",
        log2.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("step 4: loss"),
        "global step numbers: {stdout}"
    );
    let rest: Vec<String> = stdout
        .lines()
        .filter(|l| l.starts_with("step "))
        .map(String::from)
        .collect();
    let want: Vec<String> = String::from_utf8_lossy(
        &tpc(&[
            "run",
            "examples/gpt_pipe.tpl",
            "--mesh",
            "pp=2,tp=2",
            "--steps",
            "6",
        ])
        .stdout,
    )
    .lines()
    .filter(|l| l.starts_with("step "))
    .skip(3)
    .map(String::from)
    .collect();
    assert_eq!(rest, want, "steps 4-6 after a resume");
    assert_eq!(whole.len(), 6);
    let resumed = logged(&log2);
    assert_eq!(resumed.len(), 3);
    assert!(
        resumed[0].starts_with("4 "),
        "logged steps are global: {resumed:?}"
    );
    let o = tpc(&["run", "examples/gpt_pipe.tpl", "--set", "H=32", "--load", s]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("saved from another program"));
    let file = step3.join("rank-00000.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 1;
    bytes[at] ^= 0x40;
    std::fs::write(&file, &bytes).unwrap();
    let o = tpc(&[
        "run",
        "examples/gpt_pipe.tpl",
        "--load",
        step3.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("sha256 mismatch") && err.contains("rank-00000.safetensors"),
        "{err}"
    );
}
