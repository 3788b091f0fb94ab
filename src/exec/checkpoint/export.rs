//! `tpc checkpoint export`: the checkpoint's tensors as global arrays in one safetensors file,
//! assembled one tensor at a time from the saved blocks (every chunk read is verified), so the
//! peak memory is the largest tensor, not the model. The file is written to a temporary beside
//! the target and renamed into place.

use super::load::Reader;
use super::{st, CheckpointError};
use safetensors::Dtype;
use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::Path;

/// What an export wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct Exported {
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of the file.
    pub bytes: u64,
}

/// Writes the params of the checkpoint `reader` (and its optimizer state when `with_state`) as
/// global tensors to the safetensors file `path`.
pub fn export(reader: &Reader, path: &Path, with_state: bool) -> Result<Exported, CheckpointError> {
    let names: Vec<&String> = reader
        .index
        .tensors
        .iter()
        .filter(|(_, t)| with_state || t.kind == "param")
        .map(|(n, _)| n)
        .collect();
    let mut slots = Vec::with_capacity(names.len());
    for name in &names {
        let t = &reader.index.tensors[*name];
        let dtype = match t.dtype.as_str() {
            "I32" => Dtype::I32,
            _ => Dtype::F32,
        };
        let shape = t
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| format_err(path, format!("`{name}` is too large")))?;
        slots.push((name.as_str(), dtype, shape));
    }
    let view: Vec<(&str, Dtype, &[usize])> = slots
        .iter()
        .map(|(n, d, s)| (*n, *d, s.as_slice()))
        .collect();
    let meta = HashMap::from([
        ("tpc.program".to_string(), reader.index.program.clone()),
        ("tpc.step".to_string(), reader.index.step.to_string()),
        ("tpc.source".to_string(), reader.index.source.clone()),
    ]);
    let (md, text) = st::header_of(&view, meta)?;
    let mut failed = None;
    let written = crate::files::write_atomic(path, |f| {
        let mut w = BufWriter::new(f);
        w.write_all(&(text.len() as u64).to_le_bytes())?;
        w.write_all(&text)?;
        for name in &names {
            let t = reader.read_global(name).map_err(|e| {
                failed = Some(e);
                std::io::Error::other("a block could not be read")
            })?;
            w.write_all(&st::tensor_bytes(&t))?;
        }
        w.flush()
    });
    if let Some(e) = failed {
        return Err(e);
    }
    written.map_err(|e| CheckpointError::Io {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(Exported {
        tensors: names.len(),
        bytes: 8 + text.len() as u64 + md.data_len() as u64,
    })
}

fn format_err(path: &Path, reason: String) -> CheckpointError {
    CheckpointError::Format {
        path: path.display().to_string(),
        reason,
    }
}
