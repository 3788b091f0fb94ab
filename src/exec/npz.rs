//! Reading and writing `.npz` archives of named arrays (f32 and i32), and checking a set of
//! arrays against a program's leaves. Archives are untrusted: each array's header is checked
//! against the bytes the archive holds before anything is allocated, CRC errors and truncation
//! are named, and `numpy.savez_compressed` archives are read. Writes are atomic.

use super::Tensor;
use crate::ir::{Dtype, Graph};
use ndarray::{ArrayD, IxDyn, ShapeBuilder};
use ndarray_npy::NpzWriter;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;

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

/// Reads every array of the archive at `path`, by name (without the `.npy` suffix). An array of
/// a dtype other than float32 or int32 is an error (see [`load`] for every problem at once).
pub fn read(path: &str) -> Result<BTreeMap<String, Tensor>, NpzError> {
    let (arrays, unsupported) = read_all(path)?;
    match unsupported.into_iter().next() {
        Some((name, dtype)) => Err(NpzError::Array {
            path: path.into(),
            name,
            reason: format!("{dtype} arrays are not supported: store float32 or int32"),
        }),
        None => Ok(arrays),
    }
}

/// Reads the archive at `path` and checks it against the leaves of `g` that `params` selects:
/// every problem (missing, extra, wrong shape, wrong or unsupported dtype) in one error.
pub fn load(path: &str, g: &Graph, params: bool) -> Result<BTreeMap<String, Tensor>, NpzError> {
    let (arrays, unsupported) = read_all(path)?;
    check_with(path, g, &arrays, &unsupported, params)?;
    Ok(arrays)
}

/// The arrays of the archive, and the names and numpy dtypes of those that are neither float32
/// nor int32.
type Contents = (BTreeMap<String, Tensor>, Vec<(String, String)>);

fn read_all(path: &str) -> Result<Contents, NpzError> {
    let file_err = |reason: String| NpzError::File {
        path: path.into(),
        reason,
    };
    let f = File::open(path).map_err(|e| file_err(crate::files::os_reason(&e)))?;
    let file_len = f.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
    let mut z = zip::ZipArchive::new(f).map_err(|e| file_err(archive_reason(path, &e)))?;
    let mut arrays = BTreeMap::new();
    let mut unsupported = Vec::new();
    for i in 0..z.len() {
        let mut entry = z
            .by_index(i)
            .map_err(|e| file_err(archive_reason(path, &e)))?;
        let full = entry.name().to_string();
        let name = full.strip_suffix(".npy").unwrap_or(&full).to_string();
        let arr_err = |reason: String| NpzError::Array {
            path: path.into(),
            name: name.clone(),
            reason,
        };
        let size = entry.size();
        let header = npy_header(&mut entry).map_err(&arr_err)?;
        let Some(kind) = header.kind else {
            unsupported.push((name, header.dtype_name()));
            continue;
        };
        let data = header
            .data_bytes()
            .filter(|&b| b.checked_add(header.len) == Some(size))
            .ok_or_else(|| {
                arr_err(format!(
                    "the header declares shape {} ({} bytes of data) but the archive holds {} \
                     bytes for it: the file is corrupt or truncated",
                    dims(&header.shape),
                    header
                        .data_bytes()
                        .map_or("more than 2^64".to_string(), |b| b.to_string()),
                    size.saturating_sub(header.len)
                ))
            })?;
        // Never reserve by the header's word: at most what the file itself could hold.
        let mut buf = Vec::with_capacity(data.min(file_len) as usize);
        entry
            .read_to_end(&mut buf)
            .map_err(|e| arr_err(data_reason(&e)))?;
        if buf.len() as u64 != data {
            return Err(arr_err(format!(
                "truncated: {} of {data} bytes of data",
                buf.len()
            )));
        }
        let t = header.tensor(kind, &buf).map_err(&arr_err)?;
        arrays.insert(name, t);
    }
    Ok((arrays, unsupported))
}

/// The element type of a supported array.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    F32,
    I32,
}

/// What an `.npy` header says: the dtype, byte order, layout and shape.
struct Header {
    /// The numpy type descriptor (`<f4`).
    descr: String,
    /// F32 or I32 when supported.
    kind: Option<Kind>,
    /// Big-endian data.
    big_endian: bool,
    /// Fortran (column-major) order.
    fortran: bool,
    /// The dims.
    shape: Vec<u64>,
    /// Bytes before the data (magic, version, header).
    len: u64,
}

impl Header {
    /// Bytes of data the header declares (4 per element), if that fits in 64 bits.
    fn data_bytes(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(4u64, |acc, &d| acc.checked_mul(d))
    }

