//! Sharded checkpoints: each rank writes the blocks of the params
//! and optimizer state it owns into its own safetensors file (`st`), and one index JSON lists,
//! per tensor, its global shape and its blocks (file, offset, byte range, sha256 per chunk), so
//! that a run on any mesh reads just the byte ranges of its own blocks. The program hash
//! (`hash`) tells a checkpoint of another program apart.

pub mod export;
pub mod hash;
pub mod load;
pub mod save;
pub mod st;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The `format` tag of a checkpoint index.
pub const FORMAT: &str = "tpc-checkpoint";
/// The index version this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes per hashed chunk of a block: a reader verifies whole chunks.
pub const CHUNK_BYTES: u64 = 4 << 20;

/// A checkpoint's index (`index.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Index {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// The program hash ([`hash::program_hash`]).
    pub program: String,
    /// The program's source file, for messages.
    pub source: String,
    /// Training steps done when it was saved.
    pub step: u64,
    /// The run's `--seed` (per-step inputs continue from it).
    pub seed: u64,
    /// The sha256 of the run's `--inputs` file, if any (a resume with others is warned about).
    #[serde(default)]
    pub inputs: Option<String>,
    /// The mesh it was saved from (for `inspect`; any mesh loads it).
    pub mesh: String,
    /// Bytes per hashed chunk.
    pub chunk_bytes: u64,
    /// Per file, its length in bytes.
    pub files: BTreeMap<String, u64>,
    /// Per tensor (param or optimizer state), its global shape and blocks.
    pub tensors: BTreeMap<String, TensorEntry>,
}

/// One saved tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// `param` or `state`.
    pub kind: String,
    /// Storage dtype (`F32` or `I32`).
    pub dtype: String,
    /// The program's dtype (`f32`, `bf16`, ...).
    pub declared: String,
    /// Global shape.
    pub shape: Vec<u64>,
    /// The placement it was saved with (for `inspect`).
    pub placement: String,
    /// Its blocks, which tile it exactly.
    pub blocks: Vec<BlockEntry>,
}

/// One block of a saved tensor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BlockEntry {
    /// The file holding it.
    pub file: String,
    /// Global index of its first element, per dim.
    pub offset: Vec<u64>,
    /// Its shape.
    pub shape: Vec<u64>,
    /// Absolute byte range in the file.
    pub data: [u64; 2],
    /// sha256 (hex) of each [`CHUNK_BYTES`] piece of its bytes.
    pub sha256: Vec<String>,
}

/// A checkpoint that cannot be written or read as asked.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CheckpointError {
    /// A file or index that is not what the format says.
    #[error("`{path}`: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// An I/O failure.
    #[error("`{path}`: {reason}")]
    Io {
        /// The file.
        path: String,
        /// The system's message.
        reason: String,
    },
    /// Bytes that do not hash as the index says.
    #[error("checkpoint `{dir}`: `{tensor}`, block at {offset:?} in `{file}` (bytes {start}..{end}): sha256 mismatch: the file is corrupted")]
    Corrupt {
        /// The checkpoint directory.
        dir: String,
        /// The tensor.
        tensor: String,
        /// The file.
        file: String,
        /// The block's offset.
        offset: Vec<u64>,
        /// First byte of the chunk that did not match.
        start: u64,
        /// One past its last byte.
        end: u64,
    },
    /// Blocks that do not tile their tensor.
    #[error("checkpoint `{dir}`: the blocks of `{tensor}` do not cover it: {reason}")]
    Coverage {
        /// The checkpoint directory.
        dir: String,
        /// The tensor.
        tensor: String,
        /// What is missing or overlapping.
        reason: String,
    },
}

/// The sha256 (hex) of each `chunk`-byte piece of `bytes` (one digest for an empty block).
pub fn chunk_hashes(bytes: &[u8], chunk: u64) -> Vec<String> {
    if bytes.is_empty() {
        return vec![hex(&Sha256::digest(bytes))];
    }
    bytes
        .chunks(chunk.max(1) as usize)
        .map(|c| hex(&Sha256::digest(c)))
        .collect()
}

