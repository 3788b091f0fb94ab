//! Leaf arrays from the file given to `--params` or `--inputs`: an `.npz` archive, or a
//! `.safetensors` file (what `tpc checkpoint export` writes, and what model hubs publish), by
//! extension. Both are checked against the program's leaves the same way before any data is
//! read; safetensors bf16 and f16 arrays are widened to f32 exactly.

use super::checkpoint::st;
use super::npz::{self, Found, Kind, NpzError};
use super::Tensor;
use crate::ir::Graph;
use ndarray::{ArrayD, IxDyn};
use safetensors::tensor::TensorInfo;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::Path;

/// True when `path` names a safetensors file.
pub fn is_safetensors(path: &str) -> bool {
    Path::new(path)
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
}

/// The params (`params`) or inputs of `g` from the file at `path`, every problem in one error.
pub fn load(path: &str, g: &Graph, params: bool) -> Result<BTreeMap<String, Tensor>, NpzError> {
    match is_safetensors(path) {
        true => load_safetensors(path, g, params, false),
        false => npz::load(path, g, params),
    }
}

/// [`load`] of a training run's inputs, each possibly with a leading step axis.
pub fn load_step_inputs(path: &str, g: &Graph) -> Result<BTreeMap<String, Tensor>, NpzError> {
    match is_safetensors(path) {
        true => load_safetensors(path, g, false, true),
        false => npz::load_step_inputs(path, g),
    }
}

fn file_err(path: &str, reason: String) -> NpzError {
    NpzError::File {
        path: path.into(),
        reason,
    }
}

/// The arrays of a safetensors file, checked against `g`'s leaves by the header alone.
fn load_safetensors(
    path: &str,
    g: &Graph,
    params: bool,
    steps: bool,
) -> Result<BTreeMap<String, Tensor>, NpzError> {
    let (md, base) = st::read_header(Path::new(path)).map_err(|e| file_err(path, reason_of(e)))?;
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    let mut unsupported = Vec::new();
    let mut infos = BTreeMap::new();
    for (name, info) in md.tensors() {
        let shape = info.shape.iter().map(|&d| d as u64).collect();
        match kind_of(info.dtype) {
            Some(kind) => {
                found.insert(name.clone(), (shape, kind));
                infos.insert(name, info.clone());
            }
            None => unsupported.push((name, numpy_name(info.dtype))),
        }
    }
    unsupported.sort();
    npz::check(path, g, &found, &unsupported, params, steps)?;
    infos
        .into_iter()
        .map(|(name, info)| {
            let t = read_tensor(path, base, &info).map_err(|reason| NpzError::Array {
                path: path.into(),
                name: name.clone(),
                reason,
            })?;
            Ok((name, t))
        })
        .collect()
}

/// The checkpoint error's text without the path (the caller names it).
fn reason_of(e: super::checkpoint::CheckpointError) -> String {
    match e {
        super::checkpoint::CheckpointError::Format { reason, .. }
        | super::checkpoint::CheckpointError::Io { reason, .. } => reason,
        other => other.to_string(),
    }
}

/// The kind a safetensors dtype is held as, if supported.
fn kind_of(d: Dtype) -> Option<Kind> {
    match d {
        Dtype::F32 | Dtype::BF16 | Dtype::F16 => Some(Kind::F32),
        Dtype::I32 => Some(Kind::I32),
        _ => None,
    }
}

/// A safetensors dtype as numpy names it (for messages shared with `.npz` files).
fn numpy_name(d: Dtype) -> String {
    match d {
        Dtype::F64 => "float64".into(),
        Dtype::I64 => "int64".into(),
        Dtype::I16 => "int16".into(),
        Dtype::I8 => "int8".into(),
        Dtype::U8 => "uint8".into(),
        Dtype::BOOL => "bool".into(),
        other => format!("{other:?}"),
    }
}

/// One tensor's data, read from the file and widened to f32 (or kept as i32).
fn read_tensor(path: &str, base: u64, info: &TensorInfo) -> Result<Tensor, String> {
    let range = (
        base + info.data_offsets.0 as u64,
        base + info.data_offsets.1 as u64,
    );
    let bytes = st::read_range(Path::new(path), range).map_err(reason_of)?;
    let shape = IxDyn(&info.shape);
    let shaped = |e: ndarray::ShapeError| e.to_string();
    match info.dtype {
        Dtype::F32 => {
            let v = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(word(c)));
            Ok(Tensor::F32(
                ArrayD::from_shape_vec(shape, v.collect()).map_err(shaped)?,
            ))
        }
        Dtype::I32 => {
            let v = bytes.chunks_exact(4).map(|c| i32::from_le_bytes(word(c)));
            Ok(Tensor::I32(
                ArrayD::from_shape_vec(shape, v.collect()).map_err(shaped)?,
            ))
        }
        Dtype::BF16 | Dtype::F16 => {
            let bf16 = info.dtype == Dtype::BF16;
            let v = bytes.chunks_exact(2).map(|c| {
                let bits = u16::from_le_bytes([c[0], c[1]]);
                match bf16 {
                    true => half::bf16::from_bits(bits).to_f32(),
                    false => half::f16::from_bits(bits).to_f32(),
                }
            });
            Ok(Tensor::F32(
                ArrayD::from_shape_vec(shape, v.collect()).map_err(shaped)?,
            ))
        }
        other => Err(format!("{other:?} arrays are not supported")),
    }
}

fn word(c: &[u8]) -> [u8; 4] {
    [c[0], c[1], c[2], c[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diag::SourceFile;
    use safetensors::tensor::TensorView;

    fn graph() -> Graph {
        let text = "input x : f32[2, 3]\nparam w : f32[3, 2]\nparam b : bf16[2]\ny = x @ w + cast(b, f32)\noutput y\n";
        let src = SourceFile::new("t.tpl", text.to_string());
        crate::driver::compile_step(&src, &[], false).unwrap().graph
    }

    fn write(name: &str, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> String {
        let dir = std::env::temp_dir().join(format!("tpc-arrays-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let path = dir.join(name);
        safetensors::serialize_to_file(views, None, &path).unwrap();
        path.display().to_string()
    }

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn safetensors_params_are_checked_and_16_bit_widened_exactly() {
        let g = graph();
        let w: Vec<f32> = (0..6).map(|i| i as f32 * 0.5).collect();
        let b: Vec<u8> = [1.5f32, -2.25]
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
            .collect();
        let path = write(
            "ok.safetensors",
            &[
                ("w", Dtype::F32, vec![3, 2], f32s(&w)),
                ("b", Dtype::BF16, vec![2], b),
            ],
        );
        let got = load(&path, &g, true).unwrap();
        assert_eq!(got["w"].shape(), &[3, 2]);
        let Tensor::F32(bias) = &got["b"] else {
            panic!("f32")
        };
        assert_eq!(bias.iter().copied().collect::<Vec<_>>(), [1.5, -2.25]);
        let bad = write(
            "bad.safetensors",
            &[
                ("w", Dtype::F32, vec![2, 3], f32s(&w)),
                ("b", Dtype::F64, vec![2], vec![0; 16]),
                ("z", Dtype::F32, vec![1], f32s(&[1.0])),
            ],
        );
        let e = load(&bad, &g, true).unwrap_err().to_string();
        for want in ["`w` has shape [2, 3]", "`b` is float64", "extra array `z`"] {
            assert!(e.contains(want), "{want}: {e}");
        }
        std::fs::write(&bad, b"not a safetensors file").unwrap();
        let e = load(&bad, &g, true).unwrap_err().to_string();
        assert!(e.contains("bad.safetensors"), "{e}");
    }
}
