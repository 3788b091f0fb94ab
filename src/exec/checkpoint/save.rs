//! Writing a checkpoint without gathering: every rank writes the blocks it is the first holder
//! of (one writer per distinct block: replicas over an axis leave it to coordinate 0) into its
//! own file in a temporary step directory; then rank 0 builds the index from the files'
//! headers, checks that the blocks tile every tensor, renames the directory into place and
//! rewrites `latest` last. A crash before that leaves `latest` naming the previous checkpoint.

use super::{check_tiling, chunk_hashes, st, BlockEntry, CheckpointError, Index, TensorEntry};
use super::{CHUNK_BYTES, FORMAT, VERSION};
use crate::exec::Tensor;
use crate::ir::{Local, Op, ValueId};
use crate::mesh::Mesh;
use crate::sharding::Placement;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// One block a rank saves.
pub struct Item<'a> {
    /// The tensor's name (a param's or an optimizer state's).
    pub name: &'a str,
    /// `param` or `state`.
    pub kind: &'a str,
    /// The program's dtype (`f32`, `bf16`, ...).
    pub declared: String,
    /// The tensor's global shape.
    pub shape: Vec<u64>,
    /// Its placement, as text (for `inspect`).
    pub placement: String,
    /// The block's global offset, per dim.
    pub offset: Vec<u64>,
    /// The block.
    pub block: &'a Tensor,
}

/// What a rank file's metadata says of one block (the header has its dtype, shape and bytes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct BlockMeta {
    /// `param` or `state`.
    pub(crate) kind: String,
    /// The program's dtype.
    pub(crate) declared: String,
    /// The tensor's global shape.
    pub(crate) global: Vec<u64>,
    /// Its placement, as text.
    pub(crate) placement: String,
    /// The block's global offset.
    pub(crate) offset: Vec<u64>,
    /// sha256 of each chunk of its bytes.
    pub(crate) sha256: Vec<String>,
}

/// The `tpc.blocks` metadata of a rank file's header: per tensor, its block's facts.
pub(crate) fn block_metas(
    md: &safetensors::tensor::Metadata,
    path: &Path,
) -> Result<BTreeMap<String, BlockMeta>, CheckpointError> {
    md.metadata()
        .as_ref()
        .and_then(|m| m.get("tpc.blocks"))
        .map(|t| serde_json::from_str(t))
        .transpose()
        .map_err(|e| CheckpointError::Format {
            path: path.display().to_string(),
            reason: e.to_string(),
        })
        .map(Option::unwrap_or_default)
}

/// What a checkpoint holds of `plan`, as its ranks hold it: each param's and optimizer
/// state's name, kind (`param` or `state`) and local value.
pub fn saved_leaves(plan: &crate::plan::Plan) -> Vec<(&str, &'static str, ValueId<Local>)> {
    let mut out = Vec::new();
    for (_, n) in plan.local.nodes() {
        let kind = match n.op {
            Op::Param { .. } => "param",
            Op::State { .. } => "state",
            _ => continue,
        };
        if let Some(name) = n.op.leaf_name() {
            out.push((name, kind, n.outputs[0]));
        }
    }
    out
}

/// True when the device at `coords` writes its block of a value placed `pl`: on every device
/// axis that does not split the value, it holds coordinate 0 (`stage`: on the pipeline axis,
/// the stage that writes the value instead).
pub fn writes_block(
    pl: &Placement,
    coords: &[u64],
    mesh: &Mesh,
    stage: Option<(usize, u64)>,
) -> bool {
    (0..mesh.rank()).filter(|&a| !mesh.is_temporal(a)).all(|a| {
        let splits = pl.dims.iter().any(|d| d.contains(&a));
        match stage {
            Some((axis, s)) if axis == a => coords[a] == s,
            _ => splits || coords[a] == 0,
        }
    })
}

/// The temporary directory of step `step`'s save in `dir`.
pub fn tmp_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!(".tmp-step-{step:08}"))
}

/// The file of rank `rank`.
pub fn rank_file(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

/// Where a test makes a save die, as a crash or kill would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    /// Once this process has written this many blocks of the step.
    Blocks(usize),
    /// Once the index is written into the temporary directory.
    Index,
    /// Once the step directory is renamed into place (`latest` still names the previous).
    Rename,
    /// Once `latest` names the new checkpoint (before old directories are removed).
    Latest,
}

