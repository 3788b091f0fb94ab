//! Sharded checkpoints: a run saves every K steps without gathering;
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
    for saved_on in ["dp=2,pp=2,tp=2", "pp=1,tp=8"] {
        let plan = planned(&c, saved_on);
        let save = SaveSpec {
            dir: dir.join(saved_on.replace([',', '='], "")),
            every: 3,
            facts: RunFacts {
                program: "sha256:test".into(),
                source: "gpt_pipe.tpl".into(),
                seed: 3,
                inputs: None,
                mesh: saved_on.into(),
            },
            keep: None,
            abort: None,
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
        for mesh in [
            saved_on,
            "pp=1,tp=1",
            "dp=2,pp=1,tp=4",
            "pp=1,tp=4",
            "pp=4,tp=1",
        ] {
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
                let what = format!("{saved_on} -> {mesh}");
                close(&losses(&rest), want, &what);
                same_params(&rest, &whole, &what);
            }
        }
    }
}

/// The final params (the last `next(...)` outputs) of a resumed run `a` and the uninterrupted
/// run `b`, within `--check`'s tolerance (rtol 1e-4, atol 1e-5).
fn same_params(a: &Trained, b: &Trained, what: &str) {
    use tpc::exec::Tensor::F32;
    assert_eq!(a.last.len(), b.last.len(), "{what}");
    for (name, x) in &a.last {
        let (F32(x), Some(F32(y))) = (x, b.last.get(name)) else {
            continue;
        };
        if name.contains("attention.bk") {
            // softmax is blind to a key bias: its gradient is rounding noise alone, which
            // AdamW turns into moves of either sign.
            continue;
        }
        for (u, v) in x.iter().zip(y.iter()) {
            assert!(
                (u - v).abs() <= 1e-5 + 1e-4 * v.abs(),
                "{what}: `{name}` {u} vs {v}"
            );
        }
    }
}