    /// The dtype as numpy names it (`float64`), or the descriptor itself.
    fn dtype_name(&self) -> String {
        let code = self.descr.trim_start_matches(['<', '>', '=', '|']);
        let name = match code {
            "f2" => "float16",
            "f4" => "float32",
            "f8" => "float64",
            "i1" => "int8",
            "i2" => "int16",
            "i4" => "int32",
            "i8" => "int64",
            "u1" => "uint8",
            "u2" => "uint16",
            "u4" => "uint32",
            "u8" => "uint64",
            "b1" => "bool",
            "c8" => "complex64",
            "c16" => "complex128",
            _ => return format!("dtype `{}`", self.descr),
        };
        name.to_string()
    }

    /// The array from its data bytes.
    fn tensor(&self, kind: Kind, bytes: &[u8]) -> Result<Tensor, String> {
        let shape: Vec<usize> = self.shape.iter().map(|&d| d as usize).collect();
        let words = bytes.chunks_exact(4).map(|c| {
            let w = [c[0], c[1], c[2], c[3]];
            if self.big_endian {
                u32::from_be_bytes(w)
            } else {
                u32::from_le_bytes(w)
            }
        });
        let ix = if self.fortran {
            IxDyn(&shape).f()
        } else {
            IxDyn(&shape).into()
        };
        let bad = |e: ndarray::ShapeError| format!("shape {}: {e}", dims(&self.shape));
        Ok(match kind {
            Kind::F32 => Tensor::F32(
                ArrayD::from_shape_vec(ix, words.map(f32::from_bits).collect())
                    .map_err(bad)?
                    .as_standard_layout()
                    .into_owned(),
            ),
            Kind::I32 => Tensor::I32(
                ArrayD::from_shape_vec(ix, words.map(|w| w as i32).collect())
                    .map_err(bad)?
                    .as_standard_layout()
                    .into_owned(),
            ),
        })
    }
}

/// Longest `.npy` header accepted (numpy writes a few hundred bytes).
const MAX_HEADER: u64 = 1 << 20;

/// Reads and parses the `.npy` header at the start of `r`.
fn npy_header(r: &mut impl Read) -> Result<Header, String> {
    let bad = |what: &str| format!("not an .npy array ({what})");
    let mut head = [0u8; 8];
    r.read_exact(&mut head).map_err(|e| data_reason(&e))?;
    if &head[..6] != b"\x93NUMPY" {
        return Err(bad("no NUMPY magic"));
    }
    let (len_bytes, prefix) = match head[6] {
        1 => (2, 10u64),
        2 | 3 => (4, 12u64),
        v => return Err(format!("unsupported .npy format version {v}")),
    };
    let mut lb = [0u8; 4];
    r.read_exact(&mut lb[..len_bytes])
        .map_err(|e| data_reason(&e))?;
    let hlen = u32::from_le_bytes(lb) as u64;
    if hlen > MAX_HEADER {
        return Err(bad("header too long"));
    }
    let mut text = vec![0u8; hlen as usize];
    r.read_exact(&mut text).map_err(|e| data_reason(&e))?;
    let text = String::from_utf8_lossy(&text);
    let descr = dict_value(&text, "descr")
        .and_then(|v| {
            let v = v.trim();
            let q = v.chars().next().filter(|c| *c == '\'' || *c == '"')?;
            v[1..].split(q).next().map(str::to_string)
        })
        .ok_or_else(|| bad("no descr in the header"))?;
    let fortran = match dict_value(&text, "fortran_order").map(|v| v.trim_start()) {
        Some(v) if v.starts_with("True") => true,
        Some(v) if v.starts_with("False") => false,
        _ => return Err(bad("no fortran_order in the header")),
    };
    let shape = dict_value(&text, "shape")
        .and_then(parse_shape)
        .ok_or_else(|| bad("no readable shape in the header"))?;
    let little = descr.starts_with('<') || descr.starts_with('=') || descr.starts_with('|');
    let kind = match descr.trim_start_matches(['<', '>', '=', '|']) {
        "f4" => Some(Kind::F32),
        "i4" => Some(Kind::I32),
        _ => None,
    };
    Ok(Header {
        big_endian: !little,
        descr,
        kind,
        fortran,
        shape,
        len: prefix + hlen,
    })
}

/// The text after `'key':` in a Python dict literal.
fn dict_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text
        .find(&format!("'{key}'"))
        .or_else(|| text.find(&format!("\"{key}\"")))?;
    let rest = &text[at + key.len() + 2..];
    rest.trim_start().strip_prefix(':')
}

/// `(8, 128)`, `(4,)`, `()` -> dims.
fn parse_shape(v: &str) -> Option<Vec<u64>> {
    let inner = v.trim_start().strip_prefix('(')?;
    let inner = &inner[..inner.find(')')?];
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse().ok())
        .collect()
}

/// `[8, 128]`.
fn dims(shape: &[u64]) -> String {
    let d: Vec<String> = shape.iter().map(|x| x.to_string()).collect();
    format!("[{}]", d.join(", "))
}