/// The sha256 (hex) of the file at `path`, read in pieces.
pub fn file_sha256(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// An error unless `blocks` tile a tensor of `shape` exactly, as tpc's placements do: blocks
/// of one shape on the regular grid it spans (offsets multiples of it, inside the tensor), no
/// two at one offset, as many as the grid has cells. Linear in the blocks (a set of offsets).
pub fn check_tiling(
    dir: &str,
    name: &str,
    shape: &[u64],
    blocks: &[BlockEntry],
) -> Result<(), CheckpointError> {
    let fail = |reason: String| CheckpointError::Coverage {
        dir: dir.to_string(),
        tensor: name.to_string(),
        reason,
    };
    let volume = |s: &[u64]| s.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
    let whole = volume(shape).ok_or_else(|| fail("its size overflows".into()))?;
    let Some(first) = blocks.first() else {
        return Err(fail("it has no blocks".into()));
    };
    let cell = &first.shape;
    let mut seen = std::collections::BTreeSet::new();
    for (i, b) in blocks.iter().enumerate() {
        if b.offset.len() != shape.len() || b.shape.len() != shape.len() {
            return Err(fail(format!(
                "block {i} has an offset of {} dims and a shape of {}, the tensor {} dims",
                b.offset.len(),
                b.shape.len(),
                shape.len()
            )));
        }
        if b.shape != *cell {
            return Err(fail(format!(
                "its blocks have shapes {cell:?} and {:?}",
                b.shape
            )));
        }
        let on_grid = b.offset.iter().zip(cell).zip(shape).all(|((&o, &c), &d)| {
            o.checked_add(c).is_some_and(|e| e <= d) && (c == 0 || o % c == 0)
        });
        if !on_grid {
            return Err(fail(format!(
                "the block at {:?} of shape {cell:?} is not on the grid of {shape:?}",
                b.offset
            )));
        }
        if !seen.insert(&b.offset) {
            return Err(fail(format!("two blocks at {:?} overlap", b.offset)));
        }
    }
    let each = volume(cell).unwrap_or(u64::MAX);
    let held = each.saturating_mul(blocks.len() as u64);
    if held != whole || (each == 0 && blocks.len() != 1) {
        return Err(fail(format!("they hold {held} of its {whole} elements")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(offset: &[u64], shape: &[u64]) -> BlockEntry {
        BlockEntry {
            file: "f".into(),
            offset: offset.to_vec(),
            shape: shape.to_vec(),
            data: [0, 0],
            sha256: Vec::new(),
        }
    }

    #[test]
    fn tiling_is_exact_or_named() {
        let ok = [block(&[0, 0], &[2, 4]), block(&[2, 0], &[2, 4])];
        assert!(check_tiling("d", "w", &[4, 4], &ok).is_ok());
        let gap = [block(&[0, 0], &[2, 4])];
        let e = check_tiling("d", "w", &[4, 4], &gap)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`w`") && e.contains("8 of its 16"), "{e}");
        let overlap = [block(&[0, 0], &[2, 4]), block(&[0, 0], &[2, 4])];
        assert!(check_tiling("d", "w", &[4, 4], &overlap)
            .unwrap_err()
            .to_string()
            .contains("overlap"));
        let uneven = [block(&[0, 0], &[3, 4]), block(&[3, 0], &[1, 4])];
        assert!(check_tiling("d", "w", &[4, 4], &uneven).is_err());
        let off_grid = [block(&[0, 0], &[2, 4]), block(&[1, 0], &[2, 4])];
        assert!(check_tiling("d", "w", &[4, 4], &off_grid)
            .unwrap_err()
            .to_string()
            .contains("not on the grid"));
        let outside = [block(&[0, 0], &[4, 4]), block(&[4, 0], &[1, 4])];
        assert!(check_tiling("d", "w", &[4, 4], &outside).is_err());
        assert!(check_tiling("d", "step", &[], &[block(&[], &[])]).is_ok());
    }

    #[test]
    fn chunks_hash_each_piece() {
        let bytes: Vec<u8> = (0..10u8).collect();
        let h = chunk_hashes(&bytes, 4);
        assert_eq!(h.len(), 3);
        assert_eq!(h[2], hex(&Sha256::digest([8u8, 9])));
        assert_eq!(chunk_hashes(&[], 4).len(), 1);
        // The sha256 of "abc", a published test vector.
        assert_eq!(
            chunk_hashes(b"abc", 64)[0],
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