/// A crash to simulate: at the save of global step `step`, at `at`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AbortAt {
    /// The global step whose save dies.
    pub step: u64,
    /// Where.
    pub at: Abort,
}

impl AbortAt {
    /// Parses `STEP:blocks=K`, `STEP:index`, `STEP:rename` or `STEP:latest`.
    pub fn parse(text: &str) -> Option<AbortAt> {
        let (step, at) = text.split_once(':')?;
        let at = match at {
            "index" => Abort::Index,
            "rename" => Abort::Rename,
            "latest" => Abort::Latest,
            _ => Abort::Blocks(at.strip_prefix("blocks=")?.parse().ok()?),
        };
        Some(AbortAt {
            step: step.parse().ok()?,
            at,
        })
    }
}

/// Blocks written by this process in the save that `Abort::Blocks` counts.
static BLOCKS_WRITTEN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Dies (as a killed process) when `hook` asks for it at step `step`, point `at`.
fn die_at(hook: Option<AbortAt>, step: u64, at: Abort) {
    if hook == Some(AbortAt { step, at }) {
        std::process::abort();
    }
}

/// Writes rank `rank`'s blocks of step `step` into the temporary directory (created if
/// missing) and syncs them.
pub fn save_rank(
    dir: &Path,
    step: u64,
    rank: usize,
    items: &[Item<'_>],
) -> Result<(), CheckpointError> {
    save_rank_hooked(dir, step, rank, items, None)
}

/// [`save_rank`], dying where `hook` says.
pub fn save_rank_hooked(
    dir: &Path,
    step: u64,
    rank: usize,
    items: &[Item<'_>],
    hook: Option<AbortAt>,
) -> Result<(), CheckpointError> {
    let tmp = tmp_dir(dir, step);
    std::fs::create_dir_all(&tmp).map_err(|e| CheckpointError::Io {
        path: tmp.display().to_string(),
        reason: e.to_string(),
    })?;
    let mut metas = BTreeMap::new();
    for it in items {
        let meta = BlockMeta {
            kind: it.kind.to_string(),
            declared: it.declared.clone(),
            global: it.shape.clone(),
            placement: it.placement.clone(),
            offset: it.offset.clone(),
            sha256: chunk_hashes(&st::tensor_bytes(it.block), CHUNK_BYTES),
        };
        metas.insert(it.name.to_string(), meta);
    }
    let text = serde_json::to_string(&metas).map_err(|e| CheckpointError::Format {
        path: tmp.display().to_string(),
        reason: e.to_string(),
    })?;
    let meta = HashMap::from([
        ("tpc.blocks".to_string(), text),
        ("tpc.rank".to_string(), rank.to_string()),
        ("tpc.step".to_string(), step.to_string()),
    ]);
    let blocks: Vec<(&str, &Tensor)> = items.iter().map(|i| (i.name, i.block)).collect();
    let mut counted = || {
        use std::sync::atomic::Ordering;
        if let Some(AbortAt {
            at: Abort::Blocks(k),
            ..
        }) = hook.filter(|h| h.step == step)
        {
            if BLOCKS_WRITTEN.fetch_add(1, Ordering::SeqCst) + 1 >= k {
                std::process::abort();
            }
        }
    };
    die_at(hook, step, Abort::Blocks(0));
    st::write_file_with(&tmp.join(rank_file(rank)), &blocks, meta, &mut counted)?;
    Ok(())
}

/// What the index records of the run besides the blocks.
#[derive(Clone, Debug)]
pub struct RunFacts {
    /// The program hash.
    pub program: String,
    /// The source file.
    pub source: String,
    /// The run's seed.
    pub seed: u64,
    /// The sha256 of the run's `--inputs` file, if any.
    pub inputs: Option<String>,
    /// The mesh it ran on.
    pub mesh: String,
}

/// On rank 0, once every rank's file of step `step` is written: builds and checks the index,
/// renames the step directory into place and points `latest` at it (the commit). Returns the
/// step directory.
pub fn commit(
    dir: &Path,
    step: u64,
    world: usize,
    facts: &RunFacts,
) -> Result<PathBuf, CheckpointError> {
    commit_hooked(dir, step, world, facts, None)
}

/// [`commit`], dying where `hook` says.
pub fn commit_hooked(
    dir: &Path,
    step: u64,
    world: usize,
    facts: &RunFacts,
    hook: Option<AbortAt>,
) -> Result<PathBuf, CheckpointError> {
    let tmp = tmp_dir(dir, step);
    let index = index_of(&tmp, step, world, facts)?;
    let text = serde_json::to_vec_pretty(&index).map_err(|e| CheckpointError::Format {
        path: tmp.display().to_string(),
        reason: e.to_string(),
    })?;
    let io = |p: &Path, e: &dyn std::fmt::Display| CheckpointError::Io {
        path: p.display().to_string(),
        reason: e.to_string(),
    };
    crate::files::write_bytes(&tmp.join("index.json"), &text).map_err(|e| io(&tmp, &e))?;
    die_at(hook, step, Abort::Index);
    let name = format!("step-{step:08}");
    let target = dir.join(&name);
    clear_strays(&tmp, world).map_err(|e| io(&tmp, &e))?;
    if target.exists() {
        set_aside(dir, &name).map_err(|e| io(&target, &e))?;
    }
    std::fs::rename(&tmp, &target).map_err(|e| io(&tmp, &e))?;
    sync_dir(dir);
    die_at(hook, step, Abort::Rename);
    let latest = format!("{name}\n{}\n", chunk_hashes(&text, u64::MAX)[0]);
    replace_file(dir, "latest", latest.as_bytes()).map_err(|e| io(&dir.join("latest"), &e))?;
    die_at(hook, step, Abort::Latest);
    let _ = std::fs::remove_dir_all(dir.join(format!(".old-{name}")));
    Ok(target)
}

/// Moves `dir/name`, a step reached again, out of the way of the new one. `latest` may name
/// it, or (after a crash between these renames) the `.old-NAME` a first attempt set aside:
/// whichever `latest` names stays until `latest` moves; the other is debris.
fn set_aside(dir: &Path, name: &str) -> std::io::Result<()> {
    let (target, old) = (dir.join(name), dir.join(format!(".old-{name}")));
    let latest = std::fs::read_to_string(dir.join("latest")).unwrap_or_default();
    let named = latest.lines().nth(1).map(str::trim).unwrap_or_default();
    let hash_of = |d: &Path| {
        std::fs::read(d.join("index.json"))
            .map(|b| chunk_hashes(&b, u64::MAX).remove(0))
            .unwrap_or_default()
    };
    if old.exists() && hash_of(&old) == named && hash_of(&target) != named {
        return std::fs::remove_dir_all(&target);
    }
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    std::fs::rename(&target, &old)
}

/// Removes from a step's temporary directory whatever is not one of the `world` rank files
/// (a crashed save of the same step by a run with more ranks left its files there).
fn clear_strays(tmp: &Path, world: usize) -> std::io::Result<()> {
    let ours: std::collections::BTreeSet<String> = (0..world).map(rank_file).collect();
    for e in std::fs::read_dir(tmp)?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !ours.contains(&name) && name != "index.json" {
            match e.file_type()?.is_dir() {
                true => std::fs::remove_dir_all(e.path())?,
                false => std::fs::remove_file(e.path())?,
            }
        }
    }
    Ok(())
}

/// Replaces `dir/name` by a file holding `bytes`, atomically and durably; a symlink there is
/// replaced, not written through.
fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(name))?;
    sync_dir(dir);
    Ok(())
}

