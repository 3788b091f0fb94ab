//! Reading and writing `.npz` archives of named arrays (f32 and i32), and checking a set of
//! arrays against a program's leaves. Archives are untrusted: each array's header is checked
//! against the bytes the archive holds before anything is allocated, CRC errors and truncation
//! are named, and `numpy.savez_compressed` archives are read. Writes are atomic.

use super::Tensor;
use crate::ir::{Dtype, Graph, TensorType};
use ndarray::{ArrayD, IxDyn, ShapeBuilder};
use ndarray_npy::NpzWriter;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek};

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
    let mut archive = Archive::open(path)?;
    let (entries, unsupported) = archive.headers()?;
    let arrays = archive.arrays(&entries)?;
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
/// every problem (missing, extra, wrong shape, wrong or unsupported dtype) in one error. The
/// arrays' headers are checked before any data is read, so an archive that does not fit never
/// allocates what its headers declare.
pub fn load(path: &str, g: &Graph, params: bool) -> Result<BTreeMap<String, Tensor>, NpzError> {
    let mut archive = Archive::open(path)?;
    let (entries, unsupported) = archive.headers()?;
    check(path, g, &found(&entries), &unsupported, params, false)?;
    archive.arrays(&entries)
}

/// [`load`] of the inputs of a training run: an array may also carry one extra leading dim
/// of K ≥ 1 steps (`tokens: i32[K, B, S]` for `tokens : i32[B, S]`), step i reading slice
/// `i mod K`.
pub fn load_step_inputs(path: &str, g: &Graph) -> Result<BTreeMap<String, Tensor>, NpzError> {
    let mut archive = Archive::open(path)?;
    let (entries, unsupported) = archive.headers()?;
    check(path, g, &found(&entries), &unsupported, false, true)?;
    archive.arrays(&entries)
}

/// The shape and kind of every supported array, as [`check`] takes them.
fn found(entries: &BTreeMap<String, Entry>) -> BTreeMap<String, Found> {
    entries
        .iter()
        .map(|(n, e)| (n.clone(), (e.header.shape.clone(), e.kind)))
        .collect()
}

/// What a file says of one array before its data is read: its shape and element kind.
pub(crate) type Found = (Vec<u64>, Kind);

/// The supported arrays of an archive by name, and the names and numpy dtypes of those that
/// are neither float32 nor int32.
type Headers = (BTreeMap<String, Entry>, Vec<(String, String)>);

/// A float32 or int32 array of an archive, its header read and checked against the archive.
struct Entry {
    /// Its index in the archive.
    index: usize,
    /// Its header.
    header: Header,
    /// Its element type.
    kind: Kind,
    /// Bytes of data, as the header declares and the archive holds.
    data: u64,
}

/// An open archive.
struct Archive<'p> {
    at: Origin<'p>,
    zip: zip::ZipArchive<File>,
    /// The file's length: no array is reserved more than that.
    file_len: u64,
}

/// Where an archive comes from, for its errors.
#[derive(Clone, Copy)]
struct Origin<'p> {
    path: &'p str,
    /// The file starts as a zip file does.
    is_zip: bool,
}

impl Origin<'_> {
    /// A zip-level error of the archive.
    fn file_err(self, e: &zip::result::ZipError) -> NpzError {
        NpzError::File {
            path: self.path.into(),
            reason: archive_reason(self.is_zip, e),
        }
    }

    /// An error of array `name`.
    fn arr_err(self, name: &str, reason: String) -> NpzError {
        NpzError::Array {
            path: self.path.into(),
            name: name.into(),
            reason,
        }
    }
}