/// What a zip-level error means for the user.
fn archive_reason(path: &str, e: &zip::result::ZipError) -> String {
    use zip::result::ZipError;
    let is_zip = std::fs::File::open(path)
        .and_then(|mut f| {
            let mut m = [0u8; 4];
            f.read_exact(&mut m).map(|_| m)
        })
        .is_ok_and(|m| m == *b"PK\x03\x04" || m == *b"PK\x05\x06");
    match e {
        ZipError::Io(io) => data_reason(io),
        ZipError::UnsupportedArchive(what) => format!("unsupported archive ({what})"),
        _ if !is_zip => {
            "not an npz archive (not a zip file; write it with numpy.savez)".to_string()
        }
        ZipError::InvalidArchive(what) => {
            format!("corrupt or truncated npz archive ({})", what.to_lowercase())
        }
        other => format!("corrupt npz archive ({other})"),
    }
}

/// What an I/O error while reading an entry means: a CRC mismatch or truncated data.
fn data_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    if text.contains("Invalid checksum") {
        "CRC mismatch: the data is corrupt".into()
    } else if e.kind() == std::io::ErrorKind::UnexpectedEof {
        "truncated data: the archive ends inside this array".into()
    } else {
        format!("corrupt data ({})", crate::files::os_reason(e))
    }
}

/// Writes the arrays to `path` as an npz archive (one `NAME.npy` per array), atomically: an
/// earlier file at `path` stays whole until the new one is complete.
pub fn write(path: &str, arrays: &BTreeMap<String, Tensor>) -> Result<(), NpzError> {
    let mut failed = None;
    crate::files::write_atomic(std::path::Path::new(path), |f| {
        let mut z = NpzWriter::new(f);
        for (name, t) in arrays {
            let r = match t {
                Tensor::F32(a) => z.add_array(name.as_str(), a),
                Tensor::I32(a) => z.add_array(name.as_str(), a),
            };
            if let Err(e) = r {
                failed = Some(name.clone());
                // Dropping a failed writer would retry the write and print its Debug text; the
                // temporary it writes to is removed by the caller.
                std::mem::forget(z);
                return Err(std::io::Error::other(e.to_string()));
            }
        }
        z.finish()
            .map(drop)
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
    .map_err(|e| NpzError::File {
        path: path.into(),
        reason: {
            let e = match e {
                crate::files::FileError::Write { reason, .. } => {
                    format!("cannot write: {reason} (an earlier file there is unchanged)")
                }
                other => other.to_string(),
            };
            match failed {
                Some(name) => format!("writing `{name}`: {e}"),
                None => e,
            }
        },
    })
}

/// Checks `arrays` against the leaves of `g` that `params` selects (params or inputs): every
/// problem (missing, extra, wrong shape, wrong dtype) in one error.
pub fn check(
    path: &str,
    g: &Graph,
    arrays: &BTreeMap<String, Tensor>,
    params: bool,
) -> Result<(), NpzError> {
    check_with(path, g, arrays, &[], params)
}

/// `check`, with the arrays that could not be read for their dtype (`name`, numpy dtype).
fn check_with(
    path: &str,
    g: &Graph,
    arrays: &BTreeMap<String, Tensor>,
    unsupported: &[(String, String)],
    params: bool,
) -> Result<(), NpzError> {
    let leaves: BTreeMap<&str, _> = if params {
        g.params().collect()
    } else {
        g.inputs().collect()
    };
    let what = if params { "param" } else { "input" };
    let store = |d: Dtype| if d == Dtype::I32 { "int32" } else { "float32" };
    let mut problems = Vec::new();
    for (name, v) in &leaves {
        let ty = g.ty(*v);
        if let Some((_, dtype)) = unsupported.iter().find(|(n, _)| n == name) {
            problems.push(format!(
                "`{name}` is {dtype}, the program declares {ty} (store {} as {})",
                ty.dtype,
                store(ty.dtype)
            ));
            continue;
        }
        let Some(t) = arrays.get(*name) else {
            problems.push(format!("missing {what} `{name}` ({ty})"));
            continue;
        };
        let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
        let kind_ok = matches!(
            (t, ty.dtype),
            (Tensor::I32(_), Dtype::I32) | (Tensor::F32(_), Dtype::F32 | Dtype::Bf16 | Dtype::F16)
        );
        if shape != ty.shape {
            problems.push(format!(
                "`{name}` has shape {}, the program declares {ty}",
                dims(&shape)
            ));
        }
        if !kind_ok {
            let numpy = if t.kind() == "i32" {
                "int32"
            } else {
                "float32"
            };
            problems.push(format!(
                "`{name}` is {numpy}, the program declares {ty} (store {} as {})",
                ty.dtype,
                store(ty.dtype)
            ));
        }
    }
    let names = arrays.keys().chain(unsupported.iter().map(|(n, _)| n));
    for name in names {
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
