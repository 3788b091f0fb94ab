//! One rank's checkpoint file in the safetensors format: an 8-byte little-endian header length,
//! a JSON header (each block's dtype, shape and byte range, plus string metadata), then the
//! blocks' bytes in row-major order. Written block by block (no copy of the whole file in
//! memory) and synced; read header first, then only the byte ranges asked for.

use super::CheckpointError;
use crate::exec::Tensor;
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Largest header this reader accepts (the format's own limit).
pub const MAX_HEADER: u64 = 100_000_000;

/// The safetensors dtype a tensor is stored as (float dtypes as f32, as they are held).
pub fn dtype_of(t: &Tensor) -> Dtype {
    match t {
        Tensor::F32(_) => Dtype::F32,
        Tensor::I32(_) => Dtype::I32,
    }
}

/// The bytes of a tensor in row-major order (a copy only when its layout is not standard).
pub fn tensor_bytes(t: &Tensor) -> std::borrow::Cow<'_, [u8]> {
    fn of<T: bytemuck::Pod>(a: &ndarray::ArrayD<T>) -> std::borrow::Cow<'_, [u8]> {
        match a.as_slice() {
            Some(s) => std::borrow::Cow::Borrowed(bytemuck::cast_slice(s)),
            None => {
                let mut v = Vec::with_capacity(a.len() * std::mem::size_of::<T>());
                for x in a.iter() {
                    v.extend_from_slice(bytemuck::bytes_of(x));
                }
                std::borrow::Cow::Owned(v)
            }
        }
    }
    match t {
        Tensor::F32(a) => of(a),
        Tensor::I32(a) => of(a),
    }
}

/// The header of a file holding `blocks` (in that order), with `meta` as its string metadata.
pub fn header(
    blocks: &[(&str, &Tensor)],
    meta: HashMap<String, String>,
) -> Result<(Metadata, Vec<u8>), CheckpointError> {
    let slots: Vec<(&str, Dtype, &[usize])> = blocks
        .iter()
        .map(|(name, t)| (*name, dtype_of(t), t.shape()))
        .collect();
    header_of(&slots, meta)
}

/// The header of a file holding tensors of the given names, dtypes (4 bytes each: F32, I32)
/// and shapes, in that order: the metadata and its padded JSON text.
pub fn header_of(
    slots: &[(&str, Dtype, &[usize])],
    meta: HashMap<String, String>,
) -> Result<(Metadata, Vec<u8>), CheckpointError> {
    let bad = |reason: String| CheckpointError::Format {
        path: String::new(),
        reason,
    };
    let mut at = 0usize;
    let mut infos = Vec::with_capacity(slots.len());
    for (name, dtype, shape) in slots {
        let n = shape
            .iter()
            .try_fold(4usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("`{name}` {shape:?} overflows")))?;
        infos.push((
            name.to_string(),
            TensorInfo {
                dtype: *dtype,
                shape: shape.to_vec(),
                data_offsets: (at, at + n),
            },
        ));
        at += n;
    }
    // The crate's own serialization orders the metadata by a HashMap; a BTreeMap makes two
    // saves of the same blocks the same bytes.
    let mut doc = std::collections::BTreeMap::new();
    let sorted: std::collections::BTreeMap<&String, &String> = meta.iter().collect();
    if !sorted.is_empty() {
        doc.insert("__metadata__".to_string(), serde_json::json!(sorted));
    }
    for (name, info) in &infos {
        if name == "__metadata__" {
            return Err(bad("a tensor cannot be named `__metadata__`".into()));
        }
        let entry = serde_json::json!({
            "dtype": info.dtype,
            "shape": info.shape,
            "data_offsets": [info.data_offsets.0, info.data_offsets.1],
        });
        doc.insert(name.clone(), entry);
    }
    let md = Metadata::new(Some(meta), infos).map_err(|e| bad(e.to_string()))?;
    let mut text = serde_json::to_vec(&doc).map_err(|e| bad(e.to_string()))?;
    text.resize(text.len().next_multiple_of(8), b' ');
    Ok((md, text))
}

/// Writes `blocks` to `path` as one safetensors file and syncs it; returns each block's
/// absolute byte range in the file.
pub fn write_file(
    path: &Path,
    blocks: &[(&str, &Tensor)],
    meta: HashMap<String, String>,
) -> Result<Vec<(u64, u64)>, CheckpointError> {
    write_file_with(path, blocks, meta, &mut || {})
}

