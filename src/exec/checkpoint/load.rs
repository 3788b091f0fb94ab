//! Reading a checkpoint on any mesh: the index is opened (through `latest` when given the
//! checkpoint directory) and checked; a rank asks for the block of a tensor it needs, and the
//! reader intersects it with the saved blocks, reads only the chunks of their bytes that
//! overlap it, verifies each chunk's sha256, and copies the overlapping rows into place.

use super::{check_tiling, chunk_hashes, BlockEntry, CheckpointError, Index, FORMAT, VERSION};
use crate::exec::Tensor;
use ndarray::{ArrayD, IxDyn};
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// An opened checkpoint.
#[derive(Clone, Debug)]
pub struct Reader {
    /// The directory of the step's files.
    dir: PathBuf,
    /// Its index.
    pub index: Index,
}

fn io(path: &Path, e: std::io::Error) -> CheckpointError {
    CheckpointError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

fn format(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Format {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

impl Reader {
    /// Opens the checkpoint at `dir`: a step directory (with `index.json`), or a save
    /// directory whose `latest` names one (and the sha256 of its index).
    pub fn open(dir: &Path) -> Result<Reader, CheckpointError> {
        let (step, bytes) = match dir.join("index.json").exists() {
            true => {
                let path = dir.join("index.json");
                (dir.to_path_buf(), read_small(&path, MAX_INDEX)?)
            }
            false => {
                let (step, want) = read_latest(dir)?;
                named_by_latest(step, &want)?
            }
        };
        let path = step.join("index.json");
        let index: Index =
            serde_json::from_slice(&bytes).map_err(|e| format(&path, e.to_string()))?;
        if index.format != FORMAT || index.version != VERSION {
            return Err(format(
                &path,
                format!(
                    "a `{}` index of version {}; this build reads `{FORMAT}` version {VERSION}",
                    index.format, index.version
                ),
            ));
        }
        let reader = Reader { dir: step, index };
        reader.check().map_err(|reason| format(&path, reason))?;
        reader.check_files()?;
        Ok(reader)
    }

    /// The index's own consistency: the step in range, every file a plain name in the step
    /// directory, every tensor a param's or state's of a supported dtype tiled by its blocks,
    /// each block's bytes and chunk count as its shape says, inside its file and apart from
    /// every other block's bytes.
    fn check(&self) -> Result<(), String> {
        let ix = &self.index;
        if ix.step > MAX_STEP {
            return Err(format!("step {} is out of range", ix.step));
        }
        if ix.chunk_bytes == 0 || ix.chunk_bytes > MAX_CHUNK {
            return Err(format!(
                "chunks of {} bytes: not in 1..={MAX_CHUNK}",
                ix.chunk_bytes
            ));
        }
        if let Some(f) = ix.files.keys().find(|f| !plain_file(f)) {
            return Err(format!(
                "`{f}` is not a file name of a checkpoint's step directory"
            ));
        }
        let d = self.dir.display().to_string();
        let mut spans: BTreeMap<&str, Vec<[u64; 2]>> = BTreeMap::new();
        for (name, t) in &ix.tensors {
            check_entry(name, t)?;
            check_tiling(&d, name, &t.shape, &t.blocks).map_err(|e| e.to_string())?;
            for b in &t.blocks {
                self.check_block(name, b)?;
                spans.entry(&b.file).or_default().push(b.data);
            }
        }
        for (file, mut spans) in spans {
            spans.sort_unstable();
            if spans.windows(2).any(|w| w[1][0] < w[0][1]) {
                return Err(format!("two blocks share bytes of `{file}`"));
            }
        }
        Ok(())
    }

    /// A block's bytes: its shape's, as many chunks, inside a file the index lists.
    fn check_block(&self, name: &str, b: &BlockEntry) -> Result<(), String> {
        let chunk = self.index.chunk_bytes.max(1);
        let bytes = b
            .shape
            .iter()
            .try_fold(4u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("the block of `{name}` at {:?} is too large", b.offset))?;
        let chunks = bytes.div_ceil(chunk).max(1);
        let len = self.index.files.get(&b.file);
        let fits =
            b.data[1].checked_sub(b.data[0]) == Some(bytes) && len.is_some_and(|&l| b.data[1] <= l);
        if !fits || b.sha256.len() as u64 != chunks {
            return Err(format!(
                "the block of `{name}` at {:?} does not fit its file",
                b.offset
            ));
        }
        Ok(())
    }

    /// Every file the index lists is a regular file of the length the index says, and its
    /// header holds each block the index puts there, as the index says it: the tensor's name,
    /// the block's shape, bytes, offset, kind and chunk hashes (`tpc.blocks`). An error names
    /// the file and a tensor with blocks in it.
    fn check_files(&self) -> Result<(), CheckpointError> {
        let mut by_file: BTreeMap<&str, Vec<(&String, &BlockEntry)>> = BTreeMap::new();
        for (name, t) in &self.index.tensors {
            for b in &t.blocks {
                by_file.entry(&b.file).or_default().push((name, b));
            }
        }
        for (file, &want) in &self.index.files {
            let held = by_file.remove(file.as_str()).unwrap_or_default();
            self.check_file(file, want, &held)?;
        }
        Ok(())
    }

    /// [`Self::check_files`] of one file of `want` bytes holding the blocks `held`.
    fn check_file(
        &self,
        file: &str,
        want: u64,
        held: &[(&String, &BlockEntry)],
    ) -> Result<(), CheckpointError> {
        let path = self.dir.join(file);
        let named = match held.first() {
            Some((n, _)) if held.len() > 1 => {
                format!(" (it holds blocks of `{n}` and {} others)", held.len() - 1)
            }
            Some((n, _)) => format!(" (it holds a block of `{n}`)"),
            None => String::new(),
        };
        let bad = |what: String| format(&path, format!("{what}{named}"));
        let m = std::fs::metadata(&path)
            .map_err(|e| bad(format!("cannot be read: {}", crate::files::os_reason(&e))))?;
        if !m.is_file() {
            return Err(bad("not a regular file".into()));
        }
        if m.len() < want {
            return Err(bad(format!(
                "truncated: {} bytes, the index says {want}",
                m.len()
            )));
        }
        if m.len() > want {
            return Err(bad(format!("{} bytes, the index says {want}", m.len())));
        }
        let (md, base) = super::st::read_header(&path)?;
        let metas = super::save::block_metas(&md, &path)?;
        for (name, b) in held {
            let kind = &self.index.tensors[*name].kind;
            let info = md.info(name);
            let agrees = info.is_some_and(|i| {
                i.shape
                    .iter()
                    .map(|&d| d as u64)
                    .eq(b.shape.iter().copied())
                    && [
                        base + i.data_offsets.0 as u64,
                        base + i.data_offsets.1 as u64,
                    ] == b.data
            }) && metas
                .get(*name)
                .is_some_and(|m| m.offset == b.offset && m.sha256 == b.sha256 && m.kind == *kind);
            if !agrees {
                return Err(format(
                    &path,
                    format!(
                        "its header does not hold the block of `{name}` at {:?} that \
                         index.json puts there",
                        b.offset
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The whole of tensor `name`, assembled from its saved blocks.
    pub fn read_global(&self, name: &str) -> Result<Tensor, CheckpointError> {
        let shape = match self.index.tensors.get(name) {
            Some(t) => t.shape.clone(),
            None => return self.read_block(name, &[]),
        };
        let ranges: Vec<Range<u64>> = shape.iter().map(|&d| 0..d).collect();
        self.read_block(name, &ranges)
    }

    /// Reads every saved block once and checks its sha256: an error names the first tensor,
    /// file and bytes that do not match. Returns the bytes verified.
    pub fn verify(&self) -> Result<u64, CheckpointError> {
        let mut bytes = 0;
        for (name, t) in &self.index.tensors {
            for b in &t.blocks {
                let ranges: Vec<Range<u64>> = b
                    .offset
                    .iter()
                    .zip(&b.shape)
                    .map(|(&o, &s)| o..o + s)
                    .collect();
                self.read_block(name, &ranges)?;
                bytes += b.data[1] - b.data[0];
            }
        }
        Ok(bytes)
    }

    /// The directory of the step's files.
    pub fn step_dir(&self) -> &Path {
        &self.dir
    }

    /// The block `ranges` (one range per dim) of tensor `name`, read from the saved blocks it
    /// overlaps; every byte read is verified against the index.
    pub fn read_block(&self, name: &str, ranges: &[Range<u64>]) -> Result<Tensor, CheckpointError> {
        let t =
            self.index.tensors.get(name).ok_or_else(|| {
                format(&self.dir, format!("the checkpoint has no tensor `{name}`"))
            })?;
        let inside = ranges.len() == t.shape.len()
            && ranges
                .iter()
                .zip(&t.shape)
                .all(|(r, &d)| r.start <= r.end && r.end <= d);
        if !inside {
            return Err(format(
                &self.dir,
                format!("block {ranges:?} asked of `{name}` {:?}", t.shape),
            ));
        }
        let shape: Vec<usize> = ranges.iter().map(|r| (r.end - r.start) as usize).collect();
        let n: usize = shape.iter().product();
        match t.dtype.as_str() {
            "I32" => {
                let mut v = vec![0i32; n];
                self.fill(name, ranges, bytemuck::cast_slice_mut(&mut v))?;
                Ok(Tensor::I32(array(shape, v)?))
            }
            "F32" => {
                let mut v = vec![0f32; n];
                self.fill(name, ranges, bytemuck::cast_slice_mut(&mut v))?;
                Ok(Tensor::F32(array(shape, v)?))
            }
            other => Err(format(&self.dir, format!("`{name}` has dtype {other}"))),
        }
    }

    /// Copies into `dest` (row-major bytes of the block `ranges`) every saved block's overlap.
    fn fill(
        &self,
        name: &str,
        ranges: &[Range<u64>],
        dest: &mut [u8],
    ) -> Result<(), CheckpointError> {
        let t = &self.index.tensors[name];
        let chunk = self.index.chunk_bytes.max(1);
        for b in &t.blocks {
            let cut: Vec<Range<u64>> = ranges
                .iter()
                .zip(b.offset.iter().zip(&b.shape))
                .map(|(r, (&o, &s))| r.start.max(o)..r.end.min(o + s))
                .collect();
            if cut.iter().any(|c| c.start >= c.end) && !cut.is_empty() {
                continue;
            }
            let runs = runs(&cut, &b.offset, &b.shape, ranges);
            let (Some(lo), Some(hi)) = (
                runs.iter().map(|r| r.0).min(),
                runs.iter().map(|r| r.0 + r.2).max(),
            ) else {
                continue;
            };
            let file = self.dir.join(&b.file);
            let len = b.data[1] - b.data[0];
            let mut next = 0;
            for c in lo / chunk..=(hi - 1) / chunk {
                let (cs, ce) = (c * chunk, ((c + 1) * chunk).min(len));
                // Runs are in increasing source order: those before `next` ended in an
                // earlier chunk.
                while next < runs.len() && runs[next].0 + runs[next].2 <= cs {
                    next += 1;
                }
                if runs.get(next).is_none_or(|r| r.0 >= ce) {
                    continue; // no run touches this chunk
                }
                let bytes = super::st::read_range(&file, (b.data[0] + cs, b.data[0] + ce))?;
                if chunk_hashes(&bytes, chunk)[0] != b.sha256[c as usize] {
                    return Err(CheckpointError::Corrupt {
                        dir: self.dir.display().to_string(),
                        tensor: name.to_string(),
                        file: b.file.clone(),
                        offset: b.offset.clone(),
                        start: b.data[0] + cs,
                        end: b.data[0] + ce,
                    });
                }
                for &(src, dst, n) in runs[next..].iter().take_while(|r| r.0 < ce) {
                    let (from, to) = (src.max(cs), (src + n).min(ce));
                    let at = (dst + from - src) as usize;
                    dest[at..at + (to - from) as usize]
                        .copy_from_slice(&bytes[(from - cs) as usize..(to - cs) as usize]);
                }
            }
        }
        Ok(())
    }
}

/// Largest `index.json` read (a 256-rank checkpoint of a 175B model's index is ~80 MB).
const MAX_INDEX: u64 = 1 << 30;
/// Largest chunk a reader buffers.
const MAX_CHUNK: u64 = 64 << 20;
/// Largest step number a checkpoint may claim.
const MAX_STEP: u64 = 1 << 40;
/// Most blocks one tensor may have (a 4096-device mesh splitting every dim has 4096).
const MAX_BLOCKS: usize = 1 << 16;

/// The bytes of the regular file `path`, refused when larger than `max` (a device, a FIFO or
/// a huge file is not an index).
fn read_small(path: &Path, max: u64) -> Result<Vec<u8>, CheckpointError> {
    let m = std::fs::metadata(path).map_err(|e| io(path, e))?;
    if !m.is_file() {
        return Err(format(path, "not a regular file"));
    }
    if m.len() > max {
        return Err(format(
            path,
            format!("{} bytes: larger than {max}", m.len()),
        ));
    }
    std::fs::read(path).map_err(|e| io(path, e))
}

/// The step directory `dir/latest` names and the sha256 it gives for its index; without a
/// `latest`, an error listing the step directories there (a first save killed before it).
fn read_latest(dir: &Path) -> Result<(PathBuf, String), CheckpointError> {
    let latest = dir.join("latest");
    if std::fs::symlink_metadata(&latest).is_err() {
        let mut steps: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().to_string())
                    .filter(|n| n.starts_with("step-"))
                    .collect()
            })
            .unwrap_or_default();
        steps.sort();
        let hint = match steps.last() {
            Some(s) => format!(
                " (a save may have been interrupted: {} step directories are there; load one \
                 with --load {})",
                steps.len(),
                dir.join(s).display()
            ),
            None => String::new(),
        };
        return Err(format(
            dir,
            format!("not a tpc checkpoint: no index.json and no `latest`{hint}"),
        ));
    }
    let text = read_small(&latest, 4096)?;
    let text = String::from_utf8_lossy(&text);
    let mut lines = text.lines();
    let (Some(name), Some(hash)) = (lines.next(), lines.next()) else {
        return Err(format(&latest, "expected a step directory and a sha256"));
    };
    if !name.starts_with("step-") || name.contains(['/', '\\']) || name.contains("..") {
        return Err(format(&latest, format!("`{name}` is not a step directory")));
    }
    Ok((dir.join(name), hash.trim().to_string()))
}

/// A file name the index may list: a plain name inside the step directory.
fn plain_file(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains(['/', '\\', '\0'])
        && name.ends_with(".safetensors")
}

/// A tensor entry's kind, dtypes and block count are ones tpc writes.
fn check_entry(name: &str, t: &super::TensorEntry) -> Result<(), String> {
    if t.kind != "param" && t.kind != "state" {
        return Err(format!(
            "`{name}` is of kind `{}`, not param or state",
            t.kind
        ));
    }
    let int = t.declared == "i32";
    let stored = matches!((t.dtype.as_str(), int), ("I32", true) | ("F32", false));
    if !stored || !["f32", "bf16", "f16", "i32"].contains(&t.declared.as_str()) {
        return Err(format!(
            "`{name}` is stored as {} for a {} tensor",
            t.dtype, t.declared
        ));
    }
    if t.blocks.len() > MAX_BLOCKS {
        return Err(format!(
            "`{name}` has {} blocks, more than {MAX_BLOCKS}",
            t.blocks.len()
        ));
    }
    Ok(())
}

/// The step directory `latest` names (`step`, whose index must hash to `want`) and its index's
/// bytes. A save replacing a step directory of the same name moves the old one to `.old-NAME`
/// before renaming the new one into place, and rewrites `latest` after: a crash in between
/// leaves `latest` naming what is now `.old-NAME` (or the new directory with another hash).
fn named_by_latest(step: PathBuf, want: &str) -> Result<(PathBuf, Vec<u8>), CheckpointError> {
    let path = step.join("index.json");
    let first = read_small(&path, MAX_INDEX);
    if let Ok(bytes) = &first {
        if chunk_hashes(bytes, u64::MAX)[0] == want {
            return Ok((step, bytes.clone()));
        }
    }
    if let (Some(parent), Some(name)) = (step.parent(), step.file_name()) {
        let old = parent.join(format!(".old-{}", name.to_string_lossy()));
        if let Ok(bytes) = read_small(&old.join("index.json"), MAX_INDEX) {
            if chunk_hashes(&bytes, u64::MAX)[0] == want {
                return Ok((old, bytes));
            }
        }
    }
    let bytes = first?;
    let got = &chunk_hashes(&bytes, u64::MAX)[0];
    Err(format(
        &path,
        format!("`latest` says sha256 {want}, the file has {got}"),
    ))
}

fn array<T>(shape: Vec<usize>, v: Vec<T>) -> Result<ArrayD<T>, CheckpointError> {
    ArrayD::from_shape_vec(IxDyn(&shape), v).map_err(|e| CheckpointError::Format {
        path: String::new(),
        reason: e.to_string(),
    })
}

/// The contiguous runs (along the last dim) of the overlap `cut` of a saved block (`offset`,
/// `shape`) and the asked block `ranges`: (byte offset in the saved block, byte offset in the
/// asked block, bytes), in increasing source order.
fn runs(
    cut: &[Range<u64>],
    offset: &[u64],
    shape: &[u64],
    ranges: &[Range<u64>],
) -> Vec<(u64, u64, u64)> {
    let rank = cut.len();
    if rank == 0 {
        return vec![(0, 0, 4)];
    }
    let strides = |dims: &mut dyn Iterator<Item = u64>| -> Vec<u64> {
        let d: Vec<u64> = dims.collect();
        let mut s = vec![1u64; d.len()];
        for i in (0..d.len().saturating_sub(1)).rev() {
            s[i] = s[i + 1] * d[i + 1];
        }
        s
    };
    let src_st = strides(&mut shape.iter().copied());
    let dst_st = strides(&mut ranges.iter().map(|r| r.end - r.start));
    let last = rank - 1;
    let len = (cut[last].end - cut[last].start) * 4;
    let mut out = Vec::new();
    let mut idx: Vec<u64> = cut.iter().map(|c| c.start).collect();
    loop {
        let src: u64 = (0..rank).map(|d| (idx[d] - offset[d]) * src_st[d]).sum();
        let dst: u64 = (0..rank)
            .map(|d| (idx[d] - ranges[d].start) * dst_st[d])
            .sum();
        out.push((src * 4, dst * 4, len));
        // The next row: an odometer over the outer dims.
        let mut d = last;
        loop {
            if d == 0 {
                return out;
            }
            d -= 1;
            idx[d] += 1;
            if idx[d] < cut[d].end {
                break;
            }
            idx[d] = cut[d].start;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{st, BlockEntry, TensorEntry};
    use super::*;
    use ndarray::{s, Array2};
    use std::collections::BTreeMap;

    /// Saves `x` cut into `rows` × `cols` blocks, each in its own file, with `chunk`-byte
    /// chunks, and a `latest` naming the step directory; returns the save directory.
    fn save(name: &str, x: &Array2<f32>, grid: (usize, usize), chunk: u64) -> PathBuf {
        let root = std::env::temp_dir().join(format!("tpc-ck-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = root.join("step-00000003");
        std::fs::create_dir_all(&dir).unwrap();
        let (r, c) = (x.nrows() / grid.0, x.ncols() / grid.1);
        let mut blocks = Vec::new();
        let mut files = BTreeMap::new();
        for i in 0..grid.0 {
            for j in 0..grid.1 {
                let b = Tensor::F32(
                    x.slice(s![i * r..(i + 1) * r, j * c..(j + 1) * c])
                        .to_owned()
                        .into_dyn(),
                );
                let file = format!("rank-{:05}.safetensors", i * grid.1 + j);
                let offset = vec![(i * r) as u64, (j * c) as u64];
                let meta = super::super::save::BlockMeta {
                    kind: "param".into(),
                    declared: "f32".into(),
                    global: vec![x.nrows() as u64, x.ncols() as u64],
                    placement: "[_, tp]".into(),
                    offset: offset.clone(),
                    sha256: chunk_hashes(&st::tensor_bytes(&b), chunk),
                };
                let metas = BTreeMap::from([(name.to_string(), meta)]);
                let text = serde_json::to_string(&metas).unwrap();
                let md = std::collections::HashMap::from([("tpc.blocks".to_string(), text)]);
                let ranges = st::write_file(&dir.join(&file), &[(name, &b)], md).unwrap();
                files.insert(
                    file.clone(),
                    std::fs::metadata(dir.join(&file)).unwrap().len(),
                );
                blocks.push(BlockEntry {
                    file,
                    offset,
                    shape: vec![r as u64, c as u64],
                    data: [ranges[0].0, ranges[0].1],
                    sha256: chunk_hashes(&st::tensor_bytes(&b), chunk),
                });
            }
        }
        let index = Index {
            format: FORMAT.into(),
            version: VERSION,
            program: "sha256:0".into(),
            source: "t.tpl".into(),
            step: 3,
            seed: 0,
            inputs: None,
            mesh: "tp=4".into(),
            chunk_bytes: chunk,
            files,
            tensors: BTreeMap::from([(
                name.to_string(),
                TensorEntry {
                    kind: "param".into(),
                    dtype: "F32".into(),
                    declared: "f32".into(),
                    shape: vec![x.nrows() as u64, x.ncols() as u64],
                    placement: "[_, tp]".into(),
                    blocks,
                },
            )]),
        };
        let text = serde_json::to_vec_pretty(&index).unwrap();
        std::fs::write(dir.join("index.json"), &text).unwrap();
        let latest = format!("step-00000003\n{}\n", chunk_hashes(&text, u64::MAX)[0]);
        std::fs::write(root.join("latest"), latest).unwrap();
        root
    }

    fn global() -> Array2<f32> {
        Array2::from_shape_fn((8, 12), |(i, j)| (i * 100 + j) as f32 + 0.25)
    }

    #[test]
    fn any_block_reads_back_exactly_from_saved_blocks_of_another_layout() {
        let x = global();
        for (grid, chunk) in [
            ((1, 4), 16u64),
            ((2, 2), 1 << 20),
            ((4, 1), 24),
            ((1, 1), 4),
        ] {
            let root = save("w", &x, grid, chunk);
            let r = Reader::open(&root).unwrap();
            let blocks: [(Range<usize>, Range<usize>); 5] = [
                (0..8, 0..12),
                (2..6, 3..9),
                (0..4, 6..12),
                (7..8, 11..12),
                (3..3, 0..12),
            ];
            for (rows, cols) in blocks {
                let asked = [
                    rows.start as u64..rows.end as u64,
                    cols.start as u64..cols.end as u64,
                ];
                let got = r.read_block("w", &asked).unwrap();
                let want = x
                    .slice(s![rows.clone(), cols.clone()])
                    .to_owned()
                    .into_dyn();
                assert_eq!(
                    got,
                    Tensor::F32(want),
                    "grid {grid:?} chunk {chunk} block {rows:?}×{cols:?}"
                );
            }
            let _ = std::fs::remove_dir_all(&root);
        }
    }

    #[test]
    fn a_flipped_byte_or_a_stale_latest_is_named() {
        let root = save("w1", &global(), (1, 2), 32);
        let file = root.join("step-00000003/rank-00001.safetensors");
        let mut bytes = std::fs::read(&file).unwrap();
        let at = bytes.len() - 3;
        bytes[at] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let r = Reader::open(&root).unwrap();
        // The other block still reads; the corrupted one is named.
        assert!(r.read_block("w1", &[0..8, 0..6]).is_ok());
        let e = r.read_block("w1", &[0..8, 0..12]).unwrap_err().to_string();
        assert!(
            e.contains("`w1`")
                && e.contains("rank-00001.safetensors")
                && e.contains("sha256 mismatch"),
            "{e}"
        );
        let index = root.join("step-00000003/index.json");
        let text = std::fs::read_to_string(&index).unwrap();
        std::fs::write(&index, text.replace("\"step\": 3", "\"step\": 4")).unwrap();
        let e = Reader::open(&root).unwrap_err().to_string();
        assert!(e.contains("`latest` says sha256"), "{e}");
        let e = Reader::open(&root.join("nowhere")).unwrap_err().to_string();
        assert!(e.contains("not a tpc checkpoint"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