/// Makes the renames in `dir` durable (best effort: not every system can sync a directory).
fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// After a commit of step `step` in `dir`: removes what crashed or replaced saves left
/// (`.tmp-step-*`, `.old-step-*`) and, with `keep`, every step directory but the `keep`
/// newest up to `step` (the committed one among them). A newer one (of the timeline a resume
/// from an earlier step left) is kept. Returns the directories removed.
pub fn prune(dir: &Path, step: u64, keep: Option<usize>) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut steps = Vec::new();
    let mut gone = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let path = e.path();
        if name.starts_with(".tmp-step-") || name.starts_with(".old-step-") {
            gone.push(path);
        } else if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|n| n.parse::<u64>().ok())
        {
            steps.push((n, path));
        }
    }
    if let Some(keep) = keep {
        steps.sort();
        let upto: Vec<_> = steps.into_iter().filter(|(n, _)| *n <= step).collect();
        let old = upto.len().saturating_sub(keep.max(1));
        gone.extend(upto.into_iter().take(old).map(|(_, p)| p));
    }
    gone.retain(|p| std::fs::remove_dir_all(p).is_ok());
    gone.sort();
    gone
}

/// The index of the rank files in `tmp`, from their headers; every tensor must be tiled.
fn index_of(
    tmp: &Path,
    step: u64,
    world: usize,
    facts: &RunFacts,
) -> Result<Index, CheckpointError> {
    let mut tensors: BTreeMap<String, TensorEntry> = BTreeMap::new();
    let mut files = BTreeMap::new();
    for rank in 0..world {
        let file = rank_file(rank);
        let path = tmp.join(&file);
        let (md, base) = st::read_header(&path)?;
        files.insert(file.clone(), base + md.data_len() as u64);
        let metas = block_metas(&md, &path)?;
        for (name, m) in metas {
            let info = md.info(&name).ok_or_else(|| CheckpointError::Format {
                path: path.display().to_string(),
                reason: format!("`{name}` is in the metadata but not the header"),
            })?;
            let entry = tensors.entry(name).or_insert_with(|| TensorEntry {
                kind: m.kind.clone(),
                dtype: format!("{:?}", info.dtype),
                declared: m.declared.clone(),
                shape: m.global.clone(),
                placement: m.placement.clone(),
                blocks: Vec::new(),
            });
            entry.blocks.push(BlockEntry {
                file: file.clone(),
                offset: m.offset,
                shape: info.shape.iter().map(|&d| d as u64).collect(),
                data: [
                    base + info.data_offsets.0 as u64,
                    base + info.data_offsets.1 as u64,
                ],
                sha256: m.sha256,
            });
        }
    }
    let d = tmp.display().to_string();
    for (name, t) in &tensors {
        check_tiling(&d, name, &t.shape, &t.blocks)?;
    }
    Ok(Index {
        format: FORMAT.into(),
        version: VERSION,
        program: facts.program.clone(),
        source: facts.source.clone(),
        step,
        seed: facts.seed,
        inputs: facts.inputs.clone(),
        mesh: facts.mesh.clone(),
        chunk_bytes: CHUNK_BYTES,
        files,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::super::load::Reader;
    use super::*;
    use crate::diag::SourceFile;
    use crate::driver::{compile_step, plan_declared};
    use crate::exec::leaves::{block_ranges, local_leaf, LeafSource};
    use crate::mesh::Device;
    use crate::plan::Plan;

    const MLP: &str = "mesh dp, tp
input x : f32[8, 16] @ [dp, _]
param w1 : f32[16, 32] @ [_, tp]
param b1 : f32[32] @ [tp]
param w2 : f32[32, 16] @ [tp, _]
y = gelu(x @ w1 + b1) @ w2
loss = mean(mean(y * y, 1), 0)
train loss with adamw(lr=0.01)
";

    fn plan(mesh: &str) -> Plan {
        let src = SourceFile::new("t.tpl", MLP.to_string());
        let c = compile_step(&src, &[], false).unwrap();
        let mesh = Mesh::parse(mesh).unwrap();
        plan_declared(c.graph, Some(mesh), Device::default(), &Default::default()).unwrap()
    }

    /// Each saved leaf of `plan` on device `rank`: (name, kind, value, global shape, block).
    fn leaves(
        plan: &Plan,
        rank: usize,
    ) -> Vec<(String, &'static str, Placement, Vec<u64>, Tensor)> {
        let coords = plan.mesh.coords(rank as u64);
        let mut out = Vec::new();
        for (name, kind, v) in saved_leaves(plan) {
            let g = plan.origin[v].unwrap();
            let name = name.to_string();
            let pl = plan.placements[v].clone();
            let t = local_leaf(
                &plan.global,
                g,
                &name,
                &pl,
                &coords,
                &plan.mesh,
                &LeafSource::Seed(4),
            )
            .unwrap();
            out.push((name, kind, pl, plan.global.ty(g).shape.clone(), t));
        }
        out
    }

    fn save_plan(plan: &Plan, dir: &Path, step: u64) -> usize {
        let world = plan.mesh.num_devices() as usize;
        let mut written = 0;
        for rank in 0..world {
            let coords = plan.mesh.coords(rank as u64);
            let held = leaves(plan, rank);
            let items: Vec<Item<'_>> = held
                .iter()
                .filter(|(_, _, pl, _, _)| writes_block(pl, &coords, &plan.mesh, None))
                .map(|(name, kind, pl, shape, t)| Item {
                    name,
                    kind,
                    declared: "f32".into(),
                    shape: shape.clone(),
                    placement: pl.display(&plan.mesh),
                    offset: block_ranges(shape, pl, &coords, &plan.mesh)
                        .iter()
                        .map(|r| r.start)
                        .collect(),
                    block: t,
                })
                .collect();
            written += items.len();
            save_rank(dir, step, rank, &items).unwrap();
        }
        let facts = RunFacts {
            program: "sha256:0".into(),
            source: "t.tpl".into(),
            seed: 4,
            inputs: None,
            mesh: plan.mesh.to_string(),
        };
        commit(dir, step, world, &facts).unwrap();
        written
    }

    #[test]
    fn saved_on_one_mesh_every_rank_of_another_reads_its_own_blocks() {
        let dir = std::env::temp_dir().join(format!("tpc-ck-save-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let saved = plan("dp=2,tp=4");
        // One writer per distinct block: w1 4 blocks, b1 4, w2 4, AdamW state the same, step 1.
        let written = save_plan(&saved, &dir, 3);
        let distinct: usize = leaves(&saved, 0)
            .iter()
            .map(|(_, _, pl, _, _)| pl.dims.iter().map(|d| d.len()).sum::<usize>())
            .map(|split| if split == 0 { 1 } else { 4 })
            .sum();
        assert_eq!(written, distinct, "no replica writes a block twice");
        let r = Reader::open(&dir).unwrap();
        assert_eq!(r.index.step, 3);
        for mesh in ["dp=1,tp=1", "dp=4,tp=2", "dp=1,tp=8", "dp=2,tp=4"] {
            let p = plan(mesh);
            for rank in 0..p.mesh.num_devices() as usize {
                let coords = p.mesh.coords(rank as u64);
                for (name, _, pl, shape, want) in leaves(&p, rank) {
                    let got = r
                        .read_block(&name, &block_ranges(&shape, &pl, &coords, &p.mesh))
                        .unwrap();
                    assert_eq!(got, want, "{mesh} rank {rank} `{name}`");
                }
            }
        }
        // A second save of a later step moves `latest`; the step directory of the first stays.
        save_plan(&saved, &dir, 6);
        assert_eq!(Reader::open(&dir).unwrap().index.step, 6);
        assert!(dir.join("step-00000003/index.json").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn abort_points_parse_and_prune_keeps_the_newest() {
        let at = |step, at| Some(AbortAt { step, at });
        assert_eq!(AbortAt::parse("6:blocks=5"), at(6, Abort::Blocks(5)));
        assert_eq!(AbortAt::parse("3:latest"), at(3, Abort::Latest));
        assert_eq!(AbortAt::parse("3:later"), None);
        assert_eq!(AbortAt::parse("x:index"), None);
        let dir = std::env::temp_dir().join(format!("tpc-ck-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for d in [
            "step-00000001",
            "step-00000002",
            "step-00000003",
            "step-00000009",
        ] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::create_dir_all(tmp_dir(&dir, 4)).unwrap();
        std::fs::write(dir.join("latest"), "step-00000003\n").unwrap();
        let gone = prune(&dir, 3, None);
        assert_eq!(gone, [tmp_dir(&dir, 4)], "without keep only debris goes");
        let gone = prune(&dir, 3, Some(2));
        let names: Vec<_> = gone
            .iter()
            .map(|p| p.file_name().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["step-00000001"], "a newer step stays");
        assert!(dir.join("step-00000002").exists() && dir.join("step-00000009").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_block_is_refused_at_commit() {
        let dir = std::env::temp_dir().join(format!("tpc-ck-miss-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let p = plan("dp=1,tp=2");
        let t = Tensor::F32(ndarray::ArrayD::zeros(ndarray::IxDyn(&[16, 16])));
        let item = Item {
            name: "w1",
            kind: "param",
            declared: "f32".into(),
            shape: vec![16, 32],
            placement: "[_, tp]".into(),
            offset: vec![0, 0],
            block: &t,
        };
        save_rank(&dir, 1, 0, std::slice::from_ref(&item)).unwrap();
        save_rank(&dir, 1, 1, &[]).unwrap();
        let facts = RunFacts {
            program: String::new(),
            source: String::new(),
            seed: 0,
            inputs: None,
            mesh: p.mesh.to_string(),
        };
        let e = commit(&dir, 1, 2, &facts).unwrap_err().to_string();
        assert!(e.contains("`w1`") && e.contains("256 of its 512"), "{e}");
        assert!(!dir.join("latest").exists(), "nothing committed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