/// [`write_file`], calling `after_block` once each block's bytes are handed to the writer.
pub fn write_file_with(
    path: &Path,
    blocks: &[(&str, &Tensor)],
    meta: HashMap<String, String>,
    after_block: &mut dyn FnMut(),
) -> Result<Vec<(u64, u64)>, CheckpointError> {
    let io = |e: std::io::Error| CheckpointError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let (md, text) = header(blocks, meta)?;
    let base = 8 + text.len() as u64;
    let file = File::create(path).map_err(io)?;
    let mut w = BufWriter::new(file);
    w.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(&text).map_err(io)?;
    let mut ranges = Vec::with_capacity(blocks.len());
    for (name, t) in blocks {
        let info = md.info(name).ok_or_else(|| CheckpointError::Format {
            path: path.display().to_string(),
            reason: format!("block `{name}` missing from its own header"),
        })?;
        w.write_all(&tensor_bytes(t)).map_err(io)?;
        after_block();
        ranges.push((
            base + info.data_offsets.0 as u64,
            base + info.data_offsets.1 as u64,
        ));
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(ranges)
}

/// A file's header and where its data starts; the file's length must be exactly what the
/// header describes.
pub fn read_header(path: &Path) -> Result<(Metadata, u64), CheckpointError> {
    let p = path.display().to_string();
    let io = |e: std::io::Error| CheckpointError::Io {
        path: p.clone(),
        reason: e.to_string(),
    };
    let bad = |reason: String| CheckpointError::Format {
        path: p.clone(),
        reason,
    };
    let mut f = File::open(path).map_err(io)?;
    let len = f.metadata().map_err(io)?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .map_err(|_| bad(format!("{len} bytes: too short for a safetensors header")))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_HEADER || 8 + n > len {
        return Err(bad(format!(
            "header of {n} bytes does not fit the file's {len} bytes"
        )));
    }
    let mut text = vec![0u8; n as usize];
    f.read_exact(&mut text).map_err(io)?;
    let md: Metadata = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let want = 8 + n + md.data_len() as u64;
    if want != len {
        return Err(bad(format!(
            "{len} bytes, its header describes {want}: the file is truncated or has trailing bytes"
        )));
    }
    Ok((md, 8 + n))
}

/// Reads `range` (absolute bytes) of the file at `path`.
pub fn read_range(path: &Path, range: (u64, u64)) -> Result<Vec<u8>, CheckpointError> {
    let io = |e: std::io::Error| CheckpointError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let f = File::open(path).map_err(io)?;
    let mut buf = vec![0u8; (range.1 - range.0) as usize];
    f.read_exact_at(&mut buf, range.0).map_err(io)?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{ArrayD, IxDyn};

    fn f32s(shape: &[usize], base: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let v = (0..n).map(|i| base + i as f32 * 0.5).collect();
        Tensor::F32(ArrayD::from_shape_vec(IxDyn(shape), v).unwrap())
    }

    #[test]
    fn a_written_file_is_standard_safetensors_and_reads_back_by_range() {
        let dir = std::env::temp_dir().join(format!("tpc-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("rank-00000.safetensors");
        let a = f32s(&[2, 3], 1.0);
        let b = Tensor::I32(ArrayD::from_shape_vec(IxDyn(&[4]), vec![-1, 0, 7, i32::MAX]).unwrap());
        let s = Tensor::scalar(3.0);
        let meta = HashMap::from([("tpc.rank".to_string(), "0".to_string())]);
        let ranges = write_file(&path, &[("a", &a), ("b", &b), ("step", &s)], meta).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let meta = HashMap::from([("tpc.rank".to_string(), "0".to_string())]);
        write_file(&path, &[("a", &a), ("b", &b), ("step", &s)], meta).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            bytes,
            "the same blocks, the same bytes"
        );
        // The crate's own reader accepts it.
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("a").unwrap().shape(), &[2, 3]);
        assert_eq!(st.tensor("b").unwrap().dtype(), Dtype::I32);
        let (md, base) = read_header(&path).unwrap();
        assert_eq!(md.metadata().as_ref().unwrap()["tpc.rank"], "0");
        assert!(base % 8 == 0);
        for (t, r) in [&a, &b, &s].iter().zip(&ranges) {
            assert_eq!(read_range(&path, *r).unwrap(), tensor_bytes(t).to_vec());
        }
        // A truncated file is named as such.
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        let e = read_header(&path).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        std::fs::write(&path, &bytes[..5]).unwrap();
        assert!(read_header(&path).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_transposed_view_is_written_row_major() {
        let a = f32s(&[2, 3], 0.0);
        let Tensor::F32(x) = &a else { unreachable!() };
        let t = Tensor::F32(x.t().to_owned().into_dyn());
        let view = Tensor::F32(x.clone().reversed_axes());
        assert_eq!(tensor_bytes(&t), tensor_bytes(&view));
    }
}