/// Inputs given per step (a leading step axis of K = 4, so step 5 reads slice 1 again) carry
/// on from the global step after a resume on another mesh.
#[test]
fn stepped_inputs_continue_from_the_global_step() {
    let c = compiled();
    let g = &c.graph;
    let slices: Vec<_> = (0..4)
        .map(|k| tpc::exec::leaves::seeded_inputs(g, 10 + k))
        .collect();
    let mut stepped = std::collections::BTreeMap::new();
    for name in slices[0].keys() {
        let views: Vec<_> = slices
            .iter()
            .map(|s| match &s[name] {
                tpc::exec::Tensor::I32(a) => a.clone(),
                other => panic!("{name}: {}", other.describe()),
            })
            .collect();
        let views: Vec<_> = views.iter().map(|a| a.view()).collect();
        let all = ndarray::stack(ndarray::Axis(0), &views).unwrap();
        stepped.insert(name.clone(), tpc::exec::Tensor::I32(all));
    }
    let run = |plan: &Plan, start: &LeafSource, count, ck: &Checkpointing| {
        let spec = Steps {
            count,
            start,
            stepped: &stepped,
            reseed: None,
            carried: &c.carried,
            loss: "loss",
            keep_first: false,
        };
        train_threads_with(plan, &spec, ck, None).expect("trains")
    };
    let dir = scratch("stepped");
    let save = SaveSpec {
        dir: dir.clone(),
        every: 3,
        facts: RunFacts {
            program: "sha256:test".into(),
            source: "gpt_pipe.tpl".into(),
            seed: 3,
            inputs: None,
            mesh: "tp=2".into(),
        },
        keep: None,
        abort: None,
    };
    let ck = Checkpointing {
        first: 0,
        save: Some(save),
    };
    let whole = run(&planned(&c, "pp=1,tp=2"), &LeafSource::Seed(3), 6, &ck);
    let start = LeafSource::Checkpoint {
        reader: Box::new(Reader::open(&dir.join("step-00000003")).unwrap()),
        rest: Box::new(LeafSource::Seed(3)),
    };
    let ck = Checkpointing {
        first: 3,
        save: None,
    };
    let rest = run(&planned(&c, "dp=2,pp=2,tp=1"), &start, 3, &ck);
    close(
        &losses(&rest),
        &losses(&whole)[3..],
        "stepped inputs after a resume",
    );
    assert_ne!(
        losses(&whole)[4],
        losses(&whole)[1],
        "slices differ by params only"
    );
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

fn ok(args: &[&str]) -> String {
    let o = tpc(args);
    assert!(
        o.status.success(),
        "tpc {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// `(code, stderr)` of a run expected to fail.
fn fails(args: &[&str]) -> (Option<i32>, String) {
    let o = tpc(args);
    assert!(!o.status.success(), "tpc {args:?} should fail");
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn loss_lines(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| l.starts_with("step "))
        .map(String::from)
        .collect()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Export writes the params as global tensors in one standard safetensors file, bit for bit
/// the trained params; `--params` of that file at another degree gives the forward outputs of
/// the trained params; the optimizer state is exported only when asked, and then refused by
/// `--params` as extra arrays; `inspect` lists the step and tensors and `--verify` reads every
/// block.
#[test]
fn export_then_params_gives_the_same_forward_outputs() {
    let dir = scratch("export");
    let (ck, trained) = (dir.join("ck"), dir.join("trained.npz"));
    let gpt = "examples/gpt_pipe.tpl";
    ok(&[
        "run",
        gpt,
        "--degree",
        "4",
        "--steps",
        "2",
        "--save",
        p(&ck),
        "--out",
        p(&trained),
    ]);
    let full = dir.join("full.safetensors");
    let said = ok(&["checkpoint", "export", p(&ck), "-o", p(&full)]);
    assert!(said.contains("68 tensors of step 2"), "{said}");
    let bytes = std::fs::read(&full).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("a standard safetensors file");
    let want = tpc::exec::npz::read(p(&trained)).unwrap();
    assert_eq!(st.names().len(), want.len());
    for (name, t) in &want {
        let view = st.tensor(name).unwrap();
        assert_eq!(view.shape(), t.shape(), "{name}");
        let got: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let tpc::exec::Tensor::F32(a) = t else {
            panic!("{name} is f32")
        };
        assert_eq!(got, a.iter().copied().collect::<Vec<_>>(), "{name} bitwise");
    }
    // Forward outputs from the exported file at degree 2 against the trained npz at degree 4.
    let (y1, y2) = (dir.join("y1.npz"), dir.join("y2.npz"));
    let fwd = |params: &Path, degree: &str, out: &Path| {
        ok(&[
            "run",
            gpt,
            "--forward-only",
            "--degree",
            degree,
            "--params",
            p(params),
            "--out",
            p(out),
        ])
    };
    fwd(&full, "2", &y1);
    fwd(&trained, "4", &y2);
    let (a, b) = (
        tpc::exec::npz::read(p(&y1)).unwrap(),
        tpc::exec::npz::read(p(&y2)).unwrap(),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (name, x) in &a {
        let (tpc::exec::Tensor::F32(x), tpc::exec::Tensor::F32(y)) = (x, &b[name]) else {
            panic!("{name} is f32")
        };
        for (u, v) in x.iter().zip(y.iter()) {
            assert!(
                (u - v).abs() <= 1e-5 * v.abs().max(1.0),
                "{name}: {u} vs {v}"
            );
        }
    }
    let with_state = dir.join("state.safetensors");
    let said = ok(&[
        "checkpoint",
        "export",
        p(&ck),
        "-o",
        p(&with_state),
        "--with-state",
    ]);
    assert!(said.contains("205 tensors"), "{said}");
    let (code, err) = fails(&["run", gpt, "--forward-only", "--params", p(&with_state)]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("extra array `adamw.m(wte)`") && err.contains("state.safetensors"),
        "{err}"
    );
    let inspect = ok(&["checkpoint", "inspect", p(&ck), "--verify"]);
    assert!(
        inspect.contains("(step 2 of examples/gpt_pipe.tpl)"),
        "{inspect}"
    );
    assert!(inspect.contains("params: 68 tensors"), "{inspect}");
    let row = inspect
        .lines()
        .find(|l| l.starts_with("layer.0.mlp.w1 "))
        .unwrap();
    assert!(
        row.contains("f32[64, 256]") && row.contains("[_, tp]") && row.contains(" 4 "),
        "{row}"
    );
    assert!(
        inspect.contains("verified: every block's sha256 matches"),
        "{inspect}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&ok(&["checkpoint", "inspect", p(&ck), "--json"])).unwrap();
    assert_eq!(json["step"], 2);
}

/// A save killed at any point (after some blocks, after the index, after the rename, after
/// `latest`) leaves a checkpoint that loads and continues as the uninterrupted run: the
/// previous one, or the new one once `latest` names it; the next save clears the debris.
#[test]
fn a_killed_save_leaves_the_previous_checkpoint() {
    let dir = scratch("killed");
    let gpt = "examples/gpt_pipe.tpl";
    let mesh = ["--mesh", "pp=2,tp=2"];
    let base = dir.join("base");
    ok(&[&["run", gpt, "--steps", "2", "--save", p(&base)][..], &mesh].concat());
    let whole = loss_lines(&ok(&[&["run", gpt, "--steps", "4"][..], &mesh].concat()));
    for (hook, saved) in [
        ("3:blocks=0", 2),
        ("3:blocks=5", 2),
        ("3:index", 2),
        ("3:rename", 2),
        ("3:latest", 3),
    ] {
        let ck = dir.join(hook.replace([':', '='], "-"));
        let _ = std::fs::remove_dir_all(&ck);
        copy_dir(&base, &ck);
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_tpc"))
            .args(
                [
                    &[
                        "run",
                        gpt,
                        "--steps",
                        "1",
                        "--load",
                        p(&ck),
                        "--save",
                        p(&ck),
                    ][..],
                    &mesh,
                ]
                .concat(),
            )
            .env("TPC_TEST_SAVE_ABORT", hook)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), None, "{hook}: killed by a signal");
        let inspect = ok(&["checkpoint", "inspect", p(&ck), "--verify"]);
        assert!(
            inspect.contains(&format!("(step {saved} of")),
            "{hook}: {inspect}"
        );
        let rest = loss_lines(&ok(&[
            &[
                "run",
                gpt,
                "--steps",
                "1",
                "--load",
                p(&ck),
                "--save",
                p(&ck),
            ][..],
            &mesh,
        ]
        .concat()));
        assert_eq!(
            rest,
            whole[saved..saved + 1],
            "{hook}: resumed from step {saved}"
        );
        let debris: Vec<_> = std::fs::read_dir(&ck)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with('.') && n != ".lock")
            .collect();
        assert!(debris.is_empty(), "{hook}: the next save clears {debris:?}");
    }
    // A step reached again on another mesh (new blocks, a new index): killed between moving
    // the old directory aside and rewriting `latest`, the old one still loads.
    let ck = dir.join("again");
    copy_dir(&base, &ck);
    ok(&[
        &[
            "run",
            gpt,
            "--steps",
            "1",
            "--load",
            p(&ck),
            "--save",
            p(&ck),
        ][..],
        &mesh,
    ]
    .concat());
    let step2 = ck.join("step-00000002");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args([
            "run",
            gpt,
            "--degree",
            "4",
            "--steps",
            "1",
            "--load",
            p(&step2),
            "--save",
            p(&ck),
        ])
        .env("TPC_TEST_SAVE_ABORT", "3:rename")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), None, "killed by a signal");
    let inspect = ok(&["checkpoint", "inspect", p(&ck), "--verify"]);
    assert!(
        inspect.contains(".old-step-00000003 (step 3 of"),
        "{inspect}"
    );
    assert!(inspect.contains("saved on pp=2,tp=2"), "{inspect}");
    let rest = loss_lines(&ok(&[
        &[
            "run",
            gpt,
            "--steps",
            "1",
            "--load",
            p(&ck),
            "--save",
            p(&ck),
            "--check",
        ][..],
        &mesh,
    ]
    .concat()));
    assert_eq!(rest, whole[3..4], "resumed from the old step 3");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A checkpoint with a file removed, truncated or grown, or an index missing a block, is
/// refused before any step runs, naming the file (and a tensor in it) or the tensor.
#[test]
fn a_damaged_checkpoint_is_refused_naming_what() {
    let dir = scratch("damaged");
    let gpt = "examples/gpt_pipe.tpl";
    let base = saved_base(&dir);
    let damage: [Damage<'_>; 4] = [
        ("cannot be read", &|d| {
            std::fs::remove_file(d.join("rank-00001.safetensors")).unwrap()
        }),
        ("truncated", &|d| {
            resize(&d.join("rank-00001.safetensors"), -8)
        }),
        ("the index says", &|d| {
            resize(&d.join("rank-00001.safetensors"), 8)
        }),
        ("do not cover it", &|d| {
            let path = d.join("index.json");
            let mut ix: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let blocks = ix["tensors"]["layer.1.mlp.w1"]["blocks"]
                .as_array_mut()
                .unwrap();
            blocks.pop();
            std::fs::write(&path, serde_json::to_vec(&ix).unwrap()).unwrap();
        }),
    ];
    for (what, damage) in damage {
        let ck = dir.join(what.replace(' ', "-"));
        let _ = std::fs::remove_dir_all(&ck);
        copy_dir(&base, &ck);
        let step = ck.join("step-00000001");
        damage(&step);
        let (code, err) = fails(&["run", gpt, "--steps", "1", "--load", p(&step)]);
        assert_eq!(code, Some(1), "{what}: {err}");
        assert!(err.contains(what), "{what}: {err}");
        let named = match what {
            "do not cover it" => "`layer.1.mlp.w1`",
            _ => "rank-00001.safetensors",
        };
        assert!(
            err.contains(named) && !err.contains("panicked"),
            "{what}: {err}"
        );
        // Through `latest`, a changed index is refused by its sha256.
        if what == "do not cover it" {
            let (_, err) = fails(&["run", gpt, "--load", p(&ck)]);
            assert!(err.contains("`latest` says sha256"), "{err}");
        }
    }
}

/// One step of gpt_pipe at degree 2 saved into `dir/base`.
fn saved_base(dir: &Path) -> PathBuf {
    let base = dir.join("base");
    let gpt = "examples/gpt_pipe.tpl";
    ok(&[
        "run",
        gpt,
        "--degree",
        "2",
        "--steps",
        "1",
        "--save",
        p(&base),
    ]);
    base
}

/// What a damage does (the error says) and how to do it to a step directory.
type Damage<'a> = (&'a str, &'a dyn Fn(&Path));

fn resize(path: &Path, by: i64) {
    let mut bytes = std::fs::read(path).unwrap();
    let len = (bytes.len() as i64 + by) as usize;
    bytes.resize(len, 0);
    std::fs::write(path, bytes).unwrap();
}

/// `--check` after `--load` compares steps 4-6 against the reference started from the
/// checkpoint's tensors; the flags are refused where they mean nothing.
#[test]
fn check_after_load_and_flag_misuse() {
    let dir = scratch("flags");
    let gpt = "examples/gpt_pipe.tpl";
    let ck = dir.join("ck");
    ok(&[
        "run",
        gpt,
        "--degree",
        "2",
        "--steps",
        "3",
        "--save",
        p(&ck),
    ]);
    let out = ok(&[
        "run",
        gpt,
        "--mesh",
        "dp=2,tp=2",
        "--steps",
        "2",
        "--load",
        p(&ck),
        "--check",
    ]);
    assert!(
        out.contains("check loss at step 4:") && out.contains("check loss at step 5:"),
        "{out}"
    );
    // Another rank's probe of the directory (an MPI run's ranks check it at once) is not junk.
    let probed = dir.join("probed");
    std::fs::create_dir_all(&probed).unwrap();
    std::fs::write(probed.join(".latest.tpc-4242-0.tmp"), "").unwrap();
    ok(&["run", gpt, "--steps", "1", "--save", p(&probed)]);
    let junk = dir.join("junk");
    std::fs::create_dir_all(&junk).unwrap();
    std::fs::write(junk.join("notes.txt"), "mine").unwrap();
    let m = dir.join("m");
    let cases: [(&[&str], &str); 6] = [
        (
            &["run", gpt, "--steps", "1", "--save", p(&junk)],
            "holds no tpc checkpoint",
        ),
        (
            &["run", gpt, "--set", "H=32", "--save", p(&ck)],
            "already holds checkpoints",
        ),
        (
            &[
                "run",
                gpt,
                "--set",
                "H=32",
                "--load",
                p(&ck),
                "--save",
                p(&ck),
            ],
            "saved from another program",
        ),
        (
            &["run", "examples/mlp.tpl", "--save", p(&m)],
            "no `train` statement",
        ),
        (
            &["run", gpt, "--forward-only", "--load", p(&ck)],
            "checkpoint a training run",
        ),
        (&["run", gpt, "--keep", "2"], "--save"),
    ];
    for (args, want) in cases {
        let (code, err) = fails(args);
        assert!(matches!(code, Some(1 | 2)), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert_eq!(
        std::fs::read_to_string(junk.join("notes.txt")).unwrap(),
        "mine"
    );
    assert!(!m.exists(), "a refused run creates nothing");
}

/// `--keep N` keeps the N newest checkpoints, `latest`'s among them.
#[test]
fn keep_prunes_the_oldest() {
    let dir = scratch("keep");
    let ck = dir.join("ck");
    let gpt = "examples/gpt_pipe.tpl";
    ok(&[
        "run",
        gpt,
        "--steps",
        "4",
        "--save",
        p(&ck),
        "--save-every",
        "1",
        "--keep",
        "2",
    ]);
    let mut names: Vec<String> = std::fs::read_dir(&ck)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, [".lock", "latest", "step-00000003", "step-00000004"]);
}

/// A hand-edited or hostile checkpoint is refused before anything is read or allocated from
/// it: files outside the step directory, absurd numbers, blocks sharing bytes, an index that
/// swaps two tensors' blocks; special files are not read; `latest` as a symlink is replaced,
/// not written through.
#[test]
fn hostile_checkpoints_are_refused() {
    let dir = scratch("hostile");
    let gpt = "examples/gpt_pipe.tpl";
    let base = saved_base(&dir);
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit, &str); 8] = [
        (
            "outside",
            |ix| {
                let files = ix["files"].as_object_mut().unwrap();
                let len = files.remove("rank-00001.safetensors").unwrap();
                files.insert("../rank-00001.safetensors".into(), len);
            },
            "is not a file name",
        ),
        (
            "step",
            |ix| ix["step"] = serde_json::json!(u64::MAX),
            "out of range",
        ),
        (
            "shape",
            |ix| {
                ix["tensors"]["wpe"]["blocks"][0]["shape"] =
                    serde_json::json!([1u64 << 62, 1u64 << 3]);
            },
            "`wpe`",
        ),
        (
            "shared",
            |ix| {
                let b = ix["tensors"]["lnf_b"]["blocks"][0]["data"].clone();
                ix["tensors"]["lnf_g"]["blocks"][0]["data"] = b;
                let h = ix["tensors"]["lnf_b"]["blocks"][0]["sha256"].clone();
                ix["tensors"]["lnf_g"]["blocks"][0]["sha256"] = h;
            },
            "share bytes",
        ),
        (
            "swapped",
            |ix| {
                let t = &mut ix["tensors"];
                let q = t["layer.0.attention.wq"]["blocks"].clone();
                t["layer.0.attention.wq"]["blocks"] = t["layer.0.attention.wk"]["blocks"].clone();
                t["layer.0.attention.wk"]["blocks"] = q;
            },
            "its header does not hold the block",
        ),
        (
            "kind",
            |ix| ix["tensors"]["wpe"]["kind"] = serde_json::json!("secret"),
            "kind `secret`",
        ),
        (
            "offsets",
            |ix| {
                let blocks = &mut ix["tensors"]["wte"]["blocks"];
                let first = blocks[0]["offset"].clone();
                blocks[0]["offset"] = blocks[1]["offset"].clone();
                blocks[1]["offset"] = first;
            },
            "its header does not hold the block",
        ),
        (
            "relabelled",
            |ix| ix["tensors"]["wpe"]["kind"] = serde_json::json!("state"),
            "its header does not hold the block",
        ),
    ];
    for (what, edit, want) in edits {
        let ck = dir.join(what);
        copy_dir(&base, &ck);
        let step = ck.join("step-00000001");
        let path = step.join("index.json");
        let mut ix: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        edit(&mut ix);
        std::fs::write(&path, serde_json::to_vec(&ix).unwrap()).unwrap();
        for args in [
            &["run", gpt, "--steps", "1", "--load", p(&step)][..],
            &["checkpoint", "inspect", p(&step), "--verify"],
            &[
                "checkpoint",
                "export",
                p(&step),
                "-o",
                p(&dir.join("x.safetensors")),
            ],
        ] {
            let (code, err) = fails(args);
            assert_eq!(code, Some(1), "{what} {args:?}: {err}");
            assert!(
                err.contains(want) && err.contains("index.json"),
                "{what} {args:?}: {err}"
            );
        }
    }
    // A FIFO where `latest` should be is refused, not waited on.
    let fifo = dir.join("fifo");
    copy_dir(&base, &fifo);
    std::fs::remove_file(fifo.join("latest")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(fifo.join("latest"))
        .status();
    if made.is_ok_and(|s| s.success()) {
        let (code, err) = fails(&["checkpoint", "inspect", p(&fifo)]);
        assert!(
            code == Some(1) && err.contains("not a regular file"),
            "{err}"
        );
    }
    // `latest` as a symlink to a file elsewhere: read through, then replaced by the next save.
    let linked = dir.join("linked");
    copy_dir(&base, &linked);
    let victim = dir.join("victim");
    std::fs::rename(linked.join("latest"), &victim).unwrap();
    let before = std::fs::read(&victim).unwrap();
    std::os::unix::fs::symlink(&victim, linked.join("latest")).unwrap();
    ok(&[
        "run",
        gpt,
        "--steps",
        "1",
        "--load",
        p(&linked),
        "--save",
        p(&linked),
    ]);
    assert_eq!(
        std::fs::read(&victim).unwrap(),
        before,
        "the link's target is untouched"
    );
    assert!(std::fs::symlink_metadata(linked.join("latest"))
        .unwrap()
        .is_file());
    assert!(ok(&["checkpoint", "inspect", p(&linked)]).contains("(step 2 of"));
    // Export into the checkpoint itself is refused; nothing there changes.
    let rank0 = base.join("step-00000001/rank-00000.safetensors");
    let saved = std::fs::read(&rank0).unwrap();
    let (code, err) = fails(&["checkpoint", "export", p(&base), "-o", p(&rank0)]);
    assert!(
        code == Some(1) && err.contains("inside a checkpoint"),
        "{err}"
    );
    assert_eq!(std::fs::read(&rank0).unwrap(), saved);
    // ... as is export into another checkpoint's step directory.
    let other = linked.join("step-00000002/rank-00000.safetensors");
    let (code, err) = fails(&["checkpoint", "export", p(&base), "-o", p(&other)]);
    assert!(
        code == Some(1) && err.contains("inside a checkpoint"),
        "{err}"
    );
    // Empty paths (an unset shell variable) are refused, not taken as the current directory.
    for flag in ["--save", "--load"] {
        let (code, err) = fails(&["run", gpt, flag, ""]);
        assert!(
            code == Some(1) && err.contains("not an empty path"),
            "{err}"
        );
    }
}

/// A run saving into a directory of checkpoints it did not load from is refused (it would
/// move `latest` back and prune them); two runs cannot save into one directory at once; a
/// save retried after crashing twice while replacing a step keeps `latest` loadable.
#[test]
fn saves_never_clobber_other_runs_checkpoints() {
    let dir = scratch("clobber");
    let gpt = "examples/gpt_pipe.tpl";
    let (ck, other) = (dir.join("ck"), dir.join("other"));
    ok(&[
        "run",
        gpt,
        "--steps",
        "4",
        "--save",
        p(&ck),
        "--save-every",
        "2",
    ]);
    ok(&["run", gpt, "--steps", "1", "--save", p(&other)]);
    for load in [None, Some(&other)] {
        let mut args = vec!["run", gpt, "--steps", "1", "--save", p(&ck), "--keep", "1"];
        if let Some(l) = load {
            args.extend(["--load", p(l)]);
        }
        let (code, err) = fails(&args);
        assert!(
            code == Some(1) && err.contains("already holds checkpoints"),
            "{err}"
        );
    }
    assert!(ck.join("step-00000002").exists() && ck.join("step-00000004").exists());
    assert!(ok(&["checkpoint", "inspect", p(&ck)]).contains("(step 4 of"));
    // Another process holds the directory's lock.
    let lock = std::fs::File::open(ck.join(".lock")).unwrap();
    lock.try_lock().unwrap();
    let (code, err) = fails(&[
        "run",
        gpt,
        "--steps",
        "1",
        "--load",
        p(&ck),
        "--save",
        p(&ck),
    ]);
    assert!(
        code == Some(1) && err.contains("another run is saving into it"),
        "{err}"
    );
    drop(lock);
    // A `.lock` that is not a regular file is refused, not followed or waited on.
    let odd = dir.join("odd");
    ok(&["run", gpt, "--steps", "1", "--save", p(&odd)]);
    std::fs::remove_file(odd.join(".lock")).unwrap();
    std::fs::create_dir(odd.join(".lock")).unwrap();
    let (code, err) = fails(&[
        "run",
        gpt,
        "--steps",
        "1",
        "--load",
        p(&odd),
        "--save",
        p(&odd),
    ]);
    assert!(
        code == Some(1) && err.contains("`.lock` there is not a regular file"),
        "{err}"
    );
    // Retried twice from step 2 on another mesh, each killed between the renames of step 4.
    let step2 = ck.join("step-00000002");
    for _ in 0..2 {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_tpc"))
            .args([
                "run",
                gpt,
                "--degree",
                "4",
                "--steps",
                "2",
                "--load",
                p(&step2),
                "--save",
                p(&ck),
            ])
            .env("TPC_TEST_SAVE_ABORT", "4:rename")
            .output()
            .unwrap();
        assert_eq!(o.status.code(), None, "killed");
        let inspect = ok(&["checkpoint", "inspect", p(&ck), "--verify"]);
        assert!(inspect.contains("(step 4 of"), "{inspect}");
    }
    // `--load step-N` relative to the save directory, run from inside it, continues it.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tpc"))
        .args([
            "run",
            &std::fs::canonicalize(gpt).unwrap().display().to_string(),
        ])
        .args(["--steps", "1", "--load", "step-00000002", "--save", "."])
        .current_dir(&ck)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(ok(&["checkpoint", "inspect", p(&ck)]).contains("(step 3 of"));
}