impl<'p> Archive<'p> {
    /// Opens the archive at `path`.
    fn open(path: &'p str) -> Result<Archive<'p>, NpzError> {
        let file_err = |reason: String| NpzError::File {
            path: path.into(),
            reason,
        };
        let mut f = File::open(path).map_err(|e| file_err(crate::files::os_reason(&e)))?;
        let file_len = f.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
        let mut magic = [0u8; 4];
        let is_zip = f.read_exact(&mut magic).is_ok()
            && (magic == *b"PK\x03\x04" || magic == *b"PK\x05\x06");
        let zip = f
            .rewind()
            .map_err(zip::result::ZipError::Io)
            .and_then(|()| zip::ZipArchive::new(f))
            .map_err(|e| file_err(archive_reason(is_zip, &e)))?;
        Ok(Archive {
            at: Origin { path, is_zip },
            zip,
            file_len,
        })
    }

    /// Every array's header, each checked against the bytes the archive holds for it; no data
    /// is read.
    fn headers(&mut self) -> Result<Headers, NpzError> {
        let mut entries = BTreeMap::new();
        let mut unsupported = Vec::new();
        for index in 0..self.zip.len() {
            let mut entry = self.zip.by_index(index).map_err(|e| self.at.file_err(&e))?;
            let full = entry.name().to_string();
            let name = full.strip_suffix(".npy").unwrap_or(&full).to_string();
            let size = entry.size();
            let header = npy_header(&mut entry);
            drop(entry);
            let header = header.map_err(|r| self.at.arr_err(&name, r))?;
            let Some(kind) = header.kind else {
                unsupported.push((name, header.dtype_name()));
                continue;
            };
            let data = header
                .data_bytes()
                .filter(|&b| b.checked_add(header.len) == Some(size))
                .ok_or_else(|| self.at.arr_err(&name, header.size_reason(size)))?;
            let e = Entry {
                index,
                header,
                kind,
                data,
            };
            entries.insert(name, e);
        }
        Ok((entries, unsupported))
    }

    /// The data of every entry, read.
    fn arrays(
        &mut self,
        entries: &BTreeMap<String, Entry>,
    ) -> Result<BTreeMap<String, Tensor>, NpzError> {
        entries
            .iter()
            .map(|(name, e)| {
                let entry = self.zip.by_index(e.index).map_err(|z| self.at.file_err(&z));
                let t =
                    read_array(entry?, e, self.file_len).map_err(|r| self.at.arr_err(name, r))?;
                Ok((name.clone(), t))
            })
            .collect()
    }
}

/// The array of `e` from its archive entry.
fn read_array(
    mut entry: zip::read::ZipFile<'_, File>,
    e: &Entry,
    file_len: u64,
) -> Result<Tensor, String> {
    let skipped = std::io::copy(&mut (&mut entry).take(e.header.len), &mut std::io::sink())
        .map_err(|io| data_reason(&io))?;
    if skipped != e.header.len {
        return Err("truncated data: the archive ends inside this array".into());
    }
    // Never reserve by the header's word: at most what the file itself could hold.
    let mut buf = Vec::with_capacity(e.data.min(file_len) as usize);
    entry.read_to_end(&mut buf).map_err(|io| data_reason(&io))?;
    if buf.len() as u64 != e.data {
        return Err(format!(
            "truncated: {} of {} bytes of data",
            buf.len(),
            e.data
        ));
    }
    e.header.tensor(e.kind, &buf)
}

/// The element type of a supported array.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    /// Float32 (and, in safetensors files, bf16 and f16, widened exactly).
    F32,
    /// Int32.
    I32,
}

