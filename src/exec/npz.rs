//! Reading and writing `.npz` archives of named arrays (f32 and i32, C order), and checking a
//! set of arrays against a program's leaves.

use super::Tensor;
use crate::ir::{Dtype, Graph};
use ndarray::{IxDyn, OwnedRepr};
use ndarray_npy::{NpzReader, NpzWriter};
use std::collections::BTreeMap;
use std::fs::File;

/// Why an archive could not be read or written, or does not fit the program.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum NpzError {
    /// The file could not be opened or is not an npz archive.
    #[error("{path}: {reason}")]
    File {
        /// The path.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// An array of a dtype other than float32 or int32, or a corrupt array.
    #[error("{path}: array `{name}`: {reason}")]
    Array {
        /// The path.
        path: String,
        /// The array.
        name: String,
        /// What went wrong.
        reason: String,
    },
    /// Arrays that do not fit the program's leaves: every problem, one per line.
    #[error("{path} does not fit the program:\n{}", problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Mismatch {
        /// The path.
        path: String,
        /// One line per missing, extra, mis-shaped or mis-typed array.
        problems: Vec<String>,
    },
}

/// Reads every array of the archive at `path`, by name (without the `.npy` suffix).
pub fn read(path: &str) -> Result<BTreeMap<String, Tensor>, NpzError> {
    let file_err = |reason: String| NpzError::File {
        path: path.into(),
        reason,
    };
    let f = File::open(path).map_err(|e| file_err(e.to_string()))?;
    let mut z = NpzReader::new(f).map_err(|e| file_err(format!("not an npz archive ({e})")))?;
    let names = z
        .names()
        .map_err(|e| file_err(format!("corrupt archive ({e})")))?;
    let mut out = BTreeMap::new();
    for entry in names {
        let name = entry.strip_suffix(".npy").unwrap_or(&entry).to_string();
        let arr_err = |reason: String| NpzError::Array {
            path: path.into(),
            name: name.clone(),
            reason,
        };
        let t = match z.by_name::<OwnedRepr<f32>, IxDyn>(&entry) {
            Ok(a) => Tensor::F32(a),
            Err(_) => match z.by_name::<OwnedRepr<i32>, IxDyn>(&entry) {
                Ok(a) => Tensor::I32(a),
                Err(e) => {
                    return Err(arr_err(format!(
                        "only little-endian float32 and int32 arrays are supported ({e})"
                    )))
                }
            },
        };
        out.insert(name, t);
    }
    Ok(out)
}

/// Writes the arrays to `path` as an npz archive (one `NAME.npy` per array).
pub fn write(path: &str, arrays: &BTreeMap<String, Tensor>) -> Result<(), NpzError> {
    let file_err = |reason: String| NpzError::File {
        path: path.into(),
        reason,
    };
    let f = File::create(path).map_err(|e| file_err(e.to_string()))?;
    let mut z = NpzWriter::new(f);
    for (name, t) in arrays {
        let r = match t {
            Tensor::F32(a) => z.add_array(name.as_str(), a),
            Tensor::I32(a) => z.add_array(name.as_str(), a),
        };
        r.map_err(|e| file_err(format!("writing `{name}`: {e}")))?;
    }
    z.finish().map_err(|e| file_err(e.to_string()))?;
    Ok(())
}

/// Checks `arrays` against the leaves of `g` that `want` selects (params or inputs): every
/// problem (missing, extra, wrong shape, wrong dtype) in one error.
pub fn check(
    path: &str,
    g: &Graph,
    arrays: &BTreeMap<String, Tensor>,
    params: bool,
) -> Result<(), NpzError> {
    let leaves: BTreeMap<&str, _> = if params {
        g.params().collect()
    } else {
        g.inputs().collect()
    };
    let what = if params { "param" } else { "input" };
    let mut problems = Vec::new();
    for (name, v) in &leaves {
        let ty = g.ty(*v);
        match arrays.get(*name) {
            None => problems.push(format!("missing {what} `{name}` ({ty})")),
            Some(t) => {
                let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
                let kind_ok = matches!(
                    (t, ty.dtype),
                    (Tensor::I32(_), Dtype::I32)
                        | (Tensor::F32(_), Dtype::F32 | Dtype::Bf16 | Dtype::F16)
                );
                if shape != ty.shape {
                    problems.push(format!(
                        "`{name}` has shape {shape:?}, the program declares {ty}"
                    ));
                }
                if !kind_ok {
                    problems.push(format!(
                        "`{name}` is {}, the program declares {} (store {} as {})",
                        t.kind(),
                        ty.dtype,
                        ty.dtype,
                        if ty.dtype == Dtype::I32 {
                            "int32"
                        } else {
                            "float32"
                        }
                    ));
                }
            }
        }
    }
    for name in arrays.keys() {
        if !leaves.contains_key(name.as_str()) {
            problems.push(format!(
                "extra array `{name}`: the program has no {what} of that name"
            ));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(NpzError::Mismatch {
            path: path.into(),
            problems,
        })
    }
}