impl Kind {
    /// The dtype as numpy names it.
    fn numpy(self) -> &'static str {
        match self {
            Kind::F32 => "float32",
            Kind::I32 => "int32",
        }
    }

    /// True when arrays of this kind hold values of dtype `d` (int32 for i32, float32 for
    /// every float dtype).
    fn fits(self, d: Dtype) -> bool {
        matches!(
            (self, d),
            (Kind::I32, Dtype::I32) | (Kind::F32, Dtype::F32 | Dtype::Bf16 | Dtype::F16)
        )
    }
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

    /// Why the header's data size disagrees with the `size` bytes the archive holds.
    fn size_reason(&self, size: u64) -> String {
        format!(
            "the header declares shape {} ({} bytes of data) but the archive holds {} bytes for \
             it: the file is corrupt or truncated",
            dims(&self.shape),
            self.data_bytes()
                .map_or("more than 2^64".to_string(), |b| b.to_string()),
            size.saturating_sub(self.len)
        )
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
        let words = bytes.chunks_exact(4).map(|c| {
            let w = [c[0], c[1], c[2], c[3]];
            if self.big_endian {
                u32::from_be_bytes(w)
            } else {
                u32::from_le_bytes(w)
            }
        });
        Ok(match kind {
            Kind::F32 => Tensor::F32(self.array(words.map(f32::from_bits).collect())?),
            Kind::I32 => Tensor::I32(self.array(words.map(|w| w as i32).collect())?),
        })
    }

    /// The array of the header's shape holding `data` in the header's order, in standard
    /// layout (a Fortran-order array is copied into it, a C-order one is already in it).
    fn array<T: Clone>(&self, data: Vec<T>) -> Result<ArrayD<T>, String> {
        let shape: Vec<usize> = self.shape.iter().map(|&d| d as usize).collect();
        let bad = |e: ndarray::ShapeError| format!("shape {}: {e}", dims(&self.shape));
        if self.fortran {
            let a = ArrayD::from_shape_vec(IxDyn(&shape).f(), data).map_err(bad)?;
            Ok(a.as_standard_layout().into_owned())
        } else {
            ArrayD::from_shape_vec(IxDyn(&shape), data).map_err(bad)
        }
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
/// `is_zip`: the file starts as a zip file does.
fn archive_reason(is_zip: bool, e: &zip::result::ZipError) -> String {
    use zip::result::ZipError;
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

/// Checks the arrays of an archive (their headers) against the leaves of `g` that `params`
/// selects (params or inputs), with the arrays that could not be read for their dtype (`name`,
/// numpy dtype): every problem (missing, extra, wrong shape, wrong dtype) in one error.
pub(crate) fn check(
    path: &str,
    g: &Graph,
    arrays: &BTreeMap<String, Found>,
    unsupported: &[(String, String)],
    params: bool,
    steps: bool,
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
        let dtype = match unsupported.iter().find(|(n, _)| n == name) {
            Some((_, dtype)) => Err(dtype.as_str()),
            None => Ok(arrays.get(*name)),
        };
        match dtype {
            Ok(Some(e)) => problems.extend(leaf_problems(name, ty, e, steps)),
            Ok(None) => problems.push(format!("missing {what} `{name}` ({ty})")),
            Err(dtype) => problems.push(dtype_problem(name, dtype, ty)),
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

/// The problems of array `name` (header `e`) as leaf of type `ty`: its shape (with `steps`,
/// also `[K] + shape` for K ≥ 1), its dtype.
fn leaf_problems(name: &str, ty: &TensorType, e: &Found, steps: bool) -> Vec<String> {
    let mut problems = Vec::new();
    let (shape, kind) = e;
    let stepped = steps && shape.len() == ty.rank() + 1 && shape[1..] == ty.shape[..];
    if stepped && shape[0] == 0 {
        problems.push(format!("`{name}` has a leading step axis of 0 steps"));
    } else if shape != &ty.shape && !stepped {
        let also = if steps {
            format!(
                " (or [K, {}] for K steps)",
                dims(&ty.shape).trim_matches(['[', ']'])
            )
        } else {
            String::new()
        };
        problems.push(format!(
            "`{name}` has shape {}, the program declares {ty}{also}",
            dims(shape)
        ));
    }
    if !kind.fits(ty.dtype) {
        problems.push(dtype_problem(name, kind.numpy(), ty));
    }
    problems
}

/// Array `name` is of numpy `dtype`, which does not store `ty`.
fn dtype_problem(name: &str, dtype: &str, ty: &TensorType) -> String {
    let store = if ty.dtype == Dtype::I32 {
        "int32"
    } else {
        "float32"
    };
    format!(
        "`{name}` is {dtype}, the program declares {ty} (store {} as {store})",
        ty.dtype
    )
}
